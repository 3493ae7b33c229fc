#!/usr/bin/env python3
"""Start-up health of `allium testnet`: run one network for a fixed time and count, from the
nodes' logs and metrics pages, what went wrong while it came up. Run by hand.

usage: python3 bench/testnet_startup.py [--allium PATH] [--secs 120] [--relays 6] [--exits 2]
                                        [--label TEXT] [--out FILE] [-- EXTRA TESTNET ARGS]

It starts `allium testnet --socks-port 0` in a fresh data directory, waits for testnet.json,
fetches the test page once through the SOCKS port (socks5h, as `curl --socks5-hostname`), keeps
the network up until --secs after launch, reads every relay's `allium_dos_rejections_total`
before stopping it (Ctrl-C, as a user would), and reports:
  - guards dropped by path bias (proxy.log: "built only N of M circuits ... dropping it");
  - circuits refused with RESOURCELIMIT (proxy.log lines naming it) and the relays' DoS
    refusals (their log lines and the summed counter, by reason);
  - EXTENDs that failed at a relay (proxy.log: CONNECTFAILED);
  - when each relay first found itself in a consensus, seconds after launch;
  - the address layout (testnet.json `address_layout`; absent for binaries before it) and the
    readiness time the testnet reported.
The JSON goes to bench/results/testnet-startup-<UTC time>.json (or --out) and to stdout. The
machine's load average is recorded at start and end (other agents share it).
"""
import argparse
import datetime
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


def socks_get(proxy, host, port, timeout=30):
    """One HTTP GET of / through a SOCKS5 proxy (host name resolved by the proxy)."""
    s = socket.create_connection(proxy, timeout=timeout)
    try:
        s.sendall(b"\x05\x01\x00")
        if s.recv(2) != b"\x05\x00":
            raise OSError("SOCKS greeting refused")
        h = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(h)]) + h + port.to_bytes(2, "big"))
        rep = s.recv(10)
        if len(rep) < 2 or rep[1] != 0:
            raise OSError(f"SOCKS reply {rep[1] if len(rep) > 1 else None}")
        s.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        body = b""
        while True:
            b = s.recv(65536)
            if not b:
                break
            body += b
        return body
    finally:
        s.close()


def dos_rejections(addr):
    """The summed `allium_dos_rejections_total` of one relay, by reason."""
    out = {}
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        m = re.match(r'allium_dos_rejections_total\{reason="([^"]+)"\}\s+(\d+)', line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + int(m.group(2))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--allium", default=None, help="the allium binary (default: target dir)")
    ap.add_argument("--secs", type=float, default=120.0, help="run this long after launch")
    ap.add_argument("--relays", type=int, default=6)
    ap.add_argument("--exits", type=int, default=2)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", default=None)
    ap.add_argument("extra", nargs="*", help="more `allium testnet` arguments (after --)")
    a = ap.parse_args()
    tdir = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    allium = a.allium or str(tdir / "release" / "allium")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    out = pathlib.Path(a.out) if a.out else HERE / "results" / f"testnet-startup-{stamp}.json"
    load_start = os.getloadavg()
    work = pathlib.Path(tempfile.mkdtemp(prefix="allium-startup-"))
    data = work / "net"
    argv = [allium, "testnet", "--socks-port", "0", "--relays", str(a.relays), "--exits",
            str(a.exits), "--data-dir", str(data)] + a.extra
    result = {"label": a.label, "argv": argv, "started_utc": stamp, "secs": a.secs,
              "loadavg_start": load_start}
    t0 = time.monotonic()
    launched = time.time()
    with open(work / "testnet.out", "w") as log:
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        info = None
        while time.monotonic() - t0 < a.secs and info is None:
            if p.poll() is not None:
                raise SystemExit(f"allium testnet exited ({p.returncode}); see {work}/testnet.out")
            try:
                info = json.loads((data / "testnet.json").read_text())
            except (OSError, ValueError):
                time.sleep(0.5)
        if info is None:
            raise SystemExit(f"not ready within {a.secs} s; see {work}/testnet.out")
        result["address_layout"] = info.get("address_layout", "single (before the field)")
        result["ready_secs"] = info.get("ready_secs")
        host, port = info["socks"].rsplit(":", 1)
        thost, tport = info["http_target"].rsplit(":", 1)
        try:
            body = socks_get((host, int(port)), thost, int(tport))
            result["socks_get_ok"] = b"Hello from the Allium test network" in body
        except OSError as e:
            result["socks_get_ok"] = False
            result["socks_get_error"] = str(e)
        relays = [n for n in info["nodes"] if n["role"] == "relay"]
        result["relay_or_addrs"] = [n["addrs"].get("or") for n in relays]
        while time.monotonic() - t0 < a.secs:
            time.sleep(1)
        totals = {}
        for n in relays:
            r = dos_rejections(n["addrs"].get("metrics", ""))
            for k, v in (r or {}).items():
                totals[k] = totals.get(k, 0) + v
        result["relay_dos_rejections_total"] = totals
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    proxy = (data / "proxy.log").read_text(errors="replace")
    relay_logs = {f.stem: f.read_text(errors="replace") for f in sorted(data.glob("relay*.log"))}
    result["guards_dropped_by_path_bias"] = len(re.findall(r"built only \d+ of \d+ circuits", proxy))
    result["proxy_resourcelimit_lines"] = proxy.count("RESOURCELIMIT")
    result["proxy_connectfailed_lines"] = proxy.count("CONNECTFAILED")
    by_reason = {}
    for t in relay_logs.values():
        for reason in re.findall(r'reason="(\w+)" refused=\d+ total=\d+', t):
            by_reason[reason] = by_reason.get(reason, 0) + 1
    result["relay_dos_refusal_log_lines"] = by_reason
    first = {}
    for name, t in relay_logs.items():
        m = re.search(r"^(\S+)Z\s+INFO this relay is in the consensus", t, re.M)
        if m:
            at = datetime.datetime.fromisoformat(m.group(1)).replace(tzinfo=datetime.timezone.utc)
            first[name] = round(at.timestamp() - launched, 1)
    result["relay_first_in_consensus_s"] = first
    result["loadavg_end"] = os.getloadavg()
    result["data_dir"] = str(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
