#!/usr/bin/env bash
# Static checks of deploy/: what can be checked without a Docker engine or a
# cluster. Run from anywhere as root (CI does: `bash .ci/deploy-checks.sh`).
# It builds no Rust code. Tools go into git-ignored folders:
#   .ci/.venv        kubernetes-validate and checkov, pinned in deploy/ci/requirements.txt
#   .ci/.tools       promtool, unpacked from Debian's prometheus package (no server installed)
#   .ci/.deploy-out  rendered manifests and one log per check, for a look after a failure
# Idempotent: a second run reuses what the first installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$SECONDS

# Kubernetes versions to validate against: the base needs native sidecars (1.29+);
# the pre-1.29 overlay is checked against the newest older release.
K8S_VERSION=1.29.0
K8S_VERSION_PRE129=1.28.0

VENV=.ci/.venv
TOOLS=.ci/.tools
OUT=.ci/.deploy-out
REQUIREMENTS=deploy/ci/requirements.txt
mkdir -p "$OUT" "$TOOLS"

log() { printf 'deploy-checks: %s\n' "$*"; }

# --- tools -------------------------------------------------------------------

# Python tools, reinstalled only when deploy/ci/requirements.txt changes.
stamp="$VENV/.deploy-checks.sha256"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  log "installing kubernetes-validate and checkov into $VENV"
  t=$SECONDS
  python3 -m venv "$VENV"
  if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS" >"$OUT/pip.log" 2>&1; then
    cat "$OUT/pip.log"
    exit 1
  fi
  echo "$want" >"$stamp"
  log "installed in $((SECONDS - t)) s"
fi

# promtool, from Debian's prometheus package: unpacked, not installed, so no
# Prometheus server (nor its service and web assets) lands on the machine.
PROMTOOL="$TOOLS/promtool"
if [[ ! -x "$PROMTOOL" ]]; then
  log "unpacking promtool from Debian's prometheus package into $TOOLS"
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  : >"$OUT/apt.log"
  fetch() { (cd "$dl" && apt-get download -o APT::Sandbox::User=root prometheus) >>"$OUT/apt.log" 2>&1; }
  if ! fetch; then
    # No package lists yet (a fresh machine): fetch them once, then retry.
    apt-get update -qq >>"$OUT/apt.log" 2>&1 || true
    fetch || { cat "$OUT/apt.log"; exit 1; }
  fi
  dpkg-deb --fsys-tarfile "$dl"/prometheus_*.deb | tar -x -C "$dl" ./usr/bin/promtool
  install -m 0755 "$dl/usr/bin/promtool" "$PROMTOOL"
  rm -rf "$dl"
  trap - EXIT
fi

# kustomize: kubectl's built-in one (kubectl is on these machines), else a
# standalone kustomize, else the base's resources are read as plain files and
# the overlay (which needs patches applied) is skipped.
if command -v kubectl >/dev/null 2>&1; then
  KUSTOMIZE=(kubectl kustomize)
  kustomize_version=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')
elif command -v kustomize >/dev/null 2>&1; then
  KUSTOMIZE=(kustomize build)
  kustomize_version=$(kustomize version 2>/dev/null || true)
else
  KUSTOMIZE=()
  kustomize_version=none
fi

render() { # render DIR OUTFILE
  if ((${#KUSTOMIZE[@]})); then
    "${KUSTOMIZE[@]}" "$1" >"$2"
  else
    "$VENV/bin/python" - "$1" >"$2" <<'PY'
import os, sys, yaml
root = sys.argv[1]
with open(os.path.join(root, "kustomization.yaml")) as f:
    kustomization = yaml.safe_load(f)
for resource in kustomization["resources"]:
    with open(os.path.join(root, resource)) as f:
        print("---\n" + f.read())
PY
  fi
}

log "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1), checkov $("$VENV/bin/checkov" --version), $("$PROMTOOL" --version 2>&1 | head -n1), kustomize ${kustomize_version:-unknown}"

# --- checks --------------------------------------------------------------------

passed=0
failed=0
# check NAME COMMAND...: runs one command, output to $OUT/<n>.log, shown on failure.
check() {
  local name=$1 n=$((passed + failed + 1))
  shift
  local out="$OUT/check-$n.log"
  if "$@" >"$out" 2>&1; then
    passed=$((passed + 1))
    printf 'PASS %s\n' "$name"
  else
    failed=$((failed + 1))
    printf 'FAIL %s (log: %s)\n' "$name" "$out"
    sed 's/^/    /' "$out"
  fi
}

base="$OUT/base.yaml"
pre129="$OUT/pre-1.29.yaml"
check "render deploy/kubernetes (${KUSTOMIZE[*]:-plain files})" render deploy/kubernetes "$base"
if ((${#KUSTOMIZE[@]})); then
  check "render deploy/overlays/pre-1.29 (${KUSTOMIZE[*]})" render deploy/overlays/pre-1.29 "$pre129"
  check "render deploy/kubernetes/monitoring (${KUSTOMIZE[*]})" render deploy/kubernetes/monitoring "$OUT/monitoring.yaml"
else
  log "SKIP deploy/overlays/pre-1.29: no kustomize here to apply its patches"
  pre129=-
fi

check "kubernetes-validate --strict $K8S_VERSION: deploy/kubernetes" \
  "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION" "$base"
if [[ "$pre129" != - ]]; then
  check "kubernetes-validate --strict $K8S_VERSION_PRE129: deploy/overlays/pre-1.29" \
    "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$K8S_VERSION_PRE129" "$pre129"
fi

check "wiring: config.toml paths = mounts, secrets as files, probes, PrometheusRule = rules.yaml" \
  "$VENV/bin/python" deploy/ci/check_wiring.py "$base" "$pre129"

# Skips: deploy/.checkov.yaml and inline checkov:skip, each listed in deploy/README.md.
# No download from the vendor's platform and no update check: nothing leaves the machine.
check "checkov -d deploy (skips listed in deploy/README.md)" \
  env CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE \
  "$VENV/bin/checkov" --config-file deploy/.checkov.yaml -d deploy --quiet --compact --skip-download

check "promtool check rules deploy/prometheus/rules.yaml" "$PROMTOOL" check rules deploy/prometheus/rules.yaml
check "promtool test rules deploy/prometheus/rules_test.yaml" "$PROMTOOL" test rules deploy/prometheus/rules_test.yaml

log "$((SECONDS - started)) s"
echo "deploy-checks: $passed passed, $failed failed"
((failed == 0))
