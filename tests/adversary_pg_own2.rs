//! Adversarial tests, second round, of the PostgreSQL engine's own connections (design §13,
//! "Own connections"; src/engine/postgres/own.rs), aimed at the newest part: a statement cut
//! off by the I/O timeout stays on its own connection, which a thread of its own drains (an
//! empty "marker" statement sent behind the cut-off one) until every answer on its way has
//! been read, before it serves again.
//!
//! Promises attacked here, each on the real server:
//! - a statement cut off on an own connection stays there "as on a pooled connection (the
//!   server runs it to its end)": also when its answer is larger than the socket buffers,
//!   and also when no sync caller takes a connection afterwards;
//! - the open count (`__own_connections`) matches the own sessions the server sees, over
//!   cut-offs, terminations of draining connections (before and after their statement ends,
//!   before and after the marker was sent) and a server restart; a settled connection serves
//!   again (own connections are not silently lost to the pooled path); the session budget
//!   `pool_size + 3` holds under concurrent cut-offs of claims and outcomes;
//! - a cut-off outcome is not lost and never makes the operation run twice; a caller never
//!   gets another statement's answer, also when the cut-off statement's answer is still
//!   being read when the next callers come;
//! - dropping a store with draining connections (on a plain thread, inside a runtime) never
//!   hangs and ends every session.
//!
//! Needs `IDEMSTORE_TEST_POSTGRES`; the restart test also `IDEMSTORE_TEST_POSTGRES_RESTART`.

mod common;

use common::pg::{named, open_waiting as open, pg_url, PgSchema};
use common::wait_until;
use idemstore::{Error, ExecuteError, PgStore, StorageKind};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

type Io = std::io::Error;

/// One test at a time: they count the store's sessions, and one restarts the server.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One client session of the store, as the server sees it.
#[derive(Debug, Clone)]
#[allow(dead_code)]
struct Session {
    pid: i32,
    state: String,
    wait_event: String,
    query: String,
}

/// The client sessions named `app`.
fn sessions(schema: &PgSchema, app: &str) -> Vec<Session> {
    schema
        .sql(&format!(
            "SELECT pid, coalesce(state, ''), coalesce(wait_event, ''), coalesce(query, '') \
             FROM pg_stat_activity WHERE application_name = '{app}' \
             AND backend_type = 'client backend' ORDER BY pid"
        ))
        .iter()
        .map(|r| Session {
            pid: r.get(0),
            state: r.get(1),
            wait_event: r.get(2),
            query: r.get(3),
        })
        .collect()
}

fn terminate(schema: &PgSchema, pid: i32) {
    schema.sql(&format!("SELECT pg_terminate_backend({pid})"));
}

/// The storage kind of a call's error, if it is a storage error.
fn storage_kind<T, E>(r: &Result<T, ExecuteError<E>>) -> Option<StorageKind> {
    match r {
        Err(ExecuteError::Store(Error::Storage(e))) => Some(e.kind()),
        _ => None,
    }
}

/// The state column of `key`'s record (None: no record).
fn state_of(schema: &PgSchema, key: &str) -> Option<i16> {
    schema
        .sql(&format!(
            "SELECT state FROM {{s}}.records WHERE key = convert_to('{key}', 'UTF8')"
        ))
        .first()
        .map(|r| r.get(0))
}

/// A trigger on `schema`'s records. A claim (insert) of a key starting with `slow-` sleeps
/// `claim_secs`; an outcome (an update to a non-Pending state) of a key starting with
/// `slowout-` sleeps `outcome_secs`. A claim of a key starting with `loudclaim-` or an outcome
/// of one starting with `loudout-` sleeps `loud_secs`, then sends `notices` notices of 8000
/// bytes each to the client (an answer larger than the socket buffers). All of it stops
/// once [`calm`] ran.
fn triggers(schema: &PgSchema, claim_secs: f64, outcome_secs: f64, loud_secs: f64, notices: u32) {
    schema.sql("CREATE TABLE {s}.storm (slow bool NOT NULL)");
    schema.sql("INSERT INTO {s}.storm VALUES (true)");
    schema.sql(&format!(
        "CREATE FUNCTION {{s}}.adv2() RETURNS trigger LANGUAGE plpgsql AS $$ \
         DECLARE i int; \
         BEGIN \
           IF TG_OP = 'INSERT' AND position(convert_to('slow-', 'UTF8') in NEW.key) = 1 \
              AND (SELECT slow FROM {{s}}.storm) THEN \
             PERFORM pg_sleep({claim_secs}); \
           END IF; \
           IF TG_OP = 'UPDATE' AND NEW.state <> 0 \
              AND position(convert_to('slowout-', 'UTF8') in NEW.key) = 1 \
              AND (SELECT slow FROM {{s}}.storm) THEN \
             PERFORM pg_sleep({outcome_secs}); \
           END IF; \
           IF ((TG_OP = 'INSERT' \
                AND position(convert_to('loudclaim-', 'UTF8') in NEW.key) = 1) \
              OR (TG_OP = 'UPDATE' AND NEW.state <> 0 \
                  AND position(convert_to('loudout-', 'UTF8') in NEW.key) = 1)) \
              AND (SELECT slow FROM {{s}}.storm) THEN \
             PERFORM pg_sleep({loud_secs}); \
             FOR i IN 1..{notices} LOOP \
               RAISE NOTICE '%', repeat('n', 8000); \
             END LOOP; \
           END IF; \
           RETURN NEW; \
         END $$"
    ));
    schema.sql(
        "CREATE TRIGGER adv2 BEFORE INSERT OR UPDATE ON {s}.records FOR EACH ROW \
         EXECUTE FUNCTION {s}.adv2()",
    );
}

/// Ends the sleeps and notices of [`triggers`] for statements that start after.
fn calm(schema: &PgSchema) {
    schema.sql("UPDATE {s}.storm SET slow = false");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Polls `done` every 50 ms for at most `limit`; whether it held.
fn within(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------
// 1. A cut-off statement whose answer is larger than the socket buffers.

/// Promise (own.rs module doc; design §13): a statement cut off by the I/O timeout "stays on
/// it, as on a pooled connection (the server runs it to its end ...)"; design §14's table: an
/// outcome whose write is on its way is "the outcome, once the write lands".
///
/// Attack: an outcome's statement answers with more than the sockets hold (a trigger sends
/// 16 MB of notices after a short sleep). On the pooled path (an async call: control) the
/// connection's task reads and drops the answer, so the statement ends and the outcome lands
/// even though its caller was cut off. An own connection cut off the same way must be read
/// too, with no later sync caller to drive it: left unread, the backend would block writing
/// the answer, inside its transaction, with the record's row locked, and the outcome would
/// never land, nor could any other call (async, another replica) replay or take over the key.
#[test]
fn a_cut_off_outcome_with_a_large_answer_still_runs_to_its_end() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("adv2a_{}", schema.name);
    let store = open(
        named(&schema, &app)
            .pool_size(4)
            .lease(Duration::from_millis(1000))
            .io_timeout(Duration::from_millis(250)),
        Duration::from_secs(3),
    );
    triggers(&schema, 0.0, 0.0, 0.6, 2000);
    store
        .execute_once("warm", || Ok::<_, Io>("warm".to_owned()))
        .expect("warm");
    assert_eq!(
        store.__own_connections(),
        1,
        "the warm-up took an own connection"
    );
    let rt = runtime();

    // The own path: a lone sync call, its outcome cut off by the I/O timeout.
    let own_runs = AtomicUsize::new(0);
    let own = store.execute_once("loudout-own", || {
        own_runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Io>("OWN".to_owned())
    });
    assert_eq!(
        storage_kind(&own),
        Some(StorageKind::Timeout),
        "the own outcome was cut off: {:?}",
        own.map(|o| o.into_value())
    );
    // Control, the pooled path: an async call (which never takes an own connection, nor
    // settles the draining ones), its outcome cut off the same way.
    let pooled = rt.block_on(store.execute_once_async("loudout-pooled", || async {
        Ok::<_, Io>("POOLED".to_owned())
    }));
    assert_eq!(
        storage_kind(&pooled),
        Some(StorageKind::Timeout),
        "the pooled outcome was cut off: {:?}",
        pooled.map(|o| o.into_value())
    );
    let pooled_landed = within(common::PATIENCE, || {
        state_of(&schema, "loudout-pooled").is_some_and(|s| s != 0)
    });
    assert!(
        pooled_landed,
        "control: the pooled path's cut-off outcome landed"
    );
    // The server needs the same time for the own one: it started earlier. (A generous bound:
    // what is checked is that it lands with no further sync call, not how fast.)
    let own_landed = within(common::PATIENCE, || {
        state_of(&schema, "loudout-own").is_some_and(|s| s != 0)
    });
    let stuck: Vec<Session> = sessions(&schema, &app)
        .into_iter()
        .filter(|s| s.state == "active")
        .collect();
    // What a retry from elsewhere sees (an async call: no own connection is taken).
    let retry = rt.block_on(store.execute_once_async("loudout-own", || async {
        Ok::<_, Io>("RAN-AGAIN".to_owned())
    }));
    let retry = retry.map(|o| (o.is_replayed(), o.into_value()));
    // Diagnosis: lone sync calls each `take` a connection, which reads the draining one's
    // socket for one turn; enough of them let the stuck statement end.
    let mut takes = 0;
    if !own_landed {
        while takes < 200 && state_of(&schema, "loudout-own").is_none_or(|s| s == 0) {
            takes += 1;
            let key = format!("take-{takes}");
            let _ = store.execute_once(&key, || Ok::<_, Io>(key.clone()));
        }
    }
    let landed_after_takes = state_of(&schema, "loudout-own").is_some_and(|s| s != 0);
    rt.block_on(async move { drop(store) });
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app).is_empty()
    });
    assert!(
        own_landed,
        "the own connection's cut-off outcome never ran to its end (the pooled one's did): \
         its backend is stuck writing the answer nobody reads: {stuck:?}; a retry got {:?}; \
         after {takes} lone sync calls (each a `take`), the outcome landed: \
         {landed_after_takes}",
        retry.as_ref().map_err(|e| format!("{e:?}"))
    );
    assert_eq!(
        retry.map_err(|e| format!("{e:?}")),
        Ok((true, "OWN".to_owned())),
        "a retry replays the outcome"
    );
    assert_eq!(own_runs.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------
// 2. The open count against the server's sessions, over cut-offs and terminations.

/// A store of `pool_size` 4 (3 pooled, 1 own) whose pooled connections, read lane, listener
/// and heartbeat are all open: their pids (6), which no round below touches.
fn filled_store(schema: &PgSchema, app: &str, io_timeout: Duration) -> (PgStore, BTreeSet<i32>) {
    let store = open(
        named(schema, app)
            .pool_size(4)
            .lease(Duration::from_millis(900))
            .io_timeout(io_timeout),
        Duration::from_secs(5),
    );
    std::thread::scope(|scope| {
        for t in 0..3 {
            let store = &store;
            scope.spawn(move || {
                store
                    .execute_once_in_tx(format!("tx-{t}"), |_tx| {
                        std::thread::sleep(Duration::from_millis(300));
                        Ok::<_, Io>(t)
                    })
                    .expect("a transaction");
            });
        }
    });
    let rt = runtime();
    rt.block_on(store.execute_once_async("tx-0", || async { Ok::<_, Io>(99) }))
        .expect("an async replay opens the read lane");
    wait_until("the pool, lane, listener and heartbeat are open", || {
        sessions(schema, app).len() == 6
    });
    assert_eq!(store.__own_connections(), 0);
    let known = sessions(schema, app).iter().map(|s| s.pid).collect();
    (store, known)
}

/// The store's sessions that are not among `known`: its own connections.
fn own_sessions(schema: &PgSchema, app: &str, known: &BTreeSet<i32>) -> Vec<Session> {
    let all = sessions(schema, app);
    let alive: BTreeSet<i32> = all.iter().map(|s| s.pid).collect();
    assert!(
        known.is_subset(&alive),
        "a pooled, lane, listener or heartbeat session went: {known:?} against {all:?}"
    );
    all.into_iter()
        .filter(|s| !known.contains(&s.pid))
        .collect()
}

/// Promise (own.rs: "at most `max` exist"; "it goes back to the idle set unless it has
/// ended ... or its last statement was cut off"; a draining one "serves again once that is
/// answered"; `__own_connections`: how many are open). Over rounds of claims cut off on the
/// one own connection of a `pool_size` 4 store, each ended a different way (settled after
/// its statement ended; terminated while the statement runs; terminated while draining with
/// its marker not yet sent; terminated after its marker went; cut off twice in a row, the
/// second on a pooled connection), a few lone sync calls later:
/// - the open count equals the own sessions the server sees (no count drift either way),
///   and never exceeds 1; the store never has more than `pool_size + 3` sessions;
/// - the own connection that settled is the one serving again (same pid, last statement
///   not the marker), so own connections are not silently lost to the pooled path;
/// - every call gets its own key's value; the cut-off keys never ran.
#[test]
fn the_open_count_follows_the_own_sessions_over_cut_offs_and_terminations() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("adv2b_{}", schema.name);
    let (store, known) = filled_store(&schema, &app, Duration::from_millis(150));
    triggers(&schema, 0.6, 0.0, 0.0, 0);
    let runs = AtomicUsize::new(0);
    let mut n = 0u32;
    let mut fast = |count: usize| {
        for _ in 0..count {
            n += 1;
            let key = format!("fast-{n}");
            let out = store
                .execute_once(&key, || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Io>(key.clone())
                })
                .unwrap_or_else(|e| panic!("{key}: {e:?}"));
            assert_eq!(*out, key, "a call got another statement's answer");
        }
    };
    let cut = |key: &str| {
        let r = store.execute_once(key, || Ok::<_, Io>(key.to_owned()));
        assert_eq!(
            storage_kind(&r),
            Some(StorageKind::Timeout),
            "{key}: cut off by the I/O timeout: {:?}",
            r.map(|o| o.into_value())
        );
    };
    let no_sleeper = || {
        wait_until("no statement of the store sleeps", || {
            sessions(&schema, &app)
                .iter()
                .all(|s| s.wait_event != "PgSleep")
        })
    };
    let check = |round: &str, same_as: Option<i32>| -> i32 {
        let own = own_sessions(&schema, &app, &known);
        let open = store.__own_connections();
        assert!(
            own.len() + known.len() <= 7,
            "{round}: past the budget of 7: {own:?}"
        );
        assert_eq!(
            (open, own.len()),
            (1, 1),
            "{round}: the open count against the own sessions: {own:?}"
        );
        assert!(
            !own[0].query.is_empty(),
            "{round}: the own connection's last statement is the marker: it has not served \
             since it settled: {own:?}"
        );
        if let Some(pid) = same_as {
            assert_eq!(
                own[0].pid, pid,
                "{round}: the settled own connection serves again"
            );
        }
        own[0].pid
    };

    fast(2);
    let mut pid = check("start", None);

    // a. Settled after its statement ended: the same connection serves again.
    cut("slow-a");
    no_sleeper();
    fast(4);
    pid = check("a: settled", Some(pid));

    // b. Terminated while its cut-off statement runs.
    cut("slow-b");
    terminate(&schema, pid);
    fast(4);
    no_sleeper();
    fast(2);
    pid = check("b: terminated while running", None);

    // c. Terminated while draining, its statement ended, its marker not yet sent.
    cut("slow-c");
    no_sleeper();
    terminate(&schema, pid);
    wait_until("the terminated session went", || {
        sessions(&schema, &app).iter().all(|s| s.pid != pid)
    });
    fast(4);
    pid = check("c: terminated while draining", None);

    // d. Terminated after its marker went (one take settled it once).
    cut("slow-d");
    no_sleeper();
    fast(1);
    terminate(&schema, pid);
    wait_until("the terminated session went", || {
        sessions(&schema, &app).iter().all(|s| s.pid != pid)
    });
    fast(4);
    pid = check("d: terminated after the marker", None);

    // e. Two cut-offs in a row: the second goes on a pooled connection.
    cut("slow-e1");
    cut("slow-e2");
    no_sleeper();
    fast(4);
    check("e: two cut-offs", Some(pid));

    assert_eq!(
        runs.load(Ordering::SeqCst),
        n as usize,
        "each fast key ran once"
    );
    for key in ["slow-a", "slow-b", "slow-c", "slow-d", "slow-e1", "slow-e2"] {
        assert_ne!(
            state_of(&schema, key),
            Some(1),
            "{key} was never run, so never completed"
        );
    }
    let rt = runtime();
    rt.block_on(async move { drop(store) });
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app).is_empty()
    });
}

// ---------------------------------------------------------------------------------------
// 3-4. Concurrent cut-offs of claims and outcomes: the budget, no double run, no lost
// outcome; and the same under terminations of own sessions.

/// What the callers saw of each key.
#[derive(Default, Debug)]
struct Seen {
    runs: u32,
    /// Calls that ran the operation and then failed in the store: each allows one re-run.
    in_doubt: u32,
    value: Option<String>,
}

type Ledger = Mutex<BTreeMap<String, Seen>>;

/// Runs `key` once on `store`, noting what happened in `ledger`; whether it succeeded.
fn noted_call(store: &PgStore, ledger: &Ledger, key: &str) -> bool {
    let mut ran = false;
    let r = store.execute_once(key, || {
        ran = true;
        ledger
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default()
            .runs += 1;
        Ok::<_, Io>(key.to_owned())
    });
    let mut ledger = ledger.lock().unwrap();
    let seen = ledger.entry(key.to_owned()).or_default();
    match r {
        Ok(out) => {
            let v = out.into_value();
            assert_eq!(v, key, "{key} got another statement's answer");
            seen.value = Some(v);
            true
        }
        Err(ExecuteError::Store(
            Error::Storage(_) | Error::InProgress { .. } | Error::LeaseLost { .. },
        )) => {
            seen.in_doubt += u32::from(ran);
            false
        }
        Err(e) => panic!("{key}: unexpected error {e:?}"),
    }
}

/// Every key of `ledger` ran at most once plus once per in-doubt call, and a retry now
/// (every cut-off statement has ended) succeeds with its own value. (Whether a cut-off
/// outcome reached the server is not known here: a pooled one may have waited for a
/// connection past the I/O timeout and never been sent; see test 5 for own connections.)
fn judge(store: &PgStore, ledger: &Ledger) {
    let keys: Vec<String> = ledger.lock().unwrap().keys().cloned().collect();
    std::thread::scope(|scope| {
        for chunk in keys.chunks(keys.len().div_ceil(4).max(1)) {
            scope.spawn(move || {
                for key in chunk {
                    let ok = (0..3).any(|_| noted_call(store, ledger, key));
                    assert!(ok, "{key}: a retry after the storm succeeds");
                }
            });
        }
    });
    for (key, seen) in ledger.lock().unwrap().iter() {
        assert!(
            seen.runs <= 1 + seen.in_doubt,
            "{key} ran {} times with {} in-doubt calls",
            seen.runs,
            seen.in_doubt
        );
        assert_eq!(seen.value.as_deref(), Some(key.as_str()), "{key}");
    }
}

/// A `pool_size` 8 store (6 pooled, 2 own) whose pooled connections, lane, listener and
/// heartbeat are open; their pids.
fn filled_store_8(schema: &PgSchema, app: &str) -> (PgStore, BTreeSet<i32>) {
    let store = open(
        named(schema, app)
            .pool_size(8)
            .lease(Duration::from_millis(900))
            .io_timeout(Duration::from_millis(200)),
        Duration::from_secs(5),
    );
    std::thread::scope(|scope| {
        for t in 0..6 {
            let store = &store;
            scope.spawn(move || {
                store
                    .execute_once_in_tx(format!("tx-{t}"), |_tx| {
                        std::thread::sleep(Duration::from_millis(400));
                        Ok::<_, Io>(t)
                    })
                    .expect("a transaction");
            });
        }
    });
    let rt = runtime();
    rt.block_on(store.execute_once_async("tx-0", || async { Ok::<_, Io>(99) }))
        .expect("an async replay opens the read lane");
    wait_until("the pool, lane, listener and heartbeat are open", || {
        sessions(schema, app).len() == 9
    });
    let known = sessions(schema, app).iter().map(|s| s.pid).collect();
    (store, known)
}

/// `threads` sync callers cycle through new keys: a fast one, one whose outcome is slow (cut
/// off after the operation ran), one whose claim is slow (cut off before), for `run`.
fn storm(
    store: &PgStore,
    ledger: &Ledger,
    threads: usize,
    run: Duration,
    also: impl FnOnce() + Send,
) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..threads {
            let stop = &stop;
            scope.spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let prefix = ["fast", "slowout", "fast", "slow"][n % 4];
                    noted_call(store, ledger, &format!("{prefix}-{t}-{n}"));
                    n += 1;
                }
            });
        }
        let deadline = Instant::now() + run;
        also();
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::SeqCst);
    });
}

/// Promise (design §13: "the engine's sessions stay within `pool_size + 3`"; a cut-off
/// statement stays on its connection; a claim or outcome is never sent twice; contract: `f`
/// runs once per recorded outcome). Four sync threads on a `pool_size` 8 store cut off
/// claims and outcomes (the server sleeps in them past the I/O timeout) on own and pooled
/// connections while a sampler counts the store's sessions: never past 11; no key ran
/// twice unless a call was in doubt, every key's value its own; afterwards the open count is
/// at most 2 and equals the own sessions.
#[test]
fn concurrent_cut_offs_keep_the_budget_and_lose_no_outcome() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("adv2c_{}", schema.name);
    let (store, known) = filled_store_8(&schema, &app);
    triggers(&schema, 0.45, 0.45, 0.0, 0);
    let ledger = Ledger::default();
    let stop = AtomicBool::new(false);
    let most = AtomicUsize::new(0);
    let most_open = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (stop, most, most_open, schema, app, store) =
            (&stop, &most, &most_open, &schema, &app, &store);
        scope.spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                most.fetch_max(sessions(schema, app).len(), Ordering::SeqCst);
                most_open.fetch_max(store.__own_connections(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        storm(store, &ledger, 4, Duration::from_millis(2500), || {});
        stop.store(true, Ordering::SeqCst);
    });
    wait_until("no statement of the store sleeps", || {
        sessions(&schema, &app)
            .iter()
            .all(|s| s.wait_event != "PgSleep")
    });
    calm(&schema);
    judge(&store, &ledger);
    // Lone sync calls settle every draining connection.
    for k in 0..4 {
        noted_call(&store, &ledger, &format!("after-{k}"));
    }
    let own = own_sessions(&schema, &app, &known);
    let open = store.__own_connections();
    let (most, most_open) = (most.into_inner(), most_open.into_inner());
    eprintln!(
        "storm: at most {most} sessions, {most_open} own open; {} keys",
        ledger.lock().unwrap().len()
    );
    assert!(most <= 11, "{most} sessions at once, past the budget of 11");
    assert!(
        most_open <= 2,
        "{most_open} own connections open at once, past 2"
    );
    assert_eq!(
        open,
        own.len(),
        "the open count against the own sessions: {own:?}"
    );
    assert!(open >= 1, "own connections serve again");
    let rt = runtime();
    rt.block_on(async move { drop(store) });
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app).is_empty()
    });
}

/// Promise (as above, and own.rs: a draining connection that ended is dropped, its count
/// freed; design §13: "a claim or outcome whose own connection is lost on its way gets the
/// connection error ... it is never sent again"). The same storm while the own sessions
/// (found by pid: not the pool's, lane's, listener's or heartbeat's) are terminated again and
/// again, busy, draining or idle: no double run beyond in-doubt calls, every key's value its
/// own, no panic; afterwards the open count equals the own sessions and own connections
/// serve again.
#[test]
fn terminating_own_sessions_under_cut_offs_keeps_the_count_and_the_runs() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("adv2d_{}", schema.name);
    let (store, known) = filled_store_8(&schema, &app);
    triggers(&schema, 0.45, 0.45, 0.0, 0);
    let ledger = Ledger::default();
    let kills = AtomicUsize::new(0);
    storm(&store, &ledger, 3, Duration::from_millis(2500), || {
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for _ in 0..16 {
                    std::thread::sleep(Duration::from_millis(130));
                    for s in sessions(&schema, &app) {
                        if !known.contains(&s.pid) {
                            terminate(&schema, s.pid);
                            kills.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            });
        });
    });
    wait_until("no statement of the store sleeps", || {
        sessions(&schema, &app)
            .iter()
            .all(|s| s.wait_event != "PgSleep")
    });
    calm(&schema);
    judge(&store, &ledger);
    for k in 0..4 {
        noted_call(&store, &ledger, &format!("after-{k}"));
    }
    // Connections the server ended while they sat idle are seen when next taken: take both.
    std::thread::scope(|scope| {
        for t in 0..2 {
            let (store, ledger) = (&store, &ledger);
            scope.spawn(move || {
                for k in 0..4 {
                    noted_call(store, ledger, &format!("pair-{t}-{k}"));
                }
            });
        }
    });
    for k in 0..4 {
        noted_call(&store, &ledger, &format!("last-{k}"));
    }
    let own = own_sessions(&schema, &app, &known);
    let open = store.__own_connections();
    eprintln!(
        "terminations: {} kills, {} keys, own {own:?}",
        kills.load(Ordering::SeqCst),
        ledger.lock().unwrap().len()
    );
    assert!(
        kills.load(Ordering::SeqCst) > 0,
        "own sessions were terminated"
    );
    assert!(open <= 2);
    assert!(open >= 1, "own connections serve again");
    assert!(
        open >= own.len(),
        "more own sessions ({own:?}) than the open count {open}: the budget can be exceeded"
    );
    let rt = runtime();
    rt.block_on(async move { drop(store) });
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app).is_empty()
    });
}

// ---------------------------------------------------------------------------------------
// 5. A cut-off outcome on an own connection: not lost, never run twice.

/// Promise (design §13: a cut-off statement stays on the own connection and the server runs
/// it to its end; "a statement is never sent twice"; contract: `f` runs once per recorded
/// outcome; "no later call waits behind a slow statement"). A lone sync call's outcome is
/// cut off on its own connection (the server sleeps in it past the I/O timeout); retries
/// right away, on the same thread (the own connection still draining), do not wait behind
/// it and never run the operation again: once the outcome lands they replay it. Then the own
/// connection serves again, and a second cut-off of the same kind behaves the same.
#[test]
fn an_outcome_cut_off_on_an_own_connection_lands_and_replays_once() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("adv2e_{}", schema.name);
    let (store, known) = filled_store(&schema, &app, Duration::from_millis(200));
    triggers(&schema, 0.0, 0.6, 0.0, 0);
    store
        .execute_once("warm", || Ok::<_, Io>("warm".to_owned()))
        .expect("warm");
    let own_pid = own_sessions(&schema, &app, &known)[0].pid;
    for round in 0..2 {
        let key = format!("slowout-{round}");
        let runs = AtomicUsize::new(0);
        let first = store.execute_once(&key, || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Io>(format!("value-{round}"))
        });
        assert_eq!(
            storage_kind(&first),
            Some(StorageKind::Timeout),
            "the outcome was cut off: {:?}",
            first.map(|o| o.into_value())
        );
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Retries until one answers: each may find the record still Pending (busy, or its
        // holder's lease still running), never another run.
        let mut answered = None;
        for _ in 0..40 {
            let r = store.execute_once(&key, || {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Io>("RAN-AGAIN".to_owned())
            });
            match r {
                Ok(out) => {
                    answered = Some((out.is_replayed(), out.into_value()));
                    break;
                }
                Err(ExecuteError::Store(Error::Storage(_) | Error::InProgress { .. })) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("{key}: {e:?}"),
            }
        }
        assert_eq!(
            (answered, runs.load(Ordering::SeqCst)),
            (Some((true, format!("value-{round}"))), 1),
            "{key}: the cut-off outcome landed and is replayed, the operation ran once"
        );
        for k in 0..3 {
            let fast = format!("fast-{round}-{k}");
            let out = store
                .execute_once(&fast, || Ok::<_, Io>(fast.clone()))
                .expect("a new key");
            assert_eq!(*out, fast);
        }
        let own = own_sessions(&schema, &app, &known);
        assert_eq!(
            (store.__own_connections(), own.len()),
            (1, 1),
            "round {round}: {own:?}"
        );
        assert_eq!(
            own[0].pid, own_pid,
            "round {round}: the same own connection serves"
        );
        assert!(
            own[0].query.starts_with("UPDATE"),
            "round {round}: it served: {own:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 6. Dropping a store with draining connections.

/// Promise (own.rs: "dropping an own connection never blocks ... so the engine may be
/// dropped anywhere, inside a runtime too"; every session of a dropped store ends). Two
/// stores, each with both of its own connections draining (two sync threads' claims cut off
/// while the server sleeps in them), one dropped on a plain thread, one inside a runtime,
/// right away: the drops return, and every session of both ends.
#[test]
fn dropping_a_store_with_draining_connections_ends_every_session() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let rt = runtime();
    for (i, inside_runtime) in [(0, false), (1, true)] {
        let app = format!("adv2f{i}_{}", schema.name);
        let store = open(
            named(&schema, &app)
                .pool_size(8)
                .io_timeout(Duration::from_millis(200)),
            Duration::from_secs(5),
        );
        if i == 0 {
            // The first store made the schema.
            triggers(&schema, 1.5, 0.0, 0.0, 0);
        }
        // Both own connections open first.
        std::thread::scope(|scope| {
            for t in 0..2 {
                let store = &store;
                scope.spawn(move || {
                    for k in 0..20 {
                        let _ = store.execute_once(format!("w-{i}-{t}-{k}"), || Ok::<_, Io>(k));
                    }
                });
            }
        });
        let opened = store.__own_connections();
        std::thread::scope(|scope| {
            for t in 0..2 {
                let store = &store;
                scope.spawn(move || {
                    let r = store.execute_once(format!("slow-{i}-{t}"), || Ok::<_, Io>(t));
                    assert_eq!(storage_kind(&r), Some(StorageKind::Timeout));
                });
            }
        });
        let sleeping = sessions(&schema, &app)
            .iter()
            .filter(|s| s.wait_event == "PgSleep")
            .count();
        assert!(sleeping >= 1, "cut-off claims still run on the server");
        if inside_runtime {
            rt.block_on(async move { drop(store) });
        } else {
            drop(store);
        }
        wait_until("every session of the dropped store ended", || {
            sessions(&schema, &app).is_empty()
        });
        eprintln!("store {i}: {opened} own connections opened, {sleeping} cut off");
    }
}

// ---------------------------------------------------------------------------------------
// 7. A cut-off statement whose answer is still being read when the next callers come.

/// Promise (own.rs: a draining connection "serves again once [the marker] is answered
/// (every earlier answer then read)"; "the operation's answer or error is the caller's").
/// A lone sync claim is cut off on the own connection; its answer is 16 MB of notices, so
/// each later `take` reads only part of it (one turn) and finds the marker unanswered. Lone
/// sync calls meanwhile take the pooled path: each gets its own key's value, none an answer
/// of the cut-off statement or of the marker; once everything is read the same own
/// connection serves again (not lost, not replaced), and the cut-off key, retried once the
/// server is quiet, runs once.
#[test]
fn a_cut_off_claim_whose_answer_is_half_read_hands_no_caller_a_wrong_answer() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("adv2g_{}", schema.name);
    let (store, known) = filled_store(&schema, &app, Duration::from_millis(200));
    triggers(&schema, 0.0, 0.0, 0.3, 2000);
    store
        .execute_once("warm", || Ok::<_, Io>("warm".to_owned()))
        .expect("warm");
    let own_pid = own_sessions(&schema, &app, &known)[0].pid;
    let cut = store.execute_once("loudclaim-1", || Ok::<_, Io>("LOUD".to_owned()));
    assert_eq!(
        storage_kind(&cut),
        Some(StorageKind::Timeout),
        "{:?}",
        cut.map(|o| o.into_value())
    );
    let mut calls = 0;
    let served_again = loop {
        calls += 1;
        let key = format!("next-{calls}");
        let out = store
            .execute_once(&key, || Ok::<_, Io>(key.clone()))
            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        assert_eq!(*out, key, "a call got another statement's answer");
        let own = own_sessions(&schema, &app, &known);
        assert!(own.len() <= 1 && store.__own_connections() <= 1, "{own:?}");
        if own
            .iter()
            .any(|s| s.pid == own_pid && s.query.starts_with("UPDATE"))
        {
            break true;
        }
        if calls >= 400 || own.iter().all(|s| s.pid != own_pid) {
            break false;
        }
    };
    let own = own_sessions(&schema, &app, &known);
    eprintln!("served again after {calls} calls: {served_again}; {own:?}");
    assert!(
        served_again,
        "the own connection whose cut-off answer was read in parts serves again: {own:?}"
    );
    calm(&schema);
    let runs = AtomicUsize::new(0);
    let retry = store
        .execute_once("loudclaim-1", || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Io>("LOUD".to_owned())
        })
        .expect("the cut-off key, retried");
    assert_eq!(
        (retry.into_value(), runs.into_inner()),
        ("LOUD".to_owned(), 1)
    );
}

// ---------------------------------------------------------------------------------------
// 8. A server restart with a draining connection.

/// Promise (own.rs: a draining connection that ended is dropped and its count freed; at most
/// `max` exist; design §13: after a failed connect the pooled path serves; the budget). A
/// lone sync claim is cut off on the one own connection of a `pool_size` 4 store, and the
/// server restarts while it sleeps in it. Sync calls then recover (errors only while the
/// server is down), each key's value its own and run at most once plus once per in-doubt
/// call; the draining connection's count is freed and a new own connection serves, and it
/// too goes through a cut-off and serves again; the store stays within 7 sessions.
#[test]
fn a_server_restart_with_a_draining_connection_frees_its_count() {
    let Some(url) = pg_url() else { return };
    let Ok(restart) = std::env::var("IDEMSTORE_TEST_POSTGRES_RESTART") else {
        eprintln!("skipped: set IDEMSTORE_TEST_POSTGRES_RESTART");
        return;
    };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("adv2h_{}", schema.name);
    let store = open(
        named(&schema, &app)
            .pool_size(4)
            .lease(Duration::from_secs(1))
            .io_timeout(Duration::from_millis(300))
            .connect_timeout(Duration::from_secs(5)),
        Duration::from_secs(10),
    );
    triggers(&schema, 2.0, 0.0, 0.0, 0);
    let ledger = Ledger::default();
    assert!(noted_call(&store, &ledger, "warm"));
    let cut = store.execute_once("slow-r", || Ok::<_, Io>("slow-r".to_owned()));
    assert_eq!(storage_kind(&cut), Some(StorageKind::Timeout));
    assert_eq!(
        store.__own_connections(),
        1,
        "the cut-off connection is draining"
    );
    let status = std::process::Command::new("sh")
        .args(["-c", &restart])
        .status()
        .expect("run the restart command");
    assert!(status.success(), "the restart command failed: {status}");
    let mut n = 0;
    let mut in_a_row = 0;
    while in_a_row < 5 {
        n += 1;
        assert!(n < 200, "sync calls never recovered after the restart");
        if noted_call(&store, &ledger, &format!("after-{n}")) {
            in_a_row += 1;
        } else {
            in_a_row = 0;
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(
        store.__own_connections(),
        1,
        "one own connection, not the dead one too"
    );
    // The new own connection: a cut-off shows it (lone sync claims go on it).
    let cut = store.execute_once("slow-r2", || Ok::<_, Io>("slow-r2".to_owned()));
    assert_eq!(
        storage_kind(&cut),
        Some(StorageKind::Timeout),
        "{:?}",
        cut.map(|o| o.into_value())
    );
    let sleeping: Vec<i32> = sessions(&schema, &app)
        .iter()
        .filter(|s| s.wait_event == "PgSleep")
        .map(|s| s.pid)
        .collect();
    assert_eq!(sleeping.len(), 1, "the cut-off claim sleeps on one session");
    wait_until("the cut-off claim ended", || {
        sessions(&schema, &app)
            .iter()
            .all(|s| s.wait_event != "PgSleep")
    });
    for k in 0..4 {
        assert!(
            noted_call(&store, &ledger, &format!("last-{k}")),
            "last-{k}"
        );
    }
    let all = sessions(&schema, &app);
    let own = all.iter().find(|s| s.pid == sleeping[0]);
    assert!(
        own.is_some_and(|s| s.query.starts_with("UPDATE")),
        "the new own connection serves again after its cut-off: {all:?}"
    );
    assert!(all.len() <= 7, "past the budget: {all:?}");
    assert_eq!(store.__own_connections(), 1);
    calm(&schema);
    judge(&store, &ledger);
    let runs = AtomicUsize::new(0);
    for key in ["slow-r", "slow-r2"] {
        let out = store
            .execute_once(key, || {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Io>(key.to_owned())
            })
            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        assert_eq!(*out, key);
    }
    assert_eq!(
        runs.into_inner(),
        2,
        "each cut-off key ran once, when retried"
    );
    let rt = runtime();
    rt.block_on(async move { drop(store) });
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app).is_empty()
    });
}
