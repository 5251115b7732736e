//! Node integration inside throw-away network namespaces.
//!
//! Every test creates its own namespace (`nodedns-t-<pid>-<tag>`, deleted on drop even when the
//! test fails) and drives `nodedns::node::NodeManager` from a thread that has `setns`-ed into it,
//! then reads the result back with `ip netns exec NAME iptables-save / nft / ip`.
//!
//! Needs root plus `ip`, and per test `iptables-nft`, `iptables-legacy` or `nft`. Missing ones
//! make the test print `SKIP: reason` and pass, unless `NODEDNS_REQUIRE_ALL=1`, which turns every
//! skip into a failure. No packet leaves the namespaces.

use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::netns::*;
use nodedns::node::{Firewall, NodeConfig, NodeManager, SetupErrorSink};

// ---------------------------------------------------------------------------------------------
// Harness

/// Records every setup error the manager reports.
#[derive(Default)]
struct Errors(Mutex<Vec<&'static str>>);

impl SetupErrorSink for Errors {
    fn setup_error(&self, errortype: &'static str) {
        self.0.lock().unwrap().push(errortype);
    }
}

impl Errors {
    fn count(&self, errortype: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|t| **t == errortype)
            .count()
    }
    fn all(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().clone()
    }
}

fn manager(cfg: NodeConfig) -> (Arc<NodeManager>, Arc<Errors>) {
    let errors = Arc::new(Errors::default());
    let sink: Arc<dyn SetupErrorSink> = errors.clone();
    (Arc::new(NodeManager::new(cfg, sink)), errors)
}

fn lo_config(listen: &[&str]) -> NodeConfig {
    NodeConfig {
        setup_interface: true,
        interface_name: "lo".into(),
        setup_iptables: true,
        firewall: Firewall::Iptables,
        sync_interval: Duration::from_secs(60),
        skip_teardown: false,
        listen: listen.iter().map(|s| s.parse().unwrap()).collect(),
        health_port: Some(8080),
        fail_open_to: Vec::new(),
    }
}

const RAW_UDP_PREROUTING: &str = "-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m socket --nowildcard -m comment --comment \"nodedns: skip conntrack\" -j NOTRACK";

// ---------------------------------------------------------------------------------------------
// Interface

#[test]
fn missing_dummy_link_type_gives_a_clear_error() {
    let ns = netns!("dummy");
    let (probe_ok, _) = ns.sh("ip link add nodedns-probe type dummy && ip link del nodedns-probe");
    let cfg = NodeConfig {
        setup_interface: true,
        listen: vec!["169.254.20.10:53".parse().unwrap()],
        ..NodeConfig::default()
    };
    assert_eq!(cfg.interface_name, "nodelocaldns");
    let (m, errors) = manager(cfg);
    let res = ns.setup_interface(&m);
    if probe_ok {
        // A kernel with the dummy type: the real path must work and teardown must delete it.
        res.expect("create dummy link");
        let link = ns.sh_ok("ip -d addr show dev nodelocaldns");
        assert!(link.contains("dummy"), "{link}");
        assert!(link.contains("169.254.20.10/32"), "{link}");
        ns.teardown(&m).expect("teardown");
        let (exists, _) = ns.sh("ip link show nodelocaldns");
        assert!(!exists, "teardown must delete the dummy link it created");
        return;
    }
    let err = format!(
        "{:#}",
        res.expect_err("this kernel cannot create dummy links")
    );
    eprintln!("error as reported: {err}");
    assert!(err.contains("no `dummy` link type"), "{err}");
    assert!(err.contains("--interface-name lo"), "{err}");
    assert_eq!(errors.count("interface_add"), 1, "{:?}", errors.all());
    let (exists, _) = ns.sh("ip link show nodelocaldns");
    assert!(!exists);
    // sync keeps trying and keeps counting.
    assert!(ns.sync(&m).is_err());
    assert_eq!(errors.count("interface_add"), 2);
}

#[test]
fn existing_link_gets_only_our_addresses_and_survives_teardown() {
    let ns = netns!("lo");
    // An address the operator put there; we must not take it away.
    ns.sh_ok("ip addr add 169.254.20.11/32 dev lo");
    let mut cfg = lo_config(&["169.254.20.10:53", "169.254.20.11:53", "[fd00::53]:53"]);
    cfg.setup_iptables = false;
    let (m, errors) = manager(cfg);

    ns.setup_interface(&m).expect("setup_interface on lo");
    let addrs = ns.lo_addrs();
    assert!(addrs.contains("169.254.20.10/32"), "{addrs}");
    assert!(addrs.contains("fd00::53/128"), "{addrs}");
    assert!(!addrs.contains("tentative"), "{addrs}");
    // Idempotent.
    ns.setup_interface(&m).expect("second setup_interface");
    assert_eq!(ns.lo_addrs().matches("169.254.20.10/32").count(), 1);

    // A deleted address comes back on sync.
    ns.sh_ok("ip addr del 169.254.20.10/32 dev lo");
    assert!(!ns.lo_addrs().contains("169.254.20.10/32"));
    ns.sync(&m).expect("sync");
    assert!(ns.lo_addrs().contains("169.254.20.10/32"));

    ns.teardown(&m).expect("teardown");
    let addrs = ns.lo_addrs();
    assert!(!addrs.contains("169.254.20.10/32"), "{addrs}");
    assert!(!addrs.contains("fd00::53/128"), "{addrs}");
    assert!(
        addrs.contains("169.254.20.11/32"),
        "pre-existing address removed: {addrs}"
    );
    assert!(addrs.contains("127.0.0.1/8"), "{addrs}");
    let lo = ns.sh_ok("ip link show lo");
    assert!(lo.contains("UP"), "lo must stay up: {lo}");
    assert!(errors.all().is_empty(), "{:?}", errors.all());
}

#[test]
fn addresses_left_by_a_killed_run_are_removed_by_the_next_teardown() {
    let ns = netns!("crash");
    let mut cfg = lo_config(&["169.254.20.10:53", "[fd00::53]:53"]);
    cfg.setup_iptables = false;
    let (first, _) = manager(cfg.clone());
    ns.setup_interface(&first).expect("setup_interface");
    drop(first); // SIGKILL: no teardown
    assert!(ns.lo_addrs().contains("169.254.20.10/32"));

    // A new process has no memory of what it added; the address marker says it is ours.
    let (second, errors) = manager(cfg);
    ns.teardown(&second).expect("teardown");
    let addrs = ns.lo_addrs();
    assert!(!addrs.contains("169.254.20.10/32"), "{addrs}");
    assert!(!addrs.contains("fd00::53/128"), "{addrs}");
    assert!(errors.all().is_empty());
}

// ---------------------------------------------------------------------------------------------
// iptables

#[test]
fn iptables_rules_are_installed_restored_and_removed() {
    require!(
        have("iptables-nft") && have("iptables-nft-save"),
        "needs iptables-nft"
    );
    let ns = netns!("ipt");
    // Someone else's rule, which must stay below ours and survive our teardown.
    ns.sh_ok("iptables-nft -t raw -A PREROUTING -p icmp -j ACCEPT");
    // Leftovers from a run with another listen address, and from an older nodedns whose
    // NOTRACK was unconditional: setup removes both (it installs neither).
    ns.sh_ok("iptables-nft -t raw -A OUTPUT -d 169.254.99.99/32 -p udp --dport 53 -m comment --comment \"nodedns: skip conntrack\" -j NOTRACK");
    ns.sh_ok("iptables-nft -t raw -A PREROUTING -d 169.254.20.10/32 -p udp --dport 53 -m comment --comment \"nodedns: skip conntrack\" -j NOTRACK");
    let (m, errors) = manager(lo_config(&["169.254.20.10:53"]));
    ns.setup_interface(&m).expect("setup_interface");
    ns.setup_rules(&m).expect("setup_rules");

    let rules = ns.our_rules("iptables-nft-save");
    assert_eq!(rules.len(), 12, "{rules:#?}");
    assert!(
        !rules.iter().any(|r| r.contains("169.254.99.99")),
        "{rules:#?}"
    );
    assert!(
        !rules
            .iter()
            .any(|r| r.contains("-A PREROUTING") && !r.contains("-m socket --nowildcard")),
        "{rules:#?}"
    );
    let raw = ns.sh_ok("iptables-nft -t raw -S");
    let filter = ns.sh_ok("iptables-nft -S");
    // Backend detection must not have instantiated empty legacy tables.
    assert!(!raw.contains("iptables-legacy tables present"), "{raw}");
    for want in [
        RAW_UDP_PREROUTING,
        "-A PREROUTING -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m socket --nowildcard -m comment --comment \"nodedns: skip conntrack\" -j NOTRACK",
        "-A OUTPUT -s 169.254.20.10/32 -p udp -m udp --sport 53 -m comment --comment \"nodedns: skip conntrack\" -j NOTRACK",
        "-A OUTPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m comment --comment \"nodedns: skip conntrack for host-network clients\" -j NOTRACK",
        "-A OUTPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 8080 -m comment --comment \"nodedns: skip conntrack for health checks\" -j NOTRACK",
        "-A OUTPUT -s 169.254.20.10/32 -p tcp -m tcp --sport 8080 -m comment --comment \"nodedns: skip conntrack for health checks\" -j NOTRACK",
    ] {
        assert!(raw.lines().any(|l| l == want), "missing `{want}` in\n{raw}");
    }
    for want in [
        "-A INPUT -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment \"nodedns: allow DNS traffic\" -j ACCEPT",
        "-A INPUT -d 169.254.20.10/32 -p tcp -m tcp --dport 53 -m comment --comment \"nodedns: allow DNS traffic\" -j ACCEPT",
        "-A OUTPUT -s 169.254.20.10/32 -p udp -m udp --sport 53 -m comment --comment \"nodedns: allow DNS traffic\" -j ACCEPT",
        "-A OUTPUT -s 169.254.20.10/32 -p tcp -m tcp --sport 53 -m comment --comment \"nodedns: allow DNS traffic\" -j ACCEPT",
    ] {
        assert!(filter.lines().any(|l| l == want), "missing `{want}` in\n{filter}");
    }
    // Inserted at the top: the foreign rule is now last in PREROUTING.
    let prerouting = ns.sh_ok("iptables-nft -t raw -S PREROUTING");
    assert_eq!(
        prerouting.lines().rfind(|l| l.starts_with("-A")),
        Some("-A PREROUTING -p icmp -j ACCEPT"),
        "{prerouting}"
    );
    // Idempotent: nothing doubles.
    ns.setup_rules(&m).expect("second setup_rules");
    assert_eq!(ns.our_rules("iptables-nft-save"), rules);
    // Nothing went to the legacy backend, nor to ip6tables.
    if have("iptables-legacy-save") {
        assert!(ns.our_rules("iptables-legacy-save").is_empty());
    }
    assert!(ns.our_rules("ip6tables-nft-save").is_empty());

    // A rule deleted by hand is back after one sync.
    ns.sh_ok(&format!(
        "iptables-nft -t raw {}",
        RAW_UDP_PREROUTING.replacen("-A", "-D", 1)
    ));
    assert_eq!(ns.our_rules("iptables-nft-save").len(), 11);
    ns.sync(&m).expect("sync");
    let raw = ns.sh_ok("iptables-nft -t raw -S");
    assert!(raw.lines().any(|l| l == RAW_UDP_PREROUTING), "{raw}");
    assert_eq!(ns.our_rules("iptables-nft-save").len(), 12);

    // A rule of ours that appeared while running is not ours to keep: teardown sweeps it too.
    ns.sh_ok("iptables-nft -t raw -A OUTPUT -d 169.254.99.99/32 -p udp --dport 53 -m comment --comment \"nodedns: skip conntrack\" -j NOTRACK");
    assert_eq!(ns.our_rules("iptables-nft-save").len(), 13);
    ns.teardown(&m).expect("teardown");
    assert!(
        ns.our_rules("iptables-nft-save").is_empty(),
        "{:#?}",
        ns.our_rules("iptables-nft-save")
    );
    let prerouting = ns.sh_ok("iptables-nft -t raw -S PREROUTING");
    assert!(prerouting.contains("-A PREROUTING -p icmp -j ACCEPT"));
    assert!(!ns.lo_addrs().contains("169.254.20.10/32"));
    // After teardown, sync does nothing (no rule comes back).
    ns.sync(&m).expect("sync after teardown");
    assert!(ns.our_rules("iptables-nft-save").is_empty());
    assert!(errors.all().is_empty(), "{:?}", errors.all());
}

#[test]
fn switching_the_firewall_backend_moves_the_rules() {
    require!(
        have("iptables-nft-save") && have("nft"),
        "needs iptables-nft and nft"
    );
    let ns = netns!("switch");
    let mut cfg = lo_config(&["169.254.20.10:53"]);
    cfg.setup_interface = false;
    cfg.fail_open_to = vec!["10.96.0.10".parse().unwrap()];
    // A run with firewall = iptables: 12 iptables rules, the fail-open redirect alone in nft.
    let (first, _) = manager(cfg.clone());
    ns.setup_rules(&first).expect("setup_rules (iptables)");
    assert_eq!(ns.our_rules("iptables-nft-save").len(), 12);
    let table = ns.sh_ok("nft list table inet nodedns");
    assert_eq!(table.matches("comment \"nodedns").count(), 5, "{table}");
    drop(first); // killed: nothing torn down

    // The next run uses nftables: the iptables rules go, the table holds everything.
    cfg.firewall = Firewall::Nftables;
    let (second, errors) = manager(cfg.clone());
    ns.setup_rules(&second).expect("setup_rules (nftables)");
    assert!(ns.our_rules("iptables-nft-save").is_empty());
    let table = ns.sh_ok("nft list table inet nodedns");
    assert_eq!(
        table.matches("comment \"nodedns").count(),
        12 + 5,
        "{table}"
    );
    drop(second);

    // Back to iptables without fail-open: the rules return and our nftables table goes.
    cfg.firewall = Firewall::Iptables;
    cfg.fail_open_to = Vec::new();
    let (third, _) = manager(cfg);
    ns.setup_rules(&third)
        .expect("setup_rules (iptables, no fail-open)");
    assert_eq!(ns.our_rules("iptables-nft-save").len(), 12);
    assert!(!ns.sh("nft list table inet nodedns").0);
    ns.teardown(&third).expect("teardown");
    assert!(ns.our_rules("iptables-nft-save").is_empty());
    assert!(errors.all().is_empty(), "{:?}", errors.all());
}

#[test]
fn ipv6_listen_address_uses_ip6tables() {
    require!(
        have("ip6tables-nft") && have("ip6tables-nft-save") && have("iptables-nft-save"),
        "needs ip6tables-nft"
    );
    let ns = netns!("ip6");
    let (m, errors) = manager(lo_config(&["[fd00::53]:53"]));
    ns.setup_interface(&m).expect("setup_interface");
    ns.setup_rules(&m).expect("setup_rules");
    let v6 = ns.our_rules("ip6tables-nft-save");
    assert_eq!(v6.len(), 12, "{v6:#?}");
    assert!(v6.iter().any(|l| l
        == "-A PREROUTING -d fd00::53/128 -p udp -m udp --dport 53 -m socket --nowildcard -m comment --comment \"nodedns: skip conntrack\" -j NOTRACK"));
    assert!(ns.our_rules("iptables-nft-save").is_empty());
    ns.teardown(&m).expect("teardown");
    assert!(ns.our_rules("ip6tables-nft-save").is_empty());
    assert!(errors.all().is_empty(), "{:?}", errors.all());
}

#[test]
fn skip_teardown_leaves_rules_and_addresses() {
    require!(have("iptables-nft-save"), "needs iptables-nft");
    let ns = netns!("skip");
    let mut cfg = lo_config(&["169.254.20.10:53"]);
    cfg.skip_teardown = true;
    let (m, _) = manager(cfg);
    ns.setup_interface(&m).expect("setup_interface");
    ns.setup_rules(&m).expect("setup_rules");
    ns.teardown(&m).expect("teardown");
    assert_eq!(ns.our_rules("iptables-nft-save").len(), 12);
    assert!(ns.lo_addrs().contains("169.254.20.10/32"));
}

#[test]
fn legacy_backend_is_used_when_kubelet_uses_it() {
    require!(
        have("iptables-legacy") && have("iptables-legacy-save") && have("iptables-nft-save"),
        "needs both iptables-legacy and iptables-nft"
    );
    let ns = netns!("legacy");
    // kubelet leaves this hint chain in the backend it uses.
    ns.sh_ok("iptables-legacy -t mangle -N KUBE-KUBELET-CANARY");
    let mut cfg = lo_config(&["169.254.20.10:53"]);
    cfg.setup_interface = false;
    let (m, errors) = manager(cfg);
    ns.setup_rules(&m).expect("setup_rules");
    assert_eq!(ns.our_rules("iptables-legacy-save").len(), 12);
    assert!(ns.our_rules("iptables-nft-save").is_empty());

    // While someone holds the xtables lock, a sync waits, gives up and counts iptables_lock.
    ns.sh_ok(&format!(
        "iptables-legacy -t raw {}",
        RAW_UDP_PREROUTING.replacen("-A", "-D", 1)
    ));
    let lock_path = std::env::var("XTABLES_LOCKFILE").unwrap_or("/run/xtables.lock".into());
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .expect("open xtables lock");
    // SAFETY: flock on an fd we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let started = Instant::now();
    let res = ns.sync(&m);
    drop(lock);
    let err = format!(
        "{:#}",
        res.expect_err("sync must fail while the lock is held")
    );
    assert!(err.contains("xtables lock"), "{err}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "did not wait for the lock"
    );
    assert!(errors.count("iptables_lock") >= 1, "{:?}", errors.all());
    assert_eq!(errors.count("iptables"), 0, "{:?}", errors.all());

    // Lock released: the next sync restores the rule.
    ns.sync(&m).expect("sync");
    assert_eq!(ns.our_rules("iptables-legacy-save").len(), 12);
    ns.teardown(&m).expect("teardown");
    assert!(ns.our_rules("iptables-legacy-save").is_empty());
}

#[test]
fn sync_loop_restores_rules_and_stops_on_shutdown() {
    require!(have("iptables-nft-save"), "needs iptables-nft");
    let ns = netns!("loop");
    let mut cfg = lo_config(&["169.254.20.10:53"]);
    cfg.sync_interval = Duration::from_millis(200);
    let (m, _) = manager(cfg);
    ns.setup_interface(&m).expect("setup_interface");
    ns.setup_rules(&m).expect("setup_rules");

    let (tx, rx) = tokio::sync::watch::channel(false);
    let name = ns.name.clone();
    let looper = std::thread::spawn({
        let m = Arc::clone(&m);
        move || {
            call_in(&name, &m, move |m| async move {
                let mut rx = rx;
                m.run_sync_loop(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
            })
        }
    });
    ns.sh_ok(&format!(
        "iptables-nft -t raw {}",
        RAW_UDP_PREROUTING.replacen("-A", "-D", 1)
    ));
    ns.sh_ok("ip addr del 169.254.20.10/32 dev lo");
    let deadline = Instant::now() + Duration::from_secs(10);
    while (ns.our_rules("iptables-nft-save").len() < 12
        || !ns.lo_addrs().contains("169.254.20.10/32"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(ns.our_rules("iptables-nft-save").len(), 12);
    assert!(ns.lo_addrs().contains("169.254.20.10/32"));
    tx.send(true).unwrap();
    let stopped = Instant::now();
    looper.join().unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(5));
    ns.teardown(&m).expect("teardown");
    assert!(ns.our_rules("iptables-nft-save").is_empty());
}

// ---------------------------------------------------------------------------------------------
// nftables

#[test]
fn nftables_table_is_applied_restored_and_removed_atomically() {
    require!(have("nft"), "needs nft");
    let ns = netns!("nft");
    let mut cfg = lo_config(&["169.254.20.10:53", "[fd00::53]:53"]);
    cfg.firewall = Firewall::Nftables;
    let (m, errors) = manager(cfg);
    ns.setup_interface(&m).expect("setup_interface");
    ns.setup_rules(&m).expect("setup_rules");

    let table = ns.sh_ok("nft list table inet nodedns");
    assert_eq!(table.matches("comment \"nodedns").count(), 24, "{table}");
    assert!(table.contains("type filter hook prerouting priority raw; policy accept;"));
    assert!(table.contains("type filter hook input priority filter; policy accept;"));
    assert!(table.contains(
        "ip daddr 169.254.20.10 udp dport 53 socket transparent 0 notrack comment \"nodedns: skip conntrack\""
    ));
    assert!(table
        .contains("ip6 saddr fd00::53 tcp sport 53 accept comment \"nodedns: allow DNS traffic\""));
    // Replacing is idempotent.
    ns.setup_rules(&m).expect("second setup_rules");
    assert_eq!(ns.sh_ok("nft list table inet nodedns"), table);

    // Watch the ruleset: every change we make must be exactly one transaction (generation).
    let mut monitor = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "monitor"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("nft monitor");
    std::thread::sleep(Duration::from_millis(500));

    // A rule deleted by hand: sync re-applies the whole table.
    let handles = ns.sh_ok("nft -a list chain inet nodedns raw_prerouting");
    let handle = handles
        .lines()
        .find(|l| l.contains("ip daddr 169.254.20.10 udp dport 53 socket transparent 0 notrack"))
        .and_then(|l| l.rsplit("# handle ").next())
        .expect("rule handle")
        .trim()
        .to_string();
    ns.sh_ok(&format!(
        "nft delete rule inet nodedns raw_prerouting handle {handle}"
    ));
    assert_ne!(ns.sh_ok("nft list table inet nodedns"), table);
    ns.sync(&m).expect("sync after deletion");
    assert_eq!(ns.sh_ok("nft list table inet nodedns"), table);

    // A foreign rule slipped into our table: replaced too.
    ns.sh_ok("nft add rule inet nodedns raw_output udp dport 9999 notrack");
    ns.sync(&m).expect("sync after change");
    assert_eq!(ns.sh_ok("nft list table inet nodedns"), table);
    // The table deleted wholesale comes back.
    ns.sh_ok("nft delete table inet nodedns");
    ns.sync(&m).expect("sync after table deletion");
    assert_eq!(ns.sh_ok("nft list table inet nodedns"), table);
    // A sync with nothing to do changes nothing.
    ns.sync(&m).expect("idle sync");

    ns.teardown(&m).expect("teardown");
    let (exists, text) = ns.sh("nft list table inet nodedns");
    assert!(!exists, "table still there after teardown: {text}");
    assert!(!ns.lo_addrs().contains("169.254.20.10/32"));

    std::thread::sleep(Duration::from_millis(300));
    let _ = monitor.kill();
    let out = monitor.wait_with_output().expect("monitor output");
    let events = String::from_utf8_lossy(&out.stdout);
    let generations = events
        .lines()
        .filter(|l| l.starts_with("# new generation"))
        .count();
    // hand delete rule, sync, hand add rule, sync, hand delete table, sync, teardown = 7.
    assert_eq!(
        generations, 7,
        "one transaction per change expected:\n{events}"
    );
    assert!(
        events
            .lines()
            .filter(|l| l.starts_with("add rule inet nodedns"))
            .count()
            >= 3 * 24,
        "{events}"
    );
    assert!(errors.all().is_empty(), "{:?}", errors.all());
}

// ---------------------------------------------------------------------------------------------
// End to end: the nodedns binary on a "node", queried from a "pod" through a veth pair, with
// cluster and external upstreams in a namespace of their own.

#[test]
fn pod_resolves_through_nodedns_and_sigterm_cleans_up() {
    require!(
        have("kdig") && have("getent") && have("iptables-nft-save"),
        "needs kdig, getent and iptables-nft"
    );
    let c = cluster!("e2e");
    let mut d = c.start_nodedns(&[]);

    // The glibc resolver in the pod: search list + ndots:5, cluster and external names.
    let out = c.pod.sh_ok("getent hosts web");
    assert!(out.contains("10.96.1.5"), "getent hosts web: {out}");
    let out = c.pod.sh_ok("getent hosts example.org");
    assert!(out.contains("192.0.2.7"), "getent hosts example.org: {out}");
    // kdig over UDP and TCP.
    for tcp in ["", "+tcp"] {
        let out = c.pod.sh_ok(&format!(
            "kdig @{LOCAL_IP} {tcp} +short web.default.svc.cluster.local A"
        ));
        assert_eq!(out.trim(), "10.96.1.5", "kdig {tcp}");
        let out = c
            .pod
            .sh_ok(&format!("kdig @{LOCAL_IP} {tcp} +short example.org A"));
        assert_eq!(out.trim(), "192.0.2.7", "kdig {tcp}");
    }
    assert!(c.cluster.count("web.default.svc.cluster.local") >= 1);
    assert!(c.external.count("example.org") >= 1);
    // The search list walk went through nodedns to the cluster upstream.
    assert!(c.cluster.count("example.org.default.svc.cluster.local") >= 1);

    // Interface and rules in place on the node; with firewall = iptables the fail-open redirect
    // (5 rules, to the cluster DNS IP by default) is the only content of our nftables table.
    assert!(c.node.lo_addrs().contains("169.254.20.10/32"));
    assert_eq!(c.node.our_rules("iptables-nft-save").len(), 12);
    let table = c.node.sh_ok("nft list table inet nodedns");
    assert_eq!(table.matches("comment \"nodedns").count(), 5, "{table}");
    assert!(table.contains("ip daddr set 10.201.0.2"), "{table}");

    // A rule deleted by hand is back within one sync interval (1 s).
    c.node.sh_ok(&format!(
        "iptables-nft -t raw {}",
        RAW_UDP_PREROUTING.replacen("-A", "-D", 1)
    ));
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.node.our_rules("iptables-nft-save").len() < 12 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        c.node.our_rules("iptables-nft-save").len(),
        12,
        "{}",
        d.log()
    );
    assert!(d.log().contains("added it back"), "{}", d.log());

    // The fail-open table deleted by hand is back within one sync interval too.
    c.node.sh_ok("nft delete table inet nodedns");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.node.sh("nft list table inet nodedns").0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        c.node.sh_ok("nft list table inet nodedns"),
        table,
        "{}",
        d.log()
    );

    // SIGTERM: every rule, our table and our address go; lo stays.
    d.terminate();
    assert!(c.node.our_rules("iptables-nft-save").is_empty());
    assert!(!c.node.sh("nft list table inet nodedns").0);
    let addrs = c.node.lo_addrs();
    assert!(!addrs.contains("169.254.20.10/32"), "{addrs}");
    assert!(addrs.contains("127.0.0.1/8"), "{addrs}");
}

#[test]
fn reply_over_the_mtu_goes_out_truncated_not_fragmented() {
    require!(have("kdig"), "needs kdig");
    let c = cluster!("mtu");
    // Our EDNS size above the link MTU, as an operator might set it: the ~2,100-byte answer fits
    // the client's buffer but not the pod link (MTU 1500).
    let cfg = std::env::temp_dir().join(format!("{}-nodedns.toml", c.node.name));
    std::fs::write(&cfg, "[server]\nedns_udp_size = 4096\n").unwrap();
    let d = c.start_nodedns(&["--config", cfg.to_str().unwrap()]);
    let query = format!("kdig @{LOCAL_IP} +bufsize=4096 +time=2 +retry=0 big.example.org TXT");

    // Over UDP the client gets TC=1 with the question and our OPT, not IP fragments: first from
    // the miss path, then from a cache hit (the batch path).
    for path in ["miss", "hit"] {
        let out = c.pod.sh_ok(&format!("{query} +ignore"));
        let flags = out.lines().find(|l| l.contains("Flags:")).unwrap_or("");
        assert!(
            flags.contains(" tc"),
            "{path}: no TC over UDP: {out}\n{}",
            d.log()
        );
        assert!(flags.contains("ANSWER: 0"), "{path}: {out}");
        assert!(
            out.contains("EDNS PSEUDOSECTION"),
            "{path}: OPT kept: {out}"
        );
        assert!(
            out.contains("big.example.org."),
            "{path}: question kept: {out}"
        );
    }
    // The client's retry over TCP gets the whole answer (from the cache by now).
    let out = c.pod.sh_ok(&query);
    assert!(out.contains("ANSWER: 1"), "{out}\n{}", d.log());
    assert!(out.contains("(TCP)"), "{out}");
    assert_eq!(
        c.external.count("big.example.org"),
        1,
        "second query answered from cache"
    );
    // A reply that fits still goes over UDP.
    let out = c
        .pod
        .sh_ok(&format!("kdig @{LOCAL_IP} +time=2 +retry=0 example.org A"));
    assert!(out.contains("(UDP)") && out.contains("192.0.2.7"), "{out}");
    let _ = std::fs::remove_file(&cfg);
}

#[test]
fn nftables_and_skip_teardown_end_to_end() {
    require!(have("kdig") && have("nft"), "needs kdig and nft");
    let c = cluster!("e2n");
    let mut d = c.start_nodedns(&["--firewall", "nftables", "--skip-teardown"]);
    let out = c.pod.sh_ok(&format!(
        "kdig @{LOCAL_IP} +tcp +short web.default.svc.cluster.local A"
    ));
    assert_eq!(out.trim(), "10.96.1.5");
    let table = c.node.sh_ok("nft list table inet nodedns");
    // node-cache's 12 plus the 5 fail-open rules (fail_open_to defaults to the cluster DNS IP).
    assert_eq!(
        table.matches("comment \"nodedns").count(),
        12 + 5,
        "{table}"
    );
    assert_eq!(
        table.matches("comment \"nodedns: fail open").count(),
        5,
        "{table}"
    );
    // Removed by hand: back within a sync interval.
    c.node.sh_ok("nft delete table inet nodedns");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !c.node.sh("nft list table inet nodedns").0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(c.node.sh_ok("nft list table inet nodedns"), table);

    // --skip-teardown: the table and the address survive the exit.
    d.terminate();
    assert_eq!(c.node.sh_ok("nft list table inet nodedns"), table);
    assert!(c.node.lo_addrs().contains("169.254.20.10/32"));
}

#[test]
fn transparent_mode_serves_the_kube_dns_ip_too_and_releases_it() {
    require!(
        have("kdig") && have("getent") && have("iptables-nft-save"),
        "needs kdig, getent and iptables-nft"
    );
    const KUBE_DNS_IP: &str = "10.96.0.10";
    let c = cluster!("e2t");
    let mut d = c.start_nodedns(&["--listen", "10.96.0.10:53"]);
    // Pods keep the kube-dns IP in resolv.conf (no kubelet change): nodedns answers it locally.
    for tcp in ["", "+tcp"] {
        let out = c.pod.sh_ok(&format!(
            "kdig @{KUBE_DNS_IP} {tcp} +short web.default.svc.cluster.local A"
        ));
        assert_eq!(out.trim(), "10.96.1.5", "kdig {tcp} via the kube-dns IP");
    }
    let out = c
        .pod
        .sh_ok(&format!("kdig @{KUBE_DNS_IP} +short example.org A"));
    assert_eq!(out.trim(), "192.0.2.7");
    // Both addresses on the link, the rules cover both (12 each), and the cluster upstream
    // (the kube-dns-upstream stand-in, another address) got the cluster query.
    let addrs = c.node.lo_addrs();
    assert!(
        addrs.contains("169.254.20.10/32") && addrs.contains("10.96.0.10/32"),
        "{addrs}"
    );
    let rules = c.node.our_rules("iptables-nft-save");
    assert_eq!(rules.len(), 24, "{rules:?}");
    assert_eq!(
        rules.iter().filter(|r| r.contains("10.96.0.10")).count(),
        12
    );
    assert!(c.cluster.count("web.default.svc.cluster.local") >= 1);
    // On SIGTERM both addresses and all rules go, so traffic to the kube-dns IP falls back to
    // kube-proxy's service path.
    d.terminate();
    assert!(c.node.our_rules("iptables-nft-save").is_empty());
    let addrs = c.node.lo_addrs();
    assert!(
        !addrs.contains("10.96.0.10/32") && !addrs.contains("169.254.20.10/32"),
        "{addrs}"
    );
}
