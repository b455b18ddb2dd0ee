//! Removal of expired records through the time-ordered expiry index.
//!
//! Invariants: correctness never depends on sweeping (expired records already read as
//! absent); a pass reads only index entries that are due, so it costs O(entries due), not
//! O(records stored), and it walks them once, in index order, from a cursor (an entry it
//! keeps is not read again in the same pass); a record is removed only through
//! [`Engine::remove_record`] against the exact bytes that were checked to be expired (with its
//! life's steps, atomically), so a record refreshed or re-claimed meanwhile survives; a record
//! whose call is running in this process, or whose holder elsewhere is live, is never removed
//! (its index entry is kept, so a later pass looks again); an index entry is removed only after
//! its record was removed or found gone, live or corrupt. An engine that can sweep in batches
//! itself (one statement per batch, on a shared database) does, under the same rule. The
//! sweeper never takes a key's place in the registry, so no call ever waits for it: a replay
//! of a live record (even one with a stale index entry) is never delayed by a sweep. Entries
//! are processed in batches of [`BATCH`] and no lock is held across a batch. Where the engine
//! asks for it ([`Engine::unindex_in_parallel`]), a pass with more than one batch removes the
//! index entries of handled batches on a second thread, which only ever receives batches whose
//! records are already handled, and ends with the pass.

use crossbeam_channel::{RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::driver::state::StoreState;
use crate::engine::Engine;
use crate::error::Error;
use crate::format::record;
use crate::key::KeyHash;

const BATCH: usize = 512;

/// Index entries handled but not yet unindexed that the walk may run ahead by, in batches.
const UNINDEX_QUEUE: usize = 2;

/// A batch of index entries whose records are handled: (expires_ms, key).
type Handled = Vec<(u64, Vec<u8>)>;

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
    let mut walk = Walk {
        now_ms,
        after: None,
        swept: 0,
    };
    // A pass with one batch or less (the usual one) stays on this thread.
    let first = walk.batch(shared)?;
    if first.full && shared.engine.unindex_in_parallel() {
        unindexing_beside(shared, &mut walk, first.handled)?;
    } else {
        shared.engine.unindex_expiries(&first.handled)?;
        if first.full {
            while walk.next(shared, |handled| shared.engine.unindex_expiries(&handled))? {}
        }
    }
    Ok(counted(shared, swept + walk.swept))
}

/// Finishes a pass whose index entries a second thread removes, batch by batch, while this
/// one handles the records of the next batches. Falls back to this thread if none can start.
fn unindexing_beside<S: Engine>(
    shared: &StoreState<S>,
    walk: &mut Walk,
    first: Handled,
) -> Result<(), Error> {
    std::thread::scope(|scope| {
        let (queue, handled) = crossbeam_channel::bounded::<Handled>(UNINDEX_QUEUE);
        let spawned = std::thread::Builder::new()
            .name("idemstore-unindex".into())
            .spawn_scoped(scope, move || -> Result<(), Error> {
                for batch in handled {
                    shared.engine.unindex_expiries(&batch)?;
                }
                Ok(())
            });
        let helper = match spawned {
            Ok(helper) => helper,
            Err(e) => {
                tracing::debug!(error = %e, "sweeping without an unindexing thread");
                shared.engine.unindex_expiries(&first)?;
                while walk.next(shared, |handled| shared.engine.unindex_expiries(&handled))? {}
                return Ok(());
            }
        };
        // A send fails only once the helper has stopped on an error, which its join returns.
        let mut helper_stopped = queue.send(first).is_err();
        let walked = loop {
            if helper_stopped {
                break Ok(());
            }
            match walk.next(shared, |handled| {
                helper_stopped = queue.send(handled).is_err();
                Ok(())
            }) {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        drop(queue);
        let unindexed = match helper.join() {
            Ok(unindexed) => unindexed,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        walked.and(unindexed)
    })
}

/// One pass over the due index entries, in index order, from a cursor.
struct Walk {
    now_ms: u64,
    /// The last entry read, in index order: the next batch starts after it.
    after: Option<(u64, Vec<u8>)>,
    swept: u64,
}

struct Batch {
    /// Entries whose records are handled: their index entries can go.
    handled: Handled,
    /// The batch was full: more entries may be due.
    full: bool,
}

impl Walk {
    /// Handles the next batch's records.
    fn batch<S: Engine>(&mut self, shared: &StoreState<S>) -> Result<Batch, Error> {
        let after = self.after.as_ref().map(|(t, k)| (*t, k.as_slice()));
        let mut due = shared.engine.due_expiries(self.now_ms, after, BATCH)?;
        let full = due.len() >= BATCH;
        self.after = due.last().cloned();
        // Visit records in key order: neighbours share the engine's tree pages.
        due.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        let mut handled = Vec::with_capacity(due.len());
        for (expires_ms, key) in due {
            match sweep_one(shared, &key, self.now_ms)? {
                Swept::Removed => self.swept += 1,
                Swept::Running => continue,
                Swept::Skipped => {}
            }
            handled.push((expires_ms, key));
        }
        Ok(Batch { handled, full })
    }

    /// Handles the next batch and gives its handled entries to `unindex`; whether more
    /// entries may be due.
    fn next<S: Engine>(
        &mut self,
        shared: &StoreState<S>,
        unindex: impl FnOnce(Handled) -> Result<(), Error>,
    ) -> Result<bool, Error> {
        let batch = self.batch(shared)?;
        unindex(batch.handled)?;
        Ok(batch.full)
    }
}

fn counted<S>(shared: &StoreState<S>, swept: u64) -> u64 {
    shared.counters.records_swept.add(swept);
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
            if shared.call_still_runs(key, &rec.header) {
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

#[cfg(test)]
mod tests {
    use crate::engine::Engine;
    use crate::{Durability, ManualClock, Store};
    use std::time::Duration;

    // A pass of several batches on sled unindexes on a second thread: every entry of what it
    // removed goes, the entries of the records it keeps stay.
    #[test]
    fn a_pass_of_many_batches_leaves_only_the_entries_of_live_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let clock = ManualClock::new(1_780_000_000_000);
        let store = Store::builder(dir.path().join("db"))
            .clock(clock.clone())
            .durability(Durability::Periodic(Duration::from_secs(1)))
            .sweep_interval(None)
            .open()
            .expect("open");
        const N: u64 = 1300; // over two batches
        for i in 0..N {
            let ttl = match i % 10 {
                0 => Duration::from_secs(3600),
                _ => Duration::from_secs(1),
            };
            let key = format!("k-{i:05}");
            let call = store.call(&key).ttl(ttl);
            call.run(|| Ok::<_, std::io::Error>(i)).expect("run");
        }
        assert!(store.shared().engine.unindex_in_parallel());
        assert_eq!(store.shared().engine.expiry.len() as u64, N);
        clock.advance(Duration::from_secs(10));
        assert_eq!(store.sweep_now().expect("sweep"), N - N / 10);
        assert_eq!(store.shared().engine.expiry.len() as u64, N / 10);
        assert_eq!(store.sweep_now().expect("sweep"), 0);
    }
}
