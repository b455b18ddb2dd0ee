//! A full disk on demand: a small tmpfs a test mounts for itself, and ways to fill it.
//!
//! Invariants: the tmpfs is unmounted (lazily) when its [`SmallDisk`] drops; where it cannot be
//! mounted (no root), a test skips with a message on the terminal, except under CI (`CI` set),
//! where that is a failure: CI always runs the full-disk tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for one test.
pub struct SmallDisk {
    mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size` (as `mount -o size=` takes it), or says why it cannot.
    pub fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("no temp dir: {e}"))?;
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint).map_err(|e| format!("no mount point: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&mountpoint)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs ({}): the test needs root with CAP_SYS_ADMIN",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            mountpoint,
            _dir: dir,
        })
    }

    /// The disk, or `None` where it cannot be had: skipped with a message that reaches the
    /// terminal on a developer's machine, but a failure under CI.
    pub fn mount_or_skip(size: &str) -> Option<Self> {
        match Self::mount(size) {
            Ok(disk) => Some(disk),
            Err(why) if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) => {
                panic!("CI must run the full-disk tests, but {why}")
            }
            Err(why) => {
                // Straight to the process's stderr: eprintln! would be captured and hidden.
                let _ = writeln!(std::io::stderr(), "SKIPPED a full-disk test: {why}");
                None
            }
        }
    }

    /// Where the disk is mounted.
    pub fn path(&self) -> &Path {
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

/// Fills the file system at `dir` with a file, synced write by write, to its very last byte,
/// then gives `room` bytes back; returns the file's path.
pub fn fill_leaving(dir: &Path, room: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() && f.sync_all().is_ok() {}
    // Byte by byte, to the very last block.
    while f.write_all(&[0]).is_ok() && f.sync_all().is_ok() {}
    let len = f.metadata().unwrap().len();
    assert!(len > room, "the disk had less than {room} bytes free");
    f.set_len(len - room).unwrap();
    f.sync_all().unwrap();
    path
}

/// Fills the file system at `dir` with a file until a write fails (in 64 KiB, then 512-byte
/// writes, synced once at the end); returns the file's path.
pub fn fill_up(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0xA5u8; 64 << 10];
    while file.write_all(&chunk).is_ok() {}
    let small = [0u8; 512];
    while file.write_all(&small).is_ok() {}
    let _ = file.sync_all();
    path
}
