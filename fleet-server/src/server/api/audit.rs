//! Audit endpoints (role viewer): `GET /v1/audit?after=SEQ&limit=N` lists records with the
//! log's head, `GET /v1/audit/verify` checks the whole hash chain (optionally against an
//! externally kept head: `?seq=N&hash=H`) and says what is wrong.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::audit::{self, AuditLog, Head};
use crate::server::config::Token;
use crate::server::http::{authorize, ApiError};

/// Records one listing returns when no `limit` is given.
pub const DEFAULT_LIMIT: usize = 100;

/// What the audit handlers share.
pub struct AuditState {
    pub tokens: Vec<Token>,
    pub audit: AuditLog,
}

/// The routes, state applied.
pub fn router(state: Arc<AuditState>) -> Router {
    Router::new()
        .route("/v1/audit", get(list))
        .route("/v1/audit/verify", get(verify))
        .with_state(state)
}

fn number(q: &HashMap<String, String>, key: &str) -> Result<Option<u64>, ApiError> {
    q.get(key)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("query parameter {key}: {v:?} is not a non-negative integer"),
                )
            })
        })
        .transpose()
}

async fn blocking(f: impl FnOnce() -> Response + Send + 'static) -> Response {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("request handler failed: {e}"),
        )
        .into_response()
    })
}

async fn list(
    State(s): State<Arc<AuditState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(e) = authorize(&s.tokens, &headers, "viewer") {
        return e.into_response();
    }
    let (after, limit) = match (number(&q, "after"), number(&q, "limit")) {
        (Ok(a), Ok(l)) => (a.unwrap_or(0), l.map_or(DEFAULT_LIMIT, |l| l as usize)),
        (Err(e), _) | (_, Err(e)) => return e.into_response(),
    };
    let limit = limit.min(audit::MAX_READ_RECORDS);
    blocking(move || {
        let head = s.audit.head();
        match audit::read(s.audit.path(), after, limit) {
            Ok(records) => Json(json!({"records": records, "head": head})).into_response(),
            Err(e) => {
                tracing::error!(error = %e, "audit log not readable");
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
            }
        }
    })
    .await
}

async fn verify(
    State(s): State<Arc<AuditState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(e) = authorize(&s.tokens, &headers, "viewer") {
        return e.into_response();
    }
    let anchor = match (number(&q, "seq"), q.get("hash")) {
        (Err(e), _) => return e.into_response(),
        (Ok(Some(seq)), Some(hash)) => Some(Head {
            seq,
            hash: hash.clone(),
        }),
        (Ok(None), None) => None,
        _ => {
            return ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "query parameters seq and hash: give both (an anchor) or neither",
            )
            .into_response()
        }
    };
    blocking(move || {
        let path = s.audit.path();
        let r = match &anchor {
            Some(a) => audit::verify_with_anchor(path, a),
            None => audit::verify(path),
        };
        match r {
            Ok(rep) => Json(json!({
                "ok": true,
                "records": rep.records,
                "head": rep.head,
                "problem": null,
            }))
            .into_response(),
            Err(e) => Json(json!({
                "ok": false,
                "records": s.audit.head().seq,
                "head": s.audit.head(),
                "problem": e.to_string(),
            }))
            .into_response(),
        }
    })
    .await
}
