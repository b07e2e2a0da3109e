#!/usr/bin/env bash
# Resource footprint of the binary: idle RSS and time to ready.
#
#   bench/footprint.sh [RUNS] [IDLE_RUNS] [PROFILE]   (defaults 20, 5 and release;
#                                                       dist: the container image's build)
#
# A `token-sidecar demo` is started once as the token stand-in: its built-in
# fake token endpoint and backoffice API on loopback. Then, RUNS times, a fresh
# `token-sidecar --config ...` pointing at them (JSON logs) is started and
# /readyz is polled without pause, recording
#   exec -> ready       from exec() to the first /readyz 200 (external clock);
#   token request       the token call's duration (from /metrics);
#   answer -> ready     from the token's arrival to the first /readyz 200: the
#                       wall time of that 200 less the "token obtained" log
#                       line's timestamp (which is written just after the token
#                       is published, so this bounds the answer's processing);
#   RSS at ready        VmRSS when /readyz first answers 200.
# IDLE_RUNS of them then stay up: RSS (and its anonymous part: heap and
# stacks) after 5 s idle, and RSS after 200 proxied requests on one
# keep-alive connection. Prints each run and the medians.
# Targets: idle RSS under 10 MiB, ready within 50 ms of the token answer.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
idle_runs=${2:-5}
profile=${3:-release}

# SIDECAR=path measures that binary instead, unbuilt.
if [ -z "${SIDECAR:-}" ]; then
    cargo build --locked --quiet --profile "$profile" --bin token-sidecar
fi
bin=${SIDECAR:-target/$profile/token-sidecar}
echo "binary: $(du -h "$bin" | cut -f1) ($bin), $(nproc) CPUs visible, rustc $(rustc --version | cut -d' ' -f2)"

exec python3 - "$bin" "$runs" "$idle_runs" <<'PY'
import http.client, json, os, re, signal, socket, statistics, subprocess, sys, tempfile, time
from datetime import datetime

bin_, runs, idle_runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

def get(port, path, timeout=1.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path); r = c.getresponse(); return r.status, r.read()
    finally:
        c.close()

def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])

def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))

# The stand-in: one demo, kept for all runs.
demo_log = tempfile.NamedTemporaryFile("w+", suffix=".log")
demo = subprocess.Popen([bin_, "demo", "--port", str(free_port()), "--admin-port", str(free_port())],
                        stdout=demo_log, stderr=subprocess.STDOUT, text=True)
token_url = upstream = None
for _ in range(200):
    m = re.search(r"stand-in token endpoint (\S+) and backoffice API (\S+) on", open(demo_log.name).read())
    if m:
        token_url, upstream = m.group(1), m.group(2)
        break
    time.sleep(0.05)
assert token_url, "the demo did not print its stand-in URLs"

def ts(line):
    # "2026-01-01T00:00:00.123456Z" -> epoch seconds
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()

def one_run(idle):
    port, admin = free_port(), free_port()
    cfg = f'''
[proxy]
listen = "127.0.0.1:{port}"
upstream = "{upstream}"
[admin]
listen = "127.0.0.1:{admin}"
[oauth]
token_url = "{token_url}"
client_id = "demo-client"
client_secret = "demo-secret"
username = "demo-user"
password = "demo-password"
params_in = "query"
[log]
format = "json"
'''
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(cfg); path = f.name
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG" and not k.startswith("TOKEN_SIDECAR_")}
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe nobody drains
    t0 = time.monotonic()
    p = subprocess.Popen([bin_, "--config", path], stdout=log, stderr=subprocess.DEVNULL, env=env, text=True)
    ready_wall = None
    while time.monotonic() - t0 < 10:
        try:
            status, _ = get(admin, "/readyz", 0.5)
        except OSError:
            continue
        if status == 200:
            ready_wall = time.time(); t_ready = time.monotonic(); break
    assert ready_wall, "not ready within 10 s"
    r = {"exec_to_ready_ms": (t_ready - t0) * 1000, "rss_ready_kib": rss_kib(p.pid), "threads": threads(p.pid)}
    _, metrics = get(admin, "/metrics")
    m = re.search(rb"^token_sidecar_token_request_duration_seconds_sum(?:\{[^}]*\})? (\S+)$", metrics, re.M)
    r["token_request_ms"] = float(m.group(1)) * 1000
    if idle:
        time.sleep(5)
        r["rss_idle_5s_kib"] = rss_kib(p.pid)
        # Heap and stacks; the rest is the binary's code, mapped from the file.
        r["rss_anon_idle_5s_kib"] = rss_kib(p.pid, "RssAnon")
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for _ in range(200):
            c.request("GET", "/backoffice/api/merchants?limit=5"); resp = c.getresponse(); resp.read()
            assert resp.status == 200, resp.status
        c.close()
        time.sleep(0.5)
        r["rss_after_200_requests_kib"] = rss_kib(p.pid)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=30)
    os.unlink(path)
    log.seek(0); out = log.read(); log.close()
    events = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    obtained = next(e for e in events if e.get("message") == "token obtained")
    r["answer_to_ready_ms"] = (ready_wall - ts(obtained)) * 1000
    r["exit"] = p.returncode
    return r

results = []
for i in range(runs):
    r = one_run(idle=i < idle_runs)
    results.append(r)
    print(f"run {i+1:2}: " + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)

demo.send_signal(signal.SIGTERM); demo.wait(timeout=30)

def med(key):
    vals = [r[key] for r in results if key in r]
    return statistics.median(vals), len(vals)

print()
print(f"medians over {runs} starts ({idle_runs} kept up for the idle figures):")
for key, unit, div in [("exec_to_ready_ms", "ms", 1), ("token_request_ms", "ms", 1), ("answer_to_ready_ms", "ms", 1),
                       ("rss_ready_kib", "MiB", 1024), ("rss_idle_5s_kib", "MiB", 1024), ("rss_anon_idle_5s_kib", "MiB", 1024),
                       ("rss_after_200_requests_kib", "MiB", 1024), ("threads", "", 1)]:
    v, n = med(key)
    print(f"  {key:28} {v / div:8.2f} {unit}   (n={n})")
assert all(r["exit"] == 0 for r in results), "a run did not exit 0 on SIGTERM"
PY
