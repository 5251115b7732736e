//! What outlives one nodedns process on a node: the state directory (a hostPath), the lease that
//! tells an exiting instance whether another one still serves, the handover of listening sockets
//! and cache from a running instance to its successor, and the cache snapshot for restarts.
//!
//! - `node.lock`: held exclusively (briefly) by an instance while it sets the node up or decides
//!   whether to tear it down, so a start and an exit never interleave.
//! - `instances.lock`: every serving instance holds a shared lock on it for its lifetime. An
//!   exiting instance drops its own and tries an exclusive one without waiting: it gets it only if
//!   no other instance is alive, and only then removes the interface and rules. The kernel drops
//!   the locks of a killed process, so nothing has to be cleaned up after a crash.
//! - `handover.<id>.sock`: each instance's handover socket ([`handover`]), named by a random
//!   instance id: in Kubernetes every pod has its own PID namespace, so the old and the new
//!   instance may both be PID 1.
//! - `cache.snapshot`: the cache, written periodically and at shutdown.

pub mod fdpass;
pub mod handover;
pub mod warm;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const NODE_LOCK: &str = "node.lock";
const INSTANCES: &str = "instances.lock";
const SNAPSHOT: &str = "cache.snapshot";
const HANDOVER_PREFIX: &str = "handover.";
const HANDOVER_SUFFIX: &str = ".sock";

/// The node-wide state directory.
pub struct StateDir {
    path: PathBuf,
    /// This process's instance id (random), which names its handover socket.
    id: u64,
    /// This instance's shared lock on `instances.lock`, once it serves.
    lease: parking_lot::Mutex<Option<File>>,
}

/// The exclusive node lock; released on drop.
pub struct NodeLock {
    _file: File,
}

fn open_lock(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .open(path)
}

/// `flock(2)` without waiting; false when another holder conflicts.
fn try_flock(f: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

impl StateDir {
    /// Creates the directory (mode 0700) if needed.
    pub fn open(path: &Path) -> io::Result<StateDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(StateDir {
            path: path.to_owned(),
            id: rand::random(),
            lease: parking_lot::Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn snapshot_path(&self) -> PathBuf {
        self.path.join(SNAPSHOT)
    }

    /// Takes the node lock, waiting up to `timeout` for another instance's setup or teardown.
    pub async fn lock_node(&self, timeout: Duration) -> io::Result<NodeLock> {
        let file = open_lock(&self.path.join(NODE_LOCK))?;
        let deadline = Instant::now() + timeout;
        loop {
            if try_flock(&file, libc::LOCK_EX)? {
                return Ok(NodeLock { _file: file });
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} stayed locked for {timeout:?} by another nodedns",
                        self.path.join(NODE_LOCK).display()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Joins the instances serving this node (a shared lock held until [`Self::leave`]).
    pub fn join(&self, _node: &NodeLock) -> io::Result<()> {
        let f = open_lock(&self.path.join(INSTANCES))?;
        if !try_flock(&f, libc::LOCK_SH)? {
            // Only an exclusive holder conflicts, and one holds it only under the node lock.
            return Err(io::Error::other("instances lock held exclusively"));
        }
        *self.lease.lock() = Some(f);
        Ok(())
    }

    /// Leaves the instances serving this node; true when no other instance is alive (this was
    /// the last one, so the node's interface and rules are ours to remove).
    pub fn leave(&self, _node: &NodeLock) -> io::Result<bool> {
        drop(self.lease.lock().take());
        self.others_alive(_node).map(|alive| !alive)
    }

    /// True when another instance holds the lease (this one does not hold it).
    pub fn others_alive(&self, _node: &NodeLock) -> io::Result<bool> {
        let f = open_lock(&self.path.join(INSTANCES))?;
        // Dropping `f` releases the exclusive lock at once if we got it.
        Ok(!try_flock(&f, libc::LOCK_EX)?)
    }

    /// This instance's handover socket path.
    pub fn handover_socket(&self) -> PathBuf {
        self.path.join(format!(
            "{HANDOVER_PREFIX}{:016x}{HANDOVER_SUFFIX}",
            self.id
        ))
    }

    /// Handover sockets of other processes, newest first.
    pub fn handover_candidates(&self) -> Vec<PathBuf> {
        let own = self.handover_socket();
        let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&self.path)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with(HANDOVER_PREFIX) && n.ends_with(HANDOVER_SUFFIX)
            })
            .map(|e| e.path())
            .filter(|p| *p != own)
            .map(|p| {
                let t = std::fs::symlink_metadata(&p)
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (t, p)
            })
            .collect();
        found.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        found.into_iter().map(|(_, p)| p).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_last_instance_to_leave_is_told_so() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateDir::open(dir.path()).unwrap();
        let b = StateDir::open(dir.path()).unwrap();
        let lock = a.lock_node(Duration::from_secs(1)).await.unwrap();
        a.join(&lock).unwrap();
        drop(lock);
        let lock = b.lock_node(Duration::from_secs(1)).await.unwrap();
        assert!(b.others_alive(&lock).unwrap(), "a holds the lease");
        b.join(&lock).unwrap();
        drop(lock);
        // a leaves first: b still serves.
        let lock = a.lock_node(Duration::from_secs(1)).await.unwrap();
        assert!(!a.leave(&lock).unwrap());
        drop(lock);
        // b is the last one.
        let lock = b.lock_node(Duration::from_secs(1)).await.unwrap();
        assert!(b.leave(&lock).unwrap());
        // Two instances never share a handover socket path, whatever their PIDs.
        assert_ne!(a.handover_socket(), b.handover_socket());
        assert_eq!(b.handover_candidates(), Vec::<PathBuf>::new());
    }

    #[tokio::test]
    async fn the_node_lock_excludes_a_second_holder_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let a = StateDir::open(dir.path()).unwrap();
        let b = StateDir::open(dir.path()).unwrap();
        let held = a.lock_node(Duration::from_secs(1)).await.unwrap();
        let err = b
            .lock_node(Duration::from_millis(100))
            .await
            .err()
            .expect("second holder refused while the first holds it");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("node.lock"), "{err}");
        drop(held);
        b.lock_node(Duration::from_millis(100)).await.unwrap();
    }

    #[test]
    fn a_killed_holder_leaves_no_lease() {
        // The lease is a lock on an open file: a child that takes it and is killed releases it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(INSTANCES);
        // The shell takes the lock on fd 9 and becomes `sleep`, which keeps it: the killed
        // process is the only holder.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec 9>>'{}' && flock -s 9 && exec sleep 30",
                path.display()
            ))
            .spawn()
            .expect("sh and flock(1) from util-linux");
        let s = StateDir::open(dir.path()).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        rt.block_on(async {
            let lock = s.lock_node(Duration::from_secs(1)).await.unwrap();
            while !s.others_alive(&lock).unwrap() {
                assert!(
                    Instant::now() < deadline,
                    "flock child never took the lease"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        child.kill().unwrap();
        child.wait().unwrap();
        rt.block_on(async {
            let lock = s.lock_node(Duration::from_secs(1)).await.unwrap();
            assert!(!s.others_alive(&lock).unwrap());
        });
    }
}
