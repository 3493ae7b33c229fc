//! Tests of the client-side codec, mostly against the server-side state machine in memory.

use super::*;
use crate::isolation::IsolationKey;
use crate::socks::handshake::{Outcome, ServerHandshake, SocksRequest};
use crate::socks::wire::reply;
use proptest::prelude::*;

/// Run `req` against a [`ServerHandshake`], the server answering with `answer(request)`; feeds
/// the client `chunk` bytes at a time. Returns what the server saw and what the client got.
fn pair(
    req: ClientRequest,
    chunk: usize,
    answer: impl Fn(&SocksRequest) -> Vec<u8>,
) -> (Option<SocksRequest>, Result<Reply, SocksClientError>) {
    let (mut client, mut to_server) = ClientHandshake::new(req).unwrap();
    let mut server = ServerHandshake::new();
    let mut seen = None;
    for _ in 0..10 {
        let p = server.handle(&to_server);
        assert_eq!(p.consumed, to_server.len());
        let mut to_client = p.send;
        match p.outcome {
            Some(Outcome::Request(r)) => {
                to_client.extend(answer(&r));
                seen = Some(r);
            }
            Some(Outcome::Refused(_)) => {}
            None => {}
        }
        to_server = Vec::new();
        for piece in to_client.chunks(chunk) {
            assert!(client.bytes_needed() >= 1);
            match client.handle(piece) {
                Ok(p) => {
                    assert_eq!(p.consumed, piece.len());
                    to_server.extend(p.send);
                    if let Some(r) = p.reply {
                        assert!(client.is_done());
                        assert_eq!(client.bytes_needed(), 0);
                        return (seen, Ok(r));
                    }
                }
                Err(e) => return (seen, Err(e)),
            }
        }
        if to_server.is_empty() && seen.is_some() {
            break;
        }
    }
    (seen, Err(SocksClientError::Protocol("no reply")))
}

#[test]
fn connect_with_and_without_credentials() {
    for chunk in [1, 3, 100] {
        let t = Target::Host("example.com".into(), 443);
        let (seen, got) = pair(ClientRequest::connect(t.clone(), None), chunk, |r| {
            r.reply(0, None)
        });
        let seen = seen.unwrap();
        assert_eq!(seen.target, t);
        assert_eq!(seen.isolation, IsolationKey::NoAuth);
        assert_eq!(got.unwrap().code, 0);

        let (seen, got) = pair(
            ClientRequest::connect(t.clone(), Some(("alice", "pw"))),
            chunk,
            |r| r.reply(reply::CONNECTION_REFUSED, None),
        );
        assert_eq!(
            seen.unwrap().isolation,
            IsolationKey::credentials("alice", "pw")
        );
        assert_eq!(got.unwrap().code, reply::CONNECTION_REFUSED);
    }
}

#[test]
fn resolve_gets_the_address() {
    let ip: SocketAddr = "[2001:db8::1]:0".parse().unwrap();
    let (seen, got) = pair(ClientRequest::resolve("a.test", None), 1, |r| {
        r.reply(0, Some(ip))
    });
    assert_eq!(seen.unwrap().command, SocksCommand::Resolve);
    assert_eq!(got.unwrap().addr, Some(ip));
}

#[test]
fn socks4a_and_socks4() {
    let t = Target::Host("h.test".into(), 80);
    let (seen, got) = pair(ClientRequest::socks4a(t.clone(), "u"), 1, |r| {
        r.reply(0, None)
    });
    let seen = seen.unwrap();
    assert_eq!(seen.target, t);
    assert_eq!(seen.isolation, IsolationKey::credentials("u", ""));
    assert_eq!(
        got.unwrap(),
        Reply {
            code: 0,
            addr: None
        }
    );
    let ip = Target::Ip("10.1.2.3:8080".parse().unwrap());
    let (seen, got) = pair(ClientRequest::socks4a(ip.clone(), ""), 8, |r| {
        r.reply(4, None)
    });
    assert_eq!(seen.unwrap().target, ip);
    assert_eq!(got.unwrap().code, 0x5B);
}

#[test]
fn requests_that_cannot_be_encoded() {
    let long = Target::Host("x".repeat(256), 1);
    assert!(matches!(
        ClientHandshake::new(ClientRequest::connect(long, None)),
        Err(SocksClientError::BadRequest(_))
    ));
    let t = Target::Host("x".into(), 1);
    let user = "u".repeat(256);
    assert!(ClientHandshake::new(ClientRequest::connect(t.clone(), Some((&user, "p")))).is_err());
    let mut r4 = ClientRequest::resolve("x", None);
    r4.version = SocksVersion::V4;
    assert!(ClientHandshake::new(r4).is_err());
    let v6 = Target::Ip("[::1]:1".parse().unwrap());
    assert!(ClientHandshake::new(ClientRequest::socks4a(v6, "")).is_err());
    assert!(!format!("{:?}", ClientRequest::connect(t, Some(("alice", "pw")))).contains("alice"));
}

#[test]
fn bad_proxy_answers() {
    let t = Target::Host("x".into(), 1);
    let fresh = |auth| ClientHandshake::new(ClientRequest::connect(t.clone(), auth)).unwrap();
    let (mut c, first) = fresh(None);
    assert_eq!(first, [5, 1, 0]);
    assert!(matches!(
        c.handle(&[4, 0]),
        Err(SocksClientError::Protocol(_))
    ));
    let (mut c, _) = fresh(None);
    assert!(c.handle(&[5, 0xFF]).is_err(), "no acceptable method");
    let (mut c, _) = fresh(None);
    assert!(c.handle(&[5, 2]).is_err(), "a method we did not offer");
    let (mut c, first) = fresh(Some(("u", "p")));
    assert_eq!(first, [5, 1, 2]);
    let p = c.handle(&[5, 2]).unwrap();
    assert_eq!(p.send, [1, 1, b'u', 1, b'p']);
    assert!(c.handle(&[1, 1]).is_err(), "credentials refused");
    // Unknown reply address type.
    let (mut c, _) = fresh(None);
    c.handle(&[5, 0]).unwrap();
    assert!(c.handle(&[5, 0, 0, 7]).is_err());
    // A reply with a name is read whole; bytes after it are left for the stream.
    let (mut c, _) = fresh(None);
    c.handle(&[5, 0]).unwrap();
    assert_eq!(c.bytes_needed(), 4);
    let p = c.handle(&[5, 0, 0, 3]).unwrap();
    assert_eq!(p.consumed, 4);
    assert_eq!(c.bytes_needed(), 1);
    c.handle(&[2]).unwrap();
    assert_eq!(c.bytes_needed(), 2);
    let p = c.handle(&[b'a', b'b', 0, 80, b'X', b'Y']).unwrap();
    assert_eq!(p.consumed, 4);
    assert_eq!(
        p.reply,
        Some(Reply {
            code: 0,
            addr: None
        })
    );
}

#[tokio::test]
async fn async_helper_reads_exactly_the_handshake() {
    use tokio::io::AsyncReadExt as _;
    let (mut a, mut b) = tokio::io::duplex(1024);
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut hs = ServerHandshake::new();
        let mut buf = [0u8; 512];
        loop {
            let n = b.read(&mut buf).await.unwrap();
            let p = hs.handle(&buf[..n]);
            if let Some(Outcome::Request(r)) = p.outcome {
                assert_eq!(p.consumed, n);
                // The reply, then stream data in the same write.
                let mut out = p.send;
                out.extend(r.reply(0, None));
                out.extend_from_slice(b"hello");
                b.write_all(&out).await.unwrap();
                return r;
            }
            b.write_all(&p.send).await.unwrap();
        }
    });
    let reply = handshake(
        &mut a,
        ClientRequest::connect(Target::Host("x.test".into(), 9), Some(("u", "p"))),
    )
    .await
    .unwrap();
    assert_eq!(reply.code, 0);
    let mut rest = [0u8; 5];
    a.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"hello", "stream data after the reply was lost");
    let r = server.await.unwrap();
    assert_eq!(r.isolation, IsolationKey::credentials("u", "p"));
}

#[tokio::test]
async fn async_helper_reports_refusals() {
    let (mut a, mut b) = tokio::io::duplex(1024);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut buf = [0u8; 64];
        let _ = b.read(&mut buf).await;
        b.write_all(&[5, 0]).await.unwrap();
        let _ = b.read(&mut buf).await;
        b.write_all(&wire::socks5_reply(reply::NOT_ALLOWED, None))
            .await
            .unwrap();
    });
    let err = handshake(
        &mut a,
        ClientRequest::connect(Target::Host("x".into(), 25), None),
    )
    .await
    .unwrap_err();
    assert_eq!(err.reply_code(), Some(reply::NOT_ALLOWED));
}

proptest! {
    #[test]
    fn arbitrary_proxy_bytes_never_panic(
        input in proptest::collection::vec(any::<u8>(), 0..600),
        chunk in 1usize..32,
        auth in any::<bool>(),
        v4 in any::<bool>(),
    ) {
        let t = Target::Host("x.test".into(), 80);
        let req = match (v4, auth) {
            (true, _) => ClientRequest::socks4a(t, "u"),
            (false, true) => ClientRequest::connect(t, Some(("u", "p"))),
            (false, false) => ClientRequest::connect(t, None),
        };
        let (mut c, _) = ClientHandshake::new(req).unwrap();
        for piece in input.chunks(chunk) {
            match c.handle(piece) {
                Ok(p) => prop_assert!(p.consumed <= piece.len()),
                Err(_) => break,
            }
        }
    }
}
