//! Exactly-once local effects: the operation's writes and its Completed record commit in one
//! sled transaction.
//!
//! Invariants:
//! - no Pending record is ever written: the record goes from absent / expired / retryable
//!   straight to Completed in the same transaction as the operation's writes, so after any
//!   crash either both are durable or neither is, and the operation applies exactly once;
//! - the engine may run the closure again (a conflict); only the run that commits applies
//!   anything, because every write goes through the transaction's views;
//! - an `Err` from the operation aborts the transaction, so its writes never apply; the error
//!   is then recorded (permanent or retryable) with an ordinary compare-and-swap;
//! - calls for one key in this process are serialised by the registry, as in `machine`, and a
//!   committed outcome is replayed only once it is durable.
//!
//! sled 0.34 runs every transaction under a database-wide write lock: the operation must be
//! short, must only touch the views it is given, and must not call the store.

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{
    ConflictableTransactionError, TransactionError, Transactional, TransactionalTree,
};
use std::panic::{self, AssertUnwindSafe};

use crate::core::attempt::Attempt;
use crate::core::options::CallOptions;
use crate::core::outcome::{Outcome, RecordInfo};
use crate::core::policy::ErrorPolicy;
use crate::core::replay::decode_error;
use crate::core::rules::{self, AsLeader, Refusal};
use crate::core::settle::{self, Reply};
use crate::driver::execute::{lead, refused_durably, replayed, Lead};
use crate::driver::state::StoreState;
use crate::driver::waiting::Waiting;
use crate::engine::keys::expiry_key;
use crate::engine::sled::{sled_error, SledEngine};
use crate::engine::Engine;
use crate::error::{Error, ExecuteError};
use crate::format::codec::{self, Codec};
use crate::format::record::{self, ClaimToken, Header, OutcomeKind, RecordState};
use crate::format::unstorable;
use crate::key::{KeyHash, KeyName};
use crate::stats::Counters;

/// What the operation of [`Store::execute_once_in_tx`](crate::Store::execute_once_in_tx)
/// returns: its value, or `ConflictableTransactionError::Abort(e)` (see
/// `sled::transaction::abort`) to abort with its error `e`. Errors of the transactional views
/// convert with `?`.
pub type TxResult<T, E> = sled::transaction::ConflictableTransactionResult<T, E>;

/// Why a transaction did not commit.
enum Abort<E> {
    Operation(E),
    Refused(Refusal),
    Store(Error),
}

/// What a committed transaction did.
enum Committed<T> {
    Ran {
        value: T,
        header: Header,
        payload_len: usize,
        takeover: bool,
    },
    Replay(Vec<u8>),
}

fn abort<E>(e: Error) -> ConflictableTransactionError<Abort<E>> {
    ConflictableTransactionError::Abort(Abort::Store(e))
}

/// Runs `f` over `trees` in one transaction with `key`'s record, or replays its outcome.
pub(crate) fn execute_in_tx<T, E, P, F>(
    state: &StoreState<SledEngine>,
    key: &[u8],
    options: &CallOptions,
    policy: &P,
    trees: &[&sled::Tree],
    f: F,
) -> Result<Outcome<T>, ExecuteError<E>>
where
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
    F: Fn(&[TransactionalTree]) -> TxResult<T, E>,
{
    state.check_key(key)?;
    let mut waiting = Waiting::new(state, options);
    let leader = match lead(state, key, options, policy, &mut waiting)? {
        Lead::Done(reply) => return reply,
        Lead::Leader { leader, .. } => leader,
    };
    // One time for the whole call: the retirement outside the transaction, the decision in
    // it and a failure recorded after it must agree on what has expired.
    let now = state.clock.now_millis();
    retire_expired_life(state, key, now)?;

    let engine = &state.engine;
    let codec = state.settings.codec(options);
    let ttl_ms = state.settings.ttl_ms(options);
    // sled has one process: this open's epoch is above every stored token.
    let claim = state.next_claim_token(None)?;
    let limit = state.settings.max_result_bytes;
    let orphan_policy = state.settings.orphan_policy(options);
    let mut all: Vec<&sled::Tree> = vec![&engine.records, &engine.expiry];
    all.extend_from_slice(trees);

    let ran = panic::catch_unwind(AssertUnwindSafe(|| {
        all.as_slice().transaction(|views| {
            let (records, expiry, user) = (&views[0], &views[1], &views[2..]);
            let current = records.get(key)?;
            let seen = match current.as_deref() {
                Some(bytes) => Some(
                    record::decode(bytes)
                        .map_err(|e| abort(decode_error(key, e)))?
                        .header,
                ),
                None => None,
            };
            // This call leads the key, so no call of this process holds a Pending record.
            let plan = match rules::as_leader(seen.as_ref(), now, options, orphan_policy, false) {
                AsLeader::Replay => {
                    let bytes = current.as_deref().unwrap_or_default();
                    return Ok(Committed::Replay(bytes.to_vec()));
                }
                AsLeader::Refuse(refusal) => {
                    return Err(ConflictableTransactionError::Abort(Abort::Refused(refusal)))
                }
                AsLeader::WaitForHolder => {
                    return Err(abort(Error::InProgress {
                        key: KeyName::new(key),
                        waited: std::time::Duration::ZERO,
                    }))
                }
                // An expired life left to retire here is unreachable anyway: a new life's
                // name is new, so its steps cannot be confused with this one's.
                AsLeader::Claim(plan) => plan,
            };
            let value = f(user).map_err(|e| match e {
                ConflictableTransactionError::Abort(e) => {
                    ConflictableTransactionError::Abort(Abort::Operation(e))
                }
                ConflictableTransactionError::Storage(e) => {
                    ConflictableTransactionError::Storage(e)
                }
                // Conflicts go back to the engine, which runs the transaction again.
                _ => ConflictableTransactionError::Conflict,
            })?;
            let encoded = match codec::encode(&value, codec, limit) {
                Ok(e) => e,
                // Aborting discards the operation's writes: as if it never ran.
                Err(failure) => return Err(abort(unstorable::record(key, failure, limit).2)),
            };
            let payload = encoded.bytes;
            let header = Header {
                codec: encoded.codec,
                shape: Some(encoded.shape),
                ..plan.attempt.header(
                    RecordState::Completed,
                    OutcomeKind::Stored,
                    now,
                    ttl_ms,
                    claim,
                )
            };
            expiry.insert(expiry_key(header.expires_ms, key), &[][..])?;
            records.insert(key, record::encode(&header, &payload))?;
            Ok(Committed::Ran {
                value,
                header,
                payload_len: payload.len(),
                takeover: plan.takeover,
            })
        })
    }));

    let result = match ran {
        Err(panic) => {
            // The transaction did not commit; record the attempt as retryable, then unwind.
            let failed = Failed::retryable(codec);
            if let Err(e) = record_failure(state, key, options, now, ttl_ms, claim, &failed) {
                tracing::error!(key = %KeyHash(key), error = %e, "could not record a panicked run");
            }
            drop(leader);
            panic::resume_unwind(panic);
        }
        Ok(result) => result,
    };
    let reply = match result {
        Ok(Committed::Ran {
            value,
            header,
            payload_len,
            takeover,
        }) => {
            Counters::bump(&state.counters.executions);
            if takeover {
                Counters::bump(&state.counters.orphans_recovered);
            }
            state.wait_durable()?;
            Ok(Outcome::new(
                value,
                false,
                RecordInfo::new(&header, payload_len),
            ))
        }
        Ok(Committed::Replay(bytes)) => {
            let rec = record::decode(&bytes).map_err(|e| decode_error(key, e))?;
            replayed(state, key, &rec, policy)
        }
        Err(TransactionError::Abort(Abort::Operation(error))) => {
            Counters::bump(&state.counters.executions);
            // The same rules as a plain call's error (permanent, retryable, unstorable); the
            // predicate is user code, and its panic is a retryable failure.
            let settled = panic::catch_unwind(AssertUnwindSafe(|| {
                settle::settle::<T, E, P>(key, Ok(Err(error)), None, policy, codec, limit)
            }));
            match settled {
                Err(panic) => {
                    let failed = Failed::retryable(codec);
                    if let Err(e) = record_failure(state, key, options, now, ttl_ms, claim, &failed)
                    {
                        tracing::error!(key = %KeyHash(key), error = %e, "could not record a panicked run");
                    }
                    drop(leader);
                    panic::resume_unwind(panic);
                }
                Ok(settled) => {
                    let failed = Failed {
                        state: settled.state,
                        outcome: settled.outcome,
                        payload: settled.payload,
                        codec: settled.codec,
                        shape: settled.shape,
                    };
                    record_failure(state, key, options, now, ttl_ms, claim, &failed)?;
                    match settled.reply {
                        Reply::Error(e) => Err(e),
                        // Invariant: an operation's error settles into an error reply.
                        Reply::Value(_) | Reply::Panic(_) => Err(Error::CorruptRecord {
                            key: KeyName::new(key),
                            reason: "an error settled into a value",
                        }
                        .into()),
                    }
                }
            }
        }
        Err(TransactionError::Abort(Abort::Refused(refusal))) => {
            Err(refused_durably(state, key, refusal).into())
        }
        Err(TransactionError::Abort(Abort::Store(e))) => Err(e.into()),
        Err(TransactionError::Storage(e)) => Err(sled_error(e).into()),
    };
    drop(leader);
    reply
}

/// Ends an expired life that has steps (record and steps together), so the transaction
/// starts a new life on an absent key. The caller leads the key.
fn retire_expired_life(state: &StoreState<SledEngine>, key: &[u8], now: u64) -> Result<(), Error> {
    let Some(bytes) = state.engine.get(key)? else {
        return Ok(());
    };
    let rec = record::decode(&bytes).map_err(|e| decode_error(key, e))?;
    if rec.header.has_steps && rec.header.is_expired(now) {
        // Unchanged or not, the transaction reads the record afresh.
        state
            .engine
            .remove_record(key, &bytes, Some(rec.header.life))?;
    }
    Ok(())
}

/// A failed attempt's record, as `core::settle` decided it.
struct Failed {
    state: RecordState,
    outcome: OutcomeKind,
    payload: Vec<u8>,
    codec: Codec,
    shape: Option<u64>,
}

impl Failed {
    fn retryable(codec: Codec) -> Self {
        Failed {
            state: RecordState::FailedRetryable,
            outcome: OutcomeKind::None,
            payload: Vec::new(),
            codec,
            shape: None,
        }
    }
}

/// Records a failed attempt over whatever the record is now. The caller leads the key, so
/// nothing else writes it meanwhile.
fn record_failure(
    state: &StoreState<SledEngine>,
    key: &[u8],
    options: &CallOptions,
    now: u64,
    ttl_ms: u64,
    claim: ClaimToken,
    failed: &Failed,
) -> Result<(), Error> {
    let stored = state.engine.get(key)?;
    let previous = match stored.as_deref() {
        Some(bytes) => Some(
            record::decode(bytes)
                .map_err(|e| decode_error(key, e))?
                .header,
        ),
        None => None,
    };
    let live = previous.filter(|h| !h.is_expired(now));
    let attempt = Attempt::after(live.as_ref(), now, options);
    let header = Header {
        codec: failed.codec,
        shape: failed.shape,
        ..attempt.header(failed.state, failed.outcome, now, ttl_ms, claim)
    };
    write_failure(state, key, stored.as_deref(), &header, &failed.payload)
}

/// Writes a failure record over `expected`, durably.
fn write_failure(
    state: &StoreState<SledEngine>,
    key: &[u8],
    expected: Option<&[u8]>,
    header: &Header,
    payload: &[u8],
) -> Result<(), Error> {
    state.engine.index_expiry(header.expires_ms, key)?;
    if !state
        .engine
        .claim(key, expected, record::encode(header, payload))?
    {
        return Err(Error::OutcomeNotRecorded {
            key: KeyName::new(key),
        });
    }
    state.wait_durable()
}
