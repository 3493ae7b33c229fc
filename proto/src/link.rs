//! The link layer, sans-IO: Noise_XK_25519_ChaChaPoly_SHA256 over TCP (design §1).
//!
//! ```text
//! prologue = "allium-link-v1" || 0x00 || responder_ed25519_id[32]
//! framing  = len u16be || noise_msg[len]
//! msg1 (-> e, es)      payload: empty
//! msg2 (<- e, ee)      payload: ver u16 | unix_time u64 | 22 zero bytes       (32 bytes)
//! msg3 (-> s, se)      payload: ver u16 | unix_time u64 | flags u8 | 53 zeros (64 bytes)
//! transport frame      plaintext: 1..=32 whole 1024-byte cells
//! ```
//!
//! Bounds: handshake messages have `1 ≤ len ≤ 256`; transport frames need `1040 ≤ len ≤ 32784` and
//! `(len − 16) % 1024 == 0`. Anything else, and any `snow::Error`, is fatal: the link closes, it
//! never resyncs. Each direction rekeys (`rekey_outgoing` / `rekey_incoming`) after every
//! [`REKEY_INTERVAL`] frames. A [`LinkTransport`] that saw an error refuses all further use, in
//! both directions, also after [`LinkTransport::split`].
//!
//! The types here do no I/O and read no clock: the caller passes `now` (unix seconds) and moves
//! bytes. [`crate::channel`] is the tokio driver.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

use allium_crypto::{RelayId, X25519Public, X25519Secret};
use snow::{HandshakeState, StatelessTransportState};
use zeroize::Zeroizing;

use crate::cell::CELL_LEN;
use crate::codec::{Reader, Writer};
use crate::err::LinkError;

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XK_25519_ChaChaPoly_SHA256";
/// First part of the prologue; change it whenever the link protocol changes.
pub const PROLOGUE_LABEL: &[u8] = b"allium-link-v1";
/// Length of the prologue (`label || 0x00 || id[32]`).
pub const PROLOGUE_LEN: usize = PROLOGUE_LABEL.len() + 1 + 32;
/// The link protocol version carried in the msg2 / msg3 payloads.
pub const LINK_VERSION: u16 = 1;
/// Length of the frame length prefix.
pub const LEN_PREFIX: usize = 2;
/// Length of a Noise AEAD tag.
pub const NOISE_TAG_LEN: usize = 16;
/// Largest handshake message.
pub const MAX_HANDSHAKE_MSG_LEN: usize = 256;
/// msg2 payload length.
pub const MSG2_PAYLOAD_LEN: usize = 32;
/// msg3 payload length.
pub const MSG3_PAYLOAD_LEN: usize = 64;
/// Most cells in one transport frame.
pub const MAX_CELLS_PER_FRAME: usize = 32;
/// Smallest transport frame (one cell + tag).
pub const MIN_FRAME_LEN: usize = CELL_LEN + NOISE_TAG_LEN;
/// Largest transport frame (32 cells + tag).
pub const MAX_FRAME_LEN: usize = MAX_CELLS_PER_FRAME * CELL_LEN + NOISE_TAG_LEN;
/// Largest plaintext of a transport frame.
pub const MAX_FRAME_PLAINTEXT: usize = MAX_CELLS_PER_FRAME * CELL_LEN;
/// Frames per direction between two rekeys.
pub const REKEY_INTERVAL: u64 = 4096;
/// The whole handshake must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const _: () = assert!(MAX_FRAME_LEN + LEN_PREFIX <= u16::MAX as usize + LEN_PREFIX);
const _: () = assert!(MAX_FRAME_LEN == 32784 && MIN_FRAME_LEN == 1040);

/// The Noise prologue for a link whose responder has identity `responder_id`.
pub fn prologue(responder_id: &RelayId) -> [u8; PROLOGUE_LEN] {
    let mut p = [0u8; PROLOGUE_LEN];
    let (label, rest) = p.split_at_mut(PROLOGUE_LABEL.len());
    label.copy_from_slice(PROLOGUE_LABEL);
    if let Some(id) = rest.get_mut(1..) {
        id.copy_from_slice(responder_id.as_bytes());
    }
    p
}

/// Check a handshake message length prefix; returns the length of the message that follows.
pub fn handshake_msg_len(prefix: [u8; 2]) -> Result<usize, LinkError> {
    let len = usize::from(u16::from_be_bytes(prefix));
    if (1..=MAX_HANDSHAKE_MSG_LEN).contains(&len) {
        Ok(len)
    } else {
        Err(LinkError::BadFrameLength(len))
    }
}

/// Check a transport frame length prefix; returns the length of the frame that follows.
pub fn transport_frame_len(prefix: [u8; 2]) -> Result<usize, LinkError> {
    let len = usize::from(u16::from_be_bytes(prefix));
    if (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len)
        && (len - NOISE_TAG_LEN).is_multiple_of(CELL_LEN)
    {
        Ok(len)
    } else {
        Err(LinkError::BadFrameLength(len))
    }
}

/// If `buf` starts with a whole transport frame, return `(noise_msg, bytes_consumed)`.
/// `Ok(None)` means more bytes are needed; an invalid prefix is an error (close the link).
pub fn split_transport_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, LinkError> {
    let Some((prefix, rest)) = buf.split_first_chunk::<2>() else {
        return Ok(None);
    };
    let len = transport_frame_len(*prefix)?;
    Ok(rest.get(..len).map(|msg| (msg, LEN_PREFIX + len)))
}

/// What the peer said in its handshake payload (informational: clock-skew warnings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeInfo {
    /// The peer's link protocol version.
    pub peer_version: u16,
    /// The peer's clock, unix seconds.
    pub peer_unix_time: u64,
    /// The initiator's flags (msg3); 0 when we are the initiator.
    pub peer_flags: u8,
}

fn snow_err(_: snow::Error) -> LinkError {
    LinkError::Handshake
}

fn params() -> Result<snow::params::NoiseParams, LinkError> {
    NOISE_PARAMS
        .parse()
        .map_err(|_| LinkError::Misuse("noise parameters"))
}

/// A Noise builder with this build's crypto backends (`ring`; with the `openssl` feature, long
/// ChaChaPoly messages, i.e. transport frames, go through OpenSSL: the same bytes).
fn builder() -> Result<snow::Builder<'static>, LinkError> {
    #[cfg(feature = "openssl")]
    {
        Ok(snow::Builder::with_resolver(
            params()?,
            Box::new(crate::link_cipher::LinkResolver::new()),
        ))
    }
    #[cfg(not(feature = "openssl"))]
    {
        Ok(snow::Builder::new(params()?))
    }
}

fn write_framed(
    hs: &mut HandshakeState,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), LinkError> {
    let mut buf = [0u8; MAX_HANDSHAKE_MSG_LEN];
    let n = hs.write_message(payload, &mut buf).map_err(snow_err)?;
    let len = u16::try_from(n).map_err(|_| LinkError::Misuse("handshake message too long"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(buf.get(..n).unwrap_or_default());
    Ok(())
}

fn read_msg(
    hs: &mut HandshakeState,
    msg: &[u8],
    payload: &mut [u8; MAX_HANDSHAKE_MSG_LEN],
) -> Result<usize, LinkError> {
    if msg.is_empty() || msg.len() > MAX_HANDSHAKE_MSG_LEN {
        return Err(LinkError::BadFrameLength(msg.len()));
    }
    hs.read_message(msg, payload).map_err(snow_err)
}

fn encode_payload(now_unix: u64, flags: Option<u8>, out: &mut [u8]) -> Result<(), LinkError> {
    let mut w = Writer::new(out);
    let r = (|| {
        w.write_u16(LINK_VERSION)?;
        w.write_u64(now_unix)?;
        if let Some(f) = flags {
            w.write_u8(f)?;
        }
        w.zero_pad_to_end();
        Ok::<_, crate::ProtoError>(())
    })();
    r.map_err(|_| LinkError::Misuse("handshake payload"))
}

fn decode_payload(p: &[u8], len: usize, with_flags: bool) -> Result<HandshakeInfo, LinkError> {
    if p.len() != len {
        return Err(LinkError::BadPayload("wrong payload length"));
    }
    let mut r = Reader::for_object(p, "link handshake payload");
    let parse = |r: &mut Reader<'_>| -> crate::Result<HandshakeInfo> {
        let peer_version = r.take_u16()?;
        let peer_unix_time = r.take_u64()?;
        let peer_flags = if with_flags { r.take_u8()? } else { 0 };
        r.expect_zero_padding()?;
        Ok(HandshakeInfo {
            peer_version,
            peer_unix_time,
            peer_flags,
        })
    };
    let info = parse(&mut r).map_err(|_| LinkError::BadPayload("malformed payload"))?;
    if info.peer_version != LINK_VERSION {
        return Err(LinkError::BadPayload("unsupported link version"));
    }
    Ok(info)
}

/// The initiator after sending msg1, waiting for msg2.
pub struct Initiator {
    hs: HandshakeState,
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Initiator")
    }
}

impl Initiator {
    /// Start a handshake to the relay `peer_id` whose link key is `peer_link_key`. Relays pass
    /// their own link key as `our_static`; clients pass `None` and a fresh key is made. Appends the
    /// framed msg1 to `out`.
    pub fn start(
        peer_id: &RelayId,
        peer_link_key: &X25519Public,
        our_static: Option<&X25519Secret>,
        out: &mut Vec<u8>,
    ) -> Result<Self, LinkError> {
        let prologue = prologue(peer_id);
        let builder = builder()?;
        let fresh;
        let secret: &[u8] = match our_static {
            Some(s) => s.secret_bytes(),
            None => {
                let kp = builder.generate_keypair().map_err(snow_err)?;
                fresh = Zeroizing::new(kp.private);
                &fresh[..]
            }
        };
        let mut hs = builder
            .prologue(&prologue)
            .and_then(|b| b.local_private_key(secret))
            .and_then(|b| b.remote_public_key(peer_link_key.as_bytes()))
            .and_then(snow::Builder::build_initiator)
            .map_err(snow_err)?;
        write_framed(&mut hs, &[], out)?;
        Ok(Self { hs })
    }

    /// Process msg2 (without its length prefix) and append the framed msg3 to `out`.
    pub fn read_msg2(
        mut self,
        msg2: &[u8],
        now_unix: u64,
        out: &mut Vec<u8>,
    ) -> Result<(LinkTransport, HandshakeInfo), LinkError> {
        let mut payload = [0u8; MAX_HANDSHAKE_MSG_LEN];
        let n = read_msg(&mut self.hs, msg2, &mut payload)?;
        let info = decode_payload(
            payload.get(..n).unwrap_or_default(),
            MSG2_PAYLOAD_LEN,
            false,
        )?;
        let mut p3 = [0u8; MSG3_PAYLOAD_LEN];
        encode_payload(now_unix, Some(0), &mut p3)?;
        write_framed(&mut self.hs, &p3, out)?;
        let t = LinkTransport::new(self.hs)?;
        Ok((t, info))
    }
}

/// The responder waiting for msg1.
pub struct Responder {
    hs: HandshakeState,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Responder")
    }
}

impl Responder {
    /// A responder for the relay `our_id` with link key `our_link_key`.
    pub fn new(our_id: &RelayId, our_link_key: &X25519Secret) -> Result<Self, LinkError> {
        let prologue = prologue(our_id);
        let hs = builder()?
            .prologue(&prologue)
            .and_then(|b| b.local_private_key(our_link_key.secret_bytes()))
            .and_then(snow::Builder::build_responder)
            .map_err(snow_err)?;
        Ok(Self { hs })
    }

    /// Process msg1 (without its length prefix) and append the framed msg2 to `out`.
    pub fn read_msg1(
        mut self,
        msg1: &[u8],
        now_unix: u64,
        out: &mut Vec<u8>,
    ) -> Result<ResponderWait, LinkError> {
        let mut payload = [0u8; MAX_HANDSHAKE_MSG_LEN];
        let n = read_msg(&mut self.hs, msg1, &mut payload)?;
        if n != 0 {
            return Err(LinkError::BadPayload("msg1 payload must be empty"));
        }
        let mut p2 = [0u8; MSG2_PAYLOAD_LEN];
        encode_payload(now_unix, None, &mut p2)?;
        write_framed(&mut self.hs, &p2, out)?;
        Ok(ResponderWait { hs: self.hs })
    }
}

/// The responder after sending msg2, waiting for msg3.
pub struct ResponderWait {
    hs: HandshakeState,
}

impl fmt::Debug for ResponderWait {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponderWait")
    }
}

impl ResponderWait {
    /// Process msg3 (without its length prefix). Returns the transport and the peer's payload; the
    /// initiator's static key is [`LinkTransport::remote_static`].
    pub fn read_msg3(mut self, msg3: &[u8]) -> Result<(LinkTransport, HandshakeInfo), LinkError> {
        let mut payload = [0u8; MAX_HANDSHAKE_MSG_LEN];
        let n = read_msg(&mut self.hs, msg3, &mut payload)?;
        let info = decode_payload(payload.get(..n).unwrap_or_default(), MSG3_PAYLOAD_LEN, true)?;
        let t = LinkTransport::new(self.hs)?;
        Ok((t, info))
    }
}

/// State shared by the two halves of one link's transport.
///
/// The `RwLock` is taken for reading by every seal and open (so the two directions run at the same
/// time) and for writing only to rekey a direction, every [`REKEY_INTERVAL`] frames.
struct Shared {
    ts: RwLock<StatelessTransportState>,
    failed: AtomicBool,
    remote_static: X25519Public,
    initiator: bool,
}

impl Shared {
    fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn fail(&self) {
        self.failed.store(true, Ordering::Release);
    }

    fn read(&self) -> Result<RwLockReadGuard<'_, StatelessTransportState>, LinkError> {
        self.ts.read().map_err(|_| {
            self.fail();
            LinkError::Misuse("link transport lock poisoned")
        })
    }

    fn rekey(&self, outgoing: bool) -> Result<(), LinkError> {
        let mut ts = self.ts.write().map_err(|_| {
            self.fail();
            LinkError::Misuse("link transport lock poisoned")
        })?;
        if outgoing {
            ts.rekey_outgoing();
        } else {
            ts.rekey_incoming();
        }
        Ok(())
    }
}

/// An established link's Noise transport: seals and opens frames of whole cells.
///
/// [`LinkTransport::split`] gives a [`LinkSealer`] and a [`LinkOpener`] that can be used from two
/// threads at once. Each half keeps its own direction's nonce counter (the Noise nonce of the
/// `n`-th frame of a direction is `n`, counting from 0, as with a stateful Noise `CipherState`:
/// the bytes on the wire are the same) and rekeys its own direction. A failure in either half
/// poisons both.
pub struct LinkTransport {
    sealer: LinkSealer,
    opener: LinkOpener,
}

impl fmt::Debug for LinkTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkTransport")
            .field("initiator", &self.sealer.shared.initiator)
            .field("sent", &self.sealer.sent)
            .field("received", &self.opener.received)
            .field("failed", &self.sealer.shared.is_failed())
            .finish_non_exhaustive()
    }
}

impl LinkTransport {
    fn new(hs: HandshakeState) -> Result<Self, LinkError> {
        if !hs.is_handshake_finished() {
            return Err(LinkError::Misuse("handshake not finished"));
        }
        let mut rs = [0u8; 32];
        let remote = hs
            .get_remote_static()
            .ok_or(LinkError::Misuse("no remote static key"))?;
        if remote.len() != rs.len() {
            return Err(LinkError::Handshake);
        }
        rs.copy_from_slice(remote);
        let initiator = hs.is_initiator();
        let ts = hs.into_stateless_transport_mode().map_err(snow_err)?;
        let shared = Arc::new(Shared {
            ts: RwLock::new(ts),
            failed: AtomicBool::new(false),
            remote_static: X25519Public(rs),
            initiator,
        });
        Ok(Self {
            sealer: LinkSealer {
                shared: Arc::clone(&shared),
                sent: 0,
            },
            opener: LinkOpener {
                shared,
                received: 0,
            },
        })
    }

    /// The two directions, usable concurrently (for example by a reader and a writer task).
    pub fn split(self) -> (LinkSealer, LinkOpener) {
        (self.sealer, self.opener)
    }

    /// The peer's Noise static key (for the responder: the initiator's key, to look up in the
    /// consensus; a client's key is random per connection).
    pub fn remote_static(&self) -> X25519Public {
        self.sealer.shared.remote_static
    }

    /// True if this side initiated the link.
    pub fn is_initiator(&self) -> bool {
        self.sealer.shared.initiator
    }

    /// Frames sealed so far.
    pub fn frames_sent(&self) -> u64 {
        self.sealer.sent
    }

    /// Frames opened so far.
    pub fn frames_received(&self) -> u64 {
        self.opener.received
    }

    /// Seal `cells` (1 to 32 whole 1024-byte cells) into `out` as `len u16be || noise_msg`.
    /// `out` needs `cells.len() + 18` bytes. Returns the bytes written.
    pub fn seal_frame(&mut self, cells: &[u8], out: &mut [u8]) -> Result<usize, LinkError> {
        self.sealer.seal_frame(cells, out)
    }

    /// Open one transport frame (`noise_msg`, without its length prefix) into `out` (which needs
    /// `frame.len() − 16` bytes; give it `frame.len()` bytes to spare the AEAD a copy). Returns the
    /// plaintext length, a multiple of 1024. Any failure is fatal and poisons the transport.
    pub fn open_frame(&mut self, frame: &[u8], out: &mut [u8]) -> Result<usize, LinkError> {
        self.opener.open_frame(frame, out)
    }
}

/// The sending direction of a [`LinkTransport`].
pub struct LinkSealer {
    shared: Arc<Shared>,
    /// Frames sealed so far: the Noise nonce of the next frame.
    sent: u64,
}

impl fmt::Debug for LinkSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkSealer")
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl LinkSealer {
    /// Frames sealed so far.
    pub fn frames_sent(&self) -> u64 {
        self.sent
    }

    /// As [`LinkTransport::seal_frame`].
    pub fn seal_frame(&mut self, cells: &[u8], out: &mut [u8]) -> Result<usize, LinkError> {
        if self.shared.is_failed() {
            return Err(LinkError::Closed);
        }
        if cells.is_empty()
            || !cells.len().is_multiple_of(CELL_LEN)
            || cells.len() > MAX_FRAME_PLAINTEXT
        {
            return Err(LinkError::Misuse("a frame holds 1 to 32 whole cells"));
        }
        let (prefix, body) = out
            .split_first_chunk_mut::<2>()
            .ok_or(LinkError::Misuse("output buffer too small"))?;
        if body.len() < cells.len() + NOISE_TAG_LEN {
            return Err(LinkError::Misuse("output buffer too small"));
        }
        let r = self.shared.read()?.write_message(self.sent, cells, body);
        let Ok(n) = r else {
            self.shared.fail();
            return Err(LinkError::Closed);
        };
        let len = u16::try_from(n).map_err(|_| LinkError::Misuse("frame too long"))?;
        *prefix = len.to_be_bytes();
        // The nonce is never reused: it only grows, and the state fails before it could wrap.
        self.sent += 1;
        if self.sent.is_multiple_of(REKEY_INTERVAL) {
            self.shared.rekey(true)?;
        }
        Ok(LEN_PREFIX + n)
    }
}

/// The receiving direction of a [`LinkTransport`].
pub struct LinkOpener {
    shared: Arc<Shared>,
    /// Frames opened so far: the Noise nonce of the next frame.
    received: u64,
}

impl fmt::Debug for LinkOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkOpener")
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl LinkOpener {
    /// Frames opened so far.
    pub fn frames_received(&self) -> u64 {
        self.received
    }

    /// As [`LinkTransport::open_frame`].
    pub fn open_frame(&mut self, frame: &[u8], out: &mut [u8]) -> Result<usize, LinkError> {
        if self.shared.is_failed() {
            return Err(LinkError::Closed);
        }
        let r = self.open_inner(frame, out);
        if r.is_err() {
            self.shared.fail();
        }
        r
    }

    fn open_inner(&mut self, frame: &[u8], out: &mut [u8]) -> Result<usize, LinkError> {
        let len = u16::try_from(frame.len()).map_err(|_| LinkError::BadFrameLength(frame.len()))?;
        transport_frame_len(len.to_be_bytes())?;
        if out.len() < frame.len() - NOISE_TAG_LEN {
            return Err(LinkError::Misuse("output buffer too small"));
        }
        let n = self
            .shared
            .read()?
            .read_message(self.received, frame, out)
            .map_err(|_| LinkError::Decrypt)?;
        if n == 0 || !n.is_multiple_of(CELL_LEN) {
            return Err(LinkError::Decrypt);
        }
        self.received += 1;
        if self.received.is_multiple_of(REKEY_INTERVAL) {
            self.shared.rekey(false)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A finished handshake as raw snow states: (initiator, responder).
    fn raw_handshake() -> (HandshakeState, HandshakeState) {
        let id = RelayId([5; 32]);
        let key = X25519Secret::generate();
        let mut m1 = Vec::new();
        let init = Initiator::start(&id, &key.public(), None, &mut m1).unwrap();
        let mut m2 = Vec::new();
        let wait = Responder::new(&id, &key)
            .unwrap()
            .read_msg1(&m1[2..], 0, &mut m2)
            .unwrap();
        // Finish by hand to keep the HandshakeStates.
        let Initiator { mut hs } = init;
        let mut payload = [0u8; MAX_HANDSHAKE_MSG_LEN];
        read_msg(&mut hs, &m2[2..], &mut payload).unwrap();
        let mut m3 = Vec::new();
        let mut p3 = [0u8; MSG3_PAYLOAD_LEN];
        encode_payload(0, Some(0), &mut p3).unwrap();
        write_framed(&mut hs, &p3, &mut m3).unwrap();
        let ResponderWait { hs: mut rhs } = wait;
        read_msg(&mut rhs, &m3[2..], &mut payload).unwrap();
        (hs, rhs)
    }

    /// The split, stateless transport puts the same bytes on the wire as snow's stateful
    /// `TransportState` with `rekey_*` every `REKEY_INTERVAL` frames, in both directions and
    /// across several rekeys, whichever side is the initiator.
    #[test]
    fn wire_compatible_with_stateful_noise_across_rekeys() {
        for ours_is_initiator in [true, false] {
            let (ihs, rhs) = raw_handshake();
            let (ours, theirs) = if ours_is_initiator {
                (ihs, rhs)
            } else {
                (rhs, ihs)
            };
            let (mut sealer, mut opener) = LinkTransport::new(ours).unwrap().split();
            let mut old = theirs.into_transport_mode().unwrap();
            let mut frame = vec![0u8; MAX_FRAME_LEN + LEN_PREFIX];
            let mut plain = vec![0u8; MAX_FRAME_LEN];
            let mut old_frame = vec![0u8; MAX_FRAME_LEN];
            let cells = vec![0x5au8; 2 * CELL_LEN];
            for i in 0..(2 * REKEY_INTERVAL + 3) {
                // ours -> stateful
                let n = sealer.seal_frame(&cells, &mut frame).unwrap();
                let m = old
                    .read_message(&frame[LEN_PREFIX..n], &mut plain)
                    .expect("stateful peer opens our frame");
                assert_eq!(&plain[..m], &cells[..]);
                // stateful -> ours
                let m = old.write_message(&cells, &mut old_frame).unwrap();
                let p = opener.open_frame(&old_frame[..m], &mut plain).unwrap();
                assert_eq!(&plain[..p], &cells[..]);
                let next = i + 1;
                if next.is_multiple_of(REKEY_INTERVAL) {
                    old.rekey_outgoing();
                    old.rekey_incoming();
                }
            }
            assert_eq!(sealer.frames_sent(), 2 * REKEY_INTERVAL + 3);
            assert_eq!(opener.frames_received(), 2 * REKEY_INTERVAL + 3);
        }
    }

    /// An authentication failure in the opener also stops the sealer.
    #[test]
    fn failure_in_one_half_poisons_the_other() {
        let (ihs, rhs) = raw_handshake();
        let (mut a_tx, _a_rx) = LinkTransport::new(ihs).unwrap().split();
        let (mut b_tx, mut b_rx) = LinkTransport::new(rhs).unwrap().split();
        let mut frame = vec![0u8; MAX_FRAME_LEN + LEN_PREFIX];
        let mut plain = vec![0u8; MAX_FRAME_LEN];
        let n = a_tx.seal_frame(&[1u8; CELL_LEN], &mut frame).unwrap();
        frame[5] ^= 1;
        assert!(matches!(
            b_rx.open_frame(&frame[LEN_PREFIX..n], &mut plain),
            Err(LinkError::Decrypt)
        ));
        assert!(matches!(
            b_tx.seal_frame(&[1u8; CELL_LEN], &mut frame),
            Err(LinkError::Closed)
        ));
    }

    /// Both halves work from two threads at once.
    #[test]
    fn halves_run_concurrently() {
        let (ihs, rhs) = raw_handshake();
        let (mut a_tx, mut a_rx) = LinkTransport::new(ihs).unwrap().split();
        let (mut b_tx, mut b_rx) = LinkTransport::new(rhs).unwrap().split();
        let frames = REKEY_INTERVAL + 10;
        let pump = |tx: &mut LinkSealer, rx: &mut LinkOpener, seed: u8| {
            let mut frame = vec![0u8; MAX_FRAME_LEN + LEN_PREFIX];
            let mut plain = vec![0u8; MAX_FRAME_LEN];
            for i in 0..frames {
                let cells = vec![seed.wrapping_add(i as u8); CELL_LEN];
                let n = tx.seal_frame(&cells, &mut frame).unwrap();
                let p = rx.open_frame(&frame[LEN_PREFIX..n], &mut plain).unwrap();
                assert_eq!(&plain[..p], &cells[..]);
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| pump(&mut a_tx, &mut b_rx, 1));
            s.spawn(|| pump(&mut b_tx, &mut a_rx, 2));
        });
        assert_eq!(a_tx.frames_sent(), frames);
        assert_eq!(a_rx.frames_received(), frames);
    }
}
