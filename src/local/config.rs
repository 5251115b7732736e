//! The configuration keys of local answers: `[[hosts]]`, `[[rewrite]]` and `[[template]]` in
//! the file; the Corefile's `hosts`, `rewrite` and `template` plugins fill the same structs.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Static address records (`[[hosts]]`), as CoreDNS's `hosts` plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostsSection {
    /// Zones the entries answer for [default: ["."]].
    pub zones: Vec<String>,
    /// Entries in /etc/hosts form: "IP NAME [NAME...]".
    pub entries: Vec<String>,
    /// A file in /etc/hosts form, read at start and at every reload.
    pub file: Option<PathBuf>,
    /// TTL of the answers [default: 3600s].
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Do not answer PTR queries from the entries.
    pub no_reverse: bool,
    /// Zones where a name without an entry goes on to the cache and the upstreams; `[]` means
    /// every zone; absent: a name in `zones` without an entry is answered NXDOMAIN.
    pub fallthrough: Option<Vec<String>>,
}

impl Default for HostsSection {
    fn default() -> Self {
        HostsSection {
            zones: vec![".".into()],
            entries: vec![],
            file: None,
            ttl: Duration::from_secs(3600),
            no_reverse: false,
            fallthrough: None,
        }
    }
}

/// How a rewrite rule's `from` matches a query name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RewriteMatch {
    #[default]
    Exact,
    Prefix,
    Suffix,
    Substring,
    Regex,
}

/// A query-name rewrite (`[[rewrite]]`), as CoreDNS's `rewrite name` rule: the name is
/// rewritten before it is looked up upstream, and the client sees its own name in the reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewriteSection {
    #[serde(default, rename = "match")]
    pub kind: RewriteMatch,
    pub from: String,
    pub to: String,
}

/// Synthesized answers (`[[template]]`), as CoreDNS's `template` plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateSection {
    /// Query class [default: "IN"], or "ANY".
    pub class: String,
    /// Query type, e.g. "A", or "ANY" [default: "ANY"].
    pub qtype: String,
    /// Zones the template answers for [default: ["."]].
    pub zones: Vec<String>,
    /// Regular expressions over the query name; the first that matches applies
    /// [default: [".*"]].
    pub matches: Vec<String>,
    /// Records of the answer, additional and authority sections, in zone-file form with
    /// `{{ .Name }}`-style placeholders.
    pub answers: Vec<String>,
    pub additional: Vec<String>,
    pub authority: Vec<String>,
    /// Response code [default: "NOERROR"].
    pub rcode: String,
    /// Zones where a name that no expression matches goes on; `[]`: every zone; absent: such a
    /// name is answered SERVFAIL (as CoreDNS's template plugin answers it).
    pub fallthrough: Option<Vec<String>>,
}

impl Default for TemplateSection {
    fn default() -> Self {
        TemplateSection {
            class: "IN".into(),
            qtype: "ANY".into(),
            zones: vec![".".into()],
            matches: vec![".*".into()],
            answers: vec![],
            additional: vec![],
            authority: vec![],
            rcode: "NOERROR".into(),
            fallthrough: None,
        }
    }
}
