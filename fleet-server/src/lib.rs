//! The `fleet-server` library.
#![forbid(unsafe_code)]
