//! Pooled connections: a worker's queries written without a task, their answers (or the
//! connection's close) handed to the worker, frames kept whole when the socket's buffer fills;
//! against a scripted upstream on loopback.

use super::*;
use crate::forward::test_util::{query, reply_to, rt, worker_answers};

/// A pool of one connection to a listener of the test's, and the connection as the upstream sees
/// it, opened by one exchange that the test answers.
async fn open_pool(listener: tokio::net::TcpListener) -> (TcpPool, TcpStream) {
    let addr = listener.local_addr().unwrap();
    let metrics = Metrics::new(vec![".".into()]);
    let upstream_metrics = Arc::new(metrics.upstream(addr));
    let pool = TcpPool::new(addr, 1, Duration::from_secs(30), metrics, upstream_metrics);
    let serve = async {
        let (mut s, _) = listener.accept().await.unwrap();
        let q = read_frame(&mut s).await.unwrap();
        write_frame(&mut s, &reply_to(&q)).await;
        s
    };
    let warm = query("warm.example");
    let (answer, upstream) =
        tokio::join!(pool.exchange(&warm, 1232, Duration::from_secs(5)), serve);
    answer.unwrap();
    (pool, upstream)
}

async fn listener() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

async fn write_frame(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(&(msg.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(msg).await.unwrap();
}

/// The first letter of the answer's question name.
fn first_letter(a: &super::answers::Answer) -> u8 {
    a.as_ref().expect("an answer").wire[13]
}

#[test]
fn a_worker_query_needs_a_connection_already_open() {
    rt().block_on(async {
        let l = listener().await;
        let addr = l.local_addr().unwrap();
        let metrics = Metrics::new(vec![".".into()]);
        let um = Arc::new(metrics.upstream(addr));
        let pool = TcpPool::new(addr, 1, Duration::from_secs(30), metrics, um);
        assert!(pool.send_for_worker(&query("a.example"), 1232, 1).is_none());
    });
}

/// Answers come back to the worker under their own tokens, in whatever order the upstream sends
/// them, parsed against the question asked; an answer to another question is an error.
#[test]
fn worker_answers_come_back_under_their_tokens() {
    rt().block_on(async {
        let (pool, mut up) = open_pool(listener().await).await;
        let _a = pool.send_for_worker(&query("a.example"), 1232, 7).unwrap();
        let _b = pool.send_for_worker(&query("b.example"), 1232, 9).unwrap();
        let _c = pool.send_for_worker(&query("c.example"), 1232, 11).unwrap();
        flush_worker_writes();
        let qa = read_frame(&mut up).await.unwrap();
        let qb = read_frame(&mut up).await.unwrap();
        let qc = read_frame(&mut up).await.unwrap();
        // c's ID on a's question.
        let mut wrong = reply_to(&qa);
        wrong[..2].copy_from_slice(&qc[..2]);
        write_frame(&mut up, &reply_to(&qb)).await;
        write_frame(&mut up, &reply_to(&qa)).await;
        write_frame(&mut up, &wrong).await;
        let mut got = Vec::new();
        while got.len() < 3 {
            got.extend(worker_answers().await);
        }
        let of = |token: u64| &got.iter().find(|(t, _)| *t == token).unwrap().1;
        assert_eq!(first_letter(of(7)), b'a');
        assert_eq!(first_letter(of(9)), b'b');
        assert!(
            matches!(
                of(11),
                Err(UpstreamError::Bad(dns::BadResponse::QuestionMismatch))
            ),
            "{:?}",
            of(11)
        );
    });
}

/// The server closing the connection fails the worker's queries on it with `Closed` at once (the
/// worker retries them on a new connection), except one whose registration was dropped.
#[test]
fn a_closed_connection_fails_the_worker_queries_on_it() {
    rt().block_on(async {
        let (pool, mut up) = open_pool(listener().await).await;
        let _a = pool.send_for_worker(&query("a.example"), 1232, 3).unwrap();
        let b = pool.send_for_worker(&query("b.example"), 1232, 4).unwrap();
        flush_worker_writes();
        read_frame(&mut up).await.unwrap();
        read_frame(&mut up).await.unwrap();
        drop(b);
        drop(up);
        let got = worker_answers().await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0, 3);
        assert!(matches!(got[0].1, Err(UpstreamError::Closed)), "{got:?}");
        // The closed connection takes no more worker queries; a task opens a new one.
        tokio::task::yield_now().await;
        assert!(pool.send_for_worker(&query("c.example"), 1232, 5).is_none());
    });
}

/// Frames queued during a batch leave in one write; a batch the socket cannot take whole is
/// finished by a task holding the writer, and a batch flushed meanwhile waits for it: with an
/// upstream that reads slowly, every frame reaches it whole and in order.
#[test]
fn frames_stay_whole_when_the_send_buffer_fills() {
    rt().block_on(async {
        // Small buffers at both ends: a batch of a few thousand frames overflows them.
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let (pool, mut up) = open_pool(sock.listen(8).unwrap()).await;
        {
            let slot = pool.slot();
            let slot = slot.try_lock().unwrap();
            let w = slot.as_ref().unwrap().writer.try_lock().unwrap();
            socket2::SockRef::from((*w).as_ref())
                .set_send_buffer_size(4096)
                .unwrap();
        }
        let names: Vec<String> = (0..6000).map(|i| format!("n{i}.example")).collect();
        let mut sent = Vec::new();
        for batch in names.chunks(3000) {
            for name in batch {
                let reg = pool.send_for_worker(&query(name), 1232, 0).unwrap();
                sent.push((reg.id, name, reg));
            }
            flush_worker_writes();
            let conn = &sent[0].2.conn;
            assert!(
                conn.writer.try_lock().is_err(),
                "a task is still writing the batch the socket could not take"
            );
        }
        // The upstream reads everything: the frames, in order, each whole.
        for (id, name, _) in &sent {
            let frame = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut up))
                .await
                .expect("every frame arrives")
                .unwrap();
            let q = dns::parse_query(&frame).expect("a whole query");
            assert_eq!(q.id, *id);
            let mut want = Vec::new();
            dns::write_upstream_query(&query(name), 0, 1232, &mut want);
            assert_eq!(&frame[2..], &want[2..], "{name}");
        }
    });
}

/// An upstream on `l` that answers every frame on every connection it accepts; counts the
/// connections.
fn serve_all(l: tokio::net::TcpListener) -> Arc<std::sync::atomic::AtomicUsize> {
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                while let Ok(q) = read_frame(&mut s).await {
                    write_frame(&mut s, &reply_to(&q)).await;
                }
            });
        }
    });
    accepted
}

/// One query at a time, the worker's and the tasks' turns through the slots never leave a slot
/// empty for good: the exchanges a worker's misses fall back to fill the slots it found without
/// a connection, so after one exchange per slot every query goes out without a task.
#[test]
fn the_slots_a_worker_finds_empty_are_filled() {
    rt().block_on(async {
        let l = listener().await;
        let addr = l.local_addr().unwrap();
        let accepted = serve_all(l);
        let metrics = Metrics::new(vec![".".into()]);
        let um = Arc::new(metrics.upstream(addr));
        let pool = TcpPool::new(addr, 2, Duration::from_secs(30), metrics, um);
        let mut by_task = 0;
        for i in 0..8u64 {
            let q = query(&format!("q{i}.example"));
            match pool.send_for_worker(&q, 1232, i) {
                Some(_held) => {
                    flush_worker_writes();
                    let got = worker_answers().await;
                    assert_eq!(got.len(), 1);
                    assert!(got[0].1.is_ok(), "{:?}", got[0].1.as_ref().err());
                }
                None => {
                    by_task += 1;
                    pool.exchange(&q, 1232, Duration::from_secs(5))
                        .await
                        .unwrap();
                }
            }
        }
        assert_eq!(
            by_task, 2,
            "queries that found their slot without a connection"
        );
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    });
}
