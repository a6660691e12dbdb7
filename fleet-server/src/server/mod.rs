//! `fleet-server run`: the embedded MQTT broker (unless an external one is configured), the
//! telemetry ingest into `<state_dir>/ingest`, and the admin HTTP API, with one shutdown path
//! (a cancellation token; ingest, HTTP drain and broker stop within a deadline).

pub mod api;
pub mod broker;
pub mod config;
pub mod http;
pub mod sink;
pub mod tls;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::alerts::Alerts;
use crate::audit::AuditLog;
use crate::bundles::BundleStore;
use crate::delivery::Delivery;
use crate::directives::Issuer;
use crate::ingest::{self, FileStore, IngestConfig, IngestCounters};
use crate::registry::{Registry, TagSelector};
use crate::rollout::Rollouts;
use crate::store::Db;
use broker::{BrokerError, BrokerLimits, EmbeddedBroker};
use config::{BrokerChoice, Config, Token};

/// How long in-flight HTTP requests and the ingest get to finish after a shutdown request.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Name of the bootstrap token file in the state directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {problem}")]
    AdminToken { path: PathBuf, problem: String },
    #[error("the configuration names no broker (validate it first)")]
    NoBroker,
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("ingest store: {0}")]
    Store(#[from] ingest::StoreError),
    #[error("ingest: {0}")]
    Ingest(#[from] ingest::IngestError),
    #[error(transparent)]
    State(#[from] crate::store::StoreError),
    #[error("audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("bundle store: {0}")]
    Bundles(#[from] crate::bundles::BundleError),
    #[error("directive key: {0}")]
    Directives(#[from] crate::directives::IssueError),
    #[error("rollouts: {0}")]
    Rollouts(#[from] crate::rollout::RolloutError),
    #[error("alerts: {0}")]
    Alerts(#[from] crate::alerts::AlertError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("admin API on {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

fn io<'p>(path: &'p Path, op: &'static str) -> impl FnOnce(std::io::Error) -> ServerError + 'p {
    move |source| ServerError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The bootstrap admin token: `<state_dir>/admin-token`, created once (`create_new`, mode
/// 0600, 32 random bytes as hex) and reused on later starts. Returns the token's entry.
pub fn bootstrap_token(state_dir: &Path) -> Result<(Token, PathBuf, bool), ServerError> {
    let path = state_dir.join(ADMIN_TOKEN_FILE);
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(io(Path::new("/dev/urandom"), "read random bytes"))?;
    let fresh = shared::trust::hex(&secret);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let created = match opts.open(&path) {
        Ok(mut f) => {
            f.write_all(format!("{fresh}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io(&path, "write"))?;
            if let Ok(d) = std::fs::File::open(state_dir) {
                let _ = d.sync_all();
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(io(&path, "create")(e)),
    };
    let mut text = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(1024).read_to_string(&mut text))
        .map_err(io(&path, "read"))?;
    let secret = text.trim();
    if secret.len() < 32 || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ServerError::AdminToken {
            path,
            problem: "not a token (expected at least 32 printable characters); delete it to get a new one".into(),
        });
    }
    let token = Token::from_secret("bootstrap-admin", secret, "admin");
    Ok((token, path, created))
}

/// Runs the server until `shutdown` is cancelled (or a component fails). `http` is bound by
/// the caller; `config` must be valid ([`Config::validate`]).
pub async fn run(
    config: Config,
    http: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let state_dir = config.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(io(&state_dir, "create directory"))?;
    let mut tokens = config.http.tokens.clone();
    if tokens.is_empty() {
        let (t, path, created) = bootstrap_token(&state_dir)?;
        if created {
            tracing::info!(path = %path.display(), "created the admin token (no [[http.tokens]] configured)");
        } else {
            tracing::info!(path = %path.display(), "using the admin token (no [[http.tokens]] configured)");
        }
        tokens.push(t);
    }
    let store_dir = state_dir.join("ingest");
    let store = FileStore::open_with(&store_dir, config.ingest.retention())?;

    let mut embedded = None;
    let url = match config.broker_choice().ok_or(ServerError::NoBroker)? {
        BrokerChoice::Embedded(addr) => {
            let b = EmbeddedBroker::start(
                addr,
                &BrokerLimits {
                    max_connections: config.broker.max_connections,
                    max_payload_bytes: config.broker.max_payload_bytes,
                },
            )
            .await?;
            tracing::info!(listen = %b.addr(), "embedded MQTT broker listening on {}", b.url());
            let url = b.url();
            embedded = Some(b);
            url
        }
        BrokerChoice::External(url) => {
            tracing::info!(%url, "using the external MQTT broker");
            url
        }
    };

    // the state database and the modules on it
    let db = Db::open(&state_dir)?;
    let (audit, report) = AuditLog::open(&state_dir.join("audit.jsonl"))?;
    tracing::info!(report = ?report, "audit log open");
    let registry = Arc::new(Registry::open(db.clone())?);
    let bundles = Arc::new(BundleStore::open_with_keyring(
        db.clone(),
        state_dir.join("bundles"),
        &config.bundles,
        config.bundles.keyring.clone(),
    )?);
    let issuer = Arc::new(Issuer::open(&config.directives, &state_dir, db.clone())?);
    tracing::info!(key = %issuer.key_path().display(), "directive signing key (give its .pub to the agents' [sync] directive_keys)");
    let alerts = Arc::new(Alerts::new(&config.alerts)?);

    // one MQTT connection for the ingest, status, replies and directives; a second one with
    // a small queue for bundle chunks, so that chunk frames waiting to be sent stay bounded
    let counters = Arc::new(IngestCounters::default());
    let mut icfg = IngestConfig::new(&url);
    icfg.topic_prefix = config.topic_prefix.clone();
    if let Some(id) = config.mqtt.as_ref().and_then(|m| m.client_id.clone()) {
        icfg.client_id = id;
    }
    let opts = tls::mqtt_options(&url, &icfg.client_id, config.mqtt.as_ref())?;
    let (client, events) = ingest::connect(&icfg, opts);
    let publisher = ingest::publisher(&client, &config.topic_prefix);
    let mut dopts = tls::mqtt_options(
        &url,
        &format!("{}-delivery", icfg.client_id),
        config.mqtt.as_ref(),
    )?;
    dopts.set_keep_alive(icfg.keep_alive);
    let max_frame = config.bundles.chunk_bytes + 16 * 1024;
    dopts.set_max_packet_size(max_frame, max_frame);
    let (dclient, mut devents) = rumqttc::AsyncClient::new(dopts, DELIVERY_QUEUE);
    let stop = CancellationToken::new();
    let dstop = stop.clone();
    let delivery_loop = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = dstop.cancelled() => break,
                ev = devents.poll() => if let Err(e) = ev {
                    tracing::warn!(error = %e, "bundle delivery: mqtt connection error");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
    let delivery = Arc::new(Delivery::new(
        bundles.clone(),
        u32::try_from(config.bundles.chunk_bytes)
            .unwrap_or(shared::delivery::DEFAULT_CHUNK_BYTES as u32),
        blocking_publisher(dclient.clone(), &config.topic_prefix),
    ));
    let rollouts = Arc::new(Rollouts::open(
        db.clone(),
        issuer,
        publisher,
        Some(alerts.clone()),
    )?);
    tokio::spawn(alerts.clone().run(stop.clone()));
    let sink = Arc::new(sink::FleetSink {
        registry: registry.clone(),
        rollouts: rollouts.clone(),
        delivery: delivery.clone(),
        alerts: alerts.clone(),
    });
    let mut ingest_task = tokio::spawn(ingest::run_with(
        icfg,
        client,
        events,
        store,
        counters.clone(),
        sink,
        stop.clone(),
    ));
    tracing::info!(dir = %store_dir.display(), "ingest storing records");

    // deadlines, promotions and re-sends
    let tick_rollouts = rollouts.clone();
    let tick_stop = stop.clone();
    let tick_every = Duration::from_millis(config.rollouts.tick_ms);
    let tick_task = tokio::spawn(async move {
        let mut every = tokio::time::interval(tick_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick_stop.cancelled() => break,
                _ = every.tick() => {}
            }
            let r = tick_rollouts.clone();
            match tokio::task::spawn_blocking(move || r.tick(crate::directives::now_ms())).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "rollouts: tick failed"),
                Err(e) => tracing::warn!(error = %e, "rollouts: tick panicked"),
                Ok(Ok(())) => {}
            }
        }
    });

    let http_addr = http
        .local_addr()
        .map_or_else(|_| config.http.listen.clone(), |a| a.to_string());
    let resources = vec![
        api::devices::router(Arc::new(api::devices::DevicesState {
            tokens: tokens.clone(),
            registry: registry.clone(),
            ingest_root: store_dir.clone(),
        })),
        api::bundles::router(Arc::new(api::bundles::BundlesState {
            tokens: tokens.clone(),
            store: bundles.clone(),
            audit: audit.clone(),
        })),
        api::rollouts::router(Arc::new(api::rollouts::RolloutsState {
            tokens: tokens.clone(),
            rollouts: rollouts.clone(),
            audit: audit.clone(),
            resolve_bundle: resolve_bundle(bundles.clone()),
            resolve_targets: resolve_targets(registry.clone()),
            model_devices: model_devices(registry.clone()),
            default_wave_timeout_secs: config.rollouts.default_wave_timeout_secs,
        })),
        api::audit::router(Arc::new(api::audit::AuditState {
            tokens: tokens.clone(),
            audit: audit.clone(),
        })),
    ];
    let metrics: Vec<http::MetricsSource> = vec![
        {
            let r = registry.clone();
            Arc::new(move || sink::registry_metrics(&r))
        },
        {
            let d = delivery.clone();
            Arc::new(move || sink::delivery_metrics(&d))
        },
        {
            let r = rollouts.clone();
            Arc::new(move || r.render_metrics())
        },
        {
            let a = alerts.clone();
            Arc::new(move || a.render_metrics())
        },
    ];
    let app = http::router(
        Arc::new(http::AppState {
            tokens,
            counters: counters.clone(),
            metrics,
        }),
        resources,
    );
    let http_stop = stop.clone();
    let mut http_task = tokio::spawn(async move {
        axum::serve(http, app)
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await
    });
    tracing::info!("admin API listening on http://{http_addr}");

    let broker_failed = async {
        match embedded.as_mut() {
            Some(b) => b.failed().await,
            None => std::future::pending().await,
        }
    };
    let mut result = Ok(());
    let mut ingest_done = false;
    let mut http_done = false;
    tokio::select! {
        _ = shutdown.cancelled() => tracing::info!("shutting down"),
        problem = broker_failed => {
            let addr = embedded.as_ref().map(EmbeddedBroker::addr);
            result = Err(ServerError::Broker(BrokerError::Failed {
                addr: addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into()),
                problem,
            }));
        }
        r = &mut ingest_task => {
            ingest_done = true;
            if let Ok(Err(e)) = r {
                result = Err(e.into());
            }
        }
        r = &mut http_task => {
            http_done = true;
            if let Ok(Err(source)) = r {
                result = Err(ServerError::Http { addr: http_addr.clone(), source });
            }
        }
    }
    stop.cancel();
    let drain = async {
        if !http_done {
            let _ = (&mut http_task).await;
        }
        if !ingest_done {
            let _ = (&mut ingest_task).await;
        }
    };
    if tokio::time::timeout(DRAIN_DEADLINE, drain).await.is_err() {
        tracing::warn!(deadline = ?DRAIN_DEADLINE, "HTTP or ingest did not stop in time: aborted");
        http_task.abort();
        ingest_task.abort();
    }
    let _ = tick_task.await;
    let _ = dclient.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), delivery_loop).await;
    // flush the store last: the registry's pending writes, then everything sled holds
    let flushed = tokio::task::spawn_blocking(move || {
        let r = registry.flush();
        let d = db.flush();
        (r, d)
    })
    .await;
    match flushed {
        Ok((Err(e), _)) => tracing::error!(error = %e, "registry: final flush failed"),
        Ok((_, Err(e))) => tracing::error!(error = %e, "state database: final flush failed"),
        Err(e) => tracing::error!(error = %e, "final flush panicked"),
        Ok(_) => {}
    }
    if let Some(mut b) = embedded {
        b.stop().await;
    }
    tracing::info!("stopped");
    result
}

/// Chunk frames waiting for the delivery connection (each up to `bundles.chunk_bytes`).
const DELIVERY_QUEUE: usize = 32;

/// A publisher for bundle delivery's worker threads (tokio's blocking pool): waits up to 30 s
/// for room in the delivery connection's small queue (backpressure, bounded memory) instead
/// of failing when it is full. Must not be called on a runtime worker thread.
fn blocking_publisher(client: rumqttc::AsyncClient, prefix: &str) -> crate::link::Publisher {
    let prefix = prefix.to_string();
    let handle = tokio::runtime::Handle::current();
    Arc::new(move |device: &str, leaf: &str, payload: Vec<u8>| {
        let topic = format!("{prefix}/{device}/{leaf}");
        let publish = client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload);
        // delivery calls this on blocking-pool threads only (never a runtime worker)
        handle
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), publish).await })
            .is_ok_and(|r| r.is_ok())
    })
}

fn resolve_bundle(store: Arc<BundleStore>) -> api::rollouts::ResolveBundle {
    use axum::http::StatusCode;
    Arc::new(move |name: &str, version: &str| {
        let rec = store.get(name, version).ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("bundle {name}@{version} is not in the store (fleetctl bundle push)"),
            )
        })?;
        if !rec.is_ready() {
            return Err((
                StatusCode::CONFLICT,
                format!(
                    "bundle {name}@{version} is {}, not ready: {}",
                    rec.signoff.state,
                    rec.signoff.problems.join("; ")
                ),
            ));
        }
        Ok(crate::rollout::BundleRef {
            name: rec.name.clone(),
            version: rec.version.clone(),
            release: rec.release,
            sha256: rec.sha256.clone(),
            bytes: rec.bytes,
            model: rec.name,
        })
    })
}

fn resolve_targets(registry: Arc<Registry>) -> api::rollouts::ResolveTargets {
    Arc::new(move |selector: &str| {
        let sel = TagSelector::parse(selector).map_err(|e| e.to_string())?;
        let mut ids = registry.ids(&sel);
        ids.sort();
        Ok(ids)
    })
}

fn model_devices(registry: Arc<Registry>) -> api::rollouts::ResolveModelDevices {
    Arc::new(move |model: &str, selector: Option<&str>| {
        let sel = TagSelector::parse(selector.unwrap_or("")).map_err(|e| e.to_string())?;
        let mut ids: Vec<String> = registry
            .list(&sel, None, usize::MAX)
            .into_iter()
            .filter(|d| d.models.iter().any(|m| m.name == model))
            .map(|d| d.id)
            .collect();
        ids.sort();
        Ok(ids)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_bootstrap_token_is_created_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (t1, path, created) = bootstrap_token(dir.path()).unwrap();
        assert!(created);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert_eq!(
            t1.sha256,
            shared::trust::hex(&Sha256::digest(text.trim().as_bytes()))
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (t2, _, created) = bootstrap_token(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(t1, t2);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        std::fs::write(&path, "short\n").unwrap();
        let e = bootstrap_token(dir.path()).unwrap_err();
        assert!(e.to_string().contains("admin-token"), "{e}");
    }
}
