//! The attempt a claim starts, and the headers it writes.
//!
//! Invariants: an attempt continues the life of the live record it replaces (a retryable
//! failure or an orphan), keeping its creation time, fingerprint, steps flag and life, with
//! the attempt count one higher; with no live record it starts a new life, named by the token
//! of the claim that begins it, so no two lives of any key share a name.

use crate::core::options::CallOptions;
use crate::format::codec::Codec;
use crate::format::fingerprint::Fingerprint;
use crate::format::record::{ClaimToken, Header, OutcomeKind, RecordState, LEGACY_LIFE};

/// The attempt a claim starts, carrying over what the record it replaces knew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attempt {
    pub number: u32,
    created_ms: u64,
    fingerprint: Option<Fingerprint>,
    has_steps: bool,
    /// The life this attempt continues; None: it starts one, named by its own claim.
    life: Option<ClaimToken>,
}

impl Attempt {
    /// The attempt after `previous` — the live record being claimed again (retryable, or an
    /// orphan) — or the first attempt of a fresh life of the key.
    pub(crate) fn after(previous: Option<&Header>, now_ms: u64, options: &CallOptions) -> Self {
        match previous {
            Some(h) => Self {
                number: h.attempts.saturating_add(1),
                created_ms: h.created_ms,
                fingerprint: options.fingerprint.or(h.fingerprint),
                has_steps: options.with_steps || h.has_steps,
                // A format-1 record without steps has none to keep, but its life's name is
                // shared with every format-1 life (whose stray steps 0.1 could leave behind):
                // it continues under a name of its own.
                life: Some(h.life).filter(|l| *l != LEGACY_LIFE || h.has_steps),
            },
            None => Self {
                number: 1,
                created_ms: now_ms,
                fingerprint: options.fingerprint,
                has_steps: options.with_steps,
                life: None,
            },
        }
    }

    /// The header of a record this attempt writes at `now_ms`, expiring `ttl_ms` later.
    pub(crate) fn header(
        self,
        state: RecordState,
        outcome: OutcomeKind,
        now_ms: u64,
        ttl_ms: u64,
        claim: ClaimToken,
    ) -> Header {
        Header {
            state,
            outcome,
            attempts: self.number,
            created_ms: self.created_ms,
            updated_ms: now_ms,
            expires_ms: now_ms.saturating_add(ttl_ms),
            claim,
            fingerprint: self.fingerprint,
            has_steps: self.has_steps,
            life: self.life.unwrap_or(claim),
            codec: Codec::Bincode,
            shape: None,
        }
    }
}

/// The header of the outcome a run writes at `now_ms` over its claim's Pending header
/// `pending`. A run that outlived its TTL keeps its outcome a full TTL from now (the writer
/// then indexes the new expiry, which differs from `pending`'s).
pub(crate) fn outcome_header(
    pending: &Header,
    now_ms: u64,
    ttl_ms: u64,
    state: RecordState,
    outcome: OutcomeKind,
    codec: Codec,
    shape: Option<u64>,
) -> Header {
    let mut header = Header {
        state,
        outcome,
        updated_ms: now_ms,
        codec,
        shape,
        ..*pending
    };
    if header.is_expired(now_ms) {
        header.expires_ms = now_ms.saturating_add(ttl_ms);
    }
    header
}
