//! Adversarial tests of sled's async group commit (`GroupCommit::wait_durable_async`): an
//! async caller awaits a flush another caller runs, or asks the store's flusher thread for one.
//! Written against a first version that queued the asking caller's turn on its own runtime's
//! blocking pool behind one store-wide mark (`turn_queued`), which every other async caller
//! then waited behind: three of these tests failed on it (a call held up by another runtime's
//! busy pool, a deadlock between two runtimes, a current-thread runtime shut down with its turn
//! queued). The tests keep those names; the flusher thread depends on no runtime's pool.
//!
//! Promises attacked: a call returns only once durable; no waiter is ever stuck (many
//! runtimes, a saturated blocking pool, a turn dropped unrun, a runtime shut down while its
//! turn is queued, sync and async callers mixed, calls dropped/aborted mid-wait); failed
//! flushes (a full tmpfs) fail callers cleanly and nothing hangs.
//!
//! Every wait is bounded (at most ~30 s): a bug shows as a failure, not a hang. A runtime that
//! may have a stuck thread is forgotten before the test panics.

mod common;

use common::calls::{describe, multi_thread, sole_owner, CallResult};
use common::disk::{fill_up, SmallDisk};
use idemstore::Store;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How long a call that should complete is given before the test calls it stuck.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// The longest any blocker holds a blocking thread (a fail-safe, so nothing hangs forever).
const BLOCKER_LIMIT: Duration = Duration::from_secs(25);

fn open(dir: &tempfile::TempDir) -> Store {
    Store::builder(dir.path().join("db"))
        .sweep_interval(None)
        .open()
        .expect("open")
}

/// A multi-thread runtime with one worker and a single blocking thread.
fn tiny_pool_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Occupies the only blocking thread of `rt` until released (or [`BLOCKER_LIMIT`]); returns
/// once it runs, and the sender that releases it.
fn occupy_blocking_pool(rt: &tokio::runtime::Runtime) -> mpsc::Sender<()> {
    let (release, released) = mpsc::channel::<()>();
    let (started_tx, started) = mpsc::channel::<()>();
    drop(rt.spawn_blocking(move || {
        let _ = started_tx.send(());
        let _ = released.recv_timeout(BLOCKER_LIMIT);
    }));
    started
        .recv_timeout(CALL_LIMIT)
        .expect("the blocker never started");
    release
}

/// Spawns an async call of `key` on `rt` whose operation reports when it runs; returns once
/// it ran (its outcome is then written and its durability wait about to begin), plus the
/// receiver of its final result.
fn spawn_call_on(
    rt: &tokio::runtime::Runtime,
    store: &Arc<Store>,
    key: &str,
    value: u64,
) -> mpsc::Receiver<CallResult> {
    let (ran_tx, ran) = mpsc::channel::<()>();
    let (done_tx, done) = mpsc::channel::<CallResult>();
    let store = Arc::clone(store);
    let key = key.to_owned();
    drop(rt.spawn(async move {
        let r = store
            .execute_once_async(&key, || async move {
                let _ = ran_tx.send(());
                Ok::<_, std::io::Error>(value)
            })
            .await;
        let _ = done_tx.send(describe(r));
    }));
    ran.recv_timeout(CALL_LIMIT)
        .expect("the call's operation never ran");
    // Let the call write its outcome and queue its turn on the (occupied) blocking pool.
    std::thread::sleep(Duration::from_millis(300));
    done
}

/// Runtime A with its only blocking thread held by a user's task, and an async call of key
/// "a" (value 1) whose durability turn is queued behind it.
struct BusyRuntime {
    rt: tokio::runtime::Runtime,
    release: mpsc::Sender<()>,
    a_done: mpsc::Receiver<CallResult>,
}

impl BusyRuntime {
    fn start(store: &Arc<Store>) -> Self {
        let rt = tiny_pool_runtime();
        let release = occupy_blocking_pool(&rt);
        let a_done = spawn_call_on(&rt, store, "a", 1);
        Self {
            rt,
            release,
            a_done,
        }
    }

    /// Frees A's blocking thread and returns A's call's result (bounded). The runtime is
    /// leaked, not shut down, if A's call or the other call (`other_finished` false) may have
    /// a stuck thread.
    fn finish(self, other_finished: bool) -> Result<CallResult, mpsc::RecvTimeoutError> {
        let _ = self.release.send(());
        let a = self.a_done.recv_timeout(CALL_LIMIT);
        if !other_finished || a.is_err() {
            std::mem::forget(self.rt);
        }
        a
    }
}

/// Runs one async call of `key` on a fresh runtime on its own thread, bounded by
/// [`CALL_LIMIT`]; `None` if it did not finish in time (the runtime is then leaked).
fn bounded_async_call(store: &Arc<Store>, key: &str, value: u64) -> Option<CallResult> {
    let (tx, rx) = mpsc::channel::<CallResult>();
    let store = Arc::clone(store);
    let key = key.to_owned();
    std::thread::spawn(move || {
        let rt = multi_thread(2);
        let r = rt.block_on(async {
            tokio::time::timeout(
                CALL_LIMIT,
                store.execute_once_async(&key, || async move { Ok::<_, std::io::Error>(value) }),
            )
            .await
        });
        match r {
            Ok(r) => {
                let _ = tx.send(describe(r));
                drop(rt);
            }
            // The call is stuck: its runtime may hold a stuck blocking thread.
            Err(_) => std::mem::forget(rt),
        }
    });
    rx.recv_timeout(CALL_LIMIT + Duration::from_secs(5)).ok()
}

/// Runs one sync call of `key` on its own thread, bounded by [`CALL_LIMIT`].
fn bounded_sync_call(store: &Arc<Store>, key: &str, value: u64) -> Option<CallResult> {
    let (tx, rx) = mpsc::channel::<CallResult>();
    let store = Arc::clone(store);
    let key = key.to_owned();
    std::thread::spawn(move || {
        let r = store.execute_once(&key, || Ok::<_, std::io::Error>(value));
        let _ = tx.send(describe(r));
    });
    rx.recv_timeout(CALL_LIMIT).ok()
}

/// Promise 2 (many runtimes): an async call on runtime B must not wait for runtime A's
/// blocking pool. A's pool is saturated by a user's blocking task, and an async call on A
/// queued its durability turn there; B's pool is free. Before the change B's call waited on
/// its own pool; it must still finish while A's pool stays busy.
#[test]
fn an_async_call_is_not_held_hostage_by_another_runtimes_busy_blocking_pool() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let busy = BusyRuntime::start(&store);
    let b = bounded_async_call(&store, "b", 2);
    // Unblock A whatever happened, then check both.
    let a = busy.finish(b.is_some());
    assert_eq!(
        b,
        Some(Ok(2)),
        "an async call on runtime B did not finish within {CALL_LIMIT:?} while runtime A's \
         blocking pool was busy and A's call had its durability turn queued there"
    );
    assert_eq!(a, Ok(Ok(1)), "A's call, once its pool was freed");
}

/// Promise 2/3 (deadlock form): A's blocking task waits for B's call (say, a bridge that
/// hands work to another runtime and waits for the answer). With one blocking pool per
/// runtime this always completes; it must not deadlock on a turn queued behind the bridge.
#[test]
fn a_blocking_task_waiting_for_another_runtimes_async_call_does_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let rt_a = tiny_pool_runtime();
    let rt_b = multi_thread(2);

    let (bridge_started_tx, bridge_started) = mpsc::channel::<()>();
    let (go_b_tx, go_b) = mpsc::channel::<()>();
    let b_handle = rt_b.handle().clone();
    let store_b = Arc::clone(&store);
    // The bridge: A's blocking task asks runtime B for a call and waits for its answer.
    let bridge = rt_a.spawn_blocking(move || {
        let _ = bridge_started_tx.send(());
        if go_b.recv_timeout(BLOCKER_LIMIT).is_err() {
            return None;
        }
        let (answer_tx, answer) = mpsc::channel::<CallResult>();
        b_handle.spawn(async move {
            let r = store_b
                .execute_once_async("b", || async { Ok::<_, std::io::Error>(2u64) })
                .await;
            let _ = answer_tx.send(describe(r));
        });
        answer.recv_timeout(Duration::from_secs(15)).ok()
    });
    bridge_started
        .recv_timeout(CALL_LIMIT)
        .expect("the bridge never started");
    let a_done = spawn_call_on(&rt_a, &store, "a", 1);
    go_b_tx.send(()).unwrap();

    let bridged = rt_b.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), bridge)
            .await
            .map(|joined| joined.expect("bridge task"))
    });
    let a = a_done.recv_timeout(CALL_LIMIT);
    let ok = matches!(bridged, Ok(Some(Ok(2)))) && a == Ok(Ok(1));
    if !ok {
        std::mem::forget(rt_a);
        std::mem::forget(rt_b);
    }
    assert_eq!(
        bridged,
        Ok(Some(Ok(2))),
        "runtime B's async call, awaited by a blocking task of runtime A, did not finish \
         (None: B's call did not answer within 15 s while A's call had its turn queued \
         behind the bridge)"
    );
    assert_eq!(a, Ok(Ok(1)));
}

/// Promise 2 (runtime shutdown while a turn is queued): shutting down runtime A
/// (`shutdown_background`) while its call's turn waits behind a busy blocking thread must not
/// leave other runtimes' async calls stuck.
#[test]
fn shutting_down_a_runtime_with_a_queued_turn_frees_the_other_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let BusyRuntime { rt, release, .. } = BusyRuntime::start(&store);
    rt.shutdown_background();

    let b = bounded_async_call(&store, "b", 2);
    let _ = release.send(());
    assert_eq!(
        b,
        Some(Ok(2)),
        "an async call on another runtime, after runtime A (whose call's durability turn was \
         queued behind a busy blocking thread) was shut down"
    );
}

/// Promise 2 (a turn dropped unrun): once A's blocking thread is free, a shut-down A drops
/// its queued turn unrun; the mark must be taken back so later async calls still flush.
#[test]
fn a_turn_dropped_unrun_at_shutdown_takes_its_mark_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let BusyRuntime { rt, release, .. } = BusyRuntime::start(&store);
    rt.shutdown_background();
    // The blocker ends; A's pool thread then drains its queue, dropping the turn unrun.
    release.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    for n in 0..5u64 {
        let b = bounded_async_call(&store, &format!("b{n}"), n);
        assert_eq!(
            b,
            Some(Ok(n)),
            "async call {n} after A's turn was dropped unrun"
        );
    }
    assert_eq!(bounded_sync_call(&store, "s", 9), Some(Ok(9)));
    // A's outcome was written before its runtime went away: it replays (or reruns) cleanly.
    assert_eq!(
        bounded_sync_call(&store, "a", 7).map(|r| r.is_ok()),
        Some(true)
    );
}

/// Promise 2 (a turn dropped at spawn): a call polled through the handle of a runtime that
/// is already shut down cannot spawn its turn (the closure is dropped at once). Whatever
/// that call returns, it must not hang, and later async calls must not be stuck behind it.
#[test]
fn a_turn_refused_by_a_shut_down_runtime_does_not_wedge_later_calls() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let rt_a = multi_thread(2);
    let handle = rt_a.handle().clone();
    rt_a.shutdown_background();
    let (tx, rx) = mpsc::channel::<CallResult>();
    let store_a = Arc::clone(&store);
    std::thread::spawn(move || {
        let r = handle
            .block_on(store_a.execute_once_async("a", || async { Ok::<_, std::io::Error>(1u64) }));
        let _ = tx.send(describe(r));
    });
    let a = rx.recv_timeout(CALL_LIMIT);
    println!("a call through a shut-down runtime's handle returned {a:?}");
    assert!(
        a.is_ok(),
        "the call through a shut-down runtime's handle hung"
    );
    for n in 0..3u64 {
        let b = bounded_async_call(&store, &format!("b{n}"), n);
        assert_eq!(
            b,
            Some(Ok(n)),
            "async call {n} after a turn refused at spawn"
        );
    }
    assert_eq!(bounded_sync_call(&store, "s", 9), Some(Ok(9)));
}

/// Promise 1/2: many runtimes (current-thread and multi-thread, some with one blocking
/// thread), many tasks, sync threads on the same store, calls cut short by timeouts and
/// aborts. Nothing may hang; every key whose call returned a value replays that value.
#[test]
fn many_runtimes_sync_threads_timeouts_and_aborts_never_hang() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let returned = Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let counter = Arc::new(AtomicU64::new(0));
    let (done_tx, done) = mpsc::channel::<()>();
    let mut workers = 0;

    // Async workers: each a runtime of its own.
    for r in 0..6u64 {
        let (store, returned, counter, done_tx) = (
            Arc::clone(&store),
            Arc::clone(&returned),
            Arc::clone(&counter),
            done_tx.clone(),
        );
        workers += 1;
        std::thread::spawn(move || {
            let rt = match r % 3 {
                0 => tokio::runtime::Builder::new_current_thread()
                    .max_blocking_threads(1)
                    .enable_all()
                    .build()
                    .unwrap(),
                1 => tiny_pool_runtime(),
                _ => multi_thread(2),
            };
            rt.block_on(async {
                let mut tasks = Vec::new();
                for t in 0..8u64 {
                    let (store, returned, counter) = (
                        Arc::clone(&store),
                        Arc::clone(&returned),
                        Arc::clone(&counter),
                    );
                    tasks.push(tokio::spawn(async move {
                        for n in 0..25u64 {
                            let key = format!("r{r}t{t}n{n}");
                            let value = counter.fetch_add(1, Ordering::SeqCst);
                            let call = store.execute_once_async(&key, || async move {
                                Ok::<_, std::io::Error>(value)
                            });
                            let out = match n % 5 {
                                // Cut short at some point of its durability wait.
                                0 => tokio::time::timeout(Duration::from_micros(200), call)
                                    .await
                                    .ok(),
                                _ => Some(call.await),
                            };
                            if let Some(Ok(o)) = out {
                                returned.lock().unwrap().push((key, *o));
                            }
                        }
                    }));
                }
                // Abort a few tasks mid-flight.
                tokio::time::sleep(Duration::from_millis(5)).await;
                tasks[0].abort();
                for task in tasks {
                    let _ = task.await;
                }
            });
            let _ = done_tx.send(());
        });
    }
    // Sync workers.
    for s in 0..3u64 {
        let (store, returned, counter, done_tx) = (
            Arc::clone(&store),
            Arc::clone(&returned),
            Arc::clone(&counter),
            done_tx.clone(),
        );
        workers += 1;
        std::thread::spawn(move || {
            for n in 0..60u64 {
                let key = format!("s{s}n{n}");
                let value = counter.fetch_add(1, Ordering::SeqCst);
                if let Ok(o) = store.execute_once(&key, || Ok::<_, std::io::Error>(value)) {
                    returned.lock().unwrap().push((key, *o));
                }
            }
            let _ = done_tx.send(());
        });
    }
    drop(done_tx);
    for w in 0..workers {
        done.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("worker {w} of {workers} did not finish within 30 s"));
    }
    let returned = returned.lock().unwrap().clone();
    assert!(
        returned.len() > 100,
        "too few calls returned: {}",
        returned.len()
    );
    for (key, value) in returned {
        let again = store
            .execute_once(&key, || Ok::<_, std::io::Error>(u64::MAX))
            .expect("replay");
        assert_eq!(*again, value, "key {key}");
        assert!(again.is_replayed(), "key {key} ran again");
    }
}

/// Promise 1 (durable on return), in process: an async caller that found another's turn
/// queued (and so awaited a notification) must not return before a flush covering its own
/// write. Checked by closing the store right after a burst of async calls returned and
/// opening it again: every returned value replays.
#[test]
fn outcomes_returned_from_a_burst_of_async_callers_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Vec::new();
    for round in 0..3u64 {
        let store = Arc::new(open(&dir));
        let rt = multi_thread(2);
        let out = rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..32u64 {
                let store = Arc::clone(&store);
                tasks.push(tokio::spawn(async move {
                    let key = format!("round{round}-{t}");
                    let v = round * 1000 + t;
                    let r = store
                        .execute_once_async(&key, || async move { Ok::<_, std::io::Error>(v) })
                        .await;
                    (key, r.map(|o| *o).ok())
                }));
            }
            let mut out = Vec::new();
            for task in tasks {
                out.push(task.await.unwrap());
            }
            out
        });
        for (key, v) in out {
            expected.push((key.clone(), v.unwrap_or_else(|| panic!("{key} failed"))));
        }
        drop(rt);
        Arc::try_unwrap(store)
            .expect("sole owner")
            .close()
            .expect("close");
    }
    let store = open(&dir);
    for (key, v) in expected {
        let again = store
            .execute_once(&key, || Ok::<_, std::io::Error>(u64::MAX))
            .expect("replay");
        assert_eq!(*again, v, "key {key}");
    }
}

/// Promise 5 (failed flushes): on a full filesystem, sync and async callers whose flush
/// fails must get errors (not hang, not a value that is lost on reopening); after space comes
/// back, later calls succeed or fail cleanly; whatever a call returned as a value replays
/// after reopening.
#[test]
fn a_full_disk_fails_sync_and_async_callers_cleanly_and_nothing_hangs() {
    // Small values stay in sled's buffers until a flush (the flush fails); large ones go to
    // blob files as they are written.
    full_disk_scenario(200);
    full_disk_scenario(96 << 10);
}

fn full_disk_scenario(value_bytes: usize) {
    let Some(fs) = SmallDisk::mount_or_skip("24m") else {
        return;
    };
    let path = fs.path().join("db");
    let returned = Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let (done_tx, done) = mpsc::channel::<&'static str>();
    let store = Arc::new(
        Store::builder(&path)
            .sweep_interval(None)
            .cache_bytes(1 << 20)
            .max_result_bytes(1 << 20)
            .open()
            .expect("open"),
    );
    // A first durable write, so the store's files exist before the disk fills.
    store
        .execute_once("warm", || Ok::<_, std::io::Error>(vec![1u8; 16]))
        .expect("warm-up");
    let filler = fill_up(fs.path());

    let big = move |seed: u64| vec![(seed % 251) as u8; value_bytes];
    // Async callers on two runtimes, sync callers on threads, all while the disk is full.
    for r in 0..2u64 {
        let (store, returned, errors, done_tx) = (
            Arc::clone(&store),
            Arc::clone(&returned),
            Arc::clone(&errors),
            done_tx.clone(),
        );
        std::thread::spawn(move || {
            let rt = multi_thread(2);
            rt.block_on(async {
                let mut tasks = Vec::new();
                for t in 0..4u64 {
                    let (store, returned, errors) = (
                        Arc::clone(&store),
                        Arc::clone(&returned),
                        Arc::clone(&errors),
                    );
                    tasks.push(tokio::spawn(async move {
                        for n in 0..6u64 {
                            let key = format!("full-a{r}t{t}n{n}");
                            let value = big(r * 100 + t * 10 + n);
                            let v = value.clone();
                            match store
                                .execute_once_async(
                                    &key,
                                    || async move { Ok::<_, std::io::Error>(v) },
                                )
                                .await
                            {
                                Ok(o) => returned.lock().unwrap().push((key, (*o).clone())),
                                Err(_) => {
                                    errors.fetch_add(1, Ordering::SeqCst);
                                }
                            }
                        }
                    }));
                }
                for task in tasks {
                    let _ = task.await;
                }
            });
            let _ = done_tx.send("async worker");
        });
    }
    for s in 0..2u64 {
        let (store, returned, errors, done_tx) = (
            Arc::clone(&store),
            Arc::clone(&returned),
            Arc::clone(&errors),
            done_tx.clone(),
        );
        std::thread::spawn(move || {
            for n in 0..12u64 {
                let key = format!("full-s{s}n{n}");
                let value = big(500 + s * 10 + n);
                let v = value.clone();
                match store.execute_once(&key, || Ok::<_, std::io::Error>(v)) {
                    Ok(o) => returned.lock().unwrap().push((key, (*o).clone())),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            let _ = done_tx.send("sync worker");
        });
    }
    drop(done_tx);
    for _ in 0..4 {
        let who = done.recv_timeout(Duration::from_secs(30));
        assert!(
            who.is_ok(),
            "a worker hung on the full disk (finished: {who:?})"
        );
    }
    let (full_ok, full_err) = (
        returned.lock().unwrap().len(),
        errors.load(Ordering::SeqCst),
    );
    println!("{value_bytes}-byte values on the full disk: {full_ok} calls returned a value, {full_err} failed");

    // Space comes back: later calls succeed or fail cleanly, without hanging.
    std::fs::remove_file(&filler).expect("remove filler");
    let mut after = Vec::new();
    for n in 0..3u64 {
        after.push(bounded_async_call(&store, &format!("after-a{n}"), n));
        after.push(bounded_sync_call(&store, &format!("after-s{n}"), n));
    }
    println!("after space came back: {after:?}");
    assert!(
        after.iter().all(Option::is_some),
        "a call hung after space came back: {after:?}"
    );

    // Close and reopen: whatever returned a value on the full disk replays it.
    let store = sole_owner(store);
    let closed = store.close();
    println!("close: {closed:?}");
    match Store::builder(&path).sweep_interval(None).open() {
        Ok(store) => {
            let returned = returned.lock().unwrap().clone();
            let mut lost = Vec::new();
            for (key, value) in &returned {
                match store.execute_once(key, || Ok::<_, std::io::Error>(Vec::<u8>::new())) {
                    Ok(o) if o.is_replayed() && *o == *value => {}
                    other => lost.push((key.clone(), other.map(|o| o.is_replayed()))),
                }
            }
            assert!(
                lost.is_empty(),
                "{} of {} values returned on the full disk are not replayed after reopening: \
                 {lost:?}",
                lost.len(),
                returned.len()
            );
            drop(store);
        }
        Err(e) => println!("the store does not reopen after the full disk: {e}"),
    }
    drop(fs);
}

/// Promise 2/3: a sync call is never held up by an async caller's turn queued behind a busy
/// blocking thread (only a running thread marks a flush running).
#[test]
fn a_sync_call_is_not_held_up_by_a_queued_turn() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let busy = BusyRuntime::start(&store);
    let s = bounded_sync_call(&store, "s", 2);
    let a = busy.finish(s.is_some());
    assert_eq!(s, Some(Ok(2)), "a sync call while an async turn was queued");
    assert_eq!(a, Ok(Ok(1)));
}

/// Promise 2 (runtime shutdown, current-thread runtime): its driver thread is not a blocking
/// pool thread, so after `shutdown_background` nothing frees its busy blocking thread and the
/// queued turn is neither run nor dropped. Other runtimes' async calls must not wait for it.
#[test]
fn shutting_down_a_current_thread_runtime_with_a_queued_turn_frees_the_other_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir));
    let rt_a = tokio::runtime::Builder::new_current_thread()
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let release = occupy_blocking_pool(&rt_a);
    let store_a = Arc::clone(&store);
    rt_a.block_on(async move {
        let (ran_tx, ran) = tokio::sync::oneshot::channel::<()>();
        drop(tokio::spawn(async move {
            let _ = store_a
                .execute_once_async("a", || async move {
                    let _ = ran_tx.send(());
                    Ok::<_, std::io::Error>(1u64)
                })
                .await;
        }));
        tokio::time::timeout(CALL_LIMIT, ran)
            .await
            .expect("A's operation never ran")
            .expect("A's operation never ran");
        // Let A's call write its outcome and queue its turn behind the blocker.
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    rt_a.shutdown_background();

    let b = bounded_async_call(&store, "b", 2);
    let _ = release.send(());
    assert_eq!(
        b,
        Some(Ok(2)),
        "an async call on another runtime, after a current-thread runtime A (whose call's \
         durability turn was queued behind its busy blocking thread) was shut down"
    );
}
