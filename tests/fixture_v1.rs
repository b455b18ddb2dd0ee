//! A store written by idemstore 0.1 (record and step format 1), checked in under
//! `tests/fixtures/v1`, must open and replay in every later version: results, a fingerprinted
//! record, a permanent error, a retryable record, and a multi-step operation whose recorded
//! step (format 1, no life) replays while its failed step runs again.
//!
//! The fixture was written with a manual clock at 1_780_000_000_000 ms and a 100-year TTL.

use idemstore::{Error, ExecuteError, Fingerprint, ManualClock, RecordState, StepError, Store};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::path::Path;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Receipt {
    id: String,
    cents: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum PayError {
    Declined(String),
    Timeout,
}

fn copy_fixture(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    std::fs::create_dir_all(to).unwrap();
    for file in ["conf", "db", "idemstore.format"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

fn never<T>() -> Result<T, std::io::Error> {
    panic!("a recorded outcome must replay, not run")
}

#[test]
fn a_version_1_store_opens_and_replays() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    copy_fixture(&path);
    let clock = ManualClock::new(1_780_000_000_000 + 3_600_000);
    for reopen in 0..2 {
        let store = Store::builder(&path)
            .clock(clock.clone())
            .sweep_interval(None)
            .open()
            .unwrap();
        assert_eq!(store.epoch(), 2 + reopen);
        let n = store.execute_once("number", never::<u64>).unwrap();
        assert_eq!((*n, n.is_replayed()), (42, true));
        let r = store.execute_once("receipt", never::<Receipt>).unwrap();
        assert_eq!(
            *r,
            Receipt {
                id: "ch_1".into(),
                cents: 4200
            }
        );
        let fp = Fingerprint::of(&("tok_visa", 4200u64)).unwrap();
        let paid = store
            .call("fingerprinted")
            .fingerprint(fp)
            .run(never::<String>)
            .unwrap();
        assert_eq!(*paid, "paid");
        let other = Fingerprint::of(&("tok_visa", 1u64)).unwrap();
        assert!(matches!(
            store
                .call("fingerprinted")
                .fingerprint(other)
                .run(never::<String>),
            Err(ExecuteError::Store(Error::FingerprintMismatch { .. }))
        ));
        let declined = store
            .call("declined")
            .permanent_if(|_: &PayError| true)
            .run(|| -> Result<u64, PayError> { panic!("replayed, not run") });
        match declined {
            Err(ExecuteError::Operation { error, replayed }) => {
                assert!(replayed);
                assert_eq!(error, PayError::Declined("insufficient funds".into()));
            }
            other => panic!("{other:?}"),
        }
        if reopen == 0 {
            // Retryable in format 1: runs again, and the new record is format 2.
            let retried = store
                .execute_once("retryable", || Ok::<_, std::io::Error>(7u64))
                .unwrap();
            assert_eq!((*retried, retried.record().attempts), (7, 2));
            // The recorded step of format 1 replays; the failed one runs.
            let (charges, confirms) = (Cell::new(0), Cell::new(0));
            let out = store
                .execute_steps("checkout", |ctx| {
                    let charge = ctx.step("charge", || {
                        charges.set(charges.get() + 1);
                        Ok::<_, std::io::Error>(String::from("ch_new"))
                    })?;
                    ctx.step("confirm", || {
                        confirms.set(confirms.get() + 1);
                        Ok::<_, std::io::Error>(())
                    })?;
                    Ok::<_, StepError<std::io::Error>>(charge)
                })
                .unwrap();
            assert_eq!(
                (out.as_str(), charges.get(), confirms.get()),
                ("ch_9", 0, 1)
            );
            assert_eq!(store.steps("checkout").unwrap().len(), 2);
        } else {
            let retried = store.execute_once("retryable", never::<u64>).unwrap();
            assert_eq!(*retried, 7);
            let out = store
                .execute_steps("checkout", |_| never::<String>())
                .unwrap();
            assert_eq!(*out, "ch_9");
        }
        assert_eq!(
            store.record("checkout").unwrap().unwrap().state,
            RecordState::Completed
        );
        store.close().unwrap();
    }
}
