//! Dual-stack in one process: a pod with IPv4 and IPv6 resolves over both families through ONE
//! nodedns, which holds 169.254.20.10 and fd00::a on the node and asks its upstreams over either
//! family; the rules of both families (iptables and ip6tables, or one `inet` nftables table) are
//! in place while it runs, adopted by a restart after a crash, and gone after it stops; with a
//! fail-open target per family, each family's queries reach CoreDNS while nodedns is down, in
//! link-local and in transparent mode.
//!
//! The cluster is `Cluster::create_dual` (common/netns.rs): CoreDNS answers nodedns on
//! [fd00:201::2]:53, the external resolver on 10.201.0.3:53. Needs root, `ip`, iptables-nft,
//! ip6tables-nft, nft, kdig, dig and getent; missing ones skip the test (fail under
//! NODEDNS_REQUIRE_ALL=1). No packet leaves the namespaces.

use std::time::{Duration, Instant};

use crate::common::netns::*;
use crate::common::{FakeUpstream, Via};

const CLUSTER_NAME: &str = "web.default.svc.cluster.local";
/// The kube-dns Service IPs kube-proxy serves in the fail-open test.
const KUBE_DNS_IP: &str = "10.96.0.10";
const KUBE_DNS_IP6: &str = "fd00:96::a";

fn have_tools() -> bool {
    [
        "iptables-nft",
        "iptables-nft-save",
        "ip6tables-nft",
        "ip6tables-nft-save",
        "nft",
        "kdig",
        "dig",
        "getent",
        "ss",
    ]
    .iter()
    .all(|b| have(b))
}

/// What nodedns installed on the node: our rules of each family and our nftables table.
#[derive(Debug, PartialEq, Eq)]
struct Installed {
    v4: Vec<String>,
    v6: Vec<String>,
    table: Option<String>,
}

fn installed(c: &Cluster) -> Installed {
    let (exists, table) = c.node.sh("nft list table inet nodedns");
    Installed {
        v4: c.node.our_rules("iptables-nft-save"),
        v6: c.node.our_rules("ip6tables-nft-save"),
        table: exists.then_some(table),
    }
}

/// Queries `up` got for `name`.
fn asked(up: &FakeUpstream, name: &str) -> Vec<Via> {
    up.queries()
        .into_iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, _, v)| v)
        .collect()
}

fn cluster6(c: &Cluster) -> &FakeUpstream {
    c.cluster6.as_ref().expect("a dual-stack cluster")
}

/// `kdig`/`dig` in the pod; the answer's first line.
fn ask(c: &Cluster, tool: &str, server: &str, flags: &str, name: &str) -> String {
    let cmd = match tool {
        "dig" => format!("dig @{server} {flags} +short +time=2 +tries=1 {name} A"),
        _ => format!("kdig @{server} {flags} +short +time=2 +retry=0 {name} A"),
    };
    let out = c.pod.sh_ok(&cmd);
    out.lines().next().unwrap_or_default().to_string()
}

/// `getent ahosts` with the pod's resolv.conf naming only `nameserver`.
fn getent(c: &Cluster, nameserver: &str, name: &str) -> String {
    c.set_nameserver(nameserver);
    let (ok, out) = c.pod.sh(&format!("getent ahosts {name}"));
    assert!(
        ok,
        "getent ahosts {name} with nameserver {nameserver}: {out}"
    );
    out
}

/// The nodedns sockets on port 53 (`ss` lines naming the process).
fn listeners(c: &Cluster) -> String {
    c.node
        .sh_ok("ss -Hlnup 'sport = :53'; ss -Hlntp 'sport = :53'")
}

fn serve_both_families(tag: &str, firewall: &str) {
    require!(
        have_tools(),
        "needs iptables-nft, ip6tables-nft, nft, kdig, dig, getent and ss"
    );
    let c = cluster_dual!(tag);
    let mut d = c.start_nodedns(&["--firewall", firewall]);
    let pid = d.child.id();

    // Both addresses on the node, the IPv6 one usable at once (no DAD: never "tentative").
    let lo = c.node.lo_addrs();
    assert!(lo.contains("169.254.20.10/32"), "{lo}");
    assert!(lo.contains("fd00::a/128"), "{lo}");
    assert!(!lo.contains("tentative"), "{lo}");
    // ONE process holds the sockets of both families, UDP and TCP.
    let socks = listeners(&c);
    for addr in ["169.254.20.10:53", "[fd00::a]:53"] {
        let mine: Vec<&str> = socks.lines().filter(|l| l.contains(addr)).collect();
        assert!(mine.len() >= 2, "no UDP and TCP sockets on {addr}: {socks}");
        assert!(
            mine.iter().all(|l| l.contains(&format!("pid={pid},"))),
            "{addr} not held by nodedns (pid {pid}): {socks}"
        );
    }

    // The pod resolves over either family, UDP and TCP, with dig and kdig.
    for server in [LOCAL_IP, LOCAL_IP6] {
        for (tool, flags) in [("kdig", ""), ("kdig", "+tcp"), ("dig", ""), ("dig", "+tcp")] {
            assert_eq!(
                ask(&c, tool, server, flags, "example.org"),
                "192.0.2.7",
                "{tool} {flags} @{server} example.org"
            );
            assert_eq!(
                ask(&c, tool, server, flags, CLUSTER_NAME),
                "10.96.1.5",
                "{tool} {flags} @{server} {CLUSTER_NAME}"
            );
        }
    }
    // The glibc resolver with a resolv.conf naming only one family's address, search list
    // applied (A and AAAA are asked).
    for nameserver in [LOCAL_IP6, LOCAL_IP] {
        let out = getent(&c, nameserver, "web");
        assert!(out.contains("10.96.1.5"), "{nameserver}: {out}");
        let out = getent(&c, nameserver, "example.org");
        assert!(out.contains("192.0.2.7"), "{nameserver}: {out}");
    }
    // CoreDNS was asked over IPv6 only, the external resolver over IPv4 only (the cache then
    // answered the rest).
    assert!(!asked(cluster6(&c), CLUSTER_NAME).is_empty());
    assert!(asked(&c.cluster, CLUSTER_NAME).is_empty());
    assert!(!asked(&c.external, "example.org").is_empty());
    assert!(asked(c.external6.as_ref().unwrap(), "example.org").is_empty());

    // Rules of both families; fail-open (defaulting to the IPv6 cluster DNS, the only cluster
    // DNS of a family with a node-local address) for fd00::a, none for 169.254.20.10.
    let log = d.log();
    assert!(
        log.contains("fail-open in place") && log.contains("from=fd00::a to=fd00:201::2"),
        "{log}"
    );
    assert!(log.contains("fail-open off for these addresses"), "{log}");
    let before = installed(&c);
    match firewall {
        "iptables" => {
            assert_eq!(before.v4.len(), 12, "{:#?}", before.v4);
            assert_eq!(before.v6.len(), 12, "{:#?}", before.v6);
            assert!(before.v6.iter().any(|l| l
                == "-A PREROUTING -d fd00::a/128 -p udp -m udp --dport 53 -m socket --nowildcard -m comment --comment \"nodedns: skip conntrack\" -j NOTRACK"));
            assert!(before.v6.iter().any(|l| l
                == "-A OUTPUT -s fd00::a/128 -p tcp -m tcp --sport 8080 -m comment --comment \"nodedns: skip conntrack for health checks\" -j NOTRACK"));
            assert!(before.v4.iter().all(|l| l.contains("169.254.20.10/32")));
            // The table holds the fail-open chains alone.
            let t = before.table.as_deref().expect("our nftables table");
            assert_eq!(t.matches("comment \"nodedns").count(), 5, "{t}");
            assert!(d.log().contains("added=24 total=24"), "{}", d.log());
        }
        _ => {
            assert!(before.v4.is_empty() && before.v6.is_empty(), "{before:?}");
            let t = before.table.as_deref().expect("our nftables table");
            assert_eq!(t.matches("comment \"nodedns").count(), 24 + 5, "{t}");
            // Per family: NOTRACK and ACCEPT for UDP and TCP to the address, NOTRACK for
            // host-network clients' UDP and TCP and for the health port; fd00::a also has the
            // three fail-open rules.
            assert_eq!(t.matches("ip daddr 169.254.20.10 ").count(), 7, "{t}");
            assert_eq!(t.matches("ip6 daddr fd00::a ").count(), 7 + 3, "{t}");
            assert!(
                t.contains("ip6 daddr fd00::a udp dport 53 socket transparent 0 notrack"),
                "{t}"
            );
            assert!(t.contains("ip6 daddr set fd00:201::2"), "{t}");
        }
    }
    // Exactly one nftables table, of family inet.
    let tables = c.node.sh_ok("nft list tables");
    assert_eq!(tables.matches("nodedns").count(), 1, "{tables}");
    assert!(tables.contains("table inet nodedns"), "{tables}");

    // The sync loop (every second here) puts back a lost IPv6 address and IPv6 rules.
    c.node.sh_ok("ip addr del fd00::a/128 dev lo");
    match firewall {
        "iptables" => {
            c.node
                .sh_ok("ip6tables-nft -t raw -F PREROUTING && ip6tables-nft -F INPUT");
        }
        _ => {
            c.node.sh_ok("nft flush chain inet nodedns raw_prerouting");
        }
    }
    assert_ne!(installed(&c), before);
    let deadline = Instant::now() + Duration::from_secs(10);
    while installed(&c) != before || !c.node.lo_addrs().contains("fd00::a/128") {
        assert!(
            Instant::now() < deadline,
            "not restored within 10 s: {:?}\n{}",
            installed(&c),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        ask(&c, "kdig", LOCAL_IP6, "+tcp", "example.org"),
        "192.0.2.7"
    );

    // A crash leaves everything; the restart adopts both families' rules as they are.
    d.sigkill();
    drop(d);
    assert_eq!(installed(&c), before);
    c.set_nameserver(LOCAL_IP);
    let mut d = c.start_nodedns(&["--firewall", firewall]);
    assert_eq!(installed(&c), before, "{}", d.log());
    if firewall == "iptables" {
        assert!(d.log().contains("added=0 total=24"), "{}", d.log());
    }
    assert!(
        !d.log().contains("removed iptables rules of an earlier"),
        "{}",
        d.log()
    );
    assert_eq!(ask(&c, "kdig", LOCAL_IP6, "", "example.org"), "192.0.2.7");

    // A clean stop removes the rules of both families and both addresses.
    d.terminate();
    let after = installed(&c);
    assert_eq!(
        after,
        Installed {
            v4: vec![],
            v6: vec![],
            table: None
        }
    );
    let lo = c.node.lo_addrs();
    assert!(
        !lo.contains("169.254.20.10") && !lo.contains("fd00::a"),
        "{lo}"
    );
}

#[test]
fn dual_stack_one_process_iptables() {
    serve_both_families("dsi", "iptables");
}

#[test]
fn dual_stack_one_process_nftables() {
    serve_both_families("dsn", "nftables");
}

/// One `getent hosts` with the pod's resolv.conf naming `nameserver`; how long it took.
fn lookup(c: &Cluster, nameserver: &str) -> Duration {
    c.set_nameserver(nameserver);
    let started = Instant::now();
    let (ok, out) = c.pod.sh(&format!("getent hosts {CLUSTER_NAME}"));
    let took = started.elapsed();
    assert!(
        ok && out.contains("10.96.1.5"),
        "getent hosts {CLUSTER_NAME} via {nameserver}: {out}"
    );
    took
}

/// With nodedns killed, each family's queries reach CoreDNS. Link-local mode: queries to
/// 169.254.20.10 and fd00::a go to the kube-dns IP of their family (one fail-open target per
/// family), which kube-proxy DNATs to CoreDNS. Transparent mode: nodedns also holds both kube-dns
/// IPs; pods asking those are conntracked again once no socket listens (ip6tables' `-m socket`
/// as iptables') and kube-proxy's DNAT applies.
fn fail_open_per_family(tag: &str, firewall: &str, transparent: bool) {
    require!(
        have_tools(),
        "needs iptables-nft, ip6tables-nft, nft, kdig, dig, getent and ss"
    );
    let c = cluster_dual!(tag);
    c.fake_kube_proxy(KUBE_DNS_IP);
    c.fake_kube_proxy6(KUBE_DNS_IP6);
    let targets = format!("{KUBE_DNS_IP},{KUBE_DNS_IP6}");
    let mut args = vec!["--firewall", firewall, "--fail-open-to", &targets];
    let kube_dns6 = format!("[{KUBE_DNS_IP6}]:53");
    if transparent {
        args.extend(["--listen", "10.96.0.10:53", "--listen", &kube_dns6]);
    }
    let (ask4, ask6) = if transparent {
        (KUBE_DNS_IP, KUBE_DNS_IP6)
    } else {
        (LOCAL_IP, LOCAL_IP6)
    };
    let mut d = c.start_nodedns(&args);
    let log = d.log();
    assert!(log.contains("from=169.254.20.10 to=10.96.0.10"), "{log}");
    assert!(log.contains("from=fd00::a to=fd00:96::a"), "{log}");
    assert!(!log.contains("fail-open off"), "{log}");
    let before = installed(&c);
    let t = before.table.as_deref().expect("our nftables table");
    assert!(
        t.contains("ip daddr set 10.96.0.10") && t.contains("ip6 daddr set fd00:96::a"),
        "{t}"
    );
    let per_ip = if transparent { 2 } else { 1 };
    match firewall {
        "iptables" => {
            assert_eq!(
                (before.v4.len(), before.v6.len()),
                (12 * per_ip, 12 * per_ip)
            );
        }
        _ => assert_eq!(
            t.matches("comment \"nodedns").count(),
            24 * per_ip + 9,
            "{t}"
        ),
    }
    // While nodedns serves, CoreDNS sees only nodedns's own (TCP, IPv6) queries.
    lookup(&c, ask4);
    lookup(&c, ask6);
    assert!(asked(&c.cluster, CLUSTER_NAME).is_empty());
    assert!(asked(cluster6(&c), CLUSTER_NAME)
        .iter()
        .all(|v| *v == Via::Tcp));

    d.sigkill();
    drop(d);
    assert_eq!(installed(&c), before);
    let (ok, out) = c.node.sh("ss -Hlnu 'sport = :53'");
    assert!(
        ok && out.trim().is_empty(),
        "something still listens: {out}"
    );

    // Each family's queries reach CoreDNS over that family, at once (no timeout, no retry).
    for (nameserver, up) in [(ask4, &c.cluster), (ask6, cluster6(&c))] {
        let udp_before = asked(up, CLUSTER_NAME)
            .iter()
            .filter(|v| **v == Via::Udp)
            .count();
        for _ in 0..5 {
            let took = lookup(&c, nameserver);
            assert!(took < Duration::from_secs(1), "{nameserver}: {took:?}");
        }
        let udp = asked(up, CLUSTER_NAME)
            .iter()
            .filter(|v| **v == Via::Udp)
            .count();
        assert!(
            udp >= udp_before + 5,
            "{nameserver}: CoreDNS got {udp} UDP queries"
        );
        let out = c.pod.sh_ok(&format!(
            "kdig @{nameserver} +tcp +short +time=1 +retry=0 {CLUSTER_NAME} A"
        ));
        assert_eq!(out.trim(), "10.96.1.5", "kdig +tcp @{nameserver}");
    }

    // The restart adopts both families' redirects and rules; the stop removes them.
    let mut d = c.start_nodedns(&args);
    assert_eq!(installed(&c), before, "{}", d.log());
    let udp_before = asked(cluster6(&c), CLUSTER_NAME).len();
    lookup(&c, ask6);
    lookup(&c, ask4);
    assert!(
        asked(cluster6(&c), CLUSTER_NAME)[udp_before..]
            .iter()
            .all(|v| *v == Via::Tcp),
        "a query bypassed the restarted nodedns"
    );
    d.terminate();
    let after = installed(&c);
    assert!(
        after.v4.is_empty() && after.v6.is_empty() && after.table.is_none(),
        "{after:?}"
    );
}

#[test]
fn dual_stack_fails_open_per_family_iptables() {
    fail_open_per_family("dfi", "iptables", false);
}

#[test]
fn dual_stack_fails_open_per_family_nftables() {
    fail_open_per_family("dfn", "nftables", false);
}

#[test]
fn dual_stack_transparent_falls_back_per_family_iptables() {
    fail_open_per_family("dti", "iptables", true);
}

#[test]
fn dual_stack_transparent_falls_back_per_family_nftables() {
    fail_open_per_family("dtn", "nftables", true);
}
