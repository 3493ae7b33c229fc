//! A whole network run with every node logging at debug level into one buffer: no line may
//! carry a stream's destination (host name, `host:port`, `ip:port`), the SOCKS credentials, or
//! any secret key of the relays and authorities (read from their data directories, searched as
//! hex, upper-case hex, a 16-digit hex prefix and base64).
//!
//! Its own test binary, so that the capturing subscriber is the process's global one.

// Whole-network tests run real nodes on real sockets; their waits are bounded real time.
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use allium_tests::{EXIT_ONLY_NAME, Options, REFUSED_PORT, TestNet, socks, spawn_echo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

const T: Duration = Duration::from_secs(60);
/// A name no resolver knows: the exit's lookup fails (the error paths log too).
const UNKNOWN_NAME: &str = "zq-unlisted-destination-5e1d.allium.test";
const USER: &str = "scraper-user-Xyzzy7781";
const PASS: &str = "hunter2-Plugh4242";
const USER2: &str = "second-user-Frotz9093";
const PASS2: &str = "second-pass-Gnusto5150";

/// Every formatted log line, appended.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

/// The secret keys in plain key files (`allium-<kind>-v1` then 64 hex digits) under `dir`, as
/// (file, 32 bytes).
fn secret_keys(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            secret_keys(&p, out);
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        let mut lines = text.lines();
        let (Some(head), Some(body)) = (lines.next(), lines.next()) else {
            continue;
        };
        if head.starts_with("allium-")
            && head.ends_with("-v1")
            && let Ok(bytes) = hex::decode(body.trim())
            && bytes.len() == 32
        {
            out.push((p.display().to_string(), bytes));
        }
    }
}

#[test]
fn debug_logs_carry_no_destination_credential_or_key() {
    let capture = Capture::default();
    let writer = capture.clone();
    // The binary's subscriber: the operator's filter (here `debug`) beside its privacy filter.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish()
        .with(allium::logging::privacy_filter())
        .init();

    let net = TestNet::start(Options {
        relays: 4,
        exits: 2,
        ..Options::default()
    });
    let port = net.rt.block_on(async {
        let port = spawn_echo().await.expect("echo server");
        // Streams that work, each isolated by its credentials.
        for (user, pass) in [(USER, PASS), (USER2, PASS2), (USER, PASS)] {
            let mut s = socks::connect(net.socks, EXIT_ONLY_NAME, port, Some((user, pass)), T)
                .await
                .expect("SOCKS connect through the network");
            s.write_all(b"ping").await.expect("write");
            let mut back = [0u8; 4];
            tokio::time::timeout(T, s.read_exact(&mut back))
                .await
                .expect("echo in time")
                .expect("echo");
            assert_eq!(&back, b"ping");
        }
        // A name the exit resolves (RESOLVE), one it cannot, and a port its policy refuses.
        let ip = socks::resolve(net.socks, EXIT_ONLY_NAME, Some((USER, PASS)), T)
            .await
            .expect("RESOLVE at the exit");
        assert!(ip.is_loopback());
        // With optimistic SOCKS replies these "succeed"; the exit's refusal then ends the
        // stream, which we wait for so that every node has logged what it does about it.
        for (host, p, auth) in [
            (UNKNOWN_NAME, port, (USER2, PASS2)),
            (EXIT_ONLY_NAME, REFUSED_PORT, (USER, PASS)),
        ] {
            if let Ok(mut s) = socks::connect(net.socks, host, p, Some(auth), T).await {
                let _ = s.write_all(b"ping").await;
                let mut buf = [0u8; 16];
                let got = tokio::time::timeout(T, s.read(&mut buf)).await;
                assert!(
                    !matches!(got, Ok(Ok(n)) if n > 0),
                    "a refused destination answered"
                );
            }
        }
        port
    });
    let mut keys = Vec::new();
    secret_keys(net.dir.path(), &mut keys);
    drop(net);

    let text =
        String::from_utf8_lossy(&capture.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    let n_debug = text.lines().filter(|l| l.contains("DEBUG")).count();
    assert!(
        n_debug > 50,
        "the capture holds debug lines ({n_debug}): the test sees the logs it checks"
    );
    // Relays (identity, link, onion) and authorities (signing key; the identity too, when it is
    // a plain file) of 3 authorities and 4 relays.
    assert!(keys.len() >= 4 * 3 + 3, "found {} key files", keys.len());

    let mut needles: Vec<(String, String)> = vec![
        ("destination host".into(), EXIT_ONLY_NAME.into()),
        ("unresolvable destination host".into(), UNKNOWN_NAME.into()),
        (
            "destination host:port".into(),
            format!("{EXIT_ONLY_NAME}:{port}"),
        ),
        (
            "refused destination host:port".into(),
            format!("{EXIT_ONLY_NAME}:{REFUSED_PORT}"),
        ),
        ("destination ip:port".into(), format!("127.0.0.1:{port}")),
        ("SOCKS username".into(), USER.into()),
        ("SOCKS password".into(), PASS.into()),
        ("SOCKS username".into(), USER2.into()),
        ("SOCKS password".into(), PASS2.into()),
    ];
    for (file, k) in &keys {
        let h = hex::encode(k);
        needles.push((format!("key {file} (hex prefix)"), h[..16].to_owned()));
        needles.push((
            format!("key {file} (upper hex)"),
            h.to_uppercase()[..16].to_owned(),
        ));
        needles.push((format!("key {file} (base64)"), base64(k)[..20].to_owned()));
        needles.push((format!("key {file} (hex)"), h));
    }
    for line in text.lines() {
        for (what, needle) in &needles {
            assert!(
                !line.contains(needle.as_str()),
                "a log line carries the {what}: {line}"
            );
        }
    }
}
