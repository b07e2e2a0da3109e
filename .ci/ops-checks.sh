#!/usr/bin/env bash
# Operations checks that need a real scrape: `promtool check metrics` on the
# /metrics page of the built binary running `token-sidecar demo` (the sidecar
# against its built-in stand-ins, on loopback), after some traffic so every
# series family has samples. Installs Debian's `prometheus` package for
# promtool when it is missing (idempotent). Expects target/debug/token-sidecar
# (cargo build); set TOKEN_SIDECAR_BIN to use another build.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    # Another job may hold the dpkg lock: wait for it rather than fail.
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version 2>&1 | head -1

bin=${TOKEN_SIDECAR_BIN:-target/debug/token-sidecar}
[ -x "$bin" ] || cargo build --quiet

# Free loopback ports, chosen by the kernel.
read -r port admin_port < <(python3 -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')

log=$(mktemp)
"$bin" demo --port "$port" --admin-port "$admin_port" >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -f "$log"' EXIT

for _ in $(seq 1 200); do
    curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null && break
    sleep 0.05
done
curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null || { cat "$log"; echo "demo never became ready" >&2; exit 1; }

# Traffic: an upstream answer and a sidecar-made one.
curl -s -o /dev/null "http://127.0.0.1:$port/backoffice/api/merchants?limit=5"
curl -s -o /dev/null --path-as-is "http://127.0.0.1:$port/backoffice/../etc"

scrape=$(curl -sf "http://127.0.0.1:$admin_port/metrics")
echo "promtool check metrics on a scrape of token-sidecar demo ($(grep -c '^# TYPE' <<<"$scrape") families, $(grep -vc '^#' <<<"$scrape") samples):"
promtool check metrics <<<"$scrape"
echo "promtool check metrics: OK (no errors, no lint findings)"
grep -E '^token_sidecar_(proxy_requests_total\{route="default",status_class="2xx"\}|local_responses_total\{error="bad_request",route="default"\}|token_valid\{credentials="default"\}) ' <<<"$scrape"

# The demo stops cleanly on SIGTERM with status 0.
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
trap 'rm -f "$log"' EXIT
echo "token-sidecar demo exited $status after SIGTERM"
[ "$status" -eq 0 ]
