//! Helpers for the end-to-end tests: locating the built binaries and fixtures.
#![forbid(unsafe_code)]
