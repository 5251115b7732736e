//! The command line: native flags, applied over the file's values.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use super::*;
use crate::node::Firewall;

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
    /// kube-dns Service IPs, at most one per family (comma-separated), that queries to the
    /// node-local address of that family go to while no nodedns listens, or "off" [default: per
    /// family with a node-local listen address, the first cluster DNS IP of that family].
    #[arg(long, value_name = "IP[,IP]|off")]
    pub fail_open_to: Option<String>,
    /// A CoreDNS Corefile (node-local-dns's) to read instead of a TOML file; its
    /// `__PILLAR__` placeholders are filled as node-cache fills them.
    #[arg(long, value_name = "PATH")]
    pub corefile: Option<PathBuf>,
    /// node-cache's Corefile template: read in place of --corefile when it exists.
    #[arg(long, value_name = "PATH")]
    pub base_corefile: Option<PathBuf>,
    /// Service whose `<NAME>_SERVICE_HOST`/`_PORT` environment variables give the cluster DNS
    /// (and fill `__PILLAR__CLUSTER__DNS__`) [default: kube-dns-upstream].
    #[arg(long, value_name = "NAME")]
    pub upstream_svc: Option<String>,
    /// Directory of the kube-dns ConfigMap (`stubDomains`, `upstreamNameservers`).
    #[arg(long, value_name = "DIR")]
    pub kube_dns_config: Option<PathBuf>,
    /// The addresses to serve on, comma separated, port --dns-port (node-cache's -localip);
    /// also fills a Corefile's `__PILLAR__LOCAL__DNS__`.
    #[arg(long, value_name = "IP,IP")]
    pub local_ip: Option<String>,
    /// Port of --local-ip and of Corefile blocks that name none [default: 53].
    #[arg(long, value_name = "PORT")]
    pub dns_port: Option<u16>,
    /// Write the process ID to this file once the configuration is valid; removed at exit.
    #[arg(long, value_name = "PATH")]
    pub pidfile: Option<PathBuf>,
    /// Reload the configuration on SIGUSR1 (node-cache's -reloadwithsignal).
    #[arg(long)]
    pub reload_with_signal: bool,
    /// Set when the command line was node-cache's: its defaults apply (/etc/kube-dns when it
    /// exists, the Corefile template).
    #[arg(long, hide = true)]
    pub node_cache: bool,
    /// node-cache's -health-port: the port of the health rules. nodedns takes it from the
    /// health address it serves; accepted and checked.
    #[arg(long, hide = true, value_name = "PORT")]
    pub health_port: Option<u16>,
    /// node-cache's -metrics-listen-address (its setup-error metrics): nodedns serves those on
    /// the one metrics address; accepted and checked.
    #[arg(long, hide = true, value_name = "ADDR:PORT")]
    pub metrics_listen_address: Option<String>,
    /// Fills a Corefile's `__PROMETHEUS__ENDPOINT__` [default: :9253].
    #[arg(long, hide = true, value_name = "ADDR:PORT")]
    pub prometheus_listen_address: Option<String>,
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
    cfg.reload_with_signal |= a.reload_with_signal;
    Ok(())
}
