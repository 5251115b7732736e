//! The kube-dns ConfigMap: `stubDomains` and `upstreamNameservers`, JSON files in the directory
//! it is mounted on (`-kubednscm`, or /etc/kube-dns when that exists).
//!
//! node-cache renders them into its Corefile: each stub domain becomes a block
//! `DOMAIN:PORT { errors; cache 30; bind LOCALIPS; forward . SERVERS }` (UDP, 30s TTL caps, no
//! serve-stale), and `upstreamNameservers` replace `__PILLAR__UPSTREAM__SERVERS__` (else
//! /etc/resolv.conf) and are asked over UDP even where the template says `force_tcp`. Here the
//! stub domains become `[[zone]]`s, and the upstream nameservers fill the same placeholder of a
//! Corefile (see `corefile::render`) or, with the TOML file, `upstreams` when it names none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// The ConfigMap's keys node-cache reads; the others (`federations`) are kube-dns's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeDnsConfig {
    /// Where it was read, for error messages.
    pub dir: PathBuf,
    pub stub_domains: BTreeMap<String, Vec<String>>,
    pub upstream_nameservers: Vec<String>,
}

/// node-cache's default ConfigMap directory, used when it exists.
pub const DEFAULT_DIR: &str = "/etc/kube-dns";

/// The ConfigMap's keys read, one file each.
pub const FILES: [&str; 2] = ["stubDomains", "upstreamNameservers"];

/// Reads the directory; a key without its file is empty. A file that is not the expected JSON,
/// or a nameserver that is not IP[:PORT], is an error naming the file.
pub fn read_dir(dir: &Path) -> Result<KubeDnsConfig, ConfigError> {
    let mut kd = KubeDnsConfig {
        dir: dir.to_owned(),
        ..KubeDnsConfig::default()
    };
    let read = |name: &str| -> Result<Option<(PathBuf, String)>, ConfigError> {
        let p = dir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some((p, t))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ConfigError::Read { path: p, source }),
        }
    };
    let parse_err = |p: &Path, message: String| ConfigError::Parse {
        path: p.to_owned(),
        message,
    };
    if let Some((p, text)) = read("stubDomains")? {
        kd.stub_domains = serde_json::from_str(&text).map_err(|e| {
            parse_err(
                &p,
                format!("stubDomains: {e} (write {{\"domain\": [\"IP\", ...]}})"),
            )
        })?;
        for (domain, servers) in &kd.stub_domains {
            zone_name("stubDomains", domain)
                .map_err(|_| parse_err(&p, format!("stubDomains: invalid domain {domain:?}")))?;
            if servers.is_empty() {
                return Err(parse_err(
                    &p,
                    format!("stubDomains: {domain}: no nameservers"),
                ));
            }
            for s in servers {
                nameserver(s).map_err(|m| parse_err(&p, format!("stubDomains: {domain}: {m}")))?;
            }
        }
    }
    if let Some((p, text)) = read("upstreamNameservers")? {
        kd.upstream_nameservers = serde_json::from_str(&text).map_err(|e| {
            parse_err(
                &p,
                format!("upstreamNameservers: {e} (write [\"IP\", ...])"),
            )
        })?;
        if kd.upstream_nameservers.len() > 3 {
            return Err(parse_err(
                &p,
                "upstreamNameservers: at most three entries".into(),
            ));
        }
        for s in &kd.upstream_nameservers {
            nameserver(s).map_err(|m| parse_err(&p, format!("upstreamNameservers: {m}")))?;
        }
    }
    Ok(kd)
}

/// A nameserver as the ConfigMap writes it: IP or IP:PORT (port 53 by default).
fn nameserver(s: &str) -> Result<SocketAddr, String> {
    addr("", s, 53).map_err(|_| format!("{s:?} is not IP[:PORT]"))
}

impl KubeDnsConfig {
    /// Adds the stub domains as `[[zone]]`s, with the settings of node-cache's stub block when
    /// `corefile` is true (30s TTL caps, no serve-stale, UDP). A stub domain that is already a
    /// zone is refused, as CoreDNS refuses two blocks for one zone.
    pub fn apply_stub_domains(
        &self,
        cfg: &mut FileConfig,
        corefile: bool,
    ) -> Result<(), ConfigError> {
        let path = self.dir.join("stubDomains");
        if corefile {
            // Each of node-cache's stub blocks has its own `cache 30` of CoreDNS's default
            // capacity.
            cfg.cache.max_entries += self.stub_domains.len() * 2 * 9984;
        }
        for (domain, servers) in &self.stub_domains {
            let (_, wire) = zone_name("stubDomains", domain)?;
            if cfg
                .zones
                .iter()
                .any(|z| zone_name("", &z.name).is_ok_and(|(_, w)| w == wire))
            {
                return Err(ConfigError::Parse {
                    path: path.clone(),
                    message: format!(
                        "stubDomains: {domain} is already a zone of the configuration"
                    ),
                });
            }
            let upstreams = servers
                .iter()
                .map(|s| nameserver(s).map(|a| a.to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|message| ConfigError::Parse {
                    path: path.clone(),
                    message,
                })?;
            let ttl = corefile.then_some(Duration::from_secs(30));
            cfg.zones.push(ZoneSection {
                name: domain.trim_end_matches('.').to_string(),
                upstreams,
                transport: Transport::PreferUdp,
                success_max_ttl: ttl,
                denial_max_ttl: ttl,
                serve_stale: corefile.then_some(Duration::ZERO),
            });
        }
        Ok(())
    }

    /// With the TOML file (or none): the upstream nameservers replace the resolv.conf default
    /// when the file names no `upstreams`.
    pub fn apply_upstreams(&self, cfg: &mut FileConfig) {
        if cfg.upstreams.is_empty() && !self.upstream_nameservers.is_empty() {
            cfg.upstreams = self
                .upstream_nameservers
                .iter()
                .filter_map(|s| nameserver(s).ok())
                .map(|a| a.to_string())
                .collect();
        }
    }
}
