//! The time the cache and its policies see: when an answer was stored, how old it is, whether its
//! stale window or prefetch window is open, until when a failed refresh is not retried.
//!
//! The serving code takes its clock from outside (`server::Context::new`). In production it is
//! the real monotonic clock ([`Clock::real`]); a test gives a [`Clock::manual`] that stands still
//! until the test moves it with [`Clock::advance`], so a TTL runs down or a window opens without
//! sleeping and to the millisecond.
//!
//! What stays on real time under either clock: upstream timeouts and deadlines
//! (`forward.timeout`, `forward.query_timeout`, `forward.client_timeout`, tokio timers), health
//! checks, TCP idle timeouts and the reported durations of answers; timers are not TTLs.
//!
//! Cost: a read of the real clock is `Instant::now()` behind one well-predicted branch (the
//! manual clock is a null pointer for it). No lock, no allocation, no atomic read-modify-write.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A source of monotonic time: the real one, or a manual one a test advances. Cheap to clone
/// (one `Arc` for a manual clock, nothing for the real one).
#[derive(Clone, Default)]
pub struct Clock {
    /// None: the real clock.
    manual: Option<Arc<Manual>>,
}

/// A clock that moves only when advanced.
struct Manual {
    /// Its reading when made.
    base: Instant,
    /// Nanoseconds advanced since.
    advanced_ns: AtomicU64,
}

impl Clock {
    /// The real monotonic clock (`Instant::now()`).
    pub fn real() -> Clock {
        Clock { manual: None }
    }

    /// A clock that reads the current instant now and stands still until [`advance`]d.
    ///
    /// [`advance`]: Clock::advance
    pub fn manual() -> Clock {
        Clock {
            manual: Some(Arc::new(Manual {
                base: Instant::now(),
                advanced_ns: AtomicU64::new(0),
            })),
        }
    }

    /// True for a manual clock.
    pub fn is_manual(&self) -> bool {
        self.manual.is_some()
    }

    /// The current time.
    #[inline]
    pub fn now(&self) -> Instant {
        match &self.manual {
            None => Instant::now(),
            Some(m) => m.now(),
        }
    }

    /// This clock's reading at the real instant `real` (just read with `Instant::now()`): `real`
    /// itself for the real clock, the set time for a manual one. For code that needs both the
    /// real time (durations, timeouts) and this clock's, with one read of the real clock.
    #[inline]
    pub fn at(&self, real: Instant) -> Instant {
        match &self.manual {
            None => real,
            Some(m) => m.now(),
        }
    }

    /// Time passed since `since` (a reading of this clock); zero if `since` is ahead.
    #[inline]
    pub fn elapsed(&self, since: Instant) -> Duration {
        self.now().saturating_duration_since(since)
    }

    /// Moves a manual clock forward by `d`: every reading after this call (on any thread) is
    /// `d` later.
    ///
    /// # Panics
    /// On the real clock, which nothing may move.
    pub fn advance(&self, d: Duration) {
        let m = self
            .manual
            .as_ref()
            .expect("only a manual clock can be advanced");
        let ns = u64::try_from(d.as_nanos()).expect("advance by less than 584 years");
        // Release: whoever reads the clock after seeing something this thread did afterwards
        // (a query sent) sees the new time.
        m.advanced_ns.fetch_add(ns, Ordering::Release);
    }
}

impl Manual {
    #[inline]
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.advanced_ns.load(Ordering::Acquire))
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::real"),
            Some(m) => write!(
                f,
                "Clock::manual(+{:?})",
                Duration::from_nanos(m.advanced_ns.load(Ordering::Relaxed))
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_by_exactly_that() {
        let c = Clock::manual();
        let t0 = c.now();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(c.now(), t0, "stands still while real time passes");
        assert_eq!(c.at(Instant::now()), t0);
        c.advance(Duration::from_millis(2500));
        assert_eq!(c.now() - t0, Duration::from_millis(2500));
        assert_eq!(c.elapsed(t0), Duration::from_millis(2500));
        // Clones share the time: the server's copy sees what the test's copy advanced.
        let server = c.clone();
        c.advance(Duration::from_secs(1));
        assert_eq!(server.now() - t0, Duration::from_millis(3500));
        assert!(server.is_manual());
    }

    #[test]
    fn the_real_clock_is_the_monotonic_clock() {
        let c = Clock::real();
        assert!(!c.is_manual());
        let before = Instant::now();
        let t = c.now();
        assert!(t >= before && t <= Instant::now());
        let real = Instant::now();
        assert_eq!(c.at(real), real);
        assert_eq!(
            c.elapsed(Instant::now() + Duration::from_secs(9)),
            Duration::ZERO
        );
    }

    #[test]
    #[should_panic(expected = "only a manual clock")]
    fn the_real_clock_cannot_be_advanced() {
        Clock::real().advance(Duration::from_secs(1));
    }
}
