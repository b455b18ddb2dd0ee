//! Every row of DESIGN.md's table, through the public API, on real sled databases.

mod common;

use common::{store_error, wait_until, Scratch, ServiceError};
use idemstore::{Error, ExecuteError, Fingerprint, RecordState, Store};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: String,
    cents: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
enum PayError {
    #[error("declined: {0}")]
    Declined(String),
    #[error("gateway timeout")]
    Timeout,
}

#[test]
fn absent_key_runs_once_then_replays_the_recorded_value() {
    let s = Scratch::new();
    let store = s.open();
    let runs = AtomicUsize::new(0);
    let charge = || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ServiceError>(Receipt {
            id: "ch_1".into(),
            cents: 4200,
        })
    };
    let first = store.execute_once("order-7f3a", charge).unwrap();
    let again = store.execute_once("order-7f3a", charge).unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(!first.is_replayed());
    assert!(again.is_replayed());
    assert_eq!(*first, *again);
    let info = again.record();
    assert_eq!(info.state, RecordState::Completed);
    assert_eq!(info.attempts, 1);
    assert!(info.outcome_bytes > 0);
    let stats = store.stats();
    assert_eq!((stats.executions, stats.replays), (1, 1));
}

#[test]
fn retryable_error_is_not_recorded_and_the_next_call_runs_again() {
    let s = Scratch::new();
    let store = s.open();
    let err = store
        .execute_once("k", || {
            Err::<u32, _>(ServiceError::Io(std::io::Error::other("reset")))
        })
        .unwrap_err();
    assert!(matches!(
        err,
        ExecuteError::Operation {
            replayed: false,
            ..
        }
    ));
    let info = store.record("k").unwrap().unwrap();
    assert_eq!(
        (info.state, info.attempts),
        (RecordState::FailedRetryable, 1)
    );
    let ok = store
        .execute_once("k", || Ok::<_, ServiceError>(9u32))
        .unwrap();
    assert_eq!((*ok, ok.is_replayed(), ok.record().attempts), (9, false, 2));
    assert_eq!(
        store.record("k").unwrap().unwrap().created_at,
        info.created_at
    );
}

#[test]
fn permanent_error_is_replayed_and_the_operation_does_not_run_again() {
    let s = Scratch::new();
    let store = s.open();
    let runs = AtomicUsize::new(0);
    let call = || {
        store
            .call("pay-1")
            .permanent_if(|e: &PayError| matches!(e, PayError::Declined(_)))
            .run(|| {
                runs.fetch_add(1, Ordering::SeqCst);
                Err::<Receipt, _>(PayError::Declined("insufficient funds".into()))
            })
    };
    for expect_replayed in [false, true] {
        match call() {
            Err(ExecuteError::Operation { error, replayed }) => {
                assert_eq!(error, PayError::Declined("insufficient funds".into()));
                assert_eq!(replayed, expect_replayed);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        store.record("pay-1").unwrap().unwrap().state,
        RecordState::FailedPermanent
    );
}

#[test]
fn errors_the_predicate_rejects_stay_retryable() {
    let s = Scratch::new();
    let store = s.open();
    let r = store
        .call("pay-2")
        .permanent_if(|e: &PayError| matches!(e, PayError::Declined(_)))
        .run(|| Err::<u32, _>(PayError::Timeout));
    assert!(matches!(
        r,
        Err(ExecuteError::Operation {
            replayed: false,
            ..
        })
    ));
    assert_eq!(
        store.record("pay-2").unwrap().unwrap().state,
        RecordState::FailedRetryable
    );
}

#[test]
fn a_recorded_permanent_error_without_a_decoder_is_a_clear_error() {
    let s = Scratch::new();
    let store = s.open();
    let _ = store
        .call("pay-3")
        .permanent_if(|_: &PayError| true)
        .run(|| Err::<u32, _>(PayError::Timeout));
    let runs = AtomicUsize::new(0);
    let e = store_error(store.execute_once("pay-3", || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<u32, ServiceError>(1)
    }));
    assert!(matches!(e, Error::PermanentErrorRecorded { .. }), "{e}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[test]
fn fingerprint_mismatch_runs_nothing_and_changes_nothing() {
    let s = Scratch::new();
    let store = s.open();
    let fp_a = Fingerprint::of(&("tok_visa", 4200u64)).unwrap();
    let fp_b = Fingerprint::of(&("tok_visa", 9900u64)).unwrap();
    store
        .call("order-1")
        .fingerprint(fp_a)
        .run(|| Ok::<_, ServiceError>(1u32))
        .unwrap();
    let before = store.record("order-1").unwrap();
    let runs = AtomicUsize::new(0);
    let e = store_error(store.call("order-1").fingerprint(fp_b).run(|| {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ServiceError>(2u32)
    }));
    assert!(matches!(e, Error::FingerprintMismatch { .. }), "{e}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(store.record("order-1").unwrap(), before);
    // Same fingerprint, or none at all, replays.
    let same = store
        .call("order-1")
        .fingerprint(fp_a)
        .run(|| Ok::<_, ServiceError>(3u32))
        .unwrap();
    let none = store
        .execute_once("order-1", || Ok::<_, ServiceError>(4u32))
        .unwrap();
    assert_eq!((*same, *none), (1, 1));
    assert_eq!(store.stats().fingerprint_mismatches, 1);
    assert_eq!(before.unwrap().fingerprint, Some(fp_a));
}

#[test]
fn fingerprint_mismatch_also_guards_a_retryable_record() {
    let s = Scratch::new();
    let store = s.open();
    let fp_a = Fingerprint::of_bytes(b"a");
    let _ = store
        .call("k")
        .fingerprint(fp_a)
        .run(|| Err::<u32, _>(ServiceError::Declined));
    let e = store_error(
        store
            .call("k")
            .fingerprint(Fingerprint::of_bytes(b"b"))
            .run(|| Ok::<_, ServiceError>(1u32)),
    );
    assert!(matches!(e, Error::FingerprintMismatch { .. }));
    // A retry without a fingerprint keeps the first one.
    store
        .execute_once("k", || Ok::<_, ServiceError>(1u32))
        .unwrap();
    assert_eq!(store.record("k").unwrap().unwrap().fingerprint, Some(fp_a));
}

#[test]
fn panic_leaves_the_record_retryable_and_continues_to_the_caller() {
    let s = Scratch::new();
    let store = s.open();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = store.execute_once("k", || -> Result<u32, ServiceError> { panic!("boom") });
    }));
    let payload = caught.expect_err("the panic must reach the caller");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
    let info = store.record("k").unwrap().unwrap();
    assert_eq!(info.state, RecordState::FailedRetryable);
    let ok = store
        .execute_once("k", || Ok::<_, ServiceError>(5u32))
        .unwrap();
    assert_eq!((*ok, ok.record().attempts), (5, 2));
}

#[test]
fn removal_while_running_is_reported_not_overwritten() {
    let s = Scratch::new();
    let store = s.open();
    let r = store.execute_once("k", || {
        assert!(store.remove("k").unwrap());
        Ok::<_, ServiceError>(1u32)
    });
    let e = store_error(r);
    assert!(matches!(e, Error::OutcomeNotRecorded { .. }), "{e}");
    assert_eq!(store.record("k").unwrap(), None);
}

#[test]
fn bad_keys_are_refused_before_anything_is_written() {
    let s = Scratch::new();
    let store = s.builder().max_key_bytes(8).open().unwrap();
    let runs = AtomicUsize::new(0);
    let f = || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ServiceError>(1u32)
    };
    assert!(matches!(
        store_error(store.execute_once("", f)),
        Error::EmptyKey
    ));
    assert!(matches!(
        store_error(store.execute_once("123456789", f)),
        Error::KeyTooLong { len: 9, limit: 8 }
    ));
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(store.records().count(), 0);
    store.execute_once("12345678", f).unwrap();
}

#[test]
fn oversized_result_is_an_error_and_the_operation_never_runs_again() {
    let s = Scratch::new();
    let store = s.builder().max_result_bytes(64).open().unwrap();
    let runs = AtomicUsize::new(0);
    let f = || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ServiceError>(vec![7u8; 1000])
    };
    let e = store_error(store.execute_once("big", f));
    assert!(
        matches!(e, Error::ResultTooLarge { size, limit: 64, .. } if size > 64),
        "{e}"
    );
    let e = store_error(store.execute_once("big", f));
    assert!(matches!(e, Error::ResultTooLarge { limit: 64, .. }), "{e}");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(
        store.record("big").unwrap().unwrap().state,
        RecordState::Completed
    );
}

#[test]
fn result_that_fails_to_serialize_is_recorded_as_such() {
    #[derive(Debug)]
    struct Unserializable;
    impl Serialize for Unserializable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("cannot serialize this"))
        }
    }
    impl<'de> Deserialize<'de> for Unserializable {
        fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
            Ok(Unserializable)
        }
    }
    let s = Scratch::new();
    let store = s.open();
    let runs = AtomicUsize::new(0);
    let f = || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ServiceError>(Unserializable)
    };
    for _ in 0..2 {
        let e = store_error(store.execute_once("k", f));
        assert!(
            matches!(&e, Error::ResultNotEncodable { message, .. } if message.contains("cannot serialize")),
            "{e}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[test]
fn result_type_that_no_longer_decodes_is_a_decode_error_and_nothing_runs() {
    let s = Scratch::new();
    let store = s.open();
    store
        .execute_once("k", || Ok::<_, ServiceError>("a string result".to_string()))
        .unwrap();
    let runs = AtomicUsize::new(0);
    let e = store_error(store.execute_once("k", || {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, ServiceError>(Receipt {
            id: String::new(),
            cents: 0,
        })
    }));
    assert!(matches!(e, Error::Decode { what: "result", .. }), "{e}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}

#[test]
fn expired_record_reads_as_absent_and_runs_again() {
    let s = Scratch::new();
    let store = s
        .builder()
        .default_ttl(Duration::from_secs(60))
        .open()
        .unwrap();
    store
        .execute_once("k", || Ok::<_, ServiceError>(1u32))
        .unwrap();
    s.clock.advance(Duration::from_secs(59));
    assert!(store
        .execute_once("k", || Ok::<_, ServiceError>(2u32))
        .unwrap()
        .is_replayed());
    s.clock.advance(Duration::from_secs(1));
    assert_eq!(store.record("k").unwrap(), None);
    let fresh = store
        .execute_once("k", || Ok::<_, ServiceError>(3u32))
        .unwrap();
    assert_eq!(
        (*fresh, fresh.is_replayed(), fresh.record().attempts),
        (3, false, 1)
    );
}

#[test]
fn per_call_ttl_overrides_the_default() {
    let s = Scratch::new();
    let store = s.open();
    store
        .call("short")
        .ttl(Duration::from_secs(5))
        .run(|| Ok::<_, ServiceError>(1u32))
        .unwrap();
    store
        .execute_once("long", || Ok::<_, ServiceError>(1u32))
        .unwrap();
    s.clock.advance(Duration::from_secs(5));
    assert_eq!(store.record("short").unwrap(), None);
    assert!(store.record("long").unwrap().is_some());
    s.clock.advance(Duration::from_secs(24 * 3600));
    assert!(store.record("long").unwrap().is_none());
}

#[test]
fn sweep_removes_only_expired_records() {
    let s = Scratch::new();
    let store = s
        .builder()
        .default_ttl(Duration::from_secs(10))
        .open()
        .unwrap();
    for i in 0..50 {
        store
            .execute_once(format!("old-{i}"), || Ok::<_, ServiceError>(i))
            .unwrap();
    }
    s.clock.advance(Duration::from_secs(5));
    for i in 0..20 {
        store
            .execute_once(format!("new-{i}"), || Ok::<_, ServiceError>(i))
            .unwrap();
    }
    assert_eq!(store.sweep_now().unwrap(), 0);
    s.clock.advance(Duration::from_secs(5));
    assert_eq!(store.sweep_now().unwrap(), 50);
    assert_eq!(store.sweep_now().unwrap(), 0);
    assert_eq!(store.records().count(), 20);
    assert_eq!(store.stats().records_swept, 50);
    drop(store);
    let store = s.open();
    assert_eq!(store.records().count(), 20);
    s.clock.advance(Duration::from_secs(5));
    assert_eq!(store.sweep_now().unwrap(), 20);
}

#[test]
fn sweep_keeps_a_record_reclaimed_after_expiry() {
    let s = Scratch::new();
    let store = s
        .builder()
        .default_ttl(Duration::from_secs(10))
        .open()
        .unwrap();
    store
        .execute_once("k", || Ok::<_, ServiceError>(1u32))
        .unwrap();
    s.clock.advance(Duration::from_secs(10));
    // Expired, then claimed again: its old index entry is stale and must not remove it.
    store
        .execute_once("k", || Ok::<_, ServiceError>(2u32))
        .unwrap();
    assert_eq!(store.sweep_now().unwrap(), 0);
    assert!(store
        .execute_once("k", || Ok::<_, ServiceError>(3u32))
        .unwrap()
        .is_replayed());
}

#[test]
fn background_sweeper_runs_and_stops_on_drop() {
    let s = Scratch::new();
    let store = s
        .builder()
        .default_ttl(Duration::from_secs(1))
        .sweep_interval(Some(Duration::from_millis(5)))
        .open()
        .unwrap();
    store
        .execute_once("k", || Ok::<_, ServiceError>(1u32))
        .unwrap();
    s.clock.advance(Duration::from_secs(2));
    // The sweeper thread removes it; wait for that without asserting a time, but fail rather
    // than hang if it never does.
    wait_until(
        "the background sweeper to remove the expired record",
        || store.stats().records_swept > 0,
    );
    drop(store); // joins the sweeper; must not hang
    assert_eq!(s.peek_record(b"k"), None);
}

#[test]
fn reopen_keeps_every_outcome() {
    let s = Scratch::new();
    {
        let store = s.open();
        for i in 0..200u32 {
            store
                .execute_once(format!("order-{i}"), || Ok::<_, ServiceError>(i * 10))
                .unwrap();
        }
        let _ = store
            .call("declined")
            .permanent_if(|_: &PayError| true)
            .run(|| Err::<u32, _>(PayError::Declined("no".into())));
    }
    let store = s.open();
    assert_eq!(store.epoch(), 2);
    for i in 0..200u32 {
        let out = store
            .execute_once(format!("order-{i}"), || Ok::<_, ServiceError>(0))
            .unwrap();
        assert!(out.is_replayed());
        assert_eq!(*out, i * 10);
    }
    let r = store
        .call("declined")
        .permanent_if(|_: &PayError| true)
        .run(|| Ok::<u32, _>(1));
    assert!(matches!(
        r,
        Err(ExecuteError::Operation { replayed: true, .. })
    ));
    assert_eq!(store.stats().executions, 0);
}

#[test]
fn claim_tokens_grow_across_claims_and_reopens() {
    let s = Scratch::new();
    let mut last = None;
    for _ in 0..3 {
        let store = s.open();
        for i in 0..3 {
            let out = store
                .execute_once(format!("k{}-{i}", store.epoch()), || {
                    Ok::<_, ServiceError>(())
                })
                .unwrap();
            let token = out.record().claim;
            assert!(Some(token) > last, "{token:?} after {last:?}");
            last = Some(token);
        }
    }
}

#[test]
fn corrupt_and_foreign_bytes_are_errors_for_that_key_only() {
    let s = Scratch::new();
    {
        let store = s.open();
        store
            .execute_once("good", || Ok::<_, ServiceError>(1u32))
            .unwrap();
        store
            .execute_once("victim", || Ok::<_, ServiceError>(2u32))
            .unwrap();
    }
    let original = s.peek_record(b"victim").unwrap();
    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    let mut future = original.clone();
    future[1] = 200;
    type IsExpected = fn(&Error) -> bool;
    let cases: Vec<(Vec<u8>, IsExpected)> = vec![
        (b"{\"json\": true}".to_vec(), |e| {
            matches!(e, Error::CorruptRecord { .. })
        }),
        (original[..original.len() - 3].to_vec(), |e| {
            matches!(e, Error::CorruptRecord { .. })
        }),
        (flipped, |e| matches!(e, Error::CorruptRecord { .. })),
        (Vec::new(), |e| matches!(e, Error::CorruptRecord { .. })),
        (future, |e| {
            matches!(e, Error::UnsupportedRecordVersion { version: 200, .. })
        }),
    ];
    for (bytes, expected) in cases {
        s.poke_record(b"victim", &bytes);
        let store = s.open();
        let runs = AtomicUsize::new(0);
        let e = store_error(store.execute_once("victim", || {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ServiceError>(9u32)
        }));
        assert!(expected(&e), "unexpected error {e}");
        assert_eq!(e.key().unwrap().as_bytes(), b"victim");
        assert!(e.to_string().contains(&idemstore::key_hash("victim")));
        assert!(!e.to_string().contains("victim"), "raw key leaked: {e}");
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        assert!(store.record("victim").is_err());
        assert!(store
            .execute_once("good", || Ok::<_, ServiceError>(0u32))
            .unwrap()
            .is_replayed());
        assert_eq!(store.records().filter(|r| r.is_err()).count(), 1);
        assert_eq!(store.sweep_now().unwrap(), 0);
        drop(store);
        assert_eq!(
            s.peek_record(b"victim").unwrap(),
            bytes,
            "bad bytes must be left as they are"
        );
    }
    // Removing the key makes it usable again.
    let store = s.open();
    assert!(store.remove("victim").unwrap());
    assert_eq!(
        *store
            .execute_once("victim", || Ok::<_, ServiceError>(3u32))
            .unwrap(),
        3
    );
}

#[test]
fn records_iterate_by_state_and_remove_reopens_a_key() {
    let s = Scratch::new();
    let store = s.open();
    store
        .execute_once("a", || Ok::<_, ServiceError>(1u32))
        .unwrap();
    store
        .execute_once("b", || Ok::<_, ServiceError>(1u32))
        .unwrap();
    let _ = store.execute_once("c", || Err::<u32, _>(ServiceError::Declined));
    let completed: Vec<_> = store
        .records_in_state(RecordState::Completed)
        .map(|r| r.unwrap().0)
        .collect();
    assert_eq!(completed, vec![b"a".to_vec(), b"b".to_vec()]);
    assert_eq!(
        store.records_in_state(RecordState::FailedRetryable).count(),
        1
    );
    assert!(store.remove("a").unwrap());
    assert!(!store.remove("a").unwrap());
    assert!(!store
        .execute_once("a", || Ok::<_, ServiceError>(2u32))
        .unwrap()
        .is_replayed());
}

#[test]
fn periodic_durability_keeps_the_same_semantics() {
    let s = Scratch::new();
    let store = s
        .builder()
        .durability(idemstore::Durability::Periodic(Duration::from_millis(50)))
        .open()
        .unwrap();
    assert_eq!(
        *store
            .execute_once("k", || Ok::<_, ServiceError>(1u32))
            .unwrap(),
        1
    );
    assert!(store
        .execute_once("k", || Ok::<_, ServiceError>(2u32))
        .unwrap()
        .is_replayed());
    // The Periodic store made no flush of its own for its calls.
    assert_eq!(
        store.stats().flush_batches,
        0,
        "a Periodic store flushed for its calls"
    );
    store.close().unwrap();
    // Reopened in Immediate mode: the outcome is there, and the counter does count flushes
    // (a new key needs its outcome durable; under Rerun its claim needs no flush of its own).
    let store = s.open();
    assert!(store
        .execute_once("k", || Ok::<_, ServiceError>(2u32))
        .unwrap()
        .is_replayed());
    store
        .execute_once("k2", || Ok::<_, ServiceError>(3u32))
        .unwrap();
    assert!(store.stats().flush_batches >= 1, "{:?}", store.stats());
}

#[test]
fn store_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Store>();
    assert_send_sync::<Error>();
}

#[test]
fn derived_keys_are_stable_and_distinct() {
    #[derive(Serialize)]
    struct Req {
        order: u64,
    }
    let a = idemstore::derive_key("refund", &Req { order: 1 }).unwrap();
    assert_eq!(
        a,
        idemstore::derive_key("refund", &Req { order: 1 }).unwrap()
    );
    assert_ne!(
        a,
        idemstore::derive_key("refund", &Req { order: 2 }).unwrap()
    );
    assert_ne!(
        a,
        idemstore::derive_key("charge", &Req { order: 1 }).unwrap()
    );
    assert_eq!(a.len(), "refund:".len() + 64);
}

#[test]
fn invalid_configuration_is_refused() {
    let s = Scratch::new();
    let bad = [
        s.builder().default_ttl(Duration::ZERO),
        s.builder().max_key_bytes(0),
        s.builder().max_result_bytes(usize::MAX),
        s.builder().sweep_interval(Some(Duration::ZERO)),
        s.builder()
            .durability(idemstore::Durability::Periodic(Duration::ZERO)),
    ];
    for b in bad {
        assert!(matches!(b.open(), Err(Error::InvalidConfig(_))));
    }
}

#[test]
fn an_operation_that_outlives_its_ttl_keeps_its_outcome_for_a_ttl_from_completion() {
    let s = Scratch::new();
    let store = s
        .builder()
        .default_ttl(Duration::from_secs(10))
        .open()
        .unwrap();
    store
        .execute_once("slow", || {
            s.clock.advance(Duration::from_secs(30)); // the operation took 30 s
            Ok::<_, ServiceError>(1u32)
        })
        .unwrap();
    let info = store
        .record("slow")
        .unwrap()
        .expect("not expired on completion");
    assert_eq!(
        info.expires_at.duration_since(info.updated_at).unwrap(),
        Duration::from_secs(10)
    );
    s.clock.advance(Duration::from_secs(9));
    assert!(store
        .execute_once("slow", || Ok::<_, ServiceError>(2u32))
        .unwrap()
        .is_replayed());
    // The sweeper keeps it until the new expiry, then removes it.
    assert_eq!(store.sweep_now().unwrap(), 0);
    s.clock.advance(Duration::from_secs(1));
    assert_eq!(store.sweep_now().unwrap(), 1);
}
