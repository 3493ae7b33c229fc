//! The one symmetric backend: ChaCha20-Poly1305 (RFC 8439) and raw ChaCha20 keystream.
//!
//! Everything else in the crate calls only these functions, so the backend can be swapped by
//! changing this file alone.
//!
//! - AEAD: `ring` 0.17 (`LessSafeKey`, `CHACHA20_POLY1305`), chosen by measurement: about 4x faster
//!   than the pure-Rust `chacha20poly1305` crate on our machines (see `docs/protocol/30-relay-crypto.md`).
//!   `ring` compares tags in constant time and zeroes the buffer when a tag is wrong.
//! - Keystream (ratchet, filler, backward `k_aux` layer): RustCrypto `chacha20` (IETF variant, 96-bit
//!   nonce, 32-bit block counter starting at 0; byte offset `o` of the stream is byte `o % 64` of
//!   block `o / 64`). Its key schedule zeroizes on drop.
//!
//! Invariants:
//! - Callers pass keys that come from the §3 ratchet or from a single-use handshake key; nothing here
//!   chooses nonces.
//! - `ring` does not zeroize its copy of the key on drop; each such key is single-use (ratcheted per cell
//!   or derived per handshake), lives on the stack only for one call, and is documented as a residue.
//! - Under `cfg(test)` every encryption `(key, nonce)` pair can be logged to prove uniqueness.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit as _, StreamCipher as _, StreamCipherSeek as _};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};

use crate::err::CryptoError;

/// Key length of ChaCha20 and ChaCha20-Poly1305.
pub(crate) const KEY_LEN: usize = 32;
/// Nonce length (IETF variant).
pub(crate) const NONCE_LEN: usize = 12;
/// Poly1305 tag length.
pub(crate) const TAG_LEN: usize = 16;

fn ring_key(key: &[u8; KEY_LEN]) -> Result<LessSafeKey, CryptoError> {
    UnboundKey::new(&CHACHA20_POLY1305, key)
        .map(LessSafeKey::new)
        .map_err(|_| CryptoError::BadKey {
            what: "ChaCha20-Poly1305 key",
        })
}

/// Encrypt `buf` in place; returns the tag.
pub(crate) fn seal(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], CryptoError> {
    #[cfg(test)]
    nonce_log::record(key, nonce);
    let k = ring_key(key)?;
    let tag = k
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(ad), buf)
        .map_err(|_| CryptoError::CellAuthFailed)?;
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    Ok(out)
}

/// Verify `tag` over `ad` and the ciphertext `buf[ct_start..]`, and decrypt it to
/// `buf[..buf.len() - ct_start]` (a shifted in-place decryption; `ct_start = 0` is plain in place).
///
/// On failure the output region is zeroed by the backend and must not be used.
pub(crate) fn open_shifted(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    tag: &[u8; TAG_LEN],
    buf: &mut [u8],
    ct_start: usize,
) -> Result<(), CryptoError> {
    let k = ring_key(key)?;
    k.open_in_place_separate_tag(
        Nonce::assume_unique_for_key(*nonce),
        Aad::from(ad),
        Tag::from(*tag),
        buf,
        ct_start..,
    )
    .map(|_| ())
    .map_err(|_| CryptoError::CellAuthFailed)
}

/// Decrypt in place (see [`open_shifted`]).
pub(crate) fn open(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    ad: &[u8],
    tag: &[u8; TAG_LEN],
    buf: &mut [u8],
) -> Result<(), CryptoError> {
    open_shifted(key, nonce, ad, tag, buf, 0)
}

/// XOR `buf` with the ChaCha20 keystream of `(key, nonce)` starting at byte `offset` of the stream
/// (offset 0 is the first byte of block 0).
pub(crate) fn keystream_xor(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    offset: u32,
    buf: &mut [u8],
) {
    let mut c = ChaCha20::new(key.into(), nonce.into());
    if offset != 0 {
        c.seek(offset);
    }
    c.apply_keystream(buf);
}

/// Like [`keystream_xor`] and logged under `cfg(test)` as an encryption use of `(key, nonce)`.
pub(crate) fn keystream_encrypt(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN], buf: &mut [u8]) {
    #[cfg(test)]
    nonce_log::record(key, nonce);
    keystream_xor(key, nonce, 0, buf);
}

/// Test-only log of every encryption `(key, nonce)` pair on this thread.
#[cfg(test)]
pub(crate) mod nonce_log {
    use std::cell::RefCell;
    use std::collections::HashSet;

    use super::{KEY_LEN, NONCE_LEN};

    struct Log {
        seen: HashSet<[u8; KEY_LEN + NONCE_LEN]>,
        uses: u64,
        duplicates: u64,
    }

    thread_local! {
        static LOG: RefCell<Option<Log>> = const { RefCell::new(None) };
    }

    /// Start logging on this thread (clears any earlier log).
    pub(crate) fn start() {
        LOG.with(|l| {
            *l.borrow_mut() = Some(Log {
                seen: HashSet::new(),
                uses: 0,
                duplicates: 0,
            })
        });
    }

    /// Stop logging; returns `(uses, duplicates)`.
    pub(crate) fn stop() -> (u64, u64) {
        LOG.with(|l| {
            l.borrow_mut()
                .take()
                .map_or((0, 0), |log| (log.uses, log.duplicates))
        })
    }

    pub(super) fn record(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN]) {
        LOG.with(|l| {
            if let Some(log) = l.borrow_mut().as_mut() {
                let mut k = [0u8; KEY_LEN + NONCE_LEN];
                k[..KEY_LEN].copy_from_slice(key);
                k[KEY_LEN..].copy_from_slice(nonce);
                log.uses += 1;
                if !log.seen.insert(k) {
                    log.duplicates += 1;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8439 §2.8.2 AEAD test vector, through this module.
    #[test]
    fn rfc8439_aead_vector() {
        let key: [u8; 32] =
            hex::decode("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
                .unwrap()
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = hex::decode("070000004041424344454647")
            .unwrap()
            .try_into()
            .unwrap();
        let ad = hex::decode("50515253c0c1c2c3c4c5c6c7").unwrap();
        let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let ct = hex::decode(concat!(
            "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6",
            "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36",
            "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc",
            "3ff4def08e4b7a9de576d26586cec64b6116"
        ))
        .unwrap();
        let tag: [u8; 16] = hex::decode("1ae10b594f09e26a7e902ecbd0600691")
            .unwrap()
            .try_into()
            .unwrap();
        let mut buf = pt.to_vec();
        let t = seal(&key, &nonce, &ad, &mut buf).unwrap();
        assert_eq!(buf, ct);
        assert_eq!(t, tag);
        open(&key, &nonce, &ad, &tag, &mut buf).unwrap();
        assert_eq!(&buf[..], &pt[..]);
        // Any change is rejected.
        let mut bad = ct.clone();
        bad[7] ^= 1;
        assert!(open(&key, &nonce, &ad, &tag, &mut bad).is_err());
        let mut buf = ct.clone();
        assert!(open(&key, &nonce, &ad[1..], &tag, &mut buf).is_err());
    }

    /// RFC 8439 §2.4.2 keystream vector (block counter 1 = byte offset 64).
    #[test]
    fn rfc8439_keystream_vector() {
        let key: [u8; 32] =
            hex::decode("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
                .unwrap()
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = hex::decode("000000000000004a00000000")
            .unwrap()
            .try_into()
            .unwrap();
        let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let mut buf = pt.to_vec();
        keystream_xor(&key, &nonce, 64, &mut buf);
        assert_eq!(
            hex::encode(&buf[..32]),
            "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        );
    }

    /// The AEAD's message keystream is the raw stream from offset 64 (design §3.4 relies on it).
    #[test]
    fn aead_keystream_starts_at_block_one() {
        let key = [7u8; 32];
        let nonce = [9u8; 12];
        let mut a = [0u8; 200];
        let _ = seal(&key, &nonce, b"x", &mut a).unwrap();
        let mut b = [0u8; 200];
        keystream_xor(&key, &nonce, 64, &mut b);
        assert_eq!(a, b);
        // Shifted opening puts the plaintext at the start.
        let mut msg = [0u8; 50];
        msg[..8].copy_from_slice(b"abcdefgh");
        let orig = msg;
        let tag = seal(&key, &nonce, b"", &mut msg).unwrap();
        let mut buf = [0u8; 66];
        buf[16..].copy_from_slice(&msg);
        open_shifted(&key, &nonce, b"", &tag, &mut buf, 16).unwrap();
        assert_eq!(&buf[..50], &orig[..]);
    }
}
