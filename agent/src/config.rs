//! Agent configuration: the TOML file, its defaults, command-line overrides, and validation
//! that reports every problem at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

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
    pub http: Http,
    pub mqtt: Option<Mqtt>,
    pub install: Install,
    pub health: Health,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Listen address; loopback by default.
    pub listen: String,
    /// Largest request body (bytes).
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mqtt {
    /// `mqtt://host:port` of the plant's broker.
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Install {
    /// Largest bundle accepted (bytes of listed files).
    pub max_bundle_bytes: u64,
    /// Single-row runs measured for the on-device latency profile.
    pub latency_runs: u32,
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
    /// Largest p99 latency relative to the previous version on this device.
    pub max_p99_ratio: f64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            device_id: None,
            state_dir: PathBuf::from("/var/lib/edge-agent"),
            trust_root: PathBuf::from("/etc/edge-agent/root.pub"),
            keyring: None,
            http: Http::default(),
            mqtt: None,
            install: Install::default(),
            health: Health::default(),
        }
    }
}

impl Default for Http {
    fn default() -> Http {
        Http {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 1024 * 1024,
        }
    }
}

impl Default for Install {
    fn default() -> Install {
        Install {
            max_bundle_bytes: 512 * 1024 * 1024,
            latency_runs: 200,
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

/// Why a configuration cannot be used: every problem found.
#[derive(Debug, thiserror::Error)]
#[error("{}", problems.join("\n"))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(p: String) -> ConfigError {
        ConfigError { problems: vec![p] }
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
             # url = \"mqtt://127.0.0.1:1883\"     # no [mqtt] section: local mode\n\n{body}"
        )
    }

    /// Reads and parses `path` (not yet validated).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ConfigError::one(format!("{}: {e}", path.display())))?;
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::one(format!(
                "{}: {} bytes, larger than the {MAX_CONFIG_BYTES}-byte limit",
                path.display(),
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::one(format!("{}: {e}", path.display())))?;
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
            self.mqtt = Some(Mqtt { url: v.clone() });
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
        }
        if self.install.max_bundle_bytes == 0 {
            p.push("install.max_bundle_bytes must be positive".into());
        }
        if self.install.latency_runs == 0 || self.install.latency_runs > 100_000 {
            p.push("install.latency_runs must be 1 to 100000".into());
        }
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
}
