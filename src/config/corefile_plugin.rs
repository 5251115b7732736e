//! The Corefile's `cache` and `forward` plugins, and what the mapping of every plugin shares.

use std::path::Path;
use std::time::Duration;

use super::corefile::{parse_error, Directive};
use super::*;

/// CoreDNS `cache`'s defaults: capacity per kind, max TTLs, min TTL.
const CACHE_CAPACITY: usize = 9984;
const SUCCESS_MAX_TTL: u64 = 3600;
const DENIAL_MAX_TTL: u64 = 1800;
/// `serve_stale` without a duration.
const STALE_DEFAULT: Duration = Duration::from_secs(3600);

/// A setting nodedns holds once, with the line that set it.
pub(super) struct Once<T> {
    name: &'static str,
    value: Option<(T, usize)>,
}

impl<T: PartialEq + std::fmt::Debug> Once<T> {
    pub(super) fn new(name: &'static str) -> Self {
        Once { name, value: None }
    }

    pub(super) fn set(&mut self, path: &Path, line: usize, v: T) -> Result<(), ConfigError> {
        match &self.value {
            Some((old, at)) if *old != v => Err(parse_error(
                path,
                line,
                format!(
                    "{}: {v:?} differs from {old:?} on line {at}; nodedns holds one value for \
                     all server blocks",
                    self.name
                ),
            )),
            _ => {
                self.value = Some((v, line));
                Ok(())
            }
        }
    }

    pub(super) fn get(self) -> Option<T> {
        self.value.map(|(v, _)| v)
    }
}

/// One block's zone settings.
pub(super) struct BlockZone {
    pub(super) upstreams: Vec<String>,
    /// The targets were `/etc/resolv.conf` (node-cache's default upstream): left to the
    /// machine default in `.`.
    pub(super) from_resolv_conf: bool,
    pub(super) transport: Transport,
    pub(super) success_max_ttl: Duration,
    pub(super) denial_max_ttl: Duration,
    pub(super) serve_stale: Duration,
}

pub(super) struct CachePlugin {
    pub(super) capacity: usize,
    pub(super) success_ttl: Duration,
    pub(super) denial_ttl: Duration,
    pub(super) serve_stale: Duration,
}

/// `cache [TTL] { success CAP [TTL [MINTTL]]; denial CAP [TTL [MINTTL]]; prefetch AMOUNT
/// [DURATION [PERCENTAGE%]]; serve_stale [DURATION [REFRESH_MODE]]; servfail DURATION }`.
pub(super) fn cache_plugin(
    path: &Path,
    d: &Directive,
    min_ttl: &mut Once<Duration>,
    prefetch: &mut Once<(u32, u32)>,
    servfail: &mut Once<Duration>,
) -> Result<CachePlugin, ConfigError> {
    let (mut success, mut denial) = match d.args.as_slice() {
        [] => (SUCCESS_MAX_TTL, DENIAL_MAX_TTL),
        [ttl] => {
            let t = num::<u64>(path, d.line, "cache TTL", ttl)?;
            (t, t)
        }
        _ => {
            return Err(parse_error(
                path,
                d.line,
                "cache: zones after the TTL are not supported (the block's zones are cached)",
            ))
        }
    };
    let (mut success_cap, mut denial_cap) = (CACHE_CAPACITY, CACHE_CAPACITY);
    let mut serve_stale = Duration::ZERO;
    for o in &d.block {
        let a = o.args.as_slice();
        match o.name.as_str() {
            "success" | "denial" => {
                let (cap, ttl) = if o.name == "success" {
                    (&mut success_cap, &mut success)
                } else {
                    (&mut denial_cap, &mut denial)
                };
                let Some(c) = a.first() else {
                    return Err(parse_error(
                        path,
                        o.line,
                        format!("cache {}: give a capacity", o.name),
                    ));
                };
                *cap = num(path, o.line, "cache capacity", c)?;
                if let Some(t) = a.get(1) {
                    *ttl = num(path, o.line, "cache TTL", t)?;
                }
                if let Some(m) = a.get(2) {
                    let m = Duration::from_secs(num(path, o.line, "cache min TTL", m)?);
                    min_ttl.set(path, o.line, m)?;
                }
                if a.len() > 3 {
                    return Err(extra(path, o, "cache"));
                }
            }
            "prefetch" => {
                let Some(amount) = a.first() else {
                    return Err(parse_error(path, o.line, "cache prefetch: give an amount"));
                };
                let amount = num::<u32>(path, o.line, "prefetch amount", amount)?;
                // The DURATION (the window in which AMOUNT queries must arrive, 1m by
                // default) is accepted but not used: nodedns counts an entry's uses over its
                // whole lifetime.
                if let Some(w) = a.get(1) {
                    dur(path, o.line, "prefetch duration", w)?;
                }
                let pct = match a.get(2) {
                    None => 10,
                    Some(p) => {
                        num::<u32>(path, o.line, "prefetch percentage", p.trim_end_matches('%'))?
                    }
                };
                if a.len() > 3 {
                    return Err(extra(path, o, "cache"));
                }
                prefetch.set(path, o.line, (amount, pct))?;
            }
            "serve_stale" => {
                serve_stale = match a.first() {
                    None => STALE_DEFAULT,
                    Some(v) => dur(path, o.line, "serve_stale", v)?,
                };
                // REFRESH_MODE: nodedns always asks upstream first and serves a stale
                // answer when no fresh one comes in time ("verify" in CoreDNS's terms);
                // "immediate" (the default) is accepted as the same.
                match a.get(1).map(String::as_str) {
                    None | Some("verify") | Some("immediate") => {}
                    Some(m) => {
                        return Err(parse_error(
                            path,
                            o.line,
                            format!("cache serve_stale: refresh mode {m:?} is not supported"),
                        ))
                    }
                }
                if a.len() > 2 {
                    return Err(extra(path, o, "cache"));
                }
            }
            "servfail" => match a {
                [v] => servfail.set(path, o.line, dur(path, o.line, "servfail", v)?)?,
                _ => {
                    return Err(parse_error(
                        path,
                        o.line,
                        "cache servfail: give one duration",
                    ))
                }
            },
            _ => return Err(unsupported_option(path, o, "cache")),
        }
    }
    Ok(CachePlugin {
        capacity: success_cap + denial_cap,
        success_ttl: Duration::from_secs(success),
        denial_ttl: Duration::from_secs(denial),
        serve_stale,
    })
}

/// `forward FROM TO... { force_tcp; prefer_udp; max_fails N; expire DUR; health_check DUR;
/// policy P; max_concurrent N }`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_plugin(
    path: &Path,
    d: &Directive,
    custom_upstreams: bool,
    max_fails: &mut Once<u32>,
    expire: &mut Once<Duration>,
    health_check: &mut Once<Duration>,
    max_concurrent: &mut Once<usize>,
) -> Result<BlockZone, ConfigError> {
    let Some((from, to)) = d.args.split_first() else {
        return Err(parse_error(
            path,
            d.line,
            "forward: give the zone and the upstreams",
        ));
    };
    if from != "." {
        return Err(parse_error(
            path,
            d.line,
            format!("forward: only \".\" (the whole block) is supported as FROM, not {from:?}"),
        ));
    }
    if to.is_empty() {
        return Err(parse_error(path, d.line, "forward: no upstreams"));
    }
    let mut upstreams = Vec::new();
    let mut from_resolv_conf = false;
    for t in to {
        if t.starts_with('/') {
            if t == "/etc/resolv.conf" {
                from_resolv_conf = true;
                continue;
            }
            let text = std::fs::read_to_string(t)
                .map_err(|e| parse_error(path, d.line, format!("forward: cannot read {t}: {e}")))?;
            upstreams.extend(resolv_conf_nameservers(&text).iter().map(|a| a.to_string()));
            continue;
        }
        let a = t.strip_prefix("dns://").unwrap_or(t);
        if a.contains("://") {
            return Err(parse_error(
                path,
                d.line,
                format!("forward: {t:?}: only plain DNS upstreams are supported"),
            ));
        }
        let sa = addr("forward", a, 53)
            .map_err(|_| parse_error(path, d.line, format!("forward: {t:?} is not IP[:PORT]")))?;
        upstreams.push(sa.to_string());
    }
    if from_resolv_conf && !upstreams.is_empty() {
        return Err(parse_error(
            path,
            d.line,
            "forward: /etc/resolv.conf mixed with addresses is not supported",
        ));
    }
    // CoreDNS asks upstream over the protocol the client used; nodedns asks over UDP and
    // retries a truncated answer over TCP, which is where a UDP client of CoreDNS ends up.
    let mut transport = Transport::PreferUdp;
    let (mut force_tcp, mut prefer_udp) = (false, false);
    for o in &d.block {
        let a = o.args.as_slice();
        match (o.name.as_str(), a) {
            // node-cache drops force_tcp where the ConfigMap's upstreamNameservers stand.
            ("force_tcp", []) => {
                force_tcp = true;
                if !custom_upstreams {
                    transport = Transport::Tcp
                }
            }
            ("prefer_udp", []) => prefer_udp = true,
            ("max_fails", [n]) => {
                max_fails.set(path, o.line, num(path, o.line, "max_fails", n)?)?
            }
            ("expire", [v]) => expire.set(path, o.line, dur(path, o.line, "expire", v)?)?,
            ("health_check", [v]) => {
                health_check.set(path, o.line, dur(path, o.line, "health_check", v)?)?
            }
            ("max_concurrent", [n]) => {
                max_concurrent.set(path, o.line, num(path, o.line, "max_concurrent", n)?)?
            }
            // nodedns rotates the first upstream it asks among the healthy ones, which
            // spreads load as `random` and `round_robin` do; `sequential` (always the first
            // healthy one) is not available.
            ("policy", [p]) if p == "random" || p == "round_robin" => {}
            _ => return Err(unsupported_option(path, o, "forward")),
        }
    }
    if force_tcp && prefer_udp {
        // As CoreDNS refuses it.
        return Err(parse_error(
            path,
            d.line,
            "forward: force_tcp and prefer_udp cannot be used together",
        ));
    }
    Ok(BlockZone {
        upstreams,
        from_resolv_conf,
        transport,
        success_max_ttl: Duration::ZERO,
        denial_max_ttl: Duration::ZERO,
        serve_stale: Duration::ZERO,
    })
}

/// `:9253` (every address) as `0.0.0.0:9253`, `localhost:9153` as `127.0.0.1:9153`.
pub(super) fn listen_addr(
    path: &Path,
    line: usize,
    plugin: &str,
    a: &str,
) -> Result<String, ConfigError> {
    let a = if let Some(p) = a.strip_prefix(':') {
        format!("0.0.0.0:{p}")
    } else if let Some(p) = a.strip_prefix("localhost:") {
        format!("127.0.0.1:{p}")
    } else {
        a.to_string()
    };
    let sa = addr(plugin, &a, 0)
        .map_err(|_| parse_error(path, line, format!("{plugin}: {a:?} is not ADDRESS:PORT")))?;
    Ok(sa.to_string())
}

pub(super) fn num<T: std::str::FromStr>(
    path: &Path,
    line: usize,
    what: &str,
    v: &str,
) -> Result<T, ConfigError> {
    v.parse()
        .map_err(|_| parse_error(path, line, format!("{what}: {v:?} is not a number")))
}

/// A CoreDNS duration: Go's form (`30s`, `1m30s`), or a bare number of seconds.
pub(super) fn dur(path: &Path, line: usize, what: &str, v: &str) -> Result<Duration, ConfigError> {
    if let Ok(s) = v.parse::<u64>() {
        return Ok(Duration::from_secs(s));
    }
    humantime::parse_duration(v)
        .map_err(|_| parse_error(path, line, format!("{what}: {v:?} is not a duration")))
}

pub(super) fn unsupported_option(path: &Path, o: &Directive, plugin: &str) -> ConfigError {
    let shown = std::iter::once(o.name.as_str())
        .chain(o.args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    parse_error(
        path,
        o.line,
        format!("{plugin}: option {:?} is not supported ({shown:?})", o.name),
    )
}

pub(super) fn extra(path: &Path, d: &Directive, plugin: &str) -> ConfigError {
    parse_error(
        path,
        d.line,
        format!("{plugin}: unexpected arguments {:?}", d.args),
    )
}

pub(super) fn no_block(path: &Path, d: &Directive) -> Result<(), ConfigError> {
    match d.block.first() {
        Some(o) => Err(unsupported_option(path, o, &d.name)),
        None => Ok(()),
    }
}
