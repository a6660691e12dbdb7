//! `edge-agent run`: the service. Opens the store, loads the active models, serves HTTP,
//! installs bundles from the inbox, the admin socket and fleet directives (downloaded over
//! MQTT, `crate::download`), watches health windows and rolls back, talks to systemd; one
//! shutdown path (cancellation token, drain within a deadline).
//!
//! Every source goes through the same pipeline ([`Ctx::install`]); the events of an install
//! or rollback a fleet directive asked for carry its id (`directive`), model and release,
//! and the retained birth is republished whenever an active version or its phase changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::runtime::{
    self, judge, Candidate, CandidateMode, Health, HealthPolicy, Loaded, Registry,
};
use crate::store::{InstallMode, Store, StoreConfig, StoreError};

/// How long in-flight requests get to finish after a shutdown request.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(10);
/// Largest admin-socket request line.
const MAX_ADMIN_LINE: usize = 64 * 1024;

/// Install, rejection and rollback counts by reason (for `/metrics`).
#[derive(Debug, Default)]
pub struct LifecycleCounters {
    pub installs: AtomicU64,
    /// reason -> count
    pub rejections: Mutex<BTreeMap<String, u64>>,
    pub rollbacks: Mutex<BTreeMap<String, u64>>,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: &str) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key.to_string()).or_default() += 1;
    }
}

/// Everything the HTTP handlers share.
#[derive(Debug)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub config: Config,
    pub device_id: String,
    /// True once the active models are loaded and the listener is bound.
    pub ready: AtomicBool,
    pub lifecycle: LifecycleCounters,
    pub mqtt: Arc<crate::mqtt::MqttCounters>,
    /// Runs inference for the HTTP and MQTT APIs.
    pub pool: Arc<crate::pool::ScoringPool>,
    /// The outbox of records for the fleet.
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Recent predictions and their ground truth.
    pub feedback: Arc<crate::feedback::Feedback>,
    pub sync: Arc<crate::sync::SyncCounters>,
    /// The latest system health sample.
    pub health_sample: Arc<Mutex<Option<crate::system::HealthSample>>>,
}

impl AppState {
    /// Makes `l` the active version of its model (a pointer swap) and registers it with the
    /// feedback loop.
    pub fn activate(&self, l: Arc<Loaded>) {
        self.feedback
            .register(&l.feedback_key, (*l.feedback_spec).clone());
        self.registry.activate(l);
    }

    /// The status block of the outbox and the sync (for `status --json` and the socket).
    pub fn telemetry_status(&self) -> serde_json::Value {
        crate::metrics::telemetry_json(self)
    }
}

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(String),
}

/// A short machine-friendly reason key for counters.
fn reason_key(e: &StoreError) -> &'static str {
    match e {
        StoreError::Rejected(_) => "rejected",
        StoreError::Incompatible(_) => "incompatible",
        StoreError::Golden(_) => "golden",
        StoreError::Trust(_) => "trust",
        _ => "io",
    }
}

/// The fleet directive the current thread is carrying out (an install or a rollback): the
/// store's events emitted on this thread get its id, model and release.
#[derive(Debug, Clone)]
struct FleetOp {
    directive: String,
    model: String,
    release: Option<u64>,
}

thread_local! {
    static FLEET_OP: std::cell::RefCell<Option<FleetOp>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with `op` as this thread's fleet directive.
fn with_fleet_op<T>(op: FleetOp, f: impl FnOnce() -> T) -> T {
    FLEET_OP.with(|c| *c.borrow_mut() = Some(op));
    let out = f();
    FLEET_OP.with(|c| *c.borrow_mut() = None);
    out
}

/// Adds the current fleet directive (if any) to a store event: `(model, detail)`.
fn tag_event(model: &str, detail: &serde_json::Value) -> (String, serde_json::Value) {
    let op = FLEET_OP.with(|c| c.borrow().clone());
    let mut detail = detail.clone();
    let Some(op) = op else {
        return (model.to_string(), detail);
    };
    if !model.is_empty() && model != op.model {
        return (model.to_string(), detail);
    }
    if let Some(m) = detail.as_object_mut() {
        m.insert("directive".into(), serde_json::json!(op.directive));
        m.entry("model")
            .or_insert_with(|| serde_json::json!(op.model));
        if let Some(r) = op.release {
            m.entry("release").or_insert_with(|| serde_json::json!(r));
        }
    }
    (op.model, detail)
}

struct Ctx {
    store: Mutex<Store>,
    state: Arc<AppState>,
    policy: HealthPolicy,
    /// Notified when an active version or its phase changed (the sync republishes the birth).
    birth_changed: Arc<Notify>,
}

impl Ctx {
    /// The active version of `name` as stored, ready to serve (no latency baseline: after a
    /// restart or a rollback the health window judges errors and NaN only).
    fn load(&self, name: &str) -> Result<Arc<Loaded>, StoreError> {
        Ok(Arc::new(self.load_version(name)?))
    }

    fn load_version(&self, name: &str) -> Result<Loaded, StoreError> {
        let (manifest, model) = self.store()?.load_active(name)?;
        let mut l = Loaded::new(manifest, model);
        l.range_margin = self.state.config.inputs.margin();
        Ok(l)
    }

    /// The newly activated version of `name`, with the latency baseline its health window
    /// compares against, taken from the version serving until now (if any): that version's
    /// live p99 CPU time per row when it answered at least [`runtime::MIN_FOR_P99`]
    /// requests (live against live), else both versions' single-row p99 CPU time measured
    /// side by side now (`store::paired_p99`, at most `install.latency_runs` pairs and 2 s).
    /// Never an old install-time figure against live latency, and never wall-clock time:
    /// other load on the device would make either a false rollback.
    fn load_replacing(&self, name: &str) -> Result<Arc<Loaded>, StoreError> {
        let outgoing = self.state.registry.get(name);
        let mut l = self.load_version(name)?;
        if let Some(old) = outgoing {
            let live = (old.counters.ok.load(Ordering::Relaxed) >= runtime::MIN_FOR_P99)
                .then(|| old.counters.cpu_quantile_us(0.99))
                .flatten();
            match live {
                Some(p99) => l.baseline_p99_us = Some(p99.max(1)),
                None => {
                    match crate::store::paired_p99(
                        (&old.model, &old.manifest),
                        (&l.model, &l.manifest),
                        self.state.config.install.latency_runs,
                        Duration::from_secs(2),
                    ) {
                        Ok(p) => l.activation_p99_us = p,
                        Err(e) => {
                            tracing::warn!(model = name, error = %e, "latency not compared at activation")
                        }
                    }
                }
            }
        }
        Ok(Arc::new(l))
    }

    fn store(&self) -> Result<std::sync::MutexGuard<'_, Store>, StoreError> {
        self.store.lock().map_err(|_| StoreError::Io {
            path: "store".into(),
            message: "lock poisoned".into(),
        })
    }

    /// Loads the candidate of `name` (if any) into the registry.
    fn load_candidate(&self, name: &str) -> Result<(), StoreError> {
        let c = self.store()?.load_candidate(name)?;
        let candidate = c.map(|(rec, manifest, model)| {
            let mode = if rec.mode == "split" {
                CandidateMode::Split(rec.percent)
            } else {
                CandidateMode::Shadow
            };
            let mut l = Loaded::new(manifest, model);
            l.range_margin = self.state.config.inputs.margin();
            self.state
                .feedback
                .register(&l.feedback_key, (*l.feedback_spec).clone());
            Candidate::new(Arc::new(l), mode)
        });
        self.state.registry.set_candidate(name, candidate);
        Ok(())
    }

    /// Installs a bundle and activates it in the registry.
    fn install(&self, path: &Path, source: &str) -> Result<String, StoreError> {
        self.install_as(path, source, InstallMode::Activate)
    }

    /// Installs a bundle as the active version or as a shadow/split candidate.
    fn install_as(
        &self,
        path: &Path,
        source: &str,
        mode: InstallMode,
    ) -> Result<String, StoreError> {
        let report = self.store()?.install_as(path, source, mode);
        match report {
            Ok(r) if mode != InstallMode::Activate => {
                self.load_candidate(&r.name)?;
                self.state
                    .lifecycle
                    .installs
                    .fetch_add(1, Ordering::Relaxed);
                self.birth_changed.notify_one();
                tracing::info!(model = %r.name, release = r.release, source, ?mode, "installed as a candidate");
                Ok(format!(
                    "installed {} release {} as {}",
                    r.name,
                    r.release,
                    match mode {
                        InstallMode::Shadow => "a shadow".to_string(),
                        InstallMode::Split(p) => format!("a {p}% split"),
                        InstallMode::Activate => String::new(),
                    }
                ))
            }
            Ok(r) => {
                let loaded = self.load_replacing(&r.name)?;
                self.state.activate(loaded);
                self.state.registry.set_candidate(&r.name, None);
                self.state
                    .lifecycle
                    .installs
                    .fetch_add(1, Ordering::Relaxed);
                self.birth_changed.notify_one();
                tracing::info!(model = %r.name, release = r.release, source, "installed and activated");
                Ok(format!("installed {} release {}", r.name, r.release))
            }
            Err(e) => {
                bump(&self.state.lifecycle.rejections, reason_key(&e));
                tracing::warn!(bundle = %path.display(), source, error = %e, "install rejected");
                Err(e)
            }
        }
    }

    /// One pass over the models in their health window: commit or roll back.
    fn check_health(&self) {
        let states = match self.store.lock().map(|s| s.status()) {
            Ok(Ok(s)) => s,
            _ => return,
        };
        for s in states.into_iter().filter(|s| s.phase == "health_window") {
            let Some(l) = self.state.registry.get(&s.name) else {
                continue;
            };
            if l.release != s.active.release {
                continue;
            }
            match judge(&l, &self.policy) {
                Health::Pending => {}
                Health::Healthy => {
                    if let Ok(store) = self.store.lock() {
                        if let Err(e) = store.commit(&s.name) {
                            tracing::error!(model = %s.name, error = %e, "commit failed");
                        }
                    }
                    self.birth_changed.notify_one();
                }
                Health::Breach(reason) => {
                    tracing::warn!(model = %s.name, release = l.release, %reason, "health breach: rolling back");
                    let rolled = self.store.lock().map_err(|_| ()).and_then(|st| {
                        st.rollback(&s.name, &reason).map_err(|e| {
                            tracing::error!(model = %s.name, error = %e, "rollback failed");
                        })
                    });
                    if rolled.is_ok() {
                        bump(&self.state.lifecycle.rollbacks, health_reason_key(&reason));
                        match self.load(&s.name) {
                            Ok(prev) => {
                                self.state.activate(prev);
                            }
                            Err(e) => {
                                tracing::error!(model = %s.name, error = %e, "loading the previous version failed")
                            }
                        }
                        self.birth_changed.notify_one();
                    }
                }
            }
        }
    }

    /// Makes the previous version of `model` active again, in the store and in memory (the
    /// operator's `edge-agent rollback`, and fleet rollback directives).
    fn rollback(&self, model: &str, reason: &str, kind: &str) -> Result<String, StoreError> {
        let st = self.store()?.rollback(model, reason)?;
        bump(&self.state.lifecycle.rollbacks, kind);
        let loaded = self.load(model);
        if let Ok(l) = &loaded {
            self.state.activate(l.clone());
        }
        self.birth_changed.notify_one();
        loaded?;
        Ok(format!(
            "{model}: release {} active again",
            st.active.release
        ))
    }

    /// Installs a bundle a fleet directive had downloaded (the same pipeline as the inbox,
    /// source `fleet:<directive id>`; its events carry the directive).
    fn fleet_install(&self, job: &crate::download::Job, path: &Path) {
        let op = FleetOp {
            directive: job.directive.clone(),
            model: job.model.clone(),
            release: Some(job.release),
        };
        let result = with_fleet_op(op, || self.install(path, &job.source()));
        if let Err(e) = result {
            tracing::warn!(directive = %job.directive, model = %job.model, error = %e, "fleet install rejected");
        }
    }

    /// Whether `job`'s model already runs its release; if so and it is committed, says so
    /// again (`committed` with the directive), since the fleet waits for it.
    fn already_active(&self, job: &crate::download::Job) -> bool {
        let root = match self.store() {
            Ok(s) => s.root().to_path_buf(),
            Err(_) => return false,
        };
        let Ok(states) = crate::store::status_of(&root) else {
            return false;
        };
        let Some(s) = states.into_iter().find(|s| s.name == job.model) else {
            return false;
        };
        if s.active.release != job.release {
            return false;
        }
        if s.phase == "committed" {
            if let Ok(store) = self.store() {
                store.event(
                    &job.model,
                    "committed",
                    serde_json::json!({"release": job.release, "directive": job.directive}),
                );
            }
        }
        true
    }

    /// Installs every `*.bundle` in the inbox (a file counts once renamed to `.bundle`);
    /// moves it to `inbox/done/` or `inbox/rejected/` (with a `.reason` file).
    fn scan_inbox(&self, inbox: &Path) {
        let Ok(entries) = std::fs::read_dir(inbox) else {
            return;
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "bundle"))
            .collect();
        files.sort();
        for f in files {
            let result = self.install(&f, "inbox");
            let (sub, note) = match &result {
                Ok(msg) => ("done", msg.clone()),
                Err(e) => ("rejected", e.to_string()),
            };
            let dir = inbox.join(sub);
            let _ = std::fs::create_dir_all(&dir);
            if let Some(name) = f.file_name() {
                let target = dir.join(name);
                let _ = std::fs::rename(&f, &target);
                let _ = std::fs::write(
                    dir.join(format!("{}.reason", name.to_string_lossy())),
                    note + "\n",
                );
            }
        }
    }
}

fn admin_kind(e: &StoreError) -> &'static str {
    match e {
        StoreError::UnknownModel(_) | StoreError::NoPrevious(_) => "usage",
        other => reason_key(other),
    }
}

fn health_reason_key(reason: &str) -> &'static str {
    if reason.contains("NaN") {
        "nan"
    } else if reason.contains("latency") {
        "latency"
    } else if reason.contains("error rate") {
        "errors"
    } else {
        "other"
    }
}

/// Sends a notification to systemd (`READY=1`, `WATCHDOG=1`, `STOPPING=1`) when run under a
/// `Type=notify` unit.
pub fn sd_notify(msg: &str) {
    #[cfg(unix)]
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = match std::os::unix::net::UnixDatagram::unbound() {
            Ok(s) => s,
            Err(_) => return,
        };
        // never block the runtime on a full notification queue
        if sock.set_nonblocking(true).is_err() {
            return;
        }
        let p = PathBuf::from(&path);
        if p.to_string_lossy().starts_with('@') {
            // abstract sockets need platform-specific addresses; not used by systemd's default
            return;
        }
        let _ = sock.send_to(msg.as_bytes(), p);
    }
}

/// Runs the service until `shutdown` resolves. `listener` is bound by the caller (tests use
/// `127.0.0.1:0`).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServiceError> {
    crate::telemetry::started_at_ms();
    let mut store = Store::open(&StoreConfig {
        root: config.state_dir.clone(),
        trust_root: config.trust_root.clone(),
        keyring: config.keyring.clone(),
        max_bundle_bytes: config.install.max_bundle_bytes,
        latency_runs: config.install.latency_runs,
    })?;
    let registry = Arc::new(Registry::default());
    let telemetry = Arc::new(
        crate::telemetry::Telemetry::open(&config, store.root())
            .map_err(|e| ServiceError::Io(format!("outbox: {e}")))?,
    );
    let feedback = Arc::new(
        crate::feedback::Feedback::new(config.feedback.clone())
            .map_err(|e| ServiceError::Io(e.to_string()))?,
    );
    {
        // store events (installs, rollbacks, commits...) also go to the fleet
        let t = telemetry.clone();
        store.set_event_tagger(Arc::new(tag_event));
        store.set_event_sink(Arc::new(
            move |model: &str, event: &str, detail: &serde_json::Value| {
                t.event(model, event, detail.clone())
            },
        ));
    }
    let policy = HealthPolicy {
        window: Duration::from_secs(config.health.window_secs),
        min_predictions: config.health.min_predictions,
        max_error_rate: config.health.max_error_rate,
        max_nan_rate: config.health.max_nan_rate,
        max_p99_ratio: config.health.max_p99_ratio,
    };
    let state = Arc::new(AppState {
        registry: registry.clone(),
        device_id: config.device_id(),
        config: config.clone(),
        ready: AtomicBool::new(false),
        lifecycle: LifecycleCounters::default(),
        mqtt: Arc::new(crate::mqtt::MqttCounters::default()),
        pool: Arc::new(
            crate::pool::ScoringPool::new(config.http.scoring_threads, crate::http::MAX_IN_FLIGHT)
                .map_err(|e| ServiceError::Io(format!("cannot start the scoring threads: {e}")))?,
        ),
        telemetry: telemetry.clone(),
        feedback,
        sync: Arc::new(crate::sync::SyncCounters::default()),
        health_sample: Arc::new(Mutex::new(None)),
    });
    let root = store.root().to_path_buf();
    let birth_changed = Arc::new(Notify::new());
    let ctx = Arc::new(Ctx {
        store: Mutex::new(store),
        state: state.clone(),
        policy,
        birth_changed: birth_changed.clone(),
    });
    // Load every active model; one that fails to load is rolled back to its previous version.
    let statuses = ctx
        .store
        .lock()
        .map(|s| s.status())
        .map_err(|_| ServiceError::Io("store lock".into()))??;
    for s in statuses {
        match ctx.load(&s.name) {
            Ok(l) => {
                state.activate(l);
                if let Err(e) = ctx.load_candidate(&s.name) {
                    tracing::error!(model = %s.name, error = %e, "candidate does not load; ignored");
                }
            }
            Err(e) => {
                tracing::error!(model = %s.name, error = %e, "active version does not load; rolling back");
                let ok = ctx
                    .store
                    .lock()
                    .map(|st| st.rollback(&s.name, &format!("does not load: {e}")).is_ok())
                    .unwrap_or(false);
                if ok {
                    if let Ok(l) = ctx.load(&s.name) {
                        state.activate(l);
                    }
                }
            }
        }
    }

    let token = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();

    // Inbox and health window: one blocking worker, once a second.
    {
        let (ctx, token) = (ctx.clone(), token.clone());
        let inbox = root.join("inbox");
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        let (c, i) = (ctx.clone(), inbox.clone());
                        let _ = tokio::task::spawn_blocking(move || {
                            c.scan_inbox(&i);
                            c.check_health();
                        }).await;
                    }
                }
            }
        });
    }

    // Admin socket: one JSON request per line ({"op":"install","path":...}).
    #[cfg(unix)]
    {
        let sock_path = root.join("agent.sock");
        let _ = std::fs::remove_file(&sock_path);
        let admin = tokio::net::UnixListener::bind(&sock_path)
            .map_err(|e| ServiceError::Io(format!("{}: {e}", sock_path.display())))?;
        let (ctx, token) = (ctx.clone(), token.clone());
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    conn = admin.accept() => {
                        let Ok((stream, _)) = conn else { continue };
                        let ctx = ctx.clone();
                        tokio::spawn(async move { let _ = admin_conn(stream, ctx).await; });
                    }
                }
            }
            let _ = std::fs::remove_file(&sock_path);
        });
    }

    // Inference over the plant's MQTT broker (none configured: local mode).
    if let Some(m) = config.mqtt.clone() {
        let client_id = m
            .client_id
            .clone()
            .unwrap_or_else(|| format!("edge-agent-{}", state.device_id));
        tasks.spawn(crate::mqtt::run(
            m,
            client_id,
            registry.clone(),
            state.pool.clone(),
            state.mqtt.clone(),
            mqtt_feedback_hooks(&state),
            token.clone(),
        ));
    }

    // Records for the fleet: telemetry/drift/feedback windows and health samples.
    {
        let producer = Arc::new(Mutex::new(crate::telemetry::Producer::new(
            state.clone(),
            &root,
        )));
        let token = token.clone();
        let window = Duration::from_secs(config.telemetry.window_secs);
        let health = Duration::from_secs(config.telemetry.health_secs);
        tasks.spawn(async move {
            let mut window_tick =
                tokio::time::interval_at(tokio::time::Instant::now() + window, window);
            let mut health_tick = tokio::time::interval(health);
            window_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            health_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let cut_window = tokio::select! {
                    _ = token.cancelled() => break,
                    _ = window_tick.tick() => true,
                    _ = health_tick.tick() => false,
                };
                let p = producer.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Ok(mut p) = p.lock() {
                        if cut_window {
                            p.window()
                        } else {
                            p.health()
                        }
                    }
                })
                .await;
            }
            // the last partial window is produced before the store is flushed
            let p = producer.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Ok(mut p) = p.lock() {
                    p.window();
                }
            })
            .await;
        });
    }

    // Sync of the outbox to the fleet broker, fleet directives and bundle downloads.
    let mut downloads: Option<Arc<crate::download::Downloads>> = None;
    if let (Some(sync), Some(outbox)) = (config.sync.clone(), telemetry.outbox().cloned()) {
        let st = state.clone();
        let state_dir = root.clone();
        let status: Arc<dyn Fn() -> shared::wire::Birth + Send + Sync> = Arc::new(move || {
            let phases: BTreeMap<String, String> = crate::store::status_of(&state_dir)
                .map(|v| v.into_iter().map(|s| (s.name, s.phase)).collect())
                .unwrap_or_default();
            crate::telemetry::birth(&st.device_id, &st.registry, &st.config.device.tags, &phases)
        });
        let st = state.clone();
        let events: crate::command::EventFn = Arc::new(move |name: &str, detail| {
            st.telemetry.event("", name, detail);
        });
        let commands = match crate::command::Commands::open(
            &state.device_id,
            &sync.directive_keys,
            &config.state_dir,
            events.clone(),
        ) {
            Ok(c) => c,
            Err(e) => {
                // telemetry still flows; directives are refused until this is fixed
                tracing::error!(error = %e, "fleet directives disabled");
                crate::command::Commands::disabled(&state.device_id, e.to_string(), events)
            }
        };
        let commands = match start_downloads(&ctx, &config, &root) {
            Ok(d) => {
                downloads = Some(d.clone());
                commands.with_executor(Arc::new(FleetExecutor {
                    ctx: ctx.clone(),
                    downloads: d,
                }))
            }
            Err(e) => {
                // directives are still verified and answered: install and rollback refused
                tracing::error!(error = %e, "bundle downloads unavailable");
                commands
            }
        };
        let hooks = crate::sync::SyncHooks {
            status,
            commands: Arc::new(commands),
        };
        let extras = crate::sync::SyncExtras {
            downloads: downloads.clone(),
            birth_changed: Some(birth_changed.clone()),
        };
        let (counters, wake, token) = (state.sync.clone(), telemetry.wake.clone(), token.clone());
        let device = state.device_id.clone();
        tasks.spawn(async move {
            if let Err(e) =
                crate::sync::run_with(sync, device, outbox, hooks, extras, counters, wake, token)
                    .await
            {
                tracing::error!(error = %e, "sync stopped");
            }
        });
    }

    // Watchdog pings.
    if let Some(usec) = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let token = token.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(
                Duration::from_micros(usec / 2).max(Duration::from_millis(100)),
            );
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => sd_notify("WATCHDOG=1"),
                }
            }
        });
    }

    let app = crate::http::router(state.clone());
    state.ready.store(true, Ordering::SeqCst);
    sd_notify("READY=1");
    tracing::info!(addr = ?listener.local_addr().ok(), models = registry.all().len(), "edge-agent ready");

    let server_token = token.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        server_token.cancelled().await;
    });
    let server = tokio::spawn(async move { server.await });

    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    sd_notify("STOPPING=1");
    state.ready.store(false, Ordering::SeqCst);
    token.cancel();
    if tokio::time::timeout(DRAIN_DEADLINE, server).await.is_err() {
        tracing::warn!("drain deadline passed; stopping with requests in flight");
    }
    while tokio::time::timeout(DRAIN_DEADLINE, tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    if let Some(d) = downloads {
        // the worker holds the store; an install in progress finishes first
        let stopped = tokio::task::spawn_blocking(move || d.shutdown());
        if tokio::time::timeout(DRAIN_DEADLINE, stopped).await.is_err() {
            tracing::warn!("drain deadline passed with an install in progress");
        }
    }
    telemetry.flush();
    tracing::info!("stopped");
    Ok(())
}

/// Starts the download worker: its events go through the store (`events.jsonl` and the
/// outbox), finished downloads through [`Ctx::fleet_install`].
fn start_downloads(
    ctx: &Arc<Ctx>,
    config: &Config,
    root: &Path,
) -> Result<Arc<crate::download::Downloads>, crate::download::DownloadError> {
    let c = ctx.clone();
    let event: crate::download::EventFn = Arc::new(move |model: &str, name: &str, detail| {
        if let Ok(store) = c.store() {
            store.event(model, name, detail);
        }
    });
    let c = ctx.clone();
    let install =
        Arc::new(move |job: &crate::download::Job, path: &Path| c.fleet_install(job, path));
    let c = ctx.clone();
    let settled = Arc::new(move |job: &crate::download::Job| c.already_active(job));
    let cfg = crate::download::DownloadConfig {
        dir: root.join(crate::download::DOWNLOADS_DIR),
        max_bytes: config.install.max_download_bytes,
        timeout: Duration::from_secs(config.install.download_timeout_secs),
        retries: config.install.download_retries,
    };
    let hooks = crate::download::Hooks {
        event,
        install,
        settled,
    };
    Ok(Arc::new(crate::download::Downloads::start(cfg, hooks)?))
}

/// Carries out verified fleet directives.
struct FleetExecutor {
    ctx: Arc<Ctx>,
    downloads: Arc<crate::download::Downloads>,
}

impl crate::command::Executor for FleetExecutor {
    fn install(&self, job: crate::download::Job) -> Result<(), String> {
        if let Err(e) = self.downloads.check(&job) {
            let reason = e.to_string();
            if let Ok(store) = self.ctx.store() {
                store.event(
                    &job.model,
                    "install_rejected",
                    serde_json::json!({
                        "source": job.source(), "directive": job.directive,
                        "model": job.model, "release": job.release, "reason": reason,
                    }),
                );
            }
            bump(&self.ctx.state.lifecycle.rejections, "download");
            return Err(reason);
        }
        tracing::info!(directive = %job.directive, model = %job.model, release = job.release, "install directive accepted");
        // the worker checks whether the release already runs, then downloads
        self.downloads.submit(job);
        Ok(())
    }

    fn rollback(
        &self,
        directive: &str,
        model: &str,
        to_release: Option<u64>,
        reason: &str,
    ) -> Result<String, String> {
        let states = self
            .ctx
            .store()
            .and_then(|s| s.status())
            .map_err(|e| e.to_string())?;
        let Some(s) = states.into_iter().find(|s| s.name == model) else {
            return Err(StoreError::UnknownModel(model.to_string()).to_string());
        };
        let Some(prev) = &s.previous else {
            return Err(StoreError::NoPrevious(model.to_string()).to_string());
        };
        if let Some(want) = to_release {
            if want != prev.release {
                return Err(format!(
                    "model {model:?}: to_release {want} is not the previous release {} (active: {})",
                    prev.release, s.active.release
                ));
            }
        }
        self.downloads.cancel_model(
            model,
            format!("cancelled by rollback directive {directive}"),
        );
        let op = FleetOp {
            directive: directive.to_string(),
            model: model.to_string(),
            release: None,
        };
        with_fleet_op(op, || self.ctx.rollback(model, reason, "fleet")).map_err(|e| e.to_string())
    }
}

#[cfg(unix)]
async fn admin_conn(stream: tokio::net::UnixStream, ctx: Arc<Ctx>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r).take(MAX_ADMIN_LINE as u64);
    r.read_line(&mut line).await?;
    let req: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    if req["op"] == "telemetry" {
        let st = ctx.state.clone();
        let t = tokio::task::spawn_blocking(move || st.telemetry_status())
            .await
            .unwrap_or_default();
        let resp = serde_json::json!({"ok": true, "telemetry": t});
        w.write_all(format!("{resp}\n").as_bytes()).await?;
        return Ok(());
    }
    let c = ctx.clone();
    let job = move || -> Result<String, StoreError> {
        let model = req["model"].as_str().unwrap_or_default().to_string();
        match req["op"].as_str() {
            Some("install") => {
                let path = PathBuf::from(req["path"].as_str().unwrap_or_default());
                let mode = match (req["mode"].as_str(), req["percent"].as_u64()) {
                    (Some("shadow"), _) => InstallMode::Shadow,
                    (Some("split"), Some(p)) => InstallMode::Split(p.min(255) as u8),
                    _ => InstallMode::Activate,
                };
                c.install_as(&path, "admin socket", mode)
            }
            Some("rollback") => {
                let reason = req["reason"]
                    .as_str()
                    .unwrap_or("operator request")
                    .to_string();
                c.rollback(&model, &reason, "operator")
            }
            Some("promote") => {
                let st = c.store()?.promote(&model)?;
                let l = c.load_replacing(&model)?;
                c.state.activate(l);
                c.state.registry.set_candidate(&model, None);
                c.birth_changed.notify_one();
                Ok(format!(
                    "{model}: release {} promoted to active",
                    st.active.release
                ))
            }
            Some("drop") => {
                c.store()?.drop_candidate(&model)?;
                c.state.registry.set_candidate(&model, None);
                c.birth_changed.notify_one();
                Ok(format!("{model}: candidate removed"))
            }
            _ => Err(StoreError::Rejected(
                "expected {\"op\": \"install\"|\"rollback\"|\"promote\"|\"drop\", ...}".into(),
            )),
        }
    };
    let resp = match tokio::task::spawn_blocking(job).await {
        Ok(Ok(msg)) => serde_json::json!({"ok": true, "message": msg}),
        Ok(Err(e)) => {
            serde_json::json!({"ok": false, "error": e.to_string(), "kind": admin_kind(&e)})
        }
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string(), "kind": "io"}),
    };
    w.write_all(format!("{resp}\n").as_bytes()).await?;
    Ok(())
}

/// The MQTT task's links to the feedback loop: ground truth from the feedback topic, and the
/// ids and log of the predictions it makes.
fn mqtt_feedback_hooks(state: &Arc<AppState>) -> crate::mqtt::FeedbackHooks {
    let st = state.clone();
    let receive: crate::mqtt::FeedbackHandler =
        Arc::new(move |body: &[u8]| crate::telemetry::receive_feedback(&st, body).1);
    let st = state.clone();
    let log: crate::mqtt::PredictionLog = Arc::new(move |l, rows, outputs| {
        crate::feedback::log_predictions(&st.feedback, l, &st.device_id, rows, outputs)
    });
    crate::mqtt::FeedbackHooks { receive, log }
}
