#!/usr/bin/env bash
# Supply-chain checks with cargo-deny against deny.toml: banned crates and
# duplicate versions, the license allow-list, and crates.io as the only
# source. Installs cargo-deny (into ~/.cargo/bin) if it is missing; the
# first build takes several minutes.
#
#   bench/deny.sh               bans licenses sources (works offline)
#   bench/deny.sh advisories    also the RustSec advisories: needs to reach
#                               github.com/rustsec/advisory-db, so only on a
#                               connected machine or CI
set -euo pipefail
cd "$(dirname "$0")/.."
if ! cargo deny --version >/dev/null 2>&1; then
  cargo install cargo-deny --locked
fi
checks=(bans licenses sources)
if [ "${1:-}" = "advisories" ]; then
  checks+=(advisories)
fi
exec cargo deny --locked check "${checks[@]}"
