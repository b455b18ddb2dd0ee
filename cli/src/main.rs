//! `idemstore`: look inside an idempotency store and act on it without writing code.
//!
//! Invariants: a command never runs an operation; it changes a store only through the
//! library's own fenced paths (`remove`, `sweep_now`, `resolve`, `import`), so it is safe
//! beside running replicas on PostgreSQL. A sled store is opened only if it exists (import may
//! create one with `--create`) and only when no process holds it. Exit codes are fixed (see
//! [`Exit`]) so scripts can rely on them.

mod args;
mod output;

use std::io::{BufReader, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Parser;
use idemstore::{Error, PgStore, RecordState, Resolution, Store};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use args::{Cli, Command, StoreArgs};
use output::{key_text, Listed};

/// What the process exits with.
#[derive(Debug, Clone, Copy)]
enum Exit {
    /// The command did what it was asked.
    Ok = 0,
    /// The store failed or refused (storage, corrupt bytes, bad input).
    Failed = 1,
    /// The command line is wrong (clap's own refusals exit with 2 too).
    Usage = 2,
    /// The key has no record.
    NotFound = 3,
    /// `resolve` was refused: the record is not an interrupted run.
    NotAnOrphan = 4,
    /// The sled store is open in another process.
    Locked = 5,
}

/// A failure with the exit code it maps to.
struct Failure {
    exit: Exit,
    message: String,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let exit = match e {
            Error::Locked { .. } => Exit::Locked,
            Error::NotAnOrphan {
                found: None,
                holder_live: false,
                ..
            } => Exit::NotFound,
            Error::NotAnOrphan { .. } => Exit::NotAnOrphan,
            _ => Exit::Failed,
        };
        Failure {
            exit,
            message: e.to_string(),
        }
    }
}

fn failed(message: impl Into<String>) -> Failure {
    Failure {
        exit: Exit::Failed,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(f) => {
            eprintln!("idemstore: {}", f.message);
            ExitCode::from(f.exit as u8)
        }
    }
}

fn run(cli: Cli) -> Result<Exit, Failure> {
    let create = matches!(&cli.command, Command::Import { create: true, .. });
    // clap refuses --path with --postgres.
    match (&cli.store.path, &cli.store.postgres) {
        (Some(_), _) if cli.store.tenant.is_some() || cli.store.schema.is_some() => Err(Failure {
            exit: Exit::Usage,
            message: "--tenant and --schema are PostgreSQL's: a sled store has one scope".into(),
        }),
        (Some(path), _) => {
            if !create && !is_store(path) {
                return Err(failed(format!(
                    "no store at {} (import --create makes one)",
                    path.display()
                )));
            }
            let store = Store::builder(path).sweep_interval(None).open()?;
            let exit = act(&store, &cli.command, cli.json)?;
            store.close()?;
            Ok(exit)
        }
        (None, Some(url)) => {
            let store = open_postgres(url, &cli.store)?;
            let exit = act(&store, &cli.command, cli.json)?;
            store.close()?;
            Ok(exit)
        }
        (None, None) => Err(failed(
            "which store? give --path DIR (sled) or --postgres URL (or IDEMSTORE_PATH / \
             IDEMSTORE_POSTGRES)",
        )),
    }
}

/// Whether `path` holds a sled store (a database directory, which opening then checks),
/// rather than nothing or an empty directory, where opening would create one.
fn is_store(path: &std::path::Path) -> bool {
    path.join("idemstore.format").exists() || path.join("conf").exists()
}

fn open_postgres(url: &str, args: &StoreArgs) -> Result<PgStore, Failure> {
    let mut options = idemstore::PgOptions::new(url).pool_size(2);
    if let Some(schema) = &args.schema {
        options = options.schema(schema.clone());
    }
    if let Some(tenant) = &args.tenant {
        options = options.tenant(tenant.clone());
    }
    Ok(idemstore::StoreBuilder::default()
        .sweep_interval(None)
        .open_postgres(options)?)
}

/// Runs `command` on `store`.
fn act(store: &dyn Admin, command: &Command, json: bool) -> Result<Exit, Failure> {
    let out = &mut std::io::stdout().lock();
    let write_err = |e: std::io::Error| failed(format!("writing output: {e}"));
    match command {
        Command::Stats => {
            let stats = output::Summary::of(store.records_listed(None)?, store.disk_bytes()?);
            output::print_summary(out, &stats, json).map_err(write_err)?;
            Ok(Exit::Ok)
        }
        Command::Ls {
            state,
            prefix,
            older_than,
            limit,
        } => {
            // An age past the start of the clock selects nothing.
            let cutoff = older_than.map(|d| SystemTime::now().checked_sub(Duration::from(d)));
            let mut shown = 0usize;
            for item in store.records_listed(state.map(RecordState::from))? {
                let item = item?;
                if prefix
                    .as_ref()
                    .is_some_and(|p| !item.key.starts_with(p.as_bytes()))
                {
                    continue;
                }
                if cutoff.is_some_and(|c| c.is_none_or(|c| item.info.created_at > c)) {
                    continue;
                }
                if limit.is_some_and(|l| shown >= l) {
                    break;
                }
                output::print_listed(out, &item, json).map_err(write_err)?;
                shown += 1;
            }
            Ok(Exit::Ok)
        }
        Command::Show { key } => {
            let key = key.bytes().map_err(failed)?;
            match store.detail(&key)? {
                Some(detail) => {
                    output::print_detail(out, &key, &detail, json).map_err(write_err)?;
                    Ok(Exit::Ok)
                }
                None => Err(Failure {
                    exit: Exit::NotFound,
                    message: format!("{} has no record", key_text(&key)),
                }),
            }
        }
        Command::Rm { key } => {
            let key = key.bytes().map_err(failed)?;
            match store.remove_key(&key)? {
                true => {
                    writeln!(out, "removed {}", key_text(&key)).map_err(write_err)?;
                    Ok(Exit::Ok)
                }
                false => Err(Failure {
                    exit: Exit::NotFound,
                    message: format!("{} has no record", key_text(&key)),
                }),
            }
        }
        Command::Sweep => {
            let swept = store.sweep()?;
            writeln!(out, "swept {swept} expired records").map_err(write_err)?;
            Ok(Exit::Ok)
        }
        Command::Resolve {
            key,
            completed,
            failed: failure,
            release,
        } => {
            let key = key.bytes().map_err(failed)?;
            let parse = |text: &str| {
                serde_json::from_str(text).map_err(|e| failed(format!("not JSON ({e}): {text}")))
            };
            let resolution = match (completed, failure, release) {
                (Some(v), None, false) => Resolution::Completed(parse(v)?),
                (None, Some(v), false) => Resolution::FailedPermanently(parse(v)?),
                (None, None, true) => Resolution::Release,
                _ => return Err(failed("give one of --completed, --failed, --release")),
            };
            let info = store.resolve_key(&key, resolution)?;
            writeln!(
                out,
                "resolved {}: now {:?} (claim {}.{})",
                key_text(&key),
                info.state,
                info.claim.epoch,
                info.claim.sequence
            )
            .map_err(write_err)?;
            Ok(Exit::Ok)
        }
        Command::Export { out: file } => {
            let bar = progress("exporting");
            let written = match file {
                Some(path) => {
                    let f = std::fs::File::create(path)
                        .map_err(|e| failed(format!("creating {}: {e}", path.display())))?;
                    store.export_to(Box::new(std::io::BufWriter::new(f)), &bar)?
                }
                None => {
                    store.export_to(Box::new(std::io::BufWriter::new(std::io::stdout())), &bar)?
                }
            };
            bar.finish_and_clear();
            eprintln!("exported {written} records");
            Ok(Exit::Ok)
        }
        Command::Import { file, .. } => {
            let bar = progress("importing");
            let summary = match file {
                Some(path) => {
                    let f = std::fs::File::open(path)
                        .map_err(|e| failed(format!("opening {}: {e}", path.display())))?;
                    store.import_from(Box::new(BufReader::new(f)), &bar)?
                }
                None => store.import_from(Box::new(BufReader::new(std::io::stdin())), &bar)?,
            };
            bar.finish_and_clear();
            writeln!(
                out,
                "imported {} records ({} keys already had one, {} expired skipped)",
                summary.imported, summary.existing, summary.expired
            )
            .map_err(write_err)?;
            Ok(Exit::Ok)
        }
    }
}

/// A spinner on stderr, shown only when stderr is a terminal.
fn progress(what: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}: {pos} records ({per_sec})") {
        bar.set_style(style);
    }
    bar.set_message(what);
    bar
}

/// The library calls the commands need, over either engine.
trait Admin {
    fn records_listed(
        &self,
        state: Option<RecordState>,
    ) -> Result<Box<dyn Iterator<Item = Result<Listed, Error>> + '_>, Error>;
    fn disk_bytes(&self) -> Result<Option<u64>, Error>;
    fn detail(&self, key: &[u8]) -> Result<Option<idemstore::RecordDetail>, Error>;
    fn remove_key(&self, key: &[u8]) -> Result<bool, Error>;
    fn sweep(&self) -> Result<u64, Error>;
    fn resolve_key(&self, key: &[u8], r: Resolution) -> Result<idemstore::RecordInfo, Error>;
    fn export_to(&self, out: Box<dyn Write>, bar: &ProgressBar) -> Result<u64, Error>;
    fn import_from(
        &self,
        input: Box<dyn std::io::BufRead>,
        bar: &ProgressBar,
    ) -> Result<idemstore::ImportSummary, Error>;
}

macro_rules! admin_for {
    ($store:ty) => {
        impl Admin for $store {
            fn records_listed(
                &self,
                state: Option<RecordState>,
            ) -> Result<Box<dyn Iterator<Item = Result<Listed, Error>> + '_>, Error> {
                let records = match state {
                    Some(s) => self.records_in_state(s),
                    None => self.records(),
                };
                Ok(Box::new(
                    records.map(|r| r.map(|(key, info)| Listed { key, info })),
                ))
            }
            fn disk_bytes(&self) -> Result<Option<u64>, Error> {
                self.size_on_disk()
            }
            fn detail(&self, key: &[u8]) -> Result<Option<idemstore::RecordDetail>, Error> {
                self.inspect(key)
            }
            fn remove_key(&self, key: &[u8]) -> Result<bool, Error> {
                self.remove(key)
            }
            fn sweep(&self) -> Result<u64, Error> {
                self.sweep_now()
            }
            fn resolve_key(
                &self,
                key: &[u8],
                r: Resolution,
            ) -> Result<idemstore::RecordInfo, Error> {
                self.resolve(key, r)
            }
            fn export_to(&self, out: Box<dyn Write>, bar: &ProgressBar) -> Result<u64, Error> {
                self.export(out, |n| bar.set_position(n))
            }
            fn import_from(
                &self,
                input: Box<dyn std::io::BufRead>,
                bar: &ProgressBar,
            ) -> Result<idemstore::ImportSummary, Error> {
                self.import(input, |n| bar.set_position(n))
            }
        }
    };
}

admin_for!(Store);
admin_for!(PgStore);
