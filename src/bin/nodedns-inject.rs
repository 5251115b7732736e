//! The nodedns-inject binary: the pod DNS config admission webhook ([`nodedns::inject`]).
//!
//! A binary of its own rather than a subcommand of `nodedns`: linked into `nodedns` the webhook
//! (rustls, ring, hyper, serde_json) made the DaemonSet's binary 28% larger (26.4 MB to 33.7 MB;
//! stripped 5.1 MB to 6.5 MB), shipped to every node for code that runs in two pods.

use std::process::ExitCode;

fn main() -> ExitCode {
    nodedns::inject::main(std::env::args_os())
}
