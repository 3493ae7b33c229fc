#!/usr/bin/env python3
"""A fuzzing campaign: every target toward --runs executions (default 10 million), one target
at a time under `nice -n 19`, each capped so the whole campaign fits in --budget-min minutes.

Targets run fastest first (by the exec/s of a 5 s probe); the time a fast target does not use goes
to the slower ones (each target's cap is what is left of the budget divided by the targets left).
Records, per target: executions, exec/s, libFuzzer's final `cov:` and `ft:`, corpus size, whether
it reached --runs, and any crash (its input stays in fuzz/artifacts/<target>/). Writes
bench/results/fuzz-<UTC stamp>.json and prints a Markdown table.

    python3 fuzz/campaign.py [--budget-min 75] [--runs 10000000] [--jobs 1] [--only TARGET ...]

With --jobs N, N targets run at once (each on one core); a target's cap is then the budget left
times N divided by the targets left.

Builds with `cargo fuzz build -s none` (stable rustc; see README) unless --no-build.
"""

import argparse
import datetime
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time

FUZZ = pathlib.Path(__file__).resolve().parent
ROOT = FUZZ.parent
TRIPLE = "x86_64-unknown-linux-gnu"


def binary(t):
    base = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", FUZZ / "target"))
    return base / TRIPLE / "release" / t


def fuzz_once(t, runs, secs, log):
    corpus = FUZZ / "target" / "corpus" / t
    corpus.mkdir(parents=True, exist_ok=True)
    art = FUZZ / "artifacts" / t
    art.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", "19", str(binary(t)), str(corpus), str(FUZZ / "corpus" / t),
           f"-runs={runs}", f"-max_total_time={max(1, int(secs))}", "-print_final_stats=1",
           "-rss_limit_mb=1024", "-malloc_limit_mb=256", f"-artifact_prefix={art}/"]
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=FUZZ)
    el = time.monotonic() - t0
    text = pathlib.Path(log).read_text(errors="replace")

    def stat(name):
        m = re.findall(rf"stat::{name}:\s*(\d+)", text)
        return int(m[-1]) if m else None

    # The last status line: "#N  DONE  cov: C ft: F corp: K/S ..." (or the last pulse).
    status = re.findall(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\S+)", text, re.M)
    last = status[-1] if status else None
    crash = p.returncode != 0
    return {
        "executions": stat("number_of_executed_units") or (int(last[0]) if last else None),
        "exec_per_sec": stat("average_exec_per_sec"),
        "cov": int(last[1]) if last else None,
        "ft": int(last[2]) if last else None,
        "corpus_units": int(last[3]) if last else None,
        "peak_rss_mb": stat("peak_rss_mb"),
        "secs": round(el, 1),
        "cap_secs": int(secs),
        "exit_code": p.returncode,
        "crash": crash,
        "crash_lines": [ln for ln in text.splitlines()
                        if re.search(r"panicked at|ERROR: libFuzzer|SUMMARY|Test unit written",
                                     ln)][:6] if crash else [],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-min", type=float, default=75)
    ap.add_argument("--runs", type=int, default=10_000_000)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--jobs", type=int, default=1, help="targets fuzzed at once")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--out", type=pathlib.Path)
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["nice", "-n", "19", "cargo", "fuzz", "build", "-s", "none"], cwd=FUZZ,
                       check=True)
    targets = a.only or subprocess.run(["cargo", "fuzz", "list"], cwd=FUZZ, check=True,
                                       capture_output=True, text=True).stdout.split()
    logs = FUZZ / "logs"
    logs.mkdir(exist_ok=True)
    start = time.monotonic()
    budget = a.budget_min * 60
    # A 5 s probe of each target orders them fastest first.
    probe = {}
    for t in targets:
        r = fuzz_once(t, a.runs, 5, logs / f"{t}.probe.log")
        probe[t] = r["exec_per_sec"] or 0
        print(f"probe {t}: {probe[t]} exec/s", file=sys.stderr, flush=True)
    order = sorted(targets, key=lambda t: -probe[t])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%SZ")
    out = a.out or ROOT / "bench" / "results" / f"fuzz-{stamp}.json"
    doc = {"date": stamp, "runs_goal": a.runs, "budget_min": a.budget_min,
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip(),
           "sanitizer": "none", "flags": "-rss_limit_mb=1024 -malloc_limit_mb=256",
           "probe_exec_per_sec": probe, "targets": {}}
    todo = list(order)
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                t = todo.pop(0)
                left = budget - (time.monotonic() - start)
                # The targets not yet started share what is left, a.jobs at a time.
                cap = max(30.0, left * a.jobs / (len(todo) + 1))
            print(f"fuzz {t}: up to {a.runs} runs or {cap:.0f} s", file=sys.stderr, flush=True)
            r = fuzz_once(t, a.runs, cap, logs / f"{t}.log")
            r["reached_goal"] = (r["executions"] or 0) >= a.runs
            with lock:
                doc["targets"][t] = r
                doc["wall_min"] = round((time.monotonic() - start) / 60, 1)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(doc, indent=2) + "\n")
            print(f"  {t}: {r['executions']} execs, {r['exec_per_sec']}/s, cov {r['cov']} "
                  f"ft {r['ft']}{' CRASH' if r['crash'] else ''}", file=sys.stderr, flush=True)

    doc["jobs"] = a.jobs
    threads = [threading.Thread(target=worker) for _ in range(max(1, a.jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(table(doc))
    print(out)
    return 1 if any(r["crash"] for r in doc["targets"].values()) else 0


def num(v):
    return f"{v:,}" if isinstance(v, int) else "?"


def table(doc):
    rows = ["| target | executions | exec/s | cov | ft | corpus | time (s) | result |",
            "|---|---:|---:|---:|---:|---:|---:|---|"]
    for t, r in sorted(doc["targets"].items()):
        res = "CRASH" if r["crash"] else ("ok" if r["reached_goal"] else "ok (time cap)")
        rows.append(f"| {t} | {num(r['executions'])} | {num(r['exec_per_sec'])} | {r['cov']} | "
                    f"{r['ft']} | {r['corpus_units']} | {r['secs']:.0f} | {res} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
