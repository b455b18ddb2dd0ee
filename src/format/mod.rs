//! Bytes: the stored forms of records and steps, the codecs of outcomes, the serde walk behind
//! shapes and canonical fingerprints, and how unstorable outcomes are noted. No I/O.

pub(crate) mod borrowing;
pub(crate) mod codec;
pub(crate) mod fingerprint;
pub(crate) mod record;
pub(crate) mod step;
pub(crate) mod unstorable;
pub(crate) mod walk;
