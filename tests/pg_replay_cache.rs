//! The PostgreSQL engine's optional replay cache (`PgOptions::replay_cache`): what it serves,
//! for how long, and what it never serves. Two replicas share one schema; the removals that make
//! a cached entry stale are made by the other replica, so that only the cache can still answer
//! with the old outcome. Needs `IDEMSTORE_TEST_POSTGRES`.

mod common;

use common::pg::{self, counted_call as call, pg_url, PgSchema};
use idemstore::{Error, ExecuteError, Fingerprint, PgStore, RecordState, StoreBuilder};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A replica on `schema` (a pool of 4), with a replay cache of `max_age` if given.
fn replica(schema: &PgSchema, cache: Option<Duration>) -> PgStore {
    pg::replica(schema, |options| match cache {
        Some(max_age) => options.pool_size(4).replay_cache(100, max_age),
        None => options.pool_size(4),
    })
}

#[test]
fn without_the_cache_a_removal_by_another_replica_runs_the_key_again_at_once() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let (a, b) = (replica(&schema, None), replica(&schema, None));
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&b, "k", &runs, "one"), ("one".into(), false));
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    assert!(b.remove("k").expect("remove"));
    assert_eq!(call(&a, "k", &runs, "two"), ("two".into(), false));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[test]
fn a_cached_outcome_answers_until_max_age_even_after_another_replica_removed_it() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let max_age = Duration::from_millis(1500);
    let (a, b) = (replica(&schema, Some(max_age)), replica(&schema, None));
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&b, "k", &runs, "one"), ("one".into(), false));
    // Read from the database, and kept.
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    let kept_at = std::time::Instant::now();
    assert!(b.remove("k").expect("remove"));
    assert!(b.inspect("k").expect("inspect").is_none());
    // The database has no record: only the cache answers so (sync and async alike).
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let from_async = runtime
        .block_on(a.execute_once_async("k", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("never".to_owned())
        }))
        .expect("async call");
    assert!(from_async.is_replayed());
    assert_eq!(from_async.into_value(), "one");
    assert!(
        kept_at.elapsed() < max_age,
        "the stale replays above ran within max_age (a very slow machine would void them)"
    );
    std::thread::sleep(max_age.saturating_sub(kept_at.elapsed()) + Duration::from_millis(100));
    assert_eq!(call(&a, "k", &runs, "two"), ("two".into(), false));
    assert_eq!(call(&b, "k", &runs, "never"), ("two".into(), true));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[test]
fn this_replicas_own_removal_and_transactions_forget_the_key_at_once() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let (a, b) = (
        replica(&schema, Some(Duration::from_secs(60))),
        replica(&schema, None),
    );
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&a, "k", &runs, "one"), ("one".into(), false));
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    assert!(a.remove("k").expect("remove"));
    assert_eq!(call(&a, "k", &runs, "two"), ("two".into(), false));
    assert_eq!(call(&a, "k", &runs, "never"), ("two".into(), true));
    // Removed by the other replica, "two" is still cached here. A transactional call reads the
    // database, never the cache: it runs, and what it writes replaces the cached record.
    assert!(b.remove("k").expect("remove"));
    let in_tx = a
        .execute_once_in_tx("k", |_tx| {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("three".to_owned())
        })
        .expect("transactional call");
    assert!(!in_tx.is_replayed());
    assert_eq!(in_tx.into_value(), "three");
    assert_eq!(call(&a, "k", &runs, "never"), ("three".into(), true));
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

#[test]
fn the_rules_still_decide_on_a_cached_record_fingerprint_and_expiry() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let (a, b) = (
        replica(&schema, Some(Duration::from_secs(60))),
        replica(&schema, None),
    );
    let runs = AtomicUsize::new(0);
    let (fp1, fp2) = (
        Fingerprint::of(&"one").expect("fp"),
        Fingerprint::of(&"two").expect("fp"),
    );
    let run = |store: &PgStore, fp: Fingerprint, ttl: Duration| {
        store.call("k").fingerprint(fp).ttl(ttl).run(|| {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>("ran".to_owned())
        })
    };
    let ttl = Duration::from_secs(2);
    assert!(!run(&b, fp1, ttl).expect("first").is_replayed());
    assert!(run(&a, fp1, ttl).expect("replay").is_replayed());
    let recorded_at = std::time::Instant::now();
    assert!(b.remove("k").expect("remove"));
    // Only the cache holds the record now: a different request is refused against it.
    match run(&a, fp2, ttl) {
        Err(ExecuteError::Store(Error::FingerprintMismatch { .. })) => {}
        other => panic!("expected a fingerprint mismatch, got {other:?}"),
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Past the record's own expiry the cached record is never served, whatever max_age says.
    std::thread::sleep(ttl.saturating_sub(recorded_at.elapsed()) + Duration::from_millis(200));
    assert!(!run(&a, fp1, ttl).expect("runs again").is_replayed());
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[test]
fn an_outcome_this_replica_recorded_is_kept_as_it_lands() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let (a, b) = (
        replica(&schema, Some(Duration::from_secs(60))),
        replica(&schema, None),
    );
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&a, "k", &runs, "one"), ("one".into(), false));
    // The first retry that reaches this replica needs no read: the database has no record.
    assert!(b.remove("k").expect("remove"));
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    // A retryable failure is not an outcome: nothing is kept, the next call runs.
    let failed = a.execute_once("f", || {
        runs.fetch_add(1, Ordering::SeqCst);
        Err::<String, _>(std::io::Error::other("try again"))
    });
    assert!(failed.is_err());
    assert_eq!(call(&a, "f", &runs, "ran"), ("ran".into(), false));
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// An outcome kept as it lands races this replica's own removal of the key from another
/// thread: once the removal returns, no call of this replica replays the removed outcome.
#[test]
fn an_own_removal_racing_the_outcome_as_it_lands_always_wins() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = replica(&schema, Some(Duration::from_secs(60)));
    let runs = AtomicUsize::new(0);
    for i in 0..40 {
        let key = format!("race-{i}");
        std::thread::scope(|scope| {
            scope.spawn(|| call(&a, &key, &runs, "first"));
            scope.spawn(|| {
                // Removes the outcome as soon as it is there (a Pending record is left alone).
                loop {
                    let info = a.record(&key).expect("record");
                    if info.is_some_and(|r| r.state == RecordState::Completed) {
                        assert!(a.remove(&key).expect("remove"));
                        break;
                    }
                    std::thread::yield_now();
                }
            });
        });
        assert_eq!(
            call(&a, &key, &runs, "again"),
            ("again".into(), false),
            "{key}: the removed outcome was replayed"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 80);
}

#[test]
fn a_replay_cache_of_zero_is_no_cache() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(schema.options().replay_cache(0, Duration::from_secs(60)))
        .expect("open");
    let b = replica(&schema, None);
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&b, "k", &runs, "one"), ("one".into(), false));
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    assert!(b.remove("k").expect("remove"));
    assert_eq!(call(&a, "k", &runs, "two"), ("two".into(), false));
}
