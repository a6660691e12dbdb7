//! Arbitrary bytes as a bundle file: `verify_reader` must refuse them (or accept a valid
//! bundle signed by the fuzz root key) without panicking and with bounded memory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::bundle::{verify_reader, Limits};

fuzz_target!(|data: &[u8]| {
    let trust = shared_fuzz::trust();
    if let Ok(v) = verify_reader(
        data,
        "fuzz",
        &trust,
        &Limits::default(),
        None,
        shared_fuzz::now(),
    ) {
        // everything read was accounted for: no byte of the input left unauthenticated
        assert_eq!(v.compressed_bytes, data.len() as u64);
    }
});
