//! Key files: 32 secret bytes behind a one-line header, written with mode 0600.
//!
//! Format: `allium-<kind>-v1\n` followed by 64 lower-case hex digits and a newline. A file that
//! is readable by group or others is refused with an error that says how to fix it.

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

/// Write a secret key file atomically with mode 0600. `kind` names the key (e.g. `identity`).
pub fn write_secret(path: &Path, kind: &str, secret: &[u8; KEY_LEN]) -> Result<(), CryptoError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut text = Zeroizing::new(format!("allium-{kind}-v1\n"));
    text.push_str(&Zeroizing::new(hex::encode(secret)));
    text.push('\n');
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err(&tmp, e))?;
        f.write_all(text.as_bytes()).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
    }
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
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
}
