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

    /// Overwrites the stored bytes of `key`'s record with `bytes`, through sled directly,
    /// while no store has the database open.
    pub fn poke_record(&self, key: &[u8], bytes: &[u8]) {
        let db = sled::open(self.path()).expect("open raw sled");
        let tree = db.open_tree("idemstore/records").expect("records tree");
        tree.insert(key, bytes).expect("insert");
        db.flush().expect("flush");
    }

    /// The raw stored bytes of `key`'s record, while no store has the database open.
    pub fn peek_record(&self, key: &[u8]) -> Option<Vec<u8>> {
        let db = sled::open(self.path()).expect("open raw sled");
        let tree = db.open_tree("idemstore/records").expect("records tree");
        tree.get(key).expect("get").map(|v| v.to_vec())
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
