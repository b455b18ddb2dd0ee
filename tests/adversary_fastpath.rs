//! Adversarial tests of commit 30bb684 ("replays without the run's machinery"): the shared
//! first look (`look`), the async fast path (`try_replay` before the call's future), the HTTP
//! layer answering replays before it spawns the handler's task, and the HTTP fingerprint now
//! being the raw derive-key digest.
//!
//! Tests marked FAILS break a promise on the code they were written against; the others pass
//! and pin the promise down.

mod common;

use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use common::http::{client, counted_create, runtime, send, serve, try_send, App};
use common::Scratch;
use idemstore::http::IdempotencyLayer;
use idemstore::{
    Clock, Durability, Error, ExecuteError, Fingerprint, ManualClock, MemoryEngine, OrphanPolicy,
    RecordState, Store,
};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// The layer's store key for `key` without a tenant, as src/api/http/mod.rs `scoped_key`
/// computes it (checked against the store below, so a wrong copy fails loudly, not silently).
fn scoped_key(key: &str) -> Vec<u8> {
    let secret = blake3::derive_key("idemstore 2026-11 http idempotency key v2", b"");
    let mut pair = vec![0u8];
    pair.extend_from_slice(key.as_bytes());
    let mut scoped = b"http:".to_vec();
    scoped.extend_from_slice(blake3::keyed_hash(&secret, &pair).as_bytes());
    scoped
}

/// The derive-key digest of a POST to `path` (no query, no fingerprint headers) with `body`,
/// as src/api/http/mod.rs `request_fingerprint` computes it.
fn request_digest(path: &str, body: &[u8]) -> [u8; 32] {
    let key = blake3::derive_key("idemstore 2026-11 http request fingerprint v2", b"");
    let mut h = blake3::Hasher::new_keyed(&key);
    for field in [b"POST".as_slice(), path.as_bytes(), b"", body] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field);
    }
    *h.finalize().as_bytes()
}

/// The shape of the layer's `StoredResponse` (container names are not part of a shape).
#[derive(Debug, Serialize, Deserialize)]
struct StoredResponseV {
    status: u16,
    headers: Vec<(String, Bytes16)>,
    body: Bytes16,
    omitted_after: Option<u64>,
}

#[derive(Debug)]
struct Bytes16(Vec<u8>);

impl Serialize for Bytes16 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes16 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: serde_bytes_like::Buf = Deserialize::deserialize(d)?;
        Ok(Bytes16(v.0))
    }
}

mod serde_bytes_like {
    pub struct Buf(pub Vec<u8>);
    impl<'de> serde::Deserialize<'de> for Buf {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> serde::de::Visitor<'de> for V {
                type Value = Buf;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Buf, E> {
                    Ok(Buf(v.to_vec()))
                }
                fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Buf, E> {
                    Ok(Buf(v))
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut s: A,
                ) -> Result<Buf, A::Error> {
                    let mut v = Vec::new();
                    while let Some(b) = s.next_element::<u8>()? {
                        v.push(b);
                    }
                    Ok(Buf(v))
                }
            }
            d.deserialize_byte_buf(V)
        }
    }
}

fn io_ok<T>(v: T) -> Result<T, std::io::Error> {
    Ok(v)
}

// ---------------------------------------------------------------------------------------
// HTTP layer
// ---------------------------------------------------------------------------------------

/// Promise (fixture_v1.rs: "a store written by idemstore 0.1 must open and replay in every
/// later version"; design §15: a retry with the same key and the same request replays; only
/// a *different* request is a 422).
///
/// Attack: a change to how the layer fingerprints requests (a speed-up once made the digest
/// the fingerprint itself, without digesting it again as before) refuses a record the layer
/// wrote before the upgrade for the very same request: a client retrying across a deploy
/// would get 422 "Idempotency-Key reused" instead of its response. The record is rebuilt here
/// exactly as earlier versions stored it; the rebuilt key and fingerprint are first checked
/// against what this version writes.
#[test]
fn a_retry_spanning_the_upgrade_replays_the_first_response() {
    let scratch = Scratch::new();
    let store = Arc::new(
        scratch
            .builder()
            .clock(idemstore::SystemClock)
            .open()
            .unwrap(),
    );
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let router = Router::new()
            .route("/orders", post(counted_create))
            .layer(IdempotencyLayer::new(Arc::clone(&store)))
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();

        // Check the reconstruction of the layer's key and fingerprint against this version.
        let r = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "probe")],
            b"{\"a\":1}",
        )
        .await;
        assert_eq!(r.status, StatusCode::CREATED);
        let info = store
            .record(scoped_key("probe"))
            .unwrap()
            .expect("the test computes the layer's store key");
        assert_eq!(
            info.fingerprint,
            Some(Fingerprint::from_bytes(request_digest(
                "/orders",
                b"{\"a\":1}"
            ))),
            "the test computes the layer's fingerprint"
        );

        // A record the previous version wrote for key "upgrade" and this request.
        let body = b"{\"cents\":4200}";
        let old_fp = Fingerprint::from_bytes(request_digest("/orders", body));
        let first = StoredResponseV {
            status: 201,
            headers: vec![],
            body: Bytes16(b"{\"order\":\"written before the upgrade\"}".to_vec()),
            omitted_after: None,
        };
        store
            .call(&scoped_key("upgrade"))
            .fingerprint(old_fp)
            .run(|| io_ok(first))
            .unwrap();

        let retry = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "upgrade")],
            body,
        )
        .await;
        server.abort();
        assert_eq!(
            (
                retry.status,
                retry.replayed(),
                app.runs.load(Ordering::SeqCst)
            ),
            (StatusCode::CREATED, true, 1),
            "the same request retried across the upgrade must replay its response; got {} {}",
            retry.status,
            String::from_utf8_lossy(&retry.body)
        );
    });
}

/// A clock that panics while `boom` is set (the clock is user code the store calls).
#[derive(Clone)]
struct PanickyClock {
    inner: ManualClock,
    boom: Arc<AtomicBool>,
}

impl Clock for PanickyClock {
    fn now_millis(&self) -> u64 {
        if self.boom.load(Ordering::SeqCst) {
            panic!("clock failed");
        }
        self.inner.now_millis()
    }
}

/// Promise (mod.rs): every request with a key gets an HTTP answer; a failure of user code
/// around the run is a 500 problem ("the handler panicked; the request may be retried").
///
/// Attack: the layer's first read runs on the request's own future, before `tokio::spawn`,
/// and reads the store's clock (user code) in `look` (src/driver/execute.rs). Unguarded there
/// (src/api/http/mod.rs, the `quick_look` block), a panicking clock would unwind through the
/// service future and drop the connection with no response; inside the spawned task a panic
/// becomes a 500. The problem type says the fast path answered.
#[test]
fn a_panic_in_store_user_code_before_the_run_is_still_a_500() {
    let scratch = Scratch::new();
    let boom = Arc::new(AtomicBool::new(false));
    let clock = PanickyClock {
        inner: scratch.clock.clone(),
        boom: Arc::clone(&boom),
    };
    let store = Arc::new(scratch.builder().clock(clock).open().unwrap());
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let router = Router::new()
            .route("/orders", post(counted_create))
            .layer(IdempotencyLayer::new(Arc::clone(&store)))
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();
        // A record exists, so the fast path's look reads the clock.
        let r = send(&client, addr, "/orders", &[("idempotency-key", "k")], b"x").await;
        assert_eq!(r.status, StatusCode::CREATED);
        boom.store(true, Ordering::SeqCst);
        let answer = try_send(&client, addr, "/orders", &[("idempotency-key", "k")], b"x").await;
        boom.store(false, Ordering::SeqCst);
        server.abort();
        match answer {
            Ok(r) => assert_eq!(
                (r.status, r.problem_type().as_str()),
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "urn:idemstore:problem:store-panicked"
                ),
                "{r:?}"
            ),
            Err(e) => panic!("a request with a key got no HTTP answer at all: {e}"),
        }
    });
}

/// Promise: a different request with the same key is a 422 and never sees the first response;
/// the same request replays it; tenants never share one; the handler runs once per (tenant,
/// key); the store's counters count one replay per replay and one mismatch per mismatch.
#[test]
fn fast_path_replays_refuses_and_counts_right() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let router = Router::new()
            .route("/orders", post(counted_create))
            .layer(IdempotencyLayer::new(Arc::clone(&store)).tenant(|head| {
                head.headers
                    .get("x-account")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            }))
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();
        let a = [("idempotency-key", "k1"), ("x-account", "a")];
        let b = [("idempotency-key", "k1"), ("x-account", "b")];
        let first_a = send(&client, addr, "/orders", &a, b"one").await;
        let first_b = send(&client, addr, "/orders", &b, b"one").await;
        assert_eq!(first_a.status, StatusCode::CREATED);
        assert_eq!(first_b.status, StatusCode::CREATED);
        assert_ne!(first_a.body, first_b.body, "tenants share a response");
        let again_a = send(&client, addr, "/orders", &a, b"one").await;
        assert!(again_a.replayed());
        assert_eq!(again_a.body, first_a.body);
        let other = send(&client, addr, "/orders", &a, b"two").await;
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_ne!(other.body, first_a.body);
        let other_path = send(&client, addr, "/orders?x=1", &a, b"one").await;
        assert_eq!(other_path.status, StatusCode::UNPROCESSABLE_ENTITY);
        server.abort();
        assert_eq!(app.runs.load(Ordering::SeqCst), 2);
        let stats = store.stats();
        assert_eq!(stats.replays, 1, "{stats:?}");
        assert_eq!(stats.fingerprint_mismatches, 2, "{stats:?}");
        assert_eq!(stats.executions, 2, "{stats:?}");
    });
}

/// Promise: a damaged record gives a typed answer (500 problem), never a run nor a panic; an
/// expired record is not replayed (the handler runs afresh).
#[test]
fn fast_path_damaged_and_expired_records() {
    let scratch = Scratch::new();
    {
        let store = Arc::new(scratch.open());
        runtime().block_on(async {
            let app = Arc::new(App::default());
            let router = Router::new()
                .route("/orders", post(counted_create))
                .layer(IdempotencyLayer::new(Arc::clone(&store)).ttl(Duration::from_secs(60)))
                .with_state(Arc::clone(&app));
            let (addr, server) = serve(router).await;
            let client = client();
            let h = [("idempotency-key", "exp")];
            assert_eq!(
                send(&client, addr, "/orders", &h, b"x").await.status,
                StatusCode::CREATED
            );
            scratch.clock.advance(Duration::from_secs(61));
            let again = send(&client, addr, "/orders", &h, b"x").await;
            assert_eq!(again.status, StatusCode::CREATED);
            assert!(!again.replayed(), "an expired record was replayed");
            assert_eq!(app.runs.load(Ordering::SeqCst), 2);
            let h = [("idempotency-key", "bad")];
            assert_eq!(
                send(&client, addr, "/orders", &h, b"x").await.status,
                StatusCode::CREATED
            );
            server.abort();
        });
        drop(store);
    }
    let mut bytes = scratch.peek_record(&scoped_key("bad")).expect("record");
    let n = bytes.len();
    bytes.truncate(n / 2);
    scratch.poke_record(&scoped_key("bad"), &bytes);
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let router = Router::new()
            .route("/orders", post(counted_create))
            .layer(IdempotencyLayer::new(Arc::clone(&store)))
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();
        let r = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "bad")],
            b"x",
        )
        .await;
        server.abort();
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{r:?}");
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            0,
            "a damaged record ran the handler"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Async API fast path
// ---------------------------------------------------------------------------------------

fn memory_builder(clock: &ManualClock) -> idemstore::StoreBuilder {
    Store::builder("memory")
        .clock(clock.clone())
        .sweep_interval(None)
        .durability(Durability::Immediate)
}

/// Promise (state.rs `durable_before_replay`, design §6): once a durability point has failed,
/// a replay makes one of its own and fails rather than return a record that may not be
/// durable; the replay counter counts only replays given.
///
/// Attack: the outcome's barrier fails (the caller gets the error, the Completed record is in
/// the engine but not durable); the next barrier fails too. The async fast path
/// (`try_replay`) must not return the outcome. Then, with barriers working again, the replay
/// is made durable: after a crash the key replays the same value (never runs again).
#[test]
fn async_fast_path_honours_a_failed_durability_point() {
    let clock = ManualClock::new(common::START_MS);
    let engine = MemoryEngine::new();
    let store = engine.open(memory_builder(&clock)).unwrap();
    let runs = AtomicU32::new(0);
    let rt = runtime();
    rt.block_on(async {
        engine.fail_nth_barrier(1); // the outcome's (under Rerun the claim makes none)
        let first = store
            .execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(7u32)
            })
            .await;
        assert!(first.is_err(), "the outcome's barrier failed: {first:?}");
        engine.fail_nth_barrier(1);
        let replay = store
            .execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(8u32)
            })
            .await;
        assert!(
            matches!(replay, Err(ExecuteError::Store(Error::Storage(_)))),
            "a replay of a record whose durability failed, with the replay's own barrier \
             failing, must fail: {replay:?}"
        );
        assert_eq!(store.stats().replays, 0);
        let replay = store
            .execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(9u32)
            })
            .await
            .unwrap();
        assert!(replay.is_replayed());
        assert_eq!(*replay, 7);
        assert_eq!(store.stats().replays, 1);
    });
    engine.crash();
    drop(store);
    let store = engine.open(memory_builder(&clock)).unwrap();
    rt.block_on(async {
        let after = store
            .execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                io_ok(10u32)
            })
            .await
            .unwrap();
        assert_eq!(
            (*after, after.is_replayed()),
            (7, true),
            "a replayed outcome was lost"
        );
    });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Promise (design §2): a Pending record of an interrupted run is `Interrupted` under
/// `Report` (not replayed, not run); a retryable record runs again; a permanent error
/// replays; steps replay through the async steps API; fingerprint mismatches are refused
/// whatever the record's state; counters stay right.
#[test]
fn async_fast_path_states() {
    let clock = ManualClock::new(common::START_MS);
    let engine = MemoryEngine::new();
    let store = engine
        .open(memory_builder(&clock).orphan_policy(OrphanPolicy::Report))
        .unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    runtime().block_on(async {
        // Retryable: runs again.
        let r = store
            .execute_once_async("retry", || async {
                Err::<u32, _>(std::io::Error::other("x"))
            })
            .await;
        assert!(r.is_err());
        let r = store
            .execute_once_async("retry", || async { io_ok(2u32) })
            .await
            .unwrap();
        assert!(!r.is_replayed());
        assert_eq!(*r, 2);

        // Interrupted: a future dropped after its claim leaves an orphan.
        {
            let started = Arc::new(tokio::sync::Notify::new());
            let s2 = Arc::clone(&started);
            let call = store.execute_once_async("orphan", move || async move {
                s2.notify_one();
                std::future::pending::<()>().await;
                io_ok(1u32)
            });
            tokio::select! {
                _ = call => panic!("pending never returns"),
                _ = started.notified() => {}
            }
        }
        let r = store
            .execute_once_async("orphan", || async { io_ok(5u32) })
            .await;
        assert!(
            matches!(r, Err(ExecuteError::Store(Error::Interrupted { .. }))),
            "{r:?}"
        );

        // Steps, replayed by the async steps API.
        let fp = Fingerprint::of_bytes(b"req");
        let runs2 = Arc::clone(&runs);
        let first = store
            .call("steps")
            .fingerprint(fp)
            .run_steps_async(move |ctx| async move {
                let a: u32 = ctx.step("a", || async { io_ok(1u32) }).await.unwrap();
                runs2.fetch_add(1, Ordering::SeqCst);
                io_ok(a + 1)
            })
            .await
            .unwrap();
        assert_eq!(*first, 2);
        let replay = store
            .call("steps")
            .fingerprint(fp)
            .run_steps_async(|_ctx| async { io_ok(99u32) })
            .await
            .unwrap();
        assert_eq!((*replay, replay.is_replayed()), (2, true));
        let other = store
            .call("steps")
            .fingerprint(Fingerprint::of_bytes(b"other"))
            .run_steps_async(|_ctx| async { io_ok(98u32) })
            .await;
        assert!(matches!(
            other,
            Err(ExecuteError::Store(Error::FingerprintMismatch { .. }))
        ));
        // Mismatch against the Pending orphan is refused too, not reported as Interrupted.
        let r = store
            .call("orphan")
            .fingerprint(Fingerprint::of_bytes(b"x"))
            .run_async(|| async { io_ok(1u32) })
            .await;
        assert!(r.is_err(), "{r:?}");
    });
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let stats = store.stats();
    assert_eq!(stats.replays, 1, "{stats:?}");
    assert_eq!(stats.fingerprint_mismatches, 1, "{stats:?}");
    assert_eq!(
        store.record("orphan").unwrap().unwrap().state,
        RecordState::Pending
    );
}

/// Promise (design §6): with `Durability::Immediate`, a replay never returns an outcome that is
/// not yet durable: a concurrent reader of a key whose writer (this process) has written its
/// outcome but not passed its barrier waits for it.
///
/// Attack: sync writers on threads, async readers through the fast path spinning on the same
/// keys; a reader that gets a replay before its writer returned crashes the engine at once
/// (power loss). Whatever was replayed must survive the crash. (Probabilistic: it can only
/// fail, never flake into a false failure.)
#[test]
fn async_fast_path_never_replays_an_outcome_a_crash_can_lose() {
    const KEYS: u32 = 300;
    let clock = ManualClock::new(common::START_MS);
    let engine = MemoryEngine::new();
    let store = Arc::new(engine.open(memory_builder(&clock)).unwrap());
    let done: Arc<Vec<AtomicBool>> = Arc::new((0..KEYS).map(|_| AtomicBool::new(false)).collect());
    let replayed_early = Arc::new(std::sync::Mutex::new(None::<u32>));
    let writer = {
        let (store, done) = (Arc::clone(&store), Arc::clone(&done));
        std::thread::spawn(move || {
            for i in 0..KEYS {
                let r = store.execute_once(format!("k{i}"), || io_ok(i));
                done[i as usize].store(true, Ordering::SeqCst);
                if r.is_err() {
                    return; // the engine crashed
                }
            }
        })
    };
    let rt = runtime();
    rt.block_on(async {
        'keys: for i in 0..KEYS {
            loop {
                if done[i as usize].load(Ordering::SeqCst) {
                    continue 'keys;
                }
                // Only a replay can answer without running: a call on an absent key would
                // run; so read the record first and ask only when it is Completed.
                let completed = store
                    .record(format!("k{i}"))
                    .ok()
                    .flatten()
                    .is_some_and(|r| r.state == RecordState::Completed);
                if !completed {
                    tokio::task::yield_now().await;
                    continue;
                }
                let r = store
                    .execute_once_async(format!("k{i}"), || async { io_ok(u32::MAX) })
                    .await;
                if let Ok(v) = r {
                    if v.is_replayed() && !done[i as usize].load(Ordering::SeqCst) {
                        engine.crash();
                        *replayed_early.lock().unwrap() = Some(i);
                        break 'keys;
                    }
                }
                continue 'keys;
            }
        }
    });
    writer.join().unwrap();
    let early = *replayed_early.lock().unwrap();
    drop(store);
    if let Some(i) = early {
        engine.crash();
        let store = engine.open(memory_builder(&clock)).unwrap();
        let info = store.record(format!("k{i}")).unwrap();
        assert_eq!(
            info.map(|r| r.state),
            Some(RecordState::Completed),
            "key k{i} was replayed, then lost in a crash"
        );
    }
}

/// Promise (design §15): a retry that one local read settles is answered before any task is
/// spawned. Polled once, outside any tokio runtime, with a waker that does nothing: the
/// replay must be ready at once (a spawned task would panic without a runtime, and could
/// not be ready on the first poll), and the handler must not run.
#[test]
fn a_replay_on_sled_needs_no_task_and_no_second_poll() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    use tower_service::Service;

    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().open().unwrap());
    let app = Arc::new(App::default());
    let mut router = Router::new()
        .route("/orders", post(counted_create))
        .layer(IdempotencyLayer::new(Arc::clone(&store)))
        .with_state(Arc::clone(&app));
    let request = || {
        axum::http::Request::post("/orders")
            .header("idempotency-key", "\"no-task\"")
            .body(axum::body::Body::from("{\"cents\":4200}"))
            .unwrap()
    };
    // The first request runs the handler in a task: it needs a runtime.
    let first = runtime()
        .block_on(router.call(request()))
        .expect("the first request is answered");
    assert_eq!(first.status(), StatusCode::CREATED);
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);

    let mut retry = std::pin::pin!(router.call(request()));
    let mut cx = Context::from_waker(Waker::noop());
    match retry.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(response)) => {
            assert_eq!(response.status(), StatusCode::CREATED);
            assert_eq!(
                response
                    .headers()
                    .get("idempotent-replayed")
                    .map(|v| v.as_bytes()),
                Some(&b"true"[..])
            );
        }
        Poll::Ready(Err(never)) => match never {},
        Poll::Pending => {
            panic!("a replay waited on something: the layer did not answer it at once")
        }
    }
    assert_eq!(app.runs.load(Ordering::SeqCst), 1, "the handler ran again");
    assert_eq!(store.stats().replays, 1);
}
