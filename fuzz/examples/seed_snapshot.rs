//! Writes seeds for the `snapshot` target: real snapshots of a cache filled from the `response`
//! target's inputs (real upstream replies), in both of the target's input shapes.
//!
//! `cargo run --example seed_snapshot -- RESPONSE_DIR OUT_DIR`

use std::time::{Duration, Instant, UNIX_EPOCH};

use nodedns::cache::{Cache, CacheConfig, Entry};
use nodedns::dns;
use nodedns_fuzz::query_packet;

/// As in src/bin/snapshot.rs.
const CREATED_MS: u64 = 1_800_000_000_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (src, out) = (&args[1], std::path::Path::new(&args[2]));
    std::fs::create_dir_all(out).unwrap();
    let mut files: Vec<_> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let now = Instant::now();
    let wall = UNIX_EPOCH + Duration::from_millis(CREATED_MS);
    let mut caches: Vec<Cache> = Vec::new();
    let mut current = new_cache();
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let (flags, resp) = (data[0], &data[2..]);
        let Some(end) = dns::question_end(resp) else {
            continue;
        };
        let edns = (flags & 4 != 0).then_some((4096, flags & 1 != 0));
        let pkt = query_packet(1, dns::FLAG_RD, &resp[dns::HEADER_LEN..end], edns);
        let Ok(q) = dns::parse_query(&pkt) else {
            continue;
        };
        let Ok(r) = dns::parse_response(resp, q.question_lower()) else {
            continue;
        };
        if r.truncated || r.kind == dns::AnswerKind::Other {
            continue;
        }
        let e = Entry::new(
            r.wire,
            r.ttl_offsets,
            q.key_flags(),
            r.kind,
            0,
            now,
            Duration::from_secs(60),
        );
        current.insert(current.key(q.question_lower(), q.key_flags()), e);
        if current.len() >= 8 {
            caches.push(std::mem::replace(&mut current, new_cache()));
        }
    }
    caches.push(current);
    for (i, c) in caches.iter().enumerate() {
        let mut snap = Vec::new();
        let stats = c.write_snapshot(&mut snap, now, wall).unwrap();
        // Raw: the stream as written.
        let mut raw = vec![0u8];
        raw.extend_from_slice(&snap);
        std::fs::write(out.join(format!("raw-{i}")), raw).unwrap();
        // Wrapped: the first chunk's entries (after the 20-byte header and 12-byte chunk header).
        let len = u32::from_le_bytes(snap[20..24].try_into().unwrap()) as usize;
        let mut wrapped = vec![1u8, stats.entries as u8];
        wrapped.extend_from_slice(&snap[32..32 + len]);
        std::fs::write(out.join(format!("entries-{i}")), wrapped).unwrap();
    }
}

fn new_cache() -> Cache {
    Cache::new(&CacheConfig {
        max_entries: 256,
        max_bytes: 256 << 10,
        shards: 2,
    })
}
