//! End-to-end tests of the core: the real binary on loopback, in front of fake
//! upstreams that record how each query reached them. Tests that let TTLs run down serve from
//! this process instead (`Inproc`), with a clock they advance rather than sleep on.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use crate::common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

pub(crate) fn start(
    upstream: &FakeUpstream,
    cluster: Option<&FakeUpstream>,
    extra: &[&str],
) -> Nodedns {
    let up = upstream.arg();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--metrics",
        "off",
        "--health",
        "off",
    ];
    if !extra.contains(&"--workers") {
        args.extend(["--workers", "2"]);
    }
    let cl = cluster.map(|c| c.arg());
    if let Some(cl) = &cl {
        args.extend(["--cluster-dns", cl]);
    }
    args.extend_from_slice(extra);
    Nodedns::start(&args)
}

/// The server in this process, with a manual clock, in front of `upstream`.
fn start_inproc(upstream: &FakeUpstream, extra: &[&str]) -> Inproc {
    let up = upstream.arg();
    let mut args = vec!["--upstream", &up];
    args.extend_from_slice(extra);
    Inproc::start(&args)
}

pub(crate) fn answering(ttl: u32) -> FakeUpstream {
    FakeUpstream::start(move |m, _| Action::Answer(a_reply(m, ttl, &[[10, 0, 0, 1]])))
}

#[test]
fn cache_hit_makes_no_upstream_query_and_ttl_falls() {
    let vpc = answering(300);
    // No prefetch: the last hit before expiry would refresh the entry.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[cache]\nprefetch = 0\n").unwrap();
    let nd = start_inproc(&vpc, &["--config", cfg.to_str().unwrap()]);
    let first = udp_query(nd.dns, "www.example.com.", RecordType::A);
    assert_eq!(first_ttl(&first), 30, "TTL capped at 30 s");
    nd.advance(Duration::from_millis(2100));
    let second = udp_query(nd.dns, "WWW.example.COM.", RecordType::A);
    assert_eq!(
        vpc.count("www.example.com"),
        1,
        "second query served from cache"
    );
    assert_eq!(
        first_ttl(&second),
        28,
        "TTL decremented by the whole seconds of age"
    );
    // A TCP hit ages the entry the same way.
    let over_tcp = tcp_pipeline(
        nd.dns,
        &[query_msg("www.example.com.", RecordType::A, 11, None)],
    );
    assert_eq!(first_ttl(&over_tcp[0]), 28);
    // Other types and the DO bit are other keys.
    udp_query(nd.dns, "www.example.com.", RecordType::AAAA);
    assert_eq!(vpc.count("www.example.com"), 2);
    // Served from the cache to the last millisecond of its 30 s, asked again at 30 s.
    nd.advance(Duration::from_millis(30_000 - 2100 - 1));
    assert_eq!(
        first_ttl(&udp_query(nd.dns, "www.example.com.", RecordType::A)),
        1
    );
    assert_eq!(vpc.count("www.example.com"), 2);
    nd.advance(Duration::from_millis(1));
    let renewed = udp_query(nd.dns, "www.example.com.", RecordType::A);
    assert_eq!(vpc.count("www.example.com"), 3, "expired after 30 s");
    assert_eq!(first_ttl(&renewed), 30);
    nd.shutdown();
}

#[test]
fn negative_answers_follow_the_soa() {
    let vpc = FakeUpstream::start(|m, _| {
        let name = m.queries[0].name().to_ascii();
        Action::Answer(if name.starts_with("nosoa") {
            negative_reply(m, ResponseCode::NXDomain, None)
        } else if name.starts_with("nodata") {
            negative_reply(m, ResponseCode::NoError, Some((300, 2)))
        } else {
            // min(SOA TTL 2, MINIMUM 600) = 2 s.
            negative_reply(m, ResponseCode::NXDomain, Some((2, 600)))
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    // No prefetch: the last hit before expiry would refresh the entry.
    std::fs::write(&cfg, "[cache]\nmin_ttl = \"1s\"\nprefetch = 0\n").unwrap();
    let nd = start_inproc(&vpc, &["--config", cfg.to_str().unwrap()]);
    for name in ["nx.example.", "nodata.example.", "nosoa.example."] {
        let r = udp_query(nd.dns, name, RecordType::A);
        assert!(r.answers.is_empty());
        let r2 = udp_query(nd.dns, name, RecordType::A);
        assert_eq!(r.metadata.response_code, r2.metadata.response_code);
    }
    assert_eq!(vpc.count("nx.example"), 1, "NXDOMAIN with SOA is cached");
    assert_eq!(vpc.count("nodata.example"), 1, "NODATA with SOA is cached");
    assert_eq!(
        vpc.count("nosoa.example"),
        2,
        "no SOA: not cached (RFC 2308 §5)"
    );
    let r = udp_query(nd.dns, "nx.example.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(r.authorities[0].ttl, 2, "SOA TTL is the negative TTL");
    // Cached to the last millisecond of min(SOA TTL, MINIMUM) = 2 s, the SOA TTL aging with it.
    nd.advance(Duration::from_millis(1999));
    let r = udp_query(nd.dns, "nx.example.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(r.authorities[0].ttl, 1);
    assert_eq!(vpc.count("nx.example"), 1);
    nd.advance(Duration::from_millis(1));
    udp_query(nd.dns, "nx.example.", RecordType::A);
    assert_eq!(
        vpc.count("nx.example"),
        2,
        "expired after min(SOA TTL, MINIMUM)"
    );
    nd.shutdown();
}

#[test]
fn case_and_id_are_echoed_and_edns_is_per_hop() {
    let vpc = answering(30);
    let nd = start(&vpc, None, &[]);
    for (i, name) in [
        "MiXeD.ExAmPlE.oRg.",
        "mixed.example.org.",
        "MIXED.EXAMPLE.ORG.",
    ]
    .iter()
    .enumerate()
    {
        let q = query_msg(
            name,
            RecordType::A,
            0x1000 + i as u16,
            if i == 1 { None } else { Some(4096) },
        );
        let raw = q.to_vec().unwrap();
        let r = udp_raw(nd.dns, &raw, Duration::from_secs(3)).unwrap();
        assert_eq!(&r[..2], &raw[..2], "ID echoed");
        let qlen = 4 + name.len() + 1;
        assert_eq!(
            &r[12..12 + qlen],
            &raw[12..12 + qlen],
            "question bytes echoed exactly (0x20)"
        );
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(
            m.edns.is_some(),
            i != 1,
            "OPT only when the client sent one"
        );
        if let Some(e) = &m.edns {
            assert_eq!(e.max_payload(), 1232, "our own OPT, not the upstream's");
        }
    }
    assert_eq!(vpc.count("mixed.example.org"), 1);
}

#[test]
fn pipelined_tcp_queries_all_get_answers() {
    let vpc = answering(30);
    let nd = start(&vpc, None, &[]);
    udp_query(nd.dns, "cached.example.", RecordType::A);
    let msgs: Vec<Message> = (0..30u16)
        .map(|i| {
            let name = if i % 3 == 0 {
                "cached.example.".to_string()
            } else {
                format!("n{i}.example.")
            };
            query_msg(&name, RecordType::A, 100 + i, None)
        })
        .collect();
    let answers = tcp_pipeline(nd.dns, &msgs);
    let mut ids: Vec<u16> = answers.iter().map(|a| a.metadata.id).collect();
    ids.sort();
    assert_eq!(ids, (100..130).collect::<Vec<_>>());
    for a in &answers {
        let want = if a.metadata.id % 3 == 1 {
            "cached.example."
        } else {
            ""
        };
        if !want.is_empty() {
            assert_eq!(a.queries[0].name().to_ascii(), want);
        }
        assert_eq!(a.answers.len(), 1);
    }
}

#[test]
fn garbage_leaves_the_server_serving() {
    let vpc = answering(30);
    let nd = start(&vpc, None, &[]);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9E3779B97F4A7C15u64;
    let valid = query_msg("ok.example.", RecordType::A, 5, Some(1232))
        .to_vec()
        .unwrap();
    for i in 0..3000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut pkt = if i % 2 == 0 {
            valid.clone()
        } else {
            vec![0u8; (seed % 600) as usize]
        };
        for (j, b) in pkt.iter_mut().enumerate() {
            if i % 2 == 1 || (seed >> (j % 64)) & 7 == 0 {
                *b = (seed >> (j % 57)) as u8;
            }
        }
        s.send_to(&pkt, nd.dns).unwrap();
    }
    // FORMERR for two questions, NOTIMP for an unknown opcode, with the client's ID.
    let mut two = valid.clone();
    two[5] = 2;
    let r = udp_raw(nd.dns, &two, Duration::from_secs(3)).unwrap();
    assert_eq!((&r[..2], r[3] & 0xF), (&two[..2], 1));
    let mut status = valid.clone();
    status[2] = (status[2] & 0x87) | (2 << 3);
    let r = udp_raw(nd.dns, &status, Duration::from_secs(3)).unwrap();
    assert_eq!(r[3] & 0xF, 4);
    // Still serving, over UDP and TCP.
    let r = udp_query(nd.dns, "ok.example.", RecordType::A);
    assert_eq!(r.answers.len(), 1);
    let r = tcp_pipeline(nd.dns, &[query_msg("ok.example.", RecordType::A, 9, None)]);
    assert_eq!(r[0].answers.len(), 1);
    // Garbage over TCP closes that connection only.
    let mut t = std::net::TcpStream::connect(nd.dns).unwrap();
    std::io::Write::write_all(&mut t, &[0, 5, 1, 2, 3, 4, 5, 0xFF, 0xFF]).unwrap();
    drop(t);
    assert_eq!(
        udp_query(nd.dns, "ok.example.", RecordType::A)
            .answers
            .len(),
        1
    );
}

/// The library's entry point stops when its token is cancelled: `Inproc::shutdown` returns only
/// once the workers and the TCP server are gone, so the ports are free (nothing else may bind a
/// port our SO_REUSEPORT sockets still hold without the option).
#[test]
fn the_in_process_server_stops_and_releases_its_ports() {
    let vpc = answering(30);
    let nd = start_inproc(&vpc, &[]);
    let dns = nd.dns;
    assert_eq!(udp_query(dns, "x.example.", RecordType::A).answers.len(), 1);
    let r = tcp_pipeline(dns, &[query_msg("x.example.", RecordType::A, 3, None)]);
    assert_eq!(r[0].answers.len(), 1);
    nd.shutdown();
    UdpSocket::bind(dns).expect("UDP port released");
    std::net::TcpListener::bind(dns).expect("TCP port released");
}

#[test]
fn sigterm_exits_zero_after_in_flight_queries() {
    let vpc = answering(30);
    let mut nd = start(&vpc, None, &["--lameduck", "0s"]);
    udp_query(nd.dns, "x.example.", RecordType::A);
    nd.signal(libc::SIGTERM);
    let st = nd
        .wait_exit(Duration::from_secs(5))
        .expect("exits within the grace period");
    assert!(st.success(), "{st:?}");
    // The ports are free again.
    UdpSocket::bind(nd.dns).expect("UDP port released");
    std::net::TcpListener::bind(nd.dns).expect("TCP port released");
}

/// A miss still waiting for its upstream when SIGTERM comes is answered before the process exits:
/// the worker that took it keeps its runtime going for the grace period.
#[test]
fn sigterm_answers_misses_still_in_flight() {
    let slow = FakeUpstream::start(|m, _| {
        // Only the test's name is slow (not the readiness probe).
        if m.queries
            .first()
            .is_some_and(|q| q.name().to_ascii().starts_with("slow"))
        {
            std::thread::sleep(Duration::from_millis(800));
        }
        Action::Answer(a_reply(m, 30, &[[10, 0, 0, 7]]))
    });
    let mut nd = start(&slow, None, &["--lameduck", "0s"]);
    let dns = nd.dns;
    let client = std::thread::spawn(move || udp_query(dns, "slow.example.", RecordType::A));
    // The query is out to the upstream (which answers after 800 ms) when the signal comes.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(slow.count("slow.example"), 1);
    nd.signal(libc::SIGTERM);
    let r = client.join().expect("client thread");
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(r.answers.len(), 1, "the upstream's answer was relayed");
    let st = nd
        .wait_exit(Duration::from_secs(5))
        .expect("exits within the grace period");
    assert!(st.success(), "{st:?}");
}

#[test]
fn a_second_instance_can_share_the_addresses() {
    let vpc = answering(30);
    let a = start(&vpc, None, &[]);
    let addr = a.dns.to_string();
    let b = Nodedns::start(&[
        "--listen",
        &addr,
        "--upstream",
        &vpc.arg(),
        "--metrics",
        "off",
        "--health",
        "off",
    ]);
    assert_eq!(b.dns, a.dns);
    assert_eq!(
        udp_query(a.dns, "shared.example.", RecordType::A)
            .answers
            .len(),
        1
    );
    drop(a);
    assert_eq!(
        udp_query(b.dns, "shared2.example.", RecordType::A)
            .answers
            .len(),
        1
    );
}

#[test]
fn check_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[forward]\ntimeout = \"soon\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nodedns"))
        .args([
            "--check-config",
            "--config",
            bad.to_str().unwrap(),
            "--upstream",
            "127.0.0.1:53",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("forward.timeout") && err.contains("expected a duration"),
        "{err}"
    );
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[cache]\nsize = 5\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nodedns"))
        .args([
            "--check-config",
            "--config",
            unknown.to_str().unwrap(),
            "--upstream",
            "127.0.0.1:53",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `size`"));
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "listen = [\"127.0.0.1:5399\"]\nupstreams = [\"127.0.0.1:53\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nodedns"))
        .args([
            "--check-config",
            "--config",
            good.to_str().unwrap(),
            "--workers",
            "3",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("workers = 3") && printed.contains("127.0.0.1:5399"),
        "{printed}"
    );
}

#[test]
fn silent_tcp_clients_neither_stall_others_nor_stay_forever() {
    let vpc = answering(30);
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[server]\ntcp_idle_timeout = \"1s\"\n").unwrap();
    let nd = start(&vpc, None, &["--config", cfg.to_str().unwrap()]);
    // Clients that connect and send nothing, or half a length prefix, or never read.
    let mut idle: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect(nd.dns).unwrap())
        .collect();
    std::io::Write::write_all(&mut idle[0], &[0]).unwrap();
    let t = Instant::now();
    let r = tcp_pipeline(
        nd.dns,
        &[query_msg("busy.example.", RecordType::A, 3, None)],
    );
    assert_eq!(r[0].answers.len(), 1);
    assert_eq!(
        udp_query(nd.dns, "busy2.example.", RecordType::A)
            .answers
            .len(),
        1
    );
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // After the idle timeout the server has closed them: a read sees EOF.
    let s = &mut idle[1];
    s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
    let mut b = [0u8; 1];
    let n = std::io::Read::read(s, &mut b).expect("closed, not timed out");
    assert_eq!(n, 0, "server closed the idle connection");
}

#[test]
fn a_burst_of_queries_is_answered_in_full_over_ipv4_and_ipv6() {
    let vpc = answering(30);
    for listen in ["127.0.0.1:0", "[::1]:0"] {
        let nd = Nodedns::start(&[
            "--listen",
            listen,
            "--upstream",
            &vpc.arg(),
            "--workers",
            "1",
            "--metrics",
            "off",
            "--health",
            "off",
        ]);
        udp_query(nd.dns, "warm.example.", RecordType::A);
        let bind = if nd.dns.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        let s = UdpSocket::bind(bind).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        // Rounds of 40 sent back to back, so the worker reads them in batches: hits and misses
        // mixed. (Rounds keep every socket buffer on the way far from full: UDP would drop.)
        let mut seen = vec![false; 400];
        let mut buf = [0u8; 4096];
        for round in 0..10u16 {
            for i in round * 40..(round + 1) * 40 {
                let name = if i % 2 == 0 {
                    "warm.example.".to_string()
                } else {
                    format!("m{i}.{listen}.example.").replace([':', '[', ']'], "x")
                };
                s.send_to(
                    &query_msg(&name, RecordType::A, i, None).to_vec().unwrap(),
                    nd.dns,
                )
                .unwrap();
            }
            for _ in 0..40 {
                let (n, from) = s.recv_from(&mut buf).expect("every query answered");
                assert_eq!(from, nd.dns);
                let m = Message::from_vec(&buf[..n]).unwrap();
                assert_eq!(m.answers.len(), 1);
                seen[m.metadata.id as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "{listen}");
    }
}

#[test]
fn metrics_and_health_can_share_one_port() {
    let vpc = answering(30);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("127.0.0.1:{port}");
    let nd = Nodedns::start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &vpc.arg(),
        "--metrics",
        &admin,
        "--health",
        &admin,
    ]);
    assert_eq!(nd.metrics, nd.health);
    assert_eq!(nd.metrics.unwrap().port(), port);
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(
            &mut s,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut s, &mut body).unwrap();
        body
    };
    assert!(get("/health").starts_with("HTTP/1.1 200"));
    assert!(get("/metrics").contains("coredns_build_info"));
}
