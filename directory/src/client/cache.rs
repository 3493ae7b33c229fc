//! The consensus cache: the consensus held, its certificates, its file on disk, and when to
//! fetch the next one (Tor's schedule, dir-spec §5.1).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{
    AuthorityInfo, FetchedConsensus, Liveness, MAX_CERTS_LEN, encode_cert_list,
    fetch_consensus_newer,
};
use crate::doc::VerifiedConsensus;
use crate::doc::consensus::MAX_CONSENSUS_LEN;
use crate::doc::signed::decode_canonical;
use crate::err::{DirError, Result};
use crate::netdir::NetDir;

/// Who fetches: caches (relays) fetch early, clients a little later (dir-spec §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchRole {
    /// A relay or directory cache: fetch at a random time in `[FU, FU + I/2)`, `I = FU - VA`.
    Cache,
    /// A client: random time in `[FU + 3I/4, FU + 3I/4 + 7/8 (VU - (FU + 3I/4)))`.
    Client,
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    consensus: Vec<u8>,
    certs: Vec<u8>,
}

/// The held consensus, cached on disk, with rollback protection and a refetch schedule.
#[derive(Debug)]
pub struct ConsensusCache {
    path: Option<PathBuf>,
    authorities: Vec<AuthorityInfo>,
    role: FetchRole,
    current: Option<FetchedConsensus>,
    next_fetch: u64,
}

impl ConsensusCache {
    /// A cache backed by `path` (or memory only if `None`). A cached consensus that still
    /// verifies and is valid at `now` is loaded and used; anything else in the file is ignored.
    pub fn open(
        path: Option<&Path>,
        authorities: Vec<AuthorityInfo>,
        role: FetchRole,
        now: u64,
    ) -> Self {
        let mut c = Self {
            path: path.map(Path::to_path_buf),
            authorities,
            role,
            current: None,
            next_fetch: 0,
        };
        if let Some(p) = &c.path {
            match load_file(p, &c.authorities, now) {
                Ok(Some(f)) => {
                    let live = Liveness::of(f.verified.consensus(), now);
                    match live.warning() {
                        Some(w) => tracing::warn!("cached {w}"),
                        // Callers say at their own level what they do with it (the proxy's
                        // bootstrap reports it; its control port re-reads the file often).
                        None => tracing::debug!(
                            valid_after = f.verified.consensus().valid_after,
                            "using cached consensus"
                        ),
                    }
                    c.next_fetch = schedule(&f.verified, role);
                    c.current = Some(f);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "ignoring cached consensus"),
            }
        }
        c
    }

    /// The held consensus, if any.
    pub fn current(&self) -> Option<&VerifiedConsensus> {
        self.current.as_ref().map(|f| &f.verified)
    }

    /// A [`NetDir`] of the held consensus, if it is usable at `now`: within its validity window,
    /// or expired less than 24 hours ago (Tor's rule; [`Liveness`]).
    pub fn netdir(&self, now: u64) -> Option<NetDir> {
        self.current()
            .filter(|v| Liveness::of(v.consensus(), now).usable())
            .map(|v| NetDir::new(v.clone()))
    }

    /// The held consensus as envelope bytes and its certificate list as list bytes (what a
    /// directory cache serves, and what a BEGIN_DIR fetch asks a diff against).
    pub fn current_raw(&self) -> Option<(Vec<u8>, Vec<u8>)> {
        self.current
            .as_ref()
            .map(|f| (f.verified.signed().to_bytes(), encode_cert_list(&f.certs)))
    }

    /// Where the held consensus stands at `now` (`None` when nothing is held).
    pub fn liveness(&self, now: u64) -> Option<Liveness> {
        self.current().map(|v| Liveness::of(v.consensus(), now))
    }

    /// When to fetch next (unix seconds); 0 when nothing is held.
    pub fn next_fetch_at(&self) -> u64 {
        self.next_fetch
    }

    /// Whether a fetch is due at `now`.
    pub fn needs_fetch(&self, now: u64) -> bool {
        self.current.is_none() || now >= self.next_fetch
    }

    /// Offer a consensus obtained some other way (e.g. over BEGIN_DIR): envelope bytes and
    /// certificate-list bytes. Accepted only if it verifies and is newer than the held one.
    pub fn offer(&mut self, consensus: &[u8], certs: &[u8], now: u64) -> Result<()> {
        let f = super::verify_consensus_bytes(consensus, certs, &self.authorities, now)?;
        f.verified.check_newer_than(self.current())?;
        self.install(f)
    }

    /// Fetch a newer consensus from the authorities and install it. Returns the new one.
    pub async fn refresh(&mut self, now: u64) -> Result<&VerifiedConsensus> {
        let f = fetch_consensus_newer(&self.authorities, now, self.current()).await?;
        self.install(f)?;
        self.current()
            .ok_or(DirError::Internal("consensus vanished after install"))
    }

    fn install(&mut self, f: FetchedConsensus) -> Result<()> {
        if let Some(p) = &self.path {
            let file = CacheFile {
                consensus: f.verified.signed().to_bytes(),
                certs: encode_cert_list(&f.certs),
            };
            let bytes = postcard::to_allocvec(&file)
                .map_err(|_| DirError::Internal("encoding cache file"))?;
            write_atomic(p, &bytes)?;
        }
        self.next_fetch = schedule(&f.verified, self.role);
        self.current = Some(f);
        Ok(())
    }
}

/// A random time in the role's window (see [`FetchRole`]).
pub fn schedule(v: &VerifiedConsensus, role: FetchRole) -> u64 {
    let c = v.consensus();
    let interval = c.fresh_until.saturating_sub(c.valid_after);
    let (start, len) = match role {
        FetchRole::Cache => (c.fresh_until, interval / 2),
        FetchRole::Client => {
            let start = c.fresh_until.saturating_add(interval.saturating_mul(3) / 4);
            let len = c.valid_until.saturating_sub(start).saturating_mul(7) / 8;
            (start.min(c.valid_until), len)
        }
    };
    start.saturating_add(if len == 0 {
        0
    } else {
        allium_crypto::rng::random_u64() % len
    })
}

fn load_file(
    path: &Path,
    authorities: &[AuthorityInfo],
    now: u64,
) -> Result<Option<FetchedConsensus>> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(DirError::io(path, e)),
    };
    if meta.len() > (MAX_CONSENSUS_LEN + super::MAX_CERTS_LEN + 64) as u64 {
        return Err(DirError::TooLarge {
            object: "cached consensus file",
            len: meta.len() as usize,
            max: MAX_CONSENSUS_LEN,
        });
    }
    let bytes = std::fs::read(path).map_err(|e| DirError::io(path, e))?;
    let file: CacheFile = decode_canonical(&bytes, "cached consensus file")?;
    super::verify_consensus_bytes(&file.consensus, &file.certs, authorities, now).map(Some)
}

/// Write a file atomically (temp file + rename).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| DirError::io(dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| DirError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DirError::io(path, e))
}

/// Read a consensus file without verifying signatures (for `allium consensus show`): a relay's
/// or client's `consensus.cache` (consensus and certificates), or an authority's `consensus`
/// (the bare signed envelope; the certificates then come from the `certs/` directory beside
/// it, as the authority stores them). Returns the envelope bytes and certificate-list bytes.
pub fn dangerously_read_cache_file(path: &Path) -> Result<(Vec<u8>, Vec<u8>)> {
    let len = std::fs::metadata(path)
        .map_err(|e| DirError::io(path, e))?
        .len();
    if len > (MAX_CONSENSUS_LEN + MAX_CERTS_LEN + 64) as u64 {
        return Err(DirError::TooLarge {
            object: "consensus file",
            len: usize::try_from(len).unwrap_or(usize::MAX),
            max: MAX_CONSENSUS_LEN,
        });
    }
    let bytes = std::fs::read(path).map_err(|e| DirError::io(path, e))?;
    if let Ok(file) = decode_canonical::<CacheFile>(&bytes, "cached consensus file") {
        return Ok((file.consensus, file.certs));
    }
    match crate::doc::Signed::<crate::doc::Consensus>::from_bytes(&bytes) {
        Ok(_) => {
            let data_dir = path.parent().unwrap_or(Path::new("."));
            Ok((bytes, authority_certs(data_dir)))
        }
        Err(_) => Err(DirError::Malformed {
            object: "consensus file",
            why: "neither a consensus cache (`consensus.cache` of a relay or proxy) nor an \
                  authority's `consensus` file",
        }),
    }
}

/// The certificates of an authority data directory: its own (`keys/authority.cert`) and the
/// others' (`certs/`), as a certificate list (empty when there are none).
fn authority_certs(data_dir: &Path) -> Vec<u8> {
    let mut certs = Vec::new();
    let own = crate::authority::keys::keys_dir(data_dir).join(crate::authority::keys::CERT_FILE);
    if let Some(c) = std::fs::read(&own)
        .ok()
        .and_then(|b| crate::doc::Signed::<crate::doc::AuthCert>::from_bytes(&b).ok())
    {
        certs.push(c);
    }
    if let Ok(rd) = std::fs::read_dir(data_dir.join("certs")) {
        for e in rd.filter_map(|e| e.ok()).take(super::MAX_CERTS - 1) {
            let small = e
                .metadata()
                .map(|m| m.is_file() && m.len() <= 4096)
                .unwrap_or(false);
            if !small || e.file_name().to_string_lossy().ends_with(".tmp") {
                continue;
            }
            if let Ok(c) = std::fs::read(e.path()).map_err(|_| ()).and_then(|b| {
                crate::doc::Signed::<crate::doc::AuthCert>::from_bytes(&b).map_err(|_| ())
            }) {
                certs.push(c);
            }
        }
    }
    encode_cert_list(&certs)
}
