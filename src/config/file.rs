//! The configuration file's shape: every key, its type and its default.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::local::config::{HostsSection, RewriteMatch, RewriteSection, TemplateSection};
use crate::node::Firewall;

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
    pub reload: ReloadSection,
    #[serde(rename = "zone")]
    pub zones: Vec<ZoneSection>,
    pub hosts: Vec<HostsSection>,
    pub rewrite: Vec<RewriteSection>,
    pub template: Vec<TemplateSection>,
    /// Reload the configuration on SIGUSR1 as well (node-cache's -reloadwithsignal).
    pub reload_with_signal: bool,
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
            reload: ReloadSection::default(),
            zones: vec![],
            hosts: vec![],
            rewrite: vec![],
            template: vec![],
            reload_with_signal: false,
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
    /// Connected UDP sockets per upstream per thread (0: a fresh socket for every query).
    pub udp_pool_size: usize,
    /// Queries a pooled UDP socket carries before it is replaced by one on a new port.
    pub udp_socket_queries: u32,
    /// Age at which a pooled UDP socket is replaced by one on a new port.
    #[serde(with = "humantime_serde")]
    pub udp_socket_lifetime: Duration,
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
            udp_pool_size: 64,
            udp_socket_queries: 100,
            udp_socket_lifetime: Duration::from_secs(5),
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
    /// "" (the default), "off" or one IP per family, comma-separated; see `Args::fail_open_to`.
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

/// Live reload (SIGHUP, SIGUSR1 and file changes).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadSection {
    /// Reload when a configuration file changes (signals always reload).
    pub watch: bool,
}

impl Default for ReloadSection {
    fn default() -> Self {
        ReloadSection { watch: true }
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
