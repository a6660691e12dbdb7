//! `edge-agent`: parse the command line and hand over to the library.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() {
    let cli = edge_agent::cli::Cli::parse();
    std::process::exit(edge_agent::cli::run(cli));
}
