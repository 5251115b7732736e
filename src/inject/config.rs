//! `nodedns-inject` flags, validated into [`InjectConfig`]. A bad value is refused naming the flag.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use super::review::PodDnsConfigOption;
use super::rules::{ExistingDnsConfig, Rules};

/// nodedns-inject: the mutating admission webhook that points pods at the node-local DNS cache.
///
/// Pods created in namespaces labelled node-local-dns-injection=enabled (the webhook
/// configuration's namespaceSelector) whose dnsPolicy gives them the cluster DNS get
/// dnsPolicy None and a dnsConfig naming the node-local address, then kube-dns.
#[derive(Parser, Debug, Clone)]
#[command(name = "nodedns-inject", version)]
pub struct InjectArgs {
    /// HTTPS address the API server calls (POST /mutate).
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:9443")]
    pub listen: String,
    /// Plain-HTTP address of /metrics, /health and /ready.
    #[arg(long, value_name = "ADDR:PORT", default_value = "0.0.0.0:9254")]
    pub metrics: String,
    /// PEM certificate chain the webhook serves (re-read when it changes).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/nodedns-inject/tls/tls.crt"
    )]
    pub tls_cert: PathBuf,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/nodedns-inject/tls/tls.key"
    )]
    pub tls_key: PathBuf,
    /// How often the certificate files are checked for a new certificate.
    #[arg(long, value_name = "DURATION", default_value = "60s")]
    pub cert_reload_interval: String,
    /// The node-local cache's address, listed first (the DaemonSet's link-local listen address).
    #[arg(long, value_name = "IP", default_value = "169.254.20.10")]
    pub local_dns: String,
    /// The kube-dns Service ClusterIP, listed second as the fallback [default: the
    /// KUBE_DNS_SERVICE_HOST kubelet sets for the kube-dns Service of the webhook's namespace].
    #[arg(long, value_name = "IP", env = "KUBE_DNS_SERVICE_HOST")]
    pub kube_dns: Option<String>,
    /// The cluster domain (kubelet --cluster-domain).
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// A search domain after the cluster ones (repeatable) [default: none].
    #[arg(long = "extra-search", value_name = "DOMAIN")]
    pub extra_searches: Vec<String>,
    /// Resolver option ndots.
    #[arg(long, default_value_t = 5)]
    pub ndots: u8,
    /// Resolver option attempts.
    #[arg(long, default_value_t = 2)]
    pub attempts: u8,
    /// Resolver option timeout, in seconds.
    #[arg(long, default_value_t = 2)]
    pub timeout: u8,
    /// A further resolver option, NAME or NAME:VALUE (repeatable) [default: none].
    #[arg(long = "option", value_name = "NAME[:VALUE]")]
    pub extra_options: Vec<String>,
    /// A namespace never injected (repeatable; replaces the default list).
    #[arg(long = "exclude-namespace", value_name = "NAME", default_values_t = ["kube-system".to_string(), "kube-public".to_string()])]
    pub exclude_namespaces: Vec<String>,
    /// Pods with a dnsConfig of their own: merge or skip.
    #[arg(long, value_name = "merge|skip", default_value = "merge")]
    pub existing_dns_config: String,
    /// Largest request body accepted, in bytes (413 beyond).
    #[arg(long, value_name = "BYTES", default_value_t = 3 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Time a client has to send a whole request, and to finish the TLS handshake.
    #[arg(long, value_name = "DURATION", default_value = "10s")]
    pub request_timeout: String,
    /// After SIGTERM, /ready turns 503 and requests are still served this long.
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    pub shutdown_delay: String,
    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: String,
}

/// A refused flag value: the flag and why.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {reason}")]
pub struct FlagError {
    pub flag: &'static str,
    pub reason: String,
}

fn bad(flag: &'static str, reason: impl Into<String>) -> FlagError {
    FlagError {
        flag,
        reason: reason.into(),
    }
}

/// The validated configuration of the webhook.
#[derive(Debug, Clone)]
pub struct InjectConfig {
    pub listen: SocketAddr,
    pub metrics: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub cert_reload_interval: Duration,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_delay: Duration,
    pub log_json: bool,
    pub rules: Rules,
}

fn addr(flag: &'static str, v: &str) -> Result<SocketAddr, FlagError> {
    v.parse()
        .map_err(|e| bad(flag, format!("{v:?} is not an ADDR:PORT ({e})")))
}

fn ip(flag: &'static str, v: &str) -> Result<IpAddr, FlagError> {
    v.parse()
        .map_err(|e| bad(flag, format!("{v:?} is not an IP address ({e})")))
}

fn duration(flag: &'static str, v: &str) -> Result<Duration, FlagError> {
    humantime::parse_duration(v).map_err(|e| bad(flag, format!("{v:?}: {e}")))
}

/// A DNS name of letters, digits, '-' and '.', no empty label, at most 253 characters.
fn domain(flag: &'static str, v: &str) -> Result<String, FlagError> {
    let d = v.trim_end_matches('.');
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(d.to_ascii_lowercase())
    } else {
        Err(bad(flag, format!("{v:?} is not a DNS domain name")))
    }
}

impl InjectArgs {
    /// Validates every flag into an [`InjectConfig`].
    pub fn validate(&self) -> Result<InjectConfig, FlagError> {
        let local_dns = ip("local-dns", &self.local_dns)?;
        let kube_dns =
            match self.kube_dns.as_deref().filter(|v| !v.is_empty()) {
                Some(v) => ip("kube-dns", v)?,
                None => return Err(bad(
                    "kube-dns",
                    "not given and KUBE_DNS_SERVICE_HOST is not set: name the kube-dns Service IP",
                )),
            };
        if local_dns == kube_dns {
            return Err(bad(
                "kube-dns",
                "is the same address as --local-dns; the fallback must be another server",
            ));
        }
        // glibc caps ndots at 15, attempts at 5 and timeout at 30 (resolv.h RES_MAX*).
        let range = |flag, v: u8, lo: u8, hi: u8| {
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(bad(flag, format!("{v} is outside {lo}..={hi}")))
            }
        };
        let mut options = vec![
            PodDnsConfigOption::new(
                "ndots",
                Some(range("ndots", self.ndots, 0, 15)?.to_string()),
            ),
            PodDnsConfigOption::new(
                "attempts",
                Some(range("attempts", self.attempts, 1, 5)?.to_string()),
            ),
            PodDnsConfigOption::new(
                "timeout",
                Some(range("timeout", self.timeout, 1, 30)?.to_string()),
            ),
        ];
        for o in &self.extra_options {
            let (name, value) = match o.split_once(':') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (o.as_str(), None),
            };
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(bad("option", format!("{o:?} is not NAME or NAME:VALUE")));
            }
            match options.iter_mut().find(|x| x.name == name) {
                Some(x) => x.value = value,
                None => options.push(PodDnsConfigOption::new(name, value)),
            }
        }
        let existing = match self.existing_dns_config.as_str() {
            "merge" => ExistingDnsConfig::Merge,
            "skip" => ExistingDnsConfig::Skip,
            other => {
                return Err(bad(
                    "existing-dns-config",
                    format!("{other:?} is not one of \"merge\", \"skip\""),
                ))
            }
        };
        let log_json = match self.log_format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(bad(
                    "log-format",
                    format!("{other:?} is not one of \"text\", \"json\""),
                ))
            }
        };
        if self.max_body_bytes < 4096 {
            return Err(bad("max-body-bytes", "must be at least 4096"));
        }
        let request_timeout = duration("request-timeout", &self.request_timeout)?;
        if request_timeout.is_zero() {
            return Err(bad("request-timeout", "must be more than 0s"));
        }
        let cert_reload_interval = duration("cert-reload-interval", &self.cert_reload_interval)?;
        if cert_reload_interval.is_zero() {
            return Err(bad("cert-reload-interval", "must be more than 0s"));
        }
        let mut extra_searches = Vec::new();
        for s in &self.extra_searches {
            extra_searches.push(domain("extra-search", s)?);
        }
        let mut excluded_namespaces = BTreeSet::new();
        for n in &self.exclude_namespaces {
            excluded_namespaces.insert(n.clone());
        }
        Ok(InjectConfig {
            listen: addr("listen", &self.listen)?,
            metrics: addr("metrics", &self.metrics)?,
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            cert_reload_interval,
            max_body_bytes: self.max_body_bytes,
            request_timeout,
            shutdown_delay: duration("shutdown-delay", &self.shutdown_delay)?,
            log_json,
            rules: Rules {
                local_dns,
                kube_dns,
                cluster_domain: domain("cluster-domain", &self.cluster_domain)?,
                extra_searches,
                options,
                excluded_namespaces,
                existing,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<InjectConfig, FlagError> {
        let mut argv = vec!["nodedns-inject", "--kube-dns=10.96.0.10"];
        argv.extend_from_slice(args);
        InjectArgs::try_parse_from(argv).unwrap().validate()
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.listen, "0.0.0.0:9443".parse().unwrap());
        assert_eq!(c.metrics, "0.0.0.0:9254".parse().unwrap());
        assert_eq!(c.rules.local_dns.to_string(), "169.254.20.10");
        assert_eq!(c.rules.cluster_domain, "cluster.local");
        let opts: Vec<String> = c
            .rules
            .options
            .iter()
            .map(|o| format!("{}:{}", o.name, o.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(opts, ["ndots:5", "attempts:2", "timeout:2"]);
        assert_eq!(
            c.rules.excluded_namespaces.iter().collect::<Vec<_>>(),
            ["kube-public", "kube-system"]
        );
        assert_eq!(c.rules.existing, ExistingDnsConfig::Merge);
        assert_eq!(c.max_body_bytes, 3 * 1024 * 1024);
    }

    #[test]
    fn options_override_and_append() {
        let c = parse(&[
            "--option=ndots:2",
            "--option=edns0",
            "--cluster-domain=Example.ORG.",
        ])
        .unwrap();
        assert_eq!(c.rules.options[0].value.as_deref(), Some("2"));
        assert_eq!(c.rules.options[3].name, "edns0");
        assert_eq!(c.rules.options[3].value, None);
        assert_eq!(c.rules.cluster_domain, "example.org");
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (&["--local-dns=x"][..], "local-dns"),
            (&["--listen=nope"], "listen"),
            (&["--metrics=1.2.3.4"], "metrics"),
            (&["--cluster-domain=a..b"], "cluster-domain"),
            (&["--extra-search=bad domain"], "extra-search"),
            (&["--attempts=0"], "attempts"),
            (&["--timeout=31"], "timeout"),
            (&["--option=:1"], "option"),
            (&["--log-format=xml"], "log-format"),
            (&["--max-body-bytes=10"], "max-body-bytes"),
            (&["--request-timeout=0s"], "request-timeout"),
            (&["--cert-reload-interval=soon"], "cert-reload-interval"),
            (&["--local-dns=10.96.0.10"], "kube-dns"),
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.flag, flag, "{args:?}: {e}");
        }
    }
}
