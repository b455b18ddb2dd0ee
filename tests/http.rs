//! The `Idempotency-Key` layer over a real HTTP server on 127.0.0.1 (axum on hyper), driven by
//! a real HTTP client (hyper's): retries, concurrent duplicates (exactly one handler run),
//! mismatches, missing and malformed keys, a restart between a request and its retry, large
//! bodies both ways, a client that disconnects mid-request, responses that are not stored, and
//! the same key from two tenants. On sled in temp dirs, and on PostgreSQL when configured.

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::http::{client, runtime, send, serve};
use common::pg::{pg_url, PgSchema};
use common::Scratch;
use idemstore::http::{Conflict, IdempotencyLayer};
use idemstore::{PgStore, StoreBuilder};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the handlers share: how often each ran, and gates to hold a request open.
#[derive(Default)]
struct App {
    runs: AtomicU32,
    slow_gate: tokio::sync::Notify,
}

async fn create_order(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if headers.contains_key("x-slow") {
        app.slow_gate.notified().await;
    }
    let mut out = HeaderMap::new();
    out.insert("content-type", "application/json".parse().expect("value"));
    out.insert("location", format!("/orders/{n}").parse().expect("value"));
    out.insert("set-cookie", "session=abc".parse().expect("value"));
    (
        StatusCode::CREATED,
        out,
        format!("{{\"order\":{n},\"bytes\":{}}}", body.len()),
    )
}

async fn busy(State(app): State<Arc<App>>) -> (StatusCode, &'static str) {
    app.runs.fetch_add(1, Ordering::SeqCst);
    (StatusCode::SERVICE_UNAVAILABLE, "try later")
}

async fn broken(State(app): State<Arc<App>>) -> (StatusCode, &'static str) {
    app.runs.fetch_add(1, Ordering::SeqCst);
    (StatusCode::INTERNAL_SERVER_ERROR, "boom")
}

async fn big(State(app): State<Arc<App>>) -> Vec<u8> {
    app.runs.fetch_add(1, Ordering::SeqCst);
    vec![b'x'; 3 << 20]
}

/// The test service behind `layer` (a macro: the engine parameter cannot be named here).
macro_rules! router {
    ($layer:expr, $app:expr) => {
        Router::new()
            .route("/orders", post(create_order))
            .route("/busy", post(busy))
            .route("/broken", post(broken))
            .route("/big", post(big))
            .layer($layer)
            .with_state($app)
    };
}

#[test]
fn retries_replay_and_duplicates_run_once() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().open().expect("open"));
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store));
        let (addr, server) = serve(router!(layer, Arc::clone(&app))).await;
        let client = client();
        let key = [
            ("idempotency-key", "\"order-1\""),
            ("content-type", "application/json"),
        ];

        let first = send(&client, addr, "/orders", &key, b"{\"sku\":1}").await;
        assert_eq!(first.status, StatusCode::CREATED);
        assert!(!first.replayed());
        assert!(
            first.headers.contains_key("set-cookie"),
            "the first caller gets every header"
        );
        for _ in 0..3 {
            let again = send(&client, addr, "/orders", &key, b"{\"sku\":1}").await;
            assert_eq!(
                (again.status, &again.body),
                (StatusCode::CREATED, &first.body)
            );
            assert!(again.replayed());
            assert_eq!(again.headers["location"], first.headers["location"]);
            assert_eq!(again.headers["content-type"], "application/json");
            assert!(
                !again.headers.contains_key("set-cookie"),
                "only allow-listed headers replay"
            );
        }
        // A bare key (Stripe's clients) is the same key as its quoted form.
        let bare = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "order-1")],
            b"{\"sku\":1}",
        )
        .await;
        assert!(bare.replayed());
        assert_eq!(app.runs.load(Ordering::SeqCst), 1);

        // A different request with the key: 422; nothing runs.
        let other = send(&client, addr, "/orders", &key, b"{\"sku\":2}").await;
        assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            other.problem_type(),
            "urn:idemstore:problem:idempotency-key-reused"
        );
        assert_eq!(other.headers["content-type"], "application/problem+json");
        let other_path = send(&client, addr, "/orders?coupon=1", &key, b"{\"sku\":1}").await;
        assert_eq!(other_path.status, StatusCode::UNPROCESSABLE_ENTITY);

        // Missing and malformed keys: 400, nothing runs.
        let missing = send(&client, addr, "/orders", &[], b"{}").await;
        assert_eq!(missing.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            missing.problem_type(),
            "urn:idemstore:problem:missing-idempotency-key"
        );
        let long = "k".repeat(256);
        for bad in ["\"unterminated", "", long.as_str()] {
            let r = send(&client, addr, "/orders", &[("idempotency-key", bad)], b"{}").await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad:?}");
            assert_eq!(
                r.problem_type(),
                "urn:idemstore:problem:invalid-idempotency-key"
            );
        }
        assert_eq!(app.runs.load(Ordering::SeqCst), 1);

        // Twenty concurrent duplicates of a slow request: one handler run; the others get
        // 409 with Retry-After while it runs, then the replay.
        let slow = [("idempotency-key", "order-2"), ("x-slow", "1")];
        let mut calls = Vec::new();
        for _ in 0..20 {
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                send(&client, addr, "/orders", &slow, b"{}").await
            }));
        }
        let mut conflicts = 0;
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.slow_gate.notify_one();
        let mut created = 0;
        for call in calls {
            let r = call.await.expect("join");
            match r.status {
                StatusCode::CREATED => created += 1,
                StatusCode::CONFLICT => {
                    conflicts += 1;
                    assert_eq!(r.headers["retry-after"], "1");
                    assert_eq!(
                        r.problem_type(),
                        "urn:idemstore:problem:request-in-progress"
                    );
                }
                other => panic!("unexpected {other}"),
            }
        }
        assert_eq!(created + conflicts, 20);
        assert!(created >= 1);
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            2,
            "one run for twenty duplicates"
        );
        let after = send(&client, addr, "/orders", &slow, b"{}").await;
        assert!(after.replayed());
        server.abort();
    });
}

#[test]
fn duplicates_can_wait_for_the_first_request_and_replay() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().open().expect("open"));
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store))
            .on_conflict(Conflict::Wait(Duration::from_secs(30)));
        let (addr, server) = serve(router!(layer, Arc::clone(&app))).await;
        let client = client();
        let slow = [("idempotency-key", "w"), ("x-slow", "1")];
        let mut calls = Vec::new();
        for _ in 0..8 {
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                send(&client, addr, "/orders", &slow, b"{}").await
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        app.slow_gate.notify_one();
        let mut replays = 0;
        let mut body = None;
        for call in calls {
            let r = call.await.expect("join");
            assert_eq!(r.status, StatusCode::CREATED);
            replays += usize::from(r.replayed());
            assert_eq!(body.get_or_insert_with(|| r.body.clone()), &r.body);
        }
        assert_eq!(replays, 7);
        assert_eq!(app.runs.load(Ordering::SeqCst), 1);
        server.abort();
    });
}

/// 5xx responses are stored (Stripe); 429/503 and `no-store` are not, and release the key.
#[test]
fn what_is_stored_and_what_releases_the_key() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().open().expect("open"));
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let (addr, server) = serve(router!(
            IdempotencyLayer::new(Arc::clone(&store)),
            Arc::clone(&app)
        ))
        .await;
        let client = client();
        let k = [("idempotency-key", "b1")];
        let first = send(&client, addr, "/broken", &k, b"").await;
        let second = send(&client, addr, "/broken", &k, b"").await;
        assert_eq!(
            (first.status, second.status),
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::INTERNAL_SERVER_ERROR
            )
        );
        assert!(second.replayed(), "a 500 is stored and replayed");
        assert_eq!(app.runs.load(Ordering::SeqCst), 1);

        let k = [("idempotency-key", "u1")];
        for n in 1..=2 {
            let r = send(&client, addr, "/busy", &k, b"").await;
            assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
            assert!(!r.replayed());
            assert_eq!(
                app.runs.load(Ordering::SeqCst),
                1 + n,
                "a 503 releases the key"
            );
        }
        server.abort();
    });
}

/// Large bodies: a request over the limit gets 413 without running the handler; a response
/// over the limit streams whole to its first caller and is not stored: replays get a 500
/// problem, and the handler does not run again.
#[test]
fn large_bodies_are_never_buffered_past_their_limits() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().open().expect("open"));
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store))
            .max_request_bytes(64 << 10)
            .max_response_bytes(256 << 10);
        let (addr, server) = serve(router!(layer, Arc::clone(&app))).await;
        let client = client();
        let huge = vec![b'a'; 100 << 10];
        let r = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "big-in")],
            &huge,
        )
        .await;
        assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(app.runs.load(Ordering::SeqCst), 0);
        let within = vec![b'a'; 60 << 10];
        let r = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "big-in")],
            &within,
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "the key was not claimed by the 413"
        );

        let k = [("idempotency-key", "big-out")];
        let first = send(&client, addr, "/big", &k, b"").await;
        assert_eq!(
            (first.status, first.body.len()),
            (StatusCode::OK, 3 << 20),
            "streamed whole"
        );
        let again = send(&client, addr, "/big", &k, b"").await;
        assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            again.problem_type(),
            "urn:idemstore:problem:response-not-stored"
        );
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            2,
            "the big handler ran once"
        );
        server.abort();
    });
}

/// The same key from two tenants: two runs, two responses, never each other's.
#[test]
fn tenants_never_share_a_key() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().open().expect("open"));
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store)).tenant(|head| {
            head.headers
                .get("x-account")
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        });
        let (addr, server) = serve(router!(layer, Arc::clone(&app))).await;
        let client = client();
        let a = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "1"), ("x-account", "acme")],
            b"{}",
        )
        .await;
        let b = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "1"), ("x-account", "globex")],
            b"{}",
        )
        .await;
        assert!(!a.replayed() && !b.replayed());
        assert_ne!(a.body, b.body);
        let a2 = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "1"), ("x-account", "acme")],
            b"{}",
        )
        .await;
        assert_eq!((a2.replayed(), &a2.body), (true, &a.body));
        assert_eq!(app.runs.load(Ordering::SeqCst), 2);
        server.abort();
    });
}

/// With `require_key(false)`, a request without a key passes through: the handler runs every
/// time and nothing is replayed; a malformed key is still refused, and a keyed request is still
/// idempotent.
#[test]
fn without_require_key_a_request_without_a_key_passes_through() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().open().expect("open"));
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store)).require_key(false);
        let (addr, server) = serve(router!(layer, Arc::clone(&app))).await;
        let client = client();
        for _ in 0..2 {
            let free = send(&client, addr, "/orders", &[], b"{}").await;
            assert_eq!(free.status, StatusCode::CREATED);
            assert!(!free.replayed());
        }
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            2,
            "no key: the handler runs each time"
        );
        let bad = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "\"open")],
            b"{}",
        )
        .await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        let first = send(&client, addr, "/orders", &[("idempotency-key", "k")], b"{}").await;
        let again = send(&client, addr, "/orders", &[("idempotency-key", "k")], b"{}").await;
        assert_eq!((again.replayed(), &again.body), (true, &first.body));
        assert_eq!(app.runs.load(Ordering::SeqCst), 3);
        server.abort();
    });
}

/// A client that disconnects while its request runs: the handler finishes and its response
/// is recorded; the retry replays it.
#[test]
fn a_disconnected_client_still_gets_its_response_recorded() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().open().expect("open"));
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let (addr, server) = serve(router!(
            IdempotencyLayer::new(Arc::clone(&store)),
            Arc::clone(&app)
        ))
        .await;
        let client = client();
        let slow = [("idempotency-key", "gone"), ("x-slow", "1")];
        let hung_up = tokio::time::timeout(
            Duration::from_millis(200),
            send(&client, addr, "/orders", &slow, b"{}"),
        )
        .await;
        assert!(
            hung_up.is_err(),
            "the client gave up and dropped its connection"
        );
        app.slow_gate.notify_one();
        let retry = loop {
            let r = send(
                &client,
                addr,
                "/orders",
                &[("idempotency-key", "gone")],
                b"{}",
            )
            .await;
            if r.status != StatusCode::CONFLICT {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Same request except the x-slow header, which the fingerprint does not cover.
        assert_eq!(retry.status, StatusCode::CREATED);
        assert!(
            retry.replayed(),
            "the handler finished after the disconnect and was recorded"
        );
        assert_eq!(app.runs.load(Ordering::SeqCst), 1);
        server.abort();
    });
}

/// A restart between a request and its retry: the replay survives (the store is durable).
#[test]
fn a_restart_between_request_and_retry_keeps_the_response() {
    let scratch = Scratch::new();
    let app = Arc::new(App::default());
    let first = runtime().block_on(async {
        let store = Arc::new(scratch.builder().open().expect("open"));
        let (addr, server) = serve(router!(
            IdempotencyLayer::new(Arc::clone(&store)),
            Arc::clone(&app)
        ))
        .await;
        let r = send(
            &client(),
            addr,
            "/orders",
            &[("idempotency-key", "r1")],
            b"{}",
        )
        .await;
        server.abort();
        let _ = server.await;
        r
    });
    // Every server handle is gone with its runtime: the store closes and reopens.
    let again = runtime().block_on(async {
        let store = Arc::new(scratch.builder().open().expect("reopen"));
        let (addr, server) = serve(router!(IdempotencyLayer::new(store), Arc::clone(&app))).await;
        let r = send(
            &client(),
            addr,
            "/orders",
            &[("idempotency-key", "r1")],
            b"{}",
        )
        .await;
        server.abort();
        r
    });
    assert_eq!(
        (again.status, &again.body, again.replayed()),
        (first.status, &first.body, true)
    );
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);
}

/// The layer on PostgreSQL: two servers (replicas) on one database; a duplicate sent to the
/// other replica replays, and concurrent duplicates across replicas run the handler once.
#[test]
fn two_replicas_on_postgres_share_keys() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = || -> Arc<PgStore> {
        Arc::new(
            StoreBuilder::default()
                .sweep_interval(None)
                .open_postgres(schema.options())
                .expect("open"),
        )
    };
    let (a, b) = (open(), open());
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let (addr_a, server_a) = serve(router!(IdempotencyLayer::new(a), Arc::clone(&app))).await;
        let (addr_b, server_b) = serve(router!(
            IdempotencyLayer::new(b).on_conflict(Conflict::Wait(Duration::from_secs(30))),
            Arc::clone(&app)
        ))
        .await;
        let client = client();
        let first = send(
            &client,
            addr_a,
            "/orders",
            &[("idempotency-key", "p1")],
            b"{}",
        )
        .await;
        let other = send(
            &client,
            addr_b,
            "/orders",
            &[("idempotency-key", "p1")],
            b"{}",
        )
        .await;
        assert_eq!((other.replayed(), &other.body), (true, &first.body));
        let mut calls = Vec::new();
        for i in 0..16 {
            let client = client.clone();
            let addr = if i % 2 == 0 { addr_a } else { addr_b };
            calls.push(tokio::spawn(async move {
                send(
                    &client,
                    addr,
                    "/orders",
                    &[("idempotency-key", "p2")],
                    b"{}",
                )
                .await
            }));
        }
        let mut bodies = std::collections::BTreeSet::new();
        for call in calls {
            let r = call.await.expect("join");
            if r.status == StatusCode::CREATED {
                bodies.insert(r.body.clone());
            } else {
                assert_eq!(r.status, StatusCode::CONFLICT);
            }
        }
        assert_eq!(
            bodies.len(),
            1,
            "one response for every caller that got one"
        );
        assert_eq!(app.runs.load(Ordering::SeqCst), 2);
        server_a.abort();
        server_b.abort();
    });
}
