//! Runtimes and call results for the async tests: the same few helpers each file needed.
//!
//! Invariants: every runtime here has its I/O and time drivers enabled; a call result is the
//! value or the error's debug text, so results compare with `assert_eq!`; waiting for a store's
//! sole ownership is bounded (10 s), so a leak shows as a failure, not a hang.

use idemstore::{ExecuteError, Outcome, Store};
use std::sync::Arc;
use std::time::Duration;

/// What a `u64` call returned: its value, or its error's debug text.
pub type CallResult = Result<u64, String>;

/// A multi-thread runtime with `workers` workers.
pub fn multi_thread(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A current-thread runtime.
pub fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A call's result as a [`CallResult`].
pub fn describe<E: std::fmt::Debug>(r: Result<Outcome<u64>, ExecuteError<E>>) -> CallResult {
    r.map(|o| *o).map_err(|e| format!("{e:?}"))
}

/// The store once every task and thread holding it has let it go (bounded).
pub fn sole_owner(mut store: Arc<Store>) -> Store {
    for _ in 0..1000 {
        match Arc::try_unwrap(store) {
            Ok(store) => return store,
            Err(shared) => store = shared,
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the store is still shared after 10 s");
}
