//! Onion-service relay messages: introduction and rendezvous (rend-spec-v3's roles, Allium's
//! own layouts; byte-exact in `docs/protocol/62-onion-service-cells.md`).
//!
//! Every body is bounded by the 934-byte data field; every count and length is checked against
//! the bytes that remain before anything is allocated.

use std::fmt;

use allium_crypto::ctlauth::hmac_sha256;
use allium_crypto::{CryptoError, IdentityKeypair, RelayId};

use crate::codec::{Reader, Writer};
use crate::err::{ProtoError, Result};

/// Auth-key type of an Ed25519 introduction-point authentication key (the only one).
pub const AUTH_KEY_ED25519: u8 = 1;
/// Length of a rendezvous cookie.
pub const REND_COOKIE_LEN: usize = 20;
/// Most extensions in one message.
pub const MAX_HS_EXTENSIONS: usize = 16;
/// Domain of the ESTABLISH_INTRO signature (see `keys::signed_message`).
pub const ESTABLISH_INTRO_SIG_DOMAIN: &str = "allium/v1/hs-establish-intro";
/// Longest handshake info in RENDEZVOUS1 / RENDEZVOUS2.
const MAX_HANDSHAKE_INFO: usize = 512;

fn bad(object: &'static str, problem: &'static str) -> ProtoError {
    ProtoError::Invalid { object, problem }
}

/// One extension field: `type u8 | len u8 | value`. Unknown types are kept and ignored.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HsExtension {
    /// The type.
    pub ty: u8,
    /// The value (≤ 255 bytes).
    pub value: Vec<u8>,
}

impl HsExtension {
    /// ESTABLISH_INTRO: DoS parameters for the introduction point (`n u8 | n × (id u8 | value
    /// u64)`; ids as Tor's: 1 = INTRODUCE2 rate per second, 2 = burst).
    pub const DOS_PARAMS: u8 = 1;
    /// INTRODUCE1: a proof-of-work solution (opaque here; checked by the service).
    pub const POW: u8 = 2;

    /// A DoS-parameters extension.
    pub fn dos_params(params: &[(u8, u64)]) -> Result<Self> {
        let n = u8::try_from(params.len()).map_err(|_| bad("DoS parameters", "too many"))?;
        let mut value = Vec::with_capacity(1 + 9 * params.len());
        value.push(n);
        for (id, v) in params {
            value.push(*id);
            value.extend_from_slice(&v.to_be_bytes());
        }
        if value.len() > 255 {
            return Err(bad("DoS parameters", "too many"));
        }
        Ok(Self {
            ty: Self::DOS_PARAMS,
            value,
        })
    }

    /// The parameters of a DoS-parameters extension.
    pub fn parse_dos_params(&self) -> Result<Vec<(u8, u64)>> {
        if self.ty != Self::DOS_PARAMS {
            return Err(bad("DoS parameters", "wrong extension type"));
        }
        let mut r = Reader::for_object(&self.value, "DoS parameters");
        let n = r.take_u8()?;
        let mut out = Vec::with_capacity(usize::from(n).min(r.remaining() / 9));
        for _ in 0..n {
            out.push((r.take_u8()?, r.take_u64()?));
        }
        r.should_be_exhausted()?;
        Ok(out)
    }
}

pub(crate) fn write_extensions(w: &mut Writer<'_>, ext: &[HsExtension]) -> Result<()> {
    if ext.len() > MAX_HS_EXTENSIONS {
        return Err(ProtoError::TooLong {
            object: "extensions",
            len: ext.len(),
            max: MAX_HS_EXTENSIONS,
        });
    }
    w.write_u8(ext.len() as u8)?;
    for e in ext {
        w.write_u8(e.ty)?;
        w.write_u8len(&e.value)?;
    }
    Ok(())
}

pub(crate) fn read_extensions(r: &mut Reader<'_>) -> Result<Vec<HsExtension>> {
    let n = usize::from(r.take_u8()?);
    if n > MAX_HS_EXTENSIONS {
        return Err(ProtoError::TooLong {
            object: "extensions",
            len: n,
            max: MAX_HS_EXTENSIONS,
        });
    }
    // Each extension takes ≥ 2 bytes: bounded by the input before any allocation.
    let mut out = Vec::with_capacity(n.min(r.remaining() / 2));
    for _ in 0..n {
        let ty = r.take_u8()?;
        let value = r.take_u8len()?.to_vec();
        out.push(HsExtension { ty, value });
    }
    Ok(out)
}

pub(crate) fn write_handshake_info(w: &mut Writer<'_>, info: &[u8]) -> Result<()> {
    if info.len() > MAX_HANDSHAKE_INFO {
        return Err(ProtoError::TooLong {
            object: "handshake info",
            len: info.len(),
            max: MAX_HANDSHAKE_INFO,
        });
    }
    w.write_u16len(info)
}

pub(crate) fn read_handshake_info(r: &mut Reader<'_>) -> Result<Vec<u8>> {
    let info = r.take_u16len()?;
    if info.len() > MAX_HANDSHAKE_INFO {
        return Err(ProtoError::TooLong {
            object: "handshake info",
            len: info.len(),
            max: MAX_HANDSHAKE_INFO,
        });
    }
    Ok(info.to_vec())
}

fn read_auth_key(r: &mut Reader<'_>) -> Result<RelayId> {
    if r.take_u8()? != AUTH_KEY_ED25519 {
        return Err(bad("auth key", "unknown auth key type"));
    }
    Ok(RelayId(r.take_array()?))
}

/// ESTABLISH_INTRO: `auth_key_type u8 (=1) | auth_key[32] | n_ext u8 | ext* | mac[32] |
/// sig[64]`. `mac = HMAC-SHA256(key = the circuit's binding KH, every byte before it)`; `sig`
/// is the auth key's Ed25519 signature (domain [`ESTABLISH_INTRO_SIG_DOMAIN`]) over every byte
/// before it, the MAC included. The MAC ties the request to this circuit's handshake, so it
/// cannot be replayed on another circuit; the signature proves the sender holds the auth key.
#[derive(Clone, PartialEq, Eq)]
pub struct EstablishIntro {
    /// The service's introduction-point authentication key (the registry key).
    pub auth_key: RelayId,
    /// Extensions (DoS parameters, ...).
    pub extensions: Vec<HsExtension>,
    /// The circuit-binding MAC.
    pub mac: [u8; 32],
    /// The auth key's signature.
    pub sig: [u8; 64],
}

impl fmt::Debug for EstablishIntro {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "EstablishIntro({} extensions, [key redacted])",
            self.extensions.len()
        )
    }
}

impl EstablishIntro {
    /// Build a signed ESTABLISH_INTRO for the circuit whose handshake gave `binding`.
    pub fn new_signed(
        auth: &IdentityKeypair,
        binding: &[u8; 32],
        extensions: Vec<HsExtension>,
    ) -> Result<Self> {
        let mut m = Self {
            auth_key: auth.public(),
            extensions,
            mac: [0; 32],
            sig: [0; 64],
        };
        let prefix = m.prefix()?;
        m.mac = hmac_sha256(binding, &[&prefix]);
        let mut signed = prefix;
        signed.extend_from_slice(&m.mac);
        m.sig = auth.sign(ESTABLISH_INTRO_SIG_DOMAIN, &signed);
        Ok(m)
    }

    /// Check the MAC against this circuit's `binding` (constant time), then the signature.
    /// The encoding is canonical (fixed fields, length-prefixed extensions, trailing bytes
    /// refused), so the bytes rebuilt here are the bytes received.
    pub fn verify(&self, binding: &[u8; 32]) -> std::result::Result<(), CryptoError> {
        let prefix = self.prefix().map_err(|_| CryptoError::BadSignature)?;
        let mac = hmac_sha256(binding, &[&prefix]);
        if !allium_crypto::ct::ct_eq(&mac, &self.mac) {
            return Err(CryptoError::BadSignature);
        }
        let mut signed = prefix;
        signed.extend_from_slice(&self.mac);
        self.auth_key
            .verify(ESTABLISH_INTRO_SIG_DOMAIN, &signed, &self.sig)
    }

    /// The bytes before the MAC.
    fn prefix(&self) -> Result<Vec<u8>> {
        let mut buf = [0u8; crate::consts::MAX_DATA];
        let mut w = Writer::for_object(&mut buf, "ESTABLISH_INTRO");
        w.write_u8(AUTH_KEY_ED25519)?;
        w.write_all(self.auth_key.as_bytes())?;
        write_extensions(&mut w, &self.extensions)?;
        let n = w.position();
        Ok(buf.get(..n).unwrap_or_default().to_vec())
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        w.write_u8(AUTH_KEY_ED25519)?;
        w.write_all(self.auth_key.as_bytes())?;
        write_extensions(w, &self.extensions)?;
        w.write_all(&self.mac)?;
        w.write_all(&self.sig)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self> {
        let auth_key = read_auth_key(r)?;
        let extensions = read_extensions(r)?;
        let mac = r.take_array()?;
        let sig = r.take_array()?;
        Ok(Self {
            auth_key,
            extensions,
            mac,
            sig,
        })
    }
}

/// INTRO_ESTABLISHED: `n_ext u8 | ext*`.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct IntroEstablished {
    /// Extensions (none defined).
    pub extensions: Vec<HsExtension>,
}

/// INTRODUCE1 and INTRODUCE2 (same body): `auth_key_type u8 (=1) | auth_key[32] | n_ext u8 |
/// ext* | client_key[32] | enc_len u16 | encrypted[enc_len] | mac[32]`. The introduction point
/// reads only the header (auth key, extensions); `client_key`, `encrypted` and `mac` are the
/// client's end-to-end handshake with the service, opaque to it and the unit of its replay cache.
#[derive(Clone, PartialEq, Eq)]
pub struct Introduce {
    /// The auth key of the introduction circuit this is for.
    pub auth_key: RelayId,
    /// Extensions (proof of work, ...).
    pub extensions: Vec<HsExtension>,
    /// The client's ephemeral x25519 key.
    pub client_key: [u8; 32],
    /// The encrypted part (rendezvous point, cookie, ...), opaque here.
    pub encrypted: Vec<u8>,
    /// The handshake MAC over everything before it.
    pub mac: [u8; 32],
}

impl fmt::Debug for Introduce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Introduce({} encrypted bytes)", self.encrypted.len())
    }
}

impl Introduce {
    /// The bytes the replay cache remembers: `client_key | encrypted | mac` (what a replay
    /// must repeat exactly to be useful).
    pub fn replay_material(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64 + self.encrypted.len());
        v.extend_from_slice(&self.client_key);
        v.extend_from_slice(&self.encrypted);
        v.extend_from_slice(&self.mac);
        v
    }

    pub(crate) fn write(&self, w: &mut Writer<'_>) -> Result<()> {
        w.write_u8(AUTH_KEY_ED25519)?;
        w.write_all(self.auth_key.as_bytes())?;
        write_extensions(w, &self.extensions)?;
        w.write_all(&self.client_key)?;
        w.write_u16len(&self.encrypted)?;
        w.write_all(&self.mac)
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self> {
        let auth_key = read_auth_key(r)?;
        let extensions = read_extensions(r)?;
        let client_key = r.take_array()?;
        let encrypted = r.take_u16len()?.to_vec();
        let mac = r.take_array()?;
        Ok(Self {
            auth_key,
            extensions,
            client_key,
            encrypted,
            mac,
        })
    }
}

/// INTRODUCE_ACK status (open code; Tor's values, plus REPLAY).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct IntroduceStatus(pub u16);

impl IntroduceStatus {
    /// Relayed to the service.
    pub const SUCCESS: Self = Self(0);
    /// No introduction circuit for that auth key here.
    pub const UNKNOWN_SERVICE: Self = Self(1);
    /// The INTRODUCE1 did not parse.
    pub const BAD_FORMAT: Self = Self(2);
    /// The service circuit could not take it (gone or full).
    pub const CANT_RELAY: Self = Self(3);
    /// The same encrypted part was seen before under this auth key.
    pub const REPLAY: Self = Self(4);
}

/// INTRODUCE_ACK: `status u16 | n_ext u8 | ext*`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IntroduceAck {
    /// The outcome.
    pub status: IntroduceStatus,
    /// Extensions (none defined).
    pub extensions: Vec<HsExtension>,
}

impl IntroduceAck {
    /// An ACK with `status` and no extensions.
    pub fn new(status: IntroduceStatus) -> Self {
        Self {
            status,
            extensions: Vec::new(),
        }
    }
}

/// A rendezvous cookie: 20 random bytes the client chose (a bearer token: not logged).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct RendCookie(pub [u8; REND_COOKIE_LEN]);

impl fmt::Debug for RendCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RendCookie([redacted])")
    }
}

/// ESTABLISH_RENDEZVOUS: `cookie[20]`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EstablishRendezvous {
    /// The cookie the service will name in RENDEZVOUS1.
    pub cookie: RendCookie,
}

/// RENDEZVOUS_ESTABLISHED: empty.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct RendezvousEstablished;

/// RENDEZVOUS1: `cookie[20] | hlen u16 | handshake_info[hlen ≤ 512]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Rendezvous1 {
    /// The client's cookie.
    pub cookie: RendCookie,
    /// The service's half of the end-to-end handshake (passed on unchanged in RENDEZVOUS2).
    pub handshake_info: Vec<u8>,
}

impl fmt::Debug for Rendezvous1 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rendezvous1({} bytes)", self.handshake_info.len())
    }
}

/// RENDEZVOUS2: `hlen u16 | handshake_info[hlen ≤ 512]`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Rendezvous2 {
    /// The service's half of the end-to-end handshake.
    pub handshake_info: Vec<u8>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::relaymsg::{RelayCmd, RelayMsg};

    fn round_trip(msg: &RelayMsg) -> Vec<u8> {
        let bytes = msg.to_vec(0).unwrap();
        let (sid, back) = RelayMsg::decode(&bytes).unwrap();
        assert_eq!(sid, 0);
        assert_eq!(&back, msg);
        assert_eq!(back.to_vec(0).unwrap(), bytes, "one byte form");
        // Stream-level use is refused both ways.
        assert!(msg.to_vec(7).is_err());
        let mut bad = bytes.clone();
        bad[1..3].copy_from_slice(&7u16.to_be_bytes());
        assert!(RelayMsg::decode(&bad).is_err());
        // Every truncation is an error, never a panic; one trailing byte is refused.
        let len = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
        for cut in 0..len {
            let mut t = bytes[..5 + cut].to_vec();
            t[3..5].copy_from_slice(&(cut as u16).to_be_bytes());
            assert!(
                RelayMsg::decode(&t).is_err(),
                "{:?} cut at {cut}",
                msg.cmd()
            );
        }
        if msg.cmd() != RelayCmd::RENDEZVOUS_ESTABLISHED {
            let mut t = bytes.clone();
            t.push(0);
            t[3..5].copy_from_slice(&(len as u16 + 1).to_be_bytes());
            assert!(RelayMsg::decode(&t).is_err(), "{:?} trailing", msg.cmd());
        }
        bytes
    }

    fn kp(n: u8) -> IdentityKeypair {
        IdentityKeypair::from_seed(&[n; 32])
    }

    fn introduce() -> Introduce {
        Introduce {
            auth_key: kp(1).public(),
            extensions: vec![HsExtension {
                ty: HsExtension::POW,
                value: vec![9; 40],
            }],
            client_key: [3; 32],
            encrypted: vec![0xAB; 300],
            mac: [4; 32],
        }
    }

    #[test]
    fn every_message_round_trips_byte_exact() {
        let est = EstablishIntro::new_signed(
            &kp(1),
            &[7; 32],
            vec![HsExtension::dos_params(&[(1, 25), (2, 200)]).unwrap()],
        )
        .unwrap();
        let b = round_trip(&RelayMsg::EstablishIntro(est));
        assert_eq!(b[0], 32);
        // type 1 | key | n_ext 1 | (1, 19, ...) | mac | sig
        assert_eq!(
            u16::from_be_bytes([b[3], b[4]]),
            1 + 32 + 1 + 2 + 19 + 32 + 64
        );
        assert_eq!(b[5], AUTH_KEY_ED25519);
        assert_eq!(&b[6..38], kp(1).public().as_bytes());

        let b = round_trip(&RelayMsg::Introduce1(introduce()));
        assert_eq!(&b[..5], &[34, 0, 0, 0x01, 0xba]);
        round_trip(&RelayMsg::Introduce2(introduce()));
        let b = round_trip(&RelayMsg::IntroduceAck(IntroduceAck::new(
            IntroduceStatus::REPLAY,
        )));
        assert_eq!(b, [40, 0, 0, 0, 3, 0, 4, 0]);
        let b = round_trip(&RelayMsg::IntroEstablished(IntroEstablished::default()));
        assert_eq!(b, [38, 0, 0, 0, 1, 0]);
        let cookie = RendCookie([0x11; 20]);
        let b = round_trip(&RelayMsg::EstablishRendezvous(EstablishRendezvous {
            cookie,
        }));
        assert_eq!(b.len(), 5 + 20);
        let b = round_trip(&RelayMsg::RendezvousEstablished(RendezvousEstablished));
        assert_eq!(b, [39, 0, 0, 0, 0]);
        let b = round_trip(&RelayMsg::Rendezvous1(Rendezvous1 {
            cookie,
            handshake_info: vec![5; 64],
        }));
        assert_eq!(&b[3..5], &(20u16 + 2 + 64).to_be_bytes());
        assert_eq!(&b[25..27], &[0, 64]);
        let b = round_trip(&RelayMsg::Rendezvous2(Rendezvous2 {
            handshake_info: vec![6; 64],
        }));
        assert_eq!(&b[5..7], &[0, 64]);
    }

    #[test]
    fn establish_intro_mac_binds_the_circuit_and_signature_the_key() {
        let est = EstablishIntro::new_signed(&kp(1), &[7; 32], vec![]).unwrap();
        est.verify(&[7; 32]).unwrap();
        // Another circuit (another binding): refused.
        assert!(est.verify(&[8; 32]).is_err());
        // Another key claimed with the same MAC and signature: refused.
        let mut other = est.clone();
        other.auth_key = kp(2).public();
        assert!(other.verify(&[7; 32]).is_err());
        // An extension added after signing: refused.
        let mut ext = est.clone();
        ext.extensions.push(HsExtension {
            ty: 9,
            value: vec![],
        });
        assert!(ext.verify(&[7; 32]).is_err());
        // A flipped signature bit: refused.
        let mut sig = est;
        sig.sig[10] ^= 1;
        assert!(sig.verify(&[7; 32]).is_err());
    }

    #[test]
    fn limits_are_enforced_before_allocating() {
        // 17 extensions are refused on both sides.
        let many = vec![
            HsExtension {
                ty: 5,
                value: vec![]
            };
            MAX_HS_EXTENSIONS + 1
        ];
        let mut i = introduce();
        i.extensions = many;
        assert!(RelayMsg::Introduce1(i).to_vec(0).is_err());
        let mut b = RelayMsg::IntroEstablished(IntroEstablished::default())
            .to_vec(0)
            .unwrap();
        b[5] = 200;
        assert!(RelayMsg::decode(&b).is_err());
        // Handshake info over 512 bytes is refused.
        let r = RelayMsg::Rendezvous2(Rendezvous2 {
            handshake_info: vec![0; 513],
        });
        assert!(r.to_vec(0).is_err());
        // An unknown auth-key type is refused.
        let mut b = RelayMsg::Introduce1(introduce()).to_vec(0).unwrap();
        b[5] = 2;
        assert!(RelayMsg::decode(&b).is_err());
        // DoS parameters parse back, and a short one fails.
        let d = HsExtension::dos_params(&[(1, 5)]).unwrap();
        assert_eq!(d.parse_dos_params().unwrap(), vec![(1, 5)]);
        let mut short = d;
        short.value.pop();
        assert!(short.parse_dos_params().is_err());
    }
}
