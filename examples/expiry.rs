//! Records expire: after its TTL a key reads as absent and its operation runs again; the
//! sweeper removes expired records. A manual clock stands in for time passing.
//!
//! Run: `cargo run --example expiry`

use idemstore::{ManualClock, Store};
use std::time::Duration;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let clock = ManualClock::new(1_780_000_000_000);
    let store = Store::builder(dir.path().join("idem-db"))
        .default_ttl(Duration::from_secs(3600))
        .clock(clock.clone())
        .open()?;
    let mut runs = 0;
    let mut op = || {
        runs += 1;
        Ok::<_, std::io::Error>(runs)
    };

    assert_eq!(*store.execute_once("k", &mut op)?, 1);
    clock.advance(Duration::from_secs(3599));
    assert_eq!(
        *store.execute_once("k", &mut op)?,
        1,
        "still within its TTL: replayed"
    );

    clock.advance(Duration::from_secs(1));
    assert!(
        store.record("k")?.is_none(),
        "expired: reads as absent at once"
    );
    clock.advance(Duration::from_secs(1));
    let removed = store.sweep_now()?;
    assert_eq!(removed, 1);
    assert_eq!(
        *store.execute_once("k", &mut op)?,
        2,
        "a new life: runs again"
    );
    println!("swept {removed}, ran {runs} times");
    Ok(())
}
