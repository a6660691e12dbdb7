//! Library shared by `edge-agent`, `fleet-server` and `fleetctl`: the inference engine
//! (tract-onnx plus the project's own `ai.onnx.ml` operators).
#![forbid(unsafe_code)]

pub mod auth;
pub mod bundle;
pub mod config;
pub mod delivery;
pub mod directive;
pub mod drift;
pub mod engine;
pub mod metrics;
pub mod shutdown;
pub mod trust;
pub mod wire;
