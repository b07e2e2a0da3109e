# Sourced by bench/run.sh and bench/profile.sh: the sidecar config both
# measure, so the two always benchmark the same thing.
# Needs SIDECAR_PORT, ADMIN_PORT, UP_PORT, TOKEN_PORT; writes $1.
write_sidecar_config() {
  cat >"$1" <<CONF
[proxy]
listen = ["127.0.0.1:$SIDECAR_PORT"]
upstream = "http://127.0.0.1:$UP_PORT/"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[oauth]
token_url = "http://127.0.0.1:$TOKEN_PORT/oauth/token"
client_id = "bench"
username = "bench"
CONF
  # Secrets from the environment, never on a command line.
  export TOKEN_SIDECAR_OAUTH__CLIENT_SECRET=bench-secret
  export TOKEN_SIDECAR_OAUTH__PASSWORD=bench-password
}
