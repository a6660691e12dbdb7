//! The HTTP API (axum): health and readiness; inference over the Open Inference Protocol v2
//! (KServe v2 / Triton HTTP, with its binary tensor data extension) and a KServe-v1-style
//! `POST /v1/models/{name}:predict`; Prometheus `/metrics`; bearer tokens with scopes;
//! request body limits.
//!
//! Which scopes open which route ([`access`]), once tokens are configured: the two health
//! probes need no token; model routes need `predict`; `POST /v1/feedback` needs `feedback`;
//! `GET /metrics` takes a token with any scope (`metrics`, or `predict`, `feedback`, `admin`
//! as before the `metrics` scope existed: a Prometheus scraping with a `predict` token keeps
//! working); every other path (`/v2`, unknown paths) takes any scope but `metrics`, so a
//! token with only `metrics` reads `/metrics` and nothing else.
//!
//! Every route is described in `agent/openapi.yaml`. Requests are parsed, validated and
//! scored on the scoring pool ([`crate::pool`]), never on the async workers. Every
//! prediction goes through [`crate::runtime::predict_with`], so health windows count HTTP
//! traffic.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use shared::engine::json_kind;
use shared::engine::{ElemType, Model};

use crate::config::Token;
use crate::runtime::{predict_with, Loaded, PredictError, RowError};
use crate::service::AppState;

/// Most rows (instances, or the batch dimension of an inference request) in one request.
pub const MAX_ROWS: usize = 10_000;
/// The header carrying the sticky key that decides which version of a split serves a request.
pub const ROUTING_KEY: &str = "x-routing-key";

/// The binary tensor data extension's header: the length of the JSON part of the body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// The scope inference and model routes need when tokens are configured.
pub const SCOPE_PREDICT: &str = "predict";
/// The scope `POST /v1/feedback` needs.
pub const SCOPE_FEEDBACK: &str = "feedback";
/// The operator scope (no route of its own yet; reads `/v2` and `/metrics`).
pub const SCOPE_ADMIN: &str = "admin";
/// The scope that reads `GET /metrics` and nothing else: the credential to give Prometheus.
pub const SCOPE_METRICS: &str = "metrics";

/// The scopes that read `GET /metrics`: all of them. `predict`, `feedback` and `admin` did
/// before `metrics` existed and still do (backward compatible with configs that scrape with
/// a `predict` token).
const METRICS_READERS: &[&str] = &[SCOPE_METRICS, SCOPE_PREDICT, SCOPE_FEEDBACK, SCOPE_ADMIN];
/// The scopes that read routes without a scope of their own (`/v2`, unknown paths): all but
/// `metrics`.
const GENERAL: &[&str] = &[SCOPE_PREDICT, SCOPE_FEEDBACK, SCOPE_ADMIN];

/// Who may call a path once tokens are configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No token (the health probes, so orchestrators need no credential).
    Open,
    /// A valid token carrying at least one of these scopes.
    AnyOf(&'static [&'static str]),
}

/// The route table of the scopes (see the module documentation).
fn access(path: &str) -> Access {
    match path {
        "/v2/health/live" | "/v2/health/ready" => Access::Open,
        "/metrics" => Access::AnyOf(METRICS_READERS),
        "/v1/feedback" => Access::AnyOf(&[SCOPE_FEEDBACK]),
        p if p.starts_with("/v2/models/") || p.starts_with("/v1/models/") => {
            Access::AnyOf(&[SCOPE_PREDICT])
        }
        _ => Access::AnyOf(GENERAL),
    }
}

/// The router for the agent's HTTP API.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = usize::try_from(state.config.http.max_body_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_version),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_version),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        // `{name}:predict` is one path segment; the router cannot split it, so parse it here
        .route("/v1/models/{*rest}", get(v1_get).post(v1_post))
        .route("/v1/feedback", post(feedback))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------
// Errors

/// Which error body a route uses: OIP's `{"error": "..."}` or the v1
/// `{"error": {"message", "row", "field"}}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    V1,
    V2,
}

impl Flavor {
    fn of(path: &str) -> Flavor {
        if path.starts_with("/v1/") {
            Flavor::V1
        } else {
            Flavor::V2
        }
    }
}

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    row: Option<usize>,
    field: Option<String>,
    flavor: Flavor,
    /// `WWW-Authenticate` value for 401 and 403.
    challenge: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            row: None,
            field: None,
            flavor: Flavor::V2,
            challenge: None,
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    fn flavor(mut self, flavor: Flavor) -> ApiError {
        self.flavor = flavor;
        self
    }

    /// A refused row: v1 reports row and field as keys, OIP in the message.
    fn row(e: RowError, flavor: Flavor) -> ApiError {
        let message = match flavor {
            Flavor::V1 => e.message,
            Flavor::V2 => match &e.field {
                Some(f) => format!("row {}, input {f:?}: {}", e.row, e.message),
                None => format!("row {}: {}", e.row, e.message),
            },
        };
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            row: Some(e.row),
            field: e.field,
            flavor,
            challenge: None,
        }
    }

    fn predict(e: PredictError, flavor: Flavor) -> ApiError {
        match e {
            PredictError::Invalid(row) => ApiError::row(row, flavor),
            PredictError::UnknownModel(_) => {
                ApiError::new(StatusCode::NOT_FOUND, e.to_string()).flavor(flavor)
            }
            PredictError::Engine(_) => {
                tracing::warn!(error = %e, "inference failed");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).flavor(flavor)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.flavor {
            Flavor::V2 => json!({ "error": self.message }),
            Flavor::V1 => {
                let mut e = Map::new();
                e.insert("message".into(), self.message.into());
                if let Some(r) = self.row {
                    e.insert("row".into(), r.into());
                }
                if let Some(f) = self.field {
                    e.insert("field".into(), f.into());
                }
                json!({ "error": e })
            }
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(c) = self.challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, c);
        }
        resp
    }
}

fn body_error(r: BytesRejection, limit: u64, flavor: Flavor) -> ApiError {
    let status = r.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("request body is larger than the {limit}-byte limit (http.max_body_bytes)")
    } else {
        format!("cannot read the request body: {}", r.body_text())
    };
    ApiError::new(status, message).flavor(flavor)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no route for {method} {}", uri.path()),
    )
    .flavor(Flavor::of(uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
    .flavor(Flavor::of(uri.path()))
}

/// Most inference requests queued for the scoring pool at once; beyond it, requests get 503
/// with `Retry-After` instead of an unbounded queue.
pub const MAX_IN_FLIGHT: usize = 256;

/// Runs `f` on the scoring pool (its queue is bounded by [`MAX_IN_FLIGHT`]).
async fn blocking<T: Send + 'static>(
    pool: &crate::pool::ScoringPool,
    flavor: Flavor,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    match pool.run(f).await {
        Ok(r) => r,
        Err(e @ crate::pool::PoolError::Busy(_)) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).flavor(flavor))
        }
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            Err(
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "request task failed")
                    .flavor(flavor),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------
// Authentication, body size

/// Every request: bearer token (except the health routes) with a scope the path takes
/// ([`access`]); `Content-Length` against the body limit before any of the body is read;
/// no compressed bodies.
async fn guard(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let flavor = Flavor::of(path);
    let tokens = &s.config.http.tokens;
    if let (Access::AnyOf(scopes), false) = (access(path), tokens.is_empty()) {
        if let Err(e) = authorize(tokens, req.headers(), scopes) {
            return e.flavor(flavor).into_response();
        }
    }
    let limit = s.config.http.max_body_bytes;
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if length.is_some_and(|n| n > limit) {
        // refused before reading: a client that sent `Expect: 100-continue` never sends it
        return ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the {limit}-byte limit (http.max_body_bytes)"),
        )
        .flavor(flavor)
        .into_response();
    }
    if let Some(enc) = req.headers().get(header::CONTENT_ENCODING) {
        let enc = enc.to_str().unwrap_or("?").trim();
        if !enc.eq_ignore_ascii_case("identity") {
            return ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Encoding {enc:?} is not supported; send the body uncompressed"),
            )
            .flavor(flavor)
            .into_response();
        }
    }
    next.run(req).await
}

/// Checks the request's bearer token against the configured hashes (every hash compared in
/// constant time) and that it carries one of `scopes`: 401 without a valid token, 403
/// naming the missing scope(s) otherwise.
fn authorize(tokens: &[Token], headers: &HeaderMap, scopes: &[&str]) -> Result<(), ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = shared::auth::authenticate(header, tokens.iter().map(|t| t.sha256.as_str()))
        .and_then(|i| tokens.get(i).ok_or(shared::auth::AuthFailure::Invalid))
        .map_err(|failure| {
            let mut e = ApiError::new(StatusCode::UNAUTHORIZED, failure.message());
            e.challenge = Some(failure.challenge("edge-agent"));
            e
        })?;
    if token.scopes.iter().any(|s| scopes.contains(&s.as_str())) {
        return Ok(());
    }
    let missing = match scopes {
        [one] => format!("the {one:?} scope"),
        many => {
            let names: Vec<String> = many.iter().map(|s| format!("{s:?}")).collect();
            format!("a scope for this route (one of {})", names.join(", "))
        }
    };
    tracing::info!(token = %token.name, needs = %scopes.join(" "), "request refused: missing scope");
    let mut e = ApiError::new(StatusCode::FORBIDDEN, format!("this token lacks {missing}"));
    // RFC 6750: `scope` is the space-separated list of scopes that would do
    e.challenge = Some(format!(
        "Bearer realm=\"edge-agent\", error=\"insufficient_scope\", scope=\"{}\"",
        scopes.join(" ")
    ));
    Err(e)
}

// ---------------------------------------------------------------------------------------
// Health and metadata

async fn ready(State(s): State<Arc<AppState>>) -> StatusCode {
    if s.ready.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Prometheus text exposition (`crate::metrics`).
async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&s),
    )
        .into_response()
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "edge-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// The active version of `name`, if `version` (the version string or the release number)
/// names it.
fn resolve(
    s: &AppState,
    name: &str,
    version: Option<&str>,
    flavor: Flavor,
) -> Result<Arc<Loaded>, ApiError> {
    let l = s.registry.get(name).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, format!("no model named {name:?}")).flavor(flavor)
    })?;
    if let Some(v) = version {
        if v != l.version && v != l.release.to_string() {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model {name:?} has no version {v:?} loaded (active: version {:?}, release {})",
                    l.version, l.release
                ),
            )
            .flavor(flavor));
        }
    }
    Ok(l)
}

/// OIP datatype of an engine element type.
fn datatype(e: ElemType) -> &'static str {
    match e {
        ElemType::F32 => "FP32",
        ElemType::F64 => "FP64",
        ElemType::I64 => "INT64",
        ElemType::I32 => "INT32",
        ElemType::Bool => "BOOL",
        ElemType::String => "BYTES",
    }
}

fn dims(shape: &[Option<usize>]) -> Vec<i64> {
    shape.iter().map(|d| d.map_or(-1, |x| x as i64)).collect()
}

/// The shape of output `ix` per request: `[-1]` for a per-row scalar, `[-1, K]` for a
/// per-row vector (from the bundle's golden outputs) or a ZipMap over K labels.
fn output_dims(l: &Loaded, ix: usize) -> Vec<i64> {
    let info = &l.model.outputs()[ix];
    if let Some(labels) = &info.zipmap {
        return vec![-1, labels.len() as i64];
    }
    let golden = l.manifest.golden.samples.first();
    match golden.and_then(|g| g.output.get(&info.name)) {
        Some(Value::Array(a)) => vec![-1, a.len() as i64],
        Some(Value::Object(o)) => vec![-1, o.len() as i64],
        _ => vec![-1],
    }
}

fn metadata(l: &Loaded) -> Value {
    let inputs: Vec<Value> = l
        .model
        .inputs()
        .iter()
        .map(|i| {
            if i.map_value.is_some() {
                // one map per row, as a JSON object string
                json!({ "name": i.name, "datatype": "BYTES", "shape": [-1] })
            } else {
                json!({ "name": i.name, "datatype": datatype(i.elem), "shape": dims(&i.shape) })
            }
        })
        .collect();
    let outputs: Vec<Value> = l
        .model
        .outputs()
        .iter()
        .enumerate()
        .map(|(ix, o)| json!({ "name": o.name, "datatype": datatype(o.elem), "shape": output_dims(l, ix) }))
        .collect();
    json!({
        "name": l.name,
        "versions": [l.version],
        "platform": "onnx",
        "inputs": inputs,
        "outputs": outputs,
    })
}

async fn model_metadata(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let l = resolve(&s, &name, None, Flavor::V2)?;
    Ok(Json(metadata(&l)))
}

async fn model_metadata_version(
    State(s): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let l = resolve(&s, &name, Some(&version), Flavor::V2)?;
    Ok(Json(metadata(&l)))
}

fn model_ready_status(
    s: &AppState,
    name: &str,
    version: Option<&str>,
) -> Result<StatusCode, ApiError> {
    resolve(s, name, version, Flavor::V2)?;
    Ok(if s.ready.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    })
}

async fn model_ready(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    model_ready_status(&s, &name, None)
}

async fn model_ready_version(
    State(s): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    model_ready_status(&s, &name, Some(&version))
}

// ---------------------------------------------------------------------------------------
// Open Inference Protocol: POST /v2/models/{name}[/versions/{v}]/infer

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestedOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

async fn infer(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    infer_common(s, name, None, headers, body).await
}

async fn infer_version(
    State(s): State<Arc<AppState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    infer_common(s, name, Some(version), headers, body).await
}

async fn infer_common(
    s: Arc<AppState>,
    name: String,
    version: Option<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_error(r, s.config.http.max_body_bytes, Flavor::V2))?;
    let loaded = resolve(&s, &name, version.as_deref(), Flavor::V2)?;
    let json_len = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|n| *n <= body.len())
                .ok_or_else(|| {
                    ApiError::bad(format!(
                        "{HEADER_LENGTH} must be a byte count within the {}-byte body",
                        body.len()
                    ))
                })?,
        ),
    };
    // a request for a version gets that version; otherwise as on `:predict`
    let loaded = match version {
        Some(_) => loaded,
        None => routed(&s, &name, loaded, &headers),
    };
    let served = Served::new(&s);
    blocking(&s.pool, Flavor::V2, move || {
        infer_blocking(loaded, &body, json_len, &served)
    })
    .await
}

/// The version that serves a request for model `name`: a split candidate for its share of
/// `X-Routing-Key` values (sticky), else `active`.
fn routed(s: &AppState, name: &str, active: Arc<Loaded>, headers: &HeaderMap) -> Arc<Loaded> {
    let key = headers.get(ROUTING_KEY).and_then(|v| v.to_str().ok());
    s.registry.route(name, key).unwrap_or(active)
}

/// What a prediction is reported to once served, on both inference routes: the shadow
/// candidate (same inputs) and the feedback log (prediction ids).
struct Served {
    device: String,
    registry: Arc<crate::runtime::Registry>,
    feedback: Arc<crate::feedback::Feedback>,
}

impl Served {
    fn new(s: &AppState) -> Served {
        Served {
            device: s.device_id.clone(),
            registry: s.registry.clone(),
            feedback: s.feedback.clone(),
        }
    }

    /// Feeds the shadow and logs the predictions; returns their ids, one per row.
    fn report(
        &self,
        rows: &[Map<String, Value>],
        pred: &crate::runtime::Prediction,
    ) -> Vec<String> {
        let l = &pred.loaded;
        self.registry.shadow(&l.name, rows, pred);
        crate::feedback::log_predictions(&self.feedback, l, &self.device, rows, &pred.outputs)
    }
}

/// Binary element size of an OIP datatype (None for BYTES, which is length-prefixed).
fn element_size(dt: &str) -> Option<usize> {
    Some(match dt {
        "BOOL" | "INT8" | "UINT8" => 1,
        "INT16" | "UINT16" => 2,
        "INT32" | "UINT32" | "FP32" => 4,
        "INT64" | "UINT64" | "FP64" => 8,
        _ => return None,
    })
}

fn is_int(dt: &str) -> bool {
    matches!(
        dt,
        "INT8" | "INT16" | "INT32" | "INT64" | "UINT8" | "UINT16" | "UINT32" | "UINT64"
    )
}

/// Whether a request datatype can feed a model input of `elem` (map inputs take BYTES).
fn fits(dt: &str, elem: ElemType, map: bool) -> bool {
    if map {
        return dt == "BYTES";
    }
    match elem {
        ElemType::F32 | ElemType::F64 => is_int(dt) || dt == "FP32" || dt == "FP64",
        ElemType::I64 | ElemType::I32 => is_int(dt),
        ElemType::Bool => dt == "BOOL",
        ElemType::String => dt == "BYTES",
    }
}

/// Decodes `count` elements of the binary tensor data extension.
fn decode_binary(name: &str, dt: &str, bytes: &[u8], count: usize) -> Result<Vec<Value>, ApiError> {
    let bad = |m: String| ApiError::bad(format!("input {name:?}: {m}"));
    if dt == "BYTES" {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                return Err(bad("BYTES data ends inside a length prefix".into()));
            };
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err(bad("BYTES data ends inside an element".into()));
            }
            let (item, tail) = tail.split_at(len);
            let s = std::str::from_utf8(item)
                .map_err(|_| bad(format!("BYTES element {} is not UTF-8", out.len())))?;
            out.push(Value::String(s.to_string()));
            rest = tail;
        }
        if out.len() != count {
            return Err(bad(format!(
                "the shape holds {count} elements, the binary data {}",
                out.len()
            )));
        }
        return Ok(out);
    }
    let size = element_size(dt).ok_or_else(|| bad(format!("datatype {dt} is not supported")))?;
    if count.checked_mul(size) != Some(bytes.len()) {
        return Err(bad(format!(
            "the shape holds {count} {dt} elements ({} bytes), binary_data_size is {}",
            count.saturating_mul(size),
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    for (k, c) in bytes.chunks_exact(size).enumerate() {
        let float = |x: f64| {
            serde_json::Number::from_f64(x)
                .map(Value::Number)
                .ok_or_else(|| bad(format!("element {k} is NaN or infinite")))
        };
        let v = match dt {
            "BOOL" => Value::Bool(c[0] != 0),
            "INT8" => (c[0] as i8).into(),
            "UINT8" => c[0].into(),
            "INT16" => i16::from_le_bytes([c[0], c[1]]).into(),
            "UINT16" => u16::from_le_bytes([c[0], c[1]]).into(),
            "INT32" => i32::from_le_bytes([c[0], c[1], c[2], c[3]]).into(),
            "UINT32" => u32::from_le_bytes([c[0], c[1], c[2], c[3]]).into(),
            "FP32" => float(f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)?,
            "INT64" => i64::from_le_bytes(c.try_into().unwrap_or_default()).into(),
            "UINT64" => u64::from_le_bytes(c.try_into().unwrap_or_default()).into(),
            _ => float(f64::from_le_bytes(c.try_into().unwrap_or_default()))?,
        };
        out.push(v);
    }
    Ok(out)
}

fn flatten(v: Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.into_iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// Checks JSON `data` elements against the declared datatype.
fn flatten_ref<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten_ref(x, out)),
        other => out.push(other),
    }
}

fn check_elements(name: &str, dt: &str, map: bool, values: &mut [Value]) -> Result<(), ApiError> {
    for (k, v) in values.iter_mut().enumerate() {
        let ok = match dt {
            "BOOL" => v.is_boolean(),
            "BYTES" if map => {
                if let Value::String(s) = v {
                    // a map row may come as the text of a JSON object
                    if let Ok(obj @ Value::Object(_)) = serde_json::from_str::<Value>(s) {
                        *v = obj;
                    }
                }
                v.is_object()
            }
            "BYTES" => v.is_string(),
            "FP32" | "FP64" => v.is_number(),
            _ if is_int(dt) => v.is_i64() || v.is_u64(),
            _ => {
                return Err(ApiError::bad(format!(
                    "input {name:?}: datatype {dt} is not supported"
                )))
            }
        };
        if !ok {
            return Err(ApiError::bad(format!(
                "input {name:?}: element {k} ({v}) is not a {dt} value"
            )));
        }
    }
    Ok(())
}

/// Where a request input goes: a model input, or one feature of a single 2-D input.
enum Target {
    Input(usize),
    Feature,
}

fn input_names(model: &Model) -> String {
    model
        .inputs()
        .iter()
        .map(|i| i.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Turns the request's tensors into rows for the engine, scores them and renders the
/// outputs back as tensors.
fn infer_blocking(
    loaded: Arc<Loaded>,
    body: &[u8],
    json_len: Option<usize>,
    served: &Served,
) -> Result<Response, ApiError> {
    let l = loaded.as_ref();
    let (json_part, mut binary) = body.split_at(json_len.unwrap_or(body.len()));
    let req: InferRequest = serde_json::from_slice(json_part)
        .map_err(|e| ApiError::bad(format!("not a valid inference request: {e}")))?;
    let model = &l.model;
    if req.inputs.is_empty() {
        return Err(ApiError::bad(format!(
            "no inputs (the model takes: {})",
            input_names(model)
        )));
    }
    let single = match model.inputs() {
        [only] if only.map_value.is_none() && only.shape.len() == 2 => Some(only),
        _ => None,
    };
    let features = single.and_then(|_| model.feature_names());
    let mut rows: Vec<Map<String, Value>> = Vec::new();
    let mut batch: Option<(usize, &str)> = None;
    let mut seen: Vec<&str> = Vec::new();
    let mut by_feature = false;
    for input in &req.inputs {
        let name = input.name.as_str();
        let bad = |m: String| ApiError::bad(format!("input {name:?}: {m}"));
        if seen.contains(&name) {
            return Err(bad("appears twice".into()));
        }
        seen.push(name);
        let target = match model.inputs().iter().position(|i| i.name == name) {
            Some(ix) => Target::Input(ix),
            None if features.is_some_and(|f| f.iter().any(|n| n == name)) => Target::Feature,
            None => {
                return Err(bad(format!(
                    "not an input{} of the model (inputs: {})",
                    if features.is_some() {
                        " or feature"
                    } else {
                        ""
                    },
                    input_names(model)
                )))
            }
        };
        // shape: [N, ...]; N rows of width product(rest)
        let shape: Vec<usize> = input
            .shape
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("shape {:?} has a negative dimension", input.shape)))?;
        let Some((&n, per_row)) = shape.split_first() else {
            return Err(bad("shape must start with the batch dimension".into()));
        };
        let (elem, map, rank) = match target {
            Target::Input(ix) => {
                let info = &model.inputs()[ix];
                let rank = if info.map_value.is_some() {
                    1
                } else {
                    info.shape.len().max(1)
                };
                (info.elem, info.map_value.is_some(), rank)
            }
            Target::Feature => {
                by_feature = true;
                (single.map_or(ElemType::F32, |s| s.elem), false, 1)
            }
        };
        let width_ok = match target {
            Target::Input(ix) if rank > 1 => {
                let want = &model.inputs()[ix].shape;
                shape.len() == rank
                    && shape
                        .iter()
                        .zip(want)
                        .skip(1)
                        .all(|(got, want)| want.is_none_or(|w| w == *got))
            }
            // one value per row: [N] or [N, 1]
            _ => per_row.iter().all(|&d| d == 1) && shape.len() <= 2,
        };
        if !width_ok {
            let want = match target {
                Target::Input(ix) if rank > 1 => format!("{:?}", dims(&model.inputs()[ix].shape)),
                _ => "[-1] or [-1, 1]".into(),
            };
            return Err(bad(format!(
                "shape {:?} does not match the model's {want}",
                input.shape
            )));
        }
        let width: usize = per_row.iter().product();
        match batch {
            None => batch = Some((n, name)),
            Some((m, first)) if m != n => {
                return Err(bad(format!(
                    "batch size {n} differs from input {first:?}'s {m}"
                )))
            }
            _ => {}
        }
        if n == 0 {
            return Err(bad("the batch is empty".into()));
        }
        if n > MAX_ROWS {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("input {name:?}: batch of {n} rows; at most {MAX_ROWS} per request"),
            ));
        }
        let count = n
            .checked_mul(width)
            .ok_or_else(|| bad("shape is too large".into()))?;
        if !fits(&input.datatype, elem, map) {
            let takes = if map {
                "BYTES (JSON objects)"
            } else {
                datatype(elem)
            };
            return Err(bad(format!(
                "datatype {} does not fit the model's {takes} input",
                input.datatype
            )));
        }
        let binary_size = input.parameters.get("binary_data_size");
        let mut values = match (&input.data, binary_size) {
            (Some(_), Some(_)) => {
                return Err(bad("has both data and binary_data_size".into()));
            }
            (Some(data), None) => {
                let mut flat = Vec::new();
                flatten(data.clone(), &mut flat);
                if flat.len() != count {
                    return Err(bad(format!(
                        "shape {:?} holds {count} elements, data has {}",
                        input.shape,
                        flat.len()
                    )));
                }
                flat
            }
            (None, Some(size)) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .filter(|s| *s <= binary.len())
                    .ok_or_else(|| {
                        bad(format!(
                            "binary_data_size {size} exceeds the {} bytes of binary data left",
                            binary.len()
                        ))
                    })?;
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                decode_binary(name, &input.datatype, mine, count)?
            }
            (None, None) => return Err(bad("has no data".into())),
        };
        check_elements(name, &input.datatype, map, &mut values)?;
        if rows.is_empty() {
            rows = vec![Map::new(); n];
        }
        let mut it = values.into_iter();
        for row in rows.iter_mut() {
            let v = if rank > 1 {
                Value::Array(it.by_ref().take(width).collect())
            } else {
                it.next().unwrap_or(Value::Null)
            };
            row.insert(input.name.clone(), v);
        }
    }
    if !binary.is_empty() {
        return Err(ApiError::bad(format!(
            "{} bytes of binary data are not claimed by any input's binary_data_size",
            binary.len()
        )));
    }
    // every model input (or, for a single 2-D input, every feature) must be given
    let missing: Vec<&str> = match (by_feature, features, single) {
        (true, Some(f), Some(only)) => {
            if seen.contains(&only.name.as_str()) {
                return Err(ApiError::bad(format!(
                    "give input {:?} or its features, not both",
                    only.name
                )));
            }
            f.iter()
                .map(String::as_str)
                .filter(|n| !seen.contains(n))
                .collect()
        }
        _ => model
            .inputs()
            .iter()
            .map(|i| i.name.as_str())
            .filter(|n| !seen.contains(n))
            .collect(),
    };
    if !missing.is_empty() {
        return Err(ApiError::bad(format!(
            "missing input{} {}",
            if missing.len() > 1 { "s" } else { "" },
            missing
                .iter()
                .map(|m| format!("{m:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    // which outputs, and which of them as binary data
    let default_binary = req
        .parameters
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut wanted: Vec<(usize, bool)> = Vec::new();
    match &req.outputs {
        None => wanted.extend((0..model.outputs().len()).map(|ix| (ix, default_binary))),
        Some(list) => {
            for o in list {
                let Some(ix) = model.outputs().iter().position(|x| x.name == o.name) else {
                    return Err(ApiError::bad(format!(
                        "output {:?}: not an output of the model (outputs: {})",
                        o.name,
                        model
                            .outputs()
                            .iter()
                            .map(|x| x.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                };
                if o.parameters.contains_key("classification") {
                    return Err(ApiError::bad(format!(
                        "output {:?}: the classification extension is not supported",
                        o.name
                    )));
                }
                let bin = o
                    .parameters
                    .get("binary_data")
                    .and_then(Value::as_bool)
                    .unwrap_or(default_binary);
                if !wanted.iter().any(|(w, _)| *w == ix) {
                    wanted.push((ix, bin));
                }
            }
        }
    }

    for (r, row) in rows.iter().enumerate() {
        check_floats(model, r, row).map_err(|e| ApiError::row(e, Flavor::V2))?;
    }
    let n_rows = rows.len();
    let pred = predict_with(Arc::clone(&loaded), &rows, false)
        .map_err(|e| ApiError::predict(e, Flavor::V2))?;
    let ids = served.report(&rows, &pred);
    let mut outputs = Vec::with_capacity(wanted.len());
    let mut bin_out: Vec<u8> = Vec::new();
    let mut any_binary = false;
    for (ix, as_binary) in wanted {
        let t = output_tensor(l, ix, &pred.outputs)?;
        debug_assert_eq!(t.shape.first().copied(), Some(n_rows));
        if as_binary {
            any_binary = true;
            let bytes = encode_binary(&t);
            outputs.push(json!({
                "name": t.name, "datatype": t.datatype, "shape": t.shape,
                "parameters": { "binary_data_size": bytes.len() },
            }));
            bin_out.extend(bytes);
        } else {
            outputs.push(json!({
                "name": t.name, "datatype": t.datatype, "shape": t.shape, "data": t.data,
            }));
        }
    }
    let mut resp = json!({
        "model_name": l.name,
        "model_version": l.version,
        "outputs": outputs,
        // an extension: the ids `POST /v1/feedback` takes, one per row (as on `:predict`)
        "parameters": { "prediction_ids": ids },
    });
    if let Some(id) = req.id {
        resp["id"] = id.into();
    }
    let mut bytes = serde_json::to_vec(&resp).unwrap_or_default();
    if !any_binary {
        return Ok(([(header::CONTENT_TYPE, "application/json")], bytes).into_response());
    }
    let json_len = bytes.len();
    bytes.extend(bin_out);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                json_len.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

struct OutTensor {
    name: String,
    datatype: &'static str,
    shape: Vec<usize>,
    data: Vec<Value>,
}

/// Gathers output `ix` of every row back into one tensor: `[N]` for per-row scalars,
/// `[N, K]` for per-row vectors and ZipMaps (probabilities in label order).
fn output_tensor(
    l: &Loaded,
    ix: usize,
    rows: &[Map<String, Value>],
) -> Result<OutTensor, ApiError> {
    let info = &l.model.outputs()[ix];
    let mut data = Vec::new();
    let mut width: Option<Option<usize>> = None;
    for row in rows {
        let v = row.get(&info.name).cloned().unwrap_or(Value::Null);
        let (w, items) = match v {
            Value::Object(o) => {
                let items: Vec<Value> = match &info.zipmap {
                    Some(labels) => (0..labels.len())
                        .map(|k| o.get(&labels.key(k)).cloned().unwrap_or(Value::Null))
                        .collect(),
                    None => o.into_iter().map(|(_, v)| v).collect(),
                };
                (Some(items.len()), items)
            }
            Value::Array(a) => (Some(a.len()), a),
            other => (None, vec![other]),
        };
        match width {
            None => width = Some(w),
            Some(prev) if prev != w => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("output {:?}: rows have different shapes", info.name),
                ))
            }
            _ => {}
        }
        data.extend(items);
    }
    let shape = match width.flatten() {
        None => vec![rows.len()],
        Some(w) => vec![rows.len(), w],
    };
    Ok(OutTensor {
        name: info.name.clone(),
        datatype: datatype(info.elem),
        shape,
        data,
    })
}

/// Little-endian element bytes (BYTES: a 4-byte length before each string); `null` (a NaN or
/// infinite value) becomes NaN.
fn encode_binary(t: &OutTensor) -> Vec<u8> {
    let mut out = Vec::new();
    for v in &t.data {
        match t.datatype {
            "FP32" => out.extend((v.as_f64().unwrap_or(f64::NAN) as f32).to_le_bytes()),
            "FP64" => out.extend(v.as_f64().unwrap_or(f64::NAN).to_le_bytes()),
            "INT64" => out.extend(v.as_i64().unwrap_or_default().to_le_bytes()),
            "INT32" => out.extend((v.as_i64().unwrap_or_default() as i32).to_le_bytes()),
            "BOOL" => out.push(v.as_bool().unwrap_or_default() as u8),
            _ => {
                let s = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                out.extend((s.len() as u32).to_le_bytes());
                out.extend(s.as_bytes());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// KServe v1 style: POST /v1/models/{name}:predict, GET /v1/models/{name}

/// `name:verb` of a `/v1/models/{*rest}` path.
fn v1_target(rest: &str) -> Result<(&str, Option<&str>), ApiError> {
    let (name, verb) = match rest.split_once(':') {
        Some((n, v)) => (n, Some(v)),
        None => (rest, None),
    };
    if name.is_empty() || name.contains('/') {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no route for /v1/models/{rest}"),
        )
        .flavor(Flavor::V1));
    }
    Ok((name, verb))
}

async fn v1_get(
    State(s): State<Arc<AppState>>,
    Path(rest): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (name, verb) = v1_target(&rest)?;
    if let Some(verb) = verb {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(":{verb} takes POST"),
        )
        .flavor(Flavor::V1));
    }
    let l = resolve(&s, name, None, Flavor::V1)?;
    Ok(Json(json!({
        "name": l.name,
        "version": l.version,
        "release": l.release,
        "ready": s.ready.load(Ordering::SeqCst),
    })))
}

async fn v1_post(
    State(s): State<Arc<AppState>>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (name, verb) = v1_target(&rest)?;
    match verb {
        Some("predict") => {}
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown method :{other} (use :predict)"),
            )
            .flavor(Flavor::V1))
        }
        None => {
            return Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("POST /v1/models/{name}:predict scores instances"),
            )
            .flavor(Flavor::V1))
        }
    }
    let body = body.map_err(|r| body_error(r, s.config.http.max_body_bytes, Flavor::V1))?;
    let active = resolve(&s, name, None, Flavor::V1)?;
    let loaded = routed(&s, name, active, &headers);
    let served = Served::new(&s);
    let out = blocking(&s.pool, Flavor::V1, move || {
        v1_predict(loaded, &body, &served).map_err(|e| e.flavor(Flavor::V1))
    })
    .await?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out,
    )
        .into_response())
}

/// `POST /v1/feedback`: ground truth for earlier predictions, by prediction id.
async fn feedback(
    State(s): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| body_error(r, s.config.http.max_body_bytes, Flavor::V1))?;
    let st = s.clone();
    let (status, value) = s
        .pool
        .run(move || crate::telemetry::receive_feedback(&st, &body))
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok((status, Json(value)).into_response())
}

/// The `:predict` response, serialized straight from the prediction (no JSON tree).
#[derive(serde::Serialize)]
struct V1Response<'a> {
    predictions: &'a [Map<String, Value>],
    model: &'a str,
    version: &'a str,
    release: u64,
    prediction_ids: Vec<String>,
}

fn v1_predict(loaded: Arc<Loaded>, body: &[u8], served: &Served) -> Result<Vec<u8>, ApiError> {
    let usage = "expected {\"instances\": [{\"<feature>\": value, ...}, ...]}";
    let req: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("request body is not JSON: {e}; {usage}")))?;
    let Value::Object(mut req) = req else {
        return Err(ApiError::bad(format!("got {}; {usage}", json_kind(&req))));
    };
    if let Some(k) = req.keys().find(|k| *k != "instances") {
        return Err(ApiError::bad(format!("unknown key {k:?}; {usage}")));
    }
    let instances = match req.remove("instances") {
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "\"instances\" is {}, not an array; {usage}",
                json_kind(&other)
            )))
        }
        None => return Err(ApiError::bad(format!("no \"instances\"; {usage}"))),
    };
    if instances.is_empty() {
        return Err(ApiError::bad("\"instances\" is empty"));
    }
    if instances.len() > MAX_ROWS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} instances; at most {MAX_ROWS} per request",
                instances.len()
            ),
        ));
    }
    let model = &loaded.model;
    let mut rows = Vec::with_capacity(instances.len());
    for (row, inst) in instances.into_iter().enumerate() {
        let refuse = |message: String| {
            ApiError::row(
                RowError {
                    row,
                    field: None,
                    message,
                },
                Flavor::V1,
            )
        };
        let obj = match inst {
            Value::Object(o) => o,
            // positional: the values of a model's only input
            Value::Array(a) => match model.inputs() {
                [only] if only.map_value.is_none() => {
                    let mut m = Map::new();
                    m.insert(only.name.clone(), Value::Array(a));
                    m
                }
                _ => {
                    return Err(refuse(format!(
                        "an array instance needs a model with one input; send an object keyed by input name ({})",
                        input_names(model)
                    )))
                }
            },
            other => {
                return Err(refuse(format!(
                    "an instance must be an object (feature or input name -> value), got {}",
                    json_kind(&other)
                )))
            }
        };
        check_floats(model, row, &obj).map_err(|e| ApiError::row(e, Flavor::V1))?;
        rows.push(obj);
    }
    let pred = predict_with(loaded, &rows, false).map_err(|e| ApiError::predict(e, Flavor::V1))?;
    let ids = served.report(&rows, &pred);
    let l = &pred.loaded;
    serde_json::to_vec(&V1Response {
        predictions: &pred.outputs,
        model: &l.name,
        version: &l.version,
        release: l.release,
        prediction_ids: ids,
    })
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render: {e}"),
        )
    })
}

/// Refuses what would reach a float input as NaN or infinity without being `null` (which
/// the runtime already refuses): blank or non-finite numeric strings, numbers out of `float`
/// range. Other type problems are left to the engine, which names them.
fn check_floats(model: &Model, row: usize, obj: &Map<String, Value>) -> Result<(), RowError> {
    let single = match model.inputs() {
        [only] if only.map_value.is_none() && only.shape.len() == 2 => Some(only),
        _ => None,
    };
    for (k, v) in obj {
        let elem = match model.inputs().iter().find(|i| i.name == *k) {
            Some(i) if i.map_value.is_some() => continue,
            Some(i) => i.elem,
            None => match single {
                Some(s) => s.elem,
                None => continue,
            },
        };
        if !matches!(elem, ElemType::F32 | ElemType::F64) {
            continue;
        }
        let mut leaves = Vec::new();
        flatten_ref(v, &mut leaves);
        for leaf in leaves {
            let problem = match leaf {
                Value::String(s) if s.trim().is_empty() => {
                    Some("is an empty string (a missing value)".to_string())
                }
                Value::String(s) => match s.trim().parse::<f64>() {
                    Ok(x)
                        if !x.is_finite()
                            || (elem == ElemType::F32 && (x as f32).is_infinite()) =>
                    {
                        Some(format!("{s:?} is not a finite number"))
                    }
                    _ => None,
                },
                Value::Number(n)
                    if elem == ElemType::F32
                        && n.as_f64().is_some_and(|x| (x as f32).is_infinite()) =>
                {
                    Some(format!("{n} is out of the float range"))
                }
                _ => None,
            };
            if let Some(message) = problem {
                return Err(RowError {
                    row,
                    field: Some(k.clone()),
                    message,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare_and_binary_codec() {
        assert!(shared::auth::ct_eq(b"abc", b"abc"));
        assert!(!shared::auth::ct_eq(b"abc", b"abd"));
        assert!(!shared::auth::ct_eq(b"abc", b"ab"));
        let mut bytes = Vec::new();
        for x in [1.5f32, -2.0] {
            bytes.extend(x.to_le_bytes());
        }
        let v = decode_binary("X", "FP32", &bytes, 2).unwrap();
        assert_eq!(v, vec![json!(1.5), json!(-2.0)]);
        assert!(decode_binary("X", "FP32", &bytes, 3).is_err());
        let nan = f32::NAN.to_le_bytes();
        let e = decode_binary("X", "FP32", &nan, 1).unwrap_err();
        assert!(e.message.contains("element 0 is NaN"), "{}", e.message);
        let t = OutTensor {
            name: "label".into(),
            datatype: "BYTES",
            shape: vec![2],
            data: vec![json!("ok"), json!("scrap")],
        };
        let enc = encode_binary(&t);
        assert_eq!(
            decode_binary("label", "BYTES", &enc, 2).unwrap(),
            vec![json!("ok"), json!("scrap")]
        );
        let ids = crate::feedback::prediction_ids("box1", 3, 2);
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1]);
        assert!(ids[0].starts_with("box1-3-"));
    }

    /// The router with `tokens` configured and no model loaded, served on a loopback port
    /// (the guard answers before any handler needs a model).
    async fn serve_with_tokens(
        tokens: &[(&str, &str, &[&str])],
        state_dir: &std::path::Path,
    ) -> std::net::SocketAddr {
        use sha2::Digest;
        let mut config = crate::config::Config::default();
        config.http.tokens = tokens
            .iter()
            .map(|(name, secret, scopes)| Token {
                name: name.to_string(),
                sha256: shared::trust::hex(&sha2::Sha256::digest(secret.as_bytes())),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
            })
            .collect();
        let state = Arc::new(AppState {
            registry: Arc::new(crate::runtime::Registry::default()),
            device_id: "box1".into(),
            ready: std::sync::atomic::AtomicBool::new(false),
            lifecycle: crate::service::LifecycleCounters::default(),
            mqtt: Arc::new(crate::mqtt::MqttCounters::default()),
            pool: Arc::new(crate::pool::ScoringPool::new(1, MAX_IN_FLIGHT).unwrap()),
            telemetry: Arc::new(crate::telemetry::Telemetry::open(&config, state_dir).unwrap()),
            feedback: Arc::new(crate::feedback::Feedback::new(config.feedback.clone()).unwrap()),
            sync: Arc::new(crate::sync::SyncCounters::default()),
            health_sample: Arc::new(std::sync::Mutex::new(None)),
            config,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        addr
    }

    /// One HTTP/1.1 request; the status, the `WWW-Authenticate` header and the body.
    async fn call(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: agent\r\n{auth}Content-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let challenge = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .starts_with("www-authenticate:")
                    .then(|| l["www-authenticate:".len()..].trim().to_string())
            })
            .unwrap_or_default();
        (status, challenge, body.to_string())
    }

    #[test]
    fn every_configurable_scope_reads_metrics_and_only_metrics_is_confined_to_it() {
        // the route table and config's list of scopes agree
        for scope in crate::config::TOKEN_SCOPES {
            assert!(METRICS_READERS.contains(&scope), "{scope} reads /metrics");
        }
        assert_eq!(METRICS_READERS.len(), crate::config::TOKEN_SCOPES.len());
        for path in [
            "/v2",
            "/v2/models/m",
            "/v1/models/m:predict",
            "/v1/feedback",
            "/nope",
        ] {
            let Access::AnyOf(scopes) = access(path) else {
                panic!("{path} needs a token");
            };
            assert!(!scopes.contains(&SCOPE_METRICS), "{path}: {scopes:?}");
        }
        assert_eq!(access("/v2/health/live"), Access::Open);
        assert_eq!(access("/v2/health/ready"), Access::Open);
    }

    #[tokio::test]
    async fn metrics_only_token_reads_metrics_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let addr = serve_with_tokens(
            &[
                ("prometheus", "scrape-1", &["metrics"]),
                ("scada", "predict-2", &["predict"]),
                ("labels", "feedback-3", &["feedback"]),
                ("ops", "admin-4", &["admin"]),
            ],
            dir.path(),
        )
        .await;

        // the metrics token: /metrics, in the exposition format
        let (status, _, body) = call(addr, "GET", "/metrics", Some("scrape-1"), "").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("edge_agent_"), "{body}");

        // ... and nothing else: 403 naming the missing scope, in each route's error body
        let predict = r#"{"instances":[{"x":1.0}]}"#;
        let (status, challenge, body) = call(
            addr,
            "POST",
            "/v1/models/m:predict",
            Some("scrape-1"),
            predict,
        )
        .await;
        assert_eq!(status, 403, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["error"]["message"],
            "this token lacks the \"predict\" scope"
        );
        assert!(
            challenge.contains("error=\"insufficient_scope\", scope=\"predict\""),
            "{challenge}"
        );
        let infer = r#"{"inputs":[{"name":"X","shape":[1,1],"datatype":"FP32","data":[1.0]}]}"#;
        let (status, _, body) =
            call(addr, "POST", "/v2/models/m/infer", Some("scrape-1"), infer).await;
        assert_eq!(status, 403, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "this token lacks the \"predict\" scope");
        for path in ["/v2/models/m", "/v2/models/m/ready", "/v1/models/m"] {
            let (status, _, body) = call(addr, "GET", path, Some("scrape-1"), "").await;
            assert_eq!(status, 403, "{path}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            let message = v["error"]["message"].as_str().or(v["error"].as_str());
            assert_eq!(
                message,
                Some("this token lacks the \"predict\" scope"),
                "{path}: {body}"
            );
        }
        let feedback = r#"{"prediction_id":"box1-1-0-0","label":"1"}"#;
        let (status, challenge, body) =
            call(addr, "POST", "/v1/feedback", Some("scrape-1"), feedback).await;
        assert_eq!(status, 403, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["error"]["message"],
            "this token lacks the \"feedback\" scope"
        );
        assert!(challenge.contains("scope=\"feedback\""), "{challenge}");
        // server metadata and unknown paths: any scope but metrics
        for path in ["/v2", "/elsewhere"] {
            let (status, challenge, body) = call(addr, "GET", path, Some("scrape-1"), "").await;
            assert_eq!(status, 403, "{path}: {body}");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(
                v["error"],
                "this token lacks a scope for this route (one of \"predict\", \"feedback\", \"admin\")",
                "{path}"
            );
            assert!(
                challenge.contains("scope=\"predict feedback admin\""),
                "{challenge}"
            );
        }

        // backward compatible: every other scope still reads /metrics (and /v2)
        for token in ["predict-2", "feedback-3", "admin-4"] {
            let (status, _, body) = call(addr, "GET", "/metrics", Some(token), "").await;
            assert_eq!(status, 200, "{token}: {body}");
            assert!(body.contains("edge_agent_"), "{token}");
            assert_eq!(
                call(addr, "GET", "/v2", Some(token), "").await.0,
                200,
                "{token}"
            );
        }
        // the predict token passes the guard on model routes (404: no model loaded)
        let (status, _, body) = call(addr, "GET", "/v2/models/m", Some("predict-2"), "").await;
        assert_eq!(status, 404, "{body}");

        // no token or an unknown one: 401 on /metrics
        assert_eq!(call(addr, "GET", "/metrics", None, "").await.0, 401);
        assert_eq!(
            call(addr, "GET", "/metrics", Some("scrape-2"), "").await.0,
            401
        );

        // the health probes stay open (ready answers 503 here: nothing loaded yet)
        assert_eq!(call(addr, "GET", "/v2/health/live", None, "").await.0, 200);
        assert_eq!(call(addr, "GET", "/v2/health/ready", None, "").await.0, 503);
        assert_eq!(
            call(addr, "GET", "/v2/health/live", Some("scrape-1"), "")
                .await
                .0,
            200
        );
    }

    #[test]
    fn openapi_document_lists_every_route() {
        let doc = include_str!("../openapi.yaml");
        for path in [
            "/v2/health/live",
            "/v2/health/ready",
            "/v2",
            "/v2/models/{name}",
            "/v2/models/{name}/versions/{version}",
            "/v2/models/{name}/ready",
            "/v2/models/{name}/versions/{version}/ready",
            "/v2/models/{name}/infer",
            "/v2/models/{name}/versions/{version}/infer",
            "/v1/models/{name}",
            "/v1/models/{name}:predict",
            "/v1/feedback",
            "/metrics",
        ] {
            assert!(
                doc.contains(&format!("\n  {path}:\n")),
                "{path} in openapi.yaml"
            );
        }
    }
}
