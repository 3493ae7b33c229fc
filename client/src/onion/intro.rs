//! The end-to-end part of INTRODUCE1/INTRODUCE2: what the client tells the service (the
//! rendezvous point and the cookie), and how the INTRODUCE handshake of `allium_crypto::hs::ntor`
//! maps onto the cell's fields. Byte layout: docs/protocol/96-onion-services.md, "INTRODUCE
//! plaintext".
//!
//! ```text
//! plaintext = version u8 (= 1) | cookie[20] | rp_id[32] | rp_onion_key[32]
//!           | n_addrs u8 (1..=2) | addr × n_addrs
//!           | n_ext u8 | (type u8 | len u8 | value) × n_ext      (encrypted extensions)
//!           | 0x00 padding to PLAINTEXT_LEN (192) bytes
//! addr      = 4 u8 | ipv4[4] | port u16be     or     6 u8 | ipv6[16] | port u16be
//! hdr       = 0x01 | auth_key[32] | n_ext u8 | (type u8 | len u8 | value)×n_ext
//!             (the cell's bytes before client_key; the handshake authenticates them)
//! ntor out  = X[32] | c | tag[16]    →   client_key = X, encrypted = c | tag, mac = 0^32
//! ```
//!
//! The cell's `mac` field is reserved (all zeros, checked): the AEAD tag at the end of
//! `encrypted`, whose associated data covers `hdr` and `X`, already authenticates every byte
//! before it. The plaintext has a fixed size, so the cell does not tell an IPv4 rendezvous point
//! from an IPv6 one, nor one with a proof of work (extension type 2, [`super::pow`]) from one
//! without. A 128-byte plaintext without extensions (the first layout, whose padding reads as
//! `n_ext = 0`) is still accepted.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use allium_crypto::hs::HsError;
use allium_crypto::hs::ntor::{self, ClientIntro, IntroKeys, ServiceIntro};
use allium_crypto::{RelayId, X25519Public, X25519Secret};
use allium_proto::relaymsg::{HsExtension, Introduce, REND_COOKIE_LEN, RendCookie};
use zeroize::Zeroizing;

/// Version of the plaintext layout.
pub const PLAINTEXT_VERSION: u8 = 1;
/// Size of every plaintext (padded).
pub const PLAINTEXT_LEN: usize = 192;
/// Size of plaintexts of the first layout (no room for extensions), still accepted.
pub const PLAINTEXT_LEN_V1: usize = 128;
/// Most bytes of encrypted extensions (type, length and value of each) that fit.
pub const MAX_EXT_BYTES: usize = PLAINTEXT_LEN - 125;

/// The rendezvous point as the client names it to the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RendPoint {
    /// Its identity.
    pub id: RelayId,
    /// Its ntor onion key (the service extends to it).
    pub onion_key: X25519Public,
    /// Its link addresses (1 or 2).
    pub addrs: Vec<SocketAddr>,
}

/// What the service learns from an INTRODUCE2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntroPlaintext {
    /// The rendezvous cookie.
    pub cookie: RendCookie,
    /// Where to meet the client.
    pub rend_point: RendPoint,
}

/// An INTRODUCE plaintext that does not parse (no detail goes back to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed INTRODUCE plaintext: {0}")]
pub struct BadPlaintext(pub &'static str);

impl IntroPlaintext {
    /// The padded plaintext bytes.
    pub fn encode(&self) -> Result<Vec<u8>, BadPlaintext> {
        self.encode_with(&[])
    }

    /// The padded plaintext bytes, with encrypted `extensions` (at most [`MAX_EXT_BYTES`] of
    /// them, counting each one's type and length bytes).
    pub fn encode_with(&self, extensions: &[HsExtension]) -> Result<Vec<u8>, BadPlaintext> {
        let addrs = &self.rend_point.addrs;
        if addrs.is_empty() || addrs.len() > 2 {
            return Err(BadPlaintext("the rendezvous point needs 1 or 2 addresses"));
        }
        let mut v = Vec::with_capacity(PLAINTEXT_LEN);
        v.push(PLAINTEXT_VERSION);
        v.extend_from_slice(&self.cookie.0);
        v.extend_from_slice(self.rend_point.id.as_bytes());
        v.extend_from_slice(&self.rend_point.onion_key.0);
        v.push(addrs.len() as u8);
        for a in addrs {
            match a.ip() {
                IpAddr::V4(ip) => {
                    v.push(4);
                    v.extend_from_slice(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    v.push(6);
                    v.extend_from_slice(&ip.octets());
                }
            }
            v.extend_from_slice(&a.port().to_be_bytes());
        }
        // At most 1 + 20 + 32 + 32 + 1 + 2 × 19 = 124 bytes so far.
        let ext_len: usize = extensions.iter().map(|e| 2 + e.value.len()).sum();
        if ext_len > MAX_EXT_BYTES || extensions.iter().any(|e| e.value.len() > 255) {
            return Err(BadPlaintext("extensions too long"));
        }
        v.push(extensions.len() as u8);
        for e in extensions {
            v.push(e.ty);
            v.push(e.value.len() as u8);
            v.extend_from_slice(&e.value);
        }
        if v.len() > PLAINTEXT_LEN {
            return Err(BadPlaintext("extensions too long"));
        }
        v.resize(PLAINTEXT_LEN, 0);
        Ok(v)
    }

    /// Parse a plaintext (exactly [`PLAINTEXT_LEN`] or [`PLAINTEXT_LEN_V1`] bytes, zero
    /// padding); its encrypted extensions are ignored.
    pub fn decode(b: &[u8]) -> Result<Self, BadPlaintext> {
        Self::decode_with(b).map(|(p, _)| p)
    }

    /// Parse a plaintext and its encrypted extensions.
    pub fn decode_with(b: &[u8]) -> Result<(Self, Vec<HsExtension>), BadPlaintext> {
        if b.len() != PLAINTEXT_LEN && b.len() != PLAINTEXT_LEN_V1 {
            return Err(BadPlaintext("wrong length"));
        }
        let mut r = b;
        let mut take = |n: usize| take_bytes(&mut r, n);
        if take(1)? != [PLAINTEXT_VERSION] {
            return Err(BadPlaintext("unknown version"));
        }
        let mut cookie = [0u8; REND_COOKIE_LEN];
        cookie.copy_from_slice(take(REND_COOKIE_LEN)?);
        let mut id = [0u8; 32];
        id.copy_from_slice(take(32)?);
        let mut onion_key = [0u8; 32];
        onion_key.copy_from_slice(take(32)?);
        let n = *take(1)?.first().ok_or(BadPlaintext("truncated"))?;
        if !(1..=2).contains(&n) {
            return Err(BadPlaintext("the rendezvous point needs 1 or 2 addresses"));
        }
        let mut addrs = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let ip = match take(1)?.first().copied() {
                Some(4) => {
                    let mut o = [0u8; 4];
                    o.copy_from_slice(take(4)?);
                    IpAddr::V4(Ipv4Addr::from(o))
                }
                Some(6) => {
                    let mut o = [0u8; 16];
                    o.copy_from_slice(take(16)?);
                    IpAddr::V6(Ipv6Addr::from(o))
                }
                _ => return Err(BadPlaintext("unknown address type")),
            };
            let mut port = [0u8; 2];
            port.copy_from_slice(take(2)?);
            addrs.push(SocketAddr::new(ip, u16::from_be_bytes(port)));
        }
        let n_ext = take(1)?.first().copied().unwrap_or(0);
        let mut extensions = Vec::with_capacity(usize::from(n_ext).min(MAX_EXT_BYTES / 2));
        for _ in 0..n_ext {
            let hdr = take(2)?;
            let (ty, len) = match hdr {
                [t, l] => (*t, usize::from(*l)),
                _ => return Err(BadPlaintext("truncated")),
            };
            extensions.push(HsExtension {
                ty,
                value: take(len)?.to_vec(),
            });
        }
        if r.iter().any(|&x| x != 0) {
            return Err(BadPlaintext("padding is not zeros"));
        }
        Ok((
            Self {
                cookie: RendCookie(cookie),
                rend_point: RendPoint {
                    id: RelayId(id),
                    onion_key: X25519Public(onion_key),
                    addrs,
                },
            },
            extensions,
        ))
    }
}

fn take_bytes<'a>(r: &mut &'a [u8], n: usize) -> Result<&'a [u8], BadPlaintext> {
    let (head, tail) = r.split_at_checked(n).ok_or(BadPlaintext("truncated"))?;
    *r = tail;
    Ok(head)
}

/// The cleartext header of an INTRODUCE cell, as on the wire: what the handshake authenticates.
pub fn header_bytes(auth_key: &RelayId, extensions: &[HsExtension]) -> Vec<u8> {
    let mut h =
        Vec::with_capacity(34 + extensions.iter().map(|e| 2 + e.value.len()).sum::<usize>());
    h.push(allium_proto::relaymsg::AUTH_KEY_ED25519);
    h.extend_from_slice(auth_key.as_bytes());
    h.push(extensions.len().min(usize::from(u8::MAX)) as u8);
    for e in extensions {
        h.push(e.ty);
        h.push(e.value.len().min(usize::from(u8::MAX)) as u8);
        h.extend_from_slice(&e.value);
    }
    h
}

/// Client: the INTRODUCE1 for `plain`, and the handshake state to finish with RENDEZVOUS2.
pub fn client_introduce(
    keys: &IntroKeys<'_>,
    extensions: Vec<HsExtension>,
    plain: &IntroPlaintext,
) -> Result<(ClientIntro, Introduce), HsError> {
    client_introduce_with(keys, extensions, plain, &[])
}

/// [`client_introduce`] with `encrypted_ext` inside the encrypted part (a proof of work).
pub fn client_introduce_with(
    keys: &IntroKeys<'_>,
    extensions: Vec<HsExtension>,
    plain: &IntroPlaintext,
    encrypted_ext: &[HsExtension],
) -> Result<(ClientIntro, Introduce), HsError> {
    let pt = Zeroizing::new(
        plain
            .encode_with(encrypted_ext)
            .map_err(|_| HsError::HandshakeFailed)?,
    );
    let hdr = header_bytes(keys.auth_key, &extensions);
    let (state, out) = ntor::client_start(keys, &hdr, &pt)?;
    let (x, rest) = out.split_at_checked(32).ok_or(HsError::HandshakeFailed)?;
    let mut client_key = [0u8; 32];
    client_key.copy_from_slice(x);
    Ok((
        state,
        Introduce {
            auth_key: *keys.auth_key,
            extensions,
            client_key,
            encrypted: rest.to_vec(),
            mac: [0; 32],
        },
    ))
}

/// Service: open an INTRODUCE2 with the secret of the encryption key it names.
pub fn service_open(
    keys: &IntroKeys<'_>,
    enc_secret: &X25519Secret,
    msg: &Introduce,
) -> Result<(IntroPlaintext, ServiceIntro), HsError> {
    service_open_with(keys, enc_secret, msg).map(|(p, _, s)| (p, s))
}

/// [`service_open`], also returning the encrypted extensions.
pub fn service_open_with(
    keys: &IntroKeys<'_>,
    enc_secret: &X25519Secret,
    msg: &Introduce,
) -> Result<(IntroPlaintext, Vec<HsExtension>, ServiceIntro), HsError> {
    if msg.mac != [0; 32] {
        return Err(HsError::HandshakeFailed);
    }
    let hdr = header_bytes(&msg.auth_key, &msg.extensions);
    let mut enc = Vec::with_capacity(32 + msg.encrypted.len());
    enc.extend_from_slice(&msg.client_key);
    enc.extend_from_slice(&msg.encrypted);
    let (pt, state) = ntor::service_open(keys, enc_secret, &hdr, &enc)?;
    let (plain, ext) = IntroPlaintext::decode_with(&pt).map_err(|_| HsError::HandshakeFailed)?;
    Ok((plain, ext, state))
}
