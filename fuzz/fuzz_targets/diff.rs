//! Directory-cache bytes: consensus diffs (apply and compute), the cache's request parser and
//! the client's response parsers. The first byte picks what the rest feeds.
#![no_main]
use allium_directory::dircache::{
    self, ArchiveConfig, DirArchive, consensus_digest, diff, parse_certs_response,
    parse_consensus_response, parse_request, request_head_complete, response_complete,
};
use libfuzzer_sys::fuzz_target;

/// `[len u16] base diff`: the base is the first `len` bytes (or all of them).
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((len, rest)) = data.split_first_chunk::<2>() else {
        return (&[], data);
    };
    rest.split_at((u16::from_be_bytes(*len) as usize).min(rest.len()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        // A diff as sent: anything it produces has the digest it names.
        0 => {
            let (base, d) = split(rest);
            if let Ok(out) = diff::apply(base, d) {
                let (from, to) = diff::digests(d).expect("applied, so it has a header");
                assert_eq!(from, consensus_digest(base));
                assert_eq!(to, consensus_digest(&out));
            }
        }
        // The same with the base digest fixed up, so the op parser is reached: the result,
        // if any, still matches the target digest.
        1 => {
            let (base, d) = split(rest);
            let mut d = d.to_vec();
            if let Some(slot) = d.get_mut(4..36) {
                slot.copy_from_slice(&consensus_digest(base));
            }
            if let Ok(out) = diff::apply(base, &d) {
                assert_eq!(diff::digests(&d).expect("header").1, consensus_digest(&out));
            }
        }
        // compute then apply gives the target back, for any two inputs.
        2 => {
            let (base, target) = split(rest);
            let d = diff::compute(base, target).expect("small inputs");
            assert_eq!(diff::apply(base, &d).expect("own diff applies"), target);
        }
        // Requests (at a cache) and responses (at a client).
        _ => {
            if let Ok(req) = parse_request(rest) {
                assert_eq!(dircache::encode_request(&req), rest);
            }
            let _ = request_head_complete(rest);
            let resp = DirArchive::new(ArchiveConfig::default()).respond(rest, 0);
            assert_eq!(response_complete(&resp).ok().flatten(), Some(resp.len()));
            if let Ok(Some(n)) = response_complete(rest) {
                assert!(n <= rest.len());
            }
            let _ = parse_consensus_response(rest, Some(b"held"));
            let _ = parse_certs_response(rest);
        }
    }
});
