//! Agent configuration: the TOML file, its defaults, command-line overrides, and validation
//! that reports every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use shared::config::read_config_file;
pub use shared::config::ConfigError;

/// The whole configuration (wire type of `edge-agent.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This device's id (default: the host name).
    pub device_id: Option<String>,
    /// Where models, staging, the inbox and events live.
    pub state_dir: PathBuf,
    /// The root public key bundles are verified against (from `fleetctl keygen`).
    pub trust_root: PathBuf,
    /// Optional root-signed keyring of signing keys.
    pub keyring: Option<PathBuf>,
    /// This device's description for the fleet (tags in the birth message).
    pub device: Device,
    pub http: Http,
    pub mqtt: Option<Mqtt>,
    pub install: Install,
    pub health: Health,
    pub inputs: Inputs,
    /// The durable outbox of records for the fleet (`<state_dir>/outbox`).
    pub outbox: crate::outbox::OutboxConfig,
    /// Sync of the outbox to the fleet's MQTT broker; absent: records stay in the outbox
    /// (bounded by its cap) until a `[sync]` section is configured.
    pub sync: Option<crate::sync::SyncConfig>,
    pub telemetry: Telemetry,
    pub drift: Drift,
    pub feedback: crate::feedback::FeedbackConfig,
}

/// `[device]`: what the fleet knows this device by besides its id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Device {
    /// Tags in the birth message (`site`, `line`, `hardware`, ...): rollouts target devices
    /// by them. Keys and values: 1 to 64 bytes of `A-Z a-z 0-9 . _ -`; at most 32 tags.
    pub tags: std::collections::BTreeMap<String, String>,
}

/// Most tags a device carries.
pub const MAX_TAGS: usize = 32;

impl Device {
    /// Every problem of the tags, naming the key.
    pub fn problems(&self) -> Vec<String> {
        let ok = |s: &str| {
            (1..=64).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        let mut p = Vec::new();
        if self.tags.len() > MAX_TAGS {
            p.push(format!(
                "device.tags: {} tags, at most {MAX_TAGS}",
                self.tags.len()
            ));
        }
        for (k, v) in &self.tags {
            if !ok(k) {
                p.push(format!(
                    "device.tags: key {k:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ -"
                ));
            }
            if !ok(v) {
                p.push(format!(
                    "device.tags.{k}: value {v:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ -"
                ));
            }
        }
        p
    }
}

/// How often the agent produces records for the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Telemetry {
    /// Telemetry window, drift summary and feedback summary period (seconds).
    pub window_secs: u64,
    /// System health sample period (seconds).
    pub health_secs: u64,
}

impl Default for Telemetry {
    fn default() -> Telemetry {
        Telemetry {
            window_secs: 60,
            health_secs: 10,
        }
    }
}

/// Drift summaries: alerting and optional differential privacy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drift {
    pub alert: shared::drift::AlertConfig,
    /// Laplace noise on histogram counts and small-bin suppression; absent: exact counts.
    pub privacy: Option<shared::drift::PrivacyConfig>,
}

/// How request rows are checked beyond the model's types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Inputs {
    /// `off`, or `reject`: refuse numeric feature values outside the bundle's observed
    /// range widened by `range_margin` of the range on each side.
    pub range_policy: String,
    pub range_margin: f64,
}

impl Default for Inputs {
    fn default() -> Inputs {
        Inputs {
            range_policy: "off".into(),
            range_margin: 0.1,
        }
    }
}

impl Inputs {
    /// The margin when the policy rejects out-of-range values.
    pub fn margin(&self) -> Option<f64> {
        (self.range_policy == "reject").then_some(self.range_margin)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Listen address; loopback by default.
    pub listen: String,
    /// Largest request body (bytes).
    pub max_body_bytes: u64,
    /// Bearer tokens accepted by the HTTP API; empty: no authentication (loopback use).
    pub tokens: Vec<Token>,
    /// Threads that run inference for HTTP and MQTT requests (0: one per core).
    pub scoring_threads: usize,
}

/// Scopes a bearer token can carry (what each opens: `crate::http`'s route table).
/// - `predict`: the model routes (`/v2/models/...`, `/v1/models/...`).
/// - `feedback`: `POST /v1/feedback`.
/// - `admin`: no route of its own today beyond what every scope reads (`/v2`, `/metrics`).
/// - `metrics`: `GET /metrics` and nothing else, the credential a Prometheus server scrapes
///   with. `predict`, `feedback` and `admin` tokens keep reading `/metrics` as before this
///   scope existed, so configs that scrape with a `predict` token keep working.
pub const TOKEN_SCOPES: [&str; 4] = ["predict", "feedback", "admin", "metrics"];

/// One bearer token of the HTTP API, stored as the SHA-256 of the token (never the token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// Who holds it (for logs).
    pub name: String,
    /// Lowercase hex SHA-256 of the token (`printf %s TOKEN | sha256sum`).
    pub sha256: String,
    /// What it may do: `predict`, `feedback`, `admin`, `metrics` ([`TOKEN_SCOPES`]; a token
    /// with only `metrics` reads `GET /metrics` and nothing else).
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// `mqtt://host:port` of the plant's broker.
    pub url: String,
    /// MQTT client id (default `edge-agent-<device_id>`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Inference over MQTT: named-feature JSON in, predictions out.
    #[serde(default)]
    pub inference: Vec<MqttRoute>,
    /// Ground truth for earlier predictions (the `POST /v1/feedback` body); the outcome is
    /// published on `<feedback_topic>/results`.
    #[serde(default)]
    pub feedback_topic: Option<String>,
}

/// One model served over MQTT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttRoute {
    pub model: String,
    pub input_topic: String,
    pub output_topic: String,
    /// Where refused messages are answered (default: the output topic).
    #[serde(default)]
    pub error_topic: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Install {
    /// Largest bundle accepted (bytes of listed files).
    pub max_bundle_bytes: u64,
    /// Single-row runs measured for the on-device latency profile.
    pub latency_runs: u32,
    /// Largest bundle a fleet install directive may ask to download (bytes); a directive
    /// over it, or over half the free disk of the state directory, is refused.
    pub max_download_bytes: u64,
    /// A download without a new chunk for this long asks again for the missing chunks.
    pub download_timeout_secs: u64,
    /// Silent timeouts in a row before a download is given up (`download_failed`).
    pub download_retries: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// Health window after an activation (seconds)...
    pub window_secs: u64,
    /// ...extended until at least this many predictions were seen.
    pub min_predictions: u64,
    /// Largest share of failed requests.
    pub max_error_rate: f64,
    /// Largest share of predictions with a NaN or infinite output.
    pub max_nan_rate: f64,
    /// Largest p99 latency relative to the previous version on this device (the scoring
    /// thread's CPU time per row, compared live against live, or side by side at
    /// activation when the previous version served fewer than 100 requests).
    pub max_p99_ratio: f64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            device_id: None,
            state_dir: PathBuf::from("/var/lib/edge-agent"),
            trust_root: PathBuf::from("/etc/edge-agent/root.pub"),
            keyring: None,
            device: Device::default(),
            http: Http::default(),
            mqtt: None,
            install: Install::default(),
            health: Health::default(),
            inputs: Inputs::default(),
            outbox: crate::outbox::OutboxConfig::default(),
            sync: None,
            telemetry: Telemetry::default(),
            drift: Drift::default(),
            feedback: crate::feedback::FeedbackConfig::default(),
        }
    }
}

impl Default for Http {
    fn default() -> Http {
        Http {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
            tokens: Vec::new(),
            scoring_threads: 0,
        }
    }
}

impl Default for Install {
    fn default() -> Install {
        Install {
            max_bundle_bytes: 512 * 1024 * 1024,
            latency_runs: 200,
            max_download_bytes: 512 * 1024 * 1024,
            download_timeout_secs: 10,
            download_retries: 6,
        }
    }
}

impl Default for Health {
    fn default() -> Health {
        Health {
            window_secs: 600,
            min_predictions: 200,
            max_error_rate: 0.05,
            max_nan_rate: 0.01,
            max_p99_ratio: 3.0,
        }
    }
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub trust_root: Option<PathBuf>,
    pub device_id: Option<String>,
    pub mqtt_url: Option<String>,
}

impl Config {
    /// The commented default configuration (`edge-agent print-default-config`).
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&Config::default()).unwrap_or_default();
        format!(
            "# edge-agent configuration. Every key is optional; these are the defaults.\n\
             # device_id = \"line3-box1\"          # default: the host name\n\
             # keyring = \"/etc/edge-agent/keyring.json\"\n\
             # [mqtt]\n\
             # url = \"mqtt://127.0.0.1:1883\"     # no [mqtt] section: local mode\n\
             # [[http.tokens]]                     # no tokens: the HTTP API needs none\n\
             # name = \"line3-scada\"\n\
             # sha256 = \"<hex SHA-256 of the token>\"\n\
             # scopes = [\"predict\"]             # predict, feedback, admin, metrics\n\
             #                                  # (metrics: GET /metrics only, for Prometheus;\n\
             #                                  # every other scope also reads /metrics)\n\n{body}"
        )
    }

    /// Reads and parses `path` (not yet validated).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_config_file(path)?;
        toml::from_str(&text).map_err(|e| {
            ConfigError::one(format!("{}: {}", path.display(), e.to_string().trim_end()))
        })
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.state_dir {
            self.state_dir = v.clone();
        }
        if let Some(v) = &o.http_listen {
            self.http.listen = v.clone();
        }
        if let Some(v) = &o.trust_root {
            self.trust_root = v.clone();
        }
        if let Some(v) = &o.device_id {
            self.device_id = Some(v.clone());
        }
        if let Some(v) = &o.mqtt_url {
            match &mut self.mqtt {
                Some(m) => m.url = v.clone(),
                None => {
                    self.mqtt = Some(Mqtt {
                        url: v.clone(),
                        client_id: None,
                        inference: Vec::new(),
                        feedback_topic: None,
                    })
                }
            }
        }
    }

    /// Checks everything that can be checked without starting: every problem is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if let Some(id) = &self.device_id {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
            {
                p.push(format!(
                    "device_id {id:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ -"
                ));
            }
        }
        if self.state_dir.as_os_str().is_empty() {
            p.push("state_dir is empty".into());
        }
        if let Err(e) = shared::trust::PublicKey::load(&self.trust_root) {
            p.push(format!("trust_root: {e}"));
        }
        if let Some(k) = &self.keyring {
            if let Err(e) = shared::trust::KeyringFile::load(k).and_then(|f| f.body()) {
                p.push(format!("keyring: {e}"));
            }
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            p.push(format!(
                "http.listen {:?} is not an address:port (e.g. 127.0.0.1:8080)",
                self.http.listen
            ));
        }
        if self.http.max_body_bytes == 0 || self.http.max_body_bytes > 64 * 1024 * 1024 {
            p.push("http.max_body_bytes must be 1 to 67108864".into());
        }
        let mut token_names = std::collections::BTreeSet::new();
        for (i, t) in self.http.tokens.iter().enumerate() {
            let at = format!("http.tokens[{i}]");
            if t.name.is_empty() || !token_names.insert(t.name.as_str()) {
                p.push(format!("{at}: name {:?} is empty or used twice", t.name));
            }
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                p.push(format!(
                    "{at}: sha256 must be the 64 hex digits of the token's SHA-256"
                ));
            }
            if t.scopes.is_empty() {
                p.push(format!("{at}: no scopes (use {})", TOKEN_SCOPES.join(", ")));
            }
            for s in &t.scopes {
                if !TOKEN_SCOPES.contains(&s.as_str()) {
                    p.push(format!(
                        "{at}: unknown scope {s:?} (use {})",
                        TOKEN_SCOPES.join(", ")
                    ));
                }
            }
        }
        if let Some(m) = &self.mqtt {
            let rest = m
                .url
                .strip_prefix("mqtt://")
                .or_else(|| m.url.strip_prefix("tcp://"));
            match rest {
                Some(hp)
                    if hp
                        .rsplit_once(':')
                        .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok()) => {}
                _ => p.push(format!("mqtt.url {:?}: expected mqtt://host:port", m.url)),
            }
            if let Some(t) = &m.feedback_topic {
                if t.is_empty() || t.contains(['+', '#']) {
                    p.push(format!(
                        "mqtt.feedback_topic {t:?}: a topic without wildcards"
                    ));
                }
            }
            for (i, r) in m.inference.iter().enumerate() {
                for (what, t) in [
                    ("input_topic", &r.input_topic),
                    ("output_topic", &r.output_topic),
                ] {
                    if t.is_empty() || t.contains(['+', '#']) {
                        p.push(format!(
                            "mqtt.inference[{i}].{what} {t:?}: a topic without wildcards"
                        ));
                    }
                }
                if r.model.is_empty() {
                    p.push(format!("mqtt.inference[{i}].model is empty"));
                }
            }
        }
        if !matches!(self.inputs.range_policy.as_str(), "off" | "reject") {
            p.push(format!(
                "inputs.range_policy {:?}: use \"off\" or \"reject\"",
                self.inputs.range_policy
            ));
        }
        if !(self.inputs.range_margin.is_finite() && self.inputs.range_margin >= 0.0) {
            p.push("inputs.range_margin must be a non-negative number".into());
        }
        if self.install.max_bundle_bytes == 0 {
            p.push("install.max_bundle_bytes must be positive".into());
        }
        if self.install.latency_runs == 0 || self.install.latency_runs > 100_000 {
            p.push("install.latency_runs must be 1 to 100000".into());
        }
        if self.install.max_download_bytes == 0 {
            p.push("install.max_download_bytes must be positive".into());
        }
        if !(1..=3600).contains(&self.install.download_timeout_secs) {
            p.push(format!(
                "install.download_timeout_secs = {}: must be 1 to 3600",
                self.install.download_timeout_secs
            ));
        }
        if !(1..=1000).contains(&self.install.download_retries) {
            p.push(format!(
                "install.download_retries = {}: must be 1 to 1000",
                self.install.download_retries
            ));
        }
        p.extend(self.device.problems());
        let h = &self.health;
        for (name, v, lo, hi) in [
            ("health.max_error_rate", h.max_error_rate, 0.0, 1.0),
            ("health.max_nan_rate", h.max_nan_rate, 0.0, 1.0),
            ("health.max_p99_ratio", h.max_p99_ratio, 1.0, 1000.0),
        ] {
            if !(v.is_finite() && v >= lo && v <= hi) {
                p.push(format!("{name} = {v}: must be between {lo} and {hi}"));
            }
        }
        p.extend(self.outbox.problems());
        if let Some(s) = &self.sync {
            p.extend(s.problems().iter().map(ToString::to_string));
        }
        for (name, v) in [
            ("telemetry.window_secs", self.telemetry.window_secs),
            ("telemetry.health_secs", self.telemetry.health_secs),
        ] {
            if !(1..=86_400).contains(&v) {
                p.push(format!("{name} = {v}: must be 1 to 86400"));
            }
        }
        if let Err(e) = self.drift.alert.validate() {
            p.push(e.to_string());
        }
        if let Some(dp) = &self.drift.privacy {
            if let Some(eps) = dp.epsilon {
                if !(eps.is_finite() && eps > 0.0) {
                    p.push(format!(
                        "drift.privacy.epsilon = {eps}: must be a positive number"
                    ));
                }
            }
        }
        if let Err(e) = self.feedback.validate() {
            p.push(e.to_string());
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }

    /// The device id, or the host name, or `edge-agent`.
    pub fn device_id(&self) -> String {
        self.device_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "edge-agent".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deploy_example_parses_and_only_lacks_its_key_files() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/edge-agent.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.telemetry.window_secs, 60);
        assert_eq!(c.outbox.max_bytes, 256 * 1024 * 1024);
        let problems = c.validate().unwrap_err().problems;
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].starts_with("trust_root"), "{problems:?}");
    }

    #[test]
    fn telemetry_sections_are_validated() {
        let mut c: Config = toml::from_str(
            "[telemetry]\nwindow_secs = 0\n[drift.alert]\nwindows = 0\n[outbox]\nmax_bytes = 10\n[feedback]\nwindow = 0\n[sync]\nurls = [\"http://x\"]\n",
        )
        .unwrap();
        c.trust_root = PathBuf::new();
        let p = c.validate().unwrap_err().problems.join("\n");
        for want in [
            "telemetry.window_secs = 0",
            "drift alert windows",
            "outbox.max_bytes = 10",
            "feedback.window = 0",
            "sync.urls",
        ] {
            assert!(p.contains(want), "{want:?} not in:\n{p}");
        }
        assert!(toml::from_str::<Config>("[telemetry]\nwindow = 1\n").is_err());
    }

    #[test]
    fn default_config_round_trips_and_reports_every_problem() {
        let text = Config::default_toml();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, Config::default());
        let bad: Config = toml::from_str(
            "device_id = \"a b\"\n[http]\nlisten = \"nowhere\"\n[health]\nmax_nan_rate = 2.0\n[mqtt]\nurl = \"http://x\"\n",
        )
        .unwrap();
        let err = bad.validate().unwrap_err();
        let all = err.problems.join("\n");
        for want in [
            "device_id",
            "trust_root",
            "http.listen",
            "max_nan_rate",
            "mqtt.url",
        ] {
            assert!(all.contains(want), "{want} in {all}");
        }
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
    }

    #[test]
    fn device_tags_are_read_and_every_bad_one_is_named() {
        let c: Config = toml::from_str(
            "[device]\ntags = { site = \"plant-a\", line = \"3\", hardware = \"ipc-x86\" }\n",
        )
        .unwrap();
        assert_eq!(c.device.tags["site"], "plant-a");
        assert_eq!(c.device.tags.len(), 3);
        assert!(c.device.problems().is_empty());
        let long = "x".repeat(65);
        let c: Config = toml::from_str(&format!(
            "[device.tags]\n\"bad key\" = \"a\"\nsite = \"plant a\"\nline = \"\"\nok = \"{long}\"\n[install]\ndownload_timeout_secs = 0\n"
        ))
        .unwrap();
        let all = c.validate().unwrap_err().problems.join("\n");
        for want in [
            "device.tags: key \"bad key\"",
            "device.tags.site: value \"plant a\"",
            "device.tags.line: value \"\"",
            "device.tags.ok: value",
            "install.download_timeout_secs = 0",
        ] {
            assert!(all.contains(want), "{want} in {all}");
        }
        let many: std::collections::BTreeMap<String, String> = (0..33)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        let d = Device { tags: many };
        assert!(d.problems()[0].contains("33 tags, at most 32"));
        assert_eq!(Install::default().max_download_bytes, 512 * 1024 * 1024);
        assert!(toml::from_str::<Config>("[device]\nsite = \"a\"\n").is_err());
    }

    #[test]
    fn tokens_are_validated() {
        let good = format!("{:064x}", 7);
        let text = format!(
            "[[http.tokens]]\nname = \"scada\"\nsha256 = \"{good}\"\nscopes = [\"predict\"]\n\
             [[http.tokens]]\nname = \"scada\"\nsha256 = \"abc\"\nscopes = [\"root\"]\n"
        );
        let c: Config = toml::from_str(&text).unwrap();
        assert_eq!(c.http.tokens[0].scopes, ["predict"]);
        let all = c.validate().unwrap_err().problems.join("\n");
        for want in [
            "http.tokens[1]: name \"scada\" is empty or used twice",
            "http.tokens[1]: sha256 must be",
            "http.tokens[1]: unknown scope \"root\"",
        ] {
            assert!(all.contains(want), "{want} in {all}");
        }
        assert!(!all.contains("http.tokens[0]"), "{all}");
        // the refusal lists every valid scope, metrics among them
        assert!(
            all.contains("unknown scope \"root\" (use predict, feedback, admin, metrics)"),
            "{all}"
        );
        assert!(
            toml::from_str::<Config>("[[http.tokens]]\nname = \"x\"\ntoken = \"t\"\n").is_err()
        );
    }

    #[test]
    fn metrics_scope_is_valid_alone_and_with_others() {
        let good = format!("{:064x}", 7);
        let other = format!("{:064x}", 8);
        let c: Config = toml::from_str(&format!(
            "[[http.tokens]]\nname = \"prometheus\"\nsha256 = \"{good}\"\nscopes = [\"metrics\"]\n\
             [[http.tokens]]\nname = \"scada\"\nsha256 = \"{other}\"\nscopes = [\"predict\", \"metrics\"]\n"
        ))
        .unwrap();
        // (the default trust_root is not on this machine: only that problem is left)
        let problems = c.validate().err().map(|e| e.problems).unwrap_or_default();
        assert!(
            problems.iter().all(|p| p.starts_with("trust_root")),
            "{problems:?}"
        );
        assert_eq!(c.http.tokens[0].scopes, ["metrics"]);
        // a near miss is refused, naming the scopes there are
        let bad: Config = toml::from_str(&format!(
            "[[http.tokens]]\nname = \"prometheus\"\nsha256 = \"{good}\"\nscopes = [\"metric\"]\n"
        ))
        .unwrap();
        let all = bad.validate().unwrap_err().problems.join("\n");
        assert!(
            all.contains(
                "http.tokens[0]: unknown scope \"metric\" (use predict, feedback, admin, metrics)"
            ),
            "{all}"
        );
        // print-default-config names the scope and what it opens
        let text = Config::default_toml();
        assert!(
            text.contains("# predict, feedback, admin, metrics")
                && text.contains("GET /metrics only"),
            "{text}"
        );
    }
}
