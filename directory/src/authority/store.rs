//! The authority's data directory: descriptors, reachability history, certificates, votes and
//! the consensus, each written atomically so a restarted authority picks up where it stopped.
//!
//! Layout (under `data_dir`): `keys/` (signing key, certificate), `descriptors/<id hex>`,
//! `certs/<id hex>`, `votes/<id hex>` (the latest vote per authority), `history.json`,
//! `consensus` (the published one), `consensus-next` (the one being signed), `shared-random`
//! (the shared-random protocol state).
//! Everything read back is verified again as if it came from the network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use allium_crypto::RelayId;

use super::vote::RelayHistory;
use crate::client::cache::write_atomic;
use crate::doc::{
    AuthCert, Consensus, RelayDescriptor, Signed, VerifiedCert, VerifiedDescriptor, Vote,
};
use crate::err::{DirError, Result};

/// Paths inside the data directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

fn read_dir_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                return None;
            }
            // Every stored document is at most 8 MiB.
            let len = e.metadata().ok()?.len();
            if len > crate::doc::consensus::MAX_CONSENSUS_LEN as u64 {
                return None;
            }
            std::fs::read(e.path()).ok().map(|b| (name, b))
        })
        .collect()
}

impl Store {
    /// Open (create) the data directory.
    pub fn open(root: &Path) -> Result<Self> {
        for sub in ["descriptors", "certs", "votes"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| DirError::io(&d, e))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// Save an accepted descriptor.
    pub fn save_descriptor(&self, d: &VerifiedDescriptor) -> Result<()> {
        write_atomic(
            &self
                .root
                .join("descriptors")
                .join(d.desc().identity.to_hex()),
            &d.signed().to_bytes(),
        )
    }

    /// Load every stored descriptor that still verifies.
    pub fn load_descriptors(&self) -> BTreeMap<RelayId, VerifiedDescriptor> {
        read_dir_files(&self.root.join("descriptors"))
            .into_iter()
            .filter_map(|(_, b)| Signed::<RelayDescriptor>::from_bytes(&b).ok())
            .filter_map(|s| s.verify().ok())
            .map(|d| (d.desc().identity, d))
            .collect()
    }

    /// Remove a descriptor file.
    pub fn remove_descriptor(&self, id: &RelayId) {
        let _ = std::fs::remove_file(self.root.join("descriptors").join(id.to_hex()));
    }

    /// Save a certificate (by identity).
    pub fn save_cert(&self, c: &VerifiedCert) -> Result<()> {
        write_atomic(
            &self.root.join("certs").join(c.identity().to_hex()),
            &c.signed().to_bytes(),
        )
    }

    /// Load stored certificates.
    pub fn load_certs(&self) -> Vec<VerifiedCert> {
        read_dir_files(&self.root.join("certs"))
            .into_iter()
            .filter_map(|(_, b)| Signed::<AuthCert>::from_bytes(&b).ok())
            .filter_map(|s| s.verify().ok())
            .collect()
    }

    /// Save the latest vote of an authority.
    pub fn save_vote(&self, authority: &RelayId, v: &Signed<Vote>) -> Result<()> {
        write_atomic(
            &self.root.join("votes").join(authority.to_hex()),
            &v.to_bytes(),
        )
    }

    /// Load stored votes (unverified envelopes; the caller verifies them with certificates).
    pub fn load_votes(&self) -> Vec<Signed<Vote>> {
        read_dir_files(&self.root.join("votes"))
            .into_iter()
            .filter_map(|(_, b)| Signed::<Vote>::from_bytes(&b).ok())
            .collect()
    }

    /// Save the reachability history.
    pub fn save_history(&self, h: &BTreeMap<RelayId, RelayHistory>) -> Result<()> {
        let m: BTreeMap<String, &RelayHistory> = h.iter().map(|(k, v)| (k.to_hex(), v)).collect();
        let text = serde_json::to_vec_pretty(&m).map_err(|_| DirError::Internal("history json"))?;
        write_atomic(&self.root.join("history.json"), &text)
    }

    /// Load the reachability history (empty if missing or unreadable).
    pub fn load_history(&self) -> BTreeMap<RelayId, RelayHistory> {
        let Ok(b) = std::fs::read(self.root.join("history.json")) else {
            return BTreeMap::new();
        };
        let m: BTreeMap<String, RelayHistory> = serde_json::from_slice(&b).unwrap_or_default();
        m.into_iter()
            .filter_map(|(k, v)| RelayId::from_hex(&k).ok().map(|id| (id, v)))
            .collect()
    }

    /// Save the shared-random protocol state (it holds this run's secret reveal: the file is
    /// as private as the data directory).
    pub fn save_shared_random(&self, s: &super::shared_random::SrState) -> Result<()> {
        let bytes = crate::doc::signed::encode(s, "shared-random state")?;
        write_atomic(&self.root.join("shared-random"), &bytes)
    }

    /// Load the shared-random protocol state (a fresh one if missing or unreadable: the
    /// authority then sits out the current run).
    pub fn load_shared_random(&self) -> super::shared_random::SrState {
        let p = self.root.join("shared-random");
        let Ok(meta) = std::fs::metadata(&p) else {
            return Default::default();
        };
        if meta.len() > 64 * 1024 {
            return Default::default();
        }
        std::fs::read(&p)
            .ok()
            .and_then(|b| crate::doc::signed::decode_canonical(&b, "shared-random state").ok())
            .unwrap_or_default()
    }

    fn consensus_path(&self, next: bool) -> PathBuf {
        self.root
            .join(if next { "consensus-next" } else { "consensus" })
    }

    /// Save the published (`next == false`) or pending consensus.
    pub fn save_consensus(&self, next: bool, c: &Signed<Consensus>) -> Result<()> {
        write_atomic(&self.consensus_path(next), &c.to_bytes())
    }

    /// Load the published or pending consensus envelope.
    pub fn load_consensus(&self, next: bool) -> Option<Signed<Consensus>> {
        let p = self.consensus_path(next);
        let len = std::fs::metadata(&p).ok()?.len();
        if len > crate::doc::consensus::MAX_CONSENSUS_LEN as u64 {
            return None;
        }
        let b = std::fs::read(p).ok()?;
        Signed::<Consensus>::from_bytes(&b).ok()
    }
}
