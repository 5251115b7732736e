//! The kube-dns ConfigMap, and the whole drop-in path: node-local-dns's real Corefile template
//! with the documentation's install-time `sed`, node-cache's command line from the manifest and
//! a kube-dns ConfigMap, through to `Settings`.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use clap::Parser;

use super::*;

/// node-local-dns's Corefile template, from kubernetes/kubernetes
/// cluster/addons/dns/nodelocaldns/nodelocaldns.yaml at commit
/// 028f956d2f934d6c82ca815e3f8d622da7e480cb.
const TEMPLATE: &str = include_str!("../../tests/fixtures/nodelocaldns-028f956d.Corefile");

/// The DaemonSet's `args:` in the same manifest and commit.
const MANIFEST_ARGS: &[&str] = &[
    "-localip",
    "__PILLAR__LOCAL__DNS__,__PILLAR__DNS__SERVER__",
    "-conf",
    "/etc/Corefile",
    "-upstreamsvc",
    "kube-dns-upstream",
    "-pidfile",
    "/tmp/node-cache.pid",
];

const LOCALDNS: &str = "169.254.20.10";
const DOMAIN: &str = "cluster.local";
const KUBEDNS: &str = "10.96.0.10";

/// The documentation's substitution for kube-proxy in iptables mode:
/// `sed -i "s/__PILLAR__LOCAL__DNS__/$localdns/g; s/__PILLAR__DNS__DOMAIN__/$domain/g;
/// s/__PILLAR__DNS__SERVER__/$kubedns/g" nodelocaldns.yaml`.
fn sed_iptables(s: &str) -> String {
    s.replace("__PILLAR__LOCAL__DNS__", LOCALDNS)
        .replace("__PILLAR__DNS__DOMAIN__", DOMAIN)
        .replace("__PILLAR__DNS__SERVER__", KUBEDNS)
}

/// In IPVS mode: `s/__PILLAR__LOCAL__DNS__/$localdns/g; s/__PILLAR__DNS__DOMAIN__/$domain/g;
/// s/,__PILLAR__DNS__SERVER__//g; s/__PILLAR__CLUSTER__DNS__/$kubedns/g`.
fn sed_ipvs(s: &str) -> String {
    s.replace("__PILLAR__LOCAL__DNS__", LOCALDNS)
        .replace("__PILLAR__DNS__DOMAIN__", DOMAIN)
        .replace(",__PILLAR__DNS__SERVER__", "")
        .replace("__PILLAR__CLUSTER__DNS__", KUBEDNS)
}

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    /// The ConfigMap mounts: the rendered template as Corefile.base, kube-dns's ConfigMap.
    fn new(corefile: &str, stub: Option<&str>, upstream: Option<&str>) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Corefile.base"), corefile).unwrap();
        std::fs::create_dir(dir.path().join("kube-dns")).unwrap();
        if let Some(s) = stub {
            std::fs::write(dir.path().join("kube-dns/stubDomains"), s).unwrap();
        }
        if let Some(u) = upstream {
            std::fs::write(dir.path().join("kube-dns/upstreamNameservers"), u).unwrap();
        }
        std::fs::write(dir.path().join("resolv.conf"), "nameserver 127.0.0.53\n").unwrap();
        Node { dir }
    }

    fn p(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Loads with node-cache's command line `args` plus the mounts' paths.
    fn load(&self, args: &[String]) -> Result<(Args, FileConfig), ConfigError> {
        let mut argv: Vec<OsString> = vec!["nodedns".into()];
        argv.extend(args.iter().map(OsString::from));
        argv.extend(
            [
                "-basecorefile".to_string(),
                self.p("Corefile.base"),
                "-kubednscm".to_string(),
                self.p("kube-dns"),
            ]
            .map(OsString::from),
        );
        let argv = nodecache::translate(argv).unwrap();
        let args = Args::try_parse_from(argv).unwrap();
        let env =
            |k: &str| (k == "KUBE_DNS_UPSTREAM_SERVICE_HOST").then(|| "10.96.0.11".to_string());
        load_with(&args, &env, &self.dir.path().join("resolv.conf")).map(|c| (args, c))
    }

    fn env(&self) -> Environment {
        Environment {
            resolv_conf: self.dir.path().join("resolv.conf"),
            kube_dns_upstream: None,
        }
    }
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn route<'a>(s: &'a Settings, name: &str) -> &'a Zone {
    &s.zones[s.zones.route(&dns::name_from_str(name).unwrap())]
}

#[test]
fn the_manifest_with_a_kube_dns_configmap_gives_the_expected_settings() {
    let node = Node::new(
        &sed_iptables(TEMPLATE),
        Some(r#"{"consul.local": ["10.150.0.1", "10.150.0.2:5353"]}"#),
        Some(r#"["8.8.8.8", "8.8.4.4"]"#),
    );
    let args: Vec<String> = MANIFEST_ARGS.iter().map(|a| sed_iptables(a)).collect();
    let (args, cfg) = node.load(&args).unwrap();
    assert_eq!(
        args.pidfile.as_deref(),
        Some(Path::new("/tmp/node-cache.pid"))
    );
    let s = cfg.validate(&node.env()).unwrap();

    assert_eq!(s.listen, vec![sa("169.254.20.10:53"), sa("10.96.0.10:53")]);
    assert_eq!(s.health, Some(sa("169.254.20.10:8080")));
    assert_eq!(s.metrics, Some(sa("0.0.0.0:9253")));
    // node-cache's defaults: it sets up the interface and the rules.
    assert!(s.node.setup_interface && s.node.setup_iptables && !s.node.skip_teardown);
    assert_eq!(s.node.interface_name, "nodelocaldns");
    assert_eq!(s.node.sync_interval, Duration::from_secs(60));
    assert!(!s.reload_with_signal);
    // Four blocks of 9984 + 9984 entries, and the stub domain's `cache 30` block.
    assert_eq!(s.cache.max_entries, 5 * 2 * 9984);
    assert_eq!(s.cache.prefetch_hits, 0);

    let cluster = route(&s, "kubernetes.default.svc.cluster.local");
    assert_eq!(cluster.name, "cluster.local.");
    assert_eq!(cluster.upstreams, vec![sa("10.96.0.11:53")]);
    assert_eq!(cluster.transport, Transport::Tcp);
    assert_eq!(cluster.success_max_ttl, Duration::from_secs(30));
    assert_eq!(cluster.denial_max_ttl, Duration::from_secs(5));
    assert_eq!(cluster.stale_window, Duration::ZERO);
    for rev in ["1.0.96.10.in-addr.arpa", "1.0.0.0.ip6.arpa"] {
        let z = route(&s, rev);
        assert_eq!(z.upstreams, vec![sa("10.96.0.11:53")], "{rev}");
        assert_eq!(z.transport, Transport::Tcp);
        assert_eq!(
            (z.success_max_ttl, z.denial_max_ttl),
            (Duration::from_secs(30), Duration::from_secs(30))
        );
    }
    let stub = route(&s, "web.service.consul.local");
    assert_eq!(stub.name, "consul.local.");
    assert_eq!(
        stub.upstreams,
        vec![sa("10.150.0.1:53"), sa("10.150.0.2:5353")]
    );
    assert_eq!(stub.transport, Transport::PreferUdp);
    assert_eq!(stub.success_max_ttl, Duration::from_secs(30));
    let root = route(&s, "example.com");
    assert_eq!(root.name, ".");
    assert_eq!(root.upstreams, vec![sa("8.8.8.8:53"), sa("8.8.4.4:53")]);
    assert_eq!(root.transport, Transport::PreferUdp);
    assert_eq!(
        (root.success_max_ttl, root.denial_max_ttl),
        (Duration::from_secs(30), Duration::from_secs(30))
    );
    assert_eq!(s.zones.len(), 5);
    // Transparent mode: while nodedns is down the node's queries go to the upstream Service.
    assert_eq!(
        s.node.fail_open_to,
        vec!["10.96.0.11".parse::<std::net::IpAddr>().unwrap()]
    );

    // --check-config prints it as the TOML file, which reads back to the same settings.
    let printed = toml::to_string(&cfg.resolved(&s)).unwrap();
    let again = parse_str(&printed).unwrap().validate(&node.env()).unwrap();
    assert_eq!(format!("{:?}", again.zones), format!("{:?}", s.zones));
    assert_eq!(again.listen, s.listen);
}

#[test]
fn ipvs_mode_without_configmap_asks_resolv_conf_nameservers() {
    let node = Node::new(&sed_ipvs(TEMPLATE), None, None);
    let args: Vec<String> = MANIFEST_ARGS.iter().map(|a| sed_ipvs(a)).collect();
    let (_, cfg) = node.load(&args).unwrap();
    let s = cfg.validate(&node.env()).unwrap();
    assert_eq!(s.listen, vec![sa("169.254.20.10:53")]);
    assert_eq!(
        route(&s, "a.svc.cluster.local").upstreams,
        vec![sa("10.96.0.10:53")]
    );
    assert_eq!(
        route(&s, "example.com").upstreams,
        vec![sa("127.0.0.53:53")]
    );
}

#[test]
fn configmap_upstreams_turn_a_force_tcp_root_to_udp() {
    let text = sed_iptables(TEMPLATE).replace(
        "forward . __PILLAR__UPSTREAM__SERVERS__\n",
        "forward . __PILLAR__UPSTREAM__SERVERS__ {\n            force_tcp\n    }\n",
    );
    let args: Vec<String> = MANIFEST_ARGS.iter().map(|a| sed_iptables(a)).collect();
    let node = Node::new(&text, None, None);
    let (_, cfg) = node.load(&args).unwrap();
    let root = route(&cfg.validate(&node.env()).unwrap(), "example.com").clone();
    assert_eq!(root.upstreams, vec![sa("127.0.0.53:53")]);
    assert_eq!(root.transport, Transport::Tcp);
    let node = Node::new(&text, None, Some(r#"["127.0.0.9"]"#));
    let (_, cfg) = node.load(&args).unwrap();
    let s = cfg.validate(&node.env()).unwrap();
    let root = route(&s, "example.com");
    assert_eq!(root.upstreams, vec![sa("127.0.0.9:53")]);
    assert_eq!(
        root.transport,
        Transport::PreferUdp,
        "node-cache asks custom upstreams over UDP"
    );
}

#[test]
fn localip_and_corefile_bind_must_agree() {
    let node = Node::new(&sed_iptables(TEMPLATE), None, None);
    let mut args: Vec<String> = MANIFEST_ARGS.iter().map(|a| sed_iptables(a)).collect();
    args[1] = "169.254.20.10".into();
    let e = node.load(&args).unwrap_err().to_string();
    assert!(
        e.starts_with("local_ip: -localip 169.254.20.10 and the Corefile's bind"),
        "{e}"
    );
}

#[test]
fn missing_upstream_service_is_named() {
    let node = Node::new(&sed_iptables(TEMPLATE), None, None);
    let mut args: Vec<String> = MANIFEST_ARGS.iter().map(|a| sed_iptables(a)).collect();
    args[5] = "my-dns".into();
    let e = node.load(&args).unwrap_err().to_string();
    assert!(
        e.contains(
            "Corefile.base: line 14: __PILLAR__CLUSTER__DNS__: MY_DNS_SERVICE_HOST is not set"
        ),
        "{e}"
    );
}

#[test]
fn kube_dns_configmap_errors_name_the_file() {
    for (stub, up, want) in [
        (
            Some("{\"a.local\": \"10.0.0.1\"}"),
            None,
            "stubDomains: stubDomains: invalid type",
        ),
        (
            Some("{\"a.local\": [\"ns.a.local\"]}"),
            None,
            "stubDomains: a.local: \"ns.a.local\" is not IP[:PORT]",
        ),
        (
            Some("{\"a.local\": []}"),
            None,
            "stubDomains: a.local: no nameservers",
        ),
        (
            None,
            Some("[\"1.1.1.1\",\"1.1.1.2\",\"1.1.1.3\",\"1.1.1.4\"]"),
            "upstreamNameservers: upstreamNameservers: at most three",
        ),
        (
            None,
            Some("[\"tls://1.1.1.1\"]"),
            "upstreamNameservers: upstreamNameservers: \"tls://1.1.1.1\" is not IP[:PORT]",
        ),
    ] {
        let node = Node::new("", stub, up);
        let e = kubedns::read_dir(&node.dir.path().join("kube-dns"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{e} lacks {want}");
        assert!(e.starts_with("config file /"), "{e}");
    }
}

#[test]
fn kube_dns_configmap_with_the_toml_file() {
    let node = Node::new(
        "",
        Some(r#"{"corp.example": ["127.0.0.7"]}"#),
        Some(r#"["127.0.0.8"]"#),
    );
    let toml = node.dir.path().join("nodedns.toml");
    std::fs::write(&toml, "listen = [\"127.0.0.1:53\"]\n").unwrap();
    let args = Args::try_parse_from([
        "nodedns".to_string(),
        "--config".into(),
        toml.display().to_string(),
        "--kube-dns-config".into(),
        node.p("kube-dns"),
    ])
    .unwrap();
    let s = load_with(&args, &|_| None, Path::new("/nonexistent"))
        .unwrap()
        .validate(&node.env())
        .unwrap();
    assert_eq!(
        route(&s, "x.corp.example").upstreams,
        vec![sa("127.0.0.7:53")]
    );
    assert_eq!(route(&s, "example.com").upstreams, vec![sa("127.0.0.8:53")]);
    // A stub domain the configuration already has is refused, as CoreDNS refuses it.
    std::fs::write(&toml, "listen = [\"127.0.0.1:53\"]\n[[zone]]\nname = \"corp.example\"\nupstreams = [\"127.0.0.9\"]\n").unwrap();
    let e = load_with(&args, &|_| None, Path::new("/nonexistent"))
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with(
            "stubDomains: stubDomains: corp.example is already a zone of the configuration"
        ),
        "{e}"
    );
}

#[test]
fn native_flags_select_the_corefile_and_service() {
    let node = Node::new(
        ".:5300 {\n bind __PILLAR__LOCAL__DNS__\n forward . __PILLAR__CLUSTER__DNS__\n}\n",
        None,
        None,
    );
    let args = Args::try_parse_from([
        "nodedns".to_string(),
        "--corefile".into(),
        node.p("Corefile.base"),
        "--upstream-svc".into(),
        "coredns".into(),
        "--local-ip".into(),
        "127.0.0.1".into(),
        "--reload-with-signal".into(),
    ])
    .unwrap();
    let env = |k: &str| match k {
        "COREDNS_SERVICE_HOST" => Some("127.0.0.5".to_string()),
        "COREDNS_SERVICE_PORT" => Some("5353".to_string()),
        _ => None,
    };
    let s = load_with(&args, &env, Path::new("/nonexistent"))
        .unwrap()
        .validate(&node.env())
        .unwrap();
    assert_eq!(s.listen, vec![sa("127.0.0.1:5300")]);
    assert!(s.reload_with_signal);
    assert!(
        !s.node.setup_interface,
        "native: node setup stays off unless asked"
    );
    assert_eq!(
        route(&s, "example.com").upstreams,
        vec![sa("127.0.0.5:5353")]
    );
    let e = Args::try_parse_from(["nodedns", "--config", "/x.toml", "--corefile", "/c"])
        .map(|a| {
            load_with(&a, &|_| None, Path::new("/nonexistent"))
                .unwrap_err()
                .to_string()
        })
        .unwrap();
    assert_eq!(
        e,
        "corefile: --config and --corefile are two sources; give one"
    );
}

#[test]
fn local_ip_without_a_corefile_sets_listen_on_dns_port() {
    let args = Args::try_parse_from(
        nodecache::translate(
            [
                "nodedns",
                "-localip",
                "127.0.0.1,127.0.0.2",
                "-dns.port",
                "5353",
                "-basecorefile",
                "/nonexistent/a",
                "-conf",
                "/nonexistent/b",
            ]
            .map(OsString::from)
            .to_vec(),
        )
        .unwrap(),
    )
    .unwrap();
    // node-cache mode without any Corefile: the Corefile it names cannot be read.
    let e = load_with(&args, &|_| None, Path::new("/nonexistent"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("config file /nonexistent/b:"), "{e}");
    let args = Args::try_parse_from([
        "nodedns",
        "--local-ip",
        "127.0.0.1,::1",
        "--dns-port",
        "5353",
        "--upstream",
        "127.0.0.53",
    ])
    .unwrap();
    let c = load_with(&args, &|_| None, Path::new("/nonexistent")).unwrap();
    assert_eq!(c.listen, vec!["127.0.0.1:5353", "[::1]:5353"]);
    let args = Args::try_parse_from(["nodedns", "--local-ip", "127.0.0.1,x"]).unwrap();
    let e = load_with(&args, &|_| None, Path::new("/nonexistent"))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "local_ip: invalid address \"x\" in \"127.0.0.1,x\"");
}
