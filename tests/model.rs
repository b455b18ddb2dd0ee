//! Model-based tests: random operation sequences against the store and a reference model of
//! the contract (see `tests/reference/mod.rs`); a divergence shrinks to a minimal sequence.

mod reference;

use proptest::prelude::*;
use reference::{tx_run, End, Fp, Op, Run, Step, StepKind, KEYS};

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
        8 => Just(StepKind::Fail),
        8 => Just(StepKind::FailIgnored),
        3 => Just(StepKind::Panic),
        3 => Just(StepKind::RemoveThenOk),
        3 => Just(StepKind::RemoveAfter),
        3 => Just(StepKind::TooLarge),
        3 => Just(StepKind::Unencodable),
        1 => Just(StepKind::Big),
    ];
    (0u8..3, kind).prop_map(|(name, kind)| Step { name, kind })
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
                steps,
                end,
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

fn execute(key: u8, run: Run) -> Op {
    Op::Execute {
        key,
        run,
        fingerprint: None,
        ttl_s: None,
        json: false,
    }
}

fn tx(key: u8, run: Run) -> Op {
    Op::Tx {
        key,
        run,
        fingerprint: None,
        ttl_s: None,
        json: false,
    }
}

fn steps(key: u8, plan: &[(u8, StepKind)], end: End, value: u16) -> Op {
    Op::Steps {
        key,
        steps: plan
            .iter()
            .map(|&(name, kind)| Step { name, kind })
            .collect(),
        end,
        value,
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
/// whatever the random sequences draw.
#[test]
fn model_scenarios() {
    reference::quiet_model_panics();
    use Op::*;
    use StepKind::*;
    let scenarios: Vec<(&str, Vec<Op>)> = vec![
        (
            "an ignored step error leaves no gap",
            vec![
                steps(0, &[(0, FailIgnored), (1, Ok), (2, Fail)], End::Ok, 10),
                steps(0, &[(0, FailIgnored), (1, Ok), (2, Ok)], End::Ok, 20),
                steps(0, &[(0, FailIgnored), (1, Ok), (2, Ok)], End::Ok, 30),
                Reopen,
                steps(0, &[(0, Ok), (1, Ok), (2, Ok)], End::Ok, 40),
            ],
        ),
        (
            "a store error in a step stops every later step",
            vec![
                steps(1, &[(0, Ok), (0, FailIgnored), (1, Ok)], End::Ok, 1),
                steps(1, &[(1, Ok), (2, Ok)], End::Ok, 2),
                steps(1, &[(0, Ok), (1, Ok)], End::Ok, 3),
            ],
        ),
        (
            "remove from a step, from the operation between steps, and at its end",
            vec![
                steps(0, &[(0, Ok), (1, Fail)], End::Ok, 1),
                steps(0, &[(0, Ok), (1, RemoveThenOk), (2, Ok)], End::Ok, 2),
                steps(0, &[(0, Ok), (1, Fail)], End::Ok, 3),
                steps(
                    0,
                    &[(0, RemoveAfter), (1, Ok), (2, RemoveThenOk)],
                    End::Ok,
                    4,
                ),
                steps(0, &[(0, Ok), (1, Ok)], End::RemoveThenOk, 5),
                steps(0, &[(0, Ok), (1, Ok)], End::Ok, 6),
                execute(0, Run::Ok(7)),
                execute(1, Run::RemoveThenOk(8)),
                execute(1, Run::Ok(9)),
            ],
        ),
        (
            "step results that cannot be stored never run again",
            vec![
                steps(2, &[(0, Ok), (1, TooLarge), (2, Ok)], End::Ok, 1),
                steps(2, &[(0, Ok), (1, Ok), (2, Ok)], End::Ok, 2),
                execute(2, Run::Ok(3)),
                Reopen,
                tx(2, Run::Ok(4)),
                steps(3, &[(0, Unencodable)], End::Ok, 5),
                steps(3, &[(0, Ok)], End::Ok, 6),
                steps(1, &[(0, Ok), (1, TooLarge)], End::Panic, 7),
                steps(1, &[(0, Ok), (1, TooLarge)], End::Ok, 8),
                steps(0, &[(0, Ok)], End::TooLarge, 9),
                execute(0, Run::Ok(10)),
            ],
        ),
        (
            "results that cannot be stored, and errors, and JSON",
            vec![
                execute(0, Run::TooLarge),
                execute(0, Run::Ok(1)),
                execute(1, Run::Unencodable),
                steps(1, &[], End::Ok, 2),
                execute(2, Run::PermanentUnencodable(3)),
                execute(2, Run::Permanent(4)),
                execute(3, Run::Tagged(5)),
                Execute {
                    key: 3,
                    run: Run::Tagged(6),
                    fingerprint: None,
                    ttl_s: None,
                    json: true,
                },
                Advance { secs: 101 },
                Execute {
                    key: 3,
                    run: Run::Tagged(7),
                    fingerprint: None,
                    ttl_s: None,
                    json: true,
                },
                Reopen,
                execute(3, Run::Ok(8)),
                steps(3, &[], End::Ok, 9),
                tx(3, Run::Ok(10)),
            ],
        ),
        (
            "panicking predicates leave a retryable record, never an orphan",
            vec![
                execute(0, Run::PredicatePanic(1)),
                execute(0, Run::PredicatePanic(2)),
                Reopen,
                execute(0, Run::Ok(3)),
                execute(1, Run::Retryable(4)),
                tx(1, Run::Ok(6)),
            ],
        ),
        (
            "transactional lives between multi-step lives",
            vec![
                steps(0, &[(0, Ok), (1, Fail)], End::Ok, 1),
                tx(0, Run::Retryable(2)),
                steps(0, &[(0, Ok), (1, Ok)], End::Err, 3),
                tx(0, Run::Ok(4)),
                steps(0, &[(0, Ok), (1, Ok)], End::Ok, 5),
                Advance { secs: 101 },
                tx(0, Run::Retryable(6)),
                steps(0, &[(0, Ok), (1, Ok)], End::Ok, 7),
                Advance { secs: 101 },
                tx(0, Run::TooLarge),
                tx(0, Run::Unencodable),
                Remove { key: 0 },
                steps(0, &[(0, Ok)], End::Err, 8),
                Advance { secs: 101 },
                tx(0, Run::Tagged(9)),
                Sweep,
                tx(0, Run::Permanent(10)),
                steps(0, &[(0, Ok)], End::Ok, 11),
                tx(0, Run::Ok(12)),
            ],
        ),
        (
            "results above the blob threshold replay intact, also after a reopen",
            vec![
                execute(0, Run::Big(1)),
                execute(0, Run::Ok(2)),
                Reopen,
                execute(0, Run::Ok(3)),
                tx(1, Run::Big(4)),
                Reopen,
                steps(1, &[], End::Ok, 5),
                steps(2, &[(0, Big), (1, Fail)], End::Ok, 6),
                Reopen,
                steps(2, &[(0, Big), (1, Ok)], End::Ok, 7),
                Reopen,
                execute(2, Run::Ok(8)),
                Execute {
                    key: 3,
                    run: Run::Big(9),
                    fingerprint: None,
                    ttl_s: None,
                    json: true,
                },
            ],
        ),
        (
            "fingerprints of equal maps match whatever the order; other maps do not",
            vec![
                Execute {
                    key: 0,
                    run: Run::Retryable(1),
                    fingerprint: Some(Fp::Map(2)),
                    ttl_s: None,
                    json: false,
                },
                Execute {
                    key: 0,
                    run: Run::Ok(2),
                    fingerprint: Some(Fp::Map(2)),
                    ttl_s: None,
                    json: false,
                },
                Execute {
                    key: 0,
                    run: Run::Ok(3),
                    fingerprint: Some(Fp::Map(2)),
                    ttl_s: None,
                    json: false,
                },
                Execute {
                    key: 0,
                    run: Run::Ok(4),
                    fingerprint: Some(Fp::Map(3)),
                    ttl_s: None,
                    json: false,
                },
                Execute {
                    key: 0,
                    run: Run::Ok(5),
                    fingerprint: Some(Fp::Bytes(2)),
                    ttl_s: None,
                    json: false,
                },
                Tx {
                    key: 0,
                    run: Run::Ok(6),
                    fingerprint: Some(Fp::Map(2)),
                    ttl_s: None,
                    json: false,
                },
                Tx {
                    key: 0,
                    run: Run::Ok(6),
                    fingerprint: Some(Fp::Map(3)),
                    ttl_s: None,
                    json: false,
                },
            ],
        ),
    ];
    for (name, ops) in scenarios {
        for immediate in [true, false] {
            let r = std::panic::catch_unwind(|| reference::run(immediate, &ops));
            assert!(r.is_ok(), "scenario {name:?} (immediate: {immediate})");
        }
    }
}

/// The contract: a panic in a `permanent_if` predicate leaves the record FailedRetryable
/// (attempts + 1), as a panic in the operation does, in a transaction too. The library leaves
/// a transaction's record as it was: absent here.
#[test]
#[ignore = "known divergence: a transaction's panicking predicate records nothing"]
fn known_divergence_tx_predicate_panic() {
    reference::quiet_model_panics();
    reference::run(true, &[tx(0, Run::PredicatePanic(0))]);
    reference::run(
        true,
        &[execute(1, Run::Retryable(4)), tx(1, Run::PredicatePanic(5))],
    );
}
