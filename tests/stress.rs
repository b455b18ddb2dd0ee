//! Concurrency stress: many threads, few keys, random outcomes and panics. Asserts, for every
//! key, that its recorded outcome came from exactly one execution and that every caller that
//! got an outcome got that one; that no store error and no panic but the planted ones reached
//! a caller; and that calls did contend (some waited on another call of the same key).

mod common;

use common::{env_count, Scratch, XorShift, PATIENCE};
use idemstore::{ExecuteError, RecordState};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Failure {
    execution: u64,
    permanent: bool,
}

const STRESS_PANIC: &str = "stress operation panicked on purpose";

#[test]
fn recorded_outcomes_come_from_exactly_one_execution_and_everyone_sees_it() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<&str>() != Some(&STRESS_PANIC) {
            default_hook(info);
        }
    }));
    let threads = env_count("IDEMSTORE_STRESS_THREADS", 24);
    let calls_per_thread = env_count("IDEMSTORE_STRESS_CALLS", 150);
    // Keys come in generations of KEYS: threads move to a fresh generation every 10 calls,
    // so keys keep being contended while still unrecorded.
    const KEYS: u64 = 3;
    let generations = calls_per_thread.div_ceil(10);

    let s = Scratch::new();
    let store = s.builder().wait_timeout(PATIENCE).open().unwrap();
    let next_execution = AtomicU64::new(1);
    // Every execution: (key, execution id, what it produced).
    let executions: Mutex<Vec<(u64, u64, &'static str)>> = Mutex::new(Vec::new());
    // Every outcome a caller received: (key, Ok(execution) or Err(failure)).
    let received: Mutex<Vec<(u64, Result<u64, Failure>)>> = Mutex::new(Vec::new());

    std::thread::scope(|scope| {
        for t in 0..threads {
            let (store, next_execution, executions, received) =
                (&store, &next_execution, &executions, &received);
            scope.spawn(move || {
                let mut rng = XorShift(0x9E37_79B9_7F4A_7C15 ^ ((t + 1) * 0x1234_5678));
                for i in 0..calls_per_thread {
                    let key = (i / 10) * KEYS + rng.next() % KEYS;
                    let roll = rng.next() % 100;
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        store
                            .call(&format!("stress-{key}"))
                            .permanent_if(|f: &Failure| f.permanent)
                            .run(|| {
                                let id = next_execution.fetch_add(1, Ordering::SeqCst);
                                let kind = match roll {
                                    0..=59 => "retryable",
                                    60..=74 => "panic",
                                    75..=89 => "ok",
                                    _ => "permanent",
                                };
                                executions.lock().unwrap().push((key, id, kind));
                                std::thread::yield_now();
                                match kind {
                                    "ok" => Ok(id),
                                    "permanent" => Err(Failure {
                                        execution: id,
                                        permanent: true,
                                    }),
                                    "retryable" => Err(Failure {
                                        execution: id,
                                        permanent: false,
                                    }),
                                    _ => std::panic::panic_any(STRESS_PANIC),
                                }
                            })
                    }));
                    match result {
                        Ok(Ok(out)) => received.lock().unwrap().push((key, Ok(*out))),
                        Ok(Err(ExecuteError::Operation { error, .. })) if error.permanent => {
                            received.lock().unwrap().push((key, Err(error)))
                        }
                        Ok(Err(ExecuteError::Operation { .. })) => {}
                        // Only the planted panic is expected: any other is the store's.
                        Err(payload) if payload.downcast_ref::<&str>() == Some(&STRESS_PANIC) => {}
                        Err(payload) => std::panic::resume_unwind(payload),
                        Ok(Err(ExecuteError::Store(e))) => panic!("store error under stress: {e}"),
                    }
                }
            });
        }
    });

    let executions = executions.into_inner().unwrap();
    let received = received.into_inner().unwrap();
    let mut recorded_by: HashMap<u64, u64> = HashMap::new();
    for &(key, id, kind) in &executions {
        if kind == "ok" || kind == "permanent" {
            let previous = recorded_by.insert(key, id);
            assert!(
                previous.is_none(),
                "key {key}: recorded by {previous:?} and again by {id}"
            );
        }
    }
    for &(key, ref got) in &received {
        let id = match got {
            Ok(id) => *id,
            Err(f) => f.execution,
        };
        assert_eq!(
            recorded_by.get(&key),
            Some(&id),
            "key {key}: caller got execution {id}"
        );
    }
    for key in 0..generations * KEYS {
        let info = store.record(format!("stress-{key}")).unwrap();
        match (recorded_by.get(&key), info) {
            (Some(_), Some(info)) => assert!(matches!(
                info.state,
                RecordState::Completed | RecordState::FailedPermanent
            )),
            (None, Some(info)) => assert_eq!(info.state, RecordState::FailedRetryable),
            (None, None) => {}
            (Some(id), None) => panic!("key {key}: outcome of execution {id} missing"),
        }
    }
    let stats = store.stats();
    assert_eq!(stats.executions, executions.len() as u64);
    assert_eq!(
        stats.replays + recorded_by.len() as u64,
        received.len() as u64,
        "every received outcome is the one fresh result or a replay of it"
    );
    eprintln!(
        "stress: {} calls, {} executions, {} outcomes received, {} recorded, {} waits",
        threads * calls_per_thread,
        executions.len(),
        received.len(),
        recorded_by.len(),
        stats.waits
    );
    // The calls did contend: some waited for another call running the same key.
    assert!(stats.waits > 0, "no call ever waited: nothing contended");
}
