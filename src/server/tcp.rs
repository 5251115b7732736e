//! DNS over TCP (RFC 7766): many queries per connection, each answered as soon as it is ready
//! (cache hits at once, misses when their upstream answers, so out of order). A connection is
//! closed after `server.tcp_idle_timeout` without a query; the number of connections is capped;
//! a client that does not read its answers is cut off after a write timeout, so it stalls only
//! itself. At shutdown, when another instance serves the same listeners, each connection stops
//! reading at a message boundary, finishes the answers it owes and is handed to that instance
//! with the bytes it had read (`lifecycle::handover`), so the client loses nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::{Context, Handled};
use crate::lifecycle::handover::Peers;
use crate::metrics::{Proto, WorkerStats};

/// Queries one connection may have unanswered at once; reading pauses beyond it.
const MAX_PIPELINE: usize = 64;
/// A client must take a reply within this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection needs besides its stream.
#[derive(Clone)]
pub struct ConnCtx {
    pub ctx: Arc<Context>,
    pub stats: Arc<WorkerStats>,
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    /// Where connections go at shutdown when another instance serves the same listeners.
    pub peers: Arc<Peers>,
}

pub async fn serve(listener: TcpListener, cc: ConnCtx) {
    let limit = Arc::new(Semaphore::new(cc.ctx.settings.tcp_max_connections));
    loop {
        let permit = tokio::select! {
            _ = cc.shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = cc.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    crate::log_limited!(warn, error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let cc2 = cc.clone();
        cc.tracker.spawn(async move {
            if let Err(e) = connection(stream, Vec::new(), cc2).await {
                debug!(client = %peer, error = %e, "TCP connection ended");
            }
            drop(permit);
        });
    }
}

/// Serves a connection a previous instance handed over, starting with the bytes it had read.
pub fn adopt(stream: std::net::TcpStream, read: Vec<u8>, cc: ConnCtx, rt: &tokio::runtime::Handle) {
    let _guard = rt.enter();
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream))
    {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "cannot serve a handed-over TCP connection");
            return;
        }
    };
    let tracker = cc.tracker.clone();
    tracker.spawn(async move {
        if let Err(e) = connection(stream, read, cc).await {
            debug!(error = %e, "TCP connection ended");
        }
    });
}

/// The length of the first complete message in `buf`, if there is one.
fn frame(buf: &[u8]) -> Option<usize> {
    let len = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]) as usize;
    (buf.len() >= 2 + len).then_some(len)
}

async fn connection(stream: TcpStream, mut buf: Vec<u8>, cc: ConnCtx) -> std::io::Result<()> {
    let ConnCtx {
        ctx,
        stats,
        tracker,
        shutdown,
        peers,
    } = cc;
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_PIPELINE);
    let writer = tokio::spawn(async move {
        let mut ok = true;
        while let Some(reply) = rx.recv().await {
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            framed.extend_from_slice(&reply);
            match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&framed)).await {
                Ok(Ok(())) => {}
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        (wr, ok)
    });
    let idle = ctx.settings.tcp_idle_timeout;
    let mut out = Vec::new();
    let mut stopped = false;
    'conn: loop {
        // Every complete message already read is served before reading more (or stopping).
        while let Some(len) = frame(&buf) {
            let pkt = buf[2..2 + len].to_vec();
            buf.drain(..2 + len);
            let start = Instant::now();
            match ctx.handle(&pkt, peer, Proto::Tcp, &stats, &mut out, start) {
                Handled::Hit(timing) => {
                    stats.hit_durations(&[timing], start.elapsed());
                    if tx.send(std::mem::take(&mut out)).await.is_err() {
                        break 'conn;
                    }
                }
                Handled::Reply => {
                    if tx.send(std::mem::take(&mut out)).await.is_err() {
                        break 'conn;
                    }
                }
                Handled::Drop => {}
                Handled::Miss(q) => {
                    // Reserve the pipeline slot before spawning: reading pauses when it is full.
                    let Ok(permit) = tx.clone().reserve_owned().await else {
                        break 'conn;
                    };
                    let ctx = ctx.clone();
                    let stats = stats.clone();
                    let start = Instant::now();
                    tracker.spawn(async move {
                        let reply = ctx.resolve(&q, &pkt, peer, Proto::Tcp, &stats, start).await;
                        permit.send(reply);
                    });
                }
            }
        }
        // A message may be split across reads: the idle timer covers the whole wait.
        let n = tokio::select! {
            _ = shutdown.cancelled() => {
                stopped = true;
                break;
            }
            r = tokio::time::timeout(idle, rd.read_buf(&mut buf)) => match r {
                Ok(Ok(n)) => n,
                _ => break,
            },
        };
        if n == 0 {
            break;
        }
    }
    drop(tx);
    let Ok((wr, written)) = writer.await else {
        return Ok(());
    };
    if stopped && written && peers.any() {
        // Every answer owed is written: the peer carries on from the bytes read so far.
        let stream = rd.reunite(wr).map_err(std::io::Error::other)?.into_std()?;
        match peers.give_tcp(stream, &buf) {
            Ok(()) => return Ok(()),
            Err(stream) => return close(TcpStream::from_std(stream)?.into_split().1).await,
        }
    }
    close(wr).await
}

async fn close(mut wr: OwnedWriteHalf) -> std::io::Result<()> {
    let _ = wr.shutdown().await;
    Ok(())
}
