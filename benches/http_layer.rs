//! Criterion bench of the HTTP layer's replay path in process (no sockets): the same axum
//! handler bare and behind `IdempotencyLayer`, every layered request a replay. What it adds
//! per request is the difference of the two; the loopback figures with a load generator are
//! in `compare/` (`--only http`).

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::routing::post;
use axum::Router;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http_body_util::BodyExt;
use idemstore::http::IdempotencyLayer;
use idemstore::Store;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;
use tower_service::Service;

const BODY: &str = r#"{"sku":"book-1984","quantity":1}"#;
const ORDER: &str = r#"{"order":"ord_1N8vJkLq2eZvKYlo","status":"created"}"#;

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

fn request(path: &str) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", "\"bench-1\"")
        .body(Body::from(BODY))
        .unwrap()
}

/// Sends one request and reads its whole answer; returns its status.
async fn send(router: &mut Router, path: &str) -> StatusCode {
    let response = router.call(request(path)).await.unwrap();
    let status = response.status();
    black_box(response.into_body().collect().await.unwrap().to_bytes());
    status
}

fn replay(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::builder(dir.path().join("db"))
        .sweep_interval(None)
        .open()
        .unwrap();
    let mut router = Router::new().route("/bare", post(order)).route(
        "/idem",
        post(order).layer(IdempotencyLayer::new(Arc::new(store))),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(send(&mut router, "/idem")), StatusCode::CREATED);
    let mut g = c.benchmark_group("http replay");
    g.throughput(Throughput::Elements(1));
    for path in ["/bare", "/idem"] {
        g.bench_function(path.trim_start_matches('/'), |b| {
            b.iter(|| assert_eq!(rt.block_on(send(&mut router, path)), StatusCode::CREATED))
        });
    }
    // Both cores at once, as a server's workers run: what sharing the store costs.
    let workers = 2;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    for path in ["/bare", "/idem"] {
        let name = format!("{} on {workers} workers", path.trim_start_matches('/'));
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let per_task = iters.div_ceil(workers as u64);
                let start = Instant::now();
                rt.block_on(async {
                    let tasks: Vec<_> = (0..workers)
                        .map(|_| {
                            let mut router = router.clone();
                            tokio::spawn(async move {
                                for _ in 0..per_task {
                                    assert_eq!(send(&mut router, path).await, StatusCode::CREATED);
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, replay);
criterion_main!(benches);
