//! The `edge-agent` library: everything the binary does, callable from tests.
#![forbid(unsafe_code)]
