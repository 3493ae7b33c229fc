#!/usr/bin/env python3
"""A userspace WAN link emulator for the comparison harness (issue 9): TCP forwarders that add
a one-way delay per direction, an optional rate cap and optional loss (emulated as stalls).

    python3 bench/wanem.py --map 127.0.0.1:30001=127.0.0.1:20001 [--map ...] \\
        --delay MS [--delay-back MS] [--rate MBIT] [--loss PCT] [--buffer-ms MS]
    python3 bench/wanem.py selftest [--delay MS] [--rate MBIT]     # prints the RTT it adds

Why a tool of our own: this machine's kernel has no netem qdisc (only tbf and htb), so tc-based
emulators (netem, pynetem, netemu) cannot run; toxiproxy is a Go service not packaged in Debian,
and trickle shapes rate only (LD_PRELOAD), not delay.

Model of one link direction (a FIFO, never reordered):
  a chunk read at time t waits for the link (`free`), is serialised at the rate cap
  (start = max(t, free); free = start + len/rate), then propagates for the one-way delay and is
  written at start + len/rate + delay. Chunks due within half a millisecond are written together.
  The queue waiting for serialisation (the bottleneck buffer) holds at most --buffer-ms of the
  rate; past it the emulator stops reading the sender, whose TCP then backs off, as a router
  queue would make it. Bytes in propagation are capped at --max-inflight-mib (a receive window).
  Loss: each 1448-byte segment is "lost" with probability PCT/100; a loss stalls that direction
  (this chunk and everything behind it) for one round trip plus 10 ms, as a fast retransmit does.
  With a rate cap the emulator's own sockets get a small receive buffer (10 ms of the rate, at
  least 64 KiB), so that a paused direction backs up into the sender instead of into a kernel
  buffer of megabytes.
  A new connection costs one round trip before the target sees data (the TCP handshake): the
  target is dialled one delay after the accept, and the first bytes leave no earlier than three
  delays after it. On loopback the target is dialled from the dialler's own address (bound before
  connect), so each node of a test network keeps its 127.x source address through the emulator.

--rate-from SUBSTRING limits the rate cap to the connections dialled by a process whose command
line contains SUBSTRING (found through /proc at accept time): e.g. the client's links to its
guard, so that the guard link is the one bottleneck of a fairness run.

Each --map is its own listener; every accepted connection is its own link (two directions with
their own rate caps). One process, one asyncio loop, Protocol callbacks (no task per chunk),
standard library only. On SIGTERM/SIGINT it prints one JSON line of counters to stdout and exits.
"""
import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

SEGMENT = 1448
READ_CHUNK = 256 * 1024
COALESCE = 0.0005


class Stats:
    def __init__(self):
        self.conns = 0
        self.bytes = 0
        self.writes = 0
        self.stalls = 0
        self.paused = 0
        self.capped = 0


STATS = Stats()


def _hexaddr(addr):
    """/proc/net/tcp's form of an IPv4 (host, port): little-endian hex address, hex port."""
    a = socket.inet_aton(addr[0])
    return "%08X:%04X" % (int.from_bytes(a, "little"), addr[1])


def dialled_by(peer, local, needle):
    """Whether the socket at `peer` that connected to our `local` belongs to a process whose
    command line contains `needle`."""
    try:
        want_l, want_r = _hexaddr(peer), _hexaddr(local)
        inode = None
        with open("/proc/net/tcp") as f:
            for line in f:
                x = line.split()
                if len(x) > 9 and x[1] == want_l and x[2] == want_r:
                    inode = x[9]
                    break
        if inode is None:
            return False
        target = "socket:[%s]" % inode
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if needle.encode() not in f.read():
                        continue
                for fd in os.listdir("/proc/%s/fd" % pid):
                    if os.readlink("/proc/%s/fd/%s" % (pid, fd)) == target:
                        return True
            except OSError:
                continue
    except (OSError, ValueError, TypeError, IndexError):
        return False
    return False


class Direction:
    """One direction of one link: a FIFO of (due, bytes | None for EOF)."""

    def __init__(self, loop, cfg, delay, not_before=0.0):
        self.loop = loop
        self.delay = delay
        self.rate = cfg.rate * 1e6 / 8.0 if cfg.rate > 0 else 0.0  # bytes/s, 0 = no cap
        self.loss = cfg.loss / 100.0
        self.rtt = cfg.delay / 1000.0 + cfg.delay_back / 1000.0
        self.buffer = self.rate * cfg.buffer_ms / 1000.0 if self.rate else 0.0
        self.max_inflight = cfg.max_inflight_mib * 1048576
        self.not_before = not_before
        self.free = 0.0          # when the serialiser is next free
        self.stall_until = 0.0
        self.queue = []          # list of [due, data]; popped from the front via self.head
        self.head = 0
        self.queued = 0          # bytes in the queue
        self.src = None          # transport we read from
        self.dst = None          # transport we write to (None until connected)
        self.timer = None        # the next flush
        self.rtimer = None       # the next check whether reading may resume
        self.paused = False
        self.closed = False

    # -- input
    def feed(self, data):
        now = self.loop.time()
        n = len(data)
        if self.rate:
            start = max(now, self.free)
            self.free = start + n / self.rate
            due = self.free + self.delay
        else:
            due = now + self.delay
        if self.loss and random.random() < 1.0 - (1.0 - self.loss) ** max(1, n // SEGMENT):
            self.stall_until = max(self.stall_until, now + self.rtt + 0.010)
            STATS.stalls += 1
        due = max(due, self.stall_until + self.delay if self.stall_until > now else 0.0,
                  self.not_before)
        if self.queue and self.head < len(self.queue):
            due = max(due, self.queue[-1][0])  # never reorder
        self.queue.append([due, data])
        self.queued += n
        self._check_pause(now)
        self._arm()

    def eof(self):
        due = max(self.loop.time() + self.delay, self.not_before)
        if self.queue and self.head < len(self.queue):
            due = max(due, self.queue[-1][0])
        self.queue.append([due, None])
        self._arm()

    def _backlog(self, now):
        """Bytes waiting for the serialiser (the bottleneck queue)."""
        return max(0.0, self.free - now) * self.rate if self.rate else 0.0

    def _check_pause(self, now):
        held = self.queued + (self.dst.get_write_buffer_size() if self.dst else 0)
        over = held > self.max_inflight or (self.rate and self._backlog(now) > self.buffer)
        if over and not self.paused and self.src is not None:
            self.paused = True
            STATS.paused += 1
            self.src.pause_reading()

    def _maybe_resume(self, now):
        if not self.paused or self.src is None:
            return
        held = self.queued + (self.dst.get_write_buffer_size() if self.dst else 0)
        if held <= self.max_inflight // 2 and (not self.rate or self._backlog(now) <= self.buffer / 2):
            self.paused = False
            try:
                self.src.resume_reading()
            except (RuntimeError, AttributeError):
                pass
        elif self.rate and self.rtimer is None:
            # Re-check when the serialiser will have drained half the buffer.
            wait = max(0.001, (self._backlog(now) - self.buffer / 2) / self.rate)
            self.rtimer = self.loop.call_at(now + wait, self._resume_check)

    def _resume_check(self):
        self.rtimer = None
        if not self.closed:
            self._maybe_resume(self.loop.time())

    # -- output
    def _arm(self):
        if self.timer is not None or self.dst is None or self.head >= len(self.queue):
            return
        self.timer = self.loop.call_at(self.queue[self.head][0], self.flush)

    def connected(self, dst):
        self.dst = dst
        self._arm()

    def flush(self):
        self.timer = None
        if self.closed or self.dst is None:
            return
        if self.dst.is_closing():
            self.closed = True
            return
        now = self.loop.time()
        out = []
        eof = False
        q = self.queue
        while self.head < len(q) and q[self.head][0] <= now + COALESCE:
            data = q[self.head][1]
            q[self.head] = None
            self.head += 1
            if data is None:
                eof = True
                break
            out.append(data)
            self.queued -= len(data)
        if self.head > 1024 and self.head * 2 > len(q):
            del q[:self.head]
            self.head = 0
        if out:
            n = sum(len(d) for d in out)
            STATS.bytes += n
            STATS.writes += 1
            self.dst.writelines(out)
        if eof:
            self.closed = True
            try:
                if self.dst.can_write_eof():
                    self.dst.write_eof()
                else:
                    self.dst.close()
            except (OSError, RuntimeError):
                self.dst.close()
            return
        self._maybe_resume(now)
        self._arm()

    def writable(self):
        self._maybe_resume(self.loop.time())


class Side(asyncio.Protocol):
    """One socket of a link: what it reads goes into `out`; `back` writes to it."""

    def __init__(self, link, name):
        self.link = link
        self.name = name
        self.transport = None
        self.out = None
        self.back = None

    def connection_made(self, transport):
        self.transport = transport
        if self.name == "client":
            self.link.start()
        try:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    def data_received(self, data):
        self.out.feed(data)

    def eof_received(self):
        self.out.eof()
        return True  # keep the other half open until the peer is done

    def pause_writing(self):
        pass  # the directions look at the write buffer size themselves

    def resume_writing(self):
        if self.back is not None:
            self.back.writable()

    def connection_lost(self, exc):
        self.link.lost(self)


def loopback_source(peer, target_host):
    """The address to dial the target from: the dialler's own, when both are IPv4 loopback
    addresses (an `allium testnet` node on its 127.x address), so the target counts the link
    against the dialler as it would without the emulator; None otherwise (the system's choice)."""
    if not peer or ":" in target_host:
        return None
    ip = peer[0]
    if ip.startswith("127.") and target_host.startswith("127."):
        return ip
    return None


class Link:
    def __init__(self, loop, cfg, target):
        self.loop = loop
        self.cfg = cfg
        self.target = target
        d_up = cfg.delay / 1000.0
        d_down = cfg.delay_back / 1000.0
        now = loop.time()
        handshake = (2 * d_up + d_down) if cfg.handshake else 0.0
        self.up = Direction(loop, cfg, d_up, not_before=now + handshake)
        self.down = Direction(loop, cfg, d_down)
        self.client = Side(self, "client")
        self.server = None
        self.done = False

    def start(self):
        if self.cfg.rate and self.cfg.rate_from:
            peer = self.client.transport.get_extra_info("peername")
            local = self.client.transport.get_extra_info("sockname")
            if not dialled_by(peer, local, self.cfg.rate_from):
                for d in (self.up, self.down):
                    d.rate = 0.0
                    d.buffer = 0.0
            else:
                STATS.capped += 1
        self.client.out = self.up
        self.client.back = self.down
        self.up.src = self.client.transport
        self.down.dst = self.client.transport
        delay = self.cfg.delay / 1000.0 if self.cfg.handshake else 0.0
        self.loop.call_later(delay, lambda: asyncio.ensure_future(self.connect()))

    async def connect(self):
        host, port = self.target
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            if self.down.rate:
                set_rcvbuf(sock, self.cfg)
            src = loopback_source(self.client.transport.get_extra_info("peername"), host)
            if src:
                try:
                    sock.bind((src, 0))
                except OSError:
                    pass
            await self.loop.sock_connect(sock, (host, port))
            _, proto = await self.loop.create_connection(lambda: Side(self, "server"), sock=sock)
        except OSError:
            self.close()
            return
        if self.done:
            proto.transport.close()
            return
        self.server = proto
        proto.out = self.down
        proto.back = self.up
        self.down.src = proto.transport
        self.up.connected(proto.transport)

    def lost(self, side):
        # The other side gets what is already queued towards it (then EOF), and the link is
        # torn down once that had time to arrive.
        if side is self.client:
            self.up.eof()
        elif self.server is not None:
            self.down.eof()
        self.loop.call_later(max(self.cfg.delay, self.cfg.delay_back) / 1000.0 + 1.0, self.close)

    def close(self):
        if self.done:
            return
        self.done = True
        for s in (self.client, self.server):
            if s is not None and s.transport is not None:
                s.transport.close()


def set_rcvbuf(sock, cfg):
    """With a rate cap: a small receive buffer, so that backpressure reaches the sender."""
    if cfg.rate > 0:
        size = max(65536, int(cfg.rate * 1e6 / 8 * 0.010))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError:
            pass


def parse_addr(s):
    host, _, port = s.rpartition(":")
    return host.strip("[]"), int(port)


async def serve(cfg):
    loop = asyncio.get_running_loop()
    servers = []
    for m in cfg.map:
        listen, _, target = m.partition("=")
        if not target:
            raise SystemExit("--map wants LISTEN=TARGET, got %r" % m)
        lh, lp = parse_addr(listen)
        tgt = parse_addr(target)

        def factory(tgt=tgt):
            STATS.conns += 1
            return Link(loop, cfg, tgt).client

        ls = socket.socket(socket.AF_INET6 if ":" in lh else socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_rcvbuf(ls, cfg)  # inherited by accepted sockets
        ls.bind((lh, lp))
        ls.listen(512)
        ls.setblocking(False)
        servers.append(await loop.create_server(factory, sock=ls))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY %d" % len(servers), flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    print(json.dumps({"conns": STATS.conns, "rate_capped_conns": STATS.capped,
                      "bytes": STATS.bytes, "writes": STATS.writes,
                      "stalls": STATS.stalls, "pauses": STATS.paused,
                      "cpu_s": round(time.process_time(), 3)}), flush=True)


# ------------------------------------------------------------------------------ self test

def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _echo_server(sock):
    while True:
        try:
            c, _ = sock.accept()
        except OSError:
            return

        def run(c=c):
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with c:
                while True:
                    d = c.recv(1 << 20)
                    if not d:
                        return
                    if d[:1] == b"B":  # bulk: swallow, answer the byte count at EOF
                        total = len(d)
                        while True:
                            d = c.recv(1 << 20)
                            if not d:
                                break
                            total += len(d)
                        c.sendall(str(total).encode())
                        return
                    c.sendall(d)

        threading.Thread(target=run, daemon=True).start()


def _pingpong(port, n):
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rtts = []
    with c:
        c.sendall(b"p")  # the first exchange includes the emulated handshake
        c.recv(16)
        for _ in range(n):
            t = time.perf_counter()
            c.sendall(b"p")
            if not c.recv(16):
                break
            rtts.append((time.perf_counter() - t) * 1000.0)
    return rtts


def _bulk(port, mib):
    c = socket.create_connection(("127.0.0.1", port))
    buf = b"B" * (1 << 20)
    t = time.perf_counter()
    with c:
        for _ in range(mib):
            c.sendall(buf)
        c.shutdown(socket.SHUT_WR)
        got = int(c.recv(64) or b"0")
    return got, time.perf_counter() - t


def selftest(args):
    """Ping-pong through the emulator: the RTT it adds must be ~2x the one-way delay."""
    echo = socket.socket()
    echo.bind(("127.0.0.1", 0))
    echo.listen(64)
    eport = echo.getsockname()[1]
    threading.Thread(target=_echo_server, args=(echo,), daemon=True).start()
    lport = _free_port()
    argv = [sys.executable, os.path.abspath(__file__), "--map",
            "127.0.0.1:%d=127.0.0.1:%d" % (lport, eport), "--delay", str(args.delay)]
    if args.rate:
        argv += ["--rate", str(args.rate)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        line = p.stdout.readline().decode()
        if not line.startswith("READY"):
            raise SystemExit("emulator did not start: %r" % line)
        base = _pingpong(eport, args.n)
        via = _pingpong(lport, args.n)
        added = statistics.median(via) - statistics.median(base)
        out = {"delay_ms": args.delay, "rtt_direct_ms": round(statistics.median(base), 3),
               "rtt_via_ms": round(statistics.median(via), 3), "added_rtt_ms": round(added, 3),
               "expected_ms": 2 * args.delay,
               "added_p90_ms": round(sorted(via)[int(0.9 * len(via))] - statistics.median(base), 3)}
        if args.bulk_mib:
            cpu0 = _cpu(p.pid)
            got, secs = _bulk(lport, args.bulk_mib)
            cpu1 = _cpu(p.pid)
            out["bulk_mib"] = got / 1048576.0
            out["bulk_mib_s"] = round(got / 1048576.0 / secs, 1)
            out["emulator_cpu_s_per_gib"] = round((cpu1 - cpu0) / max(got / 1073741824.0, 1e-9), 3)
        ok = abs(added - 2 * args.delay) <= max(2.0, 0.1 * args.delay)
        out["ok"] = ok
        print(json.dumps(out))
        return 0 if ok else 1
    finally:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
        echo.close()


def _cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "selftest":
        ap = argparse.ArgumentParser(prog="wanem.py selftest")
        ap.add_argument("--delay", type=float, default=20.0, help="one-way delay, ms")
        ap.add_argument("--rate", type=float, default=0.0, help="Mbit/s cap (0: none)")
        ap.add_argument("-n", type=int, default=50, help="ping-pongs")
        ap.add_argument("--bulk-mib", type=int, default=0, help="also push this many MiB through")
        return selftest(ap.parse_args(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--map", action="append", default=[], metavar="LISTEN=TARGET",
                    help="forward host:port to host:port (repeatable)")
    ap.add_argument("--delay", type=float, default=0.0, help="one-way delay client->target, ms")
    ap.add_argument("--delay-back", type=float, default=None, help="one-way delay target->client, ms "
                    "(default: --delay)")
    ap.add_argument("--rate", type=float, default=0.0, help="rate cap per link direction, Mbit/s")
    ap.add_argument("--rate-from", default=None, metavar="SUBSTRING",
                    help="cap only connections dialled by a process whose command line has SUBSTRING")
    ap.add_argument("--loss", type=float, default=0.0, help="segment loss, percent (stalls)")
    ap.add_argument("--buffer-ms", type=float, default=50.0,
                    help="bottleneck queue, in ms of the rate (with --rate)")
    ap.add_argument("--max-inflight-mib", type=int, default=32)
    ap.add_argument("--no-handshake", dest="handshake", action="store_false",
                    help="do not charge a round trip for a new connection")
    cfg = ap.parse_args()
    if cfg.delay_back is None:
        cfg.delay_back = cfg.delay
    if not cfg.map:
        ap.error("at least one --map")
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
