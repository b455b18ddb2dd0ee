//! The PostgreSQL server restarted while calls run: every failure is a typed storage error,
//! no recorded outcome is lost, and an operation runs again only after a call that ran it
//! and could not record its outcome (the contract's in-doubt window). Alone in its test
//! binary, because a restart cuts every session on the server.
//!
//! Needs `IDEMSTORE_TEST_POSTGRES` and `IDEMSTORE_TEST_POSTGRES_RESTART`, the command that
//! restarts the server and returns once it accepts connections (`.ci/run` sets both; a
//! developer's own server is never restarted unless they ask).

mod common;

use common::pg::{pg_url, PgSchema};
use idemstore::{Error, ExecuteError, StorageKind, StoreBuilder};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const RESTART_VAR: &str = "IDEMSTORE_TEST_POSTGRES_RESTART";

#[derive(Default)]
struct Key {
    runs: u32,
    /// Calls that ran the operation and then failed in the store: each allows one re-run.
    in_doubt: u32,
    /// The outcome a call returned, once one did.
    value: Option<u32>,
}

#[test]
fn a_server_restart_mid_run_loses_nothing_and_reruns_only_in_doubt_calls() {
    let Some(url) = pg_url() else { return };
    let Ok(restart) = std::env::var(RESTART_VAR) else {
        eprintln!("skipped: set {RESTART_VAR} to a command that restarts the test server");
        return;
    };
    let schema = PgSchema::new(&url);
    let store = StoreBuilder::default()
        .sweep_interval(None)
        .wait_timeout(Duration::from_secs(30))
        .open_postgres(
            schema
                .options()
                .lease(Duration::from_secs(2))
                .pool_size(4)
                .connect_timeout(Duration::from_secs(5)),
        )
        .expect("open");
    for i in 0..20u32 {
        store
            .execute_once(format!("before-{i}"), || Ok::<_, std::io::Error>(i))
            .expect("record before the restart");
    }
    let keys: Mutex<BTreeMap<u32, Key>> = Mutex::new(BTreeMap::new());
    let stop = AtomicBool::new(false);
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..3u32 {
            let (store, keys, stop, errors) = (&store, &keys, &stop, &errors);
            s.spawn(move || {
                let mut n = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    // Each key is called until some call returns its outcome.
                    let key = t * 100_000 + n;
                    let mut ran = false;
                    let r = store.execute_once(format!("during-{key}"), || {
                        ran = true;
                        keys.lock().expect("keys").entry(key).or_default().runs += 1;
                        std::thread::sleep(Duration::from_millis(3));
                        Ok::<_, std::io::Error>(key)
                    });
                    let mut keys = keys.lock().expect("keys");
                    let entry = keys.entry(key).or_default();
                    match r {
                        Ok(out) => {
                            entry.value = Some(*out);
                            n += 1;
                        }
                        Err(ExecuteError::Store(Error::Storage(e))) => {
                            assert!(
                                matches!(e.kind(), StorageKind::Connection | StorageKind::Timeout),
                                "a restart is a connection failure or a timeout: {e:?}"
                            );
                            entry.in_doubt += u32::from(ran);
                            errors.lock().expect("errors").push(e.kind());
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(ExecuteError::Store(Error::Interrupted { .. })) => {
                            unreachable!("the default orphan policy re-runs")
                        }
                        Err(e) => panic!("unexpected: {e}"),
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(500));
        let status = std::process::Command::new("sh")
            .args(["-c", &restart])
            .status()
            .expect("run the restart command");
        assert!(status.success(), "the restart command failed: {status}");
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::SeqCst);
    });
    let keys = keys.into_inner().expect("keys");
    assert!(
        !errors.lock().expect("errors").is_empty(),
        "the restart was felt"
    );
    let mut reran = 0;
    for (key, k) in &keys {
        assert!(
            k.runs <= 1 + k.in_doubt,
            "during-{key} ran {} times with {} in-doubt calls",
            k.runs,
            k.in_doubt
        );
        reran += k.runs.saturating_sub(1);
        if let Some(value) = k.value {
            let again = store
                .execute_once(format!("during-{key}"), || {
                    Ok::<_, std::io::Error>(u32::MAX)
                })
                .expect("replay");
            assert_eq!((*again, again.is_replayed()), (value, true), "during-{key}");
        }
    }
    for i in 0..20u32 {
        let again = store
            .execute_once(format!("before-{i}"), || Ok::<_, std::io::Error>(u32::MAX))
            .expect("replay after the restart");
        assert_eq!((*again, again.is_replayed()), (i, true));
    }
    eprintln!(
        "restart: {} keys called, {} store errors, {reran} re-runs after in-doubt calls",
        keys.len(),
        errors.lock().expect("errors").len()
    );
}
