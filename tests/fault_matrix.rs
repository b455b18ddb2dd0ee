//! The fault matrix: every write and every barrier of a set of scenarios, failed and crashed
//! at, on the memory engine, with the contract checked after each.
//!
//! Scenarios: a new key; a replay; a retryable failure then a retry; a permanent failure (then
//! its replay); a multi-step run whose second step fails, then a retry; a removal (then a new
//! life); a sweep of expired records (then a new life); an expired life with steps claimed
//! again (its retirement); an orphan left by a power loss while `f` ran, taken over after a
//! reopen (under `Report`: `Interrupted`, then reconciled); `Periodic` mode with
//! `Store::flush`. Each runs under `OrphanPolicy::Rerun` and `OrphanPolicy::Report`.
//!
//! A dry run counts the writes and barriers a scenario makes. Then, for every write `i` and
//! every barrier `j`, the scenario runs on a fresh engine three times: with the fault failing
//! that one operation and the store going on (then a call on another key, the keys verified
//! in the same process, a clean close, and the keys verified again); with the fault failing
//! it and a power loss after the scenario (then a reopen and the keys verified); and with a
//! power loss at that point (then a reopen and the keys verified). Verifying a key is calling
//! it again (reconciling with `Rerun` on the call after `Interrupted`), then once more.
//!
//! A model of each key, fed only with what the public API returned, says what each call may
//! do; the checks (docs/design.md §1, §2, §4, §6, §9):
//! - an outcome that a call returned (run or replayed) in `Immediate` mode is replayed
//!   unchanged by every later call, across a power loss and reopen; in `Periodic` mode, once a
//!   `Store::flush` after it returned;
//! - `f` runs at most once per recorded outcome: it runs again only where no outcome can be
//!   durable, and over a run interrupted between its durable claim and its outcome only under
//!   `Rerun` (under `Report` the call gets `Interrupted`, and `Interrupted` only where a run
//!   can have been interrupted);
//! - `f` never runs once the engine is down; under `Report` a run whose claim could not be
//!   made durable never ran `f`, and every later claim continues the life of every claim under
//!   which `f` ran (its attempt number counts that run); under `Rerun`, whose claims make no
//!   durable point of their own (design §6), a power loss may forget the runs no durable
//!   point covered, and only those;
//! - a failed write or barrier reaches the caller as a typed `Error::Storage`, never as a
//!   panic or another error, and storage errors happen only when a fault is planned;
//! - a step that returned its value is never run again in the same life, and replays that
//!   value; a later life never replays it;
//! - after a failed (not crashed) operation the store keeps working: a call on another key
//!   runs and then replays.

mod common;

use common::START_MS;
use idemstore::{
    Durability, Error, ExecuteError, ManualClock, MemoryEngine, OrphanPolicy, StepError, Store,
};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
enum Fail {
    #[error("retryable failure")]
    Retryable,
    #[error("permanent failure {0}")]
    Permanent(u32),
}

/// What an operation does when it runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Does {
    Succeed,
    FailRetryable,
    FailPermanent,
    /// A power loss while it runs; it would have succeeded.
    PowerLoss,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    /// `execute_once` (through `call(..).permanent_if(..).run`).
    Run(&'static str, Does),
    /// `execute_steps` with steps "a" and "b"; `true`: step "b" fails (retryable).
    Steps(&'static str, bool),
    Remove(&'static str),
    Advance(Duration),
    Sweep,
    Flush,
    /// A power loss while `f` runs for this key (after its durable claim).
    RunThenPowerLoss(&'static str),
    /// Drops the store (after a power loss: the engine is down) and opens it again.
    Reopen,
    /// `execute_once` with `OrphanPolicy::Rerun` on the call: a caller that reconciled.
    Reconcile(&'static str),
}

struct Scenario {
    name: &'static str,
    periodic: bool,
    ttl: Duration,
    ops: Vec<Op>,
    /// What each op returns without faults (under `Rerun`).
    dry: Vec<&'static str>,
    /// ... under `Report`, where it differs.
    dry_report: Option<Vec<&'static str>>,
}

fn scenarios() -> Vec<Scenario> {
    use Does::*;
    use Op::*;
    let day = Duration::from_secs(24 * 3600);
    let immediate = |name, ops, dry| Scenario {
        name,
        periodic: false,
        ttl: day,
        ops,
        dry,
        dry_report: None,
    };
    vec![
        immediate("a new key", vec![Run("k1", Succeed)], vec!["ok"]),
        immediate(
            "a replay",
            vec![Run("k1", Succeed), Run("k1", Succeed)],
            vec!["ok", "replayed"],
        ),
        immediate(
            "a retryable failure, then a retry",
            vec![Run("k1", FailRetryable), Run("k1", Succeed)],
            vec!["retryable", "ok"],
        ),
        immediate(
            "a permanent failure, then its replay",
            vec![Run("k1", FailPermanent), Run("k1", Succeed)],
            vec!["permanent", "replayed permanent"],
        ),
        immediate(
            "two steps, the second fails, then a retry",
            vec![Steps("k1", true), Steps("k1", false)],
            vec!["retryable", "ok"],
        ),
        immediate(
            "a removal, then a new life",
            vec![Run("k1", Succeed), Remove("k1"), Run("k1", Succeed)],
            vec!["ok", "removed", "ok"],
        ),
        Scenario {
            name: "a sweep of expired records, then a new life",
            periodic: false,
            ttl: Duration::from_secs(10),
            ops: vec![
                Run("k1", Succeed),
                Steps("k2", false),
                Advance(Duration::from_secs(11)),
                Sweep,
                Run("k1", Succeed),
            ],
            dry: vec!["ok", "ok", "advanced", "swept 2", "ok"],
            dry_report: None,
        },
        Scenario {
            name: "an expired life with steps, then a new life",
            periodic: false,
            ttl: Duration::from_secs(10),
            ops: vec![
                Steps("k1", true),
                Advance(Duration::from_secs(11)),
                Steps("k1", false),
            ],
            dry: vec!["retryable", "advanced", "ok"],
            dry_report: None,
        },
        Scenario {
            name: "an orphan of a power loss, taken over",
            periodic: false,
            ttl: day,
            ops: vec![
                RunThenPowerLoss("k1"),
                Reopen,
                Run("k1", Succeed),
                Reconcile("k1"),
            ],
            dry: vec!["storage", "reopened", "ok", "replayed"],
            dry_report: Some(vec!["storage", "reopened", "interrupted", "ok"]),
        },
        Scenario {
            name: "Periodic mode with Store::flush",
            periodic: true,
            ttl: day,
            ops: vec![
                Run("k1", Succeed),
                Run("k2", Succeed),
                Flush,
                Run("k3", Succeed),
                Run("k1", Succeed),
                Flush,
            ],
            dry: vec!["ok", "ok", "flushed", "ok", "replayed", "flushed"],
            dry_report: None,
        },
    ]
}

/// A recorded outcome, as a caller sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Recorded {
    Value(u32),
    Permanent(u32),
}

/// What one op returned.
#[derive(Debug, Clone, PartialEq)]
enum Reply {
    /// An outcome just produced by `f`; the record's attempts (0: not visible).
    Fresh(Recorded, u32),
    Replayed(Recorded, u32),
    Retryable,
    Storage,
    Interrupted(u32),
    Removed(bool),
    Swept(u64),
    Flushed,
    Advanced,
    Reopened,
    Unexpected(String),
}

impl Reply {
    fn kind(&self) -> String {
        match self {
            Reply::Fresh(Recorded::Value(_), _) => "ok".into(),
            Reply::Fresh(Recorded::Permanent(_), _) => "permanent".into(),
            Reply::Replayed(Recorded::Value(_), _) => "replayed".into(),
            Reply::Replayed(Recorded::Permanent(_), _) => "replayed permanent".into(),
            Reply::Retryable => "retryable".into(),
            Reply::Storage => "storage".into(),
            Reply::Interrupted(_) => "interrupted".into(),
            Reply::Removed(_) => "removed".into(),
            Reply::Swept(n) => format!("swept {n}"),
            Reply::Flushed => "flushed".into(),
            Reply::Advanced => "advanced".into(),
            Reply::Reopened => "reopened".into(),
            Reply::Unexpected(e) => format!("unexpected {e}"),
        }
    }
}

/// What the public API has told us about one key, and so what its next call may do.
#[derive(Debug, Clone, Default)]
struct KeyModel {
    /// Outcomes a later call may replay.
    replayable: Vec<Recorded>,
    /// A call returned this key's outcome: every later call replays it (the only entry of
    /// `replayable`), and `f` never runs again.
    must_replay: bool,
    /// `f` ran under a claim whose outcome may not be recorded: an orphan may be left.
    orphan: bool,
    /// ... or a retryable record (a step's store error is recorded as one).
    may_be_retryable: bool,
    /// A lower bound of the attempts of the key's life: every run of `f` is a claim (attempt
    /// + 1), so a later claim of the same life has more.
    attempts: u32,
    /// The part of `attempts` a power loss cannot take back: runs whose claim a durable point
    /// covered (the claim's own under `Report`; an outcome's or a step's). Under `Rerun` a
    /// claim makes no durable point of its own (design §6), so a power loss may forget the
    /// runs after these.
    durable_attempts: u32,
    /// The value step "a" returned in this life: recorded, never run again.
    step_a: Option<u32>,
}

/// Where the planned fault hits.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Point {
    Write(u64),
    Barrier(u64),
}

/// What the fault does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    /// Fails the operation; the store goes on.
    Fail,
    /// Fails the operation; a power loss after the scenario.
    FailThenCrash,
    /// A power loss at that point.
    CrashAt,
}

/// One run of one scenario: the engine, the model and what went wrong.
struct World<'s> {
    scenario: &'s Scenario,
    policy: OrphanPolicy,
    engine: MemoryEngine,
    clock: ManualClock,
    models: BTreeMap<&'static str, KeyModel>,
    /// `Periodic` mode: the models as of the last successful flush (what a crash keeps).
    flushed: BTreeMap<&'static str, KeyModel>,
    next_value: u32,
    /// Values step "a" returned in lives that are over: a later life never replays them.
    old_lives_steps: Vec<u32>,
    fault_planned: bool,
    /// The op running now makes its own storage error (a power loss it causes).
    power_loss_here: bool,
    crash_planned: bool,
    /// A planned crash hit: the engine is down until reopened.
    down: bool,
    storage_errors: u32,
    label: String,
    violations: Vec<String>,
}

impl<'s> World<'s> {
    fn new(scenario: &'s Scenario, policy: OrphanPolicy, label: String) -> Self {
        Self {
            scenario,
            policy,
            engine: MemoryEngine::new(),
            clock: ManualClock::new(START_MS),
            models: BTreeMap::new(),
            flushed: BTreeMap::new(),
            next_value: 0,
            old_lives_steps: Vec::new(),
            fault_planned: false,
            power_loss_here: false,
            crash_planned: false,
            down: false,
            storage_errors: 0,
            label,
            violations: Vec::new(),
        }
    }

    fn open(&self) -> Store<MemoryEngine> {
        let durability = match self.scenario.periodic {
            true => Durability::Periodic(Duration::from_secs(3600)),
            false => Durability::Immediate,
        };
        let builder = Store::builder("memory")
            .clock(self.clock.clone())
            .sweep_interval(None)
            .default_ttl(self.scenario.ttl)
            .orphan_policy(self.policy)
            .durability(durability);
        self.engine.open(builder).expect("open a memory store")
    }

    fn violation(&mut self, what: String) {
        self.violations.push(format!("{}: {what}", self.label));
    }

    fn fresh(&mut self) -> u32 {
        self.next_value += 1;
        self.next_value
    }

    /// The keys of the scenario and whether each runs with steps.
    fn keys(&self) -> BTreeMap<&'static str, bool> {
        let mut keys = BTreeMap::new();
        for op in &self.scenario.ops {
            match *op {
                Op::Run(k, _) | Op::Remove(k) | Op::RunThenPowerLoss(k) | Op::Reconcile(k) => {
                    keys.entry(k).or_insert(false);
                }
                Op::Steps(k, _) => {
                    keys.insert(k, true);
                }
                _ => {}
            }
        }
        keys
    }

    /// A power loss as the model sees it (the engine's own crash is done by the caller).
    fn crash_model(&mut self) {
        if self.scenario.periodic {
            self.models = self.flushed.clone();
        }
        if self.policy == OrphanPolicy::Rerun {
            for m in self.models.values_mut() {
                m.attempts = m.durable_attempts;
            }
        }
    }

    /// Plays one op of a scenario; `Reopen` replaces the store.
    fn play(&mut self, store: &mut Option<Store<MemoryEngine>>, op: Op) -> Reply {
        match op {
            Op::Reopen => {
                let engine_down = self.down;
                // The old store goes first (after a power loss its final flush fails), as
                // its process would.
                drop(store.take());
                *store = Some(self.open_after(engine_down));
                Reply::Reopened
            }
            op => {
                let open = store.as_ref().expect("a store is open");
                match op {
                    Op::RunThenPowerLoss(key) => self.run(open, key, Does::PowerLoss, false),
                    op => self.apply(open, op, false),
                }
            }
        }
    }

    /// Opens a new store; `after_power_loss`: the engine crashed, and the model follows.
    fn open_after(&mut self, after_power_loss: bool) -> Store<MemoryEngine> {
        if after_power_loss {
            self.crash_model();
        }
        self.down = false;
        self.open()
    }

    fn apply(&mut self, store: &Store<MemoryEngine>, op: Op, reconcile: bool) -> Reply {
        match op {
            Op::Run(key, does) => self.run(store, key, does, reconcile),
            Op::Reconcile(key) => self.run(store, key, Does::Succeed, true),
            Op::RunThenPowerLoss(_) | Op::Reopen => unreachable!("played by `play`"),
            Op::Steps(key, second_fails) => self.steps(store, key, second_fails, reconcile),
            Op::Remove(key) => self.remove(store, key),
            Op::Advance(by) => {
                self.clock.advance(by);
                // Every record of these scenarios expires: each key's life is over.
                let ended = self.models.values().chain(self.flushed.values());
                let steps: Vec<u32> = ended.filter_map(|m| m.step_a).collect();
                self.old_lives_steps.extend(steps);
                self.models.clear();
                self.flushed.clear();
                Reply::Advanced
            }
            Op::Sweep => {
                let r = catch_unwind(AssertUnwindSafe(|| store.sweep_now()));
                let reply = match r {
                    Ok(Ok(n)) => Reply::Swept(n),
                    other => self.store_failure(other.map(|r| r.map(|_| ()))),
                };
                self.check_storage(&reply);
                reply
            }
            Op::Flush => {
                let r = catch_unwind(AssertUnwindSafe(|| store.flush()));
                let reply = match r {
                    Ok(Ok(())) => Reply::Flushed,
                    other => self.store_failure(other),
                };
                self.check_storage(&reply);
                if reply == Reply::Flushed && self.scenario.periodic {
                    self.flushed = self.models.clone();
                }
                reply
            }
        }
    }

    /// Classifies a failed store call that is not an execute.
    fn store_failure(&self, r: std::thread::Result<Result<(), Error>>) -> Reply {
        match r {
            Err(_) => Reply::Unexpected("a panic".into()),
            Ok(Err(Error::Storage(_))) => Reply::Storage,
            Ok(Err(e)) => Reply::Unexpected(format!("{e:?}")),
            Ok(Ok(())) => Reply::Unexpected("no failure".into()),
        }
    }

    fn check_storage(&mut self, reply: &Reply) {
        match reply {
            Reply::Storage => {
                if self.power_loss_here {
                    return;
                }
                self.storage_errors += 1;
                if !self.fault_planned {
                    self.violation("a storage error with no fault planned".into());
                }
                if self.crash_planned {
                    self.down = true;
                }
            }
            Reply::Unexpected(e) => self.violation(format!("unexpected reply: {e}")),
            _ => {}
        }
    }

    fn run(
        &mut self,
        store: &Store<MemoryEngine>,
        key: &'static str,
        does: Does,
        reconcile: bool,
    ) -> Reply {
        let value = self.fresh();
        let ran = Cell::new(false);
        let engine = self.engine.clone();
        let r = catch_unwind(AssertUnwindSafe(|| {
            let call = store
                .call(key)
                .permanent_if(|e: &Fail| matches!(e, Fail::Permanent(_)));
            let call = match reconcile {
                true => call.orphan_policy(OrphanPolicy::Rerun),
                false => call,
            };
            call.run(|| {
                ran.set(true);
                match does {
                    Does::Succeed => Ok(value),
                    Does::PowerLoss => {
                        engine.crash();
                        Ok(value)
                    }
                    Does::FailRetryable => Err(Fail::Retryable),
                    Does::FailPermanent => Err(Fail::Permanent(value)),
                }
            })
        }));
        let reply = match r {
            Err(_) => Reply::Unexpected("a panic".into()),
            Ok(Ok(out)) => match out.is_replayed() {
                true => Reply::Replayed(Recorded::Value(*out), out.record().attempts),
                false => Reply::Fresh(Recorded::Value(*out), out.record().attempts),
            },
            Ok(Err(ExecuteError::Operation { error, replayed })) => match (error, replayed) {
                (Fail::Permanent(v), true) => Reply::Replayed(Recorded::Permanent(v), 0),
                (Fail::Permanent(v), false) => Reply::Fresh(Recorded::Permanent(v), 0),
                (Fail::Retryable, false) => Reply::Retryable,
                (Fail::Retryable, true) => Reply::Unexpected("a replayed retryable error".into()),
            },
            Ok(Err(ExecuteError::Store(e))) => execute_store_error(e),
        };
        let produced = match does {
            Does::Succeed | Does::PowerLoss => Some(Recorded::Value(value)),
            Does::FailPermanent => Some(Recorded::Permanent(value)),
            Does::FailRetryable => None,
        };
        // A power loss that `f` caused makes its own storage error.
        self.power_loss_here = does == Does::PowerLoss && ran.get();
        let ran = ran.get().then_some(produced);
        self.settle(key, reply.clone(), ran, None, reconcile);
        if std::mem::take(&mut self.power_loss_here) {
            self.down = true;
        }
        reply
    }

    fn steps(
        &mut self,
        store: &Store<MemoryEngine>,
        key: &'static str,
        second_fails: bool,
        reconcile: bool,
    ) -> Reply {
        let (a_value, b_value, value) = (self.fresh(), self.fresh(), self.fresh());
        let (attempt, a_ran, a_got, produced) = (
            Cell::new(None),
            Cell::new(false),
            Cell::new(None),
            Cell::new(None),
        );
        let r = catch_unwind(AssertUnwindSafe(|| {
            let call = store.call(key);
            let call = match reconcile {
                true => call.orphan_policy(OrphanPolicy::Rerun),
                false => call,
            };
            call.run_steps(|ctx| {
                attempt.set(Some(ctx.attempt()));
                let a = ctx.step("a", || {
                    a_ran.set(true);
                    Ok::<_, Fail>(a_value)
                })?;
                a_got.set(Some(a));
                ctx.step("b", || match second_fails {
                    true => Err(Fail::Retryable),
                    false => Ok(b_value),
                })?;
                produced.set(Some(Recorded::Value(value)));
                Ok::<_, StepError<Fail>>(value)
            })
        }));
        let reply = match r {
            Err(_) => Reply::Unexpected("a panic".into()),
            Ok(Ok(out)) => match out.is_replayed() {
                true => Reply::Replayed(Recorded::Value(*out), out.record().attempts),
                false => Reply::Fresh(Recorded::Value(*out), out.record().attempts),
            },
            Ok(Err(ExecuteError::Operation {
                error: StepError::Failed(Fail::Retryable),
                replayed: false,
            })) => Reply::Retryable,
            Ok(Err(ExecuteError::Operation { error, replayed })) => {
                Reply::Unexpected(format!("operation error {error:?} (replayed {replayed})"))
            }
            Ok(Err(ExecuteError::Store(e))) => execute_store_error(e),
        };
        let model = self.models.get(key).cloned().unwrap_or_default();
        if a_ran.get() {
            if let Some(recorded) = model.step_a {
                self.violation(format!(
                    "{key}: step a ran again in the life where it returned {recorded}"
                ));
            }
        }
        if let Some(got) = a_got.get().filter(|_| !a_ran.get()) {
            if self.old_lives_steps.contains(&got) {
                self.violation(format!(
                    "{key}: step a replayed {got}, recorded in a life that is over"
                ));
            }
        }
        if let (Some(got), Some(recorded)) = (a_got.get(), model.step_a) {
            if got != recorded {
                self.violation(format!(
                    "{key}: step a gave {got}, but it returned {recorded} before in this life"
                ));
            }
        }
        let ran = attempt.get().map(|_| produced.get());
        self.settle(key, reply.clone(), ran, attempt.get(), reconcile);
        if let Some(got) = a_got.get() {
            if let Some(m) = self.models.get_mut(key) {
                m.step_a = Some(got);
            }
        }
        reply
    }

    fn remove(&mut self, store: &Store<MemoryEngine>, key: &'static str) -> Reply {
        let r = catch_unwind(AssertUnwindSafe(|| store.remove(key)));
        let reply = match r {
            Ok(Ok(removed)) => Reply::Removed(removed),
            other => self.store_failure(other.map(|r| r.map(|_| ()))),
        };
        self.check_storage(&reply);
        let model = self.models.get(key).cloned().unwrap_or_default();
        let next = match reply {
            // Removed durably (Immediate; a crash in Periodic mode reverts to the flush).
            Reply::Removed(_) => {
                self.old_lives_steps.extend(model.step_a);
                KeyModel::default()
            }
            // Removed or not: what was replayable may be, and `f` may run in a new life.
            _ => KeyModel {
                must_replay: false,
                attempts: 0,
                step_a: None,
                ..model
            },
        };
        self.models.insert(key, next);
        reply
    }

    /// Checks an execute's reply against the key's model, and updates the model.
    /// `ran`: `f` ran, producing this outcome (None: it failed retryably, or a step failed);
    /// `attempt`: the attempt it saw, when visible.
    fn settle(
        &mut self,
        key: &'static str,
        reply: Reply,
        ran: Option<Option<Recorded>>,
        attempt: Option<u32>,
        reconcile: bool,
    ) {
        let m = self.models.get(key).cloned().unwrap_or_default();
        let policy = match reconcile {
            true => OrphanPolicy::Rerun,
            false => self.policy,
        };
        if ran.is_some() {
            if self.down {
                self.violation(format!(
                    "{key}: f ran on a crashed engine, with no durable claim"
                ));
            }
            if m.must_replay {
                self.violation(format!(
                    "{key}: f ran again although a call returned its outcome {:?}",
                    m.replayable
                ));
            } else if m.orphan && !m.may_be_retryable && policy == OrphanPolicy::Report {
                self.violation(format!(
                    "{key}: f ran over an interrupted run under Report instead of Interrupted"
                ));
            }
            if let Some(a) = attempt {
                if a <= m.attempts {
                    self.violation(format!(
                        "{key}: a run at attempt {a} does not continue a life that had {} \
                         runs: an earlier claim under which f ran was not durable",
                        m.attempts
                    ));
                }
            }
        }
        let bound = m.attempts;
        let next = match &reply {
            Reply::Fresh(r, attempts) => {
                match ran {
                    None => self.violation(format!("{key}: a fresh outcome but f did not run")),
                    Some(produced) if produced != Some(*r) => self.violation(format!(
                        "{key}: returned {r:?}, but f produced {produced:?}"
                    )),
                    Some(_) => {}
                }
                if *attempts != 0 && *attempts <= bound {
                    self.violation(format!(
                        "{key}: recorded at attempt {attempts}, but the life had {bound} runs: \
                         an earlier claim under which f ran was not durable"
                    ));
                }
                let attempts = (*attempts).max(bound + 1);
                KeyModel {
                    replayable: vec![*r],
                    must_replay: true,
                    attempts,
                    durable_attempts: attempts,
                    step_a: m.step_a,
                    ..KeyModel::default()
                }
            }
            Reply::Replayed(r, attempts) => {
                if ran.is_some() {
                    self.violation(format!("{key}: replayed, but f ran"));
                }
                if !m.replayable.contains(r) {
                    self.violation(format!(
                        "{key}: replayed {r:?}, which no run recorded (may replay: {:?})",
                        m.replayable
                    ));
                }
                let attempts = (*attempts).max(bound);
                KeyModel {
                    replayable: vec![*r],
                    must_replay: true,
                    attempts,
                    durable_attempts: attempts,
                    step_a: m.step_a,
                    ..KeyModel::default()
                }
            }
            Reply::Retryable => {
                if ran.is_none() {
                    self.violation(format!("{key}: a fresh retryable error but f did not run"));
                }
                KeyModel {
                    attempts: bound + 1,
                    durable_attempts: bound + 1,
                    step_a: m.step_a,
                    ..KeyModel::default()
                }
            }
            Reply::Interrupted(attempts) => {
                if ran.is_some() {
                    self.violation(format!("{key}: Interrupted, but f ran"));
                }
                if !(m.orphan && policy == OrphanPolicy::Report) {
                    self.violation(format!(
                        "{key}: Interrupted (under {policy:?}), but no run can have been \
                         interrupted (model {m:?})"
                    ));
                }
                if *attempts < bound {
                    self.violation(format!(
                        "{key}: Interrupted at attempt {attempts}, the life had {bound} runs"
                    ));
                }
                m.clone()
            }
            Reply::Storage => {
                self.check_storage(&reply);
                match ran {
                    // The claim was written (durable under Report); the outcome may or may not
                    // be.
                    Some(produced) => KeyModel {
                        replayable: produced.into_iter().collect(),
                        must_replay: false,
                        orphan: true,
                        may_be_retryable: produced.is_none(),
                        attempts: bound + 1,
                        durable_attempts: match self.policy {
                            OrphanPolicy::Report => bound + 1,
                            _ => m.durable_attempts,
                        },
                        step_a: m.step_a,
                    },
                    // Nothing ran: nothing changed.
                    None => m.clone(),
                }
            }
            other => {
                self.violation(format!("{key}: unexpected reply {other:?}"));
                m.clone()
            }
        };
        self.models.insert(key, next);
    }

    /// Calls every key of the scenario again, reconciling an `Interrupted` one with `Rerun`,
    /// then once more: each must settle on an outcome and then replay it.
    fn verify(&mut self, store: &Store<MemoryEngine>, when: &str) {
        for (key, with_steps) in self.keys() {
            let op = match with_steps {
                true => Op::Steps(key, false),
                false => Op::Run(key, Does::Succeed),
            };
            let mut reply = self.apply(store, op, false);
            if let Reply::Interrupted(_) = reply {
                reply = self.apply(store, op, true);
                if !matches!(reply, Reply::Fresh(..)) {
                    self.violation(format!(
                        "{when}: {key}: reconciled with Rerun after Interrupted, got {reply:?}"
                    ));
                }
            }
            let settled = match reply {
                Reply::Fresh(r, _) | Reply::Replayed(r, _) => r,
                other => {
                    self.violation(format!("{when}: {key} settles on no outcome: {other:?}"));
                    continue;
                }
            };
            match self.apply(store, op, false) {
                Reply::Replayed(r, _) if r == settled => {}
                other => self.violation(format!(
                    "{when}: {key}: settled on {settled:?}, then got {other:?}"
                )),
            }
        }
    }
}

fn execute_store_error(e: Error) -> Reply {
    match e {
        Error::Storage(_) => Reply::Storage,
        Error::Interrupted { attempts, .. } => Reply::Interrupted(attempts),
        other => Reply::Unexpected(format!("{other:?}")),
    }
}

/// Runs `scenario` without faults under `policy`; returns the writes and barriers it makes.
fn dry_run(scenario: &Scenario, policy: OrphanPolicy) -> (u64, u64) {
    let label = format!("[{} | {policy:?} | dry run]", scenario.name);
    let mut world = World::new(scenario, policy, label);
    let mut store = Some(world.open());
    let (writes, barriers) = (world.engine.writes(), world.engine.barriers());
    let mut kinds = Vec::new();
    for &op in &scenario.ops {
        kinds.push(world.play(&mut store, op).kind());
    }
    let counts = (
        world.engine.writes() - writes,
        world.engine.barriers() - barriers,
    );
    let expected = match (&scenario.dry_report, policy) {
        (Some(report), OrphanPolicy::Report) => report,
        _ => &scenario.dry,
    };
    assert_eq!(
        &kinds, expected,
        "{}: the dry run under {policy:?}",
        scenario.name
    );
    let store = store.expect("a store is open");
    world.verify(&store, "dry run");
    drop(store);
    let store = world.open();
    world.verify(&store, "dry run, reopened");
    assert!(
        world.violations.is_empty(),
        "the dry run breaks the contract: {:#?}",
        world.violations
    );
    counts
}

/// Runs `scenario` once with a fault at `point`, and checks the contract; returns the
/// violations.
fn run_point(
    scenario: &Scenario,
    policy: OrphanPolicy,
    point: Point,
    variant: Variant,
) -> Vec<String> {
    let label = format!("[{} | {policy:?} | {point:?} | {variant:?}]", scenario.name);
    let mut world = World::new(scenario, policy, label);
    let mut store = Some(world.open());
    world.fault_planned = true;
    world.crash_planned = variant == Variant::CrashAt;
    match (point, variant) {
        (Point::Write(i), Variant::CrashAt) => world.engine.crash_at_nth_write(i),
        (Point::Barrier(j), Variant::CrashAt) => world.engine.crash_at_nth_barrier(j),
        (Point::Write(i), _) => world.engine.fail_nth_write(i),
        (Point::Barrier(j), _) => world.engine.fail_nth_barrier(j),
    }
    for &op in &scenario.ops {
        world.play(&mut store, op);
    }
    let store = store.expect("a store is open");
    if world.storage_errors == 0 {
        world.violation("the planned fault reached no caller as Error::Storage".into());
    }
    world.fault_planned = false;
    match variant {
        Variant::Fail => {
            // The store keeps working: another key runs, then replays.
            match world.apply(&store, Op::Run("after-fault", Does::Succeed), false) {
                Reply::Fresh(..) => {}
                other => world.violation(format!("the store stopped working: {other:?}")),
            }
            world.verify(&store, "in the same process");
            if let Err(e) = store.close() {
                world.violation(format!("a clean close failed: {e}"));
            }
            let store = world.open();
            world.verify(&store, "after a clean close");
        }
        Variant::FailThenCrash | Variant::CrashAt => {
            world.engine.crash();
            drop(store);
            let store = world.open_after(true);
            world.verify(&store, "after a power loss");
        }
    }
    world.violations
}

#[test]
fn every_write_and_barrier_of_every_scenario_failed_and_crashed_keeps_the_contract() {
    let started = Instant::now();
    let scenarios = scenarios();
    let mut violations = Vec::new();
    let (mut points, mut runs) = (0, 0);
    eprintln!("fault matrix:");
    for scenario in &scenarios {
        let mut scenario_points = Vec::new();
        let mut scenario_runs = 0;
        for policy in [OrphanPolicy::Rerun, OrphanPolicy::Report] {
            let (writes, barriers) = dry_run(scenario, policy);
            assert!(
                writes >= 2,
                "{} under {policy:?}: only {writes} write points: the matrix would be trivial",
                scenario.name
            );
            scenario_points.push((writes, barriers));
            let at = (1..=writes)
                .map(Point::Write)
                .chain((1..=barriers).map(Point::Barrier));
            for point in at {
                for variant in [Variant::Fail, Variant::FailThenCrash, Variant::CrashAt] {
                    violations.extend(run_point(scenario, policy, point, variant));
                    scenario_runs += 1;
                }
            }
        }
        let described: Vec<String> = [OrphanPolicy::Rerun, OrphanPolicy::Report]
            .iter()
            .zip(&scenario_points)
            .map(|(policy, (w, b))| format!("{policy:?} {w:>2} writes + {b:>2} barriers"))
            .collect();
        let scenario_total: u64 = scenario_points.iter().map(|(w, b)| w + b).sum();
        eprintln!(
            "  {:<45} {} = {scenario_total:>2} points × 3 fault kinds = {scenario_runs} runs",
            scenario.name,
            described.join(", "),
        );
        points += scenario_total;
        runs += scenario_runs;
    }
    eprintln!(
        "  {} scenarios × {points} fault points in all: {runs} runs in {:?}",
        scenarios.len(),
        started.elapsed()
    );
    assert!(
        points >= 80,
        "the matrix is trivially small: {points} points"
    );
    if !violations.is_empty() {
        // One line per distinct kind of violation (labels stripped), with its first example.
        let mut kinds: BTreeMap<String, (usize, &String)> = BTreeMap::new();
        for v in &violations {
            let kind = v.split_once("]: ").map_or(v.as_str(), |(_, k)| k);
            let kind: String = kind.chars().filter(|c| !c.is_ascii_digit()).collect();
            kinds.entry(kind).or_insert((0, v)).0 += 1;
        }
        let report: Vec<String> = kinds
            .values()
            .map(|(n, first)| format!("{n} × e.g. {first}"))
            .collect();
        panic!(
            "{} contract violations in {} runs:\n{}",
            violations.len(),
            runs,
            report.join("\n")
        );
    }
}

/// §1, §6 and §11.3: a replay never returns an outcome that is not durable. An outcome whose
/// barrier failed is in the engine but not on stable storage; a replay of it must first make
/// it durable (or fail). The matrix finds this broken up to 01ee705 (the replay returned the
/// value, a power loss took it, and `f` ran again); ad9ad86 keeps it.
#[test]
fn a_replay_after_a_failed_outcome_barrier_survives_a_power_loss() {
    let engine = MemoryEngine::new();
    let open = || {
        let builder = Store::builder("memory").sweep_interval(None);
        engine.open(builder).expect("open a memory store")
    };
    let store = open();
    engine.fail_nth_barrier(1); // the outcome's (under Rerun the claim makes none)
    let first = store.execute_once("k", || Ok::<_, Fail>(1u32));
    assert!(
        matches!(first, Err(ExecuteError::Store(Error::Storage(_)))),
        "{first:?}"
    );
    let replayed = store.execute_once("k", || Ok::<_, Fail>(2u32));
    let replayed = match replayed {
        Ok(out) => *out,
        // Refusing to replay what it cannot make durable keeps the promise too.
        Err(ExecuteError::Store(Error::Storage(_))) => return,
        Err(e) => panic!("{e:?}"),
    };
    assert_eq!(replayed, 1);
    engine.crash();
    drop(store);
    let store = open();
    let runs = Cell::new(0);
    let after = store.execute_once("k", || {
        runs.set(runs.get() + 1);
        Ok::<_, Fail>(3u32)
    });
    let after = after.expect("the replayed outcome is durable");
    assert_eq!(
        (*after, after.is_replayed(), runs.get()),
        (1, true, 0),
        "a caller was handed 1 as the recorded outcome; after a power loss it must still be"
    );
}
