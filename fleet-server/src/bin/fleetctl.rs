//! `fleetctl`: admin CLI for bundles and rollouts (not built yet: see the issues).
#![forbid(unsafe_code)]

fn main() {
    eprintln!(
        "fleetctl {}: not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(64);
}
