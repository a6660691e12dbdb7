//! Trust: ed25519 keys, the root-signed keyring of signing keys, and the one function that
//! decides whether a signature over some bytes is acceptable for a model name.
//!
//! Devices hold the root public key only. A bundle is acceptable when its manifest signature
//! verifies (`verify_strict`) under a key that is, at verification time:
//! - the root key itself, when the device has no keyring (small deployments), or
//! - a keyring key that is not revoked, not past its `not_after`, and allowed for the
//!   bundle's model name, when the device has a keyring. The keyring is itself valid only
//!   when root signed its canonical bytes, its format is known, and its version is not lower
//!   than the highest version the caller has seen.

use std::fmt;
use std::io::Write;
use std::path::Path;

use base64::Engine as _;
use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Keyring document format this code reads and writes.
pub const KEYRING_FORMAT: u32 = 1;
/// Domain-separation prefix of keyring signatures.
const KEYRING_CONTEXT: &[u8] = b"edge-ml keyring v1\n";
/// Largest key or keyring file read (bytes).
pub const MAX_TRUST_FILE_BYTES: u64 = 1024 * 1024;
const SECRET_KIND: &str = "edge-ml-ed25519-secret";
const PUBLIC_KIND: &str = "edge-ml-ed25519-public";

/// Why a key, keyring or signature is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("invalid key: {0}")]
    Key(String),
    #[error("unknown key id {key_id} ({})", match keyring {
        Some(v) => format!("not in keyring version {v}"),
        None => "not the root key, and there is no keyring".to_string(),
    })]
    UnknownKey {
        key_id: String,
        keyring: Option<u64>,
    },
    #[error("key {key_id} is revoked in keyring version {version}")]
    Revoked { key_id: String, version: u64 },
    #[error("key {key_id} expired at {not_after}")]
    Expired { key_id: String, not_after: String },
    #[error("key {key_id} may not sign model {model:?} (allowed: {allowed})")]
    ModelNotAllowed {
        key_id: String,
        model: String,
        allowed: String,
    },
    #[error("bad signature by key {key_id}: {reason}")]
    BadSignature { key_id: String, reason: String },
    #[error(
        "signed by the root key {key_id}, but this verifier has a keyring: bundles must be signed by a keyring key"
    )]
    RootWithKeyring { key_id: String },
    #[error("keyring: {0}")]
    Keyring(String),
    #[error("keyring version {version} is older than version {seen} already seen")]
    KeyringRollback { version: u64, seen: u64 },
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// A key id: the first 16 hex digits of the SHA-256 of the 32-byte public key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> KeyId {
        let digest = Sha256::digest(key.as_bytes());
        KeyId(hex(&digest[..8]))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A public key with its id.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub id: KeyId,
    pub key: VerifyingKey,
}

/// A secret signing key with its id.
pub struct SecretKey {
    pub id: KeyId,
    key: SigningKey,
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({})", self.id)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    kind: String,
    key_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_key: Option<String>,
}

/// A detached signature: who signed, and the 64 signature bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    pub key_id: String,
    pub algorithm: String,
    /// Base64 of the 64-byte ed25519 signature.
    pub signature: String,
}

fn decode_public(text: &str) -> Result<PublicKey, TrustError> {
    let bytes = b64()
        .decode(text.trim())
        .map_err(|e| TrustError::Key(format!("public key is not base64: {e}")))?;
    let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        TrustError::Key(format!(
            "public key has {} bytes, ed25519 needs 32",
            bytes.len()
        ))
    })?;
    let key = VerifyingKey::from_bytes(&arr)
        .map_err(|e| TrustError::Key(format!("not an ed25519 public key: {e}")))?;
    if key.is_weak() {
        return Err(TrustError::Key("weak (small-order) public key".into()));
    }
    Ok(PublicKey {
        id: KeyId::of(&key),
        key,
    })
}

fn read_capped(path: &Path) -> Result<Vec<u8>, TrustError> {
    let io = |source| TrustError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut buf = Vec::new();
    use std::io::Read;
    file.take(MAX_TRUST_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() as u64 > MAX_TRUST_FILE_BYTES {
        return Err(TrustError::File {
            path: path.display().to_string(),
            message: format!("larger than the {MAX_TRUST_FILE_BYTES}-byte limit"),
        });
    }
    Ok(buf)
}

impl PublicKey {
    /// The base64 of the 32 key bytes.
    pub fn to_base64(&self) -> String {
        b64().encode(self.key.as_bytes())
    }

    pub fn from_base64(text: &str) -> Result<PublicKey, TrustError> {
        decode_public(text)
    }

    /// Parses a `.pub` file's contents.
    pub fn parse(bytes: &[u8]) -> Result<PublicKey, TrustError> {
        let file: KeyFile = serde_json::from_slice(bytes)
            .map_err(|e| TrustError::Key(format!("not a public key file: {e}")))?;
        if file.kind != PUBLIC_KIND {
            return Err(TrustError::Key(format!(
                "kind is {:?}, expected {PUBLIC_KIND:?}",
                file.kind
            )));
        }
        let text = file
            .public_key
            .ok_or_else(|| TrustError::Key("field public_key is missing".into()))?;
        let key = decode_public(&text)?;
        if key.id.as_str() != file.key_id {
            return Err(TrustError::Key(format!(
                "key_id {} does not match the key (its id is {})",
                file.key_id, key.id
            )));
        }
        Ok(key)
    }

    /// Reads a `.pub` file.
    pub fn load(path: &Path) -> Result<PublicKey, TrustError> {
        let bytes = read_capped(path)?;
        PublicKey::parse(&bytes).map_err(|e| TrustError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The `.pub` file contents.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        let file = KeyFile {
            kind: PUBLIC_KIND.into(),
            key_id: self.id.to_string(),
            public_key: Some(self.to_base64()),
            secret_key: None,
        };
        let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Verifies `sig` over `message` with `verify_strict`.
    pub fn verify(&self, message: &[u8], sig: &SignatureEntry) -> Result<(), TrustError> {
        let bad = |reason: String| TrustError::BadSignature {
            key_id: self.id.to_string(),
            reason,
        };
        if sig.algorithm != "ed25519" {
            return Err(bad(format!("unknown algorithm {:?}", sig.algorithm)));
        }
        let bytes = b64()
            .decode(sig.signature.trim())
            .map_err(|e| bad(format!("signature is not base64: {e}")))?;
        let arr: [u8; 64] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| bad(format!("signature has {} bytes, expected 64", bytes.len())))?;
        let signature = Signature::from_bytes(&arr);
        self.key
            .verify_strict(message, &signature)
            .map_err(|_| bad("signature does not match the signed bytes".into()))
    }
}

impl SecretKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<SecretKey, TrustError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| TrustError::Key(format!("no randomness from the OS: {e}")))?;
        Ok(SecretKey::from_seed(seed))
    }

    pub fn from_seed(seed: [u8; 32]) -> SecretKey {
        let key = SigningKey::from_bytes(&seed);
        SecretKey {
            id: KeyId::of(&key.verifying_key()),
            key,
        }
    }

    pub fn public(&self) -> PublicKey {
        PublicKey {
            id: self.id.clone(),
            key: self.key.verifying_key(),
        }
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> SignatureEntry {
        use ed25519_dalek::Signer;
        SignatureEntry {
            key_id: self.id.to_string(),
            algorithm: "ed25519".into(),
            signature: b64().encode(self.key.sign(message).to_bytes()),
        }
    }

    /// Parses a `.key` file's contents.
    pub fn parse(bytes: &[u8]) -> Result<SecretKey, TrustError> {
        let file: KeyFile = serde_json::from_slice(bytes)
            .map_err(|e| TrustError::Key(format!("not a secret key file: {e}")))?;
        if file.kind != SECRET_KIND {
            return Err(TrustError::Key(format!(
                "kind is {:?}, expected {SECRET_KIND:?}",
                file.kind
            )));
        }
        let text = file
            .secret_key
            .ok_or_else(|| TrustError::Key("field secret_key is missing".into()))?;
        let bytes = b64()
            .decode(text.trim())
            .map_err(|e| TrustError::Key(format!("secret key is not base64: {e}")))?;
        let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            TrustError::Key(format!("secret key has {} bytes, expected 32", bytes.len()))
        })?;
        let key = SecretKey::from_seed(seed);
        if key.id.as_str() != file.key_id {
            return Err(TrustError::Key(format!(
                "key_id {} does not match the key (its id is {})",
                file.key_id, key.id
            )));
        }
        Ok(key)
    }

    /// Reads a `.key` file.
    pub fn load(path: &Path) -> Result<SecretKey, TrustError> {
        let bytes = read_capped(path)?;
        SecretKey::parse(&bytes).map_err(|e| TrustError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The `.key` file contents (write them with mode 0600).
    pub fn to_file_bytes(&self) -> Vec<u8> {
        let file = KeyFile {
            kind: SECRET_KIND.into(),
            key_id: self.id.to_string(),
            public_key: None,
            secret_key: Some(b64().encode(self.key.to_bytes())),
        };
        let mut out = serde_json::to_vec_pretty(&file).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// One signing key in a keyring (wire type, keyring format 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub key_id: String,
    /// Base64 of the 32-byte ed25519 public key.
    pub public_key: String,
    /// Model names this key may sign: exact names, or a prefix ending in `*` (`*` = any).
    pub models: Vec<String>,
    /// RFC 3339 time after which signatures by this key are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<String>,
    #[serde(default)]
    pub revoked: bool,
}

/// The signed part of a keyring (wire type, keyring format 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringBody {
    pub format: u32,
    /// Monotonic: a device refuses a keyring older than the newest it has seen.
    pub version: u64,
    /// RFC 3339 creation time of this version.
    pub created: String,
    pub keys: Vec<KeyEntry>,
}

/// A keyring file: the body and root's signatures over its canonical bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyringFile {
    pub signed: serde_json::Value,
    #[serde(default)]
    pub signatures: Vec<SignatureEntry>,
}

/// Canonical JSON: objects with keys sorted by bytes, no whitespace, integers only.
pub fn canonical_json(value: &serde_json::Value, out: &mut Vec<u8>) -> Result<(), TrustError> {
    use serde_json::Value;
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Number(n) => {
            if n.is_f64() {
                return Err(TrustError::Keyring(format!(
                    "non-integer number {n} (canonical form allows integers only)"
                )));
            }
            out.extend_from_slice(n.to_string().as_bytes());
        }
        Value::String(s) => {
            serde_json::to_writer(&mut *out, s).map_err(|e| TrustError::Keyring(e.to_string()))?
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k)
                    .map_err(|e| TrustError::Keyring(e.to_string()))?;
                out.push(b':');
                if let Some(v) = map.get(*k) {
                    canonical_json(v, out)?;
                }
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn keyring_message(signed: &serde_json::Value) -> Result<Vec<u8>, TrustError> {
    let mut out = KEYRING_CONTEXT.to_vec();
    canonical_json(signed, &mut out)?;
    Ok(out)
}

/// Parses an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))
}

/// Formats a time as RFC 3339 (UTC, whole seconds).
pub fn format_time(t: OffsetDateTime) -> String {
    let t = t
        .to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

impl KeyringBody {
    pub fn new(version: u64, now: OffsetDateTime) -> KeyringBody {
        KeyringBody {
            format: KEYRING_FORMAT,
            version,
            created: format_time(now),
            keys: Vec::new(),
        }
    }
}

impl KeyringFile {
    /// An unsigned keyring file for `body`.
    pub fn unsigned(body: &KeyringBody) -> Result<KeyringFile, TrustError> {
        Ok(KeyringFile {
            signed: serde_json::to_value(body).map_err(|e| TrustError::Keyring(e.to_string()))?,
            signatures: Vec::new(),
        })
    }

    /// Parses a keyring file (structure only; see [`Keyring::verify`]).
    pub fn parse(bytes: &[u8]) -> Result<KeyringFile, TrustError> {
        serde_json::from_slice(bytes)
            .map_err(|e| TrustError::Keyring(format!("not a keyring file: {e}")))
    }

    pub fn load(path: &Path) -> Result<KeyringFile, TrustError> {
        let bytes = read_capped(path)?;
        KeyringFile::parse(&bytes).map_err(|e| TrustError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The body, checked for a known format (no signature check).
    pub fn body(&self) -> Result<KeyringBody, TrustError> {
        let format = self.signed.get("format").and_then(|f| f.as_u64());
        if format != Some(u64::from(KEYRING_FORMAT)) {
            return Err(TrustError::Keyring(format!(
                "unknown keyring format {} (this build reads format {KEYRING_FORMAT})",
                self.signed
                    .get("format")
                    .map_or("(missing)".to_string(), |f| f.to_string())
            )));
        }
        serde_json::from_value(self.signed.clone())
            .map_err(|e| TrustError::Keyring(format!("invalid keyring body: {e}")))
    }

    /// Replaces the body; drops signatures (the new body needs signing).
    pub fn set_body(&mut self, body: &KeyringBody) -> Result<(), TrustError> {
        self.signed = serde_json::to_value(body).map_err(|e| TrustError::Keyring(e.to_string()))?;
        self.signatures.clear();
        Ok(())
    }

    /// Signs the body with `root` (replacing any earlier signature by the same key).
    pub fn sign(&mut self, root: &SecretKey) -> Result<(), TrustError> {
        self.body()?;
        let sig = root.sign(&keyring_message(&self.signed)?);
        self.signatures.retain(|s| s.key_id != sig.key_id);
        self.signatures.push(sig);
        Ok(())
    }

    pub fn to_file_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// Writes the file atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_atomic(path, &self.to_file_bytes(), false)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, fsynced and
/// renamed into place; `secret` makes the file mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = if secret { 0o600 } else { 0o644 };
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// One usable keyring key.
#[derive(Debug, Clone)]
struct RingKey {
    key: PublicKey,
    models: Vec<String>,
    not_after: Option<OffsetDateTime>,
    not_after_text: Option<String>,
    revoked: bool,
}

/// A keyring whose root signature, format and keys were checked.
#[derive(Debug, Clone)]
pub struct Keyring {
    pub version: u64,
    keys: Vec<RingKey>,
}

impl Keyring {
    /// Checks `file` against `root`: signature, format, key entries, and `version >= seen`.
    pub fn verify(file: &KeyringFile, root: &PublicKey, seen: u64) -> Result<Keyring, TrustError> {
        let Some(sig) = file
            .signatures
            .iter()
            .find(|s| s.key_id == root.id.as_str())
        else {
            let by: Vec<&str> = file.signatures.iter().map(|s| s.key_id.as_str()).collect();
            return Err(TrustError::Keyring(if by.is_empty() {
                "not signed (run `fleetctl keyring sign`)".to_string()
            } else {
                format!(
                    "not signed by the root key {} (signed by: {})",
                    root.id,
                    by.join(", ")
                )
            }));
        };
        root.verify(&keyring_message(&file.signed)?, sig)
            .map_err(|e| TrustError::Keyring(e.to_string()))?;
        let body = file.body()?;
        if body.version < seen {
            return Err(TrustError::KeyringRollback {
                version: body.version,
                seen,
            });
        }
        let mut keys = Vec::with_capacity(body.keys.len());
        for entry in &body.keys {
            let key = decode_public(&entry.public_key)
                .map_err(|e| TrustError::Keyring(format!("key {}: {e}", entry.key_id)))?;
            if key.id.as_str() != entry.key_id {
                return Err(TrustError::Keyring(format!(
                    "key_id {} does not match its public key (id {})",
                    entry.key_id, key.id
                )));
            }
            let not_after = match &entry.not_after {
                Some(t) => Some(parse_time(t).map_err(|e| {
                    TrustError::Keyring(format!("key {}: not_after {e}", entry.key_id))
                })?),
                None => None,
            };
            keys.push(RingKey {
                key,
                models: entry.models.clone(),
                not_after,
                not_after_text: entry.not_after.clone(),
                revoked: entry.revoked,
            });
        }
        Ok(Keyring {
            version: body.version,
            keys,
        })
    }
}

/// Whether `pattern` (exact name, `prefix*`, or `*`) admits `model`.
pub fn model_allowed(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

/// What a verifier trusts: the root public key and, optionally, a verified keyring.
#[derive(Debug, Clone)]
pub struct Trust {
    pub root: PublicKey,
    pub keyring: Option<Keyring>,
}

impl Trust {
    pub fn root_only(root: PublicKey) -> Trust {
        Trust {
            root,
            keyring: None,
        }
    }

    /// Verifies `keyring` under `root` (refusing versions below `seen`).
    pub fn with_keyring(
        root: PublicKey,
        keyring: &KeyringFile,
        seen: u64,
    ) -> Result<Trust, TrustError> {
        let ring = Keyring::verify(keyring, &root, seen)?;
        Ok(Trust {
            root,
            keyring: Some(ring),
        })
    }

    /// Checks `sig` over `message` at time `now`: a known key (the root key when there is no
    /// keyring, else a keyring key), a valid strict signature, then not revoked and not
    /// expired. The caller then asks [`Signer::authorize`] for the (now authenticated) model
    /// name.
    pub fn authenticate(
        &self,
        message: &[u8],
        sig: &SignatureEntry,
        now: OffsetDateTime,
    ) -> Result<Signer, TrustError> {
        let Some(ring) = &self.keyring else {
            if sig.key_id == self.root.id.as_str() {
                self.root.verify(message, sig)?;
                return Ok(Signer {
                    key_id: self.root.id.clone(),
                    models: None,
                });
            }
            return Err(TrustError::UnknownKey {
                key_id: sig.key_id.clone(),
                keyring: None,
            });
        };
        let Some(entry) = ring.keys.iter().find(|k| k.key.id.as_str() == sig.key_id) else {
            if sig.key_id == self.root.id.as_str() {
                return Err(TrustError::RootWithKeyring {
                    key_id: sig.key_id.clone(),
                });
            }
            return Err(TrustError::UnknownKey {
                key_id: sig.key_id.clone(),
                keyring: Some(ring.version),
            });
        };
        entry.key.verify(message, sig)?;
        if entry.revoked {
            return Err(TrustError::Revoked {
                key_id: sig.key_id.clone(),
                version: ring.version,
            });
        }
        if let Some(limit) = entry.not_after {
            if now > limit {
                return Err(TrustError::Expired {
                    key_id: sig.key_id.clone(),
                    not_after: entry.not_after_text.clone().unwrap_or_default(),
                });
            }
        }
        Ok(Signer {
            key_id: entry.key.id.clone(),
            models: Some(entry.models.clone()),
        })
    }
}

/// A key whose signature verified; what it may sign.
#[derive(Debug, Clone)]
pub struct Signer {
    pub key_id: KeyId,
    /// `None` for the root key (any model).
    models: Option<Vec<String>>,
}

impl Signer {
    /// Whether this key may sign model `model`.
    pub fn authorize(&self, model: &str) -> Result<(), TrustError> {
        let Some(models) = &self.models else {
            return Ok(());
        };
        if models.iter().any(|p| model_allowed(p, model)) {
            return Ok(());
        }
        Err(TrustError::ModelNotAllowed {
            key_id: self.key_id.to_string(),
            model: model.to_string(),
            allowed: if models.is_empty() {
                "none".into()
            } else {
                models.join(", ")
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn ring(root: &SecretKey, version: u64, keys: Vec<KeyEntry>) -> KeyringFile {
        let mut body = KeyringBody::new(version, now());
        body.keys = keys;
        let mut file = KeyringFile::unsigned(&body).unwrap();
        file.sign(root).unwrap();
        file
    }

    fn entry(k: &SecretKey, models: &[&str]) -> KeyEntry {
        KeyEntry {
            key_id: k.id.to_string(),
            public_key: k.public().to_base64(),
            models: models.iter().map(|s| s.to_string()).collect(),
            not_after: None,
            revoked: false,
        }
    }

    #[test]
    fn key_files_round_trip_and_ids_are_checked() {
        let k = SecretKey::from_seed([7; 32]);
        let back = SecretKey::parse(&k.to_file_bytes()).unwrap();
        assert_eq!(back.id, k.id);
        let p = PublicKey::parse(&k.public().to_file_bytes()).unwrap();
        assert_eq!(p.id, k.id);
        let tampered = String::from_utf8(k.public().to_file_bytes())
            .unwrap()
            .replace(k.id.as_str(), "0000000000000000");
        let err = PublicKey::parse(tampered.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match"), "{err}");
        let err = PublicKey::parse(&k.to_file_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected \"edge-ml-ed25519-public\""), "{err}");
    }

    #[test]
    fn root_only_accepts_root_and_nothing_else() {
        let root = SecretKey::from_seed([1; 32]);
        let other = SecretKey::from_seed([2; 32]);
        let trust = Trust::root_only(root.public());
        let sig = root.sign(b"m");
        let signer = trust.authenticate(b"m", &sig, now()).unwrap();
        assert_eq!(signer.key_id, root.id);
        assert!(signer.authorize("anything").is_ok());
        assert!(matches!(
            trust.authenticate(b"m2", &sig, now()),
            Err(TrustError::BadSignature { .. })
        ));
        assert!(matches!(
            trust.authenticate(b"m", &other.sign(b"m"), now()),
            Err(TrustError::UnknownKey { .. })
        ));
    }

    #[test]
    fn keyring_rules() {
        let root = SecretKey::from_seed([1; 32]);
        let a = SecretKey::from_seed([2; 32]);
        let b = SecretKey::from_seed([3; 32]);
        let c = SecretKey::from_seed([4; 32]);
        let mut eb = entry(&b, &["*"]);
        eb.revoked = true;
        let mut ec = entry(&c, &["*"]);
        ec.not_after = Some("2020-01-01T00:00:00Z".into());
        let file = ring(&root, 3, vec![entry(&a, &["pump-*", "press"]), eb, ec]);
        let trust = Trust::with_keyring(root.public(), &file, 2).unwrap();
        let ok = |m: &str, k: &SecretKey| {
            trust
                .authenticate(b"x", &k.sign(b"x"), now())
                .and_then(|s| s.authorize(m))
        };
        assert!(ok("pump-7", &a).is_ok());
        assert!(ok("press", &a).is_ok());
        assert!(matches!(
            ok("pressure", &a),
            Err(TrustError::ModelNotAllowed { .. })
        ));
        assert!(matches!(ok("pump-7", &b), Err(TrustError::Revoked { .. })));
        assert!(matches!(ok("pump-7", &c), Err(TrustError::Expired { .. })));
        assert!(matches!(
            ok("pump-7", &root),
            Err(TrustError::RootWithKeyring { .. })
        ));
        // older than seen
        assert!(matches!(
            Trust::with_keyring(root.public(), &file, 4),
            Err(TrustError::KeyringRollback {
                version: 3,
                seen: 4
            })
        ));
        // signed by someone else / tampered / unsigned
        let mut forged = file.clone();
        forged.signatures.clear();
        forged.sign(&a).unwrap();
        let err = Trust::with_keyring(root.public(), &forged, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not signed by the root key"), "{err}");
        let mut tampered = file.clone();
        tampered.signed["version"] = serde_json::json!(99);
        let err = Trust::with_keyring(root.public(), &tampered, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match"), "{err}");
        let mut unknown = KeyringFile::unsigned(&KeyringBody::new(1, now())).unwrap();
        unknown.signed["format"] = serde_json::json!(2);
        assert!(unknown.sign(&root).is_err());
    }

    #[test]
    fn canonical_json_sorts_keys_and_refuses_floats() {
        let v = serde_json::json!({"b": [1, {"z": true, "a": null}], "a": "x\"y"});
        let mut out = Vec::new();
        canonical_json(&v, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":"x\"y","b":[1,{"a":null,"z":true}]}"#
        );
        assert!(canonical_json(&serde_json::json!(1.5), &mut Vec::new()).is_err());
    }
}
