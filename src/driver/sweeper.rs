//! Removal of expired records through the time-ordered expiry index.
//!
//! Invariants: correctness never depends on sweeping (expired records already read as
//! absent); a pass reads only index entries that are due, so it costs O(entries due), not
//! O(records stored); a record is removed only through [`Engine::remove_record`] against
//! the exact bytes that were checked to be expired (with its life's steps, atomically), so a
//! record refreshed or re-claimed meanwhile survives; a record whose call is running in this
//! process, or whose holder elsewhere is live, is never removed (its index entry is kept, so a
//! later pass looks again). An engine that can sweep in batches itself (one statement per
//! batch, on a shared database) does, under the same rule. The
//! sweeper never takes a key's place in the registry, so no call ever waits for it: a replay
//! of a live record (even one with a stale index entry) is never delayed by a sweep. Entries
//! are processed in batches of [`BATCH`] and no lock is held across a batch.

use crossbeam_channel::{RecvTimeoutError, Sender};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::driver::state::StoreState;
use crate::engine::Engine;
use crate::error::Error;
use crate::format::record::{self, RecordState};
use crate::key::KeyHash;

const BATCH: usize = 512;

/// Removes every record expired at `now_ms`; returns how many it removed.
pub(crate) fn sweep<S: Engine>(shared: &StoreState<S>, now_ms: u64) -> Result<u64, Error> {
    let mut swept = 0;
    while let Some(batch) = shared.engine.sweep_batch(now_ms, BATCH) {
        let removed = batch?;
        swept += removed;
        if removed < BATCH as u64 {
            return Ok(counted(shared, swept));
        }
    }
    loop {
        let mut due = shared.engine.due_expiries(now_ms, BATCH)?;
        let fetched = due.len();
        // Visit records in key order: neighbours share the engine's tree pages.
        due.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        let mut kept = 0;
        let mut done = Vec::with_capacity(due.len());
        for (expires_ms, key) in due {
            match sweep_one(shared, &key, now_ms)? {
                Swept::Removed => swept += 1,
                Swept::Running => {
                    kept += 1;
                    continue;
                }
                Swept::Skipped => {}
            }
            done.push((expires_ms, key));
        }
        shared.engine.unindex_expiries(&done)?;
        // A full batch of entries kept for running calls would repeat forever: stop there.
        if fetched < BATCH || kept == fetched {
            break;
        }
    }
    Ok(counted(shared, swept))
}

fn counted<S>(shared: &StoreState<S>, swept: u64) -> u64 {
    shared
        .counters
        .records_swept
        .fetch_add(swept, Ordering::Relaxed);
    if swept > 0 {
        tracing::debug!(swept, "swept expired records");
    }
    swept
}

enum Swept {
    Removed,
    /// A call in this process is running the key: its entry stays for a later pass.
    Running,
    /// Nothing to remove: gone, live under a later expiry (a stale entry), or corrupt.
    Skipped,
}

/// Removes `key`'s record (and its steps) if it is expired at `now_ms` and not running.
///
/// A call that claims the key meanwhile changes its bytes, so the removal's compare-and-swap
/// fails; a call running it is in the registry before its claim and until its outcome is
/// durable, so checking the registry after reading the record sees it.
fn sweep_one<S: Engine>(shared: &StoreState<S>, key: &[u8], now_ms: u64) -> Result<Swept, Error> {
    let Some(bytes) = shared.engine.get(key)? else {
        return Ok(Swept::Skipped);
    };
    match record::decode(bytes.as_ref()) {
        Ok(rec) if rec.header.is_expired(now_ms) => {
            let running_here = shared.registry.running(key).is_some();
            let h = rec.header;
            if running_here
                || (h.state == RecordState::Pending
                    && shared.engine.holder_live(key, h.claim, false))
            {
                return Ok(Swept::Running);
            }
            let steps_of = rec.header.has_steps.then_some(rec.header.life);
            if shared.engine.remove_record(key, bytes.as_ref(), steps_of)? {
                Ok(Swept::Removed)
            } else {
                // Changed since the read (re-claimed): it has its own, later entry.
                Ok(Swept::Skipped)
            }
        }
        Ok(_) => Ok(Swept::Skipped),
        // Corrupt bytes are the operator's to inspect; the sweeper leaves them.
        Err(_) => {
            tracing::warn!(key = %KeyHash(key), "sweeper skipped a corrupt record");
            Ok(Swept::Skipped)
        }
    }
}

/// The background sweeper: stops and is joined when dropped.
pub(crate) struct SweeperThread {
    shutdown: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// Starts a thread that sweeps every `interval`.
pub(crate) fn start<S: Engine + 'static>(
    shared: Arc<StoreState<S>>,
    interval: Duration,
) -> std::io::Result<SweeperThread> {
    let (shutdown, stop) = crossbeam_channel::bounded::<()>(0);
    let handle = std::thread::Builder::new()
        .name("idemstore-sweeper".into())
        .spawn(move || {
            // A timeout is the signal to sweep; a message or disconnection, to stop.
            while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(interval) {
                if let Err(e) = sweep(&shared, shared.clock.now_millis()) {
                    tracing::warn!(error = %e, "sweep failed; will retry next interval");
                }
            }
        })?;
    Ok(SweeperThread {
        shutdown: Some(shutdown),
        handle: Some(handle),
    })
}

impl Drop for SweeperThread {
    fn drop(&mut self) {
        drop(self.shutdown.take());
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("idemstore sweeper thread panicked");
            }
        }
    }
}
