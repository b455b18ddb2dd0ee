//! Adversarial tests of the PostgreSQL engine's own connections (docs/design.md §13, "Own
//! connections"; src/engine/postgres/own.rs): a sync caller whose claim or outcome goes
//! alone drives a connection of its own on its own thread.
//!
//! Promises attacked here, each on the real server:
//! - the session budget (`pool_size + 3`) holds, also when own connections are cut off by
//!   the I/O timeout while the server is still busy with their statement;
//! - an answer that reached the client is the caller's, even when the connection ends right
//!   behind it (the pooled path gives it; an own connection must not turn it into an error);
//! - `statement_timeout`, `lock_timeout` and `io_timeout` behave on own connections as on
//!   pooled ones: typed errors, the connection kept when whole, no outcome lost, no re-run;
//! - sync calls inside a runtime or from `spawn_blocking` work (and take no own connection);
//! - `pg_terminate_backend` of the store's sessions (own ones among them) or a server restart
//!   mid-burst costs no double run, no lost outcome, no other key's answer, no panic;
//! - `Periodic` durability and `flush` work with outcomes written on own connections.
//!
//! Needs `IDEMSTORE_TEST_POSTGRES`; the restart test also `IDEMSTORE_TEST_POSTGRES_RESTART`.

mod common;

use common::pg::{
    hold_in_session, named, open_waiting as open, pg_url, uncommitted_rows, PgSchema,
};
use common::wait_until;
use idemstore::{Durability, Error, ExecuteError, PgOptions, PgStore, StorageKind, StoreBuilder};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

type Io = std::io::Error;

/// One test at a time: several count the store's sessions, and one may restart the server.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Client sessions named `app`.
fn sessions(schema: &PgSchema, app: &str) -> usize {
    let n: i64 = schema.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' \
         AND backend_type = 'client backend'"
    ))[0]
        .get(0);
    n as usize
}

/// The storage kind of a call's error, if it is a storage error.
fn storage_kind<T, E>(r: &Result<T, ExecuteError<E>>) -> Option<StorageKind> {
    match r {
        Err(ExecuteError::Store(Error::Storage(e))) => Some(e.kind()),
        _ => None,
    }
}

/// A trigger on `schema`'s records: an insert (a claim) of a key starting with `slow-`
/// sleeps `insert_secs` in the server, an update to a non-Pending state (an outcome) of a
/// key starting with `slowout-` sleeps `outcome_secs`.
fn slow_writes(schema: &PgSchema, insert_secs: f64, outcome_secs: f64) {
    schema.sql(&format!(
        "CREATE FUNCTION {{s}}.slow_writes() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF TG_OP = 'INSERT' AND position(convert_to('slow-', 'UTF8') in NEW.key) = 1 THEN \
             PERFORM pg_sleep({insert_secs}); \
           END IF; \
           IF TG_OP = 'UPDATE' AND NEW.state <> 0 \
              AND position(convert_to('slowout-', 'UTF8') in NEW.key) = 1 THEN \
             PERFORM pg_sleep({outcome_secs}); \
           END IF; \
           RETURN NEW; \
         END $$"
    ));
    schema.sql(
        "CREATE TRIGGER slow_writes BEFORE INSERT OR UPDATE ON {s}.records FOR EACH ROW \
         EXECUTE FUNCTION {s}.slow_writes()",
    );
}

// ---------------------------------------------------------------------------------------
// 1. The session budget, when own connections are cut off by the I/O timeout.

/// Promise (design §13: "at most a quarter of `pool_size` are open, taken from the pool ...
/// so the engine's sessions stay within `pool_size + 3`"; a statement cut off by the I/O
/// timeout stays on its own connection, which is set aside until it has been answered).
///
/// Attack: the pool, the lane, the listener, the heartbeat and the one own connection of a
/// `pool_size` 4 store are all open (7 sessions, the budget). Then a lone sync caller's claims
/// are slow in the server (a trigger sleeps in them) and the I/O timeout cuts each off.
/// Dropping a cut-off connection (and freeing its count) would not end its backend, busy
/// with the statement until it ends: a new own connection made meanwhile would put the store
/// past its budget, one session per cut-off call still sleeping.
#[test]
fn own_connections_cut_off_by_the_io_timeout_keep_the_session_budget() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("ownb_{}", schema.name);
    let pool_size = 4;
    let budget = pool_size + 3;
    let store = open(
        named(&schema, &app)
            .pool_size(pool_size)
            .lease(Duration::from_millis(1500))
            .io_timeout(Duration::from_millis(150)),
        Duration::from_secs(5),
    );
    slow_writes(&schema, 1.5, 0.0);

    // Fill every place: the pooled connections (transactions hold one each), the read lane
    // (an async replay reads there), the own connection (a lone sync call); the listener is
    // open from the start and the heartbeat connects at its first beat.
    std::thread::scope(|scope| {
        for t in 0..pool_size - pool_size / 4 {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let replay = runtime
        .block_on(store.execute_once_async("tx-0", || async { Ok::<_, Io>(99usize) }))
        .expect("an async replay");
    assert_eq!(*replay, 0);
    store
        .execute_once("own-warm", || Ok::<_, Io>(1))
        .expect("a lone sync call");
    assert_eq!(store.__own_connections(), 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sessions(&schema, &app) < budget && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = sessions(&schema, &app);
    assert_eq!(
        before, budget,
        "every place of the budget is open before the attack"
    );

    let stop = AtomicBool::new(false);
    let most = AtomicUsize::new(before);
    // At the most: how many of the sessions were backends sleeping in a cut-off claim.
    let sleeping_at_most = AtomicUsize::new(0);
    let most_own = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let (stop, most, sleeping_at_most, schema, app) =
            (&stop, &most, &sleeping_at_most, &schema, &app);
        let counter = scope.spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let row = &schema.sql(&format!(
                    "SELECT count(*), count(*) FILTER (WHERE wait_event = 'PgSleep') \
                     FROM pg_stat_activity WHERE application_name = '{app}' \
                     AND backend_type = 'client backend'"
                ))[0];
                let (now, sleeping) =
                    (row.get::<_, i64>(0) as usize, row.get::<_, i64>(1) as usize);
                if now > most.load(Ordering::SeqCst) {
                    most.store(now, Ordering::SeqCst);
                    sleeping_at_most.store(sleeping, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        for n in 0..8 {
            let r = store.execute_once(format!("slow-{n}"), || Ok::<_, Io>(n));
            most_own.fetch_max(store.__own_connections(), Ordering::SeqCst);
            assert_eq!(
                storage_kind(&r),
                Some(StorageKind::Timeout),
                "a claim slower than the I/O timeout: {:?}",
                r.map(|o| *o)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        stop.store(true, Ordering::SeqCst);
        counter.join().expect("the counter");
    });
    let most = most.load(Ordering::SeqCst);
    let sleeping = sleeping_at_most.load(Ordering::SeqCst);
    let most_own = most_own.load(Ordering::SeqCst);
    // Let the sleeping backends end before judging and dropping.
    std::thread::sleep(Duration::from_millis(1600));
    runtime.block_on(async move { drop(store) });
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app) == 0
    });
    assert!(
        most <= budget,
        "{most} sessions of the store at once ({sleeping} of them backends still running \
         a claim whose own connection the I/O timeout cut off), past the budget of {budget} \
         (pool_size {pool_size} + 3); the store counted at most {most_own} own connection(s) \
         open after each call"
    );
}

// ---------------------------------------------------------------------------------------
// 2-3. An answer that arrives together with the connection's end.

/// A TCP proxy to the test server that, once a client sends bytes containing the armed
/// marker, forwards the server's next answer (up to its ReadyForQuery) and then closes that
/// client's connection, the close riding on the answer's last segment (as when the server
/// answers a statement and its session ends right after: a restart, a termination, an idle
/// timeout). Each arming cuts one connection.
struct CutProxy {
    port: u16,
    marker: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
}

impl CutProxy {
    fn start(upstream: (String, u16)) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().unwrap().port();
        let marker: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (m, c) = (Arc::clone(&marker), Arc::clone(&cuts));
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect((upstream.0.as_str(), upstream.1)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let armed = Arc::new(AtomicBool::new(false));
                {
                    let (from, to) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let (armed, m) = (Arc::clone(&armed), Arc::clone(&m));
                    std::thread::spawn(move || client_to_server(from, to, &armed, &m));
                }
                let c = Arc::clone(&c);
                std::thread::spawn(move || server_to_client(server, client, &armed, &c));
            }
        });
        Self { port, marker, cuts }
    }

    fn arm(&self, marker: &[u8]) {
        *self.marker.lock().unwrap() = Some(marker.to_vec());
    }

    fn url(&self, app: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=test application_name={app}",
            self.port
        )
    }
}

fn client_to_server(
    mut from: TcpStream,
    mut to: TcpStream,
    armed: &AtomicBool,
    marker: &Mutex<Option<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        {
            let mut marker = marker.lock().unwrap();
            if let Some(m) = marker.as_ref() {
                if buf[..n].windows(m.len()).any(|w| w == m.as_slice()) {
                    *marker = None;
                    armed.store(true, Ordering::SeqCst);
                }
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn server_to_client(
    mut from: TcpStream,
    mut to: TcpStream,
    armed: &AtomicBool,
    cuts: &AtomicUsize,
) {
    let mut buf = vec![0u8; 1 << 16];
    let mut held = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if !armed.load(Ordering::SeqCst) {
            if to.write_all(&buf[..n]).is_err() {
                return;
            }
            continue;
        }
        held.extend_from_slice(&buf[..n]);
        let len = held.len();
        let ends_ready =
            len >= 6 && held[len - 6] == b'Z' && held[len - 5..len - 1] == [0, 0, 0, 5];
        if !ends_ready {
            continue;
        }
        // Counted first: the client may act on the answer before this thread runs on.
        cuts.fetch_add(1, Ordering::SeqCst);
        // Corked: the answer waits in the socket until the FIN, which rides on it.
        cork(&to);
        let _ = to.write_all(&held);
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Both);
        return;
    }
}

fn cork(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CORK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_CORK");
}

fn upstream(url: &str) -> (String, u16) {
    let config: idemstore::tokio_postgres::Config = url.parse().expect("url");
    let host = match config.get_hosts().first() {
        Some(idemstore::tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    (host, config.get_ports().first().copied().unwrap_or(5432))
}

/// Promise (own.rs: "once an own connection is taken, the operation's answer or error is the
/// caller's, whatever happens to the connection"; design §13: a claim or outcome gets the
/// connection error "as on a pooled connection"; `OwnConnection::drive` itself: "The
/// connection may have just handed `f` its answer").
///
/// Attack: the server's answer to a sync caller's outcome and the end of its connection
/// arrive together. On the pooled path (checked first, with an async call) the answer is
/// delivered and the call succeeds. On an own connection, `drive` polls the connection after
/// the statement's future: the connection hands the statement its answer, reads the end of
/// the stream and is done, and `drive` then reports the connection lost without looking at
/// the answer it was just handed. The caller hears "connection ended" for an outcome that
/// was recorded.
#[test]
fn an_outcome_answered_just_before_its_own_connection_ends_is_the_callers() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let proxy = CutProxy::start(upstream(&url));
    let app = format!("ownc_{}", schema.name);
    let store = open(
        PgOptions::new(proxy.url(&app))
            .schema(&schema.name)
            .pool_size(4),
        Duration::from_secs(5),
    );
    store
        .execute_once("warm", || Ok::<_, Io>("warm".to_owned()))
        .expect("warm");

    // The pooled path: an async call's outcome, its connection ended behind the answer.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    proxy.arm(b"VALUE-POOLED-0001");
    let pooled = runtime.block_on(store.execute_once_async("pooled", || async {
        Ok::<_, Io>("VALUE-POOLED-0001".to_owned())
    }));
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        1,
        "the pooled outcome's connection was cut"
    );
    assert_eq!(
        pooled.map(|o| o.into_value()).map_err(|e| e.to_string()),
        Ok("VALUE-POOLED-0001".to_owned()),
        "control: the pooled path delivers an answer that came before its connection's end"
    );

    // The own path: a lone sync call's outcome, the same way.
    assert!(
        store.__own_connections() >= 1,
        "the warm-up took an own connection"
    );
    let runs = AtomicUsize::new(0);
    proxy.arm(b"VALUE-OWN-0000001");
    let own = store.execute_once("own", || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Io>("VALUE-OWN-0000001".to_owned())
    });
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        2,
        "the own outcome's connection was cut"
    );
    let own = own.map(|o| o.into_value()).map_err(|e| format!("{e:?}"));
    // What the database holds: the outcome was recorded either way.
    let again = store
        .execute_once("own", || Ok::<_, Io>("RAN-AGAIN".to_owned()))
        .expect("a retry");
    assert_eq!(
        (again.into_value(), runs.load(Ordering::SeqCst)),
        ("VALUE-OWN-0000001".to_owned(), 1),
        "the outcome was recorded, once"
    );
    assert_eq!(
        own,
        Ok("VALUE-OWN-0000001".to_owned()),
        "a sync call whose outcome was recorded, and whose answer reached the client, \
         was told it failed"
    );
}

/// Promise: as above, for a claim. The claim's answer reached the client; the caller is told
/// the connection ended (and its lease is ended in the background), so a call that could
/// have run fails instead, where the pooled path would have run it.
#[test]
fn a_claim_answered_just_before_its_own_connection_ends_is_the_callers() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let proxy = CutProxy::start(upstream(&url));
    let app = format!("ownd_{}", schema.name);
    let store = open(
        PgOptions::new(proxy.url(&app))
            .schema(&schema.name)
            .pool_size(4),
        Duration::from_secs(5),
    );
    store
        .execute_once("warm", || Ok::<_, Io>(0u32))
        .expect("warm");
    assert!(
        store.__claims_first(),
        "a new key's first statement is its claim"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    proxy.arm(b"KEY-POOLED-00001");
    let pooled = runtime
        .block_on(store.execute_once_async("KEY-POOLED-00001", || async { Ok::<_, Io>(1u32) }));
    assert!(
        proxy.cuts.load(Ordering::SeqCst) >= 1,
        "the pooled claim's connection was cut"
    );
    assert_eq!(
        pooled.map(|o| *o).map_err(|e| e.to_string()),
        Ok(1),
        "control: the pooled path delivers a claim's answer that came before its connection's end"
    );

    let cuts = proxy.cuts.load(Ordering::SeqCst);
    proxy.arm(b"KEY-OWN-00000001");
    let runs = AtomicUsize::new(0);
    let own = store.execute_once("KEY-OWN-00000001", || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Io>(2u32)
    });
    assert_eq!(
        proxy.cuts.load(Ordering::SeqCst),
        cuts + 1,
        "the own claim's connection was cut"
    );
    assert_eq!(
        own.map(|o| *o).map_err(|e| format!("{e:?}")),
        Ok(2),
        "a sync call whose claim landed, and whose answer reached the client, was told it \
         failed (runs: {})",
        runs.load(Ordering::SeqCst)
    );
}

// ---------------------------------------------------------------------------------------
// 4-6. Server- and client-side limits on own connections.

/// Promise (`PgOptions::statement_timeout`: the call gets a `StorageKind::Timeout` error;
/// design §13: an own connection goes back whole when no statement was cut off).
/// A sync claim the server cancels is a typed timeout, the own connection stays (no new
/// session), and the key works once the server is fast again.
#[test]
fn statement_timeout_on_an_own_connection_is_a_typed_timeout_and_keeps_it() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("owne_{}", schema.name);
    let store = open(
        named(&schema, &app)
            .pool_size(4)
            .statement_timeout(Duration::from_millis(300)),
        Duration::from_secs(5),
    );
    slow_writes(&schema, 2.0, 0.0);
    store
        .execute_once("warm", || Ok::<_, Io>(0u32))
        .expect("warm");
    assert_eq!(store.__own_connections(), 1);
    let before = sessions(&schema, &app);
    let runs = AtomicUsize::new(0);
    let r = store.execute_once("slow-1", || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Io>(1u32)
    });
    assert_eq!(
        storage_kind(&r),
        Some(StorageKind::Timeout),
        "{:?}",
        r.map(|o| *o)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(store.__own_connections(), 1, "the own connection was kept");
    for k in 0..5u32 {
        let out = store
            .execute_once(format!("after-{k}"), || Ok::<_, Io>(k))
            .expect("a call");
        assert_eq!(*out, k);
    }
    assert_eq!(store.__own_connections(), 1);
    assert_eq!(sessions(&schema, &app), before, "no session was added");
    // The cancelled claim wrote nothing: the key is free (the trigger still sleeps, so the
    // claim is cancelled again: still a typed timeout, never a run).
    let r = store.execute_once("slow-1", || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Io>(1u32)
    });
    assert_eq!(storage_kind(&r), Some(StorageKind::Timeout));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

/// Promise (design: "a claim blocked longer [than lock_timeout] treats the key as busy and
/// waits its turn within the call's wait budget"). A sync claim on an own connection that
/// meets another transaction's uncommitted row for the key waits, then runs once.
#[test]
fn a_row_lock_met_on_an_own_connection_waits_its_turn_and_runs_once() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("ownf_{}", schema.name);
    let store = open(named(&schema, &app).pool_size(4), Duration::from_secs(20));
    store
        .execute_once("warm", || Ok::<_, Io>(0u32))
        .expect("warm");
    assert_eq!(store.__own_connections(), 1);
    let holder = hold_in_session(
        &url,
        uncommitted_rows(&schema, ["locked"]),
        Duration::from_millis(1200),
    );
    let runs = AtomicUsize::new(0);
    let out = store
        .execute_once("locked", || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Io>(7u32)
        })
        .expect("the call waits for the other transaction, then runs");
    assert_eq!(*out, 7);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    holder.join().expect("the holding session");
    let again = store
        .execute_once("locked", || Ok::<_, Io>(8u32))
        .expect("replay");
    assert_eq!((*again, again.is_replayed()), (7, true));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Promise (contract: a recorded outcome is never lost; an operation runs again only after
/// a lease genuinely ran out). An outcome on an own connection cut off by the I/O timeout
/// (the server still writing it) is a typed timeout for its caller; the server commits it
/// after, and a retry replays it instead of running the operation again.
#[test]
fn an_outcome_cut_off_on_an_own_connection_is_never_lost_nor_run_again() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("owng_{}", schema.name);
    let store = open(
        named(&schema, &app)
            .pool_size(4)
            .lease(Duration::from_secs(5))
            .io_timeout(Duration::from_millis(300)),
        Duration::from_secs(15),
    );
    slow_writes(&schema, 0.0, 1.0);
    store
        .execute_once("warm", || Ok::<_, Io>(0u32))
        .expect("warm");
    assert_eq!(store.__own_connections(), 1);
    let runs = AtomicUsize::new(0);
    let call = || {
        store.execute_once("slowout-1", || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Io>(41u32)
        })
    };
    let first = call();
    assert_eq!(
        storage_kind(&first),
        Some(StorageKind::Timeout),
        "{:?}",
        first.map(|o| *o)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let again = call().expect("a retry waits for the outcome being written");
    assert_eq!((*again, again.is_replayed()), (41, true));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the operation ran once");
    // A fresh store (no cache, no in-process state) reads the same.
    drop(store);
    let other = open(named(&schema, &app).pool_size(4), Duration::from_secs(5));
    let seen = other
        .execute_once("slowout-1", || Ok::<_, Io>(0u32))
        .expect("replay");
    assert_eq!((*seen, seen.is_replayed()), (41, true));
}

// ---------------------------------------------------------------------------------------
// 7. Sync calls inside a runtime.

/// Promise (design §13: "on a thread outside any runtime (inside one, the call takes the
/// bridge's path)"; bridge: never panics wherever it is called). Sync calls inside a
/// current-thread runtime, inside `block_in_place` and from `spawn_blocking` all work, take
/// no own connection, and every key gets its own outcome.
#[test]
fn sync_calls_inside_a_runtime_work_without_own_connections() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("ownh_{}", schema.name);
    let store = Arc::new(open(
        named(&schema, &app).pool_size(8),
        Duration::from_secs(5),
    ));
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    current.block_on(async {
        for k in 0..5u32 {
            let out = store
                .execute_once(format!("cur-{k}"), || Ok::<_, Io>(k))
                .expect("sync in a runtime");
            assert_eq!(*out, k);
        }
    });
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    multi.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..4u32 {
            let store = Arc::clone(&store);
            tasks.push(tokio::task::spawn_blocking(move || {
                for k in 0..5u32 {
                    let key = format!("blk-{t}-{k}");
                    let out = store
                        .execute_once(&key, || Ok::<_, Io>(key.clone()))
                        .expect("spawn_blocking");
                    assert_eq!(*out, key);
                }
            }));
        }
        for t in 0..2u32 {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                tokio::task::block_in_place(|| {
                    for k in 0..5u32 {
                        let key = format!("bip-{t}-{k}");
                        let out = store
                            .execute_once(&key, || Ok::<_, Io>(key.clone()))
                            .expect("block_in_place");
                        assert_eq!(*out, key);
                    }
                })
            }));
        }
        for task in tasks {
            task.await.expect("a task");
        }
    });
    assert_eq!(
        store.__own_connections(),
        0,
        "no own connection inside a runtime"
    );
    // And on a plain thread afterwards, an own connection serves again.
    let out = store
        .execute_once("plain", || Ok::<_, Io>(1u32))
        .expect("plain thread");
    assert_eq!(*out, 1);
    assert_eq!(store.__own_connections(), 1);
    multi.block_on(async move { drop(store) });
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app) == 0
    });
}

// ---------------------------------------------------------------------------------------
// 8-9. Sessions ended under a burst: pg_terminate_backend, and a server restart.

#[derive(Default)]
struct Key {
    runs: u32,
    /// Calls that ran the operation and then failed in the store: each allows one re-run.
    in_doubt: u32,
    value: Option<u64>,
}

/// Sync callers (on own connections when alone, batched when not) and one async caller run
/// new keys and replays while `disturb` runs; then every key is checked: ran at most once
/// plus once per in-doubt call, its outcome its own, replayed as recorded. Returns how many
/// store errors the callers saw.
fn burst(store: &PgStore, disturb: impl FnOnce() + Send) -> usize {
    let keys: Mutex<BTreeMap<u64, Key>> = Mutex::new(BTreeMap::new());
    let stop = AtomicBool::new(false);
    let errors = AtomicUsize::new(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let record = |key: u64, ran: bool, r: Result<u64, ExecuteError<Io>>| -> bool {
        let mut keys = keys.lock().unwrap();
        let entry = keys.entry(key).or_default();
        match r {
            Ok(v) => {
                assert_eq!(v, key, "key {key} got another key's outcome");
                if let Some(seen) = entry.value {
                    assert_eq!(seen, v, "key {key}: a second, different outcome");
                }
                entry.value = Some(v);
                true
            }
            Err(ExecuteError::Store(
                Error::Storage(_) | Error::InProgress { .. } | Error::LeaseLost { .. },
            )) => {
                entry.in_doubt += u32::from(ran);
                errors.fetch_add(1, Ordering::SeqCst);
                false
            }
            Err(e) => panic!("key {key}: unexpected error {e:?}"),
        }
    };
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (keys, stop, record) = (&keys, &stop, &record);
            s.spawn(move || {
                let mut n = 0u64;
                let mut tries = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = t * 1_000_000 + n;
                    let mut ran = false;
                    let r = store.execute_once(format!("k-{key}"), || {
                        ran = true;
                        keys.lock().unwrap().entry(key).or_default().runs += 1;
                        Ok::<_, Io>(key)
                    });
                    let done = record(key, ran, r.map(|o| *o));
                    tries += 1;
                    if done || tries > 50 {
                        // A replay of an earlier key now and then.
                        if n > 0 && n.is_multiple_of(3) {
                            let old = t * 1_000_000 + n / 2;
                            let r = store.execute_once(format!("k-{old}"), || {
                                keys.lock().unwrap().entry(old).or_default().runs += 1;
                                Ok::<_, Io>(old)
                            });
                            let _ = record(old, false, r.map(|o| *o));
                        }
                        n += 1;
                        tries = 0;
                    } else {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            });
        }
        {
            let (keys, stop, record, runtime) = (&keys, &stop, &record, &runtime);
            s.spawn(move || {
                runtime.block_on(async {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let key = 9_000_000 + n;
                        let mut ran = false;
                        let r = store
                            .execute_once_async(format!("k-{key}"), || {
                                ran = true;
                                keys.lock().unwrap().entry(key).or_default().runs += 1;
                                async move { Ok::<_, Io>(key) }
                            })
                            .await;
                        if record(key, ran, r.map(|o| *o)) {
                            n += 1;
                        } else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                })
            });
        }
        std::thread::sleep(Duration::from_millis(300));
        disturb();
        std::thread::sleep(Duration::from_millis(1000));
        stop.store(true, Ordering::SeqCst);
    });
    let keys = keys.into_inner().unwrap();
    assert!(keys.len() > 10, "the callers made progress");
    for (key, k) in &keys {
        assert!(
            k.runs <= 1 + k.in_doubt,
            "k-{key} ran {} times with {} in-doubt calls",
            k.runs,
            k.in_doubt
        );
        if let Some(value) = k.value {
            let again = store
                .execute_once(format!("k-{key}"), || Ok::<_, Io>(u64::MAX))
                .unwrap_or_else(|e| panic!("replay k-{key}: {e:?}"));
            assert_eq!((*again, again.is_replayed()), (value, true), "k-{key}");
        }
    }
    errors.into_inner()
}

/// Promise (design §13; contract): `pg_terminate_backend` of the store's sessions (its own
/// connections among them, idle or mid-statement) during a burst of sync and async calls
/// costs no double run, no lost outcome, no other key's answer, no panic; afterwards own
/// connections serve again.
#[test]
fn terminating_sessions_mid_burst_costs_no_double_run_nor_a_lost_outcome() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("owni_{}", schema.name);
    let store = open(
        named(&schema, &app)
            .pool_size(8)
            .lease(Duration::from_secs(1))
            .io_timeout(Duration::from_secs(3)),
        Duration::from_secs(5),
    );
    store
        .execute_once("warm", || Ok::<_, Io>(0u64))
        .expect("warm");
    let errors = burst(&store, || {
        for _ in 0..12 {
            schema.sql(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = '{app}' AND backend_type = 'client backend'"
            ));
            std::thread::sleep(Duration::from_millis(60));
        }
    });
    eprintln!("terminate: {errors} store errors");
    let out = store
        .execute_once("after", || Ok::<_, Io>(1u64))
        .expect("a call after");
    assert_eq!(*out, 1);
    assert!(
        store.__own_connections() >= 1,
        "own connections serve again"
    );
    drop(store);
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app) == 0
    });
}

/// Promise: as above, for a server restart (`IDEMSTORE_TEST_POSTGRES_RESTART`).
#[test]
fn a_server_restart_mid_burst_costs_no_double_run_nor_a_lost_outcome() {
    let Some(url) = pg_url() else { return };
    let Ok(restart) = std::env::var("IDEMSTORE_TEST_POSTGRES_RESTART") else {
        eprintln!("skipped: set IDEMSTORE_TEST_POSTGRES_RESTART");
        return;
    };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("ownj_{}", schema.name);
    let store = open(
        named(&schema, &app)
            .pool_size(8)
            .lease(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(5)),
        Duration::from_secs(10),
    );
    store
        .execute_once("warm", || Ok::<_, Io>(0u64))
        .expect("warm");
    let errors = burst(&store, || {
        let status = std::process::Command::new("sh")
            .args(["-c", &restart])
            .status()
            .expect("run the restart command");
        assert!(status.success(), "the restart command failed: {status}");
    });
    eprintln!("restart: {errors} store errors");
    let out = store
        .execute_once("after", || Ok::<_, Io>(1u64))
        .expect("a call after");
    assert_eq!(*out, 1);
    drop(store);
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app) == 0
    });
}

// ---------------------------------------------------------------------------------------
// 10. Periodic durability.

/// Promise (`Durability::Periodic` on PostgreSQL: asynchronous commits; `flush` makes every
/// write so far durable). Outcomes written on own connections under `Periodic` replay, and
/// `flush` succeeds after them, also from a second store.
#[test]
fn periodic_durability_with_own_connections_flushes_and_replays() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("ownk_{}", schema.name);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .durability(Durability::Periodic(Duration::from_millis(50)))
        .open_postgres(named(&schema, &app).pool_size(4))
        .expect("open");
    for k in 0..10u32 {
        let out = store
            .execute_once(format!("p-{k}"), || Ok::<_, Io>(k))
            .expect("a call");
        assert_eq!(*out, k);
    }
    assert_eq!(
        store.__own_connections(),
        1,
        "the calls went on an own connection"
    );
    store.flush().expect("flush");
    let other = open(named(&schema, &app).pool_size(4), Duration::from_secs(5));
    for k in 0..10u32 {
        let again = other
            .execute_once(format!("p-{k}"), || Ok::<_, Io>(u32::MAX))
            .expect("replay");
        assert_eq!((*again, again.is_replayed()), (k, true));
    }
}

// ---------------------------------------------------------------------------------------
// 11. Idle sessions the server ends on its own.

/// Promise (design §13: "one the server ended while it sat idle is dropped, never used, so
/// an idle session's end costs no call an error"). The server's `idle_session_timeout` ends
/// every idle session of the store (its own connection among them, with a FATAL 57P05) between
/// rounds of sync calls: no call sees an error, no operation runs twice.
#[test]
fn sessions_the_server_ends_for_idleness_cost_no_call_an_error() {
    let Some(url) = pg_url() else { return };
    let _serial = serial();
    let schema = PgSchema::new(&url);
    let app = format!("ownl_{}", schema.name);
    let store = open(
        PgOptions::new(format!(
            "{} application_name={app} options='-c idle_session_timeout=200'",
            schema.url
        ))
        .schema(&schema.name)
        .pool_size(4),
        Duration::from_secs(5),
    );
    let runs = AtomicUsize::new(0);
    let call = |key: String| {
        let out = store
            .execute_once(&key, || {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Io>(key.clone())
            })
            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        assert_eq!(*out, key);
    };
    let pids = || -> Vec<i32> {
        schema
            .sql(&format!(
                "SELECT pid FROM pg_stat_activity WHERE application_name = '{app}' \
                 AND backend_type = 'client backend'"
            ))
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    call("warm".to_owned());
    for round in 0..4 {
        let before = pids();
        assert!(!before.is_empty());
        std::thread::sleep(Duration::from_millis(600));
        let after = pids();
        assert!(
            before.iter().all(|p| !after.contains(p)),
            "the server ended every idle session: {before:?} then {after:?}"
        );
        call(format!("new-{round}"));
        call(format!("new-{round}"));
        call(format!("other-{round}"));
        assert_eq!(store.__own_connections(), 1);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 9, "each key ran once");
}
