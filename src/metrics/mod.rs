//! Prometheus metrics under the names CoreDNS exports, so existing dashboards and alerts work.
//!
//! The per-query counters live in `WorkerStats` (`worker.rs`): blocks of plain atomics per UDP
//! worker and per TCP listener (no lock, no allocation, no label lookup per query), folded into
//! metric families when Prometheus scrapes (`collector.rs`). A UDP worker counts its cache hits
//! with plain loads and stores on a block only its thread writes; queries answered elsewhere use
//! relaxed `fetch_add` (benches/metrics_cost.rs measures both). Miss-path metrics (forwarding,
//! here) use ordinary labelled prometheus vectors: a miss already costs an upstream round trip.
//! `panic.rs` counts panics for `coredns_panics_total`.
//!
//! This module holds the registry ([`Metrics`]), the label and bucket tables every family shares,
//! and the upstream families ([`UpstreamMetrics`]).

mod collector;
mod panic;
pub mod resilience;
mod worker;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::cache::Cache;
use collector::{QueryCollector, Sources};

/// Zones a reload may add beyond those of the configuration at start (each costs every worker a
/// few kilobytes of counters).
const ZONE_HEADROOM: usize = 16;
pub use panic::{install_panic_hook, panics};
pub use worker::{Answered, HitTiming, WorkerStats};

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
    /// What the query collector reads at scrape time.
    sources: Arc<Sources>,
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
    /// Reloads refused (the configuration read was invalid); CoreDNS's name.
    pub reload_failed: IntCounter,
    /// The configuration generation in force: 0 at start, one more at each reload.
    pub config_generation: IntGauge,
}

impl Metrics {
    /// `zone_names` in the order of `Settings::zones` (labels of the `zone` dimension, the
    /// zones' first slots); room is left for zones a reload adds (`assign_zone_slots`).
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
            "Counter of the number of failed healthchecks.",
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
        let reload_failed = reg(
            &registry,
            IntCounter::new(
                "coredns_reload_failed_total",
                "Counter of the number of failed reload attempts.",
            )
            .expect("valid metric"),
        );
        let config_generation = reg(
            &registry,
            IntGauge::new(
                "nodedns_config_generation",
                "Configuration generation in force: 0 at start, one more at each reload.",
            )
            .expect("valid metric"),
        );
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
        let zone_capacity = zone_names.len().max(1) + ZONE_HEADROOM;
        let sources = Arc::new(Sources {
            zone_names: parking_lot::RwLock::new(zone_names),
            zone_capacity,
            workers: Mutex::new(Vec::new()),
            cache: OnceLock::new(),
        });
        registry
            .register(Box::new(QueryCollector::new(sources.clone())))
            .expect("unique");
        Arc::new(Metrics {
            registry,
            sources,
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
            reload_failed,
            config_generation,
        })
    }

    /// A new block of query counters for a listener serving `server` whose queries may be
    /// answered on any thread (TCP).
    pub fn new_worker_for(&self, server: String) -> Arc<WorkerStats> {
        self.add_worker(WorkerStats::new(server, self.sources.zone_capacity, false))
    }

    /// A new block of query counters for one UDP worker serving `server`: its cache hits and
    /// malformed packets must be counted on the worker's own thread only (as `Context::handle`
    /// does when the worker calls it), which lets them skip atomic read-modify-writes.
    pub fn new_udp_worker_for(&self, server: String) -> Arc<WorkerStats> {
        self.add_worker(WorkerStats::new(server, self.sources.zone_capacity, true))
    }

    /// Gives each zone of `zones` its slot: the one it had (same name), or the next free one.
    /// Fails, changing nothing, when the zones new since start exceed the room left for them.
    pub fn assign_zone_slots(&self, zones: &mut crate::zones::ZoneTable) -> Result<(), String> {
        let mut names = self.sources.zone_names.write();
        let new: Vec<&str> = zones
            .iter()
            .filter(|z| !names.contains(&z.name))
            .map(|z| z.name.as_str())
            .collect();
        if names.len() + new.len() > self.sources.zone_capacity {
            return Err(format!(
                "{} zones ({}) would be new since start, room is left for {} more; restart to \
                 add them",
                new.len(),
                new.join(", "),
                self.sources.zone_capacity - names.len()
            ));
        }
        for z in zones.iter_mut() {
            z.slot = match names.iter().position(|n| *n == z.name) {
                Some(i) => i as u16,
                None => {
                    names.push(z.name.clone());
                    (names.len() - 1) as u16
                }
            };
        }
        Ok(())
    }

    /// Zone slots known: the zones of the configuration at start and any a reload added.
    pub fn zone_slots(&self) -> usize {
        self.sources.zone_names.read().len()
    }

    fn add_worker(&self, w: WorkerStats) -> Arc<WorkerStats> {
        let w = Arc::new(w);
        self.sources.workers.lock().push(w.clone());
        w
    }

    /// Hands the cache to the collector (its entries, bytes, evictions and inserts). The process
    /// has one cache, set once by `Context::new`; a later call is ignored.
    pub fn set_cache(&self, cache: Arc<Cache>) {
        let _ = self.sources.cache.set(cache);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus::proto::MetricType;

    use super::*;
    use crate::dns::{self, AnswerKind, Query};

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
        let answered = |proto, ipv6, reply| Answered {
            zone: 0,
            proto,
            ipv6,
            query: &q,
            req_len: 29,
            reply,
        };
        w1.record(
            &answered(Proto::Udp, false, &noerror),
            Some(AnswerKind::Positive),
            fast,
        );
        w2.record(
            &answered(Proto::Udp, false, &noerror),
            None,
            Duration::from_millis(3),
        );
        w2.record(
            &answered(Proto::Tcp, true, &nxdomain),
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
        // Requests through the cache: the two hits and the miss.
        assert_eq!(value(&m, "coredns_cache_requests_total", &a), Some(3.0));
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
