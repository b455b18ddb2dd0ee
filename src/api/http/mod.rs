//! An `Idempotency-Key` layer for tower HTTP services (feature `http`): the semantics of
//! draft-ietf-httpapi-idempotency-key-header-07 and of Stripe's API, on any engine.
//!
//! Invariants:
//! - a request of a configured method (POST and PATCH by default) runs the handler at most
//!   once per recorded response for its (tenant, key): concurrent duplicates get 409 (or wait,
//!   if configured), retries get the stored response, marked `Idempotent-Replayed: true`;
//! - a request reusing a key with a different request (method, path, query, body and the
//!   configured headers) gets 422; a missing or malformed key gets 400; none of the layer's
//!   own answers is stored or claims a key;
//! - every response of a handler that ran is stored — 5xx included, as Stripe does, and a 502
//!   standing for a response whose body failed mid-stream — except 429, 503 and responses
//!   marked `Cache-Control: no-store`, which release the key (no record is left) so the next
//!   request runs the handler again, whatever its body;
//! - bodies are buffered up to their limits only: a request over its limit gets 413 without
//!   running the handler; a response over its limit streams to the first caller unbuffered,
//!   and the record keeps its status and headers with a note that the body was too large:
//!   its replays get a 500 problem saying so (the handler is not run again);
//! - the handler runs in a task of its own: a client that disconnects does not cancel it,
//!   and its response is recorded for the retry.

mod gather;
mod key;
mod problem;
mod response;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::api::store::Store;
use crate::core::replay::{recorded, Recorded};
use crate::driver::execute::{QuickLook, ReadAbsent};
use crate::engine::sled::SledEngine;
use crate::engine::Engine;
use crate::error::{Error, ExecuteError};
use crate::format::fingerprint::Fingerprint;
use crate::format::record::Record;
use crate::key::KeyName;
use gather::Gather;
use problem::problem;
use response::{boxed, collect_limited, full, with_trailers, Collected, StoredResponse};
use std::convert::Infallible;

mod body;

pub use body::IdempotentBody;

/// A boxed error, as tower services use.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Who answers a request for a key whose first request is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// 409 Conflict at once, with `Retry-After` (seconds, rounded up).
    Reject {
        /// What `Retry-After` says.
        retry_after: Duration,
    },
    /// Wait up to this long for the first request to finish and replay its response; 409
    /// after that.
    Wait(Duration),
}

/// The tenant of a request, from its head (an account id from a verified token, say).
pub type TenantOf = Arc<dyn Fn(&http::request::Parts) -> Option<String> + Send + Sync>;

#[derive(Clone)]
struct Settings {
    methods: Vec<Method>,
    require_key: bool,
    tenant: Option<TenantOf>,
    fingerprint_headers: Vec<HeaderName>,
    replay_headers: Vec<HeaderName>,
    max_request_bytes: usize,
    max_response_bytes: usize,
    conflict: Conflict,
    ttl: Option<Duration>,
}

/// A tower [`Layer`](tower_layer::Layer) that makes a service idempotent by the
/// `Idempotency-Key` request header, recording responses in a [`Store`].
///
/// | request | answer |
/// |---|---|
/// | configured method (POST, PATCH), no key | 400 problem (`require_key`, the default) |
/// | malformed key, or more than one | 400 problem |
/// | body over `max_request_bytes` | 413 problem; the handler does not run |
/// | new key | the handler runs (in its own task); its response is stored and returned |
/// | key of a finished request, same request | the stored response, `Idempotent-Replayed: true` |
/// | key of a finished request, different request | 422 problem |
/// | key of a request still running | 409 problem with `Retry-After` (or, with [`Conflict::Wait`], the replay once it finishes) |
/// | handler answered 429, 503 or `Cache-Control: no-store` | returned, not stored; the key is released (no record: the next request runs afresh, whatever its body) |
/// | handler's response body failed mid-stream | 502 problem, stored (the handler ran; it does not run again) |
/// | response body over `max_response_bytes` | streamed to the first caller; replays get a 500 problem |
/// | the store failed | 503 problem (`Retry-After: 1`) |
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// use idemstore::http::IdempotencyLayer;
/// use std::sync::Arc;
/// let store = Arc::new(idemstore::Store::open(dir.path().join("db"))?);
/// let layer = IdempotencyLayer::new(store)
///     .tenant(|head| {
///         head.headers.get("x-account").and_then(|v| v.to_str().ok()).map(String::from)
///     });
/// // axum: Router::new().route("/orders", post(create_order)).layer(layer)
/// # let _ = layer; Ok(()) }
/// ```
#[allow(private_bounds)]
pub struct IdempotencyLayer<S: Engine = SledEngine> {
    /// One reference per request (store and settings together: one count to move).
    shared: Arc<LayerShared<S>>,
}

/// What every request of a layer reads.
struct LayerShared<S: Engine> {
    store: Arc<Store<S>>,
    settings: Settings,
}

impl<S: Engine> Clone for LayerShared<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            settings: self.settings.clone(),
        }
    }
}

#[allow(private_bounds)]
impl<S: Engine> Clone for IdempotencyLayer<S> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

#[allow(private_bounds)]
impl<S: Engine> std::fmt::Debug for IdempotencyLayer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("methods", &self.shared.settings.methods)
            .field("conflict", &self.shared.settings.conflict)
            .finish_non_exhaustive()
    }
}

#[allow(private_bounds)]
impl<S: Engine> IdempotencyLayer<S> {
    /// A layer recording responses in `store`, with the defaults: POST and PATCH need a key;
    /// the fingerprint covers method, path, query and body; `Content-Type`,
    /// `Content-Encoding`, `Content-Language`, `Content-Disposition`, `Location`, `ETag`,
    /// `Last-Modified`, `Cache-Control` and `Vary` are replayed; request bodies up to 1 MiB,
    /// stored response bodies up to 960 KiB; a running duplicate gets 409 with
    /// `Retry-After: 1`; records live the store's default TTL.
    ///
    /// Every record the layer writes is keyed by 37 bytes (a digest of tenant and key), so
    /// the store's `max_key_bytes` must be at least 37 (the default is 256); below that,
    /// requests with a key get a 500 problem (`store-key-limit`), and an error is logged here.
    pub fn new(store: Arc<Store<S>>) -> Self {
        let limit = store.shared().settings.max_key_bytes;
        if limit < STORE_KEY_LEN {
            tracing::error!(
                max_key_bytes = limit,
                needed = STORE_KEY_LEN,
                "the idempotency layer's keys do not fit this store's max_key_bytes"
            );
        }
        Self {
            shared: Arc::new(LayerShared {
                store,
                settings: Settings {
                    methods: vec![Method::POST, Method::PATCH],
                    require_key: true,
                    tenant: None,
                    fingerprint_headers: Vec::new(),
                    replay_headers: [
                        header::CONTENT_TYPE,
                        header::CONTENT_ENCODING,
                        header::CONTENT_LANGUAGE,
                        header::CONTENT_DISPOSITION,
                        header::LOCATION,
                        header::ETAG,
                        header::LAST_MODIFIED,
                        header::CACHE_CONTROL,
                        header::VARY,
                    ]
                    .to_vec(),
                    max_request_bytes: 1 << 20,
                    // Within the store's default `max_result_bytes` (1 MiB) with room for the
                    // status and headers stored beside the body.
                    max_response_bytes: (1 << 20) - (64 << 10),
                    conflict: Conflict::Reject {
                        retry_after: Duration::from_secs(1),
                    },
                    ttl: None,
                },
            }),
        }
    }

    /// The settings, to change before the layer is shared.
    fn settings_mut(&mut self) -> &mut Settings {
        &mut Arc::make_mut(&mut self.shared).settings
    }

    /// The methods the layer applies to (others pass through untouched).
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.settings_mut().methods = methods.into_iter().collect();
        self
    }

    /// Whether a request of a configured method without a key is refused (400, the default)
    /// or passed through without idempotency.
    pub fn require_key(mut self, require: bool) -> Self {
        self.settings_mut().require_key = require;
        self
    }

    /// Scopes keys by tenant: two tenants' requests with the same key never meet. Without it
    /// keys are global, and the draft's warning applies: a low-entropy key could leak one
    /// client's response to another.
    pub fn tenant(
        mut self,
        tenant: impl Fn(&http::request::Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.settings_mut().tenant = Some(Arc::new(tenant));
        self
    }

    /// Request headers that count in the fingerprint, beside method, path, query and body.
    pub fn fingerprint_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.settings_mut().fingerprint_headers = names.into_iter().collect();
        self
    }

    /// Response headers stored and replayed (others reach the first caller only).
    pub fn replay_headers(mut self, names: impl IntoIterator<Item = HeaderName>) -> Self {
        self.settings_mut().replay_headers = names.into_iter().collect();
        self
    }

    /// The largest request body buffered (for the fingerprint); larger ones get 413.
    pub fn max_request_bytes(mut self, limit: usize) -> Self {
        self.settings_mut().max_request_bytes = limit;
        self
    }

    /// The largest response body stored. Keep it below the store's `max_result_bytes`, less
    /// room for the status and headers: a response the store cannot hold still reaches its
    /// first caller, and its replays get a 500 problem.
    pub fn max_response_bytes(mut self, limit: usize) -> Self {
        self.settings_mut().max_response_bytes = limit;
        self
    }

    /// What a duplicate of a running request gets; see [`Conflict`].
    pub fn on_conflict(mut self, conflict: Conflict) -> Self {
        self.settings_mut().conflict = conflict;
        self
    }

    /// How long records live (default: the store's TTL; Stripe keeps keys 24 hours).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.settings_mut().ttl = Some(ttl);
        self
    }
}

#[allow(private_bounds)]
impl<Svc, S: Engine> tower_layer::Layer<Svc> for IdempotencyLayer<S> {
    type Service = IdempotencyService<Svc, S>;

    fn layer(&self, inner: Svc) -> Self::Service {
        IdempotencyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`IdempotencyLayer`] wraps around another; see there.
#[allow(private_bounds)]
pub struct IdempotencyService<Svc, S: Engine = SledEngine> {
    inner: Svc,
    layer: IdempotencyLayer<S>,
}

#[allow(private_bounds)]
impl<Svc: Clone, S: Engine> Clone for IdempotencyService<Svc, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            layer: self.layer.clone(),
        }
    }
}

#[allow(private_bounds)]
impl<Svc, S: Engine> std::fmt::Debug for IdempotencyService<Svc, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyService")
            .field("layer", &self.layer)
            .finish_non_exhaustive()
    }
}

#[allow(private_bounds)]
impl<Svc, S, ReqBody, ResBody> tower_service::Service<Request<ReqBody>>
    for IdempotencyService<Svc, S>
where
    Svc: tower_service::Service<Request<IdempotentBody>, Response = Response<ResBody>>
        + Clone
        + Send
        + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Send + 'static,
    S: Engine,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<IdempotentBody>;
    type Error = Svc::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let settings = &self.layer.shared.settings;
        if !settings.methods.contains(request.method())
            || (!settings.require_key && !key::has_key(request.headers()))
        {
            // Not an idempotent request: straight to the handler, called here (the service
            // polled ready), with no clone of it and no part in `handle`'s larger future.
            let called = self.inner.call(request.map(boxed));
            return Box::pin(async move { Ok(called.await?.map(boxed)) });
        }
        // The clone that was polled ready goes with this request (tower's usual swap).
        let fresh = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, fresh);
        let (head, body) = request.into_parts();
        Box::pin(handle(inner, self.layer.clone(), head, body))
    }
}

/// Why a handler's response is not a recorded outcome.
enum NotStored<E> {
    /// 429, 503, `no-store`, or a body that failed to read: returned, the key released.
    Released(Response<IdempotentBody>),
    /// The inner service failed: its error goes to the caller, the key is released.
    Service(E),
}

/// An idempotent request (its head and body taken apart by the caller: a request kept whole
/// would stay in this future's state beside its head).
async fn handle<Svc, S, ReqBody, ResBody>(
    inner: Svc,
    layer: IdempotencyLayer<S>,
    head: http::request::Parts,
    body: ReqBody,
) -> Result<Response<IdempotentBody>, Svc::Error>
where
    Svc: tower_service::Service<Request<IdempotentBody>, Response = Response<ResBody>>
        + Send
        + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Send + 'static,
    S: Engine,
    ReqBody: http_body::Body<Data = Bytes> + Send + 'static,
    ReqBody::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let settings = &layer.shared.settings;
    let key = match key::idempotency_key(&head.headers) {
        Ok(Some(key)) => key,
        Ok(None) => {
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "missing-idempotency-key",
                "Idempotency-Key required",
                "this request must carry an Idempotency-Key header",
            ))
        }
        Err(bad) => {
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "invalid-idempotency-key",
                "Invalid Idempotency-Key",
                bad.detail(),
            ))
        }
    };
    let body = match collect_limited(body, settings.max_request_bytes).await {
        Collected::Whole(bytes, _) => bytes,
        Collected::TooLarge { .. } => {
            return Ok(problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request-too-large",
                "Request body too large",
                "the request body is over the limit this endpoint buffers",
            ))
        }
        Collected::Failed(e) => {
            tracing::debug!(error = %e, "idempotent request body unreadable");
            return Ok(problem(
                StatusCode::BAD_REQUEST,
                "unreadable-request",
                "Request body unreadable",
                "the request body could not be read",
            ));
        }
    };
    let (store_key, fingerprint, read_absent) = match first_look(&layer, &head, key, &body) {
        FirstLook::Answered(response) => return Ok(response),
        FirstLook::Run {
            store_key,
            fingerprint,
            read_absent,
        } => (store_key, fingerprint, read_absent),
    };
    let request = Request::from_parts(head, full(body));

    // The first run's own response (with every header, or a body too large to store) goes
    // to its caller from here; replays are rebuilt from the record.
    let live: Arc<Mutex<Option<Response<IdempotentBody>>>> = Arc::new(Mutex::new(None));
    let run = {
        let (shared, live) = (Arc::clone(&layer.shared), Arc::clone(&live));
        async move {
            let (store, settings) = (&shared.store, &shared.settings);
            let wait = match settings.conflict {
                Conflict::Reject { .. } => Duration::ZERO,
                Conflict::Wait(wait) => wait,
            };
            // A released answer (429, 503, no-store) leaves no record: the next request with
            // the key runs the handler afresh, whatever its body.
            let mut call = store
                .call(&store_key)
                .fingerprint(fingerprint)
                .wait_timeout(wait)
                .forget_retryable_errors();
            if let Some(ttl) = settings.ttl {
                call = call.ttl(ttl);
            }
            // Boxed as `Send` here, where every lifetime is concrete (the compiler cannot
            // prove it for the spawned future otherwise).
            let running: Pin<Box<dyn Future<Output = _> + Send + '_>> =
                Box::pin(call.run_from_async(read_absent, |_| {
                    run_handler(inner, request, settings, &live)
                }));
            running.await
        }
    };
    // The handler runs to completion even if this request's client goes away.
    let outcome = match tokio::spawn(run).await {
        Ok(outcome) => outcome,
        Err(_) => {
            return Ok(problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "handler-panicked",
                "Handler failed",
                "the handler panicked; the request may be retried with the same key",
            ))
        }
    };
    let live = live.lock().take();
    match (outcome, live) {
        (Ok(_), Some(response)) => Ok(response),
        (Ok(stored), None) => Ok(stored.into_value().replay()),
        (
            Err(ExecuteError::Operation {
                error: NotStored::Released(response),
                ..
            }),
            _,
        ) => Ok(response),
        (
            Err(ExecuteError::Operation {
                error: NotStored::Service(e),
                ..
            }),
            _,
        ) => Err(e),
        // The handler ran but its response could not be stored: its first caller still gets
        // it; replays get a problem.
        (
            Err(ExecuteError::Store(
                Error::ResultTooLarge { .. } | Error::ResultNotEncodable { .. },
            )),
            Some(response),
        ) => Ok(response),
        (Err(ExecuteError::Store(e)), _) => Ok(store_problem(&e, settings)),
    }
}

/// What the first look at an idempotent request found.
enum FirstLook {
    /// A response to give now: a replay, or a problem.
    Answered(Response<IdempotentBody>),
    /// Not a replay: what its run needs.
    Run {
        store_key: [u8; STORE_KEY_LEN],
        fingerprint: Fingerprint,
        read_absent: Option<ReadAbsent>,
    },
}

/// The request's tenant, store key and fingerprint, and a replay read locally if the key has
/// one. Synchronous, and kept out of `handle`, so none of it is part of that future's state.
fn first_look<S: Engine>(
    layer: &IdempotencyLayer<S>,
    head: &http::request::Parts,
    key: key::Key<'_>,
    body: &Bytes,
) -> FirstLook {
    let settings = &layer.shared.settings;
    let tenant = match settings.tenant.as_ref() {
        None => None,
        Some(tenant) => {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tenant(head))) {
                Ok(tenant) => tenant,
                Err(_) => {
                    return FirstLook::Answered(problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "tenant-unknown",
                        "Tenant unknown",
                        "the function that tells this request's tenant failed",
                    ))
                }
            }
        }
    };
    let store_key = scoped_key(tenant.as_deref(), key.as_bytes());
    let fingerprint = request_fingerprint(head, body, &settings.fingerprint_headers);
    // A replay read locally is answered here, without a task: a retry costs one read. User
    // code the store calls (its clock, serde) may panic here as in the task: a 500, never a
    // dropped connection.
    let quick_look = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        layer
            .shared
            .store
            .call(&store_key)
            .fingerprint(fingerprint)
            .quick_look_with(|rec| replay_record(&store_key, rec))
    }));
    let Ok(quick_look) = quick_look else {
        return FirstLook::Answered(problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store-panicked",
            "Idempotency store failed",
            "code the idempotency store called panicked; the request may be retried with the \
             same key",
        ));
    };
    let read_absent = match quick_look {
        QuickLook::Answered(Ok(response)) => return FirstLook::Answered(response),
        QuickLook::Answered(Err(ExecuteError::Store(e))) => {
            return FirstLook::Answered(store_problem(&e, settings))
        }
        QuickLook::Answered(Err(ExecuteError::Operation { error, .. })) => match error {},
        // Not a replay: the call goes on (from "absent", if the key was).
        QuickLook::Unanswered(read_absent) => read_absent,
    };
    FirstLook::Run {
        store_key,
        fingerprint,
        read_absent,
    }
}

/// Runs the handler and settles its response: stored, or released.
fn run_handler<'a, Svc, ResBody>(
    mut inner: Svc,
    request: Request<IdempotentBody>,
    settings: &'a Settings,
    live: &'a Mutex<Option<Response<IdempotentBody>>>,
) -> impl Future<Output = Result<StoredResponse, NotStored<Svc::Error>>> + Send + 'a
where
    Svc: tower_service::Service<Request<IdempotentBody>, Response = Response<ResBody>>
        + Send
        + 'static,
    Svc::Future: Send + 'static,
    Svc::Error: Send + 'static,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let called = inner.call(request);
    async move {
        let response = called.await.map_err(NotStored::Service)?;
        let (head, body) = response.into_parts();
        let no_store = head
            .headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| d.trim().eq_ignore_ascii_case("no-store"));
        if head.status == StatusCode::TOO_MANY_REQUESTS
            || head.status == StatusCode::SERVICE_UNAVAILABLE
            || no_store
        {
            return Err(NotStored::Released(Response::from_parts(head, boxed(body))));
        }
        match collect_limited(body, settings.max_response_bytes).await {
            Collected::Whole(bytes, trailers) => {
                let stored = StoredResponse::new(
                    head.status,
                    &head.headers,
                    &settings.replay_headers,
                    bytes.to_vec(),
                    None,
                );
                *live.lock() = Some(Response::from_parts(head, with_trailers(bytes, trailers)));
                Ok(stored)
            }
            Collected::TooLarge { read, body } => {
                let stored = StoredResponse::new(
                    head.status,
                    &head.headers,
                    &settings.replay_headers,
                    Vec::new(),
                    Some(read),
                );
                *live.lock() = Some(Response::from_parts(head, body));
                Ok(stored)
            }
            Collected::Failed(e) => {
                // The handler ran: what it answered is lost, and a 502 stands for it, stored
                // like any response so the handler does not run again.
                tracing::warn!(error = %e, "handler's response body failed; a 502 is recorded");
                let (status, cause, title, detail) = (
                    StatusCode::BAD_GATEWAY,
                    "response-unreadable",
                    "Response body failed",
                    "the request ran, but its response body failed while it was read; it is not \
                     run again",
                );
                let answer = problem(status, cause, title, detail);
                let stored = StoredResponse::new(
                    status,
                    answer.headers(),
                    &[header::CONTENT_TYPE],
                    problem::problem_body(status, cause, title, detail).to_vec(),
                    None,
                );
                *live.lock() = Some(answer);
                Ok(stored)
            }
        }
    }
}

/// The replay of `rec`, a recorded outcome of `key`: a stored response, read in place.
fn replay_record(
    key: &[u8],
    rec: &Record<'_>,
) -> Result<Response<IdempotentBody>, ExecuteError<Infallible>> {
    let h = &rec.header;
    match recorded(key, rec)? {
        Recorded::Value(payload) => {
            response::replay_payload(payload, h.codec, h.shape).map_err(|message| {
                Error::Decode {
                    key: KeyName::new(key),
                    what: "result",
                    message,
                }
                .into()
            })
        }
        // The layer records no errors: its handler's failures are released, never stored.
        Recorded::PermanentError(_) => Err(Error::PermanentErrorRecorded {
            key: KeyName::new(key),
        }
        .into()),
    }
}

/// The answer for a store error.
fn store_problem(e: &Error, settings: &Settings) -> Response<IdempotentBody> {
    let (status, cause, title, detail) = match e {
        Error::FingerprintMismatch { .. } => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this Idempotency-Key was used for a different request",
        ),
        Error::InProgress { .. } => {
            let retry_after = match settings.conflict {
                Conflict::Reject { retry_after } => retry_after,
                Conflict::Wait(_) => Duration::from_secs(1),
            };
            let mut response = problem(
                StatusCode::CONFLICT,
                "request-in-progress",
                "A request with this Idempotency-Key is in progress",
                "retry after the first request finishes",
            );
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            return response;
        }
        Error::KeyTooLong { .. } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "store-key-limit",
            "Idempotency store misconfigured",
            "the store's max_key_bytes is below the 37 bytes every key of this layer takes",
        ),
        Error::Interrupted { .. } => (
            StatusCode::CONFLICT,
            "request-interrupted",
            "An earlier request with this Idempotency-Key was interrupted",
            "its outcome is unknown; it must be reconciled before it runs again",
        ),
        Error::ResultTooLarge { .. } | Error::ResultNotEncodable { .. } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "response-not-stored",
            "Original response not stored",
            "the request ran once, but its response could not be stored; it is not run again",
        ),
        Error::Storage(_) | Error::LeaseLost { .. } | Error::OutcomeNotRecorded { .. } => {
            let mut response = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "Idempotency store unavailable",
                "the idempotency store failed; if this request ran, a retry with the same key \
                 may run it again",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
            return response;
        }
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "idempotency-error",
            "Idempotency record unusable",
            "the record for this Idempotency-Key cannot be used",
        ),
    };
    problem(status, cause, title, detail)
}

/// How long every store key the layer makes is: the store's `max_key_bytes` must be at least
/// this (the default is 256).
pub(crate) const STORE_KEY_LEN: usize = 5 + 32;

/// The store key of `key` for `tenant`: `http:` and a keyed digest of the pair (tenant
/// length-prefixed), so no two (tenant, key) pairs share one, and its length,
/// [`STORE_KEY_LEN`], depends on nothing else (replicas whose settings differ file a request
/// under the same key).
fn scoped_key(tenant: Option<&str>, key: &[u8]) -> [u8; STORE_KEY_LEN] {
    static SCOPED_KEY: LazyLock<[u8; 32]> =
        LazyLock::new(|| blake3::derive_key("idemstore 2026-11 http idempotency key v2", b""));
    let mut pair = Gather::new();
    match tenant {
        Some(tenant) => {
            pair.raw(&[1]);
            pair.field(tenant.as_bytes());
        }
        None => pair.raw(&[0]),
    }
    pair.raw(key);
    let mut scoped = [0; STORE_KEY_LEN];
    let (prefix, digest) = scoped.split_at_mut(5);
    prefix.copy_from_slice(b"http:");
    digest.copy_from_slice(blake3::keyed_hash(&SCOPED_KEY, pair.as_slice()).as_bytes());
    scoped
}

/// What makes two requests the same: method, path, query, the chosen headers, the body.
fn request_fingerprint(
    head: &http::request::Parts,
    body: &[u8],
    headers: &[HeaderName],
) -> Fingerprint {
    static REQUEST: LazyLock<[u8; 32]> =
        LazyLock::new(|| blake3::derive_key("idemstore 2026-11 http request fingerprint v2", b""));
    // Every field length-prefixed, gathered into one buffer and hashed in one call (a hasher
    // update per field cost more than the hashing); a large body is hashed where it lies.
    const GATHERED_BODY: usize = 1024;
    let mut fields = Gather::new();
    fields.field(head.method.as_str().as_bytes());
    fields.field(head.uri.path().as_bytes());
    fields.field(head.uri.query().unwrap_or_default().as_bytes());
    for name in headers {
        fields.field(name.as_str().as_bytes());
        let values = head.headers.get_all(name);
        fields.field(&(values.iter().count() as u64).to_le_bytes());
        for value in values {
            fields.field(value.as_bytes());
        }
    }
    let digest = if body.len() <= GATHERED_BODY {
        fields.field(body);
        blake3::keyed_hash(&REQUEST, fields.as_slice())
    } else {
        fields.raw(&(body.len() as u64).to_le_bytes());
        let mut h = blake3::Hasher::new_keyed(&REQUEST);
        h.update(fields.as_slice());
        h.update(body);
        h.finalize()
    };
    Fingerprint::from_bytes(*digest.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::{request_fingerprint, scoped_key, Fingerprint, STORE_KEY_LEN};

    /// A field as the digests take it: its length, then its bytes.
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(bytes);
    }

    /// The bytes each digest covers, built by hand: a change to them would file the records
    /// already stored under other keys, or refuse their retries as different requests.
    #[test]
    fn store_keys_and_fingerprints_digest_the_documented_bytes() {
        let key = blake3::derive_key("idemstore 2026-11 http idempotency key v2", b"");
        let scoped = |pair: &[u8]| {
            let mut scoped = b"http:".to_vec();
            scoped.extend_from_slice(blake3::keyed_hash(&key, pair).as_bytes());
            scoped
        };
        let mut pair = vec![1];
        field(&mut pair, b"acct_1");
        pair.extend_from_slice(b"k-1");
        assert_eq!(scoped_key(Some("acct_1"), b"k-1").to_vec(), scoped(&pair));
        assert_eq!(scoped_key(None, b"k-1").to_vec(), scoped(b"\0k-1"));
        let long_tenant = "t".repeat(600);
        let mut pair = vec![1];
        field(&mut pair, long_tenant.as_bytes());
        pair.extend_from_slice(b"k-1");
        assert_eq!(
            scoped_key(Some(&long_tenant), b"k-1").to_vec(),
            scoped(&pair)
        );

        let request = |body_len| {
            let (head, ()) = http::Request::post("/orders?x=1")
                .header("x-account", "a1")
                .body(())
                .expect("a request")
                .into_parts();
            (head, vec![b'b'; body_len])
        };
        let fingerprint_key =
            blake3::derive_key("idemstore 2026-11 http request fingerprint v2", b"");
        let names = [http::HeaderName::from_static("x-account")];
        for body_len in [0, 30, 1024, 1025, 5000] {
            let (head, body) = request(body_len);
            let mut fields = Vec::new();
            for f in [
                &b"POST"[..],
                b"/orders",
                b"x=1",
                b"x-account",
                &1u64.to_le_bytes(),
                b"a1",
            ] {
                field(&mut fields, f);
            }
            let digest = match body_len <= 1024 {
                true => {
                    field(&mut fields, &body);
                    blake3::keyed_hash(&fingerprint_key, &fields)
                }
                false => {
                    fields.extend_from_slice(&(body.len() as u64).to_le_bytes());
                    fields.extend_from_slice(&body);
                    blake3::keyed_hash(&fingerprint_key, &fields)
                }
            };
            assert_eq!(
                request_fingerprint(&head, &body, &names),
                Fingerprint::from_bytes(*digest.as_bytes()),
                "body of {body_len} bytes"
            );
        }
    }

    #[test]
    fn store_keys_are_unique_per_tenant_and_key_and_all_one_length() {
        let long = "k".repeat(255);
        let pairs = [
            (None, "abc"),
            (Some(""), "abc"),
            (Some("a"), "bc"),
            (Some("ab"), "c"),
            (Some("abc"), ""),
            (None, long.as_str()),
            (Some("tenant"), long.as_str()),
        ];
        let keys: Vec<[u8; STORE_KEY_LEN]> = pairs
            .iter()
            .map(|(t, k)| scoped_key(*t, k.as_bytes()))
            .collect();
        for (i, a) in keys.iter().enumerate() {
            assert_eq!(a.len(), STORE_KEY_LEN);
            assert!(a.starts_with(b"http:"));
            for b in &keys[i + 1..] {
                assert_ne!(a, b, "distinct pairs, distinct keys");
            }
        }
        assert_eq!(
            keys[0],
            scoped_key(None, b"abc"),
            "the same pair, the same key"
        );
    }
}
