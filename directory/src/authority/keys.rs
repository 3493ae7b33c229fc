//! Authority keys: the offline identity, the online signing key and its certificate.
//!
//! Files: `authority_identity.key` (kind `authority-identity`, keep it offline),
//! `authority_signing.key` (kind `authority-signing`) and `authority.cert` (a signed
//! `AuthCert` envelope). The running authority reads the last two from
//! `<data_dir>/keys/`.
//!
//! The offline identity may be passphrase-protected (scrypt and ChaCha20-Poly1305, format in
//! `docs/protocol/10-keys.md`); its public identity stays readable without the passphrase.
//! A running authority writes `<data_dir>/fingerprint` (`authority FINGERPRINT`, Tor's format).

use std::path::{Path, PathBuf};

use allium_crypto::{IdentityKeypair, RelayId, keyfile};

use crate::doc::{AuthCert, Signed, VerifiedCert, issue_cert};
use crate::err::{DirError, Result};

/// Key-file kind of the offline identity.
pub const KIND_IDENTITY: &str = "authority-identity";
/// Key-file kind of the online signing key.
pub const KIND_SIGNING: &str = "authority-signing";
/// File name of the offline identity key.
pub const IDENTITY_FILE: &str = "authority_identity.key";
/// File name of the online signing key.
pub const SIGNING_FILE: &str = "authority_signing.key";
/// File name of the certificate.
pub const CERT_FILE: &str = "authority.cert";
/// Seconds per "month" for `--months`.
pub const MONTH_SECS: u64 = 30 * 24 * 3600;

/// The online keys a running authority needs.
#[derive(Debug)]
pub struct AuthorityKeys {
    /// The online signing key.
    pub signing: IdentityKeypair,
    /// Its certificate (signature checked).
    pub cert: VerifiedCert,
}

impl AuthorityKeys {
    /// The identity the certificate names.
    pub fn identity(&self) -> RelayId {
        self.cert.identity()
    }
}

/// The directory holding the online keys inside a data directory.
pub fn keys_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys")
}

/// The nickname written in an authority's `fingerprint` file.
pub const FINGERPRINT_NICKNAME: &str = "authority";

/// Create a fresh offline identity key in `dir`; refuses to overwrite one.
pub fn create_identity(dir: &Path) -> Result<RelayId> {
    create_identity_with(dir, None)
}

/// Create a fresh offline identity key in `dir`, passphrase-protected when `passphrase` is
/// given (with scrypt cost `2^log_n`); refuses to overwrite one.
pub fn create_identity_with(dir: &Path, passphrase: Option<(&[u8], u8)>) -> Result<RelayId> {
    let path = dir.join(IDENTITY_FILE);
    if path.exists() {
        return Err(DirError::Config(format!(
            "{} already exists; refusing to overwrite an authority identity",
            path.display()
        )));
    }
    let id = IdentityKeypair::generate();
    match passphrase {
        None => keyfile::write_secret(&path, KIND_IDENTITY, &id.seed())?,
        Some((pass, log_n)) => keyfile::write_secret_encrypted(
            &path,
            KIND_IDENTITY,
            &id.seed(),
            &id.public().0,
            pass,
            log_n,
        )?,
    }
    Ok(id.public())
}

/// Read a plain (not passphrase-protected) offline identity key.
pub fn read_identity(path: &Path) -> Result<IdentityKeypair> {
    read_identity_with(path, || {
        Err(allium_crypto::CryptoError::KeyFileMalformed {
            path: path.to_path_buf(),
            why: "passphrase-protected; give --passphrase-file FILE or run on a terminal to be \
                  asked for it",
        })
    })
}

/// Read the offline identity key; `passphrase` is asked for only if the file is protected.
pub fn read_identity_with(
    path: &Path,
    passphrase: impl FnOnce() -> std::result::Result<keyfile::Passphrase, allium_crypto::CryptoError>,
) -> Result<IdentityKeypair> {
    let (seed, claimed) = keyfile::read_secret_with_passphrase(path, KIND_IDENTITY, passphrase)?;
    let id = IdentityKeypair::from_seed(&seed);
    if claimed.is_some_and(|c| c != id.public().0) {
        return Err(DirError::Config(format!(
            "{}: the public identity written in the file does not match its key",
            path.display()
        )));
    }
    Ok(id)
}

/// The public identity of an offline identity key file without opening it: from the clear
/// `public` line of a protected file, or from the key of a plain one.
pub fn identity_of_file(path: &Path) -> Result<RelayId> {
    match keyfile::read_public(path, KIND_IDENTITY)? {
        Some(p) => Ok(RelayId(p)),
        None => Ok(read_identity(path)?.public()),
    }
}

/// Create a new signing key in `out_dir` and certify it with `identity` for
/// `[now, now + months * 30 days)` (1..=6 months). Overwrites an older signing key and cert.
pub fn certify(
    identity: &IdentityKeypair,
    out_dir: &Path,
    months: u64,
    now: u64,
) -> Result<VerifiedCert> {
    if !(1..=6).contains(&months) {
        return Err(DirError::Config("--months must be between 1 and 6".into()));
    }
    let signing = IdentityKeypair::generate();
    // Backdate by an hour so slightly slow clocks accept it at once.
    let start = now.saturating_sub(3600);
    let cert = issue_cert(
        identity,
        &signing.public(),
        start,
        now + months * MONTH_SECS,
    )?;
    keyfile::write_secret(&out_dir.join(SIGNING_FILE), KIND_SIGNING, &signing.seed())?;
    crate::client::cache::write_atomic(&out_dir.join(CERT_FILE), &cert.to_bytes())?;
    cert.verify()
}

/// Load the signing key and certificate from `<data_dir>/keys/` and check they match.
pub fn load(data_dir: &Path) -> Result<AuthorityKeys> {
    let dir = keys_dir(data_dir);
    let seed = keyfile::read_secret(&dir.join(SIGNING_FILE), KIND_SIGNING)?;
    let signing = IdentityKeypair::from_seed(&seed);
    let cert_path = dir.join(CERT_FILE);
    let bytes = std::fs::read(&cert_path).map_err(|e| DirError::io(&cert_path, e))?;
    let cert = Signed::<AuthCert>::from_bytes(&bytes)?.verify()?;
    if cert.signing_key() != signing.public() {
        return Err(DirError::Config(format!(
            "{} certifies another signing key than {}; run `allium authority certify` again",
            cert_path.display(),
            dir.join(SIGNING_FILE).display()
        )));
    }
    keyfile::write_fingerprint(data_dir, FINGERPRINT_NICKNAME, &cert.identity().0)?;
    Ok(AuthorityKeys { signing, cert })
}

/// For test networks: create an identity (returned, so the caller may keep or drop it) plus a
/// signing key and a 1-month certificate in `<data_dir>/keys/`.
pub fn generate_for_test(data_dir: &Path, now: u64) -> Result<(IdentityKeypair, AuthorityKeys)> {
    let identity = IdentityKeypair::generate();
    certify(&identity, &keys_dir(data_dir), 1, now)?;
    let keys = load(data_dir)?;
    Ok((identity, keys))
}
