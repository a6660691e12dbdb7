//! CSV data files for the builder (reference and holdout): read whole, capped, hashed.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{no_input, CtlError};

/// Largest data file read (bytes).
pub const MAX_DATA_BYTES: u64 = 1024 * 1024 * 1024;

/// A CSV file with a header row.
#[derive(Debug)]
pub struct Table {
    pub path: PathBuf,
    pub header: Vec<String>,
    pub records: Vec<csv::StringRecord>,
    pub sha256: String,
}

impl Table {
    /// Reads `path`; errors name the file and line.
    pub fn read(path: &Path) -> Result<Table, CtlError> {
        let file = std::fs::File::open(path).map_err(|e| no_input(path, e))?;
        let mut bytes = Vec::new();
        file.take(MAX_DATA_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| no_input(path, e))?;
        if bytes.len() as u64 > MAX_DATA_BYTES {
            return Err(CtlError::Data(format!(
                "{}: larger than the {MAX_DATA_BYTES}-byte limit",
                path.display()
            )));
        }
        let sha256 = shared::trust::hex(&Sha256::digest(&bytes));
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(&bytes[..]);
        let bad = |e: csv::Error| {
            let line = e
                .position()
                .map_or(String::new(), |p| format!(" line {}", p.line()));
            CtlError::Data(format!("{}:{line}: {e}", path.display()))
        };
        let header: Vec<String> = reader
            .headers()
            .map_err(bad)?
            .iter()
            .map(|h| h.trim().to_string())
            .collect();
        if header.is_empty() || header.iter().all(|h| h.is_empty()) {
            return Err(CtlError::Data(format!("{}: no header row", path.display())));
        }
        for (i, h) in header.iter().enumerate() {
            if header[..i].contains(h) {
                return Err(CtlError::Data(format!(
                    "{}: line 1: column {h:?} appears twice",
                    path.display()
                )));
            }
        }
        let mut records = Vec::new();
        for rec in reader.records() {
            records.push(rec.map_err(bad)?);
        }
        if records.is_empty() {
            return Err(CtlError::Data(format!("{}: no data rows", path.display())));
        }
        Ok(Table {
            path: path.to_path_buf(),
            header,
            records,
            sha256,
        })
    }

    /// Index of column `name`, or an error naming the file and the columns it has.
    pub fn column(&self, name: &str, role: &str) -> Result<usize, CtlError> {
        self.header.iter().position(|h| h == name).ok_or_else(|| {
            CtlError::Data(format!(
                "{}: no column {name:?} ({role}); columns: {}",
                self.path.display(),
                self.header.join(", ")
            ))
        })
    }

    /// The 1-based line of record `i` (the header is line 1).
    pub fn line(&self, i: usize) -> u64 {
        self.records
            .get(i)
            .and_then(|r| r.position())
            .map_or(i as u64 + 2, |p| p.line())
    }
}
