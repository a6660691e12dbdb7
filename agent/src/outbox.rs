//! The durable outbox: every record the agent sends to the fleet (telemetry window, drift
//! summary, event, health sample) is stored here before it counts as produced, read back in
//! sequence order by the MQTT sync task, and deleted only when the fleet acknowledges it.
//! This is the only module that touches sled.
//!
//! Guarantees:
//! - when [`Outbox::append`] returns `Ok`, its records are in fsynced segment files indexed
//!   by one atomic sled batch, and `flush()` has returned: they survive kill -9 and power loss (as far as the file system's
//!   fsync does). sled's own background flusher is off: nothing is written "about every
//!   500 ms"; every operation that changes the outbox ends with an explicit flush;
//! - sequence numbers are per outbox (per device), start at 1, are strictly increasing and are
//!   never reused, also across restarts and after everything was acknowledged;
//! - the counters (produced, acknowledged, dropped by reason, pending records and bytes per
//!   class, next seq, acknowledged-through) are stored in the same atomic batch as the records
//!   they describe, so after any crash `produced == acknowledged + pending + dropped` holds
//!   exactly for every class ([`Outbox::check`] verifies it against a full scan);
//! - records are deleted only by [`Outbox::ack_through`] (the fleet acknowledged them), by the
//!   byte cap (the oldest record of the lowest priority class first: telemetry, then drift,
//!   then events and health samples, counted as dropped `cap`) and by the optional TTL
//!   (counted as dropped `ttl`), each counted per record exactly, also when only part of a
//!   segment goes (the segment is rewritten without those records in the same batch);
//! - records the sync task has published and whose ack it awaits (seq up to the watermark
//!   set by [`Outbox::set_published_through`] / [`Outbox::read_for_publish`]) are never
//!   dropped by the cap or the TTL, so no record is both delivered and counted dropped. The
//!   cap still holds (the stored bytes never exceed `max_bytes` after an append): when the
//!   lower classes hold only such in-flight records, the oldest unpublished record of the
//!   next class goes, even if that is the record just appended. The in-flight window (the
//!   sync task's unacknowledged batches) thus bounds how much can be kept out of priority
//!   order; the TTL likewise waits for the ack or a rewind;
//! - [`Outbox::read_after`] never returns an acknowledged or dropped record, and returns the
//!   others in strictly increasing seq order;
//! - memory is bounded and does not grow with the backlog: sled holds only a small index
//!   entry per segment and the counters, while the records themselves live in segment files;
//!   reads, acks, evictions and expiries hold at most a few segments (each at most
//!   [`SEG_MAX_BYTES`], or one larger record) plus their result, and apply their deletions in
//!   batches of at most 4096 segments;
//! - a segment file is written (new file, or new records appended past the indexed length of
//!   the class's newest segment) and fsynced, and a new file's directory entry fsynced, before
//!   the sled batch that indexes it is applied, so an index entry never points at bytes that
//!   are not on disk. A file is deleted only after the flush of the batch that unindexed it.
//!   Files no index entry points at (a crash between those steps) are deleted on open; bytes
//!   past a file's indexed length are ignored and overwritten by the next append. Every read
//!   checks the file's length and CRC-32 against the index entry;
//! - a record that cannot be stored (I/O error, full disk) is counted as produced and dropped
//!   `io`, and the call returns an error instead of blocking or panicking. After the first
//!   write failure the outbox refuses further writes (sled poisons itself on I/O errors) until
//!   it is reopened. The `io` counts and the seqs the failed append took are then written to
//!   the index if it still accepts a write (so seqs are not reused after a restart), and
//!   otherwise live in memory only;
//! - a database sled cannot open (corrupt files, a panic inside sled, a missing or
//!   inconsistent counter record, an index entry whose segment file is missing or shorter
//!   than indexed, segment files without a database, the layouts of older agents) is renamed
//!   aside to `<dir>.corrupt-<unix seconds>` and a fresh one is created; [`Outbox::open`]
//!   reports it ([`Quarantined`]). A database held by another process is never quarantined
//!   ([`OutboxError::Locked`]).
//!
//! Layout: records are stored in SEGMENTS of one class each, at most [`SEG_MAX_RECORDS`]
//! records or [`SEG_MAX_BYTES`] bytes: an append fills the class's newest segment first, then
//! starts new ones. A segment's records are one file, `<dir>/segments/<file id, 16 hex>.seg`:
//! per record its seq, `produced_at_ms`, payload length (u32) and payload. Its index entry is
//! the sled key `s` + class code + big-endian seq of its first record (one key range per
//! class: the oldest segment of a class is the first key of its range, and a seq-ordered read
//! merges four ranges), whose value is the segment header: format, class, record count, first
//! and last seq, oldest and newest `produced_at_ms`, counted bytes, file id, file length and
//! CRC-32. `meta` → the counters (format 3, fixed size). One sled tree, so that the index
//! entries and counters of one operation change in one atomic batch. sled's memory grows with
//! what it stores (BENCHMARKS.md, "Outbox"): keeping the payloads out of it is what holds the
//! agent's memory flat under a 1 GB backlog.
//!
//! Stored bytes, which the cap limits, are counted by the outbox itself per record (its
//! encoding in the segment + a fixed overhead, [`stored_size`]). The files on disk are about
//! that size (plus file system blocks); sled's files hold only the index (see `size_on_disk`
//! and BENCHMARKS.md).

use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Default byte cap of the outbox (256 MiB).
pub const DEFAULT_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Default sled page cache (4 MiB).
pub const DEFAULT_CACHE_BYTES: u64 = 4 * 1024 * 1024;
/// Bytes counted per record on top of its encoding inside a segment (see [`stored_size`]).
pub const RECORD_OVERHEAD: u64 = 16;
/// Most segments deleted or rewritten (acks, evictions, expiries) in one sled batch: bounds
/// batch memory.
const CHUNK: usize = 4096;
/// Most records walked by one eviction or expiry round before its batch is applied.
const WALK_RECORDS: usize = 1 << 20;
/// Most records in one segment.
pub const SEG_MAX_RECORDS: usize = 4096;
/// Most bytes in one segment value (a single larger record gets a segment of its own).
pub const SEG_MAX_BYTES: usize = 1024 * 1024;
/// The largest payload of one record (its length is stored in 32 bits).
pub const MAX_RECORD_BYTES: usize = u32::MAX as usize;
const META_KEY: &[u8] = b"meta";
/// 3: segment files indexed in sled; 2 kept the segments inside sled; 1 was one sled key per
/// record.
const META_FORMAT: u8 = 3;
const SEG_TAG: u8 = b's';
/// 2: the index entry of a segment file (1 was the segment itself).
const SEG_FORMAT: u8 = 2;
const KEY_LEN: usize = 10;
/// The directory of the segment files, inside the database directory.
const SEGMENTS_DIR: &str = "segments";
/// format, class, count (u32), first seq, last seq, min and max produced_at, counted bytes,
/// file id, file length, CRC-32 (u32).
const SEG_HEADER: usize = 1 + 1 + 4 + 7 * 8 + 4;
/// seq, produced_at_ms, payload length (u32).
const REC_HEADER: usize = 8 + 8 + 4;
const META_LEN: usize = 1 + 8 + 8 + 8 + 4 * 7 * 8;

/// Priority classes of outbox records, highest first: Event and Health (status) > Drift >
/// Telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    Telemetry,
    Drift,
    Health,
    Event,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Telemetry, Class::Drift, Class::Health, Class::Event];

    /// The label used in metrics and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Telemetry => "telemetry",
            Class::Drift => "drift",
            Class::Health => "health",
            Class::Event => "event",
        }
    }

    /// Higher is kept longer under the byte cap.
    pub const fn priority(self) -> u8 {
        match self {
            Class::Telemetry => 0,
            Class::Drift => 1,
            Class::Health | Class::Event => 2,
        }
    }

    const fn index(self) -> usize {
        match self {
            Class::Telemetry => 0,
            Class::Drift => 1,
            Class::Health => 2,
            Class::Event => 3,
        }
    }

    /// The byte stored in keys and values.
    const fn code(self) -> u8 {
        self.index() as u8
    }

    fn from_code(code: u8) -> Option<Class> {
        Class::ALL.get(usize::from(code)).copied()
    }
}

/// Groups evicted under the cap, in order; within a group, oldest (lowest seq) first.
const EVICTION_ORDER: [&[Class]; 3] = [
    &[Class::Telemetry],
    &[Class::Drift],
    &[Class::Health, Class::Event],
];

/// Why a record left the outbox without being acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Evicted by the byte cap.
    Cap,
    /// Older than the TTL.
    Ttl,
    /// Could not be written (I/O error, full disk).
    Io,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [DropReason::Cap, DropReason::Ttl, DropReason::Io];

    /// The `reason` label of `dropped_total`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::Cap => "cap",
            DropReason::Ttl => "ttl",
            DropReason::Io => "io",
        }
    }

    const fn index(self) -> usize {
        match self {
            DropReason::Cap => 0,
            DropReason::Ttl => 1,
            DropReason::Io => 2,
        }
    }
}

/// Outbox settings (part of the agent's TOML configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Byte cap of the stored records (key + value + overhead), default 256 MiB.
    pub max_bytes: u64,
    /// Records older than this many seconds are dropped (reason `ttl`); none by default.
    pub ttl_secs: Option<u64>,
    /// sled's page cache (`cache_capacity`), default 4 MiB.
    pub cache_bytes: u64,
}

impl Default for OutboxConfig {
    fn default() -> OutboxConfig {
        OutboxConfig {
            max_bytes: DEFAULT_MAX_BYTES,
            ttl_secs: None,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

impl OutboxConfig {
    /// Every problem of these settings, each naming its field (empty: valid).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_bytes < 64 * 1024 {
            p.push(format!(
                "outbox.max_bytes = {} is below the minimum of 65536",
                self.max_bytes
            ));
        }
        if self.ttl_secs == Some(0) {
            p.push("outbox.ttl_secs must be at least 1 (or absent: no TTL)".into());
        }
        if let Some(t) = self.ttl_secs {
            if t > u64::MAX / 1000 {
                p.push(format!("outbox.ttl_secs = {t} is too large"));
            }
        }
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&self.cache_bytes) {
            p.push(format!(
                "outbox.cache_bytes = {} is outside 65536..=1073741824",
                self.cache_bytes
            ));
        }
        p
    }
}

/// One stored record, as read back for publishing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub class: Class,
    /// Wall-clock time of the append (milliseconds since the Unix epoch).
    pub produced_at_ms: u64,
    pub payload: Vec<u8>,
}

/// The database that failed to open and where it was moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The directory the corrupt database now lives in.
    pub moved_to: PathBuf,
    /// Why it could not be opened.
    pub error: String,
}

/// Counters of one record class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// Records handed to `append` (stored, or dropped `io`).
    pub produced: u64,
    /// Records deleted because the fleet acknowledged them.
    pub acknowledged: u64,
    /// Records stored and not yet acknowledged or dropped.
    pub pending_records: u64,
    /// Bytes of the pending records, as counted for the cap.
    pub pending_bytes: u64,
    /// Dropped records, indexed by [`DropReason`] (cap, ttl, io).
    pub dropped: [u64; 3],
}

impl ClassStats {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason.index()]
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }

    fn balanced(&self) -> bool {
        self.acknowledged
            .checked_add(self.dropped_total())
            .and_then(|s| s.checked_add(self.pending_records))
            == Some(self.produced)
    }
}

/// A snapshot of the outbox counters (plain data: the caller renders it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStats {
    /// Indexed like [`Class::ALL`]; see [`OutboxStats::class`].
    pub classes: [ClassStats; 4],
    /// The database's epoch (see [`Outbox::epoch`]).
    pub epoch: u64,
    /// The last seq assigned (0: none yet).
    pub last_seq: u64,
    /// Everything up to and including this seq was acknowledged or dropped.
    pub acked_through: u64,
    /// Bytes of all pending records, as counted for the cap.
    pub stored_bytes: u64,
    pub max_bytes: u64,
    /// sled's files on disk (0 if it could not be measured).
    pub size_on_disk: u64,
    /// Why the outbox refuses writes, after a write failure (reopen to recover).
    pub failed: Option<String>,
}

impl OutboxStats {
    pub fn class(&self, class: Class) -> &ClassStats {
        &self.classes[class.index()]
    }

    pub fn pending_records(&self) -> u64 {
        self.classes.iter().map(|c| c.pending_records).sum()
    }
}

/// What went wrong in the outbox.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {op}: {message}")]
    Sled {
        path: String,
        op: &'static str,
        message: String,
    },
    #[error("outbox {path}: records {first}..={last} were stored but the flush failed: {message}")]
    NotFlushed {
        path: String,
        first: u64,
        last: u64,
        message: String,
    },
    #[error("outbox {path}: refusing writes after an earlier failure ({reason}); reopen it")]
    Failed { path: String, reason: String },
    #[error("outbox {path} is in use by another process: {message}")]
    Locked { path: String, message: String },
    #[error("outbox {path}: corrupt key {key}: {message}")]
    Corrupt {
        path: String,
        key: String,
        message: String,
    },
    #[error("outbox {path}: cannot move the corrupt database aside to {to}: {message}")]
    Quarantine {
        path: String,
        to: String,
        message: String,
    },
    #[error("ack through seq {seq} refused: the last assigned seq is {last}")]
    AckBeyondLast { seq: u64, last: u64 },
    #[error("a {class} record of {bytes} bytes is larger than the outbox's limit of 4 GiB")]
    RecordTooLarge { class: &'static str, bytes: usize },
    #[error("outbox {path}: the sequence numbers are exhausted")]
    SeqExhausted { path: String },
}

/// The persisted counters (value of `meta`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct State {
    /// Random, chosen when the database is created: names its seq space (a quarantine
    /// starts a new one, and the fleet learns from the batches' `epoch` that seqs restart).
    epoch: u64,
    next_seq: u64,
    acked_through: u64,
    classes: [ClassStats; 4],
}

impl State {
    fn fresh() -> State {
        State {
            epoch: new_epoch(),
            next_seq: 1,
            ..State::default()
        }
    }

    fn stored_bytes(&self) -> u64 {
        self.classes.iter().map(|c| c.pending_bytes).sum()
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(META_LEN);
        v.push(META_FORMAT);
        v.extend_from_slice(&self.epoch.to_be_bytes());
        v.extend_from_slice(&self.next_seq.to_be_bytes());
        v.extend_from_slice(&self.acked_through.to_be_bytes());
        for c in &self.classes {
            for n in [
                c.produced,
                c.acknowledged,
                c.pending_records,
                c.pending_bytes,
                c.dropped[0],
                c.dropped[1],
                c.dropped[2],
            ] {
                v.extend_from_slice(&n.to_be_bytes());
            }
        }
        v
    }

    fn decode(v: &[u8]) -> Result<State, String> {
        if v.len() != META_LEN {
            return Err(format!("{} bytes, expected {META_LEN}", v.len()));
        }
        if v[0] != META_FORMAT {
            return Err(format!(
                "format {}, expected {META_FORMAT} (formats 1 and 2 are the layouts of older \
                 agents)",
                v[0]
            ));
        }
        let mut words = v[1..]
            .chunks_exact(8)
            .map(|c| c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)));
        let mut next = || words.next().unwrap_or(0);
        let mut s = State {
            epoch: next(),
            next_seq: next(),
            acked_through: next(),
            classes: [ClassStats::default(); 4],
        };
        for c in &mut s.classes {
            c.produced = next();
            c.acknowledged = next();
            c.pending_records = next();
            c.pending_bytes = next();
            c.dropped = [next(), next(), next()];
        }
        if s.epoch == 0 || s.next_seq == 0 || s.acked_through >= s.next_seq {
            return Err(format!(
                "epoch {}, next seq {} and acked-through {} are inconsistent",
                s.epoch, s.next_seq, s.acked_through
            ));
        }
        for (class, c) in Class::ALL.iter().zip(&s.classes) {
            if !c.balanced() {
                return Err(format!(
                    "class {}: produced {} != acknowledged {} + pending {} + dropped {}",
                    class.as_str(),
                    c.produced,
                    c.acknowledged,
                    c.pending_records,
                    c.dropped_total()
                ));
            }
        }
        Ok(s)
    }

    fn remove(&mut self, class: Class, records: u64, bytes: u64) {
        let c = &mut self.classes[class.index()];
        c.pending_records = c.pending_records.saturating_sub(records);
        c.pending_bytes = c.pending_bytes.saturating_sub(bytes);
    }

    fn drop_records(&mut self, class: Class, reason: DropReason, records: u64, bytes: u64) {
        self.remove(class, records, bytes);
        self.classes[class.index()].dropped[reason.index()] += records;
    }
}

fn seg_key(class: Class, first_seq: u64) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[0] = SEG_TAG;
    k[1] = class.code();
    k[2..].copy_from_slice(&first_seq.to_be_bytes());
    k
}

/// Bytes counted for the cap per record with a payload of `payload_len` bytes: its encoding
/// inside a segment file plus [`RECORD_OVERHEAD`] (which covers its share of the segment's
/// index entry and of the file system's overhead).
pub fn stored_size(payload_len: usize) -> u64 {
    (REC_HEADER + payload_len) as u64 + RECORD_OVERHEAD
}

fn be_u64(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The index entry of a segment (the sled value of its key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SegHeader {
    class: Class,
    count: u32,
    first: u64,
    last: u64,
    min_at: u64,
    max_at: u64,
    /// Sum of [`stored_size`] of its records.
    bytes: u64,
    /// The segment file's id (its name) and how many of its bytes hold the records.
    file: u64,
    len: u64,
    /// CRC-32 of those `len` bytes.
    crc: u32,
}

impl SegHeader {
    fn encode(&self) -> [u8; SEG_HEADER] {
        let mut out = [0u8; SEG_HEADER];
        out[0] = SEG_FORMAT;
        out[1] = self.class.code();
        out[2..6].copy_from_slice(&self.count.to_be_bytes());
        let mut at = 6;
        for n in [
            self.first,
            self.last,
            self.min_at,
            self.max_at,
            self.bytes,
            self.file,
            self.len,
        ] {
            out[at..at + 8].copy_from_slice(&n.to_be_bytes());
            at += 8;
        }
        out[at..at + 4].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    fn read(v: &[u8]) -> Result<SegHeader, String> {
        if v.len() != SEG_HEADER {
            return Err(format!(
                "index entry of {} bytes, expected {SEG_HEADER}",
                v.len()
            ));
        }
        if v[0] != SEG_FORMAT {
            return Err(format!(
                "index entry format {}, expected {SEG_FORMAT}",
                v[0]
            ));
        }
        let class = Class::from_code(v[1]).ok_or_else(|| format!("class code {}", v[1]))?;
        let count = u32::try_from(be_u64(&v[2..6])).unwrap_or(0);
        let word = |i: usize| be_u64(&v[6 + 8 * i..14 + 8 * i]);
        let h = SegHeader {
            class,
            count,
            first: word(0),
            last: word(1),
            min_at: word(2),
            max_at: word(3),
            bytes: word(4),
            file: word(5),
            len: word(6),
            crc: u32::try_from(be_u64(&v[62..66])).unwrap_or(0),
        };
        if h.count == 0 || h.first > h.last || h.min_at > h.max_at || h.len == 0 {
            return Err(format!("inconsistent index entry {h:?}"));
        }
        Ok(h)
    }
}

/// Builds the records of one segment of one class, in increasing seq order: a new segment,
/// or more records for a stored one (`base`).
struct SegBuilder {
    class: Class,
    base: Option<SegHeader>,
    /// The new records' bytes (after `base.len` when extending).
    buf: Vec<u8>,
    count: u32,
    first: u64,
    last: u64,
    min_at: u64,
    max_at: u64,
    bytes: u64,
}

impl SegBuilder {
    fn new(class: Class, capacity: usize) -> SegBuilder {
        SegBuilder {
            class,
            base: None,
            buf: Vec::with_capacity(capacity),
            count: 0,
            first: 0,
            last: 0,
            min_at: u64::MAX,
            max_at: 0,
            bytes: 0,
        }
    }

    /// More records for the stored segment `h`.
    fn extend(h: SegHeader, capacity: usize) -> SegBuilder {
        SegBuilder {
            class: h.class,
            base: Some(h),
            buf: Vec::with_capacity(capacity),
            count: h.count,
            first: h.first,
            last: h.last,
            min_at: h.min_at,
            max_at: h.max_at,
            bytes: h.bytes,
        }
    }

    /// The segment's length in bytes with the records pushed so far.
    fn len(&self) -> usize {
        let base = self.base.map_or(0, |h| h.len);
        usize::try_from(base)
            .unwrap_or(usize::MAX)
            .saturating_add(self.buf.len())
    }

    /// Whether one more record of `payload_len` bytes would exceed the segment limits.
    fn full_for(&self, payload_len: usize, limits: (usize, usize)) -> bool {
        self.count > 0
            && (self.count as usize >= limits.0
                || self.len().saturating_add(REC_HEADER + payload_len) > limits.1)
    }

    fn push(&mut self, seq: u64, at: u64, payload: &[u8]) {
        if self.count == 0 {
            self.first = seq;
        }
        self.last = seq;
        self.count += 1;
        self.min_at = self.min_at.min(at);
        self.max_at = self.max_at.max(at);
        self.bytes += stored_size(payload.len());
        self.buf.extend_from_slice(&seq.to_be_bytes());
        self.buf.extend_from_slice(&at.to_be_bytes());
        // A payload over 4 GiB cannot be appended (see `append_at`).
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(payload);
    }
}

/// The segment files of one outbox (`<dir>/segments/`).
struct Files {
    dir: PathBuf,
}

impl Files {
    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:016x}.seg"))
    }

    /// Writes a new file and fsyncs it (the directory entry is synced by [`Files::sync_dir`]).
    fn create(&self, id: u64, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.path(id))?;
        f.write_all(data)?;
        f.sync_data()
    }

    /// Writes `data` at byte `at` of an existing file and fsyncs it.
    fn extend(&self, id: u64, at: u64, data: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path(id))?;
        f.write_all_at(data, at)?;
        f.sync_data()
    }

    /// The first `len` bytes of a file (an error if it is shorter).
    fn read(&self, id: u64, len: u64) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let f = std::fs::File::open(self.path(id))?;
        let on_disk = f.metadata()?.len();
        if on_disk < len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{on_disk} bytes, the index says {len}"),
            ));
        }
        let cap = usize::try_from(len).map_err(|_| std::io::ErrorKind::InvalidData)?;
        let mut buf = Vec::with_capacity(cap);
        f.take(len).read_to_end(&mut buf)?;
        if buf.len() != cap {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(buf)
    }

    fn sync_dir(&self) -> std::io::Result<()> {
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Deletes a file; one already gone is fine.
    fn remove(&self, id: u64) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every segment file: id and length (other names are left alone).
    fn list(&self) -> std::io::Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .filter(|n| n.len() == 16)
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            out.push((id, entry.metadata()?.len()));
        }
        Ok(out)
    }
}

/// One atomic change of the index: the sled batch, and the files it makes obsolete (deleted
/// after the flush that follows its application). New files are written while it is built.
#[derive(Default)]
struct Tx {
    batch: sled::Batch,
    /// A new file was created: its directory entry must be synced before the batch applies.
    created: bool,
    obsolete: Vec<u64>,
}

/// One record inside a segment's data.
#[derive(Debug, Clone)]
struct RecView {
    seq: u64,
    at: u64,
    payload: Range<usize>,
}

/// A stored segment: its key and index entry, and its records once loaded.
struct Segment {
    key: sled::IVec,
    h: SegHeader,
    data: Option<Arc<[u8]>>,
}

impl Segment {
    fn parse(
        path: &str,
        class: Class,
        key: sled::IVec,
        value: sled::IVec,
    ) -> Result<Segment, OutboxError> {
        let corrupt = |message: String| OutboxError::Corrupt {
            path: path.to_string(),
            key: hex(&key),
            message,
        };
        if key.len() != KEY_LEN || key[0] != SEG_TAG || key[1] != class.code() {
            return Err(corrupt("not a segment key of this class".into()));
        }
        let h = SegHeader::read(&value).map_err(&corrupt)?;
        if h.class != class || h.first != be_u64(&key[2..]) {
            return Err(corrupt(format!(
                "index entry {h:?} does not match its key (class {})",
                class.as_str()
            )));
        }
        Ok(Segment { key, h, data: None })
    }

    fn corrupt(&self, path: &str, message: String) -> OutboxError {
        OutboxError::Corrupt {
            path: path.to_string(),
            key: hex(&self.key),
            message,
        }
    }

    /// Reads the segment file (once), checking its length and CRC against the index entry.
    fn load(&mut self, path: &str, files: &Files) -> Result<(), OutboxError> {
        if self.data.is_some() {
            return Ok(());
        }
        let name = files.path(self.h.file);
        let data = files
            .read(self.h.file, self.h.len)
            .map_err(|e| self.corrupt(path, format!("segment file {}: {e}", name.display())))?;
        let crc = crc32fast::hash(&data);
        if crc != self.h.crc {
            return Err(self.corrupt(
                path,
                format!(
                    "segment file {}: CRC-32 {crc:08x}, the index says {:08x}",
                    name.display(),
                    self.h.crc
                ),
            ));
        }
        self.data = Some(Arc::from(data));
        Ok(())
    }

    /// The record at byte offset `pos` and the offset after it; `None` at the end. The
    /// segment must be loaded.
    fn record_at(&self, path: &str, pos: usize) -> Result<Option<(RecView, usize)>, OutboxError> {
        let Some(v) = self.data.as_deref() else {
            return Err(self.corrupt(path, "segment read before it was loaded".into()));
        };
        if pos >= v.len() {
            return Ok(None);
        }
        let bad = || {
            self.corrupt(
                path,
                format!("record at byte {pos} runs past the end ({} bytes)", v.len()),
            )
        };
        if v.len() - pos < REC_HEADER {
            return Err(bad());
        }
        let len = usize::try_from(be_u64(&v[pos + 16..pos + 20])).map_err(|_| bad())?;
        let start = pos + REC_HEADER;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= v.len())
            .ok_or_else(bad)?;
        Ok(Some((
            RecView {
                seq: be_u64(&v[pos..pos + 8]),
                at: be_u64(&v[pos + 8..pos + 16]),
                payload: start..end,
            },
            end,
        )))
    }

    /// Every record, in order (for rewrites and verification; bounded by the segment). The
    /// segment must be loaded.
    fn records(&self, path: &str) -> Result<Vec<RecView>, OutboxError> {
        let mut out = Vec::with_capacity(self.h.count as usize);
        let mut pos = 0;
        while let Some((r, next)) = self.record_at(path, pos)? {
            out.push(r);
            pos = next;
        }
        Ok(out)
    }

    fn payload(&self, r: &RecView) -> &[u8] {
        self.data
            .as_deref()
            .and_then(|d| d.get(r.payload.clone()))
            .unwrap_or(&[])
    }
}

/// The key to start a scan of `class` from so that the segment holding seq `from` (if any) is
/// the first one: the last segment whose first seq is <= `from`, or the class's first key.
fn scan_start(
    path: &str,
    tree: &sled::Tree,
    class: Class,
    from: u64,
) -> Result<[u8; KEY_LEN], OutboxError> {
    let lower = seg_key(class, 0);
    match tree.range(lower..=seg_key(class, from)).next_back() {
        Some(item) => {
            let (key, _) = item.map_err(|e| sled_err(path, "read", e))?;
            let mut k = [0u8; KEY_LEN];
            if key.len() != KEY_LEN {
                return Err(OutboxError::Corrupt {
                    path: path.to_string(),
                    key: hex(&key),
                    message: "not a segment key".into(),
                });
            }
            k.copy_from_slice(&key);
            Ok(k)
        }
        None => Ok(lower),
    }
}

/// The records of one class with seq > `after`, in seq order, one segment in memory at a
/// time.
struct Cursor<'a> {
    inner: &'a Inner,
    class: Class,
    iter: sled::Iter,
    seg: Option<Segment>,
    pos: usize,
    head: Option<RecView>,
    /// Records up to this seq are skipped.
    after: u64,
    /// Segments loaded so far.
    loaded: usize,
}

/// One record found by a cursor (the segment's buffer is shared, not copied).
struct Hit {
    class: Class,
    seq: u64,
    at: u64,
    value: Arc<[u8]>,
    payload: Range<usize>,
}

impl Hit {
    fn len(&self) -> usize {
        self.payload.len()
    }

    fn record(&self) -> Record {
        Record {
            seq: self.seq,
            class: self.class,
            produced_at_ms: self.at,
            payload: self.value[self.payload.clone()].to_vec(),
        }
    }
}

impl<'a> Cursor<'a> {
    fn new(inner: &'a Inner, class: Class, after: u64) -> Result<Cursor<'a>, OutboxError> {
        let start = scan_start(&inner.path, &inner.db, class, after)?;
        let iter = inner.db.range(start..=seg_key(class, u64::MAX));
        let mut c = Cursor {
            inner,
            class,
            iter,
            seg: None,
            pos: 0,
            head: None,
            after,
            loaded: 0,
        };
        if after < u64::MAX {
            c.advance()?;
        }
        Ok(c)
    }

    fn advance(&mut self) -> Result<(), OutboxError> {
        let path = &self.inner.path;
        loop {
            if let Some(seg) = &self.seg {
                match seg.record_at(path, self.pos)? {
                    Some((r, next)) => {
                        self.pos = next;
                        if r.seq > self.after {
                            self.head = Some(r);
                            return Ok(());
                        }
                        continue;
                    }
                    None => self.seg = None,
                }
            }
            let Some(item) = self.iter.next() else {
                self.head = None;
                return Ok(());
            };
            let (key, value) = item.map_err(|e| sled_err(path, "read", e))?;
            let mut seg = Segment::parse(path, self.class, key, value)?;
            if seg.h.last <= self.after {
                continue;
            }
            seg.load(path, &self.inner.files)?;
            self.loaded += 1;
            self.pos = 0;
            self.seg = Some(seg);
        }
    }

    fn peek(&self) -> Option<(u64, u64)> {
        self.head.as_ref().map(|r| (r.seq, r.at))
    }

    fn take(&mut self) -> Result<Option<Hit>, OutboxError> {
        let (Some(r), Some(value)) = (
            self.head.take(),
            self.seg.as_ref().and_then(|s| s.data.clone()),
        ) else {
            return Ok(None);
        };
        let hit = Hit {
            class: self.class,
            seq: r.seq,
            at: r.at,
            value,
            payload: r.payload,
        };
        self.after = r.seq;
        self.advance()?;
        Ok(Some(hit))
    }
}

/// The records of some classes with seq > `after`, in seq order (a merge of class cursors).
struct Merged<'a> {
    cursors: Vec<Cursor<'a>>,
}

impl<'a> Merged<'a> {
    fn new(inner: &'a Inner, classes: &[Class], after: u64) -> Result<Merged<'a>, OutboxError> {
        let cursors = classes
            .iter()
            .map(|&c| Cursor::new(inner, c, after))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Merged { cursors })
    }

    fn next(&mut self) -> Result<Option<Hit>, OutboxError> {
        let best = self
            .cursors
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.peek().map(|(seq, _)| (seq, i)))
            .min();
        match best {
            Some((_, i)) => self.cursors[i].take(),
            None => Ok(None),
        }
    }

    fn loaded(&self) -> usize {
        self.cursors.iter().map(|c| c.loaded).sum()
    }
}

fn sled_err(path: &str, op: &'static str, e: sled::Error) -> OutboxError {
    OutboxError::Sled {
        path: path.to_string(),
        op,
        message: e.to_string(),
    }
}
/// Runs a sled call, turning a panic inside sled into an error message.
fn shielded<T>(f: impl FnOnce() -> sled::Result<T>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(format!("sled panicked: {}", panic_text(&*panic))),
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// A random non-zero epoch (from the OS's randomness that seeds std's hash maps, mixed with
/// the clock: no extra dependency).
fn new_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(now_ms());
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Why opening failed: quarantine the database, or report the error.
enum Opening {
    Corrupt(String),
    Failed(OutboxError),
}

/// The durable outbox (cheap to clone: the clones share one database).
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    path: String,
    cfg: OutboxConfig,
    db: sled::Db,
    files: Files,
    core: Mutex<Core>,
}

/// What writers change under the lock: the counters as stored, the failure flag and the
/// published-through watermark (memory only).
struct Core {
    state: State,
    failed: Option<String>,
    published_through: u64,
    /// [`CHUNK`] and [`WALK_RECORDS`] (smaller in tests).
    chunk: usize,
    walk: usize,
    /// Most records and bytes per segment.
    seg_limits: (usize, usize),
    /// The id of the next segment file.
    next_file: u64,
    /// Files unindexed by applied batches, deleted after the next flush.
    obsolete: Vec<u64>,
}

impl Core {
    /// Records up to this seq are exempt from the cap and the TTL: acknowledged (gone) or
    /// published and awaiting their ack.
    fn exempt_through(&self) -> u64 {
        self.published_through.max(self.state.acked_through)
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Opens or creates `<dir>` (a sled database dir). If sled fails to open it (corrupt), the
    /// dir is renamed aside to `<dir>.corrupt-<unix time>` and a fresh one is created; the
    /// returned option says so (path moved and the error) so the caller emits an event. A
    /// database locked by another process is an error ([`OutboxError::Locked`]), never
    /// quarantined. The cap and TTL of `cfg` are applied right away. The published-through
    /// watermark starts at the acknowledged-through seq.
    pub fn open(
        dir: &Path,
        cfg: &OutboxConfig,
    ) -> Result<(Outbox, Option<Quarantined>), OutboxError> {
        let path = dir.display().to_string();
        let (opened, quarantined) = match open_db_waiting(dir, cfg) {
            Ok(opened) => (opened, None),
            Err(Opening::Failed(e)) => return Err(e),
            Err(Opening::Corrupt(error)) => {
                check_not_locked(dir)?;
                let moved_to = quarantine(dir)?;
                match open_db(dir, cfg) {
                    Ok(opened) => (opened, Some(Quarantined { moved_to, error })),
                    Err(Opening::Failed(e)) => return Err(e),
                    Err(Opening::Corrupt(message)) => {
                        return Err(OutboxError::Corrupt {
                            path,
                            key: "(fresh database)".into(),
                            message,
                        })
                    }
                }
            }
        };
        let Opened {
            db,
            state,
            files,
            next_file,
        } = opened;
        let outbox = Outbox {
            inner: Arc::new(Inner {
                path,
                cfg: cfg.clone(),
                db,
                files,
                core: Mutex::new(Core {
                    state,
                    failed: None,
                    published_through: state.acked_through,
                    chunk: CHUNK,
                    walk: WALK_RECORDS,
                    seg_limits: (SEG_MAX_RECORDS, SEG_MAX_BYTES),
                    next_file,
                    obsolete: Vec::new(),
                }),
            }),
        };
        {
            let mut core = outbox.lock();
            outbox.enforce(&mut core, now_ms())?;
            outbox.flush_locked(&mut core, "flush")?;
        }
        Ok((outbox, quarantined))
    }

    /// The database directory.
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // The counters are replaced only after a successful write, so a panic elsewhere
        // while the lock was held leaves them valid.
        self.inner
            .core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn err(&self, op: &'static str, message: String) -> OutboxError {
        OutboxError::Sled {
            path: self.inner.path.clone(),
            op,
            message,
        }
    }

    /// Appends records atomically (one sled batch) and flushes before returning: when this
    /// returns `Ok`, the records are durable and counted as produced. Seqs are strictly
    /// increasing and never reused; the returned range is the seqs assigned, in the order of
    /// `records`. Then applies the TTL and the byte cap (see the module documentation).
    ///
    /// If the records cannot be written, returns `Err` and counts them produced and dropped
    /// `io`; after that the outbox refuses writes until reopened.
    pub fn append(&self, records: &[(Class, Vec<u8>)]) -> Result<Range<u64>, OutboxError> {
        self.append_at(records, now_ms())
    }

    /// [`Outbox::append`] with the wall-clock time given (milliseconds since the epoch).
    pub fn append_at(
        &self,
        records: &[(Class, Vec<u8>)],
        now_ms: u64,
    ) -> Result<Range<u64>, OutboxError> {
        let mut core = self.lock();
        let first = core.state.next_seq;
        if records.is_empty() {
            return Ok(first..first);
        }
        if let Some(reason) = core.failed.clone() {
            count_io(&mut core.state, records);
            self.save_counters_best_effort(&core);
            return Err(OutboxError::Failed {
                path: self.inner.path.clone(),
                reason,
            });
        }
        if let Some((class, p)) = records.iter().find(|(_, p)| p.len() > MAX_RECORD_BYTES) {
            let (class, bytes) = (class.as_str(), p.len());
            count_io(&mut core.state, records);
            return Err(OutboxError::RecordTooLarge { class, bytes });
        }
        let Some(end) = first.checked_add(records.len() as u64) else {
            count_io(&mut core.state, records);
            return Err(OutboxError::SeqExhausted {
                path: self.inner.path.clone(),
            });
        };
        let mut st = core.state;
        let seg_limits = core.seg_limits;
        let capacity = |class: Class| {
            records
                .iter()
                .filter(|(c, _)| *c == class)
                .map(|(_, p)| REC_HEADER + p.len())
                .sum::<usize>()
                .min(SEG_MAX_BYTES)
        };
        let mut tx = Tx::default();
        let mut next_file = core.next_file;
        let mut stored = Ok(());
        for class in Class::ALL {
            let mut recs = records
                .iter()
                .zip(first..)
                .filter(|((c, _), _)| *c == class)
                .peekable();
            if recs.peek().is_none() {
                continue;
            }
            // The class's newest segment takes records while it has room, then new ones.
            let mut b = match self.newest(class) {
                Ok(Some(h)) => SegBuilder::extend(h, capacity(class)),
                Ok(None) => SegBuilder::new(class, capacity(class)),
                Err(e) => {
                    stored = Err(e);
                    break;
                }
            };
            for ((_, payload), seq) in recs {
                if b.full_for(payload.len(), seg_limits) {
                    let full = std::mem::replace(&mut b, SegBuilder::new(class, capacity(class)));
                    stored = stored.and_then(|()| self.store(&mut tx, &mut next_file, full));
                }
                b.push(seq, now_ms, payload);
                let c = &mut st.classes[class.index()];
                c.produced += 1;
                c.pending_records += 1;
                c.pending_bytes += stored_size(payload.len());
            }
            stored = stored.and_then(|()| self.store(&mut tx, &mut next_file, b));
            if stored.is_err() {
                break;
            }
        }
        // File ids are never reused, whatever reached the disk.
        core.next_file = next_file;
        st.next_seq = end;
        let applied = stored.and_then(|()| {
            if tx.created {
                self.inner
                    .files
                    .sync_dir()
                    .map_err(|e| self.err("append", format!("segment directory: {e}")))?;
            }
            tx.batch.insert(META_KEY, st.encode());
            shielded(|| self.inner.db.apply_batch(tx.batch)).map_err(|m| self.err("append", m))
        });
        if let Err(e) = applied {
            count_io(&mut core.state, records);
            // Never hand out these seqs again, whatever reached the disk.
            core.state.next_seq = end;
            core.failed = Some(e.to_string());
            self.save_counters_best_effort(&core);
            return Err(e);
        }
        core.state = st;
        let enforced = self.enforce(&mut core, now_ms);
        let flushed = self.flush_core(&mut core);
        if let Err(message) = flushed {
            core.failed = Some(message.clone());
            return Err(OutboxError::NotFlushed {
                path: self.inner.path.clone(),
                first,
                last: end - 1,
                message,
            });
        }
        if let Err(e) = enforced {
            // The records are durable; the cap or TTL could not be applied: refuse further
            // writes rather than grow past the cap.
            tracing::warn!(outbox = %self.inner.path, error = %e, "cap/TTL enforcement failed");
            core.failed.get_or_insert_with(|| e.to_string());
        }
        Ok(first..end)
    }

    /// Drops the records older than the TTL at `now_ms` (reason `ttl`) and flushes; returns
    /// how many. Without a TTL, does nothing. Records up to the published-through watermark
    /// are exempt (see [`Outbox::set_published_through`]).
    pub fn expire(&self, now_ms: u64) -> Result<u64, OutboxError> {
        let mut core = self.lock();
        self.check_writable(&core)?;
        let n = self.expire_locked(&mut core, now_ms)?;
        if n > 0 {
            self.flush_locked(&mut core, "expire")?;
        }
        Ok(n)
    }

    /// The sync task published every record up to and including `seq` and awaits the fleet's
    /// ack: those records are exempt from the byte cap and the TTL (so that no record is both
    /// delivered and counted dropped). Call it after each publish with the batch's last seq,
    /// and with [`Outbox::acked_through`] when rewinding to replay. Memory only: it starts at
    /// the acknowledged-through seq on open; clamped to the last seq assigned. Lowering it
    /// makes the records above it evictable again (their earlier publish may still arrive).
    pub fn set_published_through(&self, seq: u64) {
        let mut core = self.lock();
        core.published_through = seq.min(core.state.next_seq - 1);
    }

    /// Smaller batch and walk limits, so that tests reach them with few records.
    #[cfg(test)]
    fn set_limits(&self, chunk: usize, walk: usize) {
        let mut core = self.lock();
        core.chunk = chunk;
        core.walk = walk;
    }

    /// Smaller segments than [`SEG_MAX_RECORDS`] / [`SEG_MAX_BYTES`] for new appends (at
    /// least one record each; values above the defaults are capped to them): for
    /// measurements.
    #[doc(hidden)]
    pub fn set_segment_limits(&self, records: usize, bytes: usize) {
        self.lock().seg_limits = (
            records.clamp(1, SEG_MAX_RECORDS),
            bytes.clamp(1, SEG_MAX_BYTES),
        );
    }

    /// The published-through watermark (at least the acknowledged-through seq).
    pub fn published_through(&self) -> u64 {
        self.lock().exempt_through()
    }

    /// [`Outbox::read_after`] and [`Outbox::set_published_through`] in one step under the
    /// outbox lock, for the sync task: the records returned are exempt from the cap and TTL
    /// from the moment they are read (none can be evicted between the read and the publish),
    /// and the read sees whole appends only (no append is applied during it). The watermark
    /// only rises here; a rewind lowers it with `set_published_through`.
    pub fn read_for_publish(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        let mut core = self.lock();
        let recs = self.read_after_locked(after, max_records, max_bytes)?;
        if let Some(last) = recs.last() {
            core.published_through = core.published_through.max(last.seq);
        }
        Ok(recs)
    }

    fn check_writable(&self, core: &Core) -> Result<(), OutboxError> {
        match &core.failed {
            Some(reason) => Err(OutboxError::Failed {
                path: self.inner.path.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// After a failed append: writes the counters (the `io` drops, the next seq) if the index
    /// still accepts a write (a full file system often leaves room for that small value, or
    /// the failure was in a segment file), so that they survive a restart; otherwise they
    /// live in memory only.
    fn save_counters_best_effort(&self, core: &Core) {
        let meta = core.state.encode();
        let saved = shielded(|| {
            self.inner.db.insert(META_KEY, meta)?;
            self.inner.db.flush()
        });
        if let Err(e) = saved {
            tracing::debug!(outbox = %self.inner.path, error = %e, "counters not saved");
        }
    }

    fn flush_locked(&self, core: &mut Core, op: &'static str) -> Result<(), OutboxError> {
        self.flush_core(core).map_err(|m| {
            core.failed = Some(m.clone());
            self.err(op, m)
        })
    }

    /// Flushes sled, then deletes the segment files the flushed batches unindexed. A file
    /// that cannot be deleted is left for the next open to delete.
    fn flush_core(&self, core: &mut Core) -> Result<(), String> {
        shielded(|| self.inner.db.flush())?;
        for id in core.obsolete.drain(..) {
            if let Err(e) = self.inner.files.remove(id) {
                tracing::warn!(
                    outbox = %self.inner.path,
                    file = %self.inner.files.path(id).display(),
                    error = %e,
                    "cannot delete an acknowledged segment file; the next open deletes it"
                );
            }
        }
        Ok(())
    }

    /// Applies one transaction (index changes; its new files are already written) with the
    /// counters after it.
    fn apply_locked(
        &self,
        core: &mut Core,
        tx: Tx,
        st: State,
        op: &'static str,
    ) -> Result<(), OutboxError> {
        let Tx {
            mut batch,
            created,
            obsolete,
        } = tx;
        if created {
            if let Err(e) = self.inner.files.sync_dir() {
                let m = format!("segment directory: {e}");
                core.failed = Some(m.clone());
                return Err(self.err(op, m));
            }
        }
        batch.insert(META_KEY, st.encode());
        match shielded(|| self.inner.db.apply_batch(batch)) {
            Ok(()) => {
                core.state = st;
                core.obsolete.extend(obsolete);
                Ok(())
            }
            Err(m) => {
                core.failed = Some(m.clone());
                Err(self.err(op, m))
            }
        }
    }

    /// The index entry of the newest segment of `class`, if any.
    fn newest(&self, class: Class) -> Result<Option<SegHeader>, OutboxError> {
        let path = &self.inner.path;
        let last = self
            .inner
            .db
            .range(seg_key(class, 0)..=seg_key(class, u64::MAX))
            .next_back();
        match last {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item.map_err(|e| sled_err(path, "read", e))?;
                Ok(Some(Segment::parse(path, class, key, value)?.h))
            }
        }
    }

    /// Writes the new records of `b` to its segment file (a new file, or past the indexed end
    /// of the stored segment it extends), fsynced, and adds its index entry to `tx`.
    fn store(&self, tx: &mut Tx, next_file: &mut u64, b: SegBuilder) -> Result<(), OutboxError> {
        if b.buf.is_empty() {
            return Ok(());
        }
        let files = &self.inner.files;
        let io = |e: std::io::Error, id: u64| {
            self.err(
                "write",
                format!("segment file {}: {e}", files.path(id).display()),
            )
        };
        let added = b.buf.len() as u64;
        let (file, len, crc) = match b.base {
            Some(h) => {
                files
                    .extend(h.file, h.len, &b.buf)
                    .map_err(|e| io(e, h.file))?;
                let mut hasher = crc32fast::Hasher::new_with_initial(h.crc);
                hasher.update(&b.buf);
                (h.file, h.len + added, hasher.finalize())
            }
            None => {
                let id = *next_file;
                *next_file = next_file.saturating_add(1);
                files.create(id, &b.buf).map_err(|e| io(e, id))?;
                tx.created = true;
                (id, added, crc32fast::hash(&b.buf))
            }
        };
        let h = SegHeader {
            class: b.class,
            count: b.count,
            first: b.first,
            last: b.last,
            min_at: b.min_at,
            max_at: b.max_at,
            bytes: b.bytes,
            file,
            len,
            crc,
        };
        tx.batch
            .insert(&seg_key(b.class, b.first)[..], &h.encode()[..]);
        Ok(())
    }

    /// Removes from `seg` the records with seq in `lo+1..=hi` (adds the index changes to
    /// `tx`; a segment keeping some records is rewritten to a new file): how many records
    /// and counted bytes.
    fn cut(
        &self,
        tx: &mut Tx,
        next_file: &mut u64,
        seg: &mut Segment,
        lo: u64,
        hi: u64,
    ) -> Result<(u64, u64), OutboxError> {
        if seg.h.first > lo && seg.h.last <= hi {
            tx.batch.remove(seg.key.clone());
            tx.obsolete.push(seg.h.file);
            return Ok((u64::from(seg.h.count), seg.h.bytes));
        }
        let path = &self.inner.path;
        seg.load(path, &self.inner.files)?;
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut kept = SegBuilder::new(seg.h.class, seg.data.as_ref().map_or(0, |d| d.len()));
        for r in seg.records(path)? {
            if r.seq > lo && r.seq <= hi {
                n += 1;
                bytes += stored_size(r.payload.len());
            } else {
                kept.push(r.seq, r.at, seg.payload(&r));
            }
        }
        if n == 0 {
            return Ok((0, 0));
        }
        if kept.count == 0 || seg_key(seg.h.class, kept.first)[..] != seg.key[..] {
            tx.batch.remove(seg.key.clone());
        }
        self.store(tx, next_file, kept)?;
        tx.obsolete.push(seg.h.file);
        Ok((n, bytes))
    }

    /// Removes the records of `class` with seq in `lo+1..=hi` (adds the changes to `tx`);
    /// returns how many records and counted bytes. Touches only the segments holding such
    /// records.
    fn remove_range(
        &self,
        tx: &mut Tx,
        next_file: &mut u64,
        class: Class,
        lo: u64,
        hi: u64,
    ) -> Result<(u64, u64), OutboxError> {
        let path = &self.inner.path;
        let start = scan_start(path, &self.inner.db, class, lo)?;
        let (mut n, mut bytes) = (0u64, 0u64);
        for item in self.inner.db.range(start..=seg_key(class, hi)) {
            let (key, value) = item.map_err(|e| sled_err(path, "read", e))?;
            let mut seg = Segment::parse(path, class, key, value)?;
            if seg.h.last <= lo {
                continue;
            }
            let (dn, db) = self.cut(tx, next_file, &mut seg, lo, hi)?;
            n += dn;
            bytes += db;
        }
        Ok((n, bytes))
    }

    /// TTL, then the byte cap; no flush.
    fn enforce(&self, core: &mut Core, now_ms: u64) -> Result<(), OutboxError> {
        self.expire_locked(core, now_ms)?;
        self.evict_locked(core)?;
        Ok(())
    }

    fn expire_locked(&self, core: &mut Core, now_ms: u64) -> Result<u64, OutboxError> {
        let Some(ttl_ms) = self.inner.cfg.ttl_secs.map(|s| s.saturating_mul(1000)) else {
            return Ok(0);
        };
        let mut total = 0;
        for class in Class::ALL {
            // Records of a class are in append order, so the expired ones come first (a
            // clock set back can leave an expired record behind a younger one until later).
            loop {
                let (lo, chunk, walk) = (core.exempt_through(), core.chunk, core.walk);
                let mut cur = Cursor::new(&self.inner, class, lo)?;
                let mut hi = None;
                let mut walked = 0usize;
                let mut more = false;
                while let Some((seq, at)) = cur.peek() {
                    if at.saturating_add(ttl_ms) > now_ms {
                        break;
                    }
                    if walked > 0 && (walked >= walk || cur.loaded > chunk) {
                        more = true;
                        break;
                    }
                    hi = Some(seq);
                    walked += 1;
                    cur.take()?;
                }
                drop(cur);
                let Some(hi) = hi else { break };
                let mut st = core.state;
                let mut tx = Tx::default();
                let (n, bytes) = self.remove_range(&mut tx, &mut core.next_file, class, lo, hi)?;
                st.drop_records(class, DropReason::Ttl, n, bytes);
                self.apply_locked(core, tx, st, "expire")?;
                total += n;
                if !more {
                    break;
                }
            }
        }
        Ok(total)
    }

    /// Drops records, the oldest of the lowest class first, until the cap holds or only
    /// exempt (published, awaiting ack) records are left.
    fn evict_locked(&self, core: &mut Core) -> Result<u64, OutboxError> {
        let max = self.inner.cfg.max_bytes;
        let path = &self.inner.path;
        let mut total = 0;
        while core.state.stored_bytes() > max {
            let (lo, chunk, walk) = (core.exempt_through(), core.chunk, core.walk);
            let mut need = core.state.stored_bytes() - max;
            let mut hi: [Option<u64>; 4] = [None; 4];
            let mut walked = 0usize;
            for group in EVICTION_ORDER {
                let mut it = Merged::new(&self.inner, group, lo)?;
                let mut limited = false;
                while need > 0 {
                    if walked > 0 && (walked >= walk || it.loaded() > chunk) {
                        limited = true;
                        break;
                    }
                    let Some(h) = it.next()? else { break };
                    hi[h.class.index()] = Some(h.seq);
                    need = need.saturating_sub(stored_size(h.len()));
                    walked += 1;
                }
                if need == 0 || limited {
                    break;
                }
            }
            if walked == 0 {
                // Only exempt records are left: the cap is exceeded by the in-flight window.
                break;
            }
            let mut st = core.state;
            let mut tx = Tx::default();
            let mut n_all = 0;
            for class in Class::ALL {
                if let Some(h) = hi[class.index()] {
                    let (n, bytes) =
                        self.remove_range(&mut tx, &mut core.next_file, class, lo, h)?;
                    st.drop_records(class, DropReason::Cap, n, bytes);
                    n_all += n;
                }
            }
            if n_all != walked as u64 {
                return Err(OutboxError::Corrupt {
                    path: path.clone(),
                    key: "(segments)".into(),
                    message: format!("eviction found {walked} records to drop but removed {n_all}"),
                });
            }
            self.apply_locked(core, tx, st, "evict")?;
            total += n_all;
        }
        Ok(total)
    }

    /// Up to `max_records` / `max_bytes` of payload (at least one record if any) pending
    /// records with seq > `after`, in seq order (all classes interleaved). Holds at most one
    /// segment per class in memory besides the result.
    pub fn read_after(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        // Under the lock: no segment file is deleted or rewritten during the read.
        let _core = self.lock();
        self.read_after_locked(after, max_records, max_bytes)
    }

    fn read_after_locked(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut it = Merged::new(&self.inner, &Class::ALL, after)?;
        while out.len() < max_records.max(1) {
            let Some(h) = it.next()? else { break };
            if !out.is_empty() && bytes.saturating_add(h.len()) > max_bytes {
                break;
            }
            bytes = bytes.saturating_add(h.len());
            out.push(h.record());
        }
        Ok(out)
    }

    /// The fleet acknowledged everything up to and including `seq` (cumulative): deletes
    /// those records (in batches, then one flush) and counts them acknowledged per class;
    /// returns how many were removed. Idempotent (an older `seq` removes nothing); a `seq`
    /// beyond the last assigned one is refused. A segment holding records on both sides of
    /// `seq` is rewritten without the acknowledged ones.
    pub fn ack_through(&self, seq: u64) -> Result<u64, OutboxError> {
        let mut core = self.lock();
        let last = core.state.next_seq - 1;
        if seq > last {
            return Err(OutboxError::AckBeyondLast { seq, last });
        }
        if seq <= core.state.acked_through {
            return Ok(0);
        }
        self.check_writable(&core)?;
        let path = &self.inner.path;
        let mut removed = 0;
        loop {
            // The segments starting at or below `seq`, merged by their first seq, at most
            // CHUNK per batch; if there are more, this batch acknowledges through the seq
            // before the first segment left out (only the last segment taken of each class
            // can hold records beyond that: it is rewritten).
            let mut iters: Vec<_> = Class::ALL
                .iter()
                .map(|&c| (c, self.inner.db.range(seg_key(c, 0)..=seg_key(c, seq))))
                .collect();
            let mut heads: Vec<Option<Segment>> = Vec::with_capacity(4);
            for (class, iter) in &mut iters {
                heads.push(next_segment(path, *class, iter)?);
            }
            let mut taken: [Vec<(sled::IVec, u64)>; 4] = Default::default();
            let mut counted = [(0u64, 0u64); 4];
            let mut last_taken: [Option<Segment>; 4] = [None, None, None, None];
            let mut through = seq;
            let mut n_taken = 0;
            loop {
                let best = heads
                    .iter()
                    .enumerate()
                    .filter_map(|(i, h)| h.as_ref().map(|s| (s.h.first, i)))
                    .min();
                let Some((first, i)) = best else { break };
                if n_taken == core.chunk {
                    through = first - 1;
                    break;
                }
                n_taken += 1;
                let next = next_segment(path, iters[i].0, &mut iters[i].1)?;
                if let Some(prev) = std::mem::replace(&mut heads[i], next)
                    .and_then(|seg| last_taken[i].replace(seg))
                {
                    taken[i].push((prev.key.clone(), prev.h.file));
                    counted[i].0 += u64::from(prev.h.count);
                    counted[i].1 += prev.h.bytes;
                }
            }
            drop(heads);
            drop(iters);
            let mut st = core.state;
            let mut tx = Tx::default();
            for class in Class::ALL {
                let i = class.index();
                let (mut n, mut bytes) = counted[i];
                for (key, file) in taken[i].drain(..) {
                    tx.batch.remove(key);
                    tx.obsolete.push(file);
                }
                if let Some(mut seg) = last_taken[i].take() {
                    let (dn, db) = self.cut(&mut tx, &mut core.next_file, &mut seg, 0, through)?;
                    n += dn;
                    bytes += db;
                }
                st.remove(class, n, bytes);
                st.classes[i].acknowledged += n;
                removed += n;
            }
            st.acked_through = through;
            self.apply_locked(&mut core, tx, st, "ack")?;
            if through == seq {
                break;
            }
        }
        self.flush_locked(&mut core, "ack")?;
        Ok(removed)
    }

    /// Everything up to and including this seq was acknowledged (0: nothing yet).
    pub fn acked_through(&self) -> u64 {
        self.lock().state.acked_through
    }

    /// The epoch of this database: random, chosen when it was created. Its seqs start at 1;
    /// a new database (after a quarantine) has a new epoch.
    pub fn epoch(&self) -> u64 {
        self.lock().state.epoch
    }

    /// The last seq assigned (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.lock().state.next_seq - 1
    }

    /// Per class: produced, acknowledged, pending (records and bytes), dropped by reason;
    /// plus last seq, stored bytes and sled's size on disk.
    pub fn stats(&self) -> OutboxStats {
        let (state, failed) = {
            let core = self.lock();
            (core.state, core.failed.clone())
        };
        OutboxStats {
            classes: state.classes,
            epoch: state.epoch,
            last_seq: state.next_seq - 1,
            acked_through: state.acked_through,
            stored_bytes: state.stored_bytes(),
            max_bytes: self.inner.cfg.max_bytes,
            size_on_disk: self.size_on_disk().unwrap_or(0),
            failed,
        }
    }

    /// The size of sled's files (the index) and of the segment files.
    pub fn size_on_disk(&self) -> Result<u64, OutboxError> {
        let index =
            shielded(|| self.inner.db.size_on_disk()).map_err(|m| self.err("size_on_disk", m))?;
        let files = self
            .inner
            .files
            .list()
            .map_err(|e| self.err("size_on_disk", e.to_string()))?;
        Ok(index + files.iter().map(|(_, len)| len).sum::<u64>())
    }

    /// Makes everything written so far durable.
    pub fn flush(&self) -> Result<(), OutboxError> {
        shielded(|| self.inner.db.flush())
            .map(drop)
            .map_err(|m| self.err("flush", m))
    }

    /// How many segments (sled values) hold the pending records (a scan of the keys).
    pub fn segment_count(&self) -> Result<u64, OutboxError> {
        let mut n = 0;
        for item in self
            .inner
            .db
            .range(seg_key(Class::Telemetry, 0)..=seg_key(Class::Event, u64::MAX))
        {
            item.map_err(|e| sled_err(&self.inner.path, "read", e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Scans the whole database (one segment in memory at a time) and checks it against the
    /// counters: every key known, every segment header true to its records, records of a
    /// class in strictly increasing seq order between acked-through and the last seq, per
    /// class the record count and bytes equal to the pending counters, and the stored
    /// counters equal to these.
    pub fn verify(&self) -> Result<(), OutboxError> {
        let core = self.lock();
        let st = core.state;
        let path = &self.inner.path;
        let corrupt = |key: &str, message: String| OutboxError::Corrupt {
            path: path.clone(),
            key: key.to_string(),
            message,
        };
        let stored = shielded(|| self.inner.db.get(META_KEY))
            .map_err(|m| self.err("verify", m))?
            .ok_or_else(|| corrupt("meta", "missing".into()))?;
        let stored = State::decode(&stored).map_err(|m| corrupt("meta", m))?;
        if core.failed.is_none() && stored != st {
            return Err(corrupt(
                "meta",
                format!("stored {stored:?} differs from memory {st:?}"),
            ));
        }
        for class in Class::ALL {
            let (mut n, mut bytes, mut prev) = (0u64, 0u64, st.acked_through);
            for item in self
                .inner
                .db
                .range(seg_key(class, 0)..=seg_key(class, u64::MAX))
            {
                let (key, value) = item.map_err(|e| sled_err(path, "verify", e))?;
                let mut seg = Segment::parse(path, class, key, value)?;
                seg.load(path, &self.inner.files)?;
                let k = hex(&seg.key);
                let mut h = SegBuilder::new(class, 0);
                for r in seg.records(path)? {
                    if r.seq <= prev || r.seq >= st.next_seq {
                        return Err(corrupt(
                            &k,
                            format!(
                                "seq {} after seq {prev} (acked through {}, next seq {})",
                                r.seq, st.acked_through, st.next_seq
                            ),
                        ));
                    }
                    prev = r.seq;
                    // Only the header fields are wanted: no payload copy.
                    h.push(r.seq, r.at, &[]);
                    h.bytes += r.payload.len() as u64;
                }
                let found = SegHeader {
                    class,
                    count: h.count,
                    first: h.first,
                    last: h.last,
                    min_at: h.min_at,
                    max_at: h.max_at,
                    bytes: h.bytes,
                    file: seg.h.file,
                    len: seg.h.len,
                    crc: seg.h.crc,
                };
                if found != seg.h {
                    return Err(corrupt(
                        &k,
                        format!("header {:?}, records say {found:?}", seg.h),
                    ));
                }
                n += u64::from(seg.h.count);
                bytes += seg.h.bytes;
            }
            let c = st.classes[class.index()];
            if (n, bytes) != (c.pending_records, c.pending_bytes) || !c.balanced() {
                return Err(corrupt(
                    "meta",
                    format!(
                        "class {}: {n} records / {bytes} bytes stored, counters say {c:?}",
                        class.as_str()
                    ),
                ));
            }
        }
        for item in self.inner.db.iter() {
            let (key, _) = item.map_err(|e| sled_err(path, "verify", e))?;
            let known = &key[..] == META_KEY
                || (key.len() == KEY_LEN
                    && key[0] == SEG_TAG
                    && Class::from_code(key[1]).is_some());
            if !known {
                return Err(corrupt(&hex(&key), "unknown key".into()));
            }
        }
        Ok(())
    }
}

/// The next segment of a class range, parsed.
fn next_segment(
    path: &str,
    class: Class,
    iter: &mut sled::Iter,
) -> Result<Option<Segment>, OutboxError> {
    match iter.next() {
        None => Ok(None),
        Some(item) => {
            let (key, value) = item.map_err(|e| sled_err(path, "read", e))?;
            Segment::parse(path, class, key, value).map(Some)
        }
    }
}

/// Counts records that could not be stored: produced and dropped `io` (in memory).
fn count_io(st: &mut State, records: &[(Class, Vec<u8>)]) {
    for (class, _) in records {
        let c = &mut st.classes[class.index()];
        c.produced += 1;
        c.dropped[DropReason::Io.index()] += 1;
    }
}

/// How long `open` waits for the lock of a database that was just closed: sled's I/O threads
/// can hold its file for a moment after the last handle is dropped.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// An opened database: sled, its counters, the segment files, the next file id.
struct Opened {
    db: sled::Db,
    state: State,
    files: Files,
    next_file: u64,
}

fn open_db_waiting(dir: &Path, cfg: &OutboxConfig) -> Result<Opened, Opening> {
    let start = std::time::Instant::now();
    loop {
        match open_db(dir, cfg) {
            Err(Opening::Failed(OutboxError::Locked { .. })) if start.elapsed() < LOCK_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn open_db(dir: &Path, cfg: &OutboxConfig) -> Result<Opened, Opening> {
    let (db, state) = open_index(dir, cfg)?;
    let (files, next_file) = match catch_unwind(AssertUnwindSafe(|| open_files(dir, &db))) {
        Ok(r) => r?,
        Err(panic) => {
            return Err(Opening::Corrupt(format!(
                "sled panicked while reading the index: {}",
                panic_text(&*panic)
            )))
        }
    };
    Ok(Opened {
        db,
        state,
        files,
        next_file,
    })
}

/// Checks the segment files against the index: every indexed file present and at least as
/// long as indexed, no file indexed twice; deletes the files nothing indexes (a crash between
/// writing a file and indexing it, or between unindexing and deleting it). Returns the next
/// free file id.
fn open_files(dir: &Path, db: &sled::Db) -> Result<(Files, u64), Opening> {
    let path = dir.display().to_string();
    let files = Files {
        dir: dir.join(SEGMENTS_DIR),
    };
    let failed = |op: &'static str, e: std::io::Error| {
        Opening::Failed(OutboxError::Sled {
            path: path.clone(),
            op,
            message: format!("{}: {e}", files.dir.display()),
        })
    };
    std::fs::create_dir_all(&files.dir).map_err(|e| failed("create", e))?;
    let on_disk: std::collections::HashMap<u64, u64> = files
        .list()
        .map_err(|e| failed("list", e))?
        .into_iter()
        .collect();
    let mut indexed = std::collections::HashSet::new();
    for item in db.range(seg_key(Class::Telemetry, 0)..=seg_key(Class::Event, u64::MAX)) {
        let (key, value) = item.map_err(|e| classify(&path, e))?;
        let class = key
            .get(1)
            .and_then(|c| Class::from_code(*c))
            .ok_or_else(|| Opening::Corrupt(format!("key {}: not a segment key", hex(&key))))?;
        let seg = Segment::parse(&path, class, key, value)
            .map_err(|e| Opening::Corrupt(e.to_string()))?;
        let name = files.path(seg.h.file);
        match on_disk.get(&seg.h.file) {
            None => {
                return Err(Opening::Corrupt(format!(
                    "key {}: segment file {} is missing",
                    hex(&seg.key),
                    name.display()
                )))
            }
            Some(&len) if len < seg.h.len => {
                return Err(Opening::Corrupt(format!(
                    "key {}: segment file {} has {len} bytes, the index says {}",
                    hex(&seg.key),
                    name.display(),
                    seg.h.len
                )))
            }
            Some(_) => {}
        }
        if !indexed.insert(seg.h.file) {
            return Err(Opening::Corrupt(format!(
                "key {}: segment file {} is indexed twice",
                hex(&seg.key),
                name.display()
            )));
        }
    }
    for &id in on_disk.keys() {
        if !indexed.contains(&id) {
            files.remove(id).map_err(|e| failed("delete", e))?;
        }
    }
    let next_file = on_disk.keys().max().map_or(0, |m| m.saturating_add(1));
    Ok((files, next_file))
}

/// Opens sled and reads the counters (creating them in a new database).
fn open_index(dir: &Path, cfg: &OutboxConfig) -> Result<(sled::Db, State), Opening> {
    let path = dir.display().to_string();
    // sled opens a log full of garbage as an empty database without an error: a database
    // that existed before (sled's files, or segment files) must have our counters, or it
    // lost its contents.
    let existed = dir.join("conf").exists()
        || dir
            .join("db")
            .metadata()
            .map(|m| m.len() > 0)
            .unwrap_or(false)
        || std::fs::read_dir(dir.join(SEGMENTS_DIR))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cfg.cache_bytes)
        .flush_every_ms(None);
    let db = match catch_unwind(AssertUnwindSafe(|| config.open())) {
        Ok(Ok(db)) => db,
        Ok(Err(e)) => return Err(classify(&path, e)),
        Err(panic) => {
            return Err(Opening::Corrupt(format!(
                "sled panicked while opening: {}",
                panic_text(&*panic)
            )))
        }
    };
    let meta = match catch_unwind(AssertUnwindSafe(|| db.get(META_KEY))) {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => return Err(classify(&path, e)),
        Err(panic) => {
            return Err(Opening::Corrupt(format!(
                "sled panicked reading key meta: {}",
                panic_text(&*panic)
            )))
        }
    };
    match meta {
        Some(v) => match State::decode(&v) {
            Ok(state) => Ok((db, state)),
            Err(m) => Err(Opening::Corrupt(format!("key meta: {m}"))),
        },
        None if existed || db.was_recovered() => Err(Opening::Corrupt(
            "the database files exist but hold no meta key (contents lost)".into(),
        )),
        None => {
            let state = State::fresh();
            let created = shielded(|| {
                db.insert(META_KEY, state.encode())?;
                db.flush()
            });
            match created {
                Ok(_) => Ok((db, state)),
                Err(message) => Err(Opening::Failed(OutboxError::Sled {
                    path,
                    op: "create",
                    message,
                })),
            }
        }
    }
}

/// Which sled open errors mean "corrupt: quarantine" and which are reported.
fn classify(path: &str, e: sled::Error) -> Opening {
    match e {
        sled::Error::Io(io) => {
            let message = io.to_string();
            if message.contains("could not acquire lock") {
                Opening::Failed(OutboxError::Locked {
                    path: path.to_string(),
                    message,
                })
            } else if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) {
                Opening::Corrupt(message)
            } else {
                Opening::Failed(OutboxError::Sled {
                    path: path.to_string(),
                    op: "open",
                    message,
                })
            }
        }
        other => Opening::Corrupt(other.to_string()),
    }
}

/// Refuses to quarantine a database another process holds.
fn check_not_locked(dir: &Path) -> Result<(), OutboxError> {
    let db_file = dir.join("db");
    let Ok(f) = std::fs::File::open(&db_file) else {
        return Ok(());
    };
    match f.try_lock() {
        Ok(()) => Ok(()),
        Err(std::fs::TryLockError::WouldBlock) => Err(OutboxError::Locked {
            path: dir.display().to_string(),
            message: format!("{} is locked", db_file.display()),
        }),
        Err(std::fs::TryLockError::Error(_)) => Ok(()),
    }
}

/// Renames `dir` to `<dir>.corrupt-<unix seconds>[-n]`, then syncs the parent directory.
fn quarantine(dir: &Path) -> Result<PathBuf, OutboxError> {
    let secs = now_ms() / 1000;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "outbox".into());
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    let fail = |to: &Path, message: String| OutboxError::Quarantine {
        path: dir.display().to_string(),
        to: to.display().to_string(),
        message,
    };
    for n in 0..100u32 {
        let suffix = if n == 0 {
            format!("{name}.corrupt-{secs}")
        } else {
            format!("{name}.corrupt-{secs}-{n}")
        };
        let to = parent.join(suffix);
        if to.exists() {
            continue;
        }
        std::fs::rename(dir, &to).map_err(|e| fail(&to, e.to_string()))?;
        if let Ok(p) = std::fs::File::open(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        }) {
            let _ = p.sync_all();
        }
        return Ok(to);
    }
    Err(fail(parent, "100 quarantined copies already exist".into()))
}

/// Peer measurement for the benchmark (`examples/outbox_bench.rs`), kept here because only
/// this module touches sled: raw sled, `apply_batch` of `batch` records of `record_len`
/// bytes under big-endian u64 keys, then `flush()`, as in DEPENDENCY-NOTES.md. Returns
/// records per second.
#[doc(hidden)]
pub fn raw_sled_append_rate(
    dir: &Path,
    records: usize,
    batch: usize,
    record_len: usize,
) -> Result<f64, OutboxError> {
    let path = dir.display().to_string();
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(DEFAULT_CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .map_err(|e| sled_err(&path, "open", e))?;
    let start = std::time::Instant::now();
    let mut seq = 0u64;
    for _ in 0..records / batch.max(1) {
        let mut b = sled::Batch::default();
        for _ in 0..batch {
            seq += 1;
            b.insert(&seq.to_be_bytes()[..], vec![seq as u8; record_len]);
        }
        db.apply_batch(b)
            .map_err(|e| sled_err(&path, "apply_batch", e))?;
        db.flush().map_err(|e| sled_err(&path, "flush", e))?;
    }
    Ok(seq as f64 / start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    const BIG: usize = usize::MAX;

    fn open(dir: &Path, cfg: &OutboxConfig) -> Outbox {
        let (o, q) = Outbox::open(dir, cfg).unwrap();
        assert_eq!(q, None);
        o
    }

    fn seqs(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    fn rec(class: Class, text: &str) -> (Class, Vec<u8>) {
        (class, text.as_bytes().to_vec())
    }

    /// The seqs of `read_after(after, max_records, BIG)`.
    fn seqs_after(o: &Outbox, after: u64, max_records: usize) -> Vec<u64> {
        seqs(&o.read_after(after, max_records, BIG).unwrap())
    }

    /// `n` records cycling through the classes (seq `i` of class `ALL[(i - 1) % 4]`), record
    /// `i` (from 0) with `payload(i)`.
    fn cycled(n: usize, payload: impl Fn(usize) -> Vec<u8>) -> Vec<(Class, Vec<u8>)> {
        (0..n).map(|i| (Class::ALL[i % 4], payload(i))).collect()
    }

    /// The default config with the byte cap `max_bytes`.
    fn capped(max_bytes: u64) -> OutboxConfig {
        OutboxConfig {
            max_bytes,
            ..OutboxConfig::default()
        }
    }

    /// `(produced, dropped by the cap, pending records)` of `class`.
    fn cap_counts(s: &OutboxStats, class: Class) -> (u64, u64, u64) {
        let c = s.class(class);
        (c.produced, c.dropped(DropReason::Cap), c.pending_records)
    }

    /// An outbox directory (`<tmp>/outbox`) and the config the tests open it with.
    struct Fixture {
        tmp: tempfile::TempDir,
        dir: PathBuf,
        cfg: OutboxConfig,
    }

    impl Fixture {
        fn new() -> Self {
            Self::with(OutboxConfig::default())
        }

        fn with(cfg: OutboxConfig) -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("outbox");
            Fixture { tmp, dir, cfg }
        }

        /// A new fixture with `cfg`, and its outbox opened.
        fn opened(cfg: OutboxConfig) -> (Self, Outbox) {
            let fx = Self::with(cfg);
            let o = fx.open();
            (fx, o)
        }

        /// Opens the outbox with the fixture's config (no quarantine expected).
        fn open(&self) -> Outbox {
            open(&self.dir, &self.cfg)
        }

        /// Closes `o` and opens the outbox again.
        fn reopen(&self, o: Outbox) -> Outbox {
            drop(o);
            self.open()
        }
    }

    #[test]
    fn seqs_are_ordered_and_never_reused_across_reopen() {
        let (fx, o) = Fixture::opened(OutboxConfig::default());
        assert_eq!(o.last_seq(), 0);
        let r = o
            .append_at(
                &[
                    rec(Class::Telemetry, "t1"),
                    rec(Class::Event, "e2"),
                    rec(Class::Drift, "d3"),
                ],
                1_000,
            )
            .unwrap();
        assert_eq!(r, 1..4);
        assert_eq!(o.append(&[rec(Class::Health, "h4")]).unwrap(), 4..5);
        assert_eq!(o.append(&[]).unwrap(), 5..5);
        let all = o.read_after(0, 100, BIG).unwrap();
        assert_eq!(seqs(&all), vec![1, 2, 3, 4]);
        assert_eq!(all[0].class, Class::Telemetry);
        assert_eq!(all[0].payload, b"t1");
        assert_eq!(all[0].produced_at_ms, 1_000);
        assert_eq!(all[1].class, Class::Event);
        assert_eq!(all[2].payload, b"d3");
        assert_eq!(all[3].class, Class::Health);

        let o = fx.reopen(o);
        assert_eq!(o.last_seq(), 4);
        assert_eq!(seqs_after(&o, 0, 100), vec![1, 2, 3, 4]);
        assert_eq!(seqs_after(&o, 2, 100), vec![3, 4]);
        assert_eq!(o.append(&[rec(Class::Telemetry, "t5")]).unwrap(), 5..6);
        assert_eq!(o.ack_through(5).unwrap(), 5);
        assert!(o.read_after(0, 100, BIG).unwrap().is_empty());

        // Everything acknowledged: the next seq still continues.
        let o = fx.reopen(o);
        assert_eq!(o.acked_through(), 5);
        assert_eq!(o.append(&[rec(Class::Drift, "d6")]).unwrap(), 6..7);
        assert_eq!(seqs_after(&o, 0, 100), vec![6]);
        o.verify().unwrap();
    }

    #[test]
    fn outbox_is_cheap_to_share_across_threads() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Outbox>();
        let tmp = tempfile::tempdir().unwrap();
        let o = open(tmp.path(), &OutboxConfig::default());
        let writers: Vec<_> = (0..4)
            .map(|_| {
                let o = o.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        o.append(&[rec(Class::Telemetry, "t"), rec(Class::Event, "e")])
                            .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        assert_eq!(o.last_seq(), 200);
        assert_eq!(seqs_after(&o, 0, 1000), (1..=200).collect::<Vec<_>>());
        o.verify().unwrap();
    }

    #[test]
    fn reopening_right_after_close_works() {
        let fx = Fixture::new();
        for i in 0..30u64 {
            let o = fx.open();
            assert_eq!(o.append(&[rec(Class::Event, "e")]).unwrap(), i + 1..i + 2);
        }
    }

    #[test]
    fn read_after_respects_record_and_byte_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let o = open(tmp.path(), &OutboxConfig::default());
        let batch = cycled(10, |_| vec![b'x'; 100]);
        assert_eq!(o.append(&batch).unwrap(), 1..11);
        assert_eq!(seqs_after(&o, 0, 3), vec![1, 2, 3]);
        assert_eq!(seqs_after(&o, 3, 3), vec![4, 5, 6]);
        // 250 payload bytes: two records of 100.
        assert_eq!(seqs(&o.read_after(0, 100, 250).unwrap()), vec![1, 2]);
        // At least one record, even over the byte limit or with a zero record limit.
        assert_eq!(seqs(&o.read_after(0, 100, 10).unwrap()), vec![1]);
        assert_eq!(seqs(&o.read_after(9, 0, 0).unwrap()), vec![10]);
        assert!(o.read_after(10, 100, BIG).unwrap().is_empty());
        assert!(o.read_after(u64::MAX, 100, BIG).unwrap().is_empty());
    }

    #[test]
    fn ack_deletes_exactly_the_range_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let o = open(tmp.path(), &OutboxConfig::default());
        // seq i has class ALL[(i - 1) % 4]: 1 T, 2 D, 3 H, 4 E, 5 T, ...
        o.append(&cycled(10, |i| format!("r{}", i + 1).into_bytes()))
            .unwrap();
        assert_eq!(o.ack_through(4).unwrap(), 4);
        assert_eq!(o.acked_through(), 4);
        assert_eq!(seqs_after(&o, 0, 100), vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(o.ack_through(4).unwrap(), 0);
        assert_eq!(o.ack_through(2).unwrap(), 0);
        assert_eq!(o.acked_through(), 4);
        let err = o.ack_through(11).unwrap_err();
        assert!(matches!(
            err,
            OutboxError::AckBeyondLast { seq: 11, last: 10 }
        ));
        let text = err.to_string();
        assert!(text.contains("11") && text.contains("10"), "{text}");
        assert_eq!(o.acked_through(), 4);
        assert_eq!(o.ack_through(7).unwrap(), 3);
        assert_eq!(seqs_after(&o, 0, 100), vec![8, 9, 10]);
        let s = o.stats();
        // Acked: seqs 1..=7 → T {1,5}, D {2,6}, H {3,7}, E {4}.
        assert_eq!(s.class(Class::Telemetry).acknowledged, 2);
        assert_eq!(s.class(Class::Drift).acknowledged, 2);
        assert_eq!(s.class(Class::Health).acknowledged, 2);
        assert_eq!(s.class(Class::Event).acknowledged, 1);
        assert_eq!(s.class(Class::Event).pending_records, 1);
        assert_eq!(s.pending_records(), 3);
        assert_eq!(s.acked_through, 7);
        assert_eq!(s.last_seq, 10);
        o.verify().unwrap();
        assert_eq!(o.ack_through(10).unwrap(), 3);
        assert_eq!(o.stats().stored_bytes, 0);
        o.verify().unwrap();
    }

    #[test]
    fn large_acks_are_applied_in_chunks() {
        let (fx, o) = Fixture::opened(OutboxConfig::default());
        // Segments of 64 records; per class 2 * 64 + a few: three segments each.
        o.set_segment_limits(64, SEG_MAX_BYTES);
        o.append(&cycled(4 * 2 * 64 + 17, |_| vec![1u8; 8]))
            .unwrap();
        assert_eq!(o.segment_count().unwrap(), 12);
        // And many small segments (one record each).
        o.set_segment_limits(1, SEG_MAX_BYTES);
        for i in 0..40 {
            o.append(&[(Class::ALL[i % 4], vec![2u8; 8])]).unwrap();
        }
        assert_eq!(o.segment_count().unwrap(), 52);
        o.set_limits(3, 5);
        let last = o.last_seq();
        assert_eq!(o.ack_through(last - 5).unwrap(), last - 5);
        assert_eq!(o.stats().pending_records(), 5);
        assert_eq!(o.acked_through(), last - 5);
        assert_eq!(
            seqs_after(&o, 0, 100),
            (last - 4..=last).collect::<Vec<_>>()
        );
        o.verify().unwrap();
        let o = fx.reopen(o);
        assert_eq!(o.acked_through(), last - 5);
        assert_eq!(o.stats().pending_records(), 5);
        o.verify().unwrap();
    }

    #[test]
    fn appends_are_split_into_bounded_segments() {
        let (_fx, o) = Fixture::opened(capped(1 << 30));
        // One append of 1000 records of two classes: two segments.
        let batch: Vec<_> = (0..1000)
            .map(|i| {
                let c = if i % 100 == 0 {
                    Class::Event
                } else {
                    Class::Telemetry
                };
                (c, vec![i as u8; 200])
            })
            .collect();
        assert_eq!(o.append(&batch).unwrap(), 1..1001);
        assert_eq!(o.segment_count().unwrap(), 2);
        // By bytes: 3 x 400 KiB fit two per MiB segment; a 2 MiB record gets its own.
        let big = vec![
            (Class::Drift, vec![1u8; 400 << 10]),
            (Class::Drift, vec![2u8; 400 << 10]),
            (Class::Drift, vec![3u8; 2 << 20]),
            (Class::Drift, vec![4u8; 400 << 10]),
        ];
        assert_eq!(o.append(&big).unwrap(), 1001..1005);
        assert_eq!(o.segment_count().unwrap(), 5);
        let back = o.read_after(1000, 10, BIG).unwrap();
        assert_eq!(seqs(&back), vec![1001, 1002, 1003, 1004]);
        for (r, (_, p)) in back.iter().zip(&big) {
            assert_eq!(&r.payload, p);
        }
        let all = o.read_after(0, 2000, BIG).unwrap();
        assert_eq!(seqs(&all), (1..=1004).collect::<Vec<_>>());
        assert_eq!(all[100].class, Class::Event);
        assert_eq!(all[101].payload, vec![101u8; 200]);
        o.verify().unwrap();
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<_> = std::fs::read_dir(dir.join(SEGMENTS_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn small_appends_fill_the_newest_segment_and_acks_delete_files() {
        let fx = Fixture::new();
        let dir = &fx.dir;
        let o = fx.open();
        for i in 0..50 {
            o.append(&[rec(Class::Health, &format!("h{i}")), rec(Class::Event, "e")])
                .unwrap();
        }
        // One segment (and one file) per class, not one per append.
        assert_eq!(o.segment_count().unwrap(), 2);
        assert_eq!(segment_files(dir).len(), 2);
        o.verify().unwrap();
        // Still extended after a reopen.
        let o = fx.reopen(o);
        o.append(&[rec(Class::Health, "after")]).unwrap();
        assert_eq!(o.segment_count().unwrap(), 2);
        let all = o.read_after(0, 1000, BIG).unwrap();
        assert_eq!(seqs(&all), (1..=101).collect::<Vec<_>>());
        assert_eq!(all[100].payload, b"after");
        assert_eq!(all[98].payload, b"h49");
        // An ack inside the segments rewrites them to new files; the old ones are deleted.
        let before = segment_files(dir);
        o.ack_through(11).unwrap();
        let after = segment_files(dir);
        assert_eq!(after.len(), 2);
        assert!(
            after.iter().all(|f| !before.contains(f)),
            "{before:?} {after:?}"
        );
        o.verify().unwrap();
        o.ack_through(101).unwrap();
        assert!(segment_files(dir).is_empty());
        assert_eq!(o.segment_count().unwrap(), 0);
        o.verify().unwrap();
    }

    #[test]
    fn a_full_disk_fails_the_append_counts_io_drops_and_keeps_the_records_stored() {
        if !Path::new("/dev/full").exists() {
            eprintln!("SKIPPED: no /dev/full on this machine");
            return;
        }
        let (fx, o) = Fixture::opened(OutboxConfig::default());
        o.append(&[rec(Class::Event, "stored"), rec(Class::Event, "stored too")])
            .unwrap();
        // The disk fills up: writes to the segment file fail with ENOSPC (/dev/full).
        let f = segment_files(&fx.dir).remove(0);
        let saved = std::fs::read(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        std::os::unix::fs::symlink("/dev/full", &f).unwrap();
        let e = o.append(&[rec(Class::Event, "lost")]).unwrap_err();
        assert!(e.to_string().contains(&*f.to_string_lossy()), "{e}");
        let e = o.append(&[rec(Class::Event, "refused")]).unwrap_err();
        assert!(matches!(e, OutboxError::Failed { .. }), "{e}");
        let s = o.stats();
        let ev = s.class(Class::Event);
        assert_eq!((ev.produced, ev.pending_records), (4, 2));
        assert_eq!(ev.dropped(DropReason::Io), 2);
        assert!(s.failed.is_some());
        // Space again (the file as it was): reopened, the stored records are all there.
        std::fs::remove_file(&f).unwrap();
        std::fs::write(&f, saved).unwrap();
        let o = fx.reopen(o);
        assert_eq!(seqs_after(&o, 0, 10), vec![1, 2]);
        // The drops and the seq the failed append took were saved (the index still took a
        // write): no seq is reused; the refused append took none.
        assert_eq!(o.stats().class(Class::Event).dropped(DropReason::Io), 2);
        assert_eq!(o.append(&[rec(Class::Event, "again")]).unwrap(), 4..5);
        o.verify().unwrap();
    }

    #[test]
    fn crc_of_an_extended_file_resumes() {
        let (a, b) = (b"first part".as_slice(), b" and the rest".as_slice());
        let mut h = crc32fast::Hasher::new_with_initial(crc32fast::hash(a));
        h.update(b);
        assert_eq!(h.finalize(), crc32fast::hash(&[a, b].concat()));
    }

    #[test]
    fn unindexed_segment_files_are_deleted_on_open_and_ids_not_reused() {
        let fx = Fixture::new();
        let dir = &fx.dir;
        let o = fx.open();
        o.append(&[rec(Class::Event, "kept")]).unwrap();
        drop(o);
        // A crash after writing a file and before indexing it leaves such a file.
        let stray = dir.join(SEGMENTS_DIR).join(format!("{:016x}.seg", 0x40));
        std::fs::write(&stray, b"written, never indexed").unwrap();
        let other = dir.join(SEGMENTS_DIR).join("notes.txt");
        std::fs::write(&other, b"not ours").unwrap();
        let o = fx.open();
        assert!(!stray.exists());
        assert!(other.exists(), "files that are not segments are left alone");
        o.append(&[rec(Class::Drift, "new file")]).unwrap();
        let names: Vec<_> = segment_files(dir)
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        assert!(names.contains(&format!("{:016x}.seg", 0x41)), "{names:?}");
        let all = o.read_after(0, 10, BIG).unwrap();
        assert_eq!(all[0].payload, b"kept");
        assert_eq!(all[1].payload, b"new file");
        o.verify().unwrap();
    }

    #[test]
    fn a_missing_segment_file_is_quarantined() {
        quarantine_case(|dir| {
            let f = segment_files(dir);
            assert!(!f.is_empty());
            std::fs::remove_file(&f[0]).unwrap();
        });
    }

    #[test]
    fn a_truncated_segment_file_is_quarantined() {
        quarantine_case(|dir| {
            let f = &segment_files(dir)[0];
            let len = std::fs::metadata(f).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(f)
                .unwrap()
                .set_len(len - 1)
                .unwrap();
        });
    }

    #[test]
    fn segment_files_without_a_database_are_quarantined() {
        quarantine_case(|dir| {
            for name in ["db", "conf"] {
                std::fs::remove_file(dir.join(name)).unwrap();
            }
            for entry in std::fs::read_dir(dir).unwrap() {
                let p = entry.unwrap().path();
                if p.is_file() {
                    std::fs::remove_file(p).unwrap();
                } else if p.file_name().unwrap() != SEGMENTS_DIR {
                    std::fs::remove_dir_all(p).unwrap();
                }
            }
        });
    }

    #[test]
    fn a_damaged_segment_file_is_reported_with_its_name() {
        let (fx, o) = Fixture::opened(OutboxConfig::default());
        o.append(&[rec(Class::Event, "hello world")]).unwrap();
        let f = segment_files(&fx.dir).remove(0);
        let mut bytes = std::fs::read(&f).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        std::fs::write(&f, &bytes).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        for e in [
            o.read_after(0, 10, BIG).unwrap_err(),
            o.verify().unwrap_err(),
        ] {
            let text = e.to_string();
            assert!(matches!(e, OutboxError::Corrupt { .. }), "{text}");
            assert!(text.contains(&name) && text.contains("CRC-32"), "{text}");
        }
        // Bytes past the indexed length (an append that crashed before its index entry) are
        // ignored, and overwritten by the next append.
        bytes[last] ^= 0x20;
        bytes.extend_from_slice(b"garbage of an interrupted append");
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(o.read_after(0, 10, BIG).unwrap()[0].payload, b"hello world");
        o.append(&[rec(Class::Event, "next")]).unwrap();
        let all = o.read_after(0, 10, BIG).unwrap();
        assert_eq!(all[1].payload, b"next");
        o.verify().unwrap();
    }

    #[test]
    fn read_after_starts_inside_a_segment() {
        let (fx, o) = Fixture::opened(OutboxConfig::default());
        // seq i: class ALL[(i - 1) % 4], payload "r<i>"; segments of 5 records: one segment
        // per class per append.
        o.set_segment_limits(5, SEG_MAX_BYTES);
        for round in 0..3 {
            o.append(&cycled(20, |i| {
                format!("r{}", round * 20 + i + 1).into_bytes()
            }))
            .unwrap();
        }
        assert_eq!(o.segment_count().unwrap(), 12);
        let check = |o: &Outbox| {
            for after in [0u64, 1, 2, 7, 19, 20, 21, 33, 58, 59, 60] {
                let got = o.read_after(after, 7, BIG).unwrap();
                let want: Vec<u64> = (after + 1..=60).take(7).collect();
                assert_eq!(seqs(&got), want, "after {after}");
                for r in &got {
                    assert_eq!(r.payload, format!("r{}", r.seq).into_bytes());
                    assert_eq!(r.class, Class::ALL[((r.seq - 1) % 4) as usize]);
                }
            }
            // Paging through with small byte limits sees every record once.
            let mut after = 0;
            let mut seen = Vec::new();
            loop {
                let got = o.read_after(after, 100, 10).unwrap();
                let Some(last) = got.last() else { break };
                after = last.seq;
                seen.extend(seqs(&got));
            }
            assert_eq!(seen, (1..=60).collect::<Vec<_>>());
        };
        check(&o);
        let o = fx.reopen(o);
        check(&o);
        o.verify().unwrap();
    }

    #[test]
    fn an_ack_inside_a_segment_rewrites_it() {
        let (fx, o) = Fixture::opened(OutboxConfig::default());
        // One append: four segments, seq i of class ALL[(i - 1) % 4].
        o.append(&cycled(40, |i| vec![i as u8; 30])).unwrap();
        assert_eq!(o.segment_count().unwrap(), 4);
        // Through 13: telemetry 1,5,9,13; drift 2,6,10; health 3,7,11; event 4,8,12.
        assert_eq!(o.ack_through(13).unwrap(), 13);
        assert_eq!(o.segment_count().unwrap(), 4);
        let s = o.stats();
        let acked: Vec<u64> = s.classes.iter().map(|c| c.acknowledged).collect();
        assert_eq!(acked, vec![4, 3, 3, 3]);
        assert_eq!(s.class(Class::Telemetry).pending_records, 6);
        assert_eq!(s.stored_bytes, 27 * stored_size(30));
        let left = o.read_after(0, 100, BIG).unwrap();
        assert_eq!(seqs(&left), (14..=40).collect::<Vec<_>>());
        assert!(left
            .iter()
            .all(|r| r.payload == vec![(r.seq - 1) as u8; 30]));
        assert_eq!(seqs_after(&o, 5, 2), vec![14, 15]);
        o.verify().unwrap();

        let o = fx.reopen(o);
        assert_eq!(seqs_after(&o, 0, 100), (14..=40).collect::<Vec<_>>());
        // Through 37 leaves one segment (event, seq 40) and rewrites telemetry... none:
        // telemetry's last is 37 (deleted), drift 38 and health 39 keep one record each.
        assert_eq!(o.ack_through(37).unwrap(), 24);
        assert_eq!(o.segment_count().unwrap(), 3);
        assert_eq!(seqs_after(&o, 0, 100), vec![38, 39, 40]);
        assert_eq!(o.stats().class(Class::Telemetry).pending_records, 0);
        o.verify().unwrap();
        assert_eq!(o.ack_through(40).unwrap(), 3);
        assert_eq!(o.segment_count().unwrap(), 0);
        assert_eq!(o.stats().stored_bytes, 0);
        o.verify().unwrap();
    }

    #[test]
    fn partial_segment_eviction_is_exact_per_record() {
        let one = stored_size(500);
        let (fx, o) = Fixture::opened(capped(150 * one));
        // 100 telemetry + 100 health/event interleaved in one append: 200 > 150.
        let batch: Vec<_> = (0..200)
            .map(|i| {
                let c = match i % 4 {
                    0 | 1 => Class::Telemetry,
                    2 => Class::Health,
                    _ => Class::Event,
                };
                (c, vec![i as u8; 500])
            })
            .collect();
        o.append(&batch).unwrap();
        // The 50 oldest telemetry records went: seqs 1,2,5,6,... (the first 25 pairs).
        let s = o.stats();
        assert_eq!(s.class(Class::Telemetry).dropped(DropReason::Cap), 50);
        assert_eq!(s.class(Class::Telemetry).pending_records, 50);
        assert_eq!(s.stored_bytes, 150 * one);
        let left = seqs_after(&o, 0, 1000);
        let dropped: Vec<u64> = (1..=200u64).filter(|s| (s - 1) % 4 < 2).take(50).collect();
        let want: Vec<u64> = (1..=200u64).filter(|s| !dropped.contains(s)).collect();
        assert_eq!(left, want);
        o.verify().unwrap();

        // 60 more events: the 50 telemetry records left, then the 10 oldest of health and
        // events by seq (3, 4, 7, 8, 11, 12, 15, 16, 19, 20), which splits both segments.
        let events: Vec<_> = (0..60).map(|_| (Class::Event, vec![9u8; 500])).collect();
        o.append(&events).unwrap();
        let s = o.stats();
        assert_eq!(s.class(Class::Telemetry).dropped(DropReason::Cap), 100);
        assert_eq!(s.class(Class::Health).dropped(DropReason::Cap), 5);
        assert_eq!(s.class(Class::Event).dropped(DropReason::Cap), 5);
        assert_eq!(s.stored_bytes, 150 * one);
        let left = seqs_after(&o, 0, 1000);
        let mut want: Vec<u64> = (21..=200u64).filter(|s| (s - 1) % 4 >= 2).collect();
        want.extend(201..=260);
        assert_eq!(left, want);
        o.verify().unwrap();
        let o = fx.reopen(o);
        assert_eq!(seqs_after(&o, 0, 1000), want);
        assert_eq!(o.stats().class(Class::Event).dropped(DropReason::Cap), 5);
        o.verify().unwrap();
    }

    #[test]
    fn eviction_and_expiry_in_small_rounds_give_the_same_result() {
        let run = |limits: Option<(usize, usize)>| {
            let (_fx, o) = Fixture::opened(OutboxConfig {
                ttl_secs: Some(100),
                ..capped(60 * stored_size(300))
            });
            if let Some((chunk, walk)) = limits {
                o.set_limits(chunk, walk);
            }
            let t0 = 1_700_000_000_000u64;
            for round in 0..30u64 {
                let batch: Vec<_> = (0..13)
                    .map(|i| (Class::ALL[(i + round as usize) % 4], vec![round as u8; 300]))
                    .collect();
                o.append_at(&batch, t0 + round * 10_000).unwrap();
            }
            o.expire(t0 + 350_000).unwrap();
            o.verify().unwrap();
            let s = o.stats();
            let left = seqs_after(&o, 0, 10_000);
            (s.classes, left)
        };
        let (a, left_a) = run(None);
        let (b, left_b) = run(Some((1, 3)));
        assert_eq!(a, b);
        assert_eq!(left_a, left_b);
        assert!(a.iter().map(|c| c.dropped(DropReason::Cap)).sum::<u64>() > 0);
        assert!(a.iter().map(|c| c.dropped(DropReason::Ttl)).sum::<u64>() > 0);
        assert!(!left_a.is_empty());
    }

    #[test]
    fn published_records_are_exempt_from_cap_and_ttl() {
        let one = stored_size(1000);
        let fx = Fixture::with(OutboxConfig {
            ttl_secs: Some(60),
            ..capped(10 * one)
        });
        let t0 = now_ms();
        let p = || vec![5u8; 1000];
        let o = fx.open();
        assert_eq!(o.published_through(), 0);
        let ts: Vec<_> = (0..10).map(|_| (Class::Telemetry, p())).collect();
        o.append_at(&ts, t0).unwrap();
        // The sync task read and published 1..=4 (read_for_publish), then 5.
        assert_eq!(
            seqs(&o.read_for_publish(0, 4, BIG).unwrap()),
            vec![1, 2, 3, 4]
        );
        assert_eq!(o.published_through(), 4);
        o.set_published_through(5);
        // 5 events: 5 telemetry must go, but 1..=5 are in flight: 6..=10 go instead.
        let es: Vec<_> = (0..5).map(|_| (Class::Event, p())).collect();
        o.append_at(&es, t0).unwrap();
        assert_eq!(
            seqs_after(&o, 0, 100),
            vec![1, 2, 3, 4, 5, 11, 12, 13, 14, 15]
        );
        // 2 more events: no telemetry left to evict, the oldest events go (11, 12).
        o.append_at(&[(Class::Event, p()), (Class::Event, p())], t0)
            .unwrap();
        assert_eq!(
            seqs_after(&o, 0, 100),
            vec![1, 2, 3, 4, 5, 13, 14, 15, 16, 17]
        );
        // Everything published: the two new events are the only records the cap may drop,
        // so they go (the cap holds; the in-flight records are kept).
        o.set_published_through(u64::MAX);
        assert_eq!(o.published_through(), 17);
        assert_eq!(
            o.append_at(&[(Class::Event, p()), (Class::Event, p())], t0)
                .unwrap(),
            18..20
        );
        let s = o.stats();
        assert_eq!(s.stored_bytes, 10 * one);
        assert_eq!(s.class(Class::Telemetry).dropped(DropReason::Cap), 5);
        assert_eq!(s.class(Class::Event).dropped(DropReason::Cap), 4);
        // The TTL spares the published records too.
        assert_eq!(o.expire(t0 + 61_000).unwrap(), 0);
        assert_eq!(o.stats().pending_records(), 10);
        o.verify().unwrap();
        // A rewind lowers the watermark to the ack: the next append evicts again.
        assert_eq!(o.ack_through(2).unwrap(), 2);
        o.set_published_through(o.acked_through());
        assert_eq!(o.published_through(), 2);
        o.append_at(&[(Class::Event, p())], t0 + 61_000).unwrap();
        // TTL (at t0 + 61 s) first: all of 3..=17 expire; the new event stays.
        assert_eq!(seqs_after(&o, 0, 100), vec![20]);
        let s = o.stats();
        assert_eq!(s.class(Class::Telemetry).dropped(DropReason::Ttl), 3);
        assert_eq!(s.class(Class::Event).dropped(DropReason::Ttl), 5);
        for c in &s.classes {
            assert!(c.balanced(), "{c:?}");
        }
        o.verify().unwrap();
        let o = fx.reopen(o);
        assert_eq!(o.published_through(), 2);
        assert_eq!(o.stats().classes, s.classes);
        o.verify().unwrap();
    }

    #[test]
    fn the_published_watermark_resets_on_reopen() {
        let one = stored_size(100);
        let (fx, o) = Fixture::opened(capped(1000 * one));
        o.append(&vec![(Class::Telemetry, vec![1u8; 100]); 1000])
            .unwrap();
        o.ack_through(100).unwrap();
        o.set_published_through(1000);
        // Only the new events may be dropped: they are (the cap holds).
        o.append(&vec![(Class::Event, vec![2u8; 100]); 150])
            .unwrap();
        let s = o.stats();
        assert_eq!(s.class(Class::Event).dropped(DropReason::Cap), 50);
        assert_eq!(s.class(Class::Telemetry).dropped_total(), 0);
        assert_eq!(s.pending_records(), 1000);
        assert_eq!(
            o.read_after(1000, 1, BIG).unwrap()[0].seq,
            1051,
            "the oldest unpublished events went"
        );
        drop(o);
        // After a restart nothing is in flight: a smaller cap evicts right away, oldest
        // telemetry first, starting just above the ack.
        let o = open(&fx.dir, &capped(500 * one));
        assert_eq!(o.published_through(), 100);
        let s = o.stats();
        assert_eq!(s.class(Class::Telemetry).dropped(DropReason::Cap), 500);
        assert_eq!(s.stored_bytes, 500 * one);
        let left = seqs_after(&o, 0, 10_000);
        assert_eq!(left.first(), Some(&601));
        assert_eq!(left.len(), 500);
        o.verify().unwrap();
    }

    #[test]
    fn cap_evicts_the_oldest_of_the_lowest_class_first() {
        let one = stored_size(1000);
        let (fx, o) = Fixture::opened(capped(10 * one));
        let p = || vec![7u8; 1000];
        use Class::{Drift as D, Event as E, Health as H, Telemetry as T};
        let first = [T, E, D, H, T, D, E, T, D, H, T, E];
        let batch: Vec<_> = first.iter().map(|c| (*c, p())).collect();
        assert_eq!(o.append(&batch).unwrap(), 1..13);
        // 12 records, cap 10: telemetry 1 and 5 go.
        let left = seqs_after(&o, 0, 100);
        assert_eq!(left, vec![2, 3, 4, 6, 7, 8, 9, 10, 11, 12]);

        // Three drift records: the last telemetry (8, 11), then the oldest drift (3).
        assert_eq!(o.append(&[(D, p()), (D, p()), (D, p())]).unwrap(), 13..16);
        let left = seqs_after(&o, 0, 100);
        assert_eq!(left, vec![2, 4, 6, 7, 9, 10, 12, 13, 14, 15]);

        // Six events: all five drift records, then the oldest of health and events (event 2).
        let events: Vec<_> = (0..6).map(|_| (E, p())).collect();
        assert_eq!(o.append(&events).unwrap(), 16..22);
        let left = seqs_after(&o, 0, 100);
        assert_eq!(left, vec![4, 7, 10, 12, 16, 17, 18, 19, 20, 21]);

        // One telemetry record: it is the lowest class, so it is the one dropped.
        assert_eq!(o.append(&[(T, p())]).unwrap(), 22..23);
        let left2 = seqs_after(&o, 0, 100);
        assert_eq!(left2, left);

        // One more event: the oldest of health/event is health 4.
        assert_eq!(o.append(&[(E, p())]).unwrap(), 23..24);
        let left = seqs_after(&o, 0, 100);
        assert_eq!(left, vec![7, 10, 12, 16, 17, 18, 19, 20, 21, 23]);

        let check = |s: &OutboxStats| {
            assert_eq!(cap_counts(s, T), (5, 5, 0));
            assert_eq!(cap_counts(s, D), (6, 6, 0));
            assert_eq!(cap_counts(s, H), (2, 1, 1));
            assert_eq!(cap_counts(s, E), (10, 1, 9));
            for c in &s.classes {
                assert_eq!(c.acknowledged, 0);
                assert_eq!(c.dropped(DropReason::Ttl) + c.dropped(DropReason::Io), 0);
            }
            assert_eq!(s.stored_bytes, 10 * one);
        };
        check(&o.stats());
        o.verify().unwrap();
        let o = fx.reopen(o);
        check(&o.stats());
        o.verify().unwrap();
    }

    #[test]
    fn a_smaller_cap_on_reopen_evicts_right_away() {
        let (fx, o) = Fixture::opened(OutboxConfig::default());
        o.append(&vec![(Class::Telemetry, vec![0u8; 100]); 100])
            .unwrap();
        drop(o);
        let o = open(&fx.dir, &capped(10 * stored_size(100)));
        assert_eq!(seqs_after(&o, 0, 1000), (91..=100).collect::<Vec<_>>());
        assert_eq!(
            o.stats().class(Class::Telemetry).dropped(DropReason::Cap),
            90
        );
        o.verify().unwrap();
    }

    #[test]
    fn ttl_drops_old_records_on_append_and_expire() {
        let fx = Fixture::with(OutboxConfig {
            ttl_secs: Some(60),
            ..OutboxConfig::default()
        });
        let t0 = 1_700_000_000_000;
        let o = fx.open();
        o.append_at(&[rec(Class::Telemetry, "old")], t0).unwrap();
        o.append_at(&[rec(Class::Event, "newer")], t0 + 30_000)
            .unwrap();
        assert_eq!(o.expire(t0 + 59_999).unwrap(), 0);
        assert_eq!(o.expire(t0 + 60_000).unwrap(), 1);
        assert_eq!(seqs_after(&o, 0, 10), vec![2]);
        // The event expires during the next append.
        o.append_at(&[rec(Class::Drift, "now")], t0 + 90_000)
            .unwrap();
        let left = o.read_after(0, 10, BIG).unwrap();
        assert_eq!(seqs(&left), vec![3]);
        assert_eq!(left[0].class, Class::Drift);
        let s = o.stats();
        assert_eq!(s.class(Class::Telemetry).dropped(DropReason::Ttl), 1);
        assert_eq!(s.class(Class::Event).dropped(DropReason::Ttl), 1);
        assert_eq!(s.class(Class::Drift).dropped(DropReason::Ttl), 0);
        assert_eq!(s.class(Class::Drift).pending_records, 1);
        o.verify().unwrap();
        let o = fx.reopen(o);
        assert_eq!(o.stats().class(Class::Event).dropped(DropReason::Ttl), 1);
        o.verify().unwrap();
    }

    #[test]
    fn counters_survive_reopen_and_balance() {
        let (fx, o) = Fixture::opened(capped(200 * stored_size(50)));
        for round in 0..20u64 {
            let batch: Vec<_> = (0..37)
                .map(|i| {
                    (
                        Class::ALL[(i * 7 + round as usize) % 4],
                        vec![round as u8; 50],
                    )
                })
                .collect();
            o.append(&batch).unwrap();
            if round == 5 {
                o.ack_through(o.last_seq() - 20).unwrap();
            }
        }
        let before = o.stats();
        o.verify().unwrap();
        let o = fx.reopen(o);
        let after = o.stats();
        assert_eq!(after.classes, before.classes);
        assert_eq!(after.last_seq, 740);
        assert_eq!(after.acked_through, before.acked_through);
        let produced: u64 = after.classes.iter().map(|c| c.produced).sum();
        assert_eq!(produced, 740);
        let dropped: u64 = after
            .classes
            .iter()
            .map(|c| c.dropped(DropReason::Cap))
            .sum();
        assert!(dropped > 0);
        for c in &after.classes {
            assert_eq!(
                c.produced,
                c.acknowledged + c.pending_records + c.dropped_total()
            );
        }
        assert!(after.size_on_disk > 0);
        o.verify().unwrap();
    }

    /// Fills an outbox dir, then damages its files with `damage`, and checks that `open`
    /// quarantines it and starts over.
    fn quarantine_case(damage: impl FnOnce(&Path)) {
        let (fx, o) = Fixture::opened(OutboxConfig::default());
        for _ in 0..20 {
            o.append(&vec![(Class::Event, vec![3u8; 200]); 100])
                .unwrap();
        }
        let old_epoch = o.epoch();
        drop(o);
        damage(&fx.dir);
        let (o, q) = Outbox::open(&fx.dir, &fx.cfg).unwrap();
        let q = q.expect("the damaged database is reported as quarantined");
        assert!(q.moved_to.exists(), "{q:?}");
        assert!(
            q.moved_to
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("outbox.corrupt-"),
            "{q:?}"
        );
        assert!(!q.error.is_empty());
        // A fresh, working database, in a new epoch (its seqs restart).
        assert_eq!(o.last_seq(), 0);
        let epoch = o.epoch();
        assert_ne!(epoch, old_epoch);
        assert_eq!(o.append(&[rec(Class::Event, "again")]).unwrap(), 1..2);
        o.verify().unwrap();
        let o = fx.reopen(o);
        assert_eq!(o.last_seq(), 1);
        assert_eq!(o.epoch(), epoch, "the epoch is stored");
    }

    fn garbage(len: usize) -> Vec<u8> {
        // xorshift: deterministic, not all zero.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn garbage_over_the_db_files_is_quarantined() {
        quarantine_case(|dir| {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_file() {
                    let len = std::fs::metadata(&path).unwrap().len() as usize;
                    std::fs::write(&path, garbage(len.max(64))).unwrap();
                }
            }
        });
    }

    #[test]
    fn garbage_over_the_db_log_is_quarantined() {
        quarantine_case(|dir| {
            let path = dir.join("db");
            let len = std::fs::metadata(&path).unwrap().len() as usize;
            std::fs::write(&path, garbage(len)).unwrap();
        });
    }

    #[test]
    fn a_truncated_db_file_is_quarantined() {
        quarantine_case(|dir| {
            let path = dir.join("db");
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(100).unwrap();
        });
    }

    #[test]
    fn a_database_in_use_is_reported_not_quarantined() {
        let (fx, o) = Fixture::opened(OutboxConfig::default());
        o.append(&[rec(Class::Event, "e")]).unwrap();
        let err = Outbox::open(&fx.dir, &fx.cfg).unwrap_err();
        assert!(matches!(err, OutboxError::Locked { .. }), "{err}");
        let siblings = std::fs::read_dir(fx.tmp.path()).unwrap().count();
        assert_eq!(siblings, 1, "nothing was moved aside");
        assert_eq!(o.read_after(0, 10, BIG).unwrap().len(), 1);
    }

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: OutboxConfig = toml::from_str("").unwrap();
        assert_eq!(c, OutboxConfig::default());
        assert_eq!(c.max_bytes, 256 * 1024 * 1024);
        assert_eq!(c.ttl_secs, None);
        assert!(c.problems().is_empty());
        let c: OutboxConfig = toml::from_str("ttl_secs = 3600\nmax_bytes = 1048576").unwrap();
        assert_eq!(c.ttl_secs, Some(3600));
        assert_eq!(c.cache_bytes, DEFAULT_CACHE_BYTES);
        let err = toml::from_str::<OutboxConfig>("max_byte = 1").unwrap_err();
        assert!(err.to_string().contains("max_byte"), "{err}");
        let bad = OutboxConfig {
            max_bytes: 1,
            ttl_secs: Some(0),
            cache_bytes: 0,
        };
        let p = bad.problems().join("\n");
        assert!(p.contains("max_bytes") && p.contains("ttl_secs") && p.contains("cache_bytes"));
    }

    #[test]
    fn class_labels_and_priorities() {
        let labels: Vec<_> = Class::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(labels, ["telemetry", "drift", "health", "event"]);
        let prio: Vec<_> = Class::ALL.iter().map(|c| c.priority()).collect();
        assert_eq!(prio, [0, 1, 2, 2]);
        for c in Class::ALL {
            assert_eq!(Class::from_code(c.code()), Some(c));
        }
        let reasons: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(reasons, ["cap", "ttl", "io"]);
    }

    #[test]
    fn meta_round_trips_and_rejects_damage() {
        let mut s = State::fresh();
        s.next_seq = 99;
        s.acked_through = 40;
        s.classes[1] = ClassStats {
            produced: 10,
            acknowledged: 3,
            pending_records: 5,
            pending_bytes: 500,
            dropped: [1, 1, 0],
        };
        assert_eq!(State::decode(&s.encode()).unwrap(), s);
        let mut bad = s;
        bad.classes[1].produced = 11;
        assert!(State::decode(&bad.encode()).unwrap_err().contains("drift"));
        let mut v = s.encode();
        v.pop();
        assert!(State::decode(&v).is_err());
        let mut v = s.encode();
        v[0] = 1;
        assert!(State::decode(&v).unwrap_err().contains("format 1"));
        let mut zero = s;
        zero.epoch = 0;
        assert!(State::decode(&zero.encode())
            .unwrap_err()
            .contains("epoch 0"));
        assert_ne!(State::fresh().epoch, State::fresh().epoch);
    }

    /// The child side of `appended_records_survive_kill_9`: appends until killed, printing
    /// the end of every range `append` returned.
    #[test]
    #[ignore = "run by appended_records_survive_kill_9 in a child process"]
    fn child_appender() {
        let Some(dir) = std::env::var_os("OUTBOX_CHILD_DIR") else {
            return;
        };
        let o = open(Path::new(&dir), &OutboxConfig::default());
        for round in 0..100_000u64 {
            let batch: Vec<_> = (0..50)
                .map(|i| (Class::ALL[(i + round as usize) % 4], vec![round as u8; 200]))
                .collect();
            let r = o.append(&batch).unwrap();
            println!("appended-through {}", r.end - 1);
        }
    }

    #[test]
    fn appended_records_survive_kill_9() {
        let fx = Fixture::new();
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args([
                "--exact",
                "outbox::tests::child_appender",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("OUTBOX_CHILD_DIR", &fx.dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut through = 0u64;
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = 0;
        while seen < 30 {
            let line = lines.next().expect("the child prints progress").unwrap();
            if let Some(n) = line.strip_prefix("appended-through ") {
                through = n.parse().unwrap();
                seen += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(through >= 30 * 50);

        let o = fx.open();
        o.verify().unwrap();
        let mut next = 0;
        let mut count = 0u64;
        loop {
            let batch = o.read_after(next, 1000, BIG).unwrap();
            let Some(last) = batch.last() else { break };
            for (r, expected) in batch.iter().zip(next + 1..) {
                assert_eq!(r.seq, expected, "no gap in the durable prefix");
            }
            next = last.seq;
            count += batch.len() as u64;
        }
        assert!(
            next >= through,
            "acknowledged appends through {through}, found {next}"
        );
        let s = o.stats();
        assert_eq!(count, s.last_seq);
        for c in &s.classes {
            assert_eq!(c.produced, c.pending_records);
        }
    }
}
