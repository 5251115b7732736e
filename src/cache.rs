//! The answer cache: a fixed set of shards, each an `RwLock`ed map from a 64-bit question hash
//! to the answer's wire bytes, bounded in entries and bytes.
//!
//! Entries hold the upstream answer as wire bytes (OPT stripped, question lowercased, TTLs already
//! capped) plus the offsets of every TTL field, so a hit is one copy and a few in-place patches:
//! the client's ID, RD bit and question bytes (0x20 case), and each TTL minus the entry's age.
//! Entries keep an absolute expiry and a stale horizon so serve-stale (RFC 8767) can be added
//! without changing the layout.
//!
//! Eviction is FIFO per shard, O(1) per insert: every entry lives at most the zone's max TTL
//! (30 s by default), so insertion order is close to expiry order and an LRU's bookkeeping (a
//! write on every hit) would buy little. `purge_expired`, run every 10 s by the app, sweeps out
//! expired entries so they do not wait for new inserts to push them out. (A sweep inside
//! `insert` once cost 25 µs per insert on a full 100k cache: see BENCHMARKS.md.)

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::dns::{self, AnswerKind, Query, FLAG_RD, HEADER_LEN, OPT_LEN};

/// A cached answer. Kept small (one heap block, 56 bytes inline) because a node may hold
/// hundreds of thousands; `benches/memory.rs` measures the bytes per entry.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The answer wire bytes (without OPT; question lowercased; TTLs as stored), followed by
    /// the offset of every TTL field as native-endian u16s: one allocation instead of two.
    data: Box<[u8]>,
    /// Length of the wire part of `data`.
    wire_len: u16,
    /// DO and CD bits of the query this answers (part of the key).
    pub key_flags: u8,
    pub kind: AnswerKind,
    /// Index of the zone (config order) the name routed to; used for per-zone accounting.
    pub zone: u16,
    generation: u32,
    /// Lifetime in seconds from `stored`.
    ttl: u32,
    /// Seconds from `stored` during which a stale copy may still be served (== `ttl` while
    /// serve-stale is off).
    stale: u32,
    pub stored: Instant,
}

impl Entry {
    pub fn new(
        wire: Vec<u8>,
        ttl_offsets: Vec<u16>,
        key_flags: u8,
        kind: AnswerKind,
        zone: u16,
        stored: Instant,
        ttl: Duration,
    ) -> Self {
        let wire_len = wire.len().min(u16::MAX as usize) as u16;
        let mut data = wire;
        data.truncate(wire_len as usize);
        data.reserve_exact(ttl_offsets.len() * 2);
        for off in ttl_offsets {
            data.extend_from_slice(&off.to_ne_bytes());
        }
        let ttl = ttl.as_secs().min(u32::MAX as u64) as u32;
        Entry {
            data: data.into_boxed_slice(),
            wire_len,
            key_flags,
            kind,
            zone,
            generation: 0,
            ttl,
            stale: ttl,
            stored,
        }
    }

    /// The answer wire bytes.
    #[inline]
    pub fn wire(&self) -> &[u8] {
        &self.data[..self.wire_len as usize]
    }

    /// Offsets of every TTL field in `wire()`.
    #[inline]
    pub fn ttl_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        self.data[self.wire_len as usize..]
            .chunks_exact(2)
            .map(|c| u16::from_ne_bytes([c[0], c[1]]) as usize)
    }

    pub fn expires(&self) -> Instant {
        self.stored + Duration::from_secs(self.ttl as u64)
    }

    pub fn stale_until(&self) -> Instant {
        self.stored + Duration::from_secs(self.stale as u64)
    }

    /// Memory this entry is charged for: its heap block plus the fixed overhead of its map slot
    /// and FIFO record.
    pub fn charge(&self) -> usize {
        self.data.len() + std::mem::size_of::<Entry>() + 32
    }

    fn question(&self, len: usize) -> Option<&[u8]> {
        self.data.get(HEADER_LEN..HEADER_LEN + len)
    }

    pub fn rcode(&self) -> u8 {
        self.data[3] & 0xF
    }

    /// Writes the reply to `q` (whose wire is `pkt`) into `out`, aged by `age` seconds.
    ///
    /// `max_len` is the largest reply the transport allows; a longer answer becomes a TC=1 reply
    /// with only the question, so the client retries over TCP. `opt_size` is our advertised EDNS
    /// size, added as an OPT record when the client sent one.
    pub fn render(
        &self,
        q: &Query,
        pkt: &[u8],
        age: u32,
        max_len: usize,
        opt_size: u16,
        out: &mut Vec<u8>,
    ) {
        out.clear();
        let opt = if q.edns.is_some() { OPT_LEN } else { 0 };
        let qend = q.question_end;
        let wire = self.wire();
        if wire.len() + opt > max_len {
            out.extend_from_slice(&wire[..HEADER_LEN]);
            out[2] |= (dns::FLAG_TC >> 8) as u8;
            out[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&pkt[HEADER_LEN..qend]);
        } else {
            out.extend_from_slice(wire);
            out[HEADER_LEN..qend].copy_from_slice(&pkt[HEADER_LEN..qend]);
            for off in self.ttl_offsets() {
                let ttl = dns::u32_at(wire, off).saturating_sub(age);
                out[off..off + 4].copy_from_slice(&ttl.to_be_bytes());
            }
        }
        out[0..2].copy_from_slice(&q.id.to_be_bytes());
        // RD echoes the client's; everything else is the upstream's.
        let rd = (FLAG_RD >> 8) as u8;
        out[2] = (out[2] & !rd) | ((q.flags >> 8) as u8 & rd);
        if opt != 0 {
            let ar = dns::u16_at(out, 10) + 1;
            out[10..12].copy_from_slice(&ar.to_be_bytes());
            dns::push_opt(out, opt_size, q.dnssec_ok(), 0);
        }
    }
}

/// Cache limits.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_entries: usize,
    pub max_bytes: usize,
    /// Number of shards, a power of two. More shards mean less contention between workers.
    pub shards: usize,
}

/// Identity hasher: map keys are already keyed hashes of the question.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys are hashed")
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

struct Shard {
    map: HashMap<u64, Entry, BuildHasherDefault<IdHasher>>,
    /// Insertion order for eviction: (key, generation). Stale records are skipped.
    fifo: VecDeque<(u64, u32)>,
    bytes: usize,
    next_generation: u32,
}

/// Padded to a cache line pair so neighbouring shards' locks never share a line.
#[repr(align(128))]
struct PaddedShard(RwLock<Shard>);

/// Counters the cache keeps about itself (shared; only touched on inserts and evictions).
#[derive(Default, Debug)]
pub struct CacheCounters {
    pub evictions: AtomicU64,
    pub expired_removed: AtomicU64,
    pub inserts: AtomicU64,
}

/// The sharded answer cache.
pub struct Cache {
    shards: Box<[PaddedShard]>,
    shard_bits: u32,
    max_entries_per_shard: usize,
    max_bytes_per_shard: usize,
    hasher: ahash::RandomState,
    pub counters: CacheCounters,
}

impl Cache {
    pub fn new(cfg: &CacheConfig) -> Self {
        let shards = cfg.shards.max(1).next_power_of_two();
        Cache {
            shards: (0..shards)
                .map(|_| {
                    PaddedShard(RwLock::new(Shard {
                        map: HashMap::default(),
                        fifo: VecDeque::new(),
                        bytes: 0,
                        next_generation: 0,
                    }))
                })
                .collect(),
            shard_bits: shards.trailing_zeros(),
            max_entries_per_shard: cfg.max_entries.div_ceil(shards).max(1),
            max_bytes_per_shard: cfg.max_bytes.div_ceil(shards).max(1),
            hasher: ahash::RandomState::new(),
            counters: CacheCounters::default(),
        }
    }

    /// The cache key: a keyed hash of the lowercased question and the DO/CD bits.
    #[inline]
    pub fn key(&self, question_lower: &[u8], key_flags: u8) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(question_lower);
        h.write_u8(key_flags);
        h.finish()
    }

    #[inline]
    fn shard(&self, key: u64) -> &RwLock<Shard> {
        let idx = if self.shard_bits == 0 {
            0
        } else {
            (key >> (64 - self.shard_bits)) as usize
        };
        &self.shards[idx].0
    }

    /// Looks `q` up and, on a fresh hit, calls `f` with the entry and its age in whole seconds
    /// while the shard's read lock is held (so the caller copies without cloning the entry).
    #[inline]
    pub fn lookup<R>(
        &self,
        key: u64,
        q: &Query,
        now: Instant,
        f: impl FnOnce(&Entry, u32) -> R,
    ) -> Option<R> {
        let shard = self.shard(key).read();
        let e = shard.map.get(&key)?;
        let qb = q.question_lower();
        let age = now.saturating_duration_since(e.stored).as_secs();
        if age >= e.ttl as u64 || e.key_flags != q.key_flags() || e.question(qb.len()) != Some(qb) {
            return None;
        }
        Some(f(e, age as u32))
    }

    /// Stores `entry` under `key`, evicting expired then oldest entries to stay in bounds.
    /// Returns false when the entry alone exceeds a shard's byte budget.
    pub fn insert(&self, key: u64, mut entry: Entry) -> bool {
        let charge = entry.charge();
        if charge > self.max_bytes_per_shard {
            return false;
        }
        let now = entry.stored;
        let mut shard = self.shard(key).write();
        let shard = &mut *shard;
        shard.next_generation = shard.next_generation.wrapping_add(1);
        entry.generation = shard.next_generation;
        shard.fifo.push_back((key, entry.generation));
        if let Some(old) = shard.map.insert(key, entry) {
            shard.bytes -= old.charge();
        }
        shard.bytes += charge;
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
        // Over a bound: drop the oldest insertions. Every lifetime is capped (30 s by default), so
        // insertion order is close to expiry order; this is O(1) amortised under the write lock.
        while shard.map.len() > self.max_entries_per_shard || shard.bytes > self.max_bytes_per_shard
        {
            let Some((k, generation)) = shard.fifo.pop_front() else {
                break;
            };
            if shard
                .map
                .get(&k)
                .is_some_and(|e| e.generation == generation)
            {
                let old = shard.map.remove(&k).expect("present");
                shard.bytes -= old.charge();
                let counter = if old.stale_until() <= now {
                    &self.counters.expired_removed
                } else {
                    &self.counters.evictions
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Keep the FIFO from growing with records of replaced or removed entries.
        if shard.fifo.len() > 2 * shard.map.len() + 64 {
            let map = &shard.map;
            shard
                .fifo
                .retain(|(k, g)| map.get(k).is_some_and(|e| e.generation == *g));
        }
        true
    }

    /// Removes every entry past its stale horizon, one shard at a time (each write lock is held
    /// only for its own shard). Run periodically so expired answers do not sit in memory until
    /// pushed out by new ones. Returns the number removed.
    pub fn purge_expired(&self, now: Instant) -> usize {
        let mut removed = 0;
        for s in self.shards.iter() {
            let mut shard = s.0.write();
            let shard = &mut *shard;
            let before = shard.map.len();
            let mut freed = 0;
            shard.map.retain(|_, e| {
                let keep = e.stale_until() > now;
                if !keep {
                    freed += e.charge();
                }
                keep
            });
            shard.bytes -= freed;
            removed += before - shard.map.len();
            let map = &shard.map;
            shard
                .fifo
                .retain(|(k, g)| map.get(k).is_some_and(|e| e.generation == *g));
        }
        self.counters
            .expired_removed
            .fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }

    /// Number of entries per answer kind (positive, negative incl. SERVFAIL), expired included.
    pub fn entry_counts(&self) -> (usize, usize) {
        let mut pos = 0;
        let mut neg = 0;
        for s in self.shards.iter() {
            for e in s.0.read().map.values() {
                if e.kind == AnswerKind::Positive {
                    pos += 1;
                } else {
                    neg += 1;
                }
            }
        }
        (pos, neg)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.0.read().map.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes charged to all entries.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.0.read().bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{parse_query, push_opt};

    fn query(name: &[u8], id: u16, edns: bool) -> Vec<u8> {
        let mut p = vec![
            (id >> 8) as u8,
            id as u8,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        p.extend_from_slice(name);
        p.extend_from_slice(&[0, 1, 0, 1]);
        if edns {
            p[11] = 1;
            push_opt(&mut p, 4096, false, 0);
        }
        p
    }

    /// An answer with one A record whose TTL is `ttl`, for the lowercased question of `pkt`.
    fn answer(q: &Query, ttl: u32) -> (Vec<u8>, Vec<u16>) {
        let mut w = vec![0, 0, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        w.extend_from_slice(q.question_lower());
        w.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        let off = w.len() as u16;
        w.extend_from_slice(&ttl.to_be_bytes());
        w.extend_from_slice(&[0, 4, 10, 0, 0, 1]);
        (w, vec![off])
    }

    const NAME: &[u8] = b"\x03WwW\x07ExAmple\x03com\x00";

    #[test]
    fn hit_patches_id_case_and_ttl() {
        let cache = Cache::new(&CacheConfig {
            max_entries: 100,
            max_bytes: 1 << 20,
            shards: 4,
        });
        let p1 = query(NAME, 1, false);
        let q1 = parse_query(&p1).unwrap();
        let t0 = Instant::now();
        let (w, offs) = answer(&q1, 30);
        let key = cache.key(q1.question_lower(), q1.key_flags());
        assert!(cache.insert(
            key,
            Entry::new(
                w,
                offs,
                0,
                AnswerKind::Positive,
                0,
                t0,
                Duration::from_secs(30)
            )
        ));
        let p2 = query(b"\x03www\x07EXAMPLE\x03COM\x00", 0xBEEF, true);
        let q2 = parse_query(&p2).unwrap();
        let key2 = cache.key(q2.question_lower(), q2.key_flags());
        assert_eq!(key, key2);
        let mut out = Vec::new();
        let later = t0 + Duration::from_secs(7);
        cache
            .lookup(key2, &q2, later, |e, age| {
                e.render(&q2, &p2, age, 1232, 1232, &mut out)
            })
            .expect("hit");
        assert_eq!(&out[..2], &[0xBE, 0xEF]);
        assert_eq!(&out[12..q2.question_end], &p2[12..q2.question_end]);
        let ttl_off = out.len() - OPT_LEN - 10;
        assert_eq!(dns::u32_at(&out, ttl_off), 23);
        assert_eq!(dns::u16_at(&out, 10), 1, "our OPT added");
        // Expired: miss.
        assert!(cache
            .lookup(key2, &q2, t0 + Duration::from_secs(30), |_, _| ())
            .is_none());
        // A DO=1 query must not be served this DO=0 answer, even when looked up under its key.
        let mut p3 = query(NAME, 2, false);
        p3[11] = 1;
        push_opt(&mut p3, 1232, true, 0);
        let q3 = parse_query(&p3).unwrap();
        assert_ne!(cache.key(q3.question_lower(), q3.key_flags()), key);
        assert!(cache.lookup(key, &q3, later, |_, _| ()).is_none());
    }

    #[test]
    fn oversized_answer_is_truncated_with_tc() {
        let cache = Cache::new(&CacheConfig {
            max_entries: 10,
            max_bytes: 1 << 20,
            shards: 1,
        });
        let p = query(NAME, 9, false);
        let q = parse_query(&p).unwrap();
        let (w, offs) = answer(&q, 30);
        let e = Entry::new(
            w,
            offs,
            0,
            AnswerKind::Positive,
            0,
            Instant::now(),
            Duration::from_secs(5),
        );
        let mut out = Vec::new();
        e.render(&q, &p, 0, 40, 1232, &mut out);
        assert_eq!(out.len(), q.question_end);
        assert_ne!(out[2] & 0x02, 0, "TC set");
        assert_eq!(dns::u16_at(&out, 6), 0);
        let _ = cache;
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let cache = Cache::new(&CacheConfig {
            max_entries: 64,
            max_bytes: 64 * 400,
            shards: 4,
        });
        let now = Instant::now();
        for i in 0..10_000u32 {
            let name = format!("\x04n{:03}\x07example\x00", i % 1000);
            let mut p = query(name.as_bytes(), 1, false);
            p[13] = b'a' + (i / 1000) as u8;
            let q = parse_query(&p).unwrap();
            let (w, offs) = answer(&q, 30);
            let key = cache.key(q.question_lower(), 0);
            cache.insert(
                key,
                Entry::new(
                    w,
                    offs,
                    0,
                    AnswerKind::Positive,
                    0,
                    now,
                    Duration::from_secs(30),
                ),
            );
            assert!(cache.len() <= 64 + 3);
            assert!(cache.bytes() <= 64 * 400 + 4 * 400);
        }
        assert!(cache.counters.evictions.load(Ordering::Relaxed) > 9000);
    }

    #[test]
    fn full_shard_drops_oldest_and_purge_removes_expired() {
        let cache = Cache::new(&CacheConfig {
            max_entries: 2,
            max_bytes: 1 << 20,
            shards: 1,
        });
        let t0 = Instant::now();
        let mk = |name: &[u8], ttl: u64, at: Instant| {
            let p = query(name, 1, false);
            let q = parse_query(&p).unwrap();
            let (w, offs) = answer(&q, ttl as u32);
            (
                p,
                cache.key(q.question_lower(), 0),
                Entry::new(
                    w,
                    offs,
                    0,
                    AnswerKind::Positive,
                    0,
                    at,
                    Duration::from_secs(ttl),
                ),
            )
        };
        let (pa, ka, a) = mk(b"\x01a\x00", 100, t0);
        let (pb, kb, b) = mk(b"\x01b\x00", 1, t0);
        let (pc, kc, c) = mk(b"\x01c\x00", 100, t0 + Duration::from_secs(5));
        cache.insert(ka, a);
        cache.insert(kb, b);
        cache.insert(kc, c);
        let at = t0 + Duration::from_secs(6);
        let (qa, qb, qc) = (
            parse_query(&pa).unwrap(),
            parse_query(&pb).unwrap(),
            parse_query(&pc).unwrap(),
        );
        assert!(
            cache.lookup(ka, &qa, at, |_, _| ()).is_none(),
            "oldest insertion dropped"
        );
        assert!(cache.lookup(kc, &qc, at, |_, _| ()).is_some());
        assert!(cache.lookup(kb, &qb, at, |_, _| ()).is_none(), "b expired");
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.counters.evictions.load(Ordering::Relaxed), 1);
        assert_eq!(cache.purge_expired(at), 1, "b purged");
        assert_eq!(cache.len(), 1);
        let (_, kd, d) = mk(b"\x01d\x00", 100, at);
        cache.insert(kd, d);
        assert_eq!(
            cache.counters.evictions.load(Ordering::Relaxed),
            1,
            "room after purge"
        );
    }
}
