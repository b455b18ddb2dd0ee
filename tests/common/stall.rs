//! A barrier stall of the memory engine held by a test, freed by the test or, if the test
//! never gets to it (its thread blocked on the stalled barrier), by a watchdog after
//! [`STALL_LIMIT`]: the thread then resumes and [`StallWatch::freed_by_watchdog`] says so, a
//! failure instead of a hang.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a stall lasts at most.
pub const STALL_LIMIT: Duration = Duration::from_secs(30);

pub struct StallWatch {
    freed_by_watchdog: Arc<AtomicBool>,
    release: Option<std::sync::mpsc::Sender<()>>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl StallWatch {
    pub fn new(stall: idemstore::BarrierStall) -> Self {
        let freed_by_watchdog = Arc::new(AtomicBool::new(false));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let flag = Arc::clone(&freed_by_watchdog);
        let watchdog = std::thread::spawn(move || {
            if released.recv_timeout(STALL_LIMIT).is_err() {
                flag.store(true, Ordering::SeqCst);
            }
            drop(stall);
        });
        Self {
            freed_by_watchdog,
            release: Some(release),
            watchdog: Some(watchdog),
        }
    }

    /// Whether the watchdog, not the test, freed the stall.
    pub fn freed_by_watchdog(&self) -> bool {
        self.freed_by_watchdog.load(Ordering::SeqCst)
    }

    /// Frees the stalled barriers now.
    pub fn release(&mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
        if let Some(watchdog) = self.watchdog.take() {
            watchdog.join().expect("watchdog");
        }
    }
}

impl Drop for StallWatch {
    fn drop(&mut self) {
        self.release();
    }
}

/// Polls (from a task) until `engine` has a barrier waiting on its stall.
pub async fn until_a_barrier_is_stalled(engine: &idemstore::MemoryEngine) {
    while engine.stalled_barriers() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
