//! The async API (feature `tokio`): the same calls as futures, for tokio services.
//!
//! Invariants: every method here has the contract of its synchronous twin (same records,
//! same rules, same errors) and never blocks a runtime worker; dropping a call's future is
//! an interruption with the rules of `driver::execute_async` (documented on
//! [`Store::execute_once_async`]).

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::future::Future;

use crate::api::call::Call;
use crate::api::store::Store;
use crate::core::outcome::Outcome;
use crate::core::policy::ErrorPolicy;
use crate::core::replay::replay;
use crate::driver::async_context::AsyncContext;
use crate::driver::execute::{try_replay, QuickLook, ReadAbsent};
use crate::driver::execute_async::execute_async;
use crate::engine::Engine;
use crate::error::ExecuteError;
use crate::format::record::Record;
use crate::stats::CallTimer;

#[allow(private_bounds)]
impl<S: Engine> Store<S> {
    /// As [`execute_once`](Self::execute_once), for an async operation, without blocking the
    /// runtime: waiting for a same-key call awaits it, and durability points that wait on a
    /// disk run on the blocking pool.
    ///
    /// **Cancellation.** Dropping the returned future (a timeout, a client gone) before the
    /// key is claimed leaves nothing behind. Dropping it after the claim and before the
    /// outcome is written interrupts the run: the record stays Pending and is an orphan at
    /// once (no waiting out a TTL or, on PostgreSQL, a lease), so the next call follows the
    /// orphan policy: `Rerun` runs the operation again, `Report` returns
    /// [`Error::Interrupted`](crate::Error::Interrupted). Dropping it while the written
    /// outcome waits for its durability point finishes that wait first (in the drop), so the
    /// outcome is kept and replayed. To let an operation finish whatever the caller does,
    /// spawn the call (`tokio::spawn`) and await its handle.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # async fn charge(cents: u64) -> Result<String, std::io::Error> { Ok(format!("ch_{cents}")) }
    /// let store = idemstore::Store::open(dir.path().join("db"))?;
    /// let receipt = store.execute_once_async("order-7f3a", || charge(4200)).await?;
    /// let again = store.execute_once_async("order-7f3a", || charge(4200)).await?;
    /// assert_eq!(*receipt, *again);
    /// assert!(again.is_replayed());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`execute_once`](Self::execute_once).
    pub async fn execute_once_async<T, E, F, Fut>(
        &self,
        key: impl AsRef<[u8]>,
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call(key.as_ref()).run_async(f).await
    }

    /// As [`execute_steps`](Self::execute_steps), for an async operation whose steps are
    /// async ([`AsyncContext::step`]); cancellation as in
    /// [`execute_once_async`](Self::execute_once_async) (recorded steps replay on the next
    /// attempt).
    ///
    /// # Errors
    /// As [`execute_steps`](Self::execute_steps).
    pub async fn execute_steps_async<T, E, F, Fut>(
        &self,
        key: impl AsRef<[u8]>,
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(AsyncContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.call(key.as_ref()).run_steps_async(f).await
    }
}

#[allow(private_bounds)]
impl<P, S: Engine> Call<'_, '_, P, S> {
    /// As [`run`](Self::run), for an async operation; see [`Store::execute_once_async`].
    ///
    /// # Errors
    /// As [`Store::execute_once`].
    pub async fn run_async<T, E, F, Fut>(self, f: F) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: ErrorPolicy<E>,
    {
        self.run_context_async(|_| f()).await
    }

    /// As [`run_steps`](Self::run_steps), for an async operation; see
    /// [`Store::execute_steps_async`].
    ///
    /// # Errors
    /// As [`Store::execute_steps`].
    pub async fn run_steps_async<T, E, F, Fut>(
        mut self,
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(AsyncContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: ErrorPolicy<E>,
    {
        self.options.with_steps = true;
        self.run_context_async(f).await
    }

    /// A replay that one local read settles is answered before the call's future is built;
    /// otherwise the call runs from that read.
    async fn run_context_async<T, E, F, Fut>(self, f: F) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(AsyncContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: ErrorPolicy<E>,
    {
        match self.quick_look() {
            QuickLook::Answered(answer) => answer,
            QuickLook::Unanswered(read_absent) => self.run_from_async(read_absent, f).await,
        }
    }

    /// What one local read of the call's key settles (see `driver::execute::try_replay`).
    pub(crate) fn quick_look<T, E>(&self) -> QuickLook<Result<Outcome<T>, ExecuteError<E>>>
    where
        T: Serialize + DeserializeOwned,
        P: ErrorPolicy<E>,
    {
        let key = self.key;
        self.quick_look_with(|rec| replay(key, rec, &self.policy))
    }

    /// As [`quick_look`](Self::quick_look), with `answer` making what a recorded outcome
    /// replays as from its record (a caller that reads the payload in place).
    pub(crate) fn quick_look_with<R, E>(
        &self,
        answer: impl FnOnce(&Record<'_>) -> Result<R, ExecuteError<E>>,
    ) -> QuickLook<Result<R, ExecuteError<E>>> {
        let timer = CallTimer::start();
        let look = try_replay(self.store.shared(), self.key, &self.options, answer);
        match &look {
            QuickLook::Answered(Ok(_)) => timer.finish_as(true),
            QuickLook::Answered(Err(ExecuteError::Operation { replayed, .. })) => {
                timer.finish_as(*replayed)
            }
            QuickLook::Answered(Err(ExecuteError::Store(_))) | QuickLook::Unanswered(_) => {}
        }
        look
    }

    /// The whole call; `read_absent` when a read just before it found no record.
    pub(crate) async fn run_from_async<T, E, F, Fut>(
        self,
        read_absent: Option<ReadAbsent>,
        f: F,
    ) -> Result<Outcome<T>, ExecuteError<E>>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(AsyncContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        P: ErrorPolicy<E>,
    {
        // Boxed: the whole call's future is large, and a replay answered before it should not
        // pay for moving it.
        let timer = CallTimer::start();
        let result = Box::pin(execute_async(
            self.store.shared_arc(),
            self.key,
            &self.options,
            self.policy,
            read_absent,
            f,
        ))
        .await;
        timer.finish(&result);
        result
    }
}
