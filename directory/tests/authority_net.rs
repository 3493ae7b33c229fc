//! In-process networks of authorities on 127.0.0.1: voting, signatures, client acceptance,
//! uploads, restarts.

// Authorities on loopback sockets: bounded real-time waits.
#![allow(clippy::disallowed_methods)]

mod common;

use allium_directory::authority::run_round;
use allium_directory::client::{self, ConsensusCache, FetchRole, http};
use allium_directory::doc::{Flags, Signed};
use allium_directory::{DirError, NetDir, fetch_consensus, now_unix, paths, upload_descriptor};
use common::{Net, Relay};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn upload_all(net: &Net, relays: &[Relay], published: u64) {
    for (i, r) in relays.iter().enumerate() {
        let bytes = r.signed(published, i % 2 == 0);
        let (ok, errs) = client::upload_descriptor_to_all(&net.infos, &bytes).await;
        assert_eq!(ok, net.live().len(), "upload errors: {errs:?}");
    }
}

/// The certificate list served by the first authority.
async fn fetch_certs(net: &Net) -> Vec<u8> {
    http::request(
        net.infos[0].dir_addr,
        "GET",
        paths::CERTS,
        None,
        client::MAX_CERTS_LEN,
        http::DEFAULT_TIMEOUT,
    )
    .await
    .expect("certs")
    .into_ok("certs")
    .expect("ok")
}

fn relays(n: u16) -> Vec<Relay> {
    (0..n).map(|i| Relay::new(9000 + i)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_authorities_agree_and_clients_accept() {
    let net = Net::start(3).await;
    let rs = relays(5);
    upload_all(&net, &rs, now_unix()).await;
    let va = Net::current_va();
    run_round(&net.live(), va).await.expect("round");

    let docs: Vec<_> = net
        .live()
        .iter()
        .map(|h| h.current_consensus().expect("published"))
        .collect();
    let first = docs[0].to_bytes();
    for d in &docs {
        assert_eq!(
            d.body(),
            docs[0].body(),
            "bodies differ between authorities"
        );
        assert_eq!(d.sigs().len(), 3);
        assert_eq!(d.to_bytes(), first);
    }

    let v = fetch_consensus(&net.infos, now_unix())
        .await
        .expect("fetch");
    assert_eq!(v.signed_by().len(), 3);
    let nd = NetDir::new(v);
    assert_eq!(nd.relays().len(), 5);
    assert_eq!(nd.valid_after(), va);
    for (i, r) in rs.iter().enumerate() {
        let e = nd.by_id(&r.id.public()).expect("listed");
        assert!(e.has(Flags::RUNNING | Flags::VALID | Flags::FAST | Flags::STABLE | Flags::GUARD));
        assert_eq!(e.has(Flags::EXIT), i % 2 == 0);
        assert_eq!(
            nd.by_link_key(&r.link.public()).map(|e| e.identity),
            Some(r.id.public())
        );
    }
    assert_eq!(nd.exits_for_port(443).count(), 3);
    assert_eq!(nd.param("enforce_distinct_subnets", 1), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_authority_down_still_gives_two_of_three() {
    let mut net = Net::start(3).await;
    let rs = relays(5);
    net.stop(2).await;
    upload_all(&net, &rs, now_unix()).await;
    let va = Net::current_va();
    // Errors about the dead peer are logged, not fatal.
    run_round(&net.live(), va).await.expect("round");
    for h in net.live() {
        let c = h.current_consensus().expect("published");
        assert_eq!(c.sigs().len(), 2);
    }
    let v = fetch_consensus(&net.infos, now_unix())
        .await
        .expect("fetch");
    assert_eq!(v.signed_by().len(), 2);
    assert_eq!(v.consensus().relays.len(), 5);
    assert_eq!(v.consensus().voters.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_signatures_rejected_and_relay_down_dropped() {
    let net = Net::start(3).await;
    let rs = relays(3);
    upload_all(&net, &rs, now_unix()).await;
    net.reach.set_down(rs[0].id.public(), true);
    let va = Net::current_va();
    run_round(&net.live(), va).await.expect("round");
    let full = net.live()[0].current_consensus().expect("published");
    assert_eq!(
        full.dangerously_decode_unverified()
            .expect("decode")
            .relays
            .len(),
        2
    );

    // Keep only one signature.
    let mut one =
        Signed::<allium_directory::doc::Consensus>::from_body_unsigned(full.body().to_vec());
    assert!(one.add_detached_signature(full.sigs()[0]));
    let certs = fetch_certs(&net).await;
    let now = now_unix();
    let err = client::verify_consensus_bytes(&one.to_bytes(), &certs, &net.infos, now)
        .expect_err("1 of 3 must be rejected");
    assert!(matches!(err, DirError::BadSignature { .. }), "{err}");
    // The full one verifies with the same certificates.
    client::verify_consensus_bytes(&full.to_bytes(), &certs, &net.infos, now).expect("3 of 3");
    // Adding the same signature again does not add an entry (identities are counted, not
    // signatures; duplicate entries on the wire are malformed).
    let mut dup = one.clone();
    assert!(dup.add_detached_signature(full.sigs()[0]));
    assert_eq!(dup.sigs().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_older_descriptor_is_ignored() {
    let net = Net::start(1).await;
    let r = Relay::new(9100);
    let addr = net.infos[0].dir_addr;
    let now = now_unix();
    upload_descriptor(addr, &r.signed(now, false))
        .await
        .expect("first");
    let err = upload_descriptor(addr, &r.signed(now - 10, false))
        .await
        .expect_err("older must be refused");
    assert!(
        matches!(err, DirError::HttpStatus { status: 409, .. }),
        "{err}"
    );
    // Exact replay is refused too.
    upload_descriptor(addr, &r.signed(now, false))
        .await
        .expect_err("replay must be refused");
    // Nothing changed: the authority still serves the first descriptor.
    let b = http::request(
        addr,
        "GET",
        paths::DESCRIPTORS,
        None,
        1 << 20,
        http::DEFAULT_TIMEOUT,
    )
    .await
    .expect("get")
    .into_ok("descriptors")
    .expect("ok");
    let list: Vec<Vec<u8>> = postcard::from_bytes(&b).expect("list");
    assert_eq!(list, vec![r.signed(now, false)]);
    // A newer one replaces it.
    upload_descriptor(addr, &r.signed(now + 1, false))
        .await
        .expect("newer");
}

async fn raw_post(addr: std::net::SocketAddr, head: &str, body: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("head");
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_uploads_are_refused() {
    let net = Net::start(1).await;
    let h = net.live()[0];
    let addr = h.dir_addr();
    // A huge declared length is refused before any body byte is read.
    let resp = raw_post(
        addr,
        &format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1000000000\r\n\r\n",
            paths::DESCRIPTOR
        ),
        b"",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    // A chunked body that grows past 8 KiB is cut off at the cap.
    let chunk = vec![b'a'; 4096];
    let mut body = Vec::new();
    for _ in 0..4 {
        body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(&chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let resp = raw_post(
        addr,
        &format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
            paths::DESCRIPTOR
        ),
        &body,
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    // Garbage: 400 with one line of reason, nothing stored.
    let err = upload_descriptor(addr, b"\x01\x02garbage")
        .await
        .expect_err("garbage");
    match &err {
        DirError::HttpStatus { status, reason, .. } => {
            assert_eq!(*status, 400);
            assert!(reason.contains("malformed"), "{reason}");
        }
        e => panic!("unexpected {e}"),
    }
    let r = http::request(
        addr,
        "POST",
        paths::DESCRIPTOR,
        Some(b"\x01\x02garbage"),
        4096,
        http::DEFAULT_TIMEOUT,
    )
    .await
    .expect("req");
    let text = String::from_utf8(r.body).expect("utf8");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.ends_with('\n'));
    // A descriptor signed by another key than its identity.
    let r1 = Relay::new(9200);
    let r2 = Relay::new(9201);
    let forged = Signed::sign(&r1.desc(now_unix(), false), &r2.id)
        .expect("sign")
        .to_bytes();
    let err = upload_descriptor(addr, &forged).await.expect_err("forged");
    assert!(
        matches!(err, DirError::HttpStatus { status: 403, .. }),
        "{err}"
    );
    // Future-dated by more than an hour.
    let err = upload_descriptor(addr, &r1.signed(now_unix() + 7200, false))
        .await
        .expect_err("future");
    assert!(
        matches!(err, DirError::HttpStatus { status: 400, .. }),
        "{err}"
    );
    assert_eq!(h.descriptor_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_refused_unless_allowed() {
    use allium_directory::authority::{self, AuthorityConfig, StartOptions};
    let d = tempfile::tempdir().expect("tmp");
    let (_id, keys) = authority::keys::generate_for_test(d.path(), now_unix()).expect("keys");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let infos = vec![allium_directory::AuthorityInfo {
        identity: keys.identity(),
        dir_addr: addr,
    }];
    let cfg = AuthorityConfig::new(d.path().to_path_buf(), addr, infos);
    let h = authority::start_with(
        cfg,
        StartOptions {
            listener: Some(l),
            reachability: std::sync::Arc::new(authority::FakeReachability::all_up()),
            schedule: false,
        },
    )
    .await
    .expect("start");
    let err = upload_descriptor(addr, &Relay::new(9300).signed(now_unix(), false))
        .await
        .expect_err("loopback relay on a public network");
    assert!(err.to_string().contains("private"), "{err}");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_authority_rejoins_and_cache_protects_against_rollback() {
    let mut net = Net::start(3).await;
    let rs = relays(4);
    upload_all(&net, &rs, now_unix()).await;
    // Votes are accepted only for the current and the next period: round 1 is the current
    // period, round 2 the next.
    let va = Net::current_va();
    run_round(&net.live(), va).await.expect("round 1");

    let cache_dir = tempfile::tempdir().expect("tmp");
    let cache_path = cache_dir.path().join("consensus");
    let now = now_unix();
    let mut cache =
        ConsensusCache::open(Some(&cache_path), net.infos.clone(), FetchRole::Client, now);
    assert!(cache.needs_fetch(now));
    cache.refresh(now).await.expect("fetch 1");
    let old_bytes = cache.current().expect("held").signed().to_bytes();
    assert!(cache.next_fetch_at() >= cache.current().expect("held").consensus().fresh_until);

    // Restart authority 2: it reloads descriptors and its consensus, then joins the next round.
    net.stop(2).await;
    net.restart(2).await;
    let h2 = net.handles[2].as_ref().expect("restarted");
    assert_eq!(h2.descriptor_count(), 4);
    assert!(h2.current_consensus().is_some());
    // It remembers its vote for the current period and does not sign a second one.
    h2.vote_phase(va).await.expect("re-vote is a no-op");
    let va = va + common::INTERVAL;
    run_round(&net.live(), va).await.expect("round 2");
    for h in net.live() {
        assert_eq!(h.current_consensus().expect("c").sigs().len(), 3);
    }
    cache.refresh(now_unix()).await.expect("fetch 2");
    assert_eq!(cache.current().expect("held").consensus().valid_after, va);

    // Offering the older one again is a rollback.
    let certs = allium_directory::client::encode_cert_list(&[]);
    let err = cache
        .offer(&old_bytes, &certs, now_unix())
        .expect_err("rollback");
    // (no certificates: signature check fails first); with certificates it is a rollback:
    assert!(matches!(err, DirError::BadSignature { .. }), "{err}");
    let certs = fetch_certs(&net).await;
    let err = cache
        .offer(&old_bytes, &certs, now_unix())
        .expect_err("rollback");
    assert!(matches!(err, DirError::Rollback { .. }), "{err}");

    // A new cache on the same file reuses the cached consensus at start.
    let again = ConsensusCache::open(
        Some(&cache_path),
        net.infos.clone(),
        FetchRole::Client,
        now_unix(),
    );
    assert_eq!(again.current().expect("cached").consensus().valid_after, va);
    assert!(again.netdir(now_unix()).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_votes_and_signatures_change_nothing() {
    use allium_directory::doc::Vote;
    let net = Net::start(3).await;
    let rs = relays(2);
    upload_all(&net, &rs, now_unix()).await;
    let va = Net::current_va();
    run_round(&net.live(), va).await.expect("round");
    let before = net.live()[0].current_consensus().expect("c").to_bytes();
    let addr = net.infos[0].dir_addr;
    let post = |path: &'static str, body: Vec<u8>| async move {
        http::request(addr, "POST", path, Some(&body), 4096, http::DEFAULT_TIMEOUT)
            .await
            .expect("request")
    };
    // Garbage.
    assert_eq!(post(paths::VOTE, b"junk".to_vec()).await.status, 400);
    assert_eq!(post(paths::SIGNATURE, b"junk".to_vec()).await.status, 400);
    // A well-formed vote by a key that is not a certified authority signing key.
    let stranger = allium_crypto::IdentityKeypair::generate();
    let v = Vote {
        version: 1,
        authority: stranger.public(),
        valid_after: va + common::INTERVAL,
        fresh_until: va + 2 * common::INTERVAL,
        valid_until: va + 4 * common::INTERVAL,
        published: now_unix(),
        params: Default::default(),
        shared_rand: None,
        relays: vec![],
    };
    // (Counted as a vote by an unknown authority; pushes that arrived before the certificates
    // were exchanged were counted the same way.)
    let unknown = allium_directory::authority::limits::Limit::VoteUnknownAuthority;
    let unknown_before = net.live()[0].limit_count(unknown);
    let r = post(
        paths::VOTE,
        Signed::sign(&v, &stranger).expect("s").to_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(net.live()[0].limit_count(unknown), unknown_before + 1);
    // A detached signature by a stranger over the pending consensus.
    let pending = net.live()[0].current_consensus().expect("c");
    #[derive(serde::Serialize)]
    struct Det {
        version: u16,
        valid_after: u64,
        digest: [u8; 32],
        sig: allium_directory::doc::SigEntry,
    }
    let det = Det {
        version: 1,
        valid_after: va,
        digest: pending.digest(),
        sig: allium_directory::doc::SigEntry {
            signer: stranger.public(),
            sig: allium_directory::doc::Sig64(stranger.sign("allium/v1/consensus", pending.body())),
        },
    };
    let r = post(paths::SIGNATURE, postcard::to_allocvec(&det).expect("enc")).await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let after = net.live()[0].current_consensus().expect("c").to_bytes();
    assert_eq!(before, after);
}

/// Real-time check of the background schedule (about 5-8 s): run by hand with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "real time: waits for the voting schedule"]
async fn scheduled_rounds_publish_without_help() {
    use allium_directory::authority::{self, StartOptions};
    use std::sync::Arc;
    let now = now_unix();
    let mut dirs = Vec::new();
    let mut ls = Vec::new();
    let mut infos = Vec::new();
    for _ in 0..3 {
        let d = tempfile::tempdir().expect("tmp");
        let (_i, k) = authority::keys::generate_for_test(d.path(), now).expect("keys");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        infos.push(allium_directory::AuthorityInfo {
            identity: k.identity(),
            dir_addr: l.local_addr().expect("a"),
        });
        dirs.push(d);
        ls.push(l);
    }
    let mut hs = Vec::new();
    for (d, l) in dirs.iter().zip(ls) {
        let addr = l.local_addr().expect("a");
        let cfg = common::config(d.path(), addr, &infos).for_test_network(3);
        hs.push(
            authority::start_with(
                cfg,
                StartOptions {
                    listener: Some(l),
                    reachability: Arc::new(authority::FakeReachability::all_up()),
                    schedule: true,
                },
            )
            .await
            .expect("start"),
        );
    }
    let r = Relay::new(9500);
    client::upload_descriptor_to_all(&infos, &r.signed(now_unix(), true)).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Ok(v) = fetch_consensus(&infos, now_unix()).await
            && v.consensus().relays.len() == 1
            && v.signed_by().len() == 3
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no consensus in time");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    for h in hs {
        h.shutdown().await;
    }
}
