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
#[path = "snapshot_tests.rs"]
mod tests;
