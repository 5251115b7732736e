//! knotd (Debian's authoritative server) on a loopback port, serving zones a test writes: the
//! real upstream stand-in for tests that need one (`Knot::start(&[("example.com", "...")])`).

use std::net::{SocketAddr, UdpSocket};
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
    /// generated `$TTL 300`, SOA and NS. Waits until it answers the first zone's SOA.
    pub fn start(zones: &[(&str, &str)]) -> Knot {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
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
