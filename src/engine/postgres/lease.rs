//! The claims this process holds on a shared database, and the heartbeat that renews their
//! leases while their operations run.
//!
//! Invariants: a claim is in [`Leases`] from its successful claim statement until its holder
//! writes an outcome, releases it, or abandons it; the heartbeat renews exactly those whose
//! record is still the holder's exact Pending record (same digest), using the database's
//! clock, every third of the lease, on a connection of its own (a busy pool never delays
//! it), so a live holder's lease never runs out unless the process stops (killed, paused, cut
//! off from the database) for longer than about two thirds of it. A renewal that takes longer
//! than a beat is given up, cancelled on the server (without holding up the next beat) and its
//! connection replaced. A claim whose record changed (taken over, removed) is dropped from the
//! set at the next beat. A claim younger than a beat is left for the next one (renewed by the
//! time it is two thirds of a lease old). The heartbeat never writes anything else.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

use super::Shared;

/// Held claims: key → digest of the holder's Pending record, and when it was claimed.
type Held = HashMap<Vec<u8>, (Vec<u8>, Instant)>;

/// The claims this process holds.
#[derive(Default)]
pub(crate) struct Leases {
    held: Mutex<Held>,
}

impl Leases {
    pub(crate) fn hold(&self, key: &[u8], digest: Vec<u8>) {
        self.held
            .lock()
            .insert(key.to_vec(), (digest, Instant::now()));
    }

    /// Stops renewing `key`'s claim with `digest` (a newer claim of the key stays).
    pub(crate) fn let_go(&self, key: &[u8], digest: &[u8]) {
        let mut held = self.held.lock();
        if held.get(key).is_some_and(|(d, _)| d == digest) {
            held.remove(key);
        }
    }

    /// Stops renewing every claim.
    pub(crate) fn let_go_all(&self) {
        self.held.lock().clear();
    }

    /// The claims held for at least `age` (younger ones have most of their lease left, and
    /// renewing them would only make their holders' writes wait on the renewal's row locks).
    fn snapshot(&self, age: Duration) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        self.held
            .lock()
            .iter()
            .filter(|(_, (_, since))| since.elapsed() >= age)
            .map(|(k, (d, _))| (k.clone(), d.clone()))
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
        // The connection's cancel token, once it has one: a renewal given up is cancelled on
        // the server too, so its backend ends at once instead of running beside the next
        // beat's (a store keeps one renewal session, not one per late beat).
        let mut cancel: Option<tokio_postgres::CancelToken> = None;
        let beat = async {
            let client = match connection.take() {
                Some(client) if !client.is_closed() => client,
                _ => connect(&config).await?,
            };
            cancel = Some(client.cancel_token());
            beat(&shared, &client, every).await?;
            Ok::<_, crate::error::Error>(client)
        };
        match tokio::time::timeout(every, beat).await {
            Ok(Ok(client)) => connection = Some(client),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not renew idemstore leases; will retry")
            }
            Err(_) => {
                tracing::warn!("renewing idemstore leases took longer than a beat; reconnecting");
                // In a task of its own: a server too slow to answer the renewal may be as slow
                // to take the cancel, and the next beat must not wait for it.
                if let Some(token) = cancel {
                    tokio::spawn(async move {
                        let cancelled = token.cancel_query(tokio_postgres::NoTls);
                        if !matches!(tokio::time::timeout(every, cancelled).await, Ok(Ok(()))) {
                            tracing::debug!("could not cancel a late lease renewal; it ends alone");
                        }
                    });
                }
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

async fn beat(
    shared: &Shared,
    client: &tokio_postgres::Client,
    every: Duration,
) -> Result<(), crate::error::Error> {
    let (keys, digests) = shared.leases.snapshot(every);
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
