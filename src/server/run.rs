//! Serving sockets the caller bound, until told to stop: one worker thread per UDP socket
//! (`udp::spawn_worker`), one TCP server per listener (`tcp::serve`), and beside them the
//! forwarder's health checks of upstreams marked down and the periodic purge of expired cache
//! entries. On stop the listeners close and the queries in flight get `server.grace_period`.
//!
//! The binary (`app::run`) and the in-process tests take this one path: `app::run` starts a
//! [`Server`] between binding and installing the node's rules and stops it last; a test calls
//! [`run`] with loopback sockets, a manual clock in the [`Context`] and a token.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::socket::{Bound, UDP_POLL};
use super::tcp::ConnCtx;
use super::{tcp, tcp_table, udp, Context};
use crate::lifecycle::handover::Peers;

/// How often expired cache entries are swept out.
const PURGE_EVERY: Duration = Duration::from_secs(10);

/// Serves `listeners` with `ctx` (its settings, cache, forwarder, metrics and clock) until
/// `shutdown` is cancelled, then stops listening and gives the queries in flight
/// `server.grace_period` to finish. Call it inside a tokio runtime (it is the shared runtime:
/// TCP connections, TCP-zone misses, refreshes and prefetches run on it).
///
/// # Errors
/// When a listener cannot be put in the mode it is served in, or a worker thread cannot start;
/// whatever had started is stopped first.
pub async fn run(
    ctx: Arc<Context>,
    listeners: Vec<Bound>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = Server::start(ctx, listeners, Arc::new(Peers::default()))?;
    shutdown.cancelled().await;
    server.stop().await;
    Ok(())
}

/// A running server: what [`run`] does, in steps, for a caller with more to do between starting
/// and stopping (`app::run`: self-check, node rules, handover, lameduck).
pub struct Server {
    ctx: Arc<Context>,
    /// Set to stop the UDP workers (each sees it within `socket::UDP_POLL`).
    stop: Arc<AtomicBool>,
    /// Cancelled to stop the TCP servers and their connections.
    cancel: CancellationToken,
    /// Misses, TCP connections and their queries: waited for at stop.
    tracker: TaskTracker,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Each TCP listener's address and what its connections share (a handed-over connection
    /// joins them).
    tcp: Vec<(SocketAddr, ConnCtx)>,
    /// Health checks and the cache purge, aborted at stop.
    maintenance: Vec<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Starts serving `listeners` (see [`run`]); `peers`: where TCP connections go at stop when
    /// another instance serves the same listeners (`lifecycle::handover`). UDP sockets are made
    /// blocking with a `socket::UDP_POLL` receive timeout and TCP listeners non-blocking, so
    /// sockets bound any way will do. Logs "listening for UDP on ADDR" and "listening for TCP on
    /// ADDR" for each (tests and operators read them). Call it inside a tokio runtime.
    ///
    /// # Errors
    /// As [`run`]; whatever had started is stopped first.
    pub fn start(
        ctx: Arc<Context>,
        listeners: Vec<Bound>,
        peers: Arc<Peers>,
    ) -> anyhow::Result<Server> {
        let mut server = Server {
            ctx,
            stop: Arc::new(AtomicBool::new(false)),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            threads: Vec::new(),
            tcp: Vec::new(),
            maintenance: Vec::new(),
        };
        for b in listeners {
            if let Err(e) = server.listen(b, &peers) {
                server.abandon();
                return Err(e);
            }
        }
        let ctx = &server.ctx;
        server.maintenance.push({
            let ctx = ctx.clone();
            tokio::spawn(async move { ctx.forwarder.run_health_checks().await })
        });
        // Expired answers leave memory within PURGE_EVERY even when nothing new pushes them out.
        server.maintenance.push({
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PURGE_EVERY);
                loop {
                    tick.tick().await;
                    ctx.cache.purge_expired(ctx.clock.now());
                }
            })
        });
        Ok(server)
    }

    /// Starts the workers and the TCP server of one listen address.
    fn listen(&mut self, b: Bound, peers: &Arc<Peers>) -> anyhow::Result<()> {
        let (ctx, settings) = (&self.ctx, &self.ctx.settings);
        let label = format!("dns://{}", b.addr);
        let workers = b.udp.len();
        for (i, sock) in b.udp.into_iter().enumerate() {
            sock.set_nonblocking(false)
                .and_then(|()| sock.set_read_timeout(Some(UDP_POLL)))
                .with_context(|| format!("cannot set up the UDP socket on {}", b.addr))?;
            let stats = ctx.metrics.new_udp_worker_for(label.clone());
            self.threads.push(
                udp::spawn_worker(
                    format!("nodedns-udp-{i}"),
                    sock,
                    settings.server.udp_batch,
                    ctx.clone(),
                    self.stop.clone(),
                    stats,
                )
                .context("cannot start UDP worker")?,
            );
        }
        info!(addr = %b.addr, workers, "listening for UDP on {}", b.addr);
        b.tcp
            .set_nonblocking(true)
            .with_context(|| format!("cannot set up the TCP listener on {}", b.addr))?;
        let listener = tokio::net::TcpListener::from_std(b.tcp)
            .with_context(|| format!("cannot serve the TCP listener on {}", b.addr))?;
        let cc = ConnCtx {
            ctx: ctx.clone(),
            stats: ctx.metrics.new_worker_for(label),
            tracker: self.tracker.clone(),
            shutdown: self.cancel.clone(),
            peers: peers.clone(),
            table: tcp_table::Table::new(
                settings.server.tcp_max_connections,
                settings.server.tcp_idle_timeout,
            ),
        };
        tokio::spawn(tcp::serve(listener, cc.clone()));
        self.tcp.push((b.addr, cc));
        info!(addr = %b.addr, "listening for TCP on {}", b.addr);
        Ok(())
    }

    /// What the queries are answered with: settings, cache, forwarder, metrics, clock.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Each TCP listener's address and what its connections share, for connections handed over
    /// by another instance.
    pub fn tcp_listeners(&self) -> Vec<(SocketAddr, ConnCtx)> {
        self.tcp.clone()
    }

    /// Tells everything started to stop, without waiting (a failed start).
    fn abandon(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cancel.cancel();
    }

    /// Stops listening (UDP workers and TCP servers; TCP connections stop reading at a message
    /// boundary), then gives the queries in flight `server.grace_period` to finish. Returns once
    /// every worker thread has ended and the queries are answered or the grace period is over.
    pub async fn stop(self) {
        self.abandon();
        for t in &self.maintenance {
            t.abort();
        }
        let threads = self.threads;
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await
        .ok();
        self.tracker.close();
        let grace = self.ctx.settings.server.grace_period;
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            warn!(?grace, "grace period over with queries still in flight");
        }
    }
}
