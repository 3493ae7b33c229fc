//! Link cells: fixed 1024-byte units carried by the Noise link (design §1), and the bodies of
//! CREATE, CREATED and DESTROY (design §2).
//!
//! ```text
//! cell    = circ_id u32be | cmd u8 | body[1019]
//! CREATE  body = htype u16be (=1) | hlen u16be | hdata[hlen] | zero pad to 1019
//! CREATED body = hlen u16be | hdata[hlen] | zero pad to 1019
//! DESTROY body = reason u8 | zero pad to 1019
//! ```
//!
//! Invariants enforced by [`Cell::decode`]: `cmd` is one of the six known commands (anything else
//! closes the link); PADDING has wire `circ_id == 0`; every other command has `circ_id != 0`.
//! In memory the id is an `Option<CircId>`: wire 0 is `None`, and `None` encodes as 0.

use std::fmt;
use std::num::NonZeroU32;

use crate::codec::{Reader, Writer};
use crate::err::{ProtoError, Result};

pub use crate::consts::{CELL_BODY_LEN, CellBody};

/// Length of a link cell on the wire.
pub const CELL_LEN: usize = 1024;
/// Length of the cell header (`circ_id u32 | cmd u8`).
pub const CELL_HEADER_LEN: usize = 5;
/// `htype` of the ntor-v3-shaped handshake of design §2 (the only one defined).
pub const HTYPE_NTOR3: u16 = 1;
/// The largest `hdata` a CREATE body can carry.
pub const MAX_CREATE_HDATA: usize = CELL_BODY_LEN - 4;
/// The largest `hdata` a CREATED body can carry.
pub const MAX_CREATED_HDATA: usize = CELL_BODY_LEN - 2;

const _: () = assert!(CELL_HEADER_LEN + CELL_BODY_LEN == CELL_LEN);

/// A non-zero circuit id, unique per link.
///
/// The link initiator allocates ids with the most significant bit set, the responder with it clear,
/// so both ends can allocate without colliding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CircId(NonZeroU32);

impl CircId {
    /// The bit that says which side of the link allocated an id.
    pub const INITIATOR_BIT: u32 = 0x8000_0000;

    /// `None` for 0.
    pub const fn new(v: u32) -> Option<Self> {
        match NonZeroU32::new(v) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
    /// The wire value.
    pub const fn get(self) -> u32 {
        self.0.get()
    }
    /// True if the link initiator's allocation rule produced this id (MSB set).
    pub fn is_initiator_allocated(self) -> bool {
        self.get() & Self::INITIATOR_BIT != 0
    }
    /// True if the side of the link given by `we_are_initiator` may allocate this id.
    pub fn allocatable_by(self, we_are_initiator: bool) -> bool {
        self.is_initiator_allocated() == we_are_initiator
    }
    /// A random id for the given side of the link (MSB 1 for the initiator, 0 for the responder,
    /// never zero). The caller must still check it is not in use on the link (and not used in the
    /// last 60 s, design §6.15).
    pub fn random(we_are_initiator: bool) -> Self {
        loop {
            let v = allium_crypto::rng::random_u32();
            let v = if we_are_initiator {
                v | Self::INITIATOR_BIT
            } else {
                v & !Self::INITIATOR_BIT
            };
            if let Some(id) = Self::new(v) {
                return id;
            }
        }
    }
}

impl fmt::Debug for CircId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CircId({:#010x})", self.get())
    }
}
impl fmt::Display for CircId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x}", self.get())
    }
}
impl From<CircId> for u32 {
    fn from(c: CircId) -> Self {
        c.get()
    }
}

/// A link cell command (open newtype; only the named values are valid on the wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CellCmd(pub u8);

impl CellCmd {
    /// Link padding; `circ_id` must be 0. Dropped by the receiver.
    pub const PADDING: Self = Self(0);
    /// Create a circuit (body: [`Create`]).
    pub const CREATE: Self = Self(1);
    /// Circuit created (body: [`Created`]).
    pub const CREATED: Self = Self(2);
    /// A relay cell (body: the relay-cell crypto layout of design §3).
    pub const RELAY: Self = Self(3);
    /// A relay cell that may carry EXTEND (design §3.4); at most 8 per circuit, forward only.
    pub const RELAY_EARLY: Self = Self(4);
    /// Tear down a circuit (body: [`Destroy`]).
    pub const DESTROY: Self = Self(5);

    /// True for the six commands this version defines.
    pub fn is_known(self) -> bool {
        self.0 <= 5
    }
    /// True for RELAY and RELAY_EARLY.
    pub fn is_relay(self) -> bool {
        self == Self::RELAY || self == Self::RELAY_EARLY
    }
    /// Name for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "PADDING",
            1 => "CREATE",
            2 => "CREATED",
            3 => "RELAY",
            4 => "RELAY_EARLY",
            5 => "DESTROY",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Debug for CellCmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

/// One link cell.
#[derive(Clone, PartialEq, Eq)]
pub struct Cell {
    /// The circuit id: wire 0 is `None`, which a decoded cell has only for PADDING. The relay's
    /// sans-IO circuit core also emits its cells with `None` (it serves two links) and its driver
    /// writes the link's id before sending; [`Cell::check`] refuses a non-PADDING cell still at
    /// `None`.
    pub circ_id: Option<CircId>,
    /// The command.
    pub cmd: CellCmd,
    /// The 1019-byte body.
    pub body: Box<CellBody>,
}

impl fmt::Debug for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cell")
            .field("circ_id", &format_args!("{:#010x}", wire_id(self.circ_id)))
            .field("cmd", &self.cmd)
            .finish_non_exhaustive()
    }
}

impl Cell {
    /// A cell with an all-zero body.
    pub fn new_zeroed(circ_id: Option<CircId>, cmd: CellCmd) -> Self {
        Self {
            circ_id,
            cmd,
            body: Box::new([0u8; CELL_BODY_LEN]),
        }
    }

    /// A PADDING cell (no circuit id, wire 0; zero body).
    pub fn padding() -> Self {
        Self::new_zeroed(None, CellCmd::PADDING)
    }

    /// A CREATE cell.
    pub fn create(circ_id: CircId, create: &Create) -> Result<Self> {
        let mut c = Self::new_zeroed(Some(circ_id), CellCmd::CREATE);
        create.encode(&mut c.body)?;
        Ok(c)
    }

    /// A CREATED cell.
    pub fn created(circ_id: CircId, created: &Created) -> Result<Self> {
        let mut c = Self::new_zeroed(Some(circ_id), CellCmd::CREATED);
        created.encode(&mut c.body)?;
        Ok(c)
    }

    /// A DESTROY cell.
    pub fn destroy(circ_id: CircId, reason: DestroyReason) -> Self {
        let mut c = Self::new_zeroed(Some(circ_id), CellCmd::DESTROY);
        Destroy { reason }.encode(&mut c.body);
        c
    }

    /// Check the command and circuit-id rules (see the module docs).
    pub fn check(&self) -> Result<()> {
        if !self.cmd.is_known() {
            return Err(ProtoError::UnknownCellCmd(self.cmd.0));
        }
        match (self.cmd == CellCmd::PADDING, self.circ_id.is_none()) {
            (true, false) => Err(ProtoError::Invalid {
                object: "link cell",
                problem: "PADDING with a non-zero circuit id",
            }),
            (false, true) => Err(ProtoError::Invalid {
                object: "link cell",
                problem: "circuit id 0 on a circuit command",
            }),
            _ => Ok(()),
        }
    }

    /// Write the 1024 wire bytes.
    pub fn encode_into(&self, out: &mut [u8; CELL_LEN]) {
        let (hdr, body) = out.split_at_mut(CELL_HEADER_LEN);
        hdr[..4].copy_from_slice(&wire_id(self.circ_id).to_be_bytes());
        hdr[4] = self.cmd.0;
        body.copy_from_slice(&self.body[..]);
    }

    /// The 1024 wire bytes in a new array.
    pub fn to_bytes(&self) -> [u8; CELL_LEN] {
        let mut out = [0u8; CELL_LEN];
        self.encode_into(&mut out);
        out
    }

    /// Decode exactly [`CELL_LEN`] bytes, enforcing the rules of [`Cell::check`].
    pub fn decode(b: &[u8]) -> Result<Self> {
        let mut r = Reader::for_object(b, "link cell");
        let circ_id = CircId::new(r.take_u32()?);
        let cmd = CellCmd(r.take_u8()?);
        // One allocation and one copy, straight from the frame into the box (no stack copy).
        let body: Box<[u8]> = r.take(CELL_BODY_LEN)?.into();
        r.should_be_exhausted()?;
        let body: Box<CellBody> = body.try_into().map_err(|_| ProtoError::Invalid {
            object: "link cell",
            problem: "body length",
        })?;
        let cell = Self { circ_id, cmd, body };
        cell.check()?;
        Ok(cell)
    }
}

/// The wire value of an optional circuit id (0 for `None`).
fn wire_id(id: Option<CircId>) -> u32 {
    id.map_or(0, CircId::get)
}

// `Option<CircId>` costs nothing over the bare `u32` it replaces (niche of `NonZeroU32`).
const _: () = assert!(std::mem::size_of::<Option<CircId>>() == 4);

/// CREATE body: `htype u16 | hlen u16 | hdata | zero pad`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Create {
    /// Handshake type; [`HTYPE_NTOR3`] is the only one defined.
    pub htype: u16,
    /// The onionskin (at most [`MAX_CREATE_HDATA`] bytes).
    pub hdata: Vec<u8>,
}

impl Create {
    /// Encode into a cell body (the padding is zeroed).
    pub fn encode(&self, body: &mut CellBody) -> Result<()> {
        let mut w = Writer::for_object(body, "CREATE body");
        w.write_u16(self.htype)?;
        w.write_u16len(&self.hdata)?;
        w.zero_pad_to_end();
        Ok(())
    }
    /// Decode a cell body. Any `htype` is returned (the caller rejects unknown ones); the padding
    /// must be zero.
    pub fn decode(body: &[u8]) -> Result<Self> {
        let mut r = Reader::for_object(body, "CREATE body");
        let htype = r.take_u16()?;
        let hdata = r.take_u16len()?.to_vec();
        r.expect_zero_padding()?;
        Ok(Self { htype, hdata })
    }
}

/// CREATED body: `hlen u16 | hdata | zero pad`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Created {
    /// The handshake reply (at most [`MAX_CREATED_HDATA`] bytes).
    pub hdata: Vec<u8>,
}

impl Created {
    /// Encode into a cell body (the padding is zeroed).
    pub fn encode(&self, body: &mut CellBody) -> Result<()> {
        let mut w = Writer::for_object(body, "CREATED body");
        w.write_u16len(&self.hdata)?;
        w.zero_pad_to_end();
        Ok(())
    }
    /// Decode a cell body; the padding must be zero.
    pub fn decode(body: &[u8]) -> Result<Self> {
        let mut r = Reader::for_object(body, "CREATED body");
        let hdata = r.take_u16len()?.to_vec();
        r.expect_zero_padding()?;
        Ok(Self { hdata })
    }
}

/// Why a circuit was destroyed (open code; Tor's numbers).
///
/// Forwarded DESTROYs and every crypto failure carry [`DestroyReason::NONE`] (design §6.8).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DestroyReason(pub u8);

impl DestroyReason {
    /// No reason given (always used for forwarded DESTROYs and crypto failures).
    pub const NONE: Self = Self(0);
    /// Protocol violation.
    pub const PROTOCOL: Self = Self(1);
    /// Internal error.
    pub const INTERNAL: Self = Self(2);
    /// A client sent TRUNCATE / the client closed the circuit.
    pub const REQUESTED: Self = Self(3);
    /// The relay is hibernating.
    pub const HIBERNATING: Self = Self(4);
    /// Out of memory, sockets or circuit ids.
    pub const RESOURCELIMIT: Self = Self(5);
    /// Could not connect to the next relay.
    pub const CONNECTFAILED: Self = Self(6);
    /// The next relay had another identity than requested.
    pub const OR_IDENTITY: Self = Self(7);
    /// The link the circuit used closed.
    pub const CHANNEL_CLOSED: Self = Self(8);
    /// The circuit expired (finished).
    pub const FINISHED: Self = Self(9);
    /// Circuit construction took too long.
    pub const TIMEOUT: Self = Self(10);
    /// The circuit was destroyed without client TRUNCATE.
    pub const DESTROYED: Self = Self(11);
    /// Request for an unknown onion service.
    pub const NOSUCHSERVICE: Self = Self(12);

    /// Name for logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "NONE",
            1 => "PROTOCOL",
            2 => "INTERNAL",
            3 => "REQUESTED",
            4 => "HIBERNATING",
            5 => "RESOURCELIMIT",
            6 => "CONNECTFAILED",
            7 => "OR_IDENTITY",
            8 => "CHANNEL_CLOSED",
            9 => "FINISHED",
            10 => "TIMEOUT",
            11 => "DESTROYED",
            12 => "NOSUCHSERVICE",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Debug for DestroyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

/// DESTROY body: `reason u8 | zero pad`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Destroy {
    /// Why.
    pub reason: DestroyReason,
}

impl Destroy {
    /// Encode into a cell body (the padding is zeroed).
    pub fn encode(&self, body: &mut CellBody) {
        body.fill(0);
        body[0] = self.reason.0;
    }
    /// Decode a cell body. Unknown reasons are kept; the padding must be zero.
    pub fn decode(body: &[u8]) -> Result<Self> {
        let mut r = Reader::for_object(body, "DESTROY body");
        let reason = DestroyReason(r.take_u8()?);
        r.expect_zero_padding()?;
        Ok(Self { reason })
    }
}
