//! Adversarial tests of the PostgreSQL engine's first statement (cac3163, 912fada: a score of
//! recent first looks picks "claim first" -- INSERT .. ON CONFLICT DO NOTHING, then a SELECT if
//! the key is taken -- or "read first" -- a SELECT, then `claim_new`/`claim_over`) and of claim
//! tokens across stores (3303637: `fresh_epoch(floor)`, `schema::next_epoch`).
//!
//! A store's mode is steered from outside: a run of new keys leaves it claiming first, a run of
//! replays leaves it reading first (the score moves one step per first look, within +-8).
//!
//! Needs `IDEMSTORE_TEST_POSTGRES`; without it every test passes without running.

mod common;

use common::pg::{pg_url, PgSchema};
use common::XorShift;
use idemstore::{
    ClaimToken, Error, ExecuteError, Fingerprint, PgOptions, PgStore, RecordState, StepError,
    StoreBuilder,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

type Io = std::io::Error;

fn open(schema: &PgSchema, tweak: impl FnOnce(PgOptions) -> PgOptions) -> PgStore {
    StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(20))
        .open_postgres(tweak(schema.options()))
        .expect("open a PostgreSQL store")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    ClaimFirst,
    ReadFirst,
}

const MODES: [Mode; 2] = [Mode::ClaimFirst, Mode::ReadFirst];

/// Leaves `store` in `mode`: twenty first looks of one kind saturate the score (+-8).
fn steer(store: &PgStore, mode: Mode) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    match mode {
        Mode::ClaimFirst => {
            for _ in 0..20 {
                let key = format!("steer-new-{}", NEXT.fetch_add(1, Ordering::SeqCst));
                store
                    .execute_once(key.as_str(), || Ok::<_, Io>(0u8))
                    .expect("a new key");
            }
        }
        Mode::ReadFirst => {
            store
                .execute_once("steer-replayed", || Ok::<_, Io>(0u8))
                .expect("the replayed key");
            for _ in 0..20 {
                store
                    .execute_once("steer-replayed", || Ok::<_, Io>(0u8))
                    .expect("a replay");
            }
        }
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut XorShift) {
    for i in (1..v.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

fn deadline_guard(what: &'static str, limit: Duration) -> impl Drop {
    struct Guard(Arc<AtomicBool>);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&done);
    std::thread::spawn(move || {
        let start = Instant::now();
        while !seen.load(Ordering::SeqCst) {
            if start.elapsed() > limit {
                eprintln!("deadline passed: {what} hangs");
                std::process::abort();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    Guard(done)
}

// ---------------------------------------------------------------------------------------
// 1. Exactly once per key across replicas while the score flips.

/// Promise (design §1, README "Many replicas"): each key's operation runs once across
/// replicas and every caller gets the recorded outcome, whichever first statement each call
/// chose. Attack: three stores on one schema, four threads each, rounds of new keys (every
/// thread calls every key of the round, in its own order, so one run and eleven replays per
/// key race), with bursts of replays of old keys in between so each store's score swings
/// between claiming and reading first while other calls on the same keys are in flight.
#[test]
fn replicas_run_each_key_once_while_the_first_statement_flips() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("flipping replicas", Duration::from_secs(300));
    let schema = PgSchema::new(&url);
    let stores: Vec<PgStore> = (0..3).map(|_| open(&schema, |o| o)).collect();
    const ROUNDS: usize = 12;
    const PER_ROUND: usize = 24;
    let total = ROUNDS * PER_ROUND;
    let runs: Vec<AtomicU32> = (0..total).map(|_| AtomicU32::new(0)).collect();
    let next_run = AtomicU64::new(1);
    let seen: Mutex<HashMap<usize, HashSet<u64>>> = Mutex::new(HashMap::new());
    let barrier = std::sync::Barrier::new(12);
    std::thread::scope(|s| {
        for t in 0..12 {
            let store = &stores[t % 3];
            let (runs, next_run, seen, barrier) = (&runs, &next_run, &seen, &barrier);
            s.spawn(move || {
                let mut rng = XorShift(0x9e37_79b9_7f4a_7c15 ^ ((t as u64 + 1) * 7919));
                for round in 0..ROUNDS {
                    barrier.wait();
                    let mut keys: Vec<usize> =
                        (round * PER_ROUND..(round + 1) * PER_ROUND).collect();
                    shuffle(&mut keys, &mut rng);
                    // A burst of replays of old keys first on odd threads: their store turns to
                    // reading first while the other threads claim the round's new keys.
                    if t % 2 == 1 && round > 0 {
                        for _ in 0..10 {
                            let old = (rng.next() % (round * PER_ROUND) as u64) as usize;
                            keys.insert(0, old);
                        }
                    }
                    for i in keys {
                        let key = format!("k{i}");
                        let out = store.execute_once(key.as_str(), || {
                            runs[i].fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Io>(next_run.fetch_add(1, Ordering::SeqCst))
                        });
                        let out = out.unwrap_or_else(|e| panic!("{key}: {e:?}"));
                        seen.lock().unwrap().entry(i).or_default().insert(*out);
                    }
                }
            });
        }
    });
    let mut bad = Vec::new();
    let seen = seen.into_inner().unwrap();
    for (i, r) in runs.iter().enumerate() {
        let r = r.load(Ordering::SeqCst);
        let values = seen.get(&i).map_or(0, HashSet::len);
        if r != 1 || values != 1 {
            bad.push(format!("k{i}: {r} runs, {values} distinct outcomes"));
        }
    }
    assert!(bad.is_empty(), "exactly-once broken: {bad:?}");
}

/// As above, through the async API on a multi-thread runtime (claim_first_async / lead_async).
#[test]
fn async_replicas_run_each_key_once_while_the_first_statement_flips() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("async flipping replicas", Duration::from_secs(300));
    let schema = PgSchema::new(&url);
    let stores: Vec<Arc<PgStore>> = (0..3).map(|_| Arc::new(open(&schema, |o| o))).collect();
    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 24;
    let total = ROUNDS * PER_ROUND;
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..total).map(|_| AtomicU32::new(0)).collect());
    let next_run = Arc::new(AtomicU64::new(1));
    let seen: Arc<Mutex<HashMap<usize, HashSet<u64>>>> = Arc::default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for round in 0..ROUNDS {
            let mut tasks = Vec::new();
            for t in 0..12usize {
                let store = Arc::clone(&stores[t % 3]);
                let (runs, next_run, seen) =
                    (Arc::clone(&runs), Arc::clone(&next_run), Arc::clone(&seen));
                tasks.push(tokio::spawn(async move {
                    let mut rng = XorShift((round as u64 + 1) * 1_000_003 + t as u64 * 31 + 1);
                    let mut keys: Vec<usize> =
                        (round * PER_ROUND..(round + 1) * PER_ROUND).collect();
                    shuffle(&mut keys, &mut rng);
                    if t % 2 == 1 && round > 0 {
                        for _ in 0..10 {
                            keys.insert(0, (rng.next() % (round * PER_ROUND) as u64) as usize);
                        }
                    }
                    for i in keys {
                        let key = format!("k{i}");
                        let runs2 = Arc::clone(&runs);
                        let next2 = Arc::clone(&next_run);
                        let out = store
                            .execute_once_async(key.as_str(), move || async move {
                                runs2[i].fetch_add(1, Ordering::SeqCst);
                                Ok::<_, Io>(next2.fetch_add(1, Ordering::SeqCst))
                            })
                            .await
                            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
                        seen.lock().unwrap().entry(i).or_default().insert(*out);
                    }
                }));
            }
            for task in tasks {
                task.await.expect("task");
            }
        }
    });
    let seen = seen.lock().unwrap();
    let bad: Vec<String> = (0..total)
        .filter_map(|i| {
            let r = runs[i].load(Ordering::SeqCst);
            let v = seen.get(&i).map_or(0, HashSet::len);
            (r != 1 || v != 1).then(|| format!("k{i}: {r} runs, {v} outcomes"))
        })
        .collect();
    assert!(bad.is_empty(), "exactly-once broken: {bad:?}");
}

// ---------------------------------------------------------------------------------------
// 2. Removal and expiry between the INSERT and the SELECT.

/// Promise: typed errors, never a panic or a hang; a replay returns an outcome some run of
/// that key recorded. Attack: claim-first callers on a handful of keys while another thread
/// removes the keys in a loop (the INSERT conflicts, the record goes before the SELECT: the
/// driver must look again) and records expire after a few milliseconds.
#[test]
fn removals_and_expiries_between_insert_and_select_stay_typed() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("removal races", Duration::from_secs(240));
    let schema = PgSchema::new(&url);
    let a = open(&schema, |o| o);
    let b = open(&schema, |o| o);
    let produced: Mutex<HashMap<String, HashSet<u64>>> = Mutex::new(HashMap::new());
    let next = AtomicU64::new(1);
    let stop = AtomicBool::new(false);
    let replays: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());
    let unexpected: Mutex<Vec<String>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..4 {
            let store = if t % 2 == 0 { &a } else { &b };
            let (produced, next, stop, replays, unexpected) =
                (&produced, &next, &stop, &replays, &unexpected);
            s.spawn(move || {
                let mut rng = XorShift(t as u64 * 977 + 5);
                for n in 0..400 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let key = format!("r{}", rng.next() % 4);
                    let mut call = store.call(key.as_str());
                    if n % 3 == 0 {
                        call = call.ttl(Duration::from_millis(5));
                    }
                    let out = call.run(|| {
                        let v = next.fetch_add(1, Ordering::SeqCst);
                        produced
                            .lock()
                            .unwrap()
                            .entry(key.clone())
                            .or_default()
                            .insert(v);
                        Ok::<_, Io>(v)
                    });
                    match out {
                        Ok(out) if out.is_replayed() => {
                            replays.lock().unwrap().push((key.clone(), *out));
                        }
                        Ok(_) => {}
                        // The documented answer of a holder whose record was removed.
                        Err(ExecuteError::Store(Error::OutcomeNotRecorded { .. })) => {}
                        Err(e) => unexpected.lock().unwrap().push(format!("{key}: {e:?}")),
                    }
                }
            });
        }
        s.spawn(|| {
            for n in 0..3000 {
                let key = format!("r{}", n % 4);
                if let Err(e) = a.remove(key.as_str()) {
                    unexpected
                        .lock()
                        .unwrap()
                        .push(format!("remove {key}: {e:?}"));
                }
                if n % 7 == 0 {
                    let _ = b.sweep_now();
                }
            }
            stop.store(true, Ordering::SeqCst);
        });
    });
    let unexpected = unexpected.into_inner().unwrap();
    assert!(unexpected.is_empty(), "unexpected errors: {unexpected:?}");
    let produced = produced.into_inner().unwrap();
    for (key, v) in replays.into_inner().unwrap() {
        assert!(
            produced.get(&key).is_some_and(|s| s.contains(&v)),
            "{key} replayed {v}, which no run of it produced"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. Takeovers of orphans in each mode.

/// Promise (design §2, §13): once a holder's lease ends, exactly one replica takes the key
/// over (the documented crash window allows that one re-run, not two), every caller gets the
/// taker's outcome, the taker's token exceeds the orphan's, and the old holder's late write is
/// fenced out. Attack: the holder's lease is ended while it runs; two other replicas, both
/// steered into one mode, race the takeover.
#[test]
fn one_takeover_of_an_orphan_in_each_mode() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("takeovers", Duration::from_secs(240));
    for mode in MODES {
        let schema = PgSchema::new(&url);
        let a = open(&schema, |o| o);
        let b = open(&schema, |o| o);
        let c = open(&schema, |o| o);
        steer(&b, mode);
        steer(&c, mode);
        let runs = AtomicU32::new(0);
        let (holding_tx, holding) = mpsc::channel::<()>();
        let (release_tx, release) = mpsc::channel::<()>();
        let release = Mutex::new(release);
        let (held, b_out, c_out, orphan) = std::thread::scope(|s| {
            let holder = s.spawn(|| {
                a.execute_once("orphan", || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    holding_tx.send(()).unwrap();
                    release.lock().unwrap().recv().unwrap();
                    Ok::<_, Io>(1u32)
                })
            });
            holding.recv().unwrap();
            let orphan = a.record("orphan").unwrap().expect("pending");
            assert_eq!(orphan.state, RecordState::Pending);
            a.__lapse_leases().unwrap();
            let take = |store: &PgStore, v: u32| {
                store.execute_once("orphan", || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(50));
                    Ok::<_, Io>(v)
                })
            };
            let (b_out, c_out) = std::thread::scope(|s2| {
                let bt = s2.spawn(|| take(&b, 2));
                let ct = s2.spawn(|| take(&c, 3));
                (bt.join().unwrap(), ct.join().unwrap())
            });
            release_tx.send(()).unwrap();
            (holder.join().unwrap(), b_out, c_out, orphan)
        });
        let b_out = b_out.unwrap_or_else(|e| panic!("{mode:?}: b: {e:?}"));
        let c_out = c_out.unwrap_or_else(|e| panic!("{mode:?}: c: {e:?}"));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "{mode:?}: the holder plus exactly one takeover should run"
        );
        assert_eq!(*b_out, *c_out, "{mode:?}: b and c saw different outcomes");
        let taker = if b_out.is_replayed() { &c_out } else { &b_out };
        assert!(
            taker.record().claim > orphan.claim,
            "{mode:?}: takeover token {:?} not above the orphan's {:?}",
            taker.record().claim,
            orphan.claim
        );
        assert!(
            matches!(held, Err(ExecuteError::Store(Error::LeaseLost { .. }))),
            "{mode:?}: the old holder's write was not fenced out: {held:?}"
        );
        let now = a.execute_once("orphan", || Ok::<_, Io>(9u32)).unwrap();
        assert!(
            now.is_replayed() && *now == *b_out,
            "{mode:?}: final {now:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. Tokens grow and are unique across stores racing retries and takeovers.

/// Promise (design §3): claim tokens strictly grow within a key's life, whichever replica
/// claims, and no two claims get the same token. Attack: three stores opened one after the
/// other (so two of them keep finding records written under a higher epoch) race retries of
/// keys whose runs fail retryably, in both modes; each run notes its attempt and token.
#[test]
fn tokens_grow_and_stay_unique_across_racing_replicas() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("token races", Duration::from_secs(240));
    let schema = PgSchema::new(&url);
    let stores: Vec<PgStore> = (0..3).map(|_| open(&schema, |o| o)).collect();
    let log: Mutex<Vec<(String, u32, ClaimToken)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..6 {
            let store = &stores[t % 3];
            let log = &log;
            s.spawn(move || {
                let mut rng = XorShift(t as u64 * 131 + 17);
                for n in 0..150 {
                    if n % 50 == 0 {
                        steer(
                            store,
                            if (n / 50 + t) % 2 == 0 {
                                Mode::ClaimFirst
                            } else {
                                Mode::ReadFirst
                            },
                        );
                    }
                    let key = format!("t{}", rng.next() % 6);
                    let r = store.execute_steps(key.as_str(), |ctx| {
                        log.lock()
                            .unwrap()
                            .push((key.clone(), ctx.attempt(), ctx.claim_token()));
                        Err::<u32, _>(StepError::Failed(Io::other("again")))
                    });
                    match r {
                        Err(ExecuteError::Operation { .. }) => {}
                        Err(e) => panic!("{key}: {e:?}"),
                        Ok(v) => panic!("{key}: ran to {v:?}"),
                    }
                }
            });
        }
    });
    let log = log.into_inner().unwrap();
    let mut all = HashSet::new();
    for (_, _, token) in &log {
        assert!(all.insert(*token), "token {token:?} handed out twice");
    }
    let mut by_key: HashMap<&str, Vec<(u32, ClaimToken)>> = HashMap::new();
    for (k, attempt, token) in &log {
        by_key
            .entry(k.as_str())
            .or_default()
            .push((*attempt, *token));
    }
    for (k, mut v) in by_key {
        v.sort();
        for w in v.windows(2) {
            assert!(w[0].0 < w[1].0, "{k}: attempt {} ran twice", w[0].0);
            assert!(
                w[0].1 < w[1].1,
                "{k}: attempt {} got token {:?}, not above attempt {}'s {:?}",
                w[1].0,
                w[1].1,
                w[0].0,
                w[0].1
            );
        }
    }
}

/// Promise (engine contract: "`fresh_epoch` returns an epoch larger than its floor and every
/// one handed out"; `schema::next_epoch`: "the sequence ... never goes back and no epoch is
/// handed out twice"). Attack: two replicas import records of other stores at once (an import
/// raises the epoch above every moved-in one), with different floors. `raise_epoch` reads
/// `last_value` and then calls `setval` -- not one atomic step -- so when both read the old
/// value before either sets, the lower floor's `setval` can land last and move the sequence
/// back under the epoch the other replica just took. The row-level interleaving is lined up
/// by holding the sequence's lock (ALTER SEQUENCE in an open transaction) until both
/// statements wait on it (each has read `last_value` by then).
#[test]
fn concurrent_epoch_raises_never_move_the_sequence_back() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("epoch raises", Duration::from_secs(240));
    // Two exports: "ka" claimed under epoch ~5001, "kb" under epoch ~3001.
    let src = PgSchema::new(&url);
    let first = open(&src, |o| o);
    drop(first);
    src.sql("SELECT setval('{s}.epochs', 5000)");
    let high = open(&src, |o| o);
    high.execute_once("ka", || Ok::<_, Io>(1u8)).unwrap();
    src.sql("SELECT setval('{s}.epochs', 3000)");
    let low = open(&src, |o| o);
    low.execute_once("kb", || Ok::<_, Io>(2u8)).unwrap();
    let mut export = Vec::new();
    low.export(&mut export, |_| {}).unwrap();
    let text = String::from_utf8(export).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let pick = |hexkey: &str| {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("\"key\":\"{hexkey}\"")))
            .expect("the key's line");
        format!("{}\n{}\n{{\"end\":1}}\n", lines[0], line)
    };
    let file_a = pick("6b61");
    let file_b = pick("6b62");
    let (ka_epoch, kb_epoch) = (
        high.record("ka").unwrap().unwrap().claim.epoch,
        low.record("kb").unwrap().unwrap().claim.epoch,
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut failures = Vec::new();
    let mut decided = 0;
    for trial in 0..12 {
        let dest = PgSchema::new(&url);
        let da = open(&dest, |o| o);
        let db = open(&dest, |o| o);
        let (locker, connection) = runtime
            .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
            .unwrap();
        let conn_task = runtime.spawn(connection);
        runtime
            .block_on(locker.batch_execute(&format!(
                "BEGIN; ALTER SEQUENCE \"{}\".epochs INCREMENT BY 1",
                dest.name
            )))
            .unwrap();
        let waiting = format!(
            "SELECT count(*) FROM pg_locks WHERE relation = '\"{}\".epochs'::regclass \
             AND NOT granted",
            dest.name
        );
        let (ra, rb) = std::thread::scope(|s| {
            let ia = s.spawn(|| da.import(file_a.as_bytes(), |_| {}));
            let ib = s.spawn(|| db.import(file_b.as_bytes(), |_| {}));
            let start = Instant::now();
            loop {
                let n: i64 = runtime
                    .block_on(locker.query_one(&waiting, &[]))
                    .unwrap()
                    .get(0);
                if n >= 2 || start.elapsed() > Duration::from_millis(400) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            runtime.block_on(locker.batch_execute("COMMIT")).unwrap();
            (ia.join().unwrap(), ib.join().unwrap())
        });
        drop(locker);
        let _ = runtime.block_on(conn_task);
        let (Ok(_), Ok(_)) = (&ra, &rb) else {
            // A lock wait outlasted the engine's lock_timeout: not lined up; try again.
            eprintln!("trial {trial}: import failed ({ra:?} / {rb:?}), again");
            continue;
        };
        decided += 1;
        let last: i64 = dest.sql("SELECT last_value FROM {s}.epochs")[0].get(0);
        let (ea, eb) = (da.epoch(), db.epoch());
        if ea <= ka_epoch || eb <= kb_epoch || ea == eb || (last as u64) < ea.max(eb) {
            failures.push(format!(
                "trial {trial}: fresh_epoch({ka_epoch}) gave {ea}, fresh_epoch({kb_epoch}) gave \
                 {eb}; the sequence is now at {last}"
            ));
            // Show the duplicate: a replica opened once the sequence catches up again.
            let mut reused = None;
            if (last as u64) < ea.max(eb) {
                dest.sql(&format!(
                    "SELECT setval('{{s}}.epochs', {})",
                    ea.max(eb) - 1
                ));
                let late = open(&dest, |o| o);
                reused = Some(late.epoch());
            }
            failures.push(format!("  a replica opened later got epoch {reused:?}"));
            break;
        }
    }
    assert!(
        failures.is_empty(),
        "epoch sequence moved back: {failures:#?}"
    );
    eprintln!("epoch raises: {decided} decided trials passed");
}

// ---------------------------------------------------------------------------------------
// 5. Async callers never block a runtime worker, in either mode.

/// Promise (README, design §13): async callers never block a runtime worker on a round trip.
/// Attack: a current-thread runtime; the key's row is locked FOR UPDATE by another
/// connection (the claim over it waits on the lock, then retries), and a row of a live
/// outcome has an uncommitted UPDATE (a claim-first INSERT waits on it). A ticking task on the
/// same runtime must keep ticking while the calls wait.
#[test]
fn async_calls_on_locked_rows_do_not_block_a_current_thread_runtime() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("async locked rows", Duration::from_secs(240));
    for mode in MODES {
        for lock in [
            "FOR UPDATE on a retryable record",
            "UPDATE of a live outcome",
        ] {
            let schema = PgSchema::new(&url);
            let store = Arc::new(open(&schema, |o| o));
            let key = "locked";
            match lock {
                "FOR UPDATE on a retryable record" => {
                    let _ = store.execute_once(key, || Err::<u32, _>(Io::other("retry")));
                }
                _ => {
                    store.execute_once(key, || Ok::<_, Io>(7u32)).unwrap();
                }
            }
            steer(&store, mode);
            let statement = match lock {
                "FOR UPDATE on a retryable record" => format!(
                    "BEGIN; SELECT 1 FROM \"{}\".records WHERE key = 'locked'::bytea FOR UPDATE",
                    schema.name
                ),
                _ => format!(
                    "BEGIN; UPDATE \"{}\".records SET waiters = waiters WHERE key = 'locked'::bytea",
                    schema.name
                ),
            };
            let side = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (locker, connection) = side
                .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
                .unwrap();
            let conn_task = side.spawn(connection);
            side.block_on(locker.batch_execute(&statement)).unwrap();

            let ticks = Arc::new(AtomicU64::new(0));
            let finished = Arc::new(AtomicBool::new(false));
            let worker = {
                let (store, ticks, finished) = (
                    Arc::clone(&store),
                    Arc::clone(&ticks),
                    Arc::clone(&finished),
                );
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let ticker = {
                            let ticks = Arc::clone(&ticks);
                            tokio::spawn(async move {
                                loop {
                                    ticks.fetch_add(1, Ordering::SeqCst);
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                }
                            })
                        };
                        // Let the ticker start.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let out = store
                            .execute_once_async(key, || async { Ok::<_, Io>(8u32) })
                            .await;
                        finished.store(true, Ordering::SeqCst);
                        ticker.abort();
                        out
                    })
                })
            };
            // Wait until the call is in flight (the ticker has started), then watch the ticks
            // while the lock is held.
            common::wait_until("the ticker starts", || ticks.load(Ordering::SeqCst) > 2);
            std::thread::sleep(Duration::from_millis(100));
            let before = ticks.load(Ordering::SeqCst);
            let was_done = finished.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(800));
            let after = ticks.load(Ordering::SeqCst);
            let still_waiting = !finished.load(Ordering::SeqCst);
            side.block_on(locker.batch_execute("COMMIT")).unwrap();
            drop(locker);
            let _ = side.block_on(conn_task);
            let out = worker.join().expect("worker");
            let out = out.unwrap_or_else(|e| panic!("{mode:?}, {lock}: {e:?}"));
            if !was_done && still_waiting {
                assert!(
                    after > before + 5,
                    "{mode:?}, {lock}: the runtime's other task stopped ticking while the call \
                     waited ({before} -> {after} ticks)"
                );
            }
            match lock {
                "FOR UPDATE on a retryable record" => assert_eq!(*out, 8, "{mode:?}"),
                _ => assert!(out.is_replayed() && *out == 7, "{mode:?}: {out:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 6. Steps and fingerprints under both modes.

/// Promise (design §2, steps): a takeover replays the orphan's recorded steps and runs only
/// the rest; each step runs once per life. Attack: the holder records step one and stalls;
/// its lease ends; a replica in each mode takes over.
#[test]
fn a_takeover_replays_recorded_steps_in_each_mode() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("steps takeovers", Duration::from_secs(240));
    for mode in MODES {
        let schema = PgSchema::new(&url);
        let a = open(&schema, |o| o);
        let b = open(&schema, |o| o);
        steer(&b, mode);
        let one = AtomicU32::new(0);
        let two = AtomicU32::new(0);
        let (holding_tx, holding) = mpsc::channel::<()>();
        let (release_tx, release) = mpsc::channel::<()>();
        let release = Mutex::new(release);
        let (held, taken) = std::thread::scope(|s| {
            let holder = s.spawn(|| {
                a.execute_steps("s", |ctx| {
                    let x = ctx.step("one", || {
                        one.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Io>(41u32)
                    })?;
                    holding_tx.send(()).unwrap();
                    release.lock().unwrap().recv().unwrap();
                    // The holder outlived its lease (the documented window): its step may
                    // run, its write is fenced out.
                    let y = ctx.step("two", || Ok::<_, Io>(1u32))?;
                    Ok::<_, StepError<Io>>(x + y)
                })
            });
            holding.recv().unwrap();
            a.__lapse_leases().unwrap();
            let taken = b.execute_steps("s", |ctx| {
                let x = ctx.step("one", || {
                    one.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Io>(0u32)
                })?;
                let y = ctx.step("two", || {
                    two.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Io>(1u32)
                })?;
                Ok::<_, StepError<Io>>(x + y)
            });
            release_tx.send(()).unwrap();
            (holder.join().unwrap(), taken)
        });
        let taken = taken.unwrap_or_else(|e| panic!("{mode:?}: {e:?}"));
        assert_eq!(*taken, 42, "{mode:?}: step one was not replayed");
        assert_eq!(
            one.load(Ordering::SeqCst),
            1,
            "{mode:?}: step one ran twice"
        );
        assert_eq!(
            two.load(Ordering::SeqCst),
            1,
            "{mode:?}: the taker ran step two {} times",
            two.load(Ordering::SeqCst)
        );
        assert!(held.is_err(), "{mode:?}: the old holder finished: {held:?}");
    }
}

/// Promise (design §1): a call whose fingerprint differs from the recorded one is refused
/// with `FingerprintMismatch`, never run and never replayed; a race of two first calls with
/// different fingerprints runs once. Attack: each mode, on a live outcome, on a Pending record
/// of another replica, and racing from two replicas.
#[test]
fn fingerprint_mismatches_are_refused_in_each_mode() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("fingerprints", Duration::from_secs(240));
    let f1 = Fingerprint::of_bytes(b"one");
    let f2 = Fingerprint::of_bytes(b"two");
    for mode in MODES {
        let schema = PgSchema::new(&url);
        let a = open(&schema, |o| o);
        let b = open(&schema, |o| o);
        a.call("done")
            .fingerprint(f1)
            .run(|| Ok::<_, Io>(1u32))
            .unwrap();
        steer(&b, mode);
        let r = b.call("done").fingerprint(f2).run(|| Ok::<_, Io>(2u32));
        assert!(
            matches!(
                r,
                Err(ExecuteError::Store(Error::FingerprintMismatch { .. }))
            ),
            "{mode:?}: {r:?}"
        );
        steer(&b, mode);
        let r = b
            .call("done")
            .fingerprint(f1)
            .run(|| Ok::<_, Io>(2u32))
            .unwrap();
        assert!(r.is_replayed() && *r == 1, "{mode:?}");

        // Races of first calls with different fingerprints, both replicas in `mode`.
        steer(&a, mode);
        steer(&b, mode);
        let runs = AtomicU32::new(0);
        for i in 0..30 {
            let key = format!("race{i}");
            let (ra, rb) = std::thread::scope(|s| {
                let ta = s.spawn(|| {
                    a.call(key.as_str()).fingerprint(f1).run(|| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Io>(1u32)
                    })
                });
                let tb = s.spawn(|| {
                    b.call(key.as_str()).fingerprint(f2).run(|| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Io>(2u32)
                    })
                });
                (ta.join().unwrap(), tb.join().unwrap())
            });
            let ok = [ra.is_ok(), rb.is_ok()];
            let refused = |r: &Result<_, ExecuteError<Io>>| {
                matches!(
                    r,
                    Err(ExecuteError::Store(Error::FingerprintMismatch { .. }))
                )
            };
            assert!(
                ok.iter().filter(|x| **x).count() == 1 && (refused(&ra) || refused(&rb)),
                "{mode:?} {key}: {ra:?} / {rb:?}"
            );
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            30,
            "{mode:?}: a race ran twice"
        );
    }
}

/// Promise (design §3, `Store::import`: "every later claim's token is larger than theirs"):
/// a retry's token exceeds the token of the record it replaces. Attack: an import of two
/// retryable records (epochs ~5001 and ~3001) into a schema whose sequence is low; while the
/// import raises the sequence, two replicas retry the two keys, each asking
/// `fresh_epoch(floor)` with its record's epoch as the floor. The three `raise_epoch`
/// statements are lined up on the sequence's lock; when the lowest floor's `setval` lands
/// last, the sequence drops to ~3001 and the replica retrying the 5001 record takes an epoch
/// below it: `next_claim_token_from` uses what `fresh_epoch` returned without checking it.
#[test]
fn racing_retries_of_imported_records_get_tokens_above_them() {
    let Some(url) = pg_url() else { return };
    let _g = deadline_guard("retries of imported records", Duration::from_secs(240));
    let src = PgSchema::new(&url);
    drop(open(&src, |o| o));
    src.sql("SELECT setval('{s}.epochs', 5000)");
    let high = open(&src, |o| o);
    let _ = high.execute_once("ka", || Err::<u8, _>(Io::other("retry")));
    src.sql("SELECT setval('{s}.epochs', 3000)");
    let low = open(&src, |o| o);
    let _ = low.execute_once("kb", || Err::<u8, _>(Io::other("retry")));
    let mut export = Vec::new();
    low.export(&mut export, |_| {}).unwrap();
    let ka_token = high.record("ka").unwrap().unwrap().claim;
    let kb_token = low.record("kb").unwrap().unwrap().claim;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut failures = Vec::new();
    let mut decided = 0;
    for trial in 0..15 {
        let dest = PgSchema::new(&url);
        let di = open(&dest, |o| o);
        let da = open(&dest, |o| o);
        let db = open(&dest, |o| o);
        let (locker, connection) = runtime
            .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
            .unwrap();
        let conn_task = runtime.spawn(connection);
        runtime
            .block_on(locker.batch_execute(&format!(
                "BEGIN; ALTER SEQUENCE \"{}\".epochs INCREMENT BY 1",
                dest.name
            )))
            .unwrap();
        let waiting = format!(
            "SELECT count(*) FROM pg_locks WHERE relation = '\"{}\".epochs'::regclass \
             AND NOT granted",
            dest.name
        );
        // How many statements wait on the sequence's lock now.
        let count = |_n: i64| -> i64 {
            runtime
                .block_on(locker.query_one(&waiting, &[]))
                .unwrap()
                .get(0)
        };
        let (ri, ra, rb) = std::thread::scope(|s| {
            let ti = s.spawn(|| di.import(export.as_slice(), |_| {}));
            // The import has written both records once its raise waits on the lock.
            let start = Instant::now();
            while count(1) < 1 && start.elapsed() < Duration::from_millis(200) {}
            let ta = s.spawn(|| da.execute_once("ka", || Ok::<_, Io>(1u8)));
            let tb = s.spawn(|| db.execute_once("kb", || Ok::<_, Io>(2u8)));
            let start = Instant::now();
            while count(3) < 3 && start.elapsed() < Duration::from_millis(150) {}
            runtime.block_on(locker.batch_execute("COMMIT")).unwrap();
            (ti.join().unwrap(), ta.join().unwrap(), tb.join().unwrap())
        });
        drop(locker);
        let _ = runtime.block_on(conn_task);
        let (Ok(_), Ok(a), Ok(b)) = (&ri, &ra, &rb) else {
            eprintln!("trial {trial}: not lined up ({ri:?} / {ra:?} / {rb:?}), again");
            continue;
        };
        decided += 1;
        let (ta, tb) = (a.record().claim, b.record().claim);
        if ta <= ka_token || tb <= kb_token {
            failures.push(format!(
                "trial {trial}: retry of ka got token {ta:?} over the record's {ka_token:?}; \
                 retry of kb got {tb:?} over {kb_token:?}"
            ));
            break;
        }
    }
    assert!(failures.is_empty(), "tokens went down: {failures:#?}");
    eprintln!("imported retries: {decided} decided trials passed");
}
