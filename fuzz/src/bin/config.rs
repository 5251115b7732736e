//! The configuration file: `config::parse_str`, then `validate`; a configuration that validates
//! is written back (as `--print-config` shows it) and must read and validate again.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nodedns::config::{self, Environment};

fn env() -> &'static Environment {
    static ENV: OnceLock<Environment> = OnceLock::new();
    ENV.get_or_init(|| {
        // The machine-dependent default upstreams come from a resolv.conf of our own.
        let resolv = std::env::temp_dir().join("nodedns-fuzz-resolv.conf");
        std::fs::write(&resolv, "nameserver 127.0.0.53\nsearch svc.cluster.local\n").unwrap();
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
    let Ok(file) = config::parse_str(text) else {
        return;
    };
    let Ok(settings) = file.validate(env()) else {
        return;
    };
    let shown = toml::to_string(&file.resolved(&settings)).expect("a resolved config serializes");
    let again = config::parse_str(&shown)
        .unwrap_or_else(|e| panic!("the resolved config does not read back: {e}\n{shown}"));
    if let Err(e) = again.validate(env()) {
        panic!("the resolved config does not validate: {e}\n{shown}");
    }
});
