//! Configuration: command-line flags (clap) over a TOML file (serde), validated into `Settings`.
//!
//! The file holds every setting; a flag given on the command line wins over the file. Unknown
//! keys are errors. Every validation error names the key and the reason, so `--check-config` and
//! a failed start tell the operator exactly what to fix.
//!
//! Durations and enums are typed where serde reads them, so a source other than the TOML file
//! fills the same `FileConfig`. Each section validates itself into its part of `Settings`
//! (`CacheSection::validate` into `CacheSettings`, ...); `FileConfig::validate` composes them
//! and adds what spans sections: upstreams, cluster DNS and the zone table.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::dns;
use crate::node::{Firewall, NodeConfig};
pub use crate::zones::{Zone, ZoneTable};

/// nodedns: a node-local DNS cache for Kubernetes.
#[derive(Parser, Debug, Default, Clone)]
#[command(version, about)]
pub struct Args {
    /// TOML file holding every setting; flags override it.
    #[arg(long, env = "NODEDNS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve DNS on, UDP and TCP (repeatable) [default: 169.254.20.10:53].
    #[arg(long = "listen", value_name = "ADDR:PORT")]
    pub listen: Vec<String>,
    /// CoreDNS (kube-dns-upstream) address for the cluster zones (repeatable)
    /// [default: $KUBE_DNS_UPSTREAM_SERVICE_HOST:$KUBE_DNS_UPSTREAM_SERVICE_PORT].
    #[arg(long = "cluster-dns", value_name = "ADDR:PORT")]
    pub cluster_dns: Vec<String>,
    /// The cluster domain [default: cluster.local].
    #[arg(long)]
    pub cluster_domain: Option<String>,
    /// Resolver for all other names (repeatable) [default: nameservers of /etc/resolv.conf].
    #[arg(long = "upstream", value_name = "ADDR:PORT")]
    pub upstreams: Vec<String>,
    /// UDP worker threads [default: CPUs this process may use].
    #[arg(long)]
    pub workers: Option<usize>,
    /// Validate the configuration, print the effective one and exit.
    #[arg(long)]
    pub check_config: bool,
    /// Prometheus metrics address [default: 0.0.0.0:9253].
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<String>,
    /// Health (/health) and readiness (/ready) address [default: 169.254.20.10:8080].
    #[arg(long, value_name = "ADDR:PORT")]
    pub health: Option<String>,
    /// How long DNS keeps answering after /ready turns 503 on shutdown [default: 5s].
    #[arg(long, value_name = "DURATION")]
    pub lameduck: Option<String>,
    /// Log format: text or json [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Log a sample of queries: the fraction to log, 0 to 1 [default: 0].
    #[arg(long, value_name = "FRACTION")]
    pub query_log: Option<f64>,
    /// Create the link-local interface and add the listen addresses to it.
    #[arg(long)]
    pub setup_interface: bool,
    /// Interface holding the listen addresses [default: nodelocaldns].
    #[arg(long, value_name = "NAME")]
    pub interface_name: Option<String>,
    /// Install the conntrack-bypass firewall rules once serving.
    #[arg(long)]
    pub setup_iptables: bool,
    /// Firewall backend: iptables or nftables [default: iptables].
    #[arg(long, value_name = "BACKEND")]
    pub firewall: Option<String>,
    /// How often the interface and rules are re-checked [default: 60s].
    #[arg(long, value_name = "DURATION")]
    pub sync_interval: Option<String>,
    /// Leave rules and interface in place on exit.
    #[arg(long)]
    pub skip_teardown: bool,
    /// Node-wide state directory (instance lease, handover sockets, cache snapshot; a hostPath
    /// in Kubernetes), or "off" [default: /run/nodedns].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<String>,
    /// How often the cache snapshot is written to the state directory; 0s: only at shutdown
    /// [default: 60s].
    #[arg(long, value_name = "DURATION")]
    pub snapshot_interval: Option<String>,
    /// kube-dns Service IP that queries to the link-local address go to while no nodedns
    /// listens, or "off" [default: the cluster DNS IP when listening on a link-local address].
    #[arg(long, value_name = "IP|off")]
    pub fail_open_to: Option<String>,
}

/// The configuration file, also the effective configuration printed by `--check-config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub listen: Vec<String>,
    pub cluster_domain: String,
    pub cluster_dns: Vec<String>,
    pub upstreams: Vec<String>,
    /// 0 means one per CPU this process may use.
    pub workers: usize,
    pub metrics: String,
    pub health: String,
    #[serde(with = "humantime_serde")]
    pub lameduck: Duration,
    pub log_format: LogFormat,
    pub query_log: f64,
    pub cache: CacheSection,
    pub forward: ForwardSection,
    pub server: ServerSection,
    pub node: NodeSection,
    pub state: StateSection,
    #[serde(rename = "zone")]
    pub zones: Vec<ZoneSection>,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            listen: vec!["169.254.20.10:53".into()],
            cluster_domain: "cluster.local".into(),
            cluster_dns: vec![],
            upstreams: vec![],
            workers: 0,
            metrics: "0.0.0.0:9253".into(),
            health: "169.254.20.10:8080".into(),
            lameduck: Duration::from_secs(5),
            log_format: LogFormat::Text,
            query_log: 0.0,
            cache: CacheSection::default(),
            forward: ForwardSection::default(),
            server: ServerSection::default(),
            node: NodeSection::default(),
            state: StateSection::default(),
            zones: vec![],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    pub max_entries: usize,
    pub max_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub min_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub success_max_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub denial_max_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub cluster_success_max_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub cluster_denial_max_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub servfail_ttl: Duration,
    /// How long past its TTL an answer may still be served when the upstreams fail (RFC 8767);
    /// "0s" turns serve-stale off.
    #[serde(with = "humantime_serde")]
    pub serve_stale: Duration,
    /// TTL of a stale answer.
    #[serde(with = "humantime_serde")]
    pub stale_answer_ttl: Duration,
    /// After a failed refresh, stale answers are served without asking upstream this long.
    #[serde(with = "humantime_serde")]
    pub stale_recheck: Duration,
    /// Uses of an entry in its lifetime (the query that stored it counts as one, hits in the
    /// last `prefetch_percentage` of its TTL as the rest) after which it is refreshed in the
    /// background before it expires; 0 turns prefetch off.
    pub prefetch: u32,
    pub prefetch_percentage: u32,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            max_entries: 100_000,
            max_bytes: 64 << 20,
            min_ttl: Duration::from_secs(5),
            success_max_ttl: Duration::from_secs(30),
            denial_max_ttl: Duration::from_secs(30),
            cluster_success_max_ttl: Duration::from_secs(30),
            cluster_denial_max_ttl: Duration::from_secs(5),
            servfail_ttl: Duration::from_secs(5),
            serve_stale: Duration::from_secs(3600),
            stale_answer_ttl: Duration::from_secs(30),
            stale_recheck: Duration::from_secs(30),
            prefetch: 2,
            prefetch_percentage: 10,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardSection {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    pub tcp_pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    pub max_inflight: usize,
    /// With a stale answer at hand, a client waits this long for a fresh one (RFC 8767's
    /// client response timer).
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// Consecutive failures that mark an upstream down (0: never); a down upstream is probed
    /// every `health_check` and used again as soon as it answers.
    pub max_fails: u32,
    #[serde(with = "humantime_serde")]
    pub health_check: Duration,
}

impl Default for ForwardSection {
    fn default() -> Self {
        ForwardSection {
            timeout: Duration::from_secs(1),
            query_timeout: Duration::from_secs(3),
            tcp_pool_size: 2,
            tcp_idle_timeout: Duration::from_secs(8),
            max_inflight: 4096,
            client_timeout: Duration::from_millis(1800),
            max_fails: 2,
            health_check: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    #[serde(with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    pub tcp_max_connections: usize,
    pub edns_udp_size: u16,
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    pub udp_batch: usize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            tcp_idle_timeout: Duration::from_secs(10),
            tcp_max_connections: 1024,
            edns_udp_size: 1232,
            grace_period: Duration::from_secs(5),
            udp_batch: 32,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    pub setup_interface: bool,
    pub interface_name: String,
    pub setup_iptables: bool,
    pub firewall: Firewall,
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    pub skip_teardown: bool,
    /// "" (the default), "off" or an IP; see `Args::fail_open_to`.
    pub fail_open_to: String,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            setup_interface: false,
            interface_name: "nodelocaldns".into(),
            setup_iptables: false,
            firewall: Firewall::Iptables,
            sync_interval: Duration::from_secs(60),
            skip_teardown: false,
            fail_open_to: String::new(),
        }
    }
}

/// Node-wide state shared by the nodedns instances of one node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSection {
    /// Directory for the instance lease, the handover sockets and the cache snapshot; "off"
    /// runs without (no handover, no warm restart; refused with node setup).
    pub dir: String,
    /// Write the cache snapshot this often ("0s": only at shutdown).
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
    /// Start with the cache of the previous instance (handover or snapshot).
    pub warm_restart: bool,
}

impl Default for StateSection {
    fn default() -> Self {
        StateSection {
            dir: "/run/nodedns".into(),
            snapshot_interval: Duration::from_secs(60),
            warm_restart: true,
        }
    }
}

/// Validated [`StateSection`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateConfig {
    /// None: no state directory.
    pub dir: Option<PathBuf>,
    pub snapshot_interval: Duration,
    pub warm_restart: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneSection {
    pub name: String,
    pub upstreams: Vec<String>,
    #[serde(default)]
    pub transport: Transport,
    #[serde(default, with = "humantime_serde")]
    pub success_max_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub denial_max_ttl: Option<Duration>,
    /// The zone's serve-stale window [default: cache.serve_stale].
    #[serde(default, with = "humantime_serde")]
    pub serve_stale: Option<Duration>,
}

/// How a zone's upstreams are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// UDP only; a truncated answer is relayed truncated.
    Udp,
    /// TCP only, on persistent pipelined connections.
    Tcp,
    /// UDP, retried over TCP when the answer is truncated.
    #[default]
    PreferUdp,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Validated runtime settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<SocketAddr>,
    pub workers: usize,
    /// Zones ordered most specific first; the last is always the root zone ".".
    pub zones: ZoneTable,
    pub metrics: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
    pub lameduck: Duration,
    pub log_json: bool,
    pub query_log: f64,
    pub cache: CacheSettings,
    pub forward: ForwardSettings,
    pub server: ServerSettings,
    pub node: NodeConfig,
    pub state: StateConfig,
    /// Warnings to log once logging is up (e.g. no cluster DNS configured).
    pub warnings: Vec<String>,
}

/// A configuration error: the key and the reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Where the defaults that depend on the machine come from; tests substitute their own.
pub struct Environment {
    pub resolv_conf: PathBuf,
    pub kube_dns_upstream: Option<(String, Option<String>)>,
}

impl Environment {
    pub fn from_process() -> Self {
        Environment {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            kube_dns_upstream: std::env::var("KUBE_DNS_UPSTREAM_SERVICE_HOST")
                .ok()
                .filter(|h| !h.is_empty())
                .map(|h| (h, std::env::var("KUBE_DNS_UPSTREAM_SERVICE_PORT").ok())),
        }
    }
}

/// Reads the file (if any) and applies the flags over it.
pub fn load(args: &Args) -> Result<FileConfig, ConfigError> {
    let mut cfg = match &args.config {
        Some(path) => parse_file(path)?,
        None => FileConfig::default(),
    };
    apply_flags(&mut cfg, args)?;
    Ok(cfg)
}

pub fn parse_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_str(&text).map_err(|message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    })
}

/// Parses the text of a configuration file. A value of the wrong type (a bad duration, an
/// unknown transport...) is reported with its full key, e.g. `cache.min_ttl: TOML parse error
/// at line 2, column 11 ...`, since toml's own message shows only the line.
pub fn parse_str(text: &str) -> Result<FileConfig, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        if key == "." {
            inner.to_string()
        } else {
            format!("{key}: {inner}")
        }
    })
}

/// Applies the flags given over the file's values. A flag's bad value is reported under the
/// file key it sets.
pub fn apply_flags(cfg: &mut FileConfig, a: &Args) -> Result<(), ConfigError> {
    if !a.listen.is_empty() {
        cfg.listen = a.listen.clone();
    }
    if !a.cluster_dns.is_empty() {
        cfg.cluster_dns = a.cluster_dns.clone();
    }
    if !a.upstreams.is_empty() {
        cfg.upstreams = a.upstreams.clone();
    }
    let set = |dst: &mut String, v: &Option<String>| {
        if let Some(v) = v {
            dst.clone_from(v);
        }
    };
    set(&mut cfg.cluster_domain, &a.cluster_domain);
    set(&mut cfg.metrics, &a.metrics);
    set(&mut cfg.health, &a.health);
    set(&mut cfg.node.interface_name, &a.interface_name);
    set(&mut cfg.state.dir, &a.state_dir);
    set(&mut cfg.node.fail_open_to, &a.fail_open_to);
    let set_duration = |dst: &mut Duration, key: &str, v: &Option<String>| {
        if let Some(v) = v {
            *dst = duration(key, v)?;
        }
        Ok::<_, ConfigError>(())
    };
    set_duration(&mut cfg.lameduck, "lameduck", &a.lameduck)?;
    set_duration(
        &mut cfg.node.sync_interval,
        "node.sync_interval",
        &a.sync_interval,
    )?;
    set_duration(
        &mut cfg.state.snapshot_interval,
        "state.snapshot_interval",
        &a.snapshot_interval,
    )?;
    if let Some(v) = &a.log_format {
        cfg.log_format = match v.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "log_format",
                    format!("{other:?} is not one of \"text\", \"json\""),
                ))
            }
        };
    }
    if let Some(v) = &a.firewall {
        cfg.node.firewall = match v.as_str() {
            "iptables" => Firewall::Iptables,
            "nftables" => Firewall::Nftables,
            other => {
                return Err(invalid(
                    "node.firewall",
                    format!("{other:?} is not one of \"iptables\", \"nftables\""),
                ))
            }
        };
    }
    if let Some(w) = a.workers {
        cfg.workers = w;
    }
    if let Some(q) = a.query_log {
        cfg.query_log = q;
    }
    cfg.node.setup_interface |= a.setup_interface;
    cfg.node.setup_iptables |= a.setup_iptables;
    cfg.node.skip_teardown |= a.skip_teardown;
    Ok(())
}

fn duration(key: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.trim()).map_err(|e| {
        invalid(
            key,
            format!("invalid duration {v:?} ({e}); write e.g. \"5s\""),
        )
    })
}

/// Parses "ADDR:PORT", "ADDR" (port `default_port`) or "[V6]:PORT".
fn addr(key: &str, v: &str, default_port: u16) -> Result<SocketAddr, ConfigError> {
    let v = v.trim();
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = v.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, default_port));
    }
    Err(invalid(
        key,
        format!("invalid address {v:?}; write IP:PORT, e.g. 10.96.0.10:53 or [fd00::a]:53"),
    ))
}

fn addrs(key: &str, vs: &[String], default_port: u16) -> Result<Vec<SocketAddr>, ConfigError> {
    vs.iter().map(|v| addr(key, v, default_port)).collect()
}

/// Nameservers listed in a resolv.conf, port 53.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("nameserver"))
                .then(|| it.next())
                .flatten()
        })
        .filter_map(|ns| ns.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn zone_name(key: &str, name: &str) -> Result<(String, Vec<u8>), ConfigError> {
    let wire = dns::name_from_str(name)
        .ok_or_else(|| invalid(key, format!("invalid domain name {name:?}")))?;
    Ok((dns::name_to_string(&wire), wire))
}

/// True when `addr` reaches one of our own listeners (a wildcard listener answers on loopback).
fn is_own(listen: &[SocketAddr], addr: &SocketAddr) -> bool {
    listen.iter().any(|l| {
        l.port() == addr.port()
            && (l.ip() == addr.ip() || (l.ip().is_unspecified() && addr.ip().is_loopback()))
    })
}

/// CPUs this process may use (cgroup quota and affinity aware).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Validated [`CacheSection`]: the cache's size and answer policy.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub max_entries: usize,
    pub max_bytes: usize,
    pub min_ttl: Duration,
    pub servfail_ttl: Duration,
    pub stale_answer_ttl: Duration,
    pub stale_recheck: Duration,
    /// Uses of an entry that qualify it for a refresh before it expires (0: off).
    pub prefetch_hits: u32,
    /// The prefetch window: the last this many percent of an entry's TTL.
    pub prefetch_percentage: u32,
}

/// The zones' TTL caps and serve-stale window from `[cache]`, defaults for every zone.
#[derive(Debug, Clone, Copy)]
struct ZoneDefaults {
    success_max_ttl: Duration,
    denial_max_ttl: Duration,
    cluster_success_max_ttl: Duration,
    cluster_denial_max_ttl: Duration,
    serve_stale: Duration,
}

impl CacheSection {
    fn validate(&self) -> Result<(CacheSettings, ZoneDefaults), ConfigError> {
        if self.max_entries == 0 {
            return Err(invalid("cache.max_entries", "must be at least 1"));
        }
        if self.max_bytes < 64 << 10 {
            return Err(invalid("cache.max_bytes", "must be at least 65536"));
        }
        if self.stale_answer_ttl.is_zero() || self.stale_answer_ttl > Duration::from_secs(300) {
            return Err(invalid(
                "cache.stale_answer_ttl",
                "must be between 1s and 5m (RFC 8767 §4 suggests 30s)",
            ));
        }
        if self.prefetch_percentage == 0 || self.prefetch_percentage > 50 {
            return Err(invalid(
                "cache.prefetch_percentage",
                "must be between 1 and 50",
            ));
        }
        if self.servfail_ttl > Duration::from_secs(300) {
            return Err(invalid(
                "cache.servfail_ttl",
                "must be at most 5m (RFC 2308 §7.1)",
            ));
        }
        let cache = CacheSettings {
            max_entries: self.max_entries,
            max_bytes: self.max_bytes,
            min_ttl: self.min_ttl,
            servfail_ttl: self.servfail_ttl,
            stale_answer_ttl: self.stale_answer_ttl,
            stale_recheck: self.stale_recheck,
            prefetch_hits: self.prefetch,
            prefetch_percentage: self.prefetch_percentage,
        };
        let zones = ZoneDefaults {
            success_max_ttl: self.success_max_ttl,
            denial_max_ttl: self.denial_max_ttl,
            cluster_success_max_ttl: self.cluster_success_max_ttl,
            cluster_denial_max_ttl: self.cluster_denial_max_ttl,
            serve_stale: self.serve_stale,
        };
        Ok((cache, zones))
    }
}

/// Validated [`ForwardSection`]: how upstreams are asked.
#[derive(Debug, Clone)]
pub struct ForwardSettings {
    pub upstream_timeout: Duration,
    pub query_timeout: Duration,
    pub tcp_pool_size: usize,
    pub upstream_tcp_idle: Duration,
    pub max_inflight: usize,
    pub client_timeout: Duration,
    pub max_fails: u32,
    pub health_check: Duration,
}

impl ForwardSection {
    fn validate(&self) -> Result<ForwardSettings, ConfigError> {
        if self.timeout.is_zero() {
            return Err(invalid("forward.timeout", "must be above 0"));
        }
        if self.query_timeout < self.timeout {
            return Err(invalid(
                "forward.query_timeout",
                "must be at least forward.timeout",
            ));
        }
        if self.tcp_pool_size == 0 || self.tcp_pool_size > 64 {
            return Err(invalid("forward.tcp_pool_size", "must be between 1 and 64"));
        }
        if self.max_inflight == 0 {
            return Err(invalid("forward.max_inflight", "must be at least 1"));
        }
        if self.client_timeout.is_zero() {
            return Err(invalid("forward.client_timeout", "must be above 0"));
        }
        if self.health_check < Duration::from_millis(100) {
            return Err(invalid("forward.health_check", "must be at least 100ms"));
        }
        Ok(ForwardSettings {
            upstream_timeout: self.timeout,
            query_timeout: self.query_timeout,
            tcp_pool_size: self.tcp_pool_size,
            upstream_tcp_idle: self.tcp_idle_timeout,
            max_inflight: self.max_inflight,
            client_timeout: self.client_timeout,
            max_fails: self.max_fails,
            health_check: self.health_check,
        })
    }
}

/// Validated [`ServerSection`]: how clients are served.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub tcp_idle_timeout: Duration,
    pub tcp_max_connections: usize,
    pub edns_udp_size: u16,
    pub grace_period: Duration,
    /// Datagrams read per `recvmmsg` by a UDP worker (1: one system call per packet).
    pub udp_batch: usize,
}

impl ServerSection {
    fn validate(&self) -> Result<ServerSettings, ConfigError> {
        if self.tcp_max_connections == 0 {
            return Err(invalid("server.tcp_max_connections", "must be at least 1"));
        }
        if self.udp_batch == 0 || self.udp_batch > 256 {
            return Err(invalid("server.udp_batch", "must be between 1 and 256"));
        }
        if self.edns_udp_size < dns::MIN_UDP_SIZE {
            return Err(invalid("server.edns_udp_size", "must be at least 512"));
        }
        Ok(ServerSettings {
            tcp_idle_timeout: self.tcp_idle_timeout,
            tcp_max_connections: self.tcp_max_connections,
            edns_udp_size: self.edns_udp_size,
            grace_period: self.grace_period,
            udp_batch: self.udp_batch,
        })
    }
}

impl NodeSection {
    /// Where the node's DNS traffic goes while no nodedns listens (None: nowhere, kube-proxy's
    /// own rules then apply).
    fn fail_open_to(
        &self,
        listen: &[SocketAddr],
        cluster_dns: &[SocketAddr],
    ) -> Result<Option<IpAddr>, ConfigError> {
        Ok(match self.fail_open_to.trim() {
            "off" => None,
            // Pods asking a link-local address would be left with no answer while nodedns is
            // down; the cluster DNS (kube-dns-upstream) Service reaches the same CoreDNS.
            "" => listen
                .iter()
                .any(|sa| matches!(sa.ip(), IpAddr::V4(v4) if v4.is_link_local()))
                .then(|| cluster_dns.first().map(|c| c.ip()))
                .flatten(),
            v => {
                let ip = v.parse::<IpAddr>().map_err(|_| {
                    invalid(
                        "node.fail_open_to",
                        format!("{v:?} is not an IP address or \"off\""),
                    )
                })?;
                if ip.is_unspecified() || ip.is_loopback() {
                    return Err(invalid(
                        "node.fail_open_to",
                        format!("{ip} cannot be the kube-dns Service IP"),
                    ));
                }
                Some(ip)
            }
        })
    }

    fn validate(
        &self,
        listen: &[SocketAddr],
        health: Option<SocketAddr>,
        fail_open_to: Option<IpAddr>,
    ) -> Result<NodeConfig, ConfigError> {
        if self.sync_interval < Duration::from_secs(1) {
            return Err(invalid("node.sync_interval", "must be at least 1s"));
        }
        if self.interface_name.is_empty() || self.interface_name.len() > 15 {
            return Err(invalid(
                "node.interface_name",
                "must be 1 to 15 characters (Linux IFNAMSIZ)",
            ));
        }
        Ok(NodeConfig {
            setup_interface: self.setup_interface,
            interface_name: self.interface_name.clone(),
            setup_iptables: self.setup_iptables,
            firewall: self.firewall,
            sync_interval: self.sync_interval,
            skip_teardown: self.skip_teardown,
            listen: listen.to_vec(),
            health_port: health.map(|h| h.port()),
            fail_open_to,
        })
    }
}

impl StateSection {
    fn validate(&self, node: &NodeConfig) -> Result<StateConfig, ConfigError> {
        let dir = match self.dir.trim() {
            "" | "off" => None,
            d if !Path::new(d).is_absolute() => {
                return Err(invalid(
                    "state.dir",
                    format!("{d:?} is not an absolute path"),
                ))
            }
            d => Some(PathBuf::from(d)),
        };
        if dir.is_none() && (node.setup_interface || node.setup_iptables) {
            // Without the node-wide lease one instance's exit would tear down what another
            // instance serves on.
            return Err(invalid(
                "state.dir",
                "must be set when node setup (interface or iptables) is on",
            ));
        }
        Ok(StateConfig {
            dir,
            snapshot_interval: self.snapshot_interval,
            warm_restart: self.warm_restart,
        })
    }
}

impl ZoneSection {
    /// The `i`-th `[[zone]]`, its TTL caps and serve-stale window defaulting to `[cache]`'s.
    fn validate(&self, i: usize, defaults: &ZoneDefaults) -> Result<Zone, ConfigError> {
        let key = format!("zone[{i}]");
        let (name, wire) = zone_name(&format!("{key}.name"), &self.name)?;
        if self.upstreams.is_empty() {
            return Err(invalid(
                format!("{key}.upstreams"),
                "at least one upstream is required",
            ));
        }
        Ok(Zone {
            name,
            wire,
            upstreams: addrs(&format!("{key}.upstreams"), &self.upstreams, 53)?,
            transport: self.transport,
            success_max_ttl: self.success_max_ttl.unwrap_or(defaults.success_max_ttl),
            denial_max_ttl: self.denial_max_ttl.unwrap_or(defaults.denial_max_ttl),
            stale_window: self.serve_stale.unwrap_or(defaults.serve_stale),
        })
    }
}

impl FileConfig {
    /// Validates into runtime settings. `env` supplies the machine-dependent defaults.
    pub fn validate(&self, env: &Environment) -> Result<Settings, ConfigError> {
        let mut warnings = Vec::new();
        if self.listen.is_empty() {
            return Err(invalid("listen", "at least one address is required"));
        }
        let listen = addrs("listen", &self.listen, 53)?;
        let workers = if self.workers == 0 {
            available_cpus()
        } else {
            self.workers
        };
        if workers > 1024 {
            return Err(invalid("workers", "must be at most 1024"));
        }
        let (cache, zone_defaults) = self.cache.validate()?;
        let forward = self.forward.validate()?;
        let server = self.server.validate()?;
        if !(0.0..=1.0).contains(&self.query_log) {
            return Err(invalid("query_log", "must be a fraction between 0 and 1"));
        }
        let metrics = opt_addr("metrics", &self.metrics)?;
        let health = opt_addr("health", &self.health)?;
        let upstreams = self.upstreams(env, &listen)?;
        let cluster_dns = self.cluster_dns(env, &listen)?;
        let fail_open_to = self.node.fail_open_to(&listen, &cluster_dns)?;
        let zones = self.zones(&zone_defaults, upstreams, cluster_dns, &mut warnings)?;
        let node = self.node.validate(&listen, health, fail_open_to)?;
        let state = self.state.validate(&node)?;

        Ok(Settings {
            listen,
            workers,
            zones,
            metrics,
            health,
            lameduck: self.lameduck,
            log_json: self.log_format == LogFormat::Json,
            query_log: self.query_log,
            cache,
            forward,
            server,
            node,
            state,
            warnings,
        })
    }

    /// Upstreams for everything outside the cluster zones: `upstreams`, or the nameservers of
    /// resolv.conf, never one of our own listen addresses.
    fn upstreams(
        &self,
        env: &Environment,
        listen: &[SocketAddr],
    ) -> Result<Vec<SocketAddr>, ConfigError> {
        let upstreams = if self.upstreams.is_empty() {
            let text = std::fs::read_to_string(&env.resolv_conf).unwrap_or_default();
            resolv_conf_nameservers(&text)
        } else {
            addrs("upstreams", &self.upstreams, 53)?
        };
        // Never forward to ourselves.
        let upstreams: Vec<SocketAddr> = upstreams
            .into_iter()
            .filter(|u| !is_own(listen, u))
            .collect();
        if upstreams.is_empty() {
            return Err(invalid(
                "upstreams",
                format!(
                    "no upstream resolvers: none given and {} lists none besides our own listen addresses",
                    env.resolv_conf.display()
                ),
            ));
        }
        Ok(upstreams)
    }

    /// The cluster DNS: `cluster_dns`, or the kube-dns-upstream Service from the environment
    /// (empty when neither is there).
    fn cluster_dns(
        &self,
        env: &Environment,
        listen: &[SocketAddr],
    ) -> Result<Vec<SocketAddr>, ConfigError> {
        let cluster_dns = if self.cluster_dns.is_empty() {
            match &env.kube_dns_upstream {
                Some((host, port)) => {
                    let port = match port {
                        Some(p) => p.parse::<u16>().map_err(|_| {
                            invalid(
                                "cluster_dns",
                                format!("KUBE_DNS_UPSTREAM_SERVICE_PORT={p:?} is not a port"),
                            )
                        })?,
                        None => 53,
                    };
                    vec![addr("cluster_dns", host, port)?]
                }
                None => vec![],
            }
        } else {
            addrs("cluster_dns", &self.cluster_dns, 53)?
        };
        if let Some(own) = cluster_dns.iter().find(|c| is_own(listen, c)) {
            // Transparent mode binds the kube-dns IP: CoreDNS must then be reached through
            // another address (the kube-dns-upstream Service), or we would query ourselves.
            return Err(invalid(
                "cluster_dns",
                format!(
                    "{own} is one of our listen addresses; point it at the kube-dns-upstream \
                     Service, not at the address nodedns serves"
                ),
            ));
        }
        Ok(cluster_dns)
    }

    /// The forwarding zones, most specific first: the cluster zones, the `[[zone]]`s and the
    /// root zone last.
    fn zones(
        &self,
        defaults: &ZoneDefaults,
        upstreams: Vec<SocketAddr>,
        cluster_dns: Vec<SocketAddr>,
        warnings: &mut Vec<String>,
    ) -> Result<ZoneTable, ConfigError> {
        let (cluster_name, cluster_wire) = zone_name("cluster_domain", &self.cluster_domain)?;
        if cluster_wire.len() == 1 {
            return Err(invalid("cluster_domain", "must not be the root"));
        }
        let (cluster_upstreams, cluster_transport) = if cluster_dns.is_empty() {
            warnings.push(format!(
                "no cluster DNS configured (--cluster-dns or KUBE_DNS_UPSTREAM_SERVICE_HOST): \
                 {cluster_name}, in-addr.arpa and ip6.arpa are forwarded to the upstreams"
            ));
            (upstreams.clone(), Transport::PreferUdp)
        } else {
            (cluster_dns, Transport::Tcp)
        };
        let mut zones = Vec::new();
        for (name, wire) in [
            (cluster_name, cluster_wire),
            (
                "in-addr.arpa.".into(),
                dns::name_from_str("in-addr.arpa").unwrap(),
            ),
            ("ip6.arpa.".into(), dns::name_from_str("ip6.arpa").unwrap()),
        ] {
            zones.push(Zone {
                name,
                wire,
                upstreams: cluster_upstreams.clone(),
                transport: cluster_transport,
                success_max_ttl: defaults.cluster_success_max_ttl,
                denial_max_ttl: defaults.cluster_denial_max_ttl,
                stale_window: defaults.serve_stale,
            });
        }
        for (i, z) in self.zones.iter().enumerate() {
            let zone = z.validate(i, defaults)?;
            if let Some(existing) = zones.iter_mut().find(|zn| zn.wire == zone.wire) {
                // A [[zone]] naming a built-in zone overrides its upstreams.
                existing.upstreams = zone.upstreams;
                existing.transport = zone.transport;
                if z.serve_stale.is_some() {
                    existing.stale_window = zone.stale_window;
                }
                continue;
            }
            zones.push(zone);
        }
        zones.push(Zone {
            name: ".".into(),
            wire: vec![0],
            upstreams,
            transport: Transport::PreferUdp,
            success_max_ttl: defaults.success_max_ttl,
            denial_max_ttl: defaults.denial_max_ttl,
            stale_window: defaults.serve_stale,
        });
        Ok(ZoneTable::new(zones))
    }
}

/// An address that may be "off" (or empty): None.
fn opt_addr(key: &str, v: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if v.is_empty() || v == "off" {
        Ok(None)
    } else {
        addr(key, v, 0).map(Some)
    }
}

impl FileConfig {
    /// This configuration with the defaults taken from the machine filled in (upstreams from
    /// resolv.conf, cluster DNS from the Service environment), for `--check-config` to print.
    pub fn resolved(&self, s: &Settings) -> FileConfig {
        let mut out = self.clone();
        let names = |v: &[SocketAddr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        if out.upstreams.is_empty() {
            if let Some(root) = s.zones.iter().find(|z| z.wire == [0]) {
                out.upstreams = names(&root.upstreams);
            }
        }
        if out.cluster_dns.is_empty() {
            if let Some(cl) = s.zones.iter().find(|z| {
                z.transport == Transport::Tcp
                    && z.name.starts_with(out.cluster_domain.trim_end_matches('.'))
            }) {
                out.cluster_dns = names(&cl.upstreams);
            }
        }
        if out.node.fail_open_to.trim().is_empty() {
            out.node.fail_open_to = s
                .node
                .fail_open_to
                .map_or_else(|| "off".to_string(), |ip| ip.to_string());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(resolv: &str) -> (tempfile::TempDir, Environment) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resolv.conf");
        std::fs::write(&p, resolv).unwrap();
        (
            dir,
            Environment {
                resolv_conf: p,
                kube_dns_upstream: None,
            },
        )
    }

    fn err(toml_text: &str) -> String {
        let (_d, e) = env("nameserver 127.0.0.53\n");
        match parse_str(toml_text) {
            Err(e) => e,
            Ok(c) => c.validate(&e).unwrap_err().to_string(),
        }
    }

    #[test]
    fn defaults_come_from_resolv_conf_without_ourselves() {
        let (_d, e) = env("search x\nnameserver 169.254.20.10\nnameserver 127.0.0.53\n");
        let s = FileConfig::default().validate(&e).unwrap();
        assert_eq!(s.listen, vec!["169.254.20.10:53".parse().unwrap()]);
        let root = s.zones.last().unwrap();
        assert_eq!(root.name, ".");
        assert_eq!(root.upstreams, vec!["127.0.0.53:53".parse().unwrap()]);
        assert_eq!(s.warnings.len(), 1, "no cluster DNS warns");
        assert_eq!(
            s.zones[s
                .zones
                .route(&dns::name_from_str("a.svc.cluster.local").unwrap())]
            .name,
            "cluster.local."
        );
        assert_eq!(
            s.zones[s.zones.route(&dns::name_from_str("example.com").unwrap())].name,
            "."
        );
    }

    #[test]
    fn a_wildcard_listener_never_forwards_to_loopback_on_its_port() {
        let c: FileConfig = toml::from_str("listen = [\"0.0.0.0:53\"]").unwrap();
        // Both resolv.conf entries are loopback on port 53: both would be ourselves.
        let (_d, e) = env("nameserver 127.0.0.1\nnameserver 127.0.0.53\n");
        let err = c.validate(&e).unwrap_err().to_string();
        assert!(err.starts_with("upstreams: no upstream resolvers"), "{err}");
        // A resolver elsewhere is kept (validation only: nothing is sent).
        let (_d, e) = env("nameserver 127.0.0.1\nnameserver 10.0.0.2\n");
        let s = c.validate(&e).unwrap();
        assert_eq!(
            s.zones.last().unwrap().upstreams,
            vec!["10.0.0.2:53".parse().unwrap()]
        );
    }

    #[test]
    fn kube_dns_upstream_env_is_the_cluster_default() {
        let (_d, mut e) = env("nameserver 127.0.0.53\n");
        e.kube_dns_upstream = Some(("10.96.0.11".into(), Some("5353".into())));
        let s = FileConfig::default().validate(&e).unwrap();
        let z = &s.zones[s
            .zones
            .route(&dns::name_from_str("1.0.96.10.in-addr.arpa").unwrap())];
        assert_eq!(z.upstreams, vec!["10.96.0.11:5353".parse().unwrap()]);
        assert_eq!(z.transport, Transport::Tcp);
        assert_eq!(z.denial_max_ttl, Duration::from_secs(5));
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn fail_open_defaults_to_the_cluster_dns_on_the_link_local_address() {
        let (_d, mut e) = env("nameserver 127.0.0.53\n");
        e.kube_dns_upstream = Some(("10.96.0.11".into(), None));
        let s = FileConfig::default().validate(&e).unwrap();
        assert_eq!(s.node.fail_open_to, Some("10.96.0.11".parse().unwrap()));
        // Not on a link-local address (e.g. only the kube-dns IP): kube-proxy is the fallback.
        let c: FileConfig = toml::from_str("listen = [\"10.96.0.10:53\"]").unwrap();
        assert_eq!(c.validate(&e).unwrap().node.fail_open_to, None);
        // No cluster DNS: nothing to default to.
        e.kube_dns_upstream = None;
        let s = FileConfig::default().validate(&e).unwrap();
        assert_eq!(s.node.fail_open_to, None);
        let c: FileConfig = toml::from_str("[node]\nfail_open_to = \"10.96.0.10\"").unwrap();
        let s = c.validate(&e).unwrap();
        assert_eq!(s.node.fail_open_to, Some("10.96.0.10".parse().unwrap()));
        let mut c = FileConfig::default();
        apply_flags(
            &mut c,
            &Args::parse_from(["nodedns", "--fail-open-to", "off"]),
        )
        .unwrap();
        e.kube_dns_upstream = Some(("10.96.0.11".into(), None));
        assert_eq!(c.validate(&e).unwrap().node.fail_open_to, None);
        assert!(err("[node]\nfail_open_to = \"kube-dns\"").starts_with("node.fail_open_to:"));
        assert!(err("[node]\nfail_open_to = \"0.0.0.0\"").starts_with("node.fail_open_to:"));
    }

    #[test]
    fn stub_zone_longest_suffix_wins() {
        let (_d, e) = env("nameserver 127.0.0.53\n");
        let c: FileConfig = toml::from_str(
            "[[zone]]\nname = \"corp.example\"\nupstreams = [\"127.0.0.9\"]\ntransport = \"tcp\"\n\
             [[zone]]\nname = \"a.corp.example.\"\nupstreams = [\"127.0.0.10:5300\"]\n",
        )
        .unwrap();
        let s = c.validate(&e).unwrap();
        let z = &s.zones[s
            .zones
            .route(&dns::name_from_str("x.a.corp.example").unwrap())];
        assert_eq!(z.upstreams, vec!["127.0.0.10:5300".parse().unwrap()]);
        let z = &s.zones[s
            .zones
            .route(&dns::name_from_str("b.corp.example").unwrap())];
        assert_eq!(z.transport, Transport::Tcp);
    }

    #[test]
    fn errors_name_the_key_and_reason() {
        assert!(err("bogus = 1").contains("unknown field `bogus`"));
        let e = err("[cache]\nmin_ttl = \"5x\"");
        assert!(
            e.starts_with("cache.min_ttl: TOML parse error at line 2"),
            "{e}"
        );
        assert!(e.contains("\"5x\", expected a duration"), "{e}");
        assert!(err("listen = [\"nope\"]").starts_with("listen: invalid address"));
        assert!(
            err("[[zone]]\nname = \"a\"\nupstreams = [\"127.0.0.1\"]\ntransport = \"quic\"")
                .starts_with("zone[0].transport:")
        );
        assert!(err("[node]\nfirewall = \"pf\"").starts_with("node.firewall:"));
        assert!(err("log_format = \"xml\"").starts_with("log_format:"));
        // Flags are checked under the key they set.
        let mut c = FileConfig::default();
        let bad = |flag: &str, v: &str| {
            apply_flags(&mut c.clone(), &Args::parse_from(["nodedns", flag, v]))
                .unwrap_err()
                .to_string()
        };
        assert!(bad("--lameduck", "5x").starts_with("lameduck: invalid duration"));
        assert!(bad("--sync-interval", "x").starts_with("node.sync_interval: invalid duration"));
        assert!(bad("--firewall", "pf").starts_with("node.firewall:"));
        assert!(bad("--log-format", "xml").starts_with("log_format:"));
        let a = Args::parse_from([
            "nodedns",
            "--snapshot-interval",
            "0s",
            "--firewall",
            "nftables",
        ]);
        apply_flags(&mut c, &a).unwrap();
        assert_eq!(c.state.snapshot_interval, Duration::ZERO);
        assert_eq!(c.node.firewall, Firewall::Nftables);
        assert!(err("[cache]\nservfail_ttl = \"1h\"").contains("RFC 2308"));
        assert!(
            err("listen = [\"10.96.0.10:53\"]\ncluster_dns = [\"10.96.0.10\"]")
                .starts_with("cluster_dns: 10.96.0.10:53 is one of our listen addresses")
        );
    }

    #[test]
    fn flags_override_the_file() {
        let mut c: FileConfig = toml::from_str("listen = [\"127.0.0.1:53\"]\nworkers = 3").unwrap();
        let a = Args::parse_from(["nodedns", "--listen", "127.0.0.2:5353", "--workers", "1"]);
        apply_flags(&mut c, &a).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.2:5353"]);
        assert_eq!(c.workers, 1);
    }

    #[test]
    fn check_config_prints_machine_defaults_resolved() {
        let (_d, mut e) = env("nameserver 127.0.0.53\n");
        e.kube_dns_upstream = Some(("10.96.0.11".into(), None));
        let f = FileConfig::default();
        let r = f.resolved(&f.validate(&e).unwrap());
        assert_eq!(r.upstreams, vec!["127.0.0.53:53"]);
        assert_eq!(r.cluster_dns, vec!["10.96.0.11:53"]);
        assert_eq!(r.node.fail_open_to, "10.96.0.11");
        e.kube_dns_upstream = None;
        assert_eq!(
            f.resolved(&f.validate(&e).unwrap()).node.fail_open_to,
            "off"
        );
    }

    #[test]
    fn effective_config_round_trips() {
        let text = toml::to_string(&FileConfig::default()).unwrap();
        let back: FileConfig = toml::from_str(&text).unwrap();
        assert_eq!(toml::to_string(&back).unwrap(), text);
    }
}
