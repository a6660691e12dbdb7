//! `fleetctl`: admin CLI for keys, keyrings and signed model bundles.
#![forbid(unsafe_code)]

use clap::Parser;
use fleet_server::ctl::{Cli, EXIT_USAGE};

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    std::process::exit(fleet_server::ctl::run(cli));
}
