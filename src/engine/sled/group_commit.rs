//! Group commit: concurrent callers share each flush; no thread hand-off on the way.
//!
//! Invariants: a caller takes a ticket *after* its write is applied. The first caller that
//! finds no flush running becomes the leader: it reads the highest ticket handed out so far
//! (every write with a ticket up to it is applied, since tickets come from one atomic counter
//! taken after the write), flushes, and marks everything up to that ticket durable. Callers
//! that arrive during a flush wait on a condition variable and are covered by the next flush,
//! which one of them leads. So one flush answers every caller that was waiting when it
//! started, and a lone caller flushes on its own thread with no hand-off. A failed flush fails
//! exactly the tickets it was meant to cover that no later flush covered.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::DurableFiles;
use crate::stats::Counters;

/// The durability barrier for `Immediate` mode.
pub(crate) struct GroupCommit {
    files: Arc<DurableFiles>,
    next_ticket: AtomicU64,
    state: Mutex<FlushState>,
    flushed: Condvar,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct FlushState {
    /// Every write with a ticket at most this is durable.
    durable: u64,
    /// A caller is flushing now.
    flushing: bool,
    /// Tickets up to this (and above `durable`) were covered by a flush that failed.
    failed_through: u64,
    last_error: Option<sled::Error>,
}

impl GroupCommit {
    pub(crate) fn new(files: Arc<DurableFiles>, counters: Arc<Counters>) -> Self {
        Self {
            files,
            next_ticket: AtomicU64::new(0),
            state: Mutex::new(FlushState::default()),
            flushed: Condvar::new(),
            counters,
        }
    }

    /// Returns once every write this thread applied before the call is durable.
    pub(crate) fn wait_durable(&self) -> Result<(), sled::Error> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::SeqCst) + 1;
        let mut state = self.state.lock();
        loop {
            if state.durable >= ticket {
                return Ok(());
            }
            if state.failed_through >= ticket {
                return Err(state
                    .last_error
                    .clone()
                    .unwrap_or_else(|| sled::Error::ReportableBug("flush failed".into())));
            }
            if state.flushing {
                self.flushed.wait(&mut state);
                continue;
            }
            state.flushing = true;
            let result = parking_lot::MutexGuard::unlocked(&mut state, || {
                if self.next_ticket.load(Ordering::SeqCst) > ticket {
                    // Others are on their way: let them apply their writes and join this flush.
                    std::thread::yield_now();
                }
                let target = self.next_ticket.load(Ordering::SeqCst);
                (target, self.files.make_durable())
            });
            let (target, result) = (result.0, result.1);
            self.counters.flush_batches.add(1);
            state.flushing = false;
            match result {
                Ok(_) => state.durable = state.durable.max(target),
                Err(e) => {
                    tracing::error!(error = %e, "group commit flush failed");
                    state.failed_through = state.failed_through.max(target);
                    state.last_error = Some(e);
                }
            }
            self.flushed.notify_all();
        }
    }
}
