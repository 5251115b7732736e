//! DNS over TCP (RFC 7766): many queries per connection, each answered as soon as it is ready
//! (cache hits at once, misses when their upstream answers, so out of order). The connections of a
//! listener live in a table (`tcp_table`) capped at `server.tcp_max_connections`: at the cap, a
//! new connection takes the place of the one idle the longest, and the idle timeout
//! (`server.tcp_idle_timeout`) shrinks as the table fills, counted from a connection's last
//! complete message, so bytes trickled into a message never keep a connection alive. A
//! connection that owes a reply is never closed for being idle. A client that does not read its
//! answers is cut off after a write timeout, so it stalls only itself. At shutdown, when another
//! instance serves the same listeners, each connection stops reading at a message boundary,
//! finishes the answers it owes and is handed to that instance with the bytes it had read
//! (`lifecycle::handover`), so the client loses nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::tcp_table::{Entry, Table};
use super::{contain, Context, Handled};
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
    /// The listener's connections, capped at `server.tcp_max_connections`.
    pub table: Arc<Table>,
}

pub async fn serve(listener: TcpListener, cc: ConnCtx) {
    loop {
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
        // At the cap this closes the connection idle the longest, or waits while all are busy.
        let entry = tokio::select! {
            _ = cc.shutdown.cancelled() => {
                // Accepted but not served yet: the instance that stays serves it, if any.
                if cc.peers.any() {
                    if let Ok(s) = stream.into_std() {
                        let _ = cc.peers.give_tcp(s, &[]);
                    }
                }
                return;
            }
            e = cc.table.admit() => e,
        };
        let cc2 = cc.clone();
        cc.tracker.spawn(async move {
            if let Err(e) = connection(stream, Vec::new(), entry, cc2).await {
                debug!(client = %peer, error = %e, "TCP connection ended");
            }
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
    // It is open already: it joins the table even above the cap, which shortens idle timeouts.
    let entry = cc.table.join();
    let tracker = cc.tracker.clone();
    tracker.spawn(async move {
        if let Err(e) = connection(stream, read, entry, cc).await {
            debug!(error = %e, "TCP connection ended");
        }
    });
}

/// The length of the first complete message in `buf`, if there is one.
pub fn frame(buf: &[u8]) -> Option<usize> {
    let len = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]) as usize;
    (buf.len() >= 2 + len).then_some(len)
}

/// Takes the first complete length-prefixed message off the front of `buf` (the bytes read from
/// a connection so far), if there is one; a partial message stays in `buf` for the next read.
pub fn next_message(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let len = frame(buf)?;
    let pkt = buf[2..2 + len].to_vec();
    buf.drain(..2 + len);
    Some(pkt)
}

async fn connection(
    stream: TcpStream,
    mut buf: Vec<u8>,
    entry: Entry,
    cc: ConnCtx,
) -> std::io::Result<()> {
    let ConnCtx {
        ctx,
        stats,
        tracker,
        shutdown,
        peers,
        table: _,
    } = cc;
    let table = entry.table();
    let conn = entry.conn.clone();
    let peer = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MAX_PIPELINE);
    let wconn = conn.clone();
    let writer = tokio::spawn(async move {
        let mut ok = true;
        let mut replies = 0u64;
        while let Some(reply) = rx.recv().await {
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            framed.extend_from_slice(&reply);
            match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&framed)).await {
                Ok(Ok(())) => {
                    replies += 1;
                    wconn.note_written(Instant::now(), replies);
                }
                _ => {
                    ok = false;
                    break;
                }
            }
        }
        (wr, ok)
    });
    let mut out = Vec::new();
    let mut stopped = false;
    // Messages read that need a reply (the writer counts the replies written).
    let mut queries = 0u64;
    'conn: loop {
        // Every complete message already read is served before reading more (or stopping).
        while let Some(pkt) = next_message(&mut buf) {
            // Real time for the connection's activity and the hit's duration; the cache's clock
            // (the same instant, unless a test set it) for the entry's age.
            let start = Instant::now();
            let now = ctx.clock.at(start);
            // A panic answers this message SERVFAIL and the connection goes on (see `contain`).
            let handled =
                contain::packet(|| ctx.handle(&pkt, peer, Proto::Tcp, &stats, &mut out, now))
                    .unwrap_or_else(|| {
                        if contain::servfail(&pkt, &mut out) {
                            Handled::Reply
                        } else {
                            Handled::Drop
                        }
                    });
            // Before the reply is queued, so the writer never counts it first.
            if !matches!(handled, Handled::Drop) {
                queries += 1;
            }
            conn.note_read(start, queries);
            match handled {
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
                Handled::Miss(miss) => {
                    // Reserve the pipeline slot before spawning: reading pauses when it is full.
                    let Ok(permit) = tx.clone().reserve_owned().await else {
                        break 'conn;
                    };
                    let ctx = ctx.clone();
                    let stats = stats.clone();
                    let start = ctx.clock.now();
                    tracker.spawn(async move {
                        let resolve = ctx.resolve(&miss, &pkt, peer, Proto::Tcp, &stats, start);
                        let reply = match contain::task(resolve).await {
                            Some(reply) => reply,
                            None => {
                                let mut out = Vec::new();
                                contain::servfail(&pkt, &mut out);
                                out
                            }
                        };
                        permit.send(reply);
                    });
                }
            }
        }
        // The idle timer runs from the last complete message, so a message split across reads
        // has no more time than a whole one; it does not run while a reply is owed. The timeout
        // depends on how full the table is: look again at least every `recheck`.
        let (last, busy) = conn.activity();
        let wait = if busy {
            table.recheck()
        } else {
            let left = (last + table.idle_timeout()).saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            left.min(table.recheck())
        };
        let n = tokio::select! {
            _ = shutdown.cancelled() => {
                stopped = true;
                break;
            }
            // Closed to make room for a new connection.
            _ = conn.closed() => break,
            // The writer gave up on a client that does not read: the replies it owed never count.
            _ = tx.closed() => break,
            r = tokio::time::timeout(wait, rd.read_buf(&mut buf)) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => break,
                Err(_) => continue,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_off_the_stream_whole_and_in_order() {
        let mut buf = vec![0, 3, b'a', b'b', b'c', 0, 0, 0, 2, b'x'];
        assert_eq!(next_message(&mut buf).as_deref(), Some(&b"abc"[..]));
        // An empty message is a message.
        assert_eq!(next_message(&mut buf).as_deref(), Some(&b""[..]));
        // Half a message waits for the rest; so does half a length prefix.
        assert_eq!(next_message(&mut buf), None);
        assert_eq!(buf, [0, 2, b'x']);
        buf.push(b'y');
        assert_eq!(next_message(&mut buf).as_deref(), Some(&b"xy"[..]));
        buf.push(1);
        assert_eq!(next_message(&mut buf), None);
        assert_eq!(buf, [1]);
    }
}
