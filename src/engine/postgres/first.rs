//! Which statement a call sends first on PostgreSQL, chosen from what recent calls found.
//!
//! Claiming first (a plain insert, then a read only if the key turns out to be taken) answers a
//! new key in one round trip but a replay in two; reading first answers a replay with the
//! cheapest statement there is but costs a new key a second round trip. Traffic is usually mostly one or the other (a
//! service's first tries, or a burst of retries), so the engine follows it: a score moves one
//! step toward "read first" for every first look that found a record and one step toward
//! "claim first" for every one that did not, within ±[`LIMIT`].
//!
//! Invariants: this is a cost choice only. Both ways are correct on their own: a call picks
//! its way once, when it starts, and either way ends in a compare-and-swap against what it
//! read. The score is moved by compare-and-swap within ±[`LIMIT`]; a saturated score is only
//! read, so a steady workload writes nothing shared.

use std::sync::atomic::{AtomicI32, Ordering};

/// How far the score goes each way: a run of this many calls of the other kind flips it.
const LIMIT: i32 = 8;

/// The score; below zero: claim first.
#[derive(Debug)]
pub(crate) struct FirstStatement {
    score: AtomicI32,
}

impl Default for FirstStatement {
    fn default() -> Self {
        // New keys are a service's common case until retries say otherwise.
        Self {
            score: AtomicI32::new(-1),
        }
    }
}

impl FirstStatement {
    /// Whether the next call should claim before it reads.
    pub(crate) fn claim_first(&self) -> bool {
        self.score.load(Ordering::Relaxed) < 0
    }

    /// A call's first look found a record (`found`) or not.
    pub(crate) fn saw(&self, found: bool) {
        let step = if found { 1 } else { -1 };
        // One compare-and-swap, clamped: racing callers never push the score past the limit.
        let _ = self
            .score
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |now| {
                let next = (now + step).clamp(-LIMIT, LIMIT);
                (next != now).then_some(next)
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_replays_turns_to_reading_first_and_back() {
        let first = FirstStatement::default();
        assert!(first.claim_first());
        for _ in 0..3 {
            first.saw(true);
        }
        assert!(!first.claim_first());
        for _ in 0..100 {
            first.saw(true);
        }
        assert!(!first.claim_first(), "saturated");
        for _ in 0..LIMIT {
            first.saw(false);
        }
        assert!(
            !first.claim_first(),
            "a run of LIMIT new keys leaves it at zero"
        );
        first.saw(false);
        assert!(first.claim_first());
    }
}
