#!/usr/bin/env python3
"""Check a running `allium testnet` with the tools people already use (issue 14's "Must show").

Usage: tools.py TESTNET_JSON --testnet-out FILE --root REPO [--skip-nyx]

  - testnet.json: every relay and the proxy list a loopback control port and an existing
    32-byte cookie file; every authority, relay and the proxy a metrics address; the proxy its
    SOCKS, HTTP CONNECT and DNS ports;
  - Prometheus: every node's /metrics parsed by prometheus_client's own text parser; every
    family the issue names present with samples (and their labels); every metric name the Grafana
    dashboard in contrib/ queries exists on some node;
  - HTTP CONNECT with curl (`curl -p -x http://...`), a plain GET to the tunnel port (405 page),
    a plain HTTP request to the SOCKS port ("not an HTTP proxy" page);
  - the DNS port with dnspython over UDP and TCP: A and AAAA answered through exits, PTR refused,
    other types NOTIMP;
  - Nyx (Debian's) in tmux against a relay's and the proxy's control ports: the bandwidth panel
    (title, Download/Upload graph labels) renders, the other pages open, no traceback;
  - the README's commands as written (the testnet banner's lines, its curl line, the HTTP CONNECT
    line, `nyx -i PORT`) and its sections for each port and tool.

Prints `ok ...` per passed check, `FAIL: ...` per failed one, and a summary; exit status 0 when
every check passed. Not part of `cargo test`: it needs PyPI and Debian packages (tests/stem/run.sh
installs them).
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

# Bytes of one cell (allium_proto::cell::CELL_LEN).
CELL_LEN = 1024

PASSED = []
FAILED = []


def ok(msg):
    PASSED.append(msg)
    print(f"ok {msg}")


def fail(msg):
    FAILED.append(msg)
    print(f"FAIL: {msg}")


def host_port(addr):
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port)


def is_loopback(addr):
    host, _ = host_port(addr)
    return host.startswith("127.") or host == "::1"


# ---------------------------------------------------------------------------------------------
# testnet.json


def check_testnet_json(info):
    for key in ("socks", "http_tunnel", "dns", "http_target"):
        if not info.get(key):
            fail(f"testnet.json: no {key}")
        else:
            ok(f"testnet.json: {key} = {info[key]}")
    roles = {}
    for n in info["nodes"]:
        roles.setdefault(n["role"], []).append(n)
    for role in ("authority", "relay", "client"):
        if not roles.get(role):
            fail(f"testnet.json: no {role} node")
    for n in info["nodes"]:
        if n["role"] not in ("authority", "relay", "client"):
            continue  # the bandwidth scanner is a measuring tool, not a node of the network
        m = n["addrs"].get("metrics")
        if not m or not is_loopback(m):
            fail(f"testnet.json: {n['name']} has no loopback metrics address ({m})")
            continue
        if n["role"] in ("relay", "client"):
            cp, cookie = n.get("control_port"), n.get("control_cookie")
            if not cp or not is_loopback(cp):
                fail(f"testnet.json: {n['name']} has no loopback control port ({cp})")
                continue
            if not cookie or not os.path.isfile(cookie) or os.path.getsize(cookie) != 32:
                fail(f"testnet.json: {n['name']}'s cookie {cookie} is not a 32-byte file")
                continue
            if os.stat(cookie).st_mode & 0o077:
                fail(f"testnet.json: {n['name']}'s cookie {cookie} is readable by others")
                continue
    if not any(f.startswith("testnet.json: ") and "node" in f for f in FAILED):
        counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(roles.items()))
        ok(f"testnet.json: every node ({counts}) lists its metrics address; every relay and the "
           "proxy a control port and its 0600 32-byte cookie")


# ---------------------------------------------------------------------------------------------
# Prometheus


# Family names as prometheus_client reports them (a counter's `_total` is dropped), and the
# label each must carry, per role. The list: bytes and cells by direction, circuits and
# streams open and created, build-time histogram, SOCKS outcomes, DoS rejections by reason, queue
# bytes, consensus age, bootstrap state, relay flags.
WANT = {
    "relay": {
        "allium_relay_bytes": ("counter", "direction"),
        "allium_relay_cells": ("counter", "direction"),
        "allium_circuits_open": ("gauge", None),
        "allium_circuits_created": ("counter", None),
        "allium_streams_open": ("gauge", None),
        "allium_dos_rejections": ("counter", "reason"),
        "allium_link_queued_bytes": ("gauge", None),
        "allium_consensus_age_seconds": ("gauge", None),
        "allium_bootstrap_percent": ("gauge", None),
        "allium_relay_flag": ("gauge", "flag"),
    },
    "client": {
        "allium_proxy_bytes": ("counter", "direction"),
        "allium_proxy_cells": ("counter", "direction"),
        "allium_circuits_open": ("gauge", None),
        "allium_circuits_created": ("counter", None),
        "allium_circuit_build_seconds": ("histogram", None),
        "allium_streams_open": ("gauge", None),
        "allium_socks_requests": ("counter", "outcome"),
        "allium_http_tunnel_requests": ("counter", "outcome"),
        "allium_dns_queries": ("counter", "rcode"),
        "allium_link_queued_bytes": ("gauge", None),
        "allium_consensus_age_seconds": ("gauge", None),
        "allium_bootstrap_percent": ("gauge", None),
    },
    "authority": {
        "allium_authority_descriptors": ("gauge", None),
    },
}


def scrape(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=30) as r:
        return r.headers.get("Content-Type", ""), r.read().decode()


def check_metrics(info):
    """Returns every sample name seen on any node."""
    names = set()
    for n in info["nodes"]:
        addr = n["addrs"].get("metrics")
        if n["role"] not in WANT or not addr:
            continue
        try:
            ctype, text = scrape(addr)
        except OSError as e:
            fail(f"metrics {n['name']}: {e}")
            continue
        if "text/plain" not in ctype or "version=0.0.4" not in ctype:
            fail(f"metrics {n['name']}: content type {ctype!r}")
        try:
            fams = {f.name: f for f in text_string_to_metric_families(text)}
        except Exception as e:  # the parser's own complaint is the finding
            fail(f"metrics {n['name']}: Prometheus's parser rejected the page: {e}")
            continue
        for f in fams.values():
            for s in f.samples:
                names.add(s.name)
        bad = []
        for fam, (typ, label) in WANT[n["role"]].items():
            f = fams.get(fam)
            if f is None:
                bad.append(f"{fam} missing")
            elif f.type != typ:
                bad.append(f"{fam} is a {f.type}, not a {typ}")
            elif not f.samples:
                bad.append(f"{fam} has no samples")
            elif label and not all(label in s.labels for s in f.samples):
                bad.append(f"{fam} lacks label {label}")
            elif typ == "histogram" and not any(s.name.endswith("_bucket") and
                                                s.labels.get("le") == "+Inf" for s in f.samples):
                bad.append(f"{fam} has no +Inf bucket")
        # Both directions where a direction is named.
        for fam, (typ, label) in WANT[n["role"]].items():
            if label == "direction" and fam in fams:
                dirs = {s.labels.get("direction") for s in fams[fam].samples}
                if not {"read", "written"} <= dirs:
                    bad.append(f"{fam} directions {sorted(d for d in dirs if d)}")
        # Cells and bytes count the same link frames: the cells' bytes are the frames' bytes
        # less a small per-frame overhead (length prefix and tag).
        kind = {"relay": "relay", "client": "proxy"}.get(n["role"])
        if kind and f"allium_{kind}_cells" in fams and f"allium_{kind}_bytes" in fams:
            cells = {s.labels["direction"]: s.value for s in fams[f"allium_{kind}_cells"].samples}
            nbytes = {s.labels["direction"]: s.value
                      for s in fams[f"allium_{kind}_bytes"].samples}
            for d in ("read", "written"):
                c, b = cells.get(d, 0), nbytes.get(d, 0)
                if b > 0 and not 0.8 * b <= c * CELL_LEN <= b:
                    bad.append(f"{kind} {d}: {c:.0f} cells of {CELL_LEN} bytes in {b:.0f} "
                               "bytes of frames")
                if b == 0 and n["role"] == "client":
                    bad.append(f"proxy: no bytes {d} on guard links")
        if n["role"] in ("relay", "client"):
            boot = fams.get("allium_bootstrap_percent")
            if boot and boot.samples[0].value != 100:
                bad.append(f"bootstrap_percent {boot.samples[0].value}")
        if bad:
            fail(f"metrics {n['name']}: {'; '.join(bad)}")
        else:
            ok(f"metrics {n['name']} ({n['role']}): {len(fams)} families parsed, the "
               f"{len(WANT[n['role']])} required present with samples")
    return names


def check_grafana(root, names):
    path = os.path.join(root, "contrib", "grafana", "allium.json")
    try:
        with open(path) as f:
            dash = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"grafana: {path}: {e}")
        return
    exprs = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("expr", "query", "definition") and isinstance(v, str):
                    exprs.append(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(dash)
    used = set()
    for e in exprs:
        used |= set(re.findall(r"\ballium_[a-z0-9_]+", e))
    missing = sorted(u for u in used if u not in names)
    if not exprs or not used:
        fail("grafana: the dashboard queries no allium_ metric")
    elif missing:
        fail(f"grafana: the dashboard queries metrics no node exposes: {missing}")
    else:
        ok(f"grafana: {len(exprs)} queries use {len(used)} metric names, all exposed")


# ---------------------------------------------------------------------------------------------
# Client ports


def http_raw(addr, request, timeout=30):
    host, port = host_port(addr)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(request)
        got = b""
        while True:
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                return got.decode(errors="replace") + "<reset>"
            if not chunk:
                break
            got += chunk
        return got.decode(errors="replace")


def check_http_ports(info):
    target = info["http_target"]
    page = urllib.request.urlopen(f"http://{target}/", timeout=10).read()
    out = subprocess.run(["curl", "-sS", "--max-time", "60", "-p", "-x",
                          f"http://{info['http_tunnel']}", f"http://{target}/"],
                         capture_output=True, timeout=90)
    if out.returncode != 0 or out.stdout != page:
        fail(f"curl -p -x through the HTTP CONNECT port: exit {out.returncode} "
             f"{out.stderr.decode().strip()} ({len(out.stdout)} bytes, page {len(page)})")
    else:
        ok(f"curl -p -x http://{info['http_tunnel']}: the test page ({len(page)} bytes) through "
           "the tunnel")
    # A plain GET to the tunnel port: a 405 page saying how to configure the client.
    try:
        urllib.request.urlopen(f"http://{info['http_tunnel']}/", timeout=30)
        fail("a plain GET to the HTTP CONNECT port succeeded")
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        if e.code != 405 or "CONNECT" not in body or "proxy" not in body.lower():
            fail(f"plain GET to the tunnel port: {e.code} {body[:200]!r}")
        else:
            ok(f"plain GET to the HTTP CONNECT port: 405 page ({len(body)} bytes) naming CONNECT")
    # curl without -p sends an absolute-URI GET to the tunnel port: the same 405.
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                          "30", "-x", f"http://{info['http_tunnel']}", f"http://{target}/"],
                         capture_output=True, text=True, timeout=60)
    if out.stdout != "405":
        fail(f"curl -x (no -p) to the tunnel port: status {out.stdout!r}")
    else:
        ok("curl -x without -p (a proxied GET) to the tunnel port: 405")
    # A plain HTTP request to the SOCKS port: Tor's "not an HTTP proxy" page.
    got = http_raw(info["socks"], f"GET / HTTP/1.1\r\nHost: {info['socks']}\r\n\r\n".encode())
    status = got.split("\r\n", 1)[0]
    if not status.startswith("HTTP/1.") or "501" not in status or \
            "not an http proxy" not in got.lower() or "<reset>" in got:
        fail(f"plain HTTP to the SOCKS port: {got[:300]!r}")
    else:
        ok(f"plain HTTP to the SOCKS port: {status!r} with the 'not an HTTP proxy' page")
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", "--max-time", "30",
                          f"http://{info['socks']}/"], capture_output=True, text=True, timeout=60)
    if not out.stdout.endswith("501") or "not an HTTP proxy" not in out.stdout:
        fail(f"curl http://SOCKS-PORT/: {out.stdout[-300:]!r}")
    else:
        ok("curl pointed at the SOCKS port as a web server: 501 page")


def check_dns(info):
    host, port = host_port(info["dns"])
    for proto, send in (("UDP", dns.query.udp), ("TCP", dns.query.tcp)):
        r = send(dns.message.make_query("localhost", "A"), host, port=port, timeout=30)
        addrs = [rr.address for rrset in r.answer for rr in rrset]
        if r.rcode() != dns.rcode.NOERROR or "127.0.0.1" not in addrs:
            fail(f"dns {proto} A localhost: {dns.rcode.to_text(r.rcode())} {addrs}")
        else:
            ok(f"dns {proto} A localhost -> {addrs} (resolved at an exit)")
        r = send(dns.message.make_query("localhost", "AAAA"), host, port=port, timeout=30)
        addrs = [rr.address for rrset in r.answer for rr in rrset]
        types = {rrset.rdtype for rrset in r.answer}
        if r.rcode() != dns.rcode.NOERROR or types - {dns.rdatatype.AAAA} or \
                any(":" not in a for a in addrs):
            fail(f"dns {proto} AAAA localhost: {dns.rcode.to_text(r.rcode())} {addrs}")
        else:
            # Without an IPv6 localhost in the exit's /etc/hosts the answer is empty: NOERROR,
            # no records (the unit tests cover an IPv6 answer).
            ok(f"dns {proto} AAAA localhost -> NOERROR {addrs or 'no records'}")
        r = send(dns.message.make_query("1.0.0.127.in-addr.arpa", "PTR"), host, port=port,
                 timeout=30)
        if r.rcode() != dns.rcode.REFUSED:
            fail(f"dns {proto} PTR: {dns.rcode.to_text(r.rcode())} (expected REFUSED)")
        else:
            ok(f"dns {proto} PTR refused (REFUSED)")
        r = send(dns.message.make_query("localhost", "MX"), host, port=port, timeout=30)
        if r.rcode() != dns.rcode.NOTIMP:
            fail(f"dns {proto} MX: {dns.rcode.to_text(r.rcode())} (expected NOTIMP)")
        else:
            ok(f"dns {proto} MX: NOTIMP")
        r = send(dns.message.make_query("no-such-name.invalid", "A"), host, port=port,
                 timeout=30)
        if r.rcode() != dns.rcode.NXDOMAIN:
            fail(f"dns {proto} A no-such-name.invalid: {dns.rcode.to_text(r.rcode())}")
        else:
            ok(f"dns {proto} A no-such-name.invalid: NXDOMAIN")


# ---------------------------------------------------------------------------------------------
# Nyx


def tmux(*args, check=False):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=check,
                          timeout=30)


def pane(session):
    return tmux("capture-pane", "-p", "-t", session).stdout


def wait_pane(session, pred, secs):
    deadline = time.time() + secs
    text = ""
    while time.time() < deadline:
        text = pane(session)
        if pred(text):
            return text, True
        time.sleep(0.5)
    return text, False


def show(text, n=30):
    for line in [l.rstrip() for l in text.splitlines() if l.strip()][:n]:
        print(f"    | {line}")


def check_nyx(n, who, home):
    """Nyx in tmux against node n's control port: bandwidth panel, then its other pages."""
    if not shutil.which("nyx") or not shutil.which("tmux"):
        fail("nyx or tmux is not installed (sudo apt-get install -y nyx tmux)")
        return
    port = host_port(n["control_port"])[1]
    session = f"allium-nyx-{who}-{os.getpid()}"
    err = os.path.join(home, f"nyx-{who}.stderr")
    env = dict(os.environ, HOME=home, TERM="xterm-256color")
    # Nyx reads the cookie path from PROTOCOLINFO and authenticates with it, as with Tor.
    cmd = f"nyx -i 127.0.0.1:{port} 2>'{err}'; echo NYX-EXITED $?; sleep 60"
    r = subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd],
                       env=env, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        fail(f"nyx {who}: tmux did not start: {r.stderr}")
        return
    try:
        def rendered(t):
            return ("Bandwidth" in t and "Download" in t and "Upload" in t and
                    "avg:" in t and "total:" in t) or "NYX-EXITED" in t or "Traceback" in t
        text, done = wait_pane(session, rendered, 40)
        problems = []
        if "Traceback" in text:
            problems.append("a traceback on the screen")
        if "NYX-EXITED" in text:
            problems.append("nyx exited")
        if not done:
            problems.append("no bandwidth panel (Bandwidth title, Download/Upload graphs) in 40 s")
        if not re.search(r"Tor 0\.4\.8\.0-allium", text):
            problems.append("the header does not show the version")
        if problems:
            show(text, 50)
            fail(f"nyx {who}: {', '.join(problems)}")
            return
        title = next((l.strip() for l in text.splitlines() if "Bandwidth" in l), "")
        ok(f"nyx {who}: bandwidth panel rendered ({title[:70]!r}, Download/Upload graphs)")
        # Let nyx redraw a few times with the live BW events (it polls GETINFO keys each time).
        time.sleep(3)
        # The other pages: connections (2), configuration (3), torrc (4), interpreter (5), then
        # back to the first (graph and log).
        pages = []
        for page_no, want in ((2, r"Connections"), (3, r"Tor Configuration \("),
                              (4, r"Tor Configuration File"), (5, r"Control Interpreter"),
                              (1, r"Download")):
            tmux("send-keys", "-t", session, "Right")
            text, done = wait_pane(
                session, lambda t: (re.search(rf"page {page_no} / \d", t) and re.search(want, t))
                or "Traceback" in t or "NYX-EXITED" in t, 15)
            if not done or "Traceback" in text or "NYX-EXITED" in text:
                show(text, 50)
                fail(f"nyx {who}: page {page_no} did not render ({want})")
                return
            pages.append(page_no)
            if page_no == 3:
                # The configuration page lists options through GETCONF (config/names).
                rows = [l for l in text.splitlines() if re.match(r"\s*[A-Z][A-Za-z]+\s+\S", l)]
                if len(rows) < 5:
                    show(text, 50)
                    fail(f"nyx {who}: the configuration page lists {len(rows)} options")
                    return
        stderr = open(err).read() if os.path.exists(err) else ""
        if "Traceback" in stderr:
            print(stderr[-3000:])
            fail(f"nyx {who}: a traceback on stderr")
            return
        ok(f"nyx {who}: pages 2-5 (connections, configuration, torrc, interpreter) rendered, "
           "back on the graph page, no traceback")
        tmux("send-keys", "-t", session, "q")
        text, _ = wait_pane(session, lambda t: "NYX-EXITED" in t or "Are you sure" in t, 10)
        if "Are you sure" in text:
            tmux("send-keys", "-t", session, "q")
        # Nyx stops its resolver threads before it exits: allow for a loaded machine.
        text, done = wait_pane(session, lambda t: "NYX-EXITED" in t, 45)
        stderr = open(err).read() if os.path.exists(err) else ""
        if not done or "NYX-EXITED 0" not in text or "Traceback" in stderr:
            show(text, 50)
            print(stderr[-3000:])
            fail(f"nyx {who}: did not quit cleanly")
        else:
            ok(f"nyx {who}: quit with status 0, nothing on stderr")
    finally:
        tmux("kill-session", "-t", session)


# ---------------------------------------------------------------------------------------------
# README


def check_readme(root, info, testnet_out):
    readme = open(os.path.join(root, "README.md")).read()
    for section in ("### Client: the SOCKS5 proxy", "### Client: the HTTP CONNECT port",
                    "### Client: the DNS port", "### Metrics (Prometheus)",
                    "### Embedding the client in an application", "### Control port (stem, Nyx)"):
        if section not in readme:
            fail(f"README: no section {section!r}")
    if not any(f.startswith("README: no section") for f in FAILED):
        ok("README: sections for the SOCKS, HTTP CONNECT and DNS ports, metrics, embedding, "
           "control port")
    banner = open(testnet_out).read()
    # The banner's lines as the README shows them.
    for label in ("SOCKS5 proxy:", "HTTP CONNECT:", "DNS (UDP):", "metrics:", "test page:",
                  "details:", "Try it:"):
        if label not in readme or label not in banner:
            fail(f"README/testnet banner: {label!r} in README {label in readme}, "
                 f"in the banner {label in banner}")
    tunnel_line = re.search(r"HTTP CONNECT:\s+(\S+)\s+\((curl [^)]*?) \.\.\.\)", banner)
    try_line = re.search(r"Try it:\s*\n\s*(curl [^\n]+)", banner)
    if not tunnel_line or not try_line:
        fail(f"testnet banner: no tunnel or 'Try it' command in {banner!r}")
        return
    ok("README: the testnet banner's lines are those the README shows")
    target = f"http://{info['http_target']}/"
    page = urllib.request.urlopen(target, timeout=10).read()
    for name, cmd in (("Try it", try_line.group(1).split()),
                      ("HTTP CONNECT", tunnel_line.group(2).split() + [target])):
        out = subprocess.run(cmd + ["-sS", "--max-time", "60"], capture_output=True, timeout=90)
        if out.returncode != 0 or out.stdout != page:
            fail(f"README command {' '.join(cmd)}: exit {out.returncode} {out.stderr!r}")
        else:
            ok(f"README command as printed: {' '.join(cmd)} -> the test page")
    # The README's own example lines, with its example ports replaced by the testnet's.
    m = re.search(r"^curl --proxytunnel --proxy http://127\.0\.0\.1:(\d+) (\S+)$", readme, re.M)
    if not m:
        fail("README: no `curl --proxytunnel --proxy http://127.0.0.1:PORT URL` line")
    else:
        cmd = ["curl", "--proxytunnel", "--proxy", f"http://{info['http_tunnel']}", target]
        out = subprocess.run(cmd + ["-sS", "--max-time", "60"], capture_output=True, timeout=90)
        if out.returncode != 0 or out.stdout != page:
            fail(f"README tunnel example: exit {out.returncode} {out.stderr!r}")
        else:
            ok("README tunnel example (curl --proxytunnel --proxy http://HOST:PORT URL) works")
    if not re.search(r"^nyx -i \d+", readme, re.M):
        fail("README: no `nyx -i PORT` line")
    else:
        ok("README: `nyx -i PORT` is the command the nyx checks run (with the node's port)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("testnet_json")
    ap.add_argument("--testnet-out", required=True, help="what `allium testnet` printed")
    ap.add_argument("--root", required=True, help="the repository")
    ap.add_argument("--skip-nyx", action="store_true")
    args = ap.parse_args()
    with open(args.testnet_json) as f:
        info = json.load(f)
    check_testnet_json(info)
    names = check_metrics(info)
    check_grafana(args.root, names)
    check_http_ports(info)
    check_dns(info)
    if not args.skip_nyx:
        home = tempfile.mkdtemp(prefix="allium-nyx-home-")
        relay = next(n for n in info["nodes"] if n["role"] == "relay" and n.get("control_port"))
        proxy = next(n for n in info["nodes"] if n["role"] == "client" and n.get("control_port"))
        check_nyx(relay, "relay", home)
        check_nyx(proxy, "proxy", home)
    # Metrics again after the traffic above: the counters moved.
    check_readme(args.root, info, args.testnet_out)
    print(f"tools: {len(PASSED)} checks passed, {len(FAILED)} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    raise SystemExit(main())
