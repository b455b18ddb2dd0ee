//! An order service over HTTP, made idempotent by the `Idempotency-Key` layer: axum on
//! 127.0.0.1, orders kept in the embedded store, the handler (which "charges" the customer)
//! run once per key whatever the client retries.
//!
//! `cargo run --example http_orders` starts the server, drives it with a real HTTP client
//! (a retry, twenty concurrent duplicates, a key reused for another order, a missing key),
//! checks every answer, prints what it saw and exits. `cargo run --example http_orders --
//! --serve` keeps serving and prints curl commands to try it by hand.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use idemstore::http::IdempotencyLayer;
use idemstore::Store;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Deserialize)]
struct NewOrder {
    sku: String,
    cents: u64,
}

#[derive(Debug, Serialize)]
struct Order {
    id: u64,
    sku: String,
    cents: u64,
    charge: String,
}

/// Charges made: the side effect that must happen once per key.
#[derive(Default)]
struct Payments {
    charges: AtomicU64,
}

async fn create_order(
    State(payments): State<Arc<Payments>>,
    Json(new): Json<NewOrder>,
) -> (StatusCode, HeaderMap, Json<Order>) {
    let id = payments.charges.fetch_add(1, Ordering::SeqCst) + 1;
    // A slow payment provider: duplicates arrive while this runs.
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let mut headers = HeaderMap::new();
    if let Ok(location) = format!("/orders/{id}").parse() {
        headers.insert("location", location);
    }
    let order = Order {
        id,
        charge: format!("ch_{id:04}"),
        sku: new.sku,
        cents: new.cents,
    };
    (StatusCode::CREATED, headers, Json(order))
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

async fn post_order(
    client: &Client,
    url: &str,
    key: Option<&str>,
    body: &str,
) -> (StatusCode, bool, String) {
    let mut request = axum::http::Request::post(url).header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("idempotency-key", format!("\"{key}\""));
    }
    let request = request
        .body(Full::new(Bytes::from(body.to_owned())))
        .expect("a valid request");
    let response = client.request(request).await.expect("the server answers");
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("a body")
        .to_bytes();
    (
        status,
        replayed,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serve = std::env::args().any(|a| a == "--serve");
    let dir = tempfile::tempdir()?;
    let store = Arc::new(Store::open(dir.path().join("orders-db"))?);
    let payments = Arc::new(Payments::default());
    let app = Router::new()
        .route("/orders", post(create_order))
        .layer(IdempotencyLayer::new(Arc::clone(&store)))
        .with_state(Arc::clone(&payments));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/orders", listener.local_addr()?);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    if serve {
        println!("serving {url} (Ctrl-C to stop); try:");
        println!("  curl -i -X POST {url} -H 'Idempotency-Key: \"order-1\"' -H 'content-type: application/json' -d '{{\"sku\":\"book\",\"cents\":1200}}'");
        println!("  (again: the same order, with Idempotent-Replayed: true; another body with that key: 422; no key: 400)");
        server.await??;
        return Ok(());
    }

    let client: Client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let book = r#"{"sku":"book","cents":1200}"#;

    let (status, replayed, first) = post_order(&client, &url, Some("order-1"), book).await;
    println!("first request:  {status} {first}");
    assert_eq!((status, replayed), (StatusCode::CREATED, false));
    let (status, replayed, retry) = post_order(&client, &url, Some("order-1"), book).await;
    println!("client retry:   {status} replayed={replayed} {retry}");
    assert_eq!(
        (status, replayed, &retry),
        (StatusCode::CREATED, true, &first)
    );

    // Twenty duplicates at once: one charge; the others get 409 (Retry-After) or the replay.
    let mut calls = Vec::new();
    for _ in 0..20 {
        let (client, url) = (client.clone(), url.clone());
        calls.push(tokio::spawn(async move {
            post_order(
                &client,
                &url,
                Some("order-2"),
                r#"{"sku":"lamp","cents":4500}"#,
            )
            .await
        }));
    }
    let (mut created, mut conflicts) = (0, 0);
    for call in calls {
        match call.await?.0 {
            StatusCode::CREATED => created += 1,
            StatusCode::CONFLICT => conflicts += 1,
            other => panic!("unexpected answer to a duplicate: {other}"),
        }
    }
    println!("20 duplicates:  {created} got the order, {conflicts} got 409 while it ran");

    let (status, _, problem) =
        post_order(&client, &url, Some("order-1"), r#"{"sku":"car","cents":1}"#).await;
    println!("key reused:     {status} {problem}");
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _, problem) = post_order(&client, &url, None, book).await;
    println!("no key:         {status} {problem}");
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let charges = payments.charges.load(Ordering::SeqCst);
    println!("charges made:   {charges} (one per key)");
    assert_eq!(charges, 2, "one charge per idempotency key");
    server.abort();
    Ok(())
}
