//! The scrape-time collector: folds the counters of every `WorkerStats`, and the cache's own
//! counters, into the CoreDNS-named metric families.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

use super::worker::{Counters, WorkerStats, DURATION, REQUESTS, RESPONSES, SIZE};
use super::{panics, DURATION_BUCKETS, RCODES, SIZE_BUCKETS, TYPES};
use crate::cache::Cache;

/// What the collector reads at scrape time, shared with [`Metrics`](super::Metrics), which adds
/// the workers' counters as listeners start and the cache once it exists.
pub(super) struct Sources {
    /// Labels of the `zone` dimension by slot (`Zone::slot`). Append-only: a zone a reload
    /// removes keeps its slot and its counts, a zone it adds takes the next free slot.
    pub(super) zone_names: parking_lot::RwLock<Vec<String>>,
    /// Zone slots every worker's counter blocks have room for.
    pub(super) zone_capacity: usize,
    pub(super) workers: Mutex<Vec<Arc<WorkerStats>>>,
    /// Set once, when the cache is made (`Context::new`); until then no cache series.
    pub(super) cache: OnceLock<Arc<Cache>>,
}

/// Folds every worker's counters into CoreDNS-named families at scrape time.
pub(super) struct QueryCollector {
    sources: Arc<Sources>,
    descs: Vec<Desc>,
}

/// The families this collector exports, named where a scrape fills them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Requests,
    Responses,
    Duration,
    RequestSize,
    ResponseSize,
    CacheHits,
    CacheMisses,
    CacheRequests,
    CacheEntries,
    CacheEvictions,
    Malformed,
    CacheBytes,
    CacheInserts,
    Panics,
    TcpPressureCloses,
    UnmatchedReplies,
}

/// Name, help text and type of every [`Family`], in the order of its variants.
#[rustfmt::skip]
const FAMILIES: [(Family, &str, &str, MetricType); 16] = [
    (Family::Requests, "coredns_dns_requests_total", "Counter of DNS requests made per zone, protocol and family.", MetricType::COUNTER),
    (Family::Responses, "coredns_dns_responses_total", "Counter of response status codes.", MetricType::COUNTER),
    (Family::Duration, "coredns_dns_request_duration_seconds", "Histogram of the time (in seconds) each request took per zone.", MetricType::HISTOGRAM),
    (Family::RequestSize, "coredns_dns_request_size_bytes", "Size of the EDNS0 UDP buffer in bytes (64K for TCP) per zone and protocol.", MetricType::HISTOGRAM),
    (Family::ResponseSize, "coredns_dns_response_size_bytes", "Size of the returned response in bytes.", MetricType::HISTOGRAM),
    (Family::CacheHits, "coredns_cache_hits_total", "The count of cache hits.", MetricType::COUNTER),
    (Family::CacheMisses, "coredns_cache_misses_total", "The count of cache misses. Deprecated, derive misses from cache hits/requests counters.", MetricType::COUNTER),
    (Family::CacheRequests, "coredns_cache_requests_total", "The count of cache requests.", MetricType::COUNTER),
    (Family::CacheEntries, "coredns_cache_entries", "The number of elements in the cache.", MetricType::GAUGE),
    (Family::CacheEvictions, "coredns_cache_evictions_total", "The count of cache evictions.", MetricType::COUNTER),
    (Family::Malformed, "nodedns_malformed_packets_total", "Packets that could not be parsed as a DNS query (answered FORMERR/NOTIMP when the header was readable, else dropped).", MetricType::COUNTER),
    (Family::CacheBytes, "nodedns_cache_bytes", "Bytes held by cache entries.", MetricType::GAUGE),
    (Family::CacheInserts, "nodedns_cache_inserts_total", "Answers stored in the cache.", MetricType::COUNTER),
    (Family::Panics, "coredns_panics_total", "A metrics that counts the number of panics.", MetricType::COUNTER),
    (Family::TcpPressureCloses, "nodedns_tcp_pressure_closes_total", "TCP client connections closed, the longest idle first, to admit a new one at the connection cap.", MetricType::COUNTER),
    (Family::UnmatchedReplies, "nodedns_upstream_unmatched_replies_total", "Datagrams read on pooled upstream UDP sockets that matched no outstanding query (ID or question) and were dropped.", MetricType::COUNTER),
];

// `FAMILIES[f as usize]` describes `f`.
const _: () = {
    let mut i = 0;
    while i < FAMILIES.len() {
        assert!(FAMILIES[i].0 as usize == i);
        i += 1;
    }
};

/// The families of one scrape, filled by [`Family`].
struct Families(Vec<MetricFamily>);

impl Families {
    fn new() -> Self {
        Families(
            FAMILIES
                .iter()
                .map(|(_, n, h, t)| {
                    let mut f = MetricFamily::default();
                    f.set_name(n.to_string());
                    f.set_help(h.to_string());
                    f.set_field_type(*t);
                    f
                })
                .collect(),
        )
    }

    fn push(&mut self, family: Family, m: proto::Metric) {
        self.0[family as usize].mut_metric().push(m);
    }

    /// The families that got a series.
    fn into_filled(mut self) -> Vec<MetricFamily> {
        self.0.retain(|f| !f.get_metric().is_empty());
        self.0
    }
}

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
    pub(super) fn new(sources: Arc<Sources>) -> Self {
        let descs = FAMILIES
            .iter()
            .map(|(_, n, h, _)| {
                Desc::new(n.to_string(), h.to_string(), vec![], HashMap::new()).expect("valid")
            })
            .collect();
        QueryCollector { sources, descs }
    }
}

impl Collector for QueryCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let workers = self.sources.workers.lock().clone();
        let mut fams = Families::new();
        // Group workers by server label.
        let mut servers: Vec<String> = workers.iter().map(|w| w.server.clone()).collect();
        servers.sort();
        servers.dedup();
        let zone_names = self.sources.zone_names.read().clone();
        let zones = zone_names.len().clamp(1, self.sources.zone_capacity);
        let zone_name = |z: usize| zone_names.get(z).map_or(".", |s| s.as_str());
        for server in &servers {
            let mut sum = Counters::<u64>::new(self.sources.zone_capacity);
            for w in workers.iter().filter(|w| &w.server == server) {
                sum.add(&w.owned);
                sum.add(&w.shared);
            }
            let s = server.as_str();
            for z in 0..zones {
                let zn = zone_name(z);
                for p in 0..2 {
                    let proto = if p == 0 { "udp" } else { "tcp" };
                    for fam in 0..2 {
                        let family = if fam == 0 { "1" } else { "2" };
                        for (t, (_, tn)) in TYPES.iter().enumerate() {
                            let v = sum.requests[REQUESTS.at(z, [p, fam, t])];
                            if v > 0 {
                                fams.push(
                                    Family::Requests,
                                    counter(
                                        &[
                                            ("server", s),
                                            ("zone", zn),
                                            ("proto", proto),
                                            ("family", family),
                                            ("type", tn),
                                        ],
                                        v as f64,
                                    ),
                                );
                            }
                        }
                    }
                    let zp = SIZE.series.at(z, [p]);
                    let row = SIZE.row(zp);
                    if sum.req_size[row.clone()].iter().any(|&c| c > 0) {
                        let series = [("server", s), ("zone", zn), ("proto", proto)];
                        fams.push(
                            Family::RequestSize,
                            histogram(
                                &series,
                                &SIZE_BUCKETS,
                                &sum.req_size[row.clone()],
                                sum.req_size_sum[zp] as f64,
                            ),
                        );
                        fams.push(
                            Family::ResponseSize,
                            histogram(
                                &series,
                                &SIZE_BUCKETS,
                                &sum.resp_size[row],
                                sum.resp_size_sum[zp] as f64,
                            ),
                        );
                    }
                }
                for (rc, name) in RCODES.iter().enumerate() {
                    for (pi, plugin) in ["cache", "forward"].iter().enumerate() {
                        let v = sum.responses[RESPONSES.at(z, [rc, pi])];
                        if v > 0 {
                            fams.push(
                                Family::Responses,
                                counter(
                                    &[
                                        ("server", s),
                                        ("zone", zn),
                                        ("rcode", name),
                                        ("plugin", plugin),
                                    ],
                                    v as f64,
                                ),
                            );
                        }
                    }
                }
                for (t, (_, tn)) in TYPES.iter().enumerate() {
                    let zt = DURATION.series.at(z, [t]);
                    let counts = &sum.duration[DURATION.row(zt)];
                    if counts.iter().any(|&c| c > 0) {
                        fams.push(
                            Family::Duration,
                            histogram(
                                &[("server", s), ("zone", zn), ("type", tn)],
                                &DURATION_BUCKETS,
                                counts,
                                sum.duration_sum_ns[zt] as f64 / 1e9,
                            ),
                        );
                    }
                }
            }
            let hits = [("success", sum.hits[0]), ("denial", sum.hits[1])];
            for (kind, v) in hits {
                fams.push(
                    Family::CacheHits,
                    counter(&[("server", s), ("type", kind)], v as f64),
                );
            }
            fams.push(
                Family::CacheMisses,
                counter(&[("server", s)], sum.misses as f64),
            );
            // Every query that went through the cache: a hit or a miss.
            fams.push(
                Family::CacheRequests,
                counter(
                    &[("server", s)],
                    (sum.hits[0] + sum.hits[1] + sum.misses) as f64,
                ),
            );
            fams.push(
                Family::Malformed,
                counter(&[("server", s)], sum.malformed as f64),
            );
        }
        if let Some(cache) = self.sources.cache.get() {
            let server = ("server", "dns://:53");
            let (pos, neg) = cache.entry_counts();
            for (kind, v) in [("success", pos), ("denial", neg)] {
                fams.push(
                    Family::CacheEntries,
                    gauge(&[server, ("type", kind)], v as f64),
                );
            }
            let ev = cache.counters.evictions.load(Ordering::Relaxed);
            fams.push(
                Family::CacheEvictions,
                counter(&[server, ("type", "success")], ev as f64),
            );
            fams.push(Family::CacheBytes, gauge(&[], cache.bytes() as f64));
            let inserts = cache.counters.inserts.load(Ordering::Relaxed);
            fams.push(Family::CacheInserts, counter(&[], inserts as f64));
        }
        fams.push(Family::Panics, counter(&[], panics() as f64));
        fams.push(
            Family::TcpPressureCloses,
            counter(
                &[],
                super::resilience::TCP_PRESSURE_CLOSES.load(Ordering::Relaxed) as f64,
            ),
        );
        fams.push(
            Family::UnmatchedReplies,
            counter(
                &[],
                super::resilience::UDP_UNMATCHED_REPLIES.load(Ordering::Relaxed) as f64,
            ),
        );
        fams.into_filled()
    }
}
