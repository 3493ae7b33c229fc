#!/usr/bin/env python3
"""Allium vs C Tor on this machine: same topology, same workload, one run (issue 5).

Usually started by bench/compare-tor.sh (which installs tor/curl and builds Allium):

    python3 bench/compare.py [--only tor|allium|both] [--keep] [--bulk-mib N] ...

Sequence (one network at a time, so they never compete for the CPU):
  1. payloads (a BULK_MIB MiB random file and a 1 KiB file) served by bench/httpd.py on 127.0.0.2;
     the no-overlay ceiling: small GETs, 1 and N_PAR parallel bulk downloads straight from it;
  2. a private C Tor network on 127.0.0.1 (TestingTorNetwork, 3 authorities from tor-gencert,
     6 relays of which 2 exits, 1 client with ConfluxEnabled 0), the workload through its SOCKS port;
  3. `allium testnet --relays 6 --exits 2` (the same shape), the workload through its SOCKS port;
  4. one Markdown table (metric | Allium | Tor | ratio | goal) and bench/results/compare-<UTC>.json.

Workload (identical on both): N_TINY small GETs on one reused circuit (same SOCKS credentials) and
N_TINY on a new circuit each (new SOCKS credentials each), then 1 x BULK_MIB MiB and N_PAR x BULK_MIB
MiB in parallel on N_PAR isolated circuits, with utime+stime of every network process read from
/proc/PID/stat around the bulk phases, and VmHWM of every process at the end.

WAN emulation (issue 9): --wan MS puts every inter-node link through bench/wanem.py with MS of
one-way delay each way (--rate MBIT also caps each OR link's rate per direction): client to guard,
relay to relay (Tor: "ORPort <emulator> NoListen" + "ORPort <real> NoAdvertise", so the consensus
lists the emulator; Allium: `allium testnet --relay-port-base/--advertise-port-base`, the relay
config's `advertised` address) and exit to web server (the URLs name an emulator in front of the
web server, which is delay-only so that the bottleneck of a --rate run is an OR link). The
application to SOCKS hop is not emulated. --fairness adds the interactive-vs-bulk workload: one
small GET every 200 ms on a ready circuit, alone and then beside one bulk download through the same
guard; its median time to first byte in both cases.

Every process is started here and stopped here by PID; every wait is bounded; all traffic is on
loopback. Standard library only.
"""
import argparse
import ctypes
import datetime
import http.client
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

MIB = 1048576.0
HZ = os.sysconf("SC_CLK_TCK")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HTTP_ADDR = "127.0.0.2"  # not a relay address: tor pins an "exit enclave" when the target is a relay's IP
CURL_FMT = "%{time_connect} %{time_starttransfer} %{time_total} %{size_download} %{http_code}\n"
T_START = time.monotonic()
DISTURBED_CORES = 0.25  # other users' CPU during a bulk phase above which a run is flagged

# Goals of issue 5, as Allium / Tor ratios (or an absolute bound for the start-up time).
GOALS = {
    "bulk_1": (">=", 3.0),
    "bulk_par": (">=", 2.0),
    "relay_cpu": ("<=", 0.5),
    "tiny_new": ("<=", 1.0),
    "tiny_reuse": ("<=", 1.0),
    "relay_rss": ("<=", 1.0),
    "first_stream": ("abs<", 10.0),
}
# Goals of issue 9 on emulated WAN links (--wan): Allium / Tor ratios.
GOALS_WAN = {
    "bulk_1": (">=", 2.0),
    "bulk_par": (">=", 2.0),
    "tiny_new": ("<=", 0.7),
    "tiny_reuse": ("<=", 0.7),
    "fairness": ("abs<=", 1.5),
}
ACTIVE_GOALS = GOALS


def log(msg):
    sys.stderr.write("[%6.1fs] %s\n" % (time.monotonic() - T_START, msg))
    sys.stderr.flush()


class Fatal(Exception):
    """A step of one side failed; that side's column reads n/a, with this reason."""


# ----------------------------------------------------------------------------------- processes

_libc = None


def _die_with_parent():
    """preexec_fn: the child gets SIGTERM if this driver dies (even by SIGKILL)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; the EXIT path still stops the child
        pass


def proc_stat(pid):
    """(state, utime+stime in s, starttime ticks) of a live process, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return rest[0], (int(rest[11]) + int(rest[12])) / HZ, int(rest[19])


def proc_status(pid, key):
    """A kB field of /proc/PID/status (VmHWM, VmRSS) in MiB, or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def alive(pid):
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


class Procs:
    """Every process this driver starts, stopped by PID (TERM, grace, KILL)."""

    def __init__(self):
        self.popens = []  # Popen objects we started
        self.adopted = {}  # pid -> starttime, processes started by a child of ours (allium testnet)

    def spawn(self, argv, logpath=None, env=None, capture=False):
        """Start argv; output to logpath (appended), or captured (pipes), or discarded."""
        if capture:
            out, err = subprocess.PIPE, subprocess.PIPE
        elif logpath:
            out, err = open(logpath, "ab"), subprocess.STDOUT
        else:
            out, err = subprocess.DEVNULL, subprocess.DEVNULL
        try:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                 preexec_fn=_die_with_parent)
        finally:
            if logpath and not capture:
                out.close()
        self.popens.append(p)
        return p

    def adopt(self, pid):
        st = proc_stat(pid)
        if st:
            self.adopted[pid] = st[2]

    def _adopted_alive(self, pid):
        st = proc_stat(pid)
        return st is not None and st[0] not in ("Z", "X") and st[2] == self.adopted.get(pid)

    def stop(self, popens=None, adopted=None, grace=5.0):
        popens = [p for p in (self.popens if popens is None else popens) if p.poll() is None]
        adopted = list(self.adopted if adopted is None else adopted)
        for p in popens:
            try:
                p.terminate()
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in popens) and not any(self._adopted_alive(a) for a in adopted):
                break
            time.sleep(0.1)
        for p in popens:
            if p.poll() is None:
                p.kill()
        for a in adopted:  # only if it is still the very process we saw (same start time)
            if self._adopted_alive(a):
                try:
                    os.kill(a, signal.SIGKILL)
                except OSError:
                    pass
        for p in popens:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for a in adopted:
            self.adopted.pop(a, None)


PROCS = Procs()


def on_signal(signum, _frame):
    raise KeyboardInterrupt("signal %d" % signum)


# ----------------------------------------------------------------------------------- helpers

def clean_env():
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def port_free(addr, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
    try:
        s.bind((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def run(argv, timeout, **kw):
    return subprocess.run(argv, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def first_line(argv):
    """First line of a short command's output ('' if it fails)."""
    try:
        out = run(argv, 20).stdout.decode("utf-8", "replace").strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0][:100] if out else ""


def median(xs):
    return statistics.median(xs) if xs else None


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
    except OSError:
        return "(no %s)" % path


class Curl:
    """curl through a SOCKS5 proxy (hostname resolved by the proxy) or straight to the server."""

    def __init__(self, cfg, socks=None):
        self.cfg, self.socks, self.env = cfg, socks, clean_env()

    def argv(self, url, user, max_time):
        a = ["curl", "-q", "-sS", "-o", "/dev/null", "--max-time", str(max_time), "-w", CURL_FMT]
        if self.socks:
            # distinct username/password => distinct circuit (IsolateSOCKSAuth in Tor; the same in Allium)
            a += ["--socks5-hostname", self.socks, "--proxy-user", "%s:pw-%s" % (user, user)]
        else:
            a += ["--noproxy", "*"]
        return a + [url]

    @staticmethod
    def parse(out, err=b"", rc=0):
        """curl's -w line (CURL_FMT) and exit status -> dict; ok means exit 0 and HTTP 200 (curl exits
        non-zero, e.g. 18, when the body is shorter than its Content-Length)."""
        r = out.decode("utf-8", "replace").split()
        if len(r) == 5:
            try:
                v = {"connect": float(r[0]), "ttfb": float(r[1]), "total": float(r[2]), "bytes": int(float(r[3]))}
            except ValueError:
                v = None
            if v is not None:
                v["ok"] = r[4] == "200" and rc == 0
                if not v["ok"]:
                    v["error"] = ("curl exit %s, HTTP %s: " % (rc, r[4]) + err.decode("utf-8", "replace").strip())[-200:]
                return v
        return {"ok": False, "bytes": 0, "total": None,
                "error": ("curl exit %s: " % rc + (err + out).decode("utf-8", "replace").strip())[-200:]}

    def get(self, url, user, max_time):
        p = PROCS.spawn(self.argv(url, user, max_time), env=self.env, capture=True)
        try:
            out, err = p.communicate(timeout=max_time + 10)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate(timeout=5)
        finally:
            PROCS.popens.remove(p)
        return self.parse(out or b"", err or b"", p.returncode)

    def parallel(self, url, users, max_time):
        """Start len(users) downloads at once; returns (results, wall seconds)."""
        t0 = time.monotonic()
        ps = [PROCS.spawn(self.argv(url, u, max_time), env=self.env, capture=True) for u in users]
        res = []
        for p in ps:
            try:
                out, err = p.communicate(timeout=max(1.0, t0 + max_time + 10 - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate(timeout=5)
            res.append(self.parse(out or b"", err or b"", p.returncode))
        wall = time.monotonic() - t0
        PROCS.popens = [p for p in PROCS.popens if p not in ps]
        return res, wall


def machine_busy_ns():
    try:
        with open("/sys/fs/cgroup/cpuacct/cpuacct.usage") as f:
            return int(f.read())
    except (OSError, ValueError):
        pass
    try:  # fallback: /proc/stat ticks (coarser)
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return int((sum(v) - v[3] - v[4]) * 1e9 / HZ)
    except (OSError, ValueError, IndexError):
        return None


def runq_wait(pid):
    """Seconds the threads of a process have spent runnable but waiting for a CPU (schedstat)."""
    tot = 0
    try:
        for t in os.listdir("/proc/%d/task" % pid):
            try:
                with open("/proc/%d/task/%s/schedstat" % (pid, t)) as f:
                    tot += int(f.read().split()[1])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        return None
    return tot / 1e9


def cpu_snap(nodes):
    """utime+stime of every node, plus machine busy ns, our waited children and wall time."""
    ru_c = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru_s = resource.getrusage(resource.RUSAGE_SELF)
    return {"t": time.monotonic(), "busy_ns": machine_busy_ns(),
            "children": ru_c.ru_utime + ru_c.ru_stime, "self": ru_s.ru_utime + ru_s.ru_stime,
            "procs": {n["name"]: (proc_stat(n["pid"]) or (None, None, None))[1] for n in nodes},
            "runq": {n["name"]: runq_wait(n["pid"]) for n in nodes}}


def cpu_delta(before, after, nodes, mib):
    per = {}
    for n in nodes:
        a, b = before["procs"].get(n["name"]), after["procs"].get(n["name"])
        if a is not None and b is not None:
            per[n["name"]] = round(b - a, 3)
    role = {n["name"]: n["role"] for n in nodes}
    wait = {}
    for n in nodes:
        a, b = before.get("runq", {}).get(n["name"]), after.get("runq", {}).get(n["name"])
        if a is not None and b is not None and n["role"] in ("relay", "authority", "client"):
            wait[n["name"]] = round(b - a, 4)
    by = lambda *rs: sum(v for k, v in per.items() if role.get(k) in rs)  # noqa: E731
    wall = after["t"] - before["t"]
    out = {"mib": mib, "wall_s": wall, "per_process_cpu_s": per,
           "relays_cpu_s": by("relay"), "authorities_cpu_s": by("authority"),
           "network_cpu_s": by("relay", "authority"), "client_cpu_s": by("client"),
           "http_server_cpu_s": by("http"), "curl_cpu_s": after["children"] - before["children"],
           "driver_cpu_s": after["self"] - before["self"],
           "runq_wait_s": wait, "runq_wait_cores": sum(wait.values()) / wall if wall > 0 else None}
    for k in ("relays_cpu_s", "authorities_cpu_s", "client_cpu_s"):
        out[k + "_per_mib"] = out[k] / mib if mib else None
    if before["busy_ns"] is not None and after["busy_ns"] is not None and wall > 0:
        busy = (after["busy_ns"] - before["busy_ns"]) / 1e9
        ours = sum(per.values()) + out["curl_cpu_s"] + out["driver_cpu_s"]
        out["machine_busy_cores"] = busy / wall
        out["others_busy_cores"] = max(0.0, busy - ours) / wall  # other users of this machine
    return out


# ----------------------------------------------------------------------------------- workload

def workload(cfg, side, socks, nodes, extra_latency=None):
    """The identical workload; nodes: [{name, role, pid}] whose CPU is measured."""
    c = Curl(cfg, socks)
    res = {"socks": socks}
    nonce = "%s%d" % (side[0], int(time.time()) % 100000)

    if cfg.fairness_only:
        # Only the interactive-vs-bulk workload (quick A/B runs of a scheduler or controller change).
        res["fairness"] = fairness(cfg, side, c, nonce)
        res["rss"] = rss(nodes)
        return res
    log("[%s] %d small GETs on one reused circuit" % (side, cfg.n_tiny))
    c.get(cfg.url_tiny, "reuse" + nonce, 30)  # builds (or picks) the circuit; not counted
    rows = [c.get(cfg.url_tiny, "reuse" + nonce, 30) for _ in range(cfg.n_tiny)]
    res["tiny_reuse"] = summarize_tiny(rows)

    log("[%s] %d small GETs, new SOCKS credentials (new circuit) each" % (side, cfg.n_tiny))
    rows = [c.get(cfg.url_tiny, "new%s-%d" % (nonce, k), 30) for k in range(cfg.n_tiny)]
    res["tiny_new"] = summarize_tiny(rows)
    if extra_latency:
        res.update(extra_latency(c, nonce))
    if cfg.fairness:
        res["fairness"] = fairness(cfg, side, c, nonce)
    time.sleep(cfg.settle)

    snaps = [cpu_snap(nodes)]
    log("[%s] bulk: 1 x %d MiB" % (side, cfg.bulk_mib))
    r1, w1 = c.parallel(cfg.url_bulk, ["bulk" + nonce], cfg.bulk_timeout)
    snaps.append(cpu_snap(nodes))
    res["bulk_1"] = summarize_bulk(r1, w1, cfg.bulk_bytes)
    time.sleep(2)
    snaps.append(cpu_snap(nodes))
    log("[%s] bulk: %d x %d MiB in parallel, one isolated circuit each" % (side, cfg.n_par, cfg.bulk_mib))
    rp, wp = c.parallel(cfg.url_bulk, ["par%s-%d" % (nonce, k) for k in range(cfg.n_par)], cfg.bulk_timeout)
    snaps.append(cpu_snap(nodes))
    res["bulk_par"] = summarize_bulk(rp, wp, cfg.bulk_bytes)
    res["cpu_bulk_1"] = cpu_delta(snaps[0], snaps[1], nodes, res["bulk_1"]["mib"])
    res["cpu_bulk_par"] = cpu_delta(snaps[2], snaps[3], nodes, res["bulk_par"]["mib"])
    tot = {}
    for k in ("network_cpu_s", "relays_cpu_s", "authorities_cpu_s", "client_cpu_s", "mib"):
        tot[k] = res["cpu_bulk_1"][k] + res["cpu_bulk_par"][k]
    for k in ("network_cpu_s", "relays_cpu_s", "authorities_cpu_s", "client_cpu_s"):
        tot[k + "_per_mib"] = tot[k] / tot["mib"] if tot["mib"] else None
    res["cpu_bulk"] = tot
    res["rss"] = rss(nodes)
    if cfg.perf:
        res["perf"] = perf_phase(cfg, side, c, nodes, nonce)
    return res


def interactive(c, cfg, user, n, period=0.2):
    """n small GETs on one circuit (credentials `user`), one every `period` s (or right after the
    previous one if it took longer)."""
    rows = []
    nxt = time.monotonic()
    for _ in range(n):
        nxt += period
        rows.append(c.get(cfg.url_tiny, user, 30))
        time.sleep(max(0.0, nxt - time.monotonic()))
    return rows


def fairness(cfg, side, c, nonce):
    """The interactive stream's time to first byte alone, then beside one bulk download. Both go
    through the client's one guard (Tor and Allium each use their first primary guard), so they
    share the client-guard link; with --rate that link is a bottleneck."""
    user = "int" + nonce
    c.get(cfg.url_tiny, user, 30)  # build (or pick) its circuit: the stream is interactive, not new
    log("[%s] fairness: %d small GETs every 200 ms, alone" % (side, cfg.n_interactive))
    alone = summarize_tiny(interactive(c, cfg, user, cfg.n_interactive))
    log("[%s] fairness: the same beside one %d MiB download" % (side, cfg.bulk_mib))
    bulk = PROCS.spawn(c.argv(cfg.url_bulk, "fbulk" + nonce, cfg.bulk_timeout), env=c.env, capture=True)
    t0 = time.monotonic()
    time.sleep(cfg.fair_ramp)  # let the download reach its full rate first
    rows = interactive(c, cfg, user, cfg.n_interactive)
    # The download must still be running when the last GET ends, or part of it ran alone.
    running = bulk.poll() is None
    if running:
        bulk.kill()
    try:
        out, err = bulk.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        out, err = b"", b""
    PROCS.popens = [p for p in PROCS.popens if p is not bulk]
    shared = summarize_tiny(rows)
    a, w = alone["ttfb_ms_median"], shared["ttfb_ms_median"]
    res = {"alone": alone, "with_bulk": shared, "ratio": (w / a) if a and w else None,
           "bulk_ran_throughout": running, "interactive_phase_s": time.monotonic() - t0 - cfg.fair_ramp,
           "period_s": 0.2, "ramp_s": cfg.fair_ramp, "rate_mbit": cfg.rate}
    if not running:
        b = Curl.parse(out or b"", err or b"", bulk.returncode)
        res["bulk"] = b
        log("[%s] fairness: WARNING: the download ended before the interactive GETs (use a larger --bulk-mib)"
            % side)
    log("[%s] fairness: first byte median %.1f ms alone, %.1f ms beside the download (%.2fx)"
        % (side, a or 0, w or 0, res["ratio"] or 0))
    return res


def perf_phase(cfg, side, c, nodes, nonce):
    """--perf: one more N_PAR bulk phase (not counted above) with `perf record` on the relays and the
    client; writes the flat profile to bench/results/perf-<side>-<UTC>.txt."""
    if not shutil.which("perf"):
        log("[%s] --perf: perf not found (apt-get install linux-perf)" % side)
        return None
    who = [n for n in nodes if n["role"] in ("relay", "client") and alive(n["pid"])]
    data = os.path.join(cfg.work, "perf-%s.data" % side)
    log("[%s] --perf: one more %d x %d MiB phase under perf record" % (side, cfg.n_par, cfg.bulk_mib))
    p = PROCS.spawn(["perf", "record", "-F", "499", "-g", "-o", data, "-p", ",".join(str(n["pid"]) for n in who)],
                    logpath=os.path.join(cfg.work, "perf-%s.log" % side))
    time.sleep(1.0)
    rows, wall = c.parallel(cfg.url_bulk, ["perf%s-%d" % (nonce, k) for k in range(cfg.n_par)], cfg.bulk_timeout)
    p.send_signal(signal.SIGINT)
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        PROCS.stop([p])
    PROCS.popens = [x for x in PROCS.popens if x is not p]
    tids = {}
    for n in who:  # perf reports threads; name each thread's process
        try:
            tids[n["name"]] = sorted(int(t) for t in os.listdir("/proc/%d/task" % n["pid"]))
        except (OSError, ValueError):
            tids[n["name"]] = []
    path = os.path.join(cfg.results, "perf-%s-%s.txt" % (side, cfg.stamp))
    os.makedirs(cfg.results, exist_ok=True)
    with open(path, "w") as f:
        f.write("# %s, %d x %d MiB under perf: %.1f MiB/s\n# process=thread ids: %s\n\n" % (
            side, cfg.n_par, cfg.bulk_mib, summarize_bulk(rows, wall, cfg.bulk_bytes)["mib_s"] or 0,
            "; ".join("%s=%s" % (n["name"], ",".join(map(str, tids[n["name"]]))) for n in who)))
        for sort in ("pid", "dso,sym"):
            try:
                r = run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                         "--percent-limit", "0.3", "--sort", sort], 300)
                f.write(r.stdout.decode("utf-8", "replace"))
            except (OSError, subprocess.TimeoutExpired) as e:
                f.write("perf report failed: %s\n" % e)
    log("[%s] --perf: profile in %s" % (side, os.path.relpath(path)))
    return {"file": os.path.relpath(path, ROOT), "mib_s_under_perf": summarize_bulk(rows, wall, cfg.bulk_bytes)["mib_s"]}


def summarize_tiny(rows):
    ok = [r for r in rows if r["ok"]]
    return {"n": len(rows), "ok": len(ok),
            "ttfb_ms_median": median([1000 * r["ttfb"] for r in ok]),
            "total_ms_median": median([1000 * r["total"] for r in ok]),
            "ttfb_ms": [round(1000 * r["ttfb"], 2) for r in ok],
            "errors": [r.get("error") for r in rows if not r["ok"]][:3]}


def summarize_bulk(rows, wall, expect):
    got = sum(r["bytes"] for r in rows)
    per = [r["bytes"] / MIB / r["total"] for r in rows if r.get("total")]
    return {"streams": len(rows), "complete": sum(1 for r in rows if r["ok"] and r["bytes"] == expect),
            "mib": got / MIB, "wall_s": wall, "mib_s": got / MIB / wall if wall > 0 else None,
            "per_stream_mib_s": [round(x, 2) for x in per],
            "errors": [r.get("error") for r in rows if not r["ok"]][:3]}


def rss(nodes):
    out = {}
    for n in nodes:
        out[n["name"]] = {"role": n["role"], "peak_rss_mib": proc_status(n["pid"], "VmHWM"),
                          "rss_mib": proc_status(n["pid"], "VmRSS")}
    by = {}
    for v in out.values():
        if v["peak_rss_mib"] is not None:
            by.setdefault(v["role"], []).append(v["peak_rss_mib"])
    return {"per_process": out, "max_by_role": {k: max(v) for k, v in by.items()},
            "n_by_role": {k: len(v) for k, v in by.items()}}


def wait_first_stream(cfg, socks, deadline, still_ok, user="ready"):
    """Poll a small GET through socks until one succeeds; returns time.monotonic() of success."""
    c = Curl(cfg, socks)
    last = None
    while time.monotonic() < deadline:
        still_ok()
        r = c.get(cfg.url_tiny, user, max(1, min(10, int(deadline - time.monotonic()))))
        if r["ok"]:
            return time.monotonic()
        last = r.get("error")
        time.sleep(0.1)
    raise Fatal("no stream through %s before the deadline (last curl error: %s)" % (socks, last))


# ----------------------------------------------------------------------------------- direct

def serve_payloads(cfg):
    www = os.path.join(cfg.work, "www")
    os.makedirs(www)
    log("creating the %d MiB random payload" % cfg.bulk_mib)
    with open(os.path.join(www, "bulk"), "wb") as f:
        for _ in range(cfg.bulk_mib):
            f.write(os.urandom(1048576))
    with open(os.path.join(www, "tiny"), "wb") as f:
        f.write(os.urandom(1024))
    if not port_free(HTTP_ADDR, cfg.http_port):
        raise SystemExit("port %s:%d is busy: pick another --base-port" % (HTTP_ADDR, cfg.http_port))
    real = cfg.http_port
    if cfg.wan_on:
        # the URLs name the emulator; the server listens one port up
        real = cfg.http_port + 1
        if not port_free(HTTP_ADDR, real):
            raise SystemExit("port %s:%d is busy: pick another --base-port" % (HTTP_ADDR, real))
    p = PROCS.spawn([sys.executable, os.path.join(HERE, "httpd.py"), HTTP_ADDR, str(real), www],
                    logpath=os.path.join(cfg.work, "httpd.log"))
    cfg.http_pid = p.pid
    if cfg.wan_on:
        # The exit's connection to the web server: a userspace emulator cannot delay the kernel's
        # SYN-ACK, so the exit's connect() completes at once. Charging the handshake on the first
        # bytes (wanem's default) would bill only an exit that writes right after connecting
        # (Allium's optimistic data) and not one that answers CONNECTED when connect() returns
        # and gets the request a round trip later (Tor): by default neither pays it here.
        cfg.http_emu = start_wanem(cfg, "web", ["%s:%d=%s:%d" % (HTTP_ADDR, cfg.http_port, HTTP_ADDR, real)], 0.0,
                                   os.path.join(cfg.work, "wanem-web.log"), handshake=cfg.web_handshake)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if Curl(cfg).get(cfg.url_tiny, "", 2)["ok"]:
            return
        time.sleep(0.1)
    raise SystemExit("the HTTP server did not start:\n" + tail(os.path.join(cfg.work, "httpd.log")))


def start_wanem(cfg, name, maps, rate, logpath, client_cmdline=None, handshake=True):
    """Start bench/wanem.py with `maps` (LISTEN=TARGET) at --wan delay and `rate` Mbit/s (0: none;
    with --rate-scope guard only on links dialled by a process whose command line contains
    `client_cmdline`); returns after it listens. handshake=False: a new connection's first bytes
    are not held for the emulated TCP handshake (wanem.py --no-handshake)."""
    argv = [sys.executable, os.path.join(HERE, "wanem.py"), "--delay", str(cfg.wan)]
    if not handshake:
        argv.append("--no-handshake")
    if rate:
        argv += ["--rate", str(rate)]
        if cfg.rate_scope == "guard" and client_cmdline:
            argv += ["--rate-from", client_cmdline]
    if cfg.loss:
        argv += ["--loss", str(cfg.loss)]
    for m in maps:
        argv += ["--map", m]
    with open(logpath, "ab") as errf:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                             env=clean_env(), preexec_fn=_die_with_parent)
    PROCS.popens.append(p)
    line = b""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not line:
        if p.poll() is not None:
            break
        r, _, _ = select.select([p.stdout], [], [], 0.2)
        if r:
            line = p.stdout.readline()
    if not line.startswith(b"READY"):
        PROCS.stop([p])
        raise Fatal("link emulator %s did not start:\n%s" % (name, tail(logpath)))
    log("link emulator %s: %d links, %g ms one way%s" % (name, len(maps), cfg.wan,
                                                         ", %g Mbit/s" % rate if rate else ""))
    return {"name": name, "popen": p, "logpath": logpath}


def stop_wanem(emu):
    """Stop an emulator; its counters (bytes, writes, stalls, CPU seconds)."""
    p = emu["popen"]
    stats = None
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    try:
        out, _ = p.communicate(timeout=10)
        for line in (out or b"").decode("utf-8", "replace").splitlines():
            if line.startswith("{"):
                stats = json.loads(line)
    except (subprocess.TimeoutExpired, ValueError, OSError):
        PROCS.stop([p])
    PROCS.popens = [x for x in PROCS.popens if x is not p]
    return stats


def direct(cfg):
    log("direct (no overlay) ceiling")
    c = Curl(cfg)
    rows = [c.get(cfg.url_tiny, "", 10) for _ in range(cfg.n_tiny)]
    r1, w1 = c.parallel(cfg.url_bulk, ["x"], 60)
    rp, wp = c.parallel(cfg.url_bulk, ["x%d" % k for k in range(cfg.n_par)], 120)
    return {"tiny": summarize_tiny(rows), "bulk_1": summarize_bulk(r1, w1, cfg.bulk_bytes),
            "bulk_par": summarize_bulk(rp, wp, cfg.bulk_bytes)}


# ----------------------------------------------------------------------------------- C Tor

class TorCtl:
    """Just enough of Tor's control protocol (cookie auth, SETCONF, GETINFO, CLOSECIRCUIT)."""

    def __init__(self, port, cookie_path, timeout=20.0):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.timeout = timeout
        with open(cookie_path, "rb") as f:
            self.cmd("AUTHENTICATE " + f.read().hex())

    def _line(self, deadline):
        while b"\r\n" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("tor control port: no reply")
            self.s.settimeout(max(0.1, deadline - time.monotonic()))
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError("tor control port closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def cmd(self, c):
        deadline = time.monotonic() + self.timeout
        self.s.sendall((c + "\r\n").encode())
        out = []
        while True:
            line = self._line(deadline)
            if line.startswith("650"):
                continue
            out.append(line)
            if line[3:4] == "+":
                while True:
                    d = self._line(deadline)
                    out.append(d)
                    if d == ".":
                        break
            elif line[3:4] == " ":
                break
        if not out[-1].startswith("250"):
            raise RuntimeError("%s -> %s" % (c.split()[0], out[-1]))
        return out

    def close_all_circuits(self):
        ids = []
        for line in self.cmd("GETINFO circuit-status"):
            if line.startswith("250") or line == ".":
                v = line.split("=", 1)[1].strip() if "=" in line else ""
                if v and line.startswith("250-circuit-status"):
                    ids.append(v.split()[0])
                continue
            if line.split():
                ids.append(line.split()[0])
        for cid in ids:
            try:
                self.cmd("CLOSECIRCUIT " + cid)
            except RuntimeError:
                pass

    def close(self):
        self.s.close()


def run_tor(cfg):
    w = os.path.join(cfg.work, "tor")
    os.makedirs(w)
    B = cfg.base_port
    names, role, exitf, orp, dirp = [], {}, {}, {}, {}
    for i in range(3):
        n = "a%d" % i
        names.append(n)
        role[n], exitf[n], orp[n], dirp[n] = "authority", False, B + i, B + 10 + i
    for j in range(cfg.relays):
        n = ("e%d" if j < cfg.exits else "m%d") % j
        names.append(n)
        role[n], exitf[n], orp[n], dirp[n] = "relay", j < cfg.exits, B + 20 + j, B + 40 + j
    socks, ctlp = B + 60, B + 61
    for p in [socks, ctlp] + list(orp.values()) + list(dirp.values()):
        if not port_free("127.0.0.1", p):
            raise Fatal("port 127.0.0.1:%d is busy: pick another --base-port" % p)
    version = first_line(["tor", "--version"]).replace("Tor version ", "").rstrip(".")

    # keys: 3 v3 authority identities (tor-gencert), relay identities (tor --list-fingerprint)
    log("[tor] generating keys for %d relays" % len(names))
    t_keys = time.monotonic()
    empty = os.path.join(w, "empty")
    open(empty, "w").close()
    with open(os.path.join(w, "resolv.conf"), "w") as f:
        f.write("nameserver 127.0.0.1\n")  # exits never resolve anything off this machine
    fp, v3 = {}, {}
    for n in names:
        d = os.path.join(w, n)
        os.makedirs(os.path.join(d, "keys"))
        os.chmod(d, 0o700)
        if role[n] == "authority":
            k = os.path.join(d, "keys")
            p = subprocess.run(["tor-gencert", "--create-identity-key", "--passphrase-fd", "0", "-m", "12",
                                "-a", "127.0.0.1:%d" % dirp[n], "-i", k + "/authority_identity_key",
                                "-s", k + "/authority_signing_key", "-c", k + "/authority_certificate"],
                               input=b"compare\n", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
                               check=False)
            if p.returncode != 0:
                raise Fatal("tor-gencert failed: %s" % p.stdout.decode()[-300:])
            with open(k + "/authority_certificate") as f:
                v3[n] = next(line.split()[1] for line in f if line.startswith("fingerprint "))
        p = run(["tor", "--defaults-torrc", empty, "-f", empty, "--DataDirectory", d, "--ORPort", "1",
                 "--Nickname", n, "--list-fingerprint"], 120)
        try:
            with open(os.path.join(d, "fingerprint")) as f:
                fp[n] = f.read().split()[1]
        except (OSError, IndexError):
            raise Fatal("tor --list-fingerprint failed: %s" % p.stdout.decode()[-300:]) from None
    # With --wan each relay's advertised ORPort is an emulator that forwards to its real one.
    adv = {n: (cfg.wan_or_port(orp[n]) if cfg.wan_on else orp[n]) for n in names}
    dirauth = "".join("DirAuthority %s orport=%d no-v2 v3ident=%s 127.0.0.1:%d %s\n"
                      % (n, adv[n], v3[n], dirp[n], fp[n]) for n in names if role[n] == "authority")
    exit_set = ",".join("$" + fp[n] for n in names if exitf[n])

    def common(n, d):
        return ("TestingTorNetwork 1\nDataDirectory %s\nNickname %s\nRunAsDaemon 0\n"
                "__OwningControllerProcess %d\nLog notice file %s/notice.log\nSafeLogging 0\n"
                "LogTimeGranularity 1\nShutdownWaitLength 0\nUseDefaultFallbackDirs 0\n"
                "PathsNeededToBuildCircuits 0.67\nClientUseIPv6 0\nOutboundBindAddress 127.0.0.1\n%s"
                % (d, n, os.getpid(), d, dirauth))

    for n in names:
        d = os.path.join(w, n)
        if cfg.wan_on:
            orport = "ORPort 127.0.0.1:%d NoListen\nORPort 127.0.0.1:%d NoAdvertise\n" % (adv[n], orp[n])
        else:
            orport = "ORPort 127.0.0.1:%d\n" % orp[n]
        t = common(n, d) + orport + (
            "DirPort 127.0.0.1:%d\nAddress 127.0.0.1\nSocksPort 0\nAssumeReachable 1\n"
            "ContactInfo %s@compare.invalid\nServerDNSDetectHijacking 0\nServerDNSTestAddresses\n"
            "ServerDNSResolvConfFile %s/resolv.conf\nServerDNSAllowBrokenConfig 1\n" % (dirp[n], n, w))
        if role[n] == "authority":
            t += ("AuthoritativeDirectory 1\nV3AuthoritativeDirectory 1\n"
                  "TestingV3AuthInitialVotingInterval 10\nTestingV3AuthInitialVoteDelay 2\n"
                  "TestingV3AuthInitialDistDelay 2\nV3AuthVotingInterval 20\nV3AuthVoteDelay 4\n"
                  "V3AuthDistDelay 4\nV3AuthNIntervalsValid 2\nTestingDirAuthVoteGuard *\n"
                  "TestingDirAuthVoteExit %s\nTestingDirAuthVoteHSDir *\nTestingMinExitFlagThreshold 0\n"
                  "ExitRelay 0\nExitPolicy reject *:*\n" % exit_set)
        elif exitf[n]:
            # "accept *:PORT" because microdescriptor policy summaries ignore accepts that are not "*:"
            # (a strict "accept 127.0.0.2:PORT" reads as "reject 1-65535" to clients). Nothing leaves the
            # machine: OutboundBindAddress 127.0.0.1, and the only destination asked for is 127.0.0.2.
            t += ("ExitRelay 1\nExitPolicyRejectPrivate 0\nExitPolicy accept %s:%d\nExitPolicy accept *:%d\n"
                  "ExitPolicy reject *:*\n" % (HTTP_ADDR, cfg.http_port, cfg.http_port))
        else:
            t += "ExitRelay 0\nExitPolicy reject *:*\n"
        with open(os.path.join(d, "torrc"), "w") as f:
            f.write(t)
    c = os.path.join(w, "c0")
    os.makedirs(c)
    os.chmod(c, 0o700)
    with open(os.path.join(c, "torrc"), "w") as f:
        f.write(common("c0", c) + "SocksPort 127.0.0.1:%d IsolateSOCKSAuth\nControlPort 127.0.0.1:%d\n"
                "CookieAuthentication 1\nConfluxEnabled 0\n"
                # Tor's authorities are relays too; keep the client's circuits off them so that, as in
                # Allium, exactly the 6 relays carry the traffic (directory fetches may still use them).
                "ExcludeNodes %s\n" % (socks, ctlp, ",".join("$" + fp[n] for n in names if role[n] == "authority")))

    nodes, popen = [], {}
    emu = None
    if cfg.wan_on:
        emu = start_wanem(cfg, "tor-links", ["127.0.0.1:%d=127.0.0.1:%d" % (adv[n], orp[n]) for n in names],
                          cfg.rate, os.path.join(w, "wanem.log"), client_cmdline=os.path.join(w, "c0", "torrc"))

    def start(n, r):
        d = os.path.join(w, n)
        p = PROCS.spawn(["tor", "--defaults-torrc", empty, "-f", os.path.join(d, "torrc")],
                        logpath=os.path.join(d, "stdout.log"), env=clean_env())
        popen[n] = p
        nodes.append({"name": n, "role": r, "pid": p.pid, "exit": exitf.get(n, False),
                      "log": os.path.join(d, "notice.log")})

    def check_alive():
        for n, p in popen.items():
            if p.poll() is not None:
                raise Fatal("tor %s exited (%s):\n%s" % (n, p.returncode, tail(os.path.join(w, n, "notice.log"))))

    res = {"version": version, "keygen_s": time.monotonic() - t_keys,
           "shape": "3 authorities (also relays, excluded from the client's paths) + %d relays (%d exits) + 1 client"
           % (cfg.relays, cfg.exits)}
    try:
        log("[tor] starting %d relays (3 authorities, %d exits)" % (len(names), cfg.exits))
        t_net = time.monotonic()
        for n in names:
            start(n, role[n])
        t_cons = wait_tor_network(names, dirp, cfg.exits, t_net + cfg.net_timeout, check_alive)
        res["all_in_consensus_s"] = t_cons - t_net
        res["network_ready_s"] = time.monotonic() - t_net
        log("[tor] network ready after %.1fs; starting the client" % res["network_ready_s"])
        t_client = time.monotonic()
        start("c0", "client")
        t_first = wait_first_stream(cfg, "127.0.0.1:%d" % socks, time.monotonic() + cfg.boot_timeout, check_alive)
        res["client_first_stream_from_client_start_s"] = t_first - t_client
        res["first_stream_s"] = t_first - t_net
        log("[tor] first stream %.1fs after starting the relays" % res["first_stream_s"])
        time.sleep(cfg.settle)
        cookie = os.path.join(c, "control_auth_cookie")

        def on_demand(curl, nonce):
            """Tor only: a circuit built on demand (no predicted circuits, all closed before each GET)."""
            log("[tor] %d small GETs on a circuit built on demand (predictive circuits off)" % cfg.n_tiny)
            rows = []
            try:
                ctl = TorCtl(ctlp, cookie)
                ctl.cmd("SETCONF __DisablePredictedCircuits=1")
                for k in range(cfg.n_tiny):
                    ctl.close_all_circuits()
                    rows.append(curl.get(cfg.url_tiny, "dem%s-%d" % (nonce, k), 30))
                ctl.cmd("SETCONF __DisablePredictedCircuits=0")
                ctl.close()
            except (OSError, RuntimeError, EOFError, TimeoutError) as e:
                log("[tor] on-demand variant failed: %s" % e)
            time.sleep(3)  # let tor rebuild its predicted circuits
            return {"tiny_on_demand": summarize_tiny(rows)}

        res.update(workload(cfg, "tor", "127.0.0.1:%d" % socks, nodes + http_node(cfg), on_demand))
        res["circuits"] = tor_circuits(ctlp, cookie, {fp[n]: n for n in names})
        res["nodes"] = nodes
        warn = []
        for n in names + ["c0"]:
            try:
                with open(os.path.join(w, n, "notice.log"), errors="replace") as f:
                    warn += [line.strip() for line in f if "[warn]" in line or "[err]" in line]
            except OSError:
                pass
        res["tor_warnings"] = warn[:40]
    finally:
        log("[tor] stopping the network")
        PROCS.stop(list(popen.values()))
        if emu is not None:
            res["wanem"] = stop_wanem(emu)
    return res


def tor_circuits(ctlp, cookie, nick):
    """The client's built circuits as lists of our node names (to check which relays carried traffic)."""
    paths = []
    try:
        ctl = TorCtl(ctlp, cookie)
        for line in ctl.cmd("GETINFO circuit-status"):
            f = line.split("=", 1)[1].split() if line.startswith("250-circuit-status=") else line.split()
            if len(f) >= 3 and f[1] == "BUILT" and f[2].startswith("$"):
                purpose = next((x.split("=", 1)[1] for x in f[3:] if x.startswith("PURPOSE=")), "")
                hops = [nick.get(h.lstrip("$").split("~")[0], h) for h in f[2].split(",")]
                paths.append({"path": hops, "purpose": purpose})
        ctl.close()
    except (OSError, RuntimeError, EOFError, TimeoutError) as e:
        log("[tor] GETINFO circuit-status failed: %s" % e)
    used = sorted({h for p in paths for h in p["path"]})
    return {"built": paths, "relays_used": used,
            "authorities_used": [h for h in used if h.startswith("a")]}


def http_node(cfg):
    return [{"name": "httpd", "role": "http", "pid": cfg.http_pid}]


def http_get(port, path, timeout=2.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        body = r.read(32 << 20)
        return body.decode("utf-8", "replace") if r.status == 200 else ""
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        conn.close()


def wait_tor_network(names, dirp, n_exit, deadline, check_alive):
    """Ready = a0's consensus lists every relay (and the exits) and every relay's directory cache serves
    that consensus and all the microdescriptors (else the client's first fetch from its guard can come
    back short and it retries 10 s later). Returns the time all relays were first in the consensus."""
    t_cons = None
    n_all = len(names)
    while time.monotonic() < deadline:
        check_alive()
        cons = http_get(dirp["a0"], "/tor/status-vote/current/consensus")
        nr = sum(1 for line in cons.splitlines() if line.startswith("r "))
        ne = sum(1 for line in cons.splitlines() if line.startswith("s ") and "Exit" in line.split())
        if nr >= n_all and ne >= n_exit:
            t_cons = t_cons or time.monotonic()
            ok = 0
            for n in names:
                mc = http_get(dirp[n], "/tor/status-vote/current/consensus-microdesc")
                lines = mc.splitlines()
                if sum(1 for line in lines if line.startswith("r ")) < n_all:
                    continue
                digs = "-".join(line.split()[1] for line in lines if line.startswith("m ") and len(line.split()) > 1)
                md = http_get(dirp[n], "/tor/micro/d/" + digs)
                if sum(1 for line in md.splitlines() if line.startswith("onion-key")) >= n_all:
                    ok += 1
            if ok == n_all:
                return t_cons
        time.sleep(0.5)
    raise Fatal("the tor network was not ready before the deadline")


# ----------------------------------------------------------------------------------- Allium

def allium_relay_ip(i, own_addresses):
    """Relay i's address in `allium testnet` (src/cmd/testnet/plan.rs, "Addresses"): 127.(1 + i %
    99).(i / 99).1, or 127.0.0.1 for a binary that puts every node there."""
    if not own_addresses:
        return "127.0.0.1"
    return "127.%d.%d.1" % (1 + i % 99, i // 99)


def run_allium(cfg):
    if cfg.allium_na:
        raise Fatal(cfg.allium_na)
    binp = cfg.allium_bin
    if not (os.path.isfile(binp) and os.access(binp, os.X_OK)):
        raise Fatal("%s not found: build it with `cargo build --release`" % binp)
    w = os.path.join(cfg.work, "allium")
    os.makedirs(w)
    socks_port = cfg.base_port + 70
    if not port_free("127.0.0.1", socks_port):
        raise Fatal("port 127.0.0.1:%d is busy: pick another --base-port" % socks_port)
    res = {"binary": binp, "version": first_line([binp, "--version"]),
           "binary_built_utc": datetime.datetime.fromtimestamp(os.stat(binp).st_mtime, datetime.timezone.utc)
           .strftime("%Y-%m-%d %H:%M:%S")}
    logp = os.path.join(w, "testnet.log")
    data = os.path.join(w, "data")
    argv = [binp, "testnet", "--relays", str(cfg.relays), "--exits", str(cfg.exits),
            "--socks-port", str(socks_port), "--data-dir", data]
    # binaries from before `--ready-timeout` (e.g. a baseline) keep their built-in limit
    helptext = subprocess.run([binp, "testnet", "--help"], capture_output=True, text=True).stdout
    if "--ready-timeout" in helptext:
        argv += ["--ready-timeout", str(int(cfg.boot_timeout))]
    emu = None
    if cfg.wan_on:
        # relay i listens on BASE+80+i of its address and advertises the emulator on BASE+150+i
        # of the same address (binaries with --single-address give relay i its own loopback
        # address; older ones put every relay on 127.0.0.1)
        own = "--single-address" in helptext
        real, via = cfg.base_port + 80, cfg.base_port + 150
        for i in range(cfg.relays):
            for port in (real + i, via + i):
                if not port_free(allium_relay_ip(i, own), port):
                    raise Fatal("port %s:%d is busy: pick another --base-port"
                                % (allium_relay_ip(i, own), port))
        argv += ["--relay-port-base", str(real), "--advertise-port-base", str(via)]
        emu = start_wanem(cfg, "allium-links",
                          ["%s:%d=%s:%d" % (allium_relay_ip(i, own), via + i, allium_relay_ip(i, own), real + i)
                           for i in range(cfg.relays)], cfg.rate,
                          os.path.join(w, "wanem.log"), client_cmdline=os.path.join(data, "proxy.toml"))
    res["argv"] = argv
    log("[allium] %s" % " ".join(argv))
    t0 = time.monotonic()
    p = PROCS.spawn(argv, logpath=logp, env=dict(clean_env(), RUST_BACKTRACE="1"))
    kids = []

    def check_alive():
        if p.poll() is not None:
            raise Fatal("allium testnet exited with status %s:\n%s" % (p.returncode, tail(logp)))

    try:
        socks = "127.0.0.1:%d" % socks_port
        t_first = wait_first_stream(cfg, socks, t0 + cfg.boot_timeout, check_alive)
        res["first_stream_s"] = t_first - t0
        log("[allium] first stream %.1fs after launch" % res["first_stream_s"])
        info, deadline = None, time.monotonic() + 30
        jpath = os.path.join(data, "testnet.json")
        while time.monotonic() < deadline and info is None:
            check_alive()
            try:
                with open(jpath) as f:
                    info = json.load(f)
            except (OSError, ValueError):
                time.sleep(0.2)
        if info is None:
            raise Fatal("%s did not appear within 30 s of the first stream" % jpath)
        res["testnet_json"] = info
        res["ready_secs_reported"] = info.get("ready_secs")
        if info.get("socks") != socks:
            log("[allium] WARNING: testnet.json says socks=%r, expected %s" % (info.get("socks"), socks))
        nodes = []
        for n in info.get("nodes", []):
            pid = n.get("pid")
            if isinstance(pid, int) and pid > 1 and alive(pid):
                PROCS.adopt(pid)
                kids.append(pid)
                nodes.append({"name": str(n.get("name")), "role": str(n.get("role")), "pid": pid,
                              "exit": bool(n.get("exit")), "log": n.get("log")})
        shape = {r: sum(1 for n in nodes if n["role"] == r) for r in ("authority", "relay", "client")}
        res["shape"] = "%d authorities + %d relays (%d exits) + %d client" % (
            shape["authority"], shape["relay"], sum(1 for n in nodes if n["exit"]), shape["client"])
        if shape != {"authority": 3, "relay": cfg.relays, "client": 1}:
            log("[allium] WARNING: unexpected shape %s" % res["shape"])
        if not nodes:
            raise Fatal("testnet.json lists no live node processes")
        time.sleep(cfg.settle)
        nodes.append({"name": "testnet", "role": "supervisor", "pid": p.pid, "exit": False, "log": logp})
        res.update(workload(cfg, "allium", socks, nodes + http_node(cfg)))
        res["nodes"] = nodes
    finally:
        log("[allium] stopping the test network")
        PROCS.stop([p], kids, grace=10.0)
        res["log_tail"] = tail(logp, 10)
        if emu is not None:
            res["wanem"] = stop_wanem(emu)
    return res


# ----------------------------------------------------------------------------------- report

def dig(d, *path):
    for k in path:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def verdict(key, a, t):
    if key not in ACTIVE_GOALS:
        return ""
    op, v = ACTIVE_GOALS[key]
    if op == "abs<":
        return "< %g s: %s" % (v, "n/a" if a is None else "PASS" if a < v else "FAIL")
    if op == "abs<=":
        return "Allium ≤ %g: %s" % (v, "n/a" if a is None else "PASS" if a <= v else "FAIL")
    if a is None or t is None or t == 0:
        return "%s %gx: n/a" % (op.replace(">=", "≥").replace("<=", "≤"), v)
    r = a / t
    ok = r >= v if op == ">=" else r <= v
    return "%s %gx: %s" % (op.replace(">=", "≥").replace("<=", "≤"), v, "PASS" if ok else "FAIL")


def table(out):
    global ACTIVE_GOALS
    wan = (out.get("meta") or {}).get("wan_ms_one_way")
    ACTIVE_GOALS = GOALS_WAN if wan is not None else GOALS
    A, T, D = out.get("allium") or {}, out.get("tor") or {}, out.get("direct") or {}
    rows = []

    def row(label, path, fmt, key=None, ratio=True, count=None):
        """count: (ok field, total field) under path[0]; a value from failed requests is marked."""
        a, t = dig(A, *path), dig(T, *path)
        fa = fmt % a if isinstance(a, (int, float)) else "n/a"
        ft = fmt % t if isinstance(t, (int, float)) else "n/a"
        r = "%.2f" % (a / t) if ratio and isinstance(a, (int, float)) and isinstance(t, (int, float)) and t else "—"
        g = verdict(key, a if isinstance(a, (int, float)) else None, t if isinstance(t, (int, float)) else None)
        bad = []
        if count:
            for name, side in (("Allium", A), ("Tor", T)):
                ok, n = dig(side, path[0], count[0]), dig(side, path[0], count[1])
                if isinstance(ok, int) and isinstance(n, int) and ok < n:
                    bad.append(name)
                    if side is A:
                        fa += " (%d/%d ok)" % (ok, n)
                    else:
                        ft += " (%d/%d ok)" % (ok, n)
        if bad:
            g = "INVALID, failed requests on %s; %s" % (" and ".join(bad), g)
        rows.append((label, fa, ft, r, g))
        out["figures"][label] = {"allium": a, "tor": t, "goal": g}

    mb = out["meta"]["bulk_mib"]
    row("1 x %d MiB, one circuit, MiB/s" % mb, ("bulk_1", "mib_s"), "%.1f", "bulk_1", count=("complete", "streams"))
    row("%d x %d MiB, %d isolated circuits, aggregate MiB/s" % (out["meta"]["n_par"], mb, out["meta"]["n_par"]),
        ("bulk_par", "mib_s"), "%.1f", "bulk_par", count=("complete", "streams"))
    row("small GET, new circuit each (build + first byte), median ms", ("tiny_new", "ttfb_ms_median"), "%.1f",
        "tiny_new", count=("ok", "n"))
    row("small GET, one reused circuit, first byte median ms", ("tiny_reuse", "ttfb_ms_median"), "%.1f", "tiny_reuse",
        count=("ok", "n"))
    row("relay CPU (sum of the %d relays), s per MiB, bulk phases" % out["meta"]["relays"],
        ("cpu_bulk", "relays_cpu_s_per_mib"), "%.4f", "relay_cpu")
    row("  1-circuit phase alone", ("cpu_bulk_1", "relays_cpu_s_per_mib"), "%.4f")
    row("  %d-circuit phase alone" % out["meta"]["n_par"], ("cpu_bulk_par", "relays_cpu_s_per_mib"), "%.4f")
    row("authority CPU (sum of 3), s per MiB, bulk phases", ("cpu_bulk", "authorities_cpu_s_per_mib"), "%.4f")
    row("client CPU, s per MiB, bulk phases", ("cpu_bulk", "client_cpu_s_per_mib"), "%.4f")
    row("peak RSS, largest relay, MiB", ("rss", "max_by_role", "relay"), "%.1f", "relay_rss")
    row("peak RSS, largest authority, MiB", ("rss", "max_by_role", "authority"), "%.1f")
    row("peak RSS, client, MiB", ("rss", "max_by_role", "client"), "%.1f")
    row("start until the first stream, s", ("first_stream_s",), "%.1f", "first_stream")
    row("machine CPU busy during the 8-circuit phase, cores", ("cpu_bulk_par", "machine_busy_cores"), "%.2f",
        ratio=False)
    row("  of which other users of the machine, cores", ("cpu_bulk_par", "others_busy_cores"), "%.2f", ratio=False)
    if dig(A, "fairness") or dig(T, "fairness"):
        row("interactive GET every 200 ms, first byte median ms, alone", ("fairness", "alone", "ttfb_ms_median"),
            "%.1f")
        row("  the same beside one bulk download (same guard)", ("fairness", "with_bulk", "ttfb_ms_median"), "%.1f")
        row("  with bulk / alone", ("fairness", "ratio"), "%.2f", "fairness", ratio=False)
    dem = dig(T, "tiny_on_demand", "ttfb_ms_median")
    if dem is not None:
        rows.append(("Tor only: small GET, circuit built on demand, median ms", "—", "%.1f" % dem, "—", "info"))
    # the ceiling: the same server with no overlay; it must be far faster than either network
    for label, k in (("1", "bulk_1"), (str(out["meta"]["n_par"]), "bulk_par")):
        d = dig(D, k, "mib_s")
        best = max([x for x in (dig(A, k, "mib_s"), dig(T, k, "mib_s")) if isinstance(x, (int, float))] or [0])
        head = d / best if d and best else None
        ok = "n/a" if head is None else ("OK, %.0fx" % head if head >= 10 else "WARN, only %.1fx" % head)
        rows.append(("ceiling: %s x %d MiB direct, no overlay, MiB/s" % (label, mb),
                     "%.0f" % d if d else "n/a", "%.0f" % d if d else "n/a", "—", "server ≥ 10x faster: " + ok))
        out["figures"]["ceiling_%s" % k] = {"direct_mib_s": d, "headroom": head}
    d = dig(D, "tiny", "ttfb_ms_median")
    rows.append(("ceiling: small GET direct, median ms", "%.2f" % d if d else "n/a", "%.2f" % d if d else "n/a",
                 "—", ""))
    hdr = ("metric", "Allium", "Tor %s" % (T.get("version") or ""), "ratio A/T",
           "goal (issue 9, %g ms per link%s)" % (wan, ", %g Mbit/s" % out["meta"]["rate_mbit"]
                                                 if out["meta"].get("rate_mbit") else "")
           if wan is not None else "goal (issue 5)")
    lines = ["| " + " | ".join(hdr) + " |", "|" + "|".join(["---"] + ["---:"] * 3 + ["---"]) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def disturbance(out):
    """Warnings when other users of the machine took CPU during a bulk phase."""
    warn = []
    for side in ("allium", "tor"):
        for ph in ("cpu_bulk_1", "cpu_bulk_par"):
            o = dig(out.get(side), ph, "others_busy_cores")
            b = dig(out.get(side), ph, "machine_busy_cores")
            ncpu = (out.get("meta") or {}).get("ncpu") or 2
            # others only disturb when they take CPU the network could have used: the machine was full
            if isinstance(o, (int, float)) and isinstance(b, (int, float)) and o > DISTURBED_CORES \
                    and b > 0.95 * ncpu:
                warn.append("during %s's %s phase the machine was saturated and other processes used %.2f of its "
                            "%d cores: %s's figures are probably disturbed. Rerun when the machine is quiet%s."
                            % (side, ph[4:], o, ncpu, side, ", or with --nice -10" if not
                               (out.get("meta") or {}).get("nice") else ""))
    out["disturbed"] = warn
    return warn


def machine_meta(cfg):
    m = {"utc": cfg.stamp, "host_cpu": "", "ncpu": os.cpu_count(), "kernel": platform.release(),
         "python": platform.python_version(), "bulk_mib": cfg.bulk_mib, "n_par": cfg.n_par, "n_tiny": cfg.n_tiny,
         "relays": cfg.relays, "exits": cfg.exits, "http_target": "%s:%d" % (HTTP_ADDR, cfg.http_port),
         "nice": os.nice(0), "allium_cargo_args": os.environ.get("ALLIUM_CARGO_ARGS", ""),
         "build_skipped": os.environ.get("SKIP_BUILD", "0") == "1",
         "wan_ms_one_way": cfg.wan if cfg.wan_on else None, "rate_mbit": cfg.rate or None,
         "loss_pct": cfg.loss or None, "rate_scope": cfg.rate_scope if cfg.rate else None,
         "web_handshake": cfg.web_handshake if cfg.wan_on else None}
    try:
        with open("/proc/cpuinfo") as f:
            m["host_cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            m["mem_total_gib"] = round(int(f.readline().split()[1]) / 1048576, 1)
        with open("/proc/loadavg") as f:
            m["loadavg_start"] = " ".join(f.read().split()[:3])
    except (OSError, ValueError, IndexError):
        pass
    try:
        m["curl"] = run(["curl", "--version"], 10).stdout.decode().splitlines()[0]
        g = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], 10).stdout.decode().strip()
        dirty = run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"], 20).stdout.strip()
        m["allium_commit"] = g + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired, IndexError):
        pass
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("tor", "allium", "both"), default="both")
    ap.add_argument("--allium-bin", default=os.path.join(ROOT, "target", "release", "allium"))
    ap.add_argument("--allium-na", metavar="REASON", help="do not run Allium; its column reads n/a (REASON)")
    ap.add_argument("--base-port", type=int, default=27000,
                    help="ports BASE..BASE+70 on 127.0.0.1/.2 (with --wan: up to BASE+160)")
    ap.add_argument("--bulk-mib", type=int, default=100)
    ap.add_argument("--n-par", type=int, default=8)
    ap.add_argument("--n-tiny", type=int, default=20)
    ap.add_argument("--relays", type=int, default=6)
    ap.add_argument("--exits", type=int, default=2)
    ap.add_argument("--settle", type=float, default=5.0, help="quiet seconds after the first stream")
    ap.add_argument("--net-timeout", type=float, default=150.0, help="tor network readiness deadline, s")
    ap.add_argument("--boot-timeout", type=float, default=120.0, help="deadline for the first stream, s")
    ap.add_argument("--bulk-timeout", type=int, default=300, help="per bulk download, s")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory (all logs)")
    ap.add_argument("--perf", action="store_true",
                    help="after the measured phases, profile one more parallel phase with perf (not in the table)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run the driver and everything it starts at this nice value (e.g. -10, needs root) so that "
                         "other users of a shared machine disturb the measurement less")
    ap.add_argument("--table", metavar="JSON", help="only print the table of an earlier results file")
    ap.add_argument("--wan", type=float, default=None, metavar="MS",
                    help="one-way delay of every inter-node link (bench/wanem.py), ms")
    ap.add_argument("--rate", type=float, default=0.0, metavar="MBIT",
                    help="with --wan: rate cap of every OR link, per direction, Mbit/s")
    ap.add_argument("--rate-scope", choices=("all", "guard"), default="all",
                    help="--rate on every OR link, or only on the client's links to its guard")
    ap.add_argument("--loss", type=float, default=0.0, metavar="PCT",
                    help="with --wan: segment loss (emulated as stalls), percent")
    ap.add_argument("--fairness", action="store_true",
                    help="add the interactive-vs-bulk workload (run it with --wan, --rate 20 --rate-scope guard)")
    ap.add_argument("--n-interactive", type=int, default=20, help="GETs of the fairness workload, per case")
    ap.add_argument("--fair-ramp", type=float, default=3.0, help="seconds the bulk download runs before measuring")
    ap.add_argument("--web-handshake", action="store_true",
                    help="with --wan, hold a new connection's first bytes to the web server for an emulated TCP "
                         "handshake (only an exit that writes right after connect() pays it: see docs/BENCHMARKS.md)")
    ap.add_argument("--fairness-only", action="store_true",
                    help="run only the fairness workload (implies --fairness; no bulk or latency phases)")
    cfg = ap.parse_args()
    cfg.fairness = cfg.fairness or cfg.fairness_only
    cfg.wan_on = cfg.wan is not None or cfg.rate > 0 or cfg.loss > 0
    if cfg.wan is None:
        cfg.wan = 0.0
    cfg.wan_or_port = lambda p: p + 100  # Tor: the emulator of ORPort p
    cfg.http_emu = None
    if cfg.table:
        with open(cfg.table) as f:
            out = json.load(f)
        out["figures"] = {}
        print(table(out))
        for w in disturbance(out):
            print("\nWARNING: " + w)
        return 0
    if not 1024 <= cfg.base_port <= 65000:
        ap.error("--base-port must be in 1024..65000")
    top = cfg.base_port + (160 if cfg.wan_on else 70)
    if cfg.base_port < 61000 and top >= 32768:
        log("WARNING: ports %d..%d overlap the kernel's ephemeral range (32768-60999): an outgoing "
            "connection may take one of them first; a --base-port below %d avoids it"
            % (cfg.base_port, top, 32768 - (top - cfg.base_port)))
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    cfg.stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    cfg.bulk_bytes = cfg.bulk_mib * 1048576
    cfg.http_port = cfg.base_port + 62
    cfg.url_tiny = "http://%s:%d/tiny" % (HTTP_ADDR, cfg.http_port)
    cfg.url_bulk = "http://%s:%d/bulk" % (HTTP_ADDR, cfg.http_port)
    if cfg.nice:
        try:
            os.nice(cfg.nice)
        except OSError as e:
            sys.exit("--nice %d: %s (negative values need root)" % (cfg.nice, e))
    cfg.work = tempfile.mkdtemp(prefix="allium-compare.")
    for b in ("tor", "tor-gencert", "curl"):
        if cfg.only != "allium" and not shutil.which(b):
            sys.exit("missing %s: run bench/compare-tor.sh (it installs Debian's tor and curl)" % b)
    out = {"meta": machine_meta(cfg), "figures": {}}
    out["meta"]["fairness_only"] = cfg.fairness_only
    rc = 0
    try:
        serve_payloads(cfg)
        out["direct"] = {} if cfg.fairness_only else direct(cfg)
        for side, fn in (("tor", run_tor), ("allium", run_allium)):
            if cfg.only not in (side, "both"):
                out[side] = None
                continue
            try:
                out[side] = fn(cfg)
            except (Fatal, OSError, subprocess.SubprocessError) as e:
                log("[%s] n/a: %s" % (side, e))
                out[side] = {"error": str(e)}
                rc = 1
        if cfg.http_emu is not None:
            out["wanem_web"] = stop_wanem(cfg.http_emu)
        with open("/proc/loadavg") as f:
            out["meta"]["loadavg_end"] = " ".join(f.read().split()[:3])
        out["meta"]["wall_s"] = time.monotonic() - T_START
        txt = table(out)
        out["table_markdown"] = txt
        os.makedirs(cfg.results, exist_ok=True)
        path = os.path.join(cfg.results, "compare-%s.json" % cfg.stamp)
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        m = out["meta"]
        built = dig(out, "allium", "binary_built_utc")
        print("\nAllium (tree %s%s) vs Tor, %s, %d vCPU, kernel %s, %s UTC; load avg %s -> %s\n" % (
            m.get("allium_commit", "?"), ", binary built %s UTC" % built if built else "", m.get("host_cpu"),
            m.get("ncpu") or 0, m.get("kernel"), m["utc"], m.get("loadavg_start"), m.get("loadavg_end")))
        print(txt)
        for side in ("allium", "tor"):
            if isinstance(out.get(side), dict) and out[side].get("error"):
                print("\n%s: n/a, %s" % (side, out[side]["error"].splitlines()[0]))
        for w in disturbance(out):
            print("\nWARNING: " + w)
        print("\nresults: %s" % os.path.relpath(path))
    except KeyboardInterrupt as e:
        log("interrupted (%s): stopping everything" % e)
        rc = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        PROCS.stop()
        if cfg.keep:
            log("kept %s" % cfg.work)
        else:
            shutil.rmtree(cfg.work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
