//! Differential conformance: the same queries, in every variation a client sends (UDP and TCP,
//! with and without EDNS, DO, CD, mixed case, 512- and 4096-byte buffers), asked of a real
//! authoritative server (knotd, serving zones shaped like a cluster's and a DNSSEC-signed zone),
//! of unbound as a forwarding cache in front of it, and of nodedns in front of it (a miss, then a
//! hit). nodedns's replies are compared section by section with the authority's and with
//! unbound's; every difference left is one of those listed in [`INTENDED`], with its reason.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::common::*;

/// Differences from the authority that are intended, with their reason. The comparison below
/// applies each; anything else fails the test.
pub const INTENDED: &[(&str, &str)] = &[
    (
        "AA=0",
        "a cache is not the authority for what it serves (RFC 1035 §4.1.1); unbound clears it too",
    ),
    (
        "RA=1",
        "a recursive cache offers recursion, whatever its upstream says (an authority answers RA=0)",
    ),
    (
        "TTL capped",
        "every TTL is capped at the zone's max TTL (success 30 s; denial 30 s, 5 s in cluster zones) \
         and floored at min_ttl (5 s), as node-cache's CoreDNS cache does; a hit shows it minus its age",
    ),
    (
        "OPT payload",
        "the OPT record is per hop: nodedns advertises its own UDP size (1232)",
    ),
    (
        "TC=1 sections",
        "when both set TC=1, only the header and question are compared: a truncated reply's \
         records are a responder's choice (RFC 2181 §9); the client retries over TCP",
    ),
    (
        "additional records left out",
        "when a UDP reply's additional section does not fit, nodedns leaves all of it out; knotd \
         keeps as many records as fit. Both are allowed (RFC 2181 §9: additional data is not \
         needed; TC only when the answer itself does not fit)",
    ),
    (
        "unbound follows CNAMEs",
        "an out-of-zone CNAME (ExternalName) is chased by unbound, a recursive resolver; nodedns \
         relays its upstream's answer (in a cluster that upstream, CoreDNS, does the chasing)",
    ),
    (
        "UDP size cap",
        "nodedns answers UDP with at most 1232 bytes whatever the client's buffer (no IP \
         fragmentation, RFC 9715), as knotd does; unbound here sends up to 4096 (its \
         max-udp-size), so a larger answer is TC=1 from nodedns and whole from unbound",
    ),
    (
        "unbound's authority/additional",
        "unbound builds the authority and additional sections from its own cache; only the answer \
         section is compared with unbound's",
    ),
];

/// nodedns's largest UDP reply (`server.edns_udp_size`, default).
const NODEDNS_UDP_SIZE: usize = 1232;

const CLUSTER_ZONE: &str = "$TTL 60
@ SOA ns.cluster.local. host.cluster.local. 1 3600 600 86400 20
@ NS ns
ns A 127.0.0.1
web.default.svc A 10.96.0.20
web.default.svc AAAA fd00::20
_http._tcp.web.default.svc SRV 0 100 80 web.default.svc
ext.default.svc 3600 CNAME www.example.com.
alias.default.svc CNAME web.default.svc
";

const EXAMPLE_ZONE: &str = "$TTL 300
@ SOA ns.example.com. host.example.com. 1 3600 600 86400 60
@ NS ns
ns A 127.0.0.1
www A 93.184.216.34
";

const REVERSE_ZONE: &str = "$TTL 60
@ SOA ns.cluster.local. host.cluster.local. 1 3600 600 86400 20
@ NS ns.cluster.local.
20.0.96 PTR web.default.svc.cluster.local.
";

const SECURE_ZONE: &str = "$TTL 120
@ SOA ns.secure.example. host.secure.example. 1 3600 600 86400 40
@ NS ns
ns A 127.0.0.1
www A 192.0.2.80
www AAAA 2001:db8::80
";

/// A label of 63 bytes: four of them and the zone make a name near the 255-byte limit.
fn long_label(c: char) -> String {
    c.to_string().repeat(63)
}

fn long_name() -> String {
    // 4 * 64 + "cluster.local." is over 255: three long labels, one shorter, then the zone.
    format!(
        "{}.{}.{}.{}.cluster.local.",
        long_label('a'),
        long_label('b'),
        long_label('c'),
        "d".repeat(40)
    )
}

/// A headless service of eight pods, each with an IPv4 and an IPv6 address and an SRV record:
/// its SRV answer fits in 512 bytes, the pods' addresses in the additional section do not.
fn headless() -> String {
    let mut z = String::new();
    for i in 0..8 {
        let _ = write!(
            z,
            "db.default.svc 10 A 10.244.{i}.5\n\
             db-{i}.db.default.svc 10 A 10.244.{i}.5\n\
             db-{i}.db.default.svc 10 AAAA fd00:244::{i}:5\n\
             _pg._tcp.db.default.svc 10 SRV 0 12 5432 db-{i}.db.default.svc\n"
        );
    }
    z
}

fn big_txt() -> String {
    (0..8)
        .map(|i| format!(" \"{}\"", "t".repeat(180 + i)))
        .collect()
}

/// A server process of the test's own (knotd or unbound) on a loopback port, stopped on drop.
struct Server {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free for UDP and TCP at once (both are released before the server binds).
fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Starts the server `command(dir, port)` runs (its log in `dir/log`) and waits until its answer
/// for `probe` satisfies `ok`. A port can be taken between our check and the server's bind (by
/// an ephemeral port of another test's connection): a server that exits at once is started again
/// on another port, up to five times.
fn start_server(
    command: impl Fn(&std::path::Path, u16) -> Command,
    probe: &str,
    ok: impl Fn(&Message) -> bool,
) -> Server {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = dir.path().join("log");
        let child = command(dir.path(), port)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the server");
        let mut server = Server {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut q = query_msg(probe, RecordType::A, rand_id(), Some(1232));
            q.edns.as_mut().unwrap().set_dnssec_ok(true);
            let r = udp_raw(
                server.addr,
                &q.to_vec().unwrap(),
                Duration::from_millis(500),
            );
            if r.and_then(|r| Message::from_vec(&r).ok())
                .is_some_and(|m| ok(&m))
            {
                return server;
            }
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            if server.child.try_wait().unwrap().is_some() {
                assert!(log.contains("in use"), "the server exited:\n{log}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not come up:\n{log}",
                server.addr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    panic!("no free port for the server in five tries");
}

/// knotd serving the zones; the signed zone is signed by knotd itself.
fn knot() -> Server {
    let conf = |p: &std::path::Path, port: u16| {
        let d = p.display();
        let cluster = format!(
            "{CLUSTER_ZONE}{}big.default.svc TXT{}\n{} A 10.96.0.99\n",
            headless(),
            big_txt(),
            long_name()
        );
        std::fs::write(p.join("cluster.local.zone"), cluster).unwrap();
        std::fs::write(p.join("example.com.zone"), EXAMPLE_ZONE).unwrap();
        std::fs::write(p.join("10.in-addr.arpa.zone"), REVERSE_ZONE).unwrap();
        std::fs::write(p.join("secure.example.zone"), SECURE_ZONE).unwrap();
        let conf = format!(
            "server:\n    listen: 127.0.0.1@{port}\n    rundir: {d}\n    udp-workers: 1\n    \
             tcp-workers: 1\n    background-workers: 1\n\
             database:\n    storage: {d}\n\
             policy:\n  - id: fast\n    algorithm: ecdsap256sha256\n    nsec3: off\n\
             template:\n  - id: default\n    storage: {d}\n    zonefile-sync: -1\n\
             zone:\n  - domain: cluster.local\n    file: {d}/cluster.local.zone\n\
             \x20 - domain: example.com\n    file: {d}/example.com.zone\n\
             \x20 - domain: 10.in-addr.arpa\n    file: {d}/10.in-addr.arpa.zone\n\
             \x20 - domain: secure.example\n    file: {d}/secure.example.zone\n    \
             dnssec-signing: on\n    dnssec-policy: fast\n"
        );
        std::fs::write(p.join("knot.conf"), conf).unwrap();
        let mut c = Command::new("knotd");
        c.arg("-c").arg(p.join("knot.conf"));
        c
    };
    // Up, and the signed zone signed (its answers carry RRSIGs).
    start_server(conf, "www.secure.example.", |m| {
        m.answers
            .iter()
            .any(|r| r.record_type() == RecordType::RRSIG)
    })
}

/// unbound as a forwarding cache in front of `knot`, without validation (no trust anchor).
fn unbound(knot: &Server) -> Server {
    let kp = knot.addr.port();
    let conf = move |p: &std::path::Path, port: u16| {
        let conf = format!(
            "server:\n  interface: 127.0.0.1@{port}\n  port: {port}\n  do-ip6: no\n  \
             do-daemonize: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  \
             pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  \
             num-threads: 1\n  so-reuseport: no\n  outgoing-range: 64\n  \
             access-control: 127.0.0.0/8 allow\n  do-not-query-localhost: no\n  \
             module-config: \"iterator\"\n  qname-minimisation: no\n  minimal-responses: no\n  \
             prefetch: no\n  local-zone: \"10.in-addr.arpa.\" nodefault\n  \
             local-zone: \"local.\" nodefault\n\
             forward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.1@{kp}\n",
            d = p.display(),
        );
        std::fs::write(p.join("unbound.conf"), conf).unwrap();
        let mut c = Command::new("unbound");
        c.arg("-d").arg("-c").arg(p.join("unbound.conf"));
        c
    };
    start_server(conf, "ns.example.com.", |m| !m.answers.is_empty())
}

/// One way of asking: the variations a client's query comes in.
#[derive(Clone, Copy, Debug)]
struct Variation {
    tcp: bool,
    /// The EDNS buffer size, or no EDNS.
    edns: Option<u16>,
    dnssec_ok: bool,
    checking_disabled: bool,
    mixed_case: bool,
}

fn variations() -> Vec<Variation> {
    let mut v = Vec::new();
    for tcp in [false, true] {
        for (edns, dnssec_ok) in [
            (None, false),
            (Some(512), false),
            (Some(512), true),
            (Some(4096), false),
            (Some(4096), true),
        ] {
            for checking_disabled in [false, true] {
                for mixed_case in [false, true] {
                    v.push(Variation {
                        tcp,
                        edns,
                        dnssec_ok,
                        checking_disabled,
                        mixed_case,
                    });
                }
            }
        }
    }
    v
}

/// The questions: what a cluster's pods ask, and a signed zone's answers.
fn questions() -> Vec<(String, RecordType)> {
    let c = |n: &str| format!("{n}.cluster.local.");
    vec![
        (c("web.default.svc"), RecordType::A),
        (c("web.default.svc"), RecordType::AAAA),
        (c("_http._tcp.web.default.svc"), RecordType::SRV),
        (c("_pg._tcp.db.default.svc"), RecordType::SRV),
        (c("db.default.svc"), RecordType::A),
        (c("ext.default.svc"), RecordType::A),
        (c("alias.default.svc"), RecordType::A),
        ("20.0.96.10.in-addr.arpa.".into(), RecordType::PTR),
        (long_name(), RecordType::A),
        (c("big.default.svc"), RecordType::TXT),
        (c("missing.default.svc"), RecordType::A),
        (c("web.default.svc"), RecordType::MX),
        ("www.example.com.".into(), RecordType::A),
        ("www.secure.example.".into(), RecordType::A),
        ("secure.example.".into(), RecordType::DNSKEY),
        ("nothere.secure.example.".into(), RecordType::A),
        ("www.secure.example.".into(), RecordType::TXT),
    ]
}

/// Upper-cases every other letter: a resolver's 0x20 query.
fn mix_case(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

fn build(name: &str, qtype: RecordType, v: Variation) -> Message {
    let name = if v.mixed_case {
        mix_case(name)
    } else {
        name.to_string()
    };
    let mut m = Message::query();
    m.metadata.id = rand_id();
    m.metadata.recursion_desired = true;
    m.metadata.checking_disabled = v.checking_disabled;
    m.add_query(Query::query(Name::from_ascii(&name).unwrap(), qtype));
    if let Some(size) = v.edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        e.set_dnssec_ok(v.dnssec_ok);
        m.edns = Some(e);
    }
    m
}

fn exchange(server: SocketAddr, q: &Message, tcp: bool) -> Message {
    let wire = q.to_vec().unwrap();
    let raw = if tcp {
        let mut s = TcpStream::connect(server).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&wire);
        s.write_all(&framed).unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut b = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut b).unwrap();
        b
    } else {
        let r = udp_raw(server, &wire, Duration::from_secs(3));
        r.unwrap_or_else(|| panic!("no UDP answer from {server} to {:?}", q.queries))
    };
    let limit = match (tcp, q.edns.as_ref()) {
        (true, _) => usize::MAX,
        (false, None) => 512,
        (false, Some(e)) => e.max_payload().max(512) as usize,
    };
    assert!(raw.len() <= limit, "{server}: {} bytes over UDP", raw.len());
    let m = Message::from_vec(&raw).unwrap_or_else(|e| panic!("{server}: unparseable: {e}"));
    assert_eq!(m.metadata.id, q.metadata.id, "{server}: ID");
    capture(&wire, &raw);
    m
}

/// With NODEDNS_CONFORMANCE_CAPTURE=DIR, every query and reply exchanged is kept under DIR in
/// the fuzz targets' input formats (see fuzz/README.md: the corpus is seeded from these).
fn capture(query: &[u8], reply: &[u8]) {
    let Some(dir) = std::env::var_os("NODEDNS_CONFORMANCE_CAPTURE") else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let keep = |target: &str, bytes: &[u8]| {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(bytes);
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("{h:016x}")), bytes).unwrap();
    };
    keep("query", query);
    // The response target's input: flags (DO, CD, EDNS; the size choice) and age, then the reply.
    let mut r = vec![0b0000_1101, 3];
    r.extend_from_slice(reply);
    keep("response", &r);
    // A TCP stream: the query twice, cut into reads of 7 bytes.
    let mut t = vec![6u8];
    for _ in 0..2 {
        t.extend_from_slice(&(query.len() as u16).to_be_bytes());
        t.extend_from_slice(query);
    }
    keep("tcp_frame", &t);
}

/// A record without its TTL, in a form that sorts and compares (names case-insensitively).
fn key(r: &Record) -> String {
    let data = match &r.data {
        RData::Update0(_) => String::new(),
        d => d.to_string().to_ascii_lowercase(),
    };
    format!(
        "{} {} {:?} {}",
        r.name.to_lowercase().to_ascii(),
        r.record_type(),
        r.dns_class,
        data
    )
}

fn rrs(rs: &[Record]) -> BTreeMap<String, u32> {
    let mut m = BTreeMap::new();
    for r in rs.iter().filter(|r| r.record_type() != RecordType::OPT) {
        m.insert(key(r), r.ttl);
    }
    m
}

fn in_cluster_zone(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.ends_with("cluster.local.") || n.ends_with("in-addr.arpa.") || n.ends_with("ip6.arpa.")
}

/// The lifetime nodedns caches `auth` (the authority's answer) for: the caching rules with the
/// default caps (see [`INTENDED`]).
fn lifetime(auth: &Message, qname: &str) -> u32 {
    let cluster = in_cluster_zone(qname);
    let positive = auth.metadata.response_code == ResponseCode::NoError && !auth.answers.is_empty();
    let cap = match (positive, cluster) {
        (true, _) => 30,
        (false, true) => 5,
        (false, false) => 30,
    };
    let floor = 5u32.min(cap);
    let base = if positive {
        auth.all_sections()
            .filter(|r| r.record_type() != RecordType::OPT)
            .map(|r| r.ttl)
            .min()
            .unwrap()
    } else {
        let soa = auth
            .authorities
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(s) => Some(r.ttl.min(s.minimum)),
                _ => None,
            })
            .expect("a negative answer with its SOA");
        soa
    };
    base.clamp(floor, cap)
}

/// What `ours` differs in from `theirs` in `section`, TTLs checked by `ttl_ok(theirs, ours)`.
fn diff_section(
    section: &str,
    theirs: &[Record],
    ours: &[Record],
    ttl_ok: &dyn Fn(u32, u32) -> bool,
    out: &mut Vec<String>,
) {
    let (t, o) = (rrs(theirs), rrs(ours));
    for k in t.keys().filter(|k| !o.contains_key(*k)) {
        out.push(format!("{section}: missing {k}"));
    }
    for k in o.keys().filter(|k| !t.contains_key(*k)) {
        out.push(format!("{section}: extra {k}"));
    }
    for (k, &ours_ttl) in o.iter() {
        if let Some(&their_ttl) = t.get(k) {
            if !ttl_ok(their_ttl, ours_ttl) {
                out.push(format!("{section}: TTL {ours_ttl} vs {their_ttl}: {k}"));
            }
        }
    }
}

/// Differences of nodedns's reply `ours` from the authority's `auth`, beyond the intended ones;
/// `age` bounds how long the answer may have been cached.
/// `full_len` is the size of the authority's whole answer (over TCP).
fn diff_authority(
    q: &Message,
    auth: &Message,
    ours: &Message,
    age: u32,
    tcp: bool,
    full_len: usize,
) -> Vec<String> {
    let mut d = Vec::new();
    let (a, o) = (&auth.metadata, &ours.metadata);
    if a.response_code != o.response_code {
        d.push(format!(
            "rcode {:?} vs {:?}",
            o.response_code, a.response_code
        ));
    }
    if o.authoritative {
        d.push("AA=1 from a cache".into());
    }
    if !o.recursion_available {
        d.push("RA=0".into());
    }
    if o.recursion_desired != q.metadata.recursion_desired {
        d.push("RD not echoed".into());
    }
    if o.checking_disabled != q.metadata.checking_disabled {
        d.push("CD not echoed".into());
    }
    if o.authentic_data != a.authentic_data {
        d.push(format!("AD {} vs {}", o.authentic_data, a.authentic_data));
    }
    if o.truncation != a.truncation {
        d.push(format!("TC {} vs {}", o.truncation, a.truncation));
    }
    // The question exactly as asked, case included (0x20).
    let asked = q.queries[0].name().to_ascii();
    if ours.queries.len() != 1 || ours.queries[0].name().to_ascii() != asked {
        d.push(format!("question {:?} vs {asked}", ours.queries));
    }
    match (&q.edns, &ours.edns) {
        (Some(qe), Some(oe)) => {
            if oe.flags().dnssec_ok != qe.flags().dnssec_ok {
                d.push("DO not echoed".into());
            }
        }
        (None, None) => {}
        (qe, oe) => d.push(format!(
            "OPT {} in the reply to a query with {}",
            oe.is_some(),
            qe.is_some()
        )),
    }
    if a.truncation && o.truncation {
        return d;
    }
    let qname = q.queries[0].name().to_ascii();
    let life = lifetime(auth, &qname);
    let ttl_ok = |theirs: u32, ours: u32| {
        // Capped at the lifetime, floored at min_ttl, then aged.
        let full = theirs.min(life).max(life.min(5));
        ours <= full && ours + age + 1 >= full
    };
    diff_section("answer", &auth.answers, &ours.answers, &ttl_ok, &mut d);
    diff_section(
        "authority",
        &auth.authorities,
        &ours.authorities,
        &ttl_ok,
        &mut d,
    );
    let limit = match &q.edns {
        Some(e) => (e.max_payload() as usize).clamp(512, NODEDNS_UDP_SIZE),
        None => 512,
    };
    let cut = !tcp && full_len > limit && ours.additionals.is_empty();
    let mut extra = Vec::new();
    diff_section(
        "additional",
        &auth.additionals,
        &ours.additionals,
        &ttl_ok,
        &mut extra,
    );
    d.extend(
        extra
            .into_iter()
            .filter(|e| !(cut && e.starts_with("additional: missing"))),
    );
    d
}

/// Differences of nodedns's reply from unbound's (the sections unbound builds from its own cache
/// and the CNAMEs it chases aside, see [`INTENDED`]).
fn diff_unbound(ub: &Message, ours: &Message, tcp: bool) -> Vec<String> {
    let mut d = Vec::new();
    let (u, o) = (&ub.metadata, &ours.metadata);
    if u.response_code != o.response_code {
        d.push(format!(
            "rcode {:?} vs unbound's {:?}",
            o.response_code, u.response_code
        ));
    }
    let capped =
        o.truncation && !u.truncation && !tcp && ub.to_vec().unwrap().len() > NODEDNS_UDP_SIZE;
    for (what, a, b) in [
        ("AA", o.authoritative, u.authoritative),
        ("RA", o.recursion_available, u.recursion_available),
        ("CD", o.checking_disabled, u.checking_disabled),
        ("TC", o.truncation && !capped, u.truncation),
    ] {
        if a != b {
            d.push(format!("{what} {a} vs unbound's {b}"));
        }
    }
    if o.truncation || u.truncation {
        return d;
    }
    let chased = ours
        .answers
        .iter()
        .any(|r| matches!(&r.data, RData::CNAME(c) if !in_cluster_zone(&c.0.to_ascii())));
    let (ua, oa) = (rrs(&ub.answers), rrs(&ours.answers));
    for k in oa.keys().filter(|k| !ua.contains_key(*k)) {
        d.push(format!("answer: {k} not in unbound's"));
    }
    if !chased {
        for k in ua.keys().filter(|k| !oa.contains_key(*k)) {
            d.push(format!("answer: unbound has {k}"));
        }
    }
    d
}

fn nodedns_for(knot: &Server) -> Nodedns {
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
fn nodedns_answers_as_the_authority_and_unbound_do() {
    if !require(&["knotd", "unbound"], false) {
        return;
    }
    let knot = knot();
    let unbound = unbound(&knot);
    let mut report = String::new();
    let mut queries = 0usize;
    let mut differences = 0usize;
    for v in variations() {
        // A fresh cache for each variation, so each one has its miss and its hit.
        let nd = nodedns_for(&knot);
        for (name, qtype) in questions() {
            let q = build(&name, qtype, v);
            let auth = exchange(knot.addr, &q, v.tcp);
            let full_len = exchange(knot.addr, &q, true).to_vec().unwrap().len();
            let ub = exchange(unbound.addr, &q, v.tcp);
            let start = Instant::now();
            for pass in ["miss", "hit"] {
                let q = build(&name, qtype, v);
                let ours = exchange(nd.dns, &q, v.tcp);
                let age = start.elapsed().as_secs() as u32;
                queries += 1;
                let mut d = diff_authority(&q, &auth, &ours, age, v.tcp, full_len);
                d.extend(diff_unbound(&ub, &ours, v.tcp));
                if !d.is_empty() {
                    differences += d.len();
                    let _ = writeln!(report, "{name} {qtype} {v:?} {pass}:");
                    for line in d {
                        let _ = writeln!(report, "    {line}");
                    }
                }
            }
            queries += 3;
        }
    }
    eprintln!("conformance: {queries} queries, {differences} unexpected differences; intended:");
    for (what, why) in INTENDED {
        eprintln!("  {what}: {why}");
    }
    assert!(
        report.is_empty(),
        "{differences} differences beyond the intended ones:\n{report}"
    );
}
