//! `allium authority --config FILE` (or `-c FILE`) runs a directory authority;
//! `allium authority certify --identity FILE --out DIR [--months N] [--passphrase-file F]`
//! issues its signing key (a passphrase-protected identity is opened with F, or a prompt).

use std::path::PathBuf;

use allium_directory::authority::keys as akeys;

use allium_directory::time_fmt::rfc3339;

use super::CmdResult;
use crate::outln;

/// Arguments of `allium authority`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// The configuration file (see `authority.example.toml`).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Key management instead of running.
    #[command(subcommand)]
    pub cmd: Option<Sub>,
}

/// `allium authority` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Create a new online signing key and certify it with the offline identity key.
    Certify {
        /// The offline identity key file (`authority_identity.key`).
        #[arg(long)]
        identity: PathBuf,
        /// Where to write `authority_signing.key` and `authority.cert` (the authority reads them
        /// from `<data_dir>/keys`).
        #[arg(long)]
        out: PathBuf,
        /// Validity in months of 30 days (1 to 6).
        #[arg(long, default_value_t = 3)]
        months: u64,
        /// The passphrase of a protected identity key, in FILE (its first line); without it a
        /// protected key's passphrase is asked for on the terminal.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
    },
}

fn certify(
    identity: PathBuf,
    out: PathBuf,
    months: u64,
    passphrase_file: Option<PathBuf>,
) -> CmdResult {
    let id = akeys::read_identity_with(&identity, || {
        let p = match &passphrase_file {
            Some(f) => super::keygen::passphrase_from_file(f),
            None => super::keygen::passphrase_prompt(&format!(
                "passphrase for {}: ",
                identity.display()
            )),
        };
        p.map_err(|why| allium_crypto::CryptoError::KeyFileIo {
            path: identity.clone(),
            source: std::io::Error::other(why),
        })
    })?;
    let cert = akeys::certify(&id, &out, months, allium_directory::now_unix())?;
    let c = cert.cert();
    outln!("authority identity: {}", cert.identity().to_hex())?;
    outln!("signing key:        {}", cert.signing_key().to_hex())?;
    outln!(
        "certificate valid from {} until {}; certify a new signing key before then",
        rfc3339(c.valid_after),
        rfc3339(c.expires)
    )?;
    outln!(
        "wrote {} and {}",
        out.join(akeys::SIGNING_FILE).display(),
        out.join(akeys::CERT_FILE).display()
    )?;
    Ok(())
}

/// Run `allium authority`.
pub fn run(args: Args) -> CmdResult {
    if let Some(Sub::Certify {
        identity,
        out,
        months,
        passphrase_file,
    }) = args.cmd
    {
        return certify(identity, out, months, passphrase_file);
    }
    let Some(path) = args.config else {
        return Err(
            "give --config FILE (or -c FILE) to run an authority (see authority.example.toml), \
                    or use `allium authority certify`"
                .into(),
        );
    };
    crate::ops::roles::run_authority(path)
}

/// The authority's Prometheus metrics page at `now` (Unix seconds).
pub fn metrics_page(
    h: &allium_directory::authority::AuthorityHandle,
    now: u64,
) -> allium_proto::metrics::Exposition {
    use allium_proto::metrics::{Exposition, MetricType};
    let mut e = Exposition::new();
    e.single(
        "allium_authority_descriptors",
        MetricType::Gauge,
        "Relay descriptors this authority holds.",
        h.descriptor_count() as f64,
    );
    // The authority's own consensus (it signed it): decoded only to read its date.
    let valid_after = h
        .current_consensus()
        .and_then(|c| c.dangerously_decode_unverified().ok())
        .map(|c| c.valid_after);
    e.single(
        "allium_consensus_age_seconds",
        MetricType::Gauge,
        "Seconds since the consensus this authority serves became valid (NaN: none yet).",
        valid_after.map_or(f64::NAN, |va| now.saturating_sub(va) as f64),
    );
    e.single(
        "allium_bootstrap_percent",
        MetricType::Gauge,
        "100 once the authority serves a consensus, 0 before.",
        if valid_after.is_some() { 100.0 } else { 0.0 },
    );
    e
}
