//! Onion-service key directories: the service's Ed25519 identity (its address) kept 0600 across
//! restarts, and the `authorized_clients/` directory of x25519 public keys.
//!
//! Layout of a key directory (created 0700):
//! - `hs_identity.key`: the identity seed in the key-file format of `allium_crypto::keyfile`
//!   (header `allium-hs-identity-v1`, 64 hex digits), mode 0600. Created on first use; the same
//!   file always gives the same address.
//! - `hostname`: the address and a newline (public, written for operators; never read back).
//!
//! An authorised-clients directory holds one file per client, `<name>.auth`, whose first
//! non-comment line is `descriptor:x25519:<64 hex digits>` (the client's x25519 public key; the
//! `descriptor:x25519:` prefix, as in Tor's files, is optional). Other files are ignored.

use std::path::{Path, PathBuf};

use allium_crypto::hs::subcred::AuthClientEntry;
use allium_crypto::hs::{DescCookie, HsAddress, Subcredential};
use allium_crypto::{IdentityKeypair, X25519Public, X25519Secret, keyfile};

/// The key-file kind of the identity (`allium-hs-identity-v1`).
pub const IDENTITY_KIND: &str = "hs-identity";
/// The identity key's file name inside a key directory.
pub const IDENTITY_FILE: &str = "hs_identity.key";
/// The public address file inside a key directory.
pub const HOSTNAME_FILE: &str = "hostname";
/// Most authorised clients per service (the descriptor holds at most 128 entries).
pub const MAX_AUTHORIZED_CLIENTS: usize = 128;
/// Largest file read from an authorised-clients directory.
const MAX_AUTH_FILE: u64 = 4096;

/// A problem with an onion-service key directory, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum KeyDirError {
    /// Reading or writing a key file failed.
    #[error(transparent)]
    Key(#[from] allium_crypto::CryptoError),
    /// The identity does not make an address (it cannot happen for a key we generated).
    #[error(
        "the identity key in {0} does not give a valid onion address; move the file away to make a new one"
    )]
    BadIdentity(PathBuf),
    /// Listing or reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// An authorised-client file is not a key.
    #[error(
        "{path}: expected a line `descriptor:x25519:<64 hex digits>` (the client's public key): {why}"
    )]
    BadClientKey {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// Too many authorised clients.
    #[error("{dir}: {n} authorised clients, at most {MAX_AUTHORIZED_CLIENTS} are supported")]
    TooManyClients {
        /// The directory.
        dir: PathBuf,
        /// How many were found.
        n: usize,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyDirError + '_ {
    move |source| KeyDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Load the identity of the service whose keys live in `dir`, creating the directory (0700) and
/// the key (0600) if absent, and (re)write the public `hostname` file.
pub fn load_or_create_identity(dir: &Path) -> Result<(IdentityKeypair, HsAddress), KeyDirError> {
    let path = dir.join(IDENTITY_FILE);
    let identity = if path.exists() {
        IdentityKeypair::from_seed(&*keyfile::read_secret(&path, IDENTITY_KIND)?)
    } else {
        keyfile::create_private_dir(dir)?;
        let k = IdentityKeypair::generate();
        keyfile::write_secret(&path, IDENTITY_KIND, &k.seed())?;
        k
    };
    let addr = HsAddress::from_identity(&identity.public())
        .map_err(|_| KeyDirError::BadIdentity(path.clone()))?;
    let host = dir.join(HOSTNAME_FILE);
    std::fs::write(&host, format!("{addr}\n")).map_err(io(&host))?;
    Ok((identity, addr))
}

/// Parse the text of one authorised-client file.
pub fn parse_client_key(path: &Path, text: &str) -> Result<X25519Public, KeyDirError> {
    let bad = |why| KeyDirError::BadClientKey {
        path: path.to_path_buf(),
        why,
    };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| bad("the file is empty"))?;
    let hexkey = line.strip_prefix("descriptor:").unwrap_or(line);
    let hexkey = hexkey.strip_prefix("x25519:").unwrap_or(hexkey);
    let mut key = [0u8; 32];
    hex::decode_to_slice(hexkey, &mut key).map_err(|_| bad("not 64 hex digits"))?;
    let k = X25519Public(key);
    // A low-order key would make every client's entry computable by anyone.
    let probe = AuthClientEntry::for_client(
        &Subcredential::from_bytes([0; 32]),
        &X25519Secret::from_bytes([7; 32]),
        &k,
        &DescCookie::from_bytes([0; 32]),
    );
    if probe.is_ok() {
        Ok(k)
    } else {
        Err(bad("a low-order point, not a usable key"))
    }
}

/// Read every `*.auth` file of an authorised-clients directory, in file-name order.
pub fn load_authorized_clients(dir: &Path) -> Result<Vec<X25519Public>, KeyDirError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "auth") && p.is_file())
        .collect();
    files.sort();
    if files.len() > MAX_AUTHORIZED_CLIENTS {
        return Err(KeyDirError::TooManyClients {
            dir: dir.to_path_buf(),
            n: files.len(),
        });
    }
    let mut keys = Vec::with_capacity(files.len());
    for f in files {
        let meta = std::fs::metadata(&f).map_err(io(&f))?;
        if meta.len() > MAX_AUTH_FILE {
            return Err(KeyDirError::BadClientKey {
                path: f,
                why: "the file is too large",
            });
        }
        let text = std::fs::read_to_string(&f).map_err(io(&f))?;
        keys.push(parse_client_key(&f, &text)?);
    }
    Ok(keys)
}

/// Read a client-authorization directory (`onion_client_auth_dir`): every `*.auth_private`
/// file holds one line `<address>:descriptor:x25519:<64 hex digits of the secret key>` (Tor's
/// layout, with our address, with or without its `.allium.alt` suffix). Files must not be readable by group or others.
pub fn load_client_auth(dir: &Path) -> Result<Vec<(HsAddress, X25519Secret)>, KeyDirError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "auth_private") && p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let meta = std::fs::metadata(&f).map_err(io(&f))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyDirError::Key(
                allium_crypto::CryptoError::InsecureKeyFile { path: f, mode },
            ));
        }
        let bad = |path: &Path, why| KeyDirError::BadClientKey {
            path: path.to_path_buf(),
            why,
        };
        if meta.len() > MAX_AUTH_FILE {
            return Err(bad(&f, "the file is too large"));
        }
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(&f).map_err(io(&f))?);
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| bad(&f, "the file is empty"))?;
        let (addr, key) = line.split_once(':').ok_or_else(|| {
            bad(
                &f,
                "expected `<address>:descriptor:x25519:<secret key hex>`",
            )
        })?;
        // Tor's files name the address without its suffix; accept both forms.
        let full = if allium_crypto::hs::is_hs_hostname(addr) {
            addr.to_owned()
        } else {
            format!("{addr}{}", allium_crypto::hs::ADDR_SUFFIX)
        };
        let addr = HsAddress::parse(&full).map_err(|_| bad(&f, "the address is not valid"))?;
        let key = key.strip_prefix("descriptor:").unwrap_or(key);
        let key = key.strip_prefix("x25519:").unwrap_or(key);
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(key, &mut secret[..])
            .map_err(|_| bad(&f, "the key is not 64 hex digits"))?;
        out.push((addr, X25519Secret::from_bytes(*secret)));
    }
    Ok(out)
}
