//! Crash loop: a child process runs a mixed workload (threads, overlapping keys, Ok /
//! permanent / retryable / panic, short TTLs, a running sweeper) and is SIGKILLed at random
//! moments; after each kill the store is reopened and checked.
//!
//! The workload logs its side effects durably, outside the store, so the checker counts real
//! executions: `E key value` (fsynced inside the operation, before it returns) and
//! `R key value` (fsynced after `execute_once` returned that outcome). Invariants after every
//! kill:
//! - every outcome `execute_once` returned is still recorded, unchanged;
//! - a key's side effect ran at most once, plus once per interrupted run found Pending after a
//!   kill (under `Rerun`; under `Report`, exactly at most once);
//! - the store opens, every record decodes, and every Pending record is an orphan of a dead
//!   process (an earlier epoch).
//!
//! `cargo test` runs a short loop; `IDEMSTORE_CRASH_KILLS=2000 cargo test --release --test
//! crash_loop -- --nocapture` runs a soak.

mod common;

use common::XorShift;

use idemstore::{ExecuteError, OrphanPolicy, RecordState, Store};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const DIR_VAR: &str = "IDEMSTORE_LOOP_DIR";
const SEED_VAR: &str = "IDEMSTORE_LOOP_SEED";
const POLICY_VAR: &str = "IDEMSTORE_LOOP_POLICY";
const CHILD_PANIC: &str = "crash-loop operation panicked on purpose";
const THREADS: u64 = 6;
const KEYS: u64 = 48;
const TTL_KEYS: u64 = 8;

#[derive(Debug, Serialize, Deserialize)]
struct Declined(String);

fn append_synced(file: &mut std::fs::File, line: &str) {
    file.write_all(line.as_bytes()).expect("log write");
    file.sync_data().expect("log sync");
}

fn policy_from(s: &str) -> OrphanPolicy {
    if s == "report" {
        OrphanPolicy::Report
    } else {
        OrphanPolicy::Rerun
    }
}

#[test]
#[ignore = "run as a child process by the crash loop"]
fn crash_loop_child() {
    let (Ok(dir), Ok(seed), Ok(policy)) = (
        std::env::var(DIR_VAR),
        std::env::var(SEED_VAR),
        std::env::var(POLICY_VAR),
    ) else {
        panic!("crash_loop_child runs only under the crash loop");
    };
    let dir = PathBuf::from(dir);
    let seed: u64 = seed.parse().unwrap();
    std::panic::set_hook(Box::new(|info| {
        if info.payload().downcast_ref::<&str>() != Some(&CHILD_PANIC) {
            eprintln!("crash-loop child: {info}");
        }
    }));
    let store = Store::builder(dir.join("db"))
        .orphan_policy(policy_from(&policy))
        .sweep_interval(Some(Duration::from_millis(40)))
        .open()
        .unwrap();
    println!("OPEN");
    std::io::stdout().flush().unwrap();
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let store = &store;
            let dir = &dir;
            scope.spawn(move || {
                let log = |kind: &str| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join(format!("{kind}-{seed}-{t}.log")))
                        .unwrap()
                };
                let (mut effects, mut returned) = (log("effects"), log("returned"));
                let mut rng = XorShift((seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (t + 7));
                for n in 0.. {
                    let ttl_key = rng.next().is_multiple_of(6);
                    let key = if ttl_key {
                        format!("ttl{}", rng.next() % TTL_KEYS)
                    } else {
                        // A new generation of keys every three rounds: orphans of one round meet
                        // the next, and fresh keys keep being claimed.
                        format!("k{}.{}", seed / 3, rng.next() % KEYS)
                    };
                    let roll = rng.next() % 100;
                    let value = format!("{seed}.{t}.{n}");
                    // Some operations linger after their effect, widening the crash window.
                    let linger = Duration::from_millis(rng.next() % 7);
                    let mut call = store
                        .call(&key)
                        .permanent_if(|d: &Declined| !d.0.is_empty());
                    if ttl_key {
                        call = call.ttl(Duration::from_millis(30));
                    }
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        call.run(|| match roll {
                            0..=39 => {
                                append_synced(&mut effects, &format!("E {key} ok:{value}\n"));
                                std::thread::sleep(linger);
                                Ok(value.clone())
                            }
                            40..=54 => {
                                append_synced(&mut effects, &format!("E {key} declined:{value}\n"));
                                std::thread::sleep(linger);
                                Err(Declined(value.clone()))
                            }
                            55..=84 => Err(Declined(String::new())),
                            _ => std::panic::panic_any(CHILD_PANIC),
                        })
                    }));
                    // An empty decline is the retryable error: no effect, nothing recorded.
                    let line = match result {
                        Ok(Ok(out)) => Some(format!("R {key} ok:{}\n", *out)),
                        Ok(Err(ExecuteError::Operation { error, .. })) if !error.0.is_empty() => {
                            Some(format!("R {key} declined:{}\n", error.0))
                        }
                        _ => None,
                    };
                    if let (Some(line), false) = (line, ttl_key) {
                        append_synced(&mut returned, &line);
                    }
                }
            });
        }
    });
}

/// Kills the child on drop, so a failing parent leaves no process behind.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read_log_lines(dir: &Path, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with(prefix) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        // A line the kill tore (no newline yet) never completed: skip it.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        for line in complete.lines() {
            let mut parts = line.split(' ');
            let (_, key, value) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            out.push((key.to_string(), value.to_string()));
        }
    }
    out
}

struct Summary {
    kills: u64,
    outcomes_checked: u64,
    reruns_after_kill: u64,
    orphans_seen: u64,
}

fn crash_loop(policy: &str, kills: u64) -> Summary {
    let dir = tempfile::tempdir().unwrap();
    let mut orphans: BTreeMap<String, BTreeSet<u128>> = BTreeMap::new();
    let mut summary = Summary {
        kills: 0,
        outcomes_checked: 0,
        reruns_after_kill: 0,
        orphans_seen: 0,
    };
    let mut rng = XorShift(0xC0FF_EE00 + kills);
    for round in 0..kills {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "crash_loop_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DIR_VAR, dir.path())
            .env(SEED_VAR, round.to_string())
            .env(POLICY_VAR, policy)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut child = Killed(child);
        // One kill in eight lands during open/recovery; the rest while the workload runs.
        if !rng.next().is_multiple_of(8) {
            let stdout = child.0.stdout.take().unwrap();
            for line in BufReader::new(stdout).lines() {
                if line.unwrap().contains("OPEN") {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(5 + rng.next() % 120));
        }
        drop(child); // SIGKILL
        summary.kills += 1;

        let store = Store::builder(dir.path().join("db"))
            .orphan_policy(OrphanPolicy::Report)
            .sweep_interval(None)
            .open()
            .unwrap_or_else(|e| panic!("round {round}: store does not reopen: {e}"));
        for item in store.records() {
            let (key, info) = item.unwrap_or_else(|e| panic!("round {round}: {e}"));
            if info.state == RecordState::Pending {
                assert!(
                    info.claim.epoch < store.epoch(),
                    "round {round}: live Pending record"
                );
                let key = String::from_utf8(key).unwrap();
                if orphans.entry(key).or_default().insert(info.claim.as_u128()) {
                    summary.orphans_seen += 1;
                }
            }
        }

        // Every returned outcome is recorded, unchanged, and every caller saw the same one.
        let mut returned: BTreeMap<String, String> = BTreeMap::new();
        for (key, value) in read_log_lines(dir.path(), "returned-") {
            if let Some(previous) = returned.insert(key.clone(), value.clone()) {
                assert_eq!(
                    previous, value,
                    "round {round}: {key} returned two outcomes"
                );
            }
        }
        for (key, value) in &returned {
            let replayed = store
                .call(key)
                .permanent_if(|d: &Declined| !d.0.is_empty())
                .run(|| -> Result<String, Declined> {
                    panic!("round {round}: {key} lost its outcome")
                });
            let got = match replayed {
                Ok(out) => format!("ok:{}", *out),
                Err(ExecuteError::Operation {
                    error,
                    replayed: true,
                }) => format!("declined:{}", error.0),
                Err(e) => panic!("round {round}: {key}: {e:?}"),
            };
            assert_eq!(&got, value, "round {round}: {key} changed");
            summary.outcomes_checked += 1;
        }

        // Side effects: once, plus once per interrupted run (Rerun only).
        let mut effects: BTreeMap<String, u64> = BTreeMap::new();
        for (key, _) in read_log_lines(dir.path(), "effects-") {
            if key.starts_with('k') {
                *effects.entry(key).or_default() += 1;
            }
        }
        summary.reruns_after_kill = 0;
        for (key, count) in &effects {
            let allowed = match policy {
                "report" => 1,
                _ => 1 + orphans.get(key).map_or(0, |s| s.len() as u64),
            };
            assert!(
                *count <= allowed,
                "round {round}: {key} ran {count} times, allowed {allowed}"
            );
            summary.reruns_after_kill += count - 1;
        }
        store.close().unwrap();
    }
    summary
}

fn kills(default: u64) -> u64 {
    std::env::var("IDEMSTORE_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(policy: &str, s: &Summary) {
    eprintln!(
        "crash loop ({policy}): {} kills, {} returned-outcome checks, {} orphans seen, \
         {} re-runs after a kill, 0 lost, 0 double executions outside the crash window",
        s.kills, s.outcomes_checked, s.orphans_seen, s.reruns_after_kill
    );
}

#[test]
fn crash_loop_rerun_policy() {
    let s = crash_loop("rerun", kills(16));
    report("rerun", &s);
    assert!(s.outcomes_checked > 0, "the workload made no progress");
}

#[test]
fn crash_loop_report_policy() {
    let s = crash_loop("report", kills(12));
    report("report", &s);
    assert_eq!(s.reruns_after_kill, 0);
    assert!(s.outcomes_checked > 0, "the workload made no progress");
}
