//! Hash-chained, append-only audit log of admin actions (who, what, when, bundle hash,
//! result), stored as `<state>/audit.jsonl` plus a head anchor `<state>/audit.jsonl.head`.
//!
//! Guarantees:
//! - **Durability**: when [`AuditLog::append`] returns `Ok`, the record's line was written
//!   and fsynced (`fdatasync`), and the head anchor was then replaced atomically (temporary
//!   file, fsync, rename, fsync of the directory). A crash at any point leaves every record
//!   whose append returned `Ok`. A failed append either leaves nothing (the file is cut back
//!   to its previous length) or, if even that fails, marks the writer broken until reopened;
//!   [`AuditError::HeadWrite`] is the one error after which the record IS durable.
//! - **One writer**: an [`AuditLog`] holds an exclusive `flock` on the log for its lifetime
//!   (a second writer, in this or another process, gets [`AuditError::Locked`]) and appends
//!   under a mutex; clones share the writer.
//! - **Crash repair on open**: a final segment without a trailing newline is a torn write of
//!   an append that never returned `Ok`: open truncates it and counts it in [`OpenReport`].
//!   A crash between the log fsync and the head update leaves exactly one record after the
//!   head: open re-anchors it. Anything else that is wrong (a bad line anywhere else, a
//!   chain break, a head that does not match) makes open refuse, naming the line, and
//!   change nothing.
//! - **What [`verify`] detects**: a record edited in any byte (its hash no longer
//!   recomputes, or the next record's `prev` no longer matches), a record deleted or moved
//!   (seq gap or chain break, naming the line), a record deleted from the end (the chain
//!   ends before the head's seq: [`AuditError::Truncated`]), a log rewritten from some point
//!   on with recomputed hashes (the head's hash no longer matches), a line that is not in
//!   the canonical encoding, and a line longer than [`MAX_LINE_BYTES`].
//! - **What it cannot detect**: the chain uses no secret. Someone who can write the files
//!   can append well-formed records at the end, or rewrite the log from any point AND
//!   rewrite the head to match, and `verify` passes. Only a copy of the head kept elsewhere
//!   (the server returns [`AuditLog::head`] in its admin API responses; an admin or a
//!   monitoring job stores it) shows that: a log whose record at that seq has a different
//!   hash, or that no longer reaches that seq, was rewritten ([`verify_with_anchor`] checks
//!   that). Records after the head file's seq (an append in flight, or the one record a
//!   crash left unanchored) are checked as part of the chain but reported as `unanchored`.
//! - **Bounded memory**: every reader streams the file line by line, refusing lines longer
//!   than [`MAX_LINE_BYTES`]; [`read`] returns at most [`MAX_READ_RECORDS`] records.
//!
//! # On-disk format (version 1)
//!
//! `audit.jsonl` holds one record per line, each line terminated by `\n`, UTF-8, at most
//! [`MAX_LINE_BYTES`] bytes without its newline. A line is the compact JSON object (no
//! whitespace outside strings) with exactly these fields, in this order:
//!
//! ```text
//! {"v":1,"seq":1,"at":"2025-06-01T12:00:00.123Z","actor":"ci-token","role":"admin",
//!  "action":"bundle.push","target":"pdm-failure@1.2.0","bundle_sha256":"<64 hex>"|null,
//!  "result":"ok"|"error: <message>","details":{...}|null,"prev":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! - `v`: 1. `seq`: 1, 2, 3, ... without gaps. `at`: RFC 3339, UTC (`Z`), millisecond
//!   precision, taken at append (not required to be monotonic: clocks step).
//! - `actor`: the token or user name; `role`: its role; `action`: lowercase
//!   `[a-z0-9._-]` such as `bundle.push`, `rollout.create`; `target`: free text.
//! - `bundle_sha256`: lowercase hex SHA-256 of the bundle involved, or `null`.
//! - `result`: `ok`, or `error: ` followed by the error message.
//! - `details`: a JSON object or `null`; object keys are sorted by their UTF-8 bytes at
//!   every level.
//! - `prev`: the `hash` of the record before (the record with seq - 1), or 64 zeros for
//!   seq 1.
//! - `hash`: lowercase hex SHA-256 of the CANONICAL BODY: the exact bytes of the line
//!   without its newline, with its last 75 bytes, `,"hash":"<64 hex>"}`, replaced by the
//!   single byte `}`. In other words the hash covers the line's JSON object without the
//!   `hash` field, byte for byte as stored, so a third party re-verifies without any JSON
//!   canonicalisation: `sha256(line[..len-75] + "}") == line[len-66..len-2]`, then checks
//!   `seq` and `prev` against the line before. Strings use serde_json's escaping (only
//!   `"`, `\` and control characters are escaped; `\b \f \n \r \t` short, others as
//!   `\u00xx`; everything else is raw UTF-8). [`verify`] also requires each line to be
//!   exactly the canonical re-encoding of its parsed fields, so every record has exactly
//!   one valid line.
//!
//! `audit.jsonl.head` is `{"v":1,"seq":<n>,"hash":"<64 hex>"}\n`: the seq and hash of the
//! last record whose append completed (seq 0 and 64 zeros for an empty log). It is created
//! with the log and replaced atomically after every append.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The record and head format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The longest line (without its newline) a log may contain; longer lines are an error.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// The most records one [`read`] call returns (page with `after_seq`).
pub const MAX_READ_RECORDS: usize = 1000;
/// `prev` of the first record, and the hash of the empty log's head.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const MAX_ACTOR: usize = 256;
const MAX_ROLE: usize = 64;
const MAX_ACTION: usize = 64;
const MAX_TARGET: usize = 4096;
const MAX_ERROR_MESSAGE: usize = 8192;
const MAX_HEAD_FILE: u64 = 4096;
/// `,"hash":"` + 64 hex digits + `"}`.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// Errors of the audit log. Every variant about the files names the log file, and the line
/// (1-based) and seq where that applies.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{}: {op}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the audit log is already open for writing (its lock is held by another writer)", .path.display())]
    Locked { path: PathBuf },
    #[error("{}: line {line}: longer than {max} bytes", .path.display())]
    LineTooLong {
        path: PathBuf,
        line: u64,
        max: usize,
    },
    #[error("{}: line {line}: not a version 1 audit record: {reason}", .path.display())]
    Parse {
        path: PathBuf,
        line: u64,
        reason: String,
    },
    #[error("{}: line {line}: record format version {found}; this build reads version {FORMAT_VERSION}", .path.display())]
    UnsupportedVersion {
        path: PathBuf,
        line: u64,
        found: u64,
    },
    #[error("{}: line {line}: expected seq {expected}, found seq {found}: records are missing or out of order", .path.display())]
    SeqGap {
        path: PathBuf,
        line: u64,
        expected: u64,
        found: u64,
    },
    #[error("{}: line {line} (seq {seq}): prev does not match the hash of the record before it: that record was edited or removed, or this one was moved", .path.display())]
    BrokenChain { path: PathBuf, line: u64, seq: u64 },
    #[error("{}: line {line} (seq {seq}): the hash does not match the record's content: the record was edited", .path.display())]
    EditedRecord { path: PathBuf, line: u64, seq: u64 },
    #[error("{}: line {line} (seq {seq}): not in the canonical encoding (field order, spacing, escaping or key order differ)", .path.display())]
    NonCanonical { path: PathBuf, line: u64, seq: u64 },
    #[error("{}: line {line} (seq {seq}): field `{field}`: {reason}", .path.display())]
    InvalidRecord {
        path: PathBuf,
        line: u64,
        seq: u64,
        field: &'static str,
        reason: String,
    },
    #[error("{}: truncated: the head anchor records seq {head_seq} but the log ends at seq {last_seq}: records were deleted from the end", .path.display())]
    Truncated {
        path: PathBuf,
        head_seq: u64,
        last_seq: u64,
    },
    #[error("{}: record seq {seq} has hash {log_hash} but the head anchor records {head_hash}: the log was rewritten", .path.display())]
    HeadMismatch {
        path: PathBuf,
        seq: u64,
        head_hash: String,
        log_hash: String,
    },
    #[error("{}: the external anchor says seq {seq} has hash {anchor_hash}, but the log has {found}: the log and its head were rewritten", .path.display())]
    AnchorMismatch {
        path: PathBuf,
        seq: u64,
        anchor_hash: String,
        found: String,
    },
    #[error("{}: the log ends at seq {last_seq} but its head anchor records seq {head_seq}: records were added by something other than this writer", .path.display())]
    HeadBehind {
        path: PathBuf,
        head_seq: u64,
        last_seq: u64,
    },
    #[error("{}: the head anchor {} is missing but the log holds {records} records", .path.display(), .head.display())]
    MissingHead {
        path: PathBuf,
        head: PathBuf,
        records: u64,
    },
    #[error("{}: bad head anchor: {reason}", .path.display())]
    BadHead { path: PathBuf, reason: String },
    #[error("invalid audit record: field `{field}`: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    #[error("audit record encodes to {len} bytes; a line holds at most {max} (shorten target or details)")]
    RecordTooLarge { len: usize, max: usize },
    #[error("{}: record seq {seq} was appended durably but the head anchor could not be updated: {source} (the next append retries)", .path.display())]
    HeadWrite {
        path: PathBuf,
        seq: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the writer is unusable after a failed append that could not be rolled back ({reason}); reopen the log", .path.display())]
    Broken { path: PathBuf, reason: String },
    #[error("{}: the writer's lock was poisoned by a panic during an append; reopen the log", .path.display())]
    Poisoned { path: PathBuf },
    #[error("clock: {reason}")]
    Clock { reason: String },
}

/// The outcome of the audited action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The action failed with this message (stored as `error: <message>`, cut to 8 KiB).
    Error(String),
}

/// An action to record; the log adds `v`, `seq`, `at`, `prev` and `hash`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRecord {
    /// Token or user name (1..=256 bytes, no control characters).
    pub actor: String,
    /// The actor's role (1..=64 bytes, no control characters).
    pub role: String,
    /// What was done, e.g. `bundle.push` (1..=64 bytes of `[a-z0-9._-]`).
    pub action: String,
    /// What it was done to, free text up to 4096 bytes, e.g. `pdm-failure@1.2.0`.
    pub target: String,
    /// Lowercase hex SHA-256 of the bundle involved, if any.
    pub bundle_sha256: Option<String>,
    pub outcome: Outcome,
    /// Extra facts, a JSON object (its keys are stored sorted).
    pub details: Option<Value>,
}

impl NewRecord {
    pub fn new(
        actor: impl Into<String>,
        role: impl Into<String>,
        action: impl Into<String>,
        target: impl Into<String>,
        outcome: Outcome,
    ) -> Self {
        Self {
            actor: actor.into(),
            role: role.into(),
            action: action.into(),
            target: target.into(),
            bundle_sha256: None,
            outcome,
            details: None,
        }
    }

    pub fn with_bundle_sha256(mut self, sha256: impl Into<String>) -> Self {
        self.bundle_sha256 = Some(sha256.into());
        self
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// One stored record: the wire form of a line of `audit.jsonl` (format version 1; the field
/// order here is the order on disk).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub v: u32,
    pub seq: u64,
    pub at: String,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub bundle_sha256: Option<String>,
    pub result: String,
    pub details: Option<Value>,
    pub prev: String,
    pub hash: String,
}

impl AuditRecord {
    /// Whether `result` is `ok`.
    pub fn is_ok(&self) -> bool {
        self.result == "ok"
    }
}

/// The chain's end: the seq and hash of a record (seq 0 and [`ZERO_HASH`] for an empty log).
/// It serializes as `{"seq":n,"hash":"<64 hex>"}` so the server can return it in responses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

/// What [`AuditLog::open`] found and repaired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Whether the log (and its head) were created by this open.
    pub created: bool,
    /// Complete records in the log after open.
    pub records: u64,
    /// Torn final lines (no trailing newline: an append that never returned `Ok`) that were
    /// truncated: 0 or 1.
    pub torn_lines_removed: u64,
    /// Their size in bytes.
    pub torn_bytes_removed: u64,
    /// Whether the head was re-anchored to the last record (a crash between the log fsync
    /// and the head update).
    pub head_repaired: bool,
    pub head: Head,
}

/// The outcome of a successful [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Complete records, all checked.
    pub records: u64,
    /// `at` of the first and last record.
    pub first_at: Option<String>,
    pub last_at: Option<String>,
    /// The head anchor file's seq and hash (matched by the record of that seq).
    pub head: Head,
    /// The last record's seq and hash.
    pub last: Head,
    /// Records after the head's seq: an append in flight, or one a crash left before its
    /// head update (open re-anchors it). They are chained but nothing anchors them.
    pub unanchored: u64,
    /// Bytes of a final line without newline (an append in flight or a torn write; open
    /// truncates it). Not part of the verified log.
    pub torn_tail_bytes: u64,
}

/// The path of the head anchor of the log at `log`: `<log>.head`.
pub fn head_path(log: &Path) -> PathBuf {
    let mut s = OsString::from(log.as_os_str());
    s.push(".head");
    PathBuf::from(s)
}

/// The writer of one audit log. Cheap to clone (the clones share one writer); appends are
/// serialized by a mutex, and an exclusive file lock keeps other writers out.
#[derive(Debug, Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    head_path: PathBuf,
    dir: PathBuf,
    writer: Mutex<Writer>,
}

#[derive(Debug)]
struct Writer {
    /// Opened for append, holding the exclusive lock.
    file: File,
    /// Length of the complete, fsynced lines.
    len: u64,
    last_seq: u64,
    last_hash: String,
    /// The seq the head file on disk records.
    head_on_disk: u64,
    /// Set when a failed append could not be rolled back.
    broken: Option<String>,
}

impl AuditLog {
    /// Opens (or creates, with its parent directories) the log at `path`, checks the whole
    /// chain and the head, and repairs what a crash can leave (see the module docs). Refuses
    /// anything else, changing nothing.
    pub fn open(path: &Path) -> Result<(AuditLog, OpenReport), AuditError> {
        let io = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| AuditError::Io { path, op, source }
        };
        let dir = parent_dir(path);
        std::fs::create_dir_all(&dir).map_err(io("create the log's directory"))?;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io("open the audit log"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(AuditError::Locked {
                    path: path.to_path_buf(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io("lock the audit log")(e)),
        }
        let head_file = head_path(path);
        let head = read_head(path, &head_file)?;
        let end = scan(path, head.as_ref().map_or(0, |h| h.seq), |_| true)?;
        let mut report = OpenReport {
            created: false,
            records: end.last_seq,
            torn_lines_removed: 0,
            torn_bytes_removed: 0,
            head_repaired: false,
            head: Head {
                seq: end.last_seq,
                hash: end.last_hash.clone(),
            },
        };
        let head_on_disk = match &head {
            None if end.last_seq == 0 => {
                report.created = true;
                0
            }
            None => {
                return Err(AuditError::MissingHead {
                    path: path.to_path_buf(),
                    head: head_file,
                    records: end.last_seq,
                })
            }
            Some(h) => {
                check_head(path, h, &end)?;
                if end.last_seq > h.seq + 1 {
                    return Err(AuditError::HeadBehind {
                        path: path.to_path_buf(),
                        head_seq: h.seq,
                        last_seq: end.last_seq,
                    });
                }
                h.seq
            }
        };
        // Everything checked: now repair.
        if end.torn_tail_bytes > 0 {
            file.set_len(end.good_len)
                .and_then(|()| file.sync_all())
                .map_err(io("truncate a torn final line"))?;
            report.torn_lines_removed = 1;
            report.torn_bytes_removed = end.torn_tail_bytes;
        }
        if head.is_none() || head_on_disk < end.last_seq {
            if report.created {
                file.sync_all().map_err(io("fsync the new audit log"))?;
            }
            write_head(&head_file, &dir, end.last_seq, &end.last_hash)
                .map_err(io("write the head anchor"))?;
            report.head_repaired = !report.created;
        }
        let log = AuditLog {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                head_path: head_file,
                dir,
                writer: Mutex::new(Writer {
                    file,
                    len: end.good_len,
                    last_seq: end.last_seq,
                    last_hash: end.last_hash,
                    head_on_disk: end.last_seq,
                    broken: None,
                }),
            }),
        };
        Ok((log, report))
    }

    /// Appends one record: validates it, writes its line, fsyncs the log, then replaces the
    /// head anchor. `Ok` means the record is durable; it returns the record as stored.
    pub fn append(&self, rec: &NewRecord) -> Result<AuditRecord, AuditError> {
        let path = &self.inner.path;
        validate_new(rec)?;
        let result = match &rec.outcome {
            Outcome::Ok => "ok".to_string(),
            Outcome::Error(m) if m.is_empty() => "error: (no message)".to_string(),
            Outcome::Error(m) => format!("error: {}", cut(m, MAX_ERROR_MESSAGE)),
        };
        let details = rec.details.as_ref().map(canonical_value);
        let mut w = self
            .inner
            .writer
            .lock()
            .map_err(|_| AuditError::Poisoned { path: path.clone() })?;
        if let Some(reason) = &w.broken {
            return Err(AuditError::Broken {
                path: path.clone(),
                reason: reason.clone(),
            });
        }
        if w.head_on_disk < w.last_seq {
            // The previous append's head update failed: anchor that record first, so at
            // most one record is ever beyond the head on disk.
            write_head(
                &self.inner.head_path,
                &self.inner.dir,
                w.last_seq,
                &w.last_hash,
            )
            .map_err(|source| AuditError::HeadWrite {
                path: path.clone(),
                seq: w.last_seq,
                source,
            })?;
            w.head_on_disk = w.last_seq;
        }
        let at = now_rfc3339()?;
        let seq = w.last_seq + 1;
        let prev = w.last_hash.clone();
        let body = Body {
            v: FORMAT_VERSION,
            seq,
            at: &at,
            actor: &rec.actor,
            role: &rec.role,
            action: &rec.action,
            target: &rec.target,
            bundle_sha256: rec.bundle_sha256.as_deref(),
            result: &result,
            details: details.as_ref(),
            prev: &prev,
        };
        let (mut line, hash) = encode(&body).map_err(|e| AuditError::InvalidInput {
            field: "details",
            reason: e.to_string(),
        })?;
        if line.len() > MAX_LINE_BYTES {
            return Err(AuditError::RecordTooLarge {
                len: line.len(),
                max: MAX_LINE_BYTES,
            });
        }
        line.push(b'\n');
        let before = w.len;
        let written = w.file.write_all(&line).and_then(|()| w.file.sync_data());
        if let Err(source) = written {
            // Cut a partial or unsynced line off so the next append does not follow garbage.
            if let Err(e) = w.file.set_len(before).and_then(|()| w.file.sync_all()) {
                w.broken = Some(format!(
                    "append failed ({source}) and truncating back to {before} bytes failed ({e})"
                ));
            }
            return Err(AuditError::Io {
                path: path.clone(),
                op: "append a record",
                source,
            });
        }
        w.len = before + line.len() as u64;
        w.last_seq = seq;
        w.last_hash = hash.clone();
        let stored = AuditRecord {
            v: FORMAT_VERSION,
            seq,
            at,
            actor: rec.actor.clone(),
            role: rec.role.clone(),
            action: rec.action.clone(),
            target: rec.target.clone(),
            bundle_sha256: rec.bundle_sha256.clone(),
            result,
            details,
            prev,
            hash: hash.clone(),
        };
        write_head(&self.inner.head_path, &self.inner.dir, seq, &hash).map_err(|source| {
            AuditError::HeadWrite {
                path: path.clone(),
                seq,
                source,
            }
        })?;
        w.head_on_disk = seq;
        Ok(stored)
    }

    /// The seq and hash of the last appended record (what the head anchor records once the
    /// append returned `Ok`). Return it to admins so they hold an external anchor.
    pub fn head(&self) -> Head {
        let w = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Head {
            seq: w.last_seq,
            hash: w.last_hash.clone(),
        }
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// Checks the log at `path` from its first to its last line against its head anchor (see
/// the module docs for what this detects and what it cannot). Read-only, needs no lock: it
/// may run while a server appends (the head is read first, so records appended meanwhile
/// show as `unanchored`).
pub fn verify(path: &Path) -> Result<VerifyReport, AuditError> {
    verify_inner(path, None)
}

/// [`verify`], and also checks the log against a head kept elsewhere (`anchor`, e.g. a
/// [`AuditLog::head`] an admin saved from an API response): the log must reach
/// `anchor.seq` and its record there must have `anchor.hash`. This detects what [`verify`]
/// alone cannot: a rewrite of the log and its head file before that seq.
pub fn verify_with_anchor(path: &Path, anchor: &Head) -> Result<VerifyReport, AuditError> {
    verify_inner(path, Some(anchor))
}

fn verify_inner(path: &Path, anchor: Option<&Head>) -> Result<VerifyReport, AuditError> {
    let head_file = head_path(path);
    let head = read_head(path, &head_file)?;
    let mut at_anchor: Option<String> = None;
    let scanned = scan(path, head.as_ref().map_or(0, |h| h.seq), |r| {
        if anchor.is_some_and(|a| a.seq == r.seq) {
            at_anchor = Some(r.hash.clone());
        }
        true
    });
    let end = match scanned {
        Err(AuditError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound
                && head.as_ref().is_some_and(|h| h.seq > 0) =>
        {
            return Err(AuditError::Truncated {
                path: path.to_path_buf(),
                head_seq: head.as_ref().map_or(0, |h| h.seq),
                last_seq: 0,
            })
        }
        r => r?,
    };
    let head = match head {
        Some(h) => h,
        None if end.last_seq == 0 => HeadFile {
            v: FORMAT_VERSION,
            seq: 0,
            hash: ZERO_HASH.to_string(),
        },
        None => {
            return Err(AuditError::MissingHead {
                path: path.to_path_buf(),
                head: head_file,
                records: end.last_seq,
            })
        }
    };
    check_head(path, &head, &end)?;
    if let Some(a) = anchor {
        let found = if a.seq == 0 {
            Some(ZERO_HASH.to_string())
        } else {
            at_anchor
        };
        if found.as_deref() != Some(a.hash.as_str()) {
            return Err(AuditError::AnchorMismatch {
                path: path.to_path_buf(),
                seq: a.seq,
                anchor_hash: a.hash.clone(),
                found: match found {
                    Some(h) => format!("hash {h}"),
                    None => format!("the log ends at seq {}", end.last_seq),
                },
            });
        }
    }
    Ok(VerifyReport {
        records: end.last_seq,
        first_at: end.first_at,
        last_at: end.last_at,
        head: Head {
            seq: head.seq,
            hash: head.hash,
        },
        last: Head {
            seq: end.last_seq,
            hash: end.last_hash,
        },
        unanchored: end.last_seq - head.seq,
        torn_tail_bytes: end.torn_tail_bytes,
    })
}

/// Lists up to `limit` (at most [`MAX_READ_RECORDS`]) records with seq > `after_seq`, in
/// seq order. It streams the log from the start and checks the chain up to the last record
/// it returns (not the head: that is [`verify`]'s job); a final line without newline is
/// ignored (an append in flight).
pub fn read(path: &Path, after_seq: u64, limit: usize) -> Result<Vec<AuditRecord>, AuditError> {
    let limit = limit.min(MAX_READ_RECORDS);
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    scan(path, 0, |r| {
        if r.seq > after_seq {
            out.push(r.clone());
        }
        out.len() < limit
    })?;
    Ok(out)
}

/// The line format without `hash`: its serialization is the canonical body.
#[derive(Serialize)]
struct Body<'a> {
    v: u32,
    seq: u64,
    at: &'a str,
    actor: &'a str,
    role: &'a str,
    action: &'a str,
    target: &'a str,
    bundle_sha256: Option<&'a str>,
    result: &'a str,
    details: Option<&'a Value>,
    prev: &'a str,
}

/// Encodes a record: the line without newline, and its hash.
fn encode(body: &Body<'_>) -> Result<(Vec<u8>, String), serde_json::Error> {
    let mut bytes = serde_json::to_vec(body)?;
    let hash = shared::trust::hex(&Sha256::digest(&bytes));
    bytes.pop(); // the closing `}`
    bytes.extend_from_slice(b",\"hash\":\"");
    bytes.extend_from_slice(hash.as_bytes());
    bytes.extend_from_slice(b"\"}");
    Ok((bytes, hash))
}

/// The hash of a stored line computed from its bytes (the third-party procedure), or `None`
/// if the line does not end with `,"hash":"<64 bytes>"}`.
fn line_hash(line: &[u8]) -> Option<String> {
    let cut = line.len().checked_sub(HASH_SUFFIX_LEN)?;
    let suffix = &line[cut..];
    if cut < 2 || !suffix.starts_with(b",\"hash\":\"") || !suffix.ends_with(b"\"}") {
        return None;
    }
    let mut h = Sha256::new();
    h.update(&line[..cut]);
    h.update(b"}");
    Some(shared::trust::hex(&h.finalize()))
}

/// `v` alone, to name the version of a line that is not a v1 record.
#[derive(Deserialize)]
struct VersionOnly {
    v: u64,
}

/// Checks one complete line (without newline) as the record `expected_seq` following a
/// record whose hash is `prev_hash`.
fn check_line(
    path: &Path,
    line_no: u64,
    bytes: &[u8],
    expected_seq: u64,
    prev_hash: &str,
) -> Result<AuditRecord, AuditError> {
    let rec: AuditRecord = match serde_json::from_slice(bytes) {
        Ok(r) => r,
        Err(e) => {
            if let Ok(VersionOnly { v }) = serde_json::from_slice(bytes) {
                if v != u64::from(FORMAT_VERSION) {
                    return Err(AuditError::UnsupportedVersion {
                        path: path.to_path_buf(),
                        line: line_no,
                        found: v,
                    });
                }
            }
            return Err(AuditError::Parse {
                path: path.to_path_buf(),
                line: line_no,
                reason: e.to_string(),
            });
        }
    };
    if rec.v != FORMAT_VERSION {
        return Err(AuditError::UnsupportedVersion {
            path: path.to_path_buf(),
            line: line_no,
            found: u64::from(rec.v),
        });
    }
    if rec.seq != expected_seq {
        return Err(AuditError::SeqGap {
            path: path.to_path_buf(),
            line: line_no,
            expected: expected_seq,
            found: rec.seq,
        });
    }
    let seq = rec.seq;
    if rec.prev != prev_hash {
        return Err(AuditError::BrokenChain {
            path: path.to_path_buf(),
            line: line_no,
            seq,
        });
    }
    let non_canonical = || AuditError::NonCanonical {
        path: path.to_path_buf(),
        line: line_no,
        seq,
    };
    match line_hash(bytes) {
        None => return Err(non_canonical()),
        Some(h) if h != rec.hash => {
            return Err(AuditError::EditedRecord {
                path: path.to_path_buf(),
                line: line_no,
                seq,
            })
        }
        Some(_) => {}
    }
    let details = rec.details.as_ref().map(canonical_value);
    let body = Body {
        v: rec.v,
        seq,
        at: &rec.at,
        actor: &rec.actor,
        role: &rec.role,
        action: &rec.action,
        target: &rec.target,
        bundle_sha256: rec.bundle_sha256.as_deref(),
        result: &rec.result,
        details: details.as_ref(),
        prev: &rec.prev,
    };
    match encode(&body) {
        Ok((canonical, _)) if canonical == bytes => {}
        _ => return Err(non_canonical()),
    }
    validate_stored(&rec).map_err(|(field, reason)| AuditError::InvalidRecord {
        path: path.to_path_buf(),
        line: line_no,
        seq,
        field,
        reason,
    })?;
    Ok(rec)
}

/// What a scan of the log found.
#[derive(Debug)]
struct ChainEnd {
    last_seq: u64,
    last_hash: String,
    first_at: Option<String>,
    last_at: Option<String>,
    /// Length of the complete lines.
    good_len: u64,
    torn_tail_bytes: u64,
    /// The hash of the record whose seq is the head's.
    hash_at_head: Option<String>,
}

/// Streams the log, checking every complete line as the next link of the chain, and calls
/// `each` with every record until it returns false.
fn scan(
    path: &Path,
    head_seq: u64,
    mut each: impl FnMut(&AuditRecord) -> bool,
) -> Result<ChainEnd, AuditError> {
    let file = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        op: "open the audit log for reading",
        source,
    })?;
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut buf = Vec::with_capacity(1024);
    let mut end = ChainEnd {
        last_seq: 0,
        last_hash: ZERO_HASH.to_string(),
        first_at: None,
        last_at: None,
        good_len: 0,
        torn_tail_bytes: 0,
        hash_at_head: None,
    };
    let limit = MAX_LINE_BYTES as u64 + 1; // the line and its newline
    let mut line_no = 0u64;
    loop {
        buf.clear();
        let n = (&mut reader)
            .take(limit)
            .read_until(b'\n', &mut buf)
            .map_err(|source| AuditError::Io {
                path: path.to_path_buf(),
                op: "read the audit log",
                source,
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if buf.last() != Some(&b'\n') {
            if n as u64 == limit {
                return Err(AuditError::LineTooLong {
                    path: path.to_path_buf(),
                    line: line_no,
                    max: MAX_LINE_BYTES,
                });
            }
            // End of file inside a line: a torn (or in-flight) append.
            end.torn_tail_bytes = n as u64;
            break;
        }
        let rec = check_line(
            path,
            line_no,
            &buf[..n - 1],
            end.last_seq + 1,
            &end.last_hash,
        )?;
        end.good_len += n as u64;
        end.last_seq = rec.seq;
        end.last_hash.clone_from(&rec.hash);
        if end.first_at.is_none() {
            end.first_at = Some(rec.at.clone());
        }
        if rec.seq == head_seq {
            end.hash_at_head = Some(rec.hash.clone());
        }
        let go_on = each(&rec);
        end.last_at = Some(rec.at);
        if !go_on {
            break;
        }
    }
    Ok(end)
}

/// The head file's wire form (format version 1).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeadFile {
    v: u32,
    seq: u64,
    hash: String,
}

/// Reads and checks the head anchor of `log`; `None` if it does not exist.
fn read_head(log: &Path, head_file: &Path) -> Result<Option<HeadFile>, AuditError> {
    let bad = |reason: String| AuditError::BadHead {
        path: log.to_path_buf(),
        reason,
    };
    let file = match File::open(head_file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AuditError::Io {
                path: head_file.to_path_buf(),
                op: "open the head anchor",
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_HEAD_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| AuditError::Io {
            path: head_file.to_path_buf(),
            op: "read the head anchor",
            source,
        })?;
    if bytes.len() as u64 > MAX_HEAD_FILE {
        return Err(bad(format!("longer than {MAX_HEAD_FILE} bytes")));
    }
    let h: HeadFile = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if h.v != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {}; this build reads version {FORMAT_VERSION}",
            h.v
        )));
    }
    if !is_hex64(&h.hash) {
        return Err(bad("hash is not 64 lowercase hex digits".to_string()));
    }
    if h.seq == 0 && h.hash != ZERO_HASH {
        return Err(bad("seq 0 with a hash other than 64 zeros".to_string()));
    }
    Ok(Some(h))
}

/// Checks that the chain reaches the head's seq and has the head's hash there.
fn check_head(path: &Path, head: &HeadFile, end: &ChainEnd) -> Result<(), AuditError> {
    if head.seq > end.last_seq {
        return Err(AuditError::Truncated {
            path: path.to_path_buf(),
            head_seq: head.seq,
            last_seq: end.last_seq,
        });
    }
    let log_hash = if head.seq == 0 {
        ZERO_HASH
    } else {
        end.hash_at_head.as_deref().unwrap_or_default()
    };
    if log_hash != head.hash {
        return Err(AuditError::HeadMismatch {
            path: path.to_path_buf(),
            seq: head.seq,
            head_hash: head.hash.clone(),
            log_hash: log_hash.to_string(),
        });
    }
    Ok(())
}

/// Replaces the head anchor atomically and fsyncs its directory.
fn write_head(head_file: &Path, dir: &Path, seq: u64, hash: &str) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(&HeadFile {
        v: FORMAT_VERSION,
        seq,
        hash: hash.to_string(),
    })
    .map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    shared::trust::write_atomic(head_file, &bytes, false)?;
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// UTC now as RFC 3339 with exactly three fractional digits, so that timestamps sort as
/// strings (`Rfc3339` drops a zero fraction, and `…:01Z` sorts after `…:01.5Z`).
fn now_rfc3339() -> Result<String, AuditError> {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    OffsetDateTime::now_utc()
        .format(FORMAT)
        .map_err(|e| AuditError::Clock {
            reason: e.to_string(),
        })
}

/// `v` with the keys of every object inserted in sorted order (so the encoding sorts them
/// whatever map type serde_json was built with).
fn canonical_value(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = serde_json::Map::new();
            for k in keys {
                if let Some(x) = m.get(k) {
                    out.insert(k.clone(), canonical_value(x));
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical_value).collect()),
        other => other.clone(),
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn check_name(field: &'static str, s: &str, max: usize) -> Result<(), (&'static str, String)> {
    if s.is_empty() {
        return Err((field, "is empty".to_string()));
    }
    if s.len() > max {
        return Err((field, format!("is {} bytes, at most {max}", s.len())));
    }
    if s.chars().any(char::is_control) {
        return Err((field, "contains control characters".to_string()));
    }
    Ok(())
}

/// The rules shared by new and stored records.
fn check_common(
    actor: &str,
    role: &str,
    action: &str,
    target: &str,
    bundle_sha256: Option<&str>,
    details: Option<&Value>,
) -> Result<(), (&'static str, String)> {
    check_name("actor", actor, MAX_ACTOR)?;
    check_name("role", role, MAX_ROLE)?;
    check_name("action", action, MAX_ACTION)?;
    if !action
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(("action", format!("{action:?} is not [a-z0-9._-]")));
    }
    if target.len() > MAX_TARGET {
        return Err((
            "target",
            format!("is {} bytes, at most {MAX_TARGET}", target.len()),
        ));
    }
    if let Some(h) = bundle_sha256 {
        if !is_hex64(h) {
            return Err((
                "bundle_sha256",
                "is not 64 lowercase hex digits".to_string(),
            ));
        }
    }
    if let Some(d) = details {
        if !d.is_object() {
            return Err(("details", "is not a JSON object".to_string()));
        }
    }
    Ok(())
}

fn validate_new(rec: &NewRecord) -> Result<(), AuditError> {
    check_common(
        &rec.actor,
        &rec.role,
        &rec.action,
        &rec.target,
        rec.bundle_sha256.as_deref(),
        rec.details.as_ref(),
    )
    .map_err(|(field, reason)| AuditError::InvalidInput { field, reason })
}

fn validate_stored(rec: &AuditRecord) -> Result<(), (&'static str, String)> {
    check_common(
        &rec.actor,
        &rec.role,
        &rec.action,
        &rec.target,
        rec.bundle_sha256.as_deref(),
        rec.details.as_ref(),
    )?;
    match OffsetDateTime::parse(&rec.at, &Rfc3339) {
        Ok(t) if t.offset().is_utc() => {}
        Ok(_) => return Err(("at", "is not in UTC".to_string())),
        Err(e) => return Err(("at", format!("is not RFC 3339: {e}"))),
    }
    let error_message = rec.result.strip_prefix("error: ");
    if rec.result != "ok" && error_message.is_none_or(str::is_empty) {
        return Err((
            "result",
            "is neither `ok` nor `error: <message>`".to_string(),
        ));
    }
    if !is_hex64(&rec.hash) {
        return Err(("hash", "is not 64 lowercase hex digits".to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    fn rec(i: u64) -> NewRecord {
        let r = NewRecord::new(
            format!("token-{}", i % 3),
            "admin",
            if i.is_multiple_of(2) {
                "bundle.push"
            } else {
                "rollout.create"
            },
            format!("pdm-failure@1.2.{i}"),
            if i % 4 == 3 {
                Outcome::Error(format!("wave {i} \"failed\"\nsecond line"))
            } else {
                Outcome::Ok
            },
        );
        if i.is_multiple_of(2) {
            r.with_bundle_sha256(shared::trust::hex(&Sha256::digest(i.to_le_bytes())))
                .with_details(serde_json::json!({"z": i, "a": {"y": [1, 2.5], "b": "Prüf"}}))
        } else {
            r
        }
    }

    /// A fresh log with `n` records; returns the dir guard and the log path.
    fn log_with(n: u64) -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("state").join("audit.jsonl");
        let (log, report) = AuditLog::open(&path).unwrap();
        assert!(report.created);
        for i in 1..=n {
            let r = log.append(&rec(i)).unwrap();
            assert_eq!(r.seq, i);
        }
        (tmp, path)
    }

    fn lines(path: &Path) -> Vec<Vec<u8>> {
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(bytes.last(), Some(&b'\n'));
        bytes[..bytes.len() - 1]
            .split(|b| *b == b'\n')
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[Vec<u8>]) {
        let mut out = Vec::new();
        for l in lines {
            out.extend_from_slice(l);
            out.push(b'\n');
        }
        std::fs::write(path, out).unwrap();
    }

    /// Re-encodes a record (as an attacker who knows the format would).
    fn forge(r: &AuditRecord) -> (Vec<u8>, String) {
        encode(&Body {
            v: r.v,
            seq: r.seq,
            at: &r.at,
            actor: &r.actor,
            role: &r.role,
            action: &r.action,
            target: &r.target,
            bundle_sha256: r.bundle_sha256.as_deref(),
            result: &r.result,
            details: r.details.as_ref(),
            prev: &r.prev,
        })
        .unwrap()
    }

    #[test]
    fn timestamps_are_fixed_width_so_they_sort_as_strings() {
        let a = now_rfc3339().unwrap();
        assert_eq!(a.len(), "2026-01-01T00:00:00.000Z".len(), "{a}");
        assert!(OffsetDateTime::parse(&a, &Rfc3339).is_ok(), "{a}");
        assert_eq!(&a[19..20], ".");
    }

    #[test]
    fn append_then_verify_ok_and_hashes_recompute_from_bytes() {
        let (_tmp, path) = log_with(10);
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 10);
        assert_eq!(report.head, report.last);
        assert_eq!(report.head.seq, 10);
        assert_eq!(report.unanchored, 0);
        assert_eq!(report.torn_tail_bytes, 0);
        assert!(report.first_at.as_deref().unwrap().ends_with('Z'));
        assert!(report.first_at <= report.last_at);

        // The documented third-party procedure, independent of this module's code.
        let mut prev = ZERO_HASH.to_string();
        for (i, l) in lines(&path).iter().enumerate() {
            let s = std::str::from_utf8(l).unwrap();
            assert!(s.len() <= MAX_LINE_BYTES);
            let (body, tail) = s.split_at(s.len() - 75);
            assert!(tail.starts_with(",\"hash\":\"") && tail.ends_with("\"}"));
            let stored = &tail[9..73];
            let mut h = Sha256::new();
            h.update(body.as_bytes());
            h.update(b"}");
            assert_eq!(shared::trust::hex(&h.finalize()), stored);
            let v: Value = serde_json::from_str(s).unwrap();
            assert_eq!(v["v"], 1);
            assert_eq!(v["seq"], (i + 1) as u64);
            assert_eq!(v["prev"], prev.as_str());
            prev = stored.to_string();
            let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
            assert_eq!(keys.len(), 12);
            assert!(s.starts_with("{\"v\":1,\"seq\":"));
        }
        let head_text = std::fs::read_to_string(head_path(&path)).unwrap();
        assert_eq!(
            head_text,
            format!("{{\"v\":1,\"seq\":10,\"hash\":\"{prev}\"}}\n")
        );

        let all = read(&path, 0, 100).unwrap();
        assert_eq!(all.len(), 10);
        assert_eq!(all[0].prev, ZERO_HASH);
        assert_eq!(all[1].prev, all[0].hash);
        assert_eq!(all[9].hash, prev);
        assert_eq!(all[2].result, "error: wave 3 \"failed\"\nsecond line");
        assert!(!all[2].is_ok() && all[0].is_ok());
        // Details keys are stored sorted, nested too.
        let line2 = String::from_utf8(lines(&path)[1].clone()).unwrap();
        assert!(line2.contains(r#""details":{"a":{"b":"Prüf","y":[1,2.5]},"z":2}"#));
        assert!(line2.contains(r#""bundle_sha256":""#));
        let line1 = String::from_utf8(lines(&path)[0].clone()).unwrap();
        assert!(line1.contains(r#""bundle_sha256":null"#) && line1.contains(r#""details":null"#));
    }

    #[test]
    fn append_returns_what_is_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("audit.jsonl");
        let (log, _) = AuditLog::open(&path).unwrap();
        let a = log.append(&rec(2)).unwrap();
        let b = log.append(&rec(3)).unwrap();
        assert_eq!(read(&path, 0, 10).unwrap(), vec![a.clone(), b.clone()]);
        assert_eq!(b.prev, a.hash);
        assert_eq!(
            log.head(),
            Head {
                seq: 2,
                hash: b.hash.clone()
            }
        );
        assert_eq!(
            serde_json::to_string(&log.head()).unwrap(),
            format!("{{\"seq\":2,\"hash\":\"{}\"}}", b.hash)
        );
        assert_eq!(log.path(), path);
    }

    #[test]
    fn read_pages_by_seq_and_caps_the_limit() {
        let (_tmp, path) = log_with(12);
        let page = read(&path, 4, 3).unwrap();
        assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(read(&path, 10, 100).unwrap().len(), 2);
        assert!(read(&path, 12, 100).unwrap().is_empty());
        assert!(read(&path, 0, 0).unwrap().is_empty());
        assert_eq!(read(&path, 0, usize::MAX).unwrap().len(), 12);
    }

    #[test]
    fn edited_byte_of_a_middle_target_is_an_edited_record() {
        let (_tmp, path) = log_with(9);
        let mut ls = lines(&path);
        let pos = ls[4].windows(7).position(|w| w == b"failure").unwrap();
        ls[4][pos] = b'F';
        write_lines(&path, &ls);
        let before = std::fs::read(&path).unwrap();
        match verify(&path) {
            Err(AuditError::EditedRecord {
                line: 5, seq: 5, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        match AuditLog::open(&path) {
            Err(AuditError::EditedRecord {
                line: 5, seq: 5, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "open changed nothing"
        );
        // `read` checks the chain too, up to what it returns.
        assert_eq!(read(&path, 0, 4).unwrap().len(), 4);
        assert!(matches!(
            read(&path, 0, 5),
            Err(AuditError::EditedRecord { line: 5, .. })
        ));
    }

    #[test]
    fn edited_record_with_recomputed_hash_breaks_the_next_link() {
        let (_tmp, path) = log_with(6);
        let mut ls = lines(&path);
        let mut r: AuditRecord = serde_json::from_slice(&ls[2]).unwrap();
        r.result = "ok".into();
        r.actor = "someone-else".into();
        ls[2] = forge(&r).0;
        write_lines(&path, &ls);
        match verify(&path) {
            Err(
                e @ AuditError::BrokenChain {
                    line: 4, seq: 4, ..
                },
            ) => {
                assert!(e.to_string().contains("audit.jsonl: line 4 (seq 4)"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deleted_middle_line_is_a_seq_gap_naming_the_line() {
        let (_tmp, path) = log_with(8);
        let mut ls = lines(&path);
        ls.remove(3);
        write_lines(&path, &ls);
        match verify(&path) {
            Err(
                e @ AuditError::SeqGap {
                    line: 4,
                    expected: 4,
                    found: 5,
                    ..
                },
            ) => assert!(e.to_string().contains("line 4"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn deleted_middle_line_with_rechained_rest_is_a_head_mismatch() {
        let (_tmp, path) = log_with(8);
        let mut ls = lines(&path);
        ls.remove(3);
        let mut prev: String = serde_json::from_slice::<AuditRecord>(&ls[2]).unwrap().hash;
        for (i, l) in ls.iter_mut().enumerate().skip(3) {
            let mut r: AuditRecord = serde_json::from_slice(l).unwrap();
            r.seq = i as u64 + 1;
            r.prev = prev;
            let (line, hash) = forge(&r);
            *l = line;
            prev = hash;
        }
        write_lines(&path, &ls);
        // Without the head the chain is consistent, so only the head catches it.
        match verify(&path) {
            Err(AuditError::Truncated {
                head_seq: 8,
                last_seq: 7,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // Forge one more record to reach seq 8: now the head's hash does not match.
        let mut r: AuditRecord = serde_json::from_slice(ls.last().unwrap()).unwrap();
        r.seq = 8;
        r.prev = prev;
        ls.push(forge(&r).0);
        write_lines(&path, &ls);
        match verify(&path) {
            Err(AuditError::HeadMismatch { seq: 8, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    /// The documented limit: rewriting the log AND its head consistently passes `verify`;
    /// only a head kept elsewhere shows it.
    #[test]
    fn consistent_rewrite_of_log_and_head_needs_an_external_anchor() {
        let (_tmp, path) = log_with(5);
        let external = verify(&path).unwrap().head;
        let mut ls = lines(&path);
        let mut r: AuditRecord = serde_json::from_slice(&ls[4]).unwrap();
        r.result = "ok".into();
        r.target = "something else".into();
        let (line, hash) = forge(&r);
        ls[4] = line;
        write_lines(&path, &ls);
        write_head(&head_path(&path), path.parent().unwrap(), 5, &hash).unwrap();
        let report = verify(&path).unwrap();
        assert_eq!(report.head.seq, external.seq);
        assert_ne!(
            report.head.hash, external.hash,
            "the external copy shows it"
        );
        match verify_with_anchor(&path, &external) {
            Err(AuditError::AnchorMismatch { seq: 5, found, .. }) => {
                assert_eq!(found, format!("hash {hash}"))
            }
            other => panic!("{other:?}"),
        }
        // An anchor beyond the log's end (records deleted and the head rewritten).
        let later = Head {
            seq: 6,
            hash: external.hash.clone(),
        };
        match verify_with_anchor(&path, &later) {
            Err(AuditError::AnchorMismatch { seq: 6, found, .. }) => {
                assert_eq!(found, "the log ends at seq 5")
            }
            other => panic!("{other:?}"),
        }
        // An anchor of an earlier, unchanged record still matches.
        let third = read(&path, 2, 1).unwrap().remove(0);
        let anchor = Head {
            seq: 3,
            hash: third.hash,
        };
        assert_eq!(verify_with_anchor(&path, &anchor).unwrap().records, 5);
    }

    #[test]
    fn deleted_last_line_is_truncated() {
        let (_tmp, path) = log_with(7);
        let mut ls = lines(&path);
        ls.pop();
        write_lines(&path, &ls);
        let before = std::fs::read(&path).unwrap();
        match verify(&path) {
            Err(
                e @ AuditError::Truncated {
                    head_seq: 7,
                    last_seq: 6,
                    ..
                },
            ) => assert!(e.to_string().contains("deleted from the end"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Truncated { head_seq: 7, .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // Removing only the final newline also hides the last record: still Truncated.
        let mut bytes = before.clone();
        bytes.pop();
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Truncated {
                head_seq: 7,
                last_seq: 5,
                ..
            })
        ));
        // The whole log deleted.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            verify(&path),
            Err(AuditError::Truncated {
                head_seq: 7,
                last_seq: 0,
                ..
            })
        ));
    }

    #[test]
    fn swapped_lines_are_detected() {
        let (_tmp, path) = log_with(6);
        let mut ls = lines(&path);
        ls.swap(2, 3);
        write_lines(&path, &ls);
        match verify(&path) {
            Err(AuditError::SeqGap {
                line: 3,
                expected: 3,
                found: 4,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // Swapped with the seqs swapped back: the chain breaks.
        let mut a: AuditRecord = serde_json::from_slice(&ls[2]).unwrap();
        let mut b: AuditRecord = serde_json::from_slice(&ls[3]).unwrap();
        std::mem::swap(&mut a.seq, &mut b.seq);
        ls[2] = forge(&a).0;
        ls[3] = forge(&b).0;
        write_lines(&path, &ls);
        assert!(matches!(
            verify(&path),
            Err(AuditError::BrokenChain {
                line: 3,
                seq: 3,
                ..
            })
        ));
    }

    #[test]
    fn torn_final_line_is_repaired_on_open() {
        let (_tmp, path) = log_with(5);
        let good = std::fs::read(&path).unwrap();
        let half = lines(&path)[2][..100].to_vec();
        let mut torn = good.clone();
        torn.extend_from_slice(&half);
        std::fs::write(&path, &torn).unwrap();
        // Read-only verify reports it without failing (it may be an append in flight).
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.torn_tail_bytes), (5, 100));
        let (log, report) = AuditLog::open(&path).unwrap();
        assert_eq!(report.torn_lines_removed, 1);
        assert_eq!(report.torn_bytes_removed, 100);
        assert_eq!(report.records, 5);
        assert!(!report.head_repaired && !report.created);
        assert_eq!(std::fs::read(&path).unwrap(), good);
        assert_eq!(log.append(&rec(6)).unwrap().seq, 6);
        drop(log);
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.torn_tail_bytes, r.unanchored), (6, 0, 0));
    }

    #[test]
    fn garbage_middle_line_makes_open_refuse_naming_it() {
        let (_tmp, path) = log_with(5);
        let mut ls = lines(&path);
        ls.insert(2, b"not json at all".to_vec());
        write_lines(&path, &ls);
        let before = std::fs::read(&path).unwrap();
        match AuditLog::open(&path) {
            Err(e @ AuditError::Parse { line: 3, .. }) => {
                assert!(e.to_string().contains("audit.jsonl: line 3"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(matches!(
            verify(&path),
            Err(AuditError::Parse { line: 3, .. })
        ));
        // A bad COMPLETE last line is corruption too, not a torn write.
        let mut ls = lines(&path);
        ls.remove(2);
        ls.push(b"{\"v\":1".to_vec());
        write_lines(&path, &ls);
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Parse { line: 6, .. })
        ));
        // A newer format version is named as such.
        let mut ls = lines(&path);
        ls.pop();
        ls.insert(0, b"{\"v\":2,\"seq\":1,\"new\":true}".to_vec());
        write_lines(&path, &ls);
        assert!(matches!(
            verify(&path),
            Err(AuditError::UnsupportedVersion {
                line: 1,
                found: 2,
                ..
            })
        ));
    }

    #[test]
    fn reopen_continues_the_chain() {
        let (_tmp, path) = log_with(3);
        let (log, report) = AuditLog::open(&path).unwrap();
        assert_eq!(report.records, 3);
        assert!(!report.created && !report.head_repaired);
        assert_eq!(report.torn_lines_removed, 0);
        let third = read(&path, 2, 1).unwrap().remove(0);
        assert_eq!(log.head().hash, third.hash);
        let fourth = log.append(&rec(4)).unwrap();
        let fifth = log.append(&rec(5)).unwrap();
        assert_eq!((fourth.seq, fifth.seq), (4, 5));
        assert_eq!(fourth.prev, third.hash);
        assert_eq!(fifth.prev, fourth.hash);
        drop(log);
        let r = verify(&path).unwrap();
        assert_eq!(r.records, 5);
        assert_eq!(r.head.hash, fifth.hash);
    }

    #[test]
    fn line_longer_than_the_maximum_is_an_error() {
        let (_tmp, path) = log_with(4);
        let mut ls = lines(&path);
        ls.insert(2, vec![b'x'; MAX_LINE_BYTES + 10]);
        write_lines(&path, &ls);
        match verify(&path) {
            Err(e @ AuditError::LineTooLong { line: 3, .. }) => {
                assert!(e.to_string().contains("line 3"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::LineTooLong { line: 3, .. })
        ));
        // Exactly the maximum is read as a line (and then fails to parse).
        ls[2] = vec![b'x'; MAX_LINE_BYTES];
        write_lines(&path, &ls);
        assert!(matches!(
            verify(&path),
            Err(AuditError::Parse { line: 3, .. })
        ));
    }

    #[test]
    fn oversized_and_invalid_records_are_refused_and_nothing_is_written() {
        let (_tmp, path) = log_with(2);
        let (log, _) = AuditLog::open(&path).unwrap();
        let big = rec(3).with_details(serde_json::json!({ "blob": "y".repeat(MAX_LINE_BYTES) }));
        assert!(matches!(
            log.append(&big),
            Err(AuditError::RecordTooLarge {
                max: MAX_LINE_BYTES,
                ..
            })
        ));
        let cases: Vec<(NewRecord, &str)> = vec![
            (
                NewRecord::new("", "admin", "bundle.push", "t", Outcome::Ok),
                "actor",
            ),
            (
                NewRecord::new("a", "", "bundle.push", "t", Outcome::Ok),
                "role",
            ),
            (
                NewRecord::new("a\n", "admin", "bundle.push", "t", Outcome::Ok),
                "actor",
            ),
            (
                NewRecord::new("a", "admin", "Bundle Push", "t", Outcome::Ok),
                "action",
            ),
            (
                NewRecord::new("a", "admin", "x", "t".repeat(MAX_TARGET + 1), Outcome::Ok),
                "target",
            ),
            (
                NewRecord::new("a", "admin", "x", "t", Outcome::Ok).with_bundle_sha256("ABC"),
                "bundle_sha256",
            ),
            (
                NewRecord::new("a", "admin", "x", "t", Outcome::Ok)
                    .with_details(serde_json::json!([1])),
                "details",
            ),
        ];
        for (r, want) in cases {
            match log.append(&r) {
                Err(AuditError::InvalidInput { field, .. }) => assert_eq!(field, want),
                other => panic!("{want}: {other:?}"),
            }
        }
        // Long error messages are cut, not refused.
        let long = NewRecord::new("a", "admin", "x", "t", Outcome::Error("é".repeat(9000)));
        let stored = log.append(&long).unwrap();
        assert!(stored.result.len() <= MAX_ERROR_MESSAGE + 7);
        assert_eq!(stored.seq, 3);
        drop(log);
        assert_eq!(verify(&path).unwrap().records, 3);
    }

    #[test]
    fn second_writer_is_locked_out() {
        let (_tmp, path) = log_with(1);
        let (log, _) = AuditLog::open(&path).unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::Locked { .. })
        ));
        // Readers need no lock.
        assert_eq!(verify(&path).unwrap().records, 1);
        drop(log);
        AuditLog::open(&path).unwrap();
    }

    #[test]
    fn crash_before_head_update_is_reanchored_on_open() {
        let (_tmp, path) = log_with(4);
        let old_head = std::fs::read(head_path(&path)).unwrap();
        let (log, _) = AuditLog::open(&path).unwrap();
        let fifth = log.append(&rec(5)).unwrap();
        drop(log);
        std::fs::write(head_path(&path), &old_head).unwrap();
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.head.seq, r.unanchored), (5, 4, 1));
        let (log, report) = AuditLog::open(&path).unwrap();
        assert!(report.head_repaired);
        assert_eq!(report.head.hash, fifth.hash);
        drop(log);
        assert_eq!(verify(&path).unwrap().unanchored, 0);

        // Two records beyond the head cannot come from this writer: open refuses.
        let (log, _) = AuditLog::open(&path).unwrap();
        log.append(&rec(6)).unwrap();
        log.append(&rec(7)).unwrap();
        drop(log);
        std::fs::write(head_path(&path), &old_head).unwrap();
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::HeadBehind {
                head_seq: 4,
                last_seq: 7,
                ..
            })
        ));
    }

    #[test]
    fn missing_or_bad_head_is_detected() {
        let (_tmp, path) = log_with(3);
        let head = std::fs::read(head_path(&path)).unwrap();
        std::fs::remove_file(head_path(&path)).unwrap();
        assert!(matches!(
            verify(&path),
            Err(AuditError::MissingHead { records: 3, .. })
        ));
        assert!(matches!(
            AuditLog::open(&path),
            Err(AuditError::MissingHead { records: 3, .. })
        ));
        std::fs::write(head_path(&path), b"{\"v\":1,\"seq\":3}").unwrap();
        assert!(matches!(verify(&path), Err(AuditError::BadHead { .. })));
        std::fs::write(head_path(&path), &head).unwrap();
        verify(&path).unwrap();
        // An empty log whose head was never written (crash while creating) is fine.
        let empty = path.with_file_name("empty.jsonl");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(verify(&empty).unwrap().records, 0);
        let (_log, report) = AuditLog::open(&empty).unwrap();
        assert!(report.created);
        assert!(head_path(&empty).exists());
    }

    #[test]
    fn non_canonical_line_is_refused_even_with_a_matching_hash() {
        let (_tmp, path) = log_with(3);
        let mut ls = lines(&path);
        let s = String::from_utf8(ls[2].clone()).unwrap();
        let spaced = s.replacen("{\"v\":1,", "{\"v\": 1,", 1);
        let (body, _) = spaced.split_at(spaced.len() - 75);
        let mut h = Sha256::new();
        h.update(body.as_bytes());
        h.update(b"}");
        let hash = shared::trust::hex(&h.finalize());
        ls[2] = format!("{body},\"hash\":\"{hash}\"}}").into_bytes();
        write_lines(&path, &ls);
        write_head(&head_path(&path), path.parent().unwrap(), 3, &hash).unwrap();
        assert!(matches!(
            verify(&path),
            Err(AuditError::NonCanonical {
                line: 3,
                seq: 3,
                ..
            })
        ));
    }

    #[test]
    fn concurrent_appends_through_clones_form_one_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("audit.jsonl");
        let (log, _) = AuditLog::open(&path).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..20 {
                        log.append(&rec(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(log.head().seq, 80);
        let r = verify(&path).unwrap();
        assert_eq!((r.records, r.unanchored), (80, 0));
        assert_eq!(r.head, log.head());
    }

    /// The child side of `appended_records_survive_kill_9`: appends until killed, printing
    /// the seq of every append that returned `Ok`.
    #[test]
    #[ignore = "run by appended_records_survive_kill_9 in a child process"]
    fn child_appender() {
        let Some(path) = std::env::var_os("AUDIT_CHILD_LOG") else {
            return;
        };
        let (log, _) = AuditLog::open(Path::new(&path)).unwrap();
        for i in 0..1_000_000u64 {
            let r = log.append(&rec(i)).unwrap();
            println!("appended-through {}", r.seq);
        }
    }

    #[test]
    fn appended_records_survive_kill_9() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("audit.jsonl");
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args([
                "--exact",
                "audit::tests::child_appender",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("AUDIT_CHILD_LOG", &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut through = 0u64;
        let mut lines = std::io::BufReader::new(stdout).lines();
        while through < 40 {
            let line = lines.next().expect("the child prints progress").unwrap();
            if let Some(n) = line.strip_prefix("appended-through ") {
                through = n.parse().unwrap();
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let (log, report) = AuditLog::open(&path).unwrap();
        assert!(
            report.records >= through,
            "appends returned Ok through {through}, the log holds {}",
            report.records
        );
        assert!(report.torn_lines_removed <= 1);
        let next = log.append(&rec(0)).unwrap();
        assert_eq!(next.seq, report.records + 1);
        drop(log);
        let r = verify(&path).unwrap();
        assert_eq!(
            (r.records, r.unanchored, r.torn_tail_bytes),
            (report.records + 1, 0, 0)
        );
    }
}
