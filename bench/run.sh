#!/usr/bin/env bash
# bench/run.sh: token-sidecar against nginx as a bearer-injecting reverse
# proxy, side by side in one run. See bench/README.md.
#
# Measures, interleaved and repeated: the upstream directly, nginx (one
# worker, keep-alive upstream, static `Authorization: Bearer <1 KiB>`, access
# log buffered like the sidecar's) and token-sidecar with its defaults
# (access log, request ids), at each connection count, to the upstream over
# plain http and over https; then a streaming download through each.
# Prints medians across rounds and the ratios token-sidecar/nginx.
#
#   bench/run.sh [PROFILE]    # PROFILE: the Cargo profile to build and measure, default release
#
# Everything listens on 127.0.0.1 only; every process started here is
# stopped on exit. Settings (environment):
#   ROUNDS=3 DURATION=10 WARMUP=2 CONNS="64 256" WRK_THREADS=1
#   STREAM_MIB=1024 PORT_BASE=27480 (and the 5 ports after it) SKIP_BUILD=0
#   TLS=1: also the https upstream (0: plain http only)
#   PLACEMENT=pinned (default) | unpinned: every process may run on every CPU
#   PROXY_CPUS, UPSTREAM_CPUS, LOAD_CPUS: taskset CPU lists (see placement below)
#   FAST_LANE, ROUTES: the sidecar's config (bench/lib.sh)
#   VARIANTS="NAME:VAR=VALUE[,VAR=VALUE] ...": more targets, token-sidecar+NAME,
#     the plain-http sidecar with those environment overrides, e.g.
#     VARIANTS="nolog:TOKEN_SIDECAR_PROXY__ACCESS_LOG=false"; a NAME ending in
#     -tls uses the https upstream; BIN=PATH in the list runs that binary
#     (two builds side by side: VARIANTS="old-tls:BIN=/tmp/token-sidecar-old")
#   ONLY="TARGET ...": measure only these targets (e.g. "nginx-tls token-sidecar-tls")
#   STREAM=0: skip the streaming downloads
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-"64 256"}
WRK_THREADS=${WRK_THREADS:-1}
STREAM_MIB=${STREAM_MIB:-1024}
PORT_BASE=${PORT_BASE:-27480}
SKIP_BUILD=${SKIP_BUILD:-0}
PROFILE=${1:-release}
case $PROFILE in dev) PROFILE_DIR=debug ;; *) PROFILE_DIR=$PROFILE ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BENCH=$ROOT/bench

say() { printf '%s\n' "$*" >&2; }
die() { say "bench: $*"; exit 1; }

# --- tools ------------------------------------------------------------------
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
missing=()
command -v wrk >/dev/null || missing+=(wrk)
[ -x "$NGINX" ] || missing+=(nginx)
command -v curl >/dev/null || missing+=(curl)
command -v python3 >/dev/null || missing+=(python3)
command -v taskset >/dev/null || missing+=(util-linux)
command -v openssl >/dev/null || missing+=(openssl)
if ((${#missing[@]})); then
    say "installing ${missing[*]} from Debian packages"
    sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi

if [ "$SKIP_BUILD" != 1 ]; then
    say "building token-sidecar (cargo build --profile $PROFILE)"
    (cd "$ROOT" && cargo build --locked --quiet --profile "$PROFILE" --bin token-sidecar)
fi
SIDECAR=${SIDECAR:-$ROOT/target/$PROFILE_DIR/token-sidecar}
[ -x "$SIDECAR" ] || die "no binary at $SIDECAR"

# --- placement ----------------------------------------------------------------
# The proxy under test gets a core of its own; the load generator and the
# upstream share the rest. On 2 cores: proxy on 0, wrk and upstream on 1.
# PLACEMENT=unpinned lets the scheduler put every process anywhere, as in a
# pod without a CPU manager policy.
ncpu=$(nproc)
PLACEMENT=${PLACEMENT:-pinned}
if [ "$PLACEMENT" = unpinned ]; then
    : "${PROXY_CPUS:=0-$((ncpu - 1))}" "${UPSTREAM_CPUS:=0-$((ncpu - 1))}" "${LOAD_CPUS:=0-$((ncpu - 1))}"
elif [ "$ncpu" -ge 4 ]; then
    : "${PROXY_CPUS:=0}" "${UPSTREAM_CPUS:=1}" "${LOAD_CPUS:=2-$((ncpu - 1))}"
elif [ "$ncpu" -ge 2 ]; then
    : "${PROXY_CPUS:=0}" "${UPSTREAM_CPUS:=1}" "${LOAD_CPUS:=1}"
else
    : "${PROXY_CPUS:=0}" "${UPSTREAM_CPUS:=0}" "${LOAD_CPUS:=0}"
fi

UP_PORT=$PORT_BASE
NGINX_PORT=$((PORT_BASE + 1))
SIDECAR_PORT=$((PORT_BASE + 2))
ADMIN_PORT=$((PORT_BASE + 3))
TOKEN_PORT=$((PORT_BASE + 4))
UP_TLS_PORT=$((PORT_BASE + 5))
TLS=${TLS:-1}
python3 -c '
import socket, sys
for port in range(int(sys.argv[1]), int(sys.argv[1]) + 6):
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
' "$PORT_BASE" 2>/dev/null || die "ports $PORT_BASE-$UP_TLS_PORT are not all free on 127.0.0.1; set PORT_BASE"

# --- scratch space and clean-up ---------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/token-sidecar-bench.XXXXXX")
chmod 755 "$WORK" # nginx workers may run as another user
DATA_DIR=$WORK/data
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    DATA_DIR=$(mktemp -d /dev/shm/token-sidecar-bench.XXXXXX)
    chmod 755 "$DATA_DIR"
fi
mkdir -p "$DATA_DIR"
PIDS=()

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$DATA_DIR"
    if [ "${KEEP_WORK:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

wait_http() { # URL: until it answers 2xx, at most 10 s
    for _ in $(seq 100); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    die "$1 did not come up"
}

# --- fixtures -----------------------------------------------------------------
. "$ROOT/bench/lib.sh"
TOKEN=$(bench_token)
BODY='{"id":"b3f1c2d4-5e6f-4a7b-8c9d-0e1f2a3b4c5d","status":"APPROVED","amount":{"value":"125.00","currency":"EUR"},"merchant":"bench-merchant-0001","created":"2024-05-01T12:00:00Z","tags":["bench","static"]}'
if [ "${STREAM:-1}" != 0 ]; then
    say "creating a ${STREAM_MIB} MiB file in $DATA_DIR"
    dd if=/dev/zero of="$DATA_DIR/big.bin" bs=1M count="$STREAM_MIB" status=none
fi

make_upstream_cert "$WORK"

cat >"$WORK/upstream.conf" <<EOF
worker_processes 1;
pid $WORK/upstream.pid;
events { worker_connections 8192; }
http {
    access_log off;
    # The 1 KiB bearer header does not fit nginx's default 1k buffer, which
    # then leaks and slows down: give it 4k.
    client_header_buffer_size 4k;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    sendfile on;
    server {
        listen 127.0.0.1:$UP_PORT backlog=4096;
        listen 127.0.0.1:$UP_TLS_PORT ssl backlog=4096;
        ssl_certificate $WORK/upstream.pem;
        ssl_certificate_key $WORK/upstream.key;
        ssl_session_cache shared:SSL:1m;
        location = /big.bin { root $DATA_DIR; }
        location / {
            default_type application/json;
            return 200 '$BODY';
        }
    }
}
EOF

write_nginx_proxy_conf "$WORK/nginx-proxy.conf" http
write_nginx_proxy_conf "$WORK/nginx-tls-proxy.conf" https

UPSTREAM_URL=https://127.0.0.1:$UP_TLS_PORT/ CA_FILE=$WORK/ca.pem write_sidecar_config "$WORK/sidecar-tls.toml"
write_sidecar_config "$WORK/sidecar.toml"

# --- process helpers ----------------------------------------------------------
start_nginx() { # CONF CPUS NAME -> sets STARTED (master pid)
    taskset -c "$2" "$NGINX" -p "$WORK" -e "$WORK/$3-error.log" -c "$1" -g 'daemon off;' \
        >>"$WORK/$3-error.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
}

nginx_worker() { # MASTER -> the worker's pid (worker_processes 1)
    local w
    for _ in $(seq 100); do
        w=$(cat "/proc/$1/task/$1/children" 2>/dev/null | awk '{print $1}')
        [ -n "$w" ] && { echo "$w"; return; }
        sleep 0.05
    done
    die "nginx $1 has no worker"
}

start_sidecar() { # CONFIG [VAR=VALUE,...] -> sets STARTED
    local overrides=() env=() bin=$SIDECAR o
    [ -n "${2:-}" ] && IFS=, read -r -a overrides <<<"$2"
    for o in ${overrides[@]+"${overrides[@]}"}; do
        case $o in BIN=*) bin=${o#BIN=} ;; *) env+=("$o") ;; esac
    done
    [ -x "$bin" ] || die "no binary at $bin"
    env ${env[@]+"${env[@]}"} taskset -c "$PROXY_CPUS" "$bin" --config "$1" >"$WORK/sidecar.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
    wait_http "http://127.0.0.1:$ADMIN_PORT/readyz"
}

cpu_ticks() { # PID -> utime+stime in clock ticks (all threads)
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}

vm_hwm_kib() { # PID -> peak resident set size, KiB
    awk '/^VmHWM:/ {print $2}' "/proc/$1/status"
}

tree_hwm_kib() { # PID -> peak RSS of PID plus that of its children, KiB
    local total pid
    total=$(vm_hwm_kib "$1")
    for pid in $(cat "/proc/$1/task/$1/children" 2>/dev/null); do
        total=$((total + $(vm_hwm_kib "$pid")))
    done
    echo "$total"
}

# --- one measurement ----------------------------------------------------------
RESULTS=$WORK/results.tsv
STREAM_RESULTS=$WORK/stream.tsv
: >"$RESULTS"
: >"$STREAM_RESULTS"
mkdir -p "$WORK/wrk"

# Starts TARGET's server; sets URL, MEASURE_PID (whose CPU and RSS count),
# TREE_PID (the whole server: nginx's master and worker) and STOP_PID.
start_target() {
    case $1 in
    direct)
        URL=http://127.0.0.1:$UP_PORT
        MEASURE_PID=$UPSTREAM_WORKER
        TREE_PID=$UPSTREAM_MASTER
        STOP_PID=
        ;;
    nginx | nginx-tls)
        rm -f
        start_nginx "$WORK/$1-proxy.conf" "$PROXY_CPUS" nginx-proxy
        STOP_PID=$STARTED
        TREE_PID=$STARTED
        URL=http://127.0.0.1:$NGINX_PORT
        wait_http "$URL/"
        MEASURE_PID=$(nginx_worker "$STOP_PID")
        ;;
    token-sidecar | token-sidecar-tls | token-sidecar+*)
        local config=sidecar overrides=
        [[ $1 == *-tls ]] && config=sidecar-tls
        [[ $1 == token-sidecar+* ]] && overrides=$(variant_env "${1#token-sidecar+}")
        start_sidecar "$WORK/$config.toml" "$overrides"
        STOP_PID=$STARTED
        TREE_PID=$STARTED
        MEASURE_PID=$STARTED
        # The path's last slash is the one every request adds.
        URL=http://127.0.0.1:$SIDECAR_PORT${SIDECAR_PATH%/}
        ;;
    esac
}

stop_target() {
    if [ -n "$STOP_PID" ]; then
        stop_pid "$STOP_PID"
        forget_pid "$STOP_PID"
    fi
}

wrk_field() { # OUTPUT FIELD
    case $2 in
    requests) awk '/requests in/ {print $1}' <<<"$1" ;;
    rps) awk '/^Requests\/sec:/ {print $2}' <<<"$1" ;;
    p50 | p75 | p90 | p99 | max)
        # "     99%    3.21ms" (or "    Latency   1.2ms  0.3ms  40.1ms  ...") -> milliseconds
        awk -v q="${2#p}%" '($1 == q) || (q == "max%" && $1 == "Latency" && $2 != "Distribution") {
            v = (q == "max%") ? $4 : $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
            f = (u == "us") ? 0.001 : (u == "ms") ? 1 : (u == "s") ? 1000 : (u == "m") ? 60000 : 1
            printf "%.3f\n", v * f
        }' <<<"$1"
        ;;
    errors)
        awk '/Non-2xx/ {n += $NF} /Socket errors/ {
            for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) { sub(/,/, "", $i); n += $i } }
            END {print n + 0}' <<<"$1"
        ;;
    esac
}

measure() { # ROUND TARGET CONNS
    local round=$1 target=$2 conns=$3 out t0 t1 requests
    start_target "$target"
    taskset -c "$LOAD_CPUS" wrk -t"$WRK_THREADS" -c"$conns" -d"${WARMUP}s" "$URL/" >/dev/null
    t0=$(cpu_ticks "$MEASURE_PID")
    out=$(taskset -c "$LOAD_CPUS" wrk -t"$WRK_THREADS" -c"$conns" -d"${DURATION}s" --latency "$URL/")
    t1=$(cpu_ticks "$MEASURE_PID")
    # The whole latency distribution, kept with KEEP_WORK=1.
    printf '%s\n' "$out" >"$WORK/wrk/$round-$target-$conns.txt"
    requests=$(wrk_field "$out" requests)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$target" "$conns" \
        "$(wrk_field "$out" rps)" "$(wrk_field "$out" p50)" "$(wrk_field "$out" p99)" \
        "$requests" "$((t1 - t0))" "$(vm_hwm_kib "$MEASURE_PID")" "$(wrk_field "$out" errors)" \
        "$(tree_hwm_kib "$TREE_PID")" "$(wrk_field "$out" p90)" "$(wrk_field "$out" max)" >>"$RESULTS"
    say "$(tail -n1 "$RESULTS" | awk -F'\t' '{printf "round %s %-17s c=%-4s %9.0f req/s  p50 %6.2f ms  p99 %6.2f ms  errors %s", $1, $2, $3, $4, $5, $6, $10}')"
    stop_target
}

stream() { # ROUND TARGET
    local round=$1 target=$2 out
    start_target "$target"
    out=$(taskset -c "$LOAD_CPUS" curl -sf -o /dev/null -w '%{speed_download} %{size_download}' "$URL/big.bin")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$target" "${out% *}" "${out#* }" \
        "$(vm_hwm_kib "$MEASURE_PID")" "$(tree_hwm_kib "$TREE_PID")" >>"$STREAM_RESULTS"
    say "$(tail -n1 "$STREAM_RESULTS" | awk -F'\t' '{printf "round %s %-17s stream %7.0f MB/s (%s bytes)", $1, $2, $3 / 1e6, $4}')"
    stop_target
}

# --- run ----------------------------------------------------------------------
say "placement: proxy on CPU $PROXY_CPUS, upstream on CPU $UPSTREAM_CPUS, wrk on CPU $LOAD_CPUS"
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

python3 "$BENCH/token_endpoint.py" "$TOKEN_PORT" >"$WORK/token-endpoint.log" 2>&1 &
PIDS+=("$!")
start_nginx "$WORK/upstream.conf" "$UPSTREAM_CPUS" upstream
UPSTREAM_MASTER=$STARTED
wait_http "http://127.0.0.1:$UP_PORT/"
UPSTREAM_WORKER=$(nginx_worker "$UPSTREAM_MASTER")

variant_env() { # NAME -> its VAR=VALUE list from VARIANTS
    local v
    for v in ${VARIANTS:-}; do
        [ "${v%%:*}" = "$1" ] && { echo "${v#*:}"; return; }
    done
}

TARGETS=(direct nginx token-sidecar)
[ "$TLS" = 1 ] && TARGETS+=(nginx-tls token-sidecar-tls)
for v in ${VARIANTS:-}; do TARGETS+=("token-sidecar+${v%%:*}"); done
if [ -n "${ONLY:-}" ]; then
    all=("${TARGETS[@]}") TARGETS=()
    for t in "${all[@]}"; do [[ " $ONLY " == *" $t "* ]] && TARGETS+=("$t"); done
    [ ${#TARGETS[@]} -gt 0 ] || die "ONLY=\"$ONLY\" names none of: ${all[*]}"
fi
n=${#TARGETS[@]}
for round in $(seq "$ROUNDS"); do
    for conns in $CONNS; do
        # Rotate the order each round so no target always runs first.
        for i in $(seq 0 $((n - 1))); do
            measure "$round" "${TARGETS[$(((i + round + conns) % n))]}" "$conns"
        done
    done
    [ "${STREAM:-1}" = 0 ] && continue
    for i in $(seq 0 $((n - 1))); do
        stream "$round" "${TARGETS[$(((i + round) % n))]}"
    done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

python3 "$BENCH/summarize.py" "$RESULTS" "$STREAM_RESULTS" "$(getconf CLK_TCK)" <<EOF
machine: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
load average before/after: $LOAD_BEFORE / $LOAD_AFTER
placement: $PLACEMENT: proxy on CPU $PROXY_CPUS, upstream on CPU $UPSTREAM_CPUS, wrk -t$WRK_THREADS on CPU $LOAD_CPUS
sidecar: proxy.fast_lane ${FAST_LANE:-true (default)}, ${ROUTES:-0} routes (0: the single-upstream form)${VARIANTS:+; variants: $VARIANTS}
rounds: $ROUNDS x ${DURATION}s (after ${WARMUP}s warm-up), connections: $CONNS, stream: $STREAM_MIB MiB
versions: $("$NGINX" -v 2>&1 | sed 's/.*: //'), $(wrk -v 2>&1 | head -n1 | awk '{print $1, $2}'), $("$SIDECAR" --version)
EOF
