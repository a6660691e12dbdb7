//! MQTT sync of the outbox to the fleet (wire protocol v1, `shared::wire`,
//! `shared/docs/mqtt-protocol.md`): batches of outbox records published QoS 1 in seq order,
//! deleted from the outbox only when the fleet's application-level ack covers them, and
//! replayed from the last ack after a reconnect, an ack timeout or a restart.
//!
//! rumqttc drops in-flight QoS 1 publishes on reconnect (clean session) and keeps pending
//! requests in memory only, so delivery does not rest on MQTT acks: the outbox is the only
//! source of truth, the fleet deduplicates by (device, seq) and refuses a batch whose `prev`
//! shows a gap, and an ack `through = n` is cumulative.
//!
//! Two tasks: [`run`] owns the rumqttc event loop (connect with TLS through rustls and the
//! `ring` provider, last will = death, retained birth after every connect, re-subscribe,
//! exponential backoff with jitter, failover to the next URL; it never blocks: everything it
//! sends uses `try_publish`/`try_subscribe`); the pump task reads the outbox on the blocking
//! pool, publishes a window of at most `window` unacknowledged batches and applies acks.
//!
//! With [`SyncExtras`] the event loop also subscribes to `<prefix>/<device>/bundle/chunk`
//! and hands chunk frames to the bundle downloads (`crate::download`, never blocking: a
//! full queue drops the frame, which is asked for again), gives them a publisher for
//! `bundle/get` at every connect, and republishes the retained birth when notified that an
//! active version or its phase changed.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use shared::wire::{self, RecordClass};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::outbox::{Class, DropReason, Outbox, OutboxError, Record};

/// Largest ack / command payload accepted from the broker (bytes).
const MAX_INCOMING_BYTES: usize = 256 * 1024;
/// Largest packet accepted when bundle chunks are received (a frame of the largest chunk,
/// its header and the topic).
const MAX_CHUNK_PACKET_BYTES: usize =
    shared::delivery::MAX_CHUNK_BYTES + shared::delivery::MAX_HEADER_BYTES + 8 + 1024;
/// zstd level for compressed batches (fast; batches are repetitive JSON).
const ZSTD_LEVEL: i32 = 1;

/// `[sync]` settings (wire type of the agent's TOML configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// Broker URLs, `mqtt://host[:port]` or `mqtts://host[:port]`, tried in order (failover).
    pub urls: Vec<String>,
    /// PEM file of the CA(s) that sign the broker's certificate (required for `mqtts://`).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) and private key for mutual TLS; both or neither.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// File holding the password (first line); instead of `password`.
    pub password_file: Option<PathBuf>,
    /// MQTT keep-alive (seconds): how fast a dead link is noticed.
    pub keep_alive_secs: u64,
    /// TCP + TLS + CONNACK timeout (seconds).
    pub connect_timeout_secs: u64,
    /// Reconnect backoff: doubles from `backoff_min_ms` up to `backoff_max_ms`, plus jitter.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Most records / payload bytes in one batch.
    pub batch_max_records: usize,
    pub batch_max_bytes: usize,
    /// Batches whose JSON is larger are zstd-compressed.
    pub compress_above_bytes: usize,
    /// Most batches published and not yet acknowledged.
    pub window: usize,
    /// A batch not acknowledged within this time: rewind to the last ack and replay.
    pub ack_timeout_ms: u64,
    /// Topic prefix; topics are `<prefix>/<device>/{status,records,ack,commands,replies}`.
    pub topic_prefix: String,
    /// Public key files (`.pub`) of the fleet's directive keys: signed directives on the
    /// commands topic must carry a signature by one of them (none: directives are refused).
    pub directive_keys: Vec<PathBuf>,
}

impl Default for SyncConfig {
    fn default() -> SyncConfig {
        SyncConfig {
            urls: Vec::new(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password: None,
            password_file: None,
            keep_alive_secs: 15,
            connect_timeout_secs: 10,
            backoff_min_ms: 250,
            backoff_max_ms: 30_000,
            batch_max_records: 1000,
            batch_max_bytes: 256 * 1024,
            compress_above_bytes: 8 * 1024,
            window: 8,
            ack_timeout_ms: 15_000,
            topic_prefix: "edge/v1".into(),
            directive_keys: Vec::new(),
        }
    }
}

/// A bad `[sync]` setting, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum SyncConfigError {
    #[error("sync.{key}: {problem}")]
    Key { key: &'static str, problem: String },
    #[error("sync.{key}: {path}: {problem}")]
    File {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
}

/// Why the sync task could not start.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Config(#[from] SyncConfigError),
    #[error("device id {0:?} is not valid (1-64 of A-Z a-z 0-9 . _ -)")]
    DeviceId(String),
}

/// One parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Parses `mqtt://host[:port]` (default 1883) or `mqtts://host[:port]` (default 8883).
pub fn parse_endpoint(url: &str) -> Option<Endpoint> {
    let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true, 8883)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false, 1883)
    } else {
        return None;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (rest, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') || port == 0 {
        return None;
    }
    Some(Endpoint {
        url: url.to_string(),
        host: host.to_string(),
        port,
        tls,
    })
}

impl SyncConfig {
    /// Every problem of these settings, each naming its key (empty: valid). Files are only
    /// checked for existence here; [`SyncConfig::validate`] also loads them.
    pub fn problems(&self) -> Vec<SyncConfigError> {
        let mut p = Vec::new();
        let key = |key: &'static str, problem: String| SyncConfigError::Key { key, problem };
        if self.urls.is_empty() {
            p.push(key("urls", "at least one broker URL is required".into()));
        }
        for u in &self.urls {
            match parse_endpoint(u) {
                None => p.push(key(
                    "urls",
                    format!("{u:?} is not mqtt://host[:port] or mqtts://host[:port]"),
                )),
                Some(e) if e.tls && self.ca_file.is_none() => p.push(key(
                    "ca_file",
                    format!("required for the TLS URL {u:?} (PEM file of the broker's CA)"),
                )),
                Some(_) => {}
            }
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            p.push(key(
                if self.client_cert.is_some() {
                    "client_key"
                } else {
                    "client_cert"
                },
                "client_cert and client_key go together (mutual TLS)".into(),
            ));
        }
        if self.password.is_some() && self.password_file.is_some() {
            p.push(key(
                "password_file",
                "set password or password_file, not both".into(),
            ));
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            p.push(key("username", "required with a password".into()));
        }
        if !(1..=3600).contains(&self.keep_alive_secs) {
            p.push(key(
                "keep_alive_secs",
                format!("{} is outside 1..=3600", self.keep_alive_secs),
            ));
        }
        if !(1..=300).contains(&self.connect_timeout_secs) {
            p.push(key(
                "connect_timeout_secs",
                format!("{} is outside 1..=300", self.connect_timeout_secs),
            ));
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            p.push(key(
                "backoff_min_ms",
                format!(
                    "{} must be at least 1 and at most backoff_max_ms ({})",
                    self.backoff_min_ms, self.backoff_max_ms
                ),
            ));
        }
        if self.backoff_max_ms > 3_600_000 {
            p.push(key(
                "backoff_max_ms",
                format!("{} is above one hour", self.backoff_max_ms),
            ));
        }
        if !(1..=wire::MAX_BATCH_RECORDS).contains(&self.batch_max_records) {
            p.push(key(
                "batch_max_records",
                format!(
                    "{} is outside 1..={}",
                    self.batch_max_records,
                    wire::MAX_BATCH_RECORDS
                ),
            ));
        }
        let max_bytes = wire::DEFAULT_MAX_BATCH_BYTES / 4;
        if !(1024..=max_bytes).contains(&self.batch_max_bytes) {
            p.push(key(
                "batch_max_bytes",
                format!("{} is outside 1024..={max_bytes}", self.batch_max_bytes),
            ));
        }
        if !(1..=1024).contains(&self.window) {
            p.push(key(
                "window",
                format!("{} is outside 1..=1024", self.window),
            ));
        }
        if !(100..=3_600_000).contains(&self.ack_timeout_ms) {
            p.push(key(
                "ack_timeout_ms",
                format!("{} is outside 100..=3600000", self.ack_timeout_ms),
            ));
        }
        let prefix_ok = !self.topic_prefix.is_empty()
            && !self.topic_prefix.starts_with('/')
            && !self.topic_prefix.ends_with('/')
            && !self.topic_prefix.contains(['+', '#', '\0']);
        if !prefix_ok {
            p.push(key(
                "topic_prefix",
                format!(
                    "{:?}: non-empty, no leading or trailing '/', no '+', '#'",
                    self.topic_prefix
                ),
            ));
        }
        for (k, path) in [
            ("ca_file", &self.ca_file),
            ("client_cert", &self.client_cert),
            ("client_key", &self.client_key),
            ("password_file", &self.password_file),
        ] {
            if let Some(path) = path {
                if !path.is_file() {
                    p.push(SyncConfigError::File {
                        key: k,
                        path: path.clone(),
                        problem: "not a readable file".into(),
                    });
                }
            }
        }
        p
    }

    /// Checks the settings and loads the TLS material and password file: the first problem,
    /// naming its key.
    pub fn validate(&self) -> Result<(), SyncConfigError> {
        if let Some(e) = self.problems().into_iter().next() {
            return Err(e);
        }
        if self.ca_file.is_some() {
            tls_config(self)?;
        }
        self.password_text()?;
        Ok(())
    }

    fn password_text(&self) -> Result<Option<String>, SyncConfigError> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        let Some(path) = &self.password_file else {
            return Ok(None);
        };
        let file_err = |problem: String| SyncConfigError::File {
            key: "password_file",
            path: path.clone(),
            problem,
        };
        let meta = std::fs::metadata(path).map_err(|e| file_err(e.to_string()))?;
        if meta.len() > 64 * 1024 {
            return Err(file_err("larger than 64 KiB".into()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        let line = text.lines().next().unwrap_or("").to_string();
        if line.is_empty() {
            return Err(file_err("empty".into()));
        }
        Ok(Some(line))
    }
}

/// The rustls client configuration (ring provider): the CA file's roots, and the client
/// certificate and key when both are set.
pub fn tls_config(cfg: &SyncConfig) -> Result<Arc<rustls::ClientConfig>, SyncConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let file_err = |key: &'static str, path: &PathBuf, problem: String| SyncConfigError::File {
        key,
        path: path.clone(),
        problem,
    };
    let Some(ca) = &cfg.ca_file else {
        return Err(SyncConfigError::Key {
            key: "ca_file",
            problem: "required for mqtts:// URLs".into(),
        });
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .map_err(|e| file_err("ca_file", ca, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err("ca_file", ca, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err("ca_file", ca, "no PEM certificate in it".into()));
    }
    for c in certs {
        roots
            .add(c)
            .map_err(|e| file_err("ca_file", ca, e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SyncConfigError::Key {
            key: "ca_file",
            problem: format!("TLS setup: {e}"),
        })?
        .with_root_certificates(roots);
    let config = match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(|e| file_err("client_cert", cert, e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| file_err("client_cert", cert, e.to_string()))?;
            if chain.is_empty() {
                return Err(file_err(
                    "client_cert",
                    cert,
                    "no PEM certificate in it".into(),
                ));
            }
            let pk = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| file_err("client_key", key, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, pk)
                .map_err(|e| file_err("client_key", key, e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Counters of the sync (for `/metrics`, `status --json` and tests).
#[derive(Debug, Default)]
pub struct SyncCounters {
    pub published_batches: AtomicU64,
    pub published_records: AtomicU64,
    pub published_bytes: AtomicU64,
    pub compressed_batches: AtomicU64,
    /// Acks received from the fleet.
    pub acks: AtomicU64,
    /// Records removed from the outbox by acks.
    pub acked_records: AtomicU64,
    /// Rewinds to the last ack (after a reconnect with unacknowledged batches, or an ack
    /// timeout).
    pub replays: AtomicU64,
    /// Successful connections (CONNACK) and connection errors.
    pub connects: AtomicU64,
    pub reconnects: AtomicU64,
    /// 1 while connected.
    pub connected: AtomicU64,
    pub commands: AtomicU64,
    pub commands_refused: AtomicU64,
    /// Outbox read/ack failures and unparsable acks.
    pub errors: AtomicU64,
    /// Record payloads that were not JSON (sent as an `invalid_body` object).
    pub invalid_bodies: AtomicU64,
    /// The broker URL of the current (or last) connection.
    pub current_broker: Mutex<String>,
    /// The last connection error, prefixed with the URL.
    pub last_error: Mutex<String>,
}

impl SyncCounters {
    pub fn current_broker(&self) -> String {
        self.current_broker
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn set(slot: &Mutex<String>, value: String) {
        if let Ok(mut s) = slot.lock() {
            *s = value;
        }
    }

    fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// The topics of one device.
#[derive(Debug, Clone)]
pub struct Topics {
    pub status: String,
    pub records: String,
    pub ack: String,
    pub commands: String,
    pub replies: String,
    /// `bundle/get` (device → fleet) and `bundle/chunk` (fleet → device).
    pub bundle_get: String,
    pub bundle_chunk: String,
}

impl Topics {
    pub fn new(prefix: &str, device: &str) -> Topics {
        let t = |leaf: &str| format!("{prefix}/{device}/{leaf}");
        Topics {
            status: t("status"),
            records: t("records"),
            ack: t("ack"),
            commands: t("commands"),
            replies: t("replies"),
            bundle_get: t(shared::delivery::GET_LEAF),
            bundle_chunk: t(shared::delivery::CHUNK_LEAF),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `base` plus up to half of it, pseudo-random (xorshift seeded from the clock).
fn jitter(base: Duration, state: &mut u64) -> Duration {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    base + base.mul_f64((x % 1000) as f64 / 2000.0)
}

fn wire_class(c: Class) -> RecordClass {
    match c {
        Class::Telemetry => RecordClass::Telemetry,
        Class::Drift => RecordClass::Drift,
        Class::Health => RecordClass::Health,
        Class::Event => RecordClass::Event,
    }
}

/// State shared by the event loop task and the pump.
struct Link {
    /// Connection generation: 0 while disconnected, else incremented on every CONNACK.
    generation: AtomicU64,
    /// Highest `through` the fleet acknowledged.
    acked: AtomicU64,
    changed: Notify,
}

/// Most commands being answered at once; more are dropped and counted as refused.
const COMMANDS_IN_FLIGHT: usize = 16;

/// What the sync asks of the rest of the agent: the birth message (models and versions
/// running now), and the answers to the fleet's commands.
#[derive(Clone)]
pub struct SyncHooks {
    pub status: Arc<dyn Fn() -> wire::Birth + Send + Sync>,
    pub commands: Arc<crate::command::Commands>,
}

/// What the sync does besides the outbox and commands (the service sets both).
#[derive(Clone, Default)]
pub struct SyncExtras {
    /// Bundle downloads: chunk frames go to it, it asks for chunks through the sync.
    pub downloads: Option<Arc<crate::download::Downloads>>,
    /// Notified when the birth changed (a version activated, committed, rolled back).
    pub birth_changed: Option<Arc<Notify>>,
}

/// [`run_with`] without downloads and birth updates.
pub async fn run(
    cfg: SyncConfig,
    device_id: String,
    outbox: Outbox,
    hooks: SyncHooks,
    counters: Arc<SyncCounters>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<(), SyncError> {
    run_with(
        cfg,
        device_id,
        outbox,
        hooks,
        SyncExtras::default(),
        counters,
        wake,
        shutdown,
    )
    .await
}

/// The retained birth payload, as of now.
fn birth_payload(hooks: &SyncHooks, device_id: &str) -> Vec<u8> {
    let mut birth = (hooks.status)();
    birth.v = wire::VERSION;
    birth.device = device_id.to_string();
    birth.sent_at_ms = now_ms();
    wire::to_json(&wire::Status::Online(birth))
}

/// Runs the sync until `shutdown`: connects (failing over across `cfg.urls`), publishes the
/// outbox and applies the fleet's acks; on shutdown publishes the death message and
/// disconnects. `wake` is notified by whoever appends to the outbox.
#[allow(clippy::too_many_arguments)]
pub async fn run_with(
    cfg: SyncConfig,
    device_id: String,
    outbox: Outbox,
    hooks: SyncHooks,
    extras: SyncExtras,
    counters: Arc<SyncCounters>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<(), SyncError> {
    if !wire::valid_device_id(&device_id) {
        return Err(SyncError::DeviceId(device_id));
    }
    if let Some(e) = cfg.problems().into_iter().next() {
        return Err(e.into());
    }
    let endpoints: Vec<Endpoint> = cfg.urls.iter().filter_map(|u| parse_endpoint(u)).collect();
    let tls = if endpoints.iter().any(|e| e.tls) {
        Some(tls_config(&cfg)?)
    } else {
        None
    };
    let password = cfg.password_text()?;
    let topics = Topics::new(&cfg.topic_prefix, &device_id);
    let death = |reason: &str| {
        wire::to_json(&wire::Status::Offline(wire::Death {
            v: wire::VERSION,
            device: device_id.clone(),
            reason: reason.into(),
        }))
    };
    let options = |i: usize| -> MqttOptions {
        let ep = &endpoints[i % endpoints.len()];
        let mut o = MqttOptions::new(device_id.clone(), ep.host.clone(), ep.port);
        o.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs));
        o.set_clean_session(true);
        let out_max = cfg.batch_max_bytes + cfg.batch_max_records * 160 + 64 * 1024;
        let in_max = if extras.downloads.is_some() {
            MAX_CHUNK_PACKET_BYTES
        } else {
            MAX_INCOMING_BYTES
        };
        o.set_max_packet_size(in_max, out_max);
        o.set_last_will(LastWill::new(
            topics.status.clone(),
            death("connection-lost"),
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(user) = &cfg.username {
            o.set_credentials(user.clone(), password.clone().unwrap_or_default());
        }
        if ep.tls {
            if let Some(t) = &tls {
                o.set_transport(rumqttc::Transport::tls_with_config(
                    rumqttc::TlsConfiguration::Rustls(t.clone()),
                ));
            }
        }
        o
    };
    let (client, mut events): (AsyncClient, EventLoop) =
        AsyncClient::new(options(0), cfg.window + 16);
    events
        .network_options
        .set_connection_timeout(cfg.connect_timeout_secs);

    // acks for another outbox epoch (sent before this outbox was recreated) are ignored
    let epoch = outbox.epoch();
    let commands_in_flight = Arc::new(tokio::sync::Semaphore::new(COMMANDS_IN_FLIGHT));
    let link = Arc::new(Link {
        generation: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        changed: Notify::new(),
    });
    let pump_stop = shutdown.child_token();
    let pump = tokio::spawn(pump(
        cfg.clone(),
        device_id.clone(),
        outbox,
        client.clone(),
        topics.clone(),
        link.clone(),
        counters.clone(),
        wake,
        pump_stop.clone(),
    ));
    // birth updates: republished while connected (coalesced: one per 100 ms at most)
    let birth_task = extras.birth_changed.clone().map(|changed| {
        let (hooks, link, client, stop) = (
            hooks.clone(),
            link.clone(),
            client.clone(),
            pump_stop.clone(),
        );
        let (topic, device) = (topics.status.clone(), device_id.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = changed.notified() => {}
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if link.generation.load(Ordering::Acquire) == 0 {
                    // the next connect publishes a fresh birth anyway
                    continue;
                }
                let h = hooks.clone();
                let d = device.clone();
                let Ok(payload) = tokio::task::spawn_blocking(move || birth_payload(&h, &d)).await
                else {
                    continue;
                };
                if client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, true, payload)
                    .is_err()
                {
                    tracing::warn!("sync: birth update dropped (queue full)");
                }
            }
        })
    });

    let mut idx = 0usize;
    let mut generation = 0u64;
    let backoff_min = Duration::from_millis(cfg.backoff_min_ms);
    let backoff_max = Duration::from_millis(cfg.backoff_max_ms);
    let mut backoff = backoff_min;
    let mut rng = now_ms() ^ 0x9E37_79B9_7F4A_7C15 ^ (device_id.len() as u64) << 32;
    let mut connected = false;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff = backoff_min;
                generation += 1;
                SyncCounters::bump(&counters.connects);
                counters.connected.store(1, Ordering::Relaxed);
                let url = endpoints[idx % endpoints.len()].url.clone();
                tracing::info!(%url, "sync: connected");
                SyncCounters::set(&counters.current_broker, url);
                let mut subscribe = vec![&topics.ack, &topics.commands];
                if extras.downloads.is_some() {
                    subscribe.push(&topics.bundle_chunk);
                }
                for t in subscribe {
                    if client.try_subscribe(t.clone(), QoS::AtLeastOnce).is_err() {
                        tracing::warn!(topic = %t, "sync: subscribe request dropped (queue full)");
                    }
                }
                let payload = birth_payload(&hooks, &device_id);
                if client
                    .try_publish(topics.status.clone(), QoS::AtLeastOnce, true, payload)
                    .is_err()
                {
                    tracing::warn!("sync: birth dropped (queue full)");
                }
                link.generation.store(generation, Ordering::Release);
                link.changed.notify_one();
                if let Some(d) = &extras.downloads {
                    let (c, topic) = (client.clone(), topics.bundle_get.clone());
                    let publisher: crate::download::Publisher =
                        Arc::new(move |req: &shared::delivery::ChunkRequest| {
                            let Ok(body) = serde_json::to_vec(req) else {
                                return false;
                            };
                            c.try_publish(topic.clone(), QoS::AtLeastOnce, false, body)
                                .is_ok()
                        });
                    d.link_up(generation, publisher);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if p.topic == topics.bundle_chunk {
                    if let Some(d) = &extras.downloads {
                        d.on_frame(p.payload.to_vec());
                    }
                    continue;
                }
                if p.payload.len() > MAX_INCOMING_BYTES {
                    SyncCounters::bump(&counters.errors);
                    tracing::warn!(topic = %p.topic, bytes = p.payload.len(), "sync: oversized message ignored");
                    continue;
                }
                if p.topic == topics.ack {
                    match wire::parse_ack(&p.payload) {
                        Ok(a) if a.epoch != 0 && a.epoch != epoch => {
                            SyncCounters::bump(&counters.errors);
                            tracing::warn!(
                                ack_epoch = a.epoch,
                                outbox_epoch = epoch,
                                through = a.through,
                                "sync: ack for another outbox epoch ignored"
                            );
                        }
                        Ok(a) => {
                            SyncCounters::bump(&counters.acks);
                            link.acked.fetch_max(a.through, Ordering::AcqRel);
                            link.changed.notify_one();
                        }
                        Err(e) => {
                            SyncCounters::bump(&counters.errors);
                            tracing::warn!(error = %e, "sync: bad ack");
                        }
                    }
                } else if p.topic == topics.commands {
                    SyncCounters::bump(&counters.commands);
                    // verifying a directive saves its counter (an fsync): off the event loop,
                    // at most COMMANDS_IN_FLIGHT at once (a flood is refused, not queued)
                    let Ok(permit) = commands_in_flight.clone().try_acquire_owned() else {
                        SyncCounters::bump(&counters.commands_refused);
                        tracing::warn!("sync: command dropped: {COMMANDS_IN_FLIGHT} in flight");
                        continue;
                    };
                    let (commands, counters, client) =
                        (hooks.commands.clone(), counters.clone(), client.clone());
                    let replies = topics.replies.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let payload = p.payload;
                        let reply = tokio::task::spawn_blocking(move || {
                            commands.answer(&payload, now_ms())
                        })
                        .await
                        .unwrap_or_else(|_| wire::CommandReply {
                            v: wire::VERSION,
                            id: String::new(),
                            ok: false,
                            error: Some("the command handler failed".into()),
                        });
                        if !reply.ok {
                            SyncCounters::bump(&counters.commands_refused);
                        }
                        let _ = client.try_publish(
                            replies,
                            QoS::AtLeastOnce,
                            false,
                            wire::to_json(&reply),
                        );
                    });
                }
            }
            Ok(_) => {}
            Err(e) => {
                let url = endpoints[idx % endpoints.len()].url.clone();
                if connected {
                    connected = false;
                    link.generation.store(0, Ordering::Release);
                    link.changed.notify_one();
                    if let Some(d) = &extras.downloads {
                        d.link_down();
                    }
                }
                counters.connected.store(0, Ordering::Relaxed);
                SyncCounters::bump(&counters.reconnects);
                let msg = describe_error(&e);
                SyncCounters::set(&counters.last_error, format!("{url}: {msg}"));
                let wait = jitter(backoff, &mut rng);
                tracing::warn!(%url, error = %msg, retry_in = ?wait, "sync: mqtt connection error");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(backoff_max);
                if endpoints.len() > 1 {
                    idx = (idx + 1) % endpoints.len();
                    events.mqtt_options = options(idx);
                }
            }
        }
    }
    pump_stop.cancel();
    let _ = pump.await;
    if let Some(t) = birth_task {
        let _ = t.await;
    }
    if let Some(d) = &extras.downloads {
        d.link_down();
    }
    if connected {
        // clean shutdown: retained death, then DISCONNECT (so the last will is not sent)
        let _ = client.try_publish(
            topics.status.clone(),
            QoS::AtLeastOnce,
            true,
            death("shutdown"),
        );
        let _ = client.try_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    counters.connected.store(0, Ordering::Relaxed);
    Ok(())
}

/// A readable connection error; TLS failures say so (rumqttc reports a handshake alert as
/// an I/O or deserialization error), with a hint for the usual causes.
fn describe_error(e: &rumqttc::ConnectionError) -> String {
    let s = e.to_string();
    let tls = matches!(e, rumqttc::ConnectionError::Tls(_))
        || ["alert", "certificate", "Certificate", "TLS", "tls"]
            .iter()
            .any(|w| s.contains(w));
    if !tls {
        return s;
    }
    let hint = if s.contains("CertificateRequired") || s.contains("HandshakeFailure") {
        " (the broker requires a client certificate: set sync.client_cert and sync.client_key)"
    } else if s.contains("UnknownIssuer") || s.contains("invalid peer certificate") {
        " (the broker's certificate is not signed by a CA in sync.ca_file, or names another host)"
    } else if s.contains("UnknownCA") || s.contains("BadCertificate") {
        " (the broker does not accept this client certificate)"
    } else {
        ""
    };
    format!("TLS: {s}{hint}")
}

/// A batch ready to publish.
struct Prepared {
    payload: Vec<u8>,
    last: u64,
    records: u64,
    compressed: bool,
    invalid_bodies: u64,
}

/// What [`prepare`] reads from the outbox: a trait so that a test can replay the view of a
/// read that raced with an append (see [`prepare`]).
trait Source {
    /// The last seq whose append has completed (its records are all in the database).
    fn last_seq(&self) -> u64;
    /// Pending records with seq > `after`, in seq order.
    fn read_after(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError>;
    /// The cumulative drop counters, per class.
    fn dropped(&self) -> std::collections::BTreeMap<RecordClass, wire::DropCounts>;
    /// The outbox epoch (its seq space).
    fn epoch(&self) -> u64;
}

impl Source for Outbox {
    fn last_seq(&self) -> u64 {
        Outbox::last_seq(self)
    }

    fn epoch(&self) -> u64 {
        Outbox::epoch(self)
    }

    fn read_after(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        // raises the published-through watermark under the outbox lock: a record handed to
        // the publisher can no longer be evicted by the cap or the TTL, so it is never both
        // delivered and counted dropped
        Outbox::read_for_publish(self, after, max_records, max_bytes)
    }

    fn dropped(&self) -> std::collections::BTreeMap<RecordClass, wire::DropCounts> {
        let stats = self.stats();
        Class::ALL
            .iter()
            .map(|&c| {
                let s = stats.class(c);
                let counts = wire::DropCounts {
                    cap: s.dropped(DropReason::Cap),
                    ttl: s.dropped(DropReason::Ttl),
                    io: s.dropped(DropReason::Io),
                };
                (wire_class(c), counts)
            })
            .collect()
    }
}

/// Reads the next batch after `after` and encodes it (runs on the blocking pool).
///
/// The batch holds only records up to the outbox's last seq as it was *before* the read:
/// `Outbox::read_after` merges one sled iterator per class, created one after the other
/// without the outbox lock, so a read that races an append can return that append's records
/// of one class without those of another (seen: the 10 events of a 100-record append without
/// its 90 telemetry records, published with `prev` below them and then acknowledged: silent
/// loss). Every record with seq <= that last seq was in the database before the iterators
/// were created, so below it the read is complete; later records wait for the next read.
/// The drop counters are read after the records, so every record missing from the read
/// because it was dropped is already counted in `dropped` (the fleet checks that).
fn prepare<S: Source + ?Sized>(
    outbox: &S,
    device: &str,
    after: u64,
    cfg: &SyncConfig,
) -> Result<Option<Prepared>, OutboxError> {
    let complete_through = outbox.last_seq();
    let mut recs = outbox.read_after(after, cfg.batch_max_records, cfg.batch_max_bytes)?;
    recs.truncate(recs.partition_point(|r| r.seq <= complete_through));
    let (Some(first), Some(last)) = (recs.first().map(|r| r.seq), recs.last().map(|r| r.seq))
    else {
        return Ok(None);
    };
    let dropped = outbox.dropped();
    let mut invalid_bodies = 0;
    let n = recs.len() as u64;
    let records = recs
        .into_iter()
        .map(|r| {
            let len = r.payload.len();
            let body = String::from_utf8(r.payload)
                .ok()
                .and_then(|s| RawValue::from_string(s).ok())
                .unwrap_or_else(|| {
                    invalid_bodies += 1;
                    RawValue::from_string(format!("{{\"invalid_body\":true,\"bytes\":{len}}}"))
                        .unwrap_or_else(|_| RawValue::NULL.to_owned())
                });
            wire::Record {
                seq: r.seq,
                class: wire_class(r.class),
                produced_at_ms: r.produced_at_ms,
                body,
            }
        })
        .collect();
    let batch = wire::Batch {
        v: wire::VERSION,
        device: device.to_string(),
        first,
        last,
        prev: after,
        records,
        dropped,
        sent_at_ms: now_ms(),
        epoch: outbox.epoch(),
    };
    let payload = match wire::encode_batch(&batch, cfg.compress_above_bytes, ZSTD_LEVEL) {
        Ok(p) => p,
        // compression failure: send it plain
        Err(_) => wire::encode_batch(&batch, usize::MAX, ZSTD_LEVEL).unwrap_or_default(),
    };
    Ok(Some(Prepared {
        compressed: wire::is_compressed(&payload),
        payload,
        last,
        records: n,
        invalid_bodies,
    }))
}

#[allow(clippy::too_many_arguments)]
async fn pump(
    cfg: SyncConfig,
    device: String,
    outbox: Outbox,
    client: AsyncClient,
    topics: Topics,
    link: Arc<Link>,
    counters: Arc<SyncCounters>,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let ack_timeout = Duration::from_millis(cfg.ack_timeout_ms);
    let device: Arc<str> = device.into();
    let cfg = Arc::new(cfg);
    let mut seen_generation = 0u64;
    // the last seq published (or acknowledged) on this connection: the next batch's `prev`
    let mut cursor = outbox.acked_through();
    let mut outbox_acked = cursor;
    // the highest seq published since start: acks are applied up to it, never beyond
    let mut highest = cursor;
    let mut window: VecDeque<(u64, Instant)> = VecDeque::new();
    loop {
        if stop.is_cancelled() {
            return;
        }
        let generation = link.generation.load(Ordering::Acquire);
        if generation == 0 {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = link.changed.notified() => {}
            }
            continue;
        }
        if generation != seen_generation {
            seen_generation = generation;
            if !window.is_empty() {
                SyncCounters::bump(&counters.replays);
            }
            window.clear();
            cursor = outbox.acked_through();
        }

        // apply the fleet's acks
        let target = link.acked.load(Ordering::Acquire).min(highest);
        if target > outbox_acked {
            let ob = outbox.clone();
            match tokio::task::spawn_blocking(move || ob.ack_through(target)).await {
                Ok(Ok(n)) => {
                    outbox_acked = target;
                    counters.acked_records.fetch_add(n, Ordering::Relaxed);
                }
                Ok(Err(e)) => {
                    SyncCounters::bump(&counters.errors);
                    tracing::warn!(error = %e, through = target, "sync: outbox ack failed");
                }
                Err(e) => tracing::warn!(error = %e, "sync: outbox ack task failed"),
            }
        }
        while window
            .front()
            .is_some_and(|(last, _)| *last <= outbox_acked)
        {
            window.pop_front();
        }
        if cursor < outbox_acked {
            cursor = outbox_acked;
        }

        // an ack overdue: rewind to the last ack and replay in order
        if window
            .front()
            .is_some_and(|(_, sent)| sent.elapsed() >= ack_timeout)
        {
            SyncCounters::bump(&counters.replays);
            tracing::info!(from = outbox_acked, "sync: ack timeout, replaying");
            window.clear();
            cursor = outbox_acked;
        }

        // publish the next batch
        if window.len() < cfg.window {
            let (ob, dev, c) = (outbox.clone(), device.clone(), cfg.clone());
            let after = cursor;
            match tokio::task::spawn_blocking(move || prepare(&ob, &dev, after, &c)).await {
                Ok(Ok(Some(b))) => {
                    if link.generation.load(Ordering::Acquire) != seen_generation {
                        continue;
                    }
                    let size = b.payload.len() as u64;
                    let published = tokio::select! {
                        _ = stop.cancelled() => return,
                        r = client.publish(topics.records.clone(), QoS::AtLeastOnce, false, b.payload) => r,
                    };
                    if published.is_err() {
                        // the event loop is gone
                        return;
                    }
                    window.push_back((b.last, Instant::now()));
                    cursor = b.last;
                    highest = highest.max(b.last);
                    SyncCounters::bump(&counters.published_batches);
                    counters
                        .published_records
                        .fetch_add(b.records, Ordering::Relaxed);
                    counters.published_bytes.fetch_add(size, Ordering::Relaxed);
                    if b.compressed {
                        SyncCounters::bump(&counters.compressed_batches);
                    }
                    counters
                        .invalid_bodies
                        .fetch_add(b.invalid_bodies, Ordering::Relaxed);
                    continue;
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    SyncCounters::bump(&counters.errors);
                    tracing::warn!(error = %e, "sync: outbox read failed");
                }
                Err(e) => tracing::warn!(error = %e, "sync: outbox read task failed"),
            }
        }

        // nothing to do until an ack, new records, a connection change or a timeout
        let wait = window
            .front()
            .map(|(_, sent)| ack_timeout.saturating_sub(sent.elapsed()))
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(5));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = link.changed.notified() => {}
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = parse_endpoint("mqtts://broker.plant:8884").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("broker.plant", 8884, true)
        );
        let e = parse_endpoint("mqtt://10.0.0.5").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.tls), ("10.0.0.5", 1883, false));
        assert_eq!(parse_endpoint("mqtts://h").unwrap().port, 8883);
        assert_eq!(parse_endpoint("mqtt://[::1]:1884").unwrap().host, "::1");
        for bad in [
            "http://h:1",
            "mqtt://",
            "mqtt://:1",
            "mqtt://h:x",
            "mqtt://h:0",
        ] {
            assert!(parse_endpoint(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn config_names_the_bad_key() {
        let parse = |toml_text: &str| toml::from_str::<SyncConfig>(toml_text);
        let err = parse("urls = [\"mqtt://h\"]\nbatch_size = 3\n").unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
        let ok = parse("urls = [\"mqtt://a:1883\", \"mqtt://b:1883\"]\n").unwrap();
        assert_eq!(ok.window, 8);
        assert!(ok.validate().is_ok());
        let cases: &[(&str, &str)] = &[
            ("", "sync.urls"),
            ("urls = [\"ftp://h\"]", "sync.urls"),
            ("urls = [\"mqtts://h\"]", "sync.ca_file"),
            (
                "urls = [\"mqtt://h\"]\nclient_cert = \"/etc/hostname\"",
                "sync.client_key",
            ),
            ("urls = [\"mqtt://h\"]\npassword = \"x\"", "sync.username"),
            (
                "urls = [\"mqtt://h\"]\nbackoff_min_ms = 0",
                "sync.backoff_min_ms",
            ),
            (
                "urls = [\"mqtt://h\"]\nbatch_max_records = 0",
                "sync.batch_max_records",
            ),
            (
                "urls = [\"mqtt://h\"]\nbatch_max_bytes = 10",
                "sync.batch_max_bytes",
            ),
            ("urls = [\"mqtt://h\"]\nwindow = 0", "sync.window"),
            (
                "urls = [\"mqtt://h\"]\nack_timeout_ms = 1",
                "sync.ack_timeout_ms",
            ),
            (
                "urls = [\"mqtt://h\"]\ntopic_prefix = \"edge/#\"",
                "sync.topic_prefix",
            ),
            (
                "urls = [\"mqtt://h\"]\nkeep_alive_secs = 0",
                "sync.keep_alive_secs",
            ),
            (
                "urls = [\"mqtts://h\"]\nca_file = \"/nonexistent/ca.pem\"",
                "sync.ca_file: /nonexistent/ca.pem",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(text).unwrap().validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
        // a CA file that holds no certificate
        let tmp = tempfile::tempdir().unwrap();
        let ca = tmp.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let cfg = SyncConfig {
            urls: vec!["mqtts://h".into()],
            ca_file: Some(ca),
            ..SyncConfig::default()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("sync.ca_file") && err.contains("no PEM certificate"),
            "{err}"
        );
        // password file: first line
        let pw = tmp.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let cfg = SyncConfig {
            urls: vec!["mqtt://h".into()],
            username: Some("dev".into()),
            password_file: Some(pw),
            ..SyncConfig::default()
        };
        assert_eq!(cfg.password_text().unwrap().as_deref(), Some("s3cret"));
    }

    #[test]
    fn jitter_stays_within_half() {
        let mut s = 12345;
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(1000), &mut s);
            assert!(j >= Duration::from_millis(1000) && j < Duration::from_millis(1500));
        }
    }

    /// An outbox in the middle of an append, as `Outbox::read_after` can see it (one sled
    /// iterator per class, created one after the other without the outbox lock): the
    /// telemetry iterator was created before the append 101..=200 was applied, the event
    /// iterator after it, so the read returns only that append's events; `last_seq` still
    /// says 100 (the append has not returned).
    struct MidAppend {
        committed: u64,
        visible_in_flight: Vec<u64>,
        /// `last_seq` as the pre-fix `prepare` effectively used it: no bound at all.
        unbounded: bool,
    }

    fn record(seq: u64) -> Record {
        Record {
            seq,
            class: if seq.is_multiple_of(10) {
                Class::Event
            } else {
                Class::Telemetry
            },
            produced_at_ms: seq,
            payload: format!("{{\"i\":{seq}}}").into_bytes(),
        }
    }

    impl Source for MidAppend {
        fn last_seq(&self) -> u64 {
            if self.unbounded {
                u64::MAX
            } else {
                self.committed
            }
        }

        fn read_after(
            &self,
            after: u64,
            max_records: usize,
            _max_bytes: usize,
        ) -> Result<Vec<Record>, OutboxError> {
            Ok((after + 1..=self.committed)
                .chain(self.visible_in_flight.iter().copied())
                .filter(|&s| s > after)
                .take(max_records)
                .map(record)
                .collect())
        }

        fn epoch(&self) -> u64 {
            1
        }

        fn dropped(&self) -> std::collections::BTreeMap<RecordClass, wire::DropCounts> {
            Class::ALL
                .iter()
                .map(|&c| (wire_class(c), wire::DropCounts::default()))
                .collect()
        }
    }

    /// The loss seen in `sync_broker_restarted_mid_stream` (5910 of 6000 records stored),
    /// replayed deterministically through `prepare` and the real fleet ingest.
    #[test]
    fn a_read_racing_an_append_never_loses_records() {
        use fleet_server::ingest::{FileStore, Ingest, IngestCounters, Outcome};
        let tmp = tempfile::tempdir().unwrap();
        let counters = Arc::new(IngestCounters::default());
        let mut fleet = Ingest::new(FileStore::open(tmp.path()).unwrap(), counters, 1 << 24);
        let cfg = SyncConfig::default();
        let dev = "press-1";
        let send = |fleet: &mut Ingest<FileStore>, b: &Prepared| {
            fleet.handle_payload(dev, &b.payload).unwrap()
        };

        let settled = MidAppend {
            committed: 100,
            visible_in_flight: vec![],
            unbounded: false,
        };
        let b = prepare(&settled, dev, 0, &cfg).unwrap().unwrap();
        assert_eq!((b.last, b.records), (100, 100));
        assert_eq!(
            send(&mut fleet, &b),
            Outcome::Ack {
                through: 100,
                new: 100
            }
        );

        // the read after 100 races the append of 101..=200
        let racing = MidAppend {
            committed: 100,
            visible_in_flight: (110..=200).step_by(10).collect(),
            unbounded: false,
        };
        assert!(
            prepare(&racing, dev, 100, &cfg).unwrap().is_none(),
            "records of an append that has not returned are not published"
        );
        // what the agent published before the fix: prev 100, records 110, 120, ..., 200;
        // the fleet used to store and acknowledge it through 200 (90 records lost); now it
        // refuses it
        let old = MidAppend {
            unbounded: true,
            ..racing
        };
        let b = prepare(&old, dev, 100, &cfg).unwrap().unwrap();
        assert_eq!((b.last, b.records), (200, 10));
        assert_eq!(
            send(&mut fleet, &b),
            Outcome::Unaccounted {
                last_seq: 100,
                skipped: 90,
                dropped: 0
            }
        );

        // the append has returned: the next read is complete
        let done = MidAppend {
            committed: 200,
            visible_in_flight: vec![],
            unbounded: false,
        };
        let b = prepare(&done, dev, 100, &cfg).unwrap().unwrap();
        assert_eq!((b.last, b.records), (200, 100));
        assert_eq!(
            send(&mut fleet, &b),
            Outcome::Ack {
                through: 200,
                new: 100
            }
        );
        let stored: Vec<u64> = FileStore::read_records(tmp.path(), dev, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(stored, (1..=200).collect::<Vec<u64>>());
    }
}
