//! Adversarial tests of the PostgreSQL engine: each test states a promise of the engine (its
//! module docs, `PgOptions`, `execute_once_in_tx`, the engine contract) and an attack that
//! breaks it. A failing test is a defect; the report names the root cause.
//!
//! Needs `IDEMSTORE_TEST_POSTGRES`; without it every test passes without running.

mod common;

use common::pg::{pg_url, PgSchema};
use common::XorShift;
use idemstore::{Error, ExecuteError, PgOptions, PgStore, StepError, StorageKind, StoreBuilder};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

type Io = std::io::Error;

fn open(schema: &PgSchema, tweak: impl FnOnce(PgOptions) -> PgOptions) -> PgStore {
    StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(10))
        .open_postgres(tweak(schema.options()))
        .expect("open a PostgreSQL store")
}

fn open_with(
    schema: &PgSchema,
    builder: impl FnOnce(StoreBuilder) -> StoreBuilder,
    tweak: impl FnOnce(PgOptions) -> PgOptions,
) -> PgStore {
    builder(StoreBuilder::default().sweep_interval(None))
        .open_postgres(tweak(schema.options()))
        .expect("open a PostgreSQL store")
}

fn kind_of<T: std::fmt::Debug, E: std::fmt::Debug>(
    r: &Result<T, ExecuteError<E>>,
) -> Option<StorageKind> {
    match r {
        Err(ExecuteError::Store(Error::Storage(e))) => Some(e.kind()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// 1. The heartbeat shares the pool with the callers.

/// Promise (engine/postgres/lease.rs, module docs): "a live holder's lease never runs out
/// unless the process stops (killed, paused, cut off from the database) for longer than about
/// two thirds of it", so a key's operation runs at most once across replicas while its holder
/// lives.
///
/// Attack: the heartbeat takes its connection from the same pool as every call. A replica
/// whose pool is busy (here: pool_size 1 and one `execute_once_in_tx` whose operation runs a
/// little while; with 16 connections, 16 such transactions) cannot renew its leases, so a
/// live, healthy holder loses its claim and another replica runs the operation beside it.
#[test]
fn a_live_holder_keeps_its_lease_while_its_pool_is_busy() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let lease = Duration::from_millis(600);
    let a = open(&schema, |o| o.pool_size(1).lease(lease));
    let b = open(&schema, |o| o.lease(lease));
    let runs = AtomicU32::new(0);
    let (holding_tx, holding) = mpsc::channel::<()>();
    let (in_tx_tx, in_tx) = mpsc::channel::<()>();
    let other = std::thread::scope(|s| {
        let holder = s.spawn(|| {
            a.execute_once("victim", || {
                runs.fetch_add(1, Ordering::SeqCst);
                holding_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(3000));
                Ok::<_, Io>(1u32)
            })
        });
        holding.recv().unwrap();
        let busy = s.spawn(|| {
            a.execute_once_in_tx("busy", |_tx| {
                in_tx_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(2500));
                Ok::<_, Io>(0u32)
            })
        });
        in_tx.recv().unwrap();
        // Two and a half leases: a heartbeat every 200 ms would have renewed it many times.
        std::thread::sleep(lease * 5 / 2);
        let other = b.call("victim").wait_timeout(Duration::ZERO).run(|| {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Io>(2u32)
        });
        let _ = busy.join().unwrap();
        let _ = holder.join().unwrap();
        other
    });
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the operation ran beside its live holder (other replica got {other:?})"
    );
    assert!(
        matches!(other, Err(ExecuteError::Store(Error::InProgress { .. }))),
        "expected InProgress, got {other:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 2 and 3. execute_once_in_tx needs a second pooled connection while it holds one.

/// Promise (`PgOptions::pool_size`: 1 to 1024 accepted; `execute_once_in_tx`: "Replays,
/// fingerprints, TTLs and waiting behave as in execute_once"): a retry of a key whose last
/// attempt failed retryably runs the operation.
///
/// Attack: the last attempt was made by a replica opened later (a higher epoch). The
/// transactional driver then asks for a fresh epoch (`next_claim_token` ->
/// `fresh_epoch`) on a *second* pooled connection while its transaction holds the only one:
/// every retry fails with a pool timeout, forever (the key is stuck for this replica).
#[test]
fn execute_once_in_tx_with_one_connection_retries_a_key_a_newer_replica_failed() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = open(&schema, |o| {
        o.pool_size(1).connect_timeout(Duration::from_secs(1))
    });
    let b = open(&schema, |o| o);
    assert!(b.epoch() > a.epoch());
    let failed = b.execute_once("k", || Err::<u32, _>(Io::other("try later")));
    assert!(matches!(failed, Err(ExecuteError::Operation { .. })));
    let r = a.execute_once_in_tx("k", |_tx| Ok::<_, Io>(7u32));
    match r {
        Ok(out) => assert_eq!(*out, 7),
        Err(e) => panic!("the retry failed instead of running: {e:?}"),
    }
}

/// Promise (contract: an orphan — a Pending record whose lease ended — is taken over under
/// `OrphanPolicy::Rerun`; `execute_once_in_tx` waits and takes over as `execute_once` does).
///
/// Attack: pool_size 1. The transactional driver locks the orphan's row in its transaction,
/// then asks `holder_live` on a second pooled connection; that times out, the error is read as
/// "live", and the call waits — while holding the row lock — until its wait budget is spent.
/// The orphan is never taken over by this replica.
#[test]
fn execute_once_in_tx_with_one_connection_takes_over_an_orphan() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let holder = open(&schema, |o| o);
    let a = open_with(
        &schema,
        |b| b.wait_timeout(Duration::from_secs(2)),
        |o| o.pool_size(1).connect_timeout(Duration::from_secs(1)),
    );
    let (started_tx, started) = mpsc::channel::<()>();
    let (release_tx, release) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let holder = &holder;
        let h = s.spawn(move || {
            holder.execute_once("k", move || {
                started_tx.send(()).unwrap();
                release.recv().unwrap();
                Ok::<_, Io>(1u32)
            })
        });
        started.recv().unwrap();
        // The holder is cut off: its lease ends (as after a SIGKILL, minus the wait).
        holder.__lapse_leases().expect("lapse");
        let t0 = Instant::now();
        let r = a.execute_once_in_tx("k", |_tx| Ok::<_, Io>(7u32));
        let took = t0.elapsed();
        release_tx.send(()).unwrap();
        let _ = h.join().unwrap();
        match r {
            Ok(out) => assert_eq!(*out, 7),
            Err(e) => panic!("the orphan was not taken over after {took:?}: {e:?}"),
        }
    });
}

// ---------------------------------------------------------------------------------------
// 4. Row locks are waited for without bound.

/// Promise (contract: waiting for a holder in another replica is bounded by the wait
/// timeout, `InProgress` after; `wait_timeout(ZERO)` never waits).
///
/// Attack: replica B retries a key in `execute_once_in_tx` (its record row exists: a
/// retryable failure) and its operation runs two seconds, holding the row lock (`FOR
/// UPDATE`). A plain call of replica A with `wait_timeout(ZERO)` blocks in its claim
/// statement (`INSERT .. ON CONFLICT DO UPDATE` waits for the lock) for the whole two
/// seconds — and holds a pooled connection all along.
#[test]
fn a_transaction_elsewhere_does_not_outlast_the_wait_timeout() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = open(&schema, |o| o);
    let b = open(&schema, |o| o);
    let first = b.execute_once_in_tx("k", |_tx| Err::<u32, _>(Io::other("try later")));
    assert!(matches!(first, Err(ExecuteError::Operation { .. })));
    let (in_tx_tx, in_tx) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let t = s.spawn(|| {
            b.execute_once_in_tx("k", |_tx| {
                in_tx_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_secs(2));
                Ok::<_, Io>(1u32)
            })
        });
        in_tx.recv().unwrap();
        let t0 = Instant::now();
        let r = a
            .call("k")
            .wait_timeout(Duration::ZERO)
            .run(|| Ok::<_, Io>(2u32));
        let took = t0.elapsed();
        assert_eq!(*t.join().unwrap().expect("B records"), 1);
        assert!(
            took < Duration::from_millis(800),
            "a call that must not wait blocked {took:?} on another replica's row lock ({r:?})"
        );
    });
}

// ---------------------------------------------------------------------------------------
// 5. A panic in the transactional operation can turn into an error.

/// Promise (contract table: `f` panics -> FailedRetryable, "the panic continues to the
/// caller"; pg_transaction.rs: "a panic does the same with a retryable record, then unwinds").
///
/// Attack: the operation's connection breaks (a server restart, a network failure; here the
/// operation terminates its own backend) and the operation panics on the error, as
/// `.expect()` on a statement does. `ROLLBACK TO SAVEPOINT` then fails, its `?` returns a
/// storage error and the panic payload is dropped: the caller gets `Err(Storage(Connection))`,
/// not the panic. (The plain driver logs a failed write and still resumes the panic.)
#[test]
fn a_panic_in_the_transactional_operation_reaches_the_caller() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = open(&schema, |o| o);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.execute_once_in_tx("k", |tx| {
            tx.execute("SELECT pg_terminate_backend(pg_backend_pid())", &[])
                .expect("the operation's statement");
            Ok::<_, Io>(1u32)
        })
    }));
    match caught {
        Err(_) => {}
        Ok(r) => panic!("the operation's panic was swallowed; the caller got {r:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 6. The connection string's own options are dropped.

/// Promise (`PgOptions::new`: "a URL or key-value pairs, as libpq takes them").
///
/// Attack: a connection string with `options='-c search_path=...'` (how services point
/// unqualified table names at their schema). The engine replaces `options` with its own
/// (`config.options(..)` in engine/postgres/mod.rs), so the operation's statements in
/// `execute_once_in_tx` no longer find the user's tables.
#[test]
fn connection_string_options_are_kept() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = open_with(
        &schema,
        |b| b,
        |_| {
            PgOptions::new(format!("{url} options='-c search_path={}'", schema.name))
                .schema(&schema.name)
        },
    );
    schema.sql("CREATE TABLE {s}.orders (id text PRIMARY KEY)");
    let r = store.execute_once_in_tx("order-1", |tx| {
        tx.execute("INSERT INTO orders VALUES ('order-1')", &[])?;
        let shown: String = tx.query_one("SHOW search_path", &[])?.get(0);
        Ok::<_, Error>(shown)
    });
    match r {
        Ok(out) => assert_eq!(*out, schema.name),
        Err(e) => panic!("the connection string's options were dropped: {e:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 7. Session settings made by an operation leak into the store's pooled connections.

/// Promise (engine module docs: "in `Immediate` durability every commit is synchronous
/// (`synchronous_commit = on`), so a write is durable when it returns").
///
/// Attack: an operation of `execute_once_in_tx` runs `SET synchronous_commit = off` (session
/// scope, committed with the transaction). Pooled connections are recycled with
/// `RecyclingMethod::Fast` and never reset, so the store's own later claims and outcomes on
/// that connection commit asynchronously in an `Immediate` store (and any other session
/// setting — statement_timeout, role, search_path — leaks the same way).
#[test]
fn session_settings_of_an_operation_do_not_leak_into_later_writes() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = open(&schema, |o| o.pool_size(1));
    store
        .execute_once_in_tx("a", |tx| {
            tx.batch_execute("SET synchronous_commit = off")?;
            Ok::<_, Error>(0u32)
        })
        .expect("first");
    let seen = store
        .execute_once_in_tx("b", |tx| {
            let v: String = tx.query_one("SHOW synchronous_commit", &[])?.get(0);
            Ok::<_, Error>(v)
        })
        .expect("second");
    assert_eq!(
        seen.as_str(),
        "on",
        "an Immediate store's connection now commits with synchronous_commit={}",
        *seen
    );
}

// ---------------------------------------------------------------------------------------
// 8. Keys the settings accept but PostgreSQL cannot index.

/// Promise (StoreBuilder::max_key_bytes: 1 to 65535 accepted; contract: a key is refused
/// only when empty or over `max_key_bytes`, with `EmptyKey` / `KeyTooLong`).
///
/// Attack: max_key_bytes(4096) passes `open_postgres`; a 3000-byte key (incompressible)
/// cannot go into the btree primary key of `records` (limit ~2704 bytes per entry): every
/// call fails with a `Database` error, the key can never be used.
#[test]
fn a_key_within_max_key_bytes_is_usable_on_postgres() {
    // Fixed by refusing, at open, a key limit PostgreSQL's index cannot hold; a key at the
    // highest accepted limit works.
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let refused = StoreBuilder::default()
        .max_key_bytes(4096)
        .open_postgres(schema.options());
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "{refused:?}"
    );
    let store = open_with(
        &schema,
        |b| b.max_key_bytes(2048),
        |o| o.tenant("t".repeat(255)),
    );
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let key: Vec<u8> = (0..2048).map(|_| rng.next() as u8).collect();
    let runs = AtomicU32::new(0);
    let r = store.execute_once(&key, || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Io>(1u32)
    });
    match r {
        Ok(out) => assert_eq!(*out, 1),
        Err(e) => panic!(
            "a key of 2048 bytes (the highest limit) is unusable (ran {} times): {e:?}",
            runs.load(Ordering::SeqCst)
        ),
    }
}

// ---------------------------------------------------------------------------------------
// 9 and 10. Settings accepted at open that PostgreSQL refuses later.

/// Promise (api/postgres.rs: "every setting is checked before a connection is made
/// (`InvalidConfig`)"; `PgOptions::tenant`: at most 255 bytes).
///
/// Attack: a tenant with a NUL byte (a Rust `String` may hold one; PostgreSQL `text` cannot).
/// The open succeeds; then every call of the store fails with a `Database` storage error.
#[test]
fn a_tenant_postgres_cannot_store_is_refused_at_open() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let opened = StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(schema.options().tenant("shop\0eu"));
    match opened {
        Err(Error::InvalidConfig(_)) => {}
        Err(e) => panic!("expected InvalidConfig, got {e}"),
        Ok(store) => {
            let r = store.execute_once("k", || Ok::<_, Io>(1u32));
            panic!("opened with a tenant PostgreSQL cannot store; a call then gives {r:?}");
        }
    }
}

/// Promise (schema.rs: "the schema name is a plain lower-case identifier (checked before any
/// SQL is built, so it is safe to splice into statements)"; api/postgres.rs: settings are
/// checked before a connection is made).
///
/// Attack: `user` (or `order`, `select`, `table`...) matches `[a-z_][a-z0-9_]*` but is a
/// reserved word: the open reaches the server and fails with a syntax error (`Database`),
/// not `InvalidConfig`.
#[test]
fn a_reserved_word_schema_is_refused_before_connecting() {
    // Fixed by quoting the schema in every statement: a reserved word works; PostgreSQL's own
    // prefix is refused before connecting.
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::existing(&url, "user");
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(PgOptions::new(&url).schema("user"))
        .expect("a reserved word is a usable schema name");
    let out = store
        .execute_once("k", || Ok::<_, Io>(1u32))
        .expect("works");
    assert_eq!(*out, 1);
    drop(store);
    schema.sql("DROP SCHEMA \"user\" CASCADE");
    std::mem::forget(schema);
    let refused = StoreBuilder::default().open_postgres(PgOptions::new(&url).schema("pg_x"));
    assert!(
        matches!(refused, Err(Error::InvalidConfig(_))),
        "{refused:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 11. Claim tokens do not grow across replicas.

/// Promise (`ClaimToken`: "Tokens only grow: across claims, across keys, and across restarts
/// of the store, so a downstream service can reject work from a stale claim (fencing)";
/// `Context::claim_token`: "it grows with every claim of any key").
///
/// Attack: two replicas, A opened before B. B runs key `k`; the key is removed; A runs `k`
/// again (a new life). A's token is below B's: a downstream that remembers the highest token
/// per key (or overall) rejects A's legitimate run as stale. (Any claim by A on any key is
/// below every claim by B, too.)
#[test]
fn claim_tokens_grow_across_replicas() {
    // The contract as restated (design §3): a claim that replaces a record of its key gets a
    // token above that record's, whichever replica makes it; a new life after a removal
    // starts from its store's epoch (unique, not ordered against removed lives).
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = open(&schema, |o| o);
    let b = open(&schema, |o| o);
    let token = |store: &PgStore, fail: bool| {
        let r = store.execute_steps("k", |ctx| {
            let t = ctx.claim_token();
            match fail {
                true => Err(StepError::Failed(Io::other("retry"))),
                false => Ok::<_, StepError<Io>>((t.epoch, t.sequence)),
            }
        });
        match r {
            Ok(out) => Some(*out),
            Err(_) => None,
        }
    };
    assert!(token(&b, true).is_none());
    let by_b = b.record("k").expect("record").expect("present").claim;
    let by_a = token(&a, false).expect("the older replica retries the key");
    assert!(
        by_a > (by_b.epoch, by_b.sequence),
        "a retry by an older replica got a smaller token: {by_a:?} after {by_b:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 12. Client-side errors are typed as connection failures.

/// Promise (`StorageKind::Connection`: "The database server could not be reached, or the
/// connection broke"; `PgTx::query_one`: "an error unless it returns exactly one row").
///
/// Attack: `query_one` of a query that returns no row. The error has no SQLSTATE, and
/// `pg_error` maps every error without one to `Connection` — so a caller's retry logic sees a
/// broken connection (where "whether a write took effect is unknown") for a plain
/// programming/data error. The same holds for a parameter of the wrong type (ToSql) and a
/// column read as the wrong type.
#[test]
fn a_row_count_error_is_not_a_connection_error() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = open(&schema, |o| o);
    let kinds = Mutex::new(Vec::new());
    let _ = store.execute_once_in_tx("k", |tx| {
        if let Err(Error::Storage(e)) = tx.query_one("SELECT 1 WHERE false", &[]) {
            kinds
                .lock()
                .unwrap()
                .push(("query_one of no row", e.kind()));
        }
        if let Err(Error::Storage(e)) = tx.execute("SELECT $1::int4", &[&"not an int"]) {
            kinds
                .lock()
                .unwrap()
                .push(("a text parameter for int4", e.kind()));
        }
        Ok::<_, Io>(0u32)
    });
    let kinds = kinds.into_inner().unwrap();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    for (what, kind) in kinds {
        assert_ne!(
            kind,
            StorageKind::Connection,
            "{what}: reported as a broken connection"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 13. No client-side timeout: a dead connection hangs a call forever.

/// A TCP proxy to the test server that can stop forwarding (a black hole: packets dropped,
/// sockets left open, as after a network partition or a NAT entry that expired) and cut.
struct Proxy {
    port: u16,
    blackhole: Arc<AtomicBool>,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: (String, u16)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let blackhole = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let (bh, ct) = (Arc::clone(&blackhole), Arc::clone(&cut));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)) else {
                    continue;
                };
                // A connection opened while cut is over starts fresh.
                let generation_cut = ct.load(Ordering::SeqCst);
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (bh, ct) = (Arc::clone(&bh), Arc::clone(&ct));
                    std::thread::spawn(move || pump(from, to, &bh, &ct, generation_cut));
                }
            }
        });
        Self {
            port,
            blackhole,
            cut,
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, bh: &AtomicBool, cut: &AtomicBool, born_cut: bool) {
    from.set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let mut buf = [0u8; 16384];
    loop {
        if cut.load(Ordering::SeqCst) && !born_cut {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        if bh.load(Ordering::SeqCst) && !born_cut {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                // Read just as the hole opened: swallowed too (checking only before the read
                // let a request through, and the call it belonged to succeed).
                if bh.load(Ordering::SeqCst) && !born_cut {
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Promise (`PgOptions::statement_timeout`: "Cancels any statement of the store that runs
/// longer; the call gets a `StorageKind::Timeout` error"; contract: errors are typed, waiting
/// is bounded).
///
/// Attack: the network drops the store's connection silently (a black hole: no RST). The
/// statement timeout is enforced by the *server*, which never sees the statement, and the
/// engine has no client-side deadline (tokio-postgres keepalives default to 2 hours): the
/// call hangs — here for as long as the test lets it (5 s with a 300 ms statement timeout).
/// The same hang freezes the heartbeat task for good (its `beat` awaits the dead connection),
/// so after the network heals every later claim of the process loses its lease.
#[test]
fn a_call_on_a_dead_connection_ends_with_a_typed_error() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let config: idemstore::tokio_postgres::Config = url.parse().expect("url");
    let host = match config.get_hosts().first() {
        Some(idemstore::tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let proxy = Proxy::start((host, port));
    // Only the proxy's address: appending host and port to a string that names its own would
    // make a list of hosts, and the store would connect around the proxy.
    let proxied = format!(
        "host=127.0.0.1 port={} user={} dbname={}",
        proxy.port,
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("test"),
    );
    let store = Arc::new(
        StoreBuilder::default()
            .sweep_interval(None)
            .open_postgres(
                PgOptions::new(proxied)
                    .schema(&schema.name)
                    .pool_size(1)
                    .connect_timeout(Duration::from_secs(1))
                    .statement_timeout(Duration::from_millis(300)),
            )
            .expect("open through the proxy"),
    );
    store
        .execute_once("warm", || Ok::<_, Io>(0u32))
        .expect("warm up the pooled connection");
    proxy.blackhole.store(true, Ordering::SeqCst);
    let (done_tx, done) = mpsc::channel();
    let caller = {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            let r = store.execute_once("k", || Ok::<_, Io>(1u32));
            let _ = done_tx.send(kind_of(&r));
        })
    };
    let outcome = done.recv_timeout(Duration::from_secs(5));
    // Let the hung call go (the proxy closes the old sockets) before judging.
    proxy.cut.store(true, Ordering::SeqCst);
    caller.join().unwrap();
    match outcome {
        Ok(Some(StorageKind::Timeout | StorageKind::Connection)) => {}
        Ok(other) => panic!("unexpected result kind {other:?}"),
        Err(_) => panic!(
            "a call with a 300 ms statement timeout hung for 5 s on a dead connection \
             (no client-side deadline)"
        ),
    }
}

// ---------------------------------------------------------------------------------------
// 14. A claim against a record that a removal deletes meanwhile succeeds.

/// Promise (engine contract, engine/mod.rs: "claims are compare-and-swap: a claim succeeds
/// only if the key's record is still the exact bytes the claimer read (or still absent)";
/// design §3: a removal ends the key's life, and the next claim, finding the key absent,
/// begins a new one).
///
/// Attack: the claim statement is `INSERT .. ON CONFLICT DO UPDATE .. WHERE digest = $11`.
/// When the row it conflicts with is being deleted (`Store::remove`, the sweeper) and the
/// delete commits first, PostgreSQL retries the speculative insert, which now succeeds: a
/// claim that expected a FailedRetryable record succeeds on an absent key and continues the
/// removed life (attempt 2, the old life's name and creation time, its fingerprint carried
/// on) instead of beginning a new one. The row lock that lines the two statements up is held
/// here by plain SQL (as any transaction touching the row, e.g. `execute_once_in_tx`, does).
#[test]
fn a_claim_never_succeeds_against_a_record_removed_meanwhile() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = open(&schema, |o| o);
    let b = open(&schema, |o| o);
    let failed = a.execute_once("k", || Err::<u32, _>(Io::other("try later")));
    assert!(matches!(failed, Err(ExecuteError::Operation { .. })));
    let before = a.record("k").expect("record").expect("present");
    assert_eq!(before.attempts, 1);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (locker, connection) = runtime
        .block_on(idemstore::tokio_postgres::connect(
            &url,
            idemstore::tokio_postgres::NoTls,
        ))
        .expect("connect");
    runtime.spawn(connection);
    let lock_row = format!(
        "BEGIN; SELECT 1 FROM {}.records WHERE key = 'k'::bytea FOR UPDATE",
        schema.name
    );
    runtime
        .block_on(locker.batch_execute(&lock_row))
        .expect("lock");

    let out = std::thread::scope(|s| {
        let remover = s.spawn(|| a.remove("k"));
        std::thread::sleep(Duration::from_millis(300)); // the DELETE queues first
        let claimer = s.spawn(|| b.execute_once("k", || Ok::<_, Io>(5u32)));
        std::thread::sleep(Duration::from_millis(300)); // then the claim
        runtime
            .block_on(locker.batch_execute("COMMIT"))
            .expect("unlock");
        assert!(
            remover.join().unwrap().expect("remove"),
            "the removal removed"
        );
        claimer.join().unwrap()
    });
    let out = match out {
        Ok(out) => out,
        // The claim first, then the removal of its Pending record while it ran (the
        // documented answer of a holder whose record was removed): the record is gone.
        Err(ExecuteError::Store(Error::OutcomeNotRecorded { .. })) => {
            assert!(a.record("k").expect("record").is_none());
            return;
        }
        Err(e) => panic!("unexpected: {e:?}"),
    };
    assert_eq!(*out, 5);
    // Either order is a valid history now that a blocked statement retries rather than
    // queues: the removal first (the claim starts a new life, attempt 1, and its record
    // stays), or the claim first (it continues the life it read, attempt 2, and the removal
    // then takes its record). What must never happen is the old defect: a claim that
    // continues a life whose record was already gone (attempt 2 with the record still there).
    let now = a.record("k").expect("record");
    match (out.record().attempts, now) {
        (1, Some(info)) => assert_eq!(info.attempts, 1),
        (2, None) => {}
        (attempts, now) => {
            panic!("the claim continued a removed life: attempt {attempts}, record now {now:?}")
        }
    }
}
