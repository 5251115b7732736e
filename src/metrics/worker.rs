//! The per-query counters of one UDP worker or TCP listener (`WorkerStats`): blocks of plain
//! atomics, counted on the hot path without a lock, an allocation or a label lookup, and folded
//! into metric families at scrape time by the collector.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{type_index, Proto, DURATION_BUCKETS, ND, NS, NTYPES, SIZE_BUCKETS};
use crate::dns::{self, AnswerKind, Query};

/// One block of query counters, indexed by zone, transport, family, type and rcode.
pub(super) struct Counters {
    /// [zone][proto][family][type]
    pub(super) requests: Box<[AtomicU64]>,
    /// [zone][rcode][plugin: cache, forward]
    pub(super) responses: Box<[AtomicU64]>,
    /// [zone][type][bucket] (non-cumulative), plus sums in ns per [zone][type]
    pub(super) duration: Box<[AtomicU64]>,
    pub(super) duration_sum_ns: Box<[AtomicU64]>,
    /// [zone][proto][bucket], plus byte sums per [zone][proto]
    pub(super) req_size: Box<[AtomicU64]>,
    pub(super) req_size_sum: Box<[AtomicU64]>,
    pub(super) resp_size: Box<[AtomicU64]>,
    pub(super) resp_size_sum: Box<[AtomicU64]>,
    /// Cache hits: [success, denial]
    pub(super) hits: [AtomicU64; 2],
    pub(super) misses: AtomicU64,
    pub(super) malformed: AtomicU64,
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
    pub(super) server: String,
    zones: usize,
    /// True for a UDP worker's stats: `Context::handle` runs on one thread only for them.
    sole_writer: bool,
    pub(super) owned: Counters,
    pub(super) shared: Counters,
}

impl WorkerStats {
    pub(super) fn new(server: String, zones: usize, sole_writer: bool) -> Self {
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
    /// For stats from [`Metrics::new_udp_worker_for`](super::Metrics::new_udp_worker_for), hits must be recorded from the worker's
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
