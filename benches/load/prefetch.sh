#!/usr/bin/env bash
# Client-visible misses against upstream queries on the shared harness's nxhit data (20,000
# cluster NXDOMAINs, 5 s TTL cap), with nodedns's metrics scraped before and after a 10 s
# open-loop dnsperf run. Needs the data and knot config of one earlier run of
# ../shared/bench/peers/run.sh (WORKDIR, default /tmp/dnsbench-peers). Loopback only.
#
#   bash benches/load/prefetch.sh target/release/nodedns                       # prefetch on
#   bash benches/load/prefetch.sh target/release/nodedns --config nopf.toml    # [cache] prefetch = 0
set -euo pipefail
bin=$1; shift
work=${WORKDIR:-/tmp/dnsbench-peers}
st=$work/state/knot-backend
q=$work/data/queries/nxhit.txt
[[ -f $st/knot.conf && -f $q ]] || { echo "run ../shared/bench/peers/run.sh once first" >&2; exit 2; }
addr=127.0.0.40
knotd -c "$st/knot.conf" >/dev/null 2>&1 & kpid=$!
taskset -c 1 "$bin" --listen $addr:53 --upstream 127.0.0.2:53 --cluster-dns 127.0.0.2:53 --workers 1 \
  --state-dir off --metrics $addr:9253 --health off "$@" >/dev/null 2>&1 & npid=$!
trap 'kill $npid $kpid 2>/dev/null; wait $npid $kpid 2>/dev/null' EXIT
sleep 1
# Warm: two passes at 20k QPS, as the harness does.
taskset -c 0 dnsperf -s $addr -d "$q" -n 2 -Q 20000 -c 10 -q 200 -t 2 >/dev/null 2>&1
scrape() { curl -s http://$addr:9253/metrics | awk -v n="$1" '$1 ~ "^"n"({|$)" {s+=$2} END {printf "%d", s}'; }
read -r m0 r0 f0 p0 < <(echo "$(scrape coredns_cache_misses_total) $(scrape coredns_cache_requests_total) $(scrape coredns_forward_requests_total) $(scrape coredns_cache_prefetch_total)")
taskset -c 0 dnsperf -s $addr -d "$q" -l 10 -c 10 -q 200 -t 2 | grep -E "Queries (sent|lost)"
read -r m1 r1 f1 p1 < <(echo "$(scrape coredns_cache_misses_total) $(scrape coredns_cache_requests_total) $(scrape coredns_forward_requests_total) $(scrape coredns_cache_prefetch_total)")
python3 - "$m0" "$m1" "$r0" "$r1" "$f0" "$f1" "$p0" "$p1" <<'PY'
import sys
m0, m1, r0, r1, f0, f1, p0, p1 = map(int, sys.argv[1:])
r = r1 - r0
print(f"queries {r}: client misses {m1 - m0} ({100 * (m1 - m0) / r:.3f}%), "
      f"upstream queries {f1 - f0} ({100 * (f1 - f0) / r:.2f}%), prefetches {p1 - p0}")
PY
