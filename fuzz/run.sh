#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 60) and print executions and coverage.
#   bash fuzz/run.sh [SECONDS]
# FUZZ_SANITIZER=address (or memory, ...) adds a sanitizer; stable rustc then needs
# RUSTC_BOOTSTRAP=1, which this script sets. The default is `none` (no -Z flag, plain stable).
# A crash leaves its input in fuzz/artifacts/<target>/; the script prints it as a Rust byte
# string to paste into a regression test next to the decoder, and exits non-zero.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
san=${FUZZ_SANITIZER:-none}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked || exit 1
if [ "$san" != none ]; then export RUSTC_BOOTSTRAP=1; fi
mkdir -p logs
targets=$(cargo fuzz list)
cargo fuzz build -s "$san" >logs/build.log 2>&1 || { tail -30 logs/build.log; exit 1; }
failed=0
printf '%-16s %12s %8s %8s  %s\n' target execs exec/s cov result
for t in $targets; do
    # New inputs go to target/corpus (not committed); the committed seeds are read only.
    mkdir -p "target/corpus/$t"
    log="logs/$t.log"
    if cargo fuzz run -s "$san" "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs" -print_final_stats=1 -rss_limit_mb=1024 -malloc_limit_mb=256 \
        >"$log" 2>&1; then
        result=ok
    else
        result=CRASH
        failed=1
    fi
    execs=$(grep -Eo 'number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)
    rate=$(grep -Eo 'average_exec_per_sec: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1)
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1 | grep -Eo '[0-9]+')
    printf '%-16s %12s %8s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "$result"
    if [ "$result" = CRASH ]; then
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | head -5 | sed 's/^/    /'
        for a in artifacts/"$t"/*; do
            [ -f "$a" ] || continue
            echo "    input $a (regression test bytes):"
            python3 -c 'import sys; d=open(sys.argv[1],"rb").read(); print("    b\"" + "".join("\\x%02x" % c for c in d) + "\"")' "$a"
        done
    fi
done
exit "$failed"
