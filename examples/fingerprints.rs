//! Request fingerprints and permanent errors: a key reused for a different request is
//! refused, and a declined card is recorded and replayed instead of charged again.
//!
//! Run: `cargo run --example fingerprints`

use idemstore::{Error, ExecuteError, Fingerprint, Store};
use serde::{Deserialize, Serialize};

#[derive(Serialize)]
struct ChargeRequest<'a> {
    card: &'a str,
    cents: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
enum PayError {
    #[error("card declined")]
    Declined,
    #[error("gateway timeout")]
    Timeout,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("idem-db"))?;
    let pay = |request: &ChargeRequest| -> Result<_, Box<dyn std::error::Error>> {
        Ok(store
            .call("pay-1")
            .fingerprint(Fingerprint::of(request)?)
            .permanent_if(|e: &PayError| *e == PayError::Declined)
            .run(|| Err::<String, _>(PayError::Declined)))
    };

    let request = ChargeRequest {
        card: "tok_visa",
        cents: 4200,
    };
    match pay(&request)? {
        Err(ExecuteError::Operation {
            error,
            replayed: false,
        }) => assert_eq!(error, PayError::Declined),
        other => panic!("unexpected: {other:?}"),
    }
    // The same request again: the decline is replayed, the card is not charged.
    match pay(&request)? {
        Err(ExecuteError::Operation { replayed: true, .. }) => println!("decline replayed"),
        other => panic!("unexpected: {other:?}"),
    }
    // The same key with another amount: refused, nothing runs.
    let other = ChargeRequest {
        card: "tok_visa",
        cents: 1,
    };
    match pay(&other)? {
        Err(ExecuteError::Store(Error::FingerprintMismatch { .. })) => println!("reuse refused"),
        other => panic!("unexpected: {other:?}"),
    }
    Ok(())
}
