//! Adversarial tests of the replay cache's newest path (commit c4aa162): `finish_op` keeps the
//! outcome this replica just wrote once its statement landed. Each test attacks that keep with
//! an outcome that was NOT committed (fenced out, failed, rolled back, dropped, its connection
//! killed) and then checks that this replica does not replay it. A failing test is a defect.
//!
//! Needs `IDEMSTORE_TEST_POSTGRES`; without it every test passes without running.

mod common;

use common::pg::{counted_call as call, hex, pg_url, raw_session, replica, PgSchema};
use idemstore::{Error, ExecuteError, PgStore};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Barrier, Mutex};
use std::time::{Duration, Instant};

type Io = std::io::Error;

fn cached(schema: &PgSchema, pool: usize) -> PgStore {
    replica(schema, |o| {
        o.pool_size(pool)
            .replay_cache(1000, Duration::from_secs(60))
    })
}

fn plain(schema: &PgSchema) -> PgStore {
    replica(schema, |o| o.pool_size(2))
}

fn rows(schema: &PgSchema, key: &str) -> i64 {
    schema.sql(&format!(
        "SELECT count(*) FROM {{s}}.records WHERE key = '\\x{}'::bytea",
        hex(key.as_bytes())
    ))[0]
        .get::<_, i64>(0)
}

/// Another session locks `key`'s row (FOR UPDATE), holds it for `hold`, then runs `then`
/// (which ends the transaction). Returns once the lock is taken.
fn lock_row(
    schema: &PgSchema,
    key: &str,
    hold: Duration,
    then: String,
) -> std::thread::JoinHandle<()> {
    let lock = format!(
        "BEGIN; SELECT 1 FROM \"{}\".records WHERE key = '\\x{}'::bytea FOR UPDATE",
        schema.name,
        hex(key.as_bytes())
    );
    let (tx, rx) = mpsc::channel();
    let url = schema.url.clone();
    let session = std::thread::spawn(move || {
        raw_session(url, vec![(lock, hold), (then, Duration::ZERO)], tx)
    });
    assert_eq!(rx.recv().expect("the lock was taken"), 0);
    session
}

/// The DELETE of `key`'s row and COMMIT, for the locking session: another replica's removal
/// that lands while the outcome waits (the outcome then matches no row: fenced out).
fn delete_and_commit(schema: &PgSchema, key: &str) -> String {
    format!(
        "DELETE FROM \"{}\".records WHERE key = '\\x{}'::bytea; COMMIT",
        schema.name,
        hex(key.as_bytes())
    )
}

fn fenced(e: &ExecuteError<Io>) -> bool {
    matches!(
        e,
        ExecuteError::Store(Error::LeaseLost { .. } | Error::OutcomeNotRecorded { .. })
    )
}

// ---------------------------------------------------------------------------------------

/// A holder on A paused past its lease; another replica (B) takes over and records "B"; the
/// holder's "A" is fenced out. A must never replay "A": neither at once, nor after B removes
/// the key (then A may replay nothing it did not read: it never read "A" as committed).
#[test]
fn a_fenced_out_holder_outcome_is_never_kept_takeover_by_another_replica() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 4);
    let b = plain(&schema);
    let runs = AtomicUsize::new(0);
    let (holding_tx, holding) = mpsc::channel::<()>();
    let (release_tx, release) = mpsc::channel::<()>();
    let release = Mutex::new(release);
    let held = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            a.execute_once("k", || {
                runs.fetch_add(1, Ordering::SeqCst);
                holding_tx.send(()).unwrap();
                release.lock().unwrap().recv().unwrap();
                Ok::<_, Io>("A".to_owned())
            })
        });
        holding.recv().unwrap();
        a.__lapse_leases().unwrap();
        assert_eq!(call(&b, "k", &runs, "B"), ("B".into(), false));
        release_tx.send(()).unwrap();
        holder.join().unwrap()
    });
    let e = held.expect_err("the paused holder's outcome must be fenced out");
    assert!(fenced(&e), "{e:?}");
    let (v, _) = call(&a, "k", &runs, "never");
    assert_eq!(v, "B", "A replayed its own fenced-out outcome");
    // B removes; A read "B" (allowed stale) but must never bring back "A".
    assert!(b.remove("k").unwrap());
    let (v, _) = call(&a, "k", &runs, "C");
    assert_ne!(
        v, "A",
        "A replayed its fenced-out outcome after B removed the key"
    );
    assert_eq!(runs.load(Ordering::SeqCst), if v == "C" { 3 } else { 2 });
}

/// As above (takeover by B), then THIS replica removes the key: after its own removal, A's
/// next call must run (neither the fenced-out "A" nor the taker's "B" may come back).
/// (A takeover by another thread of the same store is not possible: a store waits for its own
/// running holder.)
#[test]
fn a_fenced_out_holder_outcome_is_never_kept_then_own_removal() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 4);
    let b = plain(&schema);
    let runs = AtomicUsize::new(0);
    let (holding_tx, holding) = mpsc::channel::<()>();
    let (release_tx, release) = mpsc::channel::<()>();
    let release = Mutex::new(release);
    let held = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            a.execute_once("k", || {
                runs.fetch_add(1, Ordering::SeqCst);
                holding_tx.send(()).unwrap();
                release.lock().unwrap().recv().unwrap();
                Ok::<_, Io>("old".to_owned())
            })
        });
        holding.recv().unwrap();
        a.__lapse_leases().unwrap();
        assert_eq!(call(&b, "k", &runs, "taker"), ("taker".into(), false));
        release_tx.send(()).unwrap();
        holder.join().unwrap()
    });
    assert!(fenced(&held.expect_err("fenced")));
    assert_eq!(call(&a, "k", &runs, "never"), ("taker".into(), true));
    assert!(a.remove("k").unwrap());
    assert_eq!(call(&a, "k", &runs, "fresh"), ("fresh".into(), false));
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// The outcome waits on a row lock of another session, which then deletes the row and
/// commits: the outcome matches no row (sync call: `OutcomeNotRecorded`). Nothing is in the
/// database, so A's next call must run.
#[test]
fn an_outcome_whose_row_was_deleted_while_it_waited_is_not_kept() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 4);
    let runs = AtomicUsize::new(0);
    let session = Mutex::new(None);
    let out = a.execute_once("k", || {
        runs.fetch_add(1, Ordering::SeqCst);
        *session.lock().unwrap() = Some(lock_row(
            &schema,
            "k",
            Duration::from_millis(500),
            delete_and_commit(&schema, "k"),
        ));
        Ok::<_, Io>("ghost".to_owned())
    });
    session.into_inner().unwrap().unwrap().join().unwrap();
    let e = out.expect_err("the outcome matched no row");
    assert!(fenced(&e), "{e:?}");
    assert_eq!(rows(&schema, "k"), 0);
    assert_eq!(call(&a, "k", &runs, "real"), ("real".into(), false));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Many holders finish at once on a one-connection pool (their outcomes batch); one member's
/// row is locked by another session and then deleted (fenced). The fenced member is not kept
/// (its next call runs); every other member is recorded and replayed.
#[test]
fn a_fenced_member_of_an_outcome_batch_is_not_kept() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 1);
    const N: usize = 8;
    let runs = AtomicUsize::new(0);
    let barrier = Barrier::new(N);
    let session = Mutex::new(None);
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let (a, runs, barrier, session, schema) = (&a, &runs, &barrier, &session, &schema);
                s.spawn(move || {
                    let key = format!("b{i}");
                    a.execute_once(key.as_str(), || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        if i == 0 {
                            *session.lock().unwrap() = Some(lock_row(
                                schema,
                                "b0",
                                Duration::from_millis(700),
                                delete_and_commit(schema, "b0"),
                            ));
                        }
                        barrier.wait();
                        Ok::<_, Io>(format!("v{i}"))
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    session.into_inner().unwrap().unwrap().join().unwrap();
    for (i, out) in outs.into_iter().enumerate() {
        match (i, out) {
            (0, Err(e)) => assert!(fenced(&e), "{e:?}"),
            (0, Ok(o)) => panic!(
                "b0's row was deleted, yet its outcome {:?} was recorded",
                *o
            ),
            (_, out) => assert_eq!(
                *out.unwrap_or_else(|e| panic!("b{i}: {e:?}")),
                format!("v{i}")
            ),
        }
    }
    assert_eq!(rows(&schema, "b0"), 0);
    assert_eq!(call(&a, "b0", &runs, "again"), ("again".into(), false));
    for i in 1..N {
        assert_eq!(
            call(&a, &format!("b{i}"), &runs, "never"),
            (format!("v{i}"), true)
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), N + 1);
}

/// The server's statement timeout cancels a batch of outcomes held up by one locked row (the
/// batch is rolled back, its members re-sent one by one); the locked member's own statement is
/// canceled again, so its outcome was never committed: this replica must not replay it (after
/// the lock ends the row is still Pending; its lease is lapsed so the next call takes over).
#[test]
fn an_outcome_canceled_by_the_statement_timeout_in_a_rolled_back_batch_is_not_kept() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = replica(&schema, |o| {
        o.pool_size(2)
            .statement_timeout(Duration::from_millis(250))
            .replay_cache(1000, Duration::from_secs(60))
    });
    const N: usize = 6;
    let runs = AtomicUsize::new(0);
    let barrier = Barrier::new(N);
    let session = Mutex::new(None);
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|i| {
                let (a, runs, barrier, session, schema) = (&a, &runs, &barrier, &session, &schema);
                s.spawn(move || {
                    let key = format!("t{i}");
                    a.execute_once(key.as_str(), || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        if i == 0 {
                            *session.lock().unwrap() = Some(lock_row(
                                schema,
                                "t0",
                                Duration::from_millis(1500),
                                "ROLLBACK".into(),
                            ));
                        }
                        barrier.wait();
                        Ok::<_, Io>(format!("v{i}"))
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    session.into_inner().unwrap().unwrap().join().unwrap();
    let mut t0_recorded = false;
    for (i, out) in outs.into_iter().enumerate() {
        match (i, out) {
            (0, Err(_)) => {}
            (0, Ok(_)) => t0_recorded = true,
            (_, out) => assert_eq!(
                *out.unwrap_or_else(|e| panic!("t{i}: {e:?}")),
                format!("v{i}")
            ),
        }
    }
    assert!(
        !t0_recorded,
        "t0's outcome waited past the statement timeout twice"
    );
    a.__lapse_leases().unwrap();
    let (v, replayed) = call(&a, "t0", &runs, "again");
    assert!(
        !replayed && v == "again",
        "t0's canceled outcome was replayed: {v:?} (replayed: {replayed})"
    );
    for i in 1..N {
        assert_eq!(
            call(&a, &format!("t{i}"), &runs, "never"),
            (format!("v{i}"), true)
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), N + 1);
}

/// The async caller is dropped (a timeout) while its outcome waits on a row lock; the locking
/// session then deletes the row. Nothing was committed: A's next call must run.
#[test]
fn an_async_call_dropped_while_its_outcome_waits_keeps_nothing() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 4);
    let runs = AtomicUsize::new(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let session = Mutex::new(None);
    let timed_out = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(400),
            a.execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                let schema = &schema;
                *session.lock().unwrap() = Some(tokio::task::block_in_place(|| {
                    lock_row(
                        schema,
                        "k",
                        Duration::from_millis(900),
                        delete_and_commit(schema, "k"),
                    )
                }));
                Ok::<_, Io>("dropped".to_owned())
            }),
        )
        .await
        .is_err()
    });
    assert!(timed_out, "the call should still be waiting on the lock");
    session.into_inner().unwrap().unwrap().join().unwrap();
    // Let whatever is still on its way end (it matches no row).
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rows(&schema, "k"), 0);
    let (v, replayed) = runtime.block_on(async {
        let out = a
            .execute_once_async("k", || async {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Io>("real".to_owned())
            })
            .await
            .expect("call");
        (out.is_replayed(), out.into_value())
    });
    assert!(!v && replayed == "real", "replayed={v}, value={replayed:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// The backend running the outcome statement is terminated while it waits on a row lock; the
/// locking session then deletes the row. The write failed: A's next call must run.
#[test]
fn an_outcome_whose_connection_was_killed_is_not_kept() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 4);
    let runs = AtomicUsize::new(0);
    let session = Mutex::new(None);
    let out = std::thread::scope(|s| {
        let call = s.spawn(|| {
            a.execute_once("k", || {
                runs.fetch_add(1, Ordering::SeqCst);
                *session.lock().unwrap() = Some(lock_row(
                    &schema,
                    "k",
                    Duration::from_millis(1500),
                    delete_and_commit(&schema, "k"),
                ));
                Ok::<_, Io>("killed".to_owned())
            })
        });
        // The outcome statement waits on the lock: terminate its backend.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let killed = schema.sql(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND query LIKE '%{}%records SET record%'",
                schema.name
            ));
            if !killed.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no outcome statement waited on the lock"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        call.join().unwrap()
    });
    session.into_inner().unwrap().unwrap().join().unwrap();
    assert!(out.is_err(), "the outcome's connection was killed: {out:?}");
    assert_eq!(rows(&schema, "k"), 0);
    assert_eq!(call(&a, "k", &runs, "real"), ("real".into(), false));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
