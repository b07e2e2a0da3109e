#!/usr/bin/env bash
# Static checks of deploy/: what can be checked without a Docker engine or a
# cluster. Run from anywhere as root (CI does: `bash .ci/deploy-checks.sh`).
# It builds no Rust code. Tools go into git-ignored folders:
#   .ci/.venv        kubernetes-validate, checkov and hadolint, pinned in deploy/ci/requirements.txt
#   .ci/.tools       promtool, unpacked from Debian's prometheus package (no server installed)
#   .ci/.deploy-out  rendered manifests and one log per check, for a look after a failure
# Idempotent: a second run reuses what the first installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$SECONDS

# Kubernetes versions to validate against: the component needs native sidecars
# (1.29+); the pre-1.29 component is checked against the newest older release.
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
  log "installing kubernetes-validate, checkov and hadolint into $VENV"
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
# standalone kustomize. The components cannot be checked without one.
if command -v kubectl >/dev/null 2>&1; then
  KUSTOMIZE=(kubectl kustomize)
  kustomize_version=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')
elif command -v kustomize >/dev/null 2>&1; then
  KUSTOMIZE=(kustomize build)
  kustomize_version=$(kustomize version 2>/dev/null || true)
else
  log "neither kubectl nor kustomize found: the kustomize components cannot be rendered"
  exit 1
fi

render() { # render DIR OUTFILE
  "${KUSTOMIZE[@]}" "$1" >"$2"
}

log "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version 2>&1 | tail -n1), checkov $("$VENV/bin/checkov" --version), $("$VENV/bin/hadolint" --version), $("$PROMTOOL" --version 2>&1 | head -n1), kustomize ${kustomize_version:-unknown}"

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

validate() { # validate VERSION FILE...
  local version=$1
  shift
  "$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$version" "$@"
}
CHECKOV=(env CKV_SKIP_PACKAGE_UPDATE_CHECK=true BC_SKIP_MAPPING=TRUE "$VENV/bin/checkov" --quiet --compact --skip-download)

# The example app with the component, and with the pre-1.29 component.
example="$OUT/example.yaml"
pre129="$OUT/example-pre-1.29.yaml"
check "render deploy/examples/legacy-app (${KUSTOMIZE[*]})" render deploy/examples/legacy-app "$example"
check "render deploy/examples/legacy-app-pre-1.29 (${KUSTOMIZE[*]})" render deploy/examples/legacy-app-pre-1.29 "$pre129"
check "render deploy/kubernetes/monitoring (${KUSTOMIZE[*]})" render deploy/kubernetes/monitoring "$OUT/monitoring.yaml"
check "kubernetes-validate --strict $K8S_VERSION: deploy/examples/legacy-app, networkpolicy.yaml" \
  validate "$K8S_VERSION" "$example" deploy/examples/networkpolicy.yaml
check "kubernetes-validate --strict $K8S_VERSION_PRE129: deploy/examples/legacy-app-pre-1.29" \
  validate "$K8S_VERSION_PRE129" "$pre129"
check "wiring: config.toml paths = mounts, secrets as files, probes, PodMonitor, PrometheusRule = rules.yaml" \
  "$VENV/bin/python" deploy/ci/check_wiring.py "$example" "$pre129"

# The components on Deployments they did not come with (tests/data/kustomize/):
# each sample rendered alone, with the component and with the pre-1.29 one.
# check_component.py compares the renders as parsed objects and writes the
# sidecar alone (in a Deployment of its own) for checkov. Skipped there: the
# pod-level checks, which judge the app's pod rather than the sidecar
# (CKV_K8S_29 pod security context, CKV_K8S_38 service account token,
# CKV2_K8S_6 NetworkPolicy, CKV_K8S_21 namespace), and the two skipped for the
# sidecar everywhere (CKV_K8S_9 readiness probe, CKV_K8S_43 digest); all in
# deploy/README.md, "Checkov".
SIDECAR_SKIPS=CKV_K8S_29,CKV_K8S_38,CKV2_K8S_6,CKV_K8S_21,CKV_K8S_9,CKV_K8S_43
render_sample() { # render_sample SAMPLE_DIR OUT_PREFIX
  render "$1/app" "$2-app.yaml" && render "$1/native" "$2-native.yaml" && render "$1/pre-1.29" "$2-pre-1.29.yaml"
}
checkov_sidecar() { # checkov_sidecar FILE...
  [[ $# -gt 0 && -e $1 ]] || { echo "no sidecar-only manifest"; return 1; }
  for f in "$@"; do
    echo "== $f"
    "${CHECKOV[@]}" --framework kubernetes --skip-check "$SIDECAR_SKIPS" -f "$f" || return 1
  done
}
for sample in tests/data/kustomize/*/; do
  name=$(basename "$sample")
  s="$OUT/sample-$name"
  rm -f "$s"-sidecar-only-*.yaml
  check "render sample $name: alone, with the component, with the pre-1.29 component" \
    render_sample "${sample%/}" "$s"
  check "kubernetes-validate --strict $K8S_VERSION: sample $name alone and with the component" \
    validate "$K8S_VERSION" "$s-app.yaml" "$s-native.yaml"
  check "kubernetes-validate --strict $K8S_VERSION_PRE129: sample $name with the pre-1.29 component" \
    validate "$K8S_VERSION_PRE129" "$s-pre-1.29.yaml"
  check "component on sample $name: the app's objects unchanged, the sidecar exactly once" \
    "$VENV/bin/python" deploy/ci/check_component.py "$s-app.yaml" "$s-native.yaml" "$s-pre-1.29.yaml" "$s-sidecar-only"
  check "checkov: the sidecar's container in sample $name" \
    checkov_sidecar "$s"-sidecar-only-*.yaml
done

check "hadolint deploy/Dockerfile (every level, OCI labels required)" \
  "$VENV/bin/hadolint" --failure-threshold style \
  --require-label org.opencontainers.image.source:text \
  --require-label org.opencontainers.image.version:text \
  --require-label org.opencontainers.image.revision:text \
  --require-label org.opencontainers.image.licenses:text \
  deploy/Dockerfile
check "Dockerfile VERSION = Cargo.toml version" \
  bash -c 'c=$(sed -n "s/^version = \"\(.*\)\"/\1/p" Cargo.toml | head -n1); d=$(sed -n "s/^ARG VERSION=//p" deploy/Dockerfile); echo "Cargo.toml $c, Dockerfile $d"; [[ -n $c && $c == "$d" ]]'

# Skips: deploy/.checkov.yaml and inline checkov:skip, each listed in deploy/README.md.
# No download from the vendor's platform and no update check: nothing leaves the machine.
check "checkov -d deploy (skips listed in deploy/README.md)" \
  "${CHECKOV[@]}" --config-file deploy/.checkov.yaml -d deploy
# checkov -d renders some kustomizations itself, but not every one: the
# rendered examples, sidecar included, are checked explicitly.
check "checkov: the rendered examples (app + sidecar, native and pre-1.29)" \
  "${CHECKOV[@]}" --config-file deploy/.checkov.yaml --framework kubernetes -f "$example" -f "$pre129"

check "promtool check rules deploy/prometheus/rules.yaml" "$PROMTOOL" check rules deploy/prometheus/rules.yaml
check "promtool test rules deploy/prometheus/rules_test.yaml" "$PROMTOOL" test rules deploy/prometheus/rules_test.yaml

log "$((SECONDS - started)) s"
echo "deploy-checks: $passed passed, $failed failed"
((failed == 0))
