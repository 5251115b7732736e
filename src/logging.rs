//! Logging setup (`tracing`, `RUST_LOG`, text or JSON), a per-callsite rate limit for errors
//! that can repeat per packet, so a flood of bad input cannot flood the log, and the sampled query
//! log (`log.query_log`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

use crate::dns::{self, Query};
use crate::metrics::rcode_name;

/// Lines a callsite may log per window.
pub const BURST: u64 = 5;
/// Window length in seconds.
pub const WINDOW_SECS: u64 = 10;

fn now_secs() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// At most `BURST` lines per `WINDOW_SECS` for one callsite; the next line after a quiet spell
/// reports how many were suppressed.
pub struct RateLimit {
    window: AtomicU64,
    count: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        RateLimit {
            window: AtomicU64::new(0),
            count: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Some(lines suppressed since the last one logged) when this line may be logged.
    pub fn allow(&self) -> Option<u64> {
        let now = now_secs();
        let w = self.window.load(Ordering::Relaxed);
        if now >= w + WINDOW_SECS
            && self
                .window
                .compare_exchange(w, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.count.store(0, Ordering::Relaxed);
        }
        if self.count.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Logs through `tracing` at the given level, at most `BURST` lines per `WINDOW_SECS` from this
/// callsite; each logged line carries `suppressed`, the lines dropped before it.
#[macro_export]
macro_rules! log_limited {
    ($lvl:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            tracing::$lvl!(suppressed, $($arg)+);
        }
    }};
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// The query log: a sample (`log.query_log`, a fraction) of answered queries, one `info` line each
/// under the target `nodedns::query`.
#[derive(Debug)]
pub struct QueryLog {
    /// The fraction's bits (an f64): a reload may change it while workers read it.
    rate: std::sync::atomic::AtomicU64,
}

impl QueryLog {
    /// Samples the fraction `rate` (0 to 1) of queries.
    pub fn new(rate: f64) -> Self {
        QueryLog {
            rate: std::sync::atomic::AtomicU64::new(rate.to_bits()),
        }
    }

    /// Changes the fraction sampled from now on.
    pub fn set_rate(&self, rate: f64) {
        self.rate
            .store(rate.to_bits(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether to log this query: the sampling decision, a float compare when the log is off.
    /// Callers ask first, so an unsampled query costs no clock read, formatting or allocation.
    #[inline]
    pub fn sampled(&self) -> bool {
        let rate = f64::from_bits(self.rate.load(std::sync::atomic::Ordering::Relaxed));
        rate > 0.0 && (rate >= 1.0 || rand::random::<f64>() < rate)
    }

    /// Logs one answered query (one that [`sampled`](Self::sampled) picked): name, type, rcode,
    /// duration, whether the cache answered and which upstream did (`-` when none did).
    #[cold]
    #[inline(never)]
    pub fn log(
        &self,
        q: &Query,
        src: SocketAddr,
        reply: &[u8],
        cached: bool,
        upstream: Option<SocketAddr>,
        elapsed: Duration,
    ) {
        tracing::info!(
            target: "nodedns::query",
            client = %src,
            name = %q.qname_string(),
            qtype = %hickory_proto::rr::RecordType::from(q.qtype),
            rcode = rcode_name(reply.get(3).map_or(dns::RCODE_SERVFAIL, |b| b & 0xF)),
            duration_us = elapsed.as_micros() as u64,
            cached,
            upstream = %Upstream(upstream),
            "query"
        );
    }
}

/// Who answered a query, for the query log: an upstream address, or "-" for a cache hit or a
/// locally made reply. Formats without allocating.
struct Upstream(Option<SocketAddr>);

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_a_burst_per_window() {
        let l = RateLimit::new();
        let allowed = (0..1000).filter(|_| l.allow().is_some()).count();
        // BURST, or twice that if the test straddled a window boundary.
        assert!(
            (BURST as usize..=2 * BURST as usize).contains(&allowed),
            "{allowed}"
        );
        assert!(l.suppressed.load(Ordering::Relaxed) >= 1000 - 2 * BURST);
    }
}
