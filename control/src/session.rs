//! One controller connection: the sans-IO command core.
//!
//! [`Session::handle`] takes a framed [`Command`] and the time, and returns the reply bytes, whether
//! to close, and a driver-level action (a signal, ownership). [`Session::tick`] (once a second from
//! the driver) and [`Session::log_event`] produce asynchronous `650` events for the events the
//! controller subscribed to. ORCONN and STATUS_CLIENT events come from comparing the backend's
//! snapshots between ticks; CIRC and STREAM events are pushed by the node as they happen
//! ([`crate::events::EventBus`]) and written by [`Session::pushed_event`].
//!
//! Before authentication only PROTOCOLINFO, AUTHENTICATE, AUTHCHALLENGE and QUIT are accepted;
//! anything else gets 514, and the connection is closed after [`MAX_UNAUTH_REFUSALS`] of them or
//! after a failed AUTHENTICATE.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::args::{Arg, parse_args, quote};
use crate::auth::{AuthConfig, Challenge, MAX_CLIENT_NONCE, NONCE_LEN};
use crate::backend::{Bootstrap, ControlBackend, Now, OrConnStatus, Signal};
use crate::framer::{Command, FrameError};
use crate::reply::{Code, Reply, single};

/// Commands refused for lack of authentication before the connection is closed.
pub const MAX_UNAUTH_REFUSALS: u32 = 4;

/// The Tor version Allium's control port speaks as (stem and Nyx gate features on it), with
/// Allium's own version as the status tag.
pub fn version_string() -> String {
    format!("0.4.8.0-allium-{}", env!("CARGO_PKG_VERSION"))
}

/// Every event name SETEVENTS accepts (Tor's list). Allium emits BW, CIRC, STREAM, ORCONN, the log
/// severities, STATUS_CLIENT and SIGNAL; the others are accepted and never occur.
pub const EVENT_NAMES: &[&str] = &[
    "CIRC",
    "CIRC_MINOR",
    "STREAM",
    "ORCONN",
    "BW",
    "DEBUG",
    "INFO",
    "NOTICE",
    "WARN",
    "ERR",
    "NEWDESC",
    "ADDRMAP",
    "DESCCHANGED",
    "NS",
    "STATUS_GENERAL",
    "STATUS_CLIENT",
    "STATUS_SERVER",
    "GUARD",
    "STREAM_BW",
    "CLIENTS_SEEN",
    "NEWCONSENSUS",
    "BUILDTIMEOUT_SET",
    "SIGNAL",
    "CONF_CHANGED",
    "CONN_BW",
    "CELL_STATS",
    "CIRC_BW",
    "TRANSPORT_LAUNCHED",
    "HS_DESC",
    "HS_DESC_CONTENT",
    "NETWORK_LIVENESS",
    "PT_LOG",
    "PT_STATUS",
];

/// Commands of Tor's control protocol that Allium does not implement (reply 511, not 510).
const UNIMPLEMENTED: &[&str] = &[
    "MAPADDRESS",
    "EXTENDCIRCUIT",
    "SETCIRCUITPURPOSE",
    "SETROUTERPURPOSE",
    "ATTACHSTREAM",
    "POSTDESCRIPTOR",
    "REDIRECTSTREAM",
    "CLOSESTREAM",
    "CLOSECIRCUIT",
    "RESOLVE",
    "LOADCONF",
    "DROPGUARDS",
    "HSFETCH",
    "HSPOST",
    "ADD_ONION",
    "DEL_ONION",
    "ONION_CLIENT_AUTH_ADD",
    "ONION_CLIENT_AUTH_REMOVE",
    "ONION_CLIENT_AUTH_VIEW",
    "DROPOWNERSHIP",
    "DROPTIMEOUTS",
];

/// Facts about the process that every session reports.
#[derive(Clone, Debug)]
pub struct ServerInfo {
    /// When the process started.
    pub started: Instant,
    /// The configuration file, if any.
    pub config_file: Option<PathBuf>,
    /// The control listeners, as `net/listeners/control` shows them (quoted there).
    pub control_listeners: Vec<String>,
    /// Process id.
    pub pid: u32,
    /// The user the process runs as.
    pub user: String,
    /// The most file descriptors the process may open.
    pub descriptor_limit: u64,
    /// Bytes read and written in each of the last seconds, oldest first (`bw-event-cache`),
    /// filled by the driver once a second.
    pub bw_history: Arc<std::sync::Mutex<BwHistory>>,
}

/// Most seconds kept in [`BwHistory`] (Tor keeps 300 too).
pub const BW_HISTORY_LEN: usize = 300;

/// The per-second traffic of the last [`BW_HISTORY_LEN`] seconds.
#[derive(Debug, Default)]
pub struct BwHistory {
    last: Option<(u64, u64)>,
    seconds: std::collections::VecDeque<(u64, u64)>,
}

impl BwHistory {
    /// Record the counters' values at a one-second tick.
    pub fn sample(&mut self, traffic: (u64, u64)) {
        if let Some(prev) = self.last {
            if self.seconds.len() == BW_HISTORY_LEN {
                self.seconds.pop_front();
            }
            self.seconds.push_back((
                traffic.0.saturating_sub(prev.0),
                traffic.1.saturating_sub(prev.1),
            ));
        }
        self.last = Some(traffic);
    }

    /// Tor's `bw-event-cache` form: `read,written` per second, space-separated.
    pub fn render(&self) -> String {
        self.seconds
            .iter()
            .map(|(r, w)| format!("{r},{w}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the driver must do after a command, besides writing the reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Raise SIGHUP on the own process (the reload path).
    Reload,
    /// Shut the process down cleanly.
    Shutdown,
    /// Shut down now.
    Halt,
    /// This connection took ownership: shut down when it closes.
    TakeOwnership,
}

/// The result of one command.
#[derive(Debug, Default)]
pub struct Output {
    /// Bytes to write.
    pub reply: String,
    /// Close the connection after writing.
    pub close: bool,
    /// Something for the driver to do.
    pub action: Option<Action>,
    /// SETCONF/RESETCONF changes to apply live: the driver hands them to the process
    /// ([`crate::driver::ControlServer::take_setconf`]) and replies `250` or `553` with its
    /// answer; [`Output::reply`] is the answer when nothing in the process applies them.
    pub setconf: Option<Vec<SetConf>>,
}

/// One option a controller wants changed (SETCONF/RESETCONF), for the process to apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetConf {
    /// The name the controller used, as GETCONF shows it (Tor's where Tor has the option).
    pub name: &'static str,
    /// The Allium configuration key.
    pub key: &'static str,
    /// Tor's type name (see [`crate::backend::ConfOption::kind`]).
    pub kind: &'static str,
    /// The new values (the defaults for RESETCONF or a bare `KEY`).
    pub values: Vec<String>,
}

impl Output {
    fn reply(reply: String) -> Self {
        Self {
            reply,
            ..Self::default()
        }
    }
    fn closing(reply: String) -> Self {
        Self {
            reply,
            close: true,
            ..Self::default()
        }
    }
}

/// A log record for the log events.
#[derive(Clone, Debug)]
pub struct LogRecord {
    /// Tor's severity name: `DEBUG`, `INFO`, `NOTICE`, `WARN` or `ERR`.
    pub severity: &'static str,
    /// The message.
    pub message: String,
}

/// What the last tick saw, to find changes.
#[derive(Debug, Default)]
struct Seen {
    traffic: Option<(u64, u64)>,
    orconns: Option<BTreeMap<u64, OrConnStatus>>,
    bootstrap: Option<Bootstrap>,
}

/// One controller connection's state.
pub struct Session {
    backend: Arc<dyn ControlBackend>,
    auth: Arc<AuthConfig>,
    info: Arc<ServerInfo>,
    authenticated: bool,
    challenge: Option<Challenge>,
    refusals: u32,
    events: BTreeSet<&'static str>,
    seen: Seen,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("authenticated", &self.authenticated)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A new, unauthenticated session.
    pub fn new(
        backend: Arc<dyn ControlBackend>,
        auth: Arc<AuthConfig>,
        info: Arc<ServerInfo>,
    ) -> Self {
        Self {
            backend,
            auth,
            info,
            authenticated: false,
            challenge: None,
            refusals: 0,
            events: BTreeSet::new(),
            seen: Seen::default(),
        }
    }

    /// Whether the controller has authenticated.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// Whether the controller subscribed to log events of `severity`.
    pub fn wants_log(&self, severity: &str) -> bool {
        self.events.contains(severity)
    }

    /// The reply to a framing error (the driver closes the connection after it).
    pub fn frame_error(&self, e: FrameError) -> Output {
        Output::closing(single(Code::PROTOCOL, &format!("{e}; closing connection")))
    }

    /// Handle one command.
    pub fn handle(&mut self, cmd: &Command, now: &Now) -> Output {
        let kw = cmd.keyword.as_str();
        if !self.authenticated
            && !matches!(
                kw,
                "PROTOCOLINFO" | "AUTHENTICATE" | "AUTHCHALLENGE" | "QUIT"
            )
        {
            self.refusals += 1;
            let out = single(Code::AUTH_REQUIRED, "Authentication required.");
            return if self.refusals >= MAX_UNAUTH_REFUSALS {
                Output::closing(out)
            } else {
                Output::reply(out)
            };
        }
        if cmd.data.is_some() && kw != "LOADCONF" {
            return Output::reply(single(
                Code::UNRECOGNIZED,
                &format!("Unrecognized multi-line command {}", quote(kw)),
            ));
        }
        let args = match parse_args(&cmd.args) {
            Ok(a) => a,
            Err(e) => return Output::reply(single(Code::SYNTAX, &format!("Syntax error: {e}"))),
        };
        match kw {
            "PROTOCOLINFO" => Output::reply(self.protocolinfo(&args)),
            "AUTHENTICATE" => self.authenticate(&args),
            "AUTHCHALLENGE" => self.authchallenge(&args),
            "QUIT" => Output::closing(single(Code::OK, "closing connection")),
            "GETINFO" => Output::reply(self.getinfo(&args, now)),
            "GETCONF" => Output::reply(self.getconf(&args)),
            "SETCONF" => self.setconf(&args, false),
            "RESETCONF" => self.setconf(&args, true),
            "SETEVENTS" => Output::reply(self.setevents(&args, now)),
            "SIGNAL" => self.signal(&args),
            "USEFEATURE" => Output::reply(usefeature(&args)),
            "TAKEOWNERSHIP" => Output {
                reply: single(Code::OK, "OK"),
                action: Some(Action::TakeOwnership),
                ..Output::default()
            },
            "SAVECONF" => Output::reply(single(
                Code::UNRECOGNIZED_ENTITY,
                "SAVECONF is not supported: Allium's configuration is a TOML file; edit it and send SIGNAL RELOAD",
            )),
            k if UNIMPLEMENTED.contains(&k) => Output::reply(single(
                Code::UNIMPLEMENTED,
                &format!(
                    "Unimplemented command {}: Allium does not support it",
                    quote(k)
                ),
            )),
            k => Output::reply(single(
                Code::UNRECOGNIZED,
                &format!("Unrecognized command {}", quote(k)),
            )),
        }
    }

    fn protocolinfo(&self, args: &[Arg]) -> String {
        if args
            .iter()
            .any(|a| a.key.is_some() || a.value.parse::<u32>().is_err())
        {
            return single(
                Code::SYNTAX,
                "PROTOCOLINFO takes protocol versions (numbers)",
            );
        }
        let mut r = Reply::new(Code::OK);
        r.mid("PROTOCOLINFO 1")
            .mid(&format!("AUTH {}", self.auth.protocolinfo_auth()))
            .mid(&format!("VERSION Tor={}", quote(&version_string())));
        r.end("OK")
    }

    fn authenticate(&mut self, args: &[Arg]) -> Output {
        if args.len() > 1 || args.first().is_some_and(|a| a.key.is_some()) {
            return Output::reply(single(
                Code::SYNTAX,
                "AUTHENTICATE takes one argument: hex digits or a quoted string",
            ));
        }
        let cred: Vec<u8> = match args.first() {
            None => Vec::new(),
            Some(a) if a.quoted => a.value.as_bytes().to_vec(),
            Some(a) => match hex::decode(&a.value) {
                Ok(b) => b,
                Err(_) => {
                    return Output::reply(single(
                        Code::SYNTAX,
                        "Invalid hexadecimal encoding; quote a password: AUTHENTICATE \"secret\"",
                    ));
                }
            },
        };
        let challenge = self.challenge.take();
        if self.auth.check(&cred, challenge.as_ref()) {
            self.authenticated = true;
            Output::reply(single(Code::OK, "OK"))
        } else {
            Output::closing(single(
                Code::BAD_AUTH,
                "Authentication failed: the password, cookie or SAFECOOKIE hash did not match",
            ))
        }
    }

    fn authchallenge(&mut self, args: &[Arg]) -> Output {
        let [method, nonce] = args else {
            return Output::reply(single(
                Code::SYNTAX,
                "AUTHCHALLENGE takes two arguments: SAFECOOKIE and a client nonce",
            ));
        };
        if method.key.is_some() || !method.value.eq_ignore_ascii_case("SAFECOOKIE") {
            return Output::reply(single(
                Code::BAD_ARG,
                "AUTHCHALLENGE only supports SAFECOOKIE authentication",
            ));
        }
        if self.authenticated {
            return Output::reply(single(Code::UNSPECIFIED, "Already authenticated"));
        }
        let client_nonce = if nonce.quoted {
            nonce.value.as_bytes().to_vec()
        } else {
            match hex::decode(&nonce.value) {
                Ok(b) => b,
                Err(_) => {
                    return Output::reply(single(Code::SYNTAX, "Invalid base16 client nonce"));
                }
            }
        };
        if client_nonce.len() > MAX_CLIENT_NONCE {
            return Output::reply(single(Code::SYNTAX, "Client nonce too long"));
        }
        let mut server_nonce = [0u8; NONCE_LEN];
        allium_crypto::rng::fill_random(&mut server_nonce);
        let Some((server_hash, ch)) = self.auth.challenge(&client_nonce, server_nonce) else {
            return Output::closing(single(Code::BAD_AUTH, "Cookie authentication is disabled"));
        };
        self.challenge = Some(ch);
        Output::reply(single(
            Code::OK,
            &format!(
                "AUTHCHALLENGE SERVERHASH={} SERVERNONCE={}",
                hex::encode_upper(server_hash),
                hex::encode_upper(server_nonce)
            ),
        ))
    }

    /// The answer to one GETINFO key: `None` if unknown.
    fn info_value(&self, key: &str, now: &Now) -> Option<Result<String, String>> {
        let ok = |s: String| Some(Ok(s));
        match key {
            "version" => ok(version_string()),
            "config-file" => match &self.info.config_file {
                Some(p) => ok(p.to_string_lossy().into_owned()),
                None => Some(Err("no configuration file (started with defaults)".into())),
            },
            "process/pid" => ok(self.info.pid.to_string()),
            "process/user" => ok(self.info.user.clone()),
            "process/descriptor-limit" => ok(self.info.descriptor_limit.to_string()),
            "bw-event-cache" => ok(self
                .info
                .bw_history
                .lock()
                .map(|h| h.render())
                .unwrap_or_default()),
            "uptime" => ok(now
                .mono
                .saturating_duration_since(self.info.started)
                .as_secs()
                .to_string()),
            "traffic/read" => ok(self.backend.traffic().0.to_string()),
            "traffic/written" => ok(self.backend.traffic().1.to_string()),
            "circuit-status" => ok(lines(
                self.backend.circuits(now).iter().map(|c| c.line(c.state)),
            )),
            "stream-status" => ok(lines(self.backend.streams(now).iter().map(|s| s.line()))),
            "orconn-status" => ok(lines(
                self.backend
                    .orconns(now)
                    .iter()
                    .map(|o| format!("{} CONNECTED", o.peer)),
            )),
            "status/bootstrap-phase" => ok(self.backend.bootstrap().line()),
            "status/circuit-established" => ok(if self.backend.bootstrap().progress >= 100 {
                "1".into()
            } else {
                "0".into()
            }),
            "net/listeners/control" => ok(self
                .info
                .control_listeners
                .iter()
                .map(|l| quote(l))
                .collect::<Vec<_>>()
                .join(" ")),
            "accounting/enabled" => ok("0".into()),
            "accounting/hibernating" => ok("awake".into()),
            k if k.starts_with("accounting/") => Some(Err(
                "accounting is not enabled (Allium has no accounting)".into(),
            )),
            "dormant" => ok("0".into()),
            "events/names" => ok(EVENT_NAMES.join(" ")),
            "features/names" => ok("VERBOSE_NAMES EXTENDED_EVENTS".into()),
            "signal/names" => ok(Signal::NAMES.into()),
            "info/names" => ok(self.info_names()),
            "config/names" => ok(lines(
                self.backend
                    .options()
                    .iter()
                    .map(|o| format!("{} {}", o.name, o.kind)),
            )),
            "config/defaults" => ok(lines(self.backend.options().iter().flat_map(|o| {
                o.defaults
                    .iter()
                    .map(|d| format!("{} {d}", o.name))
                    .collect::<Vec<_>>()
            }))),
            "config-text" => ok(lines(self.backend.options().iter().flat_map(|o| {
                if o.values == o.defaults {
                    Vec::new()
                } else {
                    o.values.iter().map(|v| format!("{} {v}", o.name)).collect()
                }
            }))),
            k => self.backend.getinfo(k, now),
        }
    }

    fn info_names(&self) -> String {
        let common: &[(&str, &str)] = &[
            ("version", "The version of the server's software."),
            ("config-file", "Current location of the configuration file."),
            ("process/pid", "Process id belonging to the main process."),
            (
                "process/user",
                "Username under which the process is running.",
            ),
            ("process/descriptor-limit", "File descriptor limit."),
            ("uptime", "Uptime of the process in seconds."),
            (
                "bw-event-cache",
                "Bytes read and written in each of the last 300 seconds.",
            ),
            ("traffic/read", "Bytes read since the process was started."),
            (
                "traffic/written",
                "Bytes written since the process was started.",
            ),
            (
                "circuit-status",
                "List of current circuits originating here.",
            ),
            ("stream-status", "List of current streams."),
            ("orconn-status", "A list of current OR connections."),
            (
                "status/bootstrap-phase",
                "The last bootstrap phase status event.",
            ),
            (
                "status/circuit-established",
                "Whether we think client functionality is working.",
            ),
            ("net/listeners/control", "Bound addresses by type: control."),
            (
                "accounting/enabled",
                "Is accounting currently enabled? (never, in Allium)",
            ),
            (
                "accounting/hibernating",
                "Are we hibernating or awake? (always awake)",
            ),
            ("dormant", "Are we dormant? (never)"),
            (
                "events/names",
                "Events that the controller can ask for with SETEVENTS.",
            ),
            ("features/names", "What arguments can USEFEATURE take?"),
            ("signal/names", "All signal names."),
            (
                "info/names",
                "List of GETINFO options, types, and documentation.",
            ),
            (
                "config/names",
                "List of configuration options, types, and documentation.",
            ),
            (
                "config/defaults",
                "List of default values for configuration options.",
            ),
            (
                "config-text",
                "Return the current configuration (options set away from their defaults).",
            ),
        ];
        let mut all: Vec<(&str, &str)> = common.to_vec();
        all.extend(self.backend.info_names());
        lines(all.iter().map(|(k, d)| format!("{k} -- {d}")))
    }

    fn getinfo(&self, args: &[Arg], now: &Now) -> String {
        if args.is_empty() || args.iter().any(|a| a.key.is_some() || a.quoted) {
            return single(Code::SYNTAX, "GETINFO takes one or more keys");
        }
        let mut answers = Vec::with_capacity(args.len());
        for a in args {
            match self.info_value(&a.value, now) {
                None => {
                    return single(
                        Code::UNRECOGNIZED_ENTITY,
                        &format!("Unrecognized key {}", quote(&a.value)),
                    );
                }
                Some(Err(why)) => {
                    return single(
                        Code::UNSPECIFIED,
                        &format!("Cannot answer {}: {why}", quote(&a.value)),
                    );
                }
                Some(Ok(v)) => answers.push((a.value.as_str(), v)),
            }
        }
        let mut r = Reply::new(Code::OK);
        for (k, v) in &answers {
            r.key_value(k, v);
        }
        r.end("OK")
    }

    fn find_option<'o>(
        options: &'o [crate::backend::ConfOption],
        name: &str,
    ) -> Option<&'o crate::backend::ConfOption> {
        options
            .iter()
            .find(|o| o.name.eq_ignore_ascii_case(name) || o.allium_key.eq_ignore_ascii_case(name))
    }

    fn getconf(&self, args: &[Arg]) -> String {
        if args.iter().any(|a| a.key.is_some() || a.quoted) {
            return single(Code::SYNTAX, "GETCONF takes option names");
        }
        let options = self.backend.options();
        let mut out_lines = Vec::new();
        for a in args {
            let Some(o) = Self::find_option(&options, &a.value) else {
                return single(
                    Code::UNRECOGNIZED_ENTITY,
                    &format!("Unrecognized configuration key {}", quote(&a.value)),
                );
            };
            if o.values.is_empty() {
                out_lines.push(o.name.to_owned());
            }
            for v in &o.values {
                out_lines.push(format!("{}={v}", o.name));
            }
        }
        let Some(last) = out_lines.pop() else {
            return single(Code::OK, "OK");
        };
        let mut r = Reply::new(Code::OK);
        for l in &out_lines {
            r.mid(l);
        }
        r.end(&last)
    }

    fn setconf(&self, args: &[Arg], reset: bool) -> Output {
        if args.is_empty() {
            return Output::reply(single(Code::SYNTAX, "No options given"));
        }
        let options = self.backend.options();
        let mut changes: Vec<(&'static str, Vec<String>)> = Vec::new();
        for a in args {
            let (name, value) = match (&a.key, reset) {
                (Some(k), false) => (k.as_str(), Some(a.value.clone())),
                (None, _) if !a.quoted => (a.value.as_str(), None),
                _ => {
                    return Output::reply(single(
                        Code::SYNTAX,
                        "Syntax error: expected KEY or KEY=VALUE",
                    ));
                }
            };
            let Some(o) = Self::find_option(&options, name) else {
                return Output::reply(single(
                    Code::UNRECOGNIZED_ENTITY,
                    &format!(
                        "Unrecognized option: Unknown option {}. Check docs/CONTROL.md for the options Allium has",
                        quote(name)
                    ),
                ));
            };
            let entry = match changes.iter_mut().find(|(n, _)| *n == o.name) {
                Some(e) => e,
                None => {
                    changes.push((o.name, Vec::new()));
                    let Some(e) = changes.last_mut() else {
                        return Output::reply(single(Code::INTERNAL, "Internal error"));
                    };
                    e
                }
            };
            if let Some(v) = value {
                entry.1.push(v);
            }
        }
        // What really changes, with the defaults filled in for reset options.
        let live: Vec<SetConf> = changes
            .iter()
            .filter_map(|(name, values)| {
                let o = options.iter().find(|o| o.name == *name)?;
                let wanted = if values.is_empty() {
                    o.defaults.clone()
                } else {
                    values.clone()
                };
                (wanted != o.values).then_some(SetConf {
                    name: o.name,
                    key: o.allium_key,
                    kind: o.kind,
                    values: wanted,
                })
            })
            .collect();
        let reply = match self.backend.set_options(&changes) {
            Ok(()) => single(Code::OK, "OK"),
            Err(why) => single(
                Code::INVALID_CONFIG,
                &format!("Unable to set option: {why}"),
            ),
        };
        Output {
            reply,
            setconf: (!live.is_empty()).then_some(live),
            ..Output::default()
        }
    }

    fn setevents(&mut self, args: &[Arg], now: &Now) -> String {
        let mut set = BTreeSet::new();
        for a in args {
            if a.key.is_some() || a.quoted {
                return single(Code::SYNTAX, "SETEVENTS takes event names");
            }
            let upper = a.value.to_ascii_uppercase();
            if upper == "EXTENDED" {
                continue; // Always on in current Tor; accepted for old controllers.
            }
            let Some(name) = EVENT_NAMES.iter().find(|n| **n == upper) else {
                return single(
                    Code::UNRECOGNIZED_ENTITY,
                    &format!("Unrecognized event {}", quote(&a.value)),
                );
            };
            set.insert(*name);
        }
        // Event kinds no longer wanted forget their baseline; kinds kept go on from theirs (so
        // changes since the last tick are not lost); new kinds take theirs now.
        if !set.contains("BW") {
            self.seen.traffic = None;
        }
        if !set.contains("ORCONN") {
            self.seen.orconns = None;
        }
        if !set.contains("STATUS_CLIENT") {
            self.seen.bootstrap = None;
        }
        self.events = set;
        let mut out = single(Code::OK, "OK");
        out.push_str(&self.changes(now, false));
        out
    }

    fn signal(&mut self, args: &[Arg]) -> Output {
        let [a] = args else {
            return Output::reply(single(Code::SYNTAX, "SIGNAL takes one signal name"));
        };
        let Some(sig) = Signal::parse(&a.value).filter(|_| a.key.is_none() && !a.quoted) else {
            return Output::reply(single(
                Code::UNRECOGNIZED_ENTITY,
                &format!("Unrecognized signal code {}", quote(&a.value)),
            ));
        };
        let action = match sig {
            Signal::Reload => Some(Action::Reload),
            Signal::Shutdown => Some(Action::Shutdown),
            Signal::Halt => Some(Action::Halt),
            Signal::Dump | Signal::Debug => None,
            other => {
                if let Err(why) = self.backend.signal(other) {
                    return Output::reply(single(Code::UNSPECIFIED, &why));
                }
                None
            }
        };
        let mut reply = single(Code::OK, "OK");
        if self.events.contains("SIGNAL") {
            reply.push_str(&single(Code::EVENT, &format!("SIGNAL {}", sig.name())));
        }
        Output {
            reply,
            action,
            ..Output::default()
        }
    }

    /// Once a second: the BW event and the events found by comparing snapshots.
    pub fn tick(&mut self, now: &Now) -> String {
        self.changes(now, true)
    }

    /// Events for what changed since the last look (and the BW event if `bw`); kinds seen for the
    /// first time only take their baseline.
    fn changes(&mut self, now: &Now, bw: bool) -> String {
        let mut out = String::new();
        if !self.authenticated {
            return out;
        }
        if self.events.contains("BW") && (bw || self.seen.traffic.is_none()) {
            let cur = self.backend.traffic();
            if let Some(prev) = self.seen.traffic {
                out.push_str(&single(
                    Code::EVENT,
                    &format!(
                        "BW {} {}",
                        cur.0.saturating_sub(prev.0),
                        cur.1.saturating_sub(prev.1)
                    ),
                ));
            }
            self.seen.traffic = Some(cur);
        }
        if self.events.contains("ORCONN") {
            let cur: BTreeMap<u64, OrConnStatus> = self
                .backend
                .orconns(now)
                .into_iter()
                .map(|o| (o.id, o))
                .collect();
            if let Some(prev) = &self.seen.orconns {
                for (id, o) in &cur {
                    if !prev.contains_key(id) {
                        let n = o
                            .n_circs
                            .map(|n| format!(" NCIRCS={n}"))
                            .unwrap_or_default();
                        out.push_str(&single(
                            Code::EVENT,
                            &format!("ORCONN {} CONNECTED{n} ID={}", o.peer, o.id),
                        ));
                    }
                }
                for (id, o) in prev {
                    if !cur.contains_key(id) {
                        out.push_str(&single(
                            Code::EVENT,
                            &format!("ORCONN {} CLOSED REASON=DONE ID={}", o.peer, o.id),
                        ));
                    }
                }
            }
            self.seen.orconns = Some(cur);
        }
        if self.events.contains("STATUS_CLIENT") {
            let cur = self.backend.bootstrap();
            if self.seen.bootstrap.is_some_and(|b| b != cur) {
                out.push_str(&single(
                    Code::EVENT,
                    &format!("STATUS_CLIENT {}", cur.line()),
                ));
            }
            self.seen.bootstrap = Some(cur);
        }
        out
    }

    /// An event the node pushed (CIRC, STREAM), if the controller subscribed to its kind.
    pub fn pushed_event(&self, ev: &crate::events::Event) -> String {
        if !self.authenticated || !self.events.contains(ev.kind) {
            return String::new();
        }
        single(Code::EVENT, &ev.body)
    }

    /// A log event, if the controller subscribed to its severity.
    pub fn log_event(&self, rec: &LogRecord) -> String {
        if !self.authenticated || !self.events.contains(rec.severity) {
            return String::new();
        }
        single(Code::EVENT, &format!("{} {}", rec.severity, rec.message))
    }
}

fn usefeature(args: &[Arg]) -> String {
    for a in args {
        let f = a.value.to_ascii_uppercase();
        if a.key.is_some() || !matches!(f.as_str(), "VERBOSE_NAMES" | "EXTENDED_EVENTS") {
            return single(
                Code::UNRECOGNIZED_ENTITY,
                &format!("Unrecognized feature {}", quote(&a.value)),
            );
        }
    }
    single(Code::OK, "OK")
}

/// Join lines with `\n` (a GETINFO value of several lines becomes a data block).
fn lines(it: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = it.collect();
    v.join("\n")
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
