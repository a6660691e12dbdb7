//! Command-line interface of `edge-agent`: argument definitions and exit codes.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::predict::{self, InputFormat, PredictError, PredictOptions};

/// Exit code for bad input data (a row, a cell, a model file), after sysexits' EX_DATAERR.
pub const EXIT_DATA: i32 = 65;
/// Exit code for an input or model file that cannot be opened (EX_NOINPUT).
pub const EXIT_NO_INPUT: i32 = 66;
/// Exit code for an output that cannot be written (EX_CANTCREAT).
pub const EXIT_CANT_CREATE: i32 = 73;
/// Exit code for bad configuration or usage (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "Edge ML agent: local ONNX inference next to the machines"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the state directory is: `--state-dir`, or the config file's `state_dir`.
#[derive(Debug, Clone, clap::Args)]
pub struct StateArgs {
    /// The agent's state directory.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub state_dir: Option<PathBuf>,
    /// The agent's config file (for its state_dir, trust_root and keyring).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The root public key (overrides the config's trust_root).
    #[arg(long, value_name = "FILE.pub")]
    pub trust_root: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Verify, validate on this device and activate a signed bundle.
    Install {
        #[arg(value_name = "FILE.bundle")]
        bundle: PathBuf,
        /// Run it as a shadow beside the active version (same inputs, outputs only compared).
        #[arg(long, conflicts_with = "split")]
        shadow: bool,
        /// Serve this percentage of requests with it (sticky by the X-Routing-Key header).
        #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u8).range(1..=100))]
        split: Option<u8>,
        #[command(flatten)]
        state: StateArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: load active models, serve HTTP, install bundles, watch health.
    Run {
        /// Config file (TOML); flags override it.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
        /// HTTP listen address (default 127.0.0.1:8080).
        #[arg(long, value_name = "ADDR")]
        http_listen: Option<String>,
        /// Root public key bundles are verified against.
        #[arg(long, value_name = "FILE.pub")]
        trust_root: Option<PathBuf>,
        #[arg(long, value_name = "ID")]
        device_id: Option<String>,
        /// Plant broker (mqtt://host:port); without it the agent runs in local mode.
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
    /// Install bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Show every model's active and previous version, phase and last rollback.
    Status {
        #[command(flatten)]
        state: StateArgs,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make a model's shadow or split version the active one (with a health window).
    Promote {
        #[arg(value_name = "MODEL")]
        model: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Remove a model's shadow or split version.
    DropCandidate {
        #[arg(value_name = "MODEL")]
        model: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Re-activate a model's previous version.
    Rollback {
        #[arg(value_name = "MODEL")]
        model: String,
        /// Why (recorded in the state and events).
        #[arg(long, default_value = "operator request")]
        reason: String,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Batch-score a CSV or JSON-lines file with an ONNX model; writes JSON lines.
    Predict {
        /// The ONNX model file.
        #[arg(long, value_name = "FILE.onnx")]
        model: PathBuf,
        /// Rows to score: a .csv or .jsonl file, or - for standard input.
        #[arg(long, value_name = "FILE.csv|FILE.jsonl|-")]
        input: PathBuf,
        /// Where to write the JSON lines (default: standard output). Written to a temporary
        /// file and renamed into place only when every row was scored.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Rows per inference call.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch: u32,
        /// Input format; by default from the file extension, or sniffed on standard input.
        #[arg(long, value_enum)]
        format: Option<FormatArg>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    Csv,
    Jsonl,
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Run {
            config,
            state_dir,
            http_listen,
            trust_root,
            device_id,
            mqtt_url,
        } => crate::admin::run_service(
            config.as_deref(),
            &crate::config::Overrides {
                state_dir,
                http_listen,
                trust_root,
                device_id,
                mqtt_url,
            },
        ),
        Command::PrintDefaultConfig => {
            print!("{}", crate::config::Config::default_toml());
            0
        }
        Command::ValidateConfig { file } => {
            match crate::config::Config::load(&file).and_then(|c| c.validate()) {
                Ok(()) => {
                    println!("{}: OK", file.display());
                    0
                }
                Err(e) => {
                    for p in &e.problems {
                        eprintln!("edge-agent: config: {p}");
                    }
                    EXIT_USAGE
                }
            }
        }
        Command::Bundle(BundleCommand::Install {
            bundle,
            shadow,
            split,
            state,
        }) => {
            let mode = match (shadow, split) {
                (true, _) => crate::store::InstallMode::Shadow,
                (false, Some(p)) => crate::store::InstallMode::Split(p),
                _ => crate::store::InstallMode::Activate,
            };
            crate::admin::install(&bundle, mode, &state)
        }
        Command::Promote { model, state } => crate::admin::candidate_op("promote", &model, &state),
        Command::DropCandidate { model, state } => {
            crate::admin::candidate_op("drop", &model, &state)
        }
        Command::Status { state, json } => crate::admin::status(&state, json),
        Command::Rollback {
            model,
            reason,
            state,
        } => crate::admin::rollback(&model, &reason, &state),
        Command::Predict {
            model,
            input,
            output,
            batch,
            format,
        } => {
            let opts = PredictOptions {
                model,
                input,
                output,
                batch: batch as usize,
                format: format.map(|f| match f {
                    FormatArg::Csv => InputFormat::Csv,
                    FormatArg::Jsonl => InputFormat::Jsonl,
                }),
            };
            match predict::run(&opts) {
                Ok(summary) => {
                    eprintln!(
                        "edge-agent predict: scored {} rows in {:.3} s ({:.0} rows/s)",
                        summary.rows,
                        summary.seconds,
                        summary.rows as f64 / summary.seconds.max(1e-9)
                    );
                    0
                }
                Err(e) => {
                    eprintln!("edge-agent predict: error: {e}");
                    exit_code(&e)
                }
            }
        }
    }
}

fn exit_code(e: &PredictError) -> i32 {
    match e {
        PredictError::OpenInput { .. } => EXIT_NO_INPUT,
        PredictError::Model(shared::engine::EngineError::Io { .. }) => EXIT_NO_INPUT,
        PredictError::Output { .. } => EXIT_CANT_CREATE,
        PredictError::Usage(_) => EXIT_USAGE,
        _ => EXIT_DATA,
    }
}
