//! Document codecs and the client acceptance rule, without a network.

mod common;

use std::collections::BTreeMap;

use allium_crypto::{IdentityKeypair, RelayId};
use allium_directory::DirError;
use allium_directory::authority::compute::compute_consensus;
use allium_directory::doc::consensus::{CONSENSUS_METHOD, CONSENSUS_VERSION, DOMAIN_VOTE};
use allium_directory::doc::{
    AuthCert, Consensus, ConsensusEntry, ExitPolicy, Flags, PortRange, RelayDescriptor, Sig64,
    SigEntry, Signed, VerifiedCert, Vote, VoteEntry, issue_cert,
};
use common::Relay;

const NOW: u64 = 1_800_000_000;

struct Auth {
    id: IdentityKeypair,
    signing: IdentityKeypair,
    cert: VerifiedCert,
}

fn auth(valid_after: u64, expires: u64) -> Auth {
    let id = IdentityKeypair::generate();
    let signing = IdentityKeypair::generate();
    let cert = issue_cert(&id, &signing.public(), valid_after, expires)
        .expect("cert")
        .verify()
        .expect("verify");
    Auth { id, signing, cert }
}

fn consensus(va: u64) -> Consensus {
    let r = Relay::new(9000);
    let d = r.desc(va, true);
    Consensus {
        version: CONSENSUS_VERSION,
        method: CONSENSUS_METHOD,
        valid_after: va,
        fresh_until: va + 3600,
        valid_until: va + 3 * 3600,
        voters: vec![],
        params: BTreeMap::from([("circwindow".to_string(), 1000)]),
        relays: vec![ConsensusEntry {
            identity: d.identity,
            link_key: d.link_key,
            onion_key: d.onion_key,
            nickname: d.nickname,
            addrs: d.addrs,
            flags: Flags::RUNNING | Flags::VALID,
            weight: 100,
            exit: d.exit_policy,
            family: vec![],
            measured: false,
        }],
        shared_rand: None,
        bandwidth_weights: BTreeMap::new(),
    }
}

fn ids(a: &[&Auth]) -> Vec<RelayId> {
    a.iter().map(|x| x.id.public()).collect()
}

#[test]
fn descriptor_round_trip_and_one_byte_form() {
    let r = Relay::new(9001);
    let bytes = r.signed(NOW, true);
    let v = Signed::<RelayDescriptor>::from_bytes(&bytes)
        .expect("parse")
        .verify()
        .expect("verify");
    assert_eq!(v.desc(), &r.desc(NOW, true));
    assert_eq!(v.signed().to_bytes(), bytes);
    // Trailing byte: rejected.
    let mut t = bytes.clone();
    t.push(0);
    assert!(matches!(
        Signed::<RelayDescriptor>::from_bytes(&t),
        Err(DirError::Malformed { .. })
    ));
    // Too large: rejected before parsing.
    let big = vec![0u8; 8 * 1024 + 1];
    assert!(matches!(
        Signed::<RelayDescriptor>::from_bytes(&big),
        Err(DirError::TooLarge { .. })
    ));
    // Expired and future-dated.
    assert!(v.check_valid_at(NOW + 4 * 3600, 3600).is_err());
    assert!(v.check_valid_at(NOW - 7200, 3600).is_err());
    assert!(v.check_valid_at(NOW, 3600).is_ok());
}

#[test]
fn overlong_varint_in_body_is_rejected_after_signature() {
    // A cert body whose version is encoded as an overlong varint (0x81 0x00 == 1) still
    // decodes with postcard, but not in canonical form: signed or not, it is refused.
    let id = IdentityKeypair::generate();
    let sk = IdentityKeypair::generate();
    let mut body = vec![0x81, 0x00];
    body.extend_from_slice(id.public().as_bytes());
    body.extend_from_slice(sk.public().as_bytes());
    body.extend_from_slice(&[0x01, 0x02]);
    let mut s = Signed::<AuthCert>::from_body_unsigned(body);
    s.add_own_signature(&id);
    let err = Signed::<AuthCert>::from_bytes(&s.to_bytes())
        .expect("envelope is fine")
        .verify()
        .expect_err("body not canonical");
    assert!(matches!(err, DirError::Malformed { .. }), "{err}");
}

#[test]
fn duplicate_or_unsorted_signers_are_malformed() {
    let a = auth(NOW - 100, NOW + 86400);
    let s = Signed::sign(&consensus(NOW), &a.signing).expect("sign");
    let e = s.sigs()[0];
    #[derive(serde::Serialize)]
    struct Raw<'a> {
        body: &'a [u8],
        sigs: &'a [SigEntry],
    }
    let dup = postcard::to_allocvec(&Raw {
        body: s.body(),
        sigs: &[e, e],
    })
    .expect("enc");
    assert!(matches!(
        Signed::<Consensus>::from_bytes(&dup),
        Err(DirError::Malformed { .. })
    ));
}

#[test]
fn auth_cert_byte_layout_vector() {
    let id = IdentityKeypair::from_seed(&[1; 32]);
    let sk = IdentityKeypair::from_seed(&[2; 32]);
    let s = issue_cert(&id, &sk.public(), 300, 1_000_000).expect("cert");
    let mut expect = vec![0x01];
    expect.extend_from_slice(id.public().as_bytes());
    expect.extend_from_slice(sk.public().as_bytes());
    expect.extend_from_slice(&[0xac, 0x02]); // 300
    expect.extend_from_slice(&[0xc0, 0x84, 0x3d]); // 1_000_000
    assert_eq!(s.body(), &expect[..]);
    // Envelope: varint(body len) body varint(1) signer(32) sig(64).
    let env = s.to_bytes();
    assert_eq!(env[0] as usize, expect.len());
    assert_eq!(&env[1..1 + expect.len()], &expect[..]);
    assert_eq!(env[1 + expect.len()], 1);
    assert_eq!(
        &env[2 + expect.len()..34 + expect.len()],
        id.public().as_bytes()
    );
    assert_eq!(env.len(), 2 + expect.len() + 96);
}

#[test]
fn consensus_acceptance_rules() {
    let a = auth(NOW - 100, NOW + 86400);
    let b = auth(NOW - 100, NOW + 86400);
    let c = auth(NOW - 100, NOW + 86400);
    let all = ids(&[&a, &b, &c]);
    let certs = vec![a.cert.clone(), b.cert.clone(), c.cert.clone()];
    let doc = consensus(NOW - 60);

    let mut s = Signed::sign(&doc, &a.signing).expect("sign");
    // 1 of 3: rejected.
    let err = s.clone().verify(&all, &certs, NOW).expect_err("1 of 3");
    assert!(matches!(err, DirError::BadSignature { .. }));
    // 2 of 3: accepted.
    s.add_own_signature(&b.signing);
    let v = s.clone().verify(&all, &certs, NOW).expect("2 of 3");
    assert_eq!(v.signed_by().len(), 2);

    // Forged: flip a bit of b's signature -> only 1 valid.
    let mut forged = Signed::<Consensus>::from_body_unsigned(s.body().to_vec());
    forged.add_own_signature(&a.signing);
    let mut bad = *s
        .sigs()
        .iter()
        .find(|x| x.signer == b.signing.public())
        .expect("b");
    bad.sig.0[5] ^= 1;
    assert!(!forged.add_detached_signature(bad));
    // (a's signature by signer: `sigs()[0]` is b's whenever b's key sorts first, and an
    // envelope with b twice is refused at parsing, before the check meant here.)
    let a_sig = *s
        .sigs()
        .iter()
        .find(|x| x.signer == a.signing.public())
        .expect("a");
    let raw = forge_envelope(s.body(), &[a_sig, bad]);
    let parsed = Signed::<Consensus>::from_bytes(&raw).expect("parse");
    assert!(parsed.verify(&all, &certs, NOW).is_err());

    // Wrong domain: b signs the consensus body as a vote.
    let wrong = SigEntry {
        signer: b.signing.public(),
        sig: Sig64(b.signing.sign(DOMAIN_VOTE, s.body())),
    };
    let raw = forge_envelope(s.body(), &[a_sig, wrong]);
    let parsed = Signed::<Consensus>::from_bytes(&raw).expect("parse");
    assert!(parsed.verify(&all, &certs, NOW).is_err());

    // Signed by the identity key instead of the certified signing key: not counted.
    let raw = forge_envelope(
        s.body(),
        &[
            a_sig,
            SigEntry {
                signer: b.id.public(),
                sig: Sig64(b.id.sign("allium/v1/consensus", s.body())),
            },
        ],
    );
    assert!(
        Signed::<Consensus>::from_bytes(&raw)
            .expect("parse")
            .verify(&all, &certs, NOW)
            .is_err()
    );

    // Expired certificate for b: b's signature no longer counts.
    let b_old = {
        let cert = issue_cert(&b.id, &b.signing.public(), NOW - 86400, NOW - 10)
            .expect("cert")
            .verify()
            .expect("v");
        vec![a.cert.clone(), cert, c.cert.clone()]
    };
    assert!(s.clone().verify(&all, &b_old, NOW).is_err());

    // A certificate by an identity that is not configured does not help.
    let stranger = auth(NOW - 100, NOW + 86400);
    let mut s3 = s.clone();
    s3.add_own_signature(&stranger.signing);
    let mut certs_x = certs.clone();
    certs_x.push(stranger.cert.clone());
    let err = Signed::<Consensus>::from_bytes(&s3.to_bytes())
        .expect("p")
        .verify(
            &ids(&[&a, &b, &c]),
            &[a.cert.clone(), stranger.cert.clone()],
            NOW,
        )
        .expect_err("stranger does not count");
    assert!(matches!(err, DirError::BadSignature { .. }));

    // Stale, future-dated.
    let stale = Signed::sign(&consensus(NOW - 5 * 3600), &a.signing).map(|mut x| {
        x.add_own_signature(&b.signing);
        x
    });
    let err = stale
        .expect("s")
        .verify(&all, &certs, NOW)
        .expect_err("stale");
    assert!(matches!(err, DirError::NotValidNow { .. }), "{err}");
    let mut fut = Signed::sign(&consensus(NOW + 600), &a.signing).expect("s");
    fut.add_own_signature(&b.signing);
    let err = fut.clone().verify(&all, &certs, NOW).expect_err("future");
    assert!(matches!(err, DirError::NotValidNow { .. }), "{err}");
    // Within the 5 minute skew: accepted.
    let mut near = Signed::sign(&consensus(NOW + 200), &a.signing).expect("s");
    near.add_own_signature(&b.signing);
    let near = near.verify(&all, &certs, NOW).expect("skew tolerated");

    // Rollback.
    let err = v
        .check_newer_than(Some(&near))
        .expect_err("older than held");
    assert!(matches!(err, DirError::Rollback { .. }));
    near.check_newer_than(Some(&v)).expect("newer");
}

fn forge_envelope(body: &[u8], sigs: &[SigEntry]) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Raw<'a> {
        body: &'a [u8],
        sigs: &'a [SigEntry],
    }
    let mut sigs = sigs.to_vec();
    sigs.sort_by_key(|s| s.signer);
    let sigs = &sigs[..];
    postcard::to_allocvec(&Raw { body, sigs }).expect("enc")
}

fn vote_entry(r: &Relay, flags: Flags, weight: u32, published: u64) -> VoteEntry {
    let d = r.desc(published, false);
    VoteEntry {
        entry: ConsensusEntry {
            identity: d.identity,
            link_key: d.link_key,
            onion_key: d.onion_key,
            // Marks which descriptor an entry came from.
            nickname: format!("r{}", published % 100_000),
            addrs: d.addrs,
            flags,
            weight,
            exit: d.exit_policy,
            family: vec![],
            measured: true,
        },
        published,
        advertised: u32::MAX,
        desc_digest: [published as u8; 32],
    }
}

fn vote(by: &IdentityKeypair, mut relays: Vec<VoteEntry>, params: &[(&str, i32)]) -> Vote {
    relays.sort_by_key(|e| e.entry.identity);
    Vote {
        version: allium_directory::doc::consensus::VOTE_VERSION,
        authority: by.public(),
        valid_after: NOW,
        fresh_until: NOW + 3600,
        valid_until: NOW + 3 * 3600,
        published: NOW - 1000,
        params: params.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        shared_rand: None,
        relays,
    }
}

#[test]
fn consensus_computation_rules() {
    let auths: Vec<IdentityKeypair> = (0..5).map(|_| IdentityKeypair::generate()).collect();
    let r1 = Relay::new(9001);
    let r2 = Relay::new(9002);
    let r3 = Relay::new(9003);
    let rf = Flags::RUNNING | Flags::VALID;
    let mut r2_other = vote_entry(&r2, rf, 10, NOW - 10);
    r2_other.entry.onion_key = allium_crypto::X25519Secret::generate().public();
    let votes = [
        vote(
            &auths[0],
            vec![
                vote_entry(&r1, rf | Flags::FAST, 10, NOW - 50),
                vote_entry(&r2, rf, 10, NOW - 10),
                vote_entry(&r3, rf, 1, NOW - 10),
            ],
            &[("a", 1), ("b", 5)],
        ),
        vote(
            &auths[1],
            vec![
                vote_entry(&r1, rf | Flags::FAST, 30, NOW - 40),
                r2_other.clone(),
                vote_entry(&r3, rf, 1, NOW - 10),
            ],
            &[("a", 3), ("b", 5)],
        ),
        vote(
            &auths[2],
            vec![vote_entry(&r1, rf, 20, NOW - 60), r2_other.clone()],
            &[("a", 2)],
        ),
    ];
    let refs: Vec<&Vote> = votes.iter().collect();
    let c = compute_consensus(&refs, 5, NOW);
    // r1: 3 of 5 configured list it -> in; Fast by 2 of 3 voters; weight low median of 10,20,30.
    // r2: keys split 1 vs 2 -> neither has > 5/2 -> out. r3: 2 of 5 -> out.
    assert_eq!(c.relays.len(), 1);
    let e = &c.relays[0];
    assert_eq!(e.identity, r1.id.public());
    assert!(e.flags.contains(Flags::FAST));
    assert_eq!(e.weight, 20);
    // Newest descriptor (published NOW-40) supplies the descriptor fields.
    assert_eq!(e.nickname, format!("r{}", (NOW - 40) % 100_000));
    // Params: "a" voted by 3 of 5 -> low median of 1,2,3 = 2; "b" by 2 of 5 -> dropped.
    assert_eq!(c.params, BTreeMap::from([("a".to_string(), 2)]));
    let mut voters: Vec<RelayId> = auths[..3].iter().map(|a| a.public()).collect();
    voters.sort();
    assert_eq!(c.voters, voters);
    // Deterministic: vote order does not matter.
    let rev: Vec<&Vote> = votes.iter().rev().collect();
    assert_eq!(
        postcard::to_allocvec(&compute_consensus(&rev, 5, NOW)).expect("e"),
        postcard::to_allocvec(&c).expect("e")
    );
    // A relay that is not Running by majority is dropped.
    let votes2 = [
        vote(&auths[0], vec![vote_entry(&r1, Flags::VALID, 1, NOW)], &[]),
        vote(&auths[1], vec![vote_entry(&r1, Flags::VALID, 1, NOW)], &[]),
    ];
    let refs2: Vec<&Vote> = votes2.iter().collect();
    assert!(compute_consensus(&refs2, 3, NOW).relays.is_empty());
}

#[test]
fn exit_policy_normal_form() {
    let p = ExitPolicy::from_ranges(
        [
            PortRange { lo: 443, hi: 443 },
            PortRange { lo: 80, hi: 81 },
            PortRange { lo: 82, hi: 90 },
            PortRange { lo: 0, hi: 5 },
        ],
        false,
    );
    assert_eq!(
        p.accept,
        vec![PortRange { lo: 80, hi: 90 }, PortRange { lo: 443, hi: 443 }]
    );
    assert!(p.allows_port(85) && p.allows_port(443) && !p.allows_port(22));
    assert_eq!(p.to_string(), "accept 80-90,443");
    // An unsorted policy in a descriptor is refused.
    let r = Relay::new(9005);
    let mut d = r.desc(NOW, false);
    d.exit_policy.accept = vec![PortRange { lo: 443, hi: 443 }, PortRange { lo: 80, hi: 80 }];
    assert!(Signed::sign(&d, &r.id).is_err());
}

#[test]
fn example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../authority.example.toml");
    let cfg = allium_directory::authority::AuthorityConfig::load(&path).expect("example loads");
    assert_eq!(cfg.voting_interval_secs, 3600);
    assert_eq!(cfg.authorities.len(), 3);
    assert!(!cfg.allow_private_addresses);
    assert_eq!(
        cfg.flags,
        allium_directory::authority::FlagThresholds::default()
    );
    // Unknown keys are refused with a message naming them.
    let err = allium_directory::authority::AuthorityConfig::from_toml(
        "data_dir = \"/x\"\nlisten = \"127.0.0.1:1\"\nauthorities = []\nbogus = 1\n",
    )
    .expect_err("unknown key");
    assert!(err.to_string().contains("bogus"), "{err}");
    assert!(
        matches!(err, allium_directory::DirError::ConfigParse { .. }),
        "{err:?}"
    );
}

#[test]
fn config_file_errors_name_the_file_and_keep_their_cause() {
    let d = tempfile::tempdir().expect("tmp");
    let path = d.path().join("authority.toml");
    // Parses, but lists no authority: a validation error, wrapped with the file name.
    std::fs::write(
        &path,
        "data_dir = \"/x\"\nlisten = \"127.0.0.1:1\"\nauthorities = []\n",
    )
    .expect("write");
    let err = allium_directory::authority::AuthorityConfig::load(&path).expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains("authority.toml"), "{text}");
    assert!(text.contains("[[authorities]]"), "{text}");
    let cause = std::error::Error::source(&err).expect("the cause is kept");
    assert!(cause.to_string().contains("[[authorities]]"), "{cause}");
    // An identity that is not hex: the TOML error, wrapped with the file name.
    std::fs::write(
        &path,
        "data_dir = \"/x\"\nlisten = \"127.0.0.1:1\"\n[[authorities]]\n\
         identity = \"xyz\"\ndir_addr = \"127.0.0.1:2\"\n",
    )
    .expect("write");
    let err = allium_directory::authority::AuthorityConfig::load(&path).expect_err("bad id");
    assert!(err.to_string().contains("64 hex digits"), "{err}");
    match &err {
        allium_directory::DirError::ConfigFile { source, .. } => assert!(
            matches!(**source, allium_directory::DirError::ConfigParse { .. }),
            "{err:?}"
        ),
        other => panic!("not a file error: {other:?}"),
    }
    // The TOML error itself is reachable through the source chain.
    let mut cause = std::error::Error::source(&err);
    let mut found = false;
    while let Some(c) = cause {
        found |= c.downcast_ref::<toml::de::Error>().is_some();
        cause = c.source();
    }
    assert!(found, "{err:?}");
}
