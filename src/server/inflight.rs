//! A UDP worker's misses in flight without a task (see `forward::direct`): a slab of pending
//! misses, each found again by the token its upstream reply comes back under, and linked in the
//! order their exchanges time out, so the worker finds the next timeout at the head.
//!
//! Every exchange times out `forward.timeout` after it was sent, so a new one almost always
//! belongs at the tail: inserting walks back from the tail only past exchanges that time out
//! later (after a reload shortened the timeout). Taking an entry out, answered or timed out,
//! unlinks it in constant time. A token carries the slot's generation, so a reply for a slot
//! already reused (its miss timed out, a new one took the slot) finds nothing.

use std::net::SocketAddr;
use std::time::Instant;

use super::Miss;
use crate::forward::direct::Attempt;

/// A miss waiting for its first upstream exchange.
pub struct Pending {
    pub client: Waiting,
    pub attempt: Attempt,
}

/// The client's side of a pending miss.
pub struct Waiting {
    pub miss: Miss,
    /// The client's query.
    pub pkt: Vec<u8>,
    pub src: SocketAddr,
    /// When the query was read, on the context's clock.
    pub start: Instant,
}

impl Expiring for Pending {
    fn expires(&self) -> Instant {
        self.attempt.expires
    }
}

/// What the table orders its entries by.
pub trait Expiring {
    fn expires(&self) -> Instant;
}

const NIL: u32 = u32::MAX;

struct Slot<T> {
    gen: u32,
    prev: u32,
    next: u32,
    pending: Option<T>,
}

/// The pending misses of one worker.
pub struct Table<T = Pending> {
    slots: Vec<Slot<T>>,
    /// Slots without a miss.
    free: Vec<u32>,
    /// The first and last pending misses in the order they time out.
    head: u32,
    tail: u32,
    len: usize,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }
}

fn token(idx: u32, gen: u32) -> u64 {
    (u64::from(gen) << 32) | u64::from(idx)
}

impl<T: Expiring> Table<T> {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// The token the next [`insert`](Self::insert) files its miss under.
    pub fn vacant(&mut self) -> u64 {
        let idx = match self.free.last() {
            Some(&idx) => idx,
            None => {
                let idx = self.slots.len() as u32;
                self.slots.push(Slot {
                    gen: 0,
                    prev: NIL,
                    next: NIL,
                    pending: None,
                });
                self.free.push(idx);
                idx
            }
        };
        token(idx, self.slots[idx as usize].gen)
    }

    /// Files `p` under `tok`, the token [`vacant`](Self::vacant) just gave.
    pub fn insert(&mut self, tok: u64, p: T) {
        let idx = self.free.pop().expect("vacant gave a free slot");
        debug_assert_eq!(token(idx, self.slots[idx as usize].gen), tok);
        let expires = p.expires();
        // After the last entry that times out no later than this one.
        let mut after = self.tail;
        while after != NIL && self.expires(after) > expires {
            after = self.slots[after as usize].prev;
        }
        let next = match after {
            NIL => self.head,
            a => self.slots[a as usize].next,
        };
        let s = &mut self.slots[idx as usize];
        s.prev = after;
        s.next = next;
        s.pending = Some(p);
        match after {
            NIL => self.head = idx,
            a => self.slots[a as usize].next = idx,
        }
        match next {
            NIL => self.tail = idx,
            n => self.slots[n as usize].prev = idx,
        }
        self.len += 1;
    }

    fn expires(&self, idx: u32) -> Instant {
        match &self.slots[idx as usize].pending {
            Some(p) => p.expires(),
            None => unreachable!("linked slots hold a miss"),
        }
    }

    /// Takes out the miss filed under `tok`; None when it is no longer there.
    pub fn take(&mut self, tok: u64) -> Option<T> {
        let idx = tok as u32;
        let s = self.slots.get(idx as usize)?;
        if token(idx, s.gen) != tok || s.pending.is_none() {
            return None;
        }
        Some(self.remove(idx))
    }

    /// When the next exchange times out.
    pub fn next_expiry(&self) -> Option<Instant> {
        (self.head != NIL).then(|| self.expires(self.head))
    }

    /// Takes out a miss whose exchange has timed out at `now`, the earliest first.
    pub fn take_expired(&mut self, now: Instant) -> Option<T> {
        match self.next_expiry() {
            Some(t) if t <= now => Some(self.remove(self.head)),
            _ => None,
        }
    }

    /// Takes out every miss (the worker stops).
    pub fn take_all(&mut self) -> Vec<T> {
        let mut all = Vec::with_capacity(self.len);
        while self.head != NIL {
            all.push(self.remove(self.head));
        }
        all
    }

    fn remove(&mut self, idx: u32) -> T {
        let s = &mut self.slots[idx as usize];
        let (prev, next) = (s.prev, s.next);
        let p = s.pending.take().expect("linked slots hold a miss");
        s.gen = s.gen.wrapping_add(1);
        s.prev = NIL;
        s.next = NIL;
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
        self.free.push(idx);
        self.len -= 1;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct E(Instant, u32);
    impl Expiring for E {
        fn expires(&self) -> Instant {
            self.0
        }
    }

    fn add(t: &mut Table<E>, at: Instant, n: u32) -> u64 {
        let tok = t.vacant();
        t.insert(tok, E(at, n));
        tok
    }

    #[test]
    fn entries_time_out_in_order_whatever_order_they_came_in() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut t = Table::default();
        for (i, at) in [50, 10, 30, 30, 70, 20].into_iter().enumerate() {
            add(&mut t, ms(at), i as u32);
        }
        assert_eq!(t.len(), 6);
        assert_eq!(t.next_expiry(), Some(ms(10)));
        assert!(t.take_expired(ms(9)).is_none());
        let mut order = Vec::new();
        while let Some(e) = t.take_expired(ms(60)) {
            order.push(e.1);
        }
        // Equal times keep their arrival order; 70 is not yet due.
        assert_eq!(order, vec![1, 5, 2, 3, 0]);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t.take_all().into_iter().map(|e| e.1).collect::<Vec<_>>(),
            vec![4]
        );
        assert!(t.is_empty() && t.next_expiry().is_none());
    }

    #[test]
    fn a_token_finds_only_its_own_entry() {
        let t0 = Instant::now();
        let mut t = Table::default();
        let a = add(&mut t, t0, 1);
        let b = add(&mut t, t0, 2);
        assert_eq!(t.take(a).map(|e| e.1), Some(1));
        assert!(t.take(a).is_none(), "taken once");
        // The slot is reused under a new generation: the old token does not reach it.
        let c = add(&mut t, t0, 3);
        assert_eq!(c as u32, a as u32, "same slot");
        assert_ne!(c, a);
        assert!(t.take(a).is_none());
        assert!(t.take(u64::from(u32::MAX - 1)).is_none(), "no such slot");
        assert_eq!(t.take(b).map(|e| e.1), Some(2));
        assert_eq!(t.take(c).map(|e| e.1), Some(3));
        assert!(t.is_empty());
    }

    #[test]
    fn unlinking_from_the_middle_keeps_the_order() {
        let t0 = Instant::now();
        let mut t = Table::default();
        let toks: Vec<u64> = (0..5)
            .map(|i| add(&mut t, t0 + Duration::from_millis(i), i as u32))
            .collect();
        t.take(toks[2]).unwrap();
        t.take(toks[0]).unwrap();
        t.take(toks[4]).unwrap();
        let left: Vec<u32> = t.take_all().into_iter().map(|e| e.1).collect();
        assert_eq!(left, vec![1, 3]);
        // The freed slots are reused and the order is rebuilt from empty.
        add(&mut t, t0 + Duration::from_millis(9), 9);
        add(&mut t, t0, 8);
        assert_eq!(t.next_expiry(), Some(t0));
        assert_eq!(t.slots.len(), 5, "no slot added while free ones remain");
    }
}
