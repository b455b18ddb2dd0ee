//! The store's tracing output never contains raw keys, payloads or error details, only short
//! key hashes: on a fresh run, a replay, a fingerprint mismatch and a retryable failure.

mod common;

use common::{Scratch, ServiceError};
use idemstore::{Error, ExecuteError};
use std::io::Write;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn events_show_key_hashes_never_raw_keys_or_payloads() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let key = "customer-4111111111111111";
    let payload = "SECRET-PAYLOAD-VALUE";
    let retried_key = "customer-5500000000000004";
    let error_detail = "SECRET-ERROR-DETAIL";
    tracing::subscriber::with_default(subscriber, || {
        let s = Scratch::new();
        let store = s.open();
        // Recorded with the request's fingerprint, so that another request is refused.
        let request = idemstore::Fingerprint::of_bytes(b"request");
        for replayed in [false, true] {
            let out = store
                .call(key)
                .fingerprint(request)
                .run(|| Ok::<_, ServiceError>(payload.to_string()))
                .unwrap();
            assert_eq!(out.is_replayed(), replayed);
        }
        let mismatch = store
            .call(key)
            .fingerprint(idemstore::Fingerprint::of_bytes(b"other"))
            .run(|| Ok::<_, ServiceError>(payload.to_string()));
        assert!(
            matches!(
                mismatch,
                Err(ExecuteError::Store(Error::FingerprintMismatch { .. }))
            ),
            "{mismatch:?}"
        );
        let retryable = store.execute_once(retried_key, || {
            Err::<u8, _>(ServiceError::Io(std::io::Error::other(error_detail)))
        });
        assert!(
            matches!(
                retryable,
                Err(ExecuteError::Operation {
                    error: ServiceError::Io(_),
                    replayed: false
                })
            ),
            "{retryable:?}"
        );
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains(&idemstore::key_hash(key)),
        "no key hash logged:\n{text}"
    );
    assert!(text.contains("running operation"), "{text}");
    // The mismatch and the retryable failure were logged too, by key hash.
    assert!(text.contains("fingerprint mismatch"), "{text}");
    assert!(
        text.contains(&idemstore::key_hash(retried_key)),
        "the retryable run was not logged:\n{text}"
    );
    for secret in [key, retried_key, payload, error_detail] {
        assert!(!text.contains(secret), "{secret} logged:\n{text}");
    }
}
