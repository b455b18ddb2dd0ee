//! Storing types bincode cannot replay (here `serde_json::Value`, as an HTTP handler would
//! store a response body): bincode refuses them on the first call, `Codec::Json` stores them.
//!
//! Run: `cargo run --example json_codec`

use idemstore::{Codec, Error, ExecuteError, Store};
use serde_json::json;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path().join("idem-db"))?;
    let body = || Ok::<_, std::io::Error>(json!({"order": 7, "status": "paid", "items": [1, 2]}));

    // bincode cannot decode a serde_json::Value: refused at once, with the fix in the message.
    match store.execute_once("bincode-key", body) {
        Err(ExecuteError::Store(Error::ResultNotEncodable { message, .. })) => {
            assert!(message.contains("Codec::Json"));
            println!("bincode: {message}");
        }
        other => panic!("unexpected: {other:?}"),
    }

    let first = store.call("json-key").codec(Codec::Json).run(body)?;
    let again = store.call("json-key").codec(Codec::Json).run(body)?;
    assert!(again.is_replayed());
    assert_eq!(*first, *again);
    println!("json: replayed {}", *again);
    Ok(())
}
