//! A plain in-memory reference model of the contract table, and a driver that runs one
//! sequence of operations against both the model and a real store, panicking on the first
//! divergence. Shared by `tests/model.rs` (proptest), the `model_ops` fuzz target and the
//! corpus replay test.
#![allow(dead_code)]

use idemstore::{Durability, Error, ExecuteError, Fingerprint, ManualClock, RecordState, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

pub const KEYS: u8 = 4;
const START_MS: u64 = 1_780_000_000_000;
const DEFAULT_TTL_S: u64 = 100;
/// The panic payload of operations told to panic; the test's panic hook keeps it quiet.
pub const MODEL_PANIC: &str = "model operation panicked on purpose";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Ok(u16),
    Permanent(u16),
    Retryable(u16),
    Panic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Execute {
        key: u8,
        run: Run,
        fingerprint: Option<u8>,
        ttl_s: Option<u8>,
    },
    Advance {
        secs: u16,
    },
    Sweep,
    Remove {
        key: u8,
    },
    Reopen,
    /// `execute_once_with`: step `names[0]`, then `names[1]`; the step at `fail_at` returns a
    /// retryable error; the run returns the sum of its step values.
    Steps {
        key: u8,
        names: [u8; 2],
        fail_at: Option<u8>,
        value: u16,
    },
}

/// Reads operations from arbitrary bytes (for fuzzing): 4 bytes an operation.
pub fn ops_from_bytes(data: &[u8]) -> (bool, Vec<Op>) {
    let immediate = data.first().is_some_and(|b| b & 1 == 1);
    let ops = data
        .get(1..)
        .unwrap_or_default()
        .chunks_exact(4)
        .take(64)
        .map(|c| {
            let key = c[1] % KEYS;
            let value = u16::from(c[2]);
            match c[0] % 18 {
                0..=3 => Op::Execute {
                    key,
                    run: Run::Ok(value),
                    fingerprint: fp(c[3]),
                    ttl_s: ttl(c[3]),
                },
                4..=5 => Op::Execute {
                    key,
                    run: Run::Permanent(value),
                    fingerprint: fp(c[3]),
                    ttl_s: ttl(c[3]),
                },
                6..=7 => Op::Execute {
                    key,
                    run: Run::Retryable(value),
                    fingerprint: fp(c[3]),
                    ttl_s: ttl(c[3]),
                },
                8 => Op::Execute {
                    key,
                    run: Run::Panic,
                    fingerprint: fp(c[3]),
                    ttl_s: ttl(c[3]),
                },
                9..=11 => Op::Advance {
                    secs: u16::from_le_bytes([c[2], c[3]]) % 300,
                },
                12 => Op::Sweep,
                13..=14 => Op::Remove { key },
                15 => Op::Reopen,
                _ => Op::Steps {
                    key,
                    names: [c[3] % 3, (c[3] >> 2) % 3],
                    fail_at: match (c[3] >> 4) % 4 {
                        0 => Some(0),
                        1 => Some(1),
                        _ => None,
                    },
                    value,
                },
            }
        })
        .collect();
    (immediate, ops)
}

fn fp(b: u8) -> Option<u8> {
    match b & 3 {
        0 | 1 => None,
        n => Some(n),
    }
}

fn ttl(b: u8) -> Option<u8> {
    (b & 4 != 0).then_some(b >> 3)
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct ModelError {
    permanent: bool,
    value: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Completed(u16),
    Permanent(u16),
    Retryable,
}

#[derive(Debug, Clone, Copy)]
struct ModelRecord {
    state: State,
    fingerprint: Option<u8>,
    attempts: u32,
    expires_ms: u64,
}

/// What one Execute returns, in terms both sides can produce.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Value {
        value: u16,
        replayed: bool,
    },
    OpError {
        value: u16,
        permanent: bool,
        replayed: bool,
    },
    Mismatch,
    Panicked,
    /// The store refused: a step sequence change or a duplicate step name.
    StepRefused,
    /// A permanent error is recorded but the call has no decoder for it.
    NoDecoder,
}

struct Model {
    now_ms: u64,
    records: BTreeMap<u8, ModelRecord>,
    /// Recorded steps (name, value) of each key's current life.
    steps: BTreeMap<u8, Vec<(u8, u16)>>,
}

impl Model {
    fn live(&self, key: u8) -> Option<ModelRecord> {
        self.records
            .get(&key)
            .copied()
            .filter(|r| self.now_ms < r.expires_ms)
    }

    /// Applies an Execute; returns what the call returns and whether the operation ran.
    fn execute(
        &mut self,
        key: u8,
        run: Run,
        fingerprint: Option<u8>,
        ttl_s: Option<u8>,
    ) -> (Seen, bool) {
        let live = self.live(key);
        if let Some(r) = live {
            if let (Some(a), Some(b)) = (fingerprint, r.fingerprint) {
                if a != b {
                    return (Seen::Mismatch, false);
                }
            }
            match r.state {
                State::Completed(value) => {
                    return (
                        Seen::Value {
                            value,
                            replayed: true,
                        },
                        false,
                    )
                }
                State::Permanent(value) => {
                    return (
                        Seen::OpError {
                            value,
                            permanent: true,
                            replayed: true,
                        },
                        false,
                    )
                }
                State::Retryable => {}
            }
        }
        let (attempts, fingerprint) = match live {
            Some(r) => (r.attempts + 1, fingerprint.or(r.fingerprint)),
            None => {
                // A fresh life of the key: earlier steps no longer count.
                self.steps.remove(&key);
                (1, fingerprint)
            }
        };
        let ttl_ms = 1000 * ttl_s.map_or(DEFAULT_TTL_S, |t| u64::from(t).max(1));
        let (state, seen) = match run {
            Run::Ok(value) => (
                State::Completed(value),
                Seen::Value {
                    value,
                    replayed: false,
                },
            ),
            Run::Permanent(value) => (
                State::Permanent(value),
                Seen::OpError {
                    value,
                    permanent: true,
                    replayed: false,
                },
            ),
            Run::Retryable(value) => (
                State::Retryable,
                Seen::OpError {
                    value,
                    permanent: false,
                    replayed: false,
                },
            ),
            Run::Panic => (State::Retryable, Seen::Panicked),
        };
        self.records.insert(
            key,
            ModelRecord {
                state,
                fingerprint,
                attempts,
                expires_ms: self.now_ms + ttl_ms,
            },
        );
        (seen, true)
    }
}

impl Model {
    /// Applies a Steps run; returns what the call returns and which steps ran.
    fn run_steps(
        &mut self,
        key: u8,
        names: [u8; 2],
        fail_at: Option<u8>,
        value: u16,
    ) -> (Seen, Vec<u8>) {
        let live = self.live(key);
        if let Some(r) = live {
            match r.state {
                State::Completed(value) => {
                    return (
                        Seen::Value {
                            value,
                            replayed: true,
                        },
                        Vec::new(),
                    )
                }
                State::Permanent(_) => return (Seen::NoDecoder, Vec::new()),
                State::Retryable => {}
            }
        }
        let (attempts, fingerprint) = match live {
            Some(r) => (r.attempts + 1, r.fingerprint),
            None => {
                self.steps.remove(&key);
                (1, None)
            }
        };
        let recorded = self.steps.entry(key).or_default();
        let (mut ran, mut used, mut sum, mut refused) = (Vec::new(), Vec::new(), 0u16, None);
        for (i, &name) in names.iter().enumerate() {
            if used.contains(&name) {
                refused = Some(Seen::StepRefused);
                break;
            }
            used.push(name);
            if let Some(&(recorded_name, recorded_value)) = recorded.get(i) {
                if recorded_name != name {
                    refused = Some(Seen::StepRefused);
                    break;
                }
                sum = sum.wrapping_add(recorded_value);
                continue;
            }
            ran.push(i as u8);
            if fail_at == Some(i as u8) {
                refused = Some(Seen::OpError {
                    value,
                    permanent: false,
                    replayed: false,
                });
                break;
            }
            let v = value.wrapping_add(i as u16);
            recorded.push((name, v));
            sum = sum.wrapping_add(v);
        }
        let (state, seen) = match refused {
            Some(seen) => (State::Retryable, seen),
            None => (
                State::Completed(sum),
                Seen::Value {
                    value: sum,
                    replayed: false,
                },
            ),
        };
        self.records.insert(
            key,
            ModelRecord {
                state,
                fingerprint,
                attempts,
                expires_ms: self.now_ms + 1000 * DEFAULT_TTL_S,
            },
        );
        (seen, ran)
    }
}

fn store_steps(
    store: &Store,
    key: u8,
    names: [u8; 2],
    fail_at: Option<u8>,
    value: u16,
) -> (Seen, Vec<u8>) {
    let ran = std::cell::RefCell::new(Vec::new());
    let result = store.execute_once_with(key_name(key), |ctx| {
        let mut sum = 0u16;
        for (i, name) in names.iter().enumerate() {
            let v = ctx
                .step(&format!("s{name}"), || {
                    ran.borrow_mut().push(i as u8);
                    if fail_at == Some(i as u8) {
                        Err(ModelError {
                            permanent: false,
                            value,
                        })
                    } else {
                        Ok(value.wrapping_add(i as u16))
                    }
                })
                .map_err(|e| match e {
                    idemstore::StepError::Failed(e) => e,
                    idemstore::StepError::Store(_) => ModelError {
                        permanent: false,
                        value: u16::MAX,
                    },
                })?;
            sum = sum.wrapping_add(v);
        }
        Ok::<_, ModelError>(sum)
    });
    let seen = match result {
        Ok(out) => Seen::Value {
            value: *out,
            replayed: out.is_replayed(),
        },
        Err(ExecuteError::Operation { error, replayed }) => Seen::OpError {
            value: error.value,
            permanent: error.permanent,
            replayed,
        },
        Err(ExecuteError::Store(Error::StepSequenceChanged { .. } | Error::InvalidStep { .. })) => {
            Seen::StepRefused
        }
        Err(ExecuteError::Store(Error::PermanentErrorRecorded { .. })) => Seen::NoDecoder,
        Err(ExecuteError::Store(e)) => panic!("unexpected store error: {e}"),
    };
    (seen, ran.into_inner())
}

fn key_name(key: u8) -> String {
    format!("model-key-{key}")
}

fn open(dir: &std::path::Path, clock: &ManualClock, immediate: bool) -> Store {
    let durability = if immediate {
        Durability::Immediate
    } else {
        Durability::Periodic(Duration::from_secs(3600))
    };
    Store::builder(dir.join("db"))
        .clock(clock.clone())
        .durability(durability)
        .sweep_interval(None)
        .default_ttl(Duration::from_secs(DEFAULT_TTL_S))
        .open()
        .expect("open store")
}

fn store_execute(
    store: &Store,
    key: u8,
    run: Run,
    fingerprint: Option<u8>,
    ttl_s: Option<u8>,
) -> (Seen, bool) {
    let name = key_name(key);
    let mut call = store.call(&name);
    if let Some(f) = fingerprint {
        call = call.fingerprint(Fingerprint::of_bytes([f]));
    }
    if let Some(t) = ttl_s {
        call = call.ttl(Duration::from_secs(u64::from(t).max(1)));
    }
    let mut ran = false;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        call.permanent_if(|e: &ModelError| e.permanent).run(|| {
            ran = true;
            match run {
                Run::Ok(v) => Ok(v),
                Run::Permanent(value) => Err(ModelError {
                    permanent: true,
                    value,
                }),
                Run::Retryable(value) => Err(ModelError {
                    permanent: false,
                    value,
                }),
                Run::Panic => std::panic::panic_any(MODEL_PANIC),
            }
        })
    }));
    let seen = match result {
        Err(_) => Seen::Panicked,
        Ok(Ok(out)) => Seen::Value {
            value: *out,
            replayed: out.is_replayed(),
        },
        Ok(Err(ExecuteError::Operation { error, replayed })) => Seen::OpError {
            value: error.value,
            permanent: error.permanent,
            replayed,
        },
        Ok(Err(ExecuteError::Store(Error::FingerprintMismatch { .. }))) => Seen::Mismatch,
        Ok(Err(ExecuteError::Store(e))) => panic!("unexpected store error: {e}"),
    };
    (seen, ran)
}

fn check_records(store: &Store, model: &Model, step: usize, op: &Op) {
    for key in 0..KEYS {
        let got = store.record(key_name(key)).expect("record decodes");
        let want = model.live(key);
        match (got, want) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                let state = match w.state {
                    State::Completed(_) => RecordState::Completed,
                    State::Permanent(_) => RecordState::FailedPermanent,
                    State::Retryable => RecordState::FailedRetryable,
                };
                assert_eq!(g.state, state, "step {step} {op:?}: state of key {key}");
                assert_eq!(
                    g.attempts, w.attempts,
                    "step {step} {op:?}: attempts of key {key}"
                );
                assert_eq!(
                    g.fingerprint,
                    w.fingerprint.map(|f| Fingerprint::of_bytes([f])),
                    "step {step} {op:?}: fingerprint of key {key}"
                );
                assert_eq!(
                    g.expires_at,
                    std::time::UNIX_EPOCH + Duration::from_millis(w.expires_ms),
                    "step {step} {op:?}: expiry of key {key}"
                );
            }
            (g, w) => panic!("step {step} {op:?}: key {key}: store has {g:?}, model has {w:?}"),
        }
        let got_steps: Vec<String> = store
            .steps(key_name(key))
            .expect("steps decode")
            .into_iter()
            .map(|s| s.name)
            .collect();
        let want_steps: Vec<String> = match model.live(key) {
            Some(_) => model
                .steps
                .get(&key)
                .map(|v| v.iter().map(|(n, _)| format!("s{n}")).collect())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        assert_eq!(
            got_steps, want_steps,
            "step {step} {op:?}: steps of key {key}"
        );
    }
}

/// Runs `ops` against a fresh store and the model; panics at the first divergence.
pub fn run(immediate: bool, ops: &[Op]) {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = ManualClock::new(START_MS);
    let mut store = Some(open(dir.path(), &clock, immediate));
    let mut model = Model {
        now_ms: START_MS,
        records: BTreeMap::new(),
        steps: BTreeMap::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        let s = store.as_ref().expect("store is open between steps");
        match *op {
            Op::Execute {
                key,
                run,
                fingerprint,
                ttl_s,
            } => {
                let want = model.execute(key, run, fingerprint, ttl_s);
                let got = store_execute(s, key, run, fingerprint, ttl_s);
                assert_eq!(got, want, "step {step} {op:?}: (result, ran)");
            }
            Op::Advance { secs } => {
                clock.advance(Duration::from_secs(u64::from(secs)));
                model.now_ms += 1000 * u64::from(secs);
            }
            Op::Sweep => {
                let now = model.now_ms;
                let before = model.records.len();
                model.records.retain(|_, r| now < r.expires_ms);
                let records = &model.records;
                model.steps.retain(|k, _| records.contains_key(k));
                let expected = (before - model.records.len()) as u64;
                assert_eq!(
                    s.sweep_now().expect("sweep"),
                    expected,
                    "step {step}: swept"
                );
            }
            Op::Remove { key } => {
                let existed = model.records.remove(&key).is_some();
                model.steps.remove(&key);
                assert_eq!(
                    s.remove(key_name(key)).expect("remove"),
                    existed,
                    "step {step}: remove"
                );
            }
            Op::Steps {
                key,
                names,
                fail_at,
                value,
            } => {
                let want = model.run_steps(key, names, fail_at, value);
                let got = store_steps(s, key, names, fail_at, value);
                assert_eq!(got, want, "step {step} {op:?}: (result, steps that ran)");
            }
            Op::Reopen => {
                drop(store.take());
                store = Some(open(dir.path(), &clock, immediate));
            }
        }
        check_records(store.as_ref().expect("open"), &model, step, op);
    }
}

/// Installs a panic hook that keeps the model's deliberate panics quiet and reports the rest.
pub fn quiet_model_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&MODEL_PANIC) {
                default(info);
            }
        }));
    });
}
