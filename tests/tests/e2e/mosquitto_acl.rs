//! Real Mosquitto with the shipped `deploy/mosquitto/` config and ACL, certificates from the
//! shipped `make-certs.sh`: a device publishes and receives only under its own topics (it
//! cannot publish as another device, forge its acks or commands, or read another device's
//! commands), clients without a certificate of the fleet CA are refused, the fleet server's
//! `mqtts://` options (`fleet_server::server::tls`) connect with its client certificate, and a
//! real `edge-agent` with its device certificate delivers records and gets its acks.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use e2e_tests::{
    bin, free_port, install_example_agent, mosquitto_or_skip, predict_example, root, scratch,
    start_agent, tool_or_skip, wait_until, ChildGuard,
};
use fleet_server::server::config::Mqtt;
use rumqttc::{Event, Packet, QoS};
use serde_json::Value;

/// Whether mosquitto, its clients and openssl are installed; else `SKIPPED ...` (or a failure
/// when `E2E_REQUIRE_TOOLS` is set).
fn tools_or_skip(what: &str) -> bool {
    mosquitto_or_skip(what)
        && tool_or_skip("openssl", "version", what)
        && tool_or_skip("mosquitto_pub", "--help", what)
        && tool_or_skip("mosquitto_sub", "--help", what)
}

/// Mosquitto options that belong to a listener (mosquitto.conf(5), "Listeners").
const LISTENER_OPTIONS: [&str; 27] = [
    "bind_address",
    "bind_interface",
    "http_dir",
    "max_connections",
    "max_qos",
    "max_topic_alias",
    "mount_point",
    "protocol",
    "socket_domain",
    "use_username_as_clientid",
    "websockets_log_level",
    "websockets_headers_size",
    "cafile",
    "capath",
    "certfile",
    "keyfile",
    "ciphers",
    "ciphers_tls1.3",
    "crlfile",
    "dhparamfile",
    "require_certificate",
    "tls_engine",
    "tls_keyform",
    "tls_version",
    "use_identity_as_username",
    "use_subject_as_username",
    "psk_hint",
];

fn deploy() -> PathBuf {
    root().join("deploy/mosquitto")
}

/// Runs the shipped `make-certs.sh OUT devices...`.
fn make_certs(out: &Path, devices: &[&str]) {
    let o = Command::new("bash")
        .arg(deploy().join("make-certs.sh"))
        .arg(out)
        .args(devices)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "make-certs.sh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // mosquitto started as root drops to its own user: let it read the test files
    use std::os::unix::fs::PermissionsExt;
    let mut d = Some(out);
    while let Some(p) =
        d.filter(|p| p.starts_with(std::env::temp_dir()) && *p != std::env::temp_dir())
    {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        d = p.parent();
    }
    for e in std::fs::read_dir(out).unwrap() {
        let p = e.unwrap().path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// The shipped `mosquitto.conf` with only the listener (loopback, `port`), the file paths
/// (certificates in `pki`, the ACL and data in `dir`) and the log destination rewritten;
/// every other line, the security settings included, kept as shipped.
fn test_conf(shipped: &str, port: u16, pki: &Path, dir: &Path) -> String {
    let etc = "/etc/mosquitto/edge/";
    let pki = format!("{}/", pki.display());
    let rewrites: [(&str, String); 7] = [
        ("listener 8883", format!("listener {port} 127.0.0.1")),
        (
            "acl_file /etc/mosquitto/edge/acl",
            format!("acl_file {}/acl", dir.display()),
        ),
        (
            "cafile /etc/mosquitto/edge/ca.pem",
            format!("cafile {pki}ca.pem"),
        ),
        (
            "certfile /etc/mosquitto/edge/broker.pem",
            format!("certfile {pki}broker.pem"),
        ),
        (
            "keyfile /etc/mosquitto/edge/broker.key",
            format!("keyfile {pki}broker.key"),
        ),
        (
            "persistence_location /var/lib/mosquitto/",
            format!("persistence_location {}/data/", dir.display()),
        ),
        (
            "log_dest syslog",
            format!("log_dest file {}/data/mosquitto.log", dir.display()),
        ),
    ];
    let mut used = [0; 7];
    let mut out = String::new();
    for line in shipped.lines() {
        let mut line = line.to_string();
        if let Some(i) = rewrites.iter().position(|(from, _)| line.trim() == *from) {
            used[i] += 1;
            line = rewrites[i].1.clone();
        }
        assert!(
            line.starts_with('#') || !line.contains(etc),
            "a path of the shipped config the test does not rewrite: {line}"
        );
        out.push_str(&line);
        out.push('\n');
    }
    assert_eq!(
        used, [1; 7],
        "the shipped config's listener/paths changed:\n{shipped}"
    );
    out
}

/// A broker running the shipped config and ACL, and the dev PKI for `device-1`, `device-2`.
struct Plant {
    dir: PathBuf,
    pki: PathBuf,
    port: u16,
    /// Killed when dropped, before the directory is removed.
    broker: Option<ChildGuard>,
    _tmp: Option<tempfile::TempDir>,
}

impl Plant {
    fn start() -> Plant {
        let tmp = scratch();
        let dir = tmp.path().to_path_buf();
        let pki = dir.join("pki");
        make_certs(&pki, &["device-1", "device-2"]);
        let shipped = std::fs::read_to_string(deploy().join("mosquitto.conf")).unwrap();
        for line in [
            "per_listener_settings false",
            "allow_anonymous false",
            "require_certificate true",
            "use_identity_as_username true",
            "persistence true",
        ] {
            assert!(
                shipped.lines().any(|l| l.trim() == line),
                "the shipped mosquitto.conf lacks {line:?}"
            );
        }
        // listener options before the first `listener` line would open a default plain
        // listener on 1883 next to the TLS one
        let first_listener = shipped
            .lines()
            .position(|l| l.starts_with("listener "))
            .expect("a listener in the shipped config");
        for line in shipped.lines().take(first_listener) {
            let key = line.split_whitespace().next().unwrap_or("");
            assert!(
                !LISTENER_OPTIONS.contains(&key),
                "{line:?} comes before the listener: it would make a default listener on 1883"
            );
        }
        // the shipped ACL, byte for byte, where the broker's user can read it
        std::fs::copy(deploy().join("acl"), dir.join("acl")).unwrap();
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o777)).unwrap();
        std::fs::set_permissions(dir.join("acl"), std::fs::Permissions::from_mode(0o644)).unwrap();
        // Mosquitto on a free port: tried again on another port when the port was taken
        // meanwhile (the probe only succeeds against this broker: it checks the broker's
        // certificate against this CA)
        for _ in 0..5 {
            let port = free_port();
            let conf_path = dir.join(format!("mosquitto-{port}.conf"));
            std::fs::write(&conf_path, test_conf(&shipped, port, &pki, &dir)).unwrap();
            let mut child = ChildGuard(
                Command::new("mosquitto")
                    .arg("-c")
                    .arg(&conf_path)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start mosquitto"),
            );
            let mut plant = Plant {
                _tmp: None,
                dir: dir.clone(),
                pki: pki.clone(),
                port,
                broker: None,
            };
            let up = wait_until(Duration::from_secs(10), || {
                matches!(child.0.try_wait(), Ok(Some(_)))
                    || plant
                        .publish(Some("fleet-server"), "edge/v1/probe", "probe", &[])
                        .status
                        .success()
            });
            if up && matches!(child.0.try_wait(), Ok(None)) {
                plant._tmp = Some(tmp);
                plant.broker = Some(child);
                return plant;
            }
            eprintln!("mosquitto on port {port} did not start: {}", plant.log());
        }
        panic!("mosquitto did not start with the shipped config");
    }

    fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("data/mosquitto.log")).unwrap_or_default()
    }

    /// `mosquitto_pub`/`mosquitto_sub` arguments to reach the broker as `who` (a
    /// certificate name of the PKI; None: no client certificate).
    fn client_args(&self, who: Option<&str>) -> Vec<String> {
        let mut a = vec![
            "-h".to_string(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "--cafile".into(),
            self.pki.join("ca.pem").display().to_string(),
        ];
        if let Some(who) = who {
            a.extend([
                "--cert".into(),
                self.pki.join(format!("{who}.pem")).display().to_string(),
                "--key".into(),
                self.pki.join(format!("{who}.key")).display().to_string(),
            ]);
        }
        a
    }

    /// `mosquitto_pub` as `who` (QoS 1, client id `<who>-pub`), with `extra` arguments.
    fn publish(&self, who: Option<&str>, topic: &str, payload: &str, extra: &[&str]) -> Output {
        Command::new("mosquitto_pub")
            .args(self.client_args(who))
            .args(["-i", &format!("{}-pub", who.unwrap_or("nobody"))])
            .args(["-q", "1", "-t", topic, "-m", payload])
            .args(extra)
            .output()
            .unwrap()
    }

    /// `mosquitto_sub` as `who` on `topics` for 2 seconds: the `topic payload` lines received.
    fn subscribe(&self, who: &str, topics: &[&str]) -> Vec<String> {
        let mut cmd = Command::new("mosquitto_sub");
        cmd.args(self.client_args(Some(who))).args([
            "-i",
            &format!("{who}-sub"),
            "-q",
            "1",
            "-v",
            "-W",
            "2",
        ]);
        for t in topics {
            cmd.args(["-t", t]);
        }
        let o = cmd.output().unwrap();
        // it ends on its timeout (exit 27) after printing what it got
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.code() == Some(27) || o.status.success(),
            "mosquitto_sub as {who} {topics:?}: {:?} {err}",
            o.status
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The fleet server's `[mqtt]` section for this broker (its own client certificate).
    fn fleet_mqtt(&self) -> Mqtt {
        Mqtt {
            url: self.url(),
            client_id: Some("fleet-server".into()),
            ca_file: Some(self.pki.join("ca.pem")),
            client_cert: Some(self.pki.join("fleet-server.pem")),
            client_key: Some(self.pki.join("fleet-server.key")),
            username: None,
            password: None,
        }
    }
}

/// Messages received by the fleet: (topic, payload).
type Received = Vec<(String, Vec<u8>)>;

enum Msg {
    Publish(String, Vec<u8>),
    SubAck(Vec<rumqttc::SubscribeReasonCode>),
    Error(String),
}

/// The fleet side: a rumqttc client made by `fleet_server::server::tls::mqtt_options` with
/// the fleet-server certificate, subscribed to `edge/v1/#`.
struct Fleet {
    client: rumqttc::Client,
    rx: mpsc::Receiver<Msg>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Fleet {
    fn connect(plant: &Plant) -> Fleet {
        let m = plant.fleet_mqtt();
        let mut o = fleet_server::server::tls::mqtt_options(&m.url, "fleet-server", Some(&m))
            .expect("the fleet's mqtts options");
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut conn) = rumqttc::Client::new(o, 64);
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for ev in conn.iter() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let msg = match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Msg::Publish(p.topic.clone(), p.payload.to_vec())
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => Msg::SubAck(s.return_codes),
                    Ok(_) => continue,
                    Err(e) => {
                        std::thread::sleep(Duration::from_millis(200));
                        Msg::Error(e.to_string())
                    }
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        let fleet = Fleet {
            client,
            rx,
            stop,
            thread: Some(thread),
        };
        fleet
            .client
            .subscribe("edge/v1/#", QoS::AtLeastOnce)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match fleet
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Msg::SubAck(codes)) => {
                    assert_eq!(
                        codes,
                        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)],
                        "the fleet server may subscribe to edge/v1/#"
                    );
                    return fleet;
                }
                Ok(Msg::Error(e)) => eprintln!("fleet connecting: {e}"),
                Ok(Msg::Publish(..)) => {}
                Err(_) => panic!("the fleet did not connect/subscribe:\n{}", plant.log()),
            }
        }
    }

    /// Messages received until `until` returns true for one (included) or `timeout`.
    fn collect(
        &self,
        timeout: Duration,
        mut until: impl FnMut(&str, &[u8]) -> bool,
    ) -> (Received, bool) {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while let Ok(m) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            if let Msg::Publish(t, p) = m {
                let done = until(&t, &p);
                got.push((t, p));
                if done {
                    return (got, true);
                }
            }
        }
        (got, false)
    }

    fn publish(&self, topic: &str, payload: Vec<u8>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .unwrap();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn topics(msgs: &[(String, Vec<u8>)]) -> Vec<&str> {
    msgs.iter().map(|(t, _)| t.as_str()).collect()
}

#[test]
fn mosquitto_acl_a_device_publishes_and_reads_only_its_own_topics() {
    if !tools_or_skip("Mosquitto ACL tests") {
        return;
    }
    let plant = Plant::start();
    let fleet = Fleet::connect(&plant);

    // device-1 may publish each of its own device->fleet topics
    for leaf in ["status", "records", "replies", "bundle/get"] {
        let topic = format!("edge/v1/device-1/{leaf}");
        let o = plant.publish(Some("device-1"), &topic, &format!("own {leaf}"), &[]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (got, ok) = fleet.collect(Duration::from_secs(10), |t, _| t == topic);
        assert!(ok, "the fleet did not get {topic}: {:?}", topics(&got));
        assert_eq!(got.last().unwrap().1, format!("own {leaf}").as_bytes());
    }

    // ...but not as device-2, and not its own fleet->device topics; MQTT 5 says why
    let forged = [
        "edge/v1/device-2/records",
        "edge/v1/device-2/status",
        "edge/v1/device-2/replies",
        "edge/v1/device-2/bundle/get",
        "edge/v1/device-1/ack",
        "edge/v1/device-1/commands",
        "edge/v1/device-1/bundle/chunk",
        "edge/v1/device-2",
        "edge/v1/other",
    ];
    for topic in forged {
        let o = plant.publish(Some("device-1"), topic, "forged", &["-r"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = plant.publish(Some("device-1"), topic, "forged", &["-V", "mqttv5"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("Not authorized"), "{topic}: {err}");
    }
    // a last publish it may make: everything before it has been through the broker
    let o = plant.publish(Some("device-1"), "edge/v1/device-1/records", "marker", &[]);
    assert!(o.status.success());
    let (got, ok) = fleet.collect(Duration::from_secs(10), |t, p| {
        t == "edge/v1/device-1/records" && p == b"marker"
    });
    assert!(ok, "the marker did not arrive: {:?}", topics(&got));
    let (late, _) = fleet.collect(Duration::from_millis(500), |_, _| false);
    let all: Vec<_> = got.iter().chain(&late).collect();
    assert!(
        all.iter().all(|(_, p)| p != b"forged"),
        "a forged publish reached the fleet: {:?}",
        all.iter().map(|(t, _)| t).collect::<Vec<_>>()
    );
    // no forged retained status is left for device-2 (a later subscriber would see it)
    let retained = plant.subscribe("fleet-server", &["edge/v1/device-2/status"]);
    assert!(retained.is_empty(), "{retained:?}");

    // fleet->device messages, retained so the subscribers below get them on subscribing
    for dev in ["device-1", "device-2"] {
        for leaf in ["ack", "commands", "bundle/chunk"] {
            fleet.publish(
                &format!("edge/v1/{dev}/{leaf}"),
                format!("for {dev}").into_bytes(),
                true,
            );
        }
    }
    let (got, ok) = fleet.collect(Duration::from_secs(10), |t, _| {
        t == "edge/v1/device-2/bundle/chunk"
    });
    assert!(ok, "the fleet's own publishes: {:?}", topics(&got));

    // device-1 gets its own acks, commands and chunks, never device-2's
    let got = plant.subscribe(
        "device-1",
        &[
            "edge/v1/device-2/commands",
            "edge/v1/device-2/ack",
            "edge/v1/device-2/bundle/chunk",
            "edge/v1/device-1/ack",
            "edge/v1/device-1/commands",
            "edge/v1/device-1/bundle/chunk",
        ],
    );
    let mut want = vec![
        "edge/v1/device-1/ack for device-1".to_string(),
        "edge/v1/device-1/commands for device-1".into(),
        "edge/v1/device-1/bundle/chunk for device-1".into(),
    ];
    let mut sorted = got.clone();
    sorted.sort();
    want.sort();
    assert_eq!(
        sorted, want,
        "device-1 subscribed to its and device-2's topics"
    );
    // wildcards do not widen what it reads
    for wild in ["edge/v1/#", "edge/v1/+/commands", "#", "edge/v1/device-2/#"] {
        let got = plant.subscribe("device-1", &[wild]);
        assert!(
            got.iter().all(|l| !l.contains("device-2")),
            "device-1 on {wild}: {got:?}"
        );
    }
    // device-2 gets its own
    let got = plant.subscribe("device-2", &["edge/v1/device-2/commands"]);
    assert_eq!(got, vec!["edge/v1/device-2/commands for device-2"]);
}

#[test]
fn mosquitto_acl_clients_without_a_certificate_of_the_fleet_ca_are_refused() {
    if !tools_or_skip("Mosquitto ACL tests") {
        return;
    }
    let plant = Plant::start();
    let fleet = Fleet::connect(&plant);
    // a certificate of another CA, with a device's name
    let rogue = plant.dir.join("rogue");
    make_certs(&rogue, &["device-2"]);

    let topic = "edge/v1/device-2/records";
    let no_cert = plant.publish(None, topic, "no certificate", &[]);
    let plain = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &plant.port.to_string()])
        .args(["-i", "plain", "-q", "1", "-t", topic, "-m", "plain"])
        .args(["-u", "fleet-server"])
        .output()
        .unwrap();
    let other_ca = Command::new("mosquitto_pub")
        .args(plant.client_args(None))
        .arg("--cert")
        .arg(rogue.join("device-2.pem"))
        .arg("--key")
        .arg(rogue.join("device-2.key"))
        .args(["-i", "rogue", "-q", "1", "-t", topic, "-m", "rogue"])
        .output()
        .unwrap();
    for (what, o) in [
        ("no client certificate", &no_cert),
        ("plain MQTT claiming the fleet's name", &plain),
        ("a certificate of another CA", &other_ca),
    ] {
        assert!(!o.status.success(), "{what}: accepted\n{}", plant.log());
        eprintln!("{what}: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    // the broker is up and device-2's own certificate works
    let ok = plant.publish(Some("device-2"), topic, "device-2", &[]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let (got, arrived) = fleet.collect(Duration::from_secs(10), |_, p| p == b"device-2");
    assert!(arrived, "{:?}", topics(&got));
    assert_eq!(
        topics(&got),
        vec![topic],
        "only device-2's own publish arrived"
    );
    let log = plant.log();
    assert!(
        log.contains("peer did not return a certificate"),
        "the broker refused the client without a certificate:\n{log}"
    );
}

#[test]
fn mosquitto_acl_an_agent_with_its_device_certificate_delivers_records() {
    if !tools_or_skip("Mosquitto ACL tests") {
        return;
    }
    let plant = Plant::start();
    let fleet = Fleet::connect(&plant);
    let tmp = scratch();
    let d = tmp.path();
    install_example_agent(d);
    let agent_port = free_port();
    let pki = &plant.pki;
    std::fs::write(
        d.join("agent.toml"),
        format!(
            r#"device_id = "device-1"
state_dir = "state"
trust_root = "root.pub"
[http]
listen = "127.0.0.1:{agent_port}"
[telemetry]
window_secs = 1
health_secs = 1
[sync]
urls = ["{url}"]
ca_file = "{ca}"
client_cert = "{cert}"
client_key = "{key}"
keep_alive_secs = 5
connect_timeout_secs = 2
backoff_min_ms = 100
backoff_max_ms = 500
ack_timeout_ms = 5000
"#,
            url = plant.url(),
            ca = pki.join("ca.pem").display(),
            cert = pki.join("device-1.pem").display(),
            key = pki.join("device-1.key").display(),
        ),
    )
    .unwrap();
    let _agent = start_agent(d, agent_port);
    predict_example(agent_port, 3);

    // its birth (retained status) and a record batch reach the fleet
    let mut birth = None;
    let (got, ok) = fleet.collect(Duration::from_secs(60), |t, p| {
        if t == "edge/v1/device-1/status" {
            birth = Some(p.to_vec());
        }
        t == "edge/v1/device-1/records" && birth.is_some()
    });
    assert!(
        ok,
        "no birth and records from the agent: {:?}\n{}",
        topics(&got),
        plant.log()
    );
    let status: Value = serde_json::from_slice(&birth.unwrap()).unwrap();
    assert_eq!(status["device"], "device-1", "{status}");
    let batch = shared::wire::decode_batch(&got.last().unwrap().1, 4 << 20).unwrap();
    assert_eq!(batch.device, "device-1");
    assert!(!batch.records.is_empty() && batch.first >= 1);

    // the fleet acknowledges; the agent reads its ack topic and trims its outbox
    let ack = shared::wire::Ack {
        v: shared::wire::VERSION,
        through: batch.last,
        epoch: batch.epoch,
    };
    fleet.publish("edge/v1/device-1/ack", shared::wire::to_json(&ack), false);
    let mut acked = 0;
    let delivered = wait_until(Duration::from_secs(30), || {
        let out = Command::new(bin("edge-agent"))
            .current_dir(d)
            .args(["status", "--json", "--config", "agent.toml"])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        acked = v["telemetry"]["outbox"]["acked_through"]
            .as_u64()
            .unwrap_or(0);
        acked >= batch.last
    });
    assert!(
        delivered,
        "acked_through {acked}, the fleet acknowledged through {}",
        batch.last
    );
}
