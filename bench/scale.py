#!/usr/bin/env python3
"""Scale benchmark (issue 11): a large Allium test network plus many client proxies. Run by hand.

usage: python3 bench/scale.py [--allium PATH] [--relays 1000] [--exits 50] [--clients 200]
                              [--periods 30] [--ready-timeout 900] [--diff-tool PATH] [--out FILE]

Starts `allium testnet --relays N` (3 authorities, N relays, its own proxy; each its own process),
then M more client proxies (`allium proxy`), client i with its SOCKS port and every outbound
connection on 127.(i+1).255.1 (`socks_listen`, `outbound_bind_address`: an address and a /24 of
its own; `allium testnet` leaves 127.x.255.0/24 to such clients, its relays sit on
127.(1 + i % 99).(i / 99).1 and its authorities on 127.100.0.1 to 127.102.0.1). It reports:
  - time until every client proxy carries a stream (a SOCKS5 GET of the test page through it);
  - the consensus size (compressed, as served at `/allium/v1/consensus.z`) per relay;
  - the size of a consensus diff after one voting period and after the whole window
    (`consensus_diff`, an example of the directory crate: apply(diff) is checked too);
  - authority CPU (utime + stime from /proc/<pid>/stat, in cores; all relays and all client
    proxies together too) and bytes written by each authority process (/proc/<pid>/io `wchar`: sockets and files) per voting period, over a
    window of P voting periods after every client is ready;
  - TCP connections from the client proxies' addresses to any authority's directory port, before
    and after each client's own bootstrap (every 4-tuple seen in /proc/net/tcp, sampled every
    second; a closed connection stays listed in TIME_WAIT for 60 s, so none is missed);
  - the directory counters that relays, clients and authorities export on their /metrics pages
    (summed: every metric whose name contains "dir" on the relays and client proxies, e.g. the
    clients' `allium_dir_fetches_total{source="guard"|"fallback"|"authority"}`; every
    authority metric).
Every process is started here and stopped by PID; every wait is bounded; traffic stays on loopback.
The JSON goes to bench/results/scale-<UTC time>.json (or --out) and to stdout.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TICK = os.sysconf("SC_CLK_TCK")
VOTING_INTERVAL = 2.0  # src/cmd/testnet: VOTING_INTERVAL_SECS


def log(msg):
    print(f"scale: {msg}", file=sys.stderr, flush=True)


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_total(pids):
    """utime + stime of every listed process that still runs (seconds)."""
    t = 0.0
    for pid in pids:
        try:
            t += cpu_secs(pid)
        except (OSError, ValueError, IndexError):
            pass
    return t


def wchar(pid):
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def http_get(addr, path, timeout=20.0, tries=20):
    """GET; a 503 or 429 (an authority whose connection slots are full under 1,000 relays'
    uploads, or that rate-limits this address) is retried, at most `tries` times in all."""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(f"http://{addr}{path}", timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code not in (429, 503) or attempt == tries - 1:
                raise
            time.sleep(min(0.25 * (attempt + 1), 2.0))
    raise OSError("unreachable")


def metrics(addr):
    """Prometheus text -> {name{labels}: value} (comments skipped)."""
    out = {}
    try:
        text = http_get(addr, "/metrics", timeout=5.0).decode("utf-8", "replace")
    except OSError:
        return out
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(" ", 1)
        if len(parts) == 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


def socks_get(proxy, host, port, timeout=15.0):
    """One GET of http://host:port/ through a SOCKS5 proxy (no authentication)."""
    with socket.create_connection(proxy, timeout=timeout) as s:
        s.sendall(b"\x05\x01\x00")
        if s.recv(2) != b"\x05\x00":
            raise OSError("proxy refused no-auth")
        h = host.encode()
        s.sendall(b"\x05\x01\x00\x03" + bytes([len(h)]) + h + struct.pack(">H", port))
        rep = s.recv(4)
        if len(rep) < 2 or rep[1] != 0:
            raise OSError(f"CONNECT refused ({rep[1:2].hex() or 'eof'})")
        atyp = rep[3] if len(rep) > 3 else 1
        s.recv({1: 4, 4: 16}.get(atyp, 0) + 2 if atyp != 3 else s.recv(1)[0] + 2)
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = s.recv(64)
        if not data.startswith(b"HTTP/1."):
            raise OSError("no HTTP reply")


def parse_proc_tcp():
    """Every IPv4 TCP 4-tuple in /proc/net/tcp as ((lip, lport), (rip, rport))."""
    out = []
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                p = line.split()
                if len(p) < 4:
                    continue
                out.append((hexaddr(p[1]), hexaddr(p[2])))
    except OSError:
        pass
    return out


def hexaddr(s):
    ip, port = s.split(":")
    b = bytes.fromhex(ip)[::-1]
    return (".".join(str(x) for x in b), int(port, 16))


class TcpWatch(threading.Thread):
    """Samples /proc/net/tcp every second; remembers when each client->authority 4-tuple was
    first seen."""

    def __init__(self, auth_addrs, client_ips):
        super().__init__(daemon=True)
        self.auth = set(auth_addrs)
        self.clients = set(client_ips)
        self.seen = {}  # (client_ip, client_port, auth) -> first seen (monotonic)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            now = time.monotonic()
            for a, b in parse_proc_tcp():
                for (lo, re_) in ((a, b), (b, a)):
                    if re_ in self.auth and lo[0] in self.clients:
                        self.seen.setdefault((lo[0], lo[1], re_), now)
            self.stop.wait(1.0)


def strip_keys(text, keys, tables=("onion_service",)):
    """Drop top-level `key = ...` lines (single-line values) for the given keys, and every
    `[[table]]` of `tables` (the testnet's proxy runs the network's onion service: a client
    started from its configuration must not run a second copy of it from the same keys)."""
    pat = re.compile(r"^(%s)\s*=" % "|".join(map(re.escape, keys)))
    drop_tables = {f"[[{t}]]" for t in tables} | {f"[{t}]" for t in tables}
    out = []
    in_top = True
    dropping = False
    for line in text.splitlines():
        if line.startswith("["):
            in_top = False
            dropping = line.strip() in drop_tables
        if dropping or (in_top and pat.match(line)):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def find_diff_tool(arg):
    if arg:
        return [arg]
    tdir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    for prof in ("release", "debug"):
        p = os.path.join(tdir, prof, "examples", "consensus_diff")
        if os.access(p, os.X_OK):
            return [p]
    return ["cargo", "run", "-q", "-p", "allium-directory", "--example", "consensus_diff", "--"]


def diff_sizes(tool, old, new, tmp):
    a, b = os.path.join(tmp, "old.bin"), os.path.join(tmp, "new.bin")
    with open(a, "wb") as f:
        f.write(old)
    with open(b, "wb") as f:
        f.write(new)
    r = subprocess.run(tool + [a, b], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return {"error": "exit %s: %s" % (r.returncode, r.stderr.strip()[-500:])}
    return json.loads(r.stdout.strip().splitlines()[-1])


def listed(tool, doc, tmp):
    """How many relays consensus `doc` lists (the diff tool against itself), or None."""
    return diff_sizes(tool, doc, doc, tmp).get("relays")


def next_consensus(auth_dir, current, timeout):
    """Poll until the authority serves a consensus other than `current`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            c = http_get(auth_dir, "/allium/v1/consensus")
            if c != current:
                return c
        except OSError:
            pass
        time.sleep(0.2)
    return None


def stop_pid(p, grace=30.0):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--allium", default=None, help="the allium binary (default: target dir)")
    ap.add_argument("--relays", type=int, default=1000)
    ap.add_argument("--exits", type=int, default=None, help="default: relays / 10, at least 2")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--periods", type=int, default=30, help="voting periods measured")
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument("--diff-tool", default=None, help="a built consensus_diff example")
    ap.add_argument("--out", default=None)
    ap.add_argument("--auth-nice", type=int, default=0,
                    help="renice the three authority processes to this (e.g. -10): in a real "
                         "network each runs on its own host; here 1,200 processes share 2 cores "
                         "and a 2 s voting schedule misses its deadlines without it (their CPU "
                         "time, the figure reported, does not depend on it)")
    args = ap.parse_args()
    if not 1 <= args.clients <= 250:
        sys.exit("--clients must be 1..250 (one 127.x.255.1 each)")
    exits = args.exits or max(2, args.relays // 10)
    allium = args.allium
    if not allium:
        tdir = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        for prof in ("release", "debug"):
            p = os.path.join(tdir, prof, "allium")
            if os.access(p, os.X_OK):
                allium = p
                break
    if not allium:
        sys.exit("no allium binary: build it (cargo build --release --bin allium) or pass --allium")
    diff_tool = find_diff_tool(args.diff_tool)

    tmp = tempfile.mkdtemp(prefix="allium-scale-")
    data = os.path.join(tmp, "net")
    result = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "allium": allium,
        "relays": args.relays,
        "exits": exits,
        "clients": args.clients,
        "voting_interval_s": VOTING_INTERVAL,
        "cores": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0],
    }
    procs = []
    net = None
    watch = None
    try:
        t_net = time.monotonic()
        net_log = open(os.path.join(tmp, "testnet.log"), "w")
        net = subprocess.Popen(
            [allium, "testnet", "--relays", str(args.relays), "--exits", str(exits),
             "--socks-port", "0", "--data-dir", data,
             "--ready-timeout", str(int(args.ready_timeout))],
            stdout=net_log, stderr=subprocess.STDOUT, start_new_session=True)
        info_path = os.path.join(data, "testnet.json")
        while not os.path.exists(info_path):
            if net.poll() is not None:
                raise RuntimeError(f"allium testnet exited ({net.returncode}); see {tmp}/testnet.log")
            if time.monotonic() - t_net > args.ready_timeout:
                raise RuntimeError("the test network was not ready in time")
            time.sleep(1.0)
        time.sleep(0.5)
        with open(info_path) as f:
            info = json.load(f)
        result["network_ready_s"] = round(time.monotonic() - t_net, 1)
        result["testnet_ready_secs_reported"] = info.get("ready_secs")
        log(f"network of {args.relays} relays ready in {result['network_ready_s']} s")
        auths = [n for n in info["nodes"] if n["role"] == "authority"]
        if args.auth_nice:
            for n in auths:
                # Linux applies a nice value per thread: every thread of the process.
                for tid in os.listdir(f"/proc/{n['pid']}/task"):
                    os.setpriority(os.PRIO_PROCESS, int(tid), args.auth_nice)
            log(f"authorities reniced to {args.auth_nice}")
        result["auth_nice"] = args.auth_nice
        relays = [n for n in info["nodes"] if n["role"] == "relay"]
        auth_dirs = [n["addrs"]["dir"] for n in auths]
        auth_addrs = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in auth_dirs]
        http_host, http_port = info["http_target"].rsplit(":", 1)

        # Client proxies.
        with open(os.path.join(data, "proxy.toml")) as f:
            base_cfg = strip_keys(f.read(), [
                "socks_listen", "data_dir", "control_port", "control_socket",
                "cookie_authentication", "http_tunnel_port", "dns_port", "metrics_address",
                "outbound_bind_address"])
        ips = [f"127.{i + 1}.255.1" for i in range(args.clients)]
        watch = TcpWatch(auth_addrs, ips)
        watch.start()
        t0 = time.monotonic()
        for i, ip in enumerate(ips):
            d = os.path.join(tmp, "clients", f"c{i}")
            os.makedirs(d)
            cfg = (f'socks_listen = "{ip}:9050"\ndata_dir = "{d}"\n'
                   f'outbound_bind_address = "{ip}"\nmetrics_address = "{ip}:9052"\n'
                   + base_cfg)
            path = os.path.join(d, "proxy.toml")
            with open(path, "w") as f:
                f.write(cfg)
            lf = open(os.path.join(d, "proxy.log"), "w")
            procs.append(subprocess.Popen([allium, "proxy", "--config", path], stdout=lf,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        ready = {}
        errors = {}

        def wait_client(i):
            end = t0 + args.ready_timeout
            while time.monotonic() < end:
                if procs[i].poll() is not None:
                    errors[i] = f"exited {procs[i].returncode}"
                    return
                try:
                    socks_get((ips[i], 9050), http_host, int(http_port))
                    ready[i] = time.monotonic()
                    return
                except OSError as e:
                    errors[i] = str(e)
                time.sleep(0.5)

        threads = [threading.Thread(target=wait_client, args=(i,), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times = sorted(v - t0 for v in ready.values())
        result["clients_ready"] = len(ready)
        result["clients_ready_all_s"] = round(times[-1], 1) if len(ready) == args.clients else None
        result["clients_ready_median_s"] = round(times[len(times) // 2], 1) if times else None
        result["clients_not_ready_errors"] = sorted(
            {errors[i] for i in range(args.clients) if i not in ready and i in errors})[:5]
        log(f"{len(ready)}/{args.clients} clients ready; last after {result['clients_ready_all_s']} s")

        result["loadavg_clients_ready"] = os.getloadavg()[0]
        # The measurement window: P voting periods with every client up.
        window = args.periods * VOTING_INTERVAL
        # Diffs measure churn only once the consensus has stopped growing: wait (bounded) until
        # it lists every relay, or the same number three periods running.
        first = http_get(auth_dirs[0], "/allium/v1/consensus")
        counts = [listed(diff_tool, first, tmp)]
        end = time.monotonic() + 60 * VOTING_INTERVAL
        while (time.monotonic() < end and (counts[-1] or 0) < args.relays
               and not (len(counts) >= 3 and len(set(counts[-3:])) == 1)):
            nxt = next_consensus(auth_dirs[0], first, 6 * VOTING_INTERVAL)
            if nxt:
                first = nxt
                counts.append(listed(diff_tool, first, tmp))
        log(f"consensus lists {counts[-1]} relays before the window (history {counts})")
        # The bandwidth scanner's first pass turns unmeasured weights into measured ones relay
        # by relay: not steady state either. Wait (bounded) for its first complete scan.
        bw_log = os.path.join(data, "bwscan.log")
        end = time.monotonic() + 150 * VOTING_INTERVAL
        scans = []
        while time.monotonic() < end and os.path.exists(bw_log):
            with open(bw_log, errors="replace") as f:
                scans = [int(m) for m in re.findall(r"scan done measured=(\d+)", f.read())]
            if any(n >= args.relays for n in scans):
                break
            time.sleep(1.0)
        result["bwscan_scans_before_window"] = scans
        log(f"bandwidth scans done before the window: {scans}")
        if scans:
            # Two more periods, so every authority has voted the file.
            time.sleep(3 * VOTING_INTERVAL)
        result["consensus_relays_before_window"] = counts
        first = http_get(auth_dirs[0], "/allium/v1/consensus")
        # CPU and bytes from here on: the window only (taken before the waits above, they
        # counted the waits' minutes against the window's 60 s; runs of 2026-12-01 04:41 and
        # 06:45 UTC were affected).
        c_start = {n["pid"]: cpu_secs(n["pid"]) for n in auths}
        w_start = {n["pid"]: wchar(n["pid"]) for n in auths}
        relay_pids = [n["pid"] for n in relays]
        client_pids = [p.pid for p in procs]
        r_start, cl_start = cpu_total(relay_pids), cpu_total(client_pids)
        t_w = time.monotonic()
        one = next_consensus(auth_dirs[0], first, 6 * VOTING_INTERVAL)
        time.sleep(max(0.0, window - (time.monotonic() - t_w)))
        elapsed = time.monotonic() - t_w
        result["loadavg_window_end"] = os.getloadavg()[0]
        c_end = {n["pid"]: cpu_secs(n["pid"]) for n in auths}
        w_end = {n["pid"]: wchar(n["pid"]) for n in auths}
        result["relays_cores_total"] = round((cpu_total(relay_pids) - r_start) / elapsed, 3)
        result["clients_cores_total"] = round((cpu_total(client_pids) - cl_start) / elapsed, 3)
        periods = elapsed / VOTING_INTERVAL
        result["window_s"] = round(elapsed, 1)
        result["authority_cores"] = [round((c_end[p] - c_start[p]) / elapsed, 4) for p in c_start]
        result["authority_bytes_written_per_period"] = [
            None if w_start[p] is None else round((w_end[p] - w_start[p]) / periods)
            for p in w_start]
        last = http_get(auth_dirs[0], "/allium/v1/consensus")
        z = http_get(auth_dirs[0], "/allium/v1/consensus.z")
        result["consensus_raw_bytes"] = len(last)
        result["consensus_z_bytes"] = len(z)
        # The documents themselves, for a closer look (kept with the logs).
        for name, doc in (("first", first), ("one", one), ("last", last)):
            if doc:
                with open(os.path.join(tmp, f"consensus-{name}.bin"), "wb") as f:
                    f.write(doc)
        if one:
            result["diff_one_period"] = diff_sizes(diff_tool, first, one, tmp)
        result["diff_window"] = diff_sizes(diff_tool, first, last, tmp)
        n_listed = result["diff_window"].get("relays") or args.relays
        result["consensus_relays_listed"] = n_listed
        result["consensus_z_bytes_per_relay"] = round(len(z) / max(1, n_listed), 1)

        # Connections from client addresses to authority ports.
        time.sleep(1.5)
        watch.stop.set()
        watch.join(timeout=5)
        ip_index = {ip: i for i, ip in enumerate(ips)}
        before = after = 0
        per_client_after = {}
        for (ip, _port, _auth), seen in watch.seen.items():
            i = ip_index[ip]
            if i in ready and seen > ready[i] + 1.0:
                after += 1
                per_client_after[ip] = per_client_after.get(ip, 0) + 1
            else:
                before += 1
        result["client_conns_to_authorities_during_bootstrap"] = before
        result["client_conns_to_authorities_after_bootstrap"] = after
        result["clients_with_authority_conns_after_bootstrap"] = len(per_client_after)

        # Directory-cache counters, as exported.
        relay_dir = {}
        for n in relays:
            m = n["addrs"].get("metrics")
            if not m:
                continue
            for k, v in metrics(m).items():
                if "dir" in k.split("{")[0]:
                    relay_dir[k] = relay_dir.get(k, 0.0) + v
        result["relay_dir_metrics_sum"] = relay_dir
        client_dir = {}
        for ip in ips:
            for k, v in metrics(f"{ip}:9052").items():
                if "dir" in k.split("{")[0]:
                    client_dir[k] = client_dir.get(k, 0.0) + v
        result["client_dir_metrics_sum"] = client_dir
        result["authority_metrics"] = [metrics(n["addrs"]["metrics"]) for n in auths
                                       if n["addrs"].get("metrics")]
        result["loadavg_end"] = os.getloadavg()[0]
    finally:
        if watch:
            watch.stop.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        if net:
            stop_pid(net, grace=120.0)
    out = args.out or os.path.join(
        HERE, "results", "scale-" + time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime()) + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    log(f"wrote {out}; logs kept in {tmp}")
    if os.environ.get("SCALE_KEEP_LOGS") != "1":
        shutil.rmtree(os.path.join(tmp, "clients"), ignore_errors=True)


if __name__ == "__main__":
    main()
