//! Connections made on the engine's runtime, wherever the call that needs one runs.
//!
//! Invariant: every connection of the engine (pooled or a read lane) has its socket made on,
//! and its connection task driven by, the engine's own runtime. A tokio socket belongs to the
//! runtime it was made on, and a connection's statements move only while its task is polled:
//! made inside an async call on the caller's runtime, a connection would stall whenever that
//! runtime is not driven (its thread busy elsewhere), and die with it, taking the sync calls
//! and other callers that later drew it from the pool along.

use std::future::Future;
use std::pin::Pin;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Config, NoTls};

/// Connects with `config` on `runtime`: the client, and the task that drives its connection
/// (it ends when the connection does, or with the runtime).
///
/// # Errors
/// The connect's own error. If the runtime is shutting down the connect never finishes; the
/// caller's own bound (the pool's create timeout, the store's I/O timeout) ends the wait.
pub(crate) async fn connect_on(
    runtime: &Handle,
    config: Config,
) -> Result<(Client, JoinHandle<()>), tokio_postgres::Error> {
    let made = runtime
        .spawn(async move {
            let (client, connection) = config.connect(NoTls).await?;
            let driver = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "idemstore connection closed");
                }
            });
            Ok((client, driver))
        })
        .await;
    match made {
        Ok(made) => made,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // Cancelled: the engine's runtime is shutting down, so the store is closing.
        Err(_) => std::future::pending().await,
    }
}

/// The pool's way to connect: on the engine's runtime (see the module's invariant).
pub(crate) struct OnEngineRuntime(pub Handle);

impl deadpool_postgres::Connect for OnEngineRuntime {
    fn connect(
        &self,
        config: &Config,
    ) -> Pin<
        Box<
            dyn Future<Output = Result<(Client, JoinHandle<()>), tokio_postgres::Error>>
                + Send
                + '_,
        >,
    > {
        Box::pin(connect_on(&self.0, config.clone()))
    }
}
