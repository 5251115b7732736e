//! TCP upstream exchange (RFC 7766): persistent, pipelined connections to CoreDNS, and one-shot
//! connections for the TC=1 retry to other resolvers (VPC resolvers handle idle TCP poorly).
//!
//! A pooled connection carries many queries at once, each with its own random ID; a reader
//! matches answers to waiting queries by ID (and the question is checked against the one
//! asked). We close a connection after `forward.tcp_idle_timeout` without queries, before
//! CoreDNS's own 10 s idle close; if the server closes first, a query that was sent on the dying
//! connection is retried once on a new one.
//!
//! Connections are per thread, like the UDP socket pools: each thread that forwards (a UDP worker,
//! a thread of the shared runtime) keeps up to `forward.tcp_pool_size` connections per upstream,
//! registered with its own runtime. A UDP worker's cluster-zone misses are then written, read and
//! answered on the worker's own thread, with no wake-up of another thread per query. A worker
//! that waits in `recvmmsg` lets its runtime run at least every `server::socket::UDP_POLL`, so its
//! idle connections are closed on time and a close by the server is seen.
//!
//! A UDP worker sends a miss on a connection already open without a task
//! ([`TcpPool::send_for_worker`]): it queues the frame, and writes the frames of a whole batch of
//! client queries with one send per connection ([`flush_worker_writes`]); the reader then parses
//! the answer and hands it to the worker (`answers`), and a connection that closes hands each such
//! query `Closed`, for the worker to retry it once on a new connection as a task does.
//! Queries take a thread's connections in turn; one that finds its turn's connection missing (not
//! opened yet, idle-closed, closed by the server) goes to a task, which opens the missing one.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::answers;
use super::UpstreamError;
use crate::dns::{self, Query, Response};
use crate::metrics::{Metrics, UpstreamMetrics};

/// Appends a length-prefixed query for `q` with `id` to `out`.
fn framed_query(q: &Query, id: u16, udp_size: u16, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0, 0]);
    dns::write_upstream_query(q, id, udp_size, out);
    let len = (out.len() - start - 2) as u16;
    out[start..start + 2].copy_from_slice(&len.to_be_bytes());
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

impl ThreadConns {
    /// The slot after the last one taken.
    fn next_slot(&mut self) -> Slot {
        self.next = (self.next + 1) % self.slots.len();
        self.slots[self.next].clone()
    }
}

thread_local! {
    /// This thread's pooled connections, by pool.
    static THREAD_CONNS: RefCell<HashMap<u64, ThreadConns, ahash::RandomState>> =
        RefCell::new(HashMap::default());
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

struct Conn {
    /// Held while a query is written (a write the socket cannot take at once finishes
    /// asynchronously, still holding it), so frames never interleave.
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    /// Queries waiting for their answer, by upstream ID. `closed` is set under this lock, so a
    /// query either registers before the close (and is failed by it) or sees the close.
    pending: Mutex<Pending>,
}

struct Pending {
    waiting: HashMap<u16, Waiting>,
    closed: bool,
}

/// A query waiting for its answer on a connection.
enum Waiting {
    /// A task, which parses the frame itself.
    Task(oneshot::Sender<Vec<u8>>),
    /// This thread's worker, under its token; the answer must repeat `question` (lowercased
    /// wire form).
    Worker { token: u64, question: Box<[u8]> },
}

impl Waiting {
    fn answer(self, frame: &[u8]) {
        match self {
            // The task may have just given up; then the answer is simply dropped.
            Waiting::Task(tx) => {
                let _ = tx.send(frame.to_vec());
            }
            Waiting::Worker { token, question } => {
                let answer = dns::parse_response(frame, &question).map_err(Into::into);
                answers::deliver(token, answer);
            }
        }
    }

    /// The connection closed before the answer came.
    fn closed(self) {
        match self {
            // Dropping the sender wakes the task with an error.
            Waiting::Task(_) => {}
            Waiting::Worker { token, .. } => answers::deliver(token, Err(UpstreamError::Closed)),
        }
    }
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.pending.lock().closed
    }

    /// Fails every waiting query with `Closed` and refuses new ones.
    fn close(&self) {
        let waiting: Vec<Waiting> = {
            let mut p = self.pending.lock();
            p.closed = true;
            p.waiting.drain().map(|(_, w)| w).collect()
        };
        for w in waiting {
            w.closed();
        }
    }

    /// Registers a query under a random ID not in use on the connection; None once closed or
    /// when every ID is taken.
    fn register(&self, w: Waiting) -> Option<u16> {
        let mut p = self.pending.lock();
        if p.closed || p.waiting.len() >= usize::from(u16::MAX) {
            return None;
        }
        let mut id: u16 = rand::random();
        while p.waiting.contains_key(&id) {
            id = rand::random();
        }
        p.waiting.insert(id, w);
        Some(id)
    }
}

/// A query registered on a pooled connection; the registration is removed when this is dropped
/// (answered, timed out or cancelled).
pub struct Registered {
    conn: Arc<Conn>,
    id: u16,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.conn.pending.lock().waiting.remove(&self.id);
    }
}

/// Frames a worker queued during one batch, per connection, and spare buffers for them.
#[derive(Default)]
struct Queued {
    by_conn: Vec<(Arc<Conn>, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
}

impl Queued {
    fn push(&mut self, conn: &Arc<Conn>, q: &Query, id: u16, udp_size: u16) {
        let i = match self.by_conn.iter().position(|(c, _)| Arc::ptr_eq(c, conn)) {
            Some(i) => i,
            None => {
                let buf = self.spare.pop().unwrap_or_default();
                self.by_conn.push((conn.clone(), buf));
                self.by_conn.len() - 1
            }
        };
        framed_query(q, id, udp_size, &mut self.by_conn[i].1);
    }
}

thread_local! {
    /// The frames this thread's worker queued since its last flush.
    static QUEUED: RefCell<Queued> = RefCell::new(Queued::default());
}

/// Writes the frames this thread's worker queued ([`TcpPool::send_for_worker`]): on each
/// connection, all at once when its writer is free and its socket takes them; what is left is
/// written by a task holding the writer, so frames stay whole and never interleave. A failed write
/// closes the connection (its queries fail with `Closed` and are retried on a new one).
pub fn flush_worker_writes() {
    QUEUED.with_borrow_mut(|queued| {
        let Queued { by_conn, spare } = queued;
        for (conn, frames) in by_conn.drain(..) {
            if let Some(mut done) = write_frames(conn, frames) {
                done.clear();
                spare.push(done);
            }
        }
    });
}

/// Writes `frames` on `conn` (see [`flush_worker_writes`]); returns the buffer when it was
/// written at once.
fn write_frames(conn: Arc<Conn>, mut frames: Vec<u8>) -> Option<Vec<u8>> {
    if conn.is_closed() {
        // Its queries were failed by the close.
        return Some(frames);
    }
    let held = match conn.writer.clone().try_lock_owned() {
        Ok(w) => {
            // send(2) itself: the runtime's own try_write refuses until epoll has reported the
            // socket writable, which it does not after every write.
            match socket2::SockRef::from((*w).as_ref()).send(&frames) {
                Ok(n) if n == frames.len() => return Some(frames),
                Ok(n) => {
                    frames.drain(..n);
                    Some(w)
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    Some(w)
                }
                Err(_) => {
                    conn.close();
                    return None;
                }
            }
        }
        // Another write is unfinished: these frames follow it.
        Err(_) => None,
    };
    tokio::spawn(async move {
        let mut w = match held {
            Some(w) => w,
            None => conn.writer.clone().lock_owned().await,
        };
        if w.write_all(&frames).await.is_err() {
            conn.close();
        }
    });
    None
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

    /// Queues `q` on an open connection of this thread's pool, its answer (or the connection's
    /// close) to go to this thread's worker under `token` (`answers`). The worker writes what it
    /// queued during a batch of client queries at the batch's end ([`flush_worker_writes`]): one
    /// send per connection, not one per query. None when the slot's connection is not open (or
    /// is being opened): the caller then takes the path that can wait.
    pub fn send_for_worker(&self, q: &Query, udp_size: u16, token: u64) -> Option<Registered> {
        let conn = self.slot().try_lock().ok()?.as_ref()?.clone();
        let question = q.question_lower().into();
        let id = conn.register(Waiting::Worker { token, question })?;
        QUEUED.with_borrow_mut(|queued| queued.push(&conn, q, id, udp_size));
        Some(Registered { conn, id })
    }

    /// This thread's connections to the pool's upstream.
    fn with_conns<R>(&self, f: impl FnOnce(&mut ThreadConns) -> R) -> R {
        THREAD_CONNS.with_borrow_mut(|pools| {
            f(pools.entry(self.id).or_insert_with(|| ThreadConns {
                alive: self.alive.clone(),
                slots: (0..self.size).map(|_| Slot::default()).collect(),
                next: 0,
            }))
        })
    }

    /// The next slot of this thread's connections to the pool's upstream.
    fn slot(&self) -> Slot {
        self.with_conns(ThreadConns::next_slot)
    }

    /// The slot a task's exchange uses: one without a connection (none open, or closed) and
    /// not being opened first, else the next in turn. The worker's queries take the slots in
    /// turn and leave it to a task to open a missing connection: were the task to take the next
    /// slot instead, a pool of two could see every worker query find the same empty slot while
    /// the tasks take the other one, for good.
    fn task_slot(&self) -> Slot {
        self.with_conns(|t| {
            let empty = t.slots.iter().find(|s| {
                s.try_lock()
                    .is_ok_and(|c| c.as_ref().is_none_or(|c| c.is_closed()))
            });
            match empty {
                Some(s) => s.clone(),
                None => t.next_slot(),
            }
        })
    }

    async fn conn(&self) -> Result<(Arc<Conn>, bool), UpstreamError> {
        let slot = self.task_slot();
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
            writer: Arc::new(tokio::sync::Mutex::new(wr)),
            pending: Mutex::new(Pending {
                waiting: HashMap::new(),
                closed: false,
            }),
        });
        self.metrics.upstream_tcp_open(self.addr, 1);
        // On this thread's runtime, with the connection.
        super::readers::start(read_loop(
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
        let id = conn
            .register(Waiting::Task(tx))
            .ok_or(UpstreamError::Closed)?;
        // Remove our registration however this function ends (timeout included).
        let _registered = Registered {
            conn: conn.clone(),
            id,
        };
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
    // One timer for the connection's life, pushed back lazily: when it fires, it is set again
    // for `idle` after the last read, unless that has passed (no timer armed and cancelled per
    // read).
    let mut last_read = tokio::time::Instant::now();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
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
            if let Some(w) = waiting {
                w.answer(frame);
            }
        }
        // Keep only a partial answer, at the front.
        buf.drain(..start);
        if buf.capacity() - buf.len() < READ_ROOM {
            buf.reserve(READ_ROOM);
        }
        let read = tokio::select! {
            biased;
            r = rd.read_buf(&mut buf) => r,
            () = &mut idle_timer => {
                let until = last_read + idle;
                if tokio::time::Instant::now() < until {
                    idle_timer.as_mut().reset(until);
                    continue;
                }
                // Nothing read for `idle`: close. Any query still waiting has outlived its own
                // timeout or was just sent (it fails with Closed and is retried on a fresh
                // connection).
                break;
            }
        };
        match read {
            Ok(n) if n > 0 => last_read = tokio::time::Instant::now(),
            // Closed by the server, or failed.
            _ => break,
        }
    }
    conn.close();
    let _ = conn.writer.lock().await.shutdown().await;
    metrics.upstream_tcp_open(addr, -1);
}

#[cfg(test)]
#[path = "tcp_tests.rs"]
mod tests;
