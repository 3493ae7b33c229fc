//! One voting round on the authority state: accept and push votes, compute and sign the
//! consensus, collect detached signatures, publish once more than half of the authorities signed.
//! The vote itself is built in `vote`, the consensus computed in `compute`.

use std::sync::Arc;
use std::time::Duration;

use allium_crypto::RelayId;
use serde::{Deserialize, Serialize};

use super::compute::compute_consensus;
use super::limits::Limit;
use super::state::{Inner, insert_cert, published};
use super::vote::build_vote;
use crate::client::http;
use crate::doc::consensus::{MAX_CONSENSUS_LEN, valid_signers};
use crate::doc::signed::{decode_canonical, encode};
use crate::doc::{AuthCert, Consensus, SigEntry, Signed, VerifiedVote, Vote};
use crate::err::{DirError, Result};
use crate::{now_unix, paths};

/// Timeout of one authority-to-authority request.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// A detached consensus signature, as POSTed to `/allium/v1/signature`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DetachedSignature {
    /// Format version (1).
    pub version: u16,
    /// The consensus period.
    pub valid_after: u64,
    /// SHA-256 of the consensus body signed.
    pub digest: [u8; 32],
    /// The signature (by a signing key).
    pub sig: SigEntry,
}

/// The periods whose votes are accepted at `now`: the current and the next, with a clock-skew
/// allowance of a quarter interval (at most 60 s) on both sides. Returns the first and the last
/// `valid_after` accepted.
pub(crate) fn vote_window(now: u64, interval: u64) -> (u64, u64) {
    let i = interval.max(1);
    let skew = (i / 4).min(60);
    let lo = now.saturating_sub(skew) / i * i;
    let hi = (now.saturating_add(skew) / i + 1) * i;
    (lo, hi)
}

/// Most periods one authority may have a vote held for (the previous one while its consensus
/// is still being signed, the current, the next). Each authority only fills its own slots, so
/// one with a stolen key cannot push another's votes out.
pub(crate) const MAX_PERIODS_PER_AUTHORITY: usize = 3;

/// Cap on a detached signature message.
pub(crate) const MAX_DETACHED_LEN: usize = 256;

impl Inner {
    /// One HTTP request to another authority, from this authority's `outbound_bind_address`
    /// (the peers reserve connection slots for the authorities' addresses).
    async fn peer_request(
        &self,
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        max_body: usize,
        timeout: Duration,
    ) -> Result<http::Response> {
        http::with_outbound_bind(
            self.cfg.outbound_bind_address,
            http::request(addr, method, path, body, max_body, timeout),
        )
        .await
    }

    /// Make sure we hold a valid certificate of every configured authority, fetching missing
    /// ones from the authorities themselves.
    pub(super) async fn refresh_certs(&self, now: u64) {
        let missing: Vec<_> = {
            let st = self.lock();
            self.peers()
                .into_iter()
                .filter(|(id, _)| !st.certs.get(id).is_some_and(|c| c.is_valid_at(now)))
                .collect()
        };
        for (id, addr) in missing {
            let r = async {
                let b = self
                    .peer_request(addr, "GET", paths::CERT, None, 4096, PEER_TIMEOUT)
                    .await?
                    .into_ok("fetching a certificate")?;
                Signed::<AuthCert>::from_bytes(&b)?.verify()
            }
            .await;
            match r {
                Ok(c) if c.identity() == id && c.is_valid_at(now) => {
                    let _ = self.store.save_cert(&c);
                    insert_cert(&mut self.lock().certs, c);
                }
                Ok(c) if c.identity() != id => tracing::warn!(
                    "the authority at {addr} serves a certificate for identity {}, but this \
                     authority's [[authorities]] entry for {addr} says {}; correct the \
                     `identity` of that entry (or of the other authority's configuration)",
                    c.identity().to_hex(),
                    id.to_hex()
                ),
                Ok(c) => tracing::warn!(
                    "the authority {} at {addr} serves a certificate that is not valid now (valid \
                     {} to {}); it must run `allium authority certify`, or a clock is wrong",
                    id.to_hex(),
                    crate::time_fmt::rfc3339(c.cert().valid_after),
                    crate::time_fmt::rfc3339(c.cert().expires)
                ),
                Err(e) => tracing::debug!(authority = %id, error = %e, "certificate fetch failed"),
            }
        }
    }

    /// Verify and store a vote (from a POST, a fetch, or our own).
    pub(crate) fn accept_vote(&self, bytes: &[u8], now: u64) -> Result<u64> {
        let signed = Signed::<Vote>::from_bytes(bytes)?;
        let certs = self.valid_certs(now);
        let Some(cert) = signed
            .sigs()
            .iter()
            .find_map(|s| certs.iter().find(|c| c.signing_key() == s.signer))
        else {
            self.limit_log.hit(
                Limit::VoteUnknownAuthority,
                now,
                "vote not signed by a known authority signing key",
            );
            return Err(DirError::BadSignature {
                object: "vote",
                why: "not signed by a known authority signing key",
            });
        };
        let v = signed.verify(cert, now)?;
        let va = v.vote().valid_after;
        let auth = v.vote().authority;
        if !self.ids.contains(&auth) {
            self.limit_log.hit(
                Limit::VoteUnknownAuthority,
                now,
                "vote by an unknown authority",
            );
            return Err(DirError::BadSignature {
                object: "vote",
                why: "not by a configured authority",
            });
        }
        let (lo, hi) = vote_window(now, self.cfg.voting_interval_secs);
        if va < lo || va > hi {
            self.limit_log.hit(
                Limit::VoteWrongPeriod,
                now,
                "vote for a period other than the current or the next",
            );
            return Err(DirError::invalid(
                "vote",
                "not for the current or the next voting period",
            ));
        }
        let mut st = self.lock();
        // Forget periods that can no longer be voted for; what is left is at most the
        // periods in [lo, hi], each with at most one vote per configured authority.
        st.votes.retain(|p, _| *p >= lo);
        let periods_of_auth = st
            .votes
            .iter()
            .filter(|(p, m)| **p != va && m.contains_key(&auth))
            .count();
        if periods_of_auth >= MAX_PERIODS_PER_AUTHORITY {
            drop(st);
            self.limit_log.hit(
                Limit::VoteConflict,
                now,
                "an authority voted for more periods than the window holds",
            );
            return Err(DirError::invalid(
                "vote",
                "this authority already has votes for as many periods as are kept",
            ));
        }
        let m = st.votes.entry(va).or_default();
        if let Some(old) = m.get(&auth) {
            if old.signed().body() == v.signed().body() {
                return Ok(va);
            }
            drop(st);
            self.limit_log.hit(
                Limit::VoteConflict,
                now,
                "a second, different vote by one authority for one period",
            );
            return Err(DirError::invalid(
                "vote",
                "conflicting vote for this period already held",
            ));
        }
        m.insert(auth, Arc::new(v.clone()));
        drop(st);
        let _ = self.store.save_vote(&auth, v.signed());
        Ok(va)
    }

    pub(crate) async fn vote_phase(&self, va: u64) -> Result<()> {
        let now = now_unix();
        let me = self.keys.identity();
        let existing = self
            .lock()
            .votes
            .get(&va)
            .and_then(|m| m.get(&me))
            .map(|v| v.signed().to_bytes());
        if let Some(bytes) = existing {
            // Already voted for this period (e.g. before a restart): never sign a second,
            // different vote; push the one we have again.
            self.push_vote(Arc::new(bytes)).await;
            return Ok(());
        }
        self.prune_expired(now);
        self.probe_all(now).await;
        let cfg = self.live_cfg();
        let sched = cfg.shared_random_schedule();
        let (vote, sr_state) = {
            let mut st = self.lock();
            let mut vote = build_vote(&cfg, me, &st.descs, &st.history, va, now);
            // Shared randomness: a new run starts here, or the current one goes on (commit or
            // reveal, by phase).
            if st
                .sr
                .advance(&sched, va, &me, allium_crypto::rng::fill_random)
            {
                vote.shared_rand = st.sr.vote_part(&sched, va, &me);
            }
            (vote, st.sr.clone())
        };
        // Kept before the commitment leaves: a restart must still be able to reveal.
        if let Err(e) = self.store.save_shared_random(&sr_state) {
            tracing::warn!(error = %e, "cannot save the shared-random state; after a restart this authority sits out the current run");
        }
        let signed = Signed::sign(&vote, &self.keys.signing)?;
        let bytes = signed.to_bytes();
        self.accept_vote(&bytes, now)?;
        tracing::info!(valid_after = va, relays = vote.relays.len(), "voted");
        self.push_vote(Arc::new(bytes)).await;
        Ok(())
    }

    pub(super) async fn push_vote(&self, bytes: Arc<Vec<u8>>) {
        let pushes = self.peers().into_iter().map(|(id, addr)| {
            let b = bytes.clone();
            async move {
                let r = self
                    .peer_request(addr, "POST", paths::VOTE, Some(&b), 4096, PEER_TIMEOUT)
                    .await
                    .and_then(|r| r.into_ok("posting our vote"));
                if let Err(e) = r {
                    tracing::debug!(authority = %id, error = %e, "vote push failed");
                }
            }
        });
        futures::future::join_all(pushes).await;
    }

    pub(crate) async fn compute_phase(&self, va: u64) -> Result<()> {
        let now = now_unix();
        self.refresh_certs(now).await;
        // Fetch votes we lack.
        let missing: Vec<_> = {
            let st = self.lock();
            let have = st.votes.get(&va);
            self.peers()
                .into_iter()
                .filter(|(id, _)| !have.is_some_and(|m| m.contains_key(id)))
                .collect()
        };
        let mut fetch_errors: Vec<(RelayId, String)> = Vec::new();
        for (id, addr) in missing {
            let r = async {
                let b = self
                    .peer_request(
                        addr,
                        "GET",
                        paths::VOTE_CURRENT,
                        None,
                        MAX_CONSENSUS_LEN,
                        PEER_TIMEOUT,
                    )
                    .await?
                    .into_ok("fetching a vote")?;
                self.accept_vote(&b, now)
            }
            .await;
            if let Err(e) = r {
                tracing::debug!(authority = %id, error = %e, "vote fetch failed");
                fetch_errors.push((id, e.to_string()));
            }
        }
        let votes: Vec<Arc<VerifiedVote>> = {
            let st = self.lock();
            st.votes
                .get(&va)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default()
        };
        // Name every authority whose vote is absent, with why it could not be fetched.
        let absent: Vec<String> = self
            .peers()
            .into_iter()
            .filter(|(id, _)| !votes.iter().any(|v| v.vote().authority == *id))
            .map(|(id, addr)| {
                let why = fetch_errors
                    .iter()
                    .find(|(e_id, _)| *e_id == id)
                    .map(|(_, e)| e.as_str())
                    .unwrap_or("no vote received");
                format!("{} at {addr} ({why})", id.to_hex())
            })
            .collect();
        for a in &absent {
            tracing::warn!(
                valid_after = va,
                "no vote from authority {a}; is it running and reachable from here?"
            );
        }
        if !votes
            .iter()
            .any(|v| v.vote().authority == self.keys.identity())
        {
            return Err(DirError::invalid(
                "consensus",
                "this authority has no vote of its own for this period (it started after the \
                 voting time); it takes part from the next period",
            ));
        }
        if votes.len() * 2 <= self.ids.len() {
            return Err(DirError::invalid(
                "consensus",
                format!(
                    "only {} of {} authorities voted, need more than half; missing: {}",
                    votes.len(),
                    self.ids.len(),
                    absent.join(", ")
                ),
            ));
        }
        let refs: Vec<&Vote> = votes.iter().map(|v| v.vote()).collect();
        let consensus = compute_consensus(&refs, self.ids.len(), va);
        let sched = self.live_cfg().shared_random_schedule();
        let sr_state = {
            let mut st = self.lock();
            for bad in st.sr.absorb(&sched, &refs) {
                tracing::warn!(
                    valid_after = va,
                    "the shared-random reveal of authority {} does not open its commitment; it \
                     is left out of this run's value",
                    bad.to_hex()
                );
            }
            st.sr.adopt(&sched, &consensus);
            st.sr.clone()
        };
        if let Err(e) = self.store.save_shared_random(&sr_state) {
            tracing::warn!(error = %e, "cannot save the shared-random state");
        }
        let body = encode(&consensus, "consensus")?;
        let mut signed = Signed::<Consensus>::from_body_unsigned(body);
        signed.add_own_signature(&self.keys.signing);
        // Keep signatures already collected on an identical body.
        {
            let mut st = self.lock();
            if let Some((pva, old)) = &st.pending
                && *pva == va
                && old.body() == signed.body()
            {
                for s in old.sigs() {
                    signed.add_detached_signature(*s);
                }
            }
            st.pending = Some((va, signed.clone()));
        }
        let _ = self.store.save_consensus(true, &signed);
        tracing::info!(
            valid_after = va,
            relays = consensus.relays.len(),
            voters = consensus.voters.len(),
            "computed consensus"
        );
        let det = DetachedSignature {
            version: 1,
            valid_after: va,
            digest: signed.digest(),
            sig: SigEntry {
                signer: self.keys.signing.public(),
                sig: signed
                    .sigs()
                    .iter()
                    .find(|s| s.signer == self.keys.signing.public())
                    .map(|s| s.sig)
                    .ok_or(DirError::Internal("own signature missing"))?,
            },
        };
        let bytes = Arc::new(encode(&det, "detached signature")?);
        let pushes = self.peers().into_iter().map(|(id, addr)| {
            let b = bytes.clone();
            async move {
                let r = self
                    .peer_request(addr, "POST", paths::SIGNATURE, Some(&b), 4096, PEER_TIMEOUT)
                    .await
                    .and_then(|r| r.into_ok("posting our signature"));
                if let Err(e) = r {
                    tracing::debug!(authority = %id, error = %e, "signature push failed");
                }
            }
        });
        futures::future::join_all(pushes).await;
        Ok(())
    }

    /// Add a signature by a configured authority's certified signing key to the pending body.
    pub(super) fn add_sig(
        &self,
        va: u64,
        digest: Option<[u8; 32]>,
        sig: SigEntry,
        now: u64,
    ) -> Result<()> {
        let known = self
            .valid_certs(now)
            .iter()
            .any(|c| c.signing_key() == sig.signer && self.ids.contains(&c.identity()));
        if !known {
            return Err(DirError::BadSignature {
                object: "detached signature",
                why: "not by a known authority signing key",
            });
        }
        let mut st = self.lock();
        let Some((pva, pending)) = st.pending.as_mut() else {
            return Err(DirError::invalid(
                "detached signature",
                "no consensus being signed",
            ));
        };
        if *pva != va || digest.is_some_and(|d| d != pending.digest()) {
            return Err(DirError::invalid(
                "detached signature",
                "for a different consensus than ours",
            ));
        }
        if !pending.add_detached_signature(sig) {
            return Err(DirError::BadSignature {
                object: "detached signature",
                why: "does not verify over our consensus",
            });
        }
        Ok(())
    }

    /// Handle a POSTed detached signature.
    pub(crate) fn accept_detached(&self, bytes: &[u8], now: u64) -> Result<()> {
        if bytes.len() > MAX_DETACHED_LEN {
            return Err(DirError::TooLarge {
                object: "detached signature",
                len: bytes.len(),
                max: MAX_DETACHED_LEN,
            });
        }
        let d: DetachedSignature = decode_canonical(bytes, "detached signature")?;
        if d.version != 1 {
            return Err(DirError::invalid(
                "detached signature",
                "unsupported version",
            ));
        }
        self.add_sig(d.valid_after, Some(d.digest), d.sig, now)?;
        let _ = self.try_publish(d.valid_after, now, false);
        Ok(())
    }

    /// Publish the pending consensus if more than half signed (and, unless `force`, once its
    /// period has started).
    pub(super) fn try_publish(&self, va: u64, now: u64, force: bool) -> Result<bool> {
        if !force && now < va {
            return Ok(false);
        }
        let certs = self.valid_certs(now);
        let mut st = self.lock();
        let Some((pva, pending)) = st.pending.clone() else {
            return Ok(false);
        };
        if pva != va {
            return Ok(false);
        }
        if st.current.as_ref().is_some_and(|c| c.valid_after > va) {
            return Ok(true);
        }
        let signers = valid_signers(&pending, &self.ids, &certs, now);
        if signers.len() * 2 <= self.ids.len() {
            return Ok(false);
        }
        // Already serving this body with at least as many signatures?
        if st.current.as_ref().is_some_and(|c| {
            c.valid_after == va
                && c.signed.body() == pending.body()
                && c.signed.sigs().len() >= signers.len()
        }) {
            return Ok(true);
        }
        // Serve only signatures by certified signing keys of configured authorities.
        let mut out = Signed::<Consensus>::from_body_unsigned(pending.body().to_vec());
        for s in pending.sigs() {
            if certs
                .iter()
                .any(|c| c.signing_key() == s.signer && self.ids.contains(&c.identity()))
            {
                out.add_detached_signature(*s);
            }
        }
        st.current = Some(published(out.clone(), va));
        drop(st);
        let _ = self.store.save_consensus(false, &out);
        tracing::info!(
            valid_after = va,
            signatures = signers.len(),
            "published consensus"
        );
        Ok(true)
    }

    pub(crate) async fn publish_phase(&self, va: u64) -> Result<bool> {
        let now = now_unix();
        let (have_pending, signed_ids) = {
            let certs = self.valid_certs(now);
            let st = self.lock();
            match &st.pending {
                Some((pva, p)) if *pva == va => (true, valid_signers(p, &self.ids, &certs, now)),
                _ => (false, Vec::new()),
            }
        };
        if !have_pending {
            return Err(DirError::invalid(
                "consensus",
                "no consensus was computed here for this period (too few votes, or this \
                 authority started after the voting time; see the warnings above); it takes \
                 part from the next period",
            ));
        }
        for (id, addr) in self.peers() {
            if signed_ids.contains(&id) {
                continue;
            }
            let r = async {
                let b = self
                    .peer_request(
                        addr,
                        "GET",
                        paths::CONSENSUS_NEXT,
                        None,
                        MAX_CONSENSUS_LEN,
                        PEER_TIMEOUT,
                    )
                    .await?
                    .into_ok("fetching signatures")?;
                Signed::<Consensus>::from_bytes(&b)
            }
            .await;
            match r {
                Ok(theirs) => {
                    for s in theirs.sigs() {
                        let _ = self.add_sig(va, Some(theirs.digest()), *s, now);
                    }
                }
                Err(e) => tracing::debug!(authority = %id, error = %e, "signature fetch failed"),
            }
        }
        let _ = self
            .lock()
            .pending
            .as_ref()
            .map(|(_, p)| p.clone())
            .map(|p| self.store.save_consensus(true, &p));
        let ok = self.try_publish(va, now, true)?;
        if !ok {
            let signed_now = {
                let certs = self.valid_certs(now);
                let st = self.lock();
                match &st.pending {
                    Some((pva, p)) if *pva == va => valid_signers(p, &self.ids, &certs, now),
                    _ => Vec::new(),
                }
            };
            let unsigned: Vec<String> = self
                .peers()
                .into_iter()
                .filter(|(id, _)| !signed_now.contains(id))
                .map(|(id, addr)| format!("{} at {addr}", id.to_hex()))
                .collect();
            tracing::warn!(
                valid_after = va,
                "consensus not signed by a majority ({} of {}); not published; no signature \
                 from: {}",
                signed_now.len(),
                self.ids.len(),
                unsigned.join(", ")
            );
        }
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn vote_window_is_the_current_and_next_period() {
        // I = 3600, skew 60 s.
        assert_eq!(vote_window(36_000 + 1000, 3600), (36_000, 39_600));
        // Just after a period began: the previous one still counts as current (skew).
        assert_eq!(vote_window(36_000 + 30, 3600), (32_400, 39_600));
        // Just before the next began: the one after it counts as next (skew).
        assert_eq!(vote_window(39_600 - 30, 3600), (36_000, 43_200));
        // Short test intervals: skew I/4.
        assert_eq!(vote_window(100, 4), (96, 104));
        assert_eq!(vote_window(0, 4), (0, 4));
    }

    proptest! {
        #[test]
        fn vote_window_holds_at_most_three_periods(now in 0u64..u64::MAX / 2, i in 2u64..100_000) {
            let (lo, hi) = vote_window(now, i);
            prop_assert!(lo <= now && now < hi);
            prop_assert!(hi - lo <= 3 * i);
        }

        #[test]
        fn detached_signature_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(d) = decode_canonical::<DetachedSignature>(&bytes, "x") {
                prop_assert_eq!(encode(&d, "x").expect("encode"), bytes);
            }
        }
    }
}
