//! The command line: which store, and what to do with it.
//!
//! Invariants: every argument is checked here (keys decode, durations parse, states are
//! named); `--help` on each command says what it does, what it changes and its exit codes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use idemstore::RecordState;

const EXIT_CODES: &str = "\
Exit codes:
  0  done
  1  the store failed or refused (storage error, corrupt record, bad input)
  2  the command line is wrong (including --path with --postgres, --tenant without --postgres)
  3  the key has no record
  4  resolve refused: the record is not an interrupted run
  5  the sled store is open in another process (stop the service, or use PostgreSQL live)";

/// Look inside an idemstore store and act on it: find records stuck Pending after an
/// incident, record what an interrupted payment did, remove a poisoned key, move a store from
/// sled to PostgreSQL.
///
/// A sled store can be opened only while no service holds it. A PostgreSQL store can be
/// worked on live, beside running replicas: every change goes through the same fenced writes
/// the replicas use.
#[derive(Debug, Parser)]
#[command(name = "idemstore", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub store: StoreArgs,
    /// Print JSON (one object per line for `ls`) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Which store.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// A sled store's directory.
    #[arg(
        long,
        env = "IDEMSTORE_PATH",
        global = true,
        conflicts_with = "postgres"
    )]
    pub path: Option<PathBuf>,
    /// A PostgreSQL connection string (`host=... user=... dbname=...` or a URL).
    #[arg(long, env = "IDEMSTORE_POSTGRES", global = true)]
    pub postgres: Option<String>,
    /// The PostgreSQL schema of the store's tables [default: idemstore].
    #[arg(long, global = true)]
    pub schema: Option<String>,
    /// The tenant scope of the keys (PostgreSQL; a sled store has one scope) [default: "",
    /// the unscoped keys].
    #[arg(long, global = true)]
    pub tenant: Option<String>,
}

/// A record's state, as the command line names it.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateArg {
    /// Claimed and running, or interrupted (its process died).
    Pending,
    /// Returned Ok: its result is replayed.
    Completed,
    /// Failed permanently: its error is replayed.
    Failed,
    /// Failed in a way the next call retries.
    Retryable,
}

impl From<StateArg> for RecordState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Pending => RecordState::Pending,
            StateArg::Completed => RecordState::Completed,
            StateArg::Failed => RecordState::FailedPermanent,
            StateArg::Retryable => RecordState::FailedRetryable,
        }
    }
}

/// A key as given: text, or bytes in hex with `--hex`.
#[derive(Debug, Args)]
pub struct KeyArg {
    /// The idempotency key.
    pub key: String,
    /// The key is hex-encoded bytes (as `ls` prints keys that are not text).
    #[arg(long)]
    pub hex: bool,
}

impl KeyArg {
    pub fn bytes(&self) -> Result<Vec<u8>, String> {
        if !self.hex {
            return Ok(self.key.as_bytes().to_vec());
        }
        let digits = self.key.strip_prefix("hex:").unwrap_or(&self.key);
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        if !digits.len().is_multiple_of(2) {
            return Err(format!("{:?} is not hex (odd length)", self.key));
        }
        digits
            .as_bytes()
            .chunks(2)
            .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| format!("{:?} is not hex", self.key))
    }
}

/// A duration such as `90s`, `15m`, `2h` or `7d`.
#[derive(Debug, Clone, Copy)]
pub struct Age(Duration);

impl From<Age> for Duration {
    fn from(a: Age) -> Self {
        a.0
    }
}

impl std::str::FromStr for Age {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
        let per_unit = match unit {
            "s" | "" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86400,
            _ => return Err(format!("{s:?}: the unit is one of s, m, h, d")),
        };
        let seconds = n
            .checked_mul(per_unit)
            .ok_or_else(|| format!("{s:?}: too long an age"))?;
        Ok(Age(Duration::from_secs(seconds)))
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Counts by state, the oldest Pending record, bytes used, the expiry horizon.
    Stats,
    /// Lists live records (key, state, attempts, age, expiry), in key order.
    Ls {
        /// Only records in this state.
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        /// Only keys starting with this text.
        #[arg(long)]
        prefix: Option<String>,
        /// Only records created longer ago than this (90s, 15m, 2h, 7d).
        #[arg(long)]
        older_than: Option<Age>,
        /// Stop after this many records.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Shows one record whole: metadata, claim token, recorded steps, and its outcome (as
    /// JSON when stored as JSON, else its size and a hex preview). Expired records are shown
    /// too, marked expired. Exit 3 if the key has no record.
    Show {
        #[command(flatten)]
        key: KeyArg,
    },
    /// Removes a key's record and steps, whatever its state: the next call runs the
    /// operation again. Exit 3 if the key has no record.
    Rm {
        #[command(flatten)]
        key: KeyArg,
    },
    /// Removes every expired record now.
    Sweep,
    /// Records what an interrupted run did (a Pending record whose process died): its result,
    /// its permanent error, or a release so the next call runs it again. Refused (exit 4)
    /// unless the record is an interrupted run; exit 3 if the key has no live record.
    ///
    /// Example, after the payment provider confirmed the charge:
    ///   idemstore --path ./idem-db resolve order-17 --completed '{"receipt":"r-17"}'
    Resolve {
        #[command(flatten)]
        key: KeyArg,
        /// The run succeeded: record this JSON as its result (replayed to every later call).
        #[arg(long, value_name = "JSON", group = "resolution")]
        completed: Option<String>,
        /// The run failed for good: record this JSON as its permanent error.
        #[arg(long, value_name = "JSON", group = "resolution")]
        failed: Option<String>,
        /// The side effect did not happen: the next call runs the operation again (recorded
        /// steps are kept).
        #[arg(long, group = "resolution")]
        release: bool,
    },
    /// Writes every record (and its steps) as JSON lines, to a file or stdout: a backup, or
    /// the first half of a move to another store.
    ///
    /// Example, sled to PostgreSQL:
    ///   idemstore --path ./idem-db export --out idem.jsonl
    ///   idemstore --postgres 'host=db user=app dbname=app' import idem.jsonl
    Export {
        /// The file to write [default: stdout].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Reads an export (a file or stdin) and writes each record whose key has none here; keys
    /// that have a record keep it; expired records are skipped.
    Import {
        /// The export to read [default: stdin].
        file: Option<PathBuf>,
        /// Create the sled store if the directory does not exist.
        #[arg(long)]
        create: bool,
    },
}
