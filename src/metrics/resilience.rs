//! What the miss path's resilience features did, with CoreDNS's names where CoreDNS has one:
//! stale answers served, prefetches, coalesced misses, health-check verdicts and queries refused
//! for the in-flight bound.

use std::sync::atomic::AtomicU64;

use prometheus::{IntCounter, Opts, Registry};

/// TCP connections closed to make room for a new one at `server.tcp_max_connections`
/// (`nodedns_tcp_pressure_closes_total`); the TCP server's connection table counts them.
pub static TCP_PRESSURE_CLOSES: AtomicU64 = AtomicU64::new(0);

/// Replies on pooled upstream UDP sockets that matched no outstanding query (wrong ID or
/// question, or late) and were dropped (`nodedns_upstream_unmatched_replies_total`); the UDP
/// socket pools count them.
pub static UDP_UNMATCHED_REPLIES: AtomicU64 = AtomicU64::new(0);

pub struct Counters {
    /// `coredns_cache_served_stale_total`: answers served past their TTL (RFC 8767).
    pub served_stale: IntCounter,
    /// `coredns_cache_prefetch_total`: entries refreshed before they expired.
    pub prefetch: IntCounter,
    /// `nodedns_forward_coalesced_total`: misses answered by another identical miss's exchange.
    pub coalesced: IntCounter,
    /// `coredns_forward_healthcheck_broken_total`: queries that found every upstream of their
    /// zone down.
    pub broken: IntCounter,
    /// `coredns_forward_max_concurrent_rejects_total`: queries refused at `max_inflight`.
    pub max_concurrent_rejects: IntCounter,
}

impl Counters {
    pub fn register(registry: &Registry) -> Counters {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::with_opts(Opts::new(name, help)).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        Counters {
            served_stale: counter(
                "coredns_cache_served_stale_total",
                "The number of requests served from stale cache entries.",
            ),
            prefetch: counter(
                "coredns_cache_prefetch_total",
                "The number of times the cache has prefetched a cached item.",
            ),
            coalesced: counter(
                "nodedns_forward_coalesced_total",
                "Cache misses answered by an identical miss's upstream exchange instead of their own.",
            ),
            broken: counter(
                "coredns_forward_healthcheck_broken_total",
                "Counter of the number of complete failures of the healthchecks.",
            ),
            max_concurrent_rejects: counter(
                "coredns_forward_max_concurrent_rejects_total",
                "Counter of the number of queries rejected because the concurrent queries were at maximum.",
            ),
        }
    }
}
