//! The rules of one run's steps, with no I/O: numbering, names, what a recorded step replays
//! as, what a finished step's record is, and how a failed write fails the run. The sync
//! [`Context`](crate::Context) and the async [`AsyncContext`](crate::AsyncContext) do the reads
//! and writes around these.
//!
//! Invariants (the contract of steps, design §4):
//! - steps are numbered in the order a run asks for them, and a recorded step is found by its
//!   own index (never by its position among the recorded ones), so a step whose error the
//!   operation ignored leaves no gap that shifts later steps;
//! - a later attempt of the same life gets step `i`'s recorded outcome back only if it asks
//!   for step `i` by the same name; otherwise the run fails with `StepSequenceChanged`;
//! - a step that ran but whose result cannot be stored is recorded as such, so it never runs
//!   again, and the run ends with that error (recorded, so the operation does not run again);
//! - a step write refused by fencing fails the run; any other failed write leaves the step's
//!   record in doubt, and the run keeps its claim (an orphan);
//! - after a store error in any step, no further step runs: each returns that error, and the
//!   run fails with it whatever the operation returns.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashSet;

use crate::core::settle::RunFailure;
use crate::driver::context::StepError;
use crate::error::Error;
use crate::format::codec::{self, Codec};
use crate::format::record::OutcomeKind;
use crate::format::step::{self, StepRecord};
use crate::format::unstorable;
use crate::key::KeyName;

/// The step state of one run.
pub(crate) struct StepRun {
    pub attempt: u32,
    codec: Codec,
    max_result_bytes: usize,
    recorded: Option<Vec<(u32, Vec<u8>)>>,
    next_index: u32,
    names: HashSet<String>,
    failure: Option<RunFailure>,
}

/// A step that ran but whose result cannot be stored: the kind, the payload (the reason) and
/// the error the run ends with.
pub(crate) type Unstorable = (OutcomeKind, Vec<u8>, Error);

/// A finished step's record, encoded, and what it means for the run once written.
pub(crate) struct PreparedStep {
    pub bytes: Vec<u8>,
    /// The step ran but its result cannot be stored: the kind, the payload (the reason) and
    /// the error the run ends with.
    unstorable: Option<Unstorable>,
}

impl StepRun {
    pub(crate) fn new(attempt: u32, codec: Codec, max_result_bytes: usize) -> Self {
        Self {
            attempt,
            codec,
            max_result_bytes,
            recorded: None,
            next_index: 0,
            names: HashSet::new(),
            failure: None,
        }
    }

    /// Takes the store failure that failed this run, if any.
    pub(crate) fn take_failure(&mut self) -> Option<RunFailure> {
        self.failure.take()
    }

    /// Fails the run with `error` (the first failure wins) and returns the step's error.
    fn fail<E>(&mut self, error: Error, terminal: Option<(OutcomeKind, Vec<u8>)>) -> StepError<E> {
        self.fail_with(RunFailure {
            error,
            terminal,
            in_doubt: false,
        })
    }

    fn fail_with<E>(&mut self, failure: RunFailure) -> StepError<E> {
        let failure = self.failure.get_or_insert(failure);
        StepError::Store(failure.error.clone())
    }

    /// Checks that the run may go on and the name is usable; takes the next step index.
    pub(crate) fn begin<E>(&mut self, key: &[u8], name: &str) -> Result<u32, StepError<E>> {
        if let Some(failure) = &self.failure {
            return Err(StepError::Store(failure.error.clone()));
        }
        if name.is_empty() || name.len() > step::MAX_NAME || !self.names.insert(name.to_owned()) {
            let error = Error::InvalidStep {
                key: KeyName::new(key),
                name: name.to_owned(),
            };
            return Err(self.fail(error, None));
        }
        let index = self.next_index;
        self.next_index += 1;
        Ok(index)
    }

    /// Whether the recorded steps are still to be read (once per run).
    pub(crate) fn needs_recorded(&self) -> bool {
        self.recorded.is_none()
    }

    /// Takes the recorded steps as read (or the read's failure, which fails the run).
    pub(crate) fn load_recorded<E>(
        &mut self,
        read: Result<Vec<(u32, Vec<u8>)>, Error>,
    ) -> Result<(), StepError<E>> {
        match read {
            Ok(steps) => {
                self.recorded = Some(steps);
                Ok(())
            }
            Err(e) => Err(self.fail(e, None)),
        }
    }

    /// The recorded result of step `index`, if an earlier attempt of this life finished it.
    pub(crate) fn recorded_result<S: Serialize + DeserializeOwned, E>(
        &mut self,
        key: &[u8],
        index: u32,
        name: &str,
    ) -> Result<Option<S>, StepError<E>> {
        let recorded = self.recorded.as_deref().unwrap_or_default();
        let Ok(at) = recorded.binary_search_by_key(&index, |(i, _)| *i) else {
            return Ok(None);
        };
        let (error, terminal) = match step::decode(&recorded[at].1) {
            Err(reason) => (
                Error::CorruptStep {
                    key: KeyName::new(key),
                    index,
                    reason,
                },
                None,
            ),
            Ok(step) if step.name != name => (
                Error::StepSequenceChanged {
                    key: KeyName::new(key),
                    index,
                    recorded: step.name.to_owned(),
                    requested: name.to_owned(),
                },
                None,
            ),
            Ok(step) => match unstorable::replay(key, step.outcome, step.payload) {
                Some(error) => (error, Some((step.outcome, step.payload.to_vec()))),
                None => match codec::decode::<S>(step.payload, step.codec, step.shape) {
                    Ok(value) => return Ok(Some(value)),
                    Err(message) => (
                        Error::Decode {
                            key: KeyName::new(key),
                            what: "step result",
                            message,
                        },
                        None,
                    ),
                },
            },
        };
        Err(self.fail(error, terminal))
    }

    /// The record of finished step `name`, or that its outcome could not be stored.
    pub(crate) fn prepare<S: Serialize + DeserializeOwned>(
        &self,
        key: &[u8],
        name: &str,
        value: &S,
    ) -> PreparedStep {
        let limit = self.max_result_bytes;
        let (encoded, unstorable) = match codec::encode(value, self.codec, limit) {
            Ok(e) => (e, None),
            Err(failure) => {
                let (kind, payload, error) = unstorable::record(key, failure, limit);
                let note = codec::Encoded {
                    bytes: payload,
                    codec: self.codec,
                    shape: 0,
                };
                (note, Some((kind, error)))
            }
        };
        let outcome = unstorable.as_ref().map_or(OutcomeKind::Stored, |(k, _)| *k);
        let bytes = step::encode(&StepRecord {
            name,
            outcome,
            codec: encoded.codec,
            shape: Some(encoded.shape).filter(|s| *s != 0),
            payload: &encoded.bytes,
        });
        PreparedStep {
            bytes,
            unstorable: unstorable.map(|(kind, error)| (kind, encoded.bytes, error)),
        }
    }

    /// What the write of a prepared step (and its durability point) means for the run.
    pub(crate) fn after_write<E>(
        &mut self,
        written: Result<(), Error>,
        unstorable: Option<Unstorable>,
    ) -> Result<(), StepError<E>> {
        match (written, unstorable) {
            // Refused by fencing: the record is no longer this claim's, nothing to leave.
            (Err(e @ (Error::OutcomeNotRecorded { .. } | Error::LeaseLost { .. })), _) => {
                Err(self.fail(e, None))
            }
            // The step ran; whether its record is stored is unknown.
            (Err(e), _) => Err(self.fail_with(RunFailure {
                error: e,
                terminal: None,
                in_doubt: true,
            })),
            (Ok(()), Some((kind, payload, error))) => Err(self.fail(error, Some((kind, payload)))),
            (Ok(()), None) => Ok(()),
        }
    }
}

impl PreparedStep {
    /// Splits into the bytes to write and what [`StepRun::after_write`] needs.
    pub(crate) fn split(self) -> (Vec<u8>, Option<Unstorable>) {
        (self.bytes, self.unstorable)
    }
}
