//! Fleet-side ingest of device record batches (wire protocol v1, `shared::wire`): the minimal
//! acknowledging consumer the fleet server builds on. It subscribes to every device's records
//! topic, decompresses and checks each batch, deduplicates by (device, seq), stores new
//! records durably and only then acknowledges them.
//!
//! Guarantees (of [`Ingest`] with any [`IngestStore`] that keeps its contract, and of
//! [`FileStore`]):
//! - an ack `{"through": n}` is published only after every record of that device with
//!   `seq <= n` that was ever received is durable (records fsynced, then the state file
//!   written atomically and its directory fsynced);
//! - records are stored in seq order, each at most once: a record with `seq <=` the device's
//!   last stored seq is a duplicate and is skipped (counted);
//! - a batch whose `prev` is beyond the last stored seq means records in between were lost
//!   on the way (e.g. a QoS 1 publish the client library dropped on reconnect): nothing of it
//!   is stored and it is not acknowledged, so the device replays from its last ack;
//! - seqs are never skipped without the device accounting for them: the seqs that stored
//!   batches skipped (`DeviceState::skipped`) never exceed the total of the device's
//!   cumulative drop counters (every skipped seq is a record the device dropped, and it
//!   counts a drop before it sends a batch that skips the record). A batch that would break
//!   this is refused like a gap (nothing stored, no ack, the device replays): it comes from a
//!   device that read its outbox incompletely, and acknowledging it would delete records
//!   that were never delivered;
//! - seqs belong to the device's outbox EPOCH (`Batch::epoch`, random per outbox): a batch
//!   with a new epoch means the device's outbox was recreated (after corruption) and its
//!   seqs and drop counters restart, so the device's last stored seq and skip accounting
//!   restart too (counted in `DeviceState::epoch_changes`, with the drops reported in the
//!   earlier epochs kept in `dropped_earlier`); a batch of an epoch seen before the current
//!   one (a late redelivery) is refused, not stored and not acknowledged; acks carry the
//!   epoch they acknowledge;
//! - the per-device state (last stored seq, counters, the drop counters the device reported)
//!   survives restarts of this process: after a crash between the records fsync and the
//!   state write, the records file is truncated back to the length the state file records
//!   (those records were never acknowledged, so the device sends them again).
//!
//! [`FileStore`] is deliberately simple (per device: `devices/<id>/records.jsonl`, one
//! `shared::wire::Record` JSON per line, append-only, and `devices/<id>/state.json`); the
//! fleet server can replace it with another [`IngestStore`] (sled, a database) without
//! touching the protocol logic in [`Ingest`]. Records go to segment files
//! (`records.jsonl`, then `records.<n>.jsonl`, each up to `Retention::segment_bytes`); the
//! state names the segment being appended to, so a crash while starting a new segment leaves
//! an unnamed file that the next open deletes (its records were never acknowledged).
//! Retention deletes whole closed segments by age or by the device's total size, never the
//! segment being appended to; `state.json` counts what it deleted.
//!
//! The MQTT loop ([`run_with`]) also hands status messages, replies and chunk requests to a
//! [`DeviceSink`] (the fleet server's registry, rollouts and bundle delivery), and the
//! records it stored to the same sink after they are durable. [`run`] is the ingest alone
//! over plain `mqtt://`; the server passes its own (TLS) client options.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use shared::wire::{self, Batch, DropCounts, RecordClass};
use tokio_util::sync::CancellationToken;

/// Format number of `state.json`.
pub const STATE_FORMAT: u32 = 1;
/// Earlier epochs remembered per device (to refuse their late batches).
const RETIRED_EPOCHS: usize = 8;
/// Largest `state.json` read back (bytes).
const MAX_STATE_BYTES: u64 = 1024 * 1024;

/// A storage failure, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    Corrupt { path: PathBuf, problem: String },
}

/// Why a batch was not processed.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("topic {topic:?} is not <prefix>/<device>/records with a valid device id")]
    Topic { topic: String },
    #[error("batch field \"device\" is {batch:?} but it arrived on the topic of device {topic:?}")]
    DeviceMismatch { topic: String, batch: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("bad ingest url {0:?} (expected mqtt://host:port)")]
    Url(String),
}

/// What the ingest knows about one device; persisted by the store (on-disk format
/// `STATE_FORMAT`, so it derives `Serialize` on purpose).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    #[serde(default)]
    pub format: u32,
    /// The highest seq stored (0: none yet); everything acknowledged is <= this.
    pub last_seq: u64,
    /// Records stored, per class.
    #[serde(default)]
    pub received: BTreeMap<RecordClass, u64>,
    /// Records received again (seq <= last_seq) and skipped.
    #[serde(default)]
    pub duplicates: u64,
    /// Batches refused because their `prev` was beyond `last_seq`.
    #[serde(default)]
    pub gaps: u64,
    /// Batches refused because they skip seqs the device's drop counters do not account for.
    #[serde(default)]
    pub unaccounted: u64,
    /// Seqs below `last_seq` skipped by stored batches (records the device dropped); never
    /// more than [`DeviceState::dropped_total`] (counted from when this field appeared).
    #[serde(default)]
    pub skipped: u64,
    /// Batches processed.
    #[serde(default)]
    pub batches: u64,
    /// The device's cumulative drop counters, per class (the highest reported).
    #[serde(default)]
    pub dropped: BTreeMap<RecordClass, DropCounts>,
    /// When the last batch was processed (Unix milliseconds).
    #[serde(default)]
    pub last_batch_at_ms: u64,
    /// Length of the records file covered by this state (FileStore bookkeeping).
    #[serde(default)]
    pub records_len: u64,
    /// The device's current outbox epoch (0: not known yet).
    #[serde(default)]
    pub epoch: u64,
    /// Earlier epochs (newest last, at most 8): their batches are refused.
    #[serde(default)]
    pub retired_epochs: Vec<u64>,
    /// How many times the device's outbox started a new epoch.
    #[serde(default)]
    pub epoch_changes: u64,
    /// Drops the device reported in earlier epochs, all classes and reasons.
    #[serde(default)]
    pub dropped_earlier: u64,
    /// The records segment being appended to (FileStore bookkeeping; 0: `records.jsonl`).
    #[serde(default)]
    pub segment: u64,
    /// Closed segments deleted by retention, and the records they held.
    #[serde(default)]
    pub retention_removed_segments: u64,
}

impl DeviceState {
    /// Total drops the device reported, all classes and reasons.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().map(DropCounts::total).sum()
    }

    /// Records stored, all classes.
    pub fn received_total(&self) -> u64 {
        self.received.values().sum()
    }
}

/// Storage behind the ingest. Contract: `commit` is durable when it returns `Ok`, stores the
/// records in the order given and replaces the device's state in the same step (a crash
/// leaves the old state and records, or the new ones).
pub trait IngestStore: Send {
    /// The device's current state (default for an unknown device).
    fn state(&mut self, device: &str) -> Result<DeviceState, StoreError>;
    /// Appends `records` (ascending seqs, all above the stored last seq) and replaces the
    /// state, durably.
    fn commit(
        &mut self,
        device: &str,
        records: &[wire::Record],
        state: DeviceState,
    ) -> Result<(), StoreError>;
    /// Replaces the state in memory only (counters that need not survive a crash, e.g.
    /// duplicates seen); persisted with the next commit.
    fn note(&mut self, device: &str, state: DeviceState);
}

/// Counters of the ingest (for `/metrics` and tests).
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub batches: AtomicU64,
    pub records_stored: AtomicU64,
    pub duplicates: AtomicU64,
    pub gaps: AtomicU64,
    /// Batches refused because they skip seqs the device's drop counters do not account for.
    pub unaccounted: AtomicU64,
    pub rejected: AtomicU64,
    pub store_errors: AtomicU64,
    pub acks_published: AtomicU64,
    /// Acks not queued because the client's request queue was full (the device replays and
    /// gets the ack again).
    pub acks_dropped: AtomicU64,
    pub births: AtomicU64,
    pub deaths: AtomicU64,
    pub reconnects: AtomicU64,
    /// 1 while connected to the broker.
    pub connected: AtomicU64,
    /// Devices whose outbox started a new epoch.
    pub epoch_changes: AtomicU64,
    /// Batches of an earlier epoch, refused.
    pub stale_epoch: AtomicU64,
    /// Records the devices reported dropped (cap, TTL, I/O), summed over devices: the
    /// increase of their cumulative drop counters as batches report them.
    pub device_drops: AtomicU64,
}

/// The result of one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored (`new` records, the rest duplicates); acknowledge `through`.
    Ack { through: u64, new: usize },
    /// `prev` is beyond the last stored seq: nothing stored, no ack.
    Gap { last_seq: u64, prev: u64 },
    /// Storing the batch would leave `skipped` seqs never stored, more than the `dropped`
    /// records the device reports: records the device has were left out of the batch.
    /// Nothing stored, no ack.
    Unaccounted {
        last_seq: u64,
        skipped: u64,
        dropped: u64,
    },
    /// The batch belongs to an earlier epoch of the device's outbox: nothing stored, no ack.
    StaleEpoch { epoch: u64, current: u64 },
}

/// The protocol logic: dedupe, gap detection, drop accounting, store-then-ack.
pub struct Ingest<S: IngestStore> {
    store: S,
    counters: Arc<IngestCounters>,
    max_batch_bytes: usize,
}

impl<S: IngestStore> Ingest<S> {
    pub fn new(store: S, counters: Arc<IngestCounters>, max_batch_bytes: usize) -> Self {
        Ingest {
            store,
            counters,
            max_batch_bytes,
        }
    }

    pub fn store(&mut self) -> &mut S {
        &mut self.store
    }

    /// Decodes and handles a payload that arrived on `<prefix>/<topic_device>/records`.
    pub fn handle_payload(
        &mut self,
        topic_device: &str,
        payload: &[u8],
    ) -> Result<Outcome, IngestError> {
        let batch = match wire::decode_batch(payload, self.max_batch_bytes) {
            Ok(b) => b,
            Err(e) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(e.into());
            }
        };
        self.handle(topic_device, batch)
    }

    /// [`Ingest::handle_payload`], also moving the records it stored into `stored`.
    pub fn handle_payload_into(
        &mut self,
        topic_device: &str,
        payload: &[u8],
        stored: &mut Vec<wire::Record>,
    ) -> Result<Outcome, IngestError> {
        let batch = match wire::decode_batch(payload, self.max_batch_bytes) {
            Ok(b) => b,
            Err(e) => {
                self.counters.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(e.into());
            }
        };
        let outcome = self.handle_inner(topic_device, &batch)?;
        if let Outcome::Ack { new, .. } = outcome {
            let mut records = batch.records;
            let skip = records.len().saturating_sub(new);
            stored.extend(records.drain(skip..));
        }
        Ok(outcome)
    }

    /// Handles a decoded batch: returns the ack to publish, or the gap.
    pub fn handle(&mut self, topic_device: &str, batch: Batch) -> Result<Outcome, IngestError> {
        self.handle_inner(topic_device, &batch)
    }

    fn handle_inner(&mut self, topic_device: &str, batch: &Batch) -> Result<Outcome, IngestError> {
        if batch.device != topic_device {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(IngestError::DeviceMismatch {
                topic: topic_device.to_string(),
                batch: batch.device.clone(),
            });
        }
        let dev = topic_device;
        let mut st = self.store.state(dev)?;
        let mut drops_changed = false;
        if batch.epoch != 0 && batch.epoch != st.epoch {
            if st.retired_epochs.contains(&batch.epoch) {
                self.counters.stale_epoch.fetch_add(1, Ordering::Relaxed);
                return Ok(Outcome::StaleEpoch {
                    epoch: batch.epoch,
                    current: st.epoch,
                });
            }
            if st.epoch != 0 {
                // the device's outbox was recreated: its seqs and drop counters restart
                st.retired_epochs.push(st.epoch);
                let excess = st.retired_epochs.len().saturating_sub(RETIRED_EPOCHS);
                st.retired_epochs.drain(..excess);
                st.dropped_earlier = st.dropped_earlier.saturating_add(st.dropped_total());
                st.dropped.clear();
                st.last_seq = 0;
                st.skipped = 0;
                st.epoch_changes += 1;
                self.counters.epoch_changes.fetch_add(1, Ordering::Relaxed);
                drops_changed = true;
            }
            // else: first batch with an epoch (a new device, or one from before epochs): the
            // seqs continue
            st.epoch = batch.epoch;
        }
        for (class, reported) in &batch.dropped {
            let known = st.dropped.entry(*class).or_default();
            let merged = DropCounts {
                cap: known.cap.max(reported.cap),
                ttl: known.ttl.max(reported.ttl),
                io: known.io.max(reported.io),
            };
            if merged != *known {
                let added = merged.total().saturating_sub(known.total());
                self.counters
                    .device_drops
                    .fetch_add(added, Ordering::Relaxed);
                *known = merged;
                drops_changed = true;
            }
        }
        st.batches += 1;
        st.last_batch_at_ms = now_ms();
        if batch.prev > st.last_seq {
            st.gaps += 1;
            self.counters.gaps.fetch_add(1, Ordering::Relaxed);
            let last_seq = st.last_seq;
            self.store.note(dev, st);
            return Ok(Outcome::Gap {
                last_seq,
                prev: batch.prev,
            });
        }
        let skip = batch
            .records
            .iter()
            .take_while(|r| r.seq <= st.last_seq)
            .count();
        let new = &batch.records[skip..];
        // every seq this batch skips (between the last stored seq and its first new record,
        // or between two new records) must be a drop the device counted
        let new_last = new.last().map_or(st.last_seq, |r| r.seq);
        let skips = new_last
            .saturating_sub(st.last_seq)
            .saturating_sub(new.len() as u64);
        let skipped = st.skipped.saturating_add(skips);
        let dropped = st.dropped_total();
        if skips > 0 && skipped > dropped {
            st.unaccounted += 1;
            self.counters.unaccounted.fetch_add(1, Ordering::Relaxed);
            let last_seq = st.last_seq;
            self.store.note(dev, st);
            return Ok(Outcome::Unaccounted {
                last_seq,
                skipped,
                dropped,
            });
        }
        st.duplicates += skip as u64;
        self.counters
            .duplicates
            .fetch_add(skip as u64, Ordering::Relaxed);
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        if new.is_empty() && !drops_changed {
            let through = st.last_seq;
            self.store.note(dev, st);
            return Ok(Outcome::Ack { through, new: 0 });
        }
        for r in new {
            *st.received.entry(r.class).or_default() += 1;
        }
        st.skipped = skipped;
        if let Some(last) = new.last() {
            st.last_seq = last.seq;
        }
        let through = st.last_seq;
        if let Err(e) = self.store.commit(dev, new, st) {
            self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            return Err(e.into());
        }
        self.counters
            .records_stored
            .fetch_add(new.len() as u64, Ordering::Relaxed);
        Ok(Outcome::Ack {
            through,
            new: new.len(),
        })
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Per device `devices/<id>/records.jsonl` (append-only) and `devices/<id>/state.json`
/// (written atomically after the records are fsynced). See the module documentation.
pub struct FileStore {
    root: PathBuf,
    states: HashMap<String, DeviceState>,
    retention: Retention,
}

/// How much of each device's stored records the [`FileStore`] keeps. Records are appended
/// to a segment file; once it holds `segment_bytes` the next commit starts a new one.
/// Closed segments are deleted when older than `max_age` (by the time of their last write)
/// or, oldest first, while the device's segments together exceed `max_bytes`. The segment
/// being appended to is never deleted, so the newest records always stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub segment_bytes: u64,
    pub max_age: Option<Duration>,
    pub max_bytes: Option<u64>,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            segment_bytes: 64 * 1024 * 1024,
            max_age: None,
            max_bytes: None,
        }
    }
}

/// File name of records segment `n` (0 is `records.jsonl`, for stores from before segments).
fn segment_name(n: u64) -> String {
    if n == 0 {
        "records.jsonl".into()
    } else {
        format!("records.{n:010}.jsonl")
    }
}

/// The segment number of a file name, if it is a records segment.
fn segment_of(name: &str) -> Option<u64> {
    if name == "records.jsonl" {
        return Some(0);
    }
    let n = name.strip_prefix("records.")?.strip_suffix(".jsonl")?;
    (n.len() == 10 && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

impl FileStore {
    /// Opens (creating) the store under `root`, keeping everything.
    pub fn open(root: &Path) -> Result<FileStore, StoreError> {
        FileStore::open_with(root, Retention::default())
    }

    /// Opens (creating) the store under `root` with a retention policy.
    pub fn open_with(root: &Path, retention: Retention) -> Result<FileStore, StoreError> {
        let devices = root.join("devices");
        std::fs::create_dir_all(&devices).map_err(|source| StoreError::Io {
            path: devices.clone(),
            op: "create directory",
            source,
        })?;
        Ok(FileStore {
            root: root.to_path_buf(),
            states: HashMap::new(),
            retention,
        })
    }

    fn dir(root: &Path, device: &str) -> PathBuf {
        root.join("devices").join(device)
    }

    /// A device's segment files by number, ascending (`(n, path, len, modified)`).
    fn segments(dir: &Path) -> Vec<(u64, PathBuf, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(n) = segment_of(&name) {
                    let meta = e.metadata().ok();
                    out.push((
                        n,
                        e.path(),
                        meta.as_ref().map_or(0, |m| m.len()),
                        meta.and_then(|m| m.modified().ok())
                            .unwrap_or(std::time::UNIX_EPOCH),
                    ));
                }
            }
        }
        out.sort_by_key(|s| s.0);
        out
    }

    /// Deletes the closed segments of `device` that retention no longer keeps; returns how
    /// many were deleted. Errors are logged, not returned: retention never fails a commit.
    fn apply_retention(&self, device: &str, active: u64) -> u64 {
        let r = self.retention;
        if r.max_age.is_none() && r.max_bytes.is_none() {
            return 0;
        }
        let dir = Self::dir(&self.root, device);
        let segs = Self::segments(&dir);
        let mut total: u64 = segs.iter().map(|s| s.2).sum();
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for (n, path, len, modified) in segs {
            if n >= active {
                break;
            }
            let too_old = r
                .max_age
                .is_some_and(|a| now.duration_since(modified).is_ok_and(|age| age > a));
            let too_big = r.max_bytes.is_some_and(|m| total > m);
            if !(too_old || too_big) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    total = total.saturating_sub(len);
                    removed += 1;
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "retention: could not delete a segment");
                }
            }
        }
        if removed > 0 {
            let _ = sync_dir(&dir);
        }
        removed
    }

    /// Reads a device's persisted state (None: never stored anything).
    pub fn read_state(root: &Path, device: &str) -> Result<Option<DeviceState>, StoreError> {
        let path = Self::dir(root, device).join("state.json");
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path,
                    op: "open",
                    source,
                })
            }
        };
        let mut bytes = Vec::new();
        file.take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                op: "read",
                source,
            })?;
        if bytes.len() as u64 > MAX_STATE_BYTES {
            return Err(StoreError::Corrupt {
                path,
                problem: format!("larger than {MAX_STATE_BYTES} bytes"),
            });
        }
        let st: DeviceState = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            problem: e.to_string(),
        })?;
        if st.format != STATE_FORMAT {
            return Err(StoreError::Corrupt {
                path,
                problem: format!("field \"format\" is {}, expected {STATE_FORMAT}", st.format),
            });
        }
        Ok(Some(st))
    }

    /// Reads up to `max` stored records of a device, in stored order (tests and tools).
    pub fn read_records(
        root: &Path,
        device: &str,
        max: usize,
    ) -> Result<Vec<wire::Record>, StoreError> {
        Ok(Self::read_stored(root, device, max)?
            .into_iter()
            .map(|(_, r)| r)
            .collect())
    }

    /// [`FileStore::read_records`] with the epoch of each record (0: stored before epochs).
    pub fn read_stored(
        root: &Path,
        device: &str,
        max: usize,
    ) -> Result<Vec<(u64, wire::Record)>, StoreError> {
        #[derive(Deserialize)]
        struct Epoch {
            #[serde(default)]
            epoch: u64,
        }
        use std::io::BufRead;
        let dir = Self::dir(root, device);
        let state = Self::read_state(root, device)?;
        let (active, committed) = state.map_or((0, 0), |s| (s.segment, s.records_len));
        let mut out = Vec::new();
        for (n, path, _, _) in Self::segments(&dir) {
            if n > active || out.len() >= max {
                break; // a segment above the active one was never committed
            }
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // retention
                Err(source) => {
                    return Err(StoreError::Io {
                        path,
                        op: "open",
                        source,
                    })
                }
            };
            let limit = if n == active { committed } else { u64::MAX };
            let reader = std::io::BufReader::new(file.take(limit));
            for (i, line) in reader.split(b'\n').enumerate() {
                if out.len() >= max {
                    break;
                }
                let line = line.map_err(|source| StoreError::Io {
                    path: path.clone(),
                    op: "read",
                    source,
                })?;
                let bad = |e: serde_json::Error| StoreError::Corrupt {
                    path: path.clone(),
                    problem: format!("line {}: {e}", i + 1),
                };
                let rec: wire::Record = serde_json::from_slice(&line).map_err(bad)?;
                let epoch: Epoch = serde_json::from_slice(&line).map_err(bad)?;
                out.push((epoch.epoch, rec));
            }
        }
        Ok(out)
    }

    fn load(&mut self, device: &str) -> Result<&mut DeviceState, StoreError> {
        if !self.states.contains_key(device) {
            let st = Self::read_state(&self.root, device)?.unwrap_or(DeviceState {
                format: STATE_FORMAT,
                ..DeviceState::default()
            });
            // segments above the active one were started by a commit that never finished
            // (its state was not written): their records were never acknowledged
            let dir = Self::dir(&self.root, device);
            for (n, path, _, _) in Self::segments(&dir) {
                if n > st.segment {
                    std::fs::remove_file(&path).map_err(|source| StoreError::Io {
                        path: path.clone(),
                        op: "remove uncommitted segment",
                        source,
                    })?;
                }
            }
            // drop a tail written after the last state (never acknowledged)
            let path = dir.join(segment_name(st.segment));
            match std::fs::OpenOptions::new().write(true).open(&path) {
                Ok(f) => {
                    let len = f
                        .metadata()
                        .map_err(|source| StoreError::Io {
                            path: path.clone(),
                            op: "stat",
                            source,
                        })?
                        .len();
                    if len < st.records_len {
                        return Err(StoreError::Corrupt {
                            path,
                            problem: format!(
                                "{len} bytes but state.json says {} were committed",
                                st.records_len
                            ),
                        });
                    }
                    if len > st.records_len {
                        f.set_len(st.records_len)
                            .and_then(|()| f.sync_all())
                            .map_err(|source| StoreError::Io {
                                path: path.clone(),
                                op: "truncate uncommitted tail",
                                source,
                            })?;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if st.records_len > 0 {
                        return Err(StoreError::Corrupt {
                            path,
                            problem: "missing but state.json lists committed records".into(),
                        });
                    }
                }
                Err(source) => {
                    return Err(StoreError::Io {
                        path,
                        op: "open",
                        source,
                    })
                }
            }
            self.states.insert(device.to_string(), st);
        }
        self.states
            .get_mut(device)
            .ok_or_else(|| StoreError::Corrupt {
                path: Self::dir(&self.root, device),
                problem: "state vanished from the cache".into(),
            })
    }
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            op: "fsync directory",
            source,
        })
}

/// One line of `records.jsonl`: the record and the epoch it belongs to (0: not known).
#[derive(Serialize)]
struct StoredRecord<'a> {
    #[serde(skip_serializing_if = "is_zero")]
    epoch: u64,
    seq: u64,
    class: RecordClass,
    produced_at_ms: u64,
    body: &'a serde_json::value::RawValue,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl IngestStore for FileStore {
    fn state(&mut self, device: &str) -> Result<DeviceState, StoreError> {
        self.load(device).cloned()
    }

    fn commit(
        &mut self,
        device: &str,
        records: &[wire::Record],
        mut state: DeviceState,
    ) -> Result<(), StoreError> {
        let (mut segment, mut committed) = {
            let st = self.load(device)?;
            (st.segment, st.records_len)
        };
        // segments below the one the persisted state names are closed whatever happens next
        let closed_below = segment;
        if committed >= self.retention.segment_bytes && !records.is_empty() {
            // start the next segment; the state names it only once these records are in
            segment += 1;
            committed = 0;
        }
        let dir = Self::dir(&self.root, device);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
                path: dir.clone(),
                op: "create directory",
                source,
            })?;
            sync_dir(&self.root.join("devices"))?;
        }
        let path = dir.join(segment_name(segment));
        let mut buf = Vec::with_capacity(records.len() * 256);
        for r in records {
            let line = StoredRecord {
                epoch: state.epoch,
                seq: r.seq,
                class: r.class,
                produced_at_ms: r.produced_at_ms,
                body: &r.body,
            };
            serde_json::to_writer(&mut buf, &line).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                problem: format!("record {}: {e}", r.seq),
            })?;
            buf.push(b'\n');
        }
        let io = |op: &'static str| {
            let path = path.clone();
            move |source| StoreError::Io { path, op, source }
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io("open"))?;
        // write at the committed length (overwrites a tail of a failed earlier commit)
        f.seek(std::io::SeekFrom::Start(committed))
            .map_err(io("seek"))?;
        f.write_all(&buf).map_err(io("append"))?;
        f.sync_data().map_err(io("fsync"))?;
        state.format = STATE_FORMAT;
        state.segment = segment;
        state.records_len = committed + buf.len() as u64;
        state.retention_removed_segments += self.apply_retention(device, closed_below);
        let state_path = dir.join("state.json");
        let json = serde_json::to_vec(&state).map_err(|e| StoreError::Corrupt {
            path: state_path.clone(),
            problem: e.to_string(),
        })?;
        shared::trust::write_atomic(&state_path, &json, false).map_err(|source| {
            StoreError::Io {
                path: state_path.clone(),
                op: "write atomically",
                source,
            }
        })?;
        sync_dir(&dir)?;
        self.states.insert(device.to_string(), state);
        Ok(())
    }

    fn note(&mut self, device: &str, state: DeviceState) {
        self.states.insert(device.to_string(), state);
    }
}

/// Settings of the ingest's MQTT loop.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// `mqtt://host:port`.
    pub url: String,
    pub client_id: String,
    /// Topic prefix, default `edge/v1`.
    pub topic_prefix: String,
    /// Cap on a batch's (decompressed) JSON.
    pub max_batch_bytes: usize,
    pub keep_alive: Duration,
}

impl IngestConfig {
    pub fn new(url: &str) -> IngestConfig {
        IngestConfig {
            url: url.to_string(),
            client_id: "fleet-ingest".into(),
            topic_prefix: "edge/v1".into(),
            max_batch_bytes: wire::DEFAULT_MAX_BATCH_BYTES,
            keep_alive: Duration::from_secs(15),
        }
    }
}

/// `<prefix>/<device>/<leaf>` -> device, when valid.
fn topic_device<'t>(prefix: &str, topic: &'t str, leaf: &str) -> Option<&'t str> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let dev = rest.strip_suffix(leaf)?.strip_suffix('/')?;
    wire::valid_device_id(dev).then_some(dev)
}

fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + base.mul_f64(f64::from(nanos % 1000) / 2000.0)
}

/// What the fleet does with device messages besides storing records: the registry, the
/// rollout engine, bundle delivery and alerts implement it (the server combines them).
/// Every method runs on the ingest's control or storage worker thread (never on the MQTT
/// task), so it may do disk I/O; it must not wait on the network.
pub trait DeviceSink: Send + Sync {
    /// A retained status message (birth or death) arrived.
    fn on_status(&self, _device: &str, _status: &wire::Status) {}
    /// These records of `device` were just stored durably (new records only, in seq order).
    fn on_stored(&self, _device: &str, _records: &[wire::Record]) {}
    /// A reply to a command or directive arrived.
    fn on_reply(&self, _device: &str, _reply: &wire::CommandReply) {}
    /// A chunk request (`<prefix>/<device>/bundle/get`) arrived, unparsed.
    fn on_chunk_request(&self, _device: &str, _payload: &[u8]) {}
}

/// A sink that does nothing (the ingest alone).
pub struct NoSink;
impl DeviceSink for NoSink {}

/// The MQTT client options for `cfg` over plain `mqtt://` (the server builds TLS options
/// itself and calls [`run_with`]).
pub fn plain_options(cfg: &IngestConfig) -> Result<MqttOptions, IngestError> {
    let (host, port) =
        wire::parse_mqtt_url(&cfg.url).ok_or_else(|| IngestError::Url(cfg.url.clone()))?;
    let mut opts = MqttOptions::new(cfg.client_id.clone(), host, port);
    opts.set_keep_alive(cfg.keep_alive);
    Ok(opts)
}

/// The client and event loop for `opts` with the ingest's packet limits and queue sizes.
pub fn connect(cfg: &IngestConfig, mut opts: MqttOptions) -> (AsyncClient, rumqttc::EventLoop) {
    let max_packet = cfg.max_batch_bytes + 64 * 1024;
    opts.set_max_packet_size(max_packet, max_packet);
    opts.set_inflight(100);
    AsyncClient::new(opts, 4096)
}

/// A publisher on `client` for fleet modules: `<prefix>/<device>/<leaf>`, QoS 1.
pub fn publisher(client: &AsyncClient, prefix: &str) -> crate::link::Publisher {
    let client = client.clone();
    let prefix = prefix.to_string();
    Arc::new(move |device: &str, leaf: &str, payload: Vec<u8>| {
        client
            .try_publish(
                format!("{prefix}/{device}/{leaf}"),
                QoS::AtLeastOnce,
                false,
                payload,
            )
            .is_ok()
    })
}

/// Runs the ingest until `shutdown` (plain `mqtt://`, no other consumers of device
/// messages): see [`run_with`].
pub async fn run<S: IngestStore + 'static>(
    cfg: IngestConfig,
    store: S,
    counters: Arc<IngestCounters>,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let (client, events) = connect(&cfg, plain_options(&cfg)?);
    run_with(
        cfg,
        client,
        events,
        store,
        counters,
        Arc::new(NoSink),
        shutdown,
    )
    .await
}

enum Control {
    Status(String, Vec<u8>),
    Reply(String, Vec<u8>),
    Chunk(String, Vec<u8>),
}

/// Runs the fleet's MQTT loop until `shutdown`: one task owns the event loop; record
/// payloads go to one storage worker thread (bounded queue of 64) that stores, acknowledges
/// and then hands the new records to `sink`; status messages, replies and chunk requests go
/// to one control worker thread (bounded queue of 1024) that hands them to `sink`. Both
/// queues apply backpressure to the broker; nothing is dropped.
pub async fn run_with<S: IngestStore + 'static>(
    cfg: IngestConfig,
    client: AsyncClient,
    mut events: rumqttc::EventLoop,
    store: S,
    counters: Arc<IngestCounters>,
    sink: Arc<dyn DeviceSink>,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(64);
    let (ctl_tx, mut ctl_rx) = tokio::sync::mpsc::channel::<Control>(1024);

    let prefix = cfg.topic_prefix.clone();
    let worker_counters = counters.clone();
    let worker_client = client.clone();
    let max_batch_bytes = cfg.max_batch_bytes;
    let store_sink = sink.clone();
    let worker = tokio::task::spawn_blocking(move || {
        let mut ingest = Ingest::new(store, worker_counters.clone(), max_batch_bytes);
        let mut stored: Vec<wire::Record> = Vec::new();
        while let Some((device, payload)) = rx.blocking_recv() {
            stored.clear();
            match ingest.handle_payload_into(&device, &payload, &mut stored) {
                Ok(Outcome::Ack { through, .. }) => {
                    let epoch = ingest.store().state(&device).map_or(0, |s| s.epoch);
                    let ack = wire::to_json(&wire::Ack {
                        v: wire::VERSION,
                        through,
                        epoch,
                    });
                    let topic = format!("{prefix}/{device}/ack");
                    match worker_client.try_publish(topic, QoS::AtLeastOnce, false, ack) {
                        Ok(()) => worker_counters
                            .acks_published
                            .fetch_add(1, Ordering::Relaxed),
                        Err(_) => worker_counters.acks_dropped.fetch_add(1, Ordering::Relaxed),
                    };
                    if !stored.is_empty() {
                        store_sink.on_stored(&device, &stored);
                    }
                }
                Ok(Outcome::Gap { last_seq, prev }) => {
                    tracing::info!(%device, last_seq, prev, "batch after a gap: not stored, not acknowledged");
                }
                Ok(Outcome::Unaccounted {
                    last_seq,
                    skipped,
                    dropped,
                }) => {
                    tracing::warn!(
                        %device,
                        last_seq,
                        skipped,
                        dropped,
                        "batch skips seqs the device did not report dropped: not stored, not acknowledged"
                    );
                }
                Ok(Outcome::StaleEpoch { epoch, current }) => {
                    tracing::info!(%device, epoch, current, "batch of an earlier outbox epoch: not stored, not acknowledged");
                }
                Err(e) => tracing::warn!(%device, error = %e, "batch refused"),
            }
        }
    });
    let ctl_counters = counters.clone();
    let control = tokio::task::spawn_blocking(move || {
        while let Some(msg) = ctl_rx.blocking_recv() {
            match msg {
                Control::Status(device, payload) => match wire::parse_status(&payload) {
                    Ok(status) => {
                        let id = match &status {
                            wire::Status::Online(b) => {
                                ctl_counters.births.fetch_add(1, Ordering::Relaxed);
                                &b.device
                            }
                            wire::Status::Offline(d) => {
                                ctl_counters.deaths.fetch_add(1, Ordering::Relaxed);
                                &d.device
                            }
                        };
                        if *id == device {
                            sink.on_status(&device, &status);
                        } else {
                            ctl_counters.rejected.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(%device, claimed = %id, "status names another device: ignored");
                        }
                    }
                    Err(e) => {
                        ctl_counters.rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%device, error = %e, "bad status");
                    }
                },
                Control::Reply(device, payload) => match wire::parse_reply(&payload) {
                    Ok(reply) => sink.on_reply(&device, &reply),
                    Err(e) => {
                        ctl_counters.rejected.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%device, error = %e, "bad reply");
                    }
                },
                Control::Chunk(device, payload) => sink.on_chunk_request(&device, &payload),
            }
        }
    });

    let p = &cfg.topic_prefix;
    let filters = [
        format!("{p}/+/records"),
        format!("{p}/+/status"),
        format!("{p}/+/replies"),
        format!("{p}/+/{}", shared::delivery::GET_LEAF),
    ];
    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                counters.connected.store(1, Ordering::Relaxed);
                for f in &filters {
                    if client.try_subscribe(f.clone(), QoS::AtLeastOnce).is_err() {
                        tracing::warn!(filter = %f, "subscribe request dropped (queue full)");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // bounded queues: wait for the workers (backpressure to the broker), never drop
                let sent = if let Some(dev) = topic_device(&cfg.topic_prefix, &p.topic, "records") {
                    tx.send((dev.to_string(), p.payload.to_vec())).await.is_ok()
                } else if let Some(dev) = topic_device(&cfg.topic_prefix, &p.topic, "status") {
                    if p.payload.is_empty() {
                        true // a cleared retained status
                    } else {
                        ctl_tx
                            .send(Control::Status(dev.to_string(), p.payload.to_vec()))
                            .await
                            .is_ok()
                    }
                } else if let Some(dev) = topic_device(&cfg.topic_prefix, &p.topic, "replies") {
                    ctl_tx
                        .send(Control::Reply(dev.to_string(), p.payload.to_vec()))
                        .await
                        .is_ok()
                } else if let Some(dev) =
                    topic_device(&cfg.topic_prefix, &p.topic, shared::delivery::GET_LEAF)
                {
                    ctl_tx
                        .send(Control::Chunk(dev.to_string(), p.payload.to_vec()))
                        .await
                        .is_ok()
                } else {
                    counters.rejected.fetch_add(1, Ordering::Relaxed);
                    true
                };
                if !sent {
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                counters.connected.store(0, Ordering::Relaxed);
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?backoff, "ingest: mqtt connection error");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
    counters.connected.store(0, Ordering::Relaxed);
    drop(tx);
    drop(ctl_tx);
    let _ = worker.await;
    let _ = control.await;
    let _ = client.try_disconnect();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn batch(prev: u64, seqs: &[u64], cap_drops: u64) -> Batch {
        Batch {
            v: 1,
            device: "d1".into(),
            first: seqs[0],
            last: *seqs.last().unwrap(),
            prev,
            records: seqs
                .iter()
                .map(|&s| wire::Record {
                    seq: s,
                    class: if s % 2 == 0 {
                        RecordClass::Telemetry
                    } else {
                        RecordClass::Event
                    },
                    produced_at_ms: s,
                    body: RawValue::from_string(format!("{{\"n\":{s}}}")).unwrap(),
                })
                .collect(),
            dropped: BTreeMap::from([(
                RecordClass::Telemetry,
                DropCounts {
                    cap: cap_drops,
                    ttl: 0,
                    io: 0,
                },
            )]),
            sent_at_ms: 0,
            epoch: 0,
        }
    }

    fn in_epoch(epoch: u64, mut b: Batch) -> Batch {
        b.epoch = epoch;
        b
    }

    fn seqs(root: &Path) -> Vec<u64> {
        FileStore::read_records(root, "d1", usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    #[test]
    fn segments_rotate_retention_deletes_old_ones_and_a_crash_mid_rotation_is_undone() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let counters = Arc::new(IngestCounters::default());
        let keep_all = Retention {
            segment_bytes: 300,
            max_age: None,
            max_bytes: None,
        };
        let mut ing = Ingest::new(
            FileStore::open_with(root, keep_all).unwrap(),
            counters.clone(),
            1 << 20,
        );
        for i in 0..10u64 {
            let seqs: Vec<u64> = (i * 5 + 1..=i * 5 + 5).collect();
            ing.handle("d1", batch(i * 5, &seqs, 0)).unwrap();
        }
        assert_eq!(seqs(root), (1..=50).collect::<Vec<_>>());
        let dir = root.join("devices/d1");
        let segs = FileStore::segments(&dir);
        assert!(segs.len() >= 3, "{segs:?}");
        let st = FileStore::read_state(root, "d1").unwrap().unwrap();
        assert_eq!(st.segment, segs.last().unwrap().0);
        drop(ing);

        // a crash after the next segment was written but before the state named it
        let orphan = dir.join(segment_name(st.segment + 1));
        std::fs::write(
            &orphan,
            "{\"seq\":51,\"class\":\"event\",\"produced_at_ms\":1,\"body\":{}}\n",
        )
        .unwrap();
        assert_eq!(
            seqs(root),
            (1..=50).collect::<Vec<_>>(),
            "unnamed segment not read"
        );
        // retention by size: reopen with a cap of about two segments
        let capped = Retention {
            segment_bytes: 300,
            max_age: None,
            max_bytes: Some(700),
        };
        let mut ing = Ingest::new(
            FileStore::open_with(root, capped).unwrap(),
            counters.clone(),
            1 << 20,
        );
        assert_eq!(
            ing.handle("d1", batch(50, &[51, 52], 0)).unwrap(),
            Outcome::Ack {
                through: 52,
                new: 2
            }
        );
        assert!(
            !orphan.exists()
                || FileStore::read_state(root, "d1").unwrap().unwrap().segment > st.segment
        );
        let kept = seqs(root);
        assert_eq!(*kept.last().unwrap(), 52, "the newest records stay");
        assert!(kept.len() < 52, "old segments were deleted: {}", kept.len());
        assert!(
            kept.windows(2).all(|w| w[1] == w[0] + 1),
            "what is kept is contiguous"
        );
        let total: u64 = FileStore::segments(&dir).iter().map(|s| s.2).sum();
        assert!(total <= 700 + 300, "{total}");
        let st = FileStore::read_state(root, "d1").unwrap().unwrap();
        assert!(st.retention_removed_segments > 0);
        assert_eq!(st.last_seq, 52);
        // retention by age: everything closed is older than 0 s
        drop(ing);
        let aged = Retention {
            segment_bytes: 300,
            max_age: Some(Duration::ZERO),
            max_bytes: None,
        };
        std::thread::sleep(Duration::from_millis(20));
        let mut ing = Ingest::new(FileStore::open_with(root, aged).unwrap(), counters, 1 << 20);
        ing.handle("d1", batch(52, &[53], 0)).unwrap();
        let st = FileStore::read_state(root, "d1").unwrap().unwrap();
        let segs = FileStore::segments(&dir);
        assert_eq!(segs.len(), 1, "{segs:?}");
        assert_eq!(segs[0].0, st.segment);
        assert_eq!(*seqs(root).last().unwrap(), 53);
    }

    #[test]
    fn a_new_outbox_epoch_restarts_the_seqs_and_late_batches_of_the_old_one_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let counters = Arc::new(IngestCounters::default());
        let mut ing = Ingest::new(FileStore::open(root).unwrap(), counters.clone(), 1 << 20);
        // a device from before epochs, then its first batch with an epoch: seqs continue
        assert_eq!(
            ing.handle("d1", batch(0, &[1, 2], 0)).unwrap(),
            Outcome::Ack { through: 2, new: 2 }
        );
        assert_eq!(
            ing.handle("d1", in_epoch(11, batch(2, &[3, 4, 5], 0)))
                .unwrap(),
            Outcome::Ack { through: 5, new: 3 }
        );
        // epoch 22 (the outbox was recreated): seq 1 again, not a duplicate; the drops of
        // epoch 11 are kept apart
        assert_eq!(
            ing.handle("d1", in_epoch(11, batch(5, &[7], 1))).unwrap(),
            Outcome::Ack { through: 7, new: 1 }
        );
        assert_eq!(
            ing.handle("d1", in_epoch(22, batch(0, &[1, 2], 0)))
                .unwrap(),
            Outcome::Ack { through: 2, new: 2 }
        );
        // a late redelivery from epoch 11: refused, nothing stored
        assert_eq!(
            ing.handle("d1", in_epoch(11, batch(7, &[8], 1))).unwrap(),
            Outcome::StaleEpoch {
                epoch: 11,
                current: 22
            }
        );
        // epoch 22 goes on; a skip there needs epoch 22's own drops
        assert_eq!(
            ing.handle("d1", in_epoch(22, batch(2, &[4], 0))).unwrap(),
            Outcome::Unaccounted {
                last_seq: 2,
                skipped: 1,
                dropped: 0
            }
        );
        assert_eq!(
            ing.handle("d1", in_epoch(22, batch(2, &[3], 0))).unwrap(),
            Outcome::Ack { through: 3, new: 1 }
        );
        drop(ing);
        let st = FileStore::read_state(root, "d1").unwrap().unwrap();
        assert_eq!(
            (st.epoch, st.retired_epochs.clone(), st.epoch_changes),
            (22, vec![11], 1)
        );
        assert_eq!(
            (st.last_seq, st.dropped_earlier, st.dropped_total()),
            (3, 1, 0)
        );
        assert_eq!(st.received_total(), 9);
        let stored: Vec<(u64, u64)> = FileStore::read_stored(root, "d1", usize::MAX)
            .unwrap()
            .iter()
            .map(|(e, r)| (*e, r.seq))
            .collect();
        assert_eq!(
            stored,
            vec![
                (0, 1),
                (0, 2),
                (11, 3),
                (11, 4),
                (11, 5),
                (11, 7),
                (22, 1),
                (22, 2),
                (22, 3)
            ]
        );
        assert_eq!(counters.epoch_changes.load(Ordering::Relaxed), 1);
        assert_eq!(counters.stale_epoch.load(Ordering::Relaxed), 1);
        // after a restart the epochs are remembered
        let mut ing = Ingest::new(FileStore::open(root).unwrap(), counters.clone(), 1 << 20);
        assert!(matches!(
            ing.handle("d1", in_epoch(11, batch(0, &[1], 0))).unwrap(),
            Outcome::StaleEpoch { .. }
        ));
        assert_eq!(
            ing.handle("d1", in_epoch(22, batch(3, &[4], 0))).unwrap(),
            Outcome::Ack { through: 4, new: 1 }
        );
    }

    #[test]
    fn dedupe_gap_and_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let counters = Arc::new(IngestCounters::default());
        let mut ing = Ingest::new(FileStore::open(root).unwrap(), counters.clone(), 1 << 20);
        assert_eq!(
            ing.handle("d1", batch(0, &[1, 2, 3], 0)).unwrap(),
            Outcome::Ack { through: 3, new: 3 }
        );
        // a gap: prev 5 but only 3 stored
        assert_eq!(
            ing.handle("d1", batch(5, &[6, 7], 0)).unwrap(),
            Outcome::Gap {
                last_seq: 3,
                prev: 5
            }
        );
        // overlapping replay: 2, 3 are duplicates, 4 is new; seq gap 4 -> 6 with drops is fine
        assert_eq!(
            ing.handle("d1", batch(1, &[2, 3, 4], 0)).unwrap(),
            Outcome::Ack { through: 4, new: 1 }
        );
        assert_eq!(
            ing.handle("d1", batch(4, &[6, 7], 1)).unwrap(),
            Outcome::Ack { through: 7, new: 2 }
        );
        // all duplicates: acked through the last stored
        assert_eq!(
            ing.handle("d1", batch(0, &[1, 2], 1)).unwrap(),
            Outcome::Ack { through: 7, new: 0 }
        );
        assert_eq!(seqs(root), vec![1, 2, 3, 4, 6, 7]);
        assert_eq!(counters.duplicates.load(Ordering::Relaxed), 4);
        assert_eq!(counters.gaps.load(Ordering::Relaxed), 1);
        // the device reported one drop (seq 5), counted once however often it repeats it
        assert_eq!(counters.device_drops.load(Ordering::Relaxed), 1);
        let err = ing.handle("d2", batch(0, &[1], 0)).unwrap_err();
        assert!(err.to_string().contains("\"d1\""), "{err}");
        drop(ing);

        // restart: the state survives; a crash left an uncommitted tail, which is dropped
        let path = root.join("devices/d1/records.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"seq\":8,\"class\":\"event\",\"produced_at_ms\":8,\"body\":{}}\n{\"se")
            .unwrap();
        drop(f);
        let st = FileStore::read_state(root, "d1").unwrap().unwrap();
        assert_eq!(st.last_seq, 7);
        assert_eq!(st.dropped[&RecordClass::Telemetry].cap, 1);
        assert_eq!(st.received_total(), 6);
        let mut ing = Ingest::new(FileStore::open(root).unwrap(), counters.clone(), 1 << 20);
        assert_eq!(
            ing.handle("d1", batch(7, &[8, 9], 1)).unwrap(),
            Outcome::Ack { through: 9, new: 2 }
        );
        assert_eq!(seqs(root), vec![1, 2, 3, 4, 6, 7, 8, 9]);
        let st = FileStore::read_state(root, "d1").unwrap().unwrap();
        assert_eq!(
            st.records_len,
            std::fs::metadata(&path).unwrap().len(),
            "the torn tail was truncated before appending"
        );
    }

    /// The batches an agent produced when its outbox read raced an append (seen under load
    /// in `sync_broker_restarted_mid_stream`): after 1..=100, the read after 100 returned
    /// only the 10 events of the append 101..=200 (its 90 telemetry records were not visible
    /// to the telemetry iterator yet). Acknowledging that batch deleted 90 undelivered
    /// records on the device; the ingest must refuse it, and accept the full replay.
    #[test]
    fn a_batch_skipping_records_the_device_did_not_drop_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let counters = Arc::new(IngestCounters::default());
        let mut ing = Ingest::new(FileStore::open(root).unwrap(), counters.clone(), 1 << 20);
        let upto = |a: u64, b: u64| (a..=b).collect::<Vec<u64>>();
        assert_eq!(
            ing.handle("d1", batch(0, &upto(1, 100), 0)).unwrap(),
            Outcome::Ack {
                through: 100,
                new: 100
            }
        );
        let events_only: Vec<u64> = (110..=200).step_by(10).collect();
        assert_eq!(
            ing.handle("d1", batch(100, &events_only, 0)).unwrap(),
            Outcome::Unaccounted {
                last_seq: 100,
                skipped: 90,
                dropped: 0
            }
        );
        // the same batch arriving after a partial replay (prev below the last stored seq)
        assert_eq!(
            ing.handle("d1", batch(100, &upto(101, 105), 0)).unwrap(),
            Outcome::Ack {
                through: 105,
                new: 5
            }
        );
        assert_eq!(
            ing.handle("d1", batch(100, &events_only, 0)).unwrap(),
            Outcome::Unaccounted {
                last_seq: 105,
                skipped: 85,
                dropped: 0
            }
        );
        assert_eq!(
            seqs(root),
            upto(1, 105),
            "nothing of the refused batches stored"
        );
        assert_eq!(counters.unaccounted.load(Ordering::Relaxed), 2);
        // the device replays from its last ack: everything arrives, once
        assert_eq!(
            ing.handle("d1", batch(100, &upto(101, 200), 0)).unwrap(),
            Outcome::Ack {
                through: 200,
                new: 95
            }
        );
        assert_eq!(seqs(root), upto(1, 200));

        // skips covered by reported drops are fine; the accounting is cumulative
        let after_drops = [205, 206, 207, 208, 209, 210];
        assert_eq!(
            ing.handle("d1", batch(200, &after_drops, 3)).unwrap(),
            Outcome::Unaccounted {
                last_seq: 200,
                skipped: 4,
                dropped: 3
            },
            "201..=204 skipped but only 3 drops reported"
        );
        assert_eq!(
            ing.handle("d1", batch(200, &after_drops, 4)).unwrap(),
            Outcome::Ack {
                through: 210,
                new: 6
            }
        );
        // a skip inside a batch counts too: 212 is missing, the 4 drops are used up
        assert_eq!(
            ing.handle("d1", batch(210, &[211, 213], 4)).unwrap(),
            Outcome::Unaccounted {
                last_seq: 210,
                skipped: 5,
                dropped: 4
            }
        );
        assert_eq!(
            ing.handle("d1", batch(210, &[211, 213], 5)).unwrap(),
            Outcome::Ack {
                through: 213,
                new: 2
            }
        );
        // a batch that skips nothing is accepted whatever the counters say
        assert_eq!(
            ing.handle("d1", batch(213, &[214], 0)).unwrap(),
            Outcome::Ack {
                through: 214,
                new: 1
            }
        );
        drop(ing);
        let st = FileStore::read_state(root, "d1").unwrap().unwrap();
        assert_eq!((st.last_seq, st.skipped, st.dropped_total()), (214, 5, 5));
        assert_eq!(st.received_total() + st.skipped, st.last_seq);
        assert_eq!(st.unaccounted, 4);
    }

    #[test]
    fn bad_payloads_are_refused_not_acked() {
        let tmp = tempfile::tempdir().unwrap();
        let counters = Arc::new(IngestCounters::default());
        let mut ing = Ingest::new(FileStore::open(tmp.path()).unwrap(), counters.clone(), 4096);
        let err = ing.handle_payload("d1", b"{\"v\":1}").unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
        let json = serde_json::to_vec(&batch(0, &(1..=200).collect::<Vec<_>>(), 0)).unwrap();
        let err = ing.handle_payload("d1", &json).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        assert_eq!(counters.rejected.load(Ordering::Relaxed), 2);
        assert!(FileStore::read_state(tmp.path(), "d1").unwrap().is_none());
    }

    #[test]
    fn topics() {
        assert_eq!(
            topic_device("edge/v1", "edge/v1/d-1/records", "records"),
            Some("d-1")
        );
        assert_eq!(
            topic_device("edge/v1", "edge/v1/d-1/status", "records"),
            None
        );
        assert_eq!(
            topic_device("edge/v1", "edge/v1/../records", "records"),
            None
        );
        assert_eq!(
            topic_device("edge/v1", "edge/v1/a/b/records", "records"),
            None
        );
        assert_eq!(
            wire::parse_mqtt_url("mqtt://127.0.0.1:1883"),
            Some(("127.0.0.1".into(), 1883))
        );
        assert_eq!(wire::parse_mqtt_url("mqtts://h:1"), None);
    }
}
