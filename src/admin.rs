//! The admin HTTP endpoints: `/metrics` (Prometheus text), `/health` (200 while serving DNS) and
//! `/ready` (200 once listeners are bound, node setup is done and an upstream has answered; 503
//! again from the start of shutdown, before DNS stops answering).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The readiness latch.
#[derive(Default, Debug)]
pub struct Readiness {
    pub listeners_bound: AtomicBool,
    pub node_setup_done: AtomicBool,
    pub upstream_answered: AtomicBool,
    pub shutting_down: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.listeners_bound.load(Ordering::Relaxed)
            && self.node_setup_done.load(Ordering::Relaxed)
            && self.upstream_answered.load(Ordering::Relaxed)
            && !self.shutting_down.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn health() -> impl IntoResponse {
    (StatusCode::OK, "OK")
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    if s.ready.is_ready() {
        (StatusCode::OK, "ready")
    } else if s.ready.shutting_down.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves the routes asked for on `addr` until `shutdown` is cancelled: on `handed`, the
/// listener a previous instance handed over, or on a new one. Returns the bound address (useful
/// when the port is 0) and a duplicate of the listener to offer to a successor.
pub async fn spawn(
    addr: SocketAddr,
    handed: Option<std::net::TcpListener>,
    metrics_routes: bool,
    health_routes: bool,
    metrics_: Arc<Metrics>,
    ready_: Arc<Readiness>,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, std::net::TcpListener)> {
    use anyhow::Context as _;
    let std_listener = match handed {
        Some(l) => {
            l.set_nonblocking(true)?;
            l
        }
        None => crate::server::socket::build_admin_listener(addr).with_context(|| {
            format!(
                "failed to bind HTTP listener on {addr} (another nodedns on this node owns it \
                 unless handed over: give each instance of an HA pair its own admin ports)"
            )
        })?,
    };
    // Kept for the handover: a successor takes this listener over.
    let keep = std_listener.try_clone()?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    let bound = listener.local_addr()?;
    let mut app = Router::new();
    if metrics_routes {
        app = app.route("/metrics", get(metrics));
    }
    if health_routes {
        app = app
            .route("/health", get(health))
            .route("/ready", get(ready));
    }
    let app = app.with_state(AppState {
        metrics: metrics_,
        ready: ready_,
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((bound, keep))
}
