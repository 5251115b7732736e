//! A client query as it arrives on a UDP or TCP listener: `dns::parse_query`, then what the
//! server does with the result (the error reply to a rejected packet, the upstream query for an
//! accepted one, the truncated form of a reply).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodedns::dns::{self, Reject};

fuzz_target!(|pkt: &[u8]| {
    let mut out = Vec::new();
    match dns::parse_query(pkt) {
        Ok(q) => {
            assert!(q.question_end <= pkt.len());
            let _ = q.qname_string();
            assert!(q.max_udp_reply(1232) >= 512);
            // The upstream query we would send parses back to the same lowercase question.
            dns::write_upstream_query(&q, 7, 1232, &mut out);
            let up = dns::parse_query(&out).expect("our upstream query parses");
            assert_eq!(up.question_lower(), q.question_lower());
            assert_eq!(up.key_flags(), q.key_flags());
        }
        Err(reject) => {
            let question = dns::question_end(pkt).map(|end| &pkt[dns::HEADER_LEN..end]);
            match reject {
                Reject::Drop => return,
                Reject::Rcode(rcode) => {
                    dns::write_error_reply(pkt, rcode as u16, question, None, &mut out)
                }
                Reject::BadVers => dns::write_error_reply(
                    pkt,
                    dns::RCODE_BADVERS,
                    question,
                    Some((1232, false)),
                    &mut out,
                ),
            }
            assert_eq!(&out[..2], &pkt[..2]);
            let len = out.len();
            dns::truncate_reply(&mut out);
            assert!(out.len() <= len);
        }
    }
});
