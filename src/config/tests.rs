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
    assert_eq!(s.node.fail_open_to, Some("10.96.0.11".parse().unwrap()));
    // Not on a link-local address (e.g. only the kube-dns IP): kube-proxy is the fallback.
    let c: FileConfig = toml::from_str("listen = [\"10.96.0.10:53\"]").unwrap();
    assert_eq!(c.validate(&e).unwrap().node.fail_open_to, None);
    // No cluster DNS: nothing to default to.
    e.kube_dns_upstream = None;
    let s = FileConfig::default().validate(&e).unwrap();
    assert_eq!(s.node.fail_open_to, None);
    let c: FileConfig = toml::from_str("[node]\nfail_open_to = \"10.96.0.10\"").unwrap();
    let s = c.validate(&e).unwrap();
    assert_eq!(s.node.fail_open_to, Some("10.96.0.10".parse().unwrap()));
    let mut c = FileConfig::default();
    apply_flags(
        &mut c,
        &Args::parse_from(["nodedns", "--fail-open-to", "off"]),
    )
    .unwrap();
    e.kube_dns_upstream = Some(("10.96.0.11".into(), None));
    assert_eq!(c.validate(&e).unwrap().node.fail_open_to, None);
    assert!(err("[node]\nfail_open_to = \"kube-dns\"").starts_with("node.fail_open_to:"));
    assert!(err("[node]\nfail_open_to = \"0.0.0.0\"").starts_with("node.fail_open_to:"));
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
