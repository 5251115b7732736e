//! The nodedns binary: parse flags, load and validate the config, then run until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use nodedns::config::{self, Args, Environment};

/// Exit status for a configuration error (sysexits EX_CONFIG).
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = Args::parse();
    // A reload reads the same sources again, the same way; what they hold now is noted first.
    let source = {
        let args = args.clone();
        nodedns::app::ConfigSource::new(
            args.config.iter().cloned().collect(),
            std::sync::Arc::new(move || {
                config::load(&args)
                    .and_then(|f| f.validate(&Environment::from_process()))
                    .map_err(|e| e.to_string())
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
    let settings = match file.validate(&Environment::from_process()) {
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
