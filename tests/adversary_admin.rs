//! Adversarial tests of the operator layer (commit 079e3e2): `Store::resolve`, `inspect`,
//! `export` / `import`, and `Engine::import_record` on sled, memory and PostgreSQL.
//!
//! Each test states the promise it checks (module docs of src/api/admin.rs and
//! src/driver/resolve.rs, docs/design.md §3 on claim tokens) and fails when it is broken.

mod common;

use common::pg::{pg_url, PgSchema};
use common::START_MS;
use idemstore::{
    ClaimToken, Error, ExecuteError, ManualClock, MemoryEngine, OrphanPolicy, PgStore, RecordState,
    Resolution, StepError, Store, StoreBuilder,
};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

type Fail = std::io::Error;

fn fail() -> Fail {
    std::io::Error::other("retry me")
}

fn sled_at(dir: &std::path::Path, name: &str, clock: &ManualClock) -> Store {
    Store::builder(dir.join(name))
        .clock(clock.clone())
        .sweep_interval(None)
        .open()
        .expect("open sled store")
}

fn export_of(store: &impl Exporter) -> Vec<u8> {
    store.export_all()
}

/// `export` is generic over a private engine bound; spell it per engine.
trait Exporter {
    fn export_all(&self) -> Vec<u8>;
}

macro_rules! exporter {
    ($t:ty) => {
        impl Exporter for $t {
            fn export_all(&self) -> Vec<u8> {
                let mut out = Vec::new();
                self.export(&mut out, |_| {}).expect("export");
                out
            }
        }
    };
}
exporter!(Store);
exporter!(Store<MemoryEngine>);
exporter!(PgStore);

/// A sled store whose `key` holds a retryable failure made after `calls` other claims, in a
/// store opened `opens` times (so its epoch is `opens`). Returns the export and the record's
/// claim token.
fn retryable_export(opens: u32, calls: u32, key: &str) -> (Vec<u8>, ClaimToken) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    for _ in 1..opens {
        sled_at(dir.path(), "src", &clock).close().unwrap();
    }
    let src = sled_at(dir.path(), "src", &clock);
    for i in 0..calls {
        src.execute_once(format!("other-{i}"), || Ok::<_, Fail>(i))
            .unwrap();
    }
    assert!(src.execute_once(key, || Err::<u32, _>(fail())).is_err());
    let info = src.record(key).unwrap().expect("a record");
    assert_eq!(info.state, RecordState::FailedRetryable);
    (export_of(&src), info.claim)
}

// ---------------------------------------------------------------------------------------
// Claim tokens after an import (design §3: "A claim over a record always gets a token above
// the record's"; record.rs: "A claim that replaces a record of its key (a retry, a takeover)
// always gets a larger token than that record's, whichever process makes it").
// ---------------------------------------------------------------------------------------

/// Source and destination both fresh (epoch 1); the source's record was claimed late in its
/// open (sequence 6). The destination's retry takes epoch 1 as "its own" and hands out
/// sequence 1: a token below the record's.
#[test]
fn retry_of_an_imported_record_gets_a_larger_token_same_epoch() {
    let (lines, imported) = retryable_export(1, 5, "k");
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let dst = sled_at(dir.path(), "dst", &clock);
    assert_eq!(dst.import(lines.as_slice(), |_| {}).unwrap().imported, 6);
    let out = dst.execute_once("k", || Ok::<_, Fail>(1u32)).unwrap();
    let retried = out.record().claim;
    assert!(
        retried > imported,
        "the retry's claim token {retried:?} must be above the imported record's {imported:?}"
    );
}

/// The source's epoch is above the destination's: one fresh epoch of the destination is not
/// enough to pass it.
#[test]
fn retry_of_an_imported_record_gets_a_larger_token_higher_epoch() {
    let (lines, imported) = retryable_export(5, 0, "k");
    assert!(imported.epoch >= 3, "{imported:?}");
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let dst = sled_at(dir.path(), "dst", &clock);
    dst.import(lines.as_slice(), |_| {}).unwrap();
    let out = dst.execute_once("k", || Ok::<_, Fail>(1u32)).unwrap();
    let retried = out.record().claim;
    assert!(
        retried > imported,
        "the retry's claim token {retried:?} must be above the imported record's {imported:?}"
    );
}

/// On sled tokens grow across keys too (design §3, §16): after an import, a new key's first
/// claim, not only a retry of a moved-in record, gets a token above every moved-in token.
#[test]
fn a_new_key_after_an_import_gets_a_token_above_the_moved_in_ones() {
    let (lines, imported) = retryable_export(5, 3, "k");
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let dst = sled_at(dir.path(), "dst", &clock);
    dst.import(lines.as_slice(), |_| {}).unwrap();
    let fresh = dst.execute_once("new-key", || Ok::<_, Fail>(1u32)).unwrap();
    assert!(
        fresh.record().claim > imported,
        "a new key's token {:?} must be above the moved-in {imported:?}",
        fresh.record().claim
    );
}

/// A sled store with `key` Pending (its call blocked in another thread while the store is
/// exported), opened `opens` times first. Returns the export and the orphan's token.
fn pending_export(opens: u32, calls: u32, key: &str, steps: bool) -> (Vec<u8>, ClaimToken) {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    for _ in 1..opens {
        sled_at(dir.path(), "src", &clock).close().unwrap();
    }
    let src = sled_at(dir.path(), "src", &clock);
    for i in 0..calls {
        src.execute_once(format!("other-{i}"), || Ok::<_, Fail>(i))
            .unwrap();
    }
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<()>();
    let (go_tx, go_rx) = crossbeam_channel::unbounded::<()>();
    let exported = std::thread::scope(|s| {
        s.spawn(|| {
            let r = src
                .call(key)
                .orphan_policy(OrphanPolicy::Report)
                .run_steps(|cx| {
                    if steps {
                        cx.step("a", || Ok::<_, Fail>(41u32))?;
                    }
                    started_tx.send(()).unwrap();
                    go_rx.recv().unwrap();
                    Ok::<_, StepError<Fail>>(1u32)
                });
            r.expect("the source's own call completes");
        });
        started_rx.recv().unwrap();
        let lines = export_of(&src);
        go_tx.send(()).unwrap();
        lines
    });
    let text = String::from_utf8(exported.clone()).unwrap();
    assert!(text.lines().count() >= 2, "{text}");
    // The orphan's token, as the destination will see it.
    let dir2 = tempfile::tempdir().unwrap();
    let probe = sled_at(dir2.path(), "probe", &clock);
    probe.import(exported.as_slice(), |_| {}).unwrap();
    let info = probe.record(key).unwrap().expect("imported");
    assert_eq!(info.state, RecordState::Pending);
    (exported, info.claim)
}

/// A takeover (Rerun) of an imported orphan: its token must be above the orphan's.
#[test]
fn takeover_of_an_imported_orphan_gets_a_larger_token() {
    let (lines, orphan) = pending_export(3, 4, "k", false);
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let dst = sled_at(dir.path(), "dst", &clock);
    dst.import(lines.as_slice(), |_| {}).unwrap();
    let out = dst
        .call("k")
        .orphan_policy(OrphanPolicy::Rerun)
        .run(|| Ok::<_, Fail>(5u32))
        .unwrap();
    assert_eq!(*out, 5);
    assert!(
        out.record().claim > orphan,
        "takeover token {:?} must be above the orphan's {orphan:?}",
        out.record().claim
    );
}

/// `resolve` is "a takeover ... with a token above the orphan's" (driver/resolve.rs).
#[test]
fn resolve_of_an_imported_orphan_gets_a_larger_token() {
    let (lines, orphan) = pending_export(1, 6, "k", false);
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let dst = sled_at(dir.path(), "dst", &clock);
    dst.import(lines.as_slice(), |_| {}).unwrap();
    let info = dst
        .resolve("k", Resolution::Completed(serde_json::json!(7)))
        .unwrap();
    assert!(
        info.claim > orphan,
        "resolution token {:?} must be above the orphan's {orphan:?}",
        info.claim
    );
}

/// An imported orphan under Report is Interrupted, resolves, then replays; its recorded step
/// survives the move and a Release keeps it (the next run replays step "a", never reruns it).
#[test]
fn imported_orphan_with_a_step_reports_then_release_keeps_the_step() {
    let (lines, _) = pending_export(1, 0, "k", true);
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let dst = sled_at(dir.path(), "dst", &clock);
    dst.import(lines.as_slice(), |_| {}).unwrap();
    let r = dst
        .call("k")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| -> Result<u32, Fail> { panic!("an orphan under Report never runs") });
    assert!(
        matches!(r, Err(ExecuteError::Store(Error::Interrupted { .. }))),
        "{r:?}"
    );
    let detail = dst.inspect("k").unwrap().unwrap();
    assert_eq!(detail.steps.len(), 1, "the step moved with the record");
    let info = dst.resolve("k", Resolution::Release).unwrap();
    assert_eq!(info.state, RecordState::FailedRetryable);
    let ran_a = AtomicU32::new(0);
    let out = dst
        .call("k")
        .orphan_policy(OrphanPolicy::Report)
        .run_steps(|cx| {
            let a: u32 = cx.step("a", || {
                ran_a.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Fail>(0)
            })?;
            Ok::<_, StepError<Fail>>(a + 1)
        })
        .unwrap();
    assert_eq!(
        ran_a.load(Ordering::SeqCst),
        0,
        "a recorded step never runs again"
    );
    assert_eq!(*out, 42);
}

// ---------------------------------------------------------------------------------------
// Resolve.
// ---------------------------------------------------------------------------------------

fn memory_store(engine: &MemoryEngine, clock: &ManualClock) -> Store<MemoryEngine> {
    engine
        .open(
            Store::builder("memory")
                .clock(clock.clone())
                .sweep_interval(None),
        )
        .expect("open memory store")
}

fn memory_store_with(
    engine: &MemoryEngine,
    clock: &ManualClock,
    tweak: impl FnOnce(StoreBuilder) -> StoreBuilder,
) -> Store<MemoryEngine> {
    engine
        .open(tweak(
            Store::builder("memory")
                .clock(clock.clone())
                .sweep_interval(None),
        ))
        .expect("open memory store")
}

/// Leaves `key` an orphan on the memory engine: a power loss while the operation runs, after
/// its durable claim (Report) and, with `step`, its durable step "a" = 41.
fn memory_orphan(
    engine: &MemoryEngine,
    clock: &ManualClock,
    key: &str,
    step: bool,
    ttl: Option<Duration>,
) {
    let store = memory_store(engine, clock);
    let e2 = engine.clone();
    let mut call = store.call(key).orphan_policy(OrphanPolicy::Report);
    if let Some(ttl) = ttl {
        call = call.ttl(ttl);
    }
    let r = call.run_steps(|cx| {
        if step {
            cx.step("a", || Ok::<_, Fail>(41u32))?;
        }
        e2.crash();
        Ok::<u32, StepError<Fail>>(0)
    });
    assert!(r.is_err(), "the crashed engine fails the outcome write");
    drop(store);
}

#[test]
fn resolve_is_refused_while_a_call_of_this_process_runs_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = sled_at(dir.path(), "db", &clock);
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<()>();
    let (go_tx, go_rx) = crossbeam_channel::unbounded::<()>();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            store.execute_once("k", || {
                started_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok::<_, Fail>(1u32)
            })
        });
        started_rx.recv().unwrap();
        for r in [
            Resolution::Completed(serde_json::json!(2)),
            Resolution::FailedPermanently(serde_json::json!("no")),
            Resolution::Release,
        ] {
            let e = store.resolve("k", r).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::NotAnOrphan {
                        holder_live: true,
                        ..
                    }
                ),
                "{e:?}"
            );
        }
        assert_eq!(
            store.record("k").unwrap().unwrap().state,
            RecordState::Pending
        );
        go_tx.send(()).unwrap();
        let out = h.join().unwrap().unwrap();
        assert_eq!((*out, out.is_replayed()), (1, false));
    });
    let again = store.execute_once("k", || Ok::<_, Fail>(9u32)).unwrap();
    assert_eq!(*again, 1, "the live holder's outcome stands");
}

/// Two stores on one memory engine (as the conformance suite's "another process"): the
/// resolution takes the key over; the holder that comes back is fenced out and its outcome
/// never replaces the resolution.
#[test]
fn a_returning_holder_is_fenced_out_by_a_resolution() {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let a = memory_store(&engine, &clock);
    let b = memory_store(&engine, &clock);
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<()>();
    let (go_tx, go_rx) = crossbeam_channel::unbounded::<()>();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            a.call("k").orphan_policy(OrphanPolicy::Report).run(|| {
                started_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok::<_, Fail>(1u32)
            })
        });
        started_rx.recv().unwrap();
        let before = b.record("k").unwrap().unwrap();
        let info = b
            .resolve("k", Resolution::Completed(serde_json::json!(7)))
            .unwrap();
        assert!(info.claim > before.claim);
        go_tx.send(()).unwrap();
        let r = h.join().unwrap();
        assert!(
            matches!(
                r,
                Err(ExecuteError::Store(
                    Error::LeaseLost { .. } | Error::OutcomeNotRecorded { .. }
                ))
            ),
            "{r:?}"
        );
    });
    let replay = b.execute_once("k", || Ok::<_, Fail>(9u32)).unwrap();
    assert_eq!((*replay, replay.is_replayed()), (7, true));
}

#[test]
fn resolved_outcomes_replay_under_report_to_each_kind_of_caller() {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    for k in ["done", "struct", "failed", "failed-default"] {
        memory_orphan(&engine, &clock, k, false, None);
    }
    let store = memory_store(&engine, &clock);
    store
        .resolve("done", Resolution::Completed(serde_json::json!(7)))
        .unwrap();
    store
        .resolve(
            "struct",
            Resolution::Completed(serde_json::json!({"receipt": "r-1", "cents": 250})),
        )
        .unwrap();
    store
        .resolve(
            "failed",
            Resolution::FailedPermanently(serde_json::json!("declined")),
        )
        .unwrap();
    store
        .resolve(
            "failed-default",
            Resolution::FailedPermanently(serde_json::json!("declined")),
        )
        .unwrap();
    let never = || -> Result<u32, Fail> { panic!("a resolved run never runs again") };
    let out = store
        .call("done")
        .orphan_policy(OrphanPolicy::Report)
        .run(never)
        .unwrap();
    assert_eq!(
        (*out, out.is_replayed(), out.record().attempts),
        (7, true, 1)
    );

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Receipt {
        receipt: String,
        cents: u64,
    }
    let out = store
        .call("struct")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| -> Result<Receipt, Fail> { panic!("never") })
        .unwrap();
    assert_eq!(
        *out,
        Receipt {
            receipt: "r-1".into(),
            cents: 250
        }
    );

    let r = store
        .call("failed")
        .orphan_policy(OrphanPolicy::Report)
        .permanent_if(|_: &String| true)
        .run(|| -> Result<u32, String> { panic!("never") });
    match r {
        Err(ExecuteError::Operation { error, replayed }) => {
            assert_eq!((error.as_str(), replayed), ("declined", true))
        }
        other => panic!("a permanent_if caller gets the resolved error: {other:?}"),
    }
    let r = store
        .call("failed-default")
        .orphan_policy(OrphanPolicy::Report)
        .run(never);
    assert!(
        matches!(
            r,
            Err(ExecuteError::Store(Error::PermanentErrorRecorded { .. }))
        ),
        "{r:?}"
    );
}

/// A resolution is durable when resolve returns: a power loss right after keeps it.
#[test]
fn a_resolution_survives_a_power_loss_right_after_it_returns() {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    memory_orphan(&engine, &clock, "k", false, None);
    let store = memory_store(&engine, &clock);
    store
        .resolve("k", Resolution::Completed(serde_json::json!(7)))
        .unwrap();
    engine.crash();
    drop(store);
    let store = memory_store(&engine, &clock);
    let out = store
        .call("k")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| -> Result<u32, Fail> { panic!("a resolved run never runs again") })
        .unwrap();
    assert_eq!(*out, 7);
}

/// Every write and barrier of a resolution failed once: the error is typed, the key is then
/// either still an orphan (resolve again works) or resolved; never a panic, never a run.
#[test]
fn a_resolution_under_injected_faults_is_typed_and_can_be_retried() {
    for (what, n) in [("write", 1), ("write", 2), ("write", 3), ("barrier", 1)] {
        let engine = MemoryEngine::new();
        let clock = ManualClock::new(START_MS);
        memory_orphan(&engine, &clock, "k", false, None);
        let store = memory_store(&engine, &clock);
        match what {
            "write" => engine.fail_nth_write(n),
            _ => engine.fail_nth_barrier(n),
        }
        let first = store.resolve("k", Resolution::Completed(serde_json::json!(7)));
        if let Err(e) = &first {
            assert!(matches!(e, Error::Storage(_)), "{what} {n}: {e:?}");
            // "inspect and run it again"
            let seen = store.inspect("k").unwrap().unwrap();
            if seen.info.state == RecordState::Pending {
                store
                    .resolve("k", Resolution::Completed(serde_json::json!(7)))
                    .unwrap_or_else(|e| panic!("{what} {n}: resolving again: {e:?}"));
            }
        }
        engine.crash();
        drop(store);
        let store = memory_store(&engine, &clock);
        let out = store
            .call("k")
            .orphan_policy(OrphanPolicy::Report)
            .run(|| -> Result<u32, Fail> { panic!("{what} {n}: never runs") })
            .unwrap_or_else(|e| panic!("{what} {n}: {e:?}"));
        assert_eq!(*out, 7, "{what} {n}");
    }
}

/// An expired Pending record is not resolved, and nothing changes.
#[test]
fn resolve_of_an_expired_orphan_is_refused_and_changes_nothing() {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    memory_orphan(&engine, &clock, "k", true, Some(Duration::from_secs(60)));
    let store = memory_store(&engine, &clock);
    clock.advance(Duration::from_secs(120));
    let before = store.inspect("k").unwrap().unwrap();
    assert!(before.expired);
    let e = store.resolve("k", Resolution::Release).unwrap_err();
    assert!(matches!(e, Error::NotAnOrphan { .. }), "{e:?}");
    assert_eq!(store.inspect("k").unwrap().unwrap(), before);
}

/// The orphan's call chose a 30-day TTL; the store's default is one hour. The resolved
/// outcome must be replayed at least as long as the orphan would have lived: two hours later
/// it must still replay, not run the payment again.
#[test]
fn a_resolution_does_not_shorten_the_ttl_the_call_chose() {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    // The orphan, claimed with a 30-day TTL.
    {
        let store = memory_store_with(&engine, &clock, |b| {
            b.default_ttl(Duration::from_secs(3600))
        });
        let e2 = engine.clone();
        let r = store
            .call("pay")
            .ttl(Duration::from_secs(30 * 86400))
            .orphan_policy(OrphanPolicy::Report)
            .run(|| {
                e2.crash();
                Ok::<u32, Fail>(0)
            });
        assert!(r.is_err());
    }
    let store = memory_store_with(&engine, &clock, |b| {
        b.default_ttl(Duration::from_secs(3600))
    });
    let orphan_expires = store.record("pay").unwrap().unwrap().expires_at;
    clock.advance(Duration::from_secs(60));
    let info = store
        .resolve("pay", Resolution::Completed(serde_json::json!(7)))
        .unwrap();
    assert!(
        info.expires_at >= orphan_expires,
        "the resolution expires at {:?}, before the orphan would have ({:?})",
        info.expires_at,
        orphan_expires
    );
    clock.advance(Duration::from_secs(2 * 3600));
    let out = store
        .call("pay")
        .ttl(Duration::from_secs(30 * 86400))
        .orphan_policy(OrphanPolicy::Report)
        .run(|| -> Result<u32, Fail> {
            panic!("the payment ran twice: the resolution expired early")
        })
        .unwrap();
    assert_eq!(*out, 7);
}

// ---------------------------------------------------------------------------------------
// Import.
// ---------------------------------------------------------------------------------------

fn completed_export(key: &str, value: &str) -> Vec<u8> {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let src = memory_store(&engine, &clock);
    src.execute_once(key, || Ok::<_, Fail>(value.to_string()))
        .unwrap();
    export_of(&src)
}

/// A key whose record in the destination has expired reads as absent there: the source's
/// live outcome must win, or the next call runs the operation again.
#[test]
fn import_over_an_expired_record_keeps_the_live_outcome() {
    let lines = completed_export("k", "from-source");
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS - 10 * 86_400_000);
    let dst = memory_store(&engine, &clock);
    dst.call("k")
        .ttl(Duration::from_secs(60))
        .run(|| Ok::<_, Fail>(String::from("stale")))
        .unwrap();
    clock.set(START_MS);
    assert!(dst.inspect("k").unwrap().unwrap().expired);
    let summary = dst.import(lines.as_slice(), |_| {}).unwrap();
    let out = dst
        .execute_once("k", || -> Result<String, Fail> {
            panic!(
                "the operation ran again: the imported outcome was dropped (summary {summary:?})"
            )
        })
        .unwrap();
    assert_eq!(out.as_str(), "from-source");
}

/// "Error::ImportLine ... (the records before it were imported)" and "Imported records are
/// durable": an import that stops at a bad line leaves the records before it in the store;
/// a call replays them; a power loss must not then take them away (the operation would run a
/// second time).
#[test]
fn records_imported_before_a_bad_line_are_durable() {
    let mut lines = header().into_bytes();
    lines.extend_from_slice(record_line(&completed_export("k", "from-source")).as_bytes());
    lines.extend_from_slice(b"\n{\"key\":\"zz\",\"record\":\"00\"}\n");
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let dst = memory_store(&engine, &clock);
    let e = dst.import(lines.as_slice(), |_| {}).unwrap_err();
    assert!(matches!(e, Error::ImportLine { line: 3, .. }), "{e:?}");
    let out = dst
        .execute_once("k", || -> Result<String, Fail> {
            panic!("imported: replays")
        })
        .unwrap();
    assert!(out.is_replayed());
    engine.crash();
    drop(dst);
    let dst = memory_store(&engine, &clock);
    let ran = AtomicU32::new(0);
    let out = dst
        .execute_once("k", || {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Fail>(String::from("second run"))
        })
        .unwrap();
    assert_eq!(
        (out.as_str(), ran.load(Ordering::SeqCst)),
        ("from-source", 0),
        "a replayed outcome was lost by a power loss after a failed import: the operation ran twice"
    );
}

/// Same, with a storage failure (a full disk) on a later record instead of a bad line.
#[test]
fn records_imported_before_a_storage_failure_are_durable() {
    let lines = format!(
        "{}{}\n{}\n{{\"end\":2}}\n",
        header(),
        record_line(&completed_export("a", "A")),
        record_line(&completed_export("b", "B"))
    )
    .into_bytes();
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let dst = memory_store(&engine, &clock);
    // Writes of the import: index "a", record "a", index "b", record "b": fail the last.
    engine.fail_nth_write(4);
    let e = dst.import(lines.as_slice(), |_| {}).unwrap_err();
    assert!(matches!(e, Error::Storage(_)), "{e:?}");
    let out = dst
        .execute_once("a", || -> Result<String, Fail> {
            panic!("imported: replays")
        })
        .unwrap();
    assert_eq!(out.as_str(), "A");
    engine.crash();
    drop(dst);
    let dst = memory_store(&engine, &clock);
    let out = dst
        .execute_once("a", || Ok::<_, Fail>(String::from("second run")))
        .unwrap();
    assert_eq!(out.as_str(), "A", "the replayed outcome of \"a\" was lost");
}

/// An import is durable when it returns.
#[test]
fn an_import_survives_a_power_loss_right_after_it_returns() {
    let lines = completed_export("k", "from-source");
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let dst = memory_store(&engine, &clock);
    dst.import(lines.as_slice(), |_| {}).unwrap();
    engine.crash();
    drop(dst);
    let dst = memory_store(&engine, &clock);
    let out = dst
        .execute_once("k", || -> Result<String, Fail> {
            panic!("imported: replays")
        })
        .unwrap();
    assert_eq!(out.as_str(), "from-source");
}

fn header() -> String {
    String::from("{\"format\":\"idemstore-export\",\"version\":1}\n")
}

fn record_line(lines: &[u8]) -> String {
    String::from_utf8(lines.to_vec())
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string()
}

/// Crafted lines: each is a typed error naming its line (or the key), never a panic, and the
/// store goes on working.
#[test]
fn crafted_export_lines_are_refused_with_typed_errors() {
    let good = record_line(&completed_export("k", "v"));
    let v: serde_json::Value = serde_json::from_str(&good).unwrap();
    let record_hex = v["record"].as_str().unwrap().to_string();
    let long_key: String = "6b".repeat(300);
    let mut flipped = record_hex.clone().into_bytes();
    let last = flipped.len() - 1;
    flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    type Check<'a> = &'a dyn Fn(&Error) -> bool;
    let cases: Vec<(String, Check)> = vec![
        ("not json\n".into(), &|e| {
            matches!(e, Error::ImportLine { line: 1, .. })
        }),
        (
            "{\"format\":\"idemstore-export\",\"version\":2}\n".into(),
            &|e| matches!(e, Error::ImportLine { line: 1, .. }),
        ),
        (
            format!(
                "{}\n{{\"key\":\"6\",\"record\":\"{record_hex}\"}}\n",
                header()
            ),
            &|e| matches!(e, Error::ImportLine { line: 3, .. }),
        ),
        (
            format!("{}{{\"key\":\"6b\",\"record\":\"zz\"}}\n", header()),
            &|e| matches!(e, Error::ImportLine { line: 2, .. }),
        ),
        (
            format!("{}{{\"key\":\"6b\",\"record\":\"{flipped}\"}}\n", header()),
            &|e| matches!(e, Error::ImportLine { line: 2, .. }),
        ),
        (
            format!("{}{{\"key\":\"6b\",\"record\":\"\"}}\n", header()),
            &|e| matches!(e, Error::ImportLine { line: 2, .. }),
        ),
        (
            format!(
                "{}{{\"key\":\"6b\",\"record\":\"{record_hex}\",\"steps\":[[0,\"q\"]]}}\n",
                header()
            ),
            &|e| matches!(e, Error::ImportLine { line: 2, .. }),
        ),
        (
            format!(
                "{}{{\"key\":\"{long_key}\",\"record\":\"{record_hex}\"}}\n",
                header()
            ),
            &|e| {
                matches!(
                    e,
                    Error::KeyTooLong { .. } | Error::ImportLine { line: 2, .. }
                )
            },
        ),
        (
            format!("{}{{\"key\":\"\",\"record\":\"{record_hex}\"}}\n", header()),
            &|e| matches!(e, Error::EmptyKey | Error::ImportLine { line: 2, .. }),
        ),
    ];
    for (i, (input, ok)) in cases.iter().enumerate() {
        let engine = MemoryEngine::new();
        let clock = ManualClock::new(START_MS);
        let dst = memory_store_with(&engine, &clock, |b| b.max_key_bytes(256));
        let r = dst.import(input.as_bytes(), |_| {});
        match r {
            Err(e) => assert!(ok(&e), "case {i} ({input:?}): wrong error {e:?}"),
            Ok(s) => panic!("case {i} ({input:?}): accepted as {s:?}"),
        }
        dst.execute_once("after", || Ok::<_, Fail>(1u32)).unwrap();
    }
}

/// An empty input is not an export (a truncated or failed export, a wrong file): it must be
/// refused like any input whose first line is not the header, not "imported 0 records".
#[test]
fn an_empty_input_is_not_an_export() {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let dst = memory_store(&engine, &clock);
    let r = dst.import(&b""[..], |_| {});
    assert!(
        matches!(r, Err(Error::ImportLine { line: 1, .. })),
        "an empty file was accepted: {r:?}"
    );
}

/// A crafted line whose steps are not step records: accepted (import copies bytes), but a
/// later call gets a typed error, never a panic and never a run of a step it cannot read.
#[test]
fn imported_garbage_steps_give_typed_errors_later() {
    // A retryable multi-step record so the next call continues its life and reads its steps.
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let src = memory_store(&engine, &clock);
    let r = src.execute_steps("k", |cx| {
        cx.step("a", || Ok::<_, Fail>(1u32))?;
        Err::<u32, _>(StepError::Failed(fail()))
    });
    assert!(r.is_err());
    let line = record_line(&export_of(&src));
    let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
    v["steps"] = serde_json::json!([[0, "00ff00ff"], [4294967295u32, "01"]]);
    let input = format!("{}{}\n{{\"end\":1}}\n", header(), v);
    let dst_engine = MemoryEngine::new();
    let dst = memory_store(&dst_engine, &clock);
    dst.import(input.as_bytes(), |_| {}).unwrap();
    let ran = AtomicU32::new(0);
    let r = dst.execute_steps("k", |cx| {
        let a: u32 = cx.step("a", || {
            ran.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Fail>(1u32)
        })?;
        Ok::<_, StepError<Fail>>(a)
    });
    assert!(r.is_err(), "{r:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 0);
    let e = dst.inspect("k").unwrap_err();
    assert!(matches!(e, Error::CorruptStep { .. }), "{e:?}");
}

/// Export then import: the same bytes (inspect is equal), the same steps, the same replays;
/// importing twice changes nothing and counts the keys as existing; expired ones are skipped.
#[test]
fn export_import_round_trip_is_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let src = sled_at(dir.path(), "src", &clock);
    src.execute_once("done", || Ok::<_, Fail>(String::from("x")))
        .unwrap();
    assert!(src.execute_once("retry", || Err::<u32, _>(fail())).is_err());
    src.execute_steps("steps", |cx| {
        let a: u32 = cx.step("a", || Ok::<_, Fail>(1))?;
        let b: u32 = cx.step("b", || Ok::<_, Fail>(2))?;
        Ok::<_, StepError<Fail>>(a + b)
    })
    .unwrap();
    src.call("short")
        .ttl(Duration::from_secs(1))
        .run(|| Ok::<_, Fail>(1u32))
        .unwrap();
    clock.advance(Duration::from_secs(5));
    let lines = export_of(&src);
    let n = String::from_utf8(lines.clone()).unwrap().lines().count();
    assert_eq!(
        n, 6,
        "header, every record (expired ones too) and the end line"
    );
    let dst = sled_at(dir.path(), "dst", &clock);
    let s = dst.import(lines.as_slice(), |_| {}).unwrap();
    assert_eq!((s.imported, s.existing, s.expired), (3, 0, 1));
    for k in ["done", "retry", "steps"] {
        assert_eq!(src.inspect(k).unwrap(), dst.inspect(k).unwrap(), "{k}");
    }
    assert_eq!(dst.inspect("short").unwrap(), None);
    let s = dst.import(lines.as_slice(), |_| {}).unwrap();
    assert_eq!((s.imported, s.existing, s.expired), (0, 3, 1));
}

/// A new life of an imported multi-step key, in a destination whose first claim token equals
/// the imported life's name, must not see the imported life's steps.
#[test]
fn a_new_life_after_an_imported_life_expires_runs_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let src = sled_at(dir.path(), "src", &clock);
    src.call("k")
        .ttl(Duration::from_secs(60))
        .run_steps(|cx| {
            let a: u32 = cx.step("a", || Ok::<_, Fail>(1))?;
            Ok::<_, StepError<Fail>>(a)
        })
        .unwrap();
    let life = src.inspect("k").unwrap().unwrap().life;
    let lines = export_of(&src);
    let dst = sled_at(dir.path(), "dst", &clock);
    assert_eq!(dst.epoch(), life.epoch, "the names can collide");
    dst.import(lines.as_slice(), |_| {}).unwrap();
    clock.advance(Duration::from_secs(120));
    let ran = AtomicU32::new(0);
    let out = dst
        .execute_steps("k", |cx| {
            let a: u32 = cx.step("a", || {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Fail>(10)
            })?;
            Ok::<_, StepError<Fail>>(a)
        })
        .unwrap();
    assert_eq!((*out, ran.load(Ordering::SeqCst)), (10, 1));
}

/// Export of a store holding corrupt record bytes copies them (a backup loses nothing); the
/// import refuses that line with a typed error naming it, never a panic.
#[test]
fn export_of_a_corrupt_record_is_a_typed_error() {
    let scratch = common::Scratch::new();
    {
        let s = scratch.open();
        s.execute_once("a", || Ok::<_, Fail>(1u32)).unwrap();
        s.execute_once("b", || Ok::<_, Fail>(2u32)).unwrap();
    }
    scratch.poke_record(b"b", b"\x00garbage");
    let s = scratch.open();
    let mut out = Vec::new();
    assert_eq!(s.export(&mut out, |_| {}).unwrap(), 2);
    let other = common::Scratch::new();
    let e = other.open().import(out.as_slice(), |_| {}).unwrap_err();
    assert!(matches!(e, Error::ImportLine { line: 3, .. }), "{e:?}");
    let e = s.inspect("b").unwrap_err();
    assert!(matches!(e, Error::CorruptRecord { .. }), "{e:?}");
    let e = s.resolve("b", Resolution::Release).unwrap_err();
    assert!(matches!(e, Error::CorruptRecord { .. }), "{e:?}");
}

// ---------------------------------------------------------------------------------------
// PostgreSQL.
// ---------------------------------------------------------------------------------------

fn pg_store(schema: &PgSchema, clock: &ManualClock) -> PgStore {
    StoreBuilder::default()
        .clock(clock.clone())
        .sweep_interval(None)
        .open_postgres(schema.options().lease(Duration::from_secs(2)))
        .expect("open a PostgreSQL store")
}

/// sled → PostgreSQL: a retry on PostgreSQL of a record imported from a sled store whose
/// epoch is above the PostgreSQL store's must get a token above the record's.
#[test]
fn pg_retry_of_an_imported_record_gets_a_larger_token() {
    let Some(url) = pg_url() else { return };
    let (lines, imported) = retryable_export(6, 3, "k");
    let schema = PgSchema::new(&url);
    let clock = ManualClock::new(START_MS);
    let dst = pg_store(&schema, &clock);
    dst.import(lines.as_slice(), |_| {}).unwrap();
    let out = dst.execute_once("k", || Ok::<_, Fail>(1u32)).unwrap();
    assert!(
        out.record().claim > imported,
        "the retry's token {:?} must be above the imported record's {imported:?}",
        out.record().claim
    );
}

/// An imported Pending row (no lease) is an orphan on PostgreSQL: Report says Interrupted,
/// resolve works, the resolution replays, and a second replica agrees.
#[test]
fn pg_imported_orphan_reports_resolves_and_replays() {
    let Some(url) = pg_url() else { return };
    let (lines, orphan) = pending_export(1, 0, "k", true);
    let schema = PgSchema::new(&url);
    let clock = ManualClock::new(START_MS);
    let a = pg_store(&schema, &clock);
    let b = pg_store(&schema, &clock);
    a.import(lines.as_slice(), |_| {}).unwrap();
    let r = b
        .call("k")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| -> Result<u32, Fail> { panic!("never") });
    assert!(
        matches!(r, Err(ExecuteError::Store(Error::Interrupted { .. }))),
        "{r:?}"
    );
    let info = a
        .resolve("k", Resolution::Completed(serde_json::json!(7)))
        .unwrap();
    assert!(info.claim > orphan, "{:?} vs {orphan:?}", info.claim);
    let out = b
        .call("k")
        .orphan_policy(OrphanPolicy::Report)
        .run(|| -> Result<u32, Fail> { panic!("never") })
        .unwrap();
    assert_eq!(*out, 7);
    assert_eq!(b.inspect("k").unwrap().unwrap().steps.len(), 1);
}

/// A replica holding a live (renewed) lease is never resolved over by another replica, even
/// across several lease periods; once it finishes, its outcome stands.
#[test]
fn pg_resolve_never_overwrites_a_renewing_holder() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let clock = ManualClock::new(START_MS);
    let a = pg_store(&schema, &clock);
    let b = pg_store(&schema, &clock);
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<()>();
    let (go_tx, go_rx) = crossbeam_channel::unbounded::<()>();
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            a.execute_once("k", || {
                started_tx.send(()).unwrap();
                go_rx.recv().unwrap();
                Ok::<_, Fail>(1u32)
            })
        });
        started_rx.recv().unwrap();
        // Three lease periods (2 s each): the holder renews throughout.
        for _ in 0..12 {
            let e = b.resolve("k", Resolution::Release).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::NotAnOrphan {
                        holder_live: true,
                        ..
                    }
                ),
                "{e:?}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        go_tx.send(()).unwrap();
        let out = h.join().unwrap().unwrap();
        assert!(!out.is_replayed());
    });
    let out = b.execute_once("k", || Ok::<_, Fail>(9u32)).unwrap();
    assert_eq!(*out, 1);
}

/// PostgreSQL import over an expired row: as on the embedded engines, the live outcome wins.
#[test]
fn pg_import_over_an_expired_record_keeps_the_live_outcome() {
    let Some(url) = pg_url() else { return };
    let lines = completed_export("k", "from-source");
    let schema = PgSchema::new(&url);
    let clock = ManualClock::new(START_MS - 10 * 86_400_000);
    let dst = pg_store(&schema, &clock);
    dst.call("k")
        .ttl(Duration::from_secs(60))
        .run(|| Ok::<_, Fail>(String::from("stale")))
        .unwrap();
    clock.set(START_MS);
    dst.import(lines.as_slice(), |_| {}).unwrap();
    let out = dst
        .execute_once("k", || -> Result<String, Fail> {
            panic!("the operation ran again")
        })
        .unwrap();
    assert_eq!(out.as_str(), "from-source");
}

/// An async call of this process running the key: resolve is refused as for a sync call, and
/// an async call dropped mid-run (an interrupted run) is then resolvable.
#[test]
fn resolve_and_async_calls_of_this_process() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let store = std::sync::Arc::new(sled_at(dir.path(), "db", &clock));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<()>();
    let (go_tx, go_rx) = crossbeam_channel::unbounded::<()>();
    let s2 = store.clone();
    let task = rt.spawn(async move {
        s2.execute_once_async("k", || async move {
            started_tx.send(()).unwrap();
            tokio::task::spawn_blocking(move || go_rx.recv().unwrap())
                .await
                .unwrap();
            Ok::<_, Fail>(1u32)
        })
        .await
        .map(|o| *o)
    });
    started_rx.recv().unwrap();
    let e = store.resolve("k", Resolution::Release).unwrap_err();
    assert!(
        matches!(
            e,
            Error::NotAnOrphan {
                holder_live: true,
                ..
            }
        ),
        "{e:?}"
    );
    go_tx.send(()).unwrap();
    assert_eq!(rt.block_on(task).unwrap().unwrap(), 1);

    // A dropped async call leaves its claim Pending: an interrupted run.
    let (started_tx, started_rx) = crossbeam_channel::unbounded::<()>();
    let s3 = store.clone();
    let task = rt.spawn(async move {
        let _ = s3
            .call("k2")
            .orphan_policy(OrphanPolicy::Report)
            .run_async(|| async move {
                started_tx.send(()).unwrap();
                std::future::pending::<()>().await;
                Ok::<_, Fail>(1u32)
            })
            .await;
    });
    started_rx.recv().unwrap();
    task.abort();
    let _ = rt.block_on(task);
    let state = store.record("k2").unwrap().map(|i| i.state);
    if state == Some(RecordState::Pending) {
        store
            .resolve("k2", Resolution::Completed(serde_json::json!(3)))
            .unwrap();
        let out = store
            .call("k2")
            .orphan_policy(OrphanPolicy::Report)
            .run(|| -> Result<u32, Fail> { panic!("never") })
            .unwrap();
        assert_eq!(*out, 3);
    }
}

/// A call still running past its record's expiry keeps its record through an import of the
/// same key (as through a sweep): its outcome is recorded, the moved-in record is not written.
#[test]
fn import_leaves_the_record_of_a_call_running_past_its_expiry() {
    let lines = completed_export("k", "from-source");
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let dst = memory_store(&engine, &clock);
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release_tx, release) = std::sync::mpsc::channel::<()>();
    let store = &dst;
    std::thread::scope(|s| {
        let holder = s.spawn(move || {
            store.call("k").ttl(Duration::from_secs(60)).run(|| {
                entered_tx.send(()).unwrap();
                release.recv().unwrap();
                Ok::<_, Fail>(String::from("ran here"))
            })
        });
        entered.recv().unwrap();
        clock.advance(Duration::from_secs(3600));
        let summary = dst.import(lines.as_slice(), |_| {}).unwrap();
        assert_eq!((summary.imported, summary.existing), (0, 1), "{summary:?}");
        release_tx.send(()).unwrap();
        let out = holder.join().unwrap().unwrap();
        assert_eq!(out.as_str(), "ran here");
    });
    let again = dst
        .execute_once("k", || -> Result<String, Fail> {
            panic!("recorded: replays")
        })
        .unwrap();
    assert_eq!(again.as_str(), "ran here");
}

/// An export cut short at a line boundary has no end line: the import says so (after writing
/// the records it read), as it does for an end line that miscounts and a line after the end.
#[test]
fn an_export_cut_short_or_miscounted_is_refused() {
    let engine = MemoryEngine::new();
    let clock = ManualClock::new(START_MS);
    let src = memory_store(&engine, &clock);
    for k in ["a", "b", "c"] {
        src.execute_once(k, || Ok::<_, Fail>(k.to_owned())).unwrap();
    }
    let whole = String::from_utf8(export_of(&src)).unwrap();
    let lines: Vec<&str> = whole.lines().collect();
    assert_eq!(lines.len(), 5, "{whole}");
    let import = |text: String| {
        let dst = memory_store(&MemoryEngine::new(), &clock);
        let result = dst.import(text.as_bytes(), |_| {});
        let imported = ["a", "b", "c"]
            .iter()
            .filter(|k| dst.inspect(k).unwrap().is_some())
            .count();
        (result, imported)
    };
    let (whole_result, n) = import(whole.clone());
    assert_eq!((whole_result.unwrap().imported, n), (3, 3));

    let cut = format!("{}\n", lines[..4].join("\n"));
    let (result, n) = import(cut);
    assert!(
        matches!(&result, Err(Error::ImportLine { line: 5, reason }) if reason.contains("end line")),
        "{result:?}"
    );
    assert_eq!(n, 3, "the records before the cut are written");

    let miscounted = whole.replace("{\"end\":3}", "{\"end\":4}");
    let (result, _) = import(miscounted);
    assert!(
        matches!(result, Err(Error::ImportLine { line: 5, .. })),
        "{result:?}"
    );

    let trailing = format!("{whole}{}\n", lines[1]);
    let (result, _) = import(trailing);
    assert!(
        matches!(result, Err(Error::ImportLine { line: 6, .. })),
        "{result:?}"
    );
}
