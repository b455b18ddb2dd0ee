//! Arbitrary bytes decoded as a stored record: an error or a valid record, never a panic,
//! never an allocation beyond the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(info) = idemstore::__decode_record(data) {
        // A valid record's outcome lies inside the bytes it came from.
        assert!(info.outcome_bytes <= data.len());
    }
});
