//! The device <-> fleet MQTT wire protocol, version 1: explicit, versioned payload types
//! (status birth/death, record batches, acks, commands and replies), the zstd compression
//! marker for batches, and parsers whose errors name the payload and the field.
//!
//! The human-readable specification for third-party subscribers is
//! `shared/docs/mqtt-protocol.md`; this module is its executable form. Every payload is a
//! JSON object with `"v": 1`. Receivers ignore unknown fields (additive changes stay in v1)
//! and refuse any other `v`.
//!
//! Compression: only record batches may be compressed. A batch payload that begins with the
//! zstd frame magic bytes `28 B5 2F FD` is one zstd frame whose content is the JSON batch; a
//! payload whose first byte is `{` is the JSON batch itself; anything else is refused.
//! Decompression never sizes a buffer from the frame header: it streams with a capped window
//! ([`ZSTD_WINDOW_LOG_MAX`]) and stops at the first byte beyond the caller's limit.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The protocol version carried in every payload (`"v": 1`) and in the topic prefix (`v1`).
pub const VERSION: u32 = 1;
/// The zstd frame magic bytes (little-endian 0xFD2FB528) that mark a compressed batch.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// Largest zstd window accepted when decompressing a batch (log2 bytes: 8 MiB).
pub const ZSTD_WINDOW_LOG_MAX: u32 = 23;
/// Default cap on a batch's decompressed (or plain) JSON size.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Most records one batch may carry.
pub const MAX_BATCH_RECORDS: usize = 100_000;
/// Longest device id (bytes).
pub const MAX_DEVICE_ID: usize = 64;
/// Largest status / ack / command / reply payload accepted (bytes).
pub const MAX_CONTROL_BYTES: usize = 64 * 1024;

/// What went wrong with a payload; every variant names the payload kind and, where there is
/// one, the field.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{what}: not valid JSON or a field is missing or mistyped: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what}: field \"v\" is missing (expected {VERSION})")]
    MissingVersion { what: &'static str },
    #[error("{what}: field \"v\" is {got}; this receiver speaks version {VERSION} only")]
    UnsupportedVersion { what: &'static str, got: u64 },
    #[error("{what}: field \"{field}\": {problem}")]
    Field {
        what: &'static str,
        field: &'static str,
        problem: String,
    },
    #[error("{what}: payload of {got} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        got: usize,
        limit: usize,
    },
    #[error("batch: decompressed size exceeds the limit of {limit} bytes")]
    DecompressedTooLarge { limit: usize },
    #[error("batch: zstd decompression failed: {0}")]
    Zstd(std::io::Error),
    #[error("batch: zstd compression failed: {0}")]
    Compress(std::io::Error),
    #[error("batch: payload starts with byte 0x{0:02x}; expected '{{' (JSON) or the zstd magic 28 b5 2f fd")]
    UnknownEncoding(u8),
    #[error("{what}: empty payload")]
    Empty { what: &'static str },
    #[error("command: field \"cmd\": unknown command {0:?} (known: install, rollback, ping)")]
    UnknownCommand(String),
}

/// The class of a record; the priority order for the device's outbox cap is
/// event and health > drift > telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordClass {
    Telemetry,
    Drift,
    Health,
    Event,
}

impl RecordClass {
    /// All classes, in wire order.
    pub const ALL: [RecordClass; 4] = [
        RecordClass::Telemetry,
        RecordClass::Drift,
        RecordClass::Health,
        RecordClass::Event,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RecordClass::Telemetry => "telemetry",
            RecordClass::Drift => "drift",
            RecordClass::Health => "health",
            RecordClass::Event => "event",
        }
    }

    /// Parses `telemetry` | `drift` | `health` | `event`.
    pub fn parse(s: &str) -> Option<RecordClass> {
        RecordClass::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A model version active on the device (in the birth message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub name: String,
    pub version: String,
    /// The bundle release number, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<u64>,
    /// `active`, `shadow` or `split` (the role the version serves).
    #[serde(default = "default_role")]
    pub role: String,
    /// `health_window` (activated, being watched) or `committed` (passed its health window);
    /// absent from agents older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
}

fn default_role() -> String {
    "active".into()
}

/// Birth: published retained on the status topic after every (re)connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Birth {
    pub v: u32,
    pub device: String,
    pub agent_version: String,
    pub models: Vec<ModelVersion>,
    /// When the agent process started (Unix milliseconds).
    pub started_at_ms: u64,
    /// When this birth was published (Unix milliseconds).
    #[serde(default)]
    pub sent_at_ms: u64,
    /// The device's tags from its configuration (`site`, `line`, `hardware`, ...): rollouts
    /// target devices by them. Keys and values: 1..=64 bytes of `A-Z a-z 0-9 . _ -`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Death: the MQTT last will (`reason: "connection-lost"`, set when connecting) and the
/// message published on a clean shutdown (`reason: "shutdown"`); retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Death {
    pub v: u32,
    pub device: String,
    pub reason: String,
}

/// The retained payload of the status topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Status {
    Online(Birth),
    Offline(Death),
}

/// Drops the device counted for one class since its outbox was created (cumulative).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounts {
    /// Dropped because the outbox byte cap was reached.
    #[serde(default)]
    pub cap: u64,
    /// Dropped because the record outlived the configured TTL.
    #[serde(default)]
    pub ttl: u64,
    /// Dropped because writing the record failed (disk full, I/O error).
    #[serde(default)]
    pub io: u64,
}

impl DropCounts {
    pub fn total(&self) -> u64 {
        self.cap.saturating_add(self.ttl).saturating_add(self.io)
    }
}

/// One record in a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub class: RecordClass,
    /// When the record was produced on the device (Unix milliseconds).
    pub produced_at_ms: u64,
    /// The record body: any JSON value, kept byte for byte.
    pub body: Box<RawValue>,
}

/// A batch of records, published QoS 1 on the records topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Batch {
    pub v: u32,
    pub device: String,
    /// Seq of the first and last record in `records`.
    pub first: u64,
    pub last: u64,
    /// The seq the device had acknowledged or published just before this batch. The batch
    /// holds every record the device has with `prev < seq <= last`: seqs between `prev` and
    /// `first` or between two records do not exist (the device dropped them, see `dropped`).
    pub prev: u64,
    pub records: Vec<Record>,
    /// The device's cumulative drop counters, per class, read after the records: every seq
    /// the batch skips is counted here. A consumer refuses a batch that would make the seqs
    /// it skipped in total exceed these counters (`shared/docs/mqtt-protocol.md`, rule 4 of
    /// "Sequencing, dedupe and acks").
    #[serde(default)]
    pub dropped: BTreeMap<RecordClass, DropCounts>,
    /// When the batch was (re)published (Unix milliseconds).
    #[serde(default)]
    pub sent_at_ms: u64,
    /// The device's outbox epoch: random, chosen when its outbox was created. Seqs and drop
    /// counters belong to one epoch: a new epoch (the device's outbox was recreated after
    /// corruption) starts again at seq 1 with zero drops. 0: not given (the consumer keeps
    /// the epoch it knows).
    #[serde(default)]
    pub epoch: u64,
}

/// Ack from the fleet: every record with `seq <= through` is stored durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub v: u32,
    pub through: u64,
    /// The epoch of the batches acknowledged (see [`Batch::epoch`]); a device ignores an ack
    /// for another epoch. 0: not given (applies to the current epoch).
    #[serde(default)]
    pub epoch: u64,
}

/// A command to the device. Unknown `cmd` values are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub v: u32,
    /// Chosen by the sender; echoed in the reply.
    pub id: String,
    #[serde(flatten)]
    pub body: CommandBody,
}

/// The shapes of the commands (`"cmd": "install" | "rollback" | "ping"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum CommandBody {
    /// Install a bundle (delivered separately; see the fleet issue).
    Install {
        model: String,
        version: String,
        /// SHA-256 of the bundle, lowercase hex.
        sha256: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        url: Option<String>,
    },
    /// Roll `model` back to its previous version, or to `to_version`.
    Rollback {
        model: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        to_version: Option<String>,
    },
    /// Liveness check; answered with an `ok` reply.
    Ping,
}

impl CommandBody {
    pub fn name(&self) -> &'static str {
        match self {
            CommandBody::Install { .. } => "install",
            CommandBody::Rollback { .. } => "rollback",
            CommandBody::Ping => "ping",
        }
    }
}

/// The device's answer to a command, on the replies topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandReply {
    pub v: u32,
    pub id: String,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether `id` is usable as a device id: 1 to [`MAX_DEVICE_ID`] bytes of `A-Z a-z 0-9 . _ -`,
/// not starting with `.` (it is a topic level and, on the fleet side, a directory name).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[derive(Deserialize)]
struct VersionProbe {
    v: Option<serde_json::Value>,
}

fn check_version(what: &'static str, json: &[u8]) -> Result<(), WireError> {
    let probe: VersionProbe =
        serde_json::from_slice(json).map_err(|source| WireError::Json { what, source })?;
    match probe.v {
        None => Err(WireError::MissingVersion { what }),
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(u64::from(VERSION)) => Ok(()),
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(got) => Err(WireError::UnsupportedVersion { what, got }),
            None => Err(WireError::Field {
                what,
                field: "v",
                problem: format!("{n} is not a version number"),
            }),
        },
        Some(other) => Err(WireError::Field {
            what,
            field: "v",
            problem: format!("{other} is not a number"),
        }),
    }
}

fn control<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    payload: &[u8],
) -> Result<T, WireError> {
    if payload.is_empty() {
        return Err(WireError::Empty { what });
    }
    if payload.len() > MAX_CONTROL_BYTES {
        return Err(WireError::TooLarge {
            what,
            got: payload.len(),
            limit: MAX_CONTROL_BYTES,
        });
    }
    check_version(what, payload)?;
    serde_json::from_slice(payload).map_err(|source| WireError::Json { what, source })
}

fn device_field(what: &'static str, device: &str) -> Result<(), WireError> {
    if valid_device_id(device) {
        Ok(())
    } else {
        Err(WireError::Field {
            what,
            field: "device",
            problem: format!(
                "{device:?} is not a valid device id (1-{MAX_DEVICE_ID} of A-Z a-z 0-9 . _ -)"
            ),
        })
    }
}

/// Parses a status payload (birth or death).
pub fn parse_status(payload: &[u8]) -> Result<Status, WireError> {
    let s: Status = control("status", payload)?;
    match &s {
        Status::Online(b) => device_field("status", &b.device)?,
        Status::Offline(d) => device_field("status", &d.device)?,
    }
    Ok(s)
}

/// Parses an ack payload.
pub fn parse_ack(payload: &[u8]) -> Result<Ack, WireError> {
    control("ack", payload)
}

/// Parses a command payload; a `cmd` other than install / rollback / ping is refused with
/// [`WireError::UnknownCommand`].
pub fn parse_command(payload: &[u8]) -> Result<Command, WireError> {
    #[derive(Deserialize)]
    struct Probe {
        cmd: Option<serde_json::Value>,
    }
    let what = "command";
    if payload.len() > MAX_CONTROL_BYTES {
        return Err(WireError::TooLarge {
            what,
            got: payload.len(),
            limit: MAX_CONTROL_BYTES,
        });
    }
    check_version(what, payload)?;
    let probe: Probe =
        serde_json::from_slice(payload).map_err(|source| WireError::Json { what, source })?;
    match probe.cmd {
        Some(serde_json::Value::String(c))
            if matches!(c.as_str(), "install" | "rollback" | "ping") => {}
        Some(serde_json::Value::String(c)) => return Err(WireError::UnknownCommand(c)),
        Some(other) => {
            return Err(WireError::Field {
                what,
                field: "cmd",
                problem: format!("{other} is not a string"),
            })
        }
        None => {
            return Err(WireError::Field {
                what,
                field: "cmd",
                problem: "missing".into(),
            })
        }
    }
    serde_json::from_slice(payload).map_err(|source| WireError::Json { what, source })
}

/// Parses a command reply payload.
pub fn parse_reply(payload: &[u8]) -> Result<CommandReply, WireError> {
    control("reply", payload)
}

/// Serializes any v1 control payload (status, ack, command, reply) as JSON.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // serializing these plain structs to a Vec cannot fail (no maps with non-string keys,
    // no failing Serialize impls); fall back to an empty object rather than panic
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

/// Encodes a batch: JSON, then zstd (level `level`) when the JSON exceeds
/// `compress_above_bytes` and compression makes it smaller (`usize::MAX` disables
/// compression; 0 tries it on every batch).
pub fn encode_batch(
    batch: &Batch,
    compress_above_bytes: usize,
    level: i32,
) -> Result<Vec<u8>, WireError> {
    let json = serde_json::to_vec(batch).map_err(|source| WireError::Json {
        what: "batch",
        source,
    })?;
    if json.len() <= compress_above_bytes {
        return Ok(json);
    }
    let packed = zstd::bulk::compress(&json, level).map_err(WireError::Compress)?;
    Ok(if packed.len() < json.len() {
        packed
    } else {
        json
    })
}

/// Whether a batch payload is zstd-compressed (begins with [`ZSTD_MAGIC`]).
pub fn is_compressed(payload: &[u8]) -> bool {
    payload.starts_with(&ZSTD_MAGIC)
}

/// Returns the JSON of a batch payload: itself if it begins with `{`, decompressed if it
/// begins with the zstd magic, never more than `max_bytes` (the compressed input is not
/// trusted: the output grows as bytes arrive, and decoding stops at the first byte over).
pub fn batch_json(
    payload: &[u8],
    max_bytes: usize,
) -> Result<std::borrow::Cow<'_, [u8]>, WireError> {
    let what = "batch";
    match payload.first() {
        None => Err(WireError::Empty { what }),
        Some(b'{') => {
            if payload.len() > max_bytes {
                Err(WireError::TooLarge {
                    what,
                    got: payload.len(),
                    limit: max_bytes,
                })
            } else {
                Ok(std::borrow::Cow::Borrowed(payload))
            }
        }
        Some(_) if is_compressed(payload) => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(payload)
                .map_err(WireError::Zstd)?
                .single_frame();
            dec.window_log_max(ZSTD_WINDOW_LOG_MAX)
                .map_err(WireError::Zstd)?;
            let mut out = Vec::with_capacity(payload.len().saturating_mul(4).min(max_bytes));
            let limit = u64::try_from(max_bytes)
                .unwrap_or(u64::MAX)
                .saturating_add(1);
            dec.take(limit)
                .read_to_end(&mut out)
                .map_err(WireError::Zstd)?;
            if out.len() > max_bytes {
                return Err(WireError::DecompressedTooLarge { limit: max_bytes });
            }
            Ok(std::borrow::Cow::Owned(out))
        }
        Some(&b) => Err(WireError::UnknownEncoding(b)),
    }
}

/// Parses and checks a batch payload (plain or compressed, at most `max_bytes` of JSON):
/// version, device id, `first`/`last` equal to the first/last record's seq, seqs strictly
/// increasing, `prev < first`, 1 to [`MAX_BATCH_RECORDS`] records.
pub fn decode_batch(payload: &[u8], max_bytes: usize) -> Result<Batch, WireError> {
    let what = "batch";
    let json = batch_json(payload, max_bytes)?;
    check_version(what, &json)?;
    let b: Batch =
        serde_json::from_slice(&json).map_err(|source| WireError::Json { what, source })?;
    validate_batch(&b)?;
    Ok(b)
}

/// The structural checks of [`decode_batch`] (also used by senders in tests).
pub fn validate_batch(b: &Batch) -> Result<(), WireError> {
    let what = "batch";
    let field = |field: &'static str, problem: String| WireError::Field {
        what,
        field,
        problem,
    };
    device_field(what, &b.device)?;
    if b.records.is_empty() || b.records.len() > MAX_BATCH_RECORDS {
        return Err(field(
            "records",
            format!(
                "{} records; a batch carries 1 to {MAX_BATCH_RECORDS}",
                b.records.len()
            ),
        ));
    }
    let (first, last) = match (b.records.first(), b.records.last()) {
        (Some(f), Some(l)) => (f.seq, l.seq),
        _ => return Err(field("records", "empty".into())),
    };
    if b.first != first {
        return Err(field(
            "first",
            format!("{} but the first record has seq {first}", b.first),
        ));
    }
    if b.last != last {
        return Err(field(
            "last",
            format!("{} but the last record has seq {last}", b.last),
        ));
    }
    if b.prev >= b.first {
        return Err(field(
            "prev",
            format!("{} is not below first ({})", b.prev, b.first),
        ));
    }
    for w in b.records.windows(2) {
        if w[1].seq <= w[0].seq {
            return Err(field(
                "records",
                format!(
                    "seq {} follows seq {}: seqs must increase",
                    w[1].seq, w[0].seq
                ),
            ));
        }
    }
    Ok(())
}

/// Parses `mqtt://host:port` (or `tcp://host:port`) into host and port.
pub fn parse_mqtt_url(url: &str) -> Option<(String, u16)> {
    let rest = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))?;
    let (host, port) = rest.rsplit_once(':')?;
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, body: &str) -> Record {
        Record {
            seq,
            class: RecordClass::Telemetry,
            produced_at_ms: 1_700_000_000_000 + seq,
            body: RawValue::from_string(body.to_string()).unwrap(),
        }
    }

    fn batch(prev: u64, seqs: &[u64]) -> Batch {
        Batch {
            v: VERSION,
            device: "press-07".into(),
            first: seqs[0],
            last: *seqs.last().unwrap(),
            prev,
            records: seqs.iter().map(|&s| rec(s, r#"{"x":1.5}"#)).collect(),
            dropped: BTreeMap::from([(
                RecordClass::Telemetry,
                DropCounts {
                    cap: 3,
                    ttl: 0,
                    io: 0,
                },
            )]),
            sent_at_ms: 1,
            epoch: 0x5eed,
        }
    }

    #[test]
    fn batch_roundtrip_plain_and_compressed() {
        let b = batch(10, &[11, 12, 15]);
        let plain = encode_batch(&b, usize::MAX, 3).unwrap();
        assert_eq!(plain[0], b'{');
        let back = decode_batch(&plain, DEFAULT_MAX_BATCH_BYTES).unwrap();
        assert_eq!((back.first, back.last, back.prev), (11, 15, 10));
        assert_eq!(back.records[2].body.get(), r#"{"x":1.5}"#);
        assert_eq!(back.dropped[&RecordClass::Telemetry].cap, 3);

        let big = batch(0, &(1..=500).collect::<Vec<_>>());
        let packed = encode_batch(&big, 1024, 3).unwrap();
        assert!(is_compressed(&packed), "a large batch is compressed");
        assert!(packed.len() < serde_json::to_vec(&big).unwrap().len());
        let back = decode_batch(&packed, DEFAULT_MAX_BATCH_BYTES).unwrap();
        assert_eq!(back.records.len(), 500);
        assert_eq!(back.last, 500);
    }

    #[test]
    fn oversize_decompression_is_refused() {
        // a 64 MiB document of spaces compresses to a few KiB
        let mut json = b"{\"v\":1,".to_vec();
        json.resize(64 * 1024 * 1024, b' ');
        json.extend_from_slice(b"}");
        let bomb = zstd::bulk::compress(&json, 3).unwrap();
        assert!(bomb.len() < 64 * 1024);
        let err = decode_batch(&bomb, 1024 * 1024).unwrap_err();
        assert!(
            matches!(err, WireError::DecompressedTooLarge { limit: 1048576 }),
            "{err}"
        );
        // plain JSON over the limit is refused too
        let err = decode_batch(&json, 1024 * 1024).unwrap_err();
        assert!(matches!(err, WireError::TooLarge { .. }), "{err}");
        // a truncated frame is an error, not a panic
        let good = zstd::bulk::compress(&serde_json::to_vec(&batch(0, &[1])).unwrap(), 3).unwrap();
        let err = decode_batch(&good[..good.len() / 2], 1024).unwrap_err();
        assert!(matches!(err, WireError::Zstd(_)), "{err}");
        // neither JSON nor zstd
        let err = decode_batch(b"\x00garbage", 1024).unwrap_err();
        assert!(err.to_string().contains("0x00"), "{err}");
    }

    #[test]
    fn batch_errors_name_the_field() {
        let check = |json: &str, needle: &str| {
            let err = decode_batch(json.as_bytes(), 4096).unwrap_err().to_string();
            assert!(err.contains(needle), "{json}: {err}");
        };
        check(r#"{"device":"a","first":1}"#, "field \"v\" is missing");
        check(r#"{"v":2,"device":"a"}"#, "\"v\" is 2");
        check(r#"{"v":"1","device":"a"}"#, "field \"v\"");
        check(
            r#"{"v":1,"device":"a","last":1,"prev":0,"records":[]}"#,
            "missing field `first`",
        );
        check(
            r#"{"v":1,"device":"a","first":"one","last":1,"prev":0,"records":[]}"#,
            "invalid type: string \"one\"",
        );
        let b = |dev: &str, first: u64, last: u64, prev: u64, seqs: &[u64]| {
            let recs: Vec<String> = seqs
                .iter()
                .map(|s| format!(r#"{{"seq":{s},"class":"drift","produced_at_ms":1,"body":null}}"#))
                .collect();
            format!(
                r#"{{"v":1,"device":"{dev}","first":{first},"last":{last},"prev":{prev},"records":[{}]}}"#,
                recs.join(",")
            )
        };
        check(&b("a", 1, 1, 0, &[]), "field \"records\"");
        check(&b("a", 2, 3, 0, &[1, 3]), "field \"first\"");
        check(&b("a", 1, 4, 0, &[1, 3]), "field \"last\"");
        check(&b("a", 1, 3, 1, &[1, 3]), "field \"prev\"");
        check(&b("a", 1, 3, 0, &[1, 3, 3]), "must increase");
        check(&b("a", 1, 2, 0, &[1, 3, 2]), "must increase");
        check(&b("../etc", 1, 1, 0, &[1]), "field \"device\"");
        check(
            r#"{"v":1,"device":"a","first":1,"last":1,"prev":0,"records":[{"seq":1,"class":"gossip","produced_at_ms":1,"body":1}]}"#,
            "unknown variant `gossip`",
        );
        assert!(decode_batch(&b("a", 1, 3, 0, &[1, 3]).into_bytes(), 4096).is_ok());
    }

    #[test]
    fn status_ack_command() {
        let birth = Status::Online(Birth {
            v: 1,
            device: "press-07".into(),
            agent_version: "0.1.0".into(),
            models: vec![ModelVersion {
                name: "pdm".into(),
                version: "1.0.0".into(),
                release: Some(1),
                role: "active".into(),
                phase: None,
            }],
            started_at_ms: 5,
            sent_at_ms: 6,
            tags: [("site".to_string(), "plant-a".to_string())].into(),
        });
        let json = to_json(&birth);
        assert!(String::from_utf8_lossy(&json).contains(r#""state":"online""#));
        assert_eq!(parse_status(&json).unwrap(), birth);
        let death = parse_status(
            br#"{"v":1,"state":"offline","device":"d1","reason":"connection-lost","extra":true}"#,
        )
        .unwrap();
        assert!(matches!(death, Status::Offline(d) if d.reason == "connection-lost"));
        let err = parse_status(br#"{"v":1,"state":"sleeping","device":"d1"}"#).unwrap_err();
        assert!(err.to_string().contains("sleeping"), "{err}");

        assert_eq!(parse_ack(br#"{"v":1,"through":42}"#).unwrap().through, 42);
        // epoch is optional (0: not given)
        assert_eq!(parse_ack(br#"{"v":1,"through":42}"#).unwrap().epoch, 0);
        assert_eq!(
            parse_ack(br#"{"v":1,"through":42,"epoch":7}"#)
                .unwrap()
                .epoch,
            7
        );
        let err = parse_ack(br#"{"v":1}"#).unwrap_err().to_string();
        assert!(err.contains("missing field `through`"), "{err}");
        let err = parse_ack(br#"{"v":3,"through":1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"v\" is 3"), "{err}");
        assert!(parse_ack(b"").is_err());

        let ping = parse_command(br#"{"v":1,"id":"c1","cmd":"ping"}"#).unwrap();
        assert_eq!(ping.body, CommandBody::Ping);
        let rb = parse_command(br#"{"v":1,"id":"c2","cmd":"rollback","model":"pdm"}"#).unwrap();
        assert_eq!(rb.body.name(), "rollback");
        let inst = Command {
            v: 1,
            id: "c3".into(),
            body: CommandBody::Install {
                model: "pdm".into(),
                version: "2.0.0".into(),
                sha256: "ab".repeat(32),
                url: None,
            },
        };
        assert_eq!(parse_command(&to_json(&inst)).unwrap(), inst);
        let err = parse_command(br#"{"v":1,"id":"c4","cmd":"self-destruct"}"#).unwrap_err();
        assert!(
            matches!(&err, WireError::UnknownCommand(c) if c == "self-destruct"),
            "{err}"
        );
        let err = parse_command(br#"{"v":1,"id":"c5"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"cmd\": missing"), "{err}");
        let err = parse_command(br#"{"v":1,"id":"c6","cmd":"install","model":"m"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `version`"), "{err}");
        let reply = CommandReply {
            v: 1,
            id: "c1".into(),
            ok: true,
            error: None,
        };
        assert_eq!(parse_reply(&to_json(&reply)).unwrap(), reply);
    }

    #[test]
    fn device_ids() {
        assert!(valid_device_id("press-07.line_3"));
        for bad in ["", ".hidden", "a/b", "a+b", "a#", "ü", &"x".repeat(65)] {
            assert!(!valid_device_id(bad), "{bad}");
        }
    }
}
