//! DNS wire helpers for the hot path: parse a query without allocating, walk an upstream
//! response to find its TTL fields, build upstream queries and short error replies.
//!
//! hickory-proto is deliberately not used here: a full decode allocates per record, and a cache
//! hit needs only the header, the one question and the OPT record (see docs/ARCHITECTURE.md).

use std::fmt;

pub const HEADER_LEN: usize = 12;
pub const MAX_NAME_LEN: usize = 255;
/// Smallest UDP payload every DNS client accepts (RFC 1035 §4.2.1).
pub const MIN_UDP_SIZE: u16 = 512;

pub const TYPE_SOA: u16 = 6;
pub const TYPE_OPT: u16 = 41;
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;
const TYPE_MAILB: u16 = 253;
const TYPE_MAILA: u16 = 254;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;
/// Extended rcode 16 (RFC 6891 §6.1.3): the client asked for an EDNS version we do not speak.
pub const RCODE_BADVERS: u16 = 16;

// Header flag bits (second 16-bit word of the header).
pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_TC: u16 = 0x0200;
pub const FLAG_RD: u16 = 0x0100;
pub const FLAG_RA: u16 = 0x0080;
pub const FLAG_CD: u16 = 0x0010;
const OPCODE_MASK: u16 = 0x7800;
/// DO bit in the OPT record's TTL field (RFC 3225).
const EDNS_DO: u32 = 0x8000;

/// Length of the OPT record we append to replies: root name, type, class, ttl, rdlen.
pub const OPT_LEN: usize = 11;

#[inline]
pub fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[inline]
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[inline]
fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// The EDNS part of a client query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    /// Advertised UDP payload size, already raised to 512 when smaller (RFC 6891 §6.2.3).
    pub udp_size: u16,
    pub dnssec_ok: bool,
    pub version: u8,
}

/// A client query, parsed without allocating. The question is kept lowercased for the cache key;
/// the client's own bytes (case preserved) stay in the packet at `12..question_end`.
#[derive(Clone, Copy)]
pub struct Query {
    pub id: u16,
    pub flags: u16,
    pub qtype: u16,
    pub qclass: u16,
    /// Offset just past QCLASS.
    pub question_end: usize,
    pub edns: Option<Edns>,
    /// Lowercased question: wire qname, QTYPE and QCLASS.
    lower: [u8; MAX_NAME_LEN + 4],
    lower_len: u16,
}

impl Query {
    /// Lowercased wire question (qname, qtype, qclass): what cache entries are compared against.
    #[inline]
    pub fn question_lower(&self) -> &[u8] {
        &self.lower[..self.lower_len as usize]
    }

    /// Lowercased wire qname only.
    #[inline]
    pub fn qname_lower(&self) -> &[u8] {
        &self.lower[..self.lower_len as usize - 4]
    }

    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }

    pub fn checking_disabled(&self) -> bool {
        self.flags & FLAG_CD != 0
    }

    /// The cache-key bits besides the question: DO and CD.
    #[inline]
    pub fn key_flags(&self) -> u8 {
        (self.dnssec_ok() as u8) | ((self.checking_disabled() as u8) << 1)
    }

    /// Largest UDP reply this client accepts, bounded by what we advertise ourselves.
    pub fn max_udp_reply(&self, our_size: u16) -> usize {
        match self.edns {
            Some(e) => e.udp_size.min(our_size.max(MIN_UDP_SIZE)) as usize,
            None => MIN_UDP_SIZE as usize,
        }
    }

    /// The qname in presentation form, for logs and metrics labels (allocates; off the hot path).
    pub fn qname_string(&self) -> String {
        name_to_string(self.qname_lower())
    }
}

impl fmt::Debug for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Query")
            .field("id", &self.id)
            .field("qname", &self.qname_string())
            .field("qtype", &self.qtype)
            .field("edns", &self.edns)
            .finish()
    }
}

/// Why a packet cannot be answered normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Not a query we can reply to at all (short header, or a response): drop it silently.
    Drop,
    /// Answer with this rcode (header-only reply carrying the client's ID).
    Rcode(u8),
    /// EDNS version above 0: answer BADVERS with an OPT record (RFC 6891 §6.1.3).
    BadVers,
}

/// Parses a client query. Never panics, whatever the bytes.
pub fn parse_query(pkt: &[u8]) -> Result<Query, Reject> {
    if pkt.len() < HEADER_LEN {
        return Err(Reject::Drop);
    }
    let flags = u16_at(pkt, 2);
    if flags & FLAG_QR != 0 {
        // Never answer a response: two servers would bounce it forever.
        return Err(Reject::Drop);
    }
    if flags & OPCODE_MASK != 0 {
        return Err(Reject::Rcode(RCODE_NOTIMP));
    }
    if u16_at(pkt, 4) != 1 || u16_at(pkt, 6) != 0 || u16_at(pkt, 8) != 0 {
        return Err(Reject::Rcode(RCODE_FORMERR));
    }
    let mut q = Query {
        id: u16_at(pkt, 0),
        flags,
        qtype: 0,
        qclass: 0,
        question_end: 0,
        edns: None,
        lower: [0; MAX_NAME_LEN + 4],
        lower_len: 0,
    };
    // Question name: plain labels only (a compression pointer has nothing before it to point to).
    let mut pos = HEADER_LEN;
    loop {
        let len = *pkt.get(pos).ok_or(Reject::Rcode(RCODE_FORMERR))? as usize;
        if len & 0xC0 != 0 {
            return Err(Reject::Rcode(RCODE_FORMERR));
        }
        let name_len = pos - HEADER_LEN;
        if name_len + 1 + len > MAX_NAME_LEN {
            return Err(Reject::Rcode(RCODE_FORMERR));
        }
        let label = pkt
            .get(pos..pos + 1 + len)
            .ok_or(Reject::Rcode(RCODE_FORMERR))?;
        for (dst, src) in q.lower[name_len..name_len + 1 + len].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        pos += 1 + len;
        if len == 0 {
            break;
        }
    }
    let name_len = pos - HEADER_LEN;
    let tail = pkt.get(pos..pos + 4).ok_or(Reject::Rcode(RCODE_FORMERR))?;
    q.qtype = u16_at(tail, 0);
    q.qclass = u16_at(tail, 2);
    q.lower[name_len..name_len + 4].copy_from_slice(tail);
    q.lower_len = (name_len + 4) as u16;
    pos += 4;
    q.question_end = pos;
    if matches!(q.qtype, TYPE_IXFR | TYPE_AXFR | TYPE_MAILB | TYPE_MAILA) {
        // Zone transfers and obsolete meta types have no place in a caching forwarder.
        return Err(Reject::Rcode(RCODE_NOTIMP));
    }
    // Additional section: find the OPT record; any other record (TSIG...) is hop-specific and ignored.
    let arcount = u16_at(pkt, 10);
    for _ in 0..arcount {
        let name_start = pos;
        pos = skip_name(pkt, pos).ok_or(Reject::Rcode(RCODE_FORMERR))?;
        let fixed = pkt.get(pos..pos + 10).ok_or(Reject::Rcode(RCODE_FORMERR))?;
        let rtype = u16_at(fixed, 0);
        let rdlen = u16_at(fixed, 8) as usize;
        if rtype == TYPE_OPT {
            if q.edns.is_some() || pos != name_start + 1 {
                // Two OPT records, or an OPT not owned by the root (RFC 6891 §6.1.1).
                return Err(Reject::Rcode(RCODE_FORMERR));
            }
            let ttl = u32_at(fixed, 4);
            let version = (ttl >> 16) as u8;
            q.edns = Some(Edns {
                udp_size: u16_at(fixed, 2).max(MIN_UDP_SIZE),
                dnssec_ok: ttl & EDNS_DO != 0,
                version,
            });
            if version != 0 {
                return Err(Reject::BadVers);
            }
        }
        pos += 10;
        if pkt.len() < pos + rdlen {
            return Err(Reject::Rcode(RCODE_FORMERR));
        }
        pos += rdlen;
    }
    Ok(q)
}

/// The end of the one question of `pkt`, when its header says one and it can be read: what an
/// error reply echoes. Plain labels only, as in a query.
pub fn question_end(pkt: &[u8]) -> Option<usize> {
    if pkt.len() < HEADER_LEN || u16_at(pkt, 4) != 1 {
        return None;
    }
    let mut pos = HEADER_LEN;
    loop {
        let len = *pkt.get(pos)? as usize;
        if len & 0xC0 != 0 || pos - HEADER_LEN + 1 + len > MAX_NAME_LEN {
            return None;
        }
        pos += 1 + len;
        if len == 0 {
            break;
        }
    }
    (pkt.len() >= pos + 4).then_some(pos + 4)
}

/// Where the additional section of the message `msg` starts, if it can be walked.
pub fn additional_start(msg: &[u8]) -> Option<usize> {
    if msg.len() < HEADER_LEN {
        return None;
    }
    let mut pos = HEADER_LEN;
    for _ in 0..u16_at(msg, 4) {
        pos = skip_name(msg, pos)? + 4;
    }
    for _ in 0..(u16_at(msg, 6) as usize + u16_at(msg, 8) as usize) {
        let p = skip_name(msg, pos)?;
        let fixed = msg.get(p..p + 10)?;
        pos = p + 10 + u16_at(fixed, 8) as usize;
    }
    (pos <= msg.len()).then_some(pos)
}

/// Skips a possibly compressed name starting at `pos`; returns the offset after it in the record.
pub fn skip_name(pkt: &[u8], mut pos: usize) -> Option<usize> {
    let mut total = 0usize;
    loop {
        let len = *pkt.get(pos)? as usize;
        match len & 0xC0 {
            0x00 => {
                pos += 1 + len;
                total += 1 + len;
                if total > MAX_NAME_LEN || pos > pkt.len() {
                    return None;
                }
                if len == 0 {
                    return Some(pos);
                }
            }
            0xC0 => {
                // A pointer ends the name in this record; its target is checked by `name_ok`.
                pkt.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
}

/// Follows a compressed name fully, checking every pointer goes backwards and the name is short
/// enough. Used on upstream answers so a hostile upstream cannot make us cache a loop.
fn name_ok(pkt: &[u8], mut pos: usize) -> bool {
    let mut total = 0usize;
    let mut hops = 0;
    loop {
        let Some(&len) = pkt.get(pos) else {
            return false;
        };
        let len = len as usize;
        match len & 0xC0 {
            0x00 => {
                total += 1 + len;
                if total > MAX_NAME_LEN || pos + 1 + len > pkt.len() {
                    return false;
                }
                if len == 0 {
                    return true;
                }
                pos += 1 + len;
            }
            0xC0 => {
                let Some(&lo) = pkt.get(pos + 1) else {
                    return false;
                };
                let target = ((len & 0x3F) << 8) | lo as usize;
                hops += 1;
                if target >= pos || hops > 64 {
                    return false;
                }
                pos = target;
            }
            _ => return false,
        }
    }
}

/// Converts a wire name to presentation form ("www.example.com.").
pub fn name_to_string(wire: &[u8]) -> String {
    let mut out = String::new();
    let mut pos = 0;
    while let Some(&len) = wire.get(pos) {
        let len = len as usize;
        if len == 0 || len & 0xC0 != 0 {
            break;
        }
        let Some(label) = wire.get(pos + 1..pos + 1 + len) else {
            break;
        };
        for &c in label {
            if c.is_ascii_graphic() && c != b'.' && c != b'\\' {
                out.push(c as char);
            } else {
                out.push_str(&format!("\\{c:03}"));
            }
        }
        out.push('.');
        pos += 1 + len;
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// Encodes a presentation-form name ("cluster.local", "cluster.local.", ".") to lowercase wire form.
pub fn name_from_str(name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len() + 2);
    let trimmed = name.trim_end_matches('.');
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME_LEN).then_some(out)
}

/// True when the wire name `name` equals `zone` or lies below it (both lowercase wire names).
pub fn name_in_zone(name: &[u8], zone: &[u8]) -> bool {
    if zone.len() > name.len() {
        return false;
    }
    // Walk label boundaries of `name` until the remaining suffix has the zone's length.
    let mut pos = 0;
    while name.len() - pos > zone.len() {
        pos += 1 + name[pos] as usize;
    }
    name.len() - pos == zone.len() && &name[pos..] == zone
}

/// The length of the first message of a DNS-over-TCP stream (RFC 1035 §4.2.2: a two-byte length,
/// then the message) when `buf` holds all of it; None while it is incomplete.
pub fn tcp_frame_len(buf: &[u8]) -> Option<usize> {
    let len = u16::from_be_bytes([*buf.first()?, *buf.get(1)?]) as usize;
    (buf.len() >= 2 + len).then_some(len)
}

/// Appends an upstream query for `q` to `out`: our own ID, RD and CD as the client set them, the
/// lowercased question and an OPT record advertising `udp_size` with the client's DO bit.
pub fn write_upstream_query(q: &Query, id: u16, udp_size: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(q.flags & (FLAG_RD | FLAG_CD)).to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    out.extend_from_slice(q.question_lower());
    push_opt(out, udp_size, q.dnssec_ok(), 0);
}

/// Appends an OPT record (RFC 6891) without options.
pub fn push_opt(out: &mut Vec<u8>, udp_size: u16, dnssec_ok: bool, ext_rcode: u8) {
    let ttl: u32 = ((ext_rcode as u32) << 24) | if dnssec_ok { EDNS_DO } else { 0 };
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&udp_size.to_be_bytes());
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
}

/// Extended DNS Error option (RFC 8914): code, length and the 2-byte INFO-CODE, no text.
pub const EDE_LEN: usize = 6;
const OPTION_EDE: u16 = 15;
/// INFO-CODE 3: the answer is stale (RFC 8767).
pub const EDE_STALE_ANSWER: u16 = 3;

/// Adds an Extended DNS Error option to the OPT record that ends `out` (as [`push_opt`] wrote
/// it, with no options yet).
pub fn add_ede(out: &mut Vec<u8>, info_code: u16) {
    let n = out.len();
    debug_assert!(n >= OPT_LEN && u16_at(out, n - OPT_LEN + 1) == TYPE_OPT);
    let rdlen = u16_at(out, n - 2) + EDE_LEN as u16;
    out[n - 2..].copy_from_slice(&rdlen.to_be_bytes());
    out.extend_from_slice(&OPTION_EDE.to_be_bytes());
    out.extend_from_slice(&2u16.to_be_bytes());
    out.extend_from_slice(&info_code.to_be_bytes());
}

/// Header-only (plus question, when parseable) error reply to a rejected or failed query.
///
/// `question` is the client's question bytes when known. `edns` adds our OPT record.
pub fn write_error_reply(
    pkt: &[u8],
    rcode: u16,
    question: Option<&[u8]>,
    edns: Option<(u16, bool)>,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(&pkt[..2]);
    let req_flags = u16_at(pkt, 2);
    let flags = FLAG_QR | (req_flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | FLAG_RA | (rcode & 0xF);
    out.extend_from_slice(&flags.to_be_bytes());
    let qd = question.is_some() as u16;
    let ar = edns.is_some() as u16;
    out.extend_from_slice(&[0, qd as u8, 0, 0, 0, 0, 0, ar as u8]);
    if let Some(qb) = question {
        out.extend_from_slice(qb);
    }
    if let Some((size, dnssec_ok)) = edns {
        push_opt(out, size, dnssec_ok, (rcode >> 4) as u8);
    }
}

/// Cuts a reply down to its header, question and OPT record, with TC=1 and the answer,
/// authority and other additional records gone: what a UDP responder sends when the full reply
/// cannot leave without IP fragmentation (RFC 9715 §3.2, R2), so the client retries over TCP.
/// A reply that cannot be walked keeps its header and question only (or just the header).
pub fn truncate_reply(reply: &mut Vec<u8>) {
    if reply.len() < HEADER_LEN {
        return;
    }
    let qd = u16_at(reply, 4) as usize;
    let counts = [u16_at(reply, 6), u16_at(reply, 8), u16_at(reply, 10)];
    // End of the question section, then the OPT record's range if the walk gets that far.
    let mut pos = Some(HEADER_LEN);
    for _ in 0..qd {
        pos = pos
            .and_then(|p| skip_name(reply, p))
            .map(|p| p + 4)
            .filter(|&p| p <= reply.len());
    }
    let qend = pos;
    let mut opt = None;
    let mut walk = pos;
    for i in 0..counts.iter().map(|&c| c as usize).sum::<usize>() {
        let Some(start) = walk else { break };
        let Some(p) = skip_name(reply, start).filter(|&p| p + 10 <= reply.len()) else {
            break;
        };
        let end = p + 10 + u16_at(reply, p + 8) as usize;
        if end > reply.len() {
            break;
        }
        if i >= (counts[0] + counts[1]) as usize && u16_at(reply, p) == TYPE_OPT {
            opt = Some(start..end);
        }
        walk = Some(end);
    }
    let flags = u16_at(reply, 2) | FLAG_TC;
    put_u16(reply, 2, flags);
    let (qd, qend) = match qend {
        Some(e) => (qd as u16, e),
        None => (0, HEADER_LEN),
    };
    put_u16(reply, 4, qd);
    put_u16(reply, 6, 0);
    put_u16(reply, 8, 0);
    put_u16(reply, 10, opt.is_some() as u16);
    if let Some(r) = opt {
        reply.copy_within(r.clone(), qend);
        reply.truncate(qend + r.len());
    } else {
        reply.truncate(qend);
    }
}

/// What kind of answer an upstream response is, for caching (RFC 2308).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnswerKind {
    /// NOERROR with records in the answer section.
    Positive,
    /// NXDOMAIN.
    NxDomain,
    /// NOERROR without answer records (NODATA).
    NoData,
    ServFail,
    /// Any other rcode (REFUSED, NOTIMP, FORMERR...): relayed, never cached.
    Other,
}

/// An upstream response after the walk: OPT stripped, question lowercased, every TTL located.
#[derive(Debug)]
pub struct Response {
    /// The response without its OPT record (and anything after it), ARCOUNT adjusted.
    pub wire: Vec<u8>,
    /// Offsets of every record's TTL field in `wire`.
    pub ttl_offsets: Vec<u16>,
    pub rcode: u8,
    pub truncated: bool,
    pub kind: AnswerKind,
    /// Smallest TTL over all records (None when there are none).
    pub min_ttl: Option<u32>,
    /// For negative answers: min(SOA TTL, SOA MINIMUM) from the authority section, if present.
    pub negative_ttl: Option<u32>,
    /// Offset of the authority SOA record's TTL, rewritten to the negative TTL when cached.
    pub soa_ttl_offset: Option<u16>,
}

/// Why an upstream response was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadResponse {
    #[error("response too short or malformed")]
    Malformed,
    #[error("not a response")]
    NotResponse,
    #[error("question does not match the query")]
    QuestionMismatch,
    #[error("extended rcode {0}")]
    ExtendedRcode(u16),
}

/// Walks an upstream response for `sent_question` (lowercased wire question we asked).
/// The ID has already been checked by the transport.
pub fn parse_response(resp: &[u8], sent_question: &[u8]) -> Result<Response, BadResponse> {
    if resp.len() < HEADER_LEN || resp.len() > u16::MAX as usize {
        return Err(BadResponse::Malformed);
    }
    let flags = u16_at(resp, 2);
    if flags & FLAG_QR == 0 {
        return Err(BadResponse::NotResponse);
    }
    if u16_at(resp, 4) != 1 {
        return Err(BadResponse::QuestionMismatch);
    }
    let qend = HEADER_LEN + sent_question.len();
    let Some(question) = resp.get(HEADER_LEN..qend) else {
        return Err(BadResponse::QuestionMismatch);
    };
    if !question.eq_ignore_ascii_case(sent_question) {
        return Err(BadResponse::QuestionMismatch);
    }
    let counts = [u16_at(resp, 6), u16_at(resp, 8), u16_at(resp, 10)];
    let mut wire = Vec::with_capacity(resp.len());
    wire.extend_from_slice(&resp[..HEADER_LEN]);
    wire.extend_from_slice(sent_question);
    let mut ttl_offsets = Vec::new();
    let mut min_ttl: Option<u32> = None;
    let mut negative_ttl = None;
    let mut soa_ttl_offset = None;
    let mut ext_rcode = 0u16;
    let mut arcount_kept = counts[2];
    let mut pos = qend;
    let mut cut = None;
    'sections: for (section, &count) in counts.iter().enumerate() {
        for i in 0..count {
            let start = pos;
            if !name_ok(resp, pos) {
                return Err(BadResponse::Malformed);
            }
            pos = skip_name(resp, pos).ok_or(BadResponse::Malformed)?;
            let fixed = resp.get(pos..pos + 10).ok_or(BadResponse::Malformed)?;
            let rtype = u16_at(fixed, 0);
            let ttl = u32_at(fixed, 4);
            let rdlen = u16_at(fixed, 8) as usize;
            let ttl_off = pos + 4;
            let rdata = pos + 10;
            if resp.len() < rdata + rdlen {
                return Err(BadResponse::Malformed);
            }
            pos = rdata + rdlen;
            if rtype == TYPE_OPT {
                if section != 2 {
                    return Err(BadResponse::Malformed);
                }
                ext_rcode = (ttl >> 24) as u16;
                // OPT is per hop: drop it and whatever follows it (TSIG/SIG(0) are per hop too).
                arcount_kept = i;
                cut = Some(start);
                break 'sections;
            }
            ttl_offsets.push(ttl_off as u16);
            min_ttl = Some(min_ttl.map_or(ttl, |m: u32| m.min(ttl)));
            if section == 1 && rtype == TYPE_SOA && negative_ttl.is_none() {
                // SOA rdata: mname, rname, serial, refresh, retry, expire, minimum.
                let minimum =
                    rdata_soa_minimum(resp, rdata, rdlen).ok_or(BadResponse::Malformed)?;
                negative_ttl = Some(ttl.min(minimum));
                soa_ttl_offset = Some(ttl_off as u16);
            }
        }
    }
    let end = cut.unwrap_or(pos);
    wire.extend_from_slice(&resp[qend..end]);
    put_u16(&mut wire, 10, arcount_kept);
    if ext_rcode != 0 {
        return Err(BadResponse::ExtendedRcode((ext_rcode << 4) | (flags & 0xF)));
    }
    let rcode = (flags & 0xF) as u8;
    let kind = match rcode {
        RCODE_NOERROR if counts[0] > 0 => AnswerKind::Positive,
        RCODE_NOERROR => AnswerKind::NoData,
        RCODE_NXDOMAIN => AnswerKind::NxDomain,
        RCODE_SERVFAIL => AnswerKind::ServFail,
        _ => AnswerKind::Other,
    };
    Ok(Response {
        wire,
        ttl_offsets,
        rcode,
        truncated: flags & FLAG_TC != 0,
        kind,
        min_ttl,
        negative_ttl,
        soa_ttl_offset,
    })
}

fn rdata_soa_minimum(resp: &[u8], rdata: usize, rdlen: usize) -> Option<u32> {
    let end = rdata + rdlen;
    let p = skip_name(resp, rdata)?;
    let p = skip_name(resp, p)?;
    (p + 20 == end).then(|| u32_at(resp, end - 4))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        if let Some((size, dnssec_ok)) = edns {
            p[11] = 1;
            push_opt(&mut p, size, dnssec_ok, 0);
        }
        p
    }

    #[test]
    fn parses_and_lowercases_question() {
        let p = query("WwW.ExAmple.COM", 1, Some((4096, true)));
        let q = parse_query(&p).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.qtype, 1);
        assert_eq!(q.qname_string(), "www.example.com.");
        assert_eq!(
            q.edns,
            Some(Edns {
                udp_size: 4096,
                dnssec_ok: true,
                version: 0
            })
        );
        assert_eq!(q.max_udp_reply(1232), 1232);
        assert_eq!(
            &p[12..q.question_end].to_ascii_lowercase()[..],
            q.question_lower()
        );
    }

    #[test]
    fn small_edns_size_is_raised_to_512() {
        let q = parse_query(&query("a.b", 1, Some((100, false)))).unwrap();
        assert_eq!(q.max_udp_reply(1232), 512);
        let q = parse_query(&query("a.b", 1, None)).unwrap();
        assert_eq!(q.max_udp_reply(1232), 512);
    }

    #[test]
    fn rejects_bad_queries() {
        assert_eq!(parse_query(&[1, 2, 3]).err(), Some(Reject::Drop));
        let mut p = query("a.b", 1, None);
        p[2] |= 0x80;
        assert_eq!(parse_query(&p).err(), Some(Reject::Drop));
        let mut p = query("a.b", 1, None);
        p[2] |= 0x10; // opcode 2 (STATUS)
        assert_eq!(parse_query(&p).err(), Some(Reject::Rcode(RCODE_NOTIMP)));
        let mut p = query("a.b", 1, None);
        p[5] = 2;
        assert_eq!(parse_query(&p).err(), Some(Reject::Rcode(RCODE_FORMERR)));
        let p = query("a.b", 1, None);
        assert_eq!(
            parse_query(&p[..p.len() - 1]).err(),
            Some(Reject::Rcode(RCODE_FORMERR))
        );
        let mut p = query("a.b", 1, Some((1232, false)));
        let n = p.len();
        p[n - 5] = 1; // EDNS version 1
        assert_eq!(parse_query(&p).err(), Some(Reject::BadVers));
        assert_eq!(
            parse_query(&query("a.b", TYPE_AXFR, None)).err(),
            Some(Reject::Rcode(RCODE_NOTIMP))
        );
    }

    #[test]
    fn never_panics_on_truncations_of_a_valid_query() {
        let p = query("some.name.example", 28, Some((1232, true)));
        for n in 0..p.len() {
            let _ = parse_query(&p[..n]);
        }
        for i in 0..p.len() {
            for v in [0u8, 0x3f, 0x40, 0xc0, 0xff] {
                let mut c = p.clone();
                c[i] = v;
                let _ = parse_query(&c);
                let _ = parse_response(&c, &p[12..]);
            }
        }
    }

    #[test]
    fn question_end_and_additional_start_walk_a_message_and_never_panic() {
        let p = query("some.name.example", 28, Some((1232, true)));
        let qend = HEADER_LEN + 19 + 4;
        assert_eq!(question_end(&p), Some(qend));
        // No answer or authority records: the additional section (the OPT) follows the question.
        assert_eq!(additional_start(&p), Some(qend));
        for n in 0..p.len() {
            let _ = additional_start(&p[..n]);
            assert_eq!(question_end(&p[..n]), (n >= qend).then_some(qend));
        }
        for i in 0..p.len() {
            for v in [0u8, 0x3f, 0x40, 0xc0, 0xff] {
                let mut c = p.clone();
                c[i] = v;
                let _ = (question_end(&c), additional_start(&c));
            }
        }
    }

    #[test]
    fn zone_membership_follows_label_boundaries() {
        let zone = name_from_str("cluster.local").unwrap();
        assert!(name_in_zone(
            &name_from_str("a.b.cluster.local.").unwrap(),
            &zone
        ));
        assert!(name_in_zone(
            &name_from_str("cluster.local").unwrap(),
            &zone
        ));
        assert!(!name_in_zone(
            &name_from_str("xcluster.local").unwrap(),
            &zone
        ));
        assert!(!name_in_zone(&name_from_str("local").unwrap(), &zone));
        assert!(name_in_zone(
            &name_from_str("anything").unwrap(),
            &name_from_str(".").unwrap()
        ));
    }

    #[test]
    fn truncated_reply_keeps_header_question_and_opt() {
        let q = parse_query(&query("big.example", 16, Some((4096, true)))).unwrap();
        let mut r = Vec::new();
        write_upstream_query(&q, 9, 4096, &mut r);
        r.truncate(HEADER_LEN + q.question_lower().len());
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2; // ANCOUNT: two TXT records of 255 bytes
        for _ in 0..2 {
            r.extend_from_slice(&[0xc0, 12]);
            r.extend_from_slice(&16u16.to_be_bytes()); // TXT
            r.extend_from_slice(&[0, 1, 0, 0, 0, 30, 1, 0, 255]);
            r.extend_from_slice(&[b'x'; 255]);
        }
        r[11] = 1;
        push_opt(&mut r, 1232, true, 0);
        let mut t = r.clone();
        truncate_reply(&mut t);
        let qend = HEADER_LEN + q.question_lower().len();
        assert_eq!(t.len(), qend + OPT_LEN);
        assert_eq!(&t[..2], &r[..2], "ID kept");
        assert_ne!(u16_at(&t, 2) & FLAG_TC, 0, "TC set");
        assert_eq!(&t[4..12], &[0, 1, 0, 0, 0, 0, 0, 1]);
        assert_eq!(&t[HEADER_LEN..qend], q.question_lower());
        assert_eq!(&t[qend..], &r[r.len() - OPT_LEN..], "OPT kept as it was");
        // No OPT: header and question only. Garbage after the question: the same.
        let mut t = r[..r.len() - OPT_LEN].to_vec();
        t[11] = 0;
        truncate_reply(&mut t);
        assert_eq!(t.len(), qend);
        let mut t = r[..qend + 7].to_vec();
        truncate_reply(&mut t);
        assert_eq!(t.len(), qend);
        assert_eq!(&t[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        // Every cut of the reply: no panic, never longer than header + question + OPT.
        for n in 0..r.len() {
            let mut t = r[..n].to_vec();
            truncate_reply(&mut t);
            assert!(t.len() <= qend + OPT_LEN);
        }
    }

    #[test]
    fn response_walk_strips_opt_and_finds_negative_ttl() {
        let q = parse_query(&query("nx.example", 1, Some((1232, false)))).unwrap();
        let mut r = Vec::new();
        write_upstream_query(&q, 7, 1232, &mut r);
        // Turn it into an NXDOMAIN response with an SOA in authority and an OPT.
        r.truncate(HEADER_LEN + q.question_lower().len());
        r[2] = 0x81;
        r[3] = 0x83;
        r[9] = 1; // NSCOUNT
        r[11] = 1; // ARCOUNT
        let soa_name = [7u8, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0];
        r.extend_from_slice(&soa_name);
        r.extend_from_slice(&TYPE_SOA.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&300u32.to_be_bytes());
        let mut rdata = vec![0u8, 0u8]; // mname ".", rname "."
        for v in [1u32, 2, 3, 4, 60] {
            rdata.extend_from_slice(&v.to_be_bytes());
        }
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
        push_opt(&mut r, 1232, false, 0);
        let resp = parse_response(&r, q.question_lower()).unwrap();
        assert_eq!(resp.kind, AnswerKind::NxDomain);
        assert_eq!(resp.negative_ttl, Some(60));
        assert_eq!(resp.ttl_offsets.len(), 1);
        assert_eq!(u16_at(&resp.wire, 10), 0, "OPT removed from ARCOUNT");
        assert_eq!(resp.wire.len(), r.len() - OPT_LEN);
        assert_eq!(
            parse_response(&r, &query("other.example", 1, None)[12..]).err(),
            Some(BadResponse::QuestionMismatch)
        );
    }
}
