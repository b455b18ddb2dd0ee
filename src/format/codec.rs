//! Encoding of the caller's results and errors: bincode 2 (default) or JSON, with a shape
//! check on both sides.
//!
//! Invariants:
//! - nothing is recorded that will not replay: [`encode`] decodes its own bytes back and
//!   compares the decoded value's [shape](crate::format::walk::shape) with the original's, so a type
//!   that serializes but does not decode (`serde_json::Value` or an internally tagged enum
//!   under bincode, a field skipped when serializing) is refused on the first call;
//! - a replay returns the value that was stored or an error, never a different value:
//!   [`decode`] compares the decoded value's shape with the one recorded beside the bytes;
//! - user code that panics while serializing or deserializing is an encoding or decoding
//!   error, never an unwind through the store;
//! - decoding is bounded: a length prefix can make bincode claim at most [`DECODE_LIMIT`]
//!   bytes; a decode that leaves bytes unread is an error; encoding stops as soon as the
//!   output passes the caller's limit.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::format::{borrowing, walk};

/// Upper bound on what decoding one payload may allocate.
pub(crate) const DECODE_LIMIT: usize = 256 << 20;

/// The largest `max_result_bytes` the store accepts.
pub(crate) const MAX_RESULT_LIMIT: usize = 16 << 20;

/// How results and permanent errors are encoded in records and steps.
///
/// A record remembers the codec it was written with, so changing the setting never breaks
/// the replay of records already stored.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// use idemstore::{Codec, Store};
/// let store = Store::open(dir.path().join("db"))?;
/// // serde_json::Value needs a self-describing format: bincode refuses it on the first call.
/// let body = store
///     .call("order-1")
///     .codec(Codec::Json)
///     .run(|| Ok::<_, std::io::Error>(serde_json::json!({"id": 7, "status": "paid"})))?;
/// assert_eq!(body["id"], 7);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Codec {
    /// bincode 2, standard configuration: compact and fast. Needs types that are not
    /// self-describing: no `deserialize_any` (`serde_json::Value`, untagged or internally
    /// tagged enums, `#[serde(flatten)]`), no fields skipped while serializing.
    #[default]
    Bincode,
    /// JSON (`serde_json`): self-describing, for any serde type that round-trips through JSON.
    /// Larger and slower than bincode.
    Json,
}

impl Codec {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            Codec::Bincode => 1,
            Codec::Json => 2,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Codec::Bincode),
            2 => Some(Codec::Json),
            _ => None,
        }
    }
}

/// An encoded value and the shape it must decode to.
#[derive(Debug)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub codec: Codec,
    pub shape: u64,
}

/// Why a value could not be encoded.
#[derive(Debug)]
pub enum EncodeFailure {
    /// Its encoding passed the limit; `size` is the size reached when encoding stopped
    /// (at least `limit + 1`) or the exact size when known.
    TooLarge { size: u64 },
    /// The value's `Serialize` failed or panicked, or its bytes do not decode back to it.
    Serializer(String),
}

/// A writer that refuses to grow past a limit.
struct BoundedVec {
    buf: Vec<u8>,
    limit: usize,
    attempted: u64,
}

impl BoundedVec {
    fn push(&mut self, bytes: &[u8]) -> bool {
        self.attempted = self.attempted.saturating_add(bytes.len() as u64);
        if self.buf.len() + bytes.len() > self.limit {
            return false;
        }
        self.buf.extend_from_slice(bytes);
        true
    }
}

impl bincode::enc::write::Writer for BoundedVec {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        match self.push(bytes) {
            true => Ok(()),
            false => Err(bincode::error::EncodeError::Other(
                "over the result size limit",
            )),
        }
    }
}

impl std::io::Write for BoundedVec {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match self.push(bytes) {
            true => Ok(bytes.len()),
            false => Err(std::io::Error::other("over the result size limit")),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Encodes `value` with `codec`, refusing encodings longer than `limit` bytes and encodings
/// that do not decode back to a value of the same shape.
pub(crate) fn encode<V: Serialize + DeserializeOwned>(
    value: &V,
    codec: Codec,
    limit: usize,
) -> Result<Encoded, EncodeFailure> {
    let shape = catching(|| walk::shape(value))
        .and_then(|r| r.map_err(|e| e.0))
        .map_err(EncodeFailure::Serializer)?;
    let mut writer = BoundedVec {
        buf: Vec::new(),
        limit,
        attempted: 0,
    };
    let written = catching(|| match codec {
        Codec::Bincode => {
            bincode::serde::encode_into_writer(value, &mut writer, bincode::config::standard())
                .map_err(|e| e.to_string())
        }
        Codec::Json => serde_json::to_writer(&mut writer, value).map_err(|e| e.to_string()),
    })
    .and_then(|r| r);
    match written {
        Ok(()) => {}
        Err(_) if writer.attempted > limit as u64 => {
            return Err(EncodeFailure::TooLarge {
                size: writer.attempted,
            })
        }
        Err(message) => {
            let hint = match codec {
                Codec::Bincode => {
                    " (types bincode cannot encode, such as #[serde(flatten)] or sequences of \
                     unknown length, can be stored with Codec::Json)"
                }
                Codec::Json => "",
            };
            return Err(EncodeFailure::Serializer(format!("{message}{hint}")));
        }
    }
    let encoded = Encoded {
        bytes: writer.buf,
        codec,
        shape,
    };
    // The decoded copy must carry the same data: same shape, same data whatever the order of
    // sequences and maps. Its decoding and its drop are user code too.
    let original = catching(|| walk::data(value))
        .and_then(|r| r.map_err(|e| e.0))
        .map_err(EncodeFailure::Serializer)?;
    let same = catching(|| {
        let copy = decode::<V>(&encoded.bytes, codec, Some(shape))?;
        match walk::data(&copy) {
            Ok(data) if data == original => Ok(()),
            Ok(_) => Err("it decodes to a different value".to_string()),
            Err(e) => Err(e.0),
        }
    })
    .and_then(|r| r);
    match same {
        Ok(()) => Ok(encoded),
        Err(message) => {
            let hint = match codec {
                _ if message.contains("Codec::Json") => "",
                Codec::Bincode => "; store the type with Codec::Json, or change the type",
                Codec::Json => "; the type does not round-trip through JSON",
            };
            Err(EncodeFailure::Serializer(format!(
                "its encoding does not decode back to the same value ({message}){hint}"
            )))
        }
    }
}

/// Decodes a whole payload as `V`; `shape`, when recorded, must match the decoded value's.
pub(crate) fn decode<V: Serialize + DeserializeOwned>(
    bytes: &[u8],
    codec: Codec,
    shape: Option<u64>,
) -> Result<V, String> {
    let value: V = catching(|| match codec {
        Codec::Bincode => {
            let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
            // Strings and byte buffers copied once from the payload (see `borrowing`); a type
            // whose visitor refuses borrowed data is decoded the plain way.
            let seed = borrowing::Seed(std::marker::PhantomData::<V>);
            let decoded = bincode::serde::seed_decode_from_slice(seed, bytes, config)
                .or_else(|_| bincode::serde::decode_from_slice::<V, _>(bytes, config));
            match decoded {
                Ok((value, read)) if read == bytes.len() => Ok(value),
                Ok((_, read)) => Err(format!(
                    "{} bytes are left over after the value: the type is not the one that \
                     was stored",
                    bytes.len() - read
                )),
                Err(e) => Err(describe_bincode(&e)),
            }
        }
        Codec::Json => serde_json::from_slice(bytes).map_err(|e| describe_json(&e)),
    })
    .and_then(|r| r)?;
    if let Some(expected) = shape {
        let found = catching(|| walk::shape(&value)).and_then(|r| r.map_err(|e| e.0))?;
        if found != expected {
            return Err(
                "the stored value decodes into a differently shaped value (fields, \
                        variants or field types changed since it was recorded)"
                    .into(),
            );
        }
    }
    Ok(value)
}

/// Runs user serde code, turning a panic into an error message.
pub(crate) fn catching<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a non-string payload".into());
        format!("a serde implementation panicked: {what}")
    })
}

/// A sentence a person can act on, for a bincode decoding failure. It never quotes the stored
/// bytes (they may be a customer's data).
fn describe_bincode(e: &bincode::error::DecodeError) -> String {
    use bincode::error::DecodeError as D;
    let not_this_type = "the type is not the one that was stored";
    match e {
        D::UnexpectedEnd { .. } => {
            format!("the stored bytes end before the requested type does: {not_this_type}")
        }
        D::LimitExceeded => "the stored bytes claim a length over the decoding limit".into(),
        D::InvalidBooleanValue(_) => format!("a stored boolean is not 0 or 1: {not_this_type}"),
        D::InvalidCharEncoding(_) | D::Utf8 { .. } => {
            format!("a stored string or char is not valid UTF-8: {not_this_type}")
        }
        D::UnexpectedVariant { type_name, .. } => {
            format!("a stored enum variant does not exist in {type_name}: {not_this_type}")
        }
        D::Serde(
            bincode::serde::DecodeError::AnyNotSupported
            | bincode::serde::DecodeError::IdentifierNotSupported
            | bincode::serde::DecodeError::IgnoredAnyNotSupported,
        ) => "the type needs a self-describing format (serde_json::Value, untagged or \
              internally tagged enums, flatten): use Codec::Json"
            .into(),
        _ => format!("the stored bytes do not decode as the requested type: {not_this_type}"),
    }
}

/// The same for JSON: the category and position of the failure, never the stored text.
fn describe_json(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Data => "does not match the requested type",
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            "is not valid JSON"
        }
        serde_json::error::Category::Io => "could not be read",
    };
    format!(
        "the stored JSON {what} (line {}, column {})",
        e.line(),
        e.column()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let v = (7u64, String::from("receipt"));
        let e = encode(&v, Codec::Bincode, 1024).unwrap();
        assert_eq!(
            decode::<(u64, String)>(&e.bytes, e.codec, Some(e.shape)).unwrap(),
            v
        );
        assert!(matches!(
            encode(&vec![0u8; 100], Codec::Bincode, 50),
            Err(EncodeFailure::TooLarge { size }) if size > 50
        ));
        assert!(
            decode::<u64>(&e.bytes, Codec::Bincode, None).is_err(),
            "trailing bytes"
        );
    }

    #[test]
    fn huge_length_prefix_fails_without_allocating() {
        // A varint claiming a u64::MAX-length string.
        let bytes = [253u8, 255, 255, 255, 255, 255, 255, 255, 255];
        assert!(decode::<String>(&bytes, Codec::Bincode, None).is_err());
        assert!(decode::<Vec<u64>>(&bytes, Codec::Bincode, None).is_err());
    }

    #[test]
    fn a_changed_type_is_an_error_not_a_value() {
        let e = encode(&0u32, Codec::Bincode, 64).unwrap();
        // bincode alone reads 0u32 as the empty string.
        assert!(decode::<String>(&e.bytes, Codec::Bincode, None).is_ok());
        assert!(decode::<String>(&e.bytes, Codec::Bincode, Some(e.shape)).is_err());
    }

    #[test]
    fn types_bincode_cannot_replay_are_refused_at_once() {
        let value = serde_json::json!({"a": [1, 2]});
        assert!(matches!(
            encode(&value, Codec::Bincode, 1024),
            Err(EncodeFailure::Serializer(m)) if m.contains("Codec::Json")
        ));
        let e = encode(&value, Codec::Json, 1024).unwrap();
        assert_eq!(
            decode::<serde_json::Value>(&e.bytes, Codec::Json, Some(e.shape)).unwrap(),
            value
        );
    }
}
