//! Relay-cell crypto (design §3): per-hop ChaCha20-Poly1305 with a per-cell key ratchet,
//! "short-MAC-and-pad" with a Sphinx-style filler tail. Byte layout in `docs/protocol/30-relay-crypto.md`.
//!
//! ```text
//! relay cell body (1019) = tag T[16] | ciphertext C[1003]
//! forward plaintext at destination hop k = 0x00*16 | relay msg [939] … random pad | tail[16·(k−1)]
//! backward plaintext                     = relay msg [939] … random pad
//! ```
//!
//! Invariants:
//! - Each direction of each hop has one [`DirState`]-like chain key and counter; the state types are
//!   neither `Clone` nor `Copy` and zeroize their keys on drop.
//! - Per cell `S = ChaCha20(ck, nonce 0^12)[0..96] = next_ck | k_aead | k_aux`; the AEAD nonce is
//!   `0^4 || u64be(ctr)`. A chain key is used for exactly one cell; the state advances only after
//!   the cell was authenticated (relay) or built (client). So no (key, nonce) pair repeats.
//! - Counters never wrap: at `ctr = 2^32` every operation returns [`CryptoError::CounterExhausted`].
//! - The forward AD is the one link `cmd` byte (RELAY or RELAY_EARLY); a switch fails at the next hop.
//! - Any `Err` from a method means "destroy the circuit (reason NONE)". After an authentication
//!   failure the state is poisoned and every later call fails too.
//! - No heap allocation per cell; padding comes from the OS-seeded CSPRNG.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::aead;
use crate::ct::ct_is_zero;
use crate::err::CryptoError;
use crate::handshake::HopKeys;
use crate::keys::KEY_LEN;

/// Length of a relay cell body (a link cell is 1024 bytes: circ_id u32 | cmd u8 | body).
pub const CELL_BODY_LEN: usize = 1019;
/// Length of the per-hop AEAD tag at the start of every body.
pub const TAG_LEN: usize = 16;
/// Largest number of hops on a circuit (the filler reserve is sized for it).
pub const MAX_HOPS: usize = 4;
/// Largest relay data field.
pub const MAX_DATA: usize = 934;
/// Length of the relay message region: `relay_cmd u8 | stream_id u16 | len u16 | data[934]`.
pub const RELAY_MSG_LEN: usize = 5 + MAX_DATA;
/// Where the relay message starts in a recognized forward body (after tag and zero marker).
pub const FORWARD_MSG_OFFSET: usize = TAG_LEN + MARKER_LEN;
/// Where the relay message starts in a backward body after [`ClientCircuitCrypto::decrypt_backward`].
pub const BACKWARD_MSG_OFFSET: usize = TAG_LEN;

/// A relay cell body.
pub type CellBody = [u8; CELL_BODY_LEN];
/// A per-hop AEAD tag; the origin-layer tag is what authenticated SENDMEs echo.
pub type Tag = [u8; TAG_LEN];

/// `N`: ciphertext (and plaintext) length.
const N: usize = CELL_BODY_LEN - TAG_LEN;
/// The zero marker that identifies a forward cell's destination.
const MARKER_LEN: usize = 16;
/// Filler bytes a hop appends when it passes a cell on.
const FILLER_LEN: usize = 16;
/// Counters must stay below this; at this value the circuit is dead.
const CTR_LIMIT: u64 = 1 << 32;

const _: () =
    assert!(FORWARD_MSG_OFFSET + RELAY_MSG_LEN + FILLER_LEN * (MAX_HOPS - 1) <= CELL_BODY_LEN);
const _: () = assert!(BACKWARD_MSG_OFFSET + RELAY_MSG_LEN <= CELL_BODY_LEN);

/// The keys of one cell: `next_ck | k_aead | k_aux`, wiped on drop.
struct CellKeys {
    s: Zeroizing<[u8; 3 * KEY_LEN]>,
    nonce: [u8; aead::NONCE_LEN],
}

impl CellKeys {
    fn empty() -> Self {
        Self {
            s: Zeroizing::new([0u8; 3 * KEY_LEN]),
            nonce: [0u8; aead::NONCE_LEN],
        }
    }
    fn next_ck(&self) -> &[u8; KEY_LEN] {
        self.s.first_chunk().unwrap_or(&[0; KEY_LEN])
    }
    fn k_aead(&self) -> &[u8; KEY_LEN] {
        self.s
            .get(KEY_LEN..)
            .and_then(<[u8]>::first_chunk)
            .unwrap_or(&[0; KEY_LEN])
    }
    fn k_aux(&self) -> &[u8; KEY_LEN] {
        self.s.last_chunk().unwrap_or(&[0; KEY_LEN])
    }
}

/// One direction of one hop: chain key and counter. Neither `Clone` nor `Copy`.
#[derive(Zeroize, ZeroizeOnDrop)]
struct DirState {
    ck: [u8; KEY_LEN],
    ctr: u64,
}

impl DirState {
    fn new(ck: &[u8; KEY_LEN]) -> Self {
        Self { ck: *ck, ctr: 0 }
    }

    /// Derive this cell's keys into `out` without advancing.
    fn peek_into(&self, out: &mut CellKeys) -> Result<(), CryptoError> {
        if self.ctr >= CTR_LIMIT {
            return Err(CryptoError::CounterExhausted);
        }
        out.s.fill(0);
        aead::keystream_xor(&self.ck, &[0u8; aead::NONCE_LEN], 0, &mut out.s[..]);
        out.nonce = [0u8; aead::NONCE_LEN];
        out.nonce[4..].copy_from_slice(&self.ctr.to_be_bytes());
        Ok(())
    }

    fn peek(&self) -> Result<CellKeys, CryptoError> {
        let mut k = CellKeys::empty();
        self.peek_into(&mut k)?;
        Ok(k)
    }

    /// Advance after the cell with keys `k` (from [`Self::peek`]) was processed.
    fn commit(&mut self, k: &CellKeys) -> Result<(), CryptoError> {
        self.ck = *k.next_ck();
        self.ctr = self
            .ctr
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted)?;
        Ok(())
    }
}

/// Fill padding bytes from the CSPRNG (or, in tests, a fixed pattern when enabled on this thread).
fn fill_padding(buf: &mut [u8]) {
    #[cfg(test)]
    if test_hooks::fixed_padding() {
        test_hooks::fixed_pattern(buf);
        return;
    }
    crate::rng::fill_random(buf);
}

/// What a relay does with a forward cell after [`RelayHopCrypto::decrypt_forward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// The cell is for this hop: the relay message is at `body[FORWARD_MSG_OFFSET..][..RELAY_MSG_LEN]`.
    Recognized {
        /// The origin-layer tag this hop verified (echoed by authenticated SENDMEs).
        tag: Tag,
    },
    /// Not for this hop: `body` is now the next hop's body; send it on with the same `cmd`.
    Pass,
}

/// A relay's crypto state for one circuit hop. Not `Clone`; zeroized on drop.
pub struct RelayHopCrypto {
    fwd: DirState,
    bwd: DirState,
    poisoned: bool,
}

impl fmt::Debug for RelayHopCrypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RelayHopCrypto([redacted])")
    }
}

impl RelayHopCrypto {
    /// The state after a handshake (counters at 0).
    pub fn new(keys: &HopKeys) -> Self {
        Self {
            fwd: DirState::new(keys.forward()),
            bwd: DirState::new(keys.backward()),
            poisoned: false,
        }
    }

    #[cfg(test)]
    pub(crate) fn with_counters(keys: &HopKeys, ctr: u64) -> Self {
        let mut s = Self::new(keys);
        s.fwd.ctr = ctr;
        s.bwd.ctr = ctr;
        s
    }

    fn check(&self) -> Result<(), CryptoError> {
        if self.poisoned {
            Err(CryptoError::CellAuthFailed)
        } else {
            Ok(())
        }
    }

    /// Remove this hop's layer from a forward (RELAY or RELAY_EARLY) cell. `cmd` is the link command
    /// byte the cell arrived with (it is the AEAD's associated data).
    pub fn decrypt_forward(
        &mut self,
        cmd: u8,
        body: &mut CellBody,
    ) -> Result<Forward, CryptoError> {
        self.check()?;
        let keys = self.fwd.peek()?;
        let (tag, _) = body
            .split_first_chunk::<TAG_LEN>()
            .ok_or(CryptoError::CellAuthFailed)?;
        let tag = *tag;
        // Decrypt C = body[16..] to body[0..N] (shifted in place): ready to pass on unchanged.
        if let Err(e) = aead::open_shifted(keys.k_aead(), &keys.nonce, &[cmd], &tag, body, TAG_LEN)
        {
            self.poisoned = true;
            return Err(e);
        }
        self.fwd.commit(&keys)?;
        let is_ours = body.get(..MARKER_LEN).is_some_and(ct_is_zero);
        if is_ours {
            // Put P back at body[16..] so the message sits at FORWARD_MSG_OFFSET.
            body.copy_within(0..N, TAG_LEN);
            Ok(Forward::Recognized { tag })
        } else {
            let tail = body
                .last_chunk_mut::<FILLER_LEN>()
                .ok_or(CryptoError::CellAuthFailed)?;
            tail.copy_from_slice(
                keys.k_aux()
                    .first_chunk::<FILLER_LEN>()
                    .unwrap_or(&[0; FILLER_LEN]),
            );
            Ok(Forward::Pass)
        }
    }

    /// Originate a backward cell carrying `msg` (at most [`RELAY_MSG_LEN`] bytes: the encoded relay
    /// message); the rest of the plaintext is random padding. Returns the tag (for SENDMEs).
    pub fn encrypt_backward(
        &mut self,
        cmd: u8,
        msg: &[u8],
        body: &mut CellBody,
    ) -> Result<Tag, CryptoError> {
        self.check()?;
        if msg.len() > RELAY_MSG_LEN {
            return Err(CryptoError::MessageTooLong {
                len: msg.len(),
                max: RELAY_MSG_LEN,
            });
        }
        let keys = self.bwd.peek()?;
        let (tag_out, p) = body.split_at_mut(TAG_LEN);
        let (m, pad) = p.split_at_mut(msg.len());
        m.copy_from_slice(msg);
        fill_padding(pad);
        let tag = aead::seal(keys.k_aead(), &keys.nonce, &[cmd], p)?;
        tag_out.copy_from_slice(&tag);
        self.bwd.commit(&keys)?;
        Ok(tag)
    }

    /// Add this hop's layer to a backward cell from a hop further along:
    /// `body ^= ChaCha20(k_aux, nonce(ctr_b))[0..1019]`.
    pub fn relay_backward(&mut self, body: &mut CellBody) -> Result<(), CryptoError> {
        self.check()?;
        let keys = self.bwd.peek()?;
        aead::keystream_encrypt(keys.k_aux(), &keys.nonce, body);
        self.bwd.commit(&keys)
    }
}

/// One hop as the client sees it.
struct ClientHop {
    fwd: DirState,
    bwd: DirState,
}

/// The client's crypto state for a whole circuit (up to [`MAX_HOPS`] hops). Not `Clone`.
pub struct ClientCircuitCrypto {
    hops: Vec<ClientHop>,
    poisoned: bool,
}

impl fmt::Debug for ClientCircuitCrypto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClientCircuitCrypto({} hops, [redacted])",
            self.hops.len()
        )
    }
}

impl Default for ClientCircuitCrypto {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientCircuitCrypto {
    /// A circuit with no hops yet.
    pub fn new() -> Self {
        Self {
            hops: Vec::with_capacity(MAX_HOPS),
            poisoned: false,
        }
    }

    /// Append a hop after its handshake completed.
    pub fn add_hop(&mut self, keys: &HopKeys) -> Result<(), CryptoError> {
        self.check()?;
        if self.hops.len() >= MAX_HOPS {
            return Err(CryptoError::TooManyHops { max: MAX_HOPS });
        }
        self.hops.push(ClientHop {
            fwd: DirState::new(keys.forward()),
            bwd: DirState::new(keys.backward()),
        });
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn add_hop_with_counters(
        &mut self,
        keys: &HopKeys,
        ctr: u64,
    ) -> Result<(), CryptoError> {
        self.add_hop(keys)?;
        if let Some(h) = self.hops.last_mut() {
            h.fwd.ctr = ctr;
            h.bwd.ctr = ctr;
        }
        Ok(())
    }

    /// Number of hops.
    pub fn n_hops(&self) -> usize {
        self.hops.len()
    }

    fn check(&self) -> Result<(), CryptoError> {
        if self.poisoned {
            Err(CryptoError::CellAuthFailed)
        } else {
            Ok(())
        }
    }

    /// Build a forward cell for hop `hop` (0-based) carrying `msg` (at most [`RELAY_MSG_LEN`]
    /// bytes), to be sent on the link with command `cmd` (RELAY or RELAY_EARLY). Returns the
    /// origin-layer tag `T_k` (for SENDMEs). Advances the ratchets of hops `0..=hop` only.
    pub fn encrypt_forward(
        &mut self,
        hop: usize,
        cmd: u8,
        msg: &[u8],
        out: &mut CellBody,
    ) -> Result<Tag, CryptoError> {
        self.check()?;
        if msg.len() > RELAY_MSG_LEN {
            return Err(CryptoError::MessageTooLong {
                len: msg.len(),
                max: RELAY_MSG_LEN,
            });
        }
        let hops = self.hops.get_mut(..=hop).ok_or(CryptoError::NoSuchHop)?;
        let mut keys: [CellKeys; MAX_HOPS] = std::array::from_fn(|_| CellKeys::empty());
        for (h, k) in hops.iter().zip(keys.iter_mut()) {
            h.fwd.peek_into(k)?;
        }
        let keys = keys.get(..hops.len()).ok_or(CryptoError::NoSuchHop)?;
        let (dest, before) = keys.split_last().ok_or(CryptoError::NoSuchHop)?;

        // The tail R that hops 1..k-1 will force onto the end of C_k.
        let mut r_buf = [0u8; FILLER_LEN * (MAX_HOPS - 1)];
        let mut r_len = 0usize;
        for k in before {
            let r = r_buf.get_mut(..r_len).ok_or(CryptoError::NoSuchHop)?;
            aead::keystream_xor(k.k_aead(), &k.nonce, ks_offset(N - r_len), r);
            let f = r_buf
                .get_mut(r_len..r_len + FILLER_LEN)
                .ok_or(CryptoError::NoSuchHop)?;
            f.copy_from_slice(k.k_aux().get(..FILLER_LEN).ok_or(CryptoError::NoSuchHop)?);
            r_len += FILLER_LEN;
        }
        let r = r_buf.get(..r_len).ok_or(CryptoError::NoSuchHop)?;

        // P_k = marker | msg | random pad | (R xor KS_k[N-|R|..N]).
        {
            let (marker, rest) = out
                .get_mut(TAG_LEN..)
                .ok_or(CryptoError::NoSuchHop)?
                .split_at_mut(MARKER_LEN);
            marker.fill(0);
            let (m, rest) = rest.split_at_mut(msg.len());
            m.copy_from_slice(msg);
            let (pad, tail) = rest.split_at_mut(rest.len() - r_len);
            fill_padding(pad);
            tail.copy_from_slice(r);
            aead::keystream_xor(dest.k_aead(), &dest.nonce, ks_offset(N - r_len), tail);
        }
        let t_k = seal_layer(dest, cmd, out)?;
        debug_assert!(out.ends_with(r), "filler tail mismatch");

        for k in before.iter().rev() {
            out.copy_within(0..N, TAG_LEN);
            seal_layer(k, cmd, out)?;
        }
        for (h, k) in hops.iter_mut().zip(keys) {
            h.fwd.commit(k)?;
        }
        Ok(t_k)
    }

    /// Peel a backward cell that arrived with link command `cmd`. Returns the 0-based hop that
    /// originated it and its tag; the relay message is then at
    /// `body[BACKWARD_MSG_OFFSET..][..RELAY_MSG_LEN]`. Advances the ratchets of hops `0..=hop`.
    pub fn decrypt_backward(
        &mut self,
        cmd: u8,
        body: &mut CellBody,
    ) -> Result<(usize, Tag), CryptoError> {
        self.check()?;
        let mut keys: [CellKeys; MAX_HOPS] = std::array::from_fn(|_| CellKeys::empty());
        let mut saved = Zeroizing::new([0u8; CELL_BODY_LEN]);
        let mut found = None;
        for (j, (h, k)) in self.hops.iter().zip(keys.iter_mut()).enumerate() {
            h.bwd.peek_into(k)?;
            let tag: Tag = *body.first_chunk().ok_or(CryptoError::CellAuthFailed)?;
            saved.copy_from_slice(body);
            let p = body.get_mut(TAG_LEN..).ok_or(CryptoError::CellAuthFailed)?;
            if aead::open(k.k_aead(), &k.nonce, &[cmd], &tag, p).is_ok() {
                found = Some((j, tag));
                break;
            }
            body.copy_from_slice(&saved[..]);
            aead::keystream_xor(k.k_aux(), &k.nonce, 0, body);
        }
        let Some((j, tag)) = found else {
            self.poisoned = true;
            return Err(CryptoError::CellAuthFailed);
        };
        for (h, k) in self.hops.iter_mut().zip(&keys).take(j + 1) {
            h.bwd.commit(k)?;
        }
        Ok((j, tag))
    }
}

/// Byte offset in the raw ChaCha20 stream of byte `a` of the AEAD message keystream.
fn ks_offset(a: usize) -> u32 {
    // a <= N < 1019, so this never truncates.
    u32::try_from(64 + a).unwrap_or(u32::MAX)
}

/// Seal `out[16..]` in place with `k` and put the tag at `out[..16]`.
fn seal_layer(k: &CellKeys, cmd: u8, out: &mut CellBody) -> Result<Tag, CryptoError> {
    let (tag_out, p) = out.split_at_mut(TAG_LEN);
    let tag = aead::seal(k.k_aead(), &k.nonce, &[cmd], p)?;
    tag_out.copy_from_slice(&tag);
    Ok(tag)
}

/// Test-only hooks: fixed padding for known-answer vectors.
#[cfg(test)]
pub(crate) mod test_hooks {
    use std::cell::Cell;

    thread_local! {
        static FIXED: Cell<bool> = const { Cell::new(false) };
    }

    /// Use the fixed padding pattern on this thread (for known-answer vectors).
    #[allow(dead_code)]
    pub(crate) fn set_fixed_padding(on: bool) {
        FIXED.with(|f| f.set(on));
    }

    pub(super) fn fixed_padding() -> bool {
        FIXED.with(Cell::get)
    }

    /// Padding byte `i` of a region is `(i * 7 + 0x5a) mod 256`.
    pub(super) fn fixed_pattern(buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i.wrapping_mul(7).wrapping_add(0x5a) & 0xff) as u8;
        }
    }
}

#[cfg(test)]
mod tests;
