//! The `edge-agent` library: everything the binary does, callable from tests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod command;
pub mod config;
pub mod download;
pub mod feedback;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod pool;
pub mod predict;
pub mod runtime;
pub mod service;
pub mod store;
pub mod sync;
pub mod system;
pub mod telemetry;
