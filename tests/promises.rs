//! Promises that an adversarial review found broken, one test each: a recorded step that ran
//! again with no crash, user code whose panic made the store run `f` twice, a new life of a
//! key that replayed an old life's steps, a sweep that delayed a replay, types that recorded
//! but never replayed, changed types that replayed different values, fingerprints of equal
//! maps that differed, and error messages a person could not act on.

mod common;

use common::{store_error, Scratch, ServiceError};
use idemstore::{Codec, Error, ExecuteError, Fingerprint, OrphanPolicy, RecordState, StepError};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Barrier;
use std::time::Duration;

// 1. Steps are found by their own index.
#[test]
fn an_ignored_step_error_does_not_shift_later_steps() {
    let s = Scratch::new();
    let store = s.open();
    let (charges, confirms) = (Cell::new(0), Cell::new(0));
    let attempt = |confirm_works: bool| {
        store.execute_steps("order-1", |ctx| {
            // Best effort: its error is ignored, so it records nothing on the first attempt.
            let _ = ctx.step("notify", || Err::<(), _>(ServiceError::Declined));
            let charge = ctx.step("charge", || {
                charges.set(charges.get() + 1);
                Ok::<_, ServiceError>(format!("ch_{}", charges.get()))
            })?;
            ctx.step("confirm", || {
                confirms.set(confirms.get() + 1);
                if confirm_works {
                    Ok(())
                } else {
                    Err(ServiceError::Declined)
                }
            })?;
            Ok::<_, StepError<ServiceError>>(charge)
        })
    };
    assert!(matches!(
        attempt(false),
        Err(ExecuteError::Operation { .. })
    ));
    for _ in 0..3 {
        let r = attempt(true).expect("a retry with the same steps in the same order succeeds");
        assert_eq!(*r, "ch_1");
    }
    assert_eq!(charges.get(), 1, "the recorded charge never runs again");
    assert_eq!(confirms.get(), 2);
}

#[test]
fn after_a_store_error_in_a_step_no_further_step_runs() {
    let s = Scratch::new();
    let store = s.open();
    let later = Cell::new(0);
    let r = store.execute_steps("k", |ctx| {
        ctx.step("a", || Ok::<_, ServiceError>(1))?;
        // A duplicate name is a store error; the operation ignores it and goes on.
        let ignored = ctx.step("a", || Ok::<_, ServiceError>(2));
        assert!(matches!(
            ignored,
            Err(StepError::Store(Error::InvalidStep { .. }))
        ));
        let next = ctx.step("b", || {
            later.set(later.get() + 1);
            Ok::<_, ServiceError>(3)
        });
        assert!(matches!(
            next,
            Err(StepError::Store(Error::InvalidStep { .. }))
        ));
        Ok::<_, StepError<ServiceError>>(0)
    });
    assert!(matches!(store_error(r), Error::InvalidStep { .. }));
    assert_eq!(later.get(), 0, "no step runs after a store error");
}

// 2. A step whose result cannot be stored ran once: it never runs again.
#[test]
fn a_step_with_an_oversized_result_never_runs_again() {
    let s = Scratch::new();
    let store = s.builder().max_result_bytes(64).open().unwrap();
    let runs = Cell::new(0);
    for _ in 0..3 {
        let r = store.execute_steps("k", |ctx| {
            ctx.step("big", || {
                runs.set(runs.get() + 1);
                Ok::<_, ServiceError>(vec![7u8; 1000])
            })?;
            Ok::<_, StepError<ServiceError>>(())
        });
        assert!(matches!(store_error(r), Error::ResultTooLarge { .. }));
    }
    assert_eq!(runs.get(), 1);
    assert_eq!(
        store.record("k").unwrap().unwrap().state,
        RecordState::Completed
    );
}

// 3. A panic in user code other than `f`.
#[derive(Debug)]
struct PanicsOnSerialize;

impl Serialize for PanicsOnSerialize {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        panic!("serializer bug");
    }
}

impl<'de> Deserialize<'de> for PanicsOnSerialize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d).map(|()| PanicsOnSerialize)
    }
}

#[test]
fn a_panicking_serialize_after_f_ran_is_unstorable_and_f_never_runs_again() {
    let s = Scratch::new();
    let store = s.open();
    let runs = Cell::new(0);
    for _ in 0..3 {
        let r = store.execute_once("k", || {
            runs.set(runs.get() + 1);
            Ok::<_, ServiceError>(PanicsOnSerialize)
        });
        assert!(matches!(store_error(r), Error::ResultNotEncodable { .. }));
    }
    assert_eq!(runs.get(), 1);
}

#[derive(Debug, Serialize, Deserialize)]
struct Declined;

#[test]
fn a_panicking_predicate_is_a_retryable_failure_not_an_orphan() {
    let s = Scratch::new();
    let store = s
        .builder()
        .orphan_policy(OrphanPolicy::Report)
        .open()
        .unwrap();
    let run = || {
        store
            .call("k")
            .permanent_if(|_: &Declined| panic!("predicate bug"))
            .run(|| Err::<u32, _>(Declined))
    };
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
    assert!(
        panicked.is_err(),
        "the predicate's panic reaches the caller"
    );
    assert_eq!(
        store.record("k").unwrap().unwrap().state,
        RecordState::FailedRetryable,
        "not left Pending (which this process would take for an orphan)"
    );
    // Under Report, a false orphan would be Interrupted; a retryable failure runs again.
    let again = store
        .execute_once("k", || Ok::<_, ServiceError>(5u32))
        .unwrap();
    assert_eq!(*again, 5);
}

#[test]
fn waiters_wake_after_a_panicking_predicate() {
    let s = Scratch::new();
    let store = s
        .builder()
        .orphan_policy(OrphanPolicy::Report)
        .wait_timeout(Duration::from_secs(30))
        .open()
        .unwrap();
    let gate = Barrier::new(2);
    std::thread::scope(|scope| {
        let leader = scope.spawn(|| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                store
                    .call("k")
                    .permanent_if(|_: &Declined| panic!("predicate bug"))
                    .run(|| {
                        gate.wait();
                        std::thread::sleep(Duration::from_millis(50));
                        Err::<u32, _>(Declined)
                    })
            }))
        });
        gate.wait();
        // Waits for the leader, then finds a retryable record (not an orphan): runs.
        let r = store.execute_once("k", || Ok::<_, ServiceError>(9u32));
        assert_eq!(*r.expect("the waiter runs after a retryable failure"), 9);
        assert!(leader.join().unwrap().is_err());
    });
}

#[test]
fn a_panicking_transient_predicate_leaves_a_retryable_record() {
    let s = Scratch::new();
    let store = s
        .builder()
        .orphan_policy(OrphanPolicy::Report)
        .open()
        .unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.execute_steps("k", |ctx| {
            let policy = idemstore::RetryPolicy::new();
            ctx.step_with_retry(
                "charge",
                &policy,
                |_: &ServiceError| panic!("predicate bug"),
                || Err::<u32, _>(ServiceError::Declined),
            )?;
            Ok::<_, StepError<ServiceError>>(())
        })
    }));
    assert!(r.is_err());
    assert_eq!(
        store.record("k").unwrap().unwrap().state,
        RecordState::FailedRetryable
    );
}

// 4. A life only ever sees its own steps.
fn charge_op<'a>(
    charges: &'a AtomicU32,
    hold: Option<&'a Barrier>,
) -> impl FnOnce(&mut idemstore::Context<'_>) -> Result<u32, StepError<ServiceError>> + 'a {
    move |ctx| {
        let id = ctx.step("charge", || {
            Ok::<_, ServiceError>(charges.fetch_add(1, Ordering::SeqCst) + 1)
        })?;
        if let Some(hold) = hold {
            hold.wait();
            hold.wait();
        }
        ctx.step("confirm", || Ok::<_, ServiceError>(()))?;
        Ok(id)
    }
}

#[test]
fn remove_while_a_multi_step_call_runs_gives_the_next_life_fresh_steps() {
    let s = Scratch::new();
    let store = s.open();
    let charges = AtomicU32::new(0);
    let hold = Barrier::new(2);
    std::thread::scope(|scope| {
        let running = scope.spawn(|| store.execute_steps("k", charge_op(&charges, Some(&hold))));
        hold.wait(); // charge recorded, confirm not yet
        assert!(store.remove("k").unwrap());
        hold.wait();
        let first = running.join().unwrap();
        assert!(
            matches!(store_error(first), Error::OutcomeNotRecorded { .. }),
            "the removed life's next step is refused"
        );
    });
    let next = store.execute_steps("k", charge_op(&charges, None)).unwrap();
    assert_eq!(
        *next, 2,
        "the new life charges afresh, never replaying the old charge"
    );
    assert_eq!(store.steps("k").unwrap().len(), 2);
    drop(store);
    assert_eq!(s.count_steps(), 2, "the removed life's steps are gone");
}

#[test]
fn remove_racing_a_fresh_call_never_hands_the_new_life_an_old_charge() {
    let s = Scratch::new();
    // Periodic: no flush between the calls' writes, so the race windows are wide.
    let store = s
        .builder()
        .durability(idemstore::Durability::Periodic(Duration::from_secs(60)))
        .open()
        .unwrap();
    let charges = AtomicU32::new(0);
    for round in 0..400 {
        let key = format!("k{round}");
        let old = *store
            .execute_steps(&key, charge_op(&charges, None))
            .unwrap();
        let start = Barrier::new(2);
        std::thread::scope(|scope| {
            let remover = scope.spawn(|| {
                start.wait();
                store.remove(&key).unwrap()
            });
            start.wait();
            let r = store.execute_steps(&key, charge_op(&charges, None));
            if let Ok(r) = r {
                assert!(
                    r.is_replayed() || *r != old,
                    "round {round}: a fresh run returned the removed life's charge {old}"
                );
            }
            remover.join().unwrap();
        });
        // Whatever the interleaving, the key's live steps belong to its live record.
        let steps = store.steps(&key).unwrap().len();
        let record = store.record(&key).unwrap();
        assert!(
            steps == 0 || record.is_some(),
            "round {round}: steps outlived their record"
        );
    }
}

#[test]
fn a_record_lost_without_its_steps_starts_a_fresh_life() {
    let s = Scratch::new();
    let charges = AtomicU32::new(0);
    {
        let store = s.open();
        store.execute_steps("k", charge_op(&charges, None)).unwrap();
    }
    // As a crash between removing the record and removing its steps would leave it.
    s.with_raw_db(|db| {
        let records = db.open_tree("idemstore/records").unwrap();
        records.remove("k").unwrap();
    });
    let store = s.open();
    let r = store.execute_steps("k", charge_op(&charges, None)).unwrap();
    assert_eq!(*r, 2, "the old life's charge is not replayed");
}

#[test]
fn a_transactional_life_between_two_multi_step_lives_leaves_no_steps_to_replay() {
    let s = Scratch::new();
    let store = s
        .builder()
        .default_ttl(Duration::from_secs(10))
        .open()
        .unwrap();
    let charges = AtomicU32::new(0);
    let failing_confirm = |ctx: &mut idemstore::Context<'_>| {
        ctx.step("charge", || {
            Ok::<_, ServiceError>(charges.fetch_add(1, Ordering::SeqCst) + 1)
        })?;
        ctx.step("confirm", || Err::<(), _>(ServiceError::Declined))?;
        Ok::<u32, StepError<ServiceError>>(0)
    };
    assert!(store.execute_steps("k", failing_confirm).is_err());
    s.clock.advance(Duration::from_secs(11));
    let tree = store.tree("t").unwrap();
    store
        .execute_once_in_tx("k", &[&tree], |_| {
            Ok::<_, sled::transaction::ConflictableTransactionError<()>>(7u32)
        })
        .unwrap();
    s.clock.advance(Duration::from_secs(11));
    let r = store.execute_steps("k", charge_op(&charges, None)).unwrap();
    assert_eq!(*r, 2, "the third life charges afresh");
}

// 6. A sweep never delays a replay of a live record.
#[test]
fn a_sweep_never_delays_a_replay_of_a_live_record() {
    let s = Scratch::new();
    let store = s
        .builder()
        .wait_timeout(Duration::ZERO)
        .default_ttl(Duration::from_secs(3600))
        .open()
        .unwrap();
    let mut in_progress = 0;
    for round in 0..60 {
        let keys: Vec<String> = (0..8).map(|i| format!("r{round}-k{i}")).collect();
        for key in &keys {
            // A retryable failure indexes an early expiry; the completion a later one.
            let _ = store
                .call(key)
                .ttl(Duration::from_secs(1))
                .run(|| Err::<u32, _>(ServiceError::Declined));
            store
                .execute_once(key, || Ok::<_, ServiceError>(1u32))
                .unwrap();
        }
        s.clock.advance(Duration::from_secs(2)); // the early entries are due, the records live
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let replayers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        let mut refused = 0;
                        while !stop.load(Ordering::Relaxed) {
                            for key in &keys {
                                match store.execute_once(key, || Ok::<_, ServiceError>(2u32)) {
                                    Ok(r) => assert_eq!(*r, 1),
                                    Err(ExecuteError::Store(Error::InProgress { .. })) => {
                                        refused += 1
                                    }
                                    Err(e) => panic!("{e}"),
                                }
                            }
                        }
                        refused
                    })
                })
                .collect();
            // Stop the replayers whatever the sweeps do, then check.
            let swept: Vec<_> = (0..20).map(|_| store.sweep_now()).collect();
            stop.store(true, Ordering::Relaxed);
            in_progress += replayers
                .into_iter()
                .map(|r| r.join().unwrap())
                .sum::<u32>();
            for r in swept {
                assert_eq!(r.unwrap(), 0, "nothing live is swept");
            }
        });
    }
    assert_eq!(
        in_progress, 0,
        "replays of live records were refused during sweeps"
    );
}

// 7. An empty path is refused before anything is written.
#[test]
fn an_empty_path_is_refused_before_writing() {
    let here = std::env::current_dir().unwrap();
    let before: Vec<_> = std::fs::read_dir(&here)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let r = idemstore::Store::open("");
    assert!(matches!(r, Err(Error::InvalidConfig(m)) if m.contains("empty")));
    let after: Vec<_> = std::fs::read_dir(&here)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        before.len(),
        after.len(),
        "nothing was written into {here:?}"
    );
}

// 8. Types that serialize but do not decode with bincode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
enum Tagged {
    Paid { cents: u64 },
    Refunded { cents: u64, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sparse {
    id: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    note: Option<String>,
}

fn refused_at_once_then_stored_as_json<T>(key: &str, value: T)
where
    T: Serialize + serde::de::DeserializeOwned + Clone + PartialEq + std::fmt::Debug,
{
    let s = Scratch::new();
    let store = s.open();
    let runs = Cell::new(0);
    let run = || {
        store.execute_once(key, || {
            runs.set(runs.get() + 1);
            Ok::<_, ServiceError>(value.clone())
        })
    };
    let first = store_error(run());
    assert!(
        matches!(&first, Error::ResultNotEncodable { message, .. } if message.contains("Codec::Json")),
        "{first}"
    );
    assert!(matches!(
        store_error(run()),
        Error::ResultNotEncodable { .. }
    ));
    assert_eq!(runs.get(), 1, "recorded as run, never run again");
    let json = || {
        store
            .call("json")
            .codec(Codec::Json)
            .run(|| Ok::<_, ServiceError>(value.clone()))
    };
    assert_eq!(*json().unwrap(), value);
    let again = json().unwrap();
    assert!(again.is_replayed());
    assert_eq!(*again, value);
}

#[test]
fn json_values_are_refused_by_bincode_at_once_and_stored_as_json() {
    refused_at_once_then_stored_as_json("v", serde_json::json!({"id": 7, "items": [1, 2]}));
}

#[test]
fn internally_tagged_enums_are_refused_by_bincode_at_once_and_stored_as_json() {
    refused_at_once_then_stored_as_json(
        "t",
        Tagged::Refunded {
            cents: 5,
            reason: "dup".into(),
        },
    );
}

#[test]
fn skipped_fields_are_refused_by_bincode_at_once_and_stored_as_json() {
    refused_at_once_then_stored_as_json("s", Sparse { id: 1, note: None });
}

#[test]
fn a_store_wide_json_codec_replays_after_reopen() {
    let s = Scratch::new();
    {
        let store = s.builder().codec(Codec::Json).open().unwrap();
        store
            .execute_once("k", || Ok::<_, ServiceError>(serde_json::json!([1, "a"])))
            .unwrap();
    }
    // The record remembers its codec: a store now set to bincode still replays it.
    let store = s.open();
    let r = store
        .execute_once("k", || Ok::<_, ServiceError>(serde_json::json!(null)))
        .unwrap();
    assert!(r.is_replayed());
    assert_eq!(*r, serde_json::json!([1, "a"]));
}

// 9. A changed type is an error, never a different value.
#[test]
fn a_changed_result_type_is_an_error_not_a_different_value() {
    let s = Scratch::new();
    let store = s.open();
    store
        .execute_once("n", || Ok::<_, ServiceError>(0u32))
        .unwrap();
    let as_string = store_error(store.execute_once("n", || Ok::<_, ServiceError>(String::new())));
    assert!(matches!(as_string, Error::Decode { .. }), "{as_string}");

    #[derive(Serialize, Deserialize)]
    struct V1 {
        cents: u64,
        items: u64,
    }
    #[derive(Serialize, Deserialize, Debug)]
    struct V2 {
        items: u64,
        cents: u64,
    }
    store
        .execute_once("o", || {
            Ok::<_, ServiceError>(V1 {
                cents: 4200,
                items: 2,
            })
        })
        .unwrap();
    let swapped =
        store_error(store.execute_once("o", || Ok::<_, ServiceError>(V2 { items: 0, cents: 0 })));
    assert!(matches!(swapped, Error::Decode { .. }), "{swapped}");
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum PayError {
    #[serde(skip)]
    #[allow(dead_code)] // never constructed: its presence shifts bincode's variant indexes
    Internal(String),
    Declined,
    Fraud,
}

#[test]
fn an_error_enum_with_a_skipped_variant_never_replays_the_wrong_variant() {
    let s = Scratch::new();
    let store = s.open();
    let run = || {
        store
            .call("k")
            .permanent_if(|e: &PayError| !matches!(e, PayError::Internal(_)))
            .run(|| Err::<u32, _>(PayError::Declined))
    };
    for _ in 0..2 {
        match run() {
            Err(ExecuteError::Operation { error, .. }) => assert_eq!(error, PayError::Declined),
            Err(ExecuteError::Store(Error::ResultNotEncodable { .. })) => {}
            other => panic!("never another variant: {other:?}"),
        }
    }
}

// 10. Equal requests give equal fingerprints and keys.
#[test]
fn equal_maps_give_equal_fingerprints_and_derived_keys() {
    let build = |rev: bool| {
        let mut m = HashMap::new();
        let mut items: Vec<u32> = (0..40).collect();
        if rev {
            items.reverse();
        }
        for i in items {
            m.insert(format!("sku-{i}"), i);
        }
        m
    };
    let reference = build(false);
    let (fp, key) = (
        Fingerprint::of(&reference).unwrap(),
        idemstore::derive_key("order", &reference).unwrap(),
    );
    for round in 0..20 {
        let same = build(round % 2 == 0);
        assert_eq!(Fingerprint::of(&same).unwrap(), fp);
        assert_eq!(idemstore::derive_key("order", &same).unwrap(), key);
    }
    let mut other = build(false);
    other.insert("sku-0".into(), 99);
    assert_ne!(Fingerprint::of(&other).unwrap(), fp);
    // Map-free values keep the fingerprints of format 1: blake3 of their bincode bytes.
    let plain = ("tok_visa", 4200u64);
    let bytes = bincode::serde::encode_to_vec(plain, bincode::config::standard()).unwrap();
    assert_eq!(
        Fingerprint::of(&plain).unwrap(),
        Fingerprint::of_bytes(bytes)
    );
}

// 11. Messages a person can act on.
#[test]
fn error_messages_say_what_happened() {
    let s = Scratch::new();
    let store = s.open();
    let failed = store
        .execute_once("k", || {
            Err::<u32, _>(std::io::Error::other("gateway timeout"))
        })
        .unwrap_err();
    assert!(failed.to_string().contains("gateway timeout"), "{failed}");

    store
        .execute_once("n", || Ok::<_, ServiceError>(7u8))
        .unwrap();
    let decode = store_error(store.execute_once("n", || Ok::<_, ServiceError>(7u64))).to_string();
    assert!(
        !decode.contains("UnexpectedEnd") && !decode.contains('{'),
        "{decode}"
    );

    let file = s.dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = idemstore::Store::open(file.join("db")).unwrap_err();
    assert!(e.to_string().contains("a-file"), "{e}");
}

#[test]
fn large_outcomes_replay_after_reopen() {
    // Over sled's inline threshold (128 KiB): stored in a blob file, synced before return.
    let s = Scratch::new();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    {
        let store = s.open();
        let r = store
            .execute_once("big", || Ok::<_, ServiceError>(big.clone()))
            .unwrap();
        assert_eq!(r.len(), big.len());
    }
    let store = s.open();
    let r = store
        .execute_once("big", || Ok::<_, ServiceError>(Vec::<u8>::new()))
        .unwrap();
    assert!(r.is_replayed());
    assert_eq!(*r, big);
    let blobs = std::fs::read_dir(s.path().join("blobs")).unwrap().count();
    assert!(blobs > 0, "the test must exercise sled's blob files");
}

// The documented choice: a downstream key is the same in every life of a key, so a provider
// that still remembers it deduplicates the call after a removal.
#[test]
fn a_downstream_key_is_the_same_in_every_life_of_a_key() {
    let s = Scratch::new();
    let store = s.open();
    let key_in_life = || {
        store
            .execute_steps("order-5", |ctx| {
                Ok::<_, ServiceError>(ctx.downstream_key("charge"))
            })
            .unwrap()
            .into_value()
    };
    let first = key_in_life();
    assert!(store.remove("order-5").unwrap());
    assert_eq!(key_in_life(), first);
    let other_step = store
        .execute_steps("order-6", |ctx| {
            Ok::<_, ServiceError>(ctx.downstream_key("charge"))
        })
        .unwrap();
    assert_ne!(
        *other_step, first,
        "another key gives another downstream key"
    );
}
