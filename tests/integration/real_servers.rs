//! nodedns between real DNS software: knot (Debian's knotd) as both the CoreDNS and the VPC
//! resolver stand-in, queried by real clients (kdig, dig).

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

/// knotd serving two zones on a loopback port, stopped on drop.
pub(crate) struct Knot {
    child: Child,
    pub(crate) addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Knot {
    pub(crate) fn start() -> Knot {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("cluster.local.zone"),
            "$TTL 30\n@ SOA ns.cluster.local. host.cluster.local. 1 3600 600 86400 30\n@ NS ns\n\
             ns A 127.0.0.1\nkubernetes.default.svc A 10.96.0.1\n",
        )
        .unwrap();
        let big: String = (0..8)
            .map(|i| format!(" \"{}\"", "x".repeat(190 + i)))
            .collect();
        std::fs::write(
            dir.path().join("example.com.zone"),
            format!(
                "$TTL 300\n@ SOA ns.example.com. host.example.com. 1 3600 600 86400 60\n@ NS ns\n\
                 ns A 127.0.0.1\nwww A 93.184.216.34\nwww AAAA 2001:db8::1\nbig TXT{big}\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("knot.conf"),
            format!(
                "server:\n    listen: 127.0.0.1@{port}\n    rundir: {d}\n    udp-workers: 1\n    tcp-workers: 1\n\
                 database:\n    storage: {d}\n\
                 zone:\n  - domain: cluster.local\n    file: {d}/cluster.local.zone\n\
                 \x20 - domain: example.com\n    file: {d}/example.com.zone\n"
            ),
        )
        .unwrap();
        let child = Command::new("knotd")
            .arg("-c")
            .arg(dir.path().join("knot.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start knotd");
        let k = Knot {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while kdig(
            k.addr,
            &["www.example.com", "+short", "+timeout=1", "+retry=0"],
        )
        .trim()
        .is_empty()
        {
            assert!(Instant::now() < deadline, "knotd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        k
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn kdig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("kdig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(args)
        .output()
        .expect("run kdig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nodedns_in_front_of(knot: &Knot) -> Nodedns {
    let k = knot.addr.to_string();
    Nodedns::start(&[
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &k,
        "--cluster-dns",
        &k,
        "--metrics",
        "off",
        "--health",
        "off",
    ])
}

#[test]
fn kdig_through_nodedns_to_knot() {
    if !require(&["knotd", "kdig"], false) {
        return;
    }
    let knot = Knot::start();
    let nd = nodedns_in_front_of(&knot);
    assert_eq!(
        kdig(nd.dns, &["kubernetes.default.svc.cluster.local", "+short"]).trim(),
        "10.96.0.1"
    );
    assert_eq!(
        kdig(nd.dns, &["www.example.com", "AAAA", "+short"]).trim(),
        "2001:db8::1"
    );
    // Served again from cache with the TTL capped at 30 s.
    let out = kdig(nd.dns, &["www.example.com", "+noall", "+answer"]);
    let ttl: u32 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(ttl <= 30, "{out}");
    // NXDOMAIN with the zone's SOA.
    let out = kdig(nd.dns, &["nope.example.com"]);
    assert!(out.contains("NXDOMAIN") && out.contains("SOA"), "{out}");
    // A large answer: truncated over UDP without EDNS, whole over TCP (kdig retries by itself).
    let out = kdig(nd.dns, &["big.example.com", "TXT", "+noedns", "+ignore"]);
    assert!(out.contains(" tc"), "{out}");
    let out = kdig(nd.dns, &["big.example.com", "TXT", "+tcp", "+short"]);
    assert_eq!(
        out.matches('"').count(),
        16,
        "all eight strings arrive over TCP: {out}"
    );
}

#[test]
fn dig_with_dnssec_ok_and_0x20_case() {
    if !require(&["knotd", "dig"], false) {
        return;
    }
    let knot = Knot::start();
    let nd = nodedns_in_front_of(&knot);
    let out = Command::new("dig")
        .args([
            &format!("@{}", nd.dns.ip()),
            "-p",
            &nd.dns.port().to_string(),
            "WwW.ExAmPlE.CoM",
            "+dnssec",
            "+nocookie",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(
        out.contains(";WwW.ExAmPlE.CoM."),
        "question case echoed: {out}"
    );
    assert!(
        out.contains("flags: do; udp: 1232"),
        "our OPT with DO echoed: {out}"
    );
}
