//! The sans-IO CREATE answerer: runs the onion handshake and builds a [`CircuitCore`].

use allium_crypto::handshake::relay_respond;
use allium_crypto::relaycell::RelayHopCrypto;
use allium_crypto::{CryptoError, RelayId, X25519Secret};
use allium_proto::cell::{Create, Created, DestroyReason, HTYPE_NTOR3};
use allium_proto::{ProtoError, flowctl};

use super::{CircuitCore, CoreConfig};

/// Why a CREATE was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// The CREATE body does not parse.
    #[error("malformed CREATE")]
    Malformed(#[source] ProtoError),
    /// A handshake type this relay does not speak.
    #[error("unsupported handshake type {0}")]
    UnsupportedHtype(u16),
    /// The handshake failed (wrong identity or onion key, bad MAC).
    #[error("onion handshake failed")]
    Handshake(#[source] CryptoError),
    /// The client did not request congestion control (flow control v2), which every circuit
    /// uses.
    #[error("CREATE without the congestion-control extension")]
    NoCongestionControl,
}

impl CreateError {
    /// The reason for the DESTROY that answers the CREATE.
    pub fn wire_reason(&self) -> DestroyReason {
        match self {
            Self::Malformed(_) | Self::UnsupportedHtype(_) | Self::NoCongestionControl => {
                DestroyReason::PROTOCOL
            }
            // No detail about keys goes to the peer.
            Self::Handshake(_) => DestroyReason::NONE,
        }
    }
}

/// Answer a CREATE cell body: decode it, then [`answer_create`].
pub fn answer_create_body(
    body: &[u8],
    own_id: &RelayId,
    onion_keys: &[&X25519Secret],
    cfg: CoreConfig,
) -> Result<(CircuitCore, Created), CreateError> {
    let create = Create::decode(body).map_err(CreateError::Malformed)?;
    answer_create(&create, own_id, onion_keys, cfg)
}

/// Answer a CREATE: run the handshake with this relay's identity and onion keys (current first,
/// then the previous one) and return the new circuit and the CREATED to send. This is the
/// public-key work; the driver runs it off the link readers. (A test harness can hand it the
/// `create` of an [`super::Event::ExtendTo`] directly.)
pub fn answer_create(
    create: &Create,
    own_id: &RelayId,
    onion_keys: &[&X25519Secret],
    cfg: CoreConfig,
) -> Result<(CircuitCore, Created), CreateError> {
    if create.htype != HTYPE_NTOR3 {
        return Err(CreateError::UnsupportedHtype(create.htype));
    }
    // CM is a TLV list: it must request congestion control; SM carries the agreed parameters.
    let mut cc_requested = false;
    let params = cfg.cc;
    let (hop, reply) = relay_respond(own_id, onion_keys, &create.hdata, |cm| {
        cc_requested = flowctl::cm_requests_cc(cm);
        flowctl::cc_reply(params).to_vec()
    })
    .map_err(CreateError::Handshake)?;
    if !cc_requested {
        return Err(CreateError::NoCongestionControl);
    }
    let mut core = CircuitCore::new(cfg, RelayHopCrypto::new(&hop));
    core.set_binding(hop.binding());
    drop(hop);
    Ok((core, Created { hdata: reply }))
}
