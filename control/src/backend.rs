//! What a role (relay or proxy) tells the control port: the [`ControlBackend`] trait, the status
//! records it returns, and their Tor formats (circuit-status, orconn-status, stream-status,
//! bootstrap phase, `ns` entries).
//!
//! Naming: Allium identities are 32-byte Ed25519 keys; stem and Nyx only accept Tor's 40-hex-digit
//! fingerprints, so a relay appears as [`fingerprint`]: the first 20 bytes of its identity in upper
//! hex (docs/CONTROL.md).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use allium_crypto::RelayId;
use allium_directory::doc::ConsensusEntry;
use base64::Engine as _;

/// The time, as the driver read it: monotonic for ages, wall-clock for timestamps.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// Monotonic time.
    pub mono: Instant,
    /// Wall-clock time.
    pub wall: SystemTime,
}

/// The Tor-style fingerprint of a relay: its identity's first 20 bytes, upper-case hex.
pub fn fingerprint(id: &RelayId) -> String {
    hex::encode_upper(id.0.get(..20).unwrap_or(&id.0[..]))
}

/// `$FINGERPRINT~nickname` (Tor's long name; `~nickname` left out when unknown).
pub fn long_name(id: &RelayId, nickname: Option<&str>) -> String {
    match nickname {
        Some(n) if !n.is_empty() => format!("${}~{n}", fingerprint(id)),
        _ => format!("${}", fingerprint(id)),
    }
}

/// Seconds and microseconds since 1970 as `YYYY-MM-DD`, `HH:MM:SS`, micros (UTC).
fn civil(t: SystemTime) -> (String, String, u32) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil-from-days (H. Hinnant's algorithm), proleptic Gregorian calendar.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60),
        d.subsec_micros(),
    )
}

/// Tor's `ISOTime2Frac`: `2026-11-30T17:00:00.000000`.
pub fn iso_time_frac(t: SystemTime) -> String {
    let (d, h, us) = civil(t);
    format!("{d}T{h}.{us:06}")
}

/// Tor's `ISOTime`: `2026-11-30 17:00:00`.
pub fn iso_time(t: SystemTime) -> String {
    let (d, h, _) = civil(t);
    format!("{d} {h}")
}

/// An Allium log filter (`info`, `warn,allium_relay=debug`, ...) as Tor's `Log` option: the
/// default level mapped to Tor's severity (tracing's info is Tor's notice, debug is info), then
/// `stderr`, where Allium logs. Directives for single modules are left out.
pub fn tor_log_line(filter: &str) -> String {
    let level = filter
        .split(',')
        .map(str::trim)
        .rev()
        .find(|d| !d.contains('='))
        .unwrap_or("info");
    let sev = match level.to_ascii_lowercase().as_str() {
        "error" => "err",
        "warn" => "warn",
        "debug" => "info",
        "trace" => "debug",
        _ => "notice",
    };
    format!("{sev} stderr")
}

/// A circuit's state (control-spec `CircStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CircState {
    /// Being built.
    Launched,
    /// One more hop added (not all yet).
    Extended,
    /// All hops added.
    Built,
    /// The build failed.
    Failed,
    /// Gone.
    Closed,
}

impl CircState {
    /// Tor's keyword.
    pub fn keyword(self) -> &'static str {
        match self {
            Self::Launched => "LAUNCHED",
            Self::Extended => "EXTENDED",
            Self::Built => "BUILT",
            Self::Failed => "FAILED",
            Self::Closed => "CLOSED",
        }
    }
}

/// One origin circuit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircuitStatus {
    /// The control port's id for it (stable while it lives).
    pub id: u64,
    /// Its state.
    pub state: CircState,
    /// Its hops as `$FP~nick`, guard first.
    pub path: Vec<String>,
    /// `BUILD_FLAGS` (e.g. `NEED_CAPACITY`).
    pub build_flags: Vec<&'static str>,
    /// `PURPOSE` (e.g. `GENERAL`).
    pub purpose: &'static str,
    /// When it was created (`TIME_CREATED`).
    pub created: SystemTime,
}

impl CircuitStatus {
    /// The circuit-status line (also the body of a CIRC event): `ID STATUS PATH KEY=VALUE...`.
    pub fn line(&self, state: CircState) -> String {
        let mut s = format!("{} {}", self.id, state.keyword());
        if !self.path.is_empty() {
            s.push(' ');
            s.push_str(&self.path.join(","));
        }
        if !self.build_flags.is_empty() {
            s.push_str(" BUILD_FLAGS=");
            s.push_str(&self.build_flags.join(","));
        }
        s.push_str(" PURPOSE=");
        s.push_str(self.purpose);
        s.push_str(" TIME_CREATED=");
        s.push_str(&iso_time_frac(self.created));
        s
    }
}

/// One stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamStatus {
    /// The control port's id for it.
    pub id: u64,
    /// Tor's `StreamStatus` keyword: `NEW`, `NEWRESOLVE`, `SENTCONNECT`, `SENTRESOLVE`,
    /// `SUCCEEDED`, `FAILED` or `CLOSED`.
    pub status: &'static str,
    /// The circuit (control id) carrying it; 0 while none is chosen.
    pub circ_id: u64,
    /// Its target as `host:port` (the controller is the local operator; Tor shows it too).
    pub target: String,
}

impl StreamStatus {
    /// The stream-status line (also the start of a STREAM event): `ID STATUS CIRCID TARGET`.
    pub fn line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.id, self.status, self.circ_id, self.target
        )
    }
}

/// One link to another relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrConnStatus {
    /// The control port's id for it.
    pub id: u64,
    /// The peer as `$FP~nick`.
    pub peer: String,
    /// Circuits on it, when known.
    pub n_circs: Option<u64>,
}

/// Bootstrap progress (control-spec §5.5, `status/bootstrap-phase`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bootstrap {
    /// Percent.
    pub progress: u8,
    /// Tor's tag (`starting`, `conn_dir`, `loading_descriptors`, `circuit_create`, `done`, ...).
    pub tag: &'static str,
    /// A sentence for people.
    pub summary: &'static str,
}

impl Bootstrap {
    /// `NOTICE BOOTSTRAP PROGRESS=.. TAG=.. SUMMARY=".."`.
    pub fn line(&self) -> String {
        format!(
            "NOTICE BOOTSTRAP PROGRESS={} TAG={} SUMMARY={}",
            self.progress,
            self.tag,
            crate::args::quote(self.summary)
        )
    }
}

/// One configuration option as GETCONF shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfOption {
    /// The name controllers use: Tor's where Tor has the option, else Allium's key.
    pub name: &'static str,
    /// The Allium configuration key it maps to.
    pub allium_key: &'static str,
    /// Tor's type name (`String`, `Port`, `DataSize`, `Boolean`, `LineList`, `Filename`,
    /// `Interval`, `Integer`).
    pub kind: &'static str,
    /// Current values (empty: unset).
    pub values: Vec<String>,
    /// Default values.
    pub defaults: Vec<String>,
}

/// A SIGNAL (control-spec §3.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// RELOAD / HUP.
    Reload,
    /// SHUTDOWN / INT: clean shutdown.
    Shutdown,
    /// HALT / TERM: immediate shutdown.
    Halt,
    /// DUMP / USR1.
    Dump,
    /// DEBUG / USR2.
    Debug,
    /// NEWNYM: new streams use fresh circuits.
    NewNym,
    /// CLEARDNSCACHE.
    ClearDnsCache,
    /// HEARTBEAT: log a status line now.
    Heartbeat,
    /// ACTIVE.
    Active,
    /// DORMANT.
    Dormant,
}

impl Signal {
    /// Parse a signal name as Tor accepts it.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "RELOAD" | "HUP" => Self::Reload,
            "SHUTDOWN" | "INT" => Self::Shutdown,
            "HALT" | "TERM" => Self::Halt,
            "DUMP" | "USR1" => Self::Dump,
            "DEBUG" | "USR2" => Self::Debug,
            "NEWNYM" => Self::NewNym,
            "CLEARDNSCACHE" => Self::ClearDnsCache,
            "HEARTBEAT" => Self::Heartbeat,
            "ACTIVE" => Self::Active,
            "DORMANT" => Self::Dormant,
            _ => return None,
        })
    }

    /// Tor's name (as in SIGNAL events).
    pub fn name(self) -> &'static str {
        match self {
            Self::Reload => "RELOAD",
            Self::Shutdown => "SHUTDOWN",
            Self::Halt => "HALT",
            Self::Dump => "DUMP",
            Self::Debug => "DEBUG",
            Self::NewNym => "NEWNYM",
            Self::ClearDnsCache => "CLEARDNSCACHE",
            Self::Heartbeat => "HEARTBEAT",
            Self::Active => "ACTIVE",
            Self::Dormant => "DORMANT",
        }
    }

    /// Every signal name (`signal/names`).
    pub const NAMES: &'static str = "RELOAD SHUTDOWN DUMP DEBUG HALT HUP INT USR1 USR2 TERM NEWNYM CLEARDNSCACHE HEARTBEAT ACTIVE DORMANT";
}

/// An answer to a GETINFO key the backend knows but cannot answer now.
pub type InfoResult = Result<String, String>;

/// What the relay or proxy provides to its control port. Every method is quick and
/// non-blocking (snapshots of shared state); the control driver calls them from its tasks.
pub trait ControlBackend: Send + Sync + 'static {
    /// `relay` or `proxy` (for messages).
    fn role(&self) -> &'static str;
    /// Answer a role-specific GETINFO key: `None` if unknown, `Some(Err(why))` if known but
    /// unavailable (e.g. no consensus yet).
    fn getinfo(&self, key: &str, now: &Now) -> Option<InfoResult>;
    /// The role-specific keys of [`ControlBackend::getinfo`] with a line of documentation each
    /// (`info/names`; a key ending in `/*` is a prefix).
    fn info_names(&self) -> Vec<(&'static str, &'static str)>;
    /// Every configuration option, with current and default values.
    fn options(&self) -> Vec<ConfOption>;
    /// Apply SETCONF/RESETCONF changes (option name as in [`ConfOption::name`], new values; empty
    /// means "default") all or nothing. `Err(why)` becomes reply 553.
    fn set_options(&self, changes: &[(&'static str, Vec<String>)]) -> Result<(), String>;
    /// Act on a role-specific signal (NEWNYM, HEARTBEAT, CLEARDNSCACHE, ...). The driver itself
    /// handles RELOAD, SHUTDOWN and HALT.
    fn signal(&self, signal: Signal) -> Result<(), String>;
    /// Bytes read and written so far.
    fn traffic(&self) -> (u64, u64);
    /// Origin circuits (the proxy's; a relay has none).
    fn circuits(&self, now: &Now) -> Vec<CircuitStatus>;
    /// Open streams.
    fn streams(&self, now: &Now) -> Vec<StreamStatus>;
    /// Open links to relays.
    fn orconns(&self, now: &Now) -> Vec<OrConnStatus>;
    /// Bootstrap progress.
    fn bootstrap(&self) -> Bootstrap;
    /// The bus on which the node pushes CIRC and STREAM events as they happen (`None`: it has
    /// none to push, as a relay, which originates no circuits).
    fn events(&self) -> Option<&crate::events::EventBus> {
        None
    }
}

/// Answer a GETINFO `ns/all`, `ns/id/<fingerprint>` or `ns/name/<nickname>` key from `nd`
/// (`None` for another `ns/` key, `Err` for a bad fingerprint or an unknown relay).
pub fn ns_lookup(nd: &allium_directory::NetDir, rest: &str) -> Option<Result<String, String>> {
    let published = UNIX_EPOCH + Duration::from_secs(nd.valid_after());
    if rest == "all" {
        return Some(Ok(nd
            .relays()
            .iter()
            .map(|e| ns_entry(e, published))
            .collect()));
    }
    let entry = if let Some(fp) = rest.strip_prefix("id/") {
        let fp = fp.trim_start_matches('$').to_ascii_uppercase();
        if !(fp.len() == 40 || fp.len() == 64) || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Some(Err(format!(
                "{} is not a fingerprint",
                crate::args::quote(&fp)
            )));
        }
        nd.relays()
            .iter()
            .find(|e| hex::encode_upper(e.identity.0).starts_with(&fp))
    } else if let Some(nick) = rest.strip_prefix("name/") {
        nd.relays().iter().find(|e| e.nickname == nick)
    } else {
        return None;
    };
    Some(
        entry
            .map(|e| ns_entry(e, published))
            .ok_or_else(|| "no such relay in the consensus".into()),
    )
}

/// A consensus entry in Tor's router-status format (dir-spec §3.4.1): `r`, `s` and `w` lines.
/// `published` is the consensus's valid-after time.
pub fn ns_entry(e: &ConsensusEntry, published: SystemTime) -> String {
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let id20 = e.identity.0.get(..20).unwrap_or(&e.identity.0[..]);
    // The consensus carries no descriptor digest: the entry digest stands in for it.
    let digest = e.entry_digest();
    let digest20 = digest.get(..20).unwrap_or(&digest[..]);
    let (ip, port) = e
        .addrs
        .first()
        .map(|a| (a.ip().to_string(), a.port()))
        .unwrap_or_else(|| ("0.0.0.0".to_owned(), 0));
    let mut s = format!(
        "r {} {} {} {} {ip} {port} 0\n",
        e.nickname,
        b64.encode(id20),
        b64.encode(digest20),
        iso_time(published),
    );
    for a in e.addrs.iter().skip(1) {
        if a.is_ipv6() {
            s.push_str(&format!("a {a}\n"));
        }
    }
    let flags: Vec<&str> = allium_directory::doc::Flags::ALL
        .iter()
        .filter(|(f, _)| e.flags.contains(*f))
        .map(|(_, n)| *n)
        .collect();
    s.push_str(&format!("s {}\n", flags.join(" ")));
    s.push_str(&format!("w Bandwidth={}\n", e.weight));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let t = UNIX_EPOCH + Duration::from_micros(1_796_058_000_123_456);
        assert_eq!(iso_time_frac(t), "2026-11-30T17:00:00.123456");
        assert_eq!(iso_time(UNIX_EPOCH), "1970-01-01 00:00:00");
        assert_eq!(
            iso_time(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29 00:00:00"
        );
    }

    #[test]
    fn log_filters_in_tor_form() {
        assert_eq!(tor_log_line("info"), "notice stderr");
        assert_eq!(tor_log_line("warn,allium_relay=debug"), "warn stderr");
        assert_eq!(tor_log_line("allium_relay=trace"), "notice stderr");
        assert_eq!(tor_log_line("debug"), "info stderr");
    }

    #[test]
    fn names_and_lines() {
        let id = RelayId([0xab; 32]);
        assert_eq!(fingerprint(&id).len(), 40);
        assert_eq!(
            long_name(&id, Some("r1")),
            format!("${}~r1", "AB".repeat(20))
        );
        let c = CircuitStatus {
            id: 7,
            state: CircState::Built,
            path: vec![long_name(&id, Some("a")), long_name(&id, None)],
            build_flags: vec!["NEED_CAPACITY"],
            purpose: "GENERAL",
            created: UNIX_EPOCH,
        };
        assert_eq!(
            c.line(CircState::Built),
            format!(
                "7 BUILT ${0}~a,${0} BUILD_FLAGS=NEED_CAPACITY PURPOSE=GENERAL TIME_CREATED=1970-01-01T00:00:00.000000",
                "AB".repeat(20)
            )
        );
        assert_eq!(Signal::parse("hup"), Some(Signal::Reload));
        assert_eq!(Signal::parse("NEWNYM").map(Signal::name), Some("NEWNYM"));
        assert_eq!(Signal::parse("NOPE"), None);
    }
}
