//! DNS over TCP (RFC 7766): many queries per connection, each answered as soon as it is ready
//! (cache hits at once, misses when their upstream answers, so out of order). A connection is
//! closed after `server.tcp_idle_timeout` without a query; the number of connections is capped;
//! a client that does not read its answers is cut off after a write timeout, so it stalls only
//! itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::{Context, Handled};
use crate::metrics::{Proto, WorkerStats};

/// Queries one connection may have unanswered at once; reading pauses beyond it.
const MAX_PIPELINE: usize = 64;
/// A client must take a reply within this long.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Context>,
    stats: Arc<WorkerStats>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(ctx.settings.tcp_max_connections));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(r) => r,
                Err(e) => {
                    crate::log_limited!(warn, error = %e, "TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ctx = ctx.clone();
        let stats = stats.clone();
        let shutdown = shutdown.clone();
        let t2 = tracker.clone();
        tracker.spawn(async move {
            if let Err(e) = connection(stream, ctx, stats, t2, shutdown).await {
                debug!(client = %peer, error = %e, "TCP connection ended");
            }
            drop(permit);
        });
    }
}

async fn connection(
    stream: TcpStream,
    ctx: Arc<Context>,
    stats: Arc<WorkerStats>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_PIPELINE);
    let writer = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            framed.extend_from_slice(&reply);
            match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&framed)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let _ = wr.shutdown().await;
    });
    let idle = ctx.settings.tcp_idle_timeout;
    let mut out = Vec::new();
    loop {
        let len = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(idle, rd.read_u16()) => match r {
                Ok(Ok(len)) => len as usize,
                _ => break,
            },
        };
        let mut pkt = vec![0u8; len];
        match tokio::time::timeout(idle, rd.read_exact(&mut pkt)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let start = Instant::now();
        match ctx.handle(&pkt, peer, Proto::Tcp, &stats, &mut out, start) {
            Handled::Hit(timing) => {
                stats.hit_durations(&[timing], start.elapsed());
                if tx.send(std::mem::take(&mut out)).await.is_err() {
                    break;
                }
            }
            Handled::Reply => {
                if tx.send(std::mem::take(&mut out)).await.is_err() {
                    break;
                }
            }
            Handled::Drop => {}
            Handled::Miss(q) => {
                // Reserve the pipeline slot before spawning: reading pauses when it is full.
                let Ok(permit) = tx.clone().reserve_owned().await else {
                    break;
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
    drop(tx);
    let _ = writer.await;
    Ok(())
}
