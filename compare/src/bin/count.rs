//! Instructions per operation, counted by callgrind: the replay paths whose wall-clock
//! figures this shared machine makes too noisy to compare in small steps.
//!
//! `cargo run --release -p idemstore-compare --bin count` runs itself under `valgrind
//! --tool=callgrind` twice per operation, with N and 2N operations after the same set-up, and
//! prints the difference of the two totals divided by N: the set-up, the start and the exit
//! cancel out. Only the main thread counts, where every operation runs (a current-thread
//! runtime for the async ones): under callgrind's one-at-a-time scheduling a background
//! thread spinning on a lock would otherwise add a count that depends on the schedule, and
//! `--fair-sched=yes` keeps such a spinner from starving the thread it waits for.
//!
//! Invariants: each operation is checked as it runs (a replay that runs its operation, or a
//! status other than 201, panics), so a count is never of a broken path; without valgrind it
//! says so and exits non-zero.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use idemstore::http::IdempotencyLayer;
use idemstore::Store;
use std::hint::black_box;
use std::process::Command;
use std::sync::Arc;
use tower_service::Service;

const BODY: &str = r#"{"sku":"book-1984","quantity":1}"#;
const ORDER: &str = r#"{"order":"ord_1N8vJkLq2eZvKYlo","status":"created"}"#;

/// Operations counted, by name.
const OPERATIONS: [&str; 8] = [
    "HTTP request, bare handler",
    "HTTP request, replayed by the layer",
    "store replay, small",
    "store replay, async, small",
    "raw sled get, small",
    "raw sled get + bincode decode, small",
    "HTTP GET passed through by the layer",
    "HTTP GET, bare handler",
];

/// Operations per run: the second run makes twice as many.
const N: u64 = 2000;

async fn order() -> (
    StatusCode,
    [(header::HeaderName, &'static str); 1],
    &'static str,
) {
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json")],
        ORDER,
    )
}

/// Sends one request (a POST with a key, or a GET to `/pass` and `/bare-get`) and reads its
/// whole answer, which must be 201.
async fn send(router: &mut Router, path: &str) {
    let request = match path {
        "/pass" | "/bare-get" => Request::get(path).body(Body::empty()),
        _ => Request::post(path)
            .header(header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", "\"count-1\"")
            .body(Body::from(BODY)),
    }
    .expect("a request");
    let response = router.call(request).await.expect("an answer");
    assert_eq!(response.status(), StatusCode::CREATED, "{path}");
    black_box(response.into_body().collect().await.expect("a body"));
}

/// Runs `operation` `n` times after its set-up (in this process, under callgrind).
fn run(operation: usize, n: u64) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::builder(dir.path().join("db"))
        .sweep_interval(None)
        .open()
        .expect("a store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let fail = || -> Result<String, std::io::Error> { panic!("a replay ran its operation") };
    match operation {
        0 | 1 | 6 | 7 => {
            // Each route gets its state before its layer, as in the wrk comparison's server:
            // a handler still waiting for its state is made into a service again on every
            // request (and a layer over it applied again), which would be counted here.
            let mut router = Router::new()
                .route("/bare", post(order).with_state(()))
                .route("/bare-get", get(order).with_state(()))
                .route(
                    "/idem",
                    post(order)
                        .with_state(())
                        .layer(IdempotencyLayer::new(Arc::new(store))),
                )
                .route(
                    "/pass",
                    get(order)
                        .with_state(())
                        .layer(IdempotencyLayer::new(Arc::new(
                            Store::builder(dir.path().join("db-pass"))
                                .sweep_interval(None)
                                .open()
                                .expect("a store"),
                        ))),
                );
            let path = match operation {
                0 => "/bare",
                1 => "/idem",
                6 => "/pass",
                _ => "/bare-get",
            };
            rt.block_on(async {
                send(&mut router, path).await;
                for _ in 0..n {
                    send(&mut router, path).await;
                }
            });
        }
        2 => {
            store
                .execute_once("order-1", || Ok::<_, std::io::Error>(ORDER.to_owned()))
                .expect("recorded");
            for _ in 0..n {
                let out = store.execute_once("order-1", fail).expect("replayed");
                assert!(out.is_replayed());
                black_box(out);
            }
        }
        3 => {
            store
                .execute_once("order-1", || Ok::<_, std::io::Error>(ORDER.to_owned()))
                .expect("recorded");
            // One runtime entry for the whole loop, as a service's task makes many calls.
            rt.block_on(async {
                for _ in 0..n {
                    let out = store
                        .execute_once_async("order-1", || async { fail() })
                        .await
                        .expect("replayed");
                    assert!(out.is_replayed());
                    black_box(out);
                }
            });
        }
        4 | 5 => {
            let db = sled::open(dir.path().join("raw")).expect("a sled db");
            let config = bincode::config::standard();
            let value = bincode::serde::encode_to_vec(ORDER, config).expect("encodes");
            db.insert("order-1", value).expect("inserted");
            for _ in 0..n {
                let got = db.get("order-1").expect("read").expect("present");
                if operation == 5 {
                    let (order, _): (String, usize) =
                        bincode::serde::decode_from_slice(&got, config).expect("decodes");
                    assert_eq!(order.len(), ORDER.len());
                    black_box(order);
                }
                black_box(got);
            }
        }
        _ => unreachable!("operations are numbered from OPERATIONS"),
    }
}

/// Instructions of the main thread in one callgrind run of `operation` repeated `n` times.
fn count(operation: usize, n: u64) -> u64 {
    let dir = tempfile::tempdir().expect("a temp dir");
    let out = dir.path().join("callgrind");
    let status = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--quiet",
            "--separate-threads=yes",
            "--fair-sched=yes",
        ])
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(std::env::current_exe().expect("this program's path"))
        .args(["--inner", &operation.to_string(), &n.to_string()])
        .status()
        .expect("valgrind runs (install it: apt-get install valgrind)");
    assert!(status.success(), "the counted run failed: {status}");
    // Thread 1 is the main thread.
    let text = std::fs::read_to_string(dir.path().join("callgrind-01"))
        .expect("callgrind's output for the main thread");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary: ")
                .or_else(|| l.strip_prefix("totals: "))
        })
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .expect("callgrind's output has a total")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, operation, n] = args.as_slice() {
        if flag == "--inner" {
            run(
                operation.parse().expect("an operation"),
                n.parse().expect("a count"),
            );
            return;
        }
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed: apt-get install valgrind");
        std::process::exit(2);
    }
    println!("instructions per operation (callgrind, main thread, ({N} x 2) - {N} operations)");
    for (i, name) in OPERATIONS.iter().enumerate() {
        let (once, twice) = (count(i, N), count(i, 2 * N));
        println!("{:>8}  {name}", twice.saturating_sub(once) / N);
    }
}
