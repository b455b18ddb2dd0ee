//! Faults: a full disk (a small tmpfs the test mounts itself). Outcomes returned while the
//! disk fills survive; once the engine runs out of room every call is a storage error and no
//! operation runs; the call that hit the wall leaves an orphan or its outcome if its operation
//! ran, nothing if not (under `Rerun`, whose claims make no durable point, it may leave
//! nothing after running: the next call runs it again); a reopen with space back recovers. Where the tmpfs cannot be mounted
//! the test says so on the terminal and skips, except under CI, where that is a failure.

mod common;

use common::disk::{fill_leaving, SmallDisk};
use common::ServiceError;
use idemstore::{Error, ExecuteError, OrphanPolicy, RecordState, Store};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Bytes given back after filling the disk: room for some calls before the engine runs out.
const ROOM: u64 = 1 << 20;

/// Fills a small disk with calls whose outcomes are `outcome_bytes` long. Large outcomes
/// make the outcome write the one that hits the wall (after the operation ran); tiny ones,
/// here, the claim (before it runs). Which one it is depends on the engine's layout, so each
/// run checks whichever case it met.
fn full_disk(outcome_bytes: usize, policy: OrphanPolicy) {
    let Some(disk) = SmallDisk::mount_or_skip("16m") else {
        return;
    };
    let db = disk.path().join("db");
    let open = || Store::builder(&db).orphan_policy(policy).open().unwrap();
    let store = open();
    let mut returned = Vec::new();
    let mut returned_big = Vec::new();
    for i in 0..20u32 {
        let key = format!("before-{i}");
        let out = store
            .execute_once(&key, || Ok::<_, ServiceError>(i))
            .unwrap();
        returned.push((key, *out));
    }
    let filler = fill_leaving(disk.path(), ROOM);

    // Calls go on, returning outcomes, until the engine runs out of room. The call that hits
    // the wall may have run its operation (if its claim still fit), and then says its outcome
    // is not durable.
    let mut hit_the_wall = None;
    for i in 0..5_000u32 {
        let key = format!("full-{i}");
        let ran = AtomicBool::new(false);
        let r = store.execute_once(&key, || {
            ran.store(true, Ordering::SeqCst);
            Ok::<_, ServiceError>(vec![i as u8; outcome_bytes])
        });
        match r {
            Ok(out) => returned_big.push((key, out.into_value())),
            Err(ExecuteError::Store(Error::Storage(e))) => {
                assert_eq!(
                    e.io_kind(),
                    Some(std::io::ErrorKind::StorageFull),
                    "a full disk is told apart from other storage errors: {e}"
                );
                eprintln!(
                    "disk full after {i} more calls (operation ran: {}): {e}",
                    ran.load(Ordering::SeqCst)
                );
                hit_the_wall = Some((key, ran.load(Ordering::SeqCst)));
                break;
            }
            Err(e) => panic!("unexpected error on a full disk: {e:?}"),
        }
    }
    let (wall_key, wall_ran) = hit_the_wall.expect("the disk never filled");
    assert!(
        !returned_big.is_empty(),
        "no outcome was returned while the disk filled: leave more room"
    );

    // From then on every call fails before its operation runs.
    let runs = AtomicUsize::new(0);
    for i in 0..20 {
        let r = store.execute_once(format!("refused-{i}"), || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ServiceError>(0u8)
        });
        assert!(
            matches!(r, Err(ExecuteError::Store(Error::Storage(_)))),
            "{r:?}"
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "an operation ran on a full disk"
    );

    // Space returns. The engine latches I/O errors, so the store is reopened.
    std::fs::remove_file(filler).unwrap();
    drop(store);
    let store = open();
    for (key, value) in &returned {
        let out = store.execute_once(key, || -> Result<u32, ServiceError> {
            panic!("{key} lost its outcome")
        });
        assert_eq!(*out.unwrap(), *value);
    }
    for (key, value) in &returned_big {
        let out = store.execute_once(key, || -> Result<Vec<u8>, ServiceError> {
            panic!("{key} lost its outcome")
        });
        assert_eq!(&*out.unwrap(), value);
    }
    // The call that hit the wall: under Report, if its operation ran, its claim was durable,
    // so it left an orphan (or, if the outcome made it after all, its outcome): never silence;
    // if it did not run, its claim never became durable and nothing of it remains. Under
    // Rerun a claim makes no durable point (design §6): an operation that ran may have left
    // nothing, and the next call runs it again, as it would over an orphan.
    let info = store.record(&wall_key).unwrap();
    eprintln!("the interrupted call's record after reopen: {info:?}");
    match (wall_ran, info.map(|i| i.state)) {
        (true, Some(RecordState::Pending | RecordState::Completed)) | (false, None) => {}
        (true, None) if policy == OrphanPolicy::Rerun => {}
        (ran, state) => panic!("the call that hit the wall (ran: {ran}) left {state:?}"),
    }
    for i in 0..20 {
        assert!(store.record(format!("refused-{i}")).unwrap().is_none());
    }
    let out = store
        .execute_once("after", || Ok::<_, ServiceError>(1u8))
        .unwrap();
    assert!(!out.is_replayed());
}

#[test]
fn full_disk_is_a_storage_error_that_never_runs_the_operation_and_reopen_recovers() {
    full_disk(4096, OrphanPolicy::Report);
}

#[test]
fn full_disk_with_tiny_outcomes() {
    full_disk(1, OrphanPolicy::Rerun);
}
