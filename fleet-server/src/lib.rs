//! The `fleet-server` library: today the `fleetctl` commands (keys, keyrings, bundles);
//! the server itself comes with the fleet issues.
#![forbid(unsafe_code)]

pub mod audit;
pub mod ctl;
pub mod ingest;
