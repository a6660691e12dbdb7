//! Inference over the plant's local MQTT broker: subscribe to configured input topics
//! (named-feature JSON), publish each prediction to the model's output topic.
//!
//! The event loop owner backs off with jitter on connection errors (rumqttc has no backoff),
//! never blocks inside the loop (inference runs on the scoring pool, publishes use
//! `try_publish` and count drops), and re-subscribes after every reconnect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use crate::config::{Mqtt, MqttRoute};
use crate::runtime::{PredictError, Registry};

/// Largest input message accepted (bytes).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest rows in one message.
pub const MAX_ROWS: usize = 1000;
/// Most messages being scored at once; more are dropped (counted as `dropped`).
pub const MAX_IN_FLIGHT: usize = 64;

/// MQTT path counters (for `/metrics` and tests).
#[derive(Debug, Default)]
pub struct MqttCounters {
    pub received: AtomicU64,
    pub published: AtomicU64,
    pub rejected: AtomicU64,
    /// Messages dropped because too many were in flight, or replies dropped because the
    /// client's queue was full.
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
}

/// Parses `mqtt://host:port` (or `tcp://`).
pub fn parse_url(url: &str) -> Option<(String, u16)> {
    shared::wire::parse_mqtt_url(url)
}

/// Gives predictions their ids and logs them for feedback (see
/// [`crate::feedback::log_predictions`]): (version, rows, outputs) -> ids.
pub type PredictionLog = Arc<
    dyn Fn(&crate::runtime::Loaded, &[Map<String, Value>], &[Map<String, Value>]) -> Vec<String>
        + Send
        + Sync,
>;

/// The reply to one input message: predictions with their ids (for feedback), or an error
/// naming the row and field.
pub fn answer(
    registry: &Registry,
    route: &MqttRoute,
    log: &PredictionLog,
    payload: &[u8],
) -> Value {
    if payload.len() > MAX_MESSAGE_BYTES {
        return json!({"error": format!("message of {} bytes exceeds {MAX_MESSAGE_BYTES}", payload.len())});
    }
    let msg: Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => return json!({"error": format!("not JSON: {e}")}),
    };
    let id = msg.get("id").cloned();
    // {"instances": [...]} or {"features": {...}} or the features object itself
    let rows: Vec<Map<String, Value>> = match (&msg.get("instances"), &msg.get("features")) {
        (Some(Value::Array(a)), _) => {
            let mut rows = Vec::with_capacity(a.len());
            for (i, r) in a.iter().enumerate() {
                match r {
                    Value::Object(o) => rows.push(o.clone()),
                    _ => {
                        return json!({"id": id, "error": format!("instances[{i}] is not an object")})
                    }
                }
            }
            rows
        }
        (_, Some(Value::Object(f))) => vec![f.clone()],
        _ => match &msg {
            Value::Object(o) => {
                let mut o = o.clone();
                o.remove("id");
                vec![o]
            }
            _ => return json!({"error": "expected a JSON object of features"}),
        },
    };
    if rows.is_empty() || rows.len() > MAX_ROWS {
        return json!({"id": id, "error": format!("{} rows; send 1 to {MAX_ROWS}", rows.len())});
    }
    match registry.predict(&route.model, &rows, false) {
        Ok(p) => {
            let ids = log(&p.loaded, &rows, &p.outputs);
            let mut v = json!({
                "model": p.loaded.name,
                "version": p.loaded.version,
                "release": p.loaded.release,
            });
            if rows.len() == 1 && msg.get("instances").is_none() {
                v["prediction"] = Value::Object(p.outputs.into_iter().next().unwrap_or_default());
                v["prediction_id"] = ids.into_iter().next().map_or(Value::Null, Value::String);
            } else {
                v["predictions"] = Value::Array(p.outputs.into_iter().map(Value::Object).collect());
                v["prediction_ids"] = Value::Array(ids.into_iter().map(Value::String).collect());
            }
            if let Some(id) = id {
                v["id"] = id;
            }
            v
        }
        Err(PredictError::Invalid(e)) => {
            json!({"id": id, "error": e.to_string(), "row": e.row, "field": e.field})
        }
        Err(e) => json!({"id": id, "error": e.to_string()}),
    }
}

fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    base + Duration::from_millis(u64::from(nanos % 1000) * base.as_millis().min(1000) as u64 / 2000)
}

/// Handles a feedback message: the response body to publish.
pub type FeedbackHandler = Arc<dyn Fn(&[u8]) -> Value + Send + Sync>;

/// What the MQTT task hands to the feedback loop: ground truth messages, and the predictions
/// it makes (so that they can be labelled).
#[derive(Clone)]
pub struct FeedbackHooks {
    pub receive: FeedbackHandler,
    pub log: PredictionLog,
}

/// Runs the MQTT inference loop until `token` is cancelled.
pub async fn run(
    cfg: Mqtt,
    client_id: String,
    registry: Arc<Registry>,
    pool: Arc<crate::pool::ScoringPool>,
    counters: Arc<MqttCounters>,
    hooks: FeedbackHooks,
    token: CancellationToken,
) {
    let Some((host, port)) = parse_url(&cfg.url) else {
        tracing::error!(url = %cfg.url, "bad mqtt url");
        return;
    };
    let mut opts = MqttOptions::new(client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(15));
    opts.set_max_packet_size(MAX_MESSAGE_BYTES + 1024, MAX_MESSAGE_BYTES + 1024);
    let (client, mut events): (AsyncClient, EventLoop) = AsyncClient::new(opts, 64);
    let routes = Arc::new(cfg.inference.clone());
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut backoff = Duration::from_millis(250);
    loop {
        let ev = tokio::select! {
            _ = token.cancelled() => break,
            ev = events.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(250);
                tracing::info!(url = %cfg.url, "mqtt connected");
                let topics = routes
                    .iter()
                    .map(|r| &r.input_topic)
                    .chain(cfg.feedback_topic.as_ref());
                for t in topics {
                    if client.try_subscribe(t.clone(), QoS::AtLeastOnce).is_err() {
                        tracing::warn!(topic = %t, "subscribe request dropped (queue full)");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p)))
                if cfg.feedback_topic.as_deref() == Some(p.topic.as_str()) =>
            {
                counters.received.fetch_add(1, Ordering::Relaxed);
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let (client, counters, pool, f) = (
                    client.clone(),
                    counters.clone(),
                    pool.clone(),
                    hooks.receive.clone(),
                );
                let topic = format!("{}/results", p.topic);
                tokio::spawn(async move {
                    let payload = p.payload.clone();
                    let reply = pool
                        .run(move || f(&payload))
                        .await
                        .unwrap_or_else(|e| json!({"error": e.to_string()}));
                    if reply.get("error").is_some() {
                        counters.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    match client.try_publish(topic, QoS::AtLeastOnce, false, reply.to_string()) {
                        Ok(()) => counters.published.fetch_add(1, Ordering::Relaxed),
                        Err(_) => counters.dropped.fetch_add(1, Ordering::Relaxed),
                    };
                    drop(permit);
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some(route) = routes.iter().find(|r| r.input_topic == p.topic).cloned() else {
                    continue;
                };
                counters.received.fetch_add(1, Ordering::Relaxed);
                // at most MAX_IN_FLIGHT messages scored at once; beyond, drop and count
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let (reg, client, counters) = (registry.clone(), client.clone(), counters.clone());
                let log = hooks.log.clone();
                let pool = pool.clone();
                // inference off the event loop, on the scoring pool
                tokio::spawn(async move {
                    let payload = p.payload.clone();
                    let r2 = route.clone();
                    let reply = pool
                        .run(move || answer(&reg, &r2, &log, &payload))
                        .await
                        .unwrap_or_else(|e| json!({"error": e.to_string()}));
                    if reply.get("error").is_some() {
                        counters.rejected.fetch_add(1, Ordering::Relaxed);
                    }
                    let topic = if reply.get("error").is_some() {
                        route
                            .error_topic
                            .clone()
                            .unwrap_or_else(|| route.output_topic.clone())
                    } else {
                        route.output_topic.clone()
                    };
                    match client.try_publish(topic, QoS::AtLeastOnce, false, reply.to_string()) {
                        Ok(()) => counters.published.fetch_add(1, Ordering::Relaxed),
                        Err(_) => counters.dropped.fetch_add(1, Ordering::Relaxed),
                    };
                    drop(permit);
                });
            }
            Ok(_) => {}
            Err(e) => {
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, retry_in = ?backoff, "mqtt connection error");
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    let _ = client.try_disconnect();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1883"),
            Some(("127.0.0.1".into(), 1883))
        );
        assert_eq!(parse_url("tcp://broker:1"), Some(("broker".into(), 1)));
        assert_eq!(parse_url("http://x:1"), None);
        assert_eq!(parse_url("mqtt://:1"), None);
        assert_eq!(parse_url("mqtt://x:port"), None);
    }
}
