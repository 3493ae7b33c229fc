#!/usr/bin/env bash
# Allium vs C Tor, side by side, on this machine (issue 5). Run by hand, never in CI:
#
#     bash bench/compare-tor.sh [compare.py options]     (e.g. --only tor, --keep)
#
# 1. installs Debian's tor (tor, tor-gencert) and curl with apt-get if they are missing;
# 2. builds target/release/allium (`cargo build --release`; SKIP_BUILD=1 skips, ALLIUM_BIN overrides,
#    ALLIUM_CARGO_ARGS adds cargo arguments such as "--features allium-proto/openssl");
# 3. runs bench/compare.py, which serves the payloads on 127.0.0.2, measures the no-overlay ceiling,
#    then a private C Tor network, then `allium testnet` (one network at a time), prints one table
#    and writes bench/results/compare-<UTC>.json.  See docs/BENCHMARKS.md.
# WAN emulation (issue 9): --wan MS [--rate MBIT] [--fairness] puts every inter-node link through
# bench/wanem.py (check it first with `python3 bench/wanem.py selftest --delay MS`).
# Everything stays on loopback; every process is started and stopped by PID; every wait is bounded.
set -Eeuo pipefail
export LC_ALL=C
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY=${PY:-python3}

for a in "$@"; do   # nothing to install or build just to print help or an old table
  case $a in -h|--help|--table|--table=*) exec "$PY" "$HERE/compare.py" "$@" ;; esac
done
ONLY_TOR=0
prev=""
for a in "$@"; do
  { [ "$prev" = --only ] && [ "$a" = tor ]; } || [ "$a" = --only=tor ] && ONLY_TOR=1
  prev=$a
done

need=()
command -v tor >/dev/null || need+=(tor)
command -v tor-gencert >/dev/null || need+=(tor)        # tor-gencert ships in Debian's tor package
command -v curl >/dev/null || need+=(curl)
command -v "$PY" >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "installing with apt-get: ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  # Note: on a host running systemd this also enables Debian's system tor service (not used here).
  timeout 300 $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 600 $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
for b in tor tor-gencert curl "$PY"; do
  command -v "$b" >/dev/null || { echo "still missing after apt-get: $b" >&2; exit 2; }
done

ALLIUM_BIN=${ALLIUM_BIN:-$ROOT/target/release/allium}
NA=()
if [ "${SKIP_BUILD:-0}" != 1 ] && [ "$ONLY_TOR" = 0 ]; then
  # ALLIUM_CARGO_ARGS: extra cargo arguments, e.g. "--features allium-proto/openssl" (recorded in the JSON)
  echo "building Allium: cargo build --release --bin allium ${ALLIUM_CARGO_ARGS:-} (in $ROOT)" >&2
  # shellcheck disable=SC2086
  if ! (cd "$ROOT" && timeout 3600 cargo build --release --bin allium ${ALLIUM_CARGO_ARGS:-}); then
    echo "cargo build --release failed: the Allium column will read n/a" >&2
    NA=(--allium-na "cargo build --release failed (its errors are above)")  # never run a stale binary
  fi
fi

DRIVER_PID=""
stop_driver() {
  local rc=$? i
  trap - EXIT INT TERM
  if [ -n "$DRIVER_PID" ] && kill -0 "$DRIVER_PID" 2>/dev/null; then
    kill -TERM "$DRIVER_PID" 2>/dev/null || true        # the driver stops everything it started
    for i in $(seq 1 150); do kill -0 "$DRIVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$DRIVER_PID" 2>/dev/null || true
  fi
  exit "$rc"
}
trap stop_driver EXIT
trap 'exit 130' INT TERM
"$PY" "$HERE/compare.py" --allium-bin "$ALLIUM_BIN" "${NA[@]}" "$@" &
DRIVER_PID=$!
set +e
wait "$DRIVER_PID"; rc=$?
DRIVER_PID=""
exit "$rc"
