//! The one symmetric backend: ChaCha20-Poly1305 (RFC 8439) and raw ChaCha20 keystream.
//!
//! Everything else in the crate calls only these functions, so the backend can be swapped by
//! changing this file alone.
//!
//! - AEAD: `ring` 0.17 (`LessSafeKey`, `CHACHA20_POLY1305`), chosen by measurement: about 4x faster
//!   than the pure-Rust `chacha20poly1305` crate on our machines (see `docs/protocol/30-relay-crypto.md`).
//!   `ring` compares tags in constant time and zeroes the buffer when a tag is wrong.
//! - Raw keystream (ratchet, filler, backward `k_aux` layer): ChaCha20 IETF (96-bit nonce, 32-bit
//!   block counter starting at 0; byte offset `o` of the stream is byte `o % 64` of block `o / 64`).
//!   The ratchet's four blocks come from the RustCrypto `chacha20` crate (AVX2); short pieces (the
//!   filler, block 0 of the backward layer) from a scalar block function in this file (tested against
//!   RFC 8439 and the `chacha20` crate; 2-5x faster than the crate for one block); long runs from byte
//!   64 on come from `ring` (its AEAD message keystream starts at block 1; 2x faster than the crate).
//!
//! Invariants:
//! - Callers pass keys that come from the §3 ratchet or from a single-use handshake key; nothing here
//!   chooses nonces.
//! - `ring` does not zeroize its copy of the key on drop; each such key is single-use (ratcheted per cell
//!   or derived per handshake), lives on the stack only for one call, and is documented as a residue.
//! - Under `cfg(test)` every encryption `(key, nonce)` pair can be logged to prove uniqueness.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit as _, StreamCipher as _};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::{Zeroize as _, Zeroizing};

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
/// (offset 0 is the first byte of block 0; RFC 8439 §2.4 with the block counter starting at 0).
///
/// Short pieces (the filler, block 0 of the backward layer) use the scalar block function below. A long run that starts
/// at or before byte 64 (the backward `k_aux` layer) takes bytes `offset..64` from the scalar code and
/// the rest from `ring`'s AEAD, whose message keystream is exactly the raw stream from byte 64 (block
/// 1); its Poly1305 tag is discarded.
pub(crate) fn keystream_xor(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    offset: u32,
    buf: &mut [u8],
) {
    const RING_MIN: usize = 256;
    #[cfg(feature = "openssl")]
    if offset == 0 && buf.len() >= RING_MIN && ossl::keystream_xor(key, nonce, buf) {
        return;
    }
    let head = 64u32.saturating_sub(offset) as usize;
    if offset <= 64 && buf.len() >= head + RING_MIN {
        let (h, rest) = buf.split_at_mut(head);
        scalar_keystream_xor(key, nonce, offset, h);
        if let Ok(k) = ring_key(key) {
            // Cannot fail: `rest` is far below ring's 256 GiB limit.
            let _ = k.seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(*nonce),
                Aad::empty(),
                rest,
            );
            return;
        }
        // Unreachable (a 32-byte key is always accepted); fall back to the scalar code.
        scalar_keystream_xor(key, nonce, 64, rest);
        return;
    }
    scalar_keystream_xor(key, nonce, offset, buf);
}

/// `ChaCha20(key, nonce 0^12)[0..256]` (blocks 0-3): one ratchet step (design §3.3 as amended in
/// `docs/protocol/30-relay-crypto.md`).
///
/// Four blocks at once is where the RustCrypto `chacha20` crate's AVX2 code pays off: about 170 ns
/// per step, against 4 x 65 ns for the scalar block function.
pub(crate) fn ratchet_step(key: &[u8; KEY_LEN], out: &mut [u8; 256]) {
    out.fill(0);
    let mut c = ChaCha20::new(key.into(), (&[0u8; NONCE_LEN]).into());
    c.apply_keystream(out);
}

fn scalar_keystream_xor(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN], offset: u32, buf: &mut [u8]) {
    let mut block = Zeroizing::new([0u8; 64]);
    let mut ctr = offset / 64;
    let mut skip = (offset % 64) as usize;
    let mut rest = buf;
    while !rest.is_empty() {
        chacha20_block(key, ctr, nonce, &mut block);
        let ks = block.get(skip..).unwrap_or(&[]);
        let n = ks.len().min(rest.len());
        let (now, later) = rest.split_at_mut(n);
        for (b, k) in now.iter_mut().zip(ks) {
            *b ^= k;
        }
        rest = later;
        skip = 0;
        ctr = ctr.wrapping_add(1);
    }
}

#[inline(always)]
fn quarter_round(s: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(16);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(12);
    s[a] = s[a].wrapping_add(s[b]);
    s[d] = (s[d] ^ s[a]).rotate_left(8);
    s[c] = s[c].wrapping_add(s[d]);
    s[b] = (s[b] ^ s[c]).rotate_left(7);
}

/// The ChaCha20 block function (RFC 8439 §2.3): constant time (add, xor, rotate only).
/// Scalar code: for the one or two blocks of a filler piece or of block 0 of the backward layer it
/// is several times faster than a call into the `chacha20` crate (which computes four blocks at once).
fn chacha20_block(key: &[u8; KEY_LEN], counter: u32, nonce: &[u8; NONCE_LEN], out: &mut [u8; 64]) {
    let mut init = [0u32; 16];
    init[0] = 0x6170_7865;
    init[1] = 0x3320_646e;
    init[2] = 0x7962_2d32;
    init[3] = 0x6b20_6574;
    for (w, c) in init[4..12].iter_mut().zip(key.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    init[12] = counter;
    for (w, c) in init[13..16].iter_mut().zip(nonce.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    let mut s = init;
    for _ in 0..10 {
        quarter_round(&mut s, 0, 4, 8, 12);
        quarter_round(&mut s, 1, 5, 9, 13);
        quarter_round(&mut s, 2, 6, 10, 14);
        quarter_round(&mut s, 3, 7, 11, 15);
        quarter_round(&mut s, 0, 5, 10, 15);
        quarter_round(&mut s, 1, 6, 11, 12);
        quarter_round(&mut s, 2, 7, 8, 13);
        quarter_round(&mut s, 3, 4, 9, 14);
    }
    for ((o, w), i) in out.chunks_exact_mut(4).zip(s.iter()).zip(init.iter()) {
        o.copy_from_slice(&w.wrapping_add(*i).to_le_bytes());
    }
    s.zeroize();
    init.zeroize();
}

/// OpenSSL's raw ChaCha20 (cargo feature `openssl`): on machines with AVX-512 it XORs a
/// 1019-byte cell body with a fresh key in about 340 ns, against about 530 ns for `ring`'s AEAD
/// used as a keystream (which also computes a Poly1305 tag that is thrown away).
#[cfg(feature = "openssl")]
mod ossl {
    use std::cell::RefCell;

    use openssl::cipher::Cipher;
    use openssl::cipher_ctx::CipherCtx;

    use super::{KEY_LEN, NONCE_LEN};

    /// Longest buffer this path takes (a cell body is 1019 bytes).
    const MAX: usize = 1024;

    thread_local! {
        /// One ChaCha20 context per thread, keyed afresh for every call and wiped after it.
        static CTX: RefCell<Option<CipherCtx>> = const { RefCell::new(None) };
    }

    fn new_ctx() -> Option<CipherCtx> {
        let mut ctx = CipherCtx::new().ok()?;
        ctx.encrypt_init(Some(Cipher::chacha20()), None, None)
            .ok()?;
        Some(ctx)
    }

    /// `buf ^= ChaCha20(key, nonce)[0..buf.len()]` (block counter from 0). Returns `false`, with
    /// `buf` untouched, if OpenSSL cannot do it; the caller then uses its own code.
    pub(super) fn keystream_xor(
        key: &[u8; KEY_LEN],
        nonce: &[u8; NONCE_LEN],
        buf: &mut [u8],
    ) -> bool {
        let len = buf.len();
        if len == 0 || len > MAX {
            return false;
        }
        // OpenSSL's IV for ChaCha20: block counter u32le || nonce.
        let mut iv = [0u8; 16];
        iv[4..].copy_from_slice(nonce);
        // The output needs one spare byte (block size 1); the result is `buf ^ keystream`, which
        // is what goes back into `buf`, so this copy holds nothing `buf` will not.
        let mut out = [0u8; MAX + 1];
        let done = CTX.with(|c| {
            let Ok(mut slot) = c.try_borrow_mut() else {
                return false;
            };
            if slot.is_none() {
                *slot = new_ctx();
            }
            let Some(ctx) = slot.as_mut() else {
                return false;
            };
            let ok = ctx.encrypt_init(None, Some(key), Some(&iv)).is_ok()
                && out
                    .get_mut(..=len)
                    .is_some_and(|o| matches!(ctx.cipher_update(buf, Some(o)), Ok(n) if n == len));
            // Do not leave this cell's key in the context until the next call (the key alone is
            // enough: the IV is public).
            if ctx.encrypt_init(None, Some(&[0u8; KEY_LEN]), None).is_err() {
                *slot = None;
            }
            ok
        });
        if done && let Some(o) = out.get(..len) {
            buf.copy_from_slice(o);
            return true;
        }
        false
    }
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

    /// RFC 8439 §2.3.2: the block function.
    #[test]
    fn rfc8439_block_vector() {
        let key: [u8; 32] =
            hex::decode("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
                .unwrap()
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = hex::decode("000000090000004a00000000")
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = [0u8; 64];
        chacha20_block(&key, 1, &nonce, &mut out);
        let expect = concat!(
            "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e",
            "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
        );
        assert_eq!(hex::encode(out), expect);
    }

    proptest::proptest! {
        /// The scalar and ring-assisted keystream equals the RustCrypto `chacha20` crate's at every
        /// offset and length we use (and more).
        #[test]
        fn keystream_matches_rustcrypto(key in proptest::array::uniform32(0u8..), nonce in proptest::array::uniform12(0u8..), offset in 0u32..1200, len in 0usize..1100) {
            use chacha20::cipher::{KeyIvInit as _, StreamCipher as _, StreamCipherSeek as _};
            let mut a = vec![0x33u8; len];
            let mut b = a.clone();
            keystream_xor(&key, &nonce, offset, &mut a);
            let mut c = chacha20::ChaCha20::new((&key).into(), (&nonce).into());
            c.seek(offset);
            c.apply_keystream(&mut b);
            proptest::prop_assert_eq!(a, b);
        }

        /// From offset 0 (the backward layer: the OpenSSL path when that feature is on), on
        /// arbitrary data, lengths around and beyond a cell body.
        #[test]
        fn keystream_from_zero_matches_rustcrypto(key in proptest::array::uniform32(0u8..), nonce in proptest::array::uniform12(0u8..), data in proptest::collection::vec(0u8.., 200..1100)) {
            use chacha20::cipher::{KeyIvInit as _, StreamCipher as _};
            let mut a = data.clone();
            let mut b = data;
            keystream_xor(&key, &nonce, 0, &mut a);
            let mut c = chacha20::ChaCha20::new((&key).into(), (&nonce).into());
            c.apply_keystream(&mut b);
            proptest::prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn ratchet_step_is_first_256_bytes() {
        let key = [0x42u8; 32];
        let mut r = [0u8; 256];
        ratchet_step(&key, &mut r);
        let mut k = [0u8; 256];
        keystream_xor(&key, &[0; 12], 0, &mut k);
        assert_eq!(r, k);
        // Long run through ring from offset 0 (the backward layer) equals the scalar stream.
        let mut long = [0u8; 1019];
        keystream_xor(&key, &[1; 12], 0, &mut long);
        let mut short = [0u8; 1019];
        scalar_keystream_xor(&key, &[1; 12], 0, &mut short);
        assert_eq!(long, short);
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
