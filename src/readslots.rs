//! A table of reader-writer locks whose readers write only to a cache line of their own.
//!
//! A `parking_lot::RwLock` read still does an atomic add on the lock word, so when two workers
//! read the same shard one after the other, the line moves between their cores: measured here,
//! that doubled the per-thread cost of a cache hit with two threads (`benches/cache.rs`,
//! `lookup_concurrent`). The hit path must make no shared write at all.
//!
//! A [`SlotTable`] owns its locks and its reader slots, one per reading thread (its own 128-byte
//! line). To read lock `i` a thread stores `i + 1` (the lock's tag) in its slot, then checks the
//! lock's writer flag; a writer sets the flag, then waits until no slot holds its lock's tag.
//! Both sides order their store before their load (sequentially consistent operations), so at
//! least one of them sees the other (the reader backs off, or the writer waits). A read is then
//! one store to a line the reader owns and one load of a line that only changes when the lock is
//! written. Writers of a lock are serialised by a mutex and pay a scan of the slots in use (one
//! per thread that ever read: the workers and the runtime's threads).
//!
//! A thread can also hold its slot for a short run of reads across many locks of the table
//! ([`SlotTable::read_any`]): one store of the `ANY` tag, then per lock only the writer-flag load
//! ([`AnyReader::try_read`]), which skips a lock being written instead of waiting. With no fence
//! per lock, the CPU overlaps the memory loads of consecutive reads; a UDP worker uses it to
//! prefetch the cache entries of a whole `recvmmsg` batch.
//!
//! Sound by construction: locks are reached only through their table (so a reader always
//! announces itself in the slots the lock's writers scan), data only inside a closure (no
//! reference outlives the read), and a thread has one slot per table, so it may be in one access
//! to a table at a time. A nested access to the same table (a read, `read_any` or write inside
//! another) would overwrite or clear the slot the outer read relies on, or wait for itself: it
//! panics instead, before touching the slot (one load of the thread's own line). Nested accesses
//! to different tables are fine.
//!
//! Threads beyond [`MAX_SLOTS`] (never expected: the slot of an exited thread is reused) read
//! under the lock's writers' mutex instead: correct, only slower (a nested read of the same lock
//! on such a thread deadlocks rather than panics).
//!
//! The protocol is model-checked with loom (`mod loom` below, `--features loom`) besides the
//! stress tests. loom does not model sequentially consistent loads and stores (it treats them as
//! acquire/release), only sequentially consistent fences; so under loom each store that must be
//! ordered before a later load is followed by `fence(SeqCst)` ([`publish`]), which gives the same
//! guarantee in the C++ memory model. Everything else is the code the server runs.

use std::cell::Cell;
use std::marker::PhantomData;

use sync::{AtomicBool, AtomicUsize, Mutex, Ordering::*, UnsafeCell};

/// What the protocol is built on: std and parking_lot, or loom's models of them.
#[cfg(not(feature = "loom"))]
mod sync {
    pub use parking_lot::Mutex;
    pub use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    pub fn spin_loop() {
        std::hint::spin_loop();
    }

    pub fn yield_now() {
        std::thread::yield_now();
    }

    /// `std::cell::UnsafeCell` with loom's closure API, so both builds share one code path.
    pub struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

    impl<T> UnsafeCell<T> {
        pub fn new(v: T) -> Self {
            UnsafeCell(std::cell::UnsafeCell::new(v))
        }

        #[inline(always)]
        pub fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
            f(self.0.get())
        }

        #[inline(always)]
        pub fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
            f(self.0.get())
        }
    }
}

#[cfg(feature = "loom")]
mod sync {
    pub use loom::cell::UnsafeCell;
    pub use loom::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};

    pub fn spin_loop() {
        loom::hint::spin_loop();
    }

    pub fn yield_now() {
        loom::thread::yield_now();
    }

    /// loom's mutex with parking_lot's signature (no poisoning).
    pub struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub fn new(v: T) -> Self {
            Mutex(loom::sync::Mutex::new(v))
        }

        pub fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap_or_else(|e| e.into_inner())
        }
    }
}

/// Slots per table: reading threads alive at once before the fallback. Two under loom, so a
/// model with three threads also covers the fallback.
#[cfg(not(feature = "loom"))]
pub const MAX_SLOTS: usize = 256;
#[cfg(feature = "loom")]
pub const MAX_SLOTS: usize = 2;

// Process-wide slot numbering: a thread keeps one index for every table. NEXT: the next index
// never handed out; HIGH: highest index handed out + 1 (how far a writer scans); FREE: indexes of
// exited threads.
#[cfg(not(feature = "loom"))]
static NEXT: AtomicUsize = AtomicUsize::new(0);
#[cfg(not(feature = "loom"))]
static HIGH: AtomicUsize = AtomicUsize::new(0);
#[cfg(not(feature = "loom"))]
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
#[cfg(feature = "loom")]
::loom::lazy_static! {
    static ref NEXT: AtomicUsize = AtomicUsize::new(0);
    static ref HIGH: AtomicUsize = AtomicUsize::new(0);
    static ref FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
}

/// This thread's slot index; returned to `FREE` when the thread exits.
struct SlotIndex(Cell<usize>);

const UNASSIGNED: usize = usize::MAX;
/// The index of a thread without a slot (beyond [`MAX_SLOTS`], or while it exits).
const NONE: usize = usize::MAX - 1;

/// The slot value of a thread inside [`SlotTable::read_any`]: it may read any lock of the table,
/// so every writer waits for it. Lock tags are indexes + 1, far below.
const ANY: usize = usize::MAX;
/// The slot value of a thread inside [`SlotTable::write`]: no writer waits for it; it is there
/// so that an access nested in the write is caught like one nested in a read.
const WRITING: usize = usize::MAX - 1;
/// The slot value of a thread in no access to the table.
const IDLE: usize = 0;

// Not under loom, whose thread-locals are dropped after the thread's last step, where loom's
// mutex cannot be taken: the loom models give no slot back (the stress tests do).
#[cfg(not(feature = "loom"))]
impl Drop for SlotIndex {
    fn drop(&mut self) {
        let i = self.0.get();
        if i < MAX_SLOTS {
            FREE.lock().push(i);
        }
    }
}

#[cfg(not(feature = "loom"))]
thread_local! {
    static INDEX: SlotIndex = const { SlotIndex(Cell::new(UNASSIGNED)) };
}
#[cfg(feature = "loom")]
::loom::thread_local! {
    static INDEX: SlotIndex = SlotIndex(Cell::new(UNASSIGNED));
}

fn my_index() -> usize {
    INDEX
        .try_with(|s| {
            let mut i = s.0.get();
            if i == UNASSIGNED {
                let reused = FREE.lock().pop();
                i = reused.unwrap_or_else(|| NEXT.fetch_add(1, SeqCst));
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

/// Stores `v` in `a` such that the store is ordered before every later sequentially consistent
/// load of this thread (the store-load order both sides of the protocol rely on).
#[inline(always)]
fn publish<A: Publish>(a: &A, v: A::Value) {
    a.store_seqcst(v);
    #[cfg(feature = "loom")]
    sync::fence(SeqCst);
}

trait Publish {
    type Value;
    fn store_seqcst(&self, v: Self::Value);
}

impl Publish for AtomicUsize {
    type Value = usize;
    #[inline(always)]
    fn store_seqcst(&self, v: usize) {
        self.store(v, SeqCst);
    }
}

impl Publish for AtomicBool {
    type Value = bool;
    #[inline(always)]
    fn store_seqcst(&self, v: bool) {
        self.store(v, SeqCst);
    }
}

#[repr(align(128))]
struct Slot(AtomicUsize);

/// One lock of a table, on cache lines of its own.
#[repr(align(128))]
struct Lock<T> {
    writer: AtomicBool,
    writers: Mutex<()>,
    data: UnsafeCell<T>,
}

/// A fixed set of locks and the reader slots their readers announce themselves in.
pub struct SlotTable<T> {
    locks: Box<[Lock<T>]>,
    slots: Box<[Slot]>,
}

// SAFETY: access to a lock's data follows the protocol above: shared references only while the
// reader's slot holds the lock's tag (or ANY) with the writer flag seen clear, or under the lock's
// `writers` mutex; a unique reference only under `writers` with the flag set and no slot holding
// the tag or ANY. Shared references reach several threads at once (T: Sync), values are written
// from any thread (T: Send).
unsafe impl<T: Send + Sync> Sync for SlotTable<T> {}
// SAFETY: the table owns its values; moving it moves them (T: Send).
unsafe impl<T: Send> Send for SlotTable<T> {}

/// Proof that this thread's slot of `table` holds `ANY` (see [`SlotTable::read_any`]).
pub struct AnyReader<'t, T> {
    table: &'t SlotTable<T>,
    // Neither Send nor Sync: the slot belongs to the thread that set it.
    _thread: PhantomData<*const ()>,
}

/// Puts a slot back to IDLE however the access ends (a panic included).
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.store(IDLE, Release);
    }
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        sync::spin_loop();
    } else {
        sync::yield_now();
    }
}

/// Panics on an access nested in another access to the same table by this thread (`held`: the
/// slot's value).
#[cold]
#[inline(never)]
#[track_caller]
fn nested(held: usize) -> ! {
    let outer = match held {
        ANY => "read_any".to_string(),
        WRITING => "a write".to_string(),
        tag => format!("a read of lock {}", tag - 1),
    };
    panic!(
        "readslots: nested access to one table inside {outer} on the same thread \
         (a thread has one slot per table: finish the outer access first)"
    );
}

impl<T> SlotTable<T> {
    /// A table with one lock per value, lock `i` holding the `i`th.
    pub fn new(values: impl IntoIterator<Item = T>) -> Self {
        let locks: Box<[Lock<T>]> = values
            .into_iter()
            .map(|v| Lock {
                writer: AtomicBool::new(false),
                writers: Mutex::new(()),
                data: UnsafeCell::new(v),
            })
            .collect();
        assert!(locks.len() < WRITING - 1, "too many locks");
        SlotTable {
            locks,
            slots: (0..MAX_SLOTS)
                .map(|_| Slot(AtomicUsize::new(IDLE)))
                .collect(),
        }
    }

    /// Number of locks.
    pub fn len(&self) -> usize {
        self.locks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.locks.is_empty()
    }

    /// This thread's slot in this table, checked to be idle (else a nested access: panic).
    #[inline(always)]
    fn my_slot(&self) -> Option<&AtomicUsize> {
        let slot = &self.slots.get(my_index())?.0;
        // Only this thread stores to its slot, so it always sees its own last store.
        let held = slot.load(Relaxed);
        if held != IDLE {
            nested(held);
        }
        Some(slot)
    }

    /// Runs `f` with shared access to the value of lock `i` (panics if `i` is out of range, or
    /// if this thread is already in an access to this table).
    #[inline]
    pub fn read<R>(&self, i: usize, f: impl FnOnce(&T) -> R) -> R {
        let lock = &self.locks[i];
        let Some(slot) = self.my_slot() else {
            let _g = lock.writers.lock();
            // SAFETY: writers are excluded by the mutex.
            return lock.data.with(|p| f(unsafe { &*p }));
        };
        let tag = i + 1;
        let mut spins = 0;
        loop {
            publish(slot, tag);
            if !lock.writer.load(SeqCst) {
                break;
            }
            slot.store(IDLE, Release);
            while lock.writer.load(Acquire) {
                backoff(&mut spins);
            }
        }
        let _leave = Leave(slot);
        // SAFETY: our slot holds the tag and the writer flag was clear after we set it, so any
        // writer now waits for the slot to clear before taking a unique reference.
        lock.data.with(|p| f(unsafe { &*p }))
    }

    /// Runs `f` with this thread's slot holding `ANY`, so that [`AnyReader::try_read`] can read
    /// any lock of this table with no store per lock. Every writer of the table waits until `f`
    /// returns: keep `f` to a short run of reads. None when this thread has no slot (beyond
    /// [`MAX_SLOTS`]); panics if this thread is already in an access to this table.
    #[inline]
    pub fn read_any<R>(&self, f: impl FnOnce(&AnyReader<'_, T>) -> R) -> Option<R> {
        let slot = self.my_slot()?;
        publish(slot, ANY);
        let _leave = Leave(slot);
        Some(f(&AnyReader {
            table: self,
            _thread: PhantomData,
        }))
    }

    /// Runs `f` with unique access to the value of lock `i` (panics if `i` is out of range, or
    /// if this thread is already in an access to this table).
    pub fn write<R>(&self, i: usize, f: impl FnOnce(&mut T) -> R) -> R {
        let lock = &self.locks[i];
        let mine = self.my_slot();
        let _leave = mine.map(|slot| {
            slot.store(WRITING, Relaxed);
            Leave(slot)
        });
        let _g = lock.writers.lock();
        publish(&lock.writer, true);
        let tag = i + 1;
        let high = HIGH.load(SeqCst).min(MAX_SLOTS);
        for s in &self.slots[..high] {
            let mut spins = 0;
            while matches!(s.0.load(SeqCst), t if t == tag || t == ANY) {
                backoff(&mut spins);
            }
        }
        struct Clear<'a>(&'a AtomicBool);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.store(false, Release);
            }
        }
        let _clear = Clear(&lock.writer);
        // SAFETY: other writers are excluded by the mutex, fallback readers too, and every slot
        // reader either left before our scan saw its slot clear or sees the flag and backs off.
        lock.data.with_mut(|p| f(unsafe { &mut *p }))
    }
}

impl<T> AnyReader<'_, T> {
    /// Runs `f` with shared access to the value of lock `i` of the table, or returns None while a
    /// writer holds or waits for that lock.
    #[inline(always)]
    pub fn try_read<R>(&self, i: usize, f: impl FnOnce(&T) -> R) -> Option<R> {
        let lock = &self.table.locks[i];
        if lock.writer.load(SeqCst) {
            return None;
        }
        // SAFETY: our slot holds ANY (this reader exists only inside read_any, on this thread)
        // and the writer flag was clear after that store: a writer that sets the flag later sees
        // ANY in its scan and waits for the slot to clear, as for a tagged reader.
        Some(lock.data.with(|p| f(unsafe { &*p })))
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests;

#[cfg(all(test, feature = "loom"))]
mod loom;
