//! A rotating pool of connected UDP sockets per upstream, so a miss does not pay for opening and
//! closing a socket (socket, connect, epoll add and delete, close: about a third of a miss's CPU).
//!
//! RFC 5452 asks for an unpredictable source port and ID on every query, not for a new socket per
//! query. Each thread keeps, per upstream, `forward.udp_pool_size` slots. A query takes a random
//! slot; the slot's socket (bound by the kernel to a random ephemeral port, connected to the
//! upstream, so the kernel drops datagrams from any other address or port) carries it under a
//! random ID not in use on that socket. A socket is retired once it has carried
//! `forward.udp_socket_queries` queries or lived `forward.udp_socket_lifetime`: the slot gets a
//! new socket on a new random port, so ports an attacker may have learnt keep moving. A retired
//! socket stays open only until its last outstanding reply arrives or times out.
//!
//! Replies are demultiplexed by one reader per socket (inside the worker's future on a worker's
//! thread, a task elsewhere: `readers`): it reads every datagram that
//! arrives, finds the outstanding query by ID, checks the question (`dns::parse_response`) and
//! hands the parsed answer over. A datagram matching no outstanding query (unknown ID, wrong
//! question, too short) is dropped and counted (`nodedns_upstream_unmatched_replies_total`); the
//! query it may have targeted keeps waiting for the real answer.
//!
//! Sockets are registered with the runtime of the thread that opened them, so the pools are per
//! thread: a worker's misses use sockets driven by the worker's own runtime. A socket whose reader
//! is gone (its runtime was shut down) is replaced at its next pick.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::io::{Interest, Ready};
use tokio::sync::oneshot;

use super::answers::{self, Answer};
use super::UpstreamError;
use crate::dns::{self, Query, Response};

/// Largest reply read; a datagram this long or longer is malformed for the query it matches.
const RECV_BUF: usize = 4096;

/// How the pool is sized and how long its sockets live (from `forward.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Sockets per upstream per thread.
    pub size: usize,
    /// Queries a socket carries before it is retired.
    pub queries: u32,
    /// Age at which a socket is retired.
    pub lifetime: Duration,
}

/// A query waiting for its reply on a pool socket.
struct Waiter {
    /// The question as sent (lowercased wire form), which the reply must repeat.
    question: Box<[u8]>,
    to: Deliver,
}

/// Where a reply goes.
enum Deliver {
    /// To a task awaiting it.
    Task(oneshot::Sender<Answer>),
    /// To this thread's worker, under the token it gave (`answers`).
    Worker(u64),
}

impl Deliver {
    fn send(self, answer: Answer) {
        match self {
            // The waiter may have just given up; then the answer is simply dropped.
            Deliver::Task(tx) => {
                let _ = tx.send(answer);
            }
            Deliver::Worker(token) => answers::deliver(token, answer),
        }
    }
}

/// Hashes an upstream ID as itself: IDs are ours and random, so they spread over the table
/// without SipHash's cost.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u16(&mut self, v: u16) {
        // Spread into the top bits too (hashbrown takes its control byte from them).
        self.0 = u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Default)]
struct SockState {
    pending: HashMap<u16, Waiter, std::hash::BuildHasherDefault<IdHasher>>,
    /// No longer handed out; the reader stops once `pending` is empty.
    retired: bool,
    reader: Option<super::readers::Stop>,
}

/// One connected socket of a pool.
pub(super) struct PoolSocket {
    /// Registered for reading only: a socket registered for writing too would wake epoll after
    /// every send (the kernel frees the datagram's buffer space at once on loopback and soon
    /// after elsewhere), for nothing, as sends never wait.
    sock: AsyncFd<std::net::UdpSocket>,
    born: Instant,
    /// Queries handed this socket so far (only the owning thread's pool counts them).
    used: std::sync::atomic::AtomicU32,
    /// False once the reader has ended (stopped, or dropped with its thread or runtime).
    reader_alive: AtomicBool,
    state: Mutex<SockState>,
}

impl PoolSocket {
    /// Opens a socket connected to `upstream` (the kernel picks a random ephemeral port) and
    /// starts its reader on the current runtime.
    fn open(upstream: SocketAddr) -> io::Result<Arc<PoolSocket>> {
        let sock = super::fresh::connected(upstream)?;
        // SAFETY: the AsyncFd owns the socket, so its descriptor stays open for as long as the
        // registration lives.
        let sock = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }?;
        let s = Arc::new(PoolSocket {
            sock,
            born: Instant::now(),
            used: Default::default(),
            reader_alive: AtomicBool::new(true),
            state: Mutex::new(SockState::default()),
        });
        let reader = super::readers::start(read_loop(ReaderGuard(s.clone())));
        s.state.lock().reader = Some(reader);
        Ok(s)
    }

    /// The local port.
    #[cfg(test)]
    pub(super) fn local_port(&self) -> u16 {
        self.sock
            .get_ref()
            .local_addr()
            .map(|a| a.port())
            .unwrap_or(0)
    }

    fn worn_out(&self, limits: &PoolLimits, now: Instant) -> bool {
        self.used.load(Ordering::Relaxed) >= limits.queries
            || now.saturating_duration_since(self.born) >= limits.lifetime
            || !self.reader_alive.load(Ordering::Relaxed)
    }

    /// Takes the socket out of service: it closes once its outstanding queries are done.
    fn retire(&self) {
        let mut st = self.state.lock();
        st.retired = true;
        if st.pending.is_empty() {
            if let Some(r) = st.reader.take() {
                r.stop();
            }
        }
    }

    /// Registers a query under a random ID unused on this socket, its reply to go `to`; None
    /// when every ID is taken.
    fn register(&self, question: &[u8], to: Deliver) -> Option<u16> {
        let mut st = self.state.lock();
        if st.pending.len() >= usize::from(u16::MAX) {
            return None;
        }
        let id = loop {
            let id: u16 = rand::random();
            if !st.pending.contains_key(&id) {
                break id;
            }
        };
        st.pending.insert(
            id,
            Waiter {
                question: question.into(),
                to,
            },
        );
        Some(id)
    }

    /// Forgets query `id` (answered, timed out or cancelled); stops the reader of a retired
    /// socket with nothing left outstanding.
    fn forget(&self, id: u16) {
        let mut st = self.state.lock();
        st.pending.remove(&id);
        if st.retired && st.pending.is_empty() {
            if let Some(r) = st.reader.take() {
                r.stop();
            }
        }
    }

    /// Hands datagram `pkt` to the query it answers; false when it matches none.
    fn dispatch(&self, pkt: &[u8]) -> bool {
        if pkt.len() < dns::HEADER_LEN {
            return false;
        }
        let id = dns::u16_at(pkt, 0);
        let mut st = self.state.lock();
        let Some(w) = st.pending.get(&id) else {
            return false;
        };
        let answer = if pkt.len() >= RECV_BUF {
            Err(UpstreamError::Bad(dns::BadResponse::Malformed))
        } else {
            match dns::parse_response(pkt, &w.question) {
                // Our ID but another question: a spoofing attempt; the query keeps waiting.
                Err(dns::BadResponse::QuestionMismatch) => return false,
                r => r.map_err(UpstreamError::from),
            }
        };
        let w = st.pending.remove(&id);
        drop(st);
        if let Some(w) = w {
            w.to.send(answer);
        }
        true
    }

    /// Fails every outstanding query with `kind` (an ICMP error reported on the socket concerns
    /// all of them: the upstream is unreachable).
    fn fail_all(&self, kind: io::ErrorKind) {
        let failed: Vec<Waiter> = self.state.lock().pending.drain().map(|(_, w)| w).collect();
        for w in failed {
            w.to.send(Err(UpstreamError::Io(kind.into())));
        }
    }
}

/// Marks the reader gone, whatever ends it, and releases queries still waiting on it.
struct ReaderGuard(Arc<PoolSocket>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.reader_alive.store(false, Ordering::Relaxed);
        // The waiters learn of it now instead of at their timeout.
        self.0.fail_all(io::ErrorKind::ConnectionAborted);
    }
}

/// Reads every datagram arriving on the guard's socket and dispatches it; runs until aborted.
/// (The guard is made before the task is spawned, so even a reader aborted before its first poll
/// marks itself gone.)
async fn read_loop(guard: ReaderGuard) {
    let s = &guard.0;
    loop {
        let Ok(mut ready) = s.sock.ready(Interest::READABLE | Interest::ERROR).await else {
            return;
        };
        if ready.ready().is_error() {
            // ICMP port or host unreachable from the upstream: every query out on this socket
            // went to the same place, so they fail now rather than at their timeout.
            if let Ok(Some(e)) = s.sock.get_ref().take_error() {
                s.fail_all(e.kind());
            }
            ready.clear_ready_matching(Ready::ERROR);
        }
        loop {
            // Up to READ_BATCH datagrams per system call, into this thread's buffers (never held
            // across an await). A short batch emptied the socket's queue: the closure then says
            // WouldBlock, so the readiness is cleared without one more read to learn it (a
            // datagram arriving later raises a new edge).
            let r = ready.try_io(|fd| {
                RECV.with_borrow_mut(|b| {
                    let n = b.recv(fd.as_raw_fd())?;
                    for i in 0..n {
                        if !s.dispatch(&b.bufs[i][..b.lens[i]]) {
                            crate::metrics::resilience::UDP_UNMATCHED_REPLIES
                                .fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    if n < READ_BATCH {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                    Ok(())
                })
            });
            match r {
                Err(_would_block) => break,
                Ok(Ok(())) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => s.fail_all(e.kind()),
            }
        }
    }
}

/// Datagrams a pool socket's reader takes per system call.
const READ_BATCH: usize = 8;

/// A thread's buffers for its readers' `recvmmsg`.
struct RecvBatch {
    bufs: Box<[[u8; RECV_BUF]; READ_BATCH]>,
    /// The length of each datagram of the last read (`RECV_BUF` for one cut short).
    lens: [usize; READ_BATCH],
}

impl RecvBatch {
    fn new() -> Self {
        RecvBatch {
            bufs: Box::new([[0; RECV_BUF]; READ_BATCH]),
            lens: [0; READ_BATCH],
        }
    }

    /// Reads the datagrams waiting on `fd`, up to READ_BATCH, without blocking.
    fn recv(&mut self, fd: i32) -> io::Result<usize> {
        // SAFETY: iovec and mmsghdr are C structs of integers and raw pointers; zero is valid.
        let mut iov: [libc::iovec; READ_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; READ_BATCH] = unsafe { std::mem::zeroed() };
        for (i, (v, h)) in iov.iter_mut().zip(hdrs.iter_mut()).enumerate() {
            v.iov_base = self.bufs[i].as_mut_ptr().cast();
            v.iov_len = RECV_BUF;
            h.msg_hdr.msg_iov = v;
            h.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at one live buffer of RECV_BUF bytes owned by `self`,
        // which outlives the call; the kernel writes at most that much into each.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                READ_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = r as usize;
        for (len, h) in self.lens.iter_mut().zip(&hdrs).take(n) {
            *len = h.msg_len as usize;
        }
        Ok(n)
    }
}

/// The sockets of one upstream on one thread.
pub(super) struct Pool {
    upstream: SocketAddr,
    slots: Vec<Option<Arc<PoolSocket>>>,
}

impl Pool {
    pub(super) fn new(upstream: SocketAddr, size: usize) -> Pool {
        Pool {
            upstream,
            slots: vec![None; size.max(1)],
        }
    }

    /// A socket for one query: a random slot's socket, replaced first when it is missing, worn
    /// out or its reader is gone. Counts the query against the socket.
    pub(super) fn pick(
        &mut self,
        limits: &PoolLimits,
        now: Instant,
    ) -> io::Result<Arc<PoolSocket>> {
        let i = rand::random_range(0..self.slots.len());
        let slot = &mut self.slots[i];
        if let Some(s) = slot.as_ref().filter(|s| s.worn_out(limits, now)) {
            s.retire();
            *slot = None;
        }
        let s = match slot {
            Some(s) => s.clone(),
            None => slot.insert(PoolSocket::open(self.upstream)?).clone(),
        };
        s.used.fetch_add(1, Ordering::Relaxed);
        Ok(s)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for s in self.slots.iter().flatten() {
            s.retire();
        }
    }
}

thread_local! {
    static RECV: RefCell<RecvBatch> = RefCell::new(RecvBatch::new());
    static SEND: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static POOLS: RefCell<HashMap<SocketAddr, Pool, ahash::RandomState>> =
        RefCell::new(HashMap::default());
}

/// Raises the soft limit on open files to the hard limit (as Go programs such as CoreDNS do at
/// start): every thread that forwards keeps up to `forward.udp_pool_size` sockets per UDP
/// upstream, `need` in all, more than the usual soft limit of 1024 on a large node. Warns when
/// even the hard limit is below `need` (queries then fail with EMFILE once it is reached).
pub fn raise_fd_limit(need: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    if lim.rlim_cur < need {
        tracing::warn!(
            limit = lim.rlim_cur,
            need,
            "the open-files limit is below what the UDP socket pools may use; lower \
             forward.udp_pool_size or raise the limit"
        );
    }
}

/// A query registered on a pool socket; its registration is removed when this is dropped
/// (answered, timed out or cancelled).
pub struct Outstanding {
    sock: Arc<PoolSocket>,
    id: u16,
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.sock.forget(self.id);
    }
}

/// Registers `q` on a socket of this thread's pool for `upstream`, its reply to go `to`, and
/// sends it. A socket whose buffer is full (`Io(WouldBlock)`) takes no query: the caller goes
/// another way.
fn register_and_send(
    upstream: SocketAddr,
    q: &Query,
    udp_size: u16,
    now: Instant,
    limits: &PoolLimits,
    to: Deliver,
) -> Result<Outstanding, UpstreamError> {
    let sock = POOLS.with_borrow_mut(|pools| {
        pools
            .entry(upstream)
            .or_insert_with(|| Pool::new(upstream, limits.size))
            .pick(limits, now)
    })?;
    let id = sock
        .register(q.question_lower(), to)
        .ok_or(UpstreamError::Io(io::ErrorKind::WouldBlock.into()))?;
    let out = Outstanding { sock, id };
    // Written in this thread's buffer and sent at once with send(2) (nothing waits for the
    // socket to be writable: a UDP socket's buffer is seldom full).
    SEND.with_borrow_mut(|msg| {
        msg.clear();
        dns::write_upstream_query(q, id, udp_size, msg);
        socket2::SockRef::from(out.sock.sock.get_ref()).send(msg)
    })?;
    Ok(out)
}

/// Sends `q` to `upstream` over a socket of this thread's pool; its reply (or the socket's
/// failure) is handed to this thread's worker under `token` (`answers`). The caller times
/// it out by dropping the returned registration. A full socket buffer is an error here: the
/// caller then takes the path that can wait.
pub fn send_for_worker(
    upstream: SocketAddr,
    q: &Query,
    udp_size: u16,
    now: Instant,
    limits: &PoolLimits,
    token: u64,
) -> Result<Outstanding, UpstreamError> {
    register_and_send(upstream, q, udp_size, now, limits, Deliver::Worker(token))
}

/// One exchange with `upstream` over a socket of this thread's pool, started at `now`; over a
/// fresh socket when the pool's socket cannot take it (its buffer full).
pub async fn exchange(
    upstream: SocketAddr,
    q: &Query,
    udp_size: u16,
    now: Instant,
    timeout: Duration,
    limits: &PoolLimits,
) -> Result<Response, UpstreamError> {
    let (tx, rx) = oneshot::channel();
    let _out = match register_and_send(upstream, q, udp_size, now, limits, Deliver::Task(tx)) {
        Err(UpstreamError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
            // Boxed: rare, and its state would otherwise enlarge every miss's task.
            let left = timeout.saturating_sub(now.elapsed());
            return Box::pin(super::fresh::exchange_fresh(upstream, q, udp_size, left)).await;
        }
        r => r?,
    };
    let wait = async { rx.await.map_err(|_| UpstreamError::Closed)? };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| UpstreamError::Timeout)?
}

#[cfg(test)]
#[path = "udp_pool_tests.rs"]
mod tests;
