//! Model-based tests: random operation sequences against the store and a reference model of
//! the contract (see `tests/reference/mod.rs`); a divergence shrinks to a minimal sequence.

mod reference;

use proptest::prelude::*;
use reference::{
    execute, steps, steps_ignoring, tx, tx_run, End, Fp, Op, Run, Step, StepKind, KEYS,
};

fn run_strategy() -> impl Strategy<Value = Run> {
    prop_oneof![
        40 => any::<u16>().prop_map(Run::Ok),
        20 => any::<u16>().prop_map(Run::Permanent),
        20 => any::<u16>().prop_map(Run::Retryable),
        8 => Just(Run::Panic),
        6 => any::<u16>().prop_map(Run::PredicatePanic),
        6 => any::<u16>().prop_map(Run::RemoveThenOk),
        5 => Just(Run::TooLarge),
        5 => Just(Run::Unencodable),
        6 => any::<u16>().prop_map(Run::Tagged),
        5 => any::<u16>().prop_map(Run::PermanentUnencodable),
        // 200 KiB results cost milliseconds to encode and to replay: rarely.
        1 => any::<u16>().prop_map(Run::Big),
    ]
}

fn fingerprint_strategy() -> impl Strategy<Value = Option<Fp>> {
    proptest::option::weighted(
        0.4,
        prop_oneof![(2u8..4).prop_map(Fp::Bytes), (2u8..4).prop_map(Fp::Map)],
    )
}

fn step_strategy() -> impl Strategy<Value = Step> {
    let kind = prop_oneof![
        30 => Just(StepKind::Ok),
        12 => Just(StepKind::Fail),
        3 => Just(StepKind::Panic),
        3 => Just(StepKind::RemoveThenOk),
        3 => Just(StepKind::RemoveAfter),
        3 => Just(StepKind::TooLarge),
        3 => Just(StepKind::Unencodable),
        1 => Just(StepKind::Big),
    ];
    (0u8..3, kind, proptest::bool::weighted(0.25)).prop_map(|(name, kind, ignored)| Step {
        name,
        kind,
        ignored,
    })
}

fn end_strategy() -> impl Strategy<Value = End> {
    prop_oneof![
        12 => Just(End::Ok),
        3 => Just(End::Err),
        1 => Just(End::Panic),
        1 => Just(End::RemoveThenOk),
        1 => Just(End::TooLarge),
        1 => Just(End::Unencodable),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let options = || {
        (
            0..KEYS,
            run_strategy(),
            fingerprint_strategy(),
            proptest::option::weighted(0.3, 0u8..120),
            proptest::bool::weighted(0.2),
        )
    };
    prop_oneof![
        10 => options().prop_map(|(key, run, fingerprint, ttl_s, json)| Op::Execute {
            key,
            run,
            fingerprint,
            ttl_s,
            json
        }),
        3 => options().prop_map(|(key, run, fingerprint, ttl_s, json)| Op::Tx {
            key,
            run: tx_run(run),
            fingerprint,
            ttl_s,
            json
        }),
        3 => (0u16..250).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Sweep),
        1 => (0..KEYS).prop_map(|key| Op::Remove { key }),
        1 => Just(Op::Reopen),
        5 => (
            0..KEYS,
            proptest::collection::vec(step_strategy(), 0..4),
            end_strategy(),
            any::<u16>()
        )
            .prop_map(|(key, steps, end, value)| Op::Steps {
                key,
                end,
                steps,
                value
            }),
    ]
}

fn cases() -> u32 {
    std::env::var("IDEMSTORE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn store_matches_the_reference_model(immediate in any::<bool>(), ops in proptest::collection::vec(op_strategy(), 1..40)) {
        reference::quiet_model_panics();
        reference::run(immediate, &ops);
    }
}

#[test]
fn model_regressions() {
    reference::quiet_model_panics();
    use Op::*;
    // A retryable failure, a fingerprinted retry, expiry by a per-call TTL, a sweep, a reopen.
    let with = |run, fingerprint, ttl_s| Execute {
        key: 0,
        run,
        fingerprint,
        ttl_s,
        json: false,
    };
    reference::run(
        true,
        &[
            with(Run::Retryable(1), Some(Fp::Bytes(2)), None),
            with(Run::Ok(5), None, Some(3)),
            with(Run::Ok(6), Some(Fp::Bytes(3)), None),
            Advance { secs: 3 },
            with(Run::Panic, Some(Fp::Bytes(3)), None),
            Sweep,
            Reopen,
            with(Run::Permanent(9), None, None),
            with(Run::Ok(1), None, None),
            Remove { key: 0 },
            with(Run::Ok(2), None, None),
        ],
    );
    // Found by proptest (expiry, per-call TTLs, fingerprints, a reopen and removes).
    let e = |key, run, fingerprint: Option<u8>, ttl_s| Execute {
        key,
        run,
        fingerprint: fingerprint.map(Fp::Bytes),
        ttl_s,
        json: false,
    };
    reference::run(
        true,
        &[
            Remove { key: 3 },
            Sweep,
            e(0, Run::Permanent(32068), None, Some(102)),
            e(1, Run::Permanent(62308), None, None),
            Advance { secs: 166 },
            Advance { secs: 13 },
            Advance { secs: 59 },
            e(2, Run::Retryable(51898), Some(2), Some(98)),
            Reopen,
            e(0, Run::Ok(4519), None, None),
            Advance { secs: 121 },
            e(0, Run::Retryable(23201), Some(2), None),
            Advance { secs: 208 },
            Advance { secs: 58 },
            Advance { secs: 19 },
            e(1, Run::Retryable(1995), Some(2), None),
            e(0, Run::Permanent(46851), Some(3), Some(101)),
            Advance { secs: 237 },
            e(3, Run::Ok(65473), None, None),
            e(2, Run::Permanent(43863), None, Some(26)),
            e(0, Run::Ok(42538), None, Some(86)),
            Remove { key: 1 },
            e(2, Run::Ok(41346), None, None),
            e(0, Run::Retryable(57732), Some(3), None),
            Advance { secs: 90 },
            e(3, Run::Ok(120), None, Some(1)),
            Remove { key: 2 },
            e(2, Run::Ok(41105), None, None),
            e(3, Run::Retryable(38940), None, Some(25)),
            e(0, Run::Ok(26765), None, None),
            e(0, Run::Ok(63447), None, Some(60)),
            e(3, Run::Ok(11080), None, Some(101)),
        ],
    );
    // Found by proptest before steps were found by index: a duplicate step name, twice.
    reference::run(
        false,
        &[
            steps(2, &[(0, StepKind::Ok), (0, StepKind::Ok)], End::Ok, 0),
            steps(2, &[(0, StepKind::Ok), (0, StepKind::Ok)], End::Ok, 0),
        ],
    );
}

/// One deterministic sequence per rule the model states, so each runs on every `cargo test`
/// whatever the random sequences draw (the same sequences seed the fuzz corpus).
#[test]
fn model_scenarios() {
    reference::quiet_model_panics();
    for (name, ops) in reference::scenarios() {
        for immediate in [true, false] {
            let r = std::panic::catch_unwind(|| reference::run(immediate, &ops));
            assert!(r.is_ok(), "scenario {name} (immediate: {immediate})");
        }
    }
}

/// The contract: a panic in a `permanent_if` predicate leaves the record FailedRetryable
/// (attempts + 1), as a panic in the operation does, in a transaction too (a divergence the
/// model found: the transactional driver used to record nothing).
#[test]
fn tx_predicate_panic() {
    reference::quiet_model_panics();
    reference::run(true, &[tx(0, Run::PredicatePanic(0))]);
    reference::run(
        true,
        &[execute(1, Run::Retryable(4)), tx(1, Run::PredicatePanic(5))],
    );
}

/// The contract: a step whose result cannot be stored ends the run; the record becomes
/// Completed with that error and neither the step nor the operation runs again, also when the
/// operation, having ignored the step's error, then panics (a divergence the model found: the
/// record used to become FailedRetryable, so the next call ran the operation again).
#[test]
fn panic_after_an_unstorable_step() {
    use StepKind::*;
    reference::quiet_model_panics();
    reference::run(
        true,
        &[
            steps_ignoring(0, &[(0, Ok), (1, TooLarge)], &[1], End::Panic, 1),
            steps(0, &[(0, Ok), (1, TooLarge)], End::Ok, 2),
        ],
    );
}
