//! Prometheus metrics under the names CoreDNS exports, so existing dashboards and alerts work.
//!
//! The per-query counters live in `WorkerStats`: blocks of plain atomics per UDP worker and per
//! TCP listener (no lock, no allocation, no label lookup per query), folded into metric families
//! when Prometheus scrapes (`QueryCollector`). A UDP worker counts its cache hits with plain
//! loads and stores on a block only its thread writes; queries answered elsewhere use relaxed
//! `fetch_add` (benches/metrics_cost.rs measures both). Miss-path metrics
//! (forwarding) use ordinary labelled prometheus vectors: a miss already costs an upstream
//! round trip.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::cache::Cache;
use crate::dns::{self, AnswerKind, Query};

/// Transport a query arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp = 0,
    Tcp = 1,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// Query types CoreDNS labels by name; everything else is "other".
const TYPES: [(u16, &str); 15] = [
    (1, "A"),
    (28, "AAAA"),
    (5, "CNAME"),
    (15, "MX"),
    (2, "NS"),
    (12, "PTR"),
    (6, "SOA"),
    (33, "SRV"),
    (16, "TXT"),
    (65, "HTTPS"),
    (64, "SVCB"),
    (255, "ANY"),
    (43, "DS"),
    (48, "DNSKEY"),
    (0, "other"),
];
const NTYPES: usize = TYPES.len();

#[inline]
fn type_index(qtype: u16) -> usize {
    TYPES[..NTYPES - 1]
        .iter()
        .position(|&(t, _)| t == qtype)
        .unwrap_or(NTYPES - 1)
}

const RCODES: [&str; 16] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE", "RCODE11", "RCODE12", "RCODE13", "RCODE14", "RCODE15",
];

/// Upstream transports as labelled in `nodedns_upstream_queries_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamTransport {
    Udp,
    Tcp,
    TcpFallback,
}

/// How an upstream exchange went, for `nodedns_upstream_queries_total{transport,outcome}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Timeout,
    Error,
}

/// One upstream's forward metrics, resolved once when the forwarder starts: a miss bumps them
/// without formatting the address or hashing label values on every query. Series for an rcode or
/// an outcome are still created at first use, as CoreDNS does.
pub struct UpstreamMetrics {
    label: String,
    requests: IntCounter,
    by_rcode: [std::sync::OnceLock<(IntCounter, Histogram)>; 16],
    queries: [std::sync::OnceLock<IntCounter>; 9],
    responses_vec: IntCounterVec,
    duration_vec: HistogramVec,
    queries_vec: IntCounterVec,
}

impl UpstreamMetrics {
    /// `coredns_forward_requests_total`.
    pub fn request(&self) {
        self.requests.inc();
    }

    /// `coredns_forward_responses_total` and `coredns_forward_request_duration_seconds`.
    pub fn response(&self, rcode: u8, secs: f64) {
        let i = (rcode & 0xF) as usize;
        let (count, duration) = self.by_rcode[i].get_or_init(|| {
            let l = [self.label.as_str(), RCODES[i]];
            (
                self.responses_vec.with_label_values(&l),
                self.duration_vec.with_label_values(&l),
            )
        });
        count.inc();
        duration.observe(secs);
    }

    /// `nodedns_upstream_queries_total{to,transport,outcome}`.
    pub fn query(&self, transport: UpstreamTransport, outcome: Outcome) {
        let (t, tl) = match transport {
            UpstreamTransport::Udp => (0, "udp"),
            UpstreamTransport::Tcp => (1, "tcp"),
            UpstreamTransport::TcpFallback => (2, "tcp_fallback"),
        };
        let (o, ol) = match outcome {
            Outcome::Ok => (0, "ok"),
            Outcome::Timeout => (1, "timeout"),
            Outcome::Error => (2, "error"),
        };
        self.queries[t * 3 + o]
            .get_or_init(|| self.queries_vec.with_label_values(&[&self.label, tl, ol]))
            .inc();
    }
}

pub fn rcode_name(rcode: u8) -> &'static str {
    RCODES[(rcode & 0xF) as usize]
}

/// CoreDNS's duration buckets (0.25 ms doubling to 8 s) plus finer ones for cache hits.
pub const DURATION_BUCKETS: [f64; 20] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032,
    0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192,
];
/// CoreDNS's size buckets.
pub const SIZE_BUCKETS: [f64; 14] = [
    0.0, 100.0, 200.0, 300.0, 400.0, 511.0, 1023.0, 2047.0, 4095.0, 8291.0, 16000.0, 32000.0,
    48000.0, 64000.0,
];
const ND: usize = DURATION_BUCKETS.len() + 1;
const NS: usize = SIZE_BUCKETS.len() + 1;

/// One block of query counters, indexed by zone, transport, family, type and rcode.
struct Counters {
    /// [zone][proto][family][type]
    requests: Box<[AtomicU64]>,
    /// [zone][rcode][plugin: cache, forward]
    responses: Box<[AtomicU64]>,
    /// [zone][type][bucket] (non-cumulative), plus sums in ns per [zone][type]
    duration: Box<[AtomicU64]>,
    duration_sum_ns: Box<[AtomicU64]>,
    /// [zone][proto][bucket], plus byte sums per [zone][proto]
    req_size: Box<[AtomicU64]>,
    req_size_sum: Box<[AtomicU64]>,
    resp_size: Box<[AtomicU64]>,
    resp_size_sum: Box<[AtomicU64]>,
    /// Cache hits: [success, denial]
    hits: [AtomicU64; 2],
    misses: AtomicU64,
    malformed: AtomicU64,
}

fn atomics(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

/// Adds `v` to a counter. `SOLE` (one writing thread): a plain load and store, no locked
/// read-modify-write; concurrent writers would lose counts (never memory safety), which is why
/// only a counter block with a single writing thread uses it. Otherwise a relaxed `fetch_add`.
#[inline(always)]
fn bump<const SOLE: bool>(a: &AtomicU64, v: u64) {
    if SOLE {
        a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    } else {
        a.fetch_add(v, Ordering::Relaxed);
    }
}

fn bucket(buckets: &[f64], v: f64) -> usize {
    buckets
        .iter()
        .position(|&b| v <= b)
        .unwrap_or(buckets.len())
}

impl Counters {
    fn new(zones: usize) -> Self {
        Counters {
            requests: atomics(zones * 2 * 2 * NTYPES),
            responses: atomics(zones * 16 * 2),
            duration: atomics(zones * NTYPES * ND),
            duration_sum_ns: atomics(zones * NTYPES),
            req_size: atomics(zones * 2 * NS),
            req_size_sum: atomics(zones * 2),
            resp_size: atomics(zones * 2 * NS),
            resp_size_sum: atomics(zones * 2),
            hits: [AtomicU64::new(0), AtomicU64::new(0)],
            misses: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn record<const SOLE: bool>(
        &self,
        z: usize,
        proto: Proto,
        ipv6: bool,
        q: &Query,
        req_len: usize,
        reply: &[u8],
        cached: Option<AnswerKind>,
        elapsed: Option<Duration>,
    ) -> HitTiming {
        let p = proto as usize;
        let t = type_index(q.qtype);
        let requests = &self.requests[((z * 2 + p) * 2 + ipv6 as usize) * NTYPES + t];
        bump::<SOLE>(requests, 1);
        let rcode = reply.get(3).map_or(dns::RCODE_SERVFAIL, |b| b & 0xF);
        // `plugin` as CoreDNS labels it: "cache" for a hit, "forward" for everything resolved
        // (or refused) on the miss path.
        let plugin = cached.is_none() as usize;
        bump::<SOLE>(&self.responses[(z * 16 + rcode as usize) * 2 + plugin], 1);
        let timing = HitTiming {
            zone_type: (z * NTYPES + t) as u32,
        };
        if let Some(elapsed) = elapsed {
            self.duration::<SOLE>(timing, 1, elapsed);
        }
        let zp = z * 2 + p;
        let b = bucket(&SIZE_BUCKETS, req_len as f64);
        bump::<SOLE>(&self.req_size[zp * NS + b], 1);
        bump::<SOLE>(&self.req_size_sum[zp], req_len as u64);
        let b = bucket(&SIZE_BUCKETS, reply.len() as f64);
        bump::<SOLE>(&self.resp_size[zp * NS + b], 1);
        bump::<SOLE>(&self.resp_size_sum[zp], reply.len() as u64);
        match cached {
            Some(AnswerKind::Positive) => bump::<SOLE>(&self.hits[0], 1),
            Some(_) => bump::<SOLE>(&self.hits[1], 1),
            None => bump::<SOLE>(&self.misses, 1),
        }
        timing
    }

    /// Counts `n` durations of `elapsed` for the zone and type of `timing`.
    #[inline(always)]
    fn duration<const SOLE: bool>(&self, timing: HitTiming, n: u64, elapsed: Duration) {
        let zt = timing.zone_type as usize;
        let b = bucket(&DURATION_BUCKETS, elapsed.as_secs_f64());
        bump::<SOLE>(&self.duration[zt * ND + b], n);
        bump::<SOLE>(&self.duration_sum_ns[zt], n * elapsed.as_nanos() as u64);
    }
}

/// Where a cache hit's duration is counted (its zone and query type), for
/// [`WorkerStats::hit_durations`]: a UDP worker learns the duration of the hits of a batch only
/// once their replies are sent.
#[derive(Clone, Copy, Debug)]
pub struct HitTiming {
    zone_type: u32,
}

/// The query counters of one UDP worker or one TCP listener, folded with the others of the same
/// `server` label at scrape time.
///
/// Two blocks: `owned` is written by one thread only (a UDP worker's own thread, which answers
/// cache hits and rejects malformed packets), so counting there costs plain loads and stores;
/// `shared` takes everything else (misses resolved on runtime threads, every TCP query) with
/// relaxed `fetch_add`.
pub struct WorkerStats {
    server: String,
    zones: usize,
    /// True for a UDP worker's stats: `Context::handle` runs on one thread only for them.
    sole_writer: bool,
    owned: Counters,
    shared: Counters,
}

impl WorkerStats {
    fn new(server: String, zones: usize, sole_writer: bool) -> Self {
        WorkerStats {
            server,
            zones,
            sole_writer,
            // Without a sole writer the owned block stays empty.
            owned: Counters::new(if sole_writer { zones } else { 0 }),
            shared: Counters::new(zones),
        }
    }

    /// Counts one answered query. `cached` is the kind of cache entry for a hit, None for a miss.
    ///
    /// For stats from [`Metrics::new_udp_worker_for`], hits must be recorded from the worker's
    /// own thread only (misses may come from anywhere).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn record(
        &self,
        zone: usize,
        proto: Proto,
        ipv6: bool,
        q: &Query,
        req_len: usize,
        reply: &[u8],
        cached: Option<AnswerKind>,
        elapsed: Duration,
    ) {
        self.count(zone, proto, ipv6, q, req_len, reply, cached, Some(elapsed));
    }

    /// Counts a cache hit like [`record`](Self::record), all but its duration, which the caller
    /// passes to [`hit_durations`](Self::hit_durations) with the returned timing once the reply
    /// is sent (a UDP worker: once for the whole batch). Same thread rule as `record`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn record_hit(
        &self,
        zone: usize,
        proto: Proto,
        ipv6: bool,
        q: &Query,
        req_len: usize,
        reply: &[u8],
        kind: AnswerKind,
    ) -> HitTiming {
        self.count(zone, proto, ipv6, q, req_len, reply, Some(kind), None)
    }

    /// `record` and `record_hit`: hits go to the block only this thread writes when there is one.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn count(
        &self,
        zone: usize,
        proto: Proto,
        ipv6: bool,
        q: &Query,
        req_len: usize,
        reply: &[u8],
        cached: Option<AnswerKind>,
        elapsed: Option<Duration>,
    ) -> HitTiming {
        let z = zone.min(self.zones - 1);
        if self.sole_writer && cached.is_some() {
            self.owned
                .record::<true>(z, proto, ipv6, q, req_len, reply, cached, elapsed)
        } else {
            self.shared
                .record::<false>(z, proto, ipv6, q, req_len, reply, cached, elapsed)
        }
    }

    /// Counts the duration `elapsed` for every hit in `hits` (from [`record_hit`](Self::record_hit)
    /// on this thread). Consecutive hits of the same zone and type are counted together.
    pub fn hit_durations(&self, hits: &[HitTiming], elapsed: Duration) {
        let mut i = 0;
        while i < hits.len() {
            let t = hits[i];
            let run = hits[i..]
                .iter()
                .take_while(|h| h.zone_type == t.zone_type)
                .count();
            if self.sole_writer {
                self.owned.duration::<true>(t, run as u64, elapsed);
            } else {
                self.shared.duration::<false>(t, run as u64, elapsed);
            }
            i += run;
        }
    }

    /// Counts a packet that could not be parsed as a query (from the receiving thread, like
    /// hits).
    #[inline]
    pub fn malformed(&self, _proto: Proto) {
        if self.sole_writer {
            bump::<true>(&self.owned.malformed, 1);
        } else {
            bump::<false>(&self.shared.malformed, 1);
        }
    }
}

/// Panics seen by the hook of [`install_panic_hook`], process-wide (a panic belongs to the
/// process, not to one `Metrics`), exported as `coredns_panics_total`.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts every panic in `coredns_panics_total`, then runs the hook that was installed before
/// (by default, printing the message). Idempotent. With `panic = "abort"` (the release profile)
/// the process dies right after, so the count matters for panics caught by tokio tasks in other
/// builds, and for the restart it explains.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::Relaxed);
            previous(info);
        }));
    });
}

/// Panics counted since the process started.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// The `errortype` labels of `coredns_nodecache_setup_errors_total`, as node-cache names them;
/// all are exported from the start.
pub const SETUP_ERROR_TYPES: [&str; 5] = [
    "iptables",
    "iptables_lock",
    "interface_add",
    "interface_check",
    "configmap",
];

/// Every metric nodedns exports, on its own registry.
pub struct Metrics {
    pub registry: Registry,
    zone_names: Vec<String>,
    workers: Arc<Mutex<Vec<Arc<WorkerStats>>>>,
    cache: Arc<Mutex<Option<Arc<Cache>>>>,
    forward_requests: IntCounterVec,
    forward_responses: IntCounterVec,
    forward_duration: HistogramVec,
    healthcheck_failures: IntCounterVec,
    upstream_queries: IntCounterVec,
    inflight: IntGauge,
    tcp_conns: IntGaugeVec,
    pub setup_errors: IntCounterVec,
    /// Cache loads at start, by source (handover, snapshot) and result (ok, missing, or why
    /// the snapshot was refused).
    pub warm_loads: IntCounterVec,
    /// Entries the last warm start loaded.
    pub warm_entries: IntGauge,
    /// Cache snapshots written to the state directory, by result (ok, error).
    pub snapshot_writes: IntCounterVec,
    /// Listener handovers, by role (took: from the instance before; gave: to a successor).
    pub handovers: IntCounterVec,
}

impl Metrics {
    /// `zone_names` in the order of `Settings::zones` (labels of the `zone` dimension).
    pub fn new(zone_names: Vec<String>) -> Arc<Self> {
        let registry = Registry::new();
        /// Registers `c` on our registry and hands it back. Names are constants: a clash is a bug.
        fn reg<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let forward_requests = counter_vec(
            "coredns_forward_requests_total",
            "Counter of requests made per upstream.",
            &["to"],
        );
        let forward_responses = counter_vec(
            "coredns_forward_responses_total",
            "Counter of responses received per upstream.",
            &["to", "rcode"],
        );
        let healthcheck_failures = counter_vec(
            "coredns_forward_healthcheck_failures_total",
            "Counter of the number of failed exchanges (timeouts and errors) per upstream.",
            &["to"],
        );
        let upstream_queries = counter_vec(
            "nodedns_upstream_queries_total",
            "Upstream exchanges by transport (udp, tcp, tcp_fallback) and outcome (ok, timeout, error).",
            &["to", "transport", "outcome"],
        );
        let setup_errors = counter_vec(
            "coredns_nodecache_setup_errors_total",
            "The number of errors during periodic network setup for node-cache.",
            &["errortype"],
        );
        for t in SETUP_ERROR_TYPES {
            setup_errors.with_label_values(&[t]);
        }
        let warm_loads = counter_vec(
            "nodedns_cache_warm_loads_total",
            "Cache loads at start by source (handover, snapshot) and result (ok, missing, or the reason the snapshot was refused).",
            &["source", "result"],
        );
        let snapshot_writes = counter_vec(
            "nodedns_cache_snapshot_writes_total",
            "Cache snapshots written to the state directory, by result (ok, error).",
            &["result"],
        );
        for r in ["ok", "error"] {
            snapshot_writes.with_label_values(&[r]);
        }
        let handovers = counter_vec(
            "nodedns_handovers_total",
            "Listener handovers between instances on this node, by role (took, gave).",
            &["role"],
        );
        for r in ["took", "gave"] {
            handovers.with_label_values(&[r]);
        }
        let warm_entries = reg(
            &registry,
            IntGauge::new(
                "nodedns_cache_warm_entries",
                "Cache entries loaded at start (handover or snapshot).",
            )
            .expect("valid metric"),
        );
        let forward_duration = reg(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "coredns_forward_request_duration_seconds",
                    "Histogram of the time each upstream request took.",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["to", "rcode"],
            )
            .expect("valid metric"),
        );
        let inflight = reg(
            &registry,
            IntGauge::new(
                "nodedns_forward_inflight",
                "Forwarded queries waiting for an upstream.",
            )
            .expect("valid metric"),
        );
        let tcp_conns = reg(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "nodedns_upstream_tcp_connections",
                    "Open pooled TCP connections per upstream.",
                ),
                &["to"],
            )
            .expect("valid metric"),
        );
        let build = IntGaugeVec::new(
            Opts::new(
                "coredns_build_info",
                "A metric with a constant '1' value labeled by version, revision, and goversion from which CoreDNS was built.",
            ),
            &["version", "revision", "goversion"],
        )
        .expect("valid metric");
        build
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                option_env!("NODEDNS_REVISION").unwrap_or("unknown"),
                option_env!("NODEDNS_RUSTC_VERSION").unwrap_or("rust"),
            ])
            .set(1);
        registry.register(Box::new(build)).expect("unique");
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .ok();
        let workers = Arc::new(Mutex::new(Vec::new()));
        let cache = Arc::new(Mutex::new(None));
        registry
            .register(Box::new(QueryCollector::new(
                zone_names.clone(),
                workers.clone(),
                cache.clone(),
            )))
            .expect("unique");
        Arc::new(Metrics {
            registry,
            zone_names,
            workers,
            cache,
            forward_requests,
            forward_responses,
            forward_duration,
            healthcheck_failures,
            upstream_queries,
            inflight,
            tcp_conns,
            setup_errors,
            warm_loads,
            warm_entries,
            snapshot_writes,
            handovers,
        })
    }

    /// A new block of query counters for a listener serving `server` whose queries may be
    /// answered on any thread (TCP).
    pub fn new_worker_for(&self, server: String) -> Arc<WorkerStats> {
        self.add_worker(WorkerStats::new(
            server,
            self.zone_names.len().max(1),
            false,
        ))
    }

    /// A new block of query counters for one UDP worker serving `server`: its cache hits and
    /// malformed packets must be counted on the worker's own thread only (as `Context::handle`
    /// does when the worker calls it), which lets them skip atomic read-modify-writes.
    pub fn new_udp_worker_for(&self, server: String) -> Arc<WorkerStats> {
        self.add_worker(WorkerStats::new(server, self.zone_names.len().max(1), true))
    }

    fn add_worker(&self, w: WorkerStats) -> Arc<WorkerStats> {
        let w = Arc::new(w);
        self.workers.lock().push(w.clone());
        w
    }

    pub fn set_cache(&self, cache: Arc<Cache>) {
        *self.cache.lock() = Some(cache);
    }

    /// The forward metrics of one upstream, resolved once (see [`UpstreamMetrics`]).
    pub fn upstream(&self, to: SocketAddr) -> UpstreamMetrics {
        let label = to.to_string();
        UpstreamMetrics {
            requests: self.forward_requests.with_label_values(&[&label]),
            by_rcode: Default::default(),
            queries: Default::default(),
            responses_vec: self.forward_responses.clone(),
            duration_vec: self.forward_duration.clone(),
            queries_vec: self.upstream_queries.clone(),
            label,
        }
    }

    pub fn forward_failure(&self, to: SocketAddr) {
        self.healthcheck_failures
            .with_label_values(&[&to.to_string()])
            .inc();
    }

    pub fn upstream_tcp_open(&self, to: SocketAddr, delta: i64) {
        self.tcp_conns
            .with_label_values(&[&to.to_string()])
            .add(delta);
    }

    pub fn inflight_inc(&self) {
        self.inflight.inc();
    }

    pub fn inflight_dec(&self) {
        self.inflight.dec();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut buf,
        )
        .expect("text encoding never fails");
        String::from_utf8(buf).expect("utf-8")
    }
}

/// Folds every worker's counters into CoreDNS-named families at scrape time.
struct QueryCollector {
    zone_names: Vec<String>,
    workers: Arc<Mutex<Vec<Arc<WorkerStats>>>>,
    cache: Arc<Mutex<Option<Arc<Cache>>>>,
    descs: Vec<Desc>,
}

const FAMILIES: [(&str, &str, MetricType); 13] = [
    ("coredns_dns_requests_total", "Counter of DNS requests made per zone, protocol and family.", MetricType::COUNTER),
    ("coredns_dns_responses_total", "Counter of response status codes.", MetricType::COUNTER),
    ("coredns_dns_request_duration_seconds", "Histogram of the time (in seconds) each request took per zone.", MetricType::HISTOGRAM),
    ("coredns_dns_request_size_bytes", "Size of the EDNS0 UDP buffer in bytes (64K for TCP) per zone and protocol.", MetricType::HISTOGRAM),
    ("coredns_dns_response_size_bytes", "Size of the returned response in bytes.", MetricType::HISTOGRAM),
    ("coredns_cache_hits_total", "The count of cache hits.", MetricType::COUNTER),
    ("coredns_cache_misses_total", "The count of cache misses. Deprecated, derive misses from cache hits/requests counters.", MetricType::COUNTER),
    ("coredns_cache_entries", "The number of elements in the cache.", MetricType::GAUGE),
    ("coredns_cache_evictions_total", "The count of cache evictions.", MetricType::COUNTER),
    ("nodedns_malformed_packets_total", "Packets that could not be parsed as a DNS query (answered FORMERR/NOTIMP when the header was readable, else dropped).", MetricType::COUNTER),
    ("nodedns_cache_bytes", "Bytes held by cache entries.", MetricType::GAUGE),
    ("nodedns_cache_inserts_total", "Answers stored in the cache.", MetricType::COUNTER),
    ("coredns_panics_total", "A metrics that counts the number of panics.", MetricType::COUNTER),
];

fn labels(pairs: &[(&str, &str)]) -> Vec<proto::LabelPair> {
    pairs
        .iter()
        .map(|(k, v)| {
            let mut l = proto::LabelPair::default();
            l.set_name(k.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

fn counter(pairs: &[(&str, &str)], v: f64) -> proto::Metric {
    let mut c = proto::Counter::default();
    c.set_value(v);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_counter(c);
    m
}

fn gauge(pairs: &[(&str, &str)], v: f64) -> proto::Metric {
    let mut g = proto::Gauge::default();
    g.set_value(v);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_gauge(g);
    m
}

fn histogram(pairs: &[(&str, &str)], bounds: &[f64], counts: &[u64], sum: f64) -> proto::Metric {
    let mut h = proto::Histogram::default();
    let mut cum = 0;
    let mut buckets = Vec::with_capacity(bounds.len());
    for (i, &b) in bounds.iter().enumerate() {
        cum += counts[i];
        let mut bk = proto::Bucket::default();
        bk.set_upper_bound(b);
        bk.set_cumulative_count(cum);
        buckets.push(bk);
    }
    h.set_bucket(buckets);
    h.set_sample_count(counts.iter().sum());
    h.set_sample_sum(sum);
    let mut m = proto::Metric::from_label(labels(pairs));
    m.set_histogram(h);
    m
}

impl QueryCollector {
    fn new(
        zone_names: Vec<String>,
        workers: Arc<Mutex<Vec<Arc<WorkerStats>>>>,
        cache: Arc<Mutex<Option<Arc<Cache>>>>,
    ) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|(n, h, _)| {
                Desc::new(n.to_string(), h.to_string(), vec![], HashMap::new()).expect("valid")
            })
            .collect();
        QueryCollector {
            zone_names,
            workers,
            cache,
            descs,
        }
    }
}

/// Sums a counter array over workers that share a server label.
fn sum_into(acc: &mut [u64], src: &[AtomicU64]) {
    for (a, s) in acc.iter_mut().zip(src) {
        *a += s.load(Ordering::Relaxed);
    }
}

impl Collector for QueryCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let workers = self.workers.lock().clone();
        let mut fams: Vec<MetricFamily> = FAMILIES
            .iter()
            .map(|(n, h, t)| {
                let mut f = MetricFamily::default();
                f.set_name(n.to_string());
                f.set_help(h.to_string());
                f.set_field_type(*t);
                f
            })
            .collect();
        // Group workers by server label.
        let mut servers: Vec<String> = workers.iter().map(|w| w.server.clone()).collect();
        servers.sort();
        servers.dedup();
        let zones = self.zone_names.len().max(1);
        let zone_name = |z: usize| self.zone_names.get(z).map_or(".", |s| s.as_str());
        for server in &servers {
            let ws: Vec<&Arc<WorkerStats>> =
                workers.iter().filter(|w| &w.server == server).collect();
            let mut req = vec![0u64; zones * 2 * 2 * NTYPES];
            let mut resp = vec![0u64; zones * 16 * 2];
            let mut dur = vec![0u64; zones * NTYPES * ND];
            let mut dur_sum = vec![0u64; zones * NTYPES];
            let mut rqs = vec![0u64; zones * 2 * NS];
            let mut rqs_sum = vec![0u64; zones * 2];
            let mut rss = vec![0u64; zones * 2 * NS];
            let mut rss_sum = vec![0u64; zones * 2];
            let mut hits = [0u64; 2];
            let mut misses = 0;
            let mut malformed = 0;
            for c in ws.iter().flat_map(|w| [&w.owned, &w.shared]) {
                sum_into(&mut req, &c.requests);
                sum_into(&mut resp, &c.responses);
                sum_into(&mut dur, &c.duration);
                sum_into(&mut dur_sum, &c.duration_sum_ns);
                sum_into(&mut rqs, &c.req_size);
                sum_into(&mut rqs_sum, &c.req_size_sum);
                sum_into(&mut rss, &c.resp_size);
                sum_into(&mut rss_sum, &c.resp_size_sum);
                sum_into(&mut hits, &c.hits);
                misses += c.misses.load(Ordering::Relaxed);
                malformed += c.malformed.load(Ordering::Relaxed);
            }
            let s = server.as_str();
            for z in 0..zones {
                let zn = zone_name(z);
                for p in 0..2 {
                    let proto = if p == 0 { "udp" } else { "tcp" };
                    for fam in 0..2 {
                        let family = if fam == 0 { "1" } else { "2" };
                        for (t, (_, tn)) in TYPES.iter().enumerate() {
                            let v = req[((z * 2 + p) * 2 + fam) * NTYPES + t];
                            if v > 0 {
                                fams[0].mut_metric().push(counter(
                                    &[
                                        ("server", s),
                                        ("zone", zn),
                                        ("proto", proto),
                                        ("family", family),
                                        ("type", tn),
                                    ],
                                    v as f64,
                                ));
                            }
                        }
                    }
                    let zp = z * 2 + p;
                    if rqs[zp * NS..(zp + 1) * NS].iter().any(|&c| c > 0) {
                        fams[3].mut_metric().push(histogram(
                            &[("server", s), ("zone", zn), ("proto", proto)],
                            &SIZE_BUCKETS,
                            &rqs[zp * NS..(zp + 1) * NS],
                            rqs_sum[zp] as f64,
                        ));
                        fams[4].mut_metric().push(histogram(
                            &[("server", s), ("zone", zn), ("proto", proto)],
                            &SIZE_BUCKETS,
                            &rss[zp * NS..(zp + 1) * NS],
                            rss_sum[zp] as f64,
                        ));
                    }
                }
                for (rc, name) in RCODES.iter().enumerate() {
                    for (pi, plugin) in ["cache", "forward"].iter().enumerate() {
                        let v = resp[(z * 16 + rc) * 2 + pi];
                        if v > 0 {
                            fams[1].mut_metric().push(counter(
                                &[
                                    ("server", s),
                                    ("zone", zn),
                                    ("rcode", name),
                                    ("plugin", plugin),
                                ],
                                v as f64,
                            ));
                        }
                    }
                }
                for (t, (_, tn)) in TYPES.iter().enumerate() {
                    let zt = z * NTYPES + t;
                    let counts = &dur[zt * ND..(zt + 1) * ND];
                    if counts.iter().any(|&c| c > 0) {
                        fams[2].mut_metric().push(histogram(
                            &[("server", s), ("zone", zn), ("type", tn)],
                            &DURATION_BUCKETS,
                            counts,
                            dur_sum[zt] as f64 / 1e9,
                        ));
                    }
                }
            }
            fams[5].mut_metric().push(counter(
                &[("server", s), ("type", "success")],
                hits[0] as f64,
            ));
            fams[5].mut_metric().push(counter(
                &[("server", s), ("type", "denial")],
                hits[1] as f64,
            ));
            fams[6]
                .mut_metric()
                .push(counter(&[("server", s)], misses as f64));
            fams[9]
                .mut_metric()
                .push(counter(&[("server", s)], malformed as f64));
        }
        if let Some(cache) = self.cache.lock().clone() {
            let (pos, neg) = cache.entry_counts();
            fams[7].mut_metric().push(gauge(
                &[("server", "dns://:53"), ("type", "success")],
                pos as f64,
            ));
            fams[7].mut_metric().push(gauge(
                &[("server", "dns://:53"), ("type", "denial")],
                neg as f64,
            ));
            let ev = cache.counters.evictions.load(Ordering::Relaxed);
            fams[8].mut_metric().push(counter(
                &[("server", "dns://:53"), ("type", "success")],
                ev as f64,
            ));
            fams[10].mut_metric().push(gauge(&[], cache.bytes() as f64));
            fams[11].mut_metric().push(counter(
                &[],
                cache.counters.inserts.load(Ordering::Relaxed) as f64,
            ));
        }
        fams[12].mut_metric().push(counter(&[], panics() as f64));
        fams.retain(|f| !f.get_metric().is_empty());
        fams
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `example.com. IN A` with RD, no EDNS.
    fn query() -> Query {
        let mut pkt = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        pkt.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
        dns::parse_query(&pkt).expect("valid query")
    }

    fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let fam = m.registry.gather().into_iter().find(|f| f.name() == name)?;
        let mut total = None;
        for metric in fam.get_metric() {
            let has = |(k, v): &(&str, &str)| {
                metric
                    .get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            };
            if labels.iter().all(has) {
                let v = match fam.get_field_type() {
                    MetricType::COUNTER => metric.get_counter().get_value(),
                    MetricType::GAUGE => metric.get_gauge().get_value(),
                    MetricType::HISTOGRAM => metric.get_histogram().get_sample_count() as f64,
                    _ => unreachable!(),
                };
                *total.get_or_insert(0.0) += v;
            }
        }
        total
    }

    #[test]
    fn workers_fold_into_one_series_per_server() {
        let m = Metrics::new(vec![".".into()]);
        let w1 = m.new_udp_worker_for("dns://a".into());
        let w2 = m.new_worker_for("dns://a".into());
        let w3 = m.new_worker_for("dns://b".into());
        let q = query();
        let noerror = [0x12, 0x34, 0x81, 0x80];
        let nxdomain = [0x12, 0x34, 0x81, 0x83];
        let fast = Duration::from_micros(20);
        w1.record(
            0,
            Proto::Udp,
            false,
            &q,
            29,
            &noerror,
            Some(AnswerKind::Positive),
            fast,
        );
        w2.record(
            0,
            Proto::Udp,
            false,
            &q,
            29,
            &noerror,
            None,
            Duration::from_millis(3),
        );
        w2.record(
            0,
            Proto::Tcp,
            true,
            &q,
            29,
            &nxdomain,
            Some(AnswerKind::NxDomain),
            fast,
        );
        w3.malformed(Proto::Udp);
        w1.malformed(Proto::Udp);

        let a = [("server", "dns://a")];
        assert_eq!(value(&m, "coredns_dns_requests_total", &a), Some(3.0));
        let udp4 = [
            ("server", "dns://a"),
            ("proto", "udp"),
            ("family", "1"),
            ("type", "A"),
        ];
        assert_eq!(value(&m, "coredns_dns_requests_total", &udp4), Some(2.0));
        let tcp6 = [("server", "dns://a"), ("proto", "tcp"), ("family", "2")];
        assert_eq!(value(&m, "coredns_dns_requests_total", &tcp6), Some(1.0));
        let nx = [("server", "dns://a"), ("rcode", "NXDOMAIN")];
        assert_eq!(value(&m, "coredns_dns_responses_total", &nx), Some(1.0));
        let hits = |t| {
            value(
                &m,
                "coredns_cache_hits_total",
                &[("server", "dns://a"), ("type", t)],
            )
        };
        assert_eq!((hits("success"), hits("denial")), (Some(1.0), Some(1.0)));
        assert_eq!(value(&m, "coredns_cache_misses_total", &a), Some(1.0));
        assert_eq!(
            value(&m, "coredns_dns_request_duration_seconds", &a),
            Some(3.0)
        );
        let b = [("server", "dns://b")];
        assert_eq!(value(&m, "nodedns_malformed_packets_total", &b), Some(1.0));
        assert_eq!(value(&m, "nodedns_malformed_packets_total", &a), Some(1.0));
        assert_eq!(value(&m, "coredns_dns_requests_total", &b), None);

        // 20 µs lands in the 25 µs bucket, below CoreDNS's smallest (250 µs).
        let fam = m.registry.gather();
        let h = fam
            .iter()
            .find(|f| f.name() == "coredns_dns_request_duration_seconds")
            .unwrap()
            .get_metric()[0]
            .get_histogram()
            .clone();
        let le = |b: f64| {
            h.get_bucket()
                .iter()
                .find(|x| x.upper_bound() == b)
                .unwrap()
                .cumulative_count()
        };
        assert_eq!(
            (le(0.00001), le(0.000025), le(0.004), le(8.192)),
            (0, 2, 3, 3)
        );
    }

    #[test]
    fn setup_errors_build_info_and_panics_exist_from_the_start() {
        let m = Metrics::new(vec![".".into()]);
        for t in SETUP_ERROR_TYPES {
            let l = [("errortype", t)];
            assert_eq!(
                value(&m, "coredns_nodecache_setup_errors_total", &l),
                Some(0.0)
            );
        }
        let v = [("version", env!("CARGO_PKG_VERSION"))];
        assert_eq!(value(&m, "coredns_build_info", &v), Some(1.0));
        assert!(value(&m, "coredns_panics_total", &[]).is_some());
        assert!(m.render().contains("\ncoredns_panics_total "));
    }

    #[test]
    fn panic_hook_counts_panics() {
        install_panic_hook();
        install_panic_hook(); // idempotent: one count per panic
        let m = Metrics::new(vec![".".into()]);
        let before = value(&m, "coredns_panics_total", &[]).unwrap();
        let r = std::panic::catch_unwind(|| panic!("deliberate panic, counted by the test"));
        assert!(r.is_err());
        // Other tests in this binary may panic concurrently (only when failing): at least one.
        assert!(value(&m, "coredns_panics_total", &[]).unwrap() >= before + 1.0);
    }
}
