//! The integration tests, one binary: the harness is compiled and linked once, not once per test
//! file. Each module was a test binary of its own; run one with
//! `cargo test --test integration lifecycle::`.
//!
//! Tests of every module share this process and run in parallel, so nothing here may rely on
//! process-wide state: loopback ports are picked by the kernel, each network namespace is named
//! `nodedns-t-<pid>-<tag>` with a tag unique across all modules (see `common::netns`), and no test
//! changes the environment or the current directory.

// First, so that the harness macros (`require!`, `netns!`, `cluster!`) are in scope below.
#[macro_use]
mod common;

mod conformance;
mod core;
mod dropin;
mod handover_netns;
mod inject;
mod lifecycle;
mod local_answers;
mod node_dualstack;
mod node_failopen;
mod node_netns;
mod observability;
mod panic_contained;
mod real_servers;
mod reload;
mod reply_flags;
mod resilience;
mod tcp_pressure;
mod udp_pool;
mod upstreams;
