//! What a recursive cache's replies say about themselves, whatever the upstream sent: RA set,
//! AA clear, CD as the client asked (RFC 4035 §3.1.6); error replies carry the question they
//! answer; additional records are left out before a reply is truncated (RFC 2181 §9).

use hickory_proto::op::{Edns, Message, ResponseCode};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::time::Duration;

use crate::common::*;

/// An authoritative-only upstream: AA=1, RA=0 (as CoreDNS's kubernetes plugin answers), with
/// `extra` TXT records of ~200 bytes in the additional section of `big.example.org`.
fn authority() -> FakeUpstream {
    FakeUpstream::start(|q, _| {
        let mut m = a_reply(q, 60, &[[192, 0, 2, 10]]);
        m.metadata.authoritative = true;
        m.metadata.recursion_available = false;
        if q.queries[0].name().to_ascii().starts_with("big.") {
            for i in 0..6 {
                m.add_additional(Record::from_rdata(
                    Name::from_ascii(format!("extra{i}.example.org.")).unwrap(),
                    60,
                    RData::TXT(TXT::new(vec![format!("{:0>190}", i)])),
                ));
            }
        }
        Action::Answer(m)
    })
}

/// nodedns on loopback in front of `up` for every zone.
fn start(up: &FakeUpstream) -> Nodedns {
    let up = up.arg();
    Nodedns::start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &up,
        "--cluster-dns",
        &up,
    ])
}

fn ask(dns: std::net::SocketAddr, name: &str, cd: bool, edns: Option<u16>) -> Message {
    let mut q = query_msg(name, RecordType::A, rand_id(), edns);
    q.metadata.checking_disabled = cd;
    let r = udp_raw(dns, &q.to_vec().unwrap(), Duration::from_secs(3)).expect("an answer");
    Message::from_vec(&r).expect("parseable")
}

#[test]
fn replies_set_ra_clear_aa_and_echo_cd_on_miss_and_hit() {
    let up = authority();
    let n = start(&up);
    for cd in [false, true] {
        let name = format!("flags-{cd}.example.org");
        for pass in ["miss", "hit"] {
            let r = ask(n.dns, &name, cd, Some(1232));
            assert_eq!(r.answers.len(), 1, "{pass}");
            assert!(r.metadata.recursion_available, "{pass} cd={cd}: RA=0");
            assert!(
                !r.metadata.authoritative,
                "{pass} cd={cd}: AA=1 from a cache"
            );
            assert_eq!(
                r.metadata.checking_disabled, cd,
                "{pass}: CD not the client's"
            );
        }
    }
}

#[test]
fn badvers_and_other_error_replies_carry_the_question() {
    let up = authority();
    let n = start(&up);
    // EDNS version 1: BADVERS, with the question (RFC 6891 §6.1.3).
    let mut q = query_msg("Version.Example.org", RecordType::A, 4242, Some(1232));
    let mut e = Edns::new();
    e.set_version(1);
    e.set_max_payload(1232);
    q.edns = Some(e);
    let r = udp_raw(n.dns, &q.to_vec().unwrap(), Duration::from_secs(3)).expect("BADVERS");
    let m = Message::from_vec(&r).expect("a reply dnspython-style parsers accept");
    assert_eq!(m.metadata.id, 4242);
    assert_eq!(m.queries.len(), 1, "BADVERS without its question");
    assert_eq!(m.queries[0].name().to_ascii(), "Version.Example.org.");
    assert_eq!(
        m.edns.as_ref().map(|e| e.rcode_high()),
        Some(1),
        "BADVERS is extended rcode 16"
    );
    // A zone transfer: NOTIMP, with the question.
    let q = query_msg("example.org", RecordType::AXFR, 4343, None);
    let r = udp_raw(n.dns, &q.to_vec().unwrap(), Duration::from_secs(3)).expect("NOTIMP");
    let m = Message::from_vec(&r).unwrap();
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    assert_eq!(m.queries.len(), 1, "NOTIMP without its question");
}

#[test]
fn additional_records_go_before_the_answer_is_truncated() {
    let up = authority();
    let n = start(&up);
    for pass in ["miss", "hit"] {
        // No EDNS: 512 bytes. The answer fits, the ~1.2 KB of additional records do not.
        let r = ask(n.dns, "big.example.org", false, None);
        assert!(
            !r.metadata.truncation,
            "{pass}: TC=1 although the answer fits"
        );
        assert_eq!(r.answers.len(), 1, "{pass}");
        assert_eq!(r.answers[0].data, RData::A(A::new(192, 0, 2, 10)));
        assert!(r.additionals.is_empty(), "{pass}: {:?}", r.additionals);
        // Over TCP there is room for everything, and everything comes.
        let q = query_msg("big.example.org", RecordType::A, rand_id(), None);
        let r = tcp_pipeline(n.dns, &[q]).remove(0);
        assert!(!r.metadata.truncation, "{pass}");
        assert_eq!(r.additionals.len(), 6, "{pass}");
    }
}
