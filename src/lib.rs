//! nodedns: a node-local DNS cache for Kubernetes, a drop-in replacement for NodeLocal DNSCache.
//!
//! # Layout
//! - [`config`]: flags and the TOML file, validated into [`config::Settings`].
//! - [`app`]: startup and shutdown order: node setup, bind, serve, rules, drain, teardown.
//! - [`server`]: the UDP workers (hot path, and UDP-zone misses on each worker's own runtime) and
//!   the TCP server; [`server::Context`] answers; [`server::run`] serves sockets the caller bound
//!   until a token is cancelled ([`server::Server`]: the same, started and stopped in steps, as
//!   [`app`] does).
//! - [`clock`]: the time the cache and its policies see: the real monotonic clock, or a manual
//!   one a test advances.
//! - [`dns`]: allocation-free query parsing and response walking on the wire.
//! - [`cache`]: the sharded answer cache (arena blocks, FIFO eviction): `cache/mod.rs` the
//!   sharded table, `cache/arena.rs` a shard's arena and handle table, `cache/entry.rs` the entries and the reply renderer, `cache/snapshot.rs` the
//!   warm-restart snapshot (entries to a byte stream or state file and back, verified on load).
//! - [`readslots`]: the shards' lock; a reader writes only to its own thread's slot.
//! - [`zones`]: the forwarding zones and the one routing decision; a miss carries its zone.
//! - [`forward`]: the miss path: upstream ordering and health, coalescing, UDP/TCP upstream
//!   exchanges, caching rules.
//! - [`local`]: answers made on the node (hosts entries, templates, name rewrites), applied to
//!   misses before they are forwarded and cached like upstream answers.
//! - [`metrics`], [`admin`]: Prometheus metrics and the /metrics, /health, /ready endpoints;
//!   `metrics` holds the registry and upstream families, `metrics/worker.rs` the per-worker
//!   counters, `metrics/collector.rs` their scrape-time folding, `metrics/panic.rs` the panic hook.
//! - [`node`]: link-local interface and conntrack-bypass firewall rules.
//! - [`lifecycle`]: the node-wide state directory: instance lease, handover of sockets, cache and
//!   TCP connections to a new instance, warm start from the cache snapshot.
//! - [`logging`]: tracing setup, rate-limited logging and the sampled query log.
//! - [`inject`]: the pod DNS config admission webhook of the `nodedns-inject` binary (not on the
//!   DNS path).
//!
//! See docs/ARCHITECTURE.md for the path of a query.

pub mod admin;
pub mod app;
pub mod cache;
pub mod clock;
pub mod config;
pub mod dns;
pub mod forward;
pub mod inject;
pub mod lifecycle;
pub mod local;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod readslots;
pub mod server;
pub mod zones;
