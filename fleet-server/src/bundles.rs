//! The bundle store: bundles uploaded by operators (`POST /v1/bundles`, `fleetctl bundle
//! push`), checked against the trust root the devices use, gated by the per-model signoff
//! policy and approvals, and kept for delivery to devices.
//!
//! Guarantees:
//! - An upload is streamed to a temporary file in the store directory, hashed as it is
//!   written and cut off at the first byte beyond `bundles.max_bundle_bytes`; the whole file
//!   is never held in memory.
//! - Nothing is stored unless its signature verifies against the trust root
//!   (`bundles.trust_root`, plus a keyring when one is given) the way a device would verify
//!   it ([`shared::bundle::verify`]).
//! - A stored bundle is the file `<dir>/<sha256>.bundle` (renamed from the temporary file
//!   after an fsync, then the directory fsynced) and, written after it, its record in the
//!   sled tree `bundles`: `by-name/<name>@<version>` and the index `by-sha/<sha256>` in one
//!   atomic batch. A crash leaves either no record (the upload is repeated) or a record
//!   whose file is durable.
//! - `NAME@VERSION` is immutable: the same bytes again are accepted as the stored bundle,
//!   other bytes are refused ([`BundleError::Conflict`]).
//! - The signoff state is computed from the policy in force whenever a record is read, so a
//!   changed policy applies to bundles already stored; approvals are stored and never
//!   come from the uploader or twice from one person.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::metrics::Requirement;
use shared::trust::{KeyringFile, PublicKey, Trust};

use crate::server::config;
use crate::store::{Batch, Db, StoreError};

/// Sled tree of the store.
pub const TREE: &str = "bundles";
/// Most bundles the store keeps.
pub const MAX_BUNDLES: usize = 10_000;
/// Signoff states.
pub const READY: &str = "ready";
pub const AWAITING_APPROVAL: &str = "awaiting_approval";
pub const BLOCKED: &str = "blocked";

/// What went wrong with a bundle or the store; every variant names the bundle, key or file.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundles.trust_root is not configured: bundle uploads are refused until it names the root public key the devices use")]
    NoTrustRoot,
    #[error("trust root: {0}")]
    TrustRoot(#[source] shared::trust::TrustError),
    #[error("keyring {path}: {source}")]
    Keyring {
        path: PathBuf,
        #[source]
        source: shared::trust::TrustError,
    },
    #[error("bundle upload exceeds bundles.max_bundle_bytes = {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("bundle upload is empty")]
    Empty,
    #[error("bundle store {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle upload: reading the request body: {0}")]
    Body(String),
    #[error("uploaded bundle (sha256 {sha256}) refused: {source}")]
    Invalid {
        sha256: String,
        #[source]
        source: shared::bundle::BundleError,
    },
    #[error("bundle {name}@{version} is already stored with sha256 {stored}; the upload has sha256 {uploaded} (a version is immutable: give the new bundle another version)")]
    Conflict {
        name: String,
        version: String,
        stored: String,
        uploaded: String,
    },
    #[error("no bundle {name}@{version}")]
    NotFound { name: String, version: String },
    #[error("bundle {name}@{version}: {approver:?} uploaded it and cannot approve it (an approval must come from another admin)")]
    SelfApproval {
        name: String,
        version: String,
        approver: String,
    },
    #[error("bundle {name}@{version}: {approver:?} already approved it (a second approval must come from another admin)")]
    AlreadyApproved {
        name: String,
        version: String,
        approver: String,
    },
    #[error("bundles.signoff policy for model {model:?}: requirement {requirement:?}: {problem}")]
    Policy {
        model: String,
        requirement: String,
        problem: String,
    },
    #[error("the bundle store is full ({limit} bundles)")]
    Full { limit: usize },
    #[error("bundle store: {0}")]
    Store(#[from] StoreError),
}

/// One requirement's result in a [`Signoff`] (API type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequirementView {
    pub requirement: String,
    pub measured: Option<f64>,
    pub met: bool,
}

/// Whether a bundle may be rolled out (API type).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signoff {
    pub requirements: Vec<RequirementView>,
    pub approvals_needed: u32,
    pub approved_by: Vec<String>,
    /// `ready`, `awaiting_approval` or `blocked`.
    pub state: String,
    pub problems: Vec<String>,
}

/// A stored bundle as the API shows it (`Bundle` of the admin API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleRecord {
    pub name: String,
    pub version: String,
    pub release: u64,
    pub sha256: String,
    pub bytes: u64,
    /// Key id of the signing key.
    pub signer: String,
    pub uploaded_by: String,
    pub uploaded_at_ms: u64,
    pub signoff: Signoff,
}

impl BundleRecord {
    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    pub fn is_ready(&self) -> bool {
        self.signoff.state == READY
    }
}

/// The on-disk record of the `bundles` tree (`by-name/...`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stored {
    name: String,
    version: String,
    release: u64,
    sha256: String,
    bytes: u64,
    signer: String,
    uploaded_by: String,
    uploaded_at_ms: u64,
    /// `manifest.signoff.metrics`; None when the manifest has no signoff section.
    metrics: Option<BTreeMap<String, f64>>,
    #[serde(default)]
    approved_by: Vec<String>,
}

struct Policy {
    require: Vec<Requirement>,
    approvals: u32,
}

/// The result of an upload.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub record: BundleRecord,
    /// False when the identical bundle was already stored.
    pub created: bool,
}

/// An upload in progress: a temporary file in the store directory, hashed and counted as
/// written. Dropping it removes the file.
pub struct Upload {
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    bytes: u64,
    limit: u64,
}

impl Upload {
    /// Appends `data`; refuses the first byte beyond the limit.
    pub fn write(&mut self, data: &[u8]) -> Result<(), BundleError> {
        let total = self.bytes.saturating_add(data.len() as u64);
        if total > self.limit {
            return Err(BundleError::TooLarge { limit: self.limit });
        }
        self.file
            .as_file_mut()
            .write_all(data)
            .map_err(|source| BundleError::Io {
                path: self.file.path().to_path_buf(),
                op: "write upload",
                source,
            })?;
        self.hasher.update(data);
        self.bytes = total;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

/// The bundle store (see the module documentation). Shared as `Arc<BundleStore>`.
pub struct BundleStore {
    db: Db,
    dir: PathBuf,
    trust_root: Option<PathBuf>,
    keyring: Option<PathBuf>,
    max_bundle_bytes: u64,
    policies: BTreeMap<String, Policy>,
    /// name@version -> record, mirrored from the tree.
    records: RwLock<BTreeMap<String, Stored>>,
    /// sha256 -> name@version.
    by_sha: RwLock<HashMap<String, String>>,
    /// Serializes uploads' final step and approvals.
    write: Mutex<()>,
}

fn name_key(id: &str) -> String {
    format!("by-name/{id}")
}

fn sha_key(sha: &str) -> String {
    format!("by-sha/{sha}")
}

fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| BundleError::Io {
            path: dir.to_path_buf(),
            op: "fsync directory",
            source,
        })
}

impl BundleStore {
    /// Opens the store in `dir` (created; `<state>/bundles`), removing upload leftovers, and
    /// parses the signoff policies of `cfg`.
    pub fn open(db: Db, dir: PathBuf, cfg: &config::Bundles) -> Result<BundleStore, BundleError> {
        BundleStore::open_with_keyring(db, dir, cfg, None)
    }

    /// [`BundleStore::open`] with a root-signed keyring of signing keys (as the agents'
    /// `keyring` setting): bundles must then be signed by a keyring key.
    pub fn open_with_keyring(
        db: Db,
        dir: PathBuf,
        cfg: &config::Bundles,
        keyring: Option<PathBuf>,
    ) -> Result<BundleStore, BundleError> {
        std::fs::create_dir_all(&dir).map_err(|source| BundleError::Io {
            path: dir.clone(),
            op: "create directory",
            source,
        })?;
        let leftovers = std::fs::read_dir(&dir).map_err(|source| BundleError::Io {
            path: dir.clone(),
            op: "list directory",
            source,
        })?;
        for entry in leftovers.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".upload-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let mut policies = BTreeMap::new();
        for p in &cfg.signoff {
            let mut require = Vec::new();
            for r in &p.require {
                require.push(Requirement::parse(r).map_err(|e| BundleError::Policy {
                    model: p.model.clone(),
                    requirement: r.clone(),
                    problem: e.to_string(),
                })?);
            }
            policies.insert(
                p.model.clone(),
                Policy {
                    require,
                    approvals: p.approvals,
                },
            );
        }
        let stored: Vec<(String, Stored)> = db.list(TREE, "by-name/", None, MAX_BUNDLES + 1)?;
        let records: BTreeMap<String, Stored> = stored
            .into_iter()
            .map(|(_, s)| (format!("{}@{}", s.name, s.version), s))
            .collect();
        let by_sha = records
            .iter()
            .map(|(id, s)| (s.sha256.clone(), id.clone()))
            .collect();
        Ok(BundleStore {
            db,
            dir,
            trust_root: cfg.trust_root.clone(),
            keyring,
            max_bundle_bytes: cfg.max_bundle_bytes,
            policies,
            records: RwLock::new(records),
            by_sha: RwLock::new(by_sha),
            write: Mutex::new(()),
        })
    }

    /// Largest upload accepted.
    pub fn max_bundle_bytes(&self) -> u64 {
        self.max_bundle_bytes
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn trust(&self) -> Result<Trust, BundleError> {
        let root_path = self.trust_root.as_ref().ok_or(BundleError::NoTrustRoot)?;
        let root = PublicKey::load(root_path).map_err(BundleError::TrustRoot)?;
        match &self.keyring {
            None => Ok(Trust::root_only(root)),
            Some(path) => {
                let file = KeyringFile::load(path).map_err(|source| BundleError::Keyring {
                    path: path.clone(),
                    source,
                })?;
                Trust::with_keyring(root, &file, 0).map_err(|source| BundleError::Keyring {
                    path: path.clone(),
                    source,
                })
            }
        }
    }

    /// Starts an upload (a temporary file in the store directory).
    pub fn begin_upload(&self) -> Result<Upload, BundleError> {
        if self.trust_root.is_none() {
            return Err(BundleError::NoTrustRoot);
        }
        let file = tempfile::Builder::new()
            .prefix(".upload-")
            .tempfile_in(&self.dir)
            .map_err(|source| BundleError::Io {
                path: self.dir.clone(),
                op: "create upload file",
                source,
            })?;
        Ok(Upload {
            file,
            hasher: Sha256::new(),
            bytes: 0,
            limit: self.max_bundle_bytes,
        })
    }

    /// Uploads everything `reader` yields (tests, tools).
    pub fn upload_reader<R: Read>(
        &self,
        mut reader: R,
        uploaded_by: &str,
        now_ms: u64,
    ) -> Result<Uploaded, BundleError> {
        let mut up = self.begin_upload()?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| BundleError::Body(e.to_string()))?;
            if n == 0 {
                break;
            }
            up.write(&buf[..n])?;
        }
        self.finish_upload(up, uploaded_by, now_ms)
    }

    /// Completes an upload: fsync, verify against the trust root, then store (or return the
    /// identical stored bundle). Blocking: hashes and decompresses the whole file.
    pub fn finish_upload(
        &self,
        mut up: Upload,
        uploaded_by: &str,
        now_ms: u64,
    ) -> Result<Uploaded, BundleError> {
        if up.bytes == 0 {
            return Err(BundleError::Empty);
        }
        let temp_path = up.file.path().to_path_buf();
        up.file
            .as_file_mut()
            .sync_all()
            .map_err(|source| BundleError::Io {
                path: temp_path.clone(),
                op: "fsync upload",
                source,
            })?;
        let sha256 = shared::trust::hex(&up.hasher.clone().finalize());
        let trust = self.trust()?;
        let now = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(now_ms) * 1_000_000)
            .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
        let limits = shared::bundle::Limits {
            max_total_bytes: shared::bundle::Limits::default()
                .max_total_bytes
                .max(self.max_bundle_bytes.saturating_mul(4)),
            ..shared::bundle::Limits::default()
        };
        let verified =
            shared::bundle::verify(&temp_path, &trust, &limits, None, now).map_err(|source| {
                BundleError::Invalid {
                    sha256: sha256.clone(),
                    source,
                }
            })?;
        let m = &verified.manifest;
        let id = format!("{}@{}", m.name, m.version);

        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(existing) = self.read().get(&id).cloned() {
            if existing.sha256 == sha256 {
                return Ok(Uploaded {
                    record: self.view(&existing),
                    created: false,
                });
            }
            return Err(BundleError::Conflict {
                name: m.name.clone(),
                version: m.version.clone(),
                stored: existing.sha256,
                uploaded: sha256,
            });
        }
        if self.read().len() >= MAX_BUNDLES {
            return Err(BundleError::Full { limit: MAX_BUNDLES });
        }
        let stored = Stored {
            name: m.name.clone(),
            version: m.version.clone(),
            release: m.release,
            sha256: sha256.clone(),
            bytes: up.bytes,
            signer: verified.signer.as_str().to_string(),
            uploaded_by: uploaded_by.to_string(),
            uploaded_at_ms: now_ms,
            metrics: m.signoff.as_ref().map(|s| s.metrics.clone()),
            approved_by: Vec::new(),
        };
        let final_path = self.path(&sha256);
        up.file.persist(&final_path).map_err(|e| BundleError::Io {
            path: final_path.clone(),
            op: "rename upload into place",
            source: e.error,
        })?;
        sync_dir(&self.dir)?;
        let mut b = Batch::default();
        b.put(&name_key(&id), &stored);
        b.put(&sha_key(&sha256), &id);
        self.db.batch(TREE, b)?;
        let record = self.view(&stored);
        self.records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), stored);
        self.by_sha
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha256, id);
        Ok(Uploaded {
            record,
            created: true,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Stored>> {
        self.records.read().unwrap_or_else(|p| p.into_inner())
    }

    fn policy(&self, model: &str) -> Option<&Policy> {
        self.policies.get(model).or_else(|| self.policies.get("*"))
    }

    /// The record with its signoff evaluated under the policy in force.
    fn view(&self, s: &Stored) -> BundleRecord {
        let mut requirements = Vec::new();
        let mut problems = Vec::new();
        let (require, approvals_needed): (&[Requirement], u32) = match self.policy(&s.name) {
            Some(p) => (&p.require, p.approvals),
            None => (&[], 0),
        };
        if !require.is_empty() && s.metrics.is_none() {
            problems.push(format!(
                "the bundle has no signoff metrics (build it with a labelled holdout), but the policy for model {:?} requires {}",
                s.name,
                require
                    .iter()
                    .map(|r| r.text.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let empty = BTreeMap::new();
        let metrics = s.metrics.as_ref().unwrap_or(&empty);
        for r in require {
            let o = r.check(metrics);
            if s.metrics.is_some() && !o.met {
                problems.push(match o.measured {
                    Some(v) => format!("requirement {} not met: measured {v}", r.text),
                    None => format!(
                        "requirement {} not met: the bundle's signoff has no metric {:?}",
                        r.text, r.metric
                    ),
                });
            }
            requirements.push(RequirementView {
                requirement: o.requirement,
                measured: o.measured,
                met: o.met,
            });
        }
        let approved = s.approved_by.len() as u64;
        let state = if !problems.is_empty() {
            BLOCKED
        } else if approved < u64::from(approvals_needed) {
            problems.push(format!(
                "awaiting {} approval(s) by an admin other than the uploader {:?}",
                u64::from(approvals_needed) - approved,
                s.uploaded_by
            ));
            AWAITING_APPROVAL
        } else {
            READY
        };
        BundleRecord {
            name: s.name.clone(),
            version: s.version.clone(),
            release: s.release,
            sha256: s.sha256.clone(),
            bytes: s.bytes,
            signer: s.signer.clone(),
            uploaded_by: s.uploaded_by.clone(),
            uploaded_at_ms: s.uploaded_at_ms,
            signoff: Signoff {
                requirements,
                approvals_needed,
                approved_by: s.approved_by.clone(),
                state: state.to_string(),
                problems,
            },
        }
    }

    /// Records an approval of `name@version` by `approver` (a token name).
    pub fn approve(
        &self,
        name: &str,
        version: &str,
        approver: &str,
    ) -> Result<BundleRecord, BundleError> {
        let id = format!("{name}@{version}");
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut s = self
            .read()
            .get(&id)
            .cloned()
            .ok_or_else(|| BundleError::NotFound {
                name: name.into(),
                version: version.into(),
            })?;
        if s.uploaded_by == approver {
            return Err(BundleError::SelfApproval {
                name: name.into(),
                version: version.into(),
                approver: approver.into(),
            });
        }
        if s.approved_by.iter().any(|a| a == approver) {
            return Err(BundleError::AlreadyApproved {
                name: name.into(),
                version: version.into(),
                approver: approver.into(),
            });
        }
        s.approved_by.push(approver.to_string());
        self.db.put(TREE, &name_key(&id), &s)?;
        let record = self.view(&s);
        self.records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, s);
        Ok(record)
    }

    /// One bundle.
    pub fn get(&self, name: &str, version: &str) -> Option<BundleRecord> {
        self.read()
            .get(&format!("{name}@{version}"))
            .map(|s| self.view(s))
    }

    /// A bundle by `name@version` text.
    pub fn get_id(&self, id: &str) -> Option<BundleRecord> {
        self.read().get(id).map(|s| self.view(s))
    }

    fn id_by_sha(&self, sha256: &str) -> Option<String> {
        self.by_sha
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned()
    }

    /// The bundle with this SHA-256.
    pub fn get_by_sha(&self, sha256: &str) -> Option<BundleRecord> {
        let id = self.id_by_sha(sha256)?;
        self.read().get(&id).map(|s| self.view(s))
    }

    /// Size of the stored file with this SHA-256 (cheap: no signoff evaluation).
    pub fn size_by_sha(&self, sha256: &str) -> Option<u64> {
        let id = self.id_by_sha(sha256)?;
        self.read().get(&id).map(|s| s.bytes)
    }

    /// Every bundle, by name then version.
    pub fn list(&self) -> Vec<BundleRecord> {
        self.read().values().map(|s| self.view(s)).collect()
    }

    /// Where the file of the bundle with this SHA-256 is (or would be).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.bundle"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shared::bundle::{BundleFile, Manifest};
    use shared::trust::SecretKey;

    pub(crate) fn root() -> SecretKey {
        SecretKey::from_seed([7; 32])
    }

    pub(crate) const NOW_MS: u64 = 1_790_000_000_000;

    /// A signed bundle file `name@version` in `dir` (root-signed unless `key` is given).
    pub(crate) fn make_bundle(
        dir: &Path,
        name: &str,
        version: &str,
        metrics: Option<&[(&str, f64)]>,
        key: &SecretKey,
        model_bytes: usize,
    ) -> PathBuf {
        // incompressible bytes, so the bundle is about as large as the model
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ model_bytes as u64 ^ version.len() as u64;
        let model: Vec<u8> = (0..model_bytes)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let model_path = dir.join(format!("{name}-{version}.onnx"));
        std::fs::write(&model_path, &model).unwrap();
        let mut m: Manifest = shared::bundle::testing::manifest(name, &[]);
        m.version = version.into();
        if let Some(ms) = metrics {
            m.signoff = Some(shared::bundle::Signoff {
                task: "classification".into(),
                rows: 100,
                label_column: "y".into(),
                group_column: None,
                positive_label: None,
                reference_group: None,
                metrics: ms.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                groups: vec![],
                requirements: vec![],
                notes: vec![],
            });
        }
        let out = dir.join(format!("{name}-{version}.bundle"));
        shared::bundle::write_bundle(
            &mut m,
            &[BundleFile {
                path: "model.onnx".into(),
                source: model_path,
            }],
            key,
            &out,
        )
        .unwrap();
        out
    }

    pub(crate) fn config(dir: &Path, signoff: Vec<config::SignoffPolicy>) -> config::Bundles {
        let root_path = dir.join("root.pub");
        std::fs::write(&root_path, root().public().to_file_bytes()).unwrap();
        config::Bundles {
            trust_root: Some(root_path),
            keyring: None,
            max_bundle_bytes: 1024 * 1024,
            chunk_bytes: 4096,
            signoff,
        }
    }

    fn policy(model: &str, require: &[&str], approvals: u32) -> config::SignoffPolicy {
        config::SignoffPolicy {
            model: model.into(),
            require: require.iter().map(|s| s.to_string()).collect(),
            approvals,
        }
    }

    fn upload(store: &BundleStore, path: &Path, by: &str) -> Result<Uploaded, BundleError> {
        store.upload_reader(File::open(path).unwrap(), by, NOW_MS)
    }

    #[test]
    fn upload_stores_verified_bundle_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), vec![]);
        let bundle = make_bundle(dir.path(), "pdm", "1.0.0", None, &root(), 20_000);
        let bytes = std::fs::read(&bundle).unwrap();
        let sha = shared::delivery::sha256_hex(&bytes);
        let state = dir.path().join("state");
        {
            let db = Db::open(&state).unwrap();
            let store = BundleStore::open(db, state.join("bundles"), &cfg).unwrap();
            let up = upload(&store, &bundle, "ops").unwrap();
            assert!(up.created);
            let r = up.record;
            assert_eq!((r.name.as_str(), r.version.as_str()), ("pdm", "1.0.0"));
            assert_eq!(r.release, 3);
            assert_eq!(r.sha256, sha);
            assert_eq!(r.bytes, bytes.len() as u64);
            assert_eq!(r.signer, root().public().id.as_str());
            assert_eq!(r.uploaded_by, "ops");
            assert_eq!(r.signoff.state, READY);
            assert_eq!(std::fs::read(store.path(&sha)).unwrap(), bytes);
            // the identical file again: the stored record, not a new one
            let again = upload(&store, &bundle, "someone-else").unwrap();
            assert!(!again.created);
            assert_eq!(again.record.uploaded_by, "ops");
            // no temporary file left
            let names: Vec<String> = std::fs::read_dir(store.dir())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, [format!("{sha}.bundle")]);
        }
        let db = Db::open(&state).unwrap();
        let store = BundleStore::open(db, state.join("bundles"), &cfg).unwrap();
        let r = store.get("pdm", "1.0.0").unwrap();
        assert_eq!(r.sha256, sha);
        assert_eq!(store.get_by_sha(&sha).unwrap().version, "1.0.0");
        assert_eq!(store.get_id("pdm@1.0.0").unwrap().sha256, sha);
        assert_eq!(store.list().len(), 1);
        assert_eq!(store.size_by_sha(&sha), Some(bytes.len() as u64));
        assert!(store.get("pdm", "2.0.0").is_none());
    }

    #[test]
    fn bad_signature_unknown_key_oversize_and_conflict_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), vec![]);
        cfg.max_bundle_bytes = 200_000;
        let store =
            BundleStore::open(Db::temporary().unwrap(), dir.path().join("bundles"), &cfg).unwrap();
        // unknown key id
        let other = SecretKey::from_seed([8; 32]);
        let b = make_bundle(dir.path(), "pdm", "1.0.0", None, &other, 1000);
        let e = upload(&store, &b, "ops").unwrap_err();
        assert!(matches!(e, BundleError::Invalid { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("unknown key id") && text.contains(other.public().id.as_str()),
            "{text}"
        );
        // bad signature: a flipped byte in the signature file region of the manifest frame
        let good = make_bundle(dir.path(), "pdm", "1.0.1", None, &root(), 1000);
        let mut bytes = std::fs::read(&good).unwrap();
        let pos = bytes
            .windows(9)
            .position(|w| w == b"signature")
            .expect("signature field");
        let at = pos + 14;
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        let e = store
            .upload_reader(bytes.as_slice(), "ops", NOW_MS)
            .unwrap_err();
        assert!(matches!(e, BundleError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("signature"), "{e}");
        // not a bundle at all
        let e = store
            .upload_reader(&b"hello"[..], "ops", NOW_MS)
            .unwrap_err();
        assert!(matches!(e, BundleError::Invalid { .. }), "{e}");
        // oversize: cut at the limit
        let big = make_bundle(dir.path(), "pdm", "9.0.0", None, &root(), 400_000);
        let e = upload(&store, &big, "ops").unwrap_err();
        assert!(matches!(e, BundleError::TooLarge { limit: 200_000 }), "{e}");
        // duplicate name@version with other bytes
        upload(&store, &good, "ops").unwrap();
        let other_bytes = dir.path().join("other");
        std::fs::create_dir(&other_bytes).unwrap();
        let dup = make_bundle(&other_bytes, "pdm", "1.0.1", None, &root(), 1001);
        let e = upload(&store, &dup, "ops").unwrap_err();
        match &e {
            BundleError::Conflict { name, version, .. } => {
                assert_eq!((name.as_str(), version.as_str()), ("pdm", "1.0.1"))
            }
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("pdm@1.0.1"), "{e}");
        // empty upload
        assert!(matches!(
            store.upload_reader(&b""[..], "ops", NOW_MS).unwrap_err(),
            BundleError::Empty
        ));
        // only the good bundle is in the directory
        let files = std::fs::read_dir(store.dir()).unwrap().count();
        assert_eq!(files, 1);
    }

    #[test]
    fn keyring_signed_bundles_need_the_keyring() {
        use shared::trust::{KeyEntry, KeyringBody};
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), vec![]);
        let signer = SecretKey::from_seed([11; 32]);
        let mut body = KeyringBody::new(1, time::OffsetDateTime::now_utc());
        body.keys.push(KeyEntry {
            key_id: signer.public().id.to_string(),
            public_key: signer.public().to_base64(),
            models: vec!["pdm*".into()],
            not_after: None,
            revoked: false,
        });
        let mut ring = KeyringFile::unsigned(&body).unwrap();
        ring.sign(&root()).unwrap();
        let ring_path = dir.path().join("keyring.json");
        ring.save(&ring_path).unwrap();
        let b = make_bundle(dir.path(), "pdm", "1.0.0", None, &signer, 1000);
        let plain =
            BundleStore::open(Db::temporary().unwrap(), dir.path().join("b1"), &cfg).unwrap();
        assert!(upload(&plain, &b, "ops")
            .unwrap_err()
            .to_string()
            .contains("unknown key id"));
        let with = BundleStore::open_with_keyring(
            Db::temporary().unwrap(),
            dir.path().join("b2"),
            &cfg,
            Some(ring_path),
        )
        .unwrap();
        let r = upload(&with, &b, "ops").unwrap().record;
        assert_eq!(r.signer, signer.public().id.as_str());
    }

    #[test]
    fn signoff_policy_blocks_awaits_and_readies() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(
            dir.path(),
            vec![
                policy(
                    "pdm",
                    &["roc_auc>=0.9", "abs(statistical_parity_difference)<=0.1"],
                    1,
                ),
                policy("*", &["accuracy>=0.8"], 0),
            ],
        );
        let store =
            BundleStore::open(Db::temporary().unwrap(), dir.path().join("b"), &cfg).unwrap();
        // no signoff metrics at all: blocked
        let none = make_bundle(dir.path(), "pdm", "1.0.0", None, &root(), 500);
        let r = upload(&store, &none, "ops").unwrap().record;
        assert_eq!(r.signoff.state, BLOCKED);
        assert!(
            r.signoff.problems[0].contains("no signoff metrics"),
            "{:?}",
            r.signoff.problems
        );
        // one requirement unmet, one metric missing: blocked, each named
        let low = make_bundle(
            dir.path(),
            "pdm",
            "1.1.0",
            Some(&[("roc_auc", 0.85)]),
            &root(),
            500,
        );
        let r = upload(&store, &low, "ops").unwrap().record;
        assert_eq!(r.signoff.state, BLOCKED);
        let p = r.signoff.problems.join("\n");
        assert!(p.contains("roc_auc>=0.9 not met: measured 0.85"), "{p}");
        assert!(p.contains("statistical_parity_difference"), "{p}");
        assert_eq!(r.signoff.requirements.len(), 2);
        assert_eq!(r.signoff.requirements[0].measured, Some(0.85));
        assert!(!r.signoff.requirements[0].met);
        // all met: awaiting the approval, then ready after another admin approves
        let good = make_bundle(
            dir.path(),
            "pdm",
            "1.2.0",
            Some(&[("roc_auc", 0.95), ("statistical_parity_difference", -0.05)]),
            &root(),
            500,
        );
        let r = upload(&store, &good, "alice").unwrap().record;
        assert_eq!(r.signoff.state, AWAITING_APPROVAL, "{:?}", r.signoff);
        assert_eq!(r.signoff.approvals_needed, 1);
        assert!(r.signoff.requirements.iter().all(|q| q.met));
        let e = store.approve("pdm", "1.2.0", "alice").unwrap_err();
        assert!(matches!(e, BundleError::SelfApproval { .. }), "{e}");
        assert!(e.to_string().contains("\"alice\" uploaded it"), "{e}");
        let r = store.approve("pdm", "1.2.0", "bob").unwrap();
        assert_eq!(r.signoff.state, READY);
        assert_eq!(r.signoff.approved_by, ["bob"]);
        assert!(r.signoff.problems.is_empty());
        let e = store.approve("pdm", "1.2.0", "bob").unwrap_err();
        assert!(matches!(e, BundleError::AlreadyApproved { .. }), "{e}");
        assert!(store.get("pdm", "1.2.0").unwrap().is_ready());
        let e = store.approve("pdm", "7.0.0", "bob").unwrap_err();
        assert!(e.to_string().contains("no bundle pdm@7.0.0"), "{e}");
        // the fallback policy applies to other models
        let other = make_bundle(
            dir.path(),
            "vision",
            "1.0.0",
            Some(&[("accuracy", 0.7)]),
            &root(),
            500,
        );
        let r = upload(&store, &other, "ops").unwrap().record;
        assert_eq!(r.signoff.state, BLOCKED);
        assert!(
            r.signoff.problems[0].contains("accuracy>=0.8"),
            "{:?}",
            r.signoff
        );
        // a policy change applies to stored bundles
        let cfg2 = config(dir.path(), vec![]);
        let reopened = BundleStore::open(store.db.clone(), dir.path().join("b"), &cfg2).unwrap();
        assert_eq!(reopened.get("pdm", "1.0.0").unwrap().signoff.state, READY);
        assert_eq!(
            reopened.get("pdm", "1.2.0").unwrap().signoff.approved_by,
            ["bob"]
        );
    }

    #[test]
    fn bad_policies_and_missing_trust_root_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), vec![policy("pdm", &["auc>=0.9"], 0)]);
        let e = BundleStore::open(Db::temporary().unwrap(), dir.path().join("b"), &cfg)
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("\"pdm\"") && e.to_string().contains("auc>=0.9"),
            "{e}"
        );
        let mut cfg = config(dir.path(), vec![]);
        cfg.trust_root = None;
        let store =
            BundleStore::open(Db::temporary().unwrap(), dir.path().join("b"), &cfg).unwrap();
        assert!(matches!(
            store.begin_upload().err().unwrap(),
            BundleError::NoTrustRoot
        ));
        let mut cfg = config(dir.path(), vec![]);
        cfg.trust_root = Some(dir.path().join("missing.pub"));
        let store =
            BundleStore::open(Db::temporary().unwrap(), dir.path().join("c"), &cfg).unwrap();
        let b = make_bundle(dir.path(), "pdm", "1.0.0", None, &root(), 100);
        let e = upload(&store, &b, "ops").unwrap_err();
        assert!(e.to_string().contains("missing.pub"), "{e}");
    }
}
