//! Inventory reservation with exactly-once local effects.
//!
//! Stock and reservations live in trees of the store's own database; each reservation and
//! its idempotency record commit in one transaction. 200 threads retry "reserve 1 unit for
//! order N" with overlapping order ids against a stock of 100; a worker process is then
//! killed with SIGKILL mid-stream, and after every restart stock + reserved == 100 and no
//! order holds more than one unit.
//!
//! Every result is checked: a wrong one ends the demo with a message and a non-zero exit
//! (CI runs it).
//!
//! Run: `cargo run --example inventory`

use idemstore::{ExecuteError, Store, TxResult};
use sled::transaction::{abort, TransactionalTree};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const STOCK: u64 = 100;

#[derive(Debug, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("out of stock")]
struct OutOfStock;

fn get_u64(t: &TransactionalTree, k: &[u8]) -> TxResult<u64, OutOfStock> {
    Ok(t.get(k)?
        .and_then(|v| v.as_ref().try_into().ok())
        .map_or(0, u64::from_be_bytes))
}

/// The handler: reserve one unit of the SKU for `order`, exactly once.
fn reserve(
    store: &Store,
    stock: &sled::Tree,
    held: &sled::Tree,
    order: u64,
) -> Result<u64, ExecuteError<OutOfStock>> {
    store
        .call(&format!("reserve:{order}"))
        .permanent_if(|_: &OutOfStock| true)
        .run_in_tx(&[stock, held], |t| {
            let left = get_u64(&t[0], b"sku-1")?;
            if left == 0 {
                return abort(OutOfStock);
            }
            t[0].insert(&b"sku-1"[..], &(left - 1).to_be_bytes())?;
            let n = get_u64(&t[1], &order.to_be_bytes())?;
            t[1].insert(&order.to_be_bytes()[..], &(n + 1).to_be_bytes())?;
            Ok(left - 1)
        })
        .map(|o| o.into_value())
}

fn open(dir: &Path) -> DemoResult<(Store, sled::Tree, sled::Tree)> {
    let store = Store::open(dir.join("idem-db"))?;
    let stock = store.tree("stock")?;
    let held = store.tree("reservations")?;
    if stock.get("sku-1")?.is_none() {
        stock.insert("sku-1", &STOCK.to_be_bytes())?;
    }
    Ok((store, stock, held))
}

/// stock + reserved units, and the largest number of units any one order holds.
fn audit(stock: &sled::Tree, held: &sled::Tree) -> (u64, u64, u64) {
    let left = stock
        .get("sku-1")
        .ok()
        .flatten()
        .and_then(|v| v.as_ref().try_into().ok())
        .map_or(0, u64::from_be_bytes);
    let (mut reserved, mut most) = (0, 0);
    for (_, v) in held.iter().flatten() {
        let n = v.as_ref().try_into().map_or(0, u64::from_be_bytes);
        reserved += n;
        most = most.max(n);
    }
    (left, reserved, most)
}

type DemoResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Fails the demo with `what` unless `ok`: every wrong result ends it with a non-zero exit.
fn check(ok: bool, what: impl std::fmt::Display) -> DemoResult {
    if ok {
        Ok(())
    } else {
        Err(format!("wrong result: {what}").into())
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("inventory demo FAILED: {e}");
        std::process::exit(1);
    }
}

/// The killed worker: reserves for orders 200..290 on 8 threads until it is killed. An answer
/// other than a reservation or out-of-stock aborts it, which the demo sees in its exit status.
fn worker(dir: &Path) -> DemoResult {
    let (store, stock, held) = open(dir)?;
    println!("OPEN");
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let (store, stock, held) = (&store, &stock, &held);
            s.spawn(move || {
                for i in 0.. {
                    let order = 200 + (t * 31 + i * 7) % 90;
                    match reserve(store, stock, held, order) {
                        Ok(_) | Err(ExecuteError::Operation { .. }) => {}
                        Err(e) => {
                            eprintln!("worker: order {order}: {e}");
                            std::process::abort();
                        }
                    }
                }
            });
        }
    });
    Ok(())
}

fn run() -> DemoResult {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, dir] = args.as_slice() {
        if flag == "--worker" {
            return worker(Path::new(dir));
        }
    }

    let dir = tempfile::tempdir()?;
    let (store, stock, held) = open(dir.path())?;
    println!("idemstore inventory demo: stock of {STOCK} units of sku-1");

    println!("\n1. 200 threads retry \"reserve 1 unit for order N\", orders 0..70 (each asked for ~3 times)");
    let outcomes: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200u64)
            .map(|t| {
                let (store, stock, held) = (&store, &stock, &held);
                s.spawn(move || reserve(store, stock, held, t % 70))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let ok = outcomes.iter().filter(|r| r.is_ok()).count();
    let (left, reserved, most) = audit(&stock, &held);
    let stats = store.stats();
    println!("  {ok} calls answered with a reservation (fresh or replayed)");
    println!(
        "  stock left {left} + reserved {reserved} = {} ; most units held by one order: {most}",
        left + reserved
    );
    println!(
        "  executions {} (one per order), replays {}",
        stats.executions, stats.replays
    );
    check(ok == 200, format!("{ok} of 200 calls got a reservation"))?;
    check(
        (left, reserved, most) == (STOCK - 70, 70, 1),
        format!("stock {left}, reserved {reserved}, most per order {most}"),
    )?;
    check(
        (stats.executions, stats.replays) == (70, 130),
        format!(
            "{} executions and {} replays, not 70 and 130",
            stats.executions, stats.replays
        ),
    )?;
    // The callers of one order got one answer: the stock its one reservation left.
    for order in 0..70 {
        let answers: Vec<u64> = outcomes
            .iter()
            .skip(order)
            .step_by(70)
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        check(
            answers.windows(2).all(|w| w[0] == w[1]),
            format!("order {order}: callers got {answers:?}"),
        )?;
    }

    println!("\n2. A worker process reserves for orders 200..290 and is killed with SIGKILL, three times");
    drop((stock, held)); // trees hold the database open: release them before closing
    store.close()?;
    let mut answers_before = 70;
    for round in 1..=3 {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--worker")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut opened = false;
        for line in BufReader::new(stdout).lines() {
            if line? == "OPEN" {
                opened = true;
                break;
            }
        }
        if opened {
            std::thread::sleep(Duration::from_millis(20 * round));
        }
        child.kill()?;
        let status = child.wait()?;
        check(
            opened,
            format!("the worker never opened the store ({status})"),
        )?;
        check(
            status.signal() == Some(9),
            format!("the worker was not killed by SIGKILL: {status}"),
        )?;
        let (store, stock, held) = open(dir.path())?;
        let (left, reserved, most) = audit(&stock, &held);
        let completed = store
            .records_in_state(idemstore::RecordState::Completed)
            .count() as u64;
        let answers = store.records().count() as u64;
        println!(
            "  restart {round}: stock {left} + reserved {reserved} = {} ; most per order {most} ; \
             {completed} completed reservations on record, {} new answers",
            left + reserved,
            answers - answers_before
        );
        check(
            left + reserved == STOCK,
            format!("stock {left} + reserved {reserved} != {STOCK}"),
        )?;
        check(most <= 1, format!("an order holds {most} units"))?;
        check(
            completed == reserved,
            format!("{completed} completed records for {reserved} reserved units"),
        )?;
        answers_before = answers;
        drop((stock, held));
        store.close()?;
    }
    check(
        answers_before > 70,
        "the worker recorded no answer in three runs",
    )?;
    println!("\nevery result as expected");
    Ok(())
}
