//! Onion-service descriptors: an outer signed layer, a "superencrypted" middle layer and an
//! "encrypted" inner layer (rend-spec-v3 §2.5's structure; Allium's postcard encoding).
//!
//! ```text
//! envelope  = postcard { body: bytes, sig: Sig64 }        sig by the descriptor-signing key over
//!                                                         "allium/v1/hs-desc" | 0x00 | body
//! body      = postcard { version u16 (=1), lifetime_minutes u16, revision u64, blinded_key [32],
//!                        cert: { signing_key [32], expires u64, sig: Sig64 }, superencrypted: bytes }
//!             cert.sig by the blinded key over
//!             "allium/v1/hs-desc-signing-cert" | 0x00 | signing_key | u64be(expires) | blinded_key
//! superencrypted = layer(Super, padded(postcard { version u16, auth_ephemeral [32],
//!                        auth_clients: [AuthClientEntry], encrypted: bytes }))
//! encrypted      = layer(Inner, cookie if client auth, padded(postcard { version u16,
//!                        intro_points: [IntroPointInfo], pow: Option<PowParams> }))
//! padded(p) = u32be(len p) | p | 0x00 … to a multiple of 1024 bytes
//! ```
//!
//! `layer` is [`allium_crypto::hs::subcred::encrypt_layer`]. The client list always has a multiple of
//! 16 entries (fake ones fill it), and a descriptor without client authorization carries 16 fakes and
//! a random ephemeral key, so an HSDir cannot tell whether a service uses it or for how many clients.
//!
//! Verify before trust: [`UncheckedHsDesc::parse`] only bounds and decodes;
//! [`UncheckedHsDesc::check`] verifies the certificate (by the blinded key in the body, or by the
//! blinded key the caller expects) and the signature; only a [`VerifiedHsDesc`] can be decrypted.

use std::net::SocketAddr;

use allium_crypto::hs::subcred::{
    AuthClientEntry, DescLayer, decrypt_layer, encrypt_layer, open_client_entry,
};
use allium_crypto::hs::{BlindedKeypair, BlindedPublicKey, DescCookie, Subcredential};
use allium_crypto::{IdentityKeypair, RelayId, X25519Public, X25519Secret};
use serde::{Deserialize, Serialize};

use crate::doc::Sig64;
use crate::doc::signed::{decode_canonical, encode};
use crate::err::{DirError, Result};

/// Signature domain of the descriptor envelope.
pub const DOMAIN_HS_DESC: &str = "allium/v1/hs-desc";
/// Signature domain of the descriptor-signing-key certificate.
pub const DOMAIN_HS_SIGNING_CERT: &str = "allium/v1/hs-desc-signing-cert";
/// Descriptor format version (outer body and both layers).
pub const HS_DESC_VERSION: u16 = 1;
/// Largest encoded descriptor accepted (checked before parsing).
pub const MAX_HS_DESC_LEN: usize = 24 * 1024;
/// Most introduction points in one descriptor.
pub const MAX_INTRO_POINTS: usize = 20;
/// Most client-authorization entries (real and fake).
pub const MAX_AUTH_CLIENTS: usize = 128;
/// The client list is padded to a multiple of this.
pub const AUTH_CLIENT_BLOCK: usize = 16;
/// Layer plaintexts are padded to a multiple of this many bytes.
pub const LAYER_PAD: usize = 1024;
/// Longest descriptor lifetime (Tor's bound: 12 hours).
pub const MAX_LIFETIME_MINUTES: u16 = 720;
/// Shortest descriptor lifetime.
pub const MIN_LIFETIME_MINUTES: u16 = 5;

const OBJ: &str = "onion-service descriptor";

/// How to reach one introduction point, and the keys a client uses with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntroPointInfo {
    /// The relay's Ed25519 identity.
    pub relay_id: RelayId,
    /// Its x25519 link key (Noise static).
    pub link_key: X25519Public,
    /// Its x25519 onion key (the client extends a circuit to it with the circuit handshake).
    pub onion_key: X25519Public,
    /// Its link addresses (1 or 2).
    pub addrs: Vec<SocketAddr>,
    /// The intro point's auth key (Ed25519 public; ESTABLISH_INTRO and INTRODUCE1 name it).
    pub auth_key: RelayId,
    /// The service's x25519 encryption key for INTRODUCE at this intro point (`B`).
    pub enc_key: X25519Public,
}

/// Proof-of-work parameters the service asks clients to meet (issue 13, Tor proposal 327's idea).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PowParams {
    /// Which puzzle (an open code the cell layer defines).
    pub scheme: u8,
    /// The puzzle seed.
    pub seed: [u8; 32],
    /// The effort the service suggests.
    pub suggested_effort: u32,
    /// Unix time after which the seed is no longer accepted.
    pub expires: u64,
}

/// The decrypted contents of a descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HsDescContents {
    /// Format version, [`HS_DESC_VERSION`].
    pub version: u16,
    /// The introduction points (1 to [`MAX_INTRO_POINTS`]).
    pub intro_points: Vec<IntroPointInfo>,
    /// Proof-of-work parameters, when the service asks for them.
    pub pow: Option<PowParams>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SuperBody {
    version: u16,
    auth_ephemeral: X25519Public,
    auth_clients: Vec<AuthClientEntry>,
    encrypted: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SigningCert {
    signing_key: RelayId,
    expires: u64,
    sig: Sig64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct OuterBody {
    version: u16,
    lifetime_minutes: u16,
    revision: u64,
    blinded_key: BlindedPublicKey,
    cert: SigningCert,
    superencrypted: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Envelope {
    body: Vec<u8>,
    sig: Sig64,
}

fn cert_message(signing_key: &RelayId, expires: u64, blinded: &BlindedPublicKey) -> [u8; 72] {
    let mut m = [0u8; 72];
    m[..32].copy_from_slice(&signing_key.0);
    m[32..40].copy_from_slice(&expires.to_be_bytes());
    m[40..].copy_from_slice(&blinded.0);
    m
}

fn pad(plain: &[u8]) -> Result<Vec<u8>> {
    let len = u32::try_from(plain.len()).map_err(|_| DirError::TooLarge {
        object: OBJ,
        len: plain.len(),
        max: MAX_HS_DESC_LEN,
    })?;
    let total = (4 + plain.len()).div_ceil(LAYER_PAD) * LAYER_PAD;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(plain);
    out.resize(total, 0);
    Ok(out)
}

fn unpad(padded: &[u8]) -> Result<&[u8]> {
    let bad = |why| DirError::Malformed { object: OBJ, why };
    let (len, rest) = padded.split_at_checked(4).ok_or(bad("layer too short"))?;
    let len: [u8; 4] = len.try_into().map_err(|_| bad("layer too short"))?;
    let len = u32::from_be_bytes(len) as usize;
    let (plain, zeros) = rest
        .split_at_checked(len)
        .ok_or(bad("layer length exceeds the layer"))?;
    if !padded.len().is_multiple_of(LAYER_PAD) || zeros.iter().any(|&b| b != 0) {
        return Err(bad(
            "layer padding is not zeros to a multiple of 1024 bytes",
        ));
    }
    Ok(plain)
}

/// Everything a service needs to build one descriptor.
pub struct HsDescBuilder<'a> {
    /// The blinded key of the descriptor's period.
    pub blinded: &'a BlindedKeypair,
    /// The descriptor-signing key (a fresh Ed25519 key, certified by the blinded key).
    pub signing_key: &'a IdentityKeypair,
    /// The subcredential of the same period.
    pub subcredential: &'a Subcredential,
    /// Revision counter: must grow with every new descriptor of the same blinded key.
    pub revision: u64,
    /// How long HSDirs keep it, in minutes.
    pub lifetime_minutes: u16,
    /// Unix time at which the signing-key certificate expires.
    pub cert_expires: u64,
    /// Introduction points and proof-of-work parameters.
    pub contents: &'a HsDescContents,
    /// Authorised clients' x25519 keys (empty: no client authorization).
    pub auth_clients: &'a [X25519Public],
}

impl HsDescBuilder<'_> {
    /// Encode, encrypt and sign the descriptor.
    pub fn build(&self) -> Result<Vec<u8>> {
        check_contents(&self.contents.intro_points, &self.contents.pow)?;
        check_lifetime(self.lifetime_minutes)?;
        let blinded = self.blinded.public();
        let n_real = self.auth_clients.len();
        let n_total = n_real.max(1).div_ceil(AUTH_CLIENT_BLOCK) * AUTH_CLIENT_BLOCK;
        if n_total > MAX_AUTH_CLIENTS {
            return Err(DirError::Invalid {
                object: OBJ,
                why: format!("at most {MAX_AUTH_CLIENTS} authorised clients, got {n_real}"),
            });
        }
        let eph = X25519Secret::generate();
        let cookie = (n_real > 0).then(DescCookie::generate);
        let mut clients = Vec::with_capacity(n_total);
        if let Some(cookie) = &cookie {
            for c in self.auth_clients {
                clients.push(
                    AuthClientEntry::for_client(self.subcredential, &eph, c, cookie).map_err(
                        |_| DirError::Invalid {
                            object: OBJ,
                            why: "an authorised client key is a low-order point".into(),
                        },
                    )?,
                );
            }
        }
        clients.resize_with(n_total, AuthClientEntry::fake);
        // Real and fake entries in an order that does not depend on which are real.
        clients.sort_by_key(|e| e.client_id);

        let crypt = |layer, cookie: Option<&DescCookie>, plain: &[u8]| {
            encrypt_layer(
                layer,
                &blinded,
                self.subcredential,
                self.revision,
                cookie,
                &pad(plain)?,
            )
            .map_err(|_| DirError::Malformed {
                object: OBJ,
                why: "cannot encrypt",
            })
        };
        let inner = crypt(
            DescLayer::Inner,
            cookie.as_ref(),
            &encode(self.contents, OBJ)?,
        )?;
        let sup = SuperBody {
            version: HS_DESC_VERSION,
            auth_ephemeral: eph.public(),
            auth_clients: clients,
            encrypted: inner,
        };
        let superencrypted = crypt(DescLayer::Super, None, &encode(&sup, OBJ)?)?;
        let signing_key = self.signing_key.public();
        let cert_sig = self.blinded.sign(
            DOMAIN_HS_SIGNING_CERT,
            &cert_message(&signing_key, self.cert_expires, &blinded),
        );
        let body = OuterBody {
            version: HS_DESC_VERSION,
            lifetime_minutes: self.lifetime_minutes,
            revision: self.revision,
            blinded_key: blinded,
            cert: SigningCert {
                signing_key,
                expires: self.cert_expires,
                sig: Sig64(cert_sig),
            },
            superencrypted,
        };
        let body = encode(&body, OBJ)?;
        let sig = Sig64(self.signing_key.sign(DOMAIN_HS_DESC, &body));
        let out = encode(&Envelope { body, sig }, OBJ)?;
        if out.len() > MAX_HS_DESC_LEN {
            return Err(DirError::TooLarge {
                object: OBJ,
                len: out.len(),
                max: MAX_HS_DESC_LEN,
            });
        }
        Ok(out)
    }
}

fn check_lifetime(l: u16) -> Result<()> {
    if !(MIN_LIFETIME_MINUTES..=MAX_LIFETIME_MINUTES).contains(&l) {
        return Err(DirError::Invalid {
            object: OBJ,
            why: format!(
                "lifetime {l} minutes outside {MIN_LIFETIME_MINUTES}..={MAX_LIFETIME_MINUTES}"
            ),
        });
    }
    Ok(())
}

fn check_contents(ips: &[IntroPointInfo], _pow: &Option<PowParams>) -> Result<()> {
    if ips.is_empty() || ips.len() > MAX_INTRO_POINTS {
        return Err(DirError::Invalid {
            object: OBJ,
            why: format!(
                "needs 1 to {MAX_INTRO_POINTS} introduction points, has {}",
                ips.len()
            ),
        });
    }
    if ips
        .iter()
        .any(|ip| ip.addrs.is_empty() || ip.addrs.len() > 2)
    {
        return Err(DirError::Invalid {
            object: OBJ,
            why: "an introduction point needs 1 or 2 addresses".into(),
        });
    }
    Ok(())
}

/// A descriptor that has been decoded and bounded, but not verified.
#[derive(Clone, Debug)]
pub struct UncheckedHsDesc {
    raw: Vec<u8>,
    body_bytes: Vec<u8>,
    sig: Sig64,
    body: OuterBody,
}

impl UncheckedHsDesc {
    /// Decode: size cap first, canonical postcard, version and bounds. No signature is checked.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_HS_DESC_LEN {
            return Err(DirError::TooLarge {
                object: OBJ,
                len: bytes.len(),
                max: MAX_HS_DESC_LEN,
            });
        }
        let env: Envelope = decode_canonical(bytes, OBJ)?;
        let body: OuterBody = decode_canonical(&env.body, OBJ)?;
        if body.version != HS_DESC_VERSION {
            return Err(DirError::Invalid {
                object: OBJ,
                why: format!(
                    "version {} (this software reads version {HS_DESC_VERSION})",
                    body.version
                ),
            });
        }
        check_lifetime(body.lifetime_minutes)?;
        Ok(Self {
            raw: bytes.to_vec(),
            body_bytes: env.body,
            sig: env.sig,
            body,
        })
    }

    /// The blinded key the descriptor claims (unverified): the HSDir's storage key.
    pub fn blinded_key(&self) -> &BlindedPublicKey {
        &self.body.blinded_key
    }

    /// Verify the signing-key certificate (by the blinded key in the descriptor, not expired at
    /// `now`) and the descriptor signature. An HSDir calls this; a client calls
    /// [`UncheckedHsDesc::check_for`] with the blinded key it computed from the address.
    pub fn check(self, now: u64) -> Result<VerifiedHsDesc> {
        let b = self.body.blinded_key;
        let cert = &self.body.cert;
        b.verify(
            DOMAIN_HS_SIGNING_CERT,
            &cert_message(&cert.signing_key, cert.expires, &b),
            &cert.sig.0,
        )
        .map_err(|_| DirError::BadSignature {
            object: OBJ,
            why: "signing-key certificate not signed by the blinded key",
        })?;
        if now > cert.expires {
            return Err(DirError::NotValidNow {
                object: OBJ,
                why: "its signing-key certificate has expired",
            });
        }
        cert.signing_key
            .verify(DOMAIN_HS_DESC, &self.body_bytes, &self.sig.0)
            .map_err(|_| DirError::BadSignature {
                object: OBJ,
                why: "descriptor not signed by its certified signing key",
            })?;
        Ok(VerifiedHsDesc {
            raw: self.raw,
            body: self.body,
        })
    }

    /// [`UncheckedHsDesc::check`], and also require the descriptor to be for `expected`.
    pub fn check_for(self, expected: &BlindedPublicKey, now: u64) -> Result<VerifiedHsDesc> {
        if !allium_crypto::ct::ct_eq(&self.body.blinded_key.0, &expected.0) {
            return Err(DirError::BadSignature {
                object: OBJ,
                why: "descriptor is for another service or time period",
            });
        }
        self.check(now)
    }
}

/// A descriptor whose certificate and signature verified.
#[derive(Clone, Debug)]
pub struct VerifiedHsDesc {
    raw: Vec<u8>,
    body: OuterBody,
}

impl VerifiedHsDesc {
    /// The blinded key it is stored under.
    pub fn blinded_key(&self) -> &BlindedPublicKey {
        &self.body.blinded_key
    }
    /// Its revision counter (an HSDir keeps only the highest).
    pub fn revision(&self) -> u64 {
        self.body.revision
    }
    /// How long an HSDir keeps it, in minutes.
    pub fn lifetime_minutes(&self) -> u16 {
        self.body.lifetime_minutes
    }
    /// Unix time at which its signing-key certificate expires.
    pub fn cert_expires(&self) -> u64 {
        self.body.cert.expires
    }
    /// The exact bytes as received (what an HSDir stores and serves).
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// Decrypt both layers with the subcredential (from the address) and, for a service with client
    /// authorization, the client's x25519 key.
    pub fn decrypt(
        &self,
        subcredential: &Subcredential,
        client_key: Option<&X25519Secret>,
    ) -> Result<HsDescContents> {
        let b = &self.body.blinded_key;
        let rev = self.body.revision;
        let sup_plain = decrypt_layer(
            DescLayer::Super,
            b,
            subcredential,
            rev,
            None,
            &self.body.superencrypted,
        )
        .map_err(|_| DirError::Invalid {
            object: OBJ,
            why: "does not decrypt: the address or the time period does not match".into(),
        })?;
        let sup: SuperBody = decode_canonical(unpad(&sup_plain)?, OBJ)?;
        if sup.version != HS_DESC_VERSION
            || sup.auth_clients.len() > MAX_AUTH_CLIENTS
            || !sup.auth_clients.len().is_multiple_of(AUTH_CLIENT_BLOCK)
        {
            return Err(DirError::Invalid {
                object: OBJ,
                why: "bad version or client-authorization list in the middle layer".into(),
            });
        }
        let cookie = client_key.and_then(|k| {
            open_client_entry(subcredential, k, &sup.auth_ephemeral, &sup.auth_clients).ok()
        });
        let inner = decrypt_layer(
            DescLayer::Inner,
            b,
            subcredential,
            rev,
            cookie.as_ref(),
            &sup.encrypted,
        )
        .map_err(|_| DirError::Invalid {
            object: OBJ,
            why: if client_key.is_some() {
                "this service requires client authorization and the configured client key is \
                 not authorised"
                    .into()
            } else {
                "this service requires client authorization: configure a client key for it".into()
            },
        })?;
        let contents: HsDescContents = decode_canonical(unpad(&inner)?, OBJ)?;
        if contents.version != HS_DESC_VERSION {
            return Err(DirError::Invalid {
                object: OBJ,
                why: format!("inner layer version {}", contents.version),
            });
        }
        check_contents(&contents.intro_points, &contents.pow)?;
        Ok(contents)
    }
}
