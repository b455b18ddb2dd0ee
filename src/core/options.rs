//! What the rules read besides the record: the store's settings and one call's options.
//!
//! Invariants: settings are checked when the store opens (see `StoreBuilder::open`), so the
//! rules trust them: TTLs are at least 1 ms, key limits between 1 and 65535 bytes, result
//! limits at most 16 MiB. A call's option, when set, wins over the store's setting.

use std::time::Duration;

use crate::format::codec::Codec;
use crate::format::fingerprint::Fingerprint;

/// When writes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// The claim is durable before the operation runs and the outcome is durable before
    /// `execute_once` returns. Concurrent calls share fsyncs (group commit). Nothing a call
    /// returned is lost in a crash.
    Immediate,
    /// Writes are flushed by the storage engine every `interval`. A crash can lose the claims
    /// and outcomes of the last interval: an operation whose outcome was lost runs again on the
    /// next call, and one whose claim was lost is not seen as interrupted.
    Periodic(Duration),
}

/// What a call does when it finds a key left Pending by a run that is no longer running (its
/// process died, or its outcome could not be recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrphanPolicy {
    /// Run the operation again (at-least-once across a crash). The default.
    Rerun,
    /// Return [`Error::Interrupted`](crate::Error::Interrupted) and leave the record as it is, so the caller can reconcile
    /// (for example ask the payment provider) before re-running with `Rerun` or removing the key.
    Report,
}

/// Options of one call, as the state machine reads them.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CallOptions {
    pub fingerprint: Option<Fingerprint>,
    pub ttl: Option<Duration>,
    pub wait_timeout: Option<Duration>,
    pub orphan_policy: Option<OrphanPolicy>,
    /// The operation records steps (`run_with`).
    pub with_steps: bool,
    /// How this call encodes its outcome (None: the store's setting).
    pub codec: Option<Codec>,
    /// A retryable failure removes the record instead of recording it (`forget_retryable_errors`).
    pub forget_retryable: bool,
}

/// The store-wide settings the rules and drivers read on every call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub default_ttl: Duration,
    pub wait_timeout: Duration,
    pub orphan_policy: OrphanPolicy,
    pub max_key_bytes: usize,
    pub max_result_bytes: usize,
    /// `Durability::Immediate`: replays wait for a running writer's durability point.
    pub immediate: bool,
    /// How outcomes are encoded unless a call says otherwise.
    pub codec: Codec,
}

impl Settings {
    /// The call's orphan policy, else the store's.
    pub(crate) fn orphan_policy(&self, options: &CallOptions) -> OrphanPolicy {
        options.orphan_policy.unwrap_or(self.orphan_policy)
    }

    /// Whether a claim must be durable before its operation runs (design §6, "which claims
    /// are made durable"). Only a durable claim survives a crash as an orphan, and only
    /// `Report` treats an orphan differently from a key never claimed: under `Rerun` both run
    /// the operation, and a recorded step makes its claim durable anyway (a durability point
    /// covers every write before it). `Report` protects the runs made under it, the store's
    /// policy or the call's: a run under `Rerun` chose at-least-once, and a later call asking
    /// for `Report` does not see it once a crash took its claim (design §6).
    pub(crate) fn claim_must_be_durable(&self, options: &CallOptions) -> bool {
        self.orphan_policy == OrphanPolicy::Report
            || options.orphan_policy == Some(OrphanPolicy::Report)
    }

    /// The call's codec, else the store's.
    pub(crate) fn codec(&self, options: &CallOptions) -> Codec {
        options.codec.unwrap_or(self.codec)
    }

    /// The call's TTL in milliseconds, else the store's.
    pub(crate) fn ttl_ms(&self, options: &CallOptions) -> u64 {
        crate::clock::millis(options.ttl.unwrap_or(self.default_ttl))
    }
}
