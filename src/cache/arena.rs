//! The arena a shard keeps its entries in: append-only blocks of entries (a 34-byte header, the
//! answer's wire bytes and its TTL offsets), a hash table of 8-byte handles (block sequence and
//! offset) keyed by the entry's cache key, and FIFO reclaiming from the oldest block's head.

use std::collections::VecDeque;

use hashbrown::HashTable;

use crate::dns::AnswerKind;

/// Entry header in the arena, native-endian, unaligned (read by copying):
/// key u64 | stored (ms since the cache's epoch) u64 | ttl u32 | stale u32 | total length u32 |
/// wire length u16 | zone u16 | key flags u8 | kind u8 | then wire bytes and TTL offsets.
pub(super) const HDR: usize = 34;
pub(super) const H_KEY: usize = 0;
pub(super) const H_STORED: usize = 8;
pub(super) const H_TTL: usize = 16;
pub(super) const H_STALE: usize = 20;
pub(super) const H_LEN: usize = 24;
pub(super) const H_WIRE: usize = 28;
pub(super) const H_ZONE: usize = 30;
pub(super) const H_FLAGS: usize = 32;
pub(super) const H_KIND: usize = 33;

/// Largest arena block for ordinary answers; a bigger answer gets a block of its own.
pub(super) const MAX_BLOCK: usize = 16 << 10;

pub(super) fn kind_to_u8(k: AnswerKind) -> u8 {
    match k {
        AnswerKind::Positive => 0,
        AnswerKind::NxDomain => 1,
        AnswerKind::NoData => 2,
        AnswerKind::ServFail => 3,
        AnswerKind::Other => 4,
    }
}

pub(super) fn kind_from_u8(v: u8) -> AnswerKind {
    match v {
        0 => AnswerKind::Positive,
        1 => AnswerKind::NxDomain,
        2 => AnswerKind::NoData,
        3 => AnswerKind::ServFail,
        _ => AnswerKind::Other,
    }
}

#[inline]
pub(super) fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[inline]
pub(super) fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

#[inline]
pub(super) fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// Hints the CPU to load the cache line at `p` (any address: a prefetch never faults).
#[inline(always)]
pub(super) fn prefetch_read(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 only hints the cache; it reads nothing architecturally and cannot fault,
    // whatever the address. SSE is part of the x86_64 baseline.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A handle: the block's sequence number (high 32 bits) and the entry's offset in it.
pub(super) type Handle = u64;

pub(super) fn handle(seq: u32, off: usize) -> Handle {
    ((seq as u64) << 32) | off as u64
}

/// An entry's fields as the arena stores them, from an [`Entry`] or from a snapshot.
pub(super) struct Parts<'a, O> {
    /// Store time, ms since the cache's epoch.
    pub(super) stored_ms: u64,
    pub(super) ttl: u32,
    pub(super) stale: u32,
    pub(super) zone: u16,
    pub(super) key_flags: u8,
    pub(super) kind: u8,
    /// At most `u16::MAX` bytes.
    pub(super) wire: &'a [u8],
    /// The TTL offsets, `n_offsets` of them.
    pub(super) offsets: O,
    pub(super) n_offsets: usize,
}

impl<O> Parts<'_, O> {
    /// Arena bytes the entry takes: header, answer and TTL offsets.
    pub(super) fn charge(&self) -> usize {
        HDR + self.wire.len() + 2 * self.n_offsets
    }
}

pub(super) struct Shard {
    /// Handles of the live entries, hashed by the entry's key (stored in its header).
    pub(super) table: HashTable<Handle>,
    /// Arena blocks, oldest first; a block's `len()` is how much of it is written.
    pub(super) blocks: VecDeque<Vec<u8>>,
    /// Sequence number of `blocks[0]`.
    pub(super) first_seq: u32,
    /// Offset in `blocks[0]` of the oldest entry not yet reclaimed.
    pub(super) head: usize,
    /// Capacity of all blocks held: the bytes this shard costs.
    pub(super) bytes: usize,
    /// One emptied standard block kept for reuse, so a steady-state shard does not allocate.
    pub(super) spare: Option<Vec<u8>>,
    /// Times the arena was emptied in place (its only block rewound, or every block dropped):
    /// a (block sequence, offset) position from before then may now hold another entry. Read
    /// by a snapshot's walk between its lock holds; never by a hit.
    pub(super) resets: u64,
}

/// The bytes from the entry `h` points at to the end of its block (header first). A free function
/// over the block list so the table's closures can use it while the table is borrowed mutably.
#[inline]
pub(super) fn entry_at(blocks: &VecDeque<Vec<u8>>, first_seq: u32, h: Handle) -> &[u8] {
    let idx = ((h >> 32) as u32).wrapping_sub(first_seq) as usize;
    &blocks[idx][h as u32 as usize..]
}

impl Shard {
    /// The entry bytes `h` points at (header included).
    #[inline]
    pub(super) fn entry(&self, h: Handle) -> &[u8] {
        let b = entry_at(&self.blocks, self.first_seq, h);
        &b[..rd_u32(b, H_LEN) as usize]
    }

    /// True when the newest block has room for `size` more bytes.
    pub(super) fn fits(&self, size: usize) -> bool {
        self.blocks
            .back()
            .is_some_and(|b| b.capacity() - b.len() >= size)
    }

    #[inline]
    pub(super) fn find(&self, key: u64) -> Option<Handle> {
        self.table
            .find(key, |&h| rd_u64(self.entry(h), H_KEY) == key)
            .copied()
    }

    /// Removes `h` from the table (if `key` still points there); true if it was live.
    pub(super) fn remove(&mut self, key: u64, h: Handle) -> bool {
        match self.table.find_entry(key, |&x| x == h) {
            Ok(e) => {
                e.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Moves past an exhausted front block: frees it (keeping one standard block as the spare),
    /// or rewinds it when it is the only one (the block being written). False when empty.
    pub(super) fn next_block(&mut self, block: usize) -> bool {
        if self.blocks.len() <= 1 {
            if let Some(b) = self.blocks.front_mut() {
                b.clear();
            }
            self.head = 0;
            self.resets += 1;
            return false;
        }
        let mut b = self.blocks.pop_front().expect("front");
        b.clear();
        self.first_seq = self.first_seq.wrapping_add(1);
        self.head = 0;
        self.bytes -= b.capacity();
        if self.spare.is_none() && b.capacity() == block {
            self.spare = Some(b);
        }
        true
    }

    /// Reclaims the oldest entry. Returns None when the shard holds nothing, else whether the
    /// entry was live, with its stale horizon (ms).
    pub(super) fn pop_oldest(&mut self, block: usize) -> Option<Option<u64>> {
        loop {
            let front = self.blocks.front()?;
            if self.head >= front.len() {
                if !self.next_block(block) {
                    return None;
                }
                continue;
            }
            let e = &front[self.head..];
            let (key, len) = (rd_u64(e, H_KEY), rd_u32(e, H_LEN) as usize);
            let stale_ms = rd_u64(e, H_STORED) + rd_u32(e, H_STALE) as u64 * 1000;
            let h = handle(self.first_seq, self.head);
            self.head += len;
            let live = self.remove(key, h);
            return Some(live.then_some(stale_ms));
        }
    }
}
