//! Operator-facing rules of the directory client: Tor's 24-hour use of an expired consensus (in a
//! running cache and in a fresh one, with injected time), reading an authority's own `consensus`
//! file back, and naming a wrongly configured authority identity.

// Authorities on loopback sockets: bounded real-time waits.
#![allow(clippy::disallowed_methods)]

mod common;

use std::collections::BTreeMap;

use allium_crypto::{IdentityKeypair, RelayId};
use allium_directory::authority::run_round;
use allium_directory::client::{
    self, ConsensusCache, FetchRole, Liveness, REASONABLY_LIVE_SECS, cache,
};
use allium_directory::doc::consensus::{CONSENSUS_METHOD, CONSENSUS_VERSION};
use allium_directory::doc::{Consensus, Signed, issue_cert};
use allium_directory::{AuthorityInfo, DirError, fetch_consensus, now_unix};
use common::Net;

const VA: u64 = 1_800_000_000;
const VU: u64 = VA + 3 * 3600;

/// A consensus signed by two authorities, its certificate list, and the authorities' infos.
fn signed_pair() -> (Vec<u8>, Vec<u8>, Vec<AuthorityInfo>) {
    let mut certs = Vec::new();
    let mut infos = Vec::new();
    let mut signing = Vec::new();
    for port in [7001u16, 7002] {
        let id = IdentityKeypair::generate();
        let s = IdentityKeypair::generate();
        certs.push(issue_cert(&id, &s.public(), VA - 86400, VA + 90 * 86400).expect("cert"));
        infos.push(AuthorityInfo {
            identity: id.public(),
            dir_addr: ([127, 0, 0, 1], port).into(),
        });
        signing.push(s);
    }
    let c = Consensus {
        version: CONSENSUS_VERSION,
        method: CONSENSUS_METHOD,
        valid_after: VA,
        fresh_until: VA + 3600,
        valid_until: VU,
        voters: vec![],
        params: BTreeMap::new(),
        relays: vec![],
        shared_rand: None,
        bandwidth_weights: BTreeMap::new(),
    };
    let mut s = Signed::sign(&c, &signing[0]).expect("sign");
    s.add_own_signature(&signing[1]);
    (s.to_bytes(), client::encode_cert_list(&certs), infos)
}

#[test]
fn liveness_follows_tors_rule() {
    let (c, certs, infos) = signed_pair();
    let v = client::verify_consensus_bytes(&c, &certs, &infos, VA + 10)
        .expect("live")
        .verified;
    let cons = v.consensus();
    assert_eq!(Liveness::of(cons, VA + 10), Liveness::Live);
    assert_eq!(Liveness::of(cons, VU + 300), Liveness::Live, "clock skew");
    let expired = Liveness::of(cons, VU + 3600);
    assert_eq!(
        expired,
        Liveness::Expired {
            expired_at: VU,
            usable_until: VU + REASONABLY_LIVE_SECS
        }
    );
    let w = expired.warning().expect("a warning");
    assert!(
        w.contains("consensus expired at 2027-01-15T11:00:00Z")
            && w.contains("using it until 2027-01-16T11:00:00Z")
            && w.contains("majority of authorities"),
        "{w}"
    );
    assert!(Liveness::of(cons, VU + REASONABLY_LIVE_SECS).usable());
    assert_eq!(
        Liveness::of(cons, VU + REASONABLY_LIVE_SECS + 1),
        Liveness::TooOld { expired_at: VU }
    );
    assert_eq!(Liveness::of(cons, VA - 301), Liveness::NotYetValid);
    assert!(Liveness::Live.warning().is_none());
}

#[test]
fn expired_consensus_used_for_24_hours_then_refused_running_and_fresh() {
    let (c, certs, infos) = signed_pair();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("consensus.cache");

    // The running side: a cache that fetched it while it was live.
    let mut running = ConsensusCache::open(Some(&path), infos.clone(), FetchRole::Client, VA);
    running.offer(&c, &certs, VA + 10).expect("offer");
    assert!(
        running.netdir(VU + 3600).is_some(),
        "used after valid-until"
    );
    assert!(matches!(
        running.liveness(VU + 3600),
        Some(Liveness::Expired { .. })
    ));
    assert!(running.netdir(VU + REASONABLY_LIVE_SECS).is_some());
    assert!(
        running.netdir(VU + REASONABLY_LIVE_SECS + 1).is_none(),
        "refused after 24 h"
    );
    assert!(matches!(
        running.liveness(VU + REASONABLY_LIVE_SECS + 1),
        Some(Liveness::TooOld { .. })
    ));

    // The fresh side: a client starting with that file, or fetching the same bytes.
    let fresh = ConsensusCache::open(Some(&path), infos.clone(), FetchRole::Client, VU + 3600);
    assert!(fresh.current().is_some() && fresh.netdir(VU + 3600).is_some());
    client::verify_consensus_bytes(&c, &certs, &infos, VU + 3600).expect("fetched, expired");
    let fresh = ConsensusCache::open(
        Some(&path),
        infos.clone(),
        FetchRole::Client,
        VU + REASONABLY_LIVE_SECS + 1,
    );
    assert!(fresh.current().is_none());
    let err = client::verify_consensus_bytes(&c, &certs, &infos, VU + REASONABLY_LIVE_SECS + 1)
        .expect_err("too old");
    assert!(
        matches!(err, DirError::NotValidNow { .. }) && err.to_string().contains("24 hours"),
        "{err}"
    );
}

#[test]
fn rollback_message_only_for_an_older_consensus() {
    let same = DirError::Rollback { got: VA, held: VA };
    assert!(!same.to_string().contains("rolled back"), "{same}");
    assert!(same.to_string().contains("no newer consensus yet"));
    let older = DirError::Rollback {
        got: VA - 3600,
        held: VA,
    };
    assert!(older.to_string().contains("rolled back"), "{older}");
}

#[test]
fn missing_signers_are_named_with_their_address() {
    let (c, certs, mut infos) = signed_pair();
    let wrong = IdentityKeypair::generate().public();
    let right = infos[1].identity;
    infos[1].identity = wrong;
    let err = client::verify_consensus_bytes(&c, &certs, &infos, VA + 10).expect_err("1 of 2");
    let text = err.to_string();
    assert!(matches!(err, DirError::Config(_)), "{text}");
    let short: String = wrong.to_hex().chars().take(16).collect();
    assert!(
        text.contains(&format!("authority {short} at 127.0.0.1:7002")),
        "{text}"
    );
    assert!(text.contains(&right.to_hex()), "names the stranger: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_files_read_back_and_wrong_identity_is_named() {
    let net = Net::start(3).await;
    let va = Net::current_va();
    run_round(&net.live(), va).await.expect("round");
    let published = net.live()[0].current_consensus().expect("published");

    // The authority's own `consensus` file reads back (with the certificates beside it).
    let file = net.dirs[0].path().join("consensus");
    let (c, certs) = cache::dangerously_read_cache_file(&file).expect("read back");
    assert_eq!(c, published.to_bytes());
    let v = client::verify_consensus_bytes(&c, &certs, &net.infos, now_unix()).expect("verifies");
    assert_eq!(v.verified.signed().body(), published.body());

    // Two of three identities wrong: the fetch fails and names both authorities by address.
    let mut infos = net.infos.clone();
    for i in [1, 2] {
        infos[i].identity = RelayId([0x5a + i as u8; 32]);
    }
    let err = fetch_consensus(&infos, now_unix())
        .await
        .expect_err("minority");
    let text = err.to_string();
    assert!(matches!(err, DirError::Config(_)), "{text}");
    for i in [1, 2] {
        assert!(
            text.contains(&format!(
                "the authority at {} has identity {}",
                net.infos[i].dir_addr,
                net.infos[i].identity.to_hex()
            )),
            "{text}"
        );
    }
    assert!(!text.contains(&net.infos[0].dir_addr.to_string()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_first_period_the_reply_says_when() {
    let net = Net::start(1).await;
    let err = fetch_consensus(&net.infos, now_unix())
        .await
        .expect_err("nothing published");
    let why = client::not_published_yet(&err).expect("recognised");
    assert!(why.contains("the next voting period ends at"), "{why}");

    // A lone authority's file verifies with its own certificate (from `keys/`).
    run_round(&net.live(), Net::current_va())
        .await
        .expect("round");
    let (c, certs) = cache::dangerously_read_cache_file(&net.dirs[0].path().join("consensus"))
        .expect("read back");
    client::verify_consensus_bytes(&c, &certs, &net.infos, now_unix()).expect("verifies");
}
