//! The HTTPS endpoint the API server calls (POST /mutate) and the plain-HTTP endpoint of
//! /metrics, /health and /ready.
//!
//! Every request gets an answer with a clear status: 404/405 for another path or method, 415 for
//! a body that is not `application/json`, 413 past `--max-body-bytes` (checked against
//! Content-Length before reading, and while reading), 408 for a body not sent within
//! `--request-timeout`, 400 for a body that is not an `admission.k8s.io/v1` AdmissionReview.
//! A review of anything the rules do not inject is allowed unchanged, never refused: together
//! with `failurePolicy: Ignore` nothing here can keep a pod from being created.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::config::InjectConfig;
use super::metrics::{ErrorKind, InjectMetrics};
use super::patch;
use super::review::{AdmissionReview, Pod, API_VERSION, KIND};
use super::rules::{Decision, Rules};
use super::tls::Certificate;

/// The path the MutatingWebhookConfiguration names.
pub const MUTATE_PATH: &str = "/mutate";
/// Connections served at once; more wait in the listen backlog. The API server keeps a few
/// connections per webhook replica, so this bounds only misbehaving clients.
const MAX_CONNECTIONS: usize = 512;

/// What a request handler needs.
struct Shared {
    rules: Rules,
    metrics: Arc<InjectMetrics>,
    max_body: usize,
    request_timeout: std::time::Duration,
}

type Body = Full<Bytes>;

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    msg.push('\n');
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(msg)))
        .expect("valid response")
}

fn json(v: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(v).expect("a JSON value serializes"),
        )))
        .expect("valid response")
}

/// `application/json`, with or without parameters such as `charset=utf-8`.
fn is_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

impl Shared {
    /// Answers one request and counts it.
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let resp = match self.admit(req).await {
            Ok(r) => r,
            Err((kind, r)) => {
                self.metrics.error(kind);
                debug!(
                    status = r.status().as_u16(),
                    reason = kind.label(),
                    "request refused"
                );
                r
            }
        };
        self.metrics
            .requests
            .with_label_values(&[resp.status().as_str()])
            .inc();
        self.metrics.duration.observe(start.elapsed().as_secs_f64());
        resp
    }

    /// Reads and drops a refused request's body (bounded like any body), so the client, still
    /// sending, is not reset before it reads the answer.
    async fn drain(&self, req: Request<Incoming>) {
        let body = Limited::new(req.into_body(), self.max_body);
        let _ = tokio::time::timeout(self.request_timeout, body.collect()).await;
    }

    async fn admit(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, (ErrorKind, Response<Body>)> {
        if req.uri().path() != MUTATE_PATH {
            self.drain(req).await;
            return Err((
                ErrorKind::Route,
                text(
                    StatusCode::NOT_FOUND,
                    format!("not found; POST AdmissionReviews to {MUTATE_PATH}"),
                ),
            ));
        }
        if req.method() != Method::POST {
            self.drain(req).await;
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{MUTATE_PATH} takes POST"),
            );
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static("POST"),
            );
            return Err((ErrorKind::Route, r));
        }
        if !is_json(&req) {
            let got = req
                .headers()
                .get(CONTENT_TYPE)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_else(|| "none".into());
            self.drain(req).await;
            return Err((
                ErrorKind::ContentType,
                text(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    format!("Content-Type must be application/json, got {got}"),
                ),
            ));
        }
        let too_large = || {
            (
                ErrorKind::TooLarge,
                text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {} bytes", self.max_body),
                ),
            )
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return Err(too_large());
        }
        let body = Limited::new(req.into_body(), self.max_body);
        let bytes = match tokio::time::timeout(self.request_timeout, body.collect()).await {
            Err(_) => {
                return Err((
                    ErrorKind::Body,
                    text(
                        StatusCode::REQUEST_TIMEOUT,
                        "request body not received in time",
                    ),
                ))
            }
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
            Ok(Err(e)) => {
                return Err((
                    ErrorKind::Body,
                    text(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
                ))
            }
            Ok(Ok(b)) => b.to_bytes(),
        };
        let review: AdmissionReview = serde_json::from_slice(&bytes).map_err(|e| {
            (
                ErrorKind::Malformed,
                text(
                    StatusCode::BAD_REQUEST,
                    format!("malformed AdmissionReview: {e}"),
                ),
            )
        })?;
        if review.kind != KIND || review.api_version != API_VERSION {
            return Err((
                ErrorKind::ApiVersion,
                text(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "unsupported object {}/{}: this webhook speaks {API_VERSION} {KIND} \
                         (set admissionReviewVersions: [v1])",
                        if review.api_version.is_empty() {
                            "<no apiVersion>"
                        } else {
                            &review.api_version
                        },
                        if review.kind.is_empty() {
                            "<no kind>"
                        } else {
                            &review.kind
                        },
                    ),
                ),
            ));
        }
        let Some(request) = review.request else {
            return Err((
                ErrorKind::Malformed,
                text(
                    StatusCode::BAD_REQUEST,
                    "malformed AdmissionReview: no request",
                ),
            ));
        };
        let decision = if request.operation != "CREATE" {
            Decision::Skip {
                reason: super::rules::Skip::Operation,
                warning: None,
            }
        } else if !request.kind.is_pod() {
            Decision::Skip {
                reason: super::rules::Skip::NotAPod,
                warning: None,
            }
        } else {
            let object = request.object.unwrap_or(serde_json::Value::Null);
            let pod: Pod = serde_json::from_value(object).map_err(|e| {
                (
                    ErrorKind::Malformed,
                    text(
                        StatusCode::BAD_REQUEST,
                        format!("malformed Pod in the AdmissionReview: {e}"),
                    ),
                )
            })?;
            self.rules.decide(request.namespace.as_deref(), &pod)
        };
        let answer = match &decision {
            Decision::Inject { config, merged } => {
                let mode = if *merged { "merge" } else { "inject" };
                self.metrics.patches.with_label_values(&[mode]).inc();
                debug!(uid = %request.uid, namespace = ?request.namespace, mode, "pod DNS config injected");
                patch::response(&request.uid, Some(&patch::dns_patch(config)), &[])
            }
            Decision::Skip { reason, warning } => {
                self.metrics
                    .skipped
                    .with_label_values(&[reason.label()])
                    .inc();
                debug!(uid = %request.uid, namespace = ?request.namespace, reason = reason.label(), "pod left unchanged");
                let warnings: Vec<String> = warning.iter().cloned().collect();
                patch::response(&request.uid, None, &warnings)
            }
        };
        Ok(json(&answer))
    }
}

/// Binds both listeners, then serves until `shutdown` resolves; after it, /ready answers 503
/// and requests are still served for `--shutdown-delay`.
///
/// # Errors
/// A listener that cannot be bound or a certificate that cannot be loaded.
pub async fn run(
    cfg: InjectConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let cert = Certificate::load(&cfg.tls_cert, &cfg.tls_key)?;
    let acceptor = TlsAcceptor::from(Arc::new(cert.server_config()?));
    let metrics = Arc::new(InjectMetrics::new());
    let https = TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding the webhook address {}", cfg.listen))?;
    let plain = TcpListener::bind(cfg.metrics)
        .await
        .with_context(|| format!("binding the metrics address {}", cfg.metrics))?;
    info!("listening for HTTPS on {}", https.local_addr()?);
    info!("serving metrics on {}", plain.local_addr()?);
    let ready = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        rules: cfg.rules.clone(),
        metrics: metrics.clone(),
        max_body: cfg.max_body_bytes,
        request_timeout: cfg.request_timeout,
    });
    tokio::spawn(serve_admin(plain, metrics.clone(), ready.clone()));
    tokio::spawn(reload_certificates(
        cert,
        cfg.cert_reload_interval,
        metrics.clone(),
    ));
    let server = tokio::spawn(serve_https(https, acceptor, shared, cfg.request_timeout));
    ready.store(true, Ordering::Relaxed);
    metrics.ready.set(1);
    shutdown.await;
    ready.store(false, Ordering::Relaxed);
    metrics.ready.set(0);
    info!(delay = ?cfg.shutdown_delay, "not ready; serving until the delay ends");
    tokio::time::sleep(cfg.shutdown_delay).await;
    server.abort();
    info!("stopped");
    Ok(())
}

async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    timeout: std::time::Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(tcp, peer, acceptor, shared, timeout).await;
        });
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
    timeout: std::time::Duration,
) {
    let tls = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.metrics.error(ErrorKind::Tls);
            debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.error(ErrorKind::Tls);
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let svc = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(shared.handle(req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), svc);
    if let Err(e) = conn.await {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Re-reads the certificate files every `every`; a new certificate is used by the next
/// handshake.
async fn reload_certificates(
    cert: Arc<Certificate>,
    every: std::time::Duration,
    metrics: Arc<InjectMetrics>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match cert.reload() {
            Ok(true) => {
                metrics.cert_reloads.inc();
                info!("serving a new certificate");
            }
            Ok(false) => {}
            Err(e) => {
                metrics.cert_reload_errors.inc();
                warn!(error = format!("{e:#}"), "certificate files changed but cannot be loaded; keeping the current certificate");
            }
        }
    }
}

async fn serve_admin(listener: TcpListener, metrics: Arc<InjectMetrics>, ready: Arc<AtomicBool>) {
    use axum::http::header;
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get({
                let m = metrics.clone();
                move || async move {
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        m.render(),
                    )
                }
            }),
        )
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/ready",
            get(move || async move {
                if ready.load(Ordering::Relaxed) {
                    (axum::http::StatusCode::OK, "ready\n")
                } else {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "metrics endpoint stopped");
    }
}
