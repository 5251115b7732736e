//! Cache snapshots: the live entries written to a byte stream (a file in the state directory, or a
//! Unix stream from an old process to its successor) and read back by a new process, so that it
//! starts with a warm cache.
//!
//! # Format (version 1, every integer little-endian)
//! ```text
//! header   magic "NDNSSNAP" | version u32 | created u64 (wall clock, ms since the Unix epoch)
//! chunk*   length u32 | entries u32 | CRC-32 of the 8 bytes before it | `length` bytes of entries
//! end      0 u32 | 0 u32 | CRC-32 of those 8 zero bytes
//! trailer  entries u64 (all chunks) | CRC-32 of everything before it, header included
//! entry    stored u64 (wall clock, ms since the Unix epoch) | ttl u32 (s) | stale u32 (s) |
//!          zone u16 | key flags u8 | kind u8 | wire length u16 | TTL offsets u16 |
//!          wire bytes | TTL offsets (u16 each)
//! ```
//! The writer walks one shard at a time, 32 KiB of arena per read-lock hold, and sends its
//! entries as chunks of about 1 MiB, so it never holds the whole snapshot in memory, never holds
//! a lock for long, and a stream needs no length up front; the reader stops after the trailer, so
//! a stream need not be closed. Each chunk header carries its own CRC, so a corrupt length is
//! caught before it is used.
//!
//! Store times are absolute (wall clock): the cache keeps them relative to its own epoch, which
//! means nothing to another process. On load an entry's age is the time since it was stored,
//! measured from the later of now and the snapshot's creation (a wall clock set back since then
//! never makes an entry younger than it was when written), so every entry keeps its absolute
//! expiry. Keys are not stored: the cache key is a keyed hash with a per-process seed, so the
//! loader re-keys every entry from its question and key flags.
//!
//! # Trust
//! A snapshot is refused whole, with nothing inserted, unless everything verifies: magic, version,
//! size (at most [`Cache::snapshot_limit`], checked before each chunk is read, so a hostile stream
//! cannot exhaust memory), the chunk and whole-stream CRCs, then every entry: lengths inside its
//! chunk, key flags and kind in range, stale window not shorter than the lifetime, stored no later
//! than the snapshot, and a wire that `dns::parse_response` walks as a response to its own
//! lowercase question, with exactly the stored TTL offsets and answer kind, no OPT, no TC and no
//! trailing bytes. Only then are entries dropped one by one for being past their stale horizon or
//! naming a zone the new configuration does not have.

use std::fs;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{
    entry_at, handle, kind_to_u8, rd_u16, rd_u32, rd_u64, Cache, Parts, Shard, HDR, H_FLAGS, H_KEY,
    H_KIND, H_LEN, H_STALE, H_STORED, H_TTL, H_WIRE, H_ZONE,
};
use crate::dns::{self, AnswerKind, HEADER_LEN as DNS_HEADER};

/// The first bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"NDNSSNAP";
/// The format this build writes and the only one it reads.
pub const VERSION: u32 = 1;

const HEADER: usize = 20;
const CHUNK_HEADER: usize = 12;
const TRAILER: usize = 12;
const ENTRY_FIXED: usize = 24;
/// A chunk is sent once it holds this much (one entry may take it past).
const CHUNK_TARGET: usize = 1 << 20;
/// Entries inserted per write lock on load, so a load alongside lookups never holds a shard long.
const LOAD_BATCH: usize = 256;

/// Key flags a query can carry: DO (bit 0) and CD (bit 1).
const KEY_FLAGS_MASK: u8 = 0b11;

/// What a snapshot write produced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Entries written (those whose stale horizon was still ahead).
    pub entries: u64,
    /// Bytes written, header to trailer.
    pub bytes: u64,
}

/// What a snapshot load did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadStats {
    /// Entries the snapshot held.
    pub entries: u64,
    /// Entries inserted (the cache's own bounds may evict some of them again, oldest first).
    pub loaded: u64,
    /// Entries past their stale horizon by now (or stored before the cache's epoch): dropped.
    pub expired: u64,
    /// Entries whose zone index is not below the `zones` given to the load (the configuration
    /// lost zones since the snapshot): dropped, since their per-zone accounting would be wrong.
    pub unknown_zone: u64,
    /// Entries larger than one shard's byte budget in this cache: dropped.
    pub oversized: u64,
    /// Bytes read, header to trailer.
    pub bytes: u64,
    /// When the snapshot was written (the writer's wall clock).
    pub created: SystemTime,
}

/// Why a snapshot was refused. Nothing of a refused snapshot is inserted.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("reading the snapshot: {0}")]
    Io(#[source] io::Error),
    #[error("snapshot truncated")]
    Truncated,
    #[error("not a nodedns cache snapshot (bad magic)")]
    Foreign,
    #[error("snapshot format version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    #[error("snapshot checksum mismatch")]
    ChecksumMismatch,
    #[error("snapshot entry {index} is malformed: {reason}")]
    MalformedEntry { index: u64, reason: &'static str },
    #[error("snapshot larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("bytes follow the snapshot's trailer")]
    TrailingBytes,
}

impl SnapshotError {
    /// A stable, low-cardinality name for the error, for a metric label.
    pub fn label(&self) -> &'static str {
        match self {
            SnapshotError::Io(_) => "io",
            SnapshotError::Truncated => "truncated",
            SnapshotError::Foreign => "foreign",
            SnapshotError::UnsupportedVersion(_) => "unsupported_version",
            SnapshotError::ChecksumMismatch => "checksum_mismatch",
            SnapshotError::MalformedEntry { .. } => "malformed_entry",
            SnapshotError::TooLarge { .. } => "too_large",
            SnapshotError::TrailingBytes => "trailing_bytes",
        }
    }
}

/// A short read is a truncated snapshot; any other error is the reader's.
fn read_err(e: io::Error) -> SnapshotError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        SnapshotError::Truncated
    } else {
        SnapshotError::Io(e)
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u64::MAX as u128) as u64)
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A writer that counts and checksums what goes through it.
struct Summed<'w, W> {
    w: &'w mut W,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Summed<'_, W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.crc.update(b);
        self.bytes += b.len() as u64;
        self.w.write_all(b)
    }

    fn chunk(&mut self, entries: u32, body: &[u8]) -> io::Result<()> {
        let mut h = [0u8; CHUNK_HEADER];
        h[0..4].copy_from_slice(&(body.len() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&entries.to_le_bytes());
        let crc = crc32fast::hash(&h[..8]);
        h[8..12].copy_from_slice(&crc.to_le_bytes());
        self.put(&h)?;
        self.put(body)
    }
}

/// Arena bytes a snapshot's walk scans per read-lock hold (at least one entry): a few
/// microseconds, so an insert on that shard (and the hits queued behind it) hardly waits.
const WALK_STEP: usize = 32 << 10;

/// A walk over one shard's arena in insertion order, from its head to where its newest block
/// ended when the walk began, a short read-lock hold per step. Between steps the shard changes:
/// blocks freed at the head are skipped, entries appended after the end are left out (they came
/// after the snapshot began), and an arena emptied in place (`Shard::resets`) ends the walk, since
/// a position from before may then hold another entry. An entry is taken only if the table
/// still points at it (not replaced, purged or evicted), as in `purge_expired`.
struct ShardWalk {
    resets: u64,
    /// Position of the next entry: block sequence number and offset.
    seq: u32,
    off: usize,
    /// Where the walk stops.
    end_seq: u32,
    end_off: usize,
    done: bool,
}

/// True when block sequence number `a` comes before `b` (sequence numbers wrap).
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

impl ShardWalk {
    fn new(shard: &Shard) -> Self {
        let n = shard.blocks.len() as u32;
        ShardWalk {
            resets: shard.resets,
            seq: shard.first_seq,
            off: shard.head,
            end_seq: shard.first_seq.wrapping_add(n.saturating_sub(1)),
            end_off: shard.blocks.back().map_or(0, Vec::len),
            done: n == 0,
        }
    }

    /// Calls `emit` with each live entry (header included) of up to `budget` more arena bytes.
    /// False once the walk is over.
    fn step(&mut self, shard: &Shard, budget: usize, mut emit: impl FnMut(&[u8])) -> bool {
        if self.done || shard.resets != self.resets || before(self.end_seq, shard.first_seq) {
            self.done = true;
            return false;
        }
        if before(self.seq, shard.first_seq)
            || (self.seq == shard.first_seq && self.off < shard.head)
        {
            self.seq = shard.first_seq;
            self.off = shard.head;
        }
        let mut scanned = 0;
        loop {
            let idx = self.seq.wrapping_sub(shard.first_seq) as usize;
            let Some(block) = shard.blocks.get(idx) else {
                self.done = true;
                return false;
            };
            let end = if self.seq == self.end_seq {
                self.end_off.min(block.len())
            } else {
                block.len()
            };
            if self.off >= end {
                if self.seq == self.end_seq {
                    self.done = true;
                    return false;
                }
                self.seq = self.seq.wrapping_add(1);
                self.off = 0;
                continue;
            }
            if scanned >= budget {
                return true;
            }
            let e = &block[self.off..];
            let len = rd_u32(e, H_LEN) as usize;
            if shard.find(rd_u64(e, H_KEY)) == Some(handle(self.seq, self.off)) {
                emit(&e[..len]);
            }
            self.off += len;
            scanned += len;
        }
    }
}

/// Appends the arena entry `e` (header included) to `out` in the snapshot's encoding, stored at
/// `stored_wall` (ms since the Unix epoch).
fn encode(out: &mut Vec<u8>, e: &[u8], stored_wall: u64) {
    let wire_len = rd_u16(e, H_WIRE) as usize;
    let offsets = &e[HDR + wire_len..];
    out.extend_from_slice(&stored_wall.to_le_bytes());
    out.extend_from_slice(&rd_u32(e, H_TTL).to_le_bytes());
    out.extend_from_slice(&rd_u32(e, H_STALE).to_le_bytes());
    out.extend_from_slice(&rd_u16(e, H_ZONE).to_le_bytes());
    out.push(e[H_FLAGS]);
    out.push(e[H_KIND]);
    out.extend_from_slice(&(wire_len as u16).to_le_bytes());
    out.extend_from_slice(&((offsets.len() / 2) as u16).to_le_bytes());
    out.extend_from_slice(&e[HDR..HDR + wire_len]);
    for o in offsets.chunks_exact(2) {
        out.extend_from_slice(&rd_u16(o, 0).to_le_bytes());
    }
}

/// An entry of a verified snapshot, ready to insert.
struct Loadable {
    key: u64,
    /// Store time in this cache's terms (ms since its epoch).
    stored_ms: u64,
    /// The shard of `key`.
    shard: u32,
    /// Where the entry starts: its chunk, and its offset in that chunk.
    chunk: u32,
    at: u32,
}

/// A snapshot read in full and checksummed, its entries not yet validated.
struct Raw {
    created_ms: u64,
    /// Every chunk's entry bytes and number of entries.
    chunks: Vec<(Vec<u8>, u32)>,
    entries: u64,
    bytes: u64,
}

/// Fills `buf` from `r` until full or end of stream; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize, SnapshotError> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SnapshotError::Io(e)),
        }
    }
    Ok(n)
}

/// Reads a whole snapshot (up to its trailer, no further) of at most `limit` bytes and checks
/// magic, version and checksums.
fn read_raw(r: &mut impl Read, limit: u64) -> Result<Raw, SnapshotError> {
    let mut header = [0u8; HEADER];
    let n = read_full(r, &mut header)?;
    let magic = n.min(MAGIC.len());
    if header[..magic] != MAGIC[..magic] {
        return Err(SnapshotError::Foreign);
    }
    if n < 12 {
        return Err(SnapshotError::Truncated);
    }
    let version = le_u32(&header, 8);
    if version != VERSION {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    if n < HEADER {
        return Err(SnapshotError::Truncated);
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    let mut bytes = HEADER as u64;
    let mut chunks = Vec::new();
    let mut entries = 0u64;
    loop {
        let mut h = [0u8; CHUNK_HEADER];
        r.read_exact(&mut h).map_err(read_err)?;
        crc.update(&h);
        if crc32fast::hash(&h[..8]) != le_u32(&h, 8) {
            return Err(SnapshotError::ChecksumMismatch);
        }
        let (len, count) = (le_u32(&h, 0) as usize, le_u32(&h, 4));
        bytes += CHUNK_HEADER as u64;
        if len == 0 && count == 0 {
            break;
        }
        bytes += len as u64;
        if bytes + TRAILER as u64 > limit {
            return Err(SnapshotError::TooLarge { limit });
        }
        let mut body = Vec::with_capacity(len);
        r.take(len as u64)
            .read_to_end(&mut body)
            .map_err(read_err)?;
        if body.len() < len {
            return Err(SnapshotError::Truncated);
        }
        crc.update(&body);
        chunks.push((body, count));
        entries += count as u64;
    }
    let mut t = [0u8; TRAILER];
    r.read_exact(&mut t).map_err(read_err)?;
    crc.update(&t[..8]);
    if crc.finalize() != le_u32(&t, 8) {
        return Err(SnapshotError::ChecksumMismatch);
    }
    if le_u64(&t, 0) != entries {
        return Err(SnapshotError::MalformedEntry {
            index: entries,
            reason: "the trailer's entry count differs from the chunks'",
        });
    }
    Ok(Raw {
        created_ms: le_u64(&header, 12),
        chunks,
        entries,
        bytes: bytes + TRAILER as u64,
    })
}

/// Checks one entry's fields and wire (`e` starts at the entry and runs to its chunk's end);
/// returns its encoded length.
fn validate(e: &[u8], created_ms: u64) -> Result<usize, &'static str> {
    if e.len() < ENTRY_FIXED {
        return Err("runs past the end of its chunk");
    }
    let (stored, ttl, stale) = (le_u64(e, 0), le_u32(e, 8), le_u32(e, 12));
    let (flags, kind) = (e[18], e[19]);
    let (wire_len, n_offsets) = (le_u16(e, 20) as usize, le_u16(e, 22) as usize);
    let len = ENTRY_FIXED + wire_len + 2 * n_offsets;
    if e.len() < len {
        return Err("runs past the end of its chunk");
    }
    if flags & !KEY_FLAGS_MASK != 0 {
        return Err("key flags out of range");
    }
    let Some(kind) = kind_from_snapshot(kind) else {
        return Err("answer kind out of range");
    };
    if stale < ttl {
        return Err("stale window shorter than the lifetime");
    }
    if stored > created_ms {
        return Err("stored after the snapshot was written");
    }
    let wire = &e[ENTRY_FIXED..ENTRY_FIXED + wire_len];
    let qname_end = dns::skip_name(wire, DNS_HEADER).ok_or("no question")?;
    let question = wire.get(DNS_HEADER..qname_end + 4).ok_or("no question")?;
    if question[..question.len() - 4]
        .iter()
        .any(u8::is_ascii_uppercase)
    {
        return Err("question not lowercase");
    }
    let resp = dns::parse_response(wire, question).map_err(|_| "wire is not a DNS response")?;
    if resp.wire.len() != wire.len() {
        return Err("wire has an OPT record or bytes after its records");
    }
    if resp.truncated {
        return Err("truncated answer");
    }
    if resp.kind != kind {
        return Err("answer kind does not match the wire");
    }
    let offsets = &e[ENTRY_FIXED + wire_len..len];
    if resp.ttl_offsets.len() != n_offsets
        || resp
            .ttl_offsets
            .iter()
            .zip(offsets.chunks_exact(2))
            .any(|(&o, b)| o != le_u16(b, 0))
    {
        return Err("TTL offsets do not match the records");
    }
    Ok(len)
}

/// The kinds a cache holds (never `Other`: such answers are relayed, not cached).
fn kind_from_snapshot(v: u8) -> Option<AnswerKind> {
    [
        AnswerKind::Positive,
        AnswerKind::NxDomain,
        AnswerKind::NoData,
        AnswerKind::ServFail,
    ]
    .into_iter()
    .find(|&k| kind_to_u8(k) == v)
}

impl Cache {
    /// The largest snapshot this cache loads: twice its byte budget (an entry takes fewer bytes
    /// in a snapshot than in the arena, so a full cache of the same size fits with room for one
    /// twice as large), plus 1 MiB.
    pub fn snapshot_limit(&self) -> u64 {
        let budget = (self.max_bytes_per_shard * self.shards.len()) as u64;
        2 * budget + (1 << 20)
    }

    /// Writes every entry whose stale horizon is after `now` to `w` (see the module doc for the
    /// format); `now_wall` is the wall-clock time of `now`, which turns store times absolute.
    ///
    /// Each shard's arena is walked in insertion order under its read lock, 32 KiB of arena per
    /// hold (a few microseconds: lookups never wait for it, an insert on that shard at most one
    /// step), and the encoded entries are written with no lock held, in chunks of about 1 MiB
    /// (buffering is the caller's). Not a point-in-time image: entries inserted into a shard
    /// after its walk began are left out, entries removed before the walk reached them too.
    pub fn write_snapshot(
        &self,
        w: &mut impl Write,
        now: Instant,
        now_wall: SystemTime,
    ) -> io::Result<SnapshotStats> {
        let now_ms = self.ms(now);
        let wall_ms = unix_ms(now_wall);
        let mut out = Summed {
            w,
            crc: crc32fast::Hasher::new(),
            bytes: 0,
        };
        let mut header = [0u8; HEADER];
        header[..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..20].copy_from_slice(&wall_ms.to_le_bytes());
        out.put(&header)?;
        let mut chunk = Vec::with_capacity(CHUNK_TARGET + (64 << 10));
        let mut in_chunk = 0u32;
        let mut entries = 0u64;
        for s in 0..self.shards.len() {
            let mut walk = self.read(s, ShardWalk::new);
            loop {
                // Entries are encoded under the lock (a copy each), written out without it.
                let more = self.read(s, |shard| {
                    walk.step(shard, WALK_STEP, |e| {
                        let stored = rd_u64(e, H_STORED);
                        if stored + rd_u32(e, H_STALE) as u64 * 1000 <= now_ms {
                            return;
                        }
                        encode(
                            &mut chunk,
                            e,
                            wall_ms.saturating_sub(now_ms.saturating_sub(stored)),
                        );
                        in_chunk += 1;
                    })
                });
                if chunk.len() >= CHUNK_TARGET {
                    out.chunk(in_chunk, &chunk)?;
                    entries += in_chunk as u64;
                    chunk.clear();
                    in_chunk = 0;
                }
                if !more {
                    break;
                }
            }
        }
        if in_chunk > 0 {
            out.chunk(in_chunk, &chunk)?;
            entries += in_chunk as u64;
        }
        out.chunk(0, &[])?;
        out.put(&entries.to_le_bytes())?;
        let crc = out.crc.clone().finalize();
        out.bytes += 4;
        out.w.write_all(&crc.to_le_bytes())?;
        Ok(SnapshotStats {
            entries,
            bytes: out.bytes,
        })
    }

    /// Reads a snapshot from `r` (up to its trailer: a stream need not end there) and, once the
    /// whole of it verified, inserts its entries: each keeps its absolute expiry; entries past
    /// their stale horizon, or with a zone index not below `zones`, are dropped and counted.
    /// `now_wall` is the wall-clock time of `now`. On error nothing was inserted.
    pub fn load_snapshot(
        &self,
        r: &mut impl Read,
        now: Instant,
        now_wall: SystemTime,
        zones: usize,
    ) -> Result<LoadStats, SnapshotError> {
        let raw = read_raw(r, self.snapshot_limit())?;
        self.insert_raw(raw, now, now_wall, zones)
    }

    /// Validates every entry of `raw` (nothing is inserted unless all pass), then inserts.
    fn insert_raw(
        &self,
        raw: Raw,
        now: Instant,
        now_wall: SystemTime,
        zones: usize,
    ) -> Result<LoadStats, SnapshotError> {
        let now_ms = self.ms(now);
        // Ages run from the later of now and the snapshot's creation: a wall clock set back
        // since never makes an entry younger than it was when written.
        let wall_ms = unix_ms(now_wall).max(raw.created_ms);
        let mut stats = LoadStats {
            entries: raw.entries,
            loaded: 0,
            expired: 0,
            unknown_zone: 0,
            oversized: 0,
            bytes: raw.bytes,
            created: UNIX_EPOCH + Duration::from_millis(raw.created_ms),
        };
        let bytes: u64 = raw.chunks.iter().map(|c| c.0.len() as u64).sum();
        let mut keep = Vec::with_capacity(raw.entries.min(bytes / ENTRY_FIXED as u64) as usize);
        let mut index = 0u64;
        for (chunk, (body, count)) in raw.chunks.iter().enumerate() {
            let mut at = 0;
            for _ in 0..*count {
                let e = &body[at..];
                let len = validate(e, raw.created_ms)
                    .map_err(|reason| SnapshotError::MalformedEntry { index, reason })?;
                let (stored, stale) = (le_u64(e, 0), le_u32(e, 12) as u64);
                let age = wall_ms - stored;
                if age >= stale * 1000 || age > now_ms {
                    stats.expired += 1;
                } else if le_u16(e, 16) as usize >= zones {
                    stats.unknown_zone += 1;
                } else {
                    let wire_len = le_u16(e, 20) as usize;
                    let wire = &e[ENTRY_FIXED..ENTRY_FIXED + wire_len];
                    let qend = dns::skip_name(wire, DNS_HEADER).expect("validated") + 4;
                    let key = self.key(&wire[DNS_HEADER..qend], e[18]);
                    keep.push(Loadable {
                        key,
                        stored_ms: now_ms - age,
                        shard: self.shard_index(key) as u32,
                        chunk: chunk as u32,
                        at: at as u32,
                    });
                }
                at += len;
                index += 1;
            }
            if at != body.len() {
                return Err(SnapshotError::MalformedEntry {
                    index,
                    reason: "bytes after the last entry of a chunk",
                });
            }
        }
        // Per shard, oldest first: the arena's order is the eviction order, so when this cache is
        // smaller than the snapshot its bounds drop the oldest entries.
        keep.sort_unstable_by_key(|l| (l.shard, l.stored_ms, l.chunk, l.at));
        for group in keep.chunk_by(|a, b| a.shard == b.shard) {
            let shard = self.shard(group[0].key);
            for (i, batch) in group.chunks(LOAD_BATCH).enumerate() {
                self.write(shard, |shard| {
                    if i == 0 {
                        // Grow the table once rather than rehashing as it fills.
                        let room = self.max_entries_per_shard.saturating_sub(shard.table.len());
                        let (blocks, first) = (&shard.blocks, shard.first_seq);
                        shard.table.reserve(group.len().min(room), |&h| {
                            rd_u64(entry_at(blocks, first, h), H_KEY)
                        });
                    }
                    for l in batch {
                        let e = &raw.chunks[l.chunk as usize].0[l.at as usize..];
                        let wire_len = le_u16(e, 20) as usize;
                        let n_offsets = le_u16(e, 22) as usize;
                        let offs =
                            &e[ENTRY_FIXED + wire_len..ENTRY_FIXED + wire_len + 2 * n_offsets];
                        let parts = Parts {
                            stored_ms: l.stored_ms,
                            ttl: le_u32(e, 8),
                            stale: le_u32(e, 12),
                            zone: le_u16(e, 16),
                            key_flags: e[18],
                            kind: e[19],
                            wire: &e[ENTRY_FIXED..ENTRY_FIXED + wire_len],
                            offsets: offs.chunks_exact(2).map(|b| le_u16(b, 0)),
                            n_offsets,
                        };
                        if parts.charge() > self.max_bytes_per_shard {
                            stats.oversized += 1;
                            continue;
                        }
                        self.append(shard, l.key, parts, now_ms);
                        stats.loaded += 1;
                    }
                });
            }
        }
        self.counters
            .inserts
            .fetch_add(stats.loaded, Ordering::Relaxed);
        Ok(stats)
    }
}

/// Distinguishes the temporary files of concurrent writers in one process.
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `cache`'s snapshot to `path` atomically: into a temporary file (mode 0600) in the same
/// directory, fsynced, then renamed over `path`, and the directory fsynced, so `path` always
/// holds a whole snapshot (the previous one until the rename). The temporary file is removed on
/// error.
pub fn write_snapshot_file(
    cache: &Cache,
    path: &Path,
    now: Instant,
    now_wall: SystemTime,
) -> io::Result<SnapshotStats> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "snapshot path names no file")
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp: PathBuf = dir.join(tmp_name);
    let written = (|| {
        use std::os::unix::fs::OpenOptionsExt;
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut w = BufWriter::with_capacity(256 << 10, file);
        let stats = cache.write_snapshot(&mut w, now, now_wall)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(stats)
    })();
    match written {
        Ok(stats) => {
            // The rename is durable once the directory is.
            fs::File::open(dir)?.sync_all()?;
            Ok(stats)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Loads the snapshot at `path` into `cache` (see [`Cache::load_snapshot`]). `Ok(None)` when there
/// is no file (a cold start, not an error). The file must end at the snapshot's trailer; one
/// larger than [`Cache::snapshot_limit`] is refused before it is read.
pub fn load_snapshot_file(
    cache: &Cache,
    path: &Path,
    now: Instant,
    now_wall: SystemTime,
    zones: usize,
) -> Result<Option<LoadStats>, SnapshotError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(SnapshotError::Io(e)),
    };
    let limit = cache.snapshot_limit();
    if file.metadata().map_err(SnapshotError::Io)?.len() > limit {
        return Err(SnapshotError::TooLarge { limit });
    }
    let mut r = BufReader::with_capacity(256 << 10, file);
    let raw = read_raw(&mut r, limit)?;
    if read_full(&mut r, &mut [0u8; 1])? != 0 {
        return Err(SnapshotError::TrailingBytes);
    }
    cache.insert_raw(raw, now, now_wall, zones).map(Some)
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::cache::{CacheConfig, Entry};
    use crate::dns::{parse_query, parse_response, Query};

    fn cache(max_bytes: usize, shards: usize) -> Cache {
        Cache::new(&CacheConfig {
            max_entries: 100_000,
            max_bytes,
            shards,
        })
    }

    fn question(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = dns::name_from_str(name).expect("name");
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    fn query_packet(name: &str, qtype: u16, dnssec_ok: bool) -> Vec<u8> {
        let mut p = vec![0xAB, 0xCD, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        p.extend_from_slice(&question(name, qtype));
        if dnssec_ok {
            p[11] = 1;
            dns::push_opt(&mut p, 1232, true, 0);
        }
        p
    }

    /// An upstream reply (with an OPT record, as upstreams send them), walked by
    /// `parse_response` into an entry: `rcode` 0 with `addr` Some is a positive answer (one A
    /// record), 0 with None NODATA and 3 NXDOMAIN (both with an SOA in authority).
    fn entry(
        name: &str,
        rcode: u8,
        addr: Option<[u8; 4]>,
        ttl: u32,
        key_flags: u8,
        zone: u16,
        stored: Instant,
    ) -> (Vec<u8>, Entry) {
        let q = question(name, 1);
        let mut w = vec![0x12, 0x34, 0x81, 0x80 | rcode, 0, 1, 0, 0, 0, 0, 0, 1];
        w.extend_from_slice(&q);
        if let Some(a) = addr {
            w[7] = 1;
            w.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
            w.extend_from_slice(&ttl.to_be_bytes());
            w.extend_from_slice(&[0, 4]);
            w.extend_from_slice(&a);
        } else {
            w[9] = 1;
            w.extend_from_slice(&[0xC0, 12, 0, 6, 0, 1]);
            w.extend_from_slice(&ttl.to_be_bytes());
            let mut rdata = vec![0u8, 0u8];
            for v in [1u32, 7200, 1800, 86400, ttl] {
                rdata.extend_from_slice(&v.to_be_bytes());
            }
            w.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            w.extend_from_slice(&rdata);
        }
        dns::push_opt(&mut w, 1232, key_flags & 1 != 0, 0);
        let resp = parse_response(&w, &q).expect("valid reply");
        let e = Entry::new(
            resp.wire,
            resp.ttl_offsets,
            key_flags,
            resp.kind,
            zone,
            stored,
            Duration::from_secs(ttl as u64),
        );
        (q, e)
    }

    fn put(c: &Cache, (q, e): (Vec<u8>, Entry)) {
        let key = c.key(&q, e.key_flags);
        assert!(c.insert(key, e));
    }

    /// Looks `name` (type A) up; the rendered reply and the entry's age, kind and zone.
    fn hit(
        c: &Cache,
        name: &str,
        dnssec_ok: bool,
        now: Instant,
    ) -> Option<(Vec<u8>, u32, AnswerKind, u16)> {
        let p = query_packet(name, 1, dnssec_ok);
        let q: Query = parse_query(&p).expect("query");
        let key = c.key(q.question_lower(), q.key_flags());
        c.lookup(key, &q, now, |e, age| {
            let mut out = Vec::new();
            e.render(&q, &p, age, 65535, 1232, &mut out);
            (out, age, e.kind, e.zone)
        })
    }

    /// The first TTL of a rendered reply (its first record after the question, no OPT).
    fn first_ttl(reply: &[u8], name: &str) -> u32 {
        dns::u32_at(reply, DNS_HEADER + question(name, 1).len() + 6)
    }

    /// A small snapshot of two entries, with the wall time it was written at.
    fn small_snapshot() -> (Vec<u8>, Instant, SystemTime) {
        let c = cache(1 << 20, 1);
        let t = Instant::now();
        put(&c, entry("a.example", 0, Some([10, 0, 0, 1]), 30, 0, 0, t));
        put(&c, entry("nx.example", 3, None, 30, 0, 0, t));
        let wall = SystemTime::now();
        let mut buf = Vec::new();
        let stats = c.write_snapshot(&mut buf, t, wall).unwrap();
        assert_eq!(stats.entries, 2);
        assert_eq!(stats.bytes, buf.len() as u64);
        (buf, t, wall)
    }

    /// Recomputes every chunk CRC and the trailer's CRC after a test edited entry bytes.
    fn reseal(buf: &mut [u8]) {
        let mut at = HEADER;
        loop {
            let len = le_u32(buf, at) as usize;
            let count = le_u32(buf, at + 4);
            let crc = crc32fast::hash(&buf[at..at + 8]);
            buf[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
            at += CHUNK_HEADER + len;
            if len == 0 && count == 0 {
                break;
            }
        }
        let crc = crc32fast::hash(&buf[..at + 8]);
        buf[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
    }

    fn load(
        c: &Cache,
        buf: &[u8],
        t: Instant,
        wall: SystemTime,
    ) -> Result<LoadStats, SnapshotError> {
        c.load_snapshot(&mut Cursor::new(buf), t, wall, 8)
    }

    #[test]
    fn round_trip_keeps_answers_ages_and_absolute_expiry() {
        let old = cache(1 << 20, 4);
        let t = Instant::now();
        let s = |n| Duration::from_secs(n);
        put(
            &old,
            entry("pos.example", 0, Some([10, 0, 0, 1]), 30, 0, 1, t),
        );
        put(
            &old,
            entry("pos.example", 0, Some([10, 0, 0, 2]), 30, 1, 1, t),
        );
        put(&old, entry("nx.example", 3, None, 30, 0, 0, t));
        put(&old, entry("nodata.example", 0, None, 30, 2, 0, t + s(5)));
        put(
            &old,
            entry("gone.example", 0, Some([1, 1, 1, 1]), 5, 0, 0, t),
        );
        put(
            &old,
            entry("ends.example", 0, Some([1, 1, 1, 2]), 11, 0, 0, t),
        );
        put(
            &old,
            entry("zone9.example", 0, Some([1, 1, 1, 3]), 30, 0, 9, t),
        );
        let (q, mut stale) = entry("stale.example", 0, Some([1, 1, 1, 4]), 5, 0, 0, t);
        stale.stale = 60;
        put(&old, (q, stale));

        // Written 10 s after the store; "gone" is past its stale horizon already.
        let wall = SystemTime::now();
        let mut buf = Vec::new();
        let w = old.write_snapshot(&mut buf, t + s(10), wall).unwrap();
        assert_eq!(w.entries, 7);

        // Loaded 2 s later (wall clock) into a new cache: another hasher seed, another epoch.
        let new = cache(1 << 20, 8);
        let now = Instant::now();
        let l = new
            .load_snapshot(&mut Cursor::new(&buf), now, wall + s(2), 2)
            .unwrap();
        assert_eq!(
            (l.entries, l.loaded, l.expired, l.unknown_zone, l.oversized),
            (7, 5, 1, 1, 0),
            "{l:?}"
        );
        assert_eq!(l.bytes, buf.len() as u64);
        assert_eq!(unix_ms(l.created), unix_ms(wall));
        assert_eq!(new.len(), 5, "the stale entry is kept");

        let (r, age, kind, zone) = hit(&new, "pos.example", false, now).expect("pos");
        assert_eq!((age, kind, zone), (12, AnswerKind::Positive, 1));
        assert_eq!(&r[r.len() - 4..], &[10, 0, 0, 1]);
        assert_eq!(first_ttl(&r, "pos.example"), 18);
        let (r, ..) = hit(&new, "pos.example", true, now).expect("DO=1 answer");
        assert_eq!(&r[r.len() - 4 - OPT..r.len() - OPT], &[10, 0, 0, 2]);
        let (r, age, kind, _) = hit(&new, "nx.example", false, now).expect("nx");
        assert_eq!((age, kind), (12, AnswerKind::NxDomain));
        assert_eq!(r[3] & 0xF, 3);
        assert_eq!(first_ttl(&r, "nx.example"), 18);
        // Stored with CD=1 (key flags 2): a plain query misses, as it would have before.
        assert!(hit(&new, "nodata.example", false, now).is_none());
        assert!(
            hit(&new, "stale.example", false, now).is_none(),
            "past its TTL"
        );
        // Absolute expiry: 30 s after the store, 18 s from now.
        assert!(hit(&new, "pos.example", false, now + s(17)).is_some());
        assert!(hit(&new, "pos.example", false, now + s(18)).is_none());

        // A wall clock set back since the write never makes an entry younger.
        let back = cache(1 << 20, 1);
        back.load_snapshot(&mut Cursor::new(&buf), now, wall - s(100), 2)
            .unwrap();
        let (_, age, ..) = hit(&back, "pos.example", false, now).expect("pos");
        assert_eq!(age, 10);

        // Snapshot of the loaded cache: the same entries, absolute times unchanged.
        let mut again = Vec::new();
        let w2 = new.write_snapshot(&mut again, now, wall + s(2)).unwrap();
        assert_eq!(w2.entries, 5);
        let third = cache(1 << 20, 2);
        third
            .load_snapshot(&mut Cursor::new(&again), now, wall + s(2), 2)
            .unwrap();
        let (_, age, ..) = hit(&third, "nx.example", false, now).expect("nx");
        assert_eq!(age, 12);
    }

    const OPT: usize = dns::OPT_LEN;

    #[test]
    fn stream_is_read_up_to_its_trailer_only() {
        let (buf, t, wall) = small_snapshot();
        let mut stream = buf.clone();
        stream.extend_from_slice(b"next message");
        let mut r = Cursor::new(&stream);
        let c = cache(1 << 20, 2);
        let l = c.load_snapshot(&mut r, t, wall, 1).unwrap();
        assert_eq!(l.loaded, 2);
        assert_eq!(r.position(), buf.len() as u64);
    }

    #[test]
    fn empty_cache_round_trips() {
        let c = cache(1 << 20, 4);
        let mut buf = Vec::new();
        let w = c
            .write_snapshot(&mut buf, Instant::now(), SystemTime::now())
            .unwrap();
        assert_eq!((w.entries, w.bytes), (0, 44));
        let l = load(&cache(1 << 20, 1), &buf, Instant::now(), SystemTime::now()).unwrap();
        assert_eq!((l.entries, l.loaded), (0, 0));
    }

    #[test]
    fn every_truncation_is_refused() {
        let (buf, t, wall) = small_snapshot();
        let c = cache(1 << 20, 2);
        for n in 0..buf.len() {
            let err = load(&c, &buf[..n], t, wall).unwrap_err();
            assert!(matches!(err, SnapshotError::Truncated), "{n}: {err}");
            assert_eq!(err.label(), "truncated");
        }
        assert!(c.is_empty());
        load(&c, &buf, t, wall).unwrap();
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let (buf, t, wall) = small_snapshot();
        let c = cache(1 << 20, 2);
        for at in 0..buf.len() {
            for bit in 0..8 {
                let mut b = buf.clone();
                b[at] ^= 1 << bit;
                let err = load(&c, &b, t, wall).unwrap_err();
                let ok = match at {
                    0..8 => matches!(err, SnapshotError::Foreign),
                    8..12 => matches!(err, SnapshotError::UnsupportedVersion(v) if v != VERSION),
                    _ => matches!(err, SnapshotError::ChecksumMismatch),
                };
                assert!(ok, "byte {at} bit {bit}: {err}");
            }
        }
        assert!(c.is_empty());
    }

    #[test]
    fn foreign_future_and_oversized_snapshots_are_refused() {
        let (buf, t, wall) = small_snapshot();
        let c = cache(1 << 20, 2);
        let err = load(&c, b"GIF89a, not a snapshot at all", t, wall).unwrap_err();
        assert!(matches!(err, SnapshotError::Foreign));
        assert_eq!(err.label(), "foreign");
        assert!(matches!(
            load(&c, b"NDNS", t, wall),
            Err(SnapshotError::Truncated)
        ));

        let mut next = buf.clone();
        next[8..12].copy_from_slice(&(VERSION + 1).to_le_bytes());
        reseal(&mut next);
        let err = load(&c, &next, t, wall).unwrap_err();
        assert!(matches!(err, SnapshotError::UnsupportedVersion(2)), "{err}");
        assert_eq!(err.label(), "unsupported_version");
        assert!(err.to_string().contains("version 2"));

        // A full cache's snapshot into a cache with a far smaller budget.
        let big = cache(8 << 20, 4);
        let now = Instant::now();
        for i in 0..20_000u32 {
            let name = format!("n{i}.example");
            put(&big, entry(&name, 0, Some(i.to_be_bytes()), 30, 0, 0, now));
        }
        let mut huge = Vec::new();
        big.write_snapshot(&mut huge, now, wall).unwrap();
        assert!(huge.len() > CHUNK_TARGET, "more than one chunk");
        let same = cache(8 << 20, 2);
        assert_eq!(load(&same, &huge, now, wall).unwrap().loaded, 20_000);
        let (r, ..) = hit(&same, "n19999.example", false, now).expect("last entry");
        assert_eq!(&r[r.len() - 4..], &19_999u32.to_be_bytes());
        let small = cache(64 << 10, 1);
        assert!(huge.len() as u64 > small.snapshot_limit());
        let err = load(&small, &huge, now, wall).unwrap_err();
        assert!(matches!(err, SnapshotError::TooLarge { .. }), "{err}");
        assert_eq!(err.label(), "too_large");

        // A hostile chunk length with a valid chunk CRC is refused before anything is read.
        let mut hostile = buf[..HEADER].to_vec();
        let mut h = [0u8; CHUNK_HEADER];
        h[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&h[..8]);
        h[8..].copy_from_slice(&crc.to_le_bytes());
        hostile.extend_from_slice(&h);
        assert!(matches!(
            load(&small, &hostile, now, wall),
            Err(SnapshotError::TooLarge { .. })
        ));
        assert!(c.is_empty() && small.is_empty());
    }

    /// Entries whose checksums hold but whose contents do not: each refused with its index and
    /// reason, and nothing of the snapshot inserted (the first entry is sound).
    #[test]
    fn malformed_entries_are_refused_whole() {
        let (buf, t, wall) = small_snapshot();
        // One shard: the entries are in insertion order, the second is the NXDOMAIN.
        // The second entry starts after the first (fixed part + wire + offsets).
        let first = HEADER + CHUNK_HEADER;
        let second = first
            + ENTRY_FIXED
            + le_u16(&buf, first + 20) as usize
            + 2 * le_u16(&buf, first + 22) as usize;
        let wire = second + ENTRY_FIXED;
        type Edit<'a> = Box<dyn Fn(&mut Vec<u8>) + 'a>;
        let cases: Vec<(&str, Edit)> = vec![
            ("key flags out of range", Box::new(|b| b[second + 18] = 4)),
            ("answer kind out of range", Box::new(|b| b[second + 19] = 4)),
            (
                "answer kind does not match the wire",
                Box::new(|b| b[second + 19] = 2),
            ),
            (
                "stale window shorter than the lifetime",
                Box::new(|b| b[second + 12] = 0),
            ),
            (
                "stored after the snapshot was written",
                Box::new(|b| b[second + 7] = 0x7F),
            ),
            ("question not lowercase", Box::new(|b| b[wire + 13] = b'N')),
            (
                "wire is not a DNS response",
                Box::new(|b| b[wire + 2] &= 0x7F),
            ),
            ("truncated answer", Box::new(|b| b[wire + 2] |= 0x02)),
            (
                "TTL offsets do not match the records",
                Box::new(|b| {
                    let n = b.len() - CHUNK_HEADER - TRAILER - 2;
                    b[n] ^= 1;
                }),
            ),
            ("no question", Box::new(|b| b[wire + 12] = 63)),
            (
                "wire has an OPT record or bytes after its records",
                Box::new(|b| {
                    // One more wire byte, taken from the TTL offsets' room: the offsets then run
                    // past the chunk, so the entry is also too long for it.
                    let len = le_u16(b, second + 20) + 1;
                    b[second + 20..second + 22].copy_from_slice(&len.to_le_bytes());
                    let n = le_u16(b, second + 22) - 1;
                    b[second + 22..second + 24].copy_from_slice(&n.to_le_bytes());
                }),
            ),
            (
                "runs past the end of its chunk",
                Box::new(|b| {
                    let n = le_u16(b, second + 22) + 1;
                    b[second + 22..second + 24].copy_from_slice(&n.to_le_bytes());
                }),
            ),
        ];
        let c = cache(1 << 20, 2);
        for (reason, edit) in cases {
            let mut b = buf.clone();
            edit(&mut b);
            reseal(&mut b);
            match load(&c, &b, t, wall) {
                Err(SnapshotError::MalformedEntry { index, reason: r }) => {
                    assert_eq!((index, r), (1, reason))
                }
                other => panic!("{reason}: {other:?}"),
            }
            assert!(c.is_empty(), "{reason}: nothing inserted");
        }
    }

    #[test]
    fn file_is_written_atomically_and_loaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.snapshot");
        let c = cache(1 << 20, 2);
        let none = load_snapshot_file(&c, &path, Instant::now(), SystemTime::now(), 1).unwrap();
        assert!(none.is_none(), "no file: a cold start");

        let t = Instant::now();
        put(&c, entry("a.example", 0, Some([10, 0, 0, 1]), 30, 0, 0, t));
        let wall = SystemTime::now();
        let w = write_snapshot_file(&c, &path, t, wall).unwrap();
        assert_eq!(w.entries, 1);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), w.bytes);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Written again over the old one; no temporary file left behind.
        put(&c, entry("b.example", 0, Some([10, 0, 0, 2]), 30, 0, 0, t));
        assert_eq!(write_snapshot_file(&c, &path, t, wall).unwrap().entries, 2);
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);

        let fresh = cache(1 << 20, 2);
        let l = load_snapshot_file(&fresh, &path, t, wall, 1)
            .unwrap()
            .expect("loaded");
        assert_eq!(l.loaded, 2);
        assert!(hit(&fresh, "b.example", false, t).is_some());

        // Bytes after the trailer: a damaged file, refused whole.
        let mut b = fs::read(&path).unwrap();
        b.push(0);
        fs::write(&path, &b).unwrap();
        let other = cache(1 << 20, 2);
        let err = load_snapshot_file(&other, &path, t, wall, 1).unwrap_err();
        assert!(matches!(err, SnapshotError::TrailingBytes), "{err}");
        assert!(other.is_empty());
        // A file over the limit is refused by its size, before it is read.
        let small = cache(64 << 10, 1);
        let big = fs::File::create(&path).unwrap();
        big.set_len(small.snapshot_limit() + 1).unwrap();
        let err = load_snapshot_file(&small, &path, t, wall, 1).unwrap_err();
        assert!(matches!(err, SnapshotError::TooLarge { .. }), "{err}");
        // Not a file at all: an I/O error with its own label.
        let err = load_snapshot_file(&small, dir.path(), t, wall, 1).unwrap_err();
        assert_eq!(err.label(), "io", "{err}");
        assert!(small.is_empty());
        // A path whose directory is missing: an I/O error, not a panic.
        let err = write_snapshot_file(&c, &dir.path().join("no/such"), t, wall).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// A walk one entry per step, with inserts (new names and replacements), evictions and
    /// purges between steps: every entry it yields is whole and was live when taken, no name
    /// twice; an arena emptied in place ends it.
    #[test]
    fn walk_survives_changes_between_steps() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (mut resets, mut freed) = (0, 0);
        for round in 0..50 {
            let c = Cache::new(&CacheConfig {
                max_entries: 60,
                max_bytes: 4000,
                shards: 1,
            });
            let lock = 0;
            let mut t = Instant::now();
            let put_name = |c: &Cache, i: u32, t: Instant, ttl: u32| {
                let name = format!("n{i}.example");
                put(c, entry(&name, 0, Some([round, 0, 0, 1]), ttl, 0, 0, t));
            };
            for i in 0..rng.random_range(0..80) {
                put_name(&c, i, t, rng.random_range(1..30));
            }
            let mut walk = c.read(lock, ShardWalk::new);
            let start = walk.seq;
            let mut seen = std::collections::HashSet::new();
            loop {
                let mut got = Vec::new();
                let more = c.read(lock, |sh| {
                    walk.step(sh, 1, |e| {
                        // Live when taken: the table points at it.
                        assert_eq!(
                            sh.find(rd_u64(e, H_KEY)).map(|h| sh.entry(h).as_ptr()),
                            Some(e.as_ptr())
                        );
                        got.push(e.to_vec());
                    })
                });
                assert!(got.len() <= 1);
                for e in got {
                    // Whole: its key is the hash of its own question.
                    let wire = &e[HDR..HDR + rd_u16(&e, H_WIRE) as usize];
                    let qend = dns::skip_name(wire, DNS_HEADER).unwrap() + 4;
                    let key = c.key(&wire[DNS_HEADER..qend], e[H_FLAGS]);
                    assert_eq!(key, rd_u64(&e, H_KEY));
                    assert!(seen.insert(key), "round {round}: a name twice");
                }
                if !more {
                    break;
                }
                match rng.random_range(0..10) {
                    0..=5 => put_name(&c, rng.random_range(0..120), t, rng.random_range(1..30)),
                    6 => {
                        t += Duration::from_secs(rng.random_range(0..20));
                        c.purge_expired(t);
                    }
                    _ => {}
                }
            }
            c.read(lock, |sh| {
                resets += usize::from(sh.resets != walk.resets);
                freed += usize::from(before(start, sh.first_seq));
            });
        }
        assert!(
            resets > 0 && freed > 0,
            "{resets} resets, {freed} with blocks freed"
        );
        // Emptied in place mid-walk: the walk ends, nothing of the new arena is taken.
        let c = cache(1 << 20, 1);
        let lock = 0;
        let t = Instant::now();
        put(&c, entry("a.example", 0, Some([1, 1, 1, 1]), 5, 0, 0, t));
        put(&c, entry("b.example", 0, Some([1, 1, 1, 2]), 5, 0, 0, t));
        let mut walk = c.read(lock, ShardWalk::new);
        let mut n = 0;
        assert!(c.read(lock, |sh| walk.step(sh, 1, |_| n += 1)));
        assert_eq!(c.purge_expired(t + Duration::from_secs(10)), 2);
        put(&c, entry("c.example", 0, Some([1, 1, 1, 3]), 5, 0, 0, t));
        put(&c, entry("d.example", 0, Some([1, 1, 1, 4]), 5, 0, 0, t));
        assert!(!c.read(lock, |sh| walk.step(sh, 1 << 20, |_| n += 1)));
        assert_eq!(n, 1);
    }

    #[test]
    fn smaller_cache_keeps_the_newest_entries() {
        let old = cache(1 << 20, 1);
        let t = Instant::now();
        for i in 0..100u32 {
            let name = format!("n{i}.example");
            let at = t + Duration::from_millis(100 * i as u64);
            put(&old, entry(&name, 0, Some(i.to_be_bytes()), 30, 0, 0, at));
        }
        let wall = SystemTime::now();
        let mut buf = Vec::new();
        old.write_snapshot(&mut buf, t + Duration::from_secs(10), wall)
            .unwrap();
        let small = Cache::new(&CacheConfig {
            max_entries: 10,
            max_bytes: 1 << 20,
            shards: 1,
        });
        let now = Instant::now();
        let l = load(&small, &buf, now, wall).unwrap();
        assert_eq!(l.loaded, 100);
        assert_eq!(small.len(), 10);
        assert!(hit(&small, "n99.example", false, now).is_some());
        assert!(hit(&small, "n90.example", false, now).is_some());
        assert!(hit(&small, "n89.example", false, now).is_none());
    }
}
