//! TCP upstream exchange (RFC 7766): persistent, pipelined connections to CoreDNS, and one-shot
//! connections for the TC=1 retry to other resolvers (VPC resolvers handle idle TCP poorly).
//!
//! A pooled connection carries many queries at once, each with its own random ID; a reader task
//! matches answers to waiting queries by ID (and the caller checks the question). We close a
//! connection after `forward.tcp_idle_timeout` without queries, before CoreDNS's own 10 s idle
//! close; if the server closes first, a query that was sent on the dying connection is retried
//! once on a new one.
//!
//! Connections are per thread, like the UDP socket pools: each thread that forwards (a UDP worker,
//! a thread of the shared runtime) keeps up to `forward.tcp_pool_size` connections per upstream,
//! registered with its own runtime. A UDP worker's cluster-zone misses are then written, read and
//! answered on the worker's own thread, with no wake-up of another thread per query. A worker
//! that waits in `recvmmsg` lets its runtime run at least every `server::socket::UDP_POLL`, so its
//! idle connections are closed on time and a close by the server is seen.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::UpstreamError;
use crate::dns::{self, Query, Response};
use crate::metrics::{Metrics, UpstreamMetrics};

/// Writes a length-prefixed query for `q` with `id` into `out`.
fn framed_query(q: &Query, id: u16, udp_size: u16, out: &mut Vec<u8>) {
    dns::write_upstream_query(q, id, udp_size, out);
    let len = (out.len() as u16).to_be_bytes();
    out.splice(0..0, len);
}

async fn read_frame(rd: &mut (impl AsyncReadExt + Unpin)) -> std::io::Result<Vec<u8>> {
    let len = rd.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    rd.read_exact(&mut buf).await?;
    Ok(buf)
}

/// One query on a new connection, then close it (the TC=1 fallback).
pub async fn exchange_once(
    upstream: SocketAddr,
    q: &Query,
    udp_size: u16,
    timeout: Duration,
) -> Result<Response, UpstreamError> {
    let work = async {
        let mut s = TcpStream::connect(upstream).await?;
        s.set_nodelay(true)?;
        let id: u16 = rand::random();
        let mut msg = Vec::new();
        framed_query(q, id, udp_size, &mut msg);
        s.write_all(&msg).await?;
        loop {
            let frame = read_frame(&mut s).await?;
            if frame.len() >= dns::HEADER_LEN && dns::u16_at(&frame, 0) == id {
                return dns::parse_response(&frame, q.question_lower()).map_err(Into::into);
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| UpstreamError::Timeout)?
}

/// A pool of persistent connections to one upstream: its settings; the connections themselves
/// are per thread (`THREAD_CONNS`).
pub struct TcpPool {
    /// Identifies the pool's connections in every thread's table.
    id: u64,
    addr: SocketAddr,
    size: usize,
    idle: Duration,
    metrics: Arc<Metrics>,
    upstream_metrics: Arc<UpstreamMetrics>,
    /// Cleared when the pool is dropped (a reload replaced it): threads then close their
    /// connections of it the next time they look one up.
    alive: Arc<AtomicBool>,
}

/// One slot: a connection, or none yet. The async lock is held while the slot's connection is
/// opened, so concurrent queries wait for it instead of each opening their own.
type Slot = Arc<tokio::sync::Mutex<Option<Arc<Conn>>>>;

/// A thread's connections of one pool.
struct ThreadConns {
    alive: Arc<AtomicBool>,
    slots: Vec<Slot>,
    next: usize,
}

thread_local! {
    /// This thread's pooled connections, by pool.
    static THREAD_CONNS: RefCell<HashMap<u64, ThreadConns, ahash::RandomState>> =
        RefCell::new(HashMap::default());
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

struct Conn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    /// Queries waiting for their answer, by upstream ID. `closed` is set under this lock, so a
    /// query either registers before the close (and is failed by it) or sees the close.
    pending: Mutex<Pending>,
}

struct Pending {
    waiting: HashMap<u16, oneshot::Sender<Vec<u8>>>,
    closed: bool,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.pending.lock().closed
    }

    fn close(&self) {
        let mut p = self.pending.lock();
        p.closed = true;
        // Dropping the senders wakes every waiting query with an error.
        p.waiting.clear();
    }
}

impl Drop for TcpPool {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

impl TcpPool {
    /// Connections the pool keeps per thread (its configured size).
    pub fn size(&self) -> usize {
        self.size
    }

    /// How long a connection may stay idle before the pool closes it.
    pub fn idle(&self) -> Duration {
        self.idle
    }

    pub fn new(
        addr: SocketAddr,
        size: usize,
        idle: Duration,
        metrics: Arc<Metrics>,
        upstream_metrics: Arc<UpstreamMetrics>,
    ) -> Self {
        TcpPool {
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            addr,
            size: size.max(1),
            idle,
            metrics,
            upstream_metrics,
            alive: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Exchanges `q` on a pooled connection, opening one when needed.
    pub async fn exchange(
        &self,
        q: &Query,
        udp_size: u16,
        timeout: Duration,
    ) -> Result<Response, UpstreamError> {
        let deadline = Instant::now() + timeout;
        let work = async {
            let mut last = UpstreamError::Closed;
            for _ in 0..2 {
                let (conn, fresh) = self.conn().await?;
                self.upstream_metrics.request();
                match self.query(&conn, q, udp_size).await {
                    Ok(r) => return Ok(r),
                    // The server closed a connection we reused: retry once on a new one.
                    Err(UpstreamError::Closed) if !fresh => last = UpstreamError::Closed,
                    Err(e) => return Err(e),
                }
            }
            Err(last)
        };
        tokio::time::timeout_at(deadline.into(), work)
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    /// The next slot of this thread's connections to the pool's upstream.
    fn slot(&self) -> Slot {
        THREAD_CONNS.with_borrow_mut(|pools| {
            let t = pools.entry(self.id).or_insert_with(|| ThreadConns {
                alive: self.alive.clone(),
                slots: (0..self.size).map(|_| Slot::default()).collect(),
                next: 0,
            });
            t.next = (t.next + 1) % t.slots.len();
            t.slots[t.next].clone()
        })
    }

    async fn conn(&self) -> Result<(Arc<Conn>, bool), UpstreamError> {
        let slot = self.slot();
        let mut slot = slot.lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok((c.clone(), false));
            }
        }
        close_dropped_pools();
        let stream = TcpStream::connect(self.addr).await?;
        stream.set_nodelay(true)?;
        let (rd, wr) = stream.into_split();
        let conn = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(wr),
            pending: Mutex::new(Pending {
                waiting: HashMap::new(),
                closed: false,
            }),
        });
        self.metrics.upstream_tcp_open(self.addr, 1);
        // On this thread's runtime, with the connection.
        tokio::spawn(read_loop(
            rd,
            conn.clone(),
            self.idle,
            self.metrics.clone(),
            self.addr,
        ));
        *slot = Some(conn.clone());
        Ok((conn, true))
    }

    async fn query(
        &self,
        conn: &Arc<Conn>,
        q: &Query,
        udp_size: u16,
    ) -> Result<Response, UpstreamError> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut p = conn.pending.lock();
            if p.closed {
                return Err(UpstreamError::Closed);
            }
            let mut id: u16 = rand::random();
            while p.waiting.contains_key(&id) {
                id = rand::random();
            }
            p.waiting.insert(id, tx);
            id
        };
        // Remove our registration however this function ends (timeout included).
        struct Unregister<'a>(&'a Conn, u16);
        impl Drop for Unregister<'_> {
            fn drop(&mut self) {
                self.0.pending.lock().waiting.remove(&self.1);
            }
        }
        let _unregister = Unregister(conn, id);
        let mut msg = Vec::new();
        framed_query(q, id, udp_size, &mut msg);
        {
            let mut w = conn.writer.lock().await;
            if w.write_all(&msg).await.is_err() {
                conn.close();
                return Err(UpstreamError::Closed);
            }
        }
        let frame = rx.await.map_err(|_| UpstreamError::Closed)?;
        dns::parse_response(&frame, q.question_lower()).map_err(Into::into)
    }
}

/// Closes this thread's connections of pools a reload dropped (their readers then end).
fn close_dropped_pools() {
    let dropped: Vec<ThreadConns> = THREAD_CONNS.with_borrow_mut(|pools| {
        let gone: Vec<u64> = pools
            .iter()
            .filter(|(_, t)| !t.alive.load(Ordering::Relaxed))
            .map(|(&id, _)| id)
            .collect();
        gone.iter().filter_map(|id| pools.remove(id)).collect()
    });
    for t in dropped {
        for slot in t.slots {
            if let Ok(Some(c)) = slot.try_lock().as_deref() {
                c.close();
            }
        }
    }
}

/// Free space kept in a connection's read buffer before each read: room for many pipelined
/// answers, so one read takes every answer that has arrived.
const READ_ROOM: usize = 16 * 1024;

/// Reads answers off a pooled connection and hands each to the query waiting for its ID. One read
/// takes whatever has arrived, so pipelined answers cost one system call between them, not two
/// each (length, then message).
async fn read_loop(
    mut rd: OwnedReadHalf,
    conn: Arc<Conn>,
    idle: Duration,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(READ_ROOM);
    loop {
        let mut start = 0;
        while let Some(len) = dns::tcp_frame_len(&buf[start..]) {
            let frame = &buf[start + 2..start + 2 + len];
            start += 2 + len;
            if frame.len() < dns::HEADER_LEN {
                continue;
            }
            let id = dns::u16_at(frame, 0);
            let waiting = conn.pending.lock().waiting.remove(&id);
            if let Some(tx) = waiting {
                let _ = tx.send(frame.to_vec());
            }
        }
        // Keep only a partial answer, at the front.
        buf.drain(..start);
        if buf.capacity() - buf.len() < READ_ROOM {
            buf.reserve(READ_ROOM);
        }
        match tokio::time::timeout(idle, rd.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // Closed by the server, or failed.
            Ok(_) => break,
            // Nothing read for `idle`: close. Any query still waiting has outlived its own
            // timeout or was just sent (it fails with Closed and is retried on a fresh
            // connection).
            Err(_) => break,
        }
    }
    conn.close();
    let _ = conn.writer.lock().await.shutdown().await;
    metrics.upstream_tcp_open(addr, -1);
}
