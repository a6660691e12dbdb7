//! The bundle endpoints: `POST /v1/bundles` (operator; the body is the raw bundle, streamed
//! to the store), `GET /v1/bundles`, `GET /v1/bundles/{name}/{version}` (viewer),
//! `POST /v1/bundles/{name}/{version}/approve` (admin, not the uploader) and
//! `GET /v1/bundles/{name}/{version}/download` (viewer; one `Range: bytes=...` honoured with
//! 206). Pushes and approvals are audited, refused ones too.

use std::io::{Read, Seek, SeekFrom};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Serialize;

use crate::audit::{AuditLog, NewRecord, Outcome};
use crate::bundles::{BundleError, BundleRecord, BundleStore};
use crate::server::config::Token;
use crate::server::http::{authorize, ApiError};

/// Bytes read from the file per step of a download.
const DOWNLOAD_STEP: u64 = 64 * 1024;

/// What the bundle handlers share.
pub struct BundlesState {
    pub tokens: Vec<Token>,
    pub store: Arc<BundleStore>,
    pub audit: AuditLog,
}

/// `{"bundles": [...]}`.
#[derive(Debug, Serialize)]
pub struct BundleList {
    pub bundles: Vec<BundleRecord>,
}

/// The routes, with `state` applied.
pub fn router(state: Arc<BundlesState>) -> Router {
    Router::new()
        .route("/v1/bundles", post(push).get(list))
        .route("/v1/bundles/{name}/{version}", get(show))
        .route("/v1/bundles/{name}/{version}/approve", post(approve))
        .route("/v1/bundles/{name}/{version}/download", get(download))
        .with_state(state)
}

/// The HTTP status of a store error.
pub fn status_of(e: &BundleError) -> StatusCode {
    match e {
        BundleError::NoTrustRoot => StatusCode::SERVICE_UNAVAILABLE,
        BundleError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        BundleError::Empty | BundleError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        BundleError::Body(_) => StatusCode::BAD_REQUEST,
        BundleError::Conflict { .. } | BundleError::AlreadyApproved { .. } => StatusCode::CONFLICT,
        BundleError::NotFound { .. } => StatusCode::NOT_FOUND,
        BundleError::SelfApproval { .. } => StatusCode::FORBIDDEN,
        BundleError::Full { .. } => StatusCode::INSUFFICIENT_STORAGE,
        BundleError::TrustRoot(_)
        | BundleError::Keyring { .. }
        | BundleError::Io { .. }
        | BundleError::Policy { .. }
        | BundleError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn api_error(e: &BundleError) -> ApiError {
    ApiError::new(status_of(e), e.to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Appends an audit record; a failure to record turns the response into a 500 that says
/// what happened to the action.
fn audit(s: &BundlesState, rec: NewRecord, done: &str) -> Result<(), ApiError> {
    s.audit.append(&rec).map(|_| ()).map_err(|e| {
        tracing::error!(error = %e, action = %rec.action, "audit record not written");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{done}, but the audit record could not be written: {e}"),
        )
    })
}

async fn push(
    State(s): State<Arc<BundlesState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let token = authorize(&s.tokens, &headers, "operator")?.clone();
    let record = |target: &str, outcome: Outcome| {
        NewRecord::new(&token.name, &token.role, "bundle.push", target, outcome)
    };
    match receive(&s, &headers, body, &token.name).await {
        Ok(up) => {
            let r = &up.record;
            let rec = record(&r.id(), Outcome::Ok)
                .with_bundle_sha256(&r.sha256)
                .with_details(serde_json::json!({
                    "created": up.created,
                    "state": r.signoff.state,
                    "bytes": r.bytes,
                }));
            audit(&s, rec, &format!("bundle {} stored", r.id()))?;
            let status = if up.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            let mut resp = (status, Json(&up.record)).into_response();
            let location = format!("/v1/bundles/{}/{}", r.name, r.version);
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Ok(resp)
        }
        Err(e) => {
            let (target, sha) = match &e {
                BundleError::Conflict {
                    name,
                    version,
                    uploaded,
                    ..
                } => (format!("{name}@{version}"), Some(uploaded.clone())),
                BundleError::Invalid { sha256, .. } => ("upload".to_string(), Some(sha256.clone())),
                _ => ("upload".to_string(), None),
            };
            let mut rec = record(&target, Outcome::Error(e.to_string()));
            if let Some(sha) = sha {
                rec = rec.with_bundle_sha256(sha);
            }
            audit(&s, rec, "bundle refused")?;
            Err(api_error(&e))
        }
    }
}

/// Streams the body into an upload and completes it.
async fn receive(
    s: &Arc<BundlesState>,
    headers: &HeaderMap,
    body: Body,
    uploader: &str,
) -> Result<crate::bundles::Uploaded, BundleError> {
    let limit = s.store.max_bundle_bytes();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BundleError::TooLarge { limit });
    }
    let mut up = s.store.begin_upload()?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BundleError::Body(e.to_string()))?;
        up.write(&chunk)?;
    }
    let store = s.store.clone();
    let uploader = uploader.to_string();
    tokio::task::spawn_blocking(move || store.finish_upload(up, &uploader, now_ms()))
        .await
        .map_err(|e| BundleError::Body(format!("verification task failed: {e}")))?
}

async fn list(
    State(s): State<Arc<BundlesState>>,
    headers: HeaderMap,
) -> Result<Json<BundleList>, ApiError> {
    authorize(&s.tokens, &headers, "viewer")?;
    Ok(Json(BundleList {
        bundles: s.store.list(),
    }))
}

fn find(s: &BundlesState, name: &str, version: &str) -> Result<BundleRecord, ApiError> {
    s.store.get(name, version).ok_or_else(|| {
        api_error(&BundleError::NotFound {
            name: name.into(),
            version: version.into(),
        })
    })
}

async fn show(
    State(s): State<Arc<BundlesState>>,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<BundleRecord>, ApiError> {
    authorize(&s.tokens, &headers, "viewer")?;
    find(&s, &name, &version).map(Json)
}

async fn approve(
    State(s): State<Arc<BundlesState>>,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<BundleRecord>, ApiError> {
    let token = authorize(&s.tokens, &headers, "admin")?.clone();
    let target = format!("{name}@{version}");
    let sha = s.store.get(&name, &version).map(|r| r.sha256);
    let result = s.store.approve(&name, &version, &token.name);
    let outcome = match &result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Error(e.to_string()),
    };
    let mut rec = NewRecord::new(&token.name, &token.role, "bundle.approve", &target, outcome);
    if let Some(sha) = sha {
        rec = rec.with_bundle_sha256(sha);
    }
    if let Ok(r) = &result {
        rec = rec.with_details(serde_json::json!({"state": r.signoff.state}));
    }
    let done = match &result {
        Ok(_) => format!("bundle {target} approved"),
        Err(_) => format!("approval of {target} refused"),
    };
    audit(&s, rec, &done)?;
    result.map(Json).map_err(|e| api_error(&e))
}

/// The byte range (first, last inclusive) a `Range` header asks of a `len`-byte file:
/// `Ok(None)` serves the whole file (no header, another unit, several ranges, or a
/// malformed value, which RFC 9110 lets a server ignore); `Err` is 416.
fn parse_range(h: Option<&HeaderValue>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(text) = h.and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    let Some(spec) = text.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let Ok(n) = b.parse::<u64>() else {
            return Ok(None);
        };
        if n == 0 || len == 0 {
            return Err(());
        }
        return Ok(Some((len - n.min(len), len - 1)));
    }
    let Ok(first) = a.parse::<u64>() else {
        return Ok(None);
    };
    let last = if b.is_empty() {
        u64::MAX
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => l,
            _ => return Ok(None),
        }
    };
    if first >= len {
        return Err(());
    }
    Ok(Some((first, last.min(len - 1))))
}

fn file_name_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

async fn download(
    State(s): State<Arc<BundlesState>>,
    headers: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    authorize(&s.tokens, &headers, "viewer")?;
    let r = find(&s, &name, &version)?;
    let path = s.store.path(&r.sha256);
    let internal = |what: &str, e: std::io::Error| {
        tracing::error!(path = %path.display(), error = %e, "bundle file: {what}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "bundle {name}@{version}: file {}: {what}: {e}",
                path.display()
            ),
        )
    };
    let mut file = std::fs::File::open(&path).map_err(|e| internal("open", e))?;
    let len = file.metadata().map_err(|e| internal("metadata", e))?.len();
    let range = parse_range(headers.get(header::RANGE), len);
    let (status, first, last) = match range {
        Err(()) => {
            let mut resp = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!("range not satisfiable: bundle {name}@{version} has {len} bytes"),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Ok(None) => (StatusCode::OK, 0, len.saturating_sub(1)),
    };
    let count = if len == 0 { 0 } else { last - first + 1 };
    if first > 0 {
        file.seek(SeekFrom::Start(first))
            .map_err(|e| internal("seek", e))?;
    }
    let stream = futures_util::stream::unfold(Some((file, count)), |st| async move {
        let (mut file, left) = st?;
        if left == 0 {
            return None;
        }
        let n = left.min(DOWNLOAD_STEP) as usize;
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n];
            file.read_exact(&mut buf).map(|()| (file, buf))
        })
        .await;
        match read {
            Ok(Ok((file, buf))) => Some((Ok(Bytes::from(buf)), Some((file, left - n as u64)))),
            Ok(Err(e)) => Some((Err(e), None)),
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", r.sha256)) {
        h.insert(header::ETAG, v);
    }
    let disposition = format!(
        "attachment; filename=\"{}-{}.bundle\"",
        file_name_part(&r.name),
        file_name_part(&r.version)
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{last}/{len}")) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundles::tests::{config, make_bundle, root};
    use crate::store::Db;
    use axum::http::Request;
    use tower::ServiceExt;

    struct Fixture {
        _dir: tempfile::TempDir,
        dir: std::path::PathBuf,
        app: Router,
        audit_path: std::path::PathBuf,
    }

    fn fixture(approvals: u32) -> Fixture {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_path_buf();
        let mut cfg = config(
            &dir,
            vec![crate::server::config::SignoffPolicy {
                model: "pdm".into(),
                require: vec![],
                approvals,
            }],
        );
        cfg.max_bundle_bytes = 300_000;
        let store = BundleStore::open(Db::temporary().unwrap(), dir.join("bundles"), &cfg).unwrap();
        let audit_path = dir.join("audit").join("audit.jsonl");
        let (audit, _) = AuditLog::open(&audit_path).unwrap();
        let app = router(Arc::new(BundlesState {
            tokens: vec![
                Token::from_secret("viewer", "v", "viewer"),
                Token::from_secret("alice", "a", "operator"),
                Token::from_secret("root", "r", "admin"),
                Token::from_secret("bob", "b", "admin"),
            ],
            store: Arc::new(store),
            audit,
        }));
        Fixture {
            _dir: d,
            dir,
            app,
            audit_path,
        }
    }

    async fn call(
        app: &Router,
        method: &str,
        uri: &str,
        secret: &str,
        body: Vec<u8>,
        range: Option<&str>,
    ) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {secret}"));
        if let Some(r) = range {
            req = req.header("range", r);
        }
        let r = app
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let body = axum::body::to_bytes(r.into_body(), 1 << 24).await.unwrap();
        (status, headers, body.to_vec())
    }

    /// A response: status, headers and body.
    type Reply = (StatusCode, HeaderMap, Vec<u8>);

    impl Fixture {
        /// The bytes of a fresh `pdm@version` bundle with a model of `model_bytes`.
        fn bundle_bytes(&self, version: &str, model_bytes: usize) -> Vec<u8> {
            std::fs::read(make_bundle(
                &self.dir,
                "pdm",
                version,
                None,
                &root(),
                model_bytes,
            ))
            .unwrap()
        }
        /// `POST /v1/bundles` with `bytes`.
        async fn push(&self, secret: &str, bytes: Vec<u8>) -> Reply {
            call(&self.app, "POST", "/v1/bundles", secret, bytes, None).await
        }
        /// `POST /v1/bundles/pdm/{version}/approve`.
        async fn approve(&self, version: &str, secret: &str) -> Reply {
            let uri = format!("/v1/bundles/pdm/{version}/approve");
            call(&self.app, "POST", &uri, secret, vec![], None).await
        }
        /// `GET uri`, with a Range header when `range` is given.
        async fn get(&self, uri: &str, secret: &str, range: Option<&str>) -> Reply {
            call(&self.app, "GET", uri, secret, vec![], range).await
        }
    }

    fn json(b: &[u8]) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    /// The `error` message of an error response body.
    fn error(b: &[u8]) -> String {
        json(b)["error"].as_str().unwrap().to_string()
    }

    fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn push_approve_list_and_audit() {
        let f = fixture(1);
        let bytes = f.bundle_bytes("1.0.0", 10_000);
        let sha = shared::delivery::sha256_hex(&bytes);
        // a viewer may not push
        let (st, _, _) = f.push("v", bytes.clone()).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, h, b) = f.push("a", bytes.clone()).await;
        assert_eq!(st, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
        assert_eq!(h["location"], "/v1/bundles/pdm/1.0.0");
        let v = json(&b);
        assert_eq!(v["sha256"], sha);
        assert_eq!(v["uploaded_by"], "alice");
        assert_eq!(v["signoff"]["state"], "awaiting_approval");
        assert_eq!(v["signoff"]["approvals_needed"], 1);
        for key in [
            "name",
            "version",
            "release",
            "bytes",
            "signer",
            "uploaded_at_ms",
        ] {
            assert!(!v[key].is_null(), "{key} missing in {v}");
        }
        // the same bytes again: 200
        let (st, _, _) = f.push("a", bytes.clone()).await;
        assert_eq!(st, StatusCode::OK);
        // other bytes under the same name@version: 409
        let other_dir = f.dir.join("o");
        std::fs::create_dir(&other_dir).unwrap();
        let other = std::fs::read(make_bundle(
            &other_dir,
            "pdm",
            "1.0.0",
            None,
            &root(),
            10_001,
        ))
        .unwrap();
        let (st, _, b) = f.push("a", other).await;
        assert_eq!(st, StatusCode::CONFLICT);
        assert!(error(&b).contains("pdm@1.0.0"));
        // garbage: 422
        let (st, _, b) = f.push("a", b"junk".to_vec()).await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(error(&b).contains("refused"));
        // too large: 413
        let (st, _, b) = f.push("a", f.bundle_bytes("2.0.0", 400_000)).await;
        assert_eq!(st, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(error(&b).contains("300000"));

        // approve: an operator cannot; the uploader is not an admin here, an admin can
        let (st, _, _) = f.approve("1.0.0", "a").await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let (st, _, b) = f.approve("1.0.0", "b").await;
        assert_eq!(st, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let v = json(&b);
        assert_eq!(v["signoff"]["state"], "ready");
        assert_eq!(v["signoff"]["approved_by"][0], "bob");
        let (st, _, b) = f.approve("1.0.0", "b").await;
        assert_eq!(st, StatusCode::CONFLICT);
        assert!(error(&b).contains("already approved"));
        let (st, _, _) = f.approve("9.9.9", "b").await;
        assert_eq!(st, StatusCode::NOT_FOUND);

        let (st, _, b) = f.get("/v1/bundles", "v", None).await;
        assert_eq!(st, StatusCode::OK);
        let v = json(&b);
        assert_eq!(v["bundles"].as_array().unwrap().len(), 1);
        let (st, _, b) = f.get("/v1/bundles/pdm/1.0.0", "v", None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(json(&b)["signoff"]["state"], "ready");
        let (st, _, b) = f.get("/v1/bundles/pdm/3.0.0", "v", None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        assert!(error(&b).contains("pdm@3.0.0"));

        // every push and approval attempt after authorization is in the audit log
        let lines = audit_lines(&f.audit_path);
        let actions: Vec<(String, String)> = lines
            .iter()
            .map(|l| {
                (
                    l["action"].as_str().unwrap().to_string(),
                    l["result"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(actions.len(), 8, "{actions:?}");
        assert_eq!(actions[0], ("bundle.push".into(), "ok".into()));
        assert!(actions[2].1.starts_with("error: ") && actions[2].1.contains("already stored"));
        assert!(actions[4].1.contains("max_bundle_bytes"));
        assert_eq!(actions[5], ("bundle.approve".into(), "ok".into()));
        assert!(actions[6].1.contains("already approved"));
        assert_eq!(lines[0]["actor"], "alice");
        assert_eq!(lines[0]["target"], "pdm@1.0.0");
        assert_eq!(lines[5]["actor"], "bob");
        assert!(lines[0].to_string().contains(&sha));
        assert!(crate::audit::verify(&f.audit_path).is_ok());
    }

    #[tokio::test]
    async fn the_uploader_cannot_approve() {
        let f = fixture(1);
        let (st, _, _) = f.push("r", f.bundle_bytes("1.0.0", 1000)).await;
        assert_eq!(st, StatusCode::CREATED);
        let (st, _, b) = f.approve("1.0.0", "r").await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        let msg = error(&b);
        assert!(msg.contains("\"root\" uploaded it"), "{msg}");
        let lines = audit_lines(&f.audit_path);
        assert_eq!(lines[1]["action"], "bundle.approve");
        assert!(lines[1]["result"].as_str().unwrap().contains("uploaded it"));
    }

    #[tokio::test]
    async fn downloads_honour_ranges() {
        let f = fixture(0);
        let bytes = f.bundle_bytes("1.0.0", 150_000);
        let (st, _, _) = f.push("a", bytes.clone()).await;
        assert_eq!(st, StatusCode::CREATED);
        let url = "/v1/bundles/pdm/1.0.0/download";
        let (st, h, b) = f.get(url, "v", None).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(b, bytes);
        assert_eq!(h["accept-ranges"], "bytes");
        assert_eq!(h["content-length"], bytes.len().to_string().as_str());
        let len = bytes.len();
        let (st, h, b) = f.get(url, "v", Some("bytes=100-70099")).await;
        assert_eq!(st, StatusCode::PARTIAL_CONTENT);
        assert_eq!(b, &bytes[100..70100]);
        assert_eq!(
            h["content-range"],
            format!("bytes 100-70099/{len}").as_str()
        );
        // (range, the part of the file expected as 206 Partial Content)
        for (range, part) in [
            ("bytes=70000-", &bytes[70000..]),
            ("bytes=-10", &bytes[len - 10..]),
            ("bytes=0-99999999", &bytes[..]),
        ] {
            let (st, _, b) = f.get(url, "v", Some(range)).await;
            assert_eq!(st, StatusCode::PARTIAL_CONTENT, "{range}");
            assert_eq!(b, part, "{range}");
        }
        let past = format!("bytes={len}-");
        let (st, h, _) = f.get(url, "v", Some(&past)).await;
        assert_eq!(st, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(h["content-range"], format!("bytes */{len}").as_str());
        // several ranges: the whole file
        let (st, _, b) = f.get(url, "v", Some("bytes=0-1,5-6")).await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(b.len(), len);
        let (st, _, _) = f.get(url, "nobody", None).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn range_parsing() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(parse_range(None, 10), Ok(None));
        assert_eq!(parse_range(Some(&h("bytes=2-4")), 10), Ok(Some((2, 4))));
        assert_eq!(parse_range(Some(&h("bytes=2-")), 10), Ok(Some((2, 9))));
        assert_eq!(parse_range(Some(&h("bytes=-3")), 10), Ok(Some((7, 9))));
        assert_eq!(parse_range(Some(&h("bytes=-30")), 10), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some(&h("bytes=10-")), 10), Err(()));
        assert_eq!(parse_range(Some(&h("bytes=-0")), 10), Err(()));
        assert_eq!(parse_range(Some(&h("bytes=4-2")), 10), Ok(None));
        assert_eq!(parse_range(Some(&h("items=1-2")), 10), Ok(None));
        assert_eq!(parse_range(Some(&h("bytes=x-2")), 10), Ok(None));
    }
}
