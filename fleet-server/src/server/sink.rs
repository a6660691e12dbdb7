//! The fleet's [`DeviceSink`]: hands device messages to the registry, the rollout engine,
//! bundle delivery and alerts, and renders their `/metrics` lines.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::Value;
use shared::wire::{self, RecordClass};

use crate::alerts::Alerts;
use crate::delivery::Delivery;
use crate::directives::now_ms;
use crate::ingest::DeviceSink;
use crate::registry::Registry;
use crate::rollout::Rollouts;

/// The fleet modules that react to device messages.
pub struct FleetSink {
    pub registry: Arc<Registry>,
    pub rollouts: Arc<Rollouts>,
    pub delivery: Arc<Delivery>,
    pub alerts: Arc<Alerts>,
}

impl DeviceSink for FleetSink {
    fn on_status(&self, device: &str, status: &wire::Status) {
        let now = now_ms();
        self.registry.on_status(device, status, now);
        if matches!(status, wire::Status::Online(_)) {
            // every birth (also a reconnect the registry did not see as offline): directives
            // the device has not answered are re-sent
            if let Err(e) = self.rollouts.on_device_online(device, now) {
                tracing::warn!(%device, error = %e, "rollouts: re-sending directives failed");
            }
        }
    }

    fn on_stored(&self, device: &str, records: &[wire::Record]) {
        let now = now_ms();
        self.registry.on_stored(device, records, now);
        for r in records.iter().filter(|r| r.class == RecordClass::Event) {
            let Ok(body) = serde_json::from_str::<Value>(r.body.get()) else {
                continue;
            };
            if body.get("kind").and_then(Value::as_str) != Some("event") {
                continue;
            }
            let name = body.get("event").and_then(Value::as_str).unwrap_or("");
            let model = body.get("model").and_then(Value::as_str).unwrap_or("");
            let detail = body.get("detail").cloned().unwrap_or(Value::Null);
            if let Err(e) = self.rollouts.on_event(device, name, model, &detail, now) {
                tracing::warn!(%device, event = name, error = %e, "rollouts: event not applied");
            }
            self.alerts.on_event(device, name, model, &detail, now);
        }
    }

    fn on_reply(&self, device: &str, reply: &wire::CommandReply) {
        let now = now_ms();
        self.registry.seen(device, now);
        if let Err(e) = self.rollouts.on_reply(device, reply, now) {
            tracing::warn!(%device, id = %reply.id, error = %e, "rollouts: reply not applied");
        }
    }

    fn on_chunk_request(&self, device: &str, payload: &[u8]) {
        self.registry.seen(device, now_ms());
        self.delivery.on_request(device, payload);
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `/metrics` lines of the registry: devices online/offline, versions in use.
pub fn registry_metrics(registry: &Registry) -> String {
    let c = registry.counts();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP fleet_devices Devices known to the registry, by state."
    );
    let _ = writeln!(out, "# TYPE fleet_devices gauge");
    let _ = writeln!(out, "fleet_devices{{state=\"online\"}} {}", c.online);
    let _ = writeln!(out, "fleet_devices{{state=\"offline\"}} {}", c.offline);
    let _ = writeln!(
        out,
        "# HELP fleet_model_versions Devices running each model version (any role)."
    );
    let _ = writeln!(out, "# TYPE fleet_model_versions gauge");
    for ((model, version), n) in &c.versions {
        let _ = writeln!(
            out,
            "fleet_model_versions{{model=\"{}\",version=\"{}\"}} {n}",
            escape(model),
            escape(version)
        );
    }
    for (name, help, v) in [
        (
            "refused",
            "Status messages of new devices refused because the registry is full.",
            c.refused,
        ),
        (
            "mismatched",
            "Status messages naming another device than their topic.",
            c.mismatched,
        ),
        (
            "store_errors",
            "Registry writes to the state database that failed.",
            c.store_errors,
        ),
    ] {
        let _ = writeln!(out, "# HELP fleet_registry_{name}_total {help}");
        let _ = writeln!(out, "# TYPE fleet_registry_{name}_total counter");
        let _ = writeln!(out, "fleet_registry_{name}_total {v}");
    }
    out
}

/// `/metrics` lines of bundle delivery.
pub fn delivery_metrics(delivery: &Delivery) -> String {
    let c = delivery.counters();
    let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    for (name, help, v) in [
        ("requests", "Chunk requests received.", l(&c.requests)),
        ("chunks", "Chunk frames published.", l(&c.chunks)),
        ("bytes", "Bundle bytes published in chunks.", l(&c.bytes)),
        ("errors", "Error frames sent.", l(&c.errors)),
        (
            "publish_failed",
            "Chunk frames that could not be queued for publishing.",
            l(&c.publish_failed),
        ),
        (
            "dropped",
            "Chunk requests dropped because too many were waiting.",
            l(&c.dropped),
        ),
    ] {
        let _ = writeln!(out, "# HELP fleet_delivery_{name}_total {help}");
        let _ = writeln!(out, "# TYPE fleet_delivery_{name}_total counter");
        let _ = writeln!(out, "fleet_delivery_{name}_total {v}");
    }
    out
}
