//! The fleet server's connection to an external MQTT broker: `mqtt://host:port` in the clear
//! or `mqtts://host:port` over TLS (rustls with the ring provider, like the agent): the
//! broker's certificate checked against `mqtt.ca_file`, an optional client certificate and key
//! (mutual TLS, as the shipped Mosquitto config in `deploy/mosquitto/` requires), and optional
//! username and password. Every error names the key, the file and what is wrong with it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::MqttOptions;

use crate::server::config::Mqtt;

/// Largest PEM file read (CA bundle, certificate chain, key).
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Why no MQTT options could be made; each names the config key (and file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("mqtt.url {url:?}: expected mqtt://host:port or mqtts://host:port")]
    Url { url: String },
    #[error(
        "mqtt.url {url:?}: mqtts:// needs mqtt.ca_file (PEM file of the CA that signed the broker's certificate)"
    )]
    NoCaFile { url: String },
    #[error(
        "mqtt.{key} is set but mqtt.url {url:?} is mqtt:// (no TLS): use mqtts:// or remove mqtt.{key}"
    )]
    TlsKeyWithoutTls { url: String, key: &'static str },
    #[error("mqtt.{have} is set without mqtt.{missing}: the client certificate and its key go together (mutual TLS)")]
    HalfPair {
        have: &'static str,
        missing: &'static str,
    },
    #[error("mqtt.password is set without mqtt.username")]
    PasswordWithoutUsername,
    #[error("mqtt.{key} {}: {problem}", path.display())]
    File {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// Parses `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (default 8883);
/// also `tcp://` as a synonym of `mqtt://`, and IPv6 hosts in brackets (`mqtts://[::1]:8883`).
pub fn parse_url(url: &str) -> Option<BrokerUrl> {
    let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true, 8883)
    } else if let Some(r) = url
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
    {
        (r, false, 1883)
    } else {
        return None;
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        match after {
            "" => (h, default_port),
            p => (h, p.strip_prefix(':')?.parse().ok()?),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (rest, default_port),
        }
    };
    let bad = |c: char| c.is_whitespace() || matches!(c, '/' | '@' | '?' | '#' | '[' | ']');
    if host.is_empty() || host.contains(bad) || port == 0 {
        return None;
    }
    Some(BrokerUrl {
        host: host.to_string(),
        port,
        tls,
    })
}

/// Every problem of an `[mqtt]` section that can be found without reading the files: the
/// URL, TLS keys only with `mqtts://`, a CA file for `mqtts://`, certificate and key together,
/// a username for a password, and each named file existing. Used by
/// [`crate::server::config::Config::validate`].
pub fn problems(m: &Mqtt) -> Vec<TlsError> {
    let mut p = Vec::new();
    let url = parse_url(&m.url);
    match &url {
        None => p.push(TlsError::Url { url: m.url.clone() }),
        Some(u) if u.tls && m.ca_file.is_none() => {
            p.push(TlsError::NoCaFile { url: m.url.clone() })
        }
        Some(u) if !u.tls => {
            for (key, set) in [
                ("ca_file", m.ca_file.is_some()),
                ("client_cert", m.client_cert.is_some()),
                ("client_key", m.client_key.is_some()),
            ] {
                if set {
                    p.push(TlsError::TlsKeyWithoutTls {
                        url: m.url.clone(),
                        key,
                    });
                }
            }
        }
        Some(_) => {}
    }
    match (&m.client_cert, &m.client_key) {
        (Some(_), None) => p.push(TlsError::HalfPair {
            have: "client_cert",
            missing: "client_key",
        }),
        (None, Some(_)) => p.push(TlsError::HalfPair {
            have: "client_key",
            missing: "client_cert",
        }),
        _ => {}
    }
    if m.password.is_some() && m.username.is_none() {
        p.push(TlsError::PasswordWithoutUsername);
    }
    for (key, path) in [
        ("ca_file", &m.ca_file),
        ("client_cert", &m.client_cert),
        ("client_key", &m.client_key),
    ] {
        if let Some(path) = path {
            if !path.is_file() {
                p.push(TlsError::File {
                    key,
                    path: path.clone(),
                    problem: "not a readable file".into(),
                });
            }
        }
    }
    p
}

/// MQTT options for the broker at `url` with client id `client_id`: TLS (from `mqtt`'s
/// `ca_file`, and `client_cert` + `client_key` when set) for `mqtts://`, and credentials when
/// `mqtt.username` is set. Keep-alive, packet sizes, last will and session settings are left
/// at rumqttc's defaults for the caller to set. Reads and checks the PEM files now, so a bad
/// file is reported at start, naming it.
pub fn mqtt_options(
    url: &str,
    client_id: &str,
    mqtt: Option<&Mqtt>,
) -> Result<MqttOptions, TlsError> {
    let parsed = parse_url(url).ok_or_else(|| TlsError::Url { url: url.into() })?;
    if let Some(m) = mqtt {
        // the URL given may override the configured one (--mqtt-url): check the rest with it
        let checked = Mqtt {
            url: url.to_string(),
            ..m.clone()
        };
        if let Some(e) = problems(&checked).into_iter().next() {
            return Err(e);
        }
    }
    let mut o = MqttOptions::new(client_id, parsed.host.clone(), parsed.port);
    if let Some(user) = mqtt.and_then(|m| m.username.as_ref()) {
        let password = mqtt.and_then(|m| m.password.clone()).unwrap_or_default();
        o.set_credentials(user.clone(), password);
    }
    if parsed.tls {
        let m = mqtt.ok_or_else(|| TlsError::NoCaFile { url: url.into() })?;
        let config = client_config(m)?;
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ));
    }
    Ok(o)
}

/// Reads a PEM file of at most [`MAX_PEM_BYTES`].
fn read_pem(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let err = |problem: String| TlsError::File {
        key,
        path: path.to_path_buf(),
        problem,
    };
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(err(format!(
            "larger than {MAX_PEM_BYTES} bytes: not a PEM file"
        )));
    }
    Ok(bytes)
}

/// The certificates of a PEM file (at least one).
fn read_certs(
    key: &'static str,
    path: &Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let err = |problem: String| TlsError::File {
        key,
        path: path.to_path_buf(),
        problem,
    };
    let bytes = read_pem(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate (BEGIN CERTIFICATE) in it".into()));
    }
    Ok(certs)
}

/// The rustls client configuration of an `[mqtt]` section with a CA file.
fn client_config(m: &Mqtt) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let ca = m
        .ca_file
        .as_ref()
        .ok_or_else(|| TlsError::NoCaFile { url: m.url.clone() })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs("ca_file", ca)? {
        roots.add(cert).map_err(|e| TlsError::File {
            key: "ca_file",
            path: ca.clone(),
            problem: format!("not a usable CA certificate: {e}"),
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&m.client_cert, &m.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("client_cert", cert)?;
            let bytes = read_pem("client_key", key)?;
            let pk = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::File {
                key: "client_key",
                path: key.clone(),
                problem: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1) in it: {e}"),
            })?;
            builder
                .with_client_auth_cert(chain, pk)
                .map_err(|e| TlsError::File {
                    key: "client_key",
                    path: key.clone(),
                    problem: format!("not usable with mqtt.client_cert {}: {e}", cert.display()),
                })?
        }
        (Some(_), None) => {
            return Err(TlsError::HalfPair {
                have: "client_cert",
                missing: "client_key",
            })
        }
        (None, Some(_)) => {
            return Err(TlsError::HalfPair {
                have: "client_key",
                missing: "client_cert",
            })
        }
        (None, None) => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::config::Config;

    fn mqtt(url: &str) -> Mqtt {
        Mqtt {
            url: url.into(),
            client_id: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password: None,
        }
    }

    /// A dev PKI (CA, broker, `fleet-server` and `dev-1` certificates) made by the shipped
    /// `deploy/mosquitto/make-certs.sh`; None when it cannot run (no openssl).
    fn pki(dir: &Path) -> Option<PathBuf> {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto/make-certs.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .arg(dir)
            .arg("dev-1")
            .output()
            .ok()?;
        out.status.success().then(|| dir.to_path_buf())
    }

    #[test]
    fn urls_parse_with_default_ports_and_bad_ones_are_refused() {
        let u = parse_url("mqtts://broker.plant:8884").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("broker.plant", 8884, true)
        );
        let u = parse_url("mqtt://10.0.0.5").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("10.0.0.5", 1883, false));
        assert_eq!(parse_url("mqtts://h/").unwrap().port, 8883);
        assert_eq!(parse_url("tcp://h:1").unwrap().port, 1);
        let v6 = parse_url("mqtts://[::1]:9000").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
        assert_eq!(parse_url("mqtts://[::1]").unwrap().port, 8883);
        for bad in [
            "http://h:1",
            "mqtts://",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://h:x",
            "mqtt://u@h:1",
            "mqtt://h/path:1",
            "mqtts://[::1",
            "mqtts://[::1]x",
        ] {
            assert!(parse_url(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn plain_options_carry_host_port_and_credentials() {
        let mut m = mqtt("mqtt://broker:1884");
        m.username = Some("fleet".into());
        m.password = Some("secret".into());
        let o = mqtt_options(&m.url, "fleet-ingest", Some(&m)).unwrap();
        assert_eq!(o.broker_address(), ("broker".to_string(), 1884));
        assert_eq!(o.client_id(), "fleet-ingest");
        let login = o.credentials().map(|l| (l.username, l.password));
        assert_eq!(login, Some(("fleet".into(), "secret".into())));
        assert!(matches!(o.transport(), rumqttc::Transport::Tcp));
        let o = mqtt_options("mqtt://b:1", "x", None).unwrap();
        assert!(o.credentials().is_none());
    }

    #[test]
    fn problems_name_the_key_and_file() {
        let e = mqtt_options("mqtts://b:8883", "x", None).unwrap_err();
        assert!(e.to_string().contains("needs mqtt.ca_file"), "{e}");
        let e = mqtt_options("https://b", "x", None).unwrap_err();
        assert!(e.to_string().contains("mqtt.url \"https://b\""), "{e}");

        let mut m = mqtt("mqtts://b:8883");
        m.ca_file = Some("/nonexistent/ca.pem".into());
        m.client_cert = Some("/nonexistent/c.pem".into());
        m.password = Some("p".into());
        let text: Vec<String> = problems(&m).iter().map(ToString::to_string).collect();
        let text = text.join("\n");
        for want in [
            "mqtt.client_cert is set without mqtt.client_key",
            "mqtt.password is set without mqtt.username",
            "mqtt.ca_file /nonexistent/ca.pem: not a readable file",
            "mqtt.client_cert /nonexistent/c.pem: not a readable file",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        let e = mqtt_options(&m.url, "x", Some(&m)).unwrap_err();
        assert!(e.to_string().contains("mqtt."), "{e}");

        let mut plain = mqtt("mqtt://b:1883");
        plain.ca_file = Some("/etc/hostname".into());
        let e = mqtt_options(&plain.url, "x", Some(&plain)).unwrap_err();
        assert!(
            e.to_string()
                .contains("mqtt.ca_file is set but mqtt.url \"mqtt://b:1883\" is mqtt://"),
            "{e}"
        );
    }

    #[test]
    fn pem_files_are_read_and_bad_ones_named() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let mut m = mqtt("mqtts://b:8883");
        m.ca_file = Some(not_pem.clone());
        let e = mqtt_options(&m.url, "x", Some(&m)).unwrap_err().to_string();
        assert!(
            e.contains("mqtt.ca_file") && e.contains("not.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let big = dir.path().join("big.pem");
        std::fs::write(&big, vec![b'a'; MAX_PEM_BYTES as usize + 1]).unwrap();
        m.ca_file = Some(big);
        let e = mqtt_options(&m.url, "x", Some(&m)).unwrap_err().to_string();
        assert!(e.contains("big.pem") && e.contains("larger than"), "{e}");

        let Some(pki) = pki(&dir.path().join("pki")) else {
            assert!(
                std::env::var_os("E2E_REQUIRE_TOOLS").is_none(),
                "openssl is required (E2E_REQUIRE_TOOLS is set)"
            );
            eprintln!("SKIPPED the PEM loading checks: openssl not installed");
            return;
        };
        // server-authenticated TLS
        m.ca_file = Some(pki.join("ca.pem"));
        let o = mqtt_options("mqtts://localhost", "fleet", Some(&m)).unwrap();
        assert_eq!(o.broker_address(), ("localhost".to_string(), 8883));
        assert!(matches!(o.transport(), rumqttc::Transport::Tls(_)));
        // mutual TLS
        m.client_cert = Some(pki.join("fleet-server.pem"));
        m.client_key = Some(pki.join("fleet-server.key"));
        mqtt_options(&m.url, "fleet", Some(&m)).unwrap();
        // a certificate as the key, and a key that is not the certificate's
        m.client_key = Some(pki.join("fleet-server.pem"));
        let e = mqtt_options(&m.url, "fleet", Some(&m))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mqtt.client_key")
                && e.contains("fleet-server.pem")
                && e.contains("no PEM private key"),
            "{e}"
        );
        m.client_key = Some(pki.join("dev-1.key"));
        let e = mqtt_options(&m.url, "fleet", Some(&m))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mqtt.client_key")
                && e.contains("dev-1.key")
                && e.contains("fleet-server.pem"),
            "{e}"
        );
    }

    #[test]
    fn config_validation_accepts_mqtts_and_checks_the_tls_keys() {
        let c = Config::parse("[mqtt]\nurl = \"mqtts://b:8883\"\nca_file = \"/etc/hostname\"\n")
            .unwrap();
        c.validate().unwrap();
        let c = Config::parse(
            "[mqtt]\nurl = \"mqtts://b:8883\"\nca_file = \"/nonexistent/ca.pem\"\n\
             client_key = \"/etc/hostname\"\n",
        )
        .unwrap();
        let p = c.validate().unwrap_err().problems.join("\n");
        assert!(
            p.contains("mqtt.ca_file /nonexistent/ca.pem: not a readable file"),
            "{p}"
        );
        assert!(
            p.contains("mqtt.client_key is set without mqtt.client_cert"),
            "{p}"
        );
        let c = Config::parse("[mqtt]\nurl = \"mqtt://b:1883\"\nclient_cert = \"/etc/hostname\"\nclient_key = \"/etc/hostname\"\n")
            .unwrap();
        let p = c.validate().unwrap_err().problems.join("\n");
        assert!(p.contains("mqtt.client_cert is set but mqtt.url"), "{p}");
        assert!(p.contains("mqtt.client_key is set but mqtt.url"), "{p}");
    }
}
