//! Adversarial tests of the PostgreSQL engine's batching (docs/design.md §13 "Batching"):
//! a batch's failure (a lock wait, the server's statement timeout) spreading to callers whose own
//! statement would not have failed, renewals of batched claims, and batches whose connection
//! is terminated. Needs `IDEMSTORE_TEST_POSTGRES`.

mod common;

use common::pg::{hold_in_session, pg_url, uncommitted_rows, PgSchema};
use idemstore::{ExecuteError, StoreBuilder};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

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

/// §2: an absent key is claimed and run. §13: a batched claim keeps its one-row rules and a
/// batch fails only "as its own statement would have". A claim of a fresh key that nobody
/// holds must never come back `InProgress` because it was batched with another key whose
/// insert waits on another session's uncommitted row (lock_timeout -> Busy).
#[test]
fn a_fresh_key_is_never_in_progress_because_a_neighbour_in_its_batch_waits() {
    fresh_keys_beside_blocked_ones(None);
}

/// As above, with a server statement timeout shorter than the store's lock wait: the batch is
/// cancelled by the server (nothing of it written), and a fresh key in it must not hear of it.
#[test]
fn a_fresh_key_never_times_out_because_a_neighbour_in_its_batch_waits() {
    fresh_keys_beside_blocked_ones(Some(Duration::from_millis(200)));
}

fn fresh_keys_beside_blocked_ones(statement_timeout: Option<Duration>) {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let mut options = schema
        .options()
        .pool_size(16)
        .lease(Duration::from_secs(30));
    if let Some(limit) = statement_timeout {
        options = options.statement_timeout(limit);
    }
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::ZERO)
        .open_postgres(options)
        .expect("open");
    // Another session inserts (uncommitted) rows for the blocked keys and keeps them 3 s.
    const BLOCKED: usize = 8;
    let session = hold_in_session(
        &url,
        uncommitted_rows(&schema, (0..BLOCKED).map(|b| format!("blocked-{b}"))),
        Duration::from_millis(3000),
    );
    let t0 = Instant::now();
    let window = Duration::from_millis(2500);
    let wrong: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let free_calls = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for b in 0..BLOCKED {
            let store = &store;
            scope.spawn(move || {
                while t0.elapsed() < window {
                    let _ = store.execute_once(format!("blocked-{b}"), || {
                        Ok::<_, std::io::Error>("blocked ran".to_owned())
                    });
                }
            });
        }
        for t in 0..8usize {
            let (store, wrong, free_calls) = (&store, &wrong, &free_calls);
            scope.spawn(move || {
                let mut n = 0;
                while t0.elapsed() < window {
                    let key = format!("free-{t}-{n}");
                    n += 1;
                    free_calls.fetch_add(1, Ordering::SeqCst);
                    let out =
                        classify(store.execute_once(&key, || {
                            Ok::<_, std::io::Error>(format!("free {t} {n}"))
                        }));
                    if out.is_err() {
                        wrong.lock().unwrap().push(format!("{key}: {out:?}"));
                    }
                }
            });
        }
    });
    session.join().unwrap();
    let wrong = wrong.into_inner().unwrap();
    assert!(
        wrong.is_empty(),
        "{} of {} calls on fresh, unheld keys failed, e.g. {:?}",
        wrong.len(),
        free_calls.load(Ordering::SeqCst),
        &wrong[..wrong.len().min(5)]
    );
}

/// Batched claims are renewed by the heartbeat like one-row claims: with a 3 s lease and
/// operations running 5 s, another replica calling at 4 s finds every key held (never runs
/// it), and every holder's outcome is written.
#[test]
fn batched_claims_are_renewed_past_a_short_lease() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = |wait: Duration| {
        StoreBuilder::default()
            .sweep_interval(None)
            .wait_timeout(wait)
            .open_postgres(schema.options().pool_size(16).lease(Duration::from_secs(3)))
            .expect("open")
    };
    let (a, b) = (open(Duration::from_secs(30)), open(Duration::ZERO));
    const KEYS: usize = 24;
    let runs: Vec<AtomicUsize> = (0..KEYS).map(|_| AtomicUsize::new(0)).collect();
    let start = Barrier::new(KEYS);
    let results = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..KEYS)
            .map(|k| {
                let (a, runs, start) = (&a, &runs, &start);
                scope.spawn(move || {
                    start.wait();
                    classify(a.execute_once(format!("renew-{k}"), || {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_secs(5));
                        Ok::<_, std::io::Error>(format!("a{k}"))
                    }))
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(4000));
        for (k, ran) in runs.iter().enumerate() {
            let out = classify(b.execute_once(format!("renew-{k}"), || {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(format!("b{k}"))
            }));
            // Late holders (a slow machine) may already have finished: then a replay.
            assert!(
                out == Err("inprogress".into()) || out == Ok(format!("{:?}", format!("a{k}"))),
                "key {k}: the other replica got {out:?} while the holder ran"
            );
        }
        calls
            .into_iter()
            .map(|c| c.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (k, r) in results.into_iter().enumerate() {
        assert_eq!(r, Ok(format!("{:?}", format!("a{k}"))), "key {k}");
        assert_eq!(runs[k].load(Ordering::SeqCst), 1, "key {k} ran once");
    }
}

/// Batches whose connection is terminated mid-flight (pg_terminate_backend of the backends
/// running batched claims): every caller gets its own key's outcome or a typed storage error
/// (never another key's value, never a wrong "claimed"), and every outcome a caller was given
/// is the one later replays return, without running again.
#[test]
fn terminated_batches_give_typed_errors_and_never_a_wrong_answer() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(10))
        .open_postgres(
            schema
                .options()
                .pool_size(16)
                .lease(Duration::from_secs(30)),
        )
        .expect("open");
    let stop = AtomicBool::new(false);
    let killed = AtomicUsize::new(0);
    const THREADS: usize = 24;
    const PER: usize = 25;
    let runs: Vec<AtomicUsize> = (0..THREADS * PER).map(|_| AtomicUsize::new(0)).collect();
    let answers: Mutex<HashMap<usize, Result<String, String>>> = Mutex::new(HashMap::new());
    std::thread::scope(|scope| {
        {
            let (url, name, stop, killed) = (url.clone(), schema.name.clone(), &stop, &killed);
            scope.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                        .await
                        .unwrap();
                    tokio::spawn(conn);
                    let q = format!(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                         WHERE pid <> pg_backend_pid() AND state = 'active' \
                         AND query LIKE '%\"{name}\".records%unnest%'"
                    );
                    while !stop.load(Ordering::SeqCst) {
                        if let Ok(rows) = client.query(q.as_str(), &[]).await {
                            let n: i64 = rows[0].get(0);
                            killed.fetch_add(n as usize, Ordering::SeqCst);
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                });
            });
        }
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let (store, runs, answers) = (&store, &runs, &answers);
                scope.spawn(move || {
                    for i in 0..PER {
                        let k = t * PER + i;
                        let out = classify(store.execute_once(format!("kill-{k}"), || {
                            runs[k].fetch_add(1, Ordering::SeqCst);
                            Ok::<_, std::io::Error>(format!("value {k}"))
                        }));
                        answers.lock().unwrap().insert(k, out);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::SeqCst);
    });
    eprintln!("terminated {} backends", killed.load(Ordering::SeqCst));
    let answers = answers.into_inner().unwrap();
    let mut errors = HashMap::<String, usize>::new();
    for (k, out) in &answers {
        match out {
            Ok(v) => assert_eq!(v, &format!("{:?}", format!("value {k}")), "key {k}"),
            Err(e) => {
                assert!(e.starts_with("storage:"), "key {k}: untyped answer {e}");
                *errors.entry(e.clone()).or_default() += 1;
            }
        }
    }
    eprintln!("errors: {errors:?}");
    // Replays: a key whose caller got its outcome replays it and never runs again.
    let replayer = StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(10))
        .open_postgres(schema.options().lease(Duration::from_secs(30)))
        .expect("open");
    for (k, out) in &answers {
        if let Ok(v) = out {
            let before = runs[*k].load(Ordering::SeqCst);
            let again = classify(replayer.execute_once(format!("kill-{k}"), || {
                runs[*k].fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(format!("again {k}"))
            }));
            assert_eq!(&again, &Ok(v.clone()), "key {k} replays its outcome");
            assert_eq!(runs[*k].load(Ordering::SeqCst), before, "key {k} ran again");
            assert_eq!(before, 1, "key {k}: its caller got an outcome of one run");
        }
    }
}

/// §13/§14: a caller dropped while its claim is queued behind slow statements (the batch is
/// sent only after the driver's own retries of `end_lease` are over) must not leave its key
/// held: the batch that claims for it ends that claim's lease at once.
#[test]
fn claims_queued_behind_slow_statements_and_dropped_leave_no_running_lease() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = std::sync::Arc::new(
        StoreBuilder::default()
            .sweep_interval(None)
            .wait_timeout(Duration::from_secs(10))
            .open_postgres(
                schema
                    .options()
                    .pool_size(16)
                    .lease(Duration::from_secs(30)),
            )
            .expect("open"),
    );
    // Inserts of the "slow-" keys take 2.5 s each.
    schema.sql(
        "CREATE FUNCTION \"{s}\".slow() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN IF position('slow-'::bytea in NEW.key) = 1 THEN PERFORM pg_sleep(2.5); END IF; \
         RETURN NEW; END $$",
    );
    schema.sql(
        "CREATE TRIGGER slow BEFORE INSERT ON \"{s}\".records FOR EACH ROW \
         EXECUTE FUNCTION \"{s}\".slow()",
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dropped = runtime.block_on(async {
        let slow: Vec<_> = (0..4)
            .map(|k| {
                let store = std::sync::Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .execute_once_async(format!("slow-{k}"), || async move {
                            Ok::<_, std::io::Error>(k)
                        })
                        .await
                        .is_ok()
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queued: Vec<_> = (0..20)
            .map(|k| {
                let store = std::sync::Arc::clone(&store);
                tokio::spawn(async move {
                    tokio::time::timeout(
                        Duration::from_millis(100),
                        store.execute_once_async(format!("queued-{k}"), || async move {
                            Ok::<_, std::io::Error>(k)
                        }),
                    )
                    .await
                    .is_err()
                })
            })
            .collect();
        let mut dropped = 0;
        for q in queued {
            dropped += q.await.unwrap() as usize;
        }
        for s in slow {
            assert!(s.await.unwrap(), "a slow call completes");
        }
        dropped
    });
    assert!(dropped > 0, "some queued calls were dropped");
    // Well past the slow statements and the batch that follows them, well under the lease.
    std::thread::sleep(Duration::from_secs(3));
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
        "{dropped} calls were dropped; keys still held with a running lease: {held:?}"
    );
}
