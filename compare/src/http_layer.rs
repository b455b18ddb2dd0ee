//! The HTTP layer against the bare handler, on the replay path, over loopback with a real
//! load generator (`wrk`).
//!
//! Invariants:
//! - the server runs in this process, on a tokio runtime of its own with [`WORKERS`] workers,
//!   on 127.0.0.1 at a port the system picks; `POST /bare` and `POST /idem` run the same
//!   handler (it reads the request body, as a handler of a POST does, and answers 201 with a
//!   small JSON body; a bare handler that never reads the body lets hyper skip the body
//!   channel the layer must use, a cost of reading the request, not of idempotency), `/idem` behind `IdempotencyLayer` with its defaults
//!   on a sled store in the measurement's directory. Both rows start the same server the same
//!   way and differ in the path wrk asks for only;
//! - the load is `wrk` as a child process, [`WRK_THREADS`] threads over [`CONNECTIONS`]
//!   connections, for the window rounded up to whole seconds (wrk takes no fractions), with
//!   the same script ([`SCRIPT`], `compare/wrk/replay.lua`) against either path: POST,
//!   [`BODY`], `Idempotency-Key:` [`KEY`] (which `/bare` ignores);
//! - every `/idem` request of a window is a replay: before wrk starts, one request with the
//!   same method, path, body and key records it (checked: 201, and the handler ran once);
//!   after the window the handler has still run once, and wrk saw no answer outside 2xx
//!   (both checked);
//! - [`Cores::Shared`]: wrk and the server share this machine's cores, a figure is what the
//!   pair sustains. There every microsecond the server spends is amplified: when it answers
//!   later, wrk's threads run out of requests, sleep, and preempt the server when they wake
//!   (measured with the layer: 0.69 context switches per request against 0.26 bare).
//!   [`Cores::Split`]: the server (one worker) on CPU 0, wrk (one thread) on CPU 1, so a
//!   figure is what one server core sustains. A figure compares only with the other path's
//!   figure under the same placement;
//! - a measurement that breaks one of these is broken, not a figure: it panics saying what
//!   broke. Without wrk the rows are skipped with a note ([`wrk_missing`], before the plan).

use axum::extract::State;
use axum::http::{header, HeaderName, StatusCode};
use axum::routing::post;
use axum::Router;
use idemstore::http::IdempotencyLayer;
use idemstore::Store;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Workers of the server's runtime: this machine's cores.
const WORKERS: usize = 2;

/// wrk's threads and connections.
const WRK_THREADS: usize = 2;
pub const CONNECTIONS: usize = 64;

/// The wrk script: POST with the body and key passed after `--`.
const SCRIPT: &str = include_str!("../wrk/replay.lua");

/// Every request's body and `Idempotency-Key` (a structured-field string).
const BODY: &str = r#"{"sku":"book-1984","quantity":1}"#;
const KEY: &str = "\"bench-1\"";

/// The handler's answer: a small JSON body.
const ORDER: &str = r#"{"order":"ord_1N8vJkLq2eZvKYlo","status":"created"}"#;

/// Where the server and the load generator run.
#[derive(Clone, Copy)]
pub enum Cores {
    /// Both on every core, scheduled by the system.
    Shared,
    /// The server on CPU 0 with one worker, wrk on CPU 1 with one thread.
    Split,
}

impl Cores {
    /// Server workers and wrk threads.
    fn threads(self) -> (usize, usize) {
        match self {
            Cores::Shared => (WORKERS, WRK_THREADS),
            Cores::Split => (1, 1),
        }
    }
}

/// Pins the calling thread to `cpu`; false if the system refused (a machine with one CPU).
/// It allocates nothing, so a forked child may call it before exec.
fn set_affinity(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes within it for cpu < 1024,
    // and sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Pins the calling thread to `cpu`; a failure is reported and the thread runs where the
/// system puts it.
fn pin_to(cpu: usize) {
    if !set_affinity(cpu) {
        eprintln!(
            "  (could not pin a thread to CPU {cpu}: {})",
            std::io::Error::last_os_error()
        );
    }
}

/// Which path a window loads.
#[derive(Clone, Copy)]
pub enum Route {
    /// The handler alone.
    Bare,
    /// The handler behind the layer.
    Idem,
}

impl Route {
    fn path(self) -> &'static str {
        match self {
            Route::Bare => "/bare",
            Route::Idem => "/idem",
        }
    }
}

/// Why wrk cannot run here, or None when it can.
pub fn wrk_missing() -> Option<String> {
    match Command::new("wrk").arg("-v").output() {
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}

/// The handler of both paths: reads the order it is sent (as any handler of a POST does),
/// counts its runs, answers 201 with [`ORDER`].
async fn order(
    State(runs): State<Arc<AtomicU64>>,
    body: axum::body::Bytes,
) -> (StatusCode, [(HeaderName, &'static str); 1], &'static str) {
    assert_eq!(body.len(), BODY.len(), "the handler gets the whole order");
    runs.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        ORDER,
    )
}

/// The server of one measurement; stopped when dropped (its runtime cancels the
/// connections' tasks, and a replay leaves nothing on the blocking pool to wait for).
struct Server {
    /// Runs the server; dropping it stops it.
    _runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    /// Runs of the handler behind the layer.
    idem_runs: Arc<AtomicU64>,
}

impl Server {
    /// Serves `/bare` and `/idem` (on a store in `dir`) on 127.0.0.1.
    fn start(dir: &Path, cores: Cores) -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores.threads().0)
            .on_thread_start(move || {
                if let Cores::Split = cores {
                    pin_to(0)
                }
            })
            .thread_name("compare-http")
            .enable_all()
            .build()
            // Invariant: a runtime that cannot start its threads is a broken measurement.
            .expect("a tokio runtime with two workers starts");
        let store = Store::builder(dir.join("http"))
            .open()
            .expect("a store opens in a fresh directory");
        let idem_runs = Arc::new(AtomicU64::new(0));
        let router = Router::new()
            .route("/bare", post(order).with_state(Arc::new(AtomicU64::new(0))))
            .route(
                "/idem",
                post(order)
                    .with_state(Arc::clone(&idem_runs))
                    .layer(IdempotencyLayer::new(Arc::new(store))),
            );
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port is free");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        runtime.spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("  (the HTTP server stopped: {e})");
            }
        });
        Server {
            _runtime: runtime,
            addr,
            idem_runs,
        }
    }

    /// Records [`KEY`] on `/idem` with the request wrk will repeat; panics unless it ran.
    fn record_key(&self) {
        let request = format!(
            "POST /idem HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Idempotency-Key: {KEY}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
            self.addr,
            BODY.len()
        );
        let mut answer = String::new();
        TcpStream::connect(self.addr)
            .and_then(|mut stream| {
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.write_all(request.as_bytes())?;
                stream.read_to_string(&mut answer)
            })
            .expect("the server answers the recording request");
        let status = answer.lines().next().unwrap_or_default();
        assert!(
            status.starts_with("HTTP/1.1 201"),
            "the recording request got `{status}`, not 201"
        );
        assert_eq!(self.runs(), 1, "the recording request ran the handler");
    }

    fn runs(&self) -> u64 {
        self.idem_runs.load(Ordering::Relaxed)
    }
}

/// What wrk reported of a window.
struct Report {
    requests_per_sec: f64,
    /// Answers outside 2xx and 3xx.
    not_2xx: u64,
    /// wrk's socket error line, if it had one.
    socket_errors: Option<String>,
}

/// Runs wrk against `route` of the server at `addr` for `secs` (rounded up to whole seconds).
fn run_wrk(dir: &Path, addr: SocketAddr, route: Route, cores: Cores, secs: f64) -> Report {
    let script = dir.join("replay.lua");
    std::fs::write(&script, SCRIPT).expect("the wrk script is written in a fresh directory");
    let mut wrk = Command::new("wrk");
    if let Cores::Split = cores {
        // SAFETY: the closure runs in the forked child before exec and only makes one
        // system call, allocating nothing. If the system refuses, wrk runs unpinned.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut wrk, || {
                let _ = set_affinity(1);
                Ok(())
            });
        }
    }
    let out = wrk
        .arg(format!("-t{}", cores.threads().1))
        .arg(format!("-c{CONNECTIONS}"))
        .arg(format!("-d{}s", secs.ceil().max(1.0)))
        .arg("-s")
        .arg(&script)
        .arg(format!("http://{addr}{}", route.path()))
        .args(["--", BODY, KEY])
        .output()
        .expect("wrk starts (it answered before the plan)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_wrk(&stdout).unwrap_or_else(|| panic!("wrk's report has no Requests/sec: {stdout}"))
}

/// The figures of wrk's report; None without a `Requests/sec` line.
fn parse_wrk(stdout: &str) -> Option<Report> {
    let value = |label: &str| {
        stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(str::trim)
    };
    Some(Report {
        requests_per_sec: value("Requests/sec:")?.parse().ok()?,
        not_2xx: value("Non-2xx or 3xx responses:").map_or(Some(0), |v| v.parse().ok())?,
        socket_errors: value("Socket errors:").map(String::from),
    })
}

/// Requests per second wrk sustains on `route`, every `/idem` request a replay.
pub fn replay(dir: &Path, route: Route, cores: Cores, secs: f64) -> f64 {
    let server = Server::start(dir, cores);
    server.record_key();
    let report = run_wrk(dir, server.addr, route, cores, secs);
    assert_eq!(server.runs(), 1, "every request of the window was a replay");
    assert_eq!(report.not_2xx, 0, "every answer of the window was 2xx");
    if let Some(errors) = report.socket_errors {
        eprintln!("  (wrk socket errors: {errors})");
    }
    report.requests_per_sec
}
