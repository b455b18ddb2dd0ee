//! Adversarial tests of the PostgreSQL replay cache (`PgOptions::replay_cache`, commit 4158c8f):
//! each test states a promise of the cache (the option's doc comment, the module invariants of
//! `engine/postgres/replay_cache.rs`, `Store::remove`'s doc) and an attack on it. A failing test
//! is a defect.
//!
//! Needs `IDEMSTORE_TEST_POSTGRES`; without it every test passes without running.

mod common;

use common::pg::{counted_call as call, pg_url, replica, PgSchema};
use idemstore::{Error, ExecuteError, Fingerprint, PgStore, Resolution, StoreBuilder};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type Io = std::io::Error;

/// A replica on `schema` with a replay cache of (`capacity`, `max_age`).
fn cached(schema: &PgSchema, capacity: usize, max_age: Duration) -> PgStore {
    replica(schema, |o| o.pool_size(6).replay_cache(capacity, max_age))
}

/// A replica on `schema` without a cache (the "other replica").
fn plain(schema: &PgSchema) -> PgStore {
    replica(schema, |o| o.pool_size(4))
}

/// Rows the database holds for `key` in `schema` (any tenant).
fn rows(schema: &PgSchema, key: &str) -> i64 {
    schema.sql(&format!(
        "SELECT count(*) FROM {{s}}.records WHERE key = '\\x{}'::bytea",
        common::pg::hex(key.as_bytes())
    ))[0]
        .get::<_, i64>(0)
}

// ---------------------------------------------------------------------------------------
// 1. This replica's own removal racing a read of the key that is in flight.

/// Promise (option doc, module invariants): "after this process removes or rewrites a key, its
/// calls never replay the old record from here", including when a read of the key was in flight
/// concurrently with that write.
///
/// Attack: the DELETE of `Store::remove` is made slow (a trigger sleeping 0.4 s on the server,
/// so the old row stays visible to other sessions until it commits). While it runs, other
/// threads of the same store read the key (`Store::record`, which reads through `get_op`).
/// `remove_record_op` forgets the key (bumps the stripe's generation) *before* its statement,
/// so a read whose ticket is taken after that forget but which the database answers before the
/// DELETE commits is kept: the removed record stays cached and is replayed after `remove`
/// returned.
#[test]
fn own_remove_racing_an_in_flight_read_never_leaves_the_old_record_cached() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 100, Duration::from_secs(60));
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&a, "k", &runs, "one"), ("one".into(), false));
    schema.sql(
        "CREATE FUNCTION {s}.slow_delete() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(0.4); RETURN OLD; END $$",
    );
    schema.sql(
        "CREATE TRIGGER slow_delete BEFORE DELETE ON {s}.records \
         FOR EACH ROW EXECUTE FUNCTION {s}.slow_delete()",
    );
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let _ = a.record("k").expect("record");
                }
            });
        }
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.remove("k").expect("remove"));
        stop.store(true, Ordering::SeqCst);
    });
    schema.sql("DROP TRIGGER slow_delete ON {s}.records");
    assert_eq!(rows(&schema, "k"), 0, "the database has no record for k");
    let (value, replayed) = call(&a, "k", &runs, "two");
    assert!(
        !replayed,
        "this replica removed k and the database has no record, yet the cache replayed {value:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// As above, without any help from the server: many keys, reader threads hammering each key
/// (`record` and `execute_once`) while the same store removes it. After the removal returned and
/// the readers stopped, the next call must run. Probabilistic: the window is the DELETE's round
/// trip and commit.
#[test]
fn own_remove_under_concurrent_readers_many_keys() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 10_000, Duration::from_secs(60));
    let runs = AtomicUsize::new(0);
    let mut stale = Vec::new();
    for i in 0..120 {
        let key = format!("r{i}");
        assert!(!call(&a, &key, &runs, "old").1);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let _ = a.record(&key).expect("record");
                }
            });
            scope.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let _ = a.record(&key).expect("record");
                }
            });
            std::thread::sleep(Duration::from_millis(2));
            assert!(a.remove(&key).expect("remove"));
            stop.store(true, Ordering::SeqCst);
        });
        let (value, replayed) = call(&a, &key, &runs, "new");
        if replayed {
            stale.push((key, value));
        }
    }
    assert!(
        stale.is_empty(),
        "{} of 120 keys replayed the record this replica had removed: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
}

// ---------------------------------------------------------------------------------------
// 2. `Store::remove` on this replica when the database no longer has the record.

/// Promise (`Store::remove`): "The next call with the key runs its operation"; option doc:
/// "This replica's own writes and removals of a key forget its entry first".
///
/// Attack: replica A caches k's record; replica B removes k (the documented staleness window
/// opens). An operator then removes k on A as well, to make A run it again. `Store::remove`
/// reads the key, finds nothing in the database and returns false without ever calling
/// `remove_record` — the only place that forgets — so A's cache keeps the record and A's next
/// call replays it instead of running.
#[test]
fn remove_on_this_replica_forgets_even_when_the_database_already_lost_the_record() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let (a, b) = (
        cached(&schema, 100, Duration::from_secs(60)),
        plain(&schema),
    );
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&b, "k", &runs, "one"), ("one".into(), false));
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    assert!(b.remove("k").expect("remove on b"));
    // A's own removal: nothing left in the database to remove.
    let _ = a.remove("k").expect("remove on a");
    let (value, replayed) = call(&a, "k", &runs, "two");
    assert!(
        !replayed,
        "a.remove(\"k\") returned, yet a's next call replayed {value:?} from its cache"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------
// 3. Capacity: "bounded by capacity", "never panics".

/// Promise: the cache never panics; any capacity is accepted (`replay_cache(capacity, ...)`
/// validates nothing but zero).
///
/// Attack: `usize::MAX` ("as many as you like"). `ReplayCache::keep` bounds its order queue by
/// `2 * self.capacity`, which overflows: the first kept read panics (debug builds, as tests run),
/// and the panic comes out of `execute_once`.
#[test]
fn a_huge_capacity_never_panics() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, usize::MAX, Duration::from_secs(60));
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&a, "k", &runs, "one"), ("one".into(), false));
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        (call(&a, "k", &runs, "never"), call(&a, "k", &runs, "never"))
    }));
    match again {
        Ok((first, second)) => {
            assert_eq!(first, ("one".into(), true));
            assert_eq!(second, ("one".into(), true));
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("a replay with replay_cache(usize::MAX, ..) panicked: {message}");
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// Promise: "at most `capacity` entries". Observable: after another replica removed every
/// key, at most `capacity` of them can still be replayed stale here. Many keys read by many
/// threads at once.
#[test]
fn capacity_bounds_stale_replays_under_threads() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let capacity = 3;
    let (a, b) = (
        cached(&schema, capacity, Duration::from_secs(60)),
        plain(&schema),
    );
    let runs = AtomicUsize::new(0);
    let keys: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
    for key in &keys {
        assert!(!call(&b, key, &runs, "old").1);
    }
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (a, keys, runs) = (&a, &keys, &runs);
            scope.spawn(move || {
                for round in 0..3 {
                    for i in 0..keys.len() {
                        let key = &keys[(i * 7 + t * 11 + round) % keys.len()];
                        assert_eq!(call(a, key, runs, "never"), ("old".into(), true));
                    }
                }
            });
        }
    });
    for key in &keys {
        assert!(b.remove(key).expect("remove"));
    }
    let stale = keys
        .iter()
        .filter(|key| call(&a, key, &runs, "new").1)
        .count();
    assert!(
        stale <= capacity,
        "{stale} stale replays from a cache of capacity {capacity}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. max_age counts from the read.

/// Promise (option doc): an entry answers "for up to `max_age` after its read"; staleness after
/// another replica's removal is allowed only within `max_age` of the read.
///
/// Attack: a read whose answer is slow to come back (here the server takes 1.2 s after taking
/// the statement's snapshot: the table is briefly behind a view that sleeps). The record is
/// removed 0.3 s into that read. `ReplayCache::keep` stamps the entry with `Instant::now()`
/// when the answer arrives, not when the read was sent, so the entry answers until about
/// 1.2 s + max_age after the database was read: here a call 1.7 s after the read, 1.4 s after
/// the removal, with max_age 1 s, is still answered with the removed record.
#[test]
fn max_age_counts_from_the_read_not_from_when_its_answer_arrived() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let max_age = Duration::from_secs(1);
    let (a, b) = (cached(&schema, 100, max_age), plain(&schema));
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&b, "k", &runs, "one"), ("one".into(), false));
    // The table behind a view whose rows come back 1.2 s after the snapshot.
    schema.sql(
        "CREATE FUNCTION {s}.slow() RETURNS boolean LANGUAGE plpgsql VOLATILE AS \
         $$ BEGIN PERFORM pg_sleep(1.2); RETURN true; END $$",
    );
    schema.sql("ALTER TABLE {s}.records RENAME TO records_real");
    schema.sql("CREATE VIEW {s}.records AS SELECT * FROM {s}.records_real WHERE {s}.slow()");
    let sent = Instant::now();
    let reader = std::thread::scope(|scope| {
        let reader = scope.spawn(|| a.record("k").expect("record"));
        std::thread::sleep(Duration::from_millis(300));
        // Another replica's removal (made directly: the view is in the way of the store's).
        schema.sql(&format!(
            "DELETE FROM {{s}}.records_real WHERE key = '\\x{}'::bytea",
            common::pg::hex(b"k")
        ));
        reader.join().expect("reader")
    });
    let answered = sent.elapsed();
    schema.sql("DROP VIEW {s}.records");
    schema.sql("ALTER TABLE {s}.records_real RENAME TO records");
    assert!(reader.is_some(), "the read saw the record (its snapshot)");
    assert!(
        answered >= Duration::from_millis(1100),
        "the read was slow ({answered:?})"
    );
    // Past max_age after the read was made (and its snapshot taken).
    let target = Duration::from_millis(1700);
    std::thread::sleep(target.saturating_sub(sent.elapsed()));
    assert_eq!(rows(&schema, "k"), 0);
    let (value, replayed) = call(&a, "k", &runs, "two");
    assert!(
        !replayed,
        "{:?} after the read (max_age {max_age:?}), the cache replayed {value:?}, removed \
         {:?} before",
        sent.elapsed(),
        sent.elapsed() - Duration::from_millis(300)
    );
}

/// Promise: with a huge max_age the record's own expiry still ends every replay of it.
#[test]
fn a_huge_max_age_still_obeys_the_records_expiry() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 100, Duration::MAX);
    let runs = AtomicUsize::new(0);
    let run = |answer: &str| {
        let out = a
            .call("k")
            .ttl(Duration::from_millis(800))
            .run(|| {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Io>(answer.to_owned())
            })
            .expect("call");
        (out.is_replayed(), out.into_value())
    };
    assert_eq!(run("one"), (false, "one".into()));
    let written = Instant::now();
    assert_eq!(run("never"), (true, "one".into()));
    assert_eq!(run("never"), (true, "one".into()));
    std::thread::sleep(Duration::from_millis(1000).saturating_sub(written.elapsed()));
    assert_eq!(run("two"), (false, "two".into()));
    assert_eq!(run("never"), (true, "two".into()));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------
// 5. Tenants: one cache per store.

/// Promise: two stores of different tenants on one schema never see each other's records,
/// cached or not.
#[test]
fn tenants_never_share_cached_records() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = |tenant: &str| {
        StoreBuilder::default()
            .sweep_interval(None)
            .open_postgres(
                schema
                    .options()
                    .tenant(tenant)
                    .replay_cache(100, Duration::from_secs(60)),
            )
            .expect("open")
    };
    let (eu, us) = (open("eu"), open("us"));
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&eu, "k", &runs, "eu"), ("eu".into(), false));
    assert_eq!(call(&eu, "k", &runs, "never"), ("eu".into(), true));
    assert_eq!(call(&eu, "k", &runs, "never"), ("eu".into(), true));
    assert_eq!(call(&us, "k", &runs, "us"), ("us".into(), false));
    assert_eq!(call(&us, "k", &runs, "never"), ("us".into(), true));
    assert_eq!(call(&eu, "k", &runs, "never"), ("eu".into(), true));
    assert!(us.remove("k").expect("remove"));
    assert_eq!(call(&eu, "k", &runs, "never"), ("eu".into(), true));
    assert_eq!(call(&us, "k", &runs, "us2"), ("us2".into(), false));
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

// ---------------------------------------------------------------------------------------
// 6. Other write paths of this replica: they must forget the key.

/// `Store::import` on this replica over a key another replica removed: the imported record is
/// what this replica replays next, not its cached old one.
#[test]
fn import_on_this_replica_replaces_a_stale_cached_record() {
    let Some(url) = pg_url() else { return };
    let (schema, source) = (PgSchema::new(&url), PgSchema::new(&url));
    let (a, b, c) = (
        cached(&schema, 100, Duration::from_secs(60)),
        plain(&schema),
        plain(&source),
    );
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&c, "k", &runs, "imported"), ("imported".into(), false));
    let mut lines = Vec::new();
    assert_eq!(c.export(&mut lines, |_| {}).expect("export"), 1);
    assert_eq!(call(&b, "k", &runs, "one"), ("one".into(), false));
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    assert!(b.remove("k").expect("remove"));
    let summary = a.import(lines.as_slice(), |_| {}).expect("import");
    assert_eq!(summary.imported, 1);
    assert_eq!(
        call(&a, "k", &runs, "never"),
        ("imported".into(), true),
        "after this replica imported k, it replays the imported record"
    );
}

/// `Store::resolve` on this replica: a stale cached record of a key that became an orphan
/// (another replica removed it, ran it again and lost its holder) is never replayed after this
/// replica resolved the orphan.
#[test]
fn resolve_on_this_replica_replaces_a_stale_cached_record() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let (a, b) = (
        cached(&schema, 100, Duration::from_secs(60)),
        plain(&schema),
    );
    let runs = AtomicUsize::new(0);
    assert_eq!(call(&b, "k", &runs, "one"), ("one".into(), false));
    assert_eq!(call(&a, "k", &runs, "never"), ("one".into(), true));
    assert!(b.remove("k").expect("remove"));
    let (started_tx, started) = std::sync::mpsc::channel();
    let (release_tx, release) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let b = &b;
        let holder = scope.spawn(move || {
            b.execute_once("k", move || {
                started_tx.send(()).expect("started");
                let _ = release.recv();
                Ok::<_, Io>("lost".to_owned())
            })
        });
        started.recv().expect("the holder runs");
        b.__lapse_leases().expect("lapse");
        let info = a
            .resolve("k", Resolution::Completed(serde_json::json!("resolved")))
            .expect("resolve");
        assert_eq!(info.state, idemstore::RecordState::Completed);
        release_tx.send(()).expect("release");
        assert!(holder.join().expect("holder").is_err(), "fenced out");
    });
    assert_eq!(
        call(&a, "k", &runs, "never"),
        ("resolved".into(), true),
        "after this replica resolved k, it replays the resolution"
    );
}

/// A retryable failure (recorded, or forgotten with `forget_retryable_errors`) after this
/// replica removed a cached key: the next call runs again; the old record never comes back.
#[test]
fn retryable_failures_after_own_removal_never_bring_the_old_record_back() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 100, Duration::from_secs(60));
    let runs = AtomicUsize::new(0);
    for forget in [false, true] {
        let key = format!("f{forget}");
        assert!(!call(&a, &key, &runs, "old").1);
        assert!(call(&a, &key, &runs, "never").1);
        assert!(a.remove(&key).expect("remove"));
        let mut failing = a.call(&key);
        if forget {
            failing = failing.forget_retryable_errors();
        }
        let failed = failing.run(|| {
            runs.fetch_add(1, Ordering::SeqCst);
            Err::<String, _>(Io::other("retry me"))
        });
        assert!(
            matches!(
                failed,
                Err(ExecuteError::Operation {
                    replayed: false,
                    ..
                })
            ),
            "{failed:?}"
        );
        assert_eq!(call(&a, &key, &runs, "new"), ("new".into(), false));
        assert_eq!(call(&a, &key, &runs, "never"), ("new".into(), true));
    }
}

/// Keys with steps: after this replica removed a cached multi-step key, the next call runs
/// every step again (sync and async), and replays the new outcome.
#[test]
fn steps_keys_run_again_after_own_removal_sync_and_async() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 100, Duration::from_secs(60));
    let steps = AtomicUsize::new(0);
    let run = |answer: &str| {
        let out = a
            .execute_steps("s", |ctx| {
                let x: u32 = ctx
                    .step("one", || {
                        steps.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, Io>(1)
                    })
                    .map_err(|e| Io::other(format!("{e:?}")))?;
                Ok::<_, Io>(format!("{answer}{x}"))
            })
            .expect("steps");
        (out.is_replayed(), out.into_value())
    };
    assert_eq!(run("a"), (false, "a1".into()));
    assert_eq!(run("never"), (true, "a1".into()));
    assert_eq!(run("never"), (true, "a1".into()));
    assert!(a.remove("s").expect("remove"));
    assert_eq!(run("b"), (false, "b1".into()));
    assert_eq!(steps.load(Ordering::SeqCst), 2);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let runs = AtomicUsize::new(0);
    let replay = runtime
        .block_on(a.execute_once_async("s", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Io>("never".to_owned())
        }))
        .expect("async replay");
    assert_eq!(
        (replay.is_replayed(), replay.into_value()),
        (true, "b1".into())
    );
    assert!(a.remove("s").expect("remove"));
    let again = runtime
        .block_on(a.execute_once_async("s", || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Io>("c".to_owned())
        }))
        .expect("async run");
    assert_eq!(
        (again.is_replayed(), again.into_value()),
        (false, "c".into())
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A fingerprint mismatch against a cached record is refused; a cached record of another
/// fingerprint is never replayed as the caller's; a refused call records nothing.
#[test]
fn fingerprints_are_checked_on_cached_records_sync_and_async() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = cached(&schema, 100, Duration::from_secs(60));
    let runs = AtomicUsize::new(0);
    let (fp1, fp2) = (
        Fingerprint::of(&"one").expect("fp"),
        Fingerprint::of(&"two").expect("fp"),
    );
    let run = |fp: Fingerprint| {
        a.call("k").fingerprint(fp).run(|| {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Io>("ran".to_owned())
        })
    };
    assert!(!run(fp1).expect("first").is_replayed());
    assert!(run(fp1).expect("replay").is_replayed());
    assert!(run(fp1).expect("replay").is_replayed());
    for _ in 0..2 {
        match run(fp2) {
            Err(ExecuteError::Store(Error::FingerprintMismatch { .. })) => {}
            other => panic!("expected a fingerprint mismatch, got {other:?}"),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let refused = runtime.block_on(a.call("k").fingerprint(fp2).run_async(|| async {
        runs.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Io>("ran".to_owned())
    }));
    assert!(
        matches!(
            refused,
            Err(ExecuteError::Store(Error::FingerprintMismatch { .. }))
        ),
        "{refused:?}"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------
// 7. The HTTP layer on PostgreSQL with the cache.

/// Retries replay (through the cache), a different body is refused (422) against the cached
/// record, and after this replica removed the key the next request runs the handler again.
#[test]
fn http_layer_on_a_cached_replica() {
    use axum::routing::post;
    use axum::Router;
    use common::http::{client, counted_create, runtime, send, App};
    use idemstore::http::IdempotencyLayer;

    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let a = Arc::new(cached(&schema, 100, Duration::from_secs(60)));
    let rt = runtime();
    let app = Arc::new(App::default());
    let router = Router::new()
        .route("/orders", post(counted_create))
        .layer(IdempotencyLayer::new(Arc::clone(&a)))
        .with_state(Arc::clone(&app));
    let (addr, server) = rt.block_on(common::http::serve(router));
    let client = client();
    let key = [("idempotency-key", "\"h1\"")];
    let (first, again, other) = rt.block_on(async {
        let first = send(&client, addr, "/orders", &key, b"{}").await;
        let mut again = Vec::new();
        for _ in 0..3 {
            again.push(send(&client, addr, "/orders", &key, b"{}").await);
        }
        let other = send(&client, addr, "/orders", &key, b"{\"x\":1}").await;
        (first, again, other)
    });
    assert!(!first.replayed());
    for r in &again {
        assert_eq!((r.replayed(), &r.body), (true, &first.body));
    }
    assert_eq!(other.status.as_u16(), 422, "{:?}", other.body);
    assert_eq!(app.runs.load(Ordering::SeqCst), 1);
    let keys: Vec<Vec<u8>> = a.records().map(|r| r.expect("record").0).collect();
    assert_eq!(keys.len(), 1);
    for key in &keys {
        assert!(a.remove(key).expect("remove"));
    }
    let after = rt.block_on(send(&client, addr, "/orders", &key, b"{\"x\":1}"));
    assert!(
        !after.replayed(),
        "the removed key ran again: {:?}",
        after.body
    );
    assert_eq!(app.runs.load(Ordering::SeqCst), 2);
    server.abort();
}
