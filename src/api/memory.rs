//! Opening a store on the in-memory test engine.

use std::sync::Arc;

use crate::api::config::StoreBuilder;
use crate::api::store::Store;
use crate::core::options::Durability;
use crate::engine::memory::MemoryEngine;
use crate::error::Error;
use crate::stats::Counters;

impl MemoryEngine {
    /// Opens a store on this engine with `builder`'s settings (its path is not used), as a
    /// process start would: the epoch grows, and a crashed engine comes back with what was
    /// durable.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an out-of-range setting.
    pub fn open(&self, builder: StoreBuilder) -> Result<Store<MemoryEngine>, Error> {
        builder.validate_settings()?;
        let (engine, epoch) = self.start(builder.durability == Durability::Immediate);
        Store::start(engine, epoch, Arc::new(Counters::default()), builder, None)
    }
}
