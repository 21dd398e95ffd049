#!/usr/bin/env bash
# Licences and bans (cargo-deny), and no duplicate majors of the core crates.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deny >/dev/null 2>&1; then
  echo "[check-deps] installing cargo-deny" >&2
  cargo install cargo-deny --locked >&2
fi
cargo deny check licenses bans
dupes=$(cargo tree --workspace --duplicates --depth 0 -e normal --prefix none 2>/dev/null \
  | grep -E '^(tokio|lapin|redis|deadpool-redis|serde|serde_json|axum|hyper|reqwest|prometheus-client|opentelemetry|opentelemetry_sdk|tracing|tracing-subscriber|failsafe|backon) v' | sort -u || true)
if [ -n "$dupes" ]; then
  echo "[check-deps] duplicate majors of core crates:" >&2
  echo "$dupes" >&2
  exit 1
fi
echo "[check-deps] licences, bans and core-crate duplicates OK" >&2
