//! A checkout service's payment step, wrapped in idemstore.
//!
//! The "payment gateway" here is a ledger file outside the store (appended and fsynced per
//! charge), so the demo counts real charges, across threads and across a process that is
//! killed with SIGKILL in the middle of a charge.
//!
//! Every result is checked: a wrong one ends the demo with a message and a non-zero exit
//! (CI runs it).
//!
//! Run: `cargo run --example checkout`

use idemstore::{Error, ExecuteError, Fingerprint, OrphanPolicy, Store};
use serde::{Deserialize, Serialize};
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Receipt {
    charge_id: String,
    cents: u64,
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
enum PaymentError {
    #[error("card declined: {0}")]
    Declined(String),
    #[error("gateway timed out")]
    GatewayTimeout,
}

/// The simulated payment provider: one fsynced ledger line per charge.
struct Gateway {
    ledger: PathBuf,
    fail_next_with_timeout: AtomicU32,
}

impl Gateway {
    /// The gateway whose ledger lives in `dir` (shared by the demo and its worker process).
    fn in_dir(dir: &Path) -> Self {
        Self {
            ledger: dir.join("gateway-ledger.txt"),
            fail_next_with_timeout: AtomicU32::new(0),
        }
    }

    fn charge(&self, order: &str, card: &str, cents: u64) -> Result<Receipt, PaymentError> {
        if card == "tok_declined" {
            return Err(PaymentError::Declined("insufficient funds".into()));
        }
        if self.fail_next_with_timeout.load(Ordering::SeqCst) > 0 {
            self.fail_next_with_timeout.fetch_sub(1, Ordering::SeqCst);
            return Err(PaymentError::GatewayTimeout);
        }
        let charge_id = format!("ch_{}_{}", order, self.charges(order) + 1);
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.ledger)
            .expect("ledger");
        writeln!(f, "{order} {charge_id} {cents}").expect("ledger write");
        f.sync_all().expect("ledger sync");
        Ok(Receipt { charge_id, cents })
    }

    /// How many times `order` was charged, by the ledger.
    fn charges(&self, order: &str) -> usize {
        self.lookup(order).len()
    }

    fn lookup(&self, order: &str) -> Vec<Receipt> {
        let Ok(text) = std::fs::read_to_string(&self.ledger) else {
            return Vec::new();
        };
        text.lines()
            .filter_map(|l| {
                let mut p = l.split(' ');
                (p.next()? == order).then(|| Receipt {
                    charge_id: p.next().unwrap_or_default().to_string(),
                    cents: p.next().and_then(|c| c.parse().ok()).unwrap_or(0),
                })
            })
            .collect()
    }
}

#[derive(Serialize)]
struct ChargeRequest<'a> {
    card: &'a str,
    cents: u64,
}

/// The service's handler: what a POST /orders/{key}/pay would call.
fn pay(
    store: &Store,
    gateway: &Gateway,
    key: &str,
    card: &str,
    cents: u64,
) -> Result<idemstore::Outcome<Receipt>, ExecuteError<PaymentError>> {
    let fingerprint =
        Fingerprint::of(&ChargeRequest { card, cents }).map_err(ExecuteError::Store)?;
    store
        .call(key)
        .fingerprint(fingerprint)
        .permanent_if(|e: &PaymentError| matches!(e, PaymentError::Declined(_)))
        .run(|| gateway.charge(key, card, cents))
}

fn show(label: &str, r: &Result<idemstore::Outcome<Receipt>, ExecuteError<PaymentError>>) {
    match r {
        Ok(out) => println!(
            "  {label}: {} for {} cents (Idempotent-Replayed: {}, attempt {})",
            out.charge_id,
            out.cents,
            out.is_replayed(),
            out.record().attempts
        ),
        Err(ExecuteError::Operation { error, replayed }) => {
            println!("  {label}: payment error: {error} (Idempotent-Replayed: {replayed})")
        }
        Err(ExecuteError::Store(e)) => println!("  {label}: store error: {e}"),
    }
}

type DemoResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// Fails the demo with `what` unless `ok`: every wrong result ends it with a non-zero exit.
fn check(ok: bool, what: impl std::fmt::Display) -> DemoResult {
    if ok {
        Ok(())
    } else {
        Err(format!("wrong result: {what}").into())
    }
}

/// A fresh or replayed receipt from `r`, or the demo fails naming `label`.
fn receipt<'a>(
    label: &str,
    r: &'a Result<idemstore::Outcome<Receipt>, ExecuteError<PaymentError>>,
) -> DemoResult<&'a idemstore::Outcome<Receipt>> {
    r.as_ref()
        .map_err(|e| format!("wrong result: {label}: expected a receipt, got {e:?}").into())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("checkout demo FAILED: {e}");
        std::process::exit(1);
    }
}

fn run() -> DemoResult {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, dir] = args.as_slice() {
        if flag == "--worker" {
            return worker(Path::new(dir));
        }
    }
    let dir = tempfile::tempdir()?;
    let gateway = Gateway::in_dir(dir.path());
    let store = Store::open(dir.path().join("idem-db"))?;
    println!(
        "idemstore checkout demo (store in {})",
        dir.path().display()
    );

    println!("\n1. A client pays for order-7f3a, times out, and retries with the same key");
    let first = pay(&store, &gateway, "order-7f3a", "tok_visa", 4200);
    show("first call", &first);
    let retry = pay(&store, &gateway, "order-7f3a", "tok_visa", 4200);
    show("retry     ", &retry);
    let (first, retry) = (receipt("first call", &first)?, receipt("retry", &retry)?);
    check(!first.is_replayed(), "the first call was replayed")?;
    check(retry.is_replayed(), "the retry was not replayed")?;
    check(
        retry.charge_id == first.charge_id,
        "the retry got another receipt",
    )?;
    let charges = gateway.charges("order-7f3a");
    println!("  gateway charged order-7f3a {charges} time(s)");
    check(charges == 1, format!("order-7f3a charged {charges} times"))?;

    println!("\n2. The same key reused for a different amount is refused");
    match pay(&store, &gateway, "order-7f3a", "tok_visa", 9900) {
        Err(ExecuteError::Store(e @ Error::FingerprintMismatch { .. })) => {
            println!("  refused: {e}")
        }
        other => check(
            false,
            format!("expected a fingerprint mismatch, got {other:?}"),
        )?,
    }

    println!("\n3. Eight retries of order-91b2 arrive at once, on eight threads");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| s.spawn(|| pay(&store, &gateway, "order-91b2", "tok_visa", 1500)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("payment thread"))
            .collect()
    });
    let mut receipts = Vec::new();
    for (i, r) in results.iter().enumerate() {
        receipts.push(receipt(&format!("caller {i}"), r)?);
    }
    let replays = receipts.iter().filter(|r| r.is_replayed()).count();
    let charges = gateway.charges("order-91b2");
    println!(
        "  gateway charged order-91b2 {charges} time(s); {replays} of 8 callers got the replayed receipt"
    );
    check(charges == 1, format!("order-91b2 charged {charges} times"))?;
    check(
        replays == 7,
        format!("{replays} of 8 callers replayed, not 7"),
    )?;
    check(
        receipts
            .iter()
            .all(|r| r.charge_id == receipts[0].charge_id),
        "callers of order-91b2 got different receipts",
    )?;

    println!("\n4. A declined card is a permanent error: recorded, and replayed on retry");
    for (label, replayed) in [("first call", false), ("retry     ", true)] {
        let r = pay(&store, &gateway, "order-dec1", "tok_declined", 700);
        show(label, &r);
        check(
            matches!(
                &r,
                Err(ExecuteError::Operation { error: PaymentError::Declined(_), replayed: r })
                    if *r == replayed
            ),
            format!(
                "{}: expected the decline (replayed: {replayed}), got {r:?}",
                label.trim()
            ),
        )?;
    }
    check(
        gateway.charges("order-dec1") == 0,
        "a declined card was charged",
    )?;

    println!("\n5. A gateway timeout is retryable: the retry calls the gateway again");
    gateway.fail_next_with_timeout.store(1, Ordering::SeqCst);
    let first = pay(&store, &gateway, "order-tmo1", "tok_visa", 2500);
    show("first call", &first);
    check(
        matches!(
            first,
            Err(ExecuteError::Operation {
                error: PaymentError::GatewayTimeout,
                replayed: false
            })
        ),
        format!("expected the timeout, got {first:?}"),
    )?;
    let retry = pay(&store, &gateway, "order-tmo1", "tok_visa", 2500);
    show("retry     ", &retry);
    let retry = receipt("retry after the timeout", &retry)?;
    check(
        !retry.is_replayed() && retry.record().attempts == 2,
        "the retry after a timeout was not a second attempt",
    )?;
    let charges = gateway.charges("order-tmo1");
    println!("  gateway charged order-tmo1 {charges} time(s)");
    check(charges == 1, format!("order-tmo1 charged {charges} times"))?;

    println!("\n6. A worker process is killed (SIGKILL) after the gateway charged, before the outcome was recorded");
    store.close()?;
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--worker")
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let mut charged = false;
    while let Some(line) = lines.next().transpose()? {
        if line == "CHARGED" {
            charged = true;
            break;
        }
    }
    child.kill()?;
    let status = child.wait()?;
    check(charged, format!("the worker never charged ({status})"))?;
    check(
        status.signal() == Some(9),
        format!("the worker was not killed by SIGKILL: {status}"),
    )?;
    let charges = gateway.charges("order-c0de");
    println!("  worker killed; gateway shows {charges} charge(s) for order-c0de");
    check(charges == 1, format!("order-c0de charged {charges} times"))?;

    let store = Store::builder(dir.path().join("idem-db"))
        .orphan_policy(OrphanPolicy::Report)
        .open()?;
    let info = store.record("order-c0de")?.ok_or("record missing")?;
    println!(
        "  after restart the record is {:?} (attempt {}, claimed in epoch {}; this is epoch {})",
        info.state,
        info.attempts,
        info.claim.epoch,
        store.epoch()
    );
    check(
        info.state == idemstore::RecordState::Pending
            && info.attempts == 1
            && info.claim.epoch < store.epoch(),
        "the killed worker's claim is not an orphan of an earlier epoch",
    )?;
    match pay(&store, &gateway, "order-c0de", "tok_visa", 3100) {
        Err(ExecuteError::Store(e @ Error::Interrupted { .. })) => println!("  retry refused: {e}"),
        other => check(false, format!("expected Interrupted, got {other:?}"))?,
    }
    // Reconcile: ask the gateway instead of charging again, and record what it says.
    let reconciled = store
        .call("order-c0de")
        .orphan_policy(OrphanPolicy::Rerun)
        .run(|| match gateway.lookup("order-c0de").pop() {
            Some(receipt) => Ok(receipt),
            None => gateway.charge("order-c0de", "tok_visa", 3100),
        });
    show("reconciled", &reconciled);
    let retry = pay(&store, &gateway, "order-c0de", "tok_visa", 3100);
    show("retry     ", &retry);
    let (reconciled, retry) = (
        receipt("reconciled", &reconciled)?,
        receipt("retry after reconciling", &retry)?,
    );
    check(
        reconciled.charge_id == "ch_order-c0de_1",
        format!(
            "reconciled to {}, not the worker's charge",
            reconciled.charge_id
        ),
    )?;
    check(
        retry.is_replayed() && retry.charge_id == reconciled.charge_id,
        "the retry after reconciling did not replay the reconciled receipt",
    )?;
    let charges = gateway.charges("order-c0de");
    println!("  gateway charged order-c0de {charges} time(s)");
    check(charges == 1, format!("order-c0de charged {charges} times"))?;

    println!("\n7. A checkout in two steps: the charge succeeds, the confirmation mail fails");
    let mail_up = AtomicU32::new(0);
    let mails = AtomicU32::new(0);
    let checkout = || {
        store.execute_steps("checkout-91", |ctx| {
            // The provider's own Idempotency-Key: the same on every attempt of this checkout.
            let provider_key = ctx.downstream_key("charge");
            let charge = ctx.step("charge", || gateway.charge("checkout-91", "tok_visa", 4200))?;
            ctx.step("confirm", || {
                mails.fetch_add(1, Ordering::SeqCst);
                if mail_up.load(Ordering::SeqCst) == 1 {
                    Ok(())
                } else {
                    Err(PaymentError::GatewayTimeout)
                }
            })?;
            println!(
                "  attempt {} (claim token {}) confirmed {} (provider key {}…)",
                ctx.attempt(),
                ctx.claim_token().as_u128(),
                charge.charge_id,
                &provider_key[..12]
            );
            Ok::<_, idemstore::StepError<PaymentError>>(charge)
        })
    };
    match checkout() {
        Err(
            e @ ExecuteError::Operation {
                error: idemstore::StepError::Failed(PaymentError::GatewayTimeout),
                replayed: false,
            },
        ) => println!("  first call: {e} (the charge step is recorded)"),
        other => check(false, format!("expected the mail to fail, got {other:?}"))?,
    }
    mail_up.store(1, Ordering::SeqCst);
    let confirmed = checkout()?;
    let (charges, mails) = (gateway.charges("checkout-91"), mails.load(Ordering::SeqCst));
    println!(
        "  retry: {} — gateway charged checkout-91 {charges} time(s), {mails} confirmation attempts",
        confirmed.charge_id,
    );
    check(
        confirmed.charge_id == "ch_checkout-91_1" && confirmed.record().attempts == 2,
        format!(
            "the retry returned {} on attempt {}",
            confirmed.charge_id,
            confirmed.record().attempts
        ),
    )?;
    check(charges == 1, format!("checkout-91 charged {charges} times"))?;
    check(mails == 2, format!("{mails} confirmation attempts, not 2"))?;
    let steps: Vec<String> = store
        .steps("checkout-91")?
        .into_iter()
        .map(|s| s.name)
        .collect();
    println!("  recorded steps: {steps:?}");
    check(steps == ["charge", "confirm"], "the recorded steps")?;

    let stats = store.stats();
    println!(
        "\nafter restart: {} executions, {} replays, {} interrupted runs reported",
        stats.executions, stats.replays, stats.orphans_reported
    );
    check(
        stats.orphans_reported == 1,
        "the killed worker's run was not reported once",
    )?;
    println!("\nevery result as expected");
    Ok(())
}

/// The killed worker: charges order-c0de, then hangs before its outcome can be recorded.
fn worker(dir: &Path) -> DemoResult {
    let gateway = Gateway::in_dir(dir);
    // Payments are reconciled after a crash, so this store reports interrupted runs: under
    // Report a claim is durable before the charge runs (under Rerun a crash may take it, and
    // the next call would simply charge again).
    let store = Store::builder(dir.join("idem-db"))
        .orphan_policy(OrphanPolicy::Report)
        .open()?;
    let _ = store.execute_once("order-c0de", || {
        let receipt = gateway.charge("order-c0de", "tok_visa", 3100);
        println!("CHARGED");
        std::io::stdout().flush().ok();
        std::thread::sleep(Duration::from_secs(3600));
        receipt
    });
    Ok(())
}
