//! Alert webhooks in Alertmanager's webhook JSON format (version "4"), so an existing
//! receiver (a CI job that retrains, a pager bridge) can act on device drift alerts
//! (`EdgeDriftAlert`, firing on `drift_alert_raised`, resolved on `drift_alert_cleared`) and
//! rollout halts (`RolloutHalted`).
//!
//! Guarantees and limits:
//! - Producers never block: alerts go into a bounded queue ([`QUEUE_CAP`]); when it is full
//!   the oldest alert is dropped and counted ([`AlertCounters::dropped`]).
//! - One sender task ([`Alerts::run`]) posts each alert to every configured webhook, one
//!   message per alert, retrying a failed POST (connection error, timeout, non-2xx status)
//!   with exponential backoff ([`MAX_ATTEMPTS`] attempts), then counts it as failed.
//! - Only `http://` is supported (a small HTTP/1.1 POST over a tokio `TcpStream`, response
//!   status line read with a byte cap); `https://` URLs are refused by [`Alerts::new`],
//!   naming the key. Put a TLS-terminating proxy in front of an https receiver.
//! - A drift alert's fingerprint is derived from its labels, so the resolved message pairs
//!   with the firing one; the firing time is remembered for at most [`MAX_ACTIVE`] alerts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::server::config;

/// Most alerts waiting to be sent.
pub const QUEUE_CAP: usize = 1024;
/// Attempts per alert and webhook.
pub const MAX_ATTEMPTS: u32 = 5;
/// Most firing drift alerts whose start time is remembered.
pub const MAX_ACTIVE: usize = 10_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_RESPONSE_HEAD: usize = 8 * 1024;
/// Alertmanager's "no end time" value.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// A webhook configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alerts.webhooks[{index}].url: {url:?}: {problem}")]
    Url {
        index: usize,
        url: String,
        problem: String,
    },
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AlertCounters {
    /// Alerts queued.
    pub queued: AtomicU64,
    /// Alerts dropped because the queue was full (oldest first).
    pub dropped: AtomicU64,
    /// Webhook POSTs that succeeded.
    pub sent: AtomicU64,
    /// Webhook POSTs given up after every attempt.
    pub failed: AtomicU64,
    /// Attempts that failed and were retried.
    pub retried: AtomicU64,
}

/// A rollout halt, reported by the rollout engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutHalt {
    pub rollout_id: String,
    pub model: String,
    /// `name@version`.
    pub bundle: String,
    pub release: u64,
    pub wave: usize,
    pub reason: String,
    pub at_ms: u64,
}

/// One alert of a webhook message (Alertmanager wire type).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookAlert {
    pub status: &'static str,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    #[serde(rename = "startsAt")]
    pub starts_at: String,
    #[serde(rename = "endsAt")]
    pub ends_at: String,
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
    pub fingerprint: String,
}

/// A webhook message (Alertmanager wire type, version "4").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WebhookMessage {
    pub version: &'static str,
    #[serde(rename = "groupKey")]
    pub group_key: String,
    #[serde(rename = "truncatedAlerts")]
    pub truncated_alerts: u64,
    pub status: &'static str,
    pub receiver: String,
    #[serde(rename = "groupLabels")]
    pub group_labels: BTreeMap<String, String>,
    #[serde(rename = "commonLabels")]
    pub common_labels: BTreeMap<String, String>,
    #[serde(rename = "commonAnnotations")]
    pub common_annotations: BTreeMap<String, String>,
    #[serde(rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<WebhookAlert>,
}

#[derive(Debug, Clone)]
struct Target {
    host: String,
    port: u16,
    path: String,
    receiver: String,
}

/// The alert sender: cheap producers ([`Alerts::on_event`], [`Alerts::rollout_halted`]) and
/// one sender task ([`Alerts::run`]).
pub struct Alerts {
    targets: Vec<Target>,
    external_url: String,
    queue: Mutex<VecDeque<WebhookAlert>>,
    notify: tokio::sync::Notify,
    active: Mutex<HashMap<String, String>>,
    pub counters: AlertCounters,
}

fn parse_url(index: usize, url: &str, name: Option<&str>) -> Result<Target, AlertError> {
    let err = |problem: &str| AlertError::Url {
        index,
        url: url.to_string(),
        problem: problem.to_string(),
    };
    if url.starts_with("https://") {
        return Err(err(
            "https is not supported by this build; use http:// (e.g. through a TLS proxy)",
        ));
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| err("must start with http://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(err("needs a host (and no user info)"));
    }
    let (host, port) = if let Some(h) = authority.strip_prefix('[') {
        let (h, p) = h.split_once(']').ok_or_else(|| err("bad IPv6 host"))?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| err("bad port"))?,
        None => 80,
    };
    if host.is_empty() || path.chars().any(|c| c.is_control() || c == ' ') {
        return Err(err("bad host or path"));
    }
    Ok(Target {
        host,
        port,
        path: path.to_string(),
        receiver: name.unwrap_or("fleet-server").to_string(),
    })
}

/// RFC 3339 UTC with milliseconds.
fn rfc3339_ms(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ZERO_TIME.to_string())
}

fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in labels {
        h.update(k.as_bytes());
        h.update([0xff]);
        h.update(v.as_bytes());
        h.update([0xff]);
    }
    shared::trust::hex(&h.finalize()[..8])
}

fn value_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Alerts {
    /// Checks every webhook URL (naming the bad one); does not connect.
    pub fn new(cfg: &config::Alerts) -> Result<Alerts, AlertError> {
        let targets = cfg
            .webhooks
            .iter()
            .enumerate()
            .map(|(i, w)| parse_url(i, &w.url, w.name.as_deref()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Alerts {
            targets,
            external_url: cfg
                .external_url
                .clone()
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_string(),
            queue: Mutex::new(VecDeque::new()),
            notify: tokio::sync::Notify::new(),
            active: Mutex::new(HashMap::new()),
            counters: AlertCounters::default(),
        })
    }

    /// `fleet_alerts_*` counters and the queue gauge (Prometheus text) for `/metrics`.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let c = &self.counters;
        let mut out = String::new();
        for (name, help, v) in [
            ("queued", "Alerts queued for the webhooks.", &c.queued),
            (
                "dropped",
                "Alerts dropped because the queue was full.",
                &c.dropped,
            ),
            ("sent", "Webhook POSTs that succeeded.", &c.sent),
            (
                "failed",
                "Webhook POSTs given up after every attempt.",
                &c.failed,
            ),
            (
                "retried",
                "Webhook POST attempts that failed and were retried.",
                &c.retried,
            ),
        ] {
            let _ = writeln!(out, "# HELP fleet_alerts_{name}_total {help}");
            let _ = writeln!(out, "# TYPE fleet_alerts_{name}_total counter");
            let _ = writeln!(
                out,
                "fleet_alerts_{name}_total {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP fleet_alerts_queue Alerts waiting to be sent.");
        let _ = writeln!(out, "# TYPE fleet_alerts_queue gauge");
        let _ = writeln!(out, "fleet_alerts_queue {}", self.queued());
        out
    }

    /// Alerts waiting to be sent.
    pub fn queued(&self) -> usize {
        self.queue.lock().map_or(0, |q| q.len())
    }

    fn push(&self, alert: WebhookAlert) {
        if self.targets.is_empty() {
            return;
        }
        if let Ok(mut q) = self.queue.lock() {
            if q.len() >= QUEUE_CAP {
                q.pop_front();
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            q.push_back(alert);
            self.counters.queued.fetch_add(1, Ordering::Relaxed);
        }
        self.notify.notify_one();
    }

    /// A device event; `drift_alert_raised` fires and `drift_alert_cleared` resolves an
    /// `EdgeDriftAlert`, other events are ignored. `now_ms` is the fleet's clock.
    pub fn on_event(&self, device: &str, name: &str, model: &str, detail: &Value, now_ms: u64) {
        let firing = match name {
            "drift_alert_raised" => true,
            "drift_alert_cleared" => false,
            _ => return,
        };
        let mut labels = BTreeMap::new();
        labels.insert("alertname".to_string(), "EdgeDriftAlert".to_string());
        labels.insert("severity".to_string(), "warning".to_string());
        labels.insert("device".to_string(), device.to_string());
        labels.insert("model".to_string(), model.to_string());
        let feature = detail
            .get("feature")
            .and_then(value_text)
            .unwrap_or_else(|| {
                if detail.get("prediction").and_then(Value::as_bool) == Some(true) {
                    "prediction".into()
                } else {
                    String::new()
                }
            });
        if !feature.is_empty() {
            labels.insert("feature".to_string(), feature.clone());
        }
        if let Some(m) = detail.get("metric").and_then(value_text) {
            labels.insert("metric".to_string(), m);
        }
        let fp = fingerprint(&labels);
        let now = rfc3339_ms(now_ms);
        let starts_at = match self.active.lock() {
            Ok(mut a) if firing => {
                if a.len() >= MAX_ACTIVE && !a.contains_key(&fp) {
                    a.clear();
                }
                a.entry(fp.clone()).or_insert_with(|| now.clone()).clone()
            }
            Ok(mut a) => a.remove(&fp).unwrap_or_else(|| now.clone()),
            Err(_) => now.clone(),
        };
        let what = if feature.is_empty() {
            String::new()
        } else {
            format!(" on feature {feature}")
        };
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "summary".to_string(),
            format!(
                "Drift{what} of model {model} on device {device} {}",
                if firing { "raised" } else { "cleared" }
            ),
        );
        annotations.insert("description".to_string(), detail.to_string());
        self.push(WebhookAlert {
            status: if firing { "firing" } else { "resolved" },
            labels,
            annotations,
            starts_at,
            ends_at: if firing { ZERO_TIME.to_string() } else { now },
            generator_url: format!("{}/v1/devices/{device}", self.external_url),
            fingerprint: fp,
        });
    }

    /// A rollout halted (called by the rollout engine).
    pub fn rollout_halted(&self, h: RolloutHalt) {
        let mut labels = BTreeMap::new();
        labels.insert("alertname".to_string(), "RolloutHalted".to_string());
        labels.insert("severity".to_string(), "critical".to_string());
        labels.insert("rollout".to_string(), h.rollout_id.clone());
        labels.insert("model".to_string(), h.model.clone());
        labels.insert("bundle".to_string(), h.bundle.clone());
        labels.insert("release".to_string(), h.release.to_string());
        let mut annotations = BTreeMap::new();
        annotations.insert(
            "summary".to_string(),
            format!(
                "Rollout {} of {} halted in wave {}",
                h.rollout_id, h.bundle, h.wave
            ),
        );
        annotations.insert("description".to_string(), h.reason.clone());
        self.push(WebhookAlert {
            status: "firing",
            fingerprint: fingerprint(&labels),
            labels,
            annotations,
            starts_at: rfc3339_ms(h.at_ms),
            ends_at: ZERO_TIME.to_string(),
            generator_url: format!("{}/v1/rollouts/{}", self.external_url, h.rollout_id),
        });
    }

    fn message(&self, t: &Target, alert: &WebhookAlert) -> WebhookMessage {
        let mut group_labels = BTreeMap::new();
        if let Some(n) = alert.labels.get("alertname") {
            group_labels.insert("alertname".to_string(), n.clone());
        }
        let key_labels: Vec<String> = alert
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect();
        WebhookMessage {
            version: "4",
            group_key: format!("{{}}:{{{}}}", key_labels.join(",")),
            truncated_alerts: 0,
            status: alert.status,
            receiver: t.receiver.clone(),
            group_labels,
            common_labels: alert.labels.clone(),
            common_annotations: alert.annotations.clone(),
            external_url: self.external_url.clone(),
            alerts: vec![alert.clone()],
        }
    }

    /// The sender task: posts queued alerts until `shutdown` (spawn it once).
    pub async fn run(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.queue.lock().ok().and_then(|mut q| q.pop_front());
            let Some(alert) = next else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.notify.notified() => continue,
                }
            };
            for t in &self.targets {
                let body = serde_json::to_vec(&self.message(t, &alert)).unwrap_or_default();
                let mut backoff = FIRST_BACKOFF;
                let mut attempt = 1;
                loop {
                    let r = tokio::time::timeout(REQUEST_TIMEOUT, post(t, &body)).await;
                    match r {
                        Ok(Ok(())) => {
                            self.counters.sent.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(host = %t.host, port = t.port, error = %e, attempt, "alert webhook failed")
                        }
                        Err(_) => {
                            tracing::debug!(host = %t.host, port = t.port, attempt, "alert webhook timed out")
                        }
                    }
                    if attempt >= MAX_ATTEMPTS {
                        tracing::warn!(host = %t.host, port = t.port, path = %t.path,
                            alert = %alert.labels.get("alertname").map_or("", String::as_str),
                            "alert webhook given up after {MAX_ATTEMPTS} attempts");
                        self.counters.failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

/// One HTTP/1.1 POST; `Ok` on a 2xx status.
async fn post(t: &Target, body: &[u8]) -> std::io::Result<()> {
    let other = |m: String| std::io::Error::other(m);
    let mut s = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((t.host.as_str(), t.port)),
    )
    .await
    .map_err(|_| other("connect timed out".into()))??;
    let host = if t.host.contains(':') {
        format!("[{}]:{}", t.host, t.port)
    } else {
        format!("{}:{}", t.host, t.port)
    };
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fleet-server\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        t.path,
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    while !buf.windows(2).any(|w| w == b"\r\n") {
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(other("response status line too long".into()));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(other("connection closed before a response".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| other("not an HTTP response".into()))?;
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(other(format!("HTTP status {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::AsyncBufReadExt;

    fn cfg(url: &str) -> config::Alerts {
        config::Alerts {
            webhooks: vec![config::Webhook {
                url: url.into(),
                name: Some("retrain-ci".into()),
            }],
            external_url: Some("http://fleet.example:8080/".into()),
        }
    }

    /// Accepts connections; answers each with the next status of `statuses` (then 200) and
    /// forwards the request body.
    async fn receiver(
        statuses: Vec<u16>,
    ) -> (String, tokio::sync::mpsc::Receiver<(String, Value)>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/alerts", l.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut statuses = statuses.into_iter();
            loop {
                let (s, _) = l.accept().await.unwrap();
                let mut r = tokio::io::BufReader::new(s);
                let mut first = String::new();
                r.read_line(&mut first).await.unwrap();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).await.unwrap();
                    if h == "\r\n" {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).await.unwrap();
                let code = statuses.next().unwrap_or(200);
                r.get_mut()
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                tx.send((first, serde_json::from_slice(&body).unwrap()))
                    .await
                    .unwrap();
            }
        });
        (url, rx)
    }

    #[tokio::test]
    async fn drift_alert_is_posted_in_alertmanager_format_and_resolves() {
        let (url, mut rx) = receiver(vec![]).await;
        let a = Arc::new(Alerts::new(&cfg(&url)).unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(a.clone().run(stop.clone()));
        let detail = serde_json::json!({"release": 3, "feature": "temp", "metric": "psi", "value": 0.4, "threshold": 0.2});
        a.on_event(
            "dev-1",
            "drift_alert_raised",
            "pdm",
            &detail,
            1_700_000_000_000,
        );
        a.on_event("dev-1", "telemetry", "pdm", &detail, 1_700_000_000_000);
        let (line, m) = rx.recv().await.unwrap();
        assert_eq!(line, "POST /hooks/alerts HTTP/1.1\r\n");
        assert_eq!(m["version"], "4");
        assert_eq!(m["status"], "firing");
        assert_eq!(m["receiver"], "retrain-ci");
        assert_eq!(m["externalURL"], "http://fleet.example:8080");
        assert_eq!(m["groupLabels"]["alertname"], "EdgeDriftAlert");
        assert_eq!(m["commonLabels"]["device"], "dev-1");
        assert!(m["groupKey"].as_str().unwrap().contains("device=\"dev-1\""));
        let al = &m["alerts"][0];
        assert_eq!(al["status"], "firing");
        assert_eq!(al["labels"]["alertname"], "EdgeDriftAlert");
        assert_eq!(al["labels"]["model"], "pdm");
        assert_eq!(al["labels"]["feature"], "temp");
        assert_eq!(al["startsAt"], "2023-11-14T22:13:20Z");
        assert_eq!(al["endsAt"], ZERO_TIME);
        assert_eq!(
            al["generatorURL"],
            "http://fleet.example:8080/v1/devices/dev-1"
        );
        assert!(al["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("temp"));
        let fp = al["fingerprint"].as_str().unwrap().to_string();
        assert_eq!(fp.len(), 16);

        a.on_event(
            "dev-1",
            "drift_alert_cleared",
            "pdm",
            &detail,
            1_700_000_060_500,
        );
        let (_, m) = rx.recv().await.unwrap();
        let al = &m["alerts"][0];
        assert_eq!(m["status"], "resolved");
        assert_eq!(al["fingerprint"], fp.as_str());
        assert_eq!(al["startsAt"], "2023-11-14T22:13:20Z");
        assert_eq!(al["endsAt"], "2023-11-14T22:14:20.5Z");
        for _ in 0..100 {
            if a.counters.sent.load(Ordering::Relaxed) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.counters.sent.load(Ordering::Relaxed), 2);
        assert_eq!(a.counters.failed.load(Ordering::Relaxed), 0);
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn halt_alert_is_retried_after_a_server_error() {
        let (url, mut rx) = receiver(vec![503]).await;
        let a = Arc::new(Alerts::new(&cfg(&url)).unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(a.clone().run(stop.clone()));
        a.rollout_halted(RolloutHalt {
            rollout_id: "r-1".into(),
            model: "pdm".into(),
            bundle: "pdm@1.2".into(),
            release: 7,
            wave: 0,
            reason: "wave 0: 1 of 1 devices failed".into(),
            at_ms: 0,
        });
        let (_, first) = rx.recv().await.unwrap();
        let (_, second) = rx.recv().await.unwrap();
        assert_eq!(first, second);
        assert_eq!(second["alerts"][0]["labels"]["alertname"], "RolloutHalted");
        assert_eq!(second["alerts"][0]["labels"]["rollout"], "r-1");
        assert_eq!(
            second["alerts"][0]["annotations"]["description"],
            "wave 0: 1 of 1 devices failed"
        );
        for _ in 0..100 {
            if a.counters.sent.load(Ordering::Relaxed) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(a.counters.retried.load(Ordering::Relaxed), 1);
        assert_eq!(a.counters.sent.load(Ordering::Relaxed), 1);
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn queue_is_bounded_and_urls_are_checked() {
        let a = Alerts::new(&cfg("http://127.0.0.1:9/x")).unwrap();
        for i in 0..QUEUE_CAP + 5 {
            a.on_event(&format!("d{i}"), "drift_alert_raised", "m", &Value::Null, 0);
        }
        assert_eq!(a.queued(), QUEUE_CAP);
        let m = a.render_metrics();
        assert!(m.contains("\nfleet_alerts_dropped_total 5\n"), "{m}");
        assert!(
            m.ends_with(&format!("fleet_alerts_queue {QUEUE_CAP}\n")),
            "{m}"
        );
        assert_eq!(a.counters.dropped.load(Ordering::Relaxed), 5);
        assert_eq!(
            a.queue.lock().unwrap().front().unwrap().labels["device"],
            "d5"
        );
        let e = Alerts::new(&cfg("https://x/y")).err().unwrap().to_string();
        assert!(
            e.contains("alerts.webhooks[0].url") && e.contains("https"),
            "{e}"
        );
        assert!(Alerts::new(&cfg("ftp://x")).is_err());
        assert!(Alerts::new(&cfg("http://host:99999/")).is_err());
        let t = parse_url(0, "http://[::1]:8080", None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("::1", 8080, "/")
        );
        // with no webhook nothing is queued
        let none = Alerts::new(&config::Alerts::default()).unwrap();
        none.on_event("d", "drift_alert_raised", "m", &Value::Null, 0);
        assert_eq!(none.queued(), 0);
    }
}
