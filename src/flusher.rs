//! Group commit: one thread makes writes durable for every caller waiting on it.
//!
//! Invariants: a caller takes a ticket *after* its write is applied, and the flusher starts a
//! flush only after receiving that ticket, so a flush that completes for ticket `t` covers
//! every write whose ticket is at most `t` (tickets come from one counter, so their order is
//! consistent with the order in which writers took them). Every ticket received before a flush
//! starts is answered by that flush: concurrent callers share one fsync. A failed flush fails
//! exactly the tickets it was meant to cover that no later flush covered. When the store shuts
//! down, the flusher answers what is queued, flushes once more and exits; a barrier after that
//! flushes on the caller's thread.

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::stats::Counters;

/// The caller-side handle: take a ticket, wait for a flush that covers it.
pub(crate) struct FlushQueue {
    db: sled::Db,
    requests: Sender<u64>,
    next_ticket: AtomicU64,
    progress: Arc<Progress>,
}

struct Progress {
    state: Mutex<FlushState>,
    changed: Condvar,
}

#[derive(Default)]
struct FlushState {
    /// Every write with a ticket at most this is durable.
    durable: u64,
    /// Tickets up to this (and above `durable`) were covered by a flush that failed.
    failed_through: u64,
    last_error: Option<sled::Error>,
    /// The flusher thread has exited.
    stopped: bool,
}

/// Owner of the flusher thread: dropping the shutdown sender stops it.
pub(crate) struct FlusherThread {
    shutdown: Option<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// Starts the flusher thread for `db`.
pub(crate) fn start(
    db: sled::Db,
    counters: Arc<Counters>,
) -> std::io::Result<(FlushQueue, FlusherThread)> {
    let (requests, request_rx) = crossbeam_channel::unbounded();
    let (shutdown, shutdown_rx) = crossbeam_channel::bounded(0);
    let progress = Arc::new(Progress {
        state: Mutex::new(FlushState::default()),
        changed: Condvar::new(),
    });
    let thread_db = db.clone();
    let thread_progress = Arc::clone(&progress);
    let handle = std::thread::Builder::new()
        .name("idemstore-flusher".into())
        .spawn(move || {
            run(
                &thread_db,
                &request_rx,
                &shutdown_rx,
                &thread_progress,
                &counters,
            )
        })?;
    Ok((
        FlushQueue {
            db,
            requests,
            next_ticket: AtomicU64::new(0),
            progress,
        },
        FlusherThread {
            shutdown: Some(shutdown),
            handle: Some(handle),
        },
    ))
}

impl FlushQueue {
    /// Returns once every write this thread applied before the call is durable.
    pub(crate) fn wait_durable(&self) -> Result<(), sled::Error> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::SeqCst) + 1;
        if self.requests.send(ticket).is_err() {
            return self.db.flush().map(|_| ());
        }
        let mut state = self.progress.state.lock();
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
            if state.stopped {
                drop(state);
                return self.db.flush().map(|_| ());
            }
            self.progress.changed.wait(&mut state);
        }
    }
}

fn run(
    db: &sled::Db,
    requests: &Receiver<u64>,
    shutdown: &Receiver<()>,
    progress: &Progress,
    counters: &Counters,
) {
    loop {
        let first = crossbeam_channel::select! {
            recv(requests) -> t => t.ok(),
            recv(shutdown) -> _ => None,
        };
        let Some(first) = first else { break };
        let target = requests.try_iter().fold(first, u64::max);
        let result = db.flush();
        counters.flush_batches.fetch_add(1, Ordering::Relaxed);
        let mut state = progress.state.lock();
        match result {
            Ok(_) => state.durable = state.durable.max(target),
            Err(e) => {
                tracing::error!(error = %e, "group commit flush failed");
                state.failed_through = state.failed_through.max(target);
                state.last_error = Some(e);
            }
        }
        drop(state);
        progress.changed.notify_all();
    }
    // Shutting down: answer whatever is still queued with one last flush.
    let target = requests.try_iter().fold(0, u64::max);
    let result = db.flush();
    let mut state = progress.state.lock();
    match result {
        Ok(_) => state.durable = state.durable.max(target),
        Err(e) => {
            state.failed_through = state.failed_through.max(target);
            state.last_error = Some(e);
        }
    }
    state.stopped = true;
    drop(state);
    progress.changed.notify_all();
}

impl Drop for FlusherThread {
    fn drop(&mut self) {
        drop(self.shutdown.take());
        if let Some(handle) = self.handle.take() {
            if handle.join().is_err() {
                tracing::error!("idemstore flusher thread panicked");
            }
        }
    }
}
