//! UDP upstream exchange (RFC 5452): a fresh socket, so a fresh random source port, and a fresh
//! random ID for every query. The socket is connected, so the kernel drops datagrams from any
//! other address or port; replies with the wrong ID or question are ignored, not accepted.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;

use super::UpstreamError;
use crate::dns::{self, Query, Response};

/// Largest reply read; a bigger datagram is treated as malformed (it cannot be a valid answer to
/// our advertised size anyway, and the caller then tries the next upstream).
const RECV_BUF: usize = 4096;

pub async fn exchange(
    upstream: SocketAddr,
    q: &Query,
    udp_size: u16,
    timeout: Duration,
) -> Result<Response, UpstreamError> {
    // connect(2) on an unbound socket picks a random ephemeral port (the kernel randomises it),
    // so no separate bind(2) is needed: two system calls before the send instead of three.
    let raw = socket2::Socket::new(
        socket2::Domain::for_address(upstream),
        socket2::Type::DGRAM.nonblocking().cloexec(),
        Some(socket2::Protocol::UDP),
    )?;
    raw.connect(&upstream.into())?;
    let sock = UdpSocket::from_std(raw.into())?;
    let id: u16 = rand::random();
    let mut msg = Vec::with_capacity(64 + q.question_lower().len());
    dns::write_upstream_query(q, id, udp_size, &mut msg);
    sock.send(&msg).await?;
    let mut buf = Vec::with_capacity(RECV_BUF);
    let recv = async {
        loop {
            buf.clear();
            let n = sock.recv_buf(&mut buf).await?;
            if n < dns::HEADER_LEN || dns::u16_at(&buf, 0) != id {
                continue;
            }
            if n == RECV_BUF {
                return Err(UpstreamError::Bad(dns::BadResponse::Malformed));
            }
            match dns::parse_response(&buf[..n], q.question_lower()) {
                // A reply for another question with our ID is a spoofing attempt: keep waiting.
                Err(dns::BadResponse::QuestionMismatch) => continue,
                r => return r.map_err(UpstreamError::from),
            }
        }
    };
    tokio::time::timeout(timeout, recv)
        .await
        .map_err(|_| UpstreamError::Timeout)?
}
