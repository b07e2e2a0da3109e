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
#   TLS=1 bench/profile.sh              # the https upstream (private CA, proxy.ca_file)
#   PROXY=nginx bench/profile.sh       # nginx as the proxy instead (run.sh's config:
#                                       # one process, keep-alive pool, buffered log),
#                                       # for a side-by-side figure without the noise
#   CACHE_SIM=1 bench/profile.sh        # also simulated cache misses per request
#                                       # (callgrind --cache-sim=yes, L1 and a 1 MiB
#                                       # last level: a model, not this CPU's counters)
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
UP_TLS_PORT=$((PORT_BASE + 4))
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
. "$ROOT/bench/lib.sh"
make_upstream_cert "$WORK"
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
        listen 127.0.0.1:$UP_TLS_PORT ssl;
        ssl_certificate $WORK/upstream.pem;
        ssl_certificate_key $WORK/upstream.key;
        location / { default_type application/json; return 200 '$BODY'; }
    }
}
CONF
if [ "${TLS:-0}" = 1 ]; then
    UPSTREAM_URL=https://127.0.0.1:$UP_TLS_PORT/ CA_FILE=$WORK/ca.pem write_sidecar_config "$WORK/sidecar.toml"
else
    write_sidecar_config "$WORK/sidecar.toml"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
PROXY=${PROXY:-token-sidecar}
case $PROXY in
token-sidecar) PROXY_CMD=("$SIDECAR" --config "$WORK/sidecar.toml") NAME=$(basename "$(dirname "$SIDECAR")") ;;
nginx)
    # The same static token the sidecar gets from the token endpoint.
    TOKEN=$(bench_token)
    NGINX_PORT=$SIDECAR_PORT SIDECAR_PATH=/
    write_nginx_proxy_conf "$WORK/nginx-proxy.conf" "$([ "${TLS:-0}" = 1 ] && echo https || echo http)"
    # One process serves, as with worker_processes 1, but under valgrind.
    PROXY_CMD=("$NGINX" -p "$WORK" -e "$WORK/nginx-proxy-error.log" -c "$WORK/nginx-proxy.conf" -g 'daemon off; master_process off;')
    NAME=nginx
    ;;
*) echo "PROXY: token-sidecar or nginx, not $PROXY" >&2; exit 1 ;;
esac

python3 "$BENCH/token_endpoint.py" "$TOKEN_PORT" >"$WORK/token.log" 2>&1 &
PIDS+=("$!")
"$NGINX" -p "$WORK" -e "$WORK/upstream-error.log" -c "$WORK/upstream.conf" -g 'daemon off;' &
PIDS+=("$!")
wait_http "http://127.0.0.1:$UP_PORT/"
taskset -c "${PROXY_CPUS:-0}" valgrind --tool=callgrind $([ "${CACHE_SIM:-0}" = 1 ] && echo --cache-sim=yes --LL=1048576,16,64) --callgrind-out-file="$WORK/callgrind.out" \
    "${PROXY_CMD[@]}" >"$WORK/proxy.log" 2>&1 &
VG=$!
PIDS+=("$VG")
wait_http "http://127.0.0.1:$SIDECAR_PORT/"
wrk -t1 -c "$CONNS" -d 3s "http://127.0.0.1:$SIDECAR_PORT$SIDECAR_PATH" >/dev/null
callgrind_control -z "$VG" >/dev/null
OUT=$(wrk -t1 -c "$CONNS" -d "${DURATION}s" "http://127.0.0.1:$SIDECAR_PORT$SIDECAR_PATH")
callgrind_control -d "$VG" >/dev/null
REQS=$(echo "$OUT" | awk '/requests in/ {print $1}')
DUMP=$(ls -t "$WORK"/callgrind.out.* | head -n1)
# The totals line, without the percentages; the events in callgrind's order.
TOTALS=$(callgrind_annotate "$DUMP" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(/\([0-9.]+%\)/, ""); gsub(",", ""); print; exit}')
IR=$(echo "$TOTALS" | awk '{print $1}')
echo "$NAME: requests: $REQS  instructions: $IR  per request: $((IR / REQS))"
if [ "${CACHE_SIM:-0}" = 1 ]; then
    # Events: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw. The last level is
    # modelled as 1 MiB, the size of a server core's L2, so a working set
    # that outgrows it shows (valgrind's default copies the host's, which a
    # VM reports oddly).
    echo "$TOTALS" | awk -v n="$REQS" '{printf "per request: data reads %.0f, data writes %.0f; L1 misses: instruction %.0f, data read %.0f, data write %.0f; 1 MiB cache misses: %.0f\n", $2/n, $3/n, $4/n, $5/n, $6/n, ($7+$8+$9)/n}'
fi
[ "${KEEP_WORK:-0}" = 1 ] && callgrind_annotate --inclusive=yes "$DUMP" 2>/dev/null | head -n 60 > "$WORK/annotate.txt"
exit 0
