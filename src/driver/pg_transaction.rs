//! Exactly-once local effects on PostgreSQL: the operation's writes to the user's own tables
//! and its record commit in one PostgreSQL transaction.
//!
//! Invariants:
//! - no Pending record is ever written: the record's row is locked, the operation runs in the
//!   same transaction, and its outcome replaces the record at the commit, so after any crash
//!   (of a replica or of the server) either the operation's writes and its outcome are both
//!   committed or neither is; the operation's effects apply exactly once;
//! - the operation may run more than once (a concurrent first insert of the key by another
//!   replica makes the final write fail; the transaction rolls back and the call looks again),
//!   but only the run that commits applies anything, so it must write only through its
//!   transaction;
//! - an error from the operation rolls its writes back (to a savepoint) and records the error
//!   (permanent or retryable, by the call's policy) in the same transaction; a panic does the
//!   same with a retryable record, then unwinds;
//! - a Pending record of a plain call (another replica's live lease) is waited for, as in the
//!   plain driver; calls of this process are serialised by the registry.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::panic::{self, AssertUnwindSafe};

use crate::core::options::CallOptions;
use crate::core::outcome::{Outcome, RecordInfo};
use crate::core::policy::ErrorPolicy;
use crate::core::replay::decode_error;
use crate::core::rules::{self, AsLeader};
use crate::core::settle::{self, Reply};
use crate::driver::execute::{lead, refused_durably, replayed, Lead};
use crate::driver::state::StoreState;
use crate::driver::waiting::Waiting;
use crate::engine::postgres::{PgEngine, PgTx};
use crate::error::{Error, ExecuteError};
use crate::format::record::{self, Header, RecordState, LEGACY_LIFE};
use crate::key::KeyHash;
use crate::stats::Counters;

/// The operation's statements wait for locks as long as the I/O timeout allows, not the
/// store's short lock wait.
const SAVEPOINT: &str = "SET LOCAL lock_timeout = 0; SAVEPOINT idemstore_operation";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT idemstore_operation";

/// Runs `f` in one transaction with `key`'s record, or replays its outcome.
pub(crate) fn execute_in_pg_tx<T, E, P, F>(
    state: &StoreState<PgEngine>,
    key: &[u8],
    options: &CallOptions,
    policy: &P,
    mut f: F,
) -> Result<Outcome<T>, ExecuteError<E>>
where
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
    F: FnMut(&mut PgTx<'_>) -> Result<T, E>,
{
    state.check_key(key)?;
    let mut waiting = Waiting::new(state, options);
    let codec = state.settings.codec(options);
    let ttl_ms = state.settings.ttl_ms(options);
    let limit = state.settings.max_result_bytes;
    let orphan_policy = state.settings.orphan_policy(options);
    loop {
        let leader = match lead(state, key, options, policy, &mut waiting)? {
            Lead::Done(reply) => return reply,
            Lead::Leader { leader, .. } => leader,
        };
        let now = state.clock.now_millis();
        let tx = state.engine.begin()?;
        // Everything until the commit goes through the transaction's connection: with a small
        // pool, asking for another one could wait on this very call.
        let (current, lease_runs) = match tx.lock_record(key) {
            Ok(Some((bytes, lease_runs))) => (Some(bytes), lease_runs),
            Ok(None) => (None, false),
            // Another transaction holds the record: the key is busy.
            Err(e) if e.is_busy() => {
                drop((tx, leader));
                waiting.wait_for_holder(key, LEGACY_LIFE)?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let seen = match current.as_deref() {
            Some(bytes) => Some(record::decode(bytes).map_err(|e| decode_error(key, e))?),
            None => None,
        };
        let header = seen.map(|r| r.header);
        let holder_live = header.is_some_and(|h| h.state == RecordState::Pending && lease_runs);
        let plan = match rules::as_leader(header.as_ref(), now, options, orphan_policy, holder_live)
        {
            AsLeader::Replay => {
                // Invariant: Replay is only decided for a record that was read.
                let Some(rec) = seen else { continue };
                let reply = replayed(state, key, &rec, policy);
                drop(tx);
                return reply;
            }
            AsLeader::Refuse(refusal) => return Err(refused_durably(state, key, refusal).into()),
            AsLeader::WaitForHolder => {
                drop((tx, leader));
                // Invariant: WaitForHolder is only decided for a Pending record that was read.
                if let Some(h) = header {
                    waiting.wait_for_holder(key, h.claim)?;
                }
                continue;
            }
            AsLeader::Claim(plan) => plan,
        };
        if let Some(life) = plan.retire {
            tx.delete_steps(key, life)?;
        }
        let claim =
            state.next_claim_token_from(header.map(|h| h.claim), |floor| tx.fresh_epoch(floor))?;
        tx.batch(SAVEPOINT)?;
        Counters::bump(&state.counters.executions);
        if plan.takeover {
            Counters::bump(&state.counters.orphans_recovered);
        }
        let ran = panic::catch_unwind(AssertUnwindSafe(|| f(&mut tx.user())));
        // A store failure from here on ends the call; after a panic, the panic goes on (the
        // transaction rolls back as `tx` drops) and the failure is only logged.
        let fail = |e: Error| -> ExecuteError<E> {
            tracing::error!(key = %KeyHash(key), error = %e, "transactional call failed");
            e.into()
        };
        let outcome = (|| {
            if !matches!(ran, Ok(Ok(_))) {
                // An error or a panic: none of the operation's writes apply.
                tx.batch(ROLLBACK_TO_SAVEPOINT)?;
            }
            Ok::<_, Error>(())
        })();
        if let Err(e) = outcome {
            if let Err(panic) = ran {
                drop((tx, leader));
                tracing::error!(key = %KeyHash(key), error = %e, "a panicked transactional run could not be rolled back to its savepoint");
                panic::resume_unwind(panic);
            }
            return Err(fail(e));
        }
        // The policy's predicate and the value's Serialize are user code: a panic there
        // rolls the whole transaction back (dropping `tx`) and unwinds.
        let settled = settle::settle(key, ran, None, policy, codec, limit);
        let header = Header {
            codec: settled.codec,
            shape: settled.shape,
            ..plan
                .attempt
                .header(settled.state, settled.outcome, now, ttl_ms, claim)
        };
        let bytes = record::encode(&header, &settled.payload);
        let written = tx
            .put(key, current.as_deref(), &bytes)
            .and_then(|put| match put {
                true => tx.commit().map(|()| true),
                false => Ok(false),
            });
        match (written, settled.reply) {
            (written, Reply::Panic(panic)) => {
                if let Err(e) = written {
                    tracing::error!(key = %KeyHash(key), error = %e, "could not record a panicked transactional run");
                }
                drop(leader);
                panic::resume_unwind(panic);
            }
            (Ok(true), reply) => {
                drop(leader);
                return match reply {
                    Reply::Value(value) => Ok(Outcome::new(
                        value,
                        false,
                        RecordInfo::new(&header, settled.payload.len()),
                    )),
                    Reply::Error(e) => Err(e),
                    // Invariant: matched above.
                    Reply::Panic(panic) => panic::resume_unwind(panic),
                };
            }
            // Another replica inserted the key first (or holds it): roll back and look again,
            // within the call's wait budget.
            (Ok(false), _) => {
                drop(leader);
                waiting.wait_for_holder(key, LEGACY_LIFE)?;
            }
            (Err(e), _) if e.is_busy() => {
                drop(leader);
                waiting.wait_for_holder(key, LEGACY_LIFE)?;
            }
            (Err(e), _) => return Err(fail(e)),
        }
    }
}
