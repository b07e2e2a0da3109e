# Sourced by bench/run.sh and bench/profile.sh: the sidecar config both
# measure, so the two always benchmark the same thing.
# Needs SIDECAR_PORT, ADMIN_PORT, UP_PORT, TOKEN_PORT; writes $1.
# Optional (environment):
#   UPSTREAM_URL  the upstream base URL (default http://127.0.0.1:$UP_PORT/)
#   CA_FILE       proxy.ca_file, for an https upstream with a private CA
#   FAST_LANE     proxy.fast_lane (unset: the default, true)
#   ROUTES        0 (default): the single-upstream form; N >= 1: the routes
#                 form with N routes /r1/../rN/ to the same upstream
# Sets SIDECAR_PATH: the path to request (the last-declared route's prefix
# with ROUTES >= 1, so the route lookup does its whole work).
write_sidecar_config() {
  local upstream=${UPSTREAM_URL:-http://127.0.0.1:$UP_PORT/} routes=${ROUTES:-0} i
  {
    echo "[proxy]"
    echo "listen = [\"127.0.0.1:$SIDECAR_PORT\"]"
    [ -n "${FAST_LANE:-}" ] && echo "fast_lane = $FAST_LANE"
    if [ "$routes" -ge 1 ]; then
      [ -n "${CA_FILE:-}" ] && echo "ca_file = \"$CA_FILE\""
    else
      echo "upstream = \"$upstream\""
      [ -n "${CA_FILE:-}" ] && echo "ca_file = \"$CA_FILE\""
    fi
    echo "[admin]"
    echo "listen = \"127.0.0.1:$ADMIN_PORT\""
    if [ "$routes" -ge 1 ]; then
      echo "[credentials.bench]"
      echo "token_url = \"http://127.0.0.1:$TOKEN_PORT/oauth/token\""
      echo "client_id = \"bench\""
      echo "username = \"bench\""
      for i in $(seq "$routes"); do
        echo "[route.r$i]"
        echo "prefix = \"/r$i/\""
        echo "upstream = \"$upstream\""
        echo "credentials = \"bench\""
      done
      SIDECAR_PATH=/r$routes/
    else
      echo "[oauth]"
      echo "token_url = \"http://127.0.0.1:$TOKEN_PORT/oauth/token\""
      echo "client_id = \"bench\""
      echo "username = \"bench\""
      SIDECAR_PATH=/
    fi
  } >"$1"
  # Secrets from the environment, never on a command line.
  if [ "$routes" -ge 1 ]; then
    export TOKEN_SIDECAR_CREDENTIALS__BENCH__CLIENT_SECRET=bench-secret
    export TOKEN_SIDECAR_CREDENTIALS__BENCH__PASSWORD=bench-password
  else
    export TOKEN_SIDECAR_OAUTH__CLIENT_SECRET=bench-secret
    export TOKEN_SIDECAR_OAUTH__PASSWORD=bench-password
  fi
}
