//! knotd (Debian's authoritative server) on a loopback port, serving zones a test writes: the
//! real upstream stand-in for tests that need one (`Knot::start(&[("example.com", "...")])`).

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// knotd serving the given zones on 127.0.0.1, stopped on drop.
pub struct Knot {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Knot {
    /// Starts knotd with each `(zone, records)`: the records are zone-file text after a
    /// generated `$TTL 300`, SOA and NS. Waits until it answers the first zone's SOA over UDP and
    /// accepts TCP connections; a port another process took meanwhile (for UDP or TCP) means
    /// another try on another port.
    pub fn start(zones: &[(&str, &str)]) -> Knot {
        for _ in 0..5 {
            if let Some(k) = Self::try_start(zones) {
                return k;
            }
        }
        panic!("knotd did not come up on five ports");
    }

    /// One try on a port free for both UDP and TCP when it was picked.
    fn try_start(zones: &[(&str, &str)]) -> Option<Knot> {
        let dir = tempfile::tempdir().unwrap();
        let port = loop {
            let u = UdpSocket::bind("127.0.0.1:0").unwrap();
            let port = u.local_addr().unwrap().port();
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                break port;
            }
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let d = dir.path().display();
        let mut conf = format!(
            "server:\n    listen: 127.0.0.1@{port}\n    rundir: {d}\n    udp-workers: 1\n    \
             tcp-workers: 1\ndatabase:\n    storage: {d}\nzone:\n"
        );
        for (zone, records) in zones {
            std::fs::write(
                dir.path().join(format!("{zone}.zone")),
                format!(
                    "$ORIGIN {zone}.\n$TTL 300\n@ SOA ns.{zone}. host.{zone}. 1 3600 600 86400 \
                     60\n@ NS ns\nns A 127.0.0.1\n{records}\n"
                ),
            )
            .unwrap();
            conf.push_str(&format!("  - domain: {zone}\n    file: {d}/{zone}.zone\n"));
        }
        std::fs::write(dir.path().join("knot.conf"), conf).unwrap();
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
        while super::dig_short(k.addr, zones[0].0, "SOA").is_empty() {
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Up over UDP; over TCP too, or the port was taken for TCP before knotd bound it.
        let tcp_deadline = Instant::now() + Duration::from_secs(2);
        while TcpStream::connect_timeout(&k.addr, Duration::from_millis(200)).is_err() {
            if Instant::now() >= tcp_deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(k)
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
