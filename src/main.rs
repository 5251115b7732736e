//! The nodedns binary: parse flags, load and validate the config, then run until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use nodedns::config::{self, Args, Environment};

/// Exit status for a configuration error (sysexits EX_CONFIG).
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    // node-cache's command line (`-localip ... -conf ...`) becomes the native one.
    let argv = match config::nodecache::translate(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nodedns: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let args = Args::parse_from(argv);
    // A reload reads the same sources again, the same way; what they hold now is noted first.
    let source = {
        let args = args.clone();
        nodedns::app::ConfigSource::new(
            config::watched_files(&args),
            std::sync::Arc::new(move || {
                let file = config::load(&args).map_err(|e| e.to_string())?;
                let svc = args
                    .upstream_svc
                    .as_deref()
                    .unwrap_or(config::DEFAULT_UPSTREAM_SVC);
                let env = Environment::for_service(svc, &|k| std::env::var(k).ok());
                file.validate(&env).map_err(|e| e.to_string())
            }),
        )
    };
    let file = match config::load(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("nodedns: invalid configuration: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    let svc = args
        .upstream_svc
        .as_deref()
        .unwrap_or(config::DEFAULT_UPSTREAM_SVC);
    let env = Environment::for_service(svc, &|k| std::env::var(k).ok());
    let settings = match file.validate(&env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nodedns: invalid configuration: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if args.check_config {
        let effective = file.resolved(&settings);
        print!(
            "{}",
            toml::to_string(&effective).expect("config serializes")
        );
        for w in &settings.warnings {
            eprintln!("warning: {w}");
        }
        eprintln!("nodedns: configuration is valid");
        return ExitCode::SUCCESS;
    }
    nodedns::logging::init(settings.log_json);
    let _pidfile = match args.pidfile.as_deref().map(Pidfile::create).transpose() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("nodedns: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.workers.clamp(1, 4))
        .thread_name("nodedns-rt")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodedns: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(async {
        // Installed first: a SIGTERM during startup shuts down cleanly.
        let shutdown = nodedns::app::shutdown_signal();
        nodedns::app::run(settings, Some(source), shutdown).await
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("nodedns: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The process ID in a file (node-cache's `-pidfile`, which its wrapper waits for before it
/// installs the iptables rules), removed when the process ends normally.
struct Pidfile(std::path::PathBuf);

impl Pidfile {
    fn create(path: &std::path::Path) -> Result<Pidfile, String> {
        std::fs::write(path, format!("{}\n", std::process::id()))
            .map_err(|e| format!("cannot write pidfile {}: {e}", path.display()))?;
        Ok(Pidfile(path.to_owned()))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
