#!/usr/bin/env bash
# Instructions per task, counted by valgrind's callgrind: Flota's worker and
# scheduler running gpu-bound, and the raw lapin ceiling (`flotactl bench
# --ceiling-only`) on the same broker and gpusim.
#
# CPU seconds on a shared machine move by a third from one run to the next;
# an instruction count does not (the same binary and workload give the same
# count whatever else runs). So this shows what a code change did to the
# work per task, in user space; it does not see the kernel (system calls,
# thread switches), which `flotactl bench` includes.
#
# Each side runs twice, with N and 2N tasks; the difference divided by the
# extra tasks is the cost of one task, with start-up, warm-up and shutdown
# taken out. Large moves (`memcpy` of big futures) count one instruction per
# byte under valgrind, so they weigh more here than in time.
#
# Usage: ops/bench-instructions.sh [N]   (default 500; takes a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
N=${1:-500}
case "$N" in '' | *[!0-9]*) echo "N must be a number of tasks" >&2; exit 64 ;; esac

./ops/ensure-services.sh --profiler
cargo build --release --workspace --bins --quiet

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# flotactl starts the fleet's binaries from its own directory (a copy: the
# kernel resolves a symlink to its target): there, the worker and the scheduler
# are wrappers that run the real ones under callgrind.
release=$(pwd)/target/release
for bin in flotactl flota-gpusim; do cp "$release/$bin" "$work/$bin"; done
for bin in flota-worker flota-scheduler; do
    cat > "$work/$bin" << EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file="$work/out/$bin.%p.\$FLOTA_IR_RUN" "$release/$bin" "\$@"
EOF
    chmod +x "$work/$bin"
done
mkdir -p "$work/out"

# The total count of a callgrind file ("summary:" or "totals:" line).
total() { sed -n 's/^\(summary\|totals\): *\([0-9]*\).*/\2/p' "$1" | head -1; }
sum() { local s=0 f; for f in "$@"; do s=$((s + $(total "$f"))); done; echo "$s"; }

for n in "$N" $((2 * N)); do
    echo "fleet, $n tasks (and the bench's warm-up) …" >&2
    FLOTA_IR_RUN=$n FLOTA_PREFIX="flota-ir-$$" "$work/flotactl" bench --scenario gpu-bound \
        --n "$n" --json "$work/fleet.$n.json" > /dev/null
    echo "ceiling, $n tasks …" >&2
    FLOTA_PREFIX="flota-ir-$$" valgrind --tool=callgrind --callgrind-out-file="$work/out/ceiling.$n" \
        "$release/flotactl" bench --scenario gpu-bound --ceiling-only --n "$n" > /dev/null 2>&1
done

# The bench runs warm-up tasks before the measured n: n/10, within 10..500
# (`warm` in scheduler/src/ctl/bench.rs; change both together).
tasks() { local n=$1 w=$(($1 / 10)); [ "$w" -lt 10 ] && w=10; [ "$w" -gt 500 ] && w=500; echo $((n + w)); }
extra_fleet=$(($(tasks $((2 * N))) - $(tasks "$N")))
per_task() { echo $((($2 - $1) / $3)); }
worker=$(per_task "$(sum "$work"/out/flota-worker.*."$N")" "$(sum "$work"/out/flota-worker.*.$((2 * N)))" "$extra_fleet")
scheduler=$(per_task "$(sum "$work"/out/flota-scheduler.*."$N")" "$(sum "$work"/out/flota-scheduler.*.$((2 * N)))" "$extra_fleet")
ceiling=$(per_task "$(total "$work/out/ceiling.$N")" "$(total "$work/out/ceiling.$((2 * N))")" "$N")
fleet=$((worker + scheduler))
echo "instructions per task (gpu-bound, callgrind; $N and $((2 * N)) tasks)"
printf '  worker     %9d\n  scheduler  %9d\n  fleet      %9d\n  ceiling    %9d\n' \
    "$worker" "$scheduler" "$fleet" "$ceiling"
awk -v f="$fleet" -v c="$ceiling" 'BEGIN { if (c > 0) printf "  fleet / ceiling  %.2fx\n", f / c }'
