//! The conntrack-bypass rule set, described once and rendered for iptables and nftables.
//!
//! For every listen IP and port this is node-cache's set of twelve rules: NOTRACK in raw
//! PREROUTING/OUTPUT and ACCEPT in filter INPUT/OUTPUT for DNS over UDP and TCP in both
//! directions, NOTRACK in raw OUTPUT for clients on the host network, and NOTRACK for the
//! health port in both directions.
//!
//! One difference from node-cache: the NOTRACK in raw PREROUTING applies only while a socket
//! that would receive the packet exists (iptables `-m socket --nowildcard`, nftables `socket
//! transparent 0`; both also find the request and TIME_WAIT sockets of a TCP handshake or close
//! in progress, which `socket wildcard` does not), i.e. while nodedns runs. When it is gone, pods' packets are conntracked again:
//! to the kube-dns IP (transparent mode) kube-proxy's DNAT takes them to CoreDNS, to the
//! link-local IP the fail-open redirect does (see `failopen`). Neither match can be used in raw
//! OUTPUT: iptables refuses `-m socket` there, and nftables' `socket` looks at the sending
//! socket there, so NOTRACK for host-network clients stays unconditional.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

/// Every comment we attach starts with this, so our rules can be found again (and swept on
/// teardown) even when the listen addresses changed between runs.
pub const COMMENT_PREFIX: &str = "nodedns";

const SKIP_CONNTRACK: &str = "nodedns: skip conntrack";
const ALLOW_DNS: &str = "nodedns: allow DNS traffic";
const HOST_CLIENTS: &str = "nodedns: skip conntrack for host-network clients";
const HEALTH: &str = "nodedns: skip conntrack for health checks";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Table {
    Raw,
    Filter,
}

impl Table {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Raw => "raw",
            Table::Filter => "filter",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Chain {
    Prerouting,
    Input,
    Output,
}

impl Chain {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Chain::Prerouting => "PREROUTING",
            Chain::Input => "INPUT",
            Chain::Output => "OUTPUT",
        }
    }
}

/// The (table, chain) pairs our rules live in; teardown sweeps exactly these.
pub(crate) const CHAINS: [(Table, Chain); 4] = [
    (Table::Raw, Chain::Prerouting),
    (Table::Raw, Chain::Output),
    (Table::Filter, Chain::Input),
    (Table::Filter, Chain::Output),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// Whether the rule matches the destination (`-d IP --dport P`) or the source (`-s IP --sport P`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Dir {
    Dst,
    Src,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Verdict {
    Notrack,
    Accept,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Rule {
    pub table: Table,
    pub chain: Chain,
    pub ip: IpAddr,
    pub proto: Proto,
    pub dir: Dir,
    pub port: u16,
    pub verdict: Verdict,
    /// Only while a socket that would receive the packet exists (raw PREROUTING).
    pub if_listening: bool,
    pub comment: &'static str,
}

impl Rule {
    pub(crate) fn is_v6(&self) -> bool {
        self.ip.is_ipv6()
    }

    /// The rule specification after `-t TABLE -X CHAIN`, as given to `-C`, `-I` and `-D`.
    pub(crate) fn iptables_args(&self) -> Vec<String> {
        let (addr_flag, port_flag) = match self.dir {
            Dir::Dst => ("-d", "--dport"),
            Dir::Src => ("-s", "--sport"),
        };
        let target = match self.verdict {
            Verdict::Notrack => "NOTRACK",
            Verdict::Accept => "ACCEPT",
        };
        let socket: &[&str] = if self.if_listening {
            &["-m", "socket", "--nowildcard"]
        } else {
            &[]
        };
        [
            "-p",
            self.proto.name(),
            addr_flag,
            &self.ip.to_string(),
            port_flag,
            &self.port.to_string(),
        ]
        .iter()
        .chain(socket)
        .chain(&["-m", "comment", "--comment", self.comment, "-j", target])
        .map(|s| s.to_string())
        .collect()
    }

    /// The rule as `iptables -S CHAIN` prints it, split into arguments, to recognise it among
    /// the rules found in a chain.
    pub(crate) fn save_args(&self) -> Vec<String> {
        let (addr_flag, port_flag) = match self.dir {
            Dir::Dst => ("-d", "--dport"),
            Dir::Src => ("-s", "--sport"),
        };
        let prefix = if self.is_v6() { 128 } else { 32 };
        let mut args: Vec<String> = [
            "-A",
            self.chain.name(),
            addr_flag,
            &format!("{}/{prefix}", self.ip),
            "-p",
            self.proto.name(),
            "-m",
            self.proto.name(),
            port_flag,
            &self.port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.if_listening {
            args.extend(["-m", "socket", "--nowildcard"].map(String::from));
        }
        args.extend(
            ["-m", "comment", "--comment", self.comment, "-j"]
                .iter()
                .map(|s| s.to_string()),
        );
        args.push(
            match self.verdict {
                Verdict::Notrack => "NOTRACK",
                Verdict::Accept => "ACCEPT",
            }
            .to_string(),
        );
        args
    }

    /// The rule as an nftables statement inside a chain of an `inet` table.
    pub(crate) fn nft_statement(&self) -> String {
        let family = if self.is_v6() { "ip6" } else { "ip" };
        let (addr, port) = match self.dir {
            Dir::Dst => ("daddr", "dport"),
            Dir::Src => ("saddr", "sport"),
        };
        let verdict = match self.verdict {
            Verdict::Notrack => "notrack",
            Verdict::Accept => "accept",
        };
        let socket = if self.if_listening {
            " socket transparent 0"
        } else {
            ""
        };
        format!(
            "{family} {addr} {ip} {proto} {port} {num}{socket} {verdict} comment \"{comment}\"",
            ip = self.ip,
            proto = self.proto.name(),
            num = self.port,
            comment = self.comment,
        )
    }

    /// Human-readable form for logs: the iptables command that adds it.
    pub(crate) fn describe(&self) -> String {
        let bin = if self.is_v6() {
            "ip6tables"
        } else {
            "iptables"
        };
        let args: Vec<String> = self
            .iptables_args()
            .into_iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("\"{a}\"")
                } else {
                    a
                }
            })
            .collect();
        format!(
            "{bin} -t {} -I {} {}",
            self.table.name(),
            self.chain.name(),
            args.join(" ")
        )
    }
}

/// The IPs nodedns answers on: every listen IP except the unspecified address (which names no
/// IP to hold or match), deduplicated, in the order given.
pub(crate) fn listen_ips(listen: &[SocketAddr]) -> Vec<IpAddr> {
    let mut seen = BTreeSet::new();
    listen
        .iter()
        .map(|sa| sa.ip())
        .filter(|ip| !ip.is_unspecified())
        .filter(|ip| seen.insert(*ip))
        .collect()
}

/// Builds the full rule set for the listen addresses and the optional health port.
pub(crate) fn build(listen: &[SocketAddr], health_port: Option<u16>) -> Vec<Rule> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut push = |r: Rule| {
        if seen.insert(r.clone()) {
            out.push(r);
        }
    };
    let endpoints = listen.iter().filter(|sa| !sa.ip().is_unspecified());
    for sa in endpoints {
        let (ip, port) = (sa.ip(), sa.port());
        for proto in [Proto::Udp, Proto::Tcp] {
            let rule = |table, chain, dir, verdict, comment| Rule {
                table,
                chain,
                ip,
                proto,
                dir,
                port,
                verdict,
                if_listening: table == Table::Raw && chain == Chain::Prerouting,
                comment,
            };
            push(rule(
                Table::Raw,
                Chain::Prerouting,
                Dir::Dst,
                Verdict::Notrack,
                SKIP_CONNTRACK,
            ));
            push(rule(
                Table::Filter,
                Chain::Input,
                Dir::Dst,
                Verdict::Accept,
                ALLOW_DNS,
            ));
            push(rule(
                Table::Raw,
                Chain::Output,
                Dir::Src,
                Verdict::Notrack,
                SKIP_CONNTRACK,
            ));
            push(rule(
                Table::Filter,
                Chain::Output,
                Dir::Src,
                Verdict::Accept,
                ALLOW_DNS,
            ));
            push(rule(
                Table::Raw,
                Chain::Output,
                Dir::Dst,
                Verdict::Notrack,
                HOST_CLIENTS,
            ));
        }
    }
    if let Some(h) = health_port {
        for ip in listen_ips(listen) {
            for dir in [Dir::Dst, Dir::Src] {
                push(Rule {
                    table: Table::Raw,
                    chain: Chain::Output,
                    ip,
                    proto: Proto::Tcp,
                    dir,
                    port: h,
                    verdict: Verdict::Notrack,
                    if_listening: false,
                    comment: HEALTH,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twelve_rules_per_ip_with_health_port() {
        let listen: Vec<SocketAddr> = vec![
            "169.254.20.10:53".parse().unwrap(),
            "10.96.0.10:53".parse().unwrap(),
        ];
        let rules = build(&listen, Some(8080));
        assert_eq!(rules.len(), 24);
        // Listing the same address twice (UDP and TCP listeners) adds nothing.
        let doubled: Vec<SocketAddr> = listen.iter().chain(listen.iter()).copied().collect();
        assert_eq!(build(&doubled, Some(8080)), rules);
        assert_eq!(build(&listen, None).len(), 20);
        assert!(rules.iter().all(|r| r.comment.starts_with(COMMENT_PREFIX)));
    }

    #[test]
    fn renders_iptables_and_nft() {
        let listen: Vec<SocketAddr> = vec!["[fd00::10]:5353".parse().unwrap()];
        let rules = build(&listen, None);
        let r = &rules[0];
        assert!(r.is_v6());
        assert_eq!(
            r.iptables_args().join(" "),
            "-p udp -d fd00::10 --dport 5353 -m socket --nowildcard -m comment --comment nodedns: skip conntrack -j NOTRACK"
        );
        assert_eq!(
            r.save_args().join(" "),
            "-A PREROUTING -d fd00::10/128 -p udp -m udp --dport 5353 -m socket --nowildcard -m comment --comment nodedns: skip conntrack -j NOTRACK"
        );
        assert_eq!(
            r.nft_statement(),
            "ip6 daddr fd00::10 udp dport 5353 socket transparent 0 notrack comment \"nodedns: skip conntrack\""
        );
        // Only raw PREROUTING is conditional: replies and host-network clients are not.
        assert_eq!(rules.iter().filter(|r| r.if_listening).count(), 2);
        assert!(rules
            .iter()
            .filter(|r| r.if_listening)
            .all(|r| r.table == Table::Raw && r.chain == Chain::Prerouting));
        let out = rules
            .iter()
            .find(|r| r.chain == Chain::Output && r.table == Table::Raw)
            .unwrap();
        assert!(!out.nft_statement().contains("socket"));
    }

    #[test]
    fn dual_stack_gets_the_same_rules_in_each_family() {
        let listen: Vec<SocketAddr> = vec![
            "169.254.20.10:53".parse().unwrap(),
            "[fd00::a]:53".parse().unwrap(),
        ];
        let rules = build(&listen, Some(8080));
        assert_eq!(rules.len(), 24);
        let (v6, v4): (Vec<&Rule>, Vec<&Rule>) = rules.iter().partition(|r| r.is_v6());
        assert_eq!((v4.len(), v6.len()), (12, 12));
        // Rule for rule the same set, only the address differs.
        for (a, b) in v4.iter().zip(&v6) {
            assert_eq!(
                (
                    a.table,
                    a.chain,
                    a.proto,
                    a.dir,
                    a.port,
                    a.verdict,
                    a.if_listening
                ),
                (
                    b.table,
                    b.chain,
                    b.proto,
                    b.dir,
                    b.port,
                    b.verdict,
                    b.if_listening
                )
            );
            assert_eq!(a.comment, b.comment);
        }
        assert!(v4.iter().all(|r| r.describe().starts_with("iptables -t ")));
        assert!(v6.iter().all(|r| r.describe().starts_with("ip6tables -t ")));
        assert!(v6
            .iter()
            .all(|r| r.save_args().contains(&"fd00::a/128".to_string())));
        assert!(v6.iter().all(|r| r.nft_statement().starts_with("ip6 ")));
        assert!(v4.iter().all(|r| r.nft_statement().starts_with("ip ")));
        let health = v6
            .iter()
            .find(|r| r.port == 8080 && r.dir == Dir::Src)
            .unwrap();
        assert_eq!(
            health.describe(),
            "ip6tables -t raw -I OUTPUT -p tcp -s fd00::a --sport 8080 -m comment --comment \
             \"nodedns: skip conntrack for health checks\" -j NOTRACK"
        );
        assert_eq!(listen_ips(&listen).len(), 2);
    }

    #[test]
    fn unspecified_listen_ip_is_ignored() {
        let listen: Vec<SocketAddr> = vec!["0.0.0.0:53".parse().unwrap()];
        assert!(build(&listen, Some(8080)).is_empty());
        assert!(listen_ips(&listen).is_empty());
    }
}
