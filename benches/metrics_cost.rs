//! What counting costs on the cache-hit path.
//!
//! - `hit_path/with_metrics`: `Context::handle` on a cached name, as a UDP worker calls it
//!   (parse, key, lookup, render, then `WorkerStats::record` and the query-log sampling check,
//!   with the query log off as by default).
//!   The stats are a UDP worker's (`Metrics::new_udp_worker_for`): one writing thread, so plain
//!   loads and stores.
//! - `hit_path/with_metrics_shared_counters`: the same with a TCP listener's stats (relaxed
//!   `fetch_add`, as any thread may write), to show what the single-writer block saves.
//! - `hit_path/without_metrics`: the same steps without `record` and the query-log check.
//! - `record/{sole_writer,shared}`: `WorkerStats::record` alone for one answered query.
//!
//! The difference between the first two is the price of the metrics per query.
//!
//! Run: `cargo bench --bench metrics_cost -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use nodedns::cache::Entry;
use nodedns::clock::Clock;
use nodedns::config::{self, Args, Environment};
use nodedns::dns::{self, AnswerKind};
use nodedns::metrics::{Answered, Metrics, Proto};
use nodedns::server::{Context, Handled};

const NAME: &str = "kubernetes.default.svc.cluster.local";

/// `NAME IN A` with RD and EDNS (1232), as a stub resolver sends it.
fn query_packet() -> Vec<u8> {
    let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
    p.extend_from_slice(&dns::name_from_str(NAME).expect("valid name"));
    p.extend_from_slice(&[0, 1, 0, 1]);
    dns::push_opt(&mut p, 1232, false, 0);
    p
}

/// The upstream's answer to `question`: one A record, TTL 300.
fn answer(question: &[u8]) -> Vec<u8> {
    let mut r = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    r.extend_from_slice(question);
    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 1, 0x2c, 0, 4, 10, 96, 0, 1]);
    r
}

/// A real `Context` (loopback settings, nothing bound) with `NAME` cached.
fn context() -> Arc<Context> {
    let args = Args {
        listen: vec!["127.0.0.1:5353".into()],
        upstreams: vec!["127.0.0.1:5354".into()],
        workers: Some(1),
        ..Default::default()
    };
    let env = Environment {
        resolv_conf: PathBuf::from("/nonexistent"),
        kube_dns_upstream: None,
    };
    let settings = config::load(&args)
        .and_then(|f| f.validate(&env))
        .expect("valid settings");
    let zones = settings.zones.iter().map(|z| z.name.clone()).collect();
    let ctx = Context::new(Arc::new(settings), Metrics::new(zones), Clock::real());
    let pkt = query_packet();
    let q = dns::parse_query(&pkt).expect("valid query");
    let question = &pkt[dns::HEADER_LEN..q.question_end];
    let resp = dns::parse_response(&answer(question), question).expect("valid answer");
    assert_eq!(resp.kind, AnswerKind::Positive);
    let zone = ctx.settings.zones.route(q.qname_lower()) as u16;
    let entry = Entry::new(
        resp.wire,
        resp.ttl_offsets,
        q.key_flags(),
        resp.kind,
        zone,
        Instant::now(),
        Duration::from_secs(3600),
    );
    assert!(ctx
        .cache
        .insert(ctx.cache.key(q.question_lower(), q.key_flags()), entry));
    ctx
}

fn bench(c: &mut Criterion) {
    let ctx = context();
    // As a UDP worker's: hits counted with plain loads and stores (one writing thread).
    let stats = ctx
        .metrics
        .new_udp_worker_for("dns://127.0.0.1:5353".into());
    // As the TCP listener's: relaxed fetch_add, any thread.
    let shared = ctx.metrics.new_worker_for("dns://127.0.0.1:5353".into());
    let pkt = query_packet();
    let src: SocketAddr = "10.0.0.7:40000".parse().unwrap();
    let mut out = Vec::with_capacity(65535);
    assert!(matches!(
        ctx.handle(&pkt, src, Proto::Udp, &stats, &mut out, Instant::now()),
        Handled::Hit(_)
    ));

    let mut g = c.benchmark_group("hit_path");
    g.bench_function("with_metrics", |b| {
        b.iter(|| {
            let start = Instant::now();
            let h = ctx.handle(black_box(&pkt), src, Proto::Udp, &stats, &mut out, start);
            if let Handled::Hit(t) = h {
                stats.hit_durations(&[t], start.elapsed());
            }
            black_box((matches!(h, Handled::Hit(_)), out.len()))
        })
    });
    g.bench_function("with_metrics_shared_counters", |b| {
        b.iter(|| {
            let start = Instant::now();
            let h = ctx.handle(black_box(&pkt), src, Proto::Udp, &shared, &mut out, start);
            if let Handled::Hit(t) = h {
                shared.hit_durations(&[t], start.elapsed());
            }
            black_box((matches!(h, Handled::Hit(_)), out.len()))
        })
    });
    g.bench_function("without_metrics", |b| {
        // `Context::handle` minus `stats.record` and the query-log sampling check.
        b.iter(|| {
            let pkt = black_box(&pkt[..]);
            let start = Instant::now();
            let q = dns::parse_query(pkt).expect("valid query");
            let max_len = q.max_udp_reply(ctx.settings.server.edns_udp_size);
            let key = ctx.cache.key(q.question_lower(), q.key_flags());
            let hit = ctx.cache.lookup(key, &q, start, |e, age| {
                e.render(
                    &q,
                    pkt,
                    age,
                    max_len,
                    ctx.settings.server.edns_udp_size,
                    &mut out,
                );
                (e.zone, e.kind)
            });
            black_box((hit, start.elapsed(), out.len()))
        })
    });
    g.finish();

    let q = dns::parse_query(&pkt).expect("valid query");
    let reply = out.clone();
    let mut g = c.benchmark_group("record");
    for (label, stats) in [("sole_writer", &stats), ("shared", &shared)] {
        g.bench_function(label, |b| {
            b.iter(|| {
                let answered = Answered {
                    zone: 0,
                    proto: Proto::Udp,
                    ipv6: false,
                    query: black_box(&q),
                    req_len: pkt.len(),
                    reply: black_box(&reply),
                };
                stats.record(
                    &answered,
                    Some(AnswerKind::Positive),
                    black_box(Duration::from_micros(3)),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
