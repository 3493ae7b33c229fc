//! The bandwidth file: what a bandwidth scanner (`allium bwscan`) measured, read by the
//! authority beside it (modelled on Tor's bandwidth-file-spec 1.x; byte format in
//! docs/protocol/80-directory.md, "Bandwidth file").
//!
//! ```text
//! 1796112000\n                      timestamp: Unix seconds of the scan's end
//! version=1.0.0\n                   header lines: key=value (version first)
//! software=allium\n
//! =====\n                           end of header
//! node_id=$<64 hex> bw=<kB/s> nick=<nickname> measured_at=<unix>\n    one line per relay
//! ```
//!
//! The file is input the authority did not make (another process, maybe another machine), so
//! the parser treats it as hostile: total size, line length and line count are bounded before
//! anything is kept, nothing is indexed, and malformed relay lines are skipped (counted), never
//! fatal. A malformed header rejects the whole file.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use allium_crypto::RelayId;

use crate::err::{DirError, Result};

/// Largest bandwidth file read (4 MiB).
pub const MAX_BWFILE_LEN: usize = 4 * 1024 * 1024;
/// Longest line.
pub const MAX_LINE_LEN: usize = 1024;
/// Most header lines.
pub const MAX_HEADER_LINES: usize = 64;
/// Most relay lines kept.
pub const MAX_RELAY_LINES: usize = 50_000;
/// The header terminator (Tor's, five `=`).
pub const TERMINATOR: &str = "=====";
/// The format version this code writes.
pub const BWFILE_VERSION: &str = "1.0.0";

const OBJECT: &str = "bandwidth file";

/// One relay's measurement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BwLine {
    /// Measured bandwidth, kilobytes (1000 bytes) per second.
    pub bw: u32,
    /// When it was measured (Unix seconds); the file's timestamp when the line has none.
    pub measured_at: u64,
    /// Nickname (informative only).
    pub nick: Option<String>,
}

/// A parsed bandwidth file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BandwidthFile {
    /// The timestamp on the first line.
    pub timestamp: u64,
    /// Header key=value lines (the `version` among them).
    pub header: BTreeMap<String, String>,
    /// Measurements by relay.
    pub relays: BTreeMap<RelayId, BwLine>,
    /// Relay lines skipped as malformed or duplicate (when parsing).
    pub skipped: usize,
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn valid_value(v: &str) -> bool {
    v.bytes().all(|b| b.is_ascii_graphic())
}

fn parse_u64(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_relay_line(line: &str, default_time: u64) -> Option<(RelayId, BwLine)> {
    let mut id = None;
    let mut bw = None;
    let mut nick = None;
    let mut measured_at = default_time;
    for field in line.split(' ') {
        let (k, v) = field.split_once('=')?;
        if !valid_key(k) || !valid_value(v) {
            return None;
        }
        match k {
            "node_id" => {
                if id.is_some() {
                    return None;
                }
                let hex = v.strip_prefix('$')?;
                if hex.len() != 64 {
                    return None;
                }
                id = Some(RelayId::from_hex(hex).ok()?);
            }
            "bw" => {
                if bw.is_some() {
                    return None;
                }
                bw = Some(u32::try_from(parse_u64(v)?).unwrap_or(u32::MAX));
            }
            "nick" => nick = Some(v.to_owned()),
            "measured_at" => measured_at = parse_u64(v)?,
            _ => {} // Unknown keys are ignored (the format is extensible, as Tor's).
        }
    }
    Some((
        id?,
        BwLine {
            bw: bw?,
            measured_at,
            nick,
        },
    ))
}

impl BandwidthFile {
    /// Parse a bandwidth file (hostile input: bounded, never panics).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > MAX_BWFILE_LEN {
            return Err(DirError::TooLarge {
                object: OBJECT,
                len: bytes.len(),
                max: MAX_BWFILE_LEN,
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|_| DirError::Malformed {
            object: OBJECT,
            why: "not UTF-8",
        })?;
        let body = text.strip_suffix('\n').ok_or(DirError::Malformed {
            object: OBJECT,
            why: "must end with a newline",
        })?;
        let mut lines = body.split('\n');
        let first = lines.next().unwrap_or_default();
        let timestamp = parse_u64(first).ok_or(DirError::Malformed {
            object: OBJECT,
            why: "the first line must be a Unix timestamp",
        })?;
        let mut out = Self {
            timestamp,
            ..Self::default()
        };
        let mut terminated = false;
        for line in lines.by_ref() {
            if line.len() > MAX_LINE_LEN {
                return Err(DirError::Malformed {
                    object: OBJECT,
                    why: "header line too long",
                });
            }
            if line == TERMINATOR {
                terminated = true;
                break;
            }
            if out.header.len() >= MAX_HEADER_LINES {
                return Err(DirError::Malformed {
                    object: OBJECT,
                    why: "too many header lines",
                });
            }
            let (k, v) = line.split_once('=').ok_or(DirError::Malformed {
                object: OBJECT,
                why: "header lines are key=value",
            })?;
            if !valid_key(k) || !valid_value(v) || out.header.contains_key(k) {
                return Err(DirError::Malformed {
                    object: OBJECT,
                    why: "bad or repeated header key",
                });
            }
            out.header.insert(k.to_owned(), v.to_owned());
        }
        if !terminated {
            return Err(DirError::Malformed {
                object: OBJECT,
                why: "no ===== line ends the header",
            });
        }
        match out.header.get("version").map(String::as_str) {
            Some(v) if v.starts_with("1.") => {}
            _ => {
                return Err(DirError::Malformed {
                    object: OBJECT,
                    why: "missing or unsupported version (1.x expected)",
                });
            }
        }
        for line in lines {
            if out.relays.len() >= MAX_RELAY_LINES {
                out.skipped += 1;
                continue;
            }
            let parsed = (line.len() <= MAX_LINE_LEN)
                .then(|| parse_relay_line(line, timestamp))
                .flatten();
            match parsed {
                Some((id, l)) if !out.relays.contains_key(&id) => {
                    out.relays.insert(id, l);
                }
                _ => out.skipped += 1,
            }
        }
        Ok(out)
    }

    /// Read and parse a file (the size is bounded before reading it all).
    pub fn load(path: &std::path::Path) -> Result<Self> {
        use std::io::Read as _;
        let f = std::fs::File::open(path).map_err(|e| DirError::io(path, e))?;
        let mut buf = Vec::new();
        let cap = u64::try_from(MAX_BWFILE_LEN).unwrap_or(u64::MAX) + 1;
        f.take(cap)
            .read_to_end(&mut buf)
            .map_err(|e| DirError::io(path, e))?;
        Self::parse(&buf)
    }

    /// The text form: timestamp, header (`version` first, then the others sorted), terminator,
    /// relay lines sorted by identity.
    pub fn to_text(&self) -> String {
        let mut s = format!("{}\nversion={BWFILE_VERSION}\n", self.timestamp);
        for (k, v) in &self.header {
            if k != "version" {
                let _ = writeln!(s, "{k}={v}");
            }
        }
        s.push_str(TERMINATOR);
        s.push('\n');
        for (id, l) in &self.relays {
            let _ = write!(s, "node_id=${} bw={}", id.to_hex(), l.bw);
            if let Some(n) = &l.nick {
                let _ = write!(s, " nick={n}");
            }
            let _ = writeln!(s, " measured_at={}", l.measured_at);
        }
        s
    }

    /// The measurements usable at `now`: none when the file is older than `max_age`
    /// seconds (or dated more than `max_age` in the future), otherwise every line measured
    /// within `max_age`, as kilobytes per second.
    pub fn fresh_measurements(&self, now: u64, max_age: u64) -> BTreeMap<RelayId, u32> {
        let fresh = |t: u64| now.saturating_sub(t) <= max_age && t.saturating_sub(now) <= max_age;
        if !fresh(self.timestamp) {
            return BTreeMap::new();
        }
        self.relays
            .iter()
            .filter(|(_, l)| fresh(l.measured_at))
            .map(|(id, l)| (*id, l.bw))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> RelayId {
        RelayId([n; 32])
    }

    fn sample() -> BandwidthFile {
        let mut f = BandwidthFile {
            timestamp: 1000,
            ..BandwidthFile::default()
        };
        f.header.insert("software".into(), "allium".into());
        f.relays.insert(
            id(2),
            BwLine {
                bw: 250,
                measured_at: 990,
                nick: Some("r2".into()),
            },
        );
        f.relays.insert(
            id(1),
            BwLine {
                bw: 0,
                measured_at: 1000,
                nick: None,
            },
        );
        f
    }

    #[test]
    fn byte_exact_round_trip() {
        let f = sample();
        let text = f.to_text();
        let expect = format!(
            "1000\nversion=1.0.0\nsoftware=allium\n=====\nnode_id=${} bw=0 measured_at=1000\nnode_id=${} bw=250 nick=r2 measured_at=990\n",
            "01".repeat(32),
            "02".repeat(32)
        );
        assert_eq!(text, expect);
        let mut back = BandwidthFile::parse(text.as_bytes()).expect("parse");
        assert_eq!(back.header.remove("version").as_deref(), Some("1.0.0"));
        assert_eq!(back, f);
    }

    #[test]
    fn staleness() {
        let f = sample();
        assert_eq!(f.fresh_measurements(1000, 100).len(), 2);
        // Line 2 measured at 990: too old for max age 5.
        let m = f.fresh_measurements(1000, 5);
        assert_eq!(m.len(), 1);
        assert_eq!(m.get(&id(1)), Some(&0));
        // The whole file too old, or dated in the future.
        assert!(f.fresh_measurements(2000, 100).is_empty());
        assert!(f.fresh_measurements(500, 100).is_empty());
    }

    #[test]
    fn hostile_input_rejected_or_skipped() {
        let h = "01".repeat(32);
        // Whole-file errors.
        for bad in [
            "".to_string(),
            "1000".to_string(),                        // no newline
            "abc\nversion=1.0.0\n=====\n".to_string(), // bad timestamp
            "-5\nversion=1.0.0\n=====\n".to_string(),  // signed
            "1000\nversion=1.0.0\n".to_string(),       // no terminator
            "1000\nsoftware=x\n=====\n".to_string(),   // no version
            "1000\nversion=2.0\n=====\n".to_string(),  // unsupported version
            "1000\nversion=1.0.0\nversion=1.0.0\n=====\n".to_string(), // repeated key
            "1000\nversion=1.0.0\nno equals\n=====\n".to_string(),
            format!("1000\nversion=1.0.0\nk={}\n=====\n", "x".repeat(2000)),
            "99999999999999999999999\nversion=1.0.0\n=====\n".to_string(), // overflow
        ] {
            assert!(BandwidthFile::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(BandwidthFile::parse(&[0xff, 0xfe, b'\n']).is_err());
        let big = vec![b'1'; MAX_BWFILE_LEN + 1];
        assert!(matches!(
            BandwidthFile::parse(&big),
            Err(DirError::TooLarge { .. })
        ));
        let mut header = "1000\nversion=1.0.0\n".to_string();
        for i in 0..=MAX_HEADER_LINES {
            header.push_str(&format!("k{i}=v\n"));
        }
        header.push_str("=====\n");
        assert!(BandwidthFile::parse(header.as_bytes()).is_err());

        // Relay-line errors are skipped, the rest kept.
        let text = format!(
            "1000\nversion=1.0.0\n=====\n\
             node_id=${h} bw=5\n\
             node_id=${h} bw=7\n\
             node_id={h} bw=1\n\
             node_id=$abcd bw=1\n\
             node_id=${g} bw=-1\n\
             node_id=${g} bw=1 bw=2\n\
             node_id=${g}\n\
             bw=9\n\
             garbage\n\
             node_id=${g}  bw=1\n\
             \n\
             node_id=${g} bw=99999999999 extra=ignored\n",
            g = "03".repeat(32)
        );
        let f = BandwidthFile::parse(text.as_bytes()).expect("parse");
        assert_eq!(f.relays.len(), 2);
        assert_eq!(
            f.relays.get(&id(1)).map(|l| l.bw),
            Some(5),
            "first line wins"
        );
        assert_eq!(
            f.relays.get(&id(3)).map(|l| l.bw),
            Some(u32::MAX),
            "clamped"
        );
        assert_eq!(f.skipped, 10);
    }

    #[test]
    fn relay_line_count_bounded() {
        let mut text = "1000\nversion=1.0.0\n=====\n".to_string();
        for i in 0..(MAX_RELAY_LINES + 10) {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i as u64).to_be_bytes());
            text.push_str(&format!("node_id=${} bw=1\n", hex::encode(b)));
        }
        let f = BandwidthFile::parse(text.as_bytes()).expect("parse");
        assert_eq!(f.relays.len(), MAX_RELAY_LINES);
        assert_eq!(f.skipped, 10);
    }
}
