//! The `Signed<T>` envelope: document body bytes plus detached, domain-separated signatures.
//!
//! Invariants (design §5, docs/protocol/80-directory.md):
//! - The envelope is postcard `{ body: Vec<u8>, sigs: Vec<SigEntry> }`; the size cap of the document type
//!   is checked before anything is parsed, and at most [`MAX_SIGS`] signatures are accepted.
//! - Signatures cover `DOMAIN || 0x00 || body` over the **received** body bytes; the body is decoded
//!   only by code that has checked a signature first (or by a `dangerously_*` bypass).
//! - Envelope and body must re-encode to exactly the received bytes (one valid byte form).

use std::fmt;
use std::marker::PhantomData;

use allium_crypto::{IdentityKeypair, RelayId};
use serde::de::{DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

use crate::err::{DirError, Result};

/// At most this many signatures on one document.
pub const MAX_SIGS: usize = 16;

/// A 64-byte Ed25519 signature, encoded as 64 raw bytes (a postcard tuple).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig64(pub [u8; 64]);

impl fmt::Debug for Sig64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Sig64({}..)",
            hex::encode(self.0.get(..8).unwrap_or_default())
        )
    }
}

impl Serialize for Sig64 {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple as _;
        let mut t = s.serialize_tuple(64)?;
        for b in &self.0 {
            t.serialize_element(b)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for Sig64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Sig64;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Sig64, A::Error> {
                let mut out = [0u8; 64];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(Sig64(out))
            }
        }
        d.deserialize_tuple(64, V)
    }
}

/// One signature in an envelope: who signed (the public key that made it) and the signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigEntry {
    /// The Ed25519 public key that made the signature (a relay identity, an authority identity,
    /// or an authority's online signing key, depending on the document).
    pub signer: RelayId,
    /// The signature over `DOMAIN || 0x00 || body`.
    pub sig: Sig64,
}

/// A document type that travels in a [`Signed`] envelope.
pub trait Document: Serialize + DeserializeOwned {
    /// The signature domain (`allium/v1/...`).
    const DOMAIN: &'static str;
    /// The cap on the whole envelope, checked before parsing.
    const MAX_LEN: usize;
    /// The name used in errors.
    const NAME: &'static str;
    /// Checks on the decoded body that do not need keys or time (version, bounds, ordering).
    fn check_body(&self) -> Result<()>;
}

#[derive(Serialize, Deserialize)]
struct RawSigned {
    body: Vec<u8>,
    sigs: Vec<SigEntry>,
}

/// [`RawSigned`] borrowed, for encoding without copying the body (same bytes: both fields
/// serialize as sequences).
#[derive(Serialize)]
struct RawSignedRef<'a> {
    body: &'a [u8],
    sigs: &'a [SigEntry],
}

/// A parsed but not yet verified document: body bytes and signatures.
///
/// This is the *unverified* state of every document; the `verify` methods on the concrete
/// types (`Signed<RelayDescriptor>::verify`, ...) turn it into a verified value.
pub struct Signed<T> {
    body: Vec<u8>,
    sigs: Vec<SigEntry>,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            body: self.body.clone(),
            sigs: self.sigs.clone(),
            _t: PhantomData,
        }
    }
}

impl<T: Document> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("type", &T::NAME)
            .field("body_len", &self.body.len())
            .field("sigs", &self.sigs.len())
            .finish()
    }
}

/// An upper bound on the envelope length for a body of `body_len` bytes and `nsigs` signatures
/// (two varints of at most 5 bytes, 96 bytes per signature).
fn envelope_len(body_len: usize, nsigs: usize) -> usize {
    body_len + 10 + 96 * nsigs
}

/// SHA-256 of some bytes.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Encode a value with postcard (infallible for our document types).
pub(crate) fn encode<V: Serialize>(v: &V, object: &'static str) -> Result<Vec<u8>> {
    postcard::to_allocvec(v).map_err(|_| DirError::Malformed {
        object,
        why: "cannot encode",
    })
}

/// Decode postcard bytes that must be in canonical form and fully consumed.
pub(crate) fn decode_canonical<V: Serialize + DeserializeOwned>(
    bytes: &[u8],
    object: &'static str,
) -> Result<V> {
    let v: V = postcard::from_bytes(bytes).map_err(|_| DirError::Malformed {
        object,
        why: "does not decode",
    })?;
    let again = encode(&v, object)?;
    if again != bytes {
        return Err(DirError::Malformed {
            object,
            why: "not in canonical form (trailing or overlong bytes)",
        });
    }
    Ok(v)
}

impl<T: Document> Signed<T> {
    /// Encode `doc` and sign it with `key` under `T::DOMAIN`.
    pub fn sign(doc: &T, key: &IdentityKeypair) -> Result<Self> {
        doc.check_body()?;
        let body = encode(doc, T::NAME)?;
        if envelope_len(body.len(), 1) > T::MAX_LEN {
            return Err(DirError::TooLarge {
                object: T::NAME,
                len: body.len(),
                max: T::MAX_LEN,
            });
        }
        let mut s = Self {
            body,
            sigs: Vec::new(),
            _t: PhantomData,
        };
        s.add_own_signature(key);
        Ok(s)
    }

    /// An envelope around already-encoded body bytes, without signatures yet.
    pub fn from_body_unsigned(body: Vec<u8>) -> Self {
        Self {
            body,
            sigs: Vec::new(),
            _t: PhantomData,
        }
    }

    /// Sign the body with `key` and add (or replace) its signature.
    pub fn add_own_signature(&mut self, key: &IdentityKeypair) {
        let entry = SigEntry {
            signer: key.public(),
            sig: Sig64(key.sign(T::DOMAIN, &self.body)),
        };
        self.sigs.retain(|s| s.signer != entry.signer);
        self.sigs.push(entry);
        self.sigs.sort_by_key(|s| s.signer);
    }

    /// Add a detached signature after checking it over this body. Returns false (and adds
    /// nothing) if it does not verify or if the envelope is full.
    pub fn add_detached_signature(&mut self, entry: SigEntry) -> bool {
        if entry
            .signer
            .verify(T::DOMAIN, &self.body, &entry.sig.0)
            .is_err()
        {
            return false;
        }
        if self.sigs.iter().any(|s| s.signer == entry.signer) {
            return true;
        }
        if self.sigs.len() >= MAX_SIGS
            || envelope_len(self.body.len(), self.sigs.len() + 1) > T::MAX_LEN
        {
            return false;
        }
        self.sigs.push(entry);
        self.sigs.sort_by_key(|s| s.signer);
        true
    }

    /// Parse an envelope: size cap first, then the envelope, then the canonical-form check.
    /// The body is not decoded.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > T::MAX_LEN {
            return Err(DirError::TooLarge {
                object: T::NAME,
                len: bytes.len(),
                max: T::MAX_LEN,
            });
        }
        let raw: RawSigned = decode_canonical(bytes, T::NAME)?;
        if raw.sigs.len() > MAX_SIGS {
            return Err(DirError::Malformed {
                object: T::NAME,
                why: "too many signatures",
            });
        }
        if !raw
            .sigs
            .windows(2)
            .all(|w| matches!(w, [a, b] if a.signer < b.signer))
        {
            return Err(DirError::Malformed {
                object: T::NAME,
                why: "signatures must be sorted by signer, one per key",
            });
        }
        Ok(Self {
            body: raw.body,
            sigs: raw.sigs,
            _t: PhantomData,
        })
    }

    /// The envelope's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let raw = RawSignedRef {
            body: &self.body,
            sigs: &self.sigs,
        };
        postcard::to_allocvec(&raw).unwrap_or_default()
    }

    /// The body bytes (what signatures cover).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The signatures.
    pub fn sigs(&self) -> &[SigEntry] {
        &self.sigs
    }

    /// SHA-256 of the body bytes: the document's digest.
    pub fn digest(&self) -> [u8; 32] {
        sha256(&self.body)
    }

    /// Whether `signer` made a valid signature on this body under `T::DOMAIN`.
    pub fn has_valid_sig_by(&self, signer: &RelayId) -> bool {
        self.sigs.iter().any(|s| {
            s.signer.ct_eq(signer) && signer.verify(T::DOMAIN, &self.body, &s.sig.0).is_ok()
        })
    }

    /// Decode the body after a signature has been checked (crate-internal).
    pub(crate) fn decode_checked_body(&self) -> Result<T> {
        let doc: T = decode_canonical(&self.body, T::NAME)?;
        doc.check_body()?;
        Ok(doc)
    }

    /// Decode the body **without checking any signature**. For display and debugging only;
    /// nothing decoded this way may be trusted.
    pub fn dangerously_decode_unverified(&self) -> Result<T> {
        self.decode_checked_body()
    }
}
