"""The report of scripts/bench-pods.sh: reads OUT/raw, writes OUT/results.json
and prints a markdown table (medians over the repetitions; "added" is each
run minus the direct run of the same repetition and load, then the median).

usage: bench_pods_report.py OUT REPS RATE MAX_CONNS VARIANT...
"""

import json
import os
import re
import statistics
import sys

out, reps, rate, max_conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
variants = sys.argv[5:]
NAMES = {
    "direct": "direct (no proxy)",
    "plain": "infermesh pair, plaintext",
    "mtls": "infermesh pair, mTLS",
    "nginx": "nginx pair, mTLS",
    "intercept": "infermesh pair, mTLS, intercepted",
}


def run(v, mode, r):
    base = f"{out}/raw/{v}.{mode}.{r}"
    if not os.path.exists(base + ".log"):
        return None
    us, bad = [], 0
    first, last = None, None
    for line in open(base + ".log"):
        f = line.split()
        if len(f) < 3:
            continue
        start, status, lat = int(f[0]), f[1], int(f[2])
        if status != "200":
            bad += 1
            continue
        us.append(lat)
        first = start if first is None else min(first, start)
        last = start + lat if last is None else max(last, start + lat)
    text = open(base + ".out").read()
    m = re.search(r"pair_cpu_ticks=(-?\d+) clk_tck=(\d+)", text)
    t = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    if not us:
        return {"n": 0, "errors": bad}
    us.sort()
    n = len(us)
    res = {
        "n": n,
        "errors": bad,
        "req_per_s": float(t.group(3)) if t else n * 1e6 / max(1, last - first),
        "mean_ms": sum(us) / n / 1000.0,
        "p50_ms": us[int(0.50 * n)] / 1000.0,
        "p99_ms": us[min(n - 1, int(0.99 * n))] / 1000.0,
        "p999_ms": us[min(n - 1, int(0.999 * n))] / 1000.0,
    }
    if m and v != "direct":
        res["pair_cpu_us_per_req"] = int(m.group(1)) / int(m.group(2)) * 1e6 / (n + bad)
    return res


def med(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


runs = {v: {mode: [run(v, mode, r) for r in range(1, reps + 1)] for mode in ("rate", "max")} for v in variants}
summary = {}
for v in variants:
    summary[v] = {}
    for mode in ("rate", "max"):
        rs = runs[v][mode]
        d = runs.get("direct", {}).get(mode, [None] * reps)
        s = {}
        for k in ("req_per_s", "mean_ms", "p50_ms", "p99_ms", "p999_ms", "pair_cpu_us_per_req"):
            s[k] = med([x.get(k) if x else None for x in rs])
        for k in ("mean_ms", "p99_ms"):
            s["added_" + k] = med(
                [x[k] - y[k] if x and y and k in x and k in y else None for x, y in zip(rs, d)]
            )
        s["errors"] = sum(x["errors"] for x in rs if x)
        summary[v][mode] = s

machine = {}
if os.path.exists(f"{out}/raw/machine.txt"):
    for line in open(f"{out}/raw/machine.txt"):
        k, _, val = line.rstrip("\n").partition("=")
        machine[k] = val
skipped = [line.strip() for line in open(f"{out}/raw/skipped.txt") if line.strip()] if os.path.exists(f"{out}/raw/skipped.txt") else []
json.dump({"machine": machine, "skipped": skipped, "summary": summary, "runs": runs},
          open(f"{out}/results.json", "w"), indent=2)


def g(s, k):
    return s[k]["median"] if s.get(k) else None


def fmt(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def ratio(a, b):
    return "–" if a is None or b is None or b <= 0 else f"{a / b:.2f}×"


print(f"\nMedians of {reps} repetitions; HTTP/1.1 JSON POSTs from the app pod; "
      f"\"added\" is over the direct path in the same repetition.\n")
print("| variant | load | req/s | mean ms | p99 ms | added mean ms | added p99 ms | pair CPU µs/req "
      "| vs nginx pair: added mean | added p99 | CPU/req |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for mode in ("rate", "max"):
    load = f"{rate:,} req/s" if mode == "rate" else f"saturation ({max_conns} conns)"
    ng = summary.get("nginx", {}).get(mode, {})
    for v in variants:
        s = summary[v][mode]
        added = v != "direct"
        cmp_ = added and v != "nginx" and "nginx" in summary
        cells = [
            NAMES[v], load, fmt(g(s, "req_per_s"), 0), fmt(g(s, "mean_ms")), fmt(g(s, "p99_ms")),
            fmt(g(s, "added_mean_ms")) if added else "", fmt(g(s, "added_p99_ms")) if added else "",
            fmt(g(s, "pair_cpu_us_per_req"), 1) if added else "",
            ratio(g(s, "added_mean_ms"), g(ng, "added_mean_ms")) if cmp_ else "",
            ratio(g(s, "added_p99_ms"), g(ng, "added_p99_ms")) if cmp_ else "",
            ratio(g(s, "pair_cpu_us_per_req"), g(ng, "pair_cpu_us_per_req")) if cmp_ else "",
        ]
        print("| " + " | ".join(cells) + " |")
print("\nSpread (min–max over repetitions) of the added latency (ms) and the pair's CPU (µs/req):")
for mode in ("rate", "max"):
    for v in variants:
        if v == "direct":
            continue
        s = summary[v][mode]
        parts = []
        for k in ("added_mean_ms", "added_p99_ms", "pair_cpu_us_per_req"):
            x = s.get(k)
            parts.append(f"{k} {fmt(x['min'], 3)}–{fmt(x['max'], 3)}" if x else f"{k} –")
        err = f", {s['errors']} non-200" if s["errors"] else ""
        print(f"  {mode:<4} {v:<9} " + "; ".join(parts) + err)
for line in skipped:
    print(line)
print("\nmachine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
