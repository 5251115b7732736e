//! The Corefile's local-answer plugins (`hosts`, `template`, `rewrite`) onto `[[hosts]]`,
//! `[[template]]` and `[[rewrite]]`.

use std::path::{Path, PathBuf};

use super::corefile::{parse_error, Directive};
use super::corefile_plugin::{num, unsupported_option};
use super::*;

/// `hosts [FILE [ZONES...]] { IP NAME...; ttl SECONDS; no_reverse; fallthrough [ZONES...] }`.
/// Without FILE CoreDNS reads /etc/hosts, and so do we. CoreDNS re-reads the file every 5s
/// (`reload`); nodedns reads it with the configuration, so an explicit `reload` is refused.
pub fn hosts(
    path: &Path,
    d: &Directive,
    block_zones: &[String],
) -> Result<HostsSection, ConfigError> {
    let mut h = HostsSection {
        zones: block_zones.to_vec(),
        file: Some(PathBuf::from("/etc/hosts")),
        ..HostsSection::default()
    };
    if let Some((file, zones)) = d.args.split_first() {
        h.file = Some(PathBuf::from(file));
        if !zones.is_empty() {
            h.zones = zones.to_vec();
        }
    }
    for o in &d.block {
        if o.name.parse::<std::net::IpAddr>().is_ok() {
            if o.args.is_empty() {
                return Err(parse_error(
                    path,
                    o.line,
                    "hosts: an entry needs a name after the address",
                ));
            }
            h.entries.push(format!("{} {}", o.name, o.args.join(" ")));
            continue;
        }
        match (o.name.as_str(), o.args.as_slice()) {
            ("ttl", [t]) => {
                h.ttl = std::time::Duration::from_secs(num(path, o.line, "hosts ttl", t)?)
            }
            ("no_reverse", []) => h.no_reverse = true,
            ("fallthrough", z) => h.fallthrough = Some(z.to_vec()),
            _ => return Err(unsupported_option(path, o, "hosts")),
        }
    }
    Ok(h)
}

/// `template CLASS TYPE [ZONES...] { match REGEX...; answer RR; additional RR; authority RR;
/// rcode CODE; fallthrough [ZONES...] }`.
pub fn template(
    path: &Path,
    d: &Directive,
    block_zones: &[String],
) -> Result<TemplateSection, ConfigError> {
    let [class, qtype, zones @ ..] = d.args.as_slice() else {
        return Err(parse_error(path, d.line, "template: give CLASS and TYPE"));
    };
    let mut t = TemplateSection {
        class: class.clone(),
        qtype: qtype.clone(),
        zones: if zones.is_empty() {
            block_zones.to_vec()
        } else {
            zones.to_vec()
        },
        matches: vec![],
        ..TemplateSection::default()
    };
    for o in &d.block {
        let rr = || o.args.join(" ");
        match o.name.as_str() {
            "match" if !o.args.is_empty() => t.matches.extend(o.args.iter().cloned()),
            "answer" if !o.args.is_empty() => t.answers.push(rr()),
            "additional" if !o.args.is_empty() => t.additional.push(rr()),
            "authority" if !o.args.is_empty() => t.authority.push(rr()),
            "rcode" if o.args.len() == 1 => t.rcode = o.args[0].clone(),
            "fallthrough" => t.fallthrough = Some(o.args.clone()),
            _ => return Err(unsupported_option(path, o, "template")),
        }
    }
    if t.matches.is_empty() {
        t.matches = TemplateSection::default().matches;
    }
    Ok(t)
}

/// `rewrite [stop] name [exact|prefix|suffix|substring|regex] FROM TO`: the name rule only,
/// without answer rewriting options.
pub fn rewrite(path: &Path, d: &Directive) -> Result<RewriteSection, ConfigError> {
    if let Some(o) = d.block.first() {
        return Err(unsupported_option(path, o, "rewrite"));
    }
    let mut a = d.args.as_slice();
    if let [first, rest @ ..] = a {
        match first.as_str() {
            "stop" => a = rest,
            "continue" => {
                return Err(parse_error(
                    path,
                    d.line,
                    "rewrite: \"continue\" is not supported (one rule applies)",
                ))
            }
            _ => {}
        }
    }
    let Some((rule, rest)) = a.split_first() else {
        return Err(parse_error(path, d.line, "rewrite: give a rule"));
    };
    if rule != "name" {
        return Err(parse_error(
            path,
            d.line,
            format!("rewrite: rule {rule:?} is not supported (only \"name\")"),
        ));
    }
    let kinds = [
        ("exact", RewriteMatch::Exact),
        ("prefix", RewriteMatch::Prefix),
        ("suffix", RewriteMatch::Suffix),
        ("substring", RewriteMatch::Substring),
        ("regex", RewriteMatch::Regex),
    ];
    let (kind, rest) = match rest.split_first() {
        Some((k, r)) if kinds.iter().any(|(n, _)| n == k) => {
            (kinds.iter().find(|(n, _)| n == k).unwrap().1, r)
        }
        _ => (RewriteMatch::Exact, rest),
    };
    match rest {
        [from, to] => Ok(RewriteSection {
            kind,
            from: from.clone(),
            to: to.clone(),
        }),
        [_, _, extra, ..] => Err(parse_error(
            path,
            d.line,
            format!("rewrite: option {extra:?} is not supported"),
        )),
        _ => Err(parse_error(path, d.line, "rewrite name: give FROM and TO")),
    }
}
