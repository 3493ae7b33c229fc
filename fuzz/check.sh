#!/usr/bin/env bash
# Prove that every fuzz target (and the seed generator) compiles, as plain binaries: no
# sanitizer, no cargo-fuzz, stable rustc. Uses fuzz/target unless CARGO_TARGET_DIR is set.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --bins --examples
