//! What the agent's and the fleet server's configuration files have in common: the error
//! that lists every problem found, and the bounded read of the file.

use std::io::Read;
use std::path::Path;

/// Largest configuration file either program reads.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Why a configuration cannot be used: every problem found, each naming its file or key.
#[derive(Debug, thiserror::Error)]
#[error("{}", problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    /// An error with a single problem.
    pub fn one(problem: String) -> ConfigError {
        ConfigError {
            problems: vec![problem],
        }
    }
}

/// Reads the configuration file at `path` as UTF-8 text, at most [`MAX_CONFIG_BYTES`] (the
/// read itself is bounded, so a file that grows while being read cannot exhaust memory).
/// Errors name the file.
pub fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    let named = |e: std::io::Error| ConfigError::one(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(named)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(named)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::one(format!(
            "{}: larger than the {MAX_CONFIG_BYTES}-byte limit",
            path.display()
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        ConfigError::one(format!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_text_and_names_the_file_in_every_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.toml");
        std::fs::write(&ok, "a = 1\n").unwrap();
        assert_eq!(read_config_file(&ok).unwrap(), "a = 1\n");

        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let e = read_config_file(&big).unwrap_err().to_string();
        assert!(
            e.contains("big.toml") && e.contains("1048576-byte limit"),
            "{e}"
        );

        // exactly at the limit is accepted
        std::fs::write(&big, vec![b'#'; MAX_CONFIG_BYTES as usize]).unwrap();
        assert_eq!(
            read_config_file(&big).unwrap().len(),
            MAX_CONFIG_BYTES as usize
        );

        let bin = dir.path().join("bin.toml");
        std::fs::write(&bin, b"a = 1\n\xff").unwrap();
        let e = read_config_file(&bin).unwrap_err().to_string();
        assert!(e.contains("bin.toml") && e.contains("offset 6"), "{e}");

        let missing = dir.path().join("missing.toml");
        let e = read_config_file(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.toml"), "{e}");
    }
}
