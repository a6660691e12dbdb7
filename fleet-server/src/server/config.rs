//! Fleet server configuration: the TOML file (`deny_unknown_fields`, every key optional with
//! a default), command-line overrides, and validation that reports every problem at once,
//! each naming its key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use shared::config::read_config_file;
pub use shared::config::ConfigError;

/// Roles a bearer token can have, from least to most privileged.
pub const ROLES: [&str; 3] = ["viewer", "operator", "admin"];

/// The whole configuration (wire type of `fleet-server.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where ingested records (`<state_dir>/ingest`) and the bootstrap admin token live.
    pub state_dir: PathBuf,
    /// MQTT topic prefix of the device protocol (`<prefix>/<device>/records`, ...).
    pub topic_prefix: String,
    pub http: Http,
    pub broker: Broker,
    /// An external broker; when set, the embedded broker is not started.
    pub mqtt: Option<Mqtt>,
    pub ingest: IngestSettings,
    pub bundles: Bundles,
    pub directives: Directives,
    pub rollouts: Rollouts,
    pub alerts: Alerts,
}

/// How long the ingest keeps device records (`<state_dir>/ingest/devices/<id>/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestSettings {
    /// Closed record segments older than this are deleted (0: keep forever).
    pub retention_days: u64,
    /// Oldest closed segments are deleted while a device's records exceed this (0: no cap).
    pub max_device_mib: u64,
    /// Size at which a device's records file is closed and a new one started.
    pub segment_mib: u64,
}

impl Default for IngestSettings {
    fn default() -> IngestSettings {
        IngestSettings {
            retention_days: 30,
            max_device_mib: 1024,
            segment_mib: 64,
        }
    }
}

impl IngestSettings {
    /// The store's retention policy.
    pub fn retention(&self) -> crate::ingest::Retention {
        crate::ingest::Retention {
            segment_bytes: self.segment_mib.saturating_mul(1024 * 1024),
            max_age: (self.retention_days > 0).then(|| {
                std::time::Duration::from_secs(self.retention_days.saturating_mul(86_400))
            }),
            max_bytes: (self.max_device_mib > 0)
                .then(|| self.max_device_mib.saturating_mul(1024 * 1024)),
        }
    }
}

/// The bundle store: what `POST /v1/bundles` accepts and how bundles travel to devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bundles {
    /// The trust root (keyring file) bundle signatures are checked against, the same file the
    /// agents use. Without it, uploads are refused.
    pub trust_root: Option<PathBuf>,
    /// A root-signed keyring of signing keys, as the agents' `keyring` setting: bundles
    /// must then be signed by a key it lists for their model.
    pub keyring: Option<PathBuf>,
    /// Largest bundle accepted by an upload.
    pub max_bundle_bytes: u64,
    /// Chunk size of MQTT delivery (4 KiB to 1 MiB; below the broker's payload limit).
    pub chunk_bytes: usize,
    /// Per-model signoff policies; a bundle of a model without one needs nothing more than
    /// its signature to be rolled out.
    pub signoff: Vec<SignoffPolicy>,
}

/// What a bundle of `model` must show before a rollout may use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignoffPolicy {
    /// Model name, or `*` for every model without its own policy.
    pub model: String,
    /// Gates on the bundle's holdout signoff metrics, the syntax of `fleetctl bundle build
    /// --require`: `roc_auc>=0.9`, `abs(statistical_parity_difference)<=0.1`.
    #[serde(default)]
    pub require: Vec<String>,
    /// Approvals needed from admins other than the uploader (0 or 1).
    #[serde(default)]
    pub approvals: u32,
}

/// Signed directives to devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Directives {
    /// The fleet's directive signing key (a `fleetctl keys generate` secret key file); default
    /// `<state_dir>/directive.key`, created with its `.pub` on first start.
    pub key_file: Option<PathBuf>,
    /// How long a directive may be accepted after it is issued (seconds).
    pub lifetime_secs: u64,
}

/// The rollout engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rollouts {
    /// How often deadlines and promotions are checked (milliseconds).
    pub tick_ms: u64,
    /// Wave timeout when a rollout does not give one (seconds).
    pub default_wave_timeout_secs: u64,
}

/// Alertmanager-format webhooks for drift alerts and rollout halts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Alerts {
    pub webhooks: Vec<Webhook>,
    /// Sent as `externalURL` and in `generatorURL` (the admin API's public address).
    pub external_url: Option<String>,
}

/// One webhook receiver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    /// `http://host:port/path` or `https://...`.
    pub url: String,
    /// Sent as the payload's `receiver`.
    #[serde(default)]
    pub name: Option<String>,
}

impl Default for Bundles {
    fn default() -> Bundles {
        Bundles {
            trust_root: None,
            keyring: None,
            max_bundle_bytes: 512 * 1024 * 1024,
            chunk_bytes: shared::delivery::DEFAULT_CHUNK_BYTES,
            signoff: Vec::new(),
        }
    }
}

impl Default for Directives {
    fn default() -> Directives {
        Directives {
            key_file: None,
            lifetime_secs: 24 * 3600,
        }
    }
}

impl Default for Rollouts {
    fn default() -> Rollouts {
        Rollouts {
            tick_ms: 1000,
            default_wave_timeout_secs: 1800,
        }
    }
}

/// The admin HTTP API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Listen address; loopback by default.
    pub listen: String,
    /// Bearer tokens; empty: a bootstrap admin token is created in `<state_dir>/admin-token`.
    pub tokens: Vec<Token>,
}

/// One bearer token, stored as the SHA-256 of the token (never the token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// Who holds it (for logs).
    pub name: String,
    /// Lowercase hex SHA-256 of the token (`printf %s TOKEN | sha256sum`).
    pub sha256: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
}

impl Token {
    /// A token entry for `secret`, which is hashed here (only the hash is kept).
    pub fn from_secret(name: &str, secret: &str, role: &str) -> Token {
        Token {
            name: name.into(),
            sha256: shared::auth::token_sha256(secret),
            role: role.into(),
        }
    }
}

/// The embedded MQTT broker (rumqttd), used when no external broker is configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    pub embedded: bool,
    /// Listen address; loopback by default.
    pub listen: String,
    /// Most simultaneous MQTT connections.
    pub max_connections: usize,
    /// Largest PUBLISH payload accepted (bytes).
    pub max_payload_bytes: usize,
}

/// An external MQTT broker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// `mqtt://host:port` (`mqtts://` comes with the TLS slice).
    pub url: String,
    /// MQTT client id of the ingest (default `fleet-ingest`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// `mqtts://`: PEM file of the CA that signed the broker's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `mqtts://` with client certificates: PEM certificate chain and key.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            state_dir: PathBuf::from("./fleet-state"),
            topic_prefix: "edge/v1".into(),
            http: Http::default(),
            broker: Broker::default(),
            mqtt: None,
            ingest: IngestSettings::default(),
            bundles: Bundles::default(),
            directives: Directives::default(),
            rollouts: Rollouts::default(),
            alerts: Alerts::default(),
        }
    }
}

impl Default for Http {
    fn default() -> Http {
        Http {
            listen: "127.0.0.1:8080".into(),
            tokens: Vec::new(),
        }
    }
}

impl Default for Broker {
    fn default() -> Broker {
        Broker {
            embedded: true,
            listen: "127.0.0.1:1883".into(),
            max_connections: 2000,
            max_payload_bytes: 2 * 1024 * 1024,
        }
    }
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub state_dir: Option<PathBuf>,
    pub http_listen: Option<String>,
    pub mqtt_url: Option<String>,
}

/// Where the ingest connects, as decided by the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// Start the embedded broker on this address and connect to it.
    Embedded(SocketAddr),
    /// Connect to this external broker URL.
    External(String),
}

impl Config {
    /// The commented default configuration (`fleet-server print-default-config`).
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&Config::default()).unwrap_or_default();
        format!(
            "# fleet-server configuration. Every key is optional; these are the defaults.\n\
             # [mqtt]                              # an external broker instead of the embedded one\n\
             # url = \"mqtt://broker.plant:1883\"\n\
             # [[http.tokens]]                     # no tokens: <state_dir>/admin-token is created\n\
             # name = \"ops\"\n\
             # sha256 = \"<hex SHA-256 of the token>\"\n\
             # role = \"admin\"                     # viewer, operator, admin\n\n{body}"
        )
    }

    /// Reads and parses `path` (not yet validated).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = read_config_file(path)?;
        Config::parse(&text)
            .map_err(|e| ConfigError::one(format!("{}: {}", path.display(), e.problems.join("; "))))
    }

    /// Parses TOML text (not yet validated).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::one(e.to_string().trim_end().to_string()))
    }

    /// Applies command-line overrides.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.state_dir {
            self.state_dir = v.clone();
        }
        if let Some(v) = &o.http_listen {
            self.http.listen = v.clone();
        }
        if let Some(v) = &o.mqtt_url {
            match &mut self.mqtt {
                Some(m) => m.url = v.clone(),
                None => {
                    self.mqtt = Some(Mqtt {
                        url: v.clone(),
                        client_id: None,
                        ca_file: None,
                        client_cert: None,
                        client_key: None,
                        username: None,
                        password: None,
                    })
                }
            }
        }
    }

    /// The broker the ingest uses (call after [`Config::validate`]).
    pub fn broker_choice(&self) -> Option<BrokerChoice> {
        match &self.mqtt {
            Some(m) => Some(BrokerChoice::External(m.url.clone())),
            None if self.broker.embedded => {
                self.broker.listen.parse().ok().map(BrokerChoice::Embedded)
            }
            None => None,
        }
    }

    /// Checks everything that can be checked without starting: every problem is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if self.state_dir.as_os_str().is_empty() {
            p.push("state_dir is empty".into());
        }
        let t = &self.topic_prefix;
        if t.is_empty() || t.starts_with('/') || t.ends_with('/') || t.contains(['+', '#']) {
            p.push(format!(
                "topic_prefix {t:?}: a topic without wildcards or leading/trailing '/' (e.g. \"edge/v1\")"
            ));
        }
        let http_addr = self.http.listen.parse::<SocketAddr>().ok();
        if http_addr.is_none() {
            p.push(format!(
                "http.listen {:?} is not an address:port (e.g. 127.0.0.1:8080)",
                self.http.listen
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, t) in self.http.tokens.iter().enumerate() {
            let at = format!("http.tokens[{i}]");
            if t.name.is_empty() || !names.insert(t.name.as_str()) {
                p.push(format!("{at}.name {:?} is empty or used twice", t.name));
            }
            if t.sha256.len() != 64 || !t.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                p.push(format!(
                    "{at}.sha256 must be the 64 hex digits of the token's SHA-256"
                ));
            }
            if !ROLES.contains(&t.role.as_str()) {
                p.push(format!("{at}.role {:?}: use {}", t.role, ROLES.join(", ")));
            }
        }
        match &self.mqtt {
            Some(m) => {
                // URL (mqtt:// or mqtts://), TLS keys only with mqtts://, a CA file for it,
                // client certificate and key together, the files existing
                p.extend(super::tls::problems(m).iter().map(ToString::to_string));
                if m.client_id.as_deref().is_some_and(str::is_empty) {
                    p.push("mqtt.client_id is empty".into());
                }
            }
            None if !self.broker.embedded => p.push(
                "broker.embedded = false but no [mqtt] url: set one of them so the ingest has a broker"
                    .into(),
            ),
            None => {}
        }
        let b = &self.broker;
        match b.listen.parse::<SocketAddr>() {
            Err(_) => p.push(format!(
                "broker.listen {:?} is not an address:port (e.g. 127.0.0.1:1883)",
                b.listen
            )),
            Ok(a) if self.mqtt.is_none() && b.embedded && Some(a) == http_addr => p.push(format!(
                "broker.listen {a} is also http.listen: use two different ports"
            )),
            Ok(_) => {}
        }
        if !(1..=100_000).contains(&b.max_connections) {
            p.push(format!(
                "broker.max_connections = {}: must be 1 to 100000",
                b.max_connections
            ));
        }
        if !(64 * 1024..=64 * 1024 * 1024).contains(&b.max_payload_bytes) {
            p.push(format!(
                "broker.max_payload_bytes = {}: must be 65536 to 67108864",
                b.max_payload_bytes
            ));
        }
        let ing = &self.ingest;
        if !(1..=4096).contains(&ing.segment_mib) {
            p.push(format!(
                "ingest.segment_mib = {}: must be 1 to 4096",
                ing.segment_mib
            ));
        } else if ing.max_device_mib != 0 && ing.max_device_mib < 2 * ing.segment_mib {
            p.push(format!(
                "ingest.max_device_mib = {} must be 0 (no cap) or at least twice ingest.segment_mib = {}",
                ing.max_device_mib, ing.segment_mib
            ));
        }
        let bu = &self.bundles;
        if !(4096..=shared::delivery::MAX_CHUNK_BYTES).contains(&bu.chunk_bytes) {
            p.push(format!(
                "bundles.chunk_bytes = {}: must be 4096 to {}",
                bu.chunk_bytes,
                shared::delivery::MAX_CHUNK_BYTES
            ));
        } else if self.mqtt.is_none() && bu.chunk_bytes + 8192 > b.max_payload_bytes {
            p.push(format!(
                "bundles.chunk_bytes = {} does not fit broker.max_payload_bytes = {} (leave 8192 bytes for the header)",
                bu.chunk_bytes, b.max_payload_bytes
            ));
        }
        if bu.max_bundle_bytes == 0 {
            p.push("bundles.max_bundle_bytes must be at least 1".into());
        }
        if bu
            .trust_root
            .as_ref()
            .is_some_and(|t| t.as_os_str().is_empty())
        {
            p.push("bundles.trust_root is empty".into());
        }
        let mut models = std::collections::BTreeSet::new();
        for (i, s) in bu.signoff.iter().enumerate() {
            if s.model.is_empty() || !models.insert(s.model.as_str()) {
                p.push(format!(
                    "bundles.signoff[{i}].model {:?} is empty or has two policies",
                    s.model
                ));
            }
            if s.approvals > 1 {
                p.push(format!(
                    "bundles.signoff[{i}].approvals = {}: must be 0 or 1",
                    s.approvals
                ));
            }
            for r in &s.require {
                if let Err(e) = shared::metrics::Requirement::parse(r) {
                    p.push(format!("bundles.signoff[{i}].require {r:?}: {e}"));
                }
            }
        }
        if !(60..=shared::directive::MAX_LIFETIME_MS / 1000)
            .contains(&self.directives.lifetime_secs)
        {
            p.push(format!(
                "directives.lifetime_secs = {}: must be 60 to {}",
                self.directives.lifetime_secs,
                shared::directive::MAX_LIFETIME_MS / 1000
            ));
        }
        if !(10..=60_000).contains(&self.rollouts.tick_ms) {
            p.push(format!(
                "rollouts.tick_ms = {}: must be 10 to 60000",
                self.rollouts.tick_ms
            ));
        }
        if self.rollouts.default_wave_timeout_secs == 0 {
            p.push("rollouts.default_wave_timeout_secs must be at least 1".into());
        }
        for (i, w) in self.alerts.webhooks.iter().enumerate() {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                p.push(format!(
                    "alerts.webhooks[{i}].url {:?}: expected http://host[:port]/path or https://...",
                    w.url
                ));
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: p })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_round_trips_and_is_valid() {
        let text = Config::default_toml();
        let back = Config::parse(&text).unwrap();
        assert_eq!(back, Config::default());
        back.validate().unwrap();
        assert_eq!(back.state_dir, PathBuf::from("./fleet-state"));
        assert_eq!(back.broker.max_payload_bytes, 2 * 1024 * 1024);
        assert_eq!(
            back.broker_choice(),
            Some(BrokerChoice::Embedded("127.0.0.1:1883".parse().unwrap()))
        );
        // an empty file is the defaults
        assert_eq!(Config::parse("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let e = Config::parse("[broker]\nembeded = true\n").unwrap_err();
        assert!(e.problems[0].contains("embeded"), "{e}");
        assert!(Config::parse("bogus = 1").is_err());
        assert!(Config::parse("[[http.tokens]]\nname = \"x\"\ntoken = \"t\"\n").is_err());
    }

    #[test]
    fn every_problem_is_reported_naming_its_key() {
        let c = Config::parse(
            "state_dir = \"\"\ntopic_prefix = \"edge/#\"\n\
             [http]\nlisten = \"nowhere\"\n\
             [[http.tokens]]\nname = \"ops\"\nsha256 = \"abc\"\nrole = \"root\"\n\
             [[http.tokens]]\nname = \"ops\"\nsha256 = \"{good}\"\nrole = \"viewer\"\n\
             [broker]\nlisten = \"x\"\nmax_payload_bytes = 10\nmax_connections = 0\n\
             [mqtt]\nurl = \"http://x\"\n"
                .replace("{good}", &"a".repeat(64))
                .as_str(),
        )
        .unwrap();
        let all = c.validate().unwrap_err().problems;
        let text = all.join("\n");
        for want in [
            "state_dir is empty",
            "topic_prefix \"edge/#\"",
            "http.listen \"nowhere\"",
            "http.tokens[0].sha256",
            "http.tokens[0].role \"root\"",
            "http.tokens[1].name \"ops\"",
            "broker.listen \"x\"",
            "broker.max_payload_bytes = 10",
            "broker.max_connections = 0",
            "mqtt.url \"http://x\"",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert_eq!(all.len(), 10, "{text}");
    }

    #[test]
    fn overrides_and_broker_choice() {
        let mut c = Config::parse("[http]\nlisten = \"127.0.0.1:9000\"\n").unwrap();
        c.apply(&Overrides {
            state_dir: Some("/tmp/x".into()),
            http_listen: Some("127.0.0.1:9001".into()),
            mqtt_url: Some("mqtt://broker:1884".into()),
        });
        c.validate().unwrap();
        assert_eq!(c.http.listen, "127.0.0.1:9001");
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(
            c.broker_choice(),
            Some(BrokerChoice::External("mqtt://broker:1884".into()))
        );
        let tls = Config::parse("[mqtt]\nurl = \"mqtts://b:8883\"\n").unwrap();
        let p = tls.validate().unwrap_err().problems.join("\n");
        assert!(p.contains("mqtts:// needs mqtt.ca_file"), "{p}");
        let none = Config::parse("[broker]\nembedded = false\n").unwrap();
        let p = none.validate().unwrap_err().problems.join("\n");
        assert!(
            p.contains("broker.embedded = false but no [mqtt] url"),
            "{p}"
        );
        let clash = Config::parse(
            "[http]\nlisten = \"127.0.0.1:1883\"\n[broker]\nlisten = \"127.0.0.1:1883\"\n",
        )
        .unwrap();
        let p = clash.validate().unwrap_err().problems.join("\n");
        assert!(p.contains("also http.listen"), "{p}");
    }

    #[test]
    fn the_deploy_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/fleet-server.toml");
        let c = Config::load(&path).unwrap();
        c.validate().unwrap();
        assert_eq!(c.topic_prefix, "edge/v1");
    }
}
