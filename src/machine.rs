//! The record state machine: what one `execute_once` call does, per docs/design.md's table.
//!
//! Invariants:
//! - the closure runs only in a call that is the key's registry leader *and* whose claim
//!   (compare-and-swap to Pending) succeeded and passed the durability barrier; after a claim
//!   the call always returns, so the closure runs at most once per call;
//! - from the claim until its outcome is written, a [`ClaimGuard`] owns the Pending record:
//!   if anything unwinds in between (the closure, a predicate, any user code the store
//!   calls), the guard records a retryable failure before the registry lets waiters in, so
//!   this process never mistakes its own claim for an orphan;
//! - the outcome is written with compare-and-swap against the exact Pending bytes of this
//!   claim, so a record removed or taken over while the closure ran is never overwritten;
//! - a recorded outcome is returned only once it is durable: the leader releases the registry
//!   after its barrier, and a reader that finds a terminal record while the key's leader is
//!   still running waits for that leader before replaying;
//! - an expired record reads as absent, and its life ends: a new claim starts a new life (see
//!   `record`), after the old record and its steps are removed together if it had steps;
//! - a Pending record that no call in this process runs is an orphan (its process died, or
//!   its outcome write failed) and is handled by policy;
//! - bad bytes yield an error naming the key; they never cause a run.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::panic::{self, AssertUnwindSafe};
use std::time::Instant;

use crate::call::{CallOptions, ErrorPolicy};
use crate::clock::millis;
use crate::codec::{self, Codec};
use crate::context::{RunClaim, RunFailure};
use crate::key::KeyHash;
use crate::record::{self, ClaimToken, DecodeError, Header, OutcomeKind, Record, RecordState};
use crate::registry::{Entry, Flight, Leader};
use crate::stats::Counters;
use crate::storage::Storage;
use crate::store::Shared;
use crate::{
    unstorable, Context, Error, ExecuteError, Fingerprint, KeyName, OrphanPolicy, Outcome,
    RecordInfo,
};

/// Runs `f` once for `key`, or replays its recorded outcome.
pub(crate) fn execute<S, T, E, P, F>(
    shared: &Shared<S>,
    key: &[u8],
    options: &CallOptions,
    policy: &P,
    f: F,
) -> Result<Outcome<T>, ExecuteError<E>>
where
    S: Storage,
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
    F: FnOnce(&mut Context<'_>) -> Result<T, E>,
{
    shared.check_key(key)?;
    let mut waiting = Waiting::new(shared, options);
    loop {
        let (leader, first_read, seen) =
            match take_turn(shared, key, options, policy, &mut waiting)? {
                Turn::Done(reply) => return reply,
                Turn::Lead {
                    leader,
                    stored,
                    seen,
                } => (leader, stored, seen),
            };

        // As leader nothing else in this process claims the key. A Pending record seen before
        // leading may have finished since: look again before calling it an orphan. Any other
        // state is re-checked by the claim's compare-and-swap.
        let now = shared.clock.now_millis();
        let fresh_read = match seen {
            Some(h) if h.state == RecordState::Pending => Some(shared.storage.get(key)?),
            _ => None,
        };
        let mut stored = match &fresh_read {
            Some(fresh) => fresh.as_ref().map(AsRef::as_ref),
            None => first_read.as_ref().map(AsRef::as_ref),
        };
        let current = match (&fresh_read, stored) {
            (Some(_), Some(bytes)) => {
                let rec = record::decode(bytes).map_err(|e| decode_error(key, e))?;
                if !rec.header.is_expired(now) && is_terminal(rec.header.state) {
                    // Written by a leader that has finished, so durable.
                    check_fingerprint(shared, key, &rec.header, options)?;
                    return replay(shared, key, &rec, policy);
                }
                Some(rec.header)
            }
            (Some(_), None) => None,
            (None, _) => seen,
        };
        let live = current.filter(|h| !h.is_expired(now));
        if let Some(h) = &live {
            check_fingerprint(shared, key, h, options)?;
            if h.state == RecordState::Pending {
                take_over_orphan(shared, key, h, options)?;
            }
        }
        if let (Some(old), None, Some(bytes)) = (current, live, stored) {
            // An expired life with steps ends here: its record and steps go together.
            if old.has_steps {
                if !shared.storage.remove_record(key, bytes, Some(old.life))? {
                    continue;
                }
                stored = None;
            }
        }
        let attempt = Attempt::after(live.as_ref(), now, options);
        let attempts = attempt.number;
        let ttl_ms = millis(options.ttl.unwrap_or(shared.settings.default_ttl));
        let pending_header = attempt.header(
            RecordState::Pending,
            OutcomeKind::None,
            now,
            ttl_ms,
            shared.next_claim_token(),
        );
        let pending = record::encode(&pending_header, &[]);
        // The index entry goes first, so a durable record always has one.
        shared
            .storage
            .index_expiry(pending_header.expires_ms, key)?;
        if !shared
            .storage
            .compare_and_swap(key, stored, Some(pending.clone()))?
        {
            // Changed between our read and the claim (removed, or swept): look again.
            drop(leader);
            continue;
        }
        if let Err(e) = shared.storage.barrier() {
            // The claim may not be durable: do not run. Put the record back as it was.
            let _ =
                shared
                    .storage
                    .compare_and_swap(key, Some(&pending), stored.map(<[u8]>::to_vec));
            return Err(e.into());
        }
        let guard = ClaimGuard {
            shared,
            key,
            header: &pending_header,
            bytes: &pending,
            ttl_ms,
            armed: true,
        };

        Counters::bump(&shared.counters.executions);
        let span = tracing::debug_span!("idemstore.execute", key = %KeyHash(key), attempts);
        let _entered = span.enter();
        tracing::debug!("running operation");
        // Invariant: this point is reached once per call (every path below returns), so the
        // closure is called at most once.
        let codec = options.codec.unwrap_or(shared.settings.codec);
        let mut context = Context::new(
            &shared.storage,
            RunClaim {
                key,
                attempt: attempts,
                token: pending_header.claim,
                life: pending_header.life,
                record: &pending,
                codec,
                max_result_bytes: shared.settings.max_result_bytes,
            },
        );
        let ran = panic::catch_unwind(AssertUnwindSafe(|| f(&mut context)));
        let failure = context.take_failure();
        let result = record_outcome(guard, codec, policy, ran, failure);
        tracing::debug!(state = ?result_state(&result), "outcome recorded");
        drop(leader);
        return match result {
            Finished::Returned(r) => r,
            Finished::Panicked(payload) => panic::resume_unwind(payload),
        };
    }
}

fn result_state<T, E>(f: &Finished<T, E>) -> &'static str {
    match f {
        Finished::Returned(Ok(_)) => "completed",
        Finished::Returned(Err(ExecuteError::Operation { .. })) => "failed",
        Finished::Returned(Err(ExecuteError::Store(_))) => "store error",
        Finished::Panicked(_) => "panicked",
    }
}

/// The Pending record of a running claim. Until [`ClaimGuard::write`] succeeds, dropping the
/// guard (an unwind from user code anywhere between claim and outcome) records the attempt as
/// retryable, so waiters in this process find a retryable record, not a false orphan.
struct ClaimGuard<'a, S: Storage> {
    shared: &'a Shared<S>,
    key: &'a [u8],
    header: &'a Header,
    bytes: &'a [u8],
    ttl_ms: u64,
    armed: bool,
}

impl<S: Storage> ClaimGuard<'_, S> {
    /// Writes the outcome over this claim's Pending record and waits for it to be durable.
    /// Returns the header written.
    fn write(
        &mut self,
        state: RecordState,
        outcome: OutcomeKind,
        encoded: (&[u8], Codec, Option<u64>),
    ) -> Result<Header, Error> {
        self.armed = false;
        let (payload, codec, shape) = encoded;
        let now = self.shared.clock.now_millis();
        let mut header = Header {
            state,
            outcome,
            updated_ms: now,
            codec,
            shape,
            ..*self.header
        };
        if header.is_expired(now) {
            // The run outlived its TTL: keep the outcome for a full TTL from now.
            header.expires_ms = now.saturating_add(self.ttl_ms);
            self.shared
                .storage
                .index_expiry(header.expires_ms, self.key)?;
        }
        let bytes = record::encode(&header, payload);
        if !self
            .shared
            .storage
            .compare_and_swap(self.key, Some(self.bytes), Some(bytes))?
        {
            return Err(Error::OutcomeNotRecorded {
                key: KeyName::new(self.key),
            });
        }
        self.shared.storage.barrier()?;
        Ok(header)
    }
}

impl<S: Storage> Drop for ClaimGuard<'_, S> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let retryable = (&[][..], Codec::Bincode, None);
        if let Err(e) = self.write(RecordState::FailedRetryable, OutcomeKind::None, retryable) {
            tracing::error!(key = %KeyHash(self.key), error = %e, "could not record an unwound run");
        }
    }
}

enum Finished<T, E> {
    Returned(Result<Outcome<T>, ExecuteError<E>>),
    Panicked(Box<dyn std::any::Any + Send>),
}

/// What the run produced, before it is recorded.
enum Reply<T, E> {
    Value(T),
    Error(ExecuteError<E>),
    Panic(Box<dyn std::any::Any + Send>),
}

/// Writes the outcome of a run over its Pending record and waits for it to be durable.
fn record_outcome<S, T, E, P>(
    mut guard: ClaimGuard<'_, S>,
    codec: Codec,
    policy: &P,
    ran: std::thread::Result<Result<T, E>>,
    failure: Option<RunFailure>,
) -> Finished<T, E>
where
    S: Storage,
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    let key = guard.key;
    let limit = guard.shared.settings.max_result_bytes;
    let none = || (Vec::new(), codec, None);
    let (state, outcome, (payload, codec, shape), reply) = match (ran, failure) {
        // A step the store could not record or replay fails the run, whatever it returned.
        (Ok(_), Some(RunFailure { error, terminal })) => match terminal {
            Some((kind, note)) => (
                RecordState::Completed,
                kind,
                (note, codec, None),
                Reply::Error(error.into()),
            ),
            None => (
                RecordState::FailedRetryable,
                OutcomeKind::None,
                none(),
                Reply::Error(error.into()),
            ),
        },
        (ran, _) => match ran {
            Ok(Ok(value)) => match codec::encode(&value, codec, limit) {
                Ok(e) => (
                    RecordState::Completed,
                    OutcomeKind::Stored,
                    (e.bytes, e.codec, Some(e.shape)),
                    Reply::Value(value),
                ),
                Err(failure) => {
                    let (kind, payload, err) = unstorable::record(key, failure, limit);
                    (
                        RecordState::Completed,
                        kind,
                        (payload, codec, None),
                        Reply::Error(err.into()),
                    )
                }
            },
            Ok(Err(error)) if policy.is_permanent(&error) => {
                match policy.encode(&error, codec, limit) {
                    Ok(e) => (
                        RecordState::FailedPermanent,
                        OutcomeKind::Stored,
                        (e.bytes, e.codec, Some(e.shape)),
                        Reply::Error(ExecuteError::Operation {
                            error,
                            replayed: false,
                        }),
                    ),
                    Err(failure) => {
                        let (kind, payload, err) = unstorable::record(key, failure, limit);
                        (
                            RecordState::FailedPermanent,
                            kind,
                            (payload, codec, None),
                            Reply::Error(err.into()),
                        )
                    }
                }
            }
            Ok(Err(error)) => (
                RecordState::FailedRetryable,
                OutcomeKind::None,
                none(),
                Reply::Error(ExecuteError::Operation {
                    error,
                    replayed: false,
                }),
            ),
            Err(panic) => (
                RecordState::FailedRetryable,
                OutcomeKind::None,
                none(),
                Reply::Panic(panic),
            ),
        },
    };

    let written = guard.write(state, outcome, (&payload, codec, shape));
    match (written, reply) {
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
    }
}

/// Returns a terminal record's outcome to the caller.
pub(crate) fn replay<S, T, E, P>(
    shared: &Shared<S>,
    key: &[u8],
    rec: &Record<'_>,
    policy: &P,
) -> Result<Outcome<T>, ExecuteError<E>>
where
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    Counters::bump(&shared.counters.replays);
    tracing::trace!(key = %KeyHash(key), "replaying recorded outcome");
    let name = || KeyName::new(key);
    let h = &rec.header;
    if let Some(error) = unstorable::replay(key, h.outcome, rec.payload) {
        return Err(error.into());
    }
    match (h.state, h.outcome) {
        (RecordState::Completed, OutcomeKind::Stored) => {
            match codec::decode::<T>(rec.payload, h.codec, h.shape) {
                Ok(value) => Ok(Outcome::new(
                    value,
                    true,
                    RecordInfo::new(h, rec.payload.len()),
                )),
                Err(message) => Err(Error::Decode {
                    key: name(),
                    what: "result",
                    message,
                }
                .into()),
            }
        }
        (RecordState::FailedPermanent, OutcomeKind::Stored) => {
            match policy.decode(rec.payload, h.codec, h.shape) {
                Some(Ok(error)) => Err(ExecuteError::Operation {
                    error,
                    replayed: true,
                }),
                Some(Err(message)) => Err(Error::Decode {
                    key: name(),
                    what: "error",
                    message,
                }
                .into()),
                None => Err(Error::PermanentErrorRecorded { key: name() }.into()),
            }
        }
        // record::decode admits no other terminal combination.
        _ => Err(Error::CorruptRecord {
            key: name(),
            reason: "outcome kind does not match state",
        }
        .into()),
    }
}

pub(crate) fn is_terminal(state: RecordState) -> bool {
    matches!(state, RecordState::Completed | RecordState::FailedPermanent)
}

/// The record stored for `key` if it is live at `now_ms`; expired records read as absent.
pub(crate) fn live<'a>(
    key: &[u8],
    bytes: Option<&'a [u8]>,
    now_ms: u64,
) -> Result<Option<Record<'a>>, Error> {
    let Some(bytes) = bytes else { return Ok(None) };
    let rec = record::decode(bytes).map_err(|e| decode_error(key, e))?;
    Ok((!rec.header.is_expired(now_ms)).then_some(rec))
}

pub(crate) fn decode_error(key: &[u8], e: DecodeError) -> Error {
    match e {
        DecodeError::Corrupt(reason) => Error::CorruptRecord {
            key: KeyName::new(key),
            reason,
        },
        DecodeError::FutureVersion(version) => Error::UnsupportedRecordVersion {
            key: KeyName::new(key),
            version,
        },
    }
}

pub(crate) fn check_fingerprint<S>(
    shared: &Shared<S>,
    key: &[u8],
    header: &Header,
    options: &CallOptions,
) -> Result<(), Error> {
    match (options.fingerprint, header.fingerprint) {
        (Some(given), Some(stored)) if given != stored => {
            Counters::bump(&shared.counters.fingerprint_mismatches);
            tracing::debug!(key = %KeyHash(key), "fingerprint mismatch");
            Err(Error::FingerprintMismatch {
                key: KeyName::new(key),
            })
        }
        _ => Ok(()),
    }
}

/// How a call goes on after its first look at the key's record.
pub(crate) enum Turn<'r, B, T, E> {
    /// Answered from a recorded outcome: return this.
    Done(Result<Outcome<T>, ExecuteError<E>>),
    /// This call now leads the key. `stored` is what it read before leading, and `seen` that
    /// record's header (None: absent); neither is a live recorded outcome.
    Lead {
        leader: Leader<'r>,
        stored: Option<B>,
        seen: Option<Header>,
    },
}

/// Replays a live recorded outcome (once durable), or waits for the key's running call, or
/// becomes the key's leader. The replay path takes no lock when no call is running.
pub(crate) fn take_turn<'r, S, T, E, P>(
    shared: &'r Shared<S>,
    key: &[u8],
    options: &CallOptions,
    policy: &P,
    waiting: &mut Waiting<'_, S>,
) -> Result<Turn<'r, S::Bytes, T, E>, Error>
where
    S: Storage,
    T: Serialize + DeserializeOwned,
    P: ErrorPolicy<E>,
{
    loop {
        let now = shared.clock.now_millis();
        let stored = shared.storage.get(key)?;
        let first = match stored.as_ref() {
            Some(bytes) => Some(record::decode(bytes.as_ref()).map_err(|e| decode_error(key, e))?),
            None => None,
        };
        if let Some(rec) = first.filter(|r| !r.header.is_expired(now)) {
            check_fingerprint(shared, key, &rec.header, options)?;
            if is_terminal(rec.header.state) {
                match shared.registry.running(key) {
                    // Its writer may still be waiting for the flush: replay once durable.
                    Some(flight) if shared.settings.immediate => {
                        waiting.wait(key, &flight)?;
                        continue;
                    }
                    _ => return Ok(Turn::Done(replay(shared, key, &rec, policy))),
                }
            }
        }
        let seen = first.map(|r| r.header);
        match shared.registry.enter(key) {
            Entry::Leader(leader) => {
                return Ok(Turn::Lead {
                    leader,
                    stored,
                    seen,
                })
            }
            Entry::Follower(flight) => waiting.wait(key, &flight)?,
        }
    }
}

/// Applies the orphan policy to a live Pending record that no call in this process runs.
pub(crate) fn take_over_orphan<S>(
    shared: &Shared<S>,
    key: &[u8],
    header: &Header,
    options: &CallOptions,
) -> Result<(), Error> {
    let policy = options
        .orphan_policy
        .unwrap_or(shared.settings.orphan_policy);
    if policy == OrphanPolicy::Report {
        Counters::bump(&shared.counters.orphans_reported);
        tracing::warn!(key = %KeyHash(key), attempts = header.attempts, "interrupted run reported");
        return Err(Error::Interrupted {
            key: KeyName::new(key),
            attempts: header.attempts,
        });
    }
    Counters::bump(&shared.counters.orphans_recovered);
    tracing::warn!(
        key = %KeyHash(key),
        attempts = header.attempts,
        orphan_epoch = header.claim.epoch,
        "re-running an interrupted run"
    );
    Ok(())
}

/// The attempt a claim starts, carrying over what the record it replaces knew.
#[derive(Debug, Clone, Copy)]
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
                life: Some(h.life),
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

/// One call's waiting budget, shared by every wait it makes.
pub(crate) struct Waiting<'a, S> {
    shared: &'a Shared<S>,
    timeout: std::time::Duration,
    deadline: Option<Option<Instant>>,
}

impl<'a, S> Waiting<'a, S> {
    pub(crate) fn new(shared: &'a Shared<S>, options: &CallOptions) -> Self {
        Self {
            shared,
            timeout: options.wait_timeout.unwrap_or(shared.settings.wait_timeout),
            deadline: None,
        }
    }

    /// Waits for the running call; `InProgress` once this call's budget is spent.
    pub(crate) fn wait(&mut self, key: &[u8], flight: &Flight) -> Result<(), Error> {
        let deadline = match self.deadline {
            Some(deadline) => deadline,
            None => {
                Counters::bump(&self.shared.counters.waits);
                let deadline = Instant::now().checked_add(self.timeout);
                self.deadline = Some(deadline);
                deadline
            }
        };
        if flight.wait_until(deadline) {
            return Ok(());
        }
        Counters::bump(&self.shared.counters.in_progress_rejections);
        Err(Error::InProgress {
            key: KeyName::new(key),
            waited: self.timeout,
        })
    }
}
