//! TCP upstream exchange (RFC 7766): persistent, pipelined connections to CoreDNS, and one-shot
//! connections for the TC=1 retry to other resolvers (VPC resolvers handle idle TCP poorly).
//!
//! A pooled connection carries many queries at once, each with its own random ID; a reader task
//! matches answers to waiting queries by ID (and the caller checks the question). We close a
//! connection after `forward.tcp_idle_timeout` without queries, before CoreDNS's own 10 s idle
//! close; if the server closes first, a query that was sent on the dying connection is retried
//! once on a new one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
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
    let mut msg = Vec::with_capacity(64 + q.question_lower().len());
    dns::write_upstream_query(q, id, udp_size, &mut msg);
    out.clear();
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(&msg);
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

/// A pool of persistent connections to one upstream.
pub struct TcpPool {
    addr: SocketAddr,
    /// One connection per slot. The async lock is held while a slot's connection is opened, so
    /// concurrent queries wait for it instead of each opening their own.
    slots: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
    idle: Duration,
    metrics: Arc<Metrics>,
    upstream_metrics: Arc<UpstreamMetrics>,
    /// The runtime the pool was made on (the shared one): connections are opened and read there
    /// whichever runtime asks, since a UDP worker's own runtime is not driven while the worker
    /// waits in `recvmmsg` (a miss rewritten into a TCP zone runs on it). None: the caller's.
    rt: Option<tokio::runtime::Handle>,
}

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

impl TcpPool {
    /// Connections the pool keeps (its configured size).
    pub fn size(&self) -> usize {
        self.slots.len()
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
            addr,
            slots: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            idle,
            metrics,
            upstream_metrics,
            rt: tokio::runtime::Handle::try_current().ok(),
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

    async fn conn(&self) -> Result<(Arc<Conn>, bool), UpstreamError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok((c.clone(), false));
            }
        }
        let stream = match &self.rt {
            Some(rt) => rt
                .spawn(TcpStream::connect(self.addr))
                .await
                .map_err(|_| UpstreamError::Closed)??,
            None => TcpStream::connect(self.addr).await?,
        };
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
        let reader = read_loop(rd, conn.clone(), self.idle, self.metrics.clone(), self.addr);
        match &self.rt {
            Some(rt) => rt.spawn(reader),
            None => tokio::spawn(reader),
        };
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

async fn read_loop(
    mut rd: OwnedReadHalf,
    conn: Arc<Conn>,
    idle: Duration,
    metrics: Arc<Metrics>,
    addr: SocketAddr,
) {
    loop {
        match tokio::time::timeout(idle, read_frame(&mut rd)).await {
            Ok(Ok(frame)) => {
                if frame.len() < dns::HEADER_LEN {
                    continue;
                }
                let id = dns::u16_at(&frame, 0);
                if let Some(tx) = conn.pending.lock().waiting.remove(&id) {
                    let _ = tx.send(frame);
                }
            }
            Ok(Err(_)) => break,
            // Nothing read for `idle`: close. Any query still waiting has outlived its own
            // timeout or was just sent (it fails with Closed and is retried on a fresh
            // connection); and a read cut by the timeout may have left the stream mid-frame.
            Err(_) => break,
        }
    }
    conn.close();
    let _ = conn.writer.lock().await.shutdown().await;
    metrics.upstream_tcp_open(addr, -1);
}
