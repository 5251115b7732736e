#!/usr/bin/env bash
# nodedns load benchmark: dnsperf against nodedns (and the Debian caches beside it when installed),
# in front of a knot authoritative backend, everything on 127.0.0.0/8.
#
#   sudo bash benches/load/run.sh                     # build, run every scenario, print the tables
#   DURATION=5 SCENARIOS="hit-max hit-rate" PEERS="nodedns unbound" bash benches/load/run.sh
#   SCENARIOS="miss-rate cluster-miss-rate miss-max cluster-miss-max" PEERS=nodedns bash benches/load/run.sh
#                                                     # the miss paths: UDP (example.com) vs pooled
#                                                     # TCP (cluster.local), CPU per query side by side
#   bash benches/load/run.sh --stop                   # stop what an interrupted run left (PID files)
#
# Scenarios: hit-max hit-rate nxhit-max nxhit-rate miss-max miss-rate (default: the first five but
# nxhit-rate) and cluster-miss-max cluster-miss-rate (unique cluster.local names, all forwarded;
# nodedns asks the cluster zone's upstream over pooled TCP, the others as they ask any upstream).
#
# Layout (2-core machine): knotd pinned to CPU 0 on $BACKEND_ADDR; each server under test pinned to
# CPU 1 with one worker thread; dnsperf pinned to CPU 0. Each (server, scenario) run starts the server
# fresh (empty cache), warms it for hit scenarios, then measures. Figures per run: QPS, p50/p99/p99.9
# latency (dnsperf -v per-query latencies), lost queries, server CPU time per answered query from
# /proc/PID/stat utime+stime before/after, RSS, and the share of queries that reached the backend.
# Every load is bounded by dnsperf -l (and -n); only processes this script started (PID files
# holding PID + start time) are ever signalled.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

: "${DURATION:=10}"                 # seconds per measured run
: "${SCENARIOS:=hit-max hit-rate nxhit-max miss-max miss-rate}"
: "${PEERS:=nodedns unbound dnsmasq dnsdist}"   # servers to run; the Debian ones only if installed
: "${RATE:=20000}"                  # QPS of hit-rate / nxhit-rate
: "${MISS_RATE:=5000}"              # QPS of miss-rate
: "${CLIENTS:=8}"                   # dnsperf -c
: "${OUTSTANDING:=256}"             # dnsperf -q (open loop)
: "${WORKDIR:=/tmp/nodedns-load}"
: "${BACKEND_ADDR:=127.0.0.42}"
: "${SERVER_CPU:=1}"
: "${LOAD_CPU:=0}"
: "${INSTALL:=1}"                   # 0: never apt-get
: "${BUILD:=1}"                     # 0: use the existing target/release/nodedns
: "${NODEDNS:=$ROOT/target/release/nodedns}"

declare -A ADDR=([nodedns]=127.0.0.40 [unbound]=127.0.0.41 [dnsmasq]=127.0.0.43 [dnsdist]=127.0.0.44)
PIDS=$WORKDIR/pids
DATA=$WORKDIR/data
LOGS=$WORKDIR/logs
VOUT=/dev/shm/nodedns-load-$$.out

say() { printf '[%(%T)T] %s\n' -1 "$*" >&2; }
fail() { say "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ our processes only
starttime() { [[ -r /proc/$1/stat ]] && sed 's/.*) //' "/proc/$1/stat" | cut -d' ' -f20; }

# spawn NAME CPU CMD...: start CMD pinned to CPU in the background (taskset execs, so $! is the
# server itself), record "PID STARTTIME" in $PIDS/NAME.
spawn() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" </dev/null >"$LOGS/$name.log" 2>&1 &
    local pid=$! st="" i
    for i in {1..100}; do st=$(starttime "$pid") && [[ -n $st ]] && break; sleep 0.01; done
    echo "$pid $st" >"$PIDS/$name"
    echo "$pid"
}

ours() { # NAME -> PID if the recorded process still is the one we started
    local pid st
    [[ -f $PIDS/$1 ]] || return 1
    read -r pid st <"$PIDS/$1"
    [[ -n $st && $(starttime "$pid" 2>/dev/null) == "$st" ]] && echo "$pid"
}

halt() { # NAME: SIGTERM, then SIGKILL after 5 s
    local pid i
    if pid=$(ours "$1"); then
        kill -TERM "$pid" 2>/dev/null || true
        for i in {1..50}; do ours "$1" >/dev/null || break; grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && break; sleep 0.1; done
        if ours "$1" >/dev/null && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; then
            say "$1 ($pid) ignored SIGTERM; SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    fi
    rm -f "$PIDS/$1"
}

halt_all() {
    local f
    for f in "$PIDS"/*; do [[ -e $f ]] && halt "$(basename "$f")"; done
    rm -f "$VOUT"
}

cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; } # utime+stime, all threads
rss_kib() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }

# ------------------------------------------------------------------ setup
install() {
    [[ $INSTALL == 1 ]] || return 0
    local want=() p
    command -v dnsperf >/dev/null || want+=(dnsperf)
    command -v knotd >/dev/null || want+=(knot)
    command -v kdig >/dev/null || want+=(knot-dnsutils)
    command -v taskset >/dev/null || want+=(util-linux)
    [[ -x /usr/bin/time ]] || want+=(time)
    ((${#want[@]})) || return 0
    [[ $(id -u) == 0 ]] || fail "need ${want[*]}: run as root or install them"
    say "apt-get install ${want[*]}"
    local guard=0
    # keep the packages' services (port 53!) from starting
    [[ -e /usr/sbin/policy-rc.d ]] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; guard=1; }
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}" >"$LOGS/apt.log" 2>&1 || say "apt-get failed: $LOGS/apt.log"
    [[ $guard == 1 ]] && rm -f /usr/sbin/policy-rc.d
    for p in dnsperf knotd kdig taskset; do command -v $p >/dev/null || fail "$p missing"; done
}

gen_data() {
    local miss=$((DURATION * 80000 > 1000000 ? DURATION * 80000 : 1000000))
    local stamp
    stamp="$(md5sum <"$HERE/gen.py" | cut -c1-12) $miss"
    [[ -f $DATA/stamp && $(cat "$DATA/stamp") == "$stamp" ]] && return 0
    say "generating zones and query files ($miss miss names)"
    rm -rf "$DATA" && mkdir -p "$DATA"
    python3 "$HERE/gen.py" "$DATA" "$miss"
    echo "$stamp" >"$DATA/stamp"
}

start_backend() {
    local st=$WORKDIR/knot
    rm -rf "$st" && mkdir -p "$st/db"
    cat >"$st/knot.conf" <<EOF
server:
    listen: $BACKEND_ADDR@53
    rundir: "$st"
    pidfile: "$st/knot.pid"
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$st/db"
log:
  - target: stderr
    any: error
mod-stats:
  - id: q
    request-protocol: on
template:
  - id: default
    storage: "$DATA/zones"
    file: "%s.zone"
    global-module: mod-stats/q
    zonefile-sync: -1
    journal-content: none
    semantic-checks: off
zone:
  - domain: cluster.local
  - domain: example.com
EOF
    spawn knot "$LOAD_CPU" knotd -c "$st/knot.conf" >/dev/null
    ready knot "$BACKEND_ADDR" || fail "knotd did not start: $(tail -3 "$LOGS/knot.log")"
}

backend_count() {
    knotc -c "$WORKDIR/knot/knot.conf" stats mod-stats.request-protocol 2>/dev/null | awk -F' = ' '{n += $2} END {print n + 0}'
}

ready() { # NAME ADDR
    local i
    for i in {1..80}; do
        ours "$1" >/dev/null || return 1
        kdig @"$2" ns.dns.cluster.local A +timeout=1 +retry=0 +short 2>/dev/null | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

# start_server NAME -> PID (fresh, empty cache, pinned, one worker)
start_server() {
    local name=$1 a=${ADDR[$1]} st=$WORKDIR/$1
    rm -rf "$st" && mkdir -p "$st"
    case $name in
        nodedns)
            spawn nodedns "$SERVER_CPU" "$NODEDNS" --workers 1 --listen "$a:53" \
                --upstream "$BACKEND_ADDR:53" --cluster-dns "$BACKEND_ADDR:53" \
                --metrics "$a:9253" --health "$a:8080" --lameduck 0s --state-dir off ;;
        unbound)
            cat >"$st/unbound.conf" <<EOF
server:
    interface: $a
    port: 53
    num-threads: 1
    do-daemonize: no
    use-syslog: no
    logfile: ""
    chroot: ""
    username: ""
    pidfile: ""
    directory: "$st"
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    do-not-query-localhost: no
    module-config: "iterator"
    msg-cache-size: 64m
    rrset-cache-size: 128m
    local-zone: "local." transparent
remote-control:
    control-enable: no
forward-zone:
    name: "."
    forward-addr: $BACKEND_ADDR@53
EOF
            spawn unbound "$SERVER_CPU" unbound -d -p -c "$st/unbound.conf" ;;
        dnsmasq)
            spawn dnsmasq "$SERVER_CPU" dnsmasq -k -C /dev/null --no-resolv --no-hosts --no-poll \
                --bind-interfaces --listen-address="$a" --port=53 --server="$BACKEND_ADDR" \
                --cache-size=100000 --dns-forward-max=1000 --pid-file= --log-facility=- ;;
        dnsdist)
            cat >"$st/dnsdist.conf" <<EOF
setSecurityPollSuffix("")
setLocal("$a:53")
setMaxTCPClientThreads(1)
newServer({address="$BACKEND_ADDR:53", checkName="ns.dns.cluster.local.", checkInterval=5})
getPool(""):setCache(newPacketCache(200000, {maxTTL=86400, minTTL=0}))
EOF
            spawn dnsdist "$SERVER_CPU" dnsdist --supervised --disable-syslog -C "$st/dnsdist.conf" ;;
        *) fail "unknown server $name" ;;
    esac
}

# scenario -> "FILE WARM DNSPERF-ARGS..."
spec() {
    case $1 in
        hit-max) echo "hit.txt 1" ;;
        hit-rate) echo "hit.txt 1 -Q $RATE" ;;
        nxhit-max) echo "nxhit.txt 1" ;;
        nxhit-rate) echo "nxhit.txt 1 -Q $RATE" ;;
        miss-max) echo "miss.txt 0 -n 1" ;;
        miss-rate) echo "miss.txt 0 -n 1 -Q $MISS_RATE" ;;
        # cluster names, every one a miss: nodedns forwards the cluster zone over pooled TCP
        cluster-miss-max) echo "cmiss.txt 0 -n 1" ;;
        cluster-miss-rate) echo "cmiss.txt 0 -n 1 -Q $MISS_RATE" ;;
        *) fail "unknown scenario $1" ;;
    esac
}

measure() { # NAME SCENARIO
    local name=$1 sc=$2 a=${ADDR[$1]} pid file warm args
    read -r file warm args <<<"$(spec "$sc")"
    start_server "$name" >/dev/null
    pid=$(ours "$name") || fail "$name did not start"
    if ! ready "$name" "$a"; then
        say "$name did not answer: $(tail -3 "$LOGS/$name.log" | tr '\n' ' ')"
        halt "$name"
        return 0
    fi
    local dp=(taskset -c "$LOAD_CPU" dnsperf -s "$a" -p 53 -c "$CLIENTS" -q "$OUTSTANDING" -t 2 -d "$DATA/$file")
    # warm: one bounded pass at a moderate rate, then a second one for whatever the first lost
    [[ $warm == 1 ]] && { "${dp[@]}" -n 2 -Q 25000 -l 10 >"$LOGS/$name.$sc.warm" 2>&1 || true; }

    local t0 t1 b0 b1 gen
    b0=$(backend_count)
    t0=$(cpu_ticks "$pid")
    # shellcheck disable=SC2086
    /usr/bin/time -f '%U %S %e' -o "$WORKDIR/time" "${dp[@]}" -l "$DURATION" $args -v >"$VOUT" 2>"$LOGS/$name.$sc.err" || true
    t1=$(cpu_ticks "$pid")
    b1=$(backend_count)
    local rss
    rss=$(rss_kib "$pid")
    # nothing but loopback
    if ss -Htuanp 2>/dev/null | grep "pid=$pid," | awk '{print $5}' | grep -vqE '^(127\.|\*|0\.0\.0\.0)'; then
        say "WARNING: $name has a socket outside 127.0.0.0/8"
    fi
    halt "$name"
    gen=$(awk '{ if ($3 > 0) printf "%.0f", ($1 + $2) / $3 * 100 }' "$WORKDIR/time")
    grep -v '^> ' "$VOUT" >"$LOGS/$name.$sc.dnsperf" || true
    local sent done lost qps p50 p99 p999
    read -r sent done lost qps p50 p99 p999 <<<"$(python3 "$HERE/report.py" parse "$VOUT")"
    rm -f "$VOUT"
    local hz cpu_pct cpu_usq up
    hz=$(getconf CLK_TCK)
    cpu_pct=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v s="$DURATION" 'BEGIN{printf "%.0f", d / hz / s * 100}')
    cpu_usq=$(awk -v d=$((t1 - t0)) -v hz="$hz" -v n="$done" 'BEGIN{if (n > 0) printf "%.2f", d / hz / n * 1e6; else print "-"}')
    up=$(awk -v b=$((b1 - b0)) -v n="$done" 'BEGIN{if (n > 0) printf "%.1f", b / n * 100; else print "-"}')
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$sc" "$qps" "$p50" "$p99" "$p999" \
        "$lost" "$cpu_pct" "$cpu_usq" "$(awk -v k="$rss" 'BEGIN{printf "%.1f", k / 1024}')" "$up" "$sent" "$gen" >>"$RES"
    say "$(printf '%-8s %-10s qps=%-7s p50=%sms p99=%sms lost=%s cpu=%s%% %sus/q gen=%s%% upstream=%s%%' \
        "$name" "$sc" "$qps" "$p50" "$p99" "$lost" "$cpu_pct" "$cpu_usq" "$gen" "$up")"
}

main() {
    mkdir -p "$PIDS" "$LOGS"
    halt_all
    [[ ${1:-} == --stop ]] && exit 0
    [[ -z ${1:-} ]] || { sed -n '2,8p' "$0"; exit 2; }
    trap halt_all EXIT
    trap 'say interrupted; exit 130' INT TERM
    install
    if [[ $BUILD == 1 ]]; then
        say "cargo build --release --locked"
        (cd "$ROOT" && cargo build --release --locked -q) || fail "build failed"
    fi
    [[ -x $NODEDNS ]] || fail "$NODEDNS not found"
    gen_data

    local run=() p
    for p in $PEERS; do
        [[ -n ${ADDR[$p]:-} ]] || fail "unknown peer $p (known: ${!ADDR[*]})"
        if [[ $p != nodedns ]] && ! command -v "$p" >/dev/null; then
            say "$p not installed: skipped (apt-get install $p)"
            continue
        fi
        if ss -Hlun | awk '{print $4}' | grep -qxE "(${ADDR[$p]}|0\.0\.0\.0|\*):53"; then
            say "${ADDR[$p]}:53 busy: $p skipped"
            continue
        fi
        run+=("$p")
    done

    local stamp
    stamp=$(date +%Y%m%d-%H%M%S)
    mkdir -p "$WORKDIR/results/$stamp"
    ln -sfn "$WORKDIR/results/$stamp" "$WORKDIR/results/latest"
    RES=$WORKDIR/results/$stamp/results.tsv
    printf 'peer\tscenario\tqps\tp50_ms\tp99_ms\tp999_ms\tlost\tcpu_pct\tcpu_us_q\trss_mib\tupstream_pct\tsent\tgen_cpu_pct\n' >"$RES"
    {
        echo "date: $(date -Is)"
        echo "host: $(uname -srm), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
        echo "nodedns: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet -- src 2>/dev/null || echo '+dirty src')"
        echo "settings: DURATION=$DURATION RATE=$RATE MISS_RATE=$MISS_RATE CLIENTS=$CLIENTS OUTSTANDING=$OUTSTANDING SERVER_CPU=$SERVER_CPU LOAD_CPU=$LOAD_CPU"
        echo "servers: ${run[*]}"
        echo "versions: $(dnsperf -h 2>&1 | grep -m1 -o 'Version [0-9.]*') dnsperf; $(knotd -V | head -1)"
        for p in "${run[@]}"; do
            case $p in
                unbound) echo "  $(unbound -V | head -1)" ;;
                dnsmasq) echo "  $(dnsmasq -v | head -1)" ;;
                dnsdist) echo "  $(dnsdist -V 2>&1 | head -1)" ;;
            esac
        done
    } | tee "$WORKDIR/results/$stamp/env.txt" >&2

    start_backend
    local sc
    for sc in $SCENARIOS; do
        for p in "${run[@]}"; do measure "$p" "$sc"; done
    done
    halt_all
    {
        cat "$WORKDIR/results/$stamp/env.txt"
        echo
        echo "hit: 20k cached names (10k cluster.local TTL 30, 10k example.com TTL 300); nxhit: 20k cached NXDOMAINs"
        echo "(search-path expansions); miss: unique wildcard names, all forwarded. -max: open loop, -c $CLIENTS -q $OUTSTANDING;"
        echo "-rate: fixed $RATE QPS (miss-rate $MISS_RATE). CPU µs/q: server utime+stime / answered queries."
        python3 "$HERE/report.py" table "$RES"
    } | tee "$WORKDIR/results/$stamp/table.md"
    say "results: $WORKDIR/results/$stamp"
}

main "$@"
