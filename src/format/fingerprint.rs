//! Request fingerprints and keys derived from requests.
//!
//! Invariants: a fingerprint is a 32-byte blake3 digest; [`Fingerprint::of`] hashes the
//! value's canonical encoding ([`crate::format::walk::canonical`]: bincode 2's standard encoding with
//! every map's entries sorted), so equal values give equal fingerprints whatever the
//! iteration order of their maps. A `HashSet` serializes exactly like a `Vec` (serde cannot
//! tell them apart), so its order counts: use a `BTreeSet` or a sorted `Vec` in requests. Derived keys use blake3's key-derivation mode with a fixed
//! context, so they cannot collide with plain digests of the same bytes.

use serde::Serialize;
use std::fmt;

use crate::error::Error;

/// A blake3 digest of a request, stored with its key so a reuse of the key for a different
/// request is refused with [`Error::FingerprintMismatch`].
///
/// ```
/// use idemstore::Fingerprint;
/// #[derive(serde::Serialize)]
/// struct Charge { card: &'static str, cents: u64 }
/// let a = Fingerprint::of(&Charge { card: "tok_visa", cents: 4200 }).unwrap();
/// let b = Fingerprint::of(&Charge { card: "tok_visa", cents: 4300 }).unwrap();
/// assert_ne!(a, b);
/// assert_eq!(Fingerprint::of_bytes(b"body"), Fingerprint::of_bytes(b"body"));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The blake3 digest of `bytes` (for example a raw request body).
    pub fn of_bytes(bytes: impl AsRef<[u8]>) -> Self {
        Self(*blake3::hash(bytes.as_ref()).as_bytes())
    }

    /// The blake3 digest of `value`'s canonical encoding: its bincode encoding, with the
    /// entries of every map sorted, so two equal `HashMap`s give the same fingerprint.
    /// Sets serialize as sequences, so their order counts: use `BTreeSet` in requests.
    ///
    /// # Errors
    /// [`Error::Encode`] if `value`'s `Serialize` implementation fails or panics.
    pub fn of<S: Serialize + ?Sized>(value: &S) -> Result<Self, Error> {
        let mut hasher = blake3::Hasher::new();
        hash_value(&mut hasher, value)?;
        Ok(Self(*hasher.finalize().as_bytes()))
    }

    /// A fingerprint from a digest computed elsewhere.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint(")?;
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        write!(f, "…)")
    }
}

/// Derives a deterministic idempotency key from a namespace and a request value, for services
/// whose clients send no key of their own: `"{namespace}:{64 hex digits}"`.
///
/// Two requests get the same key exactly when they have the same namespace and the same
/// canonical encoding (see [`Fingerprint::of`]: maps in any order are equal).
///
/// ```
/// #[derive(serde::Serialize)]
/// struct Refund { order: u64, cents: u64 }
/// let k1 = idemstore::derive_key("refund", &Refund { order: 7, cents: 100 }).unwrap();
/// let k2 = idemstore::derive_key("refund", &Refund { order: 7, cents: 100 }).unwrap();
/// assert_eq!(k1, k2);
/// assert!(k1.starts_with("refund:"));
/// ```
///
/// # Errors
/// [`Error::Encode`] if `request`'s `Serialize` implementation fails or panics.
pub fn derive_key<S: Serialize + ?Sized>(namespace: &str, request: &S) -> Result<String, Error> {
    let mut hasher = blake3::Hasher::new_derive_key("idemstore 2026-11 derived request key v1");
    hasher.update(&(namespace.len() as u64).to_le_bytes());
    hasher.update(namespace.as_bytes());
    hash_value(&mut hasher, request)?;
    let mut key = String::with_capacity(namespace.len() + 65);
    key.push_str(namespace);
    key.push(':');
    key.push_str(hasher.finalize().to_hex().as_str());
    Ok(key)
}

fn hash_value<S: Serialize + ?Sized>(hasher: &mut blake3::Hasher, value: &S) -> Result<(), Error> {
    let encode_error = |message| Error::Encode {
        what: "fingerprinted request",
        message,
    };
    let bytes = crate::format::codec::catching(|| crate::format::walk::canonical(value))
        .map_err(encode_error)?
        .map_err(|e| encode_error(e.0))?;
    hasher.update(&bytes);
    Ok(())
}
