//! Helpers shared by the integration tests: real sled databases in temp dirs.
#![allow(dead_code)]

pub mod calls;
pub mod disk;
pub mod http;
pub mod pg;
pub mod stall;

use idemstore::{ManualClock, Store, StoreBuilder};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a test waits for something that should happen at once before it fails with a
/// message instead of hanging. Generous: a loaded 2-core machine is slow, never this slow.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Polls `done` until it holds; panics naming `what` if it does not within [`PATIENCE`].
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "gave up after {PATIENCE:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A long-run switch: the count in environment variable `name`, or `default` when it is
/// unset. A value that is not a positive integer is refused, so a typo never quietly runs the
/// short test, and 0 never makes a test pass having done nothing.
pub fn env_count(name: &str, default: u64) -> u64 {
    let value = match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => return default,
        Err(e) => panic!("{name}: {e}"),
        Ok(value) => value,
    };
    match value.trim().parse::<u64>() {
        Ok(0) => panic!("{name}=0 would run nothing; unset it for the short run"),
        Ok(n) => n,
        Err(e) => {
            panic!("{name}={value:?} is not a positive count ({e}); unset it for the short run")
        }
    }
}

/// A temp dir that holds one store's database directory.
pub struct Scratch {
    pub dir: TempDir,
    pub clock: ManualClock,
}

pub const START_MS: u64 = 1_780_000_000_000;

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
            clock: ManualClock::new(START_MS),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("db")
    }

    /// A builder on this scratch's path and manual clock, with no background sweeper.
    pub fn builder(&self) -> StoreBuilder {
        Store::builder(self.path())
            .clock(self.clock.clone())
            .sweep_interval(None)
    }

    pub fn open(&self) -> Store {
        self.builder().open().expect("open store")
    }

    /// Runs `f` on the raw sled database while no store has it open, and returns once sled
    /// has let go of its lock (its thread pool may hold it a moment after the drop).
    pub fn with_raw_db<R>(&self, f: impl FnOnce(&sled::Db) -> R) -> R {
        let db = sled::open(self.path()).expect("open raw sled");
        let out = f(&db);
        db.flush().expect("flush");
        drop(db);
        let lock = std::fs::File::open(self.path().join("db")).expect("db file");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while lock.try_lock().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "sled never released its lock"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        out
    }

    /// Overwrites the stored bytes of `key`'s record with `bytes`, through sled directly,
    /// while no store has the database open.
    pub fn poke_record(&self, key: &[u8], bytes: &[u8]) {
        self.with_raw_db(|db| {
            let tree = db.open_tree("idemstore/records").expect("records tree");
            tree.insert(key, bytes).expect("insert");
        })
    }

    /// The raw stored bytes of `key`'s record, while no store has the database open.
    pub fn peek_record(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.with_raw_db(|db| {
            let tree = db.open_tree("idemstore/records").expect("records tree");
            tree.get(key).expect("get").map(|v| v.to_vec())
        })
    }

    /// How many step records the database holds, while no store has it open.
    pub fn count_steps(&self) -> usize {
        self.with_raw_db(|db| {
            ["idemstore/steps", "idemstore/life-steps"]
                .iter()
                .map(|t| db.open_tree(t).expect("steps tree").len())
                .sum()
        })
    }
}

/// An error type with no serde support, as many services have.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("declined")]
    Declined,
}

/// A small deterministic generator, one per thread.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// In a child process: records a failure the parent must see in `record` (a file, synced so
/// that a kill that follows cannot lose it), and aborts, so the parent also finds that the
/// child did not die by its SIGKILL.
pub fn child_failed(record: &std::path::Path, what: &str) -> ! {
    use std::io::Write;
    eprintln!("child process failed: {what}");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(record)
    {
        let _ = f.write_all(format!("{what}\n").as_bytes());
        let _ = f.sync_data();
    }
    std::process::abort();
}

/// In a child process: any panic but one whose payload is `planted` goes to [`child_failed`].
pub fn fail_child_on_panics(record: PathBuf, planted: Option<&'static str>) {
    std::panic::set_hook(Box::new(move |info| {
        if planted.is_none() || info.payload().downcast_ref::<&str>() != planted.as_ref() {
            child_failed(&record, &format!("a panic the test did not plant: {info}"));
        }
    }));
}

/// A child process (this test binary running one ignored test) whose stdout lines arrive
/// through a reader thread, so every wait is bounded. SIGKILLed on drop.
pub struct ChildProcess {
    child: std::process::Child,
    lines: crossbeam_channel::Receiver<String>,
    status: Option<ExitStatus>,
    /// Names the child in failure messages (for example the round of a loop).
    label: String,
    /// Where the child records its failures (see [`child_failed`]).
    failure_record: Option<PathBuf>,
}

impl ChildProcess {
    /// Runs the ignored test `test` of this binary in a child process, with `env` set.
    pub fn spawn_test(test: &str, env: &[(&str, &std::ffi::OsStr)]) -> Self {
        let mut command = Command::new(std::env::current_exe().expect("test binary"));
        command
            .args([
                "--ignored",
                "--exact",
                test,
                "--nocapture",
                "--test-threads=1",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let (send, lines) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            status: None,
            label: format!("child {test}"),
            failure_record: None,
        }
    }

    /// The file where the child records its failures through [`child_failed`]: every check
    /// of the child reports what it says first.
    pub fn failure_record(mut self, path: PathBuf) -> Self {
        self.failure_record = Some(path);
        self
    }

    /// Panics with what the child recorded as its failure, if it recorded one.
    fn check_failure_record(&self) {
        if let Some(text) = self
            .failure_record
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
        {
            panic!("{}: the child failed: {}", self.label, text.trim_end());
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to the child.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) takes two integers and touches no memory of this process.
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "{}: could not send signal {signal}", self.label);
    }

    /// Names the child in failure messages.
    pub fn labelled(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }

    /// Reads the child's stdout up to a line holding `marker`; returns that line from the
    /// marker on. Panics if the child exits first, or prints nothing of it within
    /// [`PATIENCE`].
    pub fn wait_for(&mut self, marker: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.lines.recv_deadline(deadline) {
                // libtest may print its own "test name ... " before the first line.
                Ok(line) => {
                    if let Some(at) = line.find(marker) {
                        return line[at..].to_string();
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("wait for child");
                    self.check_failure_record();
                    panic!(
                        "{}: the child exited ({status}) before printing {marker:?}",
                        self.label
                    )
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    panic!(
                        "{}: the child printed no {marker:?} within {PATIENCE:?}",
                        self.label
                    )
                }
            }
        }
    }

    /// Waits (bounded by [`PATIENCE`]) for a child that is meant to end by itself, and
    /// returns how it ended.
    pub fn wait_exit(mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for child") {
                self.status = Some(status);
                self.check_failure_record();
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: the child did not exit within {PATIENCE:?}",
                self.label
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILLs the child and returns the lines it printed that no `wait_for` read. Panics
    /// unless the child died by that signal: a child that exited or aborted on its own
    /// before the kill (a panic at start, a failed check) is a failure, not a kill.
    pub fn kill(mut self) -> Vec<String> {
        // A child that already exited cannot be signalled; its status tells below.
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait for child");
        self.status = Some(status);
        self.check_failure_record();
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{}: the child was not killed by the test: it ended on its own ({status})",
            self.label
        );
        let deadline = Instant::now() + PATIENCE;
        let mut rest = Vec::new();
        loop {
            match self.lines.recv_deadline(deadline) {
                Ok(line) => rest.push(line),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return rest,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    panic!("{}: the killed child's stdout never closed", self.label)
                }
            }
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The store error of a call that must have failed in the store.
pub fn store_error<T: std::fmt::Debug, E: std::fmt::Debug>(
    r: Result<T, idemstore::ExecuteError<E>>,
) -> idemstore::Error {
    match r {
        Err(idemstore::ExecuteError::Store(e)) => e,
        other => panic!("expected a store error, got {other:?}"),
    }
}

/// Runs the ignored test `child` of this test binary under `strace -f -y` tracing `calls`,
/// with `env_var` set to `dir`, and returns the trace. None, after saying so, if strace is
/// not installed; under `CI` that is a failure (`.ci/run` installs it).
pub fn strace_child(
    child: &str,
    calls: &str,
    dir: &std::path::Path,
    env_var: &str,
) -> Option<String> {
    use std::process::Command;
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "strace is missing; .ci/run installs it"
        );
        eprintln!("skipped: strace is not installed");
        return None;
    }
    let trace_file = dir.join("trace");
    let status = Command::new("strace")
        .args(["-f", "-y", "-qq", "-e", &format!("trace={calls}"), "-o"])
        .arg(&trace_file)
        .arg(std::env::current_exe().expect("test binary"))
        .args(["--exact", child, "--ignored", "--nocapture"])
        .env(env_var, dir)
        .status()
        .expect("run strace");
    assert!(
        status.success(),
        "the traced child {child} failed: {status}"
    );
    Some(std::fs::read_to_string(&trace_file).expect("read the trace"))
}
