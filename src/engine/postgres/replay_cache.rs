//! A cache of recorded outcomes this process wrote or read (off by default;
//! `PgOptions::replay_cache`): a later call's first look may replay one without a round trip.
//!
//! Invariants:
//! - it holds only terminal records (Completed or FailedPermanent) that were committed: read
//!   from the database, or written by this engine's own outcome statements once they landed.
//!   The driver's rules still decide on every entry (expiry by the record's own time, the
//!   fingerprint), and an entry they would not replay is forgotten;
//! - an entry answers for at most `max_age` from when its read or write was sent (a slow
//!   answer never stretches that). Within that age it may answer for a record another replica
//!   has since removed or replaced: that staleness is the price of the cache, and the
//!   documented one;
//! - this engine's own writes to a key forget it before they are sent and again once they have
//!   ended (an outcome that landed is kept instead), and a read or outcome that was on its way
//!   while the key was forgotten is not kept (a generation per stripe of keys, taken before
//!   the statement and checked when keeping): a read that saw the old record before a write
//!   committed is either dropped or removed by the second forget, so after this process
//!   removes or rewrites a key, its calls never replay the old record from here;
//! - at most `capacity` entries; the oldest goes first.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::rules;
use crate::format::record;

/// Stripes of keys, each with its generation of forgets.
const STRIPES: usize = 64;

/// The cache.
pub(crate) struct ReplayCache {
    capacity: usize,
    max_age: Duration,
    hasher: RandomState,
    generations: [AtomicU64; STRIPES],
    entries: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    by_key: HashMap<Box<[u8]>, Entry>,
    /// Keys in the order they were kept (a key kept again appears again: the stale place is
    /// skipped when it comes up).
    order: VecDeque<(Box<[u8]>, Instant)>,
}

struct Entry {
    bytes: Arc<[u8]>,
    read_at: Instant,
}

/// Taken before a read; a read whose key was forgotten since is not kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    stripe: usize,
    generation: u64,
    /// When the read was about to be sent: an entry's age counts from here, so a slow
    /// answer never stretches how long it may answer.
    taken_at: Instant,
}

impl ReplayCache {
    pub(crate) fn new(capacity: usize, max_age: Duration) -> Self {
        Self {
            capacity,
            max_age,
            hasher: RandomState::new(),
            generations: std::array::from_fn(|_| AtomicU64::new(0)),
            entries: Mutex::new(Entries::default()),
        }
    }

    fn stripe(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) % STRIPES as u64) as usize
    }

    /// The ticket of a read of `key` about to be sent.
    pub(crate) fn ticket(&self, key: &[u8]) -> Ticket {
        let stripe = self.stripe(key);
        Ticket {
            stripe,
            generation: self.generations[stripe].load(Ordering::Acquire),
            taken_at: Instant::now(),
        }
    }

    /// `key`'s record as read within the last `max_age`, if kept.
    pub(crate) fn get(&self, key: &[u8]) -> Option<Arc<[u8]>> {
        let mut entries = self.entries.lock();
        let entry = entries.by_key.get(key)?;
        if entry.read_at.elapsed() < self.max_age {
            return Some(Arc::clone(&entry.bytes));
        }
        entries.by_key.remove(key);
        None
    }

    /// Keeps `bytes`, just read (or written) as `key`'s record under `ticket`, if it is a
    /// recorded outcome and `key` was not forgotten since the ticket; whether it was kept.
    pub(crate) fn keep(&self, key: &[u8], bytes: &[u8], ticket: Ticket) -> bool {
        let terminal = record::decode(bytes).is_ok_and(|r| rules::is_terminal(r.header.state));
        if !terminal || self.capacity == 0 {
            return false;
        }
        let read_at = ticket.taken_at;
        let mut entries = self.entries.lock();
        // Checked under the lock `forget` takes after bumping: a forget either comes before
        // this check (and the read is dropped) or after the insert (and removes it).
        if self.generations[ticket.stripe].load(Ordering::Acquire) != ticket.generation {
            return false;
        }
        let entries = &mut *entries;
        entries.by_key.insert(
            key.into(),
            Entry {
                bytes: bytes.into(),
                read_at,
            },
        );
        entries.order.push_back((key.into(), read_at));
        while entries.by_key.len() > self.capacity
            || entries.order.len() > self.capacity.saturating_mul(2)
        {
            let Some((oldest, kept_at)) = entries.order.pop_front() else {
                break;
            };
            // Only the place of the entry's latest keep removes it.
            if entries
                .by_key
                .get(&oldest)
                .is_some_and(|e| e.read_at == kept_at)
            {
                entries.by_key.remove(&oldest);
            }
        }
        true
    }

    /// Forgets `key`: this engine is about to write it (or the rules would not replay it).
    pub(crate) fn forget(&self, key: &[u8]) {
        self.generations[self.stripe(key)].fetch_add(1, Ordering::AcqRel);
        self.entries.lock().by_key.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::record::{Header, OutcomeKind, RecordState};
    use crate::Codec;

    fn record(state: RecordState) -> Vec<u8> {
        let token = record::ClaimToken {
            epoch: 1,
            sequence: 1,
        };
        let header = Header {
            state,
            outcome: match state {
                RecordState::Pending | RecordState::FailedRetryable => OutcomeKind::None,
                _ => OutcomeKind::Stored,
            },
            attempts: 1,
            created_ms: 1,
            updated_ms: 1,
            expires_ms: u64::MAX,
            claim: token,
            fingerprint: None,
            has_steps: false,
            life: token,
            codec: Codec::Bincode,
            shape: None,
        };
        record::encode(&header, b"")
    }

    #[test]
    fn only_recorded_outcomes_are_kept_and_only_for_max_age() {
        let cache = ReplayCache::new(8, Duration::from_millis(200));
        let done = record(RecordState::Completed);
        for state in [RecordState::Pending, RecordState::FailedRetryable] {
            cache.keep(b"k", &record(state), cache.ticket(b"k"));
            assert!(cache.get(b"k").is_none(), "{state:?} is not kept");
        }
        cache.keep(b"k", b"not a record", cache.ticket(b"k"));
        assert!(cache.get(b"k").is_none());
        cache.keep(b"k", &done, cache.ticket(b"k"));
        assert_eq!(cache.get(b"k").as_deref(), Some(done.as_slice()));
        let failed = record(RecordState::FailedPermanent);
        cache.keep(b"f", &failed, cache.ticket(b"f"));
        assert!(cache.get(b"f").is_some());
        std::thread::sleep(Duration::from_millis(250));
        assert!(cache.get(b"k").is_none(), "older than max_age");
    }

    #[test]
    fn a_read_on_its_way_while_its_key_was_forgotten_is_not_kept() {
        let cache = ReplayCache::new(8, Duration::from_secs(60));
        let done = record(RecordState::Completed);
        let ticket = cache.ticket(b"k");
        cache.forget(b"k");
        cache.keep(b"k", &done, ticket);
        assert!(cache.get(b"k").is_none());
        cache.keep(b"k", &done, cache.ticket(b"k"));
        assert!(cache.get(b"k").is_some());
        cache.forget(b"k");
        assert!(cache.get(b"k").is_none());
    }

    #[test]
    fn the_oldest_entries_go_first_past_capacity() {
        let cache = ReplayCache::new(3, Duration::from_secs(60));
        let done = record(RecordState::Completed);
        for key in [b"a", b"b", b"c", b"a", b"d"] {
            cache.keep(key, &done, cache.ticket(key));
        }
        // "a" was kept again after "b" and "c": "b" is now the oldest.
        assert!(cache.get(b"b").is_none());
        for key in [b"a", b"c", b"d"] {
            assert!(cache.get(key).is_some(), "{key:?}");
        }
        for i in 0..100u32 {
            let key = i.to_be_bytes();
            cache.keep(&key, &done, cache.ticket(&key));
        }
        let entries = cache.entries.lock();
        assert_eq!(entries.by_key.len(), 3);
        assert!(entries.order.len() <= 6);
    }
}
