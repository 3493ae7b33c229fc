//! The control port's configuration keys (shared by the relay and the proxy configuration files)
//! and the cookie file.
//!
//! Keys: `control_port` (a loopback `address:port`), `control_socket` (a Unix socket path),
//! `cookie_authentication` (write `control_auth_cookie`, 32 random bytes, mode 0600, into the data
//! directory), `hashed_control_password` (Tor's `16:...` values from `tor --hash-password`).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::auth::{AuthConfig, COOKIE_LEN, HashedPassword};

/// The cookie file's name in the data directory (Tor's).
pub const COOKIE_FILE: &str = "control_auth_cookie";

/// Where and how the control port listens. Both listeners are optional; with neither, there is
/// no control port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlConfig {
    /// TCP listener; must be a loopback address.
    pub control_port: Option<SocketAddr>,
    /// Unix socket listener.
    pub control_socket: Option<PathBuf>,
    /// Cookie (and SAFECOOKIE) authentication.
    pub cookie_authentication: bool,
    /// Accepted password hashes (`16:` + 58 hex digits).
    pub hashed_control_password: Vec<String>,
}

/// A control-port configuration or start-up error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// A key has an unacceptable value.
    #[error("{key}: {why}")]
    Invalid {
        /// The configuration key.
        key: &'static str,
        /// What is wrong and what to do.
        why: String,
    },
    /// A file or socket operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or address.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ControlConfig {
    /// Whether a listener is configured.
    pub fn enabled(&self) -> bool {
        self.control_port.is_some() || self.control_socket.is_some()
    }

    /// Check the values: loopback only, parseable password hashes.
    pub fn validate(&self) -> Result<(), ControlError> {
        if let Some(a) = self.control_port
            && !a.ip().is_loopback()
        {
            return Err(ControlError::Invalid {
                key: "control_port",
                why: format!(
                    "{a} is not a loopback address; the control port gives full control of this node, \
                     so it listens on 127.0.0.1 or ::1 only (or use control_socket)"
                ),
            });
        }
        if let Some(p) = &self.control_socket
            && (p.as_os_str().is_empty() || p.as_os_str().len() > 100)
        {
            return Err(ControlError::Invalid {
                key: "control_socket",
                why: "give a socket path of 1 to 100 bytes".into(),
            });
        }
        self.passwords()?;
        Ok(())
    }

    /// The parsed password hashes.
    pub fn passwords(&self) -> Result<Vec<HashedPassword>, ControlError> {
        self.hashed_control_password
            .iter()
            .map(|s| {
                s.parse()
                    .map_err(|e: crate::auth::BadHashedPassword| ControlError::Invalid {
                        key: "hashed_control_password",
                        why: e.to_string(),
                    })
            })
            .collect()
    }

    /// The authentication settings; writes a fresh cookie into `data_dir` if cookie
    /// authentication is on.
    pub fn auth(&self, data_dir: &Path) -> Result<AuthConfig, ControlError> {
        let passwords = self.passwords()?;
        let cookie = if self.cookie_authentication {
            let path = data_dir.join(COOKIE_FILE);
            let mut c = [0u8; COOKIE_LEN];
            allium_crypto::rng::fill_random(&mut c);
            write_cookie(&path, &c)?;
            Some((path, c))
        } else {
            None
        };
        Ok(AuthConfig::new(cookie, passwords))
    }
}

/// Write the cookie file, readable by the owner only.
fn write_cookie(path: &Path, cookie: &[u8; COOKIE_LEN]) -> Result<(), ControlError> {
    let io = |source| ControlError::Io {
        what: "writing the control cookie",
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    f.write_all(cookie).map_err(io)?;
    f.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_only() {
        let mut c = ControlConfig {
            control_port: Some("127.0.0.1:9051".parse().unwrap()),
            ..ControlConfig::default()
        };
        c.validate().unwrap();
        c.control_port = Some("[::1]:9051".parse().unwrap());
        c.validate().unwrap();
        c.control_port = Some("0.0.0.0:9051".parse().unwrap());
        assert!(c.validate().unwrap_err().to_string().contains("loopback"));
        c.control_port = Some("192.0.2.1:9051".parse().unwrap());
        assert!(c.validate().is_err());
        c.control_port = None;
        c.hashed_control_password = vec!["secret".into()];
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("tor --hash-password")
        );
    }

    #[test]
    fn cookie_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let c = ControlConfig {
            control_port: Some("127.0.0.1:0".parse().unwrap()),
            cookie_authentication: true,
            ..ControlConfig::default()
        };
        let auth = c.auth(dir.path()).unwrap();
        let path = dir.path().join(COOKIE_FILE);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 32);
        assert!(auth.check(&bytes, None));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A new start writes a new cookie.
        let _ = c.auth(dir.path()).unwrap();
        assert_ne!(std::fs::read(&path).unwrap(), bytes);
    }
}
