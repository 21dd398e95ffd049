#!/usr/bin/env bash
# The README's second command: set up RabbitMQ and Redis where needed, build
# every binary, run the whole test suite against the real services.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
./ops/ensure-services.sh --test-tools
# Integration tests start the real binaries (gpusim, scheduler, workers).
cargo build --workspace --bins
# A bound on the whole run: a hang (say, a broker that stops answering) fails
# loudly here instead of running past CI's limit. The suite takes minutes.
timeout --kill-after=30s "${FLOTA_TEST_TIMEOUT:-45m}" cargo test --workspace --no-fail-fast "$@"
