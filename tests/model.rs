//! Model-based tests: random operation sequences against the store and a reference model of
//! the contract table; a divergence shrinks to a minimal sequence.

mod common;
mod reference;

use proptest::prelude::*;
use reference::{Op, Run, KEYS};

fn run_strategy() -> impl Strategy<Value = Run> {
    prop_oneof![
        4 => any::<u16>().prop_map(Run::Ok),
        2 => any::<u16>().prop_map(Run::Permanent),
        2 => any::<u16>().prop_map(Run::Retryable),
        1 => Just(Run::Panic),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0..KEYS, run_strategy(), proptest::option::weighted(0.4, 2u8..4), proptest::option::weighted(0.3, 0u8..120))
            .prop_map(|(key, run, fingerprint, ttl_s)| Op::Execute { key, run, fingerprint, ttl_s }),
        3 => (0u16..250).prop_map(|secs| Op::Advance { secs }),
        1 => Just(Op::Sweep),
        1 => (0..KEYS).prop_map(|key| Op::Remove { key }),
        1 => Just(Op::Reopen),
        4 => (0..KEYS, [0u8..3, 0u8..3], proptest::option::weighted(0.4, 0u8..2), any::<u16>())
            .prop_map(|(key, names, fail_at, value)| Op::Steps { key, names, fail_at, value }),
    ]
}

fn cases() -> u32 {
    let cases = common::env_count("IDEMSTORE_MODEL_CASES", 48);
    u32::try_from(cases).expect("IDEMSTORE_MODEL_CASES is too large")
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
    reference::run(
        true,
        &[
            Execute {
                key: 0,
                run: Run::Retryable(1),
                fingerprint: Some(2),
                ttl_s: None,
            },
            Execute {
                key: 0,
                run: Run::Ok(5),
                fingerprint: None,
                ttl_s: Some(3),
            },
            Execute {
                key: 0,
                run: Run::Ok(6),
                fingerprint: Some(3),
                ttl_s: None,
            },
            Advance { secs: 3 },
            Execute {
                key: 0,
                run: Run::Panic,
                fingerprint: Some(3),
                ttl_s: None,
            },
            Sweep,
            Reopen,
            Execute {
                key: 0,
                run: Run::Permanent(9),
                fingerprint: None,
                ttl_s: None,
            },
            Execute {
                key: 0,
                run: Run::Ok(1),
                fingerprint: None,
                ttl_s: None,
            },
            Remove { key: 0 },
            Execute {
                key: 0,
                run: Run::Ok(2),
                fingerprint: None,
                ttl_s: None,
            },
        ],
    );
}
