//! The nftables backend: the same rules as one table of our own, `table inet nodedns`.
//!
//! The table is written with one `nft -f -` transaction that declares, flushes by deleting, and
//! re-creates it, so a reader never sees half a rule set; removal is one `delete table`.
//!
//! Note: an `accept` in our filter chains ends evaluation only of our own chain; other tables
//! hooked at the same point still see the packet. The NOTRACK part (priority raw) is what keeps
//! DNS out of conntrack.
//!
//! The fail-open chains (see `failopen`) live in this table too, also when the NOTRACK rules are
//! iptables rules: the table then holds only them.

use std::path::PathBuf;

use anyhow::{bail, Context};

use super::exec::{find_binary, output_text, run};
use super::failopen::{self, FailOpen};
use super::rules::{Chain, Rule, Table};

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "nodedns";

/// (chain name, hook, priority, table and chain our rules come from)
const CHAINS: [(&str, &str, &str, Table, Chain); 4] = [
    (
        "raw_prerouting",
        "prerouting",
        "raw",
        Table::Raw,
        Chain::Prerouting,
    ),
    ("raw_output", "output", "raw", Table::Raw, Chain::Output),
    (
        "filter_input",
        "input",
        "filter",
        Table::Filter,
        Chain::Input,
    ),
    (
        "filter_output",
        "output",
        "filter",
        Table::Filter,
        Chain::Output,
    ),
];

pub(crate) struct Nft {
    bin: PathBuf,
}

impl Nft {
    pub(crate) fn find() -> anyhow::Result<Self> {
        let bin = find_binary("nft").context(
            "the nftables firewall backend needs the `nft` binary (not found on PATH or in \
             /usr/sbin, /sbin)",
        )?;
        Ok(Nft { bin })
    }

    /// Atomically creates or replaces our table with exactly these rules and fail-open chains.
    pub(crate) async fn apply(&self, rules: &[Rule], failopen: &[FailOpen]) -> anyhow::Result<()> {
        let script = render(rules, failopen);
        let out = run(&self.bin, &["-f".into(), "-".into()], Some(&script))
            .await
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "nft -f - failed to apply table {FAMILY} {TABLE}: {}",
                output_text(&out)
            );
        }
        Ok(())
    }

    /// The table as `nft list table` prints it, or None when it does not exist.
    pub(crate) async fn list(&self) -> anyhow::Result<Option<String>> {
        let args = ["list", "table", FAMILY, TABLE].map(String::from);
        let out = run(&self.bin, &args, None)
            .await
            .with_context(|| format!("running {}", self.bin.display()))?;
        if out.status.success() {
            return Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()));
        }
        let text = output_text(&out);
        if text.contains("No such file or directory") {
            return Ok(None);
        }
        bail!("nft list table {FAMILY} {TABLE} failed: {text}")
    }

    /// Atomically removes our table; Ok(false) when it was not there.
    pub(crate) async fn delete(&self) -> anyhow::Result<bool> {
        if self.list().await?.is_none() {
            return Ok(false);
        }
        // Declaring the table first makes the delete succeed even if it vanished meanwhile.
        let script = format!("table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n");
        let out = run(&self.bin, &["-f".into(), "-".into()], Some(&script))
            .await
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "nft delete table {FAMILY} {TABLE} failed: {}",
                output_text(&out)
            );
        }
        Ok(true)
    }
}

/// The `nft -f` script that replaces our table in one transaction. Chains without rules are
/// left out.
pub(crate) fn render(rules: &[Rule], failopen: &[FailOpen]) -> String {
    let mut chains: Vec<(String, String, Vec<String>)> = Vec::new();
    for (name, hook, prio, table, chain) in CHAINS {
        let body: Vec<String> = rules
            .iter()
            .filter(|r| r.table == table && r.chain == chain)
            .map(Rule::nft_statement)
            .collect();
        chains.push((
            name.to_string(),
            format!("type filter hook {hook} priority {prio}; policy accept;"),
            body,
        ));
    }
    for (name, header, body) in failopen::chains(failopen) {
        chains.push((name.to_string(), header, body));
    }
    let mut s = String::new();
    s.push_str(&format!("table {FAMILY} {TABLE}\n"));
    s.push_str(&format!("delete table {FAMILY} {TABLE}\n"));
    s.push_str(&format!("table {FAMILY} {TABLE} {{\n"));
    for (name, header, body) in chains.iter().filter(|(_, _, b)| !b.is_empty()) {
        s.push_str(&format!("\tchain {name} {{\n\t\t{header}\n"));
        for r in body {
            s.push_str(&format!("\t\t{r}\n"));
        }
        s.push_str("\t}\n");
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::rules::build;

    #[test]
    fn script_replaces_the_table_in_one_go() {
        let listen = vec!["169.254.20.10:53".parse().unwrap()];
        let s = render(&build(&listen, Some(8080)), &[]);
        assert!(
            s.starts_with("table inet nodedns\ndelete table inet nodedns\ntable inet nodedns {")
        );
        assert_eq!(s.matches(" notrack comment").count(), 8);
        assert_eq!(s.matches(" accept comment").count(), 4);
        assert!(s.contains("type filter hook prerouting priority raw; policy accept;"));
        assert!(!s.contains("failopen"));
    }

    #[test]
    fn fail_open_alone_or_with_the_rules() {
        let f = FailOpen {
            from: "169.254.20.10".parse().unwrap(),
            to: "10.96.0.10".parse().unwrap(),
        };
        // With firewall = iptables the table holds only the fail-open chains.
        let alone = render(&[], std::slice::from_ref(&f));
        assert_eq!(alone.matches("\tchain ").count(), 3, "{alone}");
        assert_eq!(alone.matches("comment \"nodedns").count(), 5);
        assert!(alone.contains("chain failopen_prerouting {\n\t\ttype filter hook prerouting priority raw - 1; policy accept;"));
        let listen = vec!["169.254.20.10:53".parse().unwrap()];
        let both = render(&build(&listen, Some(8080)), std::slice::from_ref(&f));
        assert_eq!(both.matches("\tchain ").count(), 7);
        assert_eq!(both.matches("comment \"nodedns").count(), 12 + 5);
        assert!(render(&[], &[]).ends_with("table inet nodedns {\n}\n"));
    }

    #[test]
    fn one_inet_table_holds_both_families() {
        let listen = vec![
            "169.254.20.10:53".parse().unwrap(),
            "[fd00::a]:53".parse().unwrap(),
        ];
        let redirects = [
            FailOpen {
                from: "169.254.20.10".parse().unwrap(),
                to: "10.96.0.10".parse().unwrap(),
            },
            FailOpen {
                from: "fd00::a".parse().unwrap(),
                to: "fd00:10:96::a".parse().unwrap(),
            },
        ];
        let s = render(&build(&listen, Some(8080)), &redirects);
        assert_eq!(s.matches("table inet nodedns {").count(), 1);
        assert_eq!(s.matches("\tchain ").count(), 7, "{s}");
        assert_eq!(s.matches(" notrack comment").count(), 16);
        assert_eq!(s.matches(" accept comment").count(), 8);
        // node-cache's twelve per address, the fail-open chains' five per family less the
        // shared ct-mark rule.
        assert_eq!(s.matches("comment \"nodedns").count(), 24 + 9);
        for stmt in [
            "ip daddr 169.254.20.10 udp dport 53 socket transparent 0 notrack",
            "ip6 daddr fd00::a udp dport 53 socket transparent 0 notrack",
            "ip6 saddr fd00::a tcp sport 53 accept",
            "ip6 daddr fd00::a tcp dport 8080 notrack",
            "ip6 daddr fd00::a meta l4proto { tcp, udp } th dport 53 meta mark set meta mark | 0x00000040 ip6 daddr set fd00:10:96::a",
            "ip6 saddr fd00:10:96::a meta l4proto { tcp, udp } th sport 53 ip6 saddr set fd00::a",
        ] {
            assert!(s.contains(stmt), "{stmt} missing from\n{s}");
        }
    }
}
