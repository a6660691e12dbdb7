//! `fleet-server`: device registry, bundle store, rollouts (not built yet: see the issues).
#![forbid(unsafe_code)]

fn main() {
    eprintln!(
        "fleet-server {}: not implemented yet",
        env!("CARGO_PKG_VERSION")
    );
    std::process::exit(64);
}
