//! The relay's keys, kept in its data directory (mode 0600 files, directory 0700).
//!
//! | file | kind | what |
//! |---|---|---|
//! | `identity.key` | `identity` | Ed25519 identity seed (never changes) |
//! | `link.key` | `link` | x25519 Noise static key |
//! | `onion.key` | `onion` | current x25519 ntor onion key; its mtime is its creation time |
//! | `onion-prev.key` | `onion` | previous onion key, still accepted until the next rotation |
//!
//! Rotation moves `onion.key` to `onion-prev.key` and creates a new `onion.key`; CREATE cells
//! made for either key are answered, so clients holding an older consensus keep working.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use allium_crypto::keyfile::{read_secret, write_secret};
use allium_crypto::{IdentityKeypair, RelayId, X25519Public, X25519Secret};
use zeroize::Zeroizing;

use crate::err::RelayError;

/// Current and previous onion keys.
#[derive(Debug)]
pub struct OnionKeys {
    /// The key published in the descriptor.
    pub current: X25519Secret,
    /// The key it replaced, accepted until the next rotation.
    pub previous: Option<X25519Secret>,
    /// When `current` was created.
    pub created: SystemTime,
}

/// All of a relay's keys.
#[derive(Debug)]
pub struct RelayKeys {
    /// Ed25519 identity.
    pub identity: IdentityKeypair,
    /// Its public half (cached).
    pub id: RelayId,
    /// Noise static key.
    pub link: X25519Secret,
    /// Onion keys, swapped on rotation.
    pub onion: RwLock<OnionKeys>,
    dir: PathBuf,
}

fn load_or_create(path: &Path, kind: &str) -> Result<Zeroizing<[u8; 32]>, RelayError> {
    if path.exists() {
        Ok(read_secret(path, kind)?)
    } else {
        let mut b = Zeroizing::new([0u8; 32]);
        allium_crypto::rng::fill_random(&mut b[..]);
        write_secret(path, kind, &b)?;
        Ok(b)
    }
}

#[allow(clippy::disallowed_methods)] // Key files: a missing mtime means "now".
fn mtime(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now())
}

impl RelayKeys {
    /// Load the keys from `dir`, creating any that are missing.
    pub fn load_or_create(dir: &Path) -> Result<Self, RelayError> {
        let dd = |source| RelayError::DataDir {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dd)?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let id_seed = load_or_create(&dir.join("identity.key"), "identity")?;
        let identity = IdentityKeypair::from_seed(&id_seed);
        let link = load_or_create(&dir.join("link.key"), "link")?;
        let onion_path = dir.join("onion.key");
        let onion = load_or_create(&onion_path, "onion")?;
        let prev_path = dir.join("onion-prev.key");
        let previous = if prev_path.exists() {
            Some(X25519Secret::from_bytes(*read_secret(&prev_path, "onion")?))
        } else {
            None
        };
        Ok(Self {
            id: identity.public(),
            identity,
            link: X25519Secret::from_bytes(*link),
            onion: RwLock::new(OnionKeys {
                current: X25519Secret::from_bytes(*onion),
                previous,
                created: mtime(&onion_path),
            }),
            dir: dir.to_path_buf(),
        })
    }

    /// The current onion public key.
    pub fn onion_public(&self) -> X25519Public {
        match self.onion.read() {
            Ok(k) => k.current.public(),
            Err(p) => p.into_inner().current.public(),
        }
    }

    /// How long the current onion key has existed at `now`.
    pub fn onion_age(&self, now: SystemTime) -> Duration {
        let created = match self.onion.read() {
            Ok(k) => k.created,
            Err(p) => p.into_inner().created,
        };
        now.duration_since(created).unwrap_or_default()
    }

    /// Replace the onion key: the current one becomes the previous one (still accepted), a fresh
    /// key becomes current. Files are written before the in-memory swap.
    #[allow(clippy::disallowed_methods)] // The rotation time is recorded as wall-clock time.
    pub fn rotate_onion(&self) -> Result<(), RelayError> {
        let fresh = X25519Secret::generate();
        let mut guard = match self.onion.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        write_secret(
            &self.dir.join("onion-prev.key"),
            "onion",
            guard.current.secret_bytes(),
        )?;
        write_secret(&self.dir.join("onion.key"), "onion", fresh.secret_bytes())?;
        let old = std::mem::replace(&mut guard.current, fresh);
        guard.previous = Some(old);
        guard.created = SystemTime::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_persist_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = RelayKeys::load_or_create(dir.path()).unwrap();
        let onion1 = k1.onion_public();
        let link1 = k1.link.public();
        let k2 = RelayKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(k1.id, k2.id);
        assert_eq!(link1, k2.link.public());
        assert_eq!(onion1, k2.onion_public());
        assert!(k2.onion.read().unwrap().previous.is_none());

        k2.rotate_onion().unwrap();
        let onion2 = k2.onion_public();
        assert_ne!(onion1, onion2);
        assert_eq!(
            k2.onion.read().unwrap().previous.as_ref().unwrap().public(),
            onion1
        );
        let k3 = RelayKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(k3.onion_public(), onion2);
        assert_eq!(
            k3.onion.read().unwrap().previous.as_ref().unwrap().public(),
            onion1
        );
        assert_eq!(k3.id, k1.id);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("identity.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
