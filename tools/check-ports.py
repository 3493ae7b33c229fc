#!/usr/bin/env python3
"""Check the proxy's extra ports and every node's /metrics with real client libraries.

Starts `allium testnet` (the binary given by --allium, default target/debug/allium), reads
testnet.json, then:
  - parses every node's /metrics with Prometheus's own text parser (prometheus_client),
  - queries the DNS port with dnspython (A for localhost: an answer resolved at an exit;
    PTR: REFUSED; A again over TCP),
  - fetches the test page through the HTTP CONNECT port with curl.
A part whose library or tool is missing is skipped with a message (install them with
`pip install prometheus_client dnspython`). Exit status 0 when every part that ran passed.
Not part of `cargo test`: it needs the built binary and, for full coverage, PyPI packages.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

failures = []


def fail(msg):
    print(f"FAIL: {msg}")
    failures.append(msg)


def check_metrics(info):
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        print("SKIPPED metrics: prometheus_client is not installed")
        return
    for node in info["nodes"]:
        if node["role"] == "bwscan":
            continue  # the bandwidth scanner is a measuring tool with no metrics listener
        addr = node["addrs"].get("metrics")
        if not addr:
            fail(f"{node['name']}: no metrics address in testnet.json")
            continue
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=30) as r:
            ctype = r.headers.get("Content-Type", "")
            text = r.read().decode()
        if "version=0.0.4" not in ctype:
            fail(f"{node['name']}: content type {ctype!r}")
        try:
            fams = {f.name: f for f in text_string_to_metric_families(text)}
        except Exception as e:  # the parser's own error is the finding
            fail(f"{node['name']}: Prometheus's parser rejected the page: {e}")
            continue
        # prometheus_client drops the _total suffix from counter family names.
        want = {"allium_consensus_age_seconds", "allium_bootstrap_percent"}
        if node["role"] == "relay":
            want |= {"allium_relay_cells", "allium_relay_bytes", "allium_circuits_open",
                     "allium_dos_rejections", "allium_relay_flag"}
        if node["role"] == "client":
            want |= {"allium_circuit_build_seconds", "allium_socks_requests",
                     "allium_streams_open", "allium_circuits_created"}
        missing = want - fams.keys()
        if missing:
            fail(f"{node['name']}: missing families {sorted(missing)}")
        else:
            print(f"ok metrics {node['name']}: {len(fams)} families parsed")


def check_dns(info):
    try:
        import dns.message
        import dns.query
        import dns.rcode
        import dns.rdatatype
    except ImportError:
        print("SKIPPED dns: dnspython is not installed")
        return
    host, port = info["dns"].rsplit(":", 1)
    q = dns.message.make_query("localhost", "A")
    r = dns.query.udp(q, host, port=int(port), timeout=30)
    addrs = [rr.address for rrset in r.answer for rr in rrset]
    if r.rcode() != dns.rcode.NOERROR or "127.0.0.1" not in addrs:
        fail(f"dns A localhost: {dns.rcode.to_text(r.rcode())} {addrs}")
    else:
        print(f"ok dns A localhost -> {addrs}")
    q = dns.message.make_query("1.0.0.127.in-addr.arpa", "PTR")
    r = dns.query.udp(q, host, port=int(port), timeout=30)
    if r.rcode() != dns.rcode.REFUSED:
        fail(f"dns PTR: {dns.rcode.to_text(r.rcode())} (expected REFUSED)")
    else:
        print("ok dns PTR refused")
    q = dns.message.make_query("localhost", "A")
    r = dns.query.tcp(q, host, port=int(port), timeout=30)
    addrs = [a.to_text() for rr in r.answer for a in rr]
    if r.rcode() != dns.rcode.NOERROR or "127.0.0.1" not in addrs:
        fail(f"dns over TCP A localhost: {dns.rcode.to_text(r.rcode())} {addrs}")
    else:
        print(f"ok dns over TCP A localhost -> {addrs}")


def check_tunnel(info):
    target = info["http_target"]
    try:
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "60", "--proxytunnel", "--proxy",
             f"http://{info['http_tunnel']}", f"http://{target}/"],
            capture_output=True, text=True, timeout=90)
    except FileNotFoundError:
        print("SKIPPED tunnel: curl is not installed")
        return
    if out.returncode != 0 or not out.stdout:
        fail(f"curl through the tunnel: {out.returncode} {out.stderr.strip()}")
    else:
        print(f"ok curl through the HTTP CONNECT port: {len(out.stdout)} bytes")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--allium", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", "target"), "debug", "allium"))
    args = ap.parse_args()
    if not os.path.exists(args.allium):
        print(f"SKIPPED: {args.allium} not built (cargo build -p allium)")
        return 0
    data = tempfile.mkdtemp(prefix="allium-check-ports-")
    net = subprocess.Popen([args.allium, "testnet", "--socks-port", "0", "--data-dir", data],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    info_path = os.path.join(data, "testnet.json")
    try:
        deadline = time.time() + 180
        while not os.path.exists(info_path):
            if net.poll() is not None or time.time() > deadline:
                print(net.stdout.read() if net.stdout else "")
                fail("the test network did not start")
                return 1
            time.sleep(0.5)
        time.sleep(0.5)
        with open(info_path) as f:
            info = json.load(f)
        check_metrics(info)
        check_dns(info)
        check_tunnel(info)
    finally:
        net.send_signal(signal.SIGINT)
        try:
            net.wait(timeout=30)
        except subprocess.TimeoutExpired:
            net.kill()
    print("FAILED" if failures else "PASSED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
