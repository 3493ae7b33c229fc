//! `allium authority --config FILE` runs a directory authority;
//! `allium authority certify --identity FILE --out DIR [--months N]` issues its signing key.

use std::path::PathBuf;

use allium_directory::authority::keys as akeys;

use super::CmdResult;

/// Arguments of `allium authority`.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// The configuration file (see `authority.example.toml`).
    #[arg(long)]
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
    },
}

fn certify(identity: PathBuf, out: PathBuf, months: u64) -> CmdResult {
    let id = akeys::read_identity(&identity)?;
    let cert = akeys::certify(&id, &out, months, allium_directory::now_unix())?;
    println!("authority identity: {}", cert.identity().to_hex());
    println!("signing key:        {}", cert.signing_key().to_hex());
    println!(
        "certificate valid until {} (unix); renew before then",
        cert.cert().expires
    );
    println!(
        "wrote {} and {}",
        out.join(akeys::SIGNING_FILE).display(),
        out.join(akeys::CERT_FILE).display()
    );
    Ok(())
}

/// Run `allium authority`.
pub fn run(args: Args) -> CmdResult {
    if let Some(Sub::Certify {
        identity,
        out,
        months,
    }) = args.cmd
    {
        return certify(identity, out, months);
    }
    let Some(path) = args.config else {
        return Err(
            "give --config FILE to run an authority (see authority.example.toml), \
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
