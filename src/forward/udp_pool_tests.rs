//! The pool's bookkeeping (retirement, IDs, reader lifetime) and its demultiplexing of replies,
//! against a scripted upstream on loopback.

use super::*;
use crate::forward::test_util::{query, query_packet, reply_to, rt, worker_answers};

fn limits(size: usize, queries: u32) -> PoolLimits {
    PoolLimits {
        size,
        queries,
        lifetime: Duration::from_secs(3600),
    }
}

async fn upstream() -> (tokio::net::UdpSocket, SocketAddr) {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

#[test]
fn socket_retires_after_its_query_bound() {
    rt().block_on(async {
        let (_up, addr) = upstream().await;
        let lim = limits(1, 3);
        let mut pool = Pool::new(addr, 1);
        let now = Instant::now();
        let first = pool.pick(&lim, now).unwrap();
        for _ in 0..2 {
            assert!(Arc::ptr_eq(&first, &pool.pick(&lim, now).unwrap()));
        }
        let next = pool.pick(&lim, now).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &next),
            "a fourth query got the worn socket"
        );
        assert!(first.state.lock().retired);
        // With nothing outstanding the retired socket's reader stops at once.
        tokio::task::yield_now().await;
        assert!(!first.reader_alive.load(Ordering::Relaxed));
        assert!(next.reader_alive.load(Ordering::Relaxed));
    });
}

#[test]
fn socket_retires_after_its_lifetime() {
    rt().block_on(async {
        let (_up, addr) = upstream().await;
        let lim = PoolLimits {
            size: 1,
            queries: 1000,
            lifetime: Duration::from_secs(5),
        };
        let mut pool = Pool::new(addr, 1);
        let now = Instant::now();
        let first = pool.pick(&lim, now).unwrap();
        let same = pool.pick(&lim, now + Duration::from_secs(4)).unwrap();
        assert!(Arc::ptr_eq(&first, &same));
        let later = pool
            .pick(&lim, Instant::now() + Duration::from_secs(5))
            .unwrap();
        assert!(!Arc::ptr_eq(&first, &later));
    });
}

#[test]
fn picks_spread_over_the_slots() {
    rt().block_on(async {
        let (_up, addr) = upstream().await;
        let lim = limits(64, 1000);
        let mut pool = Pool::new(addr, 64);
        let now = Instant::now();
        let ports: std::collections::HashSet<u16> = (0..2000)
            .map(|_| pool.pick(&lim, now).unwrap().local_port())
            .collect();
        // 2000 uniform picks leave a given slot unused with probability (63/64)^2000 ~ 2e-14.
        assert_eq!(ports.len(), 64, "every slot gets its own port");
    });
}

#[test]
fn retired_socket_closes_after_its_last_reply() {
    rt().block_on(async {
        let (_up, addr) = upstream().await;
        let mut pool = Pool::new(addr, 1);
        let s = pool.pick(&limits(1, 1000), Instant::now()).unwrap();
        let (tx, _rx) = oneshot::channel();
        let id = s
            .register(b"\x01a\x00\x00\x01\x00\x01", Deliver::Task(tx))
            .unwrap();
        s.retire();
        tokio::task::yield_now().await;
        assert!(
            s.reader_alive.load(Ordering::Relaxed),
            "a query is still outstanding"
        );
        s.forget(id);
        tokio::task::yield_now().await;
        assert!(!s.reader_alive.load(Ordering::Relaxed));
    });
}

#[test]
fn socket_whose_reader_died_is_replaced() {
    rt().block_on(async {
        let (_up, addr) = upstream().await;
        let lim = limits(1, 1000);
        let mut pool = Pool::new(addr, 1);
        let first = pool.pick(&lim, Instant::now()).unwrap();
        first.state.lock().reader.take().unwrap().stop();
        tokio::task::yield_now().await;
        let next = pool.pick(&lim, Instant::now()).unwrap();
        assert!(!Arc::ptr_eq(&first, &next));
    });
}

#[test]
fn outstanding_ids_on_a_socket_are_distinct() {
    rt().block_on(async {
        let (_up, addr) = upstream().await;
        let mut pool = Pool::new(addr, 1);
        let s = pool.pick(&limits(1, 1000), Instant::now()).unwrap();
        let mut rxs = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for _ in 0..5000 {
            let (tx, rx) = oneshot::channel();
            let id = s
                .register(b"\x00\x00\x01\x00\x01", Deliver::Task(tx))
                .unwrap();
            assert!(ids.insert(id), "ID {id} handed out twice");
            rxs.push(rx);
        }
        assert_eq!(s.state.lock().pending.len(), 5000);
    });
}

/// Two queries share one socket; the upstream first sends a reply with an unknown ID, then one
/// with the second query's ID but the first query's question, then the real replies in reverse
/// order. Both queries get their own answer; the two forgeries are counted and dropped.
#[test]
fn replies_are_demultiplexed_strictly() {
    rt().block_on(async {
        let (up, addr) = upstream().await;
        let lim = limits(1, 1000);
        let script = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            while got.len() < 2 {
                let (n, from) = up.recv_from(&mut buf).await.unwrap();
                got.push((buf[..n].to_vec(), from));
            }
            assert_eq!(got[0].1, got[1].1, "a pool of one uses one port");
            let from = got[0].1;
            let (a, b) = (&got[0].0, &got[1].0);
            let mut unknown = reply_to(a);
            let unused = (0..=u16::MAX)
                .find(|&i| i != dns::u16_at(a, 0) && i != dns::u16_at(b, 0))
                .unwrap();
            unknown[..2].copy_from_slice(&unused.to_be_bytes());
            up.send_to(&unknown, from).await.unwrap();
            let mut crossed = reply_to(a);
            crossed[..2].copy_from_slice(&b[..2]);
            up.send_to(&crossed, from).await.unwrap();
            up.send_to(&reply_to(b), from).await.unwrap();
            up.send_to(&reply_to(a), from).await.unwrap();
        });
        let before = crate::metrics::resilience::UDP_UNMATCHED_REPLIES.load(Ordering::Relaxed);
        let pa = query_packet("first.example");
        let pb = query_packet("second.example");
        let qa = dns::parse_query(&pa).unwrap();
        let qb = dns::parse_query(&pb).unwrap();
        let t = Duration::from_secs(5);
        let (ra, rb) = tokio::join!(
            exchange(addr, &qa, 1232, Instant::now(), t, &lim),
            exchange(addr, &qb, 1232, Instant::now(), t, &lim)
        );
        script.await.unwrap();
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(
            &ra.wire[12..12 + qa.question_lower().len()],
            qa.question_lower()
        );
        assert_eq!(
            &rb.wire[12..12 + qb.question_lower().len()],
            qb.question_lower()
        );
        assert!(
            crate::metrics::resilience::UDP_UNMATCHED_REPLIES.load(Ordering::Relaxed) - before >= 2
        );
    });
}

#[test]
fn unanswered_query_times_out_and_is_forgotten() {
    rt().block_on(async {
        let (_up, addr) = upstream().await;
        let lim = limits(1, 1000);
        let p = query_packet("silent.example");
        let q = dns::parse_query(&p).unwrap();
        let r = exchange(
            addr,
            &q,
            1232,
            Instant::now(),
            Duration::from_millis(20),
            &lim,
        )
        .await;
        assert!(matches!(r, Err(UpstreamError::Timeout)), "{r:?}");
        POOLS.with_borrow(|pools| {
            let s = pools[&addr].slots[0].as_ref().unwrap();
            assert!(s.state.lock().pending.is_empty());
        });
    });
}

#[test]
fn refused_port_fails_the_query_at_once() {
    rt().block_on(async {
        // A port nobody listens on: the kernel answers ICMP port unreachable, reported on the
        // connected socket as ECONNREFUSED.
        let addr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let p = query_packet("nobody.example");
        let q = dns::parse_query(&p).unwrap();
        let r = exchange(
            addr,
            &q,
            1232,
            Instant::now(),
            Duration::from_secs(5),
            &limits(1, 1000),
        )
        .await;
        assert!(matches!(r, Err(UpstreamError::Io(_))), "{r:?}");
    });
}

/// The worker's queries: each reply comes back under its own token, whatever order the upstream
/// answers in; a reply with a query's ID but another question is not handed over.
#[test]
fn worker_replies_come_back_under_their_tokens() {
    rt().block_on(async {
        let (up, addr) = upstream().await;
        let lim = limits(1, 1000);
        let (qa, qb) = (query("a.example"), query("b.example"));
        let _a = send_for_worker(addr, &qa, 1232, Instant::now(), &lim, 7).unwrap();
        let _b = send_for_worker(addr, &qb, 1232, Instant::now(), &lim, 9).unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = up.recv_from(&mut buf).await.unwrap();
        let first = buf[..n].to_vec();
        let (n, _) = up.recv_from(&mut buf).await.unwrap();
        let second = buf[..n].to_vec();
        // A forgery: the second query's ID on the first query's question.
        let mut forged = reply_to(&first);
        forged[..2].copy_from_slice(&second[..2]);
        up.send_to(&forged, from).await.unwrap();
        up.send_to(&reply_to(&second), from).await.unwrap();
        up.send_to(&reply_to(&first), from).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 2 {
            got.extend(worker_answers().await);
        }
        let name_of = |token: u64| {
            let (_, a) = got
                .iter()
                .find(|(t, _)| *t == token)
                .expect("token answered");
            let resp = a.as_ref().expect("an answer");
            // The question starts after the header: the first label's first letter.
            resp.wire[13]
        };
        assert_eq!(name_of(7), b'a');
        assert_eq!(name_of(9), b'b');
        assert_eq!(got.len(), 2, "the forgery was not handed over");
    });
}

/// A query whose registration was dropped (its miss timed out) gets nothing, even when its reply
/// comes; a later query's reply still does.
#[test]
fn a_dropped_worker_query_gets_no_reply() {
    rt().block_on(async {
        let (up, addr) = upstream().await;
        let lim = limits(1, 1000);
        let (qa, qb) = (query("a.example"), query("b.example"));
        let a = send_for_worker(addr, &qa, 1232, Instant::now(), &lim, 1).unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = up.recv_from(&mut buf).await.unwrap();
        let first = buf[..n].to_vec();
        drop(a);
        let _b = send_for_worker(addr, &qb, 1232, Instant::now(), &lim, 2).unwrap();
        let (n, _) = up.recv_from(&mut buf).await.unwrap();
        let second = buf[..n].to_vec();
        up.send_to(&reply_to(&first), from).await.unwrap();
        up.send_to(&reply_to(&second), from).await.unwrap();
        let got = worker_answers().await;
        let tokens: Vec<u64> = got.iter().map(|(t, _)| *t).collect();
        assert_eq!(tokens, vec![2]);
    });
}

#[test]
fn refused_port_fails_a_worker_query_at_once() {
    rt().block_on(async {
        let addr = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap()
        };
        let p = query_packet("nobody.example");
        let q = dns::parse_query(&p).unwrap();
        let _out = send_for_worker(addr, &q, 1232, Instant::now(), &limits(1, 1000), 5).unwrap();
        let got = worker_answers().await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 5);
        assert!(
            matches!(got[0].1, Err(UpstreamError::Io(_))),
            "{:?}",
            got[0].1
        );
    });
}
