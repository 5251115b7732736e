//! UDP upstream exchange (RFC 5452): a fresh socket, so a fresh random source port, and a fresh
//! random ID for every query. The socket is connected, so the kernel drops datagrams from any
//! other address or port; replies with the wrong ID or question are ignored, not accepted.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
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
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    let id: u16 = rand::random();
    let mut msg = Vec::with_capacity(64 + q.question_lower().len());
    dns::write_upstream_query(q, id, udp_size, &mut msg);
    sock.send(&msg).await?;
    let mut buf = vec![0u8; RECV_BUF];
    let recv = async {
        loop {
            let n = sock.recv(&mut buf).await?;
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
