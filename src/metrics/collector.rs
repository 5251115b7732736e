//! The scrape-time collector: folds the counters of every `WorkerStats`, and the cache's own
//! counters, into the CoreDNS-named metric families.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

use super::worker::WorkerStats;
use super::{panics, DURATION_BUCKETS, ND, NS, NTYPES, RCODES, SIZE_BUCKETS, TYPES};
use crate::cache::Cache;

/// Folds every worker's counters into CoreDNS-named families at scrape time.
pub(super) struct QueryCollector {
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
    pub(super) fn new(
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
