//! The miss path against upstreams that misbehave or are many: transports by zone (pooled TCP
//! for cluster names, UDP elsewhere, TCP after truncation), pooled connections (concurrency,
//! reconnects, the idle close), and failover past silent or SERVFAILing upstreams.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::core::{answering, start};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

#[test]
fn cluster_names_go_over_tcp_and_others_over_udp() {
    let coredns = answering(30);
    let vpc = answering(30);
    let nd = start(&vpc, Some(&coredns), &[]);
    for name in [
        "kubernetes.default.svc.cluster.local.",
        "10.0.96.10.in-addr.arpa.",
        "1.0.0.0.ip6.arpa.",
    ] {
        let r = udp_query(nd.dns, name, RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
    }
    let r = udp_query(nd.dns, "www.example.com.", RecordType::A);
    assert_eq!(r.answers.len(), 1);
    let cq = coredns.queries();
    assert_eq!(cq.len(), 3, "{cq:?}");
    assert!(cq.iter().all(|(_, _, via)| *via == Via::Tcp), "{cq:?}");
    let vq = vpc.queries();
    assert_eq!(
        vq,
        vec![("www.example.com".to_string(), RecordType::A, Via::Udp)]
    );
}

#[test]
fn pooled_tcp_carries_concurrent_queries() {
    let coredns = answering(30);
    let vpc = answering(30);
    let nd = start(&vpc, Some(&coredns), &[]);
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let addr = nd.dns;
            std::thread::spawn(move || {
                udp_query(
                    addr,
                    &format!("svc-{i}.ns.svc.cluster.local."),
                    RecordType::A,
                )
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap().answers.len(), 1);
    }
    assert_eq!(coredns.queries().len(), 40);
    assert!(coredns.queries().iter().all(|q| q.2 == Via::Tcp));
}

#[test]
fn truncated_udp_answer_is_retried_over_tcp() {
    let vpc = FakeUpstream::start(|m, via| {
        let mut r = txt_reply(m, 30, 3000);
        if via == Via::Udp {
            r = r.truncate();
            r.metadata.truncation = true;
        }
        Action::Answer(r)
    });
    let nd = start(&vpc, None, &[]);
    // A TCP client gets the whole answer.
    let r = &tcp_pipeline(
        nd.dns,
        &[query_msg("big.example.", RecordType::TXT, 7, Some(1232))],
    )[0];
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 1);
    let vias: Vec<Via> = vpc.queries().iter().map(|q| q.2).collect();
    assert_eq!(vias, vec![Via::Udp, Via::Tcp]);
    // A UDP client with a 1232-byte buffer gets TC=1 from the cache, and no new upstream query.
    let r = udp_query(nd.dns, "big.example.", RecordType::TXT);
    assert!(
        r.metadata.truncation,
        "answer over the client's size must set TC"
    );
    assert!(r.answers.is_empty());
    assert_eq!(vpc.queries().len(), 2);
}

#[test]
fn silent_upstream_is_skipped_and_all_silent_gives_servfail_in_time() {
    let silent = FakeUpstream::start(|_, _| Action::Silence);
    let good = answering(30);
    let both = format!("{}", silent.addr);
    let nd = Nodedns::start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &both,
        "--upstream",
        &good.arg(),
        "--metrics",
        "off",
        "--health",
        "off",
    ]);
    // Whichever upstream is tried first, the answer arrives within one attempt timeout (1 s).
    let t = Instant::now();
    for i in 0..4 {
        let r = udp_query(nd.dns, &format!("q{i}.example."), RecordType::A);
        assert_eq!(r.answers.len(), 1);
    }
    assert!(
        t.elapsed() < Duration::from_millis(4 * 1300),
        "{:?}",
        t.elapsed()
    );
    assert!(
        !silent.queries().is_empty(),
        "the silent upstream was tried"
    );
    assert_eq!(good.queries().len(), 4);

    let silent2 = FakeUpstream::start(|_, _| Action::Silence);
    let nd = Nodedns::start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &silent.arg(),
        "--upstream",
        &silent2.arg(),
        "--metrics",
        "off",
        "--health",
        "off",
    ]);
    let t = Instant::now();
    let r = udp_query(nd.dns, "dead.example.", RecordType::A);
    let took = t.elapsed();
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3500),
        "{took:?}"
    );
    assert_eq!(
        silent2.count("dead.example"),
        1,
        "the next upstream was tried"
    );
}

#[test]
fn servfail_tries_the_next_upstream_and_is_cached_briefly() {
    let failing = FakeUpstream::start(|m, _| Action::Answer(reply(m, ResponseCode::ServFail)));
    let nd = start(&failing, None, &[]);
    let r = udp_query(nd.dns, "broken.example.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    udp_query(nd.dns, "broken.example.", RecordType::A);
    assert_eq!(
        failing.count("broken.example"),
        1,
        "SERVFAIL cached for servfail_ttl"
    );
}

#[test]
fn pooled_tcp_reconnects_when_the_upstream_closes_and_closes_when_idle() {
    // A CoreDNS stand-in that closes every connection right after answering.
    let coredns =
        FakeUpstream::start(|m, _| Action::AnswerThenClose(a_reply(m, 30, &[[10, 1, 0, 1]])));
    let vpc = answering(30);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[forward]\ntcp_idle_timeout = \"1s\"\ntcp_pool_size = 1\n",
    )
    .unwrap();
    let nd = start(&vpc, Some(&coredns), &["--config", cfg.to_str().unwrap()]);
    for i in 0..8 {
        let r = udp_query(
            nd.dns,
            &format!("s{i}.ns.svc.cluster.local."),
            RecordType::A,
        );
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "query {i}");
        assert_eq!(r.answers.len(), 1, "query {i}");
    }
    assert!(coredns.queries().iter().all(|q| q.2 == Via::Tcp));

    // A well-behaved upstream: one pooled connection (pools are per thread: one worker, pool size
    // 1) carries the queries, and nodedns closes it after forward.tcp_idle_timeout without
    // queries (before CoreDNS's own 10 s), though the worker is idle, blocked in recvmmsg.
    let coredns2 = answering(30);
    let nd2 = start(
        &vpc,
        Some(&coredns2),
        &["--config", cfg.to_str().unwrap(), "--workers", "1"],
    );
    let open = || tcp_conns(coredns2.addr);
    // The readiness probe at start (". NS", asked until an upstream answers) runs on the shared
    // runtime, on a connection of its own: once it has asked and that connection has gone idle
    // and closed, only the worker's remains to be seen.
    let deadline = Instant::now() + Duration::from_secs(4);
    while coredns2.probes() + vpc.probes() == 0 || open() > 0 {
        assert!(
            Instant::now() < deadline,
            "the probe's connection was not closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..3 {
        udp_query(
            nd2.dns,
            &format!("t{i}.ns.svc.cluster.local."),
            RecordType::A,
        );
    }
    assert_eq!(open(), 1, "one pooled connection carried the queries");
    let deadline = Instant::now() + Duration::from_secs(4);
    while open() > 0 {
        assert!(
            Instant::now() < deadline,
            "idle pooled connection not closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And a new query opens a new one.
    assert_eq!(
        udp_query(nd2.dns, "u.ns.svc.cluster.local.", RecordType::A)
            .answers
            .len(),
        1
    );
}

/// A worker's cluster miss written on an open pooled connection that the server then closes
/// without answering is asked again at once on a new connection, and answered: no wait for the
/// attempt's timeout, no SERVFAIL.
#[test]
fn a_cluster_miss_on_a_connection_closed_under_it_is_retried_on_a_new_one() {
    let seen = std::sync::Mutex::new(std::collections::HashSet::new());
    let coredns = FakeUpstream::start(move |m, _| {
        let name = m.queries[0].name().to_ascii();
        if name.starts_with("drop-") && seen.lock().unwrap().insert(name) {
            return Action::Close;
        }
        Action::Answer(a_reply(m, 30, &[[10, 1, 0, 2]]))
    });
    let vpc = answering(30);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[forward]\ntcp_pool_size = 1\ntimeout = \"2s\"\n").unwrap();
    let nd = start(
        &vpc,
        Some(&coredns),
        &["--config", cfg.to_str().unwrap(), "--workers", "1"],
    );
    // Opens the worker's connection (a task does), so the next misses are the worker's own.
    let r = udp_query(nd.dns, "warm.ns.svc.cluster.local.", RecordType::A);
    assert_eq!(r.answers.len(), 1);
    for i in 0..3 {
        let name = format!("drop-{i}.ns.svc.cluster.local.");
        let t = Instant::now();
        let r = udp_query(nd.dns, &name, RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(r.answers.len(), 1, "{name}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{name} waited {:?}: not retried when its connection closed",
            t.elapsed()
        );
        assert_eq!(coredns.count(name.trim_end_matches('.')), 2, "{name}");
    }
}

/// Established TCP connections whose local end is `server` (read from /proc/net/tcp).
fn tcp_conns(server: std::net::SocketAddr) -> usize {
    let port = format!("{:04X}", server.port());
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[1].ends_with(&format!(":{port}")) && f[3] == "01"
        })
        .count()
}
