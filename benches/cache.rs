//! Criterion benches of the cache-hit path, piece by piece:
//!
//! - `parse`: `dns::parse_query` on a typical query (no EDNS / with EDNS).
//! - `key`: `Cache::key` (keyed ahash of the lowercased question + DO/CD).
//! - `lookup`: `Cache::lookup` hits on 20,000 cached names, one thread; and the whole synchronous
//!   hit path (parse + key + lookup + render) without metrics.
//! - `lookup_concurrent/{spread,hot}/T`: T threads doing hits at once, spread over the 20k keys or
//!   all on one hot key (`kubernetes.default.svc.cluster.local`). The reported time is the CPU time
//!   per lookup per thread (thread CPU clock, mean over threads), so it stays flat when per-thread
//!   throughput does not degrade; time slices lost to other processes on the machine do not count.
//! - `render`: `Entry::render` (copy + ID/RD/question/TTL patches [+ OPT]).
//! - `crates/{sharded,quick_cache,moka}/T`: the same hit workload (20k keys, `Entry`-sized values,
//!   lookup + render into the reply buffer) on our sharded cache, quick_cache 0.7 and moka 0.12
//!   `sync::Cache`. quick_cache and moka return a clone of the value, so they store `Arc<Entry>`.
//!
//! - `insert/{not_full,full_100k}`: `Cache::insert` below the entry bound and at it (every insert evicts).
//! - `snapshot/{write,load}/N`: `Cache::write_snapshot` of N live entries into memory, and
//!   `Cache::load_snapshot` of it into a new cache (checksums, every entry walked as a DNS
//!   response, re-keyed and inserted); N is 1M under `cargo bench`, 1,000 in test mode.
//!
//! Run: `cargo bench --bench cache -- --warm-up-time 1 --measurement-time 3`
//! (a filter after `--` selects groups, e.g. `-- crates`).

use std::hash::{BuildHasher, Hasher};
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use nodedns::cache::{Cache, CacheConfig, Entry};
use nodedns::dns::{self, parse_query, AnswerKind, Query};

const KEYS: usize = 20_000;
/// Shards as `Context::new` sizes them for one worker: (workers * 16).clamp(16, 1024).
const SHARDS: usize = 16;

// ------------------------------------------------------------------ workload

fn wire_name(name: &str) -> Vec<u8> {
    dns::name_from_str(name).expect("valid name")
}

/// A client query as dnsperf / a stub resolver sends it: RD=1, one question, optional EDNS.
fn query_packet(name: &str, qtype: u16, id: u16, edns: bool) -> Vec<u8> {
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
    p.extend_from_slice(&wire_name(name));
    p.extend_from_slice(&qtype.to_be_bytes());
    p.extend_from_slice(&[0, 1]);
    if edns {
        p[11] = 1;
        dns::push_opt(&mut p, 1232, false, 0);
    }
    p
}

/// An upstream answer for `q` with `n` A records (TTL 30), or an NXDOMAIN with a SOA (n == 0).
fn answer_entry(q: &Query, n: usize, now: Instant) -> Entry {
    let mut w = vec![0, 0, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
    w.extend_from_slice(q.question_lower());
    let mut offs = Vec::new();
    if n == 0 {
        w[3] = 0x83; // NXDOMAIN
        w[9] = 1; // NSCOUNT
                  // SOA of cluster.local: owner pointer into the qname is good enough for the bench
        w.extend_from_slice(&[0xC0, 12, 0, 6, 0, 1]);
        offs.push(w.len() as u16);
        w.extend_from_slice(&30u32.to_be_bytes());
        let mut rdata = wire_name("ns.dns.cluster.local");
        rdata.extend_from_slice(&wire_name("hostmaster.cluster.local"));
        for v in [1u32, 7200, 1800, 86400, 30] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        w.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        w.extend_from_slice(&rdata);
    } else {
        w[7] = n as u8;
        for i in 0..n {
            w.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
            offs.push(w.len() as u16);
            w.extend_from_slice(&30u32.to_be_bytes());
            w.extend_from_slice(&[0, 4, 10, 96, (i >> 8) as u8, i as u8]);
        }
    }
    let kind = if n == 0 {
        AnswerKind::NxDomain
    } else {
        AnswerKind::Positive
    };
    Entry::new(
        w,
        offs,
        q.key_flags(),
        kind,
        0,
        now,
        Duration::from_secs(3600),
    )
}

/// The 20k names of the load harness: 10k cluster.local services and 10k example.com hosts.
fn names() -> Vec<String> {
    (0..KEYS)
        .map(|i| {
            if i % 2 == 0 {
                format!("svc-{}.ns-{}.svc.cluster.local", i / 2 % 1000, i / 2 / 1000)
            } else {
                format!("host-{}.example.com", i / 2)
            }
        })
        .collect()
}

struct Workload {
    cache: Cache,
    /// Query packets (EDNS-less, like dnsperf's default), in a shuffled order.
    pkts: Vec<Vec<u8>>,
    queries: Vec<Query>,
    keys: Vec<u64>,
    entries: Vec<Entry>,
    now: Instant,
}

fn shuffle<T>(v: &mut [T]) {
    // xorshift; deterministic so runs compare
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in (1..v.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
}

fn workload() -> Workload {
    let cache = Cache::new(&CacheConfig {
        max_entries: 100_000,
        max_bytes: 64 << 20,
        shards: SHARDS,
    });
    let now = Instant::now();
    let mut names = names();
    shuffle(&mut names);
    let pkts: Vec<Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| query_packet(n, 1, i as u16, false))
        .collect();
    let queries: Vec<Query> = pkts.iter().map(|p| parse_query(p).unwrap()).collect();
    let mut keys = Vec::with_capacity(KEYS);
    let mut entries = Vec::with_capacity(KEYS);
    for q in &queries {
        let key = cache.key(q.question_lower(), q.key_flags());
        let e = answer_entry(q, 1, now);
        assert!(cache.insert(key, e.clone()));
        keys.push(key);
        entries.push(e);
    }
    assert_eq!(cache.len(), KEYS);
    Workload {
        cache,
        pkts,
        queries,
        keys,
        entries,
        now: now + Duration::from_secs(3),
    }
}

// ------------------------------------------------------------------ parse, key, render

fn bench_parse_key(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    let plain = query_packet("svc-123.ns-4.svc.cluster.local", 1, 7, false);
    let edns = query_packet("svc-123.ns-4.svc.cluster.local", 1, 7, true);
    g.bench_function("noedns", |b| {
        b.iter(|| parse_query(black_box(&plain)).is_ok())
    });
    g.bench_function("edns", |b| b.iter(|| parse_query(black_box(&edns)).is_ok()));
    g.finish();

    let cache = Cache::new(&CacheConfig {
        max_entries: 16,
        max_bytes: 1 << 20,
        shards: 16,
    });
    let mut g = c.benchmark_group("key");
    g.throughput(Throughput::Elements(1));
    for name in [
        "kubernetes.default.svc.cluster.local",
        "svc-123.ns-4.svc.cluster.local",
        "a.b",
    ] {
        let p = query_packet(name, 1, 7, false);
        let q = parse_query(&p).unwrap();
        g.bench_function(BenchmarkId::from_parameter(q.question_lower().len()), |b| {
            b.iter(|| cache.key(black_box(q.question_lower()), black_box(q.key_flags())))
        });
    }
    g.finish();
}

fn bench_render(c: &mut Criterion) {
    let mut g = c.benchmark_group("render");
    g.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let mut out = Vec::with_capacity(65535);
    for (label, n, edns) in [
        ("a1", 1, false),
        ("a1_edns", 1, true),
        ("a8", 8, false),
        ("nxdomain_soa", 0, false),
    ] {
        // the client's query in mixed case, to exercise the question copy (0x20)
        let p = query_packet("Svc-123.NS-4.svc.Cluster.Local", 1, 0xBEEF, edns);
        let q = parse_query(&p).unwrap();
        let e = answer_entry(&q, n, now);
        g.bench_function(label, |b| {
            b.iter(|| {
                e.render(
                    black_box(&q),
                    black_box(&p),
                    black_box(7),
                    1232,
                    1232,
                    &mut out,
                );
                out.len()
            })
        });
    }
    g.finish();
}

// ------------------------------------------------------------------ lookups

fn bench_lookup(c: &mut Criterion) {
    let w = workload();
    let mut g = c.benchmark_group("lookup");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("hit_20k", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            w.cache.lookup(w.keys[i], &w.queries[i], w.now, |e, age| {
                e.wire().len() as u32 + age
            })
        })
    });
    let mut out = Vec::with_capacity(65535);
    g.bench_function("hit_20k_render", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let q = &w.queries[i];
            w.cache.lookup(w.keys[i], q, w.now, |e, age| {
                e.render(q, &w.pkts[i], age, 512, 1232, &mut out);
                out.len()
            })
        })
    });
    // Everything `Context::handle` does on a hit except metrics: parse, key, lookup, render.
    g.bench_function("hit_path_parse_key_lookup_render", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            let pkt = &w.pkts[i];
            let q = parse_query(black_box(pkt)).unwrap();
            let key = w.cache.key(q.question_lower(), q.key_flags());
            w.cache.lookup(key, &q, w.now, |e, age| {
                e.render(&q, pkt, age, q.max_udp_reply(1232), 1232, &mut out);
                out.len()
            })
        })
    });
    g.finish();

    // A recvmmsg batch (24 datagrams, about what a worker reads per call at full load): look up
    // and render each in turn, or first prefetch the whole batch's entries (`Cache::prefetch`,
    // what `server::udp` does). Per-query time.
    let mut g = c.benchmark_group("lookup_batch");
    const BATCH: usize = 24;
    g.throughput(Throughput::Elements(BATCH as u64));
    for prefetch in [false, true] {
        let label = if prefetch { "prefetched" } else { "one_by_one" };
        let mut start = 0usize;
        g.bench_function(label, |b| {
            b.iter(|| {
                start = (start + BATCH) % (KEYS - BATCH);
                let keys = &w.keys[start..start + BATCH];
                if prefetch {
                    w.cache.prefetch(keys);
                }
                let mut n = 0;
                for (j, &key) in keys.iter().enumerate() {
                    let q = &w.queries[start + j];
                    n += w
                        .cache
                        .lookup(key, q, w.now, |e, age| {
                            e.render(q, &w.pkts[start + j], age, 512, 1232, &mut out);
                            out.len()
                        })
                        .expect("hit");
                }
                n
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("lookup");
    let miss_p = query_packet("nothere.example.org", 1, 1, false);
    let miss_q = parse_query(&miss_p).unwrap();
    let miss_k = w.cache.key(miss_q.question_lower(), 0);
    g.bench_function("miss", |b| {
        b.iter(|| w.cache.lookup(miss_k, &miss_q, w.now, |_, _| ()).is_none())
    });
    g.finish();
}

fn thread_counts() -> Vec<usize> {
    let n = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .max(2);
    let mut v: Vec<usize> = (1..=n).collect();
    v.push(2 * n); // oversubscribed: a reader preempted while holding a read lock
    v
}

/// CPU time this thread has used (CLOCK_THREAD_CPUTIME_ID).
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `per_thread(thread_index, iters)` on `threads` threads released together and returns the
/// mean over threads of each thread's own CPU time: the CPU cost of `iters` operations on one thread
/// while the others run too. CPU time, not wall time, so that other work on a shared machine (and
/// oversubscription) does not count, while the cost of cache-line transfers and lock spinning does.
fn run_threads<F>(threads: usize, iters: u64, per_thread: F) -> Duration
where
    F: Fn(usize, u64) + Sync,
{
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let barrier = &barrier;
                let per_thread = &per_thread;
                s.spawn(move || {
                    barrier.wait();
                    let t0 = thread_cpu();
                    per_thread(t, iters);
                    thread_cpu() - t0
                })
            })
            .collect();
        let total: Duration = hs.into_iter().map(|h| h.join().unwrap()).sum();
        total / threads as u32
    })
}

fn bench_lookup_concurrent(c: &mut Criterion) {
    let w = workload();
    let hot_p = query_packet("kubernetes.default.svc.cluster.local", 1, 1, false);
    let hot_q = parse_query(&hot_p).unwrap();
    let hot_k = w.cache.key(hot_q.question_lower(), 0);
    w.cache.insert(
        hot_k,
        answer_entry(&hot_q, 1, w.now - Duration::from_secs(3)),
    );
    let mut g = c.benchmark_group("lookup_concurrent");
    g.throughput(Throughput::Elements(1));
    for t in thread_counts() {
        g.bench_function(BenchmarkId::new("spread", t), |b| {
            b.iter_custom(|iters| {
                run_threads(t, iters, |ti, iters| {
                    let mut out = Vec::with_capacity(2048);
                    let mut i = ti * 7919 % KEYS;
                    for _ in 0..iters {
                        i += 1;
                        if i == KEYS {
                            i = 0;
                        }
                        let q = &w.queries[i];
                        let r = w.cache.lookup(w.keys[i], q, w.now, |e, age| {
                            e.render(q, &w.pkts[i], age, 512, 1232, &mut out);
                            out.len()
                        });
                        black_box(r);
                    }
                })
            })
        });
        g.bench_function(BenchmarkId::new("hot", t), |b| {
            b.iter_custom(|iters| {
                run_threads(t, iters, |_, iters| {
                    let mut out = Vec::with_capacity(2048);
                    for _ in 0..iters {
                        let r = w.cache.lookup(hot_k, &hot_q, w.now, |e, age| {
                            e.render(&hot_q, &hot_p, age, 512, 1232, &mut out);
                            out.len()
                        });
                        black_box(r);
                    }
                })
            })
        });
    }
    g.finish();
}

// ------------------------------------------------------------------ cache crates

/// Keys are already keyed hashes (as in `Cache`): pass them through.
#[derive(Clone, Default)]
struct IdBuild;
#[derive(Default)]
struct IdHasher(u64);
impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = self.0.rotate_left(8) ^ x as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}
impl BuildHasher for IdBuild {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

/// One cache under test: a hit renders the reply like `Context::handle` does.
trait HitCache: Sync {
    fn hit(&self, key: u64, q: &Query, pkt: &[u8], now: Instant, out: &mut Vec<u8>) -> bool;
}

impl HitCache for Cache {
    #[inline]
    fn hit(&self, key: u64, q: &Query, pkt: &[u8], now: Instant, out: &mut Vec<u8>) -> bool {
        self.lookup(key, q, now, |e, age| e.render(q, pkt, age, 512, 1232, out))
            .is_some()
    }
}

/// The checks `Cache::lookup` makes under its lock, made on the cloned `Arc<Entry>` instead.
#[inline]
fn check_render(e: &Entry, q: &Query, pkt: &[u8], now: Instant, out: &mut Vec<u8>) -> bool {
    let qb = q.question_lower();
    if now >= e.expires()
        || e.key_flags != q.key_flags()
        || e.wire().get(12..12 + qb.len()) != Some(qb)
    {
        return false;
    }
    let age = now.saturating_duration_since(e.stored).as_secs() as u32;
    e.render(q, pkt, age, 512, 1232, out);
    true
}

struct Quick(quick_cache::sync::Cache<u64, Arc<Entry>, quick_cache::UnitWeighter, IdBuild>);
impl HitCache for Quick {
    #[inline]
    fn hit(&self, key: u64, q: &Query, pkt: &[u8], now: Instant, out: &mut Vec<u8>) -> bool {
        self.0
            .get(&key)
            .is_some_and(|e| check_render(&e, q, pkt, now, out))
    }
}

struct Moka(moka::sync::Cache<u64, Arc<Entry>, IdBuild>);
impl HitCache for Moka {
    #[inline]
    fn hit(&self, key: u64, q: &Query, pkt: &[u8], now: Instant, out: &mut Vec<u8>) -> bool {
        self.0
            .get(&key)
            .is_some_and(|e| check_render(&e, q, pkt, now, out))
    }
}

fn bench_crates(c: &mut Criterion) {
    let w = workload();
    let quick = Quick(quick_cache::sync::Cache::with(
        100_000,
        100_000,
        quick_cache::UnitWeighter,
        IdBuild,
        Default::default(),
    ));
    let moka = Moka(
        moka::sync::Cache::builder()
            .max_capacity(100_000)
            .build_with_hasher(IdBuild),
    );
    for (k, e) in w.keys.iter().zip(&w.entries) {
        quick.0.insert(*k, Arc::new(e.clone()));
        moka.0.insert(*k, Arc::new(e.clone()));
    }
    moka.0.run_pending_tasks();
    let caches: [(&str, &dyn HitCache); 3] = [
        ("sharded", &w.cache),
        ("quick_cache", &quick),
        ("moka", &moka),
    ];
    // every cache must hit every key
    for (name, cache) in caches {
        let mut out = Vec::new();
        let hits = (0..KEYS)
            .filter(|&i| cache.hit(w.keys[i], &w.queries[i], &w.pkts[i], w.now, &mut out))
            .count();
        assert_eq!(hits, KEYS, "{name}");
    }
    let mut g = c.benchmark_group("crates");
    g.throughput(Throughput::Elements(1));
    for t in thread_counts() {
        for (name, cache) in caches {
            g.bench_function(BenchmarkId::new(name, t), |b| {
                b.iter_custom(|iters| {
                    run_threads(t, iters, |ti, iters| {
                        let mut out = Vec::with_capacity(2048);
                        let mut i = ti * 7919 % KEYS;
                        for _ in 0..iters {
                            i += 1;
                            if i == KEYS {
                                i = 0;
                            }
                            black_box(cache.hit(
                                w.keys[i],
                                &w.queries[i],
                                &w.pkts[i],
                                w.now,
                                &mut out,
                            ));
                        }
                    })
                })
            });
        }
    }
    g.finish();
}

// ------------------------------------------------------------------ inserts (the miss path's store)

/// Cost of `Cache::insert` of a new name, with the cache below its entry bound and at it (every
/// insert evicts; all entries still live, as on a busy node where the TTL cap keeps them fresh).
fn bench_insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("insert");
    g.throughput(Throughput::Elements(1));
    let now = Instant::now();
    let template = {
        let p = query_packet("m0-00000000.miss.example.com", 1, 1, false);
        answer_entry(&parse_query(&p).unwrap(), 1, now)
    };
    // not_full: 100k live entries, bound 1M; keys cycle over 150k names, so an insert adds or
    // replaces (memory stays bounded however many iterations criterion runs).
    // full_100k: bound 100k, every key new, so every insert has to make room.
    for (label, max_entries, cycle) in [
        ("not_full", 1_000_000, 150_000u64),
        ("full_100k", 100_000, u64::MAX),
    ] {
        let cache = Cache::new(&CacheConfig {
            max_entries,
            max_bytes: 1 << 30,
            shards: SHARDS,
        });
        let mut n: u64 = 0;
        let mut next_key = || {
            n = (n + 1) % cycle;
            cache.key(&n.to_le_bytes(), 0)
        };
        for _ in 0..100_000 {
            cache.insert(next_key(), template.clone());
        }
        g.bench_function(label, |b| {
            b.iter_batched(
                || (next_key(), template.clone()),
                |(k, e)| cache.insert(k, e),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

// ------------------------------------------------------------------ snapshot (warm restart)

/// Writing and loading a cache snapshot of N entries: 3 positive answers (one A record) to 1
/// NXDOMAIN (with a SOA), distinct names, all live.
fn bench_snapshot(c: &mut Criterion) {
    // `cargo test --benches` runs this once in test mode: keep that quick.
    let n: usize = if std::env::args().any(|a| a == "--bench") {
        1_000_000
    } else {
        1_000
    };
    let cfg = CacheConfig {
        max_entries: 2 * n,
        max_bytes: 256 << 20,
        shards: SHARDS,
    };
    let cache = Cache::new(&cfg);
    let now = Instant::now();
    for i in 0..n {
        let name = if i % 2 == 0 {
            format!("svc-{}.ns-{}.svc.cluster.local", i % 1000, i / 1000)
        } else {
            format!("host-{i}.example.com")
        };
        let p = query_packet(&name, 1, 1, false);
        let q = parse_query(&p).unwrap();
        let e = answer_entry(&q, usize::from(i % 4 != 0), now);
        assert!(cache.insert(cache.key(q.question_lower(), q.key_flags()), e));
    }
    assert_eq!(cache.len(), n);
    let wall = SystemTime::now();
    let mut snapshot = Vec::new();
    let stats = cache.write_snapshot(&mut snapshot, now, wall).unwrap();
    assert_eq!(stats.entries, n as u64);
    eprintln!(
        "snapshot of {n} entries: {} bytes ({} per entry); cache arena {} bytes",
        stats.bytes,
        stats.bytes / n as u64,
        cache.bytes()
    );

    let mut g = c.benchmark_group("snapshot");
    g.sample_size(10);
    g.throughput(Throughput::Elements(n as u64));
    let mut out = Vec::with_capacity(snapshot.len());
    g.bench_function(BenchmarkId::new("write", n), |b| {
        b.iter(|| {
            out.clear();
            cache.write_snapshot(&mut out, now, wall).unwrap()
        })
    });
    g.bench_function(BenchmarkId::new("load", n), |b| {
        b.iter_batched(
            || Cache::new(&cfg),
            |fresh| {
                let l = fresh
                    .load_snapshot(&mut &snapshot[..], Instant::now(), wall, 1)
                    .unwrap();
                assert_eq!(l.loaded, n as u64);
                fresh
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();
    insert_latency_under_snapshot(&cache, now, wall, n);
}

/// What a snapshot write costs the others: an insert waits while the snapshot copies the
/// insert's shard, and a hit on that shard waits behind a waiting insert. Prints the insert
/// latency percentiles on this thread while another thread writes snapshots back to back, and
/// without it, so the difference is the snapshot's lock hold (preemption by other processes on
/// the machine shows in both).
fn insert_latency_under_snapshot(cache: &Cache, now: Instant, wall: SystemTime, n: usize) {
    let template = {
        let p = query_packet("m0-00000000.miss.example.com", 1, 1, false);
        answer_entry(&parse_query(&p).unwrap(), 1, now)
    };
    // Inserts for 3 s under `cargo bench` (dozens of snapshots), 1,000 in test mode.
    let span = if n >= 1_000_000 {
        Duration::from_secs(3)
    } else {
        Duration::ZERO
    };
    let measure = |label: &str, stop: &std::sync::atomic::AtomicBool| {
        let mut lat: Vec<u32> = Vec::new();
        let start = Instant::now();
        for i in 0u64.. {
            if i >= 1000 && start.elapsed() >= span {
                break;
            }
            // A fixed set of keys: each insert replaces one of 1,000 entries.
            let key = cache.key(&(i % 1000).to_le_bytes(), 0);
            let e = template.clone();
            let t = Instant::now();
            cache.insert(key, e);
            lat.push(t.elapsed().as_nanos() as u32);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        lat.sort_unstable();
        let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        eprintln!(
            "insert latency {label}: p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
            pct(0.5),
            pct(0.99),
            pct(0.999),
            pct(1.0)
        );
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    measure("alone", &stop);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let snapshots = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut out = Vec::new();
            let mut k = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                out.clear();
                cache.write_snapshot(&mut out, now, wall).unwrap();
                k += 1;
            }
            k
        });
        measure("while snapshots are written", &stop);
        writer.join().unwrap()
    });
    eprintln!("({snapshots} snapshots of {n} entries written meanwhile)");
}

criterion_group!(
    benches,
    bench_parse_key,
    bench_render,
    bench_lookup,
    bench_lookup_concurrent,
    bench_crates,
    bench_insert,
    bench_snapshot
);
criterion_main!(benches);
