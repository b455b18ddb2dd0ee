//! Adversarial tests of two changes to the HTTP `Idempotency-Key` layer (src/api/http/mod.rs):
//!
//! - a7b9b3a: a request that is not idempotent (a method the layer is not configured for, or no
//!   key where none is required) is called on the inner service from `call()` itself, with no
//!   clone of it, instead of going through `handle` after tower's clone-swap;
//! - a2542e6: `handle` takes the request's head and body apart, and the first look (tenant,
//!   store key, fingerprint, the local replay, with `catch_unwind` around the tenant function
//!   and the store's quick look) moved into the plain function `first_look`.
//!
//! Each test checks one documented promise the changes could have broken (README "HTTP: the
//! `Idempotency-Key` layer", docs/design.md §15, the table on `IdempotencyLayer`): tower's
//! poll_ready/call contract on both paths, which requests pass through untouched, what the
//! layer answers itself, panics in user code becoming 500 problems, replays racing a first run,
//! and the bytes records are filed under. Some drive the service in process (to control tower
//! semantics exactly); the others run a real axum server on 127.0.0.1 with hyper's client, as
//! tests/http.rs does. Every wait is bounded by a timeout.

mod common;

/// A filing case: the key header, the key, the tenant, whether the tenant comes as an
/// extension, and the body's length.
type FiledCase<'a> = (&'a str, &'a [u8], Option<&'a str>, bool, usize);
/// A pass-through case: method, headers, body, and the keys the handler should see.
type PassCase<'a> = (Method, Vec<(&'a str, &'a str)>, &'a [u8], &'a str);

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::routing::any;
use axum::Router;
use bytes::Bytes;
use common::http::{client, runtime, send, send_method, serve, try_send, try_send_method};
use common::http::{digest_field, documented_store_key};
use common::Scratch;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use idemstore::http::{Conflict, IdempotencyLayer, IdempotentBody};
use idemstore::{Clock, Fingerprint, Store};
use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tower_layer::Layer;
use tower_service::Service;

/// How long any single wait in these tests may take before the test fails instead of hanging.
const BOUND: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// In-process harness: a request body, a probing inner service, a ready-then-call helper.
// ---------------------------------------------------------------------------------------

/// A body made of the given frames (data and trailers), then whatever a channel sends.
struct TestBody {
    frames: VecDeque<Frame<Bytes>>,
    rx: Option<tokio::sync::mpsc::UnboundedReceiver<Frame<Bytes>>>,
}

impl TestBody {
    fn bytes(b: impl Into<Bytes>) -> Self {
        let b = b.into();
        let mut frames = VecDeque::new();
        if !b.is_empty() {
            frames.push_back(Frame::data(b));
        }
        Self { frames, rx: None }
    }

    fn with_trailers(b: impl Into<Bytes>, trailers: HeaderMap) -> Self {
        let mut body = Self::bytes(b);
        body.frames.push_back(Frame::trailers(trailers));
        body
    }

    fn channel() -> (tokio::sync::mpsc::UnboundedSender<Frame<Bytes>>, Self) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            tx,
            Self {
                frames: VecDeque::new(),
                rx: Some(rx),
            },
        )
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if let Some(frame) = this.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match &mut this.rx {
            None => Poll::Ready(None),
            Some(rx) => rx.poll_recv(cx).map(|f| f.map(Ok)),
        }
    }
}

/// What the probe saw of one request it was called with.
#[derive(Debug, Clone)]
struct SeenRequest {
    method: Method,
    uri: String,
    keys: Vec<Vec<u8>>,
    body: Bytes,
    /// The `Marker` extension the request carried, if any.
    marker: Option<u32>,
    ticket: u64,
}

/// An extension an outer layer put on the request (as auth middleware puts its claims).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Marker(u32);

/// The tenant an outer layer verified, as an extension.
#[derive(Debug, Clone)]
struct VerifiedTenant(String);

/// What every clone of a probe shares.
#[derive(Default)]
struct ProbeLog {
    clones: AtomicU64,
    tickets: AtomicU64,
    /// Calls made on an instance that had not been polled ready since its last call.
    unready_calls: AtomicU32,
    seen: Mutex<Vec<SeenRequest>>,
}

impl ProbeLog {
    fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().expect("log").clone()
    }
}

/// An inner service that insists on tower's contract: `poll_ready` hands the instance polled a
/// ticket (a clone never has one), and `call` spends it. A call on an instance without a
/// ticket (not the instance that was polled, or polled once and called twice) is answered 500
/// and counted. Request headers steer it: `x-delay-ms` (sleep before answering), `x-status`
/// (the status), `x-want-trailers` (answer with trailers).
struct Probe {
    log: Arc<ProbeLog>,
    ticket: Option<u64>,
}

impl Probe {
    fn new(log: &Arc<ProbeLog>) -> Self {
        Self {
            log: Arc::clone(log),
            ticket: None,
        }
    }
}

impl Clone for Probe {
    fn clone(&self) -> Self {
        self.log.clones.fetch_add(1, Ordering::SeqCst);
        Self {
            log: Arc::clone(&self.log),
            ticket: None,
        }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<http::Request<IdempotentBody>> for Probe {
    type Response = http::Response<TestBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<TestBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.ticket.is_none() {
            self.ticket = Some(self.log.tickets.fetch_add(1, Ordering::SeqCst) + 1);
        }
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<IdempotentBody>) -> Self::Future {
        let ticket = self.ticket.take();
        let log = Arc::clone(&self.log);
        Box::pin(async move {
            let Some(ticket) = ticket else {
                log.unready_calls.fetch_add(1, Ordering::SeqCst);
                let mut r = http::Response::new(TestBody::bytes("called without poll_ready"));
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return Ok(r);
            };
            let (head, body) = request.into_parts();
            if let Some(ms) = head.headers.get("x-delay-ms") {
                let ms: u64 = ms.to_str().expect("ascii").parse().expect("ms");
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let collected = body.collect().await.expect("the request body reads");
            let body = collected.to_bytes();
            let n = {
                let mut seen = log.seen.lock().expect("log");
                seen.push(SeenRequest {
                    method: head.method.clone(),
                    uri: head.uri.to_string(),
                    keys: head
                        .headers
                        .get_all("idempotency-key")
                        .iter()
                        .map(|v| v.as_bytes().to_vec())
                        .collect(),
                    body: body.clone(),
                    marker: head.extensions.get::<Marker>().map(|m| m.0),
                    ticket,
                });
                seen.len()
            };
            let text = format!(
                "run {n} of {} {} ({} bytes)",
                head.method,
                head.uri,
                body.len()
            );
            let mut out = if head.headers.contains_key("x-want-trailers") {
                let mut t = HeaderMap::new();
                t.insert("x-done", HeaderValue::from(n));
                http::Response::new(TestBody::with_trailers(text, t))
            } else {
                http::Response::new(TestBody::bytes(text))
            };
            *out.status_mut() = match head.headers.get("x-status") {
                Some(s) => s.to_str().expect("ascii").parse().expect("status"),
                None => StatusCode::CREATED,
            };
            let h = out.headers_mut();
            h.insert("content-type", HeaderValue::from_static("text/plain"));
            h.insert("set-cookie", HeaderValue::from_static("session=abc"));
            h.insert("x-run", HeaderValue::from(n));
            h.insert("x-ticket", HeaderValue::from(ticket));
            Ok(out)
        })
    }
}

/// tower's contract, as a server keeps it: poll the service ready, then call it.
async fn ready_call<S, B>(svc: &mut S, request: http::Request<B>) -> Result<S::Response, S::Error>
where
    S: Service<http::Request<B>>,
{
    std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
    tokio::time::timeout(BOUND, svc.call(request))
        .await
        .expect("the layer answers within the bound")
}

/// A request for the in-process tests.
fn request(method: &str, uri: &str, keys: &[&str], body: TestBody) -> http::Request<TestBody> {
    let mut r = http::Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(uri);
    for k in keys {
        r = r.header("idempotency-key", *k);
    }
    r.body(body).expect("request")
}

/// A response read whole, with its trailers.
struct Read {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl Read {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    fn problem_type(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["type"].as_str().map(String::from))
            .unwrap_or_default()
    }
}

async fn read(response: http::Response<IdempotentBody>) -> Read {
    let (head, body) = response.into_parts();
    let collected = tokio::time::timeout(BOUND, body.collect())
        .await
        .expect("the body within the bound")
        .expect("the body reads");
    Read {
        status: head.status,
        headers: head.headers,
        trailers: collected.trailers().cloned(),
        body: collected.to_bytes(),
    }
}

// ---------------------------------------------------------------------------------------
// Tower semantics
// ---------------------------------------------------------------------------------------

/// What one request of the sequence below must get.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Passed through: the inner service is called with the request as sent.
    Pass,
    /// Idempotent, a new key: the inner service runs; the first caller gets every header.
    Run,
    /// The replay of request `i` of the sequence; the inner service is not called.
    Replay(usize),
    /// A problem of the layer's own; the inner service is not called.
    Problem(u16, &'static str),
}

/// Contract: tower's — `poll_ready` then `call` on the same instance — holds on both paths: a
/// request passed through from `call()` and an idempotent one (handled after the clone-swap)
/// are each made on the instance that was polled ready, never on a fresh clone, when one
/// service instance is driven request after request as a server (or a Buffer worker) does.
/// And which requests pass through is exactly the documented rule: methods the layer is not
/// configured for (whatever their key, even a malformed or repeated one), and configured
/// methods without a key when `require_key(false)`; a configured method with a key stays
/// idempotent (runs once, replays, 422 on another body, 400 on a bad key).
#[test]
fn each_request_is_called_on_the_instance_polled_ready_and_routed_by_the_documented_rule() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let log = Arc::new(ProbeLog::default());
    let mut svc = IdempotencyLayer::new(store)
        .require_key(false)
        .layer(Probe::new(&log));
    let cases: Vec<(&str, &[&str], &str, Expect)> = vec![
        ("GET", &[], "", Expect::Pass),
        ("GET", &["k1"], "", Expect::Pass),
        ("GET", &["\"open"], "", Expect::Pass),
        ("GET", &["k1", "k2"], "", Expect::Pass),
        ("PUT", &["k1"], "put body", Expect::Pass),
        ("DELETE", &["k1"], "", Expect::Pass),
        ("HEAD", &["k1"], "", Expect::Pass),
        ("OPTIONS", &["k1"], "", Expect::Pass),
        ("PURGE", &["\"open"], "x", Expect::Pass),
        ("POST", &[], "free", Expect::Pass),
        ("PATCH", &[], "free", Expect::Pass),
        ("POST", &["k1"], "one", Expect::Run),
        ("POST", &["k1"], "one", Expect::Replay(11)),
        ("POST", &["\"k1\""], "one", Expect::Replay(11)),
        (
            "POST",
            &["k1"],
            "two",
            Expect::Problem(422, "idempotency-key-reused"),
        ),
        (
            "POST",
            &["\"open"],
            "one",
            Expect::Problem(400, "invalid-idempotency-key"),
        ),
        (
            "POST",
            &["k1", "k1"],
            "one",
            Expect::Problem(400, "invalid-idempotency-key"),
        ),
        (
            "POST",
            &[""],
            "one",
            Expect::Problem(400, "invalid-idempotency-key"),
        ),
        ("PATCH", &["k2"], "p", Expect::Run),
        ("PATCH", &["k2"], "p", Expect::Replay(18)),
        ("GET", &["k1"], "", Expect::Pass),
        ("POST", &[], "free", Expect::Pass),
        ("PUT", &["k2"], "", Expect::Pass),
    ];
    runtime().block_on(async {
        let mut answers: Vec<Read> = Vec::new();
        let mut failures = Vec::new();
        for (i, (method, keys, body, expect)) in cases.iter().enumerate() {
            let before = log.seen().len();
            let uri = "/items?q=1".to_owned();
            let mut req = request(method, &uri, keys, TestBody::bytes(*body));
            req.extensions_mut().insert(Marker(i as u32));
            let r = ready_call(&mut svc, req).await.expect("infallible");
            let r = read(r).await;
            let seen = log.seen();
            let called = seen.len() - before;
            let what = format!("#{i} {method} keys {keys:?} body {body:?} ({expect:?})");
            match *expect {
                Expect::Pass | Expect::Run => {
                    if r.status != StatusCode::CREATED || called != 1 || r.replayed() {
                        failures.push(format!(
                            "{what}: {} (inner called {called} times, replayed {}) {:?}",
                            r.status,
                            r.replayed(),
                            r.body
                        ));
                    } else {
                        let s = seen.last().expect("seen");
                        let sent: Vec<Vec<u8>> =
                            keys.iter().map(|k| k.as_bytes().to_vec()).collect();
                        if s.method.as_str() != *method
                            || s.uri != uri
                            || s.keys != sent
                            || s.body != body.as_bytes()
                            || s.marker != Some(i as u32)
                        {
                            failures.push(format!("{what}: the handler saw {s:?}"));
                        }
                        if !r.headers.contains_key("set-cookie") {
                            failures.push(format!(
                                "{what}: the caller lost the handler's set-cookie header"
                            ));
                        }
                    }
                }
                Expect::Replay(of) => {
                    let first = &answers[of];
                    if called != 0
                        || !r.replayed()
                        || r.status != first.status
                        || r.body != first.body
                        || r.headers.contains_key("set-cookie")
                    {
                        failures.push(format!(
                            "{what}: {} replayed {} body {:?} (inner called {called} times)",
                            r.status,
                            r.replayed(),
                            r.body
                        ));
                    }
                }
                Expect::Problem(status, cause) => {
                    if called != 0
                        || r.status.as_u16() != status
                        || r.problem_type() != format!("urn:idemstore:problem:{cause}")
                    {
                        failures.push(format!(
                            "{what}: {} {:?} (inner called {called} times)",
                            r.status, r.body
                        ));
                    }
                }
            }
            answers.push(r);
        }
        let tickets: Vec<u64> = log.seen().iter().map(|s| s.ticket).collect();
        let unique: HashSet<u64> = tickets.iter().copied().collect();
        assert_eq!(
            log.unready_calls.load(Ordering::SeqCst),
            0,
            "the inner service was called on an instance that was not polled ready"
        );
        assert_eq!(
            unique.len(),
            tickets.len(),
            "a readiness ticket was spent twice"
        );
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

/// Contract: one service instance driven like a Buffer worker — poll_ready, call, and on to
/// the next request while the earlier futures are still running — calls the inner service on
/// a ready instance every time, on both paths, with passed-through and idempotent requests
/// interleaved and in flight together; concurrent duplicates of one key run the handler once.
#[test]
fn one_instance_driven_like_a_buffer_worker_keeps_poll_ready_then_call() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let log = Arc::new(ProbeLog::default());
    let svc = IdempotencyLayer::new(store).layer(Probe::new(&log));
    runtime().block_on(async {
        type Answer = tokio::sync::oneshot::Sender<http::Response<IdempotentBody>>;
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(http::Request<TestBody>, Answer)>();
        let worker = tokio::spawn(async move {
            let mut svc = svc;
            while let Some((request, answer)) = rx.recv().await {
                std::future::poll_fn(|cx| {
                    Service::<http::Request<TestBody>>::poll_ready(&mut svc, cx)
                })
                .await
                .expect("infallible");
                let called = svc.call(request);
                tokio::spawn(async move {
                    let _ = answer.send(called.await.expect("infallible"));
                });
            }
        });
        let mut pending = Vec::new();
        for i in 0..60 {
            let (method, key, kind) = match i % 3 {
                0 => ("GET", format!("g{i}"), "pass"),
                1 => ("POST", format!("c{i}"), "new"),
                _ => ("POST", "dup".to_owned(), "dup"),
            };
            let mut r = request(method, "/w", &[key.as_str()], TestBody::bytes("{}"));
            r.headers_mut()
                .insert("x-delay-ms", HeaderValue::from_static("30"));
            let (answer, got) = tokio::sync::oneshot::channel();
            tx.send((r, answer)).expect("worker alive");
            pending.push((kind, got));
        }
        let mut statuses = Vec::new();
        for (kind, got) in pending {
            let r = tokio::time::timeout(BOUND, got)
                .await
                .expect("an answer within the bound")
                .expect("the worker answered");
            let r = read(r).await;
            statuses.push((kind, r.status, r.replayed()));
        }
        drop(tx);
        tokio::time::timeout(BOUND, worker)
            .await
            .expect("the worker ends")
            .expect("the worker did not panic");
        assert_eq!(
            log.unready_calls.load(Ordering::SeqCst),
            0,
            "a call on an instance that was not polled ready: {statuses:?}"
        );
        let seen = log.seen();
        let tickets: HashSet<u64> = seen.iter().map(|s| s.ticket).collect();
        assert_eq!(
            tickets.len(),
            seen.len(),
            "a readiness ticket was spent twice"
        );
        let count = |m: &str, k: &dyn Fn(&[u8]) -> bool| {
            seen.iter()
                .filter(|s| s.method == m && s.keys.len() == 1 && k(&s.keys[0]))
                .count()
        };
        assert_eq!(count("GET", &|_| true), 20, "every GET passed through");
        assert_eq!(
            count("POST", &|k| k.starts_with(b"c")),
            20,
            "every new key ran once"
        );
        assert_eq!(
            count("POST", &|k| k == b"dup"),
            1,
            "twenty duplicates ran once"
        );
        for (kind, status, replayed) in &statuses {
            let ok = match *kind {
                "pass" | "new" => *status == StatusCode::CREATED && !replayed,
                _ => *status == StatusCode::CREATED || *status == StatusCode::CONFLICT,
            };
            assert!(
                ok,
                "{kind}: {status} replayed {replayed}; all: {statuses:?}"
            );
        }
    });
}

/// A waker that notes it was woken.
#[derive(Default)]
struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A service that is not ready until its gate opens (and then asks its inner probe), or fails
/// its readiness when told to.
#[derive(Clone)]
struct Gated {
    open: Arc<AtomicBool>,
    broken: Arc<AtomicBool>,
    waiting: Arc<Mutex<Option<Waker>>>,
    inner: Probe,
}

#[derive(Debug, PartialEq)]
struct NotReady(&'static str);

impl Service<http::Request<IdempotentBody>> for Gated {
    type Response = http::Response<TestBody>;
    type Error = NotReady;
    type Future = BoxFuture<Result<http::Response<TestBody>, NotReady>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), NotReady>> {
        if self.broken.load(Ordering::SeqCst) {
            return Poll::Ready(Err(NotReady("broken")));
        }
        if !self.open.load(Ordering::SeqCst) {
            *self.waiting.lock().expect("lock") = Some(cx.waker().clone());
            return Poll::Pending;
        }
        self.inner.poll_ready(cx).map_err(|e| match e {})
    }

    fn call(&mut self, request: http::Request<IdempotentBody>) -> Self::Future {
        let called = self.inner.call(request);
        Box::pin(async move { called.await.map_err(|e| match e {}) })
    }
}

/// Contract: the layer is ready exactly when the service under it is: a service that is not
/// ready keeps the layer pending (and its wake-up reaches the layer's caller), a readiness
/// error comes out of the layer's `poll_ready` as it is; then both kinds of request are
/// called on the instance made ready.
#[test]
fn a_service_that_is_not_ready_keeps_the_layer_pending_on_both_paths() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let log = Arc::new(ProbeLog::default());
    let gate = Gated {
        open: Arc::new(AtomicBool::new(false)),
        broken: Arc::new(AtomicBool::new(false)),
        waiting: Arc::new(Mutex::new(None)),
        inner: Probe::new(&log),
    };
    let (open, broken, waiting) = (
        Arc::clone(&gate.open),
        Arc::clone(&gate.broken),
        Arc::clone(&gate.waiting),
    );
    let mut svc = IdempotencyLayer::new(store).layer(gate);
    runtime().block_on(async {
        for (method, key) in [("GET", "g"), ("POST", "p"), ("DELETE", "d"), ("PATCH", "q")] {
            open.store(false, Ordering::SeqCst);
            let flag = Arc::new(Flag::default());
            let waker = Waker::from(Arc::clone(&flag));
            let mut cx = Context::from_waker(&waker);
            let polled = Service::<http::Request<TestBody>>::poll_ready(&mut svc, &mut cx);
            assert!(
                polled.is_pending(),
                "{method}: the layer was ready over a service that is not"
            );
            open.store(true, Ordering::SeqCst);
            waiting
                .lock()
                .expect("lock")
                .take()
                .expect("the inner service kept the layer's waker")
                .wake();
            assert!(
                flag.0.load(Ordering::SeqCst),
                "{method}: the wake-up reached the layer's caller"
            );
            let polled = Service::<http::Request<TestBody>>::poll_ready(&mut svc, &mut cx);
            assert!(
                matches!(polled, Poll::Ready(Ok(()))),
                "{method}: {polled:?}"
            );
            let called = svc.call(request(method, "/g", &[key], TestBody::bytes("b")));
            let r = read(
                tokio::time::timeout(BOUND, called)
                    .await
                    .expect("within the bound")
                    .expect("no error"),
            )
            .await;
            assert_eq!(r.status, StatusCode::CREATED, "{method}: {:?}", r.body);
        }
        assert_eq!(log.seen().len(), 4);
        assert_eq!(log.unready_calls.load(Ordering::SeqCst), 0);
        broken.store(true, Ordering::SeqCst);
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(flag);
        let mut cx = Context::from_waker(&waker);
        let polled = Service::<http::Request<TestBody>>::poll_ready(&mut svc, &mut cx);
        assert!(
            matches!(polled, Poll::Ready(Err(NotReady("broken")))),
            "the inner readiness error, as it is: {polled:?}"
        );
    });
}

/// The claim of a7b9b3a itself: a passed-through request is called on the inner service with
/// no clone of it (an idempotent one still clones: tower's swap, one clone per request).
#[test]
fn a_passed_through_request_clones_nothing() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let log = Arc::new(ProbeLog::default());
    let mut svc = IdempotencyLayer::new(store)
        .require_key(false)
        .layer(Probe::new(&log));
    runtime().block_on(async {
        for (method, keys) in [
            ("GET", &["k"][..]),
            ("PUT", &["k"][..]),
            ("POST", &[][..]),
            ("DELETE", &["\"bad"][..]),
        ] {
            let r = ready_call(&mut svc, request(method, "/c", keys, TestBody::bytes("")))
                .await
                .expect("infallible");
            assert_eq!(read(r).await.status, StatusCode::CREATED);
        }
        assert_eq!(
            log.clones.load(Ordering::SeqCst),
            0,
            "passed-through requests cloned the inner service"
        );
        let r = ready_call(&mut svc, request("POST", "/c", &["k"], TestBody::bytes("")))
            .await
            .expect("infallible");
        assert_eq!(read(r).await.status, StatusCode::CREATED);
        assert_eq!(
            log.clones.load(Ordering::SeqCst),
            1,
            "an idempotent request: one clone"
        );
        assert_eq!(log.unready_calls.load(Ordering::SeqCst), 0);
    });
}

/// An inner service whose calls fail with an error of its own.
#[derive(Clone)]
struct Failing {
    calls: Arc<AtomicU32>,
}

#[derive(Debug, PartialEq)]
struct Boom(u32);

impl Service<http::Request<IdempotentBody>> for Failing {
    type Response = http::Response<TestBody>;
    type Error = Boom;
    type Future = BoxFuture<Result<http::Response<TestBody>, Boom>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Boom>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<IdempotentBody>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move { Err(Boom(n)) })
    }
}

/// Contract: the inner service's error is the layer's error, unchanged, on both paths (the
/// passed-through path's `?` was rewritten); an idempotent request whose service failed is
/// released, so the next request with its key runs again (no record, no 409).
#[test]
fn the_inner_services_error_comes_out_unchanged_on_both_paths() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = IdempotencyLayer::new(store)
        .require_key(false)
        .layer(Failing {
            calls: Arc::clone(&calls),
        });
    runtime().block_on(async {
        let e = |r: Result<http::Response<IdempotentBody>, Boom>| match r {
            Ok(r) => panic!("an answer {} instead of the service's error", r.status()),
            Err(e) => e,
        };
        assert_eq!(
            e(ready_call(&mut svc, request("GET", "/f", &["k"], TestBody::bytes(""))).await),
            Boom(1)
        );
        assert_eq!(
            e(ready_call(&mut svc, request("POST", "/f", &[], TestBody::bytes("x"))).await),
            Boom(2)
        );
        assert_eq!(
            e(ready_call(
                &mut svc,
                request("POST", "/f", &["k"], TestBody::bytes("x"))
            )
            .await),
            Boom(3)
        );
        assert_eq!(
            e(ready_call(
                &mut svc,
                request("POST", "/f", &["k"], TestBody::bytes("x"))
            )
            .await),
            Boom(4),
            "the failed request's key was released: its retry runs again"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    });
}

/// An inner service that answers once it has read the first frame of the request body, then
/// reads the rest (and its trailers) before it ends its own response (with trailers).
#[derive(Clone)]
struct FirstFrame {
    first: Arc<Mutex<Option<tokio::sync::oneshot::Sender<Bytes>>>>,
}

impl Service<http::Request<IdempotentBody>> for FirstFrame {
    type Response = http::Response<TestBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<TestBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<IdempotentBody>) -> Self::Future {
        let first = Arc::clone(&self.first);
        Box::pin(async move {
            let mut body = request.into_body();
            let frame = body
                .frame()
                .await
                .expect("a first frame")
                .expect("it reads")
                .into_data()
                .expect("data");
            if let Some(tx) = first.lock().expect("lock").take() {
                let _ = tx.send(frame.clone());
            }
            let rest = body.collect().await.expect("the rest reads");
            let saw = rest
                .trailers()
                .and_then(|t| t.get("x-checksum"))
                .map(|v| v.to_str().expect("ascii").to_owned())
                .unwrap_or_default();
            let total = frame.len() + rest.to_bytes().len();
            let mut t = HeaderMap::new();
            t.insert("x-done", HeaderValue::from_static("yes"));
            let mut out = http::Response::new(TestBody::with_trailers(format!("{total}"), t));
            out.headers_mut().insert(
                "x-saw-checksum",
                HeaderValue::from_str(&saw).expect("value"),
            );
            Ok(out)
        })
    }
}

/// Contract: a passed-through request is the handler's as sent: its body streams to the
/// handler as it arrives (never buffered, so never limited by `max_request_bytes`), its
/// trailers reach the handler, and the handler's response trailers reach the caller. Both
/// kinds of passed-through request: a method the layer is not configured for (with a key),
/// and a configured method without a key under `require_key(false)`.
#[test]
fn a_passed_through_body_streams_to_the_handler_with_its_trailers_both_ways() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        for (method, keys) in [("PUT", &["k"][..]), ("POST", &[][..]), ("GET", &["\"bad"][..])] {
            let first = Arc::new(Mutex::new(None));
            let mut svc = IdempotencyLayer::new(Arc::clone(&store))
                .require_key(false)
                .max_request_bytes(4)
                .layer(FirstFrame {
                    first: Arc::clone(&first),
                });
            let (got_first, first_seen) = tokio::sync::oneshot::channel();
            *first.lock().expect("lock") = Some(got_first);
            let (tx, body) = TestBody::channel();
            std::future::poll_fn(|cx| Service::<http::Request<TestBody>>::poll_ready(&mut svc, cx))
                .await
                .expect("infallible");
            let answer = tokio::spawn(svc.call(request(method, "/s", keys, body)));
            tx.send(Frame::data(Bytes::from(vec![b'a'; 1024])))
                .expect("sent");
            let seen = tokio::time::timeout(Duration::from_secs(10), first_seen)
                .await
                .unwrap_or_else(|_| {
                    panic!("{method} {keys:?}: the handler never saw the body's first frame while the rest was unsent (buffered?)")
                })
                .expect("the handler sent it");
            assert_eq!(seen.len(), 1024);
            tx.send(Frame::data(Bytes::from(vec![b'b'; 4096])))
                .expect("sent");
            let mut t = HeaderMap::new();
            t.insert("x-checksum", HeaderValue::from_static("c0ffee"));
            tx.send(Frame::trailers(t)).expect("sent");
            drop(tx);
            let r = tokio::time::timeout(BOUND, answer)
                .await
                .expect("within the bound")
                .expect("no panic")
                .expect("infallible");
            let r = read(r).await;
            assert_eq!(r.status, StatusCode::OK, "{method}: {:?}", r.body);
            assert_eq!(&r.body[..], b"5120", "{method}: the whole body reached the handler");
            assert_eq!(
                r.headers.get("x-saw-checksum").map(|v| v.as_bytes()),
                Some(&b"c0ffee"[..]),
                "{method}: the request's trailers reached the handler"
            );
            assert_eq!(
                r.trailers.as_ref().and_then(|t| t.get("x-done")).map(|v| v.as_bytes()),
                Some(&b"yes"[..]),
                "{method}: the response's trailers reached the caller"
            );
        }
    });
}

/// A request body that gives some data, then fails.
struct BrokenBody(Option<Bytes>);

impl Body for BrokenBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(Some(match self.0.take() {
            Some(data) => Ok(Frame::data(data)),
            None => Err(std::io::Error::other("the client's upload broke")),
        }))
    }
}

/// An inner service that reads the whole request body and says how that went: 200 with its
/// length, or 202 with the body's error.
#[derive(Clone)]
struct Reads {
    calls: Arc<AtomicU32>,
}

impl Service<http::Request<IdempotentBody>> for Reads {
    type Response = http::Response<TestBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<TestBody>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<IdempotentBody>) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Box::pin(async move {
            let (status, text) = match request.into_body().collect().await {
                Ok(c) => (
                    StatusCode::OK,
                    format!("run {n}: {} bytes", c.to_bytes().len()),
                ),
                Err(e) => (StatusCode::ACCEPTED, format!("run {n}: body failed: {e}")),
            };
            let mut out = http::Response::new(TestBody::bytes(text));
            *out.status_mut() = status;
            Ok(out)
        })
    }
}

/// Contract (README table; `handle`'s body read now split from the head): an idempotent
/// request whose body fails mid-upload is a 400 `unreadable-request` problem that runs nothing
/// and claims nothing (the retry with a whole body runs, then replays); a passed-through one
/// reaches the handler, which sees its body's error itself.
#[test]
fn a_broken_request_body_is_a_400_when_idempotent_and_the_handlers_to_see_when_passed_through() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let calls = Arc::new(AtomicU32::new(0));
    let mut svc = IdempotencyLayer::new(store).layer(Reads {
        calls: Arc::clone(&calls),
    });
    let broken = |method: &str| {
        let mut r = http::Request::builder()
            .method(method)
            .uri("/b")
            .header("idempotency-key", "bf")
            .body(BrokenBody(Some(Bytes::from_static(b"{\"half\":"))))
            .expect("request");
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        r
    };
    runtime().block_on(async {
        let r = read(
            ready_call(&mut svc, broken("POST"))
                .await
                .expect("infallible"),
        )
        .await;
        assert_eq!(
            (r.status, r.problem_type().as_str()),
            (
                StatusCode::BAD_REQUEST,
                "urn:idemstore:problem:unreadable-request"
            ),
            "{:?}",
            r.body
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "a broken idempotent request ran"
        );
        let r = read(
            ready_call(&mut svc, broken("PUT"))
                .await
                .expect("infallible"),
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::ACCEPTED,
            "passed through, the handler saw the error: {:?}",
            r.body
        );
        assert!(
            String::from_utf8_lossy(&r.body).contains("the client's upload broke"),
            "{:?}",
            r.body
        );
        let ok = request("POST", "/b", &["bf"], TestBody::bytes("{\"half\":1}"));
        let first = read(ready_call(&mut svc, ok).await.expect("infallible")).await;
        assert_eq!(
            first.status,
            StatusCode::OK,
            "the 400 claimed nothing: {:?}",
            first.body
        );
        assert!(!first.replayed());
        let ok = request("POST", "/b", &["bf"], TestBody::bytes("{\"half\":1}"));
        let again = read(ready_call(&mut svc, ok).await.expect("infallible")).await;
        assert!(again.replayed());
        assert_eq!(again.body, first.body);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the PUT and the POST once");
    });
}

// ---------------------------------------------------------------------------------------
// Records: the bytes they are filed under
// ---------------------------------------------------------------------------------------

/// The fingerprint of a POST to /orders?x=1 with header `x-account: a1` (a fingerprint header)
/// and `body`, by the documented construction.
fn expected_fingerprint(body: &[u8]) -> Fingerprint {
    let k = blake3::derive_key("idemstore 2026-11 http request fingerprint v2", b"");
    let mut fields = Vec::new();
    for f in [
        &b"POST"[..],
        b"/orders",
        b"x=1",
        b"x-account",
        &1u64.to_le_bytes(),
        b"a1",
    ] {
        digest_field(&mut fields, f);
    }
    if body.len() <= 1024 {
        digest_field(&mut fields, body);
    } else {
        fields.extend_from_slice(&(body.len() as u64).to_le_bytes());
        fields.extend_from_slice(body);
    }
    Fingerprint::from_bytes(*blake3::keyed_hash(&k, &fields).as_bytes())
}

/// Contract (design §15): a request's record is filed under the 37-byte digest of (tenant,
/// key) and holds the digest of method, path, query, the configured headers and the whole
/// body — the same bytes as before the first look moved into `first_look`, so records written
/// by earlier versions (or other replicas) still replay. Checked for a quoted and a bare key,
/// with and without a tenant, and bodies either side of the 1024-byte gathering bound.
#[test]
fn records_are_filed_under_the_documented_key_and_fingerprint() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let log = Arc::new(ProbeLog::default());
    let mut svc = IdempotencyLayer::new(Arc::clone(&store))
        .tenant(|head| match head.extensions.get::<VerifiedTenant>() {
            Some(t) => Some(t.0.clone()),
            None => head
                .headers
                .get("x-tenant")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        })
        .fingerprint_headers([http::HeaderName::from_static("x-account")])
        .layer(Probe::new(&log));
    runtime().block_on(async {
        // (key header, the key, tenant, whether the tenant comes as an extension, body length)
        let cases: [FiledCase; 5] = [
            ("\"k-1\"", b"k-1", Some("acct_1"), false, 30),
            ("k-2", b"k-2", None, false, 30),
            ("\"k \\\"3\\\"\"", b"k \"3\"", Some("acct_1"), false, 1025),
            ("k-4", b"k-4", Some(""), false, 5000),
            ("k-1", b"k-1", Some("acct_2"), true, 30),
        ];
        for (header, key, tenant, as_extension, len) in cases {
            let body = vec![b'b'; len];
            let mut r = request(
                "POST",
                "/orders?x=1",
                &[header],
                TestBody::bytes(body.clone()),
            );
            r.headers_mut()
                .insert("x-account", HeaderValue::from_static("a1"));
            match (tenant, as_extension) {
                (Some(t), true) => {
                    r.extensions_mut().insert(VerifiedTenant(t.to_owned()));
                }
                (Some(t), false) => {
                    r.headers_mut()
                        .insert("x-tenant", HeaderValue::from_str(t).expect("value"));
                }
                (None, _) => {}
            }
            let answer = read(ready_call(&mut svc, r).await.expect("infallible")).await;
            assert_eq!(
                answer.status,
                StatusCode::CREATED,
                "{header}: {:?}",
                answer.body
            );
            let detail = store
                .inspect(documented_store_key(tenant, key))
                .expect("inspect")
                .unwrap_or_else(|| {
                    panic!("{header} tenant {tenant:?}: no record under the documented store key")
                });
            assert_eq!(
                detail.info.fingerprint,
                Some(expected_fingerprint(&body)),
                "{header} tenant {tenant:?}, {len}-byte body: the record's fingerprint"
            );
        }
        assert_eq!(log.seen().len(), 5, "five keys, five runs");
    });
}

// ---------------------------------------------------------------------------------------
// A real server
// ---------------------------------------------------------------------------------------

/// A handler's state for the server tests.
#[derive(Default)]
struct Echo {
    runs: AtomicU32,
    gate: tokio::sync::Notify,
    entered: AtomicU32,
}

/// Answers every method: counts its runs and says what it saw (method, key headers, body
/// length); `x-gate` holds it until the test opens the gate.
async fn echo(
    State(app): State<Arc<Echo>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    app.entered.fetch_add(1, Ordering::SeqCst);
    if headers.contains_key("x-gate") {
        app.gate.notified().await;
    }
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let keys: Vec<String> = headers
        .get_all("idempotency-key")
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    let mut out = HeaderMap::new();
    out.insert("set-cookie", HeaderValue::from_static("session=abc"));
    out.insert("x-run", HeaderValue::from(n));
    (
        if method == Method::POST {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        out,
        format!("run={n} method={method} keys={keys:?} bytes={}", body.len()),
    )
}

macro_rules! echo_router {
    ($layer:expr, $app:expr) => {
        Router::new()
            .route("/items", any(echo))
            .layer($layer)
            .with_state($app)
    };
}

/// Contract (README, `methods`): requests of methods the layer is not configured for pass
/// through untouched whatever they carry — a valid key, the same key again, a malformed or
/// repeated key, a body over `max_request_bytes` — and claim nothing: the handler runs every
/// time, sees the key as sent, its whole response (every header) reaches the caller, nothing
/// is marked replayed, and the same key then works for a POST as a new key. With
/// `.methods([PUT])`, PUT becomes the idempotent method and POST passes through.
#[test]
fn requests_of_other_methods_pass_through_untouched_and_claim_nothing() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(Echo::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store)).max_request_bytes(16);
        let (addr, server) = serve(echo_router!(layer, Arc::clone(&app))).await;
        let client = client();
        let big = vec![b'x'; 64 << 10];
        let cases: Vec<PassCase> = vec![
            (Method::GET, vec![("idempotency-key", "k")], b"", "[\"k\"]"),
            (Method::GET, vec![("idempotency-key", "k")], b"", "[\"k\"]"),
            (
                Method::GET,
                vec![("idempotency-key", "\"open")],
                b"",
                "[\"\\\"open\"]",
            ),
            (
                Method::GET,
                vec![("idempotency-key", "a"), ("idempotency-key", "b")],
                b"",
                "[\"a\", \"b\"]",
            ),
            (Method::PUT, vec![("idempotency-key", "k")], &big, "[\"k\"]"),
            (
                Method::DELETE,
                vec![("idempotency-key", "k")],
                b"",
                "[\"k\"]",
            ),
            (
                Method::OPTIONS,
                vec![("idempotency-key", "")],
                b"",
                "[\"\"]",
            ),
        ];
        for (i, (method, headers, body, keys)) in cases.iter().enumerate() {
            let r = send_method(&client, method.clone(), addr, "/items", headers, body).await;
            let want = format!(
                "run={} method={method} keys={keys} bytes={}",
                i + 1,
                body.len()
            );
            assert_eq!(
                (r.status, String::from_utf8_lossy(&r.body).into_owned()),
                (StatusCode::OK, want),
                "{method} {headers:?}"
            );
            assert!(!r.replayed(), "{method} {headers:?}: marked replayed");
            assert!(
                r.headers.contains_key("set-cookie"),
                "{method}: a header was lost"
            );
        }
        // HEAD: no body, but the handler ran and its headers came back.
        let head = send_method(
            &client,
            Method::HEAD,
            addr,
            "/items",
            &[("idempotency-key", "k")],
            b"",
        )
        .await;
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["x-run"], "8");
        assert!(!head.replayed());
        // The key the GETs carried was never claimed: a POST with it is a new key, and the
        // layer's own rules still apply to POST (413 over the limit, then a replay).
        let over = send(
            &client,
            addr,
            "/items",
            &[("idempotency-key", "k")],
            &[b'y'; 17],
        )
        .await;
        assert_eq!(
            (over.status, over.problem_type().as_str()),
            (
                StatusCode::PAYLOAD_TOO_LARGE,
                "urn:idemstore:problem:request-too-large"
            )
        );
        let post = send(&client, addr, "/items", &[("idempotency-key", "k")], b"{}").await;
        assert_eq!(post.status, StatusCode::CREATED, "{:?}", post.body);
        assert!(!post.replayed());
        let again = send(&client, addr, "/items", &[("idempotency-key", "k")], b"{}").await;
        assert!(again.replayed());
        assert_eq!(again.body, post.body);
        let get = send_method(
            &client,
            Method::GET,
            addr,
            "/items",
            &[("idempotency-key", "k")],
            b"",
        )
        .await;
        assert!(!get.replayed(), "a GET after the POST still passes through");
        assert_eq!(app.runs.load(Ordering::SeqCst), 10);
        server.abort();

        // The configured methods decide: PUT idempotent, POST passed through.
        let app = Arc::new(Echo::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store)).methods([Method::PUT]);
        let (addr, server) = serve(echo_router!(layer, Arc::clone(&app))).await;
        let put = [("idempotency-key", "put-1")];
        let a = send_method(&client, Method::PUT, addr, "/items", &put, b"1").await;
        let b = send_method(&client, Method::PUT, addr, "/items", &put, b"1").await;
        assert_eq!(
            (a.replayed(), b.replayed(), &b.body),
            (false, true, &a.body)
        );
        let missing = send_method(&client, Method::PUT, addr, "/items", &[], b"1").await;
        assert_eq!(missing.status, StatusCode::BAD_REQUEST);
        for _ in 0..2 {
            let p = send(&client, addr, "/items", &put, b"1").await;
            assert_eq!(p.status, StatusCode::CREATED);
            assert!(!p.replayed(), "POST is not configured: it passes through");
        }
        let none = send(&client, addr, "/items", &[], b"1").await;
        assert_eq!(
            none.status,
            StatusCode::CREATED,
            "POST without a key passes through"
        );
        assert_eq!(app.runs.load(Ordering::SeqCst), 4);
        server.abort();
    });
}

/// Contract (README, `require_key`): with `require_key(false)` a configured method without a
/// key passes through — every time, whatever its body (no 413: nothing is buffered) — while
/// any `Idempotency-Key` field at all keeps it on the idempotent path: a malformed, empty or
/// repeated one is a 400, a body over the limit a 413 that claims nothing, a valid one runs
/// once and replays.
#[test]
fn without_require_key_only_a_request_with_no_key_field_passes_through() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(Echo::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store))
            .require_key(false)
            .max_request_bytes(16);
        let (addr, server) = serve(echo_router!(layer, Arc::clone(&app))).await;
        let client = client();
        let big = vec![b'x'; 64 << 10];
        for method in [Method::POST, Method::PATCH] {
            for _ in 0..2 {
                let r = send_method(&client, method.clone(), addr, "/items", &[], &big).await;
                assert!(
                    r.status.is_success() && !r.replayed(),
                    "{method} without a key: {} {:?}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                );
                assert!(String::from_utf8_lossy(&r.body).ends_with("bytes=65536"));
            }
        }
        assert_eq!(app.runs.load(Ordering::SeqCst), 4);
        for (headers, cause) in [
            (
                vec![("idempotency-key", "\"open")],
                "invalid-idempotency-key",
            ),
            (vec![("idempotency-key", "")], "invalid-idempotency-key"),
            (
                vec![("idempotency-key", "a"), ("idempotency-key", "a")],
                "invalid-idempotency-key",
            ),
        ] {
            let r = send(&client, addr, "/items", &headers, b"{}").await;
            assert_eq!(
                (r.status, r.problem_type()),
                (
                    StatusCode::BAD_REQUEST,
                    format!("urn:idemstore:problem:{cause}")
                ),
                "{headers:?}"
            );
        }
        let key = [("idempotency-key", "rk")];
        let over = send(&client, addr, "/items", &key, &[b'y'; 17]).await;
        assert_eq!(over.status, StatusCode::PAYLOAD_TOO_LARGE);
        let at = send(&client, addr, "/items", &key, &[b'y'; 16]).await;
        assert_eq!(
            at.status,
            StatusCode::CREATED,
            "the 413 claimed nothing: {:?}",
            at.body
        );
        let replay = send(&client, addr, "/items", &key, &[b'y'; 16]).await;
        assert!(replay.replayed());
        assert_eq!(replay.body, at.body);
        assert_eq!(app.runs.load(Ordering::SeqCst), 5);
        server.abort();
    });
}

/// Contract (README, tenants; design §15): a tenant function that panics makes its request a
/// 500 `tenant-unknown` problem — never a dropped connection — that runs nothing and claims
/// nothing; requests that pass through never call it (a GET with a key, a POST without one
/// under `require_key(false)`), so its panics never reach them.
#[test]
fn a_panicking_tenant_function_is_a_500_problem_and_passed_through_requests_never_call_it() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(Echo::default());
        let tenant_calls = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&tenant_calls);
        let layer = IdempotencyLayer::new(Arc::clone(&store))
            .require_key(false)
            .tenant(move |head| {
                counted.fetch_add(1, Ordering::SeqCst);
                if head.headers.contains_key("x-panic") {
                    panic!("the tenant lookup failed");
                }
                head.headers
                    .get("x-account")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            });
        let (addr, server) = serve(echo_router!(layer, Arc::clone(&app))).await;
        let client = client();
        let panicking = [
            ("idempotency-key", "t-1"),
            ("x-account", "acme"),
            ("x-panic", "1"),
        ];
        let mut answers = Vec::new();
        for _ in 0..8 {
            let client = client.clone();
            answers.push(tokio::spawn(async move {
                try_send(&client, addr, "/items", &panicking, b"{}").await
            }));
        }
        for a in answers {
            let r = a
                .await
                .expect("no panic in the test task")
                .expect("an answer, not a dropped connection");
            assert_eq!(
                (r.status, r.problem_type().as_str()),
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "urn:idemstore:problem:tenant-unknown"
                ),
                "{:?}",
                r.body
            );
            assert_eq!(r.headers["content-type"], "application/problem+json");
        }
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            0,
            "a panicking tenant ran the handler"
        );
        let calls = tenant_calls.load(Ordering::SeqCst);
        for (method, headers) in [
            (Method::GET, &panicking[..]),
            (Method::DELETE, &panicking[..]),
            (Method::POST, &[("x-panic", "1")][..]),
        ] {
            let r = try_send_method(&client, method.clone(), addr, "/items", headers, b"{}")
                .await
                .expect("an answer, not a dropped connection");
            assert!(
                r.status.is_success(),
                "{method} passes through: {}",
                r.status
            );
        }
        assert_eq!(
            tenant_calls.load(Ordering::SeqCst),
            calls,
            "the tenant function was called for a passed-through request"
        );
        // The panicked requests claimed nothing: the key runs now, then replays.
        let fine = [("idempotency-key", "t-1"), ("x-account", "acme")];
        let first = send(&client, addr, "/items", &fine, b"{}").await;
        assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
        let again = send(&client, addr, "/items", &fine, b"{}").await;
        assert!(again.replayed());
        assert_eq!(app.runs.load(Ordering::SeqCst), 4);
        server.abort();
    });
}

/// A clock that panics when told to.
#[derive(Clone)]
struct PanicClock {
    now: Arc<AtomicU64>,
    panic: Arc<AtomicBool>,
}

impl Clock for PanicClock {
    fn now_millis(&self) -> u64 {
        if self.panic.load(Ordering::SeqCst) {
            panic!("the store's clock failed");
        }
        self.now.load(Ordering::SeqCst)
    }
}

/// Contract (design §15, the first look's comment): a panic in code the store calls (here its
/// clock) during the local replay, or in the run's task, is a 500 problem — never a dropped
/// connection, never a panic through the service — and the request may be retried with the
/// same key once the fault is gone; requests that pass through never reach the store.
#[test]
fn a_panic_in_code_the_store_calls_is_a_500_problem_and_the_key_stays_usable() {
    let scratch = Scratch::new();
    let clock = PanicClock {
        now: Arc::new(AtomicU64::new(common::START_MS)),
        panic: Arc::new(AtomicBool::new(false)),
    };
    let store = Arc::new(
        Store::builder(scratch.path())
            .clock(clock.clone())
            .sweep_interval(None)
            .open()
            .expect("open"),
    );
    runtime().block_on(async {
        let app = Arc::new(Echo::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store));
        let (addr, server) = serve(echo_router!(layer, Arc::clone(&app))).await;
        let client = client();
        let k1 = [("idempotency-key", "clock-1")];
        let first = send(&client, addr, "/items", &k1, b"{}").await;
        assert_eq!(first.status, StatusCode::CREATED);
        clock.panic.store(true, Ordering::SeqCst);
        let k2 = [("idempotency-key", "clock-2")];
        for (what, headers) in [("a retry", &k1), ("a new key", &k2)] {
            let r = try_send(&client, addr, "/items", headers, b"{}")
                .await
                .unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
            let t = r.problem_type();
            assert!(
                r.status == StatusCode::INTERNAL_SERVER_ERROR
                    && (t == "urn:idemstore:problem:store-panicked"
                        || t == "urn:idemstore:problem:handler-panicked"),
                "{what}: {} {t:?} {:?}",
                r.status,
                r.body
            );
        }
        let get = try_send_method(&client, Method::GET, addr, "/items", &k1, b"")
            .await
            .expect("a GET passes through, the store untouched");
        assert_eq!(get.status, StatusCode::OK);
        clock.panic.store(false, Ordering::SeqCst);
        let replay = send(&client, addr, "/items", &k1, b"{}").await;
        assert!(replay.replayed(), "{} {:?}", replay.status, replay.body);
        assert_eq!(replay.body, first.body);
        let retried = send(&client, addr, "/items", &k2, b"{}").await;
        assert_eq!(
            retried.status,
            StatusCode::CREATED,
            "the key of a request whose store call panicked may be retried: {:?}",
            retried.body
        );
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            3,
            "k1 once, the GET, k2 once"
        );
        server.abort();
    });
}

/// Contract (README table): while a first request runs, its duplicates wait (`Conflict::Wait`)
/// and replay its response, and retries racing its end — some answered by the local first look,
/// some by the whole call — all get that response: the handler runs once, nobody gets a 500,
/// a 422 or a different body. Passed-through requests with the same key run beside it.
#[test]
fn replays_racing_the_first_run_all_get_its_response_and_it_runs_once() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(Echo::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store))
            .on_conflict(Conflict::Wait(Duration::from_secs(20)));
        let (addr, server) = serve(echo_router!(layer, Arc::clone(&app))).await;
        let client = client();
        let gated = [("idempotency-key", "race"), ("x-gate", "1")];
        let plain = [("idempotency-key", "race")];
        let first = {
            let client = client.clone();
            tokio::spawn(async move { send(&client, addr, "/items", &gated, b"{}").await })
        };
        let deadline = tokio::time::Instant::now() + BOUND;
        while app.entered.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the first request never ran"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut others = Vec::new();
        for i in 0..24 {
            let client = client.clone();
            let stagger = Duration::from_millis((i % 6) * 10);
            others.push(tokio::spawn(async move {
                tokio::time::sleep(stagger).await;
                send(&client, addr, "/items", &plain, b"{}").await
            }));
        }
        // A GET with the key passes through while the key is held.
        let get = send_method(&client, Method::GET, addr, "/items", &plain, b"").await;
        assert_eq!(get.status, StatusCode::OK);
        assert!(!get.replayed());
        tokio::time::sleep(Duration::from_millis(30)).await;
        app.gate.notify_one();
        let first = tokio::time::timeout(BOUND, first)
            .await
            .expect("within the bound")
            .expect("no panic");
        assert_eq!(first.status, StatusCode::CREATED);
        assert!(!first.replayed());
        let mut bad = Vec::new();
        for o in others {
            let r = tokio::time::timeout(BOUND, o)
                .await
                .expect("within the bound")
                .expect("no panic");
            if r.status != StatusCode::CREATED || !r.replayed() || r.body != first.body {
                bad.push(format!(
                    "{} replayed {} {:?}",
                    r.status,
                    r.replayed(),
                    r.body
                ));
            }
        }
        assert!(
            bad.is_empty(),
            "duplicates that did not get the first response: {bad:?}"
        );
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            2,
            "the POST once, the GET once"
        );
        server.abort();
    });
}

/// A concurrency limit of one, by hand (tower's ConcurrencyLimit): `poll_ready` takes the one
/// permit into the instance polled (a clone has none), `call` moves it into the response
/// future. A call without a permit is answered 500 and counted; the handler's overlap is
/// measured.
struct LimitOne<S> {
    shared: Arc<LimitShared>,
    permit: Option<Permit>,
    inner: S,
}

#[derive(Default)]
struct LimitShared {
    state: Mutex<(bool, Vec<Waker>)>,
    without_permit: AtomicU32,
    running: AtomicUsize,
    most_running: AtomicUsize,
}

struct Permit(Arc<LimitShared>);

impl Drop for Permit {
    fn drop(&mut self) {
        let wakers = {
            let mut s = self.0.state.lock().expect("lock");
            s.0 = false;
            std::mem::take(&mut s.1)
        };
        for w in wakers {
            w.wake();
        }
    }
}

impl<S: Clone> Clone for LimitOne<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            permit: None,
            inner: self.inner.clone(),
        }
    }
}

impl<S> Service<http::Request<IdempotentBody>> for LimitOne<S>
where
    S: Service<
        http::Request<IdempotentBody>,
        Response = axum::response::Response,
        Error = Infallible,
    >,
    S::Future: Send + 'static,
{
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = BoxFuture<Result<axum::response::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        if self.permit.is_none() {
            let mut s = self.shared.state.lock().expect("lock");
            if s.0 {
                s.1.push(cx.waker().clone());
                return Poll::Pending;
            }
            s.0 = true;
            self.permit = Some(Permit(Arc::clone(&self.shared)));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<IdempotentBody>) -> Self::Future {
        let Some(permit) = self.permit.take() else {
            self.shared.without_permit.fetch_add(1, Ordering::SeqCst);
            return Box::pin(async {
                Ok(axum::response::IntoResponse::into_response((
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "called without a permit",
                )))
            });
        };
        let shared = Arc::clone(&self.shared);
        let called = self.inner.call(request);
        Box::pin(async move {
            let now = shared.running.fetch_add(1, Ordering::SeqCst) + 1;
            shared.most_running.fetch_max(now, Ordering::SeqCst);
            let r = called.await;
            shared.running.fetch_sub(1, Ordering::SeqCst);
            drop(permit);
            r
        })
    }
}

/// Contract: a concurrency-limited handler under the layer (tower's ConcurrencyLimit pattern:
/// readiness reserves a slot in the instance polled) behind a real server: every request,
/// passed through or idempotent, is called with its permit (on the instance polled ready),
/// the limit holds (never two handlers at once), nothing deadlocks, each new key runs once and
/// duplicates of one key run once.
#[test]
fn a_concurrency_limited_handler_keeps_its_limit_and_permits_on_both_paths() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(Echo::default());
        let shared = Arc::new(LimitShared::default());
        let handler = Router::new()
            .route("/items", any(echo))
            .with_state(Arc::clone(&app));
        let limited = LimitOne {
            shared: Arc::clone(&shared),
            permit: None,
            inner: handler,
        };
        let svc = IdempotencyLayer::new(Arc::clone(&store)).layer(limited);
        let router = Router::new().route_service("/items", svc);
        let (addr, server) = serve(router).await;
        let client = client();
        let mut calls = Vec::new();
        for i in 0..36 {
            let client = client.clone();
            calls.push(tokio::spawn(async move {
                let (method, key, kind) = match i % 3 {
                    0 => (Method::GET, format!("g{i}"), "pass"),
                    1 => (Method::POST, format!("n{i}"), "new"),
                    _ => (Method::POST, "dup".to_owned(), "dup"),
                };
                let r = send_method(
                    &client,
                    method,
                    addr,
                    "/items",
                    &[("idempotency-key", &key)],
                    b"{}",
                )
                .await;
                (kind, r)
            }));
        }
        let mut bad = Vec::new();
        for c in calls {
            let (kind, r) = tokio::time::timeout(BOUND, c)
                .await
                .expect("no deadlock: every request answered within the bound")
                .expect("no panic");
            let ok = match kind {
                "pass" => r.status == StatusCode::OK,
                "new" => r.status == StatusCode::CREATED && !r.replayed(),
                _ => r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT,
            };
            if !ok {
                bad.push(format!("{kind}: {} {:?}", r.status, r.body));
            }
        }
        assert_eq!(
            shared.without_permit.load(Ordering::SeqCst),
            0,
            "a call without the permit its poll_ready took"
        );
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(
            shared.most_running.load(Ordering::SeqCst),
            1,
            "the limit of one held"
        );
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            12 + 12 + 1,
            "each GET, each new key once, the duplicates once"
        );
        server.abort();
    });
}
