//! Commands from the fleet on `<prefix>/<device>/commands`: signed directives are verified
//! with `shared::directive` (one of the configured fleet directive keys, this device, not
//! expired, not issued in the future, a counter above the last one accepted) and refused
//! ones become `directive_rejected` events; unsigned commands: `ping` only.
//!
//! Guarantees:
//! - a directive's counter is written to `<state_dir>/directive-counter.json` (atomically:
//!   temp file, fsync, rename, fsync of the directory) before anything is done for it, so
//!   no directive is acted on twice, also across a crash and restart;
//! - every directive refused (bad signature, unknown key, other device, expired, issued in
//!   the future, replayed, malformed, no directive key configured) is answered `ok: false`
//!   with the reason and recorded as an event with `detail.reason` (one of
//!   `DirectiveError::event_reason`'s values, or `no_directive_keys`, or
//!   `directives_disabled` when a key or the counter file could not be read at start) and
//!   the id it claimed;
//! - a verified directive is handed to the [`Executor`] after its counter was recorded:
//!   `install` is answered `ok: true` once the download is accepted (not after it: the
//!   outcome follows as events), `ok: false` with the error when refused (bundle too large,
//!   no disk); `rollback` is answered after the rollback ran, `ok: false` with the error when
//!   it is impossible; `ping` is answered `ok: true`. Without an executor (a handler built
//!   for tests or tools) install and rollback are answered `ok: false`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shared::directive::{self, Action, CounterRule, DirectiveVerifier};
use shared::trust::PublicKey;
use shared::wire;

/// Name of the counter file inside the state directory.
pub const COUNTER_FILE: &str = "directive-counter.json";
/// Largest counter file read.
const MAX_COUNTER_FILE: u64 = 4096;

/// Called with (event name, detail) for every directive accepted or refused.
pub type EventFn = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// Carries out verified directives (the service implements it).
pub trait Executor: Send + Sync {
    /// Accepts an install: the download starts (or the release is already active). `Err`:
    /// refused, with the reason for the reply.
    fn install(&self, job: crate::download::Job) -> Result<(), String>;
    /// Rolls `model` back to its previous version (`to_release`, when given, must be it).
    fn rollback(
        &self,
        directive: &str,
        model: &str,
        to_release: Option<u64>,
        reason: &str,
    ) -> Result<String, String>;
}

/// Why the command handler could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("sync.directive_keys: {path}: {message}")]
    Key { path: String, message: String },
    #[error("{path}: {message}")]
    Counter { path: String, message: String },
}

/// The counter file (wire type of the state directory, versioned).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CounterFileV1 {
    v: u32,
    /// The highest directive counter accepted.
    last: u64,
}

/// Answers the commands of one device.
pub struct Commands {
    device: String,
    verifier: Option<DirectiveVerifier>,
    counter: Mutex<CounterRule>,
    counter_path: PathBuf,
    events: EventFn,
    /// Why directives are refused although keys may be configured (set-up failed).
    disabled: Option<String>,
    executor: Option<Arc<dyn Executor>>,
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commands")
            .field("device", &self.device)
            .field("counter_path", &self.counter_path)
            .finish_non_exhaustive()
    }
}

impl Commands {
    /// Loads the directive public keys (`.pub` files; none: every directive is refused) and
    /// the last accepted counter from `<state_dir>/directive-counter.json` (absent: 0).
    pub fn open(
        device: &str,
        keys: &[PathBuf],
        state_dir: &Path,
        events: EventFn,
    ) -> Result<Commands, CommandError> {
        let mut loaded = Vec::with_capacity(keys.len());
        for p in keys {
            let key = PublicKey::load(p).map_err(|e| CommandError::Key {
                path: p.display().to_string(),
                message: e.to_string(),
            })?;
            loaded.push(key);
        }
        let verifier = (!loaded.is_empty()).then(|| DirectiveVerifier::new(loaded));
        let counter_path = state_dir.join(COUNTER_FILE);
        let last = read_counter(&counter_path)?;
        Ok(Commands {
            device: device.to_string(),
            verifier,
            counter: Mutex::new(CounterRule::new(last)),
            counter_path,
            events,
            disabled: None,
            executor: None,
        })
    }

    /// Carries out install and rollback directives with `executor`.
    pub fn with_executor(mut self, executor: Arc<dyn Executor>) -> Commands {
        self.executor = Some(executor);
        self
    }

    /// A handler that refuses every directive because setting up failed (`reason`: a bad key
    /// or counter file); unsigned pings are still answered.
    pub fn disabled(device: &str, reason: String, events: EventFn) -> Commands {
        Commands {
            device: device.to_string(),
            verifier: None,
            counter: Mutex::new(CounterRule::new(u64::MAX)),
            counter_path: PathBuf::new(),
            events,
            disabled: Some(reason),
            executor: None,
        }
    }

    /// The highest directive counter accepted so far.
    pub fn last_counter(&self) -> u64 {
        self.rule().last()
    }

    fn rule(&self) -> std::sync::MutexGuard<'_, CounterRule> {
        self.counter.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reply to one payload on the commands topic (may block on an fsync: call it off
    /// the event loop).
    pub fn answer(&self, payload: &[u8], now_ms: u64) -> wire::CommandReply {
        if !directive::is_signed_directive(payload) {
            return answer_command(payload);
        }
        let claimed = directive::unverified_id(payload).unwrap_or_default();
        let refuse = |reason: &str, error: String| {
            (self.events)(
                "directive_rejected",
                json!({"reason": reason, "id": claimed, "error": error}),
            );
            reply(&claimed, Err(error))
        };
        let Some(verifier) = &self.verifier else {
            return match &self.disabled {
                Some(why) => refuse(
                    "directives_disabled",
                    format!("directive refused: directives are disabled on this agent: {why}"),
                ),
                None => refuse(
                    "no_directive_keys",
                    "directive refused: this agent has no fleet directive key \
                     (sync.directive_keys)"
                        .into(),
                ),
            };
        };
        // One directive at a time: the check and the counter update are one step.
        let mut rule = self.rule();
        let d = match verifier.verify(payload, &self.device, now_ms, rule.last()) {
            Ok(d) => d,
            Err(e) => return refuse(e.event_reason(), format!("directive refused: {e}")),
        };
        if let Err(e) = write_counter(&self.counter_path, d.counter) {
            tracing::error!(error = %e, "directive counter not saved; directive not carried out");
            return reply(
                &d.id,
                Err(format!(
                    "directive {} not carried out: cannot save the counter: {e}",
                    d.id
                )),
            );
        }
        if let Err(e) = rule.accept(d.counter) {
            return refuse("replayed", format!("directive refused: {e}"));
        }
        drop(rule);
        (self.events)(
            "directive_accepted",
            json!({"id": d.id, "counter": d.counter, "action": d.action.name()}),
        );
        let Some(executor) = &self.executor else {
            return match d.action {
                Action::Ping {} => reply(&d.id, Ok(())),
                other => reply(
                    &d.id,
                    Err(format!(
                        "directive {} verified, but {:?} is not carried out by this handler",
                        d.id,
                        other.name()
                    )),
                ),
            };
        };
        match d.action {
            Action::Ping {} => reply(&d.id, Ok(())),
            Action::Install {
                model,
                version,
                release,
                bundle_sha256,
                bundle_bytes,
            } => {
                let job = crate::download::Job {
                    directive: d.id.clone(),
                    model,
                    version,
                    release,
                    sha256: bundle_sha256,
                    bundle_bytes,
                };
                reply(
                    &d.id,
                    executor
                        .install(job)
                        .map_err(|e| format!("directive {}: install refused: {e}", d.id)),
                )
            }
            Action::Rollback {
                model,
                to_release,
                reason,
            } => reply(
                &d.id,
                executor
                    .rollback(&d.id, &model, to_release, &reason)
                    .map(|_| ())
                    .map_err(|e| format!("directive {}: rollback refused: {e}", d.id)),
            ),
        }
    }
}

fn reply(id: &str, result: Result<(), String>) -> wire::CommandReply {
    wire::CommandReply {
        v: wire::VERSION,
        id: id.to_string(),
        ok: result.is_ok(),
        error: result.err(),
    }
}

/// The reply to an unsigned command: ping is answered; install and rollback need a signed
/// directive (refused); unknown or malformed commands are refused, naming the problem.
pub fn answer_command(payload: &[u8]) -> wire::CommandReply {
    let id = serde_json::from_slice::<Value>(payload)
        .ok()
        .and_then(|v| v.get("id").and_then(|i| i.as_str()).map(str::to_string))
        .unwrap_or_default();
    match wire::parse_command(payload) {
        Ok(c) => match c.body {
            wire::CommandBody::Ping => reply(&c.id, Ok(())),
            other => {
                let error = format!(
                    "command {:?} is not supported by this agent yet (installs and rollbacks \
                     from the fleet come as signed directives)",
                    other.name()
                );
                reply(&c.id, Err(error))
            }
        },
        Err(e) => reply(&id, Err(e.to_string())),
    }
}

fn read_counter(path: &Path) -> Result<u64, CommandError> {
    let bad = |message: String| CommandError::Counter {
        path: path.display().to_string(),
        message,
    };
    let bytes = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(bad(e.to_string())),
        Ok(m) if m.len() > MAX_COUNTER_FILE => {
            return Err(bad(format!("{} bytes, more than a counter file", m.len())))
        }
        Ok(_) => std::fs::read(path).map_err(|e| bad(e.to_string()))?,
    };
    let f: CounterFileV1 = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if f.v != 1 {
        return Err(bad(format!("format v{}, expected 1", f.v)));
    }
    Ok(f.last)
}

fn write_counter(path: &Path, last: u64) -> std::io::Result<()> {
    let body = serde_json::to_vec(&CounterFileV1 { v: 1, last })
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    shared::trust::write_atomic(path, &body, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::directive::{Directive, DirectiveSigner};
    use shared::trust::SecretKey;

    const NOW: u64 = 1_767_225_600_000;

    struct Fixture {
        _tmp: tempfile::TempDir,
        state: PathBuf,
        keys: Vec<PathBuf>,
        signer: DirectiveSigner,
        events: Arc<Mutex<Vec<(String, Value)>>>,
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([7u8; 32]);
        let pub_path = tmp.path().join("fleet-directive.pub");
        std::fs::write(&pub_path, key.public().to_file_bytes()).unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        Fixture {
            state,
            keys: vec![pub_path],
            signer: DirectiveSigner::new(key),
            events: Arc::default(),
            _tmp: tmp,
        }
    }

    impl Fixture {
        fn open(&self) -> Commands {
            let ev = self.events.clone();
            let events: EventFn = Arc::new(move |name: &str, detail: Value| {
                ev.lock().unwrap().push((name.to_string(), detail));
            });
            Commands::open("press-07", &self.keys, &self.state, events).unwrap()
        }

        fn payload(&self, device: &str, counter: u64, issued: u64, action: Action) -> Vec<u8> {
            let d = Directive::new(
                device,
                counter,
                format!("d-{counter}"),
                issued,
                60_000,
                action,
            );
            self.signer.sign_payload(&d).unwrap()
        }

        fn last_event(&self) -> (String, Value) {
            self.events.lock().unwrap().last().cloned().unwrap()
        }
    }

    #[test]
    fn ping_is_accepted_once_and_the_counter_survives_a_restart() {
        let f = fixture();
        let c = f.open();
        let p = f.payload("press-07", 5, NOW, Action::Ping {});
        let r = c.answer(&p, NOW + 10);
        assert!(r.ok, "{r:?}");
        assert_eq!(r.id, "d-5");
        assert_eq!(f.last_event().0, "directive_accepted");
        assert_eq!(c.last_counter(), 5);
        // the same directive again: replayed
        let r = c.answer(&p, NOW + 20);
        assert!(!r.ok);
        assert!(r.error.as_deref().unwrap().contains("replay"), "{r:?}");
        let (name, detail) = f.last_event();
        assert_eq!(
            (name.as_str(), detail["reason"].as_str()),
            ("directive_rejected", Some("replayed"))
        );
        assert_eq!(detail["id"], "d-5");
        // after a restart the counter is still 5
        drop(c);
        let c = f.open();
        assert_eq!(c.last_counter(), 5);
        assert!(!c.answer(&p, NOW + 30).ok);
        assert!(
            c.answer(&f.payload("press-07", 6, NOW, Action::Ping {}), NOW + 40)
                .ok
        );
    }

    #[test]
    fn expired_other_device_and_forged_directives_are_refused_with_events() {
        let f = fixture();
        let c = f.open();
        let cases = [
            (
                f.payload("press-07", 1, NOW, Action::Ping {}),
                NOW + 61_000,
                "expired",
            ),
            (
                f.payload("press-08", 2, NOW, Action::Ping {}),
                NOW,
                "other_device",
            ),
            (
                {
                    let mut p = f.payload("press-07", 3, NOW, Action::Ping {});
                    let i = p.len() / 3;
                    p[i] ^= 0x01;
                    p
                },
                NOW,
                "",
            ),
        ];
        for (payload, now, reason) in cases {
            let r = c.answer(&payload, now);
            assert!(!r.ok, "{r:?}");
            let (name, detail) = f.last_event();
            assert_eq!(name, "directive_rejected");
            if !reason.is_empty() {
                assert_eq!(detail["reason"], reason, "{detail}");
            } else {
                let why = detail["reason"].as_str().unwrap();
                assert!(["bad_signature", "malformed"].contains(&why), "{detail}");
            }
        }
        // nothing was accepted: the counter did not move and no file was written
        assert_eq!(c.last_counter(), 0);
        assert!(!f.state.join(COUNTER_FILE).exists());
        // a key that is not a directive key
        let other = DirectiveSigner::new(SecretKey::from_seed([9u8; 32]));
        let d = Directive::new("press-07", 4, "d-4", NOW, 60_000, Action::Ping {});
        let r = c.answer(&other.sign_payload(&d).unwrap(), NOW);
        assert!(!r.ok);
        assert_eq!(f.last_event().1["reason"], "unknown_key");
    }

    #[test]
    fn install_verifies_but_is_not_carried_out_yet_and_without_keys_directives_are_refused() {
        let f = fixture();
        let c = f.open();
        let install = Action::Install {
            model: "pdm-failure".into(),
            version: "1.3.0".into(),
            release: 4,
            bundle_sha256: "9f".repeat(32),
            bundle_bytes: 1000,
        };
        let r = c.answer(&f.payload("press-07", 9, NOW, install), NOW);
        assert!(!r.ok);
        assert!(
            r.error.as_deref().unwrap().contains("not carried out"),
            "{r:?}"
        );
        assert_eq!(c.last_counter(), 9, "the counter is recorded first");
        let ev = f.events.clone();
        let events: EventFn =
            Arc::new(move |n: &str, d: Value| ev.lock().unwrap().push((n.into(), d)));
        let none = Commands::open("press-07", &[], &f.state, events).unwrap();
        let r = none.answer(&f.payload("press-07", 10, NOW, Action::Ping {}), NOW);
        assert!(!r.ok);
        assert_eq!(f.last_event().1["reason"], "no_directive_keys");
        // unsigned ping still works; unsigned install is refused
        assert!(none.answer(br#"{"v":1,"id":"c1","cmd":"ping"}"#, NOW).ok);
        let r = none.answer(
            br#"{"v":1,"id":"c2","cmd":"rollback","model":"pdm-failure"}"#,
            NOW,
        );
        assert!(!r.ok && r.id == "c2", "{r:?}");
    }

    /// Records what it was asked; refuses rollbacks of unknown models.
    #[derive(Default)]
    struct FakeExecutor {
        installs: Mutex<Vec<crate::download::Job>>,
    }

    impl Executor for FakeExecutor {
        fn install(&self, job: crate::download::Job) -> Result<(), String> {
            if job.bundle_bytes > 1000 {
                return Err(format!("bundle of {} bytes is too large", job.bundle_bytes));
            }
            self.installs.lock().unwrap().push(job);
            Ok(())
        }

        fn rollback(
            &self,
            _directive: &str,
            model: &str,
            _to: Option<u64>,
            _reason: &str,
        ) -> Result<String, String> {
            if model == "pdm-failure" {
                Ok("rolled back".into())
            } else {
                Err(format!("model {model:?} is not installed"))
            }
        }
    }

    #[test]
    fn install_and_rollback_directives_go_to_the_executor() {
        let f = fixture();
        let exec = Arc::new(FakeExecutor::default());
        let c = f.open().with_executor(exec.clone());
        let install = |bytes: u64| Action::Install {
            model: "pdm-failure".into(),
            version: "1.3.0".into(),
            release: 4,
            bundle_sha256: "9f".repeat(32),
            bundle_bytes: bytes,
        };
        let r = c.answer(&f.payload("press-07", 1, NOW, install(900)), NOW);
        assert!(r.ok && r.id == "d-1", "{r:?}");
        let jobs = exec.installs.lock().unwrap().clone();
        assert_eq!(jobs.len(), 1);
        assert_eq!(
            (
                jobs[0].directive.as_str(),
                jobs[0].model.as_str(),
                jobs[0].release,
                jobs[0].bundle_bytes
            ),
            ("d-1", "pdm-failure", 4, 900)
        );
        assert_eq!(jobs[0].source(), "fleet:d-1");
        let r = c.answer(&f.payload("press-07", 2, NOW, install(5000)), NOW);
        assert!(!r.ok);
        assert!(r.error.as_deref().unwrap().contains("too large"), "{r:?}");
        let rollback = |model: &str| Action::Rollback {
            model: model.into(),
            to_release: None,
            reason: "canary failed".into(),
        };
        let r = c.answer(&f.payload("press-07", 3, NOW, rollback("pdm-failure")), NOW);
        assert!(r.ok, "{r:?}");
        let r = c.answer(&f.payload("press-07", 4, NOW, rollback("other")), NOW);
        assert!(!r.ok && r.id == "d-4");
        assert!(r.error.unwrap().contains("not installed"));
        // a replayed install is refused before the executor sees it
        let r = c.answer(&f.payload("press-07", 1, NOW, install(900)), NOW);
        assert!(!r.ok && r.error.unwrap().contains("replay"));
        assert_eq!(exec.installs.lock().unwrap().len(), 1);
    }

    #[test]
    fn bad_key_and_counter_files_are_named() {
        let f = fixture();
        let ev: EventFn = Arc::new(|_: &str, _: Value| {});
        let missing = vec![f.state.join("nope.pub")];
        let e = Commands::open("press-07", &missing, &f.state, ev.clone()).unwrap_err();
        assert!(e.to_string().contains("nope.pub"), "{e}");
        std::fs::write(f.state.join(COUNTER_FILE), b"{\"v\":1,\"last\":\"x\"}").unwrap();
        let e = Commands::open("press-07", &f.keys, &f.state, ev).unwrap_err();
        assert!(e.to_string().contains(COUNTER_FILE), "{e}");
    }

    #[test]
    fn commands_are_answered_or_refused() {
        let r = answer_command(br#"{"v":1,"id":"p1","cmd":"ping"}"#);
        assert!(r.ok && r.id == "p1");
        let r = answer_command(br#"{"v":1,"id":"x1","cmd":"format-disk"}"#);
        assert!(!r.ok && r.id == "x1");
        assert!(r.error.unwrap().contains("format-disk"));
        let r = answer_command(br#"{"v":1,"id":"r1","cmd":"rollback","model":"m"}"#);
        assert!(!r.ok && r.error.unwrap().contains("signed directives"));
        let r = answer_command(b"garbage");
        assert!(!r.ok && r.id.is_empty());
    }
}
