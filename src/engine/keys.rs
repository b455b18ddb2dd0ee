//! How engines that sort keys lay out their index and step keys.
//!
//! Invariants: expiry entries (`expires_ms` big-endian, then the key) sort by time, so the
//! entries due by `now` are a prefix; the steps of one life sort together: key length (u16,
//! big-endian), key, then the life (epoch and sequence, u64 big-endian each) except for the
//! format-1 life [`LEGACY_LIFE`], then the step index (u32 big-endian). Keys are at most 65535
//! bytes (the configuration caps `max_key_bytes`), so the length fits in u16 and no key's
//! prefix is a prefix of another key's.

use crate::format::record::{ClaimToken, LEGACY_LIFE};

/// The expiry index key of `key`'s entry at `expires_ms`.
pub(crate) fn expiry_key(expires_ms: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The prefix every step of `key`'s life `life` starts with.
pub(crate) fn steps_prefix(key: &[u8], life: ClaimToken) -> Vec<u8> {
    let mut p = Vec::with_capacity(2 + key.len() + 16 + 4);
    p.extend_from_slice(&(key.len() as u16).to_be_bytes());
    p.extend_from_slice(key);
    if life != LEGACY_LIFE {
        p.extend_from_slice(&life.epoch.to_be_bytes());
        p.extend_from_slice(&life.sequence.to_be_bytes());
    }
    p
}

/// The key of step `index` of `key`'s life `life`.
pub(crate) fn step_key(key: &[u8], life: ClaimToken, index: u32) -> Vec<u8> {
    let mut k = steps_prefix(key, life);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// The step index at the end of a step key that starts with `prefix`, if it is one.
pub(crate) fn step_index(prefix: &[u8], step_key: &[u8]) -> Option<u32> {
    let rest = step_key.strip_prefix(prefix)?;
    <[u8; 4]>::try_from(rest).ok().map(u32::from_be_bytes)
}
