//! The pooled UDP upstream sockets: replies matched strictly (a forged reply on a pool socket is
//! dropped and the real answer still arrives), sockets retired after their query bound or age
//! (source ports observed at the upstream), the fresh-socket mode, and many concurrent misses
//! demultiplexed correctly against a real knotd.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::knot::Knot;
use crate::common::*;
use hickory_proto::op::Message;
use hickory_proto::rr::{RData, RecordType};

/// How the scripted upstream answers each query.
#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// The answer only.
    Plain,
    /// First a reply with another ID, then one with the right ID for another question, then the
    /// answer.
    ForgeFirst,
}

/// A UDP upstream on 127.0.0.1 recording the source port of every query (the readiness probe
/// `. NS` left out) and answering `NAME A` with 192.0.2.1.
struct PortLog {
    addr: SocketAddr,
    ports: Arc<Mutex<Vec<u16>>>,
    stop: Arc<AtomicBool>,
}

impl PortLog {
    fn start(script: Script) -> PortLog {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let ports = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (ports.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !s.load(Ordering::Relaxed) {
                let Ok((n, src)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(question) = q.queries.first() else {
                    continue;
                };
                if question.name().is_root() {
                    let _ = sock.send_to(
                        &reply(&q, hickory_proto::op::ResponseCode::NoError)
                            .to_vec()
                            .unwrap(),
                        src,
                    );
                    continue;
                }
                p.lock().unwrap().push(src.port());
                if script == Script::ForgeFirst {
                    let mut wrong_id = a_reply(&q, 60, &[[192, 0, 2, 66]]);
                    wrong_id.metadata.id = q.metadata.id ^ 0x5a5a;
                    let _ = sock.send_to(&wrong_id.to_vec().unwrap(), src);
                    let other = query_msg("forged.example.", RecordType::A, q.metadata.id, None);
                    let wrong_question = a_reply(&other, 60, &[[192, 0, 2, 66]]);
                    let _ = sock.send_to(&wrong_question.to_vec().unwrap(), src);
                }
                let _ = sock.send_to(&a_reply(&q, 60, &[[192, 0, 2, 1]]).to_vec().unwrap(), src);
            }
        });
        PortLog { addr, ports, stop }
    }

    fn ports(&self) -> Vec<u16> {
        self.ports.lock().unwrap().clone()
    }
}

impl Drop for PortLog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// nodedns with one worker in front of `up` (every zone over UDP), with `forward` lines added to
/// its config file.
fn nodedns(up: SocketAddr, forward: &str) -> (Nodedns, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nodedns.toml");
    std::fs::write(&cfg, format!("[forward]\n{forward}\n")).unwrap();
    let up = up.to_string();
    let n = Nodedns::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--cluster-dns",
        &up,
        "--workers",
        "1",
        "--metrics",
        "127.0.0.1:0",
        "--health",
        "off",
    ]);
    (n, dir)
}

fn first_a(m: &Message) -> Option<[u8; 4]> {
    m.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(a.0.octets()),
        _ => None,
    })
}

fn metric(n: &Nodedns, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(n.metrics.expect("metrics address")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `count` misses, one after another, each answered 192.0.2.1.
fn sequential_misses(n: &Nodedns, tag: &str, count: usize) {
    for i in 0..count {
        let r = udp_query(n.dns, &format!("q{i}.{tag}.example."), RecordType::A);
        assert_eq!(first_a(&r), Some([192, 0, 2, 1]), "answer {i}: {r:?}");
    }
}

#[test]
fn forged_replies_on_a_pool_socket_are_dropped_and_the_answer_still_arrives() {
    let up = PortLog::start(Script::ForgeFirst);
    let (n, _dir) = nodedns(up.addr, "");
    sequential_misses(&n, "forge", 20);
    // Each query drew two forgeries; the reader dropped both (none matched the query's ID and
    // question), and the query took the real answer that followed.
    let dropped = metric(&n, "nodedns_upstream_unmatched_replies_total");
    assert!(dropped >= 40.0, "forgeries counted: {dropped}");
}

#[test]
fn pooled_sockets_are_reused_within_their_bound() {
    let up = PortLog::start(Script::Plain);
    let (n, _dir) = nodedns(
        up.addr,
        "udp_pool_size = 64\nudp_socket_queries = 1000\nudp_socket_lifetime = \"1h\"",
    );
    sequential_misses(&n, "reuse", 300);
    let ports = up.ports();
    assert_eq!(ports.len(), 300);
    let distinct: HashSet<u16> = ports.iter().copied().collect();
    // One worker: at most 64 sockets, none retired.
    assert!(distinct.len() <= 64, "{} ports", distinct.len());
    assert!(distinct.len() > 1);
}

#[test]
fn pooled_sockets_retire_after_their_query_bound() {
    let up = PortLog::start(Script::Plain);
    let (n, _dir) = nodedns(
        up.addr,
        "udp_pool_size = 64\nudp_socket_queries = 3\nudp_socket_lifetime = \"1h\"",
    );
    sequential_misses(&n, "bound", 300);
    let ports = up.ports();
    assert_eq!(ports.len(), 300);
    let distinct: HashSet<u16> = ports.iter().copied().collect();
    // Each socket carries at most 3 queries: at least 100 sockets, so about 100 ports (the kernel
    // may hand a closed socket's port out again, rarely: a margin of 10).
    assert!(
        distinct.len() >= 90,
        "{} ports for 300 queries",
        distinct.len()
    );
}

#[test]
fn pooled_sockets_retire_after_their_lifetime() {
    let up = PortLog::start(Script::Plain);
    let (n, _dir) = nodedns(
        up.addr,
        "udp_pool_size = 64\nudp_socket_queries = 1000\nudp_socket_lifetime = \"100ms\"",
    );
    for i in 0..12 {
        sequential_misses(&n, &format!("age{i}"), 1);
        // Longer than the lifetime: the next query finds every socket worn out.
        std::thread::sleep(Duration::from_millis(150));
    }
    let distinct: HashSet<u16> = up.ports().into_iter().collect();
    assert!(
        distinct.len() >= 10,
        "{} ports for 12 queries",
        distinct.len()
    );
}

#[test]
fn fresh_mode_opens_a_socket_per_query() {
    let up = PortLog::start(Script::Plain);
    let (n, _dir) = nodedns(up.addr, "udp_pool_size = 0");
    sequential_misses(&n, "fresh", 100);
    let distinct: HashSet<u16> = up.ports().into_iter().collect();
    assert!(
        distinct.len() >= 90,
        "{} ports for 100 queries",
        distinct.len()
    );
}

#[test]
fn a_pool_smaller_than_64_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nodedns.toml");
    std::fs::write(&cfg, "[forward]\nudp_pool_size = 8\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nodedns"))
        .args(["--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(["--upstream", "127.0.0.1:9", "--state-dir", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("forward.udp_pool_size"), "{err}");
}

/// knotd answering `nI.pool.test A` with an address that encodes I, on a loopback port.
fn pool_knot(names: usize) -> Knot {
    let records: String = (0..names)
        .map(|i| {
            let [a, b, c, e] = expected(i);
            format!("n{i} A {a}.{b}.{c}.{e}\n")
        })
        .collect();
    Knot::start(&[("pool.test", &records)])
}

fn expected(i: usize) -> [u8; 4] {
    [10, 77, (i >> 8) as u8, (i & 255) as u8]
}

/// 16 clients, each keeping 8 distinct misses out at once (128 outstanding over a pool of 64
/// sockets, so sockets carry several queries at a time), 2048 names in all: every answer is the
/// one for its own name.
#[test]
fn concurrent_misses_are_demultiplexed_against_knotd() {
    if !require(&["knotd", "dig"], false) {
        return;
    }
    const CLIENTS: usize = 16;
    const PER_CLIENT: usize = 128;
    const WINDOW: usize = 8;
    let knot = pool_knot(CLIENTS * PER_CLIENT);
    let (n, _dir) = nodedns(knot.addr, "");
    let server = n.dns;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 2048];
                let mut wrong = Vec::new();
                for chunk in (0..PER_CLIENT).collect::<Vec<_>>().chunks(WINDOW) {
                    let mut out: HashMap<u16, usize> = HashMap::new();
                    for &k in chunk {
                        let i = c * PER_CLIENT + k;
                        let id = (k as u16) + 1;
                        let q =
                            query_msg(&format!("n{i}.pool.test."), RecordType::A, id, Some(1232));
                        s.send_to(&q.to_vec().unwrap(), server).unwrap();
                        out.insert(id, i);
                    }
                    while !out.is_empty() {
                        let len = s.recv(&mut buf).expect("every miss answered within 5 s");
                        let r = Message::from_vec(&buf[..len]).unwrap();
                        let i = out.remove(&r.metadata.id).expect("a reply to a query sent");
                        let name = r.queries[0].name().to_ascii();
                        if name != format!("n{i}.pool.test.") || first_a(&r) != Some(expected(i)) {
                            wrong.push((i, name, first_a(&r)));
                        }
                    }
                }
                wrong
            })
        })
        .collect();
    let wrong: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(wrong.is_empty(), "answers for the wrong name: {wrong:?}");
    assert_eq!(metric(&n, "nodedns_upstream_unmatched_replies_total"), 0.0);
}
