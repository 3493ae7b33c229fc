//! `allium keygen relay|authority --out DIR`: create key files (mode 0600).
//!
//! Relay: `identity.key` (Ed25519, kind `identity`), `link.key` (x25519 Noise static, kind
//! `link`), `onion.key` (x25519 ntor, kind `onion`) — the layout `allium relay` reads.
//! Authority: `authority_identity.key` (Ed25519, kind `authority-identity`), the offline key that
//! `allium authority certify` uses to certify an online signing key.

use std::path::{Path, PathBuf};

use allium_crypto::{IdentityKeypair, X25519Secret, keyfile};
use allium_directory::authority::keys as akeys;

use super::CmdResult;

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
    println!("relay identity: {}", id.public().to_hex());
    println!("keys written to {}", out.display());
    Ok(())
}

fn authority(out: &Path) -> CmdResult {
    let id = akeys::create_identity(out)?;
    println!("authority identity: {}", id.to_hex());
    println!(
        "wrote {}; next: allium authority certify --identity {} --out <data_dir>/keys",
        out.join(akeys::IDENTITY_FILE).display(),
        out.join(akeys::IDENTITY_FILE).display()
    );
    Ok(())
}

/// Run `allium keygen`.
pub fn run(args: Args) -> CmdResult {
    match args.kind {
        Kind::Relay { out } => relay(&out),
        Kind::Authority { out } => authority(&out),
    }
}
