//! The fleet server's admin HTTP API: `GET /v1/health` (open), `GET /metrics` (Prometheus
//! text, role `viewer`), bearer-token auth with roles, JSON error bodies on every error
//! (401, 403, 404, 405).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::config::{Token, ROLES};
use crate::ingest::IngestCounters;

/// Renders more Prometheus text for `/metrics` (registry, delivery, rollouts, alerts).
pub type MetricsSource = Arc<dyn Fn() -> String + Send + Sync>;

/// What the handlers share.
pub struct AppState {
    pub tokens: Vec<Token>,
    pub counters: Arc<IngestCounters>,
    /// Appended to the ingest counters on `/metrics`, in order.
    pub metrics: Vec<MetricsSource>,
}

/// An API error: status and a JSON `{"error": ...}` body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    challenge: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            challenge: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut r = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(c) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, c);
        }
        r
    }
}

/// The API's routes: health and metrics, plus the resource routers (`resources`, each with
/// its state applied), all behind the token guard and the JSON 404/405 fallbacks.
pub fn router(state: Arc<AppState>, resources: Vec<Router>) -> Router {
    let mut r = Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state.clone());
    for extra in resources {
        r = r.merge(extra);
    }
    r.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state, guard))
}

/// The role a path needs; `None`: open.
fn required_role(path: &str) -> Option<&'static str> {
    match path {
        "/v1/health" => None,
        _ => Some("viewer"),
    }
}

async fn guard(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(role) = required_role(req.uri().path()) {
        if let Err(e) = authorize(&s.tokens, req.headers(), role) {
            return e.into_response();
        }
    }
    next.run(req).await
}

/// Rank of a role (`viewer` < `operator` < `admin`); unknown roles rank below everything.
fn rank(role: &str) -> Option<usize> {
    ROLES.iter().position(|r| *r == role)
}

/// Checks the request's bearer token against the configured hashes (every hash compared in
/// constant time) and that its role is at least `needed`; returns the token.
pub fn authorize<'t>(
    tokens: &'t [Token],
    headers: &HeaderMap,
    needed: &str,
) -> Result<&'t Token, ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = shared::auth::authenticate(header, tokens.iter().map(|t| t.sha256.as_str()))
        .and_then(|i| tokens.get(i).ok_or(shared::auth::AuthFailure::Invalid))
        .map_err(|failure| {
            let mut e = ApiError::new(StatusCode::UNAUTHORIZED, failure.message());
            e.challenge = Some(failure.challenge("fleet-server"));
            e
        })?;
    let enough =
        matches!((rank(&token.role), rank(needed)), (Some(have), Some(need)) if have >= need);
    if !enough {
        tracing::info!(token = %token.name, role = %token.role, needed, "request refused: role too low");
        let mut e = ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has role {:?}; this needs {needed:?}",
                token.name, token.role
            ),
        );
        e.challenge = Some("Bearer realm=\"fleet-server\", error=\"insufficient_scope\"".into());
        return Err(e);
    }
    Ok(token)
}

async fn health() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}",
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {} not allowed on {}",
            req.method(),
            req.uri().path()
        ),
    )
}

/// The ingest counters (name without the `fleet_ingest_` prefix and `_total` suffix, help).
fn counter_list(c: &IngestCounters) -> [(&'static str, &'static str, u64); 15] {
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    [
        ("batches", "Record batches received.", l(&c.batches)),
        (
            "records_stored",
            "Records stored durably (then acknowledged).",
            l(&c.records_stored),
        ),
        (
            "duplicates",
            "Records received again and skipped.",
            l(&c.duplicates),
        ),
        (
            "gaps",
            "Batches refused because records before them were missing.",
            l(&c.gaps),
        ),
        (
            "unaccounted",
            "Batches refused because they skipped seqs the device did not report dropped.",
            l(&c.unaccounted),
        ),
        (
            "rejected",
            "Payloads refused (undecodable, wrong device, unknown topic).",
            l(&c.rejected),
        ),
        (
            "store_errors",
            "Batches not stored because of a storage error.",
            l(&c.store_errors),
        ),
        (
            "acks_published",
            "Acks published to devices.",
            l(&c.acks_published),
        ),
        (
            "acks_dropped",
            "Acks dropped because the MQTT client queue was full.",
            l(&c.acks_dropped),
        ),
        ("births", "Device online status messages.", l(&c.births)),
        ("deaths", "Device offline status messages.", l(&c.deaths)),
        (
            "reconnects",
            "Ingest MQTT connection errors (each followed by a reconnect).",
            l(&c.reconnects),
        ),
        (
            "epoch_changes",
            "Device outboxes recreated (new epoch).",
            l(&c.epoch_changes),
        ),
        (
            "stale_epoch",
            "Batches of an earlier outbox epoch refused.",
            l(&c.stale_epoch),
        ),
        (
            "device_drops",
            "Records the devices reported dropped before delivery (cap, TTL, I/O).",
            l(&c.device_drops),
        ),
    ]
}

/// The Prometheus text exposition of the counters.
pub fn render_metrics(c: &IngestCounters) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for (name, help, v) in counter_list(c) {
        let _ = writeln!(out, "# HELP fleet_ingest_{name}_total {help}");
        let _ = writeln!(out, "# TYPE fleet_ingest_{name}_total counter");
        let _ = writeln!(out, "fleet_ingest_{name}_total {v}");
    }
    let _ = writeln!(
        out,
        "# HELP fleet_broker_connected Whether the ingest is connected to the MQTT broker (1) or not (0)."
    );
    let _ = writeln!(out, "# TYPE fleet_broker_connected gauge");
    let _ = writeln!(
        out,
        "fleet_broker_connected {}",
        c.connected.load(Ordering::Relaxed).min(1)
    );
    out
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    // the sources read the state database: off the async threads
    let text = tokio::task::spawn_blocking(move || {
        let mut text = render_metrics(&s.counters);
        for m in &s.metrics {
            text.push_str(&m());
        }
        text
    })
    .await;
    match text {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering metrics failed: {e}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    #[test]
    fn roles_are_ordered_and_unknown_tokens_refused() {
        let tokens = [
            Token::from_secret("grafana", "s1", "viewer"),
            Token::from_secret("ops", "s2", "admin"),
        ];
        let t = authorize(&tokens, &bearer("s1"), "viewer").unwrap();
        assert_eq!(t.name, "grafana");
        let e = authorize(&tokens, &bearer("s1"), "operator").unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert!(e.message.contains("\"grafana\""), "{}", e.message);
        assert_eq!(
            authorize(&tokens, &bearer("s2"), "operator").unwrap().name,
            "ops"
        );
        let e = authorize(&tokens, &bearer("nope"), "viewer").unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        let e = authorize(&tokens, &HeaderMap::new(), "viewer").unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(e.message.contains("Bearer"), "{}", e.message);
    }

    #[test]
    fn metrics_text_names_every_counter() {
        let c = IngestCounters::default();
        c.records_stored.store(7, Ordering::Relaxed);
        c.connected.store(1, Ordering::Relaxed);
        let text = render_metrics(&c);
        assert!(
            text.contains("\nfleet_ingest_records_stored_total 7\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE fleet_ingest_batches_total counter\n"),
            "{text}"
        );
        assert!(text.ends_with("fleet_broker_connected 1\n"), "{text}");
        assert_eq!(text.matches("# TYPE ").count(), 16);
    }
}
