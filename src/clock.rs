//! Time as the store sees it: milliseconds since the Unix epoch.
//!
//! Invariants: every timestamp in a record comes from the store's one [`Clock`], so records
//! compare consistently; a [`ManualClock`] only moves when a test moves it, so TTL tests never
//! sleep. The store does not require the clock to be monotonic: an expiry check is a plain
//! `now >= expires_at`, so a clock stepping backwards only delays expiry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time in milliseconds since the Unix epoch.
///
/// The store reads it for record timestamps and expiry. Implement it to drive time yourself;
/// [`ManualClock`] already does that for tests.
///
/// ```
/// use idemstore::{Clock, SystemClock};
/// assert!(SystemClock.now_millis() > 1_600_000_000_000);
/// ```
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since 1970-01-01T00:00:00Z.
    fn now_millis(&self) -> u64;
}

/// The operating system's wall clock (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        // A clock before 1970 reads as 0: records then simply expire later than intended.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told to: for tests of TTL, expiry and sweeping.
///
/// Clones share one time, so a test keeps a clone and advances the store's clock.
///
/// ```
/// use idemstore::{Clock, ManualClock};
/// use std::time::Duration;
/// let clock = ManualClock::new(1_000);
/// let handle = clock.clone();
/// handle.advance(Duration::from_secs(2));
/// assert_eq!(clock.now_millis(), 3_000);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    now_millis: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `start_millis` milliseconds since the Unix epoch.
    pub fn new(start_millis: u64) -> Self {
        Self {
            now_millis: Arc::new(AtomicU64::new(start_millis)),
        }
    }

    /// Moves the clock forward by `by` (saturating at `u64::MAX` milliseconds).
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .now_millis
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                Some(t.saturating_add(by))
            });
    }

    /// Sets the clock to `millis` since the Unix epoch (it may move backwards).
    pub fn set(&self, millis: u64) {
        self.now_millis.store(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.now_millis.load(Ordering::SeqCst)
    }
}

/// Converts a duration to whole milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Converts store milliseconds back to a `SystemTime`.
pub(crate) fn to_system_time(millis: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis)
}
