//! `allium testnet`: a whole network on loopback — 3 directory authorities, N relays and a SOCKS
//! proxy, each a child process of this one — plus a small HTTP server to try it with. Each
//! authority and relay has its own loopback address (relays in distinct /16s; see
//! [`plan`], "Addresses"); the proxy's ports and the test page stay on 127.0.0.1.
//!
//! It waits until the proxy carries a stream, prints the SOCKS address and a `curl` line, writes
//! `testnet.json` in the data directory, and runs until Ctrl-C (or SIGTERM), then stops every child.

// `allium testnet` supervises real processes in real time: a driver.
#![allow(clippy::disallowed_methods)]

pub mod httpd;
pub mod plan;
mod procs;

/// The SOCKS client used to probe the network (the client crate's codec).
pub use allium_client::socks::client as socks;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use allium_relay::ExitPolicy;
use serde::Serialize;

use super::CmdResult;
pub use plan::{
    AddressLayout, N_AUTHORITIES, N_FALLBACK_DIRS, NetworkBuilder, NetworkPlan, fallback_dirs_from,
};
use plan::{free_port, free_port_on};
use procs::Node;
/// Voting interval of a test network, seconds.
pub const VOTING_INTERVAL_SECS: u64 = 2;
/// How long to wait for the network to carry its first stream.
/// Bytes per bandwidth-scanner download in a test network (small: loopback is fast).
const BWSCAN_OBJECT_SIZE: u64 = 256 * 1024;
/// Seconds between the test network's bandwidth scans.
const BWSCAN_INTERVAL_SECS: u64 = 30;

/// The bandwidth scanner's configuration file (its type is read-only, so it is written as a
/// TOML table).
fn bwscan_toml(c: &allium_client::bwscan::BwScanConfig) -> Result<String, String> {
    use toml::{Table, Value};
    let int = |v: u64| {
        i64::try_from(v)
            .map(Value::Integer)
            .map_err(|e| e.to_string())
    };
    let auths: Vec<Value> = c
        .authorities
        .iter()
        .map(|a| {
            let mut t = Table::new();
            t.insert("identity".into(), a.identity.to_hex().into());
            t.insert("dir_addr".into(), a.dir_addr.to_string().into());
            Value::Table(t)
        })
        .collect();
    let mut t = Table::new();
    t.insert("output".into(), c.output.display().to_string().into());
    t.insert("destination_host".into(), c.destination_host.clone().into());
    t.insert(
        "destination_port".into(),
        int(u64::from(c.destination_port))?,
    );
    t.insert("object_path".into(), c.object_path.clone().into());
    t.insert("object_size".into(), int(c.object_size)?);
    t.insert("scan_interval_secs".into(), int(c.scan_interval_secs)?);
    t.insert("samples".into(), int(c.samples as u64)?);
    t.insert("sample_timeout_secs".into(), int(c.sample_timeout_secs)?);
    t.insert("test_network".into(), c.test_network.into());
    t.insert("authorities".into(), Value::Array(auths));
    if let Some(ip) = c.outbound_bind_address {
        t.insert("outbound_bind_address".into(), ip.to_string().into());
    }
    toml::to_string(&t).map_err(|e| e.to_string())
}

/// The readiness limit for a network of `relays` relays: 90 s plus 0.25 s per relay above 20
/// (a 1,000-relay start on two loaded cores spends minutes spawning processes and voting).
fn default_ready_timeout(relays: usize) -> Duration {
    let extra = u64::try_from(relays.saturating_sub(20)).unwrap_or(u64::MAX);
    Duration::from_secs(90).saturating_add(Duration::from_millis(extra.saturating_mul(250)))
}

/// How often one relay is restarted on a new port after losing its ports to another process.
const MAX_RESPAWNS: u32 = 5;

/// A relay `allium testnet` may restart on new ports: its ports are picked, released and bound
/// later by the child, and another process (another test network on the machine) can take one
/// in between.
struct RelaySlot {
    /// Its index in `nodes` (and `infos`).
    node: usize,
    name: String,
    exit: bool,
    config: allium_relay::RelayConfig,
    identity: allium_crypto::RelayId,
    /// `--relay-port-base` fixed its OR port: a lost port is an error, not a retry.
    fixed_port: bool,
    respawns: u32,
}

/// Fix a relay's ports, write its configuration and start it.
fn spawn_relay(
    dir: &Path,
    name: &str,
    exit: bool,
    config: &mut allium_relay::RelayConfig,
    identity: allium_crypto::RelayId,
) -> Result<(Node, NodeInfo), String> {
    config.metrics_address = Some(free_port().map_err(|e| format!("a port for {name}: {e}"))?);
    let (control_port, control_cookie) = testnet_control(&config.data_dir)?;
    config.control_port = Some(control_port);
    config.cookie_authentication = true;
    let cfg_path = dir.join(format!("{name}.toml"));
    write_file(
        &cfg_path,
        &toml::to_string(&*config).map_err(|e| format!("{name}'s configuration: {e}"))?,
    )?;
    let log = dir.join(format!("{name}.log"));
    let cfg_s = cfg_path.display().to_string();
    let node = procs::spawn(name, &["relay", "--config", &cfg_s], &log)
        .map_err(|e| format!("starting {name}: {e}"))?;
    let mut addrs = serde_json::Map::new();
    addrs.insert("or".into(), config.listen.to_string().into());
    if let Some(m) = config.metrics_address {
        addrs.insert("metrics".into(), m.to_string().into());
    }
    let info = NodeInfo {
        name: name.to_owned(),
        role: "relay",
        pid: node.child.id(),
        identity: identity.to_hex(),
        exit,
        addrs,
        log,
        control_port: Some(control_port),
        control_cookie: Some(control_cookie),
    };
    Ok((node, info))
}

/// Whether a node's log says it could not bind one of its ports.
fn lost_a_port(log: &Path) -> bool {
    log_tail(log, 20).contains("Address already in use")
}

/// If the relay in `slot` exited because another process took one of its ports, start it again
/// on new ports and return true; false if it has not exited. An error for any other exit.
fn respawn_if_port_lost(
    dir: &Path,
    slot: &mut RelaySlot,
    nodes: &mut [Node],
    infos: &mut [NodeInfo],
) -> Result<bool, String> {
    let Some(node) = nodes.get_mut(slot.node) else {
        return Ok(false);
    };
    let Some(status) = procs::exited(node) else {
        return Ok(false);
    };
    if slot.fixed_port || slot.respawns >= MAX_RESPAWNS || !lost_a_port(&node.log) {
        return Err(format!(
            "{} exited during start-up ({status}); the end of its log {}:\n{}",
            node.name,
            node.log.display(),
            log_tail(&node.log, 15)
        ));
    }
    slot.respawns += 1;
    if slot.config.advertised == Some(slot.config.listen) {
        slot.config.advertised = None;
    }
    slot.config.listen = match slot.config.listen.ip() {
        std::net::IpAddr::V4(ip) => free_port_on(ip),
        std::net::IpAddr::V6(_) => free_port(),
    }
    .map_err(|e| format!("a port for {}: {e}", slot.name))?;
    eprintln!(
        "allium testnet: {} lost a port to another process; restarting it on {}",
        slot.name, slot.config.listen
    );
    let (new_node, info) =
        spawn_relay(dir, &slot.name, slot.exit, &mut slot.config, slot.identity)?;
    if let Some(n) = nodes.get_mut(slot.node) {
        *n = new_node;
    }
    if let Some(i) = infos.get_mut(slot.node) {
        *i = info;
    }
    Ok(true)
}

/// Wait (at most 20 s) until the relay in `slot` accepts connections on its OR port, restarting
/// it on new ports if it lost one.
async fn settle_relay(
    dir: &Path,
    slot: &mut RelaySlot,
    nodes: &mut [Node],
    infos: &mut [NodeInfo],
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        respawn_if_port_lost(dir, slot, nodes, infos)?;
        let alive = nodes
            .get_mut(slot.node)
            .is_some_and(|n| procs::exited(n).is_none());
        if alive
            && tokio::net::TcpStream::connect(slot.config.listen)
                .await
                .is_ok()
        {
            // Still ours a moment later (a listener of another process would be, too, but then
            // our relay exits and is restarted by `wait_ready`).
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "{} did not listen on {} within 20 s; see {}",
        slot.name,
        slot.config.listen,
        dir.join(format!("{}.log", slot.name)).display()
    ))
}

/// Arguments of `allium testnet`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of relays (at least 3; the first `--exits` are exits).
    #[arg(long, default_value_t = 6)]
    pub relays: usize,
    /// How many of the relays are exits (at least 1).
    #[arg(long, default_value_t = 2)]
    pub exits: usize,
    /// SOCKS5 port of the proxy on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 9150)]
    pub socks_port: u16,
    /// Data directory (keys, configs, logs, testnet.json). Default: a fresh directory under the
    /// system temp directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Exit as soon as the network is ready (for scripts and smoke tests).
    #[arg(long)]
    pub exit_when_ready: bool,
    /// Relay i listens on port BASE + i of its address instead of a free port (benchmarks that
    /// put a link emulator in front of each relay).
    #[arg(long, value_name = "BASE")]
    pub relay_port_base: Option<u16>,
    /// Relay i advertises port BASE + i of its address in its descriptor instead of its
    /// listener (where a link emulator forwards to the listener): every connection to it goes
    /// through there.
    #[arg(long, value_name = "BASE")]
    pub advertise_port_base: Option<u16>,
    /// Put every node on 127.0.0.1 (the former layout) instead of giving each authority and
    /// relay its own loopback address (relay i on 127.(1 + i % 99).(i / 99).1, authorities on
    /// 127.100.0.1 to 127.102.0.1). Chosen on its own where 127.1.0.1 cannot be bound (macOS).
    /// With it, the /16 path rule and the per-address limits cannot tell nodes apart.
    #[arg(long)]
    pub single_address: bool,
    /// Give up if the proxy carries no stream after this many seconds (default: 90 plus a
    /// quarter second per relay above 20).
    #[arg(long, value_name = "SECS")]
    pub ready_timeout: Option<u64>,
}

/// One node as recorded in `testnet.json`.
#[derive(Serialize, Debug)]
struct NodeInfo {
    name: String,
    role: &'static str,
    pid: u32,
    identity: String,
    exit: bool,
    addrs: serde_json::Map<String, serde_json::Value>,
    log: PathBuf,
    /// The control port (stem, Nyx), if the node has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    control_port: Option<SocketAddr>,
    /// The control port's authentication cookie file.
    #[serde(skip_serializing_if = "Option::is_none")]
    control_cookie: Option<PathBuf>,
}

/// A loopback control port with cookie authentication, for one testnet node: its address and
/// cookie file.
fn testnet_control(data_dir: &std::path::Path) -> Result<(SocketAddr, PathBuf), String> {
    let addr = plan::free_port().map_err(|e| format!("a control port: {e}"))?;
    Ok((addr, data_dir.join(allium_control::config::COOKIE_FILE)))
}

/// The contents of `testnet.json`.
#[derive(Serialize, Debug)]
struct TestnetInfo {
    /// `distinct` (each authority and relay on its own loopback address) or `single` (every
    /// node on 127.0.0.1).
    address_layout: &'static str,
    socks: SocketAddr,
    /// The proxy's HTTP CONNECT tunnel port.
    http_tunnel: Option<SocketAddr>,
    /// The proxy's DNS port (UDP).
    dns: Option<SocketAddr>,
    http_target: SocketAddr,
    /// The address of the onion service in front of the test page.
    onion_address: String,
    ready_secs: f64,
    data_dir: PathBuf,
    nodes: Vec<NodeInfo>,
}

/// Run `allium testnet`.
pub fn run(args: Args) -> CmdResult {
    if args.relays < 3 {
        return Err(
            "--relays must be at least 3 (a circuit needs a guard, a middle and an exit)".into(),
        );
    }
    if args.exits == 0 || args.exits > args.relays {
        return Err("--exits must be between 1 and --relays".into());
    }
    let rt = super::runtime()?;
    rt.block_on(run_async(args))
}

fn prepare_data_dir(arg: Option<PathBuf>) -> Result<PathBuf, String> {
    let dir = arg.unwrap_or_else(|| std::env::temp_dir().join("allium-testnet"));
    if dir.exists() {
        let ours = dir.join(".allium-testnet").exists();
        let empty = std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !ours && !empty {
            return Err(format!(
                "{} exists and is not an Allium test network directory; choose another --data-dir",
                dir.display()
            ));
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    std::fs::write(dir.join(".allium-testnet"), b"")
        .map_err(|e| format!("cannot write in {}: {e}", dir.display()))?;
    Ok(dir)
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Print the last lines of a node's log (used when a node dies during start-up).
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

async fn run_async(args: Args) -> CmdResult {
    let started = Instant::now();
    let dir = prepare_data_dir(args.data_dir.clone())?;
    let socks_addr = if args.socks_port == 0 {
        free_port()?
    } else {
        let a = SocketAddr::from(([127, 0, 0, 1], args.socks_port));
        if TcpListener::bind(a).is_err() {
            return Err(format!(
                "127.0.0.1:{} is already in use; pass --socks-port with a free port (or 0 for any)",
                args.socks_port
            )
            .into());
        }
        a
    };
    let layout = if args.single_address {
        AddressLayout::Single
    } else {
        let l = AddressLayout::detect();
        if l == AddressLayout::Single {
            eprintln!(
                "allium testnet: this system does not route 127.1.0.1 to loopback (only \
                 127.0.0.1?): every node goes on 127.0.0.1, and the /16 path rule and the \
                 per-address limits cannot tell them apart"
            );
        }
        l
    };
    eprintln!(
        "allium testnet: starting {N_AUTHORITIES} authorities, {} relays ({} exits) and a proxy in {} ({})",
        args.relays,
        args.exits,
        dir.display(),
        match layout {
            AddressLayout::Distinct =>
                "each authority and relay on its own loopback address, relays from 127.1.0.1",
            AddressLayout::Single => "every node on 127.0.0.1",
        }
    );

    // One plan (keys, addresses, configurations) for every node; the authorities' listeners
    // are released just before their processes bind the same addresses.
    let now = allium_directory::now_unix();
    let plan = NetworkBuilder::new()
        .relays(args.relays)
        .exits(args.exits)
        .exit_policy(ExitPolicy::accept_all(true))
        .voting_interval_secs(VOTING_INTERVAL_SECS)
        .fixed_relay_ports(true)
        .relay_port_base(args.relay_port_base)
        .advertise_port_base(args.advertise_port_base)
        .socks_listen(socks_addr)
        .bandwidth_file(dir.join("bwscan").join("bandwidth"))
        .address_layout(layout)
        .plan(&dir, now)?;

    let mut nodes: Vec<Node> = Vec::new();
    let mut infos: Vec<NodeInfo> = Vec::new();
    let result = start_and_serve(args, &dir, plan, started, &mut nodes, &mut infos).await;
    eprintln!("allium testnet: stopping {} processes", nodes.len());
    procs::stop_all(&mut nodes, Duration::from_secs(5));
    result
}

async fn start_and_serve(
    args: Args,
    dir: &Path,
    plan: NetworkPlan,
    started: Instant,
    nodes: &mut Vec<Node>,
    infos: &mut Vec<NodeInfo>,
) -> CmdResult {
    let socks_addr = plan.proxy.socks_listen;
    let texts = (0..plan.authorities.len())
        .map(|i| plan.authority_toml(i))
        .collect::<Result<Vec<_>, _>>()?;
    let authorities_bwfile = plan.authority_config(0).and_then(|c| c.bandwidth_file);
    let layout = plan.layout;
    let NetworkPlan {
        authorities,
        relays,
        proxy,
        ..
    } = plan;
    for (a, text) in authorities.into_iter().zip(texts) {
        // The child process binds this address: let go of it first.
        drop(a.listener);
        let cfg = dir.join(format!("{}.toml", a.name));
        let metrics = free_port()?;
        // A top-level key goes before the file's tables.
        let text = format!("metrics_address = \"{metrics}\"\n{text}");
        write_file(&cfg, &text)?;
        let log = dir.join(format!("{}.log", a.name));
        let cfg_s = cfg.display().to_string();
        let node = procs::spawn(&a.name, &["authority", "--config", &cfg_s], &log)?;
        let mut addrs = serde_json::Map::new();
        addrs.insert("dir".into(), a.addr.to_string().into());
        addrs.insert("metrics".into(), metrics.to_string().into());
        infos.push(NodeInfo {
            name: node.name.clone(),
            role: "authority",
            pid: node.child.id(),
            identity: a.identity.to_hex(),
            exit: false,
            addrs,
            log,
            control_port: None,
            control_cookie: None,
        });
        nodes.push(node);
    }

    let mut fallback_dirs = Vec::new();
    let mut respawnable = Vec::new();
    let n_relays = relays.len();
    for (i, mut r) in relays.into_iter().enumerate() {
        let keys = allium_relay::keys::RelayKeys::load_or_create(&r.config.data_dir)
            .map_err(|e| format!("creating keys for {}: {e}", r.name))?;
        // The first few relays are the proxy's fallback directory caches.
        let fallback = fallback_dirs.len() < N_FALLBACK_DIRS;
        let (node, info) = spawn_relay(dir, &r.name, r.exit, &mut r.config, keys.id)?;
        respawnable.push(RelaySlot {
            node: nodes.len(),
            name: r.name,
            exit: r.exit,
            config: r.config,
            identity: keys.id,
            fixed_port: args.relay_port_base.is_some(),
            respawns: 0,
        });
        nodes.push(node);
        infos.push(info);
        if fallback {
            // Its OR port must be its own before the proxy's configuration names it.
            if let Some(slot) = respawnable.last_mut() {
                settle_relay(dir, slot, nodes, infos).await?;
                fallback_dirs.push(allium_client::config::FallbackDir {
                    identity: slot.identity,
                    link_key: keys.link.public(),
                    onion_key: keys.onion_public(),
                    or_addr: slot.config.advertised.unwrap_or(slot.config.listen),
                });
            }
        }
        if (i + 1) % 100 == 0 && i + 1 < n_relays {
            eprintln!(
                "allium testnet: {:>5.1} s: {} of {n_relays} relays started",
                started.elapsed().as_secs_f64(),
                i + 1
            );
        }
    }

    // The test page server, also the bandwidth scanner's download destination.
    let (http_addr, _http_task) = httpd::spawn(SocketAddr::from(([127, 0, 0, 1], 0))).await?;

    // The bandwidth scanner beside the authorities (their `bandwidth_file` is its output). It
    // runs on its own: the network is ready before its first scan ends, and the next voting
    // period after a scan lists measured weights.
    if let Some(bwfile) = authorities_bwfile.as_ref() {
        let bw_dir = bwfile.parent().unwrap_or(dir).to_path_buf();
        std::fs::create_dir_all(&bw_dir)
            .map_err(|e| format!("creating {}: {e}", bw_dir.display()))?;
        let mut bcfg = allium_client::bwscan::BwScanConfig::new(
            proxy.authorities.clone(),
            bwfile.clone(),
            http_addr,
        );
        bcfg.object_size = BWSCAN_OBJECT_SIZE;
        bcfg.samples = 1;
        bcfg.sample_timeout_secs = 10;
        bcfg.scan_interval_secs = BWSCAN_INTERVAL_SECS;
        bcfg.test_network = true;
        bcfg.outbound_bind_address = layout.bwscan().map(std::net::IpAddr::V4);
        let bpath = dir.join("bwscan.toml");
        write_file(&bpath, &bwscan_toml(&bcfg)?)?;
        let blog = dir.join("bwscan.log");
        let bpath_s = bpath.display().to_string();
        let node = procs::spawn("bwscan", &["bwscan", "--config", &bpath_s], &blog)?;
        infos.push(NodeInfo {
            name: node.name.clone(),
            role: "bwscan",
            pid: node.child.id(),
            identity: String::new(),
            exit: false,
            addrs: serde_json::Map::new(),
            log: blog,
            control_port: None,
            control_cookie: None,
        });
        nodes.push(node);
    }

    let mut pcfg = proxy;
    pcfg.fallback_dirs = fallback_dirs;
    let (pcontrol_port, pcontrol_cookie) = testnet_control(&pcfg.data_dir)?;
    pcfg.control_port = Some(pcontrol_port);
    pcfg.cookie_authentication = true;
    // Fixed ports for every client port, so testnet.json can name them.
    pcfg.http_tunnel_port = Some(free_port()?);
    pcfg.dns_port = Some(free_port()?);
    pcfg.metrics_address = Some(free_port()?);
    // One onion service in front of the test page (issue 13), its key in the data directory.
    let onion_key_dir = dir.join("onion-service");
    let (_, onion_addr) = allium_client::onion::keys::load_or_create_identity(&onion_key_dir)
        .map_err(|e| format!("creating the test onion service's key: {e}"))?;
    pcfg.onion_service
        .push(allium_client::config::OnionServiceConfig {
            name: "testpage".into(),
            key_dir: onion_key_dir,
            ports: vec![
                format!("80 -> {http_addr}")
                    .parse()
                    .map_err(|e| format!("the test onion service's port map: {e}"))?,
            ],
            authorized_clients: None,
            pow: false,
            pow_queue_rate: allium_client::onion::pow::DEFAULT_QUEUE_RATE,
            pow_queue_burst: allium_client::onion::pow::DEFAULT_QUEUE_BURST,
        });
    let pcfg_path = dir.join("proxy.toml");
    write_file(&pcfg_path, &toml::to_string(&pcfg)?)?;
    let plog = dir.join("proxy.log");
    let pcfg_s = pcfg_path.display().to_string();
    let proxy = procs::spawn("proxy", &["proxy", "--config", &pcfg_s], &plog)?;
    let mut addrs = serde_json::Map::new();
    addrs.insert("socks".into(), socks_addr.to_string().into());
    for (key, a) in [
        ("http_tunnel", pcfg.http_tunnel_port),
        ("dns", pcfg.dns_port),
        ("metrics", pcfg.metrics_address),
    ] {
        if let Some(a) = a {
            addrs.insert(key.into(), a.to_string().into());
        }
    }
    infos.push(NodeInfo {
        name: "proxy".into(),
        role: "client",
        pid: proxy.child.id(),
        identity: String::new(),
        exit: false,
        addrs,
        log: plog,
        control_port: Some(pcontrol_port),
        control_cookie: Some(pcontrol_cookie),
    });
    nodes.push(proxy);

    let ready_timeout = args
        .ready_timeout
        .map(Duration::from_secs)
        .unwrap_or_else(|| default_ready_timeout(n_relays));
    wait_ready(
        dir,
        nodes,
        infos,
        &mut respawnable,
        socks_addr,
        http_addr,
        started,
        ready_timeout,
    )
    .await?;
    let ready_secs = started.elapsed().as_secs_f64();

    let info = TestnetInfo {
        address_layout: match layout {
            AddressLayout::Distinct => "distinct",
            AddressLayout::Single => "single",
        },
        socks: socks_addr,
        http_tunnel: pcfg.http_tunnel_port,
        dns: pcfg.dns_port,
        http_target: http_addr,
        onion_address: onion_addr.to_string(),
        ready_secs,
        data_dir: dir.to_path_buf(),
        nodes: std::mem::take(infos),
    };
    let json = serde_json::to_string_pretty(&info)?;
    write_file(&dir.join("testnet.json"), &json)?;
    *infos = info.nodes;

    let _ = crate::outln!();
    let _ = crate::outln!("Allium test network ready in {ready_secs:.1} s.");
    let _ = crate::outln!("  SOCKS5 proxy:  {socks_addr}");
    if let Some(a) = pcfg.http_tunnel_port {
        let _ = crate::outln!("  HTTP CONNECT:  {a}  (curl --proxytunnel --proxy http://{a} ...)");
    }
    if let Some(a) = pcfg.dns_port {
        let _ = crate::outln!("  DNS (UDP):     {a}");
    }
    if let Some(a) = pcfg.metrics_address {
        let _ = crate::outln!("  metrics:       http://{a}/metrics");
    }
    let _ = crate::outln!("  test page:     http://{http_addr}/");
    let _ = crate::outln!("  onion service: http://{onion_addr}/  (the test page)");
    let _ = crate::outln!("  details:       {}", dir.join("testnet.json").display());
    let _ = crate::outln!();
    let _ = crate::outln!("Try it:");
    let _ = crate::outln!("  curl --socks5-hostname {socks_addr} http://{http_addr}/");
    let _ = crate::outln!();
    if args.exit_when_ready {
        return Ok(());
    }
    let _ = crate::outln!("Press Ctrl-C to stop.");
    wait_for_stop(nodes).await;
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one call site; each argument is a different piece
async fn wait_ready(
    dir: &Path,
    nodes: &mut [Node],
    infos: &mut [NodeInfo],
    relays: &mut [RelaySlot],
    socks_addr: SocketAddr,
    http_addr: SocketAddr,
    started: Instant,
    timeout: Duration,
) -> CmdResult {
    let mut last_report = Instant::now();
    loop {
        for slot in relays.iter_mut() {
            respawn_if_port_lost(dir, slot, nodes, infos)?;
        }
        for n in nodes.iter_mut() {
            if let Some(status) = procs::exited(n) {
                return Err(format!(
                    "{} exited during start-up ({status}); the end of its log {}:\n{}",
                    n.name,
                    n.log.display(),
                    log_tail(&n.log, 15)
                )
                .into());
            }
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "the network did not carry a stream within {} s; see the logs in {} \
                 (a larger network may need a longer --ready-timeout)",
                timeout.as_secs(),
                dir.display()
            )
            .into());
        }
        match probe(socks_addr, http_addr).await {
            Ok(()) => return Ok(()),
            Err(why) => {
                if last_report.elapsed() >= Duration::from_secs(1) {
                    eprintln!(
                        "allium testnet: {:>5.1} s of at most {}: waiting for the first stream ({why})",
                        started.elapsed().as_secs_f64(),
                        timeout.as_secs()
                    );
                    last_report = Instant::now();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

/// One GET of the test page through the proxy.
async fn probe(socks_addr: SocketAddr, http_addr: SocketAddr) -> Result<(), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = http_addr.ip().to_string();
    let mut s = socks::connect(
        socks_addr,
        &host,
        http_addr.port(),
        None,
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| match e {
        socks::SocksClientError::Io(_) => "proxy not listening yet".to_owned(),
        other => other.to_string(),
    })?;
    let fut = async {
        s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| "stream timed out".to_owned())?
        .map_err(|e| format!("stream failed: {e}"))?;
    if body.ends_with(httpd::HELLO.as_bytes()) {
        Ok(())
    } else {
        Err("unexpected answer through the proxy".to_owned())
    }
}

async fn wait_for_stop(nodes: &mut [Node]) {
    let mut reported = vec![false; nodes.len()];
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => break,
            _ = tick.tick() => {
                for (n, seen) in nodes.iter_mut().zip(reported.iter_mut()) {
                    if *seen {
                        continue;
                    }
                    if let Some(status) = procs::exited(n) {
                        *seen = true;
                        eprintln!("allium testnet: {} exited ({status}); see {}", n.name, n.log.display());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod start_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn readiness_limit_grows_with_the_network() {
        assert_eq!(default_ready_timeout(6), Duration::from_secs(90));
        assert_eq!(default_ready_timeout(20), Duration::from_secs(90));
        assert_eq!(default_ready_timeout(1000), Duration::from_secs(335));
    }

    #[test]
    fn a_lost_port_is_recognised_in_the_log() {
        let dir = std::env::temp_dir().join(format!("allium-testnet-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("relay0.log");
        std::fs::write(&log, "starting\nError: cannot listen on 127.0.0.1:12345: Address already in use (os error 98) (is another process using the port?)\n").unwrap();
        assert!(lost_a_port(&log));
        std::fs::write(&log, "starting\nError: bad configuration\n").unwrap();
        assert!(!lost_a_port(&log));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn free_ports_are_handed_out_once() {
        let ports: std::collections::BTreeSet<u16> = (0..1000)
            .map(|_| plan::free_port().unwrap().port())
            .collect();
        assert_eq!(ports.len(), 1000);
    }
}

#[cfg(test)]
mod bwscan_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bwscan_file_says_what_the_config_says() {
        let auths = vec![allium_client::AuthorityInfo {
            identity: allium_crypto::RelayId([7; 32]),
            dir_addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
        }];
        let mut c = allium_client::bwscan::BwScanConfig::new(
            auths,
            PathBuf::from("/tmp/x/bandwidth"),
            SocketAddr::from(([127, 0, 0, 1], 8080)),
        );
        c.object_size = BWSCAN_OBJECT_SIZE;
        c.samples = 1;
        c.test_network = true;
        c.outbound_bind_address = Some(std::net::IpAddr::V4(plan::BWSCAN_IP));
        let back =
            allium_client::bwscan::BwScanConfig::from_toml(&bwscan_toml(&c).unwrap()).unwrap();
        assert_eq!(back.output, c.output);
        assert_eq!(back.destination_port, 8080);
        assert_eq!(back.object_size, BWSCAN_OBJECT_SIZE);
        assert_eq!(back.samples, 1);
        assert!(back.test_network);
        assert_eq!(back.outbound_bind_address, c.outbound_bind_address);
        assert_eq!(back.authorities, c.authorities);
    }
}
