//! Observability, end to end: the real binary on loopback, a fake upstream on 127.0.0.1, and
//! `/metrics` scraped over HTTP and read with a real Prometheus text parser. Checks that the
//! CoreDNS-named counters and histograms move with hits, misses, NXDOMAIN and SERVFAIL, that
//! `/ready` follows startup and shutdown (lameduck), that a flood of malformed packets cannot
//! flood the log, and the JSON and query log formats.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::common::{a_reply, negative_reply, reply, udp_query, Action, FakeUpstream, Nodedns};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use prometheus_parse::{Scrape, Value};

/// One HTTP/1.1 GET; returns the status code and the body.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to admin endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("HTTP response");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {raw:?}"));
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

fn scrape(n: &Nodedns) -> Scrape {
    let (status, body) = http_get(n.metrics.expect("metrics address"), "/metrics");
    assert_eq!(status, 200, "GET /metrics");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid Prometheus text")
}

fn matches(s: &prometheus_parse::Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
}

/// Sum of the counter, gauge or untyped samples of `name` whose labels include `labels`.
fn sum(m: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .map(|s| match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => panic!("{name} is not a scalar"),
        })
        .sum()
}

/// How many samples of `name` have `labels` (0: the series is absent).
fn present(m: &Scrape, name: &str, labels: &[(&str, &str)]) -> usize {
    m.samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .count()
}

/// Cumulative count of the histogram `name` in its bucket `le` (f64::INFINITY: all), summed over
/// the series whose labels include `labels` (0 when there are none yet).
fn bucket(m: &Scrape, name: &str, labels: &[(&str, &str)], le: f64) -> f64 {
    m.samples
        .iter()
        .filter(|s| matches(s, name, labels))
        .map(|s| match &s.value {
            Value::Histogram(b) => {
                b.iter()
                    .find(|c| c.less_than == le)
                    .unwrap_or_else(|| panic!("{name} has no bucket le={le}"))
                    .count
            }
            _ => panic!("{name} is not a histogram"),
        })
        .sum()
}

/// Upstream script: `hit.example` → A, `nx.example` → NXDOMAIN with SOA, `fail.example` →
/// SERVFAIL, anything else (the `. NS` readiness probe) → empty NOERROR.
fn script(m: &Message) -> Message {
    match m.queries[0].name().to_ascii().to_lowercase().as_str() {
        "hit.example." => a_reply(m, 300, &[[192, 0, 2, 1]]),
        "nx.example." => negative_reply(m, ResponseCode::NXDomain, Some((300, 300))),
        "fail.example." => reply(m, ResponseCode::ServFail),
        _ => reply(m, ResponseCode::NoError),
    }
}

fn scripted_upstream() -> FakeUpstream {
    FakeUpstream::start(|m, _| Action::Answer(script(m)))
}

fn start(up: &FakeUpstream, extra: &[&str], env: &[(&str, &str)]) -> Nodedns {
    let arg = up.arg();
    let mut args = vec![
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &arg,
        "--workers",
        "1",
        "--metrics",
        "127.0.0.1:0",
        "--health",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Nodedns::start_env(&args, env)
}

/// Polls `/ready` until it answers `want`; panics after `within`.
fn wait_ready(n: &Nodedns, want: u16, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = http_get(n.health.expect("health address"), "/ready");
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/ready still {status} ({body}), want {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn metrics_follow_hits_misses_nxdomain_and_servfail() {
    let up = scripted_upstream();
    let n = start(&up, &[], &[]);
    wait_ready(&n, 200, Duration::from_secs(10));
    let to = up.arg();
    let server = format!("dns://{}", n.dns);
    let before = scrape(&n);

    // Present from the start, whatever the traffic.
    for t in [
        "iptables",
        "iptables_lock",
        "interface_add",
        "interface_check",
        "configmap",
    ] {
        let l = [("errortype", t)];
        assert_eq!(
            present(&before, "coredns_nodecache_setup_errors_total", &l),
            1,
            "{t}"
        );
        assert_eq!(
            sum(&before, "coredns_nodecache_setup_errors_total", &l),
            0.0
        );
    }
    let version = [("version", env!("CARGO_PKG_VERSION"))];
    assert_eq!(sum(&before, "coredns_build_info", &version), 1.0);
    let build = before
        .samples
        .iter()
        .find(|s| s.metric == "coredns_build_info")
        .unwrap();
    assert!(build.labels.get("revision").is_some());
    let goversion = build.labels.get("goversion").unwrap_or_default();
    assert!(goversion.starts_with("rust1."), "goversion={goversion}");
    assert_eq!(present(&before, "coredns_panics_total", &[]), 1);
    assert_eq!(sum(&before, "coredns_panics_total", &[]), 0.0);
    assert!(sum(&before, "process_resident_memory_bytes", &[]) > 1e6);
    assert!(sum(&before, "process_open_fds", &[]) > 3.0);
    assert_eq!(present(&before, "process_cpu_seconds_total", &[]), 1);
    assert_eq!(present(&before, "nodedns_forward_inflight", &[]), 1);
    assert_eq!(present(&before, "coredns_cache_entries", &[]), 2);
    assert_eq!(
        present(&before, "coredns_cache_hits_total", &[("server", &server)]),
        2
    );

    // 3 × A (1 miss, 2 hits), 2 × NXDOMAIN (1 miss, 1 denial hit), 1 × SERVFAIL (miss).
    for _ in 0..3 {
        let r = udp_query(n.dns, "hit.example.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert_eq!(r.answers.len(), 1);
    }
    for _ in 0..2 {
        let r = udp_query(n.dns, "nx.example.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }
    let r = udp_query(n.dns, "fail.example.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);

    let after = scrape(&n);
    let d = |name: &str, labels: &[(&str, &str)]| {
        sum(&after, name, labels) - sum(&before, name, labels)
    };
    let srv = ("server", server.as_str());

    let a = [
        srv,
        ("zone", "."),
        ("proto", "udp"),
        ("family", "1"),
        ("type", "A"),
    ];
    assert_eq!(d("coredns_dns_requests_total", &a), 6.0);
    assert_eq!(d("coredns_dns_requests_total", &[]), 6.0);
    let rc = |rcode| {
        d(
            "coredns_dns_responses_total",
            &[srv, ("zone", "."), ("rcode", rcode)],
        )
    };
    assert_eq!(rc("NOERROR"), 3.0);
    assert_eq!(rc("NXDOMAIN"), 2.0);
    assert_eq!(rc("SERVFAIL"), 1.0);
    // `plugin` names who answered, as CoreDNS labels it: the cache or the forwarder.
    let by = |rcode, plugin| {
        d(
            "coredns_dns_responses_total",
            &[srv, ("rcode", rcode), ("plugin", plugin)],
        )
    };
    assert_eq!(by("NOERROR", "cache"), 2.0);
    assert_eq!(by("NOERROR", "forward"), 1.0);
    assert_eq!(by("NXDOMAIN", "cache"), 1.0);
    assert_eq!(by("SERVFAIL", "forward"), 1.0);
    assert_eq!(
        d("coredns_cache_hits_total", &[srv, ("type", "success")]),
        2.0
    );
    assert_eq!(
        d("coredns_cache_hits_total", &[srv, ("type", "denial")]),
        1.0
    );
    assert_eq!(d("coredns_cache_misses_total", &[srv]), 3.0);
    assert_eq!(d("coredns_cache_requests_total", &[srv]), 6.0);

    // The duration histogram: every query counted, CoreDNS's bounds plus finer ones below them.
    let dur = "coredns_dns_request_duration_seconds";
    let dl = [srv, ("zone", "."), ("type", "A")];
    let delta = |le| bucket(&after, dur, &dl, le) - bucket(&before, dur, &dl, le);
    assert_eq!(delta(f64::INFINITY), 6.0);
    assert_eq!(d(&format!("{dur}_count"), &dl), 6.0);
    assert!(d(&format!("{dur}_sum"), &dl) > 0.0);
    for le in [0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.008, 8.192] {
        bucket(&after, dur, &dl, le); // panics if the bound is missing
    }
    // Cache hits answer well under 16 ms even in a debug build on a loaded machine.
    assert!(
        delta(0.016) >= 3.0,
        "hits in the low buckets: {}",
        delta(0.016)
    );
    let size = [srv, ("zone", "."), ("proto", "udp")];
    assert_eq!(d("coredns_dns_request_size_bytes_count", &size), 6.0);
    assert_eq!(d("coredns_dns_response_size_bytes_count", &size), 6.0);

    // Forwarding: exactly the three misses went upstream.
    let to_l = [("to", to.as_str())];
    assert_eq!(d("coredns_forward_requests_total", &to_l), 3.0);
    for rcode in ["NOERROR", "NXDOMAIN", "SERVFAIL"] {
        let l = [("to", to.as_str()), ("rcode", rcode)];
        assert_eq!(d("coredns_forward_responses_total", &l), 1.0, "{rcode}");
    }
    assert_eq!(
        d("coredns_forward_request_duration_seconds_count", &to_l),
        3.0
    );
    let ok = [("to", to.as_str()), ("transport", "udp"), ("outcome", "ok")];
    assert_eq!(d("nodedns_upstream_queries_total", &ok), 3.0);
    assert_eq!(sum(&after, "nodedns_forward_inflight", &[]), 0.0);
    assert_eq!(
        sum(&after, "coredns_forward_healthcheck_failures_total", &[]),
        0.0
    );

    // The cache holds the A answer and the NXDOMAIN (and the briefly cached SERVFAIL).
    assert!(sum(&after, "coredns_cache_entries", &[("type", "success")]) >= 1.0);
    assert!(sum(&after, "coredns_cache_entries", &[("type", "denial")]) >= 1.0);
    assert!(sum(&after, "coredns_cache_entries", &[]) >= 3.0);
    assert_eq!(sum(&after, "coredns_panics_total", &[]), 0.0);

    // The query log is off by default.
    assert!(!n.log().contains("nodedns::query"), "{}", n.log());
}

#[test]
fn ready_follows_upstream_then_turns_503_during_lameduck() {
    let answer = Arc::new(AtomicBool::new(false));
    let up = {
        let answer = answer.clone();
        FakeUpstream::start(move |m, _| {
            if answer.load(Ordering::Relaxed) {
                Action::Answer(script(m))
            } else {
                Action::Silence
            }
        })
    };
    let mut n = start(&up, &["--lameduck", "2s"], &[]);
    let health = n.health.unwrap();

    // Serving, but no upstream has answered yet.
    assert_eq!(http_get(health, "/health").0, 200);
    let (status, body) = http_get(health, "/ready");
    assert_eq!((status, body.as_str()), (503, "not ready"));

    answer.store(true, Ordering::Relaxed);
    assert_eq!(wait_ready(&n, 200, Duration::from_secs(15)), "ready");
    let r = udp_query(n.dns, "hit.example.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);

    n.signal(libc::SIGTERM);
    let term = Instant::now();
    assert_eq!(wait_ready(&n, 503, Duration::from_secs(1)), "shutting down");
    // Still answering, from the cache and through the upstream, while not ready.
    assert_eq!(http_get(health, "/health").0, 200);
    let r = udp_query(n.dns, "hit.example.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let r = udp_query(n.dns, "nx.example.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        term.elapsed() < Duration::from_secs(2),
        "checks ran past lameduck"
    );

    let status = n
        .wait_exit(Duration::from_secs(15))
        .expect("exits after lameduck");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        term.elapsed() >= Duration::from_millis(1900),
        "exited {:?} after SIGTERM, before the 2 s lameduck",
        term.elapsed()
    );
    assert!(n.log().contains("lameduck"), "{}", n.log());
}

/// A tiny deterministic generator for garbage packets.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn malformed_flood_logs_a_bounded_number_of_lines_and_keeps_serving() {
    let up = scripted_upstream();
    // Malformed packets are logged at debug.
    let n = start(&up, &[], &[("RUST_LOG", "debug")]);
    wait_ready(&n, 200, Duration::from_secs(10));
    let lines_before = n.log().lines().count();
    // The startup self-check (a STATUS query, answered NOTIMP) already counts as one.
    let malformed_before = sum(&scrape(&n), "nodedns_malformed_packets_total", &[]);

    const PACKETS: usize = 5000;
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for i in 0..PACKETS {
        let len = (rng.next() % 64) as usize;
        let mut pkt: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        match i % 4 {
            // A response (QR=1): dropped.
            0 if len >= 12 => pkt[2] |= 0x80,
            // Two questions in a query: FORMERR.
            1 if len >= 12 => {
                pkt[2] &= 0x07;
                pkt[4..6].copy_from_slice(&2u16.to_be_bytes());
            }
            // Shorter than a header: dropped.
            2 => pkt.truncate(len % 12),
            _ => {}
        }
        let _ = s.send_to(&pkt, n.dns);
        if i % 500 == 499 {
            // Let the worker keep up so most packets reach it rather than overflow the buffer.
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    // Still serving, hits and misses.
    let r = udp_query(n.dns, "hit.example.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let r = udp_query(n.dns, "hit.example.", RecordType::A);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let m = scrape(&n);
    let malformed = sum(&m, "nodedns_malformed_packets_total", &[]) - malformed_before;
    assert!(
        malformed >= (PACKETS / 2) as f64 && malformed <= PACKETS as f64,
        "malformed packets counted: {malformed}"
    );

    std::thread::sleep(Duration::from_millis(300)); // let the log reader catch up
    let log = n.log();
    let new: Vec<&str> = log.lines().skip(lines_before).collect();
    let rejected = new.iter().filter(|l| l.contains("rejected packet")).count();
    // One window of BURST lines, or two if the flood straddled a window boundary.
    let cap = 2 * nodedns::logging::BURST as usize;
    assert!(
        (1..=cap).contains(&rejected),
        "{rejected} 'rejected packet' lines for {malformed} malformed packets:\n{}",
        new.join("\n")
    );
    assert!(
        new.len() < 100,
        "{} log lines after {PACKETS} malformed packets:\n{}",
        new.len(),
        new.join("\n")
    );
}

#[test]
fn query_log_text_names_cache_and_upstream() {
    let up = scripted_upstream();
    let n = start(&up, &["--query-log", "1"], &[]);
    wait_ready(&n, 200, Duration::from_secs(10));
    udp_query(n.dns, "hit.example.", RecordType::A);
    udp_query(n.dns, "hit.example.", RecordType::A);
    udp_query(n.dns, "fail.example.", RecordType::AAAA);
    std::thread::sleep(Duration::from_millis(300));
    let log = n.log();
    let q: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("nodedns::query"))
        .collect();
    assert_eq!(q.len(), 3, "{log}");
    let up_field = format!("upstream={}", up.arg());
    for (line, cached, upstream, qtype, rcode) in [
        (
            q[0],
            "cached=false",
            up_field.as_str(),
            "qtype=A",
            "rcode=\"NOERROR\"",
        ),
        (
            q[1],
            "cached=true",
            "upstream=-",
            "qtype=A",
            "rcode=\"NOERROR\"",
        ),
        (
            q[2],
            "cached=false",
            up_field.as_str(),
            "qtype=AAAA",
            "rcode=\"SERVFAIL\"",
        ),
    ] {
        for want in [
            cached,
            upstream,
            qtype,
            rcode,
            "duration_us=",
            "client=127.0.0.1:",
        ] {
            assert!(line.contains(want), "{want:?} not in {line:?}");
        }
    }
    assert!(q[0].contains("name=hit.example") && q[2].contains("name=fail.example"));
}

/// nodedns started by hand (the shared harness reads addresses from text logs), with every
/// stderr line kept for inspection.
struct JsonChild {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for JsonChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn json_log_format_gives_json_lines_including_the_query_log() {
    let up = scripted_upstream();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nodedns"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up.arg(),
            "--workers",
            "1",
        ])
        .args(["--metrics", "127.0.0.1:0", "--health", "127.0.0.1:0"])
        .args([
            "--log-format",
            "json",
            "--query-log",
            "1",
            "--state-dir",
            "off",
        ])
        .env("RUST_LOG", "info")
        .env_remove("KUBE_DNS_UPSTREAM_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nodedns");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let p = JsonChild { child, lines: rx };

    let mut seen: Vec<serde_json::Value> = Vec::new();
    let next = |seen: &mut Vec<serde_json::Value>, within: Duration| -> Option<serde_json::Value> {
        let line = p.lines.recv_timeout(within).ok()?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
        for k in ["timestamp", "level", "target", "message"] {
            assert!(v.get(k).is_some(), "no {k:?} in {line}");
        }
        seen.push(v.clone());
        Some(v)
    };
    let mut dns: Option<SocketAddr> = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = next(&mut seen, left).unwrap_or_else(|| panic!("did not start: {seen:#?}"));
        let msg = v["message"].as_str().unwrap_or_default();
        if msg.starts_with("listening for UDP on") {
            dns = v["addr"].as_str().and_then(|a| a.parse().ok());
        }
        if msg.starts_with("nodedns ") && msg.ends_with(" serving") {
            break;
        }
    }
    let dns = dns.expect("the UDP listen address is a structured field");

    // The readiness probe may still be in flight; the queries below do not depend on it.
    udp_query(dns, "hit.example.", RecordType::A);
    udp_query(dns, "hit.example.", RecordType::A);
    udp_query(dns, "nx.example.", RecordType::AAAA);
    let mut queries = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while queries.len() < 3 && Instant::now() < deadline {
        if let Some(v) = next(&mut seen, Duration::from_millis(200)) {
            if v["target"] == "nodedns::query" {
                queries.push(v);
            }
        }
    }
    assert_eq!(queries.len(), 3, "query log lines: {seen:#?}");
    let upstream = up.arg();
    let expect = [
        ("hit.example.", "A", "NOERROR", false, upstream.as_str()),
        ("hit.example.", "A", "NOERROR", true, "-"),
        ("nx.example.", "AAAA", "NXDOMAIN", false, upstream.as_str()),
    ];
    for (v, (name, qtype, rcode, cached, upstream)) in queries.iter().zip(expect) {
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["message"], "query");
        assert_eq!(
            v["name"].as_str().map(|n| n.trim_end_matches('.')),
            Some(name.trim_end_matches('.')),
            "{v}"
        );
        assert_eq!(v["qtype"], qtype, "{v}");
        assert_eq!(v["rcode"], rcode, "{v}");
        assert_eq!(v["cached"], cached, "{v}");
        assert_eq!(v["upstream"], upstream, "{v}");
        assert!(v["duration_us"].is_u64(), "{v}");
        assert!(
            v["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{v}"
        );
    }
    drop(p);
}
