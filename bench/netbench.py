#!/usr/bin/env python3
"""Whole-network benchmark of one Allium test network (issue 4). Run by hand; prints JSON.

usage: python3 bench/netbench.py [--allium PATH] [--mib N] [--circuits N] [--out FILE]

Starts `allium testnet` (3 authorities, 6 relays, a proxy, each its own process) with the proxy's
circuit-manager debug log on, serves a payload from a static server on 127.0.0.2, and measures:
  - bulk MiB/s through one circuit, and aggregate MiB/s over 8 isolated circuits;
  - 3-hop circuit build time (the proxy's own `circuit built ms=` log lines);
  - time to first byte of a new stream on a ready circuit (same SOCKS credentials, 20 GETs);
  - relay CPU seconds per MiB summed over the relay processes (and the proxy's), from /proc;
  - relay RSS idle, and with N (default 1000) circuits open at once (one held stream each).
Every process is started here and stopped by PID; every wait is bounded; traffic stays on loopback.
"""
import argparse
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TICK = os.sysconf("SC_CLK_TCK")


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def socks_connect(proxy, host, port, user, timeout=30.0):
    """SOCKS5 CONNECT with username/password (isolation key); the name goes unresolved."""
    s = socket.create_connection(proxy, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"\x05\x01\x02")
    if s.recv(2) != b"\x05\x02":
        raise OSError("proxy refused username/password auth")
    u, p = user.encode(), b"p"
    s.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
    if s.recv(2)[1:2] != b"\x00":
        raise OSError("auth failed")
    h = host.encode()
    s.sendall(b"\x05\x01\x00\x03" + bytes([len(h)]) + h + struct.pack(">H", port))
    head = recv_exact(s, 4)
    if head[1] != 0:
        raise OSError(f"SOCKS reply {head[1]:#04x}")
    atyp = head[3]
    recv_exact(s, {1: 6, 4: 18}.get(atyp, 0) or (recv_exact(s, 1)[0] + 2))
    return s


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise OSError("connection closed")
        out += chunk
    return out


def http_get(proxy, http, path, user, timeout=120.0):
    """GET through the proxy; returns (bytes of body, seconds to first byte, seconds total)."""
    t0 = time.perf_counter()
    s = socks_connect(proxy, http[0], http[1], user, timeout)
    s.settimeout(timeout)
    s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    first = None
    total = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        n = s.recv_into(view)
        if n == 0:
            break
        if first is None:
            first = time.perf_counter() - t0
        total += n
    s.close()
    return total, first or 0.0, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allium", default=os.path.join(ROOT, "target", "release", "allium"))
    ap.add_argument("--mib", type=int, default=100)
    ap.add_argument("--circuits", type=int, default=1000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not os.path.exists(args.allium):
        sys.exit(f"{args.allium} not found: run `cargo build --release` first")

    work = tempfile.mkdtemp(prefix="allium-netbench.")
    www = os.path.join(work, "www")
    os.makedirs(www)
    with open(os.path.join(www, "big"), "wb") as f:
        f.write(os.urandom(args.mib << 20))
    with open(os.path.join(www, "tiny"), "wb") as f:
        f.write(os.urandom(1024))
    procs = []

    def stop_all():
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.time() + 15
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()

    try:
        http_sock = socket.socket()
        http_sock.bind(("127.0.0.2", 0))
        http_port = http_sock.getsockname()[1]
        http_sock.close()
        http = ("127.0.0.2", http_port)
        procs.append(subprocess.Popen([sys.executable, os.path.join(HERE, "httpd.py"), http[0], str(http_port), www],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        data_dir = os.path.join(work, "net")
        env = dict(os.environ, ALLIUM_LOG="info,allium_client::circmgr=debug")
        t_start = time.perf_counter()
        tn = subprocess.Popen([args.allium, "testnet", "--socks-port", "0", "--data-dir", data_dir],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        procs.append(tn)
        info_path = os.path.join(data_dir, "testnet.json")
        deadline = time.time() + 90
        while not os.path.exists(info_path):
            if tn.poll() is not None or time.time() > deadline:
                sys.exit("allium testnet did not become ready:\n" + (tn.stdout.read() if tn.stdout else ""))
            time.sleep(0.05)
        ready_s = time.perf_counter() - t_start
        threading.Thread(target=lambda: tn.stdout.read(), daemon=True).start()
        time.sleep(0.2)
        info = json.load(open(info_path))
        host, port = info["socks"].rsplit(":", 1)
        proxy = (host, int(port))
        relays = [n for n in info["nodes"] if n["role"] == "relay"]
        client = [n for n in info["nodes"] if n["role"] == "client"][0]
        rss_idle = {n["name"]: status_kib(n["pid"], "VmRSS") / 1024 for n in relays}

        def cpu_snapshot():
            return sum(cpu_secs(n["pid"]) for n in relays), cpu_secs(client["pid"])

        # Warm up (the HTTP server may still be starting; a circuit for the bulk credentials),
        # then one bulk download on one circuit.
        for attempt in range(50):
            try:
                http_get(proxy, http, "/tiny", "bulk1")
                break
            except OSError:
                if attempt == 49:
                    raise
                time.sleep(0.2)
        r0, c0 = cpu_snapshot()
        n, _, secs = http_get(proxy, http, "/big", "bulk1", timeout=600)
        r1, c1 = cpu_snapshot()
        if n < (args.mib << 20):
            sys.exit(f"bulk download truncated at {n} bytes")
        one_mibs = (n / 2**20) / secs
        mib_moved = n / 2**20

        # 8 parallel downloads on 8 isolated circuits.
        for i in range(8):
            http_get(proxy, http, "/tiny", f"par{i}")
        results = [None] * 8

        def worker(i):
            results[i] = http_get(proxy, http, "/big", f"par{i}", timeout=900)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        r2, c2 = cpu_snapshot()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
        wall = time.perf_counter() - t0
        r3, c3 = cpu_snapshot()
        got = sum(r[0] for r in results if r)
        if got < 8 * (args.mib << 20):
            sys.exit(f"parallel downloads truncated: {got} bytes")
        agg_mibs = (got / 2**20) / wall
        mib_moved += got / 2**20

        # Stream time to first byte on one ready circuit.
        ttfb = []
        for _ in range(20):
            _, first, _ = http_get(proxy, http, "/tiny", "ttfb")
            ttfb.append(first * 1000)

        # Many circuits at once: one held stream each, to a listener that keeps them open.
        hold = socket.socket()
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.bind(("127.0.0.2", 0))
        hold.listen(4096)
        held_peer = []

        def acceptor():
            while True:
                try:
                    c, _ = hold.accept()
                    held_peer.append(c)
                except OSError:
                    return

        threading.Thread(target=acceptor, daemon=True).start()
        held = []
        errors = 0
        lock = threading.Lock()

        def opener(lo, hi):
            nonlocal errors
            for i in range(lo, hi):
                try:
                    s = socks_connect(proxy, "127.0.0.2", hold.getsockname()[1], f"hold{i}", timeout=60)
                    with lock:
                        held.append(s)
                except OSError:
                    with lock:
                        errors += 1

        k = 25
        step = (args.circuits + k - 1) // k
        ts = [threading.Thread(target=opener, args=(j * step, min(args.circuits, (j + 1) * step))) for j in range(k)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=600)
        open_secs = time.perf_counter() - t0
        time.sleep(0.5)
        rss_loaded = {n["name"]: status_kib(n["pid"], "VmRSS") / 1024 for n in relays}
        rss_peak = {n["name"]: status_kib(n["pid"], "VmHWM") / 1024 for n in relays}
        for s in held:
            s.close()
        hold.close()

        builds = []
        with open(os.path.join(data_dir, "proxy.log")) as f:
            for line in f:
                if "circuit built" in line:
                    m = re.search(r"ms=([0-9.]+)", line)
                    if m:
                        builds.append(float(m.group(1)))

        out = {
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
            "ready_secs": round(ready_s, 2),
            "bulk_one_circuit_mib_s": round(one_mibs, 1),
            "bulk_8_circuits_aggregate_mib_s": round(agg_mibs, 1),
            "circuit_build_ms": {"median": round(statistics.median(builds), 2) if builds else None,
                                 "p90": round(sorted(builds)[int(len(builds) * 0.9)], 2) if builds else None,
                                 "samples": len(builds)},
            "stream_ttfb_ready_circuit_ms": {"median": round(statistics.median(ttfb), 2),
                                             "max": round(max(ttfb), 2)},
            "relay_cpu_s_per_mib": {"one_circuit": round((r1 - r0) / (n / 2**20), 5),
                                    "eight_circuits": round((r3 - r2) / (got / 2**20), 5)},
            "client_cpu_s_per_mib": {"one_circuit": round((c1 - c0) / (n / 2**20), 5),
                                     "eight_circuits": round((c3 - c2) / (got / 2**20), 5)},
            "relay_rss_mib_idle": {k: round(v, 1) for k, v in rss_idle.items()},
            "circuits_opened": len(held),
            "circuit_open_errors": errors,
            "circuits_open_secs": round(open_secs, 2),
            "relay_rss_mib_with_circuits": {k: round(v, 1) for k, v in rss_loaded.items()},
            "relay_peak_rss_mib": {k: round(v, 1) for k, v in rss_peak.items()},
            "mib_moved": round(mib_moved, 1),
        }
        text = json.dumps(out, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    finally:
        stop_all()
        subprocess.run(["rm", "-rf", work], check=False)


if __name__ == "__main__":
    main()
