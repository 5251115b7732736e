//! `nodedns-inject`: a mutating admission webhook that gives pods the node-local DNS config
//! (link-local address first, kube-dns second), as ACK's NodeLocal DNSCache admission controller
//! does. Runs as a Deployment, not on the DaemonSet's nodes' DNS path.
//!
//! - [`config`]: the flags, validated into [`config::InjectConfig`].
//! - [`review`]: the AdmissionReview and Pod fields read and written.
//! - [`rules`]: which pods are injected, the injected config and the merge with a pod's own.
//! - [`patch`]: the JSONPatch and the AdmissionReview response.
//! - [`server`]: HTTPS (rustls) for the API server; /metrics, /health, /ready over plain HTTP.
//! - [`metrics`]: the webhook's Prometheus metrics.
//! - `tls`: the serving certificate, re-read when its files change.

pub mod config;
pub mod metrics;
pub mod patch;
pub mod review;
pub mod rules;
pub mod server;
mod tls;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// Exit status for a configuration error (sysexits EX_CONFIG), as for the DNS server.
const EX_CONFIG: u8 = 78;

/// Runs the webhook with `args` (the first is the program name): parse, validate, serve until
/// SIGTERM/SIGINT.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = config::InjectArgs::parse_from(args);
    let cfg = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nodedns-inject: invalid configuration: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    crate::logging::init(cfg.log_json);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("nodedns-inject")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodedns-inject: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(async {
        let shutdown = crate::app::shutdown_signal();
        server::run(cfg, shutdown).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nodedns-inject: {e:#}");
            ExitCode::FAILURE
        }
    }
}
