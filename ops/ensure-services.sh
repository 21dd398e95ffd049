#!/usr/bin/env bash
# Make sure RabbitMQ and Redis answer on this machine: reuse running ones,
# start stopped ones, install them with apt on Debian where missing, and wait
# until they answer. Idempotent. Also checks the build prerequisites (Rust, a
# C compiler). Used by ops/demo.sh, ops/test.sh and .ci/run.
#
# Only local services are managed: when FLOTA_AMQP_URL / FLOTA_REDIS_URL point
# at another host, this script just checks that they answer.
set -euo pipefail

log() { printf '[ensure-services] %s\n' "$*" >&2; }
die() { printf '[ensure-services] ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
fi

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found: install $* yourself (this script knows Debian/Ubuntu)"
  if [ "$APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
    APT_UPDATED=1
  fi
  log "apt-get install $*"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2 || die "apt-get install $* failed"
}

# host and port of a URL like scheme://user:pw@host:port/path
url_host() { local u="${1#*://}"; u="${u##*@}"; u="${u%%/*}"; echo "${u%%:*}"; }
url_port() { local u="${1#*://}"; u="${u##*@}"; u="${u%%/*}"; case "$u" in *:*) echo "${u##*:}";; *) echo "$2";; esac; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

is_local() { case "$1" in 127.0.0.1|localhost|::1|"[::1]") return 0;; *) return 1;; esac; }

wait_port() { # name host port seconds
  local i
  for ((i = 0; i < $4; i++)); do
    if port_open "$2" "$3"; then return 0; fi
    sleep 1
  done
  return 1
}

redis_ping() { # host port
  local reply
  reply=$( (exec 3<>"/dev/tcp/$1/$2"; printf 'PING\r\n' >&3; timeout 2 head -c 7 <&3) 2>/dev/null || true)
  case "$reply" in *PONG*|*NOAUTH*|*-ERR*) return 0;; *) return 1;; esac
}

ensure_redis() {
  local url="${FLOTA_REDIS_URL:-redis://127.0.0.1:6379/0}"
  local host port
  host=$(url_host "$url"); port=$(url_port "$url" 6379)
  if port_open "$host" "$port"; then log "Redis answers on $host:$port (reused)"; return 0; fi
  is_local "$host" || die "Redis at $host:$port does not answer, and it is not local: start it there"
  if ! command -v redis-server >/dev/null 2>&1; then apt_install redis-server; fi
  log "starting redis-server on 127.0.0.1:$port"
  # AOF on, so parked tasks survive a Redis restart (see ARCHITECTURE.md).
  local dir=/var/lib/redis
  $SUDO mkdir -p "$dir" 2>/dev/null || dir=$(mktemp -d)
  $SUDO redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$dir" \
    --appendonly yes --logfile "$dir/flota-redis.log" >&2 || die "redis-server did not start"
  wait_port redis "$host" "$port" 30 || die "Redis did not answer on $host:$port within 30 s"
  log "Redis is up"
}

ensure_rabbitmq() {
  local url="${FLOTA_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
  local host port
  host=$(url_host "$url"); port=$(url_port "$url" 5672)
  if port_open "$host" "$port"; then log "RabbitMQ answers on $host:$port (reused)"; return 0; fi
  is_local "$host" || die "RabbitMQ at $host:$port does not answer, and it is not local: start it there"
  if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
    apt_install rabbitmq-server
  fi
  log "starting rabbitmq-server"
  if command -v systemctl >/dev/null 2>&1 && systemctl is-system-running >/dev/null 2>&1; then
    $SUDO systemctl start rabbitmq-server >&2 || true
  fi
  if ! port_open "$host" "$port"; then
    $SUDO env PATH="$PATH:/usr/sbin" rabbitmq-server -detached >&2 2>/dev/null || true
  fi
  wait_port rabbitmq "$host" "$port" 120 || die "RabbitMQ did not answer on $host:$port within 120 s"
  # The port opens before the broker finishes booting; wait for it when we can.
  if command -v rabbitmqctl >/dev/null 2>&1; then
    $SUDO timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
  fi
  log "RabbitMQ is up"
}

ensure_build_tools() {
  if ! command -v cc >/dev/null 2>&1; then apt_install gcc libc6-dev; fi
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      log "cargo is in ~/.cargo/bin: add it to PATH (source ~/.cargo/env)"
    else
      die "Rust is missing: install Rust >= 1.89 with rustup (https://rustup.rs), then run this again"
    fi
  fi
}

# Tools only the test suite needs: promtool (alert rules) and headless Chromium (dashboard).
ensure_test_tools() {
  local missing=()
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  if [ "${#missing[@]}" -gt 0 ]; then apt_install "${missing[@]}"; fi
  # Debian's prometheus package starts a server we do not need; leave it be if it runs.
  return 0
}

# A broker under a memory or disk alarm accepts connections but blocks every
# publisher: everything would hang instead of failing. Say so up front.
check_rabbitmq_alarms() {
  local url="${FLOTA_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
  is_local "$(url_host "$url")" || return 0
  command -v rabbitmq-diagnostics >/dev/null 2>&1 || return 0
  local out
  if out=$($SUDO timeout 60 rabbitmq-diagnostics -q check_alarms 2>&1); then return 0; fi
  case "$out" in
    *alarm*) die "RabbitMQ reports a resource alarm, publishers would block: $out" ;;
    *) log "could not check RabbitMQ alarms (continuing): ${out:0:200}" ;;
  esac
}

main() {
  ensure_build_tools
  ensure_redis
  ensure_rabbitmq
  check_rabbitmq_alarms
  if [ "${1:-}" = "--test-tools" ]; then ensure_test_tools; fi
  if [ "${1:-}" = "--profiler" ]; then command -v valgrind >/dev/null 2>&1 || apt_install valgrind; fi
}

main "$@"
