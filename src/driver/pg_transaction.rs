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
use crate::driver::execute::{lead, refused, replayed, Lead};
use crate::driver::state::StoreState;
use crate::driver::waiting::Waiting;
use crate::engine::postgres::{PgEngine, PgTx};
use crate::error::ExecuteError;
use crate::format::record::{self, Header, RecordState};
use crate::stats::Counters;

const SAVEPOINT: &str = "SAVEPOINT idemstore_operation";
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
        let (current, lease_runs) = match tx.lock_record(key)? {
            Some((bytes, lease_runs)) => (Some(bytes), lease_runs),
            None => (None, false),
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
            AsLeader::Refuse(refusal) => return Err(refused(state, key, refusal).into()),
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
        let claim = state.next_claim_token_from(header.map(|h| h.claim), || tx.fresh_epoch())?;
        tx.batch(SAVEPOINT)?;
        Counters::bump(&state.counters.executions);
        if plan.takeover {
            Counters::bump(&state.counters.orphans_recovered);
        }
        let ran = panic::catch_unwind(AssertUnwindSafe(|| f(&mut tx.user())));
        if !matches!(ran, Ok(Ok(_))) {
            // An error or a panic: none of the operation's writes apply.
            tx.batch(ROLLBACK_TO_SAVEPOINT)?;
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
        if !tx.put(key, current.as_deref(), &bytes)? {
            // Another replica inserted the key first: roll back and look again.
            drop((tx, leader));
            if let Reply::Panic(panic) = settled.reply {
                panic::resume_unwind(panic);
            }
            continue;
        }
        tx.commit()?;
        drop(leader);
        return match settled.reply {
            Reply::Value(value) => Ok(Outcome::new(
                value,
                false,
                RecordInfo::new(&header, settled.payload.len()),
            )),
            Reply::Error(e) => Err(e),
            Reply::Panic(panic) => panic::resume_unwind(panic),
        };
    }
}
