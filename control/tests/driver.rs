//! The control port's tokio driver over real loopback TCP and a Unix socket.
#![allow(clippy::unwrap_used, clippy::disallowed_methods)] // test code: fail loudly, read the clock

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use allium_control::{
    Bootstrap, CircuitStatus, ConfOption, ControlBackend, ControlConfig, Now, OrConnStatus,
    Request, Signal, StreamStatus,
};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpStream, UnixStream};

#[derive(Default)]
struct Backend {
    read: AtomicU64,
}

impl ControlBackend for Backend {
    fn role(&self) -> &'static str {
        "relay"
    }
    fn getinfo(&self, key: &str, _now: &Now) -> Option<Result<String, String>> {
        (key == "fingerprint").then(|| Ok("AB".repeat(20)))
    }
    fn info_names(&self) -> Vec<(&'static str, &'static str)> {
        vec![("fingerprint", "Relay fingerprint.")]
    }
    fn options(&self) -> Vec<ConfOption> {
        Vec::new()
    }
    fn set_options(&self, _: &[(&'static str, Vec<String>)]) -> Result<(), String> {
        Ok(())
    }
    fn signal(&self, _: Signal) -> Result<(), String> {
        Ok(())
    }
    fn traffic(&self) -> (u64, u64) {
        (self.read.load(Ordering::Relaxed), 0)
    }
    fn circuits(&self, _: &Now) -> Vec<CircuitStatus> {
        Vec::new()
    }
    fn streams(&self, _: &Now) -> Vec<StreamStatus> {
        Vec::new()
    }
    fn orconns(&self, _: &Now) -> Vec<OrConnStatus> {
        Vec::new()
    }
    fn bootstrap(&self) -> Bootstrap {
        Bootstrap {
            progress: 100,
            tag: "done",
            summary: "Done",
        }
    }
}

struct Ctl<S> {
    s: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Ctl<S> {
    async fn line(&mut self) -> Option<String> {
        let mut l = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), self.s.read_line(&mut l))
            .await
            .expect("reply in time")
            .ok()?;
        (n > 0).then_some(l)
    }
    /// Send a command; read its whole reply (up to a line `CODE ` with a space).
    async fn cmd(&mut self, c: &str) -> String {
        self.s
            .get_mut()
            .write_all(format!("{c}\r\n").as_bytes())
            .await
            .unwrap();
        self.reply().await
    }
    async fn reply(&mut self) -> String {
        let mut out = String::new();
        let mut in_data = false;
        while let Some(l) = self.line().await {
            out.push_str(&l);
            if in_data {
                in_data = l != ".\r\n";
                continue;
            }
            if l.as_bytes().get(3) == Some(&b'+') {
                in_data = true;
            } else if l.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        }
        out
    }
}

async fn start(
    cfg: ControlConfig,
    dir: &std::path::Path,
) -> (allium_control::ControlServer, Arc<Backend>) {
    let b = Arc::new(Backend::default());
    let srv = allium_control::start(&cfg, dir, None, Instant::now(), b.clone())
        .await
        .unwrap()
        .unwrap();
    (srv, b)
}

#[tokio::test]
async fn tcp_cookie_session_events_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControlConfig {
        control_port: Some("127.0.0.1:0".parse().unwrap()),
        cookie_authentication: true,
        ..ControlConfig::default()
    };
    let (srv, backend) = start(cfg, dir.path()).await;
    let addr = srv.tcp_addr().unwrap();
    let mut c = Ctl {
        s: BufReader::new(TcpStream::connect(addr).await.unwrap()),
    };
    let pi = c.cmd("PROTOCOLINFO 1").await;
    assert!(pi.contains("METHODS=COOKIE,SAFECOOKIE"), "{pi}");
    let cookie_path = dir.path().join("control_auth_cookie");
    assert!(pi.contains(&format!("COOKIEFILE=\"{}\"", cookie_path.display())));
    let cookie = std::fs::read(&cookie_path).unwrap();
    assert_eq!(c.cmd("GETINFO version").await.get(..4), Some("514 "));
    assert_eq!(
        c.cmd(&format!("AUTHENTICATE {}", hex_encode(&cookie)))
            .await,
        "250 OK\r\n"
    );
    let r = c.cmd("GETINFO fingerprint net/listeners/control").await;
    assert!(
        r.contains(&format!("net/listeners/control=\"{addr}\"")),
        "{r}"
    );
    assert!(r.contains(&"AB".repeat(20)), "{r}");

    // BW events arrive once a second with the bytes since the last one.
    assert_eq!(c.cmd("SETEVENTS BW").await, "250 OK\r\n");
    backend.read.store(4096, Ordering::Relaxed);
    let mut seen = false;
    for _ in 0..4 {
        let l = c.line().await.unwrap();
        assert!(l.starts_with("650 BW "), "{l}");
        if l == "650 BW 4096 0\r\n" {
            seen = true;
            break;
        }
    }
    assert!(seen);
    assert_eq!(c.cmd("SETEVENTS").await.lines().last(), Some("250 OK"));

    // SIGNAL SHUTDOWN reaches the process through `requested`.
    let r = c.cmd("SIGNAL SHUTDOWN").await;
    assert!(r.ends_with("250 OK\r\n"), "{r}");
    let req = tokio::time::timeout(Duration::from_secs(5), srv.requested())
        .await
        .unwrap();
    assert_eq!(req, Request::Shutdown);
    let r = c.cmd("QUIT").await;
    assert!(r.ends_with("250 closing connection\r\n"), "{r}");
    assert_eq!(c.line().await, None);
    srv.stop().await;
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn hostile_controllers_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ControlConfig {
        control_port: Some("127.0.0.1:0".parse().unwrap()),
        hashed_control_password: vec![
            "16:A7D7E322DED38B7B605F3362EDDC6642CCCD440E203A93B405A9911304".into(),
        ],
        ..ControlConfig::default()
    };
    let (srv, _) = start(cfg, dir.path()).await;
    let addr = srv.tcp_addr().unwrap();

    // A line without end beyond the limit: 500 and closed.
    let mut c = Ctl {
        s: BufReader::new(TcpStream::connect(addr).await.unwrap()),
    };
    let long = vec![b'A'; allium_control::framer::MAX_LINE + 100];
    c.s.get_mut().write_all(&long).await.unwrap();
    let l = c.line().await.unwrap();
    assert!(l.starts_with("500 "), "{l}");
    assert_eq!(c.line().await, None);

    // Unauthenticated commands: refused, then closed.
    let mut c = Ctl {
        s: BufReader::new(TcpStream::connect(addr).await.unwrap()),
    };
    for _ in 0..allium_control::session::MAX_UNAUTH_REFUSALS {
        assert!(c.cmd("GETINFO version").await.starts_with("514 "));
    }
    assert_eq!(c.line().await, None);

    // A wrong password closes; the right one (from `tor --hash-password`) works.
    let mut c = Ctl {
        s: BufReader::new(TcpStream::connect(addr).await.unwrap()),
    };
    assert!(c.cmd("AUTHENTICATE \"wrong\"").await.starts_with("515 "));
    assert_eq!(c.line().await, None);
    let mut c = Ctl {
        s: BufReader::new(TcpStream::connect(addr).await.unwrap()),
    };
    assert_eq!(c.cmd("AUTHENTICATE \"allium test\"").await, "250 OK\r\n");

    // The connection limit: the extra connection gets 451.
    let mut held = Vec::new();
    for _ in 1..allium_control::driver::MAX_CONNECTIONS {
        let mut h = Ctl {
            s: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        };
        assert!(h.cmd("PROTOCOLINFO").await.ends_with("250 OK\r\n"));
        held.push(h);
    }
    let mut extra = Ctl {
        s: BufReader::new(TcpStream::connect(addr).await.unwrap()),
    };
    let l = extra.line().await.unwrap();
    assert!(l.starts_with("451 "), "{l}");
    assert_eq!(extra.line().await, None);
    // The authenticated one still works.
    assert!(c.cmd("GETINFO version").await.starts_with("250-version="));
    srv.stop().await;
}

#[tokio::test]
async fn unix_socket_and_non_loopback_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bad = ControlConfig {
        control_port: Some("0.0.0.0:0".parse().unwrap()),
        ..ControlConfig::default()
    };
    let b: Arc<dyn ControlBackend> = Arc::new(Backend::default());
    let err = allium_control::start(&bad, dir.path(), None, Instant::now(), b)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");

    let sock = dir.path().join("control.sock");
    let cfg = ControlConfig {
        control_socket: Some(sock.clone()),
        ..ControlConfig::default()
    };
    let (srv, _) = start(cfg, dir.path()).await;
    let mut c = Ctl {
        s: BufReader::new(UnixStream::connect(&sock).await.unwrap()),
    };
    assert!(c.cmd("PROTOCOLINFO 1").await.contains("METHODS=NULL"));
    assert_eq!(c.cmd("AUTHENTICATE").await, "250 OK\r\n");
    let r = c.cmd("GETINFO net/listeners/control").await;
    assert!(r.contains(&format!("\"unix:{}\"", sock.display())), "{r}");
    srv.stop().await;
    assert!(!sock.exists());
}
