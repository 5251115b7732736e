//! Unit tests of the configuration: parsing, flags, validation, the effective config.

use super::*;
use crate::node::Firewall;
use clap::Parser;

fn env(resolv: &str) -> (tempfile::TempDir, Environment) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("resolv.conf");
    std::fs::write(&p, resolv).unwrap();
    (
        dir,
        Environment {
            resolv_conf: p,
            kube_dns_upstream: None,
        },
    )
}

fn err(toml_text: &str) -> String {
    let (_d, e) = env("nameserver 127.0.0.53\n");
    match parse_str(toml_text) {
        Err(e) => e,
        Ok(c) => c.validate(&e).unwrap_err().to_string(),
    }
}

#[test]
fn defaults_come_from_resolv_conf_without_ourselves() {
    let (_d, e) = env("search x\nnameserver 169.254.20.10\nnameserver 127.0.0.53\n");
    let s = FileConfig::default().validate(&e).unwrap();
    assert_eq!(s.listen, vec!["169.254.20.10:53".parse().unwrap()]);
    let root = s.zones.last().unwrap();
    assert_eq!(root.name, ".");
    assert_eq!(root.upstreams, vec!["127.0.0.53:53".parse().unwrap()]);
    assert_eq!(s.warnings.len(), 1, "no cluster DNS warns");
    assert_eq!(
        s.zones[s
            .zones
            .route(&dns::name_from_str("a.svc.cluster.local").unwrap())]
        .name,
        "cluster.local."
    );
    assert_eq!(
        s.zones[s.zones.route(&dns::name_from_str("example.com").unwrap())].name,
        "."
    );
}

#[test]
fn a_wildcard_listener_never_forwards_to_loopback_on_its_port() {
    let c: FileConfig = toml::from_str("listen = [\"0.0.0.0:53\"]").unwrap();
    // Both resolv.conf entries are loopback on port 53: both would be ourselves.
    let (_d, e) = env("nameserver 127.0.0.1\nnameserver 127.0.0.53\n");
    let err = c.validate(&e).unwrap_err().to_string();
    assert!(err.starts_with("upstreams: no upstream resolvers"), "{err}");
    // A resolver elsewhere is kept (validation only: nothing is sent).
    let (_d, e) = env("nameserver 127.0.0.1\nnameserver 10.0.0.2\n");
    let s = c.validate(&e).unwrap();
    assert_eq!(
        s.zones.last().unwrap().upstreams,
        vec!["10.0.0.2:53".parse().unwrap()]
    );
}

#[test]
fn kube_dns_upstream_env_is_the_cluster_default() {
    let (_d, mut e) = env("nameserver 127.0.0.53\n");
    e.kube_dns_upstream = Some(("10.96.0.11".into(), Some("5353".into())));
    let s = FileConfig::default().validate(&e).unwrap();
    let z = &s.zones[s
        .zones
        .route(&dns::name_from_str("1.0.96.10.in-addr.arpa").unwrap())];
    assert_eq!(z.upstreams, vec!["10.96.0.11:5353".parse().unwrap()]);
    assert_eq!(z.transport, Transport::Tcp);
    assert_eq!(z.denial_max_ttl, Duration::from_secs(5));
    assert!(s.warnings.is_empty());
}

#[test]
fn fail_open_defaults_to_the_cluster_dns_on_the_link_local_address() {
    let (_d, mut e) = env("nameserver 127.0.0.53\n");
    e.kube_dns_upstream = Some(("10.96.0.11".into(), None));
    let s = FileConfig::default().validate(&e).unwrap();
    assert_eq!(s.node.fail_open_to, vec![ip("10.96.0.11")]);
    // Not on a link-local address (e.g. only the kube-dns IP): kube-proxy is the fallback.
    let c: FileConfig = toml::from_str("listen = [\"10.96.0.10:53\"]").unwrap();
    assert!(c.validate(&e).unwrap().node.fail_open_to.is_empty());
    // No cluster DNS: nothing to default to.
    e.kube_dns_upstream = None;
    let s = FileConfig::default().validate(&e).unwrap();
    assert!(s.node.fail_open_to.is_empty());
    let c: FileConfig = toml::from_str("[node]\nfail_open_to = \"10.96.0.10\"").unwrap();
    let s = c.validate(&e).unwrap();
    assert_eq!(s.node.fail_open_to, vec![ip("10.96.0.10")]);
    let mut c = FileConfig::default();
    apply_flags(
        &mut c,
        &Args::parse_from(["nodedns", "--fail-open-to", "off"]),
    )
    .unwrap();
    e.kube_dns_upstream = Some(("10.96.0.11".into(), None));
    assert!(c.validate(&e).unwrap().node.fail_open_to.is_empty());
    assert!(err("[node]\nfail_open_to = \"kube-dns\"").starts_with("node.fail_open_to:"));
    assert!(err("[node]\nfail_open_to = \"0.0.0.0\"").starts_with("node.fail_open_to:"));
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().unwrap()
}

#[test]
fn fail_open_has_one_target_per_family() {
    let (_d, mut e) = env("nameserver 127.0.0.53\n");
    e.kube_dns_upstream = None;
    let dual = "listen = [\"169.254.20.10:53\", \"[fd00::a]:53\"]\n\
                cluster_dns = [\"10.96.0.11:53\", \"[fd00:10:96::b]:53\"]\n";
    // Unset: each family with a node-local listen address gets its family's cluster DNS IP.
    let c: FileConfig = toml::from_str(dual).unwrap();
    let s = c.validate(&e).unwrap();
    assert_eq!(
        s.node.fail_open_to,
        vec![ip("10.96.0.11"), ip("fd00:10:96::b")]
    );
    assert_eq!(c.resolved(&s).node.fail_open_to, "10.96.0.11,fd00:10:96::b");
    // Only an IPv4 cluster DNS: no IPv6 target to default to.
    let c: FileConfig = toml::from_str(
        "listen = [\"169.254.20.10:53\", \"[fd00::a]:53\"]\ncluster_dns = [\"10.96.0.11:53\"]\n",
    )
    .unwrap();
    assert_eq!(
        c.validate(&e).unwrap().node.fail_open_to,
        vec![ip("10.96.0.11")]
    );
    // An IPv6 address outside fe80::/10 and fd00::/8 is not node-local: no default for it.
    let c: FileConfig = toml::from_str(
        "listen = [\"[2001:db8::53]:53\"]\ncluster_dns = [\"[fd00:10:96::b]:53\"]\n",
    )
    .unwrap();
    assert!(c.validate(&e).unwrap().node.fail_open_to.is_empty());
    // Given: a comma list, one per family, in any order.
    let c: FileConfig = toml::from_str(&format!(
        "{dual}[node]\nfail_open_to = \" fd00:10:96::a , 10.96.0.10\"\n"
    ))
    .unwrap();
    assert_eq!(
        c.validate(&e).unwrap().node.fail_open_to,
        vec![ip("fd00:10:96::a"), ip("10.96.0.10")]
    );
    let mut c = FileConfig::default();
    apply_flags(
        &mut c,
        &Args::parse_from(["nodedns", "--fail-open-to", "10.96.0.10,fd00:10:96::a"]),
    )
    .unwrap();
    assert_eq!(c.node.fail_open_to, "10.96.0.10,fd00:10:96::a");
    let two_v4 = err("[node]\nfail_open_to = \"10.96.0.10,10.96.0.11\"");
    assert!(two_v4.starts_with("node.fail_open_to:"), "{two_v4}");
    assert!(two_v4.contains("same IP family"), "{two_v4}");
    let two_v6 = err("[node]\nfail_open_to = \"fd00::1,fd00::2\"");
    assert!(two_v6.contains("at most one IPv4 and one IPv6"), "{two_v6}");
    assert!(err("[node]\nfail_open_to = \"10.96.0.10,\"").starts_with("node.fail_open_to:"));
    assert!(err("[node]\nfail_open_to = \"10.96.0.10,::1\"").contains("::1 cannot be"));
}

#[test]
fn resolv_conf_keeps_ipv6_nameservers_and_their_zone() {
    let ns = resolv_conf_nameservers(
        "nameserver 10.0.0.2\nnameserver fd00:10:96::a\nnameserver fe80::1%lo\n\
         nameserver fe80::2%7\nnameserver fe80::3%no-such-link0\nnameserver bogus\n",
    );
    let want: Vec<std::net::SocketAddr> = vec![
        "10.0.0.2:53".parse().unwrap(),
        "[fd00:10:96::a]:53".parse().unwrap(),
        "[fe80::1%1]:53".parse().unwrap(),
        "[fe80::2%7]:53".parse().unwrap(),
    ];
    // A link-local nameserver on a link that does not exist cannot be reached: left out.
    assert_eq!(ns, want);
}

#[test]
fn ipv6_upstreams_take_a_zone_by_name_or_number() {
    let (_d, e) = env("nameserver 127.0.0.53\n");
    let c: FileConfig = toml::from_str(
        "upstreams = [\"[fe80::1%lo]:5353\", \"[fe80::2%1]:53\", \"[fe80::3%lo]\", \"[fd00::53]\"]",
    )
    .unwrap();
    let s = c.validate(&e).unwrap();
    let root = s.zones.iter().find(|z| z.wire == [0]).unwrap();
    let want: Vec<std::net::SocketAddr> = [
        "[fe80::1%1]:5353",
        "[fe80::2%1]:53",
        "[fe80::3%1]:53",
        "[fd00::53]:53",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    assert_eq!(root.upstreams, want);
    let e = err("upstreams = [\"[fe80::1%no-such-link0]:53\"]");
    assert!(
        e.starts_with("upstreams:") && e.contains("no link named"),
        "{e}"
    );
}

#[test]
fn stub_zone_longest_suffix_wins() {
    let (_d, e) = env("nameserver 127.0.0.53\n");
    let c: FileConfig = toml::from_str(
        "[[zone]]\nname = \"corp.example\"\nupstreams = [\"127.0.0.9\"]\ntransport = \"tcp\"\n\
         [[zone]]\nname = \"a.corp.example.\"\nupstreams = [\"127.0.0.10:5300\"]\n",
    )
    .unwrap();
    let s = c.validate(&e).unwrap();
    let z = &s.zones[s
        .zones
        .route(&dns::name_from_str("x.a.corp.example").unwrap())];
    assert_eq!(z.upstreams, vec!["127.0.0.10:5300".parse().unwrap()]);
    let z = &s.zones[s
        .zones
        .route(&dns::name_from_str("b.corp.example").unwrap())];
    assert_eq!(z.transport, Transport::Tcp);
}

#[test]
fn errors_name_the_key_and_reason() {
    assert!(err("bogus = 1").contains("unknown field `bogus`"));
    let e = err("[cache]\nmin_ttl = \"5x\"");
    assert!(
        e.starts_with("cache.min_ttl: TOML parse error at line 2"),
        "{e}"
    );
    assert!(e.contains("\"5x\", expected a duration"), "{e}");
    assert!(err("listen = [\"nope\"]").starts_with("listen: invalid address"));
    assert!(
        err("[[zone]]\nname = \"a\"\nupstreams = [\"127.0.0.1\"]\ntransport = \"quic\"")
            .starts_with("zone[0].transport:")
    );
    assert!(err("[node]\nfirewall = \"pf\"").starts_with("node.firewall:"));
    assert!(err("log_format = \"xml\"").starts_with("log_format:"));
    // Flags are checked under the key they set.
    let mut c = FileConfig::default();
    let bad = |flag: &str, v: &str| {
        apply_flags(&mut c.clone(), &Args::parse_from(["nodedns", flag, v]))
            .unwrap_err()
            .to_string()
    };
    assert!(bad("--lameduck", "5x").starts_with("lameduck: invalid duration"));
    assert!(bad("--sync-interval", "x").starts_with("node.sync_interval: invalid duration"));
    assert!(bad("--firewall", "pf").starts_with("node.firewall:"));
    assert!(bad("--log-format", "xml").starts_with("log_format:"));
    let a = Args::parse_from([
        "nodedns",
        "--snapshot-interval",
        "0s",
        "--firewall",
        "nftables",
    ]);
    apply_flags(&mut c, &a).unwrap();
    assert_eq!(c.state.snapshot_interval, Duration::ZERO);
    assert_eq!(c.node.firewall, Firewall::Nftables);
    assert!(err("[cache]\nservfail_ttl = \"1h\"").contains("RFC 2308"));
    assert!(
        err("listen = [\"10.96.0.10:53\"]\ncluster_dns = [\"10.96.0.10\"]")
            .starts_with("cluster_dns: 10.96.0.10:53 is one of our listen addresses")
    );
}

#[test]
fn flags_override_the_file() {
    let mut c: FileConfig = toml::from_str("listen = [\"127.0.0.1:53\"]\nworkers = 3").unwrap();
    let a = Args::parse_from(["nodedns", "--listen", "127.0.0.2:5353", "--workers", "1"]);
    apply_flags(&mut c, &a).unwrap();
    assert_eq!(c.listen, vec!["127.0.0.2:5353"]);
    assert_eq!(c.workers, 1);
}

#[test]
fn check_config_prints_machine_defaults_resolved() {
    let (_d, mut e) = env("nameserver 127.0.0.53\n");
    e.kube_dns_upstream = Some(("10.96.0.11".into(), None));
    let f = FileConfig::default();
    let r = f.resolved(&f.validate(&e).unwrap());
    assert_eq!(r.upstreams, vec!["127.0.0.53:53"]);
    assert_eq!(r.cluster_dns, vec!["10.96.0.11:53"]);
    assert_eq!(r.node.fail_open_to, "10.96.0.11");
    e.kube_dns_upstream = None;
    assert_eq!(
        f.resolved(&f.validate(&e).unwrap()).node.fail_open_to,
        "off"
    );
}

#[test]
fn effective_config_round_trips() {
    let text = toml::to_string(&FileConfig::default()).unwrap();
    let back: FileConfig = toml::from_str(&text).unwrap();
    assert_eq!(toml::to_string(&back).unwrap(), text);
}

#[test]
fn udp_pool_keys_are_validated_under_their_names() {
    assert!(err("[forward]\nudp_pool_size = 8").starts_with("forward.udp_pool_size:"));
    assert!(err("[forward]\nudp_pool_size = 5000").starts_with("forward.udp_pool_size:"));
    assert!(err("[forward]\nudp_socket_queries = 0").starts_with("forward.udp_socket_queries:"));
    assert!(err("[forward]\nudp_socket_lifetime = \"10ms\"")
        .starts_with("forward.udp_socket_lifetime:"));
}

#[test]
fn a_zone_forwarded_to_our_own_listener_is_refused() {
    let e = err(
        "listen = [\"169.254.20.10:53\", \"10.96.0.10:53\"]\n[[zone]]\nname = \"corp.example\"\n\
         upstreams = [\"10.0.0.2\", \"10.96.0.10\"]\n",
    );
    assert!(
        e.starts_with("zone[0].upstreams: 10.96.0.10:53 is one of our listen addresses"),
        "{e}"
    );
}

/// Found by the `corefile` fuzz target: a Corefile whose cluster block forwards to one of the
/// listen addresses validated (its zone was not checked for loops) while the same
/// configuration written as TOML (`--check-config`) did not. Both are refused now.
#[test]
fn fuzz_regression_corefile_cluster_block_forwarding_to_ourselves() {
    let text = "clu\n338.254.20.10 1d 169.0.1010 10.96.0.10\n    fo6l:53 {\n    errors\n   \n      \
                bind 169.254.20.10 10.96.0.10\n    forward . __PILLAR__UPSTREAM__SERVERS__\n\n  }\n\
                er.loc,cluster.local:53 { cache {\n            success 9  }   loop\n    \
                bind 169.254.20.10 10.96.0.10\n    forward . 169.254.20.11 10.96.0.10 {\n            \
                force_tcp\n    }\n    prometheus :9253\n  }\n";
    let (_d, e) = env("nameserver 127.0.0.53\n");
    let pillars = corefile::Pillars {
        local_ips: vec!["169.254.20.10".into(), "10.96.0.10".into()],
        cluster_dns: Some("10.96.0.11".into()),
        cluster_dns_var: "KUBE_DNS_UPSTREAM_SERVICE_HOST".into(),
        upstream_servers: vec![],
        prometheus: ":9253".into(),
    };
    let file = read_corefile(Path::new("Corefile"), text, &pillars, 53, &e.resolv_conf)
        .expect("the Corefile reads");
    let refused = file.validate(&e).unwrap_err().to_string();
    assert!(
        refused.contains("10.96.0.10:53 is one of our listen addresses"),
        "{refused}"
    );
}
