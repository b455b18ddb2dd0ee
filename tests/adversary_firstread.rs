//! Adversarial tests of the first read the async API and the HTTP layer take before the full
//! call (`try_replay` → `QuickLook`), and of what that call may take from it. First written
//! against a version that carried the read's bytes into the call (`lead_async`'s first look)
//! on the claim that "a read taken before the call began is as good as one taken now"; the
//! last test broke it (a stale expired life replayed after the clock stepped back). Now only
//! "absent" is carried, which can only lead to a compare-and-swap claim.
//!
//! The attacks change the record between that first read and the decision taken on it: another
//! thread completes, re-claims, sweeps, or orphans the key; an expired life with steps is
//! retired by someone else; a claim's barrier fails and its record is put back; and the clock
//! steps back (the store allows it: src/clock.rs) while a stale read waits in the HTTP layer's
//! queued task.
//!
//! Windows are opened deterministically: `GateClock` pauses one chosen thread at its n-th
//! clock reading (the async API reads the clock once in the first look and again in
//! `lead_async`'s look, after the read is taken in old and new code alike), and the HTTP tests
//! poll the layer's future once on a current-thread runtime, so its task is spawned but not
//! run until the test lets the runtime go on.

mod common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::http::{counted_create, App};
use common::Scratch;
use http_body_util::BodyExt;
use idemstore::http::IdempotencyLayer;
use idemstore::{
    Clock, Durability, Error, ExecuteError, ManualClock, MemoryEngine, OrphanPolicy, RecordState,
    Store,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::thread::ThreadId;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

struct Gate {
    thread: ThreadId,
    nth: u64,
    seen: u64,
    paused: mpsc::Sender<()>,
    go: mpsc::Receiver<()>,
}

/// A manual clock that can pause one thread at its n-th reading (until released), and counts
/// every reading.
#[derive(Clone)]
struct GateClock {
    inner: ManualClock,
    readings: Arc<AtomicU64>,
    gate: Arc<Mutex<Option<Gate>>>,
}

impl GateClock {
    fn new(inner: ManualClock) -> Self {
        Self {
            inner,
            readings: Arc::new(AtomicU64::new(0)),
            gate: Arc::new(Mutex::new(None)),
        }
    }

    /// Arms the gate for `thread`'s `nth` reading from now; returns (paused, go).
    fn arm(&self, thread: ThreadId, nth: u64) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (paused_tx, paused_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel();
        *self.gate.lock().unwrap() = Some(Gate {
            thread,
            nth,
            seen: 0,
            paused: paused_tx,
            go: go_rx,
        });
        (paused_rx, go_tx)
    }
}

impl Clock for GateClock {
    fn now_millis(&self) -> u64 {
        self.readings.fetch_add(1, Ordering::SeqCst);
        let fire = {
            let mut gate = self.gate.lock().unwrap();
            match gate.as_mut() {
                Some(g) if g.thread == std::thread::current().id() => {
                    g.seen += 1;
                    if g.seen == g.nth {
                        gate.take()
                    } else {
                        None
                    }
                }
                _ => None,
            }
        };
        if let Some(g) = fire {
            g.paused.send(()).unwrap();
            g.go.recv_timeout(common::PATIENCE)
                .expect("the test never released the paused thread");
        }
        self.inner.now_millis()
    }
}

fn io_ok<T>(v: T) -> Result<T, std::io::Error> {
    Ok(v)
}

fn current_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const TTL: Duration = Duration::from_secs(60);

/// Runs `call` on a new thread (its own current-thread runtime) whose 2nd clock reading (the
/// one in `lead_async`'s look, after the first read was taken) pauses; returns once it is
/// paused, with the handle and the release.
fn start_paused<R: Send + 'static>(
    clock: &GateClock,
    call: impl FnOnce() -> R + Send + 'static,
) -> (std::thread::JoinHandle<R>, mpsc::Sender<()>) {
    let (tid_tx, tid_rx) = mpsc::channel();
    let (armed_tx, armed_rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        tid_tx.send(std::thread::current().id()).unwrap();
        armed_rx.recv().unwrap();
        call()
    });
    let tid = tid_rx.recv().unwrap();
    let (paused, go) = clock.arm(tid, 2);
    armed_tx.send(()).unwrap();
    paused
        .recv_timeout(common::PATIENCE)
        .expect("the call never reached its second clock reading");
    (handle, go)
}

fn open_gated(scratch: &Scratch) -> (Arc<Store>, GateClock) {
    let clock = GateClock::new(scratch.clock.clone());
    let store = Arc::new(
        scratch
            .builder()
            .clock(clock.clone())
            .default_ttl(TTL)
            .open()
            .unwrap(),
    );
    (store, clock)
}

// ---------------------------------------------------------------------------------------
// Async API: the record changes between the first read and the claim
// ---------------------------------------------------------------------------------------

/// Promise (design §1, §2): f runs once per recorded outcome; a call that finds the key
/// completed replays it.
///
/// Attack: the async call reads the key absent, then (paused after its read) another thread
/// runs the key to completion. The stale "absent" must not let the async call run f again.
#[test]
fn absent_read_then_completed_elsewhere_replays() {
    let scratch = Scratch::new();
    let (store, clock) = open_gated(&scratch);
    let runs = Arc::new(AtomicU32::new(0));
    let (b, go) = {
        let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
        start_paused(&clock, move || {
            current_rt().block_on(store.execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(2u32)
            }))
        })
    };
    let first = store
        .execute_once("k", || {
            runs.fetch_add(1, Ordering::SeqCst);
            io_ok(1u32)
        })
        .unwrap();
    assert_eq!((*first, first.is_replayed()), (1, false));
    go.send(()).unwrap();
    let b = b.join().unwrap().unwrap();
    assert_eq!(
        (*b, b.is_replayed()),
        (1, true),
        "stale absent read re-ran f"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stats = store.stats();
    assert_eq!((stats.executions, stats.replays), (1, 1), "{stats:?}");
}

/// Promise (design §2, §3): an expired record is claimed anew once; the claim is a
/// compare-and-swap, so two calls never both run f for one expiry.
///
/// Attack: the async call reads the expired record, pauses; another thread claims over it and
/// completes. The async call's claim against the stale bytes must fail and it must replay the
/// new outcome.
#[test]
fn expired_read_then_reclaimed_elsewhere_replays_the_new_outcome() {
    let scratch = Scratch::new();
    let (store, clock) = open_gated(&scratch);
    let runs = Arc::new(AtomicU32::new(0));
    store
        .execute_once("k", || {
            runs.fetch_add(1, Ordering::SeqCst);
            io_ok(1u32)
        })
        .unwrap();
    scratch.clock.advance(TTL * 2);
    let (b, go) = {
        let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
        start_paused(&clock, move || {
            current_rt().block_on(store.execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(3u32)
            }))
        })
    };
    let d = store
        .execute_once("k", || {
            runs.fetch_add(1, Ordering::SeqCst);
            io_ok(2u32)
        })
        .unwrap();
    assert_eq!((*d, d.is_replayed()), (2, false));
    go.send(()).unwrap();
    let b = b.join().unwrap().unwrap();
    assert_eq!((*b, b.is_replayed()), (2, true));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let stats = store.stats();
    assert_eq!((stats.executions, stats.replays), (2, 1), "{stats:?}");
}

/// Promise (design §3, §4, §7): an expired life with steps is retired once, its record and
/// steps together; a life only sees its own steps; each step runs once per life.
///
/// Attack: the async steps call reads the expired record of life 1, pauses; another thread
/// retires life 1 and completes life 2 with its steps. The stale read's retirement must fail
/// (not remove life 2) and the call must replay life 2, running no step.
#[test]
fn expired_steps_read_then_life_retired_elsewhere() {
    let scratch = Scratch::new();
    let (store, clock) = open_gated(&scratch);
    let step_runs = Arc::new(AtomicU32::new(0));
    let op_runs = Arc::new(AtomicU32::new(0));
    let sync_run = |v: u32| {
        let (s, o) = (Arc::clone(&step_runs), Arc::clone(&op_runs));
        move |ctx: &mut idemstore::Context<'_>| -> Result<u32, std::io::Error> {
            let a: u32 = ctx
                .step("a", || {
                    s.fetch_add(1, Ordering::SeqCst);
                    io_ok(v)
                })
                .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
            o.fetch_add(1, Ordering::SeqCst);
            Ok(a * 10)
        }
    };
    store.execute_steps("k", sync_run(1)).unwrap();
    scratch.clock.advance(TTL * 2);
    let (b, go) = {
        let store = Arc::clone(&store);
        let (s, o) = (Arc::clone(&step_runs), Arc::clone(&op_runs));
        start_paused(&clock, move || {
            current_rt().block_on(store.execute_steps_async("k", move |ctx| async move {
                let a: u32 = ctx
                    .step("a", || async {
                        s.fetch_add(1, Ordering::SeqCst);
                        io_ok(3u32)
                    })
                    .await
                    .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
                o.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, std::io::Error>(a * 10)
            }))
        })
    };
    let d = store.execute_steps("k", sync_run(2)).unwrap();
    assert_eq!((*d, d.is_replayed()), (20, false));
    go.send(()).unwrap();
    let b = b.join().unwrap().unwrap();
    assert_eq!((*b, b.is_replayed()), (20, true));
    assert_eq!(step_runs.load(Ordering::SeqCst), 2);
    assert_eq!(op_runs.load(Ordering::SeqCst), 2);
    let steps = store.steps("k").unwrap();
    assert_eq!(steps.len(), 1, "life 2's step must survive: {steps:?}");
    drop(store);
    assert_eq!(
        scratch.count_steps(),
        1,
        "life 1's step left behind or life 2's lost"
    );
}

/// Promise (design §7): the sweeper removes an expired record against the bytes it read; a
/// call after that starts a new life and runs f once.
///
/// Attack: the async call reads the expired record, pauses; the sweeper removes it. The stale
/// claim against the removed bytes must fail, and the call claim the absent key and run once.
#[test]
fn expired_read_then_swept_runs_once() {
    let scratch = Scratch::new();
    let (store, clock) = open_gated(&scratch);
    let runs = Arc::new(AtomicU32::new(0));
    store
        .execute_once("k", || {
            runs.fetch_add(1, Ordering::SeqCst);
            io_ok(1u32)
        })
        .unwrap();
    scratch.clock.advance(TTL * 2);
    let (b, go) = {
        let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
        start_paused(&clock, move || {
            current_rt().block_on(store.execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(2u32)
            }))
        })
    };
    assert_eq!(store.sweep_now().unwrap(), 1);
    assert!(store.record("k").unwrap().is_none());
    go.send(()).unwrap();
    let b = b.join().unwrap().unwrap();
    assert_eq!((*b, b.is_replayed()), (2, false));
    let again = store
        .execute_once("k", || {
            runs.fetch_add(1, Ordering::SeqCst);
            io_ok(9u32)
        })
        .unwrap();
    assert_eq!((*again, again.is_replayed()), (2, true));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    let stats = store.stats();
    assert_eq!(
        (stats.executions, stats.replays, stats.records_swept),
        (2, 1, 1),
        "{stats:?}"
    );
}

/// Promise (design §2, §8): a Pending record no call of this process runs is an orphan:
/// under `Report` the next call gets `Interrupted`, f does not run, the record is unchanged.
///
/// Attack: the async call reads the key absent, pauses; meanwhile another call claims and is
/// dropped mid-run (an orphan). The stale "absent" must not hide the orphan.
#[test]
fn absent_read_then_orphaned_elsewhere_is_reported() {
    let scratch = Scratch::new();
    let clock = GateClock::new(scratch.clock.clone());
    let store = Arc::new(
        scratch
            .builder()
            .clock(clock.clone())
            .orphan_policy(OrphanPolicy::Report)
            .open()
            .unwrap(),
    );
    let runs = Arc::new(AtomicU32::new(0));
    let (b, go) = {
        let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
        start_paused(&clock, move || {
            current_rt().block_on(store.execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(2u32)
            }))
        })
    };
    // An orphan, made on another thread's runtime: a call dropped after its claim.
    {
        let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
        std::thread::spawn(move || {
            current_rt().block_on(async {
                let started = Arc::new(tokio::sync::Notify::new());
                let s2 = Arc::clone(&started);
                let call = store.execute_once_async("k", move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    s2.notify_one();
                    std::future::pending::<()>().await;
                    io_ok(1u32)
                });
                tokio::select! {
                    _ = call => panic!("pending never returns"),
                    _ = started.notified() => {}
                }
            })
        })
        .join()
        .unwrap();
    }
    assert_eq!(
        store.record("k").unwrap().unwrap().state,
        RecordState::Pending
    );
    go.send(()).unwrap();
    let b = b.join().unwrap();
    assert!(
        matches!(b, Err(ExecuteError::Store(Error::Interrupted { .. }))),
        "{b:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        store.record("k").unwrap().unwrap().state,
        RecordState::Pending
    );
    let stats = store.stats();
    assert_eq!(
        (
            stats.executions,
            stats.orphans_reported,
            stats.orphans_recovered
        ),
        (1, 1, 0),
        "{stats:?}"
    );
}

/// Promise (design §8): a call that finds the key's call of this process running waits for
/// it, then replays; f runs once.
///
/// Attack: the async call reads the key absent, pauses; another thread claims the key and
/// blocks inside f (holding the registry). The stale read must lead the async call to wait, not
/// to a claim of its own; once f returns, it replays.
#[test]
fn absent_read_then_running_elsewhere_waits_and_replays() {
    let scratch = Scratch::new();
    let (store, clock) = open_gated(&scratch);
    let runs = Arc::new(AtomicU32::new(0));
    let (b, go) = {
        let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
        start_paused(&clock, move || {
            current_rt().block_on(store.execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(2u32)
            }))
        })
    };
    let (inside_tx, inside_rx) = mpsc::channel::<()>();
    let (finish_tx, finish_rx) = mpsc::channel::<()>();
    let a = {
        let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
        std::thread::spawn(move || {
            store.execute_once("k", || {
                runs.fetch_add(1, Ordering::SeqCst);
                inside_tx.send(()).unwrap();
                finish_rx.recv().unwrap();
                io_ok(1u32)
            })
        })
    };
    inside_rx.recv_timeout(common::PATIENCE).unwrap();
    go.send(()).unwrap();
    // Let B get to its wait (or, wrongly, to a run of its own) before A finishes.
    common::wait_until("B waits or runs", || {
        store.stats().waits >= 1 || runs.load(Ordering::SeqCst) >= 2 || b.is_finished()
    });
    finish_tx.send(()).unwrap();
    let a = a.join().unwrap().unwrap();
    let b = b.join().unwrap().unwrap();
    assert_eq!((*a, a.is_replayed()), (1, false));
    assert_eq!((*b, b.is_replayed()), (1, true));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stats = store.stats();
    assert_eq!(
        (stats.executions, stats.replays, stats.waits),
        (1, 1, 1),
        "{stats:?}"
    );
}

/// Promise (design §1, §6, §9): nothing recorded is lost across a crash; f runs once per
/// recorded outcome.
///
/// Attack (memory engine): the async call reads the key absent and pauses; another call's
/// claim barrier fails, so it puts the key back as it was (absent) without running. The
/// stale "absent" now matches again: the async call claims and runs. A power loss right after
/// must not lose what it returned.
#[test]
fn absent_read_then_claim_put_back_elsewhere_then_crash() {
    let base = ManualClock::new(common::START_MS);
    let clock = GateClock::new(base.clone());
    let engine = MemoryEngine::new();
    let builder = || {
        Store::builder("memory")
            .clock(clock.clone())
            .sweep_interval(None)
            .durability(Durability::Immediate)
    };
    let store = Arc::new(engine.open(builder()).unwrap());
    let runs = Arc::new(AtomicU32::new(0));
    let (b, go) = {
        let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
        start_paused(&clock, move || {
            current_rt().block_on(store.execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(2u32)
            }))
        })
    };
    engine.fail_nth_barrier(1);
    // Under Report, so its claim makes a barrier before it runs (the one that fails).
    let d = store.call("k").orphan_policy(OrphanPolicy::Report).run(|| {
        runs.fetch_add(1, Ordering::SeqCst);
        io_ok(1u32)
    });
    assert!(d.is_err(), "{d:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    go.send(()).unwrap();
    let b = b.join().unwrap();
    let returned = b.as_ref().ok().map(|o| **o);
    assert_eq!(
        returned,
        Some(2),
        "the put-back key is absent again: B claims and runs: {b:?}"
    );
    engine.crash();
    drop(store);
    let store = engine.open(builder()).unwrap();
    let after = store
        .execute_once("k", || {
            runs.fetch_add(1, Ordering::SeqCst);
            io_ok(3u32)
        })
        .unwrap();
    match returned {
        Some(v) => {
            assert_eq!(
                (*after, after.is_replayed()),
                (v, true),
                "a returned outcome was lost"
            );
            assert_eq!(runs.load(Ordering::SeqCst), 1);
        }
        None => assert!(runs.load(Ordering::SeqCst) <= 2, "{b:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// HTTP layer: the first read waits in the request's future while the task is queued
// ---------------------------------------------------------------------------------------

fn request(key: &str, body: &'static [u8]) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/orders")
        .header("idempotency-key", key)
        .header("content-type", "application/octet-stream")
        .body(Body::from(body))
        .unwrap()
}

async fn answer(
    fut: impl Future<Output = Result<axum::response::Response, std::convert::Infallible>>,
) -> (StatusCode, bool, Bytes) {
    let r = fut.await.unwrap();
    let status = r.status();
    let replayed = r
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true");
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (status, replayed, body)
}

/// Polls `fut` once, here, without yielding to the runtime.
async fn poll_once<F: Future + ?Sized>(fut: Pin<&mut F>) -> bool {
    let mut fut = Some(fut);
    std::future::poll_fn(|cx| {
        let ready = fut.take().unwrap().poll(cx).is_ready();
        Poll::Ready(ready)
    })
    .await
}

fn router(store: &Arc<Store>, app: &Arc<App>) -> Router {
    Router::new()
        .route("/orders", post(counted_create))
        .layer(IdempotencyLayer::new(Arc::clone(store)).ttl(TTL))
        .with_state(Arc::clone(app))
}

/// Sends `request` through a clone of `router` on another thread's runtime, to completion.
fn send_elsewhere(router: &Router, req: Request<Body>) -> (StatusCode, bool, Bytes) {
    let mut router = router.clone();
    std::thread::spawn(move || {
        current_rt()
            .block_on(async move { answer(tower_service::Service::call(&mut router, req)).await })
    })
    .join()
    .unwrap()
}

/// Promise (design §15, §1): a retry with the same key and request replays the first
/// response; the handler runs once per recorded response.
///
/// Attack: request B's future reads the key absent and spawns its task, which waits in the
/// queue; meanwhile request D (another thread) runs the handler to completion. B's task starts
/// from its stale "absent" read: it must replay D's response, not run the handler again.
#[test]
fn http_queued_task_after_another_request_completed_replays() {
    let scratch = Scratch::new();
    let clock = GateClock::new(scratch.clock.clone());
    let store = Arc::new(scratch.builder().clock(clock.clone()).open().unwrap());
    let app = Arc::new(App::default());
    let router = router(&store, &app);
    current_rt().block_on(async {
        let mut r = router.clone();
        let mut b = Box::pin(tower_service::Service::call(&mut r, request("k", b"x")));
        let before = clock.readings.load(Ordering::SeqCst);
        assert!(!poll_once(b.as_mut()).await, "B answered without its task");
        assert!(
            clock.readings.load(Ordering::SeqCst) > before,
            "B's first poll did not read the key"
        );
        let d = send_elsewhere(&router, request("k", b"x"));
        assert_eq!((d.0, d.1), (StatusCode::CREATED, false));
        let b = answer(b).await;
        assert_eq!((b.0, b.1), (StatusCode::CREATED, true), "{b:?}");
        assert_eq!(b.2, d.2);
    });
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);
    let stats = store.stats();
    assert_eq!((stats.executions, stats.replays), (1, 1), "{stats:?}");
}

/// Promise (design §1, §2, §7; src/clock.rs: "the store does not require the clock to be
/// monotonic ... a clock stepping backwards only delays expiry"): a call answers from the
/// key's record as it is when the call decides; an expired life that was superseded by a new
/// life is never replayed; every request with the key, at one time, gets the same response.
///
/// Attack: the first response (order 1) expires. Request B's future reads the expired record
/// and spawns its task, which is queued. Request D then finds the record expired and runs the
/// handler (order 2, a new life). The clock steps back (NTP) to within order 1's TTL. B's task
/// starts from its stale read: it sees order 1 "live" again and replays it without reading,
/// although the key's record is order 2, which every other request now replays.
#[test]
fn http_stale_read_replays_a_superseded_life_after_clock_step_back() {
    let scratch = Scratch::new();
    let clock = GateClock::new(scratch.clock.clone());
    let store = Arc::new(scratch.builder().clock(clock.clone()).open().unwrap());
    let app = Arc::new(App::default());
    let router = router(&store, &app);
    current_rt().block_on(async {
        let mut r = router.clone();
        let first = answer(tower_service::Service::call(&mut r, request("k", b"x"))).await;
        assert_eq!((first.0, first.1), (StatusCode::CREATED, false));
        scratch.clock.advance(TTL * 2); // order 1 expired
        let mut b = Box::pin(tower_service::Service::call(&mut r, request("k", b"x")));
        let before = clock.readings.load(Ordering::SeqCst);
        assert!(!poll_once(b.as_mut()).await, "B answered without its task");
        assert!(
            clock.readings.load(Ordering::SeqCst) > before,
            "B's first poll did not read the key"
        );
        let d = send_elsewhere(&router, request("k", b"x"));
        assert_eq!((d.0, d.1), (StatusCode::CREATED, false), "{d:?}");
        assert_ne!(d.2, first.2);
        // The wall clock steps back, to within order 1's TTL.
        scratch.clock.set(common::START_MS + 10_000);
        let b = answer(b).await;
        let now = send_elsewhere(&router, request("k", b"x"));
        assert_eq!(now.2, d.2, "the key's record is order 2");
        assert_eq!(
            b.2,
            d.2,
            "B replayed order 1 ({}), a superseded life, while the key's record is order 2 ({})",
            String::from_utf8_lossy(&b.2),
            String::from_utf8_lossy(&d.2)
        );
    });
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
}

/// Promise (design §2, §15 with `Conflict::Wait`): a request whose key is being run by
/// another request waits and replays; stats count one execution.
///
/// Attack: B's stale first read is "absent", then another request's handler runs (holding the
/// key) while B's task is queued; B's task must wait on the registry, not claim.
#[test]
fn http_queued_task_while_another_request_runs_waits() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let release = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU32::new(0));
    let router = {
        let (release, runs) = (Arc::clone(&release), Arc::clone(&runs));
        Router::new()
            .route(
                "/orders",
                post(move || {
                    let (release, runs) = (Arc::clone(&release), Arc::clone(&runs));
                    async move {
                        let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        while !release.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        (StatusCode::CREATED, format!("{{\"order\":{n}}}"))
                    }
                }),
            )
            .layer(
                IdempotencyLayer::new(Arc::clone(&store))
                    .ttl(TTL)
                    .on_conflict(idemstore::http::Conflict::Wait(common::PATIENCE)),
            )
    };
    let rt = current_rt();
    rt.block_on(async {
        let mut r = router.clone();
        let mut b = Box::pin(tower_service::Service::call(&mut r, request("k", b"x")));
        assert!(!poll_once(b.as_mut()).await);
        // D on another thread: its handler starts and holds the key.
        let d = {
            let router = router.clone();
            std::thread::spawn(move || send_elsewhere(&router, request("k", b"x")))
        };
        common::wait_until("D's handler runs", || runs.load(Ordering::SeqCst) == 1);
        // B's task now runs from its stale read; let it get somewhere, then release D.
        let releaser = {
            let (release, store) = (Arc::clone(&release), Arc::clone(&store));
            let runs = Arc::clone(&runs);
            std::thread::spawn(move || {
                common::wait_until("B waits or runs", || {
                    store.stats().waits >= 1 || runs.load(Ordering::SeqCst) >= 2
                });
                release.store(true, Ordering::SeqCst);
            })
        };
        let b = answer(b).await;
        releaser.join().unwrap();
        let d = d.join().unwrap();
        assert_eq!((d.0, d.1), (StatusCode::CREATED, false));
        assert_eq!((b.0, b.1), (StatusCode::CREATED, true), "{b:?}");
        assert_eq!(b.2, d.2);
    });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stats = store.stats();
    assert_eq!((stats.executions, stats.replays), (1, 1), "{stats:?}");
}
