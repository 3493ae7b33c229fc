//! The control ports of an in-process network's relay and proxy: first driven over TCP from Rust
//! (cookie authentication, circuit-status, NEWNYM and CIRC events, ns/all, BW events), then with
//! stem, unmodified (`tests/stem/check.py`: circuit listing, NEWNYM, BW events, GETCONF). The stem
//! part is skipped with a message when the Python found (`python3`, or `$ALLIUM_STEM_PYTHON`)
//! cannot `import stem`; `tests/stem/run.sh` installs stem in a venv and also runs Nyx.
#![allow(clippy::disallowed_methods)] // test code: a start time for the control port

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

use allium_control::ControlConfig;
use allium_tests::{Options, TestNet};

fn control_config() -> ControlConfig {
    ControlConfig {
        control_port: Some("127.0.0.1:0".parse().expect("address")),
        cookie_authentication: true,
        ..ControlConfig::default()
    }
}

/// A controller over TCP.
struct Ctl {
    s: BufReader<TcpStream>,
}

const T: Duration = Duration::from_secs(30);

impl Ctl {
    async fn connect(addr: std::net::SocketAddr, data_dir: &Path) -> Self {
        let mut c = Self {
            s: BufReader::new(TcpStream::connect(addr).await.expect("connect")),
        };
        let cookie = std::fs::read(data_dir.join("control_auth_cookie")).expect("cookie");
        assert_eq!(
            c.cmd(&format!("AUTHENTICATE {}", hex::encode(cookie)))
                .await,
            "250 OK\r\n"
        );
        c
    }
    async fn line(&mut self) -> String {
        let mut l = String::new();
        let n = tokio::time::timeout(T, self.s.read_line(&mut l))
            .await
            .expect("a line in time")
            .expect("read");
        assert!(n > 0, "connection closed");
        l
    }
    /// Send a command and read its reply (asynchronous 650 lines before it are skipped).
    async fn cmd(&mut self, c: &str) -> String {
        self.s
            .get_mut()
            .write_all(format!("{c}\r\n").as_bytes())
            .await
            .expect("write");
        let mut out = String::new();
        let mut in_data = false;
        loop {
            let l = self.line().await;
            if !in_data && l.starts_with("650") && out.is_empty() {
                continue;
            }
            out.push_str(&l);
            if in_data {
                in_data = l != ".\r\n";
            } else if l.as_bytes().get(3) == Some(&b'+') {
                in_data = true;
            } else if l.as_bytes().get(3) == Some(&b' ') {
                return out;
            }
        }
    }
}

/// Circuit ids and paths from a circuit-status reply.
fn built_circuits(reply: &str) -> Vec<(String, Vec<String>)> {
    reply
        .lines()
        .map(|l| l.trim_start_matches("250-circuit-status="))
        .filter_map(|l| {
            let mut f = l.split(' ');
            let id = f.next()?;
            (f.next()? == "BUILT").then(|| {
                (
                    id.to_owned(),
                    f.next()
                        .unwrap_or("")
                        .split(',')
                        .map(str::to_owned)
                        .collect(),
                )
            })
        })
        .collect()
}

async fn drive_from_rust(net: &TestNet, relay: std::net::SocketAddr, proxy: std::net::SocketAddr) {
    let mut p = Ctl::connect(proxy, &net.proxy_config.data_dir).await;
    let circs = built_circuits(&p.cmd("GETINFO circuit-status").await);
    assert!(!circs.is_empty(), "the ready proxy lists built circuits");
    for (_, path) in &circs {
        assert_eq!(path.len(), 3, "{path:?}");
        for hop in path {
            let (fp, nick) = hop
                .strip_prefix('$')
                .and_then(|h| h.split_once('~'))
                .expect("$FP~nick");
            assert!(
                fp.len() == 40 && fp.bytes().all(|b| b.is_ascii_hexdigit()),
                "{hop}"
            );
            assert!(!nick.is_empty());
        }
    }
    let old: BTreeSet<String> = circs.into_iter().map(|(id, _)| id).collect();
    assert_eq!(p.cmd("SETEVENTS CIRC").await, "250 OK\r\n");
    assert_eq!(p.cmd("SIGNAL NEWNYM").await, "250 OK\r\n");
    // Fresh circuits are reported as they are built: LAUNCHED, EXTENDED (path so far), BUILT.
    let mut launched: BTreeSet<String> = BTreeSet::new();
    let mut extended: BTreeSet<String> = BTreeSet::new();
    let (mut fresh, mut closed) = (false, BTreeSet::new());
    while !(fresh && closed == old) {
        let l = p.line().await;
        let mut f = l.trim_end().split(' ');
        let (Some("650"), Some("CIRC"), Some(id), Some(state)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        match state {
            "LAUNCHED" => {
                launched.insert(id.to_owned());
            }
            "EXTENDED" => {
                let path = f.next().unwrap_or("");
                assert!(path.starts_with('$') && path.split(',').count() < 3, "{l}");
                extended.insert(id.to_owned());
            }
            "BUILT" => {
                fresh |= !old.contains(id) && launched.contains(id) && extended.contains(id);
            }
            "CLOSED" => {
                closed.insert(id.to_owned());
            }
            _ => {}
        }
    }
    // Streams: every step of a SOCKS request, as it happens, then stream-status.
    assert_eq!(p.cmd("SETEVENTS CIRC STREAM").await, "250 OK\r\n");
    let (host, port) = net.http_target();
    let target = format!("{host}:{port}");
    let mut s = allium_tests::socks::connect(net.socks, &host, port, None, T)
        .await
        .expect("SOCKS connect");
    let mut steps: Vec<(String, String, String)> = Vec::new();
    while !steps.iter().any(|(_, st, _)| st == "SUCCEEDED") {
        let l = p.line().await;
        let f: Vec<&str> = l.trim_end().split(' ').collect();
        if let ["650", "STREAM", id, status, circ, t, ..] = f[..]
            && t == target
        {
            steps.push((id.to_owned(), status.to_owned(), circ.to_owned()));
        }
    }
    let statuses: Vec<&str> = steps.iter().map(|(_, st, _)| st.as_str()).collect();
    assert_eq!(statuses.first(), Some(&"NEW"), "{steps:?}");
    assert!(statuses.contains(&"SENTCONNECT"), "{steps:?}");
    let (sid, _, circ) = steps.last().cloned().expect("steps");
    assert_ne!(circ, "0", "a SUCCEEDED stream names its circuit");
    let status = p.cmd("GETINFO stream-status circuit-status").await;
    assert!(
        status.contains(&format!("{sid} SUCCEEDED {circ} {target}")),
        "{status}"
    );
    assert!(status.contains(&format!("{circ} BUILT $")), "{status}");
    let _ = allium_tests::http_exchange(&mut s, allium_tests::GET_HELLO, T).await;
    drop(s);
    loop {
        let l = p.line().await;
        if l.starts_with(&format!("650 STREAM {sid} CLOSED {circ} {target}")) {
            break;
        }
    }
    assert!(
        !p.cmd("GETINFO stream-status").await.contains(&target),
        "a closed stream is no longer listed"
    );
    // Traffic is counted per link frame: the request above moved whole frames both ways.
    let read: u64 = p
        .cmd("GETINFO traffic/read")
        .await
        .trim_start_matches("250-traffic/read=")
        .split("\r\n")
        .next()
        .and_then(|v| v.parse().ok())
        .expect("traffic/read");
    assert!(read >= 4 * 1024, "traffic/read {read}");

    let ns = p.cmd("GETINFO ns/all").await;
    assert_eq!(
        ns.lines().filter(|l| l.starts_with("r ")).count(),
        net.relay_configs.len(),
        "{ns}"
    );

    let mut r = Ctl::connect(relay, &net.relay_configs[0].data_dir).await;
    let fp = r.cmd("GETINFO fingerprint").await;
    let fp = fp
        .strip_prefix("250-fingerprint=")
        .and_then(|l| l.split("\r\n").next())
        .expect("fingerprint")
        .to_owned();
    let entry = r.cmd(&format!("GETINFO ns/id/{fp}")).await;
    assert!(
        entry.contains(&format!("r {} ", net.relay_configs[0].nickname)),
        "{entry}"
    );
    assert!(
        entry.contains("\r\ns ") && entry.contains("\r\nw Bandwidth="),
        "{entry}"
    );
    assert!(
        r.cmd("GETCONF Nickname ORPort")
            .await
            .contains(&format!("250-Nickname={}", net.relay_configs[0].nickname))
    );
    assert!(r.cmd("GETCONF NoSuchOption").await.starts_with("552 "));
    assert_eq!(r.cmd("SETEVENTS BW").await, "250 OK\r\n");
    let l = r.line().await;
    assert!(l.starts_with("650 BW "), "{l}");
}

#[test]
fn control_ports_of_relay_and_proxy() {
    let python = std::env::var("ALLIUM_STEM_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    allium_tests::init_logging();
    let net = TestNet::start(Options::default());
    let json = net.dir.path().join("control-testnet.json");
    let (relay_ctl, proxy_ctl) = net.rt.block_on(async {
        let backend = {
            let relays = net.relays.lock().expect("relays");
            relays
                .iter()
                .flatten()
                .next()
                .expect("a relay")
                .control_backend()
        };
        let relay_ctl = allium_control::start(
            &control_config(),
            &net.relay_configs[0].data_dir,
            None,
            Instant::now(),
            backend,
        )
        .await
        .expect("relay control port")
        .expect("configured");
        let proxy_ctl = allium_control::start(
            &control_config(),
            &net.proxy_config.data_dir,
            None,
            Instant::now(),
            net.proxy.control_backend(),
        )
        .await
        .expect("proxy control port")
        .expect("configured");
        (relay_ctl, proxy_ctl)
    });
    let (relay_addr, proxy_addr) = (
        relay_ctl.tcp_addr().expect("tcp"),
        proxy_ctl.tcp_addr().expect("tcp"),
    );
    net.rt
        .block_on(drive_from_rust(&net, relay_addr, proxy_addr));

    // Not from this crate's directory: its `stem/` folder would pass for the package.
    let has_stem = Command::new(&python)
        .args(["-c", "import stem.control"])
        .current_dir(net.dir.path())
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_stem {
        println!(
            "stem part skipped: `{python} -c 'import stem'` failed; install stem (pip install stem) \
             or set ALLIUM_STEM_PYTHON to a Python that has it (bash tests/stem/run.sh does this)"
        );
        net.rt.block_on(async {
            relay_ctl.stop().await;
            proxy_ctl.stop().await;
        });
        return;
    }
    let info = serde_json::json!({
        "socks": net.socks.to_string(),
        "http_target": net.http.to_string(),
        "nodes": [
            {"role": "relay", "control_port": relay_addr.to_string()},
            {"role": "client", "control_port": proxy_addr.to_string()},
        ],
    });
    std::fs::write(&json, info.to_string()).expect("write json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("stem/check.py");
    let out = Command::new(&python)
        .current_dir(net.dir.path())
        .arg(&script)
        .arg(&json)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("stem checks passed"),
        "stem checks failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    net.rt.block_on(async {
        relay_ctl.stop().await;
        proxy_ctl.stop().await;
    });
}
