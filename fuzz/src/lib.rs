//! Helpers the fuzz targets share. Each target is one file in `src/bin/` (see README.md).

use nodedns::dns;

/// A query packet for `question` (name, type and class on the wire) with the given ID and
/// flags, and an OPT record when `edns` is given (size, DO).
pub fn query_packet(id: u16, flags: u16, question: &[u8], edns: Option<(u16, bool)>) -> Vec<u8> {
    let mut p = Vec::with_capacity(dns::HEADER_LEN + question.len() + dns::OPT_LEN);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, edns.is_some() as u8]);
    p.extend_from_slice(question);
    if let Some((size, dnssec_ok)) = edns {
        dns::push_opt(&mut p, size, dnssec_ok, 0);
    }
    p
}

/// Splits off the first `n` bytes of `data` (fewer when it is shorter).
pub fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = data.split_at(n.min(data.len()));
    *data = tail;
    head
}

/// One byte of `data` (0 when it is empty).
pub fn byte(data: &mut &[u8]) -> u8 {
    take(data, 1).first().copied().unwrap_or(0)
}
