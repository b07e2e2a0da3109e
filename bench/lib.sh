# Sourced by bench/run.sh and bench/profile.sh: the sidecar config and the
# nginx proxy config both measure, so the two always benchmark the same
# thing, and the https upstream's certificate.
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

# A private CA and an upstream certificate (for 127.0.0.1 and the name nginx
# verifies, upstream.bench), as a real https upstream would have: writes
# ca.pem, upstream.pem and upstream.key into the directory $1.
make_upstream_cert() {
  local dir=$1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=bench-ca -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=upstream.bench \
    -keyout "$dir/upstream.key" -out "$dir/upstream.csr" 2>/dev/null
  printf 'subjectAltName=DNS:upstream.bench,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$dir/upstream.ext"
  openssl x509 -req -in "$dir/upstream.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 2 -extfile "$dir/upstream.ext" -out "$dir/upstream.pem" 2>/dev/null
  chmod 644 "$dir"/*.pem "$dir"/*.key
}

# The access token bench/token_endpoint.py issues, which nginx sends as a
# static header. Needs BENCH (the bench/ folder).
bench_token() {
  python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import token_endpoint; print(token_endpoint.TOKEN)' "$BENCH"
}

# nginx as the proxy, to the http or the https upstream: one worker, a
# keep-alive upstream pool, the static token, the access log batched like the
# sidecar's. Needs WORK, UP_PORT, UP_TLS_PORT, NGINX_PORT and TOKEN.
write_nginx_proxy_conf() { # FILE SCHEME
  local port=$UP_PORT tls=
  if [ "$2" = https ]; then
    port=$UP_TLS_PORT
    # Verified like the sidecar verifies; sessions resumed on reconnect.
    tls="proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $WORK/ca.pem;
            proxy_ssl_name upstream.bench;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;"
  fi
  cat >"$1" <<EOF
worker_processes 1;
pid $WORK/nginx-proxy.pid;
events { worker_connections 8192; }
http {
    # Combined format, written in 16 KiB batches or after 100 ms, as the
    # sidecar writes its access log.
    access_log $WORK/nginx-access.log combined buffer=16k flush=100ms;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path $WORK/nginx-client-body;
    proxy_temp_path $WORK/nginx-proxy-temp;
    upstream backend {
        server 127.0.0.1:$port;
        keepalive 1024;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=4096;
        location / {
            proxy_pass $2://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer $TOKEN";
            # Stream large answers through memory buffers, never a temp file.
            proxy_max_temp_file_size 0;
            $tls
        }
    }
}
EOF
}
