//! What the forwarding unit tests share: query and reply packets, a runtime like a worker's, the
//! worker's mailbox read with a bound.

use std::time::Duration;

use super::answers::{poll_answers, take_answers, Answer};
use crate::dns;

/// A query packet for `name` (type A, RD).
pub fn query_packet(name: &str) -> Vec<u8> {
    let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        p.push(label.len() as u8);
        p.extend_from_slice(label.as_bytes());
    }
    p.extend_from_slice(&[0, 0, 1, 0, 1]);
    p
}

/// The parsed query for `name` (type A, RD).
pub fn query(name: &str) -> dns::Query {
    dns::parse_query(&query_packet(name)).unwrap()
}

/// The reply an upstream gives to `query`: the query itself with QR set (no records: NODATA).
pub fn reply_to(query: &[u8]) -> Vec<u8> {
    let mut r = query.to_vec();
    r[2] |= 0x80;
    r
}

/// A runtime like a UDP worker's: one thread.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits (up to 5 s) until replies for this thread's worker are there and takes them.
pub async fn worker_answers() -> Vec<(u64, Answer)> {
    tokio::time::timeout(Duration::from_secs(5), std::future::poll_fn(poll_answers))
        .await
        .expect("a reply for the worker within 5 s");
    let mut got = Vec::new();
    take_answers(&mut got);
    got
}
