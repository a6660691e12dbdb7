//! Bundle downloads over MQTT for fleet install directives (`shared::delivery`): the agent
//! asks `<prefix>/<device>/bundle/get` for windows of chunks, verifies every chunk frame
//! received on `<prefix>/<device>/bundle/chunk`, writes it into `<state>/downloads/<sha>.part`
//! and, once the file is whole and its SHA-256 equals the signed `bundle_sha256`, hands it to
//! the install pipeline (the same one as the inbox).
//!
//! Guarantees:
//! - a chunk is written only after its frame decoded (its own SHA-256 checked) and matched
//!   this download (bundle hash, size, chunk size, an index inside the current window not
//!   stored yet); anything else is ignored and counted, never written;
//! - `<sha>.json` (the progress: directive, model, release, size, chunk size, first missing
//!   chunk) is replaced atomically only after the part file was fsynced, so after a kill -9
//!   the download resumes from the first chunk the progress file names (everything before it
//!   is on disk), re-asking for the rest; the crash tests kill the process right there
//!   (`EDGE_AGENT_FAULT=download`: SIGKILL after a window's progress was saved, the download
//!   not complete yet);
//! - a whole file whose SHA-256 differs from the directive's is deleted and never installed;
//!   a download whose bundle is larger than `install.max_download_bytes` or the free disk is
//!   refused before anything is written;
//! - memory is bounded: at most [`QUEUE_FRAMES`] frames wait for the worker (more are dropped
//!   and asked for again), one window of [`MAX_WINDOW`] chunks is outstanding per download;
//! - a download without progress is asked again after `download_timeout_secs` (and at every
//!   reconnect), and given up with `download_failed` after `download_retries` silent
//!   timeouts or an error frame from the fleet; its files are then deleted.
//!
//! One download per model: a directive for another bundle of the same model replaces the
//! pending one (which ends with `download_failed`, reason "superseded ...").

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shared::delivery::{self, ChunkRequest, Frame, MAX_WINDOW};

/// Directory under the state directory.
pub const DOWNLOADS_DIR: &str = "downloads";
/// Most frames waiting for the worker; more are dropped (and asked for again).
pub const QUEUE_FRAMES: usize = 2 * MAX_WINDOW as usize;
/// Largest progress file read.
const MAX_PROGRESS_BYTES: u64 = 16 * 1024;
/// How often the worker looks at timeouts and the link when nothing arrives.
const TICK: Duration = Duration::from_millis(200);
const PROGRESS_FORMAT: u32 = 1;

/// What an accepted install directive asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The directive's id.
    pub directive: String,
    pub model: String,
    pub version: String,
    pub release: u64,
    /// SHA-256 of the whole bundle file (64 lowercase hex digits, checked by the directive).
    pub sha256: String,
    pub bundle_bytes: u64,
}

impl Job {
    /// `source` of the install pipeline: `fleet:<directive id>`.
    pub fn source(&self) -> String {
        format!("fleet:{}", self.directive)
    }

    /// The detail every download event carries.
    fn detail(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("directive".into(), json!(self.directive));
        m.insert("model".into(), json!(self.model));
        m.insert("release".into(), json!(self.release));
        m.insert("sha256".into(), json!(self.sha256));
        m
    }
}

/// Download settings (from `[install]`).
#[derive(Debug, Clone)]
pub struct DownloadConfig {
    /// `<state>/downloads`.
    pub dir: PathBuf,
    /// Largest bundle a directive may ask to download.
    pub max_bytes: u64,
    /// Without a new chunk for this long, the missing chunks are asked again.
    pub timeout: Duration,
    /// Silent timeouts in a row before the download is given up.
    pub retries: u32,
}

/// Why a download cannot start, go on or finish.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: corrupt download progress: {problem}")]
    Corrupt { path: String, problem: String },
    #[error("bundle of {bundle_bytes} bytes exceeds install.max_download_bytes ({limit} bytes)")]
    TooLarge { bundle_bytes: u64, limit: u64 },
    #[error(
        "bundle of {bundle_bytes} bytes needs {needed} bytes free on {path} (download and unpack), {free} are free"
    )]
    NoSpace {
        bundle_bytes: u64,
        needed: u64,
        free: u64,
        path: String,
    },
    #[error("the fleet's bundle {sha256} has {got} {what}, the directive says {expected}")]
    Mismatch {
        sha256: String,
        what: &'static str,
        got: u64,
        expected: u64,
    },
    #[error("the downloaded file's SHA-256 is {got}, the directive signed {expected}")]
    HashMismatch { expected: String, got: String },
    #[error("the fleet cannot send bundle {sha256}: {error}")]
    Fleet { sha256: String, error: String },
    #[error(
        "no new chunk of bundle {sha256} after {retries} repeated requests ({timeout_ms} ms apart)"
    )]
    GaveUp {
        sha256: String,
        retries: u32,
        timeout_ms: u64,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DownloadError + '_ {
    move |e| DownloadError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The progress file `<sha>.json` (wire type of the state directory, versioned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Progress {
    pub v: u32,
    pub directive: String,
    pub model: String,
    pub version: String,
    pub release: u64,
    pub sha256: String,
    pub bundle_bytes: u64,
    /// Chunk size the fleet uses for this bundle; 0 until the first chunk arrived.
    pub chunk_bytes: u32,
    /// The first chunk not yet on disk (every chunk before it is written and fsynced).
    pub next: u32,
}

impl Progress {
    fn job(&self) -> Job {
        Job {
            directive: self.directive.clone(),
            model: self.model.clone(),
            version: self.version.clone(),
            release: self.release,
            sha256: self.sha256.clone(),
            bundle_bytes: self.bundle_bytes,
        }
    }

    /// Number of chunks, once the chunk size is known.
    fn chunks(&self) -> Option<u32> {
        (self.chunk_bytes > 0).then(|| delivery::chunk_count(self.bundle_bytes, self.chunk_bytes))
    }
}

/// What one frame did to a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accept {
    /// Not stored (duplicate, outside the window, another bundle): why.
    Ignored(&'static str),
    /// Stored; the window is not complete yet.
    Stored,
    /// Stored and the window is complete (fsynced, progress saved): ask for the next one.
    WindowDone,
    /// Stored and every chunk is on disk: check the whole file.
    Complete,
    /// The fleet changed the chunk size: the download starts again from chunk 0.
    Restarted,
}

/// One download's files: the part file and its progress.
#[derive(Debug)]
pub struct PartFile {
    part_path: PathBuf,
    progress_path: PathBuf,
    file: File,
    progress: Progress,
    /// Chunks of the current window (`next .. next + MAX_WINDOW`) already written.
    received: BTreeSet<u32>,
}

impl PartFile {
    fn paths(dir: &Path, sha: &str) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("{sha}.part")),
            dir.join(format!("{sha}.json")),
        )
    }

    /// Starts a download of `job` from nothing (an older part of the same bundle is
    /// discarded).
    pub fn create(dir: &Path, job: &Job) -> Result<PartFile, DownloadError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (part_path, progress_path) = PartFile::paths(dir, &job.sha256);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part_path)
            .map_err(io_err(&part_path))?;
        let p = PartFile {
            part_path,
            progress_path,
            file,
            progress: Progress {
                v: PROGRESS_FORMAT,
                directive: job.directive.clone(),
                model: job.model.clone(),
                version: job.version.clone(),
                release: job.release,
                sha256: job.sha256.clone(),
                bundle_bytes: job.bundle_bytes,
                chunk_bytes: 0,
                next: 0,
            },
            received: BTreeSet::new(),
        };
        p.save()?;
        Ok(p)
    }

    /// Reopens the download of bundle `sha` after a restart: `None` when there is no
    /// progress file. A part file shorter than the progress claims moves `next` back to
    /// what the file holds.
    pub fn resume(dir: &Path, sha: &str) -> Result<Option<PartFile>, DownloadError> {
        let (part_path, progress_path) = PartFile::paths(dir, sha);
        let corrupt = |problem: String| DownloadError::Corrupt {
            path: progress_path.display().to_string(),
            problem,
        };
        let bytes = match std::fs::metadata(&progress_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&progress_path)(e)),
            Ok(m) if m.len() > MAX_PROGRESS_BYTES => {
                return Err(corrupt(format!("{} bytes", m.len())))
            }
            Ok(_) => std::fs::read(&progress_path).map_err(io_err(&progress_path))?,
        };
        let mut progress: Progress =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if progress.v != PROGRESS_FORMAT {
            return Err(corrupt(format!("format v{}, expected 1", progress.v)));
        }
        if progress.sha256 != sha {
            return Err(corrupt(format!("names bundle {}", progress.sha256)));
        }
        if progress.chunk_bytes as usize > delivery::MAX_CHUNK_BYTES {
            return Err(corrupt(format!("chunk_bytes {}", progress.chunk_bytes)));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .map_err(io_err(&part_path))?;
        let len = file.metadata().map_err(io_err(&part_path))?.len();
        match progress.chunks() {
            None => progress.next = 0,
            Some(total) => {
                let have = u64::from(progress.next) * u64::from(progress.chunk_bytes);
                if progress.next > total {
                    progress.next = total;
                }
                if have.min(progress.bundle_bytes) > len {
                    progress.next = u32::try_from(len / u64::from(progress.chunk_bytes))
                        .unwrap_or(0)
                        .min(total);
                }
            }
        }
        Ok(Some(PartFile {
            part_path,
            progress_path,
            file,
            progress,
            received: BTreeSet::new(),
        }))
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    pub fn job(&self) -> Job {
        self.progress.job()
    }

    /// A later directive for the same bundle: its id is reported from now on.
    pub fn retarget(&mut self, job: &Job) -> Result<(), DownloadError> {
        self.progress.directive = job.directive.clone();
        self.progress.model = job.model.clone();
        self.progress.version = job.version.clone();
        self.progress.release = job.release;
        self.save()
    }

    /// True when every chunk is on disk.
    pub fn is_complete(&self) -> bool {
        self.progress
            .chunks()
            .is_some_and(|total| self.progress.next >= total)
    }

    fn window_end(&self) -> u32 {
        let end = self.progress.next.saturating_add(MAX_WINDOW);
        match self.progress.chunks() {
            Some(total) => end.min(total),
            None => end,
        }
    }

    /// The request for the missing chunks of the current window, from the first missing.
    pub fn request(&self) -> ChunkRequest {
        let end = self.window_end();
        let from = (self.progress.next..end)
            .find(|i| !self.received.contains(i))
            .unwrap_or(self.progress.next);
        ChunkRequest {
            v: shared::wire::VERSION,
            sha256: self.progress.sha256.clone(),
            from,
            count: end.saturating_sub(from).clamp(1, MAX_WINDOW),
        }
    }

    /// Applies one decoded frame. Errors end the download (the fleet's bundle is not the
    /// directive's, the fleet sent an error, the disk failed).
    pub fn accept(&mut self, frame: &Frame) -> Result<Accept, DownloadError> {
        let h = &frame.header;
        if h.sha256 != self.progress.sha256 {
            return Ok(Accept::Ignored("another bundle"));
        }
        if let Some(error) = &h.error {
            return Err(DownloadError::Fleet {
                sha256: h.sha256.clone(),
                error: error.clone(),
            });
        }
        if h.bundle_bytes != self.progress.bundle_bytes {
            return Err(DownloadError::Mismatch {
                sha256: h.sha256.clone(),
                what: "bytes",
                got: h.bundle_bytes,
                expected: self.progress.bundle_bytes,
            });
        }
        if h.chunk_bytes != self.progress.chunk_bytes {
            if self.progress.chunk_bytes == 0 {
                self.progress.chunk_bytes = h.chunk_bytes;
            } else {
                // the fleet was reconfigured: what is on disk no longer lines up
                self.progress.chunk_bytes = h.chunk_bytes;
                self.progress.next = 0;
                self.received.clear();
                self.file.set_len(0).map_err(io_err(&self.part_path))?;
                self.save()?;
                return Ok(Accept::Restarted);
            }
        }
        if h.index < self.progress.next || self.received.contains(&h.index) {
            return Ok(Accept::Ignored("duplicate"));
        }
        if h.index >= self.window_end() {
            return Ok(Accept::Ignored("outside the window"));
        }
        let offset = u64::from(h.index) * u64::from(self.progress.chunk_bytes);
        self.file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| self.file.write_all(&frame.data))
            .map_err(io_err(&self.part_path))?;
        self.received.insert(h.index);
        let end = self.window_end();
        if (self.progress.next..end).any(|i| !self.received.contains(&i)) {
            return Ok(Accept::Stored);
        }
        // the window is whole: make it durable, then say so
        self.file.sync_data().map_err(io_err(&self.part_path))?;
        self.progress.next = end;
        self.received.clear();
        self.save()?;
        if self.is_complete() {
            return Ok(Accept::Complete);
        }
        crate::store::fault_point_named("download");
        Ok(Accept::WindowDone)
    }

    fn save(&self) -> Result<(), DownloadError> {
        let bytes = serde_json::to_vec(&self.progress).map_err(|e| DownloadError::Io {
            path: self.progress_path.display().to_string(),
            message: e.to_string(),
        })?;
        shared::trust::write_atomic(&self.progress_path, &bytes, false)
            .map_err(io_err(&self.progress_path))
    }

    /// Checks the whole file against the directive's SHA-256: the path of the verified
    /// file, or an error after both files were deleted.
    pub fn verify(mut self) -> Result<PathBuf, DownloadError> {
        let result = self.hash().and_then(|got| {
            if got == self.progress.sha256 {
                Ok(())
            } else {
                Err(DownloadError::HashMismatch {
                    expected: self.progress.sha256.clone(),
                    got,
                })
            }
        });
        match result {
            Ok(()) => Ok(self.part_path.clone()),
            Err(e) => {
                self.remove();
                Err(e)
            }
        }
    }

    fn hash(&mut self) -> Result<String, DownloadError> {
        let len = self.file.metadata().map_err(io_err(&self.part_path))?.len();
        if len > self.progress.bundle_bytes {
            // bytes past the end (a chunk size change): not part of the bundle
            self.file
                .set_len(self.progress.bundle_bytes)
                .map_err(io_err(&self.part_path))?;
        }
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io_err(&self.part_path))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut reader = (&self.file).take(self.progress.bundle_bytes);
        loop {
            let n = reader.read(&mut buf).map_err(io_err(&self.part_path))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(shared::trust::hex(&h.finalize()))
    }

    /// Deletes the part and progress files.
    pub fn remove(self) {
        remove_files(&self.part_path, &self.progress_path);
    }
}

fn remove_files(part: &Path, progress: &Path) {
    for p in [progress, part] {
        if let Err(e) = std::fs::remove_file(p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %p.display(), error = %e, "cannot delete a download file");
            }
        }
    }
}

/// Free bytes on the disk holding `dir` (the mount point that is its longest prefix);
/// `None` when it cannot be told.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let dir = dir.canonicalize().ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

/// Refuses a bundle larger than the configured cap or than the free disk allows (twice its
/// size: the download and the unpacked staging copy).
pub fn check_size(
    bundle_bytes: u64,
    max_bytes: u64,
    free: Option<u64>,
    dir: &Path,
) -> Result<(), DownloadError> {
    if bundle_bytes > max_bytes {
        return Err(DownloadError::TooLarge {
            bundle_bytes,
            limit: max_bytes,
        });
    }
    let needed = bundle_bytes.saturating_mul(2);
    match free {
        Some(free) if free < needed => Err(DownloadError::NoSpace {
            bundle_bytes,
            needed,
            free,
            path: dir.display().to_string(),
        }),
        _ => Ok(()),
    }
}

/// Emits an event: (model, event name, detail).
pub type EventFn = Arc<dyn Fn(&str, &str, Value) + Send + Sync>;
/// Publishes a chunk request on `bundle/get`; false when it could not be queued.
pub type Publisher = Arc<dyn Fn(&ChunkRequest) -> bool + Send + Sync>;

/// Runs the install pipeline on a verified download.
pub type InstallFn = Arc<dyn Fn(&Job, &Path) + Send + Sync>;
/// True when a job's release is already active.
pub type SettledFn = Arc<dyn Fn(&Job) -> bool + Send + Sync>;

/// What the downloads ask of the rest of the agent.
#[derive(Clone)]
pub struct Hooks {
    pub event: EventFn,
    /// Runs the install pipeline on the verified file (blocking; `source` = `fleet:<id>`).
    pub install: InstallFn,
    /// True when the job's model already runs its release (nothing to download; the hook
    /// emits what the fleet needs to hear).
    pub settled: SettledFn,
}

enum Msg {
    Frame(Vec<u8>),
    Wake,
}

enum Order {
    Start(Job),
    Cancel { model: String, reason: String },
}

struct Shared {
    cfg: DownloadConfig,
    hooks: Hooks,
    orders: Mutex<Vec<Order>>,
    publisher: Mutex<Option<Publisher>>,
    /// Connection generation: 0 while disconnected.
    generation: AtomicU64,
    stop: AtomicBool,
    /// Frames dropped because the queue was full, or ignored.
    pub dropped_frames: AtomicU64,
    pub ignored_frames: AtomicU64,
}

/// The download manager: one worker thread, one download per model.
pub struct Downloads {
    shared: Arc<Shared>,
    tx: SyncSender<Msg>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Downloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Downloads")
            .field("dir", &self.shared.cfg.dir)
            .finish_non_exhaustive()
    }
}

impl Downloads {
    /// Creates `cfg.dir` and starts the worker, which first resumes the downloads a
    /// previous process left (progress files in `cfg.dir`).
    pub fn start(cfg: DownloadConfig, hooks: Hooks) -> Result<Downloads, DownloadError> {
        std::fs::create_dir_all(&cfg.dir).map_err(io_err(&cfg.dir))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_FRAMES);
        let shared = Arc::new(Shared {
            cfg,
            hooks,
            orders: Mutex::new(Vec::new()),
            publisher: Mutex::new(None),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            dropped_frames: AtomicU64::new(0),
            ignored_frames: AtomicU64::new(0),
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("downloads".into())
            .spawn(move || Worker::new(s).run(rx))
            .map_err(|e| DownloadError::Io {
                path: "downloads worker".into(),
                message: e.to_string(),
            })?;
        Ok(Downloads {
            shared,
            tx,
            worker: Mutex::new(Some(worker)),
        })
    }

    pub fn config(&self) -> &DownloadConfig {
        &self.shared.cfg
    }

    /// Refuses a job whose bundle is over the cap or the free disk.
    pub fn check(&self, job: &Job) -> Result<(), DownloadError> {
        let dir = &self.shared.cfg.dir;
        check_size(
            job.bundle_bytes,
            self.shared.cfg.max_bytes,
            free_bytes(dir),
            dir,
        )
    }

    /// Queues a download (replacing a pending one of the same model).
    pub fn submit(&self, job: Job) {
        self.order(Order::Start(job));
    }

    /// Gives up the pending download of `model`, if any (`download_failed` with `reason`).
    pub fn cancel_model(&self, model: &str, reason: String) {
        self.order(Order::Cancel {
            model: model.to_string(),
            reason,
        });
    }

    fn order(&self, o: Order) {
        if let Ok(mut q) = self.shared.orders.lock() {
            q.push(o);
        }
        // a full queue is fine: the worker looks at the orders every tick
        let _ = self.tx.try_send(Msg::Wake);
    }

    /// The sync connected (connection `generation` > 0) with this publisher: every
    /// download asks again for its missing chunks.
    pub fn link_up(&self, generation: u64, publisher: Publisher) {
        if let Ok(mut p) = self.shared.publisher.lock() {
            *p = Some(publisher);
        }
        self.shared
            .generation
            .store(generation.max(1), Ordering::Release);
        let _ = self.tx.try_send(Msg::Wake);
    }

    /// The sync lost its connection: timeouts stop counting until it is back.
    pub fn link_down(&self) {
        self.shared.generation.store(0, Ordering::Release);
    }

    /// A payload from `bundle/chunk` (never blocks: dropped when the queue is full).
    pub fn on_frame(&self, payload: Vec<u8>) {
        match self.tx.try_send(Msg::Frame(payload)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.dropped_frames.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Frames dropped (queue full) and ignored (not for a pending window).
    pub fn frame_counts(&self) -> (u64, u64) {
        (
            self.shared.dropped_frames.load(Ordering::Relaxed),
            self.shared.ignored_frames.load(Ordering::Relaxed),
        )
    }

    /// Stops the worker and waits for it (an install in progress finishes first); the
    /// progress files stay, so the downloads resume at the next start.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.tx.try_send(Msg::Wake);
        let handle = self.worker.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for Downloads {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Active {
    part: PartFile,
    /// When chunks were last asked for (None: not yet on this connection).
    asked_at: Option<Instant>,
    /// Connection generation of the last request.
    asked_on: u64,
    /// Silent timeouts in a row.
    retries: u32,
}

struct Worker {
    shared: Arc<Shared>,
    /// model -> its download
    active: BTreeMap<String, Active>,
}

impl Worker {
    fn new(shared: Arc<Shared>) -> Worker {
        Worker {
            shared,
            active: BTreeMap::new(),
        }
    }

    fn event(&self, job: &Job, name: &str, extra: Value) {
        let mut d = job.detail();
        if let Value::Object(m) = extra {
            d.extend(m);
        }
        (self.shared.hooks.event)(&job.model, name, Value::Object(d));
    }

    fn run(mut self, rx: Receiver<Msg>) {
        self.resume_all();
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            match rx.recv_timeout(TICK) {
                Ok(Msg::Frame(bytes)) => self.frame(&bytes),
                Ok(Msg::Wake) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let orders = self
                .shared
                .orders
                .lock()
                .map(|mut q| std::mem::take(&mut *q))
                .unwrap_or_default();
            for o in orders {
                match o {
                    Order::Start(job) => self.start(job),
                    Order::Cancel { model, reason } => self.fail_model(&model, &reason),
                }
            }
            self.poll_link();
        }
    }

    /// Picks up the downloads a previous process left.
    fn resume_all(&mut self) {
        let dir = self.shared.cfg.dir.clone();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let mut shas: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json").map(str::to_string)
            })
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .collect();
        shas.sort();
        for sha in shas {
            match PartFile::resume(&dir, &sha) {
                Ok(Some(part)) => {
                    let job = part.job();
                    if let Some(old) = self.active.remove(&job.model) {
                        // two downloads of one model left behind: keep the later one
                        old.part.remove();
                    }
                    self.event(
                        &job,
                        "download_resumed",
                        json!({"next": part.progress.next}),
                    );
                    self.add(part);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "download progress unreadable; discarded");
                    let (part, progress) = PartFile::paths(&dir, &sha);
                    remove_files(&part, &progress);
                }
            }
        }
        // part files without progress are leftovers of a download that ended
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.filter_map(|e| e.ok()) {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "part") && !p.with_extension("json").exists()
                {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
    }

    fn add(&mut self, part: PartFile) {
        let model = part.progress.model.clone();
        let complete = part.is_complete();
        self.active.insert(
            model.clone(),
            Active {
                part,
                asked_at: None,
                asked_on: 0,
                retries: 0,
            },
        );
        if complete {
            self.finish(&model);
        } else {
            self.ask(&model, false);
        }
    }

    fn start(&mut self, job: Job) {
        if (self.shared.hooks.settled)(&job) {
            self.fail_model(
                &job.model,
                &format!(
                    "superseded by directive {}: release {} is active",
                    job.directive, job.release
                ),
            );
            return;
        }
        if let Some(a) = self.active.get_mut(&job.model) {
            if a.part.progress.sha256 == job.sha256 {
                // the same bundle again (e.g. re-sent after the device was offline)
                if let Err(e) = a.part.retarget(&job) {
                    tracing::warn!(error = %e, "download progress not updated");
                }
                a.retries = 0;
                self.ask(&job.model, false);
                return;
            }
            self.fail_model(
                &job.model,
                &format!("superseded by directive {}", job.directive),
            );
        }
        let dir = self.shared.cfg.dir.clone();
        let part = match PartFile::resume(&dir, &job.sha256) {
            Ok(Some(mut p)) => p.retarget(&job).map(|()| p),
            _ => PartFile::create(&dir, &job),
        };
        match part {
            Ok(p) => {
                self.event(&job, "download_started", json!({"bytes": job.bundle_bytes}));
                self.add(p);
            }
            Err(e) => self.event(&job, "download_failed", json!({"reason": e.to_string()})),
        }
    }

    /// Ends the download of `model` with `download_failed` and deletes its files.
    fn fail_model(&mut self, model: &str, reason: &str) {
        if let Some(a) = self.active.remove(model) {
            let job = a.part.job();
            a.part.remove();
            tracing::warn!(model, directive = %job.directive, reason, "download failed");
            self.event(&job, "download_failed", json!({"reason": reason}));
        }
    }

    /// Asks for the missing chunks of `model`'s window when connected.
    fn ask(&mut self, model: &str, counted: bool) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation == 0 {
            return;
        }
        let publisher = self.shared.publisher.lock().ok().and_then(|p| p.clone());
        let Some(publish) = publisher else {
            return;
        };
        let Some(a) = self.active.get_mut(model) else {
            return;
        };
        if counted {
            a.retries += 1;
        }
        let req = a.part.request();
        if !publish(&req) {
            tracing::debug!(
                model,
                "chunk request not queued; asked again at the timeout"
            );
        }
        a.asked_at = Some(Instant::now());
        a.asked_on = generation;
    }

    /// Re-asks after a reconnect or a timeout; gives up after too many silent timeouts.
    fn poll_link(&mut self) {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation == 0 {
            return;
        }
        let timeout = self.shared.cfg.timeout;
        let mut reask = Vec::new();
        let mut give_up = Vec::new();
        for (model, a) in &self.active {
            if a.asked_on != generation {
                reask.push((model.clone(), false));
            } else if a.asked_at.is_some_and(|t| t.elapsed() >= timeout) {
                if a.retries >= self.shared.cfg.retries {
                    give_up.push((model.clone(), a.part.progress.sha256.clone()));
                } else {
                    reask.push((model.clone(), true));
                }
            }
        }
        for (model, counted) in reask {
            self.ask(&model, counted);
        }
        for (model, sha256) in give_up {
            let e = DownloadError::GaveUp {
                sha256,
                retries: self.shared.cfg.retries,
                timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            };
            self.fail_model(&model, &e.to_string());
        }
    }

    fn frame(&mut self, bytes: &[u8]) {
        let frame = match delivery::decode_frame(bytes) {
            Ok(f) => f,
            Err(e) => {
                self.shared.ignored_frames.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "chunk frame refused");
                return;
            }
        };
        let Some(model) = self
            .active
            .iter()
            .find(|(_, a)| a.part.progress.sha256 == frame.header.sha256)
            .map(|(m, _)| m.clone())
        else {
            self.shared.ignored_frames.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Some(a) = self.active.get_mut(&model) else {
            return;
        };
        match a.part.accept(&frame) {
            Ok(Accept::Ignored(_)) => {
                self.shared.ignored_frames.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Accept::Stored) => a.retries = 0,
            Ok(Accept::WindowDone) | Ok(Accept::Restarted) => {
                a.retries = 0;
                self.ask(&model, false);
            }
            Ok(Accept::Complete) => self.finish(&model),
            Err(e) => self.fail_model(&model, &e.to_string()),
        }
    }

    /// The last chunk is on disk: verify the whole file, install it, delete it.
    fn finish(&mut self, model: &str) {
        let Some(a) = self.active.remove(model) else {
            return;
        };
        let job = a.part.job();
        let (part_path, progress_path) = (a.part.part_path.clone(), a.part.progress_path.clone());
        match a.part.verify() {
            Ok(path) => {
                self.event(&job, "downloaded", json!({"bytes": job.bundle_bytes}));
                if !(self.shared.hooks.settled)(&job) {
                    (self.shared.hooks.install)(&job, &path);
                }
                remove_files(&part_path, &progress_path);
            }
            Err(e) => {
                tracing::warn!(model, directive = %job.directive, error = %e, "download refused");
                self.event(&job, "download_failed", json!({"reason": e.to_string()}));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::delivery::{decode_frame, error_frame, frame_for, sha256_hex};

    const CHUNK: u32 = 1024;

    fn bundle(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 253) as u8).collect()
    }

    fn job(b: &[u8]) -> Job {
        Job {
            directive: "d-1".into(),
            model: "pdm".into(),
            version: "1.1.0".into(),
            release: 2,
            sha256: sha256_hex(b),
            bundle_bytes: b.len() as u64,
        }
    }

    fn frame(b: &[u8], i: u32) -> Frame {
        decode_frame(&frame_for(b, &sha256_hex(b), CHUNK, i).unwrap()).unwrap()
    }

    #[test]
    fn out_of_order_duplicate_and_corrupt_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let b = bundle(40 * CHUNK as usize + 100); // 41 chunks: windows of 16, 16, 9
        let mut p = PartFile::create(tmp.path(), &job(&b)).unwrap();
        assert_eq!(
            (p.request().from, p.request().count),
            (0, MAX_WINDOW),
            "first request"
        );
        // out of order inside the window: stored; the window is not done before chunk 0
        for i in (1..16).rev() {
            assert_eq!(p.accept(&frame(&b, i)).unwrap(), Accept::Stored, "{i}");
        }
        assert_eq!(
            p.request().from,
            0,
            "the first missing chunk is asked again"
        );
        assert_eq!(p.request().count, 16);
        assert_eq!(
            p.accept(&frame(&b, 5)).unwrap(),
            Accept::Ignored("duplicate")
        );
        assert_eq!(
            p.accept(&frame(&b, 20)).unwrap(),
            Accept::Ignored("outside the window")
        );
        assert_eq!(p.accept(&frame(&b, 0)).unwrap(), Accept::WindowDone);
        assert_eq!(p.progress().next, 16);
        assert_eq!(
            p.accept(&frame(&b, 3)).unwrap(),
            Accept::Ignored("duplicate"),
            "before the window"
        );
        // a corrupted chunk never decodes, so it can never be written
        let mut bad = frame_for(&b, &sha256_hex(&b), CHUNK, 16).unwrap();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        let e = decode_frame(&bad).unwrap_err().to_string();
        assert!(e.contains("data_sha256"), "{e}");
        // a frame of another bundle is ignored
        let other = bundle(3000);
        let f = decode_frame(&frame_for(&other, &sha256_hex(&other), CHUNK, 0).unwrap()).unwrap();
        assert_eq!(p.accept(&f).unwrap(), Accept::Ignored("another bundle"));
        for i in 16..32 {
            p.accept(&frame(&b, i)).unwrap();
        }
        assert_eq!(p.request().from, 32);
        assert_eq!(p.request().count, 9, "the last window is short");
        for i in 32..40 {
            assert_eq!(p.accept(&frame(&b, i)).unwrap(), Accept::Stored);
        }
        assert_eq!(p.accept(&frame(&b, 40)).unwrap(), Accept::Complete);
        let path = p.verify().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b);
    }

    #[test]
    fn a_size_mismatch_or_an_error_frame_ends_the_download() {
        let tmp = tempfile::tempdir().unwrap();
        let b = bundle(5000);
        let mut j = job(&b);
        j.bundle_bytes = 4000;
        let mut p = PartFile::create(tmp.path(), &j).unwrap();
        let e = p.accept(&frame(&b, 0)).unwrap_err();
        assert!(
            matches!(
                e,
                DownloadError::Mismatch {
                    got: 5000,
                    expected: 4000,
                    ..
                }
            ),
            "{e}"
        );
        let err = decode_frame(&error_frame(&j.sha256, 0, "unknown bundle")).unwrap();
        let e = p.accept(&err).unwrap_err();
        assert!(e.to_string().contains("unknown bundle"), "{e}");
    }

    #[test]
    fn resume_after_a_restart_asks_from_the_first_missing_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let b = bundle(40 * CHUNK as usize);
        let j = job(&b);
        let mut p = PartFile::create(tmp.path(), &j).unwrap();
        for i in 0..16 {
            p.accept(&frame(&b, i)).unwrap();
        }
        // part of the second window arrived but was not made durable
        for i in 16..20 {
            assert_eq!(p.accept(&frame(&b, i)).unwrap(), Accept::Stored);
        }
        drop(p); // kill -9: nothing more is written
        let mut p = PartFile::resume(tmp.path(), &j.sha256).unwrap().unwrap();
        assert_eq!(p.progress().next, 16);
        assert_eq!(p.progress().directive, "d-1");
        assert_eq!(p.progress().chunk_bytes, CHUNK);
        let r = p.request();
        assert_eq!(
            (r.from, r.count, r.sha256.as_str()),
            (16, 16, j.sha256.as_str())
        );
        for i in 16..40 {
            p.accept(&frame(&b, i)).unwrap();
        }
        assert!(p.is_complete());
        assert_eq!(std::fs::read(p.verify().unwrap()).unwrap(), b);

        // a progress file that claims more than the part file holds moves back
        let mut p = PartFile::create(tmp.path(), &j).unwrap();
        for i in 0..32 {
            p.accept(&frame(&b, i)).unwrap();
        }
        drop(p);
        let part = tmp.path().join(format!("{}.part", j.sha256));
        let f = OpenOptions::new().write(true).open(&part).unwrap();
        f.set_len(u64::from(CHUNK) * 20 + 10).unwrap();
        let p = PartFile::resume(tmp.path(), &j.sha256).unwrap().unwrap();
        assert_eq!(p.request().from, 20);
        // no progress file: nothing to resume
        assert!(PartFile::resume(tmp.path(), &"0".repeat(64))
            .unwrap()
            .is_none());
        // a damaged progress file is named
        std::fs::write(tmp.path().join(format!("{}.json", j.sha256)), b"{").unwrap();
        let e = PartFile::resume(tmp.path(), &j.sha256).unwrap_err();
        assert!(e.to_string().contains(".json"), "{e}");
    }

    #[test]
    fn a_whole_file_hash_mismatch_is_refused_and_cleaned_up() {
        let tmp = tempfile::tempdir().unwrap();
        let b = bundle(3000);
        // the fleet serves a file whose chunks are self-consistent but which is not the
        // signed bundle: same size, the directive names another hash
        let other = bundle(3000).iter().map(|x| x ^ 1).collect::<Vec<u8>>();
        let j = job(&b);
        let mut p = PartFile::create(tmp.path(), &j).unwrap();
        for i in 0..3 {
            // frames of `other` relabelled with the directive's hash
            let data = &other[(i * CHUNK) as usize..((i + 1) * CHUNK).min(3000) as usize];
            let header = delivery::ChunkHeader {
                v: 1,
                sha256: j.sha256.clone(),
                index: i,
                chunks: 3,
                chunk_bytes: CHUNK,
                bundle_bytes: 3000,
                data_sha256: sha256_hex(data),
                error: None,
            };
            let f = decode_frame(&delivery::encode_frame(&header, data)).unwrap();
            p.accept(&f).unwrap();
        }
        assert!(p.is_complete());
        let e = p.verify().unwrap_err();
        assert!(matches!(e, DownloadError::HashMismatch { .. }), "{e}");
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "part and progress deleted"
        );
    }

    #[test]
    fn bundles_over_the_cap_or_the_free_disk_are_refused() {
        let dir = Path::new("/var/lib/x");
        let e = check_size(513 << 20, 512 << 20, None, dir).unwrap_err();
        assert!(matches!(e, DownloadError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("install.max_download_bytes"), "{e}");
        let e = check_size(100, 1000, Some(150), dir).unwrap_err();
        assert!(
            matches!(
                e,
                DownloadError::NoSpace {
                    needed: 200,
                    free: 150,
                    ..
                }
            ),
            "{e}"
        );
        assert!(check_size(100, 1000, Some(200), dir).is_ok());
        assert!(check_size(100, 1000, None, dir).is_ok());
        assert!(free_bytes(&std::env::temp_dir()).is_some());
    }

    /// The manager end to end on real files: requests published, frames applied, a
    /// reconnect re-asks, the install hook gets the verified file, which is then deleted;
    /// a restart resumes a pending download.
    #[test]
    fn manager_downloads_resumes_and_installs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("downloads");
        let b = Arc::new(bundle(20 * CHUNK as usize + 1));
        let events: Arc<Mutex<Vec<(String, Value)>>> = Arc::default();
        type Installed = Vec<(Job, Vec<u8>)>;
        let installed: Arc<Mutex<Installed>> = Arc::default();
        let (ev, inst) = (events.clone(), installed.clone());
        let hooks = Hooks {
            event: Arc::new(move |_m: &str, n: &str, d: Value| {
                ev.lock().unwrap().push((n.to_string(), d))
            }),
            install: Arc::new(move |j: &Job, p: &Path| {
                inst.lock()
                    .unwrap()
                    .push((j.clone(), std::fs::read(p).unwrap()))
            }),
            settled: Arc::new(|_j: &Job| false),
        };
        let cfg = DownloadConfig {
            dir: dir.clone(),
            max_bytes: 1 << 20,
            timeout: Duration::from_millis(300),
            retries: 2,
        };
        let requests: Arc<Mutex<Vec<ChunkRequest>>> = Arc::default();
        let publisher = |serve: bool, d: &Arc<Mutex<Option<Arc<Downloads>>>>| -> Publisher {
            let (r, b, d) = (requests.clone(), b.clone(), d.clone());
            Arc::new(move |req: &ChunkRequest| {
                r.lock().unwrap().push(req.clone());
                if serve {
                    if let Some(dl) = d.lock().unwrap().clone() {
                        for i in req.from..req.from + req.count {
                            if let Some(f) = frame_for(&b, &req.sha256, CHUNK, i) {
                                dl.on_frame(f);
                            }
                        }
                    }
                }
                true
            })
        };
        let slot: Arc<Mutex<Option<Arc<Downloads>>>> = Arc::default();
        // first process: connected but the fleet does not answer
        let dl = Arc::new(Downloads::start(cfg.clone(), hooks.clone()).unwrap());
        dl.link_up(1, publisher(false, &slot));
        dl.submit(job(&b));
        assert!(wait(|| !requests.lock().unwrap().is_empty()));
        // serve the first window by hand, then "kill" the process
        for i in 0..16 {
            dl.on_frame(frame_for(&b, &sha256_hex(&b), CHUNK, i).unwrap());
        }
        assert!(wait(|| requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.from == 16)));
        dl.shutdown();
        drop(dl);
        assert!(installed.lock().unwrap().is_empty());
        // second process: resumes from chunk 16 and the fleet answers
        requests.lock().unwrap().clear();
        let dl = Arc::new(Downloads::start(cfg.clone(), hooks.clone()).unwrap());
        *slot.lock().unwrap() = Some(dl.clone());
        dl.link_up(1, publisher(true, &slot));
        assert!(wait(|| !installed.lock().unwrap().is_empty()));
        assert_eq!(
            requests.lock().unwrap()[0].from,
            16,
            "resumed, not restarted"
        );
        let (j, bytes) = installed.lock().unwrap()[0].clone();
        assert_eq!((j.directive.as_str(), bytes.len()), ("d-1", b.len()));
        assert_eq!(bytes, *b);
        assert!(wait(|| std::fs::read_dir(&dir).unwrap().count() == 0));
        let names: Vec<String> = events.lock().unwrap().iter().map(|e| e.0.clone()).collect();
        assert_eq!(
            names,
            ["download_started", "download_resumed", "downloaded"]
        );
        assert_eq!(events.lock().unwrap()[0].1["directive"], "d-1");
        assert_eq!(events.lock().unwrap()[0].1["release"], 2);
        // a fleet that never answers: given up after the retries
        *slot.lock().unwrap() = None;
        dl.link_up(2, publisher(false, &slot));
        let mut j2 = job(&b);
        j2.directive = "d-2".into();
        dl.submit(j2);
        assert!(wait(|| {
            events
                .lock()
                .unwrap()
                .iter()
                .any(|(n, d)| n == "download_failed" && d["directive"] == "d-2")
        }));
        let last = events.lock().unwrap().last().cloned().unwrap();
        assert!(
            last.1["reason"]
                .as_str()
                .unwrap()
                .contains("after 2 repeated requests"),
            "{last:?}"
        );
        assert!(wait(|| std::fs::read_dir(&dir).unwrap().count() == 0));
        slot.lock().unwrap().take();
        dl.shutdown();
    }

    fn wait(mut f: impl FnMut() -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}
