#!/usr/bin/env bash
# Instructions per query on the miss paths or the hit path, under callgrind: repeatable on a busy
# machine where CPU time is not. Starts knotd (the load benchmark's zones) and nodedns under
# valgrind, sends a warm-up, zeroes the counters, sends QUERIES queries at RATE QPS, dumps, and
# prints the instructions (Ir) per query of the whole process (every thread). Misses: a warm-up of
# other misses, then QUERIES unique misses. Hits: the QUERIES names are asked once as the warm-up
# (stored; their 30 s TTL cap outlasts warm-up and measurement at the default rate), then again.
#
#   bash benches/load/callgrind.sh [NODEDNS-BINARY] [SCENARIO] [-- EXTRA NODEDNS ARGS]
#   NODEDNS-BINARY may be the word dnsdist or dnsproxy instead: that peer as the shared peer
#   harness runs it (for scale: every one of its threads counts, as for nodedns)
#   SCENARIO: miss (example.com names, UDP upstream), cluster-miss (cluster.local, pooled TCP) or
#             hit (cached answers, half cluster.local and half example.com names)
#   QUERIES=3000 RATE=300 bash benches/load/callgrind.sh target/release/nodedns miss -- --config f.toml
#   CG_OPTS='--separate-callers=6' ...: more valgrind options (here: whose call a cost is)
#
# Needs valgrind, knotd, knotc, dnsperf; only processes this script started are signalled.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BIN=${1:-$ROOT/target/release/nodedns}
SCENARIO=${2:-miss}
shift $(($# >= 2 ? 2 : $#))
[[ ${1:-} == -- ]] && shift
: "${QUERIES:=3000}"
: "${RATE:=300}"
: "${WORKDIR:=/tmp/nodedns-callgrind}"
: "${BACKEND_ADDR:=127.0.0.46}"
: "${ADDR:=127.0.0.47}"

case $SCENARIO in
    miss) FILE=miss.txt ;;
    cluster-miss) FILE=cmiss.txt ;;
    hit) FILE=hit.txt ;;
    *) echo "unknown scenario $SCENARIO" >&2; exit 2 ;;
esac

# shellcheck source=benches/load/backend.sh
source "$HERE/backend.sh"
trap stop_started EXIT
backend_start "$WORKDIR" $((QUERIES * 2 + 1000))

peer_command "$BIN" "$WORKDIR"
# shellcheck disable=SC2086 # CG_OPTS: several options
taskset -c 1 valgrind --tool=callgrind ${CG_OPTS:-} --compress-strings=no --callgrind-out-file="$WORKDIR/cg.out" \
    "${PEER_CMD[@]}" "$@" >"$WORKDIR/peer.log" 2>&1 &
NODE=$!
answers "$ADDR" 600 || { echo "$BIN did not start" >&2; exit 1; }

dp() { # FROM COUNT: queries FROM..FROM+COUNT of the file, at RATE
    sed -n "$(($1 + 1)),$(($1 + $2))p" "$WORKDIR/data/$FILE" >"$WORKDIR/q.txt"
    taskset -c 0 dnsperf -s "$ADDR" -d "$WORKDIR/q.txt" -n 1 -Q "$RATE" -c 1 -q 50 -t 5 >"$WORKDIR/dnsperf.$1" 2>&1
}
if [[ $SCENARIO == hit ]]; then
    FROM=0
    dp 0 "$QUERIES" # warm-up: the names measured, stored in the cache
else
    FROM=1000
    dp 0 500 # warm-up: pools, connections, allocator
fi
callgrind_control -z "$NODE" >/dev/null
dp "$FROM" "$QUERIES"
callgrind_control -d "$NODE" >/dev/null
sleep 1
lost=$(awk '/Queries lost:/ {print $3}' "$WORKDIR/dnsperf.$FROM")
out=$(ls -t "$WORKDIR"/cg.out* | head -1)
ir=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
echo "$SCENARIO $(basename "$BIN") $*: $QUERIES queries (lost $lost), Ir $ir, Ir/query $((ir / QUERIES))"
