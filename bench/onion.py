#!/usr/bin/env python3
"""Onion service vs exit circuit on a release-build `allium testnet` (issue 13).

    python3 bench/onion.py [--bin target/release/allium] [--samples 5] [--bulk-mib 50]

Starts `allium testnet` (which runs one onion service in front of its test page and writes its
address as `onion_address` in testnet.json), then through the proxy's SOCKS port with curl:

  * time to first byte of `GET /` to the onion service with fresh SOCKS credentials each time (a
    new isolation group: a descriptor fetch, a rendezvous circuit, an introduction, the
    service's circuit to the rendezvous point, then the stream), beside the same GET to the test
    page through an exit, also with fresh credentials each time;
  * the same GET again with the same credentials (the kept rendezvous circuit / exit circuit);
  * bulk throughput: `GET /bytes/N` (N = --bulk-mib MiB) through the rendezvous circuit and
    through an exit circuit.

Prints one Markdown table and writes bench/results/onion-<UTC>.json. Every process is started
and stopped here by PID; every wait is bounded; loopback only. Standard library and curl only.
"""
import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CURL_FMT = "%{time_connect} %{time_starttransfer} %{time_total} %{size_download} %{http_code}"
MIB = 1048576.0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def curl(socks, url, user, timeout):
    """One GET through `socks` with SOCKS credentials `user`; (ttfb, total, bytes, code) or None."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", CURL_FMT, "--max-time", str(timeout),
            "--socks5-hostname", socks, "--proxy-user", "%s:x" % user, url]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 5)
    try:
        _, ttfb, total, size, code = r.stdout.split()
        return float(ttfb), float(total), int(float(size)), int(code)
    except ValueError:
        return None


def wait_json(path, proc, deadline):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("allium testnet exited early (status %s)" % proc.returncode)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            time.sleep(0.2)
    raise SystemExit("%s did not appear in time" % path)


def first_ok(socks, url, deadline, timeout):
    """Retry a GET (fresh credentials each time) until it answers 200; seconds taken."""
    t0 = time.monotonic()
    n = 0
    while time.monotonic() < deadline:
        n += 1
        r = curl(socks, url, "warmup%d" % n, timeout)
        if r and r[3] == 200:
            return time.monotonic() - t0
        time.sleep(0.5)
    raise SystemExit("no answer from %s in time" % url)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "allium"))
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--bulk-mib", type=int, default=50)
    ap.add_argument("--relays", type=int, default=6)
    ap.add_argument("--exits", type=int, default=2)
    ap.add_argument("--boot-timeout", type=float, default=120.0)
    a = ap.parse_args()
    if not shutil.which("curl"):
        raise SystemExit("curl is needed")
    if not os.access(a.bin, os.X_OK):
        raise SystemExit("no allium binary at %s (cargo build --release --bin allium)" % a.bin)
    work = tempfile.mkdtemp(prefix="allium-onion-bench.")
    data = os.path.join(work, "data")
    socks_port = free_port()
    socks = "127.0.0.1:%d" % socks_port
    argv = [a.bin, "testnet", "--relays", str(a.relays), "--exits", str(a.exits),
            "--socks-port", str(socks_port), "--data-dir", data]
    logf = open(os.path.join(work, "testnet.log"), "w")
    t_launch = time.monotonic()
    proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    res = {"argv": argv, "samples": a.samples, "bulk_mib": a.bulk_mib,
           "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        info = wait_json(os.path.join(data, "testnet.json"), proc, t_launch + a.boot_timeout)
        onion = info.get("onion_address")
        if not onion:
            raise SystemExit("testnet.json has no onion_address (this allium runs no onion service)")
        web = "http://%s" % info["http_target"]
        svc = "http://%s" % onion
        deadline = time.monotonic() + a.boot_timeout
        res["first_exit_s"] = first_ok(socks, web + "/", deadline, 60)
        # The service publishes after the network is up: the first answer says when.
        res["service_reachable_after_s"] = first_ok(socks, svc + "/", deadline, 60)
        tag = int(time.time())
        rows = {}
        for name, base in (("onion", svc), ("exit", web)):
            fresh, reused = [], []
            for i in range(a.samples):
                user = "%s-%d-%d" % (name, tag, i)
                r = curl(socks, base + "/", user, 90)
                if r and r[3] == 200:
                    fresh.append(r[0])
                r = curl(socks, base + "/", user, 90)
                if r and r[3] == 200:
                    reused.append(r[0])
            r = curl(socks, "%s/bytes/%d" % (base, a.bulk_mib * 1048576), "%s-bulk-%d" % (name, tag),
                     600)
            mibs = (r[2] / MIB) / max(r[1] - r[0], 1e-9) if r and r[3] == 200 else float("nan")
            rows[name] = {"ttfb_fresh": fresh, "ttfb_reused": reused, "bulk_mib_s": mibs,
                          "bulk_bytes": r[2] if r else 0}
        res["rows"] = rows
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        logf.close()
    o, e = res["rows"]["onion"], res["rows"]["exit"]
    print("| metric | onion service | exit circuit |")
    print("|---|---|---|")
    print("| TTFB, fresh isolation (median of %d), s | %.3f | %.3f |" % (
        a.samples, median(o["ttfb_fresh"]), median(e["ttfb_fresh"])))
    print("| TTFB, same isolation again (median), s | %.3f | %.3f |" % (
        median(o["ttfb_reused"]), median(e["ttfb_reused"])))
    print("| bulk %d MiB, MiB/s | %.1f | %.1f |" % (a.bulk_mib, o["bulk_mib_s"], e["bulk_mib_s"]))
    print("service reachable %.1f s after the first exit stream worked" % res["service_reachable_after_s"])
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    out = os.path.join(HERE, "results", "onion-%s.json" % res["utc"].replace(":", ""))
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print("details: %s" % out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
