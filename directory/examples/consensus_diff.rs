//! Sizes of two consensus envelopes and of the diff between them, as one JSON line (used by
//! `bench/scale.py`): `cargo run -p allium-directory --example consensus_diff -- OLD NEW`.
//! Both files are raw signed envelopes (`GET /allium/v1/consensus` from an authority).
//! `changes` says what differs: relays added and removed, and for relays in both how many
//! entries changed each field, and which header fields changed.
#![allow(missing_docs)]

use std::io::Write as _;
use std::process::ExitCode;

use allium_directory::dircache::diff;
use allium_directory::doc::{Consensus, Signed};

fn zlen(b: &[u8]) -> usize {
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let _ = e.write_all(b);
    e.finish().map(|v| v.len()).unwrap_or(0)
}

fn relays(raw: &[u8]) -> Result<usize, String> {
    let s = Signed::<Consensus>::from_bytes(raw).map_err(|e| e.to_string())?;
    let c = s
        .dangerously_decode_unverified()
        .map_err(|e| e.to_string())?;
    Ok(c.relays.len())
}

fn decode(raw: &[u8]) -> Result<Consensus, String> {
    Signed::<Consensus>::from_bytes(raw)
        .and_then(|s| s.dangerously_decode_unverified())
        .map_err(|e| e.to_string())
}

/// What changed from `a` to `b`, as a JSON object.
fn changes(a: &Consensus, b: &Consensus) -> String {
    use std::collections::BTreeMap;
    let old: BTreeMap<_, _> = a.relays.iter().map(|e| (e.identity, e)).collect();
    let new: BTreeMap<_, _> = b.relays.iter().map(|e| (e.identity, e)).collect();
    let added = new.keys().filter(|k| !old.contains_key(*k)).count();
    let removed = old.keys().filter(|k| !new.contains_key(*k)).count();
    let mut fields: BTreeMap<&str, usize> = BTreeMap::new();
    let mut changed = 0;
    for (k, n) in &new {
        let Some(o) = old.get(k) else { continue };
        let diffs = [
            ("link_key", o.link_key != n.link_key),
            ("onion_key", o.onion_key != n.onion_key),
            ("nickname", o.nickname != n.nickname),
            ("addrs", o.addrs != n.addrs),
            ("flags", o.flags != n.flags),
            ("weight", o.weight != n.weight),
            ("exit", o.exit != n.exit),
            ("family", o.family != n.family),
            ("measured", o.measured != n.measured),
        ];
        let mut any = false;
        for (name, d) in diffs {
            if d {
                *fields.entry(name).or_default() += 1;
                any = true;
            }
        }
        changed += usize::from(any);
    }
    let header = [
        ("method", a.method != b.method),
        ("valid_after", a.valid_after != b.valid_after),
        ("voters", a.voters != b.voters),
        ("params", a.params != b.params),
        (
            "bandwidth_weights",
            a.bandwidth_weights != b.bandwidth_weights,
        ),
    ];
    let fields = fields
        .iter()
        .map(|(k, v)| format!("\"{k}\": {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let header = header
        .iter()
        .filter(|(_, d)| *d)
        .map(|(k, _)| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{{\"added\": {added}, \"removed\": {removed}, \"changed\": {changed}, \
         \"fields\": {{{fields}}}, \"header\": [{header}]}}"
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [old, new] = args.as_slice() else {
        eprintln!("usage: consensus_diff OLD NEW (raw consensus envelopes)");
        return ExitCode::from(2);
    };
    let run = || -> Result<String, String> {
        let a = std::fs::read(old).map_err(|e| format!("{old}: {e}"))?;
        let b = std::fs::read(new).map_err(|e| format!("{new}: {e}"))?;
        let n = relays(&b)?;
        let d = diff::compute(&a, &b).map_err(|e| e.to_string())?;
        let back = diff::apply(&a, &d).map_err(|e| e.to_string())?;
        let (full_z, diff_z) = (zlen(&b), zlen(&d));
        Ok(format!(
            "{{\"relays_old\": {}, \"relays\": {n}, \"full_raw\": {}, \"full_z\": {full_z}, \
             \"full_z_per_relay\": {:.1}, \"diff_raw\": {}, \"diff_z\": {diff_z}, \
             \"diff_percent_of_full_z\": {:.2}, \"applies\": {}, \"changes\": {}}}",
            relays(&a)?,
            b.len(),
            full_z as f64 / n.max(1) as f64,
            d.len(),
            100.0 * diff_z as f64 / full_z.max(1) as f64,
            back == b,
            changes(&decode(&a)?, &decode(&b)?)
        ))
    };
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("consensus_diff: {e}");
            ExitCode::FAILURE
        }
    }
}
