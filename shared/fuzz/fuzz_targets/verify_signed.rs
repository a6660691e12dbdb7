//! Manifest JSON bytes and a payload from the fuzzer, signed here with the fuzz root key and
//! assembled into a bundle (see `shared_fuzz::SignedInput`), so the manifest parser, the tar
//! reader, the size limits and the staging code are reached past the signature check.
//! Besides "no panic": a refused bundle leaves nothing in the staging parent; an accepted one
//! accounts for every byte and staged exactly the listed files with the listed hashes.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shared::bundle::{verify_reader, Limits};
use shared_fuzz::{sha, SignedInput};

/// One staging parent per process (set TMPDIR=/dev/shm to keep it in memory).
fn staging_parent() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("bundle-fuzz-")
            .tempdir()
            .expect("temporary directory")
    })
    .path()
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .expect("staging parent readable")
        .next()
        .is_none()
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = SignedInput::parse(data) else {
        return;
    };
    let bundle = input.bundle();
    // Default limits but 16 MiB of files, so a signed "1 GiB of zeros" costs milliseconds.
    let limits = Limits {
        max_total_bytes: 16 << 20,
        ..Limits::default()
    };
    let parent = input.stage().then(staging_parent);
    let res = verify_reader(
        &bundle[..],
        "fuzz",
        &shared_fuzz::trust(),
        &limits,
        parent,
        shared_fuzz::now(),
    );
    match res {
        Ok(v) => {
            assert_eq!(v.compressed_bytes, bundle.len() as u64);
            if let Some(st) = &v.staging {
                for f in &v.manifest.files {
                    let bytes = std::fs::read(st.file(&f.path)).expect("staged file");
                    assert_eq!(bytes.len() as u64, f.size, "{}", f.path);
                    assert_eq!(sha(&bytes), f.sha256, "{}", f.path);
                }
            }
            drop(v);
            if let Some(p) = parent {
                assert!(is_empty(p), "a dropped staging directory was left behind");
            }
        }
        Err(_) => {
            if let Some(p) = parent {
                assert!(is_empty(p), "a refused bundle left files behind");
            }
        }
    }
});
