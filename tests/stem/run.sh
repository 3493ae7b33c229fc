#!/usr/bin/env bash
# Drive Allium's control port with the tools operators use: stem (PyPI, in a venv) and Nyx
# (Debian) in tmux. Starts `allium testnet`, runs check.py (circuit listing, NEWNYM, BW events),
# then runs Nyx against a relay's control port and checks that its bandwidth panel renders
# without a traceback. Not part of `cargo test` (it installs packages); needs root for apt-get
# when nyx or tmux is missing.
#
#   bash tests/stem/run.sh            # uses $CARGO_TARGET_DIR (or ./target)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
venv=${ALLIUM_STEM_VENV:-$target/stem-venv}

if ! "$venv/bin/python" -c 'import stem' 2>/dev/null; then
    echo "== installing stem from PyPI into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet stem dnspython prometheus_client
fi
if ! command -v nyx >/dev/null || ! command -v tmux >/dev/null; then
    echo "== installing nyx and tmux from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nyx tmux >/dev/null
fi

echo "== building allium"
(cd "$root" && cargo build --quiet --bin allium)
bin=$target/debug/allium

dir=$(mktemp -d /tmp/allium-stem.XXXXXX)
session=allium-nyx-$$
cleanup() {
    tmux kill-session -t "$session" 2>/dev/null || true
    if [ -n "${net_pid:-}" ]; then kill "$net_pid" 2>/dev/null || true; wait "$net_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT

echo "== starting a test network in $dir"
"$bin" testnet --socks-port 0 --data-dir "$dir/net" >"$dir/testnet.out" 2>&1 &
net_pid=$!
for _ in $(seq 1 120); do
    [ -s "$dir/net/testnet.json" ] && break
    kill -0 "$net_pid" 2>/dev/null || { cat "$dir/testnet.out"; echo "FAIL: testnet exited"; exit 1; }
    sleep 1
done
[ -s "$dir/net/testnet.json" ] || { echo "FAIL: testnet not ready"; exit 1; }

echo "== stem"
"$venv/bin/python" "$here/check.py" "$dir/net/testnet.json" --live-setconf

echo "== nyx"
relay_port=$("$venv/bin/python" -c '
import json, sys
info = json.load(open(sys.argv[1]))
print(next(n["control_port"] for n in info["nodes"] if n["role"] == "relay" and n.get("control_port")).rsplit(":", 1)[1])
' "$dir/net/testnet.json")
# (Debian's nyx 2.1.0 crashes with `-d` on Python 3.11: platform.dist() is gone; so no debug log.)
# Nyx keeps its settings under $HOME/.nyx; give it a clean one.
export HOME="$dir/home"
mkdir -p "$HOME"
tmux new-session -d -s "$session" -x 150 -y 45 \
    "nyx -i 127.0.0.1:$relay_port 2>'$dir/nyx.stderr'; echo NYX-EXITED; sleep 60"
sleep 8
tmux capture-pane -p -t "$session" >"$dir/nyx-pane.txt"
cat "$dir/nyx-pane.txt" | sed -e 's/[[:space:]]*$//' | grep -v '^$' | head -40
status=0
if grep -q "Traceback" "$dir/nyx-pane.txt" "$dir/nyx.stderr" 2>/dev/null; then
    echo "FAIL: nyx printed a traceback"; cat "$dir/nyx.stderr"; status=1
fi
if grep -q "NYX-EXITED" "$dir/nyx-pane.txt"; then
    echo "FAIL: nyx exited"; cat "$dir/nyx.stderr"; status=1
fi
if ! grep -q "Download" "$dir/nyx-pane.txt" || ! grep -q "Upload" "$dir/nyx-pane.txt"; then
    echo "FAIL: nyx's bandwidth panel (Download/Upload graphs) is not on the screen"; status=1
fi
[ "$status" = 0 ] && echo "nyx: bandwidth panel rendered, no traceback"

echo "== ports and metrics (Prometheus's parser, dnspython over UDP and TCP, curl)"
"$venv/bin/python" "$root/tools/check-ports.py" --allium "$bin" || status=1
exit "$status"
