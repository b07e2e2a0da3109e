#!/usr/bin/env python3
"""Prints bench/run.sh's results: medians across rounds per configuration,
and the ratios token-sidecar/nginx against the performance targets (GOALS).

Usage: summarize.py RESULTS.tsv STREAM.tsv CLK_TCK  (run notes on stdin)
"""
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "nginx", "token-sidecar", "nginx-tls", "token-sidecar-tls"]
# token-sidecar/nginx ratios, per upstream scheme (variants: to the http one,
# or to the https one when their name ends in -tls).
PAIRS = [("token-sidecar", "nginx", "http"), ("token-sidecar-tls", "nginx-tls", "https")]

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
        rnd, target, conns, rps, p50, p99, requests, ticks, hwm, errors, tree, p90, pmax = line.split("\t")
        requests = int(requests)
        runs[(int(conns), target)].append({
            "rps": float(rps),
            "p50": float(p50),
            "p90": float(p90),
            "p99": float(p99),
            "max": float(pmax),
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

    # Variants (token-sidecar+NAME), in the order they were measured.
    for _, target in runs:
        if target not in TARGETS:
            TARGETS.append(target)
            PAIRS.append((target, "nginx-tls" if target.endswith("-tls") else "nginx",
                          target.split("+", 1)[1]))

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
    hdr = (f"{'conns':>5}  {'target':<18}{'req/s':>9}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}"
           f"{'max ms':>8}{'CPU us/req':>11}{'RSS MiB':>9}{'worker':>8}{'errors':>7}")
    print(hdr)
    print("-" * len(hdr))
    keys = ("rps", "p50", "p90", "p99", "max", "cpu", "rss", "rss1")
    ratios = {}
    for conns in sorted({c for c, _ in runs}):
        for target in TARGETS:
            rows = runs.get((conns, target))
            if not rows:
                continue
            print(f"{conns:>5}  {target:<18}{med(rows, 'rps'):>9.0f}{med(rows, 'p50'):>8.2f}"
                  f"{med(rows, 'p90'):>8.2f}{med(rows, 'p99'):>8.2f}{med(rows, 'max'):>8.1f}"
                  f"{med(rows, 'cpu'):>11.1f}{med(rows, 'rss'):>9.1f}{med(rows, 'rss1'):>8.1f}"
                  f"{sum(r['errors'] for r in rows):>7}")
        for ours, theirs, scheme in PAIRS:
            a, b = runs.get((conns, ours)), runs.get((conns, theirs))
            if a and b:
                r = ratios[(scheme, conns)] = {k: med(a, k) / med(b, k) for k in keys}
                print(f"{conns:>5}  {'vs nginx ' + scheme:<18}{r['rps']:>8.2f}x{r['p50']:>7.2f}x"
                      f"{r['p90']:>7.2f}x{r['p99']:>7.2f}x{r['max']:>7.2f}x{r['cpu']:>10.2f}x"
                      f"{r['rss']:>8.2f}x{r['rss1']:>7.2f}x")
        print()

    if streams:
        print(f"{'stream':<18}{'MB/s':>9}{'RSS MiB':>9}{'worker':>8}")
        for target in TARGETS:
            rows = streams.get(target)
            if rows:
                print(f"{target:<18}{med(rows, 'mbps'):>9.0f}{med(rows, 'rss'):>9.1f}{med(rows, 'rss1'):>8.1f}")
        print()

    print("Targets (token-sidecar/nginx):")
    for (scheme, conns), r in ratios.items():
        print(f"  {scheme} c={conns}: req/s {verdict('rps', r['rps'])}; p99 {verdict('p99', r['p99'])};")
        print(f"         CPU/req {verdict('cpu', r['cpu'])}; peak RSS {verdict('rss', r['rss'])}"
              f" ({r['rss1']:.2f}x nginx's worker alone)")
    for ours, theirs, scheme in PAIRS:
        if streams.get(ours) and streams.get(theirs):
            s = med(streams[ours], "mbps") / med(streams[theirs], "mbps")
            rss = med(streams[ours], "rss") / med(streams[theirs], "rss")
            print(f"  {scheme} stream: MB/s {verdict('mbps', s)}; peak RSS {rss:.2f}x")
    bad = [t for t, rows in streams.items() for r in rows if r["size"] != rows[0]["size"]]
    if bad or any(r["errors"] for rows in runs.values() for r in rows):
        print("WARNING: errors or short downloads above; figures are not comparable")


if __name__ == "__main__":
    main()
