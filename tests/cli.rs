//! The `allium` binary as an operator runs it: output into a closed pipe, key tools, refusals.
//! Each test runs the built binary on files in a temporary directory; nothing listens.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use allium_crypto::IdentityKeypair;
use allium_directory::doc::consensus::{CONSENSUS_METHOD, CONSENSUS_VERSION};
use allium_directory::doc::{Consensus, Signed};

fn allium() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_allium"));
    c.env_remove("ALLIUM_LOG");
    c
}

fn run(args: &[&str]) -> Output {
    allium().args(args).output().expect("run allium")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("meta").permissions().mode() & 0o777
}

/// An authority-style `consensus` file (the bare signed envelope), expired long ago.
fn write_consensus(path: &Path) {
    let c = Consensus {
        version: CONSENSUS_VERSION,
        method: CONSENSUS_METHOD,
        valid_after: 1_000_000_000,
        fresh_until: 1_000_003_600,
        valid_until: 1_000_010_800,
        voters: vec![],
        params: BTreeMap::from([("circwindow".to_owned(), 1000)]),
        relays: vec![],
        shared_rand: None,
        bandwidth_weights: BTreeMap::new(),
    };
    let s = Signed::sign(&c, &IdentityKeypair::generate()).expect("sign");
    std::fs::write(path, s.to_bytes()).expect("write");
}

#[test]
fn consensus_show_into_a_closed_pipe_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("consensus");
    write_consensus(&file);
    let path = file.to_str().expect("utf-8");

    // Into an open pipe: the table, marked EXPIRED (too old) on its first line.
    let o = run(&["consensus", "show", "--cache", path]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let first = out.lines().next().expect("a line");
    assert!(first.contains("EXPIRED"), "{out}");
    assert!(out.contains("too old"), "{out}");

    // Into a pipe whose reader is already gone (`| head -1` after it exits): every write
    // fails with EPIPE; the process ends with success and says nothing.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let o = allium()
        .args(["consensus", "show", "--cache", path])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .expect("run allium");
    let (_, err) = text(&o);
    assert!(o.status.success(), "exit {:?}: {err}", o.status);
    assert!(!err.contains("panicked"), "{err}");

    // And through a real `head -1` (bash, for `pipefail`: the pipeline fails if allium does).
    if Path::new("/bin/bash").exists() {
        let o = Command::new("/bin/bash")
            .arg("-c")
            .arg(format!(
                "set -o pipefail; '{}' consensus show --cache '{path}' | head -1",
                env!("CARGO_BIN_EXE_allium")
            ))
            .output()
            .expect("sh");
        let (out, err) = text(&o);
        assert!(o.status.success(), "{err}");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn keygen_show_prints_identity_fingerprint_and_dates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = dir.path().join("relay-keys");
    let o = run(&["keygen", "relay", "--out", keys.to_str().expect("utf-8")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(mode(&keys), 0o700, "key directory");
    for f in ["identity.key", "link.key", "onion.key"] {
        assert_eq!(mode(&keys.join(f)), 0o600, "{f}");
    }
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("relay identity: "))
        .expect("identity printed")
        .to_owned();

    let o = run(&["keygen", "show", keys.to_str().expect("utf-8")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains(&format!("relay identity: {id}")), "{out}");
    assert!(
        out.contains(&format!("fingerprint:  {}", id.to_uppercase())),
        "{out}"
    );
    assert!(out.contains("onion key (created) 20"), "{out}");

    let o = run(&["keygen", "show", dir.path().to_str().expect("utf-8")]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("no identity.key"), "{err}");
}

#[test]
fn passphrase_protected_authority_key_right_and_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let offline = dir.path().join("offline");
    let good = dir.path().join("good.pass");
    let bad = dir.path().join("bad.pass");
    std::fs::write(&good, "correct horse battery staple\n").expect("write");
    std::fs::write(&bad, "incorrect horse\n").expect("write");
    let o = run(&[
        "keygen",
        "authority",
        "--out",
        offline.to_str().expect("utf-8"),
        "--passphrase-file",
        good.to_str().expect("utf-8"),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("passphrase-protected"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("authority identity: "))
        .expect("identity")
        .to_owned();
    let key = offline.join("authority_identity.key");
    assert_eq!(mode(&offline), 0o700);
    assert_eq!(mode(&key), 0o600);

    // `show` reads the public identity without the passphrase.
    let o = run(&["keygen", "show", offline.to_str().expect("utf-8")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains(&id) && out.contains("passphrase-protected"),
        "{out}"
    );

    let data = dir.path().join("data");
    let keys_out = data.join("keys");
    let certify = |pass: &Path| {
        run(&[
            "authority",
            "certify",
            "--identity",
            key.to_str().expect("utf-8"),
            "--out",
            keys_out.to_str().expect("utf-8"),
            "--passphrase-file",
            pass.to_str().expect("utf-8"),
        ])
    };
    let o = certify(&bad);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!keys_out.join("authority.cert").exists());

    let o = certify(&good);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains(&format!("authority identity: {id}")), "{out}");
    // Dates in RFC 3339 UTC, not Unix seconds.
    let line = out
        .lines()
        .find(|l| l.starts_with("certificate valid from "))
        .expect("dates");
    assert!(line.contains("T") && line.contains("Z until 20"), "{line}");
    assert_eq!(mode(&keys_out), 0o700);
    assert_eq!(mode(&keys_out.join("authority_signing.key")), 0o600);

    let o = run(&["keygen", "show", data.to_str().expect("utf-8")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("certificate    valid from 20"), "{out}");
}

#[test]
fn authority_takes_dash_c_and_relay_without_authorities_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let o = run(&["authority", "-c", missing.to_str().expect("utf-8")]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(!err.contains("unexpected argument"), "{err}");
    assert!(err.contains("missing.toml"), "{err}");

    let cfg = dir.path().join("relay.toml");
    std::fs::write(
        &cfg,
        format!(
            "nickname = \"NoAuth\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.path().join("relay-data").display()
        ),
    )
    .expect("write");
    let o = run(&["relay", "-c", cfg.to_str().expect("utf-8")]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("no authorities configured") && err.contains("[[authorities]]"),
        "{err}"
    );
}
