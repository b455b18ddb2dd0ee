//! The async API against the sync one, on the embedded (sled) store: the same calls on the
//! same kind of store with the same number of callers, awaited on tokio tasks instead of run
//! on threads.
//!
//! Invariants:
//! - the async side runs on one multi-thread tokio runtime of as many workers as it has
//!   callers, up to [`WORKERS`] (this machine's cores), built before its window and shut down
//!   after it; N callers are N tasks on it, each calling `execute_once_async` in a loop. The
//!   sync side is N OS threads calling `execute_once` in a loop ([`crate::measure`], through
//!   the same functions as the other idemstore rows), so the two differ in their execution
//!   model only. (One caller on two workers measured 0.74-0.78 of one thread, against
//!   0.94-0.95 on one worker, in the same runs: the idle worker, woken to steal the task
//!   whenever it yields, shares this machine's two vCPUs with it. That is tokio's scheduling,
//!   not the store's async path, which counts the same instructions as the sync one.);
//! - both sides open their store the same way, in a fresh directory, with the same keys and
//!   values: replays read [`crate::replay_store`]'s completed keys round robin; new keys are
//!   `key(caller, n)`, never seen before, with `Durability::Immediate`;
//! - a caller gives its worker back every so often (tokio's cooperative budget: a yield every
//!   128 calls, a thread-local count otherwise): a replay on sled never awaits anything that
//!   is not ready, so without it the first two tasks would hold both workers, the others would
//!   never call, and nothing would turn the timer that ends the window (tried: with 64 tasks
//!   the window never ended);
//! - a window counts the calls that returned from its start until every caller has stopped,
//!   as [`crate::measure`] does: a caller sees the stop flag between calls, so its last call
//!   counts and the wait for it is inside the window;
//! - a replay that runs its operation, or a call that fails, is a broken measurement, not a
//!   figure: it panics (in the caller's task, and again here when its count is collected).

use crate::{key, note_batching, receipt, replay_store, Receipt, VALUE};
use idemstore::{Durability, Store};
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Workers of the runtime the async callers run on: this machine's cores.
pub const WORKERS: usize = 2;

/// The flag that ends a window, shared by its callers.
type Stop = Arc<AtomicBool>;

/// The runtime of one async measurement, with `workers` workers.
fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("compare-async")
        .enable_all()
        .build()
        // Invariant: a runtime that cannot start its threads is a broken measurement.
        .expect("a tokio runtime with its workers starts")
}

/// Runs `caller(t, stop)` as `tasks` tasks on a fresh runtime (one worker per task, up to
/// [`WORKERS`]) for `secs`; each returns how many calls it made. Returns calls per second.
fn measure_async<F, Fut>(tasks: usize, secs: f64, caller: F) -> f64
where
    F: Fn(usize, Stop) -> Fut,
    Fut: Future<Output = u64> + Send + 'static,
{
    let runtime = runtime(WORKERS.min(tasks).max(1));
    let stop: Stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let done = runtime.block_on(async {
        let callers: Vec<_> = (0..tasks)
            .map(|t| tokio::spawn(caller(t, Arc::clone(&stop))))
            .collect();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut done = 0;
        for c in callers {
            match c.await {
                Ok(n) => done += n,
                Err(e) => match e.try_into_panic() {
                    Ok(panic) => std::panic::resume_unwind(panic),
                    // Invariant: nothing aborts a caller task; the runtime runs until here.
                    Err(e) => panic!("a caller task ended without its count: {e}"),
                },
            }
        }
        done
    });
    let ops = done as f64 / start.elapsed().as_secs_f64();
    drop(runtime);
    ops
}

/// The operation of a replay: never run.
async fn never_runs() -> Result<Receipt, std::io::Error> {
    unreachable!("replay must not run the operation")
}

/// Replays of `replay_store`'s keys, round robin, until `stop`; returns how many.
async fn replay_caller(store: Arc<Store>, keys: Arc<Vec<String>>, stop: Stop) -> u64 {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let k = &keys[(n % keys.len() as u64) as usize];
        let out = store
            .execute_once_async(k, never_runs)
            .await
            .expect("a completed key replays");
        std::hint::black_box(out);
        n += 1;
        tokio::task::consume_budget().await;
    }
    n
}

/// New keys of caller `t` until `stop`; returns how many.
async fn new_key_caller(store: Arc<Store>, t: usize, stop: Stop) -> u64 {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        store
            .execute_once_async(key(t, n), || async {
                Ok::<_, std::io::Error>(receipt(VALUE))
            })
            .await
            .expect("a new key runs and records its outcome");
        n += 1;
        tokio::task::consume_budget().await;
    }
    n
}

/// Replays of a small result by `tasks` async callers.
pub fn replay(dir: &Path, tasks: usize, secs: f64) -> f64 {
    let (store, keys) = replay_store(dir, VALUE);
    let (store, keys) = (Arc::new(store), Arc::new(keys));
    measure_async(tasks, secs, |_, stop| {
        replay_caller(Arc::clone(&store), Arc::clone(&keys), stop)
    })
}

/// Durable new keys (`Durability::Immediate`) by `tasks` async callers.
pub fn new_keys(dir: &Path, tasks: usize, secs: f64) -> f64 {
    let store = Store::builder(dir.join("idem"))
        .durability(Durability::Immediate)
        .open()
        .expect("a store opens in a fresh directory");
    let store = Arc::new(store);
    let ops = measure_async(tasks, secs, |t, stop| {
        new_key_caller(Arc::clone(&store), t, stop)
    });
    note_batching(&store);
    ops
}
