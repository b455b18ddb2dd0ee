//! The stored form of one key's record.
//!
//! Layout (all integers little-endian), format version 2:
//!
//! ```text
//! 0   magic 0x1D            1   version (2)          2  state        3  outcome kind
//! 4   attempts u32          8   created_ms u64       16 updated_ms   24 expires_ms
//! 32  claim epoch u64       40  claim sequence u64   48 flags (bit 0 fingerprint, bit 1 steps)
//! 49  fingerprint [32]      81  life epoch u64       89 life sequence u64
//! 97  codec u8              98  shape u64 (0: none)  106 payload length u32
//! 110 payload …             then crc32 of all before
//! ```
//!
//! Version 1 (written by idemstore 0.1) is the same up to the fingerprint, then payload length
//! at 81 and payload at 85; it reads as life [`LEGACY_LIFE`], codec bincode, no shape.
//!
//! Invariants: [`decode`] never panics and never allocates more than the input's length for
//! any input: it checks magic, version, length, checksum and every enum byte before building a
//! [`Record`]. A record whose version byte is newer than [`VERSION`] is reported as such, not
//! as corrupt. The payload is opaque here: the encoded `T` or `E` (see [`Codec`]), or for
//! outcomes that could not be stored, the reason (see [`OutcomeKind`]).
//!
//! A key's *life* runs from a claim that finds the key absent (never used, expired or
//! removed) until its record expires or is removed; it is named by that first claim's token,
//! which no other life of any key ever has. Retries and takeovers keep the life; steps are
//! stored under it, so a life only ever sees its own steps.

use crate::format::codec::Codec;
use crate::format::fingerprint::Fingerprint;

const MAGIC: u8 = 0x1D;
/// The record format this build writes (it reads this one and version 1).
pub(crate) const VERSION: u8 = 2;
const HEADER_LEN: usize = 110;
const V1_HEADER_LEN: usize = 85;
const CRC_LEN: usize = 4;

/// The life of every record written by format 1, which had no lives: its steps are found
/// under the format-1 layout. Real lives are claim tokens, whose epoch is at least 1.
pub(crate) const LEGACY_LIFE: ClaimToken = ClaimToken {
    epoch: 0,
    sequence: 0,
};

/// Where a record is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordState {
    /// A call claimed the key and its operation is running (or its process died while it ran).
    Pending,
    /// The operation returned `Ok`; its result is recorded and replayed.
    Completed,
    /// The operation returned an error declared permanent; the error is recorded and replayed.
    FailedPermanent,
    /// The operation returned a retryable error or panicked; the next call runs it again.
    FailedRetryable,
}

impl RecordState {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            RecordState::Pending => 0,
            RecordState::Completed => 1,
            RecordState::FailedPermanent => 2,
            RecordState::FailedRetryable => 3,
        }
    }

    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => RecordState::Pending,
            1 => RecordState::Completed,
            2 => RecordState::FailedPermanent,
            3 => RecordState::FailedRetryable,
            _ => return None,
        })
    }
}

/// What the payload holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutcomeKind {
    /// No payload (Pending, FailedRetryable).
    None,
    /// The bincode encoding of the result or permanent error.
    Stored,
    /// The outcome was too large to store: payload is its encoded size (u64) and the limit (u64).
    TooLarge,
    /// The outcome failed to encode: payload is the serializer's message (UTF-8).
    NotEncodable,
}

impl OutcomeKind {
    pub(crate) fn to_byte(self) -> u8 {
        match self {
            OutcomeKind::None => 0,
            OutcomeKind::Stored => 1,
            OutcomeKind::TooLarge => 2,
            OutcomeKind::NotEncodable => 3,
        }
    }

    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => OutcomeKind::None,
            1 => OutcomeKind::Stored,
            2 => OutcomeKind::TooLarge,
            3 => OutcomeKind::NotEncodable,
            _ => return None,
        })
    }
}

/// The identity of one claim of a key: the store's open epoch and a sequence number within it.
/// Tokens are unique. A claim that replaces a record of its key (a retry, a takeover) always
/// gets a larger token than that record's, whichever process makes it, so a downstream service
/// can reject work from a stale claim of the key (fencing). On the embedded engine (one
/// process) tokens also grow across keys, lives and restarts; on a shared engine a new life
/// (after a removal or an expiry) starts from its store's own epoch, which may be lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClaimToken {
    /// The store's open count when the claim was made (persisted, grows on every open).
    pub epoch: u64,
    /// The claim's sequence number within that open.
    pub sequence: u64,
}

impl ClaimToken {
    /// The token as one integer that orders like the token.
    pub fn as_u128(self) -> u128 {
        (u128::from(self.epoch) << 64) | u128::from(self.sequence)
    }
}

/// Everything in a record but its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub state: RecordState,
    pub outcome: OutcomeKind,
    pub attempts: u32,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub expires_ms: u64,
    pub claim: ClaimToken,
    pub fingerprint: Option<Fingerprint>,
    /// The operation may have recorded steps (in the steps tree) that go with this record.
    pub has_steps: bool,
    /// The life this record belongs to (see the module docs).
    pub life: ClaimToken,
    /// How the payload is encoded (meaningful when `outcome` is `Stored`).
    pub codec: Codec,
    /// The shape the payload must decode to, if recorded.
    pub shape: Option<u64>,
}

const FLAG_FINGERPRINT: u8 = 1;
const FLAG_STEPS: u8 = 2;

impl Header {
    /// Whether the record reads as absent at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        now_ms >= self.expires_ms
    }
}

/// A decoded record borrowing its payload from the stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub header: Header,
    pub payload: &'a [u8],
}

/// Why bytes are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DecodeError {
    Corrupt(&'static str),
    FutureVersion(u8),
}

/// Encodes a record. `payload` must fit in u32 (the store's result limit guarantees it).
pub(crate) fn encode(header: &Header, payload: &[u8]) -> Vec<u8> {
    // Invariant: callers bound payloads by max_result_bytes, which config caps far below u32::MAX.
    let payload_len = u32::try_from(payload.len()).expect("payload bounded by max_result_bytes");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    out.extend_from_slice(&[
        MAGIC,
        VERSION,
        header.state.to_byte(),
        header.outcome.to_byte(),
    ]);
    out.extend_from_slice(&header.attempts.to_le_bytes());
    out.extend_from_slice(&header.created_ms.to_le_bytes());
    out.extend_from_slice(&header.updated_ms.to_le_bytes());
    out.extend_from_slice(&header.expires_ms.to_le_bytes());
    out.extend_from_slice(&header.claim.epoch.to_le_bytes());
    out.extend_from_slice(&header.claim.sequence.to_le_bytes());
    let steps = if header.has_steps { FLAG_STEPS } else { 0 };
    match header.fingerprint {
        Some(fp) => {
            out.push(FLAG_FINGERPRINT | steps);
            out.extend_from_slice(fp.as_bytes());
        }
        None => {
            out.push(steps);
            out.extend_from_slice(&[0; 32]);
        }
    }
    out.extend_from_slice(&header.life.epoch.to_le_bytes());
    out.extend_from_slice(&header.life.sequence.to_le_bytes());
    out.push(header.codec.to_byte());
    out.extend_from_slice(&header.shape.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a record, checking every byte that matters. Never panics.
pub(crate) fn decode(bytes: &[u8]) -> Result<Record<'_>, DecodeError> {
    let corrupt = DecodeError::Corrupt;
    match bytes.first() {
        None => return Err(corrupt("empty value")),
        Some(&MAGIC) => {}
        Some(_) => return Err(corrupt("not an idemstore record (bad magic byte)")),
    }
    let header_len = match bytes.get(1) {
        None => return Err(corrupt("truncated header")),
        Some(&VERSION) => HEADER_LEN,
        Some(1) => V1_HEADER_LEN,
        Some(&v) if v > VERSION => return Err(DecodeError::FutureVersion(v)),
        Some(_) => return Err(corrupt("unknown format version")),
    };
    if bytes.len() < header_len + CRC_LEN {
        return Err(corrupt("truncated header"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let payload_len = u32_at(body, header_len - 4) as usize;
    if body.len() - header_len != payload_len {
        return Err(corrupt("payload length mismatch"));
    }
    let (life, codec, shape) = if header_len == V1_HEADER_LEN {
        (LEGACY_LIFE, Codec::Bincode, None)
    } else {
        let life = ClaimToken {
            epoch: u64_at(body, 81),
            sequence: u64_at(body, 89),
        };
        let codec = Codec::from_byte(body[97]).ok_or(corrupt("unknown codec"))?;
        let shape = Some(u64_at(body, 98)).filter(|s| *s != 0);
        (life, codec, shape)
    };
    let state = RecordState::from_byte(body[2]).ok_or(corrupt("unknown state"))?;
    let outcome = OutcomeKind::from_byte(body[3]).ok_or(corrupt("unknown outcome kind"))?;
    let flags = body[48];
    if flags & !(FLAG_FINGERPRINT | FLAG_STEPS) != 0 {
        return Err(corrupt("unknown flags"));
    }
    let fingerprint = (flags & FLAG_FINGERPRINT != 0).then(|| {
        let mut fp = [0; 32];
        fp.copy_from_slice(&body[49..81]);
        Fingerprint::from_bytes(fp)
    });
    let consistent = match state {
        RecordState::Pending | RecordState::FailedRetryable => outcome == OutcomeKind::None,
        RecordState::Completed | RecordState::FailedPermanent => outcome != OutcomeKind::None,
    };
    if !consistent {
        return Err(corrupt("outcome kind does not match state"));
    }
    let header = Header {
        state,
        outcome,
        attempts: u32_at(body, 4),
        created_ms: u64_at(body, 8),
        updated_ms: u64_at(body, 16),
        expires_ms: u64_at(body, 24),
        claim: ClaimToken {
            epoch: u64_at(body, 32),
            sequence: u64_at(body, 40),
        },
        fingerprint,
        has_steps: flags & FLAG_STEPS != 0,
        life,
        codec,
        shape,
    };
    Ok(Record {
        header,
        payload: &body[header_len..],
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(state: RecordState, outcome: OutcomeKind) -> Header {
        Header {
            state,
            outcome,
            attempts: 3,
            created_ms: 10,
            updated_ms: 20,
            expires_ms: 30,
            claim: ClaimToken {
                epoch: 4,
                sequence: 5,
            },
            fingerprint: Some(Fingerprint::of_bytes(b"req")),
            has_steps: true,
            life: ClaimToken {
                epoch: 2,
                sequence: 9,
            },
            codec: Codec::Json,
            shape: Some(77),
        }
    }

    #[test]
    fn round_trips() {
        let h = sample(RecordState::Completed, OutcomeKind::Stored);
        let bytes = encode(&h, b"payload");
        let r = decode(&bytes).unwrap();
        assert_eq!(r.header, h);
        assert_eq!(r.payload, b"payload");
        let h = Header {
            fingerprint: None,
            ..sample(RecordState::Pending, OutcomeKind::None)
        };
        assert_eq!(decode(&encode(&h, b"")).unwrap().header, h);
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let bytes = encode(&sample(RecordState::Completed, OutcomeKind::Stored), b"xyz");
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(decode(&b).is_err(), "flip byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn version_1_records_still_decode() {
        // A format-1 record as idemstore 0.1 wrote it: Completed, one attempt, payload 0x2A.
        let mut v1 = vec![MAGIC, 1, 1, 1];
        v1.extend_from_slice(&1u32.to_le_bytes());
        for t in [10u64, 20, 30, 4, 5] {
            v1.extend_from_slice(&t.to_le_bytes());
        }
        v1.push(FLAG_STEPS);
        v1.extend_from_slice(&[0; 32]);
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.push(0x2A);
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let r = decode(&v1).unwrap();
        assert_eq!(r.payload, [0x2A]);
        assert_eq!(
            (
                r.header.life,
                r.header.codec,
                r.header.shape,
                r.header.has_steps
            ),
            (LEGACY_LIFE, Codec::Bincode, None, true)
        );
        assert_eq!(
            r.header.claim,
            ClaimToken {
                epoch: 4,
                sequence: 5
            }
        );
    }

    #[test]
    fn newer_version_is_reported_as_such() {
        let mut bytes = encode(&sample(RecordState::Pending, OutcomeKind::None), b"");
        bytes[1] = 9;
        assert_eq!(decode(&bytes), Err(DecodeError::FutureVersion(9)));
    }
}
