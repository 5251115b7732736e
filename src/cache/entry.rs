//! A cached answer outside the cache ([`Entry`], what the forwarder builds and a miss is answered
//! from) and inside it ([`EntryRef`], borrowed from a shard's arena by a hit), and the renderer
//! both share.

use std::time::{Duration, Instant};

use super::HDR;
use crate::dns::{self, AnswerKind, Query, FLAG_RD, HEADER_LEN, OPT_LEN};

/// An answer ready to be cached or sent: what the forwarder builds from an upstream response.
/// The cache copies it into its arena; a miss's reply is rendered from it directly. It keeps the
/// parser's two buffers as they are (no re-packing: it lives only until the reply is sent).
#[derive(Debug, Clone)]
pub struct Entry {
    /// The answer wire bytes (without OPT; question lowercased; TTLs as stored).
    pub(super) wire: Vec<u8>,
    /// Offset of every TTL field in `wire`.
    pub(super) offsets: Vec<u16>,
    /// DO and CD bits of the query this answers (part of the key).
    pub key_flags: u8,
    pub kind: AnswerKind,
    /// Index of the zone (config order) the name routed to; used for per-zone accounting.
    pub zone: u16,
    /// Lifetime in seconds from `stored`.
    pub(super) ttl: u32,
    /// Seconds from `stored` during which a stale copy may still be served (== `ttl` while
    /// serve-stale is off).
    pub(super) stale: u32,
    pub stored: Instant,
}

impl Entry {
    pub fn new(
        mut wire: Vec<u8>,
        ttl_offsets: Vec<u16>,
        key_flags: u8,
        kind: AnswerKind,
        zone: u16,
        stored: Instant,
        ttl: Duration,
    ) -> Self {
        wire.truncate(u16::MAX as usize);
        let ttl = ttl.as_secs().min(u32::MAX as u64) as u32;
        Entry {
            wire,
            offsets: ttl_offsets,
            key_flags,
            kind,
            zone,
            ttl,
            stale: ttl,
            stored,
        }
    }

    /// This entry may be served stale for `window` past its TTL (RFC 8767).
    pub fn with_stale_window(mut self, window: Duration) -> Self {
        let w = window.as_secs().min(u32::MAX as u64) as u32;
        self.stale = self.ttl.saturating_add(w);
        self
    }

    /// The answer wire bytes.
    #[inline]
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// Offsets of every TTL field in `wire()`.
    pub fn ttl_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        self.offsets.iter().map(|&o| o as usize)
    }

    pub fn expires(&self) -> Instant {
        self.stored + Duration::from_secs(self.ttl as u64)
    }

    pub fn stale_until(&self) -> Instant {
        self.stored + Duration::from_secs(self.stale as u64)
    }

    /// Arena bytes this entry takes once cached (header, answer and TTL offsets).
    pub fn charge(&self) -> usize {
        HDR + self.wire.len() + 2 * self.offsets.len()
    }

    pub fn rcode(&self) -> u8 {
        self.wire[3] & 0xF
    }

    /// Writes the reply to `q` (whose wire is `pkt`) into `out`, aged by `age` seconds: see
    /// [`EntryRef::render`].
    pub fn render(
        &self,
        q: &Query,
        pkt: &[u8],
        age: u32,
        max_len: usize,
        opt_size: u16,
        out: &mut Vec<u8>,
    ) {
        render(
            &self.wire,
            self.ttl_offsets(),
            q,
            pkt,
            age,
            max_len,
            opt_size,
            out,
        );
    }
}

fn offsets(raw: &[u8]) -> impl Iterator<Item = usize> + Clone + '_ {
    raw.chunks_exact(2)
        .map(|c| u16::from_ne_bytes([c[0], c[1]]) as usize)
}

/// A cached answer as a hit sees it: borrowed from the arena while the shard is read.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    /// Wire bytes followed by the TTL offsets (native-endian u16s).
    pub(super) payload: &'a [u8],
    pub(super) wire_len: usize,
    pub key_flags: u8,
    pub kind: AnswerKind,
    pub zone: u16,
    /// Lifetime in seconds from the store time.
    pub ttl: u32,
    /// Store time (ms since the cache's epoch): tells one lifetime of a key from the next.
    pub stored_ms: u64,
    /// Age in milliseconds at the lookup.
    pub age_ms: u64,
}

impl EntryRef<'_> {
    #[inline]
    pub fn wire(&self) -> &[u8] {
        &self.payload[..self.wire_len]
    }

    /// Writes the reply to `q` (whose wire is `pkt`) into `out`, aged by `age` seconds.
    ///
    /// `max_len` is the largest reply the transport allows; a longer answer goes without its
    /// additional records, or, when even that is too long, becomes a TC=1 reply with only the
    /// question, so the client retries over TCP. `opt_size` is our advertised EDNS size, added
    /// as an OPT record when the client sent one.
    #[inline]
    pub fn render(
        &self,
        q: &Query,
        pkt: &[u8],
        age: u32,
        max_len: usize,
        opt_size: u16,
        out: &mut Vec<u8>,
    ) {
        let offs = offsets(&self.payload[self.wire_len..]);
        render(self.wire(), offs, q, pkt, age, max_len, opt_size, out);
    }

    /// Writes a stale reply (RFC 8767): every TTL is `ttl`, and when the client sent EDNS our
    /// OPT record carries Extended DNS Error 3 (Stale Answer, RFC 8914).
    pub fn render_stale(
        &self,
        q: &Query,
        pkt: &[u8],
        ttl: u32,
        max_len: usize,
        opt_size: u16,
        out: &mut Vec<u8>,
    ) {
        // Room for the EDE option, so adding it never pushes the reply over the client's size.
        let room = if q.edns.is_some() { dns::EDE_LEN } else { 0 };
        let offs = offsets(&self.payload[self.wire_len..]);
        let kept = render(
            self.wire(),
            offs.clone(),
            q,
            pkt,
            0,
            max_len.saturating_sub(room),
            opt_size,
            out,
        );
        // The TTLs of the records the reply kept (none when it was cut to TC=1).
        for off in offs.filter(|&off| off < kept) {
            out[off..off + 4].copy_from_slice(&ttl.to_be_bytes());
        }
        if q.edns.is_some() {
            dns::add_ede(out, dns::EDE_STALE_ANSWER);
        }
    }
}

/// The reply to `q` from a stored answer: copy, then patch ID, RD, the client's question bytes
/// and every TTL (minus `age`); our OPT when the client sent one. A recursive cache's flags:
/// RA set, AA clear (the cache is not the authority), CD as the client sent it (RFC 4035
/// §3.1.6). Over `max_len`, the additional records are left out first; only when the answer
/// and authority sections alone do not fit is it a TC=1 reply with only the question (RFC 2181
/// §9), so the client retries over TCP.
#[allow(clippy::too_many_arguments)]
#[inline]
fn render(
    wire: &[u8],
    ttl_offsets: impl Iterator<Item = usize>,
    q: &Query,
    pkt: &[u8],
    age: u32,
    max_len: usize,
    opt_size: u16,
    out: &mut Vec<u8>,
) -> usize {
    out.clear();
    let opt = if q.edns.is_some() { OPT_LEN } else { 0 };
    let qend = q.question_end;
    // All of it, or up to the additional section (when that alone is over the size).
    let keep = if wire.len() + opt <= max_len {
        Some(wire.len())
    } else {
        shorter(wire, max_len - opt.min(max_len))
    };
    match keep {
        Some(end) => {
            out.extend_from_slice(&wire[..end]);
            out[HEADER_LEN..qend].copy_from_slice(&pkt[HEADER_LEN..qend]);
            for off in ttl_offsets.filter(|&off| off < end) {
                let ttl = dns::u32_at(wire, off).saturating_sub(age);
                out[off..off + 4].copy_from_slice(&ttl.to_be_bytes());
            }
            if end < wire.len() {
                out[10..12].copy_from_slice(&[0, 0]);
            }
        }
        None => {
            out.extend_from_slice(&wire[..HEADER_LEN]);
            out[2] |= (dns::FLAG_TC >> 8) as u8;
            out[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
            out.extend_from_slice(&pkt[HEADER_LEN..qend]);
        }
    }
    out[0..2].copy_from_slice(&q.id.to_be_bytes());
    // RD echoes the client's, CD too; RA is ours to set and AA is not ours to claim.
    let rd = (FLAG_RD >> 8) as u8;
    out[2] = (out[2] & !rd & !((dns::FLAG_AA >> 8) as u8)) | ((q.flags >> 8) as u8 & rd);
    let cd = dns::FLAG_CD as u8;
    out[3] = (out[3] & !cd) | (q.flags as u8 & cd) | dns::FLAG_RA as u8;
    if opt != 0 {
        let ar = dns::u16_at(out, 10) + 1;
        out[10..12].copy_from_slice(&ar.to_be_bytes());
        dns::push_opt(out, opt_size, q.dnssec_ok(), 0);
    }
    keep.unwrap_or(0)
}

/// The end of the answer and authority sections of `wire` when they fit in `room` bytes and
/// additional records follow them: the reply then goes out without those. Not on the hit path
/// of a reply that fits.
#[cold]
fn shorter(wire: &[u8], room: usize) -> Option<usize> {
    dns::additional_start(wire).filter(|&end| end <= room && end < wire.len())
}
