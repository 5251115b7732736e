//! Coalescing: identical misses in flight (same cache key and question) share one upstream
//! exchange. The first one leads and resolves; the others wait for its result, whichever worker
//! thread or runtime they run on (a `watch` channel wakes them through their wakers).

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use std::collections::HashMap;
use tokio::sync::watch;

use super::AllFailed;
use crate::cache::Entry;

/// What a flight ends with: the answer and the upstream that gave it (None: made locally), or
/// the failure.
pub type Outcome = Result<(Entry, Option<SocketAddr>), Arc<AllFailed>>;

type Slot = watch::Receiver<Option<Outcome>>;
/// One shard: per key, the question it was asked for and the flight's channel.
type Shard = Mutex<HashMap<u64, (Box<[u8]>, Slot)>>;

/// Flights in progress, in shards so misses of different names rarely share a lock.
pub struct Flights {
    shards: Box<[Shard]>,
}

/// A flight this caller leads: publish its outcome with [`Leader::land`]. Dropped without
/// landing (the leading task cancelled), it lets the waiters go, and they resolve on their own.
pub struct Leader<'a> {
    flights: &'a Flights,
    key: u64,
    tx: Option<watch::Sender<Option<Outcome>>>,
}

/// Either lead the flight for a key, or wait for the one already in the air.
pub enum Join<'a> {
    Lead(Leader<'a>),
    Wait(Slot),
}

const SHARDS: usize = 64;

impl Default for Flights {
    fn default() -> Self {
        Flights {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Flights {
    fn shard(&self, key: u64) -> &Shard {
        &self.shards[(key >> 40) as usize % SHARDS]
    }

    /// Joins the flight for `key` (`question`: the lowercased question and key flags, compared so
    /// that a hash collision never shares an answer). With a flight for `key` but another
    /// question in the air, this caller leads its own, uncoalesced.
    pub fn join(&self, key: u64, question: &[u8]) -> Join<'_> {
        let mut map = self.shard(key).lock();
        if let Some((q, rx)) = map.get(&key) {
            if **q == *question {
                return Join::Wait(rx.clone());
            }
            return Join::Lead(Leader {
                flights: self,
                key,
                tx: None,
            });
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key, (question.into(), rx));
        Join::Lead(Leader {
            flights: self,
            key,
            tx: Some(tx),
        })
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

impl Leader<'_> {
    /// Ends the flight: every waiter gets `outcome`.
    pub fn land(mut self, outcome: &Outcome) {
        self.remove();
        if let Some(tx) = self.tx.take() {
            // No receiver left is fine: nobody waited.
            let _ = tx.send(Some(outcome.clone()));
        }
    }

    fn remove(&self) {
        if self.tx.is_some() {
            self.flights.shard(self.key).lock().remove(&self.key);
        }
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Waits for the leader's outcome; None when the leader went away without one.
pub async fn wait(mut rx: Slot) -> Option<Outcome> {
    loop {
        if let Some(o) = rx.borrow_and_update().as_ref() {
            return Some(o.clone());
        }
        if rx.changed().await.is_err() {
            return rx.borrow().clone();
        }
    }
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
        let f = Flights::default();
        let Join::Lead(leader) = f.join(7, b"q") else {
            panic!("first caller leads");
        };
        let waiters: Vec<_> = (0..3)
            .map(|_| match f.join(7, b"q") {
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
        let f = Flights::default();
        let Join::Lead(_leader) = f.join(7, b"q") else {
            panic!("first caller leads");
        };
        assert!(matches!(f.join(7, b"other"), Join::Lead(_)));
        // That second leader does not own the flight: dropping it leaves the first in the air.
        assert!(f.in_air(7));
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_its_waiters() {
        let f = Flights::default();
        let Join::Lead(leader) = f.join(9, b"q") else {
            panic!("first caller leads");
        };
        let Join::Wait(rx) = f.join(9, b"q") else {
            panic!("waits");
        };
        drop(leader);
        assert!(wait(rx).await.is_none());
        assert!(f.is_empty());
    }
}
