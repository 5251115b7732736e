//! The admin endpoints this instance serves, and what it takes back from a peer: TCP
//! connections and admin listeners handed over at the peer's shutdown (`lifecycle::handover`).

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin::{self, Readiness};
use crate::lifecycle::handover::{Adopter, Peers};
use crate::metrics::Metrics;
use crate::server::tcp::{self, ConnCtx};

/// One admin listener this instance serves or served.
struct Endpoint {
    addr: SocketAddr,
    with_metrics: bool,
    with_health: bool,
    /// Cancelled when the listener is handed to a peer, or at exit.
    token: CancellationToken,
    /// A duplicate of the listener, for handing it over.
    listener: std::net::TcpListener,
    /// Served again after a successor that took it was lost (not to be resumed twice).
    resumed: bool,
}

/// The admin endpoints, shared by startup, the handover and shutdown.
pub struct Admins {
    endpoints: Mutex<Vec<Endpoint>>,
    metrics: Arc<Metrics>,
    ready: Arc<Readiness>,
    /// Parent of every endpoint's token.
    cancel: CancellationToken,
    rt: tokio::runtime::Handle,
}

impl Admins {
    pub fn new(metrics: Arc<Metrics>, ready: Arc<Readiness>, rt: tokio::runtime::Handle) -> Self {
        Admins {
            endpoints: Mutex::new(Vec::new()),
            metrics,
            ready,
            cancel: CancellationToken::new(),
            rt,
        }
    }

    /// Serves the routes asked for on `addr` (on `handed` when a previous instance handed the
    /// listener over). Returns the bound address and the token cancelled when a successor takes
    /// the listener, and a duplicate of the listener to offer it.
    pub async fn serve(
        &self,
        addr: SocketAddr,
        handed: Option<std::net::TcpListener>,
        with_metrics: bool,
        with_health: bool,
    ) -> anyhow::Result<(SocketAddr, CancellationToken, std::net::TcpListener)> {
        let token = self.cancel.child_token();
        let (bound, keep) = admin::spawn(
            addr,
            handed,
            with_metrics,
            with_health,
            self.metrics.clone(),
            self.ready.clone(),
            token.clone(),
        )
        .await?;
        let offer = keep.try_clone()?;
        self.endpoints.lock().push(Endpoint {
            addr,
            with_metrics,
            with_health,
            token: token.clone(),
            listener: keep,
            resumed: false,
        });
        Ok((bound, token, offer))
    }

    /// At shutdown: hands every admin listener still served here to a peer (the newer half of an
    /// HA pair stopping first gives the port back), then stops serving.
    pub fn hand_back(&self, peers: &Peers) {
        for e in self.endpoints.lock().iter() {
            if !e.token.is_cancelled() && peers.give_admin(e.addr, &e.listener) {
                info!(addr = %e.addr, "handed the admin port to the instance that stays");
                e.token.cancel();
            }
        }
    }

    /// Stops every admin endpoint.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Serves again every endpoint handed to a successor that is gone, unless this instance is
    /// stopping.
    fn resume_handed(self: &Arc<Self>) {
        if self.cancel.is_cancelled() {
            return;
        }
        let handed: Vec<(
            SocketAddr,
            bool,
            bool,
            std::io::Result<std::net::TcpListener>,
        )> = self
            .endpoints
            .lock()
            .iter_mut()
            .filter(|e| e.token.is_cancelled() && !e.resumed)
            .map(|e| {
                e.resumed = true;
                (
                    e.addr,
                    e.with_metrics,
                    e.with_health,
                    e.listener.try_clone(),
                )
            })
            .collect();
        for (addr, m, h, listener) in handed {
            let Ok(listener) = listener else { continue };
            let admins = self.clone();
            self.rt.spawn(async move {
                if let Err(e) = admins.serve(addr, Some(listener), m, h).await {
                    warn!(%addr, error = %format!("{e:#}"), "cannot serve an admin port again");
                } else {
                    info!(%addr, "serving the admin port again");
                }
            });
        }
    }
}

/// What this instance does with what a peer hands over.
pub struct Taker {
    pub admins: Arc<Admins>,
    /// TCP servers by listen address.
    pub conns: Vec<(SocketAddr, ConnCtx)>,
}

impl Adopter for Taker {
    fn tcp(&self, stream: std::net::TcpStream, read: Vec<u8>) {
        let local = stream.local_addr().ok();
        let Some((_, cc)) = self
            .conns
            .iter()
            .find(|(a, _)| Some(*a) == local)
            .or(self.conns.first())
        else {
            return;
        };
        tcp::adopt(stream, read, cc.clone(), &self.admins.rt);
    }

    fn admin(&self, addr: SocketAddr, listener: std::net::TcpListener) {
        let admins = self.admins.clone();
        self.admins.rt.spawn(async move {
            // Serve what that port served here before, or everything for a port we never had.
            let (m, h) = admins
                .endpoints
                .lock()
                .iter()
                .find(|e| e.addr == addr)
                .map_or((true, true), |e| (e.with_metrics, e.with_health));
            if let Err(e) = admins.serve(addr, Some(listener), m, h).await {
                warn!(%addr, error = %format!("{e:#}"), "cannot serve a handed-back admin port");
            }
        });
    }

    fn successor_lost(&self) {
        self.admins.resume_handed();
    }
}
