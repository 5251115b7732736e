//! Panics stop at the packet. A panic while a query is handled (a bug: the parser and the
//! renderer are built never to panic on input) ends that query with SERVFAIL, or no reply when
//! the packet has no header; the worker, the connection's other queries and the process go on.
//! The panic hook counts it in `coredns_panics_total` before the unwinding starts, so the
//! `NodeDNSPanics` alert fires while the node keeps serving.
//!
//! The containment points: every datagram of a UDP batch (parse, prefetch, answer), the UDP
//! worker's loop as a whole (a panic outside a datagram restarts it), every TCP message, the
//! finishing of every miss in a worker's table, and every miss task (UDP and TCP); the client
//! of the miss gets SERVFAIL. Tasks on the shared runtime are
//! also contained by tokio itself (a panicking task ends alone).
//!
//! A panic while a cache shard is written leaves that shard's contents as far as the write went:
//! safe code only (the arena has no `unsafe` beyond a prefetch hint), so later lookups of the
//! shard may miss or panic again, each contained the same way, but never read freed memory.
//!
//! Debug builds only: [`test_trigger`] panics on a query for the name given in
//! `NODEDNS_TEST_PANIC` (hit path: the cache lookup of UDP and TCP) or `NODEDNS_TEST_PANIC_MISS`
//! (a miss, as a worker starts it or as its task does), so the integration tests can show all
//! this on the real binary. The hook is compiled only under `debug_assertions`, which the
//! release profile (the image's `cargo build --release`) turns off: no setting of a shipped
//! binary can make it panic.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};

use futures::FutureExt;

use crate::dns;

/// Runs `f`, or returns None if it panicked.
#[inline(always)]
pub fn packet<R>(f: impl FnOnce() -> R) -> Option<R> {
    // AssertUnwindSafe: after a panic the caller drops or resets what `f` was writing (the
    // reply buffer, the batch slot), and shared state is behind locks that release on unwind.
    catch_unwind(AssertUnwindSafe(f)).ok()
}

/// Awaits `f`, or returns None if it panicked.
///
/// A plain function returning the combinator, not an `async fn`: an async fn would hold `f` twice
/// in its state (as the argument and as the awaited local), doubling the size of every miss task
/// that is moved into the runtime.
pub fn task<F: Future>(f: F) -> impl Future<Output = Option<F::Output>> {
    AssertUnwindSafe(f).catch_unwind().map(Result::ok)
}

/// Writes into `out` the SERVFAIL reply to `pkt` after a panic: its ID, flags and question when
/// they can be read, no OPT (the packet is not parsed again: that may be what panicked). False
/// when `pkt` has no header, so there is no one to answer.
pub fn servfail(pkt: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    if pkt.len() < dns::HEADER_LEN {
        return false;
    }
    let question = dns::question_end(pkt).map(|end| &pkt[dns::HEADER_LEN..end]);
    dns::write_error_reply(pkt, dns::RCODE_SERVFAIL as u16, question, None, out);
    true
}

/// Where [`test_trigger`] is placed.
#[derive(Clone, Copy)]
pub enum Trigger {
    /// The cache lookup of UDP and TCP (`NODEDNS_TEST_PANIC`).
    Hit,
    /// A miss, where a worker starts it or its task resolves it (`NODEDNS_TEST_PANIC_MISS`).
    Miss,
}

/// Debug builds: panics when `q` asks for the name in this trigger's variable (presentation
/// form with the final dot, any case). Release builds: nothing.
#[inline(always)]
pub fn test_trigger(q: &dns::Query, at: Trigger) {
    #[cfg(debug_assertions)]
    {
        use std::sync::OnceLock;
        static NAMES: OnceLock<[Option<String>; 2]> = OnceLock::new();
        let names = NAMES.get_or_init(|| {
            let var = |k: &str| std::env::var(k).ok().map(|v| v.to_ascii_lowercase());
            [var("NODEDNS_TEST_PANIC"), var("NODEDNS_TEST_PANIC_MISS")]
        });
        if let Some(name) = &names[at as usize] {
            if q.qname_string() == *name {
                panic!("test panic on a query for {name}");
            }
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (q, at);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_none_and_servfail_keeps_id_and_question() {
        assert_eq!(packet(|| 7), Some(7));
        assert_eq!(packet(|| -> u8 { panic!("boom") }), None);
        let mut pkt = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        pkt.extend_from_slice(b"\x01a\x00\x00\x01\x00\x01");
        let mut out = b"half a reply".to_vec();
        assert!(servfail(&pkt, &mut out));
        assert_eq!(&out[..2], &[0xab, 0xcd]);
        assert_eq!(out[3] & 0x0f, dns::RCODE_SERVFAIL);
        assert_eq!(&out[4..6], &[0, 1], "QDCOUNT");
        assert_eq!(&out[12..], b"\x01a\x00\x00\x01\x00\x01");
        assert!(!servfail(&pkt[..5], &mut out));
        assert!(out.is_empty());
    }

    fn rt_panics() -> bool {
        std::hint::black_box(true)
    }

    #[test]
    fn a_panicking_future_becomes_none() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(rt.block_on(task(async { 3 })), Some(3));
        assert_eq!(
            rt.block_on(task(async {
                if rt_panics() {
                    panic!("boom");
                }
                3u8
            })),
            None
        );
    }
}
