//! The stored form of one finished step of a multi-step operation.
//!
//! Layout: magic `0x5E`, version 1, name length (u16 LE), name (UTF-8), payload length
//! (u32 LE), payload (the step's bincode-encoded result), crc32 of all before.
//!
//! Invariants: [`decode`] never panics and never allocates beyond its input; a step is written
//! once, when it finishes, under its parent key's claim, so a recorded step is never replaced.

const MAGIC: u8 = 0x5E;
const VERSION: u8 = 1;

/// A decoded step borrowing from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepRecord<'a> {
    pub name: &'a str,
    pub payload: &'a [u8],
}

/// Encodes a finished step. `name` and `payload` are bounded by the caller (name ≤ 1 KiB,
/// payload ≤ max_result_bytes).
pub(crate) fn encode(name: &str, payload: &[u8]) -> Vec<u8> {
    // Invariant: Context::step refuses names over MAX_NAME and payloads over the result limit.
    let name_len = u16::try_from(name.len()).expect("step names are at most 1 KiB");
    let payload_len = u32::try_from(payload.len()).expect("payload bounded by max_result_bytes");
    let mut out = Vec::with_capacity(2 + 2 + name.len() + 4 + payload.len() + 4);
    out.extend_from_slice(&[MAGIC, VERSION]);
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The longest step name accepted, in bytes.
pub(crate) const MAX_NAME: usize = 1024;

/// Decodes a step record, checking every length and the checksum.
pub(crate) fn decode(bytes: &[u8]) -> Result<StepRecord<'_>, &'static str> {
    if bytes.len() < 2 + 2 + 4 + 4 {
        return Err("truncated step record");
    }
    if bytes[0] != MAGIC {
        return Err("not a step record");
    }
    if bytes[1] != VERSION {
        return Err("unknown step record version");
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("step record checksum mismatch");
    }
    let name_len = usize::from(u16::from_le_bytes([body[2], body[3]]));
    let rest = &body[4..];
    if rest.len() < name_len + 4 {
        return Err("step name overruns the record");
    }
    let (name, rest) = rest.split_at(name_len);
    let name = std::str::from_utf8(name).map_err(|_| "step name is not UTF-8")?;
    let (len, payload) = rest.split_at(4);
    let payload_len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if payload.len() != payload_len {
        return Err("step payload length mismatch");
    }
    Ok(StepRecord { name, payload })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_truncation_fails() {
        let bytes = encode("charge", b"payload");
        assert_eq!(
            decode(&bytes),
            Ok(StepRecord {
                name: "charge",
                payload: b"payload"
            })
        );
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err());
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode(&b).is_err(), "flip at {i}");
        }
    }
}
