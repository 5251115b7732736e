//! Instances on one node: handover of sockets and cache to a new instance, warm restart from the
//! snapshot, refused snapshots, stray signals. Real processes on loopback, one state directory
//! per test; the namespace tests in `node_netns.rs` add the node's interface and rules.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

/// A port free for both UDP and TCP on 127.0.0.1 (an instance and its successor need the same
/// fixed port; port 0 is never handed over).
fn free_port() -> u16 {
    for _ in 0..50 {
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = u.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// An upstream answering every `nX.example.org` A query with 10.0.X/256.X%256, TTL 300.
fn upstream() -> FakeUpstream {
    FakeUpstream::start(|q, _| {
        let name = q.queries[0].name().to_ascii();
        let n: u32 = name
            .trim_start_matches('n')
            .split('.')
            .next()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0);
        Action::Answer(a_reply(
            q,
            300,
            &[[10, 0, (n / 256) as u8, (n % 256) as u8]],
        ))
    })
}

struct Node {
    dir: tempfile::TempDir,
    dns: SocketAddr,
    admin: SocketAddr,
    up: FakeUpstream,
}

impl Node {
    fn new() -> Node {
        Node {
            dir: state_dir(),
            dns: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            up: upstream(),
        }
    }

    fn start(&self, extra: &[&str]) -> Nodedns {
        let (dns, admin, up) = (self.dns.to_string(), self.admin.to_string(), self.up.arg());
        let dir = self.dir.path().to_str().unwrap().to_string();
        let mut args = vec![
            "--listen",
            &dns,
            "--upstream",
            &up,
            "--health",
            &admin,
            "--metrics",
            &admin,
            "--state-dir",
            &dir,
            "--lameduck",
            "500ms",
            "--workers",
            "2",
        ];
        args.extend_from_slice(extra);
        Nodedns::start(&args)
    }

    fn name(i: u32) -> String {
        format!("n{i}.example.org")
    }

    fn warm(&self, n: u32) {
        for i in 0..n {
            let r = udp_query(self.dns, &Self::name(i), RecordType::A);
            assert_eq!(r.answers.len(), 1);
            assert!(
                self.up.count(&Self::name(i)) >= 1,
                "{} never reached the upstream",
                Self::name(i)
            );
        }
    }

    /// How many of the first `n` names are answered without the upstream seeing them again.
    fn answered_from_cache(&self, n: u32) -> u32 {
        let before = self.up.queries().len();
        let mut hits = 0;
        for i in 0..n {
            let seen = self.up.count(&Self::name(i));
            let r = udp_query(self.dns, &Self::name(i), RecordType::A);
            assert_eq!(r.answers.len(), 1, "{}", Self::name(i));
            if self.up.count(&Self::name(i)) == seen {
                hits += 1;
            }
        }
        assert!(self.up.queries().len() >= before);
        hits
    }

    fn http(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

/// Waits until the log has a line containing `what`.
fn wait_log(n: &Nodedns, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !n.log().contains(what) {
        assert!(
            Instant::now() < deadline,
            "no {what:?} in the log:\n{}",
            n.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exit_ok(n: &mut Nodedns) {
    n.signal(libc::SIGTERM);
    let st = n
        .wait_exit(Duration::from_secs(20))
        .expect("exits on SIGTERM");
    assert!(st.success(), "exit status {st}:\n{}", n.log());
}

/// Sends queries one after another over UDP until `stop`; counts sent and unanswered.
fn udp_load(
    dns: SocketAddr,
    names: u32,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (mut sent, mut lost) = (0u64, 0u64);
        let mut buf = vec![0u8; 4096];
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let id = (sent as u16).wrapping_mul(7919);
            let q = query_msg(&Node::name(i % names), RecordType::A, id, None);
            s.send_to(&q.to_vec().unwrap(), dns).unwrap();
            sent += 1;
            i += 1;
            loop {
                match s.recv(&mut buf) {
                    Ok(n) if n >= 2 && buf[..2] == id.to_be_bytes() => break,
                    Ok(_) => continue,
                    Err(_) => {
                        lost += 1;
                        break;
                    }
                }
            }
        }
        (sent, lost)
    })
}

/// Sends queries one after another on ONE TCP connection until `stop`; counts sent and
/// unanswered (a closed connection ends the run with the rest counted as lost).
fn tcp_load(
    dns: SocketAddr,
    names: u32,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let mut s = TcpStream::connect(dns).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (mut sent, mut lost) = (0u64, 0u64);
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let q = query_msg(&Node::name(i % names), RecordType::A, i as u16, None);
            let w = q.to_vec().unwrap();
            let mut framed = (w.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&w);
            sent += 1;
            i += 1;
            let ok = s.write_all(&framed).is_ok() && {
                let mut len = [0u8; 2];
                s.read_exact(&mut len).is_ok() && {
                    let mut b = vec![0u8; u16::from_be_bytes(len) as usize];
                    s.read_exact(&mut b).is_ok()
                        && Message::from_vec(&b)
                            .map(|m| m.answers.len() == 1)
                            .unwrap_or(false)
                }
            };
            if !ok {
                lost += 1;
                break;
            }
        }
        (sent, lost)
    })
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_new_instance_takes_over_sockets_cache_and_connections_with_nothing_lost() {
    let node = Node::new();
    let mut old = node.start(&[]);
    node.warm(300);

    let stop = Arc::new(AtomicBool::new(false));
    let udp = udp_load(node.dns, 300, stop.clone());
    let tcp = tcp_load(node.dns, 300, stop.clone());
    std::thread::sleep(Duration::from_millis(300));

    let new = node.start(&[]);
    let log = new.log();
    assert!(log.contains("took over the listening sockets"), "{log}");
    assert!(
        log.contains("cache warmed") && log.contains("handover"),
        "{log}"
    );
    // The admin port now belongs to the new instance.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = node.http("/metrics");
        if metric(&m, "nodedns_handovers_total{role=\"took\"}") == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "admin port not handed over:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        node.http("/ready").contains("200"),
        "{}",
        node.http("/ready")
    );

    std::thread::sleep(Duration::from_millis(300));
    exit_ok(&mut old);
    let old_log = old.log();
    assert!(
        old_log.contains("another instance serves this node"),
        "{old_log}"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (usent, ulost) = udp.join().unwrap();
    let (tsent, tlost) = tcp.join().unwrap();
    eprintln!("handover under load: UDP {ulost} lost of {usent}, TCP {tlost} lost of {tsent}");
    assert!(
        usent > 100 && tsent > 100,
        "load too small: {usent} {tsent}"
    );
    assert_eq!(ulost, 0, "UDP queries lost during the handover");
    assert_eq!(
        tlost, 0,
        "the TCP connection lost queries during the handover"
    );
    assert!(
        new.log().contains("took over TCP connections"),
        "{}",
        new.log()
    );

    // Every warmed name comes from the cache the old instance handed over.
    let before = node.up.queries().len();
    let hits = node.answered_from_cache(300);
    assert!(hits >= 285, "{hits} of 300 warmed names from the cache");
    assert_eq!(node.up.queries().len(), before + (300 - hits as usize));
    assert!(new.log().contains("serving"));
}

#[test]
fn a_plain_restart_starts_warm_from_the_snapshot() {
    let node = Node::new();
    let mut first = node.start(&[]);
    node.warm(200);
    exit_ok(&mut first);
    assert!(
        first.log().contains("cache snapshot written"),
        "{}",
        first.log()
    );
    // The last instance tears down and says nothing of another.
    assert!(!first.log().contains("another instance serves"));

    let second = node.start(&[]);
    // The snapshot loads beside the running workers.
    wait_log(&second, "cache warmed");
    assert!(
        second.log().contains("source=\"snapshot\"") || second.log().contains("source=snapshot"),
        "{}",
        second.log()
    );
    let hits = node.answered_from_cache(200);
    eprintln!("plain restart: {hits} of 200 warmed names answered from the snapshot");
    assert!(hits >= 190, "{hits} of 200 warmed names from the snapshot");
    let m = node.http("/metrics");
    assert_eq!(
        metric(
            &m,
            "nodedns_cache_warm_loads_total{result=\"ok\",source=\"snapshot\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn corrupt_truncated_and_future_snapshots_are_refused_and_counted() {
    let node = Node::new();
    let mut first = node.start(&[]);
    node.warm(50);
    exit_ok(&mut first);
    let path = node.dir.path().join("cache.snapshot");
    let good = std::fs::read(&path).unwrap();
    assert!(good.len() > 100);
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x40;
    let mut future = good.clone();
    // The version follows the 8-byte magic.
    future[8] = future[8].wrapping_add(1);
    for (bytes, label) in [
        (flipped, "checksum_mismatch"),
        (good[..good.len() - 7].to_vec(), "truncated"),
        (future, "unsupported_version"),
        (b"not a snapshot at all, just some text".to_vec(), "foreign"),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let n = node.start(&[]);
        wait_log(&n, "refused");
        let m = node.http("/metrics");
        let key =
            format!("nodedns_cache_warm_loads_total{{result=\"{label}\",source=\"snapshot\"}}");
        assert_eq!(metric(&m, &key), Some(1.0), "{label}: {m}\n{}", n.log());
        assert_eq!(metric(&m, "nodedns_cache_warm_entries"), Some(0.0));
        assert!(n.log().contains("refused"), "{}", n.log());
        // Cold, but serving: the first query goes upstream.
        let seen = node.up.count("n1.example.org");
        udp_query(node.dns, "n1.example.org", RecordType::A);
        assert_eq!(
            node.up.count("n1.example.org"),
            seen + 1,
            "{label}: not cold"
        );
        drop(n);
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn sighup_and_sigusr1_are_logged_and_ignored() {
    let node = Node::new();
    let mut n = node.start(&[]);
    for sig in [libc::SIGHUP, libc::SIGUSR1] {
        n.signal(sig);
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        n.wait_exit(Duration::from_millis(10)).is_none(),
        "{}",
        n.log()
    );
    let r = udp_query(node.dns, "n7.example.org", RecordType::A);
    assert_eq!(r.answers.len(), 1);
    let log = n.log();
    assert!(log.contains("SIGHUP") && log.contains("SIGUSR1"), "{log}");
}

#[test]
fn of_an_ha_pair_either_instance_can_stop_with_nothing_lost() {
    for stop_newer in [false, true] {
        let node = Node::new();
        let mut a = node.start(&[]);
        node.warm(50);
        let mut b = node.start(&[]);
        let stop = Arc::new(AtomicBool::new(false));
        let udp = udp_load(node.dns, 50, stop.clone());
        // Connections accepted by either instance (both accept on the same listener).
        let tcps: Vec<_> = (0..4)
            .map(|_| tcp_load(node.dns, 50, stop.clone()))
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let (gone, stays) = if stop_newer {
            (&mut b, &mut a)
        } else {
            (&mut a, &mut b)
        };
        exit_ok(gone);
        assert!(
            gone.log().contains("another instance serves this node"),
            "{}",
            gone.log()
        );
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let (sent, lost) = udp.join().unwrap();
        let (mut tsent, mut tlost) = (0, 0);
        for t in tcps {
            let (s, l) = t.join().unwrap();
            tsent += s;
            tlost += l;
        }
        eprintln!(
            "HA pair, newer stopped: {stop_newer}: UDP {lost} lost of {sent}, TCP {tlost} lost of {tsent}"
        );
        assert!(sent > 100 && tsent > 100);
        assert_eq!(lost, 0, "UDP, stop newer: {stop_newer}");
        assert_eq!(tlost, 0, "TCP, stop newer: {stop_newer}");
        assert!(stays.wait_exit(Duration::from_millis(10)).is_none());
        // The admin port is served by the instance that stays.
        let ready = node.http("/ready");
        assert!(ready.contains("200"), "stop newer: {stop_newer}: {ready}");
        assert_eq!(
            udp_query(node.dns, "n3.example.org", RecordType::A)
                .answers
                .len(),
            1
        );
    }
}

#[test]
fn an_admin_port_held_by_another_process_is_taken_once_it_is_free() {
    // As during the first upgrade from a nodedns that cannot hand its ports over.
    let node = Node::new();
    let holder = std::net::TcpListener::bind(node.admin).unwrap();
    let n = node.start(&[]);
    assert!(
        n.log().contains("admin port held by another process"),
        "{}",
        n.log()
    );
    // DNS is served meanwhile.
    let r = udp_query(node.dns, "n1.example.org", RecordType::A);
    assert_eq!(r.answers.len(), 1);
    drop(holder);
    wait_log(&n, "admin port free again");
    assert!(
        node.http("/health").contains("200"),
        "{}",
        node.http("/health")
    );
}

#[test]
fn the_old_instance_serves_its_ports_again_when_its_successor_crashes() {
    let node = Node::new();
    let old = node.start(&[]);
    node.warm(20);
    let mut new = node.start(&[]);
    assert!(
        new.log().contains("took over the listening sockets"),
        "{}",
        new.log()
    );
    new.signal(libc::SIGKILL);
    new.wait_exit(Duration::from_secs(5)).expect("killed");
    wait_log(&old, "serving the admin port again");
    assert!(
        node.http("/ready").contains("200"),
        "{}",
        node.http("/ready")
    );
    // DNS never stopped: the old instance reads the same sockets.
    assert_eq!(
        udp_query(node.dns, "n3.example.org", RecordType::A)
            .answers
            .len(),
        1
    );
}
