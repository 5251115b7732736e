//! A surge rollout on a "node" namespace: a new nodedns starts beside the running one (as a
//! DaemonSet with `maxSurge: 1, maxUnavailable: 0` does), then the old one gets SIGTERM, while a
//! "pod" namespace sends a fixed load over UDP and TCP with dnsperf. Nothing may be lost, the
//! address and rules must stay in place throughout, and the new instance must answer warmed names
//! from the cache it took over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::netns::*;

/// Parses dnsperf's "Queries sent:" and "Queries lost:" lines.
fn dnsperf_counts(out: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name:?} in dnsperf output:\n{out}"))
    };
    (field("Queries sent:"), field("Queries lost:"))
}

#[test]
fn surge_rollout_under_load_loses_nothing_and_starts_warm() {
    if !(have("dnsperf") && have("kdig") && have("dig") && have("iptables-nft-save")) {
        skip("needs dnsperf, kdig, dig and iptables-nft");
        return;
    }
    let c = cluster!("surge");
    let mut old = c.start_nodedns(&["--lameduck", "1s"]);
    let rules_before = c.node.our_rules("iptables-nft-save");
    assert!(!rules_before.is_empty());

    // Warm a working set from the pod.
    const WARM: u16 = 200;
    let names: String = (0..WARM).map(|i| format!("n{i}.example.org A\n")).collect();
    // Not in /etc/netns/<pod>: `ip netns exec` bind-mounts every file there over /etc.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("names.txt");
    std::fs::write(&file, &names).unwrap();
    c.pod.sh_ok(&format!(
        "dig @{LOCAL_IP} +short +time=2 +tries=1 -f {} >/dev/null",
        file.display()
    ));
    for i in 0..WARM {
        assert_eq!(
            c.external.count(&format!("n{i}.example.org")),
            1,
            "n{i} not warmed"
        );
    }

    // The address and our rules, sampled every 50 ms through the whole rollout.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (node, watching) = (c.node.name.clone(), watching.clone());
        let want = rules_before.len();
        std::thread::spawn(move || {
            let mut samples = 0;
            let mut bad = Vec::new();
            while watching.load(Ordering::Relaxed) {
                let addr = sh_in(&node, "ip -o addr show dev lo")
                    .1
                    .contains(&format!("{LOCAL_IP}/32"));
                let rules = rules_in(&sh_in(&node, "iptables-nft-save").1).len();
                if !addr || rules != want {
                    bad.push(format!("address present: {addr}, rules: {rules}"));
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (samples, bad)
        })
    };

    // 12 s of load: 3,000 QPS over UDP and 500 QPS over TCP, each query answered from the
    // cache or the upstreams; a query without an answer within 2 s is lost.
    let load = |mode: &str, qps: u32| {
        let cmd = format!(
            "dnsperf -s {LOCAL_IP} -m {mode} -d {} -c 4 -Q {qps} -l 12 -t 2",
            file.display()
        );
        let pod = c.pod.name.clone();
        std::thread::spawn(move || sh_in(&pod, &cmd))
    };
    let started = Instant::now();
    let udp = load("udp", 3000);
    let tcp = load("tcp", 500);

    std::thread::sleep(Duration::from_secs(2));
    let new = c.spawn_nodedns(&["--lameduck", "1s"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let serving = format!("nodedns {} serving", env!("CARGO_PKG_VERSION"));
    while !new.log().contains(&serving) {
        assert!(
            Instant::now() < deadline,
            "new instance did not start:\n{}",
            new.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        new.log().contains("took over the listening sockets"),
        "{}",
        new.log()
    );
    std::thread::sleep(Duration::from_secs(2));
    old.terminate();
    let old_log = old.log();
    assert!(
        old_log.contains("another instance serves this node"),
        "{old_log}"
    );

    let (ok_u, out_u) = udp.join().unwrap();
    let (ok_t, out_t) = tcp.join().unwrap();
    watching.store(false, Ordering::Relaxed);
    let (samples, bad) = watcher.join().unwrap();
    assert!(ok_u && ok_t, "dnsperf failed:\n{out_u}\n{out_t}");
    let (sent_u, lost_u) = dnsperf_counts(&out_u);
    let (sent_t, lost_t) = dnsperf_counts(&out_t);
    eprintln!(
        "surge rollout in {:?}: UDP {lost_u} lost of {sent_u}, TCP {lost_t} lost of {sent_t}; \
         {samples} samples of address and rules, {} bad",
        started.elapsed(),
        bad.len()
    );
    assert!(sent_u >= 30_000, "UDP load too small: {sent_u}");
    assert!(sent_t >= 5_000, "TCP load too small: {sent_t}");
    assert_eq!(lost_u, 0, "UDP queries lost:\n{out_u}\n{}", new.log());
    assert_eq!(lost_t, 0, "TCP queries lost:\n{out_t}\n{}", new.log());
    assert!(samples > 100 && bad.is_empty(), "{bad:?}");

    // The new instance answers the warmed names from the cache it took over: dnsperf's load
    // refreshed nothing (every name was cached), so the upstream still saw each name once.
    let from_cache = (0..WARM)
        .filter(|i| c.external.count(&format!("n{i}.example.org")) == 1)
        .count();
    eprintln!("{from_cache} of {WARM} warmed names never went upstream again");
    assert!(
        from_cache * 100 >= WARM as usize * 95,
        "{from_cache} of {WARM}"
    );
    let out = c
        .pod
        .sh_ok(&format!("kdig @{LOCAL_IP} +short n7.example.org A"));
    assert_eq!(out.trim(), "198.51.0.7");
    assert_eq!(c.node.our_rules("iptables-nft-save"), rules_before);
    drop(new);
}
