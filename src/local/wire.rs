//! The wire side of local answers: a reply built from records for a query, a record parsed from
//! zone-file text, a query asked again under another name. Off the hit path: these allocate.

use hickory_proto::op::{Message, OpCode, Query as Question, ResponseCode};
use hickory_proto::rr::{Name, Record};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use hickory_proto::serialize::txt::Parser;

use crate::dns::{self, Query};

/// TTL of a template record that names none, as CoreDNS's zone-file reader defaults it.
const DEFAULT_TTL: u32 = 3600;

/// The question of `q` (lowercased) as hickory's type.
pub fn question(q: &Query) -> Option<Question> {
    Question::read(&mut BinDecoder::new(q.question_lower())).ok()
}

/// A reply to `q`: the records of each section, `rcode`, AA when `authoritative`, RD as the
/// client set it and RA. None when the records do not fit a message.
pub fn reply(
    q: &Query,
    rcode: u8,
    authoritative: bool,
    answers: Vec<Record>,
    authority: Vec<Record>,
    additional: Vec<Record>,
) -> Option<Vec<u8>> {
    let mut m = Message::response(0, OpCode::Query);
    m.metadata.authoritative = authoritative;
    m.metadata.recursion_desired = q.flags & dns::FLAG_RD != 0;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = q.checking_disabled();
    m.metadata.response_code = ResponseCode::from_low(rcode);
    m.add_query(question(q)?);
    m.answers = answers;
    m.authorities = authority;
    m.additionals = additional;
    let wire = m.to_vec().ok()?;
    (wire.len() <= u16::MAX as usize).then_some(wire)
}

/// Parses one record in zone-file form ("NAME [TTL] [CLASS] TYPE RDATA"), names relative to
/// the root, TTL 3600 when none is given. Directives (`$INCLUDE`, `$ORIGIN`...) and more than one
/// line are refused: the text may carry parts of a client's query name.
pub fn parse_record(text: &str) -> Result<Record, String> {
    let line = text.trim();
    if line.starts_with('$') || line.contains(['\n', '\r']) {
        return Err(format!("not a single record: {line:?}"));
    }
    let zone = format!("$TTL {DEFAULT_TTL}\n{line}\n");
    let (_, sets) = Parser::new(zone.as_str(), None, Some(Name::root()))
        .parse()
        .map_err(|e| format!("invalid record {line:?}: {e}"))?;
    let mut records = sets
        .values()
        .flat_map(|set| set.records_without_rrsigs().cloned());
    match (records.next(), records.next()) {
        (Some(r), None) => Ok(r),
        _ => Err(format!("not a single record: {line:?}")),
    }
}

/// `q` asked under `name` (lowercase wire form): the same ID, flags, type, class and EDNS.
/// None when the name is not a valid wire name.
pub fn requery(q: &Query, name: &[u8]) -> Option<Query> {
    if name.len() > dns::MAX_NAME_LEN || name.last() != Some(&0) {
        return None;
    }
    let mut pkt = Vec::with_capacity(dns::HEADER_LEN + name.len() + 4 + dns::OPT_LEN);
    pkt.extend_from_slice(&q.id.to_be_bytes());
    pkt.extend_from_slice(&(q.flags & !dns::FLAG_QR).to_be_bytes());
    pkt.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, q.edns.is_some() as u8]);
    pkt.extend_from_slice(name);
    pkt.extend_from_slice(&q.qtype.to_be_bytes());
    pkt.extend_from_slice(&q.qclass.to_be_bytes());
    if let Some(e) = q.edns {
        dns::push_opt(&mut pkt, e.udp_size, e.dnssec_ok, 0);
    }
    dns::parse_query(&pkt).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{RData, RecordType};

    #[test]
    fn parses_a_record_with_defaults_and_refuses_directives() {
        let r = parse_record("a.example. IN A 192.0.2.1").unwrap();
        assert_eq!(r.record_type(), RecordType::A);
        assert_eq!(r.ttl, DEFAULT_TTL);
        assert_eq!(r.name.to_ascii(), "a.example.");
        let r = parse_record("b.example 60 CNAME c.example.").unwrap();
        assert_eq!(r.ttl, 60);
        assert!(matches!(r.data, RData::CNAME(_)));
        assert!(parse_record("$INCLUDE /etc/passwd").is_err());
        assert!(parse_record("a.example. IN A 1.2.3.4\nb. IN A 1.2.3.5").is_err());
        assert!(parse_record("a.example. IN A notanaddress").is_err());
        assert!(parse_record("").is_err());
    }

    #[test]
    fn requery_keeps_everything_but_the_name() {
        let mut pkt = vec![0xab, 0xcd, 0x01, 0x10, 0, 1, 0, 0, 0, 0, 0, 1];
        pkt.extend_from_slice(&dns::name_from_str("a.example").unwrap());
        pkt.extend_from_slice(&[0, 28, 0, 1]);
        dns::push_opt(&mut pkt, 1232, true, 0);
        let q = dns::parse_query(&pkt).unwrap();
        let r = requery(&q, &dns::name_from_str("b.other.example").unwrap()).unwrap();
        assert_eq!(r.qname_string(), "b.other.example.");
        assert_eq!((r.id, r.flags, r.qtype, r.qclass), (q.id, q.flags, 28, 1));
        assert_eq!(r.edns, q.edns);
        assert!(requery(&q, &[200]).is_none());
    }

    #[test]
    fn reply_carries_the_question_and_sections() {
        let mut pkt = vec![0, 1, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        pkt.extend_from_slice(&dns::name_from_str("a.example").unwrap());
        pkt.extend_from_slice(&[0, 1, 0, 1]);
        let q = dns::parse_query(&pkt).unwrap();
        let rec = parse_record("a.example. 30 IN A 192.0.2.7").unwrap();
        let wire = reply(&q, 0, true, vec![rec], vec![], vec![]).unwrap();
        let resp = dns::parse_response(&wire, q.question_lower()).unwrap();
        assert_eq!(resp.kind, dns::AnswerKind::Positive);
        assert_eq!(resp.min_ttl, Some(30));
        assert_ne!(dns::u16_at(&wire, 2) & dns::FLAG_AA, 0);
    }
}
