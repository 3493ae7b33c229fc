//! Key files: 32 secret bytes behind a one-line header, written with mode 0600 in directories
//! created with mode 0700.
//!
//! Plain format: `allium-<kind>-v1\n` followed by 64 lower-case hex digits and a newline. A file
//! that is readable by group or others is refused with an error that says how to fix it.
//!
//! Passphrase-protected format (the offline authority identity; `docs/protocol/10-keys.md`):
//!
//! ```text
//! allium-<kind>-v1-encrypted
//! public <64 hex: the public key, readable without the passphrase>
//! scrypt <log_n> <r> <p> <64 hex: 32-byte random salt>
//! chacha20poly1305 <24 hex: 12-byte random nonce> <96 hex: 32-byte ciphertext, 16-byte tag>
//! ```
//!
//! The key is `scrypt(passphrase, salt, N = 2^log_n, r, p)` (32 bytes); the associated data is
//! the exact bytes of the first three lines, newlines included, so none of them can be altered.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use zeroize::Zeroizing;

use crate::err::CryptoError;
use crate::keys::KEY_LEN;

fn io_err(path: &Path, source: std::io::Error) -> CryptoError {
    CryptoError::KeyFileIo {
        path: path.to_path_buf(),
        source,
    }
}

/// Create a directory (and missing parents) with mode 0700, for keys and data directories.
/// An existing directory is left as it is.
pub fn create_private_dir(dir: &Path) -> Result<(), CryptoError> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io_err(dir, e))
}

/// The fingerprint of a relay or authority identity as operators copy it: the 32-byte Ed25519
/// identity in upper-case hex (64 digits; any case is accepted where an identity is configured).
pub fn fingerprint(identity: &[u8; KEY_LEN]) -> String {
    hex::encode_upper(identity)
}

/// Write `<dir>/fingerprint` in Tor's format, `nickname FINGERPRINT\n` (public; mode 0644).
pub fn write_fingerprint(
    dir: &Path,
    nickname: &str,
    identity: &[u8; KEY_LEN],
) -> Result<(), CryptoError> {
    let path = dir.join("fingerprint");
    let tmp = dir.join("fingerprint.tmp");
    let text = format!("{nickname} {}\n", fingerprint(identity));
    fs::write(&tmp, text).map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io_err(&path, e))
}

/// Write `text` to `path` atomically with mode 0600, creating the directory with mode 0700.
fn write_private(path: &Path, text: &[u8]) -> Result<(), CryptoError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        create_private_dir(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        f.write_all(text).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Write a secret key file atomically with mode 0600 (its directory, if created, 0700). `kind`
/// names the key (e.g. `identity`).
pub fn write_secret(path: &Path, kind: &str, secret: &[u8; KEY_LEN]) -> Result<(), CryptoError> {
    let mut text = Zeroizing::new(format!("allium-{kind}-v1\n"));
    text.push_str(&Zeroizing::new(hex::encode(secret)));
    text.push('\n');
    write_private(path, text.as_bytes())
}

/// scrypt cost for new passphrase-protected files: `N = 2^17`, `r = 8`, `p = 1` (128 MiB).
pub const SCRYPT_LOG_N: u8 = 17;
/// The range of `log_n` a file may ask for (bounds the memory a file can make us spend).
const SCRYPT_LOG_N_RANGE: std::ops::RangeInclusive<u8> = 10..=20;
const SCRYPT_R: u32 = 8;
const SCRYPT_P: u32 = 1;

fn derive(
    passphrase: &[u8],
    salt: &[u8],
    log_n: u8,
) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let params =
        scrypt::Params::new(log_n, SCRYPT_R, SCRYPT_P).map_err(|_| CryptoError::BadKey {
            what: "scrypt parameters",
        })?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    scrypt::scrypt(passphrase, salt, &params, &mut key[..]).map_err(|_| CryptoError::BadKey {
        what: "scrypt output",
    })?;
    Ok(key)
}

/// Write a passphrase-protected secret key file (format in the module docs) with mode 0600.
/// `public` is stored in the clear so tools can show the identity without the passphrase;
/// `log_n` is the scrypt cost ([`SCRYPT_LOG_N`] outside tests).
pub fn write_secret_encrypted(
    path: &Path,
    kind: &str,
    secret: &[u8; KEY_LEN],
    public: &[u8; KEY_LEN],
    passphrase: &[u8],
    log_n: u8,
) -> Result<(), CryptoError> {
    if !SCRYPT_LOG_N_RANGE.contains(&log_n) {
        return Err(CryptoError::BadKey {
            what: "scrypt parameters",
        });
    }
    let mut salt = [0u8; 32];
    crate::rng::fill_random(&mut salt);
    let mut nonce = [0u8; crate::aead::NONCE_LEN];
    crate::rng::fill_random(&mut nonce);
    let key = derive(passphrase, &salt, log_n)?;
    let ad = format!(
        "allium-{kind}-v1-encrypted\npublic {}\nscrypt {log_n} {SCRYPT_R} {SCRYPT_P} {}\n",
        hex::encode(public),
        hex::encode(salt)
    );
    let mut buf = Zeroizing::new(*secret);
    let tag = crate::aead::seal(&key, &nonce, ad.as_bytes(), &mut buf[..])?;
    let text = format!(
        "{ad}chacha20poly1305 {} {}{}\n",
        hex::encode(nonce),
        hex::encode(&buf[..]),
        hex::encode(tag)
    );
    write_private(path, text.as_bytes())
}

/// Whether a key file is passphrase-protected (its first line ends in `-encrypted`).
pub fn is_encrypted(path: &Path) -> Result<bool, CryptoError> {
    let text = read_key_text(path)?;
    Ok(text
        .lines()
        .next()
        .is_some_and(|l| l.ends_with("-v1-encrypted")))
}

/// The public key stored in the clear in a passphrase-protected file (`None` for a plain file).
pub fn read_public(path: &Path, kind: &str) -> Result<Option<[u8; KEY_LEN]>, CryptoError> {
    let text = read_key_text(path)?;
    if text.lines().next() != Some(format!("allium-{kind}-v1-encrypted").as_str()) {
        return Ok(None);
    }
    let parsed = parse_encrypted(path, &text, kind)?;
    Ok(Some(parsed.public))
}

struct Encrypted {
    public: [u8; KEY_LEN],
    log_n: u8,
    salt: [u8; 32],
    nonce: [u8; crate::aead::NONCE_LEN],
    ct: [u8; KEY_LEN],
    tag: [u8; crate::aead::TAG_LEN],
    /// Bytes of the first three lines (the associated data).
    ad_len: usize,
}

fn parse_encrypted(path: &Path, text: &str, kind: &str) -> Result<Encrypted, CryptoError> {
    let malformed = |why| CryptoError::KeyFileMalformed {
        path: path.to_path_buf(),
        why,
    };
    let hex_into =
        |h: &str, out: &mut [u8]| hex::decode_to_slice(h, out).map_err(|_| malformed("bad hex"));
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let [l0, l1, l2, l3] = lines[..] else {
        return Err(malformed("an encrypted key file has four lines"));
    };
    if l0.trim_end() != format!("allium-{kind}-v1-encrypted") {
        return Err(malformed("wrong header (is this the right kind of key?)"));
    }
    let mut e = Encrypted {
        public: [0; KEY_LEN],
        log_n: 0,
        salt: [0; 32],
        nonce: [0; crate::aead::NONCE_LEN],
        ct: [0; KEY_LEN],
        tag: [0; crate::aead::TAG_LEN],
        ad_len: l0.len() + l1.len() + l2.len(),
    };
    let pubhex = l1
        .trim_end()
        .strip_prefix("public ")
        .ok_or_else(|| malformed("missing `public` line"))?;
    hex_into(pubhex, &mut e.public)?;
    let kdf: Vec<&str> = l2.split_whitespace().collect();
    let ["scrypt", log_n, r, p, salt] = kdf[..] else {
        return Err(malformed("missing `scrypt` line"));
    };
    e.log_n = log_n.parse().map_err(|_| malformed("bad scrypt log_n"))?;
    if !SCRYPT_LOG_N_RANGE.contains(&e.log_n)
        || r != SCRYPT_R.to_string()
        || p != SCRYPT_P.to_string()
    {
        return Err(malformed("unsupported scrypt parameters"));
    }
    hex_into(salt, &mut e.salt)?;
    let aead: Vec<&str> = l3.split_whitespace().collect();
    let ["chacha20poly1305", nonce, sealed] = aead[..] else {
        return Err(malformed("missing `chacha20poly1305` line"));
    };
    hex_into(nonce, &mut e.nonce)?;
    let (ct, tag) = sealed
        .split_at_checked(2 * KEY_LEN)
        .ok_or_else(|| malformed("ciphertext too short"))?;
    hex_into(ct, &mut e.ct)?;
    hex_into(tag, &mut e.tag)?;
    Ok(e)
}

/// Read a key file, refusing group/world-readable and oversized files.
fn read_key_text(path: &Path) -> Result<Zeroizing<String>, CryptoError> {
    let meta = fs::metadata(path).map_err(|e| io_err(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::InsecureKeyFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > 1024 {
        return Err(CryptoError::KeyFileMalformed {
            path: path.to_path_buf(),
            why: "too large",
        });
    }
    Ok(Zeroizing::new(
        fs::read_to_string(path).map_err(|e| io_err(path, e))?,
    ))
}

/// A passphrase, zeroed on drop.
pub type Passphrase = Zeroizing<String>;

/// Wrap a passphrase read from a prompt or a file (one trailing newline removed).
pub fn passphrase(mut s: String) -> Passphrase {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Zeroizing::new(s)
}

/// 32 secret bytes, zeroed on drop.
pub type SecretKeyBytes = Zeroizing<[u8; KEY_LEN]>;

/// Read a key file written by [`write_secret`] or [`write_secret_encrypted`]. For an encrypted
/// file `passphrase` is called once (prompt, or a passphrase file); a wrong passphrase is
/// [`CryptoError::KeyFilePassphrase`]. Returns the secret and, if the file stores one, the
/// public key it claims (the caller checks it against the secret).
pub fn read_secret_with_passphrase(
    path: &Path,
    kind: &str,
    passphrase: impl FnOnce() -> Result<Passphrase, CryptoError>,
) -> Result<(SecretKeyBytes, Option<[u8; KEY_LEN]>), CryptoError> {
    let text = read_key_text(path)?;
    if text.lines().next() != Some(format!("allium-{kind}-v1-encrypted").as_str()) {
        return Ok((read_secret(path, kind)?, None));
    }
    let e = parse_encrypted(path, &text, kind)?;
    let pass = passphrase()?;
    let key = derive(pass.as_bytes(), &e.salt, e.log_n)?;
    let ad = text.as_bytes().get(..e.ad_len).unwrap_or_default();
    let mut out = Zeroizing::new(e.ct);
    crate::aead::open(&key, &e.nonce, ad, &e.tag, &mut out[..]).map_err(|_| {
        CryptoError::KeyFilePassphrase {
            path: path.to_path_buf(),
        }
    })?;
    Ok((out, Some(e.public)))
}

/// Read a secret key file written by [`write_secret`], refusing group/world-readable files.
pub fn read_secret(path: &Path, kind: &str) -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let meta = fs::metadata(path).map_err(|e| io_err(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CryptoError::InsecureKeyFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > 256 {
        return Err(CryptoError::KeyFileMalformed {
            path: path.to_path_buf(),
            why: "too large",
        });
    }
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| io_err(path, e))?);
    let malformed = |why| CryptoError::KeyFileMalformed {
        path: path.to_path_buf(),
        why,
    };
    let mut lines = text.lines();
    let header = lines.next().ok_or_else(|| malformed("empty file"))?;
    if header != format!("allium-{kind}-v1") {
        return Err(malformed("wrong header (is this the right kind of key?)"));
    }
    let hexline = lines.next().ok_or_else(|| malformed("missing key line"))?;
    if lines.next().is_some() {
        return Err(malformed("trailing data"));
    }
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(hexline.trim(), &mut out[..]).map_err(|_| malformed("bad hex"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_permissions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k");
        let secret = [7u8; KEY_LEN];
        write_secret(&p, "identity", &secret).expect("write");
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(*read_secret(&p, "identity").expect("read"), secret);
        assert!(matches!(
            read_secret(&p, "onion"),
            Err(CryptoError::KeyFileMalformed { .. })
        ));
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = read_secret(&p, "identity").expect_err("must refuse");
        assert!(matches!(err, CryptoError::InsecureKeyFile { .. }));
        assert!(err.to_string().contains("chmod 600"));
    }

    fn pass(p: &str) -> impl FnOnce() -> Result<Zeroizing<String>, CryptoError> + '_ {
        move || Ok(Zeroizing::new(p.to_owned()))
    }

    #[test]
    fn directories_0700_and_fingerprint_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("new").join("deeper").join("k");
        write_secret(&p, "identity", &[1; KEY_LEN]).expect("write");
        for d in [
            dir.path().join("new"),
            dir.path().join("new").join("deeper"),
        ] {
            let mode = fs::metadata(&d).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write_fingerprint(dir.path(), "MyRelay", &[0xab; KEY_LEN]).expect("fingerprint");
        let text = fs::read_to_string(dir.path().join("fingerprint")).expect("read");
        assert_eq!(text, format!("MyRelay {}\n", "AB".repeat(32)));
    }

    #[test]
    fn encrypted_round_trip_right_and_wrong_passphrase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("authority_identity.key");
        let secret = [9u8; KEY_LEN];
        let public = [4u8; KEY_LEN];
        let kind = "authority-identity";
        write_secret_encrypted(&p, kind, &secret, &public, b"correct horse", 10).expect("write");
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = fs::read_to_string(&p).expect("read");
        assert!(!text.contains(&hex::encode(secret)), "secret in the clear");
        assert!(is_encrypted(&p).expect("is"));
        assert_eq!(read_public(&p, kind).expect("public"), Some(public));

        let (got, claimed) =
            read_secret_with_passphrase(&p, kind, pass("correct horse")).expect("right passphrase");
        assert_eq!(*got, secret);
        assert_eq!(claimed, Some(public));
        let err = read_secret_with_passphrase(&p, kind, pass("wrong horse"))
            .expect_err("wrong passphrase");
        assert!(
            matches!(err, CryptoError::KeyFilePassphrase { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("wrong passphrase"));

        // The public line is covered by the tag: changing it makes the file refuse to open.
        let forged = text.replacen(&hex::encode(public), &hex::encode([5u8; KEY_LEN]), 1);
        fs::write(&p, forged).expect("write");
        let err =
            read_secret_with_passphrase(&p, kind, pass("correct horse")).expect_err("altered");
        assert!(
            matches!(err, CryptoError::KeyFilePassphrase { .. }),
            "{err}"
        );

        // A plain file reads without asking for a passphrase.
        let plain = dir.path().join("plain.key");
        write_secret(&plain, kind, &secret).expect("write");
        let (got, claimed) =
            read_secret_with_passphrase(&plain, kind, || panic!("no passphrase for a plain file"))
                .expect("plain");
        assert_eq!((*got, claimed), (secret, None));
        assert!(!is_encrypted(&plain).expect("is"));

        // A file asking for an absurd scrypt cost is refused before deriving anything.
        write_secret_encrypted(&p, kind, &secret, &public, b"x", 10).expect("write");
        let text = fs::read_to_string(&p).expect("read");
        fs::write(&p, text.replacen("scrypt 10 ", "scrypt 40 ", 1)).expect("write");
        assert!(matches!(
            read_secret_with_passphrase(&p, kind, pass("x")),
            Err(CryptoError::KeyFileMalformed { .. })
        ));
    }
}
