//! Network-namespace harness: throw-away namespaces and running code inside them; the "node" /
//! "pod" / "upstream" cluster with the nodedns binary on the node lives in `cluster` (re-exported
//! here). Namespaces are named `nodedns-t-<pid>-<tag>` and deleted on drop, even when the test
//! fails; a tag may be used by one test only, across all integration modules (checked at
//! creation). No packet leaves them.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use nodedns::node::NodeManager;

pub fn require_all() -> bool {
    std::env::var("NODEDNS_REQUIRE_ALL").as_deref() == Ok("1")
}

/// Reports why a test cannot run; fails instead under NODEDNS_REQUIRE_ALL=1.
pub fn skip(reason: &str) {
    if require_all() {
        panic!("NODEDNS_REQUIRE_ALL=1, but this test would be skipped: {reason}");
    }
    eprintln!("SKIP: {reason}");
}

pub fn have(bin: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(Into::into))
        .any(|d| d.join(bin).is_file())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a shell command inside the namespace `netns`; returns (success, stdout + stderr). For
/// threads that only borrow a namespace (a `Netns` deletes its namespace on drop).
pub fn sh_in(netns: &str, cmd: &str) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sh", "-c", cmd])
        .output()
        .expect("run ip netns exec");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Lines of `iptables-save`-style output that carry a nodedns comment.
pub fn rules_in(save_output: &str) -> Vec<String> {
    save_output
        .lines()
        .filter(|l| l.starts_with("-A") && l.contains("--comment \"nodedns"))
        .map(str::to_string)
        .collect()
}

/// A network namespace owned by the test; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates the namespace with `lo` up, or explains why it cannot.
    pub fn create(tag: &str) -> Result<Netns, String> {
        if !is_root() {
            return Err("needs root (network namespaces, netlink, iptables)".into());
        }
        if !have("ip") {
            return Err("needs the `ip` tool (iproute2)".into());
        }
        let name = format!("nodedns-t-{}-{tag}", std::process::id());
        // Tests of every module run in this one process: a tag used twice would make one test
        // delete (just below) or share another's namespace. Refuse it, whatever the timing.
        static USED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        {
            let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
            assert!(
                !used.contains(&name),
                "network namespace tag {tag:?} is used by another test: tags must be unique \
                 across all integration modules"
            );
            used.push(name.clone());
        }
        // A leftover from an earlier run with the same pid would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("running ip: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot create network namespace: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let ns = Netns { name };
        ns.sh_ok("ip link set lo up");
        Ok(ns)
    }

    /// Runs a shell command inside the namespace; returns (success, stdout + stderr).
    pub fn sh(&self, cmd: &str) -> (bool, String) {
        sh_in(&self.name, cmd)
    }

    pub fn sh_ok(&self, cmd: &str) -> String {
        let (ok, text) = self.sh(cmd);
        assert!(ok, "`{cmd}` failed in {}: {text}", self.name);
        text
    }

    pub fn call<T, F, Fut>(&self, mgr: &Arc<NodeManager>, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce(Arc<NodeManager>) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        call_in(&self.name, mgr, f)
    }

    pub fn setup_interface(&self, m: &Arc<NodeManager>) -> anyhow::Result<()> {
        self.call(m, |m| async move { m.setup_interface().await })
    }
    pub fn setup_rules(&self, m: &Arc<NodeManager>) -> anyhow::Result<()> {
        self.call(m, |m| async move { m.setup_rules().await })
    }
    pub fn sync(&self, m: &Arc<NodeManager>) -> anyhow::Result<()> {
        self.call(m, |m| async move { m.sync().await })
    }
    pub fn teardown(&self, m: &Arc<NodeManager>) -> anyhow::Result<()> {
        self.call(m, |m| async move { m.teardown().await })
    }

    /// Our rules as `<save-binary>` prints them (lines with a nodedns comment).
    pub fn our_rules(&self, save: &str) -> Vec<String> {
        let (ok, text) = self.sh(save);
        assert!(ok, "{save} failed: {text}");
        rules_in(&text)
    }

    pub fn lo_addrs(&self) -> String {
        self.sh_ok("ip -o addr show dev lo")
    }
}

/// Runs `f(mgr)` to completion on a fresh current-thread runtime in a thread that has joined
/// the namespace, so netlink sockets and child processes (iptables, nft) act inside it.
pub fn call_in<T, F, Fut>(netns: &str, mgr: &Arc<NodeManager>, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(Arc<NodeManager>) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let path = Path::new("/var/run/netns").join(netns);
    let mgr = Arc::clone(mgr);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns file");
        // SAFETY: file is an open namespace fd for the duration of the call; setns only
        // changes this thread's network namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(f(mgr))
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `f` in a thread that joined the namespace (sockets it opens live there).
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = Path::new("/var/run/netns").join(netns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns file");
        // SAFETY: as in call_in.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

pub use super::cluster::*;
