//! When no nodedns runs on a node, pods' DNS still works through CoreDNS: the fail-open tests.
//!
//! A "node" namespace plays kube-proxy (iptables nat DNAT from the kube-dns Service IP
//! 10.96.0.10:53 to the fake CoreDNS at 10.201.0.2:53); nodedns runs there with node setup on
//! `lo`, a "pod" namespace asks it through its glibc resolver (`getent`). nodedns is SIGKILLed,
//! so its address and rules stay as after a crash, OOM kill or failed start; then every lookup
//! must be answered by CoreDNS within 1 s. A restarted nodedns must adopt what it finds.
//!
//! Needs root, `ip`, iptables-nft, nft, getent and kdig; missing ones skip the test (fail under
//! NODEDNS_REQUIRE_ALL=1). No packet leaves the namespaces.

use std::time::{Duration, Instant};

use crate::common::netns::*;
use crate::common::Via;

const KUBE_DNS_IP: &str = "10.96.0.10";
const NAME: &str = "web.default.svc.cluster.local";
/// Lookups in a row after the kill: past the kernel's ICMP rate-limit burst (about 6), so a
/// setup that relied on port-unreachable errors would show timeouts.
const LOOKUPS: usize = 10;
const LOOKUP_DEADLINE: Duration = Duration::from_secs(1);

/// Every test here needs these tools besides root and `ip`.
fn have_tools() -> bool {
    have("iptables-nft")
        && have("iptables-nft-save")
        && have("nft")
        && have("getent")
        && have("kdig")
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Pods ask 169.254.20.10; the fail-open redirect sends it to the Service when nobody
    /// listens.
    LinkLocal,
    /// Pods ask the kube-dns IP, which nodedns also holds; without a live socket the packets
    /// are conntracked and kube-proxy's DNAT applies.
    Transparent,
}

/// Queries the fake CoreDNS got for NAME over `via`.
fn coredns_count(c: &Cluster, via: Via) -> usize {
    c.cluster
        .queries()
        .iter()
        .filter(|(n, _, v)| n == NAME && *v == via)
        .count()
}

/// One `getent hosts NAME` in the pod; returns how long it took. Panics unless it resolved.
fn lookup(c: &Cluster) -> Duration {
    let started = Instant::now();
    let (ok, out) = c.pod.sh(&format!("getent hosts {NAME}"));
    let took = started.elapsed();
    assert!(
        ok && out.contains("10.96.1.5"),
        "getent hosts {NAME}: {out}"
    );
    took
}

/// What nodedns installed: our iptables rules (both iptables backends) and our nftables table.
#[derive(Debug, PartialEq, Eq)]
struct Installed {
    iptables_nft: Vec<String>,
    iptables_legacy: Vec<String>,
    nft_table: Option<String>,
    nft_tables_named_ours: usize,
}

fn installed(c: &Cluster) -> Installed {
    let (exists, table) = c.node.sh("nft list table inet nodedns");
    let tables = c.node.sh_ok("nft list tables");
    Installed {
        iptables_nft: c.node.our_rules("iptables-nft-save"),
        iptables_legacy: if have("iptables-legacy-save") {
            c.node.our_rules("iptables-legacy-save")
        } else {
            Vec::new()
        },
        nft_table: exists.then_some(table),
        nft_tables_named_ours: tables
            .lines()
            .filter(|l| l.trim() == "table inet nodedns")
            .count(),
    }
}

fn crash_and_recover(tag: &str, mode: Mode, firewall: &str) {
    require!(have_tools(), "needs iptables-nft, nft, getent and kdig");
    let c = cluster!(tag);
    c.fake_kube_proxy(KUBE_DNS_IP);
    let mut args = vec!["--firewall", firewall, "--fail-open-to", KUBE_DNS_IP];
    if mode == Mode::Transparent {
        c.set_nameserver(KUBE_DNS_IP);
        args.extend(["--listen", "10.96.0.10:53"]);
    }
    let ask = match mode {
        Mode::LinkLocal => LOCAL_IP,
        Mode::Transparent => KUBE_DNS_IP,
    };

    let mut d = c.start_nodedns(&args);
    let log = d.log();
    assert!(
        log.contains("fail-open in place") && log.contains("from=169.254.20.10 to=10.96.0.10"),
        "{log}"
    );
    // nodedns serves: the pod's lookups reach CoreDNS only as nodedns's own TCP queries.
    lookup(&c);
    assert!(coredns_count(&c, Via::Tcp) >= 1);
    assert_eq!(coredns_count(&c, Via::Udp), 0, "a query bypassed nodedns");
    let before = installed(&c);
    match firewall {
        "iptables" => {
            assert_eq!(before.iptables_nft.len(), rules_per_ip(mode) * 12);
            // The fail-open redirect alone in our table.
            let t = before.nft_table.as_deref().expect("our nftables table");
            assert_eq!(t.matches("comment \"nodedns").count(), 5, "{t}");
        }
        _ => {
            assert!(before.iptables_nft.is_empty(), "{:?}", before.iptables_nft);
            let t = before.nft_table.as_deref().expect("our nftables table");
            assert_eq!(
                t.matches("comment \"nodedns").count(),
                rules_per_ip(mode) * 12 + 5,
                "{t}"
            );
        }
    }

    // Crash: address and rules stay.
    d.sigkill();
    drop(d);
    assert!(c.node.lo_addrs().contains("169.254.20.10/32"));
    assert_eq!(installed(&c), before);
    let (ok, out) = c.node.sh("ss -lnu 'sport = :53'");
    assert!(
        ok && !out.contains(":53 "),
        "something still listens: {out}"
    );

    // Every lookup is answered, by CoreDNS through kube-proxy, within the deadline.
    let udp_before = coredns_count(&c, Via::Udp);
    let mut took = Vec::new();
    for _ in 0..LOOKUPS {
        took.push(lookup(&c));
    }
    let slowest = *took.iter().max().unwrap();
    eprintln!("{mode:?}/{firewall}: {LOOKUPS} lookups with nodedns down, slowest {slowest:?}, all {took:?}");
    assert!(
        slowest < LOOKUP_DEADLINE,
        "a lookup took {slowest:?}: {took:?}"
    );
    assert!(
        coredns_count(&c, Via::Udp) >= udp_before + LOOKUPS,
        "the pod's queries did not reach CoreDNS directly"
    );
    // Host-network clients are not redirected (their NOTRACK is in raw OUTPUT, where no socket
    // check is possible); they are refused at once, not left waiting.
    c.set_node_nameserver(ask);
    let started = Instant::now();
    let (ok, out) = c.node.sh(&format!("getent hosts {NAME}"));
    let refused_after = started.elapsed();
    c.clear_node_nameserver();
    eprintln!("{mode:?}/{firewall}: host-network lookup refused after {refused_after:?}");
    assert!(
        !ok && out.trim().is_empty(),
        "host-network client answered: {out}"
    );
    assert!(
        refused_after < LOOKUP_DEADLINE,
        "host-network client waited {refused_after:?}: {out}"
    );
    // TCP too (a whole handshake through the redirect and the DNAT).
    let started = Instant::now();
    let out = c.pod.sh_ok(&format!(
        "kdig @{ask} +tcp +short +time=1 +retry=0 {NAME} A"
    ));
    assert_eq!(out.trim(), "10.96.1.5", "kdig +tcp @{ask}");
    assert!(started.elapsed() < LOOKUP_DEADLINE);

    // Restart: the leftovers are adopted as they are, and nodedns serves again.
    let mut d = c.start_nodedns(&args);
    assert_eq!(installed(&c), before, "{}", d.log());
    assert_eq!(before.nft_tables_named_ours, 1);
    if firewall == "iptables" {
        assert!(
            d.log()
                .contains(&format!("added=0 total={}", rules_per_ip(mode) * 12)),
            "{}",
            d.log()
        );
    }
    assert!(
        !d.log().contains("removed iptables rules of an earlier"),
        "{}",
        d.log()
    );
    let udp_after_restart = coredns_count(&c, Via::Udp);
    for _ in 0..3 {
        lookup(&c);
    }
    let out = c.pod.sh_ok(&format!(
        "kdig @{ask} +tcp +short +time=1 +retry=0 {NAME} A"
    ));
    assert_eq!(out.trim(), "10.96.1.5");
    assert_eq!(
        coredns_count(&c, Via::Udp),
        udp_after_restart,
        "queries bypassed the restarted nodedns"
    );
    d.terminate();
    let after = installed(&c);
    assert!(
        after.iptables_nft.is_empty() && after.nft_table.is_none(),
        "{after:?}"
    );
}

fn rules_per_ip(mode: Mode) -> usize {
    match mode {
        Mode::LinkLocal => 1,
        Mode::Transparent => 2,
    }
}

#[test]
fn link_local_mode_fails_open_iptables() {
    crash_and_recover("fli", Mode::LinkLocal, "iptables");
}

#[test]
fn link_local_mode_fails_open_nftables() {
    crash_and_recover("fln", Mode::LinkLocal, "nftables");
}

#[test]
fn transparent_mode_fails_open_iptables() {
    crash_and_recover("fti", Mode::Transparent, "iptables");
}

#[test]
fn transparent_mode_fails_open_nftables() {
    crash_and_recover("ftn", Mode::Transparent, "nftables");
}

#[test]
fn node_cache_rules_are_removed_on_start() {
    require!(have_tools(), "needs iptables-nft, nft, getent and kdig");
    let c = cluster!("fnc");
    c.fake_kube_proxy(KUBE_DNS_IP);
    // What node-cache leaves on a node it ran on (its own rule set, for 169.254.20.10), and a
    // foreign rule that must stay.
    let mut node_cache = Vec::new();
    for proto in ["udp", "tcp"] {
        for (table, chain, m, verdict, comment) in [
            ("raw", "PREROUTING", "-d", "NOTRACK", "skip conntrack"),
            ("raw", "OUTPUT", "-s", "NOTRACK", "skip conntrack"),
            ("filter", "INPUT", "-d", "ACCEPT", "allow DNS traffic"),
            ("filter", "OUTPUT", "-s", "ACCEPT", "allow DNS traffic"),
        ] {
            let port = if m == "-d" { "--dport" } else { "--sport" };
            node_cache.push(format!(
                "iptables-nft -t {table} -A {chain} -p {proto} {m} {LOCAL_IP} {port} 53 \
                 -m comment --comment \"NodeLocal DNS Cache: {comment}\" -j {verdict}"
            ));
        }
    }
    for rule in &node_cache {
        c.node.sh_ok(rule);
    }
    c.node
        .sh_ok("iptables-nft -t raw -A PREROUTING -p icmp -m comment --comment other -j ACCEPT");
    let leftovers = |c: &Cluster| {
        c.node
            .sh_ok("iptables-nft-save")
            .lines()
            .filter(|l| l.contains("NodeLocal DNS Cache"))
            .count()
    };
    assert_eq!(leftovers(&c), 8);

    let mut d = c.start_nodedns(&["--fail-open-to", KUBE_DNS_IP]);
    assert_eq!(leftovers(&c), 0, "{}", c.node.sh_ok("iptables-nft-save"));
    assert!(
        d.log().contains("removed node-cache's iptables rules") && d.log().contains("removed=8 "),
        "{}",
        d.log()
    );
    assert!(c
        .node
        .sh_ok("iptables-nft -t raw -S PREROUTING")
        .contains("--comment other -j ACCEPT"));
    assert_eq!(c.node.our_rules("iptables-nft-save").len(), 12);
    assert!(
        !d.log().contains("removed iptables rules of an earlier"),
        "{}",
        d.log()
    );

    // Nothing unconditional is left to defeat the fail-open: with nodedns gone, the pod's
    // lookups are answered.
    d.sigkill();
    drop(d);
    for _ in 0..3 {
        assert!(lookup(&c) < LOOKUP_DEADLINE);
    }

    // With firewall = nftables node-cache's iptables rules go too, and so do ours from the
    // iptables run above (the table now holds every rule).
    for rule in &node_cache {
        c.node.sh_ok(rule);
    }
    assert_eq!(leftovers(&c), 8);
    let d = c.start_nodedns(&["--firewall", "nftables", "--fail-open-to", KUBE_DNS_IP]);
    assert_eq!(leftovers(&c), 0, "{}", c.node.sh_ok("iptables-nft-save"));
    assert!(c.node.our_rules("iptables-nft-save").is_empty());
    assert!(
        d.log().contains("removed node-cache's iptables rules")
            && d.log().contains("removed iptables rules of an earlier"),
        "{}",
        d.log()
    );
    let table = c.node.sh_ok("nft list table inet nodedns");
    assert_eq!(
        table.matches("comment \"nodedns").count(),
        12 + 5,
        "{table}"
    );
    lookup(&c);
}
