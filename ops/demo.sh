#!/usr/bin/env bash
# The README's first command: set up RabbitMQ and Redis where needed, build in
# release mode, and run `flotactl demo` (gpusim, scheduler and two workers on a
# fresh prefix, a mixed workload, a summary). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
./ops/ensure-services.sh
cargo build --release --workspace --bins
exec ./target/release/flotactl demo "$@"
