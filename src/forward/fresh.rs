//! A UDP upstream exchange over a socket of its own, opened for one query and closed after it:
//! every query a fresh random source port (the kernel's) as well as a random ID. The mode of
//! `forward.udp_pool_size = 0`, and where a pooled socket cannot take a query (its send buffer
//! full). The socket is connected, so the kernel drops datagrams from any other address or port;
//! replies with the wrong ID or question are ignored, not accepted.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::UpstreamError;
use crate::dns::{self, Query, Response};

/// Largest reply read; a bigger datagram is treated as malformed (it cannot be a valid answer to
/// our advertised size anyway, and the caller then tries the next upstream).
const RECV_BUF: usize = 4096;

/// A non-blocking UDP socket connected to `upstream`, on a port the kernel picks at random:
/// connect(2) on an unbound socket picks a random ephemeral port, so no separate bind(2) is
/// needed (two system calls before the send instead of three).
pub fn connected(upstream: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let raw = socket2::Socket::new(
        socket2::Domain::for_address(upstream),
        socket2::Type::DGRAM.nonblocking().cloexec(),
        Some(socket2::Protocol::UDP),
    )?;
    raw.connect(&upstream.into())?;
    Ok(raw.into())
}

/// One exchange over a socket opened for it and closed after it.
pub async fn exchange_fresh(
    upstream: SocketAddr,
    q: &Query,
    udp_size: u16,
    timeout: Duration,
) -> Result<Response, UpstreamError> {
    let sock = UdpSocket::from_std(connected(upstream)?)?;
    let id: u16 = rand::random();
    let mut msg = Vec::with_capacity(64 + q.question_lower().len());
    dns::write_upstream_query(q, id, udp_size, &mut msg);
    sock.send(&msg).await?;
    let recv = async {
        loop {
            sock.readable().await?;
            // Read into this thread's buffer, never held across an await: no 4 KiB allocation
            // per query (an allocation that size misses malloc's per-thread cache).
            let r = RECV.with_borrow_mut(|buf| match sock.try_recv(&mut buf[..]) {
                Ok(n) if n < dns::HEADER_LEN || dns::u16_at(&buf[..], 0) != id => None,
                Ok(n) if n == RECV_BUF => {
                    Some(Err(UpstreamError::Bad(dns::BadResponse::Malformed)))
                }
                Ok(n) => match dns::parse_response(&buf[..n], q.question_lower()) {
                    // A reply for another question with our ID is a spoofing attempt: keep waiting.
                    Err(dns::BadResponse::QuestionMismatch) => None,
                    r => Some(r.map_err(UpstreamError::from)),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
                Err(e) => Some(Err(e.into())),
            });
            if let Some(r) = r {
                return r;
            }
        }
    };
    tokio::time::timeout(timeout, recv)
        .await
        .map_err(|_| UpstreamError::Timeout)?
}

thread_local! {
    static RECV: std::cell::RefCell<Box<[u8; RECV_BUF]>> = std::cell::RefCell::new(Box::new([0; RECV_BUF]));
}
