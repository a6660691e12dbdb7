//! A strict ustar header codec: the bundle reader accepts regular files only and names every
//! other entry type it refuses; it never follows links, never creates directories from
//! archive entries and never reads an extended header into memory.

/// Size of a tar block.
pub const BLOCK: usize = 512;

/// What a header describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Directory,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    PaxHeader,
    GnuLongName,
    Other(u8),
}

impl Kind {
    pub fn describe(self) -> String {
        match self {
            Kind::Regular => "regular file".into(),
            Kind::Directory => "directory".into(),
            Kind::Symlink => "symbolic link".into(),
            Kind::Hardlink => "hard link".into(),
            Kind::CharDevice => "character device".into(),
            Kind::BlockDevice => "block device".into(),
            Kind::Fifo => "FIFO".into(),
            Kind::PaxHeader => "PAX extended header".into(),
            Kind::GnuLongName => "GNU long name/link header".into(),
            Kind::Other(b) => format!("entry of type {:?}", b as char),
        }
    }
}

/// A parsed header.
#[derive(Debug, Clone)]
pub struct Header {
    pub name: String,
    pub size: u64,
    pub kind: Kind,
}

/// Rounds `n` up to whole blocks.
pub fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK as u64) * BLOCK as u64
}

fn field_str(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    &bytes[..end]
}

fn octal(bytes: &[u8], what: &str) -> Result<u64, String> {
    if bytes.first().is_some_and(|b| b & 0x80 != 0) {
        return Err(format!("{what} uses the base-256 extension (over 8 GiB)"));
    }
    let text = field_str(bytes);
    let trimmed: Vec<u8> = text
        .iter()
        .copied()
        .skip_while(|b| *b == b' ')
        .take_while(|b| *b != b' ')
        .collect();
    if trimmed.is_empty() {
        return Ok(0);
    }
    let mut v: u64 = 0;
    for b in trimmed {
        if !(b'0'..=b'7').contains(&b) {
            return Err(format!("{what} field is not octal"));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or_else(|| format!("{what} field overflows"))?;
    }
    Ok(v)
}

/// Parses one header block. `Ok(None)` for an all-zero block (end of archive).
pub fn parse(block: &[u8; BLOCK]) -> Result<Option<Header>, String> {
    if block.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let stored = octal(&block[148..156], "checksum")?;
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
        return Err("header checksum mismatch (not a tar header, or corrupted)".into());
    }
    let magic = &block[257..265];
    let posix = &magic[..6] == b"ustar\0";
    let gnu = magic == b"ustar  \0";
    if !posix && !gnu {
        return Err("not a ustar header (old v7 format or garbage)".into());
    }
    let mut name = field_str(&block[..100]).to_vec();
    if posix {
        let prefix = field_str(&block[345..500]);
        if !prefix.is_empty() {
            let mut full = prefix.to_vec();
            full.push(b'/');
            full.extend_from_slice(&name);
            name = full;
        }
    }
    let name = String::from_utf8(name).map_err(|_| "entry name is not UTF-8".to_string())?;
    let size = octal(&block[124..136], "size")?;
    let kind = match block[156] {
        b'0' | 0 => Kind::Regular,
        b'1' => Kind::Hardlink,
        b'2' => Kind::Symlink,
        b'3' => Kind::CharDevice,
        b'4' => Kind::BlockDevice,
        b'5' => Kind::Directory,
        b'6' => Kind::Fifo,
        b'x' | b'g' => Kind::PaxHeader,
        b'L' | b'K' => Kind::GnuLongName,
        other => Kind::Other(other),
    };
    Ok(Some(Header { name, size, kind }))
}

fn put_octal(field: &mut [u8], value: u64) {
    // width-1 digits, then NUL
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    let bytes = text.as_bytes();
    let start = bytes.len().saturating_sub(digits);
    field[..digits].copy_from_slice(&bytes[start..]);
    field[digits] = 0;
}

/// A POSIX ustar header for a regular file (mode 0644, uid/gid 0). `name` must be at most
/// 100 bytes, or split at a `/` into a prefix of at most 155 and a name of at most 100.
pub fn header(name: &str, size: u64, mtime: u64) -> Result<[u8; BLOCK], String> {
    if size >= 1 << 33 {
        return Err(format!(
            "{name}: {size} bytes is too large for a ustar entry"
        ));
    }
    let mut block = [0u8; BLOCK];
    let bytes = name.as_bytes();
    let (prefix, base) = if bytes.len() <= 100 {
        (&b""[..], bytes)
    } else {
        let split = (0..bytes.len())
            .rev()
            .find(|&i| bytes[i] == b'/' && i <= 155 && bytes.len() - i - 1 <= 100)
            .ok_or_else(|| format!("{name}: path too long for ustar"))?;
        (&bytes[..split], &bytes[split + 1..])
    };
    block[..base.len()].copy_from_slice(base);
    put_octal(&mut block[100..108], 0o644);
    put_octal(&mut block[108..116], 0);
    put_octal(&mut block[116..124], 0);
    put_octal(&mut block[124..136], size);
    put_octal(&mut block[136..148], mtime.min((1 << 33) - 1));
    block[156] = b'0';
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    put_octal(&mut block[329..337], 0);
    put_octal(&mut block[337..345], 0);
    block[345..345 + prefix.len()].copy_from_slice(prefix);
    block[148..156].copy_from_slice(b"        ");
    let sum: u64 = block.iter().map(|&b| u64::from(b)).sum();
    put_octal(&mut block[148..155], sum);
    block[155] = b' ';
    Ok(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_checksum_is_checked() {
        let h = header("model.onnx", 1234, 1_700_000_000).unwrap();
        let back = parse(&h).unwrap().unwrap();
        assert_eq!(back.name, "model.onnx");
        assert_eq!(back.size, 1234);
        assert_eq!(back.kind, Kind::Regular);
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(90));
        let back = parse(&header(&long, 1, 0).unwrap()).unwrap().unwrap();
        assert_eq!(back.name, long);
        let mut bad = h;
        bad[0] ^= 1;
        assert!(parse(&bad).unwrap_err().contains("checksum"));
        assert!(parse(&[0u8; BLOCK]).unwrap().is_none());
        assert!(header(&"x".repeat(300), 1, 0).is_err());
    }

    #[test]
    fn reads_headers_written_by_the_tar_crate() {
        for (kind, expect) in [
            (tar::EntryType::Regular, Kind::Regular),
            (tar::EntryType::Symlink, Kind::Symlink),
            (tar::EntryType::Link, Kind::Hardlink),
            (tar::EntryType::Char, Kind::CharDevice),
            (tar::EntryType::Block, Kind::BlockDevice),
            (tar::EntryType::Directory, Kind::Directory),
            (tar::EntryType::Fifo, Kind::Fifo),
            (tar::EntryType::XHeader, Kind::PaxHeader),
            (tar::EntryType::GNULongName, Kind::GnuLongName),
        ] {
            for mut h in [tar::Header::new_ustar(), tar::Header::new_gnu()] {
                h.set_path("a/b.txt").unwrap();
                h.set_size(77);
                h.set_entry_type(kind);
                h.set_cksum();
                let got = parse(h.as_bytes()).unwrap().unwrap();
                assert_eq!(
                    (got.name.as_str(), got.size, got.kind),
                    ("a/b.txt", 77, expect)
                );
            }
        }
    }
}
