//! The narrow storage interface the state machine is written against, and its sled engine.
//!
//! Invariants:
//! - one process owns a database directory (sled's file lock), so the in-process registry
//!   sees every running call;
//! - records live in tree `idemstore/records` (key → record bytes); the expiry index lives in
//!   `idemstore/expiry` (expires_ms big-endian ++ key → empty), ordered by time, so the
//!   entries due by `now` are a prefix of the tree; `idemstore/meta` holds the format marker
//!   and the open epoch;
//! - the epoch is incremented and flushed at every open, before any claim can use it, so claim
//!   tokens grow across restarts and a claim from an earlier open is recognisable;
//! - `barrier` returns only when every write applied before it is on disk (`Immediate`), or at
//!   once (`Periodic`, where sled's own timer flushes).

use std::path::{Path, PathBuf};

use crate::group_commit::GroupCommit;
use crate::stats::Counters;
use crate::Error;
use std::sync::Arc;

const RECORDS_TREE: &[u8] = b"idemstore/records";
const EXPIRY_TREE: &[u8] = b"idemstore/expiry";
const META_TREE: &[u8] = b"idemstore/meta";
const STEPS_TREE: &[u8] = b"idemstore/steps";
/// Tree names starting with this are the store's own; user trees may not use it.
pub(crate) const RESERVED_PREFIX: &str = "idemstore/";
const FORMAT_KEY: &[u8] = b"format";
const EPOCH_KEY: &[u8] = b"epoch";
const FORMAT_MAGIC: &[u8] = b"idemstore";
/// The database format this build writes.
const STORE_FORMAT: u32 = 1;
/// A file beside the engine's, written once the store's metadata is durable: if it exists
/// but the metadata does not, the engine lost the data.
const SIDECAR: &str = "idemstore.format";

/// What the state machine needs from a storage engine.
pub(crate) trait Storage: Send + Sync {
    /// Owned stored bytes.
    type Bytes: AsRef<[u8]>;

    /// The record stored for `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Self::Bytes>, Error>;

    /// Replaces `key`'s record with `new` (None: removes it) if it is still `expected`
    /// (None: absent). Returns whether it swapped.
    fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, Error>;

    /// Adds an expiry index entry pointing at `key`.
    fn index_expiry(&self, expires_ms: u64, key: &[u8]) -> Result<(), Error>;

    /// Up to `limit` expiry index entries due at `now_ms` (expires_ms <= now_ms), oldest first.
    fn due_expiries(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, Error>;

    /// Removes expiry index entries.
    fn unindex_expiries(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), Error>;

    /// Returns when every write applied before the call is durable (per the durability mode).
    fn barrier(&self) -> Result<(), Error>;

    /// The recorded steps of `key`'s operation, in step order.
    fn steps(&self, key: &[u8]) -> Result<Vec<Self::Bytes>, Error>;

    /// Records step `index` of `key`'s operation.
    fn put_step(&self, key: &[u8], index: u32, step: Vec<u8>) -> Result<(), Error>;

    /// Removes every recorded step of `key`'s operation.
    fn remove_steps(&self, key: &[u8]) -> Result<(), Error>;
}

/// The sled engine.
pub(crate) struct SledStorage {
    pub(crate) db: sled::Db,
    /// The engine's data file, for `make_durable`.
    data_file: std::fs::File,
    pub(crate) records: sled::Tree,
    pub(crate) expiry: sled::Tree,
    steps: sled::Tree,
    /// Some in `Immediate` mode.
    flush: Option<GroupCommit>,
}

/// An opened engine plus what opening it learned.
pub(crate) struct Opened {
    pub storage: SledStorage,
    pub epoch: u64,
}

/// Opens (or creates) the database at `path`.
pub(crate) fn open(
    path: &Path,
    config: sled::Config,
    immediate: bool,
    counters: Arc<Counters>,
) -> Result<Opened, Error> {
    check_path(path)?;
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(map_open_error(path, e)),
        Err(_) => {
            return Err(Error::NotAStore {
                path: path.into(),
                reason: "the storage engine could not read its files",
            })
        }
    };
    let epoch = match init_meta(path, &db) {
        Ok(epoch) => epoch,
        Err(e) => {
            // Refused: let go of the database fully, so the caller can act on it at once.
            drop(db);
            wait_for_engine_release(&path.join("db"));
            return Err(e);
        }
    };
    let sidecar = path.join(SIDECAR);
    if !sidecar.exists() {
        let file = std::fs::File::create(&sidecar)?;
        std::io::Write::write_all(&mut &file, format!("idemstore {STORE_FORMAT}\n").as_bytes())?;
        file.sync_all()?;
    }
    let records = db.open_tree(RECORDS_TREE)?;
    let expiry = db.open_tree(EXPIRY_TREE)?;
    let steps = db.open_tree(STEPS_TREE)?;
    let data_file = std::fs::File::open(path.join("db"))?;
    make_durable(&db, &data_file)?;
    // The database's files must be reachable after a power loss too: sync their directory.
    std::fs::File::open(path)?.sync_all()?;
    let flush = match immediate {
        true => Some(GroupCommit::new(
            db.clone(),
            data_file.try_clone()?,
            counters,
        )),
        false => None,
    };
    Ok(Opened {
        storage: SledStorage {
            db,
            data_file,
            records,
            expiry,
            steps,
            flush,
        },
        epoch,
    })
}

/// Waits (bounded) until the engine has let go of its data file's lock.
///
/// sled hands some writes to a global thread pool whose tasks hold the engine alive for a
/// moment after the last handle drops; the file lock goes with it. Waiting here means a store
/// closed by this process can be opened again at once, instead of failing with `Locked`.
pub(crate) fn wait_for_engine_release(lock_file: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let Ok(file) = std::fs::File::open(lock_file) else {
        return;
    };
    loop {
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                return;
            }
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) => {
                tracing::warn!(error = %e, "the storage engine still holds its lock after close");
                return;
            }
        }
    }
}

/// Makes every write applied so far durable, including against power loss.
///
/// sled 0.34's `flush` writes its log with `sync_file_range`, which survives a process crash
/// but neither flushes the device's write cache nor persists the file's size, so a power loss
/// could still lose what it "flushed". An `fdatasync` of the data file after it does both.
pub(crate) fn make_durable(db: &sled::Db, data_file: &std::fs::File) -> Result<(), sled::Error> {
    db.flush()?;
    data_file.sync_data().map_err(sled::Error::Io)
}

impl SledStorage {
    /// See [`make_durable`].
    pub(crate) fn make_durable(&self) -> Result<(), Error> {
        Ok(make_durable(&self.db, &self.data_file)?)
    }
}

/// Refuses a path that is a file, or a non-empty directory without a sled database in it.
fn check_path(path: &Path) -> Result<(), Error> {
    let not_a_store = |reason| Error::NotAStore {
        path: PathBuf::from(path),
        reason,
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io(e)),
        Ok(meta) if !meta.is_dir() => Err(not_a_store("it is not a directory")),
        Ok(_) => {
            let has_db = path.join("db").is_file() && path.join("conf").is_file();
            if !has_db && path.join(SIDECAR).exists() {
                return Err(Error::Damaged {
                    path: path.into(),
                    reason: "its database files are missing",
                });
            }
            if has_db || std::fs::read_dir(path)?.next().is_none() {
                Ok(())
            } else {
                Err(not_a_store(
                    "the directory holds other files and no database",
                ))
            }
        }
    }
}

fn map_open_error(path: &Path, e: sled::Error) -> Error {
    match &e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            Error::Locked { path: path.into() }
        }
        sled::Error::Corruption { .. } | sled::Error::Unsupported(_) => Error::NotAStore {
            path: path.into(),
            reason: "the storage engine found its files corrupt or foreign",
        },
        _ => Error::Storage(e),
    }
}

/// Checks or writes the format marker, then bumps and flushes the open epoch.
fn init_meta(path: &Path, db: &sled::Db) -> Result<u64, Error> {
    let not_a_store = |reason| Error::NotAStore {
        path: path.into(),
        reason,
    };
    let is_new = !db.tree_names().iter().any(|n| n == META_TREE);
    if is_new && (db.tree_names().len() > 1 || !db.is_empty()) {
        return Err(not_a_store(
            "it is a sled database that idemstore did not create",
        ));
    }
    let meta = db.open_tree(META_TREE)?;
    let marker = meta.get(FORMAT_KEY)?;
    if marker.is_none() && path.join(SIDECAR).exists() {
        return Err(Error::Damaged {
            path: path.into(),
            reason: "its metadata is gone although it was written durably before",
        });
    }
    match marker {
        None if is_new || meta.is_empty() => {
            let mut marker = FORMAT_MAGIC.to_vec();
            marker.extend_from_slice(&STORE_FORMAT.to_le_bytes());
            meta.insert(FORMAT_KEY, marker)?;
        }
        None => return Err(not_a_store("its format marker is missing")),
        Some(marker) => {
            let version = marker
                .strip_prefix(FORMAT_MAGIC)
                .and_then(|v| <[u8; 4]>::try_from(v).ok())
                .map(u32::from_le_bytes)
                .ok_or_else(|| not_a_store("its format marker is not idemstore's"))?;
            if version > STORE_FORMAT {
                return Err(Error::UnsupportedStoreVersion {
                    path: path.into(),
                    found: version,
                });
            }
        }
    }
    let previous = match meta.get(EPOCH_KEY)? {
        None => 0,
        Some(bytes) => <[u8; 8]>::try_from(bytes.as_ref())
            .map(u64::from_le_bytes)
            .map_err(|_| not_a_store("its epoch counter is corrupt"))?,
    };
    let epoch = previous + 1;
    meta.insert(EPOCH_KEY, &epoch.to_le_bytes())?;
    db.flush()?;
    Ok(epoch)
}

/// The steps of one key sort together: key length (u16, big-endian), key, step index.
fn steps_prefix(key: &[u8]) -> Vec<u8> {
    // Invariant: keys are at most 65535 bytes (config caps max_key_bytes), so the length
    // fits in u16 and no key's prefix is a prefix of another key's.
    let mut p = Vec::with_capacity(2 + key.len() + 4);
    p.extend_from_slice(&(key.len() as u16).to_be_bytes());
    p.extend_from_slice(key);
    p
}

pub(crate) fn expiry_key(expires_ms: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&expires_ms.to_be_bytes());
    k.extend_from_slice(key);
    k
}

impl Storage for SledStorage {
    type Bytes = sled::IVec;

    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, Error> {
        Ok(self.records.get(key)?)
    }

    fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, Error> {
        Ok(self.records.compare_and_swap(key, expected, new)?.is_ok())
    }

    fn index_expiry(&self, expires_ms: u64, key: &[u8]) -> Result<(), Error> {
        self.expiry.insert(expiry_key(expires_ms, key), &[])?;
        Ok(())
    }

    fn due_expiries(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let end = now_ms.saturating_add(1).to_be_bytes();
        let mut due = Vec::new();
        for entry in self.expiry.range(..end.as_slice()).take(limit) {
            let (k, _) = entry?;
            // Entries shorter than the 8-byte time prefix cannot come from index_expiry;
            // they are dropped rather than trusted.
            match k.split_first_chunk::<8>() {
                Some((time, key)) => due.push((u64::from_be_bytes(*time), key.to_vec())),
                None => {
                    self.expiry.remove(&k)?;
                }
            }
        }
        Ok(due)
    }

    fn unindex_expiries(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), Error> {
        // One removal at a time: sled's `apply_batch` takes a database-wide write lock that
        // would stall every caller's read for the whole batch.
        for (expires_ms, key) in entries {
            self.expiry.remove(expiry_key(*expires_ms, key))?;
        }
        Ok(())
    }

    fn steps(&self, key: &[u8]) -> Result<Vec<sled::IVec>, Error> {
        self.steps
            .scan_prefix(steps_prefix(key))
            .map(|kv| kv.map(|(_, v)| v).map_err(Error::from))
            .collect()
    }

    fn put_step(&self, key: &[u8], index: u32, step: Vec<u8>) -> Result<(), Error> {
        let mut k = steps_prefix(key);
        k.extend_from_slice(&index.to_be_bytes());
        self.steps.insert(k, step)?;
        Ok(())
    }

    fn remove_steps(&self, key: &[u8]) -> Result<(), Error> {
        for kv in self.steps.scan_prefix(steps_prefix(key)) {
            let (k, _) = kv?;
            self.steps.remove(k)?;
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), Error> {
        match &self.flush {
            Some(queue) => Ok(queue.wait_durable()?),
            None => Ok(()),
        }
    }
}
