#!/usr/bin/env bash
# Check Allium with the tools operators and applications already use. Starts `allium testnet`,
# then runs check.py (stem against a relay's and the proxy's control ports: authentication,
# circuit listing, NEWNYM, CIRC/STREAM/BW events, GETINFO, GETCONF/SETCONF, error codes) and
# tools.py (testnet.json, every node's /metrics through Prometheus's parser, the Grafana
# dashboard's metric names, HTTP CONNECT with curl, the DNS port with dnspython, the SOCKS port's
# HTTP page, Nyx in tmux against a relay and the proxy, the README's commands). Prints a summary
# line with the number of checks. Not part of `cargo test`: it installs stem, dnspython and
# prometheus_client from PyPI into a venv and nyx and tmux from Debian (apt-get needs root).
#
#   bash tests/stem/run.sh                     # builds with $CARGO_TARGET_DIR (or ./target)
#   ALLIUM_BIN=path/to/allium bash tests/stem/run.sh
#   ALLIUM_STEM_VENV=/path/to/venv bash tests/stem/run.sh   # a venv with the three packages
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
venv=${ALLIUM_STEM_VENV:-$target/stem-venv}

if ! "$venv/bin/python" -c 'import stem, dns, prometheus_client' 2>/dev/null; then
    echo "== installing stem from PyPI into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet stem dnspython prometheus_client
fi
if ! command -v nyx >/dev/null || ! command -v tmux >/dev/null; then
    echo "== installing nyx and tmux from Debian"
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nyx tmux curl >/dev/null
fi

if [ -n "${ALLIUM_BIN:-}" ]; then
    bin=$ALLIUM_BIN
else
    echo "== building allium"
    (cd "$root" && nice -n 10 cargo build --quiet --bin allium)
    bin=$target/debug/allium
fi

dir=$(mktemp -d /tmp/allium-stem.XXXXXX)
cleanup() {
    if [ -n "${net_pid:-}" ]; then kill -INT "$net_pid" 2>/dev/null || true; wait "$net_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

echo "== starting a test network in $dir"
"$bin" testnet --socks-port 0 --data-dir "$dir/net" >"$dir/testnet.out" 2>&1 &
net_pid=$!
for _ in $(seq 1 180); do
    [ -s "$dir/net/testnet.json" ] && break
    kill -0 "$net_pid" 2>/dev/null || { cat "$dir/testnet.out"; echo "FAIL: testnet exited"; exit 1; }
    sleep 1
done
[ -s "$dir/net/testnet.json" ] || { echo "FAIL: testnet not ready"; exit 1; }
sleep 1 # the banner is printed just after testnet.json is written
cat "$dir/testnet.out"

status=0
echo "== stem (control port)"
"$venv/bin/python" "$here/check.py" "$dir/net/testnet.json" --live-setconf | tee "$dir/stem.out" || status=1

echo "== testnet.json, Prometheus, Grafana, HTTP CONNECT, DNS, SOCKS, Nyx, README"
"$venv/bin/python" "$here/tools.py" "$dir/net/testnet.json" --testnet-out "$dir/testnet.out" \
    --root "$root" | tee "$dir/tools.out" || status=1

echo "== the README's metrics/ports command: python3 tools/check-ports.py (its own test network)"
readme_n=0
if "$venv/bin/python" "$root/tools/check-ports.py" --allium "$bin" | tee "$dir/check-ports.out" &&
    grep -q '^PASSED$' "$dir/check-ports.out"; then
    readme_n=1
else
    echo "FAIL: tools/check-ports.py" | tee -a "$dir/tools.out"; status=1
fi

stem_n=$(sed -n 's/^stem: \([0-9]*\) checks passed$/\1/p' "$dir/stem.out")
tools_n=$(sed -n 's/^tools: \([0-9]*\) checks passed.*/\1/p' "$dir/tools.out")
failed=$(cat "$dir/stem.out" "$dir/tools.out" | { grep -c '^FAIL' || true; })
echo "== summary: $(( ${stem_n:-0} + ${tools_n:-0} + readme_n )) checks passed (stem ${stem_n:-0}, tools ${tools_n:-0}, check-ports $readme_n), $failed failed"
exit "$status"
