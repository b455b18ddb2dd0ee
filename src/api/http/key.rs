//! The `Idempotency-Key` request header (draft-ietf-httpapi-idempotency-key-header-07, and
//! Stripe's bare form).
//!
//! Invariants: a key is 1 to 255 printable ASCII characters (0x20 to 0x7E) once unquoted; the
//! header's value is either a structured-field string (`"..."`, with `\"` and `\\` escapes,
//! as the draft defines it) or, as Stripe's clients send it, the bare key (no surrounding
//! spaces, no quote). More than one `Idempotency-Key` field is refused, never merged.

use http::{HeaderMap, HeaderName};

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

/// The request's idempotency key: `None` if it has none.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, BadKey> {
    let mut values = headers.get_all(&HEADER_NAME).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(BadKey::Repeated);
    }
    let raw = value.to_str().map_err(|_| BadKey::Malformed)?;
    let key = match raw.strip_prefix('"') {
        Some(quoted) => unquote(quoted)?,
        None => bare(raw)?,
    };
    match key.len() {
        0 => Err(BadKey::Empty),
        n if n > MAX_KEY_LEN => Err(BadKey::TooLong),
        _ => Ok(Some(key)),
    }
}

fn printable(c: char) -> bool {
    (' '..='~').contains(&c)
}

/// The inside of a structured-field string, from after its opening quote.
fn unquote(rest: &str) -> Result<String, BadKey> {
    let mut key = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => key.push(e),
                _ => return Err(BadKey::Malformed),
            },
            '"' => {
                return match chars.as_str() {
                    "" => Ok(key),
                    _ => Err(BadKey::Malformed),
                }
            }
            c if printable(c) => key.push(c),
            _ => return Err(BadKey::Malformed),
        }
    }
    Err(BadKey::Malformed) // no closing quote
}

/// A bare key: printable, no quote, no surrounding space.
fn bare(raw: &str) -> Result<String, BadKey> {
    let ok = raw.chars().all(|c| printable(c) && c != '"') && raw.trim() == raw;
    match ok {
        true => Ok(raw.to_owned()),
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
        idempotency_key(&headers)
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
