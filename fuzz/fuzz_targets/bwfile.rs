//! The bandwidth file an authority reads (written by a scanner it does not control). Whatever
//! parses must write out as text that parses back to the same measurements: the scanner's writer
//! and the authority's reader agree on every file either accepts.
#![no_main]
use allium_directory::doc::bwfile::{BWFILE_VERSION, BandwidthFile, MAX_BWFILE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = BandwidthFile::parse(data) else {
        return;
    };
    assert!(data.len() <= MAX_BWFILE_LEN);
    assert!(f.header.get("version").is_some_and(|v| v.starts_with("1.")));
    let text = f.to_text();
    let back = match BandwidthFile::parse(text.as_bytes()) {
        Ok(b) => b,
        Err(e) => panic!("the text form of a parsed file does not parse: {e}"),
    };
    // The writer puts its own version and drops the skipped lines; everything else survives.
    let mut want = f.clone();
    want.header.insert("version".into(), BWFILE_VERSION.into());
    want.skipped = 0;
    assert_eq!(back, want);
    // Freshness is total over any clock and age (saturating arithmetic, no panic).
    let now = f.timestamp.wrapping_mul(31).wrapping_add(data.len() as u64);
    let fresh = f.fresh_measurements(now, now >> 3);
    assert!(fresh.len() <= f.relays.len());
});
