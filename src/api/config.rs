//! How a store is configured, and the builder that opens it.
//!
//! Invariants: every value is checked when the store opens ([`StoreBuilder::open`] returns
//! [`Error::InvalidConfig`] for an out-of-range one), so the rest of the crate trusts them:
//! TTLs are at least 1 ms, key limits between 1 and 65535 bytes, result limits at most 16 MiB.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::api::store::Store;
use crate::clock::{Clock, SystemClock};
use crate::core::options::{Durability, OrphanPolicy};
use crate::error::Error;
use crate::format::codec::{Codec, MAX_RESULT_LIMIT};

/// Configures and opens a [`Store`].
///
/// | setting | default |
/// |---|---|
/// | [`default_ttl`](Self::default_ttl) | 24 hours |
/// | [`durability`](Self::durability) | [`Durability::Immediate`] |
/// | [`wait_timeout`](Self::wait_timeout) | 10 seconds |
/// | [`orphan_policy`](Self::orphan_policy) | [`OrphanPolicy::Rerun`] |
/// | [`max_key_bytes`](Self::max_key_bytes) | 256 |
/// | [`max_result_bytes`](Self::max_result_bytes) | 1 MiB |
/// | [`cache_bytes`](Self::cache_bytes) | 64 MiB |
/// | [`sweep_interval`](Self::sweep_interval) | 60 seconds |
/// | [`clock`](Self::clock) | [`SystemClock`] |
/// | [`codec`](Self::codec) | [`Codec::Bincode`] |
///
/// ```
/// # let dir = tempfile::tempdir().unwrap();
/// use idemstore::{Durability, OrphanPolicy, Store};
/// use std::time::Duration;
/// let store = Store::builder(dir.path().join("db"))
///     .default_ttl(Duration::from_secs(3600))
///     .durability(Durability::Immediate)
///     .wait_timeout(Duration::from_secs(2))
///     .orphan_policy(OrphanPolicy::Report)
///     .open()
///     .unwrap();
/// ```
#[derive(Clone)]
pub struct StoreBuilder {
    pub(crate) path: PathBuf,
    pub(crate) default_ttl: Duration,
    pub(crate) durability: Durability,
    pub(crate) wait_timeout: Duration,
    pub(crate) orphan_policy: OrphanPolicy,
    pub(crate) max_key_bytes: usize,
    pub(crate) max_result_bytes: usize,
    pub(crate) cache_bytes: u64,
    pub(crate) sweep_interval: Option<Duration>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) codec: Codec,
}

impl std::fmt::Debug for StoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreBuilder")
            .field("path", &self.path)
            .field("default_ttl", &self.default_ttl)
            .field("durability", &self.durability)
            .field("wait_timeout", &self.wait_timeout)
            .field("orphan_policy", &self.orphan_policy)
            .field("max_key_bytes", &self.max_key_bytes)
            .field("max_result_bytes", &self.max_result_bytes)
            .field("cache_bytes", &self.cache_bytes)
            .field("sweep_interval", &self.sweep_interval)
            .field("codec", &self.codec)
            .finish_non_exhaustive()
    }
}

impl Default for StoreBuilder {
    /// The default settings with no path: for engines that need none (a shared database).
    fn default() -> Self {
        Self::new(PathBuf::new())
    }
}

impl StoreBuilder {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            default_ttl: Duration::from_secs(24 * 60 * 60),
            durability: Durability::Immediate,
            wait_timeout: Duration::from_secs(10),
            orphan_policy: OrphanPolicy::Rerun,
            max_key_bytes: 256,
            max_result_bytes: 1 << 20,
            cache_bytes: 64 << 20,
            sweep_interval: Some(Duration::from_secs(60)),
            clock: Arc::new(SystemClock),
            codec: Codec::Bincode,
        }
    }

    /// How long a record lives after its claim, unless a call overrides it. At least 1 ms.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// When writes reach the disk; see [`Durability`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// How long a call waits for another call in this process running the same key before
    /// it returns [`Error::InProgress`]. Zero: never wait.
    pub fn wait_timeout(mut self, timeout: Duration) -> Self {
        self.wait_timeout = timeout;
        self
    }

    /// What to do with a key whose earlier run was interrupted; see [`OrphanPolicy`].
    pub fn orphan_policy(mut self, policy: OrphanPolicy) -> Self {
        self.orphan_policy = policy;
        self
    }

    /// The longest key accepted, in bytes (1 to 65535).
    pub fn max_key_bytes(mut self, limit: usize) -> Self {
        self.max_key_bytes = limit;
        self
    }

    /// The largest encoded result or permanent error recorded, in bytes (at most 16 MiB).
    pub fn max_result_bytes(mut self, limit: usize) -> Self {
        self.max_result_bytes = limit;
        self
    }

    /// The storage engine's page cache size in bytes.
    pub fn cache_bytes(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// How often the background sweeper removes expired records; `None` disables the thread
    /// (call [`Store::sweep_now`] yourself). Expired records read as absent either way.
    pub fn sweep_interval(mut self, interval: Option<Duration>) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// How outcomes are encoded unless a call says otherwise ([`Call::codec`](crate::Call::codec));
    /// see [`Codec`]. Records remember their codec, so changing this never breaks replays.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The clock for timestamps and expiry (a [`ManualClock`](crate::ManualClock) in tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Opens the store, creating it if the path does not exist.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an out-of-range setting or an empty path (nothing is
    /// written); [`Error::Locked`] if another
    /// process has the database open; [`Error::NotAStore`] if the path is a file, a directory
    /// of other files, or a database idemstore did not create; [`Error::UnsupportedStoreVersion`]
    /// for a database from a newer idemstore; [`Error::Storage`] / [`Error::Io`] for I/O failures.
    pub fn open(self) -> Result<Store, Error> {
        self.validate()?;
        Store::open_with(self)
    }

    /// Checks the settings of an embedded store: its path and every engine's settings.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.path.as_os_str().is_empty() {
            return Err(Error::InvalidConfig(
                "the store path is empty (an unset environment variable?)",
            ));
        }
        self.validate_settings()
    }

    /// Checks the settings every engine uses (all but the path).
    pub(crate) fn validate_settings(&self) -> Result<(), Error> {
        if self.default_ttl < Duration::from_millis(1) {
            return Err(Error::InvalidConfig("default_ttl must be at least 1 ms"));
        }
        if !(1..=65535).contains(&self.max_key_bytes) {
            return Err(Error::InvalidConfig(
                "max_key_bytes must be between 1 and 65535",
            ));
        }
        if self.max_result_bytes > MAX_RESULT_LIMIT {
            return Err(Error::InvalidConfig(
                "max_result_bytes must be at most 16 MiB",
            ));
        }
        if let Durability::Periodic(interval) = self.durability {
            if interval < Duration::from_millis(1) {
                return Err(Error::InvalidConfig(
                    "the periodic flush interval must be at least 1 ms",
                ));
            }
        }
        if self.sweep_interval.is_some_and(|i| i.is_zero()) {
            return Err(Error::InvalidConfig(
                "sweep_interval must be non-zero (or None)",
            ));
        }
        Ok(())
    }
}
