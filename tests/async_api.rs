//! The async API on real engines (sled in temp dirs, PostgreSQL when configured): the same
//! contract as the sync calls, no blocked runtime worker while a same-key call is waited for,
//! and cancellation: a dropped call leaves nothing (before its claim), an orphan for the
//! orphan policy (after it), never a key stuck until its TTL and never a run beyond the
//! contract.

mod common;

use common::pg::{pg_url, PgSchema};
use common::stall::{until_a_barrier_is_stalled, StallWatch, STALL_LIMIT};
use common::{store_error, Scratch};
use idemstore::{Error, ExecuteError, OrphanPolicy, StepError, StoreBuilder};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn assert_send<T: Send>(_: &T) {}

/// One runtime thread: while one task waits for a same-key call held by another task, a third
/// task keeps making progress, and the waiter then replays the holder's outcome.
#[test]
fn a_same_key_wait_never_blocks_the_runtime_thread() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    current_thread().block_on(async {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (started, has_started) = tokio::sync::oneshot::channel::<()>();
        let holder = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async move {
                        started.send(()).expect("test alive");
                        released.await.expect("released");
                        Ok::<_, std::io::Error>(7u32)
                    })
                    .await
            })
        };
        has_started.await.expect("holder started");
        let waiter = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async { Ok::<_, std::io::Error>(0u32) })
                    .await
            })
        };
        assert_send(&waiter);
        // The ticker runs on the same (only) thread while the waiter waits.
        let ticks = Arc::new(AtomicU64::new(0));
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            ticks.fetch_add(1, Ordering::SeqCst);
        }
        assert!(
            !waiter.is_finished(),
            "the waiter is still waiting for the holder"
        );
        assert_eq!(ticks.load(Ordering::SeqCst), 50);
        release.send(()).expect("holder alive");
        let held = holder.await.expect("join").expect("holder");
        let waited = waiter.await.expect("join").expect("waiter");
        assert_eq!((*held, held.is_replayed()), (7, false));
        assert_eq!((*waited, waited.is_replayed()), (7, true));
    });
}

/// The futures are `Send` (so they fit `tokio::spawn` and web handlers), for plain calls,
/// builder calls and steps.
#[test]
fn the_futures_are_send() {
    let scratch = Scratch::new();
    let store = scratch.open();
    let plain = store.execute_once_async("a", || async { Ok::<_, std::io::Error>(1u8) });
    assert_send(&plain);
    let built = store
        .call("b")
        .permanent_if(|_: &String| true)
        .run_async(|| async { Ok::<_, String>(1u8) });
    assert_send(&built);
    let steps = store.execute_steps_async("c", |ctx| async move {
        ctx.step("s", || async { Ok::<_, std::io::Error>(1u8) })
            .await
    });
    assert_send(&steps);
}

/// The contract, async: run once, replay, permanent errors replayed, retryable errors run
/// again, fingerprints, a panic leaves the key retryable.
#[test]
fn async_calls_keep_the_contract() {
    let scratch = Scratch::new();
    let store = scratch.open();
    current_thread().block_on(async {
        let runs = AtomicU32::new(0);
        let op = |v: u32| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, String>(v) }
        };
        let first = store.execute_once_async("k", || op(1)).await.expect("run");
        let again = store
            .execute_once_async("k", || op(2))
            .await
            .expect("replay");
        assert_eq!((*first, *again, again.is_replayed()), (1, 1, true));
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        let permanent = store
            .call("p")
            .permanent_if(|e: &String| e == "declined")
            .run_async(|| async { Err::<u32, _>(String::from("declined")) })
            .await;
        assert!(matches!(
            permanent,
            Err(ExecuteError::Operation {
                replayed: false,
                ..
            })
        ));
        let replayed = store
            .call("p")
            .permanent_if(|e: &String| e == "declined")
            .run_async(|| async { Ok::<u32, String>(5) })
            .await;
        assert!(matches!(
            replayed,
            Err(ExecuteError::Operation { replayed: true, .. })
        ));

        let retry = store
            .execute_once_async("r", || async { Err::<u32, _>(String::from("later")) })
            .await;
        assert!(matches!(
            retry,
            Err(ExecuteError::Operation {
                replayed: false,
                ..
            })
        ));
        let ok = store
            .execute_once_async("r", || async { Ok::<u32, String>(3) })
            .await;
        assert_eq!(ok.expect("runs again").record().attempts, 2);

        let fp = idemstore::Fingerprint::of(&"body-1").expect("fingerprint");
        let other = idemstore::Fingerprint::of(&"body-2").expect("fingerprint");
        store
            .call("f")
            .fingerprint(fp)
            .run_async(|| async { Ok::<u32, String>(1) })
            .await
            .expect("run");
        let mismatch = store
            .call("f")
            .fingerprint(other)
            .run_async(|| async { Ok::<u32, String>(2) })
            .await;
        assert!(matches!(
            store_error(mismatch),
            Error::FingerprintMismatch { .. }
        ));
    });
    // A panic inside the operation's future: the key is retryable, the panic continues.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        current_thread().block_on(store.execute_once_async("boom", || async {
            panic!("the operation panicked");
            #[allow(unreachable_code)]
            Ok::<u32, String>(0)
        }))
    }));
    assert!(caught.is_err(), "the panic reaches the caller");
    let after = current_thread()
        .block_on(store.execute_once_async("boom", || async { Ok::<u32, String>(9) }))
        .expect("runs again after a panic");
    assert_eq!((*after, after.record().attempts), (9, 2));
}

/// Async steps: recorded steps replay on the next attempt; only the rest runs.
#[test]
fn async_steps_replay_recorded_steps() {
    let scratch = Scratch::new();
    let store = scratch.open();
    current_thread().block_on(async {
        let charges = AtomicU32::new(0);
        let mails = AtomicU32::new(0);
        for attempt in 1..=2u32 {
            let (charges, mails) = (&charges, &mails);
            let r = store
                .execute_steps_async("checkout", |ctx| async move {
                    let charge = ctx
                        .step("charge", || async {
                            charges.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, String>(4200u64)
                        })
                        .await?;
                    ctx.step("confirm", || async {
                        mails.fetch_add(1, Ordering::SeqCst);
                        if attempt == 1 {
                            Err(String::from("smtp down"))
                        } else {
                            Ok(())
                        }
                    })
                    .await?;
                    Ok::<_, StepError<String>>(charge)
                })
                .await;
            assert_eq!(r.is_ok(), attempt == 2);
        }
        assert_eq!(
            (charges.load(Ordering::SeqCst), mails.load(Ordering::SeqCst)),
            (1, 2)
        );
        assert_eq!(store.steps("checkout").expect("steps").len(), 2);
    });
}

/// Cancellation: a call dropped while its operation runs leaves an orphan at once: `Report`
/// says `Interrupted`, `Rerun` runs again (attempt 2) and replays the recorded steps; a call
/// dropped while it waits for another call leaves nothing.
#[test]
fn a_dropped_call_is_an_interruption_never_a_stuck_key() {
    let scratch = Scratch::new();
    let store = scratch.open();
    current_thread().block_on(async {
        let charges = AtomicU32::new(0);
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            store.execute_steps_async("k", |ctx| {
                let charges = &charges;
                async move {
                    ctx.step("charge", || async {
                        charges.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, String>(1u32)
                    })
                    .await?;
                    std::future::pending::<()>().await;
                    Ok::<u32, StepError<String>>(0)
                }
            }),
        )
        .await;
        assert!(dropped.is_err(), "the call was cancelled by the timeout");
        let info = store.record("k").expect("record").expect("present");
        assert_eq!(info.state, idemstore::RecordState::Pending);
        let reported = store
            .call("k")
            .orphan_policy(OrphanPolicy::Report)
            .wait_timeout(Duration::ZERO)
            .run_async(|| async { Ok::<u32, String>(0) })
            .await;
        assert!(matches!(
            store_error(reported),
            Error::Interrupted { attempts: 1, .. }
        ));
        let rerun = store
            .execute_steps_async("k", |ctx| {
                let charges = &charges;
                async move {
                    let c = ctx
                        .step("charge", || async {
                            charges.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, String>(99u32)
                        })
                        .await?;
                    Ok::<u32, StepError<String>>(c + 1)
                }
            })
            .await
            .expect("re-run under Rerun");
        assert_eq!(
            (*rerun, rerun.record().attempts),
            (2, 2),
            "the charge step replayed"
        );
        assert_eq!(charges.load(Ordering::SeqCst), 1);

        // A waiter dropped while it waits leaves the holder's call untouched.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let holder = store.execute_once_async("h", || async move {
            released.await.expect("released");
            Ok::<u32, String>(5)
        });
        let waiter = async {
            let gave_up = tokio::time::timeout(
                Duration::from_millis(30),
                store.execute_once_async("h", || async { Ok::<u32, String>(6) }),
            )
            .await;
            assert!(gave_up.is_err());
            release.send(()).expect("holder alive");
        };
        let (held, ()) = tokio::join!(holder, waiter);
        assert_eq!(*held.expect("holder"), 5);
        let again = store
            .execute_once_async("h", || async { Ok::<u32, String>(7) })
            .await
            .expect("replay");
        assert_eq!((*again, again.is_replayed()), (5, true));
    });
}

/// A replica on `schema`: a 60 s lease (only a holder's own end frees a key early), waits of
/// up to 5 s.
fn open_replica(schema: &PgSchema) -> idemstore::PgStore {
    StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(5))
        .open_postgres(schema.options().lease(Duration::from_secs(60)))
        .expect("open")
}

/// PostgreSQL: the async API works across replicas, and a call dropped while it holds its
/// claim ends its lease at once, so another replica takes over without waiting it out.
#[test]
fn postgres_async_calls_and_a_dropped_holder_free_the_key_at_once() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = || open_replica(&schema);
    let (a, b) = (open(), open());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let first = a
            .execute_once_async("k", || async { Ok::<u32, String>(1) })
            .await
            .expect("run");
        let again = b
            .execute_once_async("k", || async { Ok::<u32, String>(2) })
            .await
            .expect("replay on the other replica");
        assert_eq!((*first, *again, again.is_replayed()), (1, 1, true));

        let dropped = tokio::time::timeout(
            Duration::from_millis(200),
            a.execute_once_async("d", std::future::pending::<Result<u32, String>>),
        )
        .await;
        assert!(dropped.is_err());
        // The lease is 60 s and the wait 5 s: only an ended lease lets this run.
        let taken = b
            .execute_once_async("d", || async { Ok::<u32, String>(3) })
            .await
            .expect("taken over at once");
        assert_eq!((*taken, taken.record().attempts), (3, 2));
    });
}

/// Runs a call of `$key` on `$store` (an `Arc` of any store) whose `permanent_if` predicate
/// panics after the run (user code the store calls while it settles the result), in a task;
/// checks the panic reached it. (A macro: the engine trait a generic helper would name is
/// private.)
macro_rules! unwind_after_the_run {
    ($store:expr, $key:expr) => {{
        let store = Arc::clone($store);
        let call = tokio::spawn(async move {
            store
                .call($key)
                .permanent_if(|_: &String| -> bool { panic!("predicate panicked") })
                .run_async(|| async { Err::<u32, String>("declined".into()) })
                .await
        });
        assert!(call.await.expect_err("panicked").is_panic());
    }};
}

/// A call dropped while its written outcome waits for its durability point (a disk slow to
/// sync) leaves that wait to the blocking pool: its runtime thread goes on at once, a same-key
/// call waits until the outcome is durable (it never replays one that is not), then replays
/// it, and the outcome survives a power loss.
#[test]
fn a_call_dropped_while_its_outcome_waits_to_be_durable_blocks_no_runtime_thread() {
    let engine = idemstore::MemoryEngine::new();
    let store = Arc::new(
        engine
            .open(idemstore::Store::builder("memory"))
            .expect("open"),
    );
    let mut watch = StallWatch::new(engine.stall_barriers());
    let ran_again = Arc::new(AtomicU32::new(0));
    current_thread().block_on(async {
        let call = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async { Ok::<u32, String>(1) })
                    .await
            })
        };
        until_a_barrier_is_stalled(&engine).await;
        call.abort();
        assert!(call.await.expect_err("aborted").is_cancelled());
        assert!(
            !watch.freed_by_watchdog(),
            "the dropped call blocked the runtime thread until the barrier was freed"
        );
        let second = {
            let (store, ran_again) = (Arc::clone(&store), Arc::clone(&ran_again));
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async move {
                        ran_again.fetch_add(1, Ordering::SeqCst);
                        Ok::<u32, String>(2)
                    })
                    .await
            })
        };
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            !second.is_finished(),
            "a same-key call answered before the outcome was durable"
        );
        watch.release();
        let replay = second.await.expect("task").expect("replay");
        assert_eq!((*replay, replay.is_replayed()), (1, true));
    });
    assert_eq!(ran_again.load(Ordering::SeqCst), 0);
    drop(store);
    engine.crash();
    let store = engine
        .open(idemstore::Store::builder("memory"))
        .expect("reopen");
    let after = store
        .execute_once("k", || Ok::<u32, String>(3))
        .expect("replay after a power loss");
    assert_eq!((*after, after.is_replayed()), (1, true));
}

/// A panic in user code after the run (a `permanent_if` predicate) records a retryable failure without
/// blocking the runtime thread on its durability point: the panic reaches the caller at once,
/// a same-key call waits until the failure is durable, then runs the operation again.
#[test]
fn a_panic_after_the_run_is_recorded_without_blocking_the_runtime_thread() {
    let engine = idemstore::MemoryEngine::new();
    let store = Arc::new(
        engine
            .open(idemstore::Store::builder("memory"))
            .expect("open"),
    );
    let mut watch = StallWatch::new(engine.stall_barriers());
    current_thread().block_on(async {
        unwind_after_the_run!(&store, "p");
        assert!(
            !watch.freed_by_watchdog(),
            "recording the unwound run blocked the runtime thread until the barrier was freed"
        );
        until_a_barrier_is_stalled(&engine).await;
        let ran = Arc::new(AtomicU32::new(0));
        let second = {
            let (store, ran) = (Arc::clone(&store), Arc::clone(&ran));
            tokio::spawn(async move {
                store
                    .execute_once_async("p", || async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                        Ok::<u32, String>(7)
                    })
                    .await
            })
        };
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "a same-key call ran before the unwound run was recorded"
        );
        watch.release();
        let rerun = second.await.expect("task").expect("re-run");
        assert_eq!(
            (*rerun, rerun.is_replayed(), rerun.record().attempts),
            (7, false, 2)
        );
    });
}

/// Closing a store waits for the work a dropped call left to the blocking pool (here the
/// retryable failure a panicking `permanent_if` leaves to record, queued behind a busy pool)
/// and flushes it: once `close` returns, a power loss keeps that record.
#[test]
fn closing_a_store_waits_for_what_dropped_calls_left_to_do() {
    let engine = idemstore::MemoryEngine::new();
    let store = Arc::new(
        engine
            .open(idemstore::Store::builder("memory"))
            .expect("open"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .expect("runtime");
    // The pool's only thread is busy until `free` goes.
    let (free, freed) = std::sync::mpsc::channel::<()>();
    let (started, has_started) = tokio::sync::oneshot::channel::<()>();
    let blocker = rt.spawn_blocking(move || {
        let _ = started.send(());
        let _ = freed.recv_timeout(STALL_LIMIT);
    });
    rt.block_on(async {
        has_started.await.expect("blocker started");
        unwind_after_the_run!(&store, "p");
    });
    let freeing = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(free);
    });
    Arc::into_inner(store)
        .expect("the only handle")
        .close()
        .expect("close");
    engine.crash();
    freeing.join().expect("freeing thread");
    rt.block_on(blocker).expect("blocker");
    drop(rt);
    let store = engine
        .open(idemstore::Store::builder("memory"))
        .expect("reopen");
    let info = store.record("p").expect("read").expect("recorded");
    assert_eq!(
        (info.state, info.attempts),
        (idemstore::RecordState::FailedRetryable, 1),
        "the unwound run's record was not durable when close returned"
    );
}

/// Closing a store from the blocking pool's only thread, while the work a dropped call left
/// waits for that thread, gives up waiting for the work after a while instead of waiting for
/// itself forever: the close returns, and the work is done once the thread is free.
#[test]
fn closing_a_store_from_the_thread_its_left_work_waits_for_does_not_deadlock() {
    let engine = idemstore::MemoryEngine::new();
    let store = Arc::new(
        engine
            .open(idemstore::Store::builder("memory"))
            .expect("open"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .expect("runtime");
    let (go, gone) = std::sync::mpsc::channel::<Arc<idemstore::Store<idemstore::MemoryEngine>>>();
    let (closed, has_closed) = std::sync::mpsc::channel::<Result<(), idemstore::Error>>();
    // The pool's only thread waits for the store, then closes it there.
    let closer = rt.spawn_blocking(move || {
        let store = gone.recv().expect("the store");
        let store = Arc::into_inner(store).expect("the only handle");
        let _ = closed.send(store.close());
    });
    rt.block_on(async {
        unwind_after_the_run!(&store, "p");
    });
    go.send(store).expect("closer waiting");
    let Ok(result) = has_closed.recv_timeout(Duration::from_secs(60)) else {
        // The pool's thread is stuck: dropping the runtime would wait for it.
        std::mem::forget(rt);
        panic!("close waited for work queued behind its own thread");
    };
    result.expect("close");
    rt.block_on(closer).expect("closer");
    drop(rt);
    let store = engine
        .open(idemstore::Store::builder("memory"))
        .expect("reopen");
    let info = store.record("p").expect("read").expect("recorded");
    assert_eq!(
        (info.state, info.attempts),
        (idemstore::RecordState::FailedRetryable, 1),
        "the left work ran once the pool's thread was free"
    );
}

/// PostgreSQL: a run whose `permanent_if` predicate panics has its retryable failure written
/// from the blocking pool (a round trip, never on the runtime's workers); the panic reaches the
/// caller, the key is free at once afterwards, and the next call (on another replica too)
/// runs again as attempt 2.
#[test]
fn postgres_a_panic_after_the_run_is_recorded_from_the_blocking_pool() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = || open_replica(&schema);
    let (a, b) = (Arc::new(open()), open());
    current_thread().block_on(async {
        unwind_after_the_run!(&a, "p");
        let again = a
            .execute_once_async("p", || async { Ok::<u32, String>(7) })
            .await
            .expect("re-run on the same replica");
        assert_eq!(
            (*again, again.is_replayed(), again.record().attempts),
            (7, false, 2)
        );
    });
    let replayed = b
        .execute_once("p", || Ok::<u32, String>(8))
        .expect("replay on the other replica");
    assert_eq!((*replayed, replayed.is_replayed()), (7, true));
}
