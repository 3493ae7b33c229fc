//! Why a circuit died: [`CircError`].

use std::sync::Arc;

use allium_crypto::CryptoError;
use allium_proto::ProtoError;
use allium_proto::cell::DestroyReason;
use allium_proto::relaymsg::RelayCmd;

/// A reason to destroy a circuit. Every variant is fatal for the circuit it concerns and for no
/// other; [`CircError::wire_reason`] gives the reason sent in the DESTROY.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CircError {
    /// A forward cell failed authentication, was replayed or reordered, or the ratchet ran out.
    #[error("relay cell crypto failed (bad tag, replay or reorder)")]
    BadTag(#[source] Arc<CryptoError>),
    /// Originating or relaying a backward cell failed (the circuit's crypto state is unusable).
    #[error("backward relay crypto failed")]
    BackwardCrypto(#[source] Arc<CryptoError>),
    /// More forward RELAY_EARLY cells than the budget allows.
    #[error("more than {max} RELAY_EARLY cells")]
    RelayEarlyBudget {
        /// The budget.
        max: u8,
    },
    /// A RELAY_EARLY cell came from the next hop.
    #[error("RELAY_EARLY travelling backward")]
    BackwardRelayEarly,
    /// A relay message that does not parse.
    #[error("malformed relay message")]
    Malformed(#[source] ProtoError),
    /// A relay message with a stream id that its command does not allow.
    #[error("relay command {cmd:?} with stream id {sid}: not allowed")]
    StreamIdRule {
        /// The command.
        cmd: RelayCmd,
        /// The stream id.
        sid: u16,
    },
    /// A message this hop must not receive in the circuit's current state.
    #[error("unexpected {what}")]
    Unexpected {
        /// What arrived.
        what: &'static str,
    },
    /// The peer broke a flow-control window (DATA beyond the window, SENDME without DATA, a
    /// forged SENDME tag).
    #[error("flow-control window violated")]
    Window(#[source] ProtoError),
    /// A cell to pass on arrived while there is no open next hop.
    #[error("cell to pass on but no next hop")]
    NoNextHop,
    /// The circuit's inbound queue overflowed: the peer sent beyond its windows, or the circuit
    /// was stalled.
    #[error("inbound queue of {cap} cells overflowed")]
    QueueOverflow {
        /// The queue's capacity.
        cap: usize,
    },
    /// The link the circuit must write to stayed full for longer than the cap.
    #[error("outgoing link blocked for longer than {secs} s")]
    Blocked {
        /// The cap in seconds.
        secs: u64,
    },
    /// A DESTROY arrived from one side.
    #[error("DESTROY received ({reason:?})")]
    DestroyReceived {
        /// The reason it carried.
        reason: DestroyReason,
    },
    /// The link on one side closed.
    #[error("link closed")]
    LinkClosed,
    /// The relay is shutting down, or the driver dropped the circuit.
    #[error("closed locally")]
    Local,
    /// ESTABLISH_INTRO failed its circuit-binding MAC or its signature.
    #[error("ESTABLISH_INTRO failed authentication")]
    IntroAuth(#[source] Arc<CryptoError>),
    /// An onion-service request was refused by this relay (a limit, an unknown cookie).
    #[error("onion-service request refused: {what}")]
    HsRefused {
        /// What was refused and why.
        what: &'static str,
    },
    /// The circuit this one was joined to at the rendezvous point closed.
    #[error("the joined circuit closed")]
    JoinClosed,
}

impl CircError {
    /// The reason to put in the DESTROY this error causes. Protocol and crypto failures say NONE
    /// (no detail goes to peers); resource problems say RESOURCELIMIT or TIMEOUT.
    pub fn wire_reason(&self) -> DestroyReason {
        match self {
            Self::QueueOverflow { .. } => DestroyReason::RESOURCELIMIT,
            Self::Blocked { .. } => DestroyReason::TIMEOUT,
            Self::Local => DestroyReason::FINISHED,
            Self::HsRefused { .. } => DestroyReason::RESOURCELIMIT,
            Self::JoinClosed => DestroyReason::DESTROYED,
            _ => DestroyReason::NONE,
        }
    }

    /// A short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadTag(_) => "bad-tag",
            Self::BackwardCrypto(_) => "backward-crypto",
            Self::RelayEarlyBudget { .. } => "relay-early-budget",
            Self::BackwardRelayEarly => "backward-relay-early",
            Self::Malformed(_) => "malformed",
            Self::StreamIdRule { .. } => "stream-id-rule",
            Self::Unexpected { .. } => "unexpected-message",
            Self::Window(_) => "window",
            Self::NoNextHop => "no-next-hop",
            Self::QueueOverflow { .. } => "queue-overflow",
            Self::Blocked { .. } => "blocked",
            Self::DestroyReceived { .. } => "destroy-received",
            Self::LinkClosed => "link-closed",
            Self::Local => "local",
            Self::IntroAuth(_) => "intro-auth",
            Self::HsRefused { .. } => "hs-refused",
            Self::JoinClosed => "join-closed",
        }
    }

    /// Whether the peer misbehaved (as opposed to an ordinary close).
    pub fn is_violation(&self) -> bool {
        !matches!(
            self,
            Self::DestroyReceived { .. }
                | Self::LinkClosed
                | Self::Local
                | Self::HsRefused { .. }
                | Self::JoinClosed
        )
    }
}
