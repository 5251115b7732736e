# Sourced by the load scripts: the knotd backend with the load benchmark's zones.
#
#   backend_start WORKDIR NAMES   generate the zones and NAMES miss names into WORKDIR/data, start
#                                 knotd (one worker) on $BACKEND_ADDR:53 pinned to CPU 0 and wait
#                                 until it answers; sets KNOT to its PID
#   answers ADDR [TRIES]          0 once ADDR answers a cluster name (TRIES x 0.1 s, default 100)
#   stop_started                  stop KNOT and NODE, the processes the script started (EXIT trap)
#   peer_command BIN WORKDIR      sets PEER_CMD to the command serving $ADDR:53 from the backend:
#                                 BIN a nodedns binary (one worker, nothing but DNS), or the word
#                                 dnsdist or dnsproxy: that peer as the shared peer harness runs it
#                                 (../shared/bench/peers/conf, rendered into WORKDIR)

KNOT=""
NODE=""

answers() {
    local _
    for _ in $(seq "${2:-100}"); do
        kdig @"$1" ns.dns.cluster.local +short +timeout=1 +retry=0 2>/dev/null | grep -q . && return 0
        sleep 0.1
    done
    return 1
}

stop_started() {
    [[ -n $NODE ]] && kill "$NODE" 2>/dev/null && wait "$NODE" 2>/dev/null
    [[ -n $KNOT ]] && kill "$KNOT" 2>/dev/null && wait "$KNOT" 2>/dev/null
    true
}

backend_start() {
    local dir=$1 names=$2
    rm -rf "$dir" && mkdir -p "$dir/knot/db"
    python3 "$HERE/gen.py" "$dir/data" "$names" >/dev/null
    cat >"$dir/knot/knot.conf" <<EOF
server:
    listen: $BACKEND_ADDR@53
    rundir: "$dir/knot"
    udp-workers: 1
    tcp-workers: 1
    background-workers: 1
database:
    storage: "$dir/knot/db"
log:
  - target: stderr
    any: error
template:
  - id: default
    storage: "$dir/data/zones"
    file: "%s.zone"
    zonefile-sync: -1
    journal-content: none
    semantic-checks: off
zone:
  - domain: cluster.local
  - domain: example.com
EOF
    taskset -c 0 knotd -c "$dir/knot/knot.conf" >"$dir/knot.log" 2>&1 &
    KNOT=$!
    answers "$BACKEND_ADDR" 50 || { echo "knotd did not start: $(tail -3 "$dir/knot.log")" >&2; return 1; }
}

PEER_CONF=${PEER_CONF:-$HERE/../../../shared/bench/peers/conf}

peer_command() {
    local bin=$1 dir=$2
    render() {
        sed -e "s/@ADDR@/$ADDR/g; s/@PORT@/53/g; s/@BACKEND_ADDR@/$BACKEND_ADDR/g; s/@BACKEND_PORT@/53/g" "$1"
    }
    case $bin in
        dnsdist)
            render "$PEER_CONF/dnsdist.conf.in" >"$dir/dnsdist.conf"
            PEER_CMD=(dnsdist --supervised --disable-syslog -C "$dir/dnsdist.conf")
            ;;
        dnsproxy)
            render "$PEER_CONF/dnsproxy.conf.in" >"$dir/dnsproxy.conf"
            PEER_CMD=(dnsproxy -c "$dir/dnsproxy.conf")
            ;;
        *)
            PEER_CMD=("$bin" --workers 1 --listen "$ADDR:53" --upstream "$BACKEND_ADDR:53"
                --cluster-dns "$BACKEND_ADDR:53" --state-dir off --metrics off --health off)
            ;;
    esac
}
