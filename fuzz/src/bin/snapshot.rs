//! The cache snapshot a new process reads from the state directory or from its predecessor:
//! `Cache::load_snapshot`. Bit 0 of the first byte picks the input's shape: the rest as the
//! snapshot stream itself (magic, version, chunk and stream checksums), or the rest as the
//! entries of one chunk wrapped in a valid header, chunk header, end and trailer, so the fuzzer
//! spends its time in entry validation rather than on checksums. A snapshot that loads is
//! written again and must load again with the same entries.
#![no_main]

use std::io::Cursor;
use std::time::{Duration, Instant, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use nodedns::cache::{Cache, CacheConfig};
use nodedns_fuzz::take;

/// The wall clock the snapshots in the corpus were written at (their entries' store times are
/// just before it), so they load as fresh.
const CREATED_MS: u64 = 1_800_000_000_000;
/// The snapshot format's magic and version (see src/cache/snapshot.rs).
const MAGIC: &[u8; 8] = b"NDNSSNAP";
const VERSION: u32 = 1;

fn cache() -> Cache {
    Cache::new(&CacheConfig {
        max_entries: 256,
        max_bytes: 256 << 10,
        shards: 2,
    })
}

fn wrap(count: u32, body: &[u8]) -> Vec<u8> {
    let mut s = Vec::with_capacity(body.len() + 64);
    s.extend_from_slice(MAGIC);
    s.extend_from_slice(&VERSION.to_le_bytes());
    s.extend_from_slice(&CREATED_MS.to_le_bytes());
    for (len, n) in [(body.len() as u32, count), (0, 0)] {
        let mut h = [0u8; 8];
        h[..4].copy_from_slice(&len.to_le_bytes());
        h[4..].copy_from_slice(&n.to_le_bytes());
        s.extend_from_slice(&h);
        s.extend_from_slice(&crc32fast::hash(&h).to_le_bytes());
        if n > 0 {
            s.extend_from_slice(body);
        }
    }
    s.extend_from_slice(&(count as u64).to_le_bytes());
    let crc = crc32fast::hash(&s);
    s.extend_from_slice(&crc.to_le_bytes());
    s
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let mode = take(&mut data, 1).first().copied().unwrap_or(0);
    let stream = if mode & 1 == 0 {
        data.to_vec()
    } else {
        let count = take(&mut data, 1).first().copied().unwrap_or(0) as u32;
        wrap(count, data)
    };
    let now = Instant::now();
    let wall = UNIX_EPOCH + Duration::from_millis(CREATED_MS + 1000);
    let zones = 2;
    let c = cache();
    let Ok(stats) = c.load_snapshot(&mut Cursor::new(&stream), now, wall, zones) else {
        assert!(c.is_empty(), "a refused snapshot inserts nothing");
        return;
    };
    assert_eq!(
        stats.entries,
        stats.loaded + stats.expired + stats.unknown_zone + stats.oversized
    );
    let mut again = Vec::new();
    let written = c
        .write_snapshot(&mut again, now, wall)
        .expect("writing to memory");
    let d = cache();
    let reloaded = d
        .load_snapshot(&mut Cursor::new(&again), now, wall, zones)
        .unwrap_or_else(|e| panic!("a snapshot we wrote does not load: {e}"));
    assert_eq!(reloaded.entries, written.entries);
    // The second cache's epoch is a little later: an entry exactly as old as the first cache's
    // epoch allows may count as expired there.
    assert_eq!(
        reloaded.loaded + reloaded.oversized + reloaded.expired,
        written.entries
    );
    assert_eq!(reloaded.unknown_zone, 0);
});
