#!/usr/bin/env python3
"""Turns dnsperf output into one CSV row, and the rows of a run into summary.md.

    report.py parse DNSPERF_OUTPUT     prints qps,sent,completed,lost_pct,seconds,avg_ms,p50_ms,p99_ms,rcodes
    report.py summary RUNS_CSV REF     prints the markdown summary; ratios are against peer REF

Percentiles come from dnsperf's -v lines ("> NOERROR name TYPE 0.000123"), which the driver
asks for in fixed-rate runs only; saturation runs report the average.
"""
import csv
import math
import re
import statistics
import sys
from collections import defaultdict

NAN = float("nan")


def parse(path):
    latencies, text = [], []
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("> "):
                try:
                    latencies.append(float(line.rsplit(None, 1)[-1]))
                except ValueError:
                    pass
            else:
                text.append(line)
    text = "".join(text)

    def field(pattern, default=NAN):
        m = re.search(pattern, text)
        return float(m.group(1)) if m else default

    sent = field(r"Queries sent:\s+(\d+)", 0)
    lost = field(r"Queries lost:\s+(\d+)", 0)
    latencies.sort()

    def pct(p):
        if not latencies:
            return NAN
        return latencies[min(len(latencies) - 1, int(math.ceil(p / 100 * len(latencies))) - 1)] * 1000

    m = re.search(r"Response codes:\s+(.*)", text)
    rcodes = m.group(1).strip().replace(",", ";") if m else ""
    print("%.1f,%d,%d,%.3f,%.3f,%.3f,%.3f,%.3f,%s" % (
        field(r"Queries per second:\s+([\d.]+)", 0), sent, field(r"Queries completed:\s+(\d+)", 0),
        100 * lost / sent if sent else NAN, field(r"Run time \(s\):\s+([\d.]+)", 0),
        field(r"Average Latency \(s\):\s+([\d.]+)") * 1000, pct(50), pct(99), rcodes))


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return NAN


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else NAN


def show(x, digits=1):
    return "-" if x != x else "%.*f" % (digits, x)


def summary(path, ref):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    peers, workloads = [], []
    runs = defaultdict(list)
    for r in rows:
        if r["peer"] not in peers:
            peers.append(r["peer"])
        if r["workload"] not in workloads:
            workloads.append(r["workload"])
        runs[(r["peer"], r["workload"], r["kind"])].append(r)

    def med(peer, wl, kind, key):
        return median([num(r[key]) for r in runs[(peer, wl, kind)]])

    def us_per_answer(r):
        answers = num(r["completed"])
        return num(r["srv_cpu_us"]) / answers if answers > 0 else NAN

    out = ["Medians over rounds. Saturation: q/s the server reached; CPU: the server's cgroup "
           "(all its processes and threads, exact task clock). Fixed rate: latency percentiles "
           "and CPU per answer. Ratios are against %s in the same run." % ref]
    for wl in workloads:
        out += ["", "### %s" % wl, "",
                "| peer | q/s (min-max) | ratio | srv CPU % | fixed rate q/s | p50 / p99 ms | CPU % at fixed rate | us per answer | ratio | throttled periods | RSS MiB idle / after | other CPU % max |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ref_qps = med(ref, wl, "sat", "qps")
        ref_us = median([us_per_answer(r) for r in runs[(ref, wl, "fixed")]])
        for p in peers:
            sat, fixed = runs[(p, wl, "sat")], runs[(p, wl, "fixed")]
            if not sat and not fixed:
                continue
            qps = [num(r["qps"]) for r in sat]
            us = median([us_per_answer(r) for r in fixed])
            out.append("| %s | %s (%s-%s) | %s | %s | %s | %s / %s | %s | %s | %s | %s | %s / %s | %s |" % (
                p, show(median(qps), 0), show(min(qps) if qps else NAN, 0), show(max(qps) if qps else NAN, 0),
                show(median(qps) / ref_qps, 2) + "x" if ref_qps == ref_qps and qps else "-",
                show(med(p, wl, "sat", "srv_cpu_pct")),
                show(med(p, wl, "fixed", "qps"), 0),
                show(med(p, wl, "fixed", "p50_ms"), 3), show(med(p, wl, "fixed", "p99_ms"), 3),
                show(med(p, wl, "fixed", "srv_cpu_pct")), show(us, 2),
                show(us / ref_us, 2) + "x" if ref_us == ref_us and us == us else "-",
                show(med(p, wl, "fixed", "throttled"), 0),
                show(med(p, wl, "sat", "rss_idle_mib")), show(med(p, wl, "sat", "rss_mib")),
                show(max([num(r["other_cpu_pct"]) for r in sat + fixed] or [NAN]), 0)))
        out.append("")
        out.append("Response codes (first saturation run): " + "; ".join(
            "%s: %s" % (p, runs[(p, wl, "sat")][0]["rcodes"].replace(";", ","))
            for p in peers if runs[(p, wl, "sat")]))
    print("\n".join(out))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "parse":
        parse(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "summary":
        summary(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: report.py parse FILE | summary RUNS_CSV REF_PEER")
