//! Memory per cached answer: fills a `Cache` with N realistic answers (cluster-service A records,
//! and NXDOMAIN with an SOA, like the ndots:5 search-path expansions) and reports the process RSS
//! growth per entry against the bytes of the answers themselves.
//!
//!     cargo bench --bench memory            # 10k, 100k and 1M entries
//!
//! The target: RSS with 100,000 entries at most 1.5x the answer bytes plus a fixed base.

use std::time::{Duration, Instant};

use nodedns::cache::{Cache, CacheConfig, Entry};
use nodedns::dns::{self, AnswerKind};

fn rss_bytes() -> usize {
    let s = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A query packet for `name` (wire form) and type A.
fn query(name: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    p.extend_from_slice(name);
    p.extend_from_slice(&[0, 1, 0, 1]);
    p
}

fn wire_name(s: &str) -> Vec<u8> {
    dns::name_from_str(s).unwrap()
}

/// (wire, ttl offsets, kind) of an answer to `q`: one A record, or NXDOMAIN with an SOA.
fn answer(q: &dns::Query, nx: bool) -> (Vec<u8>, Vec<u16>, AnswerKind) {
    let mut w = vec![
        0,
        1,
        0x81,
        if nx { 0x83 } else { 0x80 },
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    w.extend_from_slice(q.question_lower());
    let mut offs = Vec::new();
    if nx {
        w[9] = 1;
        w.extend_from_slice(&wire_name("cluster.local"));
        w.extend_from_slice(&[0, 6, 0, 1]);
        offs.push(w.len() as u16);
        w.extend_from_slice(&5u32.to_be_bytes());
        let mut rdata = wire_name("ns.dns.cluster.local");
        rdata.extend_from_slice(&wire_name("hostmaster.cluster.local"));
        for v in [1u32, 7200, 1800, 86400, 5] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        w.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        w.extend_from_slice(&rdata);
    } else {
        w[7] = 1;
        w.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
        offs.push(w.len() as u16);
        w.extend_from_slice(&[0, 0, 0, 30, 0, 4, 10, 96, 0, 1]);
    }
    (
        w,
        offs,
        if nx {
            AnswerKind::NxDomain
        } else {
            AnswerKind::Positive
        },
    )
}

fn measure(n: usize) {
    let cache = Cache::new(&CacheConfig {
        max_entries: 2 * n, // per-shard bounds must not bind: measure n live entries
        max_bytes: usize::MAX / 2,
        shards: 64,
    });
    let now = Instant::now();
    let base = rss_bytes();
    let mut answer_bytes = 0usize;
    for i in 0..n {
        let nx = i % 2 == 1;
        let name = if nx {
            format!(
                "svc-{i}.default.svc.cluster.local.ns-{}.svc.cluster.local",
                i % 50
            )
        } else {
            format!("svc-{i}.ns-{}.svc.cluster.local", i % 50)
        };
        let p = query(&wire_name(&name));
        let q = dns::parse_query(&p).unwrap();
        let (w, offs, kind) = answer(&q, nx);
        answer_bytes += w.len();
        let key = cache.key(q.question_lower(), q.key_flags());
        cache.insert(
            key,
            Entry::new(w, offs, 0, kind, 0, now, Duration::from_secs(30)),
        );
    }
    let grown = rss_bytes().saturating_sub(base);
    assert_eq!(cache.len(), n);
    println!(
        "entries={n:>8}  answer bytes/entry={:>6.1}  RSS growth/entry={:>6.1}  ratio={:.2}  charged/entry={:.1}",
        answer_bytes as f64 / n as f64,
        grown as f64 / n as f64,
        grown as f64 / answer_bytes as f64,
        cache.bytes() as f64 / n as f64,
    );
}

fn main() {
    // `cargo test --benches` runs this once in test mode: keep that quick.
    let sizes: &[usize] = if std::env::args().any(|a| a == "--bench") {
        &[10_000, 100_000, 1_000_000]
    } else {
        &[10_000]
    };
    for &n in sizes {
        measure(n);
    }
}
