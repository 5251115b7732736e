//! Live reload: SIGHUP, SIGUSR1 (what node-cache's `-reloadwithsignal` sends) and a change of a
//! configuration file read the configuration again, the way the process read it at start.
//!
//! A new configuration is validated whole before anything of it is used; an invalid one is
//! refused with the error that names its file, key or line, counted in
//! `coredns_reload_failed_total`, and the running configuration stays in force. A valid one is
//! put in force without dropping the cache, a socket or a query in flight: zones, upstreams,
//! forwarding and caching policy, prefetch, local answers and query-log sampling change in
//! place (`Context::reconfigure`); settings that belong to what was set up at start (listeners,
//! workers, admin endpoints, node setup, state directory, cache size, server limits) are logged
//! as changed and apply at the next start.
//!
//! Files are watched through their directories (inotify), so a ConfigMap update (kubelet swaps
//! the `..data` symlink) is seen like an edit; a change is acted on once its contents differ
//! from what was last read.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::server::Context;

/// Where the configuration comes from, to be read again at each reload.
pub struct ConfigSource {
    /// Reads and validates every source again, as at start; the error names the file, key or
    /// line at fault.
    pub load: Arc<dyn Fn() -> Result<Settings, String> + Send + Sync>,
    /// Files whose change triggers a reload.
    pub watch: Vec<PathBuf>,
    /// Their contents before the configuration in force was read: a change made while the
    /// process started is found when the watch begins.
    seen: Vec<Option<Vec<u8>>>,
}

impl ConfigSource {
    /// Call before reading the configuration the process starts with.
    pub fn new(
        watch: Vec<PathBuf>,
        load: Arc<dyn Fn() -> Result<Settings, String> + Send + Sync>,
    ) -> ConfigSource {
        ConfigSource {
            seen: contents(&watch),
            watch,
            load,
        }
    }
}

/// The reload signals' handlers, installed before startup so that a SIGHUP sent while the
/// process starts does not end it (the default action) but reloads once it serves.
pub struct Signals(Vec<(tokio::signal::unix::Signal, &'static str)>);

impl Signals {
    pub fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let mut v = Vec::new();
        for (kind, name) in [
            (SignalKind::hangup(), "SIGHUP"),
            (SignalKind::user_defined1(), "SIGUSR1"),
        ] {
            match signal(kind) {
                Ok(s) => v.push((s, name)),
                Err(e) => warn!(signal = name, error = %e, "cannot handle signal"),
            }
        }
        Signals(v)
    }
}

/// How long a burst of file events (an editor's write, a symlink swap) settles before the
/// files are read.
const SETTLE: Duration = Duration::from_millis(100);

/// Why a reload happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Signal(&'static str),
    FileChange,
}

/// Reloads the configuration on signals and file changes until `cancel` fires. `start` is the
/// configuration the process started with: what cannot change in place is compared to it.
pub async fn run(
    mut source: ConfigSource,
    signals: Signals,
    start: Arc<Settings>,
    ctx: Arc<Context>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Trigger>();
    for (mut s, name) in signals.0 {
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(Trigger::Signal(name)).is_err() {
                    return;
                }
            }
        });
    }
    let _watcher = if start.reload_watch {
        watch(&source.watch, tx.clone())
    } else {
        None
    };
    let mut last = std::mem::take(&mut source.seen);
    if start.reload_watch && contents(&source.watch) != last {
        let _ = tx.send(Trigger::FileChange);
    }
    loop {
        let trigger = tokio::select! {
            t = rx.recv() => match t {
                Some(t) => t,
                None => return,
            },
            () = cancel.cancelled() => return,
        };
        let mut trigger = trigger;
        if trigger == Trigger::FileChange {
            tokio::time::sleep(SETTLE).await;
            // The burst settles; a signal within it still counts as a signal.
            while let Ok(t) = rx.try_recv() {
                if t != Trigger::FileChange {
                    trigger = t;
                }
            }
        }
        let now = contents(&source.watch);
        if trigger == Trigger::FileChange && now == last {
            continue;
        }
        last = now;
        let load = source.load.clone();
        let loaded = tokio::task::spawn_blocking(move || load())
            .await
            .unwrap_or_else(|e| Err(format!("reading the configuration failed: {e}")));
        apply(loaded, trigger, &start, &ctx, &metrics);
    }
}

/// Puts a freshly read configuration in force, or refuses it.
fn apply(
    loaded: Result<Settings, String>,
    trigger: Trigger,
    start: &Settings,
    ctx: &Context,
    metrics: &Metrics,
) {
    let why = match trigger {
        Trigger::Signal(s) => s,
        Trigger::FileChange => "file change",
    };
    let mut new = match loaded {
        Ok(s) => s,
        Err(e) => {
            metrics.reload_failed.inc();
            error!(
                trigger = why,
                "configuration reload refused, the running configuration stays in force: {e}"
            );
            return;
        }
    };
    if let Err(e) = metrics.assign_zone_slots(&mut new.zones) {
        metrics.reload_failed.inc();
        error!(
            trigger = why,
            "configuration reload refused, the running configuration stays in force: zone: {e}"
        );
        return;
    }
    for key in restart_only_changes(start, &new) {
        warn!(
            key,
            "changed in the configuration; this setting cannot change in place and applies at the next start"
        );
    }
    for w in &new.warnings {
        warn!("{w}");
    }
    let zones = new.zones.len();
    let gen = ctx.reconfigure(Arc::new(new));
    metrics.config_generation.set(gen as i64);
    info!(
        trigger = why,
        generation = gen,
        zones,
        "configuration reloaded"
    );
}

/// The settings that differ from `start` but only take effect at start, by key.
pub fn restart_only_changes(start: &Settings, new: &Settings) -> Vec<&'static str> {
    fn differ<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let mut changed = Vec::new();
    let mut check = |key, d: bool| {
        if d {
            changed.push(key);
        }
    };
    check("listen", differ(&start.listen, &new.listen));
    check("workers", start.workers != new.workers);
    check("metrics", start.metrics != new.metrics);
    check("health", start.health != new.health);
    check("lameduck", start.lameduck != new.lameduck);
    check("log_format", start.log_json != new.log_json);
    check(
        "cache.max_entries",
        start.cache.max_entries != new.cache.max_entries,
    );
    check(
        "cache.max_bytes",
        start.cache.max_bytes != new.cache.max_bytes,
    );
    check("server", differ(&start.server, &new.server));
    check("node", differ(&start.node, &new.node));
    check("state", differ(&start.state, &new.state));
    check("reload.watch", start.reload_watch != new.reload_watch);
    changed
}

/// The watched files' contents (None for one that cannot be read), to tell a real change from
/// an event that changed nothing.
fn contents(paths: &[PathBuf]) -> Vec<Option<Vec<u8>>> {
    paths.iter().map(|p| std::fs::read(p).ok()).collect()
}

/// Watches the directories of `paths`; each event sends a `FileChange`. None (logged) when the
/// watch cannot be set up: signals still reload.
fn watch(
    paths: &[PathBuf],
    tx: tokio::sync::mpsc::UnboundedSender<Trigger>,
) -> Option<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    if paths.is_empty() {
        return None;
    }
    let mut w = match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reading a file (ours included) is an event too: only what can change contents counts.
        if let Ok(e) = res {
            if e.kind.is_create() || e.kind.is_modify() || e.kind.is_remove() {
                let _ = tx.send(Trigger::FileChange);
            }
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            warn!(error = %e, "cannot watch the configuration files; reload with SIGHUP");
            return None;
        }
    };
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
            warn!(dir = %d.display(), error = %e, "cannot watch a configuration directory; reload with SIGHUP");
        } else {
            info!(dir = %d.display(), "watching for configuration changes");
        }
    }
    Some(w)
}
