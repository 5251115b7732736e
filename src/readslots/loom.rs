//! The lock protocol model-checked with loom: every interleaving of the threads below, up to
//! `PREEMPTIONS` preemptions each, on loom's models of the atomics, the mutexes and the data
//! cells. loom fails a model on any read of a value that a write on another thread is not ordered
//! with (a data race on the cell) and on any deadlock; the readers also assert that they never
//! see half a write. Under loom a table has two slots, so in a model of three threads one of them
//! (any one, by the order they first touch a table) reads and writes through the fallback. (A
//! thread that exits gives its slot back in a thread-local destructor, which loom cannot run
//! with its mutex: slot reuse is left to the stress tests.)
//!
//! `cargo test --locked --features loom --lib readslots::loom -- --nocapture --test-threads 1`
//! (tests/run-all.sh runs it; `LOOM_MAX_PREEMPTIONS` overrides the bound).

use std::sync::atomic::{AtomicUsize as Count, Ordering::Relaxed as R};

use ::loom::sync::Arc;
use ::loom::thread;

use super::SlotTable;

/// The default preemption bound: every interleaving with at most this many preemptions (a
/// thread switched out while it could go on) is explored.
const PREEMPTIONS: usize = 2;

/// Runs `model` in every interleaving loom explores and prints how many there were.
fn check(name: &str, model: impl Fn() + Sync + Send + 'static) {
    static RUNS: Count = Count::new(0);
    RUNS.store(0, R);
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(PREEMPTIONS);
    }
    let bound = b.preemption_bound;
    b.check(move || {
        RUNS.fetch_add(1, R);
        model();
    });
    let runs = RUNS.load(R);
    println!("loom {name}: {runs} interleavings explored (preemption bound {bound:?})");
    assert!(runs > 1, "loom explored {runs} interleavings");
}

/// Asserts `check` on a thread of its own once the others are joined. (Not on the model's main
/// thread: loom drops its thread-locals, whose slot index goes back to a loom static, only after
/// the statics are gone.)
fn after(check: impl FnOnce() -> bool + Send + 'static) {
    assert!(thread::spawn(check).join().unwrap(), "final state");
}

/// Both fields of a pair are written one after the other under the write lock.
fn write_pair(t: &SlotTable<(u32, u32)>, i: usize, v: u32) {
    t.write(i, |p| {
        p.0 = v;
        p.1 = v;
    });
}

fn whole(p: &(u32, u32)) -> bool {
    p.0 == p.1
}

/// A writer of two locks against a reader of one and a `read_any` reader of both.
#[test]
fn writer_against_read_and_read_any() {
    check("writer_against_read_and_read_any", || {
        let t = Arc::new(SlotTable::new([(0u32, 0u32), (0, 0)]));
        let w = {
            let t = t.clone();
            thread::spawn(move || {
                write_pair(&t, 0, 1);
                write_pair(&t, 1, 1);
            })
        };
        let r = {
            let t = t.clone();
            thread::spawn(move || assert!(t.read(0, whole), "torn read"))
        };
        let any = {
            let t = t.clone();
            thread::spawn(move || {
                t.read_any(|r| {
                    for i in 0..2 {
                        assert_ne!(r.try_read(i, whole), Some(false), "torn read_any");
                    }
                });
            })
        };
        for h in [w, r, any] {
            h.join().unwrap();
        }
        // Every write landed whole.
        after(move || (0..2).all(|i| t.read(i, |p| *p == (1, 1))));
    });
}

/// Two writers of one lock against a reader that reads both locks in turn (its slot moves
/// from one tag to the other).
#[test]
fn two_writers_against_a_reader_of_both_locks() {
    check("two_writers_against_a_reader_of_both_locks", || {
        let t = Arc::new(SlotTable::new([(0u32, 0u32), (0, 0)]));
        let writers: Vec<_> = (1..=2)
            .map(|v| {
                let t = t.clone();
                thread::spawn(move || write_pair(&t, 1, v))
            })
            .collect();
        let r = {
            let t = t.clone();
            thread::spawn(move || {
                assert!(t.read(0, whole), "torn read");
                assert!(t.read(1, whole), "torn read");
            })
        };
        for h in writers.into_iter().chain([r]) {
            h.join().unwrap();
        }
        after(move || t.read(1, |p| whole(p) && p.0 > 0));
    });
}
