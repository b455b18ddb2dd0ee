//! A plain in-memory reference model of the contract, and a driver that runs one sequence of
//! operations against both the model and a real store, panicking on the first divergence.
//! Shared by `tests/model.rs` (proptest), the `model_ops` fuzz target and the corpus replay
//! test.
//!
//! The model is written from the contract (README's tables and the rules below), not from
//! the library's code:
//!
//! - a call first looks at the key: a live recorded outcome (a value, a permanent error, or
//!   "ran, unstorable") is replayed, a differing fingerprint refused first; otherwise the call
//!   claims the key and runs. A live retryable record continues the key's *life*; anything
//!   else (absent, expired, removed) starts a new life, which has no steps;
//! - a result or permanent error over `max_result_bytes`, or one that does not encode (its
//!   `Serialize` panics, or bincode cannot replay it), is recorded as "ran, unstorable": that
//!   call and every later one gets `ResultTooLarge` / `ResultNotEncodable`, and nothing runs
//!   again while the record lives. In a transaction it aborts instead: nothing applied,
//!   nothing recorded;
//! - a panic in `f` or in a `permanent_if` predicate leaves the record retryable (never an
//!   orphan: the store runs under `OrphanPolicy::Report`, so a false orphan is `Interrupted`);
//! - steps are found by their own index in the run, so a step whose error the operation
//!   ignores leaves no gap; a step recorded in the life returns its value without running;
//!   after a store error in a step no further step runs, and the run fails with that error
//!   whatever the operation returns; a step whose result cannot be stored is recorded as
//!   such and ends the run as above;
//! - `remove` while a call runs ends the life: the run's next step write or its final write
//!   is refused with `OutcomeNotRecorded`, the key stays absent, and the next call starts a
//!   new life. The running call keeps replaying the steps it had already seen (their values
//!   are the removed life's; its own outcome is never recorded). No operation here removes
//!   its key before its first step: whether such a run replays the removed life's steps or
//!   runs them again is left open by the contract (either is safe: nothing of it is recorded);
//! - a transaction's writes to a user tree apply exactly when it commits a value;
//! - fingerprints and derived keys of equal `HashMap`s are equal whatever their order.
#![allow(dead_code)]

use idemstore::{
    derive_key, Codec, Durability, Error, ExecuteError, Fingerprint, ManualClock, OrphanPolicy,
    Outcome, RecordState, StepError, Store,
};
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, panic_any, AssertUnwindSafe};
use std::time::Duration;

pub const KEYS: u8 = 4;
const START_MS: u64 = 1_780_000_000_000;
const DEFAULT_TTL_S: u64 = 100;
/// The store's `max_result_bytes`.
pub const MAX_RESULT: usize = 256 << 10;
/// A padding above sled's blob threshold (128 KiB) whose encoding still fits `MAX_RESULT`.
pub const BIG: usize = 200 << 10;
/// A padding whose encoding is over `MAX_RESULT`.
pub const TOO_BIG: usize = MAX_RESULT + 1;
/// The user tree transactions write their effects to.
const TREE: &str = "model-effects";
/// The panic payload of operations told to panic; the test's panic hook keeps it quiet.
pub const MODEL_PANIC: &str = "model operation panicked on purpose";

/// What the operation of an `Execute` or `Tx` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    Ok(u16),
    /// Ok, with a 200 KiB padding (a sled blob) that must replay intact.
    Big(u16),
    /// Ok, with an internally tagged enum inside: bincode cannot replay it, JSON can.
    Tagged(u16),
    /// Ok, with a padding over `max_result_bytes`.
    TooLarge,
    /// Ok, with a result whose `Serialize` panics.
    Unencodable,
    Permanent(u16),
    /// A permanent error whose `Serialize` panics.
    PermanentUnencodable(u16),
    Retryable(u16),
    Panic,
    /// A retryable error on which the `permanent_if` predicate panics.
    PredicatePanic(u16),
    /// `store.remove(key)` from inside the operation, then Ok. Never in a transaction (its
    /// closure must not call the store): see [`tx_run`].
    RemoveThenOk(u16),
}

/// A request fingerprint: of one byte, or of a `HashMap` (built in a different insertion
/// order on every call; equal ids are equal maps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp {
    Bytes(u8),
    Map(u8),
}

/// What one step of a `Steps` operation does when it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Ok,
    /// Returns an error.
    Fail,
    /// Panics.
    Panic,
    /// Calls `store.remove(key)`, then returns Ok.
    RemoveThenOk,
    /// Returns Ok; then the operation calls `store.remove(key)` before going on.
    RemoveAfter,
    /// Ok with a 200 KiB padding.
    Big,
    /// Ok with a result over `max_result_bytes`.
    TooLarge,
    /// Ok with a result whose `Serialize` panics.
    Unencodable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The step is named `s{name}`.
    pub name: u8,
    pub kind: StepKind,
    /// The operation ignores the step's outcome (`let _ = ctx.step(..)`) and goes on;
    /// otherwise it returns at the step's error (`ctx.step(..)?`).
    pub ignored: bool,
}

/// How a `Steps` operation ends once its steps are done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Returns the sum of its step values.
    Ok,
    /// Returns a retryable error.
    Err,
    Panic,
    /// Calls `store.remove(key)`, then returns the sum.
    RemoveThenOk,
    /// Returns the sum with a padding over `max_result_bytes`.
    TooLarge,
    /// Returns the sum in a value whose `Serialize` panics.
    Unencodable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `store.call(key)[.fingerprint][.ttl][.codec(Json)].permanent_if(..).run(..)`.
    Execute {
        key: u8,
        run: Run,
        fingerprint: Option<Fp>,
        ttl_s: Option<u8>,
        json: bool,
    },
    /// The same options with `run_in_tx` over a user tree: a committed value increments the
    /// key's counter in the tree.
    Tx {
        key: u8,
        run: Run,
        fingerprint: Option<Fp>,
        ttl_s: Option<u8>,
        json: bool,
    },
    Advance {
        secs: u16,
    },
    Sweep,
    Remove {
        key: u8,
    },
    Reopen,
    /// `execute_steps`: the steps in order (step `i` returns `value + i`), then `end`.
    Steps {
        key: u8,
        steps: Vec<Step>,
        end: End,
        value: u16,
    },
}

/// The run of a generated transaction: its operation may not call the store, so
/// `RemoveThenOk` becomes `Ok`.
pub fn tx_run(run: Run) -> Run {
    match run {
        Run::RemoveThenOk(v) => Run::Ok(v),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// Fuzzer bytes.

/// The run of a transaction, from 4 bits.
fn tx_run_from(variant: u8, v: u16) -> Run {
    match variant & 15 {
        0..=5 => Run::Ok(v),
        6 => Run::Big(v),
        7 => Run::Tagged(v),
        8 => Run::TooLarge,
        9 => Run::Unencodable,
        10..=11 => Run::Permanent(v),
        12 => Run::PermanentUnencodable(v),
        13 => Run::Retryable(v),
        14 => Run::Panic,
        _ => Run::PredicatePanic(v),
    }
}

fn end_from(variant: u8) -> End {
    match variant & 15 {
        0..=8 => End::Ok,
        9..=10 => End::Err,
        11 => End::Panic,
        12..=13 => End::RemoveThenOk,
        14 => End::TooLarge,
        _ => End::Unencodable,
    }
}

/// A step from one byte: name (bits 0-1), kind (bits 2-5), ignored (bit 6).
fn step_from(b: u8) -> Step {
    let kind = match (b >> 2) & 15 {
        0..=6 => StepKind::Ok,
        7..=9 => StepKind::Fail,
        10 => StepKind::Panic,
        11 => StepKind::RemoveThenOk,
        12 => StepKind::RemoveAfter,
        13 => StepKind::TooLarge,
        14 => StepKind::Unencodable,
        _ => StepKind::Big,
    };
    Step {
        name: (b & 3) % 3,
        kind,
        ignored: b & 0x40 != 0,
    }
}

/// Reads one operation from the front of `data`; returns it and what is left.
///
/// Every operation is 4 bytes `[op, a, b, c]`, and `Steps` 3 more (one a step). `a`: key
/// (bits 0-1), variant (bits 2-5), JSON codec (bit 6), a `HashMap` fingerprint (bit 7); `b`:
/// value; `c`: fingerprint id (bits 0-1: 2 or 3, else none), a TTL (bit 2) of `c >> 3` s.
/// Operations 0-15 mean what they meant before transactions and the variants existed
/// (variant 0 is the old behaviour), so old corpus entries keep most of their sense.
fn op_from_bytes(data: &[u8]) -> Option<(Op, &[u8])> {
    let (&[op, a, b, c], mut rest) = data.split_first_chunk::<4>()?;
    let key = a % KEYS;
    let variant = (a >> 2) & 15;
    let json = a & 0x40 != 0;
    let fingerprint = match c & 3 {
        0 | 1 => None,
        n if a & 0x80 != 0 => Some(Fp::Map(n)),
        n => Some(Fp::Bytes(n)),
    };
    let ttl_s = (c & 4 != 0).then_some(c >> 3);
    let value = u16::from(b);
    let execute = |run| Op::Execute {
        key,
        run,
        fingerprint,
        ttl_s,
        json,
    };
    let op = match op % 24 {
        0..=3 => execute(match variant {
            0..=11 => Run::Ok(value),
            12 => Run::Big(value),
            13 => Run::Tagged(value),
            14 => Run::TooLarge,
            _ => Run::Unencodable,
        }),
        4..=5 => execute(match variant {
            0..=11 => Run::Permanent(value),
            _ => Run::PermanentUnencodable(value),
        }),
        6..=7 => execute(match variant {
            0..=11 => Run::Retryable(value),
            _ => Run::RemoveThenOk(value),
        }),
        8 => execute(match variant {
            0..=7 => Run::Panic,
            _ => Run::PredicatePanic(value),
        }),
        9..=11 => Op::Advance {
            secs: u16::from_le_bytes([b, c]) % 300,
        },
        12 => Op::Sweep,
        13..=14 => Op::Remove { key },
        15 => Op::Reopen,
        16..=19 => {
            let (steps, tail) = rest.split_first_chunk::<3>()?;
            rest = tail;
            let steps: Vec<Step> = steps[..usize::from(c & 3)]
                .iter()
                .map(|&s| step_from(s))
                .collect();
            Op::Steps {
                key,
                end: end_from(variant),
                steps,
                value,
            }
        }
        _ => Op::Tx {
            key,
            run: tx_run(tx_run_from(variant, value)),
            fingerprint,
            ttl_s,
            json,
        },
    };
    Some((op, rest))
}

/// Reads operations from arbitrary bytes (for fuzzing): the first byte's low bit chooses
/// `Durability::Immediate`; then at most 64 operations (see [`op_from_bytes`]).
pub fn ops_from_bytes(data: &[u8]) -> (bool, Vec<Op>) {
    let immediate = data.first().is_some_and(|b| b & 1 == 1);
    let mut rest = data.get(1..).unwrap_or_default();
    let mut ops = Vec::new();
    while ops.len() < 64 {
        let Some((op, tail)) = op_from_bytes(rest) else {
            break;
        };
        ops.push(op);
        rest = tail;
    }
    (immediate, ops)
}

/// Bytes that [`ops_from_bytes`] reads back as exactly `ops` (for writing seed inputs);
/// panics on an operation the byte format cannot express (a value over 255, say).
pub fn ops_to_bytes(immediate: bool, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![u8::from(immediate)];
    for op in ops {
        let options = |fingerprint: &Option<Fp>, ttl_s: &Option<u8>| {
            let id = match fingerprint {
                Some(Fp::Bytes(n) | Fp::Map(n)) => *n,
                None => 0,
            };
            id | ttl_s.map_or(0, |t| 4 | (t << 3))
        };
        let run_value = |run: &Run| match *run {
            Run::Ok(v)
            | Run::Big(v)
            | Run::Tagged(v)
            | Run::Permanent(v)
            | Run::PermanentUnencodable(v)
            | Run::Retryable(v)
            | Run::PredicatePanic(v)
            | Run::RemoveThenOk(v) => v,
            Run::TooLarge | Run::Unencodable | Run::Panic => 0,
        };
        // The bytes after the first two, and the steps' bytes.
        let (b, c, tail): (u16, u8, Vec<u8>) = match op {
            Op::Execute {
                run,
                fingerprint,
                ttl_s,
                ..
            }
            | Op::Tx {
                run,
                fingerprint,
                ttl_s,
                ..
            } => (run_value(run), options(fingerprint, ttl_s), Vec::new()),
            Op::Advance { secs } => {
                let [lo, hi] = secs.to_le_bytes();
                (u16::from(lo), hi, Vec::new())
            }
            Op::Steps { steps, value, .. } => {
                let mut bytes: Vec<u8> = steps
                    .iter()
                    .map(|s| {
                        (0..=255u8)
                            .find(|&b| step_from(b) == *s)
                            .unwrap_or_else(|| panic!("no byte for {s:?}"))
                    })
                    .collect();
                bytes.resize(3, 0);
                (*value, steps.len() as u8, bytes)
            }
            Op::Sweep | Op::Remove { .. } | Op::Reopen => (0, 0, Vec::new()),
        };
        let b = u8::try_from(b).unwrap_or_else(|_| panic!("a value over 255 in {op:?}"));
        let found = (0..24u8).find_map(|o| {
            (0..=255u8).find_map(|a| {
                let mut chunk = vec![o, a, b, c];
                chunk.extend_from_slice(&tail);
                let (decoded, rest) = op_from_bytes(&chunk)?;
                (decoded == *op && rest.is_empty()).then_some(chunk)
            })
        });
        out.extend(found.unwrap_or_else(|| panic!("no bytes for {op:?}")));
    }
    assert_eq!(
        ops_from_bytes(&out),
        (immediate, ops.to_vec()),
        "round trip"
    );
    out
}

// ---------------------------------------------------------------------------------------
// Deterministic scenarios: one per rule, run by `tests/model.rs` and written as fuzz seeds.

pub fn execute(key: u8, run: Run) -> Op {
    Op::Execute {
        key,
        run,
        fingerprint: None,
        ttl_s: None,
        json: false,
    }
}

pub fn execute_with(key: u8, run: Run, fingerprint: Option<Fp>, json: bool) -> Op {
    Op::Execute {
        key,
        run,
        fingerprint,
        ttl_s: None,
        json,
    }
}

pub fn tx(key: u8, run: Run) -> Op {
    tx_with(key, run, None, false)
}

pub fn tx_with(key: u8, run: Run, fingerprint: Option<Fp>, json: bool) -> Op {
    Op::Tx {
        key,
        run,
        fingerprint,
        ttl_s: None,
        json,
    }
}

/// A `Steps` operation whose steps all propagate their errors (`?`).
pub fn steps(key: u8, plan: &[(u8, StepKind)], end: End, value: u16) -> Op {
    steps_ignoring(key, plan, &[], end, value)
}

/// As [`steps`], with the steps at positions `ignored` ignored by the operation (`let _ =`).
pub fn steps_ignoring(
    key: u8,
    plan: &[(u8, StepKind)],
    ignored: &[usize],
    end: End,
    value: u16,
) -> Op {
    Op::Steps {
        key,
        steps: plan
            .iter()
            .enumerate()
            .map(|(i, &(name, kind))| Step {
                name,
                kind,
                ignored: ignored.contains(&i),
            })
            .collect(),
        end,
        value,
    }
}

/// One short sequence per rule of the model (names are file names for the fuzz corpus).
pub fn scenarios() -> Vec<(&'static str, Vec<Op>)> {
    use Op::{Advance, Remove, Reopen, Sweep};
    use StepKind::*;
    vec![
        (
            "ignored-step-error",
            vec![
                steps_ignoring(0, &[(0, Fail), (1, Ok), (2, Fail)], &[0], End::Ok, 10),
                steps_ignoring(0, &[(0, Fail), (1, Ok), (2, Ok)], &[0], End::Ok, 20),
                steps_ignoring(0, &[(0, Fail), (1, Ok), (2, Ok)], &[0], End::Ok, 30),
                Reopen,
                steps(0, &[(0, Ok), (1, Ok), (2, Ok)], End::Ok, 40),
                steps_ignoring(1, &[(0, Ok), (1, Fail), (2, Ok)], &[1], End::Err, 50),
                steps_ignoring(1, &[(0, Ok), (1, Ok), (2, Ok)], &[0, 1, 2], End::Ok, 60),
            ],
        ),
        (
            "store-error-stops-later-steps",
            vec![
                steps_ignoring(1, &[(0, Ok), (0, Ok), (1, Ok)], &[1], End::Ok, 1),
                steps(1, &[(1, Ok), (2, Ok)], End::Ok, 2),
                steps(1, &[(0, Ok), (1, Ok)], End::Ok, 3),
            ],
        ),
        (
            "remove-mid-run",
            vec![
                steps(0, &[(0, Ok), (1, Fail)], End::Ok, 1),
                steps(0, &[(0, Ok), (1, RemoveThenOk), (2, Ok)], End::Ok, 2),
                steps(0, &[(0, Ok), (1, Fail)], End::Ok, 3),
                steps(
                    0,
                    &[(0, RemoveAfter), (1, Ok), (2, RemoveThenOk)],
                    End::Ok,
                    4,
                ),
                steps(0, &[(0, Ok), (1, Ok)], End::RemoveThenOk, 5),
                steps(0, &[(0, Ok), (1, Ok)], End::Ok, 6),
                execute(0, Run::Ok(7)),
                execute(1, Run::RemoveThenOk(8)),
                execute(1, Run::Ok(9)),
                steps_ignoring(2, &[(0, RemoveThenOk), (1, Ok)], &[0, 1], End::Ok, 10),
                steps(2, &[(0, Ok)], End::Ok, 11),
            ],
        ),
        (
            "unstorable-steps",
            vec![
                steps(2, &[(0, Ok), (1, TooLarge), (2, Ok)], End::Ok, 1),
                steps(2, &[(0, Ok), (1, Ok), (2, Ok)], End::Ok, 2),
                execute(2, Run::Ok(3)),
                Reopen,
                tx(2, Run::Ok(4)),
                steps(3, &[(0, Unencodable)], End::Ok, 5),
                steps(3, &[(0, Ok)], End::Ok, 6),
                steps_ignoring(1, &[(0, Ok), (1, TooLarge), (2, Ok)], &[1], End::Ok, 7),
                steps(1, &[(0, Ok), (1, TooLarge)], End::Ok, 8),
                steps_ignoring(0, &[(0, Unencodable), (1, Ok)], &[0, 1], End::Err, 8),
                steps(0, &[(0, Ok)], End::TooLarge, 9),
                execute(0, Run::Ok(10)),
                Remove { key: 1 },
                steps_ignoring(1, &[(0, Unencodable), (1, Panic)], &[0], End::Ok, 11),
                steps(1, &[(0, Ok)], End::Ok, 12),
            ],
        ),
        (
            "unstorable-results-and-json",
            vec![
                execute(0, Run::TooLarge),
                execute(0, Run::Ok(1)),
                execute(1, Run::Unencodable),
                steps(1, &[], End::Ok, 2),
                execute(2, Run::PermanentUnencodable(3)),
                execute(2, Run::Permanent(4)),
                execute(3, Run::Tagged(5)),
                execute_with(3, Run::Tagged(6), None, true),
                Advance { secs: 101 },
                execute_with(3, Run::Tagged(7), None, true),
                Reopen,
                execute(3, Run::Ok(8)),
                steps(3, &[], End::Ok, 9),
                tx(3, Run::Ok(10)),
            ],
        ),
        (
            "panicking-predicates",
            vec![
                execute(0, Run::PredicatePanic(1)),
                execute(0, Run::PredicatePanic(2)),
                Reopen,
                execute(0, Run::Ok(3)),
                execute(1, Run::Retryable(4)),
                tx(1, Run::Ok(6)),
            ],
        ),
        (
            "transactional-lives",
            vec![
                steps(0, &[(0, Ok), (1, Fail)], End::Ok, 1),
                tx(0, Run::Retryable(2)),
                steps(0, &[(0, Ok), (1, Ok)], End::Err, 3),
                tx(0, Run::Ok(4)),
                steps(0, &[(0, Ok), (1, Ok)], End::Ok, 5),
                Advance { secs: 101 },
                tx(0, Run::Retryable(6)),
                steps(0, &[(0, Ok), (1, Ok)], End::Ok, 7),
                Advance { secs: 101 },
                tx(0, Run::TooLarge),
                tx(0, Run::Unencodable),
                Remove { key: 0 },
                steps(0, &[(0, Ok)], End::Err, 8),
                Advance { secs: 101 },
                tx(0, Run::Tagged(9)),
                Sweep,
                tx(0, Run::Permanent(10)),
                steps(0, &[(0, Ok)], End::Ok, 11),
                tx(0, Run::Ok(12)),
                tx_with(1, Run::Tagged(13), None, true),
                tx(1, Run::Ok(14)),
                tx(2, Run::PermanentUnencodable(15)),
                tx(2, Run::Ok(16)),
            ],
        ),
        (
            "big-results-reopen",
            vec![
                execute(0, Run::Big(1)),
                execute(0, Run::Ok(2)),
                Reopen,
                execute(0, Run::Ok(3)),
                tx(1, Run::Big(4)),
                Reopen,
                steps(1, &[], End::Ok, 5),
                steps(2, &[(0, Big), (1, Fail)], End::Ok, 6),
                Reopen,
                steps(2, &[(0, Big), (1, Ok)], End::Ok, 7),
                Reopen,
                execute(2, Run::Ok(8)),
                execute_with(3, Run::Big(9), None, true),
            ],
        ),
        (
            "hashmap-fingerprints",
            vec![
                execute_with(0, Run::Retryable(1), Some(Fp::Map(2)), false),
                execute_with(0, Run::Ok(2), Some(Fp::Map(2)), false),
                execute_with(0, Run::Ok(3), Some(Fp::Map(2)), false),
                execute_with(0, Run::Ok(4), Some(Fp::Map(3)), false),
                execute_with(0, Run::Ok(5), Some(Fp::Bytes(2)), false),
                tx_with(0, Run::Ok(6), Some(Fp::Map(2)), false),
                tx_with(0, Run::Ok(6), Some(Fp::Map(3)), false),
                tx_with(1, Run::Retryable(7), Some(Fp::Map(3)), false),
                execute_with(1, Run::Ok(8), Some(Fp::Map(2)), false),
                execute_with(1, Run::Ok(9), Some(Fp::Map(3)), false),
            ],
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// Values and errors the operations return.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t")]
enum Tagged {
    A { n: u16 },
}

#[derive(Serialize)]
struct ValOut<'a> {
    v: u16,
    pad: &'a Vec<u8>,
    tagged: Option<Tagged>,
}

#[derive(Deserialize)]
struct ValIn {
    v: u16,
    pad: Vec<u8>,
    tagged: Option<Tagged>,
}

/// The result of every operation and step, so any call can replay any record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Val {
    v: u16,
    pad: Vec<u8>,
    tagged: Option<u16>,
    /// Its `Serialize` panics.
    poison: bool,
}

impl Serialize for Val {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.poison {
            panic_any(MODEL_PANIC);
        }
        ValOut {
            v: self.v,
            pad: &self.pad,
            tagged: self.tagged.map(|n| Tagged::A { n }),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Val {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let ValIn { v, pad, tagged } = ValIn::deserialize(d)?;
        Ok(Val {
            v,
            pad,
            tagged: tagged.map(|Tagged::A { n }| n),
            poison: false,
        })
    }
}

/// What kind of value a run, step or end returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Plain,
    Big,
    Tagged,
    TooLarge,
    Unencodable,
}

fn padding(v: u16, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u16).wrapping_mul(31).wrapping_add(v) as u8)
        .collect()
}

fn make_val(shape: Shape, v: u16) -> Val {
    let pad = match shape {
        Shape::Big => padding(v, BIG),
        Shape::TooLarge => padding(v, TOO_BIG),
        _ => Vec::new(),
    };
    Val {
        v,
        pad,
        tagged: (shape == Shape::Tagged).then_some(v),
        poison: shape == Shape::Unencodable,
    }
}

/// What the test compares of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    v: u16,
    pad: usize,
    pad_intact: bool,
    tagged: Option<u16>,
}

fn digest(val: &Val) -> Digest {
    Digest {
        v: val.v,
        pad: val.pad.len(),
        pad_intact: val.pad == padding(val.v, val.pad.len()),
        tagged: val.tagged,
    }
}

/// What a step value adds to its operation's sum.
fn weight(d: &Digest) -> u16 {
    d.v.wrapping_add(d.pad as u16)
        .wrapping_add(if d.pad_intact { 0 } else { 1000 })
        .wrapping_add(d.tagged.map_or(0, |n| n ^ 0x5555))
}

#[derive(Serialize, Deserialize)]
struct ErrRepr {
    permanent: bool,
    value: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trap {
    None,
    /// The `permanent_if` predicate panics on it.
    Predicate,
    /// Its `Serialize` panics.
    Serialize,
}

#[derive(Debug)]
pub struct ModelError {
    permanent: bool,
    value: u16,
    trap: Trap,
}

impl ModelError {
    fn new(permanent: bool, value: u16) -> Self {
        Self {
            permanent,
            value,
            trap: Trap::None,
        }
    }
}

impl Serialize for ModelError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.trap == Trap::Serialize {
            panic_any(MODEL_PANIC);
        }
        ErrRepr {
            permanent: self.permanent,
            value: self.value,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for ModelError {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let ErrRepr { permanent, value } = ErrRepr::deserialize(d)?;
        Ok(ModelError::new(permanent, value))
    }
}

fn is_permanent(e: &ModelError) -> bool {
    if e.trap == Trap::Predicate {
        panic_any(MODEL_PANIC);
    }
    e.permanent
}

/// The `HashMap` of a fingerprint, its entries inserted in an order that depends on `order`.
fn fingerprint_map(id: u8, order: usize) -> HashMap<String, u64> {
    let mut entries = vec![
        ("amount".to_owned(), 100 * u64::from(id)),
        ("currency".to_owned(), 978),
        ("id".to_owned(), u64::from(id)),
    ];
    entries.extend((0..6).map(|i| (format!("line{i}"), i * 7)));
    let shift = order % entries.len();
    entries.rotate_left(shift);
    if order % 2 == 1 {
        entries.reverse();
    }
    let mut map = HashMap::with_capacity(order % 40);
    map.extend(entries);
    map
}

fn fingerprint(fp: Fp, order: usize) -> Fingerprint {
    match fp {
        Fp::Bytes(b) => Fingerprint::of_bytes([b]),
        Fp::Map(id) => Fingerprint::of(&fingerprint_map(id, order)).expect("fingerprint"),
    }
}

/// The key's name: derived from a `HashMap` built in an order that depends on `order`.
fn key_name(key: u8, order: usize) -> String {
    let mut entries = vec![
        ("tenant".to_owned(), "acme".to_owned()),
        ("kind".to_owned(), "order".to_owned()),
        ("n".to_owned(), key.to_string()),
    ];
    entries.extend((0..5).map(|i| (format!("f{i}"), i.to_string())));
    let shift = order % entries.len();
    entries.rotate_left(shift);
    let mut map = HashMap::with_capacity(order % 30);
    map.extend(entries);
    derive_key("model", &map).expect("derive key")
}

// ---------------------------------------------------------------------------------------
// The model.

/// Why an outcome could not be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unstorable {
    TooLarge,
    NotEncodable,
}

/// Whether a value of `shape` can be stored with the call's codec: one over the limit (a
/// 200 KiB padding is at least 400 KiB as JSON numbers), one whose `Serialize` panics, and one
/// bincode cannot read back cannot.
fn unstorable(shape: Shape, json: bool) -> Option<Unstorable> {
    match shape {
        Shape::TooLarge => Some(Unstorable::TooLarge),
        Shape::Big if json => Some(Unstorable::TooLarge),
        Shape::Unencodable => Some(Unstorable::NotEncodable),
        Shape::Tagged if !json => Some(Unstorable::NotEncodable),
        _ => None,
    }
}

fn step_shape(kind: StepKind) -> Shape {
    match kind {
        StepKind::Big => Shape::Big,
        StepKind::TooLarge => Shape::TooLarge,
        StepKind::Unencodable => Shape::Unencodable,
        _ => Shape::Plain,
    }
}

/// What one call returns, in terms both sides can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Value {
        value: Digest,
        replayed: bool,
    },
    OpError {
        value: u16,
        permanent: bool,
        replayed: bool,
    },
    Mismatch,
    Panicked,
    /// A step sequence change or a duplicate step name.
    StepRefused,
    /// A permanent error is recorded but the call has no decoder for it.
    NoDecoder,
    /// `ResultTooLarge` (against `MAX_RESULT`) / `ResultNotEncodable`.
    Unstorable(Unstorable),
    /// `OutcomeNotRecorded`.
    NotRecorded,
}

/// What the operation's closures did, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A multi-step operation's closure was entered.
    Began,
    /// The operation (0) or step `i` ran.
    Ran(u8),
    /// The operation called `remove`, which returned this.
    Removed(bool),
    /// What step `i` returned to the operation (unless it panicked).
    Gave(u8, Gave),
}

/// What a step returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gave {
    /// A value, as its weight.
    Value(u16),
    /// The step's own error.
    Failed,
    /// A store error.
    Store(Failure),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Completed(Digest),
    Permanent(u16),
    Retryable,
    /// Ran; its value (or permanent error) could not be stored.
    Unstorable {
        why: Unstorable,
        permanent: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct ModelRecord {
    state: State,
    fingerprint: Option<Fp>,
    attempts: u32,
    expires_ms: u64,
    /// Expired, and a call that read it as absent wrote nothing: its bytes may be gone or not
    /// (the contract says an expired record reads as absent, not when its bytes go).
    maybe_gone: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepRec {
    /// The step's value, as its weight.
    Stored(u16),
    Unstorable(Unstorable),
}

/// A claim: the attempt it starts and the fingerprint its record keeps.
struct Claim {
    attempts: u32,
    fingerprint: Option<Fp>,
    ttl_ms: u64,
}

/// Why a multi-step run fails whatever its operation returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// A duplicate name or a changed sequence.
    Refused,
    /// A step ran and its result cannot be stored.
    Unstorable(Unstorable),
    /// The record was removed while the run went on.
    NotRecorded,
}

struct Model {
    now_ms: u64,
    records: BTreeMap<u8, ModelRecord>,
    /// The recorded steps of each key's current life: index -> (name, outcome).
    steps: BTreeMap<u8, BTreeMap<u32, (u8, StepRec)>>,
    /// How many transactions committed for each key.
    tree: BTreeMap<u8, u32>,
}

fn ttl_ms(ttl_s: Option<u8>) -> u64 {
    1000 * ttl_s.map_or(DEFAULT_TTL_S, |t| u64::from(t).max(1))
}

impl Model {
    fn live(&self, key: u8) -> Option<ModelRecord> {
        self.records
            .get(&key)
            .copied()
            .filter(|r| self.now_ms < r.expires_ms)
    }

    /// The first look of every call: a live outcome replays (a differing fingerprint is
    /// refused first); otherwise the key is claimed, continuing a live retryable record's
    /// life or starting a new one.
    fn first_look(
        &mut self,
        key: u8,
        fingerprint: Option<Fp>,
        ttl_s: Option<u8>,
        decoder: bool,
    ) -> Result<Claim, Seen> {
        let ttl_ms = ttl_ms(ttl_s);
        let Some(r) = self.live(key) else {
            self.steps.remove(&key);
            return Ok(Claim {
                attempts: 1,
                fingerprint,
                ttl_ms,
            });
        };
        if let (Some(a), Some(b)) = (fingerprint, r.fingerprint) {
            if a != b {
                return Err(Seen::Mismatch);
            }
        }
        match r.state {
            State::Completed(value) => Err(Seen::Value {
                value,
                replayed: true,
            }),
            State::Permanent(value) if decoder => Err(Seen::OpError {
                value,
                permanent: true,
                replayed: true,
            }),
            State::Permanent(_) => Err(Seen::NoDecoder),
            State::Unstorable { why, .. } => Err(Seen::Unstorable(why)),
            State::Retryable => Ok(Claim {
                attempts: r.attempts + 1,
                fingerprint: fingerprint.or(r.fingerprint),
                ttl_ms,
            }),
        }
    }

    fn write(&mut self, key: u8, claim: &Claim, state: State) {
        self.records.insert(
            key,
            ModelRecord {
                state,
                fingerprint: claim.fingerprint,
                attempts: claim.attempts,
                expires_ms: self.now_ms + claim.ttl_ms,
                maybe_gone: false,
            },
        );
    }

    /// Removes a key's record and its steps; returns whether it had a record.
    fn forget(&mut self, key: u8) -> bool {
        self.steps.remove(&key);
        self.records.remove(&key).is_some()
    }

    /// The state a finished value leaves, and what the call returns.
    fn finish_value(shape: Shape, v: u16, json: bool) -> (State, Seen) {
        match unstorable(shape, json) {
            Some(why) => (
                State::Unstorable {
                    why,
                    permanent: false,
                },
                Seen::Unstorable(why),
            ),
            None => {
                let value = digest(&make_val(shape, v));
                (
                    State::Completed(value),
                    Seen::Value {
                        value,
                        replayed: false,
                    },
                )
            }
        }
    }

    fn execute(
        &mut self,
        key: u8,
        run: Run,
        fingerprint: Option<Fp>,
        ttl_s: Option<u8>,
        json: bool,
    ) -> (Seen, Vec<Event>) {
        let claim = match self.first_look(key, fingerprint, ttl_s, true) {
            Ok(claim) => claim,
            Err(seen) => return (seen, Vec::new()),
        };
        let ran = vec![Event::Ran(0)];
        let (state, seen) = match run {
            Run::RemoveThenOk(_) => {
                // The claim's record is there to remove; the final write finds it gone.
                self.forget(key);
                return (Seen::NotRecorded, vec![Event::Ran(0), Event::Removed(true)]);
            }
            Run::Ok(v) => Self::finish_value(Shape::Plain, v, json),
            Run::Big(v) => Self::finish_value(Shape::Big, v, json),
            Run::Tagged(v) => Self::finish_value(Shape::Tagged, v, json),
            Run::TooLarge => Self::finish_value(Shape::TooLarge, 0, json),
            Run::Unencodable => Self::finish_value(Shape::Unencodable, 0, json),
            Run::Permanent(value) => (
                State::Permanent(value),
                Seen::OpError {
                    value,
                    permanent: true,
                    replayed: false,
                },
            ),
            Run::PermanentUnencodable(_) => (
                State::Unstorable {
                    why: Unstorable::NotEncodable,
                    permanent: true,
                },
                Seen::Unstorable(Unstorable::NotEncodable),
            ),
            Run::Retryable(value) => (
                State::Retryable,
                Seen::OpError {
                    value,
                    permanent: false,
                    replayed: false,
                },
            ),
            Run::Panic | Run::PredicatePanic(_) => (State::Retryable, Seen::Panicked),
        };
        self.write(key, &claim, state);
        (seen, ran)
    }

    fn transact(
        &mut self,
        key: u8,
        run: Run,
        fingerprint: Option<Fp>,
        ttl_s: Option<u8>,
        json: bool,
    ) -> (Seen, Vec<Event>) {
        let claim = match self.first_look(key, fingerprint, ttl_s, true) {
            Ok(claim) => claim,
            Err(seen) => return (seen, Vec::new()),
        };
        let ran = vec![Event::Ran(0)];
        let (state, seen) = match run {
            Run::Ok(v) | Run::RemoveThenOk(v) => self.commit(key, Shape::Plain, v, json),
            Run::Big(v) => self.commit(key, Shape::Big, v, json),
            Run::Tagged(v) => self.commit(key, Shape::Tagged, v, json),
            Run::TooLarge => self.commit(key, Shape::TooLarge, 0, json),
            Run::Unencodable => self.commit(key, Shape::Unencodable, 0, json),
            Run::Permanent(value) => (
                Some(State::Permanent(value)),
                Seen::OpError {
                    value,
                    permanent: true,
                    replayed: false,
                },
            ),
            // As in a plain call: a permanent error that cannot be stored is recorded as
            // such (the operation never runs again), though nothing was applied.
            Run::PermanentUnencodable(_) => (
                Some(State::Unstorable {
                    why: Unstorable::NotEncodable,
                    permanent: true,
                }),
                Seen::Unstorable(Unstorable::NotEncodable),
            ),
            Run::Retryable(value) => (
                Some(State::Retryable),
                Seen::OpError {
                    value,
                    permanent: false,
                    replayed: false,
                },
            ),
            Run::Panic | Run::PredicatePanic(_) => (Some(State::Retryable), Seen::Panicked),
        };
        match state {
            Some(state) => self.write(key, &claim, state),
            None => {
                if let Some(r) = self.records.get_mut(&key) {
                    r.maybe_gone |= self.now_ms >= r.expires_ms;
                }
            }
        }
        (seen, ran)
    }

    /// A transaction that returned a value: it commits (its effect and its record) if the
    /// value can be stored; otherwise it aborts, and nothing is applied or recorded (None).
    fn commit(&mut self, key: u8, shape: Shape, v: u16, json: bool) -> (Option<State>, Seen) {
        if let Some(why) = unstorable(shape, json) {
            return (None, Seen::Unstorable(why));
        }
        *self.tree.entry(key).or_default() += 1;
        let (state, seen) = Self::finish_value(shape, v, json);
        (Some(state), seen)
    }

    /// `remove` from inside a running call: it finds the claim's record, unless an earlier
    /// removal in the same run took it.
    fn remove_in_run(&mut self, key: u8, removed: &mut bool, events: &mut Vec<Event>) {
        events.push(Event::Removed(!*removed));
        *removed = true;
        self.forget(key);
    }

    fn run_steps(&mut self, key: u8, steps: &[Step], end: End, value: u16) -> (Seen, Vec<Event>) {
        let claim = match self.first_look(key, None, None, false) {
            Ok(claim) => claim,
            Err(seen) => return (seen, Vec::new()),
        };
        // What this run sees of its life's steps: a removal while it runs (always after its
        // first step) does not take them back from it; its own outcome is not recorded anyway.
        let seen_steps = self.steps.get(&key).cloned().unwrap_or_default();
        let mut events = vec![Event::Began];
        let mut removed = false;
        let mut failure: Option<Failure> = None;
        let mut names = Vec::new();
        let mut index = 0u32;
        let mut sum = 0u16;
        // Some(error value): the operation returned an error early.
        let mut returned_error = None;
        let mut panicked = false;
        for (i, step) in steps.iter().enumerate() {
            // Ok(weight), Err(None): the step's own error, Err(Some(_)): a store error.
            let out: Result<u16, Option<Failure>> = if let Some(f) = failure {
                Err(Some(f))
            } else if names.contains(&step.name) {
                failure = Some(Failure::Refused);
                Err(failure)
            } else {
                names.push(step.name);
                let at = index;
                index += 1;
                match seen_steps.get(&at) {
                    Some(&(name, _)) if name != step.name => {
                        failure = Some(Failure::Refused);
                        Err(failure)
                    }
                    Some(&(_, StepRec::Unstorable(why))) => {
                        failure = Some(Failure::Unstorable(why));
                        Err(failure)
                    }
                    Some(&(_, StepRec::Stored(w))) => Ok(w),
                    None => {
                        events.push(Event::Ran(i as u8));
                        match step.kind {
                            StepKind::Fail => Err(None),
                            StepKind::Panic => {
                                panicked = true;
                                break;
                            }
                            kind => {
                                if kind == StepKind::RemoveThenOk {
                                    self.remove_in_run(key, &mut removed, &mut events);
                                }
                                let shape = step_shape(kind);
                                let val = make_val(shape, value.wrapping_add(i as u16));
                                if removed {
                                    failure = Some(Failure::NotRecorded);
                                    Err(failure)
                                } else if let Some(why) = unstorable(shape, false) {
                                    self.steps
                                        .entry(key)
                                        .or_default()
                                        .insert(at, (step.name, StepRec::Unstorable(why)));
                                    failure = Some(Failure::Unstorable(why));
                                    Err(failure)
                                } else {
                                    let w = weight(&digest(&val));
                                    self.steps
                                        .entry(key)
                                        .or_default()
                                        .insert(at, (step.name, StepRec::Stored(w)));
                                    Ok(w)
                                }
                            }
                        }
                    }
                }
            };
            events.push(Event::Gave(
                i as u8,
                match out {
                    Ok(w) => Gave::Value(w),
                    Err(None) => Gave::Failed,
                    Err(Some(f)) => Gave::Store(f),
                },
            ));
            match (step.ignored, out) {
                (true, _) => {}
                (false, Ok(w)) => sum = sum.wrapping_add(w),
                (false, Err(None)) => {
                    returned_error = Some(value);
                    break;
                }
                (false, Err(Some(_))) => {
                    returned_error = Some(u16::MAX);
                    break;
                }
            }
            if step.kind == StepKind::RemoveAfter {
                self.remove_in_run(key, &mut removed, &mut events);
            }
        }
        // What the operation returns: Ok(shape) with the sum, or Err(value).
        let returned: Result<Shape, u16> = match returned_error {
            Some(e) => Err(e),
            None if panicked => Ok(Shape::Plain),
            None => match end {
                End::Ok => Ok(Shape::Plain),
                End::Err => Err(value),
                End::Panic => {
                    panicked = true;
                    Ok(Shape::Plain)
                }
                End::RemoveThenOk => {
                    self.remove_in_run(key, &mut removed, &mut events);
                    Ok(Shape::Plain)
                }
                End::TooLarge => Ok(Shape::TooLarge),
                End::Unencodable => Ok(Shape::Unencodable),
            },
        };
        if removed {
            // The life ended under the run: nothing more of it is written.
            let seen = if panicked {
                Seen::Panicked
            } else {
                Seen::NotRecorded
            };
            return (seen, events);
        }
        let (state, seen) = match (failure, panicked, returned) {
            // A step that ran and cannot be stored ends the run, even if the operation then
            // panics: neither the step nor the operation runs again while the record lives.
            (Some(Failure::Unstorable(why)), panicked, _) => (
                State::Unstorable {
                    why,
                    permanent: false,
                },
                if panicked {
                    Seen::Panicked
                } else {
                    Seen::Unstorable(why)
                },
            ),
            (_, true, _) => (State::Retryable, Seen::Panicked),
            (Some(Failure::Refused), _, _) => (State::Retryable, Seen::StepRefused),
            (Some(Failure::NotRecorded), _, _) => unreachable!("only after a removal"),
            (None, _, Err(value)) => (
                State::Retryable,
                Seen::OpError {
                    value,
                    permanent: false,
                    replayed: false,
                },
            ),
            (None, _, Ok(shape)) => Self::finish_value(shape, sum, false),
        };
        self.write(key, &claim, state);
        (seen, events)
    }
}

// ---------------------------------------------------------------------------------------
// The store side.

fn seen(result: std::thread::Result<Result<Outcome<Val>, ExecuteError<ModelError>>>) -> Seen {
    match result {
        Err(_) => Seen::Panicked,
        Ok(Ok(out)) => Seen::Value {
            value: digest(&out),
            replayed: out.is_replayed(),
        },
        Ok(Err(ExecuteError::Operation { error, replayed })) => Seen::OpError {
            value: error.value,
            permanent: error.permanent,
            replayed,
        },
        Ok(Err(ExecuteError::Store(e))) => match e {
            Error::FingerprintMismatch { .. } => Seen::Mismatch,
            Error::StepSequenceChanged { .. } | Error::InvalidStep { .. } => Seen::StepRefused,
            Error::PermanentErrorRecorded { .. } => Seen::NoDecoder,
            Error::ResultTooLarge { size, limit, .. } => {
                assert_eq!(limit, MAX_RESULT as u64, "ResultTooLarge's limit");
                assert!(
                    size > limit,
                    "ResultTooLarge of {size} bytes within {limit}"
                );
                Seen::Unstorable(Unstorable::TooLarge)
            }
            Error::ResultNotEncodable { .. } => Seen::Unstorable(Unstorable::NotEncodable),
            Error::OutcomeNotRecorded { .. } => Seen::NotRecorded,
            e => panic!("unexpected store error: {e}"),
        },
    }
}

fn run_value(run: Run) -> Result<Val, ModelError> {
    let error = |permanent, value, trap| {
        Err(ModelError {
            permanent,
            value,
            trap,
        })
    };
    match run {
        Run::Ok(v) | Run::RemoveThenOk(v) => Ok(make_val(Shape::Plain, v)),
        Run::Big(v) => Ok(make_val(Shape::Big, v)),
        Run::Tagged(v) => Ok(make_val(Shape::Tagged, v)),
        Run::TooLarge => Ok(make_val(Shape::TooLarge, 0)),
        Run::Unencodable => Ok(make_val(Shape::Unencodable, 0)),
        Run::Permanent(v) => error(true, v, Trap::None),
        Run::PermanentUnencodable(v) => error(true, v, Trap::Serialize),
        Run::Retryable(v) => error(false, v, Trap::None),
        Run::PredicatePanic(v) => error(false, v, Trap::Predicate),
        Run::Panic => panic_any(MODEL_PANIC),
    }
}

struct CallSpec<'a> {
    store: &'a Store,
    name: String,
    order: usize,
    fingerprint: Option<Fp>,
    ttl_s: Option<u8>,
    json: bool,
}

impl CallSpec<'_> {
    fn call(&self) -> idemstore::Call<'_, '_> {
        let mut call = self.store.call(&self.name);
        if let Some(f) = self.fingerprint {
            call = call.fingerprint(fingerprint(f, self.order));
        }
        if let Some(t) = self.ttl_s {
            call = call.ttl(Duration::from_secs(u64::from(t).max(1)));
        }
        if self.json {
            call = call.codec(Codec::Json);
        }
        call
    }
}

fn store_execute(spec: &CallSpec<'_>, run: Run) -> (Seen, Vec<Event>) {
    let events = RefCell::new(Vec::new());
    let call = spec.call().permanent_if(is_permanent);
    let result = catch_unwind(AssertUnwindSafe(|| {
        call.run(|| {
            events.borrow_mut().push(Event::Ran(0));
            if let Run::RemoveThenOk(_) = run {
                let removed = spec.store.remove(&spec.name).expect("remove");
                events.borrow_mut().push(Event::Removed(removed));
            }
            run_value(run)
        })
    }));
    (seen(result), events.into_inner())
}

fn store_transact(spec: &CallSpec<'_>, key: u8, run: Run) -> (Seen, Vec<Event>) {
    assert!(
        !matches!(run, Run::RemoveThenOk(_)),
        "a transaction may not call the store"
    );
    let tree = spec.store.tree(TREE).expect("user tree");
    let ran = Cell::new(false);
    let call = spec.call().permanent_if(is_permanent);
    let result = catch_unwind(AssertUnwindSafe(|| {
        call.run_in_tx(&[&tree], |t| {
            ran.set(true);
            let count = t[0].get([key])?.map_or(0, |b| {
                u32::from_be_bytes(b.as_ref().try_into().expect("a 4-byte counter"))
            });
            // Written before any error or unstorable value, to see that an abort discards it.
            t[0].insert(&[key][..], &(count + 1).to_be_bytes()[..])?;
            run_value(run).or_else(sled::transaction::abort)
        })
    }));
    drop(tree);
    let events = if ran.get() {
        vec![Event::Ran(0)]
    } else {
        Vec::new()
    };
    (seen(result), events)
}

fn store_steps(spec: &CallSpec<'_>, steps: &[Step], end: End, value: u16) -> (Seen, Vec<Event>) {
    let events = RefCell::new(Vec::new());
    let remove = || {
        let removed = spec.store.remove(&spec.name).expect("remove");
        events.borrow_mut().push(Event::Removed(removed));
    };
    let result = catch_unwind(AssertUnwindSafe(|| {
        spec.store.execute_steps(&spec.name, |ctx| {
            events.borrow_mut().push(Event::Began);
            let mut sum = 0u16;
            for (i, step) in steps.iter().enumerate() {
                let out = ctx.step(&format!("s{}", step.name), || {
                    events.borrow_mut().push(Event::Ran(i as u8));
                    match step.kind {
                        StepKind::Fail => return Err(ModelError::new(false, value)),
                        StepKind::Panic => panic_any(MODEL_PANIC),
                        StepKind::RemoveThenOk => remove(),
                        _ => {}
                    }
                    Ok(make_val(
                        step_shape(step.kind),
                        value.wrapping_add(i as u16),
                    ))
                });
                let gave = match &out {
                    Ok(v) => Gave::Value(weight(&digest(v))),
                    Err(StepError::Failed(_)) => Gave::Failed,
                    Err(StepError::Store(e)) => Gave::Store(match e {
                        Error::StepSequenceChanged { .. } | Error::InvalidStep { .. } => {
                            Failure::Refused
                        }
                        Error::ResultTooLarge { .. } => Failure::Unstorable(Unstorable::TooLarge),
                        Error::ResultNotEncodable { .. } => {
                            Failure::Unstorable(Unstorable::NotEncodable)
                        }
                        Error::OutcomeNotRecorded { .. } => Failure::NotRecorded,
                        e => panic!("unexpected store error from step {i}: {e}"),
                    }),
                };
                events.borrow_mut().push(Event::Gave(i as u8, gave));
                match (step.ignored, out) {
                    // `let _ = ctx.step(..)`: whatever the step gave, the operation goes on.
                    (true, _) => {}
                    (false, Ok(v)) => sum = sum.wrapping_add(weight(&digest(&v))),
                    (false, Err(StepError::Failed(e))) => return Err(e),
                    (false, Err(StepError::Store(_))) => {
                        return Err(ModelError::new(false, u16::MAX))
                    }
                }
                if step.kind == StepKind::RemoveAfter {
                    remove();
                }
            }
            match end {
                End::Ok => Ok(make_val(Shape::Plain, sum)),
                End::Err => Err(ModelError::new(false, value)),
                End::Panic => panic_any(MODEL_PANIC),
                End::RemoveThenOk => {
                    remove();
                    Ok(make_val(Shape::Plain, sum))
                }
                End::TooLarge => Ok(make_val(Shape::TooLarge, sum)),
                End::Unencodable => Ok(make_val(Shape::Unencodable, sum)),
            }
        })
    }));
    (seen(result), events.into_inner())
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
        .max_result_bytes(MAX_RESULT)
        // No run in the model is ever interrupted: an orphan would be a false one.
        .orphan_policy(OrphanPolicy::Report)
        .open()
        .expect("open store")
}

fn check_records(store: &Store, model: &Model, step: usize, op: &Op) {
    for key in 0..KEYS {
        let name = key_name(key, 0);
        let got = store.record(&name).expect("record decodes");
        let want = model.live(key);
        match (got, want) {
            (None, None) => {}
            (Some(g), Some(w)) => {
                let state = match w.state {
                    State::Completed(_)
                    | State::Unstorable {
                        permanent: false, ..
                    } => RecordState::Completed,
                    State::Permanent(_)
                    | State::Unstorable {
                        permanent: true, ..
                    } => RecordState::FailedPermanent,
                    State::Retryable => RecordState::FailedRetryable,
                };
                assert_eq!(g.state, state, "step {step} {op:?}: state of key {key}");
                assert_eq!(
                    g.attempts, w.attempts,
                    "step {step} {op:?}: attempts of key {key}"
                );
                assert_eq!(
                    g.fingerprint,
                    w.fingerprint.map(|f| fingerprint(f, 0)),
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
        let got_steps: Vec<(u32, String)> = store
            .steps(&name)
            .expect("steps decode")
            .into_iter()
            .map(|s| (s.index, s.name))
            .collect();
        let want_steps: Vec<(u32, String)> = match want {
            Some(_) => model
                .steps
                .get(&key)
                .map(|v| v.iter().map(|(i, (n, _))| (*i, format!("s{n}"))).collect())
                .unwrap_or_default(),
            None => Vec::new(),
        };
        assert_eq!(
            got_steps, want_steps,
            "step {step} {op:?}: steps of key {key}"
        );
    }
    let tree = store.tree(TREE).expect("user tree");
    for key in 0..KEYS {
        let got = tree
            .get([key])
            .expect("tree read")
            .map(|b| u32::from_be_bytes(b.as_ref().try_into().expect("a 4-byte counter")));
        assert_eq!(
            got,
            model.tree.get(&key).copied(),
            "step {step} {op:?}: committed transactions of key {key}"
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
        tree: BTreeMap::new(),
    };
    for (step, op) in ops.iter().enumerate() {
        let s = store.as_ref().expect("store is open between steps");
        // Every call builds its key's and fingerprint's maps in another order.
        let spec = |key, fingerprint, ttl_s, json| CallSpec {
            store: s,
            name: key_name(key, step),
            order: step,
            fingerprint,
            ttl_s,
            json,
        };
        match *op {
            Op::Execute {
                key,
                run,
                fingerprint,
                ttl_s,
                json,
            } => {
                let want = model.execute(key, run, fingerprint, ttl_s, json);
                let got = store_execute(&spec(key, fingerprint, ttl_s, json), run);
                assert_eq!(got, want, "step {step} {op:?}: (result, what ran)");
            }
            Op::Tx {
                key,
                run,
                fingerprint,
                ttl_s,
                json,
            } => {
                // A transaction may not call the store.
                let run = match run {
                    Run::RemoveThenOk(v) => Run::Ok(v),
                    run => run,
                };
                let want = model.transact(key, run, fingerprint, ttl_s, json);
                let got = store_transact(&spec(key, fingerprint, ttl_s, json), key, run);
                assert_eq!(got, want, "step {step} {op:?}: (result, what ran)");
            }
            Op::Steps {
                key,
                ref steps,
                end,
                value,
            } => {
                let want = model.run_steps(key, steps, end, value);
                let got = store_steps(&spec(key, None, None, false), steps, end, value);
                assert_eq!(got, want, "step {step} {op:?}: (result, what ran)");
            }
            Op::Advance { secs } => {
                clock.advance(Duration::from_secs(u64::from(secs)));
                model.now_ms += 1000 * u64::from(secs);
            }
            Op::Sweep => {
                let now = model.now_ms;
                let (mut certain, mut maybe) = (0, 0);
                for r in model.records.values().filter(|r| now >= r.expires_ms) {
                    if r.maybe_gone {
                        maybe += 1;
                    } else {
                        certain += 1;
                    }
                }
                model.records.retain(|_, r| now < r.expires_ms);
                let records = &model.records;
                model.steps.retain(|k, _| records.contains_key(k));
                let swept = s.sweep_now().expect("sweep");
                assert!(
                    (certain..=certain + maybe).contains(&swept),
                    "step {step}: swept {swept}, expected {certain} (+ up to {maybe})"
                );
            }
            Op::Remove { key } => {
                let maybe_gone = model.records.get(&key).is_some_and(|r| r.maybe_gone);
                let existed = model.forget(key);
                let removed = s.remove(key_name(key, step)).expect("remove");
                if !maybe_gone {
                    assert_eq!(removed, existed, "step {step}: remove");
                }
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
