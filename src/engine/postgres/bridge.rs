//! The synchronous face of an asynchronous client: the engine's own small tokio runtime.
//!
//! Invariants: [`Bridge::run`] never panics, wherever it is called from. From a plain thread
//! it drives the future on that thread (`block_on`; the connections' tasks run on the
//! runtime's workers). Inside another tokio runtime, where `block_on` would panic, it drives
//! the future on a scoped helper thread and blocks the caller until it is done: correct, but
//! it holds up that runtime's worker, so async services should use the async API instead.
//! Dropping the bridge never blocks (and so never panics inside a runtime): its runtime shuts
//! down in the background, ending the engine's connections and tasks.

use std::future::Future;

use crate::error::{Error, StorageError, StorageKind};

/// The engine's runtime.
pub(crate) struct Bridge {
    /// Invariant: `Some` until the bridge is dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Bridge {
    /// A runtime with `workers` threads for the connections' I/O.
    pub(crate) fn new(workers: usize) -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("idemstore-postgres")
            .enable_all()
            .build()
            .map_err(|e| Error::Storage(StorageError::of_kind(e, None, StorageKind::Io)))?;
        Ok(Self {
            runtime: Some(runtime),
        })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Invariant: only Drop takes the runtime.
        self.runtime
            .as_ref()
            .expect("the runtime lives as long as the bridge")
    }

    /// Runs `future` to completion and returns its output.
    ///
    /// # Errors
    /// The future's own; [`Error::Storage`] if called inside a runtime and no helper thread
    /// could be started.
    pub(crate) fn run<T, F>(&self, future: F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>> + Send,
        T: Send,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.runtime().block_on(future);
        }
        std::thread::scope(|scope| {
            let helper = std::thread::Builder::new()
                .name("idemstore-postgres-call".into())
                .spawn_scoped(scope, || self.runtime().block_on(future))
                .map_err(|e| Error::Storage(StorageError::of_kind(e, None, StorageKind::Io)))?;
            match helper.join() {
                Ok(output) => output,
                // The future panicked: pass the panic on, as block_on would have.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A handle to the engine's runtime, for spawning from anywhere.
    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        self.runtime().handle().clone()
    }

    /// Spawns a background task on the engine's runtime.
    pub(crate) fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime().spawn(future)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}
