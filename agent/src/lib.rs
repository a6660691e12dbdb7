//! The `edge-agent` library: everything the binary does, callable from tests.
#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod config;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod pool;
pub mod predict;
pub mod runtime;
pub mod service;
pub mod store;
