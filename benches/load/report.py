#!/usr/bin/env python3
"""Helpers for benches/load/run.sh.

report.py parse DNSPERF_OUT      -> one line "sent completed lost qps p50_ms p99_ms p999_ms" from
                                    dnsperf -v output (per-query latencies -> percentiles)
report.py table RESULTS_TSV      -> markdown tables, one per scenario, with CPU us/q ratios
"""
import sys


def parse(path):
    lat, kv = [], {}
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith("> "):
                try:
                    lat.append(float(line.rsplit(None, 1)[1]))
                except (ValueError, IndexError):
                    pass
                continue
            s = line.strip()
            for key, label, idx in (("sent", "Queries sent:", 2), ("completed", "Queries completed:", 2),
                                    ("lost", "Queries lost:", 2), ("qps", "Queries per second:", 3)):
                if s.startswith(label):
                    kv[key] = s.split()[idx]
    lat.sort()

    def pct(p):
        if not lat:
            return "-"
        return f"{lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000:.3f}"

    print(kv.get("sent", "-"), kv.get("completed", "-"), kv.get("lost", "-"),
          f"{float(kv['qps']):.0f}" if "qps" in kv else "-", pct(50), pct(99), pct(99.9))


def table(path):
    rows = [line.rstrip("\n").split("\t") for line in open(path)]
    hdr, rows = rows[0], rows[1:]
    col = {h: i for i, h in enumerate(hdr)}
    scenarios = list(dict.fromkeys(r[col["scenario"]] for r in rows))
    for sc in scenarios:
        rs = [r for r in rows if r[col["scenario"]] == sc]
        base = {r[col["peer"]]: r[col["cpu_us_q"]] for r in rs}
        ours = base.get("nodedns", "-")
        print(f"\n### {sc}\n")
        print("| peer | QPS | p50 ms | p99 ms | p99.9 ms | lost | CPU % | CPU µs/q | µs/q ÷ nodedns | RSS MiB | upstream % |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rs:
            g = lambda k: r[col[k]]
            try:
                ratio = f"{float(g('cpu_us_q')) / float(ours):.2f}"
            except (ValueError, ZeroDivisionError):
                ratio = "-"
            print(f"| {g('peer')} | {g('qps')} | {g('p50_ms')} | {g('p99_ms')} | {g('p999_ms')} | {g('lost')} "
                  f"| {g('cpu_pct')} | {g('cpu_us_q')} | {ratio} | {g('rss_mib')} | {g('upstream_pct')} |")


if __name__ == "__main__":
    {"parse": parse, "table": table}[sys.argv[1]](sys.argv[2])
