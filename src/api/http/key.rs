//! The `Idempotency-Key` request header (draft-ietf-httpapi-idempotency-key-header-07, and
//! Stripe's bare form).
//!
//! Invariants: a key is 1 to 255 printable ASCII characters (0x20 to 0x7E) once unquoted; the
//! header's value is either a structured-field string (`"..."`, with `\"` and `\\` escapes,
//! as the draft defines it) or, as Stripe's clients send it, the bare key (no surrounding
//! spaces, no quote). More than one `Idempotency-Key` field is refused, never merged.

use http::{HeaderMap, HeaderName};
use std::borrow::Cow;

/// The header's name.
pub(crate) const HEADER: &str = "idempotency-key";

/// The header's name, made once (a lookup by `&str` parses the name on every request).
const HEADER_NAME: HeaderName = HeaderName::from_static(HEADER);

/// The longest key accepted.
pub(crate) const MAX_KEY_LEN: usize = 255;

/// Why a request's key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadKey {
    Repeated,
    Malformed,
    Empty,
    TooLong,
}

impl BadKey {
    pub(crate) fn detail(self) -> &'static str {
        match self {
            BadKey::Repeated => "the request has more than one Idempotency-Key header",
            BadKey::Malformed => {
                "the Idempotency-Key header is not a structured-field string (\"...\") nor a bare \
                 key of printable ASCII characters"
            }
            BadKey::Empty => "the Idempotency-Key is empty",
            BadKey::TooLong => "the Idempotency-Key is longer than 255 characters",
        }
    }
}

/// A key as the request sent it, unquoted: borrowed from the header where it needs no
/// unescaping (a bare key, a quoted one without escapes: no allocation), owned otherwise.
pub(crate) struct Key<'h>(Cow<'h, [u8]>);

impl Key<'_> {
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The request's idempotency key: `None` if it has none.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<Key<'_>>, BadKey> {
    let mut values = headers.get_all(&HEADER_NAME).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BadKey::Repeated);
    }
    let raw = value.as_bytes();
    let key = match raw.split_first() {
        Some((b'"', quoted)) => unquote(quoted)?,
        _ => bare(raw)?,
    };
    match key.len() {
        0 => Err(BadKey::Empty),
        n if n > MAX_KEY_LEN => Err(BadKey::TooLong),
        _ => Ok(Some(Key(key))),
    }
}

/// Whether the request has an `Idempotency-Key` field (well-formed or not).
pub(crate) fn has_key(headers: &HeaderMap) -> bool {
    headers.contains_key(&HEADER_NAME)
}

fn printable(b: u8) -> bool {
    (b' '..=b'~').contains(&b)
}

/// The inside of a structured-field string, from after its opening quote.
fn unquote(rest: &[u8]) -> Result<Cow<'_, [u8]>, BadKey> {
    match rest.iter().position(|&b| b == b'"' || b == b'\\') {
        // No escape before the closing quote: the key is the bytes up to it.
        Some(close) if rest[close] == b'"' => {
            let key = &rest[..close];
            match close + 1 == rest.len() && key.iter().all(|&b| printable(b)) {
                true => Ok(Cow::Borrowed(key)),
                false => Err(BadKey::Malformed),
            }
        }
        Some(_) => unescape(rest).map(Cow::Owned),
        None => Err(BadKey::Malformed), // no closing quote
    }
}

/// A structured-field string with escapes, from after its opening quote.
fn unescape(rest: &[u8]) -> Result<Vec<u8>, BadKey> {
    let mut key = Vec::with_capacity(rest.len());
    let mut bytes = rest.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => key.push(e),
                _ => return Err(BadKey::Malformed),
            },
            b'"' => {
                return match bytes.as_slice() {
                    [] => Ok(key),
                    _ => Err(BadKey::Malformed),
                }
            }
            b if printable(b) => key.push(b),
            _ => return Err(BadKey::Malformed),
        }
    }
    Err(BadKey::Malformed) // no closing quote
}

/// A bare key: printable, no quote, no surrounding space.
fn bare(raw: &[u8]) -> Result<Cow<'_, [u8]>, BadKey> {
    let ok = raw.iter().all(|&b| printable(b) && b != b'"')
        && raw.first() != Some(&b' ')
        && raw.last() != Some(&b' ');
    match ok {
        true => Ok(Cow::Borrowed(raw)),
        false => Err(BadKey::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn key_of(values: &[&[u8]]) -> Result<Option<String>, BadKey> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(HEADER, HeaderValue::from_bytes(v).expect("header value"));
        }
        let key = idempotency_key(&headers)?;
        Ok(key.map(|k| String::from_utf8(k.as_bytes().to_vec()).expect("printable ASCII")))
    }

    #[test]
    fn structured_strings_and_bare_keys_are_accepted() {
        let ok = |v: &[u8], k: &str| assert_eq!(key_of(&[v]), Ok(Some(k.to_owned())));
        ok(
            b"\"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
        );
        ok(b"8e03978e-40d5", "8e03978e-40d5");
        ok(b"\"a \\\"quoted\\\" \\\\ key\"", "a \"quoted\" \\ key");
        ok(b"\"with space\"", "with space");
        let long = "k".repeat(255);
        ok(long.as_bytes(), &long);
        assert_eq!(key_of(&[]), Ok(None));
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        let bad = |v: &[u8], why| assert_eq!(key_of(&[v]), Err(why), "{v:?}");
        bad(b"\"\"", BadKey::Empty);
        bad(b"", BadKey::Empty);
        bad("k".repeat(256).as_bytes(), BadKey::TooLong);
        bad(b"\"unterminated", BadKey::Malformed);
        bad(b"\"bad\\escape\"", BadKey::Malformed);
        bad(b"\"x\" trailing", BadKey::Malformed);
        bad(b"half\"quote", BadKey::Malformed);
        bad(b" padded", BadKey::Malformed);
        bad(b"tab\there", BadKey::Malformed);
        bad(b"caf\xc3\xa9", BadKey::Malformed);
        assert_eq!(key_of(&[b"a", b"b"]), Err(BadKey::Repeated));
    }
}
