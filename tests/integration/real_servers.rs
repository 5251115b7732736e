//! nodedns between real DNS software: knot (Debian's knotd) as both the CoreDNS and the VPC
//! resolver stand-in, queried by real clients (kdig, dig).

use std::net::SocketAddr;
use std::process::Command;

use crate::common::knot::Knot;
use crate::common::*;

/// knotd serving a cluster zone and `example.com` (with a TXT too large for 512 and 1232 bytes)
/// on a loopback port, stopped on drop.
pub(crate) fn knot() -> Knot {
    let big: String = (0..8)
        .map(|i| format!(" \"{}\"", "x".repeat(190 + i)))
        .collect();
    Knot::start(&[
        ("cluster.local", "kubernetes.default.svc 30 A 10.96.0.1\n"),
        (
            "example.com",
            &format!("www A 93.184.216.34\nwww AAAA 2001:db8::1\nbig TXT{big}\n"),
        ),
    ])
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
    let knot = knot();
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
    let knot = knot();
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
