//! Exactly-once local effects: the operation's writes and its outcome in one transaction.
//! Retries replay, aborts apply nothing, 200 threads on overlapping orders never reserve
//! twice (and the two callers of an order get one answer), and child processes SIGKILLed
//! mid-stream leave stock + reserved == stock, each reservation with its record. That test
//! also checks that it tested something: every child died by the kill, reached its workload
//! with no error or panic, most rounds recorded new answers, and units were reserved.

mod common;

use common::{child_failed, env_count, fail_child_on_panics, ChildProcess, Scratch};
use idemstore::{Error, ExecuteError, RecordState, Store, TxResult};
use serde::{Deserialize, Serialize};
use sled::transaction::{abort, TransactionalTree};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
enum ReserveError {
    #[error("out of stock")]
    OutOfStock,
}

const STOCK: u64 = 100;

fn read_u64(t: &TransactionalTree, k: &[u8]) -> TxResult<u64, ReserveError> {
    Ok(t.get(k)?.map_or(0, |v| {
        u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8]))
    }))
}

/// Reserves one unit for `order`: stock - 1, reservations[order] + 1.
fn reserve(
    store: &Store,
    stock: &sled::Tree,
    reservations: &sled::Tree,
    order: u64,
    runs: &AtomicUsize,
) -> Result<u64, ExecuteError<ReserveError>> {
    store
        .call(&format!("reserve:{order}"))
        .permanent_if(|_: &ReserveError| true)
        .run_in_tx(&[stock, reservations], |t| {
            runs.fetch_add(1, Ordering::SeqCst);
            let left = read_u64(&t[0], b"sku")?;
            if left == 0 {
                return abort(ReserveError::OutOfStock);
            }
            t[0].insert(&b"sku"[..], &(left - 1).to_be_bytes())?;
            let key = order.to_be_bytes();
            let held = read_u64(&t[1], &key)?;
            t[1].insert(&key[..], &(held + 1).to_be_bytes())?;
            Ok(left - 1)
        })
        .map(|o| o.into_value())
}

fn setup(store: &Store) -> (sled::Tree, sled::Tree) {
    let stock = store.tree("stock").unwrap();
    let reservations = store.tree("reservations").unwrap();
    if stock.get("sku").unwrap().is_none() {
        stock.insert("sku", &STOCK.to_be_bytes()).unwrap();
    }
    (stock, reservations)
}

/// stock + reserved == STOCK, and no order holds more than one unit.
fn check_invariant(stock: &sled::Tree, reservations: &sled::Tree) -> (u64, u64) {
    let left = u64::from_be_bytes(
        stock
            .get("sku")
            .unwrap()
            .unwrap()
            .as_ref()
            .try_into()
            .unwrap(),
    );
    let mut reserved = 0;
    for kv in reservations.iter() {
        let (k, v) = kv.unwrap();
        let held = u64::from_be_bytes(v.as_ref().try_into().unwrap());
        assert_eq!(held, 1, "order {k:?} reserved {held} times");
        reserved += held;
    }
    assert_eq!(left + reserved, STOCK, "stock {left} + reserved {reserved}");
    (left, reserved)
}

#[test]
fn the_effect_applies_once_and_retries_replay() {
    let s = Scratch::new();
    let store = s.open();
    let (stock, reservations) = setup(&store);
    let runs = AtomicUsize::new(0);
    assert_eq!(
        reserve(&store, &stock, &reservations, 7, &runs).unwrap(),
        99
    );
    for _ in 0..3 {
        assert_eq!(
            reserve(&store, &stock, &reservations, 7, &runs).unwrap(),
            99
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    check_invariant(&stock, &reservations);
    let info = store.record("reserve:7").unwrap().unwrap();
    assert_eq!((info.state, info.attempts), (RecordState::Completed, 1));
    assert!(matches!(
        store.tree("idemstore/records"),
        Err(Error::ReservedTreeName(_))
    ));
}

#[test]
fn an_aborted_run_applies_nothing_and_its_error_is_recorded() {
    let s = Scratch::new();
    let store = s.open();
    let (stock, reservations) = setup(&store);
    stock.insert("sku", &0u64.to_be_bytes()).unwrap();
    let runs = AtomicUsize::new(0);
    for replayed in [false, true] {
        match reserve(&store, &stock, &reservations, 1, &runs) {
            Err(ExecuteError::Operation {
                error: ReserveError::OutOfStock,
                replayed: r,
            }) => assert_eq!(r, replayed),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(reservations.len(), 0);
    assert_eq!(
        store.record("reserve:1").unwrap().unwrap().state,
        RecordState::FailedPermanent
    );

    // Writes made before an abort are discarded with it.
    let r = store.execute_once_in_tx("k", &[&reservations], |t| {
        t[0].insert(&b"partial"[..], &b"write"[..])?;
        abort::<u8, _>("changed my mind")
    });
    assert!(matches!(
        r,
        Err(ExecuteError::Operation {
            replayed: false,
            ..
        })
    ));
    assert_eq!(reservations.get("partial").unwrap(), None);
    assert_eq!(
        store.record("k").unwrap().unwrap().state,
        RecordState::FailedRetryable
    );
}

#[test]
fn two_hundred_threads_with_overlapping_orders_never_double_apply() {
    let s = Scratch::new();
    let store = s.open();
    let (stock, reservations) = setup(&store);
    let runs = AtomicUsize::new(0);
    let results: Vec<Result<u64, ExecuteError<ReserveError>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..200u64)
            .map(|t| {
                let (store, stock, reservations, runs) = (&store, &stock, &reservations, &runs);
                // 150 distinct orders: 50 of them are retried by a second thread.
                scope.spawn(move || reserve(store, stock, reservations, t % 150, runs))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let (left, reserved) = check_invariant(&stock, &reservations);
    assert_eq!((left, reserved), (0, STOCK));
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let out = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(ExecuteError::Operation {
                    error: ReserveError::OutOfStock,
                    ..
                })
            )
        })
        .count();
    assert_eq!(
        ok + out,
        200,
        "every call got a reservation or out-of-stock"
    );
    // The two callers of each retried order got the same answer: the same stock level left
    // by its one reservation, or both out of stock.
    let answer = |t: usize| match &results[t] {
        Ok(left) => Ok(*left),
        Err(ExecuteError::Operation { error, .. }) => Err(error.clone()),
        Err(e) => panic!("thread {t}: {e:?}"),
    };
    for t in 0..50 {
        assert_eq!(
            answer(t),
            answer(t + 150),
            "order {t}: two callers, two answers"
        );
    }
    // Each order's outcome was recorded once: a reserved order never also ran out of stock.
    let completed = store.records_in_state(RecordState::Completed).count() as u64;
    assert_eq!(completed, reserved);
    // Every run that did not commit (a conflict re-run or an abort) applied nothing, so the
    // invariant holds whatever the number of runs.
    assert!(runs.load(Ordering::SeqCst) >= 150);
}

const DIR_VAR: &str = "IDEMSTORE_INVENTORY_DIR";
const ROUND_VAR: &str = "IDEMSTORE_INVENTORY_ROUND";

/// The orders a child of `round` reserves for: a window of 160 that moves 40 up each round,
/// so every round meets orders of the rounds before it and orders never asked for.
fn order_of(round: u64, thread: u64, i: u64) -> u64 {
    round * 40 + (thread * 7919 + i * 31) % 160
}

#[test]
#[ignore = "run as a child process by the inventory crash test"]
fn inventory_child() {
    let (Ok(dir), Ok(round)) = (std::env::var(DIR_VAR), std::env::var(ROUND_VAR)) else {
        panic!("inventory_child runs only under the inventory crash test");
    };
    let round: u64 = round.parse().expect("round");
    let dir = std::path::PathBuf::from(dir);
    let failures = dir.join(format!("failed-{round}.log"));
    fail_child_on_panics(failures.clone(), None);
    let store = Store::builder(dir.join("db"))
        .sweep_interval(None)
        .open()
        .unwrap_or_else(|e| child_failed(&failures, &format!("the store does not open: {e}")));
    let (stock, reservations) = setup(&store);
    println!("WORKLOAD");
    let runs = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for t in 0..8u64 {
            let (store, stock, reservations, runs, failures) =
                (&store, &stock, &reservations, &runs, &failures);
            scope.spawn(move || {
                for i in 0.. {
                    let order = order_of(round, t, i);
                    match reserve(store, stock, reservations, order, runs) {
                        Ok(_)
                        | Err(ExecuteError::Operation {
                            error: ReserveError::OutOfStock,
                            ..
                        }) => {}
                        Err(e) => child_failed(failures, &format!("order {order}: {e:?}")),
                    }
                }
            });
        }
    });
}

#[test]
fn inventory_survives_sigkill_at_random_points() {
    let s = Scratch::new();
    let kills = env_count("IDEMSTORE_CRASH_KILLS", 8);
    let mut records_before = 0;
    let mut productive_rounds = 0;
    for round in 0..kills {
        let round_arg = round.to_string();
        let mut child = ChildProcess::spawn_test(
            "inventory_child",
            &[
                (DIR_VAR, s.dir.path().as_os_str()),
                (ROUND_VAR, round_arg.as_ref()),
            ],
        )
        .labelled(format!("round {round}"))
        .failure_record(s.dir.path().join(format!("failed-{round}.log")));
        child.wait_for("WORKLOAD");
        std::thread::sleep(Duration::from_millis(5 + (round * 37) % 60));
        child.kill();

        let store = Store::builder(s.dir.path().join("db"))
            .sweep_interval(None)
            .open()
            .unwrap();
        let (stock, reservations) = setup(&store);
        let (_, reserved) = check_invariant(&stock, &reservations);
        let completed = store.records_in_state(RecordState::Completed).count() as u64;
        assert_eq!(
            completed, reserved,
            "round {round}: a reservation without its record, or the reverse"
        );
        assert_eq!(
            store.records_in_state(RecordState::Pending).count(),
            0,
            "no Pending is ever written"
        );
        // Every record is a reservation or an out-of-stock answer.
        let records = store.records().count();
        let out_of_stock = store.records_in_state(RecordState::FailedPermanent).count();
        assert_eq!(records as u64, completed + out_of_stock as u64);
        if records > records_before {
            productive_rounds += 1;
        }
        records_before = records;
    }
    // The children did work: most rounds recorded new answers, and units were reserved.
    let store = Store::builder(s.dir.path().join("db"))
        .sweep_interval(None)
        .open()
        .unwrap();
    let (stock, reservations) = setup(&store);
    let (left, reserved) = check_invariant(&stock, &reservations);
    eprintln!(
        "inventory: {kills} kills, {productive_rounds} of them after new answers; \
         {reserved} units reserved, {left} left, {records_before} answers recorded"
    );
    assert!(reserved > 0, "no unit was ever reserved");
    assert!(
        productive_rounds * 2 > kills,
        "only {productive_rounds} of {kills} rounds recorded new answers"
    );
}
