//! Adversarial tests of the paths added after the earlier reviews: PostgreSQL claim-first
//! (`claim_or_get`), `Call::forget_retryable_errors`, busy handling, and the async driver's
//! in-flight guard. Each test states the promise it checks; a failing test is a defect.
//!
//! Needs `IDEMSTORE_TEST_POSTGRES`; without it every test passes without running.

mod common;

use common::pg::{hex, pg_url, raw_session, PgSchema};
use idemstore::{Error, ExecuteError, Fingerprint, OrphanPolicy, PgOptions, PgStore, StoreBuilder};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

fn open_with(
    schema: &PgSchema,
    builder: impl FnOnce(StoreBuilder) -> StoreBuilder,
    tweak: impl FnOnce(PgOptions) -> PgOptions,
) -> PgStore {
    builder(StoreBuilder::default().sweep_interval(None))
        .open_postgres(tweak(schema.options()))
        .expect("open a PostgreSQL store")
}

/// The key's row as plain SQL sees it: (state, lease still running).
fn row_of(schema: &PgSchema, key: &str) -> Option<(i16, Option<bool>)> {
    schema
        .sql(&format!(
            "SELECT state, lease_until > now() FROM \"{{s}}\".records \
             WHERE key = '\\x{}'::bytea",
            hex(key.as_bytes())
        ))
        .first()
        .map(|r| (r.get(0), r.get(1)))
}

// ---------------------------------------------------------------------------------------
// 1. Claim-first / the rules on a Pending record of a holder elsewhere.

/// Promise (core/rules.rs `as_leader`, engine contract "liveness", `OrphanPolicy::Report`):
/// `Interrupted` is reported only for an orphan, a Pending record whose holder stopped; a
/// holder elsewhere that is running (or has just finished) is waited for (or its outcome
/// used), never reported as interrupted.
///
/// Attack: two replicas (two stores on one schema), orphan policy `Report`, nobody ever
/// crashes. Replica B keeps running short retryable attempts on one key; replica A keeps
/// calling the key too. A reads B's Pending record (claim-first's `Existing`, then the fresh
/// read), then asks the engine whether claim X is live in a second statement. If B finished X
/// in between, `holder_live` finds no Pending row for X and answers `false`, and the rules
/// take the *stale* Pending header plus "not live" for an orphan: `Interrupted`.
#[test]
fn report_never_calls_a_running_or_finished_holder_interrupted() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let replica = || {
        Arc::new(open_with(
            &schema,
            |b| {
                b.orphan_policy(OrphanPolicy::Report)
                    .wait_timeout(Duration::from_secs(20))
            },
            |o| o,
        ))
    };
    let (a, b) = (replica(), replica());
    let stop = Arc::new(AtomicBool::new(false));
    let interrupted = Arc::new(AtomicU32::new(0));
    let calls = Arc::new(AtomicU32::new(0));
    let worker = |store: Arc<PgStore>| {
        let (stop, interrupted, calls) = (stop.clone(), interrupted.clone(), calls.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let r = store.execute_once("busy-key", || {
                    std::thread::sleep(Duration::from_millis(2));
                    Err::<u32, _>("retry me")
                });
                calls.fetch_add(1, Ordering::SeqCst);
                match r {
                    Err(ExecuteError::Store(Error::Interrupted { .. })) => {
                        interrupted.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(ExecuteError::Operation { .. }) => {}
                    other => panic!("unexpected: {other:?}"),
                }
            }
        })
    };
    let threads = [worker(a), worker(b)];
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        interrupted.load(Ordering::SeqCst),
        0,
        "{} of {} calls were told Interrupted although no holder ever stopped",
        interrupted.load(Ordering::SeqCst),
        calls.load(Ordering::SeqCst)
    );
}

/// Promise (driver/execute.rs `claim_first`: "A call of this process runs the key: the
/// ordinary look decides (a mismatch is refused at once, ...)"; `Call::fingerprint`: a call
/// with a different fingerprint gets `FingerprintMismatch` and nothing runs).
///
/// Attack: two calls of one process, same new key, different fingerprints, started together.
/// The registry's leader is in its `claim_or_get` round trip when the follower reads the
/// key: absent, so the follower does not refuse but waits on the leader's whole run, and is
/// refused only when the run is over.
#[test]
fn a_mismatched_call_beside_a_running_claim_is_refused_at_once() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = Arc::new(open_with(
        &schema,
        |b| b.wait_timeout(Duration::from_secs(20)),
        |o| o,
    ));
    const RUN: Duration = Duration::from_millis(600);
    let mut late = Vec::new();
    for trial in 0..12 {
        let key = format!("fp-{trial}");
        let barrier = Arc::new(Barrier::new(2));
        let call = |fp: &'static str| {
            let (store, barrier, key) = (store.clone(), barrier.clone(), key.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let r = store
                    .call(key.as_str())
                    .fingerprint(Fingerprint::of(fp).unwrap())
                    .run(|| {
                        std::thread::sleep(RUN);
                        Ok::<_, std::io::Error>(fp.to_owned())
                    });
                (
                    r.map(|o| (*o).clone()).map_err(|e| e.to_string()),
                    started.elapsed(),
                )
            })
        };
        let (x, y) = (call("a"), call("b"));
        let results = [x.join().unwrap(), y.join().unwrap()];
        let refused: Vec<_> = results.iter().filter(|(r, _)| r.is_err()).collect();
        assert_eq!(refused.len(), 1, "exactly one of the two runs: {results:?}");
        let waited = refused[0].1;
        if waited >= RUN {
            late.push((trial, waited));
        }
    }
    assert!(
        late.is_empty(),
        "a mismatched call waited out the other call's whole run before it was refused \
         (trial, time to refusal): {late:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. The async in-flight guard.

/// Promise (driver/execute_async.rs, `InFlight`: "if the call's future is dropped before the
/// answer comes ... the claim may still be written; the engine is told it was interrupted,
/// so a shared engine ends its lease at once rather than leave the key held until the lease
/// runs out"; module docs: "a key is never stuck").
///
/// Attack: another transaction has an uncommitted row for the key, so the call's
/// `claim_or_get` insert waits on it (within the 250 ms lock wait). The call's future is
/// dropped meanwhile: `interrupted` sends `end_lease` at once, which finds no row (the claim
/// is not in yet) and does nothing. Then the other transaction rolls back, the claim's insert
/// goes in with a full lease, nobody renews it and nobody runs it, and every replica waits
/// for the whole lease.
#[test]
fn a_dropped_async_call_whose_claim_lands_late_does_not_hold_the_key() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let lease = Duration::from_secs(8);
    let a = open_with(&schema, |b| b, |o| o.lease(lease));
    let b = open_with(
        &schema,
        |b| b.wait_timeout(Duration::from_secs(3)),
        |o| o.lease(lease),
    );
    let key = "late-claim";
    // An ordinary service's pool: a few connections open and idle.
    std::thread::scope(|s| {
        for i in 0..4 {
            let a = &a;
            s.spawn(move || {
                a.execute_once(format!("warm-{i}"), || {
                    std::thread::sleep(Duration::from_millis(100));
                    Ok::<_, std::io::Error>(0u32)
                })
                .unwrap();
            });
        }
    });
    let (tx, rx) = mpsc::channel();
    let insert = format!(
        "BEGIN; INSERT INTO \"{}\".records (scope, key, record, digest, state, expires_ms, \
         claim_epoch, claim_seq, life_epoch, life_seq) \
         VALUES ('', '\\x{}'::bytea, '\\x00', '\\x00', 1, 0, 0, 0, 0, 0)",
        schema.name,
        hex(key.as_bytes())
    );
    let session = {
        let url = url.clone();
        std::thread::spawn(move || {
            raw_session(
                url,
                vec![
                    (insert, Duration::from_millis(150)),
                    ("ROLLBACK".into(), Duration::ZERO),
                ],
                tx,
            )
        })
    };
    assert_eq!(rx.recv().unwrap(), 0, "the other transaction's row is in");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ran = AtomicBool::new(false);
    let dropped = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(60),
            a.execute_once_async(key, || async {
                ran.store(true, Ordering::SeqCst);
                Ok::<_, std::io::Error>(1u32)
            }),
        )
        .await
    });
    assert!(
        dropped.is_err(),
        "the call was dropped while its claim waited"
    );
    assert!(!ran.load(Ordering::SeqCst));
    session.join().unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let row = row_of(&schema, key);
    eprintln!("row after the dropped call: {row:?}");
    // Another replica: the dropped call's claim is an orphan at once (Rerun) and runs here.
    let started = Instant::now();
    let r = b.execute_once(key, || Ok::<_, std::io::Error>(2u32));
    assert!(
        matches!(&r, Ok(o) if **o == 2),
        "after the dropped call, the key stayed held by a lease nobody renews or runs \
         (row: {row:?}, state 0 = Pending, lease running): another replica got {r:?} \
         after {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// 2. forget_retryable_errors, async, panic while settling.

/// Promise (driver/execute_async.rs module docs and `Phase::Settling`: a panic in user code
/// the store calls after the run is recorded as a retryable failure "as the plain driver's
/// claim guard does"; plain driver `release`: "A failed removal leaves the claim to the
/// orphan policy"; lease.rs: a claim is in `Leases` only "until its holder writes an outcome,
/// releases it, or abandons it").
///
/// Attack: an async call that forgets retryable errors; its operation fails (retryable) and
/// its `permanent_if` predicate panics, so the Settling guard removes the record. While it
/// does, another session holds the record's row lock longer than the I/O timeout, so the
/// removal fails. The plain driver then abandons the claim (the lease runs out, the orphan
/// policy takes it); the async guard only logs, so the heartbeat keeps renewing a claim whose
/// holder is gone, and the key is held for as long as the process lives.
#[test]
fn an_async_forget_call_whose_settling_removal_fails_leaves_an_orphan() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let lease = Duration::from_millis(1500);
    let a = Arc::new(open_with(
        &schema,
        |b| b,
        |o| o.lease(lease).io_timeout(Duration::from_secs(1)),
    ));
    let b = open_with(
        &schema,
        |b| b.wait_timeout(Duration::from_secs(4)),
        |o| o.lease(lease),
    );
    let key = "forget-settle";
    let (locked_tx, locked_rx) = mpsc::channel();
    let lock = format!(
        "BEGIN; SELECT 1 FROM \"{}\".records WHERE key = '\\x{}'::bytea FOR UPDATE",
        schema.name,
        hex(key.as_bytes())
    );
    let url2 = url.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let store = a.clone();
    let call = runtime.spawn(async move {
        store
            .call(key)
            .forget_retryable_errors()
            .permanent_if(|_: &String| -> bool { panic!("predicate panics while settling") })
            .run_async(|| async move {
                // Another session locks the claim's row (for longer than the I/O timeout).
                let session = std::thread::spawn(move || {
                    raw_session(
                        url2,
                        vec![
                            (lock, Duration::from_millis(1800)),
                            ("ROLLBACK".into(), Duration::ZERO),
                        ],
                        locked_tx,
                    )
                });
                assert_eq!(locked_rx.recv().unwrap(), 0);
                std::mem::forget(session);
                Err::<u32, String>("retryable".into())
            })
            .await
    });
    let joined = runtime.block_on(call);
    assert!(joined.is_err(), "the predicate's panic unwinds the call");
    // The lock is gone by now; give a lost claim more than its lease to run out.
    std::thread::sleep(Duration::from_millis(1200) + lease);
    let row = row_of(&schema, key);
    let started = Instant::now();
    let r = b.execute_once(key, || Ok::<_, std::io::Error>(7u32));
    assert!(
        matches!(&r, Ok(o) if **o == 7),
        "the unwound call's claim is still renewed by its process (row: {row:?}); another \
         replica got {r:?} after {:?}",
        started.elapsed()
    );
    drop(a);
}
