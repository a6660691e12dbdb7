//! Bundle delivery over MQTT (wire types, version 1): the device asks for chunks of a bundle
//! by its SHA-256, the fleet answers with binary chunk frames that carry their own SHA-256.
//!
//! Topics (under the protocol prefix, `edge/v1` by default):
//! - `<prefix>/<device>/bundle/get` (device → fleet, QoS 1): a JSON [`ChunkRequest`].
//! - `<prefix>/<device>/bundle/chunk` (fleet → device, QoS 1): one frame per chunk,
//!   [`encode_frame`] / [`decode_frame`]: the 4 bytes `EBC1`, a 4-byte big-endian header
//!   length, the JSON [`ChunkHeader`], then the chunk's bytes.
//!
//! The device asks for a window of at most [`MAX_WINDOW`] chunks, writes and fsyncs each
//! verified chunk, then asks for the next window; after a disconnect or a restart it asks
//! again from the first chunk it does not have. Nothing here is trusted: the per-chunk hash
//! catches damage in transit, and the whole file must still match the SHA-256 in the signed
//! directive and pass the bundle's own signature check before anything is installed.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::wire::{WireError, VERSION};

/// The first four bytes of a chunk frame.
pub const FRAME_MAGIC: [u8; 4] = *b"EBC1";
/// Largest header JSON in a frame.
pub const MAX_HEADER_BYTES: usize = 4096;
/// Largest chunk the fleet sends (the fleet's configured chunk size is at most this).
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Default chunk size (fits the default 2 MiB broker payload limit with room to spare).
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;
/// Most chunks one request may ask for.
pub const MAX_WINDOW: u32 = 16;

/// `<prefix>/<device>/bundle/get` leaf.
pub const GET_LEAF: &str = "bundle/get";
/// `<prefix>/<device>/bundle/chunk` leaf.
pub const CHUNK_LEAF: &str = "bundle/chunk";

/// Device → fleet: send chunks `from .. from + count` of the bundle with this hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRequest {
    pub v: u32,
    /// SHA-256 of the whole bundle file, 64 lowercase hex digits.
    pub sha256: String,
    /// Index of the first chunk wanted (0-based).
    pub from: u32,
    /// How many chunks (1..=[`MAX_WINDOW`]); fewer are sent at the end of the file.
    pub count: u32,
}

/// Fleet → device: one chunk's header. When `error` is set there are no data bytes (the
/// fleet does not have the bundle, or the request was malformed) and the device gives up the
/// download, reporting the error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHeader {
    pub v: u32,
    /// SHA-256 of the whole bundle.
    pub sha256: String,
    /// This chunk's index (0-based).
    pub index: u32,
    /// Number of chunks in the bundle.
    pub chunks: u32,
    /// Chunk size used for this bundle (every chunk but the last has exactly this size).
    pub chunk_bytes: u32,
    /// Size of the whole bundle file.
    pub bundle_bytes: u64,
    /// SHA-256 of this chunk's bytes, 64 lowercase hex digits.
    pub data_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A decoded frame: the header and the chunk bytes (verified against `data_sha256`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: ChunkHeader,
    pub data: Vec<u8>,
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::trust::hex(&Sha256::digest(bytes))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Number of chunks of a `bundle_bytes` file cut in `chunk_bytes` pieces (at least 1).
pub fn chunk_count(bundle_bytes: u64, chunk_bytes: u32) -> u32 {
    let c = u64::from(chunk_bytes.max(1));
    u32::try_from(bundle_bytes.div_ceil(c).max(1)).unwrap_or(u32::MAX)
}

/// Parses and checks a [`ChunkRequest`] (version, hash syntax, window).
pub fn parse_request(payload: &[u8]) -> Result<ChunkRequest, WireError> {
    let what = "chunk request";
    if payload.len() > MAX_HEADER_BYTES {
        return Err(WireError::TooLarge {
            what,
            got: payload.len(),
            limit: MAX_HEADER_BYTES,
        });
    }
    let r: ChunkRequest =
        serde_json::from_slice(payload).map_err(|source| WireError::Json { what, source })?;
    if r.v != VERSION {
        return Err(WireError::UnsupportedVersion {
            what,
            got: u64::from(r.v),
        });
    }
    if !is_sha256_hex(&r.sha256) {
        return Err(WireError::Field {
            what,
            field: "sha256",
            problem: "expected 64 lowercase hex digits".into(),
        });
    }
    if r.count == 0 || r.count > MAX_WINDOW {
        return Err(WireError::Field {
            what,
            field: "count",
            problem: format!("{} is not in 1..={MAX_WINDOW}", r.count),
        });
    }
    Ok(r)
}

/// Encodes a frame: magic, header length, header JSON, data.
pub fn encode_frame(header: &ChunkHeader, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap_or_else(|_| b"{}".to_vec());
    let len = u32::try_from(json.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(8 + json.len() + data.len());
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    out
}

/// The frame for chunk `index` of `bundle` (the whole file's bytes) cut in `chunk_bytes`
/// pieces; `None` when `index` is past the end.
pub fn frame_for(bundle: &[u8], sha256: &str, chunk_bytes: u32, index: u32) -> Option<Vec<u8>> {
    let total = chunk_count(bundle.len() as u64, chunk_bytes);
    if index >= total {
        return None;
    }
    let start = usize::try_from(u64::from(index) * u64::from(chunk_bytes)).ok()?;
    let end = start.saturating_add(chunk_bytes as usize).min(bundle.len());
    let data = bundle.get(start..end)?;
    let header = ChunkHeader {
        v: VERSION,
        sha256: sha256.to_string(),
        index,
        chunks: total,
        chunk_bytes,
        bundle_bytes: bundle.len() as u64,
        data_sha256: sha256_hex(data),
        error: None,
    };
    Some(encode_frame(&header, data))
}

/// An error frame for a request the fleet cannot serve.
pub fn error_frame(sha256: &str, index: u32, error: &str) -> Vec<u8> {
    encode_frame(
        &ChunkHeader {
            v: VERSION,
            sha256: sha256.to_string(),
            index,
            chunks: 0,
            chunk_bytes: 0,
            bundle_bytes: 0,
            data_sha256: String::new(),
            error: Some(error.to_string()),
        },
        &[],
    )
}

/// Decodes a frame and checks it: magic, header size and syntax, version, sizes consistent
/// with the header, and the chunk's SHA-256. An error frame decodes with empty data.
pub fn decode_frame(payload: &[u8]) -> Result<Frame, WireError> {
    let what = "chunk frame";
    let field = |field: &'static str, problem: String| WireError::Field {
        what,
        field,
        problem,
    };
    if payload.len() < 8 || payload[..4] != FRAME_MAGIC {
        return Err(field(
            "magic",
            "the payload does not start with EBC1".into(),
        ));
    }
    let len = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]) as usize;
    if len > MAX_HEADER_BYTES || 8 + len > payload.len() {
        return Err(field(
            "header",
            format!(
                "header length {len} is too large for a payload of {} bytes",
                payload.len()
            ),
        ));
    }
    let header: ChunkHeader = serde_json::from_slice(&payload[8..8 + len])
        .map_err(|source| WireError::Json { what, source })?;
    if header.v != VERSION {
        return Err(WireError::UnsupportedVersion {
            what,
            got: u64::from(header.v),
        });
    }
    if !is_sha256_hex(&header.sha256) {
        return Err(field("sha256", "expected 64 lowercase hex digits".into()));
    }
    let data = &payload[8 + len..];
    if header.error.is_some() {
        return Ok(Frame {
            header,
            data: Vec::new(),
        });
    }
    if header.chunk_bytes == 0 || header.chunk_bytes as usize > MAX_CHUNK_BYTES {
        return Err(field(
            "chunk_bytes",
            format!("{} is not in 1..={MAX_CHUNK_BYTES}", header.chunk_bytes),
        ));
    }
    let chunks = chunk_count(header.bundle_bytes, header.chunk_bytes);
    if header.chunks != chunks || header.index >= chunks {
        return Err(field(
            "index",
            format!(
                "chunk {} of {} does not fit a bundle of {} bytes in chunks of {}",
                header.index, header.chunks, header.bundle_bytes, header.chunk_bytes
            ),
        ));
    }
    let start = u64::from(header.index) * u64::from(header.chunk_bytes);
    let expected = (header.bundle_bytes - start).min(u64::from(header.chunk_bytes));
    if data.len() as u64 != expected {
        return Err(field(
            "data",
            format!("{} bytes, expected {expected}", data.len()),
        ));
    }
    if sha256_hex(data) != header.data_sha256 {
        return Err(field(
            "data_sha256",
            format!("chunk {} does not match its hash", header.index),
        ));
    }
    Ok(Frame {
        header,
        data: data.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_cover_the_file() {
        let bundle: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let sha = sha256_hex(&bundle);
        let n = chunk_count(bundle.len() as u64, 4096);
        assert_eq!(n, 3);
        let mut joined = Vec::new();
        for i in 0..n {
            let f = decode_frame(&frame_for(&bundle, &sha, 4096, i).unwrap()).unwrap();
            assert_eq!(f.header.index, i);
            joined.extend_from_slice(&f.data);
        }
        assert_eq!(joined, bundle);
        assert!(frame_for(&bundle, &sha, 4096, 3).is_none());
    }

    #[test]
    fn damaged_frames_are_refused_with_the_field() {
        let bundle = vec![7u8; 5000];
        let sha = sha256_hex(&bundle);
        let mut f = frame_for(&bundle, &sha, 4096, 1).unwrap();
        let last = f.len() - 1;
        f[last] ^= 1;
        let e = decode_frame(&f).unwrap_err().to_string();
        assert!(e.contains("data_sha256"), "{e}");
        let mut short = frame_for(&bundle, &sha, 4096, 1).unwrap();
        short.pop();
        let e = decode_frame(&short).unwrap_err().to_string();
        assert!(e.contains("expected 904"), "{e}");
        let e = decode_frame(b"XXXX\0\0\0\0").unwrap_err().to_string();
        assert!(e.contains("EBC1"), "{e}");
        let e = decode_frame(b"EBC1\xff\xff\xff\xff{}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("header length"), "{e}");
        let err = decode_frame(&error_frame(&sha, 0, "unknown bundle")).unwrap();
        assert_eq!(err.header.error.as_deref(), Some("unknown bundle"));
    }

    #[test]
    fn requests_are_checked() {
        let sha = "a".repeat(64);
        let ok = format!(r#"{{"v":1,"sha256":"{sha}","from":0,"count":4}}"#);
        assert_eq!(parse_request(ok.as_bytes()).unwrap().count, 4);
        let big = format!(r#"{{"v":1,"sha256":"{sha}","from":0,"count":17}}"#);
        assert!(parse_request(big.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("count"));
        let bad = r#"{"v":1,"sha256":"xyz","from":0,"count":1}"#;
        assert!(parse_request(bad.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("sha256"));
        let v2 = format!(r#"{{"v":2,"sha256":"{sha}","from":0,"count":1}}"#);
        assert!(parse_request(v2.as_bytes()).is_err());
    }
}
