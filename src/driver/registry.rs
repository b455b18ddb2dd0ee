//! The in-process registry of running calls: who runs a key now, and how others wait for it.
//!
//! Invariants: at most one [`Leader`] exists per key at a time in this process; the entry is
//! inserted before its leader reads or claims the record (waiters that ask are woken once more
//! when its claim is written), and removed (waking every waiter) only when the leader is done
//! with the record (outcome written and, in `Immediate` mode,
//! durable), including when the leader unwinds from a panic. A leader may be detached from
//! the call that took it (a dropped async call's last work goes on in a task): it is then
//! released once that work is done. Because one process owns the
//! database, "this key has an entry" is exactly "a call in this process is running it".
//! Waiting blocks on a condition variable (an async waiter awaits a notification instead): no
//! spinning, no polling sleeps. Keys hash to one of
//! [`SHARDS`] maps, so different keys rarely share a lock and never wait on each other.
//!
//! `leaders` counts live leaders (incremented before the entry is inserted, decremented after
//! it is removed), so `running` can answer "none" without a lock when nothing runs: a reader
//! that saw a leader's write and then reads zero knows that leader has finished.

// Futures are returned as `impl Future + Send` on purpose: declared `Send` where every
// lifetime is concrete, they stay provably `Send` inside the callers' futures (an `async fn`'s
// would be re-proven there, which the compiler cannot do across its generic lifetimes).
#![allow(clippy::manual_async_fn)]

use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

const SHARDS: usize = 64;

/// Running keys of one shard.
type Shard = Mutex<HashMap<Box<[u8]>, Arc<RunningCall>>>;

/// The registry: one map of running keys per shard.
pub(crate) struct Registry {
    shards: Box<[Shard]>,
    leaders: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
}

/// One running call, as its waiters see it.
pub(crate) struct RunningCall {
    done: Mutex<bool>,
    /// The leader's claim is written (set under `done`'s lock, with the waiters woken), so a
    /// waiter that read the key before it can look again: the claim may refuse it at once.
    claimed: AtomicBool,
    finished: Condvar,
    /// The same wake-up, for async waiters.
    #[cfg(feature = "tokio")]
    finished_async: tokio::sync::Notify,
}

impl RunningCall {
    /// Whether the leader's claim is written.
    pub(crate) fn claimed(&self) -> bool {
        self.claimed.load(Ordering::SeqCst)
    }

    /// Blocks until the leader finishes (or, with `until_claimed`, has claimed) or `deadline`
    /// passes (None: no deadline); true unless the deadline passed.
    pub(crate) fn wait_until(&self, deadline: Option<Instant>, until_claimed: bool) -> bool {
        let mut done = self.done.lock();
        while !(*done || (until_claimed && self.claimed())) {
            match deadline {
                Some(deadline) => {
                    if self.finished.wait_until(&mut done, deadline).timed_out() {
                        return *done || (until_claimed && self.claimed());
                    }
                }
                None => self.finished.wait(&mut done),
            }
        }
        true
    }

    /// As [`RunningCall::wait_until`], without blocking a thread.
    #[cfg(feature = "tokio")]
    pub(crate) fn wait_until_async(
        &self,
        deadline: Option<Instant>,
        until_claimed: bool,
    ) -> impl std::future::Future<Output = bool> + Send + '_ {
        async move { self.wait_until_async_inner(deadline, until_claimed).await }
    }

    #[cfg(feature = "tokio")]
    async fn wait_until_async_inner(&self, deadline: Option<Instant>, until_claimed: bool) -> bool {
        let finished = async {
            loop {
                let notified = self.finished_async.notified();
                tokio::pin!(notified);
                // Registered before looking, so a wake-up in between is not lost.
                notified.as_mut().enable();
                if *self.done.lock() || (until_claimed && self.claimed()) {
                    return;
                }
                notified.await;
            }
        };
        match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), finished)
                .await
                .is_ok(),
            None => {
                finished.await;
                true
            }
        }
    }
}

/// The result of entering the registry for a key.
pub(crate) enum Entry<'r> {
    /// This call now runs the key; dropping the guard releases it and wakes waiters.
    Leader(Leader<'r>),
    /// Another call runs the key; wait on it, then look again.
    Follower(Arc<RunningCall>),
}

/// Proof of leadership for one key.
pub(crate) struct Leader<'r> {
    registry: &'r Registry,
    /// Invariant: `Some` until the leader is dropped or detached.
    lead: Option<Lead>,
}

/// A leadership that owns what keeps its registry alive instead of borrowing it, so it can
/// outlive the call that took it (a dropped async call's last work finishes in a task):
/// dropping it releases the key as dropping the [`Leader`] would have.
#[cfg(feature = "tokio")]
pub(crate) struct DetachedLeader<O: AsRef<Registry>> {
    owner: Arc<O>,
    /// Invariant: `Some` until dropped.
    lead: Option<Lead>,
}

/// The key a leader runs and its flight.
struct Lead {
    key: Box<[u8]>,
    flight: Arc<RunningCall>,
}

impl Lead {
    /// Removes the key's entry from `registry` and wakes every waiter.
    fn release(self, registry: &Registry) {
        registry.shard(&self.key).lock().remove(&self.key);
        registry.leaders.fetch_sub(1, Ordering::SeqCst);
        *self.flight.done.lock() = true;
        self.flight.finished.notify_all();
        #[cfg(feature = "tokio")]
        self.flight.finished_async.notify_waiters();
    }
}

impl Registry {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            leaders: AtomicUsize::new(0),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn shard(&self, key: &[u8]) -> &Shard {
        let mut h = self.hasher.build_hasher();
        h.write(key);
        // Invariant: the modulus keeps the index below SHARDS = shards.len().
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// Becomes the key's leader, or returns the running flight to wait on.
    pub(crate) fn enter(&self, key: &[u8]) -> Entry<'_> {
        let mut map = self.shard(key).lock();
        if let Some(flight) = map.get(key) {
            return Entry::Follower(Arc::clone(flight));
        }
        let flight = Arc::new(RunningCall {
            done: Mutex::new(false),
            claimed: AtomicBool::new(false),
            finished: Condvar::new(),
            #[cfg(feature = "tokio")]
            finished_async: tokio::sync::Notify::new(),
        });
        self.leaders.fetch_add(1, Ordering::SeqCst);
        map.insert(key.into(), Arc::clone(&flight));
        Entry::Leader(Leader {
            registry: self,
            lead: Some(Lead {
                key: key.into(),
                flight,
            }),
        })
    }

    /// The flight running `key`, if any.
    pub(crate) fn running(&self, key: &[u8]) -> Option<Arc<RunningCall>> {
        if self.leaders.load(Ordering::SeqCst) == 0 {
            return None;
        }
        self.shard(key).lock().get(key).cloned()
    }
}

impl Leader<'_> {
    /// The leader's claim is written: wakes the waiters that asked to look again then.
    pub(crate) fn claimed(&self) {
        let Some(lead) = &self.lead else { return };
        let _done = lead.flight.done.lock();
        lead.flight.claimed.store(true, Ordering::SeqCst);
        lead.flight.finished.notify_all();
        #[cfg(feature = "tokio")]
        lead.flight.finished_async.notify_waiters();
    }

    /// This leadership, kept by `owner`, which must hold this leader's registry (it is
    /// released there).
    #[cfg(feature = "tokio")]
    pub(crate) fn detach<O: AsRef<Registry>>(mut self, owner: Arc<O>) -> DetachedLeader<O> {
        debug_assert!(
            std::ptr::eq((*owner).as_ref(), self.registry),
            "a leader is released in its own registry"
        );
        DetachedLeader {
            owner,
            lead: self.lead.take(),
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if let Some(lead) = self.lead.take() {
            lead.release(self.registry);
        }
    }
}

#[cfg(feature = "tokio")]
impl<O: AsRef<Registry>> Drop for DetachedLeader<O> {
    fn drop(&mut self) {
        if let Some(lead) = self.lead.take() {
            lead.release((*self.owner).as_ref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_leader_per_key_and_release_wakes_waiters() {
        let reg = Registry::new();
        let leader = match reg.enter(b"k") {
            Entry::Leader(l) => l,
            Entry::Follower(_) => panic!("first entry must lead"),
        };
        assert!(matches!(reg.enter(b"other"), Entry::Leader(_)));
        let flight = match reg.enter(b"k") {
            Entry::Follower(f) => f,
            Entry::Leader(_) => panic!("second entry must follow"),
        };
        assert!(!flight.wait_until(Some(Instant::now() + Duration::from_millis(1)), false));
        std::thread::scope(|s| {
            let waiter = s.spawn(|| flight.wait_until(None, false));
            drop(leader);
            assert!(waiter.join().unwrap());
        });
        assert!(reg.running(b"k").is_none());
    }
}
