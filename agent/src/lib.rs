//! The `edge-agent` library: everything the binary does, callable from tests.
#![forbid(unsafe_code)]

pub mod cli;
pub mod predict;
