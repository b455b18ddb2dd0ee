//! Arbitrary bytes read as a sequence of operations, run against a real store and the
//! reference model of the contract (the same driver as `tests/model.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/reference/mod.rs"]
mod reference;

fuzz_target!(|data: &[u8]| {
    reference::quiet_model_panics();
    let (immediate, ops) = reference::ops_from_bytes(data);
    reference::run(immediate, &ops);
});
