#!/usr/bin/env python3
"""Drive Allium's control ports with stem, unmodified: authentication (PROTOCOLINFO, cookie,
SAFECOOKIE, a wrong cookie), circuit listing, NEWNYM, CIRC, STREAM and BW events, GETINFO keys,
GETCONF/SETCONF, and the error codes of unknown commands, keys and options.

Usage: check.py TESTNET_JSON [--live-setconf]   (the file `allium testnet` writes; the cargo test
writes the same shape). With --live-setconf (the `allium` binary, whose SETCONF goes through its
reload path), a reloadable option must change live. Prints `ok ...` per passed check and exits
non-zero with a message on the first failure.
"""
import json
import shutil
import socket
import subprocess
import sys
import time

import stem
import stem.connection
import stem.control
import stem.response.events
from stem import Signal
from stem.control import Controller, EventType

CHECKS = [0]


def fail(msg):
    print(f"FAIL: {msg}")
    print(f"stem: {CHECKS[0]} checks passed before the failure")
    sys.exit(1)


def ok(msg):
    """One passed check."""
    CHECKS[0] += 1
    print(f"ok {msg}")


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


def code_of(reply):
    """The status code of a stem ControlMessage (its first line's)."""
    return reply.content()[0][0]


def raw_exchange(port, lines):
    """Send raw control lines on a fresh connection; return everything read until the server
    closes (bounded by a 10 s timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall("".join(l + "\r\n" for l in lines).encode())
        got = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except socket.timeout:
            got += b"<timeout>"
        return got.decode(errors="replace")


def check_auth(n, who):
    """PROTOCOLINFO, each cookie method by itself, and a wrong cookie."""
    port = port_of(n)
    with Controller.from_port(port=port) as c:
        pi = stem.connection.get_protocolinfo(c)
        methods = {m for m in pi.auth_methods}
        if stem.connection.AuthMethod.SAFECOOKIE not in methods or \
                stem.connection.AuthMethod.COOKIE not in methods:
            fail(f"{who}: PROTOCOLINFO offers {methods}, not COOKIE and SAFECOOKIE")
        if pi.cookie_path != n["control_cookie"]:
            fail(f"{who}: PROTOCOLINFO COOKIEFILE {pi.cookie_path!r}, testnet.json says "
                 f"{n['control_cookie']!r}")
        ok(f"{who}: PROTOCOLINFO auth={sorted(str(m) for m in methods)} cookie file matches, "
           f"version {pi.tor_version}")
        stem.connection.authenticate_safecookie(c, pi.cookie_path)
        if c.get_info("version") != str(pi.tor_version).split(" ")[0]:
            fail(f"{who}: GETINFO version after SAFECOOKIE: {c.get_info('version')}")
        ok(f"{who}: SAFECOOKIE authentication (AUTHCHALLENGE, HMAC both ways)")
    with Controller.from_port(port=port) as c:
        stem.connection.authenticate_cookie(c, n["control_cookie"])
        ok(f"{who}: plain COOKIE authentication")
    got = raw_exchange(port, ["AUTHENTICATE " + "00" * 32, "GETINFO version"])
    if not got.startswith("515 ") or "250" in got:
        fail(f"{who}: a wrong cookie got {got!r}, not 515 and a closed connection")
    ok(f"{who}: wrong cookie refused with 515, connection closed")
    got = raw_exchange(port, ["GETINFO version", "QUIT"])
    if not got.startswith("514 "):
        fail(f"{who}: GETINFO before AUTHENTICATE got {got!r}, not 514")
    ok(f"{who}: command before authentication refused with 514")


def check_errors(c, who):
    """Unknown commands, keys and options get the spec's codes, never a hang."""
    r = c.msg("NOSUCHCOMMAND foo")
    if code_of(r) != "510":
        fail(f"{who}: unknown command answered {r}")
    ok(f"{who}: unknown command -> 510 ({r})")
    r = c.msg("GETINFO no-such-key")
    if code_of(r) != "552":
        fail(f"{who}: unknown GETINFO key answered {r}")
    try:
        c.get_info("no-such-key")
        fail(f"{who}: stem's get_info of an unknown key succeeded")
    except stem.InvalidArguments:
        pass
    ok(f"{who}: unknown GETINFO key -> 552 ({r})")
    r = c.msg("GETCONF NoSuchOption")
    if code_of(r) != "552":
        fail(f"{who}: unknown GETCONF option answered {r}")
    try:
        c.get_conf("NoSuchOption")
        fail(f"{who}: GETCONF of an unknown option succeeded")
    except stem.InvalidArguments:
        pass
    ok(f"{who}: unknown GETCONF option -> 552")
    r = c.msg("SETCONF NoSuchOption=1")
    if code_of(r) != "552":
        fail(f"{who}: SETCONF of an unknown option answered {r}")
    ok(f"{who}: SETCONF of an unknown option -> 552")
    r = c.msg("SETEVENTS BW NO_SUCH_EVENT")
    if code_of(r) != "552":
        fail(f"{who}: SETEVENTS of an unknown event answered {r}")
    ok(f"{who}: SETEVENTS of an unknown event -> 552")
    r = c.msg("SIGNAL NOSUCHSIGNAL")
    if code_of(r) != "552":
        fail(f"{who}: an unknown signal answered {r}")
    ok(f"{who}: unknown signal -> 552")
    r = c.msg("ADD_ONION NEW:BEST Port=80")
    if code_of(r) not in ("250", "511", "512", "513", "552"):
        fail(f"{who}: ADD_ONION answered {r}")
    ok(f"{who}: ADD_ONION answered {code_of(r)}, not a hang")
    # HEARTBEAT logs a status line: it arrives as a NOTICE log event, and the SIGNAL event too.
    notices, signals = [], []
    c.add_event_listener(notices.append, EventType.NOTICE)
    c.add_event_listener(signals.append, EventType.SIGNAL)
    r = c.msg("SIGNAL HEARTBEAT")
    if code_of(r) != "250":
        fail(f"{who}: SIGNAL HEARTBEAT answered {r}")
    deadline = time.time() + 10
    while time.time() < deadline and not (notices and signals):
        time.sleep(0.2)
    if not notices or not signals or signals[0].signal != "HEARTBEAT":
        fail(f"{who}: after SIGNAL HEARTBEAT: {len(notices)} NOTICE events, signals "
             f"{[e.signal for e in signals]}")
    ok(f"{who}: SIGNAL HEARTBEAT -> 250, a SIGNAL event and a NOTICE event: "
       f"{notices[0].message[:80]!r}")
    c.remove_event_listener(notices.append)
    c.remove_event_listener(signals.append)


def check_getinfo(c, who, keys):
    """Every key answers 250 through stem, with a non-empty value where one is expected."""
    got = {}
    for k in keys:
        try:
            got[k] = c.get_info(k)
        except stem.ControllerError as e:
            fail(f"{who}: GETINFO {k}: {e}")
    for k in ("version", "process/pid", "uptime", "traffic/read", "traffic/written",
              "status/bootstrap-phase", "net/listeners/control"):
        if k in got and not got[k]:
            fail(f"{who}: GETINFO {k} is empty")
    if "process/pid" in got and not got["process/pid"].isdigit():
        fail(f"{who}: process/pid {got['process/pid']!r}")
    ok(f"{who}: GETINFO answered {len(keys)} keys ({', '.join(keys)})")
    return got


COMMON_KEYS = ["version", "config-file", "process/pid", "process/user", "uptime",
               "traffic/read", "traffic/written", "circuit-status", "stream-status",
               "orconn-status", "status/bootstrap-phase", "net/listeners/control",
               "accounting/enabled", "accounting/hibernating", "bw-event-cache",
               "events/names", "info/names", "config/names"]


def check_proxy(info):
    n = node(info, "client")
    check_auth(n, "proxy")
    with Controller.from_port(port=port_of(n)) as c:
        c.authenticate()  # stem picks SAFECOOKIE from PROTOCOLINFO and reads the cookie file
        print(f"proxy: version {c.get_version()}, pid {c.get_pid()}")
        got = check_getinfo(c, "proxy", COMMON_KEYS + ["net/listeners/socks"])
        socks = got["net/listeners/socks"].strip('"')
        if socks != info["socks"]:
            fail(f"proxy: net/listeners/socks {socks!r}, testnet.json says {info['socks']!r}")
        ok(f"proxy: net/listeners/socks = {socks}")
        check_errors(c, "proxy")
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
        ok(f"proxy: get_circuits() lists {len(circs)} BUILT 3-hop circuits")
        # NEWNYM: new streams use fresh circuits; the old ones leave the pool.
        before = {x.id for x in circs}
        circ_events = []
        c.add_event_listener(lambda e: circ_events.append(e), EventType.CIRC)
        c.signal(Signal.NEWNYM)
        deadline = time.time() + 30
        fresh = set()
        now = set()
        while time.time() < deadline:
            now = {x.id for x in c.get_circuits() if x.status == "BUILT"}
            fresh = now - before
            if fresh and not (now & before):
                break
            time.sleep(0.5)
        if not fresh or (now & before):
            fail(f"NEWNYM: before {sorted(before)}, after {sorted(now)}")
        ok(f"proxy: NEWNYM: old circuits {sorted(before)} gone, fresh {sorted(fresh)}")
        # BW events for 3 s while a request goes through the proxy; its STREAM events.
        bw = []
        streams = []
        c.add_event_listener(lambda e: bw.append(e), EventType.BW)
        c.add_event_listener(lambda e: streams.append(e), EventType.STREAM)
        fetch(info)
        time.sleep(3.2)
        if len(bw) < 2:
            fail(f"only {len(bw)} BW events in 3 s")
        if not all(isinstance(e, stem.response.events.BandwidthEvent) for e in bw):
            fail("a BW event did not parse as stem's BandwidthEvent")
        if sum(e.read for e in bw) == 0 or sum(e.written for e in bw) == 0:
            fail("BW events show no traffic while a request went through the proxy")
        ok(f"proxy: {len(bw)} BW events in 3 s: " +
           " ".join(f"{e.read}/{e.written}" for e in bw) + " (bytes read/written)")
        print(f"proxy: {len(circ_events)} CIRC events since NEWNYM: " +
              ", ".join(f"{e.id} {e.status}" for e in circ_events))
        for want in ("LAUNCHED", "EXTENDED", "BUILT"):
            if not any(e.status == want for e in circ_events):
                fail(f"no CIRC {want} event after NEWNYM")
        for e in circ_events:
            if not isinstance(e, stem.response.events.CircuitEvent) or e.created is None:
                fail(f"CIRC event {e} did not parse with TIME_CREATED")
        built = [e for e in circ_events if e.status == "BUILT"]
        if any(len(e.path) != 3 for e in built):
            fail(f"a CIRC BUILT event has a path of other than 3 hops: {built}")
        ok(f"proxy: CIRC events LAUNCHED, EXTENDED, BUILT parsed by stem ({len(circ_events)})")
        mine = [e for e in streams if e.target == info["http_target"]]
        print("proxy: STREAM events of the request: " +
              ", ".join(f"{e.id} {e.status} circ={e.circ_id}" for e in mine))
        if shutil.which("curl"):
            got = [e.status for e in mine]
            for want in ("NEW", "SENTCONNECT", "SUCCEEDED", "CLOSED"):
                if want not in got:
                    fail(f"no STREAM {want} event for the request ({got})")
            succ = next(e for e in mine if e.status == "SUCCEEDED")
            if succ.circ_id not in {x.id for x in c.get_circuits()} | {e.id for e in circ_events}:
                fail(f"STREAM SUCCEEDED names circuit {succ.circ_id}, which was never listed")
            ok(f"proxy: STREAM NEW, SENTCONNECT, SUCCEEDED (circuit {succ.circ_id}), CLOSED")
        else:
            print("SKIPPED STREAM events: curl is not installed")
        read = int(c.get_info("traffic/read"))
        print(f"proxy: traffic/read={read} traffic/written={c.get_info('traffic/written')}")
        if read == 0:
            fail("traffic/read is 0 after circuits were built")
        ok(f"proxy: traffic/read = {read}")
        try:
            c.set_conf("SocksPort", "127.0.0.1:1")
            fail("SETCONF SocksPort (needs a restart) succeeded")
        except stem.InvalidRequest as e:
            if e.code != "553":
                fail(f"SETCONF SocksPort: code {e.code}, not 553")
            if c.get_conf("SocksPort") != info["socks"]:
                fail(f"SETCONF SocksPort was refused but GETCONF shows {c.get_conf('SocksPort')}")
            ok(f"proxy: SETCONF SocksPort refused with 553: {e}")
        if "--live-setconf" in sys.argv:
            old = c.get_conf("CircuitBuildTimeout")
            new = "33" if old != "33" else "34"
            c.set_conf("CircuitBuildTimeout", new)
            if c.get_conf("CircuitBuildTimeout") != new:
                fail(f"SETCONF CircuitBuildTimeout={new} left {c.get_conf('CircuitBuildTimeout')}")
            c.reset_conf("CircuitBuildTimeout")
            ok(f"proxy: SETCONF CircuitBuildTimeout {old} -> {new} applied live, RESETCONF "
               f"-> {c.get_conf('CircuitBuildTimeout')}")
        phase = c.get_info("status/bootstrap-phase")
        if "PROGRESS=100" not in phase:
            fail(f"proxy bootstrap phase {phase}")
        ok(f"proxy: SocksPort={c.get_conf('SocksPort')} bootstrap: {phase}")


def check_relay(info):
    n = node(info, "relay")
    check_auth(n, "relay")
    with Controller.from_port(port=port_of(n)) as c:
        c.authenticate()
        check_getinfo(c, "relay", COMMON_KEYS + ["fingerprint", "address", "net/listeners/or"])
        check_errors(c, "relay")
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
        if "Running" not in mine.flags:
            fail(f"relay's own flags {mine.flags} lack Running")
        ok(f"relay: ns/all has {len(entries)} entries; ns/id/{fp[:8]}... is {nick} "
           f"with {sorted(mine.flags)}")
        bw = []
        c.add_event_listener(lambda e: bw.append(e), EventType.BW)
        time.sleep(3.2)
        if len(bw) < 2:
            fail(f"relay: only {len(bw)} BW events in 3 s")
        ok(f"relay: {len(bw)} BW events in 3 s; "
           f"traffic/read={c.get_info('traffic/read')} uptime={c.get_info('uptime')}s "
           f"orconns={len(c.get_info('orconn-status').splitlines())}")
        # A reloadable relay option changes live; one that needs a restart is 553.
        if "--live-setconf" in sys.argv:
            old = c.get_conf("ContactInfo") or ""
            c.set_conf("ContactInfo", "stem-check@example.org")
            if c.get_conf("ContactInfo") != "stem-check@example.org":
                fail(f"relay: SETCONF ContactInfo left {c.get_conf('ContactInfo')!r}")
            ok(f"relay: SETCONF ContactInfo applied live (was {old!r})")
        try:
            c.set_conf("ORPort", "127.0.0.1:1")
            fail("relay: SETCONF ORPort (needs a restart) succeeded")
        except stem.InvalidRequest as e:
            if e.code != "553":
                fail(f"relay: SETCONF ORPort: code {e.code}, not 553")
            ok(f"relay: SETCONF ORPort refused with 553: {e}")


def main():
    with open(sys.argv[1]) as f:
        info = json.load(f)
    print(f"stem {stem.__version__}")
    check_relay(info)
    check_proxy(info)
    print(f"stem: {CHECKS[0]} checks passed")


if __name__ == "__main__":
    main()
