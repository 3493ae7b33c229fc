//! `allium consensus show [--json] [--cache FILE | --authority ID@ADDR ...]`: print a consensus.

use std::path::PathBuf;

use allium_crypto::RelayId;
use allium_directory::client::{self, AuthorityInfo};
use allium_directory::doc::{Consensus, Signed};

use super::CmdResult;

/// Arguments of `allium consensus`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Sub,
}

/// `allium consensus` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Print a consensus: fetched from authorities (verified), or read from a cache file
    /// (verified when authorities are also given).
    Show(ShowArgs),
}

/// Arguments of `allium consensus show`.
#[derive(clap::Args, Debug)]
pub struct ShowArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// A consensus cache file (as written by relays and clients).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// An authority as `IDENTITYHEX@IP:PORT`; repeat for each configured authority.
    #[arg(long = "authority")]
    pub authorities: Vec<String>,
}

fn parse_authority(s: &str) -> Result<AuthorityInfo, String> {
    let (id, addr) = s
        .split_once('@')
        .ok_or_else(|| format!("--authority {s}: expected IDENTITYHEX@IP:PORT"))?;
    Ok(AuthorityInfo {
        identity: RelayId::from_hex(id).map_err(|e| format!("--authority {s}: {e}"))?,
        dir_addr: addr
            .parse()
            .map_err(|e| format!("--authority {s}: bad address: {e}"))?,
    })
}

/// `YYYY-MM-DD HH:MM:SS` UTC for unix seconds.
fn utc(t: u64) -> String {
    let days = (t / 86400) as i64;
    let secs = t % 86400;
    // Civil-from-days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

fn print_table(c: &Consensus, signed_by: Option<usize>, n_sigs: usize, note: &str) {
    println!("consensus ({note})");
    println!("  valid-after   {} UTC", utc(c.valid_after));
    println!("  fresh-until   {} UTC", utc(c.fresh_until));
    println!("  valid-until   {} UTC", utc(c.valid_until));
    println!("  method        {}", c.method);
    match signed_by {
        Some(n) => println!("  signatures    {n} valid of {n_sigs}"),
        None => println!("  signatures    {n_sigs} (not checked)"),
    }
    println!("  voters        {}", c.voters.len());
    for v in &c.voters {
        println!("    {v}");
    }
    let params: Vec<String> = c.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("  params        {}", params.join(" "));
    let bw: Vec<String> = c
        .bandwidth_weights
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!("  bw-weights    {}", bw.join(" "));
    println!(
        "  relays        {} (weights in kB/s; * = unmeasured, capped)",
        c.relays.len()
    );
    println!(
        "{:<19} {:<16} {:<22} {:>8}  {:<40} exit",
        "nickname", "identity", "address", "weight", "flags"
    );
    for r in &c.relays {
        let addr = r.addrs.first().map(|a| a.to_string()).unwrap_or_default();
        println!(
            "{:<19} {:<16} {:<22} {:>8}  {:<40} {}",
            r.nickname,
            &r.identity.to_hex()[..16],
            addr,
            format!("{}{}", r.weight, if r.measured { "" } else { "*" }),
            r.flags.to_string(),
            r.exit
        );
    }
}

fn to_json(c: &Consensus, signed_by: Option<usize>, n_sigs: usize) -> serde_json::Value {
    use serde_json::json;
    json!({
        "valid_after": c.valid_after,
        "fresh_until": c.fresh_until,
        "valid_until": c.valid_until,
        "method": c.method,
        "verified_signatures": signed_by,
        "signatures": n_sigs,
        "voters": c.voters.iter().map(|v| v.to_hex()).collect::<Vec<_>>(),
        "params": c.params,
        "bandwidth_weights": c.bandwidth_weights,
        "relays": c.relays.iter().map(|r| json!({
            "nickname": r.nickname,
            "identity": r.identity.to_hex(),
            "link_key": hex::encode(r.link_key.0),
            "onion_key": hex::encode(r.onion_key.0),
            "addrs": r.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "flags": r.flags.names(),
            "weight": r.weight,
            "measured": r.measured,
            "exit_ports": r.exit.accept.iter().map(|p| [p.lo, p.hi]).collect::<Vec<_>>(),
            "exit_allow_private": r.exit.allow_private,
            "family": r.family.iter().map(|f| f.to_hex()).collect::<Vec<_>>(),
            "desc_digest": hex::encode(r.desc_digest),
        })).collect::<Vec<_>>(),
    })
}

fn show(a: ShowArgs) -> CmdResult {
    let auths = a
        .authorities
        .iter()
        .map(|s| parse_authority(s))
        .collect::<Result<Vec<_>, _>>()?;
    let now = allium_directory::now_unix();
    let (consensus, signed_by, n_sigs, note) = match (&a.cache, auths.is_empty()) {
        (None, true) => {
            return Err("give --cache FILE or one --authority ID@ADDR per authority".into());
        }
        (Some(path), true) => {
            let (c, _certs) = client::cache::dangerously_read_cache_file(path)?;
            let s = Signed::<Consensus>::from_bytes(&c)?;
            let n = s.sigs().len();
            (
                s.dangerously_decode_unverified()?,
                None,
                n,
                "from cache, signatures NOT verified: pass --authority to verify",
            )
        }
        (Some(path), false) => {
            let (c, certs) = client::cache::dangerously_read_cache_file(path)?;
            let f = client::verify_consensus_bytes(&c, &certs, &auths, now)?;
            let v = f.verified;
            (
                v.consensus().clone(),
                Some(v.signed_by().len()),
                v.signed().sigs().len(),
                "from cache, verified",
            )
        }
        (None, false) => {
            let rt = super::runtime()?;
            let v = rt.block_on(client::fetch_consensus(&auths, now))?;
            (
                v.consensus().clone(),
                Some(v.signed_by().len()),
                v.signed().sigs().len(),
                "fetched, verified",
            )
        }
    };
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&consensus, signed_by, n_sigs))?
        );
    } else {
        print_table(&consensus, signed_by, n_sigs, note);
    }
    Ok(())
}

/// Run `allium consensus`.
pub fn run(args: Args) -> CmdResult {
    match args.cmd {
        Sub::Show(a) => show(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_weight_measured_and_flags() {
        use allium_directory::doc::{ConsensusEntry, ExitPolicy, Flags};
        let entry = |n: u8, measured: bool| ConsensusEntry {
            identity: RelayId([n; 32]),
            link_key: allium_crypto::X25519Public([n; 32]),
            onion_key: allium_crypto::X25519Public([n; 32]),
            nickname: format!("r{n}"),
            addrs: vec![std::net::SocketAddr::from(([127, 0, 0, 1], 9000))],
            flags: Flags::RUNNING | Flags::FAST | Flags::HSDIR,
            weight: u32::from(n) * 10,
            exit: ExitPolicy::reject_all(),
            family: vec![],
            desc_digest: [0; 32],
            measured,
        };
        let c = Consensus {
            version: 1,
            method: 2,
            valid_after: 1,
            fresh_until: 2,
            valid_until: 3,
            voters: vec![],
            params: Default::default(),
            relays: vec![entry(1, true), entry(2, false)],
            bandwidth_weights: [("Wgg".to_string(), 7000)].into_iter().collect(),
        };
        let j = to_json(&c, None, 0);
        assert_eq!(j["relays"][0]["weight"], 10);
        assert_eq!(j["relays"][0]["measured"], true);
        assert_eq!(j["relays"][1]["measured"], false);
        assert_eq!(j["relays"][1]["flags"][2], "HSDir");
        assert_eq!(j["bandwidth_weights"]["Wgg"], 7000);
    }

    #[test]
    fn utc_formatting() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_800_000_000), "2027-01-15 08:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
    }
}
