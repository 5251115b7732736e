//! node-cache's command line, translated into ours before clap sees it.
//!
//! The node-local-dns DaemonSet starts its image as `node-cache -localip 169.254.20.10,10.0.0.10
//! -conf /etc/Corefile -upstreamsvc kube-dns-upstream -pidfile /tmp/node-cache.pid`: Go's
//! `flag` package syntax (one or two dashes, `-name value` or `-name=value`, booleans only as
//! `-name` or `-name=false`), which clap cannot parse. When the command line names one of
//! node-cache's flags it is node-cache's command line: every node-cache flag becomes its native
//! `--long` form, and node-cache's own defaults apply (interface and iptables setup on, the
//! Corefile template at /etc/coredns/Corefile.base, the cluster DNS from the `kube-dns`
//! Service's environment). Native flags may follow; a command line without node-cache flags is
//! left untouched.

use std::ffi::OsString;

/// node-cache's flags (its own and those of the CoreDNS it embeds) and whether each is boolean.
const FLAGS: &[(&str, bool)] = &[
    ("localip", false),
    ("conf", false),
    ("corefile", false),
    ("basecorefile", false),
    ("upstreamsvc", false),
    ("kubednscm", false),
    ("setupinterface", true),
    ("setupiptables", true),
    ("interfacename", false),
    ("skipteardown", true),
    ("health-port", false),
    ("syncinterval", false),
    ("metrics-listen-address", false),
    ("prometheus-listen-address", false),
    ("reloadwithsignal", true),
    ("pidfile", false),
    ("dns.port", false),
];

fn lookup(name: &str) -> Option<bool> {
    FLAGS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

/// Splits `-name`, `--name`, `-name=value` into (name, value) when `name` is node-cache's.
fn node_cache_flag(arg: &str) -> Option<(&str, Option<&str>)> {
    let body = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    let (name, value) = match body.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (body, None),
    };
    lookup(name).map(|_| (name, value))
}

/// Go's `strconv.ParseBool`, as `flag` reads `-name=value` for a boolean.
fn go_bool(name: &str, v: &str) -> Result<bool, String> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!("-{name}: invalid boolean value {v:?}")),
    }
}

/// Go's `time.ParseDuration`, in nanoseconds.
fn go_duration_ns(v: &str) -> Option<u128> {
    if v == "0" {
        return Some(0);
    }
    let mut rest = v.strip_prefix('+').unwrap_or(v);
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return None,
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let int: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        total = total.checked_add(int.checked_mul(scale)?)?;
        if !frac.is_empty() {
            let digits = frac.len().min(18) as u32;
            let f: u128 = frac[..digits as usize].parse().ok()?;
            total += f * scale / 10u128.pow(digits);
        }
        rest = tail;
    }
    Some(total)
}

/// `-syncinterval`: node-cache reads a Go duration and multiplies it by one second, so its
/// default of 60 (nanoseconds) means 60 seconds and `1ns` means one second. Returned in the
/// native `--sync-interval` form. A value that overflows Go's multiplication (`60s` would be
/// 1,900 years) is refused rather than reproduced.
pub fn sync_interval_seconds(v: &str) -> Result<u64, String> {
    let ns = go_duration_ns(v).ok_or_else(|| format!("-syncinterval: invalid duration {v:?}"))?;
    if ns.saturating_mul(1_000_000_000) > i64::MAX as u128 {
        return Err(format!(
            "-syncinterval {v}: node-cache multiplies this value by one second, so it means \
             {ns} seconds (write e.g. 60ns for 60 seconds, or use --sync-interval 60s)"
        ));
    }
    Ok(ns as u64)
}

/// node-cache flags whose `--name` form is also a native flag of the same meaning: alone they
/// do not make a command line node-cache's.
const SHARED: &[&str] = &["corefile", "pidfile"];

/// True when `argv` (without the program name) is node-cache's command line.
pub fn is_node_cache(argv: &[OsString]) -> bool {
    argv.iter().filter_map(|a| a.to_str()).any(|a| {
        node_cache_flag(a).is_some_and(|(name, _)| !(a.starts_with("--") && SHARED.contains(&name)))
    })
}

/// Translates node-cache's command line into the native one (the program name first, kept).
/// A command line without node-cache flags is returned as it is.
pub fn translate(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some((prog, rest)) = argv.split_first() else {
        return Ok(argv);
    };
    if !is_node_cache(rest) {
        return Ok(argv);
    }
    // node-cache's defaults where ours differ.
    let mut setup_interface = true;
    let mut setup_iptables = true;
    let mut base_corefile = "/etc/coredns/Corefile.base".to_string();
    let mut corefile = "/etc/Corefile".to_string();
    let mut upstream_svc = "kube-dns".to_string();
    let mut out: Vec<OsString> = vec![prog.clone(), "--node-cache".into()];
    let mut native: Vec<OsString> = Vec::new();
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        let Some((name, inline)) = arg.to_str().and_then(node_cache_flag) else {
            // A native flag (and its value) goes through as given.
            native.push(arg.clone());
            continue;
        };
        let is_bool = lookup(name) == Some(true);
        let value: Option<String> = if is_bool {
            Some(match inline {
                Some(v) => go_bool(name, v)?.to_string(),
                None => "true".into(),
            })
        } else {
            match inline {
                Some(v) => Some(v.to_string()),
                None => Some(
                    it.next()
                        .and_then(|v| v.to_str())
                        .ok_or_else(|| format!("flag needs an argument: -{name}"))?
                        .to_string(),
                ),
            }
        };
        let v = value.unwrap_or_default();
        let mut push = |flag: &str, v: &str| {
            out.push(flag.into());
            out.push(v.into());
        };
        match name {
            "localip" => push("--local-ip", &v),
            "conf" | "corefile" => corefile = v,
            "basecorefile" => base_corefile = v,
            "upstreamsvc" => upstream_svc = v,
            "kubednscm" => push("--kube-dns-config", &v),
            "setupinterface" => setup_interface = v == "true",
            "setupiptables" => setup_iptables = v == "true",
            "interfacename" => push("--interface-name", &v),
            "skipteardown" => {
                if v == "true" {
                    out.push("--skip-teardown".into());
                }
            }
            "health-port" => push("--health-port", &v),
            "syncinterval" => push(
                "--sync-interval",
                &format!("{}s", sync_interval_seconds(&v)?),
            ),
            "metrics-listen-address" => push("--metrics-listen-address", &v),
            "prometheus-listen-address" => push("--prometheus-listen-address", &v),
            "reloadwithsignal" => {
                if v == "true" {
                    out.push("--reload-with-signal".into());
                }
            }
            "pidfile" => push("--pidfile", &v),
            "dns.port" => push("--dns-port", &v),
            _ => unreachable!("every flag of FLAGS is handled"),
        }
    }
    out.extend(["--corefile".into(), corefile.into()]);
    out.extend(["--base-corefile".into(), base_corefile.into()]);
    out.extend(["--upstream-svc".into(), upstream_svc.into()]);
    if setup_interface {
        out.push("--setup-interface".into());
    }
    if setup_iptables {
        out.push("--setup-iptables".into());
    }
    out.extend(native);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr(args: &[&str]) -> Result<Vec<String>, String> {
        let argv = std::iter::once("nodedns")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        translate(argv).map(|v| v.into_iter().map(|s| s.into_string().unwrap()).collect())
    }

    fn value(v: &[String], flag: &str) -> Option<String> {
        v.iter().position(|a| a == flag).map(|i| v[i + 1].clone())
    }

    #[test]
    fn native_command_lines_are_untouched() {
        let native = ["--listen", "127.0.0.1:53", "--upstream", "127.0.0.53"];
        assert_eq!(tr(&native).unwrap(), {
            let mut v = vec!["nodedns".to_string()];
            v.extend(native.iter().map(|s| s.to_string()));
            v
        });
    }

    #[test]
    fn the_manifest_args_take_node_cache_defaults() {
        let v = tr(&[
            "-localip",
            "169.254.20.10,10.0.0.10",
            "-conf",
            "/etc/Corefile",
            "-upstreamsvc",
            "kube-dns-upstream",
            "-pidfile",
            "/tmp/node-cache.pid",
        ])
        .unwrap();
        assert_eq!(v[1], "--node-cache");
        assert_eq!(value(&v, "--local-ip").unwrap(), "169.254.20.10,10.0.0.10");
        assert_eq!(value(&v, "--corefile").unwrap(), "/etc/Corefile");
        assert_eq!(
            value(&v, "--base-corefile").unwrap(),
            "/etc/coredns/Corefile.base"
        );
        assert_eq!(value(&v, "--upstream-svc").unwrap(), "kube-dns-upstream");
        assert_eq!(value(&v, "--pidfile").unwrap(), "/tmp/node-cache.pid");
        assert!(v.contains(&"--setup-interface".to_string()));
        assert!(v.contains(&"--setup-iptables".to_string()));
        assert!(!v.contains(&"--skip-teardown".to_string()));
    }

    #[test]
    fn go_flag_forms_are_accepted() {
        let v = tr(&[
            "--localip=fd00::a",
            "-setupinterface=false",
            "--setupiptables=F",
            "-skipteardown",
            "-reloadwithsignal=1",
            "-dns.port=5353",
            "-health-port",
            "8081",
            "-corefile",
            "/c",
            "-basecorefile=/b",
            "-kubednscm",
            "/k",
            "-interfacename=nld0",
            "-metrics-listen-address",
            "127.0.0.1:9353",
            "-prometheus-listen-address=:9254",
        ])
        .unwrap();
        assert_eq!(value(&v, "--local-ip").unwrap(), "fd00::a");
        assert!(!v.contains(&"--setup-interface".to_string()));
        assert!(!v.contains(&"--setup-iptables".to_string()));
        assert!(v.contains(&"--skip-teardown".to_string()));
        assert!(v.contains(&"--reload-with-signal".to_string()));
        assert_eq!(value(&v, "--dns-port").unwrap(), "5353");
        assert_eq!(value(&v, "--health-port").unwrap(), "8081");
        assert_eq!(value(&v, "--corefile").unwrap(), "/c");
        assert_eq!(value(&v, "--base-corefile").unwrap(), "/b");
        assert_eq!(value(&v, "--kube-dns-config").unwrap(), "/k");
        assert_eq!(value(&v, "--interface-name").unwrap(), "nld0");
        assert_eq!(value(&v, "--upstream-svc").unwrap(), "kube-dns");
        assert_eq!(
            value(&v, "--metrics-listen-address").unwrap(),
            "127.0.0.1:9353"
        );
        assert_eq!(value(&v, "--prometheus-listen-address").unwrap(), ":9254");
    }

    #[test]
    fn native_flags_named_like_node_cache_ones_stay_native() {
        let native = ["--corefile", "/c", "--pidfile=/p", "--setup-iptables"];
        assert_eq!(tr(&native).unwrap()[1..], native);
        let v = tr(&["-corefile", "/c"]).unwrap();
        assert_eq!(v[1], "--node-cache");
    }

    #[test]
    fn native_flags_mix_with_node_cache_ones() {
        let v = tr(&["-localip", "169.254.20.10", "--state-dir", "/run/x"]).unwrap();
        assert_eq!(value(&v, "--state-dir").unwrap(), "/run/x");
        assert_eq!(value(&v, "--local-ip").unwrap(), "169.254.20.10");
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag() {
        assert_eq!(
            tr(&["-setupiptables=maybe"]).unwrap_err(),
            "-setupiptables: invalid boolean value \"maybe\""
        );
        assert_eq!(
            tr(&["-localip"]).unwrap_err(),
            "flag needs an argument: -localip"
        );
        assert!(tr(&["-syncinterval", "1x"])
            .unwrap_err()
            .contains("invalid duration"));
    }

    #[test]
    fn syncinterval_multiplies_by_a_second_as_node_cache_does() {
        assert_eq!(
            sync_interval_seconds("60").ok(),
            None,
            "no unit: Go refuses it"
        );
        assert_eq!(sync_interval_seconds("60ns").unwrap(), 60);
        assert_eq!(sync_interval_seconds("1ns").unwrap(), 1);
        assert_eq!(sync_interval_seconds("1us").unwrap(), 1_000);
        assert_eq!(sync_interval_seconds("1.5us").unwrap(), 1_500);
        assert_eq!(sync_interval_seconds("0").unwrap(), 0);
        let e = sync_interval_seconds("60s").unwrap_err();
        assert!(e.contains("60000000000 seconds"), "{e}");
        let v = tr(&["-syncinterval", "30ns"]).unwrap();
        assert_eq!(value(&v, "--sync-interval").unwrap(), "30s");
    }
}
