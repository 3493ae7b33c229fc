//! The systemd units in `contrib/systemd/`: `systemd-analyze verify` accepts each, and
//! `systemd-analyze security --offline=true` rates each below 2.0 ("OK"). Skipped, with a
//! message, where `systemd-analyze` is not installed.
//!
//! (An integration test of the `allium` package: `tests/*.rs`.)

use std::path::Path;
use std::process::Command;

const UNITS: [&str; 3] = [
    "allium-authority.service",
    "allium-relay.service",
    "allium-proxy.service",
];

fn have_systemd_analyze() -> bool {
    Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The unit text with the installed binary path replaced by the one just built, so that `verify`
/// also checks that the commands exist.
fn unit_for_test(name: &str, dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(name);
    let text = std::fs::read_to_string(&src).expect("unit file");
    let out = dir.join(name);
    std::fs::write(
        &out,
        text.replace("/usr/bin/allium", env!("CARGO_BIN_EXE_allium")),
    )
    .expect("write the unit");
    out
}

#[test]
fn units_have_the_hardening_the_guide_promises() {
    for name in UNITS {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("contrib/systemd")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        for line in [
            "DynamicUser=yes",
            "StateDirectory=",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "NoNewPrivileges=yes",
            "SystemCallFilter=@system-service",
            "RestrictAddressFamilies=",
            "MemoryDenyWriteExecute=yes",
            "LockPersonality=yes",
            "ExecReload=/bin/kill -HUP $MAINPID",
        ] {
            assert!(text.contains(line), "{name} lacks {line}");
        }
        let caps: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with("CapabilityBoundingSet=") || l.starts_with("AmbientCapabilities=")
            })
            .collect();
        assert_eq!(caps.len(), 2, "{name}");
        for l in caps {
            let v = l.split_once('=').map(|x| x.1).unwrap_or_default();
            assert!(
                v.is_empty() || v == "CAP_NET_BIND_SERVICE",
                "{name}: {l} (only binding low ports is allowed)"
            );
        }
    }
}

#[test]
fn systemd_analyze_verifies_each_unit_and_rates_it_below_2() {
    if !have_systemd_analyze() {
        eprintln!(
            "skipped: systemd-analyze is not installed (apt-get install systemd to run this test)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for name in UNITS {
        let unit = unit_for_test(name, dir.path());
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "systemd-analyze verify {name}: {stderr}"
        );
        assert!(
            !stderr.contains(name),
            "systemd-analyze verify {name}: {stderr}"
        );

        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&unit)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level for {name}: {stdout}"));
        let score: f64 = line
            .rsplit(':')
            .next()
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unreadable score: {line}"));
        eprintln!("{name}: exposure {score}");
        assert!(
            score < 2.0,
            "{name}: exposure {score} (want below 2.0): {stdout}"
        );
    }
}
