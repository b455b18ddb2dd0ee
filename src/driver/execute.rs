//! The plain driver: one `execute_once` call as a loop around the rules in `core::rules`.
//!
//! Invariants:
//! - the closure runs only in a call that leads the key in the registry *and* whose claim
//!   (compare-and-swap to Pending) succeeded and, where a claim must be durable (under
//!   `OrphanPolicy::Report`, design §6), passed the durability barrier; after a claim the call
//!   always returns, so the closure runs at most once per call;
//! - from the claim until its outcome is written, a [`ClaimGuard`] owns the Pending record:
//!   if anything unwinds in between (the closure, a predicate, any user code the store
//!   calls), the guard records a retryable failure before the registry lets waiters in, so
//!   this process never mistakes its own claim for an orphan;
//! - every write of the holder (steps, outcome, release) is fenced by the engine against the
//!   exact Pending record of this claim, so a record removed or taken over meanwhile is never
//!   overwritten;
//! - a recorded outcome is returned only once it is durable: the leader releases the registry
//!   after its barrier, and a reader that finds a terminal record while the key's leader is
//!   still running waits for that leader before replaying;
//! - bad bytes yield an error naming the key; they never cause a run.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;

use crate::core::attempt::outcome_header;
use crate::core::options::CallOptions;
use crate::core::outcome::{Outcome, RecordInfo};
use crate::core::policy::ErrorPolicy;
use crate::core::replay::{decode_error, replay};
use crate::core::rules::{self, AsLeader, ClaimPlan, FirstLook, Refusal};
use crate::core::settle::{self, Reply};
use crate::driver::context::{Context, RunClaim};
use crate::driver::registry::{Entry, Leader, RunningCall};
use crate::driver::state::StoreState;
use crate::driver::waiting::Waiting;
use crate::engine::{ClaimOrGet, Engine, Held};
use crate::error::{Error, ExecuteError};
use crate::format::codec::Codec;
use crate::format::record::{self, ClaimToken, Header, OutcomeKind, RecordState, LEGACY_LIFE};
use crate::key::{KeyHash, KeyName};
use crate::stats::Counters;

/// Runs `f` once for `key`, or replays its recorded outcome.
pub(crate) fn execute<S, T, E, P, F>(
    state: &StoreState<S>,
    key: &[u8],
    options: &CallOptions,
    policy: &P,
    f: F,
) -> Result<Outcome<T>, ExecuteError<E>>
where
    S: Engine,
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
    F: FnOnce(&mut Context<'_>) -> Result<T, E>,
{
    state.check_key(key)?;
    if let Some(answer) = cached_replay(state, key, options, policy) {
        return answer;
    }
    let mut waiting = Waiting::new(state, options);
    loop {
        let first = match state.engine.claims_first() {
            true => claim_first(state, key, options, policy, &mut waiting)?,
            false => First::Look(lead(state, key, options, policy, &mut waiting)?),
        };
        let (leader, first_read, seen) = match first {
            First::Look(Lead::Done(reply)) => return reply,
            First::Claimed { leader, pending } => {
                return run_claimed(state, key, options, policy, leader, pending, None, f);
            }
            First::Look(Lead::Leader {
                leader,
                stored,
                seen,
            }) => (leader, stored, seen),
        };
        // As leader nothing else in this process claims the key. A Pending record seen before
        // leading may have finished since: read again. Any other state is re-checked by the
        // claim's compare-and-swap.
        let fresh_read = match seen {
            Some(h) if h.state == RecordState::Pending => Some(state.engine.get(key)?),
            _ => None,
        };
        let mut stored = match &fresh_read {
            Some(fresh) => fresh.as_ref().map(AsRef::as_ref),
            None => first_read.as_ref().map(AsRef::as_ref),
        };
        let now = state.clock.now_millis();
        let current = match stored {
            Some(bytes) => Some(record::decode(bytes).map_err(|e| decode_error(key, e))?),
            None => None,
        };
        let header = current.map(|r| r.header);
        let holder_live = header.is_some_and(|h| {
            h.state == RecordState::Pending && state.engine.holder_live(key, h.claim, false)
        });
        let orphan_policy = state.settings.orphan_policy(options);
        let plan = match rules::as_leader(header.as_ref(), now, options, orphan_policy, holder_live)
        {
            AsLeader::Replay => {
                // Invariant: Replay is only decided for a record that was read.
                let Some(rec) = current else { continue };
                return replayed(state, key, &rec, policy);
            }
            AsLeader::Refuse(refusal) => return Err(refused_durably(state, key, refusal).into()),
            AsLeader::WaitForHolder => {
                drop(leader);
                // Invariant: WaitForHolder is only decided for a Pending record that was read.
                if let Some(h) = header {
                    waiting.wait_for_holder(key, h.claim)?;
                }
                continue;
            }
            AsLeader::Claim(plan) => plan,
        };
        note_takeover(state, key, &plan);
        if let (Some(life), Some(bytes)) = (plan.retire, stored) {
            // An expired life with steps ends here: its record and steps go together.
            if !state.engine.remove_record(key, bytes, Some(life))? {
                continue;
            }
            stored = None;
        }
        let ttl_ms = state.settings.ttl_ms(options);
        let pending_header = plan.attempt.header(
            RecordState::Pending,
            OutcomeKind::None,
            now,
            ttl_ms,
            state.next_claim_token(header.map(|h| h.claim))?,
        );
        let pending = record::encode(&pending_header, &[]);
        // The index entry goes first, so a durable record always has one.
        state.engine.index_expiry(pending_header.expires_ms, key)?;
        match state.engine.claim(key, stored, pending.clone()) {
            Ok(true) => {}
            // Changed between our read and the claim (removed, or swept): look again.
            Ok(false) => {
                drop(leader);
                continue;
            }
            // A transaction elsewhere holds the record (a shared engine's transactional call):
            // the key is busy, as with a live holder.
            Err(e) if e.is_busy() => {
                drop(leader);
                waiting.wait_for_holder(key, header.map_or(LEGACY_LIFE, |h| h.claim))?;
                continue;
            }
            Err(e) => {
                // Whether the claim was written is unknown: if it was, a shared engine ends
                // its lease now rather than leave the key held.
                interrupted(state, key, &pending, pending_header.claim);
                return Err(e.into());
            }
        }
        return run_claimed(
            state,
            key,
            options,
            policy,
            leader,
            (pending_header, pending),
            stored,
            f,
        );
    }
}

/// Runs `f` under the claim this call just wrote (`pending`: its Pending header and bytes,
/// which replaced `stored`), records the outcome and returns it.
#[allow(clippy::too_many_arguments)]
fn run_claimed<S, T, E, P, F>(
    state: &StoreState<S>,
    key: &[u8],
    options: &CallOptions,
    policy: &P,
    leader: Leader<'_>,
    pending: (Header, Vec<u8>),
    stored: Option<&[u8]>,
    f: F,
) -> Result<Outcome<T>, ExecuteError<E>>
where
    S: Engine,
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
    F: FnOnce(&mut Context<'_>) -> Result<T, E>,
{
    let (pending_header, pending) = pending;
    let attempts = pending_header.attempts;
    let ttl_ms = state.settings.ttl_ms(options);
    let held = Held {
        key,
        record: &pending,
        token: pending_header.claim,
        life: pending_header.life,
    };
    if state.settings.claim_must_be_durable(options) {
        if let Err(e) = state.wait_durable() {
            // The claim may not be durable: do not run. Put the record back as it was.
            let _ = state.engine.finish(&held, stored.map(<[u8]>::to_vec));
            return Err(e.into());
        }
    }
    leader.claimed();
    let guard = ClaimGuard {
        state,
        held,
        header: &pending_header,
        ttl_ms,
        forget: options.forget_retryable,
        armed: true,
    };

    Counters::bump(&state.counters.executions);
    let span = tracing::debug_span!("idemstore.execute", key = %KeyHash(key), attempts);
    let _entered = span.enter();
    tracing::debug!("running operation");
    // Invariant: this point is reached once per call (every path below returns), so the
    // closure is called at most once.
    let codec = state.settings.codec(options);
    let mut context = Context::new(
        state,
        RunClaim {
            held,
            attempt: attempts,
            codec,
            max_result_bytes: state.settings.max_result_bytes,
        },
    );
    let ran = panic::catch_unwind(AssertUnwindSafe(|| f(&mut context)));
    let failure = context.take_failure();
    let limit = state.settings.max_result_bytes;
    let result = record_outcome(
        guard,
        settle::settle(key, ran, failure, policy, codec, limit),
    );
    drop(leader);
    match result {
        Finished::Returned(r) => r,
        Finished::Panicked(payload) => panic::resume_unwind(payload),
    }
}

/// How a call goes on after its first look at the key's record.
pub(crate) enum Lead<'r, B, T, E> {
    /// Answered from a recorded outcome: return this.
    Done(Result<Outcome<T>, ExecuteError<E>>),
    /// This call now leads the key. `stored` is what it read before leading, and `seen` that
    /// record's header (None: absent); neither is a live recorded outcome.
    Leader {
        leader: Leader<'r>,
        stored: Option<B>,
        seen: Option<Header>,
    },
}

/// The first look of a call: an ordinary look, or a claim made first.
pub(crate) enum First<'r, B, T, E> {
    Look(Lead<'r, B, T, E>),
    /// This call leads the key and has claimed it (it had no record): run under `pending`.
    Claimed {
        leader: Leader<'r>,
        pending: (Header, Vec<u8>),
    },
}

/// The first look of an engine that claims first ([`Engine::claims_first`]): lead the key in
/// this process, then, in one engine operation, claim it if it has no record or read the
/// record it has (which the rules then take as any read record: replay, refuse, wait or
/// claim over it).
pub(crate) fn claim_first<'r, S, T, E, P>(
    state: &'r StoreState<S>,
    key: &[u8],
    options: &CallOptions,
    policy: &P,
    waiting: &mut Waiting<'_, S>,
) -> Result<First<'r, S::Bytes, T, E>, Error>
where
    S: Engine,
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    loop {
        let leader = match state.registry.enter(key) {
            Entry::Leader(leader) => leader,
            // A call of this process runs the key: the ordinary look decides (a mismatch is
            // refused at once, an outcome replayed, the call waited for).
            Entry::Follower(_) => {
                return Ok(First::Look(lead(state, key, options, policy, waiting)?))
            }
        };
        let Some((header, pending)) = absent_claim(state, options)? else {
            return Ok(First::Look(Lead::Leader {
                leader,
                stored: None,
                seen: None,
            }));
        };
        state.engine.index_expiry(header.expires_ms, key)?;
        match state.engine.claim_or_get(key, pending.clone()) {
            Ok(Some(ClaimOrGet::Claimed)) => {
                return Ok(First::Claimed {
                    leader,
                    pending: (header, pending),
                })
            }
            Ok(Some(ClaimOrGet::Existing(bytes))) => {
                let seen = record::decode(bytes.as_ref())
                    .map_err(|e| decode_error(key, e))?
                    .header;
                return Ok(First::Look(Lead::Leader {
                    leader,
                    stored: Some(bytes),
                    seen: Some(seen),
                }));
            }
            // A record appeared meanwhile, not yet visible: look again.
            Ok(None) => drop(leader),
            Err(e) if e.is_busy() => {
                drop(leader);
                waiting.wait_for_holder(key, LEGACY_LIFE)?;
            }
            Err(e) => {
                interrupted(state, key, &pending, header.claim);
                return Err(e);
            }
        }
    }
}

/// Tells the engine that a claim whose answer was lost may be written: a shared engine ends
/// its lease at once.
fn interrupted<S: Engine>(state: &StoreState<S>, key: &[u8], pending: &[u8], token: ClaimToken) {
    state.engine.interrupted(&Held {
        key,
        record: pending,
        token,
        life: token,
    });
}

/// The Pending record (header and bytes) a claim of an absent key writes now, as the rules
/// plan it; `None` if they plan something else (they never do for an absent key).
pub(crate) fn absent_claim<S: Engine>(
    state: &StoreState<S>,
    options: &CallOptions,
) -> Result<Option<(Header, Vec<u8>)>, Error> {
    let now = state.clock.now_millis();
    let orphan_policy = state.settings.orphan_policy(options);
    let AsLeader::Claim(plan) = rules::as_leader(None, now, options, orphan_policy, false) else {
        return Ok(None);
    };
    let header = plan.attempt.header(
        RecordState::Pending,
        OutcomeKind::None,
        now,
        state.settings.ttl_ms(options),
        state.next_claim_token(None)?,
    );
    let pending = record::encode(&header, &[]);
    Ok(Some((header, pending)))
}

/// Replays a live recorded outcome (once durable), or waits for the key's running call, or
/// becomes the key's leader. The replay path takes no lock when no call is running.
pub(crate) fn lead<'r, S, T, E, P>(
    state: &'r StoreState<S>,
    key: &[u8],
    options: &CallOptions,
    policy: &P,
    waiting: &mut Waiting<'_, S>,
) -> Result<Lead<'r, S::Bytes, T, E>, Error>
where
    S: Engine,
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    let mut looked_after_claim = false;
    loop {
        let stored = state.engine.get(key)?;
        let (first, look) = look(state, key, options, stored.as_ref().map(AsRef::as_ref))?;
        let header = first.as_ref().map(|r| r.header);
        match (look, first) {
            (Look::Replay, Some(rec)) => return Ok(Lead::Done(replayed(state, key, &rec, policy))),
            (Look::WaitForWriter(flight), _) => {
                // Its writer may still be waiting for the barrier: replay once durable.
                waiting.wait(key, &flight, false)?;
                continue;
            }
            (Look::Refuse(refusal), _) => return Err(refused(state, key, refusal)),
            _ => {}
        }
        match state.registry.enter(key) {
            Entry::Leader(leader) => {
                return Ok(Lead::Leader {
                    leader,
                    stored,
                    seen: header,
                })
            }
            Entry::Follower(flight) => {
                let now = state.clock.now_millis();
                match follower_wait(
                    &flight,
                    header.as_ref(),
                    now,
                    options,
                    &mut looked_after_claim,
                ) {
                    FollowerWait::LookAgain => {}
                    FollowerWait::Until { claimed } => waiting.wait(key, &flight, claimed)?,
                }
            }
        }
    }
}

/// How a call that follows a running call of this process waits.
pub(crate) enum FollowerWait {
    /// Read the key again now.
    LookAgain,
    /// Wait for the leader to finish, or (`claimed`) only until its claim is written.
    Until { claimed: bool },
}

/// How a follower of `flight` waits, having read `seen` (None: no record). A call with a
/// fingerprint whose read came before the leader's claim looks again once that claim is
/// written, once: the claim's fingerprint may refuse it at once (the rules decide, on the
/// record read then), instead of after the leader's whole run. Any other call waits for the
/// leader to finish.
pub(crate) fn follower_wait(
    flight: &RunningCall,
    seen: Option<&Header>,
    now_ms: u64,
    options: &CallOptions,
    looked_after_claim: &mut bool,
) -> FollowerWait {
    // An expired Pending record reads as absent: the leader's claim is a new one.
    let saw_a_claim =
        seen.is_some_and(|h| h.state == RecordState::Pending && !h.is_expired(now_ms));
    if options.fingerprint.is_none() || saw_a_claim || *looked_after_claim {
        return FollowerWait::Until { claimed: false };
    }
    if flight.claimed() {
        *looked_after_claim = true;
        return FollowerWait::LookAgain;
    }
    FollowerWait::Until { claimed: true }
}

/// What a first look at a key's stored bytes decides, before leading.
pub(crate) enum Look {
    /// A live recorded outcome, durable: replay it.
    Replay,
    /// A live recorded outcome whose writer in this process may not have made it durable yet:
    /// wait for that call, then look again.
    WaitForWriter(Arc<RunningCall>),
    /// The rules refuse the call.
    Refuse(Refusal),
    /// Nothing to replay: lead the key.
    Lead,
}

/// The rules' first look at `stored` (the key's bytes as just read), decoded. A live outcome
/// is waited for only on an engine where a write is seen before it is durable, and only while
/// a call of this process still runs the key.
pub(crate) fn look<'b, S: Engine>(
    state: &StoreState<S>,
    key: &[u8],
    options: &CallOptions,
    stored: Option<&'b [u8]>,
) -> Result<(Option<record::Record<'b>>, Look), Error> {
    let now = state.clock.now_millis();
    state.engine.note_first_look(stored.is_some());
    let first = match stored {
        Some(bytes) => Some(record::decode(bytes).map_err(|e| decode_error(key, e))?),
        None => None,
    };
    let header = first.as_ref().map(|r| r.header);
    let replays_wait = state.settings.immediate && state.engine.visible_before_durable();
    let live_outcome = header.is_some_and(|h| !h.is_expired(now) && rules::is_terminal(h.state));
    let writer = match live_outcome && replays_wait {
        true => state.registry.running(key),
        false => None,
    };
    let look = match rules::first_look(
        header.as_ref(),
        now,
        options,
        writer.is_some(),
        replays_wait,
    ) {
        FirstLook::Replay => Look::Replay,
        FirstLook::Refuse(refusal) => Look::Refuse(refusal),
        FirstLook::WaitForWriter => match writer {
            Some(flight) => Look::WaitForWriter(flight),
            // Invariant: WaitForWriter is only decided with a writer running.
            None => Look::Lead,
        },
        FirstLook::Lead => Look::Lead,
    };
    Ok((first, look))
}

/// One read of a key found no record. Carried into the full call, it stands for that call's
/// first read: the only decision an absent key leads to is a claim, a compare-and-swap
/// against "absent" that fails if a record appeared since. A record that was found is never
/// carried: a replay, a refusal or a wait decided on old bytes would check nothing.
#[cfg(feature = "tokio")]
pub(crate) struct ReadAbsent;

/// What one local read of a key settles before the full call.
#[cfg(feature = "tokio")]
pub(crate) enum QuickLook<R> {
    /// Settled: return this.
    Answered(R),
    /// Not settled; `Some` when the read found no record (see [`ReadAbsent`]).
    Unanswered(Option<ReadAbsent>),
}

/// A replay answered from one local read, for callers that would pay for a run's setup
/// before the full call: `answer` of the record when the key's record is a durable live
/// outcome, the refusal when the rules refuse; otherwise unanswered, saying whether the key was
/// absent. Only an engine that reads in place and reads before it claims is read here
/// (elsewhere a read is a round trip, which async code must not wait for synchronously, or one
/// the full call does not make).
#[cfg(feature = "tokio")]
pub(crate) fn try_replay<S, R, E>(
    state: &StoreState<S>,
    key: &[u8],
    options: &CallOptions,
    answer: impl FnOnce(&record::Record<'_>) -> Result<R, ExecuteError<E>>,
) -> QuickLook<Result<R, ExecuteError<E>>>
where
    S: Engine,
{
    if state.engine.claims_first() || !state.engine.reads_in_place() {
        return QuickLook::Unanswered(None);
    }
    let look_once = || {
        state.check_key(key)?;
        let stored = state.engine.get(key)?;
        let (first, look) = look(state, key, options, stored.as_ref().map(AsRef::as_ref))?;
        Ok(match (look, first) {
            (Look::Replay, Some(rec)) => QuickLook::Answered(
                note_replay(state, key)
                    .map_err(Into::into)
                    .and_then(|()| answer(&rec)),
            ),
            (Look::Refuse(refusal), _) => {
                QuickLook::Answered(Err(refused(state, key, refusal).into()))
            }
            (_, None) => QuickLook::Unanswered(Some(ReadAbsent)),
            (_, Some(_)) => QuickLook::Unanswered(None),
        })
    };
    look_once().unwrap_or_else(|e| QuickLook::Answered(Err(ExecuteError::Store(e))))
}

/// A first look answered from the engine's cache of recorded outcomes (an engine that keeps
/// one, see [`Engine::cached`]): the rules decide on the cached record as on one just read, with
/// no writer of this process running (a cached record was committed when it was read). `None`
/// when nothing is cached or the rules would not replay it (the entry is forgotten): the call
/// goes on as if there were no cache.
pub(crate) fn cached_replay<S, T, E, P>(
    state: &StoreState<S>,
    key: &[u8],
    options: &CallOptions,
    policy: &P,
) -> Option<Result<Outcome<T>, ExecuteError<E>>>
where
    S: Engine,
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    let bytes = state.engine.cached(key)?;
    let decided = record::decode(&bytes).ok().map(|rec| {
        let now = state.clock.now_millis();
        (
            rules::first_look(Some(&rec.header), now, options, false, false),
            rec,
        )
    });
    match decided {
        Some((FirstLook::Replay, rec)) => Some(replayed(state, key, &rec, policy)),
        Some((FirstLook::Refuse(refusal), _)) => Some(Err(refused(state, key, refusal).into())),
        _ => {
            state.engine.forget_cached(key);
            None
        }
    }
}

/// Counts and logs a claim that takes over an interrupted run.
pub(crate) fn note_takeover<S>(state: &StoreState<S>, key: &[u8], plan: &ClaimPlan) {
    if plan.takeover {
        Counters::bump(&state.counters.orphans_recovered);
        tracing::warn!(
            key = %KeyHash(key),
            attempts = plan.attempt.number - 1,
            "re-running an interrupted run"
        );
    }
}

/// A recorded outcome, replayed and counted.
pub(crate) fn replayed<S: Engine, T, E, P>(
    state: &StoreState<S>,
    key: &[u8],
    rec: &record::Record<'_>,
    policy: &P,
) -> Result<Outcome<T>, ExecuteError<E>>
where
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    note_replay(state, key)?;
    replay(key, rec, policy)
}

/// What every replay of a recorded outcome does before decoding it: waits until what it shows
/// is durable, and counts it.
fn note_replay<S: Engine>(state: &StoreState<S>, key: &[u8]) -> Result<(), Error> {
    state.durable_before_showing(false)?;
    Counters::bump(&state.counters.replays);
    tracing::trace!(key = %KeyHash(key), "replaying recorded outcome");
    Ok(())
}

/// As [`refused`], for a refusal decided on a record read as leader: an `Interrupted` shows a
/// Pending record, made durable first (design §6: a claim under `Rerun` is not durable on its
/// own, and what the store reports must survive a crash). The async driver makes that
/// durability point on the blocking pool instead.
pub(crate) fn refused_durably<S: Engine>(
    state: &StoreState<S>,
    key: &[u8],
    refusal: Refusal,
) -> Error {
    if let Refusal::Interrupted { .. } = refusal {
        if let Err(e) = state.durable_before_showing(true) {
            return e;
        }
    }
    refused(state, key, refusal)
}

/// The error for a refusal, counted and logged.
pub(crate) fn refused<S>(state: &StoreState<S>, key: &[u8], refusal: Refusal) -> Error {
    match refusal {
        Refusal::FingerprintMismatch => {
            Counters::bump(&state.counters.fingerprint_mismatches);
            tracing::debug!(key = %KeyHash(key), "fingerprint mismatch");
            Error::FingerprintMismatch {
                key: KeyName::new(key),
            }
        }
        Refusal::Interrupted { attempts } => {
            Counters::bump(&state.counters.orphans_reported);
            tracing::warn!(key = %KeyHash(key), attempts, "interrupted run reported");
            Error::Interrupted {
                key: KeyName::new(key),
                attempts,
            }
        }
    }
}

/// Whether a run that settled into `state` leaves no record (a retryable failure of a call
/// that forgets them).
pub(crate) fn forgets(state: RecordState, forget: bool) -> bool {
    forget && state == RecordState::FailedRetryable
}

/// Removes the claim's Pending record (and its life's steps), fenced, and waits for it to be
/// durable: the key is released as if never used. A failed removal leaves the claim to the
/// orphan policy.
pub(crate) fn release<S: Engine>(
    state: &StoreState<S>,
    held: &Held<'_>,
    pending: &Header,
) -> Result<(), Error> {
    let steps_of = pending.has_steps.then_some(pending.life);
    match state.engine.remove_record(held.key, held.record, steps_of) {
        Ok(true) => state.wait_durable(),
        Ok(false) => Err(state.fenced_out(held)),
        Err(e) => {
            state.engine.abandon(held);
            Err(e)
        }
    }
}

/// The Pending record of a running claim. Until [`ClaimGuard::write`] succeeds, dropping the
/// guard (an unwind from user code anywhere between claim and outcome) records the attempt as
/// retryable, so waiters in this process find a retryable record, not a false orphan.
struct ClaimGuard<'a, S: Engine> {
    state: &'a StoreState<S>,
    held: Held<'a>,
    header: &'a Header,
    ttl_ms: u64,
    /// A retryable failure removes the record (`Call::forget_retryable_errors`).
    forget: bool,
    armed: bool,
}

impl<S: Engine> ClaimGuard<'_, S> {
    /// Writes the outcome over this claim's Pending record and waits for it to be durable.
    /// Returns the header written.
    fn write(
        &mut self,
        state: RecordState,
        outcome: OutcomeKind,
        encoded: (&[u8], Codec, Option<u64>),
    ) -> Result<Header, Error> {
        // The clock is user code: read it while the guard still covers a panic.
        let now = self.state.clock.now_millis();
        self.armed = false;
        self.write_at(now, state, outcome, encoded)
    }

    fn write_at(
        &self,
        now: u64,
        state: RecordState,
        outcome: OutcomeKind,
        encoded: (&[u8], Codec, Option<u64>),
    ) -> Result<Header, Error> {
        let (payload, codec, shape) = encoded;
        let header = outcome_header(self.header, now, self.ttl_ms, state, outcome, codec, shape);
        if forgets(state, self.forget) {
            release(self.state, &self.held, self.header)?;
            return Ok(header);
        }
        if header.expires_ms != self.header.expires_ms {
            self.state
                .engine
                .index_expiry(header.expires_ms, self.held.key)?;
        }
        let bytes = record::encode(&header, payload);
        if !self.state.engine.finish(&self.held, Some(bytes))? {
            return Err(self.state.fenced_out(&self.held));
        }
        self.state.wait_durable()?;
        Ok(header)
    }
}

impl<S: Engine> Drop for ClaimGuard<'_, S> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // No user code here (it may be what is unwinding): the claim's own time stands in for
        // the clock.
        let retryable = (&[][..], Codec::Bincode, None);
        let now = self.header.updated_ms;
        if let Err(e) = self.write_at(
            now,
            RecordState::FailedRetryable,
            OutcomeKind::None,
            retryable,
        ) {
            tracing::error!(key = %KeyHash(self.held.key), error = %e, "could not record an unwound run");
        }
    }
}

enum Finished<T, E> {
    Returned(Result<Outcome<T>, ExecuteError<E>>),
    Panicked(Box<dyn std::any::Any + Send>),
}

/// Writes a settled run over its Pending record and waits for it to be durable.
fn record_outcome<S: Engine, T, E>(
    mut guard: ClaimGuard<'_, S>,
    settled: settle::Settled<T, E>,
) -> Finished<T, E> {
    let key = guard.held.key;
    if settled.keep_claim {
        // Whether a step is recorded is unknown: the claim stays Pending, an orphan.
        guard.armed = false;
        guard.state.engine.abandon(&guard.held);
        tracing::error!(key = %KeyHash(key), "a step's record may not be stored; the claim is left to the orphan policy");
        return match settled.reply {
            Reply::Panic(panic) => Finished::Panicked(panic),
            Reply::Error(e) => Finished::Returned(Err(e)),
            // Invariant: settle keeps a claim only with an error or a panic; a value here would
            // not be recorded, so it is not returned either.
            Reply::Value(_) => Finished::Returned(Err(Error::OutcomeNotRecorded {
                key: KeyName::new(key),
            }
            .into())),
        };
    }
    let written = guard.write(
        settled.state,
        settled.outcome,
        (&settled.payload, settled.codec, settled.shape),
    );
    let finished = match (written, settled.reply) {
        (written, Reply::Panic(panic)) => {
            if let Err(e) = written {
                tracing::error!(key = %KeyHash(key), error = %e, "could not record a panicked run");
            }
            Finished::Panicked(panic)
        }
        (Err(e), _) => {
            tracing::error!(key = %KeyHash(key), error = %e, "outcome not recorded");
            Finished::Returned(Err(e.into()))
        }
        (Ok(header), Reply::Value(value)) => Finished::Returned(Ok(Outcome::new(
            value,
            false,
            RecordInfo::new(&header, settled.payload.len()),
        ))),
        (Ok(_), Reply::Error(e)) => Finished::Returned(Err(e)),
    };
    tracing::debug!(state = ?settled.state, "outcome recorded");
    finished
}
