//! The store's tracing output never contains raw keys or payloads, only short key hashes.

mod common;

use common::{Scratch, ServiceError};
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
    tracing::subscriber::with_default(subscriber, || {
        let s = Scratch::new();
        let store = s.open();
        store
            .execute_once(key, || Ok::<_, ServiceError>(payload.to_string()))
            .unwrap();
        store
            .execute_once(key, || Ok::<_, ServiceError>(payload.to_string()))
            .unwrap();
        let _ = store
            .call(key)
            .fingerprint(idemstore::Fingerprint::of_bytes(b"other"))
            .run(|| Ok::<_, ServiceError>(payload.to_string()));
        let _ = store.execute_once("k2", || Err::<u8, _>(ServiceError::Declined));
    });
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains(&idemstore::key_hash(key)),
        "no key hash logged:\n{text}"
    );
    assert!(text.contains("running operation"), "{text}");
    assert!(!text.contains(key), "raw key logged:\n{text}");
    assert!(!text.contains(payload), "payload logged:\n{text}");
}
