//! The sled engine: embedded, one process per database directory (the default engine).
//!
//! Invariants:
//! - one process owns a database directory (sled's file lock), so the in-process registry
//!   sees every running call: a claim's holder is live exactly when this process runs it;
//! - records live in tree `idemstore/records` (key → record bytes); the expiry index lives in
//!   `idemstore/expiry` (expires_ms big-endian ++ key → empty), ordered by time, so the
//!   entries due by `now` are a prefix of the tree; `idemstore/meta` holds the format marker
//!   and the open epoch;
//! - the epoch is incremented and flushed at every open, before any claim can use it, so claim
//!   tokens grow across restarts and a claim from an earlier open is recognisable;
//! - steps live in `idemstore/life-steps` under (key, life, index), so a life of a key only
//!   ever reads its own steps; format-1 records (life [`LEGACY_LIFE`]) keep theirs in
//!   `idemstore/steps` under (key, index);
//! - [`Engine::remove_record`] is the one way a record leaves the store (explicit removal,
//!   sweeping, retiring an expired life): the record and its life's steps go in one
//!   transaction, so no crash leaves steps without their record;
//! - `wait_durable` returns only when every write applied before it is on disk (`Immediate`), or at
//!   once (`Periodic`, where sled's own timer flushes). "On disk" covers sled's blob files
//!   (values over its inline threshold, and large tree nodes, go to `blobs/`) and their
//!   directory entries, not only its log: see [`DurableFiles`].

use parking_lot::Mutex;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use std::collections::HashMap;
use std::ffi::OsString;
use std::ops::Bound;
use std::path::{Path, PathBuf};

mod group_commit;

use group_commit::GroupCommit;
use std::sync::Arc;

use crate::engine::keys::{expiry_key, step_index, step_key, steps_prefix};
use crate::engine::{Engine, Held, RecordIter};
use crate::error::{Error, StorageError};
use crate::format::record::{ClaimToken, LEGACY_LIFE};
use crate::stats::Counters;

/// A sled failure as the store reports it.
pub(crate) fn sled_error(e: sled::Error) -> Error {
    let io_kind = match &e {
        sled::Error::Io(io) => Some(io.kind()),
        _ => None,
    };
    Error::Storage(StorageError::new(e, io_kind))
}

const RECORDS_TREE: &[u8] = b"idemstore/records";
const EXPIRY_TREE: &[u8] = b"idemstore/expiry";
const META_TREE: &[u8] = b"idemstore/meta";
/// Steps of format-1 records (no lives).
const LEGACY_STEPS_TREE: &[u8] = b"idemstore/steps";
const STEPS_TREE: &[u8] = b"idemstore/life-steps";
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

/// The embedded engine on sled 0.34, the default: one process owns a database directory.
/// Opened by [`Store::open`](crate::Store::open) and [`StoreBuilder::open`](crate::StoreBuilder::open).
pub struct SledEngine {
    pub(crate) db: sled::Db,
    files: Arc<DurableFiles>,
    pub(crate) records: sled::Tree,
    pub(crate) expiry: sled::Tree,
    steps: sled::Tree,
    legacy_steps: sled::Tree,
    /// Some in `Immediate` mode.
    flush: Option<Arc<GroupCommit>>,
}

/// An opened engine plus what opening it learned.
pub(crate) struct Opened {
    pub engine: SledEngine,
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
    // No marker: this open creates the store, or finishes a creation a crash interrupted, so
    // the directory entries leading to it may not be durable yet (see the marker below).
    let creating = !path.join(SIDECAR).exists();
    {
        // Repair only what no running sled is writing: hold sled's lock meanwhile.
        let _lock = lock_if_present(path)?;
        finish_interrupted_snapshots(path)?;
    }
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
    let records = db.open_tree(RECORDS_TREE).map_err(sled_error)?;
    let expiry = db.open_tree(EXPIRY_TREE).map_err(sled_error)?;
    let steps = db.open_tree(STEPS_TREE).map_err(sled_error)?;
    let legacy_steps = db.open_tree(LEGACY_STEPS_TREE).map_err(sled_error)?;
    let files = Arc::new(DurableFiles {
        db: db.clone(),
        data_file: std::fs::File::open(path.join("db")).map_err(io_at(&path.join("db")))?,
        blobs_dir: path.join("blobs"),
        synced_blobs: Mutex::new(HashMap::new()),
    });
    files.make_durable().map_err(sled_error)?;
    // sled writes its `conf` without syncing it; the database's files (and the blobs
    // directory) must be reachable after a power loss too: sync them and their directory.
    for file in [path.join("conf"), path.join("blobs"), path.to_path_buf()] {
        sync_path(&file)?;
    }
    if creating {
        // Every ancestor's entries, up to the root: the open may have created any of them,
        // and which is unknown after an interrupted creation.
        let absolute = std::path::absolute(path).map_err(io_at(path))?;
        for dir in absolute.ancestors().skip(1) {
            sync_path(dir)?;
        }
    }
    // The marker says "this directory's metadata was durable": write it only now, after
    // the data, `conf` and the directories are, then make its own entry durable.
    let sidecar = path.join(SIDECAR);
    if !sidecar.exists() {
        let file = std::fs::File::create(&sidecar).map_err(io_at(&sidecar))?;
        std::io::Write::write_all(&mut &file, format!("idemstore {STORE_FORMAT}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_at(&sidecar))?;
        sync_path(path)?;
    }
    let flush = match immediate {
        true => Some(Arc::new(GroupCommit::new(
            Arc::clone(&files) as Arc<dyn group_commit::MakeDurable>,
            counters,
        ))),
        false => None,
    };
    Ok(Opened {
        engine: SledEngine {
            db,
            files,
            records,
            expiry,
            steps,
            legacy_steps,
            flush,
        },
        epoch,
    })
}

/// Completes or discards sled snapshots that a crash interrupted, before sled opens.
///
/// sled 0.34 writes a snapshot to `snap.<lsn>.generating`, syncs it, renames it to
/// `snap.<lsn>`, then deletes older snapshots. A crash before the rename leaves the
/// `.generating` file, which sled then takes for the newest snapshot: if it is incomplete,
/// sled reports corruption and the store would never open again. A complete one (its length
/// and CRC trailer check out, as sled writes them) is renamed as sled meant to; an incomplete
/// one is removed, leaving the previous snapshot, which sled deletes only after the rename.
fn finish_interrupted_snapshots(path: &Path) -> Result<(), Error> {
    let entries = match std::fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(path)(e)),
    };
    let mut changed = false;
    for entry in entries {
        let entry = entry.map_err(io_at(path))?;
        let name = entry.file_name();
        let Some(done) = name
            .to_str()
            .filter(|n| n.starts_with("snap."))
            .and_then(|n| n.strip_suffix(".generating"))
        else {
            continue;
        };
        let generating = entry.path();
        let bytes = std::fs::read(&generating).map_err(io_at(&generating))?;
        let complete = bytes.len() > 12 && {
            let (body, trailer) = bytes.split_at(bytes.len() - 12);
            crc32fast::hash(body).to_le_bytes() == trailer[8..]
        };
        let target = path.join(done);
        if complete && !target.exists() {
            // Its bytes may not have reached the disk before the crash: sync before naming it.
            sync_path(&generating)?;
            std::fs::rename(&generating, &target).map_err(io_at(&generating))?;
        } else {
            std::fs::remove_file(&generating).map_err(io_at(&generating))?;
        }
        tracing::warn!(file = ?name, complete, "finished a sled snapshot interrupted by a crash");
        changed = true;
    }
    if changed {
        sync_path(path)?;
    }
    Ok(())
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

/// Wraps an I/O error with the path it happened on.
pub(crate) fn io_at(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source: Arc::new(source),
    }
}

/// Opens and fsyncs a file or directory.
fn sync_path(path: &Path) -> Result<(), Error> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_at(path))
}

/// What must reach stable storage for a write to be durable: sled's log, its blob files and
/// their directory entries.
///
/// sled 0.34's `flush` writes its log with `sync_file_range`, which survives a process crash
/// but neither flushes the device's write cache nor persists the file's size, so a power loss
/// could still lose what it "flushed": an `fdatasync` of the data file after it does both.
/// sled writes values and tree nodes over its inline threshold (a quarter of a segment,
/// 128 KiB by default) to files under `blobs/` that it never syncs; a lost blob loses its
/// value, and sled's recovery then also drops what the log holds after it. So every durability
/// point, after sled's flush (which completes every blob the flushed log points at), syncs
/// each blob file it has not synced at its current size, then their directory, then the data
/// file.
pub(crate) struct DurableFiles {
    db: sled::Db,
    data_file: std::fs::File,
    blobs_dir: PathBuf,
    /// Blob files synced so far, with the size they had when synced.
    synced_blobs: Mutex<HashMap<OsString, u64>>,
}

impl DurableFiles {
    /// Makes every write applied so far durable, including against power loss.
    pub(crate) fn make_durable(&self) -> Result<(), sled::Error> {
        // sled writes a blob inside a log reservation, and its flush waits for every
        // reservation before the point it flushes: only after the flush is each blob the log
        // can point at complete, so the blobs are synced then, before the data file.
        self.db.flush()?;
        self.sync_blobs()?;
        self.data_file.sync_data().map_err(sled::Error::Io)
    }

    fn sync_blobs(&self) -> Result<(), sled::Error> {
        let mut synced = self.synced_blobs.lock();
        let mut present = HashMap::with_capacity(synced.len());
        let mut any_new = false;
        for entry in std::fs::read_dir(&self.blobs_dir)? {
            let entry = entry?;
            let size = match entry.metadata() {
                Ok(meta) => meta.len(),
                // Removed by sled's own cleanup since the listing: nothing to keep.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let name = entry.file_name();
            if synced.get(&name) != Some(&size) {
                match std::fs::File::open(entry.path()) {
                    Ok(file) => file.sync_data()?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e.into()),
                }
                any_new = true;
            }
            present.insert(name, size);
        }
        if any_new {
            std::fs::File::open(&self.blobs_dir)?.sync_all()?;
        }
        *synced = present;
        Ok(())
    }
}

impl SledEngine {
    /// See [`DurableFiles::make_durable`].
    pub(crate) fn make_durable(&self) -> Result<(), Error> {
        self.files.make_durable().map_err(sled_error)
    }
}

/// Takes the lock sled takes on its data file, if the file exists, for as long as the
/// returned file lives; `Locked` if a process holds it.
fn lock_if_present(path: &Path) -> Result<Option<std::fs::File>, Error> {
    let data = path.join("db");
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_at(&data)(e)),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Locked { path: path.into() }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_at(&data)(e)),
    }
}

/// Refuses a path that is a file, or a non-empty directory without a sled database in it,
/// except what an interrupted first open leaves (sled's `blobs/` and `conf`, no data file, no
/// marker): that open is finished.
fn check_path(path: &Path) -> Result<(), Error> {
    let not_a_store = |reason| Error::NotAStore {
        path: PathBuf::from(path),
        reason,
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at(path)(e)),
        Ok(meta) if !meta.is_dir() => Err(not_a_store("it is not a directory")),
        Ok(_) => {
            let has_db = path.join("db").is_file() && path.join("conf").is_file();
            if !has_db && path.join(SIDECAR).exists() {
                return Err(Error::Damaged {
                    path: path.into(),
                    reason: "its database files are missing",
                });
            }
            let only_sleds_first_files =
                std::fs::read_dir(path)
                    .map_err(io_at(path))?
                    .all(|entry| match entry {
                        Ok(e) => {
                            let name = e.file_name();
                            (name == "conf" && e.path().is_file())
                                || (name == "blobs"
                                    && std::fs::read_dir(e.path())
                                        .is_ok_and(|mut blobs| blobs.next().is_none()))
                        }
                        Err(_) => false,
                    });
            if has_db || only_sleds_first_files {
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
        _ => sled_error(e),
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
    let meta = db.open_tree(META_TREE).map_err(sled_error)?;
    let marker = meta.get(FORMAT_KEY).map_err(sled_error)?;
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
            meta.insert(FORMAT_KEY, marker).map_err(sled_error)?;
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
    bump_epoch(db, &meta, 0)?.ok_or_else(|| not_a_store("its epoch counter is corrupt"))
}

/// Increments the persisted epoch and flushes; `None` if the stored counter is corrupt.
/// Moves the epoch counter past `floor` and its current value (one compare-and-swap, so two
/// callers never get the same epoch) and makes it durable; `None` if the counter is corrupt.
fn bump_epoch(db: &sled::Db, meta: &sled::Tree, floor: u64) -> Result<Option<u64>, Error> {
    loop {
        let stored = meta.get(EPOCH_KEY).map_err(sled_error)?;
        let previous = match &stored {
            None => 0,
            Some(bytes) => match <[u8; 8]>::try_from(bytes.as_ref()) {
                Ok(bytes) => u64::from_le_bytes(bytes),
                Err(_) => return Ok(None),
            },
        };
        let epoch = previous.max(floor) + 1;
        let swapped = meta
            .compare_and_swap(EPOCH_KEY, stored, Some(&epoch.to_le_bytes()[..]))
            .map_err(sled_error)?;
        if swapped.is_ok() {
            db.flush().map_err(sled_error)?;
            return Ok(Some(epoch));
        }
    }
}

impl SledEngine {
    fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<bool, Error> {
        Ok(self
            .records
            .compare_and_swap(key, expected, new)
            .map_err(sled_error)?
            .is_ok())
    }

    fn steps_tree(&self, life: ClaimToken) -> &sled::Tree {
        match life == LEGACY_LIFE {
            true => &self.legacy_steps,
            false => &self.steps,
        }
    }
}

impl Engine for SledEngine {
    type Bytes = sled::IVec;

    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, Error> {
        self.records.get(key).map_err(sled_error)
    }

    fn records(&self) -> RecordIter<'_, sled::IVec> {
        Box::new(
            self.records
                .iter()
                .map(|kv| kv.map(|(k, v)| (k.to_vec(), v)).map_err(sled_error)),
        )
    }

    fn claim(&self, key: &[u8], expected: Option<&[u8]>, pending: Vec<u8>) -> Result<bool, Error> {
        self.compare_and_swap(key, expected, Some(pending))
    }

    fn finish(&self, held: &Held<'_>, record: Option<Vec<u8>>) -> Result<bool, Error> {
        self.compare_and_swap(held.key, Some(held.record), record)
    }

    fn write_step(&self, held: &Held<'_>, index: u32, step: Vec<u8>) -> Result<bool, Error> {
        // Written, then checked: a removal or takeover that came first is seen by the check;
        // one that comes after finds the step and removes it with the record.
        let tree = self.steps_tree(held.life);
        let k = step_key(held.key, held.life, index);
        tree.insert(&k, step).map_err(sled_error)?;
        if self.get(held.key)?.as_deref() != Some(held.record) {
            tree.remove(&k).map_err(sled_error)?;
            return Ok(false);
        }
        Ok(true)
    }

    fn flush(&self) -> Result<(), Error> {
        self.make_durable()
    }

    fn holder_live(&self, _key: &[u8], _claim: ClaimToken, running_here: bool) -> bool {
        running_here
    }

    fn size_on_disk(&self) -> Result<Option<u64>, Error> {
        Ok(Some(self.db.size_on_disk().map_err(sled_error)?))
    }

    fn fresh_epoch(&self, floor: u64) -> Result<u64, Error> {
        let meta = self.db.open_tree(META_TREE).map_err(sled_error)?;
        bump_epoch(&self.db, &meta, floor)?.ok_or_else(|| {
            Error::Storage(StorageError::new(
                std::io::Error::other("the store's epoch counter is corrupt"),
                None,
            ))
        })
    }

    fn index_expiry(&self, expires_ms: u64, key: &[u8]) -> Result<(), Error> {
        self.expiry
            .insert(expiry_key(expires_ms, key), &[])
            .map_err(sled_error)?;
        Ok(())
    }

    fn due_expiries(
        &self,
        now_ms: u64,
        after: Option<(u64, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let end = now_ms.saturating_add(1).to_be_bytes().to_vec();
        let from = match after {
            Some((time, _)) if time > now_ms => return Ok(Vec::new()),
            Some((time, key)) => Bound::Excluded(expiry_key(time, key)),
            None => Bound::Unbounded,
        };
        let mut due = Vec::with_capacity(limit.min(4096));
        for entry in self.expiry.range((from, Bound::Excluded(end))).take(limit) {
            let (k, _) = entry.map_err(sled_error)?;
            // Entries shorter than the 8-byte time prefix cannot come from index_expiry;
            // they are dropped rather than trusted.
            match k.split_first_chunk::<8>() {
                Some((time, key)) => due.push((u64::from_be_bytes(*time), key.to_vec())),
                None => {
                    self.expiry.remove(&k).map_err(sled_error)?;
                }
            }
        }
        Ok(due)
    }

    fn unindex_expiries(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), Error> {
        // One removal at a time: sled's `apply_batch` takes a database-wide write lock that
        // would stall every caller's read for the whole batch.
        for (expires_ms, key) in entries {
            self.expiry
                .remove(expiry_key(*expires_ms, key))
                .map_err(sled_error)?;
        }
        Ok(())
    }

    fn unindex_in_parallel(&self) -> bool {
        // Each removal is a tree write of its own (page copy, log reservation, merges of the
        // leaves it empties), costing as much as the record's removal, and sled's writes to
        // different trees run in parallel: a second thread halves a long pass (`--bin scale`).
        true
    }

    fn steps(&self, key: &[u8], life: ClaimToken) -> Result<Vec<(u32, sled::IVec)>, Error> {
        let prefix = steps_prefix(key, life);
        let mut steps = Vec::new();
        for kv in self.steps_tree(life).scan_prefix(&prefix) {
            let (k, v) = kv.map_err(sled_error)?;
            if let Some(index) = step_index(&prefix, &k) {
                steps.push((index, v));
            }
        }
        Ok(steps)
    }

    fn remove_record(
        &self,
        key: &[u8],
        expected: &[u8],
        steps_of: Option<ClaimToken>,
    ) -> Result<bool, Error> {
        let Some(life) = steps_of else {
            return Ok(self
                .records
                .compare_and_swap(key, Some(expected), None::<&[u8]>)
                .map_err(sled_error)?
                .is_ok());
        };
        let tree = self.steps_tree(life);
        let step_keys = tree
            .scan_prefix(steps_prefix(key, life))
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(sled_error)?;
        let removed = (&self.records, tree).transaction(|(records, steps)| {
            if records.get(key)?.as_deref() != Some(expected) {
                return Err(ConflictableTransactionError::Abort(()));
            }
            records.remove(key)?;
            for k in &step_keys {
                steps.remove(k)?;
            }
            Ok(())
        });
        match removed {
            Ok(()) => Ok(true),
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(sled_error(e)),
        }
    }

    fn import_record(
        &self,
        key: &[u8],
        record: &[u8],
        life: ClaimToken,
        steps: &[(u32, Vec<u8>)],
    ) -> Result<bool, Error> {
        let written = (&self.records, self.steps_tree(life)).transaction(|(records, tree)| {
            if records.get(key)?.is_some() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            records.insert(key, record)?;
            for (index, step) in steps {
                tree.insert(step_key(key, life, *index), step.as_slice())?;
            }
            Ok(())
        });
        match written {
            Ok(()) => Ok(true),
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(sled_error(e)),
        }
    }

    fn wait_durable(&self) -> Result<(), Error> {
        match &self.flush {
            Some(queue) => Ok(queue.wait_durable().map_err(sled_error)?),
            None => Ok(()),
        }
    }

    #[cfg(feature = "tokio")]
    fn wait_durable_async(
        &self,
    ) -> Option<impl std::future::Future<Output = Result<(), Error>> + Send + 'static> {
        let queue = self.flush.clone();
        Some(async move {
            match queue {
                Some(queue) => Ok(queue.wait_durable_async().await.map_err(sled_error)?),
                None => Ok(()),
            }
        })
    }
}
