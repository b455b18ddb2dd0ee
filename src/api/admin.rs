//! Operating a store by hand: a record seen whole, an interrupted run resolved, records moved
//! between stores as JSON lines.
//!
//! Invariants: nothing here runs an operation. [`Store::resolve`] changes only an orphan, as a
//! fenced takeover (see `driver::resolve`). [`Store::export`] writes every stored record byte
//! for byte, with its life's steps, so an import into any engine replays exactly what the
//! source would have (results, errors, fingerprints, orphans); [`Store::import`] never
//! replaces a record: a key that already has one is skipped and counted. What is shown or
//! exported is durable first, as a replay is (design §6).

use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

use crate::api::store::{StepInfo, Store};
use crate::core::outcome::RecordInfo;
use crate::core::replay::decode_error;
use crate::driver::resolve::{self, Resolved};
use crate::engine::Engine;
use crate::error::Error;
use crate::format::codec::Codec;
use crate::format::record::{self, ClaimToken, OutcomeKind, RecordState};
use crate::key::KeyName;

/// What an operator found out about an interrupted run (see [`Store::resolve`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Resolution {
    /// The side effect happened: record this result, which every later call replays as the
    /// operation's `Ok` value (stored as JSON, so it decodes into any type that reads it).
    Completed(serde_json::Value),
    /// The operation failed for good: record this error, replayed as the operation's permanent
    /// error to callers whose error policy decodes it (stored as JSON).
    FailedPermanently(serde_json::Value),
    /// The side effect did not happen: the next call runs the operation again (a retryable
    /// failure; recorded steps of a multi-step operation are kept and replayed).
    Release,
}

/// The outcome a record stores, undecoded (see [`Store::inspect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoredOutcome {
    /// None (Pending, or a retryable failure).
    None,
    /// An encoded result (Completed) or permanent error (FailedPermanent).
    Encoded {
        /// The codec it was written with.
        codec: Codec,
        /// The encoded bytes.
        bytes: Vec<u8>,
    },
    /// The outcome was larger than the store's limit when it was recorded.
    TooLarge,
    /// The outcome could not be encoded when it was recorded.
    NotEncodable,
}

impl StoredOutcome {
    /// The outcome as JSON, when it was stored as JSON.
    pub fn to_json(&self) -> Option<serde_json::Value> {
        match self {
            StoredOutcome::Encoded {
                codec: Codec::Json,
                bytes,
            } => serde_json::from_slice(bytes).ok(),
            _ => None,
        }
    }
}

/// Everything a store holds for one key (see [`Store::inspect`]).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RecordDetail {
    /// The record's metadata.
    pub info: RecordInfo,
    /// The record has expired: calls read it as absent; the sweeper will remove it.
    pub expired: bool,
    /// The life the record belongs to (its steps are stored under it).
    pub life: ClaimToken,
    /// The stored outcome.
    pub outcome: StoredOutcome,
    /// The recorded steps of the record's life.
    pub steps: Vec<StepInfo>,
}

/// What [`Store::import`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImportSummary {
    /// Records written.
    pub imported: u64,
    /// Records skipped because their key already had a record here.
    pub existing: u64,
    /// Records skipped because they had expired.
    pub expired: u64,
}

/// The first line of an export.
const EXPORT_FORMAT: &str = "idemstore-export";
const EXPORT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct ExportHeader {
    format: String,
    version: u32,
}

/// The last line of an export: how many records came before it (a cut file has none).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportEnd {
    end: u64,
}

/// One record of an export: key, record bytes and steps, hex-encoded.
#[derive(Serialize, Deserialize)]
struct ExportLine {
    key: String,
    record: String,
    #[serde(default)]
    steps: Vec<(u32, String)>,
}

#[allow(private_bounds)]
impl<S: Engine> Store<S> {
    /// Everything the store holds for `key`, expired or not: metadata, the stored outcome
    /// undecoded, and the recorded steps. `None` if the key has no record.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// use idemstore::{Codec, Store};
    /// let store = Store::open(dir.path().join("db")).unwrap();
    /// store.call("k").codec(Codec::Json).run(|| Ok::<_, std::io::Error>(42)).unwrap();
    /// let detail = store.inspect("k").unwrap().unwrap();
    /// assert_eq!(detail.outcome.to_json(), Some(serde_json::json!(42)));
    /// ```
    ///
    /// # Errors
    /// [`Error::CorruptRecord`] / [`Error::UnsupportedRecordVersion`] / [`Error::CorruptStep`]
    /// for bad bytes; [`Error::Storage`] for I/O failures.
    pub fn inspect(&self, key: impl AsRef<[u8]>) -> Result<Option<RecordDetail>, Error> {
        let key = key.as_ref();
        let shared = self.shared();
        let Some(bytes) = shared.engine.get(key)? else {
            return Ok(None);
        };
        let rec = record::decode(bytes.as_ref()).map_err(|e| decode_error(key, e))?;
        let h = rec.header;
        shared.durable_before_showing(h.state == RecordState::Pending)?;
        let steps = self.step_infos(key, h.life)?;
        let outcome = match h.outcome {
            OutcomeKind::None => StoredOutcome::None,
            OutcomeKind::Stored => StoredOutcome::Encoded {
                codec: h.codec,
                bytes: rec.payload.to_vec(),
            },
            OutcomeKind::TooLarge => StoredOutcome::TooLarge,
            OutcomeKind::NotEncodable => StoredOutcome::NotEncodable,
        };
        Ok(Some(RecordDetail {
            info: RecordInfo::new(&h, rec.payload.len()),
            expired: h.is_expired(shared.clock.now_millis()),
            life: h.life,
            outcome,
            steps,
        }))
    }

    /// Resolves an interrupted run (an orphan: a live Pending record whose holder is gone,
    /// which `OrphanPolicy::Report` reports as [`Error::Interrupted`]) with what the operator
    /// found out: record a result or a permanent error, or release the key so the next call
    /// runs the operation. The record keeps its fingerprint, life, steps and attempt count, gets
    /// a new claim token (so the interrupted holder, if it ever comes back, is fenced out) and
    /// is durable when this returns.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// use idemstore::{Error, Resolution, Store};
    /// let store = Store::open(dir.path().join("db")).unwrap();
    /// // A completed record is not an interrupted run: nothing changes.
    /// store.execute_once("k", || Ok::<_, std::io::Error>(1)).unwrap();
    /// let refused = store.resolve("k", Resolution::Release).unwrap_err();
    /// assert!(matches!(refused, Error::NotAnOrphan { .. }));
    /// ```
    ///
    /// # Errors
    /// [`Error::NotAnOrphan`] if the key has no live Pending record, or its holder is still
    /// running (here, or elsewhere with a live lease), or acted on it meanwhile: nothing
    /// changed. [`Error::ResultTooLarge`] if the outcome's JSON is over `max_result_bytes`.
    /// [`Error::OutcomeNotRecorded`] if the key was taken over between the two writes (the
    /// new holder's record stands). [`Error::CorruptRecord`] for bad bytes; [`Error::Storage`]
    /// for I/O failures (the resolution may then not be recorded: inspect and run it again).
    pub fn resolve(
        &self,
        key: impl AsRef<[u8]>,
        resolution: Resolution,
    ) -> Result<RecordInfo, Error> {
        let key = key.as_ref();
        let shared = self.shared();
        let encoded = |state, value: &serde_json::Value| {
            let bytes = serde_json::to_vec(value).map_err(|e| Error::Encode {
                what: "resolution",
                message: e.to_string(),
            })?;
            let limit = shared.settings.max_result_bytes;
            if bytes.len() > limit {
                return Err(Error::ResultTooLarge {
                    key: KeyName::new(key),
                    size: bytes.len() as u64,
                    limit: limit as u64,
                });
            }
            Ok(Resolved {
                state,
                payload: Some((bytes, Codec::Json)),
            })
        };
        let resolved = match &resolution {
            Resolution::Completed(value) => encoded(RecordState::Completed, value)?,
            Resolution::FailedPermanently(value) => encoded(RecordState::FailedPermanent, value)?,
            Resolution::Release => Resolved {
                state: RecordState::FailedRetryable,
                payload: None,
            },
        };
        resolve::resolve(shared, key, resolved)
    }

    /// Writes every record the store holds (expired ones too), with its recorded steps, to
    /// `out` as JSON lines, for [`Store::import`] into another store of any engine, or as a
    /// backup. `progress` is called with the count written so far after each record. Returns
    /// how many records were written.
    ///
    /// ```
    /// # let dir = tempfile::tempdir().unwrap();
    /// use idemstore::Store;
    /// let from = Store::open(dir.path().join("a")).unwrap();
    /// from.execute_once("k", || Ok::<_, std::io::Error>(String::from("done"))).unwrap();
    /// let mut lines = Vec::new();
    /// assert_eq!(from.export(&mut lines, |_| {}).unwrap(), 1);
    ///
    /// let to = Store::open(dir.path().join("b")).unwrap();
    /// to.import(lines.as_slice(), |_| {}).unwrap();
    /// let again = to.execute_once("k", || Ok::<_, std::io::Error>(String::from("twice"))).unwrap();
    /// assert_eq!((again.as_str(), again.is_replayed()), ("done", true));
    /// ```
    ///
    /// The last line counts the records, so an import can tell a file that was cut short. A
    /// record whose bytes do not decode is exported as it is, without steps (an import then
    /// refuses that line, naming it: remove the key or the line).
    ///
    /// # Errors
    /// [`Error::Storage`] for I/O failures of the store; [`Error::Io`] if writing to `out`
    /// fails.
    pub fn export(&self, mut out: impl Write, mut progress: impl FnMut(u64)) -> Result<u64, Error> {
        let shared = self.shared();
        // Pending records are exported too: one durability point covers every record read.
        shared.durable_before_showing(true)?;
        let write_err = |e: std::io::Error| Error::Io {
            path: "<export>".into(),
            source: std::sync::Arc::new(e),
        };
        let header = ExportHeader {
            format: EXPORT_FORMAT.into(),
            version: EXPORT_VERSION,
        };
        let mut line = serde_json::to_vec(&header).map_err(|e| write_err(e.into()))?;
        line.push(b'\n');
        out.write_all(&line).map_err(write_err)?;
        let mut written = 0;
        for item in shared.engine.records() {
            let (key, bytes) = item?;
            let bytes = bytes.as_ref();
            // A record that does not decode is copied as it is, without steps (no life to
            // find them under); an import refuses its line, naming it.
            let steps = match record::decode(bytes) {
                Ok(rec) => shared
                    .engine
                    .steps(&key, rec.header.life)?
                    .into_iter()
                    .map(|(i, b)| (i, hex(b.as_ref())))
                    .collect(),
                Err(_) => Vec::new(),
            };
            let entry = ExportLine {
                key: hex(&key),
                record: hex(bytes),
                steps,
            };
            let mut line = serde_json::to_vec(&entry).map_err(|e| write_err(e.into()))?;
            line.push(b'\n');
            out.write_all(&line).map_err(write_err)?;
            written += 1;
            progress(written);
        }
        let mut line =
            serde_json::to_vec(&ExportEnd { end: written }).map_err(|e| write_err(e.into()))?;
        line.push(b'\n');
        out.write_all(&line).map_err(write_err)?;
        out.flush().map_err(write_err)?;
        Ok(written)
    }

    /// Reads an export (see [`Store::export`]) and writes each record whose key has no live
    /// record here, with its steps, byte for byte (an expired record here is replaced); keys
    /// that have a live record are left as they are, and expired records are skipped.
    /// `progress` is called with the count of records read after each one. Imported records
    /// are durable when this returns, with an error or not, and every later claim's token is
    /// larger than theirs.
    ///
    /// # Errors
    /// [`Error::ImportLine`] for an empty input, a line that is not part of an export, a
    /// record that does not decode, or an export without its end line (cut short): the
    /// records before it were imported. [`Error::KeyTooLong`] / [`Error::EmptyKey`] for a key
    /// this store refuses; [`Error::CorruptRecord`] for a record here that does not decode;
    /// [`Error::Storage`] for I/O failures; [`Error::Io`] if reading `input` fails.
    pub fn import(
        &self,
        input: impl BufRead,
        progress: impl FnMut(u64),
    ) -> Result<ImportSummary, Error> {
        let shared = self.shared();
        let mut highest_epoch = 0;
        let imported = self.import_lines(input, progress, &mut highest_epoch);
        // Whatever was written, even before a bad line, is durable before this returns, and
        // later claims' tokens exceed every moved-in token (§16).
        let raised = match highest_epoch {
            0 => Ok(()),
            floor => shared.raise_epoch_above(floor),
        };
        let durable = shared.wait_durable();
        let summary = imported?;
        raised?;
        durable?;
        Ok(summary)
    }

    fn import_lines(
        &self,
        input: impl BufRead,
        mut progress: impl FnMut(u64),
        highest_epoch: &mut u64,
    ) -> Result<ImportSummary, Error> {
        let shared = self.shared();
        let now = shared.clock.now_millis();
        let mut summary = ImportSummary::default();
        let mut read = 0u64;
        let mut ended = None;
        let mut number = 0u64;
        for line in input.lines() {
            number += 1;
            let bad = |reason: String| Error::ImportLine {
                line: number,
                reason,
            };
            let line = line.map_err(|e| Error::Io {
                path: "<import>".into(),
                source: std::sync::Arc::new(e),
            })?;
            if ended.is_some() {
                return Err(bad("a line after the export's end line".into()));
            }
            if number == 1 {
                let header: ExportHeader = serde_json::from_str(&line)
                    .map_err(|e| bad(format!("not an idemstore export header: {e}")))?;
                if header.format != EXPORT_FORMAT || header.version != EXPORT_VERSION {
                    return Err(bad(format!(
                        "format {:?} version {}; this build reads {EXPORT_FORMAT:?} version \
                         {EXPORT_VERSION}",
                        header.format, header.version
                    )));
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            if let Ok(end) = serde_json::from_str::<ExportEnd>(&line) {
                if end.end != read {
                    return Err(bad(format!(
                        "the end line counts {} records; {read} came before it",
                        end.end
                    )));
                }
                ended = Some(end);
                continue;
            }
            let entry: ExportLine =
                serde_json::from_str(&line).map_err(|e| bad(format!("not a record line: {e}")))?;
            let key = unhex(&entry.key).ok_or_else(|| bad("key is not hex".into()))?;
            let bytes = unhex(&entry.record).ok_or_else(|| bad("record is not hex".into()))?;
            let mut steps = Vec::with_capacity(entry.steps.len());
            for (index, step) in &entry.steps {
                let step = unhex(step).ok_or_else(|| bad(format!("step {index} is not hex")))?;
                steps.push((*index, step));
            }
            shared.check_key(&key)?;
            let h = record::decode(&bytes)
                .map_err(|e| bad(decode_error(&key, e).to_string()))?
                .header;
            read += 1;
            if h.is_expired(now) {
                summary.expired += 1;
            } else {
                *highest_epoch = (*highest_epoch).max(h.claim.epoch).max(h.life.epoch);
                match self.import_one(&key, &bytes, &h, &steps, now)? {
                    true => summary.imported += 1,
                    false => summary.existing += 1,
                }
            }
            progress(read);
        }
        match (number, ended) {
            (0, _) => Err(Error::ImportLine {
                line: 1,
                reason: "empty input: not an idemstore export".into(),
            }),
            (_, None) => Err(Error::ImportLine {
                line: number + 1,
                reason: format!(
                    "the export has no end line: it was cut short ({read} records read and \
                     imported as counted)"
                ),
            }),
            (_, Some(_)) => Ok(summary),
        }
    }

    /// Writes one moved-in record where the key has no live record (an expired one is
    /// removed first, with its steps, as a claim would retire it, unless its call still
    /// runs). Returns whether it wrote.
    fn import_one(
        &self,
        key: &[u8],
        bytes: &[u8],
        h: &record::Header,
        steps: &[(u32, Vec<u8>)],
        now: u64,
    ) -> Result<bool, Error> {
        let shared = self.shared();
        let engine = &shared.engine;
        if let Some(existing) = engine.get(key)? {
            let existing = existing.as_ref();
            let old = record::decode(existing).map_err(|e| decode_error(key, e))?;
            if !old.header.is_expired(now) {
                return Ok(false);
            }
            // As for the sweeper: a record whose call still runs stays, past its expiry too.
            if shared.call_still_runs(key, &old.header) {
                return Ok(false);
            }
            let steps_of = old.header.has_steps.then_some(old.header.life);
            // Removed meanwhile or re-claimed: the import below finds what is there now.
            engine.remove_record(key, existing, steps_of)?;
        }
        engine.index_expiry(h.expires_ms, key)?;
        engine.import_record(key, bytes, h.life, steps)
    }

    /// Bytes the store takes in its storage (sled: on disk; PostgreSQL: the tables and
    /// indexes of the store's schema, every tenant's), if the engine can tell.
    ///
    /// # Errors
    /// [`Error::Storage`] for I/O failures.
    pub fn size_on_disk(&self) -> Result<Option<u64>, Error> {
        self.shared().engine.size_on_disk()
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let s = s.as_bytes();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    s.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_non_hex() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&bytes)), Some(bytes));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex(""), Some(Vec::new()));
    }
}
