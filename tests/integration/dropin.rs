//! nodedns as a drop-in for node-local-dns's `node-cache`: started with the upstream manifest's
//! exact `args:`, its ConfigMap mounts in place (the node-local-dns Corefile template after the
//! documentation's `sed`, a kube-dns ConfigMap with a stub domain and upstream nameservers) and
//! the `kube-dns-upstream` Service's environment, it resolves cluster names, external names and
//! the stub domain from a pod, each through its own upstream.
//!
//! The mounts: nodedns runs in a private mount namespace where /etc is an overlay holding
//! /etc/coredns/Corefile.base and /etc/kube-dns, and /run and /tmp are empty tmpfs, so nothing
//! outside the test's namespaces is touched. Needs root, `ip`, `unshare`, overlayfs, kdig and
//! iptables-nft. On a kernel without the `dummy` link type the addresses go on `lo`
//! (`-interfacename lo` added to the manifest's arguments).

use std::process::Command;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::common::netns::*;
use crate::common::{a_reply, negative_reply, Action, FakeUpstream, Via};

/// The template, quoted from kubernetes/kubernetes cluster/addons/dns/nodelocaldns/
/// nodelocaldns.yaml at commit 028f956d2f934d6c82ca815e3f8d622da7e480cb.
const TEMPLATE: &str = include_str!("../fixtures/nodelocaldns-028f956d.Corefile");

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

/// The kube-dns Service IP (bound on the node in kube-proxy's iptables mode).
const KUBEDNS: &str = "10.96.0.10";
/// The stub domain's nameserver, in the upstream namespace.
const STUB_DNS: &str = "10.201.0.4:53";

/// The documentation's `sed` for kube-proxy in iptables mode.
fn sed(s: &str) -> String {
    s.replace("__PILLAR__LOCAL__DNS__", LOCAL_IP)
        .replace("__PILLAR__DNS__DOMAIN__", "cluster.local")
        .replace("__PILLAR__DNS__SERVER__", KUBEDNS)
}

fn kdig(c: &Cluster, server: &str, name: &str) -> String {
    let (_, out) = c
        .pod
        .sh(&format!("kdig @{server} +short +time=2 +retry=1 {name} A"));
    out.trim().to_string()
}

#[test]
fn manifest_args_serve_cluster_external_and_stub_names_through_their_upstreams() {
    require!(
        have("kdig") && have("unshare") && have("iptables-nft-save"),
        "needs kdig, unshare and iptables-nft"
    );
    let c = cluster!("dropin");
    c._up.sh_ok("ip addr add 10.201.0.4/24 dev eth0");
    let stub = in_netns(&c._up.name, || {
        FakeUpstream::start_on(STUB_DNS, |q, _| {
            let qq = &q.queries[0];
            let name = qq.name().to_ascii().to_lowercase();
            if name == "web.service.consul.local." && qq.query_type() == RecordType::A {
                Action::Answer(a_reply(q, 30, &[[10, 150, 0, 9]]))
            } else {
                Action::Answer(negative_reply(q, ResponseCode::NXDomain, Some((5, 5))))
            }
        })
    });

    // The ConfigMap mounts, as the overlay's upper layer over /etc.
    let shm = tempfile::Builder::new()
        .prefix("nodedns-dropin-etc")
        .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        })
        .unwrap();
    let upper = shm.path().join("upper");
    let work = shm.path().join("work");
    std::fs::create_dir_all(upper.join("coredns")).unwrap();
    std::fs::create_dir_all(upper.join("kube-dns")).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(upper.join("coredns/Corefile.base"), sed(TEMPLATE)).unwrap();
    std::fs::write(
        upper.join("kube-dns/stubDomains"),
        format!(
            r#"{{"consul.local": ["{}"]}}"#,
            STUB_DNS.trim_end_matches(":53")
        ),
    )
    .unwrap();
    std::fs::write(
        upper.join("kube-dns/upstreamNameservers"),
        format!(r#"["{}"]"#, EXTERNAL_DNS.trim_end_matches(":53")),
    )
    .unwrap();

    let mut args: Vec<String> = MANIFEST_ARGS.iter().map(|a| sed(a)).collect();
    // node-cache's default interface is a `dummy` link; a kernel without that link type gets
    // the addresses on `lo` instead (the one flag added to the manifest's).
    let dummy = c
        .node
        .sh("ip link add probe0 type dummy && ip link del probe0")
        .0;
    let ifname = if dummy { "nodelocaldns" } else { "lo" };
    if !dummy {
        args.extend(["-interfacename".to_string(), "lo".to_string()]);
    }
    let script = format!(
        "mount -t overlay overlay -o lowerdir=/etc,upperdir={},workdir={} /etc && \
         mount -t tmpfs tmpfs /run && mount -t tmpfs tmpfs /tmp && exec {} {}",
        upper.display(),
        work.display(),
        env!("CARGO_BIN_EXE_nodedns"),
        args.join(" ")
    );
    let log = std::env::temp_dir().join(format!("{}-dropin.log", c.node.name));
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.node.name,
            "unshare",
            "--mount",
            "--propagation",
            "private",
        ])
        .args(["sh", "-c", &script])
        .env("RUST_LOG", "info")
        .env(
            "KUBE_DNS_UPSTREAM_SERVICE_HOST",
            CLUSTER_DNS.trim_end_matches(":53"),
        )
        .env("KUBE_DNS_UPSTREAM_SERVICE_PORT", "53")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn nodedns");
    let mut d = Daemon { child, log };
    c.wait_serving(&d);

    // The pidfile node-cache's wrapper waits for, in the private /tmp.
    let pid = d.child.id();
    let pidfile = format!("/proc/{pid}/root/tmp/node-cache.pid");
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        pid.to_string()
    );
    // node-cache's defaults: the dummy interface holds both addresses.
    let addrs = c.node.sh_ok(&format!("ip -o addr show dev {ifname}"));
    assert!(
        addrs.contains(LOCAL_IP) && addrs.contains(KUBEDNS),
        "{addrs}"
    );

    // A cluster name: the kube-dns-upstream Service, over TCP (force_tcp).
    assert_eq!(
        kdig(&c, LOCAL_IP, "web.default.svc.cluster.local"),
        "10.96.1.5"
    );
    // Through the kube-dns IP the node took over (transparent mode).
    assert_eq!(
        kdig(&c, KUBEDNS, "web.default.svc.cluster.local"),
        "10.96.1.5"
    );
    let cl = c.cluster.queries();
    assert!(
        cl.iter()
            .any(|(n, _, v)| n == "web.default.svc.cluster.local" && matches!(v, Via::Tcp)),
        "{cl:?}"
    );
    assert!(cl.iter().all(|(_, _, v)| matches!(v, Via::Tcp)), "{cl:?}");
    // The stub domain: its ConfigMap nameserver, over UDP.
    assert_eq!(kdig(&c, LOCAL_IP, "web.service.consul.local"), "10.150.0.9");
    let st = stub.queries();
    assert!(
        st.iter()
            .any(|(n, _, v)| n == "web.service.consul.local" && matches!(v, Via::Udp)),
        "{st:?}"
    );
    // An external name: the ConfigMap's upstream nameserver.
    assert_eq!(kdig(&c, LOCAL_IP, "example.org"), "192.0.2.7");
    assert!(c.external.count("example.org") >= 1);
    // Each name went to its own upstream only.
    assert_eq!(c.external.count("web.default.svc.cluster.local"), 0);
    assert_eq!(c.external.count("web.service.consul.local"), 0);
    assert_eq!(c.cluster.count("web.service.consul.local"), 0);
    assert_eq!(c.cluster.count("example.org"), 0);
    assert!(stub
        .queries()
        .iter()
        .all(|(n, _, _)| n.ends_with("consul.local")));

    // Health on the address the Corefile's `health` names.
    let out = in_netns(&c.node.name, || {
        use std::io::{Read, Write};
        let addr = format!("{LOCAL_IP}:8080").parse().unwrap();
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /health HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    assert!(
        out.starts_with("HTTP/1.0 200") && out.ends_with("OK"),
        "{out}"
    );

    d.terminate();
    // Teardown: the addresses (and a dummy link) are gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c
        .node
        .sh(&format!("ip -o addr show dev {ifname}"))
        .1
        .contains(KUBEDNS)
    {
        assert!(Instant::now() < deadline, "addresses not removed at exit");
        std::thread::sleep(Duration::from_millis(50));
    }
    if dummy {
        assert!(
            !c.node.sh("ip link show nodelocaldns").0,
            "interface not removed at exit"
        );
    }
}

/// Runs the binary with `args` and the `kube-dns-upstream` Service's environment; returns
/// (exit code, stdout, stderr).
fn nodedns(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nodedns"))
        .args(args)
        .env_clear()
        .env("KUBE_DNS_UPSTREAM_SERVICE_HOST", "127.0.0.9")
        .output()
        .expect("run nodedns");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_what_the_corefile_and_configmap_produce() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("Corefile.base");
    std::fs::write(&base, sed(TEMPLATE)).unwrap();
    let kd = dir.path().join("kube-dns");
    std::fs::create_dir(&kd).unwrap();
    std::fs::write(kd.join("stubDomains"), r#"{"consul.local": ["127.0.0.7"]}"#).unwrap();
    std::fs::write(kd.join("upstreamNameservers"), r#"["127.0.0.8"]"#).unwrap();
    let mut args: Vec<String> = MANIFEST_ARGS.iter().map(|a| sed(a)).collect();
    args.extend([
        "-basecorefile".into(),
        base.display().to_string(),
        "-kubednscm".into(),
        kd.display().to_string(),
        "--check-config".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = nodedns(&args);
    assert_eq!(code, 0, "{err}");
    let printed: toml::Value = toml::from_str(&out).unwrap();
    assert_eq!(
        printed["listen"].as_array().unwrap(),
        &vec![
            toml::Value::from("169.254.20.10:53"),
            toml::Value::from("10.96.0.10:53")
        ]
    );
    assert_eq!(printed["cluster_dns"][0].as_str(), Some("127.0.0.9:53"));
    assert_eq!(printed["upstreams"][0].as_str(), Some("127.0.0.8:53"));
    assert_eq!(printed["node"]["setup_iptables"].as_bool(), Some(true));
    let zones: Vec<(&str, &str)> = printed["zone"]
        .as_array()
        .unwrap()
        .iter()
        .map(|z| {
            (
                z["name"].as_str().unwrap(),
                z["upstreams"][0].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        zones,
        vec![
            ("cluster.local", "127.0.0.9:53"),
            ("in-addr.arpa", "127.0.0.9:53"),
            ("ip6.arpa", "127.0.0.9:53"),
            ("consul.local", "127.0.0.7:53"),
        ]
    );

    // An unsupported plugin: refused with file, line and name, exit 78.
    let bad = dir.path().join("Corefile.bad");
    std::fs::write(
        &bad,
        sed(TEMPLATE).replace("    loop\n", "    loop\n    loadbalance\n"),
    )
    .unwrap();
    let bad = bad.display().to_string();
    let (code, _, err) = nodedns(&[
        "--corefile",
        &bad,
        "--local-ip",
        "169.254.20.10,10.96.0.10",
        "--check-config",
    ]);
    assert_eq!(code, 78, "{err}");
    assert_eq!(
        err.trim(),
        format!("nodedns: invalid configuration: config file {bad}: line 13: plugin \"loadbalance\" is not supported")
    );
}
