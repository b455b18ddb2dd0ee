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

use crate::call::{CallOptions, ErrorPolicy};
use crate::clock::millis;
use crate::codec;
use crate::machine::{
    check_fingerprint, decode_error, live, replay, take_over_orphan, take_turn, Attempt, Turn,
    Waiting,
};
use crate::record::{self, ClaimToken, Header, OutcomeKind, RecordState};
use crate::stats::Counters;
use crate::storage::{self, SledStorage, Storage};
use crate::store::Shared;
use crate::unstorable;
use crate::{Error, ExecuteError, KeyName, Outcome, RecordInfo, TxResult};

/// Why a transaction did not commit.
enum Abort<E> {
    Operation(E),
    Store(Error),
}

/// What a committed transaction did.
enum Committed<T> {
    Ran {
        value: T,
        header: Header,
        payload_len: usize,
    },
    Replay(Vec<u8>),
}

fn abort<E>(e: Error) -> ConflictableTransactionError<Abort<E>> {
    ConflictableTransactionError::Abort(Abort::Store(e))
}

/// Runs `f` over `trees` in one transaction with `key`'s record, or replays its outcome.
pub(crate) fn execute_in_tx<T, E, P, F>(
    shared: &Shared<SledStorage>,
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
    shared.check_key(key)?;
    let mut waiting = Waiting::new(shared, options);
    let leader = match take_turn(shared, key, options, policy, &mut waiting)? {
        Turn::Done(reply) => return reply,
        Turn::Lead { leader, .. } => leader,
    };
    retire_expired_life(shared, key)?;

    let storage = &shared.storage;
    let codec = options.codec.unwrap_or(shared.settings.codec);
    let ttl_ms = millis(options.ttl.unwrap_or(shared.settings.default_ttl));
    let claim = shared.next_claim_token();
    let limit = shared.settings.max_result_bytes;
    let mut all: Vec<&sled::Tree> = vec![&storage.records, &storage.expiry];
    all.extend_from_slice(trees);

    let ran = panic::catch_unwind(AssertUnwindSafe(|| {
        all.as_slice().transaction(|views| {
            let (records, expiry, user) = (&views[0], &views[1], &views[2..]);
            let now = shared.clock.now_millis();
            let current = records.get(key)?;
            let rec = match current.as_deref() {
                Some(bytes) => {
                    Some(record::decode(bytes).map_err(|e| abort(decode_error(key, e)))?)
                }
                None => None,
            };
            let live = rec.map(|r| r.header).filter(|h| !h.is_expired(now));
            if let Some(h) = &live {
                check_fingerprint(shared, key, h, options).map_err(abort)?;
                match h.state {
                    RecordState::Completed | RecordState::FailedPermanent => {
                        let bytes = current.as_deref().unwrap_or_default();
                        return Ok(Committed::Replay(bytes.to_vec()));
                    }
                    RecordState::Pending => {
                        take_over_orphan(shared, key, h, options).map_err(abort)?
                    }
                    RecordState::FailedRetryable => {}
                }
            }
            let attempt = Attempt::after(live.as_ref(), now, options);
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
                ..attempt.header(
                    RecordState::Completed,
                    OutcomeKind::Stored,
                    now,
                    ttl_ms,
                    claim,
                )
            };
            expiry.insert(storage::expiry_key(header.expires_ms, key), &[][..])?;
            records.insert(key, record::encode(&header, &payload))?;
            Ok(Committed::Ran {
                value,
                header,
                payload_len: payload.len(),
            })
        })
    }));

    let result = match ran {
        Err(panic) => {
            // The transaction did not commit; record the attempt as retryable, then unwind.
            if let Err(e) = record_failure(shared, key, options, ttl_ms, claim, None::<(&E, &P)>) {
                tracing::error!(key = %crate::key::KeyHash(key), error = %e, "could not record a panicked run");
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
        }) => {
            Counters::bump(&shared.counters.executions);
            storage.barrier()?;
            Ok(Outcome::new(
                value,
                false,
                RecordInfo::new(&header, payload_len),
            ))
        }
        Ok(Committed::Replay(bytes)) => {
            let rec = record::decode(&bytes).map_err(|e| decode_error(key, e))?;
            replay(shared, key, &rec, policy)
        }
        Err(TransactionError::Abort(Abort::Operation(error))) => {
            Counters::bump(&shared.counters.executions);
            record_failure(shared, key, options, ttl_ms, claim, Some((&error, policy)))?;
            Err(ExecuteError::Operation {
                error,
                replayed: false,
            })
        }
        Err(TransactionError::Abort(Abort::Store(e))) => Err(e.into()),
        Err(TransactionError::Storage(e)) => Err(Error::Storage(e).into()),
    };
    drop(leader);
    reply
}

/// Ends an expired life that has steps (record and steps together), so the transaction
/// starts a new life on an absent key. The caller leads the key.
fn retire_expired_life(shared: &Shared<SledStorage>, key: &[u8]) -> Result<(), Error> {
    let Some(bytes) = shared.storage.get(key)? else {
        return Ok(());
    };
    let rec = record::decode(&bytes).map_err(|e| decode_error(key, e))?;
    if rec.header.has_steps && rec.header.is_expired(shared.clock.now_millis()) {
        // Unchanged or not, the transaction reads the record afresh.
        shared
            .storage
            .remove_record(key, &bytes, Some(rec.header.life))?;
    }
    Ok(())
}

/// Records a failed attempt (permanent if `error` is one, else retryable) over whatever the
/// record is now. The caller leads the key, so nothing else writes it meanwhile.
fn record_failure<E, P: ErrorPolicy<E>>(
    shared: &Shared<SledStorage>,
    key: &[u8],
    options: &CallOptions,
    ttl_ms: u64,
    claim: ClaimToken,
    error: Option<(&E, &P)>,
) -> Result<(), Error> {
    let now = shared.clock.now_millis();
    let stored = shared.storage.get(key)?;
    let previous = live(key, stored.as_ref().map(AsRef::as_ref), now)?;
    let attempt = Attempt::after(previous.as_ref().map(|r| &r.header), now, options);
    let codec = options.codec.unwrap_or(shared.settings.codec);
    let retryable = (RecordState::FailedRetryable, OutcomeKind::None, None);
    let (state, outcome, encoded) = match error {
        Some((e, policy)) if policy.is_permanent(e) => {
            match policy.encode(e, codec, shared.settings.max_result_bytes) {
                Ok(enc) => (RecordState::FailedPermanent, OutcomeKind::Stored, Some(enc)),
                // An unstorable permanent error stays retryable: nothing was applied.
                Err(_) => retryable,
            }
        }
        _ => retryable,
    };
    let header = Header {
        codec: encoded.as_ref().map_or(codec, |e| e.codec),
        shape: encoded.as_ref().map(|e| e.shape),
        ..attempt.header(state, outcome, now, ttl_ms, claim)
    };
    let payload = encoded.map(|e| e.bytes).unwrap_or_default();
    shared.storage.index_expiry(header.expires_ms, key)?;
    let expected = stored.as_ref().map(AsRef::as_ref);
    if !shared
        .storage
        .compare_and_swap(key, expected, Some(record::encode(&header, &payload)))?
    {
        return Err(Error::OutcomeNotRecorded {
            key: KeyName::new(key),
        });
    }
    shared.storage.barrier()
}
