//! Test harness shared by the integration tests: run the real `nodedns` binary on loopback, or
//! the server in this process with a manual clock (`inproc`, for tests that let TTLs and windows
//! pass), scriptable fake upstreams that record the transport each query came on, DNS clients built on
//! hickory-proto, and tool checks that honour `NODEDNS_REQUIRE_ALL`.
#![allow(dead_code)]

/// `require!(cond, "reason")`: skip (or fail under NODEDNS_REQUIRE_ALL=1) unless cond holds.
macro_rules! require {
    ($cond:expr, $($reason:tt)+) => {
        if !$cond {
            $crate::common::netns::skip(&format!($($reason)+));
            return;
        }
    };
}

/// `netns!("tag")`: a throw-away network namespace, or skip the test.
macro_rules! netns {
    ($tag:expr) => {
        match $crate::common::netns::Netns::create($tag) {
            Ok(ns) => ns,
            Err(reason) => {
                $crate::common::netns::skip(&reason);
                return;
            }
        }
    };
}

/// `cluster!("tag")`: node, pod and upstream namespaces wired together, or skip the test.
macro_rules! cluster {
    ($tag:expr) => {
        match $crate::common::netns::Cluster::create($tag) {
            Ok(c) => c,
            Err(reason) => {
                $crate::common::netns::skip(&reason);
                return;
            }
        }
    };
}

/// A dual-stack [`Cluster`](netns::Cluster), or skip.
macro_rules! cluster_dual {
    ($tag:expr) => {
        match $crate::common::netns::Cluster::create_dual($tag) {
            Ok(c) => c,
            Err(reason) => {
                $crate::common::netns::skip(&reason);
                return;
            }
        }
    };
}

pub mod cluster;
pub mod inproc;
pub mod knot;
pub mod netns;

pub use inproc::Inproc;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// A fresh state directory on tmpfs when the machine has one, as `/run/nodedns` is on a node
/// (a snapshot's fsync on a busy disk can take seconds).
pub fn state_dir() -> tempfile::TempDir {
    match std::path::Path::new("/dev/shm") {
        p if p.is_dir() => tempfile::tempdir_in(p).unwrap_or_else(|_| tempfile::tempdir().unwrap()),
        _ => tempfile::tempdir().unwrap(),
    }
}

/// A running `nodedns` child process. Killed on drop; its log is printed if the test failed.
pub struct Nodedns {
    pub child: Child,
    pub dns: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
    log: Arc<Mutex<String>>,
    /// The state directory this instance was given, unless the test named one.
    pub state: Option<tempfile::TempDir>,
}

/// The socket address that follows `marker` in a log line (up to a space, '/' or '"').
pub fn find_addr(line: &str, marker: &str) -> Option<SocketAddr> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '/' || c == '"')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl Nodedns {
    /// Starts nodedns with `args` (add `--listen 127.0.0.1:0` and loopback upstreams yourself)
    /// and waits until it logs that it serves.
    pub fn start(args: &[&str]) -> Nodedns {
        Self::start_env(args, &[])
    }

    pub fn start_env(args: &[&str], env: &[(&str, &str)]) -> Nodedns {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nodedns"));
        // Each instance gets a state directory of its own, so concurrent tests never find each
        // other's lease or handover socket.
        let state = (!args.contains(&"--state-dir")).then(state_dir);
        if let Some(dir) = &state {
            cmd.arg("--state-dir").arg(dir.path());
        }
        cmd.args(args)
            .env("RUST_LOG", "info")
            .env_remove("KUBE_DNS_UPSTREAM_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn nodedns");
        let (log, rx) = capture_stderr(&mut child);
        let (mut dns, mut metrics, mut health) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    dns = dns.or(find_addr(&line, "listening for UDP on "));
                    metrics = metrics.or(find_addr(&line, "serving metrics and health on http://"));
                    health = health.or(find_addr(&line, "serving metrics and health on http://"));
                    metrics = metrics.or(find_addr(&line, "serving metrics on http://"));
                    health = health.or(find_addr(&line, "serving health on http://"));
                    if line.contains(" serving") && line.contains("nodedns ") {
                        break;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("nodedns did not start:\n{}", log.lock().unwrap());
                }
            }
        }
        Nodedns {
            child,
            dns: dns.expect("listen address logged"),
            metrics,
            health,
            log,
            state,
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: i32) {
        crate::common::signal_child(&self.child, sig);
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        crate::common::wait_child(&mut self.child, timeout)
    }
}

impl Drop for Nodedns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- nodedns log ----\n{}", self.log());
        }
    }
}

/// What a fake upstream does with a query.
pub enum Action {
    Answer(Message),
    /// Answer, then close the TCP connection (over UDP: just answer), as CoreDNS does when it
    /// closes an idle connection right after a reply.
    AnswerThenClose(Message),
    /// Never answer.
    Silence,
    /// Close the TCP connection without answering (over UDP: no answer), as a server that
    /// restarts or drops a connection does.
    Close,
}

/// How a query reached a fake upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Udp,
    Tcp,
}

type Handler = dyn Fn(&Message, Via) -> Action + Send + Sync;

/// An in-process upstream on 127.0.0.1 (UDP and TCP on one port), answering through a script and
/// recording every query's name, type and transport.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<(String, RecordType, Via)>>>,
    stop: Arc<AtomicBool>,
}

impl FakeUpstream {
    pub fn start(handler: impl Fn(&Message, Via) -> Action + Send + Sync + 'static) -> Self {
        Self::start_on("127.0.0.1:0", handler)
    }

    pub fn start_on(
        bind: &str,
        handler: impl Fn(&Message, Via) -> Action + Send + Sync + 'static,
    ) -> Self {
        // With port 0 the kernel's free UDP port may be taken for TCP: pick again.
        let (udp, addr, tcp) = (0..20)
            .find_map(|_| {
                let udp = UdpSocket::bind(bind).unwrap();
                let addr = udp.local_addr().unwrap();
                TcpListener::bind(addr).ok().map(|tcp| (udp, addr, tcp))
            })
            .expect("a port free for both UDP and TCP");
        udp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let handler: Arc<Handler> = Arc::new(handler);
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (h, log, stop) = (handler.clone(), log.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 65535];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, src)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    let Ok(m) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    record(&log, &m, Via::Udp);
                    if let Action::Answer(r) | Action::AnswerThenClose(r) = h(&m, Via::Udp) {
                        let _ = udp.send_to(&r.to_vec().unwrap(), src);
                    }
                }
            });
        }
        {
            let (h, log, stop) = (handler, log.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let (h, log, stop) = (h.clone(), log.clone(), stop.clone());
                    std::thread::spawn(move || {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_millis(100)))
                            .unwrap();
                        while !stop.load(Ordering::Relaxed) {
                            let mut len = [0u8; 2];
                            match s.read_exact(&mut len) {
                                Ok(()) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                                Err(_) => return,
                            }
                            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                            s.set_read_timeout(None).unwrap();
                            if s.read_exact(&mut q).is_err() {
                                return;
                            }
                            s.set_read_timeout(Some(Duration::from_millis(100)))
                                .unwrap();
                            let Ok(m) = Message::from_vec(&q) else { return };
                            record(&log, &m, Via::Tcp);
                            let (r, close) = match h(&m, Via::Tcp) {
                                Action::Answer(r) => (r, false),
                                Action::AnswerThenClose(r) => (r, true),
                                Action::Silence => continue,
                                Action::Close => return,
                            };
                            let w = r.to_vec().unwrap();
                            let mut framed = (w.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&w);
                            if s.write_all(&framed).is_err() || close {
                                return;
                            }
                        }
                    });
                }
            });
        }
        FakeUpstream { addr, log, stop }
    }

    /// Queries received so far: (lowercased name without the final dot, type, transport).
    /// Leaves out nodedns's readiness probe (`. NS`); see `probes`.
    pub fn queries(&self) -> Vec<(String, RecordType, Via)> {
        let mut v = self.log.lock().unwrap().clone();
        v.retain(|(n, t, _)| !(n.is_empty() && *t == RecordType::NS));
        v
    }

    /// Readiness probes (`. NS`) received.
    pub fn probes(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, t, _)| n.is_empty() && *t == RecordType::NS)
            .count()
    }

    pub fn count(&self, name: &str) -> usize {
        self.queries().iter().filter(|(n, _, _)| n == name).count()
    }

    pub fn arg(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn record(log: &Mutex<Vec<(String, RecordType, Via)>>, m: &Message, via: Via) {
    if let Some(q) = m.queries.first() {
        let name = q.name().to_ascii().to_lowercase();
        log.lock()
            .unwrap()
            .push((name.trim_end_matches('.').to_string(), q.query_type(), via));
    }
}

/// A reply to `req` with the given rcode and no records.
pub fn reply(req: &Message, rcode: ResponseCode) -> Message {
    let mut m = Message::response(req.metadata.id, OpCode::Query);
    m.metadata.message_type = MessageType::Response;
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.response_code = rcode;
    m.add_queries(req.queries.clone());
    if req.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.edns = Some(e);
    }
    m
}

/// A reply with one A record per address, all with `ttl`.
pub fn a_reply(req: &Message, ttl: u32, addrs: &[[u8; 4]]) -> Message {
    let mut m = reply(req, ResponseCode::NoError);
    let name = req.queries[0].name().clone();
    for a in addrs {
        m.add_answer(Record::from_rdata(
            name.clone(),
            ttl,
            RData::A(A::new(a[0], a[1], a[2], a[3])),
        ));
    }
    m
}

/// A TXT reply of about `size` bytes.
pub fn txt_reply(req: &Message, ttl: u32, size: usize) -> Message {
    let mut m = reply(req, ResponseCode::NoError);
    let name = req.queries[0].name().clone();
    let chunks: Vec<String> = (0..size / 200 + 1)
        .map(|i| format!("{:0>199}", i))
        .collect();
    m.add_answer(Record::from_rdata(name, ttl, RData::TXT(TXT::new(chunks))));
    m
}

/// A negative reply (NXDOMAIN or NODATA) with an SOA in authority, or without when `soa` is None.
pub fn negative_reply(req: &Message, rcode: ResponseCode, soa: Option<(u32, u32)>) -> Message {
    let mut m = reply(req, rcode);
    if let Some((ttl, minimum)) = soa {
        let zone = Name::from_ascii("example.").unwrap();
        let soa = SOA::new(
            Name::from_ascii("ns.example.").unwrap(),
            Name::from_ascii("host.example.").unwrap(),
            1,
            3600,
            600,
            86400,
            minimum,
        );
        m.add_authority(Record::from_rdata(zone, ttl, RData::SOA(soa)));
    }
    m
}

/// Builds a query message.
pub fn query_msg(name: &str, qtype: RecordType, id: u16, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.edns = Some(e);
    }
    m
}

/// Sends raw bytes over UDP and returns the raw reply (None on timeout).
pub fn udp_raw(server: SocketAddr, pkt: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let s = UdpSocket::bind(if server.is_ipv4() {
        "127.0.0.1:0"
    } else {
        "[::1]:0"
    })
    .unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.send_to(pkt, server).unwrap();
    let mut buf = vec![0u8; 65535];
    let n = s.recv(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

/// One UDP query; panics on timeout (3 s).
pub fn udp_query(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let q = query_msg(name, qtype, rand_id(), Some(1232));
    let r =
        udp_raw(server, &q.to_vec().unwrap(), Duration::from_secs(5)).expect("answer within 5 s");
    Message::from_vec(&r).expect("parseable answer")
}

/// Sends all `msgs` on one TCP connection before reading, then reads one answer per query.
pub fn tcp_pipeline(server: SocketAddr, msgs: &[Message]) -> Vec<Message> {
    let mut s = TcpStream::connect(server).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = Vec::new();
    for m in msgs {
        let w = m.to_vec().unwrap();
        all.extend_from_slice(&(w.len() as u16).to_be_bytes());
        all.extend_from_slice(&w);
    }
    s.write_all(&all).unwrap();
    (0..msgs.len())
        .map(|_| {
            let mut len = [0u8; 2];
            s.read_exact(&mut len).unwrap();
            let mut b = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut b).unwrap();
            Message::from_vec(&b).unwrap()
        })
        .collect()
}

pub fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u16
}

/// TTL of the first answer record.
pub fn first_ttl(m: &Message) -> u32 {
    m.answers[0].ttl
}

/// True when `tool` is on PATH (and we are root when `root` is set). Otherwise prints why the
/// test is skipped, or panics under NODEDNS_REQUIRE_ALL=1, where no test may skip.
pub fn require(tools: &[&str], root: bool) -> bool {
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| {
            !std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
                .unwrap_or(false)
        })
        .map(|t| t.to_string())
        .collect();
    // SAFETY: geteuid has no preconditions.
    if root && unsafe { libc::geteuid() } != 0 {
        missing.push("root".into());
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("SKIP: needs {}", missing.join(", "));
    if std::env::var("NODEDNS_REQUIRE_ALL").as_deref() == Ok("1") {
        panic!("{msg} (NODEDNS_REQUIRE_ALL=1 forbids skipping)");
    }
    eprintln!("{msg}");
    false
}

/// `dig @server NAME TYPE +short` (one try, 1 s): the answer's data lines, trimmed.
pub fn dig_short(server: SocketAddr, name: &str, qtype: &str) -> String {
    let out = std::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), name, qtype])
        .args(["+short", "+time=1", "+tries=1"])
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Reads a child's piped stderr on a thread: every line goes into the returned log and down the
/// channel (for a launcher waiting on the lines that say the child is up).
pub fn capture_stderr(child: &mut Child) -> (Arc<Mutex<String>>, mpsc::Receiver<String>) {
    let stderr = child.stderr.take().expect("stderr piped");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = log2.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
            drop(l);
            let _ = tx.send(line);
        }
    });
    (log, rx)
}

/// Sends `sig` to a child process this test started.
pub fn signal_child(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's PID.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Waits up to `timeout` for a child process to exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
