//! Static address records (`[[hosts]]`), as CoreDNS's `hosts` plugin answers them: A and AAAA
//! by name (a `*.` first label matches any one label), PTR from the addresses, NODATA for a
//! name that has entries but none of the asked type, and for a name in the zones without any
//! entry NXDOMAIN or, where `fallthrough` says so, the upstreams.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{Name, RData, Record};

use super::config::HostsSection;
use super::{invalid, zone_list, Fallthrough, Made};
use crate::config::error::ConfigError;
use crate::dns::{self, Query};

const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const TYPE_AAAA: u16 = 28;

/// One `[[hosts]]` section, built.
#[derive(Debug)]
pub struct Hosts {
    /// Zones the entries answer for (lowercase wire names).
    zones: Vec<Vec<u8>>,
    ttl: u32,
    fallthrough: Fallthrough,
    /// Addresses by lowercase wire name; wildcard names (`*.x`) are kept as written.
    names: HashMap<Vec<u8>, Vec<IpAddr>>,
    /// Names by address, for PTR; empty with `no_reverse`.
    reverse: HashMap<IpAddr, Vec<Vec<u8>>>,
    /// The file the entries were read from besides the inline ones, with its modification time.
    pub file: Option<(PathBuf, Option<SystemTime>)>,
    /// Entries (name-address pairs) inline and from the file, for `coredns_hosts_entries`.
    pub entries: usize,
}

/// An address and its names (lowercase wire form), one line of /etc/hosts.
type Line = (IpAddr, Vec<Vec<u8>>);

/// One line in /etc/hosts form, parsed (None: blank or a comment), or why it is refused.
fn parse_line(line: &str) -> Result<Option<Line>, String> {
    let line = line.split('#').next().unwrap_or("");
    let mut fields = line.split_whitespace();
    let Some(addr) = fields.next() else {
        return Ok(None);
    };
    // An IPv6 address may carry a zone ("fe80::1%eth0"): the address is what is answered.
    let ip: IpAddr = addr
        .split('%')
        .next()
        .unwrap_or(addr)
        .parse()
        .map_err(|_| format!("invalid address {addr:?}"))?;
    let names: Vec<Vec<u8>> = fields
        .map(|n| dns::name_from_str(n).ok_or_else(|| format!("invalid name {n:?}")))
        .collect::<Result<_, _>>()?;
    if names.is_empty() {
        return Err(format!("address {addr:?} without a name"));
    }
    Ok(Some((ip, names)))
}

/// The name with its first label replaced by `*`, for wildcard entries; None for the root.
fn wildcard_of(name: &[u8]) -> Option<Vec<u8>> {
    let first = *name.first()? as usize;
    if first == 0 {
        return None;
    }
    let mut w = vec![1, b'*'];
    w.extend_from_slice(name.get(1 + first..)?);
    Some(w)
}

/// The address a reverse name stands for ("4.3.2.1.in-addr.arpa.", nibbles under "ip6.arpa.").
pub fn reverse_address(name: &[u8]) -> Option<IpAddr> {
    let text = dns::name_to_string(name);
    if let Some(v4) = text.strip_suffix(".in-addr.arpa.") {
        let octets: Vec<u8> = v4
            .split('.')
            .rev()
            .map(|o| o.parse().ok())
            .collect::<Option<_>>()?;
        let o: [u8; 4] = octets.try_into().ok()?;
        return Some(IpAddr::from(o));
    }
    let v6 = text.strip_suffix(".ip6.arpa.")?;
    let nibbles: Vec<u8> = v6
        .split('.')
        .rev()
        .map(|n| match n.len() {
            1 => u8::from_str_radix(n, 16).ok(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut o = [0u8; 16];
    for (i, pair) in nibbles.chunks(2).enumerate() {
        o[i] = (pair[0] << 4) | pair[1];
    }
    Some(IpAddr::from(o))
}

impl Hosts {
    /// Builds `hosts[i]` (`key`), reading its file.
    pub fn build(key: &str, s: &HostsSection) -> Result<Hosts, ConfigError> {
        let zones = zone_list(&format!("{key}.zones"), &s.zones)?;
        let ttl = s.ttl.as_secs();
        if ttl == 0 || ttl > 65535 {
            return Err(invalid(
                format!("{key}.ttl"),
                "must be between 1s and 65535s",
            ));
        }
        let fallthrough = Fallthrough::build(&format!("{key}.fallthrough"), &s.fallthrough)?;
        let mut h = Hosts {
            zones,
            ttl: ttl as u32,
            fallthrough,
            names: HashMap::new(),
            reverse: HashMap::new(),
            file: None,
            entries: 0,
        };
        if let Some(path) = &s.file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    format!("{key}.file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            // A hosts file is the system's: lines we cannot read are skipped, as CoreDNS does.
            for line in text.lines() {
                if let Ok(Some((ip, names))) = parse_line(line) {
                    h.add(ip, names, !s.no_reverse);
                }
            }
            let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            h.file = Some((path.clone(), mtime));
        }
        for (i, line) in s.entries.iter().enumerate() {
            match parse_line(line) {
                Ok(Some((ip, names))) => h.add(ip, names, !s.no_reverse),
                Ok(None) => {}
                Err(reason) => return Err(invalid(format!("{key}.entries[{i}]"), reason)),
            }
        }
        Ok(h)
    }

    /// Adds the names of one line; names outside the zones are left out, as CoreDNS does.
    fn add(&mut self, ip: IpAddr, names: Vec<Vec<u8>>, reverse: bool) {
        for name in names {
            if !self.zones.iter().any(|z| dns::name_in_zone(&name, z)) {
                continue;
            }
            let addrs = self.names.entry(name.clone()).or_default();
            if addrs.contains(&ip) {
                continue;
            }
            addrs.push(ip);
            self.entries += 1;
            if reverse && !name.starts_with(b"\x01*") {
                self.reverse.entry(ip).or_default().push(name);
            }
        }
    }

    fn addresses(&self, name: &[u8]) -> &[IpAddr] {
        if let Some(a) = self.names.get(name) {
            return a;
        }
        wildcard_of(name)
            .and_then(|w| self.names.get(&w))
            .map_or(&[], Vec::as_slice)
    }

    /// What this section makes of `q`, or None to let the next source answer.
    pub fn answer(&self, q: &Query) -> Option<Made> {
        let qname = q.qname_lower();
        if q.qtype != TYPE_PTR && !self.zones.iter().any(|z| dns::name_in_zone(qname, z)) {
            return None;
        }
        let owner = Name::from_ascii(dns::name_to_string(qname)).ok()?;
        if q.qtype == TYPE_PTR {
            // PTR names need not be in the zones; an address without entries goes on.
            let names = reverse_address(qname).and_then(|ip| self.reverse.get(&ip))?;
            let records = names
                .iter()
                .filter_map(|n| Name::from_ascii(dns::name_to_string(n)).ok())
                .map(|n| Record::from_rdata(owner.clone(), self.ttl, RData::PTR(PTR(n))))
                .collect();
            return Some(Made::records(records));
        }
        let addrs = self.addresses(qname);
        let records: Vec<Record> = addrs
            .iter()
            .filter_map(|ip| match (q.qtype, ip) {
                (TYPE_A, IpAddr::V4(v4)) => Some(RData::A(A(*v4))),
                (TYPE_AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|rdata| Record::from_rdata(owner.clone(), self.ttl, rdata))
            .collect();
        if !records.is_empty() {
            return Some(Made::records(records));
        }
        if !addrs.is_empty() {
            // The name exists, not with this type: NODATA.
            return Some(Made::records(vec![]));
        }
        if self.fallthrough.through(qname) {
            return None;
        }
        Some(Made::rcode(dns::RCODE_NXDOMAIN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::tests::query;

    fn hosts(entries: &[&str], fallthrough: Option<Vec<&str>>) -> Hosts {
        let s = HostsSection {
            zones: vec!["example.".into()],
            entries: entries.iter().map(|e| e.to_string()).collect(),
            fallthrough: fallthrough.map(|v| v.iter().map(|z| z.to_string()).collect()),
            ..HostsSection::default()
        };
        Hosts::build("hosts[0]", &s).unwrap()
    }

    fn rdata(m: &Made) -> Vec<String> {
        m.answers.iter().map(|r| r.data.to_string()).collect()
    }

    #[test]
    fn answers_a_and_aaaa_by_name_and_nodata_for_the_other_type() {
        let h = hosts(
            &[
                "192.0.2.1 web.example www.example",
                "2001:db8::1 web.example",
            ],
            None,
        );
        assert_eq!(h.entries, 3);
        let m = h.answer(&query("WEB.example", 1)).unwrap();
        assert_eq!(rdata(&m), ["192.0.2.1"]);
        assert_eq!(m.answers[0].ttl, 3600);
        assert_eq!(
            rdata(&h.answer(&query("web.example", 28)).unwrap()),
            ["2001:db8::1"]
        );
        let m = h.answer(&query("www.example", 28)).unwrap();
        assert!(
            m.answers.is_empty() && m.rcode == dns::RCODE_NOERROR,
            "NODATA"
        );
        let m = h.answer(&query("web.example", 16)).unwrap();
        assert!(
            m.answers.is_empty() && m.rcode == dns::RCODE_NOERROR,
            "NODATA for TXT"
        );
    }

    #[test]
    fn unknown_names_get_nxdomain_or_fall_through_by_zone() {
        let h = hosts(&["192.0.2.1 web.example"], None);
        assert_eq!(
            h.answer(&query("nope.example", 1)).unwrap().rcode,
            dns::RCODE_NXDOMAIN
        );
        assert!(
            h.answer(&query("web.other", 1)).is_none(),
            "outside the zones"
        );
        let h = hosts(&["192.0.2.1 web.example"], Some(vec![]));
        assert!(h.answer(&query("nope.example", 1)).is_none());
        let h = hosts(&["192.0.2.1 web.example"], Some(vec!["sub.example"]));
        assert!(h.answer(&query("a.sub.example", 1)).is_none());
        assert_eq!(
            h.answer(&query("a.example", 1)).unwrap().rcode,
            dns::RCODE_NXDOMAIN
        );
    }

    #[test]
    fn ptr_from_addresses_unless_no_reverse() {
        let h = hosts(&["192.0.2.1 web.example", "2001:db8::1 six.example"], None);
        let m = h.answer(&query("1.2.0.192.in-addr.arpa", 12)).unwrap();
        assert_eq!(rdata(&m), ["web.example."]);
        let v6 = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa";
        assert_eq!(rdata(&h.answer(&query(v6, 12)).unwrap()), ["six.example."]);
        assert!(h.answer(&query("2.2.0.192.in-addr.arpa", 12)).is_none());
        let s = HostsSection {
            entries: vec!["192.0.2.1 web.example".into()],
            no_reverse: true,
            ..HostsSection::default()
        };
        let h = Hosts::build("hosts[0]", &s).unwrap();
        assert!(h.answer(&query("1.2.0.192.in-addr.arpa", 12)).is_none());
    }

    #[test]
    fn wildcards_match_one_label_and_names_outside_the_zones_are_dropped() {
        let h = hosts(&["192.0.2.9 *.w.example outside.org"], None);
        assert_eq!(
            rdata(&h.answer(&query("a.w.example", 1)).unwrap()),
            ["192.0.2.9"]
        );
        assert_eq!(
            h.answer(&query("a.b.w.example", 1)).unwrap().rcode,
            dns::RCODE_NXDOMAIN
        );
        assert_eq!(h.entries, 1);
    }

    #[test]
    fn bad_entries_are_refused_naming_the_key() {
        let s = HostsSection {
            entries: vec!["192.0.2.1 ok.example".into(), "# c".into(), "x y".into()],
            ..HostsSection::default()
        };
        let e = Hosts::build("hosts[0]", &s).unwrap_err().to_string();
        assert_eq!(e, "hosts[0].entries[2]: invalid address \"x\"");
        let s = HostsSection {
            entries: vec!["192.0.2.1".into()],
            ..HostsSection::default()
        };
        let e = Hosts::build("hosts[1]", &s).unwrap_err().to_string();
        assert!(e.starts_with("hosts[1].entries[0]: "), "{e}");
        let s = HostsSection {
            file: Some("/nonexistent/hosts".into()),
            ..HostsSection::default()
        };
        let e = Hosts::build("hosts[0]", &s).unwrap_err().to_string();
        assert!(
            e.starts_with("hosts[0].file: cannot read /nonexistent/hosts"),
            "{e}"
        );
    }

    #[test]
    fn file_entries_are_read_and_junk_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(
            &path,
            "127.0.0.1 localhost\nbogus line\n10.0.0.5 db.example # c\n",
        )
        .unwrap();
        let s = HostsSection {
            file: Some(path),
            ..HostsSection::default()
        };
        let h = Hosts::build("hosts[0]", &s).unwrap();
        assert_eq!(h.entries, 2);
        assert_eq!(
            rdata(&h.answer(&query("db.example", 1)).unwrap()),
            ["10.0.0.5"]
        );
        assert!(h.file.as_ref().unwrap().1.is_some());
    }
}
