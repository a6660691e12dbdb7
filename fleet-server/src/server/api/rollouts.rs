//! Rollout endpoints: `POST /v1/rollouts` (operator), `GET /v1/rollouts` and
//! `GET /v1/rollouts/{id}` (viewer), `POST /v1/rollouts/{id}/{pause|resume|abort|rollback}`
//! (operator) and the fleet-wide `POST /v1/rollback` (operator). Every state-changing
//! request that passes authentication appends an audit record, also when it fails.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::audit::{AuditLog, NewRecord, Outcome};
use crate::rollout::{BundleRef, ErrorClass, RolloutError, RolloutSpec, Rollouts};
use crate::server::config::Token;
use crate::server::http::{authorize, ApiError};

/// Largest request body read (bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest audit `target` written (longer request text is cut).
const MAX_AUDIT_TARGET: usize = 1024;
/// Waves when a request gives none.
pub const DEFAULT_WAVES: [&str; 4] = ["1%", "10%", "50%", "100%"];
/// Thresholds when a request gives none.
pub const DEFAULT_SUCCESS_THRESHOLD: &str = "95%";
pub const DEFAULT_FAILURE_THRESHOLD: &str = "5%";

/// Finds a bundle by name and version; the error status is the answer (404 unknown, 409
/// not `ready`), the message names the bundle and why.
pub type ResolveBundle =
    Arc<dyn Fn(&str, &str) -> Result<BundleRef, (StatusCode, String)> + Send + Sync>;
/// The device ids a selector (`site=plant-a,line=3`; empty: every device) matches, sorted;
/// the error names the bad part of the selector.
pub type ResolveTargets = Arc<dyn Fn(&str) -> Result<Vec<String>, String> + Send + Sync>;
/// The devices running `model` (optionally only those matching a selector), sorted.
pub type ResolveModelDevices =
    Arc<dyn Fn(&str, Option<&str>) -> Result<Vec<String>, String> + Send + Sync>;

/// What the rollout handlers share.
pub struct RolloutsState {
    pub tokens: Vec<Token>,
    pub rollouts: Arc<Rollouts>,
    pub audit: AuditLog,
    pub resolve_bundle: ResolveBundle,
    pub resolve_targets: ResolveTargets,
    pub model_devices: ResolveModelDevices,
    /// `rollouts.default_wave_timeout_secs`.
    pub default_wave_timeout_secs: u64,
}

/// The routes, state applied.
pub fn router(state: Arc<RolloutsState>) -> Router {
    Router::new()
        .route("/v1/rollouts", get(list).post(create))
        .route("/v1/rollouts/{id}", get(show))
        .route("/v1/rollouts/{id}/{action}", post(act))
        .route("/v1/rollback", post(fleet_rollback))
        .with_state(state)
}

/// `POST /v1/rollouts` body (API type).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    pub bundle: String,
    pub target: String,
    /// Strings (`"10%"`, `"5"`) or numbers (device counts).
    #[serde(default)]
    pub waves: Option<Vec<Value>>,
    /// `"95%"`, `"0.95"` or `0.95`.
    #[serde(default)]
    pub success_threshold: Option<Value>,
    #[serde(default)]
    pub failure_threshold: Option<Value>,
    /// `"90s"`, `"30m"`, `"2h"` or a number of seconds.
    #[serde(default)]
    pub wave_timeout: Option<Value>,
}

/// `POST /v1/rollback` body (API type).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRollback {
    pub model: String,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

fn text(field: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{field}: must be a string or a number"),
        )),
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body: more than {MAX_BODY_BYTES} bytes"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("request body: {e}"),
        )
    })
}

fn engine_error(e: &RolloutError) -> ApiError {
    let status = match e.status_class() {
        ErrorClass::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorClass::NotFound => StatusCode::NOT_FOUND,
        ErrorClass::Conflict => StatusCode::CONFLICT,
        ErrorClass::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %e, "rollout engine failed");
    }
    ApiError::new(status, e.to_string())
}

/// Appends `rec` with the outcome of `result`; an audit failure turns a success into a 500
/// that says the action was done but not recorded.
fn audited<T>(
    audit: &AuditLog,
    rec: NewRecord,
    result: Result<T, ApiError>,
) -> Result<T, ApiError> {
    let outcome = match &result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Error(e.message.clone()),
    };
    let mut rec = rec;
    rec.outcome = outcome;
    if rec.target.len() > MAX_AUDIT_TARGET {
        let mut cut = MAX_AUDIT_TARGET;
        while !rec.target.is_char_boundary(cut) {
            cut -= 1;
        }
        rec.target.truncate(cut);
    }
    match audit.append(&rec) {
        Ok(_) => result,
        Err(ae) => {
            tracing::error!(error = %ae, action = %rec.action, target = %rec.target, "audit record not written");
            match result {
                Ok(_) => Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!(
                        "{} {} was carried out, but its audit record could not be written: {ae}",
                        rec.action, rec.target
                    ),
                )),
                Err(e) => Err(e),
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request handler failed: {e}"),
        )
    })?
}

fn json_response(status: StatusCode, v: impl serde::Serialize) -> Response {
    (status, Json(v)).into_response()
}

async fn list(State(s): State<Arc<RolloutsState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&s.tokens, &headers, "viewer") {
        return e.into_response();
    }
    match s.rollouts.list() {
        Ok(v) => json_response(StatusCode::OK, json!({ "rollouts": v })),
        Err(e) => engine_error(&e).into_response(),
    }
}

async fn show(
    State(s): State<Arc<RolloutsState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = authorize(&s.tokens, &headers, "viewer") {
        return e.into_response();
    }
    match s.rollouts.get(&id) {
        Ok(v) => json_response(StatusCode::OK, v),
        Err(e) => engine_error(&e).into_response(),
    }
}

fn create_sync(
    s: &RolloutsState,
    body: &[u8],
    rec: &mut NewRecord,
) -> Result<crate::rollout::RolloutView, ApiError> {
    let req: CreateRollout = parse_body(body)?;
    rec.target = format!("{} -> {}", req.bundle, req.target);
    let waves: Vec<String> = match &req.waves {
        Some(w) => w
            .iter()
            .enumerate()
            .map(|(i, v)| text(&format!("waves[{i}]"), v))
            .collect::<Result<_, _>>()?,
        None => DEFAULT_WAVES.iter().map(|w| w.to_string()).collect(),
    };
    let success = match &req.success_threshold {
        Some(v) => text("success_threshold", v)?,
        None => DEFAULT_SUCCESS_THRESHOLD.into(),
    };
    let failure = match &req.failure_threshold {
        Some(v) => text("failure_threshold", v)?,
        None => DEFAULT_FAILURE_THRESHOLD.into(),
    };
    let timeout = req
        .wave_timeout
        .as_ref()
        .map(|v| text("wave_timeout", v))
        .transpose()?;
    let spec = RolloutSpec::parse(
        &req.bundle,
        &req.target,
        &waves,
        &success,
        &failure,
        timeout.as_deref(),
        s.default_wave_timeout_secs,
    )
    .map_err(|e| engine_error(&e))?;
    let (name, version) = req.bundle.split_once('@').unwrap_or((&req.bundle, ""));
    let bundle = (s.resolve_bundle)(name, version).map_err(|(st, m)| ApiError::new(st, m))?;
    rec.bundle_sha256 = Some(bundle.sha256.clone());
    let targets = (s.resolve_targets)(&req.target)
        .map_err(|m| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("target: {m}")))?;
    let view = s
        .rollouts
        .create(
            spec,
            bundle,
            targets,
            &rec.actor,
            crate::directives::now_ms(),
        )
        .map_err(|e| engine_error(&e))?;
    rec.details = Some(json!({
        "rollout": view.id,
        "devices": view.devices.len(),
        "waves": view.waves.iter().map(|w| w.size).collect::<Vec<_>>(),
    }));
    rec.target = format!("{} ({} -> {})", view.id, req.bundle, req.target);
    Ok(view)
}

async fn create(State(s): State<Arc<RolloutsState>>, headers: HeaderMap, body: Bytes) -> Response {
    let token = match authorize(&s.tokens, &headers, "operator") {
        Ok(t) => t.clone(),
        Err(e) => return e.into_response(),
    };
    let r = blocking(move || {
        let mut rec = NewRecord::new(
            &token.name,
            &token.role,
            "rollout.create",
            "(unreadable request)",
            Outcome::Ok,
        );
        let r = create_sync(&s, &body, &mut rec);
        audited(&s.audit, rec, r)
    })
    .await;
    match r {
        Ok(v) => json_response(StatusCode::CREATED, v),
        Err(e) => e.into_response(),
    }
}

async fn act(
    State(s): State<Arc<RolloutsState>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    if !matches!(action.as_str(), "pause" | "resume" | "abort" | "rollback") {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no such rollout action {action:?} (pause, resume, abort, rollback)"),
        )
        .into_response();
    }
    let token = match authorize(&s.tokens, &headers, "operator") {
        Ok(t) => t.clone(),
        Err(e) => return e.into_response(),
    };
    let r = blocking(move || {
        let mut rec = NewRecord::new(
            &token.name,
            &token.role,
            format!("rollout.{action}"),
            &id,
            Outcome::Ok,
        );
        if let Ok(v) = s.rollouts.get(&id) {
            rec.bundle_sha256 = Some(v.bundle.sha256.clone());
        }
        let now = crate::directives::now_ms();
        let r = match action.as_str() {
            "pause" => s.rollouts.pause(&id, &token.name, now),
            "resume" => s.rollouts.resume(&id, &token.name, now),
            "abort" => s.rollouts.abort(&id, &token.name, now),
            _ => s.rollouts.rollback(&id, &token.name, now),
        }
        .map_err(|e| engine_error(&e));
        audited(&s.audit, rec, r)
    })
    .await;
    match r {
        Ok(v) => json_response(StatusCode::OK, v),
        Err(e) => e.into_response(),
    }
}

async fn fleet_rollback(
    State(s): State<Arc<RolloutsState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = match authorize(&s.tokens, &headers, "operator") {
        Ok(t) => t.clone(),
        Err(e) => return e.into_response(),
    };
    let r = blocking(move || {
        let mut rec = NewRecord::new(
            &token.name,
            &token.role,
            "fleet.rollback",
            "(unreadable request)",
            Outcome::Ok,
        );
        let r = (|| {
            let req: FleetRollback = parse_body(&body)?;
            rec.target = match &req.target {
                Some(t) => format!("{} ({t})", req.model),
                None => req.model.clone(),
            };
            shared::bundle::manifest::check_model_name(&req.model).map_err(|p| {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("model: {p}"))
            })?;
            let devices = (s.model_devices)(&req.model, req.target.as_deref()).map_err(|m| {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("target: {m}"))
            })?;
            let reason = req
                .reason
                .clone()
                .filter(|r| !r.trim().is_empty())
                .unwrap_or_else(|| format!("fleet rollback by {}", token.name));
            let v = s
                .rollouts
                .fleet_rollback(
                    &req.model,
                    devices,
                    &reason,
                    &token.name,
                    crate::directives::now_ms(),
                )
                .map_err(|e| engine_error(&e))?;
            rec.details = Some(json!({
                "id": v.id,
                "devices": v.devices.len(),
                "reason": reason,
                "aborted_rollouts": v.aborted_rollouts,
            }));
            Ok(json!({"model": v.model, "devices": v.devices}))
        })();
        audited(&s.audit, rec, r)
    })
    .await;
    match r {
        Ok(v) => json_response(StatusCode::OK, v),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::alerts::Alerts;
    use crate::directives::Issuer;
    use crate::server::config;
    use crate::store::Db;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A minimal HTTP/1.1 client: (status, JSON body).
    pub(crate) async fn http(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        token: &str,
        body: &str,
    ) -> (u16, Value) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let status: u16 = text[9..12].parse().unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        (status, serde_json::from_str(body).unwrap_or(Value::Null))
    }

    pub(crate) fn tokens() -> Vec<Token> {
        ["viewer", "operator", "admin"]
            .iter()
            .map(|r| Token::from_secret(&format!("{r}-token"), &tok(r), r))
            .collect()
    }

    pub(crate) fn tok(role: &str) -> String {
        format!("secret-{role}-0123456789")
    }

    /// The served API, called with the token of a role.
    #[derive(Clone, Copy)]
    struct Api(std::net::SocketAddr);

    impl Api {
        async fn get(self, path: &str, role: &str) -> (u16, Value) {
            http(self.0, "GET", path, &tok(role), "").await
        }
        async fn post(self, path: &str, role: &str, body: &str) -> (u16, Value) {
            http(self.0, "POST", path, &tok(role), body).await
        }
    }

    /// The `error` message of an error response.
    fn error(v: &Value) -> &str {
        v["error"].as_str().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rollout_endpoints_follow_the_contract_and_audit_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let issuer =
            Arc::new(Issuer::open(&config::Directives::default(), dir.path(), db.clone()).unwrap());
        let (p, sent) = crate::link::recorder();
        let alerts = Arc::new(Alerts::new(&config::Alerts::default()).unwrap());
        let engine = Arc::new(Rollouts::open(db, issuer, p, Some(alerts)).unwrap());
        let (audit, _) = AuditLog::open(&dir.path().join("audit.jsonl")).unwrap();
        let state = Arc::new(RolloutsState {
            tokens: tokens(),
            rollouts: engine.clone(),
            audit: audit.clone(),
            resolve_bundle: Arc::new(|name: &str, version: &str| match (name, version) {
                ("pdm", "1.2.0") => Ok(BundleRef {
                    name: "pdm".into(),
                    version: "1.2.0".into(),
                    release: 7,
                    sha256: "cd".repeat(32),
                    bytes: 10,
                    model: "pdm".into(),
                }),
                ("pdm", v) => Err((
                    StatusCode::CONFLICT,
                    format!("bundle pdm@{v} is awaiting_approval"),
                )),
                (n, v) => Err((StatusCode::NOT_FOUND, format!("no bundle {n}@{v}"))),
            }),
            resolve_targets: Arc::new(|sel: &str| match sel {
                "site=a" => Ok((0..20).map(|i| format!("dev-{i:02}")).collect()),
                "bad" => Err("\"bad\" is not key=value".into()),
                _ => Ok(vec![]),
            }),
            model_devices: Arc::new(|model: &str, _sel: Option<&str>| {
                Ok(if model == "pdm" {
                    vec!["dev-00".into(), "dev-01".into()]
                } else {
                    vec![]
                })
            }),
            default_wave_timeout_secs: 1800,
        });
        let app = router(state).merge(crate::server::api::audit::router(Arc::new(
            crate::server::api::audit::AuditState {
                tokens: tokens(),
                audit: audit.clone(),
            },
        )));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        let api = Api(addr);

        let body = r#"{"bundle":"pdm@1.2.0","target":"site=a","waves":["1","50%","100%"],"success_threshold":"95%","failure_threshold":0.05,"wave_timeout":"30m"}"#;
        let (st, v) = api.post("/v1/rollouts", "viewer", body).await;
        assert_eq!(st, 403, "{v}");
        let (st, _) = http(addr, "POST", "/v1/rollouts", "wrong", body).await;
        assert_eq!(st, 401);
        assert_eq!(
            audit.head().seq,
            0,
            "unauthenticated requests are not audited"
        );

        let (st, v) = api.post("/v1/rollouts", "operator", body).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["id"], "r-1");
        assert_eq!(v["state"], "running");
        assert_eq!(v["bundle"]["release"], 7);
        assert_eq!(v["waves"][0]["devices"], serde_json::json!(["dev-00"]));
        assert_eq!(v["waves"][1]["size"], 9);
        assert_eq!(v["failure_threshold"], 0.05);
        assert_eq!(v["wave_timeout_secs"], 1800);
        assert_eq!(v["devices"]["dev-00"]["state"], "sent");
        assert_eq!(v["devices"]["dev-00"]["directive"], "r-1.0.i");
        assert_eq!(v["devices"]["dev-05"]["state"], "pending");
        assert_eq!(v["halt_reason"], Value::Null);
        assert_eq!(sent.lock().unwrap().len(), 1);

        for (b, status, needle) in [
            (
                r#"{"bundle":"pdm@1.2.0","target":"site=a","waves":["0%"]}"#,
                422,
                "waves[0]",
            ),
            (
                r#"{"bundle":"pdm@1.2.0","target":"site=a","wave_timeout":"soon"}"#,
                422,
                "wave_timeout",
            ),
            (
                r#"{"bundle":"pdm@2.0.0","target":"site=a"}"#,
                409,
                "awaiting_approval",
            ),
            (r#"{"bundle":"nope@1","target":"site=a"}"#, 404, "nope@1"),
            (
                r#"{"bundle":"pdm@1.2.0","target":"site=zzz"}"#,
                422,
                "matches no device",
            ),
            (r#"{"bundle":"pdm@1.2.0","target":"bad"}"#, 422, "target:"),
            (r#"{"bundle":"pdm@1.2.0","target":"site=a"}"#, 409, "r-1"),
            (r#"{"bundle":"pdm@1.2.0"}"#, 422, "target"),
            ("not json", 422, "request body"),
        ] {
            let (st, v) = api.post("/v1/rollouts", "operator", b).await;
            assert_eq!(st, status, "{b}: {v}");
            let e = error(&v);
            assert!(e.contains(needle), "{b}: {e}");
        }

        let (st, v) = api.get("/v1/rollouts", "viewer").await;
        assert_eq!(st, 200);
        assert_eq!(v["rollouts"].as_array().unwrap().len(), 1);
        let (st, _) = api.get("/v1/rollouts/r-1", "viewer").await;
        assert_eq!(st, 200);
        let (st, v) = api.get("/v1/rollouts/r-9", "viewer").await;
        assert_eq!(st, 404);
        assert!(error(&v).contains("r-9"));
        let (st, _) = api.post("/v1/rollouts/r-1/pause", "viewer", "").await;
        assert_eq!(st, 403);
        let (st, v) = api.post("/v1/rollouts/r-1/pause", "operator", "").await;
        assert_eq!((st, v["state"].as_str()), (200, Some("paused")));
        let (st, v) = api.post("/v1/rollouts/r-1/pause", "admin", "").await;
        assert_eq!(st, 409, "{v}");
        let (st, _) = api.post("/v1/rollouts/r-1/explode", "admin", "").await;
        assert_eq!(st, 404);
        let (st, v) = api.post("/v1/rollouts/r-1/resume", "operator", "").await;
        assert_eq!((st, v["state"].as_str()), (200, Some("running")));

        let reason = r#"{"model":"pdm","reason":"bad release"}"#;
        let (st, v) = api.post("/v1/rollback", "operator", reason).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v,
            serde_json::json!({"model":"pdm","devices":["dev-00","dev-01"]})
        );
        let (st, _) = api
            .post("/v1/rollback", "operator", r#"{"model":"a b"}"#)
            .await;
        assert_eq!(st, 422);
        let (_, v) = api.get("/v1/rollouts/r-1", "viewer").await;
        assert_eq!(v["state"], "aborted");

        // every state-changing request was audited, failures included
        let (st, v) = api.get("/v1/audit?after=0&limit=1000", "viewer").await;
        assert_eq!(st, 200);
        let recs = v["records"].as_array().unwrap();
        let actions: Vec<(&str, &str)> = recs
            .iter()
            .map(|r| (r["action"].as_str().unwrap(), r["result"].as_str().unwrap()))
            .collect();
        assert_eq!(actions.len(), 15, "{actions:?}");
        assert_eq!(actions[0], ("rollout.create", "ok"));
        assert_eq!(recs[0]["actor"], "operator-token");
        assert_eq!(recs[0]["bundle_sha256"], "cd".repeat(32));
        assert!(recs[0]["target"].as_str().unwrap().starts_with("r-1 "));
        assert!(actions[1].1.starts_with("error: waves[0]"), "{actions:?}");
        assert_eq!(actions[10], ("rollout.pause", "ok"));
        assert!(actions[11].0 == "rollout.pause" && actions[11].1.starts_with("error: "));
        assert_eq!(actions[13], ("fleet.rollback", "ok"));
        assert_eq!(v["head"]["seq"], 15);
        assert_eq!(v["head"]["hash"], recs[14]["hash"]);
        let (_, v) = api.get("/v1/audit?after=13&limit=5", "viewer").await;
        assert_eq!(v["records"].as_array().unwrap().len(), 2);
        let (st, v) = api.get("/v1/audit?after=x", "viewer").await;
        assert_eq!(st, 422);
        assert!(error(&v).contains("after"));
        let (st, _) = http(addr, "GET", "/v1/audit", "nope", "").await;
        assert_eq!(st, 401);

        let (st, v) = api.get("/v1/audit/verify", "viewer").await;
        assert_eq!(st, 200);
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["records"], 15);
        assert_eq!(v["problem"], Value::Null);
        let hash = recs[3]["hash"].as_str().unwrap().to_string();
        let (_, v) = api
            .get(&format!("/v1/audit/verify?seq=4&hash={hash}"), "viewer")
            .await;
        assert_eq!(v["ok"], true, "{v}");
        let (_, v) = api
            .get(&format!("/v1/audit/verify?seq=5&hash={hash}"), "viewer")
            .await;
        assert_eq!(v["ok"], false, "{v}");
        // an edited record is detected, naming it
        let path = dir.path().join("audit.jsonl");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("\"rollout.pause\"", "\"rollout.pausf\"", 1),
        )
        .unwrap();
        let (st, v) = api.get("/v1/audit/verify", "viewer").await;
        assert_eq!(st, 200);
        assert_eq!(v["ok"], false);
        assert!(v["problem"].as_str().unwrap().contains("line 11"), "{v}");
    }
}
