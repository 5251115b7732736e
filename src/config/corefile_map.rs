//! Corefile server blocks onto `FileConfig`.
//!
//! One nodedns serves every zone from one set of listeners and one cache, where CoreDNS runs a
//! server (and a cache) per block. So:
//! - every block must bind the same addresses on the same port: they become `listen`;
//! - each block's zones become a `[[zone]]` with the block's `forward` targets, transport,
//!   `cache` TTL caps and `serve_stale` window; the `.` block gives `upstreams` and the
//!   `[cache]` defaults; the first block that is neither `.` nor a reverse zone is the cluster
//!   domain (node-local-dns's template puts it first) and gives `cluster_domain`,
//!   `cluster_dns` and the cluster TTL caps;
//! - the blocks' cache capacities add up to `cache.max_entries`, and settings nodedns holds
//!   once (`prefetch`, `max_fails`, `health`, ...) must agree between blocks.
//!
//! A plugin or option that is not mapped is refused naming its line.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use super::corefile::{parse_error, ServerBlock};
use super::*;

use super::corefile_plugin::{
    cache_plugin, dur, extra, forward_plugin, listen_addr, no_block, unsupported_option, BlockZone,
    Once,
};

/// Reads the blocks into `FileConfig`. `custom_upstream_lines`: the `forward` lines whose
/// targets the kube-dns ConfigMap's `upstreamNameservers` filled (node-cache asks those over
/// UDP even when the template says `force_tcp`). `dns_port`: the port of a key without one.
/// `resolv_conf`: the file `forward . /etc/resolv.conf` means (the machine's).
pub fn map(
    path: &Path,
    blocks: &[ServerBlock],
    custom_upstream_lines: &[usize],
    dns_port: u16,
    resolv_conf: &Path,
) -> Result<FileConfig, ConfigError> {
    let mut cfg = FileConfig {
        // Without a `health` or `prometheus` plugin CoreDNS serves neither.
        health: "off".into(),
        metrics: "off".into(),
        ..FileConfig::default()
    };
    let mut listen: Once<Vec<String>> = Once::new("bind");
    let mut health = Once::new("health");
    let mut lameduck = Once::new("health lameduck");
    let mut metrics = Once::new("prometheus");
    let mut min_ttl = Once::new("cache min TTL");
    let mut prefetch = Once::new("cache prefetch");
    let mut servfail = Once::new("cache servfail");
    let mut max_fails = Once::new("forward max_fails");
    let mut expire = Once::new("forward expire");
    let mut health_check = Once::new("forward health_check");
    let mut max_concurrent = Once::new("forward max_concurrent");
    let mut capacity = 0usize;
    let mut any_cache = false;
    let mut cluster_seen = false;
    let mut query_log = false;
    let mut seen: Vec<(String, usize)> = Vec::new();

    for b in blocks {
        let mut port = None;
        let mut zones = Vec::new();
        for k in &b.keys {
            let (zone, p) = key(path, b.line, k, dns_port)?;
            if port.is_some_and(|q| q != p) {
                return Err(parse_error(
                    path,
                    b.line,
                    "keys of one block on different ports",
                ));
            }
            port = Some(p);
            zones.push(zone);
        }
        let port = port.unwrap_or(dns_port);
        let mut bind: Option<Vec<String>> = None;
        let mut bind_line = b.line;
        let mut zone: Option<BlockZone> = None;
        let mut cache: Option<(Duration, Duration)> = None;
        let mut stale = Duration::ZERO;
        for d in &b.directives {
            match d.name.as_str() {
                "bind" => {
                    if d.args.is_empty() || !d.block.is_empty() {
                        return Err(parse_error(
                            path,
                            d.line,
                            "bind: give one or more addresses",
                        ));
                    }
                    let mut v = Vec::new();
                    for a in &d.args {
                        let ip: IpAddr = a.parse().map_err(|_| {
                            parse_error(
                                path,
                                d.line,
                                format!("bind: {a:?} is not an IP address (interface names are not supported)"),
                            )
                        })?;
                        v.push(SocketAddr::new(ip, port).to_string());
                    }
                    bind = Some(v);
                    bind_line = d.line;
                }
                "cache" => {
                    let c = cache_plugin(path, d, &mut min_ttl, &mut prefetch, &mut servfail)?;
                    capacity += c.capacity;
                    any_cache = true;
                    cache = Some((c.success_ttl, c.denial_ttl));
                    stale = c.serve_stale;
                }
                "forward" => {
                    let custom = custom_upstream_lines.contains(&d.line);
                    zone = Some(forward_plugin(
                        path,
                        d,
                        custom,
                        &mut max_fails,
                        &mut expire,
                        &mut health_check,
                        &mut max_concurrent,
                    )?);
                }
                "health" => {
                    let a = match d.args.as_slice() {
                        [] => ":8080",
                        [a] => a.as_str(),
                        _ => return Err(extra(path, d, "health")),
                    };
                    health.set(path, d.line, listen_addr(path, d.line, "health", a)?)?;
                    for o in &d.block {
                        match (o.name.as_str(), o.args.as_slice()) {
                            ("lameduck", [v]) => {
                                lameduck.set(path, o.line, dur(path, o.line, "lameduck", v)?)?
                            }
                            _ => return Err(unsupported_option(path, o, "health")),
                        }
                    }
                }
                "prometheus" => {
                    let a = match d.args.as_slice() {
                        [] => "localhost:9153",
                        [a] => a.as_str(),
                        _ => return Err(extra(path, d, "prometheus")),
                    };
                    no_block(path, d)?;
                    metrics.set(path, d.line, listen_addr(path, d.line, "prometheus", a)?)?;
                }
                // Accepted without effect: nodedns logs every upstream failure itself
                // (rate limited) and counts errors in its metrics, which is what `errors`
                // adds to CoreDNS. `consolidate` (one log line for repeated errors) is what
                // the rate limit already does.
                "errors" => {
                    if !d.args.is_empty() {
                        return Err(extra(path, d, "errors"));
                    }
                    for o in &d.block {
                        match (o.name.as_str(), o.args.len()) {
                            ("consolidate", 2 | 3) => {
                                dur(path, o.line, "consolidate", &o.args[0])?;
                            }
                            _ => return Err(unsupported_option(path, o, "errors")),
                        }
                    }
                }
                // Accepted without effect: the configuration is read again when its file
                // changes (and on SIGHUP), so a polling interval has no use.
                "reload" => {
                    if d.args.len() > 2 {
                        return Err(extra(path, d, "reload"));
                    }
                    for a in &d.args {
                        dur(path, d.line, "reload", a)?;
                    }
                    no_block(path, d)?
                }
                // Accepted without effect: CoreDNS's `loop` sends a probe query at start and
                // exits when it comes back; nodedns refuses any upstream that is one of its
                // own listen addresses when it reads the configuration, the loop
                // node-local-dns meets (a node resolv.conf naming the local cache).
                "loop" => {
                    if !d.args.is_empty() {
                        return Err(extra(path, d, "loop"));
                    }
                    no_block(path, d)?;
                }
                // `log` without arguments logs every query; nodedns has one query log for
                // all zones.
                "log" => {
                    if !d.args.is_empty() {
                        return Err(extra(path, d, "log"));
                    }
                    no_block(path, d)?;
                    query_log = true;
                }
                "hosts" => cfg
                    .hosts
                    .push(super::corefile_local::hosts(path, d, &zones)?),
                "template" => cfg
                    .template
                    .push(super::corefile_local::template(path, d, &zones)?),
                "rewrite" => cfg.rewrite.push(super::corefile_local::rewrite(path, d)?),
                other => {
                    return Err(parse_error(
                        path,
                        d.line,
                        format!("plugin {other:?} is not supported"),
                    ))
                }
            }
        }
        let Some(mut z) = zone else {
            return Err(parse_error(
                path,
                b.line,
                format!(
                    "server block {} has no forward; nodedns forwards every zone it serves",
                    b.keys.join(" ")
                ),
            ));
        };
        // Without `cache` CoreDNS does not cache the zone: TTL caps of 0s.
        let (s, n) = cache.unwrap_or((Duration::ZERO, Duration::ZERO));
        z.success_max_ttl = s;
        z.denial_max_ttl = n;
        z.serve_stale = stale;
        // Without `bind` CoreDNS listens on every address.
        let bind = bind.unwrap_or_else(|| vec![format!("0.0.0.0:{port}"), format!("[::]:{port}")]);
        listen.set(path, bind_line, bind)?;
        for name in zones {
            if let Some((_, at)) = seen.iter().find(|(n, _)| *n == name) {
                return Err(parse_error(
                    path,
                    b.line,
                    format!("zone {name} is already served by the block on line {at}"),
                ));
            }
            seen.push((name.clone(), b.line));
            let reverse = name.ends_with("in-addr.arpa") || name.ends_with("ip6.arpa");
            if name == "." {
                cfg.cache.success_max_ttl = z.success_max_ttl;
                cfg.cache.denial_max_ttl = z.denial_max_ttl;
                cfg.cache.serve_stale = z.serve_stale;
                if !z.from_resolv_conf {
                    cfg.upstreams = z.upstreams.clone();
                }
                if z.transport != Transport::PreferUdp {
                    cfg.zones
                        .push(zone_section(".", &z, path, b.line, resolv_conf)?);
                }
                continue;
            }
            if !reverse && !cluster_seen {
                cluster_seen = true;
                cfg.cluster_domain = name.clone();
                cfg.cluster_dns = z.upstreams.clone();
                cfg.cache.cluster_success_max_ttl = z.success_max_ttl;
                cfg.cache.cluster_denial_max_ttl = z.denial_max_ttl;
            }
            cfg.zones
                .push(zone_section(&name, &z, path, b.line, resolv_conf)?);
        }
    }
    if let Some(l) = listen.get() {
        cfg.listen = l;
    }
    if let Some(h) = health.get() {
        cfg.health = h;
    }
    if let Some(l) = lameduck.get() {
        cfg.lameduck = l;
    }
    if let Some(m) = metrics.get() {
        cfg.metrics = m;
    }
    if any_cache {
        cfg.cache.max_entries = capacity.max(1);
    }
    cfg.cache.min_ttl = min_ttl.get().unwrap_or(Duration::from_secs(5));
    // CoreDNS prefetches only where `prefetch` is given.
    let (amount, pct) = prefetch.get().unwrap_or((0, 10));
    cfg.cache.prefetch = amount;
    cfg.cache.prefetch_percentage = pct;
    if let Some(s) = servfail.get() {
        cfg.cache.servfail_ttl = s;
    }
    if let Some(m) = max_fails.get() {
        cfg.forward.max_fails = m;
    }
    if let Some(e) = expire.get() {
        cfg.forward.tcp_idle_timeout = e;
    }
    if let Some(h) = health_check.get() {
        cfg.forward.health_check = h;
    }
    if let Some(m) = max_concurrent.get() {
        cfg.forward.max_inflight = m;
    }
    if query_log {
        cfg.query_log = 1.0;
    }
    Ok(cfg)
}

fn zone_section(
    name: &str,
    z: &BlockZone,
    path: &Path,
    line: usize,
    resolv_conf: &Path,
) -> Result<ZoneSection, ConfigError> {
    let upstreams = if z.from_resolv_conf {
        // A zone asked of the resolv.conf nameservers with its own settings: read them now.
        let text = std::fs::read_to_string(resolv_conf).unwrap_or_default();
        resolv_conf_nameservers(&text)
            .iter()
            .map(|a| a.to_string())
            .collect()
    } else {
        z.upstreams.clone()
    };
    if upstreams.is_empty() {
        return Err(parse_error(path, line, format!("{name}: no upstreams")));
    }
    Ok(ZoneSection {
        name: name.to_string(),
        upstreams,
        transport: z.transport,
        success_max_ttl: Some(z.success_max_ttl),
        denial_max_ttl: Some(z.denial_max_ttl),
        serve_stale: Some(z.serve_stale),
    })
}

/// A server block key: `[dns://]ZONE[:PORT]`.
fn key(path: &Path, line: usize, k: &str, dns_port: u16) -> Result<(String, u16), ConfigError> {
    let rest = match k.split_once("://") {
        Some(("dns", r)) => r,
        Some((scheme, _)) => {
            return Err(parse_error(
                path,
                line,
                format!("{k:?}: {scheme}:// servers are not supported"),
            ))
        }
        None => k,
    };
    let (zone, port) = match rest.rsplit_once(':') {
        Some((z, p)) => (
            z,
            p.parse::<u16>()
                .map_err(|_| parse_error(path, line, format!("{k:?}: invalid port")))?,
        ),
        None => (rest, dns_port),
    };
    if zone.contains('/') {
        return Err(parse_error(
            path,
            line,
            format!("{k:?}: network (CIDR) zones are not supported"),
        ));
    }
    let (name, _) = zone_name(&format!("line {line}"), zone)
        .map_err(|e| parse_error(path, line, e.to_string()))?;
    let name = if name == "." {
        name
    } else {
        name.trim_end_matches('.').to_string()
    };
    Ok((name, port))
}
