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
//!
//! - `args`: the command line and how it overrides the file;
//! - `file`: the file's shape, every key and its default (`FileConfig`);
//! - `validate`: `FileConfig` into `Settings`, section by section;
//! - `corefile`, `corefile_map`, `corefile_plugin`, `corefile_local`: a CoreDNS Corefile (node-local-dns's) as the
//!   source that fills `FileConfig` in place of the TOML file;
//! - `kubedns`: the kube-dns ConfigMap's stub domains and upstream nameservers;
//! - `nodecache`: node-cache's command line, translated into ours.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dns;
use crate::node::NodeConfig;
pub use crate::zones::{Zone, ZoneTable};

mod args;
pub mod corefile;
mod corefile_local;
mod corefile_map;
mod corefile_plugin;
#[cfg(test)]
mod corefile_tests;
pub mod error;
mod file;
pub mod kubedns;
#[cfg(test)]
mod kubedns_tests;
pub mod nodecache;
#[cfg(test)]
mod tests;
mod validate;

pub use args::{apply_flags, Args};
pub(crate) use error::invalid;
pub use error::ConfigError;
pub use file::*;
pub use validate::*;

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
    /// Reload when a configuration file changes (`reload.watch`).
    pub reload_watch: bool,
    /// SIGUSR1 reloads the configuration too (node-cache's -reloadwithsignal).
    pub reload_with_signal: bool,
    /// Hosts entries, templates and rewrite rules, applied to misses before they are forwarded;
    /// immutable, so a reload builds new ones and swaps them in.
    pub local: std::sync::Arc<crate::local::LocalAnswers>,
    /// Warnings to log once logging is up (e.g. no cluster DNS configured).
    pub warnings: Vec<String>,
}

/// Where the defaults that depend on the machine come from; tests substitute their own.
pub struct Environment {
    pub resolv_conf: PathBuf,
    pub kube_dns_upstream: Option<(String, Option<String>)>,
}

/// The Service the cluster DNS is found through when none is given [default of
/// --upstream-svc].
pub const DEFAULT_UPSTREAM_SVC: &str = "kube-dns-upstream";

impl Environment {
    pub fn from_process() -> Self {
        Self::for_service(DEFAULT_UPSTREAM_SVC, &|k| std::env::var(k).ok())
    }

    /// The machine defaults with the cluster DNS taken from Service `svc`'s environment.
    pub fn for_service(svc: &str, getenv: &dyn Fn(&str) -> Option<String>) -> Self {
        Environment {
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            kube_dns_upstream: service_env(svc, getenv),
        }
    }
}

/// The names of a Service's environment variables (`kube-dns-upstream`:
/// `KUBE_DNS_UPSTREAM_SERVICE_HOST`, `_PORT`), as Kubernetes sets them in every pod.
pub fn service_env_names(svc: &str) -> (String, String) {
    let base = svc.replace('-', "_").to_uppercase();
    (
        format!("{base}_SERVICE_HOST"),
        format!("{base}_SERVICE_PORT"),
    )
}

/// A Service's cluster IP and port from the environment.
pub fn service_env(
    svc: &str,
    getenv: &dyn Fn(&str) -> Option<String>,
) -> Option<(String, Option<String>)> {
    let (host, port) = service_env_names(svc);
    getenv(&host)
        .filter(|h| !h.is_empty())
        .map(|h| (h, getenv(&port).filter(|p| !p.is_empty())))
}

/// Reads the configuration source (the TOML file, a Corefile or none), the kube-dns ConfigMap,
/// and applies the flags over them.
pub fn load(args: &Args) -> Result<FileConfig, ConfigError> {
    load_with(
        args,
        &|k| std::env::var(k).ok(),
        Path::new("/etc/resolv.conf"),
    )
}

/// [`load`] with the process environment (`getenv`) and resolv.conf given, for tests.
pub fn load_with(
    args: &Args,
    getenv: &dyn Fn(&str) -> Option<String>,
    resolv_conf: &Path,
) -> Result<FileConfig, ConfigError> {
    let kube_dns = match &args.kube_dns_config {
        Some(dir) => kubedns::read_dir(dir)?,
        None if args.node_cache && Path::new(kubedns::DEFAULT_DIR).is_dir() => {
            kubedns::read_dir(Path::new(kubedns::DEFAULT_DIR))?
        }
        None => kubedns::KubeDnsConfig::default(),
    };
    let dns_port = args.dns_port.unwrap_or(53);
    let local_ips: Vec<String> = match &args.local_ip {
        Some(list) => list
            .split(',')
            .map(|ip| {
                ip.trim()
                    .parse::<IpAddr>()
                    .map(|_| ip.trim().to_string())
                    .map_err(|_| invalid("local_ip", format!("invalid address {ip:?} in {list:?}")))
            })
            .collect::<Result<_, _>>()?,
        None => vec![],
    };
    if let Some(m) = &args.metrics_listen_address {
        addr("metrics_listen_address", m.trim_start_matches(':'), 0)
            .or_else(|_| addr("metrics_listen_address", &format!("0.0.0.0{m}"), 0))?;
    }
    let corefile = corefile_path(args)?;
    let mut cfg = if let Some(path) = &args.config {
        let mut cfg = parse_file(path)?;
        kube_dns.apply_upstreams(&mut cfg);
        cfg
    } else if let Some(path) = &corefile {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let svc = args.upstream_svc.as_deref().unwrap_or(DEFAULT_UPSTREAM_SVC);
        let pillars = corefile::Pillars {
            local_ips: local_ips.clone(),
            // The Service's IP, with its port when that is not 53 (node-cache uses the IP).
            cluster_dns: service_env(svc, getenv).map(|(h, p)| match (h.parse::<IpAddr>(), p) {
                (Ok(ip), Some(p)) if p != "53" => match p.parse::<u16>() {
                    Ok(port) => SocketAddr::new(ip, port).to_string(),
                    Err(_) => h,
                },
                _ => h,
            }),
            cluster_dns_var: service_env_names(svc).0,
            upstream_servers: kube_dns.upstream_nameservers.clone(),
            prometheus: args
                .prometheus_listen_address
                .clone()
                .unwrap_or_else(|| ":9253".into()),
        };
        read_corefile(path, &text, &pillars, dns_port, resolv_conf)?
    } else {
        let mut cfg = FileConfig::default();
        kube_dns.apply_upstreams(&mut cfg);
        cfg
    };
    kube_dns.apply_stub_domains(&mut cfg, args.config.is_none() && corefile.is_some())?;
    if !local_ips.is_empty() {
        let listen: Vec<String> = local_ips
            .iter()
            .map(|ip| SocketAddr::new(ip.parse().unwrap(), dns_port).to_string())
            .collect();
        if args.config.is_none() && corefile.is_some() {
            // node-cache sets up -localip and CoreDNS binds what the Corefile says; nodedns
            // does both with one list, so they must name the same addresses.
            let ips = |v: &[String]| {
                let mut v: Vec<IpAddr> = v
                    .iter()
                    .filter_map(|a| a.parse::<SocketAddr>().ok().map(|s| s.ip()))
                    .collect();
                v.sort();
                v.dedup();
                v
            };
            if ips(&listen) != ips(&cfg.listen) {
                return Err(invalid(
                    "local_ip",
                    format!(
                        "-localip {} and the Corefile's bind ({}) differ; nodedns sets up and \
                         serves one set of addresses",
                        local_ips.join(","),
                        cfg.listen.join(" ")
                    ),
                ));
            }
        } else if args.listen.is_empty() {
            cfg.listen = listen;
        }
    }
    apply_flags(&mut cfg, args)?;
    Ok(cfg)
}

/// The Corefile's text (a template: `pillars` fill its placeholders) as `FileConfig`:
/// `corefile::render`, `corefile::parse`, then the blocks mapped onto the keys. `dns_port`: the port of a block
/// that names none; `resolv_conf`: the file `forward . /etc/resolv.conf` means.
pub fn read_corefile(
    path: &Path,
    text: &str,
    pillars: &corefile::Pillars,
    dns_port: u16,
    resolv_conf: &Path,
) -> Result<FileConfig, ConfigError> {
    let rendered = corefile::render(path, text, pillars)?;
    let blocks = corefile::parse(path, &rendered.text)?;
    corefile_map::map(
        path,
        &blocks,
        &rendered.custom_upstream_lines,
        dns_port,
        resolv_conf,
    )
}

/// The files the configuration is read from (the TOML file or the Corefile, and the kube-dns
/// ConfigMap's files): a change of any of them reloads it.
pub fn watched_files(args: &Args) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = args.config.iter().cloned().collect();
    if let Ok(Some(corefile)) = corefile_path(args) {
        files.push(corefile);
    }
    let kube_dns = match &args.kube_dns_config {
        Some(dir) => Some(dir.clone()),
        None if args.node_cache => Some(PathBuf::from(kubedns::DEFAULT_DIR)),
        None => None,
    };
    if let Some(dir) = kube_dns {
        files.extend(kubedns::FILES.iter().map(|f| dir.join(f)));
    }
    files
}

/// The Corefile to read: node-cache's template (--base-corefile) when it exists, else
/// --corefile. node-cache renders the template into the Corefile and CoreDNS reads that;
/// nodedns renders it in memory and writes nothing.
fn corefile_path(args: &Args) -> Result<Option<PathBuf>, ConfigError> {
    if args.config.is_some() {
        if !args.node_cache && (args.corefile.is_some() || args.base_corefile.is_some()) {
            return Err(invalid(
                "corefile",
                "--config and --corefile are two sources; give one",
            ));
        }
        return Ok(None);
    }
    if let Some(base) = &args.base_corefile {
        if base.is_file() || !args.node_cache {
            return Ok(Some(base.clone()));
        }
    }
    Ok(args.corefile.clone())
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

fn duration(key: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.trim()).map_err(|e| {
        invalid(
            key,
            format!("invalid duration {v:?} ({e}); write e.g. \"5s\""),
        )
    })
}

/// Parses "ADDR:PORT", "ADDR" (port `default_port`) or "[V6]:PORT"; an IPv6 address may carry
/// a zone, by number or by link name ("[fe80::1%eth0]:53").
fn addr(key: &str, v: &str, default_port: u16) -> Result<SocketAddr, ConfigError> {
    let v = v.trim();
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Some((ip, rest)) = v.strip_prefix('[').and_then(|r| r.split_once('%')) {
        if let Some((zone, port)) = rest.split_once(']') {
            let port = match port.strip_prefix(':') {
                Some(p) => p.parse::<u16>().ok(),
                None if port.is_empty() => Some(default_port),
                None => None,
            };
            if let (Ok(ip), Some(port)) = (ip.parse::<std::net::Ipv6Addr>(), port) {
                let scope = if_index(zone).ok_or_else(|| {
                    invalid(key, format!("{v:?}: no link named {zone:?} on this host"))
                })?;
                return Ok(SocketAddr::V6(std::net::SocketAddrV6::new(
                    ip, port, 0, scope,
                )));
            }
        }
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

/// Nameservers listed in a resolv.conf, port 53. An IPv6 nameserver may carry a zone
/// (`fe80::1%eth0` or `%2`, as glibc reads it): it becomes the address's scope id, without which
/// a link-local upstream cannot be reached. One naming a link that does not exist is left out.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some("nameserver"))
                .then(|| it.next())
                .flatten()
        })
        .filter_map(|ns| {
            let (ip, zone) = ns.split_once('%').unwrap_or((ns, ""));
            match ip.parse::<IpAddr>().ok()? {
                IpAddr::V6(v6) if !zone.is_empty() => {
                    let scope = zone.parse::<u32>().ok().or_else(|| if_index(zone))?;
                    Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                        v6, 53, 0, scope,
                    )))
                }
                ip => Some(SocketAddr::new(ip, 53)),
            }
        })
        .collect()
}

/// The index of the link named `name` in this network namespace.
fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
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
