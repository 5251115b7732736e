//! The cluster of the network-namespace tests: node, pod and upstream namespaces wired with veth
//! pairs (IPv4, or both families), fake CoreDNS and external resolvers in the upstream namespace,
//! kube-proxy's Service DNAT, and the nodedns binary run on the node. Re-exported by `netns`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use super::netns::{in_netns, Netns};
use super::{a_reply, negative_reply, reply, txt_reply, Action, FakeUpstream};

pub const LOCAL_IP: &str = "169.254.20.10";
pub const CLUSTER_DNS: &str = "10.201.0.2:53";
pub const EXTERNAL_DNS: &str = "10.201.0.3:53";
/// The IPv6 node-local address of a dual-stack cluster (a unique local address in fd00::/8, the
/// range node-local-dns suggests for IPv6).
pub const LOCAL_IP6: &str = "fd00::a";
/// A dual-stack cluster's CoreDNS and external resolver on IPv6, beside the IPv4 ones.
pub const CLUSTER_DNS6: &str = "[fd00:201::2]:53";
pub const EXTERNAL_DNS6: &str = "[fd00:201::3]:53";
pub const SEARCH: &str = "default.svc.cluster.local svc.cluster.local cluster.local";

/// The index of a name `n<i>.example.org.` (the external upstream answers those with an address).
pub fn warm_name(name: &str) -> Option<u16> {
    name.strip_prefix('n')?
        .strip_suffix(".example.org.")?
        .parse()
        .ok()
}

/// node, pod and upstream namespaces, wired with veth pairs; the pod's resolv.conf points at
/// nodedns with the Kubernetes search list. A dual-stack cluster ([`Cluster::create_dual`]) has
/// IPv6 on every veth too (10.200.0.0/24 and fd00:200::/64 to the pod, 10.201.0.0/24 and
/// fd00:201::/64 to the upstreams) and its upstreams answer on both families.
pub struct Cluster {
    pub node: Netns,
    pub pod: Netns,
    /// Holds the upstream namespace for the cluster's lifetime.
    pub _up: Netns,
    pub etc: std::path::PathBuf,
    /// The node's state directory (the hostPath of a real node).
    pub state: std::path::PathBuf,
    pub cluster: FakeUpstream,
    pub external: FakeUpstream,
    /// Dual-stack only: CoreDNS and the external resolver on IPv6 ([`CLUSTER_DNS6`],
    /// [`EXTERNAL_DNS6`]).
    pub cluster6: Option<FakeUpstream>,
    pub external6: Option<FakeUpstream>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.etc);
        let _ = std::fs::remove_dir_all(&self.state);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.node.name));
    }
}

/// CoreDNS: web.default.svc.cluster.local has an address, every other name is NXDOMAIN.
fn cluster_answer(q: &hickory_proto::op::Message, _: super::Via) -> Action {
    let qq = &q.queries[0];
    let name = qq.name().to_ascii().to_lowercase();
    if name == "web.default.svc.cluster.local." {
        if qq.query_type() == RecordType::A {
            Action::Answer(a_reply(q, 30, &[[10, 96, 1, 5]]))
        } else {
            Action::Answer(reply(q, ResponseCode::NoError))
        }
    } else {
        Action::Answer(negative_reply(q, ResponseCode::NXDomain, Some((5, 5))))
    }
}

/// The external resolver.
fn external_answer(q: &hickory_proto::op::Message, _: super::Via) -> Action {
    let qq = &q.queries[0];
    let name = qq.name().to_ascii().to_lowercase();
    match (name.as_str(), qq.query_type()) {
        ("example.org.", RecordType::A) => Action::Answer(a_reply(q, 30, &[[192, 0, 2, 7]])),
        ("example.org.", _) => Action::Answer(reply(q, ResponseCode::NoError)),
        // Longer than the pod link's MTU (1500).
        ("big.example.org.", RecordType::TXT) => Action::Answer(txt_reply(q, 30, 2000)),
        // n<i>.example.org: one address per name (a warm-cache test's working set).
        (n, RecordType::A) if warm_name(n).is_some() => {
            let i = warm_name(n).unwrap_or(0);
            Action::Answer(a_reply(q, 30, &[[198, 51, (i >> 8) as u8, i as u8]]))
        }
        _ => Action::Answer(negative_reply(q, ResponseCode::NXDomain, Some((5, 5)))),
    }
}

impl Cluster {
    pub fn create(tag: &str) -> Result<Cluster, String> {
        Self::build(tag, false)
    }

    /// A cluster with IPv4 and IPv6 on every link (see [`Cluster`]); nodedns started by
    /// [`Cluster::spawn_nodedns`] listens on [`LOCAL_IP`] and [`LOCAL_IP6`] and asks CoreDNS
    /// over IPv6, the external resolver over IPv4.
    pub fn create_dual(tag: &str) -> Result<Cluster, String> {
        Self::build(tag, true)
    }

    fn build(tag: &str, dual: bool) -> Result<Cluster, String> {
        let node = Netns::create(&format!("{tag}n"))?;
        let pod = Netns::create(&format!("{tag}p"))?;
        let up = Netns::create(&format!("{tag}u"))?;
        if dual {
            // No duplicate address detection anywhere (the veths' link-local addresses
            // included): every address is usable at once, as `nodad` makes ours on the node.
            for ns in [&node, &pod, &up] {
                ns.sh_ok(
                    "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
                );
            }
        }
        // Both ends are created inside the namespaces: nothing appears on the host.
        for (a, b, peer_ns, a_ip, b_ip) in [
            ("topod", "eth0", &pod, "10.200.0.1/24", "10.200.0.2/24"),
            ("toup", "eth0", &up, "10.201.0.1/24", "10.201.0.2/24"),
        ] {
            let out = Command::new("ip")
                .args([
                    "-n", &node.name, "link", "add", a, "type", "veth", "peer", "name", b,
                ])
                .args(["netns", &peer_ns.name])
                .output()
                .unwrap();
            if !out.status.success() {
                return Err(format!(
                    "cannot create a veth pair: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            node.sh_ok(&format!("ip addr add {a_ip} dev {a} && ip link set {a} up"));
            peer_ns.sh_ok(&format!(
                "ip addr add {b_ip} dev {b} && ip link set {b} up && ip route add default via {}",
                a_ip.trim_end_matches("/24")
            ));
            if dual {
                // fd00:200::/64 to the pod, fd00:201::/64 to the upstreams: the IPv4 subnet's
                // second octet.
                let net = a_ip.split('.').nth(1).unwrap();
                node.sh_ok(&format!("ip addr add fd00:{net}::1/64 dev {a} nodad"));
                peer_ns.sh_ok(&format!(
                    "ip addr add fd00:{net}::2/64 dev {b} nodad && \
                     ip -6 route add default via fd00:{net}::1"
                ));
            }
        }
        up.sh_ok("ip addr add 10.201.0.3/24 dev eth0");
        if dual {
            up.sh_ok("ip addr add fd00:201::3/64 dev eth0 nodad");
        }

        // ip netns exec bind-mounts /etc/netns/<pod>/resolv.conf over /etc/resolv.conf.
        let etc = Path::new("/etc/netns").join(&pod.name);
        std::fs::create_dir_all(&etc).map_err(|e| format!("creating {}: {e}", etc.display()))?;
        std::fs::write(
            etc.join("resolv.conf"),
            format!("nameserver {LOCAL_IP}\nsearch {SEARCH}\noptions ndots:5\n"),
        )
        .unwrap();

        let cluster = in_netns(&up.name, || {
            FakeUpstream::start_on(CLUSTER_DNS, cluster_answer)
        });
        let external = in_netns(&up.name, || {
            FakeUpstream::start_on(EXTERNAL_DNS, external_answer)
        });
        let (cluster6, external6) = if dual {
            (
                Some(in_netns(&up.name, || {
                    FakeUpstream::start_on(CLUSTER_DNS6, cluster_answer)
                })),
                Some(in_netns(&up.name, || {
                    FakeUpstream::start_on(EXTERNAL_DNS6, external_answer)
                })),
            )
        } else {
            (None, None)
        };
        let tmpfs = Path::new("/dev/shm");
        let base = if tmpfs.is_dir() {
            tmpfs.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let state = base.join(format!("{}-state", node.name));
        let _ = std::fs::remove_dir_all(&state);
        Ok(Cluster {
            state,
            node,
            pod,
            _up: up,
            etc,
            cluster,
            external,
            cluster6,
            external6,
        })
    }

    fn dual(&self) -> bool {
        self.cluster6.is_some()
    }

    /// Replaces the pod's resolv.conf: `nameserver` with the Kubernetes search list.
    pub fn set_nameserver(&self, nameserver: &str) {
        std::fs::write(
            self.etc.join("resolv.conf"),
            format!("nameserver {nameserver}\nsearch {SEARCH}\noptions ndots:5\n"),
        )
        .unwrap();
    }

    /// Gives processes run in the node namespace (host-network clients) a resolv.conf with
    /// `nameserver`. Call only while no nodedns runs: nodedns reads it at start.
    pub fn set_node_nameserver(&self, nameserver: &str) {
        let dir = Path::new("/etc/netns").join(&self.node.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resolv.conf"),
            format!("nameserver {nameserver}\nsearch {SEARCH}\noptions ndots:5\n"),
        )
        .unwrap();
    }

    /// Removes what `set_node_nameserver` wrote.
    pub fn clear_node_nameserver(&self) {
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.node.name));
    }

    /// Plays kube-proxy (iptables mode) on the node: the Service IP `service_ip`:53, UDP and
    /// TCP, DNATed to the cluster DNS upstream (our CoreDNS) in nat PREROUTING and OUTPUT, with
    /// forwarding on as on any Kubernetes node. Needs iptables-nft.
    pub fn fake_kube_proxy(&self, service_ip: &str) {
        let (ip, port) = CLUSTER_DNS.split_once(':').unwrap();
        self.node.sh_ok("sysctl -qw net.ipv4.ip_forward=1");
        self.node.sh_ok("iptables-nft -t nat -N KUBE-SERVICES");
        for chain in ["PREROUTING", "OUTPUT"] {
            self.node.sh_ok(&format!(
                "iptables-nft -t nat -A {chain} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            ));
        }
        for proto in ["udp", "tcp"] {
            self.node.sh_ok(&format!(
                "iptables-nft -t nat -A KUBE-SERVICES -d {service_ip}/32 -p {proto} --dport {port} \
                 -m comment --comment \"kube-system/kube-dns:dns\" -j DNAT --to-destination {ip}:{port}"
            ));
        }
    }

    /// [`Cluster::fake_kube_proxy`] for IPv6: the Service IP `service_ip`:53 DNATed to
    /// [`CLUSTER_DNS6`] with ip6tables-nft, IPv6 forwarding on.
    pub fn fake_kube_proxy6(&self, service_ip: &str) {
        self.node.sh_ok("sysctl -qw net.ipv6.conf.all.forwarding=1");
        self.node.sh_ok("ip6tables-nft -t nat -N KUBE-SERVICES");
        for chain in ["PREROUTING", "OUTPUT"] {
            self.node.sh_ok(&format!(
                "ip6tables-nft -t nat -A {chain} -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"
            ));
        }
        for proto in ["udp", "tcp"] {
            self.node.sh_ok(&format!(
                "ip6tables-nft -t nat -A KUBE-SERVICES -d {service_ip}/128 -p {proto} --dport 53 \
                 -m comment --comment \"kube-system/kube-dns:dns\" -j DNAT --to-destination {CLUSTER_DNS6}"
            ));
        }
    }

    /// Starts nodedns in the node namespace with node setup on `lo` and waits until it serves
    /// the pod through its rules.
    pub fn start_nodedns(&self, extra: &[&str]) -> Daemon {
        let d = self.spawn_nodedns(extra);
        self.wait_serving(&d);
        d
    }

    /// Starts nodedns in the node namespace with node setup on `lo`, without waiting.
    pub fn spawn_nodedns(&self, extra: &[&str]) -> Daemon {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("{}-nodedns-{n}.log", self.node.name));
        let file = std::fs::File::create(&log).unwrap();
        // Dual-stack: one process on both node-local addresses, CoreDNS over IPv6.
        let (listen6, cluster_dns): (&[&str], &str) = if self.dual() {
            (&["--listen", "[fd00::a]:53"], CLUSTER_DNS6)
        } else {
            (&[], CLUSTER_DNS)
        };
        let mut args: Vec<String> = [
            "netns",
            "exec",
            &self.node.name,
            env!("CARGO_BIN_EXE_nodedns"),
            "--listen",
            "169.254.20.10:53",
        ]
        .iter()
        .chain(listen6)
        .chain(&[
            "--health",
            "169.254.20.10:8080",
            "--metrics",
            "127.0.0.1:9253",
            "--cluster-dns",
            cluster_dns,
            "--upstream",
            EXTERNAL_DNS,
            "--setup-interface",
            "--interface-name",
            "lo",
            "--setup-iptables",
            "--sync-interval",
            "1s",
        ])
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--state-dir") {
            args.push("--state-dir".into());
            args.push(self.state.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("ip")
            .args(&args)
            .env("RUST_LOG", "info")
            .env_remove("KUBE_DNS_UPSTREAM_SERVICE_HOST")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn nodedns");
        Daemon { child, log }
    }

    /// Waits until `d` answers the pod and has its rules in place.
    pub fn wait_serving(&self, d: &Daemon) {
        // Ready once the pod gets an answer through the rules.
        let deadline = Instant::now() + Duration::from_secs(20);
        let ask: &[&str] = if self.dual() {
            &[LOCAL_IP, LOCAL_IP6]
        } else {
            &[LOCAL_IP]
        };
        for ip in ask {
            loop {
                let (ok, out) = self
                    .pod
                    .sh(&format!("kdig @{ip} +short +time=1 +retry=0 example.org A"));
                if ok && out.contains("192.0.2.7") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "nodedns did not answer the pod on {ip} within 20 s: {out}\n{}",
                    d.log()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // Answering comes before the firewall rules; "serving" is logged once they are in.
        let serving = format!("nodedns {} serving", env!("CARGO_PKG_VERSION"));
        while !d.log().contains(&serving) {
            assert!(
                Instant::now() < deadline,
                "rules not installed within 20 s:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The nodedns process (`ip netns exec` execs it, so the pid is nodedns's own).
pub struct Daemon {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl Daemon {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL (no teardown: address and rules stay, as after a crash or an OOM kill) and reap.
    pub fn sigkill(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let st = self.child.wait().expect("wait for nodedns");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL),
            "{st}"
        );
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "nodedns exited with {st}:\n{}", self.log());
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nodedns did not exit on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- nodedns log ----\n{}", self.log());
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
