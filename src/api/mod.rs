//! The public surface: the store, its builder, and per-call options.

pub(crate) mod admin;
#[cfg(feature = "tokio")]
mod asynchronous;
pub(crate) mod call;
pub(crate) mod config;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "memory-engine")]
mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
pub(crate) mod store;
