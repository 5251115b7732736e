//! UDP workers: one OS thread per SO_REUSEPORT socket. Each wakes in `recvmmsg` with up to
//! `server.udp_batch` datagrams (MSG_WAITFORONE: it returns as soon as one is there, so batching
//! adds no latency), answers the cache hits among them on this thread with no allocation, spawn or
//! channel hop, and sends every reply of the batch with one `sendmmsg`.
//!
//! A miss stays on the thread too, so the upstream exchange and the reply cost no thread hop (no
//! futex wake of another thread, no context switch, no cross-core cache traffic). Every worker
//! drives its own current-thread tokio runtime; its upstream sockets and pooled TCP connections
//! are its own (see `forward::udp_pool` and `forward::tcp`), and their readers run inside the
//! worker's loop (`forward::readers`). The common miss has no task: the worker sends it (a
//! cluster zone's misses of one batch leave in one write per pooled connection) and keeps it in
//! its table (`inflight`) until the socket's reader hands it the reply, then answers the misses
//! finished together with one `sendmmsg` (see `forward::direct`); the others become tasks on the
//! runtime. The worker blocks in
//! `recvmmsg` while none of its misses is in flight, the cheapest wait for a pure cache
//! workload; with misses in flight it waits on epoll through the runtime, so replies from
//! upstreams, timeouts and new queries are served in one loop.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio_util::task::TaskTracker;

use super::inflight::{Pending, Table, Waiting};
use super::socket::UDP_POLL;
use super::udp_batch::{Batch, Replies, Slot, SLOT_LEN};
use super::{contain, Context, Handled, Rejected};
use crate::dns;
use crate::forward::{direct, UpstreamAnswer, UpstreamError};
use crate::metrics::{HitTiming, Proto, WorkerStats};

/// How long a worker keeps its socket registered with epoll after its last miss completes, so a
/// trickle of misses does not add and remove the registration for each one.
const EPOLL_LINGER: Duration = Duration::from_millis(50);

/// Batches between two looks at how long ago the runtime last ran (see `drive_runtime`): at
/// 300 batches a second, under a second; under load, a few milliseconds.
const DRIVE_CHECK: u32 = 256;

/// Starts a worker thread serving `sock` until `stop` is set, reading up to `batch` datagrams
/// per system call.
pub fn spawn_worker(
    name: String,
    sock: UdpSocket,
    batch: usize,
    ctx: Arc<Context>,
    stop: Arc<AtomicBool>,
    stats: Arc<WorkerStats>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name).spawn(move || {
        let local = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot start a UDP worker's runtime");
                return;
            }
        };
        // The upstream readers of this thread run inside the worker's loop (`forward::readers`).
        crate::forward::adopt_readers();
        let mut w = Worker {
            sock: Arc::new(sock),
            ctx,
            local_tasks: TaskTracker::new(),
            table: Table::default(),
            answers: Vec::new(),
            replies: Replies::default(),
            stats,
            batch: Batch::new(batch.clamp(1, 256)),
        };
        // A panic outside any one datagram (receiving, sending) restarts the loop: a dead worker
        // would leave its share of SO_REUSEPORT traffic unanswered. `run` returns only once
        // `stop` is set.
        while contain::packet(|| local.block_on(w.run(&stop))).is_none() {
            tracing::error!("a UDP worker's loop panicked; it goes on serving");
        }
    })
}

struct Worker {
    sock: Arc<UdpSocket>,
    ctx: Arc<Context>,
    /// Misses resolved on this thread's own runtime.
    local_tasks: TaskTracker,
    /// Misses resolved without a task, waiting for their upstream's reply.
    table: Table,
    /// Upstream replies taken for the table's misses.
    answers: Vec<(u64, UpstreamAnswer)>,
    /// Replies to the table's misses, sent together.
    replies: Replies,
    stats: Arc<WorkerStats>,
    batch: Batch,
}

/// What ended a busy worker's wait (besides its timer).
enum Wake<G> {
    /// Upstream replies for misses of the table were handed over.
    Answers,
    /// The client socket became readable (or its readiness failed).
    Client(io::Result<G>),
}

impl Worker {
    async fn run(&mut self, stop: &AtomicBool) {
        let fd = self.sock.as_raw_fd();
        // The socket is registered with this thread's epoll only while misses are out (and for
        // EPOLL_LINGER after the last one). A registered socket has epoll's entry on its wait
        // queue, so every datagram received or sent runs epoll's wake-up callback under a lock:
        // measured, 3% of the CPU of a pure cache-hit load.
        let mut afd: Option<AsyncFd<Arc<UdpSocket>>> = None;
        let mut idle_since: Option<Instant> = None;
        let mut replies: Vec<usize> = Vec::with_capacity(self.batch.bufs.len());
        let mut hits: Vec<HitTiming> = Vec::with_capacity(self.batch.bufs.len());
        let mut keys: Vec<u64> = Vec::with_capacity(self.batch.bufs.len());
        // Held here so a batch's clock read tests a local, not a field behind the context.
        let clock = self.ctx.clock.clone();
        // When this thread's runtime last ran while the worker blocks in `recvmmsg` (see
        // `drive_runtime`), and the batches since.
        let mut driven = Instant::now();
        let mut batches: u32 = 0;
        // The busy loop's one timer (see below), and whether its last wait gave the runtime
        // control.
        let mut tick = std::pin::pin!(tokio::time::sleep(UDP_POLL));
        let mut waited = false;
        while !stop.load(Ordering::Relaxed) {
            let r = if !self.busy() {
                if afd.is_some() {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= EPOLL_LINGER {
                        afd = None;
                        idle_since = None;
                    }
                }
                // Nothing of ours in flight: block in the kernel (up to UDP_POLL).
                self.batch.recv(fd, 0)
            } else {
                idle_since = None;
                let registered = match &afd {
                    Some(a) => a,
                    None => {
                        // SAFETY: the AsyncFd owns a clone of the Arc, so the socket stays open
                        // and keeps its descriptor for as long as the registration lives.
                        match unsafe {
                            AsyncFd::register_with_interest(self.sock.clone(), Interest::READABLE)
                        } {
                            Ok(a) => afd.insert(a),
                            Err(e) => {
                                let e = io::Error::from(e);
                                crate::log_limited!(warn, error = %e, "cannot register a UDP worker socket");
                                // Let the misses progress, then read again.
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                continue;
                            }
                        }
                    }
                };
                // Let the misses' tasks run and the upstream sockets' readers take the upstream
                // replies already there, then finish the misses they answered (and those timed
                // out) before reading more clients. After a wait that gave the runtime control
                // (it polled its I/O driver and ran the woken tasks before this loop went on),
                // yielding again would only cost an empty epoll poll.
                if !waited {
                    tokio::task::yield_now().await;
                    direct::run_readers().await;
                }
                let now = self.complete(fd);
                // Bounded like the blocking read, so a stop is seen while misses are out, and
                // by the next timeout of a miss in the table. One timer for the whole loop, moved
                // only when it has fired or a miss times out sooner: no timer to register and
                // cancel per wait.
                let due = self
                    .table
                    .next_expiry()
                    .map_or(now + UDP_POLL, |t| t.min(now + UDP_POLL));
                let set = tick.deadline().into_std();
                if set <= now || set > due {
                    tick.as_mut().reset(due.into());
                }
                let mut wait = std::pin::pin!(async {
                    tokio::select! {
                        biased;
                        () = std::future::poll_fn(direct::poll_replies) => Some(Wake::Answers),
                        () = &mut tick => None,
                        r = registered.readable() => Some(Wake::Client(r)),
                    }
                });
                // Polled once per turn of the runtime: ready at the first poll means the runtime
                // did not get control.
                let mut polls = 0u32;
                let woke = std::future::poll_fn(|cx| {
                    polls += 1;
                    std::future::Future::poll(wait.as_mut(), cx)
                })
                .await;
                waited = polls > 1;
                let mut ready = match woke {
                    // Replies were handed over: finish their misses before anything else, with
                    // no yield first (the runtime gets control at the next wait, or at the yield
                    // that follows a batch of clients).
                    Some(Wake::Answers) => {
                        waited = true;
                        continue;
                    }
                    None => continue,
                    Some(Wake::Client(Ok(g))) => g,
                    Some(Wake::Client(Err(e))) => {
                        crate::log_limited!(warn, error = %e, "UDP readiness failed");
                        continue;
                    }
                };
                let r = self.batch.recv(fd, libc::MSG_DONTWAIT);
                // A short batch emptied the socket's queue: clear the readiness now rather than
                // learn it from one more read that finds nothing (a datagram arriving later
                // raises a new edge).
                let full = self.batch.bufs.len();
                match r {
                    Ok(n) if n < full => ready.clear_ready(),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        ready.clear_ready();
                        continue;
                    }
                    _ => {}
                }
                r
            };
            let n = match r {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    // Idle for UDP_POLL: a good moment to let the runtime run.
                    if !self.busy() {
                        drive_runtime().await;
                        driven = Instant::now();
                    }
                    continue;
                }
                Err(e) => {
                    crate::log_limited!(warn, error = %e, "UDP receive failed");
                    continue;
                }
            };
            replies.clear();
            hits.clear();
            // One read of the real clock per batch: the hits' durations count from it, and the
            // cache's clock (the same instant, unless a test set it) ages their entries.
            let arrived = Instant::now();
            let now = clock.at(arrived);
            // Parse every query of the batch, prefetch all their cache entries, then look them
            // up: the memory loads overlap instead of stalling one query after another.
            // Each datagram's handling is contained (see `contain`): a panic answers that one
            // SERVFAIL and the batch goes on.
            keys.clear();
            for i in 0..n {
                match contain::packet(|| self.prepare_slot(i)) {
                    Some(Some(key)) => keys.push(key),
                    Some(None) => {}
                    None => self.contained(i),
                }
            }
            let _ = contain::packet(|| self.ctx.cache.prefetch(&keys));
            for i in 0..n {
                match contain::packet(|| self.handle_slot(i, now, &mut hits)) {
                    Some(true) => replies.push(i),
                    Some(false) => {}
                    None => {
                        self.contained(i);
                        if matches!(self.batch.slots[i], Slot::Done { reply: true }) {
                            replies.push(i);
                        }
                    }
                }
            }
            // The batch's misses to pooled TCP connections leave now, one write per connection.
            direct::flush_sends();
            if !replies.is_empty() {
                if let Err(e) = self.batch.send(fd, &replies) {
                    crate::log_limited!(debug, error = %e, "UDP send failed");
                }
            }
            // A hit's duration runs from the batch's arrival to its reply leaving: one clock
            // read for the batch.
            if !hits.is_empty() {
                self.stats.hit_durations(&hits, arrived.elapsed());
            }
            // Busy with hits alone: still let the runtime run about every UDP_POLL (the time is
            // looked at once in DRIVE_CHECK batches: a hit pays one increment).
            batches = batches.wrapping_add(1);
            if batches % DRIVE_CHECK == 0
                && !self.busy()
                && arrived.saturating_duration_since(driven) >= UDP_POLL
            {
                drive_runtime().await;
                driven = arrived;
            }
        }
        // Stopped listening: answer the misses already taken, within the grace period.
        self.local_tasks.close();
        let grace = self.ctx.settings.server.grace_period;
        let until = Instant::now() + grace;
        loop {
            tokio::task::yield_now().await;
            direct::run_readers().await;
            let now = self.complete(fd);
            if self.table.is_empty() || now >= until {
                break;
            }
            let next = self.table.next_expiry().map_or(until, |t| t.min(until));
            let _ = tokio::time::timeout(
                next.saturating_duration_since(now),
                std::future::poll_fn(direct::poll_replies),
            )
            .await;
        }
        let left = self.table.len();
        // Dropped: their flights and in-flight slots are released.
        drop(self.table.take_all());
        let rest = until.saturating_duration_since(Instant::now());
        if left > 0
            || tokio::time::timeout(rest, async {
                // The tasks' replies come through this thread's readers: keep them running.
                tokio::select! {
                    () = self.local_tasks.wait() => {}
                    () = std::future::poll_fn(crate::forward::poll_readers) => {}
                }
            })
            .await
            .is_err()
        {
            crate::log_limited!(warn, ?grace, "grace period over with UDP queries in flight");
        }
    }

    /// True while misses of this worker are in flight, on tasks or in its table.
    fn busy(&self) -> bool {
        !self.local_tasks.is_empty() || !self.table.is_empty()
    }

    /// Finishes the table's misses whose upstream replies have arrived and those whose exchange
    /// has timed out, and sends their replies with one `sendmmsg`. A miss with more to try (a
    /// failover, a TCP retry) goes on as a task.
    /// Returns the time it read.
    fn complete(&mut self, fd: i32) -> Instant {
        let now = Instant::now();
        if self.table.is_empty() {
            return now;
        }
        let mut answers = std::mem::take(&mut self.answers);
        direct::take_answers(&mut answers);
        for (token, answer) in answers.drain(..) {
            if let Some(p) = self.table.take(token) {
                self.finish(p, answer);
            }
        }
        self.answers = answers;
        while let Some(p) = self.table.take_expired(now) {
            self.finish(p, Err(UpstreamError::Timeout));
        }
        self.replies.send(fd);
        now
    }

    /// Finishes one miss of the table with its first exchange's `answer`.
    fn finish(&mut self, p: Pending, answer: UpstreamAnswer) {
        let Pending { client, attempt } = p;
        let out = self.replies.next();
        let (ctx, stats) = (&self.ctx, &self.stats);
        match contain::packet(|| ctx.finish_direct(&client, attempt, answer, stats, out)) {
            Some(None) => self.replies.push(client.src),
            Some(Some(resume)) => {
                let ctx = self.ctx.clone();
                let sock = self.sock.clone();
                let stats = self.stats.clone();
                self.local_tasks.spawn(async move {
                    let resolve = Box::pin(ctx.resume_direct(&client, resume, &stats));
                    let reply = match contain::task(resolve).await {
                        Some(reply) => reply,
                        None => {
                            let mut out = Vec::new();
                            contain::servfail(&client.pkt, &mut out);
                            out
                        }
                    };
                    send_reply(&sock, reply, client.src);
                });
            }
            None => {
                if contain::servfail(&client.pkt, self.replies.next()) {
                    self.replies.push(client.src);
                }
            }
        }
    }

    /// After a panic while datagram `i` was handled: `slots[i]` becomes done, with a SERVFAIL in
    /// `out[i]` when the datagram has a header.
    #[cold]
    #[inline(never)]
    fn contained(&mut self, i: usize) {
        let b = &mut self.batch;
        let len = (b.hdrs[i].msg_len as usize).min(SLOT_LEN);
        let reply = contain::servfail(&b.bufs[i][..len], &mut b.out[i]);
        b.slots[i] = Slot::Done { reply };
    }

    /// Parses datagram `i` of the batch into `slots[i]`; returns its cache key if it is a query.
    #[inline]
    fn prepare_slot(&mut self, i: usize) -> Option<u64> {
        let b = &mut self.batch;
        b.slots[i] = match b.peer(i) {
            None => Slot::Done { reply: false },
            Some(_) if b.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 => {
                self.stats.malformed(Proto::Udp);
                Slot::Done { reply: false }
            }
            Some(src) => {
                let pkt = &b.bufs[i][..b.hdrs[i].msg_len as usize];
                match self
                    .ctx
                    .parse(pkt, src, Proto::Udp, &self.stats, &mut b.out[i])
                {
                    Ok((q, key)) => Slot::Query { q, key, src },
                    Err(Rejected::Reply) => Slot::Done { reply: true },
                    Err(Rejected::Drop) => Slot::Done { reply: false },
                }
            }
        };
        match b.slots[i] {
            Slot::Query { key, .. } => Some(key),
            Slot::Done { .. } => None,
        }
    }

    /// Handles datagram `i` of the batch after [`prepare_slot`](Self::prepare_slot); true when
    /// `out[i]` holds a reply to send now.
    #[inline]
    fn handle_slot(&mut self, i: usize, now: Instant, hits: &mut Vec<HitTiming>) -> bool {
        let b = &mut self.batch;
        let (q, key, src) = match &b.slots[i] {
            Slot::Done { reply } => return *reply,
            Slot::Query { q, key, src } => (q, *key, *src),
        };
        let pkt = &b.bufs[i][..b.hdrs[i].msg_len as usize];
        match self.ctx.answer(
            q,
            key,
            pkt,
            src,
            Proto::Udp,
            &self.stats,
            &mut b.out[i],
            now,
        ) {
            Handled::Hit(timing) => {
                hits.push(timing);
                true
            }
            Handled::Reply => true,
            Handled::Drop => false,
            Handled::Miss(miss) => {
                let token = self.table.vacant();
                if let Some(attempt) = self.ctx.begin_direct(&miss, token) {
                    let client = Waiting {
                        miss,
                        pkt: pkt.to_vec(),
                        src,
                        start: now,
                    };
                    self.table.insert(token, Pending { client, attempt });
                    return false;
                }
                let start = now;
                let pkt = pkt.to_vec();
                let ctx = self.ctx.clone();
                let sock = self.sock.clone();
                let stats = self.stats.clone();
                let task = async move {
                    // Boxed: the task then stays small, and the runtime moves and rewrites the
                    // whole task as it is spawned, polled and completed.
                    let resolve =
                        Box::pin(ctx.resolve(&miss, &pkt, src, Proto::Udp, &stats, start));
                    let reply = match contain::task(resolve).await {
                        Some(reply) => reply,
                        None => {
                            let mut out = Vec::new();
                            contain::servfail(&pkt, &mut out);
                            out
                        }
                    };
                    send_reply(&sock, reply, src);
                };
                // This thread's runtime (we are inside its block_on), for UDP and TCP zones
                // alike: the upstream sockets and connections it uses are this thread's.
                self.local_tasks.spawn(task);
                false
            }
        }
    }
}

/// Lets this thread's runtime run once: the worker blocks in `recvmmsg`, not in the runtime,
/// while none of its misses is in flight, so the readers of its upstream sockets and pooled TCP
/// connections (their reads, their idle timers: a connection idle past
/// `forward.tcp_idle_timeout` is closed, one the server closed is seen) and its tasks would
/// otherwise wait for its next miss. The first yield lets the runtime poll its I/O driver and
/// timers, then the readers they woke run, and the second yield lets the woken tasks run.
async fn drive_runtime() {
    tokio::task::yield_now().await;
    direct::run_readers().await;
    tokio::task::yield_now().await;
}

/// Sends one reply; one longer than the interface MTU (EMSGSIZE: the socket sets DF) goes as a
/// TC=1 reply instead, as in [`Batch::send`].
fn send_reply(sock: &UdpSocket, mut reply: Vec<u8>, to: SocketAddr) {
    let mut r = sock.send_to(&reply, to);
    if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE)) {
        dns::truncate_reply(&mut reply);
        r = sock.send_to(&reply, to);
    }
    if let Err(e) = r {
        crate::log_limited!(debug, client = %to, error = %e, "UDP send failed");
    }
}
