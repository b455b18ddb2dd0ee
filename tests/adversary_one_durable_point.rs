//! Adversarial review of 13b7285 ("one durable point per new key under Rerun": a claim is
//! made durable before the operation runs only when `Settings::claim_must_be_durable`, i.e.
//! the call's or the store's orphan policy is `Report`).
//!
//! Three attacks broke 13b7285: an `Interrupted` and `Store::record` showed a Pending claim
//! that no durable point covered, so a power loss took back what the store had said (fixed:
//! a durability point before showing a Pending record). Two others held the code to a wider
//! reading of the contract than design §6 makes, and are rewritten to the contract as
//! written (each says how). Tests marked SURVIVED are attacks the code withstood.

use idemstore::{
    Error, ExecuteError, ManualClock, MemoryEngine, OrphanPolicy, RecordState, StepError, Store,
};
use std::fmt::Debug;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const START_MS: u64 = 1_780_000_000_000;
const TTL: Duration = Duration::from_secs(60);

fn open(engine: &MemoryEngine, clock: &ManualClock, policy: OrphanPolicy) -> Store<MemoryEngine> {
    engine
        .open(
            Store::builder("memory")
                .clock(clock.clone())
                .sweep_interval(None)
                .default_ttl(TTL)
                .orphan_policy(policy),
        )
        .expect("open memory store")
}

fn store_error<T: Debug, E: Debug>(r: Result<T, ExecuteError<E>>) -> Error {
    match r {
        Err(ExecuteError::Store(e)) => e,
        other => panic!("expected a store error, got {other:?}"),
    }
}

fn bump(c: &AtomicU32) -> u32 {
    c.fetch_add(1, Ordering::SeqCst) + 1
}

fn count(c: &AtomicU32) -> u32 {
    c.load(Ordering::SeqCst)
}

/// Disarms any planned fault (a plan far in the future, not a crash).
fn disarm(engine: &MemoryEngine) {
    engine.fail_nth_write(1 << 40);
}

// ---------------------------------------------------------------------------------------------
// Promise: design §6, README "Crashes": `Report` protects the runs of calls made under it
// (its own policy or the store's). First written against a wider reading (any later `Report`
// call would see a crashed `Rerun` call's run), which the contract does not make: a `Rerun`
// call chose at-least-once, so its claim is not made durable. Here the run is under `Report`
// on the call, in a `Rerun` store: its claim is durable, and a power loss while it runs leaves
// an orphan that the next `Report` call reports, without running the side effect again.
#[test]
fn a_report_call_after_a_crashed_report_call_is_told_interrupted() {
    let clock = ManualClock::new(START_MS);
    let engine = MemoryEngine::new();
    let runs = AtomicU32::new(0);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let e = store_error(
        store
            .call("pay")
            .orphan_policy(OrphanPolicy::Report)
            .run(|| {
                bump(&runs);
                engine.crash();
                Ok::<u32, io::Error>(0)
            }),
    );
    assert!(matches!(e, Error::Storage(_)), "{e}");
    drop(store);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let next = store
        .call("pay")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| Ok::<u32, io::Error>(bump(&runs)));
    let runs_now = count(&runs);
    let e = store_error(next);
    assert!(matches!(e, Error::Interrupted { attempts: 1, .. }), "{e}");
    assert_eq!(runs_now, 1, "the side effect ran again under Report");
}

// ---------------------------------------------------------------------------------------------
// Promise: what the store reports is durable (src/api/store.rs:402 "What
// inspection shows must be durable, as what a replay returns"; src/driver/state.rs module
// invariant); `Interrupted` is a statement that a run was interrupted and must be reconciled.
// Attack: store Rerun; a run's step record is written but its barrier fails (full disk): the
// claim is left Pending (in doubt), never made durable. A `Report` call in the same process is
// told `Interrupted { attempts: 1 }` — a refusal read with no durability point (refusals skip
// `durable_before_replay`). Then a power loss: the claim and the step vanish, and the next
// `Report` call silently runs the charge again, contradicting what the store said.
#[test]
fn an_interrupted_report_is_not_forgotten_by_a_power_loss() {
    let clock = ManualClock::new(START_MS);
    let engine = MemoryEngine::new();
    let charges = AtomicU32::new(0);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let first = store.execute_steps("pay", |ctx| {
        let c = ctx.step("charge", || {
            // The step's own barrier fails (whatever came before it).
            engine.fail_nth_barrier(1);
            Ok::<_, io::Error>(bump(&charges))
        })?;
        Ok::<u32, StepError<io::Error>>(c)
    });
    assert!(first.is_err(), "{first:?}");
    assert_eq!(count(&charges), 1);
    let e = store_error(
        store
            .call("pay")
            .orphan_policy(OrphanPolicy::Report)
            .run(|| Ok::<u32, io::Error>(99)),
    );
    assert!(matches!(e, Error::Interrupted { attempts: 1, .. }), "{e}");
    engine.crash();
    drop(store);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let again = store
        .call("pay")
        .orphan_policy(OrphanPolicy::Report)
        .run_steps(|ctx| {
            let c = ctx.step("charge", || Ok::<_, io::Error>(bump(&charges)))?;
            Ok::<u32, StepError<io::Error>>(c)
        });
    let charges_now = count(&charges);
    let e = store_error(again);
    assert!(
        matches!(e, Error::Interrupted { .. }),
        "reported Interrupted before the power loss, now: {e}"
    );
    assert_eq!(charges_now, 1, "the charge ran again under Report");
}

// ---------------------------------------------------------------------------------------------
// DEFECT (expected). As above, through the async API's cancellation (src/driver/
// execute_async.rs RunGuard, `Phase::Running`: "the claim is left to the orphan policy").
// Store Rerun; an async call is dropped while its operation runs; a Report call is told
// `Interrupted`; a power loss; the next Report call runs the operation again.
#[test]
fn an_async_cancellation_reported_interrupted_is_not_forgotten_by_a_power_loss() {
    let clock = ManualClock::new(START_MS);
    let engine = MemoryEngine::new();
    let runs = Arc::new(AtomicU32::new(0));
    let store = Arc::new(open(&engine, &clock, OrphanPolicy::Rerun));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let s = Arc::clone(&store);
        let r = Arc::clone(&runs);
        let task = tokio::spawn(async move {
            let _ = s
                .execute_once_async("pay", move || async move {
                    bump(&r);
                    let _ = started_tx.send(());
                    std::future::pending::<()>().await;
                    Ok::<u32, io::Error>(0)
                })
                .await;
        });
        started_rx.await.expect("the operation started");
        task.abort();
        let _ = task.await;
    });
    assert_eq!(count(&runs), 1);
    let e = store_error(
        store
            .call("pay")
            .orphan_policy(OrphanPolicy::Report)
            .run(|| Ok::<u32, io::Error>(99)),
    );
    assert!(matches!(e, Error::Interrupted { attempts: 1, .. }), "{e}");
    engine.crash();
    drop(store);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let again = store
        .call("pay")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| Ok::<u32, io::Error>(bump(&runs)));
    let runs_now = count(&runs);
    let e = store_error(again);
    assert!(
        matches!(e, Error::Interrupted { .. }),
        "reported Interrupted before the power loss, now: {e}"
    );
    assert_eq!(runs_now, 1, "the operation ran again under Report");
}

// ---------------------------------------------------------------------------------------------
// Promise: README §2 table, last row, and design §6: a storage error after `f` ran → `Storage`;
// under `Report` the next call finds an orphan (reported) or the outcome; under `Rerun` it may
// also find nothing after a power loss (the claim made no durable point of its own), and then
// runs `f` again, once, as it would over an orphan. (First written against the older wording,
// "an orphan or the outcome" for both policies.)
#[test]
fn a_storage_error_after_f_ran_leaves_an_orphan_or_the_outcome() {
    for policy in [OrphanPolicy::Report, OrphanPolicy::Rerun] {
        let clock = ManualClock::new(START_MS);
        let engine = MemoryEngine::new();
        let runs = AtomicU32::new(0);
        let store = open(&engine, &clock, policy);
        let e = store_error(store.execute_once("k", || {
            // The outcome's barrier fails (armed inside f: whatever barriers came before).
            engine.fail_nth_barrier(1);
            Ok::<u32, io::Error>(bump(&runs))
        }));
        assert!(matches!(e, Error::Storage(_)), "{policy:?}: {e}");
        assert_eq!(count(&runs), 1, "f ran");
        engine.crash();
        drop(store);
        let store = open(&engine, &clock, policy);
        let found = store.record("k").unwrap().map(|i| i.state);
        match (policy, found) {
            (_, Some(RecordState::Pending | RecordState::Completed)) => {}
            (OrphanPolicy::Rerun, None) => {}
            (policy, found) => panic!("{policy:?}: after the power loss the key holds {found:?}"),
        }
        let next = store.execute_once("k", || Ok::<u32, io::Error>(bump(&runs)));
        match (policy, found, next) {
            (_, Some(RecordState::Completed), Ok(out)) => assert!(out.is_replayed()),
            (OrphanPolicy::Report, Some(RecordState::Pending), Err(ExecuteError::Store(e))) => {
                assert!(matches!(e, Error::Interrupted { .. }), "{e}")
            }
            (OrphanPolicy::Rerun, _, Ok(out)) => assert_eq!(*out, 2, "f ran once more"),
            (policy, found, next) => panic!("{policy:?}, found {found:?}: {next:?}"),
        }
        assert!(
            count(&runs) <= 2,
            "{policy:?}: f ran {} times",
            count(&runs)
        );
        let again = store.execute_once("k", || Ok::<u32, io::Error>(bump(&runs)));
        assert!(
            again
                .as_ref()
                .map_or(policy == OrphanPolicy::Report, |o| o.is_replayed()),
            "{policy:?}: {again:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Promise (inspection): src/api/store.rs:402 ("What inspection shows must be
// durable, as what a replay returns"). Under Rerun, `record()` read while f runs shows a
// Pending record (attempts 1) that no durable point covers; a power loss then erases it. (The
// README does say "a run a crash interrupted may then leave no record"; `record()`'s own
// comment still claims durability.)
#[test]
fn what_record_shows_while_f_runs_survives_a_power_loss() {
    let clock = ManualClock::new(START_MS);
    let engine = MemoryEngine::new();
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let seen = std::cell::Cell::new(None);
    let e = store_error(store.execute_once("k", || {
        seen.set(store.record("k").unwrap().map(|i| (i.state, i.attempts)));
        engine.crash();
        Ok::<u32, io::Error>(0)
    }));
    assert!(matches!(e, Error::Storage(_)), "{e}");
    assert_eq!(seen.get(), Some((RecordState::Pending, 1)));
    drop(store);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let after = store.record("k").unwrap().map(|i| (i.state, i.attempts));
    assert_eq!(
        after,
        seen.get(),
        "inspection showed a record a power loss erased"
    );
}

// ---------------------------------------------------------------------------------------------
// SURVIVED (expected). Store Report, call Rerun: the store's policy keeps the claim durable, so
// a power loss mid-run leaves an orphan the next (default Report) call reports. And store
// Rerun, call Report: the next Rerun call takes the orphan over (counted).
#[test]
fn store_report_with_a_rerun_call_and_the_reverse_keep_the_claim() {
    let clock = ManualClock::new(START_MS);
    // Store Report, call Rerun.
    let engine = MemoryEngine::new();
    let runs = AtomicU32::new(0);
    let store = open(&engine, &clock, OrphanPolicy::Report);
    let _ = store
        .call("pay")
        .orphan_policy(OrphanPolicy::Rerun)
        .run(|| {
            bump(&runs);
            engine.crash();
            Ok::<u32, io::Error>(0)
        });
    drop(store);
    let store = open(&engine, &clock, OrphanPolicy::Report);
    let e = store_error(store.execute_once("pay", || Ok::<u32, io::Error>(bump(&runs))));
    assert!(matches!(e, Error::Interrupted { attempts: 1, .. }), "{e}");
    assert_eq!(count(&runs), 1);
    assert_eq!(store.stats().orphans_reported, 1);
    drop(store);

    // Store Rerun, call Report; then a Rerun call.
    let engine = MemoryEngine::new();
    let runs = AtomicU32::new(0);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let _ = store
        .call("pay")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| {
            bump(&runs);
            engine.crash();
            Ok::<u32, io::Error>(0)
        });
    drop(store);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let out = store
        .execute_once("pay", || Ok::<u32, io::Error>(bump(&runs)))
        .unwrap();
    assert_eq!((*out, out.record().attempts), (2, 2));
    assert_eq!(store.stats().orphans_recovered, 1);
    assert_eq!(store.stats().executions, 1);
}

// ---------------------------------------------------------------------------------------------
// SURVIVED (expected). The leader's outcome barrier fails under Rerun (its first barrier now):
// the leader gets `Storage`; a waiter in another thread, and the next call, replay the outcome
// only after a durability point of their own, and it survives a power loss; f ran once.
#[test]
fn waiters_replay_only_a_durable_outcome_after_the_leaders_barrier_failed() {
    let clock = ManualClock::new(START_MS);
    let engine = MemoryEngine::new();
    let runs = AtomicU32::new(0);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let entered = AtomicBool::new(false);
    let release = AtomicBool::new(false);
    std::thread::scope(|s| {
        let leader = s.spawn(|| {
            store.execute_once("k", || {
                entered.store(true, Ordering::SeqCst);
                while !release.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
                engine.fail_nth_barrier(1);
                Ok::<u32, io::Error>(bump(&runs))
            })
        });
        while !entered.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let waiter =
            s.spawn(|| store.execute_once("k", || Ok::<u32, io::Error>(bump(&runs) + 100)));
        // Let the waiter reach the key (it waits on the running leader either way).
        while store.stats().waits == 0 {
            std::thread::yield_now();
        }
        release.store(true, Ordering::SeqCst);
        let l = leader.join().unwrap();
        assert!(
            matches!(l, Err(ExecuteError::Store(Error::Storage(_)))),
            "{l:?}"
        );
        let w = waiter.join().unwrap().unwrap();
        assert_eq!((*w, w.is_replayed()), (1, true));
    });
    assert_eq!(count(&runs), 1);
    engine.crash();
    drop(store);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let out = store
        .execute_once("k", || Ok::<u32, io::Error>(bump(&runs) + 100))
        .unwrap();
    assert_eq!((*out, out.is_replayed()), (1, true));
    assert_eq!(count(&runs), 1);
}

// ---------------------------------------------------------------------------------------------
// SURVIVED (expected). A crash matrix: for each state the key is in before the call (absent, a
// retryable failure, an expired outcome, an orphan, an expired life with steps), for each
// store policy × call override, a power loss at every write and every barrier of a two-step
// run (and always after it returns). Then: a returned outcome replays and nothing reruns; a
// step that returned its value never runs again; when the claim had to be durable
// (`claim_must_be_durable`) and f started without an outcome, the key is Pending with the
// run's attempt; under effective Rerun the next call finishes; no record outlives its TTL past
// a sweep (every durable record has its index entry).

#[derive(Clone, Copy, Debug, PartialEq)]
enum Prior {
    Absent,
    Retryable,
    ExpiredCompleted,
    Orphan,
    ExpiredSteps,
}

#[derive(Default)]
struct Counts {
    f: AtomicU32,
    a: AtomicU32,
    b: AtomicU32,
    a_returned: AtomicBool,
    b_returned: AtomicBool,
    attempt: AtomicU32,
}

fn two_steps(
    c: &Counts,
) -> impl FnOnce(&mut idemstore::Context<'_>) -> Result<u32, StepError<io::Error>> + '_ {
    move |ctx| {
        bump(&c.f);
        c.attempt.store(ctx.attempt(), Ordering::SeqCst);
        let a = ctx.step("a", || Ok::<_, io::Error>(bump(&c.a)))?;
        c.a_returned.store(true, Ordering::SeqCst);
        let b = ctx.step("b", || Ok::<_, io::Error>(bump(&c.b)))?;
        c.b_returned.store(true, Ordering::SeqCst);
        Ok(a * 10 + b)
    }
}

fn prepare(engine: &MemoryEngine, clock: &ManualClock, prior: Prior) {
    let store = open(engine, clock, OrphanPolicy::Rerun);
    match prior {
        Prior::Absent => {}
        Prior::Retryable => {
            let r = store.execute_once("k", || Err::<u32, io::Error>(io::Error::other("later")));
            assert!(r.is_err());
        }
        Prior::ExpiredCompleted => {
            store.execute_once("k", || Ok::<u32, io::Error>(5)).unwrap();
            clock.advance(TTL * 2);
        }
        Prior::Orphan => {
            let _ = store.call("k").orphan_policy(OrphanPolicy::Report).run(|| {
                engine.crash();
                Ok::<u32, io::Error>(0)
            });
        }
        Prior::ExpiredSteps => {
            let c = Counts::default();
            store.execute_steps("k", two_steps(&c)).unwrap();
            clock.advance(TTL * 2);
        }
    }
    drop(store);
}

#[test]
fn crash_matrix_over_every_prior_state_and_policy_mix() {
    let priors = [
        Prior::Absent,
        Prior::Retryable,
        Prior::ExpiredCompleted,
        Prior::Orphan,
        Prior::ExpiredSteps,
    ];
    let mixes = [
        (OrphanPolicy::Rerun, None),
        (OrphanPolicy::Rerun, Some(OrphanPolicy::Report)),
        (OrphanPolicy::Report, None),
        (OrphanPolicy::Report, Some(OrphanPolicy::Rerun)),
    ];
    let mut runs = 0;
    for prior in priors {
        for (store_policy, call_policy) in mixes {
            for at_barrier in [false, true] {
                for n in 1..=12u64 {
                    crash_case(prior, store_policy, call_policy, at_barrier, n);
                    runs += 1;
                }
            }
        }
    }
    assert!(runs > 0);
}

fn crash_case(
    prior: Prior,
    store_policy: OrphanPolicy,
    call_policy: Option<OrphanPolicy>,
    at_barrier: bool,
    n: u64,
) {
    let what =
        format!("{prior:?} store={store_policy:?} call={call_policy:?} barrier={at_barrier} n={n}");
    let clock = ManualClock::new(START_MS);
    let engine = MemoryEngine::new();
    prepare(&engine, &clock, prior);
    let effective = call_policy.unwrap_or(store_policy);
    let claim_durable =
        store_policy == OrphanPolicy::Report || call_policy == Some(OrphanPolicy::Report);
    let store = open(&engine, &clock, store_policy);
    let call = |store: &Store<MemoryEngine>, c: &Counts| {
        let mut call = store.call("k");
        if let Some(p) = call_policy {
            call = call.orphan_policy(p);
        }
        call.run_steps(two_steps(c))
    };
    let c = Counts::default();
    match at_barrier {
        true => engine.crash_at_nth_barrier(n),
        false => engine.crash_at_nth_write(n),
    }
    let first = call(&store, &c);
    disarm(&engine);
    engine.crash();
    drop(store);

    let store = open(&engine, &clock, store_policy);
    let f_started = count(&c.f) > 0;
    let (a0, b0, f0) = (count(&c.a), count(&c.b), count(&c.f));
    let a_returned = c.a_returned.load(Ordering::SeqCst);
    let b_returned = c.b_returned.load(Ordering::SeqCst);
    if let Ok(out) = &first {
        // A returned outcome survives the power loss and replays.
        let again =
            call(&store, &c).unwrap_or_else(|e| panic!("{what}: returned outcome lost: {e:?}"));
        assert_eq!((*again, again.is_replayed()), (**out, true), "{what}");
        assert_eq!(count(&c.f), f0, "{what}: f reran after a returned outcome");
        return;
    }
    if f_started && claim_durable {
        let info = store.record("k").unwrap();
        let info = info.unwrap_or_else(|| panic!("{what}: a durable claim was lost"));
        assert!(
            info.state == RecordState::Pending || info.state == RecordState::Completed,
            "{what}: {info:?}"
        );
        if info.state == RecordState::Pending {
            assert!(
                info.attempts <= count(&c.attempt),
                "{what}: attempts {} vs run's {}",
                info.attempts,
                count(&c.attempt)
            );
        }
    }
    // Recovery: a call with the same options; if Interrupted, reconcile with Rerun.
    let next = call(&store, &c);
    let out = match next {
        Ok(out) => out,
        Err(ExecuteError::Store(Error::Interrupted { .. })) => {
            assert_eq!(
                effective,
                OrphanPolicy::Report,
                "{what}: Interrupted under Rerun"
            );
            store
                .call("k")
                .orphan_policy(OrphanPolicy::Rerun)
                .run_steps(two_steps(&c))
                .unwrap_or_else(|e| panic!("{what}: reconciled rerun failed: {e:?}"))
        }
        Err(e) => panic!("{what}: recovery failed: {e:?}"),
    };
    // Steps that returned their value before the power loss never run again.
    if a_returned {
        assert_eq!(count(&c.a), a0, "{what}: step a reran after it returned");
    }
    if b_returned {
        assert_eq!(count(&c.b), b0, "{what}: step b reran after it returned");
    }
    assert!(count(&c.f) <= 3, "{what}: f ran {} times", count(&c.f));
    let replay = call(&store, &c).unwrap();
    assert_eq!((*replay, replay.is_replayed()), (*out, true), "{what}");
    // Nothing outlives its TTL past a sweep.
    clock.advance(TTL * 4);
    store.sweep_now().unwrap();
    clock.set(START_MS);
    let left = store.records().count();
    assert_eq!(
        left, 0,
        "{what}: a record outlived a sweep (no index entry)"
    );
    let _ = (f_started, f0);
}

// ---------------------------------------------------------------------------------------------
// SURVIVED (expected). `forget_retryable_errors` under Rerun over a FailedRetryable record: the
// release is durable; a power loss after it leaves no record; the next call is attempt 1.
#[test]
fn forget_retryable_release_under_rerun_survives_a_power_loss() {
    let clock = ManualClock::new(START_MS);
    let engine = MemoryEngine::new();
    let runs = AtomicU32::new(0);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    let _ = store.execute_once("k", || Err::<u32, io::Error>(io::Error::other("x")));
    let r = store.call("k").forget_retryable_errors().run(|| {
        bump(&runs);
        Err::<u32, io::Error>(io::Error::other("y"))
    });
    assert!(matches!(r, Err(ExecuteError::Operation { .. })), "{r:?}");
    engine.crash();
    drop(store);
    let store = open(&engine, &clock, OrphanPolicy::Rerun);
    assert_eq!(store.record("k").unwrap(), None);
    let out = store
        .execute_once("k", || Ok::<u32, io::Error>(bump(&runs)))
        .unwrap();
    assert_eq!((*out, out.record().attempts), (2, 1));
}
