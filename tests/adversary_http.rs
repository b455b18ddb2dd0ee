//! Adversarial tests of the async API and of the HTTP `Idempotency-Key` layer: one test per
//! broken promise, each named after the promise, with a comment saying how it breaks. Every
//! test here FAILS on the code it was written against (a passing test is a fixed defect).
//!
//! HTTP tests run a real axum server on 127.0.0.1 and a real hyper client, as tests/http.rs
//! does; the PostgreSQL test uses the server named by `IDEMSTORE_TEST_POSTGRES` (skipped,
//! passing, when it is unset).

mod common;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::http::{client, counted_create, runtime, send, send_method, serve, App};
use common::pg::{pg_url, PgSchema};
use common::{store_error, Scratch};
use http_body::Frame;
use idemstore::http::IdempotencyLayer;
use idemstore::{AsyncContext, Error, OrphanPolicy, StepError, StoreBuilder};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Harness: a real server, a real client.
// ---------------------------------------------------------------------------------------

/// A response body made of the given frames (data and trailers), then an optional error.
struct Frames {
    frames: VecDeque<Frame<Bytes>>,
    error_at_end: bool,
}

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.frames.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None if self.error_at_end => {
                self.error_at_end = false;
                Poll::Ready(Some(Err(std::io::Error::other(
                    "the upstream the body streams from went away",
                ))))
            }
            None => Poll::Ready(None),
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP layer
// ---------------------------------------------------------------------------------------

/// Promise (key.rs, mod.rs table): a key of 1 to 255 printable characters is a valid key; a
/// request carrying one runs the handler (a bad key is a 400, and nothing else refuses a key).
///
/// Breaks: the layer stores the key as `"http" + u32 tenant length + tenant + key`, i.e. 8
/// bytes plus the tenant more than the key, and the store's default `max_key_bytes` is 256. A
/// valid key of 249..=255 characters (fewer with a tenant: 245 with a 4-byte tenant id) makes
/// the store refuse with `KeyTooLong`, which the layer answers as a 500 "Idempotency record
/// unusable" — a server error for a request the draft and the layer's own parser accept.
#[test]
fn a_key_of_255_characters_is_a_valid_key() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open()); // the store's defaults
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
        let mut refused = Vec::new();
        for (len, account) in [(255usize, None), (249, None), (245, Some("acme"))] {
            let key = "k".repeat(len);
            let mut headers = vec![("idempotency-key", key.as_str())];
            if let Some(account) = account {
                headers.push(("x-account", account));
            }
            let r = send(&client, addr, "/orders", &headers, b"{}").await;
            if r.status != StatusCode::CREATED {
                refused.push(format!(
                    "key of {len} chars, tenant {account:?}: {} {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ));
            }
        }
        server.abort();
        assert!(
            refused.is_empty(),
            "valid keys (1-255 printable characters) were refused:\n{}",
            refused.join("\n")
        );
    });
}

/// Promise (mod.rs): bodies are buffered up to their limits; a response body within
/// `max_response_bytes` is stored and returned to its first caller, and replays get it back.
///
/// Breaks with the defaults (`max_response_bytes` 1 MiB, the store's `max_result_bytes`
/// 1 MiB): the stored response is the body plus status and headers, so a body of exactly the
/// limit (or a few bytes less) encodes over the store's limit. The store records the run as
/// "too large" and returns `ResultTooLarge`, which the layer turns into a 500 problem: the
/// first caller never sees the handler's answer (a 201 with the id of what it created), and
/// every replay is a 500 too — the handler ran once and its response is lost to everyone.
#[test]
fn a_response_body_at_the_limit_reaches_its_first_caller_and_replays() {
    // Fixed: the default stored-body limit leaves room for the status and headers within the
    // store's 1 MiB, so a body at the limit is stored and replayed; and a body the store
    // cannot hold (a layer limit above the store's) still reaches its first caller, while its
    // replays get a 500 problem and the handler does not run again.
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(App::default());
        async fn export(
            State(app): State<Arc<App>>,
            body: Bytes,
        ) -> (StatusCode, HeaderMap, Vec<u8>) {
            app.runs.fetch_add(1, Ordering::SeqCst);
            let mut h = HeaderMap::new();
            h.insert("content-type", HeaderValue::from_static("text/csv"));
            h.insert("location", HeaderValue::from_static("/exports/1"));
            let size = std::str::from_utf8(&body)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            (StatusCode::CREATED, h, vec![b'x'; size])
        }
        let at_limit = ((1 << 20) - (64 << 10)).to_string();
        let router = Router::new()
            .route("/exports", post(export))
            .layer(IdempotencyLayer::new(Arc::clone(&store)))
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();
        let k = [("idempotency-key", "export-1")];
        let first = send(&client, addr, "/exports", &k, at_limit.as_bytes()).await;
        let again = send(&client, addr, "/exports", &k, at_limit.as_bytes()).await;
        server.abort();
        assert_eq!(app.runs.load(Ordering::SeqCst), 1);
        assert_eq!(
            (first.status, first.body.len()),
            (StatusCode::CREATED, (1 << 20) - (64 << 10))
        );
        assert_eq!(
            (again.status, again.replayed(), again.body.len()),
            (StatusCode::CREATED, true, (1 << 20) - (64 << 10)),
            "a body within the limit is stored and replayed"
        );

        let router = Router::new()
            .route("/exports", post(export))
            .layer(IdempotencyLayer::new(Arc::clone(&store)).max_response_bytes(4 << 20))
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let k = [("idempotency-key", "export-2")];
        let size = (1 << 20).to_string();
        let first = send(&client, addr, "/exports", &k, size.as_bytes()).await;
        let again = send(&client, addr, "/exports", &k, size.as_bytes()).await;
        server.abort();
        assert_eq!(
            (first.status, first.body.len()),
            (StatusCode::CREATED, 1 << 20),
            "the first caller gets it"
        );
        assert_eq!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            again.problem_type(),
            "urn:idemstore:problem:response-not-stored"
        );
        assert_eq!(app.runs.load(Ordering::SeqCst), 2, "not run again");
    });
}

/// Promise (mod.rs): a request reusing a key with a different request (method, path, query,
/// body and the configured headers) gets 422.
///
/// Breaks: `request_fingerprint` hashes each configured header as `field(name)` followed by
/// `field(value)` for each of its values, with no count of values, so a value can stand for the
/// next header's name. With `fingerprint_headers([x-a, x-b])`, the request `x-a: x-b` and the
/// request `x-b: x-b` both hash `x-a`, `x-b`, `x-b`: two different requests share a
/// fingerprint and the second one is answered with the first one's stored response instead of
/// 422 (and the same holds for any values that mimic a following name).
#[test]
fn a_different_request_with_the_same_key_is_refused_whatever_its_headers() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store)).fingerprint_headers([
            HeaderName::from_static("x-a"),
            HeaderName::from_static("x-b"),
        ]);
        let router = Router::new()
            .route("/orders", post(counted_create))
            .layer(layer)
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();
        let first = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "fp-1"), ("x-a", "x-b")],
            b"{}",
        )
        .await;
        assert_eq!(first.status, StatusCode::CREATED);
        let other = send(
            &client,
            addr,
            "/orders",
            &[("idempotency-key", "fp-1"), ("x-b", "x-b")],
            b"{}",
        )
        .await;
        server.abort();
        assert_eq!(
            other.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "`x-a: x-b` and `x-b: x-b` are different requests; the second got {} (replayed: {})",
            other.status,
            other.replayed()
        );
    });
}

/// Promise (mod.rs): responses marked `Cache-Control: no-store` (and 429, 503) are not stored
/// and *release the key*, so the next request with it runs the handler again.
///
/// Breaks: "released" is a FailedRetryable record that keeps the first request's
/// fingerprint for the record's whole TTL (24 h by default). The typical use of `no-store`
/// is a validation error the client is to correct and resend with the same key (Stripe saves
/// no result when parameters fail validation); the corrected request differs from the first,
/// so it gets 422 "Idempotency-Key reused" and the handler never runs: the key is not
/// released, it is pinned to a request the server refused to remember.
#[test]
fn a_released_key_runs_the_next_request_with_it() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(App::default());
        async fn validate(
            State(app): State<Arc<App>>,
            body: Bytes,
        ) -> (StatusCode, HeaderMap, &'static str) {
            app.runs.fetch_add(1, Ordering::SeqCst);
            let mut h = HeaderMap::new();
            if body.as_ref() == b"{\"amount\":-1}" {
                h.insert("cache-control", HeaderValue::from_static("no-store"));
                return (StatusCode::BAD_REQUEST, h, "amount must be positive");
            }
            (StatusCode::CREATED, h, "charged")
        }
        let router = Router::new()
            .route("/charges", post(validate))
            .layer(IdempotencyLayer::new(Arc::clone(&store)))
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();
        let k = [("idempotency-key", "charge-1")];
        let bad = send(&client, addr, "/charges", &k, b"{\"amount\":-1}").await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        let fixed = send(&client, addr, "/charges", &k, b"{\"amount\":5}").await;
        server.abort();
        assert_eq!(
            (fixed.status, app.runs.load(Ordering::SeqCst)),
            (StatusCode::CREATED, 2),
            "after a no-store answer the key is released: the corrected request must run; got \
             {} {}",
            fixed.status,
            fixed.problem_type()
        );
    });
}

/// Promise (mod.rs): the first run's own response goes to its caller as the handler made it
/// ("with every header"); only replays are rebuilt from the record. The layer is advertised
/// for "axum, tonic-web, any tower stack", where trailers carry the status (`grpc-status`).
///
/// Breaks: `collect_limited` drops trailer frames ("Trailers are not stored") and the first
/// caller's response is rebuilt as `Full(bytes)`: the first caller loses the handler's
/// trailers, while its head still announces them (`Trailer: x-checksum`). The same route
/// without the layer (GET, passed through) delivers them, so the transport carries trailers.
#[test]
fn the_first_caller_gets_the_handlers_trailers() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        fn with_trailers() -> axum::response::Response {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
            let body = Frames {
                frames: VecDeque::from([
                    Frame::data(Bytes::from_static(b"payload")),
                    Frame::trailers(trailers),
                ]),
                error_at_end: false,
            };
            let mut response = axum::response::Response::new(axum::body::Body::new(body));
            response
                .headers_mut()
                .insert("trailer", HeaderValue::from_static("x-checksum"));
            response
        }
        let router = Router::new()
            .route(
                "/stream",
                post(|| async { with_trailers() }).get(|| async { with_trailers() }),
            )
            .layer(IdempotencyLayer::new(Arc::clone(&store)));
        let (addr, server) = serve(router).await;
        let client = client();
        let te = ("te", "trailers");
        let passed = send_method(
            &client,
            axum::http::Method::GET,
            addr,
            "/stream",
            &[te],
            b"",
        )
        .await;
        assert_eq!(
            passed.trailers.as_ref().and_then(|t| t.get("x-checksum")),
            Some(&HeaderValue::from_static("abc123")),
            "control: without the layer the trailers reach the client"
        );
        let first = send(
            &client,
            addr,
            "/stream",
            &[te, ("idempotency-key", "t-1")],
            b"",
        )
        .await;
        server.abort();
        assert_eq!(first.body.as_ref(), b"payload");
        assert_eq!(
            first.trailers.as_ref().and_then(|t| t.get("x-checksum")),
            Some(&HeaderValue::from_static("abc123")),
            "the first caller lost the handler's trailers (head still says Trailer: {:?})",
            first.headers.get("trailer")
        );
    });
}

/// Promise (brief, mod.rs): everything a handler answers once it began is stored — 5xx
/// included, as Stripe does — except 429, 503 and `no-store`; the handler runs at most once
/// per recorded response.
///
/// Breaks: a handler that ran (its side effect done) and whose response body then fails
/// mid-stream (an upstream proxy body, a stream from a file or database) is answered with a
/// 502 problem and the key is *released* (`NotStored::Released`): the client's retry with the
/// same key runs the handler a second time, duplicating the side effect. The failure is the
/// handler's answer, not a sign that it did not run.
#[test]
fn a_handler_whose_body_fails_is_not_run_again() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(App::default());
        async fn transfer(State(app): State<Arc<App>>) -> axum::response::Response {
            app.runs.fetch_add(1, Ordering::SeqCst); // the money moved
            let body = Frames {
                frames: VecDeque::from([Frame::data(Bytes::from_static(b"{\"transfer\":"))]),
                error_at_end: true,
            };
            axum::response::Response::new(axum::body::Body::new(body))
        }
        let router = Router::new()
            .route("/transfers", post(transfer))
            .layer(IdempotencyLayer::new(Arc::clone(&store)))
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();
        let k = [("idempotency-key", "transfer-1")];
        let first = send(&client, addr, "/transfers", &k, b"{}").await;
        let retry = send(&client, addr, "/transfers", &k, b"{}").await;
        server.abort();
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            1,
            "the handler ran again on the retry (first answer {} {}, retry {} replayed={})",
            first.status,
            first.problem_type(),
            retry.status,
            retry.replayed()
        );
    });
}

/// Promise (brief): replays return the stored status, the allow-listed headers and the body —
/// the response the first caller got.
///
/// Breaks with the default allow-list (Content-Type, Location, ETag, Last-Modified,
/// Content-Language, Cache-Control): a body the handler (or a compression layer inside the
/// idempotency layer) encoded is stored encoded, but `Content-Encoding` is not replayed, so a
/// replay hands the client gzip bytes labelled as plain JSON — an undecodable response.
/// Representation metadata that the stored bytes depend on must travel with them.
#[test]
fn a_replay_is_decodable_as_the_first_response_was() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        // gzip of `{"order":1}` (any gzip bytes do: the point is the label).
        const GZ: &[u8] = &[
            0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xab, 0x56, 0xca, 0x2f,
            0x4a, 0x49, 0x2d, 0x52, 0xb2, 0x32, 0xac, 0x05, 0x00, 0x7e, 0x60, 0x5f, 0x1e, 0x0b,
            0x00, 0x00, 0x00,
        ];
        async fn gz() -> (StatusCode, HeaderMap, &'static [u8]) {
            let mut h = HeaderMap::new();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.insert("content-encoding", HeaderValue::from_static("gzip"));
            h.insert("vary", HeaderValue::from_static("accept-encoding"));
            (StatusCode::CREATED, h, GZ)
        }
        let router = Router::new()
            .route("/orders", post(gz))
            .layer(IdempotencyLayer::new(Arc::clone(&store)));
        let (addr, server) = serve(router).await;
        let client = client();
        let k = [("idempotency-key", "gz-1"), ("accept-encoding", "gzip")];
        let first = send(&client, addr, "/orders", &k, b"{}").await;
        let again = send(&client, addr, "/orders", &k, b"{}").await;
        server.abort();
        assert!(again.replayed());
        assert_eq!(again.body, first.body, "the same (gzip) bytes");
        assert_eq!(
            again.headers.get("content-encoding"),
            first.headers.get("content-encoding"),
            "the replay's bytes are gzip, but the replay does not say so"
        );
    });
}

// ---------------------------------------------------------------------------------------
// Async API
// ---------------------------------------------------------------------------------------

/// Promise (async_context.rs): "a clone [of the AsyncContext] kept past the run can only be
/// refused: its claim's record is no longer Pending, so fencing refuses its writes"; steps run
/// at most once, within their run.
///
/// Breaks: `AsyncContext::step` runs the step's future first and only then writes the step,
/// which fencing refuses. Nothing marks the run as over (`take_failure` even clears any
/// failure), so `begin` lets the step through: a clone kept past the run (moved into a
/// spawned task, stored in a struct) runs its step's side effect after the run's outcome is
/// recorded, and only then gets an error. The sync `Context` cannot outlive its run; the
/// async one can, and nothing stops it.
#[test]
fn an_async_context_kept_past_its_run_never_runs_a_step() {
    let scratch = Scratch::new();
    let store = scratch.open();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let kept: Arc<parking_lot::Mutex<Option<AsyncContext>>> = Arc::default();
        let out = store
            .execute_steps_async("k", |ctx| {
                *kept.lock() = Some(ctx.clone());
                async move {
                    ctx.step("charge", || async { Ok::<_, String>(1u32) })
                        .await?;
                    Ok::<u32, StepError<String>>(1)
                }
            })
            .await
            .expect("run");
        assert_eq!(*out, 1);
        let ctx = kept.lock().take().expect("kept");
        let effects = AtomicU32::new(0);
        let late = ctx
            .step("refund", || async {
                effects.fetch_add(1, Ordering::SeqCst); // a side effect
                Ok::<_, String>(())
            })
            .await;
        assert!(late.is_err(), "a step of a finished run is refused");
        assert_eq!(
            effects.load(Ordering::SeqCst),
            0,
            "the late step's side effect ran after its run had finished (then it was \
             refused: {late:?})"
        );
    });
}

/// Promise (execute_async.rs, asynchronous.rs): a call dropped after its claim and before
/// its outcome is written is an interruption: `Report` says `Interrupted` (the operation's
/// effect is unknown; it is not run again without reconciliation).
///
/// Breaks: `RunGuard::drop` tells "user code the store called after the run panicked" from a
/// cancellation by `std::thread::panicking()`. But tokio drops a task's future *while the
/// panic unwinds* (its harness drops the future inside the unwind guard): when another
/// future of the same task panics (`join!`, `select!`, a panicking handler beside the call),
/// the call is cancelled mid-run during an unwind, and the guard records a *retryable
/// failure* instead of leaving an orphan. Under `Report` the next call then silently runs
/// the operation again (attempt 2): exactly what `Report` promises never to do. The same call
/// cancelled by a timeout is reported `Interrupted`, as the control shows.
#[test]
fn a_call_cancelled_by_a_panicking_sibling_is_reported_interrupted() {
    let scratch = Scratch::new();
    let store = Arc::new(
        scratch
            .builder()
            .orphan_policy(OrphanPolicy::Report)
            .open()
            .expect("open"),
    );
    runtime().block_on(async {
        let runs = Arc::new(AtomicU32::new(0));
        let op = |runs: Arc<AtomicU32>, started: Option<tokio::sync::oneshot::Sender<()>>| async move {
            runs.fetch_add(1, Ordering::SeqCst); // the payment request went out
            if let Some(started) = started {
                let _ = started.send(());
            }
            std::future::pending::<()>().await;
            Ok::<u32, String>(1)
        };

        // Control: cancelled by a timeout → Interrupted.
        let timed_out = tokio::time::timeout(
            Duration::from_millis(100),
            store.execute_once_async("control", || op(Arc::clone(&runs), None)),
        )
        .await;
        assert!(timed_out.is_err());
        let control = store
            .call("control")
            .wait_timeout(Duration::ZERO)
            .run_async(|| op(Arc::clone(&runs), None))
            .await;
        assert!(matches!(
            store_error(control),
            Error::Interrupted { attempts: 1, .. }
        ));

        // Cancelled because a sibling future of its task panicked.
        let (started, has_started) = tokio::sync::oneshot::channel();
        let task = {
            let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
            tokio::spawn(async move {
                let call = store.execute_once_async("k", || op(runs, Some(started)));
                let sibling = async {
                    has_started.await.expect("started");
                    panic!("planted: a sibling future of the call's task panicked");
                };
                let _ = tokio::join!(call, sibling);
            })
        };
        assert!(task.await.expect_err("the task panicked").is_panic());
        let runs_before = runs.load(Ordering::SeqCst);
        let next = store
            .call("k")
            .wait_timeout(Duration::ZERO)
            .run_async(|| async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, String>(2)
            })
            .await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            runs_before,
            "under Report an interrupted operation was run again: {next:?}"
        );
        assert!(matches!(
            store_error(next),
            Error::Interrupted { attempts: 1, .. }
        ));
    });
}

/// A future that gives up (completes with `None`, dropping the inner future) after the inner
/// one returned `Pending` `budget` times: a cancellation at an exact await point.
struct GiveUpAfter<F> {
    inner: Option<Pin<Box<F>>>,
    budget: u32,
}

impl<F: Future> Future for GiveUpAfter<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match inner.as_mut().poll(cx) {
            Poll::Ready(out) => Poll::Ready(Some(out)),
            Poll::Pending if self.budget == 0 => {
                self.inner = None; // dropped here, mid-await
                Poll::Ready(None)
            }
            Poll::Pending => {
                self.budget -= 1;
                Poll::Pending
            }
        }
    }
}

/// Promise (execute_async.rs, asynchronous.rs): a call dropped before its claim leaves
/// nothing; one dropped after it is an orphan *at once* ("no waiting out a TTL or, on
/// PostgreSQL, a lease"); never a key stuck.
///
/// Breaks on PostgreSQL: the claim is one statement whose future is awaited
/// (`claim_async`). A call dropped while that statement is in flight has sent it — tokio-
/// postgres's connection task writes every queued request, and the server commits it — but
/// the driver's `RunGuard` exists only once the claim's answer came back, so nothing ends the
/// lease: the key holds a Pending claim with a live lease that nobody runs, and every replica
/// waits for it (409 / `InProgress`) until the lease runs out (here 60 s; then `Report` even
/// calls it `Interrupted` though the operation never started). The same happens when the
/// claim's answer is late past the I/O timeout. The test cancels a call after each of its
/// first awaits in turn; for every cancellation before the operation started, another
/// replica must get the key at once.
#[test]
fn a_call_dropped_during_its_claim_on_postgres_never_holds_the_key() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = || {
        StoreBuilder::default()
            .sweep_interval(None)
            .open_postgres(schema.options().lease(Duration::from_secs(60)))
            .expect("open")
    };
    let (a, b) = (open(), open());
    runtime().block_on(async {
        let mut stuck = Vec::new();
        for budget in 0..40u32 {
            let key = format!("c{budget}");
            let ran = Arc::new(AtomicBool::new(false));
            let call = {
                let ran = Arc::clone(&ran);
                a.execute_once_async(key.as_bytes(), move || async move {
                    ran.store(true, Ordering::SeqCst);
                    Ok::<u32, String>(1)
                })
            };
            let finished = GiveUpAfter {
                inner: Some(Box::pin(call)),
                budget,
            }
            .await;
            if finished.is_some() {
                break; // the call completes within this many awaits: every point was tried
            }
            if ran.load(Ordering::SeqCst) {
                continue; // dropped after the operation started: the guard's business
            }
            // Dropped before the operation started: the key must be free for a replica.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let other = b
                .call(key.as_bytes())
                .wait_timeout(Duration::from_secs(2))
                .run_async(|| async { Ok::<u32, String>(2) })
                .await;
            match other {
                Ok(v) if *v == 2 => {}
                other => stuck.push(format!(
                    "cancelled after {budget} awaits: another replica got {other:?}; record {:?}",
                    b.record(key.as_bytes()).ok().flatten().map(|r| r.state)
                )),
            }
        }
        assert!(
            stuck.is_empty(),
            "a call dropped before its operation started left the key held:\n{}",
            stuck.join("\n")
        );
    });
}
