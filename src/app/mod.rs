//! Startup and shutdown, in the order that keeps a node's DNS working:
//!
//! 1. interface and addresses (when asked), so the listen IPs exist;
//! 2. bind every listener (UDP per worker, TCP), start serving them (`server::Server`, the
//!    entry point the in-process tests use too, on the real clock here) and the admin endpoints;
//! 3. check that each listener answers, then install the firewall rules: a broken start never
//!    blackholes the node's DNS;
//! 4. on SIGTERM: /ready turns 503, DNS keeps answering for the lameduck period, the cache
//!    snapshot is written; the last instance on the node removes the rules before the interface
//!    (while still answering); then listeners stop and in-flight queries get
//!    `server.grace_period` to finish.
//!
//! With a state directory (`lifecycle`), a starting instance first takes the listening sockets
//! and the cache of the instance already serving the node, if there is one, and both serve until
//! the old one exits; its TCP connections follow at its shutdown.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::Readiness;
use crate::clock::Clock;
use crate::config::Settings;
use crate::lifecycle::handover::{self, Kind, Offer, Offered, Peers};
use crate::lifecycle::{warm, StateDir};
use crate::metrics::Metrics;
use crate::node::{NodeManager, SetupErrorSink};

mod admins;
pub mod reload;
use crate::server::{socket, Context, Server};
use admins::{Admins, Taker};
pub use reload::ConfigSource;

impl SetupErrorSink for Metrics {
    fn setup_error(&self, errortype: &'static str) {
        self.setup_errors.with_label_values(&[errortype]).inc();
    }
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT.
///
/// The handlers are installed when this is called, not when the future is first polled: a
/// SIGTERM that arrives while nodedns is still starting must start a shutdown, not end the
/// process with the signal's default action. Call it inside the runtime, before `run`.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received, shutting down"),
            _ = int.recv() => info!("SIGINT received, shutting down"),
        }
    }
}

/// SIGHUP and SIGUSR1 end a process by default: without a configuration source to reload, they
/// are logged and ignored, so no stray signal takes a node's DNS down.
fn ignore_stray_signals() {
    use tokio::signal::unix::{signal, SignalKind};
    for (kind, name) in [
        (SignalKind::hangup(), "SIGHUP"),
        (SignalKind::user_defined1(), "SIGUSR1"),
    ] {
        match signal(kind) {
            Ok(mut s) => {
                tokio::spawn(async move {
                    while s.recv().await.is_some() {
                        warn!(
                            signal = name,
                            "signal received: no configuration source to reload, ignoring it"
                        );
                    }
                });
            }
            Err(e) => warn!(signal = name, error = %e, "cannot handle signal"),
        }
    }
}

/// How long shutdown waits for the cache snapshot to be written.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(5);

/// How long a starting or exiting instance waits for another one's node setup or teardown.
const NODE_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Opens the state directory, if one is configured.
fn open_state(settings: &Settings) -> anyhow::Result<Option<Arc<StateDir>>> {
    let Some(dir) = &settings.state.dir else {
        return Ok(None);
    };
    match StateDir::open(dir) {
        Ok(s) => Ok(Some(Arc::new(s))),
        Err(e) if settings.node.setup_interface || settings.node.setup_iptables => {
            Err(anyhow::anyhow!(e)
                .context("cannot use the state directory (state.dir, --state-dir)"))
        }
        Err(e) => {
            warn!(error = %e, "cannot use the state directory: no handover, no warm restart");
            Ok(None)
        }
    }
}

/// The listeners this instance would take over from a running one: DNS (UDP and TCP) and the
/// admin endpoints, at fixed ports only.
fn wanted(settings: &Settings) -> Vec<(Kind, SocketAddr)> {
    let mut w = Vec::new();
    for &a in settings.listen.iter().filter(|a| a.port() != 0) {
        w.push((Kind::Udp, a));
        w.push((Kind::Tcp, a));
    }
    for a in [settings.metrics, settings.health].into_iter().flatten() {
        if a.port() != 0 && !w.contains(&(Kind::Http, a)) {
            w.push((Kind::Http, a));
        }
    }
    w
}

/// Runs nodedns until `shutdown` resolves, then drains and tears down. With a `source`, SIGHUP,
/// SIGUSR1 and changes of its files reload the configuration (`reload`).
pub async fn run(
    settings: Settings,
    source: Option<ConfigSource>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let signals = match source {
        Some(_) => Some(reload::Signals::install()),
        None => {
            ignore_stray_signals();
            None
        }
    };
    for w in &settings.warnings {
        warn!("{w}");
    }
    let settings = Arc::new(settings);
    let metrics = Metrics::new(settings.zones.iter().map(|z| z.name.clone()).collect());
    crate::metrics::install_panic_hook();
    let ready = Arc::new(Readiness::default());
    let node = Arc::new(NodeManager::new(settings.node.clone(), metrics.clone()));

    // One instance at a time sets the node up; a running one hands over its sockets and cache.
    let state = open_state(&settings)?;
    let node_lock = match &state {
        Some(s) => Some(s.lock_node(NODE_LOCK_WAIT).await?),
        None => None,
    };
    let mut handed = match &state {
        Some(s) => {
            let (s, wants, warm) = (s.clone(), wanted(&settings), settings.state.warm_restart);
            tokio::task::spawn_blocking(move || handover::request(&s, &wants, warm)).await?
        }
        None => None,
    };
    if let Some(h) = &handed {
        info!(from = %h.from.display(), listeners = h.count(), "taking over from the running instance");
    }
    node.setup_interface()
        .await
        .context("interface setup failed")?;

    let bound = socket::bind_all(&settings.listen, settings.workers, handed.as_mut())?;
    let ctx = Context::new(settings.clone(), metrics.clone(), Clock::real());
    // A handed cache is loaded before the first query is read (the old instance serves
    // meanwhile); the snapshot file loads beside the running workers, so it never delays them.
    let mut load_snapshot = None;
    if settings.state.warm_restart {
        let zones = settings.zones.len();
        let from_handover = handed
            .as_mut()
            .and_then(|h| h.cache.take())
            .is_some_and(|bytes| warm::load_handed(&ctx.cache, zones, &bytes, &metrics));
        if let (false, Some(s)) = (from_handover, &state) {
            let (path, cache, metrics) = (s.snapshot_path(), ctx.cache.clone(), metrics.clone());
            load_snapshot = Some(move || warm::load_file(&cache, zones, &path, &metrics));
        }
    }
    let peers = Arc::new(Peers::default());
    let rt = tokio::runtime::Handle::current();
    let admins = Arc::new(Admins::new(metrics.clone(), ready.clone(), rt.clone()));
    // What a successor may take over: every DNS socket, offered before the server owns them.
    let mut offered = Vec::new();
    let served: Vec<SocketAddr> = bound.iter().map(|b| b.addr).collect();
    for b in &bound {
        offered.push(Offered {
            kind: Kind::Udp,
            addr: b.addr,
            fds: b
                .udp
                .iter()
                .map(|s| s.try_clone().map(Into::into))
                .collect::<std::io::Result<_>>()?,
            on_taken: None,
        });
        offered.push(Offered {
            kind: Kind::Tcp,
            addr: b.addr,
            fds: vec![b.tcp.try_clone()?.into()],
            on_taken: None,
        });
    }
    // The same entry point the in-process tests use (`server::run`), in steps.
    let server = Server::start(ctx.clone(), bound, peers.clone())?;
    if let Some(load) = load_snapshot {
        tokio::task::spawn_blocking(load);
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
        let from_old = handed
            .as_mut()
            .filter(|_| addr.port() != 0)
            .and_then(|h| h.take(Kind::Http, addr).into_iter().next())
            .map(std::net::TcpListener::from);
        let (a, token, keep) = match admins
            .serve(addr, from_old, with_metrics, with_health)
            .await
        {
            Ok(served) => served,
            Err(e) if addr.port() != 0 && socket::is_addr_in_use(&e) => {
                // Held by an instance that cannot hand it over (an older nodedns during the
                // first upgrade, or one with another state directory): DNS is served meanwhile,
                // and the port is taken as soon as that instance lets it go.
                warn!(%addr, "admin port held by another process: serving DNS, retrying the port every second");
                let (admins, node) = (admins.clone(), node.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        if let Ok((a, _, _)) =
                            admins.serve(addr, None, with_metrics, with_health).await
                        {
                            info!(addr = %a, "admin port free again: serving on http://{a}");
                            // An older instance removes the interface and rules when it exits,
                            // before it lets its ports go: put them back now, not at next sync.
                            if let Err(e) = node.sync().await {
                                warn!(error = %format!("{e:#}"), "node sync failed");
                            }
                            return;
                        }
                    }
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        offered.push(Offered {
            kind: Kind::Http,
            addr,
            fds: vec![keep.into()],
            on_taken: Some(token),
        });
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
    if started.is_ok() {
        if let (Some(s), Some(lock)) = (&state, &node_lock) {
            started = s.join(lock).context("cannot take the instance lease");
        }
    }
    if let Err(e) = started {
        // Leave nothing behind that would capture DNS with no one listening, unless another
        // instance still serves the node on it.
        let others = match (&state, &node_lock) {
            (Some(s), Some(lock)) => s.others_alive(lock).unwrap_or(true),
            _ => false,
        };
        if others {
            info!("another instance serves this node: leaving its interface and rules");
        } else if let Err(t) = node.teardown().await {
            warn!(error = %format!("{t:#}"), "teardown incomplete");
        }
        server.stop().await;
        return Err(e);
    }
    drop(node_lock);
    ready.node_setup_done.store(true, Ordering::Relaxed);
    let taker: Arc<dyn handover::Adopter> = Arc::new(Taker {
        admins: admins.clone(),
        conns: server.tcp_listeners(),
    });
    if let Some(h) = handed {
        h.confirm(&peers, taker.clone())
            .context("cannot confirm the handover")?;
        metrics.handovers.with_label_values(&["took"]).inc();
    }
    let handover_stop = CancellationToken::new();
    let handover_thread = match &state {
        Some(s) => {
            let (cache, clock) = (ctx.cache.clone(), ctx.clock.clone());
            let offer = Arc::new(Offer {
                listeners: offered,
                cache: settings.state.warm_restart.then(|| {
                    Box::new(move |w: &mut dyn std::io::Write| {
                        cache
                            .write_snapshot(
                                &mut std::io::BufWriter::new(w),
                                clock.now(),
                                SystemTime::now(),
                            )
                            .map(drop)
                    }) as handover::CacheWriter
                }),
                peers: peers.clone(),
                adopter: taker,
            });
            Some(
                handover::serve(s, offer, handover_stop.clone())
                    .context("cannot start the handover socket")?,
            )
        }
        None => None,
    };
    let probe = tokio::spawn(probe_upstreams(ctx.clone(), ready.clone()));
    let reload_cancel = CancellationToken::new();
    if let (Some(source), Some(signals)) = (source, signals) {
        tokio::spawn(reload::run(
            source,
            signals,
            settings.clone(),
            ctx.clone(),
            metrics.clone(),
            reload_cancel.clone(),
        ));
    }
    let sync_cancel = CancellationToken::new();
    let sync = {
        let node = node.clone();
        let c = sync_cancel.clone();
        tokio::spawn(async move { node.run_sync_loop(async move { c.cancelled().await }).await })
    };
    let snapshots = match (&state, settings.state.snapshot_interval) {
        (Some(s), every) if !every.is_zero() && settings.state.warm_restart => {
            let (path, cache, metrics) = (s.snapshot_path(), ctx.cache.clone(), metrics.clone());
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    let (path, cache, metrics) = (path.clone(), cache.clone(), metrics.clone());
                    let _ =
                        tokio::task::spawn_blocking(move || warm::save(&cache, &path, &metrics))
                            .await;
                }
            }))
        }
        _ => None,
    };
    info!("nodedns {} serving", env!("CARGO_PKG_VERSION"));

    shutdown.await;
    ready.shutting_down.store(true, Ordering::Relaxed);
    probe.abort();
    if let Some(t) = snapshots {
        t.abort();
    }
    if !settings.lameduck.is_zero() {
        info!(lameduck = ?settings.lameduck, "not ready; still answering during lameduck");
        tokio::time::sleep(settings.lameduck).await;
    }
    sync_cancel.cancel();
    reload_cancel.cancel();
    let _ = sync.await;
    if let (Some(s), true) = (&state, settings.state.warm_restart) {
        let (path, cache, metrics) = (s.snapshot_path(), ctx.cache.clone(), metrics.clone());
        let save = tokio::task::spawn_blocking(move || warm::save(&cache, &path, &metrics));
        // A state directory on a slow disk must not hold the exit past the pod's grace period:
        // the previous snapshot stays in place if this one does not finish.
        if tokio::time::timeout(SNAPSHOT_WAIT, save).await.is_err() {
            warn!(wait = ?SNAPSHOT_WAIT, "cache snapshot still being written; exiting without it");
        }
    }
    // The interface and rules belong to the node: only the last instance removes them, while
    // still answering, so traffic falls back (to kube-dns in transparent mode) instead of
    // hitting an address with nothing listening.
    let node_lock = match &state {
        Some(s) => match s.lock_node(NODE_LOCK_WAIT).await {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "leaving the node's interface and rules in place");
                None
            }
        },
        None => None,
    };
    let last = match (&state, &node_lock) {
        (Some(s), Some(lock)) => s.leave(lock).unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the instance lease; assuming another instance serves");
            false
        }),
        (Some(_), None) => false,
        (None, _) => true,
    };
    if last {
        if let Err(e) = node.teardown().await {
            warn!(error = %format!("{e:#}"), "teardown incomplete");
        }
    } else {
        info!("another instance serves this node: leaving its interface and rules in place");
    }
    drop(node_lock);
    handover_stop.cancel();
    if let Some(t) = handover_thread {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    server.stop().await;
    if peers.has_successor() {
        metrics.handovers.with_label_values(&["gave"]).inc();
    }
    admins.hand_back(&peers);
    peers.finish();
    admins.stop();
    info!("stopped");
    Ok(())
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
