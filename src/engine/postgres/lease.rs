//! The claims this process holds on a shared database, and the heartbeat that renews their
//! leases while their operations run.
//!
//! Invariants: a claim is in [`Leases`] from its successful claim statement until its holder
//! writes an outcome, releases it, or abandons it; the heartbeat renews exactly those whose
//! record is still the holder's exact Pending record (same digest), using the database's
//! clock, every third of the lease, so a live holder's lease never runs out unless the
//! process stops (killed, paused, cut off from the database) for longer than about two
//! thirds of it. A claim whose record changed (taken over, removed) is dropped from the set at
//! the next beat. The heartbeat never writes anything else.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::Shared;

/// Held claims: key → digest of the holder's Pending record.
#[derive(Default)]
pub(crate) struct Leases {
    held: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
}

impl Leases {
    pub(crate) fn hold(&self, key: &[u8], digest: Vec<u8>) {
        self.held.lock().insert(key.to_vec(), digest);
    }

    /// Stops renewing `key`'s claim with `digest` (a newer claim of the key stays).
    pub(crate) fn let_go(&self, key: &[u8], digest: &[u8]) {
        let mut held = self.held.lock();
        if held.get(key).is_some_and(|d| d == digest) {
            held.remove(key);
        }
    }

    /// Stops renewing every claim.
    pub(crate) fn let_go_all(&self) {
        self.held.lock().clear();
    }

    fn snapshot(&self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        self.held
            .lock()
            .iter()
            .map(|(k, d)| (k.clone(), d.clone()))
            .unzip()
    }
}

/// Renews the leases of `shared`'s held claims until the engine is gone.
pub(crate) async fn heartbeat(shared: Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(e) = beat(&shared).await {
            tracing::warn!(error = %e, "could not renew idemstore leases; will retry");
        }
    }
}

async fn beat(shared: &Arc<Shared>) -> Result<(), crate::error::Error> {
    let (keys, digests) = shared.leases.snapshot();
    if keys.is_empty() {
        return Ok(());
    }
    let client = shared.client().await?;
    let statement = client
        .prepare_cached(&shared.sql.renew)
        .await
        .map_err(super::pg_error)?;
    let lease_ms = shared.lease.as_millis() as f64;
    let rows = client
        .query(&statement, &[&shared.scope, &lease_ms, &keys, &digests])
        .await
        .map_err(super::pg_error)?;
    if rows.len() < keys.len() {
        let renewed: std::collections::HashSet<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
        for (key, digest) in keys.iter().zip(&digests) {
            if !renewed.contains(key) {
                shared.leases.let_go(key, digest);
            }
        }
    }
    Ok(())
}
