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

#[derive(Debug, Subcommand)]
pub enum Command {
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
