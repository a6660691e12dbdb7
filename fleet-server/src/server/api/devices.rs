//! `GET /v1/devices` and `GET /v1/devices/{id}` (role viewer): the registry's devices with
//! their ingest counters (`fleetctl devices list|show`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use shared::wire::{DropCounts, RecordClass};

use crate::ingest::{DeviceState, FileStore};
use crate::registry::{Device, Registry, TagSelector};
use crate::server::config::Token;
use crate::server::http::{authorize, ApiError};

/// Most devices one listing returns.
pub const MAX_LIST: usize = 100_000;

/// What the device handlers share.
pub struct DevicesState {
    pub tokens: Vec<Token>,
    pub registry: Arc<Registry>,
    /// The ingest's root (`<state_dir>/ingest`), for the per-device counters.
    pub ingest_root: PathBuf,
}

/// A model version on a device (API type).
#[derive(Debug, Serialize)]
pub struct ModelView {
    pub name: String,
    pub version: String,
    pub release: Option<u64>,
    pub role: String,
    pub phase: Option<String>,
}

/// A device's ingest counters (API type).
#[derive(Debug, Serialize)]
pub struct IngestView {
    pub received: BTreeMap<&'static str, u64>,
    pub duplicates: u64,
    /// Highest contiguous sequence stored.
    pub last_seq: u64,
    pub gaps: u64,
    pub dropped_reported: BTreeMap<&'static str, DropCounts>,
    pub epoch: u64,
}

/// A device (API type `Device`).
#[derive(Debug, Serialize)]
pub struct DeviceView {
    pub id: String,
    pub tags: BTreeMap<String, String>,
    pub agent_version: String,
    pub models: Vec<ModelView>,
    pub online: bool,
    pub last_seen_ms: u64,
    pub online_since_ms: Option<u64>,
    pub health: Option<serde_json::Value>,
    pub ingest: Option<IngestView>,
}

/// `{"devices": [...]}`.
#[derive(Debug, Serialize)]
pub struct DeviceList {
    pub devices: Vec<DeviceView>,
}

/// The API view of an ingest state.
pub fn ingest_view(st: &DeviceState) -> IngestView {
    let received = RecordClass::ALL
        .iter()
        .map(|c| (c.as_str(), st.received.get(c).copied().unwrap_or(0)))
        .collect();
    let dropped_reported = RecordClass::ALL
        .iter()
        .map(|c| (c.as_str(), st.dropped.get(c).copied().unwrap_or_default()))
        .collect();
    IngestView {
        received,
        duplicates: st.duplicates,
        last_seq: st.last_seq,
        gaps: st.gaps,
        dropped_reported,
        epoch: st.epoch,
    }
}

/// The API view of a device, with its ingest counters read from `ingest_root`.
pub fn device_view(d: Device, ingest_root: &std::path::Path) -> DeviceView {
    let ingest = match FileStore::read_state(ingest_root, &d.id) {
        Ok(st) => st.as_ref().map(ingest_view),
        Err(e) => {
            tracing::warn!(device = %d.id, error = %e, "ingest state unreadable");
            None
        }
    };
    DeviceView {
        models: d
            .models
            .into_iter()
            .map(|m| ModelView {
                name: m.name,
                version: m.version,
                release: m.release,
                role: m.role,
                phase: m.phase,
            })
            .collect(),
        id: d.id,
        tags: d.tags,
        agent_version: d.agent_version,
        online: d.online,
        last_seen_ms: d.last_seen_ms,
        online_since_ms: d.online_since_ms,
        health: d.health,
        ingest,
    }
}

/// The routes, with `state` applied.
pub fn router(state: Arc<DevicesState>) -> Router {
    Router::new()
        .route("/v1/devices", get(list))
        .route("/v1/devices/{id}", get(show))
        .with_state(state)
}

async fn list(
    State(s): State<Arc<DevicesState>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeviceList>, ApiError> {
    authorize(&s.tokens, &headers, "viewer")?;
    let Query(params) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("query: {e}")))?;
    let mut selector = TagSelector::default();
    let mut online = None;
    let mut limit = MAX_LIST;
    for (k, v) in &params {
        match k.as_str() {
            "selector" | "target" => {
                selector = TagSelector::parse(v).map_err(|e| {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, format!("selector: {e}"))
                })?
            }
            "online" => {
                online = Some(match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            format!("online {v:?}: expected true or false"),
                        ))
                    }
                })
            }
            "limit" => {
                limit = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_LIST).contains(n))
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            format!("limit {v:?}: expected 1 to {MAX_LIST}"),
                        )
                    })?
            }
            other => {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("unknown query parameter {other:?} (known: selector, online, limit)"),
                ))
            }
        }
    }
    let devices = s.registry.list(&selector, online, limit);
    let root = s.ingest_root.clone();
    let devices = tokio::task::spawn_blocking(move || {
        devices
            .into_iter()
            .map(|d| device_view(d, &root))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("device listing: {e}"),
        )
    })?;
    Ok(Json(DeviceList { devices }))
}

async fn show(
    State(s): State<Arc<DevicesState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<DeviceView>, ApiError> {
    authorize(&s.tokens, &headers, "viewer")?;
    let d = s
        .registry
        .get(&id)
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no device {id:?}")))?;
    Ok(Json(device_view(d, &s.ingest_root)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Db;
    use axum::body::Body;
    use axum::http::Request;
    use shared::wire::{Birth, ModelVersion, Status};
    use tower::ServiceExt;

    fn birth(id: &str, site: &str) -> Status {
        Status::Online(Birth {
            v: 1,
            device: id.into(),
            agent_version: "0.3.0".into(),
            models: vec![ModelVersion {
                name: "pdm".into(),
                version: "1.0".into(),
                release: Some(3),
                role: "active".into(),
                phase: None,
            }],
            started_at_ms: 1,
            sent_at_ms: 1,
            tags: [("site".to_string(), site.to_string())].into(),
        })
    }

    async fn get(app: &Router, uri: &str, secret: &str) -> (StatusCode, serde_json::Value) {
        let r = app
            .clone()
            .oneshot(
                Request::get(uri)
                    .header("authorization", format!("Bearer {secret}"))
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = r.status();
        let body = axum::body::to_bytes(r.into_body(), 1 << 24).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn lists_and_shows_devices_with_ingest_counters() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::open(Db::temporary().unwrap()).unwrap());
        registry.on_status("d1", &birth("d1", "plant-a"), 100);
        registry.on_status("d2", &birth("d2", "plant-b"), 100);
        registry.on_record(
            "d1",
            RecordClass::Health,
            &serde_json::json!({"kind": "health_sample", "sample": {"cpu": 0.5}}),
            200,
        );
        // an ingest state for d1, written by the real ingest store
        let ingest_root = dir.path().join("ingest");
        {
            use crate::ingest::IngestStore;
            let mut fs = FileStore::open(&ingest_root).unwrap();
            let mut st = fs.state("d1").unwrap();
            st.last_seq = 0;
            st.duplicates = 4;
            st.gaps = 1;
            st.epoch = 77;
            st.dropped.insert(
                RecordClass::Telemetry,
                DropCounts {
                    cap: 2,
                    ttl: 1,
                    io: 0,
                },
            );
            fs.commit("d1", &[], st).unwrap();
        }
        let app = router(Arc::new(DevicesState {
            tokens: vec![Token::from_secret("grafana", "s1", "viewer")],
            registry,
            ingest_root,
        }));
        let (st, v) = get(&app, "/v1/devices", "s1").await;
        assert_eq!(st, StatusCode::OK, "{v}");
        let devices = v["devices"].as_array().unwrap();
        assert_eq!(devices.len(), 2);
        let d1 = &devices[0];
        assert_eq!(d1["id"], "d1");
        assert_eq!(d1["tags"]["site"], "plant-a");
        assert_eq!(d1["agent_version"], "0.3.0");
        assert_eq!(d1["online"], true);
        assert_eq!(d1["online_since_ms"], 100);
        assert_eq!(d1["last_seen_ms"], 200);
        assert_eq!(d1["models"][0]["release"], 3);
        assert!(d1["models"][0]["phase"].is_null());
        assert_eq!(d1["health"]["cpu"], 0.5);
        let ing = &d1["ingest"];
        assert_eq!(ing["duplicates"], 4);
        assert_eq!(ing["gaps"], 1);
        assert_eq!(ing["epoch"], 77);
        assert_eq!(ing["received"]["event"], 0);
        assert_eq!(ing["dropped_reported"]["telemetry"]["cap"], 2);
        assert_eq!(ing["dropped_reported"]["drift"]["ttl"], 0);
        assert!(devices[1]["ingest"].is_null());

        let (_, v) = get(&app, "/v1/devices?selector=site=plant-b&online=true", "s1").await;
        assert_eq!(v["devices"].as_array().unwrap().len(), 1);
        assert_eq!(v["devices"][0]["id"], "d2");
        let (_, v) = get(&app, "/v1/devices?online=false", "s1").await;
        assert_eq!(v["devices"].as_array().unwrap().len(), 0);
        let (st, v) = get(&app, "/v1/devices?selector=site", "s1").await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(v["error"].as_str().unwrap().contains("\"site\""), "{v}");
        let (st, v) = get(&app, "/v1/devices?online=maybe", "s1").await;
        assert_eq!(st, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(v["error"].as_str().unwrap().contains("maybe"), "{v}");

        let (st, v) = get(&app, "/v1/devices/d2", "s1").await;
        assert_eq!(st, StatusCode::OK);
        assert_eq!(v["tags"]["site"], "plant-b");
        let (st, v) = get(&app, "/v1/devices/nope", "s1").await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        assert!(v["error"].as_str().unwrap().contains("\"nope\""), "{v}");
        let (st, _) = get(&app, "/v1/devices", "wrong").await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
    }
}
