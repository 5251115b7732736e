//! Answers made on the node without asking an upstream: static hosts entries, synthesized
//! (templated) answers and name rewrites, as CoreDNS's `hosts`, `template` and `rewrite`
//! plugins make them. They apply where CoreDNS applies them, behind the cache: a query the cache
//! cannot answer is checked here before it is forwarded, and what is made here is cached like an
//! upstream's answer, so the hit path does not change.
//!
//! The order is CoreDNS's plugin order: `rewrite` first (the rest, the upstreams included, see
//! the rewritten name), then `template`, then `hosts`, then the upstreams. [`LocalAnswers`] is
//! immutable and built whole from the configuration (and the hosts files), so a reload builds a
//! new one and swaps it in.
//!
//! - `config`: the keys (`[[hosts]]`, `[[rewrite]]`, `[[template]]`);
//! - `hosts`, `template`, `rewrite`: each source, built and applied;
//! - `wire`: replies built from records, records parsed from text, queries asked again;
//! - `metrics`: `coredns_hosts_*` and `coredns_template_*`.

pub mod config;
mod hosts;
mod metrics;
mod rewrite;
mod template;
mod wire;

use std::time::SystemTime;

use hickory_proto::rr::Record;

use self::config::{HostsSection, RewriteSection, TemplateSection};
use crate::config::error::ConfigError;
use crate::dns::{self, Query, Response};

pub use self::metrics::LocalMetrics;
pub use self::rewrite::Rewritten;

pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Zones in presentation form to lowercase wire names; at least one.
fn zone_list(key: &str, zones: &[String]) -> Result<Vec<Vec<u8>>, ConfigError> {
    if zones.is_empty() {
        return Err(invalid(
            key,
            "at least one zone is required (\".\" for all)",
        ));
    }
    zones
        .iter()
        .map(|z| dns::name_from_str(z).ok_or_else(|| invalid(key, format!("invalid zone {z:?}"))))
        .collect()
}

/// Where a name without an answer goes on (CoreDNS's `fallthrough [ZONES...]`).
#[derive(Debug)]
enum Fallthrough {
    /// Nowhere: the source answers it (NXDOMAIN, SERVFAIL).
    Never,
    /// In these zones (`[]` in the file: the root, every name).
    In(Vec<Vec<u8>>),
}

impl Fallthrough {
    fn build(key: &str, v: &Option<Vec<String>>) -> Result<Fallthrough, ConfigError> {
        Ok(match v {
            None => Fallthrough::Never,
            Some(zones) if zones.is_empty() => Fallthrough::In(vec![vec![0]]),
            Some(zones) => Fallthrough::In(zone_list(key, zones)?),
        })
    }

    fn through(&self, qname: &[u8]) -> bool {
        match self {
            Fallthrough::Never => false,
            Fallthrough::In(zones) => zones.iter().any(|z| dns::name_in_zone(qname, z)),
        }
    }
}

/// A reply made locally, before it is put on the wire.
#[derive(Debug)]
pub(crate) struct Made {
    rcode: u8,
    answers: Vec<Record>,
    authority: Vec<Record>,
    additional: Vec<Record>,
}

impl Made {
    fn records(answers: Vec<Record>) -> Made {
        Made {
            rcode: dns::RCODE_NOERROR,
            answers,
            authority: vec![],
            additional: vec![],
        }
    }

    fn rcode(rcode: u8) -> Made {
        Made {
            rcode,
            ..Made::records(vec![])
        }
    }

    /// The reply to `q`, authoritative as CoreDNS's; SERVFAIL if the records make no message.
    fn wire(self, q: &Query) -> Option<Vec<u8>> {
        wire::reply(
            q,
            self.rcode,
            true,
            self.answers,
            self.authority,
            self.additional,
        )
        .or_else(|| wire::reply(q, dns::RCODE_SERVFAIL, false, vec![], vec![], vec![]))
    }
}

/// Hosts entries, templates and rewrite rules, built from their sections.
#[derive(Debug, Default)]
pub struct LocalAnswers {
    rewrites: Vec<rewrite::Rule>,
    templates: Vec<template::Template>,
    hosts: Vec<hosts::Hosts>,
}

/// What local answers make of a miss, before the upstreams are asked.
pub struct Plan {
    /// The query under its rewritten name, when a rule rewrote it.
    pub rewritten: Option<Rewritten>,
    /// A reply made here for the query asked (the rewritten one if any); None: forward it.
    pub reply: Option<Vec<u8>>,
}

impl Plan {
    /// The query to answer: rewritten, or the client's.
    pub fn asked<'a>(&'a self, client: &'a Query) -> &'a Query {
        self.rewritten.as_ref().map_or(client, |r| &r.query)
    }

    /// The reply to the asked query as the client's question gets it (the client's name back
    /// after a rewrite). None when it cannot be read.
    pub fn finish(&self, resp: Response, client: &Query) -> Option<Response> {
        match &self.rewritten {
            None => Some(resp),
            Some(rw) => {
                let wire = rw.revert(&resp.wire, client)?;
                dns::parse_response(&wire, client.question_lower()).ok()
            }
        }
    }
}

impl LocalAnswers {
    /// Builds local answers from their sections, reading the hosts files. Errors name the key
    /// (`hosts[0].entries[2]`, `template[1].answers[0]`, `rewrite[0].from`...).
    pub fn build(
        hosts: &[HostsSection],
        rewrite: &[RewriteSection],
        template: &[TemplateSection],
    ) -> Result<LocalAnswers, ConfigError> {
        Ok(LocalAnswers {
            rewrites: rewrite
                .iter()
                .enumerate()
                .map(|(i, s)| rewrite::Rule::build(&format!("rewrite[{i}]"), s))
                .collect::<Result<_, _>>()?,
            templates: template
                .iter()
                .enumerate()
                .map(|(i, s)| template::Template::build(&format!("template[{i}]"), s))
                .collect::<Result<_, _>>()?,
            hosts: hosts
                .iter()
                .enumerate()
                .map(|(i, s)| hosts::Hosts::build(&format!("hosts[{i}]"), s))
                .collect::<Result<_, _>>()?,
        })
    }

    /// True when nothing is configured: misses go straight to the upstreams.
    pub fn is_empty(&self) -> bool {
        self.rewrites.is_empty() && self.templates.is_empty() && self.hosts.is_empty()
    }

    /// Entries per hosts source (its file, or "" for inline entries only) and each file's
    /// modification time, for the metrics.
    pub fn hosts_sources(&self) -> Vec<(String, usize, Option<SystemTime>)> {
        self.hosts
            .iter()
            .map(|h| match &h.file {
                Some((path, mtime)) => (path.display().to_string(), h.entries, *mtime),
                None => (String::new(), h.entries, None),
            })
            .collect()
    }

    /// Rewrites `q` and answers it from the templates and hosts entries when they can.
    pub fn plan(&self, q: &Query, metrics: &LocalMetrics) -> Plan {
        let rewritten = match rewrite::rewrite(&self.rewrites, q) {
            rewrite::Outcome::Unchanged => None,
            rewrite::Outcome::Rewritten(r) => Some(r),
            rewrite::Outcome::Invalid => {
                return Plan {
                    rewritten: None,
                    reply: Made::rcode(dns::RCODE_SERVFAIL).wire(q),
                }
            }
        };
        let asked = rewritten.as_ref().map_or(q, |r| &r.query);
        let reply = self
            .template(asked, metrics)
            .or_else(|| self.hosts.iter().find_map(|h| h.answer(asked)))
            .and_then(|made| made.wire(asked));
        Plan { rewritten, reply }
    }

    /// The templates' answer to `q`, if one applies (SERVFAIL included).
    fn template(&self, q: &Query, metrics: &LocalMetrics) -> Option<Made> {
        let qname = q.qname_lower();
        if !self.templates.iter().any(|t| t.in_zones(qname)) {
            return None;
        }
        let name = dns::name_to_string(qname);
        for t in &self.templates {
            match t.apply(q, &name) {
                Err(()) => return Some(Made::rcode(dns::RCODE_SERVFAIL)),
                Ok(None) => continue,
                Ok(Some(m)) => {
                    metrics.matched(m.zone, &m.class, &m.qtype);
                    return Some(match m.made {
                        Ok(made) => made,
                        Err(f) => {
                            metrics.failed(m.zone, &m.class, &m.qtype, f.section, f.record);
                            Made::rcode(dns::RCODE_SERVFAIL)
                        }
                    });
                }
            }
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A query for `name` and `qtype`, class IN, RD set.
    pub fn query(name: &str, qtype: u16) -> Query {
        let mut p = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            p.push(label.len() as u8);
            p.extend_from_slice(label.as_bytes());
        }
        p.push(0);
        p.extend_from_slice(&qtype.to_be_bytes());
        p.extend_from_slice(&1u16.to_be_bytes());
        dns::parse_query(&p).unwrap()
    }

    fn build(toml_text: &str) -> Result<LocalAnswers, ConfigError> {
        let cfg = crate::config::parse_str(toml_text).expect("valid toml");
        LocalAnswers::build(&cfg.hosts, &cfg.rewrite, &cfg.template)
    }

    fn answer(local: &LocalAnswers, name: &str, qtype: u16) -> (Plan, Option<Response>) {
        let q = query(name, qtype);
        let metrics = LocalMetrics::register(&prometheus::Registry::new());
        let plan = local.plan(&q, &metrics);
        let resp = plan
            .reply
            .clone()
            .map(|w| dns::parse_response(&w, plan.asked(&q).question_lower()).unwrap());
        (plan, resp)
    }

    #[test]
    fn rewrite_then_template_then_hosts() {
        let local = build(
            r#"
            [[rewrite]]
            from = "alias.example"
            to = "web.example"
            [[template]]
            zones = ["example."]
            qtype = "TXT"
            matches = ["^web\\."]
            answers = ['{{ .Name }} 60 IN TXT "templated"']
            fallthrough = []
            [[hosts]]
            zones = ["example."]
            entries = ["192.0.2.1 web.example"]
            "#,
        )
        .unwrap();
        let (plan, resp) = answer(&local, "alias.example", 1);
        assert_eq!(
            plan.rewritten.as_ref().unwrap().query.qname_string(),
            "web.example."
        );
        let resp = resp.unwrap();
        assert_eq!(resp.kind, dns::AnswerKind::Positive);
        let q = query("alias.example", 1);
        let back = plan.finish(resp, &q).unwrap();
        assert_eq!(
            &back.wire[12..12 + q.question_lower().len()],
            q.question_lower()
        );
        let (_, resp) = answer(&local, "web.example", 16);
        assert_eq!(resp.unwrap().kind, dns::AnswerKind::Positive, "template");
        let (plan, _) = answer(&local, "other.org", 1);
        assert!(
            plan.reply.is_none() && plan.rewritten.is_none(),
            "forwarded"
        );
        assert!(!local.is_empty() && LocalAnswers::default().is_empty());
    }

    #[test]
    fn build_errors_name_the_section_and_key() {
        let e = build("[[hosts]]\nentries = [\"192.0.2.1 a.example\", \"x y\"]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "hosts[0].entries[1]: invalid address \"x\"");
        let e = build("[[template]]\n[[template]]\nzones = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("template[1].zones: "), "{e}");
        let e = build("[[rewrite]]\nmatch = \"regex\"\nfrom = \"[\"\nto = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("rewrite[0].from: "), "{e}");
    }
}
