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
//!
//! Async callers ([`GroupCommit::wait_durable_async`]) follow the same rules in the same
//! state, without holding a runtime's thread: one that finds a flush running, or its ticket
//! already asked of the store's flusher thread (`asked`), awaits a notification; otherwise it
//! asks the flusher thread for its ticket. That thread, one per store, started on the first
//! async wait, makes the blocking wait above for the highest ticket asked (leading a flush if
//! none runs). So an async call never depends on any runtime's blocking pool, and only a
//! running thread ever marks a flush running: a blocking caller is never held up by an async
//! one. The thread holds the group commit weakly and ends when it goes. If it cannot be
//! started, a caller makes the blocking wait for its own ticket on the blocking pool, and asks
//! nothing that others would wait on; the next caller tries to start the thread again.

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
#[cfg(feature = "tokio")]
use std::sync::Weak;

use super::DurableFiles;
use crate::stats::Counters;

/// What a flush makes durable: sled's files ([`DurableFiles`]), or a stand-in in tests.
pub(crate) trait MakeDurable: Send + Sync {
    /// Makes every write applied so far durable.
    fn make_durable(&self) -> Result<(), sled::Error>;
}

impl MakeDurable for DurableFiles {
    fn make_durable(&self) -> Result<(), sled::Error> {
        DurableFiles::make_durable(self)
    }
}

/// The durability barrier for `Immediate` mode.
pub(crate) struct GroupCommit {
    files: Arc<dyn MakeDurable>,
    next_ticket: AtomicU64,
    state: Mutex<FlushState>,
    flushed: Condvar,
    /// Async callers' wake-up: a flush ended.
    #[cfg(feature = "tokio")]
    changed: tokio::sync::Notify,
    /// The flusher thread's requests (tickets to make durable), once it is started.
    #[cfg(feature = "tokio")]
    flusher: Mutex<Option<crossbeam_channel::Sender<u64>>>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct FlushState {
    /// Every write with a ticket at most this is durable.
    durable: u64,
    /// A caller is flushing now.
    flushing: bool,
    /// The highest ticket asked of the flusher thread: it will be settled without another ask.
    #[cfg(feature = "tokio")]
    asked: u64,
    /// Tickets up to this (and above `durable`) were covered by a flush that failed.
    failed_through: u64,
    last_error: Option<sled::Error>,
}

impl FlushState {
    /// The outcome for `ticket` once a flush has covered it.
    fn settled(&self, ticket: u64) -> Option<Result<(), sled::Error>> {
        if self.durable >= ticket {
            return Some(Ok(()));
        }
        (self.failed_through >= ticket).then(|| {
            Err(self
                .last_error
                .clone()
                .unwrap_or_else(|| sled::Error::ReportableBug("flush failed".into())))
        })
    }
}

impl GroupCommit {
    pub(crate) fn new(files: Arc<dyn MakeDurable>, counters: Arc<Counters>) -> Self {
        Self {
            files,
            next_ticket: AtomicU64::new(0),
            state: Mutex::new(FlushState::default()),
            flushed: Condvar::new(),
            #[cfg(feature = "tokio")]
            changed: tokio::sync::Notify::new(),
            #[cfg(feature = "tokio")]
            flusher: Mutex::new(None),
            counters,
        }
    }

    /// Returns once every write this thread applied before the call is durable.
    pub(crate) fn wait_durable(&self) -> Result<(), sled::Error> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::SeqCst) + 1;
        self.wait_for(ticket, self.state.lock())
    }

    /// Blocks until `ticket` is settled, leading a flush when none is running.
    fn wait_for(
        &self,
        ticket: u64,
        mut state: MutexGuard<'_, FlushState>,
    ) -> Result<(), sled::Error> {
        loop {
            if let Some(settled) = state.settled(ticket) {
                return settled;
            }
            if state.flushing {
                self.flushed.wait(&mut state);
                continue;
            }
            state.flushing = true;
            let (target, result) = MutexGuard::unlocked(&mut state, || {
                if self.next_ticket.load(Ordering::SeqCst) > ticket {
                    // Others are on their way: let them apply their writes and join this flush.
                    std::thread::yield_now();
                }
                let target = self.next_ticket.load(Ordering::SeqCst);
                (target, self.files.make_durable())
            });
            self.counters.flush_batches.add(1);
            state.flushing = false;
            match result {
                Ok(()) => state.durable = state.durable.max(target),
                Err(e) => {
                    tracing::error!(error = %e, "group commit flush failed");
                    state.failed_through = state.failed_through.max(target);
                    state.last_error = Some(e);
                }
            }
            self.flushed.notify_all();
            #[cfg(feature = "tokio")]
            self.changed.notify_waiters();
        }
    }

    /// As [`GroupCommit::wait_durable`], for a caller on a tokio runtime: it awaits a flush
    /// another caller runs, or the one it asks of the store's flusher thread.
    #[cfg(feature = "tokio")]
    pub(crate) async fn wait_durable_async(self: Arc<Self>) -> Result<(), sled::Error> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::SeqCst) + 1;
        loop {
            let Some(flusher) = self.flusher() else {
                // No flusher thread: this caller waits on the blocking pool, and nobody waits
                // on it.
                let commit = Arc::clone(&self);
                return tokio::task::spawn_blocking(move || {
                    commit.wait_for(ticket, commit.state.lock())
                })
                .await
                .unwrap_or_else(|e| {
                    Err(sled::Error::ReportableBug(format!(
                        "the durability wait did not finish: {e}"
                    )))
                });
            };
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a flush that ends in between is not missed.
            changed.as_mut().enable();
            let ask = {
                let mut state = self.state.lock();
                if let Some(settled) = state.settled(ticket) {
                    return settled;
                }
                let ask = !state.flushing && state.asked < ticket;
                if ask {
                    state.asked = ticket;
                }
                ask
            };
            if ask && flusher.send(ticket).is_err() {
                // The thread is gone (its receiver ends only with it: the group commit, which
                // this caller holds, keeps a sender). Nothing will answer what was asked of it:
                // forget the asks, and let every waiter look again; the next look starts a new
                // thread.
                *self.flusher.lock() = None;
                self.state.lock().asked = 0;
                self.changed.notify_waiters();
                continue;
            }
            changed.await;
        }
    }

    /// The flusher thread's requests, starting the thread if it is not running; `None` if it
    /// cannot be started (tried again by the next caller).
    #[cfg(feature = "tokio")]
    fn flusher(self: &Arc<Self>) -> Option<crossbeam_channel::Sender<u64>> {
        let mut flusher = self.flusher.lock();
        if flusher.is_none() {
            let (asks, asked) = crossbeam_channel::unbounded::<u64>();
            let commit = Arc::downgrade(self);
            match std::thread::Builder::new()
                .name("idemstore-flusher".into())
                .spawn(move || flush_when_asked(&commit, &asked))
            {
                Ok(_) => *flusher = Some(asks),
                Err(e) => {
                    tracing::warn!(error = %e, "no flusher thread; this durability point waits on the blocking pool");
                }
            }
        }
        flusher.clone()
    }
}

/// The flusher thread: for each ask (and those queued behind it), the blocking wait for the
/// highest ticket asked. Ends when the group commit is gone (its sender with it).
#[cfg(feature = "tokio")]
fn flush_when_asked(commit: &Weak<GroupCommit>, asked: &crossbeam_channel::Receiver<u64>) {
    while let Ok(mut ticket) = asked.recv() {
        while let Ok(more) = asked.try_recv() {
            ticket = ticket.max(more);
        }
        let Some(commit) = commit.upgrade() else {
            return;
        };
        // The outcome reaches its callers through the state they watch.
        let _ = commit.wait_for(ticket, commit.state.lock());
        // A ticket settled by a flush that ended before this wait ran has woken its callers
        // already; wake them again all the same (a spurious wake-up only makes them look).
        commit.changed.notify_waiters();
    }
}

#[cfg(all(test, feature = "tokio"))]
mod tests {
    //! The group commit's rules with a stand-in for sled's files whose flushes wait for a
    //! gate: no caller, blocking or async, is answered before a flush that began after its
    //! ticket has ended; a failed flush fails the callers it covered, and a later one succeeds.

    use super::*;
    use std::time::Duration;

    /// Flushes that wait while the gate is shut; counts the flushes begun and ended.
    #[derive(Default)]
    struct Gated {
        gate: Mutex<GateState>,
        opened: Condvar,
    }

    #[derive(Default)]
    struct GateState {
        shut: bool,
        begun: u32,
        ended: u32,
        fail_next: bool,
    }

    impl Gated {
        fn set(&self, shut: bool) {
            self.gate.lock().shut = shut;
            self.opened.notify_all();
        }
        fn begun(&self) -> u32 {
            self.gate.lock().begun
        }
        fn ended(&self) -> u32 {
            self.gate.lock().ended
        }
    }

    impl MakeDurable for Gated {
        fn make_durable(&self) -> Result<(), sled::Error> {
            let mut gate = self.gate.lock();
            gate.begun += 1;
            while gate.shut {
                self.opened.wait(&mut gate);
            }
            gate.ended += 1;
            match std::mem::take(&mut gate.fail_next) {
                true => Err(sled::Error::Io(std::io::Error::other("flush failed"))),
                false => Ok(()),
            }
        }
    }

    fn commit() -> (Arc<GroupCommit>, Arc<Gated>) {
        let gated = Arc::new(Gated::default());
        let files: Arc<dyn MakeDurable> = Arc::clone(&gated) as Arc<dyn MakeDurable>;
        (
            Arc::new(GroupCommit::new(files, Arc::new(Counters::default()))),
            gated,
        )
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Polls until `done` or about 20 s have passed (a bug shows as a failure, not a hang).
    fn until(mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..20_000 {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn async_and_blocking_callers_are_answered_only_after_a_flush_that_covers_them() {
        let (commit, gated) = commit();
        gated.set(true);
        let rt = runtime();
        let mut waits: Vec<_> = (0..4)
            .map(|_| rt.spawn(Arc::clone(&commit).wait_durable_async()))
            .collect();
        let blocking = {
            let commit = Arc::clone(&commit);
            std::thread::spawn(move || commit.wait_durable())
        };
        rt.block_on(async {
            // The async callers asked the flusher thread; its flush has begun, and waits.
            for _ in 0..20_000 {
                if gated.begun() >= 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(gated.begun() >= 1, "no flush began for the async callers");
            // Callers that arrive while that flush runs are not covered by it.
            for _ in 0..2 {
                waits.push(tokio::spawn(Arc::clone(&commit).wait_durable_async()));
            }
            for _ in 0..50 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert!(
                waits.iter().all(|w| !w.is_finished()),
                "an async caller was answered before its flush ended"
            );
        });
        assert!(
            !blocking.is_finished(),
            "a blocking caller was answered early"
        );
        gated.set(false);
        rt.block_on(async {
            for w in waits {
                w.await.expect("task").expect("durable");
            }
        });
        blocking.join().expect("thread").expect("durable");
        assert!(gated.ended() >= 1);
        // Later callers, with the gate open, are answered by flushes of their own.
        let ended = gated.ended();
        rt.block_on(Arc::clone(&commit).wait_durable_async())
            .expect("durable");
        assert!(
            gated.ended() > ended,
            "a later caller was answered without a flush"
        );
    }

    #[test]
    fn a_failed_flush_fails_the_callers_it_covered_and_a_later_flush_succeeds() {
        let (commit, gated) = commit();
        gated.set(true);
        gated.gate.lock().fail_next = true;
        let rt = runtime();
        let first = rt.spawn(Arc::clone(&commit).wait_durable_async());
        rt.block_on(async {
            for _ in 0..20_000 {
                if gated.begun() >= 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        assert!(gated.begun() >= 1, "no flush began");
        gated.set(false);
        let failed = rt.block_on(first).expect("task");
        assert!(
            failed.is_err(),
            "a caller covered by a failed flush was told it is durable"
        );
        rt.block_on(Arc::clone(&commit).wait_durable_async())
            .expect("a later flush succeeds");
        commit.wait_durable().expect("and a blocking one");
    }

    #[test]
    fn the_flusher_thread_lets_the_group_commit_go() {
        let (commit, gated) = commit();
        let rt = runtime();
        rt.block_on(Arc::clone(&commit).wait_durable_async())
            .expect("durable");
        let weak = Arc::downgrade(&commit);
        drop(commit);
        assert!(
            until(|| weak.upgrade().is_none()),
            "the flusher thread kept the group commit alive"
        );
        drop(gated);
    }
}
