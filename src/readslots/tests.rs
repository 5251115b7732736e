//! Stress tests of the lock protocol on real threads, and the nested-access checks.

use super::*;
use std::sync::atomic::AtomicBool as StdBool;
use std::sync::Arc;

type Pairs = SlotTable<(u64, u64)>;

/// Three reader threads run `read` (returning how many reads it checked) until stopped, while
/// this thread writes to four locks keeping two fields equal, 200,000 times or for 3 s,
/// whichever ends first, but at least 2,048 times (a loaded 2-core machine makes every write
/// wait for descheduled readers); `read` asserts the fields it sees are equal.
fn check_no_torn_reads(read: fn(&Pairs, usize) -> u64) {
    let table: Arc<Pairs> = Arc::new(SlotTable::new((0..4).map(|_| (0, 0))));
    let stop = Arc::new(StdBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (table, stop) = (table.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut i = t;
                while !stop.load(Relaxed) {
                    i = (i + 1) % 4;
                    n += read(&table, i);
                }
                n
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    for k in 1..=200_000u64 {
        if k % 1024 == 0 && k > 2048 && std::time::Instant::now() > deadline {
            break;
        }
        table.write((k % 4) as usize, |v| {
            v.0 = k;
            std::hint::spin_loop();
            v.1 = k;
        });
    }
    stop.store(true, Relaxed);
    for r in readers {
        assert!(r.join().expect("reader") > 0);
    }
    for i in 0..table.len() {
        assert!(table.read(i, |v| v.0 == v.1 && v.0 > 0));
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
    check_no_torn_reads(|table, i| {
        assert!(table.read(i, same), "torn read");
        1
    });
}

/// As above, with readers going through `read_any` and `try_read` over every lock at once.
#[test]
fn read_any_never_sees_a_half_write() {
    check_no_torn_reads(|table, _| {
        table
            .read_any(|r| {
                let mut n = 0;
                for i in 0..table.len() {
                    if let Some(ok) = r.try_read(i, same) {
                        assert!(ok, "torn read");
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
    let table = SlotTable::new([1u32]);
    for _ in 0..2 * MAX_SLOTS {
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(table.read(0, |v| *v), 1);
                assert!(my_index() < MAX_SLOTS, "a slot, not the fallback");
            });
        });
    }
}

/// The message of the panic `f` ends in (on a thread of its own).
fn panic_message(f: impl FnOnce() + Send) -> String {
    std::thread::scope(|s| {
        let e = s.spawn(f).join().expect_err("a panic");
        e.downcast_ref::<String>().cloned().unwrap_or_default()
    })
}

/// Every access nested in another access to the same table panics before it touches the slot
/// the outer one relies on; the outer access then ends normally and the table stays usable.
#[test]
fn a_nested_access_to_one_table_panics() {
    let table = SlotTable::new([10u32, 20]);
    type Case = fn(&SlotTable<u32>);
    let cases: [(&str, Case); 6] = [
        ("a read of lock 0", |t| t.read(0, |_| t.read(1, |_| ()))),
        ("a read of lock 1", |t| t.read(1, |_| t.write(0, |_| ()))),
        ("read_any", |t| {
            t.read_any(|_| t.read(0, |_| ()));
        }),
        ("a read of lock 0", |t| {
            t.read(0, |_| t.read_any(|_| ()));
        }),
        ("a write", |t| t.write(0, |_| t.read(1, |_| ()))),
        ("a write", |t| t.write(1, |_| t.write(0, |_| ()))),
    ];
    for (outer, case) in cases {
        let msg = panic_message(|| case(&table));
        assert!(
            msg.contains("nested access") && msg.contains(outer),
            "{outer}: {msg}"
        );
    }
    // Every slot was put back: the table reads and writes as before.
    table.write(0, |v| *v += 1);
    assert_eq!(table.read(0, |v| *v), 11);
    assert_eq!(table.read_any(|r| r.try_read(1, |v| *v)), Some(Some(20)));
}

/// Accesses to two different tables nest freely: each has slots of its own.
#[test]
fn accesses_to_different_tables_nest() {
    let a = SlotTable::new([1u32]);
    let b = SlotTable::new([2u32]);
    let sum = a.read(0, |x| b.read(0, |y| x + y));
    assert_eq!(sum, 3);
    let w = a.read_any(|r| r.try_read(0, |x| b.write(0, |y| std::mem::replace(y, *x))));
    assert_eq!(w, Some(Some(2)));
    assert_eq!(b.read(0, |y| *y), 1);
}
