//! Adversarial tests, round 3: PostgreSQL lone claims, takeovers and outcomes that run in a
//! task of the engine's runtime (design §13 "Batching", §14 cancellation table, README
//! "Cancellation is part of the contract"). Need `IDEMSTORE_TEST_POSTGRES` (skipped, passing,
//! when unset).

mod common;

use common::pg::{hold_in_session, pg_url, PgSchema};
use idemstore::{ExecuteError, PgStore, StoreBuilder};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn open(schema: &PgSchema, pool: usize, lease: Duration, wait: Duration) -> PgStore {
    StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(wait)
        .open_postgres(schema.options().pool_size(pool).lease(lease))
        .expect("open")
}

fn rt(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// (state, lease ended?) of `key`'s row, if any.
fn row_of(schema: &PgSchema, key: &str) -> Option<(i16, bool)> {
    schema
        .sql(&format!(
            "SELECT state, coalesce(lease_until <= now(), true) FROM \"{{s}}\".records \
             WHERE key = '{key}'::bytea"
        ))
        .first()
        .map(|r| (r.get::<_, i16>(0), r.get::<_, bool>(1)))
}

/// README row "while the outcome's write is on its way": the record after is "the outcome,
/// once the write lands (... goes on after the drop); never overwritten by the drop", and the
/// next call "replays the outcome (or, if the write failed, the orphan policy)".
///
/// The drop of a call in `Writing` calls `Engine::interrupted`, which on PostgreSQL ends the
/// claim's lease at once (end_lease_now), in parallel with the outcome write that is still on
/// its way. Here the write is merely late (queued behind other statements of a one-connection
/// pool); its lease is ended first, another replica takes the key over as an orphan and runs
/// the operation a second time, and the outcome that then lands is fenced out. Nothing failed
/// but the drop's own lease ending.
#[test]
fn a_drop_while_writing_does_not_let_a_rerun_beat_the_landing_outcome() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    // Long leases: only an explicit end of the lease can make the key an orphan.
    let a = Arc::new(open(
        &schema,
        1,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ));
    let b = open(&schema, 4, Duration::from_secs(60), Duration::from_secs(2));
    schema.sql(
        "CREATE FUNCTION \"{s}\".slow() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN \
         IF TG_OP = 'UPDATE' AND NEW.state <> 0 AND position('slowout-'::bytea in NEW.key) = 1 \
           THEN PERFORM pg_sleep(3); \
         ELSIF TG_OP = 'INSERT' AND position('slowc-'::bytea in NEW.key) = 1 \
           THEN PERFORM pg_sleep(3); END IF; \
         RETURN NEW; END $$",
    );
    schema.sql(
        "CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON \"{s}\".records FOR EACH ROW \
         EXECUTE FUNCTION \"{s}\".slow()",
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let rt = rt(4);
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let w = {
        let (a, runs) = (Arc::clone(&a), Arc::clone(&runs));
        rt.spawn(async move {
            a.execute_once_async("w", move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                let _ = started_tx.send(());
                let _ = go_rx.await;
                Ok::<_, std::io::Error>("first".to_owned())
            })
            .await
        })
    };
    started_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("w runs");
    // An outcome in flight for 3 s on the only connection.
    let slow_out = {
        let a = Arc::clone(&a);
        rt.spawn(async move {
            a.execute_once_async("slowout-1", || async { Ok::<_, std::io::Error>(1u8) })
                .await
                .is_ok()
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    go_tx.send(()).unwrap();
    // w's outcome is queued behind it; its caller goes away.
    std::thread::sleep(Duration::from_millis(300));
    w.abort();
    let w_result = rt.block_on(w);
    assert!(
        w_result.is_err(),
        "w was dropped while its outcome was on its way"
    );
    std::thread::sleep(Duration::from_millis(100));
    // Other callers' claims (3 s each) wait for the connection too.
    let slow_claims: Vec<_> = (0..2)
        .map(|k| {
            let a = Arc::clone(&a);
            rt.spawn(async move {
                a.execute_once_async(format!("slowc-{k}"), || async {
                    Ok::<_, std::io::Error>(k)
                })
                .await
                .is_ok()
            })
        })
        .collect();
    // Another replica's caller retries w once its lease is seen ended (or its outcome landed).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut second: Option<String> = None;
    loop {
        match row_of(&schema, "w") {
            Some((0, true)) => {
                let r = b.execute_once("w", || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>("second".to_owned())
                });
                second = Some(match r {
                    Ok(o) => o.into_value(),
                    Err(e) => format!("error: {e}"),
                });
                break;
            }
            Some((0, false)) | None => {}
            Some(_) => break, // the outcome landed first
        }
        assert!(Instant::now() < deadline, "w's record never settled");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(rt.block_on(slow_out).unwrap());
    for c in slow_claims {
        assert!(rt.block_on(c).unwrap());
    }
    std::thread::sleep(Duration::from_secs(1));
    let stored = b
        .execute_once("w", || -> Result<String, std::io::Error> {
            panic!("w has an outcome")
        })
        .map(|o| o.into_value());
    assert_eq!(
        (
            runs.load(Ordering::SeqCst),
            stored.as_ref().ok().map(String::as_str)
        ),
        (1, Some("first")),
        "the dropped call's outcome was on its way, yet another replica's retry {second:?} \
         ran the operation again (the drop ended the lease before the write landed); \
         stored now: {stored:?}",
        stored = stored.as_ref().map_err(|e| e.to_string()),
    );
}

/// §13 fencing: "an outcome is fenced on each holder's exact Pending digest". A dropped
/// call's outcome write that goes on through a row lock must never overwrite a newer holder's
/// claim or outcome when it lands late: whichever lands first wins, and every later call sees
/// the same value as the call that won.
#[test]
fn a_late_detached_outcome_never_overwrites_a_newer_holder() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = Arc::new(open(
        &schema,
        2,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ));
    let b = open(&schema, 4, Duration::from_secs(60), Duration::from_secs(30));
    let rt = rt(2);
    for round in 0..4 {
        let key = format!("f-{round}");
        let (runs_a, runs_b) = (Arc::new(AtomicUsize::new(0)), AtomicUsize::new(0));
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
        let w = {
            let (a, runs_a, key) = (Arc::clone(&a), Arc::clone(&runs_a), key.clone());
            rt.spawn(async move {
                a.execute_once_async(&key, move || async move {
                    runs_a.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.send(());
                    let _ = go_rx.await;
                    Ok::<_, std::io::Error>("first".to_owned())
                })
                .await
            })
        };
        started_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("runs");
        // The holder is paused past its lease (as far as the database knows).
        a.__lapse_leases().unwrap();
        let session = hold_in_session(
            &url,
            format!(
                "BEGIN; SELECT 1 FROM \"{}\".records WHERE key = '{key}'::bytea FOR UPDATE",
                schema.name
            ),
            Duration::from_millis(1500 + 200 * round as u64),
        );
        go_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        w.abort();
        let _ = rt.block_on(w);
        // Another replica retries until it gets an answer.
        let deadline = Instant::now() + Duration::from_secs(30);
        let b_value = loop {
            let r = b.execute_once(&key, || {
                runs_b.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>("second".to_owned())
            });
            match r {
                Ok(o) => break o.into_value(),
                Err(ExecuteError::Store(e)) if Instant::now() < deadline => {
                    eprintln!("{key}: b retried after {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("{key}: {e}"),
            }
        };
        session.join().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        let stored = b
            .execute_once(&key, || -> Result<String, std::io::Error> {
                panic!("{key} has an outcome")
            })
            .expect("replay")
            .into_value();
        let (ra, rb) = (runs_a.load(Ordering::SeqCst), runs_b.load(Ordering::SeqCst));
        eprintln!("{key}: b got {b_value}, stored {stored}, runs a {ra} b {rb}");
        assert_eq!(ra, 1, "{key}");
        assert!(rb <= 1, "{key}: b ran {rb} times");
        assert_eq!(
            stored, b_value,
            "{key}: what b was told is not what is stored"
        );
        if rb == 1 {
            assert_eq!(
                stored, "second",
                "{key}: the late outcome overwrote the new holder"
            );
        } else {
            assert_eq!(stored, "first", "{key}");
        }
        assert_ne!(
            row_of(&schema, &key).map(|r| r.0),
            Some(0),
            "{key} still Pending"
        );
    }
}

/// §14: "So a key is never stuck until its TTL or a lease". Orphans (a holder in another store
/// paused past its lease) are taken over by async calls cancelled at many points (before,
/// while and after the takeover statement, while running, while writing). Within a few seconds
/// (leases are 60 s) no key is held, every key completes for a later caller, and the value a
/// later caller gets is the one stored.
#[test]
fn takeovers_dropped_at_random_points_leave_no_key_held() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = Arc::new(open(
        &schema,
        4,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ));
    let b = Arc::new(open(
        &schema,
        2,
        Duration::from_secs(60),
        Duration::from_secs(10),
    ));
    const KEYS: u64 = 48;
    let rt = rt(2);
    let started = Arc::new(AtomicUsize::new(0));
    let holders: Vec<_> = (0..KEYS)
        .map(|k| {
            let (a, started) = (Arc::clone(&a), Arc::clone(&started));
            rt.spawn(async move {
                let _ = a
                    .execute_once_async(format!("o-{k}"), move || async move {
                        started.fetch_add(1, Ordering::SeqCst);
                        std::future::pending::<()>().await;
                        Ok::<_, std::io::Error>(u64::MAX)
                    })
                    .await;
            })
        })
        .collect();
    common::wait_until("every holder runs", || {
        started.load(Ordering::SeqCst) == KEYS as usize
    });
    a.__lapse_leases().unwrap();
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    rt.block_on(async {
        for wave in 0..4u64 {
            let calls: Vec<_> = (0..KEYS)
                .map(|k| {
                    let (b, runs) = (Arc::clone(&b), Arc::clone(&runs));
                    tokio::spawn(async move {
                        let budget =
                            Duration::from_micros(200 + (k * 7919 + wave * 104_729) % 25_000);
                        let _ = tokio::time::timeout(
                            budget,
                            b.execute_once_async(format!("o-{k}"), move || async move {
                                runs[k as usize].fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_micros(k * 150)).await;
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
    });
    // The engine ends the leases of claims nobody runs within about a second (its last retry).
    std::thread::sleep(Duration::from_secs(4));
    let held: Vec<String> = schema
        .sql(
            "SELECT convert_from(key, 'UTF8') FROM \"{s}\".records \
             WHERE state = 0 AND lease_until > now()",
        )
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        held.is_empty(),
        "keys still held after their callers went: {held:?}"
    );
    rt.block_on(async {
        let later: Vec<_> = (0..KEYS)
            .map(|k| {
                let b = Arc::clone(&b);
                tokio::spawn(async move {
                    tokio::time::timeout(
                        Duration::from_secs(40),
                        b.execute_once_async(format!("o-{k}"), move || async move {
                            Ok::<_, std::io::Error>(k)
                        }),
                    )
                    .await
                })
            })
            .collect();
        for (k, l) in later.into_iter().enumerate() {
            let out = l.await.unwrap().unwrap_or_else(|_| panic!("o-{k} hung"));
            let out = out.unwrap_or_else(|e| panic!("o-{k}: {e}"));
            assert_eq!(out.into_value(), k as u64, "o-{k}");
        }
    });
    for h in holders {
        h.abort();
    }
    let total: usize = runs.iter().map(|r| r.load(Ordering::SeqCst)).sum();
    eprintln!("runs during cancelled takeovers: {total}");
}

/// §14 Writing row + README "on PostgreSQL it runs in a task of the engine's and goes on after
/// the drop": async calls dropped while their outcome writes wait on a row lock (1.5 s); the
/// outcomes land once the lock goes, and every later call (in another store) replays the
/// value, the operation having run once.
#[test]
fn outcomes_of_dropped_calls_land_through_a_row_lock_and_are_replayed() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = Arc::new(open(
        &schema,
        2,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ));
    const KEYS: usize = 6;
    let rt = rt(2);
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let started = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let calls: Vec<_> = (0..KEYS)
        .map(|k| {
            let (a, runs, started, mut go) = (
                Arc::clone(&a),
                Arc::clone(&runs),
                Arc::clone(&started),
                go_rx.clone(),
            );
            rt.spawn(async move {
                a.execute_once_async(format!("l-{k}"), move || async move {
                    runs[k].fetch_add(1, Ordering::SeqCst);
                    started.fetch_add(1, Ordering::SeqCst);
                    let _ = go.wait_for(|g| *g).await;
                    Ok::<_, std::io::Error>(format!("v{k}"))
                })
                .await
            })
        })
        .collect();
    common::wait_until("all run", || started.load(Ordering::SeqCst) == KEYS);
    let session = hold_in_session(
        &url,
        format!(
            "BEGIN; SELECT 1 FROM \"{}\".records WHERE position('l-'::bytea in key) = 1 FOR UPDATE",
            schema.name
        ),
        Duration::from_millis(1500),
    );
    go_tx.send(true).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for c in calls {
        c.abort();
        let _ = rt.block_on(c);
    }
    session.join().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let other = open(&schema, 2, Duration::from_secs(60), Duration::from_secs(10));
    let mut wrong = Vec::new();
    for k in 0..KEYS {
        let r = other.execute_once(format!("l-{k}"), || {
            runs[k].fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("rerun".to_owned())
        });
        let got = r.map(|o| o.into_value()).map_err(|e| e.to_string());
        if got != Ok(format!("v{k}")) || runs[k].load(Ordering::SeqCst) != 1 {
            wrong.push(format!(
                "l-{k}: {got:?}, runs {}",
                runs[k].load(Ordering::SeqCst)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "outcomes of dropped calls not replayed:\n{}",
        wrong.join("\n")
    );
}

/// Dropping (closing) a store while outcome writes of dropped calls are on their way (held by
/// a row lock) neither panics nor hangs; afterwards every key completes for a new store once
/// its lease (2 s) is over, with the value stored.
#[test]
fn a_store_dropped_with_detached_writes_in_flight_neither_hangs_nor_strands_keys() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = Arc::new(open(
        &schema,
        2,
        Duration::from_secs(2),
        Duration::from_secs(30),
    ));
    const KEYS: usize = 6;
    let rt = rt(2);
    let started = Arc::new(AtomicUsize::new(0));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let calls: Vec<_> = (0..KEYS)
        .map(|k| {
            let (a, started, mut go) = (Arc::clone(&a), Arc::clone(&started), go_rx.clone());
            rt.spawn(async move {
                a.execute_once_async(format!("d-{k}"), move || async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    let _ = go.wait_for(|g| *g).await;
                    Ok::<_, std::io::Error>(format!("v{k}"))
                })
                .await
            })
        })
        .collect();
    common::wait_until("all run", || started.load(Ordering::SeqCst) == KEYS);
    let session = hold_in_session(
        &url,
        format!(
            "BEGIN; SELECT 1 FROM \"{}\".records WHERE position('d-'::bytea in key) = 1 FOR UPDATE",
            schema.name
        ),
        Duration::from_millis(2500),
    );
    go_tx.send(true).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for c in calls {
        c.abort();
        let _ = rt.block_on(c);
    }
    // Drop the last handle of the store from inside the runtime.
    let t0 = Instant::now();
    let dropped = rt.block_on(async move {
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || drop(a)),
        )
        .await
    });
    let took = t0.elapsed();
    assert!(
        matches!(dropped, Ok(Ok(()))),
        "dropping the store panicked or hung: {dropped:?}"
    );
    eprintln!("store drop took {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "dropping the store took {took:?}"
    );
    session.join().unwrap();
    let other = open(&schema, 2, Duration::from_secs(2), Duration::from_secs(10));
    for k in 0..KEYS {
        let key = format!("d-{k}");
        let t = Instant::now();
        let got = other
            .execute_once(&key, || Ok::<_, std::io::Error>(format!("v{k}")))
            .unwrap_or_else(|e| panic!("{key}: {e}"))
            .into_value();
        assert_eq!(got, format!("v{k}"));
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{key} took {:?}",
            t.elapsed()
        );
    }
}

/// Sync callers with a tiny I/O timeout (300 ms): the outcome write times out for the caller
/// while a row lock holds it (600 ms), and goes on in the engine's task (whose own bound is
/// the same I/O timeout). Whatever landed, a later call within a few seconds replays one value
/// consistently, the operation running at most once per lease lapse, and no key is held
/// past its (2 s) lease.
#[test]
fn sync_calls_with_a_tiny_io_timeout_stay_consistent() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = Arc::new(
        StoreBuilder::default()
            .sweep_interval(None)
            .wait_timeout(Duration::from_secs(10))
            .open_postgres(
                schema
                    .options()
                    .pool_size(4)
                    .lease(Duration::from_secs(2))
                    .io_timeout(Duration::from_millis(300)),
            )
            .expect("open"),
    );
    const KEYS: usize = 8;
    let runs: Vec<AtomicUsize> = (0..KEYS).map(|_| AtomicUsize::new(0)).collect();
    let started = AtomicUsize::new(0);
    let go = std::sync::Barrier::new(KEYS + 1);
    let results: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..KEYS)
            .map(|k| {
                let (a, runs, started, go) = (&a, &runs, &started, &go);
                scope.spawn(move || {
                    a.execute_once(format!("s-{k}"), || {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        started.fetch_add(1, Ordering::SeqCst);
                        go.wait();
                        Ok::<_, std::io::Error>(format!("v{k}"))
                    })
                    .map(|o| o.into_value())
                    .map_err(|e| e.to_string())
                })
            })
            .collect();
        common::wait_until("all run", || started.load(Ordering::SeqCst) == KEYS);
        let session = hold_in_session(
            &url,
            format!(
                "BEGIN; SELECT 1 FROM \"{}\".records WHERE position('s-'::bytea in key) = 1 \
                 AND get_byte(key, 2) % 2 = 0 FOR UPDATE",
                schema.name
            ),
            Duration::from_millis(600),
        );
        go.wait();
        let r = calls.into_iter().map(|c| c.join().unwrap()).collect();
        session.join().unwrap();
        r
    });
    std::thread::sleep(Duration::from_secs(4));
    let mut wrong = Vec::new();
    for (k, first) in results.into_iter().enumerate() {
        let key = format!("s-{k}");
        let t = Instant::now();
        let later = a
            .execute_once(&key, || {
                runs[k].fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(format!("v{k}"))
            })
            .map(|o| o.into_value())
            .map_err(|e| e.to_string());
        let again = a
            .execute_once(&key, || -> Result<String, std::io::Error> {
                panic!("{key} has an outcome")
            })
            .map(|o| o.into_value())
            .map_err(|e| e.to_string());
        let n = runs[k].load(Ordering::SeqCst);
        eprintln!(
            "{key}: first {first:?}, later {later:?} in {:?}, runs {n}",
            t.elapsed()
        );
        if later != Ok(format!("v{k}")) || again != later {
            wrong.push(format!(
                "{key}: first {first:?}, later {later:?}, again {again:?}"
            ));
        }
        if first.is_ok() && n != 1 {
            wrong.push(format!("{key}: answered {first:?} yet ran {n} times"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
