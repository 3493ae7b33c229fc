//! Child processes of the test network: started from this same binary, stopped by PID.

// Process supervision waits on real processes in real time: a driver.
#![allow(clippy::disallowed_methods)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One running node of the test network.
#[derive(Debug)]
pub struct Node {
    /// Its role and index, e.g. `relay3`.
    pub name: String,
    /// The child process.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

/// Start `allium <args>` with its output in `log`.
pub fn spawn(name: &str, args: &[&str], log: &Path) -> std::io::Result<Node> {
    let exe = std::env::current_exe()?;
    let out = File::create(log)?;
    let err = out.try_clone()?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()?;
    Ok(Node {
        name: name.to_owned(),
        child,
        log: log.to_path_buf(),
    })
}

/// Whether a node has exited, with its status.
pub fn exited(node: &mut Node) -> Option<std::process::ExitStatus> {
    node.child.try_wait().ok().flatten()
}

/// Stop every node: SIGTERM, wait up to `grace`, then SIGKILL.
pub fn stop_all(nodes: &mut [Node], grace: Duration) {
    for n in nodes.iter() {
        if let Ok(pid) = i32::try_from(n.child.id()) {
            // SIGTERM via the `kill` command: std has no safe way to send a signal other than SIGKILL.
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
    }
    let deadline = Instant::now() + grace;
    for n in nodes.iter_mut() {
        loop {
            if n.child.try_wait().ok().flatten().is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = n.child.kill();
                let _ = n.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
