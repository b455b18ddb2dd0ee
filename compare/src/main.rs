//! idemstore against what users would pick instead, on this machine, in one run.
//!
//! Every system does the same idempotency protocol for a new key: look up, claim, durable
//! point, record the completion, durable point. Replay is one lookup of a completed key. Each
//! figure is operations per second over a fixed time; ratios are to idemstore's figure in the
//! same row group and thread count on the same kind of storage (PostgreSQL rows to
//! idemstore's PostgreSQL engine, every other row to idemstore on sled), so they compare
//! systems measured minutes apart on the same disk.
//!
//! The async API rows set `execute_once_async` on tokio tasks against `execute_once` on
//! threads (see `async_api`); their ratio is async ÷ sync, in a section of its own. The HTTP
//! rows set a handler behind `IdempotencyLayer` against the bare handler, every request a
//! replay, loaded by `wrk` over loopback (see `http_layer`; skipped without wrk); their ratio
//! is layer ÷ bare.
//!
//! PostgreSQL rows need a server: `IDEMSTORE_TEST_POSTGRES` (default
//! `host=127.0.0.1 user=postgres dbname=test`); when it does not answer they are skipped.
//!
//! Run: `cargo run --release -p idemstore-compare [-- --seconds 3 --out target/compare]`

mod async_api;
mod http_layer;
mod postgres;

use idemstore::{Durability, Store};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const VALUE: &[u8] = b"receipt:ch_1N8vJkLq2eZvKYlo2C0fG8yZ"; // a small, typical result

/// The server PostgreSQL rows run on when `IDEMSTORE_TEST_POSTGRES` is not set.
const DEFAULT_POSTGRES: &str = "host=127.0.0.1 user=postgres dbname=test";

/// Row names of the PostgreSQL systems.
const PG_ENGINE: &str = "idemstore PostgreSQL";
const PG_ENGINE_CACHED: &str = "idemstore PostgreSQL, replay cache";
const PG_BY_HAND: &str = "PostgreSQL by hand";
/// New keys by hand in a table that also keeps an indexed expiry, so a sweeper can find them.
const PG_BY_HAND_EXPIRING: &str = "PostgreSQL by hand, expiring rows";
/// A replay by hand as a request makes it, not knowing it is one: the claim, then the read.
const PG_BY_HAND_REQUEST: &str = "PostgreSQL by hand, claim then read";

/// Row groups measured against threads (the others run on one thread).
const DURABLE: &str = "new key, durable";
const REPLAY_SMALL: &str = "replay, small result";
const REPLAY_LARGE: &str = "replay, 4 KiB result";

/// Row groups of the async API against the sync one, at each thread count: the sync side's
/// callers are threads, the async side's are tasks on a runtime of one worker per task, up
/// to two.
const ASYNC_REPLAY: &str = "async API, replay small result";
const ASYNC_DURABLE: &str = "async API, new key durable";
const SYNC_CALLERS: &str = "idemstore sync (threads)";
const ASYNC_CALLERS: &str = "idemstore async (tasks)";

/// The row group of the HTTP layer against the bare handler (threads: wrk's connections).
const HTTP_REPLAY: &str = "HTTP replay, wrk over loopback";
const HTTP_REPLAY_SPLIT: &str = "HTTP replay, server and wrk on a core each";
const HTTP_BARE: &str = "bare handler";
const HTTP_LAYER: &str = "idemstore layer";

/// The result idemstore records: a small receipt, or a 4 KiB response body.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Receipt {
    charge_id: String,
    amount: u64,
    currency: String,
    body: String,
}

fn receipt(value: &[u8]) -> Receipt {
    Receipt {
        charge_id: "ch_1N8vJkLq2eZvKYlo2C0fG8yZ".into(),
        amount: 4200,
        currency: "eur".into(),
        body: String::from_utf8_lossy(value.get(35..).unwrap_or_default()).into_owned(),
    }
}

struct Settings {
    seconds: f64,
    only: Option<String>,
    out: PathBuf,
    threads: Vec<usize>,
    /// Times the whole plan runs, one round after another; a row reports its median. Rounds
    /// interleave the systems, so a slow spell of this shared machine falls on all of them.
    rounds: usize,
}

fn settings() -> Settings {
    let mut s = Settings {
        seconds: 2.0,
        only: None,
        out: PathBuf::from("target/compare"),
        threads: vec![1, 4, 16, 64],
        rounds: 1,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match (args[i].as_str(), args.get(i + 1)) {
            ("--seconds", Some(v)) => s.seconds = v.parse().expect("--seconds takes a number"),
            ("--out", Some(v)) => s.out = PathBuf::from(v),
            ("--only", Some(v)) => s.only = Some(v.clone()),
            ("--rounds", Some(v)) => {
                s.rounds = v.parse().expect("--rounds takes a whole number");
                assert!(s.rounds > 0, "--rounds takes a whole number above 0");
            }
            ("--threads", Some(v)) => {
                s.threads = v
                    .split(',')
                    .map(|t| t.parse().expect("--threads 1,4,16"))
                    .collect()
            }
            (other, _) => {
                panic!("unknown argument {other}; use --seconds N --out DIR --threads 1,4 --only WORKLOAD --rounds N")
            }
        }
        i += 2;
    }
    s
}

/// Runs `op(thread, n)` on `threads` threads for `seconds`; returns operations per second.
fn measure<F>(threads: usize, seconds: f64, op: F) -> f64
where
    F: Fn(usize, u64) + Sync,
{
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let (stop, done, op) = (&stop, &done, &op);
            scope.spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    op(t, n);
                    n += 1;
                }
                done.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(seconds));
        stop.store(true, Ordering::Relaxed);
    });
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Whether `text` contains `part`, in any case, where a word of `text` starts: `async` is in
/// "async API" but not in "fdatasync".
fn contains_from_word_start(text: &str, part: &str) -> bool {
    let (text, part) = (text.to_lowercase(), part.to_lowercase());
    // A trailing `$` anchors the part at the end: "idemstore PostgreSQL$" is not its cached row.
    let (part, anchored) = match part.strip_suffix('$') {
        Some(part) => (part, true),
        None => (part.as_str(), false),
    };
    text.match_indices(part).any(|(i, _)| {
        let starts_a_word = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric());
        starts_a_word && (!anchored || i + part.len() == text.len())
    })
}

fn key(t: usize, n: u64) -> String {
    format!("order-{t}-{n}")
}

// ---- idemstore ----

fn idemstore_new_keys(dir: &Path, durability: Durability, threads: usize, secs: f64) -> f64 {
    let store = Store::builder(dir.join("idem"))
        .durability(durability)
        .open()
        .unwrap();
    let r = measure(threads, secs, |t, n| {
        store
            .execute_once(key(t, n), || Ok::<_, std::io::Error>(receipt(VALUE)))
            .unwrap();
    });
    note_batching(&store);
    drop(store);
    r
}

/// Says how many durable points a flush of `store` served, when it flushed at all.
fn note_batching(store: &Store) {
    let stats = store.stats();
    if stats.flush_batches > 0 {
        eprintln!(
            "  ({} durable points per flush)",
            (2 * stats.executions) as f64 / stats.flush_batches as f64
        );
    }
}

/// A store in `dir` with 1000 completed keys recording `value`, and those keys.
fn replay_store(dir: &Path, value: &[u8]) -> (Store, Vec<String>) {
    let store = Store::builder(dir.join("idem-replay")).open().unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    for k in &keys {
        store
            .execute_once(k, || Ok::<_, std::io::Error>(receipt(value)))
            .unwrap();
    }
    (store, keys)
}

fn idemstore_replay(dir: &Path, threads: usize, secs: f64, value: &[u8]) -> f64 {
    let (store, keys) = replay_store(dir, value);
    measure(threads, secs, |_, n| {
        let out = store
            .execute_once(
                &keys[(n % 1000) as usize],
                || -> Result<Receipt, std::io::Error> {
                    unreachable!("replay must not run the operation")
                },
            )
            .unwrap();
        std::hint::black_box(out);
    })
}

// ---- raw sled, the same protocol by hand ----

/// How the raw sled protocol makes its two durable points.
#[derive(Clone, Copy, PartialEq)]
enum RawDurability {
    /// None: sled's background flush every 500 ms.
    None,
    /// `Db::flush` (sled 0.34: `sync_file_range`, survives a process crash).
    Flush,
    /// `Db::flush` then `fdatasync` of the data file (survives a power loss), as idemstore does.
    FlushAndSync,
}

fn raw_sled_new_keys(dir: &Path, mode: RawDurability, threads: usize, secs: f64) -> f64 {
    let db = sled::Config::new()
        .path(dir.join("raw-sled"))
        .flush_every_ms((mode == RawDurability::None).then_some(500))
        .open()
        .unwrap();
    let data_file = std::fs::File::open(dir.join("raw-sled").join("db")).unwrap();
    let durable = || match mode {
        RawDurability::None => {}
        RawDurability::Flush => {
            db.flush().unwrap();
        }
        RawDurability::FlushAndSync => {
            db.flush().unwrap();
            data_file.sync_data().unwrap();
        }
    };
    let tree = db.open_tree("records").unwrap();
    measure(threads, secs, |t, n| {
        let k = key(t, n);
        let found = tree.get(&k).unwrap();
        assert!(found.is_none());
        tree.compare_and_swap(&k, None::<&[u8]>, Some(&b"pending"[..]))
            .unwrap()
            .unwrap();
        durable();
        let mut done = b"completed:".to_vec();
        done.extend_from_slice(VALUE);
        tree.compare_and_swap(&k, Some(&b"pending"[..]), Some(done))
            .unwrap()
            .unwrap();
        durable();
    })
}

fn raw_sled_get(dir: &Path, threads: usize, secs: f64, value: &[u8]) -> f64 {
    let db = sled::open(dir.join("raw-sled-get")).unwrap();
    let tree = db.open_tree("records").unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    for k in &keys {
        tree.insert(k, value).unwrap();
    }
    measure(threads, secs, |_, n| {
        std::hint::black_box(tree.get(&keys[(n % 1000) as usize]).unwrap());
    })
}

/// A raw sled `get` of the bincode-encoded receipt, decoded into an owned `Receipt` as any
/// caller of a hand-rolled sled store must before using it.
fn raw_sled_get_decoded(dir: &Path, threads: usize, secs: f64, value: &[u8]) -> f64 {
    let db = sled::open(dir.join("raw-sled-get-decoded")).unwrap();
    let tree = db.open_tree("records").unwrap();
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let config = bincode::config::standard();
    let encoded = bincode::serde::encode_to_vec(receipt(value), config).unwrap();
    for k in &keys {
        tree.insert(k, encoded.as_slice()).unwrap();
    }
    measure(threads, secs, |_, n| {
        let bytes = tree.get(&keys[(n % 1000) as usize]).unwrap().unwrap();
        let (decoded, _): (Receipt, usize) =
            bincode::serde::decode_from_slice(&bytes, config).unwrap();
        std::hint::black_box(decoded);
    })
}

// ---- SQLite, WAL mode, the same protocol as a table ----

fn sqlite_open(path: &Path, synchronous: &str) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(60)).unwrap();
    c.pragma_update(None, "journal_mode", "WAL").unwrap();
    c.pragma_update(None, "synchronous", synchronous).unwrap();
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS idem (key TEXT PRIMARY KEY, state INTEGER NOT NULL, value BLOB)",
    )
    .unwrap();
    c
}

fn sqlite_new_keys(dir: &Path, synchronous: &str, threads: usize, secs: f64) -> f64 {
    let path = dir.join(format!("sqlite-{synchronous}.db"));
    drop(sqlite_open(&path, synchronous));
    let conns: Vec<parking_lot_free::Slot> = (0..threads)
        .map(|_| parking_lot_free::Slot::new(sqlite_open(&path, synchronous)))
        .collect();
    measure(threads, secs, |t, n| {
        let c = conns[t].get();
        let k = key(t, n);
        let existing: Option<i64> = {
            let mut q = c
                .prepare_cached("SELECT state FROM idem WHERE key = ?1")
                .unwrap();
            let mut rows = q.query([&k]).unwrap();
            rows.next().unwrap().map(|r| r.get(0).unwrap())
        };
        assert!(existing.is_none());
        let claimed = c
            .prepare_cached("INSERT INTO idem (key, state) VALUES (?1, 0) ON CONFLICT DO NOTHING")
            .unwrap()
            .execute([&k])
            .unwrap();
        assert_eq!(claimed, 1);
        let completed = c
            .prepare_cached("UPDATE idem SET state = 1, value = ?1 WHERE key = ?2 AND state = 0")
            .unwrap()
            .execute(rusqlite::params![VALUE, k])
            .unwrap();
        assert_eq!(completed, 1);
    })
}

fn sqlite_replay(dir: &Path, threads: usize, secs: f64, value: &[u8]) -> f64 {
    let path = dir.join("sqlite-replay.db");
    {
        let c = sqlite_open(&path, "NORMAL");
        for i in 0..1000 {
            c.execute(
                "INSERT INTO idem (key, state, value) VALUES (?1, 1, ?2)",
                rusqlite::params![format!("k{i}"), value],
            )
            .unwrap();
        }
    }
    let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let conns: Vec<parking_lot_free::Slot> = (0..threads)
        .map(|_| parking_lot_free::Slot::new(sqlite_open(&path, "NORMAL")))
        .collect();
    measure(threads, secs, |t, n| {
        let c = conns[t].get();
        let mut q = c
            .prepare_cached("SELECT state, value FROM idem WHERE key = ?1")
            .unwrap();
        let row: (i64, Vec<u8>) = q
            .query_row([&keys[(n % 1000) as usize]], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        std::hint::black_box(row);
    })
}

/// One SQLite connection per thread (connections are Send but not Sync).
mod parking_lot_free {
    pub struct Slot(std::sync::Mutex<rusqlite::Connection>);
    impl Slot {
        pub fn new(c: rusqlite::Connection) -> Self {
            Self(std::sync::Mutex::new(c))
        }
        /// Uncontended: each thread locks only its own slot.
        pub fn get(&self) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
            self.0.lock().unwrap()
        }
    }
}

// ---- the disk's limit ----

/// How a disk-ceiling row writes before each `fdatasync`.
#[derive(Clone, Copy)]
enum DiskWrite {
    /// 4 KiB blocks over the first 4 MiB of a fresh file: appends at first, then overwrites.
    Block4K,
    /// 1 KiB at the end of the file, which grows by each write (as sled's log does).
    Append,
    /// The same, waited for with `sync_file_range` first (as sled's flush does).
    AppendAfterRangeSync,
    /// 1 KiB over bytes already written and synced: the size stays (as SQLite's WAL after a
    /// checkpoint).
    Overwrite,
}

/// Durable writes per second to one file in `dir`, written as `how` says.
fn fdatasync_rate(dir: &Path, secs: f64, how: DiskWrite) -> f64 {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    const REGION: u64 = 4 << 20;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(dir.join("fsync.bin"))
        .unwrap();
    let fd = f.as_raw_fd();
    if let DiskWrite::Overwrite = how {
        f.write_all_at(&vec![0u8; REGION as usize], 0).unwrap();
        assert_eq!(fdatasync(fd), 0);
    }
    let block = vec![0x5Au8; 4096];
    let small = &block[..1024];
    let appended = std::sync::atomic::AtomicU64::new(0);
    measure(1, secs, |_, n| {
        match how {
            DiskWrite::Block4K => f.write_all_at(&block, (n * 4096) % REGION).unwrap(),
            DiskWrite::Overwrite => f.write_all_at(small, (n * 1024) % REGION).unwrap(),
            DiskWrite::Append | DiskWrite::AppendAfterRangeSync => {
                let at = appended.fetch_add(1024, std::sync::atomic::Ordering::Relaxed);
                f.write_all_at(small, at).unwrap();
                if let DiskWrite::AppendAfterRangeSync = how {
                    assert_eq!(sync_file_range(fd, at, 1024), 0);
                }
            }
        }
        assert_eq!(fdatasync(fd), 0);
    })
}

fn fdatasync(fd: i32) -> i32 {
    // libc::fdatasync is an FFI call; it only reads the descriptor.
    #[allow(unsafe_code)]
    unsafe {
        libc::fdatasync(fd)
    }
}

/// `sync_file_range` of `len` bytes at `at`, waiting as sled 0.34's log write does.
fn sync_file_range(fd: i32, at: u64, len: u64) -> i32 {
    let how = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // An FFI call that only reads the descriptor and its arguments.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync_file_range(fd, at as i64, len as i64, how)
    }
}

// ---- PostgreSQL ----

/// The PostgreSQL server of this run, or None (with a note saying why its rows are skipped).
fn postgres_server(notes: &mut Vec<String>) -> Option<postgres::Server> {
    let url =
        std::env::var("IDEMSTORE_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES.to_string());
    match postgres::Server::connect(&url) {
        Ok(server) => Some(server),
        Err(e) => {
            let note =
                format!("PostgreSQL rows skipped: the server at `{url}` did not answer ({e}).");
            eprintln!("{note}");
            notes.push(note);
            None
        }
    }
}

// ---- HTTP ----

/// Whether wrk runs here; if not, a note says the HTTP rows are skipped.
fn wrk_found(notes: &mut Vec<String>) -> bool {
    match http_layer::wrk_missing() {
        None => true,
        Some(e) => {
            let note = format!("HTTP rows skipped: wrk did not start ({e}).");
            eprintln!("{note}");
            notes.push(note);
            false
        }
    }
}

// ---- report ----

struct Row {
    group: &'static str,
    system: String,
    threads: usize,
    ops: f64,
}

fn main() {
    let s = settings();
    std::fs::create_dir_all(&s.out).unwrap();
    let mut rows: Vec<Row> = Vec::new();
    let mut push = |group, system: &str, threads, ops: f64| {
        rows.push(Row {
            group,
            system: system.to_string(),
            threads,
            ops,
        });
    };
    let fresh = || tempfile::tempdir_in(std::env::current_dir().unwrap()).unwrap();
    // `--only TEXT` keeps the measurements whose "group: system" contains TEXT, in any case,
    // from the start of a word (and, with a trailing `$`, to the end).
    let wanted = |group: &str, system: &str| {
        s.only
            .as_ref()
            .is_none_or(|o| contains_from_word_start(&format!("{group}: {system}"), o))
    };
    let mut notes: Vec<String> = Vec::new();
    let pg_wanted = [DURABLE, REPLAY_SMALL]
        .iter()
        .any(|g| wanted(g, PG_ENGINE) || wanted(g, PG_BY_HAND));
    let pg = match pg_wanted {
        true => postgres_server(&mut notes),
        false => None,
    };
    let wrk = [HTTP_BARE, HTTP_LAYER]
        .iter()
        .any(|system| wanted(HTTP_REPLAY, system) || wanted(HTTP_REPLAY_SPLIT, system))
        && wrk_found(&mut notes);
    type Measure<'a> = Box<dyn Fn(&Path) -> f64 + 'a>;
    let secs = s.seconds;
    let mut plan: Vec<(&'static str, &'static str, usize, Measure)> = Vec::new();
    let small = VALUE.to_vec();
    let large = vec![7u8; 4096];
    for (group, value) in [(REPLAY_SMALL, small), (REPLAY_LARGE, large)] {
        let v = value.clone();
        plan.push((
            group,
            "idemstore",
            1,
            Box::new(move |d| idemstore_replay(d, 1, secs, &v)),
        ));
        let v = value.clone();
        plan.push((
            group,
            "raw sled get",
            1,
            Box::new(move |d| raw_sled_get(d, 1, secs, &v)),
        ));
        let v = value.clone();
        plan.push((
            group,
            "raw sled get + decode",
            1,
            Box::new(move |d| raw_sled_get_decoded(d, 1, secs, &v)),
        ));
        plan.push((
            group,
            "SQLite SELECT",
            1,
            Box::new(move |d| sqlite_replay(d, 1, secs, &value)),
        ));
    }
    // Replays against threads: idemstore on sled and both PostgreSQL systems.
    for &t in &s.threads {
        let group = REPLAY_SMALL;
        if t != 1 {
            plan.push((
                group,
                "idemstore",
                t,
                Box::new(move |d| idemstore_replay(d, t, secs, VALUE)),
            ));
        }
        if let Some(server) = &pg {
            plan.push((
                group,
                PG_ENGINE,
                t,
                Box::new(move |_| postgres::engine_replay(server, t, secs, false)),
            ));
            plan.push((
                group,
                PG_ENGINE_CACHED,
                t,
                Box::new(move |_| postgres::engine_replay(server, t, secs, true)),
            ));
            plan.push((
                group,
                PG_BY_HAND,
                t,
                Box::new(move |_| postgres::by_hand_replay(server, t, secs)),
            ));
            plan.push((
                group,
                PG_BY_HAND_REQUEST,
                t,
                Box::new(move |_| postgres::by_hand_request_replay(server, t, secs)),
            ));
        }
    }
    for &t in &s.threads {
        let group = DURABLE;
        plan.push((
            group,
            "idemstore Immediate",
            t,
            Box::new(move |d| idemstore_new_keys(d, Durability::Immediate, t, secs)),
        ));
        plan.push((
            group,
            "raw sled + 2 flushes",
            t,
            Box::new(move |d| raw_sled_new_keys(d, RawDurability::Flush, t, secs)),
        ));
        plan.push((
            group,
            "raw sled + 2 (flush + fdatasync)",
            t,
            Box::new(move |d| raw_sled_new_keys(d, RawDurability::FlushAndSync, t, secs)),
        ));
        plan.push((
            group,
            "SQLite WAL FULL",
            t,
            Box::new(move |d| sqlite_new_keys(d, "FULL", t, secs)),
        ));
        if let Some(server) = &pg {
            plan.push((
                group,
                PG_ENGINE,
                t,
                Box::new(move |_| postgres::engine_new_keys(server, t, secs)),
            ));
            plan.push((
                group,
                PG_BY_HAND,
                t,
                Box::new(move |_| {
                    postgres::by_hand_new_keys(server, t, secs, postgres::Table::Plain)
                }),
            ));
            plan.push((
                group,
                PG_BY_HAND_EXPIRING,
                t,
                Box::new(move |_| {
                    postgres::by_hand_new_keys(server, t, secs, postgres::Table::Expiring)
                }),
            ));
        }
    }
    // The async API against the sync one: each async figure right after its sync twin, so
    // the two are measured seconds apart.
    for &t in &s.threads {
        plan.push((
            ASYNC_REPLAY,
            SYNC_CALLERS,
            t,
            Box::new(move |d| idemstore_replay(d, t, secs, VALUE)),
        ));
        plan.push((
            ASYNC_REPLAY,
            ASYNC_CALLERS,
            t,
            Box::new(move |d| async_api::replay(d, t, secs)),
        ));
    }
    for &t in &s.threads {
        plan.push((
            ASYNC_DURABLE,
            SYNC_CALLERS,
            t,
            Box::new(move |d| idemstore_new_keys(d, Durability::Immediate, t, secs)),
        ));
        plan.push((
            ASYNC_DURABLE,
            ASYNC_CALLERS,
            t,
            Box::new(move |d| async_api::new_keys(d, t, secs)),
        ));
    }
    if wrk {
        let c = http_layer::CONNECTIONS;
        for (group, cores) in [
            (HTTP_REPLAY, http_layer::Cores::Shared),
            (HTTP_REPLAY_SPLIT, http_layer::Cores::Split),
        ] {
            for (system, route) in [
                (HTTP_BARE, http_layer::Route::Bare),
                (HTTP_LAYER, http_layer::Route::Idem),
            ] {
                plan.push((
                    group,
                    system,
                    c,
                    Box::new(move |d| http_layer::replay(d, route, cores, secs)),
                ));
            }
        }
    }
    let group = "new key, not durable";
    let periodic = Durability::Periodic(Duration::from_millis(500));
    plan.push((
        group,
        "idemstore Periodic(500ms)",
        1,
        Box::new(move |d| idemstore_new_keys(d, periodic, 1, secs)),
    ));
    plan.push((
        group,
        "raw sled, no flush",
        1,
        Box::new(move |d| raw_sled_new_keys(d, RawDurability::None, 1, secs)),
    ));
    plan.push((
        group,
        "SQLite WAL NORMAL",
        1,
        Box::new(move |d| sqlite_new_keys(d, "NORMAL", 1, secs)),
    ));
    for (system, how) in [
        ("write 4 KiB + fdatasync", DiskWrite::Block4K),
        ("append 1 KiB + fdatasync", DiskWrite::Append),
        (
            "append 1 KiB + sync_file_range + fdatasync",
            DiskWrite::AppendAfterRangeSync,
        ),
        ("overwrite 1 KiB + fdatasync", DiskWrite::Overwrite),
    ] {
        plan.push((
            "disk ceiling",
            system,
            1,
            Box::new(move |d| fdatasync_rate(d, secs, how)),
        ));
    }

    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); plan.len()];
    for round in 1..=s.rounds {
        if s.rounds > 1 {
            eprintln!("round {round} of {}", s.rounds);
        }
        for ((group, system, threads, measure), seen) in plan.iter().zip(&mut figures) {
            if wanted(group, system) {
                let dir = fresh();
                let ops = measure(dir.path());
                eprintln!("{group:<28} {system:<26} {threads:>3} threads {ops:>12.0} ops/s");
                seen.push(ops);
            }
        }
    }
    for ((group, system, threads, _), mut seen) in plan.into_iter().zip(figures) {
        if !seen.is_empty() {
            seen.sort_by(f64::total_cmp);
            push(group, system, threads, seen[seen.len() / 2]);
        }
    }

    let mut table = render_table(&rows);
    table += &render_versus(&rows, &ASYNC_VERSUS);
    table += &render_versus(&rows, &HTTP_VERSUS);
    for note in &notes {
        table += &format!("\n{note}\n");
    }
    println!("{table}");
    std::fs::write(s.out.join("results.md"), &table).unwrap();
    let durable_svg = render_svg(
        &rows,
        DURABLE,
        "New key, durable: ops/s against threads (log scale)",
        &[
            ("idemstore Immediate", "#1f77b4"),
            ("raw sled + 2 flushes", "#ff7f0e"),
            ("raw sled + 2 (flush + fdatasync)", "#9467bd"),
            ("SQLite WAL FULL", "#2ca02c"),
            (PG_ENGINE, "#d62728"),
            (PG_BY_HAND, "#8c564b"),
        ],
    );
    std::fs::write(s.out.join("durable-threads.svg"), durable_svg).unwrap();
    let replay_svg = render_svg(
        &rows,
        REPLAY_SMALL,
        "Replay, small result: ops/s against threads (log scale)",
        &[
            ("idemstore", "#1f77b4"),
            (PG_ENGINE, "#d62728"),
            (PG_BY_HAND, "#8c564b"),
            (PG_BY_HAND_REQUEST, "#e377c2"),
        ],
    );
    std::fs::write(s.out.join("replay-threads.svg"), replay_svg).unwrap();
    let async_series = [(SYNC_CALLERS, "#1f77b4"), (ASYNC_CALLERS, "#17becf")];
    let async_replay_svg = render_svg(
        &rows,
        ASYNC_REPLAY,
        "Async API, replay: ops/s against callers (log scale)",
        &async_series,
    );
    std::fs::write(s.out.join("async-replay.svg"), async_replay_svg).unwrap();
    let async_durable_svg = render_svg(
        &rows,
        ASYNC_DURABLE,
        "Async API, new key durable: ops/s against callers (log scale)",
        &async_series,
    );
    std::fs::write(s.out.join("async-durable.svg"), async_durable_svg).unwrap();
    let mut csv = std::fs::File::create(s.out.join("results.csv")).unwrap();
    writeln!(csv, "group,system,threads,ops_per_sec").unwrap();
    for r in &rows {
        writeln!(
            csv,
            "{},{},{},{:.0}",
            csv_field(r.group),
            csv_field(&r.system),
            r.threads,
            r.ops
        )
        .unwrap();
    }
    eprintln!(
        "wrote {}/results.md, results.csv, durable-threads.svg, replay-threads.svg, \
         async-replay.svg, async-durable.svg",
        s.out.display()
    );
}

/// A CSV field: quoted, as group names hold commas ("replay, small result").
fn csv_field(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

fn render_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| workload | system | threads | ops/s | idemstore ÷ system |\n|---|---|---:|---:|---:|\n",
    );
    // PostgreSQL rows compare with idemstore's PostgreSQL engine, the others with sled's.
    let on_postgres = |system: &str| system.contains("PostgreSQL");
    for r in rows {
        let base = rows
            .iter()
            .find(|b| {
                b.group == r.group
                    && b.threads == r.threads
                    && b.system.starts_with("idemstore")
                    && on_postgres(&b.system) == on_postgres(&r.system)
            })
            .map(|b| b.ops);
        let ratio = match base {
            Some(b) if !r.system.starts_with("idemstore") => format!("{:.2}×", b / r.ops),
            _ => "—".to_string(),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {} |\n",
            r.group, r.system, r.threads, r.ops, ratio
        ));
    }
    out
}

/// A section of the report that sets one system against another, row by row.
struct Versus {
    title: &'static str,
    /// What the threads column counts here.
    callers: &'static str,
    groups: &'static [&'static str],
    /// The system the ratio divides by, and the one it divides.
    base: &'static str,
    system: &'static str,
    /// The ratio column's heading.
    ratio: &'static str,
}

const ASYNC_VERSUS: Versus = Versus {
    title: "Async API against the sync one (target: replays within 10%, async ÷ sync ≥ 0.90)",
    callers: "callers",
    groups: &[ASYNC_REPLAY, ASYNC_DURABLE],
    base: SYNC_CALLERS,
    system: ASYNC_CALLERS,
    ratio: "async ÷ sync",
};

const HTTP_VERSUS: Versus = Versus {
    title:
        "HTTP layer against the bare handler, every request a replay (target: layer ÷ bare ≥ 0.85)",
    callers: "connections",
    groups: &[HTTP_REPLAY, HTTP_REPLAY_SPLIT],
    base: HTTP_BARE,
    system: HTTP_LAYER,
    ratio: "layer ÷ bare",
};

/// `v`'s section: a row per group and thread count with both systems measured, with
/// `system ÷ base`; empty when there is none.
fn render_versus(rows: &[Row], v: &Versus) -> String {
    let find = |group: &str, system: &str, threads: usize| {
        rows.iter()
            .find(|r| r.group == group && r.system == system && r.threads == threads)
            .map(|r| r.ops)
    };
    let mut body = String::new();
    for r in rows
        .iter()
        .filter(|r| v.groups.contains(&r.group) && r.system == v.base)
    {
        if let Some(ops) = find(r.group, v.system, r.threads) {
            body += &format!(
                "| {} | {} | {:.0} | {ops:.0} | {:.2} |\n",
                r.group,
                r.threads,
                r.ops,
                ops / r.ops
            );
        }
    }
    if body.is_empty() {
        return body;
    }
    format!(
        "\n## {}\n\n| workload | {} | {} | {} | {} |\n|---|---:|---:|---:|---:|\n{body}",
        v.title, v.callers, v.base, v.system, v.ratio
    )
}

/// A chart line's points: (threads, ops/s).
type Points = Vec<(usize, f64)>;

/// A log-scale line chart of `group`'s throughput against threads, one line per system of
/// `series` (name, colour) that has rows.
fn render_svg(rows: &[Row], group: &str, title: &str, series: &[(&str, &str)]) -> String {
    // (name, colour, points) of each series with rows.
    let lines: Vec<(&str, &str, Points)> = series
        .iter()
        .map(|&(name, color)| {
            let pts = rows
                .iter()
                .filter(|r| r.group == group && r.system == name)
                .map(|r| (r.threads, r.ops))
                .collect();
            (name, color, pts)
        })
        .filter(|(_, _, pts): &(_, _, Points)| !pts.is_empty())
        .collect();
    let all: Vec<f64> = lines
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(_, o)| *o))
        .collect();
    let (lo, hi) = (
        all.iter()
            .cloned()
            .fold(f64::MAX, f64::min)
            .max(1.0)
            .log10()
            .floor(),
        all.iter().cloned().fold(1.0, f64::max).log10().ceil(),
    );
    // Every thread count any series has, in order: a series' point sits at its count's place.
    let mut threads: Vec<usize> = lines
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(t, _)| *t))
        .collect();
    threads.sort_unstable();
    threads.dedup();
    let place = |t: usize| threads.iter().position(|&u| u == t).unwrap_or_default();
    let (w, h, left, right, top, bottom) = (800.0, 420.0, 80.0, 280.0, 40.0, 60.0);
    let x = |i: usize| left + (w - left - right) * i as f64 / (threads.len().max(2) - 1) as f64;
    let y = |ops: f64| {
        top + (h - top - bottom) * (1.0 - (ops.max(1.0).log10() - lo) / (hi - lo).max(1.0))
    };
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{}' y='22' font-size='15' text-anchor='middle'>{title}</text>",
        w / 2.0
    );
    let mut decade = lo;
    while decade <= hi {
        let v = 10f64.powf(decade);
        svg += &format!(
            "<line x1='{left}' x2='{}' y1='{y0}' y2='{y0}' stroke='#ddd'/><text x='{}' y='{}' text-anchor='end'>{v:.0}</text>",
            w - right,
            left - 6.0,
            y(v) + 4.0,
            y0 = y(v)
        );
        decade += 1.0;
    }
    for (i, t) in threads.iter().enumerate() {
        svg += &format!(
            "<text x='{}' y='{}' text-anchor='middle'>{t}</text>",
            x(i),
            h - bottom + 18.0
        );
    }
    svg += &format!(
        "<text x='{}' y='{}' text-anchor='middle'>threads</text>",
        (left + w - right) / 2.0,
        h - 18.0
    );
    for (k, (name, color, pts)) in lines.iter().enumerate() {
        let path: Vec<String> = pts
            .iter()
            .map(|(t, o)| format!("{:.1},{:.1}", x(place(*t)), y(*o)))
            .collect();
        svg += &format!(
            "<polyline fill='none' stroke='{color}' stroke-width='2.5' points='{}'/>",
            path.join(" ")
        );
        for (t, o) in pts {
            svg += &format!(
                "<circle cx='{:.1}' cy='{:.1}' r='3.5' fill='{color}'/>",
                x(place(*t)),
                y(*o)
            );
        }
        let ly = top + 20.0 + 22.0 * k as f64;
        svg += &format!(
            "<line x1='{}' x2='{}' y1='{ly}' y2='{ly}' stroke='{color}' stroke-width='3'/><text x='{}' y='{}'>{name}</text>",
            w - right + 12.0,
            w - right + 36.0,
            w - right + 42.0,
            ly + 4.0
        );
    }
    svg + "</svg>\n"
}
