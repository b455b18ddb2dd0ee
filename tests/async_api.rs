//! The async API on real engines (sled in temp dirs, PostgreSQL when configured): the same
//! contract as the sync calls, no blocked runtime worker while a same-key call is waited for,
//! and cancellation: a dropped call leaves nothing (before its claim), an orphan for the
//! orphan policy (after it), never a key stuck until its TTL and never a run beyond the
//! contract.

mod common;

use common::pg::{pg_url, PgSchema};
use common::{store_error, Scratch};
use idemstore::{Error, ExecuteError, OrphanPolicy, StepError, StoreBuilder};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn assert_send<T: Send>(_: &T) {}

/// One runtime thread: while one task waits for a same-key call held by another task, a third
/// task keeps making progress, and the waiter then replays the holder's outcome.
#[test]
fn a_same_key_wait_never_blocks_the_runtime_thread() {
    let scratch = Scratch::new();
    let store = Arc::new(scratch.open());
    current_thread().block_on(async {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (started, has_started) = tokio::sync::oneshot::channel::<()>();
        let holder = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async move {
                        started.send(()).expect("test alive");
                        released.await.expect("released");
                        Ok::<_, std::io::Error>(7u32)
                    })
                    .await
            })
        };
        has_started.await.expect("holder started");
        let waiter = {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .execute_once_async("k", || async { Ok::<_, std::io::Error>(0u32) })
                    .await
            })
        };
        assert_send(&waiter);
        // The ticker runs on the same (only) thread while the waiter waits.
        let ticks = Arc::new(AtomicU64::new(0));
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(2)).await;
            ticks.fetch_add(1, Ordering::SeqCst);
        }
        assert!(
            !waiter.is_finished(),
            "the waiter is still waiting for the holder"
        );
        assert_eq!(ticks.load(Ordering::SeqCst), 50);
        release.send(()).expect("holder alive");
        let held = holder.await.expect("join").expect("holder");
        let waited = waiter.await.expect("join").expect("waiter");
        assert_eq!((*held, held.is_replayed()), (7, false));
        assert_eq!((*waited, waited.is_replayed()), (7, true));
    });
}

/// The futures are `Send` (so they fit `tokio::spawn` and web handlers), for plain calls,
/// builder calls and steps.
#[test]
fn the_futures_are_send() {
    let scratch = Scratch::new();
    let store = scratch.open();
    let plain = store.execute_once_async("a", || async { Ok::<_, std::io::Error>(1u8) });
    assert_send(&plain);
    let built = store
        .call("b")
        .permanent_if(|_: &String| true)
        .run_async(|| async { Ok::<_, String>(1u8) });
    assert_send(&built);
    let steps = store.execute_steps_async("c", |ctx| async move {
        ctx.step("s", || async { Ok::<_, std::io::Error>(1u8) })
            .await
    });
    assert_send(&steps);
}

/// The contract, async: run once, replay, permanent errors replayed, retryable errors run
/// again, fingerprints, a panic leaves the key retryable.
#[test]
fn async_calls_keep_the_contract() {
    let scratch = Scratch::new();
    let store = scratch.open();
    current_thread().block_on(async {
        let runs = AtomicU32::new(0);
        let op = |v: u32| {
            runs.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, String>(v) }
        };
        let first = store.execute_once_async("k", || op(1)).await.expect("run");
        let again = store
            .execute_once_async("k", || op(2))
            .await
            .expect("replay");
        assert_eq!((*first, *again, again.is_replayed()), (1, 1, true));
        assert_eq!(runs.load(Ordering::SeqCst), 1);

        let permanent = store
            .call("p")
            .permanent_if(|e: &String| e == "declined")
            .run_async(|| async { Err::<u32, _>(String::from("declined")) })
            .await;
        assert!(matches!(
            permanent,
            Err(ExecuteError::Operation {
                replayed: false,
                ..
            })
        ));
        let replayed = store
            .call("p")
            .permanent_if(|e: &String| e == "declined")
            .run_async(|| async { Ok::<u32, String>(5) })
            .await;
        assert!(matches!(
            replayed,
            Err(ExecuteError::Operation { replayed: true, .. })
        ));

        let retry = store
            .execute_once_async("r", || async { Err::<u32, _>(String::from("later")) })
            .await;
        assert!(matches!(
            retry,
            Err(ExecuteError::Operation {
                replayed: false,
                ..
            })
        ));
        let ok = store
            .execute_once_async("r", || async { Ok::<u32, String>(3) })
            .await;
        assert_eq!(ok.expect("runs again").record().attempts, 2);

        let fp = idemstore::Fingerprint::of(&"body-1").expect("fingerprint");
        let other = idemstore::Fingerprint::of(&"body-2").expect("fingerprint");
        store
            .call("f")
            .fingerprint(fp)
            .run_async(|| async { Ok::<u32, String>(1) })
            .await
            .expect("run");
        let mismatch = store
            .call("f")
            .fingerprint(other)
            .run_async(|| async { Ok::<u32, String>(2) })
            .await;
        assert!(matches!(
            store_error(mismatch),
            Error::FingerprintMismatch { .. }
        ));
    });
    // A panic inside the operation's future: the key is retryable, the panic continues.
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        current_thread().block_on(store.execute_once_async("boom", || async {
            panic!("the operation panicked");
            #[allow(unreachable_code)]
            Ok::<u32, String>(0)
        }))
    }));
    assert!(caught.is_err(), "the panic reaches the caller");
    let after = current_thread()
        .block_on(store.execute_once_async("boom", || async { Ok::<u32, String>(9) }))
        .expect("runs again after a panic");
    assert_eq!((*after, after.record().attempts), (9, 2));
}

/// Async steps: recorded steps replay on the next attempt; only the rest runs.
#[test]
fn async_steps_replay_recorded_steps() {
    let scratch = Scratch::new();
    let store = scratch.open();
    current_thread().block_on(async {
        let charges = AtomicU32::new(0);
        let mails = AtomicU32::new(0);
        for attempt in 1..=2u32 {
            let (charges, mails) = (&charges, &mails);
            let r = store
                .execute_steps_async("checkout", |ctx| async move {
                    let charge = ctx
                        .step("charge", || async {
                            charges.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, String>(4200u64)
                        })
                        .await?;
                    ctx.step("confirm", || async {
                        mails.fetch_add(1, Ordering::SeqCst);
                        if attempt == 1 {
                            Err(String::from("smtp down"))
                        } else {
                            Ok(())
                        }
                    })
                    .await?;
                    Ok::<_, StepError<String>>(charge)
                })
                .await;
            assert_eq!(r.is_ok(), attempt == 2);
        }
        assert_eq!(
            (charges.load(Ordering::SeqCst), mails.load(Ordering::SeqCst)),
            (1, 2)
        );
        assert_eq!(store.steps("checkout").expect("steps").len(), 2);
    });
}

/// Cancellation: a call dropped while its operation runs leaves an orphan at once: `Report`
/// says `Interrupted`, `Rerun` runs again (attempt 2) and replays the recorded steps; a call
/// dropped while it waits for another call leaves nothing.
#[test]
fn a_dropped_call_is_an_interruption_never_a_stuck_key() {
    let scratch = Scratch::new();
    let store = scratch.open();
    current_thread().block_on(async {
        let charges = AtomicU32::new(0);
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            store.execute_steps_async("k", |ctx| {
                let charges = &charges;
                async move {
                    ctx.step("charge", || async {
                        charges.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, String>(1u32)
                    })
                    .await?;
                    std::future::pending::<()>().await;
                    Ok::<u32, StepError<String>>(0)
                }
            }),
        )
        .await;
        assert!(dropped.is_err(), "the call was cancelled by the timeout");
        let info = store.record("k").expect("record").expect("present");
        assert_eq!(info.state, idemstore::RecordState::Pending);
        let reported = store
            .call("k")
            .orphan_policy(OrphanPolicy::Report)
            .wait_timeout(Duration::ZERO)
            .run_async(|| async { Ok::<u32, String>(0) })
            .await;
        assert!(matches!(
            store_error(reported),
            Error::Interrupted { attempts: 1, .. }
        ));
        let rerun = store
            .execute_steps_async("k", |ctx| {
                let charges = &charges;
                async move {
                    let c = ctx
                        .step("charge", || async {
                            charges.fetch_add(1, Ordering::SeqCst);
                            Ok::<_, String>(99u32)
                        })
                        .await?;
                    Ok::<u32, StepError<String>>(c + 1)
                }
            })
            .await
            .expect("re-run under Rerun");
        assert_eq!(
            (*rerun, rerun.record().attempts),
            (2, 2),
            "the charge step replayed"
        );
        assert_eq!(charges.load(Ordering::SeqCst), 1);

        // A waiter dropped while it waits leaves the holder's call untouched.
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let holder = store.execute_once_async("h", || async move {
            released.await.expect("released");
            Ok::<u32, String>(5)
        });
        let waiter = async {
            let gave_up = tokio::time::timeout(
                Duration::from_millis(30),
                store.execute_once_async("h", || async { Ok::<u32, String>(6) }),
            )
            .await;
            assert!(gave_up.is_err());
            release.send(()).expect("holder alive");
        };
        let (held, ()) = tokio::join!(holder, waiter);
        assert_eq!(*held.expect("holder"), 5);
        let again = store
            .execute_once_async("h", || async { Ok::<u32, String>(7) })
            .await
            .expect("replay");
        assert_eq!((*again, again.is_replayed()), (5, true));
    });
}

/// PostgreSQL: the async API works across replicas, and a call dropped while it holds its
/// claim ends its lease at once, so another replica takes over without waiting it out.
#[test]
fn postgres_async_calls_and_a_dropped_holder_free_the_key_at_once() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let open = || {
        StoreBuilder::default()
            .sweep_interval(None)
            .wait_timeout(Duration::from_secs(5))
            .open_postgres(schema.options().lease(Duration::from_secs(60)))
            .expect("open")
    };
    let (a, b) = (open(), open());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let first = a
            .execute_once_async("k", || async { Ok::<u32, String>(1) })
            .await
            .expect("run");
        let again = b
            .execute_once_async("k", || async { Ok::<u32, String>(2) })
            .await
            .expect("replay on the other replica");
        assert_eq!((*first, *again, again.is_replayed()), (1, 1, true));

        let dropped = tokio::time::timeout(
            Duration::from_millis(200),
            a.execute_once_async("d", std::future::pending::<Result<u32, String>>),
        )
        .await;
        assert!(dropped.is_err());
        // The lease is 60 s and the wait 5 s: only an ended lease lets this run.
        let taken = b
            .execute_once_async("d", || async { Ok::<u32, String>(3) })
            .await
            .expect("taken over at once");
        assert_eq!((*taken, taken.record().attempts), (3, 2));
    });
}
