//! Signed directory documents (design §5; docs/protocol/80-directory.md).
//!
//! Every document travels as a [`Signed<T>`] envelope: postcard body bytes plus signatures that
//! cover `DOMAIN || 0x00 || body`. Parsing an envelope gives the *unverified* state; the concrete
//! `verify` methods check signatures over the received bytes, then decode the body with a
//! canonical-form (re-encode) check, giving `Verified*` values. Bypasses are named `dangerously_*`.

pub mod bwfile;
pub mod cert;
pub mod consensus;
pub mod descriptor;
pub mod policy;
pub mod signed;

pub use bwfile::BandwidthFile;
pub use cert::{AuthCert, VerifiedCert, issue_cert};
pub use consensus::{
    Consensus, ConsensusEntry, SharedRand, SrCommit, SrVote, SrvValue, VerifiedConsensus,
    VerifiedVote, Vote, VoteEntry,
};
pub use descriptor::{RelayDescriptor, VerifiedDescriptor};
pub use policy::{ExitPolicy, Flags, PortRange};
pub use signed::{Document, Sig64, SigEntry, Signed};

/// A parsed, unverified relay descriptor.
pub type UnverifiedDescriptor = Signed<RelayDescriptor>;
/// A parsed, unverified authority certificate.
pub type UnverifiedCert = Signed<AuthCert>;
/// A parsed, unverified vote.
pub type UnverifiedVote = Signed<Vote>;
/// A parsed, unverified consensus.
pub type UnverifiedConsensus = Signed<Consensus>;
