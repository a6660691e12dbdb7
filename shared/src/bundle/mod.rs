//! Model bundles: the signed, self-describing package that is the only way a model reaches a
//! device. A bundle is a zstd-compressed ustar archive: `manifest.json`, `manifest.sig`, then
//! every file the manifest lists (see `docs/bundle-format.md` in this crate).
//!
//! Guarantees of [`verify`]:
//! - nothing from the archive is parsed before the signature over the exact manifest bytes
//!   verified under the trust rules of [`crate::trust`];
//! - nothing is written outside a private staging directory (mode 0700, created by the
//!   verifier), and only regular files whose paths the signed manifest lists;
//! - each kept file is hashed from the same bytes that are written, so what was checked is
//!   what is used; sizes are checked against the signed manifest before reading, and the
//!   decompressed stream is counted against the manifest's totals and a configured cap, so a
//!   zstd bomb stops at the first byte over with bounded memory and disk.

pub mod golden;
pub mod manifest;
mod stored;
pub mod testing;
mod ustar;
pub mod verify;
pub mod write;

pub use manifest::{
    Compatibility, DataFile, FeatureProfile, FeatureSchema, FileEntry, Golden, GoldenSample,
    Manifest, Payload, Provenance, ReferenceProfile, Schema, Signoff, TensorSchema,
    MANIFEST_FORMAT,
};
pub use verify::{read_unverified, verify, verify_reader, Limits, Staging, Verified};
pub use write::{assemble, write_bundle, BundleFile};

/// Archive member holding the manifest.
pub const MANIFEST_NAME: &str = "manifest.json";
/// Archive member holding the signature over the manifest bytes.
pub const SIGNATURE_NAME: &str = "manifest.sig";

/// Why a bundle was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("not a valid zstd stream: {0}")]
    Compression(String),
    #[error("archive: {0}")]
    Archive(String),
    #[error("entry {index} ({name:?}): {message}")]
    Entry {
        index: usize,
        name: String,
        message: String,
    },
    #[error("decompressed size exceeds {limit} bytes ({what})")]
    TooLarge { limit: u64, what: String },
    #[error("signature: {0}")]
    Trust(#[from] crate::trust::TrustError),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("file {path:?}: {message}")]
    File { path: String, message: String },
    #[error("trailing data after the archive: {0}")]
    Trailing(String),
    #[error("release {release} of {name:?} is lower than the running release {running}, and the bundle does not allow a downgrade")]
    Downgrade {
        name: String,
        release: u64,
        running: u64,
    },
}

/// Checks a path listed in a manifest: relative, `/`-separated segments of
/// `[A-Za-z0-9._-]`, no `.`/`..` segment, at most 4 segments and 200 bytes, not one of the
/// two reserved names.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.len() > 200 {
        return Err(format!("path is {} bytes long (limit 200)", path.len()));
    }
    if path.starts_with('/') {
        return Err("absolute path".into());
    }
    if path == MANIFEST_NAME || path == SIGNATURE_NAME {
        return Err("reserved name".into());
    }
    let segments: Vec<&str> = path.split('/').collect();
    if segments.len() > 4 {
        return Err("more than 4 path segments".into());
    }
    for seg in segments {
        if seg.is_empty() {
            return Err("empty path segment".into());
        }
        if seg == "." || seg == ".." {
            return Err(format!("path segment {seg:?} is not allowed"));
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(format!(
                "character {c:?} is not allowed (use A-Z a-z 0-9 . _ -)"
            ));
        }
    }
    Ok(())
}

/// Refuses installing `manifest` over `running` (the release currently active for the same
/// model name) when it is lower, unless the signed manifest allows a downgrade.
pub fn check_release(manifest: &Manifest, running: Option<u64>) -> Result<(), BundleError> {
    match running {
        Some(running) if manifest.release < running && !manifest.allow_downgrade => {
            Err(BundleError::Downgrade {
                name: manifest.name.clone(),
                release: manifest.release,
                running,
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
