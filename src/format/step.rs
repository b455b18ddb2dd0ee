//! The stored form of one finished step of a multi-step operation.
//!
//! Layout, version 2: magic `0x5E`, version, outcome kind (as in a record: stored, too large,
//! not encodable), codec, shape (u64 LE, 0: none), name length (u16 LE), name (UTF-8),
//! payload length (u32 LE), payload, crc32 of all before. Version 1 (idemstore 0.1) had no
//! kind, codec or shape: it reads as a stored bincode payload with no shape.
//!
//! Invariants: [`decode`] never panics and never allocates beyond its input; a step is written
//! once, when it finishes, under its life and its parent key's claim, so a recorded step is
//! never replaced. A step whose outcome could not be stored is recorded too (kind too large /
//! not encodable): it ran, so it never runs again.

use crate::format::codec::Codec;
use crate::format::record::OutcomeKind;

const MAGIC: u8 = 0x5E;
const VERSION: u8 = 2;

/// A decoded step borrowing from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepRecord<'a> {
    pub name: &'a str,
    pub outcome: OutcomeKind,
    pub codec: Codec,
    pub shape: Option<u64>,
    /// The encoded result (stored), or the reason it could not be stored.
    pub payload: &'a [u8],
}

/// Encodes a finished step. `name` and `payload` are bounded by the caller (name ≤ 1 KiB,
/// payload ≤ max_result_bytes).
pub(crate) fn encode(step: &StepRecord<'_>) -> Vec<u8> {
    // Invariant: Context::step refuses names over MAX_NAME and payloads over the result limit.
    let name_len = u16::try_from(step.name.len()).expect("step names are at most 1 KiB");
    let payload_len =
        u32::try_from(step.payload.len()).expect("payload bounded by max_result_bytes");
    let mut out = Vec::with_capacity(16 + step.name.len() + 4 + step.payload.len() + 4);
    out.extend_from_slice(&[MAGIC, VERSION, step.outcome.to_byte(), step.codec.to_byte()]);
    out.extend_from_slice(&step.shape.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(step.name.as_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(step.payload);
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
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("step record checksum mismatch");
    }
    let (outcome, codec, shape, rest) = match body[1] {
        1 => (OutcomeKind::Stored, Codec::Bincode, None, &body[2..]),
        VERSION => {
            if body.len() < 12 + 2 {
                return Err("truncated step record");
            }
            let outcome = match OutcomeKind::from_byte(body[2]) {
                Some(OutcomeKind::None) | None => return Err("unknown step outcome kind"),
                Some(kind) => kind,
            };
            let codec = Codec::from_byte(body[3]).ok_or("unknown step codec")?;
            let mut shape = [0; 8];
            shape.copy_from_slice(&body[4..12]);
            let shape = Some(u64::from_le_bytes(shape)).filter(|s| *s != 0);
            (outcome, codec, shape, &body[12..])
        }
        _ => return Err("unknown step record version"),
    };
    let name_len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
    let rest = &rest[2..];
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
    Ok(StepRecord {
        name,
        outcome,
        codec,
        shape,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_truncation_fails() {
        let step = StepRecord {
            name: "charge",
            outcome: OutcomeKind::Stored,
            codec: Codec::Json,
            shape: Some(42),
            payload: b"payload",
        };
        let bytes = encode(&step);
        assert_eq!(decode(&bytes), Ok(step));
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err());
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode(&b).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn version_1_steps_still_decode() {
        let mut v1 = vec![MAGIC, 1];
        v1.extend_from_slice(&6u16.to_le_bytes());
        v1.extend_from_slice(b"charge");
        v1.extend_from_slice(&2u32.to_le_bytes());
        v1.extend_from_slice(&[1, 2]);
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let step = decode(&v1).unwrap();
        assert_eq!(
            (step.name, step.payload, step.shape),
            ("charge", &[1u8, 2][..], None)
        );
        assert_eq!(
            (step.outcome, step.codec),
            (OutcomeKind::Stored, Codec::Bincode)
        );
    }
}
