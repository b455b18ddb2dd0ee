//! Adversarial tests, round 2: PostgreSQL batching (design §13 "Batching": outcome batches on a
//! tiny pool, re-sent claims whose caller went away, reads of near-identical keys, notify of
//! batched outcomes, cancellations) and the HTTP layer's store key and fingerprint (§15).
//! PostgreSQL tests need `IDEMSTORE_TEST_POSTGRES` (skipped, passing, when unset).

mod common;

use axum::http::{HeaderName, Method, StatusCode};
use axum::routing::post;
use axum::Router;
use common::http::{client, counted_create, runtime, send, send_method, serve, App};
use common::pg::{hold_in_session, pg_url, raw_session, uncommitted_rows, PgSchema};
use common::Scratch;
use idemstore::http::IdempotencyLayer;
use idemstore::{ExecuteError, PgStore, StoreBuilder};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

/// A request variant: its label, method, path, headers and body.
type Variant<'a> = (String, Method, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>);

fn classify<T: std::fmt::Debug, E: std::fmt::Display>(
    r: Result<idemstore::Outcome<T>, ExecuteError<E>>,
) -> Result<String, String> {
    match r {
        Ok(o) => Ok(format!("{:?}", o.into_value())),
        Err(ExecuteError::Store(idemstore::Error::InProgress { .. })) => Err("inprogress".into()),
        Err(ExecuteError::Store(idemstore::Error::LeaseLost { .. })) => Err("leaselost".into()),
        Err(ExecuteError::Store(idemstore::Error::Storage(e))) => {
            Err(format!("storage:{:?}", e.kind()))
        }
        Err(e) => Err(format!("other: {e}")),
    }
}

fn tenant_of(head: &axum::http::request::Parts) -> Option<String> {
    // "x-account: =acme" is tenant "acme", "x-account: =" the empty tenant; no header: none.
    head.headers
        .get("x-account")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix('=').map(String::from))
}

fn order_of(body: &[u8]) -> u64 {
    let v: serde_json::Value = serde_json::from_slice(body).expect("json body");
    v["order"].as_u64().expect("order")
}

// ---------------------------------------------------------------------------------------
// HTTP layer: store key
// ---------------------------------------------------------------------------------------

/// §15: every store key of the layer is 37 bytes, whatever the pair; "a store's
/// `max_key_bytes` must be at least 37 ..., and below that every keyed request gets a 500
/// problem saying so". At 37 every valid key (and tenant) runs; at 36 none does, each is
/// refused with the `store-key-limit` problem, and the handler never runs.
#[test]
fn every_valid_key_fits_37_bytes_and_a_smaller_limit_is_a_clear_error() {
    let mut wrong = Vec::new();
    for limit in [37usize, 36] {
        let scratch = Scratch::new();
        let store = Arc::new(scratch.builder().max_key_bytes(limit).open().expect("open"));
        runtime().block_on(async {
            let app = Arc::new(App::default());
            let router = Router::new()
                .route("/orders", post(counted_create))
                .layer(IdempotencyLayer::new(Arc::clone(&store)).tenant(tenant_of))
                .with_state(Arc::clone(&app));
            let (addr, server) = serve(router).await;
            let client = client();
            for (key, account) in [
                ("k".to_owned(), None),
                ("k".repeat(40), None),
                ("k".to_owned(), Some("=acme")),
                ("k".repeat(255), Some("=acme")),
            ] {
                let mut headers = vec![("idempotency-key", key.as_str())];
                if let Some(a) = account {
                    headers.push(("x-account", a));
                }
                let r = send(&client, addr, "/orders", &headers, b"{}").await;
                let body = String::from_utf8_lossy(&r.body).into_owned();
                let ok = if limit >= 37 {
                    r.status == StatusCode::CREATED
                } else {
                    r.status == StatusCode::INTERNAL_SERVER_ERROR
                        && body.contains("urn:idemstore:problem:store-key-limit")
                };
                if !ok {
                    wrong.push(format!(
                        "max_key_bytes {limit}, key of {} chars, tenant {account:?}: {} {body}",
                        key.len(),
                        r.status,
                    ));
                }
            }
            if limit < 37 {
                assert_eq!(
                    app.runs.load(Ordering::SeqCst),
                    0,
                    "no handler runs when no record can be kept"
                );
            }
            server.abort();
        });
    }
    assert!(wrong.is_empty(), "wrong answers:\n{}", wrong.join("\n"));
}

/// §13/§15 + README table: "a finished request's key, same request -> the stored status ...
/// with Idempotent-Replayed" (the handler runs once). Two replicas of one service share a
/// PostgreSQL database; their stores differ only in `max_key_bytes` (a rolling config change:
/// 64 on the old replica, 256 on the new). A retry of a request with an 80-character key that
/// reaches the other replica must replay, not run the handler again: the store key depends on
/// the (tenant, key) pair only, never on a store setting.
#[test]
fn replicas_with_different_max_key_bytes_agree_on_a_request_s_key() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = |limit: usize| -> Arc<PgStore> {
        Arc::new(
            StoreBuilder::default()
                .sweep_interval(None)
                .max_key_bytes(limit)
                .open_postgres(schema.options().lease(Duration::from_secs(30)))
                .expect("open"),
        )
    };
    let (old, new) = (open(64), open(256));
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let router = |store: &Arc<PgStore>| {
            Router::new()
                .route("/orders", post(counted_create))
                .layer(IdempotencyLayer::new(Arc::clone(store)).tenant(tenant_of))
                .with_state(Arc::clone(&app))
        };
        let (a, sa) = serve(router(&old)).await;
        let (b, sb) = serve(router(&new)).await;
        let client = client();
        let key = "r".repeat(80);
        let headers = [("idempotency-key", key.as_str()), ("x-account", "=acme")];
        let first = send(&client, a, "/orders", &headers, b"{\"n\":1}").await;
        assert_eq!(first.status, StatusCode::CREATED, "the first request runs");
        let retry = send(&client, b, "/orders", &headers, b"{\"n\":1}").await;
        sa.abort();
        sb.abort();
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            1,
            "the retry on the other replica ran the handler again (status {}, replayed {}, body {})",
            retry.status,
            retry.replayed(),
            String::from_utf8_lossy(&retry.body)
        );
        assert!(retry.replayed() && retry.body == first.body);
    });
}

/// §15: "tenants never share a key". Every distinct (tenant, key) pair (no tenant, the empty
/// tenant, tenants that are prefixes of each other and of keys, short keys and long ones, on
/// a store with `max_key_bytes` 48) runs its own handler once and replays its own response.
#[test]
fn store_keys_never_meet_across_tenants() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.builder().max_key_bytes(48).open().expect("open"));
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let router = Router::new()
            .route("/orders", post(counted_create))
            .layer(IdempotencyLayer::new(Arc::clone(&store)).tenant(tenant_of))
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();
        let tenants: [Option<&str>; 6] =
            [None, Some(""), Some("k"), Some("kk"), Some("a"), Some("ak")];
        let mut keys: Vec<String> = Vec::new();
        for n in [1usize, 2, 3, 25, 26, 27, 33, 34, 35, 42, 43, 100, 255] {
            keys.push("k".repeat(n));
        }
        keys.push("ak".into());
        keys.push("kak".into());
        let mut orders: HashMap<(Option<&str>, String), Vec<u8>> = HashMap::new();
        let mut seen = HashSet::new();
        for t in tenants {
            for k in &keys {
                let account = t.map(|t| format!("={t}"));
                let mut headers = vec![("idempotency-key", k.as_str())];
                if let Some(a) = &account {
                    headers.push(("x-account", a.as_str()));
                }
                let r = send(&client, addr, "/orders", &headers, b"{}").await;
                assert_eq!(
                    r.status,
                    StatusCode::CREATED,
                    "tenant {t:?} key {}",
                    k.len()
                );
                assert!(
                    !r.replayed(),
                    "tenant {t:?} key of {} chars replayed another pair's response {}",
                    k.len(),
                    String::from_utf8_lossy(&r.body)
                );
                assert!(seen.insert(order_of(&r.body)));
                orders.insert((t, k.clone()), r.body.to_vec());
            }
        }
        let runs = app.runs.load(Ordering::SeqCst) as usize;
        assert_eq!(runs, tenants.len() * keys.len());
        for ((t, k), body) in &orders {
            let account = t.map(|t| format!("={t}"));
            let mut headers = vec![("idempotency-key", k.as_str())];
            if let Some(a) = &account {
                headers.push(("x-account", a.as_str()));
            }
            let r = send(&client, addr, "/orders", &headers, b"{}").await;
            assert!(r.replayed(), "tenant {t:?} key {} replays", k.len());
            assert_eq!(
                &r.body.to_vec(),
                body,
                "tenant {t:?} key {} replays its own",
                k.len()
            );
        }
        assert_eq!(
            app.runs.load(Ordering::SeqCst) as usize,
            runs,
            "no run on replays"
        );
        server.abort();
    });
}

// ---------------------------------------------------------------------------------------
// HTTP layer: fingerprint
// ---------------------------------------------------------------------------------------

/// README table: "a finished request's key, different method, path, query, body (or
/// configured headers) -> 422", and the same request replays; with bodies on both sides of
/// the 1024-byte gathering threshold.
#[test]
fn every_fingerprint_difference_is_422_and_the_same_request_replays() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    runtime().block_on(async {
        let app = Arc::new(App::default());
        let layer = IdempotencyLayer::new(Arc::clone(&store))
            .fingerprint_headers([HeaderName::from_static("x-variant")]);
        let router = Router::new()
            .route("/orders", post(counted_create).patch(counted_create))
            .route("/orders2", post(counted_create))
            .layer(layer)
            .with_state(Arc::clone(&app));
        let (addr, server) = serve(router).await;
        let client = client();
        let mut wrong = Vec::new();
        for (i, len) in [0usize, 5, 1016, 1023, 1024, 1025, 1031, 5000]
            .into_iter()
            .enumerate()
        {
            let key = format!("fp-{i}");
            let body: Vec<u8> = (0..len).map(|j| (j % 251) as u8).collect();
            let base = |extra: &'static [(&'static str, &'static str)]| {
                let mut h: Vec<(&str, &str)> =
                    vec![("idempotency-key", key.as_str()), ("x-variant", "a")];
                h.extend_from_slice(extra);
                h
            };
            let first = send(&client, addr, "/orders?x=1", &base(&[]), &body).await;
            assert_eq!(first.status, StatusCode::CREATED, "len {len}");
            let again = send(&client, addr, "/orders?x=1", &base(&[]), &body).await;
            if !(again.replayed() && again.body == first.body) {
                wrong.push(format!(
                    "len {len}: same request not replayed: {}",
                    again.status
                ));
            }
            let mut changed_last = body.clone();
            if let Some(b) = changed_last.last_mut() {
                *b ^= 1;
            }
            let mut longer = body.clone();
            longer.push(0);
            let shorter = body[..len.saturating_sub(1)].to_vec();
            let mut variants: Vec<Variant> = vec![
                (
                    "method".into(),
                    Method::PATCH,
                    "/orders?x=1",
                    base(&[]),
                    body.clone(),
                ),
                (
                    "path".into(),
                    Method::POST,
                    "/orders2?x=1",
                    base(&[]),
                    body.clone(),
                ),
                (
                    "query".into(),
                    Method::POST,
                    "/orders?x=2",
                    base(&[]),
                    body.clone(),
                ),
                (
                    "no query".into(),
                    Method::POST,
                    "/orders",
                    base(&[]),
                    body.clone(),
                ),
                (
                    "body+1".into(),
                    Method::POST,
                    "/orders?x=1",
                    base(&[]),
                    longer,
                ),
                (
                    "header twice".into(),
                    Method::POST,
                    "/orders?x=1",
                    base(&[("x-variant", "a")]),
                    body.clone(),
                ),
                (
                    "header value".into(),
                    Method::POST,
                    "/orders?x=1",
                    vec![("idempotency-key", key.as_str()), ("x-variant", "b")],
                    body.clone(),
                ),
                (
                    "no header".into(),
                    Method::POST,
                    "/orders?x=1",
                    vec![("idempotency-key", key.as_str())],
                    body.clone(),
                ),
            ];
            if len > 0 {
                variants.push((
                    "last byte".into(),
                    Method::POST,
                    "/orders?x=1",
                    base(&[]),
                    changed_last,
                ));
                variants.push((
                    "body-1".into(),
                    Method::POST,
                    "/orders?x=1",
                    base(&[]),
                    shorter,
                ));
            }
            for (what, method, path, headers, body) in variants {
                let r = send_method(&client, method, addr, path, &headers, &body).await;
                if r.status != StatusCode::UNPROCESSABLE_ENTITY {
                    wrong.push(format!(
                        "len {len}: {what}: {} (replayed {})",
                        r.status,
                        r.replayed()
                    ));
                }
            }
        }
        server.abort();
        assert_eq!(
            app.runs.load(Ordering::SeqCst),
            8,
            "one run per key; {wrong:?}"
        );
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    });
}

// ---------------------------------------------------------------------------------------
// PostgreSQL batching
// ---------------------------------------------------------------------------------------

fn pg_open(schema: &PgSchema, pool: usize, wait: Duration) -> PgStore {
    StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(wait)
        .open_postgres(
            schema
                .options()
                .pool_size(pool)
                .lease(Duration::from_secs(30)),
        )
        .expect("open")
}

/// §13: "an outcome is fenced on each holder's exact Pending digest", also when outcomes
/// batch. With a one-connection pool every outcome made while another is on its way is
/// batched: holders finishing at once, half of them taken over by another replica, get
/// `LeaseLost` exactly for those, and every other outcome is written.
#[test]
fn outcomes_batched_on_a_one_connection_pool_are_fenced_holder_by_holder() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let holder = pg_open(&schema, 1, Duration::from_secs(30));
    let taker = pg_open(&schema, 4, Duration::from_secs(30));
    const KEYS: usize = 24;
    let started = AtomicUsize::new(0);
    let go = Barrier::new(KEYS + 1);
    let results: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..KEYS)
            .map(|k| {
                let (holder, started, go) = (&holder, &started, &go);
                scope.spawn(move || {
                    classify(holder.execute_once(format!("f1-{k:02}"), || {
                        started.fetch_add(1, Ordering::SeqCst);
                        go.wait();
                        Ok::<_, std::io::Error>(format!("holder {k}"))
                    }))
                })
            })
            .collect();
        while started.load(Ordering::SeqCst) < KEYS {
            std::thread::sleep(Duration::from_millis(10));
        }
        schema.sql(
            "UPDATE \"{s}\".records SET lease_until = now() - interval '1 millisecond' \
             WHERE state = 0 AND get_byte(key, length(key) - 1) % 2 = 0",
        );
        for k in (0..KEYS).filter(|k| k % 2 == 0) {
            let out = taker
                .execute_once(format!("f1-{k:02}"), || {
                    Ok::<_, std::io::Error>(format!("taker {k}"))
                })
                .expect("the taker runs the lapsed key");
            assert_eq!(out.into_value(), format!("taker {k}"));
        }
        go.wait();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (k, result) in results.into_iter().enumerate() {
        let key = format!("f1-{k:02}");
        let stored = taker
            .execute_once(&key, || -> Result<String, std::io::Error> {
                panic!("{key} has an outcome")
            })
            .expect("replay")
            .into_value();
        if k % 2 == 0 {
            assert_eq!(result, Err("leaselost".to_owned()), "{key}");
            assert_eq!(stored, format!("taker {k}"), "{key}");
        } else {
            assert_eq!(result, Ok(format!("{:?}", format!("holder {k}"))), "{key}");
            assert_eq!(stored, format!("holder {k}"), "{key}");
        }
    }
}

/// §13 "Waiting": "a holder whose record was marked sends NOTIFY after its outcome". With a
/// one-connection pool the holders' outcomes are batched; every key another replica marked
/// as waited for must be notified (a LISTEN session of the test's own counts the payloads).
#[test]
fn batched_outcomes_notify_every_waited_key() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let holder = pg_open(&schema, 1, Duration::from_secs(30));
    let waiter = pg_open(&schema, 8, Duration::from_secs(30));
    const KEYS: usize = 12;
    let keys: Vec<String> = (0..KEYS).map(|k| format!("nt-{k:02}")).collect();
    // The test's own listener.
    let (note_tx, note_rx) = mpsc::channel::<String>();
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = {
        let (url, channel, stop) = (
            url.clone(),
            format!("idemstore.{}", schema.name),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, mut conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let driver = tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                let _ = note_tx.send(n.payload().to_owned());
                            }
                            Some(Ok(_)) => {}
                            _ => break,
                        }
                    }
                });
                client
                    .batch_execute(&format!("LISTEN \"{channel}\""))
                    .await
                    .unwrap();
                let _ = ready_tx.send(());
                while !stop.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                drop(client);
                let _ = driver.await;
            });
        })
    };
    ready_rx.recv().unwrap();
    let started = AtomicUsize::new(0);
    let go = Barrier::new(KEYS + 1);
    std::thread::scope(|scope| {
        let holders: Vec<_> = keys
            .iter()
            .map(|key| {
                let (holder, started, go) = (&holder, &started, &go);
                scope.spawn(move || {
                    classify(holder.execute_once(key, || {
                        started.fetch_add(1, Ordering::SeqCst);
                        go.wait();
                        Ok::<_, std::io::Error>(format!("v {key}"))
                    }))
                })
            })
            .collect();
        while started.load(Ordering::SeqCst) < KEYS {
            std::thread::sleep(Duration::from_millis(10));
        }
        let waiters: Vec<_> = keys
            .iter()
            .map(|key| {
                let waiter = &waiter;
                scope.spawn(move || {
                    classify(
                        waiter
                            .execute_once(key, || Ok::<_, std::io::Error>("waiter ran".to_owned())),
                    )
                })
            })
            .collect();
        let t0 = Instant::now();
        loop {
            let marked: i64 =
                schema.sql("SELECT count(*) FROM \"{s}\".records WHERE waiters")[0].get(0);
            if marked as usize == KEYS {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "waiters marked: {marked}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        go.wait();
        for (h, key) in holders.into_iter().zip(&keys) {
            assert_eq!(h.join().unwrap(), Ok(format!("{:?}", format!("v {key}"))));
        }
        for (w, key) in waiters.into_iter().zip(&keys) {
            assert_eq!(w.join().unwrap(), Ok(format!("{:?}", format!("v {key}"))));
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    listener.join().unwrap();
    let notes: HashSet<String> = note_rx.try_iter().collect();
    let tag = |key: &str| -> String {
        let mut h = blake3::Hasher::new();
        h.update(&0u64.to_le_bytes());
        h.update(key.as_bytes());
        h.finalize().as_bytes()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let missing: Vec<&String> = keys.iter().filter(|k| !notes.contains(&tag(k))).collect();
    assert!(
        missing.is_empty(),
        "waited keys never notified: {missing:?} ({} notifications: {notes:?})",
        notes.len()
    );
}

/// §13: "a read answers from its own key's row". Keys that differ only by trailing NULs,
/// prefixes and single bytes, replayed by a crowd so reads batch (8 in flight): each caller
/// gets its own key's value.
#[test]
fn batched_reads_of_near_identical_keys_answer_each_its_own() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = pg_open(&schema, 16, Duration::from_secs(10));
    let keys: Vec<Vec<u8>> = vec![
        b"a".to_vec(),
        b"a\0".to_vec(),
        b"a\0\0".to_vec(),
        b"a\x01".to_vec(),
        b"ab".to_vec(),
        b"\0".to_vec(),
        b"\0\0".to_vec(),
        b"\xff".to_vec(),
        b"\xff\0".to_vec(),
        b"A".to_vec(),
        b"a ".to_vec(),
        b" a".to_vec(),
    ];
    for (i, k) in keys.iter().enumerate() {
        store
            .execute_once(k, || Ok::<_, std::io::Error>(i as u64))
            .expect("first run");
    }
    let wrong: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for t in 0..24usize {
            let (store, keys, wrong) = (&store, &keys, &wrong);
            scope.spawn(move || {
                for round in 0..30usize {
                    let i = (t * 7 + round * 5) % keys.len();
                    match store
                        .execute_once(&keys[i], || -> Result<u64, std::io::Error> { Ok(9999) })
                    {
                        Ok(o) => {
                            let replayed = o.is_replayed();
                            let v = o.into_value();
                            if !(replayed && v == i as u64) {
                                wrong
                                    .lock()
                                    .unwrap()
                                    .push(format!("key {:?}: {v} replayed {replayed}", keys[i]));
                            }
                        }
                        Err(e) => wrong
                            .lock()
                            .unwrap()
                            .push(format!("key {:?}: {e}", keys[i])),
                    }
                }
            });
        }
    });
    let wrong = wrong.into_inner().unwrap();
    assert!(
        wrong.is_empty(),
        "{} wrong answers: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(8)]
    );
}

/// §13: "A batch the server gives up (a row lock held by another transaction ...) is sent
/// again request by request" and "A caller dropped while its request is queued does not stop
/// the batch: if the batch then claims for it, the engine ends that claim's lease at once".
/// Here the claim is made by the *re-sent* statement: four slow claims (5 s inserts) fill the
/// claims in flight, fresh "slow-" claims (2 s inserts) queue beside a blocked key and their
/// callers are dropped; the batch gives up on the blocked key's lock, each request goes again
/// alone, and the fresh claims commit ~2 s later, long after the driver's own `end_lease`
/// retries (0, 0.5, 1.5 s after the drop) are over. Their leases must be ended by the batcher.
#[test]
fn a_resent_claim_whose_caller_dropped_has_its_lease_ended() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = Arc::new(pg_open(&schema, 16, Duration::ZERO));
    schema.sql(
        "CREATE FUNCTION \"{s}\".slow() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN \
         IF position('aslow-'::bytea in NEW.key) = 1 THEN PERFORM pg_sleep(5); \
         ELSIF position('slow-'::bytea in NEW.key) = 1 THEN PERFORM pg_sleep(2); END IF; \
         RETURN NEW; END $$",
    );
    schema.sql(
        "CREATE TRIGGER slow BEFORE INSERT ON \"{s}\".records FOR EACH ROW \
         EXECUTE FUNCTION \"{s}\".slow()",
    );
    // Another session holds uncommitted rows for "blocked-" keys for 10 s.
    let session = hold_in_session(
        &url,
        uncommitted_rows(&schema, (0..4).map(|b| format!("blocked-{b}"))),
        Duration::from_secs(10),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dropped = rt.block_on(async {
        // Four claims in flight for 5 s: every claim made meanwhile queues.
        let aslow: Vec<_> = (0..4)
            .map(|k| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .execute_once_async(format!("aslow-{k}"), || async move {
                            Ok::<_, std::io::Error>(k)
                        })
                        .await
                        .is_ok()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        // Blocked keys queue (not dropped) ...
        let blocked: Vec<_> = (0..4)
            .map(|k| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let _ = store
                        .execute_once_async(format!("blocked-{k}"), || async move {
                            Ok::<_, std::io::Error>(k)
                        })
                        .await;
                })
            })
            .collect();
        // ... beside fresh keys whose callers give up while queued.
        let fresh: Vec<_> = (0..8)
            .map(|k| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    tokio::time::timeout(
                        Duration::from_millis(200),
                        store.execute_once_async(format!("slow-{k}"), || async move {
                            Ok::<_, std::io::Error>(k)
                        }),
                    )
                    .await
                    .is_err()
                })
            })
            .collect();
        let mut dropped = 0;
        for f in fresh {
            dropped += f.await.unwrap() as usize;
        }
        for a in aslow {
            assert!(a.await.unwrap(), "a slow call completes");
        }
        for b in blocked {
            b.await.unwrap();
        }
        dropped
    });
    assert_eq!(dropped, 8, "every fresh call was dropped while queued");
    // Past the batch (5 s), its lock wait and the re-sent 2 s inserts; well under the lease.
    std::thread::sleep(Duration::from_secs(4));
    session.join().unwrap();
    let claimed: i64 = schema
        .sql("SELECT count(*) FROM \"{s}\".records WHERE position('slow-'::bytea in key) = 1")[0]
        .get(0);
    let held: Vec<String> = schema
        .sql(
            "SELECT convert_from(key, 'UTF8') FROM \"{s}\".records \
             WHERE state = 0 AND lease_until > now() AND position('slow-'::bytea in key) = 1",
        )
        .iter()
        .map(|r| r.get(0))
        .collect();
    eprintln!("slow- rows: {claimed}");
    assert!(
        held.is_empty(),
        "dropped callers' re-sent claims still hold their keys: {held:?} ({claimed} claimed)"
    );
}

/// §13: a batch of outcomes beside a row another session has locked (FOR UPDATE, 1.5 s) is
/// given up by the server and sent again request by request: every holder's outcome is
/// written (the locked one once the lock goes), each ran once, none hears LeaseLost or an
/// error. Pool of 2: outcomes batch.
#[test]
fn outcomes_batched_beside_a_locked_row_are_all_written_once() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let holder = pg_open(&schema, 2, Duration::from_secs(30));
    const KEYS: usize = 16;
    let runs: Vec<AtomicUsize> = (0..KEYS).map(|_| AtomicUsize::new(0)).collect();
    let started = AtomicUsize::new(0);
    let go = Barrier::new(KEYS + 1);
    let results: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..KEYS)
            .map(|k| {
                let (holder, started, go, runs) = (&holder, &started, &go, &runs);
                scope.spawn(move || {
                    classify(holder.execute_once(format!("lk-{k:02}"), || {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        started.fetch_add(1, Ordering::SeqCst);
                        go.wait();
                        Ok::<_, std::io::Error>(format!("v{k}"))
                    }))
                })
            })
            .collect();
        while started.load(Ordering::SeqCst) < KEYS {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (tx, rx) = mpsc::channel();
        let session = {
            let (url, name) = (url.clone(), schema.name.clone());
            std::thread::spawn(move || {
                raw_session(
                    url,
                    vec![
                        (
                            format!(
                                "BEGIN; SELECT 1 FROM \"{name}\".records WHERE key IN \
                                 ('lk-03'::bytea, 'lk-09'::bytea) FOR UPDATE"
                            ),
                            Duration::from_millis(1500),
                        ),
                        ("COMMIT".into(), Duration::ZERO),
                    ],
                    tx,
                )
            })
        };
        assert_eq!(rx.recv().unwrap(), 0);
        go.wait();
        let r = calls.into_iter().map(|c| c.join().unwrap()).collect();
        session.join().unwrap();
        r
    });
    let replayer = pg_open(&schema, 4, Duration::from_secs(10));
    for (k, r) in results.into_iter().enumerate() {
        assert_eq!(r, Ok(format!("{:?}", format!("v{k}"))), "lk-{k:02}");
        assert_eq!(runs[k].load(Ordering::SeqCst), 1, "lk-{k:02} ran once");
        let stored = replayer
            .execute_once(
                format!("lk-{k:02}"),
                || -> Result<String, std::io::Error> { panic!("has an outcome") },
            )
            .expect("replay")
            .into_value();
        assert_eq!(stored, format!("v{k}"));
    }
}

/// §13 invariants: "a caller that is dropped never strands the others". Async calls on a
/// one-connection pool (outcomes batch), cancelled at many points while claims, reads and
/// outcomes are queued; afterwards fresh calls and replays all complete (no caller hangs
/// behind a lost place in flight) and every completed key has one run.
#[test]
fn cancelled_calls_on_a_tiny_pool_never_strand_later_callers() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = Arc::new(pg_open(&schema, 1, Duration::from_secs(10)));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..96).map(|_| AtomicUsize::new(0)).collect());
    rt.block_on(async {
        for wave in 0..3u64 {
            let calls: Vec<_> = (0..96u64)
                .map(|k| {
                    let (store, runs) = (Arc::clone(&store), Arc::clone(&runs));
                    tokio::spawn(async move {
                        let budget = Duration::from_micros(100 + (k * 7919 + wave * 104729) % 8000);
                        let _ = tokio::time::timeout(
                            budget,
                            store.execute_once_async(format!("cx-{k}"), move || async move {
                                runs[k as usize].fetch_add(1, Ordering::SeqCst);
                                Ok::<_, std::io::Error>(k)
                            }),
                        )
                        .await;
                    })
                })
                .collect();
            for c in calls {
                c.await.unwrap();
            }
        }
        // Later callers: every key completes, well within a generous bound.
        let later: Vec<_> = (0..96u64)
            .map(|k| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    tokio::time::timeout(
                        Duration::from_secs(60),
                        store.execute_once_async(format!("cx-{k}"), move || async move {
                            Ok::<_, std::io::Error>(k)
                        }),
                    )
                    .await
                })
            })
            .collect();
        for (k, l) in later.into_iter().enumerate() {
            let out = l.await.unwrap().unwrap_or_else(|_| panic!("cx-{k} hung"));
            let out = out.unwrap_or_else(|e| panic!("cx-{k}: {e}"));
            assert_eq!(out.into_value(), k as u64);
        }
        let fresh: Vec<_> = (0..32u64)
            .map(|k| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    tokio::time::timeout(
                        Duration::from_secs(60),
                        store.execute_once_async(format!("after-{k}"), move || async move {
                            Ok::<_, std::io::Error>(k)
                        }),
                    )
                    .await
                })
            })
            .collect();
        for (k, f) in fresh.into_iter().enumerate() {
            let out = f
                .await
                .unwrap()
                .unwrap_or_else(|_| panic!("after-{k} hung"));
            assert_eq!(out.expect("fresh call").into_value(), k as u64);
        }
    });
    let ran: usize = runs.iter().map(|r| r.load(Ordering::SeqCst)).sum();
    eprintln!("runs during the cancelled waves: {ran}");
}
