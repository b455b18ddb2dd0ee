//! Inventory reservation with exactly-once local effects.
//!
//! Stock and reservations live in trees of the store's own database; each reservation and
//! its idempotency record commit in one transaction. 200 threads retry "reserve 1 unit for
//! order N" with overlapping order ids against a stock of 100; a worker process is then
//! killed with SIGKILL mid-stream, and after every restart stock + reserved == 100 and no
//! order holds more than one unit.
//!
//! Run: `cargo run --example inventory`

use idemstore::{ExecuteError, Store, TxResult};
use sled::transaction::{abort, TransactionalTree};
use std::io::{BufRead, BufReader};
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

fn open(dir: &Path) -> Result<(Store, sled::Tree, sled::Tree), Box<dyn std::error::Error>> {
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, dir] = args.as_slice() {
        if flag == "--worker" {
            let (store, stock, held) = open(Path::new(dir))?;
            println!("OPEN");
            std::thread::scope(|s| {
                for t in 0..8u64 {
                    let (store, stock, held) = (&store, &stock, &held);
                    s.spawn(move || {
                        for i in 0.. {
                            let _ = reserve(store, stock, held, 200 + (t * 31 + i * 7) % 90);
                        }
                    });
                }
            });
            return Ok(());
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
    println!("  {ok} calls answered with a reservation (fresh or replayed)");
    println!(
        "  stock left {left} + reserved {reserved} = {} ; most units held by one order: {most}",
        left + reserved
    );
    println!(
        "  executions {} (one per order), replays {}",
        store.stats().executions,
        store.stats().replays
    );

    println!("\n2. A worker process reserves for orders 200..290 and is killed with SIGKILL, three times");
    drop((stock, held)); // trees hold the database open: release them before closing
    store.close()?;
    for round in 1..=3 {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--worker")
            .arg(dir.path())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        for line in BufReader::new(stdout).lines() {
            if line? == "OPEN" {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20 * round));
        child.kill()?;
        child.wait()?;
        let (store, stock, held) = open(dir.path())?;
        let (left, reserved, most) = audit(&stock, &held);
        let records = store
            .records_in_state(idemstore::RecordState::Completed)
            .count();
        println!(
            "  restart {round}: stock {left} + reserved {reserved} = {} ; most per order {most} ; \
             {records} completed reservations on record",
            left + reserved
        );
        drop((stock, held));
        store.close()?;
    }
    Ok(())
}
