//! HTTP paths served by authorities (docs/protocol/80-directory.md, "HTTP endpoints").

/// POST a signed relay descriptor.
pub const DESCRIPTOR: &str = "/allium/v1/descriptor";
/// GET the current consensus (signed envelope).
pub const CONSENSUS: &str = "/allium/v1/consensus";
/// GET the current consensus, zlib-compressed.
pub const CONSENSUS_Z: &str = "/allium/v1/consensus.z";
/// GET the consensus being signed for the next period, with the signatures collected so far.
pub const CONSENSUS_NEXT: &str = "/allium/v1/consensus/next";
/// GET all accepted descriptors (postcard `Vec<Vec<u8>>` of signed envelopes).
pub const DESCRIPTORS: &str = "/allium/v1/descriptors";
/// GET this authority's vote for the upcoming period; POST a vote to it.
pub const VOTE_CURRENT: &str = "/allium/v1/vote/current";
/// POST a vote.
pub const VOTE: &str = "/allium/v1/vote";
/// POST a detached consensus signature.
pub const SIGNATURE: &str = "/allium/v1/signature";
/// GET this authority's certificate.
pub const CERT: &str = "/allium/v1/cert";
/// GET every known authority certificate (postcard `Vec<Vec<u8>>`).
pub const CERTS: &str = "/allium/v1/certs";
