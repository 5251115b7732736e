//! The byte stream of a TCP connection: length-prefixed messages arriving in pieces of any size
//! (`server::tcp::next_message`), each then parsed as a query. The first byte of the input picks
//! how the rest is cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodedns::dns;
use nodedns::server::tcp::{frame, next_message};

fuzz_target!(|data: &[u8]| {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let step = step as usize + 1;
    let mut buf = Vec::new();
    let mut taken = Vec::new();
    for read in stream.chunks(step) {
        buf.extend_from_slice(read);
        while let Some(pkt) = next_message(&mut buf) {
            taken.extend_from_slice(&(pkt.len() as u16).to_be_bytes());
            taken.extend_from_slice(&pkt);
            let _ = dns::parse_query(&pkt);
        }
        // What stays is an incomplete message, never more than one message and its prefix.
        assert!(frame(&buf).is_none());
        assert!(buf.len() < 2 + u16::MAX as usize);
    }
    // Nothing lost, nothing reordered: the messages taken and the rest are the stream.
    taken.extend_from_slice(&buf);
    assert_eq!(taken, stream);
});
