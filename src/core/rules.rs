//! The contract table as pure functions: what a call does with the record it read.
//!
//! Invariants: no I/O, no clock, no lock: a driver passes what it read (the record's header,
//! the time, whether the record's writer or holder is alive) and gets a decision. Every
//! driver (plain, transactional, and any later one) decides through these two functions, so
//! no rule of the table is written twice:
//! - [`first_look`], before the call leads the key: replay a live recorded outcome (once it
//!   is durable), refuse a fingerprint mismatch, or lead;
//! - [`as_leader`], once it leads: replay, refuse, wait for a live holder elsewhere, or claim
//!   (a new life, the next attempt of a retryable life, or an orphan taken over).
//!
//! An expired record reads as absent; a live record with a different fingerprint refuses the
//! call whatever its state.

use crate::core::attempt::Attempt;
use crate::core::options::{CallOptions, OrphanPolicy};
use crate::format::record::{ClaimToken, Header, RecordState};

/// Why a call is refused without running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The record holds a different request fingerprint.
    FingerprintMismatch,
    /// An orphan under `OrphanPolicy::Report`, after this many attempts.
    Interrupted { attempts: u32 },
}

/// What a call does after its first look at the key's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstLook {
    /// A live recorded outcome, durable: replay it.
    Replay,
    /// A live recorded outcome whose writer may still be making it durable: wait for it.
    WaitForWriter,
    /// Anything else: lead the key, read again, and decide with [`as_leader`].
    Lead,
    Refuse(Refusal),
}

/// What the key's leader does with the record it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AsLeader {
    /// A live recorded outcome (finished by a leader that is done, so durable): replay it.
    Replay,
    /// A Pending record whose holder is alive elsewhere: wait, then look again.
    WaitForHolder,
    /// Claim the key and run the operation.
    Claim(ClaimPlan),
    Refuse(Refusal),
}

/// How to claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClaimPlan {
    pub attempt: Attempt,
    /// An expired life with steps: remove its record and steps (one removal) before claiming.
    pub retire: Option<ClaimToken>,
    /// The claim takes over an orphan (a Pending record whose holder is gone).
    pub takeover: bool,
}

/// Whether the record is a recorded outcome (replayed, never run again while it lives).
pub(crate) fn is_terminal(state: RecordState) -> bool {
    matches!(state, RecordState::Completed | RecordState::FailedPermanent)
}

fn fingerprint_differs(h: &Header, options: &CallOptions) -> bool {
    matches!((options.fingerprint, h.fingerprint), (Some(given), Some(stored)) if given != stored)
}

/// The decision before leading. `writer_running`: a call of this store is running the key
/// (it may not have made its outcome durable yet); `immediate`: replays must be durable.
pub(crate) fn first_look(
    seen: Option<&Header>,
    now_ms: u64,
    options: &CallOptions,
    writer_running: bool,
    immediate: bool,
) -> FirstLook {
    match seen.filter(|h| !h.is_expired(now_ms)) {
        Some(h) if fingerprint_differs(h, options) => {
            FirstLook::Refuse(Refusal::FingerprintMismatch)
        }
        Some(h) if is_terminal(h.state) && writer_running && immediate => FirstLook::WaitForWriter,
        Some(h) if is_terminal(h.state) => FirstLook::Replay,
        _ => FirstLook::Lead,
    }
}

/// The decision as leader. `holder_live`: the engine's liveness verdict on a Pending record
/// (for one process: false, since this call leads the key; for a shared engine: its lease).
pub(crate) fn as_leader(
    seen: Option<&Header>,
    now_ms: u64,
    options: &CallOptions,
    orphan_policy: OrphanPolicy,
    holder_live: bool,
) -> AsLeader {
    // A holder still running is waited for even past its record's expiry: its writes are
    // fenced, but its operation would run beside a new one (a shared engine's lease; in one
    // process the leader is the only caller, so this never holds).
    if seen.is_some_and(|h| h.state == RecordState::Pending) && holder_live {
        return AsLeader::WaitForHolder;
    }
    let Some(h) = seen.filter(|h| !h.is_expired(now_ms)) else {
        return AsLeader::Claim(ClaimPlan {
            attempt: Attempt::after(None, now_ms, options),
            retire: seen.filter(|h| h.has_steps).map(|h| h.life),
            takeover: false,
        });
    };
    if fingerprint_differs(h, options) {
        return AsLeader::Refuse(Refusal::FingerprintMismatch);
    }
    let next = |takeover| {
        AsLeader::Claim(ClaimPlan {
            attempt: Attempt::after(Some(h), now_ms, options),
            retire: None,
            takeover,
        })
    };
    match h.state {
        RecordState::Completed | RecordState::FailedPermanent => AsLeader::Replay,
        RecordState::FailedRetryable => next(false),
        RecordState::Pending if holder_live => AsLeader::WaitForHolder,
        RecordState::Pending => match orphan_policy {
            OrphanPolicy::Report => AsLeader::Refuse(Refusal::Interrupted {
                attempts: h.attempts,
            }),
            OrphanPolicy::Rerun => next(true),
        },
    }
}

#[cfg(test)]
mod tests {
    //! One test per row of the contract table (docs/design.md §2), at the level of rules.
    use super::*;
    use crate::format::codec::Codec;
    use crate::format::fingerprint::Fingerprint;
    use crate::format::record::OutcomeKind;

    const NOW: u64 = 1_000_000;

    fn header(state: RecordState) -> Header {
        Header {
            state,
            outcome: match state {
                RecordState::Completed | RecordState::FailedPermanent => OutcomeKind::Stored,
                _ => OutcomeKind::None,
            },
            attempts: 2,
            created_ms: NOW - 50,
            updated_ms: NOW - 10,
            expires_ms: NOW + 100,
            claim: ClaimToken {
                epoch: 1,
                sequence: 7,
            },
            fingerprint: Some(Fingerprint::of_bytes(b"request")),
            has_steps: true,
            life: ClaimToken {
                epoch: 1,
                sequence: 3,
            },
            codec: Codec::Bincode,
            shape: None,
        }
    }

    fn with_fingerprint(bytes: &[u8]) -> CallOptions {
        CallOptions {
            fingerprint: Some(Fingerprint::of_bytes(bytes)),
            ..CallOptions::default()
        }
    }

    fn claim(d: AsLeader) -> ClaimPlan {
        match d {
            AsLeader::Claim(plan) => plan,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    #[test]
    fn absent_claims_a_new_life() {
        let o = CallOptions::default();
        assert_eq!(first_look(None, NOW, &o, false, true), FirstLook::Lead);
        let plan = claim(as_leader(None, NOW, &o, OrphanPolicy::Rerun, false));
        assert_eq!(
            (plan.attempt.number, plan.retire, plan.takeover),
            (1, None, false)
        );
        let new = plan.attempt.header(
            RecordState::Pending,
            OutcomeKind::None,
            NOW,
            10,
            ClaimToken {
                epoch: 2,
                sequence: 1,
            },
        );
        assert_eq!(
            new.life,
            ClaimToken {
                epoch: 2,
                sequence: 1
            },
            "named by its own claim"
        );
    }

    #[test]
    fn expired_reads_as_absent_and_retires_its_steps() {
        let mut h = header(RecordState::Completed);
        h.expires_ms = NOW;
        let o = CallOptions::default();
        assert_eq!(first_look(Some(&h), NOW, &o, false, true), FirstLook::Lead);
        let plan = claim(as_leader(Some(&h), NOW, &o, OrphanPolicy::Report, false));
        assert_eq!((plan.attempt.number, plan.retire), (1, Some(h.life)));
        // A different fingerprint does not matter once the record expired.
        let plan = claim(as_leader(
            Some(&h),
            NOW,
            &with_fingerprint(b"other"),
            OrphanPolicy::Rerun,
            false,
        ));
        assert_eq!(plan.attempt.number, 1);
    }

    #[test]
    fn retryable_claims_the_next_attempt_of_the_same_life() {
        let h = header(RecordState::FailedRetryable);
        let o = CallOptions::default();
        assert_eq!(first_look(Some(&h), NOW, &o, false, true), FirstLook::Lead);
        let plan = claim(as_leader(Some(&h), NOW, &o, OrphanPolicy::Report, false));
        assert_eq!(
            (plan.attempt.number, plan.retire, plan.takeover),
            (3, None, false)
        );
        let next = plan.attempt.header(
            RecordState::Pending,
            OutcomeKind::None,
            NOW,
            10,
            ClaimToken {
                epoch: 1,
                sequence: 9,
            },
        );
        assert_eq!(
            (next.life, next.created_ms, next.fingerprint),
            (h.life, h.created_ms, h.fingerprint)
        );
    }

    #[test]
    fn completed_and_permanent_replay_once_durable() {
        for state in [RecordState::Completed, RecordState::FailedPermanent] {
            let h = header(state);
            let o = with_fingerprint(b"request");
            assert_eq!(
                first_look(Some(&h), NOW, &o, false, true),
                FirstLook::Replay
            );
            assert_eq!(
                first_look(Some(&h), NOW, &o, true, true),
                FirstLook::WaitForWriter
            );
            assert_eq!(
                first_look(Some(&h), NOW, &o, true, false),
                FirstLook::Replay
            );
            assert_eq!(
                first_look(Some(&h), NOW, &CallOptions::default(), false, true),
                FirstLook::Replay
            );
            assert_eq!(
                as_leader(Some(&h), NOW, &o, OrphanPolicy::Rerun, false),
                AsLeader::Replay
            );
        }
    }

    #[test]
    fn a_different_fingerprint_is_refused_in_every_live_state() {
        let o = with_fingerprint(b"other");
        for state in [
            RecordState::Pending,
            RecordState::Completed,
            RecordState::FailedPermanent,
            RecordState::FailedRetryable,
        ] {
            let h = header(state);
            let refused = FirstLook::Refuse(Refusal::FingerprintMismatch);
            assert_eq!(first_look(Some(&h), NOW, &o, false, true), refused);
            assert_eq!(
                as_leader(Some(&h), NOW, &o, OrphanPolicy::Rerun, false),
                AsLeader::Refuse(Refusal::FingerprintMismatch)
            );
        }
    }

    #[test]
    fn a_running_pending_record_is_waited_for() {
        let h = header(RecordState::Pending);
        let o = CallOptions::default();
        // In one process the driver waits in the registry before leading; elsewhere by lease.
        assert_eq!(first_look(Some(&h), NOW, &o, true, true), FirstLook::Lead);
        assert_eq!(
            as_leader(Some(&h), NOW, &o, OrphanPolicy::Rerun, true),
            AsLeader::WaitForHolder
        );
    }

    #[test]
    fn a_live_holder_is_waited_for_even_past_its_expiry() {
        let mut h = header(RecordState::Pending);
        h.expires_ms = NOW;
        let o = CallOptions::default();
        assert_eq!(
            as_leader(Some(&h), NOW, &o, OrphanPolicy::Rerun, true),
            AsLeader::WaitForHolder
        );
        assert!(matches!(
            as_leader(Some(&h), NOW, &o, OrphanPolicy::Rerun, false),
            AsLeader::Claim(_)
        ));
    }

    #[test]
    fn an_orphan_is_rerun_or_reported_by_policy() {
        let h = header(RecordState::Pending);
        let o = CallOptions::default();
        let plan = claim(as_leader(Some(&h), NOW, &o, OrphanPolicy::Rerun, false));
        assert_eq!(
            (plan.attempt.number, plan.takeover, plan.retire),
            (3, true, None)
        );
        assert_eq!(
            as_leader(Some(&h), NOW, &o, OrphanPolicy::Report, false),
            AsLeader::Refuse(Refusal::Interrupted { attempts: 2 })
        );
    }

    #[test]
    fn a_call_fingerprint_fills_a_record_without_one() {
        let mut h = header(RecordState::FailedRetryable);
        h.fingerprint = None;
        let o = with_fingerprint(b"request");
        let plan = claim(as_leader(Some(&h), NOW, &o, OrphanPolicy::Rerun, false));
        let next = plan.attempt.header(
            RecordState::Pending,
            OutcomeKind::None,
            NOW,
            10,
            ClaimToken {
                epoch: 1,
                sequence: 9,
            },
        );
        assert_eq!(next.fingerprint, o.fingerprint);
        let _ = Codec::Json;
    }
}
