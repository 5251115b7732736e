//! Live reload with real parts: two knotd upstreams answering the same names differently, the
//! configuration switched between them by a file change, a ConfigMap-style symlink swap, SIGHUP
//! and SIGUSR1, while dnsperf sends a fixed load. Nothing may be lost, the cache must survive,
//! and an invalid configuration must leave the running one serving.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::knot::Knot;
use crate::common::*;

const A_ADDR: &str = "192.0.2.1";
const B_ADDR: &str = "198.51.100.2";
const LOAD_NAMES: usize = 100;

/// One zone, every name answering `addr`.
fn upstream(addr: &str) -> Knot {
    let mut records = format!("www A {addr}\n");
    for i in 0..8 {
        records.push_str(&format!("fresh{i} A {addr}\n"));
    }
    for i in 0..LOAD_NAMES {
        records.push_str(&format!("n{i} A {addr}\n"));
    }
    Knot::start(&[("example.com", &records)])
}

fn config(upstream: SocketAddr, extra: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:0\"]\nupstreams = [\"{upstream}\"]\ncluster_dns = [\"{upstream}\"]\n\
         metrics = \"127.0.0.1:0\"\nhealth = \"off\"\n{extra}"
    )
}

/// Replaces `path` the way editors and `kubectl cp` do: a new file renamed over the old one.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits until the log holds `n` lines containing `what`.
fn wait_log(nd: &Nodedns, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while nd.log().matches(what).count() < n {
        assert!(
            Instant::now() < deadline,
            "no {n}x {what:?} in the log:\n{}",
            nd.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scrape(nd: &Nodedns) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(nd.metrics.expect("metrics address")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// dnsperf at a fixed rate over the load names for `secs`, in the background.
struct Load {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Load {
    fn start(server: SocketAddr, secs: u32) -> Load {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("names");
        let mut names: String = (0..LOAD_NAMES)
            .map(|i| format!("n{i}.example.com A\n"))
            .collect();
        names.push_str("www.example.com A\n");
        std::fs::write(&file, names).unwrap();
        let child = Command::new("dnsperf")
            .args([
                "-s",
                &server.ip().to_string(),
                "-p",
                &server.port().to_string(),
            ])
            .arg("-d")
            .arg(&file)
            .args(["-Q", "500", "-l", &secs.to_string(), "-t", "2", "-q", "50"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run dnsperf");
        Load { child, _dir: dir }
    }

    /// (sent, lost) once dnsperf is done.
    fn finish(self) -> (u64, u64) {
        let out = self.child.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |name: &str| -> u64 {
            out.lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {name:?} in dnsperf output:\n{out}"))
        };
        (field("Queries sent:"), field("Queries lost:"))
    }
}

fn start(cfg: &Path) -> Nodedns {
    Nodedns::start(&["--config", cfg.to_str().unwrap()])
}

#[test]
fn a_file_change_and_sighup_switch_upstreams_under_load_keeping_the_cache() {
    require!(
        have_all(&["knotd", "dig", "dnsperf"]),
        "needs knotd, dig and dnsperf"
    );
    let (a, b) = (upstream(A_ADDR), upstream(B_ADDR));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nodedns.toml");
    std::fs::write(&cfg, config(a.addr, "")).unwrap();
    let nd = start(&cfg);
    // Cached from A before anything changes.
    assert_eq!(dig_short(nd.dns, "www.example.com", "A"), A_ADDR);

    let load = Load::start(nd.dns, 5);
    std::thread::sleep(Duration::from_millis(1000));
    // The file changes (renamed over): reloaded, new names go to B, the cache keeps A's answer.
    replace(&cfg, &config(b.addr, ""));
    wait_log(&nd, "configuration reloaded", 1);
    assert_eq!(dig_short(nd.dns, "fresh1.example.com", "A"), B_ADDR);
    assert_eq!(dig_short(nd.dns, "www.example.com", "A"), A_ADDR);

    // SIGHUP reads the file again (unchanged: the same routes, a new generation).
    std::thread::sleep(Duration::from_millis(500));
    nd.signal(libc::SIGHUP);
    wait_log(&nd, "configuration reloaded", 2);
    assert!(nd.log().contains("SIGHUP"), "{}", nd.log());
    // Back to A by another file change: names not cached yet go to A again.
    std::thread::sleep(Duration::from_millis(500));
    replace(&cfg, &config(a.addr, ""));
    wait_log(&nd, "configuration reloaded", 3);
    assert_eq!(dig_short(nd.dns, "fresh2.example.com", "A"), A_ADDR);
    assert_eq!(dig_short(nd.dns, "fresh1.example.com", "A"), B_ADDR);

    let (sent, lost) = load.finish();
    assert!(sent >= 1500, "dnsperf sent only {sent}");
    assert_eq!(lost, 0, "{lost} of {sent} queries lost across reloads");
    let m = scrape(&nd);
    assert_eq!(metric(&m, "nodedns_config_generation"), 3.0, "{m}");
    assert_eq!(metric(&m, "coredns_reload_failed_total"), 0.0);
}

#[test]
fn with_the_watch_off_only_signals_reload() {
    require!(have_all(&["knotd", "dig"]), "needs knotd and dig");
    let (a, b) = (upstream(A_ADDR), upstream(B_ADDR));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nodedns.toml");
    let off = "[reload]\nwatch = false\n";
    std::fs::write(&cfg, config(a.addr, off)).unwrap();
    let nd = start(&cfg);
    replace(&cfg, &config(b.addr, off));
    // The change alone does nothing (the watch is off): A still answers new names.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(dig_short(nd.dns, "fresh1.example.com", "A"), A_ADDR);
    assert!(!nd.log().contains("configuration reloaded"));
    // SIGUSR1 (node-cache's -reloadwithsignal) reloads.
    nd.signal(libc::SIGUSR1);
    wait_log(&nd, "configuration reloaded", 1);
    assert_eq!(dig_short(nd.dns, "fresh2.example.com", "A"), B_ADDR);
    // SIGHUP reloads too, and the process lives on.
    replace(&cfg, &config(a.addr, off));
    nd.signal(libc::SIGHUP);
    wait_log(&nd, "configuration reloaded", 2);
    assert_eq!(dig_short(nd.dns, "fresh3.example.com", "A"), A_ADDR);
}

#[test]
fn an_invalid_configuration_is_refused_and_the_running_one_keeps_serving() {
    require!(have_all(&["knotd", "dig"]), "needs knotd and dig");
    let (a, b) = (upstream(A_ADDR), upstream(B_ADDR));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nodedns.toml");
    std::fs::write(&cfg, config(a.addr, "")).unwrap();
    let nd = start(&cfg);

    // A bad value: refused, named by its key; the old upstream still answers.
    replace(
        &cfg,
        &config(b.addr, "").replace(&b.addr.to_string(), "not-an-address"),
    );
    wait_log(&nd, "configuration reload refused", 1);
    assert!(nd.log().contains("upstreams"), "{}", nd.log());
    assert_eq!(dig_short(nd.dns, "fresh1.example.com", "A"), A_ADDR);
    // A syntax error: refused, named by file and line.
    replace(&cfg, "listen = [\"127.0.0.1:0\"\nupstreams = 3\n");
    wait_log(&nd, "configuration reload refused", 2);
    assert!(
        nd.log().contains(cfg.to_str().unwrap()) && nd.log().contains("line 2"),
        "{}",
        nd.log()
    );
    assert_eq!(dig_short(nd.dns, "fresh2.example.com", "A"), A_ADDR);
    let m = scrape(&nd);
    assert_eq!(metric(&m, "coredns_reload_failed_total"), 2.0, "{m}");
    assert_eq!(metric(&m, "nodedns_config_generation"), 0.0);

    // A valid change that also moves the listener: the upstream changes now, the listener at
    // the next start (said in the log); DNS keeps being served where it was.
    let moved = config(b.addr, "").replace("127.0.0.1:0\"]", "127.0.0.1:0\", \"127.0.0.2:0\"]");
    replace(&cfg, &moved);
    wait_log(&nd, "configuration reloaded", 1);
    assert!(
        nd.log().contains("applies at the next start") && nd.log().contains("key=\"listen\""),
        "{}",
        nd.log()
    );
    assert_eq!(dig_short(nd.dns, "fresh3.example.com", "A"), B_ADDR);
}

/// kubelet updates a ConfigMap volume by writing a new timestamped directory and renaming the
/// `..data` symlink over the old one; the file the process reads is a symlink through `..data`.
#[test]
fn a_configmap_symlink_swap_reloads() {
    require!(have_all(&["knotd", "dig"]), "needs knotd and dig");
    let (a, b) = (upstream(A_ADDR), upstream(B_ADDR));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let publish = |version: &str, text: &str| -> PathBuf {
        let v = d.join(format!("..{version}"));
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("nodedns.toml"), text).unwrap();
        let tmp = d.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
        std::fs::rename(&tmp, d.join("..data")).unwrap();
        v
    };
    publish("2026_12_01_00_00_00.1", &config(a.addr, ""));
    let cfg = d.join("nodedns.toml");
    std::os::unix::fs::symlink("..data/nodedns.toml", &cfg).unwrap();
    let nd = start(&cfg);
    assert_eq!(dig_short(nd.dns, "fresh1.example.com", "A"), A_ADDR);
    publish("2026_12_01_00_01_00.2", &config(b.addr, ""));
    wait_log(&nd, "configuration reloaded", 1);
    assert_eq!(dig_short(nd.dns, "fresh2.example.com", "A"), B_ADDR);
    assert_eq!(
        dig_short(nd.dns, "fresh1.example.com", "A"),
        A_ADDR,
        "cache kept"
    );
}

fn have_all(tools: &[&str]) -> bool {
    tools.iter().all(|t| crate::common::netns::have(t))
}
