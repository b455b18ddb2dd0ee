//! Adversarial tests of c56f494: an async call dropped while its written outcome waits for
//! its durability point (or whose `permanent_if` predicate panics after the run) leaves its
//! last write/sync to a task of tokio's blocking pool, which holds the key's (detached)
//! leadership until the work is done.
//!
//! Promises attacked: no runtime thread blocks on a device for a dropped call; no same-key
//! call of this process replays an outcome before it is durable, or runs `f` again while the
//! dropped call's last work is pending; the key is released once that work is done (even if
//! it fails); a replayed outcome survives a power loss; runtime shutdown, multi-thread
//! runtimes, many dropped calls, forgetting calls, steps, sync calls mixed in; closing a sled
//! store while the work is pending and opening its path again.
//!
//! Every wait is bounded (a barrier stall is freed by a watchdog after [`STALL_LIMIT`], polls
//! give up after [`PATIENCE`]): a test fails rather than hangs.

mod common;

use common::calls::{current_thread, multi_thread};
use common::stall::{StallWatch, STALL_LIMIT};
use idemstore::{ExecuteError, MemoryEngine, StepError, Store};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PATIENCE: Duration = Duration::from_secs(30);

type MemStore = Store<MemoryEngine>;

fn open_memory(engine: &MemoryEngine) -> MemStore {
    engine.open(Store::builder("memory")).expect("open")
}

/// Polls (from a plain thread) until `done`; panics naming `what` after [`PATIENCE`].
fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Polls (from a task) until `done`; panics naming `what` after [`PATIENCE`].
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Lets time pass (a hundred milliseconds, in short sleeps) for something that must not
/// happen to have its chance.
fn let_time_pass() {
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(5));
    }
}

async fn let_time_pass_async() {
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A memory store's key `k` replays `value` after a power loss.
fn replays_after_power_loss(engine: &MemoryEngine, store: MemStore, keys: &[(&str, u32)]) {
    drop(store);
    engine.crash();
    let store = open_memory(engine);
    for &(key, value) in keys {
        let after = store
            .execute_once(key, || Ok::<u32, String>(999))
            .unwrap_or_else(|e| panic!("{key}: replay after a power loss: {e}"));
        assert_eq!(
            (*after, after.is_replayed()),
            (value, true),
            "{key}: a replayed outcome was lost in a power loss"
        );
    }
}

/// Promise 6. A sled store closed while a dropped call's last work (here: the retryable
/// failure a panicking `permanent_if` leaves to record) still waits in the blocking pool
/// (busy: one thread, taken), then its path opened again: `close` waits for that work (the
/// queued task holds the engine, and with it sled's file lock), so the path opens at once.
/// Found failing with `Locked` after c56f494, when `close` did not wait for it.
#[test]
fn a_sled_path_reopens_after_close_while_a_dropped_calls_work_is_queued() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("db");
    let store = Arc::new(Store::open(&path).expect("open"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .expect("runtime");
    // The blocking pool's only thread is busy until `free` is dropped (or 30 s pass).
    let (free, freed) = std::sync::mpsc::channel::<()>();
    let (started, has_started) = tokio::sync::oneshot::channel::<()>();
    let blocker = rt.spawn_blocking(move || {
        let _ = started.send(());
        let _ = freed.recv_timeout(STALL_LIMIT);
    });
    rt.block_on(async {
        has_started.await.expect("blocker started");
        let call = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .call("p")
                    .permanent_if(|_: &String| -> bool { panic!("predicate panicked") })
                    .run_async(|| async { Err::<u32, String>("declined".into()) })
                    .await
            })
        };
        let joined = tokio::time::timeout(PATIENCE, call)
            .await
            .expect("the panic reached the caller");
        assert!(joined.expect_err("panicked").is_panic());
    });
    let store = Arc::into_inner(store).expect("the only handle");
    // The pool is freed from another thread while `close` waits for the queued work.
    let freeing = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(free);
    });
    let closed = store.close();
    let reopened = Store::open(&path);
    freeing.join().expect("freeing thread");
    // The queued work has run; stop the runtime (it joins its pool).
    rt.block_on(blocker).expect("blocker");
    drop(rt);
    let reopened = match reopened {
        Ok(store) => store,
        Err(e) => panic!(
            "closing the store returned ({closed:?}) but its path could not be opened again \
             while the dropped call's work waited in the blocking pool: {e:?}"
        ),
    };
    closed.expect("close");
    let rerun = reopened
        .call("p")
        .run(|| Ok::<u32, String>(7))
        .expect("re-run");
    assert_eq!(
        (*rerun, rerun.is_replayed(), rerun.record().attempts),
        (7, false, 2)
    );
}

/// Promise 2, forgetting calls. A call that forgets retryable errors removes its claim, then
/// waits for the removal's durability point; dropped during that wait, it must hold the key
/// as a dropped call whose outcome waits for its durability point does: no same-key call
/// runs `f` while that wait is pending. (Found failing: `write_outcome`'s forgetting branch
/// set `Phase::Done` before `durable_async`, so the guard's drop left nothing and the key was
/// released at once.)
#[test]
fn a_forgetting_call_dropped_while_its_removal_waits_to_be_durable_holds_the_key() {
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let mut watch = StallWatch::new(engine.stall_barriers());
    let ran = Arc::new(AtomicU32::new(0));
    let ran_while_pending = current_thread().block_on(async {
        let call = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .call("f")
                    .forget_retryable_errors()
                    .run_async(|| async { Err::<u32, String>("busy".into()) })
                    .await
            })
        };
        until("the removal's barrier to stall", || {
            engine.stalled_barriers() > 0
        })
        .await;
        call.abort();
        assert!(call.await.expect_err("aborted").is_cancelled());
        let second = {
            let (store, ran) = (Arc::clone(&store), Arc::clone(&ran));
            tokio::spawn(async move {
                store
                    .call("f")
                    .forget_retryable_errors()
                    .run_async(|| async move {
                        ran.fetch_add(1, Ordering::SeqCst);
                        Ok::<u32, String>(2)
                    })
                    .await
            })
        };
        let_time_pass_async().await;
        let ran_while_pending = ran.load(Ordering::SeqCst);
        watch.release();
        let second = second.await.expect("task").expect("second call");
        assert_eq!((*second, second.is_replayed()), (2, false));
        ran_while_pending
    });
    assert!(!watch.freed_by_watchdog());
    assert_eq!(
        ran_while_pending, 0,
        "a same-key call ran f while the dropped call's removal still waited for its \
         durability point (the key was released before it)"
    );
}

/// Promise 5 (runtime shutdown), 2 and 4. The runtime is dropped right after the call is
/// aborted, so the call's future is dropped while the runtime shuts down and its work is
/// queued on a pool that is shutting down: the work still happens, the key is held until the
/// outcome is durable (a sync same-key call waits), then replayed, and survives a crash.
#[test]
fn a_runtime_dropped_right_after_the_abort_still_finishes_the_wait_and_holds_the_key() {
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let mut watch = StallWatch::new(engine.stall_barriers());
    let rt = current_thread();
    let call = {
        let store = Arc::clone(&store);
        rt.spawn(async move {
            store
                .execute_once_async("k", || async { Ok::<u32, String>(1) })
                .await
        })
    };
    rt.block_on(until("the outcome's barrier to stall", || {
        engine.stalled_barriers() > 0
    }));
    call.abort();
    let dropper = std::thread::spawn(move || drop(rt));
    let ran_again = Arc::new(AtomicU32::new(0));
    let follower = {
        let (store, ran_again) = (Arc::clone(&store), Arc::clone(&ran_again));
        std::thread::spawn(move || {
            store.execute_once("k", || {
                ran_again.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, String>(2)
            })
        })
    };
    let_time_pass();
    assert!(
        !follower.is_finished(),
        "a same-key call answered before the outcome was durable: {:?}",
        follower.join().map(|r| r.map(|o| (*o, o.is_replayed())))
    );
    watch.release();
    assert!(!watch.freed_by_watchdog());
    dropper.join().expect("runtime dropped");
    let replay = follower.join().expect("follower").expect("replay");
    assert_eq!((*replay, replay.is_replayed()), (1, true));
    assert_eq!(ran_again.load(Ordering::SeqCst), 0);
    let store = Arc::into_inner(store).expect("the only handle");
    replays_after_power_loss(&engine, store, &[("k", 1)]);
}

/// As above, with `shutdown_background`: the runtime lets go at once, its pool's threads
/// finish the work, and the key stays held until then.
#[test]
fn shutdown_background_after_an_abort_keeps_the_key_until_the_outcome_is_durable() {
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let mut watch = StallWatch::new(engine.stall_barriers());
    let rt = multi_thread(2);
    let call = {
        let store = Arc::clone(&store);
        rt.spawn(async move {
            store
                .execute_once_async("k", || async { Ok::<u32, String>(1) })
                .await
        })
    };
    rt.block_on(until("the outcome's barrier to stall", || {
        engine.stalled_barriers() > 0
    }));
    call.abort();
    rt.shutdown_background();
    assert!(
        !watch.freed_by_watchdog(),
        "shutting the runtime down waited for the stalled barrier"
    );
    let follower = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || store.execute_once("k", || Ok::<u32, String>(2)))
    };
    let_time_pass();
    assert!(
        !follower.is_finished(),
        "a same-key call answered before the outcome was durable: {:?}",
        follower.join().map(|r| r.map(|o| (*o, o.is_replayed())))
    );
    watch.release();
    let replay = follower.join().expect("follower").expect("replay");
    assert_eq!((*replay, replay.is_replayed()), (1, true));
    // The detached leadership is released (the queued task ran or was dropped).
    let again = store
        .execute_once("k", || Ok::<u32, String>(3))
        .expect("replay");
    assert_eq!(*again, 1);
    let store = Arc::into_inner(store).expect("the only handle");
    replays_after_power_loss(&engine, store, &[("k", 1)]);
}

/// Promises 1, 2, 3, 4, 5 on a multi-thread runtime: six calls on distinct keys and four on
/// one key, all aborted while their outcome waits for a stalled barrier. The runtime goes
/// on (a timer fires), same-key callers (async and sync) wait, then replay the first outcome;
/// `f` ran once per key; every outcome survives a power loss.
#[test]
fn many_dropped_calls_on_a_multi_thread_runtime() {
    const DISTINCT: u32 = 6;
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let mut watch = StallWatch::new(engine.stall_barriers());
    let same_runs = Arc::new(AtomicU32::new(0));
    let ran_again = Arc::new(AtomicU32::new(0));
    let rt = multi_thread(2);
    let (leader_value, sync_follower) = rt.block_on(async {
        let mut calls = Vec::new();
        for i in 0..DISTINCT {
            let store = Arc::clone(&store);
            calls.push(tokio::spawn(async move {
                store
                    .execute_once_async(format!("k{i}"), || async move { Ok::<u32, String>(i) })
                    .await
            }));
        }
        for i in 0..4u32 {
            let (store, same_runs) = (Arc::clone(&store), Arc::clone(&same_runs));
            calls.push(tokio::spawn(async move {
                store
                    .execute_once_async("same", || async move {
                        same_runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<u32, String>(100 + i)
                    })
                    .await
            }));
        }
        let want = DISTINCT as usize + 1;
        until("every leader's barrier to stall", || {
            engine.stalled_barriers() >= want
        })
        .await;
        for call in &calls {
            call.abort();
        }
        for call in calls {
            assert!(call.await.expect_err("aborted").is_cancelled());
        }
        // The runtime's threads are free: a timer fires.
        tokio::time::timeout(PATIENCE, tokio::time::sleep(Duration::from_millis(2)))
            .await
            .expect("a timer fired");
        assert!(
            !watch.freed_by_watchdog(),
            "the dropped calls blocked the runtime's threads until the barriers were freed"
        );
        assert_eq!(same_runs.load(Ordering::SeqCst), 1);
        let mut followers = Vec::new();
        for i in 0..DISTINCT {
            let (store, ran_again) = (Arc::clone(&store), Arc::clone(&ran_again));
            followers.push(tokio::spawn(async move {
                store
                    .execute_once_async(format!("k{i}"), || async move {
                        ran_again.fetch_add(1, Ordering::SeqCst);
                        Ok::<u32, String>(1000)
                    })
                    .await
            }));
        }
        let same_follower = {
            let (store, ran_again) = (Arc::clone(&store), Arc::clone(&ran_again));
            tokio::spawn(async move {
                store
                    .execute_once_async("same", || async move {
                        ran_again.fetch_add(1, Ordering::SeqCst);
                        Ok::<u32, String>(1000)
                    })
                    .await
            })
        };
        let sync_follower = {
            let (store, ran_again) = (Arc::clone(&store), Arc::clone(&ran_again));
            std::thread::spawn(move || {
                store.execute_once("same", || {
                    ran_again.fetch_add(1, Ordering::SeqCst);
                    Ok::<u32, String>(1000)
                })
            })
        };
        let_time_pass_async().await;
        for (i, follower) in followers.iter().enumerate() {
            assert!(
                !follower.is_finished(),
                "k{i}: a same-key call answered before the outcome was durable"
            );
        }
        assert!(
            !same_follower.is_finished(),
            "same: answered before durable"
        );
        assert!(
            !sync_follower.is_finished(),
            "same (sync): answered before durable"
        );
        watch.release();
        for (i, follower) in followers.into_iter().enumerate() {
            let replay = follower.await.expect("task").expect("replay");
            assert_eq!((*replay, replay.is_replayed()), (i as u32, true), "k{i}");
        }
        let same = same_follower.await.expect("task").expect("replay");
        assert!(same.is_replayed());
        (*same, sync_follower)
    });
    let sync_same = sync_follower.join().expect("thread").expect("sync replay");
    assert_eq!((*sync_same, sync_same.is_replayed()), (leader_value, true));
    assert!((100..104).contains(&leader_value));
    assert_eq!(ran_again.load(Ordering::SeqCst), 0, "f ran again");
    assert_eq!(
        same_runs.load(Ordering::SeqCst),
        1,
        "f ran twice on one key"
    );
    drop(rt);
    let store = Arc::into_inner(store).expect("the only handle");
    let names: Vec<String> = (0..DISTINCT).map(|i| format!("k{i}")).collect();
    let mut keys: Vec<(&str, u32)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();
    keys.push(("same", leader_value));
    replays_after_power_loss(&engine, store, &keys);
}

/// Promise 2 (a failing durability point) and 4. The dropped call's own barrier and the
/// left work's barrier both wait; the first of them to run fails. The key is released; a
/// same-key call that replays does so only after a durability point of its own, so its replay
/// survives a power loss; `f` never runs again.
#[test]
fn a_failed_barrier_in_the_left_work_releases_the_key_and_replays_only_durably() {
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let mut watch = StallWatch::new(engine.stall_barriers());
    let ran_again = Arc::new(AtomicU32::new(0));
    let follower = current_thread().block_on(async {
        let call = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async { Ok::<u32, String>(1) })
                    .await
            })
        };
        until("the outcome's barrier to stall", || {
            engine.stalled_barriers() > 0
        })
        .await;
        call.abort();
        assert!(call.await.expect_err("aborted").is_cancelled());
        until("the left work's barrier to stall", || {
            engine.stalled_barriers() > 1
        })
        .await;
        engine.fail_nth_barrier(1);
        let follower = {
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
        let_time_pass_async().await;
        assert!(!follower.is_finished(), "answered before the barriers ran");
        watch.release();
        tokio::time::timeout(PATIENCE, follower)
            .await
            .expect("the key was released after the failed barrier")
            .expect("task")
    });
    assert!(!watch.freed_by_watchdog());
    assert_eq!(ran_again.load(Ordering::SeqCst), 0, "f ran again");
    let store = Arc::into_inner(store).expect("the only handle");
    match follower {
        Ok(replay) => {
            assert_eq!((*replay, replay.is_replayed()), (1, true));
            replays_after_power_loss(&engine, store, &[("k", 1)]);
        }
        // Refusing to show an outcome that may not be durable keeps the contract too.
        Err(ExecuteError::Store(_)) => {}
        Err(e) => panic!("unexpected: {e:?}"),
    }
}

/// Promise 2 and 4: a power loss during the left work's barrier. The key is released (the
/// same-key call ends, with an error while the engine is down); after reopening, the key
/// replays whatever a caller was shown.
#[test]
fn a_crash_during_the_left_barrier_releases_the_key() {
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let mut watch = StallWatch::new(engine.stall_barriers());
    let follower = current_thread().block_on(async {
        let call = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async { Ok::<u32, String>(1) })
                    .await
            })
        };
        until("the outcome's barrier to stall", || {
            engine.stalled_barriers() > 0
        })
        .await;
        call.abort();
        assert!(call.await.expect_err("aborted").is_cancelled());
        until("the left work's barrier to stall", || {
            engine.stalled_barriers() > 1
        })
        .await;
        engine.crash_at_nth_barrier(1);
        let follower = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async { Ok::<u32, String>(2) })
                    .await
            })
        };
        let_time_pass_async().await;
        assert!(!follower.is_finished(), "answered before the barriers ran");
        watch.release();
        tokio::time::timeout(PATIENCE, follower)
            .await
            .expect("the key was released after the crash")
            .expect("task")
    });
    let shown = follower.ok().map(|o| *o);
    let store = Arc::into_inner(store).expect("the only handle");
    drop(store);
    let store = open_memory(&engine);
    let after = store
        .execute_once("k", || Ok::<u32, String>(3))
        .expect("after reopen");
    if let Some(shown) = shown {
        assert_eq!(*after, shown, "a replayed outcome was lost in a power loss");
    }
}

/// Promises 2 and 5: a forgetting call whose `permanent_if` predicate panics; the removal it
/// leaves waits for a stalled barrier. A sync same-key call (another thread) waits for it,
/// then runs `f` afresh (attempt 1: no record left).
#[test]
fn a_panicking_predicate_of_a_forgetting_call_holds_the_key_from_a_sync_call() {
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let mut watch = StallWatch::new(engine.stall_barriers());
    let rt = current_thread();
    rt.block_on(async {
        let call = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .call("p")
                    .forget_retryable_errors()
                    .permanent_if(|_: &String| -> bool { panic!("predicate panicked") })
                    .run_async(|| async { Err::<u32, String>("declined".into()) })
                    .await
            })
        };
        assert!(call.await.expect_err("panicked").is_panic());
        until("the removal's barrier to stall", || {
            engine.stalled_barriers() > 0
        })
        .await;
    });
    assert!(!watch.freed_by_watchdog());
    let ran = Arc::new(AtomicU32::new(0));
    let follower = {
        let (store, ran) = (Arc::clone(&store), Arc::clone(&ran));
        std::thread::spawn(move || {
            store.call("p").forget_retryable_errors().run(|| {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, String>(7)
            })
        })
    };
    let_time_pass();
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "a sync same-key call ran f while the removal waited for its durability point"
    );
    watch.release();
    let rerun = follower.join().expect("thread").expect("re-run");
    assert_eq!(
        (*rerun, rerun.is_replayed(), rerun.record().attempts),
        (7, false, 1)
    );
    drop(rt);
}

/// Promises 1–4 with steps: a steps call dropped while its outcome waits for a stalled
/// barrier (its step was made durable before). A same-key steps call waits, replays the
/// outcome without running anything, and the outcome survives a power loss.
#[test]
fn a_steps_call_dropped_while_its_outcome_waits_to_be_durable() {
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let steps_run = Arc::new(AtomicU32::new(0));
    let mut watch: Option<StallWatch> = None;
    current_thread().block_on(async {
        let (stepped, has_stepped) = tokio::sync::oneshot::channel::<()>();
        let (go, gone) = tokio::sync::oneshot::channel::<()>();
        let call = {
            let (store, steps_run) = (Arc::clone(&store), Arc::clone(&steps_run));
            tokio::spawn(async move {
                store
                    .execute_steps_async("s", |ctx| async move {
                        let v = ctx
                            .step("one", || async {
                                steps_run.fetch_add(1, Ordering::SeqCst);
                                Ok::<u32, String>(5)
                            })
                            .await?;
                        let _ = stepped.send(());
                        let _ = gone.await;
                        Ok::<u32, StepError<String>>(v + 1)
                    })
                    .await
            })
        };
        has_stepped.await.expect("the step ran");
        watch = Some(StallWatch::new(engine.stall_barriers()));
        go.send(()).expect("the run waits");
        until("the outcome's barrier to stall", || {
            engine.stalled_barriers() > 0
        })
        .await;
        call.abort();
        assert!(call.await.expect_err("aborted").is_cancelled());
        let follower = {
            let (store, steps_run) = (Arc::clone(&store), Arc::clone(&steps_run));
            tokio::spawn(async move {
                store
                    .execute_steps_async("s", |ctx| async move {
                        let v = ctx
                            .step("one", || async {
                                steps_run.fetch_add(1, Ordering::SeqCst);
                                Ok::<u32, String>(50)
                            })
                            .await?;
                        Ok::<u32, StepError<String>>(v + 100)
                    })
                    .await
            })
        };
        let_time_pass_async().await;
        assert!(
            !follower.is_finished(),
            "a same-key call answered before the outcome was durable"
        );
        let watch = watch.as_mut().expect("stall");
        assert!(!watch.freed_by_watchdog());
        watch.release();
        let replay = follower.await.expect("task").expect("replay");
        assert_eq!((*replay, replay.is_replayed()), (6, true));
    });
    assert_eq!(steps_run.load(Ordering::SeqCst), 1);
    drop(watch);
    let store = Arc::into_inner(store).expect("the only handle");
    replays_after_power_loss(&engine, store, &[("s", 6)]);
}

/// Promise 2 with no runtime current: the call's future is polled in a runtime until its
/// outcome waits for a stalled barrier, then dropped on a plain thread (the work is done in
/// the drop there). A sync same-key call waits for it, then replays.
#[test]
fn a_call_dropped_outside_any_runtime_holds_the_key_until_durable() {
    let engine = MemoryEngine::new();
    let store = open_memory(&engine);
    let mut watch = StallWatch::new(engine.stall_barriers());
    let rt = current_thread();
    let mut fut = Box::pin(store.execute_once_async("k", || async { Ok::<u32, String>(1) }));
    rt.block_on(async {
        tokio::select! {
            done = &mut fut => panic!("the call ended under a stall: {:?}", done.map(|o| *o)),
            () = until("the outcome's barrier to stall", || engine.stalled_barriers() > 0) => {}
        }
    });
    std::thread::scope(|s| {
        let dropper = s.spawn(move || drop(fut));
        let follower = s.spawn(|| store.execute_once("k", || Ok::<u32, String>(2)));
        let_time_pass();
        assert!(
            !follower.is_finished(),
            "a same-key call answered before the outcome was durable"
        );
        watch.release();
        dropper.join().expect("dropped");
        let replay = follower.join().expect("thread").expect("replay");
        assert_eq!((*replay, replay.is_replayed()), (1, true));
    });
    assert!(!watch.freed_by_watchdog());
    drop(rt);
    replays_after_power_loss(&engine, store, &[("k", 1)]);
}

/// Promise 6 on the memory engine: the store is dropped (on another thread: its final flush
/// waits on the stall too) while the left work waits; nothing deadlocks, and the reopened
/// store replays the outcome, across a power loss too.
#[test]
fn a_memory_store_dropped_while_the_left_work_waits_then_reopened() {
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let mut watch = StallWatch::new(engine.stall_barriers());
    let rt = current_thread();
    rt.block_on(async {
        let call = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async { Ok::<u32, String>(1) })
                    .await
            })
        };
        until("the outcome's barrier to stall", || {
            engine.stalled_barriers() > 0
        })
        .await;
        call.abort();
        assert!(call.await.expect_err("aborted").is_cancelled());
        until("the left work's barrier to stall", || {
            engine.stalled_barriers() > 1
        })
        .await;
    });
    let dropper = std::thread::spawn(move || drop(store));
    let_time_pass();
    watch.release();
    assert!(!watch.freed_by_watchdog());
    dropper.join().expect("store dropped");
    drop(rt);
    let store = open_memory(&engine);
    let replay = store
        .execute_once("k", || Ok::<u32, String>(2))
        .expect("replay");
    assert_eq!((*replay, replay.is_replayed()), (1, true));
    replays_after_power_loss(&engine, store, &[("k", 1)]);
}

/// Promises 3, 5, 6 on sled (real fsync): calls aborted at varied points on a multi-thread
/// runtime. A later call replays the first call's value only if its `f` ran; after closing
/// the store (at once: nothing may hold its files) and opening the path again, every key
/// answers what it answered before the close.
#[test]
fn sled_calls_aborted_at_varied_points_then_the_path_reopened() {
    const KEYS: u32 = 40;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("db");
    let store = Arc::new(Store::open(&path).expect("open"));
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..KEYS).map(|_| AtomicU32::new(0)).collect());
    let rt = multi_thread(2);
    let answers: Vec<(u32, bool)> = rt.block_on(async {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for i in 0..KEYS {
            let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
            let call = tokio::spawn(async move {
                store
                    .execute_once_async(format!("k{i}"), || async move {
                        runs[i as usize].fetch_add(1, Ordering::SeqCst);
                        Ok::<u32, String>(i)
                    })
                    .await
            });
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            for _ in 0..(seed % 12) {
                tokio::task::yield_now().await;
            }
            if seed.is_multiple_of(3) {
                tokio::time::sleep(Duration::from_micros(seed % 500)).await;
            }
            call.abort();
            let _ = call.await;
        }
        let mut answers = Vec::new();
        for i in 0..KEYS {
            let out = tokio::time::timeout(
                PATIENCE,
                store.execute_once_async(
                    format!("k{i}"),
                    || async move { Ok::<u32, String>(1000 + i) },
                ),
            )
            .await
            .unwrap_or_else(|_| panic!("k{i}: the key is stuck"))
            .unwrap_or_else(|e| panic!("k{i}: {e}"));
            if out.is_replayed() {
                assert_eq!(*out, i, "k{i}: replayed a value no run produced");
                assert!(runs[i as usize].load(Ordering::SeqCst) >= 1);
            } else {
                assert_eq!(*out, 1000 + i);
            }
            answers.push((*out, out.is_replayed()));
        }
        answers
    });
    drop(rt);
    let store = Arc::into_inner(store).expect("the only handle");
    store.close().expect("close");
    let store = Store::open(&path).unwrap_or_else(|e| panic!("reopen after close: {e:?}"));
    for (i, (value, _)) in answers.iter().enumerate() {
        let again = store
            .execute_once(format!("k{i}"), || Ok::<u32, String>(5000))
            .expect("replay after reopen");
        assert_eq!((*again, again.is_replayed()), (*value, true), "k{i}");
    }
}

/// Promise 5: the runtime is dropped while the left work is still queued (the blocking pool
/// is busy: two threads, one taken by a blocker, one by the call's own stalled barrier). The
/// work runs (or is dropped, which does it) once a thread frees up; the key stays held until
/// the outcome is durable, is then replayed, and survives a power loss.
#[test]
fn a_runtime_dropped_while_the_left_work_is_still_queued() {
    let engine = MemoryEngine::new();
    let store = Arc::new(open_memory(&engine));
    let mut watch = StallWatch::new(engine.stall_barriers());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build()
        .expect("runtime");
    let (free, freed) = std::sync::mpsc::channel::<()>();
    let (started, has_started) = tokio::sync::oneshot::channel::<()>();
    drop(rt.spawn_blocking(move || {
        let _ = started.send(());
        let _ = freed.recv_timeout(STALL_LIMIT);
    }));
    rt.block_on(has_started).expect("blocker started");
    let call = {
        let store = Arc::clone(&store);
        rt.spawn(async move {
            store
                .execute_once_async("k", || async { Ok::<u32, String>(1) })
                .await
        })
    };
    rt.block_on(until("the outcome's barrier to stall", || {
        engine.stalled_barriers() > 0
    }));
    call.abort();
    let dropper = std::thread::spawn(move || {
        drop(call);
        drop(rt);
    });
    let ran_again = Arc::new(AtomicU32::new(0));
    let follower = {
        let (store, ran_again) = (Arc::clone(&store), Arc::clone(&ran_again));
        std::thread::spawn(move || {
            store.execute_once("k", || {
                ran_again.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, String>(2)
            })
        })
    };
    let_time_pass();
    assert!(!follower.is_finished(), "answered before the left work ran");
    // A thread frees up: the queued work runs, and waits on the stall in turn.
    drop(free);
    poll_until("the left work's barrier to stall", || {
        engine.stalled_barriers() > 1 || watch.freed_by_watchdog()
    });
    let_time_pass();
    assert!(
        !follower.is_finished(),
        "a same-key call answered before the outcome was durable: {:?}",
        follower.join().map(|r| r.map(|o| (*o, o.is_replayed())))
    );
    watch.release();
    assert!(!watch.freed_by_watchdog());
    dropper.join().expect("runtime dropped");
    let replay = follower.join().expect("follower").expect("replay");
    assert_eq!((*replay, replay.is_replayed()), (1, true));
    assert_eq!(ran_again.load(Ordering::SeqCst), 0);
    let store = Arc::into_inner(store).expect("the only handle");
    replays_after_power_loss(&engine, store, &[("k", 1)]);
}
