//! Adversarial tests of sled's flusher thread (commit 84ada2f): an async durability point
//! takes a ticket, then awaits a flush another caller runs, or asks the store's flusher thread
//! (`idemstore-flusher`, one per store, holding the group commit weakly) for one; if that
//! thread cannot be spawned, the asking caller waits on its own runtime's blocking pool.
//!
//! Promises attacked: a call returns only once durable, and a failed flush fails its callers;
//! no waiter is ever stuck (many runtimes, mixed sync and async callers, aborts, timeouts,
//! runtime shutdowns, the fallback when no flusher thread can be started); the flusher thread
//! neither keeps a closed store's files locked nor leaks across open/close cycles; a full disk
//! fails callers cleanly.
//!
//! Tests that count threads, or limit the process's threads (a pids cgroup), run alone in a
//! child process (this test binary, run again for one test). Every wait is bounded (at most
//! ~30 s): a bug shows as a failure, not a hang. A runtime that may have a stuck thread is
//! forgotten before the test panics.

mod common;

use common::calls::{current_thread, describe, multi_thread, sole_owner, CallResult};
use common::disk::{fill_up, SmallDisk};
use idemstore::Store;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// How long a call that should complete is given before the test calls it stuck.
const CALL_LIMIT: Duration = Duration::from_secs(10);
/// The longest a blocker holds a blocking thread (a fail-safe, so nothing hangs forever).
const BLOCKER_LIMIT: Duration = Duration::from_secs(25);
/// Set (to the test's name) in a child process that runs one test alone.
const CHILD_ENV: &str = "IDEMSTORE_ADVERSARY_FLUSHER_CHILD";

fn open_at(path: &Path) -> Result<Store, idemstore::Error> {
    Store::builder(path).sweep_interval(None).open()
}

async fn call(store: &Store, key: &str, value: u64) -> CallResult {
    describe(
        store
            .execute_once_async(key, || async move { Ok::<_, std::io::Error>(value) })
            .await,
    )
}

/// Threads of this process named `idemstore-flusher` (`comm` keeps 15 bytes of a name).
fn flusher_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|comm| comm.trim_end().starts_with("idemstore-flush"))
        .count()
}

/// Polls (up to ~10 s) until `done`.
fn until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    done()
}

// ---------------------------------------------------------------------------------------
// Child processes.

fn is_child(name: &str) -> bool {
    std::env::var(CHILD_ENV).as_deref() == Ok(name)
}

/// Runs test `name` alone in a child process (bounded by 40 s); returns whether it passed,
/// and its output. `cgroup`, if given, is removed once the child has exited.
fn run_in_child(name: &str, cgroup: Option<&Path>) -> (bool, String) {
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, name)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child test");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut out = String::new();
            let _ = pipe.read_to_string(&mut out);
            out
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = child.try_wait().expect("child status") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(cgroup) = cgroup {
        let _ = std::fs::remove_dir(cgroup.join(format!("c{}", child.id())));
    }
    let output = format!(
        "--- child stdout ---\n{}\n--- child stderr ---\n{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    match status {
        Some(status) => (status.success(), output),
        None => (
            false,
            format!("the child hung (killed after 40 s)\n{output}"),
        ),
    }
}

const PIDS_CGROUP: &str = "/sys/fs/cgroup/pids";

/// In the test process: runs test `name` alone in a child process that may limit its threads
/// (a pids cgroup, removed afterwards), checks that it passed, and returns false; skipped
/// (false) where there is no pids cgroup. In that child: true, so the test runs there.
fn in_thread_limited_child(name: &str) -> bool {
    if is_child(name) {
        return true;
    }
    if !Path::new(PIDS_CGROUP).join("pids.max").exists()
        && !Path::new(PIDS_CGROUP).join("cgroup.procs").exists()
    {
        println!("SKIPPED: no pids cgroup (v1) at {PIDS_CGROUP}");
        return false;
    }
    let (passed, output) = run_in_child(name, Some(Path::new(PIDS_CGROUP)));
    println!("{output}");
    assert!(passed, "the child failed:\n{output}");
    false
}

/// In a child: moves this process into a fresh pids cgroup whose limit is the threads it has
/// now, so no thread can be started any more. `Err` says why it could not.
fn forbid_new_threads() -> Result<(), String> {
    let dir = Path::new(PIDS_CGROUP).join(format!("c{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| format!("create {dir:?}: {e}"))?;
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("join the cgroup: {e}"))?;
    let current = std::fs::read_to_string(dir.join("pids.current"))
        .map_err(|e| format!("pids.current: {e}"))?;
    std::fs::write(dir.join("pids.max"), current.trim()).map_err(|e| format!("pids.max: {e}"))?;
    match std::thread::Builder::new().spawn(|| ()) {
        Ok(t) => {
            let _ = t.join();
            Err("a thread could still be spawned under the limit".into())
        }
        Err(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------
// Promise 2 (fallback): no flusher thread.

/// Promise 2: with no flusher thread (it could not be spawned: the process is at its thread
/// limit), an async caller that asks waits on its own runtime's blocking pool. Another
/// runtime's async call whose ticket is at most that asked ticket then awaits it without
/// asking: it must not be held up by runtime A's busy blocking pool (the module doc: "an
/// async call never depends on any runtime's blocking pool"). Runtime A has one blocking
/// thread, held by a user's task; each round, runtime B makes a burst of calls while A makes
/// one. Every B call must finish while A's pool stays busy.
#[test]
fn without_a_flusher_thread_no_call_waits_for_another_runtimes_blocking_pool() {
    if !in_thread_limited_child(
        "without_a_flusher_thread_no_call_waits_for_another_runtimes_blocking_pool",
    ) {
        return;
    }
    blocking_pool_scenario(true);
}

/// A flusher thread that could not be started is started by a later async call once threads
/// can be made again (the module doc: "the next caller tries to start the thread again"): the
/// first call, under the thread limit, falls back to its runtime's blocking pool; after the
/// limit is lifted, the next call starts exactly one flusher thread, and calls go on.
#[test]
fn a_flusher_thread_that_could_not_start_is_started_by_a_later_call() {
    if !in_thread_limited_child("a_flusher_thread_that_could_not_start_is_started_by_a_later_call")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = open_at(&dir.path().join("db")).expect("open");
    store
        .execute_once("warm", || Ok::<_, std::io::Error>(0u64))
        .expect("warm-up");
    // A runtime whose blocking thread exists before the limit and stays.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(2)
        .thread_keep_alive(Duration::from_secs(120))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(100)))
            .await
            .expect("warm blocking thread");
    });
    if let Err(why) = forbid_new_threads() {
        println!("SKIPPED: cannot limit this process's threads: {why}");
        return;
    }
    let first =
        rt.block_on(async { tokio::time::timeout(CALL_LIMIT, call(&store, "first", 1)).await });
    assert_eq!(
        first.ok(),
        Some(Ok(1)),
        "a lone async call without a flusher thread"
    );
    assert_eq!(
        flusher_threads(),
        0,
        "no flusher thread could start under the limit"
    );
    let cgroup = Path::new(PIDS_CGROUP).join(format!("c{}", std::process::id()));
    std::fs::write(cgroup.join("pids.max"), "max").expect("lift the thread limit");
    for n in 0..20u64 {
        let key = format!("after-{n}");
        let done =
            rt.block_on(async { tokio::time::timeout(CALL_LIMIT, call(&store, &key, n)).await });
        assert_eq!(
            done.ok(),
            Some(Ok(n)),
            "an async call after the limit was lifted"
        );
    }
    assert_eq!(
        flusher_threads(),
        1,
        "a later call starts the flusher thread, once"
    );
}

/// The control for the test above: the same rounds with a flusher thread (no thread limit)
/// pass, so what fails there is the fallback.
#[test]
fn with_a_flusher_thread_no_call_waits_for_another_runtimes_blocking_pool() {
    blocking_pool_scenario(false);
}

/// Runtime A (one blocking thread, held) and runtime B make calls in rounds; every B call
/// must finish while A's pool stays busy. `no_flusher`: first forbid new threads (in a child
/// process), so the store's flusher thread cannot start.
fn blocking_pool_scenario(no_flusher: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_at(&dir.path().join("db")).expect("open"));
    // sled's own threads start now, before the limit.
    store
        .execute_once("warm", || Ok::<_, std::io::Error>(0u64))
        .expect("warm-up");

    // Runtime A: one worker, one blocking thread, held by a user's task.
    let rt_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (release, released) = mpsc::channel::<()>();
    let (started_tx, started) = mpsc::channel::<()>();
    drop(rt_a.spawn_blocking(move || {
        let _ = started_tx.send(());
        let _ = released.recv_timeout(BLOCKER_LIMIT);
    }));
    started.recv_timeout(CALL_LIMIT).expect("blocker started");

    // Runtime B: its blocking threads exist before the limit and stay.
    const BURST: usize = 6;
    let rt_b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(BURST + 2)
        .thread_keep_alive(Duration::from_secs(120))
        .enable_all()
        .build()
        .expect("runtime");
    rt_b.block_on(async {
        let warm: Vec<_> = (0..BURST + 2)
            .map(|_| tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(300))))
            .collect();
        for w in warm {
            w.await.expect("warm blocking thread");
        }
    });

    if no_flusher {
        if let Err(why) = forbid_new_threads() {
            println!("SKIPPED: cannot limit this process's threads: {why}");
            let _ = release.send(());
            return;
        }
    }
    // The first async call: no flusher thread can start.
    let first =
        rt_b.block_on(async { tokio::time::timeout(CALL_LIMIT, call(&store, "first", 1)).await });
    assert_eq!(
        first.ok(),
        Some(Ok(1)),
        "a lone async call without a flusher thread"
    );
    if no_flusher && flusher_threads() != 0 {
        println!("SKIPPED: a flusher thread started despite the limit");
        let _ = release.send(());
        return;
    }

    let mut stuck: Option<(usize, Vec<tokio::task::JoinHandle<CallResult>>)> = None;
    let mut a_calls = Vec::new();
    for round in 0..150usize {
        let burst: Vec<_> = (0..BURST)
            .map(|i| {
                let store = Arc::clone(&store);
                rt_b.spawn(async move { call(&store, &format!("b{round}-{i}"), i as u64).await })
            })
            .collect();
        if round % 3 != 0 {
            std::thread::sleep(Duration::from_micros(50 * (round % 7) as u64));
        }
        let store_a = Arc::clone(&store);
        a_calls.push(rt_a.spawn(async move { call(&store_a, &format!("a{round}"), 7).await }));
        let burst = rt_b.block_on(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let mut left = Vec::new();
            for mut h in burst {
                match tokio::time::timeout_at(deadline, &mut h).await {
                    Ok(r) => assert_eq!(
                        r.expect("task").map(|_| ()),
                        Ok(()),
                        "a B call failed in round {round}"
                    ),
                    Err(_) => left.push(h),
                }
            }
            left
        });
        if !burst.is_empty() {
            stuck = Some((round, burst));
            break;
        }
    }
    let Some((round, left)) = stuck else {
        let _ = release.send(());
        println!("every B call finished while A's blocking pool was busy (150 rounds)");
        return;
    };
    // Free A's pool: the stuck B calls then finish, so they were waiting for it.
    let stuck_count = left.len();
    let _ = release.send(());
    let after = rt_b.block_on(async move {
        tokio::time::timeout(CALL_LIMIT, async move {
            for h in left {
                let _ = h.await;
            }
        })
        .await
    });
    let freed = if after.is_ok() {
        "they finished once A's blocking thread was released"
    } else {
        "they were still stuck after A's blocking thread was released"
    };
    std::mem::forget(rt_a);
    let mode = if no_flusher {
        "no flusher thread could be started"
    } else {
        "with a flusher thread"
    };
    panic!(
        "{mode}: round {round}: {stuck_count} async call(s) on runtime B did not finish within \
         5 s while runtime A's only blocking thread was busy ({freed}): a B caller found its \
         ticket already asked (`asked >= ticket`) by an A caller whose wait was queued on A's \
         blocking pool, and awaited that"
    );
}

// ---------------------------------------------------------------------------------------
// Promise 3: the flusher thread neither leaks nor keeps a closed store.

/// Promise 3: over many open/close cycles at one path (async calls on several runtimes, some
/// aborted or timed out mid-wait, runtimes shut down with calls waiting, sync calls), the
/// path reopens at once after every close or drop (no `Locked`), and every `idemstore-flusher`
/// thread ends with its store.
#[test]
fn flusher_threads_end_with_their_store_and_the_path_reopens_at_once() {
    const NAME: &str = "flusher_threads_end_with_their_store_and_the_path_reopens_at_once";
    if !is_child(NAME) {
        let (passed, output) = run_in_child(NAME, None);
        println!("{output}");
        assert!(passed, "the child failed:\n{output}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let before = flusher_threads();
    assert_eq!(before, 0, "flusher threads before any store");
    let rt = multi_thread(2);
    let mut max_seen = 0;
    for cycle in 0..30u64 {
        let store = Arc::new(
            open_at(&path).unwrap_or_else(|e| panic!("cycle {cycle}: reopening at once: {e}")),
        );
        // Calls on a shared multi-thread runtime: half aborted at once (mid-wait, or before).
        let handles: Vec<_> = (0..8u64)
            .map(|i| {
                let store = Arc::clone(&store);
                rt.spawn(async move { call(&store, &format!("c{cycle}-m{i}"), i).await })
            })
            .collect();
        for h in handles.iter().skip(4) {
            h.abort();
        }
        // A current-thread runtime on another thread, dropped while its calls wait.
        let dropped = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let rt = current_thread();
                for i in 0..4u64 {
                    let store = Arc::clone(&store);
                    drop(rt.spawn(async move {
                        let _ = call(&store, &format!("c{cycle}-d{i}"), i).await;
                    }));
                }
                rt.block_on(async {
                    for _ in 0..(cycle % 4) {
                        tokio::task::yield_now().await;
                    }
                });
                drop(rt);
            })
        };
        // Calls cut off by short timeouts, on this thread's runtime.
        current_thread().block_on(async {
            for i in 0..4u64 {
                let limit = Duration::from_micros(1 + 300 * i);
                let _ =
                    tokio::time::timeout(limit, call(&store, &format!("c{cycle}-t{i}"), i)).await;
            }
        });
        store
            .execute_once(format!("c{cycle}-sync"), || Ok::<_, std::io::Error>(1u64))
            .expect("sync call");
        let finished = rt.block_on(async {
            tokio::time::timeout(CALL_LIMIT, async {
                let mut results = Vec::new();
                for h in handles {
                    results.push(h.await);
                }
                results
            })
            .await
        });
        let results = finished.unwrap_or_else(|_| panic!("cycle {cycle}: a call hung"));
        for r in results.into_iter().take(4) {
            assert!(
                matches!(r, Ok(Ok(_))),
                "cycle {cycle}: an unaborted call failed: {r:?}"
            );
        }
        dropped.join().expect("dropped runtime's thread");
        max_seen = max_seen.max(flusher_threads());
        let store = sole_owner(store);
        if cycle % 2 == 0 {
            store
                .close()
                .unwrap_or_else(|e| panic!("cycle {cycle}: close: {e}"));
        } else {
            drop(store);
        }
    }
    drop(rt);
    let ended = until(|| flusher_threads() == 0);
    println!("flusher threads: at most {max_seen} alive at once during the cycles");
    assert!(
        ended,
        "{} idemstore-flusher thread(s) outlived their stores after 30 open/close cycles",
        flusher_threads()
    );
    assert!(
        max_seen <= 2,
        "{max_seen} flusher threads alive at once with one store open"
    );
}

/// Promise 3: a store closed while its flusher thread is busy (callers on two runtimes
/// aborted mid-wait, or their runtime shut down under them, just before the close) reopens at
/// once, every time; outcomes returned before the close replay after reopening.
#[test]
fn closing_while_the_flusher_works_leaves_the_path_free_and_returned_outcomes_durable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let returned = Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    for cycle in 0..8u64 {
        let store = Arc::new(
            open_at(&path).unwrap_or_else(|e| panic!("cycle {cycle}: reopening at once: {e}")),
        );
        // Everything returned so far replays.
        for (key, value) in returned.lock().unwrap().iter() {
            let o = store
                .execute_once(key, || Ok::<_, std::io::Error>(u64::MAX))
                .expect("replay");
            assert!(
                o.is_replayed() && *o == *value,
                "cycle {cycle}: {key} returned {value} before a close, now {:?} (replayed: {})",
                *o,
                o.is_replayed()
            );
        }
        let rt_a = multi_thread(2);
        let rt_b = current_thread();
        let mut handles = Vec::new();
        for t in 0..16u64 {
            let (store, returned) = (Arc::clone(&store), Arc::clone(&returned));
            let rt = if t % 2 == 0 { &rt_a } else { &rt_b };
            handles.push(rt.spawn(async move {
                for n in 0.. {
                    let key = format!("c{cycle}-t{t}-n{n}");
                    let value = cycle * 10_000 + t * 100 + n;
                    if let Ok(v) = call(&store, &key, value).await {
                        returned.lock().unwrap().push((key, v));
                    }
                }
            }));
        }
        // Let runtime B's tasks run for a moment on this thread, A's on its own.
        rt_b.block_on(async { tokio::time::sleep(Duration::from_millis(40 + cycle * 7)).await });
        for h in &handles {
            h.abort();
        }
        // Runtime A is shut down under its (aborted) tasks; B is dropped.
        rt_a.shutdown_background();
        drop(rt_b);
        let store = sole_owner(store);
        let closed = store.close();
        assert!(closed.is_ok(), "cycle {cycle}: close: {closed:?}");
    }
    let store = open_at(&path).expect("final reopen at once");
    let returned = returned.lock().unwrap().clone();
    let mut lost = Vec::new();
    for (key, value) in &returned {
        match store.execute_once(key, || Ok::<_, std::io::Error>(u64::MAX)) {
            Ok(o) if o.is_replayed() && *o == *value => {}
            other => lost.push((key.clone(), other.map(|o| *o))),
        }
    }
    println!("{} outcomes returned across the cycles", returned.len());
    assert!(lost.is_empty(), "returned outcomes lost: {lost:?}");
}

// ---------------------------------------------------------------------------------------
// Promises 2 and 4: no waiter stuck, many callers and runtimes.

/// Promises 2 and 4: one store, many callers at once: 64 tasks on a multi-thread runtime, 3
/// current-thread runtimes on their own threads, sync threads, calls cut off by timeouts and
/// aborts. Everything not cut off finishes (bounded), and every value returned replays after
/// reopening.
#[test]
fn many_runtimes_sync_threads_and_cut_off_calls_never_strand_a_waiter() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let store = Arc::new(open_at(&path).expect("open"));
    let returned = Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let cut_off = Arc::new(AtomicU64::new(0));
    let (done_tx, done) = mpsc::channel::<String>();

    // The multi-thread runtime: 64 tasks of 8 calls; every 5th call has a short timeout.
    {
        let (store, returned, cut_off, done_tx) = (
            Arc::clone(&store),
            Arc::clone(&returned),
            Arc::clone(&cut_off),
            done_tx.clone(),
        );
        std::thread::spawn(move || {
            let rt = multi_thread(2);
            let finished = rt.block_on(async {
                let mut tasks = Vec::new();
                for t in 0..64u64 {
                    let (store, returned, cut_off) = (
                        Arc::clone(&store),
                        Arc::clone(&returned),
                        Arc::clone(&cut_off),
                    );
                    tasks.push(tokio::spawn(async move {
                        for n in 0..8u64 {
                            let key = format!("mt-t{t}-n{n}");
                            let value = t * 100 + n;
                            if n % 5 == 4 {
                                let limit = Duration::from_micros(50 * (t % 10));
                                match tokio::time::timeout(limit, call(&store, &key, value)).await {
                                    Ok(Ok(v)) => returned.lock().unwrap().push((key, v)),
                                    Ok(Err(e)) => panic!("{key}: {e}"),
                                    Err(_) => {
                                        cut_off.fetch_add(1, Ordering::SeqCst);
                                    }
                                }
                            } else {
                                let v = call(&store, &key, value)
                                    .await
                                    .unwrap_or_else(|e| panic!("{key}: {e}"));
                                returned.lock().unwrap().push((key, v));
                            }
                        }
                    }));
                }
                // And some tasks aborted at random points.
                for t in 0..16u64 {
                    let store = Arc::clone(&store);
                    let h = tokio::spawn(async move {
                        for n in 0.. {
                            let _ = call(&store, &format!("ab-t{t}-n{n}"), n).await;
                        }
                    });
                    tokio::time::sleep(Duration::from_micros(200 * t)).await;
                    h.abort();
                }
                tokio::time::timeout(Duration::from_secs(25), async {
                    for task in tasks {
                        task.await.expect("task");
                    }
                })
                .await
            });
            match finished {
                Ok(()) => {
                    let _ = done_tx.send("multi-thread runtime".into());
                    drop(rt);
                }
                Err(_) => std::mem::forget(rt),
            }
        });
    }
    // Current-thread runtimes, each on its own thread.
    for r in 0..3u64 {
        let (store, returned, done_tx) =
            (Arc::clone(&store), Arc::clone(&returned), done_tx.clone());
        std::thread::spawn(move || {
            let rt = current_thread();
            let finished = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(25), async {
                    let mut tasks = Vec::new();
                    for t in 0..4u64 {
                        let (store, returned) = (Arc::clone(&store), Arc::clone(&returned));
                        tasks.push(tokio::spawn(async move {
                            for n in 0..15u64 {
                                let key = format!("ct{r}-t{t}-n{n}");
                                let v = call(&store, &key, r * 1000 + t * 100 + n)
                                    .await
                                    .unwrap_or_else(|e| panic!("{key}: {e}"));
                                returned.lock().unwrap().push((key, v));
                            }
                        }));
                    }
                    for task in tasks {
                        task.await.expect("task");
                    }
                })
                .await
            });
            match finished {
                Ok(()) => {
                    let _ = done_tx.send(format!("current-thread runtime {r}"));
                    drop(rt);
                }
                Err(_) => std::mem::forget(rt),
            }
        });
    }
    // Sync callers.
    for s in 0..3u64 {
        let (store, returned, done_tx) =
            (Arc::clone(&store), Arc::clone(&returned), done_tx.clone());
        std::thread::spawn(move || {
            for n in 0..30u64 {
                let key = format!("sync{s}-n{n}");
                let v = store
                    .execute_once(&key, || Ok::<_, std::io::Error>(s * 1000 + n))
                    .map(|o| *o)
                    .unwrap_or_else(|e| panic!("{key}: {e:?}"));
                returned.lock().unwrap().push((key, v));
            }
            let _ = done_tx.send(format!("sync thread {s}"));
        });
    }
    drop(done_tx);
    let deadline = Instant::now() + Duration::from_secs(28);
    let mut finished = Vec::new();
    for _ in 0..7 {
        let left = deadline.saturating_duration_since(Instant::now());
        match done.recv_timeout(left) {
            Ok(who) => finished.push(who),
            Err(e) => panic!("a caller group never finished ({e:?}); finished: {finished:?}"),
        }
    }
    println!(
        "{} calls returned, {} cut off by timeouts",
        returned.lock().unwrap().len(),
        cut_off.load(Ordering::SeqCst)
    );
    let store = sole_owner(store);
    store.close().expect("close");
    let store = open_at(&path).expect("reopen at once");
    let mut lost = Vec::new();
    for (key, value) in returned.lock().unwrap().iter() {
        match store.execute_once(key, || Ok::<_, std::io::Error>(u64::MAX)) {
            Ok(o) if o.is_replayed() && *o == *value => {}
            other => lost.push((key.clone(), other.map(|o| *o))),
        }
    }
    assert!(lost.is_empty(), "returned outcomes lost: {lost:?}");
}

/// Promise 2: an async caller alone on a store, the flusher thread its only flusher, many
/// times in a row on fresh current-thread runtimes (each dropped right after): every call
/// finishes; and a caller that arrives while the flusher thread's flush runs is answered by a
/// later flush (it must not hang waiting for an ask already answered).
#[test]
fn back_to_back_lone_async_calls_on_fresh_runtimes_never_hang() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open_at(&dir.path().join("db")).expect("open"));
    let (tx, rx) = mpsc::channel::<Result<(), String>>();
    {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            for n in 0..300u64 {
                let rt = current_thread();
                let r = rt.block_on(async {
                    tokio::time::timeout(CALL_LIMIT, async {
                        // Two calls in flight from one runtime, then one alone.
                        let (key_a, key_b) = (format!("pair-a{n}"), format!("pair-b{n}"));
                        let a = call(&store, &key_a, n);
                        let b = call(&store, &key_b, n);
                        let (a, b) = tokio::join!(a, b);
                        let c = call(&store, &format!("lone{n}"), n).await;
                        (a, b, c)
                    })
                    .await
                });
                match r {
                    Ok((Ok(_), Ok(_), Ok(_))) => drop(rt),
                    Ok(other) => {
                        let _ = tx.send(Err(format!("call {n} failed: {other:?}")));
                        return;
                    }
                    Err(_) => {
                        std::mem::forget(rt);
                        let _ = tx.send(Err(format!("call {n} hung")));
                        return;
                    }
                }
            }
            let _ = tx.send(Ok(()));
        });
    }
    match rx.recv_timeout(Duration::from_secs(28)) {
        Ok(r) => r.expect("lone async calls"),
        Err(e) => panic!("lone async calls did not finish: {e:?}"),
    }
    let stats = store.stats();
    println!("{stats:?}");
}

// ---------------------------------------------------------------------------------------
// Promise 5: a full disk.

/// Promises 1 and 5: on a full disk, with only async callers (so the flusher thread leads the
/// flushes) on two runtimes, nothing hangs; the store is closed and dropped while the disk is
/// still full (so no later flush can save what a failed one lost); after space comes back,
/// every value a call returned replays, and the path reopens at once.
///
/// Fails intermittently (about 1 run in 10-15 here): sled 0.34's flush, called by the flusher
/// thread through `DurableFiles::make_durable`, can wait forever for a write that failed
/// (stack seen with gdb: `make_stable_inner` parked on `interval_updated`); every caller then
/// waits for that flush. A sync leader calls the same flush, so this is sled's, not the
/// flusher thread's; but nothing bounds it. Ignored in `cargo test` for that reason; run it by
/// hand (`cargo test --test adversary_flusher -- --ignored`, as root).
#[test]
#[ignore = "sled 0.34's flush can wait forever for a log write that failed on a full disk"]
fn a_full_disk_under_the_flusher_thread_fails_callers_and_loses_no_returned_value() {
    let Some(fs) = SmallDisk::mount_or_skip("24m") else {
        return;
    };
    let path = fs.path().join("db");
    let store = Arc::new(
        Store::builder(&path)
            .sweep_interval(None)
            .cache_bytes(1 << 20)
            .open()
            .expect("open"),
    );
    store
        .execute_once("warm", || Ok::<_, std::io::Error>(0u64))
        .expect("warm-up");
    let filler = fill_up(fs.path());
    let returned = Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let errors = Arc::new(AtomicU64::new(0));
    let (done_tx, done) = mpsc::channel::<()>();
    for r in 0..2u64 {
        let (store, returned, errors, done_tx) = (
            Arc::clone(&store),
            Arc::clone(&returned),
            Arc::clone(&errors),
            done_tx.clone(),
        );
        std::thread::spawn(move || {
            let rt = if r == 0 {
                multi_thread(2)
            } else {
                current_thread()
            };
            let finished = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(25), async {
                    let mut tasks = Vec::new();
                    for t in 0..8u64 {
                        let (store, returned, errors) = (
                            Arc::clone(&store),
                            Arc::clone(&returned),
                            Arc::clone(&errors),
                        );
                        tasks.push(tokio::spawn(async move {
                            for n in 0..10u64 {
                                let key = format!("full-r{r}-t{t}-n{n}");
                                match call(&store, &key, r * 1000 + t * 100 + n).await {
                                    Ok(v) => returned.lock().unwrap().push((key, v)),
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
                })
                .await
            });
            match finished {
                Ok(()) => {
                    let _ = done_tx.send(());
                    drop(rt);
                }
                Err(_) => std::mem::forget(rt),
            }
        });
    }
    drop(done_tx);
    for _ in 0..2 {
        assert!(
            done.recv_timeout(Duration::from_secs(28)).is_ok(),
            "async callers hung on the full disk (seen: the flusher thread stuck for good in \
             sled's `Tree::flush` -> `iobuf::make_stable_inner`, waiting on `interval_updated` \
             for an LSN whose write failed)"
        );
    }
    println!(
        "full disk: {} calls returned a value, {} failed",
        returned.lock().unwrap().len(),
        errors.load(Ordering::SeqCst)
    );
    // Closed with the disk still full: whatever a failed flush lost stays lost.
    let store = sole_owner(store);
    println!("close on the full disk: {:?}", store.close());
    std::fs::remove_file(&filler).expect("remove filler");
    match open_at(&path) {
        Ok(store) => {
            let mut lost = Vec::new();
            let returned = returned.lock().unwrap().clone();
            for (key, value) in &returned {
                match store.execute_once(key, || Ok::<_, std::io::Error>(u64::MAX)) {
                    Ok(o) if o.is_replayed() && *o == *value => {}
                    other => lost.push((key.clone(), other.map(|o| *o))),
                }
            }
            assert!(
                lost.is_empty(),
                "{} of {} values returned on the full disk are lost after reopening: {lost:?}",
                lost.len(),
                returned.len()
            );
        }
        Err(idemstore::Error::Locked { .. }) => {
            panic!("the path is still locked after the store was closed")
        }
        Err(e) => println!("the store does not reopen after the full disk: {e}"),
    }
    drop(fs);
}
