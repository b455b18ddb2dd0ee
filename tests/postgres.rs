//! The PostgreSQL engine with real processes: many replicas on overlapping keys, a holder
//! killed with SIGKILL, a holder paused with SIGSTOP past its lease, and the faults a shared
//! server brings (a terminated backend, a statement timeout). Every side effect is counted in
//! a log outside the store; every test runs in a schema of its own, dropped afterwards.
//!
//! Needs `IDEMSTORE_TEST_POSTGRES` (a connection string); without it every test says it was
//! skipped and passes. The server restart is in `tests/postgres_restart.rs`.

mod common;

use common::pg::{pg_url, PgSchema};
use common::{store_error, ChildProcess, PATIENCE};
use idemstore::{Error, ExecuteError, OrphanPolicy, PgOptions, PgStore, StorageKind, StoreBuilder};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const URL_VAR: &str = "IDEMSTORE_PG_TEST_URL";
const SCHEMA_VAR: &str = "IDEMSTORE_PG_TEST_SCHEMA";
const DIR_VAR: &str = "IDEMSTORE_PG_TEST_DIR";
const WORKER_VAR: &str = "IDEMSTORE_PG_TEST_WORKER";
const LEASE_VAR: &str = "IDEMSTORE_PG_TEST_LEASE_MS";

/// Appends one line to the side-effect log at `path` (one `write` with O_APPEND: lines of
/// concurrent processes never interleave).
fn log_effect(path: &Path, line: &str) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open the side-effect log");
    file.write_all(format!("{line}\n").as_bytes())
        .expect("append to the side-effect log");
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

/// What a child process needs: the server, the schema, a scratch directory, its number.
struct ChildEnv {
    url: String,
    schema: String,
    dir: PathBuf,
    worker: String,
    lease: Duration,
}

impl ChildEnv {
    fn read() -> Self {
        let var = |v: &str| std::env::var(v).expect("set by the parent test");
        Self {
            url: var(URL_VAR),
            schema: var(SCHEMA_VAR),
            dir: PathBuf::from(var(DIR_VAR)),
            worker: var(WORKER_VAR),
            lease: Duration::from_millis(var(LEASE_VAR).parse().expect("lease ms")),
        }
    }

    fn open(&self, pool: usize) -> PgStore {
        StoreBuilder::default()
            .wait_timeout(PATIENCE)
            .sweep_interval(None)
            .open_postgres(
                PgOptions::new(&self.url)
                    .schema(&self.schema)
                    .lease(self.lease)
                    .pool_size(pool),
            )
            .expect("open the store")
    }
}

fn spawn_child(
    test: &str,
    schema: &PgSchema,
    dir: &Path,
    worker: &str,
    lease: Duration,
) -> ChildProcess {
    let lease = lease.as_millis().to_string();
    ChildProcess::spawn_test(
        test,
        &[
            (URL_VAR, schema.url.as_ref()),
            (SCHEMA_VAR, schema.name.as_ref()),
            (DIR_VAR, dir.as_os_str()),
            (WORKER_VAR, worker.as_ref()),
            (LEASE_VAR, lease.as_ref()),
        ],
    )
    .labelled(format!("{test} {worker}"))
}

fn parent_store(schema: &PgSchema, lease: Duration) -> PgStore {
    StoreBuilder::default()
        .wait_timeout(PATIENCE)
        .sweep_interval(None)
        .open_postgres(schema.options().lease(lease))
        .expect("open the store")
}

// ---------------------------------------------------------------------------------------
// Many processes.

const PROCESSES: usize = 4;
const THREADS: usize = 8;
const KEYS: usize = 48;

/// Four processes of eight threads each call every key, in different orders: each key's
/// operation runs once in all (by the side-effect log), and every caller gets that outcome.
#[test]
fn many_processes_on_overlapping_keys_run_each_key_once() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let dir = tempfile::tempdir().expect("scratch dir");
    // The schema exists before the children race to open it (they also migrate safely).
    drop(parent_store(&schema, Duration::from_secs(10)));
    let children: Vec<ChildProcess> = (0..PROCESSES)
        .map(|w| {
            spawn_child(
                "pg_worker",
                &schema,
                dir.path(),
                &w.to_string(),
                Duration::from_secs(10),
            )
        })
        .collect();
    for child in children {
        assert!(child.wait_exit().success(), "a worker failed");
    }
    let effects = read_lines(&dir.path().join("effects"));
    let mut ran: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in &effects {
        let (key, who) = line.split_once(' ').expect("key who");
        ran.entry(key.to_owned()).or_default().push(who.to_owned());
    }
    assert_eq!(ran.len(), KEYS, "every key ran");
    for (key, runs) in &ran {
        assert_eq!(runs.len(), 1, "{key} ran more than once: {runs:?}");
    }
    let mut answers = 0;
    for w in 0..PROCESSES {
        for line in read_lines(&dir.path().join(format!("results-{w}"))) {
            let (key, value) = line.split_once(' ').expect("key value");
            assert_eq!(
                value, ran[key][0],
                "{key}: every caller gets the one outcome"
            );
            answers += 1;
        }
    }
    assert_eq!(answers, PROCESSES * THREADS * KEYS, "every call answered");
}

#[test]
#[ignore = "run as a child process by many_processes_on_overlapping_keys_run_each_key_once"]
fn pg_worker() {
    let env = ChildEnv::read();
    let store = env.open(THREADS);
    let effects = env.dir.join("effects");
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (store, effects, results, env) = (&store, &effects, &results, &env);
            s.spawn(move || {
                let worker: usize = env.worker.parse().expect("worker number");
                for i in 0..KEYS {
                    // Different processes and threads walk the keys in different orders.
                    let key = format!("order-{}", (i * 7 + worker * 13 + t * 5) % KEYS);
                    let me = format!("{}/{t}", env.worker);
                    let out = store
                        .execute_once(&key, || {
                            log_effect(effects, &format!("{key} {me}"));
                            std::thread::sleep(Duration::from_millis(2));
                            Ok::<_, std::io::Error>(me.clone())
                        })
                        .expect("every call succeeds");
                    results
                        .lock()
                        .expect("results")
                        .push(format!("{key} {}", *out));
                }
            });
        }
    });
    let results = results.into_inner().expect("results");
    std::fs::write(
        env.dir.join(format!("results-{}", env.worker)),
        results.join("\n") + "\n",
    )
    .expect("write results");
}

// ---------------------------------------------------------------------------------------
// A holder killed, a holder paused.

/// The child holder: claims `k`, logs its run, says RUNNING with its claim token, then waits
/// for the file `release` and returns "child"; prints how its call ended.
#[test]
#[ignore = "run as a child process by the holder tests"]
fn pg_holder() {
    let env = ChildEnv::read();
    let store = env.open(2);
    let release = env.dir.join("release");
    let effects = env.dir.join("effects");
    let r = store.execute_steps("k", |ctx| {
        log_effect(&effects, "child");
        say(&format!("RUNNING {}", ctx.claim_token().as_u128()));
        while !release.exists() {
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok::<_, std::io::Error>(String::from("child"))
    });
    match r {
        Ok(out) => say(&format!("ENDED ok {}", *out)),
        Err(ExecuteError::Store(Error::LeaseLost { .. })) => say("ENDED lease-lost"),
        Err(e) => say(&format!("ENDED error {e}")),
    }
}

/// A holder killed with SIGKILL mid-operation: its claim stays live until its lease ends
/// (a call meanwhile is `InProgress`), then another process takes over with a higher token,
/// and the outcome is recorded once.
#[test]
fn a_killed_holder_is_taken_over_after_its_lease_with_a_higher_token() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let dir = tempfile::tempdir().expect("scratch dir");
    let lease = Duration::from_secs(5);
    let mut child = spawn_child("pg_holder", &schema, dir.path(), "holder", lease);
    let running = child.wait_for("RUNNING");
    let child_token: u128 = running["RUNNING ".len()..].parse().expect("token");
    child.kill();

    let store = parent_store(&schema, lease);
    let effects = dir.path().join("effects");
    // The lease still runs: the dead holder is indistinguishable from a slow one yet.
    let early = store
        .call("k")
        .wait_timeout(Duration::ZERO)
        .run(|| Ok::<_, std::io::Error>(String::from("too early")));
    assert!(matches!(store_error(early), Error::InProgress { .. }));
    // Waits for the lease to end, then takes over.
    let out = store
        .execute_steps("k", |ctx| {
            assert!(ctx.claim_token().as_u128() > child_token, "a higher token");
            assert_eq!(ctx.attempt(), 2);
            log_effect(&effects, "parent");
            Ok::<_, std::io::Error>(String::from("parent"))
        })
        .expect("taken over");
    assert_eq!((out.as_str(), out.is_replayed()), ("parent", false));
    assert_eq!(read_lines(&effects), ["child", "parent"]);
    for _ in 0..3 {
        let again = store
            .execute_once("k", || Ok::<_, std::io::Error>(String::from("never")))
            .expect("replay");
        assert_eq!((again.as_str(), again.is_replayed()), ("parent", true));
    }
    // Under Report, the same situation is reported instead of re-run.
    let mut child = spawn_child(
        "pg_holder",
        &schema,
        dir.path(),
        "holder",
        Duration::from_millis(600),
    );
    std::fs::remove_file(dir.path().join("effects")).expect("reset the log");
    assert!(store.remove("k").expect("remove"));
    child.wait_for("RUNNING");
    child.kill();
    let reported = store
        .call("k")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| Ok::<_, std::io::Error>(String::from("never")));
    assert!(matches!(
        store_error(reported),
        Error::Interrupted { attempts: 1, .. }
    ));
    assert_eq!(read_lines(&effects), ["child"]);
}

/// A holder paused with SIGSTOP past its lease, then resumed after another process took the
/// key over: its outcome write is refused with `LeaseLost`, and the record keeps the new
/// holder's outcome.
#[test]
fn a_paused_holder_resumed_after_a_takeover_records_nothing() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let dir = tempfile::tempdir().expect("scratch dir");
    let lease = Duration::from_secs(1);
    let mut child = spawn_child("pg_holder", &schema, dir.path(), "holder", lease);
    child.wait_for("RUNNING");
    child.signal(libc::SIGSTOP);

    let store = parent_store(&schema, lease);
    let effects = dir.path().join("effects");
    let out = store
        .execute_once("k", || {
            log_effect(&effects, "parent");
            Ok::<_, std::io::Error>(String::from("parent"))
        })
        .expect("taken over once the paused holder's lease ended");
    assert_eq!(*out, "parent");

    std::fs::write(dir.path().join("release"), b"").expect("release the holder");
    child.signal(libc::SIGCONT);
    assert_eq!(child.wait_for("ENDED"), "ENDED lease-lost");
    assert!(child.wait_exit().success());
    assert_eq!(read_lines(&effects), ["child", "parent"]);
    let again = store
        .execute_once("k", || Ok::<_, std::io::Error>(String::from("never")))
        .expect("replay");
    assert_eq!((again.as_str(), again.is_replayed()), ("parent", true));
    assert_eq!(
        store
            .record("k")
            .expect("record")
            .expect("present")
            .attempts,
        2
    );
}

/// A holder whose operation runs several times longer than its lease keeps its claim: the
/// heartbeat renews it, so another replica calling meanwhile gets `InProgress` and never
/// runs the operation beside it.
#[test]
fn a_long_operation_keeps_its_claim_past_many_leases() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let lease = Duration::from_millis(1500);
    let (holder, other) = (parent_store(&schema, lease), parent_store(&schema, lease));
    let runs = AtomicU32::new(0);
    let started = std::sync::Barrier::new(2);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let out = holder.execute_once("long", || {
                runs.fetch_add(1, Ordering::SeqCst);
                started.wait();
                std::thread::sleep(lease * 4);
                Ok::<_, std::io::Error>(1u32)
            });
            done.store(true, Ordering::SeqCst);
            assert_eq!(*out.expect("the holder records its outcome"), 1);
        });
        started.wait();
        let mut looks = 0;
        while !done.load(Ordering::SeqCst) {
            let r = other.call("long").wait_timeout(Duration::ZERO).run(|| {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(2u32)
            });
            match r {
                Err(ExecuteError::Store(Error::InProgress { .. })) => looks += 1,
                Ok(out) => assert_eq!((*out, out.is_replayed()), (1, true)),
                Err(e) => panic!("unexpected: {e}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(looks > 0, "the other replica looked while the holder ran");
    });
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
}

// ---------------------------------------------------------------------------------------
// Faults of a shared server.

/// Backends terminated with `pg_terminate_backend` (idle, and in the middle of a call):
/// every failure is a typed connection error, a recorded outcome is never lost, and no call
/// runs its operation when the contract says it must not.
#[test]
fn terminated_backends_give_typed_errors_and_lose_nothing() {
    let Some(url) = pg_url() else { return };
    let app = format!("idem_term_{}", std::process::id());
    let schema = PgSchema::new(&url);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(
            PgOptions::new(format!("{url} application_name={app}"))
                .schema(&schema.name)
                .pool_size(2),
        )
        .expect("open");
    let runs = AtomicU32::new(0);
    let op = |v: &str| {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, std::io::Error>(v.to_owned())
    };
    store
        .execute_once("before", || op("before"))
        .expect("record");
    let terminate = || {
        schema.sql(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = '{app}' AND pid <> pg_backend_pid()"
        ));
    };
    let typed = |e: &Error| matches!(e, Error::Storage(s) if s.kind() == StorageKind::Connection);

    // Idle connections terminated: at most one failure per pooled connection, then it works.
    terminate();
    let mut failures = 0;
    let replayed = loop {
        match store.execute_once("before", || op("never")) {
            Ok(out) => break out,
            Err(ExecuteError::Store(e)) if typed(&e) && failures < 2 => failures += 1,
            Err(e) => panic!("unexpected: {e}"),
        }
    };
    assert_eq!(
        (replayed.as_str(), replayed.is_replayed()),
        ("before", true)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Terminated in the middle of a call: the outcome's write may fail (typed); then the
    // key is an orphan, reported under Report, never silently run again.
    let r = store.execute_once("during", || {
        terminate();
        op("during")
    });
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    match r {
        Ok(out) => assert_eq!(*out, "during"),
        Err(ExecuteError::Store(e)) => {
            assert!(typed(&e), "{e}");
            let again = loop {
                match store
                    .call("during")
                    .orphan_policy(OrphanPolicy::Report)
                    .wait_timeout(PATIENCE)
                    .run(|| op("never"))
                {
                    Err(ExecuteError::Store(e)) if typed(&e) => continue,
                    other => break other,
                }
            };
            assert!(
                matches!(&again, Err(ExecuteError::Store(Error::Interrupted { .. }))),
                "{again:?}"
            );
        }
        Err(e) => panic!("unexpected: {e}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "nothing ran again");
    let before = store
        .execute_once("before", || op("never"))
        .expect("still there");
    assert_eq!(*before, "before");
}

/// Another session holds the record's row: with a statement timeout shorter than the store's
/// lock wait, a typed timeout; without one, the key is busy as with a live holder (the call
/// waits its budget, then `InProgress`). Either way the operation does not run; once the row
/// is free, the call runs once.
#[test]
fn a_statement_timeout_is_a_typed_timeout_and_nothing_runs() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(
            schema
                .options()
                .statement_timeout(Duration::from_millis(100)),
        )
        .expect("open");
    let patient = StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_millis(800))
        .open_postgres(schema.options())
        .expect("open");
    let runs = AtomicU32::new(0);
    let failed = store.execute_once("k", || {
        runs.fetch_add(1, Ordering::SeqCst);
        Err::<u32, _>(std::io::Error::other("retry me"))
    });
    assert!(matches!(failed, Err(ExecuteError::Operation { .. })));

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (mut client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let driver = tokio::spawn(connection);
        let tx = client.transaction().await.expect("begin");
        tx.execute(
            &format!(
                "SELECT 1 FROM {}.records WHERE key = 'k'::bytea FOR UPDATE",
                schema.name
            ),
            &[],
        )
        .await
        .expect("lock the row");
        // The row lock lives in the server: blocking this runtime meanwhile is harmless.
        let blocked = store.execute_once("k", || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<u32, std::io::Error>(7)
        });
        match blocked {
            Err(ExecuteError::Store(Error::Storage(e))) => {
                assert_eq!(e.kind(), StorageKind::Timeout, "{e}")
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        let busy = patient.execute_once("k", || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<u32, std::io::Error>(7)
        });
        assert!(
            matches!(busy, Err(ExecuteError::Store(Error::InProgress { .. }))),
            "{busy:?}"
        );
        tx.rollback().await.expect("release the row");
        drop(client);
        let _ = driver.await;
    });
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the blocked calls ran nothing"
    );
    let out = store
        .execute_once("k", || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<u32, std::io::Error>(7)
        })
        .expect("runs once the row is free");
    assert_eq!((*out, runs.load(Ordering::SeqCst)), (7, 2));
}

/// Stores of two tenants share one schema and never see each other's keys.
#[test]
fn tenants_never_see_each_others_keys() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = |tenant: &str| {
        StoreBuilder::default()
            .sweep_interval(None)
            .open_postgres(schema.options().tenant(tenant))
            .expect("open")
    };
    let (a, b) = (open("acme"), open("globex"));
    let run = |s: &PgStore, v: &str| {
        s.execute_once("order-1", || Ok::<_, std::io::Error>(v.to_owned()))
            .expect("call")
    };
    let (out_a, out_b) = (run(&a, "acme"), run(&b, "globex"));
    assert!(!out_a.is_replayed() && !out_b.is_replayed());
    assert_eq!(*run(&a, "x"), "acme");
    let keys =
        |s: &PgStore| -> BTreeSet<Vec<u8>> { s.records().map(|r| r.expect("record").0).collect() };
    assert_eq!(keys(&a).len(), 1);
    assert!(b.remove("order-1").expect("remove"));
    assert_eq!(*run(&a, "x"), "acme", "removing globex's key leaves acme's");
}

/// Replicas opening a new schema at once: the migrations run once, every open succeeds.
#[test]
fn replicas_opening_a_new_schema_at_once_all_succeed() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let stores: Vec<PgStore> = std::thread::scope(|s| {
        let opens: Vec<_> = (0..6)
            .map(|_| s.spawn(|| parent_store(&schema, Duration::from_secs(10))))
            .collect();
        opens.into_iter().map(|h| h.join().expect("open")).collect()
    });
    let epochs: BTreeSet<u64> = stores.iter().map(|s| s.epoch()).collect();
    assert_eq!(epochs.len(), stores.len(), "every open has its own epoch");
    let versions = schema.sql("SELECT version FROM {s}.schema_version");
    assert_eq!(versions.len(), 1);
}

/// Bad settings are refused before anything connects; an unreachable server is a typed
/// connection error, not a hang or a panic.
#[test]
fn bad_settings_and_an_unreachable_server_are_typed_errors() {
    for options in [
        PgOptions::new("host=127.0.0.1").schema("Bad-Name"),
        PgOptions::new("host=127.0.0.1").schema("x; drop table y"),
        PgOptions::new("host=127.0.0.1").pool_size(0),
        PgOptions::new("host=127.0.0.1").lease(Duration::from_millis(10)),
        PgOptions::new("not a connection string ==="),
    ] {
        let r = StoreBuilder::default().open_postgres(options);
        assert!(matches!(r, Err(Error::InvalidConfig(_))), "{r:?}");
    }
    let r = StoreBuilder::default().open_postgres(
        PgOptions::new("host=127.0.0.1 port=1 user=postgres dbname=test")
            .connect_timeout(Duration::from_secs(2)),
    );
    match r {
        Err(Error::Storage(e)) => assert!(
            matches!(e.kind(), StorageKind::Connection | StorageKind::Timeout),
            "{e}"
        ),
        other => panic!("expected a connection error, got {other:?}"),
    }
}

/// Called from inside a tokio runtime (current-thread, even), the sync API works instead of
/// panicking.
#[test]
fn the_sync_api_works_inside_a_runtime() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = parent_store(&schema, Duration::from_secs(10));
        let out = store
            .execute_once("k", || Ok::<_, std::io::Error>(5u8))
            .expect("works inside a runtime");
        assert_eq!(*out, 5);
        drop(store); // dropping inside the runtime must not panic either
    });
}

// ---------------------------------------------------------------------------------------
// Exactly-once local effects: the operation's writes and its outcome in one transaction.

fn stock_tables(schema: &PgSchema, stock: i64) {
    schema.sql("CREATE SCHEMA IF NOT EXISTS {s}");
    schema
        .sql("CREATE TABLE IF NOT EXISTS {s}.stock (sku text PRIMARY KEY, units bigint NOT NULL)");
    schema.sql(
        "CREATE TABLE IF NOT EXISTS {s}.ledger (order_id text NOT NULL, units bigint NOT NULL)",
    );
    schema.sql(&format!(
        "INSERT INTO {{s}}.stock VALUES ('sku-1', {stock})"
    ));
}

/// Reserves one unit for `order` in `tx`: the user's own writes.
fn reserve(tx: &mut idemstore::PgTx<'_>, schema: &str, order: &str) -> Result<i64, Error> {
    let row = tx.query_one(
        &format!("UPDATE {schema}.stock SET units = units - 1 WHERE sku = 'sku-1' RETURNING units"),
        &[],
    )?;
    tx.execute(
        &format!("INSERT INTO {schema}.ledger VALUES ($1, 1)"),
        &[&order],
    )?;
    Ok(row.get(0))
}

/// Two replicas of eight threads reserve stock for the same orders at once: every order's
/// writes apply exactly once (by the user's own tables), and every caller gets its outcome.
#[test]
fn local_effects_commit_exactly_once_across_replicas() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let replicas = [
        parent_store(&schema, Duration::from_secs(10)),
        parent_store(&schema, Duration::from_secs(10)),
    ];
    stock_tables(&schema, 1000);
    const ORDERS: usize = 40;
    let answers: Mutex<BTreeMap<String, BTreeSet<i64>>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for t in 0..16 {
            let (store, answers, name) = (&replicas[t % 2], &answers, &schema.name);
            s.spawn(move || {
                for i in 0..ORDERS {
                    let order = format!("order-{}", (i + t * 3) % ORDERS);
                    let left = store
                        .execute_once_in_tx(&order, |tx| reserve(tx, name, &order))
                        .expect("reserve");
                    answers
                        .lock()
                        .expect("answers")
                        .entry(order)
                        .or_default()
                        .insert(*left);
                }
            });
        }
    });
    let ledger = schema.sql("SELECT order_id, count(*) FROM {s}.ledger GROUP BY order_id");
    assert_eq!(ledger.len(), ORDERS, "every order reserved");
    for row in &ledger {
        let (order, n): (String, i64) = (row.get(0), row.get(1));
        assert_eq!(n, 1, "{order} applied once");
    }
    let units: i64 = schema.sql("SELECT units FROM {s}.stock")[0].get(0);
    assert_eq!(units, 1000 - ORDERS as i64);
    for (order, seen) in answers.into_inner().expect("answers") {
        assert_eq!(
            seen.len(),
            1,
            "{order}: every caller got the one outcome: {seen:?}"
        );
    }
}

/// An error rolls the operation's writes back: retryable, nothing is kept and the next call
/// runs; permanent, the error is recorded (and replayed) and the writes still never apply.
#[test]
fn a_failed_operation_applies_none_of_its_writes() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = parent_store(&schema, Duration::from_secs(10));
    stock_tables(&schema, 10);
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
    enum Refused {
        TryLater,
        Never(String),
    }
    let name = schema.name.clone();
    let fail_after_writing = |e: Refused| {
        let name = name.clone();
        move |tx: &mut idemstore::PgTx<'_>| -> Result<i64, Refused> {
            reserve(tx, &name, "o").expect("the writes themselves succeed");
            Err(e.clone())
        }
    };
    let r = store.execute_once_in_tx("o", fail_after_writing(Refused::TryLater));
    assert!(matches!(
        r,
        Err(ExecuteError::Operation {
            error: Refused::TryLater,
            replayed: false
        })
    ));
    let permanent = |e: &Refused| matches!(e, Refused::Never(_));
    let r = store
        .call("o")
        .permanent_if(permanent)
        .run_in_tx(fail_after_writing(Refused::Never("closed".into())));
    assert!(matches!(
        r,
        Err(ExecuteError::Operation {
            replayed: false,
            ..
        })
    ));
    let r = store.call("o").permanent_if(permanent).run_in_tx(
        |_tx: &mut idemstore::PgTx<'_>| -> Result<i64, Refused> { panic!("must not run") },
    );
    match r {
        Err(ExecuteError::Operation {
            error,
            replayed: true,
        }) => {
            assert_eq!(error, Refused::Never("closed".into()))
        }
        other => panic!("expected the recorded permanent error, got {other:?}"),
    }
    assert!(
        schema.sql("SELECT 1 FROM {s}.ledger").is_empty(),
        "no write applied"
    );
    let units: i64 = schema.sql("SELECT units FROM {s}.stock")[0].get(0);
    assert_eq!(units, 10);
    assert_eq!(
        store
            .record("o")
            .expect("record")
            .expect("present")
            .attempts,
        2
    );
}

/// A replica killed in the middle of the operation's transaction (after its writes, before
/// the commit): the server rolls everything back, the key reads as never run, and the next
/// call applies the writes once.
#[test]
fn a_replica_killed_mid_transaction_applies_nothing() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let dir = tempfile::tempdir().expect("scratch dir");
    stock_tables(&schema, 10);
    let mut child = spawn_child(
        "pg_tx_holder",
        &schema,
        dir.path(),
        "tx",
        Duration::from_secs(10),
    );
    child.wait_for("WROTE");
    child.kill();
    let store = parent_store(&schema, Duration::from_secs(10));
    let name = schema.name.clone();
    let left = store
        .execute_once_in_tx("o", |tx| reserve(tx, &name, "o"))
        .expect("runs: the killed run applied nothing");
    assert_eq!((*left, left.is_replayed()), (9, false));
    let again = store
        .execute_once_in_tx("o", |tx| reserve(tx, &name, "o"))
        .expect("replays");
    assert_eq!((*again, again.is_replayed()), (9, true));
    let ledger: i64 = schema.sql("SELECT count(*) FROM {s}.ledger")[0].get(0);
    assert_eq!(ledger, 1);
}

#[test]
#[ignore = "run as a child process by a_replica_killed_mid_transaction_applies_nothing"]
fn pg_tx_holder() {
    let env = ChildEnv::read();
    let store = env.open(2);
    let schema = env.schema.clone();
    let _ = store.execute_once_in_tx("o", |tx| {
        let left = reserve(tx, &schema, "o")?;
        say("WROTE");
        loop {
            std::thread::sleep(Duration::from_secs(60));
            if left < 0 {
                return Ok::<i64, Error>(left);
            }
        }
    });
}

/// With a pool of one connection every call works: a transaction never asks the pool for a
/// second connection while it holds one, even to take over another replica's lapsed claim
/// (which needs a fresh epoch: that replica opened later). Durability modes map to
/// `synchronous_commit`, as the operation's own transaction sees it.
#[test]
fn one_connection_is_enough_and_durability_maps_to_synchronous_commit() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    for (durability, expected) in [
        (idemstore::Durability::Immediate, "on"),
        (
            idemstore::Durability::Periodic(Duration::from_millis(100)),
            "off",
        ),
    ] {
        let open = || {
            StoreBuilder::default()
                .durability(durability)
                .sweep_interval(None)
                .open_postgres(schema.options().pool_size(1))
                .expect("open")
        };
        let (older, newer) = (open(), open());
        assert!(newer.epoch() > older.epoch());
        let mode = older
            .execute_once_in_tx(format!("mode-{expected}"), |tx| {
                Ok::<String, Error>(tx.query_one("SHOW synchronous_commit", &[])?.get(0))
            })
            .expect("a transaction on a pool of one");
        assert_eq!(*mode, expected);
        let key = format!("taken-{expected}");
        let mut newer_token = 0;
        let r = newer.execute_steps(&key, |ctx| {
            newer_token = ctx.claim_token().as_u128();
            newer.__lapse_leases().expect("lapse");
            let taken = older
                .execute_once_in_tx(&key, |_tx| Ok::<u32, Error>(7))
                .expect("the older replica takes the lapsed claim over");
            assert_eq!(taken.record().attempts, 2);
            assert!(
                taken.record().claim.as_u128() > newer_token,
                "a higher token"
            );
            Ok::<u32, std::io::Error>(1)
        });
        assert!(matches!(store_error(r), Error::LeaseLost { .. }));
        let replay = newer
            .execute_once(&key, || Ok::<u32, std::io::Error>(0))
            .expect("replay");
        assert_eq!((*replay, replay.is_replayed()), (7, true));
        older.flush().expect("flush");
    }
}

/// A holder whose record a waiter in another replica marked sends a notification on the
/// schema's channel when it finishes (waiters are woken by it, not only by polling). Checked by
/// listening on the channel from a plain connection: a notification with the key's tag comes.
#[test]
fn a_finished_holder_notifies_the_replicas_waiting_for_it() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let lease = Duration::from_secs(10);
    let (holder, waiter) = (parent_store(&schema, lease), parent_store(&schema, lease));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (client, mut connection) = runtime
        .block_on(tokio_postgres::connect(&url, tokio_postgres::NoTls))
        .expect("connect");
    let (notes_tx, notes) = std::sync::mpsc::channel::<String>();
    let listen_to = format!("LISTEN \"idemstore.{}\"", schema.name);
    let listening = std::thread::spawn(move || {
        runtime.block_on(async move {
            let listen = client.batch_execute(&listen_to);
            tokio::pin!(listen);
            let mut subscribed = false;
            loop {
                tokio::select! {
                    done = &mut listen, if !subscribed => { done.expect("listen"); subscribed = true; let _ = notes_tx.send(String::from("LISTENING")); }
                    message = std::future::poll_fn(|cx| connection.poll_message(cx)) => match message {
                        Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => { let _ = notes_tx.send(n.payload().to_owned()); return; }
                        Some(Ok(_)) => {}
                        _ => return,
                    },
                }
            }
        })
    });
    assert_eq!(
        notes.recv_timeout(PATIENCE).expect("listening"),
        "LISTENING"
    );
    let started = std::sync::Barrier::new(2);
    let release = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            holder
                .execute_once("k", || {
                    started.wait();
                    release.wait();
                    Ok::<_, std::io::Error>(1u32)
                })
                .expect("holder");
        });
        started.wait();
        let waiting = s.spawn(|| {
            waiter
                .call("k")
                .wait_timeout(PATIENCE)
                .run(|| Ok::<_, std::io::Error>(2u32))
                .expect("waiter")
        });
        // Let the waiter mark the record before the holder finishes: the mark is what makes
        // the holder notify (a waiter that comes too late finds the outcome and replays).
        common::wait_until("the waiter to mark the record", || {
            !schema
                .sql("SELECT 1 FROM {s}.records WHERE waiters")
                .is_empty()
        });
        release.wait();
        assert_eq!(*waiting.join().expect("join"), 1);
    });
    let note = notes.recv_timeout(PATIENCE).expect("a notification");
    assert_eq!(note.len(), 32, "the key's tag, in hex: {note}");
    listening.join().expect("listener");
}

/// The first statement follows the traffic (design §13): a store claims first while its calls
/// find no record, reads first once retries dominate, and claims first again once new keys
/// do; both ways give the same answers.
#[test]
fn the_first_statement_follows_the_traffic() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = PgStore::connect(schema.options()).unwrap();
    assert!(store.__claims_first(), "a new store expects new keys");
    store
        .execute_once("done", || Ok::<_, std::io::Error>(7u32))
        .unwrap();
    for _ in 0..20 {
        let again = store
            .execute_once("done", || -> Result<u32, std::io::Error> {
                panic!("replayed")
            })
            .unwrap();
        assert_eq!((*again, again.is_replayed()), (7, true));
    }
    assert!(
        !store.__claims_first(),
        "a run of retries turns it to reading first"
    );
    for i in 0..20 {
        let fresh = store
            .execute_once(format!("new-{i}"), || Ok::<_, std::io::Error>(i))
            .unwrap();
        assert_eq!((*fresh, fresh.is_replayed()), (i, false));
    }
    assert!(store.__claims_first(), "a run of new keys turns it back");
}
