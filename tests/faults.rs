//! Faults: a full disk (a small tmpfs the test mounts itself).

mod common;

use common::ServiceError;
use idemstore::{Error, ExecuteError, Store};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A tmpfs mounted for one test, unmounted on drop.
struct SmallDisk {
    mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size`; None (with the reason printed) where that is not possible.
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).ok()?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mountpoint)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Self {
                mountpoint,
                _dir: dir,
            }),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs here ({}); the full-disk test needs root",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount ({e}); the full-disk test needs it");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.mountpoint)
            .status();
    }
}

/// Fills the file system with a file until it refuses; returns the file's path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() || f.sync_all().is_err() {
            break;
        }
    }
    // Byte by byte, to the very last block.
    while f.write_all(&[0]).is_ok() && f.sync_all().is_ok() {}
    path
}

#[test]
fn full_disk_is_a_storage_error_that_never_runs_the_operation_and_reopen_recovers() {
    let Some(disk) = SmallDisk::mount("16m") else {
        return;
    };
    let db = disk.path().join("db");
    let store = Store::open(&db).unwrap();
    let mut returned = Vec::new();
    let mut returned_big = Vec::new();
    for i in 0..20u32 {
        let key = format!("before-{i}");
        let out = store
            .execute_once(&key, || Ok::<_, ServiceError>(i))
            .unwrap();
        returned.push((key, *out));
    }
    let filler = fill(disk.path());

    // Calls go on until the engine runs out of room. The call that hits the wall may have
    // run its operation (if its claim still fit), and then says its outcome is not durable.
    let mut first_failure = None;
    for i in 0..500u32 {
        let key = format!("full-{i}");
        match store.execute_once(&key, || Ok::<_, ServiceError>(vec![i as u8; 4096])) {
            Ok(out) => returned_big.push((key, out.into_value())),
            Err(ExecuteError::Store(Error::Storage(e))) => {
                eprintln!("disk full after {i} more calls: {e}");
                first_failure = Some(key);
                break;
            }
            Err(e) => panic!("unexpected error on a full disk: {e:?}"),
        }
    }
    let first_failure = first_failure.expect("the disk never filled");

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
    let store = Store::open(&db).unwrap();
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
    // The call that hit the wall either recorded its outcome or left an orphan: never silence.
    let info = store.record(&first_failure).unwrap();
    eprintln!("the interrupted call's record after reopen: {info:?}");
    for i in 0..20 {
        assert!(store.record(format!("refused-{i}")).unwrap().is_none());
    }
    let out = store
        .execute_once("after", || Ok::<_, ServiceError>(1u8))
        .unwrap();
    assert!(!out.is_replayed());
}
