#!/usr/bin/env python3
"""The scraper workload of issue 12 against `allium testnet`.

A heavy but legitimate client: every request uses new SOCKS credentials (so the proxy isolates it
on its own circuit), about --rate requests a second (default 24), each a small GET of the test
page, and every --big-every-th request (default 10) a --big-mib download (default 20 MiB), for
--minutes (default 15). Requests are issued on schedule whatever the earlier ones are doing
(at most --max-inflight at once; a request that cannot start on time is counted late).

Reports: requests sent, failed (% and the first reasons, with when failures started), per-node
RSS every 5 s and its peak, and every 10 s each node's metrics page (circuits and streams open,
DoS rejections, the proxy's circuits and build failures).

    python3 bench/scraper.py [--minutes 15] [--allium PATH] [--testnet-json PATH]

Starts its own test network (6 relays, 2 exits, as `allium testnet` by default) unless
--testnet-json names the testnet.json of a running one. Writes
bench/results/scraper-<UTC stamp>.json. Needs python3 (stdlib) and a release `allium`.
"""

import argparse
import collections
import datetime
import json
import os
import pathlib
import random
import sys
import tempfile
import threading
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "attack"))
import run as net  # noqa: E402  (bench/attack/run.py: the testnet driver and SOCKS client)

MIB = 1024 * 1024
METRICS = ("allium_circuits_open", "allium_streams_open", "allium_dos_rejections_total",
           "allium_circuits_created_total", "allium_circuit_build_failures_total",
           "allium_socks_requests_total", "allium_proxy_local_limit_hits_total",
           "allium_proxy_local_held")


sc_source = [net.HONEST]  # the scraper's own source address (set by main)


def small_get(proxy, target, timeout):
    """GET / with fresh credentials; raises on anything but the full test page."""
    user = "scraper-%016x" % random.getrandbits(64)
    s = net.socks_connect(proxy, target[0], target[1], user, "pw-%08x" % random.getrandbits(32),
                          sc_source[0], timeout)
    try:
        s.settimeout(timeout)
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            if len(data) > 1 << 20:
                break
        if not data.startswith(b"HTTP/1.1 200") or b"\r\n\r\n" not in data:
            raise ConnectionError("bad answer")
        return len(data)
    finally:
        s.close()


def scrape_metrics(addr, timeout=3):
    """The listed families from a Prometheus page, summed over labels (and per label)."""
    out = {}
    try:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=timeout) as r:
            text = r.read(1 << 20).decode(errors="replace")
    except OSError as e:
        return {"error": str(e)}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name not in METRICS:
            continue
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0) + v
        if "{" in name_labels:
            out[name_labels] = v
    return out


class Scraper:
    def __init__(self, tn, a):
        self.tn = tn
        self.a = a
        self.lock = threading.Lock()
        self.sent = self.ok = self.failed = self.late = 0
        self.big_ok = self.big_failed = 0
        self.reasons = collections.Counter()
        self.first_failure = None
        self.fail_by_minute = collections.Counter()
        self.inflight = threading.BoundedSemaphore(a.max_inflight)
        self.t0 = None
        self.threads = []

    def one(self, i, big):
        try:
            if big:
                net.download(self.tn.socks, self.tn.http_target, self.a.big_mib * MIB,
                             timeout=self.a.timeout, source=sc_source[0])
            else:
                small_get(self.tn.socks, self.tn.http_target, self.a.timeout)
            with self.lock:
                self.ok += 1
                self.big_ok += big
        except (OSError, ConnectionError) as e:
            el = time.monotonic() - self.t0
            with self.lock:
                self.failed += 1
                self.big_failed += big
                self.reasons[(str(e) or type(e).__name__)[:80]] += 1
                self.fail_by_minute[int(el // 60)] += 1
                if self.first_failure is None:
                    self.first_failure = round(el, 1)
        finally:
            self.inflight.release()

    def run(self, secs):
        self.t0 = time.monotonic()
        i = 0
        while True:
            due = self.t0 + i / self.a.rate
            now = time.monotonic()
            if due - self.t0 >= secs or now - self.t0 >= secs:
                break  # the duration is wall-clock time, even when requests start late
            if due > now:
                time.sleep(due - now)
            if not self.inflight.acquire(timeout=0):
                with self.lock:
                    self.late += 1
                self.inflight.acquire()
            big = (i % self.a.big_every) == self.a.big_every - 1
            t = threading.Thread(target=self.one, args=(i, big), daemon=True)
            t.start()
            with self.lock:
                self.sent += 1
            i += 1
            if i % 256 == 0:
                self.threads = [x for x in self.threads if x.is_alive()]
            self.threads.append(t)
        for t in self.threads:
            t.join(timeout=self.a.timeout + 30)


class Monitor(threading.Thread):
    """RSS of every node every 5 s; metrics pages every 10 s."""

    def __init__(self, tn):
        super().__init__(daemon=True)
        self.tn = tn
        self.stop_ev = threading.Event()
        self.rss = []
        self.metrics = []
        self.peak = {}
        self.died = set()

    def run(self):
        t0 = time.monotonic()
        n = 0
        while not self.stop_ev.is_set():
            el = round(time.monotonic() - t0, 1)
            row = {"t": el, "load1": round(os.getloadavg()[0], 1)}
            for node in self.tn.nodes:
                r = net.rss_kib(node["pid"])
                if r is None:
                    continue
                row[node["name"]] = round(r / 1024, 1)
                self.peak[node["name"]] = max(self.peak.get(node["name"], 0), row[node["name"]])
            self.rss.append(row)
            self.died |= set(self.tn.dead())
            if n % 2 == 0:
                m = {"t": el}
                for node in self.tn.nodes:
                    addr = node.get("addrs", {}).get("metrics")
                    if addr and node["role"] in ("relay", "client", "scraper-proxy"):
                        m[node["name"]] = scrape_metrics(addr)
                self.metrics.append(m)
            n += 1
            self.stop_ev.wait(5)


def load_running(path):
    """A running network described by its testnet.json."""
    tn = net.Testnet.__new__(net.Testnet)
    tn.info = json.loads(pathlib.Path(path).read_text())
    tn.nodes = tn.info["nodes"]
    tn.socks = net.parse_addr(tn.info["socks"])
    tn.http_target = net.parse_addr(tn.info["http_target"])
    tn.proc = None
    tn.attacker_proxy = None

    class Alive:
        returncode = None

        def poll(self):
            return None

    tn.proc = Alive()
    return tn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--rate", type=float, default=24, help="requests per second")
    ap.add_argument("--big-every", type=int, default=10)
    ap.add_argument("--big-mib", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=60, help="per request, seconds")
    ap.add_argument("--max-inflight", type=int, default=512)
    ap.add_argument("--relays", type=int, default=6)
    ap.add_argument("--exits", type=int, default=2)
    ap.add_argument("--allium", type=pathlib.Path, default=None)
    ap.add_argument("--testnet-json", type=pathlib.Path, default=None)
    ap.add_argument("--client-address", default=None,
                    help="run the scraper through its own `allium proxy` whose SOCKS port and "
                    "outgoing connections use this local address (e.g. 127.0.0.2), instead of the "
                    "test network's proxy on 127.0.0.1 (the bandwidth scanner has its own "
                    "address, 127.103.0.1, since testnets give each node one)")
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    a = ap.parse_args()

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    loadavg_start = os.getloadavg()
    out = a.out or HERE / "results" / f"scraper-{stamp}.json"
    work = None
    if a.testnet_json:
        tn = load_running(a.testnet_json)
    else:
        allium = a.allium or net.target_dir() / "release" / "allium"
        if not allium.exists():
            sys.exit(f"{allium} not found: run `cargo build --release --bin allium` or pass "
                     "--allium")
        work = tempfile.TemporaryDirectory(prefix="allium-scraper-")
        tn = net.Testnet(allium, work.name, relays=a.relays, exits=a.exits)
        tn.start()
        time.sleep(3)
    if a.client_address:
        own = net.AttackerProxy(tn, addr=a.client_address, name="scraper-proxy")
        own.start()
        tn.attacker_proxy = own
        tn.socks = own.socks
        source = a.client_address
    else:
        source = net.HONEST
    sc_source[0] = source
    mon = Monitor(tn)
    mon.start()
    sc = Scraper(tn, a)
    print(f"scraper: {a.rate}/s for {a.minutes} min, a {a.big_mib} MiB download every "
          f"{a.big_every} requests", file=sys.stderr)

    stop_report = threading.Event()

    def report():
        while not stop_report.wait(60):
            with sc.lock:
                print(f"  {time.monotonic() - sc.t0:5.0f} s: sent {sc.sent}, ok {sc.ok}, failed "
                      f"{sc.failed}, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)

    threading.Thread(target=report, daemon=True).start()
    try:
        sc.run(a.minutes * 60)
    finally:
        stop_report.set()
        mon.stop_ev.set()
        mon.join()
        if work is not None:
            tn.stop()
            work.cleanup()
    total = sc.ok + sc.failed
    relay_circ_peak = {}
    for m in mon.metrics:
        for k, v in m.items():
            if isinstance(v, dict) and "allium_circuits_open" in v:
                relay_circ_peak[k] = max(relay_circ_peak.get(k, 0), v["allium_circuits_open"])
    doc = {
        "date": stamp,
        "label": a.label,
        "commit": net.git("rev-parse", "HEAD"),
        "branch": net.git("rev-parse", "--abbrev-ref", "HEAD"),
        "params": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(a).items()},
        "loadavg_start": loadavg_start,
        "loadavg_end": os.getloadavg(),
        "load1_range": [min((r["load1"] for r in mon.rss), default=None),
                        max((r["load1"] for r in mon.rss), default=None)],
        "requests": total,
        "ok": sc.ok,
        "failed": sc.failed,
        "failed_pct": round(100 * sc.failed / total, 2) if total else None,
        "big_ok": sc.big_ok,
        "big_failed": sc.big_failed,
        "late_starts": sc.late,
        "first_failure_secs": sc.first_failure,
        "failures_by_minute": dict(sorted(sc.fail_by_minute.items())),
        "failure_reasons": dict(sc.reasons.most_common(10)),
        "peak_rss_mib": dict(sorted(mon.peak.items())),
        "peak_circuits_open": relay_circ_peak,
        "died": sorted(mon.died),
        "rss_mib_series": mon.rss,
        "metrics_series": mon.metrics,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    summary = {k: doc[k] for k in ("requests", "failed", "failed_pct", "big_ok", "big_failed",
                                   "late_starts", "first_failure_secs", "failure_reasons",
                                   "load1_range",
                                   "peak_rss_mib", "peak_circuits_open", "died")}
    print(json.dumps(summary, indent=1))
    print(out)
    return 0 if total and sc.failed / total < 0.01 and not mon.died else 1


if __name__ == "__main__":
    sys.exit(main())
