//! Votes and the consensus: the relay list each authority proposes, and the one they agree on.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use allium_crypto::{RelayId, X25519Public};
use serde::{Deserialize, Serialize};

use super::cert::VerifiedCert;
use super::descriptor::{MAX_FAMILY, valid_nickname};
use super::policy::{ExitPolicy, Flags};
use super::signed::{Document, Signed};
use crate::err::{DirError, Result};

/// Signature domain of votes.
pub const DOMAIN_VOTE: &str = "allium/v1/vote";
/// Signature domain of consensuses (full and detached signatures alike).
pub const DOMAIN_CONSENSUS: &str = "allium/v1/consensus";
/// Size cap of a signed vote or consensus envelope.
pub const MAX_CONSENSUS_LEN: usize = 8 * 1024 * 1024;
/// The only vote format version.
pub const VOTE_VERSION: u16 = 1;
/// The only consensus format version.
pub const CONSENSUS_VERSION: u16 = 1;
/// The consensus method this code implements (how votes are combined; 2: measured weights,
/// unmeasured cap, position weights).
pub const CONSENSUS_METHOD: u16 = 2;
/// Fixed-point scale of the position weights (Tor's `bwweightscale` default).
pub const WEIGHT_SCALE: i32 = 10_000;
/// The names of the position weights a consensus carries (Tor's `bandwidth-weights`), sorted.
pub const BANDWIDTH_WEIGHT_NAMES: [&str; 19] = [
    "Wbd", "Wbe", "Wbg", "Wbm", "Wdb", "Web", "Wed", "Wee", "Weg", "Wem", "Wgb", "Wgd", "Wgg",
    "Wgm", "Wmb", "Wmd", "Wme", "Wmg", "Wmm",
];
/// Most parameters in a vote or consensus.
pub const MAX_PARAMS: usize = 64;
/// Longest parameter name.
pub const MAX_PARAM_NAME: usize = 32;
/// Most voters.
pub const MAX_VOTERS: usize = 16;
/// Clock-skew tolerance when checking a consensus' validity window (5 minutes).
pub const CLOCK_SKEW: u64 = 300;

/// Most reveals one shared random value can count (a `u8`; at most [`MAX_VOTERS`] in practice).
pub const MAX_SRV_REVEALS: u8 = MAX_VOTERS as u8;

/// A shared random value (srv-spec's `shared-rand-current-value NUM_REVEALS VALUE`): the value and
/// the number of authorities' reveals that went into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SrvValue {
    /// How many reveals were combined (1..=[`MAX_SRV_REVEALS`]).
    pub num_reveals: u8,
    /// The 32-byte value.
    pub value: [u8; 32],
}

/// The shared random values a consensus carries (srv-spec's `shared-rand-current-value` and
/// `shared-rand-previous-value`): each only when more than half of all configured authorities
/// voted that exact value; at least one of the two is present.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedRand {
    /// The value of the protocol run that started most recently before `valid_after`.
    pub current: Option<SrvValue>,
    /// The value of the run before that.
    pub previous: Option<SrvValue>,
}

/// An authority's commitment for one protocol run: `hashed_reveal = SHA-256("allium-sr-commit" |
/// 0x00 | authority identity | u64be(timestamp) | reveal)` (see `authority::shared_random`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrCommit {
    /// When the commitment was made (the `valid_after` of the first vote carrying it): inside the
    /// run it is for.
    pub timestamp: u64,
    /// The hash of the reveal, bound to the authority and the timestamp.
    pub hashed_reveal: [u8; 32],
}

/// The shared-random part of a vote (srv-spec §3: commit and reveal lines, and the values the
/// authority believes in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrVote {
    /// The voting authority's commitment for the current run (both phases).
    pub commit: Option<SrCommit>,
    /// Its reveal (the reveal phase only; needs `commit`).
    pub reveal: Option<[u8; 32]>,
    /// The current shared random value as this authority computed it.
    pub current: Option<SrvValue>,
    /// The previous one.
    pub previous: Option<SrvValue>,
}

/// Deserialize an optional field added at the end of a document after its first format: older
/// documents end before it. Postcard reports that end of input as an error, read here as
/// "absent". Anything malformed in a present field is refused all the same: every document is
/// decoded with a canonical re-encoding check (`signed::decode_canonical`), which a value read
/// as absent while bytes remain cannot pass. Present fields are written as `0x01` + value and an
/// absent one as nothing (`skip_serializing_if`), so each document keeps one byte form.
fn trailing_option<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d).ok().flatten())
}

/// One relay as listed in a consensus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsensusEntry {
    /// Ed25519 identity.
    pub identity: RelayId,
    /// x25519 link (Noise static) key.
    pub link_key: X25519Public,
    /// x25519 onion (ntor) key.
    pub onion_key: X25519Public,
    /// Nickname.
    pub nickname: String,
    /// Link addresses (1 or 2).
    pub addrs: Vec<SocketAddr>,
    /// Flags.
    pub flags: Flags,
    /// Path-selection weight (kilobytes per second). In a vote: this authority's measurement
    /// when `measured`, else the relay's self-reported bandwidth.
    pub weight: u32,
    /// Exit-port summary (the descriptor's exit policy).
    pub exit: ExitPolicy,
    /// Declared family (sorted).
    pub family: Vec<RelayId>,
    /// Whether `weight` comes from bandwidth measurements (in a consensus: enough authorities
    /// measured it; otherwise the weight is capped at `maxunmeasuredbw`).
    pub measured: bool,
}

impl ConsensusEntry {
    fn check(&self, object: &'static str) -> Result<()> {
        if !valid_nickname(&self.nickname) {
            return Err(DirError::invalid(object, "bad nickname in relay entry"));
        }
        if self.addrs.is_empty() || self.addrs.len() > 2 {
            return Err(DirError::invalid(
                object,
                "relay entry needs 1 or 2 addresses",
            ));
        }
        self.exit.check(object)?;
        if !self.exit.rules.is_empty() {
            return Err(DirError::invalid(
                object,
                "a consensus carries the exit port summary only, no rules",
            ));
        }
        if self.family.len() > MAX_FAMILY || !strictly_sorted(&self.family) {
            return Err(DirError::invalid(
                object,
                "relay family must be sorted, unique, at most 32",
            ));
        }
        Ok(())
    }
    /// Whether all of `flags` are set.
    pub fn has(&self, flags: Flags) -> bool {
        self.flags.contains(flags)
    }
    /// SHA-256 of this entry's postcard encoding: a digest of everything the consensus says
    /// about the relay (it changes whenever any listed field does). The consensus carries no
    /// descriptor digest (votes do, [`VoteEntry::desc_digest`]); this stands in where a
    /// per-relay digest is shown, e.g. the control port's `ns/` router status.
    pub fn entry_digest(&self) -> [u8; 32] {
        super::signed::sha256(&postcard::to_allocvec(self).unwrap_or_default())
    }
}

/// One relay as listed in a vote: the consensus entry plus the descriptor's `published` time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteEntry {
    /// The proposed entry (`weight` is this authority's measurement).
    pub entry: ConsensusEntry,
    /// The descriptor's `published` time.
    pub published: u64,
    /// The relay's self-reported bandwidth, kilobytes per second (capped by the authority's
    /// `max_weight_kbps`): an upper bound on its consensus weight.
    pub advertised: u32,
    /// SHA-256 of the descriptor body this entry was built from (votes only: it breaks ties
    /// between descriptors published in the same second; the consensus does not carry it).
    pub desc_digest: [u8; 32],
}

/// An authority's vote for one consensus period (signed by its online signing key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// Format version, [`VOTE_VERSION`].
    pub version: u16,
    /// The voting authority's identity.
    pub authority: RelayId,
    /// Start of the period voted for.
    pub valid_after: u64,
    /// End of freshness.
    pub fresh_until: u64,
    /// End of validity.
    pub valid_until: u64,
    /// When the vote was made.
    pub published: u64,
    /// Network parameters this authority proposes.
    pub params: BTreeMap<String, i32>,
    /// Relays, sorted by identity.
    pub relays: Vec<VoteEntry>,
    /// Shared randomness: commit, reveal, believed values (absent from votes made before the
    /// protocol existed, and from votes that have nothing to say).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "trailing_option"
    )]
    pub shared_rand: Option<SrVote>,
}

/// The consensus (signed by a majority of authorities' signing keys).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consensus {
    /// Format version, [`CONSENSUS_VERSION`].
    pub version: u16,
    /// Consensus method, [`CONSENSUS_METHOD`].
    pub method: u16,
    /// Start of validity.
    pub valid_after: u64,
    /// After this, fetch a newer one.
    pub fresh_until: u64,
    /// After this, do not use it.
    pub valid_until: u64,
    /// Identities of the authorities whose votes were combined (sorted).
    pub voters: Vec<RelayId>,
    /// Network parameters.
    pub params: BTreeMap<String, i32>,
    /// Relays, sorted by identity.
    pub relays: Vec<ConsensusEntry>,
    /// Position weights (Tor's `bandwidth-weights`, dir-spec §3.8.3): either empty or exactly
    /// the [`BANDWIDTH_WEIGHT_NAMES`], each in `0..=WEIGHT_SCALE`.
    pub bandwidth_weights: BTreeMap<String, i32>,
    /// The shared random values the authorities agreed on (absent from older consensuses and
    /// when no majority agreed on either value: clients then use the disaster value,
    /// `hs::disaster_srv`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "trailing_option"
    )]
    pub shared_rand: Option<SharedRand>,
}

fn strictly_sorted<T: Ord>(v: &[T]) -> bool {
    v.windows(2).all(|w| matches!(w, [a, b] if a < b))
}

fn check_timeline(object: &'static str, va: u64, fu: u64, vu: u64) -> Result<()> {
    if !(va < fu && fu <= vu) {
        return Err(DirError::invalid(
            object,
            "needs valid_after < fresh_until <= valid_until",
        ));
    }
    Ok(())
}

fn check_params(object: &'static str, p: &BTreeMap<String, i32>) -> Result<()> {
    if p.len() > MAX_PARAMS {
        return Err(DirError::invalid(object, "too many parameters"));
    }
    if p.keys().any(|k| {
        k.is_empty()
            || k.len() > MAX_PARAM_NAME
            || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    }) {
        return Err(DirError::invalid(object, "bad parameter name"));
    }
    Ok(())
}

/// Relays must be strictly sorted by identity, and each entry well formed.
fn check_relays<'a>(
    object: &'static str,
    relays: impl Iterator<Item = &'a ConsensusEntry> + Clone,
) -> Result<()> {
    let mut prev: Option<&RelayId> = None;
    for r in relays.clone() {
        if prev.is_some_and(|p| *p >= r.identity) {
            return Err(DirError::invalid(object, "relays not sorted by identity"));
        }
        prev = Some(&r.identity);
    }
    for r in relays {
        r.check(object)?;
    }
    Ok(())
}

impl Document for Vote {
    const DOMAIN: &'static str = DOMAIN_VOTE;
    const MAX_LEN: usize = MAX_CONSENSUS_LEN;
    const NAME: &'static str = "vote";

    fn check_body(&self) -> Result<()> {
        if self.version != VOTE_VERSION {
            return Err(DirError::invalid(Self::NAME, "unsupported version"));
        }
        check_timeline(
            Self::NAME,
            self.valid_after,
            self.fresh_until,
            self.valid_until,
        )?;
        check_params(Self::NAME, &self.params)?;
        if let Some(sr) = &self.shared_rand {
            if sr.reveal.is_some() && sr.commit.is_none() {
                return Err(DirError::invalid(Self::NAME, "a reveal needs its commit"));
            }
            check_srv(Self::NAME, sr.current.as_ref())?;
            check_srv(Self::NAME, sr.previous.as_ref())?;
        }
        check_relays(Self::NAME, self.relays.iter().map(|r| &r.entry))
    }
}

impl Document for Consensus {
    const DOMAIN: &'static str = DOMAIN_CONSENSUS;
    const MAX_LEN: usize = MAX_CONSENSUS_LEN;
    const NAME: &'static str = "consensus";

    fn check_body(&self) -> Result<()> {
        if self.version != CONSENSUS_VERSION {
            return Err(DirError::invalid(Self::NAME, "unsupported version"));
        }
        if self.method != CONSENSUS_METHOD {
            return Err(DirError::invalid(
                Self::NAME,
                "unsupported consensus method",
            ));
        }
        check_timeline(
            Self::NAME,
            self.valid_after,
            self.fresh_until,
            self.valid_until,
        )?;
        check_params(Self::NAME, &self.params)?;
        if self.voters.len() > MAX_VOTERS || !strictly_sorted(&self.voters) {
            return Err(DirError::invalid(
                Self::NAME,
                "voters must be sorted, unique, at most 16",
            ));
        }
        check_relays(Self::NAME, self.relays.iter())?;
        if let Some(sr) = &self.shared_rand {
            if sr.current.is_none() && sr.previous.is_none() {
                return Err(DirError::invalid(
                    Self::NAME,
                    "shared random values present but both empty",
                ));
            }
            check_srv(Self::NAME, sr.current.as_ref())?;
            check_srv(Self::NAME, sr.previous.as_ref())?;
        }
        check_bandwidth_weights(Self::NAME, &self.bandwidth_weights)
    }
}

fn check_srv(object: &'static str, v: Option<&SrvValue>) -> Result<()> {
    match v {
        Some(v) if v.num_reveals == 0 || v.num_reveals > MAX_SRV_REVEALS => Err(DirError::invalid(
            object,
            "shared random value counts 1 to 16 reveals",
        )),
        _ => Ok(()),
    }
}

fn check_bandwidth_weights(object: &'static str, w: &BTreeMap<String, i32>) -> Result<()> {
    if w.is_empty() {
        return Ok(());
    }
    let names_ok = w.len() == BANDWIDTH_WEIGHT_NAMES.len()
        && w.keys().zip(BANDWIDTH_WEIGHT_NAMES).all(|(k, n)| k == n);
    if !names_ok {
        return Err(DirError::invalid(
            object,
            "bandwidth weights must be exactly Wbd..Wmm",
        ));
    }
    if w.values().any(|v| !(0..=WEIGHT_SCALE).contains(v)) {
        return Err(DirError::invalid(
            object,
            "bandwidth weight outside 0..=10000",
        ));
    }
    Ok(())
}

/// A vote whose signature through a currently valid certificate has been checked.
#[derive(Clone, Debug)]
pub struct VerifiedVote {
    signed: Signed<Vote>,
    vote: Vote,
}

impl Signed<Vote> {
    /// Check that `cert` is valid at `now` and its signing key signed this body, then decode and
    /// check that the vote is by the cert's identity.
    pub fn verify(self, cert: &VerifiedCert, now: u64) -> Result<VerifiedVote> {
        if !cert.is_valid_at(now) {
            return Err(DirError::NotValidNow {
                object: "authority certificate",
                why: "outside its validity window",
            });
        }
        if !self.has_valid_sig_by(&cert.signing_key()) {
            return Err(DirError::BadSignature {
                object: Vote::NAME,
                why: "no valid signature by the certified signing key",
            });
        }
        let vote = self.decode_checked_body()?;
        if !vote.authority.ct_eq(&cert.identity()) {
            return Err(DirError::BadSignature {
                object: Vote::NAME,
                why: "vote names another authority than its certificate",
            });
        }
        Ok(VerifiedVote { signed: self, vote })
    }
}

impl VerifiedVote {
    /// The vote.
    pub fn vote(&self) -> &Vote {
        &self.vote
    }
    /// The signed envelope.
    pub fn signed(&self) -> &Signed<Vote> {
        &self.signed
    }
}

/// A consensus whose signatures and validity window have been checked.
#[derive(Clone, Debug)]
pub struct VerifiedConsensus {
    signed: Signed<Consensus>,
    consensus: Consensus,
    signed_by: Vec<RelayId>,
}

/// Identities (from `authorities`) that validly signed `signed` through a certificate valid at
/// `now`. Counted once per identity.
pub fn valid_signers(
    signed: &Signed<Consensus>,
    authorities: &[RelayId],
    certs: &[VerifiedCert],
    now: u64,
) -> Vec<RelayId> {
    let mut ids: Vec<RelayId> = authorities.to_vec();
    ids.sort();
    ids.dedup();
    ids.into_iter()
        .filter(|id| {
            certs.iter().any(|c| {
                c.identity().ct_eq(id)
                    && c.is_valid_at(now)
                    && signed.has_valid_sig_by(&c.signing_key())
            })
        })
        .collect()
}

impl Signed<Consensus> {
    /// The client acceptance rule: valid signatures from more than half of the distinct
    /// `authorities`, each through a certificate valid at `now` (identities counted, not
    /// signatures); then decode; then `valid_after - 5 min <= now <= valid_until + 5 min`.
    /// Rollback is checked by the caller that holds the previous consensus
    /// ([`VerifiedConsensus::check_newer_than`]).
    pub fn verify(
        self,
        authorities: &[RelayId],
        certs: &[VerifiedCert],
        now: u64,
    ) -> Result<VerifiedConsensus> {
        let v = self.verify_signatures_only(authorities, certs, now)?;
        v.check_valid_at(now)?;
        Ok(v)
    }

    /// As [`Self::verify`] without the time window (authorities use this on their own documents
    /// before the period starts).
    pub fn verify_signatures_only(
        self,
        authorities: &[RelayId],
        certs: &[VerifiedCert],
        now: u64,
    ) -> Result<VerifiedConsensus> {
        let mut n = authorities.to_vec();
        n.sort();
        n.dedup();
        let signed_by = valid_signers(&self, &n, certs, now);
        if signed_by.len() * 2 <= n.len() {
            return Err(DirError::BadSignature {
                object: Consensus::NAME,
                why: "not signed by more than half of the configured authorities",
            });
        }
        let consensus = self.decode_checked_body()?;
        Ok(VerifiedConsensus {
            signed: self,
            consensus,
            signed_by,
        })
    }
}

impl VerifiedConsensus {
    /// The consensus.
    pub fn consensus(&self) -> &Consensus {
        &self.consensus
    }
    /// The signed envelope (for caching and re-serving).
    pub fn signed(&self) -> &Signed<Consensus> {
        &self.signed
    }
    /// The authority identities whose signatures were accepted.
    pub fn signed_by(&self) -> &[RelayId] {
        &self.signed_by
    }
    /// SHA-256 of the body.
    pub fn digest(&self) -> [u8; 32] {
        self.signed.digest()
    }
    /// `valid_after - CLOCK_SKEW <= now <= valid_until + CLOCK_SKEW`.
    pub fn check_valid_at(&self, now: u64) -> Result<()> {
        if now.saturating_add(CLOCK_SKEW) < self.consensus.valid_after {
            return Err(DirError::NotValidNow {
                object: Consensus::NAME,
                why: "not yet valid (dated in the future; check the clock)",
            });
        }
        if now > self.consensus.valid_until.saturating_add(CLOCK_SKEW) {
            return Err(DirError::NotValidNow {
                object: Consensus::NAME,
                why: "expired (stale)",
            });
        }
        Ok(())
    }
    /// Whether it is still usable at `now` (the validity window with skew).
    pub fn is_valid_at(&self, now: u64) -> bool {
        self.check_valid_at(now).is_ok()
    }
    /// Rollback protection: `valid_after` must be newer than `held`'s.
    pub fn check_newer_than(&self, held: Option<&Self>) -> Result<()> {
        match held {
            Some(h) if self.consensus.valid_after <= h.consensus.valid_after => {
                Err(DirError::Rollback {
                    got: self.consensus.valid_after,
                    held: h.consensus.valid_after,
                })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod shared_rand_tests {
    use super::*;
    use crate::doc::signed::{decode_canonical, encode};

    fn consensus(shared_rand: Option<SharedRand>) -> Consensus {
        Consensus {
            version: CONSENSUS_VERSION,
            method: CONSENSUS_METHOD,
            valid_after: 1_800_000_000,
            fresh_until: 1_800_003_600,
            valid_until: 1_800_010_800,
            voters: vec![RelayId([1; 32]), RelayId([2; 32])],
            params: BTreeMap::from([("hsdir_interval".to_string(), 20)]),
            relays: Vec::new(),
            bandwidth_weights: BTreeMap::new(),
            shared_rand,
        }
    }

    /// The consensus as encoded before the shared random values existed.
    #[derive(Serialize)]
    struct OldConsensus {
        version: u16,
        method: u16,
        valid_after: u64,
        fresh_until: u64,
        valid_until: u64,
        voters: Vec<RelayId>,
        params: BTreeMap<String, i32>,
        relays: Vec<ConsensusEntry>,
        bandwidth_weights: BTreeMap<String, i32>,
    }

    fn values() -> SharedRand {
        SharedRand {
            current: Some(SrvValue {
                num_reveals: 3,
                value: [7; 32],
            }),
            previous: Some(SrvValue {
                num_reveals: 2,
                value: [9; 32],
            }),
        }
    }

    #[test]
    fn shared_random_values_round_trip_and_are_signed() {
        let c = consensus(Some(values()));
        let key = allium_crypto::IdentityKeypair::generate();
        let signed = Signed::sign(&c, &key).expect("sign");
        let again = Signed::<Consensus>::from_bytes(&signed.to_bytes()).expect("parse");
        assert!(again.has_valid_sig_by(&key.public()));
        assert_eq!(again.dangerously_decode_unverified().expect("decode"), c);
        // The values are under the signature: the body ends with them.
        let body = encode(&c, "t").expect("encode");
        let tail: Vec<u8> = [&[1u8, 1, 3][..], &[7; 32], &[1, 2], &[9; 32]].concat();
        assert!(body.ends_with(&tail), "0x01, then each Option and value");
        // Only the previous value.
        let only_prev = consensus(Some(SharedRand {
            current: None,
            ..values()
        }));
        let b = encode(&only_prev, "t").expect("encode");
        assert_eq!(
            decode_canonical::<Consensus>(&b, "t").expect("decode"),
            only_prev
        );
    }

    #[test]
    fn a_consensus_without_the_values_still_parses() {
        let c = consensus(None);
        let old = OldConsensus {
            version: c.version,
            method: c.method,
            valid_after: c.valid_after,
            fresh_until: c.fresh_until,
            valid_until: c.valid_until,
            voters: c.voters.clone(),
            params: c.params.clone(),
            relays: Vec::new(),
            bandwidth_weights: BTreeMap::new(),
        };
        let old_bytes = postcard::to_allocvec(&old).expect("encode");
        assert_eq!(
            encode(&c, "t").expect("encode"),
            old_bytes,
            "same byte form"
        );
        let back: Consensus = decode_canonical(&old_bytes, "t").expect("old form decodes");
        assert_eq!(back, c);
        // An explicit "absent" byte, or garbage after the old form, is not canonical.
        for tail in [&[0u8][..], &[1, 1], &[2], &[1, 0, 0, 1]] {
            let b = [old_bytes.as_slice(), tail].concat();
            assert!(
                decode_canonical::<Consensus>(&b, "t").is_err(),
                "tail {tail:?} refused"
            );
        }
    }

    #[test]
    fn malformed_values_are_refused() {
        let empty = consensus(Some(SharedRand {
            current: None,
            previous: None,
        }));
        assert!(empty.check_body().is_err());
        let zero = consensus(Some(SharedRand {
            current: Some(SrvValue {
                num_reveals: 0,
                value: [1; 32],
            }),
            previous: None,
        }));
        assert!(zero.check_body().is_err());
        let many = consensus(Some(SharedRand {
            current: Some(SrvValue {
                num_reveals: 17,
                value: [1; 32],
            }),
            previous: None,
        }));
        assert!(many.check_body().is_err());
        assert!(consensus(Some(values())).check_body().is_ok());
        // A vote's reveal needs its commit.
        let vote = Vote {
            version: VOTE_VERSION,
            authority: RelayId([1; 32]),
            valid_after: 1_800_000_000,
            fresh_until: 1_800_003_600,
            valid_until: 1_800_010_800,
            published: 1_800_000_000,
            params: BTreeMap::new(),
            relays: Vec::new(),
            shared_rand: Some(SrVote {
                commit: None,
                reveal: Some([3; 32]),
                current: None,
                previous: None,
            }),
        };
        assert!(vote.check_body().is_err());
        let ok = Vote {
            shared_rand: Some(SrVote {
                commit: Some(SrCommit {
                    timestamp: 1_800_000_000,
                    hashed_reveal: [4; 32],
                }),
                ..vote.shared_rand.unwrap_or(SrVote {
                    commit: None,
                    reveal: None,
                    current: None,
                    previous: None,
                })
            }),
            ..vote
        };
        assert!(ok.check_body().is_ok());
        let b = encode(&ok, "t").expect("encode");
        assert_eq!(decode_canonical::<Vote>(&b, "t").expect("decode"), ok);
        // Truncated anywhere in the shared-random part: refused, no panic.
        for cut in 1..60 {
            assert!(decode_canonical::<Vote>(&b[..b.len() - cut], "t").is_err());
        }
    }
}
