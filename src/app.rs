//! Startup and shutdown, in the order that keeps a node's DNS working:
//!
//! 1. interface and addresses (when asked), so the listen IPs exist;
//! 2. bind every listener (UDP per worker, TCP), start the workers and the admin endpoints;
//! 3. check that each listener answers, then install the firewall rules: a broken start never
//!    blackholes the node's DNS;
//! 4. on SIGTERM: /ready turns 503, DNS keeps answering for the lameduck period, then the rules
//!    are removed before the interface (while still answering), then listeners stop and in-flight
//!    queries get `server.grace_period` to finish.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{self, Readiness};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::node::{NodeManager, SetupErrorSink};
use crate::server::{self, socket, Context};

impl SetupErrorSink for Metrics {
    fn setup_error(&self, errortype: &'static str) {
        self.setup_errors.with_label_values(&[errortype]).inc();
    }
}

/// How often expired cache entries are swept out.
const PURGE_EVERY: Duration = Duration::from_secs(10);

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = int.recv() => info!("SIGINT received, shutting down"),
    }
}

/// Runs nodedns until `shutdown` resolves, then drains and tears down.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    for w in &settings.warnings {
        warn!("{w}");
    }
    let settings = Arc::new(settings);
    let metrics = Metrics::new(
        settings.zones.iter().map(|z| z.name.clone()).collect(),
        settings.query_log,
    );
    crate::metrics::install_panic_hook();
    let ready = Arc::new(Readiness::default());
    let node = Arc::new(NodeManager::new(settings.node.clone(), metrics.clone()));
    node.setup_interface()
        .await
        .context("interface setup failed")?;

    let bound = socket::bind_all(&settings.listen, settings.workers)?;
    let ctx = Context::new(settings.clone(), metrics.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let cancel = CancellationToken::new();
    let admin_cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let rt = tokio::runtime::Handle::current();
    let mut threads = Vec::new();
    let mut served = Vec::new();
    for b in bound {
        let label = format!("dns://{}", b.addr);
        for (i, sock) in b.udp.into_iter().enumerate() {
            let stats = metrics.new_udp_worker_for(label.clone());
            threads.push(
                server::udp::spawn_worker(
                    format!("nodedns-udp-{i}"),
                    sock,
                    settings.udp_batch,
                    ctx.clone(),
                    rt.clone(),
                    tracker.clone(),
                    stop.clone(),
                    stats,
                )
                .context("cannot start UDP worker")?,
            );
        }
        info!(addr = %b.addr, workers = settings.workers, "listening for UDP on {}", b.addr);
        let listener = tokio::net::TcpListener::from_std(b.tcp)?;
        let stats = metrics.new_worker_for(label);
        tokio::spawn(server::tcp::serve(
            listener,
            ctx.clone(),
            stats,
            tracker.clone(),
            cancel.clone(),
        ));
        info!(addr = %b.addr, "listening for TCP on {}", b.addr);
        served.push(b.addr);
    }
    // Admin endpoints: metrics and health may share one address (a fixed port).
    let endpoints: Vec<(SocketAddr, bool, bool)> = match (settings.metrics, settings.health) {
        (Some(m), Some(h)) if m == h && m.port() != 0 => vec![(m, true, true)],
        (m, h) => m
            .map(|m| (m, true, false))
            .into_iter()
            .chain(h.map(|h| (h, false, true)))
            .collect(),
    };
    for (addr, with_metrics, with_health) in endpoints {
        let a = admin::spawn(
            addr,
            with_metrics,
            with_health,
            metrics.clone(),
            ready.clone(),
            admin_cancel.clone(),
        )
        .await?;
        // Tests and operators read these lines for the bound addresses.
        match (with_metrics, with_health) {
            (true, true) => info!(addr = %a, "serving metrics and health on http://{a}"),
            (true, false) => info!(addr = %a, "serving metrics on http://{a}/metrics"),
            _ => info!(addr = %a, "serving health on http://{a}/health and /ready"),
        }
    }
    ready.listeners_bound.store(true, Ordering::Relaxed);

    // Rules only once every listener answers.
    let mut started = Ok(());
    for &addr in &served {
        if let Err(e) = self_check(addr).await {
            if settings.node.setup_iptables {
                started = Err(e.context(format!(
                    "listener {addr} does not answer; not installing firewall rules"
                )));
                break;
            }
            // Without rules to protect, an address this host cannot reach itself (e.g. a
            // link-local IP that lives in another namespace) is no reason to stop serving.
            warn!(%addr, error = %format!("{e:#}"), "self-check got no answer from this listener");
        }
    }
    if started.is_ok() {
        started = node.setup_rules().await.context("firewall setup failed");
    }
    if let Err(e) = started {
        // Leave nothing behind that would capture DNS with no one listening.
        if let Err(t) = node.teardown().await {
            warn!(error = %format!("{t:#}"), "teardown incomplete");
        }
        stop_all(&stop, &cancel, threads, &tracker, settings.grace_period).await;
        return Err(e);
    }
    ready.node_setup_done.store(true, Ordering::Relaxed);
    let probe = tokio::spawn(probe_upstreams(ctx.clone(), ready.clone()));
    let sync_cancel = CancellationToken::new();
    let sync = {
        let node = node.clone();
        let c = sync_cancel.clone();
        tokio::spawn(async move { node.run_sync_loop(async move { c.cancelled().await }).await })
    };
    // Expired answers leave memory within PURGE_EVERY even when nothing new pushes them out.
    let purge = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PURGE_EVERY);
            loop {
                tick.tick().await;
                ctx.cache.purge_expired(std::time::Instant::now());
            }
        })
    };
    info!("nodedns {} serving", env!("CARGO_PKG_VERSION"));

    shutdown.await;
    ready.shutting_down.store(true, Ordering::Relaxed);
    probe.abort();
    purge.abort();
    if !settings.lameduck.is_zero() {
        info!(lameduck = ?settings.lameduck, "not ready; still answering during lameduck");
        tokio::time::sleep(settings.lameduck).await;
    }
    sync_cancel.cancel();
    let _ = sync.await;
    // Rules and addresses go while we still answer: traffic falls back to kube-dns (transparent
    // mode) instead of hitting an address with nothing listening.
    if let Err(e) = node.teardown().await {
        warn!(error = %format!("{e:#}"), "teardown incomplete");
    }
    stop_all(&stop, &cancel, threads, &tracker, settings.grace_period).await;
    admin_cancel.cancel();
    info!("stopped");
    Ok(())
}

/// Stops listening, then gives in-flight queries `grace` to finish.
async fn stop_all(
    stop: &AtomicBool,
    cancel: &CancellationToken,
    threads: Vec<std::thread::JoinHandle<()>>,
    tracker: &TaskTracker,
    grace: Duration,
) {
    stop.store(true, Ordering::Relaxed);
    cancel.cancel();
    tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await
    .ok();
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(?grace, "grace period over with queries still in flight");
    }
}

/// Sends a query that is answered locally (an unsupported opcode gets NOTIMP without any
/// upstream) and waits for the answer: proof the worker loop serves this address.
async fn self_check(addr: SocketAddr) -> anyhow::Result<()> {
    let target = match addr.ip() {
        ip if ip.is_unspecified() && addr.is_ipv4() => {
            SocketAddr::new([127, 0, 0, 1].into(), addr.port())
        }
        ip if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let bind: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse()?
        } else {
            "[::]:0".parse()?
        };
        let s = UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.connect(target)?;
        let id: u16 = rand::random();
        // opcode 2 (STATUS), one empty question.
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]);
        let mut buf = [0u8; 512];
        for _ in 0..6 {
            s.send(&q)?;
            if let Ok(n) = s.recv(&mut buf) {
                if n >= 12 && buf[..2] == id.to_be_bytes() {
                    return Ok(());
                }
            }
        }
        anyhow::bail!("no answer from {target}")
    })
    .await?
}

/// Marks readiness once any upstream answers a `. NS` probe (any rcode counts, as in CoreDNS's
/// health check); retries every second until then.
async fn probe_upstreams(ctx: Arc<Context>, ready: Arc<Readiness>) {
    loop {
        if ctx.forwarder.probe().await {
            ready.upstream_answered.store(true, Ordering::Relaxed);
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
