//! RFC 8767's failure recheck timer: names whose refresh failed recently, with the time until
//! which their stale answers are served without asking upstream again.
//!
//! Bounded, and cheap while upstreams fail: at most [`MAX`] names are remembered; once full, the
//! expired ones are swept at most once per recheck period (a sweep per failure would scan the
//! whole table for every failed query of an outage), and a failure that finds the table full of
//! recent ones is not remembered (its next miss simply asks upstream again). A success takes the
//! lock only when something is remembered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Names remembered at most.
pub const MAX: usize = 4096;

#[derive(Default)]
pub struct Recheck {
    inner: Mutex<Inner>,
    /// How many names are remembered, read without the lock.
    len: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    until: HashMap<u64, Instant>,
    /// When the expired names were last swept out.
    swept: Option<Instant>,
}

impl Recheck {
    /// Remembers that the refresh of `key` failed at `now`, for `period`.
    pub fn failed(&self, key: u64, now: Instant, period: Duration) {
        let mut m = self.inner.lock();
        if m.until.len() >= MAX && !m.until.contains_key(&key) {
            if m.swept.is_none_or(|t| now >= t + period) {
                m.until.retain(|_, until| *until > now);
                m.swept = Some(now);
            }
            if m.until.len() >= MAX {
                return;
            }
        }
        m.until.insert(key, now + period);
        self.len.store(m.until.len(), Ordering::Relaxed);
    }

    /// Forgets `key`: its refresh succeeded.
    pub fn succeeded(&self, key: u64) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut m = self.inner.lock();
        if m.until.remove(&key).is_some() {
            self.len.store(m.until.len(), Ordering::Relaxed);
        }
    }

    /// True while a failure of `key` is remembered and its period not over at `now`.
    pub fn recent(&self, key: u64, now: Instant) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.inner
            .lock()
            .until
            .get(&key)
            .is_some_and(|until| *until > now)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERIOD: Duration = Duration::from_secs(30);

    #[test]
    fn a_failure_is_recent_for_its_period_and_forgotten_on_success() {
        let r = Recheck::default();
        let t0 = Instant::now();
        assert!(!r.recent(1, t0));
        r.failed(1, t0, PERIOD);
        assert!(r.recent(1, t0 + PERIOD - Duration::from_millis(1)));
        assert!(!r.recent(1, t0 + PERIOD));
        r.succeeded(1);
        assert!(!r.recent(1, t0));
        assert_eq!(r.len(), 0);
    }

    #[test]
    fn a_full_table_sweeps_once_per_period_and_drops_what_does_not_fit() {
        let r = Recheck::default();
        let t0 = Instant::now();
        for k in 0..MAX as u64 {
            r.failed(k, t0, PERIOD);
        }
        // Full of recent failures: a new one is not remembered, an old one is renewed.
        let t1 = t0 + Duration::from_secs(1);
        r.failed(u64::MAX, t1, PERIOD);
        assert!(!r.recent(u64::MAX, t1));
        let renewed = t1 + Duration::from_secs(1);
        r.failed(7, renewed, PERIOD);
        assert!(r.recent(7, t0 + PERIOD));
        assert_eq!(r.len(), MAX);
        // The first sweep was at t1 (nothing had expired); the next one comes a period later,
        // when all but the renewed name have expired.
        let t2 = t1 + PERIOD - Duration::from_millis(1);
        r.failed(u64::MAX - 1, t2, PERIOD);
        assert!(
            !r.recent(u64::MAX - 1, t2),
            "no sweep within a period of the last"
        );
        let t3 = t1 + PERIOD;
        r.failed(u64::MAX - 2, t3, PERIOD);
        assert!(r.recent(u64::MAX - 2, t3));
        assert!(r.recent(7, t3));
        assert_eq!(r.len(), 2, "the renewed name and the new one");
    }
}
