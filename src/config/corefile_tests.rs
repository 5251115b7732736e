//! Unit tests of the Corefile mapping: each supported plugin and option onto `FileConfig`,
//! each unsupported one refused with file, line and name.

use std::path::Path;
use std::time::Duration;

use super::*;

const PATH: &str = "/etc/coredns/Corefile";

fn map_text(text: &str) -> Result<FileConfig, String> {
    let p = Path::new(PATH);
    let blocks = corefile::parse(p, text).map_err(|e| e.to_string())?;
    corefile_map::map(p, &blocks, &[], 53, Path::new("/nonexistent")).map_err(|e| e.to_string())
}

/// A block for zone `z` with `body` lines, forwarding to 127.0.0.2.
fn block(z: &str, body: &str) -> String {
    format!("{z}:53 {{\n  bind 127.0.0.1\n  forward . 127.0.0.2\n{body}}}\n")
}

fn err(text: &str) -> String {
    map_text(text).unwrap_err()
}

fn zone<'a>(c: &'a FileConfig, name: &str) -> &'a ZoneSection {
    c.zones.iter().find(|z| z.name == name).unwrap()
}

#[test]
fn server_blocks_give_listen_and_zones() {
    let c = map_text(&format!(
        "{}{}",
        block("example.org", "  cache 20\n"),
        "dns://.:53 {\n  bind 127.0.0.1\n  forward . 127.0.0.3:5353 dns://127.0.0.4\n}\n"
    ))
    .unwrap();
    assert_eq!(c.listen, vec!["127.0.0.1:53"]);
    assert_eq!(c.cluster_domain, "example.org");
    assert_eq!(c.cluster_dns, vec!["127.0.0.2:53"]);
    assert_eq!(c.upstreams, vec!["127.0.0.3:5353", "127.0.0.4:53"]);
    let z = zone(&c, "example.org");
    assert_eq!(z.transport, Transport::PreferUdp);
    assert_eq!(z.success_max_ttl, Some(Duration::from_secs(20)));
    // No cache in ".": not cached; no health or prometheus: neither served.
    assert_eq!(c.cache.success_max_ttl, Duration::ZERO);
    assert_eq!(c.health, "off");
    assert_eq!(c.metrics, "off");
}

#[test]
fn bind_ports_and_default_port() {
    let c = map_text("a.example {\n bind 127.0.0.1 ::1\n forward . 127.0.0.2\n}\n").unwrap();
    assert_eq!(c.listen, vec!["127.0.0.1:53", "[::1]:53"]);
    let p = Path::new(PATH);
    let blocks = corefile::parse(p, "a.example {\n forward . 127.0.0.2\n}\n").unwrap();
    let c = corefile_map::map(p, &blocks, &[], 5353, Path::new("/nonexistent")).unwrap();
    assert_eq!(
        c.listen,
        vec!["0.0.0.0:5353", "[::]:5353"],
        "no bind: every address"
    );
    let e = err("a.example:53 {\n bind 127.0.0.1\n forward . 127.0.0.2\n}\n.:54 {\n bind 127.0.0.1\n forward . 127.0.0.2\n}\n");
    assert!(
        e.contains("line 6: bind: [\"127.0.0.1:54\"] differs from [\"127.0.0.1:53\"] on line 2"),
        "{e}"
    );
    let e = err(".:53 {\n bind eth0\n forward . 127.0.0.2\n}\n");
    assert!(
        e.contains("/etc/coredns/Corefile: line 2: bind: \"eth0\" is not an IP address"),
        "{e}"
    );
}

#[test]
fn cache_capacity_ttls_and_min_ttl() {
    let c = map_text(&block(
        ".",
        "  cache {\n    success 1000 60 2\n    denial 500 10 2\n  }\n",
    ))
    .unwrap();
    assert_eq!(c.cache.max_entries, 1500);
    assert_eq!(c.cache.success_max_ttl, Duration::from_secs(60));
    assert_eq!(c.cache.denial_max_ttl, Duration::from_secs(10));
    assert_eq!(c.cache.min_ttl, Duration::from_secs(2));
    let c = map_text(&block(".", "  cache\n")).unwrap();
    assert_eq!(c.cache.max_entries, 2 * 9984);
    assert_eq!(c.cache.success_max_ttl, Duration::from_secs(3600));
    assert_eq!(c.cache.denial_max_ttl, Duration::from_secs(1800));
}

#[test]
fn cache_prefetch_serve_stale_servfail() {
    let c = map_text(&block(
        ".",
        "  cache 30 {\n    prefetch 5 1m 20%\n    serve_stale 2h verify\n    servfail 3s\n  }\n",
    ))
    .unwrap();
    assert_eq!((c.cache.prefetch, c.cache.prefetch_percentage), (5, 20));
    assert_eq!(c.cache.serve_stale, Duration::from_secs(7200));
    assert_eq!(c.cache.servfail_ttl, Duration::from_secs(3));
    let c = map_text(&block(
        ".",
        "  cache 30 {\n    prefetch 3\n    serve_stale\n  }\n",
    ))
    .unwrap();
    assert_eq!((c.cache.prefetch, c.cache.prefetch_percentage), (3, 10));
    assert_eq!(c.cache.serve_stale, Duration::from_secs(3600));
    let c = map_text(&block(".", "  cache 30\n")).unwrap();
    assert_eq!(c.cache.prefetch, 0, "CoreDNS prefetches only when told");
    assert_eq!(c.cache.serve_stale, Duration::ZERO);
}

#[test]
fn cache_options_not_supported_are_refused() {
    for (opt, name) in [("disable success", "disable"), ("keepttl", "keepttl")] {
        let e = err(&block(".", &format!("  cache {{\n    {opt}\n  }}\n")));
        assert!(
            e.contains(&format!(
                "Corefile: line 5: cache: option \"{name}\" is not supported"
            )),
            "{e}"
        );
    }
    let e = err(&block(".", "  cache 30 example.org\n"));
    assert!(
        e.contains("line 4: cache: zones after the TTL are not supported"),
        "{e}"
    );
    let e = err(&block(".", "  cache {\n    serve_stale 1h lazy\n  }\n"));
    assert!(
        e.contains("line 5: cache serve_stale: refresh mode \"lazy\""),
        "{e}"
    );
    let e = err(&format!(
        "{}{}",
        block("a.example", "  cache {\n    prefetch 2\n  }\n"),
        block(".", "  cache {\n    prefetch 3\n  }\n")
    ));
    assert!(
        e.contains("line 12: cache prefetch: (3, 10) differs from (2, 10) on line 5"),
        "{e}"
    );
}

#[test]
fn forward_options() {
    let c = map_text(&format!(
        "{}{}",
        "a.example:53 {\n bind 127.0.0.1\n forward . 127.0.0.2 {\n  force_tcp\n  max_fails 4\n  expire 20s\n  health_check 2s\n  policy round_robin\n  max_concurrent 100\n }\n}\n",
        ".:53 {\n bind 127.0.0.1\n forward . 127.0.0.3 {\n  prefer_udp\n  policy random\n }\n}\n"
    ))
    .unwrap();
    assert_eq!(zone(&c, "a.example").transport, Transport::Tcp);
    assert_eq!(c.forward.max_fails, 4);
    assert_eq!(c.forward.tcp_idle_timeout, Duration::from_secs(20));
    assert_eq!(c.forward.health_check, Duration::from_secs(2));
    assert_eq!(c.forward.max_inflight, 100);
    assert!(
        c.zones.iter().all(|z| z.name != "."),
        "UDP root stays built in"
    );
    let e = err(".:53 {\n forward . 127.0.0.3 {\n  force_tcp\n  prefer_udp\n }\n}\n");
    assert!(
        e.contains("line 2: forward: force_tcp and prefer_udp cannot be used together"),
        "{e}"
    );
    let c = map_text(&block("b.example", "").replace(
        "forward . 127.0.0.2",
        "forward . 127.0.0.2 {\n  prefer_udp\n }",
    ))
    .unwrap();
    assert_eq!(zone(&c, "b.example").transport, Transport::PreferUdp);
    let c =
        map_text(".:53 {\n bind 127.0.0.1\n forward . 127.0.0.3 {\n  force_tcp\n }\n}\n").unwrap();
    assert_eq!(zone(&c, ".").transport, Transport::Tcp);
    assert_eq!(c.upstreams, vec!["127.0.0.3:53"]);
}

#[test]
fn forward_to_resolv_conf_and_files() {
    let c = map_text(".:53 {\n bind 127.0.0.1\n forward . /etc/resolv.conf\n}\n").unwrap();
    assert!(c.upstreams.is_empty(), "left to the resolv.conf default");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("r.conf");
    std::fs::write(&f, "nameserver 127.0.0.9\n").unwrap();
    let c = map_text(&format!(
        ".:53 {{\n bind 127.0.0.1\n forward . {}\n}}\n",
        f.display()
    ))
    .unwrap();
    assert_eq!(c.upstreams, vec!["127.0.0.9:53"]);
}

#[test]
fn forward_not_supported_is_refused() {
    for (opt, name) in [
        ("tls_servername x", "tls_servername"),
        ("except a.example", "except"),
        ("policy sequential", "policy"),
        ("next NXDOMAIN", "next"),
    ] {
        let e = err(&format!(
            ".:53 {{\n forward . 127.0.0.2 {{\n  {opt}\n }}\n}}\n"
        ));
        assert!(
            e.contains(&format!(
                "/etc/coredns/Corefile: line 3: forward: option \"{name}\" is not supported"
            )),
            "{e}"
        );
    }
    let e = err(".:53 {\n forward . tls://127.0.0.2\n}\n");
    assert!(
        e.contains("line 2: forward: \"tls://127.0.0.2\": only plain DNS"),
        "{e}"
    );
    let e = err(".:53 {\n forward example.org 127.0.0.2\n}\n");
    assert!(e.contains("line 2: forward: only \".\""), "{e}");
    let e = err(".:53 {\n cache 30\n}\n");
    assert!(
        e.contains("line 1: server block .:53 has no forward"),
        "{e}"
    );
}

#[test]
fn health_prometheus_log_and_accepted_plugins() {
    let c = map_text(&block(
        ".",
        "  health 127.0.0.1:8080 {\n    lameduck 3s\n  }\n  prometheus :9253\n  log\n  errors\n  reload 30s 15s\n  loop\n",
    ))
    .unwrap();
    assert_eq!(c.health, "127.0.0.1:8080");
    assert_eq!(c.lameduck, Duration::from_secs(3));
    assert_eq!(c.metrics, "0.0.0.0:9253");
    assert_eq!(c.query_log, 1.0);
    let c = map_text(&block(".", "  health\n  prometheus\n")).unwrap();
    assert_eq!(c.health, "0.0.0.0:8080");
    assert_eq!(c.metrics, "127.0.0.1:9153");
    map_text(&block(
        ".",
        "  errors {\n    consolidate 5m \".* i/o timeout$\"\n    consolidate 10s \".*\" warning\n  }\n",
    ))
    .unwrap();
    let e = err(&block(".", "  errors {\n    stacktrace\n  }\n"));
    assert!(
        e.contains("line 5: errors: option \"stacktrace\" is not supported"),
        "{e}"
    );
    let e = err(&block(".", "  health 127.0.0.1:8080 127.0.0.2:8080\n"));
    assert!(e.contains("line 4: health: unexpected arguments"), "{e}");
    let e = err(&format!(
        "{}{}",
        block("a.example", "  health 127.0.0.1:8080\n"),
        block(".", "  health 127.0.0.1:8081\n")
    ));
    assert!(
        e.contains("line 9: health: \"127.0.0.1:8081\" differs"),
        "{e}"
    );
    let e = err(&block(".", "  log . \"{common}\"\n"));
    assert!(e.contains("line 4: log: unexpected arguments"), "{e}");
    let e = err(&block(".", "  reload 30s 5s 1s\n"));
    assert!(e.contains("line 4: reload: unexpected arguments"), "{e}");
}

#[test]
fn unknown_plugins_are_refused_with_file_line_and_name() {
    for plugin in [
        "bufsize 1232",
        "dns64",
        "loadbalance",
        "whoami",
        "kubernetes cluster.local",
        "debug",
    ] {
        let name = plugin.split(' ').next().unwrap();
        let e = err(&block(".", &format!("  {plugin}\n")));
        assert_eq!(
            e,
            format!("config file /etc/coredns/Corefile: line 4: plugin {name:?} is not supported")
        );
    }
}

#[test]
fn hosts_mapping() {
    let c = map_text(&block(
        "a.example",
        "  hosts /etc/extra.hosts b.example {\n    10.0.0.1 x.b.example y.b.example\n    ttl 60\n    no_reverse\n    fallthrough\n  }\n",
    ))
    .unwrap();
    let h = &c.hosts[0];
    assert_eq!(h.file.as_deref(), Some(Path::new("/etc/extra.hosts")));
    assert_eq!(h.zones, vec!["b.example"]);
    assert_eq!(h.entries, vec!["10.0.0.1 x.b.example y.b.example"]);
    assert_eq!(h.ttl, Duration::from_secs(60));
    assert!(h.no_reverse);
    assert_eq!(h.fallthrough, Some(vec![]));
    let c = map_text(&block("a.example", "  hosts\n")).unwrap();
    assert_eq!(c.hosts[0].file.as_deref(), Some(Path::new("/etc/hosts")));
    assert_eq!(c.hosts[0].zones, vec!["a.example"]);
    assert_eq!(c.hosts[0].fallthrough, None);
    let e = err(&block(".", "  hosts {\n    reload 5s\n  }\n"));
    assert!(
        e.contains("line 5: hosts: option \"reload\" is not supported"),
        "{e}"
    );
}

#[test]
fn template_mapping() {
    let c = map_text(&block(
        "a.example",
        "  template IN A b.example {\n    match ^x[.] ^y[.]\n    answer \"{{ .Name }} 60 IN A 10.0.0.1\"\n    additional \"x 60 IN A 10.0.0.2\"\n    authority \"b.example 60 IN NS ns.b.example\"\n    rcode NXDOMAIN\n    fallthrough c.example\n  }\n",
    ))
    .unwrap();
    let t = &c.template[0];
    assert_eq!((t.class.as_str(), t.qtype.as_str()), ("IN", "A"));
    assert_eq!(t.zones, vec!["b.example"]);
    assert_eq!(t.matches, vec!["^x[.]", "^y[.]"]);
    assert_eq!(t.answers, vec!["{{ .Name }} 60 IN A 10.0.0.1"]);
    assert_eq!(t.additional, vec!["x 60 IN A 10.0.0.2"]);
    assert_eq!(t.authority, vec!["b.example 60 IN NS ns.b.example"]);
    assert_eq!(t.rcode, "NXDOMAIN");
    assert_eq!(t.fallthrough, Some(vec!["c.example".to_string()]));
    let c = map_text(&block("a.example", "  template ANY ANY\n")).unwrap();
    assert_eq!(c.template[0].zones, vec!["a.example"]);
    assert_eq!(c.template[0].matches, vec![".*"]);
    let e = err(&block(".", "  template IN A {\n    upstream\n  }\n"));
    assert!(
        e.contains("line 5: template: option \"upstream\" is not supported"),
        "{e}"
    );
}

#[test]
fn rewrite_name_rules() {
    let c = map_text(&block(
        ".",
        "  rewrite name a.example b.example\n  rewrite stop name suffix .old.example .new.example\n  rewrite name prefix a. b.\n  rewrite name substring mid mod\n  rewrite name exact c.example d.example\n  rewrite name regex (.*)\\.x\\.example {1}.y.example\n",
    ))
    .unwrap();
    let kinds: Vec<_> = c
        .rewrite
        .iter()
        .map(|r| (r.kind, r.from.as_str(), r.to.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (RewriteMatch::Exact, "a.example", "b.example"),
            (RewriteMatch::Suffix, ".old.example", ".new.example"),
            (RewriteMatch::Prefix, "a.", "b."),
            (RewriteMatch::Substring, "mid", "mod"),
            (RewriteMatch::Exact, "c.example", "d.example"),
            (RewriteMatch::Regex, "(.*)\\.x\\.example", "{1}.y.example"),
        ]
    );
    let e = err(&block(".", "  rewrite type A AAAA\n"));
    assert!(
        e.contains("line 4: rewrite: rule \"type\" is not supported"),
        "{e}"
    );
    let e = err(&block(".", "  rewrite continue name a b\n"));
    assert!(
        e.contains("line 4: rewrite: \"continue\" is not supported"),
        "{e}"
    );
    let e = err(&block(".", "  rewrite name regex a b answer auto\n"));
    assert!(
        e.contains("line 4: rewrite: option \"answer\" is not supported"),
        "{e}"
    );
}

#[test]
fn a_zone_in_two_blocks_is_refused() {
    let e = err(&format!("{}{}", block(".", ""), block(".", "")));
    assert!(
        e.contains("line 5: zone . is already served by the block on line 1"),
        "{e}"
    );
}

#[test]
fn keys_not_supported_are_refused() {
    let e = err("tls://.:853 {\n forward . 127.0.0.2\n}\n");
    assert!(
        e.contains("line 1: \"tls://.:853\": tls:// servers are not supported"),
        "{e}"
    );
    let e = err("10.0.0.0/8:53 {\n forward . 127.0.0.2\n}\n");
    assert!(
        e.contains("line 1: \"10.0.0.0/8:53\": network (CIDR) zones"),
        "{e}"
    );
}
