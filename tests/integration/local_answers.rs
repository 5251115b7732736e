//! Local answers end to end: `[[hosts]]`, `[[template]]` and `[[rewrite]]` in a TOML file,
//! queried with kdig and dig over UDP and TCP. knotd stands in for CoreDNS (the cluster zones);
//! an in-process upstream takes everything else and records which names it was asked, so a
//! rewrite is seen leaving under the new name and a cached local answer is seen not leaving.

use std::net::SocketAddr;
use std::process::Command;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::common::knot::Knot;
use crate::common::*;
use crate::real_servers::{kdig, knot};

const CONFIG: &str = r#"
[[hosts]]
zones = ["node.test."]
entries = [
    "192.0.2.10 web.node.test",
    "2001:db8::10 web.node.test",
    "192.0.2.11 db.node.test   # a comment",
]
ttl = "20s"

[[hosts]]
zones = ["example.com."]
entries = ["192.0.2.20 pinned.example.com"]
fallthrough = []

[[template]]
zones = ["tmpl.test."]
qtype = "A"
matches = ['^ip-(?P<a>[0-9]+)-(?P<b>[0-9]+)-(?P<c>[0-9]+)-(?P<d>[0-9]+)\.tmpl\.test\.$']
answers = ["{{ .Name }} 60 IN A {{ .Group.a }}.{{ .Group.b }}.{{ .Group.c }}.{{ .Group.d }}"]

[[template]]
zones = ["gone.test."]
rcode = "NXDOMAIN"
authority = ["gone.test. 60 IN SOA ns.gone.test. host.gone.test. 1 3600 600 86400 20"]

[[rewrite]]
from = "api.legacy.test"
to = "kubernetes.default.svc.cluster.local"

[[rewrite]]
match = "suffix"
from = "old.test"
to = "new.test"
"#;

/// An upstream answering every A query with 192.0.2.99 (TTL 30) under the name it was asked.
fn upstream() -> FakeUpstream {
    FakeUpstream::start(|req, _| {
        if req.queries[0].query_type() == RecordType::A {
            Action::Answer(a_reply(req, 30, &[[192, 0, 2, 99]]))
        } else {
            Action::Answer(reply(req, ResponseCode::NoError))
        }
    })
}

fn start(knot: &Knot, up: &FakeUpstream, dir: &tempfile::TempDir) -> Nodedns {
    let path = dir.path().join("nodedns.toml");
    std::fs::write(&path, CONFIG).unwrap();
    let (k, u) = (knot.addr.to_string(), up.arg());
    Nodedns::start(&[
        "--config",
        path.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &u,
        "--cluster-dns",
        &k,
        "--metrics",
        "127.0.0.1:0",
        "--health",
        "off",
    ])
}

fn dig(server: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .arg("-p")
        .arg(server.port().to_string())
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of the sample `series` (name and labels as printed) on the metrics page.
fn metric(n: &Nodedns, series: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(n.metrics.expect("metrics address")).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
        .unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn short(server: SocketAddr, args: &[&str]) -> String {
    let mut a = args.to_vec();
    a.extend(["+short", "+timeout=2", "+retry=0"]);
    kdig(server, &a).trim().to_string()
}

#[test]
fn hosts_answer_by_name_and_address_with_nxdomain_nodata_and_fallthrough() {
    if !require(&["knotd", "kdig", "dig"], false) {
        return;
    }
    let (knot, up, dir) = (knot(), upstream(), tempfile::tempdir().unwrap());
    let nd = start(&knot, &up, &dir);
    let s = nd.dns;
    // A and AAAA by name, with the section's TTL. (AA is cleared: the reply comes from the
    // cache's entry, and a cache is no authority.)
    let out = kdig(s, &["web.node.test", "A", "+timeout=2"]);
    assert!(
        out.contains("NOERROR") && out.contains("\t20\tIN\tA\t192.0.2.10"),
        "{out}"
    );
    assert_eq!(short(s, &["web.node.test", "AAAA"]), "2001:db8::10");
    assert_eq!(short(s, &["WEB.Node.Test", "A", "+tcp"]), "192.0.2.10");
    // A name with an entry of the other family: NODATA. A name without one: NXDOMAIN.
    let out = dig(s, &["db.node.test", "AAAA"]);
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    let out = dig(s, &["nope.node.test", "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    let out = kdig(s, &["nope.node.test", "A", "+tcp", "+timeout=2"]);
    assert!(out.contains("NXDOMAIN"), "{out}");
    // PTR from the addresses, over UDP and TCP.
    assert_eq!(short(s, &["-x", "192.0.2.10"]), "web.node.test.");
    assert_eq!(short(s, &["-x", "2001:db8::10", "+tcp"]), "web.node.test.");
    // Fallthrough: an entry answers, a name without one goes to the upstream.
    assert_eq!(short(s, &["pinned.example.com", "A"]), "192.0.2.20");
    assert_eq!(short(s, &["www.example.com", "A"]), "192.0.2.99");
    assert_eq!(up.count("www.example.com"), 1);
    for name in [
        "pinned.example.com",
        "web.node.test",
        "db.node.test",
        "nope.node.test",
    ] {
        assert_eq!(
            up.count(name),
            0,
            "{name} was forwarded: {:?}",
            up.queries()
        );
    }
    let entries = metric(&nd, "coredns_hosts_entries{hostsfile=\"\"}");
    assert_eq!(entries, Some(4.0));
}

#[test]
fn templates_answer_from_the_name_and_are_cached_like_upstream_answers() {
    if !require(&["knotd", "kdig"], false) {
        return;
    }
    let (knot, up, dir) = (knot(), upstream(), tempfile::tempdir().unwrap());
    let nd = start(&knot, &up, &dir);
    let s = nd.dns;
    let matches = |zone: &str| {
        metric(
            &nd,
            &format!("coredns_template_matches_total{{class=\"IN\",type=\"A\",zone=\"{zone}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(short(s, &["ip-10-1-2-3.tmpl.test", "A"]), "10.1.2.3");
    // Asked again over UDP and TCP: the cache answers, the template is not applied again.
    assert_eq!(short(s, &["ip-10-1-2-3.tmpl.test", "A"]), "10.1.2.3");
    assert_eq!(
        short(s, &["ip-10-1-2-3.tmpl.test", "A", "+tcp"]),
        "10.1.2.3"
    );
    assert_eq!(matches("tmpl.test."), 1.0);
    // TTL 60 capped by the cache's success cap (30 s), as CoreDNS's cache caps it.
    let out = kdig(s, &["ip-10-1-2-3.tmpl.test", "+noall", "+answer"]);
    let ttl: u32 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(ttl <= 30, "{out}");
    // A name in the zone that no expression matches, without fallthrough: SERVFAIL.
    let out = kdig(s, &["other.tmpl.test", "A", "+timeout=2"]);
    assert!(out.contains("SERVFAIL"), "{out}");
    // Another type: not this template's; it goes on to the upstream.
    let out = kdig(s, &["ip-10-1-2-3.tmpl.test", "AAAA", "+timeout=2"]);
    assert!(out.contains("NOERROR"), "{out}");
    assert_eq!(up.count("ip-10-1-2-3.tmpl.test"), 1);
    // A negative template with an SOA: NXDOMAIN, cached (over TCP the second time).
    let out = kdig(s, &["x.gone.test", "A", "+timeout=2"]);
    assert!(out.contains("NXDOMAIN") && out.contains("SOA"), "{out}");
    let out = kdig(s, &["x.gone.test", "A", "+tcp", "+timeout=2"]);
    assert!(out.contains("NXDOMAIN") && out.contains("SOA"), "{out}");
    assert_eq!(matches("gone.test."), 1.0);
    assert_eq!(up.count("x.gone.test"), 0);
}

#[test]
fn rewritten_names_are_routed_and_forwarded_and_the_client_sees_its_own() {
    if !require(&["knotd", "kdig", "dig"], false) {
        return;
    }
    let (knot, up, dir) = (knot(), upstream(), tempfile::tempdir().unwrap());
    let nd = start(&knot, &up, &dir);
    let s = nd.dns;
    // Exact rule to a cluster name: routed to the cluster DNS (knotd) by the new name, the
    // question and the answer's owner name mapped back.
    let out = dig(
        s,
        &["api.legacy.test", "A", "+noall", "+question", "+answer"],
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with(";api.legacy.test."), "{out}");
    assert!(
        lines[1].starts_with("api.legacy.test.") && lines[1].ends_with("10.96.0.1"),
        "{out}"
    );
    let out = kdig(s, &["api.legacy.test", "A", "+tcp", "+timeout=2"]);
    assert!(
        out.contains(";; api.legacy.test.") && out.contains("api.legacy.test.    \t"),
        "{out}"
    );
    // Suffix rule: the upstream is asked the new name, once; the client's question comes back.
    let out = kdig(s, &["x.old.test", "A", "+timeout=2"]);
    assert!(
        out.contains("x.old.test.") && out.contains("192.0.2.99"),
        "{out}"
    );
    assert_eq!(short(s, &["x.old.test", "A"]), "192.0.2.99");
    assert_eq!(short(s, &["x.old.test", "A", "+tcp"]), "192.0.2.99");
    assert_eq!(up.count("x.new.test"), 1, "{:?}", up.queries());
    // A miss over TCP takes the same path.
    assert_eq!(short(s, &["y.old.test", "A", "+tcp"]), "192.0.2.99");
    assert_eq!(up.count("y.new.test"), 1, "{:?}", up.queries());
    // The rewritten query reached the cluster DNS's pooled TCP connections from a UDP worker's
    // own runtime: those connections must still serve the cluster zone's queries once that
    // worker sits idle in recvmmsg (each name below is new, so each is an exchange).
    std::thread::sleep(std::time::Duration::from_millis(200));
    for i in 0..6 {
        let name = format!("n{i}.default.svc.cluster.local");
        let out = kdig(s, &[&name, "A", "+timeout=5", "+retry=0"]);
        assert!(out.contains("NXDOMAIN"), "{name}: {out}");
    }
    for name in [
        "api.legacy.test",
        "kubernetes.default.svc.cluster.local",
        "x.old.test",
    ] {
        assert_eq!(up.count(name), 0, "{name}: {:?}", up.queries());
    }
}

#[test]
fn a_bad_local_answer_section_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let cases = [
        (
            "[[hosts]]\nentries = [\"192.0.2.1 a.test\", \"x y\"]\n",
            "hosts[0].entries[1]: invalid address \"x\"",
        ),
        (
            "[[template]]\nanswers = [\"{{ .Remote }} 60 IN A 192.0.2.1\"]\n",
            "template[0].answers[0]: {{ .Remote }} is not supported",
        ),
        (
            "[[rewrite]]\nmatch = \"regex\"\nfrom = \"(\"\nto = \"x\"\n",
            "rewrite[0].from: invalid regular expression",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(&path, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_nodedns"))
            .args(["--check-config", "--config"])
            .arg(&path)
            .args(["--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{text}: {err}");
    }
}
