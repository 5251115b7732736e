//! Serving clients: the shared query handler (`Context`), the UDP workers and the TCP server.
//!
//! A query is parsed without allocating, then answered from the cache on the thread that received
//! it. Only a miss leaves that path, and stays on that thread: a UDP worker sends the common miss
//! upstream itself and keeps it in its table (`inflight`; see `forward::direct`) until the reply
//! comes; any other miss becomes a task on the thread's runtime ([`Context::resolve`]).
//!
//! [`run`] serves sockets the caller bound until a token is cancelled; [`Server`] is the same in
//! steps (start, stop), as `app::run` uses it between node setup and teardown.

pub mod contain;
mod inflight;
mod run;
pub mod socket;
pub mod tcp;
pub mod tcp_table;
pub mod udp;
mod udp_batch;

pub use run::{run, Server};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::cache::Cache;
use crate::clock::Clock;
use crate::config::Settings;
use crate::dns::{self, Query, Reject};
use crate::forward::direct::{Attempt, Next, Resume};
use crate::forward::{FlightOutcome, Forwarder, Route};
use crate::logging::QueryLog;
use crate::metrics::{Answered, HitTiming, Metrics, Proto, WorkerStats};

/// What the hot path and the miss path share.
pub struct Context {
    pub settings: Arc<Settings>,
    pub cache: Arc<Cache>,
    pub forwarder: Forwarder,
    pub metrics: Arc<Metrics>,
    /// The time entries are stored, aged and expired by (see `crate::clock`): the real clock in
    /// production, a manual one in tests.
    pub clock: Clock,
    /// The shared runtime, for work that outlives the query that started it (a refresh behind a
    /// stale answer, a prefetch); None outside a runtime (benchmarks).
    rt: Option<tokio::runtime::Handle>,
    /// This context, for such work to hold on to.
    me: std::sync::Weak<Context>,
    /// A hit is in its entry's prefetch window when `age_ms * 100 >= ttl * prefetch_from_ms`:
    /// `1000 * (100 - prefetch_percentage)`, or a value no hit reaches when prefetch is off. A
    /// reload may change it (a relaxed load costs what a plain one does).
    prefetch_from_ms: AtomicU64,
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
    /// Not in the cache: resolve it on the runtime.
    Miss(Miss),
}

/// A query the cache could not answer, routed once: its zone and cache key travel with it.
#[derive(Clone, Copy)]
pub struct Miss {
    pub q: Query,
    pub key: u64,
    /// The zone it routes to, in the routes in force when it left the hit path.
    pub zone: Route,
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
    /// The cache, the forwarder and what the hot path needs, for `settings`, counting into
    /// `metrics`, with `clock` as the time of the cache and its policies. Call it inside the
    /// runtime that is to run refreshes and prefetches.
    pub fn new(settings: Arc<Settings>, metrics: Arc<Metrics>, clock: Clock) -> Arc<Self> {
        let cache = Arc::new(Cache::new(&crate::cache::CacheConfig {
            max_entries: settings.cache.max_entries,
            max_bytes: settings.cache.max_bytes,
            shards: (settings.workers * 16).clamp(16, 1024),
        }));
        metrics.set_cache(cache.clone());
        let forwarder = Forwarder::new(
            settings.clone(),
            cache.clone(),
            metrics.clone(),
            clock.clone(),
        );
        let prefetch_from_ms = AtomicU64::new(prefetch_from_ms(&settings));
        let query_log = QueryLog::new(settings.query_log);
        Arc::new_cyclic(|me| Context {
            settings,
            cache,
            forwarder,
            metrics,
            clock,
            rt: tokio::runtime::Handle::try_current().ok(),
            me: me.clone(),
            prefetch_from_ms,
            query_log,
        })
    }

    /// Puts what a reload may change in force: the routes (zones, upstreams, forwarding and
    /// caching policy), the prefetch window and the query log's sampling. Everything else of
    /// `settings` (listeners, workers, sizes) stays as it was at start.
    pub fn reconfigure(&self, settings: Arc<Settings>) -> u64 {
        self.prefetch_from_ms
            .store(prefetch_from_ms(&settings), Ordering::Relaxed);
        self.query_log.set_rate(settings.query_log);
        self.forwarder.reconfigure(settings)
    }

    /// Handles one packet as far as it can without waiting: errors and cache hits are written to
    /// `out`. `start` is when the packet was read, on [`Context::clock`] (a UDP worker reads one
    /// clock per batch): the entry's age is taken at that instant.
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
                // An error reply carries the question whenever it could be read.
                let question = dns::question_end(pkt).map(|end| &pkt[dns::HEADER_LEN..end]);
                return Err(match reject {
                    Reject::Drop => Rejected::Drop,
                    Reject::Rcode(rcode) => {
                        dns::write_error_reply(pkt, rcode as u16, question, None, out);
                        Rejected::Reply
                    }
                    Reject::BadVers => {
                        let size = self.settings.server.edns_udp_size;
                        dns::write_error_reply(
                            pkt,
                            dns::RCODE_BADVERS,
                            question,
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
        contain::test_trigger(q, contain::Trigger::Hit);
        let max_len = self.max_len(q, proto);
        let hit = self.cache.lookup(key, q, start, |e, age| {
            e.render(
                q,
                pkt,
                age,
                max_len,
                self.settings.server.edns_udp_size,
                out,
            );
            (e.zone, e.kind, e.ttl, e.stored_ms, e.age_ms)
        });
        match hit {
            Some((zone, kind, ttl, stored_ms, age_ms)) => {
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
                    let took = self.clock.elapsed(start);
                    self.query_log.log(q, src, out, true, None, took);
                }
                // In the last `prefetch_percentage` of its TTL: a candidate for a refresh.
                if age_ms * 100 >= ttl as u64 * self.prefetch_from_ms.load(Ordering::Relaxed) {
                    self.prefetch_hit(q, key, stored_ms);
                }
                Handled::Hit(timing)
            }
            None => Handled::Miss(Miss {
                q: *q,
                key,
                zone: self.forwarder.route(q.qname_lower()),
            }),
        }
    }

    /// A hit in its entry's prefetch window. An entry qualifies once it has been used
    /// `cache.prefetch` times in its lifetime, the query that stored it counting as the first
    /// and hits in the window as the rest (so at the default of 2, the first hit in the window
    /// qualifies it). Each worker thread counts window hits in a table of its own (no shared
    /// write) and claims the refresh at most once per entry lifetime, unless one is already in
    /// flight; the refresh runs on the shared runtime.
    #[cold]
    #[inline(never)]
    fn prefetch_hit(&self, q: &Query, key: u64, stored_ms: u64) {
        use std::cell::RefCell;
        const SLOTS: usize = 1024;
        thread_local! {
            /// Per slot: key, store time of the entry's lifetime, window hits (MAX: claimed).
            static SEEN: RefCell<Vec<(u64, u64, u32)>> = RefCell::new(vec![(0, 0, 0); SLOTS]);
        }
        let need = self
            .forwarder
            .routes()
            .settings
            .cache
            .prefetch_hits
            .saturating_sub(1)
            .max(1);
        let claim = SEEN.with(|seen| {
            let mut seen = seen.borrow_mut();
            let slot = &mut seen[(key as usize) % SLOTS];
            if slot.0 != key || slot.1 != stored_ms {
                *slot = (key, stored_ms, 0);
            }
            if slot.2 == u32::MAX {
                return false;
            }
            slot.2 += 1;
            if slot.2 < need {
                return false;
            }
            slot.2 = u32::MAX;
            true
        });
        if !claim || self.forwarder.in_flight(key) {
            return;
        }
        let (Some(rt), Some(ctx)) = (&self.rt, self.me.upgrade()) else {
            return;
        };
        let q = *q;
        let zone = self.forwarder.route(q.qname_lower());
        rt.spawn(async move {
            let Some(_slot) = ctx.forwarder.try_acquire() else {
                return;
            };
            if let (Ok(_), false) = ctx.forwarder.resolve_shared(&q, key, zone).await {
                ctx.forwarder.counters.prefetch.inc();
            }
        });
    }

    fn max_len(&self, q: &Query, proto: Proto) -> usize {
        match proto {
            Proto::Udp => q.max_udp_reply(self.settings.server.edns_udp_size),
            Proto::Tcp => u16::MAX as usize,
        }
    }

    /// Writes the stale answer for `q` if the cache still holds one (RFC 8767); true if it did.
    fn render_stale(
        &self,
        q: &Query,
        key: u64,
        pkt: &[u8],
        max_len: usize,
        out: &mut Vec<u8>,
    ) -> bool {
        let ttl = self
            .forwarder
            .routes()
            .settings
            .cache
            .stale_answer_ttl
            .as_secs()
            .min(u32::MAX as u64) as u32;
        let size = self.settings.server.edns_udp_size;
        let served = self
            .cache
            .lookup_stale(key, q, self.clock.now(), |e, _| {
                e.render_stale(q, pkt, ttl, max_len, size, out)
            })
            .is_some();
        if served {
            self.forwarder.counters.served_stale.inc();
        }
        served
    }

    /// Resolves `q` for a client that a stale answer can stand in for: the refresh runs on the
    /// shared runtime and outlives the wait, so a fresh answer replaces the stale entry whenever
    /// it comes. None: no fresh answer within `forward.client_timeout`.
    async fn resolve_behind_stale(&self, m: &Miss) -> Option<FlightOutcome> {
        let (Some(rt), Some(ctx)) = (&self.rt, self.me.upgrade()) else {
            return Some(self.forwarder.resolve_shared(&m.q, m.key, m.zone).await.0);
        };
        let m = *m;
        let refresh =
            rt.spawn(async move { ctx.forwarder.resolve_shared(&m.q, m.key, m.zone).await.0 });
        let wait = self.forwarder.routes().settings.forward.client_timeout;
        match tokio::time::timeout(wait, refresh).await {
            Ok(Ok(outcome)) => Some(outcome),
            _ => None,
        }
    }

    /// Resolves a miss and writes the reply for it. Always produces a reply: a fresh answer; a
    /// stale one (RFC 8767) when the zone serves stale, the cache still holds the name and the
    /// upstreams fail or stay silent past `forward.client_timeout`; otherwise SERVFAIL when the
    /// upstreams fail, REFUSED when too many queries are already in flight. `start`: when the
    /// query was read, on [`Context::clock`] (its duration is counted from it).
    pub async fn resolve(
        &self,
        m: &Miss,
        pkt: &[u8],
        src: SocketAddr,
        proto: Proto,
        stats: &WorkerStats,
        start: Instant,
    ) -> Vec<u8> {
        let (q, key, zone) = (&m.q, m.key, m.zone);
        contain::test_trigger(q, contain::Trigger::Miss);
        let routes = self.forwarder.routes();
        let zone_idx = routes.zone_index(zone, q);
        let mut out = Vec::with_capacity(512);
        let max_len = self.max_len(q, proto);
        let edns = q
            .edns
            .map(|e| (self.settings.server.edns_udp_size, e.dnssec_ok));
        let question = &pkt[dns::HEADER_LEN..q.question_end];
        let stale_zone = !routes.settings.zones[zone_idx].stale_window.is_zero();
        let has_stale = stale_zone
            && self
                .cache
                .lookup_stale(key, q, self.clock.now(), |_, _| ())
                .is_some();
        let upstream = if has_stale
            && self.forwarder.recently_failed(key, self.clock.now())
            && self.render_stale(q, key, pkt, max_len, &mut out)
        {
            // The last refresh failed moments ago: no new attempt until the recheck time.
            None
        } else {
            match self.forwarder.try_acquire() {
                None => {
                    self.forwarder.counters.max_concurrent_rejects.inc();
                    crate::log_limited!(
                        warn,
                        max_inflight = routes.settings.forward.max_inflight,
                        "too many forwarded queries in flight, refusing"
                    );
                    if !(has_stale && self.render_stale(q, key, pkt, max_len, &mut out)) {
                        dns::write_error_reply(
                            pkt,
                            dns::RCODE_REFUSED as u16,
                            Some(question),
                            edns,
                            &mut out,
                        );
                    }
                    None
                }
                // The slot is held until the upstream answers (or the client's wait ends).
                Some(_slot) => {
                    let outcome = if has_stale {
                        // Boxed: only names with a stale answer take this path; inline, its
                        // state would enlarge every miss's task.
                        Box::pin(self.resolve_behind_stale(m)).await
                    } else {
                        Some(self.forwarder.resolve_shared(q, key, zone).await.0)
                    };
                    self.write_outcome(m, pkt, max_len, has_stale, outcome, &mut out)
                }
            }
        };
        let slot = routes.settings.zones[zone_idx].slot as usize;
        self.record_reply(m, slot, pkt, src, proto, stats, start, &out, upstream);
        out
    }

    /// Writes into `out` the reply to the miss `m` from its resolution's outcome (None: none
    /// within the client's wait): a fresh answer; a stale one when `has_stale` and the
    /// resolution failed or relayed SERVFAIL or REFUSED; otherwise SERVFAIL. Returns the
    /// upstream whose answer it is.
    fn write_outcome(
        &self,
        m: &Miss,
        pkt: &[u8],
        max_len: usize,
        has_stale: bool,
        outcome: Option<FlightOutcome>,
        out: &mut Vec<u8>,
    ) -> Option<SocketAddr> {
        let q = &m.q;
        let fresh = match outcome {
            Some(Ok(answer)) => Some(answer),
            Some(Err(e)) => {
                crate::log_limited!(warn, error = %e, qname = %q.qname_string(), "answering SERVFAIL unless a stale answer stands in");
                None
            }
            None => None,
        };
        // SERVFAIL and REFUSED relayed from the upstreams are failures too.
        let failed = fresh.as_ref().is_none_or(|(entry, _)| {
            matches!(entry.rcode(), dns::RCODE_SERVFAIL | dns::RCODE_REFUSED)
        });
        let size = self.settings.server.edns_udp_size;
        if failed && has_stale && self.render_stale(q, m.key, pkt, max_len, out) {
            None
        } else if let Some((entry, upstream)) = fresh {
            entry.render(q, pkt, 0, max_len, size, out);
            upstream
        } else {
            let question = &pkt[dns::HEADER_LEN..q.question_end];
            let edns = q.edns.map(|e| (size, e.dnssec_ok));
            dns::write_error_reply(pkt, dns::RCODE_SERVFAIL as u16, Some(question), edns, out);
            None
        }
    }

    /// Counts the reply `out` to the miss `m` (zone metrics slot `zone_slot`) and logs it when
    /// sampled; `start` is when the query was read, on [`Context::clock`].
    #[allow(clippy::too_many_arguments)]
    fn record_reply(
        &self,
        m: &Miss,
        zone_slot: usize,
        pkt: &[u8],
        src: SocketAddr,
        proto: Proto,
        stats: &WorkerStats,
        start: Instant,
        out: &[u8],
        upstream: Option<SocketAddr>,
    ) {
        let elapsed = self.clock.elapsed(start);
        let answered = Answered {
            zone: zone_slot,
            proto,
            ipv6: src.is_ipv6(),
            query: &m.q,
            req_len: pkt.len(),
            reply: out,
        };
        stats.record(&answered, None, elapsed);
        if self.query_log.sampled() {
            self.query_log.log(&m.q, src, out, false, upstream, elapsed);
        }
    }

    /// Starts the UDP miss `m` without a task (`forward::direct`), its reply to come back under
    /// `token`; None when it takes the task path ([`resolve`](Self::resolve)).
    pub fn begin_direct(&self, m: &Miss, token: u64) -> Option<Attempt> {
        contain::test_trigger(&m.q, contain::Trigger::Miss);
        self.forwarder.begin(&m.q, m.key, m.zone, token)
    }

    /// Ends the direct miss of client `w` with its first exchange's `answer`: the reply written to `out`
    /// and counted (true), or what is left to try, for [`resume_direct`](Self::resume_direct)
    /// on a task.
    pub fn finish_direct(
        &self,
        w: &inflight::Waiting,
        attempt: Attempt,
        answer: crate::forward::UpstreamAnswer,
        stats: &WorkerStats,
        out: &mut Vec<u8>,
    ) -> Option<Resume> {
        let zone_slot = attempt.zone_slot();
        match self
            .forwarder
            .finish(&w.miss.q, w.miss.key, attempt, answer)
        {
            Next::Done(outcome) => {
                out.clear();
                self.reply_direct(w, zone_slot, outcome, stats, out);
                None
            }
            Next::Resume(r) => Some(r),
        }
    }

    /// Resolves what is left of a direct miss on a task and returns the reply.
    pub async fn resume_direct(
        &self,
        w: &inflight::Waiting,
        res: Resume,
        stats: &WorkerStats,
    ) -> Vec<u8> {
        let zone_slot = res.zone_slot();
        let outcome = self.forwarder.resume(&w.miss.q, w.miss.key, res).await;
        let mut out = Vec::with_capacity(512);
        self.reply_direct(w, zone_slot, outcome, stats, &mut out);
        out
    }

    /// Writes the reply to the direct miss of client `w` from its flight's `outcome` into `out`
    /// and counts it (no stale answer stands in: a name with one takes the task path).
    fn reply_direct(
        &self,
        w: &inflight::Waiting,
        zone_slot: usize,
        outcome: FlightOutcome,
        stats: &WorkerStats,
        out: &mut Vec<u8>,
    ) {
        let max_len = self.max_len(&w.miss.q, Proto::Udp);
        let upstream = self.write_outcome(&w.miss, &w.pkt, max_len, false, Some(outcome), out);
        self.record_reply(
            &w.miss,
            zone_slot,
            &w.pkt,
            w.src,
            Proto::Udp,
            stats,
            w.start,
            out,
            upstream,
        );
    }
}

/// The prefetch window's factor (see `Context::prefetch_from_ms`): with prefetch off, one no hit
/// reaches (age_ms < ttl * 1000 + 1000).
fn prefetch_from_ms(settings: &Settings) -> u64 {
    match settings.cache.prefetch_hits {
        0 => 1 << 31,
        _ => 1000 * (100 - settings.cache.prefetch_percentage.min(99) as u64),
    }
}
