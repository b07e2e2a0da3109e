"""Helpers for tests/interop/run.sh (standard library only; loopback only).

  free-ports N                         print N free 127.0.0.1 TCP ports
  wait-status URL STATUS TIMEOUT [PID] poll URL until it answers STATUS (exit 1 on timeout or
                                       when process PID has exited)
  never-status URL STATUS SECONDS      poll URL for SECONDS; exit 1 if it ever answers STATUS
  load URL SECONDS RATE OUT.json [PATH] steady GET/POST traffic through the sidecar; summary to OUT
                                       (PATH: the path the peer must see, when a route maps it)
  get URL                              print the body of a GET (exit 1 unless 200)
  post URL                             POST with an empty body, print the answer
  json FILE EXPR                       print EXPR evaluated on the JSON in FILE (as `d`)
  metric FILE NAME [k=v ...]           sum of the Prometheus series NAME{k=v,...} in FILE
  log-rejected FILE                    print "grant error" of each "token request rejected" line
  probe URL OUT.json                   one GET; status, time taken, headers and body to OUT
"""

import http.client
import json
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request


def free_ports(n):
    socks, ports = [], []
    for _ in range(int(n)):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


def status_of(url, timeout=2.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, http.client.HTTPException):
        return None


def running(pid):
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_status(url, status, timeout, pid=None):
    deadline = time.monotonic() + float(timeout)
    last = None
    while time.monotonic() < deadline:
        last = status_of(url)
        if last == int(status):
            return 0
        if pid is not None and not running(pid):
            print(f"{url}: process {pid} exited", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"{url}: wanted {status}, last answer {last}", file=sys.stderr)
    return 1


def never_status(url, status, seconds):
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        if status_of(url) == int(status):
            print(f"{url} answered {status}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    return 0


def load(url, seconds, rate, out, upstream_path=None):
    """~RATE requests/s for SECONDS from 2 keep-alive connections, alternating GET and POST.

    A request counts as ok only if the peer answered it: 200 with the echo JSON of our path
    (or of upstream_path, where a route maps the path), our body (POST), and a bearer
    Authorization header that the sidecar injected.
    """
    seconds, rate = float(seconds), float(rate)
    u = urllib.parse.urlsplit(url)
    upstream_path = upstream_path or u.path
    workers = 2
    interval = workers / rate
    lock = threading.Lock()
    res = {"requests": 0, "ok": 0, "statuses": {}, "transport_errors": 0, "bad_bodies": 0,
           "max_latency_ms": 0.0, "first_failures": []}
    start = time.monotonic()

    def note_failure(msg):
        if len(res["first_failures"]) < 5:
            res["first_failures"].append(f"t+{time.monotonic() - start:.2f}s {msg}")

    def worker(wid):
        conn = None
        i = 0
        nxt = start + wid * interval / workers
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            if nxt > now:
                time.sleep(nxt - now)
            nxt += interval
            i += 1
            post = i % 2 == 0
            path = f"{u.path}?w={wid}&i={i}"
            body = f"worker={wid}&n={i}".encode() if post else None
            t0 = time.monotonic()
            status, data, err = None, b"", None
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=15)
                hdrs = {"Content-Type": "application/x-www-form-urlencoded"} if post else {}
                conn.request("POST" if post else "GET", path, body=body, headers=hdrs)
                r = conn.getresponse()
                status, data = r.status, r.read()
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                err = repr(e)
                if conn is not None:
                    conn.close()
                conn = None
            ms = (time.monotonic() - t0) * 1000
            with lock:
                res["requests"] += 1
                res["max_latency_ms"] = max(res["max_latency_ms"], round(ms, 1))
                if err is not None:
                    res["transport_errors"] += 1
                    note_failure(f"{'POST' if post else 'GET'} {path}: {err}")
                    continue
                res["statuses"][str(status)] = res["statuses"].get(str(status), 0) + 1
                if status != 200:
                    note_failure(f"{'POST' if post else 'GET'} {path}: {status} {data[:300]!r}")
                    continue
                try:
                    d = json.loads(data)
                    hdr = {k.lower(): v for k, v in d["headers"].items()}
                    good = (
                        d["path"] == upstream_path
                        and d["method"] == ("POST" if post else "GET")
                        and (not post or d["body"] == body.decode())
                        and hdr.get("authorization", "").startswith("Bearer ")
                        and "token" in d
                    )
                except (ValueError, KeyError, TypeError, AttributeError):
                    good = False
                if good:
                    res["ok"] += 1
                else:
                    res["bad_bodies"] += 1
                    note_failure(f"{path}: unexpected 200 body {data[:300]!r}")
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res["seconds"] = round(time.monotonic() - start, 2)
    res["non_200"] = res["requests"] - res["statuses"].get("200", 0)
    with open(out, "w") as f:
        json.dump(res, f)
    return 0


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            sys.stdout.write(r.read().decode())
            return 0
    except (OSError, http.client.HTTPException) as e:
        print(f"GET {url}: {e}", file=sys.stderr)
        return 1


def post(url):
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            sys.stdout.write(r.read().decode())
            return 0
    except (OSError, http.client.HTTPException) as e:
        print(f"POST {url}: {e}", file=sys.stderr)
        return 1


def probe(url, out):
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=15) as r:
            st, hd, body = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        st, hd, body = e.code, dict(e.headers), e.read()
    except (OSError, http.client.HTTPException) as e:
        st, hd, body = None, {}, repr(e).encode()
    with open(out, "w") as f:
        json.dump({"status": st, "elapsed_ms": round((time.monotonic() - t0) * 1000), "body": body.decode("utf-8", "replace"),
                   "headers": {k.lower(): v for k, v in hd.items()}}, f)
    return 0


def json_expr(path, expr):
    with open(path) as f:
        d = json.load(f)
    env = {"__builtins__": {"len": len, "sum": sum, "int": int, "str": str, "sorted": sorted}, "d": d}
    v = eval(expr, env)
    print(json.dumps(v) if isinstance(v, (dict, list)) else v)
    return 0


SERIES = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric(path, name, *want):
    want = dict(w.split("=", 1) for w in want)
    total = 0.0
    with open(path) as f:
        for line in f:
            m = SERIES.match(line)
            if not m or m.group(1) != name:
                continue
            labels = dict(LABEL.findall(m.group(2) or ""))
            if all(labels.get(k) == v for k, v in want.items()):
                total += float(m.group(3))
    print(int(total) if total == int(total) else total)
    return 0


def log_rejected(path):
    """Lines with message "token request rejected" (top level or in tracing's "fields")."""
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                d = json.loads(line)
            except ValueError:
                continue
            flat = dict(d)
            if isinstance(d.get("fields"), dict):
                flat.update(d["fields"])
            if flat.get("message") == "token request rejected":
                level = str(flat.get("level", "")).upper()
                print(level, flat.get("grant", "-"), flat.get("error", "-"))
    return 0


def main(argv):
    cmds = {
        "free-ports": free_ports, "wait-status": wait_status, "never-status": never_status,
        "load": load, "get": get, "post": post, "json": json_expr, "metric": metric,
        "log-rejected": log_rejected, "probe": probe,
    }
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 2
    return cmds[argv[1]](*argv[2:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
