//! Every decoder gets arbitrary and mutated input: no panics, and anything accepted is in its
//! one canonical byte form.

mod common;

use allium_crypto::IdentityKeypair;
use allium_directory::AuthorityInfo;
use allium_directory::client::{inflate_bounded, parse_cert_list, verify_consensus_bytes};
use allium_directory::doc::{AuthCert, Consensus, RelayDescriptor, Signed, Vote};
use proptest::prelude::*;

fn all_decoders(bytes: &[u8]) {
    if let Ok(s) = Signed::<RelayDescriptor>::from_bytes(bytes) {
        assert_eq!(s.to_bytes(), bytes);
        let _ = s.dangerously_decode_unverified();
        let _ = s.verify();
    }
    if let Ok(s) = Signed::<AuthCert>::from_bytes(bytes) {
        assert_eq!(s.to_bytes(), bytes);
        let _ = s.verify();
    }
    if let Ok(s) = Signed::<Vote>::from_bytes(bytes) {
        assert_eq!(s.to_bytes(), bytes);
        let _ = s.dangerously_decode_unverified();
    }
    if let Ok(s) = Signed::<Consensus>::from_bytes(bytes) {
        assert_eq!(s.to_bytes(), bytes);
        let _ = s.dangerously_decode_unverified();
        let _ = s.verify(&[], &[], 0);
    }
    let _ = parse_cert_list(bytes, &[]);
    let _ = inflate_bounded(bytes, 1 << 16);
    let auth = [AuthorityInfo {
        identity: allium_crypto::RelayId([1; 32]),
        dir_addr: "127.0.0.1:1".parse().expect("addr"),
    }];
    let _ = verify_consensus_bytes(bytes, bytes, &auth, 0);
    bandwidth_file(bytes);
}

/// The bandwidth-file parser: never panics; what it accepts writes back to text that parses to
/// the same measurements.
fn bandwidth_file(bytes: &[u8]) {
    if let Ok(f) = allium_directory::doc::BandwidthFile::parse(bytes) {
        let again = allium_directory::doc::BandwidthFile::parse(f.to_text().as_bytes())
            .expect("written form parses");
        assert_eq!(again.relays, f.relays);
        assert_eq!(again.timestamp, f.timestamp);
    }
}

fn sample_descriptor() -> Vec<u8> {
    common::Relay::new(9000).signed(1_800_000_000, true)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        all_decoders(&bytes);
    }

    #[test]
    fn mutated_bandwidth_file(idx in any::<prop::sample::Index>(), val in any::<u8>(),
                              cut in any::<prop::sample::Index>()) {
        let good = format!(
            "1800000000\nversion=1.0.0\nsoftware=x\n=====\nnode_id=${} bw=250 nick=r1 measured_at=1799999990\nnode_id=${} bw=7\n",
            "ab".repeat(32), "cd".repeat(32)
        ).into_bytes();
        let parsed = allium_directory::doc::BandwidthFile::parse(&good).expect("sample parses");
        prop_assert_eq!(parsed.relays.len(), 2);
        let mut m = good.clone();
        let i = idx.index(m.len());
        m[i] = val;
        bandwidth_file(&m);
        bandwidth_file(&good[..cut.index(good.len())]);
    }

    #[test]
    fn mutated_descriptor(idx in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let good = sample_descriptor();
        let mut m = good.clone();
        let i = idx.index(m.len());
        m[i] = val;
        all_decoders(&m);
        // A mutated descriptor never verifies unless the mutation was a no-op.
        if m != good {
            let ok = Signed::<RelayDescriptor>::from_bytes(&m).ok().and_then(|s| s.verify().ok());
            prop_assert!(ok.is_none());
        }
        let truncated = &good[..cut.index(good.len())];
        all_decoders(truncated);
        prop_assert!(Signed::<RelayDescriptor>::from_bytes(truncated).ok().and_then(|s| s.verify().ok()).is_none());
    }

    #[test]
    fn descriptor_round_trip(nick in "[a-zA-Z0-9]{1,19}", bw in any::<u64>(), contact in ".{0,60}",
                             published in 0u64..1u64 << 40, life in 1u64..600_000,
                             port in 1u16.., lo in 1u16.., span in 0u16..100, allow in any::<bool>()) {
        let r = common::Relay::new(port);
        let mut d = r.desc(published, false);
        d.nickname = nick;
        d.bandwidth_observed = bw;
        d.contact = contact;
        d.expires = published + life;
        d.exit_policy = allium_directory::doc::ExitPolicy::from_ranges(
            [allium_directory::doc::PortRange { lo, hi: lo.saturating_add(span) }], allow);
        let s = Signed::sign(&d, &r.id).expect("sign");
        let bytes = s.to_bytes();
        let v = Signed::<RelayDescriptor>::from_bytes(&bytes).expect("parse").verify().expect("verify");
        prop_assert_eq!(v.desc(), &d);
    }
}

#[test]
fn signed_by_other_key_never_verifies() {
    let r = common::Relay::new(9000);
    let other = IdentityKeypair::generate();
    let s = Signed::sign(&r.desc(1_800_000_000, false), &other).expect("sign");
    assert!(
        Signed::<RelayDescriptor>::from_bytes(&s.to_bytes())
            .expect("p")
            .verify()
            .is_err()
    );
}
