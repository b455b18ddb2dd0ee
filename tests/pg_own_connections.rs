//! Own connections (design §13, "Own connections"): a sync caller whose statement goes alone
//! sends it on a connection its own thread drives. What is checked here, on a real server:
//! - a lone sync caller does use one, and sync callers, async callers and transactions that
//!   fill the pool together never hold more sessions than the documented budget
//!   (`pool_size + 3`); every session ends with the store;
//! - an own connection the server ended while it sat idle costs no call an error and no
//!   operation a second run;
//! - a store holding own connections can be dropped inside a tokio runtime;
//! - an own connection whose statement the I/O timeout cut off serves again once that
//!   statement has ended on the server (no new connection is opened meanwhile).

mod common;

use common::pg::{named, pg_url, PgSchema};
use common::wait_until;
use idemstore::{PgStore, StoreBuilder};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

type Io = std::io::Error;

/// A store on `schema` with `pool_size`, its sessions named `app`.
fn store(schema: &PgSchema, app: &str, pool_size: usize) -> PgStore {
    StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(named(schema, app).pool_size(pool_size))
        .expect("open")
}

/// Client sessions named `app`.
fn sessions(schema: &PgSchema, app: &str) -> i64 {
    schema.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{app}' \
         AND backend_type = 'client backend'"
    ))[0]
        .get(0)
}

#[test]
fn lone_sync_callers_use_own_connections_within_the_session_budget() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("own_{}", schema.name);
    let pool_size = 8;
    let store = store(&schema, &app, pool_size);
    for k in 0..20 {
        let out = store
            .execute_once(format!("lone-{k}"), || Ok::<_, Io>(k))
            .expect("a new key");
        assert_eq!(*out, k);
    }
    let own = store.__own_connections();
    assert!(
        (1..=pool_size / 4).contains(&own),
        "a lone sync caller drove {own} own connections (1 to {} expected)",
        pool_size / 4
    );

    // Sync and async callers together, new keys and replays, while the sessions are counted.
    let runs = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let most = AtomicUsize::new(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    std::thread::scope(|scope| {
        let (stop, most, schema, app) = (&stop, &most, &schema, &app);
        let counter = scope.spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let now = sessions(schema, app) as usize;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let mut callers = Vec::new();
        // Transactions hold a pooled connection while their operation runs: enough of them
        // at once fill the pool, beside the own connections.
        for t in 0..pool_size {
            let store = &store;
            callers.push(scope.spawn(move || {
                for n in 0..10 {
                    let key = format!("tx-{t}-{n}");
                    let out = store
                        .execute_once_in_tx(&key, |_tx| {
                            std::thread::sleep(Duration::from_millis(20));
                            Ok::<_, Io>(n)
                        })
                        .expect("a call in a transaction");
                    assert_eq!(*out, n);
                }
            }));
        }
        for t in 0..12 {
            let (store, runs) = (&store, &runs);
            callers.push(scope.spawn(move || {
                for n in 0..40 {
                    let key = format!("crowd-{}", (t * 40 + n) % 120);
                    let out = store
                        .execute_once(&key, || {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Io>(key.clone())
                        })
                        .expect("a sync call");
                    assert_eq!(*out, key);
                }
            }));
        }
        let (store, runs, runtime) = (&store, &runs, &runtime);
        callers.push(scope.spawn(move || {
            runtime.block_on(async {
                for n in 0..200 {
                    let key = format!("crowd-{}", n % 150);
                    let out = store
                        .execute_once_async(&key, || async {
                            runs.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, Io>(key.clone())
                        })
                        .await
                        .expect("an async call");
                    assert_eq!(*out, key);
                }
            })
        }));
        for caller in callers {
            caller.join().expect("a caller");
        }
        stop.store(true, Ordering::SeqCst);
        counter.join().expect("the counter");
    });
    assert_eq!(
        runs.load(Ordering::SeqCst),
        150,
        "each of the 150 keys ran once"
    );
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= pool_size + 3,
        "{most} sessions at once, past the budget of {}",
        pool_size + 3
    );
    drop(store);
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app) == 0
    });
}

#[test]
fn an_own_connection_the_server_ended_while_idle_costs_no_call_an_error() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("own_{}", schema.name);
    let store = store(&schema, &app, 4);
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
    for round in 0..3 {
        for k in 0..5 {
            call(format!("key-{round}-{k}"));
        }
        assert_eq!(
            store.__own_connections(),
            1,
            "the one own connection is open"
        );
        // Every session of the store ends (its own connection too, idle between calls).
        let ended: Vec<i32> = schema
            .sql(&format!(
                "SELECT pid FROM pg_stat_activity WHERE application_name = '{app}' \
                 AND backend_type = 'client backend'"
            ))
            .iter()
            .map(|r| r.get(0))
            .collect();
        for pid in &ended {
            schema.sql(&format!("SELECT pg_terminate_backend({pid})"));
        }
        wait_until("the ended sessions gone", || {
            let left: i64 = schema.sql(&format!(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(ARRAY{ended:?}::int[])"
            ))[0]
                .get(0);
            left == 0
        });
        // New keys and replays, sent at once: none sees an error.
        for k in 0..5 {
            call(format!("key-{round}-{k}"));
            call(format!("after-{round}-{k}"));
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 30, "each key ran once");
}

#[test]
fn a_store_with_own_connections_drops_inside_a_runtime() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("own_{}", schema.name);
    let store = store(&schema, &app, 8);
    for k in 0..5 {
        store
            .execute_once(format!("k{k}"), || Ok::<_, Io>(k))
            .expect("a new key");
    }
    assert!(store.__own_connections() >= 1, "an own connection is open");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move { drop(store) });
    wait_until("every session of the dropped store ended", || {
        sessions(&schema, &app) == 0
    });
}

#[test]
fn an_own_connection_cut_off_by_the_io_timeout_serves_again_once_its_statement_ended() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("own_{}", schema.name);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(
            named(&schema, &app)
                .pool_size(4)
                .io_timeout(Duration::from_millis(300)),
        )
        .expect("open");
    // The claim of `slow` sleeps a second on the server.
    schema.sql(
        "CREATE FUNCTION {s}.slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.key = convert_to('slow', 'UTF8') THEN PERFORM pg_sleep(1); END IF; \
           RETURN NEW; END $$",
    );
    schema.sql(
        "CREATE TRIGGER slow BEFORE INSERT ON {s}.records FOR EACH ROW \
         EXECUTE FUNCTION {s}.slow()",
    );
    store
        .execute_once("warm", || Ok::<_, Io>(0))
        .expect("a new key");
    assert_eq!(
        store.__own_connections(),
        1,
        "the one own connection is open"
    );
    // The own connection is the only session that wrote an outcome.
    let own: Vec<i32> = schema
        .sql(&format!(
            "SELECT pid FROM pg_stat_activity WHERE application_name = '{app}' \
             AND query LIKE 'UPDATE%records%'"
        ))
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(own.len(), 1, "one session wrote the outcome: {own:?}");
    let own = own[0];
    let cut = store.execute_once("slow", || Ok::<_, Io>(1));
    assert!(
        matches!(&cut, Err(idemstore::ExecuteError::Store(idemstore::Error::Storage(e)))
            if e.kind() == idemstore::StorageKind::Timeout),
        "the I/O timeout cut the claim off: {:?}",
        cut.map(|o| *o)
    );
    // Ended on the server: its session idle again (or gone, which the check below refuses).
    wait_until("the cut-off claim ended on the server", || {
        let state: Vec<String> = schema
            .sql(&format!(
                "SELECT state FROM pg_stat_activity WHERE pid = {own}"
            ))
            .iter()
            .map(|r| r.get(0))
            .collect();
        state != ["active"]
    });
    let since: Vec<f64> = schema
        .sql("SELECT extract(epoch from clock_timestamp())::float8")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for k in 0..5 {
        let out = store
            .execute_once(format!("after-{k}"), || Ok::<_, Io>(k))
            .expect("a new key after the cut-off");
        assert_eq!(*out, k);
    }
    let ran_again: i64 = schema.sql(&format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = {own} \
         AND extract(epoch from query_start) > {} AND query LIKE 'UPDATE%records%'",
        since[0]
    ))[0]
        .get(0);
    assert_eq!(
        ran_again, 1,
        "the cut-off own connection wrote outcomes again once its statement had ended"
    );
    assert_eq!(store.__own_connections(), 1, "and no other was opened");
}
