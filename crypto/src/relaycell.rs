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
//! - Each direction of each hop has one `DirState` (chain key and counter); the state types are
//!   neither `Clone` nor `Copy` and zeroize their keys on drop.
//! - Ratchet: one ChaCha20 call per three cells, `S = ChaCha20(ck, nonce 0^12)[0..224] =
//!   next_ck | (k_aead | k_aux) x 3` (design §3.3 keys one cell per call; the amendment and its
//!   reason are in `docs/protocol/30-relay-crypto.md`). The AEAD nonce is `0^4 || u64be(ctr)`. Every
//!   chain key and every cell key is used once and wiped after use (per-cell forward secrecy); the
//!   state advances only after the cell was authenticated (relay) or built (client). So no
//!   (key, nonce) pair repeats.
//! - Counters never wrap: at `ctr = 2^32` every operation returns [`CryptoError::CounterExhausted`].
//! - The forward AD is the one link `cmd` byte (RELAY or RELAY_EARLY); a switch fails at the next hop.
//! - Any `Err` from a method means "destroy the circuit (reason NONE)". After an authentication
//!   failure the state is poisoned and every later call fails too.
//! - No heap allocation per cell; padding comes from the OS-seeded CSPRNG.

use std::fmt;

use zeroize::{Zeroize, Zeroizing};

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

/// Cells keyed by one ratchet step.
const CELLS_PER_STEP: u64 = 3;
/// Bytes of keystream one ratchet step yields: four ChaCha20 blocks, of which
/// `32 + 64 * CELLS_PER_STEP = 224` are used.
const STEP_LEN: usize = 256;
/// Key material per cell in a step: `k_aead | k_aux`.
const CELL_KEYS_LEN: usize = 2 * KEY_LEN;

const _: () = assert!(KEY_LEN + CELL_KEYS_LEN * CELLS_PER_STEP as usize <= STEP_LEN);

/// The keys of one cell: `k_aead | k_aux` and the nonce, wiped on drop.
struct CellKeys {
    k: Zeroizing<[u8; CELL_KEYS_LEN]>,
    nonce: [u8; aead::NONCE_LEN],
}

impl CellKeys {
    fn empty() -> Self {
        Self {
            k: Zeroizing::new([0u8; CELL_KEYS_LEN]),
            nonce: [0u8; aead::NONCE_LEN],
        }
    }
    fn k_aead(&self) -> &[u8; KEY_LEN] {
        self.k.first_chunk().unwrap_or(&[0; KEY_LEN])
    }
    fn k_aux(&self) -> &[u8; KEY_LEN] {
        self.k.last_chunk().unwrap_or(&[0; KEY_LEN])
    }
}

/// `(k_aead, k_aux, nonce)` of the current cell, borrowed from a [`DirState`].
type KeysRef<'a> = (&'a [u8; KEY_LEN], &'a [u8; KEY_LEN], [u8; aead::NONCE_LEN]);

/// One direction of one hop: the ratchet and the cell counter. Neither `Clone` nor `Copy`.
///
/// Step `i` covers cells `3i, 3i+1, 3i+2`: `S_i = ChaCha20(ck_i, 0^12)[0..224]`,
/// `ck_{i+1} = S_i[0..32]`, and cell `3i+r` uses `k_aead = S_i[32+64r..64+64r]`,
/// `k_aux = S_i[64+64r..96+64r]`. `ck_i` is wiped as soon as `S_i` is computed and each cell's keys
/// as soon as the cell is done, so the state never holds a key of a past cell.
struct DirState {
    /// `ck_i` while the step is not expanded.
    ck: Zeroizing<[u8; KEY_LEN]>,
    /// `S_i` once expanded (used slots are wiped).
    step: Zeroizing<[u8; STEP_LEN]>,
    expanded: bool,
    ctr: u64,
}

impl DirState {
    fn new(ck: &[u8; KEY_LEN]) -> Self {
        Self {
            ck: Zeroizing::new(*ck),
            step: Zeroizing::new([0u8; STEP_LEN]),
            expanded: false,
            ctr: 0,
        }
    }

    fn slot(&self) -> usize {
        KEY_LEN + CELL_KEYS_LEN * (self.ctr % CELLS_PER_STEP) as usize
    }

    /// The keys of cell `ctr`, borrowed from the state (expanding the step if needed), without
    /// advancing: `(k_aead, k_aux, nonce)`.
    fn current(&mut self) -> Result<KeysRef<'_>, CryptoError> {
        if self.ctr >= CTR_LIMIT {
            return Err(CryptoError::CounterExhausted);
        }
        if !self.expanded {
            aead::ratchet_step(&self.ck, &mut self.step);
            self.ck.zeroize();
            // Bytes 224..256 of the step are never used.
            if let Some(unused) = self
                .step
                .get_mut(KEY_LEN + CELL_KEYS_LEN * CELLS_PER_STEP as usize..)
            {
                unused.zeroize();
            }
            self.expanded = true;
        }
        let slot = self.slot();
        let k_aead = self
            .step
            .get(slot..)
            .and_then(<[u8]>::first_chunk::<KEY_LEN>)
            .ok_or(CryptoError::CellAuthFailed)?;
        let k_aux = self
            .step
            .get(slot + KEY_LEN..)
            .and_then(<[u8]>::first_chunk::<KEY_LEN>)
            .ok_or(CryptoError::CellAuthFailed)?;
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce[4..].copy_from_slice(&self.ctr.to_be_bytes());
        Ok((k_aead, k_aux, nonce))
    }

    /// Copy the keys of cell `ctr` into `out` without advancing.
    fn peek_into(&mut self, out: &mut CellKeys) -> Result<(), CryptoError> {
        let (k_aead, k_aux, nonce) = self.current()?;
        out.k[..KEY_LEN].copy_from_slice(k_aead);
        out.k[KEY_LEN..].copy_from_slice(k_aux);
        out.nonce = nonce;
        Ok(())
    }

    /// Advance after the cell peeked last was processed: wipe its keys, move to the next cell.
    fn commit(&mut self) -> Result<(), CryptoError> {
        let slot = self.slot();
        if let Some(k) = self.step.get_mut(slot..slot + CELL_KEYS_LEN) {
            k.zeroize();
        }
        self.ctr = self
            .ctr
            .checked_add(1)
            .ok_or(CryptoError::CounterExhausted)?;
        if self.ctr.is_multiple_of(CELLS_PER_STEP) {
            if let Some(next) = self.step.first_chunk_mut::<KEY_LEN>() {
                self.ck.copy_from_slice(next);
                next.zeroize();
            }
            // Every cell slot was wiped by its own commit.
            debug_assert!(self.step.iter().all(|b| *b == 0));
            self.expanded = false;
        }
        Ok(())
    }

    #[cfg(test)]
    fn set_counter(&mut self, ctr: u64) {
        self.ctr = ctr;
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

/// Set once any cell fails authentication; from then on every call on that state fails, so a
/// circuit cannot be resynchronised by an attacker after a forgery attempt.
#[derive(Debug, Default)]
struct Poison(bool);

impl Poison {
    fn set(&mut self) {
        self.0 = true;
    }
    fn check(&self) -> Result<(), CryptoError> {
        if self.0 {
            Err(CryptoError::CellAuthFailed)
        } else {
            Ok(())
        }
    }
}

/// A relay's crypto state for one circuit hop. Not `Clone`; zeroized on drop.
pub struct RelayHopCrypto {
    fwd: DirState,
    bwd: DirState,
    poisoned: Poison,
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
            poisoned: Poison::default(),
        }
    }

    #[cfg(test)]
    pub(crate) fn with_counters(keys: &HopKeys, ctr: u64) -> Self {
        let mut s = Self::new(keys);
        s.fwd.set_counter(ctr);
        s.bwd.set_counter(ctr);
        s
    }

    fn check(&self) -> Result<(), CryptoError> {
        self.poisoned.check()
    }

    /// Remove this hop's layer from a forward (RELAY or RELAY_EARLY) cell. `cmd` is the link command
    /// byte the cell arrived with (it is the AEAD's associated data).
    pub fn decrypt_forward(
        &mut self,
        cmd: u8,
        body: &mut CellBody,
    ) -> Result<Forward, CryptoError> {
        self.check()?;
        let (tag, _) = body
            .split_first_chunk::<TAG_LEN>()
            .ok_or(CryptoError::CellAuthFailed)?;
        let tag = *tag;
        let (k_aead, k_aux, nonce) = self.fwd.current()?;
        // Decrypt C = body[16..] to body[0..N] (shifted in place): ready to pass on unchanged.
        if let Err(e) = aead::open_shifted(k_aead, &nonce, &[cmd], &tag, body, TAG_LEN) {
            self.poisoned.set();
            return Err(e);
        }
        // The forward k_aux[0..16] is the filler: it goes on the wire, so the copy is not secret.
        let filler = *k_aux
            .first_chunk::<FILLER_LEN>()
            .unwrap_or(&[0; FILLER_LEN]);
        self.fwd.commit()?;
        let is_ours = body.get(..MARKER_LEN).is_some_and(ct_is_zero);
        if is_ours {
            // Put P back at body[16..] so the message sits at FORWARD_MSG_OFFSET.
            body.copy_within(0..N, TAG_LEN);
            Ok(Forward::Recognized { tag })
        } else {
            let tail = body
                .last_chunk_mut::<FILLER_LEN>()
                .ok_or(CryptoError::CellAuthFailed)?;
            tail.copy_from_slice(&filler);
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
        let (k_aead, _, nonce) = self.bwd.current()?;
        let (tag_out, p) = body.split_at_mut(TAG_LEN);
        let (m, pad) = p.split_at_mut(msg.len());
        m.copy_from_slice(msg);
        fill_padding(pad);
        let tag = aead::seal(k_aead, &nonce, &[cmd], p)?;
        tag_out.copy_from_slice(&tag);
        self.bwd.commit()?;
        Ok(tag)
    }

    /// Add this hop's layer to a backward cell from a hop further along:
    /// `body ^= ChaCha20(k_aux, nonce(ctr_b))[0..1019]`.
    pub fn relay_backward(&mut self, body: &mut CellBody) -> Result<(), CryptoError> {
        self.check()?;
        let (_, k_aux, nonce) = self.bwd.current()?;
        aead::keystream_encrypt(k_aux, &nonce, body);
        self.bwd.commit()
    }
}

/// The associated data of every end-to-end layer: one byte that is no link command. The link
/// command cannot serve, since the rendezvous point turns forward cells (RELAY or RELAY_EARLY)
/// into backward ones (always RELAY); a fixed value also keeps an end-to-end ciphertext from ever
/// authenticating as a hop layer.
pub const E2E_AD: u8 = 0xE2;

/// Which end of an onion-service rendezvous a circuit is (the two ends of the end-to-end layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndToEndRole {
    /// The client: its cells to the virtual hop are built like forward cells to a relay hop
    /// (zero marker, with the `to_service` keys); it opens the service's cells with `to_client`.
    Client,
    /// The service: its cells to the virtual hop are built like backward origin cells (no
    /// marker, `to_client` keys) wrapped in its circuit's forward layers; it opens the client's
    /// cells with `to_service` after removing its own hops' backward layers.
    Service,
}

/// The end-to-end virtual hop: one ratchet per direction, keyed from the onion-service
/// handshake's `HopKeys` (`forward` = client to service, `backward` = service to client).
struct EndToEnd {
    role: EndToEndRole,
    to_service: DirState,
    to_client: DirState,
}

impl EndToEnd {
    /// The state of the cells this end sends.
    fn send_state(&mut self) -> &mut DirState {
        match self.role {
            EndToEndRole::Client => &mut self.to_service,
            EndToEndRole::Service => &mut self.to_client,
        }
    }
    /// The state of the cells this end receives.
    fn recv_state(&mut self) -> &mut DirState {
        match self.role {
            EndToEndRole::Client => &mut self.to_client,
            EndToEndRole::Service => &mut self.to_service,
        }
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
    /// The end-to-end virtual hop beyond the last real hop (onion-service rendezvous), if added.
    e2e: Option<EndToEnd>,
    poisoned: Poison,
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
            e2e: None,
            poisoned: Poison::default(),
        }
    }

    /// Append a hop after its handshake completed.
    pub fn add_hop(&mut self, keys: &HopKeys) -> Result<(), CryptoError> {
        self.check()?;
        if self.hops.len() >= MAX_HOPS || self.e2e.is_some() {
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
            h.fwd.set_counter(ctr);
            h.bwd.set_counter(ctr);
        }
        Ok(())
    }

    /// Number of hops, the end-to-end virtual hop included (it is the last one).
    pub fn n_hops(&self) -> usize {
        self.hops.len() + usize::from(self.e2e.is_some())
    }

    /// Add the end-to-end virtual hop after the last real hop (the rendezvous point), keyed by
    /// the onion-service handshake, in `role`. After this the circuit cannot be extended; hop
    /// index [`ClientCircuitCrypto::n_hops`]` - 1` is the virtual hop. Fails unless there is at
    /// least one real hop and at most `MAX_HOPS - 1` (the filler reserve holds `MAX_HOPS - 1`
    /// tails), or if a virtual hop is already there.
    pub fn add_end_to_end(
        &mut self,
        keys: &HopKeys,
        role: EndToEndRole,
    ) -> Result<(), CryptoError> {
        self.check()?;
        if self.e2e.is_some() || self.hops.len() >= MAX_HOPS {
            return Err(CryptoError::TooManyHops { max: MAX_HOPS });
        }
        if self.hops.is_empty() {
            return Err(CryptoError::NoSuchHop);
        }
        self.e2e = Some(EndToEnd {
            role,
            to_service: DirState::new(keys.forward()),
            to_client: DirState::new(keys.backward()),
        });
        Ok(())
    }

    /// The role of the end-to-end virtual hop, if there is one.
    pub fn end_to_end_role(&self) -> Option<EndToEndRole> {
        self.e2e.as_ref().map(|e| e.role)
    }

    fn check(&self) -> Result<(), CryptoError> {
        self.poisoned.check()
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
        let n = self.hops.len();
        let to_e2e = hop == n && self.e2e.is_some();
        let real = if to_e2e { n } else { hop.saturating_add(1) };
        let hops = self.hops.get_mut(..real).ok_or(CryptoError::NoSuchHop)?;
        let mut keys: [CellKeys; MAX_HOPS] = std::array::from_fn(|_| CellKeys::empty());
        for (h, k) in hops.iter_mut().zip(keys.iter_mut()) {
            h.fwd.peek_into(k)?;
        }
        let keys = keys.get(..hops.len()).ok_or(CryptoError::NoSuchHop)?;
        let t_k = if to_e2e {
            let e2e = self.e2e.as_mut().ok_or(CryptoError::NoSuchHop)?;
            let mut dest = CellKeys::empty();
            e2e.send_state().peek_into(&mut dest)?;
            // The client's cells carry the zero marker (the service checks it, as a relay hop
            // does); the service's cells are laid out as a backward origin cell.
            let marker = e2e.role == EndToEndRole::Client;
            let t = build_onion(keys, &dest, E2E_AD, marker, cmd, msg, out)?;
            e2e.send_state().commit()?;
            t
        } else {
            let (dest, before) = keys.split_last().ok_or(CryptoError::NoSuchHop)?;
            build_onion(before, dest, cmd, true, cmd, msg, out)?
        };
        for h in hops.iter_mut() {
            h.fwd.commit()?;
        }
        Ok(t_k)
    }

    /// Peel a backward cell that arrived with link command `cmd`. Returns the 0-based hop that
    /// originated it and its tag; the relay message is then at
    /// `body[BACKWARD_MSG_OFFSET..][..RELAY_MSG_LEN]`. Advances the ratchets of hops `0..=hop`.
    ///
    /// With an end-to-end virtual hop, a cell that authenticates under its layer (after every
    /// real hop's layer came off) comes from hop `n_hops() - 1`, whichever the role; for the
    /// service role its zero marker is checked and removed, so the message sits at the same
    /// offset as in every other backward cell.
    pub fn decrypt_backward(
        &mut self,
        cmd: u8,
        body: &mut CellBody,
    ) -> Result<(usize, Tag), CryptoError> {
        self.check()?;
        let n = self.hops.len();
        let mut keys: [CellKeys; MAX_HOPS] = std::array::from_fn(|_| CellKeys::empty());
        for (h, k) in self.hops.iter_mut().zip(keys.iter_mut()) {
            h.bwd.peek_into(k)?;
        }
        let keys = keys.get(..n).ok_or(CryptoError::NoSuchHop)?;
        // The body as it came off the link, every layer still on: ciphertext that the first hop
        // also saw, so this copy needs no wiping (wiping 1019 bytes with volatile stores cost more
        // than the copy itself).
        let saved: CellBody = *body;
        // Fast path: almost every backward cell (DATA, CONNECTED, END, SENDME, EXTENDED) comes from
        // the last hop, so peel the layers before it without trying their tags and try the last
        // hop's tag once. This is exactly what the general loop below computes when the origin is
        // the last hop, at one AEAD open instead of n.
        if let Some(e2e) = self.e2e.as_mut() {
            for k in keys {
                aead::keystream_xor(k.k_aux(), &k.nonce, 0, body);
            }
            let mut ek = CellKeys::empty();
            e2e.recv_state().peek_into(&mut ek)?;
            let tag: Tag = *body.first_chunk().ok_or(CryptoError::CellAuthFailed)?;
            let p = body.get_mut(TAG_LEN..).ok_or(CryptoError::CellAuthFailed)?;
            if aead::open(ek.k_aead(), &ek.nonce, &[E2E_AD], &tag, p).is_ok() {
                if e2e.role == EndToEndRole::Service {
                    // The client's cells carry the zero marker; without it the cell is not one
                    // the client built for us (authenticated, so the client itself misbehaves).
                    if !body
                        .get(TAG_LEN..FORWARD_MSG_OFFSET)
                        .is_some_and(ct_is_zero)
                    {
                        self.poisoned.set();
                        return Err(CryptoError::CellAuthFailed);
                    }
                    body.copy_within(FORWARD_MSG_OFFSET.., BACKWARD_MSG_OFFSET);
                }
                e2e.recv_state().commit()?;
                for h in self.hops.iter_mut() {
                    h.bwd.commit()?;
                }
                return Ok((n, tag));
            }
            body.copy_from_slice(&saved[..]);
        } else if let Some((last, inner)) = keys.split_last() {
            for k in inner {
                aead::keystream_xor(k.k_aux(), &k.nonce, 0, body);
            }
            let tag: Tag = *body.first_chunk().ok_or(CryptoError::CellAuthFailed)?;
            let p = body.get_mut(TAG_LEN..).ok_or(CryptoError::CellAuthFailed)?;
            if aead::open(last.k_aead(), &last.nonce, &[cmd], &tag, p).is_ok() {
                for h in self.hops.iter_mut() {
                    h.bwd.commit()?;
                }
                return Ok((n - 1, tag));
            }
            body.copy_from_slice(&saved[..]);
        }
        // General path: try each real hop in order (a cell from an intermediate hop, or a
        // forgery). Without a virtual hop the last hop was tried already.
        let tries = if self.e2e.is_some() {
            n
        } else {
            n.saturating_sub(1)
        };
        let mut found = None;
        for (j, k) in keys.iter().take(tries).enumerate() {
            let tag: Tag = *body.first_chunk().ok_or(CryptoError::CellAuthFailed)?;
            let before = Zeroizing::new(*body);
            let p = body.get_mut(TAG_LEN..).ok_or(CryptoError::CellAuthFailed)?;
            if aead::open(k.k_aead(), &k.nonce, &[cmd], &tag, p).is_ok() {
                found = Some((j, tag));
                break;
            }
            body.copy_from_slice(&before[..]);
            aead::keystream_xor(k.k_aux(), &k.nonce, 0, body);
        }
        let Some((j, tag)) = found else {
            self.poisoned.set();
            return Err(CryptoError::CellAuthFailed);
        };
        for h in self.hops.iter_mut().take(j + 1) {
            h.bwd.commit()?;
        }
        Ok((j, tag))
    }
}

/// Build the onion of a forward cell: the innermost layer with `dest` (AD `dest_ad`; with the
/// zero marker before `msg` if `marker`), then one layer per key in `before`, last first (AD
/// `cmd`). The innermost ciphertext ends with the tail the hops in `before` will force on it
/// (design §3.4). Returns the innermost tag. Commits nothing.
fn build_onion(
    before: &[CellKeys],
    dest: &CellKeys,
    dest_ad: u8,
    marker: bool,
    cmd: u8,
    msg: &[u8],
    out: &mut CellBody,
) -> Result<Tag, CryptoError> {
    // The tail R that the hops in `before` will force onto the end of C_k.
    let mut r_buf = [0u8; FILLER_LEN * (MAX_HOPS - 1)];
    let mut r_len = 0usize;
    for k in before {
        let r = r_buf.get_mut(..r_len).ok_or(CryptoError::NoSuchHop)?;
        aead::keystream_xor(k.k_aead(), &k.nonce, ks_offset(N - r_len), r);
        let f = r_buf
            .get_mut(r_len..r_len + FILLER_LEN)
            .ok_or(CryptoError::TooManyHops { max: MAX_HOPS })?;
        f.copy_from_slice(k.k_aux().get(..FILLER_LEN).ok_or(CryptoError::NoSuchHop)?);
        r_len += FILLER_LEN;
    }
    let r = r_buf.get(..r_len).ok_or(CryptoError::NoSuchHop)?;
    let marker_len = if marker { MARKER_LEN } else { 0 };
    if marker_len + msg.len() + r_len > N {
        return Err(CryptoError::MessageTooLong {
            len: msg.len(),
            max: N - marker_len - r_len,
        });
    }

    // P_k = [marker] | msg | random pad | (R xor KS_k[N-|R|..N]).
    {
        let (marker_out, rest) = out
            .get_mut(TAG_LEN..)
            .ok_or(CryptoError::NoSuchHop)?
            .split_at_mut(marker_len);
        marker_out.fill(0);
        let (m, rest) = rest.split_at_mut(msg.len());
        m.copy_from_slice(msg);
        let (pad, tail) = rest.split_at_mut(rest.len() - r_len);
        fill_padding(pad);
        tail.copy_from_slice(r);
        aead::keystream_xor(dest.k_aead(), &dest.nonce, ks_offset(N - r_len), tail);
    }
    let t_k = seal_layer(dest, dest_ad, out)?;
    debug_assert!(out.ends_with(r), "filler tail mismatch");

    for k in before.iter().rev() {
        out.copy_within(0..N, TAG_LEN);
        seal_layer(k, cmd, out)?;
    }
    Ok(t_k)
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
mod e2e_tests;
#[cfg(test)]
mod kat;
#[cfg(test)]
mod tests;
