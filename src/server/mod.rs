//! Serving clients: the shared query handler (`Context`), the UDP workers and the TCP server.
//!
//! A query is parsed without allocating, then answered from the cache on the thread that received
//! it. Only a miss leaves that path: it is handed to the tokio runtime, where the forwarder
//! resolves it and the answer is sent from there.

pub mod socket;
pub mod tcp;
pub mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::cache::Cache;
use crate::config::Settings;
use crate::dns::{self, Query, Reject};
use crate::forward::Forwarder;
use crate::logging::QueryLog;
use crate::metrics::{Answered, HitTiming, Metrics, Proto, WorkerStats};

/// What the hot path and the miss path share.
pub struct Context {
    pub settings: Arc<Settings>,
    pub cache: Arc<Cache>,
    pub forwarder: Forwarder,
    pub metrics: Arc<Metrics>,
    pub query_log: QueryLog,
}

/// The result of the synchronous part of handling one packet.
// The Query travels by value on the stack: boxing it would allocate on every miss for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Handled {
    /// `out` holds the reply.
    Reply,
    /// `out` holds a reply from the cache, counted in the metrics but for its duration: pass
    /// the timing to `WorkerStats::hit_durations` once the reply is sent.
    Hit(HitTiming),
    /// Nothing to send (unparseable packet).
    Drop,
    /// Not in the cache: resolve `Query` on the runtime.
    Miss(Query),
}

/// A packet [`Context::parse`] did not turn into a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// `out` holds an error reply (FORMERR, NOTIMP, BADVERS...).
    Reply,
    /// Nothing to send (no usable header).
    Drop,
}

impl Context {
    pub fn new(settings: Arc<Settings>, metrics: Arc<Metrics>) -> Arc<Self> {
        let cache = Arc::new(Cache::new(&crate::cache::CacheConfig {
            max_entries: settings.cache_max_entries,
            max_bytes: settings.cache_max_bytes,
            shards: (settings.workers * 16).clamp(16, 1024),
        }));
        metrics.set_cache(cache.clone());
        let forwarder = Forwarder::new(settings.clone(), cache.clone(), metrics.clone());
        let query_log = QueryLog::new(settings.query_log);
        Arc::new(Context {
            settings,
            cache,
            forwarder,
            metrics,
            query_log,
        })
    }

    /// Handles one packet as far as it can without waiting: errors and cache hits are written to
    /// `out`. `start` is when the packet was read (a UDP worker reads one clock per batch): the
    /// entry's age is taken at that instant and the reported duration counts from it.
    #[inline]
    pub fn handle(
        &self,
        pkt: &[u8],
        src: SocketAddr,
        proto: Proto,
        stats: &WorkerStats,
        out: &mut Vec<u8>,
        start: Instant,
    ) -> Handled {
        match self.parse(pkt, src, proto, stats, out) {
            Ok((q, key)) => self.answer(&q, key, pkt, src, proto, stats, out, start),
            Err(Rejected::Reply) => Handled::Reply,
            Err(Rejected::Drop) => Handled::Drop,
        }
    }

    /// The first half of [`handle`](Self::handle): the query and its cache key, or what to do
    /// with a packet that is not a query we serve (any error reply is written to `out`).
    #[inline]
    pub fn parse(
        &self,
        pkt: &[u8],
        src: SocketAddr,
        proto: Proto,
        stats: &WorkerStats,
        out: &mut Vec<u8>,
    ) -> Result<(Query, u64), Rejected> {
        let q = match dns::parse_query(pkt) {
            Ok(q) => q,
            Err(reject) => {
                stats.malformed(proto);
                crate::log_limited!(debug, client = %src, reason = ?reject, "rejected packet");
                return Err(match reject {
                    Reject::Drop => Rejected::Drop,
                    Reject::Rcode(rcode) => {
                        dns::write_error_reply(pkt, rcode as u16, None, None, out);
                        Rejected::Reply
                    }
                    Reject::BadVers => {
                        let size = self.settings.edns_udp_size;
                        dns::write_error_reply(
                            pkt,
                            dns::RCODE_BADVERS,
                            None,
                            Some((size, false)),
                            out,
                        );
                        Rejected::Reply
                    }
                });
            }
        };
        let key = self.cache.key(q.question_lower(), q.key_flags());
        Ok((q, key))
    }

    /// The second half of [`handle`](Self::handle): answers `q` (cache key `key`) from the cache
    /// into `out`, or hands it back as a miss.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub fn answer(
        &self,
        q: &Query,
        key: u64,
        pkt: &[u8],
        src: SocketAddr,
        proto: Proto,
        stats: &WorkerStats,
        out: &mut Vec<u8>,
        start: Instant,
    ) -> Handled {
        let max_len = self.max_len(q, proto);
        let hit = self.cache.lookup(key, q, start, |e, age| {
            e.render(q, pkt, age, max_len, self.settings.edns_udp_size, out);
            (e.zone, e.kind)
        });
        match hit {
            Some((zone, kind)) => {
                let answered = Answered {
                    zone: zone as usize,
                    proto,
                    ipv6: src.is_ipv6(),
                    query: q,
                    req_len: pkt.len(),
                    reply: out,
                };
                let timing = stats.record_hit(&answered, kind);
                if self.query_log.sampled() {
                    self.query_log.log(q, src, out, true, None, start.elapsed());
                }
                Handled::Hit(timing)
            }
            None => Handled::Miss(*q),
        }
    }

    fn max_len(&self, q: &Query, proto: Proto) -> usize {
        match proto {
            Proto::Udp => q.max_udp_reply(self.settings.edns_udp_size),
            Proto::Tcp => u16::MAX as usize,
        }
    }

    /// Resolves a miss and writes the reply for it. Always produces a reply: SERVFAIL when the
    /// upstreams fail, REFUSED when too many queries are already in flight.
    pub async fn resolve(
        &self,
        q: &Query,
        pkt: &[u8],
        src: SocketAddr,
        proto: Proto,
        stats: &WorkerStats,
        start: Instant,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        let max_len = self.max_len(q, proto);
        let edns = q.edns.map(|e| (self.settings.edns_udp_size, e.dnssec_ok));
        let question = &pkt[dns::HEADER_LEN..q.question_end];
        let zone = self.settings.route(q.qname_lower());
        let upstream = match self.forwarder.try_acquire() {
            None => {
                crate::log_limited!(
                    warn,
                    max_inflight = self.settings.max_inflight,
                    "too many forwarded queries in flight, refusing"
                );
                dns::write_error_reply(
                    pkt,
                    dns::RCODE_REFUSED as u16,
                    Some(question),
                    edns,
                    &mut out,
                );
                None
            }
            // The slot is held until the upstream answers.
            Some(_slot) => match self.forwarder.resolve_via(q).await {
                Ok((entry, upstream)) => {
                    entry.render(q, pkt, 0, max_len, self.settings.edns_udp_size, &mut out);
                    Some(upstream)
                }
                Err(e) => {
                    crate::log_limited!(warn, error = %e, qname = %q.qname_string(), "answering SERVFAIL");
                    dns::write_error_reply(
                        pkt,
                        dns::RCODE_SERVFAIL as u16,
                        Some(question),
                        edns,
                        &mut out,
                    );
                    None
                }
            },
        };
        let elapsed = start.elapsed();
        let answered = Answered {
            zone,
            proto,
            ipv6: src.is_ipv6(),
            query: q,
            req_len: pkt.len(),
            reply: &out,
        };
        stats.record(&answered, None, elapsed);
        if self.query_log.sampled() {
            self.query_log.log(q, src, &out, false, upstream, elapsed);
        }
        out
    }
}
