//! Crash loop: a child process runs a mixed workload (threads, overlapping keys, Ok /
//! permanent / retryable / panic, short TTLs, a running sweeper) and is SIGKILLed at random
//! moments; after each kill the store is reopened and checked. One round in four aims its
//! kill at `Store::open` instead: the child announces that it is opening, and the kill follows
//! within the first half of the last measured open (a few ms in a release build, some tens in
//! a debug one), while the engine recovers its log and the store bumps its epoch.
//!
//! The workload logs its side effects durably, outside the store, so the checker counts real
//! executions: `E key value` (fsynced inside the operation, before it returns) and
//! `R key value` (fsynced after `execute_once` returned that outcome). Invariants after every
//! kill:
//! - every outcome `execute_once` returned is still recorded, unchanged;
//! - a key's side effect ran at most once, plus once per kill that interrupted a run of it
//!   (under `Rerun`: a run whose effect was logged and whose outcome was not recorded after the
//!   kill, found Pending or, its claim not durable, absent; under `Report`, exactly at most
//!   once);
//! - the store opens, every record decodes, and every Pending record is an orphan of a dead
//!   process (an earlier epoch).
//!
//! And that the loop tested something: every child died by the SIGKILL (not by a panic or an
//! exit of its own), reached its workload (or, in rounds aimed at open, announced the open),
//! hit no store error but the expected ones and no panic but the planted ones (the child
//! aborts on any other, which the parent sees), most workload rounds returned new outcomes,
//! and some kills aimed at open landed before it returned.
//!
//! `cargo test` runs a short loop; `IDEMSTORE_CRASH_KILLS=2000 cargo test --release --test
//! crash_loop -- --nocapture` runs a soak.

mod common;

use common::{child_failed, env_count, fail_child_on_panics, ChildProcess, XorShift};

use idemstore::{Error, ExecuteError, OrphanPolicy, RecordState, Store};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").expect("stdout");
    out.flush().expect("stdout");
}

/// The policy a loop's name gives (`report...` or `rerun...`).
fn policy_from(s: &str) -> OrphanPolicy {
    if s.starts_with("report") {
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
    let seed: u64 = seed.parse().expect("seed");
    // A loop named `...-async` makes every call through the async API, each thread awaiting
    // its calls on a runtime of its own (so durability points meet across runtimes).
    let asynchronous = policy.ends_with("-async");
    let policy = policy_from(&policy);
    let failures = dir.join(format!("unexpected-{seed}.log"));
    fail_child_on_panics(failures.clone(), Some(CHILD_PANIC));
    say("OPENING");
    let started = Instant::now();
    let store = Store::builder(dir.join("db"))
        .orphan_policy(policy)
        .sweep_interval(Some(Duration::from_millis(40)))
        .open()
        .unwrap_or_else(|e| child_failed(&failures, &format!("the store does not open: {e}")));
    say(&format!("OPENED {}", started.elapsed().as_micros()));
    say("WORKLOAD");
    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (store, dir, failures) = (&store, &dir, &failures);
            scope.spawn(move || {
                let log = |kind: &str| {
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(dir.join(format!("{kind}-{seed}-{t}.log")))
                        .expect("log file")
                };
                let (mut effects, mut returned) = (log("effects"), log("returned"));
                let mut rng = XorShift((seed + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (t + 7));
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
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
                    let mut operation = || match roll {
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
                    };
                    let result =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(
                            || match asynchronous {
                                true => runtime.block_on(call.run_async(|| async { operation() })),
                                false => call.run(operation),
                            },
                        ));
                    let line = match result {
                        Ok(Ok(out)) => Some(format!("R {key} ok:{}\n", *out)),
                        Ok(Err(ExecuteError::Operation { error, .. })) if !error.0.is_empty() => {
                            Some(format!("R {key} declined:{}\n", error.0))
                        }
                        // An empty decline is the retryable error: no effect, nothing recorded.
                        Ok(Err(ExecuteError::Operation { .. })) => None,
                        // An orphan of an earlier round, reported as the policy asks.
                        Ok(Err(ExecuteError::Store(Error::Interrupted { .. })))
                            if policy == OrphanPolicy::Report =>
                        {
                            None
                        }
                        Ok(Err(ExecuteError::Store(e))) => {
                            child_failed(failures, &format!("store error on {key}: {e:?}"))
                        }
                        Err(payload) if payload.downcast_ref::<&str>() == Some(&CHILD_PANIC) => {
                            None
                        }
                        Err(_) => child_failed(failures, &format!("{key}: a store panic")),
                    };
                    if let (Some(line), false) = (line, ttl_key) {
                        append_synced(&mut returned, &line);
                    }
                }
            });
        }
    });
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

/// Fails the loop for a store that does not reopen, naming the known cause when it is that.
fn refused_to_reopen(db: &Path, round: u64, e: Error) -> ! {
    let interrupted: Vec<_> = std::fs::read_dir(db)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("snap.") && name.ends_with(".generating"))
                .collect()
        })
        .unwrap_or_default();
    if interrupted.is_empty() {
        panic!("round {round}: store does not reopen: {e}");
    }
    panic!(
        "round {round}: store does not reopen: {e}. The kill interrupted sled writing a \
         snapshot during open and left {interrupted:?}, which sled 0.34 then reads as \
         corruption: the defect in the README's Reliability section, which the store's open \
         should have repaired"
    );
}

#[derive(Default)]
struct Summary {
    kills: u64,
    /// Rounds whose kill waited for the workload to run.
    workload_rounds: u64,
    /// Of those, rounds in which the child returned at least one outcome.
    productive_rounds: u64,
    /// Rounds whose kill was aimed at `Store::open`.
    aimed_at_open: u64,
    /// Of those, kills that landed before open returned.
    kills_during_open: u64,
    outcomes_checked: u64,
    reruns_after_kill: u64,
    orphans_seen: u64,
}

fn crash_loop(policy: &str, kills: u64) -> Summary {
    let dir = tempfile::tempdir().unwrap();
    let mut orphans: BTreeMap<String, BTreeSet<u128>> = BTreeMap::new();
    // Per key: effects logged by the end of the last round, and rounds whose kill caught a run
    // of the key (its effect logged, no outcome recorded after the kill).
    let mut effects_before: BTreeMap<String, u64> = BTreeMap::new();
    let mut interrupted: BTreeMap<String, u64> = BTreeMap::new();
    let mut summary = Summary::default();
    let mut rng = XorShift(0xC0FF_EE00 + kills);
    // How long the last open that finished took: kills aimed at open land within it.
    let mut open_micros = 5_000u64;
    let mut returned_before = 0;
    for round in 0..kills {
        let seed = round.to_string();
        let mut child = ChildProcess::spawn_test(
            "crash_loop_child",
            &[
                (DIR_VAR, dir.path().as_os_str()),
                (SEED_VAR, seed.as_ref()),
                (POLICY_VAR, policy.as_ref()),
            ],
        )
        .labelled(format!("round {round}"))
        .failure_record(dir.path().join(format!("unexpected-{round}.log")));
        // Every fourth round (never the first, which creates the store) aims at open.
        let aim_at_open = round % 4 == 3;
        if aim_at_open {
            child.wait_for("OPENING");
            std::thread::sleep(Duration::from_micros(rng.next() % (open_micros / 2 + 1)));
            let after_kill = child.kill();
            summary.aimed_at_open += 1;
            if !after_kill.iter().any(|l| l.contains("OPENED")) {
                summary.kills_during_open += 1;
            }
        } else {
            let opened = child.wait_for("OPENED");
            open_micros = opened
                .trim_start_matches("OPENED ")
                .parse()
                .unwrap_or_else(|e| panic!("round {round}: {opened:?}: {e}"));
            child.wait_for("WORKLOAD");
            std::thread::sleep(Duration::from_millis(5 + rng.next() % 120));
            child.kill();
            summary.workload_rounds += 1;
        }
        summary.kills += 1;

        let store = Store::builder(dir.path().join("db"))
            .orphan_policy(OrphanPolicy::Report)
            .sweep_interval(None)
            .open()
            .unwrap_or_else(|e| refused_to_reopen(&dir.path().join("db"), round, e));
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
        let returned_lines = read_log_lines(dir.path(), "returned-");
        if !aim_at_open && returned_lines.len() > returned_before {
            summary.productive_rounds += 1;
        }
        returned_before = returned_lines.len();
        let mut returned: BTreeMap<String, String> = BTreeMap::new();
        for (key, value) in returned_lines {
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
        // Under Rerun a claim makes no durable point of its own (design §6): a killed run may
        // leave an orphan, or the record its claim replaced (nothing, or a retryable failure).
        // Either way the kill interrupted it, and it may run again.
        for (key, count) in &effects {
            let ran_this_round = *count > effects_before.get(key).copied().unwrap_or(0);
            let recorded = store
                .record(key)
                .unwrap_or_else(|e| panic!("round {round}: {e}"))
                .is_some_and(|i| {
                    matches!(
                        i.state,
                        RecordState::Completed | RecordState::FailedPermanent
                    )
                });
            if ran_this_round && !recorded {
                *interrupted.entry(key.clone()).or_default() += 1;
            }
        }
        effects_before = effects.clone();
        summary.reruns_after_kill = 0;
        for (key, count) in &effects {
            let allowed = match policy_from(policy) {
                OrphanPolicy::Report => 1,
                _ => {
                    let orphaned = orphans.get(key).map_or(0, |s| s.len() as u64);
                    1 + orphaned.max(interrupted.get(key).copied().unwrap_or(0))
                }
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

fn report(policy: &str, s: &Summary) {
    eprintln!(
        "crash loop ({policy}): {} kills ({} during the workload, {} of them after new outcomes; \
         {} aimed at open, {} of them before open returned), {} returned-outcome checks, \
         {} orphans seen, {} re-runs after a kill, 0 lost, 0 double executions outside the \
         crash window",
        s.kills,
        s.workload_rounds,
        s.productive_rounds,
        s.aimed_at_open,
        s.kills_during_open,
        s.outcomes_checked,
        s.orphans_seen,
        s.reruns_after_kill
    );
}

/// The loop exercised what it names: the workload returned new outcomes in most (over half)
/// of its rounds, and kills aimed at open did land inside it.
fn assert_it_tested_something(s: &Summary) {
    assert!(
        s.productive_rounds * 2 > s.workload_rounds,
        "the workload returned new outcomes in only {} of {} rounds",
        s.productive_rounds,
        s.workload_rounds
    );
    if s.aimed_at_open > 0 {
        assert!(
            s.kills_during_open > 0,
            "none of {} kills aimed at open landed before it returned",
            s.aimed_at_open
        );
    }
}

#[test]
fn crash_loop_rerun_policy() {
    let s = crash_loop("rerun", env_count("IDEMSTORE_CRASH_KILLS", 16));
    report("rerun", &s);
    assert_it_tested_something(&s);
}

/// The same loop with every call made through the async API: a durability point awaited
/// (its flush run by one caller on the blocking pool, others woken when it ends) holds the same
/// promises as a blocking one.
#[test]
fn crash_loop_rerun_policy_async_calls() {
    let s = crash_loop("rerun-async", env_count("IDEMSTORE_CRASH_KILLS", 10));
    report("rerun-async", &s);
    assert_it_tested_something(&s);
}

#[test]
fn crash_loop_report_policy() {
    let s = crash_loop("report", env_count("IDEMSTORE_CRASH_KILLS", 12));
    report("report", &s);
    assert_eq!(s.reruns_after_kill, 0);
    assert_it_tested_something(&s);
}
