//! Answering when upstreams fail and keeping upstreams quiet: serve-stale (RFC 8767), coalescing
//! of identical misses, prefetch of popular names, health checks of upstreams. Real nodedns
//! processes on loopback, or the server in this process (`Inproc`) where a test lets TTLs and
//! windows pass: its clock is advanced instead of slept on. The upstreams are scripted fakes,
//! since each test scripts a fault.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

/// Starts nodedns on loopback with `up` as every upstream, plus `extra` flags.
fn start(up: &str, extra: &[&str]) -> Nodedns {
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        up,
        "--cluster-dns",
        up,
    ];
    args.extend_from_slice(extra);
    Nodedns::start(&args)
}

/// Writes a config file and returns its path (kept alive by the TempDir).
fn config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nodedns.toml");
    std::fs::write(&p, text).unwrap();
    let s = p.to_str().unwrap().to_string();
    (dir, s)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn scrape(n: &Nodedns) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(n.metrics.expect("metrics address")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// Sends every query at once and collects each reply with its latency. Queries go out over
/// sockets of 25 each, so no socket's receive buffer overflows when the replies come together.
fn burst(server: SocketAddr, msgs: &[Message], wait: Duration) -> Vec<Option<(Message, Duration)>> {
    const PER_SOCKET: usize = 25;
    let socks: Vec<UdpSocket> = (0..msgs.len().div_ceil(PER_SOCKET))
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let sent_at: Vec<Instant> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            socks[i / PER_SOCKET]
                .send_to(&m.to_vec().unwrap(), server)
                .unwrap();
            Instant::now()
        })
        .collect();
    let mut got: Vec<Option<(Message, Duration)>> = vec![None; msgs.len()];
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 4096];
    while Instant::now() < deadline && got.iter().any(Option::is_none) {
        let mut any = false;
        for (k, s) in socks.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                any = true;
                let Ok(m) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let range = k * PER_SOCKET..((k + 1) * PER_SOCKET).min(msgs.len());
                if let Some(i) = range
                    .clone()
                    .find(|&i| msgs[i].metadata.id == m.metadata.id)
                {
                    if got[i].is_none() {
                        got[i] = Some((m, sent_at[i].elapsed()));
                    }
                }
            }
        }
        if !any {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    got
}

/// EDE info-code 3 (Stale Answer) in the reply's OPT record.
fn has_stale_ede(m: &Message) -> bool {
    let Ok(wire) = m.to_vec() else { return false };
    // The OPT record is last: its RDATA holds option 15 with INFO-CODE 3.
    wire.windows(6).any(|w| w == [0, 15, 0, 2, 0, 3])
}

#[test]
fn expired_names_are_served_stale_while_upstreams_are_silent_then_refreshed() {
    // 0: answer with 10.0.0.x (TTL 1); 1: silent; 2: answer with 10.9.0.x.
    let mode = Arc::new(AtomicU8::new(0));
    let handler = |mode: Arc<AtomicU8>| {
        move |q: &Message, _: Via| {
            let name = q.queries[0].name().to_ascii();
            let i: u8 = name
                .trim_start_matches(['c', 'e'])
                .split('.')
                .next()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0);
            match mode.load(Ordering::Relaxed) {
                1 => Action::Silence,
                0 => Action::Answer(a_reply(q, 1, &[[10, 0, 0, i]])),
                _ => Action::Answer(a_reply(q, 1, &[[10, 9, 0, i]])),
            }
        }
    };
    let cluster = FakeUpstream::start(handler(mode.clone()));
    let external = FakeUpstream::start(handler(mode.clone()));
    let (_d, cfg) = config(
        "[cache]\nmin_ttl = \"1s\"\nstale_recheck = \"2s\"\n[forward]\ntimeout = \"500ms\"\nquery_timeout = \"1s\"\n",
    );
    let n = Inproc::start(&[
        "--config",
        &cfg,
        "--cluster-dns",
        &cluster.arg(),
        "--upstream",
        &external.arg(),
    ]);
    // 200 cluster names (pooled TCP upstream) and 200 external ones (UDP).
    let names: Vec<String> = (0..200u32)
        .map(|i| format!("c{}.default.svc.cluster.local", i % 250))
        .chain((0..200u32).map(|i| format!("e{}.example.org", i % 250)))
        .collect();
    let queries = |base: u16| -> Vec<Message> {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                query_msg(name, RecordType::A, base.wrapping_add(i as u16), Some(1232))
            })
            .collect()
    };
    let warm = burst(n.dns, &queries(1000), Duration::from_secs(5));
    assert!(warm
        .iter()
        .all(|r| r.as_ref().is_some_and(|(m, _)| m.answers.len() == 1)));

    // Past the 1 s TTL (the refreshes below fail on real time: the upstream timeouts).
    mode.store(1, Ordering::Relaxed);
    n.advance(Duration::from_millis(1500));
    let stale = burst(n.dns, &queries(5000), Duration::from_secs(4));
    let mut slowest = Duration::ZERO;
    for (i, r) in stale.iter().enumerate() {
        let (m, took) = r
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no answer", names[i]));
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NoError,
            "{}",
            names[i]
        );
        assert_eq!(m.answers.len(), 1, "{}", names[i]);
        assert_eq!(m.answers[0].ttl, 30, "{}: stale TTL", names[i]);
        assert!(has_stale_ede(m), "{}: no EDE 3", names[i]);
        slowest = slowest.max(*took);
    }
    eprintln!("400 expired names, upstreams silent: 400 answered stale, slowest {slowest:?}");
    assert!(slowest < Duration::from_secs(2), "slowest {slowest:?}");
    // Within the recheck time the next ask is answered stale at once, without waiting.
    let again = burst(n.dns, &queries(9000)[..20], Duration::from_secs(2));
    for r in &again {
        let (m, took) = r.as_ref().expect("answered");
        assert!(
            has_stale_ede(m) && *took < Duration::from_millis(500),
            "{took:?}"
        );
    }
    // One stale answer per query answered: 400 and 20.
    let m = n.metrics();
    assert_eq!(metric(&m, "coredns_cache_served_stale_total"), 420.0, "{m}");

    // Upstreams back: still inside the recheck time, stale answers without asking.
    mode.store(2, Ordering::Relaxed);
    let asked = external.queries().len() + cluster.queries().len();
    n.advance(Duration::from_millis(1999));
    let held = burst(n.dns, &queries(17000)[..20], Duration::from_secs(2));
    for r in &held {
        let (m, _) = r.as_ref().expect("answered");
        assert!(has_stale_ede(m), "{m:?}");
    }
    assert_eq!(
        external.queries().len() + cluster.queries().len(),
        asked,
        "asked upstream within the recheck time"
    );
    // Once the recheck time is over, fresh answers replace the stale ones.
    n.advance(Duration::from_millis(201));
    let fresh = burst(n.dns, &queries(13000), Duration::from_secs(4));
    for (i, r) in fresh.iter().enumerate() {
        let (m, _) = r.as_ref().expect("answered");
        let rdata = m.answers[0].data.to_string();
        assert!(rdata.starts_with("10.9.0."), "{}: {rdata}", names[i]);
        assert!(!has_stale_ede(m), "{}", names[i]);
        assert_eq!(m.answers[0].ttl, 1, "{}: a fresh answer's TTL", names[i]);
    }
    n.shutdown();
}

#[test]
fn identical_misses_share_one_upstream_exchange() {
    let up = FakeUpstream::start(|q, _| {
        std::thread::sleep(Duration::from_millis(300));
        Action::Answer(a_reply(q, 60, &[[192, 0, 2, 99]]))
    });
    let n = start(&up.arg(), &["--metrics", "127.0.0.1:0", "--health", "off"]);
    let msgs: Vec<Message> = (0..500u16)
        .map(|i| query_msg("popular.example.org", RecordType::A, 20000 + i, None))
        .collect();
    let got = burst(n.dns, &msgs, Duration::from_secs(5));
    let answered = got
        .iter()
        .filter(|r| r.as_ref().is_some_and(|(m, _)| m.answers.len() == 1))
        .count();
    let asked = up.count("popular.example.org");
    eprintln!("500 identical misses: {answered} answered, {asked} upstream queries");
    assert_eq!(answered, 500);
    assert!(asked <= 2, "{asked} upstream queries");
    let m = scrape(&n);
    assert!(
        metric(&m, "nodedns_forward_coalesced_total") >= 400.0,
        "{m}"
    );
}

#[test]
fn a_popular_name_is_refreshed_before_it_expires() {
    let up = FakeUpstream::start(|q, _| Action::Answer(a_reply(q, 5, &[[192, 0, 2, 5]])));
    let n = Inproc::start(&["--upstream", &up.arg(), "--cluster-dns", &up.arg()]);
    // 12 s of one query every 50 ms: two lifetimes of the 5 s TTL and more. With the defaults
    // (prefetch = 2, prefetch_percentage = 10) the first hit in the last 0.5 s of a lifetime
    // refreshes the entry; the clock waits for the refresh to land, so the new lifetime starts
    // at that hit.
    let step = Duration::from_millis(50);
    let (mut now, mut stored) = (Duration::ZERO, Duration::ZERO);
    let mut refreshed = 0;
    while now <= Duration::from_secs(12) {
        let m = udp_query(n.dns, "hot.example.org", RecordType::A);
        assert_eq!(m.answers.len(), 1, "at {now:?}");
        let age = now - stored;
        assert_eq!(
            m.answers[0].ttl as u64,
            5 - age.as_secs(),
            "at {now:?}, stored at {stored:?}"
        );
        if age >= Duration::from_millis(4500) {
            refreshed += 1;
            let deadline = Instant::now() + Duration::from_secs(5);
            while n.metric("coredns_cache_prefetch_total") < refreshed as f64 {
                assert!(Instant::now() < deadline, "no prefetch at {now:?}");
                std::thread::sleep(Duration::from_millis(1));
            }
            stored = now;
        }
        n.advance(step);
        now += step;
    }
    let m = n.metrics();
    let misses = metric(&m, "coredns_cache_misses_total");
    let prefetches = metric(&m, "coredns_cache_prefetch_total");
    let asked = up.count("hot.example.org");
    eprintln!("241 queries over 12 s: {misses} client misses, {prefetches} prefetches, {asked} upstream queries");
    assert_eq!(misses, 1.0, "only the first query may miss:\n{m}");
    assert_eq!((prefetches, asked), (2.0, 3), "refreshed at 4.5 s and 9 s");
    n.shutdown();
}

#[test]
fn a_recovered_upstream_is_used_again_within_a_second() {
    let a_up = Arc::new(AtomicBool::new(false));
    let a = {
        let up = a_up.clone();
        FakeUpstream::start(move |q, _| {
            if up.load(Ordering::Relaxed) {
                Action::Answer(a_reply(q, 60, &[[192, 0, 2, 1]]))
            } else {
                Action::Silence
            }
        })
    };
    let b = FakeUpstream::start(|q, _| Action::Answer(a_reply(q, 60, &[[192, 0, 2, 2]])));
    let (_d, cfg) = config("[forward]\ntimeout = \"300ms\"\nquery_timeout = \"1s\"\n");
    // Two upstreams for the names asked, a first.
    let (a_arg, b_arg) = (a.arg(), b.arg());
    let n = Nodedns::start(&[
        "--config",
        &cfg,
        "--listen",
        "127.0.0.1:0",
        "--metrics",
        "127.0.0.1:0",
        "--health",
        "off",
        "--upstream",
        &a_arg,
        "--upstream",
        &b_arg,
        "--cluster-dns",
        &b_arg,
    ]);
    let mut k = 0;
    let mut ask = |count: usize| {
        for _ in 0..count {
            k += 1;
            let r = udp_query(n.dns, &format!("u{k}.example.org"), RecordType::A);
            assert_eq!(r.answers.len(), 1);
        }
    };
    // Until a is marked down (two failures in a row), then it gets no client queries.
    ask(6);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !n.log().contains("marked down") {
        assert!(Instant::now() < deadline, "{}", n.log());
        ask(1);
    }
    let before = a.queries().len();
    ask(10);
    let probes = a.probes();
    assert_eq!(
        a.queries().len(),
        before,
        "a down upstream got client queries"
    );

    a_up.store(true, Ordering::Relaxed);
    let recovered = Instant::now();
    let deadline = recovered + Duration::from_secs(3);
    while !n.log().contains("back in rotation") {
        assert!(Instant::now() < deadline, "{}", n.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let back_after = recovered.elapsed();
    ask(10);
    let used = a.queries().len() - before;
    eprintln!(
        "upstream back in rotation {back_after:?} after it recovered; then {used} of 10 queries"
    );
    assert!(back_after < Duration::from_secs(1), "{back_after:?}");
    assert!(
        used >= 3,
        "{used} of 10 queries went to the recovered upstream"
    );
    // Probe failures, not lost exchanges, are what the health-check metric counts.
    let m = scrape(&n);
    let failures = metric(&m, "coredns_forward_healthcheck_failures_total");
    assert!(
        probes > 0 && failures >= 1.0 && failures <= a.probes() as f64,
        "{failures}, {probes}\n{m}"
    );
}

#[test]
fn a_lost_exchange_is_no_health_check_failure() {
    // The first query is dropped, every later one answered.
    let dropped = Arc::new(AtomicBool::new(false));
    let up = {
        let d = dropped.clone();
        FakeUpstream::start(move |q, _| {
            if !d.swap(true, Ordering::Relaxed) && !q.queries[0].name().is_root() {
                Action::Silence
            } else {
                Action::Answer(a_reply(q, 60, &[[192, 0, 2, 3]]))
            }
        })
    };
    let (_d, cfg) = config("[forward]\ntimeout = \"300ms\"\nquery_timeout = \"1s\"\n");
    let n = start(
        &up.arg(),
        &[
            "--config",
            &cfg,
            "--metrics",
            "127.0.0.1:0",
            "--health",
            "off",
        ],
    );
    let _ = udp_raw(
        n.dns,
        &query_msg("lost.example.org", RecordType::A, 1, None)
            .to_vec()
            .unwrap(),
        Duration::from_secs(2),
    );
    let r = udp_query(n.dns, "next.example.org", RecordType::A);
    assert_eq!(r.answers.len(), 1);
    let m = scrape(&n);
    assert_eq!(
        metric(&m, "coredns_forward_healthcheck_failures_total"),
        0.0,
        "{m}"
    );
}

#[test]
fn an_upstream_that_refuses_the_root_probe_still_makes_us_ready() {
    // An authoritative-only server (CoreDNS with just the kubernetes plugin) refuses `. NS`.
    let up = FakeUpstream::start(|q, _| {
        if q.queries[0].name().is_root() {
            Action::Answer(reply(q, ResponseCode::Refused))
        } else {
            Action::Answer(a_reply(q, 60, &[[10, 96, 0, 1]]))
        }
    });
    let n = start(&up.arg(), &["--health", "127.0.0.1:0", "--metrics", "off"]);
    let addr = n.health.expect("health address");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET /ready HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/ready never 200: {out}\n{}",
            n.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(up.probes() >= 1);
}

/// Hundreds of misses out at once, about half of them sent first to a silent upstream: each of
/// those fails over to the other upstream one attempt timeout (1 s) after it was sent, and every
/// query is answered; the ones the silent upstream never saw are answered at once.
#[test]
fn a_burst_of_misses_fails_over_from_a_silent_upstream_each_after_one_timeout() {
    let silent = FakeUpstream::start(|_, _| Action::Silence);
    let good = FakeUpstream::start(|q, _| Action::Answer(a_reply(q, 60, &[[192, 0, 2, 7]])));
    let n = Nodedns::start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &silent.arg(),
        "--upstream",
        &good.arg(),
        "--metrics",
        "off",
        "--health",
        "off",
    ]);
    let names: Vec<String> = (0..300).map(|i| format!("burst{i}.example.org")).collect();
    let msgs: Vec<Message> = names
        .iter()
        .enumerate()
        .map(|(i, name)| query_msg(name, RecordType::A, 30000 + i as u16, None))
        .collect();
    let got = burst(n.dns, &msgs, Duration::from_secs(6));
    let asked_silent: std::collections::HashSet<String> = silent
        .queries()
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    assert!(
        (50..=250).contains(&asked_silent.len()),
        "the first upstream rotates: {} of 300 went to the silent one",
        asked_silent.len()
    );
    for (name, r) in names.iter().zip(&got) {
        let (m, took) = r.as_ref().unwrap_or_else(|| panic!("{name} unanswered"));
        assert_eq!(m.answers.len(), 1, "{name}");
        if asked_silent.contains(name.as_str()) {
            assert!(
                *took >= Duration::from_millis(950) && *took < Duration::from_millis(1800),
                "{name}, sent to the silent upstream first, answered after {took:?}"
            );
        } else {
            assert!(*took < Duration::from_millis(900), "{name} took {took:?}");
        }
    }
}
