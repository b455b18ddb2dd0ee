//! Adversarial tests, round 4: the HTTP layer's replay path as rewritten for speed (replays
//! read in place, `collect_limited` keeping a first chunk and a queue, the inline key, the
//! stack-gathered digests, `replay_record` / `quick_look_with`).
//!
//! Every test runs a real axum server on 127.0.0.1 over a real sled store in a temp dir and
//! talks to it with a small HTTP/1.1 client over a plain TCP socket (std::net, on the blocking
//! pool), so that what is compared is what went over the wire: each header line and its raw
//! value bytes, and the body after de-chunking. Request bodies sent "in chunks" go out with
//! `Transfer-Encoding: chunked`; hyper hands each chunk to the layer as a frame of its own.

mod common;

use common::http::documented_store_key;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use common::http::{runtime, serve};
use common::Scratch;
use http_body::Frame;
use idemstore::http::{Conflict, IdempotencyLayer};
use idemstore::{Codec, Store, METRIC_NAMES};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A fingerprint case: key, path, `x-f` value, body, the variant's body, what differs.
type FingerprintCase = (&'static str, String, String, Vec<u8>, Vec<u8>, &'static str);

/// A damage done to a stored record, and its name.
type Damage = (&'static str, Box<dyn Fn(&mut V2)>);

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 client: what went over the wire, byte for byte.
// ---------------------------------------------------------------------------------------

/// An answer as it came over the wire: status, header lines in order (lower-cased names, raw
/// value bytes), and the body (de-chunked).
#[derive(Debug, Clone)]
struct Raw {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Raw {
    /// Every value of `name`, in the order the lines came.
    fn all(&self, name: &str) -> Vec<Vec<u8>> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn replayed(&self) -> bool {
        self.all("idempotent-replayed") == [b"true".to_vec()]
    }

    fn problem_type(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["type"].as_str().map(String::from))
            .unwrap_or_default()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body[..self.body.len().min(400)]).into_owned()
    }
}

/// A request body: with `Content-Length`, or chunked (each chunk a frame of its own).
#[derive(Clone)]
enum Payload {
    Whole(Vec<u8>),
    Chunked(Vec<Vec<u8>>),
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n").ok_or("chunk size line cut short")?;
        let line = std::str::from_utf8(&b[..eol]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {line:?}: {e}"))?;
        b = &b[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(format!(
                "chunked body cut short ({} bytes so far)",
                out.len()
            ));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn parse(buf: &[u8]) -> Result<Raw, String> {
    let end =
        find(buf, b"\r\n\r\n").ok_or_else(|| format!("no response head in {} bytes", buf.len()))?;
    let head = &buf[..end];
    let rest = &buf[end + 4..];
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().ok_or("no status line")?;
    let status = std::str::from_utf8(status_line.get(9..12).ok_or("short status line")?)
        .map_err(|e| e.to_string())?
        .parse::<u16>()
        .map_err(|e| e.to_string())?;
    let mut headers = Vec::new();
    for line in lines {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or("header line without colon")?;
        let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
        let mut value = &line[colon + 1..];
        while let [b' ' | b'\t', tail @ ..] = value {
            value = tail;
        }
        while let [head @ .., b' ' | b'\t'] = value {
            value = head;
        }
        headers.push((name, value.to_vec()));
    }
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && find(v, b"chunked").is_some());
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<usize>().ok());
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n)
            .ok_or_else(|| format!("body cut short: {} of {n} bytes", rest.len()))?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Raw {
        status,
        headers,
        body,
    })
}

/// One request on a fresh connection (`Connection: close`), read to the end.
fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, Vec<u8>)],
    payload: &Payload,
) -> Result<Raw, String> {
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n").into_bytes();
    for (n, v) in headers {
        req.extend_from_slice(n.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    match payload {
        Payload::Whole(b) => {
            req.extend_from_slice(format!("content-length: {}\r\n\r\n", b.len()).as_bytes());
            req.extend_from_slice(b);
        }
        Payload::Chunked(chunks) => {
            req.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            for c in chunks.iter().filter(|c| !c.is_empty()) {
                req.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
                req.extend_from_slice(c);
                req.extend_from_slice(b"\r\n");
            }
            req.extend_from_slice(b"0\r\n\r\n");
        }
    }
    // A server that answers before reading everything may close early: read what it sent.
    let wrote = s.write_all(&req);
    let mut buf = Vec::new();
    let read = s.read_to_end(&mut buf);
    if buf.is_empty() {
        return Err(format!(
            "no response at all (write: {wrote:?}, read: {read:?})"
        ));
    }
    if let Err(e) = read {
        if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut {
            return Err("no complete response within 20 s".into());
        }
    }
    parse(&buf)
}

fn owned(headers: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect()
}

async fn try_request(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    payload: Payload,
) -> Result<Raw, String> {
    let (path, headers) = (path.to_string(), owned(headers));
    tokio::task::spawn_blocking(move || exchange(addr, "POST", &path, &headers, &payload))
        .await
        .expect("client thread")
}

async fn post_raw(addr: SocketAddr, path: &str, headers: &[(&str, &str)], payload: Payload) -> Raw {
    try_request(addr, path, headers, payload)
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

async fn post_whole(addr: SocketAddr, headers: &[(&str, &str)], body: &[u8]) -> Raw {
    post_raw(addr, "/orders", headers, Payload::Whole(body.to_vec())).await
}

// ---------------------------------------------------------------------------------------
// The handler: its answer is described by the request's headers.
// ---------------------------------------------------------------------------------------

/// A response body made of the given frames.
struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// The bytes of chunk `i` of `size` bytes: every chunk distinct, every byte value present.
fn chunk(i: usize, size: usize) -> Vec<u8> {
    (0..size)
        .map(|j| ((i * 31 + j * 7 + 3) % 256) as u8)
        .collect()
}

/// The whole body the handler sends for chunk sizes `sizes`.
fn pattern(sizes: &[usize]) -> Vec<u8> {
    sizes
        .iter()
        .enumerate()
        .flat_map(|(i, &s)| chunk(i, s))
        .collect()
}

fn sizes_header(sizes: &[usize]) -> String {
    sizes
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

#[derive(Default)]
struct Spec {
    runs: AtomicU32,
    /// Handlers that got `x-gate` wait here.
    gate: tokio::sync::Notify,
}

impl Spec {
    fn runs(&self) -> u32 {
        self.runs.load(Ordering::SeqCst)
    }
}

/// Headers the handler adds to every response unless `x-plain`: several values of one name,
/// values with obs-text bytes, and two that are not replayed.
fn fixed_headers() -> Vec<(&'static str, &'static [u8])> {
    vec![
        ("content-type", b"application/octet-stream"),
        ("vary", b"accept"),
        ("vary", b"accept-encoding"),
        ("vary", b"x-a"),
        ("cache-control", b"private"),
        ("cache-control", b"max-age=0"),
        ("etag", b"\"\xe9t\xe9-1\""),
        (
            "content-disposition",
            b"attachment; filename=\"r\xe9sum\xe9.bin\"",
        ),
        ("location", b"/orders/1"),
        ("content-language", b"fr"),
        ("set-cookie", b"sid=secret"),
        ("x-first-only", b"1"),
    ]
}

/// The headers the layer replays by default.
const REPLAYED: [&str; 9] = [
    "content-type",
    "content-encoding",
    "content-language",
    "content-disposition",
    "location",
    "etag",
    "last-modified",
    "cache-control",
    "vary",
];

/// `x-status`: the status (201); `x-chunks`: body chunk sizes; `x-echo`: answer the request
/// body; `x-run-body`: answer `run-N`; `x-vary`: that many more `vary` values; `x-plain`: no
/// fixed headers; `x-gate`: wait for the test to open the gate first.
async fn spec(State(app): State<Arc<Spec>>, headers: HeaderMap, body: Bytes) -> Response {
    let n = app.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if get("x-gate").is_some() {
        app.gate.notified().await;
    }
    let status = get("x-status")
        .and_then(|s| s.parse().ok())
        .unwrap_or(201u16);
    let mut frames = VecDeque::new();
    if get("x-echo").is_some() {
        frames.push_back(Frame::data(body.clone()));
    } else if get("x-run-body").is_some() {
        frames.push_back(Frame::data(Bytes::from(format!("run-{n}"))));
    } else if let Some(sizes) = get("x-chunks") {
        for (i, s) in sizes.split(',').filter(|s| !s.is_empty()).enumerate() {
            frames.push_back(Frame::data(Bytes::from(chunk(i, s.parse().expect("size")))));
        }
    }
    let mut response = Response::new(Body::new(Frames(frames)));
    *response.status_mut() = StatusCode::from_u16(status).expect("status");
    let map = response.headers_mut();
    if get("x-plain").is_none() {
        for (name, value) in fixed_headers() {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_bytes(value).expect("value"),
            );
        }
    }
    if let Some(count) = get("x-vary").and_then(|s| s.parse::<usize>().ok()) {
        for i in 0..count {
            map.append(HeaderName::from_static("vary"), HeaderValue::from(i));
        }
    }
    response
}

fn router(
    store: &Arc<Store>,
    app: &Arc<Spec>,
    f: impl FnOnce(IdempotencyLayer) -> IdempotencyLayer,
) -> Router {
    Router::new()
        .route("/orders", post(spec))
        .layer(f(IdempotencyLayer::new(Arc::clone(store))))
        .with_state(Arc::clone(app))
}

/// `again` is a replay of `first`: same status, same values of every replayed header in the
/// same order, same body bytes; marked replayed; nothing that is not replayed.
fn assert_replay_of(first: &Raw, again: &Raw, what: &str) {
    assert!(
        !first.replayed(),
        "{what}: the first answer is not a replay"
    );
    assert_eq!(
        again.status,
        first.status,
        "{what}: replayed status (replay body: {})",
        again.text()
    );
    assert!(again.replayed(), "{what}: marked Idempotent-Replayed: true");
    for name in REPLAYED {
        assert_eq!(
            again.all(name),
            first.all(name),
            "{what}: values of {name}, in order"
        );
    }
    assert!(
        again.all("set-cookie").is_empty(),
        "{what}: set-cookie is not replayed"
    );
    assert!(
        again.all("x-first-only").is_empty(),
        "{what}: x-first-only is not replayed"
    );
    assert_eq!(
        again.body.len(),
        first.body.len(),
        "{what}: replayed body length"
    );
    assert!(
        again.body == first.body,
        "{what}: replayed body bytes differ"
    );
}

fn assert_problem(r: &Raw, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: status (body: {})", r.text());
    assert_eq!(
        r.all("content-type"),
        [b"application/problem+json".to_vec()],
        "{what}: a problem answer"
    );
    assert!(
        r.problem_type().starts_with("urn:idemstore:problem:"),
        "{what}: a problem type, got {}",
        r.text()
    );
}

// ---------------------------------------------------------------------------------------
// Records by hand: the store key, export lines, record bytes.
// ---------------------------------------------------------------------------------------

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Every record of `store`, by key.
fn exported(store: &Store) -> HashMap<Vec<u8>, Vec<u8>> {
    let mut out = Vec::new();
    store.export(&mut out, |_| {}).expect("export");
    let mut records = HashMap::new();
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_slice(line).expect("json line");
        if let (Some(k), Some(r)) = (v["key"].as_str(), v["record"].as_str()) {
            records.insert(unhex(k), unhex(r));
        }
    }
    records
}

/// Imports `records` (key, record bytes) into `store`.
fn import(store: &Store, records: &[(Vec<u8>, Vec<u8>)]) {
    let mut text = String::from("{\"format\":\"idemstore-export\",\"version\":1}\n");
    for (k, r) in records {
        text.push_str(&format!(
            "{{\"key\":\"{}\",\"record\":\"{}\",\"steps\":[]}}\n",
            hex(k),
            hex(r)
        ));
    }
    text.push_str(&format!("{{\"end\":{}}}\n", records.len()));
    let summary = store.import(text.as_bytes(), |_| {}).expect("import");
    assert_eq!(
        summary.imported,
        records.len() as u64,
        "every record imported"
    );
}

/// A format-2 record: its header (before the payload length) and its payload.
struct V2 {
    head: Vec<u8>,
    payload: Vec<u8>,
}

const V2_HEAD: usize = 106;

impl V2 {
    fn split(bytes: &[u8]) -> Self {
        assert_eq!((bytes[0], bytes[1]), (0x1D, 2), "a format-2 record");
        let len = u32::from_le_bytes(bytes[V2_HEAD..V2_HEAD + 4].try_into().unwrap()) as usize;
        Self {
            head: bytes[..V2_HEAD].to_vec(),
            payload: bytes[V2_HEAD + 4..V2_HEAD + 4 + len].to_vec(),
        }
    }

    fn with_crc(mut out: Vec<u8>) -> Vec<u8> {
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn join(&self) -> Vec<u8> {
        let mut out = self.head.clone();
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        Self::with_crc(out)
    }

    /// The same record in format 1 (idemstore 0.1): no life, no codec, no shape.
    fn join_v1(&self) -> Vec<u8> {
        let mut out = self.head[..81].to_vec();
        out[1] = 1;
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        Self::with_crc(out)
    }

    fn codec(&self) -> u8 {
        self.head[97]
    }

    fn shape(&self) -> u64 {
        u64::from_le_bytes(self.head[98..106].try_into().unwrap())
    }

    fn set_shape(&mut self, shape: u64) {
        self.head[98..106].copy_from_slice(&shape.to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// The body shapes a replay must reproduce: empty, one byte, one chunk, two chunks, many
/// chunks with empty ones among them, a large binary body; and 204 / 200 / 500 statuses.
fn shape_cases() -> Vec<(&'static str, Vec<usize>, u16)> {
    vec![
        ("empty-201", vec![], 201),
        ("empty-chunks", vec![0, 0], 201),
        ("no-content", vec![], 204),
        ("one-byte", vec![1], 200),
        ("one-chunk", vec![256], 201),
        ("two-chunks", vec![3, 300], 201),
        (
            "many-chunks",
            vec![
                1, 0, 2, 17, 0, 255, 256, 1, 511, 512, 513, 1, 1, 1, 4096, 0, 9,
            ],
            201,
        ),
        ("large-binary", vec![70_000, 1, 65_535, 3], 201),
        ("server-error", vec![10, 10], 500),
    ]
}

/// Replays of every body shape, and of several values of one header and header values with
/// obs-text bytes, are what the first caller got (status, replayed headers, body), with the
/// store's default codec (bincode: the in-place read).
#[test]
fn replays_are_byte_identical_for_every_body_shape_and_multi_value_headers() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| l)).await;
        let cases = shape_cases();
        for (i, (name, sizes, status)) in cases.iter().enumerate() {
            let key = format!("shape-{name}");
            let (chunks, status) = (sizes_header(sizes), status.to_string());
            let h = [
                ("idempotency-key", key.as_str()),
                ("x-chunks", chunks.as_str()),
                ("x-status", status.as_str()),
            ];
            let first = post_whole(addr, &h, b"same request").await;
            assert_eq!(first.status.to_string(), status, "{name}: first status");
            if first.status != 204 {
                assert!(
                    first.body == pattern(sizes),
                    "{name}: the first caller's body"
                );
            }
            assert_eq!(
                first.all("vary").len(),
                3,
                "{name}: the first caller got three vary values"
            );
            for round in 0..2 {
                let again = post_whole(addr, &h, b"same request").await;
                assert_replay_of(&first, &again, &format!("{name}, replay {round}"));
            }
            assert_eq!(app.runs(), i as u32 + 1, "{name}: the handler ran once");
        }
        server.abort();
    });
}

/// The same with `Codec::Json` as the store's default codec: replays take the store's
/// generic decode (the fallback path), and must be as byte-identical.
#[test]
fn json_default_codec_replays_are_byte_identical() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().codec(Codec::Json).open().expect("open"));
    let app = Arc::new(Spec::default());
    runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| l)).await;
        let cases: Vec<_> = shape_cases()
            .into_iter()
            .filter(|(n, _, _)| *n != "large-binary") // JSON numbers: over the store's limit
            .collect();
        for (i, (name, sizes, status)) in cases.iter().enumerate() {
            let key = format!("json-{name}");
            let (chunks, status) = (sizes_header(sizes), status.to_string());
            let h = [
                ("idempotency-key", key.as_str()),
                ("x-chunks", chunks.as_str()),
                ("x-status", status.as_str()),
            ];
            let first = post_whole(addr, &h, b"same request").await;
            let again = post_whole(addr, &h, b"same request").await;
            assert_replay_of(&first, &again, &format!("json {name}"));
            assert_eq!(app.runs(), i as u32 + 1, "{name}: the handler ran once");
        }
        server.abort();
    });
    let records = exported(&store);
    let rec = records
        .get(&documented_store_key(None, b"json-many-chunks"))
        .expect("the record, under the documented store key");
    assert_eq!(
        V2::split(rec).codec(),
        2,
        "the record is JSON (the fallback path ran)"
    );
}

/// A response body of exactly `max_response_bytes` in many chunks is stored and replayed;
/// one over it streams to the first caller complete and in order, whichever chunk crosses the
/// limit (the first, the second, the last, one in the middle with more after it), and its
/// replays get the documented 500 problem without running the handler again.
#[test]
fn responses_around_the_limit_stream_complete_and_in_order() {
    const LIMIT: usize = 1000;
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| l.max_response_bytes(LIMIT))).await;
        let cases: Vec<(&str, Vec<usize>, bool)> = vec![
            ("at-limit-many", vec![1, 0, 333, 2, 664], true),
            ("under-limit-two", vec![500, 499], true),
            ("at-limit-one", vec![1000], true),
            ("over-at-last", vec![1, 0, 333, 2, 665], false),
            ("over-at-first", vec![1500, 20, 0, 30], false),
            ("over-at-second", vec![600, 600, 5, 5], false),
            (
                "over-in-middle",
                vec![
                    100, 100, 100, 100, 100, 100, 100, 100, 100, 101, 1, 2, 3, 4000,
                ],
                false,
            ),
            ("over-one-byte-chunks", vec![1; 1001], false),
        ];
        for (name, sizes, stored) in &cases {
            let runs = app.runs();
            let key = format!("limit-{name}");
            let chunks = sizes_header(sizes);
            let h = [
                ("idempotency-key", key.as_str()),
                ("x-chunks", chunks.as_str()),
            ];
            let first = post_whole(addr, &h, b"{}").await;
            assert_eq!(first.status, 201, "{name}: first status ({})", first.text());
            let expected = pattern(sizes);
            assert_eq!(
                first.body.len(),
                expected.len(),
                "{name}: first caller's length"
            );
            if first.body != expected {
                let at = first
                    .body
                    .iter()
                    .zip(&expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(expected.len().min(first.body.len()));
                panic!("{name}: the first caller's body differs from byte {at} on");
            }
            let again = post_whole(addr, &h, b"{}").await;
            if *stored {
                assert_replay_of(&first, &again, name);
            } else {
                assert_problem(&again, 500, name);
                assert_eq!(
                    again.problem_type(),
                    "urn:idemstore:problem:response-not-stored",
                    "{name}"
                );
            }
            assert_eq!(app.runs(), runs + 1, "{name}: the handler ran once");
        }
        server.abort();
    });
}

/// A request body sent in many chunks fingerprints as its bytes: a retry of the same bytes in
/// one piece, or in other chunks, is a replay; the same bytes but the last one is a 422. Body
/// sizes straddle the 512-byte stack buffer and the 1024-byte gathered-body switch. The
/// handler echoes what it got, so the body it saw is checked too.
#[test]
fn request_bodies_in_many_chunks_fingerprint_as_their_bytes() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| l)).await;
        for size in [
            1usize, 2, 400, 471, 472, 473, 511, 512, 600, 1023, 1024, 1025, 5000,
        ] {
            let runs = app.runs();
            let body: Vec<u8> = (0..size).map(|j| ((j * 13 + size) % 256) as u8).collect();
            let cut = |steps: &[usize]| {
                let mut chunks = Vec::new();
                let (mut at, mut i) = (0, 0);
                while at < body.len() {
                    let n = steps[i % steps.len()].min(body.len() - at);
                    chunks.push(body[at..at + n].to_vec());
                    at += n;
                    i += 1;
                }
                chunks
            };
            let key = format!("req-{size}");
            let h = [("idempotency-key", key.as_str()), ("x-echo", "1")];
            let first = post_raw(
                addr,
                "/orders",
                &h,
                Payload::Chunked(cut(&[1, 3, 64, 7, 500])),
            )
            .await;
            assert_eq!(first.status, 201, "{size}: first ({})", first.text());
            assert!(
                first.body == body,
                "{size}: the handler got the body whole and in order"
            );
            let whole = post_raw(addr, "/orders", &h, Payload::Whole(body.clone())).await;
            assert_replay_of(
                &first,
                &whole,
                &format!("{size} bytes, retried in one piece"),
            );
            let other = post_raw(addr, "/orders", &h, Payload::Chunked(cut(&[2, 1]))).await;
            assert_replay_of(
                &first,
                &other,
                &format!("{size} bytes, retried in other chunks"),
            );
            let mut changed = body.clone();
            *changed.last_mut().unwrap() ^= 0x5a;
            let chunks = {
                let mut c = cut(&[1, 3, 64, 7, 500]);
                let last = c.last_mut().unwrap();
                *last.last_mut().unwrap() ^= 0x5a;
                c
            };
            let refused = post_raw(addr, "/orders", &h, Payload::Chunked(chunks)).await;
            assert_problem(
                &refused,
                422,
                &format!("{size}: last byte changed, chunked"),
            );
            let refused = post_raw(addr, "/orders", &h, Payload::Whole(changed)).await;
            assert_problem(&refused, 422, &format!("{size}: last byte changed, whole"));
            assert_eq!(app.runs(), runs + 1, "{size}: the handler ran once");
        }
        server.abort();
    });
}

/// A request body over `max_request_bytes` gets 413 whether it comes in one chunk or many,
/// and whichever chunk crosses the limit; the handler does not run and the key is not
/// claimed. A body of exactly the limit in many chunks runs, whole and in order.
#[test]
fn request_bodies_over_the_limit_in_many_chunks_get_413() {
    const LIMIT: usize = 1000;
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| l.max_request_bytes(LIMIT))).await;
        let exact: Vec<Vec<u8>> = (0..10).map(|i| chunk(i, 100)).collect();
        let h = [("idempotency-key", "at-limit"), ("x-echo", "1")];
        let first = post_raw(addr, "/orders", &h, Payload::Chunked(exact.clone())).await;
        assert_eq!(
            first.status,
            201,
            "a body of the limit runs ({})",
            first.text()
        );
        assert!(
            first.body == exact.concat(),
            "the handler got it whole, in order"
        );
        let again = post_raw(addr, "/orders", &h, Payload::Whole(exact.concat())).await;
        assert_replay_of(&first, &again, "a body of the limit, retried whole");
        assert_eq!(app.runs(), 1);

        let over: Vec<(&str, Payload)> = vec![
            (
                "over-at-last",
                Payload::Chunked(
                    (0..11)
                        .map(|i| chunk(i, if i == 10 { 1 } else { 100 }))
                        .collect(),
                ),
            ),
            (
                "over-at-first",
                Payload::Chunked(vec![chunk(0, 1001), chunk(1, 5)]),
            ),
            (
                "over-at-second",
                Payload::Chunked(vec![chunk(0, 600), chunk(1, 600), chunk(2, 3)]),
            ),
            (
                "over-one-byte-chunks",
                Payload::Chunked((0..1001).map(|i| chunk(i, 1)).collect()),
            ),
            ("over-whole", Payload::Whole(chunk(0, 1001))),
        ];
        for (name, payload) in over {
            let key = format!("big-{name}");
            let h = [("idempotency-key", key.as_str()), ("x-echo", "1")];
            let r = post_raw(addr, "/orders", &h, payload).await;
            assert_problem(&r, 413, name);
            assert_eq!(
                r.problem_type(),
                "urn:idemstore:problem:request-too-large",
                "{name}"
            );
            assert_eq!(app.runs(), 1, "{name}: the handler did not run");
            // Nothing was claimed: the key runs a request that fits.
            let small = post_raw(addr, "/orders", &h, Payload::Whole(b"small".to_vec())).await;
            assert_eq!(
                (small.status, small.replayed(), small.body.as_slice()),
                (201, false, &b"small"[..]),
                "{name}: the key was left unclaimed"
            );
            assert_eq!(
                store
                    .record(documented_store_key(None, key.as_bytes()))
                    .expect("record")
                    .map(|r| r.state),
                Some(idemstore::RecordState::Completed)
            );
            app.runs.fetch_sub(1, Ordering::SeqCst);
        }
        server.abort();
    });
}

/// Quoted and bare forms of one key, and escaped forms, name one record; keys that differ
/// only in an escape or a last character name different ones; 255 characters (bare, quoted,
/// with escapes) is a key, 256 is a 400.
#[test]
fn key_forms_map_to_records_as_their_unquoted_bytes() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| l)).await;
        let send = move |key: String| async move {
            post_whole(
                addr,
                &[
                    ("idempotency-key", key.as_str()),
                    ("x-run-body", "1"),
                    ("x-plain", "1"),
                ],
                b"{}",
            )
            .await
        };
        let k254 = "k".repeat(254);
        // (first form, same-key forms, what)
        let same: Vec<(String, Vec<String>, &str)> = vec![
            ("abc-1".into(), vec!["\"abc-1\"".into()], "bare then quoted"),
            ("\"abc-2\"".into(), vec!["abc-2".into()], "quoted then bare"),
            (
                "\"a\\\\b\"".into(),
                vec!["a\\b".into(), "\"a\\\\b\"".into()],
                "escaped backslash",
            ),
            (
                "\"x\\\"y\"".into(),
                vec!["\"x\\\"y\"".into()],
                "escaped quote",
            ),
            (
                "\"with space\"".into(),
                vec!["with space".into()],
                "inner space",
            ),
            (
                format!("{k254}Z"),
                vec![format!("\"{k254}Z\"")],
                "255 bare then quoted",
            ),
            (
                format!("\"\\\"{k254}\""),
                vec![format!("\"\\\"{k254}\"")],
                "255 unquoted with an escape",
            ),
            (
                format!("\"\\\\{k254}\""),
                vec![format!("\\{k254}")],
                "255 escaped then bare",
            ),
        ];
        let mut seen = Vec::new();
        for (first_form, others, what) in &same {
            let runs = app.runs();
            let first = send(first_form.clone()).await;
            assert_eq!(
                first.status,
                201,
                "{what}: {first_form} runs ({})",
                first.text()
            );
            assert_eq!(app.runs(), runs + 1, "{what}: a new key runs");
            assert!(!seen.contains(&first.body), "{what}: a fresh run");
            seen.push(first.body.clone());
            for other in others {
                let again = send(other.clone()).await;
                assert_eq!(
                    (again.status, again.replayed(), again.text()),
                    (201, true, first.text()),
                    "{what}: {other} is the key of {first_form}"
                );
            }
            assert_eq!(app.runs(), runs + 1, "{what}: not run again");
        }
        // Different keys: each runs.
        for (form, what) in [
            ("\"x\\\\y\"".to_string(), "x\\y is not x\"y"),
            ("xy".into(), "xy is neither"),
            (format!("{k254}Y"), "another last character"),
            (k254.to_string(), "254 characters"),
            (
                format!("\"\\\\\\\\{}\"", "k".repeat(253)),
                "two backslashes then 253",
            ),
        ] {
            let runs = app.runs();
            let r = send(form.clone()).await;
            assert_eq!((r.status, r.replayed()), (201, false), "{what}: {form}");
            assert_eq!(app.runs(), runs + 1, "{what}: ran");
        }
        // Too long: a 400, nothing runs.
        let runs = app.runs();
        for (form, what) in [
            (format!("{k254}kk"), "256 bare"),
            (format!("\"{k254}kk\""), "256 quoted"),
            (format!("\"\\\\{k254}k\""), "256 unquoted with an escape"),
            (
                format!("\"\\\"{k254}k\""),
                "256 unquoted with an escaped quote",
            ),
        ] {
            let r = send(form).await;
            assert_problem(&r, 400, what);
            assert_eq!(
                r.problem_type(),
                "urn:idemstore:problem:invalid-idempotency-key",
                "{what}"
            );
        }
        assert_eq!(app.runs(), runs, "a refused key runs nothing");
        server.abort();
    });
}

/// Tenants and keys are scoped by all their bytes, past the 512-byte stack buffer: the same
/// key from two tenants (short, 600+ bytes, around the 512-byte boundary with a 255-character
/// key) makes two records, each replaying its own response; a long query, a long fingerprint
/// header or a long body that differ in their last byte are different requests (422).
#[test]
fn tenants_and_fields_past_the_stack_buffer_count_every_byte() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    let fp = HeaderName::from_static("x-f");
    runtime().block_on(async {
        let layer = |l: IdempotencyLayer| {
            l.tenant(|head| {
                head.headers
                    .get("x-account")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from)
            })
            .fingerprint_headers([fp])
        };
        let (addr, server) = serve(router(&store, &app, layer)).await;
        let k255 = "k".repeat(255);
        let mut tenant_sets: Vec<(Vec<String>, String)> = vec![
            (vec!["acme".into(), "globex".into()], "shared".into()),
            (
                vec![
                    format!("{}A", "t".repeat(600)),
                    format!("{}B", "t".repeat(600)),
                ],
                "long".into(),
            ),
        ];
        for len in [246usize, 247, 248, 249, 503, 504, 511, 512] {
            let base = "u".repeat(len - 1);
            tenant_sets.push((vec![format!("{base}X"), format!("{base}Y")], k255.clone()));
        }
        for (tenants, key) in &tenant_sets {
            let mut firsts = Vec::new();
            for t in tenants {
                let runs = app.runs();
                let h = [
                    ("idempotency-key", key.as_str()),
                    ("x-account", t.as_str()),
                    ("x-run-body", "1"),
                ];
                let first = post_whole(addr, &h, b"{}").await;
                assert_eq!(
                    (first.status, first.replayed()),
                    (201, false),
                    "tenant of {} bytes ending {:?}: its own record ({})",
                    t.len(),
                    &t[t.len() - 1..],
                    first.text()
                );
                assert_eq!(app.runs(), runs + 1);
                firsts.push((h.map(|(a, b)| (a.to_string(), b.to_string())), first));
            }
            for (h, first) in &firsts {
                let h: Vec<(&str, &str)> =
                    h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                let again = post_whole(addr, &h, b"{}").await;
                assert_replay_of(first, &again, &format!("tenant of {} bytes", h[1].1.len()));
            }
        }
        // Long fields of the fingerprint.
        let long = |c: char| format!("{}{c}", "q".repeat(700));
        let cases: Vec<FingerprintCase> = vec![
            // (key, path, x-f value, body) ... then the variant
            (
                "fp-query",
                format!("/orders?q={}", long('1')),
                "v".into(),
                b"{}".to_vec(),
                b"{}".to_vec(),
                "query",
            ),
            (
                "fp-header",
                "/orders".into(),
                long('1'),
                b"{}".to_vec(),
                b"{}".to_vec(),
                "header",
            ),
            (
                "fp-body",
                "/orders".into(),
                "v".into(),
                vec![b'b'; 1000],
                {
                    let mut b = vec![b'b'; 1000];
                    b[999] = b'c';
                    b
                },
                "body",
            ),
        ];
        for (key, path, xf, body, other_body, what) in cases {
            let h = [
                ("idempotency-key", key),
                ("x-f", xf.as_str()),
                ("x-run-body", "1"),
            ];
            let first = post_raw(addr, &path, &h, Payload::Whole(body.clone())).await;
            assert_eq!(first.status, 201, "{what}: first ({})", first.text());
            let again = post_raw(addr, &path, &h, Payload::Whole(body.clone())).await;
            assert_replay_of(&first, &again, &format!("long {what}, same request"));
            let (path2, xf2) = match what {
                "query" => (format!("/orders?q={}", long('2')), xf.clone()),
                "header" => (path.clone(), long('2')),
                _ => (path.clone(), xf.clone()),
            };
            let h2 = [
                ("idempotency-key", key),
                ("x-f", xf2.as_str()),
                ("x-run-body", "1"),
            ];
            let refused = post_raw(addr, &path2, &h2, Payload::Whole(other_body)).await;
            assert_problem(&refused, 422, &format!("long {what}, last byte changed"));
        }
        server.abort();
    });
}

/// A record of the layer rewritten in format 1 (idemstore 0.1: no shape, no codec byte), or
/// in format 2 without a shape, replays what the first caller got (moved in with the admin
/// API's import).
#[test]
fn records_of_an_older_format_replay_as_the_original() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    let sizes = [3usize, 300, 0, 1];
    let chunks = sizes_header(&sizes);
    let h = [
        ("idempotency-key", "legacy-1"),
        ("x-chunks", chunks.as_str()),
    ];
    let first = runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| l)).await;
        let first = post_whole(addr, &h, b"{\"a\":1}").await;
        server.abort();
        first
    });
    assert_eq!(first.status, 201);
    let key = documented_store_key(None, b"legacy-1");
    let rec = exported(&store).remove(&key).expect("the layer's record");
    let v2 = V2::split(&rec);
    assert_eq!(v2.codec(), 1, "bincode");
    assert_ne!(v2.shape(), 0, "a shape");
    let mut shapeless = V2::split(&rec);
    shapeless.set_shape(0);
    for (what, bytes) in [
        ("format 2 without a shape", shapeless.join()),
        ("format 1", v2.join_v1()),
    ] {
        let scratch = Scratch::new();
        let other = Arc::new(scratch.open());
        import(&other, &[(key.clone(), bytes)]);
        let app = Arc::new(Spec::default());
        let again = runtime().block_on(async {
            let (addr, server) = serve(router(&other, &app, |l| l)).await;
            let again = post_whole(addr, &h, b"{\"a\":1}").await;
            server.abort();
            again
        });
        assert_replay_of(&first, &again, what);
        assert_eq!(app.runs(), 0, "{what}: replayed, not run");
    }
}

/// A damaged record (valid checksum, bad payload; a wrong shape, codec, state or outcome
/// kind; a bad checksum) answers with a problem: never a panic, a dropped connection, a
/// different response passed off as the stored one, or a second run of the handler.
#[test]
fn damaged_records_answer_with_a_problem_and_never_run_the_handler() {
    let source = Scratch::new();
    let store = Arc::new(source.open());
    let app = Arc::new(Spec::default());
    let variants: Vec<Damage> = vec![
        (
            "payload one byte short",
            Box::new(|r| {
                r.payload.pop();
            }),
        ),
        ("a byte after the payload", Box::new(|r| r.payload.push(0))),
        ("empty payload", Box::new(|r| r.payload.clear())),
        (
            "another shape",
            Box::new(|r| {
                let s = r.shape();
                r.set_shape(s ^ 0x10);
            }),
        ),
        (
            "header name not a name",
            Box::new(|r| {
                let at = find(&r.payload, b"content-type").expect("name");
                r.payload[at + 7] = b' ';
            }),
        ),
        (
            "header value with a control byte",
            Box::new(|r| {
                let at = find(&r.payload, b"max-age=0").expect("value");
                r.payload[at] = 0x01;
            }),
        ),
        (
            "status 1000",
            Box::new(|r| {
                assert_eq!(r.payload[0], 201);
                r.payload.splice(0..1, [0xFB, 0xE8, 0x03]);
            }),
        ),
        ("status 0", Box::new(|r| r.payload[0] = 0)),
        ("bincode bytes marked JSON", Box::new(|r| r.head[97] = 2)),
        ("recorded as a permanent error", Box::new(|r| r.head[2] = 2)),
        (
            "outcome too large without its size note",
            Box::new(|r| {
                r.head[3] = 2;
                r.payload.truncate(3);
            }),
        ),
        (
            "body length past the end",
            Box::new(|r| {
                // The body's length prefix follows the headers; claim one byte more than stored.
                let len_at = r.payload.len() - 1 - 1 - 12; // body "{...}" of 12 bytes, then None
                assert_eq!(r.payload[len_at], 12, "the body's length prefix");
                r.payload[len_at] = 13;
            }),
        ),
    ];
    let body12 = b"twelve bytes"; // the handler echoes it
    let first = runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| l)).await;
        let mut firsts = Vec::new();
        for i in 0..=variants.len() {
            let key = format!("bad-{i}");
            let h = [("idempotency-key", key.as_str()), ("x-echo", "1")];
            let first = post_whole(addr, &h, body12).await;
            assert_eq!(first.status, 201);
            firsts.push(first);
        }
        server.abort();
        firsts
    });
    let mut records = exported(&store);
    let mut damaged = Vec::new();
    for (i, (_, damage)) in variants.iter().enumerate() {
        let key = documented_store_key(None, format!("bad-{i}").as_bytes());
        let mut rec = V2::split(&records.remove(&key).expect("record"));
        damage(&mut rec);
        damaged.push((key, rec.join()));
    }
    let crc_key = documented_store_key(None, format!("bad-{}", variants.len()).as_bytes());
    let crc_rec = records.remove(&crc_key).expect("record");
    drop(store);

    let target = Scratch::new();
    {
        let other = target.open();
        import(&other, &damaged);
        import(&other, &[(crc_key.clone(), crc_rec.clone())]);
    }
    // The checksum: flipped in the database itself (the import refuses such a record).
    let mut flipped = crc_rec.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    target.poke_record(&crc_key, &flipped);

    let other = Arc::new(target.open());
    let app = Arc::new(Spec::default());
    let mut failures = Vec::new();
    runtime().block_on(async {
        let (addr, server) = serve(router(&other, &app, |l| l)).await;
        let names: Vec<&str> = variants
            .iter()
            .map(|(n, _)| *n)
            .chain(["checksum flipped"])
            .collect();
        for (i, what) in names.iter().enumerate() {
            let key = format!("bad-{i}");
            let h = [("idempotency-key", key.as_str()), ("x-echo", "1")];
            for round in 0..2 {
                match try_request(addr, "/orders", &h, Payload::Whole(body12.to_vec())).await {
                    Err(e) => failures.push(format!("{what} (try {round}): no answer: {e}")),
                    Ok(r) => {
                        let problem = r.status >= 500
                            && r.all("content-type") == [b"application/problem+json".to_vec()]
                            && r.problem_type().starts_with("urn:idemstore:problem:");
                        if !problem {
                            failures.push(format!(
                                "{what} (try {round}): {} {:?} replayed={} (first was {} {:?})",
                                r.status,
                                r.text(),
                                r.replayed(),
                                first[i].status,
                                first[i].text()
                            ));
                        }
                    }
                }
            }
        }
        server.abort();
    });
    assert_eq!(
        app.runs(),
        0,
        "the handler never ran again for a damaged record"
    );
    assert!(
        failures.is_empty(),
        "damaged records:\n{}",
        failures.join("\n")
    );
}

/// A duplicate that waits for the running first request (`Conflict::Wait`) gets the stored
/// response as the first caller got it (the replay built from the call's decoded value).
#[test]
fn a_waiting_duplicate_gets_the_first_callers_bytes() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| {
            l.on_conflict(Conflict::Wait(Duration::from_secs(20)))
        }))
        .await;
        let sizes = [2usize, 0, 700, 1];
        let chunks = sizes_header(&sizes);
        let h: Vec<(String, String)> = [
            ("idempotency-key", "wait-1"),
            ("x-chunks", chunks.as_str()),
            ("x-gate", "1"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let send = |h: Vec<(String, String)>| {
            tokio::spawn(async move {
                let h: Vec<(&str, &str)> =
                    h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                try_request(addr, "/orders", &h, Payload::Whole(b"{}".to_vec())).await
            })
        };
        let first = send(h.clone());
        wait_for("the first request's handler to start", || app.runs() == 1).await;
        let duplicate = send(h.clone());
        wait_for("the duplicate to wait", || store.stats().waits >= 1).await;
        app.gate.notify_one();
        let first = first.await.expect("task").expect("first answer");
        let duplicate = duplicate
            .await
            .expect("task")
            .expect("the duplicate's answer");
        assert_eq!(first.status, 201);
        assert!(first.body == pattern(&sizes));
        assert_replay_of(&first, &duplicate, "the duplicate that waited");
        let h: Vec<(&str, &str)> = h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let later = post_whole(addr, &h, b"{}").await;
        assert_replay_of(&first, &later, "a later retry");
        assert_eq!(app.runs(), 1);
        server.abort();
    });
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A response carrying many values of one replayed header (24 600 `Vary` values, all
/// allow-listed and stored) replays with all of them, by the fast first look and by a
/// duplicate that waited; never a panic (a 500 "store-panicked" or a dropped connection).
///
/// Breaks: `response::replay` sizes the replay's map with `HeaderMap::with_capacity(headers
/// .len() + 2)`, which panics ("size overflows MAX_SIZE") from 24 575 stored values on, though
/// the first response held them (extra values of one name are not bounded by MAX_SIZE). On the
/// first look the panic is caught (500 `store-panicked`); on the full call's replay
/// (`(Ok(stored), None) => stored.into_value().replay()` in `mod.rs`) it is not, and the
/// connection is dropped without an answer.
#[test]
fn a_response_with_25000_values_of_one_header_replays() {
    const VALUES: usize = 24_600;
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    runtime().block_on(async {
        let (addr, server) = serve(router(&store, &app, |l| {
            l.on_conflict(Conflict::Wait(Duration::from_secs(20)))
        }))
        .await;
        let count = VALUES.to_string();
        let h = [
            ("idempotency-key", "many-1"),
            ("x-vary", count.as_str()),
            ("x-plain", "1"),
            ("x-chunks", "5"),
        ];
        let first = post_whole(addr, &h, b"{}").await;
        assert_eq!((first.status, first.all("vary").len()), (201, VALUES));
        let again = post_whole(addr, &h, b"{}").await;
        let mut failures = Vec::new();
        if let Err(e) = std::panic::catch_unwind(|| {
            assert_replay_of(&first, &again, "a retry (the first look)")
        }) {
            failures.push(panic_text(e));
        }

        // The same through the full call: a duplicate that waited for the first.
        let h: Vec<(String, String)> = [
            ("idempotency-key", "many-2"),
            ("x-vary", count.as_str()),
            ("x-plain", "1"),
            ("x-gate", "1"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let send = |h: Vec<(String, String)>| {
            tokio::spawn(async move {
                let h: Vec<(&str, &str)> =
                    h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
                try_request(addr, "/orders", &h, Payload::Whole(b"{}".to_vec())).await
            })
        };
        let runs = app.runs();
        let waits = store.stats().waits;
        let first = send(h.clone());
        wait_for("the handler to start", || app.runs() == runs + 1).await;
        let duplicate = send(h);
        wait_for("the duplicate to wait", || store.stats().waits > waits).await;
        app.gate.notify_one();
        let first = first.await.expect("task").expect("first answer");
        let duplicate = duplicate.await.expect("task");
        match duplicate {
            Ok(d) => {
                if let Err(e) = std::panic::catch_unwind(|| {
                    assert_replay_of(&first, &d, "the duplicate that waited")
                }) {
                    failures.push(panic_text(e));
                }
            }
            Err(e) => failures.push(format!("the duplicate that waited got no answer: {e}")),
        }
        server.abort();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    });
}

fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// Metrics: a recorder local to this thread, a runtime on this thread.
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

#[derive(Default)]
struct Recorded {
    histograms: Mutex<HashMap<String, Arc<Samples>>>,
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl metrics::Recorder for Recorded {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut c = self.counters.lock().unwrap();
        metrics::Counter::from_arc(c.entry(key.name().to_owned()).or_default().clone())
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        let mut h = self.histograms.lock().unwrap();
        metrics::Histogram::from_arc(h.entry(key.name().to_owned()).or_default().clone())
    }
}

impl Recorded {
    fn samples(&self, name: &str) -> usize {
        self.histograms
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |s| s.0.lock().unwrap().len())
    }
}

/// Each replay answered by the layer's first look is timed as a replay (one sample each), the
/// run as a run, and a refusal (422) as neither; the store counts the replays.
#[test]
fn layer_replays_are_timed_and_counted_as_replays() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    let app = Arc::new(Spec::default());
    let recorder = Recorded::default();
    let replay_name = METRIC_NAMES.histograms[0].0;
    let run_name = METRIC_NAMES.histograms[1].0;
    let (replays_before, runs_before) = (recorder.samples(replay_name), recorder.samples(run_name));
    metrics::with_local_recorder(&recorder, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (addr, server) = serve(router(&store, &app, |l| l)).await;
            let h = [("idempotency-key", "timed-1"), ("x-chunks", "4,4")];
            let first = post_whole(addr, &h, b"{}").await;
            assert_eq!(first.status, 201);
            for _ in 0..3 {
                let again = post_whole(addr, &h, b"{}").await;
                assert_replay_of(&first, &again, "a timed replay");
            }
            let refused = post_whole(addr, &h, b"{\"other\":1}").await;
            assert_problem(&refused, 422, "another request with the key");
            server.abort();
        });
    });
    assert_eq!(app.runs(), 1);
    assert_eq!(store.stats().replays, 3, "three replays counted");
    assert_eq!(store.stats().fingerprint_mismatches, 1);
    assert_eq!(
        recorder.samples(replay_name) - replays_before,
        3,
        "{replay_name}: one sample per replay"
    );
    assert_eq!(
        recorder.samples(run_name) - runs_before,
        1,
        "{run_name}: one sample for the run"
    );
}
