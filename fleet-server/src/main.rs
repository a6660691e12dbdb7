//! `fleet-server`: parse the command line, load the configuration, and hand over to
//! `fleet_server::server::run` (embedded MQTT broker, telemetry ingest, admin HTTP API).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_server::server::{self, config::Config, config::Overrides};
use tokio_util::sync::CancellationToken;

/// Exit code for a bad configuration or usage (EX_USAGE).
const EXIT_USAGE: i32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "fleet-server",
    version,
    about = "Fleet server: telemetry ingest over MQTT (embedded broker by default), admin API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: embedded MQTT broker (unless --mqtt-url), ingest, admin HTTP API.
    Run {
        /// Config file (TOML); flags override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// State directory (default ./fleet-state).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// Admin API listen address (default 127.0.0.1:8080).
        #[arg(long, value_name = "ADDR")]
        http_listen: Option<String>,
        /// An external broker (mqtt://host:port) instead of the embedded one.
        #[arg(long, value_name = "URL")]
        mqtt_url: Option<String>,
    },
    /// Print the default configuration (TOML).
    PrintDefaultConfig,
    /// Check a configuration file; prints every problem and exits 64 when invalid.
    ValidateConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

fn main() {
    let code = match Cli::parse().command {
        Command::PrintDefaultConfig => {
            print!("{}", Config::default_toml());
            0
        }
        Command::ValidateConfig { file } => match Config::load(&file).and_then(|c| c.validate()) {
            Ok(()) => {
                println!("{}: OK", file.display());
                0
            }
            Err(e) => {
                for p in &e.problems {
                    eprintln!("fleet-server: config: {p}");
                }
                EXIT_USAGE
            }
        },
        Command::Run {
            config,
            state_dir,
            http_listen,
            mqtt_url,
        } => match load(
            config.as_deref(),
            &Overrides {
                state_dir,
                http_listen,
                mqtt_url,
            },
        ) {
            Err(problems) => {
                for p in &problems {
                    eprintln!("fleet-server: config: {p}");
                }
                EXIT_USAGE
            }
            Ok(cfg) => match serve(cfg) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("fleet-server: error: {e:#}");
                    1
                }
            },
        },
    };
    std::process::exit(code);
}

/// The file (or the defaults), the overrides, validated: every problem at once.
fn load(path: Option<&Path>, o: &Overrides) -> Result<Config, Vec<String>> {
    let mut cfg = match path {
        Some(p) => Config::load(p).map_err(|e| e.problems)?,
        None => Config::default(),
    };
    cfg.apply(o);
    cfg.validate().map_err(|e| e.problems)?;
    Ok(cfg)
}

fn serve(cfg: Config) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLEET_SERVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        // before anything is served: a SIGTERM from now on stops the server cleanly
        let signal = shared::shutdown::signal();
        let listener = tokio::net::TcpListener::bind(&cfg.http.listen)
            .await
            .with_context(|| {
                format!(
                    "admin API cannot listen on {} (http.listen)",
                    cfg.http.listen
                )
            })?;
        let shutdown = CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            signal.await;
            on_signal.cancel();
        });
        // ServerError's message already names its cause: no repeated chain
        server::run(cfg, listener, shutdown)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    })
}
