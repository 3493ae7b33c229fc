#![allow(clippy::disallowed_methods)] // test code: a start time for the fake process
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use allium_crypto::ctlauth::hmac_sha256;

use super::*;
use crate::auth::{HashedPassword, SAFECOOKIE_CLIENT_KEY, SAFECOOKIE_SERVER_KEY};
use crate::backend::{CircState, CircuitStatus, ConfOption, StreamStatus};
use crate::framer::Framer;

/// A backend whose state the test sets.
#[derive(Default)]
pub(crate) struct Fake {
    pub(crate) traffic: Mutex<(u64, u64)>,
    pub(crate) circuits: Mutex<Vec<CircuitStatus>>,
    pub(crate) orconns: Mutex<Vec<OrConnStatus>>,
    pub(crate) progress: Mutex<u8>,
    pub(crate) signals: Mutex<Vec<Signal>>,
    pub(crate) socks: Mutex<String>,
}

impl ControlBackend for Fake {
    fn role(&self) -> &'static str {
        "proxy"
    }
    fn getinfo(&self, key: &str, _now: &Now) -> Option<Result<String, String>> {
        match key {
            "net/listeners/socks" => Some(Ok(quote(&self.socks.lock().unwrap()))),
            "ns/all" => Some(Err("no consensus yet".into())),
            _ => None,
        }
    }
    fn info_names(&self) -> Vec<(&'static str, &'static str)> {
        vec![("net/listeners/socks", "SOCKS listeners.")]
    }
    fn options(&self) -> Vec<ConfOption> {
        vec![
            ConfOption {
                name: "SocksPort",
                allium_key: "socks_listen",
                kind: "LineList",
                values: vec![self.socks.lock().unwrap().clone()],
                defaults: vec!["127.0.0.1:9150".into()],
            },
            ConfOption {
                name: "ControlSocket",
                allium_key: "control_socket",
                kind: "Filename",
                values: vec![],
                defaults: vec![],
            },
        ]
    }
    fn set_options(&self, changes: &[(&'static str, Vec<String>)]) -> Result<(), String> {
        for (name, values) in changes {
            if *name == "SocksPort" {
                let v = values
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "127.0.0.1:9150".into());
                if v != *self.socks.lock().unwrap() {
                    return Err(format!("{name} cannot be changed while running"));
                }
            }
        }
        Ok(())
    }
    fn signal(&self, signal: Signal) -> Result<(), String> {
        self.signals.lock().unwrap().push(signal);
        Ok(())
    }
    fn traffic(&self) -> (u64, u64) {
        *self.traffic.lock().unwrap()
    }
    fn circuits(&self, _now: &Now) -> Vec<CircuitStatus> {
        self.circuits.lock().unwrap().clone()
    }
    fn streams(&self, _now: &Now) -> Vec<StreamStatus> {
        vec![StreamStatus {
            id: 2,
            status: "SENTCONNECT",
            circ_id: 3,
            target: "example.com:443".into(),
        }]
    }
    fn orconns(&self, _now: &Now) -> Vec<OrConnStatus> {
        self.orconns.lock().unwrap().clone()
    }
    fn bootstrap(&self) -> Bootstrap {
        let p = *self.progress.lock().unwrap();
        Bootstrap {
            progress: p,
            tag: if p == 100 { "done" } else { "starting" },
            summary: if p == 100 { "Done" } else { "Starting" },
        }
    }
}

struct T {
    s: Session,
    fake: Arc<Fake>,
    now: Now,
}

fn info() -> Arc<ServerInfo> {
    Arc::new(ServerInfo {
        started: Instant::now(),
        config_file: Some(PathBuf::from("/etc/allium/proxy.toml")),
        control_listeners: vec!["127.0.0.1:9051".into()],
        pid: 42,
        user: "allium".into(),
        descriptor_limit: 1024,
        bw_history: Arc::default(),
    })
}

fn setup(auth: AuthConfig) -> T {
    let fake = Arc::new(Fake::default());
    *fake.socks.lock().unwrap() = "127.0.0.1:9150".into();
    let info = info();
    let now = Now {
        mono: info.started + Duration::from_secs(5),
        wall: UNIX_EPOCH + Duration::from_secs(1_796_058_000),
    };
    T {
        s: Session::new(fake.clone(), Arc::new(auth), info),
        fake,
        now,
    }
}

impl T {
    fn send(&mut self, line: &str) -> Output {
        let mut f = Framer::new();
        f.push(line.as_bytes()).unwrap();
        f.push(b"\r\n").unwrap();
        let cmd = f.next_command().unwrap().unwrap();
        self.s.handle(&cmd, &self.now)
    }
    fn reply(&mut self, line: &str) -> String {
        self.send(line).reply
    }
}

const COOKIE: [u8; 32] = [0x5a; 32];

fn locked() -> T {
    setup(AuthConfig::new(
        Some((PathBuf::from("/data/control_auth_cookie"), COOKIE)),
        vec![HashedPassword::new(b"hunter2", [3; 8])],
    ))
}

fn open() -> T {
    let mut t = setup(AuthConfig::open());
    assert_eq!(t.reply("AUTHENTICATE"), "250 OK\r\n");
    t
}

#[test]
fn protocolinfo_lists_methods_and_version() {
    let mut t = locked();
    let r = t.reply("PROTOCOLINFO 1");
    assert!(r.starts_with("250-PROTOCOLINFO 1\r\n"), "{r}");
    assert!(
        r.contains("250-AUTH METHODS=COOKIE,SAFECOOKIE,HASHEDPASSWORD COOKIEFILE=\"/data/control_auth_cookie\"\r\n"),
        "{r}"
    );
    assert!(r.contains("250-VERSION Tor=\"0.4.8.0-allium-"), "{r}");
    assert!(r.ends_with("250 OK\r\n"));
    assert!(t.reply("PROTOCOLINFO x").starts_with("512 "));
}

#[test]
fn unauthenticated_commands_are_refused_then_closed() {
    let mut t = locked();
    for i in 1..=MAX_UNAUTH_REFUSALS {
        let out = t.send("GETINFO version");
        assert!(out.reply.starts_with("514 "), "{}", out.reply);
        assert_eq!(out.close, i == MAX_UNAUTH_REFUSALS);
    }
    let mut t = locked();
    assert!(t.reply("SETEVENTS BW").starts_with("514 "));
    assert!(t.reply("SIGNAL NEWNYM").starts_with("514 "));
    assert!(t.fake.signals.lock().unwrap().is_empty());
    // No event reaches an unauthenticated controller.
    *t.fake.traffic.lock().unwrap() = (1, 1);
    assert_eq!(t.s.tick(&t.now), "");
}

#[test]
fn cookie_authentication() {
    let mut t = locked();
    let out = t.send(&format!("AUTHENTICATE {}", hex::encode([0x11u8; 32])));
    assert!(out.reply.starts_with("515 ") && out.close, "{}", out.reply);
    let mut t = locked();
    assert_eq!(
        t.reply(&format!("AUTHENTICATE {}", hex::encode(COOKIE))),
        "250 OK\r\n"
    );
    assert!(
        t.reply("GETINFO version")
            .starts_with("250-version=0.4.8.0-allium-")
    );
}

#[test]
fn password_authentication_quoted_and_hex() {
    let mut t = locked();
    assert_eq!(t.reply("AUTHENTICATE \"hunter2\""), "250 OK\r\n");
    let mut t = locked();
    assert_eq!(
        t.reply(&format!("AUTHENTICATE {}", hex::encode("hunter2"))),
        "250 OK\r\n"
    );
    let mut t = locked();
    assert!(t.send("AUTHENTICATE \"hunter3\"").close);
    let mut t = locked();
    assert!(t.reply("AUTHENTICATE zz").starts_with("512 "));
    assert!(t.reply("AUTHENTICATE \"unterminated").starts_with("512 "));
    assert!(t.reply("AUTHENTICATE a b").starts_with("512 "));
}

#[test]
fn safecookie() {
    let mut t = locked();
    let client_nonce = [0x33u8; 32];
    let r = t.reply(&format!(
        "AUTHCHALLENGE SAFECOOKIE {}",
        hex::encode(client_nonce)
    ));
    let rest = r.strip_prefix("250 AUTHCHALLENGE SERVERHASH=").unwrap();
    let (sh, rest) = rest.split_once(" SERVERNONCE=").unwrap();
    let server_nonce = hex::decode(rest.trim_end()).unwrap();
    let expect = hmac_sha256(
        SAFECOOKIE_SERVER_KEY,
        &[&COOKIE, &client_nonce, &server_nonce],
    );
    assert_eq!(hex::decode(sh).unwrap(), expect);
    let client = hmac_sha256(
        SAFECOOKIE_CLIENT_KEY,
        &[&COOKIE, &client_nonce, &server_nonce],
    );
    assert_eq!(
        t.reply(&format!("AUTHENTICATE {}", hex::encode(client))),
        "250 OK\r\n"
    );

    // A wrong hash fails and closes; the challenge is single-use.
    let mut t = locked();
    t.reply(&format!(
        "AUTHCHALLENGE SAFECOOKIE {}",
        hex::encode(client_nonce)
    ));
    assert!(
        t.send(&format!("AUTHENTICATE {}", hex::encode([0u8; 32])))
            .close
    );

    let mut t = locked();
    assert!(t.reply("AUTHCHALLENGE HMAC 00").starts_with("513 "));
    assert!(t.reply("AUTHCHALLENGE SAFECOOKIE").starts_with("512 "));
    assert!(t.reply("AUTHCHALLENGE SAFECOOKIE xyz").starts_with("512 "));
    assert!(
        t.reply(&format!("AUTHCHALLENGE SAFECOOKIE {}", "00".repeat(2000)))
            .starts_with("512 ")
    );
    // Without cookie authentication there is no challenge.
    let mut t = setup(AuthConfig::new(
        None,
        vec![HashedPassword::new(b"x", [1; 8])],
    ));
    assert!(
        t.send("AUTHCHALLENGE SAFECOOKIE 00")
            .reply
            .starts_with("515 ")
    );
}

#[test]
fn getinfo_common_keys() {
    let mut t = open();
    let r = t.reply(
        "GETINFO version config-file process/pid process/user uptime traffic/read traffic/written",
    );
    assert!(
        r.contains("250-config-file=/etc/allium/proxy.toml\r\n"),
        "{r}"
    );
    assert!(r.contains("250-process/pid=42\r\n"));
    assert!(r.contains("250-process/user=allium\r\n"));
    assert!(r.contains("250-uptime=5\r\n"));
    assert!(r.contains("250-traffic/read=0\r\n"));
    assert!(r.ends_with("250 OK\r\n"));
    let r = t.reply("GETINFO net/listeners/control net/listeners/socks accounting/enabled");
    assert!(
        r.contains("250-net/listeners/control=\"127.0.0.1:9051\"\r\n"),
        "{r}"
    );
    assert!(
        r.contains("250-net/listeners/socks=\"127.0.0.1:9150\"\r\n"),
        "{r}"
    );
    assert!(r.contains("250-accounting/enabled=0\r\n"));
    let r = t.reply("GETINFO status/bootstrap-phase");
    assert!(
        r.contains("250-status/bootstrap-phase=NOTICE BOOTSTRAP PROGRESS=0 TAG=starting SUMMARY=\"Starting\""),
        "{r}"
    );
    let r = t.reply("GETINFO info/names events/names config/names");
    assert!(r.contains("250+info/names=\r\n"), "{r}");
    assert!(r.contains("net/listeners/socks -- SOCKS listeners."), "{r}");
    assert!(r.contains("250-events/names=CIRC "), "{r}");
    assert!(r.contains("SocksPort LineList\r\n"), "{r}");
}

#[test]
fn getinfo_errors() {
    let mut t = open();
    let r = t.reply("GETINFO version no/such/key");
    assert_eq!(r, "552 Unrecognized key \"no/such/key\"\r\n");
    assert!(t.reply("GETINFO ns/all").starts_with("550 "));
    assert!(t.reply("GETINFO").starts_with("512 "));
    assert!(t.reply("GETINFO accounting/bytes").starts_with("550 "));
    assert!(t.reply("GETINFO \"version\"").starts_with("512 "));
}

#[test]
fn circuit_status_and_events() {
    let mut t = open();
    let circ = CircuitStatus {
        id: 3,
        state: CircState::Built,
        path: vec!["$AA~a".into(), "$BB~b".into(), "$CC~c".into()],
        build_flags: vec!["NEED_CAPACITY"],
        purpose: "GENERAL",
        created: UNIX_EPOCH + Duration::from_secs(1_796_058_000),
    };
    assert_eq!(
        t.reply("GETINFO circuit-status"),
        "250-circuit-status=\r\n250 OK\r\n"
    );
    t.fake.circuits.lock().unwrap().push(circ.clone());
    let r = t.reply("GETINFO circuit-status");
    assert_eq!(
        r,
        "250-circuit-status=3 BUILT $AA~a,$BB~b,$CC~c BUILD_FLAGS=NEED_CAPACITY PURPOSE=GENERAL TIME_CREATED=2026-11-30T17:00:00.000000\r\n250 OK\r\n"
    );
    let mut c2 = circ.clone();
    c2.id = 4;
    t.fake.circuits.lock().unwrap().push(c2);
    assert!(
        t.reply("GETINFO circuit-status")
            .starts_with("250+circuit-status=\r\n3 BUILT")
    );

    assert_eq!(
        t.reply("GETINFO stream-status"),
        "250-stream-status=2 SENTCONNECT 3 example.com:443\r\n250 OK\r\n"
    );
    // Events: the baseline is taken at SETEVENTS, then changes are reported.
    assert_eq!(
        t.reply("SETEVENTS circ BW orconn status_client stream"),
        "250 OK\r\n"
    );
    assert_eq!(t.s.tick(&t.now), "650 BW 0 0\r\n");
    *t.fake.traffic.lock().unwrap() = (1000, 250);
    // Circuit snapshots no longer make events: the node pushes them.
    t.fake.circuits.lock().unwrap().retain(|c| c.id != 3);
    t.fake.orconns.lock().unwrap().push(OrConnStatus {
        id: 9,
        peer: "$AA~a".into(),
        n_circs: Some(2),
    });
    *t.fake.progress.lock().unwrap() = 100;
    let ev = t.s.tick(&t.now);
    assert!(ev.starts_with("650 BW 1000 250\r\n"), "{ev}");
    assert!(!ev.contains("650 CIRC"), "{ev}");
    assert!(
        ev.contains("650 ORCONN $AA~a CONNECTED NCIRCS=2 ID=9\r\n"),
        "{ev}"
    );
    assert!(
        ev.contains(
            "650 STATUS_CLIENT NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY=\"Done\"\r\n"
        ),
        "{ev}"
    );
    assert_eq!(t.s.tick(&t.now), "650 BW 0 0\r\n");
    // Pushed events are written for the kinds subscribed to.
    let circ_ev = crate::events::Event {
        kind: "CIRC",
        body: format!("CIRC {}", circ.line(CircState::Extended)),
    };
    assert_eq!(
        t.s.pushed_event(&circ_ev),
        format!("650 CIRC {}\r\n", circ.line(CircState::Extended))
    );
    let stream_ev = crate::events::Event {
        kind: "STREAM",
        body: "STREAM 1 NEW 0 example.com:443".into(),
    };
    assert_eq!(
        t.s.pushed_event(&stream_ev),
        "650 STREAM 1 NEW 0 example.com:443\r\n"
    );
    assert_eq!(t.reply("SETEVENTS CIRC BW"), "250 OK\r\n");
    assert_eq!(t.s.pushed_event(&stream_ev), "");
    assert!(
        t.s.pushed_event(&circ_ev)
            .starts_with("650 CIRC 3 EXTENDED ")
    );
    // Unsubscribing stops them.
    assert_eq!(t.reply("SETEVENTS"), "250 OK\r\n");
    assert_eq!(t.s.tick(&t.now), "");
    assert!(
        t.reply("SETEVENTS BW NOSUCH")
            .starts_with("552 Unrecognized event \"NOSUCH\"")
    );
    assert!(t.reply("SETEVENTS EXTENDED NS NEWDESC").starts_with("250 "));
}

#[test]
fn log_events_by_severity() {
    let mut t = open();
    let rec = LogRecord {
        severity: "NOTICE",
        message: "bootstrap 100%".into(),
    };
    assert_eq!(t.s.log_event(&rec), "");
    t.reply("SETEVENTS NOTICE WARN");
    assert_eq!(t.s.log_event(&rec), "650 NOTICE bootstrap 100%\r\n");
    let info = LogRecord {
        severity: "INFO",
        message: "x".into(),
    };
    assert_eq!(t.s.log_event(&info), "");
}

#[test]
fn getconf_setconf_resetconf() {
    let mut t = open();
    assert_eq!(
        t.reply("GETCONF SocksPort"),
        "250 SocksPort=127.0.0.1:9150\r\n"
    );
    assert_eq!(
        t.reply("GETCONF socksport socks_listen"),
        "250-SocksPort=127.0.0.1:9150\r\n250 SocksPort=127.0.0.1:9150\r\n"
    );
    assert_eq!(t.reply("GETCONF ControlSocket"), "250 ControlSocket\r\n");
    assert_eq!(
        t.reply("GETCONF NoSuchOption"),
        "552 Unrecognized configuration key \"NoSuchOption\"\r\n"
    );
    assert_eq!(t.reply("SETCONF SocksPort=127.0.0.1:9150"), "250 OK\r\n");
    assert_eq!(
        t.reply("SETCONF SocksPort=\"127.0.0.1:9150\""),
        "250 OK\r\n"
    );
    assert!(
        t.reply("SETCONF SocksPort=127.0.0.1:1")
            .starts_with("553 Unable to set option: SocksPort cannot be changed")
    );
    assert!(
        t.reply("SETCONF Bogus=1")
            .starts_with("552 Unrecognized option")
    );
    assert!(t.reply("SETCONF").starts_with("512 "));
    assert!(t.reply("SETCONF SocksPort=\"x").starts_with("512 "));
    assert_eq!(t.reply("RESETCONF SocksPort"), "250 OK\r\n");
    assert!(t.reply("RESETCONF SocksPort=1").starts_with("512 "));
    assert!(t.reply("SAVECONF").starts_with("552 "));
}

#[test]
fn signals_and_misc_commands() {
    let mut t = open();
    assert_eq!(t.reply("SIGNAL NEWNYM"), "250 OK\r\n");
    assert_eq!(t.reply("SIGNAL HEARTBEAT"), "250 OK\r\n");
    assert_eq!(
        *t.fake.signals.lock().unwrap(),
        vec![Signal::NewNym, Signal::Heartbeat]
    );
    assert_eq!(t.send("SIGNAL RELOAD").action, Some(Action::Reload));
    assert_eq!(t.send("SIGNAL HUP").action, Some(Action::Reload));
    assert_eq!(t.send("SIGNAL SHUTDOWN").action, Some(Action::Shutdown));
    assert_eq!(t.send("SIGNAL HALT").action, Some(Action::Halt));
    let out = t.send("SIGNAL DUMP");
    assert_eq!((out.reply.as_str(), out.action), ("250 OK\r\n", None));
    assert!(
        t.reply("SIGNAL FOO")
            .starts_with("552 Unrecognized signal code \"FOO\"")
    );
    assert!(t.reply("SIGNAL").starts_with("512 "));
    t.reply("SETEVENTS SIGNAL");
    assert_eq!(t.reply("SIGNAL NEWNYM"), "250 OK\r\n650 SIGNAL NEWNYM\r\n");
    assert_eq!(
        t.reply("USEFEATURE VERBOSE_NAMES EXTENDED_EVENTS"),
        "250 OK\r\n"
    );
    assert!(t.reply("USEFEATURE FOO").starts_with("552 "));
    assert_eq!(t.send("TAKEOWNERSHIP").action, Some(Action::TakeOwnership));
    assert!(
        t.reply("FROBNICATE now")
            .starts_with("510 Unrecognized command \"FROBNICATE\"")
    );
    assert!(t.reply("ADD_ONION NEW:BEST Port=80").starts_with("511 "));
    let out = t.send("QUIT");
    assert_eq!(out.reply, "250 closing connection\r\n");
    assert!(out.close);
}

#[test]
fn hostile_input() {
    let mut t = open();
    // Control characters and quotes inside keys cannot break the reply framing.
    let r = t.reply("GETINFO a\u{7}b");
    assert!(
        r.starts_with("552 ") && r.ends_with("\r\n") && r.matches("\r\n").count() == 1,
        "{r}"
    );
    let r = t.reply("FOO\"\\");
    assert!(
        r.starts_with("510 ") && r.matches("\r\n").count() == 1,
        "{r}"
    );
    let out = t.s.frame_error(FrameError::LineTooLong);
    assert!(out.close && out.reply.starts_with("500 "));
    // A multi-line command other than LOADCONF is refused, not misparsed.
    let mut f = Framer::new();
    f.push(b"+GETINFO\r\nversion\r\n.\r\n").unwrap();
    let cmd = f.next_command().unwrap().unwrap();
    assert!(t.s.handle(&cmd, &t.now).reply.starts_with("510 "));
    let _ = SystemTime::UNIX_EPOCH;
}

/// Every reply line is `NNN`, then `-`, `+` or space (or a data line inside a `+` block ending
/// with `.`), and ends with CRLF.
fn well_formed(out: &str) -> bool {
    let mut in_data = false;
    for line in out.split_inclusive("\r\n") {
        let Some(body) = line.strip_suffix("\r\n") else {
            return false;
        };
        if body.contains(['\r', '\n']) {
            return false;
        }
        if in_data {
            in_data = body != ".";
            continue;
        }
        let b = body.as_bytes();
        if b.len() < 4 || !b[..3].iter().all(u8::is_ascii_digit) {
            return false;
        }
        match b[3] {
            b'+' => in_data = true,
            b'-' | b' ' => {}
            _ => return false,
        }
    }
    !in_data
}

proptest::proptest! {
    #[test]
    fn hostile_bytes_never_panic_and_replies_stay_framed(
        chunks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..16),
        words in proptest::collection::vec(0usize..12, 0..12),
    ) {
        const WORDS: [&str; 12] = [
            "GETINFO version", "GETINFO \"x", "SETCONF SocksPort=\"a\\", "AUTHENTICATE ",
            "SETEVENTS BW CIRC", "SIGNAL NEWNYM", "GETCONF Log", "+LOADCONF", ".", "QUIT",
            "AUTHCHALLENGE SAFECOOKIE 00", "USEFEATURE X",
        ];
        for auth in [AuthConfig::open(), AuthConfig::new(Some((PathBuf::from("/c"), COOKIE)), vec![])] {
            let mut t = setup(auth);
            let mut f = Framer::new();
            let mut input: Vec<Vec<u8>> = chunks.clone();
            input.extend(words.iter().map(|&w| format!("{}\r\n", WORDS[w]).into_bytes()));
            'feed: for c in &input {
                if f.push(c).is_err() {
                    break;
                }
                loop {
                    match f.next_command() {
                        Ok(Some(cmd)) => {
                            let out = t.s.handle(&cmd, &t.now);
                            proptest::prop_assert!(well_formed(&out.reply), "{:?}", out.reply);
                            proptest::prop_assert!(well_formed(&t.s.tick(&t.now)));
                            if out.close {
                                break 'feed;
                            }
                        }
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
        }
    }
}

#[test]
fn the_framing_check_can_fail() {
    assert!(well_formed("250-a\r\n250+b=\r\nx\r\n.\r\n250 OK\r\n"));
    assert!(!well_formed("250 OK\n"));
    assert!(!well_formed("25 OK\r\n"));
    assert!(!well_formed("250+b=\r\nx\r\n"));
    assert!(!well_formed("250 a\rb\r\n"));
}

#[test]
fn bw_event_cache() {
    let mut t = open();
    assert_eq!(
        t.reply("GETINFO bw-event-cache"),
        "250-bw-event-cache=\r\n250 OK\r\n"
    );
    {
        let mut h = t.s.info.bw_history.lock().unwrap();
        h.sample((100, 10));
        h.sample((150, 30));
        h.sample((150, 30));
        for i in 0..BW_HISTORY_LEN as u64 + 5 {
            h.sample((150 + i, 30));
        }
    }
    let r = t.reply("GETINFO bw-event-cache");
    let v = r.strip_prefix("250-bw-event-cache=").unwrap();
    let v = v.split("\r\n").next().unwrap();
    let entries: Vec<&str> = v.split(' ').collect();
    assert_eq!(entries.len(), BW_HISTORY_LEN);
    assert_eq!(*entries.last().unwrap(), "1,0");
    assert!(!v.starts_with("50,20"), "the oldest seconds were dropped");
}
