//! The table of live DNS-over-TCP client connections, and what the server does when it fills up
//! (RFC 7766 §6.2.3 and §6.2.4: under pressure, close idle connections and shorten idle timeouts).
//!
//! Each connection registers an [`Entry`] for as long as it lives. The entry records when the
//! connection last completed a message (a query read in full, or a reply written in full: stray
//! bytes of an unfinished message do not count, so a client trickling one byte at a time is idle)
//! and whether it owes replies (a query read whose reply is not yet written). The reader and the
//! writer of a connection each own one word of the entry and update it with one relaxed store per
//! message; nothing else is shared per query.
//!
//! **Admission.** Below `server.tcp_max_connections` a new connection is admitted at once. At the
//! cap, the connection idle the longest (owing no reply) is told to close and the new one takes
//! its place as soon as it is gone. When every connection owes a reply, none is closed: the new
//! connection waits for a place, as it waits in the listen backlog.
//!
//! **Idle timeout.** A connection is closed once it has been idle (owing no reply) for
//! [`Table::idle_timeout`], which shrinks as the table fills (`n` live connections, cap `c`,
//! configured timeout `t`, floor `f = min(1 s, t)`):
//!
//! ```text
//! n <= c/2:  t
//! n >  c/2:  t - (t - f) * (2n - c) / c      (linear: t at half full, f at the cap)
//! ```
//!
//! With the defaults (10 s, 1024): 10 s up to 512 connections, 5.5 s at 768, 1 s at 1024. The
//! timer runs from the last complete message, so a message that arrives in pieces has no more
//! time than a whole one. A waiting connection looks at the curve again at least every `f`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::resilience::TCP_PRESSURE_CLOSES;

/// The shortest idle timeout the table shrinks to (or the configured one, if shorter).
pub const IDLE_FLOOR: Duration = Duration::from_secs(1);
/// How often a new connection waiting at the cap looks again for an idle connection to close:
/// a connection that answers its last query does not tell the table.
const ADMIT_RECHECK: Duration = Duration::from_millis(50);
/// The low bits of an activity word count messages; the high bits hold milliseconds.
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

/// Connections closed to admit another, since the process started (all listeners).
/// Connections closed to make room for a new one at `server.tcp_max_connections`, across all
/// listeners since the process started (`nodedns_tcp_pressure_closes_total`).
pub fn pressure_closes() -> u64 {
    TCP_PRESSURE_CLOSES.load(Ordering::Relaxed)
}

/// The connections of one TCP listener.
pub struct Table {
    cap: usize,
    idle: Duration,
    floor: Duration,
    epoch: Instant,
    live: AtomicUsize,
    conns: Mutex<Conns>,
    /// Woken when a connection leaves the table.
    freed: Notify,
}

#[derive(Default)]
struct Conns {
    next: u64,
    map: HashMap<u64, Arc<Conn>>,
}

/// What the table knows of one connection.
pub struct Conn {
    epoch: Instant,
    /// `ms << COUNT_BITS | n`: when the reader last completed a message, and how many messages
    /// it has read that need a reply. Stored only by the reader.
    read: AtomicU64,
    /// The same for replies written. Stored only by the writer.
    written: AtomicU64,
    close: CancellationToken,
}

/// The activity word for `n` messages, the last one at `at`.
fn word(epoch: Instant, at: Instant, n: u64) -> u64 {
    let ms = at.saturating_duration_since(epoch).as_millis() as u64;
    ms << COUNT_BITS | (n & COUNT_MASK)
}

impl Conn {
    fn new(epoch: Instant, now: Instant) -> Conn {
        let w = word(epoch, now, 0);
        Conn {
            epoch,
            read: AtomicU64::new(w),
            written: AtomicU64::new(w),
            close: CancellationToken::new(),
        }
    }

    /// The reader completed a message at `at`; `queries` messages needing a reply so far.
    #[inline]
    pub fn note_read(&self, at: Instant, queries: u64) {
        self.read
            .store(word(self.epoch, at, queries), Ordering::Relaxed);
    }

    /// The writer wrote reply number `replies` in full at `at`.
    #[inline]
    pub fn note_written(&self, at: Instant, replies: u64) {
        self.written
            .store(word(self.epoch, at, replies), Ordering::Relaxed);
    }

    /// When the connection last completed a message, and whether it owes a reply.
    pub fn activity(&self) -> (Instant, bool) {
        let (r, w) = (
            self.read.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
        );
        let ms = (r >> COUNT_BITS).max(w >> COUNT_BITS);
        let busy = (r & COUNT_MASK) != (w & COUNT_MASK);
        (self.epoch + Duration::from_millis(ms), busy)
    }

    /// Resolves once the table has asked this connection to close.
    pub async fn closed(&self) {
        self.close.cancelled().await
    }
}

/// A connection's place in the table; leaving it (drop) frees the place.
pub struct Entry {
    table: Arc<Table>,
    id: u64,
    pub conn: Arc<Conn>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut conns = self.table.conns.lock();
        conns.map.remove(&self.id);
        self.table.live.store(conns.map.len(), Ordering::Relaxed);
        drop(conns);
        self.table.freed.notify_one();
    }
}

impl Entry {
    /// The table this connection is in.
    pub fn table(&self) -> &Table {
        &self.table
    }
}

impl Table {
    pub fn new(cap: usize, idle: Duration) -> Arc<Table> {
        Arc::new(Table {
            cap: cap.max(1),
            idle,
            floor: IDLE_FLOOR.min(idle),
            epoch: Instant::now(),
            live: AtomicUsize::new(0),
            conns: Mutex::new(Conns::default()),
            freed: Notify::new(),
        })
    }

    /// Connections in the table.
    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The idle timeout in force now (see the module doc for the curve).
    pub fn idle_timeout(&self) -> Duration {
        timeout_for(self.len(), self.cap, self.idle, self.floor)
    }

    /// How long a waiting connection may go before it looks at the curve again.
    pub fn recheck(&self) -> Duration {
        self.floor
    }

    /// Admits a new connection, closing the longest-idle one when the table is full; waits while
    /// every connection owes a reply.
    pub async fn admit(self: &Arc<Self>) -> Entry {
        loop {
            if let Some(e) = self.insert(false) {
                return e;
            }
            self.close_idlest();
            // An idle connection leaves at once, which wakes us; a busy table is looked at again.
            let _ = tokio::time::timeout(ADMIT_RECHECK, self.freed.notified()).await;
        }
    }

    /// Adds a connection whatever the count (one handed over by another instance: it is already
    /// open, and refusing it would cut the client off).
    pub fn join(self: &Arc<Self>) -> Entry {
        self.insert(true).expect("forced insert")
    }

    fn insert(self: &Arc<Self>, force: bool) -> Option<Entry> {
        let mut conns = self.conns.lock();
        if !force && conns.map.len() >= self.cap {
            return None;
        }
        let id = conns.next;
        conns.next += 1;
        let conn = Arc::new(Conn::new(self.epoch, Instant::now()));
        conns.map.insert(id, conn.clone());
        self.live.store(conns.map.len(), Ordering::Relaxed);
        Some(Entry {
            table: self.clone(),
            id,
            conn,
        })
    }

    /// Asks the connection idle the longest to close, unless one already is closing or every one
    /// owes a reply. True when one was asked now.
    fn close_idlest(&self) -> bool {
        let conns = self.conns.lock();
        let victim = {
            let mut candidates = Vec::with_capacity(conns.map.len());
            for c in conns.map.values() {
                let (last, busy) = c.activity();
                if c.close.is_cancelled() {
                    if !busy {
                        // Already leaving: its place is coming.
                        return false;
                    }
                    // It read a query as it was asked to close, and answers it first: find
                    // another rather than wait for the answer.
                    continue;
                }
                candidates.push((last, busy, c));
            }
            idlest(candidates.iter().map(|&(last, busy, _)| (last, busy)))
                .map(|i| candidates[i].2.clone())
        };
        drop(conns);
        match victim {
            Some(c) => {
                c.close.cancel();
                TCP_PRESSURE_CLOSES.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }
}

/// The idle timeout for `live` connections out of `cap` (see the module doc).
fn timeout_for(live: usize, cap: usize, idle: Duration, floor: Duration) -> Duration {
    let floor = floor.min(idle);
    if 2 * live <= cap {
        return idle;
    }
    let over = (2 * live - cap).min(cap) as u128;
    let span = (idle - floor).as_nanos();
    let cut = span * over / cap as u128;
    idle - Duration::from_nanos(cut as u64)
}

/// Of connections given as (last activity, owes a reply), the index of the one to close for a
/// newcomer: the earliest last activity among those owing nothing.
fn idlest(conns: impl Iterator<Item = (Instant, bool)>) -> Option<usize> {
    conns
        .enumerate()
        .filter(|(_, (_, busy))| !busy)
        .min_by_key(|(_, (last, _))| *last)
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_timeout_is_full_up_to_half_then_falls_linearly_to_the_floor_at_the_cap() {
        let (idle, floor) = (10 * S, S);
        for live in [0, 1, 256, 512] {
            assert_eq!(timeout_for(live, 1024, idle, floor), idle, "{live}");
        }
        assert_eq!(
            timeout_for(768, 1024, idle, floor),
            Duration::from_millis(5500)
        );
        assert_eq!(timeout_for(1024, 1024, idle, floor), floor);
        // Over the cap (connections handed over by another instance): still the floor.
        assert_eq!(timeout_for(1500, 1024, idle, floor), floor);
        // Never rises as the table fills.
        let mut prev = idle;
        for live in 0..=1100 {
            let t = timeout_for(live, 1024, idle, floor);
            assert!(t <= prev && t >= floor, "{live}: {t:?}");
            prev = t;
        }
        // Small tables and odd caps.
        assert_eq!(timeout_for(0, 1, idle, floor), idle);
        assert_eq!(timeout_for(1, 1, idle, floor), floor);
        assert_eq!(timeout_for(2, 3, idle, floor), Duration::from_secs(7));
        assert_eq!(timeout_for(32, 64, idle, floor), idle);
        assert_eq!(timeout_for(64, 64, idle, floor), floor);
    }

    #[test]
    fn a_configured_timeout_below_the_floor_is_kept_as_it_is() {
        let idle = Duration::from_millis(300);
        assert_eq!(timeout_for(0, 10, idle, S), idle);
        assert_eq!(timeout_for(10, 10, idle, S), idle);
        let t = Table::new(10, idle);
        assert_eq!(t.idle_timeout(), idle);
        assert_eq!(t.recheck(), idle);
    }

    #[test]
    fn the_victim_is_the_longest_idle_connection_that_owes_no_reply() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(idlest([].into_iter()), None);
        assert_eq!(
            idlest([(at(30), false), (at(10), false), (at(20), false)].into_iter()),
            Some(1)
        );
        // The oldest owes a reply: the next oldest goes.
        assert_eq!(
            idlest([(at(30), false), (at(10), true), (at(20), false)].into_iter()),
            Some(2)
        );
        assert_eq!(idlest([(at(10), true), (at(20), true)].into_iter()), None);
    }

    #[test]
    fn activity_counts_complete_messages_and_replies_owed() {
        let t = Table::new(4, 10 * S);
        let e = t.join();
        let (start, busy) = e.conn.activity();
        assert!(!busy);
        let later = start + Duration::from_millis(1500);
        e.conn.note_read(later, 1);
        let (last, busy) = e.conn.activity();
        assert!(busy);
        assert_eq!(last - start, Duration::from_millis(1500));
        e.conn.note_written(later + Duration::from_millis(200), 1);
        let (last, busy) = e.conn.activity();
        assert!(!busy);
        assert_eq!(last - start, Duration::from_millis(1700));
        // Counts wrap together.
        e.conn.note_read(later, COUNT_MASK + 2);
        e.conn.note_written(later, 1);
        assert!(!e.conn.activity().1);
    }

    #[tokio::test]
    async fn at_the_cap_the_idlest_connection_is_closed_for_a_newcomer_and_busy_ones_are_kept() {
        let t = Table::new(3, 10 * S);
        let a = t.admit().await;
        let b = t.admit().await;
        let c = t.admit().await;
        assert_eq!(t.len(), 3);
        assert_eq!(t.idle_timeout(), S);
        // `a` is the oldest but owes a reply; `b` has been quiet longest among the rest.
        let now = Instant::now();
        a.conn.note_read(now, 1);
        b.conn.note_read(now + Duration::from_millis(50), 0);
        c.conn.note_read(now + Duration::from_millis(100), 0);
        let before = pressure_closes();
        let t2 = t.clone();
        let newcomer = tokio::spawn(async move { t2.admit().await });
        b.conn.closed().await;
        assert!(!a.conn.close.is_cancelled() && !c.conn.close.is_cancelled());
        assert!(pressure_closes() > before);
        // The newcomer gets in once `b` has left.
        tokio::task::yield_now().await;
        assert!(!newcomer.is_finished());
        drop(b);
        let d = newcomer.await.unwrap();
        assert_eq!(t.len(), 3);
        // Everyone busy: nobody is closed, the next newcomer waits until a place frees.
        c.conn.note_read(Instant::now(), 1);
        d.conn.note_read(Instant::now(), 1);
        let t2 = t.clone();
        let waiting = tokio::spawn(async move { t2.admit().await });
        tokio::time::sleep(4 * ADMIT_RECHECK).await;
        assert!(!waiting.is_finished());
        for e in [&a, &c, &d] {
            assert!(!e.conn.close.is_cancelled());
        }
        // `c` answers its query: now it is idle, and goes.
        c.conn.note_written(Instant::now(), 1);
        c.conn.closed().await;
        drop(c);
        let _e = waiting.await.unwrap();
        assert_eq!(t.len(), 3);
    }
}
