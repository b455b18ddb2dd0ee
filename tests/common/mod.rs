//! Helpers shared by the integration tests: real sled databases in temp dirs.
#![allow(dead_code)]

use idemstore::{ManualClock, Store, StoreBuilder};
use std::path::PathBuf;
use tempfile::TempDir;

/// A temp dir that holds one store's database directory.
pub struct Scratch {
    pub dir: TempDir,
    pub clock: ManualClock,
}

pub const START_MS: u64 = 1_780_000_000_000;

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            clock: ManualClock::new(START_MS),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    /// A builder on this scratch's path and manual clock, with no background sweeper.
    pub fn builder(&self) -> StoreBuilder {
        Store::builder(self.path())
            .clock(self.clock.clone())
            .sweep_interval(None)
    }

    pub fn open(&self) -> Store {
        self.builder().open().expect("open store")
    }

    /// Runs `f` on the raw sled database while no store has it open, and returns once sled
    /// has let go of its lock (its thread pool may hold it a moment after the drop).
    pub fn with_raw_db<R>(&self, f: impl FnOnce(&sled::Db) -> R) -> R {
        let db = sled::open(self.path()).expect("open raw sled");
        let out = f(&db);
        db.flush().expect("flush");
        drop(db);
        let lock = std::fs::File::open(self.path().join("db")).expect("db file");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lock.try_lock().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "sled never released its lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        out
    }

    /// Overwrites the stored bytes of `key`'s record with `bytes`, through sled directly,
    /// while no store has the database open.
    pub fn poke_record(&self, key: &[u8], bytes: &[u8]) {
        self.with_raw_db(|db| {
            let tree = db.open_tree("idemstore/records").expect("records tree");
            tree.insert(key, bytes).expect("insert");
        })
    }

    /// The raw stored bytes of `key`'s record, while no store has the database open.
    pub fn peek_record(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with_raw_db(|db| {
            let tree = db.open_tree("idemstore/records").expect("records tree");
            tree.get(key).expect("get").map(|v| v.to_vec())
        })
    }

    /// How many step records the database holds, while no store has it open.
    pub fn count_steps(&self) -> usize {
        self.with_raw_db(|db| {
            ["idemstore/steps", "idemstore/life-steps"]
                .iter()
                .map(|t| db.open_tree(t).expect("steps tree").len())
                .sum()
        })
    }
}

/// An error type with no serde support, as many services have.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("declined")]
    Declined,
}

/// A small deterministic generator, one per thread.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
