//! `allium keygen relay|authority --out DIR`: create key files (mode 0600, directories 0700);
//! `allium keygen show DIR`: print the identity, fingerprint and key dates of a data or key
//! directory.
//!
//! Relay: `identity.key` (Ed25519, kind `identity`), `link.key` (x25519 Noise static, kind
//! `link`), `onion.key` (x25519 ntor, kind `onion`) — the layout `allium relay` reads.
//! Authority: `authority_identity.key` (Ed25519, kind `authority-identity`), the offline key that
//! `allium authority certify` uses to certify an online signing key; with `--passphrase` (asked
//! on the terminal) or `--passphrase-file FILE` it is passphrase-protected.

use std::path::{Path, PathBuf};

use allium_crypto::{IdentityKeypair, RelayId, X25519Secret, keyfile};
use allium_directory::authority::keys as akeys;
use allium_directory::doc::{AuthCert, Signed};
use allium_directory::time_fmt::rfc3339;

use super::CmdResult;
use crate::outln;

/// Arguments of `allium keygen`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which keys to create.
    #[command(subcommand)]
    pub kind: Kind,
}

/// What to create.
#[derive(clap::Subcommand, Debug)]
pub enum Kind {
    /// A relay's identity, link and onion keys.
    Relay {
        /// Directory to write the key files into (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// A directory authority's offline identity key (keep it offline after certifying).
    Authority {
        /// Directory to write `authority_identity.key` into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Protect the key with a passphrase asked for on the terminal (twice).
        #[arg(long)]
        passphrase: bool,
        /// Protect the key with the passphrase in FILE (its first line).
        #[arg(long, value_name = "FILE", conflicts_with = "passphrase")]
        passphrase_file: Option<PathBuf>,
    },
    /// Print the identity, fingerprint and key dates of a relay data directory, an authority
    /// data directory, or a directory holding `authority_identity.key`.
    Show {
        /// The directory.
        dir: PathBuf,
    },
}

fn refuse_existing(paths: &[PathBuf]) -> CmdResult {
    for p in paths {
        if p.exists() {
            return Err(format!(
                "{} already exists; refusing to overwrite a key (choose another --out)",
                p.display()
            )
            .into());
        }
    }
    Ok(())
}

fn relay(out: &Path) -> CmdResult {
    let id_p = out.join("identity.key");
    let link_p = out.join("link.key");
    let onion_p = out.join("onion.key");
    refuse_existing(&[id_p.clone(), link_p.clone(), onion_p.clone()])?;
    let id = IdentityKeypair::generate();
    let link = X25519Secret::generate();
    let onion = X25519Secret::generate();
    keyfile::write_secret(&id_p, "identity", &id.seed())?;
    keyfile::write_secret(&link_p, "link", link.secret_bytes())?;
    keyfile::write_secret(&onion_p, "onion", onion.secret_bytes())?;
    outln!("relay identity: {}", id.public().to_hex())?;
    outln!("fingerprint:    {}", keyfile::fingerprint(&id.public().0))?;
    outln!("keys written to {}", out.display())?;
    Ok(())
}

/// Read a passphrase from the first line of `file`.
pub fn passphrase_from_file(file: &Path) -> Result<keyfile::Passphrase, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("--passphrase-file {}: {e}", file.display()))?;
    let first = text.lines().next().unwrap_or_default().to_owned();
    drop(keyfile::passphrase(text));
    if first.is_empty() {
        return Err(format!(
            "--passphrase-file {}: the first line is empty",
            file.display()
        ));
    }
    Ok(keyfile::passphrase(first))
}

/// Ask for a passphrase on the terminal.
pub fn passphrase_prompt(prompt: &str) -> Result<keyfile::Passphrase, String> {
    rpassword::prompt_password(prompt)
        .map(keyfile::passphrase)
        .map_err(|e| {
            format!("cannot read a passphrase from the terminal ({e}); use --passphrase-file FILE")
        })
}

fn authority(out: &Path, ask: bool, file: Option<&Path>) -> CmdResult {
    let pass = match (ask, file) {
        (_, Some(f)) => Some(passphrase_from_file(f)?),
        (true, None) => {
            let a = passphrase_prompt("passphrase for the authority identity key: ")?;
            let b = passphrase_prompt("the same passphrase again: ")?;
            if a != b {
                return Err("the two passphrases differ; nothing written".into());
            }
            if a.is_empty() {
                return Err("empty passphrase; nothing written".into());
            }
            Some(a)
        }
        (false, None) => None,
    };
    let id = akeys::create_identity_with(
        out,
        pass.as_ref().map(|p| (p.as_bytes(), keyfile::SCRYPT_LOG_N)),
    )?;
    let path = out.join(akeys::IDENTITY_FILE);
    outln!("authority identity: {}", id.to_hex())?;
    outln!("fingerprint:        {}", keyfile::fingerprint(&id.0))?;
    if pass.is_some() {
        outln!("the key is passphrase-protected (scrypt, ChaCha20-Poly1305)")?;
    }
    outln!(
        "wrote {}; next: allium authority certify --identity {} --out <data_dir>/keys",
        path.display(),
        path.display()
    )?;
    Ok(())
}

/// A file's modification time as RFC 3339, if it has one.
fn mtime(path: &Path) -> Option<String> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    Some(rfc3339(secs))
}

fn print_identity(what: &str, id: &RelayId) -> std::io::Result<()> {
    outln!("{what} identity: {}", id.to_hex())?;
    outln!("fingerprint:  {}", keyfile::fingerprint(&id.0))
}

/// `allium keygen show DIR`.
fn show(dir: &Path) -> CmdResult {
    let mut found = false;
    let relay_id = dir.join("identity.key");
    if relay_id.exists() {
        found = true;
        let seed = keyfile::read_secret(&relay_id, "identity")?;
        let id = IdentityKeypair::from_seed(&seed).public();
        print_identity("relay", &id)?;
        if let Some(t) = mtime(&relay_id) {
            outln!("  identity.key   written {t}")?;
        }
        for (file, what) in [
            ("link.key", "link key"),
            ("onion.key", "onion key (created)"),
            ("onion-prev.key", "previous onion key"),
        ] {
            if let Some(t) = mtime(&dir.join(file)) {
                outln!("  {file:<14} {what} {t}")?;
            }
        }
    }
    let offline = dir.join(akeys::IDENTITY_FILE);
    if offline.exists() {
        found = true;
        let id = akeys::identity_of_file(&offline)?;
        print_identity("authority (offline key)", &id)?;
        let protected = keyfile::is_encrypted(&offline)?;
        outln!(
            "  {} {}{}",
            akeys::IDENTITY_FILE,
            if protected {
                "passphrase-protected"
            } else {
                "not passphrase-protected"
            },
            mtime(&offline)
                .map(|t| format!(", written {t}"))
                .unwrap_or_default()
        )?;
    }
    for cert_path in [
        akeys::keys_dir(dir).join(akeys::CERT_FILE),
        dir.join(akeys::CERT_FILE),
    ] {
        if !cert_path.exists() {
            continue;
        }
        found = true;
        let bytes =
            std::fs::read(&cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
        let cert = Signed::<AuthCert>::from_bytes(&bytes)?.verify()?;
        print_identity("authority", &cert.identity())?;
        outln!("  signing key    {}", cert.signing_key().to_hex())?;
        outln!(
            "  certificate    valid from {} until {} ({})",
            rfc3339(cert.cert().valid_after),
            rfc3339(cert.cert().expires),
            cert_path.display()
        )?;
        let now = allium_directory::now_unix();
        if cert.cert().expires <= now {
            outln!("  EXPIRED: run `allium authority certify` again")?;
        }
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("fingerprint")) {
        outln!("fingerprint file: {}", text.trim_end())?;
    }
    if !found {
        return Err(format!(
            "{}: no identity.key, {} or {} here; give a relay data directory, an authority \
             data directory, or the directory of `allium keygen authority --out`",
            dir.display(),
            akeys::IDENTITY_FILE,
            akeys::CERT_FILE
        )
        .into());
    }
    Ok(())
}

/// Run `allium keygen`.
pub fn run(args: Args) -> CmdResult {
    match args.kind {
        Kind::Relay { out } => relay(&out),
        Kind::Authority {
            out,
            passphrase,
            passphrase_file,
        } => authority(&out, passphrase, passphrase_file.as_deref()),
        Kind::Show { dir } => show(&dir),
    }
}
