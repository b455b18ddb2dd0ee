//! Opening: paths that are not stores, foreign or newer databases, clean shutdown, and a sled
//! snapshot that a kill interrupted (complete or not).

mod common;

use common::{Scratch, ServiceError};
use idemstore::{Error, Store};

fn not_a_store(r: Result<Store, Error>) -> &'static str {
    match r {
        Err(Error::NotAStore { reason, .. }) => reason,
        other => panic!("expected NotAStore, got {other:?}"),
    }
}

#[test]
fn a_regular_file_is_not_a_store() {
    let s = Scratch::new();
    std::fs::write(s.path(), b"hello").unwrap();
    not_a_store(Store::open(s.path()));
    assert_eq!(
        std::fs::read(s.path()).unwrap(),
        b"hello",
        "the file is left alone"
    );
}

#[test]
fn a_directory_of_other_files_is_not_a_store() {
    let s = Scratch::new();
    std::fs::create_dir(s.path()).unwrap();
    std::fs::write(s.path().join("notes.txt"), b"mine").unwrap();
    not_a_store(Store::open(s.path()));
    let entries: Vec<_> = std::fs::read_dir(s.path()).unwrap().collect();
    assert_eq!(
        entries.len(),
        1,
        "nothing was created beside the user's file"
    );
}

#[test]
fn an_empty_directory_becomes_a_store() {
    let s = Scratch::new();
    std::fs::create_dir(s.path()).unwrap();
    let store = Store::open(s.path()).unwrap();
    store
        .execute_once("k", || Ok::<_, ServiceError>(1u8))
        .unwrap();
}

#[test]
fn a_sled_database_idemstore_did_not_create_is_refused() {
    let s = Scratch::new();
    s.with_raw_db(|db| db.insert(b"someone else's", b"data").unwrap());
    not_a_store(Store::open(s.path()));
    let kept = s.with_raw_db(|db| db.get(b"someone else's").unwrap());
    assert_eq!(kept.unwrap(), b"data");
}

#[test]
fn garbage_in_the_database_files_is_an_error_not_a_panic() {
    let s = Scratch::new();
    s.open().close().unwrap();
    let db_file = s.path().join("db");
    let len = std::fs::metadata(&db_file).unwrap().len() as usize;
    let mut noise = Vec::with_capacity(len.max(4096));
    let mut x: u32 = 0x9E37_79B9;
    for _ in 0..len.max(4096) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.push(x as u8);
    }
    std::fs::write(&db_file, noise).unwrap();
    // Whether or not the engine notices, the store must not start over as if new.
    match Store::open(s.path()) {
        Err(Error::Damaged { .. } | Error::NotAStore { .. } | Error::Storage(_)) => {}
        other => panic!("expected a typed refusal, got {other:?}"),
    }
}

#[test]
fn a_store_whose_engine_files_vanished_is_damaged_not_new() {
    let s = Scratch::new();
    s.open().close().unwrap();
    for name in ["db", "conf"] {
        std::fs::remove_file(s.path().join(name)).unwrap();
    }
    for entry in std::fs::read_dir(s.path()).unwrap() {
        let p = entry.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("snap.")
        {
            std::fs::remove_file(p).unwrap();
        }
    }
    assert!(matches!(Store::open(s.path()), Err(Error::Damaged { .. })));
}

#[test]
fn a_store_from_a_newer_version_is_refused() {
    let s = Scratch::new();
    s.open().close().unwrap();
    s.with_raw_db(|db| {
        let meta = db.open_tree("idemstore/meta").unwrap();
        let mut marker = b"idemstore".to_vec();
        marker.extend_from_slice(&99u32.to_le_bytes());
        meta.insert("format", marker).unwrap();
    });
    match Store::open(s.path()) {
        Err(Error::UnsupportedStoreVersion { found: 99, .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_same_path_cannot_be_opened_twice() {
    let s = Scratch::new();
    let first = s.open();
    assert!(matches!(Store::open(s.path()), Err(Error::Locked { .. })));
    first
        .execute_once("k", || Ok::<_, ServiceError>(1u8))
        .unwrap();
    first.close().unwrap();
    let second = s.open();
    assert!(second
        .execute_once("k", || Ok::<_, ServiceError>(2u8))
        .unwrap()
        .is_replayed());
}

#[test]
fn epoch_grows_on_every_open() {
    let s = Scratch::new();
    for expected in 1..=4 {
        let store = s.open();
        assert_eq!(store.epoch(), expected);
    }
}

#[test]
fn a_dropped_store_can_be_reopened_at_once() {
    // sled finishes some writes on a global thread pool after its handles drop; a reopen in
    // that moment used to fail with Locked (found by the model_ops fuzz target).
    let s = Scratch::new();
    for durability in [
        idemstore::Durability::Periodic(std::time::Duration::from_millis(1)),
        idemstore::Durability::Immediate,
    ] {
        for round in 0..60u32 {
            let store = s
                .builder()
                .durability(durability)
                .open()
                .unwrap_or_else(|e| panic!("round {round} ({durability:?}): reopen failed: {e}"));
            for i in 0..20u32 {
                store
                    .execute_once(format!("r{round}-{i}"), || {
                        Ok::<_, ServiceError>(vec![0u8; 600])
                    })
                    .unwrap();
            }
        }
    }
}

/// What a SIGKILL while sled 0.34 writes its snapshot during open leaves behind (found by the
/// crash loop's kills aimed at open): an empty `snap.<lsn>.generating`, named after a newer
/// LSN than the last complete snapshot. sled picks the newest `snap.*` file, this one
/// included, and reports corruption, so the store never opens again. The complete snapshot
/// before it is still there (sled removes old ones only after the rename), so setting the
/// interrupted one aside is enough.
#[test]
fn a_snapshot_interrupted_by_a_kill_does_not_keep_the_store_from_opening() {
    // Interrupted before its bytes were all written (empty), or after (a complete copy).
    for complete in [false, true] {
        let s = Scratch::new();
        for i in 0..3u32 {
            // Each open moves sled's snapshot forward past the writes of the one before.
            let store = s.open();
            store
                .execute_once(format!("k{i}"), || Ok::<_, ServiceError>(i))
                .unwrap();
            store.close().unwrap();
        }
        let newest = std::fs::read_dir(s.path())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                u64::from_str_radix(name.strip_prefix("snap.")?, 16).ok()
            })
            .max()
            .expect("sled wrote a snapshot");
        let bytes = match complete {
            true => std::fs::read(s.path().join(format!("snap.{newest:016X}"))).unwrap(),
            false => Vec::new(),
        };
        let generating = s
            .path()
            .join(format!("snap.{:016X}.generating", newest + 1));
        std::fs::write(&generating, bytes).unwrap();
        let store = s
            .builder()
            .open()
            .unwrap_or_else(|e| panic!("the store does not open (complete: {complete}): {e}"));
        assert!(!generating.exists());
        for i in 0..3u32 {
            let out = store
                .execute_once(format!("k{i}"), || -> Result<u32, ServiceError> {
                    panic!("k{i} lost its outcome")
                })
                .unwrap();
            assert_eq!(*out, i);
        }
    }
}
