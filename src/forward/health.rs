//! Health checks of upstreams marked down (CoreDNS `forward` semantics): each is asked `. IN NS`
//! every `forward.health_check` over its zone's transport until it answers; any well-formed reply,
//! REFUSED included, proves it reachable and puts it back in rotation. Only probe failures count
//! in `coredns_forward_healthcheck_failures_total`, so one lost exchange fires no alert.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use futures::stream::{FuturesUnordered, StreamExt};
use tracing::info;

use super::Forwarder;
use crate::dns;

/// `. IN NS` with RD, as CoreDNS's health check asks.
const PROBE: [u8; 17] = [0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 1];

impl Forwarder {
    /// One probe of `upstream` over its transport; true when it answered anything well-formed.
    pub(super) async fn probe_one(&self, upstream: SocketAddr) -> bool {
        let Ok(q) = dns::parse_query(&PROBE) else {
            return false;
        };
        let r = self.routes();
        let Some(st) = r.state.get(&upstream) else {
            return false;
        };
        let timeout = r.settings.forward.upstream_timeout;
        self.exchange(
            &r,
            upstream,
            st.transport,
            &q,
            std::time::Instant::now(),
            timeout,
        )
        .await
        .is_ok()
    }

    /// Probes every upstream marked down until it answers, for as long as the future runs (the
    /// app runs it beside the server). Call once.
    pub async fn run_health_checks(&self) {
        let Some(mut down) = self.down_rx.lock().take() else {
            return;
        };
        let mut probing = FuturesUnordered::new();
        loop {
            tokio::select! {
                Some(u) = down.recv() => probing.push(self.check_until_up(u)),
                Some(()) = probing.next(), if !probing.is_empty() => {}
                else => return,
            }
        }
    }

    async fn check_until_up(&self, upstream: SocketAddr) {
        let mut every = self.routes().settings.forward.health_check;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // The routes in force decide: an upstream a reload removed is no longer probed.
            let r = self.routes();
            let Some(st) = r.state.get(&upstream).cloned() else {
                return;
            };
            if r.settings.forward.health_check != every {
                every = r.settings.forward.health_check;
                tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            // A real exchange may have found it up meanwhile.
            if !st.down.load(Ordering::Relaxed) {
                return;
            }
            if self.probe_one(upstream).await {
                st.fails.store(0, Ordering::Relaxed);
                st.down.store(false, Ordering::Relaxed);
                info!(upstream = %upstream, "upstream answers again; back in rotation");
                return;
            }
            self.metrics.forward_failure(upstream);
        }
    }
}
