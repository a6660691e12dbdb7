//! The manifest frame: a zstd frame of raw (stored) blocks written in one canonical way, so
//! every byte of it is determined by its content and the signature over the manifest covers
//! the frame too. Any zstd decoder reads it; [`decode`] accepts only the canonical form.

use std::io::Read;

/// zstd frame magic number, little-endian.
pub const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// Frame header descriptor: 8-byte content size, single segment, no checksum, no dictionary.
const FHD: u8 = 0xE0;
/// Largest raw block.
const BLOCK_MAX: usize = 128 * 1024;

/// Encodes `content` as the canonical stored frame.
pub fn encode(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 16 + 3 * (content.len() / BLOCK_MAX + 1));
    out.extend_from_slice(&MAGIC);
    out.push(FHD);
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

/// Length of the stored frame [`encode`] makes for `content_len` bytes.
pub fn encoded_len(content_len: usize) -> u64 {
    let blocks = content_len.div_ceil(BLOCK_MAX).max(1);
    (13 + 3 * blocks + content_len) as u64
}

/// Reads one canonical stored frame of at most `cap` content bytes from `r`.
pub fn decode<R: Read>(r: &mut R, cap: u64) -> Result<Vec<u8>, String> {
    let eof = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "truncated: the file ends inside the manifest frame".to_string()
        } else {
            e.to_string()
        }
    };
    let mut head = [0u8; 13];
    r.read_exact(&mut head[..4]).map_err(eof)?;
    if head[..4] != MAGIC {
        return Err("not a bundle: the file does not start with a zstd frame".into());
    }
    r.read_exact(&mut head[4..]).map_err(eof)?;
    if head[4] != FHD {
        return Err(format!(
            "not a bundle: the first zstd frame is not a canonical stored frame (header byte {:#04x})",
            head[4]
        ));
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&head[5..13]);
    let size = u64::from_le_bytes(size);
    if size > cap {
        return Err(format!(
            "the manifest frame holds {size} bytes (limit {cap})"
        ));
    }
    let mut content = vec![0u8; size as usize];
    let mut at = 0usize;
    loop {
        let mut bh = [0u8; 4];
        r.read_exact(&mut bh[..3]).map_err(eof)?;
        let header = u32::from_le_bytes(bh);
        let n = content.len().saturating_sub(at).min(BLOCK_MAX);
        let last = at + n == content.len();
        if header != ((n as u32) << 3) | u32::from(last) {
            return Err(format!(
                "the manifest frame is not canonical: block header {header:#08x} at content offset {at}"
            ));
        }
        r.read_exact(&mut content[at..at + n]).map_err(eof)?;
        at += n;
        if last {
            return Ok(content);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_zstd_reads_it() {
        for len in [0usize, 1, 511, BLOCK_MAX, BLOCK_MAX + 1, 3 * BLOCK_MAX + 17] {
            let content: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let frame = encode(&content);
            assert_eq!(frame.len() as u64, encoded_len(len));
            assert_eq!(decode(&mut &frame[..], 1 << 30).unwrap(), content);
            assert_eq!(zstd::decode_all(&frame[..]).unwrap(), content);
        }
    }

    #[test]
    fn refuses_anything_else() {
        let frame = encode(b"hello");
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            let ok = decode(&mut &bad[..], 100);
            assert!(
                ok.is_err() || ok.as_deref() != Ok(&b"hello"[..]),
                "flip at {i}"
            );
        }
        let normal = zstd::encode_all(&b"hello"[..], 3).unwrap();
        assert!(decode(&mut &normal[..], 100)
            .unwrap_err()
            .contains("canonical"));
        assert!(decode(&mut &frame[..5], 100)
            .unwrap_err()
            .contains("truncated"));
        assert!(decode(&mut &frame[..], 2).unwrap_err().contains("limit 2"));
    }
}
