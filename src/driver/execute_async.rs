//! The async driver: one `execute_once_async` call, the same loop as the plain driver
//! (`execute`) around the same rules, awaiting instead of blocking.
//!
//! Invariants (beyond the plain driver's, which all hold here):
//! - no runtime worker blocks: waiting for a same-key call of this process awaits a
//!   notification, waiting for a holder elsewhere awaits the engine, and a durability point
//!   that waits on a device is awaited (sled's flusher thread makes it; an engine without an
//!   awaitable one has it made on the blocking pool);
//! - **cancellation**: a call whose future is dropped before its claim leaves nothing; one
//!   dropped after its claim and before its outcome is written leaves the claim Pending, an
//!   orphan at once (this process's registry lets go, and a shared engine ends the lease now),
//!   handled by the orphan policy like an interrupted run (`Rerun` runs the operation again,
//!   `Report` says `Interrupted`); one dropped while its written outcome awaits its
//!   durability point leaves that wait to a task of the blocking pool, which holds the key's
//!   leadership until it is done, so waiters replay only a durable outcome and the drop never
//!   blocks a runtime worker. So a key is never stuck until its TTL, and nothing runs beyond
//!   the contract;
//! - a panic in the operation's future is caught and settled as a retryable failure, as in
//!   the plain driver; a panic in user code the store calls after the run (a predicate, a
//!   `Serialize`) is recorded as a retryable failure while it unwinds (that write, too, in a
//!   task of the blocking pool that holds the leadership until it is done).

// Futures are returned as `impl Future + Send` on purpose: declared `Send` where every
// lifetime is concrete, they stay provably `Send` inside the callers' futures (an `async fn`'s
// would be re-proven there, which the compiler cannot do across its generic lifetimes).
#![allow(clippy::manual_async_fn)]

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use crate::core::attempt::outcome_header;
use crate::core::options::CallOptions;
use crate::core::outcome::{Outcome, RecordInfo};
use crate::core::policy::ErrorPolicy;
use crate::core::replay::decode_error;
use crate::core::rules::{self, AsLeader, Refusal};
use crate::core::settle::{self, Reply, Settled};
use crate::driver::async_context::{
    durable_async, fenced_out_async, AsyncClaim, AsyncContext, StoreLog,
};
use crate::driver::execute::{
    absent_claim, cached_replay, follower_wait, forgets, look, note_takeover, refused, release,
    replayed, FollowerWait, Look, ReadAbsent,
};
use crate::driver::registry::{DetachedLeader, Entry, Leader};
use crate::driver::state::StoreState;
use crate::driver::waiting::Waiting;
use crate::engine::{ClaimOrGet, Engine, Held};
use crate::error::{Error, ExecuteError};
use crate::format::codec::Codec;
use crate::format::record::{self, ClaimToken, Header, OutcomeKind, RecordState, LEGACY_LIFE};
use crate::key::{KeyHash, KeyName};
use crate::stats::Counters;

/// Runs `f` once for `key`, or replays its recorded outcome, without blocking the runtime.
pub(crate) async fn execute_async<S, T, E, P, F, Fut>(
    state: &Arc<StoreState<S>>,
    key: &[u8],
    options: &CallOptions,
    policy: P,
    read_absent: Option<ReadAbsent>,
    f: F,
) -> Result<Outcome<T>, ExecuteError<E>>
where
    S: Engine,
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
    F: FnOnce(AsyncContext) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    state.check_key(key)?;
    if let Some(answer) = cached_replay(state, key, options, &policy) {
        return answer;
    }
    let mut read_absent = read_absent;
    let mut waiting = Waiting::new(state, options);
    // The loop ends with this call's claim written: its leadership, Pending header and
    // bytes, and the record it replaced (to put back if the claim cannot be made durable).
    let (leader, pending_header, pending, replaced) = loop {
        let first = match state.engine.claims_first() {
            true => claim_first_async(state, key, options, &mut waiting).await?,
            false => FirstAsync::Look(
                lead_async(state, key, options, &mut waiting, read_absent.take()).await?,
            ),
        };
        let (leader, first_read, seen) = match first {
            FirstAsync::Claimed { leader, pending } => break (leader, pending.0, pending.1, None),
            FirstAsync::Look(LeadAsync::Replay(bytes)) => {
                let rec = record::decode(bytes.as_ref()).map_err(|e| decode_error(key, e))?;
                return replayed(state, key, &rec, &policy);
            }
            FirstAsync::Look(LeadAsync::Leader {
                leader,
                stored,
                seen,
            }) => (leader, stored, seen),
        };
        let fresh_read = match seen {
            Some(h) if h.state == RecordState::Pending => Some(state.engine.get_async(key).await?),
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
        let holder_live = match header {
            Some(h) if h.state == RecordState::Pending => {
                state.engine.holder_live_async(key, h.claim, false).await
            }
            _ => false,
        };
        let orphan_policy = state.settings.orphan_policy(options);
        let plan = match rules::as_leader(header.as_ref(), now, options, orphan_policy, holder_live)
        {
            AsLeader::Replay => {
                // Invariant: Replay is only decided for a record that was read.
                let Some(rec) = current else { continue };
                return replayed(state, key, &rec, &policy);
            }
            AsLeader::Refuse(refusal) => {
                // As the plain driver's `refused_durably`, with the durability point on the
                // blocking pool.
                if matches!(refusal, Refusal::Interrupted { .. }) && state.sync_before_showing(true)
                {
                    durable_async(state).await?;
                }
                return Err(refused(state, key, refusal).into());
            }
            AsLeader::WaitForHolder => {
                drop(leader);
                // Invariant: WaitForHolder is only decided for a Pending record that was read.
                if let Some(h) = header {
                    waiting.wait_for_holder_async(key, h.claim).await?;
                }
                continue;
            }
            AsLeader::Claim(plan) => plan,
        };
        note_takeover(state, key, &plan);
        if let (Some(life), Some(bytes)) = (plan.retire, stored) {
            // An expired life with steps ends here: its record and steps go together.
            if !state
                .engine
                .remove_record_async(key, bytes, Some(life))
                .await?
            {
                continue;
            }
            stored = None;
        }
        let above = header.map(|h| h.claim);
        let fresh_epoch = match state.epoch_floor(above) {
            Some(floor) => Some(state.engine.fresh_epoch_async(floor).await?),
            None => None,
        };
        let token = state.next_claim_token_from(above, |floor| match fresh_epoch {
            Some(epoch) => Ok(epoch),
            None => state.engine.fresh_epoch(floor),
        })?;
        let ttl_ms = state.settings.ttl_ms(options);
        let pending_header =
            plan.attempt
                .header(RecordState::Pending, OutcomeKind::None, now, ttl_ms, token);
        let pending = record::encode(&pending_header, &[]);
        // The index entry goes first, so a durable record always has one.
        state.engine.index_expiry(pending_header.expires_ms, key)?;
        let in_flight = InFlight::new(&state.engine, key, &pending, pending_header.claim);
        let claimed = state.engine.claim_async(key, stored, pending.clone()).await;
        in_flight.settled(claimed.is_ok());
        match claimed {
            Ok(true) => {}
            Ok(false) => {
                drop(leader);
                continue;
            }
            // As in the plain driver: a transaction elsewhere holds the record.
            Err(e) if e.is_busy() => {
                drop(leader);
                let claim = header.map_or(LEGACY_LIFE, |h| h.claim);
                waiting.wait_for_holder_async(key, claim).await?;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        break (leader, pending_header, pending, stored.map(<[u8]>::to_vec));
    };
    let attempts = pending_header.attempts;
    let ttl_ms = state.settings.ttl_ms(options);
    let held = Held {
        key,
        record: &pending,
        token: pending_header.claim,
        life: pending_header.life,
    };
    let mut guard = RunGuard {
        state,
        held,
        header: &pending_header,
        ttl_ms,
        forget: options.forget_retryable,
        phase: Phase::Claimed,
        leader: Some(leader),
    };
    if state.settings.claim_must_be_durable(options) {
        if let Err(e) = durable_async(state).await {
            // The claim may not be durable: do not run. Put the record back as it was.
            guard.phase = Phase::Done;
            let _ = state.engine.finish_async(&guard.held, replaced).await;
            return Err(e.into());
        }
    }
    guard.claimed();

    Counters::bump(&state.counters.executions);
    tracing::debug!(key = %KeyHash(key), attempts, "running operation");
    let codec = state.settings.codec(options);
    let limit = state.settings.max_result_bytes;
    let log: Arc<dyn crate::driver::async_context::AsyncStepLog> =
        Arc::new(StoreLog(Arc::clone(state)));
    let context = AsyncContext::new(
        log,
        AsyncClaim {
            held,
            attempt: attempts,
            codec,
            max_result_bytes: limit,
        },
    );
    // Invariant: this point is reached once per call, so the operation is started at most
    // once.
    guard.phase = Phase::Running;
    // However the run ends (returned, or this future dropped), its context's later steps
    // are refused before they run.
    let ended = context.ender();
    let ran = CatchUnwind::new(|| f(context.clone())).await;
    drop(ended);
    let failure = context.take_failure();
    // User code (a predicate, `Serialize`) runs in `settle`: a panic there unwinds through
    // the guard, which records a retryable failure.
    guard.phase = Phase::Settling;
    let settled = settle::settle(key, ran, failure, &policy, codec, limit);
    // The guard holds the leadership: waiters look once the outcome is recorded.
    let result = record_outcome_async(guard, settled).await;
    match result {
        Finished::Returned(r) => r,
        Finished::Panicked(payload) => panic::resume_unwind(payload),
    }
}

/// The first look of a call, async: an ordinary look, or a claim made first.
enum FirstAsync<'r, B> {
    Look(LeadAsync<'r, B>),
    Claimed {
        leader: Leader<'r>,
        pending: (Header, Vec<u8>),
    },
}

/// As the plain driver's `claim_first`, awaiting instead of blocking.
fn claim_first_async<'r, 'a, S: Engine>(
    state: &'r StoreState<S>,
    key: &'a [u8],
    options: &'a CallOptions,
    waiting: &'a mut Waiting<'r, S>,
) -> impl Future<Output = Result<FirstAsync<'r, S::Bytes>, Error>> + Send + 'a
where
    'r: 'a,
{
    async move {
        loop {
            let leader = match state.registry.enter(key) {
                Entry::Leader(leader) => leader,
                // As in the plain driver: the ordinary look decides.
                Entry::Follower(_) => {
                    return Ok(FirstAsync::Look(
                        lead_async(state, key, options, waiting, None).await?,
                    ))
                }
            };
            let Some((header, pending)) = absent_claim(state, options)? else {
                return Ok(FirstAsync::Look(LeadAsync::Leader {
                    leader,
                    stored: None,
                    seen: None,
                }));
            };
            state.engine.index_expiry(header.expires_ms, key)?;
            let in_flight = InFlight::new(&state.engine, key, &pending, header.claim);
            let found = state.engine.claim_or_get_async(key, pending.clone()).await;
            in_flight.settled(found.is_ok());
            match found {
                Ok(Some(ClaimOrGet::Claimed)) => {
                    return Ok(FirstAsync::Claimed {
                        leader,
                        pending: (header, pending),
                    })
                }
                Ok(Some(ClaimOrGet::Existing(bytes))) => {
                    let seen = record::decode(bytes.as_ref())
                        .map_err(|e| decode_error(key, e))?
                        .header;
                    return Ok(FirstAsync::Look(LeadAsync::Leader {
                        leader,
                        stored: Some(bytes),
                        seen: Some(seen),
                    }));
                }
                Ok(None) => drop(leader),
                Err(e) if e.is_busy() => {
                    drop(leader);
                    waiting.wait_for_holder_async(key, LEGACY_LIFE).await?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// How a call goes on after its first look, async.
enum LeadAsync<'r, B> {
    /// A live recorded outcome: replay these bytes.
    Replay(B),
    /// This call now leads the key (as in the plain driver's `Lead::Leader`).
    Leader {
        leader: Leader<'r>,
        stored: Option<B>,
        seen: Option<Header>,
    },
}

/// As the plain driver's `lead`, awaiting instead of blocking; `read_absent` stands for the
/// first read when the caller found the key absent. It takes no error policy (the caller replays), which
/// keeps the call's future provably `Send`.
fn lead_async<'r, 'a, S: Engine>(
    state: &'r StoreState<S>,
    key: &'a [u8],
    options: &'a CallOptions,
    waiting: &'a mut Waiting<'r, S>,
    mut read_absent: Option<ReadAbsent>,
) -> impl Future<Output = Result<LeadAsync<'r, S::Bytes>, Error>> + Send + 'a
where
    'r: 'a,
{
    async move {
        let mut looked_after_claim = false;
        loop {
            let stored = match read_absent.take() {
                Some(ReadAbsent) => None,
                None => state.engine.get_async(key).await?,
            };
            let (header, look) = {
                let (first, look) = look(state, key, options, stored.as_ref().map(AsRef::as_ref))?;
                (first.map(|r| r.header), look)
            };
            match (look, stored) {
                (Look::Replay, Some(bytes)) => return Ok(LeadAsync::Replay(bytes)),
                (Look::WaitForWriter(flight), _) => {
                    waiting.wait_async(key, &flight, false).await?;
                    continue;
                }
                (Look::Refuse(refusal), _) => return Err(refused(state, key, refusal)),
                (_, stored) => match state.registry.enter(key) {
                    Entry::Leader(leader) => {
                        return Ok(LeadAsync::Leader {
                            leader,
                            stored,
                            seen: header,
                        })
                    }
                    Entry::Follower(flight) => match follower_wait(
                        &flight,
                        header.as_ref(),
                        state.clock.now_millis(),
                        options,
                        &mut looked_after_claim,
                    ) {
                        FollowerWait::LookAgain => {}
                        FollowerWait::Until { claimed } => {
                            waiting.wait_async(key, &flight, claimed).await?
                        }
                    },
                },
            }
        }
    }
}

/// A claim statement on its way: if the call's future is dropped before the answer comes
/// (or the answer is a failure, which leaves the claim unknown), the claim may still be
/// written; the engine is told it was interrupted, so a shared engine ends its lease at once
/// rather than leave the key held until the lease runs out.
struct InFlight<'a, S: Engine> {
    engine: &'a S,
    held: Held<'a>,
    answered: bool,
}

impl<'a, S: Engine> InFlight<'a, S> {
    fn new(engine: &'a S, key: &'a [u8], pending: &'a [u8], token: ClaimToken) -> Self {
        Self {
            engine,
            // The claim's own life is not needed to end its lease.
            held: Held {
                key,
                record: pending,
                token,
                life: token,
            },
            answered: false,
        }
    }

    /// The claim was answered (`ok`), so the caller knows whether it is written.
    fn settled(mut self, ok: bool) {
        self.answered = ok;
    }
}

impl<S: Engine> Drop for InFlight<'_, S> {
    fn drop(&mut self) {
        if !self.answered {
            self.engine.interrupted(&self.held);
        }
    }
}

/// Where a claimed call is, for what its guard does if the call's future is dropped.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Claimed, the claim's durability point not passed: the operation has not run.
    Claimed,
    /// The operation may be running; no outcome written.
    Running,
    /// The operation returned; the store is settling its result (user code: a predicate, a
    /// `Serialize`), no outcome written.
    Settling,
    /// The settled outcome (or the removal a forgetting call makes) is on its way to the
    /// engine: it may land or not.
    Writing,
    /// The outcome (or a forgetting call's removal) is written; its durability point is
    /// pending.
    Written,
    /// Nothing left to do.
    Done,
}

/// The Pending record of a running async claim; see the module's cancellation rules.
struct RunGuard<'a, S: Engine> {
    state: &'a Arc<StoreState<S>>,
    held: Held<'a>,
    header: &'a Header,
    ttl_ms: u64,
    /// A retryable failure removes the record (`Call::forget_retryable_errors`).
    forget: bool,
    phase: Phase,
    /// This call's leadership of its key, released (waking waiters) when the guard is dropped,
    /// or once the work its drop leaves is done (see [`Left`]). Invariant: `Some` until then.
    leader: Option<Leader<'a>>,
}

impl<S: Engine> RunGuard<'_, S> {
    /// The claim is written: wakes the waiters that asked to look again then.
    fn claimed(&self) {
        if let Some(leader) = &self.leader {
            leader.claimed();
        }
    }

    /// Leaves `work` to be done before this call's key is released: on tokio's blocking pool
    /// when this drop runs in a runtime (a drop never blocks a runtime worker on a device or a
    /// round trip), here otherwise, or when the work cannot block (a durability point that
    /// waits on no device).
    fn leave(&mut self, work: LeftWork) {
        self.state.left_behind.enter();
        let left = Left {
            state: Arc::clone(self.state),
            key: self.held.key.to_vec(),
            record: self.held.record.to_vec(),
            token: self.held.token,
            life: self.held.life,
            work,
            leader: self
                .leader
                .take()
                .map(|leader| leader.detach(Arc::clone(self.state))),
        };
        let blocks = match left.work {
            LeftWork::Durable => self.state.engine.durability_blocks(),
            LeftWork::RecordUnwound { .. } => true,
        };
        match tokio::runtime::Handle::try_current() {
            // The work is done in `Left`'s drop: if the runtime drops the task unrun (it is
            // shutting down), it is done wherever that happens.
            Ok(runtime) if blocks => drop(runtime.spawn_blocking(move || drop(left))),
            _ => drop(left),
        }
    }
}

/// What a dropped call's guard leaves to do before its key's waiters may look.
#[derive(Clone, Copy)]
enum LeftWork {
    /// The written outcome's durability point: waiters may replay it only once it is durable.
    Durable,
    /// User code the store called after the run panicked: record a retryable failure over
    /// the Pending record `header` (or, for a call that `forget`s them, release the key), as
    /// the plain driver's claim guard does. No clock (user code).
    RecordUnwound { header: Header, forget: bool },
}

/// A dropped call's last work, done when this is dropped, and its leadership, released after
/// the work (fields are dropped after `drop` runs). Counted in the store's `left_behind` from
/// its making to the end of its drop, so closing the store waits for it.
struct Left<S: Engine> {
    state: Arc<StoreState<S>>,
    key: Vec<u8>,
    /// The claim's exact Pending record.
    record: Vec<u8>,
    token: ClaimToken,
    life: ClaimToken,
    work: LeftWork,
    /// The key's leadership, released once the work is done.
    leader: Option<DetachedLeader<StoreState<S>>>,
}

impl<S: Engine> Drop for Left<S> {
    fn drop(&mut self) {
        let held = Held {
            key: &self.key,
            record: &self.record,
            token: self.token,
            life: self.life,
        };
        let state = &self.state;
        match self.work {
            LeftWork::Durable => {
                if let Err(e) = state.wait_durable() {
                    tracing::error!(key = %KeyHash(held.key), error = %e, "outcome not durable");
                }
            }
            LeftWork::RecordUnwound { header, forget } => {
                let failed = outcome_header(
                    &header,
                    header.updated_ms,
                    0,
                    RecordState::FailedRetryable,
                    OutcomeKind::None,
                    Codec::Bincode,
                    None,
                );
                let written = match forget {
                    true => release(state, &held, &header),
                    false => state
                        .engine
                        .finish(&held, Some(record::encode(&failed, &[])))
                        .and_then(|_| state.wait_durable()),
                };
                if let Err(e) = written {
                    // The claim is left to the orphan policy: stop renewing it.
                    state.engine.abandon(&held);
                    tracing::error!(key = %KeyHash(held.key), error = %e, "could not record an unwound run");
                }
            }
        }
        // The key goes first (waiters may look), then the count (closing may go on).
        drop(self.leader.take());
        state.left_behind.exit();
    }
}

impl<S: Engine> Drop for RunGuard<'_, S> {
    fn drop(&mut self) {
        match self.phase {
            Phase::Done => {}
            Phase::Written => self.leave(LeftWork::Durable),
            Phase::Settling => self.leave(LeftWork::RecordUnwound {
                header: *self.header,
                forget: self.forget,
            }),
            // The write on its way lands or not; the drop writes nothing and never blocks. The
            // claim's lease is not ended: ended, another replica could take the key over and
            // run the operation again while its outcome is still on its way. If the write
            // failed, the claim is an orphan once its lease runs out.
            Phase::Writing => {
                tracing::warn!(
                    key = %KeyHash(self.held.key),
                    "call dropped while its outcome was being written"
                );
                self.state.engine.abandon(&self.held);
            }
            Phase::Claimed | Phase::Running => {
                tracing::warn!(
                    key = %KeyHash(self.held.key),
                    "call dropped while it held its claim; the claim is left to the orphan policy"
                );
                self.state.engine.interrupted(&self.held);
            }
        }
    }
}

enum Finished<T, E> {
    Returned(Result<Outcome<T>, ExecuteError<E>>),
    Panicked(Box<dyn std::any::Any + Send>),
}

/// Writes a settled run over its Pending record and waits for it to be durable.
async fn record_outcome_async<S: Engine, T, E>(
    mut guard: RunGuard<'_, S>,
    settled: Settled<T, E>,
) -> Finished<T, E> {
    let key = guard.held.key;
    // The reply (perhaps a panic payload, which is not `Sync`) is held by value across the
    // awaits below, never by reference: the call's future stays `Send`.
    let Settled {
        keep_claim,
        state,
        outcome,
        payload,
        codec,
        shape,
        reply,
    } = settled;
    if keep_claim {
        // Whether a step is recorded is unknown: the claim stays Pending, an orphan.
        guard.phase = Phase::Done;
        guard.state.engine.abandon(&guard.held);
        tracing::error!(key = %KeyHash(key), "a step's record may not be stored; the claim is left to the orphan policy");
        return match reply {
            Reply::Panic(panic) => Finished::Panicked(panic),
            Reply::Error(e) => Finished::Returned(Err(e)),
            // Invariant: settle keeps a claim only with an error or a panic.
            Reply::Value(_) => Finished::Returned(Err(Error::OutcomeNotRecorded {
                key: KeyName::new(key),
            }
            .into())),
        };
    }
    let written = write_outcome(&mut guard, state, outcome, &payload, codec, shape).await;
    let finished = match (written, reply) {
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
            RecordInfo::new(&header, payload.len()),
        ))),
        (Ok(_), Reply::Error(e)) => Finished::Returned(Err(e)),
    };
    tracing::debug!(state = ?state, "outcome recorded");
    finished
}

fn write_outcome<'g, 'a, S: Engine>(
    guard: &'g mut RunGuard<'a, S>,
    state: RecordState,
    outcome: OutcomeKind,
    payload: &'g [u8],
    codec: Codec,
    shape: Option<u64>,
) -> impl Future<Output = Result<Header, Error>> + Send + use<'g, 'a, S> {
    async move {
        let store = guard.state;
        let now = store.clock.now_millis();
        let header = outcome_header(
            guard.header,
            now,
            guard.ttl_ms,
            state,
            outcome,
            codec,
            shape,
        );
        if forgets(state, guard.forget) {
            let steps_of = guard.header.has_steps.then_some(guard.header.life);
            guard.phase = Phase::Writing;
            let removed = store
                .engine
                .remove_record_async(guard.held.key, guard.held.record, steps_of)
                .await;
            // A removal made waits for its durability point as an outcome does: a drop
            // meanwhile leaves that wait to a task that holds the key.
            guard.phase = match removed {
                Ok(true) => Phase::Written,
                _ => Phase::Done,
            };
            return match removed {
                Ok(true) => {
                    let durable = durable_async(store).await;
                    guard.phase = Phase::Done;
                    durable.map(|()| header)
                }
                Ok(false) => Err(fenced_out_async(store, &guard.held).await),
                Err(e) => {
                    store.engine.abandon(&guard.held);
                    Err(e)
                }
            };
        }
        if header.expires_ms != guard.header.expires_ms {
            store
                .engine
                .index_expiry(header.expires_ms, guard.held.key)?;
        }
        let bytes = record::encode(&header, payload);
        guard.phase = Phase::Writing;
        let finished = store.engine.finish_async(&guard.held, Some(bytes)).await;
        // From here on the guard does not interrupt the claim: the outcome is written (or the
        // write failed, and the claim is left to the orphan policy like any failed final write).
        guard.phase = match finished {
            Ok(true) => Phase::Written,
            _ => Phase::Done,
        };
        if !finished? {
            return Err(fenced_out_async(store, &guard.held).await);
        }
        let durable = durable_async(store).await;
        guard.phase = Phase::Done;
        durable.map(|()| header)
    }
}

/// A future that turns a panic of its inner future (or of the call that makes it) into an
/// `Err`, as `catch_unwind` does for a closure.
struct CatchUnwind<Fut> {
    inner: Option<Pin<Box<Fut>>>,
    make_failed: Option<Box<dyn std::any::Any + Send>>,
}

impl<Fut: Future> CatchUnwind<Fut> {
    fn new(make: impl FnOnce() -> Fut) -> Self {
        match panic::catch_unwind(AssertUnwindSafe(make)) {
            Ok(fut) => Self {
                inner: Some(Box::pin(fut)),
                make_failed: None,
            },
            Err(panic) => Self {
                inner: None,
                make_failed: Some(panic),
            },
        }
    }
}

impl<Fut: Future> Future for CatchUnwind<Fut> {
    type Output = std::thread::Result<Fut::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        if let Some(panic) = self.make_failed.take() {
            return Poll::Ready(Err(panic));
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Pending; // polled after completion: never again ready
        };
        match panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => {
                self.inner = None;
                Poll::Ready(Ok(out))
            }
            Err(panic) => {
                self.inner = None;
                Poll::Ready(Err(panic))
            }
        }
    }
}
