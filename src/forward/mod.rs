//! The miss path: route a query to its zone's upstreams, exchange it over the zone's transport,
//! decide what of the answer may be cached (RFC 2308), and store it.
//!
//! Upstreams of a zone are tried in turn within one overall deadline (`forward.query_timeout`),
//! each attempt bounded by `forward.timeout`: a silent, failing or SERVFAILing upstream is passed
//! over for the next; when all fail the caller answers SERVFAIL well inside a client's timeout
//! (or a stale answer: `server::Context::resolve`).
//!
//! Identical misses in flight share one exchange (`flights`). An upstream that fails
//! `forward.max_fails` times in a row is marked down and probed in the background every
//! `forward.health_check` (`health`); it is used again as soon as it answers.
//!
//! Store times and the stale-recheck timer are read from the forwarder's clock (`crate::clock`),
//! so a test can move them; upstream timeouts and deadlines run on real time.

mod answers;
pub mod direct;
mod flights;
mod fresh;
mod health;
mod readers;
mod recheck;
mod tcp;
#[cfg(test)]
mod test_util;
mod udp;
mod udp_pool;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::debug;

use crate::cache::{Cache, Entry};
use crate::clock::Clock;
use crate::config::{Settings, Transport};
use crate::dns::{self, AnswerKind, Query, Response};
use crate::local::LocalMetrics;
use crate::metrics::{Metrics, Outcome, UpstreamMetrics, UpstreamTransport};
pub use crate::zones::Route;

use arc_swap::ArcSwap;

pub use answers::Answer as UpstreamAnswer;
pub use flights::Outcome as FlightOutcome;
pub use readers::{adopt as adopt_readers, poll_readers};
pub use tcp::TcpPool;
pub use udp_pool::PoolLimits as UdpPoolLimits;

use self::flights::{Flights, Join};
use crate::metrics::resilience::Counters;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("timed out")]
    Timeout,
    #[error("connection closed")]
    Closed,
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad response: {0}")]
    Bad(#[from] dns::BadResponse),
}

/// Every upstream of the zone failed (or the deadline passed) without an answer to relay.
#[derive(Debug, thiserror::Error)]
#[error("all upstreams failed for zone {zone}")]
pub struct AllFailed {
    pub zone: String,
}

/// Per-upstream state: consecutive failures, and whether it is marked down.
pub(crate) struct UpstreamState {
    fails: AtomicU32,
    /// Marked down after `max_fails` consecutive failures; up again once a probe is answered.
    down: AtomicBool,
    /// The transport its zone reaches it by (health probes use the same).
    transport: Transport,
    metrics: Arc<UpstreamMetrics>,
}

/// What one configuration decides about forwarding: the settings, the zones and the state of
/// their upstreams. A reload builds new routes and swaps them in whole; a query under way
/// finishes on the routes it started with. Upstreams old and new routes share keep their state
/// (failures, down) and their pooled TCP connections.
pub struct Routes {
    /// Configuration generation: 0 at start, one more at each reload.
    pub gen: u64,
    pub settings: Arc<Settings>,
    pools: HashMap<SocketAddr, Arc<TcpPool>, ahash::RandomState>,
    /// Looked up several times per miss: hashed with ahash, not SipHash.
    state: HashMap<SocketAddr, Arc<UpstreamState>, ahash::RandomState>,
}

impl Routes {
    fn build(
        gen: u64,
        settings: Arc<Settings>,
        prev: Option<&Routes>,
        metrics: &Arc<Metrics>,
    ) -> Routes {
        let mut pools = HashMap::default();
        let mut state = HashMap::default();
        for z in settings.zones.iter() {
            for &u in &z.upstreams {
                let st = state
                    .entry(u)
                    .or_insert_with(|| match prev.and_then(|p| p.state.get(&u)) {
                        Some(old) if old.transport == z.transport => old.clone(),
                        _ => Arc::new(UpstreamState {
                            fails: AtomicU32::new(0),
                            down: AtomicBool::new(false),
                            transport: z.transport,
                            metrics: Arc::new(metrics.upstream(u)),
                        }),
                    })
                    .clone();
                if z.transport == Transport::Tcp {
                    let same = |p: &Arc<TcpPool>| {
                        p.size() == settings.forward.tcp_pool_size
                            && p.idle() == settings.forward.upstream_tcp_idle
                    };
                    pools.entry(u).or_insert_with(|| {
                        match prev.and_then(|p| p.pools.get(&u)).filter(|p| same(p)) {
                            Some(old) => old.clone(),
                            None => Arc::new(TcpPool::new(
                                u,
                                settings.forward.tcp_pool_size,
                                settings.forward.upstream_tcp_idle,
                                metrics.clone(),
                                st.metrics.clone(),
                            )),
                        }
                    });
                }
            }
        }
        Routes {
            gen,
            settings,
            pools,
            state,
        }
    }

    /// The index in these routes' zone table of the zone `route` names; a query routed under
    /// other routes (just before a reload) is routed again here.
    pub fn zone_index(&self, route: Route, q: &Query) -> usize {
        if route.gen == self.gen {
            route.zone
        } else {
            self.settings.zones.route(q.qname_lower())
        }
    }
}

/// What is left of a zone's exchange: the upstreams still to try, in order, from `now` until
/// `deadline`, and the SERVFAIL or REFUSED answer to relay if none does better.
struct Rest {
    order: Vec<SocketAddr>,
    now: Instant,
    deadline: Instant,
    relay: Option<(Response, SocketAddr)>,
}

/// Resolves cache misses.
pub struct Forwarder {
    routes: ArcSwap<Routes>,
    cache: Arc<Cache>,
    metrics: Arc<Metrics>,
    /// The time answers are stored at and failed refreshes are remembered by (`crate::clock`).
    /// Upstream timeouts run on real time.
    clock: Clock,
    /// Rotates the starting upstream among healthy ones to spread load.
    rotate: AtomicUsize,
    /// Forwarded queries in flight, bounded by `forward.max_inflight`.
    inflight: Arc<Inflight>,
    flights: Arc<Flights>,
    /// Keys whose refresh failed recently (RFC 8767's failure recheck timer).
    stale_failures: recheck::Recheck,
    /// Upstreams just marked down, for the health checker.
    down_tx: tokio::sync::mpsc::UnboundedSender<SocketAddr>,
    down_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<SocketAddr>>>,
    pub counters: Counters,
    /// Template matches and failures, hosts entries.
    pub local_metrics: LocalMetrics,
}

/// The count of forwarded queries in flight, and the gauge that shows it.
struct Inflight {
    n: AtomicUsize,
    metrics: Arc<Metrics>,
}

/// Holds one in-flight slot; released on drop. It owns a handle on the count, so a miss that is
/// not a task (a worker's table entry) can hold it.
pub struct InflightGuard(Arc<Inflight>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.n.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.inflight_dec();
    }
}

impl Forwarder {
    pub fn new(
        settings: Arc<Settings>,
        cache: Arc<Cache>,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        let routes = Routes::build(0, settings, None, &metrics);
        raise_fd_limit_for(&routes);
        let (down_tx, down_rx) = tokio::sync::mpsc::unbounded_channel();
        let counters = Counters::register(&metrics.registry);
        let local_metrics = LocalMetrics::register(&metrics.registry);
        local_metrics.observe(&routes.settings.local);
        let inflight = Arc::new(Inflight {
            n: AtomicUsize::new(0),
            metrics: metrics.clone(),
        });
        Forwarder {
            routes: ArcSwap::from_pointee(routes),
            cache,
            metrics,
            clock,
            rotate: AtomicUsize::new(0),
            inflight,
            flights: Arc::new(Flights::default()),
            stale_failures: recheck::Recheck::default(),
            down_tx,
            down_rx: Mutex::new(Some(down_rx)),
            counters,
            local_metrics,
        }
    }

    /// The routes in force.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.load_full()
    }

    /// Puts routes built from `settings` in force (a reload) and returns their generation.
    /// Queries under way finish on the routes they started with.
    pub fn reconfigure(&self, settings: Arc<Settings>) -> u64 {
        let old = self.routes.load_full();
        let new = Routes::build(old.gen + 1, settings, Some(&old), &self.metrics);
        // Upstreams marked down are probed by the health checker, whatever their routes.
        for (&u, st) in &new.state {
            if st.down.load(Ordering::Relaxed) && !old.state.contains_key(&u) {
                let _ = self.down_tx.send(u);
            }
        }
        self.local_metrics.observe(&new.settings.local);
        raise_fd_limit_for(&new);
        let gen = new.gen;
        self.routes.store(Arc::new(new));
        gen
    }

    /// Routes a lowercased query name under the routes in force.
    pub fn route(&self, qname: &[u8]) -> Route {
        let r = self.routes.load();
        Route {
            zone: r.settings.zones.route(qname),
            gen: r.gen,
        }
    }

    /// Takes an in-flight slot, or None when `forward.max_inflight` queries are already out.
    pub fn try_acquire(&self) -> Option<InflightGuard> {
        let prev = self.inflight.n.fetch_add(1, Ordering::Relaxed);
        if prev >= self.routes.load().settings.forward.max_inflight {
            self.inflight.n.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.metrics.inflight_inc();
        Some(InflightGuard(self.inflight.clone()))
    }

    /// The zone's upstreams in the order to try them: those up first, rotating the first pick
    /// among them; those marked down last (tried only when every other one failed).
    fn ordered(&self, r: &Routes, upstreams: &[SocketAddr]) -> Vec<SocketAddr> {
        let n = upstreams.len();
        let start = self.rotate.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let mut v: Vec<SocketAddr> = (0..n).map(|i| upstreams[(start + i) % n]).collect();
        v.sort_by_key(|u| r.state[u].down.load(Ordering::Relaxed));
        if v.first()
            .is_some_and(|u| r.state[u].down.load(Ordering::Relaxed))
        {
            self.counters.broken.inc();
        }
        v
    }

    /// Counts an exchange's result: `max_fails` failures in a row mark the upstream down (the
    /// health checker then probes it); any answer marks it up.
    fn record(&self, r: &Routes, upstream: SocketAddr, ok: bool) {
        let st = &r.state[&upstream];
        if ok {
            st.fails.store(0, Ordering::Relaxed);
            st.down.store(false, Ordering::Relaxed);
            return;
        }
        let fails = st.fails.fetch_add(1, Ordering::Relaxed) + 1;
        let max = r.settings.forward.max_fails;
        if max > 0 && fails >= max && !st.down.swap(true, Ordering::Relaxed) {
            crate::log_limited!(warn, upstream = %upstream, fails, "upstream marked down; probing it");
            let _ = self.down_tx.send(upstream);
        }
    }

    /// Resolves `q` (cache key `key`) through one exchange shared with every identical miss in
    /// flight. Returns the outcome and whether this caller waited on another's exchange.
    pub async fn resolve_shared(
        &self,
        q: &crate::dns::Query,
        key: u64,
        zone: Route,
    ) -> (FlightOutcome, bool) {
        match self.flights.join(key, q.question_lower(), q.key_flags()) {
            Join::Wait(rx) => {
                if let Some(outcome) = flights::wait(rx).await {
                    self.counters.coalesced.inc();
                    return (outcome, true);
                }
                // The leader went away without an answer: resolve on our own.
                (self.resolve_via(q, zone).await.map_err(Arc::new), false)
            }
            Join::Lead(leader) => {
                let outcome = self.resolve_via(q, zone).await.map_err(Arc::new);
                self.note_refresh(key, outcome.is_ok());
                leader.land(&outcome);
                (outcome, false)
            }
        }
    }

    /// True when an identical miss is being resolved right now.
    pub fn in_flight(&self, key: u64) -> bool {
        self.flights.in_air(key)
    }

    /// Remembers a failed resolution of `key` for `cache.stale_recheck` (stale answers are then
    /// served without asking upstream); forgets it on success.
    fn note_refresh(&self, key: u64, ok: bool) {
        let recheck = self.routes.load().settings.cache.stale_recheck;
        if recheck.is_zero() {
            return;
        }
        if ok {
            self.stale_failures.succeeded(key);
        } else {
            self.stale_failures.failed(key, self.clock.now(), recheck);
        }
    }

    /// True while a failed refresh of `key` is recent enough to serve stale without asking
    /// (`now`: a reading of the forwarder's clock).
    pub fn recently_failed(&self, key: u64, now: Instant) -> bool {
        self.stale_failures.recent(key, now)
    }

    /// Resolves `q` for its zone (`route`, decided by the caller): local answers first (a
    /// rewrite, a template, a hosts entry: `crate::local`), then the zone's upstreams, routed
    /// again by the rewritten name when a rule rewrote it. Caches what may be cached, keyed by
    /// the client's question, and returns the entry to answer from (cached or not) and the
    /// upstream whose answer it is (None: made locally). `Err` means the client gets SERVFAIL
    /// (or a stale answer).
    pub async fn resolve_via(
        &self,
        q: &Query,
        route: Route,
    ) -> Result<(Entry, Option<SocketAddr>), AllFailed> {
        let r = self.routes.load_full();
        let zone_idx = r.zone_index(route, q);
        if r.settings.local.is_empty() {
            let (resp, upstream) = self.exchange_zone(&r, q, zone_idx).await?;
            return Ok((self.store(&r, q, zone_idx, resp), Some(upstream)));
        }
        // Boxed: the plan and the rewritten query would otherwise enlarge every miss's task,
        // with or without local answers configured.
        Box::pin(self.resolve_local(&r, q, zone_idx)).await
    }

    /// [`resolve_via`](Self::resolve_via) with local answers configured.
    async fn resolve_local(
        &self,
        r: &Routes,
        q: &Query,
        zone_idx: usize,
    ) -> Result<(Entry, Option<SocketAddr>), AllFailed> {
        let mut plan = r.settings.local.plan(q, &self.local_metrics);
        let asked = *plan.asked(q);
        // CoreDNS routes after the rewrite: the new name picks the zone.
        let zone_idx = match plan.rewritten {
            Some(_) => r.settings.zones.route(asked.qname_lower()),
            None => zone_idx,
        };
        let failed = || AllFailed {
            zone: r.settings.zones[zone_idx].name.clone(),
        };
        let (resp, upstream) = match plan.reply.take() {
            Some(wire) => (
                dns::parse_response(&wire, asked.question_lower()).map_err(|_| failed())?,
                None,
            ),
            None => {
                let (resp, upstream) = self.exchange_zone(r, &asked, zone_idx).await?;
                (resp, Some(upstream))
            }
        };
        let resp = plan.finish(resp, q).ok_or_else(failed)?;
        Ok((self.store(r, q, zone_idx, resp), upstream))
    }

    /// Exchanges `q` with the upstreams of zone `zone_idx` in turn: the first answer that is
    /// not SERVFAIL or REFUSED, else the last such answer, else `Err`.
    async fn exchange_zone(
        &self,
        r: &Routes,
        q: &Query,
        zone_idx: usize,
    ) -> Result<(Response, SocketAddr), AllFailed> {
        let zone = &r.settings.zones[zone_idx];
        let now = Instant::now();
        let rest = Rest {
            order: self.ordered(r, &zone.upstreams),
            now,
            deadline: now + r.settings.forward.query_timeout,
            relay: None,
        };
        self.exchange_rest(r, q, zone_idx, rest).await
    }

    /// Tries the upstreams of `rest` in turn until its deadline (see
    /// [`exchange_zone`](Self::exchange_zone)).
    async fn exchange_rest(
        &self,
        r: &Routes,
        q: &Query,
        zone_idx: usize,
        rest: Rest,
    ) -> Result<(Response, SocketAddr), AllFailed> {
        let zone = &r.settings.zones[zone_idx];
        let Rest {
            order,
            mut now,
            deadline,
            mut relay,
        } = rest;
        for upstream in order {
            if now >= deadline {
                break;
            }
            let attempt = r.settings.forward.upstream_timeout.min(deadline - now);
            let result = self
                .exchange(r, upstream, zone.transport, q, now, attempt)
                .await;
            // One clock read per attempt: each attempt starts when the previous one ended.
            let done = Instant::now();
            let elapsed = done.saturating_duration_since(now);
            now = done;
            if let Some(resp) = self.judge(r, zone_idx, upstream, result, elapsed, &mut relay) {
                return Ok((resp, upstream));
            }
        }
        relay.ok_or_else(|| AllFailed {
            zone: zone.name.clone(),
        })
    }

    /// Counts the result of one exchange with `upstream` and judges it: Some(answer) to answer
    /// with; None to try the next upstream, with a SERVFAIL or REFUSED answer kept in `relay`
    /// (relayed when no upstream does better).
    fn judge(
        &self,
        r: &Routes,
        zone_idx: usize,
        upstream: SocketAddr,
        result: Result<Response, UpstreamError>,
        elapsed: Duration,
        relay: &mut Option<(Response, SocketAddr)>,
    ) -> Option<Response> {
        match result {
            Ok(resp) => {
                r.state[&upstream]
                    .metrics
                    .response(resp.rcode, elapsed.as_secs_f64());
                // SERVFAIL and REFUSED mean this upstream could not help: try the next,
                // and relay the last such answer if none can.
                if matches!(resp.rcode, dns::RCODE_SERVFAIL | dns::RCODE_REFUSED) {
                    self.record(r, upstream, false);
                    *relay = Some((resp, upstream));
                    return None;
                }
                self.record(r, upstream, true);
                Some(resp)
            }
            Err(e) => {
                self.record(r, upstream, false);
                crate::log_limited!(
                    warn,
                    upstream = %upstream,
                    zone = %r.settings.zones[zone_idx].name,
                    error = %e,
                    "upstream query failed"
                );
                None
            }
        }
    }

    /// Asks every upstream `. IN NS` once; true when any answers (whatever its rcode).
    pub async fn probe(&self) -> bool {
        // ". IN NS" with RD, as CoreDNS's forward health check asks.
        let pkt = [0u8, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1];
        let Ok(q) = dns::parse_query(&pkt) else {
            return false;
        };
        let r = self.routes.load_full();
        let timeout = r.settings.forward.upstream_timeout;
        let mut seen = std::collections::HashSet::new();
        for z in r.settings.zones.iter() {
            for &u in &z.upstreams {
                if seen.insert(u)
                    && self
                        .exchange(&r, u, z.transport, &q, Instant::now(), timeout)
                        .await
                        .is_ok()
                {
                    return true;
                }
            }
        }
        false
    }

    /// One exchange with one upstream over the zone's transport, started at `now`.
    async fn exchange(
        &self,
        r: &Routes,
        upstream: SocketAddr,
        transport: Transport,
        q: &Query,
        now: Instant,
        timeout: Duration,
    ) -> Result<Response, UpstreamError> {
        let size = r.settings.server.edns_udp_size;
        let m = &r.state[&upstream].metrics;
        match transport {
            Transport::Tcp => {
                let pool = &r.pools[&upstream];
                let r = pool.exchange(q, size, timeout).await;
                m.query(UpstreamTransport::Tcp, outcome(&r));
                r
            }
            Transport::Udp | Transport::PreferUdp => {
                m.request();
                let r = udp::exchange(
                    upstream,
                    q,
                    size,
                    now,
                    timeout,
                    &r.settings.forward.udp_pool,
                )
                .await;
                m.query(UpstreamTransport::Udp, outcome(&r));
                let resp = r?;
                if !(resp.truncated && transport == Transport::PreferUdp) {
                    return Ok(resp);
                }
                debug!(upstream = %upstream, "truncated over UDP, retrying over TCP");
                let left = (now + timeout).saturating_duration_since(Instant::now());
                // Boxed: rare, and its state would otherwise enlarge every miss's task.
                let r = Box::pin(tcp::exchange_once(upstream, q, size, left)).await;
                m.query(UpstreamTransport::TcpFallback, outcome(&r));
                r
            }
        }
    }

    /// Applies the caching rules to `resp`, stores it when allowed and returns the entry.
    fn store(&self, r: &Routes, q: &Query, zone_idx: usize, resp: Response) -> Entry {
        let zone = &r.settings.zones[zone_idx];
        let now = self.clock.now();
        let min_ttl = r.settings.cache.min_ttl;
        let secs = |d: Duration| d.as_secs().min(u32::MAX as u64) as u32;
        // Lifetime in seconds when cacheable, with the cap for each record's TTL.
        let lifetime = if resp.truncated {
            None
        } else {
            match resp.kind {
                AnswerKind::Positive => {
                    let cap = secs(zone.success_max_ttl);
                    let floor = secs(min_ttl).min(cap);
                    resp.min_ttl.map(|t| t.clamp(floor, cap))
                }
                AnswerKind::NxDomain | AnswerKind::NoData => {
                    let cap = secs(zone.denial_max_ttl);
                    let floor = secs(min_ttl).min(cap);
                    // RFC 2308 §5: without an SOA a negative answer is not cached.
                    resp.negative_ttl.map(|t| t.clamp(floor, cap))
                }
                AnswerKind::ServFail => {
                    Some(secs(r.settings.cache.servfail_ttl)).filter(|&t| t > 0)
                }
                AnswerKind::Other => None,
            }
        };
        let kind = resp.kind;
        let Response {
            mut wire,
            ttl_offsets,
            soa_ttl_offset,
            ..
        } = resp;
        let ttl = lifetime.filter(|&t| t > 0);
        if let Some(ttl) = ttl {
            // Every record shows the entry's lifetime (the SOA of a negative answer included), so a
            // hit only subtracts the age.
            for &off in &ttl_offsets {
                let off = off as usize;
                let own = dns::u32_at(&wire, off);
                let v = if Some(off as u16) == soa_ttl_offset {
                    ttl
                } else {
                    own.min(ttl).max(ttl.min(secs(min_ttl)))
                };
                wire[off..off + 4].copy_from_slice(&v.to_be_bytes());
            }
        }
        // Not cacheable: served once, as received (lifetime zero).
        // SERVFAIL is never served stale: a stale answer stands in for a failure.
        let stale = if kind == AnswerKind::ServFail {
            Duration::ZERO
        } else {
            zone.stale_window
        };
        let entry = Entry::new(
            wire,
            ttl_offsets,
            q.key_flags(),
            kind,
            zone.slot,
            now,
            Duration::from_secs(ttl.unwrap_or(0) as u64),
        )
        .with_stale_window(stale);
        if ttl.is_some() {
            let key = self.cache.key(q.question_lower(), q.key_flags());
            self.cache.insert(key, entry.clone());
        }
        entry
    }
}

/// Raises the open-files limit for the UDP socket pools the routes may open: worker threads and
/// the shared runtime's threads each keep their own pools.
fn raise_fd_limit_for(r: &Routes) {
    let settings = &r.settings;
    let pool = settings.forward.udp_pool.size as u64;
    if pool > 0 {
        let threads = settings.workers as u64 + settings.workers.clamp(1, 4) as u64;
        let udp = r
            .state
            .values()
            .filter(|s| s.transport != Transport::Tcp)
            .count() as u64;
        udp_pool::raise_fd_limit(threads * udp * pool + 1024);
    }
}

fn outcome<T>(r: &Result<T, UpstreamError>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(UpstreamError::Timeout) => Outcome::Timeout,
        Err(_) => Outcome::Error,
    }
}
