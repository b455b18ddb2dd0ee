//! The PostgreSQL engine's connections are driven by the engine's own runtime, whichever
//! runtime an async call ran on when one was made: a caller's runtime that stops being driven
//! (its thread busy with something else) stalls none of the store's later statements. Needs
//! `IDEMSTORE_TEST_POSTGRES`.

mod common;

use common::pg::{pg_url, PgSchema};
use idemstore::StoreBuilder;
use std::sync::Arc;
use std::time::Duration;

/// Async multi-step operations on a current-thread runtime take pooled connections in the
/// callers' own futures (each step's write), so the pool grows while that runtime drives them.
/// The runtime is then left alive but idle, as one whose thread went on to other work, and
/// calls from plain threads use those connections: every one answers, none waits out the
/// store's I/O timeout for a connection nobody drives.
#[test]
fn connections_made_during_async_calls_keep_working_when_that_runtime_idles() {
    let Some(url) = pg_url() else { return };
    let schema = PgSchema::new(&url);
    let store = Arc::new(
        StoreBuilder::default()
            .sweep_interval(None)
            .open_postgres(
                schema
                    .options()
                    .pool_size(8)
                    .io_timeout(Duration::from_secs(5)),
            )
            .expect("open"),
    );
    let callers = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    callers.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..16u32 {
            let store = Arc::clone(&store);
            set.spawn(async move {
                store
                    .execute_steps_async(format!("async-{i}"), |ctx| async move {
                        let a = ctx
                            .step("a", || async { Ok::<_, std::io::Error>(i) })
                            .await?;
                        ctx.step("b", || async move { Ok::<_, std::io::Error>(a + 1) })
                            .await
                    })
                    .await
                    .map(|out| *out)
            });
        }
        while let Some(done) = set.join_next().await {
            done.expect("a task").expect("an async operation");
        }
    });
    // `callers` lives on, undriven, until the end of the test.
    std::thread::scope(|scope| {
        for t in 0..8u32 {
            let store = &store;
            scope.spawn(move || {
                for i in 0..20u32 {
                    let out = store
                        .execute_steps(format!("sync-{t}-{i}"), |ctx| {
                            let a = ctx.step("a", || Ok::<_, std::io::Error>(i))?;
                            ctx.step("b", || Ok::<_, std::io::Error>(a + t))
                        })
                        .unwrap_or_else(|e| panic!("thread {t}, call {i}: {e}"));
                    assert_eq!(*out, i + t);
                }
            });
        }
    });
    drop(callers);
}
