//! Idempotency keys as the store names them in errors and logs.
//!
//! Invariants: the store never writes a raw key into a log event or an error's `Display`;
//! both show [`key_hash`], a short blake3 digest, so logs can be correlated without leaking
//! customer identifiers. The raw bytes stay reachable through [`KeyName::as_bytes`].

use std::fmt;

/// A key carried by an error: displays as its short hash, holds the raw bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyName(Box<[u8]>);

impl KeyName {
    pub(crate) fn new(key: &[u8]) -> Self {
        Self(key.into())
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The short hash that `Display` and the store's tracing events show for this key.
    pub fn hash(&self) -> String {
        key_hash(&self.0)
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key#{}", KeyHash(&self.0))
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The short, stable hash of a key that idemstore's logs and error messages show in its
/// place: the first 8 bytes of its blake3 digest, as 16 hex digits.
///
/// ```
/// let h = idemstore::key_hash("order-7f3a");
/// assert_eq!(h.len(), 16);
/// assert_eq!(h, idemstore::key_hash(b"order-7f3a"));
/// ```
pub fn key_hash(key: impl AsRef<[u8]>) -> String {
    KeyHash(key.as_ref()).to_string()
}

/// Formats a key's short hash lazily: tracing evaluates it only when an event is enabled.
pub(crate) struct KeyHash<'a>(pub(crate) &'a [u8]);

impl fmt::Display for KeyHash<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digest = blake3::hash(self.0);
        for byte in &digest.as_bytes()[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}
