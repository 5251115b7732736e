//! Fail-open for the node-local address: when no nodedns socket would receive a query to
//! LOCAL_IP:53, it goes to the kube-dns Service instead of to a closed port. One redirect per IP
//! family (169.254.20.10 to the IPv4 Service IP, fd00::a to the IPv6 one), in the same chains.
//!
//! iptables has no stateless NAT, so these rules always live in our nftables table (`table inet
//! nodedns`), whichever firewall backend holds the NOTRACK rules. Per packet to LOCAL_IP:53:
//!
//! 1. prerouting, priority raw - 1 (before conntrack and before any raw-table NOTRACK): if a
//!    socket would receive the packet (`socket transparent 0` finds listeners, established,
//!    request and TIME_WAIT sockets alike: nodedns is up), nothing happens. Otherwise the
//!    destination becomes the Service IP of the same family (`ip daddr set`, `ip6 daddr set`;
//!    nft fixes the checksums) and the packet gets our meta mark bit.
//! 2. prerouting, priority -199 (just after conntrack created the entry for the Service IP):
//!    the meta mark bit moves to the ct mark, so the connection remembers it was redirected.
//!    kube-proxy's DNAT (nat PREROUTING) then carries it to a CoreDNS pod as for any client.
//! 3. postrouting, priority srcnat + 1 (after conntrack's un-DNAT turned the CoreDNS pod IP back
//!    into the Service IP): replies of marked connections get LOCAL_IP back as their source, so
//!    the pod's connected socket accepts them.
//!
//! Packets that arrive on `lo` are left alone: they come from host-network clients, whose
//! packets were already NOTRACKed in raw OUTPUT (where the `socket` expression sees the sending
//! socket, not a listener, so no condition can be put there). Such a client gets an immediate
//! refusal (ICMP on loopback is not rate-limited; TCP RST) while nodedns is down.

use std::net::IpAddr;

/// The packet and conntrack mark bit of a redirected connection. Outside kube-proxy's
/// 0x4000/0x8000, Calico's 0xffff0000, Cilium's 0x0f00 and the AWS VPC CNI's 0x80; the packet
/// bit is cleared again right after conntrack (priority -199), so only raw-table rules can see
/// it on the packet.
pub(crate) const MARK: u32 = 0x0000_0040;

/// The Service port: only LOCAL_IP:53 is redirected, as kube-dns serves port 53.
pub(crate) const DNS_PORT: u16 = 53;

const COMMENT_LISTENING: &str = "nodedns: fail open: nodedns listens, leave it";
const COMMENT_HOST: &str = "nodedns: fail open: host-network clients are not redirected";
const COMMENT_REDIRECT: &str = "nodedns: fail open: nobody listens, send to the Service";
const COMMENT_CTMARK: &str = "nodedns: fail open: remember the redirect in the ct mark";
const COMMENT_REPLY: &str = "nodedns: fail open: replies come from the address asked";

/// What to redirect where, for one IP family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FailOpen {
    /// The address pods ask (the node-local listen IP).
    pub from: IpAddr,
    /// The kube-dns Service IP of the same family.
    pub to: IpAddr,
}

/// The redirects to install (at most one per family) and the targets that got none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub redirects: Vec<FailOpen>,
    /// Targets with no listen address on port 53 of their family other than themselves.
    pub no_source: Vec<IpAddr>,
}

/// For every target (one per family, see the config's `node.fail_open_to`): the listen address
/// to redirect, the first one on port 53 of the target's family that is not the target itself,
/// a node-local one (see [`is_node_local`]) first. Further ones are not redirected (one mark bit
/// restores one address per family).
pub(crate) fn plan(listen: &[std::net::SocketAddr], targets: &[IpAddr]) -> Plan {
    let mut plan = Plan::default();
    for &to in targets {
        let candidates: Vec<IpAddr> = listen
            .iter()
            .filter(|sa| sa.port() == DNS_PORT)
            .map(|sa| sa.ip())
            .filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == to.is_ipv4() && *ip != to)
            .collect();
        // The node-local address first: in transparent mode the other one is a Service IP,
        // which kube-proxy already serves once our NOTRACK stops applying.
        match candidates
            .iter()
            .find(|ip| is_node_local(ip))
            .or(candidates.first())
        {
            Some(&from) => plan.redirects.push(FailOpen { from, to }),
            None => plan.no_source.push(to),
        }
    }
    plan
}

/// The node-local ranges node-local-dns suggests for its listen address: 169.254.0.0/16 for
/// IPv4; fe80::/10 and the unique local fd00::/8 for IPv6.
pub(crate) fn is_node_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            (first & 0xffc0) == 0xfe80 || (first & 0xff00) == 0xfd00
        }
    }
}

impl FailOpen {
    fn family(&self) -> &'static str {
        if self.from.is_ipv4() {
            "ip"
        } else {
            "ip6"
        }
    }

    fn prerouting(&self) -> Vec<String> {
        let (fam, from, to) = (self.family(), self.from, self.to);
        let dns = format!("meta l4proto {{ tcp, udp }} th dport {DNS_PORT}");
        let m = format!("0x{MARK:08x}");
        vec![
            format!("iif \"lo\" {fam} daddr {from} {dns} return comment \"{COMMENT_HOST}\""),
            format!(
                "{fam} daddr {from} {dns} socket transparent 0 return comment \
                 \"{COMMENT_LISTENING}\""
            ),
            format!(
                "{fam} daddr {from} {dns} meta mark set meta mark | {m} {fam} daddr set \
                 {to} comment \"{COMMENT_REDIRECT}\""
            ),
        ]
    }

    fn reply(&self) -> String {
        let (fam, from, to) = (self.family(), self.from, self.to);
        let reply = format!("meta l4proto {{ tcp, udp }} th sport {DNS_PORT}");
        let m = format!("0x{MARK:08x}");
        format!(
            "ct direction reply ct mark & {m} == {m} {fam} saddr {to} {reply} {fam} saddr \
             set {from} comment \"{COMMENT_REPLY}\""
        )
    }
}

/// The chains of all redirects, as `(name, chain header, rules)`, for an `inet` table. The
/// families share the mark bit: a connection has one family, and the reply rule matches it.
pub(crate) fn chains(redirects: &[FailOpen]) -> Vec<(&'static str, String, Vec<String>)> {
    if redirects.is_empty() {
        return Vec::new();
    }
    let m = format!("0x{MARK:08x}");
    let not_m = format!("0x{:08x}", !MARK);
    vec![
        (
            "failopen_prerouting",
            "type filter hook prerouting priority raw - 1; policy accept;".to_string(),
            redirects.iter().flat_map(FailOpen::prerouting).collect(),
        ),
        (
            "failopen_ctmark",
            "type filter hook prerouting priority -199; policy accept;".to_string(),
            vec![format!(
                "meta mark & {m} == {m} ct mark set ct mark | {m} meta mark set meta mark & \
                 {not_m} comment \"{COMMENT_CTMARK}\""
            )],
        ),
        (
            "failopen_reply",
            "type filter hook postrouting priority srcnat + 1; policy accept;".to_string(),
            redirects.iter().map(FailOpen::reply).collect(),
        ),
    ]
}

/// How many rules [`chains`] holds.
pub(crate) fn rule_count(redirects: &[FailOpen]) -> usize {
    chains(redirects).iter().map(|(_, _, r)| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn plans_the_node_local_address_not_the_target() {
        let listen = vec![
            "169.254.20.10:53".parse().unwrap(),
            "10.96.0.10:53".parse().unwrap(),
        ];
        let to = ip("10.96.0.10");
        let p = plan(&listen, &[to]);
        assert_eq!(
            p.redirects,
            vec![FailOpen {
                from: ip("169.254.20.10"),
                to
            }]
        );
        // The link-local address wins wherever it is listed.
        let upstream = ip("10.0.0.11");
        let reversed: Vec<_> = listen.iter().rev().copied().collect();
        assert_eq!(
            plan(&reversed, &[upstream]).redirects[0].from,
            ip("169.254.20.10")
        );
        assert_eq!(plan(&listen, &[]), Plan::default());
        // Nothing on port 53 but the target itself: nothing to redirect.
        assert_eq!(plan(&listen[1..], &[to]).no_source, vec![to]);
        let other_port = vec!["169.254.20.10:5353".parse().unwrap()];
        assert_eq!(plan(&other_port, &[to]).no_source, vec![to]);
        // No IPv6 listen address: an IPv6 target has nothing to redirect.
        let p = plan(&listen, &[to, ip("fd00::10")]);
        assert_eq!(p.redirects.len(), 1);
        assert_eq!(p.no_source, vec![ip("fd00::10")]);
    }

    #[test]
    fn plans_one_redirect_per_family() {
        // Transparent dual-stack: node-local and kube-dns IPs of both families.
        let listen: Vec<std::net::SocketAddr> = [
            "10.96.0.10:53",
            "[fd00:10:96::a]:53",
            "169.254.20.10:53",
            "[fd00::a]:53",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let p = plan(&listen, &[ip("10.96.0.11"), ip("fd00:10:96::b")]);
        assert!(p.no_source.is_empty());
        assert_eq!(
            p.redirects,
            vec![
                FailOpen {
                    from: ip("169.254.20.10"),
                    to: ip("10.96.0.11")
                },
                // Both IPv6 addresses are unique local ones: the first listed wins.
                FailOpen {
                    from: ip("fd00:10:96::a"),
                    to: ip("fd00:10:96::b")
                },
            ]
        );
        assert!(is_node_local(&ip("fe80::1")) && is_node_local(&ip("fd00::a")));
        assert!(!is_node_local(&ip("fc00::a")) && !is_node_local(&ip("2001:db8::1")));
        assert!(!is_node_local(&ip("10.96.0.10")));
    }

    #[test]
    fn renders_three_chains() {
        let p = FailOpen {
            from: ip("169.254.20.10"),
            to: ip("10.96.0.10"),
        };
        let chains = chains(std::slice::from_ref(&p));
        assert_eq!(chains.len(), 3);
        assert_eq!(rule_count(&[p]), 5);
        let all: Vec<String> = chains.into_iter().flat_map(|(_, _, r)| r).collect();
        assert!(all[2].contains("ip daddr 169.254.20.10 meta l4proto { tcp, udp } th dport 53"));
        assert!(all[2].contains("meta mark set meta mark | 0x00000040 ip daddr set 10.96.0.10"));
        assert!(all[3].contains("meta mark set meta mark & 0xffffffbf"));
        assert!(all[4].contains("ip saddr 10.96.0.10"));
        assert!(all[4].ends_with("ip saddr set 169.254.20.10 comment \"nodedns: fail open: replies come from the address asked\""));
        assert!(all.iter().all(|r| r.contains("comment \"nodedns")));
        assert!(super::chains(&[]).is_empty());
    }

    #[test]
    fn renders_both_families_in_the_same_chains() {
        let v4 = FailOpen {
            from: ip("169.254.20.10"),
            to: ip("10.96.0.10"),
        };
        let v6 = FailOpen {
            from: ip("fd00::a"),
            to: ip("fd00:10:96::a"),
        };
        let chains = chains(&[v4, v6]);
        assert_eq!(chains.len(), 3);
        let (_, _, pre) = &chains[0];
        assert_eq!(pre.len(), 6);
        assert!(pre[3].starts_with(
            "iif \"lo\" ip6 daddr fd00::a meta l4proto { tcp, udp } th dport 53 return"
        ));
        assert!(pre[4].starts_with(
            "ip6 daddr fd00::a meta l4proto { tcp, udp } th dport 53 socket transparent 0 return"
        ));
        assert!(pre[5].contains("ip6 daddr fd00::a meta l4proto { tcp, udp } th dport 53 meta mark set meta mark | 0x00000040 ip6 daddr set fd00:10:96::a"));
        // One ct-mark rule serves both families.
        assert_eq!(chains[1].2.len(), 1);
        let (_, _, reply) = &chains[2];
        assert_eq!(reply.len(), 2);
        assert!(
            reply[0].contains("ip saddr 10.96.0.10 ")
                && reply[0].contains("ip saddr set 169.254.20.10 ")
        );
        assert!(
            reply[1].contains("ip6 saddr fd00:10:96::a ")
                && reply[1].contains("ip6 saddr set fd00::a ")
        );
    }
}
