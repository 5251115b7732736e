//! A miss resolved by the UDP worker that received it, without a task: the worker sends the
//! query over its thread's socket pool or pooled TCP connection ([`Forwarder::begin`]), keeps the
//! [`Attempt`] in its own table, and hands the reply that the socket's reader delivers to it
//! (`answers`), or a timeout, to [`Forwarder::finish`].
//!
//! This is the common miss: one upstream asked, one answer. Everything that needs to wait on
//! more than one thing goes on to a task: another upstream after a failure, timeout, SERVFAIL or
//! REFUSED ([`Forwarder::resume`], within the same overall deadline), the TCP retry of a
//! truncated answer, the retry on a new connection of a query whose connection the server
//! closed. A miss that cannot start here takes the task path from the beginning
//! (`Forwarder::resolve_shared`): local answers, an identical query already in the air (it waits
//! for that one's answer), no in-flight slot left, every upstream marked down, a socket buffer
//! full, no pooled TCP connection open yet.
//!
//! Nothing differs from the task path for the client or the upstream: the same sockets, IDs,
//! matching, timeouts, failover order, counters, caching and coalescing (the attempt leads the
//! flight: identical misses arriving meanwhile wait for its answer).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::answers::Answer;
use super::flights::Leader;
use super::udp_pool::{self, Outstanding};
use super::{
    outcome, tcp, FlightOutcome, Forwarder, InflightGuard, Rest, Route, Routes, UpstreamError,
};
use crate::config::Transport;
use crate::dns::{Query, Response};
use crate::metrics::UpstreamTransport;

pub use super::answers::take_answers;

/// Ready once replies for this thread's worker are waiting to be taken; runs the thread's
/// upstream readers (`readers`), which hand them over, meanwhile.
pub fn poll_replies(cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
    super::answers::running();
    let _ = super::readers::poll_readers(cx);
    super::answers::poll_answers(cx)
}

/// Lets this thread's upstream readers take what has arrived, without waiting.
pub async fn run_readers() {
    std::future::poll_fn(|cx| {
        super::answers::running();
        let _ = super::readers::poll_readers(cx);
        std::task::Poll::Ready(())
    })
    .await
}

/// A miss's first exchange, sent and waiting for its reply. Dropped unfinished (the worker
/// stopped), it forgets its registration, lets identical misses waiting on it go and frees its
/// in-flight slot.
pub struct Attempt {
    routes: Arc<Routes>,
    zone_idx: usize,
    upstream: SocketAddr,
    /// When the query was sent (real time).
    sent: Instant,
    /// When this exchange times out: `forward.timeout` after `sent`, or the overall deadline.
    pub expires: Instant,
    /// Where the whole resolution ends: `forward.query_timeout` after `sent`.
    deadline: Instant,
    _sent: Sent,
    leader: Leader,
    slot: InflightGuard,
}

/// The registration of a query sent, on a UDP pool socket or a pooled TCP connection.
enum Sent {
    Udp { _held: Outstanding },
    Tcp { _held: tcp::Registered },
}

/// What a resumed miss asks its first upstream again, before the zone's others.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Again {
    Nothing,
    /// The answer was truncated: over a TCP connection of its own.
    OverTcp,
    /// The server closed the pooled connection before answering: on a new one.
    OnNewConnection,
}

/// What is left of a miss whose first exchange did not give the answer: the zone's other
/// upstreams (or the TCP retry of a truncated answer) on a task, by [`Forwarder::resume`].
pub struct Resume {
    routes: Arc<Routes>,
    zone_idx: usize,
    /// The upstream already asked.
    tried: SocketAddr,
    again: Again,
    rest_from: Instant,
    deadline: Instant,
    relay: Option<(Response, SocketAddr)>,
    leader: Leader,
    _slot: InflightGuard,
}

/// How a first exchange ended.
pub enum Next {
    /// The flight's outcome (stored in the cache when cacheable; identical misses have it too).
    Done(FlightOutcome),
    /// More to try, on a task.
    Resume(Resume),
}

/// Sends what the misses begun since the last call queued (the frames of a batch's cluster-zone
/// misses, one write per connection). The worker calls it once it has begun a batch's misses.
pub fn flush_sends() {
    tcp::flush_worker_writes();
}

impl Forwarder {
    /// Starts the miss of `q` (cache key `key`, routed to `route`) without a task: sends it to
    /// the zone's first upstream over this thread's socket pool (or queues it on a pooled TCP
    /// connection, written at [`flush_sends`]), its reply to be taken under
    /// `token`. None when the miss must take the task path (see the module's documentation).
    pub fn begin(&self, q: &Query, key: u64, route: Route, token: u64) -> Option<Attempt> {
        let r = self.routes.load_full();
        let limits = &r.settings.forward.udp_pool;
        if !r.settings.local.is_empty() {
            return None;
        }
        let zone_idx = r.zone_index(route, q);
        let zone = &r.settings.zones[zone_idx];
        let over_tcp = zone.transport == Transport::Tcp;
        if !over_tcp && limits.size == 0 {
            return None;
        }
        // A name with a stale answer (RFC 8767) may be answered from it: the task path.
        if !zone.stale_window.is_zero()
            && self
                .cache
                .lookup_stale(key, q, self.clock.now(), |_, _| ())
                .is_some()
        {
            return None;
        }
        let upstream = self.first_up(&r, &zone.upstreams)?;
        let leader = self.flights.lead(key, q.question_lower(), q.key_flags())?;
        let slot = self.try_acquire()?;
        let sent = Instant::now();
        let size = r.settings.server.edns_udp_size;
        let registration = if over_tcp {
            let _held = r.pools[&upstream].send_for_worker(q, size, token)?;
            Sent::Tcp { _held }
        } else {
            let _held = udp_pool::send_for_worker(upstream, q, size, sent, limits, token).ok()?;
            Sent::Udp { _held }
        };
        r.state[&upstream].metrics.request();
        let deadline = sent + r.settings.forward.query_timeout;
        let expires = (sent + r.settings.forward.upstream_timeout).min(deadline);
        Some(Attempt {
            routes: r,
            zone_idx,
            upstream,
            sent,
            expires,
            deadline,
            _sent: registration,
            leader,
            slot,
        })
    }

    /// The first upstream to ask, rotating among those up; None when all are marked down (the
    /// task path then tries each in turn).
    fn first_up(&self, r: &Routes, upstreams: &[SocketAddr]) -> Option<SocketAddr> {
        let n = upstreams.len();
        let start = self.rotate.fetch_add(1, Ordering::Relaxed) % n.max(1);
        (0..n)
            .map(|i| upstreams[(start + i) % n])
            .find(|u| !r.state[u].down.load(Ordering::Relaxed))
    }

    /// Ends the first exchange of the miss of `q` (cache key `key`) with its reply, or with
    /// `Err(UpstreamError::Timeout)` once [`Attempt::expires`] has passed.
    pub fn finish(&self, q: &Query, key: u64, a: Attempt, answer: Answer) -> Next {
        let r = &a.routes;
        let transport = r.settings.zones[a.zone_idx].transport;
        if transport == Transport::Tcp && matches!(answer, Err(UpstreamError::Closed)) {
            // As a task's exchange does: retried once on a new connection, counted as one
            // query with the retry's outcome.
            let sent = a.sent;
            return Next::Resume(a.resume_from(sent, Again::OnNewConnection, None));
        }
        let counted_as = match transport {
            Transport::Tcp => UpstreamTransport::Tcp,
            Transport::Udp | Transport::PreferUdp => UpstreamTransport::Udp,
        };
        r.state[&a.upstream]
            .metrics
            .query(counted_as, outcome(&answer));
        let now = Instant::now();
        let truncated = matches!(&answer, Ok(resp) if resp.truncated);
        if truncated && transport == Transport::PreferUdp {
            tracing::debug!(upstream = %a.upstream, "truncated over UDP, retrying over TCP");
            let sent = a.sent;
            return Next::Resume(a.resume_from(sent, Again::OverTcp, None));
        }
        let mut relay = None;
        let elapsed = now.saturating_duration_since(a.sent);
        match self.judge(r, a.zone_idx, a.upstream, answer, elapsed, &mut relay) {
            Some(resp) => {
                let entry = self.store(r, q, a.zone_idx, resp);
                let outcome = Ok((entry, Some(a.upstream)));
                self.note_refresh(key, true);
                a.leader.land(&outcome);
                drop(a.slot);
                Next::Done(outcome)
            }
            None => Next::Resume(a.resume_from(now, Again::Nothing, relay)),
        }
    }

    /// Goes on with a miss whose first exchange did not give the answer: the first upstream
    /// asked again ([`Again`]), then the zone's other upstreams in turn, within the overall
    /// deadline. Lands the flight and returns its outcome.
    pub async fn resume(&self, q: &Query, key: u64, res: Resume) -> FlightOutcome {
        let Resume {
            routes: r,
            zone_idx,
            tried,
            again,
            rest_from,
            deadline,
            mut relay,
            leader,
            _slot,
        } = res;
        let mut now = rest_from;
        let mut answer = None;
        if again != Again::Nothing {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = &r.state[&tried].metrics;
            let size = r.settings.server.edns_udp_size;
            let res = if again == Again::OverTcp {
                let res = Box::pin(tcp::exchange_once(tried, q, size, left)).await;
                m.query(UpstreamTransport::TcpFallback, outcome(&res));
                res
            } else {
                // The zone's own exchange over its pool (a new connection, the closed one gone).
                let attempt = r.settings.forward.upstream_timeout.min(left);
                let started = Instant::now();
                Box::pin(self.exchange(&r, tried, Transport::Tcp, q, started, attempt)).await
            };
            let done = Instant::now();
            let elapsed = done.saturating_duration_since(now);
            now = done;
            answer = self.judge(&r, zone_idx, tried, res, elapsed, &mut relay);
        }
        let result = match answer {
            Some(resp) => Ok((resp, tried)),
            None => {
                let mut order = self.ordered(&r, &r.settings.zones[zone_idx].upstreams);
                order.retain(|u| *u != tried);
                let rest = Rest {
                    order,
                    now,
                    deadline,
                    relay,
                };
                self.exchange_rest(&r, q, zone_idx, rest).await
            }
        };
        let outcome = result
            .map(|(resp, upstream)| (self.store(&r, q, zone_idx, resp), Some(upstream)))
            .map_err(Arc::new);
        self.note_refresh(key, outcome.is_ok());
        leader.land(&outcome);
        outcome
    }
}

impl Resume {
    /// The metrics slot of the miss's zone.
    pub fn zone_slot(&self) -> usize {
        self.routes.settings.zones[self.zone_idx].slot as usize
    }
}

impl Attempt {
    /// The metrics slot of the miss's zone.
    pub fn zone_slot(&self) -> usize {
        self.routes.settings.zones[self.zone_idx].slot as usize
    }

    fn resume_from(
        self,
        rest_from: Instant,
        again: Again,
        relay: Option<(Response, SocketAddr)>,
    ) -> Resume {
        Resume {
            routes: self.routes,
            zone_idx: self.zone_idx,
            tried: self.upstream,
            again,
            rest_from,
            deadline: self.deadline,
            relay,
            leader: self.leader,
            _slot: self.slot,
        }
    }
}
