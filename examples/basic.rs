//! The core promise in 30 lines: the first call runs the side effect and records its
//! outcome; every retry with the same key gets that outcome back, and the side effect does
//! not run again, also after a restart.
//!
//! Run: `cargo run --example basic`

use idemstore::Store;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut charges = 0;
    let mut charge = |cents: u64| {
        charges += 1;
        Ok::<_, std::io::Error>(format!("ch_{charges} for {cents}"))
    };

    let store = Store::open(dir.path().join("idem-db"))?;
    let first = store.execute_once("order-7f3a", || charge(4200))?;
    let retry = store.execute_once("order-7f3a", || charge(4200))?;
    assert!(!first.is_replayed() && retry.is_replayed());
    assert_eq!(*first, *retry);
    drop(store);

    // A restart: the outcome is on disk, and the retry still does not charge.
    let store = Store::open(dir.path().join("idem-db"))?;
    let after_restart = store.execute_once("order-7f3a", || charge(4200))?;
    assert_eq!(*after_restart, "ch_1 for 4200");
    assert_eq!(charges, 1, "charged once");
    println!("charged once: {}", *after_restart);
    Ok(())
}
