//! Writing bundles: hash the files, sign the manifest, pack and compress to a temporary file
//! that is renamed into place only when complete.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::manifest::{FileEntry, Manifest, Payload};
use super::stored;
use super::ustar::{self, BLOCK};
use super::{BundleError, MANIFEST_NAME, SIGNATURE_NAME};
use crate::trust::{hex, SecretKey};

/// Compression level of written bundles.
pub const ZSTD_LEVEL: i32 = 10;
/// Window of written bundles (log2 bytes); the verifier's default cap.
pub const ZSTD_WINDOW_LOG: u32 = 23;
const CHUNK: usize = 256 * 1024;

/// A file to put into a bundle: its path inside the bundle and where to read it.
#[derive(Debug, Clone)]
pub struct BundleFile {
    pub path: String,
    pub source: PathBuf,
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Read {
        path: path.display().to_string(),
        source,
    }
}

/// SHA-256 (hex) and size of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(String, u64), BundleError> {
    let mut f = File::open(path).map_err(read_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(read_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&hasher.finalize()), size))
}

/// Hashes and counts what passes through to `inner`.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Fills `manifest.files` and `manifest.payload` from `files`, signs the manifest with `key`
/// and writes the bundle to `out` (temporary file, fsync, rename). Fails, leaving `out`
/// untouched, if a file changes while it is packed. Returns the bundle's size in bytes.
pub fn write_bundle(
    manifest: &mut Manifest,
    files: &[BundleFile],
    key: &SecretKey,
    out: &Path,
) -> Result<u64, BundleError> {
    manifest.files.clear();
    for f in files {
        let (sha256, size) = hash_file(&f.source)?;
        manifest.files.push(FileEntry {
            path: f.path.clone(),
            size,
            sha256,
        });
    }
    let mtime = crate::trust::parse_time(&manifest.created)
        .map(|t| t.unix_timestamp().max(0) as u64)
        .unwrap_or(0);
    let write_err = |source| BundleError::Write {
        path: out.display().to_string(),
        source,
    };
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };

    // 1. The payload: the listed files and the end of the archive, one zstd frame, into a
    //    temporary file, hashed as compressed.
    let body = tempfile::Builder::new()
        .prefix(".bundle-body-")
        .tempfile_in(dir)
        .map_err(write_err)?;
    let hw = HashingWriter {
        inner: BufWriter::with_capacity(CHUNK, body.as_file()),
        hasher: Sha256::new(),
        size: 0,
    };
    let mut enc = zstd::stream::write::Encoder::new(hw, ZSTD_LEVEL).map_err(write_err)?;
    enc.window_log(ZSTD_WINDOW_LOG).map_err(write_err)?;
    let mut buf = vec![0u8; CHUNK];
    for (f, entry) in files.iter().zip(&manifest.files) {
        let h = ustar::header(&entry.path, entry.size, mtime).map_err(BundleError::Manifest)?;
        enc.write_all(&h).map_err(write_err)?;
        let src = File::open(&f.source).map_err(read_err(&f.source))?;
        let mut src = src.take(entry.size + 1);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = src.read(&mut buf).map_err(read_err(&f.source))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > entry.size {
                break;
            }
            hasher.update(&buf[..n]);
            enc.write_all(&buf[..n]).map_err(write_err)?;
        }
        if size != entry.size || hex(&hasher.finalize()) != entry.sha256 {
            return Err(BundleError::File {
                path: f.source.display().to_string(),
                message: "changed while the bundle was being written".into(),
            });
        }
        let pad = (ustar::padded(size) - size) as usize;
        enc.write_all(&[0u8; BLOCK][..pad]).map_err(write_err)?;
    }
    enc.write_all(&[0u8; 2 * BLOCK]).map_err(write_err)?;
    let mut hw = enc.finish().map_err(write_err)?;
    hw.flush().map_err(write_err)?;
    let (payload_size, digest) = (hw.size, hw.hasher.finalize());
    drop(hw.inner);
    manifest.payload = Payload {
        size: payload_size,
        sha256: hex(&digest),
    };

    // 2. The signed manifest, in the canonical stored frame, then the payload.
    let head = signed_head(manifest, key, mtime)?;
    let tmp = tempfile::Builder::new()
        .prefix(".bundle-")
        .tempfile_in(dir)
        .map_err(write_err)?;
    let mut w = BufWriter::with_capacity(CHUNK, tmp.as_file());
    w.write_all(&head).map_err(write_err)?;
    let mut body_file = body.as_file();
    body_file.seek(SeekFrom::Start(0)).map_err(write_err)?;
    let copied = std::io::copy(&mut body_file, &mut w).map_err(write_err)?;
    if copied != manifest.payload.size {
        return Err(BundleError::Write {
            path: out.display().to_string(),
            source: std::io::Error::other("the payload changed size while being copied"),
        });
    }
    w.flush().map_err(write_err)?;
    drop(w);
    tmp.as_file().sync_all().map_err(write_err)?;
    let size = tmp
        .as_file()
        .metadata()
        .map(|m| m.len())
        .map_err(write_err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(write_err)?;
    }
    tmp.persist(out).map_err(|e| write_err(e.error))?;
    Ok(size)
}

/// Assembles bundle bytes around an already compressed payload (one zstd frame holding the
/// file entries and the end of the archive): sets `manifest.payload`, signs, and returns the
/// manifest frame followed by `payload`. For tools and tests that build payloads themselves;
/// [`write_bundle`] is the normal way.
pub fn assemble(
    manifest: &mut Manifest,
    payload: &[u8],
    key: &SecretKey,
) -> Result<Vec<u8>, BundleError> {
    manifest.payload = Payload {
        size: payload.len() as u64,
        sha256: hex(&Sha256::digest(payload)),
    };
    let mut out = signed_head(manifest, key, 0)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// The manifest frame: `manifest.json` and its signature as ustar entries, in the
/// canonical stored zstd frame.
fn signed_head(manifest: &Manifest, key: &SecretKey, mtime: u64) -> Result<Vec<u8>, BundleError> {
    manifest.validate().map_err(BundleError::Manifest)?;
    let manifest_bytes = manifest.to_bytes().map_err(BundleError::Manifest)?;
    let mut sig_bytes = serde_json::to_vec_pretty(&key.sign(&manifest_bytes))
        .map_err(|e| BundleError::Manifest(e.to_string()))?;
    sig_bytes.push(b'\n');
    let mut head = Vec::with_capacity(manifest_bytes.len() + sig_bytes.len() + 4 * BLOCK);
    for (name, bytes) in [
        (MANIFEST_NAME, &manifest_bytes),
        (SIGNATURE_NAME, &sig_bytes),
    ] {
        let h = ustar::header(name, bytes.len() as u64, mtime).map_err(BundleError::Manifest)?;
        head.extend_from_slice(&h);
        head.extend_from_slice(bytes);
        head.resize(ustar::padded(head.len() as u64) as usize, 0);
    }
    Ok(stored::encode(&head))
}
