//! Resolving an interrupted run by hand: an operator records what its side effect did.
//!
//! Invariants:
//! - only an orphan is resolved: a live Pending record that no call of this process runs (the
//!   resolver leads the key in the registry, and is refused if a call does) and whose holder
//!   the engine says is gone (the same verdict a takeover needs);
//! - a resolution is a takeover: a claim that compare-and-swaps the exact orphan bytes (on a
//!   shared engine, never while a lease runs), with a token above the orphan's, then the
//!   resolved record written fenced by that claim; a holder that comes back, or a call that
//!   claimed the key meanwhile, is never overwritten;
//! - the resolved record keeps the orphan's life (and so its recorded steps), fingerprint,
//!   creation time and attempt count (no attempt ran) and the TTL its call chose (from now),
//!   and is durable when resolve returns.

use crate::core::attempt::{outcome_header, Attempt};
use crate::core::options::CallOptions;
use crate::core::outcome::RecordInfo;
use crate::core::replay::decode_error;
use crate::driver::registry::Entry;
use crate::driver::state::StoreState;
use crate::engine::{Engine, Held};
use crate::error::Error;
use crate::format::codec::Codec;
use crate::format::record::{self, OutcomeKind, RecordState};
use crate::key::{KeyHash, KeyName};

/// What a resolution writes: the state, and the outcome's encoded bytes and codec (`None`
/// for no outcome).
pub(crate) struct Resolved {
    pub state: RecordState,
    pub payload: Option<(Vec<u8>, Codec)>,
}

/// Resolves `key`'s orphan into `resolved`; returns the record written.
pub(crate) fn resolve<S: Engine>(
    state: &StoreState<S>,
    key: &[u8],
    resolved: Resolved,
) -> Result<RecordInfo, Error> {
    state.check_key(key)?;
    let not_orphan = |found, live| Error::NotAnOrphan {
        key: KeyName::new(key),
        found,
        holder_live: live,
    };
    let Entry::Leader(leader) = state.registry.enter(key) else {
        return Err(not_orphan(Some(RecordState::Pending), true));
    };
    let now = state.clock.now_millis();
    let Some(stored) = state.engine.get(key)? else {
        return Err(not_orphan(None, false));
    };
    let stored = stored.as_ref();
    let orphan = record::decode(stored)
        .map_err(|e| decode_error(key, e))?
        .header;
    if orphan.is_expired(now) {
        return Err(not_orphan(None, false));
    }
    if orphan.state != RecordState::Pending {
        return Err(not_orphan(Some(orphan.state), false));
    }
    if state.engine.holder_live(key, orphan.claim, false) {
        return Err(not_orphan(Some(RecordState::Pending), true));
    }
    let options = CallOptions::default();
    // The TTL the orphan's call chose (its record was written that long before it expires).
    let ttl_ms = match orphan.expires_ms.saturating_sub(orphan.updated_ms) {
        0 => state.settings.ttl_ms(&options),
        chosen => chosen,
    };
    let mut pending_header = Attempt::after(Some(&orphan), now, &options).header(
        RecordState::Pending,
        OutcomeKind::None,
        now,
        ttl_ms,
        state.next_claim_token(Some(orphan.claim))?,
    );
    pending_header.attempts = orphan.attempts;
    let pending = record::encode(&pending_header, &[]);
    state.engine.index_expiry(pending_header.expires_ms, key)?;
    if !state.engine.claim(key, Some(stored), pending.clone())? {
        // Changed since the read: someone else acted on the key first.
        return Err(not_orphan(None, true));
    }
    let held = Held {
        key,
        record: &pending,
        token: pending_header.claim,
        life: pending_header.life,
    };
    let (kind, payload, codec) = match &resolved.payload {
        Some((bytes, codec)) => (OutcomeKind::Stored, bytes.as_slice(), *codec),
        None => (OutcomeKind::None, &[][..], Codec::Bincode),
    };
    let header = outcome_header(
        &pending_header,
        now,
        ttl_ms,
        resolved.state,
        kind,
        codec,
        None,
    );
    if !state
        .engine
        .finish(&held, Some(record::encode(&header, payload)))?
    {
        return Err(state.fenced_out(&held));
    }
    state.wait_durable()?;
    drop(leader);
    tracing::warn!(key = %KeyHash(key), state = ?resolved.state, "interrupted run resolved by hand");
    Ok(RecordInfo::new(&header, payload.len()))
}
