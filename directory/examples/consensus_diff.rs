//! Sizes of two consensus envelopes and of the diff between them, as one JSON line (used by
//! `bench/scale.py`): `cargo run -p allium-directory --example consensus_diff -- OLD NEW`.
//! Both files are raw signed envelopes (`GET /allium/v1/consensus` from an authority).
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
             \"diff_percent_of_full_z\": {:.2}, \"applies\": {}}}",
            relays(&a)?,
            b.len(),
            full_z as f64 / n.max(1) as f64,
            d.len(),
            100.0 * diff_z as f64 / full_z.max(1) as f64,
            back == b
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
