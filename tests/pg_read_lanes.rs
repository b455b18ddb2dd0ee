//! Reads on the PostgreSQL engine go down a few shared connections, many callers' statements
//! pipelined on each: every caller still gets its own key's record, sync and async callers
//! alike, and a lane the server ends while it sits idle costs no caller an error. Needs
//! `IDEMSTORE_TEST_POSTGRES`.

mod common;

use common::pg::{pg_url, PgSchema};
use idemstore::{ExecuteError, StoreBuilder};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const KEYS: usize = 300;

fn never(key: usize) -> Result<String, std::io::Error> {
    panic!("key {key} is recorded: a replay must not run its operation")
}

/// 32 threads and 32 async tasks replay 300 recorded keys at once, each in its own order, so
/// every lane carries many callers' reads at a time: each replay is its own key's outcome.
#[test]
fn a_crowd_of_replays_each_gets_its_own_keys_outcome() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = std::sync::Arc::new(
        StoreBuilder::default()
            .sweep_interval(None)
            .open_postgres(schema.options().pool_size(4))
            .expect("open"),
    );
    for k in 0..KEYS {
        store
            .execute_once(format!("lane-{k}"), || {
                Ok::<_, std::io::Error>(format!("outcome {k}"))
            })
            .expect("record");
    }
    let replays = AtomicUsize::new(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    std::thread::scope(|scope| {
        for t in 0..32usize {
            let (store, replays) = (&*store, &replays);
            scope.spawn(move || {
                for i in 0..KEYS {
                    let k = (i * 7 + t * 31) % KEYS;
                    let out = store
                        .execute_once(format!("lane-{k}"), || never(k))
                        .expect("a replay");
                    assert!(out.is_replayed());
                    assert_eq!(*out, format!("outcome {k}"), "thread {t}");
                    replays.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        let tasks: Vec<_> = (0..32usize)
            .map(|t| {
                let store = std::sync::Arc::clone(&store);
                runtime.spawn(async move {
                    for i in 0..KEYS {
                        let k = (i * 11 + t * 17) % KEYS;
                        let out = store
                            .execute_once_async(format!("lane-{k}"), || async move { never(k) })
                            .await
                            .expect("a replay");
                        assert_eq!(*out, format!("outcome {k}"), "task {t}");
                    }
                })
            })
            .collect();
        runtime.block_on(async {
            for task in tasks {
                task.await.expect("a task's replays");
            }
        });
    });
    assert_eq!(replays.load(Ordering::Relaxed), 32 * KEYS);
}

/// Every session of the store is ended by the server while the store sits idle, after reads
/// turned it to reading first: the next replays all answer, none with an error.
#[test]
fn replays_after_the_server_ended_every_idle_session_all_answer() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let app = format!("lanes_{}", schema.name);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(
            idemstore::PgOptions::new(format!("{url} application_name={app}"))
                .schema(&schema.name)
                .pool_size(2),
        )
        .expect("open");
    for k in 0..8 {
        store
            .execute_once(format!("idle-{k}"), || {
                Ok::<_, std::io::Error>(format!("outcome {k}"))
            })
            .expect("record");
    }
    // Replays turn the store to reading first, and connect every lane.
    for k in 0..64 {
        store
            .execute_once(format!("idle-{}", k % 8), || never(k))
            .expect("a replay");
    }
    assert!(
        !store.__claims_first(),
        "replays turned it to reading first"
    );
    let ended = schema.sql(&format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = '{app}' AND pid <> pg_backend_pid()"
    ));
    let ended: i64 = ended[0].get(0);
    assert!(ended >= 2, "the store's sessions were ended ({ended})");
    for k in 0..32 {
        match store.execute_once(format!("idle-{}", k % 8), || never(k)) {
            Ok(out) => assert_eq!(*out, format!("outcome {}", k % 8)),
            Err(ExecuteError::Store(e)) => panic!("replay {k} after the sessions ended: {e}"),
            Err(e) => panic!("replay {k}: {e}"),
        }
    }
    // Settle before the schema is dropped: the store's new sessions end with it.
    drop(store);
    std::thread::sleep(Duration::from_millis(50));
}
