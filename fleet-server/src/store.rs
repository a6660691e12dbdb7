//! The fleet server's state database (sled): devices, bundles, rollouts, directive counters.
//! Only this module touches sled.
//!
//! Guarantees:
//! - Every value is one JSON document under a string key in a named tree; a write returns
//!   only after sled has flushed it to disk ([`Db::put`] and [`Db::batch`] flush), so a
//!   `kill -9` after a call returns loses nothing the call wrote.
//! - [`Db::batch`] applies all its writes to one tree atomically (all or none after a
//!   crash); writes that must agree across trees go into one tree under prefixed keys.
//! - A value that does not parse is reported with its tree and key
//!   ([`StoreError::Corrupt`]), never silently skipped or replaced.
//! - Reads are bounded: [`Db::list`] takes a limit.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// What went wrong with the state database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("state database, tree {tree}: {source}")]
    Sled {
        tree: String,
        #[source]
        source: sled::Error,
    },
    #[error("state database, tree {tree}, key {key:?}: not a valid record: {problem}")]
    Corrupt {
        tree: String,
        key: String,
        problem: String,
    },
}

/// The state database: `<state_dir>/fleet.sled`.
#[derive(Clone)]
pub struct Db {
    db: sled::Db,
}

/// A set of writes to one tree, applied atomically by [`Db::batch`].
#[derive(Default)]
pub struct Batch {
    inner: sled::Batch,
}

impl Batch {
    pub fn put<T: Serialize>(&mut self, key: &str, value: &T) {
        let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
        self.inner.insert(key.as_bytes(), bytes);
    }

    pub fn remove(&mut self, key: &str) {
        self.inner.remove(key.as_bytes());
    }
}

impl Db {
    /// Opens (creating) `<state_dir>/fleet.sled`.
    pub fn open(state_dir: &Path) -> Result<Db, StoreError> {
        let path = state_dir.join("fleet.sled");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|source| StoreError::Open { path, source })?;
        Ok(Db { db })
    }

    /// A database in a temporary directory (tests).
    pub fn temporary() -> Result<Db, StoreError> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(|source| StoreError::Open {
                path: PathBuf::from("<temporary>"),
                source,
            })?;
        Ok(Db { db })
    }

    fn tree(&self, tree: &str) -> Result<sled::Tree, StoreError> {
        self.db.open_tree(tree).map_err(|source| StoreError::Sled {
            tree: tree.into(),
            source,
        })
    }

    fn sled(tree: &str) -> impl FnOnce(sled::Error) -> StoreError + '_ {
        move |source| StoreError::Sled {
            tree: tree.into(),
            source,
        }
    }

    fn decode<T: DeserializeOwned>(tree: &str, key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            tree: tree.into(),
            key: String::from_utf8_lossy(key).into_owned(),
            problem: e.to_string(),
        })
    }

    /// The value under `key`, if any.
    pub fn get<T: DeserializeOwned>(&self, tree: &str, key: &str) -> Result<Option<T>, StoreError> {
        let t = self.tree(tree)?;
        match t.get(key.as_bytes()).map_err(Self::sled(tree))? {
            Some(v) => Ok(Some(Self::decode(tree, key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Writes `value` under `key` and flushes.
    pub fn put<T: Serialize>(&self, tree: &str, key: &str, value: &T) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.put(key, value);
        self.batch(tree, b)
    }

    /// Removes `key` and flushes.
    pub fn remove(&self, tree: &str, key: &str) -> Result<(), StoreError> {
        let mut b = Batch::default();
        b.remove(key);
        self.batch(tree, b)
    }

    /// Applies `batch` to `tree` atomically and flushes.
    pub fn batch(&self, tree: &str, batch: Batch) -> Result<(), StoreError> {
        let t = self.tree(tree)?;
        t.apply_batch(batch.inner).map_err(Self::sled(tree))?;
        t.flush().map_err(Self::sled(tree))?;
        Ok(())
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order, starting after
    /// `after` when given (for paging).
    pub fn list<T: DeserializeOwned>(
        &self,
        tree: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let t = self.tree(tree)?;
        let mut out = Vec::new();
        for item in t.scan_prefix(prefix.as_bytes()) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(Self::sled(tree))?;
            if after.is_some_and(|a| k.as_ref() <= a.as_bytes()) {
                continue;
            }
            let key = String::from_utf8_lossy(&k).into_owned();
            out.push((key, Self::decode(tree, &k, &v)?));
        }
        Ok(out)
    }

    /// Number of entries in `tree`.
    pub fn count(&self, tree: &str) -> Result<usize, StoreError> {
        Ok(self.tree(tree)?.len())
    }

    /// Atomically adds `by` to the counter under `key` (a JSON number) and returns the new
    /// value, flushed.
    pub fn increment(&self, tree: &str, key: &str, by: u64) -> Result<u64, StoreError> {
        let t = self.tree(tree)?;
        let mut corrupt = None;
        let new = t
            .update_and_fetch(key.as_bytes(), |old| {
                let cur = match old {
                    None => 0,
                    Some(b) => match serde_json::from_slice::<u64>(b) {
                        Ok(n) => n,
                        Err(e) => {
                            corrupt = Some(e.to_string());
                            return old.map(<[u8]>::to_vec);
                        }
                    },
                };
                Some(cur.saturating_add(by).to_string().into_bytes())
            })
            .map_err(Self::sled(tree))?;
        if let Some(problem) = corrupt {
            return Err(StoreError::Corrupt {
                tree: tree.into(),
                key: key.into(),
                problem,
            });
        }
        t.flush().map_err(Self::sled(tree))?;
        let bytes = new.unwrap_or_default();
        Self::decode(tree, key.as_bytes(), &bytes)
    }

    /// Flushes everything (shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(|source| StoreError::Sled {
                tree: "*".into(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_reopen_and_corruption_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = Db::open(dir.path()).unwrap();
            db.put("devices", "d1", &serde_json::json!({"a": 1}))
                .unwrap();
            db.put("devices", "d2", &serde_json::json!({"a": 2}))
                .unwrap();
            assert_eq!(db.increment("counters", "d1", 5).unwrap(), 5);
            assert_eq!(db.increment("counters", "d1", 1).unwrap(), 6);
        }
        let db = Db::open(dir.path()).unwrap();
        let all: Vec<(String, serde_json::Value)> = db.list("devices", "", None, 10).unwrap();
        assert_eq!(all.len(), 2);
        let page: Vec<(String, serde_json::Value)> =
            db.list("devices", "", Some("d1"), 10).unwrap();
        assert_eq!(page[0].0, "d2");
        assert_eq!(db.increment("counters", "d1", 0).unwrap(), 6);
        db.tree("devices")
            .unwrap()
            .insert("d3", b"{not json".as_slice())
            .unwrap();
        let e = db
            .get::<serde_json::Value>("devices", "d3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tree devices, key \"d3\""), "{e}");
    }
}
