//! Crowds on the PostgreSQL engine, which sends the claims, outcomes and reads of callers that
//! arrive while others of their kind are on their way as one statement: the contract holds
//! for every caller of a batch as it does for a lone caller. Needs `IDEMSTORE_TEST_POSTGRES`.

mod common;

use common::pg::{pg_url, PgSchema};
use idemstore::{ExecuteError, StoreBuilder};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Two replicas, 24 threads each, every thread calling every key in its own order: each key's
/// operation runs once, and every caller gets that run's outcome.
#[test]
fn a_crowd_on_shared_keys_runs_each_key_once_across_two_replicas() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = || {
        StoreBuilder::default()
            .sweep_interval(None)
            .wait_timeout(Duration::from_secs(30))
            .open_postgres(schema.options().pool_size(16))
            .expect("open")
    };
    let replicas = [open(), open()];
    const KEYS: usize = 60;
    let runs: Vec<AtomicUsize> = (0..KEYS).map(|_| AtomicUsize::new(0)).collect();
    let seen: Mutex<HashMap<usize, Vec<String>>> = Mutex::new(HashMap::new());
    std::thread::scope(|scope| {
        for (r, store) in replicas.iter().enumerate() {
            for t in 0..24usize {
                let (runs, seen) = (&runs, &seen);
                scope.spawn(move || {
                    for i in 0..KEYS {
                        let k = (i * 7 + t * 13 + r * 29) % KEYS;
                        let out = store
                            .execute_once(format!("crowd-{k}"), || {
                                runs[k].fetch_add(1, Ordering::SeqCst);
                                Ok::<_, std::io::Error>(format!("{k} by {r}/{t}"))
                            })
                            .expect("every call gets the outcome");
                        seen.lock()
                            .unwrap()
                            .entry(k)
                            .or_default()
                            .push(out.into_value());
                    }
                });
            }
        }
    });
    for (k, n) in runs.iter().enumerate() {
        assert_eq!(n.load(Ordering::SeqCst), 1, "key {k} ran once");
    }
    for (k, values) in seen.into_inner().unwrap() {
        assert_eq!(values.len(), 48, "key {k}: every caller answered");
        assert!(
            values
                .iter()
                .all(|v| v == &values[0] && v.starts_with(&format!("{k} by "))),
            "key {k}: every caller got the one run's outcome: {values:?}"
        );
    }
}

/// Replays from many threads at once each get their own key's outcome, never a neighbour's
/// from the same batch.
#[test]
fn a_crowd_of_replays_reads_each_key_s_own_outcome() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(schema.options().pool_size(16))
        .expect("open");
    const KEYS: usize = 200;
    for k in 0..KEYS {
        store
            .execute_once(format!("replay-{k}"), || {
                Ok::<_, std::io::Error>(format!("value {k}"))
            })
            .expect("a new key runs");
    }
    std::thread::scope(|scope| {
        for t in 0..32usize {
            let store = &store;
            scope.spawn(move || {
                for i in 0..KEYS {
                    let k = (i * 11 + t * 17) % KEYS;
                    let out = store
                        .execute_once(
                            format!("replay-{k}"),
                            || -> Result<String, std::io::Error> {
                                panic!("a completed key must not run again")
                            },
                        )
                        .expect("a completed key replays");
                    assert!(out.is_replayed());
                    assert_eq!(out.into_value(), format!("value {k}"));
                }
            });
        }
    });
}

/// Holders finishing together, some of them taken over meanwhile by another replica: each
/// taken-over holder's outcome is refused (`LeaseLost`) and the taker's stays; every other
/// holder's outcome is written.
#[test]
fn a_crowd_of_outcomes_is_fenced_holder_by_holder() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = |wait: Duration| {
        StoreBuilder::default()
            .sweep_interval(None)
            .wait_timeout(wait)
            .open_postgres(
                schema
                    .options()
                    .pool_size(16)
                    .lease(Duration::from_secs(30)),
            )
            .expect("open")
    };
    let (holder, taker) = (open(Duration::from_secs(30)), open(Duration::from_secs(30)));
    const KEYS: usize = 24;
    let started = AtomicUsize::new(0);
    // Every holder waits here for the takeovers, then all finish at once.
    let go = std::sync::Barrier::new(KEYS + 1);
    let results: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..KEYS)
            .map(|k| {
                let (holder, started, go) = (&holder, &started, &go);
                scope.spawn(move || {
                    let out = holder.execute_once(format!("fenced-{k}"), || {
                        started.fetch_add(1, Ordering::SeqCst);
                        go.wait();
                        Ok::<_, std::io::Error>(format!("holder {k}"))
                    });
                    match out {
                        Ok(o) => Ok(o.into_value()),
                        Err(ExecuteError::Store(idemstore::Error::LeaseLost { .. })) => {
                            Err("lease lost".to_owned())
                        }
                        Err(e) => Err(format!("unexpected: {e}")),
                    }
                })
            })
            .collect();
        while started.load(Ordering::SeqCst) < KEYS {
            std::thread::sleep(Duration::from_millis(10));
        }
        // The even keys' holders are as if paused past their leases: another replica takes
        // those keys over and records its own outcome.
        schema.sql(
            "UPDATE \"{s}\".records SET lease_until = now() - interval '1 millisecond' \
             WHERE state = 0 AND get_byte(key, length(key) - 1) % 2 = 0",
        );
        // (A key's last byte is its number's last digit: even keys are the even numbers.)
        for k in (0..KEYS).filter(|k| k % 2 == 0) {
            let key = format!("fenced-{k}");
            let out = taker
                .execute_once(key, || Ok::<_, std::io::Error>(format!("taker {k}")))
                .expect("the taker runs the lapsed key");
            assert_eq!(out.into_value(), format!("taker {k}"));
        }
        go.wait();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (k, result) in results.into_iter().enumerate() {
        let key = format!("fenced-{k}");
        let taken = k % 2 == 0;
        let stored = taker
            .execute_once(&key, || -> Result<String, std::io::Error> {
                panic!("{key} has an outcome")
            })
            .expect("replay")
            .into_value();
        if taken {
            assert_eq!(result, Err("lease lost".to_owned()), "{key}");
            assert_eq!(stored, format!("taker {k}"), "{key}");
        } else {
            assert_eq!(result, Ok(format!("holder {k}")), "{key}");
            assert_eq!(stored, format!("holder {k}"), "{key}");
        }
    }
}

/// Async calls dropped at random points in a crowd (while queued for a batch, while their
/// claim is on its way, while running) leave no key held: another replica gets every key's
/// outcome, running it where needed, well within its wait budget and long before the lease
/// (30 s) would run out.
#[test]
fn async_calls_dropped_in_a_crowd_leave_no_key_held() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = |wait: Duration| {
        StoreBuilder::default()
            .sweep_interval(None)
            .wait_timeout(wait)
            .open_postgres(schema.options().pool_size(8).lease(Duration::from_secs(30)))
            .expect("open")
    };
    let dropping = std::sync::Arc::new(open(Duration::from_secs(5)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    const KEYS: u64 = 64;
    let dropped: Vec<bool> = runtime.block_on(async {
        let calls: Vec<_> = (0..KEYS)
            .map(|k| {
                let dropping = std::sync::Arc::clone(&dropping);
                tokio::spawn(async move {
                    let budget = Duration::from_micros(200 + (k * 7919) % 6000);
                    tokio::time::timeout(
                        budget,
                        dropping.execute_once_async(format!("dropped-{k}"), || async move {
                            tokio::time::sleep(Duration::from_millis(3)).await;
                            Ok::<_, std::io::Error>(format!("first {k}"))
                        }),
                    )
                    .await
                    .is_err()
                })
            })
            .collect();
        let mut dropped = Vec::new();
        for call in calls {
            dropped.push(call.await.expect("the call's task ends"));
        }
        dropped
    });
    let dropped = dropped.into_iter().filter(|d| *d).count();
    assert!(dropped > 0, "some calls were dropped");
    let other = open(Duration::from_secs(8));
    let started = std::time::Instant::now();
    for k in 0..KEYS {
        let out = other
            .execute_once(format!("dropped-{k}"), || {
                Ok::<_, std::io::Error>(format!("second {k}"))
            })
            .unwrap_or_else(|e| panic!("key {k} is not held after its call was dropped: {e}"));
        assert!(out.into_value().ends_with(&format!(" {k}")));
    }
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "no key waited for its lease to run out"
    );
}

/// An async call dropped while its outcome's write waits on a row lock (another session holds
/// the record `FOR UPDATE` for 1.5 s): the drop never blocks the runtime thread it runs on
/// (it returns while the lock is still held), nothing overwrites the outcome on its way, and
/// once the lock goes the outcome lands: a retry replays it, the operation ran once.
#[test]
fn an_async_call_dropped_while_its_outcome_waits_neither_blocks_nor_loses_it() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(20))
        .open_postgres(schema.options().pool_size(2).lease(Duration::from_secs(30)))
        .expect("open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs = AtomicUsize::new(0);
    let (locked_tx, locked_rx) = std::sync::mpsc::channel::<usize>();
    let lock = format!(
        "BEGIN; SELECT 1 FROM \"{}\".records WHERE key = '\\x{}'::bytea FOR UPDATE",
        schema.name,
        common::pg::hex(b"locked-outcome")
    );
    let session: Mutex<Option<std::thread::JoinHandle<()>>> = Mutex::new(None);
    runtime.block_on(async {
        let call = store.execute_once_async("locked-outcome", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            // The claim is in: another session locks the record before the outcome goes.
            let (url, lock, tx) = (url.clone(), lock.clone(), locked_tx.clone());
            *session.lock().unwrap() = Some(std::thread::spawn(move || {
                common::pg::raw_session(
                    url,
                    vec![
                        (lock, Duration::from_millis(1500)),
                        ("COMMIT".into(), Duration::ZERO),
                    ],
                    tx,
                )
            }));
            while locked_rx.try_recv().is_err() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Ok::<_, std::io::Error>("first".to_owned())
        });
        // Dropped while the outcome's write waits on the lock.
        let dropped = tokio::time::timeout(Duration::from_millis(400), call).await;
        assert!(
            dropped.is_err(),
            "the call was dropped while its outcome waited"
        );
        // The drop returned while the other session still holds the lock (its COMMIT, step 1,
        // has not run): it did not wait for the write, which would have blocked this
        // runtime's only thread until the lock went.
        assert!(
            locked_rx.try_recv().is_err(),
            "the drop returned only once the lock was gone: it blocked the runtime"
        );
        let holder = session.lock().unwrap().take().expect("the session started");
        holder.join().unwrap();
    });
    // Past the lock: a retry replays the outcome that was on its way.
    let out = store
        .execute_once("locked-outcome", || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("second".to_owned())
        })
        .expect("the key answers");
    assert!(out.is_replayed(), "the dropped call's outcome landed");
    assert_eq!(out.into_value(), "first");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
