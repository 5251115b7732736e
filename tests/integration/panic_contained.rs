//! A panic on a packet path costs that query, never the server: it is answered SERVFAIL, counted
//! in `coredns_panics_total`, and every other query keeps being answered, over UDP (hit path and
//! miss task) and TCP (the connection included).
//!
//! The panics come from the debug-only hook of `server::contain` (`NODEDNS_TEST_PANIC`: the
//! cache lookup; `NODEDNS_TEST_PANIC_MISS`: the miss task), compiled only with
//! `debug_assertions`, so only into the binary these tests run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

use crate::common::*;

const HIT_PANIC: &str = "boom.example.org.";
const MISS_PANIC: &str = "boom-miss.example.org.";

fn metric(n: &Nodedns, name: &str) -> f64 {
    let addr = n.metrics.expect("metrics address");
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("HTTP response");
    raw.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape"))
}

fn ask_udp(dns: SocketAddr, name: &str) -> Message {
    let q = query_msg(name, RecordType::A, rand_id(), Some(1232));
    let r = udp_raw(dns, &q.to_vec().unwrap(), Duration::from_secs(3)).expect("an answer");
    let m = Message::from_vec(&r).expect("parseable");
    assert_eq!(m.metadata.id, q.metadata.id);
    m
}

#[test]
fn a_panic_answers_servfail_is_counted_and_the_server_goes_on() {
    let up = FakeUpstream::start(|q, _| Action::Answer(a_reply(q, 300, &[[192, 0, 2, 7]])));
    let arg = up.arg();
    let n = Nodedns::start_env(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &arg,
            "--cluster-dns",
            &arg,
            "--workers",
            "2",
            "--metrics",
            "127.0.0.1:0",
        ],
        &[
            ("NODEDNS_TEST_PANIC", HIT_PANIC),
            ("NODEDNS_TEST_PANIC_MISS", MISS_PANIC),
        ],
    );
    let before = metric(&n, "coredns_panics_total");
    // A cached name, answered from the cache between the panics.
    assert_eq!(ask_udp(n.dns, "fine.example.org").answers.len(), 1);
    let mut panics = 0.0;
    // More rounds than workers, each from a new socket (SO_REUSEPORT spreads them): every
    // worker panics at least once with high probability, and must still be there after.
    for round in 0..8 {
        for name in [HIT_PANIC, MISS_PANIC] {
            let r = ask_udp(n.dns, name);
            assert_eq!(r.metadata.response_code, ResponseCode::ServFail, "{name}");
            assert_eq!(r.queries.len(), 1, "the question is echoed");
            panics += 1.0;
        }
        let r = ask_udp(n.dns, "fine.example.org");
        assert_eq!(r.answers.len(), 1, "a hit after round {round}'s panics");
        let r = ask_udp(n.dns, &format!("new{round}.example.org"));
        assert_eq!(r.answers.len(), 1, "a miss after round {round}'s panics");
    }
    // TCP: the panicking message gets SERVFAIL and the same connection answers the others
    // (misses complete out of order: replies are matched by ID).
    let msgs: Vec<Message> = ["fine.example.org", HIT_PANIC, MISS_PANIC, "tcp.example.org"]
        .iter()
        .map(|name| query_msg(name, RecordType::A, rand_id(), None))
        .collect();
    let replies = tcp_pipeline(n.dns, &msgs);
    assert_eq!(replies.len(), msgs.len(), "one reply per message");
    for q in &msgs {
        let name = q.queries[0].name().to_ascii();
        let r = replies
            .iter()
            .find(|r| r.metadata.id == q.metadata.id)
            .unwrap_or_else(|| panic!("no reply to {name}"));
        let want = if name == HIT_PANIC || name == MISS_PANIC {
            ResponseCode::ServFail
        } else {
            ResponseCode::NoError
        };
        assert_eq!(r.metadata.response_code, want, "{name} over TCP");
    }
    panics += 2.0;
    assert_eq!(metric(&n, "coredns_panics_total") - before, panics);
    assert!(
        n.log().contains("test panic on a query for"),
        "the panic is logged"
    );
}
