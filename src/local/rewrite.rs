//! Query-name rewrites (`[[rewrite]]`), as CoreDNS's `rewrite name` rule with its default
//! `stop` action: the first rule whose `from` matches rewrites the name, the query is answered
//! under the new name (locally or upstream), and the reply carries the client's question again.
//!
//! Names are compared in lowercase presentation form with the trailing dot ("a.example."), and
//! `from`/`to` are normalized the same way (regex `from` excepted), as CoreDNS normalizes them.
//! An `exact` rule also maps the answer back, as CoreDNS does by default since `answer auto`
//! exists: record owner names equal to (or below) the rewritten name, and the names that CNAME,
//! NS, PTR, MX, SRV and SOA records point to, get the client's name instead. The other kinds
//! restore the question only (CoreDNS maps answers back for them only with `answer auto`).

use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RData, Record};
use regex::Regex;

use super::config::{RewriteMatch, RewriteSection};
use super::{invalid, wire};
use crate::config::error::ConfigError;
use crate::dns::{self, Query};

/// Longest regular expression accepted, as CoreDNS bounds it.
const MAX_REGEX_LEN: usize = 10_000;

/// One `[[rewrite]]` rule, built.
#[derive(Debug)]
pub struct Rule {
    kind: RewriteMatch,
    from: String,
    to: String,
    regex: Option<Regex>,
}

/// A query asked under its rewritten name.
pub struct Rewritten {
    /// The query as it is answered (and forwarded).
    pub query: Query,
    /// For a reply's names mapped back: the rewritten name and the client's (presentation
    /// form), when the rule maps answers back.
    auto: Option<(String, String)>,
}

/// `name` in CoreDNS's normalized form: lowercase, fully qualified.
fn normalize(name: &str) -> String {
    let mut n = name.trim().to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

impl Rule {
    pub fn build(key: &str, s: &RewriteSection) -> Result<Rule, ConfigError> {
        let (from, to) = match s.kind {
            RewriteMatch::Regex => (s.from.clone(), normalize(&s.to)),
            _ => (normalize(&s.from), normalize(&s.to)),
        };
        let regex = match s.kind {
            RewriteMatch::Regex if s.from.len() > MAX_REGEX_LEN => {
                return Err(invalid(
                    format!("{key}.from"),
                    format!("regular expression longer than {MAX_REGEX_LEN} characters"),
                ))
            }
            RewriteMatch::Regex => Some(Regex::new(&s.from).map_err(|e| {
                invalid(
                    format!("{key}.from"),
                    format!("invalid regular expression {:?}: {e}", s.from),
                )
            })?),
            _ => {
                if dns::name_from_str(&from).is_none() {
                    return Err(invalid(
                        format!("{key}.from"),
                        format!("invalid name {:?}", s.from),
                    ));
                }
                None
            }
        };
        // A `to` with regex groups is checked once they are filled in, per query.
        if regex.is_none() && dns::name_from_str(&to).is_none() {
            return Err(invalid(
                format!("{key}.to"),
                format!("invalid name {:?}", s.to),
            ));
        }
        if let Some(re) = &regex {
            for group in (0..100).filter(|g| to.contains(&format!("{{{g}}}"))) {
                if group >= re.captures_len() {
                    return Err(invalid(
                        format!("{key}.to"),
                        format!("{{{group}}}: the expression has no such group"),
                    ));
                }
            }
        }
        Ok(Rule {
            kind: s.kind,
            from,
            to,
            regex,
        })
    }

    /// The rewritten name of `name` (normalized presentation form), or None if the rule does
    /// not match.
    pub fn apply(&self, name: &str) -> Option<String> {
        match self.kind {
            RewriteMatch::Exact => (name == self.from).then(|| self.to.clone()),
            RewriteMatch::Prefix => name
                .strip_prefix(self.from.as_str())
                .map(|rest| format!("{}{rest}", self.to)),
            RewriteMatch::Suffix => name
                .strip_suffix(self.from.as_str())
                .map(|head| format!("{head}{}", self.to)),
            RewriteMatch::Substring => name
                .contains(self.from.as_str())
                .then(|| name.replace(self.from.as_str(), &self.to)),
            RewriteMatch::Regex => {
                let caps = self.regex.as_ref()?.captures(name)?;
                let mut out = self.to.clone();
                for (i, m) in caps.iter().enumerate() {
                    out = out.replace(&format!("{{{i}}}"), m.map_or("", |m| m.as_str()));
                }
                Some(out)
            }
        }
    }
}

/// What the rules make of a query.
// Built once per miss and consumed at once: boxing the query would allocate for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// No rule matched.
    Unchanged,
    Rewritten(Rewritten),
    /// A rule matched but made no valid name: SERVFAIL, as CoreDNS answers.
    Invalid,
}

/// The first rule that matches `q` rewrites it.
pub fn rewrite(rules: &[Rule], q: &Query) -> Outcome {
    if rules.is_empty() {
        return Outcome::Unchanged;
    }
    let name = dns::name_to_string(q.qname_lower());
    let Some((rule, to)) = rules
        .iter()
        .find_map(|r| r.apply(&name).map(|to| (r, normalize(&to))))
    else {
        return Outcome::Unchanged;
    };
    let Some(query) = dns::name_from_str(&to).and_then(|w| wire::requery(q, &w)) else {
        return Outcome::Invalid;
    };
    let auto = (rule.kind == RewriteMatch::Exact).then_some((to, name));
    Outcome::Rewritten(Rewritten { query, auto })
}

/// `name` mapped back: the rewritten name becomes the client's, also as a suffix.
fn remap(name: &Name, rewritten: &str, original: &str) -> Option<Name> {
    let text = name.to_lowercase().to_ascii();
    let mapped = if text == rewritten {
        original.to_string()
    } else {
        let head = text.strip_suffix(rewritten)?;
        if !head.ends_with('.') {
            return None;
        }
        format!("{head}{original}")
    };
    Name::from_ascii(mapped).ok()
}

fn remap_record(r: &mut Record, rewritten: &str, original: &str) {
    if let Some(n) = remap(&r.name, rewritten, original) {
        r.name = n;
    }
    let target = match &mut r.data {
        RData::CNAME(c) => &mut c.0,
        RData::NS(n) => &mut n.0,
        RData::PTR(p) => &mut p.0,
        RData::MX(mx) => &mut mx.exchange,
        RData::SRV(srv) => &mut srv.target,
        RData::SOA(soa) => &mut soa.mname,
        _ => return,
    };
    if let Some(n) = remap(target, rewritten, original) {
        *target = n;
    }
}

impl Rewritten {
    /// The reply `resp` (to the rewritten question, OPT stripped) as the client gets it: its
    /// own question (lowercased; the renderer writes the client's bytes), names mapped back when
    /// the rule says so. None when the reply cannot be read or written again.
    pub fn revert(&self, resp: &[u8], client: &Query) -> Option<Vec<u8>> {
        let mut m = Message::from_vec(resp).ok()?;
        m.queries = vec![wire::question(client)?];
        if let Some((rewritten, original)) = &self.auto {
            for r in m
                .answers
                .iter_mut()
                .chain(m.authorities.iter_mut())
                .chain(m.additionals.iter_mut())
            {
                remap_record(r, rewritten, original);
            }
        }
        m.to_vec().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::tests::query;

    fn rule(kind: RewriteMatch, from: &str, to: &str) -> Rule {
        let s = RewriteSection {
            kind,
            from: from.into(),
            to: to.into(),
        };
        Rule::build("rewrite[0]", &s).unwrap()
    }

    #[test]
    fn each_kind_matches_as_coredns() {
        let r = rule(RewriteMatch::Exact, "A.example", "b.example.");
        assert_eq!(r.apply("a.example.").as_deref(), Some("b.example."));
        assert_eq!(r.apply("x.a.example."), None);
        let r = rule(RewriteMatch::Prefix, "foo", "bar");
        assert_eq!(r.apply("foo.example.").as_deref(), Some("bar.example."));
        assert_eq!(
            r.apply("food.example."),
            None,
            "from is normalized to \"foo.\""
        );
        let r = rule(RewriteMatch::Suffix, "svc.old", "svc.new");
        assert_eq!(r.apply("a.svc.old.").as_deref(), Some("a.svc.new."));
        assert_eq!(r.apply("a.svc.other."), None);
        let r = rule(RewriteMatch::Substring, "east.example", "west.example");
        assert_eq!(
            r.apply("x.east.example.").as_deref(),
            Some("x.west.example.")
        );
        let r = rule(
            RewriteMatch::Regex,
            r"^(.+)\.legacy\.example\.$",
            "{1}.svc.cluster.local",
        );
        assert_eq!(
            r.apply("api.legacy.example.").as_deref(),
            Some("api.svc.cluster.local.")
        );
        assert_eq!(r.apply("api.example."), None);
    }

    #[test]
    fn bad_rules_are_refused_naming_the_key() {
        let s = RewriteSection {
            kind: RewriteMatch::Regex,
            from: "(".into(),
            to: "x".into(),
        };
        let e = Rule::build("rewrite[3]", &s).unwrap_err().to_string();
        assert!(
            e.starts_with("rewrite[3].from: invalid regular expression"),
            "{e}"
        );
        let s = RewriteSection {
            kind: RewriteMatch::Regex,
            from: "^(a)$".into(),
            to: "{2}.x".into(),
        };
        let e = Rule::build("rewrite[0]", &s).unwrap_err().to_string();
        assert_eq!(e, "rewrite[0].to: {2}: the expression has no such group");
        let s = RewriteSection {
            kind: RewriteMatch::Exact,
            from: "a..b".into(),
            to: "x".into(),
        };
        assert!(Rule::build("rewrite[0]", &s).is_err());
    }

    #[test]
    fn first_matching_rule_wins_and_the_reply_is_mapped_back() {
        let rules = vec![
            rule(RewriteMatch::Exact, "a.example", "b.example"),
            rule(RewriteMatch::Suffix, "example", "other"),
        ];
        let q = query("A.Example", 1);
        let Outcome::Rewritten(rw) = rewrite(&rules, &q) else {
            panic!("rewritten");
        };
        assert_eq!(rw.query.qname_string(), "b.example.");
        // The upstream's reply to b.example: a CNAME chain starting at the rewritten name.
        let recs = vec![
            wire::parse_record("b.example. 60 IN CNAME c.b.example.").unwrap(),
            wire::parse_record("c.b.example. 60 IN A 192.0.2.3").unwrap(),
        ];
        let up = wire::reply(&rw.query, 0, false, recs, vec![], vec![]).unwrap();
        let back = rw.revert(&up, &q).unwrap();
        let resp = dns::parse_response(&back, q.question_lower()).unwrap();
        let m = Message::from_vec(&resp.wire).unwrap();
        let names: Vec<String> = m.answers.iter().map(|r| r.name.to_ascii()).collect();
        assert_eq!(names, ["a.example.", "c.a.example."]);
        assert_eq!(m.answers[0].data.to_string(), "c.a.example.");
        // A suffix rule restores the question only.
        let q = query("x.example", 1);
        let Outcome::Rewritten(rw) = rewrite(&rules, &q) else {
            panic!("rewritten");
        };
        assert_eq!(rw.query.qname_string(), "x.other.");
        let recs = vec![wire::parse_record("x.other. 60 IN A 192.0.2.4").unwrap()];
        let up = wire::reply(&rw.query, 0, false, recs, vec![], vec![]).unwrap();
        let back = rw.revert(&up, &q).unwrap();
        let m = Message::from_vec(&back).unwrap();
        assert_eq!(m.queries[0].name().to_ascii(), "x.example.");
        assert_eq!(m.answers[0].name.to_ascii(), "x.other.");
        assert!(matches!(
            rewrite(&rules, &query("z.org", 1)),
            Outcome::Unchanged
        ));
    }

    #[test]
    fn a_rewrite_to_an_invalid_name_is_refused_per_query() {
        let long = format!("{}.x", "a".repeat(62));
        let r = rule(
            RewriteMatch::Regex,
            "^(.*)$",
            &format!("{{1}}{long}.{long}.{long}"),
        );
        let q = query(&format!("{long}.{long}"), 1);
        assert!(matches!(rewrite(&[r], &q), Outcome::Invalid));
    }
}
