//! The webhook's Prometheus metrics, on a registry of its own.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use super::rules::Skip;

/// Why a request got no AdmissionReview answer, or a connection no request; the label values of
/// `nodedns_inject_errors_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The TLS handshake failed or timed out.
    Tls,
    /// Not POST /mutate.
    Route,
    /// Content-Type other than application/json.
    ContentType,
    /// Body larger than --max-body-bytes.
    TooLarge,
    /// Body not sent in time or the connection broke while it was read.
    Body,
    /// Not JSON, or not an AdmissionReview.
    Malformed,
    /// An AdmissionReview of another apiVersion than admission.k8s.io/v1.
    ApiVersion,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::Tls,
        ErrorKind::Route,
        ErrorKind::ContentType,
        ErrorKind::TooLarge,
        ErrorKind::Body,
        ErrorKind::Malformed,
        ErrorKind::ApiVersion,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Tls => "tls",
            ErrorKind::Route => "route",
            ErrorKind::ContentType => "content_type",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Body => "body",
            ErrorKind::Malformed => "malformed",
            ErrorKind::ApiVersion => "api_version",
        }
    }
}

/// Handles to every metric, built once.
pub struct InjectMetrics {
    registry: Registry,
    /// AdmissionReview requests answered, by HTTP status code.
    pub requests: IntCounterVec,
    /// Pods patched: `mode` "inject" (no dnsConfig of their own) or "merge".
    pub patches: IntCounterVec,
    /// Pods left unchanged, by [`Skip`] reason.
    pub skipped: IntCounterVec,
    /// Requests refused and failed handshakes, by [`ErrorKind`].
    pub errors: IntCounterVec,
    /// Time from a request's headers to its answer.
    pub duration: Histogram,
    /// Certificates loaded after the first (rotations picked up).
    pub cert_reloads: IntCounter,
    /// Failed attempts to load a changed certificate (the previous one stays in use).
    pub cert_reload_errors: IntCounter,
    /// 1 while /ready answers 200.
    pub ready: IntGauge,
}

impl InjectMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let requests = counter_vec(
            "nodedns_inject_requests_total",
            "Requests to the webhook, by HTTP status code of the answer.",
            "code",
        );
        let patches = counter_vec(
            "nodedns_inject_patches_total",
            "Pods given the node-local DNS config, by mode (inject, merge).",
            "mode",
        );
        let skipped = counter_vec(
            "nodedns_inject_skipped_total",
            "Pods admitted unchanged, by reason.",
            "reason",
        );
        let errors = counter_vec(
            "nodedns_inject_errors_total",
            "Requests refused and failed TLS handshakes, by reason.",
            "reason",
        );
        for m in ["inject", "merge"] {
            patches.with_label_values(&[m]);
        }
        for s in Skip::ALL {
            skipped.with_label_values(&[s.label()]);
        }
        for e in ErrorKind::ALL {
            errors.with_label_values(&[e.label()]);
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "nodedns_inject_request_duration_seconds",
                "Time from a request's headers to its answer.",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(duration.clone()))
            .expect("unique metric");
        let cert_reloads = IntCounter::new(
            "nodedns_inject_certificate_reloads_total",
            "Certificates loaded after the first (rotations picked up).",
        )
        .expect("valid metric");
        let cert_reload_errors = IntCounter::new(
            "nodedns_inject_certificate_reload_errors_total",
            "Changed certificate files that could not be loaded (the previous certificate stays).",
        )
        .expect("valid metric");
        let ready = IntGauge::new("nodedns_inject_ready", "1 while /ready answers 200.")
            .expect("valid metric");
        let build = IntGauge::with_opts(
            Opts::new(
                "nodedns_inject_build_info",
                "nodedns version of the webhook.",
            )
            .const_label("version", env!("CARGO_PKG_VERSION")),
        )
        .expect("valid metric");
        build.set(1);
        for m in [&cert_reloads, &cert_reload_errors] {
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
        }
        registry
            .register(Box::new(ready.clone()))
            .expect("unique metric");
        registry.register(Box::new(build)).expect("unique metric");
        Self {
            registry,
            requests,
            patches,
            skipped,
            errors,
            duration,
            cert_reloads,
            cert_reload_errors,
            ready,
        }
    }

    pub fn error(&self, e: ErrorKind) {
        self.errors.with_label_values(&[e.label()]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for InjectMetrics {
    fn default() -> Self {
        Self::new()
    }
}
