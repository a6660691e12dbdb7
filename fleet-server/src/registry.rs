//! The device registry: every device the fleet has heard from, built from the retained
//! status messages (birth/death) and kept fresh by the records a device sends; the rollout
//! engine targets devices through it ([`TagSelector`]) and learns when one comes back
//! online ([`Registry::on_status`]).
//!
//! Guarantees:
//! - Devices live in memory (a `BTreeMap` by id, so listings are in id order) and are bounded
//!   by `max_devices`: a status from a new device beyond it is refused and counted
//!   ([`RegistryCounts::refused`]), never stored.
//! - What a device IS (tags, agent version, models, why it went offline) and its activity
//!   (`last_seen_ms`, the last health sample) are persisted to the sled tree `devices` (one
//!   JSON [`Device`] per id) by a writer thread, in one atomic batch per round: status
//!   changes within [`STATUS_WRITE_MS`], activity every [`SEEN_FLUSH_MS`], everything on
//!   [`Registry::flush`] and when the registry is dropped. So no call waits for the disk
//!   (10,000 births cost 10,000 memory updates and a few batch writes, not 10,000 fsyncs), and
//!   a `kill -9` loses at most the last [`STATUS_WRITE_MS`] of status changes (which the
//!   device's next birth restores) and the last minute of activity.
//! - Online/offline is live knowledge, not history: after [`Registry::open`] every device
//!   is offline until its status (the broker re-delivers retained status messages on
//!   subscribe) says otherwise, so a device that comes back after a fleet restart is reported
//!   as coming online and gets its outstanding directives again.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::wire::{ModelVersion, RecordClass, Status};

use crate::store::{Batch, Db, StoreError};

/// Sled tree of the registry.
pub const TREE: &str = "devices";
/// Default bound on the number of devices.
pub const DEFAULT_MAX_DEVICES: usize = 100_000;
/// Activity (last seen, health) is written at most this often (milliseconds).
pub const SEEN_FLUSH_MS: u64 = 60_000;
/// Status changes are written within this time (milliseconds), batched.
pub const STATUS_WRITE_MS: u64 = 200;
/// Most tags a device may carry (more are dropped, in key order).
pub const MAX_TAGS: usize = 32;

/// What went wrong with the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("device registry: {0}")]
    Store(#[from] StoreError),
    #[error(
        "device registry: the state database holds {found} devices, more than the limit of {limit}"
    )]
    TooMany { found: usize, limit: usize },
    #[error("device registry: record {key:?} in tree devices holds device {id:?}")]
    Mismatch { key: String, id: String },
    #[error("device registry: cannot start the writer thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// A device as the registry knows it. Also the on-disk format of the `devices` tree (hence
/// the serde derives); the admin API renders its own view of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Empty until a birth names it.
    #[serde(default)]
    pub agent_version: String,
    #[serde(default)]
    pub models: Vec<ModelVersion>,
    /// Live state (not restored by [`Registry::open`]).
    #[serde(default)]
    pub online: bool,
    /// Last message of any kind from the device (Unix ms).
    #[serde(default)]
    pub last_seen_ms: u64,
    /// When the current online period began (None while offline).
    #[serde(default)]
    pub online_since_ms: Option<u64>,
    /// The `sample` of the last `health_sample` record (a `HealthSample`; the whole body
    /// when it has no `sample`).
    #[serde(default)]
    pub health: Option<Value>,
    /// When the registry first heard of the device (Unix ms).
    #[serde(default)]
    pub first_seen_ms: u64,
    /// Why the device last went offline (`connection-lost`, `shutdown`).
    #[serde(default)]
    pub offline_reason: Option<String>,
}

impl Device {
    fn new(id: &str, now_ms: u64) -> Device {
        Device {
            id: id.to_string(),
            tags: BTreeMap::new(),
            agent_version: String::new(),
            models: Vec::new(),
            online: false,
            last_seen_ms: now_ms,
            online_since_ms: None,
            health: None,
            first_seen_ms: now_ms,
            offline_reason: None,
        }
    }
}

/// Registry numbers for the fleet's `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryCounts {
    pub online: u64,
    pub offline: u64,
    /// Devices running each (model, version), any role.
    pub versions: BTreeMap<(String, String), u64>,
    /// Statuses of new devices refused because the registry was full.
    pub refused: u64,
    /// Statuses whose payload named another device than the topic (ignored).
    pub mismatched: u64,
    /// Writes to the state database that failed (the device stays in memory).
    pub store_errors: u64,
}

/// Why a selector does not parse; names the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector part {part:?}: {problem}")]
pub struct SelectorError {
    pub part: String,
    pub problem: String,
}

/// A device selector: `site=plant-a,line=3` (every key must match; a key given several times
/// matches any of its values: `line=3,line=4`), `device=ID` matches the device id, and `*`
/// or the empty string matches every device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TagSelector {
    terms: BTreeMap<String, Vec<String>>,
}

fn tag_text_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl TagSelector {
    /// Parses selector text (see the type's documentation).
    pub fn parse(text: &str) -> Result<TagSelector, SelectorError> {
        let text = text.trim();
        let mut terms: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if text.is_empty() || text == "*" {
            return Ok(TagSelector { terms });
        }
        for part in text.split(',') {
            let err = |problem: &str| SelectorError {
                part: part.to_string(),
                problem: problem.to_string(),
            };
            let p = part.trim();
            if p.is_empty() {
                return Err(err("empty part (two commas, or a trailing comma)"));
            }
            let Some((k, v)) = p.split_once('=') else {
                return Err(err("expected KEY=VALUE (e.g. site=plant-a)"));
            };
            let (k, v) = (k.trim(), v.trim());
            if !tag_text_ok(k) {
                return Err(err("the key must be 1-64 of A-Z a-z 0-9 . _ -"));
            }
            let value_ok = if k == "device" {
                shared::wire::valid_device_id(v)
            } else {
                tag_text_ok(v)
            };
            if !value_ok {
                return Err(err("the value must be 1-64 of A-Z a-z 0-9 . _ -"));
            }
            let values = terms.entry(k.to_string()).or_default();
            if !values.iter().any(|x| x == v) {
                values.push(v.to_string());
            }
        }
        Ok(TagSelector { terms })
    }

    /// Whether a device with these tags and this id matches.
    pub fn matches(&self, tags: &BTreeMap<String, String>, id: &str) -> bool {
        self.terms.iter().all(|(k, values)| {
            let have = if k == "device" {
                Some(id)
            } else {
                tags.get(k).map(String::as_str)
            };
            have.is_some_and(|h| values.iter().any(|v| v == h))
        })
    }

    /// Whether it matches every device.
    pub fn is_all(&self) -> bool {
        self.terms.is_empty()
    }
}

impl std::fmt::Display for TagSelector {
    /// The canonical text (keys sorted, `*` for all).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.terms.is_empty() {
            return f.write_str("*");
        }
        let mut first = true;
        for (k, values) in &self.terms {
            for v in values {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                write!(f, "{k}={v}")?;
            }
        }
        Ok(())
    }
}

struct Inner {
    devices: BTreeMap<String, Device>,
    /// Devices whose status changed since they were last written.
    status_dirty: HashSet<String>,
    /// Devices whose activity changed since they were last written.
    activity_dirty: HashSet<String>,
}

/// When the background writer persists changes.
#[derive(Debug, Clone, Copy)]
pub struct WriteIntervals {
    /// Status changes (new device, tags, agent version, models, offline reason).
    pub status: Duration,
    /// Activity (last seen, health).
    pub activity: Duration,
}

impl Default for WriteIntervals {
    fn default() -> WriteIntervals {
        WriteIntervals {
            status: Duration::from_millis(STATUS_WRITE_MS),
            activity: Duration::from_millis(SEEN_FLUSH_MS),
        }
    }
}

struct Shared {
    db: Db,
    inner: RwLock<Inner>,
    /// Serializes writes to the tree so an older copy never overwrites a newer one.
    persist: Mutex<()>,
    max_devices: usize,
    refused: AtomicU64,
    mismatched: AtomicU64,
    store_errors: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// The registry (see the module documentation). Shared as `Arc<Registry>`; every method
/// takes `&self`. Dropping it writes what is pending and stops its writer thread.
pub struct Registry {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Shared {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the dirty devices (status changes; activity too when `activity`) in one batch.
    fn write_dirty(&self, activity: bool) -> Result<usize, RegistryError> {
        let _p = self.persist.lock().unwrap_or_else(|p| p.into_inner());
        let copies: Vec<Device> = {
            let mut inner = self.write();
            let mut ids: Vec<String> = inner.status_dirty.drain().collect();
            if activity {
                ids.extend(inner.activity_dirty.drain());
            } else {
                for id in &ids {
                    inner.activity_dirty.remove(id);
                }
            }
            ids.sort_unstable();
            ids.dedup();
            ids.iter()
                .filter_map(|id| inner.devices.get(id).cloned())
                .collect()
        };
        if copies.is_empty() {
            return Ok(0);
        }
        let mut b = Batch::default();
        for d in &copies {
            b.put(&d.id, d);
        }
        if let Err(e) = self.db.batch(TREE, b) {
            self.store_errors.fetch_add(1, Ordering::Relaxed);
            let mut inner = self.write();
            inner.status_dirty.extend(copies.into_iter().map(|d| d.id));
            return Err(e.into());
        }
        Ok(copies.len())
    }

    fn writer_loop(&self, intervals: WriteIntervals) {
        let mut last_activity = Instant::now();
        loop {
            let stopped = {
                let g = self.stop.lock().unwrap_or_else(|p| p.into_inner());
                let (g, _) = self
                    .wake
                    .wait_timeout_while(g, intervals.status, |stop| !*stop)
                    .unwrap_or_else(|p| p.into_inner());
                *g
            };
            if stopped {
                return;
            }
            let activity = last_activity.elapsed() >= intervals.activity;
            if activity {
                last_activity = Instant::now();
            }
            if let Err(e) = self.write_dirty(activity) {
                tracing::warn!(error = %e, "registry: devices not persisted (retried)");
            }
        }
    }
}

impl Registry {
    /// Loads the devices of the `devices` tree (all offline), bounded by
    /// [`DEFAULT_MAX_DEVICES`], and starts the writer thread.
    pub fn open(db: Db) -> Result<Registry, RegistryError> {
        Registry::open_with(db, DEFAULT_MAX_DEVICES, WriteIntervals::default())
    }

    /// [`Registry::open`] with another device bound and write intervals.
    pub fn open_with(
        db: Db,
        max_devices: usize,
        intervals: WriteIntervals,
    ) -> Result<Registry, RegistryError> {
        let stored: Vec<(String, Device)> = db.list(TREE, "", None, max_devices + 1)?;
        if stored.len() > max_devices {
            return Err(RegistryError::TooMany {
                found: db.count(TREE)?,
                limit: max_devices,
            });
        }
        let mut devices = BTreeMap::new();
        for (key, mut d) in stored {
            if d.id != key {
                return Err(RegistryError::Mismatch { key, id: d.id });
            }
            d.online = false;
            d.online_since_ms = None;
            devices.insert(key, d);
        }
        let shared = Arc::new(Shared {
            db,
            inner: RwLock::new(Inner {
                devices,
                status_dirty: HashSet::new(),
                activity_dirty: HashSet::new(),
            }),
            persist: Mutex::new(()),
            max_devices,
            refused: AtomicU64::new(0),
            mismatched: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let writer = std::thread::Builder::new()
            .name("registry-writer".into())
            .spawn(move || s.writer_loop(intervals))
            .map_err(RegistryError::Thread)?;
        Ok(Registry {
            shared,
            writer: Some(writer),
        })
    }

    /// A status message of `device` (the topic's device id). Returns true when the device
    /// came online (it was offline or unknown): the rollout engine re-sends its outstanding
    /// directives then. A status naming another device, or a new device beyond the bound,
    /// is ignored (counted) and returns false. Never waits for the disk.
    pub fn on_status(&self, device: &str, status: &Status, now_ms: u64) -> bool {
        let s = &self.shared;
        let named = match status {
            Status::Online(b) => &b.device,
            Status::Offline(d) => &d.device,
        };
        if named != device || !shared::wire::valid_device_id(device) {
            s.mismatched.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%device, named = %named, "status ignored: names another device or an invalid id");
            return false;
        }
        let mut inner = s.write();
        let known = inner.devices.contains_key(device);
        if !known && inner.devices.len() >= s.max_devices {
            drop(inner);
            s.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%device, limit = s.max_devices, "registry full: status of a new device ignored");
            return false;
        }
        let d = inner
            .devices
            .entry(device.to_string())
            .or_insert_with(|| Device::new(device, now_ms));
        let was_online = d.online;
        let mut changed = !known;
        match status {
            Status::Online(b) => {
                let tags: BTreeMap<String, String> = b
                    .tags
                    .iter()
                    .take(MAX_TAGS)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                changed |= d.tags != tags
                    || d.agent_version != b.agent_version
                    || d.models != b.models
                    || d.offline_reason.is_some();
                d.tags = tags;
                d.agent_version.clone_from(&b.agent_version);
                d.models.clone_from(&b.models);
                d.online = true;
                d.offline_reason = None;
                if !was_online {
                    d.online_since_ms = Some(now_ms);
                }
                d.last_seen_ms = d.last_seen_ms.max(now_ms);
            }
            Status::Offline(death) => {
                changed |= d.offline_reason.as_deref() != Some(death.reason.as_str());
                d.online = false;
                d.online_since_ms = None;
                d.offline_reason = Some(death.reason.clone());
            }
        }
        let came_online = !was_online && d.online;
        if changed {
            inner.status_dirty.insert(device.to_string());
        } else {
            inner.activity_dirty.insert(device.to_string());
        }
        came_online
    }

    /// A record of `device` was stored: it was seen; a `health_sample` body's `sample`
    /// becomes its health. Unknown devices are ignored (a device enters the registry by its
    /// status).
    pub fn on_record(&self, device: &str, class: RecordClass, body: &Value, now_ms: u64) {
        let is_health = class == RecordClass::Health
            && body.get("kind").and_then(Value::as_str) == Some("health_sample");
        let mut inner = self.shared.write();
        let Some(d) = inner.devices.get_mut(device) else {
            return;
        };
        d.last_seen_ms = d.last_seen_ms.max(now_ms);
        if is_health {
            d.health = Some(body.get("sample").unwrap_or(body).clone());
        }
        inner.activity_dirty.insert(device.to_string());
    }

    /// Records of `device` were stored (the ingest's `DeviceSink::on_stored`): it was seen
    /// once; only `health` record bodies are parsed (the last `health_sample` wins).
    pub fn on_stored(&self, device: &str, records: &[shared::wire::Record], now_ms: u64) {
        let health = records
            .iter()
            .rev()
            .filter(|r| r.class == RecordClass::Health)
            .find_map(|r| {
                serde_json::from_str::<Value>(r.body.get())
                    .ok()
                    .filter(|b| b.get("kind").and_then(Value::as_str) == Some("health_sample"))
            });
        match health {
            Some(body) => self.on_record(device, RecordClass::Health, &body, now_ms),
            None => self.seen(device, now_ms),
        }
    }

    /// Any other message of `device` (a reply, a chunk request): it was seen.
    pub fn seen(&self, device: &str, now_ms: u64) {
        let mut inner = self.shared.write();
        let Some(d) = inner.devices.get_mut(device) else {
            return;
        };
        d.last_seen_ms = d.last_seen_ms.max(now_ms);
        inner.activity_dirty.insert(device.to_string());
    }

    /// Writes every device that changed since it was last written (status and activity),
    /// in one atomic batch; returns how many (shutdown; also done on drop).
    pub fn flush(&self) -> Result<usize, RegistryError> {
        self.shared.write_dirty(true)
    }

    /// Up to `limit` devices matching `selector` (and `online` when given), in id order.
    pub fn list(&self, selector: &TagSelector, online: Option<bool>, limit: usize) -> Vec<Device> {
        self.shared
            .read()
            .devices
            .values()
            .filter(|d| online.is_none_or(|o| d.online == o))
            .filter(|d| selector.matches(&d.tags, &d.id))
            .take(limit)
            .cloned()
            .collect()
    }

    /// The ids of every device matching `selector`, in id order.
    pub fn ids(&self, selector: &TagSelector) -> Vec<String> {
        self.shared
            .read()
            .devices
            .values()
            .filter(|d| selector.matches(&d.tags, &d.id))
            .map(|d| d.id.clone())
            .collect()
    }

    /// One device.
    pub fn get(&self, id: &str) -> Option<Device> {
        self.shared.read().devices.get(id).cloned()
    }

    /// Whether the device is online now.
    pub fn is_online(&self, id: &str) -> bool {
        self.shared.read().devices.get(id).is_some_and(|d| d.online)
    }

    /// Numbers for `/metrics`.
    pub fn counts(&self) -> RegistryCounts {
        let s = &self.shared;
        let inner = s.read();
        let mut c = RegistryCounts {
            refused: s.refused.load(Ordering::Relaxed),
            mismatched: s.mismatched.load(Ordering::Relaxed),
            store_errors: s.store_errors.load(Ordering::Relaxed),
            ..RegistryCounts::default()
        };
        for d in inner.devices.values() {
            if d.online {
                c.online += 1;
            } else {
                c.offline += 1;
            }
            for m in &d.models {
                *c.versions
                    .entry((m.name.clone(), m.version.clone()))
                    .or_insert(0) += 1;
            }
        }
        c
    }

    /// Number of devices known.
    pub fn len(&self) -> usize {
        self.shared.read().devices.len()
    }

    /// Whether no device is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        if let Err(e) = self.shared.write_dirty(true) {
            tracing::warn!(error = %e, "registry: devices not persisted at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::wire::{Birth, Death};

    fn birth(id: &str, tags: &[(&str, &str)], version: &str) -> Status {
        Status::Online(Birth {
            v: 1,
            device: id.into(),
            agent_version: "0.1.0".into(),
            models: vec![ModelVersion {
                name: "pdm".into(),
                version: version.into(),
                release: Some(3),
                role: "active".into(),
                phase: Some("committed".into()),
            }],
            started_at_ms: 1,
            sent_at_ms: 2,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn death(id: &str) -> Status {
        Status::Offline(Death {
            v: 1,
            device: id.into(),
            reason: "connection-lost".into(),
        })
    }

    #[test]
    fn births_and_deaths_drive_online_state() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(Db::open(dir.path()).unwrap()).unwrap();
        assert!(r.on_status("d1", &birth("d1", &[("site", "a")], "1.0"), 1000));
        // a second birth while online is not a return
        assert!(!r.on_status("d1", &birth("d1", &[("site", "a")], "1.0"), 2000));
        let d = r.get("d1").unwrap();
        assert!(d.online);
        assert_eq!(d.online_since_ms, Some(1000));
        assert_eq!(d.last_seen_ms, 2000);
        assert!(!r.on_status("d1", &death("d1"), 3000));
        let d = r.get("d1").unwrap();
        assert!(!d.online);
        assert_eq!(d.online_since_ms, None);
        assert_eq!(d.offline_reason.as_deref(), Some("connection-lost"));
        assert!(r.on_status("d1", &birth("d1", &[("site", "a")], "1.0"), 4000));
        assert_eq!(r.get("d1").unwrap().online_since_ms, Some(4000));
        // a status naming another device is ignored
        assert!(!r.on_status("d2", &birth("d1", &[], "1.0"), 5000));
        assert!(r.get("d2").is_none());
        assert_eq!(r.counts().mismatched, 1);
        // a death of an unknown device registers it offline
        assert!(!r.on_status("d3", &death("d3"), 6000));
        let c = r.counts();
        assert_eq!((c.online, c.offline), (1, 1));
        assert_eq!(c.versions.get(&("pdm".into(), "1.0".into())), Some(&1));
    }

    #[test]
    fn selectors_parse_match_and_name_bad_parts() {
        let s = TagSelector::parse("site=plant-a, line=3").unwrap();
        let tags: BTreeMap<String, String> = [("site", "plant-a"), ("line", "3"), ("hw", "x")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert!(s.matches(&tags, "d1"));
        let mut other = tags.clone();
        other.insert("line".into(), "4".into());
        assert!(!s.matches(&other, "d1"));
        assert!(!s.matches(&BTreeMap::new(), "d1"));
        assert_eq!(s.to_string(), "line=3,site=plant-a");
        let either = TagSelector::parse("line=3,line=4").unwrap();
        assert!(either.matches(&other, "x") && either.matches(&tags, "x"));
        for all in ["", "*", "  "] {
            let a = TagSelector::parse(all).unwrap();
            assert!(a.is_all() && a.matches(&BTreeMap::new(), "any"));
            assert_eq!(a.to_string(), "*");
        }
        let d = TagSelector::parse("device=d7").unwrap();
        assert!(d.matches(&BTreeMap::new(), "d7"));
        assert!(!d.matches(&BTreeMap::new(), "d8"));
        let e = TagSelector::parse("site=a,line").unwrap_err();
        assert_eq!(e.part, "line");
        assert!(e.to_string().contains("KEY=VALUE"), "{e}");
        let e = TagSelector::parse("site=a b").unwrap_err();
        assert!(e.to_string().contains("\"site=a b\""), "{e}");
        let e = TagSelector::parse("site=a,,line=2").unwrap_err();
        assert!(e.problem.contains("empty part"), "{e}");
        assert!(TagSelector::parse("=x").is_err());
    }

    #[test]
    fn list_filters_by_selector_and_online_in_id_order() {
        let r = Registry::open(Db::temporary().unwrap()).unwrap();
        for (i, site) in ["a", "b", "a", "a"].iter().enumerate() {
            let id = format!("d{i}");
            r.on_status(&id, &birth(&id, &[("site", site)], "1.0"), 10);
        }
        r.on_status("d2", &death("d2"), 20);
        let all = TagSelector::parse("*").unwrap();
        let ids = |v: Vec<Device>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();
        assert_eq!(ids(r.list(&all, None, 100)), ["d0", "d1", "d2", "d3"]);
        let a = TagSelector::parse("site=a").unwrap();
        assert_eq!(ids(r.list(&a, None, 100)), ["d0", "d2", "d3"]);
        assert_eq!(ids(r.list(&a, Some(true), 100)), ["d0", "d3"]);
        assert_eq!(ids(r.list(&a, Some(false), 100)), ["d2"]);
        assert_eq!(ids(r.list(&a, None, 2)), ["d0", "d2"]);
        assert_eq!(r.ids(&a), ["d0", "d2", "d3"]);
    }

    #[test]
    fn registry_is_bounded() {
        let r =
            Registry::open_with(Db::temporary().unwrap(), 2, WriteIntervals::default()).unwrap();
        assert!(r.on_status("d1", &birth("d1", &[], "1"), 1));
        assert!(r.on_status("d2", &birth("d2", &[], "1"), 1));
        assert!(!r.on_status("d3", &birth("d3", &[], "1"), 1));
        assert!(r.get("d3").is_none());
        assert_eq!(r.counts().refused, 1);
        // known devices still update
        assert!(!r.on_status("d1", &death("d1"), 2));
        assert!(r.on_status("d1", &birth("d1", &[], "2"), 3));
    }

    fn poll<T>(mut f: impl FnMut() -> Option<T>) -> T {
        for _ in 0..500 {
            if let Some(v) = f() {
                return v;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached in 5 s");
    }

    #[test]
    fn the_writer_persists_status_soon_and_activity_later() {
        let db = Db::temporary().unwrap();
        let r = Registry::open_with(
            db.clone(),
            DEFAULT_MAX_DEVICES,
            WriteIntervals {
                status: Duration::from_millis(20),
                activity: Duration::from_secs(3600),
            },
        )
        .unwrap();
        r.on_status("d1", &birth("d1", &[("site", "a")], "1.0"), 1000);
        let stored: Device = poll(|| db.get(TREE, "d1").unwrap());
        assert_eq!(stored.models[0].version, "1.0");
        assert_eq!(stored.last_seen_ms, 1000);
        // activity waits for its own interval
        r.seen("d1", 5000);
        std::thread::sleep(Duration::from_millis(150));
        let stored: Device = db.get(TREE, "d1").unwrap().unwrap();
        assert_eq!(stored.last_seen_ms, 1000);
        // a model change is a status change: written with the activity it carries
        r.on_status("d1", &birth("d1", &[("site", "a")], "2.0"), 6000);
        let stored: Device = poll(|| {
            db.get::<Device>(TREE, "d1")
                .unwrap()
                .filter(|d| d.models[0].version == "2.0")
        });
        assert_eq!(stored.last_seen_ms, 6000);
        drop(r);

        let db = Db::temporary().unwrap();
        let r = Registry::open_with(
            db.clone(),
            DEFAULT_MAX_DEVICES,
            WriteIntervals {
                status: Duration::from_millis(20),
                activity: Duration::from_millis(50),
            },
        )
        .unwrap();
        r.on_status("d1", &birth("d1", &[], "1.0"), 1000);
        r.seen("d1", 7000);
        let stored: Device = poll(|| {
            db.get::<Device>(TREE, "d1")
                .unwrap()
                .filter(|d| d.last_seen_ms == 7000)
        });
        assert_eq!(stored.id, "d1");
    }

    #[test]
    fn stored_batches_update_health_from_the_last_sample() {
        let r = Registry::open(Db::temporary().unwrap()).unwrap();
        r.on_status("d1", &birth("d1", &[], "1.0"), 1000);
        let rec = |seq: u64, class: RecordClass, body: &str| shared::wire::Record {
            seq,
            class,
            produced_at_ms: 1,
            body: serde_json::value::RawValue::from_string(body.into()).unwrap(),
        };
        let batch = [
            rec(
                1,
                RecordClass::Health,
                r#"{"kind":"health_sample","sample":{"cpu":1}}"#,
            ),
            rec(
                2,
                RecordClass::Health,
                r#"{"kind":"health_sample","sample":{"cpu":2}}"#,
            ),
            rec(3, RecordClass::Telemetry, r#"{"kind":"prediction"}"#),
        ];
        r.on_stored("d1", &batch, 5000);
        let d = r.get("d1").unwrap();
        assert_eq!(d.health.unwrap()["cpu"], 2);
        assert_eq!(d.last_seen_ms, 5000);
        r.on_stored("d1", &batch[2..], 6000);
        let d = r.get("d1").unwrap();
        assert_eq!(d.health.unwrap()["cpu"], 2);
        assert_eq!(d.last_seen_ms, 6000);
    }

    #[test]
    fn devices_survive_reopen_offline() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = Registry::open(Db::open(dir.path()).unwrap()).unwrap();
            r.on_status("d1", &birth("d1", &[("site", "a")], "1.0"), 1000);
            r.on_status("d2", &birth("d2", &[("site", "b")], "2.0"), 1000);
            r.on_record(
                "d1",
                RecordClass::Health,
                &serde_json::json!({"kind": "health_sample", "sample": {"cpu": 2}}),
                2000,
            );
            // other classes only count as activity
            r.on_record(
                "d1",
                RecordClass::Telemetry,
                &serde_json::json!({"kind": "health_sample", "sample": {"cpu": 9}}),
                2500,
            );
            r.on_status("d2", &death("d2"), 2600);
            // unknown devices are not created by records
            r.seen("d9", 2600);
            assert!(r.get("d9").is_none());
            assert!(r.flush().unwrap() >= 1);
            assert_eq!(r.flush().unwrap(), 0);
            r.seen("d2", 2700);
            // dropped: what is pending is written
        }
        let r = Registry::open(Db::open(dir.path()).unwrap()).unwrap();
        let d1 = r.get("d1").unwrap();
        assert!(!d1.online, "nothing is online before its status arrives");
        assert_eq!(d1.online_since_ms, None);
        assert_eq!(d1.tags.get("site").map(String::as_str), Some("a"));
        assert_eq!(d1.models[0].version, "1.0");
        assert_eq!(d1.last_seen_ms, 2500);
        assert_eq!(d1.health.as_ref().unwrap()["cpu"], 2);
        let d2 = r.get("d2").unwrap();
        assert_eq!(d2.offline_reason.as_deref(), Some("connection-lost"));
        assert_eq!(d2.last_seen_ms, 2700);
        assert_eq!(r.len(), 2);
        // a retained birth after the restart is a return
        assert!(r.on_status("d1", &birth("d1", &[("site", "a")], "1.0"), 3000));
        assert_eq!(r.counts().online, 1);
    }
}
