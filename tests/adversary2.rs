//! Adversarial review, second round: each test is named after a promise of docs/design.md or
//! README.md.
//!
//! Tests marked DEFECT fail on the current code: their opening comment gives the promise, why
//! it breaks, and the root cause. Tests marked SURVIVED are attacks the code withstood, kept
//! as cheap deterministic regression tests.

mod common;

use common::{Scratch, ServiceError, START_MS};
use idemstore::{
    Codec, Error, ExecuteError, ManualClock, MemoryEngine, OrphanPolicy, RecordState, StepError,
    Store, StoreBuilder,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::time::Duration;

fn store_error<T: Debug, E: Debug>(r: Result<T, ExecuteError<E>>) -> Error {
    match r {
        Err(ExecuteError::Store(e)) => e,
        other => panic!("expected a store error, got {other:?}"),
    }
}

fn memory_builder(clock: &ManualClock) -> StoreBuilder {
    Store::builder("memory")
        .clock(clock.clone())
        .sweep_interval(None)
}

// ---------------------------------------------------------------------------------------------
// DEFECT. Promise (design §2, last row): "Once any durability point has failed, every replay
// (of an outcome or a step) first makes one of its own, and fails rather than return what may
// not be durable"; README "Inspection": `store.record(key)` gives the record's state, which an
// operator reads to reconcile after `Interrupted` (README "Crashes").
//
// After the outcome's barrier failed, `store.record(key)` reports `Completed` (and
// `store.steps(key)` reports recorded steps) straight from the engine's live tables, with no
// durability point of its own: a power loss then takes the record back to the durable
// Pending claim. The caller was told "Completed" about an outcome that was never durable.
//
// Root cause: src/api/store.rs:409 `Store::record` (and :350 `Store::steps`, :553 `Records::next`) read
// `engine.get` / `engine.steps` and never call `StoreState::durable_before_replay`
// (src/driver/state.rs:51), which only the drivers' replay paths use
// (src/driver/execute.rs:268, src/driver/context.rs:45).
#[test]
fn what_the_store_reports_after_a_failed_durability_point_survives_a_power_loss() {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let store = engine.open(memory_builder(&clock)).unwrap();
    // execute_once under Rerun makes one barrier, the outcome's (its claim needs none).
    engine.fail_nth_barrier(1);
    let e = store_error(store.execute_once("k", || Ok::<_, ServiceError>(7u32)));
    assert!(matches!(e, Error::Storage(_)), "{e}");
    let reported = store.record("k").unwrap().map(|i| i.state);
    // A power loss now, then a restart.
    engine.crash();
    drop(store);
    let store = engine.open(memory_builder(&clock)).unwrap();
    let after = store.record("k").unwrap().map(|i| i.state);
    assert_eq!(
        after, reported,
        "store.record said {reported:?} after a failed durability point; after a power loss \
         the record is {after:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// DEFECT. Promise (README "Multi-step operations": "The guarantee for steps is the one for
// whole operations, per step: a step's side effect runs again only if a crash fell between
// the step's effect and its durable record (under `Rerun`)"; design §2: "storage I/O error
// after f ran → Storage; ... the next call finds the outcome or an orphan", and an orphan
// under `OrphanPolicy::Report` is `Interrupted`, never a silent re-run).
//
// Under `Report`, a step ("charge") runs, and the write of its step record fails (a full
// disk). The run ends with `Storage`, but the record is written FailedRetryable, so the next
// call claims the key and runs "charge" a second time without any `Interrupted` — the same
// failure on a whole operation's outcome write leaves an orphan that `Report` reports.
//
// Root cause: src/driver/context.rs:330 `Context::record` turns the failed step write into a
// `RunFailure` with no terminal outcome (`(Err(e), _) => Err(self.fail(e, None))`), and
// src/core/settle.rs:112-117 `settle` maps every such failure to `FailedRetryable`
// (`(Ok(_), Some(RunFailure { terminal: None, .. })) => plain(RecordState::FailedRetryable, ..)`),
// which `rules::as_leader` claims again whatever the orphan policy.
#[test]
fn under_report_a_step_whose_record_was_not_written_never_runs_again_silently() {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let store = engine
        .open(memory_builder(&clock).orphan_policy(OrphanPolicy::Report))
        .unwrap();
    let charges = Cell::new(0u32);
    let checkout = |ctx: &mut idemstore::Context<'_>| {
        let receipt = ctx.step("charge", || {
            charges.set(charges.get() + 1);
            Ok::<_, ServiceError>(4200u64)
        })?;
        Ok::<_, StepError<ServiceError>>(receipt)
    };
    // Writes of the call: the expiry entry (1), the claim (2), the step record (3).
    engine.fail_nth_write(3);
    let e = store_error(store.execute_steps("checkout", checkout));
    assert!(matches!(e, Error::Storage(_)), "{e}");
    assert_eq!(charges.get(), 1);
    let again = store.execute_steps("checkout", checkout);
    assert_eq!(
        charges.get(),
        1,
        "the charge ran again under OrphanPolicy::Report, with no Interrupted; the call \
         returned {again:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Durability at the system-call level (the approach of tests/sync_calls.rs).

const SYNC_DIR_VAR: &str = "IDEMSTORE_ADV2_SYNC_DIR";

#[test]
#[ignore = "run under strace by the tests below"]
fn adversary2_open_child() {
    let Ok(dir) = std::env::var(SYNC_DIR_VAR) else {
        return;
    };
    let store = Store::open(std::path::Path::new(&dir).join("db")).expect("open");
    store.close().expect("close");
}

/// (syscall, path) for every fsync / fdatasync / O_CREAT open under `dir` made by `child`
/// of this test binary, in order; None if strace is missing.
fn traced_syncs(child: &str, dir: &std::path::Path) -> Option<Vec<(String, String)>> {
    let dir_str = dir.to_str().unwrap().to_owned();
    let trace = common::strace_child(
        child,
        "openat,fsync,fdatasync",
        std::path::Path::new(&dir_str),
        SYNC_DIR_VAR,
    )?;
    let mut events = Vec::new();
    for line in trace.lines() {
        let call = line
            .split_once(' ')
            .map_or(line, |(_, rest)| rest.trim_start());
        if call.starts_with("openat(") && call.contains("O_CREAT") {
            if let Some(path) = call.split('"').nth(1) {
                if path.starts_with(&dir_str) {
                    events.push(("create".to_owned(), path.to_owned()));
                }
            }
        } else if call.starts_with("fsync(") || call.starts_with("fdatasync(") {
            if let Some((_, p)) = call.split_once('<') {
                if let Some((p, _)) = p.split_once('>') {
                    events.push(("sync".to_owned(), p.to_owned()));
                }
            }
        }
    }
    Some(events)
}

// DEFECT. Promise (README "Where this differs" 7: the store detects lost data by "a marker
// file written after its first durable metadata" and returns `Damaged`; src/engine/sled/mod.rs
// SIDECAR: "written once the store's metadata is durable"; design §6 "Durable means power-loss
// durable", and sled's flush alone is not).
//
// On the first open the sidecar `idemstore.format` is created and fsynced right after
// `init_meta`, whose only barrier is sled's `flush` (sync_file_range: neither the data file's
// size nor the device cache), and before the first `fdatasync` of sled's data file and the
// sync of sled's `conf`. A power loss in that window leaves a durable sidecar beside metadata
// (or a `conf`) that never reached the disk, and every later open refuses the store as
// `Damaged` ("its metadata is gone although it was written durably before") — a fresh,
// empty store bricked by a power cut during its first open.
//
// Root cause: src/engine/sled/mod.rs `open`: the sidecar is written and synced (lines 128-134)
// before `files.make_durable()` (line 145) and the `conf` / directory syncs (lines 147-150).
#[test]
fn the_damage_marker_is_durable_only_after_the_metadata_it_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let Some(events) = traced_syncs("adversary2_open_child", dir.path()) else {
        return;
    };
    let db = format!("{}/db", dir.path().to_str().unwrap());
    let at = |what: &str| {
        events
            .iter()
            .position(|(k, p)| k == "sync" && *p == what)
            .unwrap_or_else(|| panic!("no sync of {what}: {events:?}"))
    };
    let marker = at(&format!("{db}/idemstore.format"));
    for vouched in [format!("{db}/db"), format!("{db}/conf")] {
        assert!(
            at(&vouched) < marker,
            "the sidecar was synced (event {marker}) before {vouched} (event {}): {events:?}",
            at(&vouched)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// SURVIVED. Promise (design §5): the encode check (decode back, compare shape and data) refuses
// only values that would not replay; a legitimate value is stored and replays equal, under
// both codecs. Attacked with types whose order, float bits, width or human-readable form could
// trip a data comparison: HashSet / HashMap (non-string keys under JSON), f32 and f64 edge
// values (-0.0, subnormals, extremes), NaN under bincode, Option<f64>, u128 / i128 extremes,
// Box<str>, addresses, durations, system times, chars, nested sets in maps, serde_json::Value.

/// Runs `value` through a fresh key with `codec`, then replays it; returns (first, replay).
fn stored_and_replayed<T>(store: &Store, key: &str, codec: Codec, value: T) -> (T, T)
where
    T: Serialize + DeserializeOwned + Clone + Debug,
{
    let first = store
        .call(key)
        .codec(codec)
        .run(|| Ok::<_, ServiceError>(value.clone()))
        .unwrap_or_else(|e| panic!("{key} ({codec:?}): refused {value:?}: {e}"));
    assert!(!first.is_replayed());
    let again = store
        .call(key)
        .codec(codec)
        .run(|| -> Result<T, ServiceError> { panic!("{key}: ran again") })
        .unwrap_or_else(|e| panic!("{key} ({codec:?}): replay failed: {e}"));
    assert!(again.is_replayed());
    (first.into_value(), again.into_value())
}

fn same_after_replay<T>(store: &Store, key: &str, value: T)
where
    T: Serialize + DeserializeOwned + Clone + Debug + PartialEq,
{
    for codec in [Codec::Bincode, Codec::Json] {
        let (first, again) =
            stored_and_replayed(store, &format!("{key}-{codec:?}"), codec, value.clone());
        assert_eq!(first, value, "{key} ({codec:?})");
        assert_eq!(again, value, "{key} ({codec:?}): replay differs");
    }
}

#[test]
fn legitimate_values_are_stored_and_replay_equal_under_both_codecs() {
    let s = Scratch::new();
    let store = s.open();
    let set: HashSet<String> = (0..40).map(|i| format!("item-{i}")).collect();
    same_after_replay(&store, "hashset", set);
    let map: HashMap<u32, String> = (0..40).map(|i| (i * 7919, format!("v{i}"))).collect();
    same_after_replay(&store, "hashmap-u32", map);
    let neg: HashMap<i64, u8> = [(-5, 1), (i64::MIN, 2), (i64::MAX, 3)].into();
    same_after_replay(&store, "hashmap-i64", neg);
    let bools: BTreeMap<bool, String> = [(true, "t".into()), (false, "f".into())].into();
    same_after_replay(&store, "map-bool", bools);
    let chars: HashMap<char, u8> = [('a', 1), ('é', 2), ('"', 3), ('\\', 4)].into();
    same_after_replay(&store, "map-char", chars);
    let nested: HashMap<String, HashSet<u32>> = (0..8)
        .map(|i| (format!("k{i}"), (0..i).collect()))
        .collect();
    same_after_replay(&store, "nested-sets", nested);
    let floats32 = vec![
        0.1f32,
        -0.0,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x007f_ffff),
        f32::MAX,
        f32::MIN,
        16_777_217.0,
        3.402_823_5e38,
        1.0e-45,
    ];
    same_after_replay(&store, "f32", floats32);
    let floats64 = vec![
        -0.0f64,
        f64::from_bits(1),
        f64::MIN_POSITIVE,
        f64::MAX,
        0.1 + 0.2,
        92.421_325_128_135_95,
        5e-324,
    ];
    same_after_replay(&store, "f64", floats64);
    same_after_replay(&store, "opt-f64", vec![Some(1.5f64), None, Some(-0.0)]);
    same_after_replay(&store, "u128", (u128::MAX, i128::MIN, i128::MAX, u64::MAX));
    same_after_replay(&store, "box-str", Box::<str>::from("boxed ✓"));
    same_after_replay(
        &store,
        "addrs",
        (
            std::net::IpAddr::from([10, 0, 0, 1]),
            "[2001:db8::1]:8080"
                .parse::<std::net::SocketAddr>()
                .unwrap(),
        ),
    );
    same_after_replay(
        &store,
        "times",
        (
            Duration::new(5, 123_456_789),
            std::time::UNIX_EPOCH + Duration::new(1_780_000_000, 999_999_999),
        ),
    );
    same_after_replay(&store, "chars", vec!['\0', 'ß', '\u{10FFFF}']);
    same_after_replay(&store, "unit", ((), None::<()>, vec![(); 3]));
    let sets: BTreeSet<Vec<u8>> = [vec![], vec![0], vec![0, 0]].into();
    same_after_replay(&store, "btreeset", sets);
    // NaN under bincode keeps its bits.
    let nan = f64::from_bits(0x7ff8_0000_0000_0001);
    let (_, again) = stored_and_replayed(&store, "nan", Codec::Bincode, nan);
    assert_eq!(again.to_bits(), nan.to_bits());
    // serde_json::Value with every number kind, under JSON.
    let value =
        serde_json::json!({"u": u64::MAX, "i": i64::MIN, "f": 1.0, "z": -0.0, "a": [1, -1, 0.5]});
    let (_, again) = stored_and_replayed(&store, "json-value", Codec::Json, value.clone());
    assert_eq!(again, value);
}

// SURVIVED. Values that would not replay are refused on the first call, and f never runs
// again: NaN and infinities under JSON (written as null), `Some(())` under JSON (null: None), a
// JSON map with tuple keys.
#[test]
fn values_json_cannot_replay_are_refused_at_once() {
    let s = Scratch::new();
    let store = s.open();
    for (key, value) in [("nan", f64::NAN), ("inf", f64::INFINITY)] {
        let e = store_error(
            store
                .call(key)
                .codec(Codec::Json)
                .run(|| Ok::<_, ServiceError>(value)),
        );
        assert!(matches!(e, Error::ResultNotEncodable { .. }), "{key}: {e}");
        let e = store_error(
            store
                .call(key)
                .codec(Codec::Json)
                .run(|| -> Result<f64, ServiceError> { panic!("ran again") }),
        );
        assert!(matches!(e, Error::ResultNotEncodable { .. }), "{key}: {e}");
    }
    let e = store_error(
        store
            .call("some-nan")
            .codec(Codec::Json)
            .run(|| Ok::<_, ServiceError>(Some(f64::NAN))),
    );
    assert!(matches!(e, Error::ResultNotEncodable { .. }), "{e}");
    // `Some(())` is written as null, which reads back as None.
    let e = store_error(
        store
            .call("some-unit")
            .codec(Codec::Json)
            .run(|| Ok::<_, ServiceError>(Some(()))),
    );
    assert!(matches!(e, Error::ResultNotEncodable { .. }), "{e}");
    let tuple_keys: HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
    let e = store_error(
        store
            .call("tuple-keys")
            .codec(Codec::Json)
            .run(|| Ok::<_, ServiceError>(tuple_keys.clone())),
    );
    assert!(matches!(e, Error::ResultNotEncodable { .. }), "{e}");
    // ... while bincode stores the same map.
    let (_, again) = stored_and_replayed(
        &store,
        "tuple-keys-bincode",
        Codec::Bincode,
        tuple_keys.clone(),
    );
    assert_eq!(again, tuple_keys);
}

// ---------------------------------------------------------------------------------------------
// SURVIVED. Promise (design §2, last row): once a durability point has failed, every replay of
// an outcome, of a permanent error and of a step makes one of its own first, so what it
// returns survives a power loss. Checked on the memory engine: after a failed barrier, each
// replay makes a barrier, and a power loss right after it keeps what was replayed.
#[test]
fn replays_after_a_failed_durability_point_make_their_own_and_survive_a_power_loss() {
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
    #[error("declined")]
    struct Declined;

    // An outcome, then a permanent error.
    for permanent in [false, true] {
        let engine = MemoryEngine::new();
        let clock = ManualClock::new(START_MS);
        let store = engine.open(memory_builder(&clock)).unwrap();
        let call = |store: &Store<MemoryEngine>, value: u32| {
            store
                .call("k")
                .permanent_if(|_: &Declined| true)
                .run(move || match permanent {
                    true => Err(Declined),
                    false => Ok(value),
                })
        };
        engine.fail_nth_barrier(1); // the outcome's (under Rerun the claim makes none)
        let first = call(&store, 1);
        assert!(
            matches!(first, Err(ExecuteError::Store(Error::Storage(_)))),
            "{first:?}"
        );
        let before = engine.barriers();
        let replay = call(&store, 2);
        assert!(
            engine.barriers() > before,
            "the replay made no durability point"
        );
        engine.crash();
        drop(store);
        let store = engine.open(memory_builder(&clock)).unwrap();
        let after = call(&store, 3);
        match (permanent, replay, after) {
            (false, Ok(r), Ok(a)) => {
                assert!(r.is_replayed() && a.is_replayed());
                assert_eq!((*r, *a), (1, 1));
            }
            (
                true,
                Err(ExecuteError::Operation { replayed: true, .. }),
                Err(ExecuteError::Operation { replayed: true, .. }),
            ) => {}
            other => panic!("permanent={permanent}: {other:?}"),
        }
    }

    // A step whose barrier failed, replayed by the next attempt.
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let store = engine.open(memory_builder(&clock)).unwrap();
    let charges = Cell::new(0u32);
    let run = |store: &Store<MemoryEngine>, fail_after: bool| {
        store.execute_steps("s", |ctx| {
            let c = ctx.step("charge", || {
                charges.set(charges.get() + 1);
                Ok::<_, ServiceError>(charges.get())
            })?;
            if fail_after {
                return Err(StepError::Failed(ServiceError::Declined));
            }
            Ok::<_, StepError<ServiceError>>(c)
        })
    };
    // Barriers: the step (1); under Rerun the claim makes none.
    engine.fail_nth_barrier(1);
    let e = store_error(run(&store, false));
    assert!(matches!(e, Error::Storage(_)), "{e}");
    let before = engine.barriers();
    let second = run(&store, true);
    assert!(engine.barriers() > before);
    assert!(
        matches!(second, Err(ExecuteError::Operation { .. })),
        "{second:?}"
    );
    engine.crash();
    drop(store);
    let store = engine.open(memory_builder(&clock)).unwrap();
    let third = run(&store, false).unwrap();
    assert_eq!((*third, charges.get()), (1, 1), "the charge ran again");
}

// SURVIVED. Promise (README Configuration: keys up to `max_key_bytes`, at most 65535; design
// §7: a record leaves with its life's steps). A key of the largest length records, replays
// and removes its steps on both engines, and a key that is a prefix of another never sees the
// other's steps.
#[test]
fn the_longest_keys_and_prefix_keys_keep_their_steps_apart() {
    let s = Scratch::new();
    let sled_store = s.builder().max_key_bytes(65535).open().unwrap();
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let mem_store = engine
        .open(memory_builder(&clock).max_key_bytes(65535))
        .unwrap();
    fn check(store: &dyn StepsApi, label: &str) {
        let long = "x".repeat(65535);
        let short = "x".repeat(65534);
        for (key, v) in [(&long, 1u32), (&short, 2u32)] {
            let out = store.run_two_steps(key, v);
            assert_eq!(out, Ok(v + 10), "{label}");
        }
        assert_eq!(store.step_names(&long).len(), 2, "{label}");
        assert!(store.drop_key(&long), "{label}");
        assert!(store.step_names(&long).is_empty(), "{label}");
        assert_eq!(
            store.step_names(&short).len(),
            2,
            "{label}: the prefix key lost its steps"
        );
        assert_eq!(store.run_two_steps(&short, 99), Ok(12), "{label}: replay");
    }
    check(&sled_store, "sled");
    check(&mem_store, "memory");
}

/// The few calls `the_longest_keys_...` makes, for either engine's store.
trait StepsApi {
    fn run_two_steps(&self, key: &str, v: u32) -> Result<u32, String>;
    fn step_names(&self, key: &str) -> Vec<String>;
    fn drop_key(&self, key: &str) -> bool;
}

macro_rules! steps_api {
    ($engine:ty) => {
        impl StepsApi for Store<$engine> {
            fn run_two_steps(&self, key: &str, v: u32) -> Result<u32, String> {
                self.execute_steps(key, |ctx| {
                    let a = ctx.step("a", || Ok::<_, ServiceError>(v))?;
                    let b = ctx.step("b", || Ok::<_, ServiceError>(10u32))?;
                    Ok::<_, StepError<ServiceError>>(a + b)
                })
                .map(|o| *o)
                .map_err(|e| e.to_string())
            }
            fn step_names(&self, key: &str) -> Vec<String> {
                self.steps(key)
                    .unwrap()
                    .into_iter()
                    .map(|s| s.name)
                    .collect()
            }
            fn drop_key(&self, key: &str) -> bool {
                self.remove(key).unwrap()
            }
        }
    };
}
steps_api!(idemstore::SledEngine);
steps_api!(MemoryEngine);

// SURVIVED. Zero-byte outcomes (`()` under bincode encodes to nothing) record and replay, as
// results and as step results, and are not mistaken for "no outcome".
#[test]
fn empty_outcomes_replay_as_outcomes() {
    let s = Scratch::new();
    let store = s.open();
    let runs = Cell::new(0);
    for _ in 0..2 {
        let out = store
            .execute_steps("unit", |ctx| {
                ctx.step("nothing", || {
                    runs.set(runs.get() + 1);
                    Ok::<_, ServiceError>(())
                })?;
                Ok::<_, StepError<ServiceError>>(())
            })
            .unwrap();
        assert_eq!(*out, ());
    }
    assert_eq!(runs.get(), 1);
    assert_eq!(
        store.record("unit").unwrap().unwrap().state,
        RecordState::Completed
    );
}

// ---------------------------------------------------------------------------------------------
// DEFECT. Promise (design §2: "`f` returned, but its result (or permanent error) is over
// `max_result_bytes`, or its `Serialize` fails or panics ... → Completed (or FailedPermanent)
// with an unstorable note: `f` never runs again; every call, the first included, gets
// `ResultTooLarge` / `ResultNotEncodable`"; §12: the transactional driver "decides with the
// same rules"; §1: a permanent error is recorded once and replayed, `f` does not run again).
//
// Through `execute_once_in_tx` (`Call::run_in_tx`), an abort with an error the call declares
// permanent but whose `Serialize` fails is recorded as FailedRetryable. The first caller gets
// the permanent error itself (`Operation`, not `ResultNotEncodable`); the next call with the
// same key runs the transaction again, and when it now succeeds it commits its effects: one
// idempotency key has answered "declined, permanently" and then applied the reservation.
//
// Root cause: src/driver/transaction.rs:294 `record_failure`: `Err(_) => retryable` ("An
// unstorable permanent error stays retryable") instead of recording FailedPermanent with the
// unstorable note as `core::settle::settle` does for the plain driver.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("out of stock")]
struct OutOfStock;

impl Serialize for OutOfStock {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this error does not serialize"))
    }
}

impl<'de> Deserialize<'de> for OutOfStock {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d).map(|()| OutOfStock)
    }
}

#[test]
fn a_transactional_permanent_error_that_cannot_be_stored_never_lets_f_run_again() {
    let s = Scratch::new();
    let store = s.open();
    let stock = store.tree("stock").unwrap();
    let runs = std::sync::atomic::AtomicU32::new(0);
    let reserve = |t: &[sled::transaction::TransactionalTree]| {
        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match t[0].get("sku")? {
            None => sled::transaction::abort(OutOfStock),
            Some(_) => {
                t[0].remove("sku")?;
                Ok(1u32)
            }
        }
    };
    let call = || store.call("reserve-1").permanent_if(|_: &OutOfStock| true);
    let first = call().run_in_tx(&[&stock], reserve);
    let first_ran = runs.load(std::sync::atomic::Ordering::SeqCst);
    // Stock arrives; the client retries with the same key.
    stock.insert("sku", &[1]).unwrap();
    let second = call().run_in_tx(&[&stock], reserve);
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        first_ran,
        "the operation ran again after the permanent error {first:?}; second call: {second:?}"
    );
    assert!(
        matches!(
            first,
            Err(ExecuteError::Store(Error::ResultNotEncodable { .. }))
        ),
        "the first call got {first:?}"
    );
    drop(stock);
}
