//! A reader-writer lock whose readers write only to a cache line of their own.
//!
//! A `parking_lot::RwLock` read still does an atomic add on the lock word, so when two workers
//! read the same shard one after the other, the line moves between their cores: measured here,
//! that doubled the per-thread cost of a cache hit with two threads (`benches/cache.rs`,
//! `lookup_concurrent`). The hit path must make no shared write at all.
//!
//! Here every reading thread owns a slot (its own 128-byte line) in a [`ReaderSlots`] table. To
//! read lock `i` it stores `i + 1` in its slot, then checks the lock's writer flag; a writer sets
//! the flag, then waits until no slot holds its lock's tag. Both sides use sequentially consistent
//! operations, so at least one of them sees the other (the reader backs off, or the writer waits).
//! A read is then one store to a line the reader owns and one load of a line that only changes
//! when the lock is written. Writers are serialised by a mutex and pay a scan of the slots in use
//! (one per thread that ever read: the workers and the runtime's threads).
//!
//! A thread can also hold its slot for a short run of reads across many locks of the table
//! ([`ReaderSlots::read_any`]): one store of the `ANY` tag, then per lock only the writer-flag load
//! ([`SlotLock::try_read`]), which skips a lock being written instead of waiting. With no fence
//! per lock, the CPU overlaps the memory loads of consecutive reads; a UDP worker uses it to
//! prefetch the cache entries of a whole `recvmmsg` batch.
//!
//! Threads beyond [`MAX_SLOTS`] (never expected: the slot of an exited thread is reused) read
//! under the writers' mutex instead: correct, only slower.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::*};

use parking_lot::Mutex;

/// Slots per table: reading threads alive at once before the fallback.
pub const MAX_SLOTS: usize = 256;

/// Process-wide slot numbering: a thread keeps one index for every table.
static NEXT: AtomicUsize = AtomicUsize::new(0);
/// Highest index handed out + 1: how far a writer scans.
static HIGH: AtomicUsize = AtomicUsize::new(0);
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// This thread's slot index; returned to `FREE` when the thread exits.
struct SlotIndex(Cell<usize>);

const UNASSIGNED: usize = usize::MAX;
const NONE: usize = usize::MAX - 1;

/// The slot value of a thread inside [`ReaderSlots::read_any`]: it may read any lock of the
/// table, so every writer waits for it. Lock tags are ids + 1, far below.
const ANY: usize = usize::MAX;

impl Drop for SlotIndex {
    fn drop(&mut self) {
        let i = self.0.get();
        if i < MAX_SLOTS {
            FREE.lock().push(i);
        }
    }
}

thread_local! {
    static INDEX: SlotIndex = const { SlotIndex(Cell::new(UNASSIGNED)) };
}

fn my_index() -> usize {
    INDEX
        .try_with(|s| {
            let mut i = s.0.get();
            if i == UNASSIGNED {
                i = FREE
                    .lock()
                    .pop()
                    .unwrap_or_else(|| NEXT.fetch_add(1, SeqCst));
                if i >= MAX_SLOTS {
                    i = NONE;
                } else {
                    HIGH.fetch_max(i + 1, SeqCst);
                }
                s.0.set(i);
            }
            i
        })
        .unwrap_or(NONE)
}

#[repr(align(128))]
struct Slot(AtomicUsize);

/// The reader slots shared by a set of [`SlotLock`]s (one table per cache).
pub struct ReaderSlots {
    slots: Box<[Slot]>,
}

impl Default for ReaderSlots {
    fn default() -> Self {
        ReaderSlots {
            slots: (0..MAX_SLOTS).map(|_| Slot(AtomicUsize::new(0))).collect(),
        }
    }
}

/// Proof that this thread's slot holds `ANY` (see [`ReaderSlots::read_any`]).
pub struct AnyGuard<'a> {
    slots: &'a ReaderSlots,
    // Not Send: the slot belongs to the thread that set it.
    _thread: std::marker::PhantomData<*const ()>,
}

impl ReaderSlots {
    /// Runs `f` with this thread's slot holding `ANY`, so that [`SlotLock::try_read`] can read
    /// any lock of this table with no store per lock. Every writer of the table waits until `f`
    /// returns: keep `f` to a short run of reads. `f` must not call [`SlotLock::read`] (which
    /// would take the slot over). None when this thread has no slot (beyond [`MAX_SLOTS`]).
    #[inline]
    pub fn read_any<R>(&self, f: impl FnOnce(&AnyGuard<'_>) -> R) -> Option<R> {
        let slot = &self.slots.get(my_index())?.0;
        slot.store(ANY, SeqCst);
        let _leave = Leave(slot);
        Some(f(&AnyGuard {
            slots: self,
            _thread: std::marker::PhantomData,
        }))
    }
}

/// Clears the reader's slot however the read ends (a panic included).
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.store(0, Release);
    }
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// A lock identified by `tag` (unique among the locks sharing one [`ReaderSlots`]).
pub struct SlotLock<T> {
    tag: usize,
    writer: AtomicBool,
    writers: Mutex<()>,
    data: UnsafeCell<T>,
}

// SAFETY: access to `data` follows the protocol above: shared references only while the reader's
// slot holds `tag` with the writer flag seen clear (or under `writers`), a unique reference only
// under `writers` with the flag set and no slot holding `tag`.
unsafe impl<T: Send + Sync> Sync for SlotLock<T> {}
unsafe impl<T: Send> Send for SlotLock<T> {}

impl<T> SlotLock<T> {
    /// `id` must be unique among the locks that share a `ReaderSlots`.
    pub fn new(id: usize, value: T) -> Self {
        SlotLock {
            tag: id + 1,
            writer: AtomicBool::new(false),
            writers: Mutex::new(()),
            data: UnsafeCell::new(value),
        }
    }

    /// Runs `f` with shared access.
    #[inline]
    pub fn read<R>(&self, slots: &ReaderSlots, f: impl FnOnce(&T) -> R) -> R {
        let i = my_index();
        let Some(slot) = slots.slots.get(i) else {
            let _g = self.writers.lock();
            // SAFETY: writers are excluded by the mutex.
            return f(unsafe { &*self.data.get() });
        };
        let slot = &slot.0;
        debug_assert_ne!(slot.load(Relaxed), ANY, "read inside read_any");
        let mut spins = 0;
        loop {
            slot.store(self.tag, SeqCst);
            if !self.writer.load(SeqCst) {
                break;
            }
            slot.store(0, Release);
            while self.writer.load(Acquire) {
                backoff(&mut spins);
            }
        }
        let _leave = Leave(slot);
        // SAFETY: our slot holds the tag and the writer flag was clear after we set it, so any
        // writer now waits for the slot to clear before taking a unique reference.
        f(unsafe { &*self.data.get() })
    }

    /// Shared access inside [`ReaderSlots::read_any`] (`guard` from the table this lock uses),
    /// or None while a writer holds or waits for the lock.
    #[inline]
    pub fn try_read<'g>(&'g self, guard: &'g AnyGuard<'_>) -> Option<&'g T> {
        let _ = guard.slots;
        if self.writer.load(SeqCst) {
            return None;
        }
        // SAFETY: our slot holds ANY (the guard exists only inside read_any, on this thread) and
        // the writer flag was clear after that store: a writer that sets the flag later sees ANY
        // in its scan and waits for the slot to clear, as for a tagged reader.
        Some(unsafe { &*self.data.get() })
    }

    /// Runs `f` with unique access.
    pub fn write<R>(&self, slots: &ReaderSlots, f: impl FnOnce(&mut T) -> R) -> R {
        let _g = self.writers.lock();
        self.writer.store(true, SeqCst);
        let high = HIGH.load(SeqCst).min(MAX_SLOTS);
        for s in &slots.slots[..high] {
            let mut spins = 0;
            while matches!(s.0.load(SeqCst), t if t == self.tag || t == ANY) {
                backoff(&mut spins);
            }
        }
        struct Clear<'a>(&'a AtomicBool);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.store(false, Release);
            }
        }
        let _clear = Clear(&self.writer);
        // SAFETY: other writers are excluded by the mutex, fallback readers too, and every slot
        // reader either left before our scan saw its slot clear or sees the flag and backs off.
        f(unsafe { &mut *self.data.get() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    type Pair = SlotLock<(u64, u64)>;

    /// Three reader threads run `read` (returning how many reads it checked) until stopped, while
    /// this thread writes to four locks keeping two fields equal, 200,000 times or for 3 s,
    /// whichever ends first (a loaded 2-core machine makes every write wait for descheduled
    /// readers); `read` asserts the fields it sees are equal.
    fn check_no_torn_reads(read: fn(&ReaderSlots, &[Pair], usize) -> u64) {
        let slots = Arc::new(ReaderSlots::default());
        let locks: Arc<Vec<Pair>> = Arc::new((0..4).map(|i| SlotLock::new(i, (0, 0))).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..3)
            .map(|t| {
                let (slots, locks, stop) = (slots.clone(), locks.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    let mut i = t;
                    while !stop.load(Relaxed) {
                        i = (i + 1) % 4;
                        n += read(&slots, &locks, i);
                    }
                    n
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut writes = 0u64;
        for k in 1..=200_000u64 {
            if k % 1024 == 0 && std::time::Instant::now() > deadline {
                break;
            }
            writes = k;
            locks[(k % 4) as usize].write(&slots, |v| {
                v.0 = k;
                std::hint::spin_loop();
                v.1 = k;
            });
        }
        stop.store(true, Relaxed);
        for r in readers {
            assert!(r.join().expect("reader") > 0);
        }
        assert!(writes >= 1024, "only {writes} writes");
        for l in locks.iter() {
            assert!(l.read(&slots, |v| v.0 == v.1 && v.0 > 0));
        }
    }

    fn same(v: &(u64, u64)) -> bool {
        let a = v.0;
        std::hint::spin_loop();
        a == v.1
    }

    /// Readers on other threads must never see a half write.
    #[test]
    fn readers_never_see_a_half_write() {
        check_no_torn_reads(|slots, locks, i| {
            assert!(locks[i].read(slots, same), "torn read");
            1
        });
    }

    /// As above, with readers going through `read_any` and `try_read` over every lock at once.
    #[test]
    fn read_any_never_sees_a_half_write() {
        check_no_torn_reads(|slots, locks, _| {
            slots
                .read_any(|g| {
                    let mut n = 0;
                    for l in locks {
                        if let Some(v) = l.try_read(g) {
                            assert!(same(v), "torn read");
                            n += 1;
                        }
                    }
                    n
                })
                .expect("a slot")
        });
    }

    /// A thread's slot is reused after it exits, so short-lived threads do not use slots up.
    #[test]
    fn exited_threads_give_their_slot_back() {
        let slots = ReaderSlots::default();
        let lock = SlotLock::new(0, 1u32);
        for _ in 0..2 * MAX_SLOTS {
            std::thread::scope(|s| {
                s.spawn(|| {
                    assert_eq!(lock.read(&slots, |v| *v), 1);
                    assert!(my_index() < MAX_SLOTS, "a slot, not the fallback");
                });
            });
        }
    }
}
