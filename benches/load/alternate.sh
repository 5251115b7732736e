#!/usr/bin/env bash
# Miss-path CPU per query of several nodedns builds, in short runs that alternate between the
# builds: on a shared host whose speed drifts over minutes, runs of one build after another put
# the drift between the builds; alternating puts it inside each build's spread.
#
#   bash benches/load/alternate.sh SCENARIO ROUNDS BIN...
#   bash benches/load/alternate.sh miss 4 /tmp/nodedns-old target/release/nodedns dnsdist
#   SCENARIO: miss (example.com names, UDP upstream) or cluster-miss (cluster.local, pooled TCP),
#   or both as miss,cluster-miss: each round then runs every build on each, to compare the two
#   miss paths inside one window of the host's drift
#   BIN: a nodedns binary, or the word dnsdist: dnsdist as the shared peer harness runs it
#   (../shared/bench/peers/conf/dnsdist.conf.in: one listener thread, a packet cache), the
#   reference the miss path is measured against, or the word dnsproxy: Wolfermann's dnsproxy as
#   the harness runs it (no cache), the cheapest peer at a fixed miss rate
#
# knotd (the load benchmark's zones) on CPU 0, nodedns (one worker) on CPU 1, dnsperf on CPU 0,
# each run SECONDS_PER_RUN long with OUTSTANDING queries out (or, with RATE set, at RATE queries per
# second: the shared harness's miss-rate is RATE=5000); prints per run the CPU, user and system
# microseconds per answered query (from /proc/PID/stat) and the context switches per query
# (perf stat, when perf is installed). Needs knotd, kdig, dnsperf; everything on 127.0.0.0/8;
# only processes this script started are signalled.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCENARIO=${1:?scenario}
ROUNDS=${2:?rounds}
shift 2
(($# > 0)) || { echo "no binaries given" >&2; exit 2; }
: "${SECONDS_PER_RUN:=5}"
: "${OUTSTANDING:=200}"
: "${WORKDIR:=/tmp/nodedns-alternate}"
: "${BACKEND_ADDR:=127.0.0.56}"
: "${ADDR:=127.0.0.57}"

names_file() {
    case $1 in
        miss) echo miss.txt ;;
        cluster-miss) echo cmiss.txt ;;
        *) echo "unknown scenario $1" >&2; exit 2 ;;
    esac
}
for scenario in ${SCENARIO//,/ }; do names_file "$scenario" >/dev/null; done

# shellcheck source=benches/load/backend.sh
source "$HERE/backend.sh"
trap stop_started EXIT
backend_start "$WORKDIR" 3000000

cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; } # utime stime, in clock ticks
TICK_US=$((1000000 / $(getconf CLK_TCK)))
offset=0
for round in $(seq "$ROUNDS"); do
    for scenario in ${SCENARIO//,/ }; do
        FILE=$(names_file "$scenario")
        for bin in "$@"; do
            peer_command "$bin" "$WORKDIR"
            taskset -c 1 "${PEER_CMD[@]}" >"$WORKDIR/peer.log" 2>&1 &
            NODE=$!
            answers "$ADDR" || { echo "$bin did not start" >&2; exit 1; }
            # Names not asked before in this run of the script (knotd caches nothing, nodedns starts
            # empty, but the backend's answers stay comparable).
            sed -n "$((offset + 1)),$((offset + 1000000))p" "$WORKDIR/data/$FILE" >"$WORKDIR/q.txt"
            offset=$(((offset + 1000000) % 2000000))
            read -r u0 s0 < <(cpu_ticks "$NODE")
            cs=""
            if command -v perf >/dev/null; then
                perf stat -e context-switches -p "$NODE" -o "$WORKDIR/cs" -- sleep "$SECONDS_PER_RUN" &
                PERF=$!
            fi
            taskset -c 0 dnsperf -s "$ADDR" -d "$WORKDIR/q.txt" -l "$SECONDS_PER_RUN" -c 8 \
                -q "$OUTSTANDING" -t 2 -n 1 ${RATE:+-Q "$RATE"} >"$WORKDIR/dnsperf.log" 2>&1
            read -r u1 s1 < <(cpu_ticks "$NODE")
            if [[ -n ${PERF:-} ]]; then
                wait "$PERF" || true
                cs=$(awk '/context-switches/ {gsub(",", "", $1); print $1}' "$WORKDIR/cs")
                PERF=""
            fi
            q=$(awk '/Queries completed:/ {print $3}' "$WORKDIR/dnsperf.log")
            lost=$(awk '/Queries lost:/ {print $3}' "$WORKDIR/dnsperf.log")
            servfail=$(grep -o 'SERVFAIL [0-9]*' "$WORKDIR/dnsperf.log" | awk '{print $2}' || true)
            kill "$NODE" && wait "$NODE" 2>/dev/null || true
            NODE=""
            awk -v b="$(basename "$bin") $scenario" -v r="$round" -v q="$q" -v lost="$lost" -v sf="${servfail:-0}" -v t="$TICK_US" \
                -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v cs="$cs" 'BEGIN {
                    printf "round %d %-33s %s answered %s lost %s SERVFAIL  cpu %.2f us/q  user %.2f  system %.2f",
                        r, b, q, lost, sf, (u + s) * t / q, u * t / q, s * t / q
                    if (cs != "") printf "  context switches %.3f/q", cs / q
                    printf "\n"
                }'
        done
    done
done
