//! Fail-open for the link-local address: when no nodedns socket would receive a query to
//! LOCAL_IP:53, it goes to the kube-dns Service instead of to a closed port.
//!
//! iptables has no stateless NAT, so these rules always live in our nftables table (`table inet
//! nodedns`), whichever firewall backend holds the NOTRACK rules. Per packet to LOCAL_IP:53:
//!
//! 1. prerouting, priority raw - 1 (before conntrack and before any raw-table NOTRACK): if a
//!    socket would receive the packet (`socket transparent 0` finds listeners, established,
//!    request and TIME_WAIT sockets alike: nodedns is up), nothing happens. Otherwise the
//!    destination becomes the Service IP (`ip daddr set`, nft fixes the IP and L4 checksums)
//!    and the packet gets our meta mark bit.
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

/// What to redirect where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FailOpen {
    /// The address pods ask (the link-local listen IP).
    pub from: IpAddr,
    /// The kube-dns Service IP.
    pub to: IpAddr,
}

/// Why fail-open is not in place, for the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotPlanned {
    /// No `fail_open_to` configured.
    Off,
    /// No listen address on port 53 of the target's family other than the target itself.
    NoSource(IpAddr),
}

/// The listen address to redirect: the first one on port 53 of the target's family that is not
/// the target itself. Further ones are not redirected (one mark bit restores one address).
pub(crate) fn plan(
    listen: &[std::net::SocketAddr],
    to: Option<IpAddr>,
) -> Result<FailOpen, NotPlanned> {
    let to = to.ok_or(NotPlanned::Off)?;
    let candidates: Vec<IpAddr> = listen
        .iter()
        .filter(|sa| sa.port() == DNS_PORT)
        .map(|sa| sa.ip())
        .filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == to.is_ipv4() && *ip != to)
        .collect();
    // The link-local address first: in transparent mode the other one is a Service IP, which
    // kube-proxy already serves once our NOTRACK stops applying.
    candidates
        .iter()
        .find(|ip| is_link_local(ip))
        .or(candidates.first())
        .map(|&from| FailOpen { from, to })
        .ok_or(NotPlanned::NoSource(to))
}

/// 169.254.0.0/16 or fe80::/10.
pub(crate) fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
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

    /// The chains, as `(name, chain header, rules)`, for an `inet` table.
    pub(crate) fn chains(&self) -> Vec<(&'static str, String, Vec<String>)> {
        let (fam, from, to) = (self.family(), self.from, self.to);
        let dns = format!("meta l4proto {{ tcp, udp }} th dport {DNS_PORT}");
        let reply = format!("meta l4proto {{ tcp, udp }} th sport {DNS_PORT}");
        let m = format!("0x{MARK:08x}");
        let not_m = format!("0x{:08x}", !MARK);
        vec![
            (
                "failopen_prerouting",
                "type filter hook prerouting priority raw - 1; policy accept;".to_string(),
                vec![
                    format!(
                        "iif \"lo\" {fam} daddr {from} {dns} return comment \"{COMMENT_HOST}\""
                    ),
                    format!(
                        "{fam} daddr {from} {dns} socket transparent 0 return comment \
                         \"{COMMENT_LISTENING}\""
                    ),
                    format!(
                        "{fam} daddr {from} {dns} meta mark set meta mark | {m} {fam} daddr set \
                         {to} comment \"{COMMENT_REDIRECT}\""
                    ),
                ],
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
                vec![format!(
                    "ct direction reply ct mark & {m} == {m} {fam} saddr {to} {reply} {fam} saddr \
                     set {from} comment \"{COMMENT_REPLY}\""
                )],
            ),
        ]
    }

    /// How many rules [`FailOpen::chains`] holds.
    pub(crate) fn rule_count(&self) -> usize {
        self.chains().iter().map(|(_, _, r)| r.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_the_link_local_address_not_the_target() {
        let listen = vec![
            "169.254.20.10:53".parse().unwrap(),
            "10.96.0.10:53".parse().unwrap(),
        ];
        let to: IpAddr = "10.96.0.10".parse().unwrap();
        let p = plan(&listen, Some(to)).unwrap();
        assert_eq!(p.from, "169.254.20.10".parse::<IpAddr>().unwrap());
        // The link-local address wins wherever it is listed.
        let upstream: IpAddr = "10.0.0.11".parse().unwrap();
        let reversed: Vec<_> = listen.iter().rev().copied().collect();
        let p = plan(&reversed, Some(upstream)).unwrap();
        assert_eq!(p.from, "169.254.20.10".parse::<IpAddr>().unwrap());
        assert_eq!(plan(&listen, None), Err(NotPlanned::Off));
        // Nothing on port 53 but the target itself: nothing to redirect.
        assert_eq!(plan(&listen[1..], Some(to)), Err(NotPlanned::NoSource(to)));
        let other_port = vec!["169.254.20.10:5353".parse().unwrap()];
        assert_eq!(plan(&other_port, Some(to)), Err(NotPlanned::NoSource(to)));
        assert_eq!(
            plan(&listen, Some("fd00::10".parse().unwrap())),
            Err(NotPlanned::NoSource("fd00::10".parse().unwrap()))
        );
    }

    #[test]
    fn renders_three_chains() {
        let p = FailOpen {
            from: "169.254.20.10".parse().unwrap(),
            to: "10.96.0.10".parse().unwrap(),
        };
        let chains = p.chains();
        assert_eq!(chains.len(), 3);
        assert_eq!(p.rule_count(), 5);
        let all: Vec<String> = chains.into_iter().flat_map(|(_, _, r)| r).collect();
        assert!(all[2].contains("ip daddr 169.254.20.10 meta l4proto { tcp, udp } th dport 53"));
        assert!(all[2].contains("meta mark set meta mark | 0x00000040 ip daddr set 10.96.0.10"));
        assert!(all[3].contains("meta mark set meta mark & 0xffffffbf"));
        assert!(all[4].contains("ip saddr 10.96.0.10"));
        assert!(all[4].ends_with("ip saddr set 169.254.20.10 comment \"nodedns: fail open: replies come from the address asked\""));
        assert!(all.iter().all(|r| r.contains("comment \"nodedns")));
    }
}
