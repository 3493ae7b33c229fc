//! Onion services over a whole test network on loopback: a second proxy runs a service from a
//! `[[onion_service]]` table (the service driver) in front of the test page and an echo server,
//! and the network's proxy reaches it through its SOCKS port by the `.allium.alt` name (the
//! client driver): the page, 20 MiB each way byte-exact, a kept rendezvous circuit, a restart on
//! the same key directory, client authorization.
//!
//! A replayed INTRODUCE1 is refused by the introduction point: covered over real relays in
//! `onion_net.rs` and in the simulated overlay in `onion_service.rs`
//! (`a_replayed_introduce_is_refused_at_the_intro_point`); the service's own replay cache in
//! `onion_service.rs` (`handle_introduce2` twice).

// Whole-network tests: bounded real-time waits.
#![allow(clippy::disallowed_methods)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use allium_client::config::OnionServiceConfig;
use allium_client::onion::keys;
use allium_client::{ProxyHandle, onion::PortMapping};
use allium_crypto::X25519Secret;
use allium_tests::{GET_HELLO, Options, TestNet, http_exchange, httpd, socks, spawn_echo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One SOCKS exchange's bound.
const T: Duration = Duration::from_secs(60);
/// How long a freshly started service may take to be reachable (introduction circuits and
/// the descriptor upload).
const PUBLISH: Duration = Duration::from_secs(40);

/// A service proxy on `net` with one `[[onion_service]]` in `key_dir`: port 80 to the test
/// page, port 7 to `echo`.
async fn start_service(
    net: &TestNet,
    data: &Path,
    key_dir: &Path,
    echo: u16,
    authorized: Option<&Path>,
) -> ProxyHandle {
    start_service_pow(net, data, key_dir, echo, authorized, false).await
}

/// [`start_service`], with proof of work on or off.
async fn start_service_pow(
    net: &TestNet,
    data: &Path,
    key_dir: &Path,
    echo: u16,
    authorized: Option<&Path>,
    pow: bool,
) -> ProxyHandle {
    let mut cfg = net.proxy_config(data);
    cfg.socks_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.onion_service = vec![OnionServiceConfig {
        name: "web".to_owned(),
        key_dir: key_dir.to_path_buf(),
        ports: vec![
            format!("80 -> {}", net.http)
                .parse::<PortMapping>()
                .expect("mapping"),
            format!("7 -> 127.0.0.1:{echo}")
                .parse::<PortMapping>()
                .expect("mapping"),
        ],
        authorized_clients: authorized.map(Path::to_path_buf),
        pow,
        pow_queue_rate: allium_client::onion::pow::DEFAULT_QUEUE_RATE,
        pow_queue_burst: allium_client::onion::pow::DEFAULT_QUEUE_BURST,
    }];
    let p = allium_client::start(cfg)
        .await
        .expect("service proxy starts");
    p.wait_ready(Duration::from_secs(30))
        .await
        .expect("service proxy ready");
    p
}

/// `GET /` on the service by its address through `proxy`, retried until the service's
/// descriptor is up (at most [`PUBLISH`]); the first other error, or the last one.
async fn get_page(
    proxy: SocketAddr,
    addr: &str,
    auth: Option<(&str, &str)>,
) -> Result<Vec<u8>, socks::SocksClientError> {
    let deadline = Instant::now() + PUBLISH;
    loop {
        match socks::connect(proxy, addr, 80, auth, T).await {
            Ok(mut s) => {
                let resp = http_exchange(&mut s, GET_HELLO, T).await?;
                return Ok(resp);
            }
            // 0xF0: no descriptor yet (the service has not uploaded); 0xF2: the HSDirs still
            // hold the descriptor of a service that restarted (its introduction points are
            // gone), until its new one is uploaded.
            Err(e) if matches!(e.reply_code(), Some(0xF0 | 0xF2)) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // Seen once in about ten runs of the whole file (three networks at once): the
            // proxy reset a SOCKS connection instead of replying. Not yet explained (see the
            // wave-2 closing note); retried within the deadline and reported, so a proxy that
            // keeps resetting still fails the test.
            Err(socks::SocksClientError::Io(e))
                if e.kind() == std::io::ErrorKind::ConnectionReset && Instant::now() < deadline =>
            {
                eprintln!("the proxy reset a SOCKS connection to the onion service; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn metric(page: &str, line_start: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn assert_page(resp: &[u8]) {
    let (status, body) = allium_tests::split_response(resp).expect("an HTTP response");
    assert!(status.contains("200"), "{status}");
    assert_eq!(body, httpd::HELLO.as_bytes());
}

#[test]
fn the_page_and_20_mib_each_way_through_an_onion_service_and_again_after_a_restart() {
    allium_tests::init_logging();
    let net = TestNet::start(Options::default());
    let tmp = tempfile::tempdir().expect("tmp");
    let kd = tmp.path().join("svc-keys");
    let (_, addr) = keys::load_or_create_identity(&kd).expect("keys");
    let addr = addr.to_string();
    net.rt.block_on(async {
        let echo = spawn_echo().await.expect("echo");
        let svc = start_service(&net, &tmp.path().join("svc"), &kd, echo, None).await;
        let t0 = Instant::now();
        let resp = get_page(net.socks, &addr, None).await.expect("the page");
        assert_page(&resp);
        eprintln!(
            "first page through the onion service after {:?}",
            t0.elapsed()
        );
        let m = net.proxy.metrics_text();
        let attempts = metric(&m, "allium_onion_connect_attempts_total ");
        assert!(attempts >= 1.0, "{m}");
        assert!(metric(&m, "allium_onion_connections_total{outcome=\"success\"} ") >= 1.0);
        assert!(
            metric(
                &m,
                "allium_onion_descriptor_fetches_total{result=\"found\"} "
            ) >= 1.0
        );
        assert!(!m.contains(&addr[..20]), "no address on the metrics page");

        // curl, as a user would run it, through the SOCKS port by the onion name.
        let (socks_at, url) = (net.socks.to_string(), format!("http://{addr}/"));
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new("curl")
                .args([
                    "-sS",
                    "--max-time",
                    "60",
                    "--socks5-hostname",
                    &socks_at,
                    &url,
                ])
                .output()
        })
        .await
        .expect("curl task");
        match out {
            Ok(o) => {
                assert!(
                    o.status.success(),
                    "curl: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                assert_eq!(o.stdout, httpd::HELLO.as_bytes(), "the page through curl");
            }
            Err(e) => eprintln!("SKIPPED the curl step: curl is not installed ({e})"),
        }
        let attempts = metric(
            &net.proxy.metrics_text(),
            "allium_onion_connect_attempts_total ",
        );

        // The same isolation again: the kept rendezvous circuit, no new introduction.
        let resp = get_page(net.socks, &addr, None)
            .await
            .expect("the page again");
        assert_page(&resp);
        let m = net.proxy.metrics_text();
        assert_eq!(
            metric(&m, "allium_onion_connect_attempts_total "),
            attempts,
            "a second stream reuses the joined circuit"
        );

        // 20 MiB each way through the echo service, at once, byte-exact.
        const N: usize = 20 << 20;
        let s = socks::connect(net.socks, &addr, 7, None, T)
            .await
            .expect("echo stream");
        let (mut r, mut w) = s.into_split();
        let up = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut off = 0u64;
            while (off as usize) < N {
                httpd::fill_pattern(off, &mut buf);
                w.write_all(&buf).await?;
                off += buf.len() as u64;
            }
            w.shutdown().await?;
            Ok::<_, std::io::Error>(())
        });
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut want = vec![0u8; 64 * 1024];
        let t1 = Instant::now();
        tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let n = r.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                httpd::fill_pattern(got, &mut want[..n]);
                assert_eq!(&buf[..n], &want[..n], "byte-exact at offset {got}");
                got += n as u64;
            }
        })
        .await
        .expect("the echo ends in time");
        up.await.expect("uploader").expect("upload");
        assert_eq!(got, N as u64, "every byte came back");
        eprintln!(
            "20 MiB each way through the rendezvous in {:?}",
            t1.elapsed()
        );

        // The service restarts on the same key directory: same address, reachable again
        // (its new descriptor replaces the old one). New credentials: a new rendezvous.
        svc.shutdown().await;
        let _svc2 = start_service(&net, &tmp.path().join("svc2"), &kd, echo, None).await;
        let resp = get_page(net.socks, &addr, Some(("after", "restart")))
            .await
            .expect("the page after the restart");
        assert_page(&resp);
    });
}

#[test]
fn client_authorization_refuses_a_client_without_the_key_and_accepts_one_with_it() {
    allium_tests::init_logging();
    let net = TestNet::start(Options::default());
    let tmp = tempfile::tempdir().expect("tmp");
    let kd = tmp.path().join("svc-keys");
    let (_, addr) = keys::load_or_create_identity(&kd).expect("keys");
    let addr = addr.to_string();
    // Alice's key: the service lists her public key, her proxy holds the secret.
    let alice = X25519Secret::from_bytes([0xA1; 32]);
    let auth_dir = tmp.path().join("authorized");
    std::fs::create_dir(&auth_dir).expect("dir");
    std::fs::write(
        auth_dir.join("alice.auth"),
        format!("descriptor:x25519:{}\n", hex(&alice.public().0)),
    )
    .expect("auth file");
    // Her side, as Tor lays it out: `<address>:descriptor:x25519:<secret>`, mode 0600.
    let client_dir = tmp.path().join("client-auth");
    std::fs::create_dir(&client_dir).expect("dir");
    let f = client_dir.join("web.auth_private");
    std::fs::write(
        &f,
        format!("{addr}:descriptor:x25519:{}\n", hex(&[0xA1; 32])),
    )
    .expect("key file");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("0600");
    }
    net.rt.block_on(async {
        let echo = spawn_echo().await.expect("echo");
        let _svc = start_service(&net, &tmp.path().join("svc"), &kd, echo, Some(&auth_dir)).await;
        // The network's proxy has no key: refused with "client authorization missing" once
        // the descriptor is up.
        let err = get_page(net.socks, &addr, None)
            .await
            .expect_err("refused without the key");
        assert_eq!(err.reply_code(), Some(0xF4), "{err}");
        // A proxy with Alice's key gets the page.
        let mut cfg = net.proxy_config(&tmp.path().join("alice"));
        cfg.onion_client_auth_dir = Some(client_dir.clone());
        cfg.socks_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let alice_proxy = allium_client::start(cfg).await.expect("alice's proxy");
        alice_proxy
            .wait_ready(Duration::from_secs(30))
            .await
            .expect("ready");
        let resp = get_page(alice_proxy.socks_addr(), &addr, None)
            .await
            .expect("alice gets the page");
        assert_page(&resp);
    });
}

#[test]
fn the_page_through_a_service_with_proof_of_work_on() {
    allium_tests::init_logging();
    let net = TestNet::start(Options::default());
    let tmp = tempfile::tempdir().expect("tmp");
    let kd = tmp.path().join("svc-keys");
    let (_, addr) = keys::load_or_create_identity(&kd).expect("keys");
    let addr = addr.to_string();
    net.rt.block_on(async {
        let echo = spawn_echo().await.expect("echo");
        let svc = start_service_pow(&net, &tmp.path().join("svc"), &kd, echo, None, true).await;
        // The introduction goes through the effort-ordered queue and its dispatcher.
        let resp = get_page(net.socks, &addr, None).await.expect("the page");
        assert_page(&resp);
        let m = svc.metrics_text();
        assert!(
            metric(
                &m,
                "allium_onion_service_introductions_total{outcome=\"accepted\"} "
            ) >= 1.0,
            "{m}"
        );
        assert_eq!(metric(&m, "allium_onion_service_pow_queued "), 0.0, "{m}");
        assert!(
            m.contains("\nallium_onion_service_pow_suggested_effort "),
            "{m}"
        );
        assert_eq!(
            metric(&m, "allium_onion_service_pow_suggested_effort "),
            0.0,
            "no load, no effort asked"
        );
    });
}
