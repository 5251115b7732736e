//! nodedns inside the test process: the library's serving entry point (`server::run`) on loopback
//! sockets bound here, with a manual clock. A test that waits for a TTL to run down or a window
//! to open or close advances the clock instead of sleeping, and the TTLs it sees are exact.
//!
//! The settings come from the same flags as the binary's, parsed, loaded and validated the same
//! way (never from this machine's resolv.conf: give loopback upstreams). What needs the real
//! process (signals, handover, node setup, reload by file, the admin endpoints) stays with
//! [`Nodedns`](super::Nodedns). Upstream timeouts run on real time under either clock.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nodedns::clock::Clock;
use nodedns::config::{self, Args, Environment};
use nodedns::metrics::Metrics;
use nodedns::server::{self, socket, Context};
use tokio_util::sync::CancellationToken;

/// A server running in this process until [`shutdown`](Inproc::shutdown) or drop.
pub struct Inproc {
    /// The address it answers DNS on (UDP and TCP).
    pub dns: SocketAddr,
    /// The clock its cache and policies read; [`advance`](Inproc::advance) moves it.
    pub clock: Clock,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    /// The shared runtime the server runs on (its UDP workers are threads of their own).
    rt: Option<tokio::runtime::Runtime>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Inproc {
    /// Starts a server with the binary's flags `args` (`--listen 127.0.0.1:0` when none is
    /// given; `--workers 2` unless set), on sockets bound here to free loopback ports.
    pub fn start(args: &[&str]) -> Inproc {
        let mut argv = vec!["nodedns"];
        if !args.contains(&"--listen") {
            argv.extend(["--listen", "127.0.0.1:0"]);
        }
        if !args.contains(&"--workers") {
            argv.extend(["--workers", "2"]);
        }
        argv.extend_from_slice(args);
        let args = Args::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let env = Environment {
            resolv_conf: PathBuf::from("/nonexistent"),
            kube_dns_upstream: None,
        };
        let settings = config::load(&args)
            .map_err(|e| e.to_string())
            .and_then(|f| f.validate(&env).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let bound = socket::bind_all(&settings.listen, settings.workers, None)
            .expect("bind loopback sockets");
        let dns = bound[0].addr;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("inproc-rt")
            .enable_all()
            .build()
            .expect("runtime");
        let clock = Clock::manual();
        let zones = settings.zones.iter().map(|z| z.name.clone()).collect();
        let ctx = {
            // Inside the runtime: refreshes and prefetches are spawned on it.
            let _in = rt.enter();
            Context::new(Arc::new(settings), Metrics::new(zones), clock.clone())
        };
        let shutdown = CancellationToken::new();
        let served = rt.spawn(server::run(ctx.clone(), bound, shutdown.clone()));
        Inproc {
            dns,
            clock,
            ctx,
            shutdown,
            rt: Some(rt),
            served: Some(served),
        }
    }

    /// Moves the server's clock forward by `d`: what it answers next is `d` older.
    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    /// The metrics as `/metrics` serves them (Prometheus text).
    pub fn metrics(&self) -> String {
        self.ctx.metrics.render()
    }

    /// The sum of every series of metric `name`.
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Stops the server and waits until it has stopped: workers ended, queries in flight
    /// answered (within `server.grace_period`), sockets closed.
    pub fn shutdown(mut self) {
        self.stop().expect("the server ran and stopped cleanly");
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let (Some(rt), Some(served)) = (self.rt.take(), self.served.take()) else {
            return Ok(());
        };
        let result = rt.block_on(served);
        // Refreshes and prefetches still running on the runtime end here.
        rt.shutdown_timeout(Duration::from_secs(1));
        result?
    }
}

impl Drop for Inproc {
    fn drop(&mut self) {
        let result = self.stop();
        if std::thread::panicking() {
            if let Err(e) = result {
                eprintln!("---- in-process nodedns ----\n{e:#}");
            }
        }
    }
}
