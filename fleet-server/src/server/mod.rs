//! `fleet-server run`: the embedded MQTT broker (unless an external one is configured), the
//! telemetry ingest into `<state_dir>/ingest`, and the admin HTTP API, with one shutdown path
//! (a cancellation token; ingest, HTTP drain and broker stop within a deadline).

pub mod api;
pub mod broker;
pub mod config;
pub mod http;
pub mod tls;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::ingest::{self, FileStore, IngestConfig, IngestCounters};
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
    let token = Token {
        name: "bootstrap-admin".into(),
        sha256: shared::trust::hex(&Sha256::digest(secret.as_bytes())),
        role: "admin".into(),
    };
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
    let store = FileStore::open(&store_dir)?;

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

    let counters = Arc::new(IngestCounters::default());
    let mut icfg = IngestConfig::new(&url);
    icfg.topic_prefix = config.topic_prefix.clone();
    if let Some(id) = config.mqtt.as_ref().and_then(|m| m.client_id.clone()) {
        icfg.client_id = id;
    }
    let stop = CancellationToken::new();
    let mut ingest_task = tokio::spawn(ingest::run(icfg, store, counters.clone(), stop.clone()));
    tracing::info!(dir = %store_dir.display(), "ingest storing records");

    let http_addr = http
        .local_addr()
        .map_or_else(|_| config.http.listen.clone(), |a| a.to_string());
    let app = http::router(Arc::new(http::AppState {
        tokens,
        counters: counters.clone(),
    }));
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
    if let Some(mut b) = embedded {
        b.stop().await;
    }
    tracing::info!("stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;

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
