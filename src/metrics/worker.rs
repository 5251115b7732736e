//! The per-query counters of one UDP worker or TCP listener (`WorkerStats`): blocks of plain
//! atomics, counted on the hot path without a lock, an allocation or a label lookup, and folded
//! into metric families at scrape time by the collector.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::{type_index, Proto, DURATION_BUCKETS, NTYPES, SIZE_BUCKETS};
use crate::dns::{self, AnswerKind, Query};

// The layout of a block's counter arrays, defined once: `Counters::new` sizes the arrays from it,
// `Counters::record` counts at its indices and the collector reads at the same ones.

/// The dimensions of a counter array below its zone, outermost first. Every array is indexed by
/// zone, then by these, row-major.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape<const N: usize>([usize; N]);

impl<const N: usize> Shape<N> {
    /// Counters in the array for `zones` zones.
    pub(super) const fn len(&self, zones: usize) -> usize {
        let mut n = zones;
        let mut i = 0;
        while i < N {
            n *= self.0[i];
            i += 1;
        }
        n
    }

    /// Where the counter of zone `z` at `at` (one index per dimension) sits.
    #[inline(always)]
    pub(super) fn at(&self, z: usize, at: [usize; N]) -> usize {
        let mut i = z;
        for (d, a) in self.0.iter().zip(at) {
            i = i * d + a;
        }
        i
    }
}

/// A histogram's two arrays: one sum per series (`series`), and `buckets` consecutive
/// (non-cumulative) bucket counters per series.
#[derive(Clone, Copy, Debug)]
pub(super) struct HistogramShape<const N: usize> {
    pub(super) series: Shape<N>,
    pub(super) buckets: usize,
}

impl<const N: usize> HistogramShape<N> {
    /// Bucket counters in the array for `zones` zones.
    pub(super) const fn buckets_len(&self, zones: usize) -> usize {
        self.series.len(zones) * self.buckets
    }

    /// Where bucket `b` of the series at index `s` (from `series.at`) sits.
    #[inline(always)]
    pub(super) fn bucket(&self, s: usize, b: usize) -> usize {
        s * self.buckets + b
    }

    /// The bucket counters of the series at index `s`.
    pub(super) fn row(&self, s: usize) -> std::ops::Range<usize> {
        self.bucket(s, 0)..self.bucket(s + 1, 0)
    }
}

/// `requests`: [zone][proto][family: IPv4, IPv6][type].
pub(super) const REQUESTS: Shape<3> = Shape([2, 2, NTYPES]);
/// `responses`: [zone][rcode][plugin: cache, forward].
pub(super) const RESPONSES: Shape<2> = Shape([16, 2]);
/// `duration`, `duration_sum_ns`: series per [zone][type].
pub(super) const DURATION: HistogramShape<1> = HistogramShape {
    series: Shape([NTYPES]),
    buckets: DURATION_BUCKETS.len() + 1,
};
/// `req_size`, `req_size_sum`, `resp_size`, `resp_size_sum`: series per [zone][proto].
pub(super) const SIZE: HistogramShape<1> = HistogramShape {
    series: Shape([2]),
    buckets: SIZE_BUCKETS.len() + 1,
};

/// One block of query counters, laid out as above. `C` is `AtomicU64` for a worker's live
/// counters, `u64` for their sums at scrape time.
pub(super) struct Counters<C = AtomicU64> {
    pub(super) requests: Box<[C]>,
    pub(super) responses: Box<[C]>,
    /// Bucket counts, and sums in ns.
    pub(super) duration: Box<[C]>,
    pub(super) duration_sum_ns: Box<[C]>,
    /// Bucket counts, and sums in bytes.
    pub(super) req_size: Box<[C]>,
    pub(super) req_size_sum: Box<[C]>,
    pub(super) resp_size: Box<[C]>,
    pub(super) resp_size_sum: Box<[C]>,
    /// Cache hits: [success, denial]
    pub(super) hits: [C; 2],
    pub(super) misses: C,
    pub(super) malformed: C,
}

impl<C: Default> Counters<C> {
    pub(super) fn new(zones: usize) -> Self {
        let cells = |n: usize| (0..n).map(|_| C::default()).collect();
        Counters {
            requests: cells(REQUESTS.len(zones)),
            responses: cells(RESPONSES.len(zones)),
            duration: cells(DURATION.buckets_len(zones)),
            duration_sum_ns: cells(DURATION.series.len(zones)),
            req_size: cells(SIZE.buckets_len(zones)),
            req_size_sum: cells(SIZE.series.len(zones)),
            resp_size: cells(SIZE.buckets_len(zones)),
            resp_size_sum: cells(SIZE.series.len(zones)),
            hits: Default::default(),
            misses: C::default(),
            malformed: C::default(),
        }
    }
}

impl Counters<u64> {
    /// Adds the current values of `c`, a block of as many zones or of none.
    pub(super) fn add(&mut self, c: &Counters) {
        fn sum_into(acc: &mut [u64], src: &[AtomicU64]) {
            for (a, s) in acc.iter_mut().zip(src) {
                *a += s.load(Ordering::Relaxed);
            }
        }
        sum_into(&mut self.requests, &c.requests);
        sum_into(&mut self.responses, &c.responses);
        sum_into(&mut self.duration, &c.duration);
        sum_into(&mut self.duration_sum_ns, &c.duration_sum_ns);
        sum_into(&mut self.req_size, &c.req_size);
        sum_into(&mut self.req_size_sum, &c.req_size_sum);
        sum_into(&mut self.resp_size, &c.resp_size);
        sum_into(&mut self.resp_size_sum, &c.resp_size_sum);
        sum_into(&mut self.hits, &c.hits);
        self.misses += c.misses.load(Ordering::Relaxed);
        self.malformed += c.malformed.load(Ordering::Relaxed);
    }
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
    /// Counts `a` in zone `z` (a valid zone of this block).
    #[inline(always)]
    fn record<const SOLE: bool>(
        &self,
        z: usize,
        a: &Answered<'_>,
        cached: Option<AnswerKind>,
        elapsed: Option<Duration>,
    ) -> HitTiming {
        let Answered {
            proto,
            ipv6,
            query: q,
            req_len,
            reply,
            ..
        } = *a;
        let p = proto as usize;
        let t = type_index(q.qtype);
        bump::<SOLE>(&self.requests[REQUESTS.at(z, [p, ipv6 as usize, t])], 1);
        let rcode = reply.get(3).map_or(dns::RCODE_SERVFAIL, |b| b & 0xF);
        // `plugin` as CoreDNS labels it: "cache" for a hit, "forward" for everything resolved
        // (or refused) on the miss path.
        let plugin = cached.is_none() as usize;
        bump::<SOLE>(
            &self.responses[RESPONSES.at(z, [rcode as usize, plugin])],
            1,
        );
        let timing = HitTiming {
            zone_type: DURATION.series.at(z, [t]) as u32,
        };
        if let Some(elapsed) = elapsed {
            self.duration::<SOLE>(timing, 1, elapsed);
        }
        let zp = SIZE.series.at(z, [p]);
        let b = bucket(&SIZE_BUCKETS, req_len as f64);
        bump::<SOLE>(&self.req_size[SIZE.bucket(zp, b)], 1);
        bump::<SOLE>(&self.req_size_sum[zp], req_len as u64);
        let b = bucket(&SIZE_BUCKETS, reply.len() as f64);
        bump::<SOLE>(&self.resp_size[SIZE.bucket(zp, b)], 1);
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
        bump::<SOLE>(&self.duration[DURATION.bucket(zt, b)], n);
        bump::<SOLE>(&self.duration_sum_ns[zt], n * elapsed.as_nanos() as u64);
    }
}

/// One answered query, as [`WorkerStats`] counts it.
#[derive(Clone, Copy, Debug)]
pub struct Answered<'a> {
    /// The query's zone: its index in `Settings::zones` (the `zone` label).
    pub zone: usize,
    /// The transport it arrived on.
    pub proto: Proto,
    /// True when the client's address is IPv6 (`family` "2").
    pub ipv6: bool,
    pub query: &'a Query,
    /// Bytes of the query packet.
    pub req_len: usize,
    /// The reply as sent.
    pub reply: &'a [u8],
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
    /// For stats from [`Metrics::new_udp_worker_for`](super::Metrics::new_udp_worker_for), hits
    /// must be recorded from the worker's own thread only (misses may come from anywhere).
    #[inline]
    pub fn record(&self, a: &Answered<'_>, cached: Option<AnswerKind>, elapsed: Duration) {
        self.count(a, cached, Some(elapsed));
    }

    /// Counts a cache hit like [`record`](Self::record), all but its duration, which the caller
    /// passes to [`hit_durations`](Self::hit_durations) with the returned timing once the reply
    /// is sent (a UDP worker: once for the whole batch). Same thread rule as `record`.
    #[inline]
    pub fn record_hit(&self, a: &Answered<'_>, kind: AnswerKind) -> HitTiming {
        self.count(a, Some(kind), None)
    }

    /// `record` and `record_hit`: hits go to the block only this thread writes when there is one.
    #[inline(always)]
    fn count(
        &self,
        a: &Answered<'_>,
        cached: Option<AnswerKind>,
        elapsed: Option<Duration>,
    ) -> HitTiming {
        let z = a.zone.min(self.zones - 1);
        if self.sole_writer && cached.is_some() {
            self.owned.record::<true>(z, a, cached, elapsed)
        } else {
            self.shared.record::<false>(z, a, cached, elapsed)
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
