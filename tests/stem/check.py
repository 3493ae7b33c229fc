#!/usr/bin/env python3
"""Drive Allium's control ports with stem, unmodified: circuit listing, NEWNYM, CIRC, STREAM and
BW events, GETCONF/SETCONF.

Usage: check.py TESTNET_JSON [--live-setconf]   (the file `allium testnet` writes; the cargo test
writes the same shape). With --live-setconf (the `allium` binary, whose SETCONF goes through its
reload path), a reloadable option must change live. Exits non-zero with a message on the first
failure.
"""
import json
import shutil
import subprocess
import sys
import time

import stem
import stem.control
from stem import Signal
from stem.control import Controller, EventType


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def node(info, role):
    for n in info["nodes"]:
        if n["role"] == role and n.get("control_port"):
            return n
    fail(f"no {role} with a control port in testnet.json")


def port_of(n):
    return int(n["control_port"].rsplit(":", 1)[1])


def fetch(info):
    """Send one request through the proxy so that traffic counters move."""
    try:
        subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "--max-time", "20",
             "--socks5-hostname", info["socks"], f"http://{info['http_target']}/"],
            check=False,
        )
    except FileNotFoundError:
        pass


def check_proxy(info):
    n = node(info, "client")
    with Controller.from_port(port=port_of(n)) as c:
        c.authenticate()  # stem picks SAFECOOKIE from PROTOCOLINFO and reads the cookie file
        print(f"proxy: version {c.get_version()}, pid {c.get_pid()}")
        # Circuit listing.
        deadline = time.time() + 30
        circs = []
        while time.time() < deadline:
            circs = [x for x in c.get_circuits() if x.status == "BUILT"]
            if circs:
                break
            time.sleep(0.5)
        if not circs:
            fail("no BUILT circuit listed")
        for circ in circs:
            if len(circ.path) != 3:
                fail(f"circuit {circ.id} has {len(circ.path)} hops")
            for fp, nick in circ.path:
                if len(fp) != 40 or not nick:
                    fail(f"bad hop {fp}~{nick}")
            print(f"proxy: circuit {circ.id} {circ.status} purpose={circ.purpose} "
                  f"created={circ.created} path={','.join(nick for _, nick in circ.path)}")
        # NEWNYM: new streams use fresh circuits; the old ones leave the pool.
        before = {x.id for x in circs}
        circ_events = []
        c.add_event_listener(lambda e: circ_events.append(e), EventType.CIRC)
        c.signal(Signal.NEWNYM)
        deadline = time.time() + 30
        fresh = set()
        while time.time() < deadline:
            now = {x.id for x in c.get_circuits() if x.status == "BUILT"}
            fresh = now - before
            if fresh and not (now & before):
                break
            time.sleep(0.5)
        if not fresh:
            fail(f"NEWNYM: no fresh circuit (before {sorted(before)})")
        print(f"proxy: NEWNYM ok: old circuits {sorted(before)} gone, fresh {sorted(fresh)}")
        # BW events for 3 s while a request goes through the proxy; its STREAM events.
        bw = []
        streams = []
        c.add_event_listener(lambda e: bw.append(e), EventType.BW)
        c.add_event_listener(lambda e: streams.append(e), EventType.STREAM)
        fetch(info)
        time.sleep(3.2)
        if len(bw) < 2:
            fail(f"only {len(bw)} BW events in 3 s")
        print(f"proxy: {len(bw)} BW events in 3 s: " +
              " ".join(f"{e.read}/{e.written}" for e in bw) + f" (bytes read/written)")
        print(f"proxy: {len(circ_events)} CIRC events since NEWNYM: " +
              ", ".join(f"{e.id} {e.status}" for e in circ_events))
        if not any(e.status == "BUILT" for e in circ_events):
            fail("no CIRC BUILT event after NEWNYM")
        for want in ("LAUNCHED", "EXTENDED"):
            if not any(e.status == want for e in circ_events):
                fail(f"no CIRC {want} event after NEWNYM")
        mine = [e for e in streams if e.target == info["http_target"]]
        print(f"proxy: STREAM events of the request: " +
              ", ".join(f"{e.id} {e.status} circ={e.circ_id}" for e in mine))
        if shutil.which("curl"):
            got = [e.status for e in mine]
            for want in ("NEW", "SENTCONNECT", "SUCCEEDED", "CLOSED"):
                if want not in got:
                    fail(f"no STREAM {want} event for the request ({got})")
        read = int(c.get_info("traffic/read"))
        print(f"proxy: traffic/read={read} traffic/written={c.get_info('traffic/written')}")
        if read == 0:
            fail("traffic/read is 0 after circuits were built")
        try:
            c.get_conf("NoSuchOption")
            fail("GETCONF of an unknown option succeeded")
        except stem.InvalidArguments:
            pass
        try:
            c.set_conf("SocksPort", "127.0.0.1:1")
            fail("SETCONF SocksPort (needs a restart) succeeded")
        except stem.InvalidRequest as e:
            print(f"proxy: SETCONF SocksPort refused: {e}")
        if "--live-setconf" in sys.argv:
            c.set_conf("CircuitBuildTimeout", "33")
            if c.get_conf("CircuitBuildTimeout") != "33":
                fail(f"SETCONF CircuitBuildTimeout=33 left {c.get_conf('CircuitBuildTimeout')}")
            print("proxy: SETCONF CircuitBuildTimeout=33 applied live")
        print(f"proxy: SocksPort={c.get_conf('SocksPort')} "
              f"bootstrap: {c.get_info('status/bootstrap-phase')}")


def check_relay(info):
    n = node(info, "relay")
    with Controller.from_port(port=port_of(n)) as c:
        c.authenticate()
        fp = c.get_info("fingerprint")
        nick = c.get_conf("Nickname")
        entries = list(c.get_network_statuses())
        if not entries:
            fail("ns/all is empty")
        mine = c.get_network_status(fp)
        print(f"relay: {nick} fingerprint {fp}, ORPort {c.get_conf('ORPort')}, "
              f"{len(entries)} relays in ns/all, own flags {sorted(mine.flags)}")
        if mine.nickname != nick:
            fail(f"ns/id/{fp} names {mine.nickname}, not {nick}")
        bw = []
        c.add_event_listener(lambda e: bw.append(e), EventType.BW)
        time.sleep(3.2)
        if len(bw) < 2:
            fail(f"relay: only {len(bw)} BW events in 3 s")
        print(f"relay: {len(bw)} BW events in 3 s; "
              f"traffic/read={c.get_info('traffic/read')} uptime={c.get_info('uptime')}s "
              f"orconns={len(c.get_info('orconn-status').splitlines())}")


def main():
    with open(sys.argv[1]) as f:
        info = json.load(f)
    print(f"stem {stem.__version__}")
    check_relay(info)
    check_proxy(info)
    print("stem checks passed")


if __name__ == "__main__":
    main()
