#!/usr/bin/env python3
"""Attack suite: honest throughput, memory and survival of an `allium testnet` under attack.

For every attack a fresh test network starts (3 authorities, 3 relays of which 1 exit, a proxy;
every circuit crosses every relay), then:

  1. baseline: the honest client (127.0.0.1) downloads /bytes/N through the SOCKS port, a new
     SOCKS username per download (a new circuit each time), for --secs seconds;
  2. the attack starts from 127.0.0.77; after --ramp seconds, and once the attack has reached
     its steady state (dest_never_reads: its uploads have filled every window and stopped;
     `ramp_secs` in the JSON), the same honest measurement runs again while the attack goes on;
     then the attack stops;
  3. recovery: one more short honest measurement.

Each attack reports honest throughput during / without (the fraction), peak RSS of every node
(sampled from /proc every 0.2 s) during the baseline and during the attack, whether any node
died, the attack's own counters (connections held, closed by the server, cells answered...), and
the CPU each process used during the baseline and during the attack, in cores (`cpu_cores_*`:
every node, the supervisor that serves the honest download, this script, the attack's own
process), which tells an attack that costs the relays CPU from one that costs the attacker CPU
on the same machine, or from a machine loaded by something else.

Attacks (--only NAME, repeatable; default all):
  conn_flood         TCP connections to every relay's OR port, held and reopened (--conns per relay)
  create_flood       real links to the exit, CREATE cells with a fresh onionskin each
  create_replay      the same, one onionskin replayed under new circuit ids
  slowloris          --slow connections on every TCP listener (OR, SOCKS, HTTP CONNECT, control,
                     metrics, authority HTTP), each trickling a plausible request 1 byte at a time
  client_never_reads --readers SOCKS streams downloading a huge object, never reading
  dest_never_reads   --writers SOCKS streams uploading into a server that accepts and never reads
  garbage            random bytes on every TCP port (4 connections each, reopened) and random
                     datagrams on the DNS port

    python3 bench/attack/run.py [--only NAME] [--secs N] [--allium PATH]

The two attacks through SOCKS (client_never_reads, dest_never_reads) use the attacker's own
`allium proxy` on the same network, with its SOCKS port on 127.0.0.77 and
`outbound_bind_address = "127.0.0.77"` (guard links and directory fetches from that address);
--shared-proxy sends them through the honest proxy instead (a local user of the same proxy).

Needs python3 (stdlib) and a release `allium` binary (default $CARGO_TARGET_DIR/release/allium,
else target/release/allium; `cargo build --release --bin allium`). The CREATE floods and the
socket attacks (conn_flood, slowloris, garbage) are Rust examples (bench/attack/create_flood.rs,
bench/attack/swarm.rs), taken from beside the allium binary
(`cargo build --release --example create_flood --example swarm`), else built with
`cargo build --example NAME` when absent. Writes bench/results/attack-<UTC stamp>.json and prints
a Markdown table; `--table FILE` prints the table of an earlier run.
"""

import argparse
import datetime
import json
import multiprocessing
import os
import pathlib
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]
ATTACKER = "127.0.0.77"
# Nice value of the attack processes (--attacker-nice).
ATTACKER_NICE = 0
HONEST = "127.0.0.1"
MIB = 1024 * 1024
RELAY_RSS_GOAL_MIB = 256
# Longest wait, after --ramp, for an attack to reach its steady state (Attack.settled).
MAX_SETTLE_S = 60


def target_dir():
    return pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def parse_addr(s):
    host, port = s.rsplit(":", 1)
    return host.strip("[]"), int(port)


# ---------------------------------------------------------------------------------------------
# The test network


class Testnet:
    """`allium testnet` as a child process; nodes and listeners from its testnet.json."""

    def __init__(self, allium, workdir, relays=3, exits=1):
        self.allium = allium
        self.relays_n = relays
        self.exits_n = exits
        self.dir = pathlib.Path(workdir) / "net"
        self.proc = None
        self.info = None
        self.attacker_proxy = None

    def start(self, timeout=150):
        self.log = open(self.dir.parent / "testnet.out", "w")
        self.proc = subprocess.Popen(
            [str(self.allium), "testnet", "--relays", str(self.relays_n), "--exits",
             str(self.exits_n), "--socks-port", "0",
             "--data-dir", str(self.dir)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        path = self.dir / "testnet.json"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"allium testnet exited ({self.proc.returncode}); see "
                                   f"{self.dir.parent / 'testnet.out'}")
            if path.exists():
                try:
                    self.info = json.loads(path.read_text())
                    break
                except json.JSONDecodeError:
                    pass
            time.sleep(0.2)
        else:
            raise RuntimeError("the test network was not ready in time")
        self.nodes = [n for n in self.info["nodes"]]
        self.socks = parse_addr(self.info["socks"])
        self.http_target = parse_addr(self.info["http_target"])

    def relay_dir(self, node):
        cfg = tomllib.loads((self.dir / f"{node['name']}.toml").read_text())
        return cfg["data_dir"]

    def relays(self):
        return [n for n in self.nodes if n["role"] == "relay"]

    def exit_relay(self):
        return next(n for n in self.relays() if n["exit"])

    def tcp_listeners(self):
        """(label, kind, (host, port)) of every TCP listener of every node."""
        out = []
        for n in self.nodes:
            for kind, a in n.get("addrs", {}).items():
                if kind == "dns":
                    continue
                out.append((f"{n['name']}/{kind}", kind, parse_addr(a)))
            if n.get("control_port"):
                out.append((f"{n['name']}/control", "control", parse_addr(n["control_port"])))
        return out

    def dns(self):
        return parse_addr(self.info["dns"]) if self.info.get("dns") else None

    def dead(self):
        """Names of nodes whose process is gone (or a zombie)."""
        out = []
        for n in self.nodes:
            try:
                stat = pathlib.Path(f"/proc/{n['pid']}/stat").read_text()
                state = stat.rsplit(")", 1)[1].split()[0]
                if state in ("Z", "X"):
                    out.append(n["name"])
            except (OSError, IndexError):
                out.append(n["name"])
        if self.proc.poll() is not None:
            out.append("testnet")
        return out

    def stop(self):
        if self.attacker_proxy is not None:
            self.attacker_proxy.stop()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # Any node the supervisor left behind (by pid, only the ones it started).
        for n in self.nodes or []:
            try:
                stat = pathlib.Path(f"/proc/{n['pid']}/cmdline").read_bytes()
                if b"allium" in stat:
                    os.kill(n["pid"], signal.SIGKILL)
            except OSError:
                pass
        self.log.close()


def rss_kib(pid):
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def cpu_secs(pid):
    """CPU time (user + system, seconds) a process has used so far, or None."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class CpuMeter:
    """CPU used per process over a phase, in cores (CPU seconds / wall seconds): every node, the
    test-network supervisor (which serves the honest download), this script (the honest client
    and the Python attacks' threads) and an attack's own process."""

    def __init__(self, tn, attack=None):
        self.tn = tn
        self.attack = attack

    def pids(self):
        out = {n["name"]: n["pid"] for n in self.tn.nodes}
        out["testnet"] = self.tn.proc.pid
        out["run.py"] = os.getpid()
        proc = getattr(self.attack, "proc", None)
        if proc is not None:
            out[f"{self.attack.name}-process"] = proc.pid
        return out

    def start(self):
        self.t0 = time.monotonic()
        self.c0 = {k: cpu_secs(p) for k, p in self.pids().items()}

    def cores(self):
        el = max(time.monotonic() - self.t0, 1e-3)
        out = {}
        for k, p in self.pids().items():
            c, c0 = cpu_secs(p), self.c0.get(k)
            if c is not None:
                out[k] = round((c - (c0 or 0.0)) / el, 2)
        return dict(sorted(out.items()))


class RssSampler(threading.Thread):
    """Peak RSS per node over phases, sampled every 0.2 s."""

    def __init__(self, tn):
        super().__init__(daemon=True)
        self.tn = tn
        self.phase = "start"
        self.peaks = {}
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            ph = self.peaks.setdefault(self.phase, {})
            for n in self.tn.nodes:
                r = rss_kib(n["pid"])
                if r is not None and r > ph.get(n["name"], 0):
                    ph[n["name"]] = r
            self.stop_ev.wait(0.2)

    def mib(self, phase):
        return {k: round(v / 1024, 1) for k, v in sorted(self.peaks.get(phase, {}).items())}


# ---------------------------------------------------------------------------------------------
# The honest client


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed during the SOCKS exchange")
        buf += chunk
    return bytes(buf)


def socks_connect(proxy, host, port, user, password, source, timeout):
    """SOCKS5 with username/password (a new username is a new circuit); returns the socket."""
    s = socket.create_connection(proxy, timeout=timeout, source_address=(source, 0))
    try:
        s.sendall(b"\x05\x01\x02")
        if recv_exact(s, 2) != b"\x05\x02":
            raise ConnectionError("proxy refused username/password authentication")
        u, p = user.encode(), password.encode()
        s.sendall(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        if recv_exact(s, 2)[1] != 0:
            raise ConnectionError("proxy refused the credentials")
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port))
        head = recv_exact(s, 4)
        if head[1] != 0:
            raise ConnectionError(f"SOCKS reply {head[1]}")
        atyp = head[3]
        rest = {1: 4, 4: 16}.get(atyp)
        if rest is None:
            rest = recv_exact(s, 1)[0]
        recv_exact(s, rest + 2)
        return s
    except BaseException:
        s.close()
        raise


def download(proxy, target, size, timeout=20.0, source=HONEST):
    """One GET /bytes/size through the proxy; returns body bytes received (raises on failure)."""
    user = "honest-%016x" % random.getrandbits(64)
    s = socks_connect(proxy, target[0], target[1], user, "x", source, timeout)
    try:
        s.settimeout(timeout)
        s.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        head = b""
        got = 0
        while True:
            n = s.recv_into(view)
            if n == 0:
                break
            if head is not None:
                head += bytes(view[:n])
                i = head.find(b"\r\n\r\n")
                if i < 0:
                    if len(head) > 8192:
                        raise ConnectionError("no end of headers")
                    continue
                got = len(head) - i - 4
                head = None
            else:
                got += n
            if got >= size:
                break
        if got < size:
            raise ConnectionError(f"short body: {got} of {size} bytes")
        return got
    finally:
        s.close()


def measure(tn, secs, size):
    """Honest downloads back to back for `secs`, in a forked process of their own: the attacks
    that run inside this script (connection floods, slowloris, garbage) are Python threads, and
    sharing one interpreter lock with them would slow the honest client by the attacker's Python
    work, not by anything the network does (an honest client is another machine)."""
    ctx = multiprocessing.get_context("fork")
    rx, tx = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_measure_child, args=(tx, tn.socks, tn.http_target, secs, size))
    p.start()
    tx.close()
    try:
        res = rx.recv()
    except EOFError:
        res = {"mib_per_s": 0.0, "secs": 0.0, "downloads": 0, "failed": 1,
               "errors": [f"measuring process died (exit {p.exitcode})"]}
    p.join()
    return res


def _measure_child(tx, socks, http_target, secs, size):
    tx.send(_measure(socks, http_target, secs, size))
    tx.close()


def _measure(socks, http_target, secs, size):
    t0 = time.monotonic()
    total = 0
    ok = failed = 0
    errors = []
    while time.monotonic() - t0 < secs:
        try:
            total += download(socks, http_target, size)
            ok += 1
        except (OSError, ConnectionError) as e:
            failed += 1
            if len(errors) < 5:
                errors.append(str(e) or type(e).__name__)
            time.sleep(0.2)
    el = time.monotonic() - t0
    return {"mib_per_s": round(total / MIB / el, 2), "secs": round(el, 2), "downloads": ok,
            "failed": failed, "errors": errors}


# ---------------------------------------------------------------------------------------------
# Attacks


class Attack:
    name = "?"
    shared = False

    def prepare(self, tn):
        """Set up before the baseline (an attacker's own proxy)."""

    def start(self, tn):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def settled(self):
        """Whether the attack has reached its steady state (polled every 0.5 s after --ramp,
        for at most MAX_SETTLE_S, before the honest measurement under attack starts)."""
        return True

    def mark(self, phase):
        """Called as the honest measurement under attack starts and ends ("start", "end"):
        attacks with a byte count snapshot it, so the JSON shows what flowed while measured."""

    def result(self):
        return {}


def free_port(host):
    s = socket.socket()
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class AttackerProxy:
    """A second `allium proxy` on the test network for the attacks that go through SOCKS: its
    SOCKS port and every connection it makes (guard links, directory fetches) on ATTACKER, so
    the relays see the attacker as one address and the honest proxy (127.0.0.1) as another."""

    OVERRIDDEN = ("socks_listen", "data_dir", "control_port", "cookie_authentication",
                  "http_tunnel_port", "dns_port", "metrics_address", "outbound_bind_address")

    def __init__(self, tn, extra=None, addr=ATTACKER, name="attacker-proxy"):
        self.tn = tn
        self.extra = extra or {}
        self.addr = addr
        self.name = name
        self.proc = None

    def start(self, timeout=90):
        d = self.tn.dir / self.name
        d.mkdir(parents=True, exist_ok=True)
        self.socks = (self.addr, free_port(self.addr))
        self.metrics = (HONEST, free_port(HONEST))
        text = (self.tn.dir / "proxy.toml").read_text()
        keep = []
        top = True
        for line in text.splitlines():
            if line.startswith("["):
                top = False
            key = line.split("=", 1)[0].strip()
            if top and (key in self.OVERRIDDEN or key in self.extra):
                continue
            keep.append(line)
        head = [
            f'socks_listen = "{self.socks[0]}:{self.socks[1]}"',
            f'data_dir = "{d / "data"}"',
            f'metrics_address = "{self.metrics[0]}:{self.metrics[1]}"',
            f'outbound_bind_address = "{self.addr}"',
        ] + [f"{k} = {json.dumps(v)}" for k, v in self.extra.items()]
        cfg = d / "proxy.toml"
        cfg.write_text("\n".join(head + keep) + "\n")
        self.log = open(d / "proxy.log", "w")
        self.proc = subprocess.Popen([str(self.tn.allium), "proxy", "--config", str(cfg)],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.tn.nodes.append({"name": self.name, "role": self.name, "pid": self.proc.pid,
                              "addrs": {"metrics": f"{self.metrics[0]}:{self.metrics[1]}"}})
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {d / 'proxy.log'}")
            try:
                s = socks_connect(self.socks, self.tn.http_target[0], self.tn.http_target[1],
                                  "probe", "x", self.addr, 10)
                s.close()
                return
            except (OSError, ConnectionError) as e:
                last = e
                time.sleep(0.5)
        raise RuntimeError(f"{self.name} carried no stream in {timeout} s: {last}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def metrics_text(self):
        try:
            with socket.create_connection(self.metrics, timeout=3) as s:
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            return data.decode(errors="replace")
        except OSError:
            return ""


def own_proxy(tn, shared):
    """The SOCKS address an attack going through SOCKS uses: the honest proxy (--shared-proxy,
    a local user of the same proxy) or an attacker's proxy on ATTACKER."""
    if shared:
        return tn.socks
    if tn.attacker_proxy is None:
        tn.attacker_proxy = AttackerProxy(tn)
        tn.attacker_proxy.start()
    return tn.attacker_proxy.socks


def hard_close(s):
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    s.close()


class Swarm(Attack):
    """Many attacker sockets on a set of TCP listeners: the Rust example bench/attack/swarm.rs
    (one tokio thread; as a Python selector thread the same attack used 0.5-0.8 of a core in the
    interpreter, taken from the two cores the honest client is measured on).

    mode "hold": connect and keep (connection flood); "trickle": send the next byte of the
    listener's slow prefix every `interval` s (slowloris); "garbage": write random bytes as fast
    as the socket takes them. Sockets the server closes are counted and reopened (at most
    `reopen_per_s` per listener per second)."""

    def __init__(self, name, per_target, mode, exe, interval=3.0, reopen_per_s=500):
        self.name = name
        self.per_target = per_target
        self.mode = mode
        self.exe = exe
        self.interval = interval
        self.reopen_per_s = reopen_per_s
        self.udp = None
        self.res = {}

    def targets(self, tn):
        return tn.tcp_listeners()

    def start(self, tn):
        cmd = [str(self.exe), "--mode", self.mode, "--per-target", str(self.per_target),
               "--interval", str(self.interval), "--reopen-per-s", str(self.reopen_per_s),
               "--secs", str(self.secs + MAX_SETTLE_S), "--source", ATTACKER]
        for (label, kind, (host, port)) in self.targets(tn):
            cmd += ["--target", f"{label},{kind},{host}:{port}"]
        if self.udp:
            cmd += ["--udp", f"{self.udp[0]}:{self.udp[1]}"]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=(lambda: os.nice(ATTACKER_NICE)) if ATTACKER_NICE else None)

    def stop(self):
        self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        try:
            self.res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.res = {"error": (err or out)[-500:], "listeners": {},
                        "held_at_end_total": 0, "max_held_total": 0}

    def result(self):
        return self.res


class ConnFlood(Swarm):
    def __init__(self, conns, exe):
        super().__init__("conn_flood", conns, "hold", exe, reopen_per_s=2000)

    def targets(self, tn):
        return [(f"{n['name']}/or", "or", parse_addr(n["addrs"]["or"])) for n in tn.relays()]


class Slowloris(Swarm):
    def __init__(self, conns, interval, exe):
        super().__init__("slowloris", conns, "trickle", exe, interval=interval, reopen_per_s=200)


class Garbage(Swarm):
    """Random bytes on every TCP listener, and about 2,000 random datagrams a second on the DNS
    port."""

    def __init__(self, exe):
        super().__init__("garbage", 4, "garbage", exe, reopen_per_s=20)

    def start(self, tn):
        self.udp = tn.dns()
        super().start(tn)


class CreateFlood(Attack):
    """The Rust example bench/attack/create_flood.rs against the exit (on every circuit)."""

    def __init__(self, mode, links, exe):
        self.name = "create_flood" if mode == "fresh" else "create_replay"
        self.mode = mode
        self.links = links
        self.exe = exe

    def start(self, tn, secs=None):
        ex = tn.exit_relay()
        self.target = ex["name"]
        self.proc = subprocess.Popen(
            [str(self.exe), "--target", ex["addrs"]["or"], "--relay-dir", tn.relay_dir(ex),
             "--source", ATTACKER, "--links", str(self.links), "--secs", str(self.secs),
             "--mode", self.mode],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=(lambda: os.nice(ATTACKER_NICE)) if ATTACKER_NICE else None)

    def stop(self):
        try:
            out, err = self.proc.communicate(timeout=self.secs + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        try:
            self.res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.res = {"error": (err or out)[-500:]}

    def result(self):
        return {"target": self.target, **self.res}


class ClientNeverReads(Attack):
    """SOCKS streams that ask for a huge object and never read a byte."""

    name = "client_never_reads"

    def __init__(self, n, shared):
        self.n = n
        self.shared = shared
        self.socks = []
        self.errors = 0

    def prepare(self, tn):
        self.proxy = own_proxy(tn, self.shared)

    def start(self, tn):
        for i in range(self.n):
            try:
                s = socks_connect(self.proxy, tn.http_target[0], tn.http_target[1],
                                  f"reader-{i}", "x", ATTACKER, 20)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.sendall(b"GET /bytes/17179869184 HTTP/1.1\r\nHost: t\r\n\r\n")
                self.socks.append(s)
            except (OSError, ConnectionError):
                self.errors += 1

    def stop(self):
        for s in self.socks:
            hard_close(s)

    def result(self):
        return {"streams": len(self.socks), "failed_to_open": self.errors}


class DestNeverReads(Attack):
    """Streams uploading as fast as they can into a server that accepts and never reads."""

    name = "dest_never_reads"

    def __init__(self, n, shared):
        self.n = n
        self.shared = shared
        self.stop_ev = threading.Event()
        self.sent = 0
        self.errors = 0
        self.accepted = []
        self.marks = {}
        self.last_sample = None

    def settled(self):
        # Steady state: every stream's windows and queues are full and the upload has stopped
        # (under 1 MiB/s). Until then the attack is 400 bulk uploads competing for the same
        # two cores, which is load, not the attack (holding a relay's memory with data that
        # never leaves).
        now, sent = time.monotonic(), self.sent
        prev, self.last_sample = self.last_sample, (now, sent)
        if prev is None:
            return False
        return (sent - prev[1]) / MIB / max(now - prev[0], 1e-3) < 1.0

    def mark(self, phase):
        self.marks[phase] = (time.monotonic(), self.sent)

    def prepare(self, tn):
        self.proxy = own_proxy(tn, self.shared)

    def start(self, tn):
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.lsock.bind((HONEST, 0))
        self.lsock.listen(4096)
        self.sink = self.lsock.getsockname()
        threading.Thread(target=self.accept_loop, daemon=True).start()
        self.socks = []
        for i in range(self.n):
            try:
                s = socks_connect(self.proxy, self.sink[0], self.sink[1], f"writer-{i}", "x",
                                  ATTACKER, 20)
                s.setblocking(False)
                self.socks.append(s)
            except (OSError, ConnectionError):
                self.errors += 1
        self.thread = threading.Thread(target=self.write_loop, daemon=True)
        self.thread.start()

    def accept_loop(self):
        self.lsock.settimeout(0.5)
        while not self.stop_ev.is_set():
            try:
                c, _ = self.lsock.accept()
                self.accepted.append(c)  # held, never read
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                break

    def write_loop(self):
        sel = selectors.DefaultSelector()
        for s in self.socks:
            sel.register(s, selectors.EVENT_WRITE)
        junk = os.urandom(65536)
        while not self.stop_ev.is_set():
            for key, _ in sel.select(timeout=0.1):
                try:
                    self.sent += key.fileobj.send(junk)
                except BlockingIOError:
                    pass
                except OSError:
                    sel.unregister(key.fileobj)
        sel.close()

    def stop(self):
        self.stop_ev.set()
        self.thread.join(timeout=10)
        for s in self.socks + self.accepted:
            hard_close(s)
        self.lsock.close()

    def result(self):
        return {"streams": len(self.socks), "failed_to_open": self.errors,
                "sink_connections": len(self.accepted),
                "mib_accepted_by_proxy": round(self.sent / MIB, 1),
                "mib_per_s_accepted_while_measured": self.rate_while_measured()}

    def rate_while_measured(self):
        if "start" not in self.marks or "end" not in self.marks:
            return None
        (t0, b0), (t1, b1) = self.marks["start"], self.marks["end"]
        return round((b1 - b0) / MIB / max(t1 - t0, 1e-9), 2)


# ---------------------------------------------------------------------------------------------


def make_attack(name, a, exes):
    return {
        "conn_flood": lambda: ConnFlood(a.conns, exes["swarm"]),
        "create_flood": lambda: CreateFlood("fresh", a.links, exes["create_flood"]),
        "create_replay": lambda: CreateFlood("replay", a.links, exes["create_flood"]),
        "slowloris": lambda: Slowloris(a.slow, a.trickle, exes["swarm"]),
        "client_never_reads": lambda: ClientNeverReads(a.readers, a.shared_proxy),
        "dest_never_reads": lambda: DestNeverReads(a.writers, a.shared_proxy),
        "garbage": lambda: Garbage(exes["swarm"]),
    }[name]()


ATTACKS = ["conn_flood", "create_flood", "create_replay", "slowloris", "client_never_reads",
           "dest_never_reads", "garbage"]


def run_attack(name, a, allium, exes):
    with tempfile.TemporaryDirectory(prefix=f"allium-attack-{name}-") as work:
        tn = Testnet(allium, work)
        try:
            tn.start()
            sampler = RssSampler(tn)
            sampler.start()
            time.sleep(a.settle)
            attack = make_attack(name, a, exes)
            attack.prepare(tn)
            sampler.phase = "baseline"
            cpu = CpuMeter(tn)
            cpu.start()
            base = measure(tn, a.secs, a.size)
            cpu_base = cpu.cores()
            attack.secs = a.ramp + a.secs + 2
            sampler.phase = "attack"
            t0 = time.monotonic()
            attack.start(tn)
            time.sleep(max(0.0, a.ramp - (time.monotonic() - t0)))
            while not attack.settled() and time.monotonic() - t0 < a.ramp + MAX_SETTLE_S:
                time.sleep(0.5)
            ramp_secs = round(time.monotonic() - t0, 1)
            cpu = CpuMeter(tn, attack)
            cpu.start()
            attack.mark("start")
            during = measure(tn, a.secs, a.size)
            attack.mark("end")
            cpu_during = cpu.cores()
            dead_during = tn.dead()
            attack.stop()
            sampler.phase = "recovery"
            time.sleep(2)
            after = measure(tn, min(a.secs, 5), a.size)
            dead = sorted(set(dead_during) | set(tn.dead()))
            sampler.stop_ev.set()
            sampler.join()
            rss_attack = sampler.mib("attack")
            relay_names = {n["name"] for n in tn.relays()}
            relay_peak = max((v for k, v in rss_attack.items() if k in relay_names), default=0)
            frac = round(during["mib_per_s"] / base["mib_per_s"], 3) if base["mib_per_s"] else None
            return {
                "attack": name,
                "honest_without": base,
                "honest_during": during,
                "honest_after": after,
                "fraction": frac,
                "ramp_secs": ramp_secs,
                "rss_mib_baseline": sampler.mib("baseline"),
                "rss_mib_attack": rss_attack,
                "rss_mib_recovery": sampler.mib("recovery"),
                "relay_peak_rss_mib": relay_peak,
                "cpu_cores_baseline": cpu_base,
                "cpu_cores_attack": cpu_during,
                "died": dead,
                "attack_stats": attack.result(),
                "passes": {
                    "throughput_80pct": frac is not None and frac >= 0.8,
                    "no_node_died": not dead,
                    f"relay_rss_under_{RELAY_RSS_GOAL_MIB}mib": relay_peak < RELAY_RSS_GOAL_MIB,
                },
            }
        except Exception as e:  # one failed attack must not lose the others' figures
            return {"attack": name, "error": f"{type(e).__name__}: {e}",
                    "testnet_log_tail": tail(pathlib.Path(work) / "testnet.out")}
        finally:
            tn.stop()


def tail(p, n=20):
    try:
        return p.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def table(doc):
    lines = [
        "| attack | honest MiB/s without | during | fraction | failed downloads | peak RSS MiB "
        "(max relay / proxy / max authority) | died | attack |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in doc["results"]:
        if "error" in r:
            lines.append(f"| {r['attack']} | | | | | | | error: {r['error']} |")
            continue
        rss = r["rss_mib_attack"]
        auth = max((v for k, v in rss.items() if k.startswith("auth")), default=0)
        st = r["attack_stats"]
        if r["attack"] in ("conn_flood", "slowloris", "garbage"):
            what = (f"held max {st['max_held_total']}, end {st['held_at_end_total']}; closed by "
                    f"server {sum(v['closed_by_server'] for v in st['listeners'].values())}, "
                    f"refused {sum(v['refused'] for v in st['listeners'].values())}")
        elif r["attack"].startswith("create"):
            what = (f"{st.get('creates_per_sec', '?')} CREATE/s sent, "
                    f"{st.get('created_per_sec', '?')} CREATED/s, "
                    f"{st.get('destroy_received', '?')} DESTROY, "
                    f"{st.get('links_closed_by_relay', '?')} links closed")
        else:
            what = ", ".join(f"{k} {v}" for k, v in st.items())
        lines.append(
            f"| {r['attack']} | {r['honest_without']['mib_per_s']} | "
            f"{r['honest_during']['mib_per_s']} | {r['fraction']} | "
            f"{r['honest_during']['failed']} | {r['relay_peak_rss_mib']} / "
            f"{rss.get('proxy', '?')} / {auth} | {', '.join(r['died']) or 'none'} | {what} |")
    return "\n".join(lines)


def git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[2:]))
    ap.add_argument("--only", action="append", choices=ATTACKS, help="run only this attack")
    ap.add_argument("--secs", type=float, default=15, help="each honest measurement, seconds")
    ap.add_argument("--ramp", type=float, default=3, help="attack time before measuring")
    ap.add_argument("--settle", type=float, default=3, help="wait after the network is ready")
    ap.add_argument("--size", type=int, default=16 * MIB, help="honest download size, bytes")
    ap.add_argument("--conns", type=int, default=4000, help="conn_flood: per relay")
    ap.add_argument("--links", type=int, default=4, help="create floods: links")
    ap.add_argument("--slow", type=int, default=400, help="slowloris: per listener")
    ap.add_argument("--trickle", type=float, default=3.0, help="slowloris: seconds per byte")
    ap.add_argument("--readers", type=int, default=64, help="client_never_reads: streams")
    ap.add_argument("--writers", type=int, default=400, help="dest_never_reads: streams")
    ap.add_argument("--shared-proxy", action="store_true",
                    help="SOCKS attacks through the honest proxy (a local user of it) instead "
                    "of an attacker's own proxy on 127.0.0.77")
    ap.add_argument("--attacker-nice", type=int, default=0,
                    help="run the attack processes at this nice value: on the real network "
                         "the attacker has its own machine; here it shares the 2 cores whose "
                         "CPU bounds honest throughput (the relays' cost is the same either way)")
    ap.add_argument("--allium", type=pathlib.Path, default=None)
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. main)")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--table", type=pathlib.Path, help="print the table of a JSON file and exit")
    a = ap.parse_args()
    global ATTACKER_NICE
    ATTACKER_NICE = a.attacker_nice
    if a.table:
        print(table(json.loads(a.table.read_text())))
        return 0
    allium = a.allium or target_dir() / "release" / "allium"
    if not allium.exists():
        sys.exit(f"{allium} not found: run `cargo build --release --bin allium` or pass --allium")
    names = a.only or ATTACKS
    # The attack tools (Rust examples): a release build beside the allium binary, else a debug
    # one, else build the debug one.
    exes = {}
    for ex, users in (("create_flood", ("create_flood", "create_replay")),
                      ("swarm", ("conn_flood", "slowloris", "garbage"))):
        exe = allium.parent / "examples" / ex
        if not exe.exists():
            exe = target_dir() / "debug" / "examples" / ex
        if any(n in users for n in names) and not exe.exists():
            print(f"building {ex} (cargo build --example {ex})", file=sys.stderr)
            subprocess.run(["cargo", "build", "--example", ex], cwd=ROOT, check=True)
        exes[ex] = exe
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    doc = {
        "date": stamp,
        "label": a.label,
        "commit": git("rev-parse", "HEAD"),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "allium": str(allium),
        "params": {k: (str(v) if isinstance(v, pathlib.Path) else v)
                   for k, v in vars(a).items() if k not in ("table",)},
        "loadavg_start": os.getloadavg(),
        "results": [],
    }
    out = a.out or ROOT / "bench" / "results" / f"attack-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"attack {name} ...", file=sys.stderr, flush=True)
        r = run_attack(name, a, allium, exes)
        doc["results"].append(r)
        doc["loadavg_end"] = os.getloadavg()
        out.write_text(json.dumps(doc, indent=2) + "\n")
        if "error" in r:
            print(f"  error: {r['error']}", file=sys.stderr)
        else:
            print(f"  honest {r['honest_without']['mib_per_s']} -> "
                  f"{r['honest_during']['mib_per_s']} MiB/s ({r['fraction']}), relay peak "
                  f"{r['relay_peak_rss_mib']} MiB, died: {r['died'] or 'none'}", file=sys.stderr)
    print(table(doc))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
