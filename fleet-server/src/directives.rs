//! The fleet's directive issuer: loads (or on first start creates) the directive signing key
//! and signs directives for one device each, with an id, an expiry and a per-device counter.
//!
//! Guarantees:
//! - The key is `directives.key_file` when configured (it must exist), else
//!   `<state_dir>/directive.key`, created once (`create_new`, mode 0600, fsynced) in the
//!   `fleetctl keygen` file format, with `<state_dir>/directive.pub` beside it (the file
//!   agents list in `sync.directive_keys`). An existing key is never replaced.
//! - Counters: per device (tree `directive_counters`, key = device id), each new counter is
//!   `shared::directive::next_counter(last, now_ms)` (above the last one issued AND at least
//!   the wall clock in ms), and it is written and flushed to sled BEFORE the signed
//!   directive is returned, so counters are strictly increasing per device across restarts
//!   (and stay above what devices saw even if the counter store is lost, unless the clock
//!   went back). A failed store write returns an error and no directive.
//! - [`Issuer::issue_many`] assigns and persists all its counters in one atomic batch (one
//!   flush), so a wave of 10,000 directives costs one disk sync.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use shared::directive::{next_counter, Action, Directive, DirectiveError, DirectiveSigner};
use shared::trust::{PublicKey, SecretKey, TrustError};

use crate::server::config::Directives;
use crate::store::{Batch, Db, StoreError};

/// Sled tree holding the last counter issued per device.
pub const COUNTER_TREE: &str = "directive_counters";
/// Name of the generated key in the state directory.
pub const KEY_FILE: &str = "directive.key";
/// Name of its public half.
pub const PUB_FILE: &str = "directive.pub";

/// Why the issuer could not start or sign.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("directive key {path}: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: TrustError,
    },
    #[error("directive key {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("directives.lifetime_secs: {secs} s is outside 1 s ..= 7 days")]
    Lifetime { secs: u64 },
    #[error("directive counter store: {0}")]
    Store(#[from] StoreError),
    #[error("directive {id} for device {device}: {source}")]
    Sign {
        id: String,
        device: String,
        #[source]
        source: DirectiveError,
    },
    #[error("directive issuer: its lock was poisoned by a panic")]
    Poisoned,
}

/// One directive ready to publish on `<prefix>/<device>/commands`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedDirective {
    pub id: String,
    pub device: String,
    pub counter: u64,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    pub action: Action,
    /// `SignedDirective::to_payload()`.
    pub payload: Vec<u8>,
}

/// One directive to issue with [`Issuer::issue_many`].
#[derive(Debug, Clone)]
pub struct IssueRequest {
    pub device: String,
    pub id: String,
    pub action: Action,
}

/// Signs directives with the fleet's directive key.
pub struct Issuer {
    signer: DirectiveSigner,
    db: Db,
    lifetime_ms: u64,
    key_path: PathBuf,
    /// Serializes counter read-modify-write; also the source of generated ids.
    lock: Mutex<u64>,
}

fn io<'p>(path: &'p Path, op: &'static str) -> impl FnOnce(std::io::Error) -> IssueError + 'p {
    move |source| IssueError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Creates `<dir>/directive.key` (mode 0600, `create_new`) and `<dir>/directive.pub`, the
/// same files `fleetctl keygen --out <dir>/directive` writes.
fn create_key(secret_path: &Path, public_path: &Path) -> Result<SecretKey, IssueError> {
    let key = SecretKey::generate().map_err(|source| IssueError::Key {
        path: secret_path.to_path_buf(),
        source,
    })?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(secret_path).map_err(io(secret_path, "create"))?;
    f.write_all(&key.to_file_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io(secret_path, "write"))?;
    shared::trust::write_atomic(public_path, &key.public().to_file_bytes(), false)
        .map_err(io(public_path, "write"))?;
    if let Some(dir) = secret_path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(key)
}

impl Issuer {
    /// Loads `cfg.key_file`, or `<state_dir>/directive.key` (created with its `.pub` on first
    /// start; a missing `.pub` next to an existing generated key is rewritten).
    pub fn open(cfg: &Directives, state_dir: &Path, db: Db) -> Result<Issuer, IssueError> {
        let lifetime_ms = cfg.lifetime_secs.saturating_mul(1000);
        if cfg.lifetime_secs == 0 || lifetime_ms > shared::directive::MAX_LIFETIME_MS {
            return Err(IssueError::Lifetime {
                secs: cfg.lifetime_secs,
            });
        }
        let key_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IssueError::Key { path, source }
        };
        let (key, key_path) = match &cfg.key_file {
            Some(path) => (SecretKey::load(path).map_err(key_err(path))?, path.clone()),
            None => {
                let secret = state_dir.join(KEY_FILE);
                let public = state_dir.join(PUB_FILE);
                let key = if secret.exists() {
                    let key = SecretKey::load(&secret).map_err(key_err(&secret))?;
                    if !public.exists() {
                        shared::trust::write_atomic(&public, &key.public().to_file_bytes(), false)
                            .map_err(io(&public, "write"))?;
                    }
                    key
                } else {
                    let key = create_key(&secret, &public)?;
                    tracing::info!(key_id = %key.id, path = %public.display(),
                        "created the fleet directive key; agents must list this .pub in sync.directive_keys");
                    key
                };
                (key, secret)
            }
        };
        Ok(Issuer {
            signer: DirectiveSigner::new(key),
            db,
            lifetime_ms,
            key_path,
            lock: Mutex::new(0),
        })
    }

    /// The public key agents must accept.
    pub fn public_key(&self) -> PublicKey {
        self.signer.public_key()
    }

    /// The secret key file in use.
    pub fn key_path(&self) -> &Path {
        &self.key_path
    }

    /// Signs one directive for `device` with a generated id (`d-<ms>-<n>`), issued now.
    pub fn issue(&self, device: &str, action: Action) -> Result<IssuedDirective, IssueError> {
        let now_ms = now_ms();
        let n = {
            let mut g = self.lock.lock().map_err(|_| IssueError::Poisoned)?;
            *g += 1;
            *g
        };
        let req = IssueRequest {
            device: device.to_string(),
            id: format!("d-{now_ms}-{n}"),
            action,
        };
        let mut out = self.issue_many(&[req], now_ms)?;
        out.pop().ok_or(IssueError::Poisoned)
    }

    /// Signs `requests` at `now_ms`: assigns each a fresh counter, persists all counters in
    /// one flushed batch, then signs. All or nothing.
    pub fn issue_many(
        &self,
        requests: &[IssueRequest],
        now_ms: u64,
    ) -> Result<Vec<IssuedDirective>, IssueError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let _g = self.lock.lock().map_err(|_| IssueError::Poisoned)?;
        let mut counters: HashMap<&str, u64> = HashMap::new();
        let mut assigned = Vec::with_capacity(requests.len());
        for r in requests {
            let last = match counters.get(r.device.as_str()) {
                Some(c) => *c,
                None => self
                    .db
                    .get::<u64>(COUNTER_TREE, &r.device)?
                    .unwrap_or_default(),
            };
            let c = next_counter(last, now_ms);
            counters.insert(r.device.as_str(), c);
            assigned.push(c);
        }
        // sign before persisting: a directive that cannot be signed consumes no counter
        let mut out = Vec::with_capacity(requests.len());
        for (r, counter) in requests.iter().zip(assigned) {
            let d = Directive::new(
                r.device.clone(),
                counter,
                r.id.clone(),
                now_ms,
                self.lifetime_ms,
                r.action.clone(),
            );
            let signed = self.signer.sign(&d).map_err(|source| IssueError::Sign {
                id: r.id.clone(),
                device: r.device.clone(),
                source,
            })?;
            out.push(IssuedDirective {
                id: d.id,
                device: d.device,
                counter,
                issued_at_ms: d.issued_at_ms,
                expires_at_ms: d.expires_at_ms,
                action: d.action,
                payload: signed.to_payload(),
            });
        }
        let mut batch = Batch::default();
        for (device, c) in &counters {
            batch.put(device, c);
        }
        self.db.batch(COUNTER_TREE, batch)?;
        Ok(out)
    }
}

/// Wall-clock Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::directive::DirectiveVerifier;

    fn cfg() -> Directives {
        Directives {
            key_file: None,
            lifetime_secs: 600,
        }
    }

    #[test]
    fn key_is_created_once_private_and_counters_increase_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (c1, key_id) = {
            let db = Db::open(dir.path()).unwrap();
            let iss = Issuer::open(&cfg(), dir.path(), db).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            let public = PublicKey::load(&dir.path().join(PUB_FILE)).unwrap();
            assert_eq!(public.id, iss.public_key().id);
            let d = iss.issue("dev-1", Action::Ping {}).unwrap();
            let v = DirectiveVerifier::new([public]);
            let got = v.verify(&d.payload, "dev-1", d.issued_at_ms, 0).unwrap();
            assert_eq!(got.counter, d.counter);
            assert_eq!(got.expires_at_ms, d.issued_at_ms + 600_000);
            assert!(v.verify(&d.payload, "dev-2", d.issued_at_ms, 0).is_err());
            (d.counter, iss.public_key().id)
        };
        // a fake clock far behind: the counter still increases, also after reopening
        let db = Db::open(dir.path()).unwrap();
        let iss = Issuer::open(&cfg(), dir.path(), db).unwrap();
        assert_eq!(iss.public_key().id, key_id, "the key is reused");
        let reqs: Vec<IssueRequest> = (0..3)
            .map(|i| IssueRequest {
                device: if i < 2 { "dev-1" } else { "dev-2" }.into(),
                id: format!("x-{i}"),
                action: Action::Ping {},
            })
            .collect();
        let out = iss.issue_many(&reqs, 5).unwrap();
        assert_eq!(out[0].counter, c1 + 1);
        assert_eq!(out[1].counter, c1 + 2);
        assert_eq!(out[2].counter, 5);
        assert_eq!(out[0].id, "x-0");
        assert_eq!(
            iss.db.get::<u64>(COUNTER_TREE, "dev-1").unwrap(),
            Some(c1 + 2)
        );
    }

    #[test]
    fn configured_key_must_exist_and_bad_input_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.key");
        let c = Directives {
            key_file: Some(missing.clone()),
            lifetime_secs: 60,
        };
        let e = Issuer::open(&c, dir.path(), Db::temporary().unwrap())
            .err()
            .unwrap();
        assert!(e.to_string().contains("nope.key"), "{e}");
        assert!(!dir.path().join(KEY_FILE).exists());
        let e = Issuer::open(
            &Directives {
                key_file: None,
                lifetime_secs: 0,
            },
            dir.path(),
            Db::temporary().unwrap(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("lifetime_secs"), "{e}");
        let iss = Issuer::open(&cfg(), dir.path(), Db::temporary().unwrap()).unwrap();
        let e = iss.issue("bad/dev", Action::Ping {}).unwrap_err();
        assert!(e.to_string().contains("bad/dev"), "{e}");
        // nothing persisted for the refused directive
        assert_eq!(iss.db.count(COUNTER_TREE).unwrap(), 0);
    }
}
