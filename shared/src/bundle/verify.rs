//! Streaming bundle verification: one pass over the compressed file, signature before
//! anything else is looked at, every byte counted and hashed as it is kept.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::manifest::Manifest;
use super::stored;
use super::ustar::{self, Kind, BLOCK};
use super::{check_path, BundleError, MANIFEST_NAME, SIGNATURE_NAME};
use crate::trust::{hex, KeyId, SignatureEntry, Trust};

/// Bounds applied while reading a bundle.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest `manifest.json` (bytes).
    pub max_manifest_bytes: u64,
    /// Largest sum of the files a manifest may list (bytes, decompressed).
    pub max_total_bytes: u64,
    /// Largest zstd window accepted (log2 bytes): bounds decoder memory.
    pub window_log_max: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_manifest_bytes: 8 * 1024 * 1024,
            max_total_bytes: 1024 * 1024 * 1024,
            window_log_max: 23,
        }
    }
}

const MAX_SIGNATURE_BYTES: u64 = 4096;
/// Slack for the archive's end: two zero blocks plus padding to a 10240-byte record.
const END_SLACK: u64 = 2 * BLOCK as u64 + 10240;
const CHUNK: usize = 256 * 1024;

/// A private directory (mode 0700) holding verified files; removed on drop unless kept.
#[derive(Debug)]
pub struct Staging {
    dir: tempfile::TempDir,
}

impl Staging {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Path of a manifest file inside the staging directory.
    pub fn file(&self, manifest_path: &str) -> PathBuf {
        self.dir.path().join(manifest_path)
    }

    /// Keeps the directory (no removal on drop) and returns its path.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

/// A bundle whose signature, manifest and every file were checked.
#[derive(Debug)]
pub struct Verified {
    pub manifest: Manifest,
    /// The exact signed bytes.
    pub manifest_bytes: Vec<u8>,
    pub signature: SignatureEntry,
    pub signer: KeyId,
    /// Present when verification was asked to keep the files.
    pub staging: Option<Staging>,
    /// Bytes of the bundle file read.
    pub compressed_bytes: u64,
    /// Bytes of archive decompressed.
    pub archive_bytes: u64,
}

/// The decompressed archive, read only in the amounts asked for and never past `limit`.
struct Stream<R: BufRead> {
    dec: zstd::stream::read::Decoder<'static, R>,
    consumed: u64,
    limit: u64,
    limit_what: String,
}

impl<R: BufRead> Stream<R> {
    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<(), BundleError> {
        self.reserve(buf.len())?;
        self.dec
            .read_exact(buf)
            .map_err(|e| stream_error(e, what))?;
        self.consumed += buf.len() as u64;
        Ok(())
    }

    fn reserve(&self, n: usize) -> Result<(), BundleError> {
        if self.consumed.saturating_add(n as u64) > self.limit {
            return Err(BundleError::TooLarge {
                limit: self.limit,
                what: self.limit_what.clone(),
            });
        }
        Ok(())
    }

    /// Reads up to `buf.len()` bytes; 0 at the end of the stream.
    fn read_some(&mut self, buf: &mut [u8]) -> Result<usize, BundleError> {
        self.reserve(1)?;
        let room = (self.limit - self.consumed).min(buf.len() as u64) as usize;
        let n = self
            .dec
            .read(&mut buf[..room])
            .map_err(|e| stream_error(e, "the end of the archive"))?;
        self.consumed += n as u64;
        Ok(n)
    }

    fn header(&mut self) -> Result<Option<ustar::Header>, BundleError> {
        let mut block = [0u8; BLOCK];
        self.read_exact(&mut block, "a header")?;
        ustar::parse(&block).map_err(BundleError::Archive)
    }

    fn skip_padding(&mut self, size: u64) -> Result<(), BundleError> {
        let pad = (ustar::padded(size) - size) as usize;
        let mut block = [0u8; BLOCK];
        self.read_exact(&mut block[..pad], "padding")?;
        if block[..pad].iter().any(|&b| b != 0) {
            return Err(BundleError::Archive(
                "non-zero bytes in the padding after an entry".into(),
            ));
        }
        Ok(())
    }
}

fn stream_error(e: std::io::Error, what: &str) -> BundleError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        BundleError::Archive(format!("truncated: the file ends inside {what}"))
    } else {
        BundleError::Compression(format!("{e} (while reading {what})"))
    }
}

fn entry_err(index: usize, name: &str, message: impl Into<String>) -> BundleError {
    BundleError::Entry {
        index,
        name: name.to_string(),
        message: message.into(),
    }
}

/// Counts and hashes the signed payload as the decoder pulls it, never past its signed size.
struct PayloadReader<R: Read> {
    inner: R,
    left: u64,
    hasher: Sha256,
}

impl<R: Read> Read for PayloadReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let room = self.left.min(buf.len() as u64) as usize;
        if room == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..room])?;
        self.hasher.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Verifies the bundle at `path` under `trust` at time `now`. With `staging_parent`, the
/// listed files are kept in a new private directory inside it (same filesystem as the final
/// location, so the caller can rename it into place); without, they are hashed and dropped.
pub fn verify(
    path: &Path,
    trust: &Trust,
    limits: &Limits,
    staging_parent: Option<&Path>,
    now: OffsetDateTime,
) -> Result<Verified, BundleError> {
    let file = File::open(path).map_err(|source| BundleError::Read {
        path: path.display().to_string(),
        source,
    })?;
    verify_reader(
        file,
        &path.display().to_string(),
        trust,
        limits,
        staging_parent,
        now,
    )
}

/// [`verify`] over any byte source; `name` names it in errors.
pub fn verify_reader<R: Read>(
    source: R,
    name: &str,
    trust: &Trust,
    limits: &Limits,
    staging_parent: Option<&Path>,
    now: OffsetDateTime,
) -> Result<Verified, BundleError> {
    let read_err = |source| BundleError::Read {
        path: name.to_string(),
        source,
    };
    let mut reader = BufReader::with_capacity(CHUNK, source);

    // 1. The manifest frame (canonical stored blocks): manifest.json, then manifest.sig.
    let cap = 2 * BLOCK as u64 + ustar::padded(limits.max_manifest_bytes) + MAX_SIGNATURE_BYTES;
    let head = stored::decode(&mut reader, cap).map_err(BundleError::Archive)?;
    let head_frame_bytes = stored::encoded_len(head.len());
    let mut at = &head[..];
    let manifest_bytes = read_small(&mut at, 0, MANIFEST_NAME, limits.max_manifest_bytes)?;
    let sig_bytes = read_small(&mut at, 1, SIGNATURE_NAME, MAX_SIGNATURE_BYTES)?;
    if !at.is_empty() {
        return Err(BundleError::Archive(
            "the manifest frame holds more than manifest.json and manifest.sig".into(),
        ));
    }
    let signature: SignatureEntry = serde_json::from_slice(&sig_bytes)
        .map_err(|e| entry_err(1, SIGNATURE_NAME, format!("not a signature file: {e}")))?;

    // 2. The signature over the exact bytes, before the manifest is parsed.
    let signer = trust.authenticate(&manifest_bytes, &signature, now)?;
    let manifest = Manifest::parse(&manifest_bytes).map_err(BundleError::Manifest)?;
    signer.authorize(&manifest.name)?;
    let total = manifest.total_size();
    if total > limits.max_total_bytes {
        return Err(BundleError::TooLarge {
            limit: limits.max_total_bytes,
            what: format!("the manifest lists {total} bytes of files"),
        });
    }

    // 3. The payload frame: exactly the signed number of compressed bytes, hashed as read,
    //    decompressed only up to what the signed manifest lists.
    let payload = PayloadReader {
        inner: reader,
        left: manifest.payload.size,
        hasher: Sha256::new(),
    };
    let mut dec =
        zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(CHUNK, payload))
            .map_err(|e| BundleError::Compression(e.to_string()))?
            .single_frame();
    dec.window_log_max(limits.window_log_max)
        .map_err(|e| BundleError::Compression(e.to_string()))?;
    let archive: u64 = manifest
        .files
        .iter()
        .map(|f| BLOCK as u64 + ustar::padded(f.size))
        .fold(0u64, u64::saturating_add);
    let mut s = Stream {
        dec,
        consumed: 0,
        limit: archive.saturating_add(END_SLACK),
        limit_what: "the files listed in the manifest".into(),
    };

    let staging = match staging_parent {
        Some(parent) => Some(Staging {
            dir: private_dir_builder()
                .tempdir_in(parent)
                .map_err(|source| BundleError::Write {
                    path: parent.display().to_string(),
                    source,
                })?,
        }),
        None => None,
    };

    let mut seen: HashSet<String> = HashSet::new();
    let mut buf = vec![0u8; CHUNK];
    let mut index = 2;
    while let Some(h) = s.header()? {
        if h.kind != Kind::Regular {
            return Err(entry_err(
                index,
                &h.name,
                format!(
                    "{} entries are not allowed (regular files only)",
                    h.kind.describe()
                ),
            ));
        }
        check_path(&h.name).map_err(|e| entry_err(index, &h.name, e))?;
        let Some(entry) = manifest.files.iter().find(|f| f.path == h.name) else {
            return Err(entry_err(index, &h.name, "not listed in the manifest"));
        };
        if !seen.insert(h.name.clone()) {
            return Err(entry_err(index, &h.name, "appears twice in the archive"));
        }
        if h.size != entry.size {
            return Err(entry_err(
                index,
                &h.name,
                format!("{} bytes, the manifest says {}", h.size, entry.size),
            ));
        }
        let mut out = match &staging {
            Some(st) => Some(create_in(st.path(), &h.name)?),
            None => None,
        };
        let mut hasher = Sha256::new();
        let mut left = h.size;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            s.read_exact(chunk, &format!("the content of {:?}", h.name))?;
            hasher.update(&*chunk);
            if let Some((f, p)) = out.as_mut() {
                f.write_all(chunk).map_err(|source| BundleError::Write {
                    path: p.display().to_string(),
                    source,
                })?;
            }
            left -= n as u64;
        }
        s.skip_padding(h.size)?;
        let digest = hex(&hasher.finalize());
        if digest != entry.sha256 {
            return Err(BundleError::File {
                path: h.name,
                message: format!(
                    "sha256 mismatch: the manifest says {}, the content is {digest}",
                    entry.sha256
                ),
            });
        }
        if let Some((f, p)) = out {
            f.sync_all().map_err(|source| BundleError::Write {
                path: p.display().to_string(),
                source,
            })?;
        }
        index += 1;
    }
    if let Some(missing) = manifest.files.iter().find(|f| !seen.contains(&f.path)) {
        return Err(BundleError::File {
            path: missing.path.clone(),
            message: "listed in the manifest but missing from the archive".into(),
        });
    }
    // After the first zero block: only zeros up to the end of the frame.
    loop {
        let n = match s.read_some(&mut buf) {
            Ok(n) => n,
            Err(BundleError::TooLarge { .. }) => {
                return Err(BundleError::Trailing(
                    "more data after the end-of-archive marker than tar padding allows".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(BundleError::Trailing(
                "non-zero bytes after the end-of-archive marker".into(),
            ));
        }
    }
    let archive_bytes = s.consumed + head.len() as u64;
    let mut rest = s.dec.finish();
    if !rest.fill_buf().map_err(read_err)?.is_empty() {
        return Err(BundleError::Trailing(
            "bytes after the end of the zstd frame".into(),
        ));
    }
    let mut payload = rest.into_inner();
    if payload.left > 0 {
        return Err(BundleError::Archive(format!(
            "truncated: the payload is {} bytes shorter than its signed size {}",
            payload.left, manifest.payload.size
        )));
    }
    if !payload.inner.fill_buf().map_err(read_err)?.is_empty() {
        return Err(BundleError::Trailing(
            "bytes after the signed payload".into(),
        ));
    }
    let digest = hex(&payload.hasher.finalize());
    if digest != manifest.payload.sha256 {
        return Err(BundleError::Archive(format!(
            "payload sha256 mismatch: the manifest says {}, the file has {digest}",
            manifest.payload.sha256
        )));
    }
    if let Some(st) = &staging {
        File::open(st.path())
            .and_then(|d| d.sync_all())
            .map_err(|source| BundleError::Write {
                path: st.path().display().to_string(),
                source,
            })?;
    }
    Ok(Verified {
        compressed_bytes: head_frame_bytes + manifest.payload.size,
        manifest,
        manifest_bytes,
        signature,
        signer: signer.key_id,
        staging,
        archive_bytes,
    })
}

/// Reads the manifest and signature entries of a bundle WITHOUT checking them, for display
/// (`fleetctl bundle inspect`). Nothing returned here may be acted upon.
pub fn read_unverified(path: &Path, limits: &Limits) -> Result<(Vec<u8>, Vec<u8>), BundleError> {
    let file = File::open(path).map_err(|source| BundleError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut reader = BufReader::with_capacity(CHUNK, file);
    let cap = 2 * BLOCK as u64 + ustar::padded(limits.max_manifest_bytes) + MAX_SIGNATURE_BYTES;
    let head = stored::decode(&mut reader, cap).map_err(BundleError::Archive)?;
    let mut at = &head[..];
    let manifest = read_small(&mut at, 0, MANIFEST_NAME, limits.max_manifest_bytes)?;
    let sig = read_small(&mut at, 1, SIGNATURE_NAME, MAX_SIGNATURE_BYTES)?;
    Ok((manifest, sig))
}

/// Reads one small entry (`expect`, at most `cap` bytes) from the manifest frame's content.
fn read_small(
    at: &mut &[u8],
    index: usize,
    expect: &str,
    cap: u64,
) -> Result<Vec<u8>, BundleError> {
    let truncated = || {
        BundleError::Archive(format!(
            "truncated: the manifest frame ends inside {expect} (entry {index})"
        ))
    };
    if at.len() < BLOCK {
        return Err(truncated());
    }
    let (block, rest) = at.split_at(BLOCK);
    let mut hb = [0u8; BLOCK];
    hb.copy_from_slice(block);
    let Some(h) = ustar::parse(&hb).map_err(BundleError::Archive)? else {
        return Err(BundleError::Archive(format!(
            "the archive ends before {expect} (entry {index})"
        )));
    };
    if h.kind != Kind::Regular {
        return Err(entry_err(
            index,
            &h.name,
            format!(
                "{} entries are not allowed (regular files only)",
                h.kind.describe()
            ),
        ));
    }
    if h.name != expect {
        return Err(entry_err(
            index,
            &h.name,
            format!("entry {index} must be {expect}"),
        ));
    }
    if h.size > cap {
        return Err(BundleError::TooLarge {
            limit: cap,
            what: format!("{expect} is {} bytes", h.size),
        });
    }
    let padded = ustar::padded(h.size) as usize;
    if rest.len() < padded {
        return Err(truncated());
    }
    let (data, rest) = rest.split_at(padded);
    let size = h.size as usize;
    if data[size..].iter().any(|&b| b != 0) {
        return Err(BundleError::Archive(
            "non-zero bytes in the padding after an entry".into(),
        ));
    }
    *at = rest;
    Ok(data[..size].to_vec())
}

fn private_dir_builder() -> tempfile::Builder<'static, 'static> {
    let mut b = tempfile::Builder::new();
    b.prefix(".staging-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        b.permissions(std::fs::Permissions::from_mode(0o700));
    }
    b
}

/// Creates `rel` (a checked manifest path) inside `dir`, making its parent directories.
fn create_in(dir: &Path, rel: &str) -> Result<(File, PathBuf), BundleError> {
    let path = dir.join(rel);
    let write_err = |source| BundleError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(write_err)?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(write_err)?;
    Ok((file, path))
}
