//! The authority's state and its voting round: vote, compute + sign, collect signatures, publish.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use allium_crypto::RelayId;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::compute::compute_consensus;
use super::config::AuthorityConfig;
use super::keys::AuthorityKeys;
use super::reach::Reachability;
use super::store::Store;
use super::vote::{RelayHistory, build_vote};
use crate::client::http;
use crate::doc::consensus::{MAX_CONSENSUS_LEN, valid_signers};
use crate::doc::signed::{decode_canonical, encode};
use crate::doc::{
    AuthCert, Consensus, RelayDescriptor, SigEntry, Signed, VerifiedCert, VerifiedDescriptor,
    VerifiedVote, Vote,
};
use crate::err::{DirError, Result};
use crate::{now_unix, paths};

/// Timeout of one authority-to-authority request.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent reachability probes.
const PROBE_CONCURRENCY: usize = 32;
/// How far in the future a descriptor's `published` may be.
const MAX_DESC_FUTURE: u64 = 3600;

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

/// Cap on a detached signature message.
pub(crate) const MAX_DETACHED_LEN: usize = 256;

#[derive(Clone)]
struct Published {
    signed: Signed<Consensus>,
    valid_after: u64,
    bytes: axum::body::Bytes,
    z: axum::body::Bytes,
}

#[derive(Default)]
struct State {
    descs: BTreeMap<RelayId, VerifiedDescriptor>,
    history: BTreeMap<RelayId, RelayHistory>,
    /// Certificates by authority identity (the one with the latest expiry).
    certs: BTreeMap<RelayId, VerifiedCert>,
    /// Votes by period, then by authority.
    votes: BTreeMap<u64, BTreeMap<RelayId, Arc<VerifiedVote>>>,
    /// The consensus being signed.
    pending: Option<(u64, Signed<Consensus>)>,
    /// The consensus being served.
    current: Option<Published>,
    /// `/descriptors` reply, rebuilt after a change.
    descs_reply: Option<axum::body::Bytes>,
}

/// The shared authority state.
pub(crate) struct Inner {
    pub(crate) cfg: AuthorityConfig,
    pub(crate) keys: AuthorityKeys,
    ids: Vec<RelayId>,
    reach: Arc<dyn Reachability>,
    store: Store,
    state: Mutex<State>,
    probe_slots: Arc<tokio::sync::Semaphore>,
    /// Concurrent large (vote) uploads being read.
    pub(crate) big_uploads: Arc<tokio::sync::Semaphore>,
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            v.is_private()
                || v.is_loopback()
                || v.is_link_local()
                || v.is_broadcast()
                || v.is_documentation()
                || v.octets().first() == Some(&0)
                || (v.octets().first() == Some(&100)
                    && (v.octets().get(1).copied().unwrap_or(0) & 0xc0) == 64)
        }
        IpAddr::V6(v) => {
            v.is_loopback()
                || v.is_unique_local()
                || v.is_unicast_link_local()
                || v.to_ipv4_mapped()
                    .is_some_and(|m| is_private(IpAddr::V4(m)))
        }
    }
}

fn compress(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    if e.write_all(bytes).is_err() {
        return Vec::new();
    }
    e.finish().unwrap_or_default()
}

impl Inner {
    pub(crate) fn new(
        cfg: AuthorityConfig,
        keys: AuthorityKeys,
        reach: Arc<dyn Reachability>,
    ) -> Result<Self> {
        let store = Store::open(&cfg.data_dir)?;
        let mut ids = cfg.authority_ids();
        ids.sort();
        let now = now_unix();
        let mut st = State {
            descs: store.load_descriptors(),
            history: store.load_history(),
            ..State::default()
        };
        st.descs.retain(|_, d| d.desc().expires > now);
        for c in store.load_certs() {
            if ids.contains(&c.identity()) {
                insert_cert(&mut st.certs, c);
            }
        }
        insert_cert(&mut st.certs, keys.cert.clone());
        let certs: Vec<VerifiedCert> = st.certs.values().cloned().collect();
        for v in store.load_votes() {
            for c in &certs {
                if let Ok(vv) = v.clone().verify(c, now) {
                    st.votes
                        .entry(vv.vote().valid_after)
                        .or_default()
                        .insert(vv.vote().authority, Arc::new(vv));
                    break;
                }
            }
        }
        if let Some(c) = store.load_consensus(false)
            && let Ok(v) = c.clone().verify_signatures_only(&ids, &certs, now)
        {
            let va = v.consensus().valid_after;
            st.current = Some(published(c, va));
        }
        if let Some(c) = store.load_consensus(true)
            && let Ok(body) = c.dangerously_decode_unverified()
        {
            st.pending = Some((body.valid_after, c));
        }
        Ok(Self {
            cfg,
            keys,
            ids,
            reach,
            store,
            state: Mutex::new(st),
            probe_slots: Arc::new(tokio::sync::Semaphore::new(PROBE_CONCURRENCY)),
            big_uploads: Arc::new(tokio::sync::Semaphore::new(4)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn peers(&self) -> Vec<(RelayId, std::net::SocketAddr)> {
        let me = self.keys.identity();
        self.cfg
            .authorities
            .iter()
            .filter(|a| a.identity != me)
            .map(|a| (a.identity, a.dir_addr))
            .collect()
    }

    pub(crate) fn descriptor_count(&self) -> usize {
        self.lock().descs.len()
    }

    pub(crate) fn current_consensus(&self) -> Option<Signed<Consensus>> {
        self.lock().current.as_ref().map(|p| p.signed.clone())
    }

    pub(crate) fn current_bytes(&self, compressed: bool) -> Option<axum::body::Bytes> {
        self.lock().current.as_ref().map(|p| {
            if compressed {
                p.z.clone()
            } else {
                p.bytes.clone()
            }
        })
    }

    pub(crate) fn pending_bytes(&self) -> Option<Vec<u8>> {
        self.lock().pending.as_ref().map(|(_, c)| c.to_bytes())
    }

    pub(crate) fn own_cert_bytes(&self) -> Vec<u8> {
        self.keys.cert.signed().to_bytes()
    }

    pub(crate) fn certs_bytes(&self) -> Vec<u8> {
        let certs: Vec<Signed<AuthCert>> = self
            .lock()
            .certs
            .values()
            .map(|c| c.signed().clone())
            .collect();
        crate::client::encode_cert_list(&certs)
    }

    pub(crate) fn descriptors_bytes(&self) -> axum::body::Bytes {
        let mut st = self.lock();
        if let Some(b) = &st.descs_reply {
            return b.clone();
        }
        let list: Vec<Vec<u8>> = st.descs.values().map(|d| d.signed().to_bytes()).collect();
        let b: axum::body::Bytes = postcard::to_allocvec(&list).unwrap_or_default().into();
        st.descs_reply = Some(b.clone());
        b
    }

    pub(crate) fn latest_own_vote_bytes(&self) -> Option<Vec<u8>> {
        let me = self.keys.identity();
        let st = self.lock();
        st.votes
            .values()
            .rev()
            .find_map(|m| m.get(&me))
            .map(|v| v.signed().to_bytes())
    }

    // ---- descriptors -------------------------------------------------------------------

    /// Handle an uploaded descriptor. Errors are one-line reasons for the uploader.
    pub(crate) fn accept_descriptor(&self, bytes: &[u8], now: u64) -> Result<RelayId> {
        let d = Signed::<RelayDescriptor>::from_bytes(bytes)?.verify()?;
        d.check_valid_at(now, MAX_DESC_FUTURE)?;
        let desc = d.desc();
        if !self.cfg.allow_private_addresses && desc.addrs.iter().any(|a| is_private(a.ip())) {
            return Err(DirError::invalid(
                "relay descriptor",
                "private or loopback address (this network does not allow them)",
            ));
        }
        let id = desc.identity;
        {
            let mut st = self.lock();
            if let Some(old) = st.descs.get(&id)
                && old.desc().published >= desc.published
            {
                return Err(DirError::NotNewer);
            }
            if !st.descs.contains_key(&id) && st.descs.len() >= self.cfg.max_relays {
                return Err(DirError::invalid(
                    "relay descriptor",
                    "authority is full; try again later",
                ));
            }
            st.history.entry(id).or_insert(RelayHistory {
                first_seen: now,
                ..RelayHistory::default()
            });
            st.descs.insert(id, d.clone());
            st.descs_reply = None;
        }
        if let Err(e) = self.store.save_descriptor(&d) {
            tracing::warn!(error = %e, "could not store descriptor");
        }
        tracing::debug!(relay = %id, "accepted descriptor");
        Ok(id)
    }

    // ---- certificates ------------------------------------------------------------------

    fn valid_certs(&self, now: u64) -> Vec<VerifiedCert> {
        self.lock()
            .certs
            .values()
            .filter(|c| c.is_valid_at(now))
            .cloned()
            .collect()
    }

    /// Make sure we hold a valid certificate of every configured authority, fetching missing
    /// ones from the authorities themselves.
    async fn refresh_certs(&self, now: u64) {
        let missing: Vec<_> = {
            let st = self.lock();
            self.peers()
                .into_iter()
                .filter(|(id, _)| !st.certs.get(id).is_some_and(|c| c.is_valid_at(now)))
                .collect()
        };
        for (id, addr) in missing {
            let r = async {
                let b = http::request(addr, "GET", paths::CERT, None, 4096, PEER_TIMEOUT)
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
                Ok(_) => tracing::warn!(authority = %id, "authority served a wrong certificate"),
                Err(e) => tracing::debug!(authority = %id, error = %e, "certificate fetch failed"),
            }
        }
    }

    // ---- votes -------------------------------------------------------------------------

    /// Verify and store a vote (from a POST, a fetch, or our own).
    pub(crate) fn accept_vote(&self, bytes: &[u8], now: u64) -> Result<u64> {
        let signed = Signed::<Vote>::from_bytes(bytes)?;
        let certs = self.valid_certs(now);
        let cert = signed
            .sigs()
            .iter()
            .find_map(|s| certs.iter().find(|c| c.signing_key() == s.signer))
            .ok_or(DirError::BadSignature {
                object: "vote",
                why: "not signed by a known authority signing key",
            })?;
        let v = signed.verify(cert, now)?;
        let va = v.vote().valid_after;
        let interval = self.cfg.voting_interval_secs;
        if va > now.saturating_add(2 * interval) || va.saturating_add(2 * interval) < now {
            return Err(DirError::invalid("vote", "for a period too far from now"));
        }
        let auth = v.vote().authority;
        let mut st = self.lock();
        let m = st.votes.entry(va).or_default();
        if let Some(old) = m.get(&auth) {
            if old.signed().body() == v.signed().body() {
                return Ok(va);
            }
            return Err(DirError::invalid(
                "vote",
                "conflicting vote for this period already held",
            ));
        }
        m.insert(auth, Arc::new(v.clone()));
        // Keep three periods.
        while st.votes.len() > 3 {
            st.votes.pop_first();
        }
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
        let vote = {
            let st = self.lock();
            build_vote(
                &self.cfg,
                self.keys.identity(),
                &st.descs,
                &st.history,
                va,
                now,
            )
        };
        let signed = Signed::sign(&vote, &self.keys.signing)?;
        let bytes = signed.to_bytes();
        self.accept_vote(&bytes, now)?;
        tracing::info!(valid_after = va, relays = vote.relays.len(), "voted");
        self.push_vote(Arc::new(bytes)).await;
        Ok(())
    }

    async fn push_vote(&self, bytes: Arc<Vec<u8>>) {
        let pushes = self.peers().into_iter().map(|(id, addr)| {
            let b = bytes.clone();
            async move {
                let r = http::request(addr, "POST", paths::VOTE, Some(&b), 4096, PEER_TIMEOUT)
                    .await
                    .and_then(|r| r.into_ok("posting our vote"));
                if let Err(e) = r {
                    tracing::debug!(authority = %id, error = %e, "vote push failed");
                }
            }
        });
        futures::future::join_all(pushes).await;
    }

    /// Forget descriptors that have expired (memory and disk).
    fn prune_expired(&self, now: u64) {
        let gone: Vec<RelayId> = {
            let mut st = self.lock();
            let gone: Vec<RelayId> = st
                .descs
                .iter()
                .filter(|(_, d)| d.desc().expires <= now)
                .map(|(k, _)| *k)
                .collect();
            for id in &gone {
                st.descs.remove(id);
                st.history.remove(id);
            }
            if !gone.is_empty() {
                st.descs_reply = None;
            }
            gone
        };
        for id in &gone {
            self.store.remove_descriptor(id);
        }
    }

    /// Probe every relay, with at most [`PROBE_CONCURRENCY`] probes at once and an overall
    /// budget of `clamp(interval / 8, 5 s, 10 min)`; relays not reached in time keep their
    /// previous result.
    async fn probe_all(&self, now: u64) {
        let targets: Vec<_> = self
            .lock()
            .descs
            .values()
            .map(|d| {
                let x = d.desc();
                (x.identity, x.addrs.first().copied(), x.link_key)
            })
            .collect();
        let budget = Duration::from_secs((self.cfg.voting_interval_secs / 8).clamp(5, 600));
        let deadline = tokio::time::Instant::now() + budget;
        let mut stream = futures::stream::iter(targets)
            .map(|(id, addr, lk)| {
                let reach = self.reach.clone();
                async move {
                    let ok = match addr {
                        Some(a) => reach.probe(a, id, lk).await,
                        None => false,
                    };
                    (id, ok)
                }
            })
            .buffer_unordered(PROBE_CONCURRENCY);
        let mut results = Vec::new();
        while let Ok(Some(r)) = tokio::time::timeout_at(deadline, stream.next()).await {
            results.push(r);
        }
        drop(stream);
        let mut st = self.lock();
        for (id, ok) in results {
            st.history
                .entry(id)
                .or_insert(RelayHistory {
                    first_seen: now,
                    ..RelayHistory::default()
                })
                .record(ok, now);
        }
        let ids: Vec<RelayId> = st.descs.keys().copied().collect();
        st.history.retain(|k, _| ids.contains(k));
        let h = st.history.clone();
        drop(st);
        let _ = self.store.save_history(&h);
    }

    /// Probe one relay soon after its descriptor arrived (skipped when many probes run).
    pub(crate) fn spawn_probe(self: &Arc<Self>, id: RelayId) {
        let Ok(permit) = self.probe_slots.clone().try_acquire_owned() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            let target = me.lock().descs.get(&id).map(|d| {
                let x = d.desc();
                (x.addrs.first().copied(), x.link_key)
            });
            let Some((Some(addr), lk)) = target else {
                return;
            };
            let ok = me.reach.probe(addr, id, lk).await;
            let now = now_unix();
            if let Some(h) = me.lock().history.get_mut(&id) {
                h.record(ok, now);
            }
            drop(permit);
        });
    }

    // ---- consensus ---------------------------------------------------------------------

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
        for (id, addr) in missing {
            let r = async {
                let b = http::request(
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
            }
        }
        let votes: Vec<Arc<VerifiedVote>> = {
            let st = self.lock();
            st.votes
                .get(&va)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default()
        };
        if !votes
            .iter()
            .any(|v| v.vote().authority == self.keys.identity())
        {
            return Err(DirError::invalid(
                "consensus",
                "no own vote for this period; run the vote phase first",
            ));
        }
        if votes.len() * 2 <= self.ids.len() {
            return Err(DirError::invalid(
                "consensus",
                format!(
                    "only {} of {} authorities voted; need more than half",
                    votes.len(),
                    self.ids.len()
                ),
            ));
        }
        let refs: Vec<&Vote> = votes.iter().map(|v| v.vote()).collect();
        let consensus = compute_consensus(&refs, self.ids.len(), va);
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
                let r = http::request(addr, "POST", paths::SIGNATURE, Some(&b), 4096, PEER_TIMEOUT)
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
    fn add_sig(&self, va: u64, digest: Option<[u8; 32]>, sig: SigEntry, now: u64) -> Result<()> {
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
    fn try_publish(&self, va: u64, now: u64, force: bool) -> Result<bool> {
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
                "nothing computed for this period; run the compute phase first",
            ));
        }
        for (id, addr) in self.peers() {
            if signed_ids.contains(&id) {
                continue;
            }
            let r = async {
                let b = http::request(
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
            tracing::warn!(
                valid_after = va,
                "consensus not signed by a majority; not published"
            );
        }
        Ok(ok)
    }
}

fn published(signed: Signed<Consensus>, valid_after: u64) -> Published {
    let bytes = signed.to_bytes();
    let z = compress(&bytes);
    Published {
        signed,
        valid_after,
        bytes: bytes.into(),
        z: z.into(),
    }
}

fn insert_cert(map: &mut BTreeMap<RelayId, VerifiedCert>, c: VerifiedCert) {
    match map.get(&c.identity()) {
        Some(old) if old.cert().expires >= c.cert().expires => {}
        _ => {
            map.insert(c.identity(), c);
        }
    }
}

/// The voting schedule for the period starting at `va` with interval `i`:
/// vote at `va - i/2`, compute at `va - i/4`, publish at `va`.
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The voting schedule. For the period starting at `va` (a multiple of the interval `I`, in
/// seconds) the authority votes at `va − I/2`, computes at `va − I/4` and publishes at `va`. Phase
/// times are kept in milliseconds so that short test-network intervals (2 s) keep three distinct
/// phases and no phase fires up to a second late.
pub(crate) async fn schedule_loop(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let i = inner.cfg.voting_interval_secs;
    let i_ms = i.saturating_mul(1000);
    loop {
        let now_ms = now_unix_ms();
        let mut va = super::next_valid_after(now_ms / 1000, i);
        // Too late to vote for the next period: aim at the one after.
        if now_ms > (va * 1000).saturating_sub(i_ms / 4) {
            va += i;
        }
        let va_ms = va * 1000;
        let phases: [(u64, u8); 3] = [(va_ms - i_ms / 2, 0), (va_ms - i_ms / 4, 1), (va_ms, 2)];
        for (at, phase) in phases {
            let wait = at.saturating_sub(now_unix_ms());
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
                _ = shutdown.changed() => return,
            }
            let r = match phase {
                0 => inner.vote_phase(va).await,
                1 => inner.compute_phase(va).await,
                _ => inner.publish_phase(va).await.map(|_| ()),
            };
            if let Err(e) = r {
                tracing::warn!(valid_after = va, error = %e, "voting round step failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn detached_signature_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(d) = decode_canonical::<DetachedSignature>(&bytes, "x") {
                prop_assert_eq!(encode(&d, "x").expect("encode"), bytes);
            }
        }
    }

    #[test]
    fn private_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.0.1",
            "172.16.5.4",
            "169.254.1.1",
            "100.64.0.1",
            "0.1.2.3",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(is_private(a.parse().expect("ip")), "{a}");
        }
        for a in ["8.8.8.8", "100.128.0.1", "2001:4860::1"] {
            assert!(!is_private(a.parse().expect("ip")), "{a}");
        }
    }
}
