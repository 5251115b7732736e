//! TCP under pressure (RFC 7766 §6.2.3, §6.2.4): a client holding more idle and trickling
//! connections than `server.tcp_max_connections` does not keep other clients out, and a
//! connection that waits for an answer is not closed to make room. The real binary on loopback.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

const CAP: usize = 64;
/// How long the slow upstream takes to answer.
const SLOW: Duration = Duration::from_millis(2500);
/// The tricklers' pace: one byte each per tick.
const TICK: Duration = Duration::from_millis(500);
/// A new client must be answered within this long, however full the server is.
const BOUND: Duration = Duration::from_secs(1);

fn framed(m: &Message) -> Vec<u8> {
    let w = m.to_vec().unwrap();
    let mut f = (w.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(&w);
    f
}

fn read_msg(s: &mut TcpStream) -> Message {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).expect("an answer");
    let mut b = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut b).expect("a whole answer");
    Message::from_vec(&b).unwrap()
}

/// A query on a new connection: the time from connecting to the answer.
fn timed_query(server: SocketAddr, name: &str, id: u16) -> Duration {
    let t = Instant::now();
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&framed(&query_msg(name, RecordType::A, id, None)))
        .unwrap();
    let r = read_msg(&mut s);
    let took = t.elapsed();
    assert_eq!(r.metadata.id, id);
    assert_eq!(r.answers.len(), 1, "{name}: {r:?}");
    took
}

/// A connection of the flood: idle, or sending one byte of a message that never ends each tick.
struct Held {
    s: TcpStream,
    trickle: bool,
}

impl Held {
    fn open(server: SocketAddr, trickle: bool) -> Option<Held> {
        let s = TcpStream::connect_timeout(&server, TICK).ok()?;
        s.set_nonblocking(true).unwrap();
        let mut h = Held { s, trickle };
        h.tick();
        Some(h)
    }

    /// The server closed it (a FIN or a reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 16];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != ErrorKind::WouldBlock,
        }
    }

    fn tick(&mut self) {
        if self.trickle {
            // A length prefix of 0x0101 then the body, byte by byte: never a complete message.
            let _ = self.s.write(&[1]);
        }
    }
}

/// Keeps the flood up: every tick each trickler sends a byte, and every connection the server
/// closed is opened again. Returns how many closes it saw.
fn keep_flooding(
    server: SocketAddr,
    mut held: Vec<Held>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut closes = 0;
        while !stop.load(Ordering::Relaxed) {
            let next = Instant::now() + TICK;
            while Instant::now() < next && !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(20));
            }
            for h in held.iter_mut() {
                if h.closed() {
                    closes += 1;
                    match Held::open(server, h.trickle) {
                        Some(new) => *h = new,
                        None => continue,
                    }
                }
                h.tick();
            }
        }
        closes
    })
}

#[test]
fn a_full_server_closes_idle_and_trickling_connections_for_new_ones_but_not_busy_ones() {
    let fast = FakeUpstream::start(|m, _| Action::Answer(a_reply(m, 300, &[[10, 0, 0, 1]])));
    let slow = FakeUpstream::start(|m, _| {
        if m.queries[0].name().to_ascii().starts_with("slow.") {
            std::thread::sleep(SLOW);
        }
        Action::Answer(a_reply(m, 300, &[[10, 0, 0, 2]]))
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\ntcp_max_connections = {CAP}\n\n\
             [forward]\ntimeout = \"4s\"\nquery_timeout = \"4s\"\n\n\
             [[zone]]\nname = \"slow.test\"\nupstreams = [\"{}\"]\n",
            slow.addr
        ),
    )
    .unwrap();
    let up = fast.arg();
    let nd = Nodedns::start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--metrics",
        "off",
        "--health",
        "off",
        "--config",
        cfg.to_str().unwrap(),
    ]);

    // A connection with a query in flight: the oldest in the table, but it owes a reply.
    let mut busy = TcpStream::connect(nd.dns).unwrap();
    busy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    busy.write_all(&framed(&query_msg(
        "slow.slow.test.",
        RecordType::A,
        1,
        None,
    )))
    .unwrap();
    let sent_slow = Instant::now();
    let deadline = sent_slow + Duration::from_secs(2);
    while slow.count("slow.slow.test") == 0 {
        assert!(Instant::now() < deadline, "the slow query never went out");
        std::thread::sleep(Duration::from_millis(5));
    }

    // The flood: 1.5 times the cap of idle connections, then 100 tricklers.
    let idle = CAP * 3 / 2;
    let held: Vec<Held> = (0..idle + 100)
        .map(|i| Held::open(nd.dns, i >= idle).expect("loopback connect"))
        .collect();
    let flooded = held.len();
    // The first new client waits behind the whole flood in the listen backlog.
    let mut took = vec![timed_query(nd.dns, "fresh0.example.org.", 100)];
    let stop = Arc::new(AtomicBool::new(false));
    let flood = keep_flooding(nd.dns, held, stop.clone());
    for i in 1..5 {
        std::thread::sleep(Duration::from_millis(250));
        took.push(timed_query(
            nd.dns,
            &format!("fresh{i}.example.org."),
            100 + i,
        ));
    }

    // Past the floor of the idle timeout and through all that closing, the busy connection
    // still reads: a second query on it is answered before the slow one.
    std::thread::sleep(Duration::from_millis(1300).saturating_sub(sent_slow.elapsed()));
    assert!(
        sent_slow.elapsed() + Duration::from_millis(500) < SLOW,
        "the host is too slow for this test's timing"
    );
    busy.write_all(&framed(&query_msg(
        "second.example.org.",
        RecordType::A,
        2,
        None,
    )))
    .unwrap();
    let first = read_msg(&mut busy);
    assert_eq!(
        first.metadata.id, 2,
        "the busy connection was closed: {first:?}"
    );
    let slow_answer = read_msg(&mut busy);
    assert_eq!(slow_answer.metadata.id, 1);
    assert_eq!(slow_answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(slow_answer.answers.len(), 1, "{slow_answer:?}");
    let slow_took = sent_slow.elapsed();

    // The flood goes on: new clients still get in.
    for i in 5..8 {
        took.push(timed_query(
            nd.dns,
            &format!("fresh{i}.example.org."),
            100 + i,
        ));
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Relaxed);
    let closes = flood.join().unwrap();

    let ms: Vec<u128> = took.iter().map(|d| d.as_millis()).collect();
    let max = took.iter().max().unwrap();
    println!(
        "cap {CAP}, flood {flooded} connections ({idle} idle, 100 trickling): new clients \
         answered over TCP in {ms:?} ms (max {max:?}); the busy connection got its answer \
         after {slow_took:?} and served another query meanwhile; the flood saw {closes} closes"
    );
    assert!(*max < BOUND, "a new client waited {max:?}: {ms:?} ms");
    // Everything beyond the cap was closed before the first new client got in.
    assert!(closes >= flooded - CAP, "only {closes} closes");
}
