//! Adversarial tests of the PostgreSQL engine's outcome batching and its read lane
//! (docs/design.md §13): outcomes queue for a shared batch statement once 16 are in flight,
//! so with a pool of 32 or more crowds of outcomes go out as batches; and every record read
//! goes down one shared, pipelined read lane.
//!
//! To reach the batch path deterministically, the outcome tests make the server slow for the
//! outcome writes of some keys (a trigger that sleeps in them): sixteen of those sent alone
//! fill every place in flight, and the outcomes that arrive meanwhile queue and go together
//! when the first of them ends. The same trigger logs every outcome write with whether the
//! statement that made it was the batched one, so each test can check it took the path it
//! is about. Needs `IDEMSTORE_TEST_POSTGRES`.

mod common;

use common::pg::{
    hex, hold_in_session, named, open_waiting as open, pg_url, raw_session, PgSchema,
};
use common::wait_until;
use idemstore::{Error, ExecuteError, PgOptions, PgStore, StorageKind, StoreBuilder};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

type Io = std::io::Error;

/// The places in flight outcomes take before they queue (`OUTCOMES_IN_FLIGHT`).
const IN_FLIGHT: usize = 16;

/// The tests of this file run one at a time: each opens up to 32 pooled connections (the
/// test server allows 100), and several look at what the store's sessions are doing.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `key` as a bytea literal.
fn lit(key: &str) -> String {
    format!("'\\x{}'::bytea", hex(key.as_bytes()))
}

/// The storage kind of a store error, if it is one.
fn storage_kind<E>(e: &ExecuteError<E>) -> Option<StorageKind> {
    match e {
        ExecuteError::Store(Error::Storage(s)) => Some(s.kind()),
        _ => None,
    }
}

/// A call's result, compared as text: the value, or the kind of error.
fn classify<E: std::fmt::Display>(
    r: Result<idemstore::Outcome<String>, ExecuteError<E>>,
) -> Result<String, String> {
    match r {
        Ok(o) => Ok(o.into_value()),
        Err(ExecuteError::Store(Error::LeaseLost { .. })) => Err("lease lost".into()),
        Err(ExecuteError::Store(Error::InProgress { .. })) => Err("in progress".into()),
        Err(ExecuteError::Store(Error::Storage(e))) => Err(format!("storage {:?}", e.kind())),
        Err(e) => Err(format!("other: {e}")),
    }
}

/// Instruments `schema`'s records (the schema must exist: open a store first): the outcome
/// write (a Pending row turned into any other state) of a key that starts with one of the
/// `slow` prefixes sleeps that prefix's seconds in the server (per row: a stand-in for a row
/// that costs the server time, such as a large record), and every outcome write is logged in
/// `outcome_log` with whether the statement that made it was the batched one (`finish_batch`,
/// the only one with `unnest`).
fn instrument(schema: &PgSchema, slow: &[(&str, f64)]) {
    schema.sql(
        "CREATE TABLE {s}.outcome_log (key bytea NOT NULL, batched boolean NOT NULL, \
         at timestamptz NOT NULL DEFAULT clock_timestamp())",
    );
    schema.sql(
        "CREATE FUNCTION {s}.outcome_written() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF OLD.state = 0 AND NEW.state <> 0 THEN \
             FOR i IN 0 .. TG_NARGS / 2 - 1 LOOP \
               IF position(convert_to(TG_ARGV[2 * i], 'UTF8') in NEW.key) = 1 THEN \
                 PERFORM pg_sleep(TG_ARGV[2 * i + 1]::float8); \
               END IF; \
             END LOOP; \
             INSERT INTO {s}.outcome_log (key, batched) \
               VALUES (NEW.key, position('unnest' in current_query()) > 0); \
           END IF; \
           RETURN NEW; \
         END $$",
    );
    let args: Vec<String> = slow
        .iter()
        .map(|(prefix, secs)| format!("'{prefix}', '{secs}'"))
        .collect();
    schema.sql(&format!(
        "CREATE TRIGGER outcome_written BEFORE UPDATE ON {{s}}.records FOR EACH ROW \
         EXECUTE FUNCTION {{s}}.outcome_written({})",
        args.join(", ")
    ));
}

/// Whether each logged outcome write of `key` was batched, oldest first.
fn logged(schema: &PgSchema, key: &str) -> Vec<bool> {
    schema
        .sql(&format!(
            "SELECT batched FROM {{s}}.outcome_log WHERE key = {} ORDER BY at",
            lit(key)
        ))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Sessions named `app` sleeping in the slow outcome trigger.
fn sleepers(schema: &PgSchema, app: &str) -> usize {
    let n: i64 = schema.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' \
         AND wait_event = 'PgSleep'"
    ))[0]
        .get(0);
    n as usize
}

/// Store sessions named `app`, as pids (`extra`: more conditions).
fn sessions(schema: &PgSchema, app: &str, extra: &str) -> Vec<i32> {
    schema
        .sql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE application_name = '{app}' {extra}"
        ))
        .iter()
        .map(|r| r.get::<_, i32>(0))
        .collect()
}

/// The state column of `key`'s record (0: Pending), if it has one.
fn state_of(schema: &PgSchema, key: &str) -> Option<i16> {
    schema
        .sql(&format!(
            "SELECT state FROM {{s}}.records WHERE key = {}",
            lit(key)
        ))
        .first()
        .map(|r| r.get(0))
}

/// Starts `IN_FLIGHT` calls on `store` (threads of `scope`) whose outcome writes are slow
/// (keys `slow-0..`), and returns once every one of them is in the server: every place in
/// flight for outcomes is then taken, for the trigger's sleep.
fn fill_outcome_places<'s>(
    scope: &'s std::thread::Scope<'s, '_>,
    store: &'s PgStore,
    schema: &PgSchema,
    app: &str,
) -> Vec<std::thread::ScopedJoinHandle<'s, Result<String, String>>> {
    let calls = (0..IN_FLIGHT)
        .map(|i| {
            scope.spawn(move || {
                classify(
                    store.execute_once(format!("slow-{i}"), || Ok::<_, Io>(format!("slow {i}"))),
                )
            })
        })
        .collect();
    wait_until("every place in flight taken by a slow outcome", || {
        sleepers(schema, app) == IN_FLIGHT
    });
    calls
}

/// A session of the test's own that LISTENs on `channel` and collects the payloads of the
/// notifications it gets, until dropped.
struct Listener {
    payloads: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    fn new(url: &str, channel: &str) -> Self {
        let payloads = Arc::new(Mutex::new(Vec::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, listening) = std::sync::mpsc::channel();
        let (url, channel, got) = (url.to_owned(), channel.to_owned(), Arc::clone(&payloads));
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let (client, mut connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("the test server answers");
                let driver = tokio::spawn(async move {
                    while let Some(message) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        match message {
                            Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                                got.lock().unwrap().push(n.payload().to_owned())
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                client
                    .batch_execute(&format!("LISTEN \"{channel}\""))
                    .await
                    .expect("LISTEN");
                let _ = ready.send(());
                let _ = stopped.await;
                drop(client);
                let _ = driver.await;
            });
        });
        listening.recv().expect("the listener is listening");
        Self {
            payloads,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The distinct payloads received so far.
    fn distinct(&self) -> HashSet<String> {
        self.payloads.lock().unwrap().iter().cloned().collect()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Outcomes, batched once 16 are in flight.
// ---------------------------------------------------------------------------------------

/// Promise (design §13 "Batching": "a caller dropped while its request is queued or on its
/// way stops nothing half-way: an outcome lands (retries replay it)"; §14's table, "while the
/// outcome's write is on its way": "On PostgreSQL the write runs in a task of the engine's own
/// that goes on (through row locks held for a while) after the drop"; README: a batched
/// caller gets "exactly the answer its own statement would have had").
///
/// tests/pg_batching.rs checks this for an outcome sent alone. Here the outcome is queued: an
/// async holder (pool 32) finishes while 16 outcomes are in flight, so its outcome waits for
/// a batch, and its caller is dropped. When the batch goes, another session holds the
/// record's row (`FOR UPDATE`, for a few seconds, as any passing lock). Sent alone, the write
/// would go again until the lock went (`retry_busy` in `Outcomes::run_one`); the outcome must
/// land once the lock is gone, and a retry replay it without running the operation again.
#[test]
fn a_dropped_callers_outcome_queued_alone_behind_a_row_lock_still_lands() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("fa_{}", schema.name);
    let store = Arc::new(open(
        named(&schema, &app)
            .pool_size(32)
            .lease(Duration::from_secs(30)),
        Duration::from_secs(20),
    ));
    instrument(&schema, &[("slow-", 3.0)]);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let runs = Arc::new(AtomicUsize::new(0));
    let claimed = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let victim = {
        let (store, runs, claimed, release) = (
            Arc::clone(&store),
            Arc::clone(&runs),
            Arc::clone(&claimed),
            Arc::clone(&release),
        );
        runtime.spawn(async move {
            store
                .execute_once_async("victim", move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    claimed.store(true, Ordering::SeqCst);
                    while !release.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok::<_, Io>("the dropped caller's outcome".to_owned())
                })
                .await
                .map(|o| o.into_value())
                .map_err(|e| e.to_string())
        })
    };
    wait_until("the victim's claim", || claimed.load(Ordering::SeqCst));
    // Another session locks the victim's Pending row for 7 s.
    let lock = hold_in_session(
        &url,
        format!(
            "BEGIN; SELECT 1 FROM \"{}\".records WHERE key = {} FOR UPDATE",
            schema.name,
            lit("victim")
        ),
        Duration::from_secs(7),
    );
    std::thread::scope(|scope| {
        let slow = fill_outcome_places(scope, &store, &schema, &app);
        // The victim's operation ends: its outcome finds every place taken and queues.
        release.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !victim.is_finished(),
            "setup: the victim's outcome did not wait (its call had already ended)"
        );
        victim.abort();
        // The victim's call is gone; the 16 were in flight all along, so its outcome was
        // queued, not sent alone.
        assert_eq!(
            sleepers(&schema, &app),
            IN_FLIGHT,
            "setup: the 16 slow outcomes were still in flight when the victim's was dropped"
        );
        for (i, call) in slow.into_iter().enumerate() {
            assert_eq!(call.join().unwrap(), Ok(format!("slow {i}")));
        }
    });
    let cut = runtime.block_on(victim);
    assert!(
        cut.as_ref().is_err_and(|e| e.is_cancelled()),
        "the victim's call was dropped: {cut:?}"
    );
    lock.join().expect("the locking session");
    // The lock is gone: the outcome on its way lands (bounded: well within the I/O timeout).
    let deadline = Instant::now() + Duration::from_secs(5);
    while state_of(&schema, "victim") == Some(0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_ne!(
        state_of(&schema, "victim"),
        Some(0),
        "the dropped caller's outcome, queued alone and held up by a passing row lock, was \
         never written: the key is left Pending (its operation runs again once the lease \
         ends); outcome writes logged: {:?}",
        logged(&schema, "victim")
    );
    let out = store
        .execute_once("victim", || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Io>("ran again".to_owned())
        })
        .expect("the key answers");
    assert!(out.is_replayed());
    assert_eq!(out.into_value(), "the dropped caller's outcome");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Promise (design §13 "Batching": a batch the server gives up — "a row lock held by another
/// transaction ... nothing of it written — is sent again request by request, so only the
/// caller whose own row was the cause hears it (the others are late by at most that wait)";
/// an outcome is fenced on each holder's exact Pending digest; §13 "Fencing": a holder that
/// was taken over gets `LeaseLost`).
///
/// Pool 32: 8 holders' outcomes queue behind 16 in flight and go as one batch. Another
/// session holds one of their rows (`q-0`) `FOR UPDATE` for seconds, and one holder (`q-7`)
/// was taken over by another replica meanwhile. The batch waits on the lock and is given up:
/// every other holder's outcome must be written while the lock is still held, `q-7` must get
/// `LeaseLost` and keep the taker's outcome, and `q-0` lands once the lock goes.
#[test]
fn a_batch_given_up_on_one_locked_row_answers_every_other_holder_at_once() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("fb_{}", schema.name);
    let opts = |app: &str| {
        named(&schema, app)
            .pool_size(32)
            .lease(Duration::from_secs(30))
    };
    let holder = open(opts(&app), Duration::from_secs(20));
    let taker = open(opts(&format!("{app}_t")), Duration::from_secs(20));
    instrument(&schema, &[("slow-", 3.0)]);
    const QUEUED: usize = 8;
    let started = AtomicUsize::new(0);
    let release = AtomicBool::new(false);
    let released_lock = AtomicBool::new(false);
    let runs: Vec<AtomicUsize> = (0..QUEUED).map(|_| AtomicUsize::new(0)).collect();
    let results: Vec<(Result<String, String>, bool)> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..QUEUED)
            .map(|k| {
                let (holder, started, release, released_lock, runs) =
                    (&holder, &started, &release, &released_lock, &runs);
                scope.spawn(move || {
                    let out = classify(holder.execute_once(format!("q-{k}"), || {
                        runs[k].fetch_add(1, Ordering::SeqCst);
                        started.fetch_add(1, Ordering::SeqCst);
                        while !release.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Ok::<_, Io>(format!("holder {k}"))
                    }));
                    (out, released_lock.load(Ordering::SeqCst))
                })
            })
            .collect();
        wait_until("every holder running", || {
            started.load(Ordering::SeqCst) == QUEUED
        });
        // q-7's holder is as if paused past its lease: the other replica takes it over.
        schema.sql(&format!(
            "UPDATE {{s}}.records SET lease_until = now() - interval '1 millisecond' \
             WHERE key = {}",
            lit("q-7")
        ));
        let taken = classify(taker.execute_once("q-7", || Ok::<_, Io>("taker 7".to_owned())));
        assert_eq!(taken, Ok("taker 7".to_owned()), "the takeover");
        // Another session locks q-0's row for 7 s and then lets go (step 1 ran: released).
        let (ready, ran) = std::sync::mpsc::channel();
        let lock = format!(
            "BEGIN; SELECT 1 FROM \"{}\".records WHERE key = {} FOR UPDATE",
            schema.name,
            lit("q-0")
        );
        let session_url = url.clone();
        let session = scope.spawn(move || {
            raw_session(
                session_url,
                vec![
                    (lock, Duration::from_secs(7)),
                    ("ROLLBACK".into(), Duration::ZERO),
                ],
                ready,
            )
        });
        assert_eq!(ran.recv().expect("the lock is taken"), 0);
        let released_lock2 = &released_lock;
        scope.spawn(move || {
            if ran.recv() == Ok(1) {
                released_lock2.store(true, Ordering::SeqCst);
            }
        });
        let slow = fill_outcome_places(scope, &holder, &schema, &app);
        release.store(true, Ordering::SeqCst);
        let results = calls.into_iter().map(|c| c.join().unwrap()).collect();
        for (i, call) in slow.into_iter().enumerate() {
            assert_eq!(call.join().unwrap(), Ok(format!("slow {i}")));
        }
        session.join().expect("the locking session");
        results
    });
    let log: Vec<Vec<bool>> = (0..QUEUED)
        .map(|k| logged(&schema, &format!("q-{k}")))
        .collect();
    eprintln!("outcome writes of q-0..q-7 (batched?): {log:?}");
    for (k, (result, after_release)) in results.iter().enumerate() {
        let key = format!("q-{k}");
        let stored = classify(taker.execute_once(&key, || -> Result<String, Io> {
            panic!("{key} has an outcome")
        }));
        match k {
            0 => {
                assert_eq!(result, &Ok("holder 0".to_owned()), "{key}");
                assert_eq!(stored, Ok("holder 0".to_owned()), "{key}");
            }
            7 => {
                assert_eq!(result, &Err("lease lost".to_owned()), "{key}");
                assert_eq!(stored, Ok("taker 7".to_owned()), "{key}");
            }
            _ => {
                assert_eq!(result, &Ok(format!("holder {k}")), "{key}");
                assert_eq!(stored, Ok(format!("holder {k}")), "{key}");
                assert!(
                    !after_release,
                    "{key}'s holder waited for the lock on q-0's row (a neighbour in its \
                     batch) to be released"
                );
            }
        }
        assert_eq!(runs[k].load(Ordering::SeqCst), 1, "{key} ran once here");
    }
}

/// Promise (design §13 "Batching": "an outcome is fenced on each holder's exact Pending
/// digest", "a batch of claims or outcomes never carries one key twice, so each caller's
/// answer is its own row's"; "Fencing": a holder taken over by another replica after its
/// lease ran out writes nothing and gets `LeaseLost`).
///
/// Pool 32: 24 holders finish together while 16 outcomes are in flight, so their outcomes go
/// as one batch (checked in the server's log of outcome writes). The even ones were taken
/// over by another replica meanwhile. Each taken-over holder gets `LeaseLost` and the taker's
/// outcome stays; every other holder's outcome is written by the batch, its own.
#[test]
fn a_batch_of_outcomes_in_a_large_pool_is_fenced_holder_by_holder() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("fc_{}", schema.name);
    let holder = open(
        named(&schema, &app)
            .pool_size(32)
            .lease(Duration::from_secs(30)),
        Duration::from_secs(20),
    );
    let taker = open(
        named(&schema, &format!("{app}_t"))
            .pool_size(32)
            .lease(Duration::from_secs(30)),
        Duration::from_secs(20),
    );
    instrument(&schema, &[("slow-", 2.0)]);
    const KEYS: usize = 24;
    let key = |k: usize| {
        if k.is_multiple_of(2) {
            format!("take-{k}")
        } else {
            format!("keep-{k}")
        }
    };
    let started = AtomicUsize::new(0);
    let release = AtomicBool::new(false);
    let results: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..KEYS)
            .map(|k| {
                let (holder, started, release, key) = (&holder, &started, &release, &key);
                scope.spawn(move || {
                    classify(holder.execute_once(key(k), || {
                        started.fetch_add(1, Ordering::SeqCst);
                        while !release.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Ok::<_, Io>(format!("holder {k}"))
                    }))
                })
            })
            .collect();
        wait_until("every holder running", || {
            started.load(Ordering::SeqCst) == KEYS
        });
        schema.sql(
            "UPDATE {s}.records SET lease_until = now() - interval '1 millisecond' \
             WHERE state = 0 AND position('take-'::bytea in key) = 1",
        );
        for k in (0..KEYS).step_by(2) {
            let out = classify(taker.execute_once(key(k), || Ok::<_, Io>(format!("taker {k}"))));
            assert_eq!(out, Ok(format!("taker {k}")), "the takeover of {}", key(k));
        }
        let slow = fill_outcome_places(scope, &holder, &schema, &app);
        release.store(true, Ordering::SeqCst);
        let results = calls.into_iter().map(|c| c.join().unwrap()).collect();
        for (i, call) in slow.into_iter().enumerate() {
            assert_eq!(call.join().unwrap(), Ok(format!("slow {i}")));
        }
        results
    });
    for (k, result) in results.into_iter().enumerate() {
        let key = key(k);
        let stored = classify(taker.execute_once(&key, || -> Result<String, Io> {
            panic!("{key} has an outcome")
        }));
        if k.is_multiple_of(2) {
            assert_eq!(result, Err("lease lost".to_owned()), "{key}");
            assert_eq!(stored, Ok(format!("taker {k}")), "{key}");
        } else {
            assert_eq!(result, Ok(format!("holder {k}")), "{key}");
            assert_eq!(stored, Ok(format!("holder {k}")), "{key}");
            assert_eq!(
                logged(&schema, &key),
                vec![true],
                "setup: {key}'s outcome was written once, by a batch"
            );
        }
    }
}

/// Promise (design §13 "Waiting": "a holder whose record was marked sends NOTIFY after its
/// outcome"; "Batching": the batched statement keeps every rule of its one-row form).
///
/// Pool 32: 20 holders in one replica, each key waited for by a caller in another replica
/// (its record marked), finish while 16 outcomes are in flight, so their outcomes go as a
/// batch (checked in the server's log). A session of the test's own LISTENs on the store's
/// channel: every marked key must be notified (one distinct payload per key), and every
/// waiter gets its holder's outcome.
#[test]
fn a_batch_of_outcomes_notifies_every_marked_key() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("fd_{}", schema.name);
    let holder = open(
        named(&schema, &app)
            .pool_size(32)
            .lease(Duration::from_secs(30)),
        Duration::from_secs(20),
    );
    let waiter = open(
        named(&schema, &format!("{app}_w"))
            .pool_size(32)
            .lease(Duration::from_secs(30)),
        Duration::from_secs(20),
    );
    instrument(&schema, &[("slow-", 2.0)]);
    let listener = Listener::new(&url, &format!("idemstore.{}", schema.name));
    const KEYS: usize = 20;
    let started = AtomicUsize::new(0);
    let release = AtomicBool::new(false);
    let runs = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let calls: Vec<_> = (0..KEYS)
            .map(|k| {
                let (holder, started, release) = (&holder, &started, &release);
                scope.spawn(move || {
                    classify(holder.execute_once(format!("w-{k}"), || {
                        started.fetch_add(1, Ordering::SeqCst);
                        while !release.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Ok::<_, Io>(format!("holder {k}"))
                    }))
                })
            })
            .collect();
        wait_until("every holder running", || {
            started.load(Ordering::SeqCst) == KEYS
        });
        let waits: Vec<_> = (0..KEYS)
            .map(|k| {
                let (waiter, runs) = (&waiter, &runs);
                scope.spawn(move || {
                    classify(waiter.execute_once(format!("w-{k}"), || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Io>(format!("waiter {k}"))
                    }))
                })
            })
            .collect();
        wait_until("every holder's record marked by its waiter", || {
            let n: i64 = schema.sql(
                "SELECT count(*) FROM {s}.records WHERE waiters \
                 AND position('w-'::bytea in key) = 1",
            )[0]
            .get(0);
            n as usize == KEYS
        });
        let slow = fill_outcome_places(scope, &holder, &schema, &app);
        release.store(true, Ordering::SeqCst);
        for (k, call) in calls.into_iter().enumerate() {
            assert_eq!(call.join().unwrap(), Ok(format!("holder {k}")), "w-{k}");
        }
        for (k, wait) in waits.into_iter().enumerate() {
            assert_eq!(
                wait.join().unwrap(),
                Ok(format!("holder {k}")),
                "w-{k}'s waiter"
            );
        }
        for call in slow {
            assert!(call.join().unwrap().is_ok());
        }
    });
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a waiter ran the operation");
    let batched = (0..KEYS)
        .filter(|k| logged(&schema, &format!("w-{k}")) == vec![true])
        .count();
    assert_eq!(
        batched, KEYS,
        "setup: every marked key's outcome was written by a batch"
    );
    // Notifications are sent after the batch's commit; give them a moment to arrive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while listener.distinct().len() < KEYS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        listener.distinct().len(),
        KEYS,
        "one notification per marked key whose outcome a batch wrote"
    );
}

/// Promise (README: "while a few claims (or outcomes, or reads) are on their way, the callers
/// that arrive meanwhile go together in one statement and one commit, each with exactly the
/// answer its own statement would have had"; batch.rs: a batch carries at most 1 MiB of
/// requests past its first, so its statement costs about what its largest request's would
/// alone, never a crowd's worth of large records under one I/O timeout).
///
/// Without the byte limit, one batch would carry up to 128 outcomes whatever their size: measured
/// on this machine, outcomes of results near `max_result_bytes` (16 MiB) took over 30 s, the
/// default I/O timeout, in batches of 16 to 52, while one alone takes about 0.2 s, and every
/// caller of such a batch got `Timeout` while the batch went on to commit. Here 16 holders
/// (pool 32) with 2 MiB results finish while 16 outcomes are in flight, so theirs queue: each
/// must be recorded and returned to its caller, and none may share a statement with another
/// (two of them are past the limit).
#[test]
fn a_crowd_of_large_outcomes_is_never_one_statement() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("fh_{}", schema.name);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(20))
        .max_result_bytes(4 << 20)
        .open_postgres(
            named(&schema, &app)
                .pool_size(32)
                .lease(Duration::from_secs(30))
                .io_timeout(Duration::from_secs(20)),
        )
        .expect("open");
    instrument(&schema, &[("slow-", 1.0)]);
    const HOLDERS: usize = 16;
    let large = |k: usize| format!("{k:02}").repeat(1 << 20);
    let started = AtomicUsize::new(0);
    let release = AtomicBool::new(false);
    let results: Vec<Result<String, String>> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..HOLDERS)
            .map(|k| {
                let (store, started, release) = (&store, &started, &release);
                scope.spawn(move || {
                    classify(store.execute_once(format!("bulk-{k}"), || {
                        started.fetch_add(1, Ordering::SeqCst);
                        while !release.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                        Ok::<_, Io>(large(k))
                    }))
                })
            })
            .collect();
        wait_until("every holder running", || {
            started.load(Ordering::SeqCst) == HOLDERS
        });
        let slow = fill_outcome_places(scope, &store, &schema, &app);
        release.store(true, Ordering::SeqCst);
        let results = calls.into_iter().map(|c| c.join().unwrap()).collect();
        for call in slow {
            assert!(call.join().unwrap().is_ok());
        }
        results
    });
    for (k, r) in results.iter().enumerate() {
        assert!(
            r.as_ref() == Ok(&large(k)),
            "bulk-{k}: {:?}",
            r.as_ref().map(String::len)
        );
    }
    let batched: i64 = schema.sql(
        "SELECT count(*) FROM {s}.outcome_log WHERE batched AND position('bulk-'::bytea in key) = 1",
    )[0]
        .get(0);
    assert_eq!(
        batched, 0,
        "2 MiB outcomes written by a batch statement: a batch took more than 1 MiB past its first"
    );
}

// ---------------------------------------------------------------------------------------
// Reads, all down one shared lane.
// ---------------------------------------------------------------------------------------

/// The largest result the store accepts, and a payload just under it (its encoding adds a
/// few bytes).
const MAX_RESULT: usize = 16 << 20;
const BIG: usize = MAX_RESULT - 64;

/// Replays enough recorded keys (`prefix`-0..`count`) that the store reads first.
fn warm(store: &PgStore, prefix: &str, count: u64) {
    for i in 0..64u64 {
        let k = i % count;
        let out = store
            .execute_once(format!("{prefix}-{k}"), || -> Result<u64, Io> {
                panic!("warm-up replay of {prefix}-{k} ran its operation")
            })
            .expect("a warm-up replay");
        assert_eq!(*out, k);
    }
    assert!(
        !store.__claims_first(),
        "replays turned the store to reading first"
    );
}

/// A payload of `len` bytes that PostgreSQL cannot compress much (so the row is as large on
/// the wire as in the table), the same for a given `seed`.
fn incompressible(len: usize, seed: u64) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 90) as u8)
        })
        .collect()
}

/// A store on `options` (max_result_bytes at its limit) whose schema gets the record `big` (just under
/// the limit) and small records `small-0..32` (value k), warmed to read first.
fn big_and_small(options: PgOptions) -> (PgStore, Arc<String>) {
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .max_result_bytes(MAX_RESULT)
        .open_postgres(options)
        .expect("open");
    let big = Arc::new(incompressible(BIG, 7));
    let out = store
        .execute_once("big", || Ok::<_, Io>(big.as_str().to_owned()))
        .expect("record the large outcome");
    assert_eq!(out.len(), BIG);
    for k in 0..32u64 {
        store
            .execute_once(format!("small-{k}"), || Ok::<_, Io>(k))
            .expect("record");
    }
    warm(&store, "small", 32);
    (store, big)
}

/// Promise (design §13 "Read lanes": "Callers do not wait for each other's answers: ... a
/// crowd of retries shares round trips"; `PgOptions::io_timeout`: the longest one statement
/// may take is bounded by the I/O timeout — a connection the server no longer answers on, a
/// lock held by another session — not by other callers' reads).
///
/// Every read now goes down one lane. Threads and async tasks replay a record just under the
/// largest result the store accepts (16 MiB) again and again, so the lane carries one after
/// another, while a crowd of threads replays small records (more than 16 at once: their reads
/// are also batched, with the large one among them). Every replay must answer its own key's
/// record, none run its operation, and none fail, with an I/O timeout of 10 s.
#[test]
fn small_replays_behind_max_size_records_on_the_one_lane_all_answer() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let (store, big) = big_and_small(
        schema
            .options()
            .pool_size(8)
            .io_timeout(Duration::from_secs(10)),
    );
    let store = Arc::new(store);
    let window = Duration::from_secs(4);
    let t0 = Instant::now();
    let runs = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let slowest_small = Arc::new(AtomicU64::new(0));
    let (bigs, smalls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    // Async replays of the large record, some of them cut short mid-read.
    let tasks: Vec<_> = (0..3u64)
        .map(|t| {
            let (store, big, runs, failures, bigs) = (
                Arc::clone(&store),
                Arc::clone(&big),
                Arc::clone(&runs),
                Arc::clone(&failures),
                Arc::clone(&bigs),
            );
            runtime.spawn(async move {
                let mut i = t;
                while t0.elapsed() < window {
                    i += 1;
                    let runs = Arc::clone(&runs);
                    let call = store.execute_once_async("big", move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<String, Io>(String::new())
                    });
                    let cut = Duration::from_millis(if i % 3 == 0 { 1 + i % 40 } else { 20_000 });
                    match tokio::time::timeout(cut, call).await {
                        Err(_) => {}
                        Ok(Ok(out)) if *out == *big => {
                            bigs.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Ok(out)) => failures
                            .lock()
                            .unwrap()
                            .push(format!("async big: another record ({} bytes)", out.len())),
                        Ok(Err(e)) => failures
                            .lock()
                            .unwrap()
                            .push(format!("async big ({:?}): {e}", storage_kind(&e))),
                    }
                }
            })
        })
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..3 {
            let (store, big, runs, failures, bigs) = (&store, &big, &runs, &failures, &bigs);
            scope.spawn(move || {
                while t0.elapsed() < window {
                    match store.execute_once("big", || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<String, Io>(String::new())
                    }) {
                        Ok(out) if *out == **big => {
                            bigs.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(out) => failures
                            .lock()
                            .unwrap()
                            .push(format!("big: another record ({} bytes)", out.len())),
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("big ({:?}): {e}", storage_kind(&e))),
                    }
                }
            });
        }
        for t in 0..24u64 {
            let (store, runs, failures, slowest_small, smalls) =
                (&store, &runs, &failures, &slowest_small, &smalls);
            scope.spawn(move || {
                let mut i = t;
                while t0.elapsed() < window {
                    i += 7;
                    let k = i % 32;
                    let began = Instant::now();
                    match store.execute_once(format!("small-{k}"), || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<u64, Io>(u64::MAX)
                    }) {
                        Ok(out) if *out == k => {
                            smalls.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(out) => failures
                            .lock()
                            .unwrap()
                            .push(format!("small-{k}: answered {}", *out)),
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("small-{k} ({:?}): {e}", storage_kind(&e))),
                    }
                    slowest_small.fetch_max(began.elapsed().as_millis() as u64, Ordering::SeqCst);
                }
            });
        }
    });
    for task in tasks {
        runtime.block_on(task).expect("an async task");
    }
    eprintln!(
        "{} large and {} small replays; the slowest small replay took {} ms",
        bigs.load(Ordering::SeqCst),
        smalls.load(Ordering::SeqCst),
        slowest_small.load(Ordering::SeqCst)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a replay ran its operation");
    assert!(bigs.load(Ordering::SeqCst) > 0 && smalls.load(Ordering::SeqCst) > 0);
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} replays failed or answered wrong: {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
}

/// Promise (design §13 "Read lanes": "A read that finds its lane's connection lost ... is
/// sent once more on a new connection, which is safe because a read changes nothing";
/// lanes.rs: "a lane whose connection is lost is replaced by the next read that picks it (one
/// connect at a time per lane)").
///
/// With one lane, terminating its backend fails every read on it at once: the one the server
/// is answering (here often a 16 MiB record, cut mid-transfer), every read pipelined behind
/// it, and batched reads. A crowd of sync and async replays of large and small records runs
/// while the lane's backend is terminated four times (each new lane only once it has carried
/// reads for a while): every replay answers its own key's record, never an error, never a
/// run of the operation.
#[test]
fn the_one_lane_terminated_mid_burst_costs_no_replay_an_error() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("fe_{}", schema.name);
    let (store, big) = big_and_small(
        named(&schema, &app)
            .pool_size(8)
            .io_timeout(Duration::from_secs(10)),
    );
    let store = Arc::new(store);
    let lane_sql = "AND (query LIKE 'SELECT record FROM%' OR query LIKE 'SELECT k.key, r.record%')";
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicUsize::new(0));
    let replays = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let tasks: Vec<_> = (0..12u64)
        .map(|t| {
            let (store, big, stop, runs, replays, failures) = (
                Arc::clone(&store),
                Arc::clone(&big),
                Arc::clone(&stop),
                Arc::clone(&runs),
                Arc::clone(&replays),
                Arc::clone(&failures),
            );
            runtime.spawn(async move {
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    i += 5;
                    let runs = Arc::clone(&runs);
                    if t == 0 {
                        match store
                            .execute_once_async("big", move || async move {
                                runs.fetch_add(1, Ordering::SeqCst);
                                Ok::<String, Io>(String::new())
                            })
                            .await
                        {
                            Ok(out) if *out == *big => {}
                            Ok(out) => failures
                                .lock()
                                .unwrap()
                                .push(format!("async big: {} bytes", out.len())),
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("async big ({:?}): {e}", storage_kind(&e))),
                        }
                    } else {
                        let k = i % 32;
                        match store
                            .execute_once_async(format!("small-{k}"), move || async move {
                                runs.fetch_add(1, Ordering::SeqCst);
                                Ok::<u64, Io>(u64::MAX)
                            })
                            .await
                        {
                            Ok(out) if *out == k => {}
                            Ok(out) => failures
                                .lock()
                                .unwrap()
                                .push(format!("async small-{k}: {}", *out)),
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("async small-{k} ({:?}): {e}", storage_kind(&e))),
                        }
                    }
                    replays.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let mut ended: Vec<i32> = Vec::new();
    std::thread::scope(|scope| {
        for t in 0..14u64 {
            let (store, big, stop, runs, replays, failures) =
                (&store, &big, &stop, &runs, &replays, &failures);
            scope.spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::SeqCst) {
                    i += 3;
                    if t < 2 {
                        match store.execute_once("big", || {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<String, Io>(String::new())
                        }) {
                            Ok(out) if *out == **big => {}
                            Ok(out) => failures
                                .lock()
                                .unwrap()
                                .push(format!("big: {} bytes", out.len())),
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("big ({:?}): {e}", storage_kind(&e))),
                        }
                    } else {
                        let k = i % 32;
                        match store.execute_once(format!("small-{k}"), || {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<u64, Io>(u64::MAX)
                        }) {
                            Ok(out) if *out == k => {}
                            Ok(out) => failures
                                .lock()
                                .unwrap()
                                .push(format!("small-{k}: {}", *out)),
                            Err(e) => failures
                                .lock()
                                .unwrap()
                                .push(format!("small-{k} ({:?}): {e}", storage_kind(&e))),
                        }
                    }
                    replays.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        for _ in 0..4 {
            // The lane, set up and carrying reads for a while (seen twice, 1 s apart), never
            // one ended before; ended while it is answering, if it is seen doing so.
            let mut settled = Vec::new();
            wait_until("a new lane, set up", || {
                let before = sessions(&schema, &app, lane_sql);
                std::thread::sleep(Duration::from_millis(1000));
                let after = sessions(&schema, &app, lane_sql);
                settled = before
                    .into_iter()
                    .filter(|p| after.contains(p) && !ended.contains(p))
                    .collect();
                !settled.is_empty()
            });
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline
                && sessions(&schema, &app, &format!("{lane_sql} AND state = 'active'")).is_empty()
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            for pid in &settled {
                schema.sql(&format!("SELECT pg_terminate_backend({pid})"));
            }
            ended.extend(settled);
        }
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
    });
    for task in tasks {
        runtime.block_on(task).expect("an async task");
    }
    eprintln!(
        "ended lanes {ended:?}; {} replays",
        replays.load(Ordering::SeqCst)
    );
    assert!(
        ended.len() >= 4,
        "the lane was ended four times ({ended:?})"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0, "a replay ran its operation");
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} replays failed after the lane was lost: {:#?}",
        failures.len(),
        &failures[..failures.len().min(20)]
    );
}

// ---------------------------------------------------------------------------------------
// The connection budget: pool_size + 3.
// ---------------------------------------------------------------------------------------

/// Samples the sessions named `app` every few milliseconds until `stop`: the most seen at
/// once, and what they were doing then (pid, state, wait, the start of their query).
fn sample_sessions<'s>(
    scope: &'s std::thread::Scope<'s, '_>,
    schema: &'s PgSchema,
    app: &'s str,
    stop: &'s AtomicBool,
    most: &'s Mutex<(usize, Vec<String>)>,
) -> std::thread::ScopedJoinHandle<'s, ()> {
    scope.spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let now: Vec<String> = schema
                .sql(&format!(
                    "SELECT pid || ' ' || coalesce(state, '') || ' ' \
                     || coalesce(wait_event, '-') || ' ' || left(query, 50) \
                     FROM pg_stat_activity WHERE application_name = '{app}'"
                ))
                .iter()
                .map(|r| r.get(0))
                .collect();
            let mut most = most.lock().unwrap();
            if now.len() > most.0 {
                *most = (now.len(), now);
            }
            drop(most);
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

/// Promise (README: "A store so holds up to `pool_size` + 3 connections (the lane, one for
/// notifications, one for lease renewals)"; `PgOptions::pool_size`; bridge.rs and lanes.rs:
/// dropping the store ends its connections).
///
/// Pool 32, so outcomes now batch (16 in flight): a mixed load of new keys (crowds of
/// outcomes, forced into batches by 16 slow ones), replays of small records (reads on the
/// lane, batched beyond 16) and async calls cut short at random points never has more than
/// 35 sessions at once; then the store is dropped with outcomes in flight and queued and
/// reads on their way, and every one of its sessions ends.
#[test]
fn a_large_pool_under_batched_outcomes_and_reads_keeps_to_its_budget_and_ends_every_session() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("ff_{}", schema.name);
    let pool = 32usize;
    let budget = pool + 3;
    let store = Arc::new(open(
        named(&schema, &app)
            .pool_size(pool)
            .lease(Duration::from_secs(30)),
        Duration::from_secs(20),
    ));
    instrument(&schema, &[("slow-", 1.0)]);
    for k in 0..16u64 {
        store
            .execute_once(format!("r-{k}"), || Ok::<_, Io>(k))
            .expect("record");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let stop = AtomicBool::new(false);
    let most = Mutex::new((0, Vec::new()));
    let cut = Arc::new(AtomicUsize::new(0));
    std::thread::scope(|scope| {
        let sampler = sample_sessions(scope, &schema, &app, &stop, &most);
        let slow = fill_outcome_places(scope, &store, &schema, &app);
        let workers: Vec<_> = (0..32u64)
            .map(|t| {
                let store = &store;
                scope.spawn(move || {
                    for i in 0..12u64 {
                        let fresh = format!("n-{t}-{i}");
                        let out = store
                            .execute_once(&fresh, || Ok::<_, Io>(t * 1000 + i))
                            .unwrap_or_else(|e| panic!("{fresh}: {e}"));
                        assert_eq!(*out, t * 1000 + i);
                        let k = (t * 5 + i) % 16;
                        let out = store
                            .execute_once(format!("r-{k}"), || Ok::<_, Io>(u64::MAX))
                            .expect("a replay");
                        assert_eq!(*out, k);
                    }
                })
            })
            .collect();
        let tasks: Vec<_> = (0..24u64)
            .map(|t| {
                let (store, cut) = (Arc::clone(&store), Arc::clone(&cut));
                runtime.spawn(async move {
                    for i in 0..8u64 {
                        let wait = Duration::from_micros((t * 7919 + i * 104_729) % 400_000);
                        let call = store.execute_once_async(format!("a-{t}-{i}"), || async {
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            Ok::<_, Io>(1u64)
                        });
                        if tokio::time::timeout(wait, call).await.is_err() {
                            cut.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("a worker");
        }
        for t in tasks {
            runtime.block_on(t).expect("a task");
        }
        for call in slow {
            assert!(call.join().unwrap().is_ok());
        }
        stop.store(true, Ordering::SeqCst);
        sampler.join().expect("the sampler");
    });
    let batched: i64 = schema.sql("SELECT count(*) FROM {s}.outcome_log WHERE batched")[0].get(0);
    let (most, seen) = most.into_inner().unwrap();
    eprintln!(
        "at most {most} sessions; {batched} outcomes written by batches; {} async calls cut",
        cut.load(Ordering::SeqCst)
    );
    assert!(batched > 0, "setup: some outcomes went in batches");
    assert!(
        most <= budget,
        "{most} sessions at once, over pool_size {pool} + 3: {seen:#?}"
    );

    // Dropped with outcomes in flight (slow, in the server) and queued, and reads on the lane.
    let _slow = (0..IN_FLIGHT)
        .map(|i| {
            let store = Arc::clone(&store);
            runtime.spawn(async move {
                let _ = store
                    .execute_once_async(format!("slow-late-{i}"), || async { Ok::<_, Io>(i) })
                    .await;
            })
        })
        .collect::<Vec<_>>();
    wait_until("the late slow outcomes in flight", || {
        sleepers(&schema, &app) == IN_FLIGHT
    });
    for t in 0..24u64 {
        let store = Arc::clone(&store);
        runtime.spawn(async move {
            let _ = store
                .execute_once_async(format!("late-{t}"), || async move { Ok::<_, Io>(t) })
                .await;
            for i in 0.. {
                let _ = store
                    .execute_once_async(format!("r-{}", (t + i) % 16), || async {
                        Ok::<_, Io>(u64::MAX)
                    })
                    .await;
            }
        });
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(store);
    drop(runtime);
    wait_until("the dropped store's sessions to end", || {
        sessions(&schema, &app, "").is_empty()
    });
}

/// Promise (README: "A store so holds up to `pool_size` + 3 connections (the lane, one for
/// notifications, one for lease renewals): size the server's `max_connections` for every
/// replica's total"; `PgOptions::pool_size`: "The store also keeps three connections of its
/// own beside the pool").
///
/// A store with a full pool (2), its lane, its listener and its heartbeat (5 sessions), and
/// a running holder with the shortest lease (300 ms: renewed every 100 ms). Another session
/// holds the holder's row `FOR UPDATE` for 2 s (a passing lock: an operator, another
/// replica's transactional call). The server must never see more than 5 sessions of the store.
#[test]
fn a_renewal_held_up_by_a_row_lock_keeps_the_store_to_its_budget() {
    let _serial = serial();
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("fg_{}", schema.name);
    let pool = 2usize;
    let budget = pool + 3;
    let store = open(
        named(&schema, &app)
            .pool_size(pool)
            .lease(Duration::from_millis(300)),
        Duration::from_secs(20),
    );
    for k in 0..4u64 {
        store
            .execute_once(format!("r-{k}"), || Ok::<_, Io>(k))
            .expect("record");
    }
    // Fill the pool (its connections stay open, idle) and open the lane.
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let store = &store;
            scope.spawn(move || {
                for i in 0..10u64 {
                    store
                        .execute_once(format!("fill-{t}-{i}"), || Ok::<_, Io>(i))
                        .expect("a call");
                    store
                        .execute_once(format!("r-{}", i % 4), || Ok::<_, Io>(u64::MAX))
                        .expect("a replay");
                }
            });
        }
    });
    wait_until(
        "the pool full, the lane, listener and heartbeat open",
        || sessions(&schema, &app, "").len() == budget,
    );
    let claimed = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let most = Mutex::new((0, Vec::new()));
    std::thread::scope(|scope| {
        let (store2, claimed2) = (&store, &claimed);
        let holder = scope.spawn(move || {
            store2.execute_once("held", || {
                claimed2.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(3000));
                Ok::<_, Io>(1u64)
            })
        });
        wait_until("the holder's claim", || claimed.load(Ordering::SeqCst));
        let sampler = sample_sessions(scope, &schema, &app, &stop, &most);
        let lock = hold_in_session(
            &url,
            format!(
                "BEGIN; SELECT 1 FROM \"{}\".records WHERE key = {} FOR UPDATE",
                schema.name,
                lit("held")
            ),
            Duration::from_secs(2),
        );
        lock.join().expect("the locking session");
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        sampler.join().expect("the sampler");
        let _ = holder.join().expect("the holder");
    });
    let (most, seen) = most.into_inner().unwrap();
    assert!(
        most <= budget,
        "{most} sessions of the store at once, over pool_size {pool} + 3: renewals that took \
         longer than a beat were abandoned with their connections, and new ones made, while \
         the server still ran the old ones: {seen:#?}"
    );
}
