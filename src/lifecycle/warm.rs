//! Warm start and the periodic snapshot: the cache a new instance starts with comes from the
//! instance before it (handover) or from the snapshot in the state directory; every outcome is
//! logged and counted (`nodedns_cache_warm_loads_total`), and a refused snapshot only means a
//! cold start.

use std::path::Path;
use std::time::{Instant, SystemTime};

use tracing::{info, warn};

use crate::cache::Cache;
use crate::cache::{load_snapshot_file, write_snapshot_file, LoadStats, SnapshotError};
use crate::metrics::Metrics;

fn loaded(metrics: &Metrics, source: &str, stats: &LoadStats) {
    metrics.warm_loads.with_label_values(&[source, "ok"]).inc();
    metrics.warm_entries.set(stats.loaded as i64);
    info!(
        source,
        loaded = stats.loaded,
        expired = stats.expired,
        dropped = stats.unknown_zone + stats.oversized,
        "cache warmed"
    );
}

fn refused(metrics: &Metrics, source: &str, e: &SnapshotError) {
    metrics
        .warm_loads
        .with_label_values(&[source, e.label()])
        .inc();
    warn!(source, error = %e, "cache snapshot refused; starting cold");
}

/// Loads the cache a previous instance handed over; false when it was refused.
pub fn load_handed(cache: &Cache, zones: usize, bytes: &[u8], metrics: &Metrics) -> bool {
    match cache.load_snapshot(&mut &bytes[..], Instant::now(), SystemTime::now(), zones) {
        Ok(stats) => {
            loaded(metrics, "handover", &stats);
            true
        }
        Err(e) => {
            refused(metrics, "handover", &e);
            false
        }
    }
}

/// Removes temporary snapshot files (`.<name>.<pid>.<n>.tmp`) that a process killed while
/// writing left beside `path`. PIDs say nothing across pods (each has its own PID namespace), so
/// age does: a write takes seconds at most.
fn remove_abandoned_temps(path: &Path) {
    const ABANDONED: std::time::Duration = std::time::Duration::from_secs(600);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!(".{}.", name.to_string_lossy());
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let file = e.file_name();
        let file = file.to_string_lossy();
        if !(file.starts_with(&prefix) && file.ends_with(".tmp")) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > ABANDONED);
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Loads the snapshot file at `path`, if there is one.
pub fn load_file(cache: &Cache, zones: usize, path: &Path, metrics: &Metrics) {
    remove_abandoned_temps(path);
    match load_snapshot_file(cache, path, Instant::now(), SystemTime::now(), zones) {
        Ok(Some(stats)) => loaded(metrics, "snapshot", &stats),
        Ok(None) => {
            metrics
                .warm_loads
                .with_label_values(&["snapshot", "missing"])
                .inc();
            info!(path = %path.display(), "no cache snapshot; starting cold");
        }
        Err(e) => {
            refused(metrics, "snapshot", &e);
            // A refused file would be refused again at every start until overwritten.
            let _ = std::fs::rename(path, path.with_extension("refused"));
        }
    }
}

/// Writes the snapshot file at `path` (atomically), logging and counting the outcome.
pub fn save(cache: &Cache, path: &Path, metrics: &Metrics) {
    let started = Instant::now();
    match write_snapshot_file(cache, path, Instant::now(), SystemTime::now()) {
        Ok(stats) => {
            metrics.snapshot_writes.with_label_values(&["ok"]).inc();
            info!(path = %path.display(), entries = stats.entries, bytes = stats.bytes,
                took = ?started.elapsed(), "cache snapshot written");
        }
        Err(e) => {
            metrics.snapshot_writes.with_label_values(&["error"]).inc();
            warn!(path = %path.display(), error = %e, "cannot write the cache snapshot");
        }
    }
}
