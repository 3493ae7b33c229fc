//! Onion-service logic in memory: keys, port maps, the INTRODUCE plaintext, and the whole
//! service ↔ client exchange without circuits (the sim test in tests/tests/onion_service.rs runs
//! it over real cores).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;

use allium_crypto::hs::{HsAddress, TimePeriodParams};
use allium_crypto::{IdentityKeypair, X25519Public, X25519Secret};
use allium_proto::relaymsg::{RelayMsg, RendCookie, Rendezvous2};

use super::client::{self, OnionError};
use super::intro::{IntroPlaintext, PLAINTEXT_LEN, RendPoint};
use super::keys;
use super::ports::PortMapping;
use super::service::{IntroRefusal, IntroRelay, OnionService};

const NOW: u64 = 1_800_000_000;
const TP: TimePeriodParams = TimePeriodParams::TESTNET;

fn relay(n: u8) -> IntroRelay {
    IntroRelay {
        id: IdentityKeypair::from_seed(&[n; 32]).public(),
        link_key: X25519Secret::from_bytes([n.wrapping_add(1); 32]).public(),
        onion_key: X25519Secret::from_bytes([n.wrapping_add(2); 32]).public(),
        addrs: vec![SocketAddr::from(([127, 0, 0, n], 9000 + u16::from(n)))],
    }
}

fn rp() -> RendPoint {
    RendPoint {
        id: IdentityKeypair::from_seed(&[0x99; 32]).public(),
        onion_key: X25519Secret::from_bytes([0x98; 32]).public(),
        addrs: vec![
            SocketAddr::from(([10, 1, 2, 3], 443)),
            "[2001:db8::1]:9001".parse().expect("addr"),
        ],
    }
}

fn service(auth: Vec<X25519Public>) -> (OnionService, Vec<super::IntroId>) {
    let ports = vec!["80 -> 127.0.0.1:8080".parse().expect("mapping")];
    let mut s = OnionService::new(IdentityKeypair::from_seed(&[0x11; 32]), ports, auth, TP)
        .expect("service");
    let mut ids = Vec::new();
    while s.intro_points_wanted() > 0 {
        let id = s.add_intro_point(relay(ids.len() as u8 + 1));
        ids.push(id);
    }
    for id in &ids {
        s.intro_established(*id);
    }
    (s, ids)
}

#[test]
fn key_directory_is_private_and_the_address_stable() {
    let dir = tempfile::tempdir().expect("tmp");
    let kd = dir.path().join("svc");
    let (_, a1) = keys::load_or_create_identity(&kd).expect("created");
    let key = kd.join(keys::IDENTITY_FILE);
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let dmode = std::fs::metadata(&kd).expect("dir").permissions().mode() & 0o777;
    assert_eq!(dmode, 0o700);
    let (_, a2) = keys::load_or_create_identity(&kd).expect("loaded");
    assert_eq!(a1, a2, "same key directory, same address");
    let host = std::fs::read_to_string(kd.join(keys::HOSTNAME_FILE)).expect("hostname");
    assert_eq!(host, format!("{a1}\n"));
    // Another directory: another address. A world-readable key is refused.
    let (_, a3) = keys::load_or_create_identity(&dir.path().join("other")).expect("other");
    assert_ne!(a1, a3);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let e = keys::load_or_create_identity(&kd).expect_err("insecure");
    assert!(
        e.to_string().contains("0644") || e.to_string().contains("644"),
        "{e}"
    );
}

#[test]
fn authorised_client_files_parse_and_bad_ones_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let k1 = X25519Secret::from_bytes([3; 32]).public();
    let k2 = X25519Secret::from_bytes([4; 32]).public();
    std::fs::write(
        dir.path().join("alice.auth"),
        format!("# alice\ndescriptor:x25519:{}\n", hex::encode(k1.0)),
    )
    .expect("write");
    std::fs::write(dir.path().join("bob.auth"), hex::encode(k2.0)).expect("write");
    std::fs::write(dir.path().join("README"), "ignored").expect("write");
    let got = keys::load_authorized_clients(dir.path()).expect("keys");
    assert_eq!(got, vec![k1, k2]);
    std::fs::write(dir.path().join("carol.auth"), "descriptor:x25519:zz").expect("write");
    assert!(keys::load_authorized_clients(dir.path()).is_err());
    // The all-zero point is of low order: refused.
    let p = std::path::Path::new("x.auth");
    assert!(keys::parse_client_key(p, &hex::encode([0u8; 32])).is_err());
}

#[test]
fn client_auth_directory_reads_address_and_secret() {
    let dir = tempfile::tempdir().expect("tmp");
    let addr =
        HsAddress::from_identity(&IdentityKeypair::from_seed(&[0x11; 32]).public()).expect("addr");
    let f = dir.path().join("svc.auth_private");
    std::fs::write(
        &f,
        format!(
            "{}:descriptor:x25519:{}\n",
            addr.label(),
            hex::encode([5u8; 32])
        ),
    )
    .expect("write");
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let got = keys::load_client_auth(dir.path()).expect("loaded");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, addr);
    assert_eq!(
        got[0].1.public(),
        X25519Secret::from_bytes([5; 32]).public()
    );
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    assert!(
        keys::load_client_auth(dir.path()).is_err(),
        "readable by others"
    );
}

#[test]
fn port_mappings_parse_and_say_what_is_wrong() {
    let m: PortMapping = "80 -> 127.0.0.1:8080".parse().expect("ok");
    assert_eq!(m.virtual_port, 80);
    assert_eq!(m.target, SocketAddr::from(([127, 0, 0, 1], 8080)));
    assert_eq!(m.to_string(), "80 -> 127.0.0.1:8080");
    let m: PortMapping = "443->[::1]:8443".parse().expect("ok");
    assert_eq!(m.target.port(), 8443);
    for bad in [
        "80",
        "0 -> 127.0.0.1:80",
        "80 -> localhost:80",
        "x -> 127.0.0.1:1",
        "80 -> 127.0.0.1:0",
    ] {
        let e = bad.parse::<PortMapping>().expect_err(bad);
        assert!(e.to_string().contains("VIRTPORT -> ADDRESS:PORT"), "{e}");
    }
    let ports = vec![m, "80 -> 127.0.0.1:1".parse().expect("ok")];
    assert_eq!(
        super::ports::target_for(&ports, 80),
        Some(SocketAddr::from(([127, 0, 0, 1], 1)))
    );
    assert_eq!(super::ports::target_for(&ports, 81), None);
}

#[test]
fn introduce_plaintext_round_trips_with_a_fixed_size() {
    let p = IntroPlaintext {
        cookie: RendCookie([0xC0; 20]),
        rend_point: rp(),
    };
    let b = p.encode().expect("encodes");
    assert_eq!(b.len(), PLAINTEXT_LEN);
    assert_eq!(IntroPlaintext::decode(&b).expect("decodes"), p);
    let mut v4 = p.clone();
    v4.rend_point.addrs.truncate(1);
    assert_eq!(v4.encode().expect("encodes").len(), PLAINTEXT_LEN);
    // Byte layout: version, cookie, id, onion key, count, then type 4 | ip | port.
    assert_eq!(b[0], 1);
    assert_eq!(&b[1..21], &[0xC0; 20]);
    assert_eq!(&b[21..53], rp().id.as_bytes());
    assert_eq!(b[85], 2);
    assert_eq!(&b[86..93], &[4, 10, 1, 2, 3, 0x01, 0xBB]);
    assert_eq!(b[93], 6);
    // Altered: padding, count, type, length.
    let mut bad = b.clone();
    bad[PLAINTEXT_LEN - 1] = 1;
    assert!(IntroPlaintext::decode(&bad).is_err());
    let mut bad = b.clone();
    bad[85] = 3;
    assert!(IntroPlaintext::decode(&bad).is_err());
    let mut bad = b.clone();
    bad[86] = 5;
    assert!(IntroPlaintext::decode(&bad).is_err());
    assert!(IntroPlaintext::decode(&b[..100]).is_err());
    let mut none = p;
    none.rend_point.addrs.clear();
    assert!(none.encode().is_err());
}

/// Client side up to INTRODUCE1 against `s`'s descriptor.
fn introduce(
    s: &mut OnionService,
    client_key: Option<&X25519Secret>,
) -> Result<client::Introduction, OnionError> {
    let uploads = s.build_descriptors(NOW).expect("descriptors");
    let loc = client::descriptor_location(s.address(), &TP, NOW).expect("loc");
    let up = uploads
        .iter()
        .find(|u| u.blinded == loc.blinded)
        .expect("a descriptor for the current period");
    let contents = client::open_descriptor(&loc, &up.bytes, NOW, client_key)?;
    assert_eq!(contents.intro_points.len(), 3);
    client::start_introduction(&loc, &contents, 1, rp(), RendCookie([0xC0; 20]))
}

#[test]
fn service_and_client_agree_on_keys_and_a_replay_is_refused() {
    let (mut s, ids) = service(vec![]);
    assert!(s.descriptor_due(NOW));
    let intro = introduce(&mut s, None).expect("introduced");
    assert!(!s.descriptor_due(NOW), "just published");
    assert_eq!(intro.intro_point.id, relay(2).id);
    // The INTRODUCE1 names the intro point's auth key; the service opens it only on that point.
    assert_eq!(
        s.handle_introduce2(ids[0], &intro.introduce1, NOW).err(),
        Some(IntroRefusal::UnknownPoint)
    );
    let task = s
        .handle_introduce2(ids[1], &intro.introduce1, NOW)
        .expect("accepted");
    assert_eq!(task.rend_point.id, rp().id);
    let RelayMsg::Rendezvous1(r1) = &task.rendezvous1 else {
        panic!("not RENDEZVOUS1");
    };
    assert_eq!(r1.cookie, RendCookie([0xC0; 20]));
    let keys = intro
        .pending
        .finish(&Rendezvous2 {
            handshake_info: r1.handshake_info.clone(),
        })
        .expect("finished");
    assert_eq!(keys.forward(), task.keys.forward());
    assert_eq!(keys.backward(), task.keys.backward());
    // The same INTRODUCE2 again: refused.
    assert_eq!(
        s.handle_introduce2(ids[1], &intro.introduce1, NOW).err(),
        Some(IntroRefusal::Replay)
    );
    // A bit flipped anywhere in the encrypted part or the header: refused.
    let intro2 = introduce(&mut s, None).expect("introduced");
    let mut bad = intro2.introduce1.clone();
    bad.encrypted[10] ^= 1;
    assert_eq!(
        s.handle_introduce2(ids[1], &bad, NOW).err(),
        Some(IntroRefusal::BadHandshake)
    );
    let mut bad = intro2.introduce1.clone();
    bad.mac[0] = 1;
    assert_eq!(
        s.handle_introduce2(ids[1], &bad, NOW).err(),
        Some(IntroRefusal::BadHandshake)
    );
    // A tampered RENDEZVOUS2 reply fails at the client.
    let task = s
        .handle_introduce2(ids[1], &intro2.introduce1, NOW)
        .expect("accepted");
    let RelayMsg::Rendezvous1(mut r1) = task.rendezvous1 else {
        panic!("not RENDEZVOUS1");
    };
    r1.handshake_info[40] ^= 1;
    assert_eq!(
        intro2
            .pending
            .finish(&Rendezvous2 {
                handshake_info: r1.handshake_info
            })
            .err(),
        Some(OnionError::RendFailed)
    );
}

#[test]
fn an_unauthorised_client_cannot_read_the_descriptor() {
    let alice = X25519Secret::from_bytes([0xA1; 32]);
    let mallory = X25519Secret::from_bytes([0x3D; 32]);
    let (mut s, ids) = service(vec![alice.public()]);
    assert_eq!(
        introduce(&mut s, None).err(),
        Some(OnionError::MissingClientAuth)
    );
    assert_eq!(
        introduce(&mut s, Some(&mallory)).err(),
        Some(OnionError::BadClientAuth)
    );
    let intro = introduce(&mut s, Some(&alice)).expect("authorised");
    assert!(s.handle_introduce2(ids[1], &intro.introduce1, NOW).is_ok());
    assert_eq!(OnionError::BadClientAuth.socks_reply(), 0xF5);
    assert_eq!(OnionError::MissingClientAuth.socks_reply(), 0xF4);
}

#[test]
fn descriptors_follow_the_intro_points_and_revisions_grow() {
    let ports = vec!["80 -> 127.0.0.1:8080".parse().expect("mapping")];
    let mut s = OnionService::new(IdentityKeypair::from_seed(&[0x11; 32]), ports, vec![], TP)
        .expect("service");
    assert_eq!(s.intro_points_wanted(), 3);
    let a = s.add_intro_point(relay(1));
    assert!(!s.descriptor_due(NOW), "nothing established yet");
    s.intro_established(a);
    assert!(s.descriptor_due(NOW));
    let d1 = s.build_descriptors(NOW).expect("built");
    assert_eq!(d1.len(), 2, "current and next period");
    assert_ne!(d1[0].blinded, d1[1].blinded);
    assert!(!s.descriptor_due(NOW + 60));
    assert!(s.descriptor_due(NOW + 3600), "re-uploaded hourly");
    // Losing the point: a new one is wanted, and the descriptor is due once it is up.
    s.intro_lost(a);
    assert_eq!(s.intro_points_wanted(), 3);
    assert!(!s.has_intro_point(a));
    let b = s.add_intro_point(relay(2));
    s.intro_established(b);
    assert!(s.descriptor_due(NOW + 1));
    let d2 = s.build_descriptors(NOW).expect("built");
    let loc = client::descriptor_location(s.address(), &TP, NOW).expect("loc");
    let r = |bytes: &[u8]| {
        allium_directory::hs::UncheckedHsDesc::parse(bytes)
            .expect("parse")
            .check(NOW)
            .expect("check")
            .revision()
    };
    assert!(r(&d2[0].bytes) > r(&d1[0].bytes));
    assert!(
        r(&d1[0].bytes) >= NOW,
        "revision from the clock survives restarts"
    );
    let c = client::open_descriptor(&loc, &d2[0].bytes, NOW, None).expect("opens");
    assert_eq!(c.intro_points.len(), 1);
    assert_eq!(c.intro_points[0].relay_id, relay(2).id);
    // Another address's location does not open it.
    let other =
        HsAddress::from_identity(&IdentityKeypair::from_seed(&[0x12; 32]).public()).expect("addr");
    let loc2 = client::descriptor_location(&other, &TP, NOW).expect("loc");
    assert!(matches!(
        client::open_descriptor(&loc2, &d2[0].bytes, NOW, None),
        Err(OnionError::DescInvalid(_))
    ));
    // The stored bytes name neither the identity nor the address.
    let id = IdentityKeypair::from_seed(&[0x11; 32]).public();
    let b = &d2[0].bytes;
    assert!(!b.windows(32).any(|w| w == id.as_bytes()));
    assert!(
        !b.windows(20)
            .any(|w| w == &s.address().label().as_bytes()[..20])
    );
    assert_eq!(
        s.target_for(80),
        Some(SocketAddr::from(([127, 0, 0, 1], 8080)))
    );
    assert_eq!(s.target_for(22), None);
}

#[test]
fn desc_cache_is_per_isolation_group_bounded_and_expires() {
    let (mut s, _) = service(vec![]);
    let ups = s.build_descriptors(NOW).expect("built");
    let loc = client::descriptor_location(s.address(), &TP, NOW).expect("loc");
    let c = client::open_descriptor(&loc, &ups[0].bytes, NOW, None).expect("opens");
    let mut cache = client::DescCache::default();
    let addr = *s.address();
    cache.insert(&addr, 1, c.clone(), NOW + 100);
    assert!(cache.get(&addr, 1, NOW).is_some());
    assert!(
        cache.get(&addr, 2, NOW).is_none(),
        "another isolation group"
    );
    assert!(cache.get(&addr, 1, NOW + 100).is_none(), "expired");
    for g in 0..(client::DESC_CACHE_MAX as u64 + 10) {
        cache.insert(&addr, 100 + g, c.clone(), NOW + 100);
    }
    assert_eq!(cache.len(), client::DESC_CACHE_MAX);
    assert!(cache.get(&addr, 1, NOW).is_none(), "oldest dropped");
    cache.remove(&addr, 100 + client::DESC_CACHE_MAX as u64 + 9);
    assert_eq!(cache.len(), client::DESC_CACHE_MAX - 1);
}

#[test]
fn hsdir_requests_are_byte_exact() {
    let b = allium_crypto::hs::BlindedPublicKey([0xAB; 32]);
    let hexkey = "ab".repeat(32);
    assert_eq!(
        super::hsdir::fetch_request(&b),
        format!("GET /allium/v1/hs/{hexkey} HTTP/1.0\r\n\r\n").into_bytes()
    );
    let up = super::hsdir::upload_request(&b, b"desc").expect("fits");
    assert_eq!(
        up,
        format!("POST /allium/v1/hs/{hexkey} HTTP/1.0\r\nContent-Length: 4\r\n\r\ndesc")
            .into_bytes()
    );
    assert!(super::hsdir::upload_request(&b, &[]).is_none());
    let big = vec![0u8; allium_directory::hs::desc::MAX_HS_DESC_LEN + 1];
    assert!(super::hsdir::upload_request(&b, &big).is_none());
}

/// The HSDir role as a relay runs it (relay/src/hsdir.rs): the head is framed and parsed by
/// the directory crate, the store answers.
fn hsdir_answer(store: &mut allium_directory::dircache::HsDescStore, whole: &[u8]) -> Vec<u8> {
    use allium_directory::dircache::{parse_request, request_head_complete};
    let head_len = request_head_complete(whole).expect("a whole head");
    let req = parse_request(&whole[..head_len]).expect("the relay parses our request");
    store
        .respond(&req, &whole[head_len..], NOW)
        .expect("a descriptor request")
}

#[test]
fn descriptors_go_through_an_hsdir_store_and_come_back_openable() {
    use super::hsdir::{
        ResponseProgress, fetch_request, fetch_response, response_progress, upload_request,
        upload_response,
    };
    let (s, _) = service(vec![]);
    let mut s = s;
    let ups = s.build_descriptors(NOW).expect("built");
    let mut store = allium_directory::dircache::HsDescStore::default();
    let loc = client::descriptor_location(s.address(), &TP, NOW).expect("loc");
    // Nothing stored yet: the client hears "not found" and moves on to the next HSDir.
    let miss = hsdir_answer(&mut store, &fetch_request(&loc.blinded));
    assert_eq!(
        response_progress(&miss),
        Ok(ResponseProgress::Complete(miss.len()))
    );
    assert_eq!(fetch_response(&miss), Err(OnionError::DescNotFound));
    for up in &ups {
        let req = upload_request(&up.blinded, &up.bytes).expect("fits");
        let resp = hsdir_answer(&mut store, &req);
        upload_response(&resp).expect("stored");
    }
    // A descriptor uploaded under another key is refused, and the service hears why.
    let wrong = upload_request(&ups[1].blinded, &ups[0].bytes).expect("fits");
    let e = upload_response(&hsdir_answer(&mut store, &wrong)).expect_err("refused");
    assert!(e.contains("uploading"), "{e}");
    let resp = hsdir_answer(&mut store, &fetch_request(&loc.blinded));
    // Arriving a piece at a time: partial until the last byte.
    for cut in [0, 5, resp.len() / 2, resp.len() - 1] {
        assert_eq!(
            response_progress(&resp[..cut]),
            Ok(ResponseProgress::Partial)
        );
    }
    let mut more = resp.clone();
    more.extend_from_slice(b"trailing");
    assert_eq!(
        response_progress(&more),
        Ok(ResponseProgress::Complete(resp.len()))
    );
    let raw = fetch_response(&resp).expect("served");
    assert_eq!(raw, ups[0].bytes, "the HSDir serves the bytes uploaded");
    let c = client::open_descriptor(&loc, &raw, NOW, None).expect("opens");
    assert_eq!(c.intro_points.len(), 3);
    // Hostile bytes are an error, not a panic or an endless wait.
    let junk = vec![b'x'; 64 * 1024];
    assert!(response_progress(&junk).is_err());
    assert_eq!(
        fetch_response(b"HTTP/1.0 200 OK\r\n\r\n"),
        Err(OnionError::DescNotFound)
    );
}

#[test]
fn prepare_services_creates_keys_and_reports_bad_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let auth = dir.path().join("auth");
    std::fs::create_dir(&auth).expect("mkdir");
    std::fs::write(auth.join("a.auth"), hex::encode([9u8; 32])).expect("write");
    let text = format!(
        "[[authorities]]\nidentity = \"{}\"\naddress = \"127.0.0.1:7000\"\n\n[[onion_service]]\nname = \"web\"\nkey_dir = \"{}\"\nports = [\"80 -> 127.0.0.1:8080\"]\nauthorized_clients = \"{}\"\n",
        "00".repeat(31) + "01",
        dir.path().join("web").display(),
        auth.display()
    );
    let cfg = crate::config::ProxyConfig::from_toml_str(&text).expect("config");
    let got = super::prepare_services(&cfg).expect("prepared");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "web");
    let host = std::fs::read_to_string(dir.path().join("web").join(keys::HOSTNAME_FILE))
        .expect("hostname");
    assert_eq!(host.trim(), got[0].1.address().to_string());
    std::fs::write(auth.join("b.auth"), "nonsense").expect("write");
    let e = super::prepare_services(&cfg)
        .expect_err("bad key")
        .to_string();
    assert!(
        e.contains("[[onion_service]] web") && e.contains("b.auth"),
        "{e}"
    );
}
