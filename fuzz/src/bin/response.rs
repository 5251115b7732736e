//! An upstream's response, from the walk to the client's reply: `dns::parse_response`, the TTL
//! rewrite the forwarder applies before caching, `Cache::insert`, then the reply rendered on a
//! miss (from the entry), on a hit (from the arena) and stale, at the sizes clients ask for.
//!
//! Input: a flags byte (bit 0 DO, bit 1 CD, bit 2 the client sent EDNS, bits 3-4 the reply size
//! limit), an age byte, then the response. The question asked is the response's own (so the walk
//! goes past the question check), or a fixed one when it has none.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nodedns::cache::{Cache, CacheConfig, Entry};
use nodedns::dns::{self, AnswerKind};
use nodedns_fuzz::{byte, query_packet};

const FALLBACK_QUESTION: &[u8] = b"\x03www\x07example\x03com\x00\x00\x01\x00\x01";

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let flags = byte(&mut data);
    let age = byte(&mut data) as u32;
    let resp = data;
    let question = match dns::question_end(resp) {
        Some(end) => &resp[dns::HEADER_LEN..end],
        None => FALLBACK_QUESTION,
    };
    let edns = (flags & 4 != 0).then_some((4096, flags & 1 != 0));
    let qflags = dns::FLAG_RD | if flags & 2 != 0 { dns::FLAG_CD } else { 0 };
    let pkt = query_packet(0x4242, qflags, question, edns);
    let Ok(q) = dns::parse_query(&pkt) else {
        return;
    };
    let Ok(r) = dns::parse_response(resp, q.question_lower()) else {
        return;
    };
    for &off in &r.ttl_offsets {
        assert!(off as usize + 4 <= r.wire.len());
    }
    assert_eq!(dns::u16_at(&r.wire, 4), 1);
    // The forwarder's caching rule, with the default caps (see forward::Forwarder::store).
    let ttl = match r.kind {
        AnswerKind::Positive => r.min_ttl.map(|t| t.clamp(0, 86_400)),
        AnswerKind::NxDomain | AnswerKind::NoData => r.negative_ttl.map(|t| t.min(3_600)),
        AnswerKind::ServFail => Some(5),
        AnswerKind::Other => None,
    }
    .filter(|&t| t > 0 && !r.truncated);
    let mut wire = r.wire;
    if let Some(ttl) = ttl {
        for &off in &r.ttl_offsets {
            let off = off as usize;
            let v = if Some(off as u16) == r.soa_ttl_offset {
                ttl
            } else {
                dns::u32_at(&wire, off).min(ttl)
            };
            wire[off..off + 4].copy_from_slice(&v.to_be_bytes());
        }
    }
    let now = Instant::now();
    let entry = Entry::new(
        wire,
        r.ttl_offsets,
        q.key_flags(),
        r.kind,
        0,
        now,
        Duration::from_secs(ttl.unwrap_or(0) as u64),
    )
    .with_stale_window(Duration::from_secs(30));
    let max_len = [512, 1232, 4096, 65_535][(flags >> 3) as usize & 3];
    let mut miss = Vec::new();
    entry.render(&q, &pkt, 0, max_len, 1232, &mut miss);
    assert!(miss.len() <= max_len, "{} > {max_len}", miss.len());
    assert_eq!(&miss[..2], &pkt[..2]);
    let Some(ttl) = ttl else {
        return;
    };
    let cache = Cache::new(&CacheConfig {
        max_entries: 64,
        max_bytes: 1 << 20,
        shards: 1,
    });
    let key = cache.key(q.question_lower(), q.key_flags());
    if !cache.insert(key, entry) {
        return;
    }
    let mut hit = Vec::new();
    cache
        .lookup(key, &q, now, |e, _| {
            e.render(&q, &pkt, 0, max_len, 1232, &mut hit)
        })
        .expect("a fresh entry is found");
    assert_eq!(hit, miss, "a hit renders what the miss rendered");
    if age > 0 {
        cache.lookup(key, &q, now, |e, _| {
            e.render(&q, &pkt, age.min(ttl), max_len, 1232, &mut hit)
        });
        assert_eq!(hit.len(), miss.len());
    }
    let stale = now + Duration::from_secs(ttl as u64 + 1);
    if let Some(()) = cache.lookup_stale(key, &q, stale, |e, _| {
        e.render_stale(&q, &pkt, 30, max_len, 1232, &mut hit)
    }) {
        assert!(hit.len() <= max_len);
    }
    dns::truncate_reply(&mut hit);
    assert_ne!(dns::u16_at(&hit, 2) & dns::FLAG_TC, 0);
});
