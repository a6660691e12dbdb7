//! Signed directives: the instructions the fleet sends to one device (install a bundle, roll
//! a model back, ping), signed with the fleet's *directive* key, bound to one device id,
//! valid for a bounded time and numbered with a per-device counter, so a device refuses a
//! directive that was forged, meant for another device, replayed, or delivered too late.
//!
//! A directive key is an ed25519 key (a `shared::trust` key file) that is never a bundle
//! signing key: bundle keys say which *models* may run, the directive key says what a device
//! should *do* next; a leaked directive key cannot get unsigned code onto a device, and a
//! bundle key cannot command one. The device holds one or more accepted directive public keys
//! ([`DirectiveVerifier`]; several during a rotation).
//!
//! Wire form (the payload on `<prefix>/<device>/commands`): a [`SignedDirective`] envelope
//! `{"v": 1, "directive": "<directive JSON text>", "key_id": "<16 hex>", "algorithm":
//! "ed25519", "signature": "<base64>"}`. `directive` is a JSON *string* holding the
//! directive's JSON text, so any JSON library gets the exact signed text back by decoding one
//! string (no raw-byte extraction needed), and re-formatting of the envelope by a broker
//! bridge or Node-RED does not break the signature.
//!
//! Signed bytes (what a third party signs and verifies): the 18 ASCII bytes
//! `edge-directive-v1\n` (`65 64 67 65 2d 64 69 72 65 63 74 69 76 65 2d 76 31 0a`, see
//! [`SIGNING_CONTEXT`]) followed by the UTF-8 bytes of the decoded `directive` string, exactly
//! as carried. The signature is the 64-byte ed25519 signature (RFC 8032) over those bytes,
//! base64-encoded (standard alphabet, padded); `key_id` is the first 16 lowercase hex digits
//! of SHA-256 of the 32-byte public key ([`crate::trust::KeyId`]). The verifier never
//! re-serializes: it checks the carried text, then parses that same text. [`DirectiveSigner`]
//! writes the directive as canonical JSON (object keys sorted by bytes, no whitespace,
//! integers only: [`crate::trust::canonical_json`]) so the text is reproducible from the
//! directive's fields, but a verifier accepts any text whose signature checks. The prefix
//! separates the domains: a directive signature can never be taken for a bundle manifest
//! signature (a manifest is JSON, it cannot begin with `edge-directive-v1`) or a keyring
//! signature (`edge-ml keyring v1\n`), nor the reverse.
//!
//! [`DirectiveVerifier::verify`] checks, in this order, and stops at the first failure:
//! 1. the payload is at most [`MAX_PAYLOAD_BYTES`] (before any parsing);
//! 2. the envelope is JSON with `"v": 1` and exactly the five fields above;
//! 3. `algorithm` is `"ed25519"`;
//! 4. `key_id` is one of the accepted directive keys;
//! 5. the signature verifies with `verify_strict` over the signed bytes (this rejects
//!    non-canonical and small-order encodings);
//! 6. the signed text is a directive with `"v": 1`, no unknown fields, and valid fields (ids,
//!    model names, hashes, `counter >= 1`, `issued_at_ms <= expires_at_ms`, lifetime
//!    `expires_at_ms - issued_at_ms` at most [`DirectiveLimits::max_lifetime_ms`]);
//! 7. `device` equals this device's id;
//! 8. not expired: `now_ms <= expires_at_ms`;
//! 9. not issued in the future beyond the clock-skew tolerance: `issued_at_ms <= now_ms +
//!    max_clock_skew_ms`;
//! 10. fresh: `counter > last_counter`, the highest counter this device accepted before.
//!
//! Times are Unix milliseconds: `issued_at_ms`/`expires_at_ms` on the fleet's clock, `now_ms`
//! on the device's. Defaults: lifetime at most 7 days ([`MAX_LIFETIME_MS`]; the fleet should
//! use minutes to hours), clock skew 5 minutes ([`MAX_CLOCK_SKEW_MS`]).
//!
//! Counter rule: per device, strictly increasing, gaps allowed, starting at 1. The device
//! keeps the highest accepted counter durably and must persist a directive's counter
//! *before* acting on it (so a crash after acting cannot let the same directive run again);
//! see [`CounterRule`]. The fleet may derive counters from its clock ([`next_counter`]) so a
//! fleet that lost its counter store still issues counters above what devices saw.
//!
//! Directives are strict (unlike the additive-only v1 control payloads in `crate::wire`): an
//! unknown field in a signed directive could carry a condition this build would ignore, so it
//! is refused; extending a directive means a new `v`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bundle::manifest::check_model_name;
use crate::trust::{canonical_json, KeyId, PublicKey, SecretKey, SignatureEntry, TrustError};
use crate::wire::{valid_device_id, MAX_DEVICE_ID};

/// The directive format version (`"v": 1` in the envelope and in the directive).
pub const VERSION: u32 = 1;
/// Domain-separation prefix of the signed bytes.
pub const SIGNING_CONTEXT: &[u8] = b"edge-directive-v1\n";
/// The only signature algorithm.
pub const ALGORITHM: &str = "ed25519";
/// Largest signed-directive payload accepted (bytes), checked before parsing. Equal to the
/// cap on command payloads ([`crate::wire::MAX_CONTROL_BYTES`]).
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Default longest lifetime (`expires_at_ms - issued_at_ms`): 7 days.
pub const MAX_LIFETIME_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// Default tolerance for a directive issued "in the future" of the device clock: 5 minutes.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;
/// Longest directive id (bytes).
pub const MAX_ID_BYTES: usize = 128;
/// Longest rollback reason (bytes).
pub const MAX_REASON_BYTES: usize = 1024;

/// Why a directive was refused (or could not be signed). Every variant names what is wrong;
/// [`DirectiveError::event_reason`] gives the short code for the device's event.
#[derive(Debug, thiserror::Error)]
pub enum DirectiveError {
    #[error("signed directive: payload of {got} bytes exceeds the limit of {limit} bytes")]
    TooLarge { got: usize, limit: usize },
    #[error(
        "signed directive: not valid JSON, or a field is missing, unknown or mistyped: {source}"
    )]
    Envelope {
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: field \"v\" is {got}; this build reads version {VERSION} only")]
    UnsupportedVersion { what: &'static str, got: String },
    #[error("signed directive: algorithm {algorithm:?} is not supported (only \"ed25519\")")]
    UnsupportedAlgorithm { algorithm: String },
    #[error("directive signed by unknown key id {key_id:?} (accepted directive keys: {accepted})")]
    UnknownKey { key_id: String, accepted: String },
    #[error("bad signature by directive key {key_id}: {reason}")]
    BadSignature { key_id: String, reason: String },
    #[error(
        "directive (signed by {key_id}): not valid JSON, or a field is missing, unknown or mistyped: {source}"
    )]
    Directive {
        key_id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("directive: field \"{field}\": {problem}")]
    Field {
        field: &'static str,
        problem: String,
    },
    #[error("directive: expires_at_ms {expires_at_ms} is before issued_at_ms {issued_at_ms}")]
    ExpiresBeforeIssued {
        issued_at_ms: u64,
        expires_at_ms: u64,
    },
    #[error(
        "directive: lifetime of {lifetime_ms} ms (issued_at_ms to expires_at_ms) exceeds the limit of {max_ms} ms"
    )]
    LifetimeTooLong { lifetime_ms: u64, max_ms: u64 },
    #[error("directive is for device {got:?}, not this device {expected:?}")]
    OtherDevice { expected: String, got: String },
    #[error("directive expired at {expired_at_ms} ms; device time is {now_ms} ms")]
    Expired { expired_at_ms: u64, now_ms: u64 },
    #[error(
        "directive issued at {issued_at_ms} ms, more than {max_skew_ms} ms after device time {now_ms} ms (check the device and fleet clocks)"
    )]
    NotYetValid {
        issued_at_ms: u64,
        now_ms: u64,
        max_skew_ms: u64,
    },
    #[error(
        "directive counter {counter} is not above the last accepted counter {last} (replayed or out of order)"
    )]
    Replayed { counter: u64, last: u64 },
    #[error("directive: cannot encode: {reason}")]
    Encode { reason: String },
}

impl DirectiveError {
    /// The short code for the device's rejection event: `replayed`, `expired`,
    /// `not_yet_valid`, `other_device`, `bad_signature`, `unknown_key` or `malformed`
    /// (size, JSON, version, algorithm and field errors).
    pub fn event_reason(&self) -> &'static str {
        match self {
            DirectiveError::Replayed { .. } => "replayed",
            DirectiveError::Expired { .. } => "expired",
            DirectiveError::NotYetValid { .. } => "not_yet_valid",
            DirectiveError::OtherDevice { .. } => "other_device",
            DirectiveError::BadSignature { .. } => "bad_signature",
            DirectiveError::UnknownKey { .. } => "unknown_key",
            DirectiveError::TooLarge { .. }
            | DirectiveError::Envelope { .. }
            | DirectiveError::UnsupportedVersion { .. }
            | DirectiveError::UnsupportedAlgorithm { .. }
            | DirectiveError::Directive { .. }
            | DirectiveError::Field { .. }
            | DirectiveError::ExpiresBeforeIssued { .. }
            | DirectiveError::LifetimeTooLong { .. }
            | DirectiveError::Encode { .. } => "malformed",
        }
    }
}

/// What a directive tells the device to do (`"type": "install" | "rollback" | "ping"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Action {
    /// Install the bundle with this hash and size (fetched separately); its own signature is
    /// still checked under the bundle trust rules.
    Install {
        /// Model name (`[A-Za-z0-9._-]`, 1..=64 bytes).
        model: String,
        /// The bundle's human version (1..=64 bytes, no control characters).
        version: String,
        /// The bundle's release number.
        release: u64,
        /// SHA-256 of the bundle file, 64 lowercase hex digits.
        bundle_sha256: String,
        /// Size of the bundle file (bytes, at least 1).
        bundle_bytes: u64,
    },
    /// Roll `model` back: to the previous version, or to release `to_release`.
    Rollback {
        model: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_release: Option<u64>,
        /// Why (1..=[`MAX_REASON_BYTES`] bytes), recorded in the device's event.
        reason: String,
    },
    /// Liveness check. An empty struct variant (not a unit variant) so that unknown
    /// fields next to `"type": "ping"` are refused like everywhere else.
    Ping {},
}

impl Action {
    /// `install`, `rollback` or `ping`.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Install { .. } => "install",
            Action::Rollback { .. } => "rollback",
            Action::Ping {} => "ping",
        }
    }
}

/// A directive (wire type, version 1): what the signature covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directive {
    /// Always 1.
    pub v: u32,
    /// The one device this directive is for.
    pub device: String,
    /// Per device, strictly increasing (gaps allowed), at least 1.
    pub counter: u64,
    /// When the fleet issued it (Unix ms, fleet clock).
    pub issued_at_ms: u64,
    /// Last instant it may be accepted (Unix ms, inclusive).
    pub expires_at_ms: u64,
    /// Chosen by the fleet (1..=[`MAX_ID_BYTES`] bytes, no control characters); echoed in the
    /// device's reply.
    pub id: String,
    pub action: Action,
}

impl Directive {
    /// A version-1 directive valid from `issued_at_ms` for `lifetime_ms`.
    pub fn new(
        device: impl Into<String>,
        counter: u64,
        id: impl Into<String>,
        issued_at_ms: u64,
        lifetime_ms: u64,
        action: Action,
    ) -> Directive {
        Directive {
            v: VERSION,
            device: device.into(),
            counter,
            issued_at_ms,
            expires_at_ms: issued_at_ms.saturating_add(lifetime_ms),
            id: id.into(),
            action,
        }
    }

    /// The checks that need neither a clock nor device state: version, field syntax,
    /// `counter >= 1`, `issued_at_ms <= expires_at_ms`, lifetime within `max_lifetime_ms`.
    pub fn validate(&self, max_lifetime_ms: u64) -> Result<(), DirectiveError> {
        let field = |field: &'static str, problem: String| DirectiveError::Field { field, problem };
        if self.v != VERSION {
            return Err(DirectiveError::UnsupportedVersion {
                what: "directive",
                got: self.v.to_string(),
            });
        }
        if !valid_device_id(&self.device) {
            return Err(field(
                "device",
                format!(
                    "{:?} is not a valid device id (1-{MAX_DEVICE_ID} of A-Z a-z 0-9 . _ -)",
                    self.device
                ),
            ));
        }
        check_text("id", &self.id, MAX_ID_BYTES)?;
        if self.counter == 0 {
            return Err(field("counter", "must be at least 1".into()));
        }
        if self.issued_at_ms > self.expires_at_ms {
            return Err(DirectiveError::ExpiresBeforeIssued {
                issued_at_ms: self.issued_at_ms,
                expires_at_ms: self.expires_at_ms,
            });
        }
        let lifetime_ms = self.expires_at_ms - self.issued_at_ms;
        if lifetime_ms > max_lifetime_ms {
            return Err(DirectiveError::LifetimeTooLong {
                lifetime_ms,
                max_ms: max_lifetime_ms,
            });
        }
        match &self.action {
            Action::Install {
                model,
                version,
                release: _,
                bundle_sha256,
                bundle_bytes,
            } => {
                check_model_name(model).map_err(|p| field("action.model", p))?;
                check_text("action.version", version, 64)?;
                if !is_sha256_hex(bundle_sha256) {
                    return Err(field(
                        "action.bundle_sha256",
                        format!("{bundle_sha256:?} is not 64 lowercase hex digits"),
                    ));
                }
                if *bundle_bytes == 0 {
                    return Err(field("action.bundle_bytes", "must be at least 1".into()));
                }
            }
            Action::Rollback { model, reason, .. } => {
                check_model_name(model).map_err(|p| field("action.model", p))?;
                check_text("action.reason", reason, MAX_REASON_BYTES)?;
            }
            Action::Ping {} => {}
        }
        Ok(())
    }
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), DirectiveError> {
    if value.is_empty() || value.len() > max {
        return Err(DirectiveError::Field {
            field,
            problem: format!("must be 1 to {max} bytes, got {}", value.len()),
        });
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(DirectiveError::Field {
            field,
            problem: format!("contains the control character {c:?}"),
        });
    }
    Ok(())
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The envelope (wire type, version 1): the directive's exact JSON text and the signature
/// over [`SIGNING_CONTEXT`] followed by that text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedDirective {
    /// Always 1.
    pub v: u32,
    /// The directive's JSON text, exactly as signed.
    pub directive: String,
    /// Id of the directive key that signed ([`KeyId`]).
    pub key_id: String,
    /// Always `"ed25519"`.
    pub algorithm: String,
    /// Base64 (standard, padded) of the 64-byte ed25519 signature.
    pub signature: String,
}

impl SignedDirective {
    /// The exact bytes the signature covers: [`SIGNING_CONTEXT`] then the directive text.
    pub fn signed_bytes(&self) -> Vec<u8> {
        signed_bytes(&self.directive)
    }

    /// The MQTT payload (compact JSON).
    pub fn to_payload(&self) -> Vec<u8> {
        // a struct of strings and an integer always serializes; never panic regardless
        serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec())
    }

    /// Parses an envelope: size cap, `"v": 1`, exactly the five fields. No signature check.
    pub fn parse(payload: &[u8]) -> Result<SignedDirective, DirectiveError> {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(DirectiveError::TooLarge {
                got: payload.len(),
                limit: MAX_PAYLOAD_BYTES,
            });
        }
        check_version("signed directive", payload)
            .map_err(|e| e.unwrap_or_else(|source| DirectiveError::Envelope { source }))?;
        serde_json::from_slice(payload).map_err(|source| DirectiveError::Envelope { source })
    }
}

fn signed_bytes(directive: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(SIGNING_CONTEXT.len() + directive.len());
    out.extend_from_slice(SIGNING_CONTEXT);
    out.extend_from_slice(directive.as_bytes());
    out
}

/// `Ok` when `json` has `"v": 1`; `Err(Ok(e))` for a missing or other version,
/// `Err(Err(json error))` when it is not a JSON object.
fn check_version(
    what: &'static str,
    json: &[u8],
) -> Result<(), Result<DirectiveError, serde_json::Error>> {
    #[derive(Deserialize)]
    struct Probe {
        v: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(json).map_err(Err)?;
    match probe.v {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => Ok(()),
        other => Err(Ok(DirectiveError::UnsupportedVersion {
            what,
            got: other.map_or_else(|| "missing".to_string(), |v| v.to_string()),
        })),
    }
}

/// Signs directives with the fleet's directive key.
#[derive(Debug)]
pub struct DirectiveSigner {
    key: SecretKey,
}

impl DirectiveSigner {
    pub fn new(key: SecretKey) -> DirectiveSigner {
        DirectiveSigner { key }
    }

    /// Reads a `shared::trust` secret key file (`.key`).
    pub fn load(path: &std::path::Path) -> Result<DirectiveSigner, TrustError> {
        SecretKey::load(path).map(DirectiveSigner::new)
    }

    /// Parses a `shared::trust` secret key file's contents.
    pub fn from_file_bytes(bytes: &[u8]) -> Result<DirectiveSigner, TrustError> {
        SecretKey::parse(bytes).map(DirectiveSigner::new)
    }

    pub fn key_id(&self) -> &KeyId {
        &self.key.id
    }

    /// The public key devices must accept ([`DirectiveVerifier::new`]).
    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// Checks `directive` ([`Directive::validate`] with [`MAX_LIFETIME_MS`]), writes it as
    /// canonical JSON and signs [`SIGNING_CONTEXT`] + that text.
    pub fn sign(&self, directive: &Directive) -> Result<SignedDirective, DirectiveError> {
        directive.validate(MAX_LIFETIME_MS)?;
        let encode = |reason: String| DirectiveError::Encode { reason };
        let value = serde_json::to_value(directive).map_err(|e| encode(e.to_string()))?;
        let mut text = Vec::new();
        canonical_json(&value, &mut text).map_err(|e| encode(e.to_string()))?;
        let text = String::from_utf8(text).map_err(|e| encode(e.to_string()))?;
        let SignatureEntry {
            key_id,
            algorithm,
            signature,
        } = self.key.sign(&signed_bytes(&text));
        Ok(SignedDirective {
            v: VERSION,
            directive: text,
            key_id,
            algorithm,
            signature,
        })
    }

    /// [`DirectiveSigner::sign`], then the MQTT payload.
    pub fn sign_payload(&self, directive: &Directive) -> Result<Vec<u8>, DirectiveError> {
        self.sign(directive).map(|s| s.to_payload())
    }
}

/// Device-side bounds on directive times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectiveLimits {
    /// Longest accepted `expires_at_ms - issued_at_ms`.
    pub max_lifetime_ms: u64,
    /// How far `issued_at_ms` may lie after the device's `now_ms`.
    pub max_clock_skew_ms: u64,
}

impl Default for DirectiveLimits {
    fn default() -> DirectiveLimits {
        DirectiveLimits {
            max_lifetime_ms: MAX_LIFETIME_MS,
            max_clock_skew_ms: MAX_CLOCK_SKEW_MS,
        }
    }
}

/// Verifies signed directives under the accepted directive keys (key id -> key; several
/// during a rotation: add the new key to devices, switch the fleet, then remove the old).
#[derive(Debug, Clone)]
pub struct DirectiveVerifier {
    keys: BTreeMap<String, PublicKey>,
    limits: DirectiveLimits,
}

impl DirectiveVerifier {
    /// A verifier accepting `keys`, with the default [`DirectiveLimits`]. With no keys every
    /// directive is refused ([`DirectiveError::UnknownKey`]).
    pub fn new(keys: impl IntoIterator<Item = PublicKey>) -> DirectiveVerifier {
        DirectiveVerifier {
            keys: keys
                .into_iter()
                .map(|k| (k.id.as_str().to_string(), k))
                .collect(),
            limits: DirectiveLimits::default(),
        }
    }

    pub fn with_limits(mut self, limits: DirectiveLimits) -> DirectiveVerifier {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> DirectiveLimits {
        self.limits
    }

    /// Accepts `key` too.
    pub fn add_key(&mut self, key: PublicKey) {
        self.keys.insert(key.id.as_str().to_string(), key);
    }

    /// Stops accepting the key `key_id`; whether it was accepted.
    pub fn remove_key(&mut self, key_id: &str) -> bool {
        self.keys.remove(key_id).is_some()
    }

    /// The accepted key ids, sorted.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.keys().map(String::as_str).collect()
    }

    /// Refuses a configuration in which a directive key is also one of `bundle_keys` (for
    /// example the trust root's id): the two roles need separate keys.
    pub fn check_distinct_from<'a>(
        &self,
        bundle_keys: impl IntoIterator<Item = &'a KeyId>,
    ) -> Result<(), TrustError> {
        for id in bundle_keys {
            if self.keys.contains_key(id.as_str()) {
                return Err(TrustError::Key(format!(
                    "directive key {id} is also a bundle signing key; directives need their own key"
                )));
            }
        }
        Ok(())
    }

    /// Verifies `payload` for device `device_id` at device time `now_ms`, given the highest
    /// counter this device accepted so far (`last_counter`, 0 if none), in the order listed
    /// in the module documentation. On success the caller persists `counter` before acting.
    pub fn verify(
        &self,
        payload: &[u8],
        device_id: &str,
        now_ms: u64,
        last_counter: u64,
    ) -> Result<Directive, DirectiveError> {
        let envelope = SignedDirective::parse(payload)?;
        if envelope.algorithm != ALGORITHM {
            return Err(DirectiveError::UnsupportedAlgorithm {
                algorithm: envelope.algorithm,
            });
        }
        let Some(key) = self.keys.get(&envelope.key_id) else {
            return Err(DirectiveError::UnknownKey {
                key_id: envelope.key_id,
                accepted: if self.keys.is_empty() {
                    "none".into()
                } else {
                    self.key_ids().join(", ")
                },
            });
        };
        let entry = SignatureEntry {
            key_id: envelope.key_id.clone(),
            algorithm: envelope.algorithm.clone(),
            signature: envelope.signature.clone(),
        };
        // PublicKey::verify: base64 of exactly 64 bytes, then verify_strict
        key.verify(&envelope.signed_bytes(), &entry)
            .map_err(|e| DirectiveError::BadSignature {
                key_id: envelope.key_id.clone(),
                reason: match e {
                    TrustError::BadSignature { reason, .. } => reason,
                    other => other.to_string(),
                },
            })?;

        let text = envelope.directive.as_bytes();
        check_version("directive", text).map_err(|e| {
            e.unwrap_or_else(|source| DirectiveError::Directive {
                key_id: envelope.key_id.clone(),
                source,
            })
        })?;
        let directive: Directive =
            serde_json::from_slice(text).map_err(|source| DirectiveError::Directive {
                key_id: envelope.key_id.clone(),
                source,
            })?;
        directive.validate(self.limits.max_lifetime_ms)?;
        if directive.device != device_id {
            return Err(DirectiveError::OtherDevice {
                expected: device_id.to_string(),
                got: directive.device,
            });
        }
        if now_ms > directive.expires_at_ms {
            return Err(DirectiveError::Expired {
                expired_at_ms: directive.expires_at_ms,
                now_ms,
            });
        }
        if directive.issued_at_ms > now_ms.saturating_add(self.limits.max_clock_skew_ms) {
            return Err(DirectiveError::NotYetValid {
                issued_at_ms: directive.issued_at_ms,
                now_ms,
                max_skew_ms: self.limits.max_clock_skew_ms,
            });
        }
        CounterRule::new(last_counter).check(directive.counter)?;
        Ok(directive)
    }
}

/// The per-device counter rule: a directive is fresh only when its counter is strictly above
/// the highest counter accepted before. Holds that highest counter (0 = none yet); the agent
/// persists [`CounterRule::last`] itself, durably, before acting on a directive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterRule {
    last: u64,
}

impl CounterRule {
    /// The rule after `last` was the highest accepted counter (0: none yet).
    pub fn new(last: u64) -> CounterRule {
        CounterRule { last }
    }

    pub fn last(&self) -> u64 {
        self.last
    }

    /// `Ok` when `counter > last`, else [`DirectiveError::Replayed`].
    pub fn check(&self, counter: u64) -> Result<(), DirectiveError> {
        if counter > self.last {
            Ok(())
        } else {
            Err(DirectiveError::Replayed {
                counter,
                last: self.last,
            })
        }
    }

    /// [`CounterRule::check`], then records `counter` as the highest accepted.
    pub fn accept(&mut self, counter: u64) -> Result<(), DirectiveError> {
        self.check(counter)?;
        self.last = counter;
        Ok(())
    }
}

/// Fleet side: the counter for a device's next directive, `max(last_issued + 1, now_ms)`.
/// Tied to the clock so a fleet that lost its counter store (and restarts from 0) still
/// issues counters above those devices accepted, as long as its clock did not go back. At
/// `u64::MAX` it stays there (devices then refuse it as replayed rather than wrap).
pub fn next_counter(last_issued: u64, now_ms: u64) -> u64 {
    last_issued.saturating_add(1).max(now_ms)
}

/// Whether a commands-topic payload is a signed-directive envelope (a JSON object with a
/// `directive` member, within [`MAX_PAYLOAD_BYTES`]) rather than an unsigned
/// `crate::wire::Command`. Unauthenticated: for routing only.
pub fn is_signed_directive(payload: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        directive: Option<serde::de::IgnoredAny>,
    }
    payload.len() <= MAX_PAYLOAD_BYTES
        && serde_json::from_slice::<Probe>(payload).is_ok_and(|p| p.directive.is_some())
}

/// The `id` inside a signed-directive payload, WITHOUT verifying anything: only for echoing
/// in the reply to a directive that [`DirectiveVerifier::verify`] refused. `None` when it
/// cannot be read or is not a valid id.
pub fn unverified_id(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Probe {
        id: String,
    }
    let envelope = SignedDirective::parse(payload).ok()?;
    let probe: Probe = serde_json::from_str(&envelope.directive).ok()?;
    check_text("id", &probe.id, MAX_ID_BYTES).ok()?;
    Some(probe.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use ed25519_dalek::{Signature, Verifier as _};

    const NOW: u64 = 1_767_225_600_000;
    const DEV: &str = "press-07";

    fn directive_key() -> SecretKey {
        SecretKey::from_seed([11; 32])
    }

    fn bundle_key() -> SecretKey {
        SecretKey::from_seed([22; 32])
    }

    fn signer() -> DirectiveSigner {
        DirectiveSigner::new(directive_key())
    }

    fn verifier() -> DirectiveVerifier {
        DirectiveVerifier::new([directive_key().public()])
    }

    fn install() -> Action {
        Action::Install {
            model: "pdm-failure".into(),
            version: "1.3.0".into(),
            release: 4,
            bundle_sha256: "9f".repeat(32),
            bundle_bytes: 123_456,
        }
    }

    fn directive(counter: u64) -> Directive {
        Directive::new(DEV, counter, "d-0001", NOW, 60 * 60 * 1000, install())
    }

    fn payload(d: &Directive) -> Vec<u8> {
        signer().sign_payload(d).unwrap()
    }

    /// An envelope over arbitrary directive text, signed by `key` (bypasses validation).
    fn sign_text(key: &SecretKey, text: &str) -> Vec<u8> {
        let sig = key.sign(&signed_bytes(text));
        SignedDirective {
            v: 1,
            directive: text.into(),
            key_id: sig.key_id,
            algorithm: sig.algorithm,
            signature: sig.signature,
        }
        .to_payload()
    }

    fn json(p: &[u8]) -> serde_json::Value {
        serde_json::from_slice(p).unwrap()
    }

    #[test]
    fn sign_then_verify_every_action() {
        let actions = [
            install(),
            Action::Rollback {
                model: "pdm-failure".into(),
                to_release: Some(3),
                reason: "nan rate 12% on wave 1".into(),
            },
            Action::Rollback {
                model: "pdm-failure".into(),
                to_release: None,
                reason: "operator".into(),
            },
            Action::Ping {},
        ];
        for (i, action) in actions.into_iter().enumerate() {
            let counter = 10 + i as u64;
            let d = Directive::new(DEV, counter, format!("d-{i}"), NOW, 1000, action);
            let got = verifier()
                .verify(&payload(&d), DEV, NOW, counter - 1)
                .unwrap();
            assert_eq!(got, d);
        }
    }

    #[test]
    fn signed_bytes_are_prefix_plus_carried_json() {
        let d = directive(7);
        let p = payload(&d);
        let v = json(&p);
        let obj = v.as_object().unwrap();
        let mut fields: Vec<&str> = obj.keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            ["algorithm", "directive", "key_id", "signature", "v"]
        );
        assert_eq!(v["v"], 1);
        assert_eq!(v["algorithm"], "ed25519");
        assert_eq!(v["key_id"], directive_key().id.as_str());
        let text = v["directive"].as_str().unwrap();
        // canonical: sorted keys, no whitespace
        assert_eq!(
            text,
            format!(
                r#"{{"action":{{"bundle_bytes":123456,"bundle_sha256":"{}","model":"pdm-failure","release":4,"type":"install","version":"1.3.0"}},"counter":7,"device":"press-07","expires_at_ms":{},"id":"d-0001","issued_at_ms":{NOW},"v":1}}"#,
                "9f".repeat(32),
                NOW + 3_600_000
            )
        );
        // a third-party check with ed25519-dalek alone
        let mut message = b"edge-directive-v1\n".to_vec();
        message.extend_from_slice(text.as_bytes());
        let sig_bytes = base64::engine::general_purpose::STANDARD
            .decode(v["signature"].as_str().unwrap())
            .unwrap();
        let sig = Signature::from_slice(&sig_bytes).unwrap();
        let vk = directive_key().public().key;
        vk.verify_strict(&message, &sig).unwrap();
        // and not over the bare JSON (the prefix is part of the signed bytes)
        assert!(vk.verify(text.as_bytes(), &sig).is_err());
        assert_eq!(SignedDirective::parse(&p).unwrap().signed_bytes(), message);
    }

    #[test]
    fn verifies_the_carried_text_not_a_reserialization() {
        // whitespace and key order differ from what the signer would write: still valid,
        // because the signature covers the carried text
        let text = format!(
            "{{ \"v\": 1, \"id\": \"d-x\", \"device\": \"{DEV}\", \"counter\": 3,\n \"issued_at_ms\": {NOW}, \"expires_at_ms\": {}, \"action\": {{\"type\": \"ping\"}} }}",
            NOW + 1000
        );
        let got = verifier()
            .verify(&sign_text(&directive_key(), &text), DEV, NOW, 2)
            .unwrap();
        assert_eq!(got.id, "d-x");
        assert_eq!(got.action, Action::Ping {});
    }

    #[test]
    fn replayed_equal_and_lower_counter() {
        let p = payload(&directive(5));
        let err = verifier().verify(&p, DEV, NOW, 5).unwrap_err();
        assert!(
            matches!(
                err,
                DirectiveError::Replayed {
                    counter: 5,
                    last: 5
                }
            ),
            "{err}"
        );
        assert_eq!(err.event_reason(), "replayed");
        let err = verifier().verify(&p, DEV, NOW, 9).unwrap_err();
        assert!(
            matches!(
                err,
                DirectiveError::Replayed {
                    counter: 5,
                    last: 9
                }
            ),
            "{err}"
        );
        assert!(verifier().verify(&p, DEV, NOW, 4).is_ok());
    }

    #[test]
    fn expired_at_the_first_millisecond_after_expiry() {
        let d = directive(1);
        let p = payload(&d);
        assert!(verifier().verify(&p, DEV, d.expires_at_ms, 0).is_ok());
        let err = verifier()
            .verify(&p, DEV, d.expires_at_ms + 1, 0)
            .unwrap_err();
        assert!(
            matches!(err, DirectiveError::Expired { expired_at_ms, now_ms }
                if expired_at_ms == d.expires_at_ms && now_ms == d.expires_at_ms + 1),
            "{err}"
        );
        assert_eq!(err.event_reason(), "expired");
    }

    #[test]
    fn issued_in_the_future_beyond_the_skew_tolerance() {
        let p = payload(&directive(1));
        // device clock 5 minutes behind: tolerated
        assert!(verifier()
            .verify(&p, DEV, NOW - MAX_CLOCK_SKEW_MS, 0)
            .is_ok());
        let err = verifier()
            .verify(&p, DEV, NOW - MAX_CLOCK_SKEW_MS - 1, 0)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DirectiveError::NotYetValid {
                    issued_at_ms: NOW,
                    max_skew_ms: MAX_CLOCK_SKEW_MS,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.event_reason(), "not_yet_valid");
        // a device configured with a larger tolerance accepts it
        let lenient = verifier().with_limits(DirectiveLimits {
            max_clock_skew_ms: 60 * 60 * 1000,
            ..DirectiveLimits::default()
        });
        assert!(lenient
            .verify(&p, DEV, NOW - MAX_CLOCK_SKEW_MS - 1, 0)
            .is_ok());
    }

    #[test]
    fn other_device() {
        let p = payload(&directive(1));
        let err = verifier().verify(&p, "press-08", NOW, 0).unwrap_err();
        assert!(
            matches!(&err, DirectiveError::OtherDevice { expected, got }
                if expected == "press-08" && got == DEV),
            "{err}"
        );
        assert_eq!(err.event_reason(), "other_device");
    }

    #[test]
    fn tampered_directive_byte_is_bad_signature() {
        let p = payload(&directive(5));
        let mut v = json(&p);
        let text = v["directive"]
            .as_str()
            .unwrap()
            .replace("\"counter\":5", "\"counter\":6");
        v["directive"] = serde_json::Value::String(text);
        let err = verifier()
            .verify(&serde_json::to_vec(&v).unwrap(), DEV, NOW, 0)
            .unwrap_err();
        assert!(
            matches!(&err, DirectiveError::BadSignature { key_id, .. } if key_id == directive_key().id.as_str()),
            "{err}"
        );
        assert_eq!(err.event_reason(), "bad_signature");

        // a single flipped byte anywhere in the carried text
        let text = json(&p)["directive"].as_str().unwrap().to_string();
        for i in 0..text.len() {
            let mut bytes = text.clone().into_bytes();
            bytes[i] ^= 0x01;
            let Ok(t) = String::from_utf8(bytes) else {
                continue;
            };
            let mut v = json(&p);
            v["directive"] = serde_json::Value::String(t);
            let err = verifier()
                .verify(&serde_json::to_vec(&v).unwrap(), DEV, NOW, 0)
                .unwrap_err();
            assert!(
                matches!(err, DirectiveError::BadSignature { .. }),
                "byte {i}: {err}"
            );
        }
    }

    #[test]
    fn bad_signature_encodings_and_forged_key_id() {
        let p = payload(&directive(1));
        let with = |field: &str, value: &str| {
            let mut v = json(&p);
            v[field] = serde_json::Value::String(value.into());
            serde_json::to_vec(&v).unwrap()
        };
        for sig in [
            "not base64!",
            "AAAA",
            &base64::engine::general_purpose::STANDARD.encode([0u8; 64]),
        ] {
            let err = verifier()
                .verify(&with("signature", sig), DEV, NOW, 0)
                .unwrap_err();
            assert!(
                matches!(err, DirectiveError::BadSignature { .. }),
                "{sig}: {err}"
            );
        }
        // signed by the bundle key but claiming the directive key's id
        let forged = sign_text(&bundle_key(), json(&p)["directive"].as_str().unwrap());
        let mut v = json(&forged);
        v["key_id"] = serde_json::Value::String(directive_key().id.to_string());
        let err = verifier()
            .verify(&serde_json::to_vec(&v).unwrap(), DEV, NOW, 0)
            .unwrap_err();
        assert!(matches!(err, DirectiveError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn bundle_key_signature_is_unknown_key() {
        let bundle_signer = DirectiveSigner::new(bundle_key());
        let p = bundle_signer.sign_payload(&directive(1)).unwrap();
        let err = verifier().verify(&p, DEV, NOW, 0).unwrap_err();
        assert!(
            matches!(&err, DirectiveError::UnknownKey { key_id, accepted }
                if key_id == bundle_key().id.as_str() && accepted == directive_key().id.as_str()),
            "{err}"
        );
        assert_eq!(err.event_reason(), "unknown_key");
        let err = DirectiveVerifier::new([])
            .verify(&p, DEV, NOW, 0)
            .unwrap_err();
        assert!(
            matches!(&err, DirectiveError::UnknownKey { accepted, .. } if accepted == "none"),
            "{err}"
        );
        // a bundle signature (no prefix) over the directive text does not verify either
        let text = json(&payload(&directive(1)))["directive"]
            .as_str()
            .unwrap()
            .to_string();
        let sig = directive_key().sign(text.as_bytes());
        let mut v = json(&payload(&directive(1)));
        v["signature"] = serde_json::Value::String(sig.signature);
        let err = verifier()
            .verify(&serde_json::to_vec(&v).unwrap(), DEV, NOW, 0)
            .unwrap_err();
        assert!(matches!(err, DirectiveError::BadSignature { .. }), "{err}");
    }

    #[test]
    fn wrong_algorithm() {
        let mut v = json(&payload(&directive(1)));
        v["algorithm"] = serde_json::Value::String("rsa".into());
        let err = verifier()
            .verify(&serde_json::to_vec(&v).unwrap(), DEV, NOW, 0)
            .unwrap_err();
        assert!(
            matches!(&err, DirectiveError::UnsupportedAlgorithm { algorithm } if algorithm == "rsa"),
            "{err}"
        );
        assert_eq!(err.event_reason(), "malformed");
    }

    #[test]
    fn oversize_payload_is_refused_before_parsing() {
        let big = vec![b'x'; MAX_PAYLOAD_BYTES + 1];
        let err = verifier().verify(&big, DEV, NOW, 0).unwrap_err();
        assert!(
            matches!(err, DirectiveError::TooLarge { got, limit: MAX_PAYLOAD_BYTES } if got == MAX_PAYLOAD_BYTES + 1),
            "{err}"
        );
        assert_eq!(err.event_reason(), "malformed");
        // a valid envelope padded with whitespace past the cap
        let mut p = payload(&directive(1));
        p.resize(MAX_PAYLOAD_BYTES + 1, b' ');
        assert!(matches!(
            verifier().verify(&p, DEV, NOW, 0),
            Err(DirectiveError::TooLarge { .. })
        ));
        p.truncate(MAX_PAYLOAD_BYTES);
        assert!(verifier().verify(&p, DEV, NOW, 0).is_ok());
    }

    #[test]
    fn unknown_fields_are_malformed() {
        let good = serde_json::to_value(directive(1)).unwrap();
        let mut extra = good.clone();
        extra["priority"] = serde_json::json!("high");
        let err = verifier()
            .verify(
                &sign_text(&directive_key(), &extra.to_string()),
                DEV,
                NOW,
                0,
            )
            .unwrap_err();
        assert!(
            matches!(&err, DirectiveError::Directive { key_id, source }
                if key_id == directive_key().id.as_str() && source.to_string().contains("priority")),
            "{err}"
        );
        assert_eq!(err.event_reason(), "malformed");
        // inside the action, also for the unit variant
        let mut extra = good.clone();
        extra["action"]["url"] = serde_json::json!("http://x");
        let err = verifier()
            .verify(
                &sign_text(&directive_key(), &extra.to_string()),
                DEV,
                NOW,
                0,
            )
            .unwrap_err();
        assert!(matches!(err, DirectiveError::Directive { .. }), "{err}");
        let mut ping = good.clone();
        ping["action"] = serde_json::json!({"type": "ping", "delay": 1});
        let err = verifier()
            .verify(&sign_text(&directive_key(), &ping.to_string()), DEV, NOW, 0)
            .unwrap_err();
        assert!(matches!(err, DirectiveError::Directive { .. }), "{err}");
        let mut reboot = good.clone();
        reboot["action"] = serde_json::json!({"type": "reboot"});
        let err = verifier()
            .verify(
                &sign_text(&directive_key(), &reboot.to_string()),
                DEV,
                NOW,
                0,
            )
            .unwrap_err();
        assert!(matches!(err, DirectiveError::Directive { .. }), "{err}");
        // in the envelope
        let mut v = json(&payload(&directive(1)));
        v["note"] = serde_json::json!(1);
        let err = verifier()
            .verify(&serde_json::to_vec(&v).unwrap(), DEV, NOW, 0)
            .unwrap_err();
        assert!(matches!(err, DirectiveError::Envelope { .. }), "{err}");
        assert_eq!(err.event_reason(), "malformed");
        // not JSON at all
        let err = verifier().verify(b"\x00\x01", DEV, NOW, 0).unwrap_err();
        assert!(matches!(err, DirectiveError::Envelope { .. }), "{err}");
        let err = verifier().verify(b"", DEV, NOW, 0).unwrap_err();
        assert!(matches!(err, DirectiveError::Envelope { .. }), "{err}");
    }

    #[test]
    fn other_versions_are_malformed() {
        let mut v2 = serde_json::to_value(directive(1)).unwrap();
        v2["v"] = serde_json::json!(2);
        v2["new_v2_field"] = serde_json::json!(true);
        let err = verifier()
            .verify(&sign_text(&directive_key(), &v2.to_string()), DEV, NOW, 0)
            .unwrap_err();
        assert!(
            matches!(&err, DirectiveError::UnsupportedVersion { what: "directive", got } if got == "2"),
            "{err}"
        );
        assert_eq!(err.event_reason(), "malformed");
        let mut missing = serde_json::to_value(directive(1)).unwrap();
        missing.as_object_mut().unwrap().remove("v");
        let err = verifier()
            .verify(
                &sign_text(&directive_key(), &missing.to_string()),
                DEV,
                NOW,
                0,
            )
            .unwrap_err();
        assert!(
            matches!(&err, DirectiveError::UnsupportedVersion { what: "directive", got } if got == "missing"),
            "{err}"
        );
        let mut env = json(&payload(&directive(1)));
        env["v"] = serde_json::json!(2);
        let err = verifier()
            .verify(&serde_json::to_vec(&env).unwrap(), DEV, NOW, 0)
            .unwrap_err();
        assert!(
            matches!(&err, DirectiveError::UnsupportedVersion { what: "signed directive", got } if got == "2"),
            "{err}"
        );
        // the signer refuses to sign another version
        let mut d = directive(1);
        d.v = 2;
        assert!(matches!(
            signer().sign(&d),
            Err(DirectiveError::UnsupportedVersion {
                what: "directive",
                ..
            })
        ));
    }

    #[test]
    fn time_fields_are_checked() {
        // signed by the fleet but with expiry before issue, or a too-long lifetime
        let mut d = serde_json::to_value(directive(1)).unwrap();
        d["expires_at_ms"] = serde_json::json!(NOW - 1);
        let err = verifier()
            .verify(&sign_text(&directive_key(), &d.to_string()), DEV, NOW, 0)
            .unwrap_err();
        assert!(
            matches!(err, DirectiveError::ExpiresBeforeIssued { issued_at_ms: NOW, expires_at_ms } if expires_at_ms == NOW - 1),
            "{err}"
        );
        assert_eq!(err.event_reason(), "malformed");
        let long = Directive::new(DEV, 1, "d", NOW, MAX_LIFETIME_MS + 1, Action::Ping {});
        assert!(matches!(
            signer().sign(&long),
            Err(DirectiveError::LifetimeTooLong { .. })
        ));
        let err = verifier()
            .verify(
                &sign_text(&directive_key(), &serde_json::to_string(&long).unwrap()),
                DEV,
                NOW,
                0,
            )
            .unwrap_err();
        assert!(
            matches!(err, DirectiveError::LifetimeTooLong { lifetime_ms, max_ms: MAX_LIFETIME_MS } if lifetime_ms == MAX_LIFETIME_MS + 1),
            "{err}"
        );
        // exactly the maximum is fine; a device may lower it
        let max = Directive::new(DEV, 1, "d", NOW, MAX_LIFETIME_MS, Action::Ping {});
        let p = signer().sign_payload(&max).unwrap();
        assert!(verifier().verify(&p, DEV, NOW, 0).is_ok());
        let strict = verifier().with_limits(DirectiveLimits {
            max_lifetime_ms: 60_000,
            ..DirectiveLimits::default()
        });
        assert!(matches!(
            strict.verify(&p, DEV, NOW, 0),
            Err(DirectiveError::LifetimeTooLong { max_ms: 60_000, .. })
        ));
    }

    #[test]
    fn signer_validates_fields() {
        let cases: Vec<(Directive, &str)> = vec![
            (directive(0), "counter"),
            (
                Directive::new("a/b", 1, "d", NOW, 1, Action::Ping {}),
                "device",
            ),
            (Directive::new(DEV, 1, "", NOW, 1, Action::Ping {}), "id"),
            (
                Directive::new(DEV, 1, "x".repeat(129), NOW, 1, Action::Ping {}),
                "id",
            ),
            (
                Directive::new(DEV, 1, "a\nb", NOW, 1, Action::Ping {}),
                "id",
            ),
            (
                Directive::new(
                    DEV,
                    1,
                    "d",
                    NOW,
                    1,
                    Action::Install {
                        model: "pdm".into(),
                        version: "1".into(),
                        release: 1,
                        bundle_sha256: "9F".repeat(32),
                        bundle_bytes: 1,
                    },
                ),
                "action.bundle_sha256",
            ),
            (
                Directive::new(
                    DEV,
                    1,
                    "d",
                    NOW,
                    1,
                    Action::Install {
                        model: "pdm".into(),
                        version: "1".into(),
                        release: 1,
                        bundle_sha256: "9f".repeat(32),
                        bundle_bytes: 0,
                    },
                ),
                "action.bundle_bytes",
            ),
            (
                Directive::new(
                    DEV,
                    1,
                    "d",
                    NOW,
                    1,
                    Action::Rollback {
                        model: "bad model".into(),
                        to_release: None,
                        reason: "r".into(),
                    },
                ),
                "action.model",
            ),
            (
                Directive::new(
                    DEV,
                    1,
                    "d",
                    NOW,
                    1,
                    Action::Rollback {
                        model: "pdm".into(),
                        to_release: None,
                        reason: String::new(),
                    },
                ),
                "action.reason",
            ),
        ];
        for (d, want) in cases {
            let err = signer().sign(&d).unwrap_err();
            assert!(
                matches!(&err, DirectiveError::Field { field, .. } if *field == want),
                "{want}: {err}"
            );
            // and a device refuses the same directive signed without the check
            let p = sign_text(&directive_key(), &serde_json::to_string(&d).unwrap());
            let err = verifier().verify(&p, DEV, NOW, 0).unwrap_err();
            assert!(
                matches!(&err, DirectiveError::Field { field, .. } if *field == want),
                "{want}: {err}"
            );
            assert_eq!(err.event_reason(), "malformed");
        }
    }

    #[test]
    fn key_rotation_accepts_both_keys_until_the_old_is_removed() {
        let old = directive_key();
        let new = SecretKey::from_seed([33; 32]);
        let mut v = DirectiveVerifier::new([old.public(), new.public()]);
        let mut ids = vec![old.id.as_str(), new.id.as_str()];
        ids.sort_unstable();
        assert_eq!(v.key_ids(), ids);
        let by_old = DirectiveSigner::new(old)
            .sign_payload(&directive(1))
            .unwrap();
        let by_new = DirectiveSigner::new(SecretKey::from_seed([33; 32]))
            .sign_payload(&directive(2))
            .unwrap();
        assert_eq!(v.verify(&by_old, DEV, NOW, 0).unwrap().counter, 1);
        assert_eq!(v.verify(&by_new, DEV, NOW, 1).unwrap().counter, 2);
        assert!(v.remove_key(directive_key().id.as_str()));
        assert!(matches!(
            v.verify(&by_old, DEV, NOW, 0),
            Err(DirectiveError::UnknownKey { .. })
        ));
        assert!(v.verify(&by_new, DEV, NOW, 1).is_ok());
        v.add_key(directive_key().public());
        assert!(v.verify(&by_old, DEV, NOW, 0).is_ok());
    }

    #[test]
    fn signer_loads_trust_key_files_and_keys_stay_separate() {
        let s = DirectiveSigner::from_file_bytes(&directive_key().to_file_bytes()).unwrap();
        assert_eq!(s.key_id(), &directive_key().id);
        assert_eq!(s.public_key().id, directive_key().id);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("directive.key");
        std::fs::write(&path, directive_key().to_file_bytes()).unwrap();
        let loaded = DirectiveSigner::load(&path).unwrap();
        let p = loaded.sign_payload(&directive(1)).unwrap();
        assert!(verifier().verify(&p, DEV, NOW, 0).is_ok());
        assert!(matches!(
            DirectiveSigner::from_file_bytes(&directive_key().public().to_file_bytes()),
            Err(TrustError::Key(_))
        ));
        // a directive key must not also be a bundle key
        assert!(verifier().check_distinct_from([&bundle_key().id]).is_ok());
        let err = verifier()
            .check_distinct_from([&bundle_key().id, &directive_key().id])
            .unwrap_err();
        assert!(
            matches!(err, TrustError::Key(ref m) if m.contains(directive_key().id.as_str())),
            "{err}"
        );
    }

    #[test]
    fn counter_rule_and_next_counter() {
        let mut rule = CounterRule::default();
        assert_eq!(rule.last(), 0);
        assert!(matches!(
            rule.accept(0),
            Err(DirectiveError::Replayed {
                counter: 0,
                last: 0
            })
        ));
        rule.accept(1).unwrap();
        rule.accept(5).unwrap();
        assert_eq!(rule.last(), 5);
        assert!(matches!(
            rule.accept(5),
            Err(DirectiveError::Replayed {
                counter: 5,
                last: 5
            })
        ));
        assert!(matches!(
            rule.accept(3),
            Err(DirectiveError::Replayed {
                counter: 3,
                last: 5
            })
        ));
        assert_eq!(rule.last(), 5);
        assert!(CounterRule::new(5).check(6).is_ok());

        assert_eq!(next_counter(0, NOW), NOW);
        assert_eq!(next_counter(NOW + 10, NOW), NOW + 11);
        assert_eq!(next_counter(0, 0), 1);
        assert_eq!(next_counter(u64::MAX, 0), u64::MAX);
        // a fleet that lost its store (last_issued 0) still outruns what devices saw
        assert!(CounterRule::new(next_counter(0, NOW))
            .check(next_counter(0, NOW + 1))
            .is_ok());
    }

    #[test]
    fn routing_helpers_read_without_trusting() {
        let p = payload(&directive(1));
        assert!(is_signed_directive(&p));
        assert_eq!(unverified_id(&p).as_deref(), Some("d-0001"));
        // the id is read even when verification fails, for the reply
        let forged = sign_text(
            &bundle_key(),
            &serde_json::to_string(&directive(1)).unwrap(),
        );
        assert!(verifier().verify(&forged, DEV, NOW, 0).is_err());
        assert_eq!(unverified_id(&forged).as_deref(), Some("d-0001"));
        let command = br#"{"v": 1, "id": "c-1", "cmd": "ping"}"#;
        assert!(!is_signed_directive(command));
        assert_eq!(unverified_id(command), None);
        assert!(!is_signed_directive(b"not json"));
        assert!(!is_signed_directive(&vec![b' '; MAX_PAYLOAD_BYTES + 1]));
    }

    #[test]
    fn event_reasons_cover_every_variant() {
        let json_err = || serde_json::from_str::<u8>("x").unwrap_err();
        let cases: Vec<(DirectiveError, &str)> = vec![
            (DirectiveError::TooLarge { got: 2, limit: 1 }, "malformed"),
            (DirectiveError::Envelope { source: json_err() }, "malformed"),
            (
                DirectiveError::UnsupportedVersion {
                    what: "directive",
                    got: "2".into(),
                },
                "malformed",
            ),
            (
                DirectiveError::UnsupportedAlgorithm {
                    algorithm: "x".into(),
                },
                "malformed",
            ),
            (
                DirectiveError::UnknownKey {
                    key_id: "k".into(),
                    accepted: "none".into(),
                },
                "unknown_key",
            ),
            (
                DirectiveError::BadSignature {
                    key_id: "k".into(),
                    reason: "r".into(),
                },
                "bad_signature",
            ),
            (
                DirectiveError::Directive {
                    key_id: "k".into(),
                    source: json_err(),
                },
                "malformed",
            ),
            (
                DirectiveError::Field {
                    field: "id",
                    problem: "p".into(),
                },
                "malformed",
            ),
            (
                DirectiveError::ExpiresBeforeIssued {
                    issued_at_ms: 2,
                    expires_at_ms: 1,
                },
                "malformed",
            ),
            (
                DirectiveError::LifetimeTooLong {
                    lifetime_ms: 2,
                    max_ms: 1,
                },
                "malformed",
            ),
            (
                DirectiveError::OtherDevice {
                    expected: "a".into(),
                    got: "b".into(),
                },
                "other_device",
            ),
            (
                DirectiveError::Expired {
                    expired_at_ms: 1,
                    now_ms: 2,
                },
                "expired",
            ),
            (
                DirectiveError::NotYetValid {
                    issued_at_ms: 9,
                    now_ms: 1,
                    max_skew_ms: 1,
                },
                "not_yet_valid",
            ),
            (
                DirectiveError::Replayed {
                    counter: 1,
                    last: 1,
                },
                "replayed",
            ),
            (DirectiveError::Encode { reason: "r".into() }, "malformed"),
        ];
        for (err, want) in cases {
            assert_eq!(err.event_reason(), want, "{err}");
            assert!(!err.to_string().is_empty());
        }
        let msg = DirectiveError::Replayed {
            counter: 4,
            last: 7,
        }
        .to_string();
        assert!(msg.contains('4') && msg.contains('7'), "{msg}");
        let msg = DirectiveError::OtherDevice {
            expected: "a1".into(),
            got: "b2".into(),
        }
        .to_string();
        assert!(msg.contains("a1") && msg.contains("b2"), "{msg}");
    }
}
