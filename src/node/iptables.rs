//! The iptables backend: node-cache's rules through iptables/ip6tables.
//!
//! Which iptables the host uses (nf_tables or legacy) is detected once, the way the Kubernetes
//! iptables-wrapper does it: kubelet/kube-proxy hint chains first, then whichever backend holds
//! more rules, nft on a tie. Every call passes `-w` so we wait for `/run/xtables.lock` instead of
//! racing kube-proxy.

use std::fmt;
use std::path::PathBuf;
use std::process::Output;

use tracing::{debug, info};

use super::exec::{find_binary, output_text, run};
use super::rules::{Rule, Table, CHAINS, COMMENT_PREFIX};

/// Seconds to wait for the xtables lock, like Kubernetes' own iptables calls.
const LOCK_WAIT_SECS: &str = "5";

/// Upper bound on deletions of one rule or sweeps of one chain, in case something keeps
/// re-adding them underneath us.
const MAX_DELETE_ROUNDS: usize = 100;

/// Chains kubelet and kube-proxy create to tell other tools which iptables they use.
const HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Mode {
    Nft,
    Legacy,
    /// Plain `iptables`, whose mode is whatever `--version` said.
    Plain(String),
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Nft => f.write_str("nf_tables"),
            Mode::Legacy => f.write_str("legacy"),
            Mode::Plain(v) => write!(f, "plain iptables, {v}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum IptError {
    /// Could not get the xtables lock in time (someone else, e.g. kube-proxy, holds it).
    #[error("{0}")]
    Lock(String),
    #[error("{0}")]
    Other(String),
}

impl IptError {
    pub(crate) fn errortype(&self) -> &'static str {
        match self {
            IptError::Lock(_) => "iptables_lock",
            IptError::Other(_) => "iptables",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Iptables {
    v4: PathBuf,
    v6: Option<PathBuf>,
    pub(crate) mode: Mode,
}

impl Iptables {
    /// Picks the iptables binaries for this host.
    pub(crate) async fn detect() -> Result<Self, IptError> {
        let nft = find_binary("iptables-nft").map(|v4| (v4, find_binary("ip6tables-nft")));
        let legacy = find_binary("iptables-legacy").map(|v4| (v4, find_binary("ip6tables-legacy")));
        let chosen = match (nft, legacy) {
            (Some(n), Some(l)) => {
                if prefer_legacy().await {
                    Self::new(l, Mode::Legacy)
                } else {
                    Self::new(n, Mode::Nft)
                }
            }
            (Some(n), None) => Self::new(n, Mode::Nft),
            (None, Some(l)) => Self::new(l, Mode::Legacy),
            (None, None) => {
                let v4 = find_binary("iptables").ok_or_else(|| {
                    IptError::Other(
                        "no iptables binary found (looked for iptables-nft, iptables-legacy and \
                         iptables on PATH and in /usr/sbin, /sbin)"
                            .into(),
                    )
                })?;
                let version = run(&v4, &["--version".to_string()], None)
                    .await
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_default();
                Self::new((v4, find_binary("ip6tables")), Mode::Plain(version))
            }
        };
        info!(
            mode = %chosen.mode,
            iptables = %chosen.v4.display(),
            ip6tables = ?chosen.v6.as_ref().map(|p| p.display().to_string()),
            "iptables backend selected"
        );
        Ok(chosen)
    }

    fn new((v4, v6): (PathBuf, Option<PathBuf>), mode: Mode) -> Self {
        Iptables { v4, v6, mode }
    }

    async fn exec(&self, v6: bool, args: &[String]) -> Result<Output, IptError> {
        let bin = if v6 {
            self.v6.as_ref().ok_or_else(|| {
                IptError::Other(format!(
                    "an IPv6 listen address needs ip6tables, but no ip6tables binary matching {} \
                     was found",
                    self.v4.display()
                ))
            })?
        } else {
            &self.v4
        };
        let mut full = vec!["-w".to_string(), LOCK_WAIT_SECS.to_string()];
        full.extend_from_slice(args);
        let out = run(bin, &full, None)
            .await
            .map_err(|e| IptError::Other(format!("running {}: {e}", bin.display())))?;
        debug!(cmd = %bin.display(), args = ?full, status = ?out.status.code(), "iptables");
        Ok(out)
    }

    fn failure(&self, v6: bool, what: &str, out: &Output) -> IptError {
        let text = output_text(out);
        let bin = if v6 { "ip6tables" } else { "iptables" };
        let msg = format!(
            "{bin} ({}) {what} failed (exit {}): {text}",
            self.mode,
            out.status.code().unwrap_or(-1)
        );
        if is_lock_error(&text) {
            IptError::Lock(msg)
        } else {
            IptError::Other(msg)
        }
    }

    fn rule_args(rule: &Rule, op: &str) -> Vec<String> {
        let mut args = vec![
            "-t".to_string(),
            rule.table.name().to_string(),
            op.to_string(),
            rule.chain.name().to_string(),
        ];
        args.extend(rule.iptables_args());
        args
    }

    /// Whether the rule is present (`-C`).
    pub(crate) async fn exists(&self, rule: &Rule) -> Result<bool, IptError> {
        let out = self
            .exec(rule.is_v6(), &Self::rule_args(rule, "-C"))
            .await?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) if !is_lock_error(&output_text(&out)) => Ok(false),
            _ => Err(self.failure(rule.is_v6(), "checking a rule", &out)),
        }
    }

    /// Inserts the rule at the top of its chain unless present; true when it was added.
    pub(crate) async fn ensure(&self, rule: &Rule) -> Result<bool, IptError> {
        if self.exists(rule).await? {
            return Ok(false);
        }
        let out = self
            .exec(rule.is_v6(), &Self::rule_args(rule, "-I"))
            .await?;
        if out.status.success() {
            Ok(true)
        } else {
            Err(self.failure(rule.is_v6(), &format!("`{}`", rule.describe()), &out))
        }
    }

    /// Deletes every copy of the rule; returns how many were deleted.
    pub(crate) async fn delete_all(&self, rule: &Rule) -> Result<usize, IptError> {
        let mut deleted = 0;
        for _ in 0..MAX_DELETE_ROUNDS {
            let out = self
                .exec(rule.is_v6(), &Self::rule_args(rule, "-D"))
                .await?;
            match out.status.code() {
                Some(0) => deleted += 1,
                Some(1) if !is_lock_error(&output_text(&out)) => return Ok(deleted),
                _ => return Err(self.failure(rule.is_v6(), "deleting a rule", &out)),
            }
        }
        Err(IptError::Other(format!(
            "rule `{}` still present after {MAX_DELETE_ROUNDS} deletions",
            rule.describe()
        )))
    }

    /// Deletes any rule in our chains whose comment names nodedns, e.g. left over from a run
    /// with other listen addresses. Returns how many were deleted.
    pub(crate) async fn sweep(&self, v6: bool) -> Result<usize, IptError> {
        Ok(self.sweep_where(v6, is_ours).await?.len())
    }

    /// Deletes, in one pass over our chains, node-cache's rules (found by their comment, so a
    /// migration leaves none of its unconditional NOTRACK rules behind) and the rules of ours
    /// that are not in `wanted` (left by a run with other listen addresses, an older nodedns
    /// whose NOTRACK was unconditional, or the other firewall backend). Returns both, as
    /// `-t TABLE` plus the line `iptables -S` printed.
    pub(crate) async fn remove_leftovers(
        &self,
        v6: bool,
        wanted: &[Rule],
    ) -> Result<(Vec<String>, Vec<String>), IptError> {
        let wanted: Vec<(Table, Vec<String>)> = wanted
            .iter()
            .filter(|r| r.is_v6() == v6)
            .map(|r| (r.table, r.save_args()))
            .collect();
        let removed = self
            .sweep_where_in(v6, |table, args| {
                is_node_cache(args)
                    || (is_ours(args) && !wanted.iter().any(|(t, w)| *t == table && w == args))
            })
            .await?;
        Ok(removed
            .into_iter()
            .partition(|line| comment_starts_with(&split_rule(line), NODE_CACHE_COMMENT_PREFIX)))
    }

    async fn sweep_where(
        &self,
        v6: bool,
        pred: impl Fn(&[String]) -> bool,
    ) -> Result<Vec<String>, IptError> {
        self.sweep_where_in(v6, |_, args| pred(args)).await
    }

    /// Deletes, one at a time, every rule in our chains for which `pred(table, args)` holds.
    async fn sweep_where_in(
        &self,
        v6: bool,
        pred: impl Fn(Table, &[String]) -> bool,
    ) -> Result<Vec<String>, IptError> {
        if v6 && self.v6.is_none() {
            return Ok(Vec::new());
        }
        if self.mode == Mode::Legacy && !legacy_tables_present(v6) {
            // No legacy table, so no rule of ours; listing would only instantiate empty tables.
            return Ok(Vec::new());
        }
        let mut deleted = Vec::new();
        for (table, chain) in CHAINS {
            let list = vec![
                "-t".to_string(),
                table.name().to_string(),
                "-S".to_string(),
                chain.name().to_string(),
            ];
            let mut rounds = 0;
            loop {
                let out = self.exec(v6, &list).await?;
                if !out.status.success() {
                    return Err(self.failure(v6, "listing rules", &out));
                }
                let listing = String::from_utf8_lossy(&out.stdout).into_owned();
                let Some((line, mut args)) = listing
                    .lines()
                    .map(|l| (l, split_rule(l)))
                    .find(|(_, a)| pred(table, a))
                else {
                    break;
                };
                let line = format!("-t {} {line}", table.name());
                rounds += 1;
                if rounds > MAX_DELETE_ROUNDS {
                    return Err(IptError::Other(format!(
                        "nodedns rules keep reappearing in {} {}",
                        table.name(),
                        chain.name()
                    )));
                }
                args[0] = "-D".to_string();
                let mut del = vec!["-t".to_string(), table.name().to_string()];
                del.extend(args);
                let out = self.exec(v6, &del).await?;
                if !out.status.success() {
                    return Err(self.failure(v6, "deleting a leftover rule", &out));
                }
                deleted.push(line);
            }
        }
        Ok(deleted)
    }
}

fn is_lock_error(text: &str) -> bool {
    text.contains("xtables lock") || text.contains("lock file")
}

/// Every comment node-cache attaches to its rules starts with this.
const NODE_CACHE_COMMENT_PREFIX: &str = "NodeLocal DNS Cache:";

/// Whether a split `-A CHAIN ...` line carries a comment naming nodedns.
fn is_ours(args: &[String]) -> bool {
    has_comment_prefix(args, COMMENT_PREFIX)
}

/// Whether a split `-A CHAIN ...` line is one of node-cache's.
fn is_node_cache(args: &[String]) -> bool {
    has_comment_prefix(args, NODE_CACHE_COMMENT_PREFIX)
}

fn has_comment_prefix(args: &[String], prefix: &str) -> bool {
    args.first().map(String::as_str) == Some("-A") && comment_starts_with(args, prefix)
}

fn comment_starts_with(args: &[String], prefix: &str) -> bool {
    args.windows(2)
        .any(|w| w[0] == "--comment" && w[1].starts_with(prefix))
}

/// Splits one line of `iptables -S` output into arguments, honouring the double quotes (and
/// backslash escapes inside them) iptables uses around comments.
fn split_rule(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_arg = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_arg = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_arg {
                    args.push(std::mem::take(&mut cur));
                    in_arg = false;
                }
            }
            c => {
                cur.push(c);
                in_arg = true;
            }
        }
    }
    if in_arg {
        args.push(cur);
    }
    args
}

/// Decides between iptables-legacy and iptables-nft when both exist, as the Kubernetes
/// iptables-wrapper does: the hint chains kubelet/kube-proxy leave in the mangle table win,
/// then whichever backend has more rules; ties go to nft.
async fn prefer_legacy() -> bool {
    for (mode, bins) in [
        ("nft", ["iptables-nft-save", "ip6tables-nft-save"]),
        ("legacy", ["iptables-legacy-save", "ip6tables-legacy-save"]),
    ] {
        let mangle = save_output(&bins, Some("mangle")).await;
        if HINT_CHAINS.iter().any(|h| mangle.contains(h)) {
            debug!(mode, "kubernetes iptables hint chain found");
            return mode == "legacy";
        }
    }
    let count = |s: &str| s.lines().filter(|l| l.starts_with('-')).count();
    let legacy =
        count(&save_output(&["iptables-legacy-save", "ip6tables-legacy-save"], None).await);
    let nft = count(&save_output(&["iptables-nft-save", "ip6tables-nft-save"], None).await);
    debug!(legacy, nft, "iptables rule counts per backend");
    legacy > nft
}

async fn save_output(bins: &[&str], table: Option<&str>) -> String {
    let mut all = String::new();
    for name in bins {
        if name.contains("legacy") && !legacy_tables_present(name.starts_with("ip6")) {
            // Nothing to read, and running iptables-legacy-save would instantiate empty legacy
            // tables (making iptables-nft warn "iptables-legacy tables present" ever after).
            continue;
        }
        let Some(bin) = find_binary(name) else {
            continue;
        };
        let args: Vec<String> = match table {
            Some(t) => vec!["-t".into(), t.into()],
            None => Vec::new(),
        };
        if let Ok(out) = run(&bin, &args, None).await {
            if out.status.success() {
                all.push_str(&String::from_utf8_lossy(&out.stdout));
            }
        }
    }
    all
}

/// Whether any legacy (x_tables) table exists in this thread's network namespace.
fn legacy_tables_present(v6: bool) -> bool {
    let file = if v6 {
        "ip6_tables_names"
    } else {
        "ip_tables_names"
    };
    // thread-self, not self: the caller's thread may have joined another network namespace.
    std::fs::read_to_string(format!("/proc/thread-self/net/{file}"))
        .map(|names| !names.trim().is_empty())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_quoted_comments() {
        let line = r#"-A OUTPUT -s 169.254.20.10/32 -p udp -m udp --sport 53 -m comment --comment "nodedns: skip \"x\"" -j NOTRACK"#;
        let args = split_rule(line);
        assert_eq!(args.len(), 16);
        assert_eq!(args[13], "nodedns: skip \"x\"");
        assert!(is_ours(&args));
        assert!(!is_ours(&split_rule(
            r#"-A OUTPUT -m comment --comment "kube-proxy" -j KUBE"#
        )));
        assert!(!is_ours(&split_rule("-P OUTPUT ACCEPT")));
        let nc = split_rule(
            r#"-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "NodeLocal DNS Cache: skip conntrack" -j NOTRACK"#,
        );
        assert!(is_node_cache(&nc) && !is_ours(&nc));
        assert!(!is_node_cache(&args));
    }

    #[test]
    fn our_rules_are_recognised_in_save_form() {
        let listen = vec!["169.254.20.10:53".parse().unwrap()];
        let rules = crate::node::rules::build(&listen, Some(8080));
        let line = r#"-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m socket --nowildcard -m comment --comment "nodedns: skip conntrack" -j NOTRACK"#;
        assert!(rules.iter().any(|r| r.save_args() == split_rule(line)));
        // The unconditional rule of an older nodedns is not one of today's.
        let old = line.replace(" -m socket", "");
        assert!(!rules.iter().any(|r| r.save_args() == split_rule(&old)));
    }

    #[test]
    fn lock_errors_are_recognised() {
        assert!(is_lock_error(
            "Another app is currently holding the xtables lock. Stopped waiting after 5s."
        ));
        assert!(!is_lock_error("iptables: Bad rule"));
    }
}
