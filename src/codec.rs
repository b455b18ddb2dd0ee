//! Encoding of the caller's results and errors (bincode 2, standard configuration).
//!
//! Invariants: decoding is bounded: a length prefix in the bytes can make the decoder claim
//! at most [`DECODE_LIMIT`] bytes, so a payload that does not match the requested type
//! fails with an error instead of a huge allocation; a decode that leaves bytes unread is an
//! error too (the type changed). Encoding stops as soon as the output passes the caller's
//! limit, so an oversized result costs at most `limit` bytes of memory here.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Upper bound on what decoding one payload may allocate.
pub(crate) const DECODE_LIMIT: usize = 256 << 20;

/// The largest `max_result_bytes` the store accepts.
pub(crate) const MAX_RESULT_LIMIT: usize = 16 << 20;

/// Why a value could not be encoded.
#[derive(Debug)]
pub enum EncodeFailure {
    /// Its encoding passed the limit; `size` is the size reached when encoding stopped
    /// (at least `limit + 1`) or the exact size when known.
    TooLarge { size: u64 },
    /// The value's `Serialize` implementation failed.
    Serializer(String),
}

/// A writer that refuses to grow past a limit.
struct BoundedVec {
    buf: Vec<u8>,
    limit: usize,
    attempted: u64,
}

impl bincode::enc::write::Writer for BoundedVec {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.attempted = self.attempted.saturating_add(bytes.len() as u64);
        if self.buf.len() + bytes.len() > self.limit {
            return Err(bincode::error::EncodeError::Other(
                "over the result size limit",
            ));
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }
}

/// Encodes `value`, refusing encodings longer than `limit` bytes.
pub(crate) fn encode<V: Serialize + ?Sized>(
    value: &V,
    limit: usize,
) -> Result<Vec<u8>, EncodeFailure> {
    let mut writer = BoundedVec {
        buf: Vec::new(),
        limit,
        attempted: 0,
    };
    match bincode::serde::encode_into_writer(value, &mut writer, bincode::config::standard()) {
        Ok(()) => Ok(writer.buf),
        Err(_) if writer.attempted > limit as u64 => Err(EncodeFailure::TooLarge {
            size: writer.attempted,
        }),
        Err(e) => Err(EncodeFailure::Serializer(e.to_string())),
    }
}

/// Decodes a whole payload as `V`.
pub(crate) fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<V, String> {
    let config = bincode::config::standard().with_limit::<DECODE_LIMIT>();
    match bincode::serde::decode_from_slice::<V, _>(bytes, config) {
        Ok((value, read)) if read == bytes.len() => Ok(value),
        Ok((_, read)) => Err(format!(
            "{} trailing bytes after the value",
            bytes.len() - read
        )),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let v = (7u64, String::from("receipt"));
        let bytes = encode(&v, 1024).unwrap();
        assert_eq!(decode::<(u64, String)>(&bytes).unwrap(), v);
        assert!(matches!(
            encode(&vec![0u8; 100], 50),
            Err(EncodeFailure::TooLarge { size }) if size > 50
        ));
        assert!(decode::<u64>(&bytes).is_err(), "trailing bytes must fail");
    }

    #[test]
    fn huge_length_prefix_fails_without_allocating() {
        // A varint claiming a u64::MAX-length string.
        let bytes = [253u8, 255, 255, 255, 255, 255, 255, 255, 255];
        assert!(decode::<String>(&bytes).is_err());
        assert!(decode::<Vec<u64>>(&bytes).is_err());
    }
}
