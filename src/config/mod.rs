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
//! - `validate`: `FileConfig` into `Settings`, section by section.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dns;
use crate::node::NodeConfig;
pub use crate::zones::{Zone, ZoneTable};

mod args;
mod file;
#[cfg(test)]
mod tests;
mod validate;

pub use args::{apply_flags, Args};
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
