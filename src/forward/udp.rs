//! UDP upstream exchange (RFC 5452): a random source port and a random ID for every query. By
//! default the socket comes from a rotating pool (`udp_pool`); with `forward.udp_pool_size = 0`
//! every query gets a fresh socket, so a fresh random port (`fresh`). Either way the socket is
//! connected, so the kernel drops datagrams from any other address or port; replies with the
//! wrong ID or question are ignored, not accepted.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::future::Either;

use super::fresh::exchange_fresh;
use super::udp_pool::{self, PoolLimits};
use super::UpstreamError;
use crate::dns::{Query, Response};

/// One exchange with `upstream`, started at `now`: over this thread's socket pool, or over a
/// fresh socket when the pool size is 0. (A plain function choosing a future, not an `async fn`
/// awaiting one: no extra copy of the arguments in every miss's task.)
pub fn exchange<'a>(
    upstream: SocketAddr,
    q: &'a Query,
    udp_size: u16,
    now: Instant,
    timeout: Duration,
    pool: &'a PoolLimits,
) -> impl Future<Output = Result<Response, UpstreamError>> + 'a {
    if pool.size == 0 {
        Either::Left(exchange_fresh(upstream, q, udp_size, timeout))
    } else {
        Either::Right(udp_pool::exchange(
            upstream, q, udp_size, now, timeout, pool,
        ))
    }
}
