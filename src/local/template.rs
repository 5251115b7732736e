//! Synthesized answers (`[[template]]`), as CoreDNS's `template` plugin makes them: a template
//! applies to a query of its class and type in its zones whose name one of its regular
//! expressions matches; its records are rendered from zone-file text with placeholders.
//!
//! The placeholders are the subset of Go's template syntax that depends on the query alone:
//! `{{ .Name }}`, `{{ .Zone }}`, `{{ .Class }}`, `{{ .Type }}`, `{{ index .Match N }}` and
//! `{{ .Group.NAME }}`; anything else is refused when the configuration is read.
//!
//! Templates are tried in order. One whose zone, class or type does not fit is passed over; one
//! whose expressions do not match passes the query on when its `fallthrough` covers the name,
//! and answers SERVFAIL otherwise (as CoreDNS does). A name in none of the templates' zones goes
//! on to the hosts entries and the upstreams.

use std::str::FromStr;

use hickory_proto::rr::{DNSClass, Record, RecordType};
use regex::Regex;

use super::config::TemplateSection;
use super::{invalid, wire, zone_list, Fallthrough, Made};
use crate::config::error::ConfigError;
use crate::dns::{self, Query};

/// Longest regular expression accepted, as CoreDNS bounds it.
const MAX_REGEX_LEN: usize = 10_000;

/// A piece of a record's text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Name,
    Zone,
    Class,
    Type,
    Match(usize),
    Group(String),
}

/// A record's text with its placeholders found.
#[derive(Debug)]
struct RecordText {
    pieces: Vec<Piece>,
    source: String,
}

/// What a query fills the placeholders with.
struct Data<'a> {
    name: &'a str,
    zone: &'a str,
    class: String,
    qtype: String,
    caps: regex::Captures<'a>,
    regex: &'a Regex,
}

impl RecordText {
    fn parse(key: &str, text: &str, regexes: &[Regex]) -> Result<RecordText, ConfigError> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            pieces.push(Piece::Text(rest[..open].to_string()));
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| invalid(key, format!("unclosed \"{{{{\" in {text:?}")))?;
            pieces.push(Self::placeholder(key, after[..close].trim(), regexes)?);
            rest = &after[close + 2..];
        }
        if rest.contains("}}") {
            return Err(invalid(
                key,
                format!("\"}}}}\" without \"{{{{\" in {text:?}"),
            ));
        }
        pieces.push(Piece::Text(rest.to_string()));
        pieces.retain(|p| *p != Piece::Text(String::new()));
        Ok(RecordText {
            pieces,
            source: text.to_string(),
        })
    }

    fn placeholder(key: &str, inner: &str, regexes: &[Regex]) -> Result<Piece, ConfigError> {
        let words: Vec<&str> = inner.split_whitespace().collect();
        let piece = match words.as_slice() {
            [".Name"] => Piece::Name,
            [".Zone"] => Piece::Zone,
            [".Class"] => Piece::Class,
            [".Type"] => Piece::Type,
            ["index", ".Match", n] => {
                let n: usize = n.parse().map_err(|_| {
                    invalid(key, format!("{{{{ {inner} }}}}: the index must be a number"))
                })?;
                if !regexes.iter().any(|r| n < r.captures_len()) {
                    return Err(invalid(
                        key,
                        format!("{{{{ {inner} }}}}: no expression in `matches` has group {n}"),
                    ));
                }
                Piece::Match(n)
            }
            [g] if g.starts_with(".Group.") => {
                let name = &g[".Group.".len()..];
                let known = regexes.iter().any(|r| {
                    r.capture_names().flatten().any(|c| c == name)
                        || name.parse::<usize>().is_ok_and(|n| n < r.captures_len())
                });
                if !known {
                    return Err(invalid(
                        key,
                        format!("{{{{ {inner} }}}}: no expression in `matches` has group {name:?}"),
                    ));
                }
                Piece::Group(name.to_string())
            }
            _ => {
                return Err(invalid(
                    key,
                    format!(
                        "{{{{ {inner} }}}} is not supported; use {{{{ .Name }}}}, {{{{ .Zone }}}}, \
                         {{{{ .Class }}}}, {{{{ .Type }}}}, {{{{ index .Match N }}}} or {{{{ .Group.NAME }}}}"
                    ),
                ))
            }
        };
        Ok(piece)
    }

    /// The text with the placeholders filled; Err when a group is missing from this match.
    fn render(&self, d: &Data) -> Result<String, ()> {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Name => out.push_str(d.name),
                Piece::Zone => out.push_str(d.zone),
                Piece::Class => out.push_str(&d.class),
                Piece::Type => out.push_str(&d.qtype),
                // Out of range is an error, as Go's `index`; a group that did not take part
                // is empty.
                Piece::Match(n) if *n >= d.regex.captures_len() => return Err(()),
                Piece::Match(n) => out.push_str(d.caps.get(*n).map_or("", |m| m.as_str())),
                Piece::Group(g) => {
                    let m = match g.parse::<usize>() {
                        Ok(n) => d.caps.get(n),
                        Err(_) => d.caps.name(g),
                    };
                    out.push_str(m.map_or("", |m| m.as_str()));
                }
            }
        }
        Ok(out)
    }
}

/// One `[[template]]` section, built.
#[derive(Debug)]
pub struct Template {
    /// None: any class.
    class: Option<u16>,
    /// None: any type.
    qtype: Option<u16>,
    /// Zones in presentation form (for `{{ .Zone }}`) and wire form.
    zones: Vec<(String, Vec<u8>)>,
    regexes: Vec<Regex>,
    answers: Vec<RecordText>,
    additional: Vec<RecordText>,
    authority: Vec<RecordText>,
    rcode: u8,
    fallthrough: Fallthrough,
}

/// How a template rendering failed, for `coredns_template_*failures_total`.
pub struct Failure {
    pub section: &'static str,
    /// The record text could be filled but is not a record (else the placeholders failed).
    pub record: bool,
}

/// What a template made of a query that matched it, for the metrics and the reply.
pub struct Matched<'a> {
    pub zone: &'a str,
    pub class: String,
    pub qtype: String,
    pub made: Result<Made, Failure>,
}

fn rcode_from_str(s: &str) -> Option<u8> {
    let rcodes = [
        "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
        "NXRRSET", "NOTAUTH", "NOTZONE",
    ];
    rcodes
        .iter()
        .position(|r| r.eq_ignore_ascii_case(s))
        .map(|i| i as u8)
}

impl Template {
    pub fn build(key: &str, s: &TemplateSection) -> Result<Template, ConfigError> {
        let class = match s.class.to_ascii_uppercase().as_str() {
            "ANY" => None,
            c => Some(
                DNSClass::from_str(c)
                    .map_err(|_| invalid(format!("{key}.class"), format!("unknown class {c:?}")))?
                    .into(),
            ),
        };
        let qtype = match s.qtype.to_ascii_uppercase().as_str() {
            "ANY" => None,
            t => Some(
                RecordType::from_str(t)
                    .map_err(|_| invalid(format!("{key}.qtype"), format!("unknown type {t:?}")))?
                    .into(),
            ),
        };
        let wires = zone_list(&format!("{key}.zones"), &s.zones)?;
        let zones = wires
            .into_iter()
            .map(|w| (dns::name_to_string(&w), w))
            .collect();
        let mut regexes = Vec::new();
        for (i, m) in s.matches.iter().enumerate() {
            let k = format!("{key}.matches[{i}]");
            if m.len() > MAX_REGEX_LEN {
                return Err(invalid(k, "regular expression too long"));
            }
            regexes.push(
                Regex::new(m)
                    .map_err(|e| invalid(k, format!("invalid regular expression {m:?}: {e}")))?,
            );
        }
        if regexes.is_empty() {
            regexes.push(Regex::new(".*").expect("valid"));
        }
        let texts = |section: &str, v: &[String]| -> Result<Vec<RecordText>, ConfigError> {
            v.iter()
                .enumerate()
                .map(|(i, t)| RecordText::parse(&format!("{key}.{section}[{i}]"), t, &regexes))
                .collect()
        };
        let rcode = rcode_from_str(&s.rcode).ok_or_else(|| {
            invalid(
                format!("{key}.rcode"),
                format!("unknown rcode {:?}", s.rcode),
            )
        })?;
        Ok(Template {
            class,
            qtype,
            zones,
            answers: texts("answers", &s.answers)?,
            additional: texts("additional", &s.additional)?,
            authority: texts("authority", &s.authority)?,
            rcode,
            fallthrough: Fallthrough::build(&format!("{key}.fallthrough"), &s.fallthrough)?,
            regexes,
        })
    }

    pub fn in_zones(&self, qname: &[u8]) -> bool {
        self.zones.iter().any(|(_, z)| dns::name_in_zone(qname, z))
    }

    /// Applies this template to `q` (name `name`, lowercase presentation form): Ok(Some) when it
    /// matched, Ok(None) to try the next, Err when it answers SERVFAIL.
    pub fn apply<'a>(&'a self, q: &Query, name: &'a str) -> Result<Option<Matched<'a>>, ()> {
        let qname = q.qname_lower();
        // The most specific of the template's zones, as CoreDNS's Zones.Matches.
        let Some((zone, _)) = self
            .zones
            .iter()
            .filter(|(_, z)| dns::name_in_zone(qname, z))
            .max_by_key(|(_, z)| z.len())
        else {
            return Ok(None);
        };
        const ANY: u16 = 255;
        if self.class.is_some_and(|c| q.qclass != ANY && q.qclass != c)
            || self.qtype.is_some_and(|t| q.qtype != ANY && q.qtype != t)
        {
            return Ok(None);
        }
        let Some((regex, caps)) = self
            .regexes
            .iter()
            .find_map(|r| r.captures(name).map(|c| (r, c)))
        else {
            return if self.fallthrough.through(qname) {
                Ok(None)
            } else {
                Err(())
            };
        };
        let class = match (q.qclass, self.class) {
            (ANY, Some(c)) => DNSClass::from(c).to_string(),
            (c, _) => DNSClass::from(c).to_string(),
        };
        let qtype = match (q.qtype, self.qtype) {
            (ANY, Some(t)) => RecordType::from(t).to_string(),
            (t, _) => RecordType::from(t).to_string(),
        };
        let data = Data {
            name,
            zone,
            class,
            qtype,
            caps,
            regex,
        };
        let made = self.render(&data);
        Ok(Some(Matched {
            zone,
            class: data.class,
            qtype: data.qtype,
            made,
        }))
    }

    fn render(&self, d: &Data) -> Result<Made, Failure> {
        if self.rcode == dns::RCODE_SERVFAIL {
            return Ok(Made::rcode(dns::RCODE_SERVFAIL));
        }
        let section = |section: &'static str, texts: &[RecordText]| {
            texts
                .iter()
                .map(|t| {
                    let text = t.render(d).map_err(|_| Failure {
                        section,
                        record: false,
                    })?;
                    wire::parse_record(&text).map_err(|e| {
                        crate::log_limited!(warn, template = %t.source, error = %e, "template made no record");
                        Failure {
                            section,
                            record: true,
                        }
                    })
                })
                .collect::<Result<Vec<Record>, Failure>>()
        };
        Ok(Made {
            rcode: self.rcode,
            answers: section("answer", &self.answers)?,
            additional: section("additional", &self.additional)?,
            authority: section("authority", &self.authority)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::tests::query;

    fn template(f: impl FnOnce(&mut TemplateSection)) -> Result<Template, ConfigError> {
        let mut s = TemplateSection {
            zones: vec!["example.".into()],
            ..TemplateSection::default()
        };
        f(&mut s);
        Template::build("template[0]", &s)
    }

    fn apply(t: &Template, name: &str, qtype: u16) -> Result<Option<Made>, ()> {
        let q = query(name, qtype);
        let n = dns::name_to_string(q.qname_lower());
        let r = t.apply(&q, &n)?;
        Ok(r.map(|m| m.made.ok().expect("rendered")))
    }

    #[test]
    fn renders_every_placeholder() {
        let t = template(|s| {
            s.qtype = "A".into();
            s.matches = vec![r"^ip-(?P<a>\d+)-(\d+)-(\d+)-(\d+)\.example\.$".into()];
            s.answers = vec![
                "{{ .Name }} 60 {{ .Class }} A {{ .Group.a }}.{{ index .Match 2 }}.{{index .Match 3}}.{{ .Group.4 }}".into(),
            ];
            s.additional = vec!["info.{{ .Zone }} 60 IN TXT \"{{ .Type }}\"".into()];
        })
        .unwrap();
        let m = apply(&t, "IP-10-1-2-3.example", 1).unwrap().unwrap();
        assert_eq!(m.answers[0].name.to_ascii(), "ip-10-1-2-3.example.");
        assert_eq!(m.answers[0].data.to_string(), "10.1.2.3");
        assert_eq!(m.answers[0].ttl, 60);
        assert_eq!(m.additional[0].name.to_ascii(), "info.example.");
        assert_eq!(m.additional[0].data.to_string(), "A");
        assert_eq!(m.rcode, dns::RCODE_NOERROR);
        // Another type or zone: the next source answers.
        assert!(apply(&t, "ip-10-1-2-3.example", 28).unwrap().is_none());
        assert!(apply(&t, "ip-10-1-2-3.other", 1).unwrap().is_none());
        // In the zone, the expression does not match, no fallthrough: SERVFAIL.
        assert!(apply(&t, "web.example", 1).is_err());
    }

    #[test]
    fn fallthrough_and_rcode() {
        let t = template(|s| {
            s.matches = vec!["^nx\\.".into()];
            s.rcode = "NXDOMAIN".into();
            s.authority = vec!["example. 60 IN SOA ns.example. h.example. 1 2 3 4 30".into()];
            s.fallthrough = Some(vec![]);
        })
        .unwrap();
        let m = apply(&t, "nx.example", 28).unwrap().unwrap();
        assert_eq!(m.rcode, dns::RCODE_NXDOMAIN);
        assert_eq!(m.authority.len(), 1);
        assert!(
            apply(&t, "ok.example", 1).unwrap().is_none(),
            "falls through"
        );
        let t = template(|s| s.rcode = "SERVFAIL".into()).unwrap();
        let m = apply(&t, "a.example", 1).unwrap().unwrap();
        assert_eq!(m.rcode, dns::RCODE_SERVFAIL);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn a_rendering_that_is_no_record_is_a_failure() {
        let t = template(|s| {
            s.matches = vec!["^(?P<x>[a-z]+)\\.".into()];
            s.answers = vec!["{{ .Name }} 60 IN A {{ .Group.x }}".into()];
        })
        .unwrap();
        let q = query("abc.example", 1);
        let n = dns::name_to_string(q.qname_lower());
        let m = t.apply(&q, &n).unwrap().unwrap();
        assert!(matches!(
            m.made,
            Err(Failure {
                section: "answer",
                record: true
            })
        ));
    }

    #[test]
    fn other_template_syntax_and_bad_values_are_refused() {
        let e = |f: fn(&mut TemplateSection)| template(f).unwrap_err().to_string();
        assert!(
            e(|s| s.answers = vec!["{{ .Remote }} 60 IN A 1.2.3.4".into()])
                .starts_with("template[0].answers[0]: {{ .Remote }} is not supported")
        );
        assert!(e(|s| s.answers = vec!["{{ if .Name }}x{{ end }}".into()])
            .starts_with("template[0].answers[0]: {{ if .Name }} is not supported"));
        assert!(e(|s| s.additional = vec!["{{ .Name ".into()])
            .starts_with("template[0].additional[0]: unclosed"));
        assert!(e(|s| s.answers = vec!["{{ index .Match 1 }}".into()])
            .contains("no expression in `matches` has group 1"));
        assert!(e(|s| s.authority = vec!["{{ .Group.ip }}".into()])
            .starts_with("template[0].authority[0]: {{ .Group.ip }}: no expression"));
        assert!(e(|s| s.matches = vec!["(".into()])
            .starts_with("template[0].matches[0]: invalid regular expression"));
        assert!(e(|s| s.rcode = "BOGUS".into()).starts_with("template[0].rcode: unknown rcode"));
        assert!(e(|s| s.qtype = "BOGUS".into()).starts_with("template[0].qtype: unknown type"));
        assert!(e(|s| s.class = "XX".into()).starts_with("template[0].class: unknown class"));
    }
}
