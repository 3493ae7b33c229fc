#!/usr/bin/env python3
"""Run the authority flood (tests/tests/authority_flood.rs) by hand, bigger than in CI.

Junk descriptors and slowloris connections from 127.0.0.77 against three scheduled authorities
while four honest relays on 127.0.N.1 are probed and listed and a client bootstraps. Each run
writes the test's figures as JSON; this script collects them into one file.

    python3 bench/attack/authority_flood.py --runs 3 --secs 60 --slowloris 1000 --uploaders 4

Needs only cargo; prints where the JSON went. Exits non-zero if any run failed.
"""

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_once(secs, slowloris, uploaders, release):
    with tempfile.TemporaryDirectory() as d:
        out = pathlib.Path(d) / "figures.json"
        env = dict(os.environ)
        env.update(
            ALLIUM_FLOOD_JSON=str(out),
            ALLIUM_FLOOD_SECS=str(secs),
            ALLIUM_FLOOD_SLOWLORIS=str(slowloris),
            ALLIUM_FLOOD_UPLOADERS=str(uploaders),
        )
        cmd = ["cargo", "test", "-p", "allium-tests", "--test", "authority_flood"]
        if release:
            cmd.append("--release")
        cmd += ["--", "--nocapture"]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        figures = json.loads(out.read_text()) if out.exists() else None
        return {
            "passed": p.returncode == 0,
            "figures": figures,
            "stderr_tail": None if p.returncode == 0 else p.stderr[-4000:],
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--secs", type=int, default=60, help="flood duration per run")
    ap.add_argument("--slowloris", type=int, default=500, help="connections per authority")
    ap.add_argument("--uploaders", type=int, default=4, help="junk uploaders per authority")
    ap.add_argument("--release", action="store_true")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    a = ap.parse_args()
    runs = []
    for i in range(a.runs):
        r = run_once(a.secs, a.slowloris, a.uploaders, a.release)
        print(f"run {i + 1}/{a.runs}: {'passed' if r['passed'] else 'FAILED'}", file=sys.stderr)
        runs.append(r)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    out = a.out or ROOT / "bench" / "results" / f"authority-flood-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "params": {"secs": a.secs, "slowloris": a.slowloris, "uploaders": a.uploaders,
                   "release": a.release},
        "runs": runs,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(out)
    sys.exit(0 if all(r["passed"] for r in runs) else 1)


if __name__ == "__main__":
    main()
