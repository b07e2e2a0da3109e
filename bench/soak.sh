#!/usr/bin/env bash
# Soak: the release token-sidecar in front of the fake token endpoint and
# backoffice, with short-lived tokens, many keep-alive clients and faults
# injected on a schedule (see src/bin/soak.rs for the schedule and targets).
# Not part of the default test run; all traffic stays on 127.0.0.1.
#
#   bench/soak.sh [DURATION_SECS] [more soak options, see: target/release/soak --help]
#   bench/soak.sh 60 --outages 20    # recovery after 20 token endpoint outages
#
# Prints one summary line and one PASS/FAIL line per target; exits 1 when a
# target is missed, 2 when the soak itself could not run.
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-60}"
shift || true
cargo build --locked --release --bin token-sidecar --bin soak
exec target/release/soak --duration "$duration" --sidecar target/release/token-sidecar "$@"
