//! The loops that run calls around the rules: the plain driver ([`execute`]), steps
//! ([`context`]), the transactional drivers (sled's [`transaction`], PostgreSQL's
//! `pg_transaction`), the sweeper, and what they
//! share (the registry of running calls, waiting budgets, the store's state).

#[cfg(feature = "tokio")]
pub(crate) mod async_context;
pub(crate) mod context;
pub(crate) mod execute;
#[cfg(feature = "tokio")]
pub(crate) mod execute_async;
#[cfg(feature = "postgres")]
pub(crate) mod pg_transaction;
pub(crate) mod registry;
pub(crate) mod resolve;
pub(crate) mod state;
pub(crate) mod step_run;
pub(crate) mod sweeper;
pub(crate) mod transaction;
pub(crate) mod waiting;
