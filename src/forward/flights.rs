//! Coalescing: identical misses in flight (same cache key and question) share one upstream
//! exchange. The first one leads and resolves; the others wait for its result, whichever worker
//! thread or runtime they run on (each waiter holds a oneshot channel the leader answers).
//!
//! A flight nobody joins, the common case, costs one map entry and its question: no channel is
//! made until a second caller asks for the same name.

use std::hash::BuildHasherDefault;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::collections::HashMap;
use tokio::sync::oneshot;

use super::AllFailed;
use crate::cache::Entry;

/// What a flight ends with: the answer and the upstream that gave it (None: made locally), or
/// the failure.
pub type Outcome = Result<(Entry, Option<SocketAddr>), Arc<AllFailed>>;

/// A flight in the air: the question it was asked for (lowercased question and key flags,
/// compared so that a hash collision never shares an answer) and the callers waiting for it.
struct Flight {
    question: Box<[u8]>,
    flags: u8,
    waiters: Vec<oneshot::Sender<Outcome>>,
}

/// Hashes a cache key as itself: keys are already well-mixed 64-bit hashes.
#[derive(Default)]
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// One shard: the flights whose keys fall into it.
type FlightMap = HashMap<u64, Flight, BuildHasherDefault<KeyHasher>>;
type Shard = Mutex<FlightMap>;

/// Flights in progress, in shards so misses of different names rarely share a lock.
pub struct Flights {
    shards: Box<[Shard]>,
}

/// A flight this caller leads: publish its outcome with [`Leader::land`]. Dropped without
/// landing (the leading task cancelled, a worker's miss dropped), it lets the waiters go, and
/// they resolve on their own. It owns a handle on the flights, so a miss that is not a task (a
/// worker's table entry) can hold it.
pub struct Leader {
    flights: Arc<Flights>,
    key: u64,
    /// False for a leader of an uncoalesced flight (another question under the same key).
    owns: bool,
}

/// Either lead the flight for a key, or wait for the one already in the air.
pub enum Join {
    Lead(Leader),
    Wait(oneshot::Receiver<Outcome>),
}

const SHARDS: usize = 64;

impl Default for Flights {
    fn default() -> Self {
        Flights {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::default()))
                .collect(),
        }
    }
}

impl Flights {
    fn shard(&self, key: u64) -> &Shard {
        &self.shards[(key >> 40) as usize % SHARDS]
    }

    /// Joins the flight for `key` asked as `question` (lowercased) with key flags `flags`. With
    /// a flight for `key` but another question in the air, this caller leads its own,
    /// uncoalesced.
    pub fn join(self: &Arc<Self>, key: u64, question: &[u8], flags: u8) -> Join {
        let mut map = self.shard(key).lock();
        if let Some(f) = map.get_mut(&key) {
            if *f.question == *question && f.flags == flags {
                let (tx, rx) = oneshot::channel();
                f.waiters.push(tx);
                return Join::Wait(rx);
            }
            return Join::Lead(Leader {
                flights: self.clone(),
                key,
                owns: false,
            });
        }
        Join::Lead(self.take_off(map, key, question, flags))
    }

    /// Leads the flight for `key` unless the same question is already in the air (then None,
    /// and nothing is joined: the caller resolves it the way that can wait).
    pub fn lead(self: &Arc<Self>, key: u64, question: &[u8], flags: u8) -> Option<Leader> {
        let map = self.shard(key).lock();
        if let Some(f) = map.get(&key) {
            if *f.question == *question && f.flags == flags {
                return None;
            }
            return Some(Leader {
                flights: self.clone(),
                key,
                owns: false,
            });
        }
        Some(self.take_off(map, key, question, flags))
    }

    /// Puts a new flight for `key` in the air (its shard `map` locked) and leads it.
    fn take_off(
        self: &Arc<Self>,
        mut map: parking_lot::MutexGuard<'_, FlightMap>,
        key: u64,
        question: &[u8],
        flags: u8,
    ) -> Leader {
        map.insert(
            key,
            Flight {
                question: question.into(),
                flags,
                waiters: Vec::new(),
            },
        );
        Leader {
            flights: self.clone(),
            key,
            owns: true,
        }
    }

    /// True when a flight for `key` is in the air.
    pub fn in_air(&self, key: u64) -> bool {
        self.shard(key).lock().contains_key(&key)
    }

    /// Flights in the air.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leader {
    /// Ends the flight: every waiter gets `outcome`.
    pub fn land(mut self, outcome: &Outcome) {
        for tx in self.take_waiters() {
            // A waiter that gave up is fine.
            let _ = tx.send(outcome.clone());
        }
    }

    /// Takes the flight out of the map; its waiters, to be answered or (dropped) let go.
    fn take_waiters(&mut self) -> Vec<oneshot::Sender<Outcome>> {
        if !std::mem::take(&mut self.owns) {
            return Vec::new();
        }
        self.flights
            .shard(self.key)
            .lock()
            .remove(&self.key)
            .map(|f| f.waiters)
            .unwrap_or_default()
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Dropping the senders (outside the lock) wakes the waiters without an outcome.
        drop(self.take_waiters());
    }
}

/// Waits for the leader's outcome; None when the leader went away without one.
pub async fn wait(rx: oneshot::Receiver<Outcome>) -> Option<Outcome> {
    rx.await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::AnswerKind;
    use std::time::{Duration, Instant};

    fn entry() -> Entry {
        Entry::new(
            vec![0; 12],
            vec![],
            0,
            AnswerKind::Positive,
            0,
            Instant::now(),
            Duration::from_secs(5),
        )
    }

    #[tokio::test]
    async fn waiters_get_the_leaders_outcome() {
        let f = Arc::new(Flights::default());
        let Join::Lead(leader) = f.join(7, b"q", 0) else {
            panic!("first caller leads");
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| match f.join(7, b"q", 0) {
                Join::Wait(rx) => tokio::spawn(wait(rx)),
                Join::Lead(_) => panic!("the flight is in the air"),
            })
            .collect();
        assert!(f.in_air(7));
        let up: Option<SocketAddr> = Some("127.0.0.1:53".parse().unwrap());
        leader.land(&Ok((entry(), up)));
        assert!(!f.in_air(7) && f.is_empty());
        for w in waiters {
            let (_, from) = w.await.unwrap().expect("an outcome").expect("the answer");
            assert_eq!(from, up);
        }
    }

    #[tokio::test]
    async fn another_question_under_the_same_key_is_not_coalesced() {
        let f = Arc::new(Flights::default());
        let Join::Lead(_leader) = f.join(7, b"q", 0) else {
            panic!("first caller leads");
        };
        assert!(matches!(f.join(7, b"other", 0), Join::Lead(_)));
        // That second leader does not own the flight: dropping it leaves the first in the air.
        assert!(f.in_air(7));
    }

    #[tokio::test]
    async fn other_key_flags_under_the_same_key_are_not_coalesced() {
        let f = Arc::new(Flights::default());
        let Join::Lead(_leader) = f.join(7, b"q", 0) else {
            panic!("first caller leads");
        };
        // Same question, DO set: another answer, never the first flight's.
        assert!(matches!(f.join(7, b"q", 1), Join::Lead(_)));
        assert!(matches!(f.join(7, b"q", 0), Join::Wait(_)));
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_its_waiters() {
        let f = Arc::new(Flights::default());
        let Join::Lead(leader) = f.join(9, b"q", 0) else {
            panic!("first caller leads");
        };
        let Join::Wait(rx) = f.join(9, b"q", 0) else {
            panic!("waits");
        };
        drop(leader);
        assert!(wait(rx).await.is_none());
        assert!(f.is_empty());
    }
}
