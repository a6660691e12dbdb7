//! Helpers shared by the bundle fuzz targets and the seed generator: the fixed root key, and
//! the `verify_signed` input format turned into a bundle signed with that key.
//!
//! `verify_signed` input: one flags byte, the manifest JSON bytes, [`SEPARATOR`], the payload.
//! - flag [`COMPRESS`]: the payload is a raw archive, compressed here (zstd level 1) into the
//!   payload frame; without it, the payload bytes are the payload frame as is.
//! - flag [`STAGE`]: verify with a staging directory (files written and fsynced).
//!
//! Before signing, these tokens in the manifest text are replaced, so mutated inputs keep
//! reaching past the payload and file checks: `@PAYLOAD_SIZE@`, `@PAYLOAD_SHA@` (the payload
//! frame's size and sha256), `@SIZE0@`..`@SIZE9@`, `@SHA0@`..`@SHA9@` (size and sha256 of the
//! data of the first ten entries of the archive, found by a lenient tar walk).

use std::io::Read;

use sha2::{Digest, Sha256};
use shared::bundle::{MANIFEST_NAME, SIGNATURE_NAME};
use shared::trust::{hex, SecretKey, Trust};
use time::OffsetDateTime;

/// Separates the manifest from the payload in a `verify_signed` input (JSON has no NUL).
pub const SEPARATOR: &[u8] = b"\0\0payload\0\0";
/// Flag: compress the payload (a raw archive) into the payload frame.
pub const COMPRESS: u8 = 1;
/// Flag: verify with a staging directory.
pub const STAGE: u8 = 2;
/// Cap on the archive decompressed to fill the placeholders.
const PLACEHOLDER_CAP: u64 = 4 << 20;

/// The fixed root key every fuzz bundle is signed with (a throwaway).
pub fn key() -> SecretKey {
    SecretKey::from_seed([0x5a; 32])
}

pub fn trust() -> Trust {
    Trust::root_only(key().public())
}

/// A fixed verification time, so runs are reproducible.
pub fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("valid timestamp")
}

pub fn sha(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The canonical stored zstd frame (a copy of the private `shared::bundle::stored::encode`).
pub fn stored_frame(content: &[u8]) -> Vec<u8> {
    const BLOCK_MAX: usize = 128 * 1024;
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD, 0xE0];
    out.extend_from_slice(&(content.len() as u64).to_le_bytes());
    let mut rest = content;
    loop {
        let n = rest.len().min(BLOCK_MAX);
        let last = n == rest.len();
        let header = ((n as u32) << 3) | u32::from(last);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        if last {
            return out;
        }
    }
}

/// Appends one ustar entry (header, data, zero padding) for a regular file.
pub fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).expect("short ASCII name");
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// The manifest frame: `manifest.json`, then its signature by [`key`], as a stored frame.
pub fn head(manifest: &[u8]) -> Vec<u8> {
    let sig = serde_json::to_vec(&key().sign(manifest)).expect("signature serializes");
    let mut tar = Vec::with_capacity(manifest.len() + sig.len() + 2048);
    tar_entry(&mut tar, MANIFEST_NAME, manifest);
    tar_entry(&mut tar, SIGNATURE_NAME, &sig);
    stored_frame(&tar)
}

/// A parsed `verify_signed` input.
pub struct SignedInput<'a> {
    pub flags: u8,
    pub manifest: &'a [u8],
    pub payload: &'a [u8],
}

impl<'a> SignedInput<'a> {
    pub fn parse(data: &'a [u8]) -> Option<SignedInput<'a>> {
        let (&flags, rest) = data.split_first()?;
        let (manifest, payload) = match find(rest, SEPARATOR) {
            Some(i) => (&rest[..i], &rest[i + SEPARATOR.len()..]),
            None => (rest, &[][..]),
        };
        Some(SignedInput {
            flags,
            manifest,
            payload,
        })
    }

    pub fn encode(flags: u8, manifest: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = vec![flags];
        out.extend_from_slice(manifest);
        out.extend_from_slice(SEPARATOR);
        out.extend_from_slice(payload);
        out
    }

    pub fn stage(&self) -> bool {
        self.flags & STAGE != 0
    }

    /// The bundle: placeholders filled, manifest signed, payload frame appended.
    pub fn bundle(&self) -> Vec<u8> {
        let (frame, archive) = if self.flags & COMPRESS != 0 {
            let frame = zstd::bulk::compress(self.payload, 1).expect("compressing to memory");
            (frame, self.payload.to_vec())
        } else {
            let mut archive = Vec::new();
            if let Ok(mut dec) = zstd::stream::read::Decoder::new(self.payload) {
                // the verifier's window cap, so this decoder allocates no more than it does;
                // a broken frame leaves what was decoded before the error
                if dec.window_log_max(23).is_ok() {
                    let _ = dec.take(PLACEHOLDER_CAP).read_to_end(&mut archive);
                }
            }
            (self.payload.to_vec(), archive)
        };
        let mut manifest = self.manifest.to_vec();
        if find(&manifest, b"@").is_some() {
            manifest = replace(
                &manifest,
                b"@PAYLOAD_SIZE@",
                frame.len().to_string().as_bytes(),
            );
            manifest = replace(&manifest, b"@PAYLOAD_SHA@", sha(&frame).as_bytes());
            for (i, data) in entries(&archive).into_iter().take(10).enumerate() {
                let size = data.len().to_string();
                manifest = replace(&manifest, format!("@SIZE{i}@").as_bytes(), size.as_bytes());
                manifest = replace(
                    &manifest,
                    format!("@SHA{i}@").as_bytes(),
                    sha(data).as_bytes(),
                );
            }
        }
        let mut bundle = head(&manifest);
        bundle.extend_from_slice(&frame);
        bundle
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn replace(hay: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut rest = hay;
    while let Some(i) = find(rest, needle) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(with);
        rest = &rest[i + needle.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// The data of each entry of a tar archive, walked leniently (octal size at 124..136, data
/// clamped to the archive), up to the first all-zero block.
pub fn entries(archive: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at + 512 <= archive.len() && out.len() < 10 {
        let block = &archive[at..at + 512];
        if block.iter().all(|&b| b == 0) {
            break;
        }
        let size = block[124..136]
            .iter()
            .filter(|b| (b'0'..=b'7').contains(b))
            .fold(0u64, |v, &b| {
                v.saturating_mul(8).saturating_add(u64::from(b - b'0'))
            });
        let start = at + 512;
        let end = start
            .saturating_add(size.min(archive.len() as u64) as usize)
            .min(archive.len());
        out.push(&archive[start..end]);
        at = start.saturating_add(
            size.div_ceil(512)
                .saturating_mul(512)
                .min(archive.len() as u64) as usize,
        );
    }
    out
}
