//! The `idemstore` binary, run as a user runs it: real stores (sled in temp dirs, PostgreSQL
//! when `IDEMSTORE_TEST_POSTGRES` names a server), real child processes, exit codes and
//! output checked. Orphans are made the way they happen: a child process exits in the middle
//! of an operation.

use assert_cmd::Command;
use idemstore::{
    Codec, Error, ExecuteError, Fingerprint, OrphanPolicy, PgOptions, PgStore, RecordState, Store,
};
use std::path::Path;

const CHILD_VAR: &str = "IDEMSTORE_CLI_TEST_ORPHAN";

fn cli() -> Command {
    let mut c = Command::cargo_bin("idemstore").expect("the binary is built");
    c.env_remove("IDEMSTORE_PATH")
        .env_remove("IDEMSTORE_POSTGRES");
    c
}

fn on(path: &Path) -> Command {
    let mut c = cli();
    c.arg("--path").arg(path);
    c
}

fn stdout(c: &mut Command) -> String {
    let out = c.output().expect("runs");
    assert!(
        out.status.success(),
        "exit {:?}, stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

fn code(c: &mut Command) -> (i32, String) {
    let out = c.output().expect("runs");
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Child mode: open the store named by the variable, claim `orphan` under `Report` (its claim
/// durable before the operation runs) and exit in the middle of the operation.
#[test]
fn orphan_maker_child() {
    let Ok(spec) = std::env::var(CHILD_VAR) else {
        return;
    };
    let (where_, key) = spec.split_once('|').expect("store|key");
    let run = |r: Result<idemstore::Outcome<u32>, ExecuteError<std::io::Error>>| {
        let _ = r;
        unreachable!("the child exits inside the operation")
    };
    let die = || -> Result<u32, std::io::Error> { std::process::exit(0) };
    match where_.strip_prefix("pg:") {
        Some(rest) => {
            let (url, schema) = rest.split_once('#').expect("url#schema");
            let store = PgStore::connect(PgOptions::new(url).schema(schema)).expect("connects");
            run(store.call(key).orphan_policy(OrphanPolicy::Report).run(die));
        }
        None => {
            let store = Store::open(where_).expect("opens");
            run(store.call(key).orphan_policy(OrphanPolicy::Report).run(die));
        }
    }
}

/// Leaves `key` an orphan in the store at `where_` (a path, or `pg:URL#SCHEMA`).
fn make_orphan(where_: &str, key: &str) {
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "orphan_maker_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, format!("{where_}|{key}"))
        .status()
        .expect("child runs");
    assert!(status.success(), "the child exited inside its operation");
}

fn report<S>(key: &str, store: &S) -> Result<u32, ExecuteError<std::io::Error>>
where
    S: RunReport,
{
    store.run_report(key)
}

/// A call under `Report` that returns 99 if it runs.
trait RunReport {
    fn run_report(&self, key: &str) -> Result<u32, ExecuteError<std::io::Error>>;
}

impl RunReport for Store {
    fn run_report(&self, key: &str) -> Result<u32, ExecuteError<std::io::Error>> {
        self.call(key)
            .orphan_policy(OrphanPolicy::Report)
            .run(|| Ok(99))
            .map(|o| *o)
    }
}

impl RunReport for PgStore {
    fn run_report(&self, key: &str) -> Result<u32, ExecuteError<std::io::Error>> {
        self.call(key)
            .orphan_policy(OrphanPolicy::Report)
            .run(|| Ok(99))
            .map(|o| *o)
    }
}

fn is_interrupted(r: Result<u32, ExecuteError<std::io::Error>>) -> bool {
    matches!(r, Err(ExecuteError::Store(Error::Interrupted { .. })))
}

/// A sled store with a completed JSON result, a permanent failure, a multi-step result and an
/// orphan.
fn seeded(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("db");
    {
        let store = Store::open(&path).unwrap();
        store
            .call("order-1")
            .codec(Codec::Json)
            .fingerprint(Fingerprint::of_bytes(b"req-1"))
            .run(|| Ok::<_, std::io::Error>(serde_json::json!({"receipt": "r-1"})))
            .unwrap();
        let failed = store
            .call("order-2")
            .permanent_if(|_: &String| true)
            .run(|| Err::<u32, _>("card declined".to_string()));
        assert!(failed.is_err());
        store
            .execute_steps("order-3", |cx| {
                let a: u32 = cx.step("reserve", || Ok::<_, std::io::Error>(1))?;
                let b: u32 = cx.step("charge", || Ok::<_, std::io::Error>(2))?;
                Ok::<_, idemstore::StepError<std::io::Error>>(a + b)
            })
            .unwrap();
    }
    make_orphan(path.to_str().unwrap(), "order-4");
    path
}

#[test]
fn help_teaches_commands_and_exit_codes() {
    let help = stdout(cli().arg("--help"));
    for word in [
        "stats", "ls", "show", "rm", "sweep", "resolve", "export", "import",
    ] {
        assert!(help.contains(word), "--help names {word}: {help}");
    }
    assert!(help.contains("Exit codes"), "{help}");
    let resolve = stdout(cli().args(["resolve", "--help"]));
    assert!(
        resolve.contains("--completed") && resolve.contains("--release"),
        "{resolve}"
    );
}

#[test]
fn a_store_must_be_named_and_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let (c, err) = code(cli().arg("stats"));
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("--path"), "{err}");
    let (c, err) = code(on(&dir.path().join("nothing")).arg("stats"));
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("no store"), "{err}");
    assert!(
        !dir.path().join("nothing").exists(),
        "stats never creates a store"
    );
    let (c, _) = code(cli().arg("frobnicate"));
    assert_eq!(c, 2, "a wrong command line is clap's exit 2");
}

#[test]
fn a_store_held_by_a_service_is_reported_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    let _service = Store::open(&path).unwrap();
    let (c, err) = code(on(&path).arg("stats"));
    assert_eq!(c, 5, "{err}");
    assert!(err.contains("locked"), "{err}");
}

#[test]
fn stats_ls_and_show_describe_what_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());

    let stats: serde_json::Value =
        serde_json::from_str(&stdout(on(&path).args(["stats", "--json"]))).unwrap();
    assert_eq!(
        (&stats["pending"], &stats["completed"], &stats["failed"]),
        (
            &serde_json::json!(1),
            &serde_json::json!(2),
            &serde_json::json!(1)
        ),
        "{stats}"
    );
    assert_eq!(stats["oldest_pending"]["key"], "order-4", "{stats}");
    assert!(stats["disk_bytes"].as_u64().unwrap() > 0, "{stats}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let horizon = stats["last_expiry"].as_f64().unwrap() - now;
    assert!(
        horizon > 3600.0 && horizon <= 86_400.0 + 60.0,
        "the last expiry is the default day-long TTL away: {stats}"
    );
    let text = stdout(on(&path).arg("stats"));
    assert!(text.contains("1 pending, 2 completed, 1 failed"), "{text}");

    let all = json_lines(&stdout(on(&path).args(["ls", "--json"])));
    let keys: Vec<&str> = all.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["order-1", "order-2", "order-3", "order-4"]);
    let pending = json_lines(&stdout(
        on(&path).args(["ls", "--state", "pending", "--json"]),
    ));
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["key"], "order-4");
    let prefixed = stdout(on(&path).args(["ls", "--prefix", "order-2"]));
    assert!(prefixed.starts_with("order-2\tfailed"), "{prefixed}");
    assert_eq!(prefixed.lines().count(), 1);
    let old = stdout(on(&path).args(["ls", "--older-than", "1h"]));
    assert!(old.is_empty(), "nothing is an hour old: {old}");
    assert_eq!(
        stdout(on(&path).args(["ls", "--limit", "2"]))
            .lines()
            .count(),
        2
    );

    let one: serde_json::Value =
        serde_json::from_str(&stdout(on(&path).args(["show", "order-1", "--json"]))).unwrap();
    assert_eq!(one["state"], "completed");
    assert_eq!(one["outcome"]["value"]["receipt"], "r-1", "{one}");
    assert!(one["fingerprint"].is_string(), "{one}");
    let steps: serde_json::Value =
        serde_json::from_str(&stdout(on(&path).args(["show", "order-3", "--json"]))).unwrap();
    let names: Vec<&str> = steps["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reserve", "charge"]);
    assert_eq!(steps["outcome"]["codec"], "bincode", "{steps}");
    let text = stdout(on(&path).args(["show", "order-4"]));
    assert!(text.contains("state:       pending"), "{text}");

    let (c, err) = code(on(&path).args(["show", "order-9"]));
    assert_eq!(c, 3, "{err}");
    let hex_key = "6f726465722d31"; // "order-1"
    let by_hex = stdout(on(&path).args(["show", "--hex", hex_key]));
    assert!(by_hex.contains("completed"), "{by_hex}");
}

#[test]
fn resolve_records_what_an_interrupted_run_did() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    make_orphan(path.to_str().unwrap(), "order-5");
    {
        let store = Store::open(&path).unwrap();
        assert!(is_interrupted(report("order-4", &store)));
    }
    // Only an orphan is resolved: a completed record, a missing key are refused.
    let (c, err) = code(on(&path).args(["resolve", "order-1", "--completed", "1"]));
    assert_eq!(c, 4, "{err}");
    let (c, err) = code(on(&path).args(["resolve", "order-9", "--release"]));
    assert_eq!(c, 3, "{err}");
    let (c, err) = code(on(&path).args(["resolve", "order-4", "--completed", "{not json"]));
    assert_eq!(c, 1, "{err}");
    let (c, _) = code(on(&path).args(["resolve", "order-4", "--completed", "7", "--release"]));
    assert_eq!(c, 2, "one resolution at a time");

    let said = stdout(on(&path).args(["resolve", "order-4", "--completed", "7"]));
    assert!(said.contains("Completed"), "{said}");
    stdout(on(&path).args(["resolve", "order-5", "--release"]));
    // Resolving again is refused: it is no longer an orphan.
    let (c, _) = code(on(&path).args(["resolve", "order-4", "--release"]));
    assert_eq!(c, 4);

    let store = Store::open(&path).unwrap();
    let replayed = store
        .call("order-4")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| -> Result<u32, std::io::Error> { panic!("a resolved run never runs again") })
        .unwrap();
    assert_eq!((*replayed, replayed.is_replayed()), (7, true));
    assert_eq!(replayed.record().attempts, 1, "no attempt ran");
    let rerun = report("order-5", &store).unwrap();
    assert_eq!(rerun, 99, "a released key runs again");
}

#[test]
fn rm_and_sweep_remove_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    {
        let store = Store::builder(&path).open().unwrap();
        store
            .execute_once("keep", || Ok::<_, std::io::Error>(1))
            .unwrap();
        store
            .execute_once("poisoned", || Ok::<_, std::io::Error>(2))
            .unwrap();
        store
            .call("short")
            .ttl(std::time::Duration::from_millis(1))
            .run(|| Ok::<_, std::io::Error>(3))
            .unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(stdout(on(&path).args(["rm", "poisoned"])).contains("removed poisoned"));
    let (c, _) = code(on(&path).args(["rm", "poisoned"]));
    assert_eq!(c, 3, "a second rm finds nothing");
    assert!(stdout(on(&path).arg("sweep")).contains("swept 1 expired"));
    let store = Store::open(&path).unwrap();
    let keys: Vec<Vec<u8>> = store.records().map(|r| r.unwrap().0).collect();
    assert_eq!(keys, [b"keep".to_vec()]);
    assert!(store.inspect("short").unwrap().is_none(), "swept");
    let again = store
        .execute_once("poisoned", || Ok::<_, std::io::Error>(5))
        .unwrap();
    assert_eq!((*again, again.is_replayed()), (5, false));
}

/// Every record of `from` replays the same in the store at `to`.
fn same_outcomes(to: &dyn Fn(&str) -> Result<u32, ExecuteError<std::io::Error>>) {
    assert!(
        is_interrupted(to("order-4")),
        "the orphan is still an orphan"
    );
}

#[test]
fn export_and_import_move_a_sled_store_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    let file = dir.path().join("idem.jsonl");
    stdout(on(&path).args(["export", "--out"]).arg(&file));
    let lines = std::fs::read_to_string(&file).unwrap();
    assert_eq!(
        lines.lines().count(),
        6,
        "a header, four records and an end line: {lines}"
    );

    let copy = dir.path().join("copy");
    let (c, _) = code(on(&copy).arg("import").arg(&file));
    assert_eq!(c, 1, "import needs --create for a new sled store");
    let said = stdout(on(&copy).args(["import", "--create"]).arg(&file));
    assert!(said.contains("imported 4 records"), "{said}");
    // From stdin, again: every key already has its record.
    let said = stdout(on(&copy).arg("import").write_stdin(lines.clone()));
    assert!(
        said.contains("imported 0 records (4 keys already had one"),
        "{said}"
    );

    let store = Store::open(&copy).unwrap();
    check_moved(&store);
    same_outcomes(&|k| report(k, &store));
}

/// The seeded records replay in `store` as they did where they came from.
fn check_moved<S: RunReport + Moved>(store: &S) {
    store.check();
}

trait Moved {
    fn check(&self);
}

macro_rules! moved_for {
    ($t:ty) => {
        impl Moved for $t {
            fn check(&self) {
                let one = self
                    .call("order-1")
                    .fingerprint(Fingerprint::of_bytes(b"req-1"))
                    .run(|| -> Result<serde_json::Value, std::io::Error> { panic!("ran") })
                    .unwrap();
                assert_eq!((one["receipt"].as_str(), one.is_replayed()), (Some("r-1"), true));
                let mismatch = self
                    .call("order-1")
                    .fingerprint(Fingerprint::of_bytes(b"another request"))
                    .run(|| -> Result<serde_json::Value, std::io::Error> { panic!("ran") });
                assert!(matches!(
                    mismatch,
                    Err(ExecuteError::Store(Error::FingerprintMismatch { .. }))
                ));
                let two = self
                    .call("order-2")
                    .permanent_if(|_: &String| true)
                    .run(|| -> Result<u32, String> { panic!("ran") });
                assert!(matches!(
                    two,
                    Err(ExecuteError::Operation { ref error, replayed: true }) if error == "card declined"
                ));
                let three = self
                    .execute_steps("order-3", |_| -> Result<u32, std::io::Error> {
                        panic!("ran")
                    })
                    .unwrap();
                assert_eq!(*three, 3);
                let detail = self.inspect("order-3").unwrap().unwrap();
                assert_eq!(detail.steps.len(), 2, "steps moved with their record");
                assert_eq!(
                    self.inspect("order-4").unwrap().unwrap().info.state,
                    RecordState::Pending
                );
            }
        }
    };
}
moved_for!(Store);
moved_for!(PgStore);

fn pg_url() -> Option<String> {
    match std::env::var("IDEMSTORE_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("note: PostgreSQL CLI tests skipped: set IDEMSTORE_TEST_POSTGRES");
            None
        }
    }
}

/// A schema of its own, dropped afterwards.
struct Schema {
    url: String,
    name: String,
}

impl Schema {
    fn new(url: &str) -> Schema {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Schema {
            url: url.into(),
            name: format!("cli_{}_{nanos}", std::process::id()),
        }
    }

    fn store(&self, tenant: &str) -> PgStore {
        PgStore::connect(PgOptions::new(&self.url).schema(&self.name).tenant(tenant)).unwrap()
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let drop_it = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.name);
        runtime.block_on(async {
            if let Ok((client, conn)) =
                tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await
            {
                let driver = tokio::spawn(conn);
                let _ = client.batch_execute(&drop_it).await;
                drop(client);
                let _ = driver.await;
            }
        });
    }
}

#[test]
fn a_sled_store_moves_to_postgresql_and_back() {
    let Some(url) = pg_url() else { return };
    let schema = Schema::new(&url);
    let dir = tempfile::tempdir().unwrap();
    let path = seeded(dir.path());
    let file = dir.path().join("idem.jsonl");
    stdout(on(&path).args(["export", "--out"]).arg(&file));

    let pg = |args: &[&str]| {
        let mut c = cli();
        c.args(["--postgres", &url, "--schema", &schema.name])
            .args(args);
        c
    };
    let said = stdout(pg(&["import"]).arg(&file));
    assert!(said.contains("imported 4 records"), "{said}");
    {
        let store = schema.store("");
        check_moved(&store);
        same_outcomes(&|k| report(k, &store));
    }
    // Live beside a running replica: ls and stats see the same records.
    let replica = schema.store("");
    let pending = json_lines(&stdout(&mut pg(&["ls", "--state", "pending", "--json"])));
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["key"], "order-4");
    let stats: serde_json::Value =
        serde_json::from_str(&stdout(&mut pg(&["stats", "--json"]))).unwrap();
    assert_eq!(stats["completed"], 2, "{stats}");
    assert!(stats["disk_bytes"].as_u64().unwrap() > 0, "{stats}");
    // Resolve live: the replica replays the resolution.
    stdout(&mut pg(&["resolve", "order-4", "--completed", "11"]));
    assert_eq!(report("order-4", &replica).unwrap(), 11);

    // Another tenant's scope is empty.
    let other = json_lines(&stdout(&mut pg(&["--tenant", "eu", "ls", "--json"])));
    assert!(other.is_empty());

    // And back to a new sled store.
    let back = dir.path().join("back.jsonl");
    stdout(pg(&["export", "--out"]).arg(&back));
    let sled_again = dir.path().join("again");
    let said = stdout(on(&sled_again).args(["import", "--create"]).arg(&back));
    assert!(said.contains("imported 4 records"), "{said}");
    let store = Store::open(&sled_again).unwrap();
    assert_eq!(report("order-4", &store).unwrap(), 11);
    let one = store
        .call("order-1")
        .fingerprint(Fingerprint::of_bytes(b"req-1"))
        .run(|| -> Result<serde_json::Value, std::io::Error> { panic!("ran") })
        .unwrap();
    assert_eq!(one["receipt"], "r-1");
}

#[test]
fn resolve_on_postgresql_is_refused_while_the_holder_lives() {
    let Some(url) = pg_url() else { return };
    let schema = Schema::new(&url);
    let store = schema.store("");
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release_tx, release) = std::sync::mpsc::channel::<()>();
    let holder = &store;
    std::thread::scope(|s| {
        s.spawn(move || {
            holder
                .execute_once("running", || {
                    entered_tx.send(()).unwrap();
                    release.recv().unwrap();
                    Ok::<_, std::io::Error>(1)
                })
                .unwrap();
        });
        entered.recv().unwrap();
        let mut c = cli();
        c.args(["--postgres", &url, "--schema", &schema.name])
            .args(["resolve", "running", "--completed", "2"]);
        let (code, err) = code(&mut c);
        assert_eq!(code, 4, "a live lease is not an orphan: {err}");
        release_tx.send(()).unwrap();
    });
    let replay = store
        .execute_once("running", || Ok::<_, std::io::Error>(3))
        .unwrap();
    assert_eq!(*replay, 1, "the holder's outcome stands");
    // An orphan left by a process that exited: resolvable once its lease ends.
    make_orphan(&format!("pg:{url}#{}", schema.name), "gone");
    store.__lapse_leases().unwrap();
    let mut c = cli();
    c.args(["--postgres", &url, "--schema", &schema.name])
        .args(["resolve", "gone", "--failed", "\"refunded\""]);
    stdout(&mut c);
    let failed = store
        .call("gone")
        .permanent_if(|_: &String| true)
        .run(|| -> Result<u32, String> { panic!("ran") });
    assert!(matches!(
        failed,
        Err(ExecuteError::Operation { ref error, replayed: true }) if error == "refunded"
    ));
}
