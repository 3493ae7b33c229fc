//! The proxy's other ports on one shared network: the HTTP CONNECT tunnel (driven by curl),
//! the DNS port, the SOCKS port's answer to HTTP, and the embeddable client.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use allium_client::Client;
use allium_tests::{
    EXIT_ONLY_NAME, GET_HELLO, Options, REFUSED_PORT, TestNet, http_exchange, httpd, split_response,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const T: Duration = Duration::from_secs(60);

fn net() -> &'static TestNet {
    static NET: OnceLock<TestNet> = OnceLock::new();
    NET.get_or_init(|| {
        allium_tests::init_logging();
        TestNet::start(Options::default())
    })
}

fn tunnel_addr(net: &TestNet) -> SocketAddr {
    net.proxy
        .http_tunnel_addr()
        .expect("the test network's proxy has an HTTP CONNECT port")
}

/// Run curl through the tunnel port; `None` (with a message) when curl is not installed.
fn curl(net: &TestNet, url: &str) -> Option<(String, String)> {
    let proxy = format!("http://{}", tunnel_addr(net));
    let out = match Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "60",
            "--proxytunnel",
            "--proxy",
            &proxy,
        ])
        .args(["-w", "\n%{http_connect}", url])
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIPPED: curl is not installed ({e})");
            return None;
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, connect) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    Some((body.to_owned(), connect.trim().to_owned()))
}

#[test]
fn curl_through_the_http_connect_port() {
    let net = net();
    let (host, port) = net.http_target();
    let Some((body, connect)) = curl(net, &format!("http://{host}:{port}/")) else {
        return;
    };
    assert_eq!(connect, "200");
    assert_eq!(body, httpd::HELLO);
    // A name only the exit can resolve: curl sends it in CONNECT unresolved.
    let (body, connect) = curl(net, &format!("http://{EXIT_ONLY_NAME}:{port}/")).unwrap();
    assert_eq!(connect, "200");
    assert_eq!(body, httpd::HELLO);
    // A port every exit refuses: a 5xx from the tunnel, not a hang.
    let (_, connect) = curl(net, &format!("http://{host}:{REFUSED_PORT}/")).unwrap();
    assert_eq!(connect, "502");
}

#[test]
fn http_connect_port_raw_exchange_and_405() {
    let net = net();
    net.rt.block_on(async {
        let (host, port) = net.http_target();
        // CONNECT with the first request bytes in the same segment: they are stream data.
        let mut s = tokio::net::TcpStream::connect(tunnel_addr(net))
            .await
            .unwrap();
        let mut req = format!(
            "CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\
             Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\r\n"
        )
        .into_bytes();
        req.extend_from_slice(GET_HELLO);
        let resp = http_exchange(&mut s, &req, T).await.expect("exchange");
        let text = String::from_utf8_lossy(&resp);
        assert!(
            text.starts_with("HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200"),
            "{text}"
        );
        assert!(text.ends_with(httpd::HELLO), "{text}");

        let mut s = tokio::net::TcpStream::connect(tunnel_addr(net))
            .await
            .unwrap();
        let resp = http_exchange(&mut s, GET_HELLO, T).await.expect("exchange");
        let (status, body) = split_response(&resp).expect("a response");
        assert!(status.starts_with("HTTP/1.1 405"), "{status}");
        assert!(String::from_utf8_lossy(body).contains("HTTP CONNECT tunnel"));
    });
}

#[test]
fn socks_port_answers_http_with_a_501_page() {
    let net = net();
    net.rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect(net.socks).await.unwrap();
        let resp = http_exchange(&mut s, GET_HELLO, T)
            .await
            .expect("a response, not a reset");
        let (status, body) = split_response(&resp).expect("a response");
        assert!(status.starts_with("HTTP/1.0 501"), "{status}");
        let body = String::from_utf8_lossy(body);
        assert!(body.contains("SOCKS proxy, not an HTTP proxy"));
        // It names the tunnel port to use instead.
        let tunnel = tunnel_addr(net);
        if net
            .proxy_config
            .http_tunnel_port
            .is_some_and(|a| a.port() != 0)
        {
            assert!(body.contains(&tunnel.to_string()));
        } else {
            assert!(body.contains("http_tunnel_port"));
        }
    });
}

/// A DNS query as a stub resolver writes it.
fn dns_query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

async fn ask(sock: &tokio::net::UdpSocket, msg: &[u8]) -> Vec<u8> {
    sock.send(msg).await.expect("send a DNS query");
    let mut buf = vec![0u8; 1500];
    let n = tokio::time::timeout(T, sock.recv(&mut buf))
        .await
        .expect("a DNS answer in time")
        .expect("receive a DNS answer");
    buf.truncate(n);
    buf
}

#[test]
fn dns_port_resolves_through_an_exit_and_refuses_the_rest() {
    let net = net();
    let dns = net.proxy.dns_addr().expect("a DNS port");
    net.rt.block_on(async {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(dns).await.unwrap();

        let q = dns_query(0x1234, EXIT_ONLY_NAME, 1);
        let a = ask(&sock, &q).await;
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0x0F, 0, "NOERROR");
        assert_eq!(&a[6..8], &[0, 1], "one answer");
        assert_eq!(&a[q.len() + 10..q.len() + 12], &[0, 4], "RDLENGTH 4");
        let ip = Ipv4Addr::new(
            a[q.len() + 12],
            a[q.len() + 13],
            a[q.len() + 14],
            a[q.len() + 15],
        );
        assert_eq!(IpAddr::V4(ip), IpAddr::V4(Ipv4Addr::LOCALHOST));

        // AAAA for a name with only an IPv4 address: an empty NOERROR answer.
        let a = ask(&sock, &dns_query(2, EXIT_ONLY_NAME, 28)).await;
        assert_eq!(a[3] & 0x0F, 0);
        assert_eq!(&a[6..8], &[0, 0]);
        // PTR: REFUSED; ANY: NOTIMP; garbage: FORMERR.
        let a = ask(&sock, &dns_query(3, "1.0.0.127.in-addr.arpa", 12)).await;
        assert_eq!(a[3] & 0x0F, 5);
        let a = ask(&sock, &dns_query(4, EXIT_ONLY_NAME, 255)).await;
        assert_eq!(a[3] & 0x0F, 4);
        let a = ask(&sock, &[0, 5, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0]).await;
        assert_eq!(&a[..2], &[0, 5]);
        assert_eq!(a[3] & 0x0F, 1);
    });
}

/// Read one length-prefixed DNS message from a TCP stream.
async fn read_tcp_answer(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut len = [0u8; 2];
    tokio::time::timeout(T, s.read_exact(&mut len))
        .await
        .expect("an answer in time")
        .expect("an answer length");
    let mut a = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut a).await.expect("the whole answer");
    a
}

#[test]
fn dns_port_answers_over_tcp() {
    let net = net();
    let dns = net.proxy.dns_addr().expect("a DNS port");
    net.rt.block_on(async {
        // Two queries in one write, answered in order on the same connection.
        let mut s = tokio::net::TcpStream::connect(dns).await.unwrap();
        let q1 = dns_query(7, EXIT_ONLY_NAME, 1);
        let q2 = dns_query(8, "1.0.0.127.in-addr.arpa", 12);
        let mut out = Vec::new();
        for q in [&q1, &q2] {
            out.extend_from_slice(&(q.len() as u16).to_be_bytes());
            out.extend_from_slice(q);
        }
        s.write_all(&out).await.unwrap();
        let a = read_tcp_answer(&mut s).await;
        assert_eq!(&a[..2], &[0, 7]);
        assert_eq!(a[3] & 0x0F, 0, "NOERROR");
        assert_eq!(&a[6..8], &[0, 1], "one answer");
        assert_eq!(&a[q1.len() + 12..q1.len() + 16], &[127, 0, 0, 1]);
        let a = read_tcp_answer(&mut s).await;
        assert_eq!(&a[..2], &[0, 8]);
        assert_eq!(a[3] & 0x0F, 5, "PTR is REFUSED over TCP too");
        // A length beyond the bound closes the connection without an answer.
        let mut s = tokio::net::TcpStream::connect(dns).await.unwrap();
        s.write_all(&[0xFF, 0xFF, 0, 0]).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(T, s.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0);
    });
    // A real resolver library over TCP, when installed (dnspython).
    let script = format!(
        "import dns.message, dns.query\n\
         q = dns.message.make_query('{EXIT_ONLY_NAME}', 'A')\n\
         r = dns.query.tcp(q, '{}', port={}, timeout=60)\n\
         print(r.rcode(), ' '.join(a.to_text() for rr in r.answer for a in rr))\n",
        dns.ip(),
        dns.port()
    );
    match Command::new("python3").args(["-c", &script]).output() {
        Ok(o) if o.status.success() => {
            let out = String::from_utf8_lossy(&o.stdout);
            assert_eq!(out.trim(), "0 127.0.0.1", "dnspython's answer");
        }
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named 'dns'") => {
            eprintln!("SKIPPED: dnspython is not installed (pip install dnspython)");
        }
        Ok(o) => panic!("dnspython failed: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => eprintln!("SKIPPED: python3 is not available ({e})"),
    }
}

#[test]
fn embedded_client_fetches_the_test_page() {
    let net = net();
    let dir = tempfile::tempdir().unwrap();
    net.rt.block_on(async {
        let mut cfg = net.proxy_config(dir.path());
        cfg.http_tunnel_port = None;
        cfg.dns_port = None;
        let client = Client::bootstrap(cfg).await.expect("bootstrap");
        let (host, port) = net.http_target();
        for c in [client.clone(), client.isolated()] {
            let mut s = c.connect((host.as_str(), port)).await.expect("connect");
            s.write_all(GET_HELLO).await.unwrap();
            let mut resp = Vec::new();
            tokio::time::timeout(T, s.read_to_end(&mut resp))
                .await
                .expect("in time")
                .expect("a clean end");
            let (status, body) = split_response(&resp).expect("a response");
            assert!(status.contains("200"), "{status}");
            assert_eq!(body, httpd::HELLO.as_bytes());
        }
        // Two tokens, two dirty circuits.
        let dirty = client
            .handle()
            .circuits()
            .iter()
            .filter(|c| c.dirty)
            .count();
        assert!(dirty >= 2, "streams of two tokens shared a circuit");
        assert_eq!(
            client.resolve(EXIT_ONLY_NAME).await.expect("resolve"),
            vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
        );
        // A port no exit allows is refused before any circuit is used.
        assert!(client.connect((host.as_str(), REFUSED_PORT)).await.is_err());
    });
}

/// GET `/metrics` from `addr` and return the body, checking the status and content type.
async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics port");
    let resp = http_exchange(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", T)
        .await
        .expect("scrape");
    let (status, body) = split_response(&resp).expect("an HTTP response");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let head = String::from_utf8_lossy(&resp[..resp.len() - body.len()]).into_owned();
    assert!(head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"));
    String::from_utf8(body.to_vec()).expect("UTF-8")
}

/// Cells and bytes count the same link frames: the cells' bytes are the frames' bytes less the
/// per-frame overhead (length prefix and tag, a few percent at most).
fn cells_fill_frames(who: &str, dir: &str, cells: f64, bytes: f64) {
    let cell_bytes = cells * allium_proto::cell::CELL_LEN as f64;
    assert!(
        cell_bytes <= bytes && cell_bytes >= 0.8 * bytes,
        "{who} {dir}: {cells} cells in {bytes} bytes of frames"
    );
}

#[test]
fn proxy_and_relay_metrics_follow_the_exposition_format() {
    use allium_tests::promtext::{check, value};
    let net = net();
    let addr = net.proxy.metrics_addr().expect("a metrics port");
    net.rt.block_on(async {
        // Make sure one SOCKS request of a known outcome happened.
        let mut s = tokio::net::TcpStream::connect(net.socks).await.unwrap();
        let _ = http_exchange(&mut s, GET_HELLO, T).await;
        let text = scrape(addr).await;
        let page = check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(value(&page, "allium_bootstrap_percent", &[]), Some(100.0));
        assert!(value(&page, "allium_circuits_created_total", &[]).unwrap() >= 1.0);
        assert!(value(&page, "allium_circuit_build_seconds_count", &[]).unwrap() >= 1.0);
        assert!(
            value(
                &page,
                "allium_socks_requests_total",
                &[("outcome", "wrong_protocol")]
            )
            .unwrap()
                >= 1.0
        );
        // Link traffic is counted per frame: a request through the network moved bytes.
        for dir in ["read", "written"] {
            let b = value(&page, "allium_proxy_bytes_total", &[("direction", dir)]).unwrap();
            assert!(b >= 1024.0, "proxy {dir} {b} bytes");
            let c = value(&page, "allium_proxy_cells_total", &[("direction", dir)]).unwrap();
            cells_fill_frames("proxy", dir, c, b);
        }
        let age = value(&page, "allium_consensus_age_seconds", &[]).unwrap();
        assert!((0.0..7200.0).contains(&age), "consensus age {age}");
        for fam in [
            "allium_circuits_open",
            "allium_streams_open",
            "allium_dns_queries_total",
        ] {
            assert!(page.contains_key(fam), "no {fam}");
        }
    });
    // Every relay's page, and the flags the consensus gave them.
    let relays = net.relays.lock().unwrap();
    let mut guards = 0.0;
    let mut exits = 0.0;
    let mut relays_read = 0.0;
    for r in relays.iter().flatten() {
        let text = r.metrics_text();
        let page = check(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(value(&page, "allium_bootstrap_percent", &[]), Some(100.0));
        assert_eq!(
            value(&page, "allium_relay_flag", &[("flag", "Running")]),
            Some(1.0)
        );
        let read = value(&page, "allium_relay_bytes_total", &[("direction", "read")]).unwrap();
        assert!(read <= r.link_traffic().0 as f64);
        // A relay on none of the proxy's circuits may have seen only handshakes (frames are
        // counted after them): the network as a whole read from its links.
        relays_read += read;
        for dir in ["read", "written"] {
            let b = value(&page, "allium_relay_bytes_total", &[("direction", dir)]).unwrap();
            let c = value(&page, "allium_relay_cells_total", &[("direction", dir)]).unwrap();
            cells_fill_frames("relay", dir, c, b);
        }
        guards += value(&page, "allium_relay_flag", &[("flag", "Guard")]).unwrap();
        exits += value(&page, "allium_relay_flag", &[("flag", "Exit")]).unwrap();
        assert!(
            value(
                &page,
                "allium_dos_rejections_total",
                &[("reason", "queue_overflow")]
            )
            .is_some()
        );
    }
    assert!(
        guards >= 1.0 && exits >= 1.0,
        "guards {guards}, exits {exits}"
    );
    assert!(relays_read > 0.0, "the relays read from their links");
}

#[test]
fn the_grafana_dashboard_uses_only_metrics_that_exist() {
    let net = net();
    let dash = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/grafana/allium.json"),
    )
    .expect("contrib/grafana/allium.json");
    let json: serde_json::Value = serde_json::from_str(&dash).expect("valid JSON");
    assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()));
    let mut pages = net.proxy.metrics_text();
    for r in net.relays.lock().unwrap().iter().flatten() {
        pages.push_str(&r.metrics_text());
    }
    let mut used = 0;
    for (i, _) in dash.match_indices("allium_") {
        let name: String = dash[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name == "allium_" || name.starts_with("allium_overview") {
            continue;
        }
        used += 1;
        assert!(
            pages
                .lines()
                .any(|l| l.starts_with(&format!("# TYPE {} ", name.trim_end_matches("_bucket")))),
            "the dashboard uses {name}, which no page has"
        );
    }
    assert!(used >= 10);
}
