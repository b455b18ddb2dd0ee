//! PostgreSQL for the tests: the server named by `IDEMSTORE_TEST_POSTGRES` (a connection
//! string), a fresh schema per test that is dropped afterwards, and plain SQL beside the store.
//! With the variable unset, PostgreSQL tests say once per test binary, on stderr past the
//! output capture, that they were skipped, and pass.

use idemstore::{PgOptions, PgStore, StoreBuilder};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The variable that holds the test server's connection string.
pub const PG_VAR: &str = "IDEMSTORE_TEST_POSTGRES";

/// The test server's connection string, or `None` (after saying so) when it is unset.
pub fn pg_url() -> Option<String> {
    match std::env::var(PG_VAR) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::SeqCst) {
                let exe = std::env::current_exe().unwrap_or_default();
                let name = exe.file_name().unwrap_or_default().to_string_lossy();
                let _ = writeln!(
                    std::io::stderr().lock(),
                    "note: PostgreSQL tests in {name} skipped: set {PG_VAR} \
                     (e.g. host=127.0.0.1 user=postgres dbname=test) to run them"
                );
            }
            None
        }
    }
}

/// Runs one `statement` on the server at `url` and returns its rows.
pub fn sql(url: &str, statement: &str) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for test SQL");
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let rows = client.query(statement, &[]).await;
        drop(client);
        let _ = driver.await;
        rows
    })
}

/// A schema of its own for one test, dropped with everything in it when this is dropped.
pub struct PgSchema {
    pub url: String,
    pub name: String,
}

impl PgSchema {
    /// A new schema name on the server at `url` (created by the first store that opens it).
    pub fn new(url: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "t_{}_{}_{}",
            std::process::id(),
            nanos,
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        Self {
            url: url.to_owned(),
            name,
        }
    }

    /// The same schema, named in a child process's environment.
    pub fn existing(url: &str, name: &str) -> Self {
        Self {
            url: url.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Options for a store in this schema.
    pub fn options(&self) -> PgOptions {
        PgOptions::new(&self.url).schema(&self.name)
    }

    /// Runs `statement`, with `{s}` standing for this schema.
    pub fn sql(&self, statement: &str) -> Vec<tokio_postgres::Row> {
        let statement = statement.replace("{s}", &self.name);
        sql(&self.url, &statement).unwrap_or_else(|e| panic!("{statement}: {e}"))
    }

    /// Keeps the schema when dropped (a child process's view of its parent's schema).
    pub fn keep(self) {
        std::mem::forget(self);
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = sql(
            &self.url,
            &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name),
        );
    }
}

/// `bytes` as hex digits, for `'\x…'::bytea` literals in plain SQL.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A raw connection of the test's own, run on the calling thread: each step's SQL in order,
/// `ready` told the step's index once it ran, then the step's pause (so a transaction can
/// stay open while the test acts).
pub fn raw_session(
    url: String,
    steps: Vec<(String, std::time::Duration)>,
    ready: std::sync::mpsc::Sender<usize>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for a raw session");
    runtime.block_on(async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("the test server answers");
        let driver = tokio::spawn(connection);
        for (i, (statement, pause)) in steps.into_iter().enumerate() {
            client
                .batch_execute(&statement)
                .await
                .expect("the session's statement runs");
            let _ = ready.send(i);
            tokio::time::sleep(pause).await;
        }
        drop(client);
        let _ = driver.await;
    });
}

/// `BEGIN` and an insert of a row for each of `keys` into `schema`'s records (completed-looking
/// placeholders), for a session that keeps them uncommitted: a claim of one of those keys then
/// waits on the row lock.
pub fn uncommitted_rows<K: AsRef<[u8]>>(
    schema: &PgSchema,
    keys: impl IntoIterator<Item = K>,
) -> String {
    let rows: Vec<String> = keys
        .into_iter()
        .map(|k| {
            format!(
                "('', '\\x{}'::bytea, '\\x00', '\\x00', 1, 0, 0, 0, 0, 0)",
                hex(k.as_ref())
            )
        })
        .collect();
    format!(
        "BEGIN; INSERT INTO \"{}\".records (scope, key, record, digest, state, expires_ms, \
         claim_epoch, claim_seq, life_epoch, life_seq) VALUES {}",
        schema.name,
        rows.join(", ")
    )
}

/// Runs `statement` in a session of its own, keeps its transaction open for `hold`, then rolls
/// it back; returns once `statement` ran, with the session's thread.
pub fn hold_in_session(
    url: &str,
    statement: String,
    hold: std::time::Duration,
) -> std::thread::JoinHandle<()> {
    let (ready, ran) = std::sync::mpsc::channel();
    let url = url.to_owned();
    let session = std::thread::spawn(move || {
        raw_session(
            url,
            vec![
                (statement, hold),
                ("ROLLBACK".into(), std::time::Duration::ZERO),
            ],
            ready,
        )
    });
    assert_eq!(ran.recv().expect("the session ran its statement"), 0);
    session
}

/// Options for a store in `schema` whose sessions are named `app` (so a test finds them in
/// `pg_stat_activity`).
pub fn named(schema: &PgSchema, app: &str) -> PgOptions {
    PgOptions::new(format!("{} application_name={app}", schema.url)).schema(&schema.name)
}

/// A store (no sweeper) with `options`, whose calls wait up to `wait` for a running one.
pub fn open_waiting(options: PgOptions, wait: std::time::Duration) -> PgStore {
    StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(wait)
        .open_postgres(options)
        .expect("open")
}

/// A store on `schema` (no sweeper) with `tune` applied to its options: one replica.
pub fn replica(schema: &PgSchema, tune: impl FnOnce(PgOptions) -> PgOptions) -> PgStore {
    StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(tune(schema.options()))
        .expect("open a replica")
}

/// Runs `key` on `store`, the run counting itself in `runs` and answering `answer`: the value
/// the call returned, and whether it was a replay.
pub fn counted_call(
    store: &PgStore,
    key: &str,
    runs: &std::sync::atomic::AtomicUsize,
    answer: &str,
) -> (String, bool) {
    let out = store
        .execute_once(key, || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(answer.to_owned())
        })
        .unwrap_or_else(|e| panic!("call {key}: {e:?}"));
    let replayed = out.is_replayed();
    (out.into_value(), replayed)
}
