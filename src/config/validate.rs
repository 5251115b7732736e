//! Validation: each section into its part of `Settings`, then what spans sections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::local::LocalAnswers;
use crate::node::{is_node_local, NodeConfig};

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
    /// The UDP socket pool (`size` 0: a fresh socket per query).
    pub udp_pool: crate::forward::UdpPoolLimits,
}

/// Fewer pooled sockets than this would leave an attacker who learnt every pooled port less than
/// 6 bits of port to guess per query.
pub const MIN_UDP_POOL: usize = 64;

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
        if self.udp_pool_size != 0 && !(MIN_UDP_POOL..=4096).contains(&self.udp_pool_size) {
            return Err(invalid(
                "forward.udp_pool_size",
                "must be 0 (a fresh socket per query) or between 64 and 4096 (fewer sockets leave \
                 less than 6 bits of source port to guess)",
            ));
        }
        if self.udp_socket_queries == 0 {
            return Err(invalid("forward.udp_socket_queries", "must be at least 1"));
        }
        if self.udp_socket_lifetime < Duration::from_millis(100)
            || self.udp_socket_lifetime > Duration::from_secs(3600)
        {
            return Err(invalid(
                "forward.udp_socket_lifetime",
                "must be between 100ms and 1h",
            ));
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
            udp_pool: crate::forward::UdpPoolLimits {
                size: self.udp_pool_size,
                queries: self.udp_socket_queries,
                lifetime: self.udp_socket_lifetime,
            },
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
    /// Where the node's DNS traffic goes while no nodedns listens, at most one IP per family
    /// (empty: nowhere, kube-proxy's own rules then apply). Unset, each family with a node-local
    /// listen address (169.254.0.0/16; fe80::/10 or fd00::/8) gets the first cluster DNS IP of
    /// that family.
    fn fail_open_to(
        &self,
        listen: &[SocketAddr],
        cluster_dns: &[SocketAddr],
    ) -> Result<Vec<IpAddr>, ConfigError> {
        const KEY: &str = "node.fail_open_to";
        match self.fail_open_to.trim() {
            "off" => Ok(Vec::new()),
            // Pods asking a node-local address would be left with no answer while nodedns is
            // down; the cluster DNS (kube-dns-upstream) Service reaches the same CoreDNS.
            "" => Ok([true, false]
                .into_iter()
                .filter(|&v4| {
                    listen
                        .iter()
                        .any(|sa| sa.is_ipv4() == v4 && is_node_local(&sa.ip()))
                })
                .filter_map(|v4| {
                    cluster_dns
                        .iter()
                        .map(SocketAddr::ip)
                        .find(|ip| ip.is_ipv4() == v4)
                })
                .collect()),
            list => {
                let mut out: Vec<IpAddr> = Vec::new();
                for v in list.split(',').map(str::trim) {
                    let ip = v.parse::<IpAddr>().map_err(|_| {
                        invalid(
                            KEY,
                            format!(
                                "{v:?} is not an IP address; write \"off\" or one IP per \
                                 family, comma-separated, e.g. \"10.96.0.10,fd00:10:96::a\""
                            ),
                        )
                    })?;
                    if ip.is_unspecified() || ip.is_loopback() {
                        return Err(invalid(
                            KEY,
                            format!("{ip} cannot be the kube-dns Service IP"),
                        ));
                    }
                    if let Some(other) = out.iter().find(|o| o.is_ipv4() == ip.is_ipv4()) {
                        return Err(invalid(
                            KEY,
                            format!(
                                "{other} and {ip} are of the same IP family; give at most one \
                                 IPv4 and one IPv6 address"
                            ),
                        ));
                    }
                    out.push(ip);
                }
                Ok(out)
            }
        }
    }

    fn validate(
        &self,
        listen: &[SocketAddr],
        health: Option<SocketAddr>,
        fail_open_to: Vec<IpAddr>,
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
            slot: 0,
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
        let zones = self.zones(
            &zone_defaults,
            upstreams,
            cluster_dns,
            &listen,
            &mut warnings,
        )?;
        let node = self.node.validate(&listen, health, fail_open_to)?;
        let state = self.state.validate(&node)?;
        let local = LocalAnswers::build(&self.hosts, &self.rewrite, &self.template)?;

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
            reload_watch: self.reload.watch,
            reload_with_signal: self.reload_with_signal,
            local: Arc::new(local),
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
        listen: &[SocketAddr],
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
                slot: 0,
            });
        }
        zones.push(Zone {
            name: ".".into(),
            wire: vec![0],
            upstreams,
            transport: Transport::PreferUdp,
            success_max_ttl: defaults.success_max_ttl,
            denial_max_ttl: defaults.denial_max_ttl,
            stale_window: defaults.serve_stale,
            slot: 0,
        });
        for (i, z) in self.zones.iter().enumerate() {
            let zone = z.validate(i, defaults)?;
            // A zone forwarded to our own listener would loop, as `cluster_dns` would.
            if let Some(own) = zone.upstreams.iter().find(|u| is_own(listen, u)) {
                return Err(invalid(
                    format!("zone[{i}].upstreams"),
                    format!("{own} is one of our listen addresses; nodedns would query itself"),
                ));
            }
            if let Some(existing) = zones.iter_mut().find(|zn| zn.wire == zone.wire) {
                // A [[zone]] naming a built-in zone (the cluster zones, ".") overrides its
                // upstreams and transport, and the TTL caps and window it gives.
                existing.upstreams = zone.upstreams;
                existing.transport = zone.transport;
                if z.serve_stale.is_some() {
                    existing.stale_window = zone.stale_window;
                }
                if z.success_max_ttl.is_some() {
                    existing.success_max_ttl = zone.success_max_ttl;
                }
                if z.denial_max_ttl.is_some() {
                    existing.denial_max_ttl = zone.denial_max_ttl;
                }
                continue;
            }
            zones.push(zone);
        }
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
            out.node.fail_open_to = if s.node.fail_open_to.is_empty() {
                "off".to_string()
            } else {
                let ips: Vec<String> = s.node.fail_open_to.iter().map(IpAddr::to_string).collect();
                ips.join(",")
            };
        }
        out
    }
}
