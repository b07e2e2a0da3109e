#!/usr/bin/env bash
# Interop run: token-sidecar against two third-party OAuth2 servers on loopback.
#
#   tests/interop/run.sh [path/to/token-sidecar]
#
# Binary: the argument (relative to the current directory), else $TOKEN_SIDECAR_BIN, else
# target/release/token-sidecar (these two relative to the repo root; `cargo build --release`
# when that default is missing).
# Peers (versions pinned in package-lock.json and requirements.txt, installed here into
# node_modules/ and .venv/, both git-ignored; reinstalled only when the pins change):
#   node     @node-oauth/oauth2-server behind node:http (node-peer.js), refresh tokens rotate
#   authlib  Authlib + Flask on waitress (authlib_peer.py), JWT access tokens, refresh tokens
#            kept (Authlib's default; AUTHLIB_ROTATE=1 makes it rotate)
# Per peer: (a) steady traffic through the sidecar with 3 s access tokens, every request 200;
# (b) the refresh_token grant used (and the rotated / the kept refresh token used again);
# (r) the peer revokes every access token at the next API request (node: drops them; authlib:
# new signing key): that 401 invalid_token is replayed with a new token, every request 200;
# (c) the peer forgets its refresh tokens: still every request 200, the password grant takes
# over; (d) wrong password, wrong client secret: /readyz 503, the "token request rejected"
# log line with the OAuth error code, local 503s, no crash loop, no login storm; (e) a client
# secret with reserved characters, with the client_auth setting this peer needs; (f) the
# client_credentials grant (RFC 6749 4.4), configured as a [credentials.NAME] profile behind a
# [route.NAME] with prefix /peer/: steady traffic, every request 200, a new client_credentials
# grant for each token (the peers issue no refresh token with it), the revocation replay, and a
# wrong client secret refused as in (d).
# Env: STEADY_SECONDS (16), AFTER_FORGET_SECONDS (6), RATE (20 req/s), PEERS ("node authlib"),
#      KEEP_WORK=1 (keep the temp dir with configs and logs).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
START=$(date +%s)

STEADY_SECONDS=${STEADY_SECONDS:-16}
AFTER_FORGET_SECONDS=${AFTER_FORGET_SECONDS:-6}
RATE=${RATE:-20}
PEERS=${PEERS:-node authlib}
AUTHLIB_ROTATE=${AUTHLIB_ROTATE:-0}

if [[ $# -ge 1 ]]; then
  BIN=$1
  [[ $BIN == /* ]] || BIN="$PWD/$BIN"
else
  BIN=${TOKEN_SIDECAR_BIN:-target/release/token-sidecar}
  [[ $BIN == /* ]] || BIN="$ROOT/$BIN"
  if [[ ! -x $BIN && $BIN == "$ROOT/target/release/token-sidecar" ]]; then
    echo "interop: building $BIN"
    (cd "$ROOT" && cargo build --release)
  fi
fi
if [[ ! -x $BIN ]]; then
  echo "interop: no token-sidecar binary at $BIN" >&2
  exit 2
fi
# The sidecar reads TOKEN_SIDECAR_<SECTION>__<KEY> overrides: none may leak in from here.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^TOKEN_SIDECAR_' || true)

for p in $PEERS; do
  [[ $p == node || $p == authlib ]] || { echo "interop: unknown peer '$p' (node, authlib)" >&2; exit 2; }
done
for tool in node npm python3; do
  command -v "$tool" >/dev/null || { echo "interop: $tool is required" >&2; exit 2; }
done

# ---------------------------------------------------------------- dependencies
install_node() {
  local stamp="$HERE/node_modules/.interop-stamp" want
  want=$( (cat "$HERE/package.json" "$HERE/package-lock.json"; node --version) | sha256sum | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" && -f $HERE/node_modules/@node-oauth/oauth2-server/package.json ]]; then
    return
  fi
  echo "interop: npm ci (tests/interop/node_modules)"
  (cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$stamp"
}
install_python() {
  local venv="$HERE/.venv" stamp="$HERE/.venv/.interop-stamp" want
  want=$( (cat "$HERE/requirements.txt"; python3 --version) | sha256sum | cut -d' ' -f1)
  if [[ -f $stamp && $(cat "$stamp") == "$want" && -x $venv/bin/python ]]; then
    return
  fi
  echo "interop: pip install (tests/interop/.venv)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps -r "$HERE/requirements.txt"
  "$venv/bin/python" -m pip check --disable-pip-version-check >/dev/null
  echo "$want" > "$stamp"
}
install_node
install_python
PY="$HERE/.venv/bin/python"
H() { "$PY" "$HERE/interop.py" "$@"; }

# ---------------------------------------------------------------- processes, checks
PASS=0
FAIL=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/token-sidecar-interop.XXXXXX")
PIDS=()
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? pid
  trap - EXIT
  for pid in "${PIDS[@]+"${PIDS[@]}"}"; do stop_pid "$pid"; done
  if [[ $rc != 0 && ${DONE:-0} != 1 ]]; then
    echo "interop: aborted (exit $rc)"
    echo "interop: $PASS passed, $((FAIL + 1)) failed"
  fi
  if [[ ${KEEP_WORK:-0} == 1 || $rc != 0 ]]; then
    echo "interop: logs and configs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

check() { # check "description" command...
  local what=$1
  shift
  if "$@"; then
    PASS=$((PASS + 1))
    echo "  ok   $what"
  else
    FAIL=$((FAIL + 1))
    echo "  FAIL $what"
  fi
}
alive() { kill -0 "$1" 2>/dev/null; }
show_logs() { # on failure: the end of each log of this peer
  local f
  for f in "$@"; do
    [[ -f $f ]] || continue
    echo "  ---- tail $f"
    tail -n 25 "$f" | sed 's/^/  | /'
  done
}

# ---------------------------------------------------------------- one peer
CLIENT_ID=interop-client
CLIENT_SECRET=interop-client-secret
USERNAME=backoffice
PASSWORD=backoffice-password
ODD_CLIENT_ID=odd-client
ODD_SECRET='p%41ss+w:rd/='   # '%41' reads as 'A' to a server that percent-decodes Basic credentials

write_config() { # file client_id secret_file password_file client_auth
  cat > "$1" <<EOF
[proxy]
listen = "127.0.0.1:$SIDE_PORT"
upstream = "http://127.0.0.1:$PEER_PORT/"
retry_on_401 = "invalid_token"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[oauth]
token_url = "http://127.0.0.1:$PEER_PORT/oauth/token"
client_id = "$2"
client_secret_file = "$3"
username = "$USERNAME"
password_file = "$4"
params_in = "form"
client_auth = "$5"
timeout = "10s"

[log]
format = "json"
level = "info"
EOF
}

write_cc_config() { # file client_id secret_file: the routes form, one client_credentials profile
  cat > "$1" <<EOF
[proxy]
listen = "127.0.0.1:$SIDE_PORT"
retry_on_401 = "invalid_token"

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[credentials.peer]
grant = "client_credentials"
token_url = "http://127.0.0.1:$PEER_PORT/oauth/token"
client_id = "$2"
client_secret_file = "$3"
params_in = "form"
client_auth = "basic"
timeout = "10s"

[route.peer]
prefix = "/peer/"
upstream = "http://127.0.0.1:$PEER_PORT/"
credentials = "peer"

[log]
format = "json"
level = "info"
EOF
}

SIDE_PID=
start_sidecar() { # tag config
  SIDE_LOG="$PW/sidecar-$1.log"
  "$BIN" --config "$2" > "$SIDE_LOG" 2>&1 &
  SIDE_PID=$!
  PIDS+=("$SIDE_PID")
}
stop_sidecar() {
  [[ -n $SIDE_PID ]] && stop_pid "$SIDE_PID"
  SIDE_PID=
}
# Figures read from the peer and the sidecar; -1 when they cannot be read (the check fails).
stat_of() { { H get "$PEER/_admin/stats" > "$PW/stats.json" && H json "$PW/stats.json" "$1"; } || echo -1; }
metric_of() { { H get "$ADMIN/metrics" > "$PW/metrics.txt" && H metric "$PW/metrics.txt" "$@"; } || echo -1; }
rejected_of() { stat_of "sum(v for k, v in d['rejected'].items() if k.startswith('$1:'))"; }

# refused_login LABEL TAG CONFIG GRANT WANT PATH: starts a sidecar on CONFIG whose GRANT the peer
# refuses with the OAuth error WANT: /readyz 503, one ERROR "token request rejected" line with the
# grant and the code, a proxied request to PATH answered 503 with Retry-After, still running after
# ~10 s (no crash loop), at most 3 refused logins (no login storm). Stops the sidecar.
# revocation_replay LABEL URL OUT.json [PATH]: the peer revokes every access token at the next API
# request; 3 s of traffic to URL (the peer sees PATH) must all be 200, some replayed after the 401.
# Sets REQ, NON (non-200 and transport errors), BAD (unexpected bodies) and REPLAYS.
revocation_replay() {
  local label=$1 url=$2 out=$3 path=${4:-} before after
  echo "-- $label peer revokes every access token at the next API request; 3s more"
  before=$(metric_of token_sidecar_upstream_retries_total reason=401)
  H post "$PEER/_admin/revoke-access" > /dev/null
  H load "$url" 3 "$RATE" "$out" ${path:+"$path"}
  REQ=$(H json "$out" "d['requests']")
  NON=$(H json "$out" "d['non_200'] + d['transport_errors']")
  BAD=$(H json "$out" "d['bad_bodies']")
  after=$(metric_of token_sidecar_upstream_retries_total reason=401)
  REPLAYS=$((after - before))
  echo "   $(H json "$out" "{k: d[k] for k in ('requests', 'statuses', 'transport_errors', 'max_latency_ms', 'seconds')}")"
  check "$label $REQ requests after the revocation, every one 200 ($REPLAYS replayed after a 401)" \
    test "$NON" -eq 0 -a "$BAD" -eq 0 -a "$REPLAYS" -gt 0
  [[ $NON == 0 && $BAD == 0 ]] || echo "   first failures: $(H json "$out" "d['first_failures']")"
}

refused_login() {
  local label=$1 tag=$2 cfg=$3 grant=$4 want=$5 path=$6 before after lines ok_line probe_pid
  before=$(rejected_of "$grant")
  start_sidecar "$tag" "$cfg"
  check "$label: /readyz 503 within 5s" H wait-status "$ADMIN/readyz" 503 5 "$SIDE_PID"
  ok_line=false
  for _ in $(seq 1 50); do
    if H log-rejected "$SIDE_LOG" | grep -q -- "^ERROR $grant $want\$"; then ok_line=true; break; fi
    sleep 0.1
  done
  lines=$(H log-rejected "$SIDE_LOG" | sort | uniq -c | sed 's/^ *//' | paste -sd';' -)
  check "$label: ERROR \"token request rejected\" grant=$grant error=$want [${lines:-none}]" $ok_line
  # A proxied request waits up to proxy.token_wait (10s by default) for a token, then 503.
  H probe "$SIDE$path" "$PW/probe-$tag.json" &
  probe_pid=$!
  check "$label: never ready over 5s" H never-status "$ADMIN/readyz" 200 5
  wait "$probe_pid" || true
  check "$label: proxied request answered $(H json "$PW/probe-$tag.json" "str(d['status']) + ' after ' + str(d['elapsed_ms']) + ' ms: ' + d['body'][:40]")" \
    test "$(H json "$PW/probe-$tag.json" "str(d['status']) + ':' + str('retry-after' in d['headers'])")" = "503:True"
  check "$label: still running after ~10s (no crash loop)" alive "$SIDE_PID"
  after=$(rejected_of "$grant")
  check "$label: no login storm ($((after - before)) refused $grant grants, <= 3)" \
    test $((after - before)) -ge 1 -a $((after - before)) -le 3
  stop_sidecar
}

run_peer() {
  local name=$1 fails_before=$FAIL
  PW="$WORK/$name"
  mkdir -p "$PW"
  read -r PEER_PORT SIDE_PORT ADMIN_PORT < <(H free-ports 3)
  PEER="http://127.0.0.1:$PEER_PORT"
  SIDE="http://127.0.0.1:$SIDE_PORT"
  ADMIN="http://127.0.0.1:$ADMIN_PORT"
  local -a peer_env=(PORT="$PEER_PORT" HOST=127.0.0.1 CLIENT_ID="$CLIENT_ID" CLIENT_SECRET="$CLIENT_SECRET"
    USERNAME="$USERNAME" PASSWORD="$PASSWORD" ACCESS_TTL=3 REFRESH_TTL=60
    EXTRA_CLIENTS="$ODD_CLIENT_ID:$ODD_SECRET")
  local wrong_password_error wrong_client_error odd_auth version
  case $name in
    node)
      env "${peer_env[@]}" node "$HERE/node-peer.js" > "$PW/peer.log" 2>&1 &
      wrong_password_error=invalid_grant wrong_client_error=invalid_client odd_auth=basic
      version="@node-oauth/oauth2-server $(cd "$HERE" && node -p 'require("@node-oauth/oauth2-server/package.json").version')"
      ;;
    authlib)
      env "${peer_env[@]}" ROTATE="$AUTHLIB_ROTATE" "$PY" "$HERE/authlib_peer.py" > "$PW/peer.log" 2>&1 &
      wrong_password_error=invalid_request wrong_client_error=invalid_client odd_auth=basic-rfc
      version="Authlib $("$PY" -c 'import authlib; print(authlib.__version__)')"
      ;;
  esac
  local peer_pid=$!
  PIDS+=("$peer_pid")
  echo
  echo "== $name: $version on $PEER, sidecar $SIDE (admin $ADMIN)"
  if ! H wait-status "$PEER/_admin/health" 200 30 "$peer_pid"; then
    check "$name peer starts" false
    show_logs "$PW/peer.log"
    return
  fi
  printf '%s' "$CLIENT_SECRET" > "$PW/client_secret"
  printf '%s' "$PASSWORD" > "$PW/password"
  printf '%s' "wrong-$CLIENT_SECRET" > "$PW/client_secret.wrong"
  printf '%s' "wrong-$PASSWORD" > "$PW/password.wrong"
  printf '%s' "$ODD_SECRET" > "$PW/odd_secret"
  write_config "$PW/good.toml" "$CLIENT_ID" "$PW/client_secret" "$PW/password" basic
  write_config "$PW/bad-password.toml" "$CLIENT_ID" "$PW/client_secret" "$PW/password.wrong" basic
  write_config "$PW/bad-secret.toml" "$CLIENT_ID" "$PW/client_secret.wrong" "$PW/password" basic
  write_config "$PW/odd.toml" "$ODD_CLIENT_ID" "$PW/odd_secret" "$PW/password" "$odd_auth"

  # (a) steady traffic
  echo "-- $name (a) ${STEADY_SECONDS}s of steady requests at ${RATE}/s"
  start_sidecar good "$PW/good.toml"
  if ! H wait-status "$ADMIN/readyz" 200 20 "$SIDE_PID"; then
    check "$name sidecar ready (/readyz 200)" false
    show_logs "$SIDE_LOG" "$PW/peer.log"
    stop_sidecar
    return
  fi
  check "$name sidecar ready (/readyz 200)" true
  H load "$SIDE/api/echo" "$STEADY_SECONDS" "$RATE" "$PW/load-a.json"
  local req_a non_a bad_a min_req
  req_a=$(H json "$PW/load-a.json" "d['requests']")
  non_a=$(H json "$PW/load-a.json" "d['non_200'] + d['transport_errors']")
  bad_a=$(H json "$PW/load-a.json" "d['bad_bodies']")
  min_req=$((STEADY_SECONDS * RATE * 8 / 10))
  echo "   $(H json "$PW/load-a.json" "{k: d[k] for k in ('requests', 'statuses', 'transport_errors', 'max_latency_ms', 'seconds')}")"
  check "$name (a) $req_a requests (>= $min_req), every one 200 from the peer" \
    test "$non_a" -eq 0 -a "$bad_a" -eq 0 -a "$req_a" -ge "$min_req"
  [[ $non_a == 0 && $bad_a == 0 ]] || echo "   first failures: $(H json "$PW/load-a.json" "d['first_failures']")"

  # (b) the refresh_token grant, and the refresh token it needs next
  local pw_a rt_a rt_rej_a side_rt
  pw_a=$(stat_of "d['password']")
  rt_a=$(stat_of "d['refresh_token']")
  rt_rej_a=$(rejected_of refresh_token)
  side_rt=$(metric_of token_sidecar_token_requests_total grant=refresh_token outcome=success)
  echo "-- $name (b) peer grants: password $pw_a, refresh_token $rt_a; sidecar refresh_token successes $side_rt"
  check "$name (b) refresh_token grant used (peer $rt_a >= 3, sidecar metric $side_rt >= 3)" \
    test "$rt_a" -ge 3 -a "$side_rt" -ge 3
  if [[ $name == node || $AUTHLIB_ROTATE == 1 ]]; then
    local chain
    chain=$(stat_of "d['refresh_chain_max']")
    check "$name (b) rotation: each refresh used the refresh token of the previous one (chain $chain >= 2, refusals $rt_rej_a)" \
      test "$chain" -ge 2 -a "$rt_rej_a" -eq 0
  else
    local reuses
    reuses=$(stat_of "d['refresh_reuses']")
    check "$name (b) no rotation: the kept refresh token used again ($reuses reuses >= 1, refusals $rt_rej_a)" \
      test "$reuses" -ge 1 -a "$rt_rej_a" -eq 0
  fi

  # (r) access tokens revoked at the peer: upstream 401 invalid_token, replayed with a new token
  local req_r non_r bad_r
  revocation_replay "$name (r)" "$SIDE/api/echo" "$PW/load-r.json"
  req_r=$REQ non_r=$NON bad_r=$BAD

  # (c) the peer forgets its refresh tokens: the password grant takes over
  echo "-- $name (c) peer forgets its refresh tokens; ${AFTER_FORGET_SECONDS}s more"
  H post "$PEER/_admin/forget-refresh" > /dev/null
  H load "$SIDE/api/echo" "$AFTER_FORGET_SECONDS" "$RATE" "$PW/load-c.json"
  local req_c non_c bad_c pw_c rt_c rt_rej_c side_rej retries
  req_c=$(H json "$PW/load-c.json" "d['requests']")
  non_c=$(H json "$PW/load-c.json" "d['non_200'] + d['transport_errors']")
  bad_c=$(H json "$PW/load-c.json" "d['bad_bodies']")
  echo "   $(H json "$PW/load-c.json" "{k: d[k] for k in ('requests', 'statuses', 'transport_errors', 'max_latency_ms', 'seconds')}")"
  check "$name (c) $req_c requests after the forget, every one 200 from the peer" \
    test "$non_c" -eq 0 -a "$bad_c" -eq 0 -a "$req_c" -ge $((AFTER_FORGET_SECONDS * RATE * 8 / 10))
  [[ $non_c == 0 && $bad_c == 0 ]] || echo "   first failures: $(H json "$PW/load-c.json" "d['first_failures']")"
  pw_c=$(stat_of "d['password']")
  rt_c=$(stat_of "d['refresh_token']")
  rt_rej_c=$(rejected_of refresh_token)
  side_rej=$(metric_of token_sidecar_token_requests_total grant=refresh_token outcome=rejected)
  retries=$(metric_of token_sidecar_upstream_retries_total)
  check "$name (c) refused refresh -> password grant (password $pw_a -> $pw_c, refresh refusals $rt_rej_c, sidecar rejected $side_rej)" \
    test "$pw_c" -gt "$pw_a" -a "$rt_rej_c" -ge 1 -a "$side_rej" -ge 1
  check "$name (c) refreshes resume on the new refresh token (refresh_token $rt_a -> $rt_c)" \
    test "$rt_c" -gt $((rt_a + 1))
  check "$name (c) sidecar still running" alive "$SIDE_PID"
  local proxied
  proxied=$(metric_of token_sidecar_proxy_requests_total status_class=2xx)
  H get "$PEER/_admin/stats" > "$PW/stats-steady.json"
  stop_sidecar

  # (d) wrong password, wrong client secret
  local kind cfg want
  for kind in password client; do
    if [[ $kind == password ]]; then cfg="$PW/bad-password.toml" want=$wrong_password_error; else cfg="$PW/bad-secret.toml" want=$wrong_client_error; fi
    echo "-- $name (d) wrong $kind (the peer answers $want)"
    refused_login "$name (d) wrong $kind" "bad-$kind" "$cfg" password "$want" /api/echo
  done

  # (e) a client secret with reserved characters
  echo "-- $name (e) client secret '$ODD_SECRET' with client_auth = \"$odd_auth\""
  start_sidecar odd "$PW/odd.toml"
  if H wait-status "$ADMIN/readyz" 200 10 "$SIDE_PID"; then
    H probe "$SIDE/api/echo" "$PW/probe-odd.json"
    check "$name (e) client_auth=\"$odd_auth\" with secret '$ODD_SECRET': request 200" \
      test "$(H json "$PW/probe-odd.json" "d['status']")" = 200
  else
    check "$name (e) client_auth=\"$odd_auth\" with secret '$ODD_SECRET': /readyz 200" false
  fi
  stop_sidecar

  # (f) the client_credentials grant, behind a route with a prefix
  write_cc_config "$PW/cc-good.toml" "$CLIENT_ID" "$PW/client_secret"
  write_cc_config "$PW/cc-bad-secret.toml" "$CLIENT_ID" "$PW/client_secret.wrong"
  echo "-- $name (f) client_credentials: ${STEADY_SECONDS}s of steady requests at ${RATE}/s on route /peer/"
  local cc0 cc1 req_f non_f bad_f side_cc side_cc_rt req_fr non_fr bad_fr replays_f cc_proxied
  cc0=$(stat_of "d['client_credentials']")
  start_sidecar cc-good "$PW/cc-good.toml"
  if H wait-status "$ADMIN/readyz" 200 20 "$SIDE_PID"; then
    check "$name (f) client_credentials sidecar ready (/readyz 200)" true
    H load "$SIDE/peer/api/echo" "$STEADY_SECONDS" "$RATE" "$PW/load-f.json" /api/echo
    req_f=$(H json "$PW/load-f.json" "d['requests']")
    non_f=$(H json "$PW/load-f.json" "d['non_200'] + d['transport_errors']")
    bad_f=$(H json "$PW/load-f.json" "d['bad_bodies']")
    echo "   $(H json "$PW/load-f.json" "{k: d[k] for k in ('requests', 'statuses', 'transport_errors', 'max_latency_ms', 'seconds')}")"
    check "$name (f) $req_f requests on /peer/ (>= $min_req), every one 200 from the peer at /api/echo" \
      test "$non_f" -eq 0 -a "$bad_f" -eq 0 -a "$req_f" -ge "$min_req"
    [[ $non_f == 0 && $bad_f == 0 ]] || echo "   first failures: $(H json "$PW/load-f.json" "d['first_failures']")"
    cc1=$(stat_of "d['client_credentials']")
    side_cc=$(metric_of token_sidecar_token_requests_total credentials=peer grant=client_credentials outcome=success)
    side_cc_rt=$(metric_of token_sidecar_token_requests_total credentials=peer grant=refresh_token)
    check "$name (f) a new client_credentials grant per 3 s token (peer $((cc1 - cc0)) >= 3, sidecar $side_cc >= 3, refresh_token grants $side_cc_rt)" \
      test $((cc1 - cc0)) -ge 3 -a "$side_cc" -ge 3 -a "$side_cc_rt" -eq 0

    revocation_replay "$name (f)" "$SIDE/peer/api/echo" "$PW/load-fr.json" /api/echo
    req_fr=$REQ non_fr=$NON bad_fr=$BAD replays_f=$REPLAYS
    cc_proxied=$(metric_of token_sidecar_proxy_requests_total route=peer status_class=2xx)
    check "$name (f) sidecar still running" alive "$SIDE_PID"
  else
    check "$name (f) client_credentials sidecar ready (/readyz 200)" false
    req_f=0 non_f=0 bad_f=0 req_fr=0 non_fr=0 bad_fr=0 cc_proxied=0 cc1=$cc0 replays_f=0
  fi
  stop_sidecar

  echo "-- $name (f) client_credentials with a wrong client secret (the peer answers $wrong_client_error)"
  refused_login "$name (f) wrong client secret" cc-bad-secret "$PW/cc-bad-secret.toml" client_credentials \
    "$wrong_client_error" /peer/api/echo
  stop_pid "$peer_pid"

  local grants
  grants=$(H json "$PW/stats-steady.json" "{'password': d['password'], 'refresh_token': d['refresh_token'], 'rejected': d['rejected']}")
  SUMMARY+=("$name ($version): requests $((req_a + req_r + req_c)), non-200 $((non_a + non_r + non_c + bad_a + bad_r + bad_c)), grants $grants, proxied 2xx $proxied, upstream 401 replays $retries")
  SUMMARY+=("$name client_credentials: requests $((req_f + req_fr)), non-200 $((non_f + non_fr + bad_f + bad_fr)), client_credentials grants $((cc1 - cc0)), proxied 2xx $cc_proxied, upstream 401 replays $replays_f")
  if [[ $FAIL -gt $fails_before ]]; then
    show_logs "$PW/peer.log" "$PW"/sidecar-*.log
  fi
}

SUMMARY=()
for p in $PEERS; do
  run_peer "$p"
done

echo
echo "== summary (sidecar $BIN)"
for s in "${SUMMARY[@]+"${SUMMARY[@]}"}"; do echo "  $s"; done
echo "  took $(($(date +%s) - START))s"
DONE=1
echo "interop: $PASS passed, $FAIL failed"
[[ $FAIL -eq 0 ]]
