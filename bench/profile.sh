#!/usr/bin/env bash
# bench/profile.sh: user-space instructions per proxied request under
# callgrind (exactly repeatable, unlike wall-clock figures on a shared machine).
# Starts the same upstream and token endpoint as run.sh, runs token-sidecar
# under `valgrind --tool=callgrind`, warms up, zeroes the counters, drives
# `wrk -c CONNS -d DURATION`, dumps and divides by the requests served. The
# sidecar is pinned to one CPU (PROXY_CPUS, default 0) as in run.sh, so it
# runs its one-worker current-thread runtime.
# Needs valgrind, wrk, nginx, python3 (run.sh installs the last three).
#   bench/profile.sh [PROFILE]          # 8 connections, 10 s; PROFILE: a Cargo profile, default release
#   bench/profile.sh dist               # the profile the container image is built with
#   CONNS=64 DURATION=20 bench/profile.sh
#   ROUTES=8 bench/profile.sh           # the routes form with 8 routes, traffic on the last one
#   FAST_LANE=false bench/profile.sh    # everything through the hyper engine
# Builds `cargo build --profile PROFILE --bin token-sidecar` first (SKIP_BUILD=1:
# don't); SIDECAR=path measures that binary instead.
# KEEP_WORK=1 keeps the callgrind output for `callgrind_annotate --inclusive=yes`.
set -euo pipefail
BENCH=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$BENCH")
PROFILE=${1:-release}
case $PROFILE in dev) PROFILE_DIR=debug ;; *) PROFILE_DIR=$PROFILE ;; esac
if [ -z "${SIDECAR:-}" ] && [ "${SKIP_BUILD:-0}" != 1 ]; then
    echo "building token-sidecar (cargo build --profile $PROFILE)" >&2
    (cd "$ROOT" && cargo build --locked --quiet --profile "$PROFILE" --bin token-sidecar)
fi
SIDECAR=${SIDECAR:-$ROOT/target/$PROFILE_DIR/token-sidecar}
[ -x "$SIDECAR" ] || { echo "no binary at $SIDECAR" >&2; exit 1; }
CONNS=${CONNS:-8}
DURATION=${DURATION:-10}
PORT_BASE=${PORT_BASE:-27580}
UP_PORT=$PORT_BASE TOKEN_PORT=$((PORT_BASE + 1)) SIDECAR_PORT=$((PORT_BASE + 2)) ADMIN_PORT=$((PORT_BASE + 3))
WORK=$(mktemp -d /tmp/token-sidecar-profile.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "${KEEP_WORK:-0}" = 1 ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
wait_http() { for _ in $(seq 300); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 did not come up" >&2; exit 1; }

BODY='{"id":"b3f1c2d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d","status":"APPROVED","amount":{"value":"125.00","currency":"EUR"},"merchant":"bench-merchant-0001","created":"2024-05-01T12:00:00Z","tags":["bench","static"]}'
cat >"$WORK/upstream.conf" <<CONF
worker_processes 1;
pid $WORK/upstream.pid;
events { worker_connections 8192; }
http {
    access_log off;
    client_header_buffer_size 4k;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$UP_PORT;
        location / { default_type application/json; return 200 '$BODY'; }
    }
}
CONF
. "$ROOT/bench/sidecar_config.sh"
write_sidecar_config "$WORK/sidecar.toml"

python3 "$BENCH/token_endpoint.py" "$TOKEN_PORT" >"$WORK/token.log" 2>&1 &
PIDS+=("$!")
"$(command -v nginx || echo /usr/sbin/nginx)" -p "$WORK" -e "$WORK/upstream-error.log" -c "$WORK/upstream.conf" -g 'daemon off;' &
PIDS+=("$!")
wait_http "http://127.0.0.1:$UP_PORT/"
taskset -c "${PROXY_CPUS:-0}" valgrind --tool=callgrind --callgrind-out-file="$WORK/callgrind.out" \
    "$SIDECAR" --config "$WORK/sidecar.toml" >"$WORK/sidecar.log" 2>&1 &
VG=$!
PIDS+=("$VG")
wait_http "http://127.0.0.1:$SIDECAR_PORT/"
wrk -t1 -c "$CONNS" -d 3s "http://127.0.0.1:$SIDECAR_PORT$SIDECAR_PATH" >/dev/null
callgrind_control -z "$VG" >/dev/null
OUT=$(wrk -t1 -c "$CONNS" -d "${DURATION}s" "http://127.0.0.1:$SIDECAR_PORT$SIDECAR_PATH")
callgrind_control -d "$VG" >/dev/null
REQS=$(echo "$OUT" | awk '/requests in/ {print $1}')
DUMP=$(ls -t "$WORK"/callgrind.out.* | head -n1)
IR=$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
echo "$(basename "$(dirname "$SIDECAR")"): requests: $REQS  instructions: $IR  per request: $((IR / REQS))"
[ "${KEEP_WORK:-0}" = 1 ] && callgrind_annotate --inclusive=yes "$DUMP" 2>/dev/null | head -n 60 > "$WORK/annotate.txt"
exit 0
