//! The `fleet-server` library: the `fleetctl` commands (keys, keyrings, bundles), the
//! server (`fleet-server run`: embedded broker, ingest, admin API), the ingest of device
//! records and the audit log.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod audit;
pub mod bundles;
pub mod ctl;
pub mod delivery;
pub mod directives;
pub mod ingest;
pub mod link;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod store;
