//! `allium consensus show [--json] [--cache FILE | --authority ID@ADDR ...]`: print a consensus.

use std::path::PathBuf;

use allium_crypto::RelayId;
use allium_directory::client::{self, AuthorityInfo, Liveness};
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

use crate::outln;

fn utc(t: u64) -> String {
    allium_directory::time_fmt::utc_table(t)
}

/// The status line of a consensus at `now`: live, EXPIRED (with until when it stays usable, or
/// that it is too old), or not yet valid.
fn status(l: Liveness) -> String {
    use allium_directory::time_fmt::rfc3339;
    match l {
        Liveness::Live => "live".to_owned(),
        Liveness::NotYetValid => "NOT YET VALID (dated in the future; check the clock)".to_owned(),
        Liveness::Expired {
            expired_at,
            usable_until,
        } => format!(
            "EXPIRED at {}; usable until {} while no newer one is available",
            rfc3339(expired_at),
            rfc3339(usable_until)
        ),
        Liveness::TooOld { expired_at } => format!(
            "EXPIRED at {}; too old (more than 24 h past valid-until), refused by relays and \
             proxies",
            rfc3339(expired_at)
        ),
    }
}

fn print_table(
    c: &Consensus,
    signed_by: Option<usize>,
    n_sigs: usize,
    note: &str,
    live: Liveness,
) -> std::io::Result<()> {
    let mark = match live {
        Liveness::Live => "",
        Liveness::NotYetValid => " NOT YET VALID",
        Liveness::Expired { .. } | Liveness::TooOld { .. } => " EXPIRED",
    };
    outln!("consensus ({note}){mark}")?;
    outln!("  status        {}", status(live))?;
    outln!("  valid-after   {} UTC", utc(c.valid_after))?;
    outln!("  fresh-until   {} UTC", utc(c.fresh_until))?;
    outln!("  valid-until   {} UTC", utc(c.valid_until))?;
    outln!("  method        {}", c.method)?;
    match signed_by {
        Some(n) => outln!("  signatures    {n} valid of {n_sigs}")?,
        None => outln!("  signatures    {n_sigs} (not checked)")?,
    }
    outln!("  voters        {}", c.voters.len())?;
    for v in &c.voters {
        outln!("    {v}")?;
    }
    let params: Vec<String> = c.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    outln!("  params        {}", params.join(" "))?;
    let bw: Vec<String> = c
        .bandwidth_weights
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    outln!("  bw-weights    {}", bw.join(" "))?;
    outln!(
        "  relays        {} (weights in kB/s; * = unmeasured, capped)",
        c.relays.len()
    )?;
    outln!(
        "{:<19} {:<16} {:<22} {:>8}  {:<40} exit",
        "nickname",
        "identity",
        "address",
        "weight",
        "flags"
    )?;
    for r in &c.relays {
        let addr = r.addrs.first().map(|a| a.to_string()).unwrap_or_default();
        let id: String = r.identity.to_hex().chars().take(16).collect();
        outln!(
            "{:<19} {:<16} {:<22} {:>8}  {:<40} {}",
            r.nickname,
            id,
            addr,
            format!("{}{}", r.weight, if r.measured { "" } else { "*" }),
            r.flags.to_string(),
            r.exit
        )?;
    }
    Ok(())
}

fn to_json(
    c: &Consensus,
    signed_by: Option<usize>,
    n_sigs: usize,
    live: Liveness,
) -> serde_json::Value {
    use serde_json::json;
    let (state, usable_until) = match live {
        Liveness::Live => ("live", None),
        Liveness::NotYetValid => ("not_yet_valid", None),
        Liveness::Expired { usable_until, .. } => ("expired", Some(usable_until)),
        Liveness::TooOld { .. } => ("too_old", None),
    };
    json!({
        "status": state,
        "usable_until": usable_until,
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
            "entry_digest": hex::encode(r.entry_digest()),
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
            let f = client::verify_consensus_signatures(&c, &certs, &auths, now)?;
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
            let v = rt
                .block_on(client::fetch_consensus_any_age(&auths, now))?
                .verified;
            (
                v.consensus().clone(),
                Some(v.signed_by().len()),
                v.signed().sigs().len(),
                "fetched, verified",
            )
        }
    };
    let live = Liveness::of(&consensus, now);
    if a.json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&to_json(&consensus, signed_by, n_sigs, live))?
        )?;
    } else {
        print_table(&consensus, signed_by, n_sigs, note, live)?;
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
            shared_rand: None,
            bandwidth_weights: [("Wgg".to_string(), 7000)].into_iter().collect(),
        };
        let j = to_json(&c, None, 0, Liveness::Live);
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

    #[test]
    fn status_marks_expired_and_too_old() {
        assert_eq!(status(Liveness::Live), "live");
        let e = status(Liveness::Expired {
            expired_at: 1_800_000_000,
            usable_until: 1_800_086_400,
        });
        assert!(
            e.starts_with("EXPIRED at 2027-01-15T08:00:00Z; usable until 2027-01-16T08:00:00Z")
        );
        let t = status(Liveness::TooOld {
            expired_at: 1_800_000_000,
        });
        assert!(t.starts_with("EXPIRED") && t.contains("too old"), "{t}");
    }
}
