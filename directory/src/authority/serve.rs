//! What the HTTP server reads from the authority state, and the descriptor uploads it accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use allium_crypto::RelayId;

use super::limits::{Limit, Prefix, canonical};
use super::state::Inner;
use super::vote::RelayHistory;
use crate::addr;
use crate::doc::{AuthCert, Consensus, RelayDescriptor, Signed, VerifiedDescriptor};
use crate::err::{DirError, Result};

/// How far in the future a descriptor's `published` may be.
const MAX_DESC_FUTURE: u64 = 3600;

impl Inner {
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

    /// Handle an uploaded descriptor. Errors are one-line reasons for the uploader.
    ///
    /// Beyond the checks of the descriptor itself, the table is bounded three ways: at most
    /// `relays_per_addr` relays name one address, at most `relays_per_prefix` name addresses in
    /// one /24 or /48, and at most `max_relays` are held. A new relay that finds the table full
    /// takes the place of the newest relay that is not reachable (never-reachable newcomers go
    /// first); reachable relays are never evicted, so then it is refused.
    ///
    /// Returns the relay's identity and whether its first address or link key differs from the
    /// descriptor this one replaced (`true` for a new relay): whether its reachability needs
    /// testing again.
    pub(crate) fn accept_descriptor_changed(
        &self,
        bytes: &[u8],
        now: u64,
    ) -> std::result::Result<(RelayId, bool), UploadError> {
        let d = Signed::<RelayDescriptor>::from_bytes(bytes)?.verify()?;
        d.check_valid_at(now, MAX_DESC_FUTURE)?;
        let desc = d.desc();
        check_addrs(&desc.addrs, self.live_cfg().allow_private_addresses)?;
        let id = desc.identity;
        let mut evicted = None;
        let changed;
        {
            let mut st = self.lock();
            changed = st.descs.get(&id).is_none_or(|old| {
                old.desc().addrs.first() != desc.addrs.first()
                    || old.desc().link_key != desc.link_key
            });
            if let Some(old) = st.descs.get(&id)
                && old.desc().published >= desc.published
            {
                return Err(DirError::NotNewer.into());
            }
            if let Err(l) = check_colocation(
                &st.descs,
                id,
                &desc.addrs,
                self.cfg.relays_per_addr(),
                self.cfg.relays_per_prefix(),
            ) {
                drop(st);
                self.limit_log.hit(
                    l,
                    now,
                    "descriptor refused: too many relays at one address or prefix",
                );
                return Err(UploadError::Limited(l));
            }
            if !st.descs.contains_key(&id) && st.descs.len() >= self.live_cfg().max_relays {
                let Some(victim) = eviction_victim(&st.descs, &st.history) else {
                    drop(st);
                    self.limit_log.hit(
                        Limit::TableFull,
                        now,
                        "descriptor refused: relay table full of reachable relays",
                    );
                    return Err(UploadError::Limited(Limit::TableFull));
                };
                st.descs.remove(&victim);
                st.history.remove(&victim);
                evicted = Some(victim);
            }
            st.history.entry(id).or_insert(RelayHistory {
                first_seen: now,
                ..RelayHistory::default()
            });
            st.descs.insert(id, d.clone());
            st.descs_reply = None;
        }
        if let Some(v) = evicted {
            self.store.remove_descriptor(&v);
            self.limit_log.hit(
                Limit::Evicted,
                now,
                "relay table full: evicted the newest unreachable relay",
            );
        }
        if let Err(e) = self.store.save_descriptor(&d) {
            tracing::warn!(error = %e, "could not store descriptor");
        }
        tracing::debug!(relay = %id, "accepted descriptor");
        Ok((id, changed))
    }
}

/// Why an upload was refused: the descriptor itself, or a limit.
#[derive(Debug)]
pub(crate) enum UploadError {
    /// The descriptor is bad, old, or otherwise refused by the checks of `accept_descriptor`.
    Dir(DirError),
    /// A limit refused it.
    Limited(Limit),
}

impl From<DirError> for UploadError {
    fn from(e: DirError) -> Self {
        Self::Dir(e)
    }
}

/// Whether a relay `id` at `addrs` fits the per-address and per-prefix caps, counting the other
/// relays held (its own older descriptor does not count).
pub(crate) fn check_colocation(
    descs: &BTreeMap<RelayId, VerifiedDescriptor>,
    id: RelayId,
    addrs: &[SocketAddr],
    per_addr: usize,
    per_prefix: usize,
) -> std::result::Result<(), Limit> {
    let ips: BTreeSet<IpAddr> = addrs.iter().map(|a| canonical(a.ip())).collect();
    let prefixes: BTreeSet<Prefix> = ips.iter().map(|ip| Prefix::of(*ip)).collect();
    let mut same_addr = 0usize;
    let mut same_prefix = 0usize;
    for (other, d) in descs {
        if *other == id {
            continue;
        }
        let theirs = &d.desc().addrs;
        if theirs.iter().any(|a| ips.contains(&canonical(a.ip()))) {
            same_addr += 1;
        }
        if theirs
            .iter()
            .any(|a| prefixes.contains(&Prefix::of(a.ip())))
        {
            same_prefix += 1;
        }
    }
    if same_addr >= per_addr {
        return Err(Limit::RelaysPerAddr);
    }
    if same_prefix >= per_prefix {
        return Err(Limit::RelaysPerPrefix);
    }
    Ok(())
}

/// The relay to evict from a full table: among relays whose last probe did not succeed (or that
/// were never probed), the one first seen most recently, so never-reachable newcomers go before
/// long-known relays that are briefly down. `None` when every relay is reachable.
pub(crate) fn eviction_victim(
    descs: &BTreeMap<RelayId, VerifiedDescriptor>,
    history: &BTreeMap<RelayId, RelayHistory>,
) -> Option<RelayId> {
    descs
        .keys()
        .filter_map(|id| {
            let h = history.get(id).copied().unwrap_or_default();
            (!h.last_ok).then_some((h.first_seen, *id))
        })
        .max()
        .map(|(_, id)| id)
}

/// The authority's address policy for relay descriptors: public addresses always, internal ones
/// only when `allow_internal` (`allow_private_addresses`, test networks), reserved ones never.
fn check_addrs(addrs: &[SocketAddr], allow_internal: bool) -> Result<()> {
    let Some(a) = addrs
        .iter()
        .find(|a| !addr::is_allowed(a.ip(), allow_internal))
    else {
        return Ok(());
    };
    Err(DirError::invalid(
        "relay descriptor",
        match addr::classify(a.ip()) {
            addr::AddrClass::Reserved => {
                "reserved address (unspecified, multicast, broadcast or documentation); \
                 advertise a public address"
            }
            _ => {
                "private or loopback address (this network does not allow them); \
                 advertise a public address"
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| s.parse().expect("addr")).collect()
    }

    #[test]
    fn descriptor_address_policy() {
        let public = addrs(&["8.8.8.8:9001", "[2001:4860::1]:9001"]);
        let internal = addrs(&["8.8.8.8:9001", "127.0.0.1:9001"]);
        let mapped = addrs(&["[::ffff:10.0.0.1]:9001"]);
        let reserved = addrs(&["224.0.0.1:9001"]);
        let doc = addrs(&["192.0.2.1:9001"]);
        for allow in [false, true] {
            assert!(check_addrs(&public, allow).is_ok());
            let e = check_addrs(&reserved, allow).expect_err("reserved");
            assert!(e.to_string().contains("reserved"), "{e}");
            assert!(check_addrs(&doc, allow).is_err());
        }
        let e = check_addrs(&internal, false).expect_err("internal refused");
        assert!(e.to_string().contains("private"), "{e}");
        assert!(check_addrs(&mapped, false).is_err());
        assert!(check_addrs(&internal, true).is_ok());
        assert!(check_addrs(&mapped, true).is_ok());
    }
}
