//! UDP workers: one OS thread per SO_REUSEPORT socket, blocking in `recv_from`. A cache hit is
//! answered on that thread with no allocation, spawn or channel hop; a miss is copied and spawned
//! onto the tokio runtime, which sends the answer on a clone of the same socket.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::runtime::Handle;
use tokio_util::task::TaskTracker;

use super::{Context, Handled};
use crate::metrics::{Proto, WorkerStats};

/// Largest datagram read. Anything longer is cut and fails to parse as a query.
const RECV_BUF: usize = 65535;

/// Starts a worker thread serving `sock` until `stop` is set.
pub fn spawn_worker(
    name: String,
    sock: UdpSocket,
    ctx: Arc<Context>,
    rt: Handle,
    tracker: TaskTracker,
    stop: Arc<AtomicBool>,
    stats: Arc<WorkerStats>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || run_worker(Arc::new(sock), ctx, rt, tracker, stop, stats))
}

fn run_worker(
    sock: Arc<UdpSocket>,
    ctx: Arc<Context>,
    rt: Handle,
    tracker: TaskTracker,
    stop: Arc<AtomicBool>,
    stats: Arc<WorkerStats>,
) {
    let mut buf = vec![0u8; RECV_BUF];
    let mut out = Vec::with_capacity(RECV_BUF);
    while !stop.load(Ordering::Relaxed) {
        let (n, src) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                crate::log_limited!(warn, error = %e, "UDP receive failed");
                continue;
            }
        };
        let pkt = &buf[..n];
        match ctx.handle(pkt, src, Proto::Udp, &stats, &mut out) {
            Handled::Reply => {
                if let Err(e) = sock.send_to(&out, src) {
                    crate::log_limited!(debug, client = %src, error = %e, "UDP send failed");
                }
            }
            Handled::Drop => {}
            Handled::Miss(q) => {
                let start = Instant::now();
                let pkt = pkt.to_vec();
                let ctx = ctx.clone();
                let sock = sock.clone();
                let stats = stats.clone();
                tracker.spawn_on(
                    async move {
                        let reply = ctx.resolve(&q, &pkt, src, Proto::Udp, &stats, start).await;
                        if let Err(e) = sock.send_to(&reply, src) {
                            crate::log_limited!(debug, client = %src, error = %e, "UDP send failed");
                        }
                    },
                    &rt,
                );
            }
        }
    }
}
