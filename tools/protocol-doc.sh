#!/usr/bin/env bash
# Rebuild docs/PROTOCOL.md from its sections in docs/protocol/ (edit the sections, then run this).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  cat <<'HEAD'
# Allium protocol specification

Every byte Allium puts on the wire, and every key derivation, in one document. It is generated from
the section files in `docs/protocol/` by `tools/protocol-doc.sh`; edit those and regenerate.

Conventions: integers are big-endian unless a section says otherwise; `|` is concatenation; `[n]` is a
field of n bytes; lengths are in bytes; "destroy the circuit" means send DESTROY (reason NONE) both ways
and forget the circuit; "close the link" means drop the TCP connection without a further message.

HEAD
  echo "## Contents"
  echo
  for f in docs/protocol/*.md; do
    title=$(grep -m1 '^#' "$f" | sed 's/^#* *//')
    anchor=$(printf '%s' "$title" | tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9 -]//g; s/ /-/g')
    echo "- [$title](#$anchor)"
  done
  echo
  for f in docs/protocol/*.md; do
    echo
    # Every section starts at heading level 2 in the combined document.
    awk 'NR==1 && /^# / { sub(/^# /, "## "); print; next } { print }' "$f"
    echo
  done
} > docs/PROTOCOL.md
echo "wrote docs/PROTOCOL.md ($(wc -l < docs/PROTOCOL.md) lines)"
