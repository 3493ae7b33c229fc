//! The tokio shell around [`Session`]: listeners (loopback TCP, Unix socket), a bound on
//! connections, an idle timeout for unauthenticated controllers, a write timeout, and the
//! once-a-second tick that produces BW and change events.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::auth::AuthConfig;
use crate::backend::{ControlBackend, Now};
use crate::config::{ControlConfig, ControlError};
use crate::framer::Framer;
use crate::reply::{Code, single};
use crate::session::{Action, ServerInfo, Session, SetConf};

/// Most control connections at once (further ones get 451 and are closed).
pub const MAX_CONNECTIONS: usize = 16;
/// How long a controller may stay connected without authenticating.
pub const UNAUTH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one write to a controller may take before the connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval of the BW event and of the snapshot comparisons.
pub const TICK: Duration = Duration::from_secs(1);

/// Longest a controller waits for the process to apply a SETCONF.
pub const SETCONF_TIMEOUT: Duration = Duration::from_secs(10);

/// SETCONF changes the process is asked to apply live (through its reload path); the answer
/// goes back on `reply`: `Err(why)` becomes reply 553 with `why`.
#[derive(Debug)]
pub struct SetConfRequest {
    /// The options to change, with their new values.
    pub changes: Vec<SetConf>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<(), String>>,
}

/// What the process should do because of a controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// SIGNAL SHUTDOWN, or the owning controller went away: shut down cleanly.
    Shutdown,
    /// SIGNAL HALT: shut down now.
    Halt,
}

#[allow(clippy::disallowed_methods)] // Driver: where time enters the control port.
fn now() -> Now {
    Now {
        mono: Instant::now(),
        wall: SystemTime::now(),
    }
}

/// A running control port.
#[derive(Debug)]
pub struct ControlServer {
    tcp_addr: Option<SocketAddr>,
    socket: Option<PathBuf>,
    requests: watch::Receiver<Option<Request>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    setconf: std::sync::Mutex<Option<mpsc::Receiver<SetConfRequest>>>,
    setconf_taken: Arc<std::sync::atomic::AtomicBool>,
}

struct Shared {
    backend: Arc<dyn ControlBackend>,
    auth: Arc<AuthConfig>,
    info: Arc<ServerInfo>,
    slots: Arc<Semaphore>,
    requests: watch::Sender<Option<Request>>,
    stop: watch::Receiver<bool>,
    setconf: mpsc::Sender<SetConfRequest>,
    /// Whether the process takes SETCONF requests ([`ControlServer::take_setconf`]).
    setconf_taken: Arc<std::sync::atomic::AtomicBool>,
}

/// The user name of the process (from `/etc/passwd`; the numeric id if not found).
fn user_name() -> String {
    let uid = rustix::process::getuid().as_raw();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let _pw = f.next()?;
                (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| uid.to_string())
}

fn descriptor_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Make SIGHUP a signal the process handles (tokio's handler) instead of one that kills it, so
/// SIGNAL RELOAD never terminates the process; the reload itself is the binary's SIGHUP path.
fn hold_sighup(tasks: &mut JoinSet<()>) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(mut s) => {
            tasks.spawn(async move { while s.recv().await.is_some() {} });
        }
        Err(e) => tracing::warn!("control port: cannot install a SIGHUP handler: {e}"),
    }
}

/// Start the control port (if `cfg` has a listener): bind, write the cookie, serve.
/// `started` is when the process started (for `uptime`).
pub async fn start(
    cfg: &ControlConfig,
    data_dir: &Path,
    config_file: Option<PathBuf>,
    started: Instant,
    backend: Arc<dyn ControlBackend>,
) -> Result<Option<ControlServer>, ControlError> {
    cfg.validate()?;
    if !cfg.enabled() {
        return Ok(None);
    }
    let auth = Arc::new(cfg.auth(data_dir)?);
    if auth.is_open() {
        tracing::warn!(
            "the control port has no authentication: every local user can control this node; \
             set cookie_authentication = true or hashed_control_password"
        );
    }
    let mut listeners = Vec::new();
    let tcp = match cfg.control_port {
        Some(a) => {
            let l = TcpListener::bind(a)
                .await
                .map_err(|source| ControlError::Io {
                    what: "binding the control port",
                    path: a.to_string(),
                    source,
                })?;
            let bound = l.local_addr().map_err(|source| ControlError::Io {
                what: "reading the control port's address",
                path: a.to_string(),
                source,
            })?;
            listeners.push(bound.to_string());
            Some((l, bound))
        }
        None => None,
    };
    let unix = match &cfg.control_socket {
        Some(p) => {
            // A socket file left by an earlier run would make bind fail.
            if std::fs::symlink_metadata(p).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt as _;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(p);
            }
            let l = UnixListener::bind(p).map_err(|source| ControlError::Io {
                what: "binding the control socket",
                path: p.display().to_string(),
                source,
            })?;
            {
                use std::os::unix::fs::PermissionsExt as _;
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600));
            }
            listeners.push(format!("unix:{}", p.display()));
            Some(l)
        }
        None => None,
    };
    let info = Arc::new(ServerInfo {
        started,
        config_file,
        control_listeners: listeners,
        pid: std::process::id(),
        user: user_name(),
        descriptor_limit: descriptor_limit(),
        bw_history: Arc::default(),
    });
    let (req_tx, req_rx) = watch::channel(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (setconf_tx, setconf_rx) = mpsc::channel(MAX_CONNECTIONS);
    let setconf_taken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shared = Arc::new(Shared {
        backend,
        auth,
        info,
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        requests: req_tx,
        stop: stop_rx,
        setconf: setconf_tx,
        setconf_taken: Arc::clone(&setconf_taken),
    });
    let mut tasks = JoinSet::new();
    hold_sighup(&mut tasks);
    {
        // The per-second traffic history (bw-event-cache), kept whether or not anyone listens.
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut stop = shared.stop.clone();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let traffic = shared.backend.traffic();
                if let Ok(mut h) = shared.info.bw_history.lock() {
                    h.sample(traffic);
                }
            }
        });
    }
    let tcp_addr = tcp.as_ref().map(|(_, a)| *a);
    if let Some((l, bound)) = tcp {
        tracing::info!("control port listening on {bound}");
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            let mut stop = shared.stop.clone();
            loop {
                let accepted = tokio::select! {
                    r = l.accept() => r,
                    _ = stop.changed() => return,
                };
                match accepted {
                    Ok((s, _)) => {
                        let _ = s.set_nodelay(true);
                        spawn_conn(&shared, s);
                    }
                    Err(e) => {
                        tracing::debug!("control accept failed: {e}");
                        tokio::task::yield_now().await;
                    }
                }
            }
        });
    }
    if let Some(l) = unix {
        tracing::info!(
            "control socket listening at {}",
            cfg.control_socket
                .as_deref()
                .unwrap_or(Path::new(""))
                .display()
        );
        let shared = Arc::clone(&shared);
        tasks.spawn(async move {
            let mut stop = shared.stop.clone();
            loop {
                let accepted = tokio::select! {
                    r = l.accept() => r,
                    _ = stop.changed() => return,
                };
                match accepted {
                    Ok((s, _)) => spawn_conn(&shared, s),
                    Err(e) => {
                        tracing::debug!("control accept failed: {e}");
                        tokio::task::yield_now().await;
                    }
                }
            }
        });
    }
    Ok(Some(ControlServer {
        tcp_addr,
        socket: cfg.control_socket.clone(),
        requests: req_rx,
        stop: stop_tx,
        tasks,
        setconf: std::sync::Mutex::new(Some(setconf_rx)),
        setconf_taken,
    }))
}

impl ControlServer {
    /// The bound TCP address, if a TCP listener is configured.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// The SETCONF requests of every controller, for the process to apply live (once; `None`
    /// after the first call). Until it is taken, SETCONF changes nothing that runs and gets the
    /// backend's own answer (553 naming the key to edit).
    pub fn take_setconf(&self) -> Option<mpsc::Receiver<SetConfRequest>> {
        let rx = self.setconf.lock().ok()?.take()?;
        self.setconf_taken
            .store(true, std::sync::atomic::Ordering::Release);
        Some(rx)
    }

    /// Wait until a controller asks the process to stop (SIGNAL SHUTDOWN or HALT, or the
    /// owning controller closed its connection).
    pub async fn requested(&self) -> Request {
        let mut rx = self.requests.clone();
        loop {
            if let Some(r) = *rx.borrow_and_update() {
                return r;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Stop listening and close every control connection.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        self.tasks.shutdown().await;
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn spawn_conn<S>(shared: &Arc<Shared>, stream: S)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let permit = Arc::clone(&shared.slots).try_acquire_owned();
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut stream = stream;
        let Ok(_permit) = permit else {
            let msg = single(
                Code::EXHAUSTED,
                "Too many control connections; try again later",
            );
            let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(msg.as_bytes())).await;
            return;
        };
        let owner = serve_conn(&shared, stream).await;
        if owner {
            tracing::info!("the owning controller closed its connection; shutting down");
            let _ = shared.requests.send(Some(Request::Shutdown));
        }
    });
}

async fn write<S: AsyncWrite + Unpin>(s: &mut S, text: &str) -> bool {
    if text.is_empty() {
        return true;
    }
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, s.write_all(text.as_bytes())).await,
        Ok(Ok(()))
    )
}

/// Hand SETCONF changes to the process and turn its answer into the reply; `None` if the
/// process does not take SETCONF requests.
async fn setconf(shared: &Shared, changes: Vec<SetConf>) -> Option<String> {
    if !shared
        .setconf_taken
        .load(std::sync::atomic::Ordering::Acquire)
    {
        return None;
    }
    let (tx, rx) = oneshot::channel();
    let asked = async {
        shared
            .setconf
            .send(SetConfRequest { changes, reply: tx })
            .await
            .ok()?;
        rx.await.ok()
    };
    Some(match tokio::time::timeout(SETCONF_TIMEOUT, asked).await {
        Ok(Some(Ok(()))) => single(Code::OK, "OK"),
        Ok(Some(Err(why))) => single(
            Code::INVALID_CONFIG,
            &format!("Unable to set option: {why}"),
        ),
        _ => single(
            Code::INTERNAL,
            "The process did not answer in time; check the option with GETCONF",
        ),
    })
}

fn raise_sighup() {
    use rustix::process::{Signal, getpid, kill_process};
    if let Err(e) = kill_process(getpid(), Signal::HUP) {
        tracing::warn!("SIGNAL RELOAD: cannot raise SIGHUP: {e}");
    }
}

/// Serve one controller until it leaves; returns whether it had taken ownership.
#[allow(clippy::disallowed_methods)] // Driver: the unauthenticated-idle deadline.
async fn serve_conn<S>(shared: &Shared, mut stream: S) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session::new(
        Arc::clone(&shared.backend),
        Arc::clone(&shared.auth),
        Arc::clone(&shared.info),
    );
    let mut framer = Framer::new();
    let mut logs = crate::logfeed::subscribe();
    let mut pushed = shared
        .backend
        .events()
        .map(crate::events::EventBus::subscribe);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let unauth_deadline = tokio::time::sleep(UNAUTH_TIMEOUT);
    tokio::pin!(unauth_deadline);
    let mut stop = shared.stop.clone();
    let mut owner = false;
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            r = stream.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let data = buf.get(..n).unwrap_or(&[]);
                if let Err(e) = framer.push(data) {
                    let out = session.frame_error(e);
                    let _ = write(&mut stream, &out.reply).await;
                    break;
                }
                let mut close = false;
                loop {
                    let cmd = match framer.next_command() {
                        Ok(Some(c)) => c,
                        Ok(None) => break,
                        Err(e) => {
                            let out = session.frame_error(e);
                            let _ = write(&mut stream, &out.reply).await;
                            close = true;
                            break;
                        }
                    };
                    let mut out = session.handle(&cmd, &now());
                    if let Some(changes) = out.setconf.take()
                        && let Some(reply) = setconf(shared, changes).await
                    {
                        out.reply = reply;
                    }
                    if !write(&mut stream, &out.reply).await {
                        close = true;
                        break;
                    }
                    match out.action {
                        Some(Action::Reload) => raise_sighup(),
                        Some(Action::Shutdown) => {
                            let _ = shared.requests.send(Some(Request::Shutdown));
                        }
                        Some(Action::Halt) => {
                            let _ = shared.requests.send(Some(Request::Halt));
                        }
                        Some(Action::TakeOwnership) => owner = true,
                        None => {}
                    }
                    if out.close {
                        close = true;
                        break;
                    }
                }
                if close {
                    break;
                }
            }
            _ = tick.tick() => {
                let out = session.tick(&now());
                if !write(&mut stream, &out).await {
                    break;
                }
            }
            r = logs.recv() => match r {
                Ok(rec) => {
                    let out = session.log_event(&rec);
                    if !write(&mut stream, &out).await {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => logs = crate::logfeed::subscribe(),
            },
            r = async {
                match pushed.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => match r {
                Ok(ev) => {
                    let out = session.pushed_event(&ev);
                    if !write(&mut stream, &out).await {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!("a slow controller missed {n} events");
                }
                Err(broadcast::error::RecvError::Closed) => pushed = None,
            },
            () = &mut unauth_deadline, if !session.is_authenticated() => {
                let _ = write(
                    &mut stream,
                    &single(Code::AUTH_REQUIRED, "Authentication timed out; closing connection"),
                ).await;
                break;
            }
            _ = stop.changed() => break,
        }
    }
    let _ = stream.shutdown().await;
    owner
}
