#!/usr/bin/env python3
"""Prints bench/run.sh's results: medians across rounds per configuration,
and the ratios token-sidecar/nginx against the performance targets (GOALS).

Usage: summarize.py RESULTS.tsv STREAM.tsv CLK_TCK  (run notes on stdin)
"""
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "nginx", "token-sidecar"]

# metric: (ratio must be >= or <=, bound)
GOALS = {
    "rps": (">=", 1.0),
    "p99": ("<=", 1.0),
    "cpu": ("<=", 1.0),
    "rss": ("<=", 1.0),
    "mbps": (">=", 0.9),
}


def verdict(metric, ratio):
    op, bound = GOALS[metric]
    ok = ratio >= bound if op == ">=" else ratio <= bound
    return f"{ratio:.2f}x {'ok' if ok else 'MISSED'} (target {op} {bound})"


def main():
    results, stream, clk_tck = sys.argv[1], sys.argv[2], int(sys.argv[3])
    notes = sys.stdin.read().strip()

    runs = defaultdict(list)
    for line in open(results):
        rnd, target, conns, rps, p50, p99, requests, ticks, hwm, errors, tree = line.split("\t")
        requests = int(requests)
        runs[(int(conns), target)].append({
            "rps": float(rps),
            "p50": float(p50),
            "p99": float(p99),
            "cpu": int(ticks) / clk_tck / max(requests, 1) * 1e6,
            "rss": int(tree) / 1024,
            "rss1": int(hwm) / 1024,
            "errors": int(errors),
        })
    streams = defaultdict(list)
    for line in open(stream):
        rnd, target, speed, size, hwm, tree = line.split("\t")
        streams[target].append({
            "mbps": float(speed) / 1e6,
            "size": int(size),
            "rss": int(tree) / 1024,
            "rss1": int(hwm) / 1024,
        })

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    print()
    print(notes)
    print()
    print("Medians across rounds. CPU = user+system time of the process that serves")
    print("(nginx: its worker; direct: the upstream's worker) over the requests served.")
    print("RSS = peak resident set (VmHWM) of the whole server: nginx master + worker,")
    print("token-sidecar's one process; 'worker' = the serving process alone.")
    print()
    hdr = (f"{'conns':>5}  {'target':<14}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}"
           f"{'RSS MiB':>9}{'worker':>8}{'errors':>8}")
    print(hdr)
    print("-" * len(hdr))
    ratios = {}
    for conns in sorted({c for c, _ in runs}):
        for target in TARGETS:
            rows = runs.get((conns, target))
            if not rows:
                continue
            print(f"{conns:>5}  {target:<14}{med(rows, 'rps'):>9.0f}{med(rows, 'p50'):>9.2f}"
                  f"{med(rows, 'p99'):>9.2f}{med(rows, 'cpu'):>12.1f}{med(rows, 'rss'):>9.1f}"
                  f"{med(rows, 'rss1'):>8.1f}{sum(r['errors'] for r in rows):>8}")
        a, b = runs.get((conns, "token-sidecar")), runs.get((conns, "nginx"))
        if a and b:
            ratios[conns] = {k: med(a, k) / med(b, k) for k in ("rps", "p50", "p99", "cpu", "rss", "rss1")}
            r = ratios[conns]
            print(f"{conns:>5}  {'sidecar/nginx':<14}{r['rps']:>8.2f}x{r['p50']:>8.2f}x"
                  f"{r['p99']:>8.2f}x{r['cpu']:>11.2f}x{r['rss']:>8.2f}x{r['rss1']:>7.2f}x")
        print()

    if streams:
        print(f"{'stream':<14}{'MB/s':>9}{'RSS MiB':>9}{'worker':>8}")
        for target in TARGETS:
            rows = streams.get(target)
            if rows:
                print(f"{target:<14}{med(rows, 'mbps'):>9.0f}{med(rows, 'rss'):>9.1f}{med(rows, 'rss1'):>8.1f}")
        print()

    print("Targets (token-sidecar/nginx):")
    for conns, r in ratios.items():
        print(f"  c={conns}: req/s {verdict('rps', r['rps'])}; p99 {verdict('p99', r['p99'])};")
        print(f"         CPU/req {verdict('cpu', r['cpu'])}; peak RSS {verdict('rss', r['rss'])}"
              f" ({r['rss1']:.2f}x nginx's worker alone)")
    if streams.get("token-sidecar") and streams.get("nginx"):
        s = med(streams["token-sidecar"], "mbps") / med(streams["nginx"], "mbps")
        rss = med(streams["token-sidecar"], "rss") / med(streams["nginx"], "rss")
        print(f"  stream: MB/s {verdict('mbps', s)}; peak RSS {rss:.2f}x")
    bad = [t for t, rows in streams.items() for r in rows if r["size"] != rows[0]["size"]]
    if bad or any(r["errors"] for rows in runs.values() for r in rows):
        print("WARNING: errors or short downloads above; figures are not comparable")


if __name__ == "__main__":
    main()
