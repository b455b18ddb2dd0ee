//! The claims this process holds on a shared database, and the heartbeat that renews their
//! leases while their operations run.
//!
//! Invariants: a claim is in [`Leases`] from its successful claim statement until its holder
//! writes an outcome, releases it, or abandons it; the heartbeat renews exactly those whose
//! record is still the holder's exact Pending record (same digest), using the database's
//! clock, every third of the lease, on a connection of its own (a busy pool never delays
//! it), so a live holder's lease never runs out unless the process stops (killed, paused, cut
//! off from the database) for longer than about two thirds of it. A claim whose record changed (taken over, removed) is dropped from the set at
//! the next beat. The heartbeat never writes anything else.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Weak;
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

/// Renews the leases of `shared`'s held claims until the engine is gone, on a connection of
/// its own (never waiting for the pool, which the calls may have exhausted). A beat that the
/// database does not answer within `every` is abandoned with its connection; the next beat
/// reconnects.
pub(crate) async fn heartbeat(
    shared: Weak<Shared>,
    config: tokio_postgres::Config,
    every: Duration,
) {
    let mut connection: Option<tokio_postgres::Client> = None;
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let beat = async {
            let client = match connection.take() {
                Some(client) if !client.is_closed() => client,
                _ => connect(&config).await?,
            };
            beat(&shared, &client).await?;
            Ok::<_, crate::error::Error>(client)
        };
        match tokio::time::timeout(every, beat).await {
            Ok(Ok(client)) => connection = Some(client),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not renew idemstore leases; will retry")
            }
            Err(_) => {
                tracing::warn!("renewing idemstore leases took longer than a beat; reconnecting")
            }
        }
    }
}

async fn connect(
    config: &tokio_postgres::Config,
) -> Result<tokio_postgres::Client, crate::error::Error> {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(super::pg_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "idemstore heartbeat connection closed");
        }
    });
    Ok(client)
}

async fn beat(shared: &Shared, client: &tokio_postgres::Client) -> Result<(), crate::error::Error> {
    let (keys, digests) = shared.leases.snapshot();
    if keys.is_empty() {
        return Ok(());
    }
    let statement = client
        .prepare(&shared.sql.renew)
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
