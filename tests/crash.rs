//! Real child processes killed with SIGKILL: orphans, durability of returned outcomes, locks.
//!
//! The parent re-executes this test binary running the ignored `child_process` test, which
//! acts as directed by environment variables and reports progress on stdout.

mod common;

use common::{ChildProcess, Scratch, ServiceError};
use idemstore::{Error, ExecuteError, OrphanPolicy, RecordState, Store};
use std::path::Path;
use std::time::Duration;

const PATH_VAR: &str = "IDEMSTORE_CRASH_PATH";
const MODE_VAR: &str = "IDEMSTORE_CRASH_MODE";

/// Runs the ignored `child_process` test of this binary in `mode` on the store at `path`.
fn spawn_child(path: &Path, mode: &str) -> ChildProcess {
    ChildProcess::spawn_test(
        "child_process",
        &[(PATH_VAR, path.as_os_str()), (MODE_VAR, mode.as_ref())],
    )
    .labelled(format!("child in mode {mode}"))
}

fn say(line: String) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

/// The child's side: never returns in the modes that wait to be killed.
#[test]
#[ignore = "run as a child process by the crash tests"]
fn child_process() {
    let (Ok(path), Ok(mode)) = (std::env::var(PATH_VAR), std::env::var(MODE_VAR)) else {
        panic!("child_process runs only under the crash tests");
    };
    if mode == "try-open" {
        match Store::open(&path) {
            Err(Error::Locked { .. }) => say("LOCKED".into()),
            other => say(format!("UNEXPECTED {other:?}")),
        }
        return;
    }
    let store = Store::builder(&path).sweep_interval(None).open().unwrap();
    match mode.as_str() {
        // Under Report on the call its claim is durable before the operation runs, so the
        // kill leaves an orphan whatever the next call's policy (design §6).
        "hang-in-operation" => {
            let _ = store
                .call("order-1")
                .orphan_policy(OrphanPolicy::Report)
                .run(|| -> Result<u32, ServiceError> {
                    say("RUNNING".into());
                    loop {
                        std::thread::sleep(Duration::from_secs(60));
                    }
                });
        }
        // Under Rerun the claim makes no durable point of its own: the kill may leave nothing.
        "hang-in-operation-rerun" => {
            let _ = store.execute_once("order-1", || -> Result<u32, ServiceError> {
                say("RUNNING".into());
                loop {
                    std::thread::sleep(Duration::from_secs(60));
                }
            });
        }
        "complete-many" => {
            std::thread::scope(|scope| {
                for t in 0..4 {
                    let store = &store;
                    scope.spawn(move || {
                        for i in 0.. {
                            let key = format!("t{t}-{i}");
                            let out = store
                                .execute_once(&key, || {
                                    Ok::<_, ServiceError>(format!("value-{key}"))
                                })
                                .unwrap();
                            say(format!("DONE {key} {}", *out));
                        }
                    });
                }
            });
        }
        "periodic-flush" => {
            drop(store);
            let store = Store::builder(&path)
                .durability(idemstore::Durability::Periodic(Duration::from_secs(3600)))
                .sweep_interval(None)
                .open()
                .unwrap();
            store
                .execute_once("flushed", || Ok::<_, ServiceError>(7u32))
                .unwrap();
            store.flush().unwrap();
            say("FLUSHED".into());
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        "remove" => {
            store
                .execute_once("gone", || Ok::<_, ServiceError>(1u32))
                .unwrap();
            assert!(store.remove("gone").unwrap());
            say("REMOVED".into());
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        "hold-open" => {
            say("READY".into());
            loop {
                std::thread::sleep(Duration::from_secs(60));
            }
        }
        other => panic!("unknown mode {other}"),
    }
}

#[test]
fn orphan_left_by_a_killed_process_is_rerun_by_default() {
    let s = Scratch::new();
    let mut child = spawn_child(&s.path(), "hang-in-operation");
    child.wait_for("RUNNING");
    child.kill();

    let store = s.open();
    // Recognised at once: no lease to wait out.
    let info = store.record("order-1").unwrap().unwrap();
    assert_eq!(
        (info.state, info.attempts, info.claim.epoch),
        (RecordState::Pending, 1, 1)
    );
    let out = store
        .execute_once("order-1", || Ok::<_, ServiceError>(42u32))
        .unwrap();
    assert_eq!(
        (*out, out.is_replayed(), out.record().attempts),
        (42, false, 2)
    );
    assert_eq!(store.stats().orphans_recovered, 1);
    assert!(store
        .execute_once("order-1", || Ok::<_, ServiceError>(0u32))
        .unwrap()
        .is_replayed());
}

/// Under Rerun (store and call) a killed run leaves an orphan or, its claim not durable,
/// nothing; the next call runs the operation once either way, then replays it.
#[test]
fn a_killed_run_under_rerun_runs_once_more_with_or_without_its_orphan() {
    let s = Scratch::new();
    let mut child = spawn_child(&s.path(), "hang-in-operation-rerun");
    child.wait_for("RUNNING");
    child.kill();
    let store = s.open();
    let left = store.record("order-1").unwrap().map(|i| i.state);
    assert!(
        matches!(left, None | Some(RecordState::Pending)),
        "{left:?}"
    );
    let runs = std::sync::atomic::AtomicU32::new(0);
    let run = || {
        store.execute_once("order-1", || {
            runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, ServiceError>(42u32)
        })
    };
    let first = run().unwrap();
    assert_eq!((*first, first.is_replayed()), (42, false));
    assert_eq!(
        store.stats().orphans_recovered,
        u64::from(left.is_some()),
        "an orphan is taken over exactly when one was left"
    );
    assert!(run().unwrap().is_replayed());
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[test]
fn orphan_is_reported_under_the_report_policy_until_the_caller_reconciles() {
    let s = Scratch::new();
    let mut child = spawn_child(&s.path(), "hang-in-operation");
    child.wait_for("RUNNING");
    child.kill();

    let store = s
        .builder()
        .orphan_policy(OrphanPolicy::Report)
        .open()
        .unwrap();
    for _ in 0..2 {
        let r = store.execute_once("order-1", || Ok::<_, ServiceError>(1u32));
        match r {
            Err(ExecuteError::Store(Error::Interrupted { attempts: 1, .. })) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(store.stats().executions, 0);
    assert_eq!(store.stats().orphans_reported, 2);
    // The caller reconciled (say, the charge did not go through) and re-runs explicitly.
    let out = store
        .call("order-1")
        .orphan_policy(OrphanPolicy::Rerun)
        .run(|| Ok::<_, ServiceError>(2u32))
        .unwrap();
    assert_eq!((*out, out.record().attempts), (2, 2));
}

#[test]
fn every_outcome_returned_before_sigkill_survives() {
    for round in 0..3 {
        let s = Scratch::new();
        let mut child = spawn_child(&s.path(), "complete-many");
        let mut returned = Vec::new();
        // Kill at a different point each round, while the child keeps writing.
        for _ in 0..(40 + round * 37) {
            let line = child.wait_for("DONE ");
            let mut parts = line.split(' ').skip(1);
            returned.push((
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            ));
        }
        child.kill();

        let store = s.open();
        for (key, value) in &returned {
            let out = store
                .execute_once(key, || Ok::<_, ServiceError>(String::from("re-run!")))
                .unwrap();
            assert!(out.is_replayed(), "round {round}: {key} was lost");
            assert_eq!(&*out, value);
        }
        // Whatever else the child left decodes, and Pending ones are orphans of the dead child.
        for item in store.records() {
            let (_, info) = item.unwrap();
            if info.state == RecordState::Pending {
                assert!(info.claim.epoch < store.epoch());
            }
        }
    }
}

#[test]
fn a_second_process_cannot_open_a_store_in_use() {
    let s = Scratch::new();
    s.open().close().unwrap();
    let mut child = spawn_child(&s.path(), "hold-open");
    child.wait_for("READY");
    match Store::open(s.path()) {
        Err(Error::Locked { path }) => assert_eq!(path, s.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    child.kill();
    let store = s.open();
    store
        .execute_once("k", || Ok::<_, ServiceError>(1u32))
        .unwrap();
}

#[test]
fn the_first_process_keeps_working_when_a_second_one_is_refused() {
    let s = Scratch::new();
    let store = s.open();
    store
        .execute_once("before", || Ok::<_, ServiceError>(1u32))
        .unwrap();
    let mut child = spawn_child(&s.path(), "try-open");
    let line = child.wait_for("LOCKED");
    assert_eq!(line, "LOCKED");
    assert!(child.wait_exit().success());
    assert!(store
        .execute_once("before", || Ok::<_, ServiceError>(2u32))
        .unwrap()
        .is_replayed());
    assert_eq!(
        *store
            .execute_once("after", || Ok::<_, ServiceError>(3u32))
            .unwrap(),
        3
    );
}

#[test]
fn flush_makes_periodic_writes_survive_sigkill() {
    let s = Scratch::new();
    let mut child = spawn_child(&s.path(), "periodic-flush");
    child.wait_for("FLUSHED");
    child.kill();
    let store = s.open();
    let out = store
        .execute_once("flushed", || Ok::<_, ServiceError>(0u32))
        .unwrap();
    assert_eq!((*out, out.is_replayed()), (7, true));
}

#[test]
fn remove_is_durable_when_it_returns_in_immediate_mode() {
    let s = Scratch::new();
    let mut child = spawn_child(&s.path(), "remove");
    child.wait_for("REMOVED");
    child.kill();
    let store = s.open();
    assert_eq!(store.record("gone").unwrap(), None);
    let out = store
        .execute_once("gone", || Ok::<_, ServiceError>(2u32))
        .unwrap();
    assert!(!out.is_replayed());
}
