//! An in-memory engine that injects faults: the test engine, never a user default.
//!
//! Invariants:
//! - every write applies to the live tables at once and becomes durable at the next barrier
//!   (in `Immediate` mode; in `Periodic` mode only at `Store::flush` and close);
//! - [`MemoryEngine::crash`] is a power loss: every write since the last durable point is
//!   lost, and every later operation fails until a store is opened on the engine again;
//! - a planned fault fails exactly one operation — the `n`-th write or barrier from when it
//!   was planned — with a typed storage error (an I/O error), as a full disk would; the
//!   engine goes on working afterwards;
//! - one write is one atomic change (a compare-and-swap, a fenced step, a removal of a record
//!   with its steps), so a crash never splits one;
//! - like sled, one process owns it: a claim is live exactly when a call of its store runs it;
//! - while a [`BarrierStall`] lives, every barrier waits before it starts (a disk that stops
//!   answering its syncs); none fails for it, and each goes on once the last stall is dropped.

use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Arc;

use crate::engine::keys::{expiry_key, step_index, step_key, steps_prefix};
use crate::engine::{Engine, Held, RecordIter};
use crate::error::{Error, StorageError};
use crate::format::record::ClaimToken;

/// An in-memory engine for tests: faults on demand, and crashes that lose unsynced writes.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use idemstore::{MemoryEngine, Store};
/// let engine = MemoryEngine::new();
/// let store = engine.open(Store::builder("memory"))?;
/// store.execute_once("k", || Ok::<_, std::io::Error>(1u32))?;
/// engine.fail_nth_write(1); // the next write fails, as on a full disk
/// assert!(store.execute_once("k2", || Ok::<_, std::io::Error>(2u32)).is_err());
/// engine.crash(); // a power loss: unsynced writes are gone
/// drop(store);
/// let store = engine.open(Store::builder("memory"))?;
/// assert_eq!(*store.execute_once("k", || Ok::<_, std::io::Error>(9u32))?, 1);
/// # Ok(()) }
/// ```
#[derive(Clone, Default)]
pub struct MemoryEngine {
    state: Arc<Mutex<State>>,
    stall: Arc<Stall>,
    /// Set for the engine a store holds: barriers sync (`Immediate`) or not (`Periodic`).
    immediate: bool,
}

impl std::fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock();
        f.debug_struct("MemoryEngine")
            .field("records", &state.live.records.len())
            .field("writes", &state.writes)
            .field("barriers", &state.barriers)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    live: Tables,
    durable: Tables,
    epoch: u64,
    writes: u64,
    barriers: u64,
    fail_write_at: Option<u64>,
    fail_barrier_at: Option<u64>,
    /// The planned fault crashes the engine instead of failing one operation.
    crash_at_fault: bool,
    /// Crashed and not reopened: every operation fails.
    down: bool,
}

#[derive(Clone, Default)]
struct Tables {
    records: BTreeMap<Vec<u8>, Vec<u8>>,
    expiry: BTreeSet<Vec<u8>>,
    steps: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Barriers wait here while a [`BarrierStall`] lives.
#[derive(Default)]
struct Stall {
    gate: Mutex<Gate>,
    freed: Condvar,
}

#[derive(Default)]
struct Gate {
    /// Live stalls.
    stalls: usize,
    /// Barriers waiting for the last stall to go.
    waiting: usize,
}

impl Stall {
    fn wait_until_free(&self) {
        let mut gate = self.gate.lock();
        if gate.stalls == 0 {
            return;
        }
        gate.waiting += 1;
        while gate.stalls > 0 {
            self.freed.wait(&mut gate);
        }
        gate.waiting -= 1;
    }
}

/// Barriers of a [`MemoryEngine`] wait while this lives (see
/// [`MemoryEngine::stall_barriers`]); dropping the last one lets them go on.
#[must_use = "barriers wait only while the stall lives"]
pub struct BarrierStall {
    stall: Arc<Stall>,
}

impl std::fmt::Debug for BarrierStall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarrierStall").finish_non_exhaustive()
    }
}

impl Drop for BarrierStall {
    fn drop(&mut self) {
        let mut gate = self.stall.gate.lock();
        gate.stalls -= 1;
        if gate.stalls == 0 {
            self.stall.freed.notify_all();
        }
    }
}

fn fault(what: &str) -> Error {
    let io = std::io::Error::other(format!("injected fault: {what}"));
    Error::Storage(StorageError::new(io, Some(std::io::ErrorKind::Other)))
}

impl MemoryEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    /// This engine as a store opening it sees it, after a process start: a crashed engine
    /// comes back with what was durable, and the epoch grows. Returns the handle the store
    /// holds (its barriers sync in `Immediate` mode only) and the new epoch.
    pub(crate) fn start(&self, immediate: bool) -> (MemoryEngine, u64) {
        let epoch = {
            let mut state = self.state.lock();
            if state.down {
                state.live = state.durable.clone();
                state.down = false;
            }
            state.epoch += 1;
            state.epoch
        };
        let engine = MemoryEngine {
            state: Arc::clone(&self.state),
            stall: Arc::clone(&self.stall),
            immediate,
        };
        (engine, epoch)
    }

    /// A power loss: drops every write since the last durable point; every operation fails
    /// until a store is opened on the engine again.
    pub fn crash(&self) {
        let mut state = self.state.lock();
        state.live = state.durable.clone();
        state.down = true;
    }

    /// Makes the `n`-th write from now (1: the next) fail once.
    pub fn fail_nth_write(&self, n: u64) {
        self.plan(Some(n), None, false);
    }

    /// Makes the `n`-th barrier from now (1: the next) fail once.
    pub fn fail_nth_barrier(&self, n: u64) {
        self.plan(None, Some(n), false);
    }

    /// A power loss just before the `n`-th write from now: it never happens, nor does any
    /// write since the last durable point, and every later operation fails until reopen.
    pub fn crash_at_nth_write(&self, n: u64) {
        self.plan(Some(n), None, true);
    }

    /// A power loss during the `n`-th barrier from now: what it would have made durable is lost.
    pub fn crash_at_nth_barrier(&self, n: u64) {
        self.plan(None, Some(n), true);
    }

    fn plan(&self, write: Option<u64>, barrier: Option<u64>, crash: bool) {
        let mut state = self.state.lock();
        state.fail_write_at = write.map(|n| state.writes + n.max(1));
        state.fail_barrier_at = barrier.map(|n| state.barriers + n.max(1));
        state.crash_at_fault = crash;
    }

    /// Writes made so far (each compare-and-swap, step, removal or index change is one).
    pub fn writes(&self) -> u64 {
        self.state.lock().writes
    }

    /// Barriers made so far.
    pub fn barriers(&self) -> u64 {
        self.state.lock().barriers
    }

    /// Makes every barrier wait, before it starts, until the returned stall (and every other)
    /// is dropped: a disk that stops answering its syncs. For tests of what waits on a
    /// durability point, and of what must not.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use idemstore::{MemoryEngine, Store};
    /// let engine = MemoryEngine::new();
    /// let store = engine.open(Store::builder("memory"))?;
    /// let stall = engine.stall_barriers();
    /// std::thread::scope(|s| {
    ///     let call = s.spawn(|| store.execute_once("k", || Ok::<_, std::io::Error>(1u32)));
    ///     while engine.stalled_barriers() == 0 {
    ///         std::thread::yield_now(); // the call waits for its outcome's barrier
    ///     }
    ///     drop(stall);
    ///     assert_eq!(*call.join().unwrap().unwrap(), 1);
    /// });
    /// # Ok(()) }
    /// ```
    pub fn stall_barriers(&self) -> BarrierStall {
        self.stall.gate.lock().stalls += 1;
        BarrierStall {
            stall: Arc::clone(&self.stall),
        }
    }

    /// Barriers waiting on a stall now.
    pub fn stalled_barriers(&self) -> usize {
        self.stall.gate.lock().waiting
    }

    fn read<R>(&self, f: impl FnOnce(&Tables) -> R) -> Result<R, Error> {
        let state = self.state.lock();
        match state.down {
            true => Err(fault("the engine crashed")),
            false => Ok(f(&state.live)),
        }
    }

    fn write<R>(&self, f: impl FnOnce(&mut Tables) -> R) -> Result<R, Error> {
        let mut state = self.state.lock();
        if state.down {
            return Err(fault("the engine crashed"));
        }
        state.writes += 1;
        if state.fail_write_at == Some(state.writes) {
            state.fail_write_at = None;
            return Err(state.fault_hit("write failed"));
        }
        Ok(f(&mut state.live))
    }

    fn sync(&self) -> Result<(), Error> {
        self.stall.wait_until_free();
        let mut state = self.state.lock();
        if state.down {
            return Err(fault("the engine crashed"));
        }
        state.barriers += 1;
        if state.fail_barrier_at == Some(state.barriers) {
            state.fail_barrier_at = None;
            return Err(state.fault_hit("sync failed"));
        }
        state.durable = state.live.clone();
        Ok(())
    }
}

impl State {
    /// The planned fault is hit: fail this operation, or crash.
    fn fault_hit(&mut self, what: &str) -> Error {
        if std::mem::take(&mut self.crash_at_fault) {
            self.live = self.durable.clone();
            self.down = true;
            return fault("the engine crashed");
        }
        fault(what)
    }
}

/// Replaces `key`'s record with `new` (None: removes it) if it is still `expected`.
fn swap(t: &mut Tables, key: &[u8], expected: Option<&[u8]>, new: Option<Vec<u8>>) -> bool {
    if t.records.get(key).map(Vec::as_slice) != expected {
        return false;
    }
    match new {
        Some(bytes) => t.records.insert(key.to_vec(), bytes),
        None => t.records.remove(key),
    };
    true
}

impl Engine for MemoryEngine {
    type Bytes = Vec<u8>;

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, Error> {
        self.read(|t| t.records.get(key).cloned())
    }

    fn records(&self) -> RecordIter<'_, Vec<u8>> {
        match self.read(|t| t.records.clone()) {
            Ok(records) => Box::new(records.into_iter().map(Ok)),
            Err(e) => Box::new(std::iter::once(Err(e))),
        }
    }

    fn claim(&self, key: &[u8], expected: Option<&[u8]>, pending: Vec<u8>) -> Result<bool, Error> {
        self.write(|t| swap(t, key, expected, Some(pending)))
    }

    fn finish(&self, held: &Held<'_>, record: Option<Vec<u8>>) -> Result<bool, Error> {
        self.write(|t| swap(t, held.key, Some(held.record), record))
    }

    fn write_step(&self, held: &Held<'_>, index: u32, step: Vec<u8>) -> Result<bool, Error> {
        self.write(|t| {
            let ours = t.records.get(held.key).map(Vec::as_slice) == Some(held.record);
            if ours {
                t.steps.insert(step_key(held.key, held.life, index), step);
            }
            ours
        })
    }

    fn steps(&self, key: &[u8], life: ClaimToken) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        let prefix = steps_prefix(key, life);
        self.read(|t| {
            t.steps
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
                .filter_map(|(k, v)| Some((step_index(&prefix, k)?, v.clone())))
                .collect()
        })
    }

    fn remove_record(
        &self,
        key: &[u8],
        expected: &[u8],
        steps_of: Option<ClaimToken>,
    ) -> Result<bool, Error> {
        self.write(|t| {
            if !swap(t, key, Some(expected), None) {
                return false;
            }
            if let Some(life) = steps_of {
                let prefix = steps_prefix(key, life);
                t.steps.retain(|k, _| !k.starts_with(&prefix));
            }
            true
        })
    }

    fn import_record(
        &self,
        key: &[u8],
        record: &[u8],
        life: ClaimToken,
        steps: &[(u32, Vec<u8>)],
    ) -> Result<bool, Error> {
        self.write(|t| {
            if !swap(t, key, None, Some(record.to_vec())) {
                return false;
            }
            for (index, step) in steps {
                t.steps.insert(step_key(key, life, *index), step.clone());
            }
            true
        })
    }

    fn index_expiry(&self, expires_ms: u64, key: &[u8]) -> Result<(), Error> {
        self.write(|t| {
            t.expiry.insert(expiry_key(expires_ms, key));
        })
    }

    fn due_expiries(
        &self,
        now_ms: u64,
        after: Option<(u64, &[u8])>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, Error> {
        let from = match after {
            Some((time, key)) => Bound::Excluded(expiry_key(time, key)),
            None => Bound::Unbounded,
        };
        self.read(|t| {
            t.expiry
                .range((from, Bound::Unbounded))
                .filter_map(|k| {
                    let (time, key) = k.split_first_chunk::<8>()?;
                    Some((u64::from_be_bytes(*time), key.to_vec()))
                })
                .take_while(|(time, _)| *time <= now_ms)
                .take(limit)
                .collect()
        })
    }

    fn unindex_expiries(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), Error> {
        self.write(|t| {
            for (expires_ms, key) in entries {
                t.expiry.remove(&expiry_key(*expires_ms, key));
            }
        })
    }

    fn wait_durable(&self) -> Result<(), Error> {
        match self.immediate {
            true => self.sync(),
            false => Ok(()),
        }
    }

    fn flush(&self) -> Result<(), Error> {
        self.sync()
    }

    fn holder_live(&self, _key: &[u8], _claim: ClaimToken, running_here: bool) -> bool {
        running_here
    }

    fn fresh_epoch(&self, floor: u64) -> Result<u64, Error> {
        self.write(|_| ())?;
        let mut state = self.state.lock();
        state.epoch = state.epoch.max(floor) + 1;
        Ok(state.epoch)
    }
}
