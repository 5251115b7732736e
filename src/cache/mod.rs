//! The answer cache: a fixed set of shards, the locks of one [`SlotTable`] (see `readslots`: a
//! reader writes only to its own thread's slot) over a hash table of handles into an append-only arena of
//! answers, bounded in entries and bytes.
//!
//! - `mod.rs` (here): the sharded table, insert, lookup, eviction and purge.
//! - `entry.rs`: [`Entry`] (an answer outside the cache), [`EntryRef`] (one borrowed from the
//!   arena by a hit) and the reply renderer both use.
//! - `snapshot.rs`: the live entries written to a byte stream and loaded back by a new process
//!   (warm restart), and the format, versioned and checksummed.
//!
//! Entries hold the upstream answer as wire bytes (OPT stripped, question lowercased, TTLs already
//! capped) plus the offsets of every TTL field, so a hit is one copy and a few in-place patches:
//! the client's ID, RD bit and question bytes (0x20 case), and each TTL minus the entry's age.
//! Entries keep an absolute store time, a lifetime and a stale horizon so serve-stale (RFC 8767)
//! can be added without changing the layout.
//!
//! Memory layout (at most 1.5x the answer bytes). A shard appends each entry, a 34-byte header
//! followed by the answer and its TTL offsets, to the newest of its arena blocks (16 KiB, or one
//! block of its own for a bigger answer). Its hash table holds only 8-byte handles (block,
//! offset); the key lives in the entry header. No per-entry allocation, so no allocator overhead,
//! and no separate eviction queue: the arena *is* the insertion order.
//!
//! Eviction is FIFO per shard, O(1) per insert: the oldest entry is at the head of the oldest
//! block, and a block is freed once the head passes its end. Every entry lives at most the zone's
//! max TTL (30 s by default), so insertion order is close to expiry order and an LRU's bookkeeping
//! (a write on every hit) would buy little. An entry replaced by a newer answer, or removed by
//! `purge_expired` (every 10 s from the server), leaves its bytes in place until the head passes them;
//! they count against `max_bytes`, so the bound holds. (A sweep inside `insert` once cost 25 µs per
//! insert on a full 100k cache: see docs/benchmarks-history.md.)
//!
//! Time: the cache reads no clock for its entries. Every call that ages, stores or expires takes
//! `now` (or the entry's store time) from its caller, which reads the server's `crate::clock`:
//! the real monotonic clock in production, a manual one a test advances. Store times are kept in
//! milliseconds since an epoch a week before the cache was made, so any reading of either clock
//! after that is representable.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hashbrown::HashTable;

mod arena;
mod entry;
mod snapshot;

use arena::*;

pub use entry::{Entry, EntryRef};
pub use snapshot::{
    load_snapshot_file, write_snapshot_file, LoadStats, SnapshotError, SnapshotStats,
};

use crate::dns::{AnswerKind, Query, HEADER_LEN};
use crate::readslots::SlotTable;

/// Cache limits.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub max_entries: usize,
    pub max_bytes: usize,
    /// Number of shards (rounded up to a power of two, at most 2^20). More shards mean less
    /// contention between workers.
    pub shards: usize,
}

/// How far before its creation a cache's epoch lies. Store times are kept as milliseconds since
/// the epoch (saturating), so an entry stored by an earlier process (loaded from a snapshot) can
/// keep its age only if the epoch is older than the entry.
const EPOCH_BACKDATE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The epoch of a cache created at `now`: [`EPOCH_BACKDATE`] before it, or as far back as the
/// monotonic clock goes.
fn backdated(now: Instant) -> Instant {
    [
        EPOCH_BACKDATE,
        Duration::from_secs(24 * 3600),
        Duration::from_secs(3600),
    ]
    .into_iter()
    .find_map(|d| now.checked_sub(d))
    .unwrap_or(now)
}

/// Counters the cache keeps about itself (shared; only touched on inserts and evictions).
#[derive(Default, Debug)]
pub struct CacheCounters {
    pub evictions: AtomicU64,
    pub expired_removed: AtomicU64,
    pub inserts: AtomicU64,
}

/// The sharded answer cache.
pub struct Cache {
    /// The shards, each behind a lock of its own (on cache lines of its own) whose readers
    /// announce themselves in the table's per-thread slots (see `readslots`): a hit writes only
    /// to its own thread's line.
    shards: SlotTable<Shard>,
    shard_bits: u32,
    max_entries_per_shard: usize,
    max_bytes_per_shard: usize,
    /// Size of a standard arena block: 16 KiB, or less when a shard's byte budget is small.
    block: usize,
    /// Entry store times are kept as milliseconds since this instant.
    epoch: Instant,
    hasher: ahash::RandomState,
    pub counters: CacheCounters,
}

impl Cache {
    pub fn new(cfg: &CacheConfig) -> Self {
        let shards = cfg.shards.clamp(1, 1 << 20).next_power_of_two();
        let max_bytes_per_shard = cfg.max_bytes.div_ceil(shards).max(1);
        Cache {
            shards: SlotTable::new((0..shards).map(|_| Shard {
                table: HashTable::new(),
                blocks: VecDeque::new(),
                first_seq: 0,
                head: 0,
                bytes: 0,
                spare: None,
                resets: 0,
            })),
            shard_bits: shards.trailing_zeros(),
            max_entries_per_shard: cfg.max_entries.div_ceil(shards).max(1),
            max_bytes_per_shard,
            // At least four blocks per shard budget, so freeing whole blocks tracks the bound.
            block: (max_bytes_per_shard / 4).clamp(512, MAX_BLOCK),
            epoch: backdated(Instant::now()),
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

    /// The shard of `key`, picked by bits 32 and up. The shard's hash table uses the key itself
    /// as its hash: the low bits choose the bucket and the top seven are the tag compared before
    /// any entry is touched. Taking the shard from either end would leave every key of a shard
    /// with the same bucket bits or the same tag (each false tag match costs a read of the entry
    /// in the arena: measured, 3.4% of the miss path's CPU).
    #[inline]
    fn shard(&self, key: u64) -> usize {
        ((key >> 32) as usize) & ((1usize << self.shard_bits) - 1)
    }

    /// The index of `key`'s shard (as [`Cache::shard`] picks it), for batching by shard.
    fn shard_index(&self, key: u64) -> usize {
        self.shard(key)
    }

    /// Runs `f` on shard `s` read-locked.
    #[inline]
    fn read<R>(&self, s: usize, f: impl FnOnce(&Shard) -> R) -> R {
        self.shards.read(s, f)
    }

    /// Runs `f` on shard `s` write-locked.
    fn write<R>(&self, s: usize, f: impl FnOnce(&mut Shard) -> R) -> R {
        self.shards.write(s, f)
    }

    #[inline]
    fn ms(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Looks `q` up and, on a fresh hit, calls `f` with the entry and its age in whole seconds
    /// while the shard's read lock is held (so the caller copies straight out of the arena).
    #[inline]
    pub fn lookup<R>(
        &self,
        key: u64,
        q: &Query,
        now: Instant,
        f: impl FnOnce(&EntryRef<'_>, u32) -> R,
    ) -> Option<R> {
        self.find::<false, R>(key, q, now, f)
    }

    /// Like [`Cache::lookup`], but also finds an entry whose TTL ran out and whose stale horizon
    /// is still ahead (RFC 8767): `f` sees its age, which may exceed its TTL. Not on the hit
    /// path: the miss path asks when the upstreams cannot answer.
    pub fn lookup_stale<R>(
        &self,
        key: u64,
        q: &Query,
        now: Instant,
        f: impl FnOnce(&EntryRef<'_>, u32) -> R,
    ) -> Option<R> {
        self.find::<true, R>(key, q, now, f)
    }

    #[inline(always)]
    fn find<const STALE: bool, R>(
        &self,
        key: u64,
        q: &Query,
        now: Instant,
        f: impl FnOnce(&EntryRef<'_>, u32) -> R,
    ) -> Option<R> {
        let now_ms = self.ms(now);
        self.read(self.shard(key), |shard| {
            let e = shard.entry(shard.find(key)?);
            let stored = rd_u64(e, H_STORED);
            let age = now_ms.saturating_sub(stored) / 1000;
            let flags = e[H_FLAGS];
            let wire_len = rd_u16(e, H_WIRE) as usize;
            let qb = q.question_lower();
            let ttl = rd_u32(e, H_TTL);
            let horizon = if STALE { rd_u32(e, H_STALE) } else { ttl };
            if age >= horizon as u64
                || flags != q.key_flags()
                || e.get(HDR + HEADER_LEN..HDR + HEADER_LEN + qb.len()) != Some(qb)
                || HEADER_LEN + qb.len() > wire_len
            {
                return None;
            }
            let view = EntryRef {
                payload: &e[HDR..],
                wire_len,
                key_flags: flags,
                kind: kind_from_u8(e[H_KIND]),
                zone: rd_u16(e, H_ZONE),
                ttl,
                stored_ms: stored,
                age_ms: now_ms.saturating_sub(stored),
            };
            Some(f(&view, age as u32))
        })
    }

    /// Starts loading into the CPU cache the entries `keys` most likely point at, without
    /// waiting for any: a UDP worker calls this with the keys of a whole `recvmmsg` batch before
    /// looking any of them up, so the lookups find their entries in cache instead of each stalling
    /// on memory in turn. One slot store covers the batch (`SlotTable::read_any`): with no fence
    /// per key the CPU overlaps the table loads of consecutive keys. Takes the first candidate
    /// whose 7-bit table tag matches, reading no entry; a wrong guess, or a shard being written
    /// (skipped), costs only a useless or missing hint, since the lookup compares the full key.
    #[inline]
    pub fn prefetch(&self, keys: &[u64]) {
        self.shards.read_any(|reader| {
            for &key in keys {
                reader.try_read(self.shard(key), |shard| {
                    let Some(&h) = shard.table.find(key, |_| true) else {
                        return;
                    };
                    let idx = ((h >> 32) as u32).wrapping_sub(shard.first_seq) as usize;
                    if let Some(b) = shard.blocks.get(idx) {
                        let p = b.as_ptr().wrapping_add(h as u32 as usize);
                        // Header, question and (most of) a typical answer: three cache lines.
                        for line in 0..3 {
                            prefetch_read(p.wrapping_add(line * 64));
                        }
                    }
                });
            }
        });
    }

    /// Stores `entry` under `key`, reclaiming the oldest entries to stay in bounds. Returns false
    /// when the entry alone exceeds a shard's byte budget.
    pub fn insert(&self, key: u64, entry: Entry) -> bool {
        let stored = self.ms(entry.stored);
        let parts = Parts {
            stored_ms: stored,
            ttl: entry.ttl,
            stale: entry.stale,
            zone: entry.zone,
            key_flags: entry.key_flags,
            kind: kind_to_u8(entry.kind),
            wire: &entry.wire,
            offsets: entry.offsets.iter().copied(),
            n_offsets: entry.offsets.len(),
        };
        if parts.charge() > self.max_bytes_per_shard {
            return false;
        }
        self.write(self.shard(key), |shard| {
            self.append(shard, key, parts, stored)
        });
        self.counters.inserts.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Appends an entry to `shard` (write-locked), replacing the one `key` held and reclaiming the
    /// oldest entries to stay in bounds; those still live count as evicted, or as expired when
    /// their stale horizon is at or before `now_ms`. The caller checked `parts.charge()` against
    /// the shard's byte budget.
    #[inline]
    fn append<O: Iterator<Item = u16>>(
        &self,
        shard: &mut Shard,
        key: u64,
        parts: Parts<'_, O>,
        now_ms: u64,
    ) {
        let size = parts.charge();
        // A newer answer replaces the old one; its bytes come back when the head passes them.
        if let Some(old) = shard.find(key) {
            shard.remove(key, old);
        }
        // Entry bound: drop the oldest live entries.
        while shard.table.len() >= self.max_entries_per_shard && self.reclaim(shard, now_ms) {}
        // Room in the newest block, or a new block within the byte bound.
        if !shard.fits(size) {
            let cap = self.block.max(size);
            while shard.bytes + cap > self.max_bytes_per_shard && self.reclaim(shard, now_ms) {}
            // Reclaiming may have emptied and rewound the last block: it may fit now.
            if !shard.fits(size) {
                let block = match shard.spare.take() {
                    Some(b) if cap == self.block && b.capacity() >= cap => b,
                    _ => Vec::with_capacity(cap),
                };
                shard.bytes += block.capacity();
                shard.blocks.push_back(block);
                if shard.blocks.len() == 1 {
                    shard.head = 0;
                }
            }
        }
        let seq = shard.first_seq.wrapping_add(shard.blocks.len() as u32 - 1);
        let b = shard.blocks.back_mut().expect("a block");
        let off = b.len();
        b.extend_from_slice(&key.to_ne_bytes());
        b.extend_from_slice(&parts.stored_ms.to_ne_bytes());
        b.extend_from_slice(&parts.ttl.to_ne_bytes());
        b.extend_from_slice(&parts.stale.to_ne_bytes());
        b.extend_from_slice(&(size as u32).to_ne_bytes());
        b.extend_from_slice(&(parts.wire.len() as u16).to_ne_bytes());
        b.extend_from_slice(&parts.zone.to_ne_bytes());
        b.push(parts.key_flags);
        b.push(parts.kind);
        b.extend_from_slice(parts.wire);
        for o in parts.offsets {
            b.extend_from_slice(&o.to_ne_bytes());
        }
        debug_assert_eq!(b.len() - off, size);
        let h = handle(seq, off);
        let (blocks, first_seq) = (&shard.blocks, shard.first_seq);
        shard
            .table
            .insert_unique(key, h, |&x| rd_u64(entry_at(blocks, first_seq, x), H_KEY));
    }

    /// Reclaims the shard's oldest entry, counting it as expired or evicted when it was live.
    /// False when the shard holds nothing more to reclaim.
    fn reclaim(&self, shard: &mut Shard, now_ms: u64) -> bool {
        match shard.pop_oldest(self.block) {
            None => false,
            Some(None) => true,
            Some(Some(stale_ms)) => {
                self.count_reclaimed(stale_ms, now_ms);
                true
            }
        }
    }

    fn count_reclaimed(&self, stale_ms: u64, now_ms: u64) {
        let counter = if stale_ms <= now_ms {
            &self.counters.expired_removed
        } else {
            &self.counters.evictions
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Removes every entry past its stale horizon, one shard at a time (each write lock is held
    /// only for its own shard), and reclaims the arena up to the oldest entry still live. Run
    /// periodically so expired answers neither count as entries nor hold blocks. Returns the
    /// number removed.
    pub fn purge_expired(&self, now: Instant) -> usize {
        let now_ms = self.ms(now);
        let mut removed = 0;
        for s in 0..self.shards.len() {
            removed += self.write(s, |shard| {
                let mut removed = 0;
                let before = shard.table.len();
                let (blocks, first_seq) = (&shard.blocks, shard.first_seq);
                shard.table.retain(|&mut h| {
                    let e = entry_at(blocks, first_seq, h);
                    rd_u64(e, H_STORED) + rd_u32(e, H_STALE) as u64 * 1000 > now_ms
                });
                removed += before - shard.table.len();
                // Reclaim from the head while it is dead (now including what was just removed).
                while let Some(front) = shard.blocks.front() {
                    if shard.head >= front.len() {
                        if !shard.next_block(self.block) {
                            break;
                        }
                        continue;
                    }
                    let e = &front[shard.head..];
                    let (key, len) = (rd_u64(e, H_KEY), rd_u32(e, H_LEN) as usize);
                    if shard.find(key) == Some(handle(shard.first_seq, shard.head)) {
                        break;
                    }
                    shard.head += len;
                }
                if shard.table.is_empty() {
                    // Nothing live: give the blocks back (the spare included).
                    shard.blocks.clear();
                    shard.spare = None;
                    shard.bytes = 0;
                    shard.head = 0;
                    shard.resets += 1;
                }
                removed
            });
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
        for s in 0..self.shards.len() {
            self.read(s, |shard| {
                for &h in shard.table.iter() {
                    if shard.entry(h)[H_KIND] == kind_to_u8(AnswerKind::Positive) {
                        pos += 1;
                    } else {
                        neg += 1;
                    }
                }
            });
        }
        (pos, neg)
    }

    pub fn len(&self) -> usize {
        (0..self.shards.len())
            .map(|s| self.read(s, |sh| sh.table.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of arena blocks held (entries, reclaimable space and the spare blocks' share).
    pub fn bytes(&self) -> usize {
        (0..self.shards.len())
            .map(|s| self.read(s, |sh| sh.bytes))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{self, parse_query, push_opt, OPT_LEN};

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
            assert!(
                cache.bytes() <= 64 * 400 + 4 * 400,
                "{} at {i}",
                cache.bytes()
            );
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

    /// Random inserts (replacements, answers from tiny to bigger than a block), purges and
    /// lookups against a model: a hit always returns the newest answer stored for its key, and
    /// the shard bounds hold after every step.
    #[test]
    fn arena_model_check() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let cfg = CacheConfig {
            max_entries: 200,
            max_bytes: 4 * 40_000,
            shards: 4,
        };
        let cache = Cache::new(&cfg);
        let t0 = Instant::now();
        let mut newest: std::collections::HashMap<u32, (u32, u64)> = Default::default();
        let mut version = 0u32;
        let mut hits = 0;
        let mut now = t0;
        for step in 0..20_000u32 {
            let n = rng.random_range(0..500u32);
            let name = format!("\x05k{n:04}\x07example\x00");
            let p = query(name.as_bytes(), 1, false);
            let q = parse_query(&p).unwrap();
            let key = cache.key(q.question_lower(), 0);
            match rng.random_range(0..10) {
                0..=4 => {
                    version += 1;
                    let (mut w, offs) = answer(&q, 30);
                    // Mostly small answers, some over the 10 KiB block of this config.
                    let pad = if rng.random_range(0..50) == 0 {
                        12_000
                    } else {
                        rng.random_range(0..300)
                    };
                    for _ in 0..pad / 4 + 1 {
                        w.extend_from_slice(&version.to_be_bytes());
                    }
                    let ttl = rng.random_range(1..20u64);
                    let e = Entry::new(
                        w,
                        offs,
                        0,
                        AnswerKind::Positive,
                        0,
                        now,
                        Duration::from_secs(ttl),
                    );
                    assert!(cache.insert(key, e));
                    newest.insert(
                        n,
                        (
                            version,
                            ttl * 1000 + now.duration_since(t0).as_millis() as u64,
                        ),
                    );
                }
                5..=8 => {
                    let mut out = Vec::new();
                    if let Some(()) = cache.lookup(key, &q, now, |e, _| {
                        e.render(&q, &p, 0, 65535, 1232, &mut out)
                    }) {
                        let (v, expiry) = newest[&n];
                        assert_eq!(
                            dns::u32_at(&out, out.len() - 4),
                            v,
                            "step {step}: newest answer"
                        );
                        assert!((now.duration_since(t0).as_millis() as u64) < expiry);
                        hits += 1;
                    }
                }
                _ => {
                    now += Duration::from_millis(rng.random_range(0..3000));
                    if rng.random_range(0..4) == 0 {
                        cache.purge_expired(now);
                    }
                }
            }
            assert!(cache.len() <= cfg.max_entries);
            assert!(
                cache.bytes() <= cfg.max_bytes + 4 * 12_100,
                "step {step}: {} bytes",
                cache.bytes()
            );
        }
        assert!(hits > 300, "{hits} hits");
        assert!(cache.counters.evictions.load(Ordering::Relaxed) > 0);
        // Everything expires: a purge empties the cache and gives its blocks back.
        cache.purge_expired(now + Duration::from_secs(60));
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.bytes(), 0);
    }

    #[test]
    fn replaced_answer_wins_and_its_bytes_come_back() {
        let cache = Cache::new(&CacheConfig {
            max_entries: 1000,
            max_bytes: 64 << 10,
            shards: 1,
        });
        let p = query(NAME, 1, false);
        let q = parse_query(&p).unwrap();
        let key = cache.key(q.question_lower(), 0);
        let now = Instant::now();
        for ttl in 1..=5000u32 {
            let (w, offs) = answer(&q, ttl);
            let e = Entry::new(
                w,
                offs,
                0,
                AnswerKind::Positive,
                0,
                now,
                Duration::from_secs(600),
            );
            assert!(cache.insert(key, e));
        }
        assert_eq!(cache.len(), 1);
        assert!(
            cache.bytes() <= 64 << 10,
            "dead copies reclaimed: {}",
            cache.bytes()
        );
        let mut out = Vec::new();
        cache
            .lookup(key, &q, now, |e, _| {
                e.render(&q, &p, 0, 1232, 1232, &mut out)
            })
            .expect("hit");
        assert_eq!(dns::u32_at(&out, out.len() - 10), 5000);
        assert_eq!(
            cache.counters.evictions.load(Ordering::Relaxed),
            0,
            "replacement is not eviction"
        );
    }
}
