//! The `allium` binary as an operator runs it: `config check`, the data-directory lock, SIGHUP
//! reloads and the heartbeat, each against a real `allium relay` process on 127.0.0.1.
//!
//! (This file belongs to the `allium` package, whose integration tests live in `tests/*.rs`; the
//! whole-network tests of `allium-tests` are in `tests/tests/`.)

// Real processes in real time: every wait is a deadline on an expected log line, never a sleep.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_allium");
/// Longest wait for one expected log line.
const WAIT: Duration = Duration::from_secs(30);

/// A relay configuration on 127.0.0.1 with one (unreachable) authority.
fn relay_toml(data_dir: &Path, extra: &str) -> String {
    format!(
        "nickname = \"OpsTest\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         allow_root = true\n{extra}\n\
         [[authorities]]\nidentity = \"{}\"\ndir_addr = \"127.0.0.1:9\"\n",
        data_dir.display(),
        "11".repeat(32)
    )
}

/// A child process whose stderr lines arrive on a channel.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    fn relay(config: &Path) -> Self {
        let mut child = Command::new(BIN)
            .args(["relay", "--config"])
            .arg(config)
            .env_remove("ALLIUM_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn allium relay");
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Wait for a line containing every one of `parts`; panic with the log so far if none comes.
    fn expect(&mut self, parts: &[&str]) -> String {
        let end = Instant::now() + WAIT;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if parts.iter().all(|p| l.contains(p)) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "no line with {parts:?} within {WAIT:?}; log:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, sig).expect("kill");
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Stop with SIGTERM and check the exit is clean.
    fn stop(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.child.wait().expect("wait");
        assert!(
            status.success(),
            "exit status {status}; log:\n{}",
            self.seen.join("\n")
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn config_check_good_and_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("relay.toml");
    std::fs::write(&good, relay_toml(&dir.path().join("data"), "")).unwrap();
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("OK: relay configuration, 1 authority, nickname OpsTest"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        relay_toml(&dir.path().join("data"), "bandwith_rate = 5\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", "--role", "relay"])
        .arg(&bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stdout.contains("problem:") && stdout.contains("bandwith_rate"),
        "{stdout}"
    );
    assert!(
        stderr.contains("is not a valid relay configuration"),
        "{stderr}"
    );
}

#[test]
fn second_process_on_the_same_data_dir_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("relay.toml");
    std::fs::write(&cfg, relay_toml(&data, "")).unwrap();
    let mut first = Proc::relay(&cfg);
    first.expect(&["relay running"]);

    let out = Command::new(BIN)
        .args(["relay", "--config"])
        .arg(&cfg)
        .env_remove("ALLIUM_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second relay started: {stderr}");
    let want = format!(
        "data directory {} is in use by another allium process (pid {}); stop it or choose another data_dir",
        data.display(),
        first.child.id()
    );
    assert!(stderr.contains(&want), "{stderr}");
    assert!(first.alive());
    first.stop();
    // Once the first is gone, the directory is free again.
    let mut again = Proc::relay(&cfg);
    again.expect(&["relay running"]);
    again.stop();
}

#[test]
fn sighup_reloads_live_keys_refuses_others_and_survives_a_broken_file() {
    use nix::sys::signal::Signal::SIGHUP;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("relay.toml");
    std::fs::write(&cfg, relay_toml(&data, "heartbeat_period_secs = 1\n")).unwrap();
    let mut relay = Proc::relay(&cfg);
    relay.expect(&["relay running"]);
    // The heartbeat comes every second.
    let beat = relay.expect(&["heartbeat: relay up"]);
    assert!(
        beat.contains("circuits open") && beat.contains("read") && beat.contains("consensus"),
        "{beat}"
    );

    // Nothing changed: said so.
    relay.signal(SIGHUP);
    relay.expect(&["reload: configuration unchanged"]);

    // Live keys apply; a key that needs a restart is named and kept.
    std::fs::write(
        &cfg,
        relay_toml(&data, "heartbeat_period_secs = 0\nlog_level = \"debug\"\nbandwidth_rate = 2000000\n[exit_policy]\naccept = [\"443\"]\n")
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
    )
    .unwrap();
    relay.signal(SIGHUP);
    relay.expect(&[
        "key `listen` cannot change while the relay runs",
        "127.0.0.1:0",
        "restart",
    ]);
    relay.expect(&["reload: bandwidth_rate changed from 0 to 2000000"]);
    relay.expect(&["reload: exit_policy changed"]);
    relay.expect(&["reload: log_level changed from \"info\" to \"debug\""]);
    assert!(relay.alive());

    // A broken file changes nothing and says why.
    std::fs::write(&cfg, "nickname = \"OpsTest\"\nlisten = [\n").unwrap();
    relay.signal(SIGHUP);
    relay.expect(&[
        "reload failed, the running configuration is kept",
        "relay.toml",
    ]);
    assert!(relay.alive(), "a broken reload must not stop the relay");

    // Fixing the file: only the keys that differ from the running configuration are reported
    // (the debug level applied before is still in force, so this line shows).
    std::fs::write(
        &cfg,
        relay_toml(&data, "heartbeat_period_secs = 0\nlog_level = \"debug\"\nbandwidth_rate = 1000000\n[exit_policy]\naccept = [\"443\"]\n"),
    )
    .unwrap();
    relay.signal(SIGHUP);
    relay.expect(&["reload: bandwidth_rate changed from 2000000 to 1000000"]);
    relay.stop();
}

#[test]
fn root_without_user_or_allow_root_is_refused() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: not running as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        relay_toml(&dir.path().join("data"), "").replace("allow_root = true\n", ""),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["relay", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("refusing to run as root"), "{stderr}");
}

#[test]
fn root_with_user_binds_then_drops_privileges() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: not running as root");
        return;
    }
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        eprintln!("skipped: no `nobody` user");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The data directory's parent must be reachable by `nobody`.
    let mut perms = std::fs::metadata(dir.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(dir.path(), perms).unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        relay_toml(&data, "user = \"nobody\"\n").replace("allow_root = true\n", ""),
    )
    .unwrap();
    let mut relay = Proc::relay(&cfg);
    relay.expect(&["dropped root privileges", "nobody"]);
    relay.expect(&["relay running"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", relay.child.id())).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let want = nobody.uid.as_raw().to_string();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == want),
        "{uid_line}"
    );
    // The state written as root now belongs to the user.
    let meta = std::fs::metadata(data.join("lock")).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        nobody.uid.as_raw()
    );
    relay.stop();
}
