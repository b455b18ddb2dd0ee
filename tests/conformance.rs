//! The conformance suite: the contract of docs/design.md stated once, through the public API
//! only, and run on every engine (sled on real temp dirs, and the in-memory engine).
//!
//! Covered: every row of the contract table (§2) — absent, expired and retryable records are
//! claimed and run; Completed and FailedPermanent replay (same or no fingerprint) without
//! running; a different fingerprint is refused in every live state; a running call is waited
//! for, then replayed, or `InProgress` after the wait timeout; orphans after a reopen under
//! `Rerun` and `Report`; a panic leaves the record retryable and wakes waiters; unstorable
//! results; bad keys; outcomes that no longer decode. The step rules (§4): replay by index,
//! ignored step errors, `StepSequenceChanged`, unstorable steps never run again, no step runs
//! after a store error, a new life never sees an old life's steps. Expiry (§7): expired
//! records read as absent, a sweep removes them for good, a sweep never removes a running
//! call's record. Fencing: a holder whose record was removed (or taken over) gets
//! `OutcomeNotRecorded` from its next step and from its final write, and the record that
//! replaced its own is untouched.
//!
//! Each test body is written once in `conformance!` and instantiated per engine with a small
//! harness type (the engine trait is crate-private, so tests cannot be generic over it). A
//! harness opens a store with a builder tweak on a shared `ManualClock`, reopens after a
//! clean close, leaves an orphan (a durable Pending record whose process died: a killed child
//! process for sled, a power loss mid-operation for the memory engine), and opens a second
//! store on the same data where the engine allows it, as another process would. A future
//! engine joins the suite with one more harness and one more `conformance!` line.

mod common;

use common::pg::{pg_url, PgSchema};
use common::{store_error, wait_until, ChildProcess, Scratch, PATIENCE, START_MS};
use idemstore::{
    Clock, Error, ExecuteError, Fingerprint, ManualClock, MemoryEngine, OrphanPolicy, PgOptions,
    PgStore, RecordState, SledEngine, StepError, Store, StoreBuilder,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Barrier;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Shared vocabulary (no store in sight: these helpers need no engine type).

/// The operation's error: retryable unless the call declares `Permanent` permanent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
enum Fail {
    #[error("retryable failure")]
    Retryable,
    #[error("permanent failure: {0}")]
    Permanent(String),
}

fn is_permanent(e: &Fail) -> bool {
    matches!(e, Fail::Permanent(_))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: String,
    cents: u64,
}

fn receipt(n: u32) -> Receipt {
    Receipt {
        id: format!("ch_{n}"),
        cents: 100 * u64::from(n),
    }
}

/// The operation error of a call that must fail with one, and whether it was replayed.
fn op_err<T: std::fmt::Debug, E: std::fmt::Debug>(r: Result<T, ExecuteError<E>>) -> (E, bool) {
    match r {
        Err(ExecuteError::Operation { error, replayed }) => (error, replayed),
        other => panic!("expected the operation's error, got {other:?}"),
    }
}

fn bump(counter: &AtomicU32) -> u32 {
    counter.fetch_add(1, Ordering::SeqCst) + 1
}

fn count(counter: &AtomicU32) -> u32 {
    counter.load(Ordering::SeqCst)
}

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The fingerprint every orphan a harness leaves carries.
const ORPHAN_FP: &str = "orphan-request";
/// The value of step "a" of an orphan left with a step.
const ORPHAN_STEP_VALUE: u32 = 7;

fn fp(s: &str) -> Fingerprint {
    Fingerprint::of_bytes(s.as_bytes())
}

/// A result whose `Serialize` fails.
#[derive(Debug)]
struct SerializeFails;

impl Serialize for SerializeFails {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this value cannot be serialized"))
    }
}

impl<'de> Deserialize<'de> for SerializeFails {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d).map(|()| SerializeFails)
    }
}

/// A result whose `Serialize` panics.
#[derive(Debug)]
struct SerializePanics;

impl Serialize for SerializePanics {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("serializer bug");
    }
}

impl<'de> Deserialize<'de> for SerializePanics {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d).map(|()| SerializePanics)
    }
}

// ---------------------------------------------------------------------------------------
// Harnesses: one per engine.

/// sled on a real temp dir.
struct SledHarness {
    scratch: Scratch,
}

impl SledHarness {
    fn new() -> Option<Self> {
        Some(Self {
            scratch: Scratch::new(),
        })
    }

    fn clock(&self) -> &ManualClock {
        &self.scratch.clock
    }

    fn open(&self) -> Store<SledEngine> {
        self.open_with(|b| b)
    }

    /// Opens with the suite's settings (the shared clock, no background sweeper) and `tweak`.
    fn open_with(&self, tweak: impl FnOnce(StoreBuilder) -> StoreBuilder) -> Store<SledEngine> {
        tweak(self.scratch.builder())
            .open()
            .expect("open a sled store")
    }

    /// Closes `store` cleanly and opens the same data again with the default settings.
    fn reopen(&self, store: Store<SledEngine>) -> Store<SledEngine> {
        store.close().expect("clean close");
        self.open()
    }

    /// With no store open: leaves `key` Pending with a durable claim, fingerprint
    /// [`ORPHAN_FP`], whose process died while its operation ran (after recording step "a"
    /// = [`ORPHAN_STEP_VALUE`] when `with_step`): a child process killed with SIGKILL.
    fn leave_orphan(&self, key: &str, with_step: bool) {
        let clock = self.scratch.clock.now_millis().to_string();
        let mode = if with_step { "step" } else { "plain" };
        let path = self.scratch.path();
        let mut child = ChildProcess::spawn_test(
            "orphan_child",
            &[
                (ORPHAN_PATH_VAR, path.as_os_str()),
                (ORPHAN_KEY_VAR, key.as_ref()),
                (ORPHAN_MODE_VAR, mode.as_ref()),
                (ORPHAN_CLOCK_VAR, clock.as_ref()),
            ],
        )
        .labelled(format!("orphan child ({mode})"));
        child.wait_for("RUNNING");
        child.kill();
    }

    /// A second store on the same data while `_open` is open, as another process would open
    /// it. sled allows one process per database: the open is refused with `Locked`, so no
    /// other life of a key can begin while a holder runs, and there is nothing more to test.
    fn another_process(&self, _open: &Store<SledEngine>) -> Option<Store<SledEngine>> {
        match self.scratch.builder().open() {
            Err(Error::Locked { .. }) => None,
            other => panic!("a second sled store on one database must be Locked, got {other:?}"),
        }
    }

    /// Makes the claims `store`'s calls hold look dead to other processes: a holder in one
    /// process is never seen from another one here, so nothing to do.
    fn lapse(&self, _store: &Store<SledEngine>) {}
}

/// The in-memory engine (fault injection, power loss on demand).
struct MemoryHarness {
    engine: MemoryEngine,
    clock: ManualClock,
}

impl MemoryHarness {
    fn new() -> Option<Self> {
        Some(Self {
            engine: MemoryEngine::new(),
            clock: ManualClock::new(START_MS),
        })
    }

    fn clock(&self) -> &ManualClock {
        &self.clock
    }

    fn open(&self) -> Store<MemoryEngine> {
        self.open_with(|b| b)
    }

    fn open_with(&self, tweak: impl FnOnce(StoreBuilder) -> StoreBuilder) -> Store<MemoryEngine> {
        let builder = Store::builder("memory")
            .clock(self.clock.clone())
            .sweep_interval(None);
        self.engine
            .open(tweak(builder))
            .expect("open a memory store")
    }

    fn reopen(&self, store: Store<MemoryEngine>) -> Store<MemoryEngine> {
        store.close().expect("clean close");
        self.open()
    }

    /// As [`SledHarness::leave_orphan`]: a power loss while the operation runs (after its
    /// durable claim, and its durable step "a" when `with_step`).
    fn leave_orphan(&self, key: &str, with_step: bool) {
        let store = self.open();
        let engine = self.engine.clone();
        let e = match with_step {
            false => store_error(orphan_call(&store, key).run(|| {
                engine.crash();
                Ok::<u32, Fail>(0)
            })),
            true => store_error(orphan_call(&store, key).run_steps(|ctx| {
                ctx.step("a", || Ok::<_, Fail>(ORPHAN_STEP_VALUE))?;
                engine.crash();
                Ok::<u32, StepError<Fail>>(0)
            })),
        };
        assert!(
            matches!(e, Error::Storage(_)),
            "the crashed engine fails the outcome write: {e}"
        );
        drop(store);
    }

    /// A second store on the same data, as another process sharing the database would be.
    fn another_process(&self, _open: &Store<MemoryEngine>) -> Option<Store<MemoryEngine>> {
        Some(self.open())
    }

    /// As [`SledHarness::lapse`]: another store never sees this one's running calls.
    fn lapse(&self, _store: &Store<MemoryEngine>) {}
}

/// The lease of the PostgreSQL harness's stores: short, so a killed holder's claim lapses
/// soon; long enough that a loaded machine still renews it in time.
const PG_LEASE: Duration = Duration::from_secs(2);

/// PostgreSQL, in a fresh schema per test, when `IDEMSTORE_TEST_POSTGRES` names a server.
struct PgHarness {
    schema: PgSchema,
    clock: ManualClock,
}

impl PgHarness {
    fn new() -> Option<Self> {
        let url = pg_url()?;
        Some(Self {
            schema: PgSchema::new(&url),
            clock: ManualClock::new(START_MS),
        })
    }

    fn clock(&self) -> &ManualClock {
        &self.clock
    }

    fn open(&self) -> PgStore {
        self.open_with(|b| b)
    }

    fn open_with(&self, tweak: impl FnOnce(StoreBuilder) -> StoreBuilder) -> PgStore {
        let builder = StoreBuilder::default()
            .clock(self.clock.clone())
            .sweep_interval(None);
        tweak(builder)
            .open_postgres(self.schema.options().lease(PG_LEASE))
            .expect("open a PostgreSQL store")
    }

    fn reopen(&self, store: PgStore) -> PgStore {
        store.close().expect("clean close");
        self.open()
    }

    /// As [`SledHarness::leave_orphan`]: a child process killed with SIGKILL while its
    /// operation runs; returns once its lease has run out by the database's clock.
    fn leave_orphan(&self, key: &str, with_step: bool) {
        let clock = self.clock.now_millis().to_string();
        let mode = if with_step { "step" } else { "plain" };
        let mut child = ChildProcess::spawn_test(
            "orphan_child",
            &[
                (ORPHAN_PATH_VAR, "unused".as_ref()),
                (ORPHAN_PG_URL_VAR, self.schema.url.as_ref()),
                (ORPHAN_PG_SCHEMA_VAR, self.schema.name.as_ref()),
                (ORPHAN_KEY_VAR, key.as_ref()),
                (ORPHAN_MODE_VAR, mode.as_ref()),
                (ORPHAN_CLOCK_VAR, clock.as_ref()),
            ],
        )
        .labelled(format!("PostgreSQL orphan child ({mode})"));
        child.wait_for("RUNNING");
        child.kill();
        let lapsed = format!(
            "SELECT 1 FROM {{s}}.records WHERE key = convert_to('{key}', 'UTF8') \
             AND lease_until < now()"
        );
        wait_until("the killed holder's lease to run out", || {
            !self.schema.sql(&lapsed).is_empty()
        });
    }

    /// A second store on the same schema: another replica.
    fn another_process(&self, _open: &PgStore) -> Option<PgStore> {
        Some(self.open())
    }

    /// Ends the leases of `store`'s running calls, as if its process were paused past them.
    fn lapse(&self, store: &PgStore) {
        store.__lapse_leases().expect("lapse the leases");
    }
}

// The sled orphan's child process.
const ORPHAN_PATH_VAR: &str = "IDEMSTORE_CONFORMANCE_PATH";
const ORPHAN_KEY_VAR: &str = "IDEMSTORE_CONFORMANCE_KEY";
const ORPHAN_MODE_VAR: &str = "IDEMSTORE_CONFORMANCE_MODE";
const ORPHAN_CLOCK_VAR: &str = "IDEMSTORE_CONFORMANCE_CLOCK";
const ORPHAN_PG_URL_VAR: &str = "IDEMSTORE_CONFORMANCE_PG_URL";
const ORPHAN_PG_SCHEMA_VAR: &str = "IDEMSTORE_CONFORMANCE_PG_SCHEMA";

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// The call that leaves an orphan: under `Report`, so its claim is durable before the
/// operation runs (design §6: under `Rerun` a crash may lose a claim, and the next call runs
/// the operation as it would an orphan's).
fn orphan_call<'s, 'k>(
    store: &'s Store<MemoryEngine>,
    key: &'k str,
) -> idemstore::Call<'s, 'k, idemstore::AllRetryable, MemoryEngine> {
    store
        .call(key)
        .fingerprint(fp(ORPHAN_FP))
        .orphan_policy(OrphanPolicy::Report)
}

/// The child's side of [`SledHarness::leave_orphan`]: claims the key, says RUNNING once the
/// claim (and step "a") is durable, and hangs until killed.
#[test]
#[ignore = "run as a child process by the sled conformance tests"]
fn orphan_child() {
    let vars = [
        ORPHAN_PATH_VAR,
        ORPHAN_KEY_VAR,
        ORPHAN_MODE_VAR,
        ORPHAN_CLOCK_VAR,
    ]
    .map(|v| std::env::var(v).expect("orphan_child runs only under the conformance tests"));
    let [path, key, mode, clock] = vars;
    let clock = ManualClock::new(clock.parse().expect("clock millis"));
    let builder = StoreBuilder::default()
        .clock(clock.clone())
        .sweep_interval(None);
    let hang = || -> ! {
        say("RUNNING");
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    };
    macro_rules! run_and_hang {
        ($store:expr) => {{
            let store = $store;
            // Report on the call: its claim is durable before the operation runs, so the
            // kill leaves an orphan (under Rerun a crash may lose the claim: design §6).
            let call = store
                .call(&key)
                .fingerprint(fp(ORPHAN_FP))
                .orphan_policy(OrphanPolicy::Report);
            match mode.as_str() {
                "plain" => {
                    let _ = call.run(|| -> Result<u32, Fail> { hang() });
                }
                "step" => {
                    let _ = call.run_steps(|ctx| -> Result<u32, StepError<Fail>> {
                        ctx.step("a", || Ok::<_, Fail>(ORPHAN_STEP_VALUE))?;
                        hang()
                    });
                }
                other => panic!("unknown mode {other}"),
            }
        }};
    }
    match (
        std::env::var(ORPHAN_PG_URL_VAR),
        std::env::var(ORPHAN_PG_SCHEMA_VAR),
    ) {
        (Ok(url), Ok(schema)) => run_and_hang!(builder
            .open_postgres(PgOptions::new(url).schema(schema).lease(PG_LEASE))
            .expect("open")),
        _ => run_and_hang!(Store::builder(path)
            .clock(clock)
            .sweep_interval(None)
            .open()
            .expect("open")),
    }
    unreachable!("the operation never returns");
}

// ---------------------------------------------------------------------------------------
// The suite.

macro_rules! conformance {
    ($module:ident, $harness:ty) => {
        mod $module {
            use super::*;

            type H = $harness;

            // §2 row: absent → claim (durable), run, record (durable), return.
            #[test]
            fn an_absent_key_is_claimed_run_recorded_and_returned_durably() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let runs = AtomicU32::new(0);
                let first = store
                    .execute_once("order-1", || Ok::<_, Fail>(receipt(bump(&runs))))
                    .unwrap();
                assert!(!first.is_replayed());
                assert_eq!(*first, receipt(1));
                let info = *first.record();
                assert_eq!((info.state, info.attempts), (RecordState::Completed, 1));
                assert_eq!(store.record("order-1").unwrap(), Some(info));
                assert_eq!(store.stats().executions, 1);
                // Durable: a clean close and reopen replays it, and `f` does not run.
                let store = h.reopen(store);
                let again = store
                    .execute_once("order-1", || Ok::<_, Fail>(receipt(bump(&runs))))
                    .unwrap();
                assert!(again.is_replayed());
                assert_eq!((*again).clone(), receipt(1));
                assert_eq!(*again.record(), info);
                assert_eq!(count(&runs), 1);
            }

            // §2 row: expired → a new life (attempt 1), whatever state it expired in.
            #[test]
            fn an_expired_record_reads_as_absent_and_starts_a_new_life_in_every_state() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.default_ttl(Duration::from_secs(60)));
                let runs = AtomicU32::new(0);
                store
                    .execute_once("done", || Ok::<_, Fail>(bump(&runs)))
                    .unwrap();
                let _ = store
                    .call("declined")
                    .permanent_if(is_permanent)
                    .run(|| Err::<u32, _>(Fail::Permanent("no".into())));
                let _ = store.execute_once("flaky", || Err::<u32, _>(Fail::Retryable));
                let _ = store.execute_once("flaky", || Err::<u32, _>(Fail::Retryable));
                let before: Vec<_> = ["done", "declined", "flaky"]
                    .map(|k| store.record(k).unwrap().unwrap())
                    .into();
                assert_eq!(before[2].attempts, 2);
                h.clock().advance(Duration::from_secs(59));
                assert!(store.record("done").unwrap().is_some(), "not expired yet");
                h.clock().advance(Duration::from_secs(1));
                for (key, old) in ["done", "declined", "flaky"].into_iter().zip(before) {
                    assert_eq!(store.record(key).unwrap(), None, "{key} reads as absent");
                    // Even a different fingerprint: the expired record is not live.
                    let fresh = store
                        .call(key)
                        .fingerprint(fp("another request"))
                        .permanent_if(is_permanent)
                        .run(|| Ok::<_, Fail>(100 + bump(&runs)))
                        .unwrap();
                    assert!(!fresh.is_replayed(), "{key}");
                    let info = fresh.record();
                    assert_eq!(info.attempts, 1, "{key}: a new life starts at attempt 1");
                    assert!(info.created_at > old.created_at, "{key}: a new life");
                    assert!(info.claim > old.claim, "{key}");
                    assert_eq!(info.fingerprint, Some(fp("another request")));
                }
                assert_eq!(count(&runs), 4);
            }

            // §2 row: FailedRetryable → claim again in the same life (attempt + 1).
            #[test]
            fn a_retryable_failure_records_nothing_to_replay_and_the_next_call_runs_again() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let runs = AtomicU32::new(0);
                for attempt in 1..=2 {
                    let (e, replayed) = op_err(store.call("k").fingerprint(fp("req")).run(|| {
                        bump(&runs);
                        Err::<u32, _>(Fail::Retryable)
                    }));
                    assert_eq!((e, replayed), (Fail::Retryable, false));
                    let info = store.record("k").unwrap().unwrap();
                    assert_eq!(
                        (info.state, info.attempts, info.outcome_bytes),
                        (RecordState::FailedRetryable, attempt, 0)
                    );
                }
                let created = store.record("k").unwrap().unwrap().created_at;
                // Without a fingerprint: the recorded one is kept.
                let ok = store
                    .execute_once("k", || Ok::<_, Fail>(bump(&runs)))
                    .unwrap();
                assert_eq!((*ok, ok.is_replayed(), ok.record().attempts), (3, false, 3));
                assert_eq!(ok.record().created_at, created, "the same life");
                assert_eq!(ok.record().fingerprint, Some(fp("req")));
                assert_eq!(count(&runs), 3);
            }

            // §2 rows: Completed / FailedPermanent with the same or no fingerprint → replay.
            #[test]
            fn recorded_outcomes_replay_with_the_same_or_no_fingerprint_and_f_never_runs() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let runs = AtomicU32::new(0);
                let pay = |fingerprint: Option<&str>, permanent: bool| {
                    let call = store.call(if permanent { "declined" } else { "paid" });
                    let call = match fingerprint {
                        Some(f) => call.fingerprint(fp(f)),
                        None => call,
                    };
                    call.permanent_if(is_permanent).run(|| {
                        let n = bump(&runs);
                        match permanent {
                            true => Err(Fail::Permanent(format!("declined {n}"))),
                            false => Ok(receipt(n)),
                        }
                    })
                };
                let paid = pay(Some("req"), false).unwrap();
                let (declined, replayed) = op_err(pay(Some("req"), true));
                assert!(!replayed);
                assert_eq!(declined, Fail::Permanent("declined 2".into()));
                assert_eq!(
                    store.record("declined").unwrap().unwrap().state,
                    RecordState::FailedPermanent
                );
                let store_stats = store.stats();
                for fingerprint in [Some("req"), None] {
                    let again = pay(fingerprint, false).unwrap();
                    assert!(again.is_replayed());
                    assert_eq!((*again).clone(), (*paid).clone());
                    assert_eq!(again.record(), paid.record());
                    let (error, replayed) = op_err(pay(fingerprint, true));
                    assert_eq!((error, replayed), (declined.clone(), true));
                }
                assert_eq!(store.stats().replays, store_stats.replays + 4);
                // A call that declares no permanent errors cannot decode one: a clear error.
                let e = store_error(store.execute_once("declined", || Ok::<_, Fail>(bump(&runs))));
                assert!(matches!(e, Error::PermanentErrorRecorded { .. }), "{e}");
                // And after a clean reopen.
                let store = h.reopen(store);
                let again = store
                    .execute_once("paid", || Ok::<_, Fail>(receipt(bump(&runs))))
                    .unwrap();
                assert!(again.is_replayed());
                assert_eq!((*again).clone(), (*paid).clone());
                let (error, replayed) = op_err(
                    store
                        .call("declined")
                        .permanent_if(is_permanent)
                        .run(|| Ok::<Receipt, _>(receipt(bump(&runs)))),
                );
                assert_eq!((error, replayed), (declined, true));
                assert_eq!(count(&runs), 2, "f never ran for a recorded outcome");
            }

            // §2 row: any live record, fingerprint differs → FingerprintMismatch; nothing
            // runs, nothing changes. Every live state: Completed (stored and unstorable),
            // FailedPermanent, FailedRetryable, Pending running here, Pending orphan.
            #[test]
            fn a_different_fingerprint_is_refused_in_every_live_state() {
                let Some(h) = H::new() else { return };
                h.leave_orphan("orphan", false);
                let store = h.open_with(|b| b.max_result_bytes(64));
                let runs = AtomicU32::new(0);
                let req = fp(ORPHAN_FP);
                let call = |key: &'static str| store.call(key).fingerprint(req).permanent_if(is_permanent);
                call("completed").run(|| Ok::<_, Fail>(1u32)).unwrap();
                let _ = call("permanent").run(|| Err::<u32, _>(Fail::Permanent("x".into())));
                let _ = call("retryable").run(|| Err::<u32, _>(Fail::Retryable));
                let _ = call("unstorable").run(|| Ok::<_, Fail>(vec![1u8; 1000]));
                let states = [
                    ("completed", RecordState::Completed),
                    ("permanent", RecordState::FailedPermanent),
                    ("retryable", RecordState::FailedRetryable),
                    ("unstorable", RecordState::Completed),
                    ("orphan", RecordState::Pending),
                ];
                let mismatch = |key: &str, policy: OrphanPolicy| {
                    store
                        .call(key)
                        .fingerprint(fp("a different request"))
                        .orphan_policy(policy)
                        .wait_timeout(Duration::from_secs(5))
                        .permanent_if(is_permanent)
                        .run(|| Ok::<_, Fail>(bump(&runs)))
                };
                for (key, state) in states {
                    let before = store.record(key).unwrap().expect(key);
                    assert_eq!(before.state, state, "{key}");
                    for policy in [OrphanPolicy::Rerun, OrphanPolicy::Report] {
                        let e = store_error(mismatch(key, policy));
                        assert!(matches!(e, Error::FingerprintMismatch { .. }), "{key}: {e}");
                    }
                    assert_eq!(store.record(key).unwrap(), Some(before), "{key} unchanged");
                }
                // Pending, its call running in this process: refused at once, not waited for.
                let (inside, release) = (Barrier::new(2), Barrier::new(2));
                std::thread::scope(|scope| {
                    let holder = scope.spawn(|| {
                        call("running").run(|| {
                            inside.wait();
                            release.wait();
                            Ok::<_, Fail>(5u32)
                        })
                    });
                    inside.wait();
                    let before = store.record("running").unwrap().unwrap();
                    assert_eq!(before.state, RecordState::Pending);
                    let e = store_error(mismatch("running", OrphanPolicy::Rerun));
                    assert!(matches!(e, Error::FingerprintMismatch { .. }), "{e}");
                    assert_eq!(store.record("running").unwrap(), Some(before));
                    release.wait();
                    assert_eq!(*holder.join().unwrap().unwrap(), 5);
                });
                assert_eq!(count(&runs), 0, "nothing ran");
                assert_eq!(store.stats().fingerprint_mismatches, 11);
            }

            // §2 row: Pending, its call running in this process → wait, then replay (a
            // result, and a permanent error).
            #[test]
            fn a_call_waits_for_a_running_call_then_replays_its_outcome() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.wait_timeout(PATIENCE));
                let waiter_runs = AtomicU32::new(0);
                for (round, permanent) in [false, true].into_iter().enumerate() {
                    let key = if permanent { "declined" } else { "paid" };
                    let inside = Barrier::new(2);
                    std::thread::scope(|scope| {
                        let holder = scope.spawn(|| {
                            store.call(key).permanent_if(is_permanent).run(|| {
                                inside.wait();
                                wait_until("the second call to wait", || {
                                    store.stats().waits > round as u64
                                });
                                match permanent {
                                    true => Err(Fail::Permanent("no".into())),
                                    false => Ok(receipt(1)),
                                }
                            })
                        });
                        inside.wait();
                        let waiter = store
                            .call(key)
                            .permanent_if(is_permanent)
                            .run(|| Ok::<_, Fail>(receipt(100 + bump(&waiter_runs))));
                        let held = holder.join().unwrap();
                        if permanent {
                            assert_eq!(op_err(waiter), (Fail::Permanent("no".into()), true));
                            assert_eq!(op_err(held), (Fail::Permanent("no".into()), false));
                        } else {
                            let waiter = waiter.unwrap();
                            assert!(waiter.is_replayed(), "the waiter replays the outcome");
                            assert_eq!((*waiter).clone(), receipt(1));
                            assert_eq!((*held.unwrap()).clone(), receipt(1));
                        }
                    });
                }
                assert_eq!(count(&waiter_runs), 0, "waiters never run f");
            }

            // §2 row: Pending, running here, past the wait timeout → InProgress.
            #[test]
            fn a_call_that_waits_past_its_timeout_gets_in_progress_and_runs_nothing() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let (inside, release) = (Barrier::new(2), Barrier::new(2));
                let runs = AtomicU32::new(0);
                std::thread::scope(|scope| {
                    let holder = scope.spawn(|| {
                        store.execute_once("k", || {
                            inside.wait();
                            release.wait();
                            Ok::<_, Fail>(1u32)
                        })
                    });
                    inside.wait();
                    let e = store_error(
                        store
                            .call("k")
                            .wait_timeout(Duration::from_millis(30))
                            .run(|| Ok::<_, Fail>(bump(&runs))),
                    );
                    assert!(
                        matches!(e, Error::InProgress { waited, .. } if waited == Duration::from_millis(30)),
                        "{e}"
                    );
                    // A zero timeout does not wait at all.
                    let e = store_error(
                        store
                            .call("k")
                            .wait_timeout(Duration::ZERO)
                            .run(|| Ok::<_, Fail>(bump(&runs))),
                    );
                    assert!(matches!(e, Error::InProgress { .. }), "{e}");
                    release.wait();
                    assert_eq!(*holder.join().unwrap().unwrap(), 1);
                });
                assert_eq!(count(&runs), 0);
                assert_eq!(store.stats().in_progress_rejections, 2);
                let again = store.execute_once("k", || Ok::<_, Fail>(bump(&runs))).unwrap();
                assert_eq!((*again, again.is_replayed()), (1, true));
            }

            // §2 row: an orphan after a reopen, under Rerun: runs again in the same life.
            #[test]
            fn an_orphan_is_rerun_in_the_same_life_under_rerun() {
                let Some(h) = H::new() else { return };
                h.leave_orphan("k", false);
                let store = h.open();
                let orphan = store.record("k").unwrap().expect("the orphan's claim is durable");
                assert_eq!((orphan.state, orphan.attempts), (RecordState::Pending, 1));
                assert!(orphan.claim.epoch < store.epoch(), "claimed by an earlier open");
                let runs = AtomicU32::new(0);
                let out = store.execute_once("k", || Ok::<_, Fail>(bump(&runs))).unwrap();
                assert!(!out.is_replayed());
                let info = out.record();
                assert_eq!((info.state, info.attempts), (RecordState::Completed, 2));
                assert_eq!(info.created_at, orphan.created_at, "the same life");
                assert_eq!(info.fingerprint, Some(fp(ORPHAN_FP)));
                assert_eq!(store.stats().orphans_recovered, 1);
                let again = store.execute_once("k", || Ok::<_, Fail>(bump(&runs))).unwrap();
                assert!(again.is_replayed());
                assert_eq!(count(&runs), 1);
            }

            // §2 row: an orphan under Report: Interrupted, record unchanged, until the caller
            // reconciles and re-runs with Rerun on the call.
            #[test]
            fn an_orphan_is_reported_under_report_and_the_record_is_left_unchanged() {
                let Some(h) = H::new() else { return };
                h.leave_orphan("k", false);
                let store = h.open_with(|b| b.orphan_policy(OrphanPolicy::Report));
                let before = store.record("k").unwrap().unwrap();
                let runs = AtomicU32::new(0);
                for _ in 0..2 {
                    let e = store_error(store.execute_once("k", || Ok::<_, Fail>(bump(&runs))));
                    assert!(matches!(e, Error::Interrupted { attempts: 1, .. }), "{e}");
                    assert_eq!(store.record("k").unwrap(), Some(before));
                }
                assert_eq!(count(&runs), 0);
                assert_eq!(store.stats().orphans_reported, 2);
                // Still reported after another reopen.
                drop(store);
                let store = h.open_with(|b| b.orphan_policy(OrphanPolicy::Report));
                let e = store_error(store.execute_once("k", || Ok::<_, Fail>(bump(&runs))));
                assert!(matches!(e, Error::Interrupted { .. }), "{e}");
                let out = store
                    .call("k")
                    .orphan_policy(OrphanPolicy::Rerun)
                    .run(|| Ok::<_, Fail>(bump(&runs)))
                    .unwrap();
                assert_eq!((*out, out.record().attempts), (1, 2));
            }

            // §2 + §3: an orphan that expired is over: a new life, even under Report.
            #[test]
            fn an_expired_orphan_is_absent_not_interrupted() {
                let Some(h) = H::new() else { return };
                h.leave_orphan("k", true);
                let store = h.open_with(|b| b.orphan_policy(OrphanPolicy::Report));
                h.clock().advance(DAY);
                assert_eq!(store.record("k").unwrap(), None);
                let step_runs = AtomicU32::new(0);
                let out = store
                    .execute_steps("k", |ctx| {
                        ctx.step("a", || Ok::<_, Fail>(100 + bump(&step_runs)))
                    })
                    .unwrap();
                assert_eq!((*out, out.record().attempts), (101, 1), "a new life, fresh steps");
            }

            // §2 row: f panics → FailedRetryable; the panic continues; waiters wake and one
            // of them runs f (waiters never receive an unrecorded failure).
            #[test]
            fn a_panic_leaves_the_record_retryable_and_a_waiter_runs_f_itself() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.wait_timeout(PATIENCE).orphan_policy(OrphanPolicy::Report));
                let inside = Barrier::new(2);
                std::thread::scope(|scope| {
                    let holder = scope.spawn(|| {
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            let _ = store.execute_once("k", || -> Result<u32, Fail> {
                                inside.wait();
                                wait_until("the waiter", || store.stats().waits >= 1);
                                panic!("boom")
                            });
                        }))
                    });
                    inside.wait();
                    let waiter = store.execute_once("k", || Ok::<_, Fail>(9u32)).unwrap();
                    assert_eq!((*waiter, waiter.is_replayed()), (9, false));
                    assert_eq!(waiter.record().attempts, 2);
                    let payload = holder.join().unwrap().expect_err("the panic reaches the caller");
                    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
                });
                // Without a waiter: the record is retryable (not a false orphan under Report).
                let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _ = store.execute_once("alone", || -> Result<u32, Fail> { panic!("boom") });
                }));
                assert!(panicked.is_err());
                let info = store.record("alone").unwrap().unwrap();
                assert_eq!((info.state, info.attempts), (RecordState::FailedRetryable, 1));
                // A panic in other user code between claim and outcome (a predicate) too.
                let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _ = store
                        .call("predicate")
                        .permanent_if(|_: &Fail| panic!("predicate bug"))
                        .run(|| Err::<u32, _>(Fail::Retryable));
                }));
                assert!(panicked.is_err());
                assert_eq!(
                    store.record("predicate").unwrap().unwrap().state,
                    RecordState::FailedRetryable
                );
                for key in ["alone", "predicate"] {
                    let out = store.execute_once(key, || Ok::<_, Fail>(3u32)).unwrap();
                    assert_eq!((*out, out.record().attempts), (3, 2), "{key}");
                }
            }

            // §2: waiters after a retryable error do not receive it: one claims and runs.
            #[test]
            fn a_waiter_after_a_retryable_error_runs_f_itself() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.wait_timeout(PATIENCE));
                let inside = Barrier::new(2);
                std::thread::scope(|scope| {
                    let holder = scope.spawn(|| {
                        store.execute_once("k", || {
                            inside.wait();
                            wait_until("the waiter", || store.stats().waits >= 1);
                            Err::<u32, _>(Fail::Retryable)
                        })
                    });
                    inside.wait();
                    let waiter = store.execute_once("k", || Ok::<_, Fail>(4u32)).unwrap();
                    assert_eq!((*waiter, waiter.is_replayed(), waiter.record().attempts), (4, false, 2));
                    assert_eq!(op_err(holder.join().unwrap()), (Fail::Retryable, false));
                });
            }

            // §2 row: results (and permanent errors) that cannot be stored: recorded as such,
            // f never runs again, every call (the first included) gets the error.
            #[test]
            fn unstorable_outcomes_are_recorded_as_such_and_f_never_runs_again() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.max_result_bytes(64));
                let runs = AtomicU32::new(0);
                type IsExpected = fn(&Error) -> bool;
                let too_large: IsExpected =
                    |e| matches!(e, Error::ResultTooLarge { size, limit: 64, .. } if *size > 64);
                let not_encodable: IsExpected = |e| matches!(e, Error::ResultNotEncodable { .. });
                let mut cases: Vec<(&str, RecordState, IsExpected)> = Vec::new();
                for round in 0..2 {
                    let mut each = |key: &'static str, state, expected: IsExpected, r: Result<(), ExecuteError<Fail>>| {
                        let e = store_error(r);
                        assert!(expected(&e), "{key}, call {round}: {e}");
                        if round == 0 {
                            cases.push((key, state, expected));
                        }
                    };
                    let big = store.execute_once("big", || Ok::<_, Fail>(vec![bump(&runs); 100]));
                    each("big", RecordState::Completed, too_large, big.map(|_| ()));
                    let big_error = store.call("big-error").permanent_if(is_permanent).run(|| {
                        Err::<u32, _>(Fail::Permanent("x".repeat(100 + bump(&runs) as usize)))
                    });
                    each("big-error", RecordState::FailedPermanent, too_large, big_error.map(|_| ()));
                    let fails = store.execute_once("fails", || {
                        bump(&runs);
                        Ok::<_, Fail>(SerializeFails)
                    });
                    each("fails", RecordState::Completed, not_encodable, fails.map(|_| ()));
                    let panics = store.execute_once("panics", || {
                        bump(&runs);
                        Ok::<_, Fail>(SerializePanics)
                    });
                    each("panics", RecordState::Completed, not_encodable, panics.map(|_| ()));
                    // Serializes, but bincode cannot decode it back as the same value.
                    let json = store.execute_once("json", || {
                        Ok::<_, Fail>(serde_json::json!({ "run": bump(&runs) }))
                    });
                    each("json", RecordState::Completed, not_encodable, json.map(|_| ()));
                }
                assert_eq!(count(&runs), 5, "each ran once");
                let store = h.reopen(store);
                for (key, state, expected) in cases {
                    assert_eq!(store.record(key).unwrap().unwrap().state, state, "{key}");
                    let r = store
                        .call(key)
                        .permanent_if(is_permanent)
                        .run(|| Ok::<_, Fail>(bump(&runs)));
                    let e = store_error(r);
                    assert!(expected(&e), "{key} after reopen: {e}");
                }
                assert_eq!(count(&runs), 5, "never again, after a reopen either");
            }

            // §2 row: bad keys are refused before anything is written.
            #[test]
            fn bad_keys_are_refused_before_anything_is_written() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.max_key_bytes(8));
                let runs = AtomicU32::new(0);
                let e = store_error(store.execute_once("", || Ok::<_, Fail>(bump(&runs))));
                assert!(matches!(e, Error::EmptyKey), "{e}");
                let e = store_error(store.execute_once("123456789", || Ok::<_, Fail>(bump(&runs))));
                assert!(matches!(e, Error::KeyTooLong { len: 9, limit: 8 }), "{e}");
                let e = store_error(store.execute_steps("", |ctx| {
                    ctx.step("a", || Ok::<_, Fail>(bump(&runs)))
                }));
                assert!(matches!(e, Error::EmptyKey), "{e}");
                assert_eq!(count(&runs), 0);
                assert_eq!(store.records().count(), 0, "nothing written");
                let store = h.reopen(store);
                assert_eq!(store.records().count(), 0);
                drop(store);
                let store = h.open_with(|b| b.max_key_bytes(8));
                assert_eq!(*store.execute_once("12345678", || Ok::<_, Fail>(bump(&runs))).unwrap(), 1);
            }

            // §2 row: an outcome that does not decode as the requested type → Decode.
            #[test]
            fn an_outcome_that_no_longer_decodes_is_a_decode_error_and_nothing_runs() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                store.execute_once("k", || Ok::<_, Fail>(String::from("a string"))).unwrap();
                let runs = AtomicU32::new(0);
                let e = store_error(store.execute_once("k", || {
                    bump(&runs);
                    Ok::<_, Fail>(receipt(1))
                }));
                assert!(matches!(e, Error::Decode { what: "result", .. }), "{e}");
                assert_eq!(count(&runs), 0);
                assert_eq!(*store.execute_once("k", || Ok::<_, Fail>(String::new())).unwrap(), "a string");
            }

            // §4: a later attempt of the same life replays recorded steps by index; only
            // later steps run.
            #[test]
            fn a_retry_replays_recorded_steps_and_runs_only_the_rest() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let (charges, confirms) = (AtomicU32::new(0), AtomicU32::new(0));
                let checkout = |confirm_works: bool| {
                    store.execute_steps("checkout", |ctx| {
                        let charge = ctx.step("charge", || Ok::<_, Fail>(receipt(bump(&charges))))?;
                        ctx.step("confirm", || {
                            bump(&confirms);
                            if confirm_works { Ok(()) } else { Err(Fail::Retryable) }
                        })?;
                        Ok::<_, StepError<Fail>>(charge)
                    })
                };
                let (e, _) = op_err(checkout(false));
                assert!(matches!(e, StepError::Failed(Fail::Retryable)), "{e:?}");
                let steps = store.steps("checkout").unwrap();
                assert_eq!(steps.iter().map(|s| (s.index, s.name.as_str())).collect::<Vec<_>>(), [(0, "charge")]);
                let (e, _) = op_err(checkout(false));
                assert!(matches!(e, StepError::Failed(Fail::Retryable)), "{e:?}");
                // A recorded step survives a reopen.
                let store = h.reopen(store);
                let checkout = |confirm_works: bool| {
                    store.execute_steps("checkout", |ctx| {
                        let charge = ctx.step("charge", || Ok::<_, Fail>(receipt(bump(&charges))))?;
                        ctx.step("confirm", || {
                            bump(&confirms);
                            if confirm_works { Ok(()) } else { Err(Fail::Retryable) }
                        })?;
                        Ok::<_, StepError<Fail>>(charge)
                    })
                };
                let out = checkout(true).unwrap();
                assert_eq!(((*out).clone(), out.record().attempts), (receipt(1), 3));
                assert_eq!((count(&charges), count(&confirms)), (1, 3));
                assert!(checkout(true).unwrap().is_replayed());
                assert_eq!(store.steps("checkout").unwrap().len(), 2);
            }

            // §4: a step whose error the operation ignored records nothing and shifts nothing.
            #[test]
            fn an_ignored_step_error_records_nothing_and_shifts_no_later_step() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let (notes, charges) = (AtomicU32::new(0), AtomicU32::new(0));
                let run = |finish: bool| {
                    store.execute_steps("k", |ctx| {
                        let _ = ctx.step("notify", || {
                            bump(&notes);
                            Err::<(), _>(Fail::Retryable)
                        });
                        let charge = ctx.step("charge", || Ok::<_, Fail>(bump(&charges)))?;
                        match finish {
                            true => Ok(charge),
                            false => Err(StepError::Failed(Fail::Retryable)),
                        }
                    })
                };
                assert!(run(false).is_err());
                let steps = store.steps("k").unwrap();
                assert_eq!(steps.iter().map(|s| (s.index, s.name.as_str())).collect::<Vec<_>>(), [(1, "charge")]);
                assert_eq!(*run(true).unwrap(), 1, "the charge at index 1 is replayed");
                assert_eq!((count(&notes), count(&charges)), (2, 1));
            }

            // §4: a different name at a recorded index → StepSequenceChanged; no later step
            // runs, and the run fails with it whatever the operation returns.
            #[test]
            fn a_changed_step_sequence_is_refused_and_nothing_more_runs() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let later = AtomicU32::new(0);
                let _ = store.execute_steps("k", |ctx| {
                    ctx.step("charge", || Ok::<_, Fail>(1u32))?;
                    Err::<u32, _>(StepError::Failed(Fail::Retryable))
                });
                let r = store.execute_steps("k", |ctx| {
                    let first = ctx.step("refund", || Ok::<_, Fail>(2u32));
                    assert!(matches!(first, Err(StepError::Store(Error::StepSequenceChanged { index: 0, .. }))), "{first:?}");
                    let next = ctx.step("confirm", || Ok::<_, Fail>(bump(&later)));
                    assert!(matches!(next, Err(StepError::Store(Error::StepSequenceChanged { .. }))), "{next:?}");
                    Ok::<u32, StepError<Fail>>(0) // the operation swallows the errors
                });
                match store_error(r) {
                    Error::StepSequenceChanged { index, recorded, requested, .. } => {
                        assert_eq!((index, recorded.as_str(), requested.as_str()), (0, "charge", "refund"));
                    }
                    e => panic!("{e}"),
                }
                assert_eq!(count(&later), 0);
                assert_eq!(store.record("k").unwrap().unwrap().state, RecordState::FailedRetryable);
                // The recorded sequence still works.
                let out = store
                    .execute_steps("k", |ctx| {
                        let c = ctx.step("charge", || Ok::<_, Fail>(9u32))?;
                        ctx.step("confirm", || Ok::<_, Fail>(bump(&later)))?;
                        Ok::<_, StepError<Fail>>(c)
                    })
                    .unwrap();
                assert_eq!((*out, count(&later)), (1, 1));
            }

            // §4: after a store error in a step (an invalid or repeated name), no further
            // step runs and the run fails with it.
            #[test]
            fn after_a_store_error_in_a_step_no_further_step_runs() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let later = AtomicU32::new(0);
                for bad in ["", "a"] {
                    let key = format!("k{}", bad.len());
                    let r = store.execute_steps(&key, |ctx| {
                        ctx.step("a", || Ok::<_, Fail>(1u32))?;
                        let refused = ctx.step(bad, || Ok::<_, Fail>(bump(&later)));
                        assert!(matches!(refused, Err(StepError::Store(Error::InvalidStep { .. }))));
                        let next = ctx.step("b", || Ok::<_, Fail>(bump(&later)));
                        assert!(matches!(next, Err(StepError::Store(Error::InvalidStep { .. }))));
                        Ok::<u32, StepError<Fail>>(0)
                    });
                    assert!(matches!(store_error(r), Error::InvalidStep { .. }), "{bad:?}");
                    assert_eq!(store.record(&key).unwrap().unwrap().state, RecordState::FailedRetryable);
                }
                assert_eq!(count(&later), 0);
            }

            // §4: a step whose result cannot be stored ran: neither it nor the operation
            // runs again in this life.
            #[test]
            fn an_unstorable_step_never_runs_again_nor_does_the_operation() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.max_result_bytes(64));
                let (ops, big) = (AtomicU32::new(0), AtomicU32::new(0));
                for _ in 0..2 {
                    let r = store.execute_steps("k", |ctx| {
                        bump(&ops);
                        ctx.step("big", || Ok::<_, Fail>(vec![bump(&big); 100]))?;
                        Ok::<u32, StepError<Fail>>(0)
                    });
                    assert!(matches!(store_error(r), Error::ResultTooLarge { limit: 64, .. }));
                }
                assert_eq!((count(&ops), count(&big)), (1, 1));
                let store = h.reopen(store);
                let r = store.execute_steps("k", |ctx| {
                    bump(&ops);
                    ctx.step("big", || Ok::<_, Fail>(vec![bump(&big); 100]))?;
                    Ok::<u32, StepError<Fail>>(0)
                });
                assert!(matches!(store_error(r), Error::ResultTooLarge { .. }));
                assert_eq!((count(&ops), count(&big)), (1, 1));
                assert_eq!(store.record("k").unwrap().unwrap().state, RecordState::Completed);
            }

            // §4 + crash analysis: an orphan with a recorded step is taken over in the same
            // life: the step replays, only later steps run (Rerun; Report after reconciling).
            #[test]
            fn an_orphans_recorded_steps_replay_when_it_is_taken_over() {
                for policy in [OrphanPolicy::Rerun, OrphanPolicy::Report] {
                    let Some(h) = H::new() else { return };
                    h.leave_orphan("k", true);
                    let store = h.open_with(|b| b.orphan_policy(policy));
                    assert_eq!(store.steps("k").unwrap().len(), 1);
                    let (a_runs, b_runs) = (AtomicU32::new(0), AtomicU32::new(0));
                    let op = |ctx: &mut idemstore::Context<'_>| {
                        let a = ctx.step("a", || Ok::<_, Fail>(100 + bump(&a_runs)))?;
                        let b = ctx.step("b", || Ok::<_, Fail>(bump(&b_runs)))?;
                        Ok::<_, StepError<Fail>>((a, b))
                    };
                    if policy == OrphanPolicy::Report {
                        let e = store_error(store.execute_steps("k", op));
                        assert!(matches!(e, Error::Interrupted { attempts: 1, .. }), "{e}");
                        assert_eq!((count(&a_runs), count(&b_runs)), (0, 0));
                    }
                    let out = store
                        .call("k")
                        .orphan_policy(OrphanPolicy::Rerun)
                        .run_steps(op)
                        .unwrap();
                    assert_eq!(*out, (ORPHAN_STEP_VALUE, 1), "{policy:?}");
                    assert_eq!(out.record().attempts, 2);
                    assert_eq!((count(&a_runs), count(&b_runs)), (0, 1), "{policy:?}");
                }
            }

            // §4: a new life never sees an earlier life's steps: after remove, expiry, sweep.
            #[test]
            fn a_new_life_never_sees_the_steps_of_an_earlier_life() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.default_ttl(Duration::from_secs(60)));
                let charges = AtomicU32::new(0);
                let half = |key: &str| {
                    store.execute_steps(key, |ctx| {
                        ctx.step("charge", || Ok::<_, Fail>(bump(&charges)))?;
                        Err::<u32, _>(StepError::Failed(Fail::Retryable))
                    })
                };
                let whole = |key: &str| {
                    store.execute_steps(key, |ctx| {
                        let c = ctx.step("charge", || Ok::<_, Fail>(bump(&charges)))?;
                        ctx.step("confirm", || Ok::<_, Fail>(()))?;
                        Ok::<_, StepError<Fail>>(c)
                    })
                };
                for key in ["removed", "expired", "swept"] {
                    assert!(half(key).is_err());
                    assert_eq!(store.steps(key).unwrap().len(), 1);
                }
                let before = count(&charges);
                assert!(store.remove("removed").unwrap());
                assert!(store.steps("removed").unwrap().is_empty());
                h.clock().advance(Duration::from_secs(60));
                assert!(store.steps("expired").unwrap().is_empty(), "expired steps read as absent");
                let fresh = |key: &str| {
                    let out = whole(key).unwrap();
                    assert!(!out.is_replayed());
                    assert!(*out > before, "{key}: the new life charged afresh");
                    assert_eq!(out.record().attempts, 1, "{key}");
                    assert_eq!(store.steps(key).unwrap().len(), 2, "{key}");
                };
                // A claim over the expired record retires it with its steps.
                fresh("expired");
                // The sweep removes "swept" with its steps; "expired" was claimed again.
                assert_eq!(store.sweep_now().unwrap(), 1);
                fresh("swept");
                fresh("removed");
                assert_eq!(count(&charges), before + 3);
            }

            // §7: an expired record reads as absent everywhere.
            #[test]
            fn an_expired_record_reads_as_absent_everywhere() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                store.call("short").ttl(Duration::from_secs(5)).run(|| Ok::<_, Fail>(1u32)).unwrap();
                store.execute_steps("long", |ctx| ctx.step("a", || Ok::<_, Fail>(2u32))).unwrap();
                h.clock().advance(Duration::from_secs(5));
                assert_eq!(store.record("short").unwrap(), None);
                let live: Vec<_> = store.records().map(|r| r.unwrap().0).collect();
                assert_eq!(live, [b"long".to_vec()]);
                assert_eq!(store.records_in_state(RecordState::Completed).count(), 1);
                h.clock().advance(DAY);
                assert_eq!(store.records().count(), 0);
                assert!(store.steps("long").unwrap().is_empty());
                let out = store.execute_once("short", || Ok::<_, Fail>(3u32)).unwrap();
                assert_eq!((*out, out.is_replayed()), (3, false));
            }

            // §7: a sweep removes expired records (and their steps) for good, durably, and
            // only those.
            #[test]
            fn a_sweep_removes_expired_records_for_good_and_only_those() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.default_ttl(Duration::from_secs(10)));
                for i in 0..30u32 {
                    store.execute_steps(format!("old-{i}"), |ctx| ctx.step("a", || Ok::<_, Fail>(i))).unwrap();
                }
                h.clock().advance(Duration::from_secs(5));
                for i in 0..10u32 {
                    store.execute_once(format!("new-{i}"), || Ok::<_, Fail>(i)).unwrap();
                }
                assert_eq!(store.sweep_now().unwrap(), 0, "nothing due yet");
                h.clock().advance(Duration::from_secs(5));
                assert_eq!(store.sweep_now().unwrap(), 30);
                assert_eq!(store.sweep_now().unwrap(), 0);
                assert_eq!(store.stats().records_swept, 30);
                let store = h.reopen(store);
                // Removed, not merely hidden: with the clock turned back they stay gone.
                h.clock().set(START_MS);
                let keys: Vec<_> = store.records().map(|r| r.unwrap().0).collect();
                assert_eq!(keys.len(), 10);
                assert!(keys.iter().all(|k| k.starts_with(b"new-")));
                assert!(store.steps("old-0").unwrap().is_empty());
                assert_eq!(store.record("old-0").unwrap(), None);
            }

            // §7: a pass of several batches walks the due entries once, in index order (here
            // the reverse of key order), past an entry it keeps for a running call, and
            // removes every expired record and no other.
            #[test]
            fn a_sweep_of_many_batches_removes_every_expired_record_once() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                const N: u64 = 1300; // over two batches of 512
                for i in 0..N {
                    // Later keys expire sooner; every tenth lives for an hour.
                    let ttl = match i % 10 {
                        0 => Duration::from_secs(3600),
                        _ => Duration::from_millis(1000 + N - i),
                    };
                    store.call(&format!("k-{i:05}")).ttl(ttl).run(|| Ok::<_, Fail>(i)).unwrap();
                }
                let (inside, swept) = (Barrier::new(2), Barrier::new(2));
                std::thread::scope(|scope| {
                    let holder = scope.spawn(|| {
                        let call = store.call("running").ttl(Duration::from_millis(1000 + N / 2));
                        call.run(|| {
                            inside.wait();
                            swept.wait();
                            Ok::<_, Fail>(0u64)
                        })
                    });
                    inside.wait();
                    h.clock().advance(Duration::from_secs(10));
                    assert_eq!(store.sweep_now().unwrap(), N - N / 10);
                    swept.wait();
                    assert!(!holder.join().unwrap().unwrap().is_replayed());
                });
                assert_eq!(store.sweep_now().unwrap(), 0);
                let kept: Vec<_> = store.records().map(|r| r.unwrap().0).collect();
                assert_eq!(kept.len() as u64, N / 10 + 1);
                assert!(kept.iter().any(|k| k == b"running"));
                for i in (0..N).step_by(10) {
                    let out = store.execute_once(format!("k-{i:05}"), || Ok::<_, Fail>(0u64)).unwrap();
                    assert_eq!((*out, out.is_replayed()), (i, true));
                }
                h.clock().advance(Duration::from_secs(7200));
                assert_eq!(store.sweep_now().unwrap(), N / 10 + 1);
                assert_eq!(store.records().count(), 0);
            }

            // §7: a sweep never removes the record of a call running in this process, even
            // expired; the run keeps its outcome for a TTL from completion.
            #[test]
            fn a_sweep_never_removes_a_running_calls_record() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| b.default_ttl(Duration::from_secs(10)));
                let (inside, swept) = (Barrier::new(2), Barrier::new(2));
                std::thread::scope(|scope| {
                    let holder = scope.spawn(|| {
                        store.execute_steps("k", |ctx| {
                            ctx.step("a", || Ok::<_, Fail>(1u32))?;
                            h.clock().advance(Duration::from_secs(30)); // outlives its TTL
                            assert_eq!(store.sweep_now().unwrap(), 0, "from the running call");
                            inside.wait();
                            swept.wait();
                            let b = ctx.step("b", || Ok::<_, Fail>(2u32))?;
                            Ok::<_, StepError<Fail>>(b)
                        })
                    });
                    inside.wait();
                    assert_eq!(store.sweep_now().unwrap(), 0, "from another thread");
                    swept.wait();
                    let out = holder.join().unwrap().expect("the running call finishes and records");
                    assert_eq!(*out, 2);
                    let info = out.record();
                    assert_eq!(info.expires_at.duration_since(info.updated_at).unwrap(), Duration::from_secs(10));
                });
                assert_eq!(store.sweep_now().unwrap(), 0);
                assert!(store.execute_once("k", || Ok::<_, Fail>(0u32)).unwrap().is_replayed());
                assert_eq!(store.steps("k").unwrap().len(), 2);
                h.clock().advance(Duration::from_secs(10));
                assert_eq!(store.sweep_now().unwrap(), 1);
            }

            // §2 + §8: within one process, a call on a key whose running call outlived its
            // TTL waits for that call (never a second run beside it), then replays.
            #[test]
            fn a_running_call_that_outlives_its_ttl_is_waited_for_not_run_beside() {
                let Some(h) = H::new() else { return };
                let store = h.open_with(|b| {
                    b.default_ttl(Duration::from_secs(10))
                        .wait_timeout(PATIENCE)
                });
                let (inside, runs) = (Barrier::new(2), AtomicU32::new(0));
                std::thread::scope(|scope| {
                    let holder = scope.spawn(|| {
                        store.execute_once("k", || {
                            bump(&runs);
                            h.clock().advance(Duration::from_secs(30));
                            inside.wait();
                            wait_until("the second call to wait", || store.stats().waits >= 1);
                            Ok::<_, Fail>(1u32)
                        })
                    });
                    inside.wait();
                    let second = store
                        .execute_once("k", || Ok::<_, Fail>(100 + bump(&runs)))
                        .unwrap();
                    assert_eq!((*second, second.is_replayed()), (1, true));
                    assert_eq!(*holder.join().unwrap().unwrap(), 1);
                });
                assert_eq!(count(&runs), 1);
            }

            // Fencing: a holder whose record was removed gets OutcomeNotRecorded from its
            // next step and from its final write; nothing is overwritten.
            #[test]
            fn a_holder_whose_record_was_removed_records_nothing() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let (b_runs, charges) = (AtomicU32::new(0), AtomicU32::new(0));
                // Its next step.
                let r = store.execute_steps("k", |ctx| {
                    ctx.step("charge", || Ok::<_, Fail>(bump(&charges)))?;
                    assert!(store.remove("k").unwrap());
                    let next = ctx.step("b", || Ok::<_, Fail>(bump(&b_runs)));
                    assert!(matches!(next, Err(StepError::Store(Error::OutcomeNotRecorded { .. }))), "{next:?}");
                    Ok::<u32, StepError<Fail>>(0)
                });
                assert!(matches!(store_error(r), Error::OutcomeNotRecorded { .. }));
                assert_eq!(store.record("k").unwrap(), None, "nothing overwritten");
                assert!(store.steps("k").unwrap().is_empty());
                // Its final write.
                let r = store.execute_once("plain", || {
                    assert!(store.remove("plain").unwrap());
                    Ok::<_, Fail>(1u32)
                });
                assert!(matches!(store_error(r), Error::OutcomeNotRecorded { .. }));
                assert_eq!(store.record("plain").unwrap(), None, "nothing overwritten");
                // The next life starts afresh.
                let out = store.execute_steps("k", |ctx| ctx.step("charge", || Ok::<_, Fail>(bump(&charges)))).unwrap();
                assert_eq!((*out, out.record().attempts), (2, 1));
                let out = store.execute_once("plain", || Ok::<_, Fail>(2u32)).unwrap();
                assert_eq!((*out, out.is_replayed()), (2, false));
            }

            // Fencing across processes: while a holder runs, its record is removed and a new
            // life recorded (or, once its lease ended, its claim is taken over) by another
            // process; the holder's next step and final write get OutcomeNotRecorded (or
            // LeaseLost), and the record that replaced its own — value, state, steps — is
            // untouched.
            #[test]
            fn a_stale_holder_never_touches_the_record_that_replaced_its_own() {
                let Some(h) = H::new() else { return };
                let store = h.open();
                let Some(other) = h.another_process(&store) else {
                    return; // one process per database: no other life can begin meanwhile
                };
                for takeover in [false, true] {
                    let key = if takeover { "taken-over" } else { "removed" };
                    let stale_b = AtomicU32::new(0);
                    let r = store.execute_steps(key, |ctx| {
                        ctx.step("a", || Ok::<_, Fail>(1u32))?;
                        if !takeover {
                            assert!(other.remove(key).unwrap());
                        }
                        // The other process: a new life, or (its holder's lease ended: it
                        // looks dead there) an orphan taken over in the same life.
                        if takeover {
                            h.lapse(&store);
                        }
                        let theirs = other
                            .execute_steps(key, |ctx| {
                                let a = ctx.step("a", || Ok::<_, Fail>(10u32))?;
                                let b = ctx.step("b", || Ok::<_, Fail>(20u32))?;
                                Ok::<_, StepError<Fail>>(a + b)
                            })
                            .unwrap();
                        assert_eq!(*theirs, if takeover { 21 } else { 30 });
                        assert_eq!(theirs.record().attempts, if takeover { 2 } else { 1 });
                        let next = ctx.step("b", || Ok::<_, Fail>(bump(&stale_b)));
                        match (takeover, &next) {
                            (false, Err(StepError::Store(Error::OutcomeNotRecorded { .. })))
                            | (true, Err(StepError::Store(Error::LeaseLost { .. }))) => {}
                            _ => panic!("{key}: {next:?}"),
                        }
                        Ok::<u32, StepError<Fail>>(99)
                    });
                    match (takeover, store_error(r)) {
                        (false, Error::OutcomeNotRecorded { .. }) | (true, Error::LeaseLost { .. }) => {}
                        (_, e) => panic!("{key}: {e}"),
                    }
                    // The final write alone (no steps) is fenced too.
                    let plain = format!("{key}-plain");
                    let r = store.execute_once(&plain, || {
                        if !takeover {
                            assert!(other.remove(&plain).unwrap());
                        } else {
                            h.lapse(&store);
                        }
                        let theirs = other.execute_once(&plain, || Ok::<_, Fail>(30u32)).unwrap();
                        assert!(!theirs.is_replayed());
                        Ok::<_, Fail>(99u32)
                    });
                    match (takeover, store_error(r)) {
                        (false, Error::OutcomeNotRecorded { .. }) | (true, Error::LeaseLost { .. }) => {}
                        (_, e) => panic!("{plain}: {e}"),
                    }
                    for s in [&store, &other] {
                        let out = s.execute_steps(key, |ctx| {
                            let a = ctx.step("a", || Ok::<_, Fail>(0u32))?;
                            let b = ctx.step("b", || Ok::<_, Fail>(0u32))?;
                            Ok::<_, StepError<Fail>>(a + b)
                        }).unwrap();
                        assert!(out.is_replayed());
                        assert_eq!(*out, if takeover { 21 } else { 30 }, "{key}: theirs, untouched");
                        let steps = s.steps(key).unwrap();
                        assert_eq!(steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
                        let out = s.execute_once(&plain, || Ok::<_, Fail>(0u32)).unwrap();
                        assert_eq!((*out, out.is_replayed()), (30, true), "{plain}");
                    }
                }
            }
        }
    };
}

conformance!(on_sled, SledHarness);
conformance!(on_memory, MemoryHarness);
conformance!(on_postgres, PgHarness);

// ---------------------------------------------------------------------------------------
// Rows whose fault only the memory engine can inject; a future engine with its own fault
// injection adds its version here.

/// §2 row: Pending, no call in this process runs it because its final write failed: an
/// orphan of this very process, handled by the orphan policy (no reopen needed).
#[test]
fn memory_a_failed_final_write_leaves_an_orphan_of_this_process() {
    for policy in [OrphanPolicy::Rerun, OrphanPolicy::Report] {
        let h = MemoryHarness::new().expect("the memory engine is always there");
        let store = h.open_with(|b| b.orphan_policy(policy));
        let runs = AtomicU32::new(0);
        let r = store.execute_once("k", || {
            h.engine.fail_nth_write(1); // the outcome's write
            Ok::<_, Fail>(bump(&runs))
        });
        assert!(matches!(store_error(r), Error::Storage(_)));
        let info = store.record("k").unwrap().unwrap();
        assert_eq!((info.state, info.attempts), (RecordState::Pending, 1));
        let next = store.execute_once("k", || Ok::<_, Fail>(bump(&runs)));
        match policy {
            OrphanPolicy::Rerun => {
                let out = next.unwrap();
                assert_eq!((*out, out.record().attempts), (2, 2));
            }
            OrphanPolicy::Report => {
                let e = store_error(next);
                assert!(matches!(e, Error::Interrupted { attempts: 1, .. }), "{e}");
                assert_eq!(count(&runs), 1);
            }
        }
    }
}

/// Design §6, which claims are made durable: under `Rerun` a new key makes one durable point
/// (its outcome's), so a power loss while its operation runs leaves nothing, and the next call
/// runs the operation as the first run; under `Report` (the store's or the call's) the claim
/// is durable before the operation runs, so the same power loss leaves an orphan that the next
/// call reports. Counted: one barrier per new key under `Rerun`, two under `Report`.
#[test]
fn memory_only_report_makes_a_claim_durable_before_its_operation_runs() {
    for (policy, barriers_before_run) in [(OrphanPolicy::Rerun, 0), (OrphanPolicy::Report, 1)] {
        let h = MemoryHarness::new().expect("the memory engine is always there");
        let store = h.open_with(|b| b.orphan_policy(policy));
        let before = h.engine.barriers();
        let out = store.execute_once("done", || Ok::<_, Fail>(1u32)).unwrap();
        assert_eq!(*out, 1);
        assert_eq!(
            h.engine.barriers() - before,
            barriers_before_run + 1,
            "{policy:?}: durable points of one new key"
        );
        let runs = AtomicU32::new(0);
        let before = h.engine.barriers();
        let e = store_error(store.execute_once("k", || {
            assert_eq!(
                h.engine.barriers() - before,
                barriers_before_run,
                "{policy:?}: durable points before the operation ran"
            );
            bump(&runs);
            h.engine.crash();
            Ok::<_, Fail>(0u32)
        }));
        assert!(matches!(e, Error::Storage(_)), "{policy:?}: {e}");
        drop(store);
        let store = h.open_with(|b| b.orphan_policy(policy));
        let next = store.execute_once("k", || Ok::<_, Fail>(bump(&runs)));
        match policy {
            OrphanPolicy::Rerun => {
                assert_eq!(store.stats().orphans_recovered, 0, "no orphan was left");
                let out = next.unwrap();
                assert_eq!((*out, out.record().attempts), (2, 1), "a first run");
            }
            OrphanPolicy::Report => {
                let e = store_error(next);
                assert!(matches!(e, Error::Interrupted { attempts: 1, .. }), "{e}");
            }
        }
        // What was returned before the power loss stays.
        let again = store.execute_once("done", || Ok::<_, Fail>(9u32)).unwrap();
        assert_eq!((*again, again.is_replayed()), (1, true));
    }
}

/// §2 rows: a storage error before the claim is durable → `Storage`, `f` does not run, and
/// nothing is left behind; after `f` ran → `Storage`, and the next call finds the outcome or
/// an orphan.
#[test]
fn memory_storage_errors_before_and_after_the_claim() {
    let h = MemoryHarness::new().expect("the memory engine is always there");
    let store = h.open();
    let runs = AtomicU32::new(0);
    // The claim's barrier (under Report: design §6) fails: f does not run, the claim is
    // taken back.
    h.engine.fail_nth_barrier(1);
    let e = store_error(
        store
            .call("k")
            .orphan_policy(OrphanPolicy::Report)
            .run(|| Ok::<_, Fail>(bump(&runs))),
    );
    assert!(matches!(e, Error::Storage(_)), "{e}");
    assert_eq!(count(&runs), 0);
    assert_eq!(store.record("k").unwrap(), None);
    // The claim's write fails: the same.
    h.engine.fail_nth_write(2);
    let e = store_error(store.execute_once("k", || Ok::<_, Fail>(bump(&runs))));
    assert!(matches!(e, Error::Storage(_)), "{e}");
    assert_eq!((count(&runs), store.record("k").unwrap()), (0, None));
    let out = store
        .execute_once("k", || Ok::<_, Fail>(bump(&runs)))
        .unwrap();
    assert_eq!((*out, out.record().attempts), (1, 1));
}
