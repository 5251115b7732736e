//! The Corefile reader: `config::read_corefile` (placeholders, tokens, blocks, the plugins'
//! mapping), then `validate`; a Corefile that validates is written back as the TOML
//! `--check-config` prints and must read and validate again.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nodedns::config::{self, corefile, Environment};

fn env() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        // `forward . /etc/resolv.conf` and the default upstreams read a resolv.conf of our own.
        let resolv = std::env::temp_dir().join("nodedns-fuzz-corefile-resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
        Environment {
            resolv_conf: resolv,
            kube_dns_upstream: None,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pillars = corefile::Pillars {
        local_ips: vec!["169.254.20.10".into(), "10.96.0.10".into()],
        cluster_dns: Some("10.96.0.11".into()),
        cluster_dns_var: "KUBE_DNS_UPSTREAM_SERVICE_HOST".into(),
        upstream_servers: vec![],
        prometheus: ":9253".into(),
    };
    let path = Path::new("Corefile");
    let Ok(file) = config::read_corefile(path, text, &pillars, 53, &env().resolv_conf) else {
        return;
    };
    let Ok(settings) = file.validate(env()) else {
        return;
    };
    let shown = toml::to_string(&file.resolved(&settings)).expect("a resolved config serializes");
    let again = config::parse_str(&shown)
        .unwrap_or_else(|e| panic!("the Corefile's config does not read back: {e}\n{shown}"));
    if let Err(e) = again.validate(env()) {
        panic!("the Corefile's config does not validate: {e}\n{shown}");
    }
});
