//! Tests of the server-side handshake: every branch, fed whole and byte by byte.

use super::*;
use proptest::prelude::*;

/// Feed `input` all at once.
fn run(input: &[u8]) -> (Progress, ServerHandshake) {
    let mut hs = ServerHandshake::new();
    let p = hs.handle(input);
    (p, hs)
}

/// Feed `input` one byte at a time; returns the concatenated output, the bytes consumed and
/// the outcome. Checks that nothing is consumed after the outcome.
fn run_bytewise(input: &[u8]) -> (Vec<u8>, usize, Option<Outcome>) {
    let mut hs = ServerHandshake::new();
    let mut send = Vec::new();
    let mut consumed = 0;
    let mut outcome = None;
    for b in input {
        let p = hs.handle(std::slice::from_ref(b));
        send.extend_from_slice(&p.send);
        consumed += p.consumed;
        if outcome.is_some() {
            assert_eq!(p.consumed, 0, "consumed after the end");
            assert!(p.send.is_empty());
        }
        if let Some(o) = p.outcome {
            assert!(outcome.is_none(), "two outcomes");
            outcome = Some(o);
        }
    }
    (send, consumed, outcome)
}

/// Both ways of feeding give the same result.
fn both(input: &[u8]) -> (Vec<u8>, usize, Option<Outcome>) {
    let (p, _) = run(input);
    let bw = run_bytewise(input);
    assert_eq!(p.send, bw.0, "output differs when fed byte by byte");
    if matches!(p.outcome, Some(Outcome::Request(_)) | None) {
        // (A refusal counts the whole call's input as consumed: the connection closes.)
        assert_eq!(
            p.consumed, bw.1,
            "consumption differs when fed byte by byte"
        );
    }
    assert_eq!(p.outcome, bw.2, "outcome differs when fed byte by byte");
    (p.send, p.consumed, p.outcome)
}

fn request(outcome: Option<Outcome>) -> SocksRequest {
    match outcome {
        Some(Outcome::Request(r)) => r,
        other => panic!("expected a request, got {other:?}"),
    }
}

fn refused(outcome: Option<Outcome>) -> HandshakeError {
    match outcome {
        Some(Outcome::Refused(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn domain_request(cmd: u8, host: &[u8], port: u16) -> Vec<u8> {
    let mut v = vec![5, cmd, 0, 3, host.len() as u8];
    v.extend_from_slice(host);
    v.extend_from_slice(&port.to_be_bytes());
    v
}

#[test]
fn no_auth_connect_to_a_name_with_trailing_stream_data() {
    let mut input = vec![5, 1, 0];
    input.extend(domain_request(1, b"example.com", 443));
    let hs_len = input.len();
    input.extend_from_slice(b"GET / HTTP/1.1\r\n");
    let (send, consumed, outcome) = both(&input);
    assert_eq!(send, [5, 0]);
    assert_eq!(consumed, hs_len, "stream data must not be consumed");
    let r = request(outcome);
    assert_eq!(r.version, SocksVersion::V5);
    assert_eq!(r.command, SocksCommand::Connect);
    assert_eq!(r.target, Target::Host("example.com".into(), 443));
    assert_eq!(r.isolation, IsolationKey::NoAuth);
    assert_eq!(r.reply(0, None), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.reply(reply::CONNECTION_REFUSED, None)[1], 0x05);
    // Redacted.
    let dbg = format!("{r:?}");
    assert!(!dbg.contains("example"), "{dbg}");
}

#[test]
fn each_message_waits_for_its_last_byte() {
    let mut input = vec![5, 2, 0, 2, 1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
    input.extend(domain_request(1, b"a.test", 80));
    for cut in 0..input.len() {
        let (p, hs) = run(&input[..cut]);
        assert!(p.outcome.is_none(), "finished early at {cut}");
        assert_eq!(p.consumed, cut, "partial input is buffered");
        assert!(!hs.is_done());
    }
    let (p, hs) = run(&input);
    assert!(hs.is_done());
    assert_eq!(p.send, [5, 2, 1, 0]);
    assert!(matches!(p.outcome, Some(Outcome::Request(_))));
    // After the end, nothing more is taken.
    let mut hs = hs;
    assert_eq!(hs.handle(b"more"), Progress::default());
}

#[test]
fn username_password_is_preferred_and_becomes_the_isolation_key() {
    let mut input = vec![5, 2, 0, 2, 1, 5];
    input.extend_from_slice(b"alice");
    input.push(2);
    input.extend_from_slice(b"pw");
    input.extend_from_slice(&[5, 1, 0, 1, 10, 0, 0, 1, 0, 80]);
    let (send, consumed, outcome) = both(&input);
    assert_eq!(send, [5, 2, 1, 0]);
    assert_eq!(consumed, input.len());
    let r = request(outcome);
    assert_eq!(r.isolation, IsolationKey::credentials("alice", "pw"));
    assert_eq!(r.target, Target::Ip("10.0.0.1:80".parse().unwrap()));
    assert!(!format!("{r:?}").contains("alice"));
    // Empty fields are allowed: still a key of their own, distinct from no authentication.
    let (send, _, outcome) = both(&[5, 1, 2, 1, 0, 0, 5, 0xF0, 0, 3, 1, b'x', 0, 0]);
    assert_eq!(send, [5, 2, 1, 0]);
    let r = request(outcome);
    assert_eq!(r.isolation, IsolationKey::credentials("", ""));
    assert_eq!(r.command, SocksCommand::Resolve);
}

#[test]
fn only_offered_methods_are_chosen() {
    // Only no-auth offered.
    let (send, _, outcome) = both(&[5, 1, 0]);
    assert_eq!(send, [5, 0]);
    assert!(outcome.is_none());
    // Only methods we do not have (GSSAPI, a private one): 0xFF and close.
    let (send, consumed, outcome) = both(&[5, 2, 1, 0x80, 9]);
    assert_eq!(send, [5, 0xFF]);
    assert_eq!(refused(outcome), HandshakeError::NoAcceptableMethod);
    assert_eq!(consumed, 5, "a refusal counts everything as consumed");
    // No method at all.
    let (send, _, outcome) = both(&[5, 0]);
    assert_eq!(send, [5, 0xFF]);
    assert_eq!(refused(outcome), HandshakeError::NoAcceptableMethod);
    // The largest greeting (255 methods) is fine.
    let mut g = vec![5, 255];
    g.extend((0..255u8).rev());
    let (send, consumed, _) = both(&g);
    assert_eq!(send, [5, 2]);
    assert_eq!(consumed, g.len());
}

#[test]
fn bad_auth_version_is_refused() {
    let (send, _, outcome) = both(&[5, 1, 2, 5, 1, b'u', 1, b'p']);
    assert_eq!(send, [5, 2, 1, 1]);
    assert_eq!(refused(outcome), HandshakeError::AuthVersion(5));
}

#[test]
fn longest_credentials_fit() {
    let mut input = vec![5, 1, 2, 1, 255];
    input.extend([b'u'; 255]);
    input.push(255);
    input.extend([b'p'; 255]);
    input.extend(domain_request(1, &[b'h'; 255], 1));
    let (send, consumed, outcome) = both(&input);
    assert_eq!(send, [5, 2, 1, 0]);
    assert_eq!(consumed, input.len());
    let r = request(outcome);
    assert_eq!(
        r.isolation,
        IsolationKey::credentials([b'u'; 255], [b'p'; 255])
    );
    assert_eq!(r.target, Target::Host("h".repeat(255), 1));
}

#[test]
fn ipv6_target_and_resolve_command() {
    let mut input = vec![5, 1, 0, 5, 0xF0, 0, 4];
    input.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    input.extend_from_slice(&[1, 0]);
    let (_, _, outcome) = both(&input);
    let r = request(outcome);
    assert_eq!(r.command, SocksCommand::Resolve);
    assert_eq!(r.target, Target::Ip("[::1]:256".parse().unwrap()));
    let ip = "1.2.3.4:0".parse().unwrap();
    assert_eq!(r.reply(0, Some(ip)), [5, 0, 0, 1, 1, 2, 3, 4, 0, 0]);
}

/// A SOCKS5 request after a no-auth greeting must be refused with reply `code` and `err`.
fn refused5(req: &[u8], code: u8, err: HandshakeError) {
    let mut input = vec![5, 1, 0];
    input.extend_from_slice(req);
    let (send, _, outcome) = both(&input);
    assert_eq!(refused(outcome), err, "request {req:?}");
    assert_eq!(send[..2], [5, 0]);
    assert_eq!(send.len(), 2 + 10, "request {req:?}");
    assert_eq!(send[2..4], [5, code], "request {req:?}");
}

#[test]
fn bad_requests_get_the_right_reply_codes() {
    // Unsupported commands: BIND, UDP ASSOCIATE, RESOLVE_PTR, anything else.
    for cmd in [2u8, 3, wire::CMD_RESOLVE_PTR, 0x77] {
        refused5(
            &[5, cmd, 0, 1, 127, 0, 0, 1, 0, 80],
            reply::COMMAND_NOT_SUPPORTED,
            HandshakeError::Command(cmd),
        );
    }
    // Unknown address type: refused at once (its length is unknown).
    refused5(
        &[5, 1, 0, 9],
        reply::ADDRESS_TYPE_NOT_SUPPORTED,
        HandshakeError::AddressType(9),
    );
    // Unknown address type and unknown command: the address type decides.
    refused5(
        &[5, 2, 0, 0],
        reply::ADDRESS_TYPE_NOT_SUPPORTED,
        HandshakeError::AddressType(0),
    );
    // Wrong version in the request.
    refused5(
        &[4, 1, 0, 1],
        reply::GENERAL_FAILURE,
        HandshakeError::RequestVersion(4),
    );
    // Reserved byte.
    refused5(
        &[5, 1, 1, 1, 1, 2, 3, 4, 0, 80],
        reply::GENERAL_FAILURE,
        HandshakeError::Reserved,
    );
    // Host names: empty, NUL inside, not UTF-8.
    for host in [&b""[..], b"a\0b", &[0xff, 0xfe]] {
        refused5(
            &domain_request(1, host, 80),
            reply::GENERAL_FAILURE,
            HandshakeError::BadHost,
        );
    }
}

#[test]
fn not_socks_is_closed_without_a_reply() {
    for input in [
        &b"\x16\x03\x01"[..],
        b"\x00",
        b"GEX / HTTP/1.0\r\n",
        b"get / HTTP/1.0\r\n",
    ] {
        let (send, _, outcome) = both(input);
        assert!(send.is_empty());
        assert_eq!(refused(outcome), HandshakeError::NotSocks(input[0]));
    }
    let (p, hs) = run(&[]);
    assert_eq!(p, Progress::default());
    assert!(!hs.is_done());
}

#[test]
fn http_requests_get_the_not_an_http_proxy_page() {
    for input in [
        &b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
        b"POST /form HTTP/1.1\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\n",
        b"HEAD / HTTP/1.0\r\n\r\n",
    ] {
        let (send, _, outcome) = both(input);
        assert_eq!(refused(outcome), HandshakeError::HttpRequest);
        let text = String::from_utf8(send).unwrap();
        assert!(text.starts_with("HTTP/1.0 501 "), "{text}");
        assert!(text.contains("SOCKS proxy, not an HTTP proxy"));
        assert!(text.contains("http_tunnel_port"));
        // The declared length is the body's.
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }
    // A method prefix alone waits for more.
    let (p, hs) = run(b"CONNEC");
    assert_eq!(p.outcome, None);
    assert_eq!(p.consumed, 6);
    assert!(!hs.is_done());
    // With a tunnel port configured, the page names it.
    let mut hs = ServerHandshake::new().with_http_tunnel(Some("127.0.0.1:8118".parse().unwrap()));
    let p = hs.handle(b"GET http://example.com/ HTTP/1.1\r\n");
    assert_eq!(
        p.outcome,
        Some(Outcome::Refused(HandshakeError::HttpRequest))
    );
    assert!(
        String::from_utf8(p.send)
            .unwrap()
            .contains("127.0.0.1:8118")
    );
}

#[test]
fn socks4_connect_to_an_address_with_trailing_data() {
    let mut input = vec![4, 1, 0, 80, 10, 0, 0, 1, b'u', 0];
    let n = input.len();
    input.extend_from_slice(b"data");
    let (send, consumed, outcome) = both(&input);
    assert!(send.is_empty());
    assert_eq!(consumed, n);
    let r = request(outcome);
    assert_eq!(r.version, SocksVersion::V4);
    assert_eq!(r.target, Target::Ip("10.0.0.1:80".parse().unwrap()));
    assert_eq!(r.isolation, IsolationKey::credentials("u", ""));
    assert_eq!(r.reply(0, None), [0, 0x5A, 0, 0, 0, 0, 0, 0]);
    assert_eq!(r.reply(reply::HOST_UNREACHABLE, None)[1], 0x5B);
}

#[test]
fn socks4a_names_and_bounds() {
    let mut a = vec![4, 1, 1, 187, 0, 0, 0, 1, 0];
    a.extend_from_slice(b"host.example\0");
    for cut in 0..a.len() {
        assert!(run(&a[..cut]).0.outcome.is_none(), "cut {cut}");
    }
    let (send, consumed, outcome) = both(&a);
    assert!(send.is_empty());
    assert_eq!(consumed, a.len());
    let r = request(outcome);
    assert_eq!(r.target, Target::Host("host.example".into(), 443));
    assert_eq!(r.isolation, IsolationKey::NoAuth);

    // 0.0.0.0 is an address, not SOCKS4a.
    let r = request(both(&[4, 1, 0, 80, 0, 0, 0, 0, 0]).2);
    assert_eq!(r.target, Target::Ip("0.0.0.0:80".parse().unwrap()));

    // The longest user id and host name are accepted...
    let mut long = vec![4, 1, 0, 80, 0, 0, 0, 9];
    long.extend([b'u'; 255]);
    long.push(0);
    long.extend([b'h'; 255]);
    long.push(0);
    assert_eq!(long.len(), MAX_MESSAGE);
    assert!(matches!(both(&long).2, Some(Outcome::Request(_))));

    // ...one more byte is refused as soon as it arrives, without waiting for a NUL.
    let too_long_user = [vec![4, 1, 0, 80, 1, 2, 3, 4], vec![b'x'; 256]].concat();
    let (send, _, outcome) = both(&too_long_user);
    assert_eq!(send, [0, 0x5B, 0, 0, 0, 0, 0, 0]);
    assert_eq!(refused(outcome), HandshakeError::UserTooLong);
    let too_long_host = [vec![4, 1, 0, 80, 0, 0, 0, 1, 0], vec![b'h'; 256]].concat();
    let (send, _, outcome) = both(&too_long_host);
    assert_eq!(send[1], 0x5B);
    assert_eq!(refused(outcome), HandshakeError::BadHost);

    // An empty or non-UTF-8 host, and commands other than CONNECT, are rejected.
    for bad in [
        vec![4, 1, 0, 80, 0, 0, 0, 1, 0, 0],
        vec![4, 1, 0, 80, 0, 0, 0, 1, 0, 0xff, 0],
    ] {
        assert_eq!(refused(both(&bad).2), HandshakeError::BadHost);
    }
    let (send, _, outcome) = both(&[4, 2, 0, 80, 1, 2, 3, 4, 0]);
    assert_eq!(send[1], 0x5B);
    assert_eq!(refused(outcome), HandshakeError::Command(2));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(
        input in proptest::collection::vec(any::<u8>(), 0..1200),
        chunk in 1usize..64,
    ) {
        let mut hs = ServerHandshake::new();
        let mut fed = 0;
        for piece in input.chunks(chunk) {
            let p = hs.handle(piece);
            prop_assert!(p.consumed <= piece.len());
            prop_assert!(p.send.len() <= 4 + wire::MAX_SOCKS5_REPLY);
            fed += p.consumed;
            if p.outcome.is_some() {
                prop_assert!(hs.is_done());
            }
        }
        prop_assert!(fed <= input.len());
    }

    #[test]
    fn valid_prefixes_then_garbage_never_panic(
        prefix in prop_oneof![Just(vec![5u8, 1, 0]), Just(vec![5u8, 1, 2]), Just(vec![4u8])],
        rest in proptest::collection::vec(any::<u8>(), 0..700),
    ) {
        let input = [prefix, rest].concat();
        let (p, _) = run(&input);
        prop_assert!(p.consumed <= input.len());
        let bw = run_bytewise(&input);
        prop_assert_eq!(p.send, bw.0);
        prop_assert_eq!(p.outcome, bw.2);
    }

    #[test]
    fn domain_requests_round_trip(
        host in "[a-z0-9.-]{1,255}",
        port in any::<u16>(),
        resolve in any::<bool>(),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let cmd = if resolve { CMD_RESOLVE } else { CMD_CONNECT };
        let mut input = vec![5, 1, 0];
        input.extend(domain_request(cmd, host.as_bytes(), port));
        let n = input.len();
        input.extend_from_slice(&tail);
        let (p, _) = run(&input);
        prop_assert_eq!(p.consumed, n);
        let r = request(p.outcome);
        prop_assert_eq!(r.target, Target::Host(host, port));
        prop_assert_eq!(r.command == SocksCommand::Resolve, resolve);
    }
}

fn onion_name() -> String {
    let id = allium_crypto::IdentityKeypair::from_seed(&[0x11; 32]).public();
    allium_crypto::hs::HsAddress::from_identity(&id)
        .expect("address")
        .to_string()
}

#[test]
fn a_valid_onion_address_is_accepted_for_connect_only() {
    let name = onion_name();
    for host in [name.clone(), name.to_uppercase(), format!("www.{name}")] {
        let mut input = vec![5, 1, 0];
        input.extend(domain_request(CMD_CONNECT, host.as_bytes(), 80));
        let (_, _, outcome) = both(&input);
        let r = request(outcome);
        assert_eq!(r.target, Target::Host(host, 80));
    }
    // RESOLVE of an onion name: refused, "not allowed", and the name goes nowhere.
    let mut input = vec![5, 1, 0];
    input.extend(domain_request(CMD_RESOLVE, name.as_bytes(), 0));
    let (send, _, outcome) = both(&input);
    assert_eq!(refused(outcome), HandshakeError::OnionResolve);
    assert_eq!(send[3], reply::NOT_ALLOWED);
}

#[test]
fn malformed_onion_addresses_get_a_clear_socks_error() {
    let name = onion_name();
    let label = &name[..56];
    // A typo (checksum), a wrong length, a character outside base32, a bare suffix.
    let mut typo = label.as_bytes().to_vec();
    typo[3] = if typo[3] == b'a' { b'b' } else { b'a' };
    let bad = [
        format!("{}.allium.alt", String::from_utf8(typo).expect("ascii")),
        format!("{}.allium.alt", &label[..55]),
        format!("{}1.allium.alt", &label[..55]),
        "allium.alt".to_owned(),
        "x.allium.alt.".to_owned(),
    ];
    for host in &bad {
        for cmd in [CMD_CONNECT, CMD_RESOLVE] {
            let mut input = vec![5, 1, 0];
            input.extend(domain_request(cmd, host.as_bytes(), 80));
            let (send, _, outcome) = both(&input);
            assert_eq!(refused(outcome), HandshakeError::BadOnionAddress, "{host}");
            assert_eq!(send[0..2], [5, 0]);
            assert_eq!(send[2], 5, "method choice, then the reply");
            assert_eq!(send[3], REPLY_BAD_ONION_ADDRESS, "{host}");
        }
        // SOCKS4a: rejected.
        let mut v4 = vec![4, 1, 0, 80, 0, 0, 0, 1, 0];
        v4.extend_from_slice(host.as_bytes());
        v4.push(0);
        let (send, _, outcome) = both(&v4);
        assert_eq!(refused(outcome), HandshakeError::BadOnionAddress);
        assert_eq!(send[1], 0x5B);
    }
    // An ordinary name that merely contains the words is not an onion name.
    let mut input = vec![5, 1, 0];
    input.extend(domain_request(CMD_CONNECT, b"allium.alt.example.com", 80));
    assert!(matches!(both(&input).2, Some(Outcome::Request(_))));
}
