//! A multi-step operation: the charge succeeds, the confirmation fails, and the retry sends
//! only the confirmation, returning the original charge.
//!
//! Run: `cargo run --example steps`

use idemstore::{StepError, Store};
use std::cell::Cell;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("idem-db"))?;
    let (charges, mails) = (Cell::new(0), Cell::new(0));
    let mail_server_up = Cell::new(false);

    let checkout = || {
        store.execute_steps("checkout-91", |ctx| {
            let charge = ctx.step("charge", || {
                charges.set(charges.get() + 1);
                Ok::<_, std::io::Error>(format!("ch_{}", charges.get()))
            })?;
            ctx.step("confirm", || {
                mails.set(mails.get() + 1);
                match mail_server_up.get() {
                    true => Ok(()),
                    false => Err(std::io::Error::other("smtp down")),
                }
            })?;
            Ok::<_, StepError<std::io::Error>>(charge)
        })
    };

    let failed = checkout();
    assert!(
        failed.is_err(),
        "the confirmation failed: a retryable error"
    );
    println!("first attempt: {}", failed.unwrap_err());

    mail_server_up.set(true);
    let receipt = checkout()?;
    assert_eq!(*receipt, "ch_1", "the retry returns the recorded charge");
    assert_eq!(
        (charges.get(), mails.get()),
        (1, 2),
        "charged once, mailed twice"
    );
    let steps = store.steps("checkout-91")?;
    assert_eq!(steps.len(), 2);
    println!(
        "retry: charged {} time(s), receipt {}",
        charges.get(),
        *receipt
    );
    Ok(())
}
