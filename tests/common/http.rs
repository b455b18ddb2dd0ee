//! A real HTTP server and client for the layer's tests: axum on hyper at 127.0.0.1, hyper's
//! client, and the answer read whole (with its trailers).

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A handler's state: how often it ran.
#[derive(Default)]
pub struct App {
    pub runs: AtomicU32,
}

/// A handler that counts its runs and answers 201 with its run number and the size of the
/// body it read.
pub async fn counted_create(State(app): State<Arc<App>>, body: Bytes) -> (StatusCode, String) {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    (
        StatusCode::CREATED,
        format!("{{\"order\":{n},\"bytes\":{}}}", body.len()),
    )
}

/// hyper's client over plain HTTP.
pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// Serves `router` on 127.0.0.1 until the returned handle is aborted.
pub async fn serve(router: Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    (addr, server)
}

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http()
}

/// The runtime the HTTP tests run on: two workers, as this machine has two cores.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// An answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// Whether the layer marked it a replay.
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    /// The `type` of a problem+json body; empty for any other body.
    pub fn problem_type(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["type"].as_str().map(String::from))
            .unwrap_or_default()
    }
}

/// Sends a request; `Err` when the connection gave no answer at all. Panics if none comes
/// within 20 s (a hang is a failure, not a wait).
pub async fn try_send_method(
    client: &Client,
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply, String> {
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("request");
    let response = tokio::time::timeout(Duration::from_secs(20), client.request(request))
        .await
        .expect("an answer within 20 s")
        .map_err(|e| format!("no response: {e:?}"))?;
    let (head, body) = response.into_parts();
    let collected = body.collect().await.map_err(|e| format!("body: {e}"))?;
    let trailers = collected.trailers().cloned();
    Ok(Reply {
        status: head.status,
        headers: head.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// As [`try_send_method`], panicking without an answer.
pub async fn send_method(
    client: &Client,
    method: Method,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    try_send_method(client, method, addr, path, headers, body)
        .await
        .expect("response")
}

/// A POST; `Err` when the connection gave no answer at all.
pub async fn try_send(
    client: &Client,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Reply, String> {
    try_send_method(client, Method::POST, addr, path, headers, body).await
}

/// A POST, panicking without an answer.
pub async fn send(
    client: &Client,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    send_method(client, Method::POST, addr, path, headers, body).await
}

/// A field as the layer's digests take it: its length (u64, little-endian), then its bytes.
pub fn digest_field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The store key the HTTP layer files (tenant, key) under, computed here by the documented
/// construction (`scoped_key` in src/api/http/mod.rs), not by calling it.
pub fn documented_store_key(tenant: Option<&str>, key: &[u8]) -> Vec<u8> {
    let derived = blake3::derive_key("idemstore 2026-11 http idempotency key v2", b"");
    let mut pair = Vec::new();
    match tenant {
        Some(t) => {
            pair.push(1);
            digest_field(&mut pair, t.as_bytes());
        }
        None => pair.push(0),
    }
    pair.extend_from_slice(key);
    let mut out = b"http:".to_vec();
    out.extend_from_slice(blake3::keyed_hash(&derived, &pair).as_bytes());
    out
}
