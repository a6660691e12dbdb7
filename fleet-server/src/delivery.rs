//! Bundle delivery over MQTT: answers devices' chunk requests (`<prefix>/<dev>/bundle/get`,
//! [`shared::delivery::ChunkRequest`]) with chunk frames on `<prefix>/<dev>/bundle/chunk`,
//! read from the bundle store's files.
//!
//! Bounds: only the requested chunks are read (seek, then at most `chunk_bytes` per chunk,
//! one chunk in memory at a time per worker); at most `workers` requests are served at once
//! (on the tokio blocking pool when a runtime is present, inline otherwise); requests that
//! arrive while every worker is busy wait in a queue holding at most one request per device
//! (a newer request of the same device replaces its older one) and at most `max_pending`
//! devices; beyond that a request is dropped and counted (the device asks again after its
//! timeout). A frame the publisher cannot queue ends that request's window (counted).

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use shared::delivery::{
    chunk_count, encode_frame, error_frame, parse_request, sha256_hex, ChunkHeader, ChunkRequest,
    CHUNK_LEAF, MAX_CHUNK_BYTES,
};

use crate::bundles::BundleStore;
use crate::link::Publisher;

/// Default number of requests served at once.
pub const DEFAULT_WORKERS: usize = 4;
/// Default bound on devices waiting for a worker.
pub const DEFAULT_MAX_PENDING: usize = 20_000;

/// Delivery counters for `/metrics`.
#[derive(Debug, Default)]
pub struct DeliveryCounters {
    /// Chunk requests received (valid or not).
    pub requests: AtomicU64,
    /// Chunk frames published.
    pub chunks: AtomicU64,
    /// Chunk data bytes published.
    pub bytes: AtomicU64,
    /// Error frames sent (unknown bundle, malformed request, unreadable file).
    pub errors: AtomicU64,
    /// Frames the publisher could not queue (the rest of that window was not sent).
    pub publish_failed: AtomicU64,
    /// Requests dropped because the pending queue was full.
    pub dropped: AtomicU64,
    /// Requests replaced by a newer request of the same device while waiting.
    pub superseded: AtomicU64,
}

struct Sched {
    running: usize,
    order: VecDeque<String>,
    pending: HashMap<String, ChunkRequest>,
}

struct Shared {
    store: Arc<BundleStore>,
    chunk_bytes: u32,
    publisher: Publisher,
    counters: Arc<DeliveryCounters>,
    workers: usize,
    max_pending: usize,
    sched: Mutex<Sched>,
}

/// The chunk server (see the module documentation). Cheap to share (`Arc` inside).
#[derive(Clone)]
pub struct Delivery {
    shared: Arc<Shared>,
}

impl Delivery {
    /// A server of `store`'s bundles in chunks of `chunk_bytes` (clamped to 1..=1 MiB), with
    /// the default bounds.
    pub fn new(store: Arc<BundleStore>, chunk_bytes: u32, publisher: Publisher) -> Delivery {
        Delivery::with_limits(
            store,
            chunk_bytes,
            publisher,
            DEFAULT_WORKERS,
            DEFAULT_MAX_PENDING,
        )
    }

    /// [`Delivery::new`] with explicit bounds.
    pub fn with_limits(
        store: Arc<BundleStore>,
        chunk_bytes: u32,
        publisher: Publisher,
        workers: usize,
        max_pending: usize,
    ) -> Delivery {
        let max_chunk = u32::try_from(MAX_CHUNK_BYTES).unwrap_or(u32::MAX);
        Delivery {
            shared: Arc::new(Shared {
                store,
                chunk_bytes: chunk_bytes.clamp(1, max_chunk),
                publisher,
                counters: Arc::new(DeliveryCounters::default()),
                workers: workers.max(1),
                max_pending,
                sched: Mutex::new(Sched {
                    running: 0,
                    order: VecDeque::new(),
                    pending: HashMap::new(),
                }),
            }),
        }
    }

    /// The counters.
    pub fn counters(&self) -> Arc<DeliveryCounters> {
        self.shared.counters.clone()
    }

    /// Devices whose request waits for a worker.
    pub fn pending(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// A chunk request payload from `device`: a malformed one is answered with an error
    /// frame at once; a valid one is served now or queued (see the module documentation).
    /// Never blocks on disk when a tokio runtime is present.
    pub fn on_request(&self, device: &str, payload: &[u8]) {
        let s = &self.shared;
        s.counters.requests.fetch_add(1, Ordering::Relaxed);
        let req = match parse_request(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(%device, error = %e, "bad chunk request");
                let sha = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("sha256").and_then(|s| s.as_str()).map(String::from))
                    .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                    .unwrap_or_else(|| "0".repeat(64));
                s.send_error(device, &sha.to_ascii_lowercase(), 0, &e.to_string());
                return;
            }
        };
        let runtime = tokio::runtime::Handle::try_current().ok();
        let Some(rt) = runtime else {
            s.serve(device, &req);
            return;
        };
        {
            let mut sched = s.lock();
            if sched.running >= s.workers {
                if let Some(old) = sched.pending.get_mut(device) {
                    *old = req;
                    s.counters.superseded.fetch_add(1, Ordering::Relaxed);
                } else if sched.pending.len() < s.max_pending {
                    sched.pending.insert(device.to_string(), req);
                    sched.order.push_back(device.to_string());
                } else {
                    s.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%device, "chunk request dropped: too many devices waiting");
                }
                return;
            }
            sched.running += 1;
        }
        let shared = s.clone();
        let device = device.to_string();
        rt.spawn_blocking(move || shared.work(device, req));
    }

    /// Serves one request now, on this thread (tests, tools).
    pub fn serve(&self, device: &str, req: &ChunkRequest) {
        self.shared.serve(device, req);
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A worker: serves its request, then waiting ones until none is left.
    fn work(&self, device: String, req: ChunkRequest) {
        let mut job = Some((device, req));
        while let Some((device, req)) = job.take() {
            self.serve(&device, &req);
            let mut sched = self.lock();
            while let Some(next) = sched.order.pop_front() {
                if let Some(r) = sched.pending.remove(&next) {
                    job = Some((next, r));
                    break;
                }
            }
            if job.is_none() {
                sched.running = sched.running.saturating_sub(1);
            }
        }
    }

    fn send_error(&self, device: &str, sha256: &str, index: u32, error: &str) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        if !(self.publisher)(device, CHUNK_LEAF, error_frame(sha256, index, error)) {
            self.counters.publish_failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn serve(&self, device: &str, req: &ChunkRequest) {
        let sha = req.sha256.as_str();
        let Some(size) = self.store.size_by_sha(sha) else {
            self.send_error(device, sha, req.from, &format!("unknown bundle {sha}"));
            return;
        };
        let chunk = self.chunk_bytes;
        let total = chunk_count(size, chunk);
        if req.from >= total {
            self.send_error(
                device,
                sha,
                req.from,
                &format!(
                    "chunk {} is past the end of bundle {sha} ({total} chunks)",
                    req.from
                ),
            );
            return;
        }
        let path = self.store.path(sha);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "bundle file unreadable");
                self.send_error(
                    device,
                    sha,
                    req.from,
                    &format!("bundle {sha} is unreadable on the fleet server"),
                );
                return;
            }
        };
        let end = req.from.saturating_add(req.count).min(total);
        let mut buf = Vec::new();
        for index in req.from..end {
            let start = u64::from(index) * u64::from(chunk);
            let len = (size - start).min(u64::from(chunk)) as usize;
            buf.resize(len, 0);
            let read = file
                .seek(SeekFrom::Start(start))
                .and_then(|_| file.read_exact(&mut buf));
            if let Err(e) = read {
                tracing::error!(path = %path.display(), index, error = %e, "bundle file read failed");
                self.send_error(
                    device,
                    sha,
                    index,
                    &format!("bundle {sha} is unreadable on the fleet server (chunk {index})"),
                );
                return;
            }
            let header = ChunkHeader {
                v: shared::wire::VERSION,
                sha256: sha.to_string(),
                index,
                chunks: total,
                chunk_bytes: chunk,
                bundle_bytes: size,
                data_sha256: sha256_hex(&buf),
                error: None,
            };
            if !(self.publisher)(device, CHUNK_LEAF, encode_frame(&header, &buf)) {
                self.counters.publish_failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%device, index, "chunk not queued; the device will ask again");
                return;
            }
            self.counters.chunks.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundles::tests::{config, make_bundle, root, NOW_MS};
    use crate::store::Db;
    use shared::delivery::decode_frame;

    fn store_with_bundle(dir: &std::path::Path) -> (Arc<BundleStore>, String, Vec<u8>) {
        let cfg = config(dir, vec![]);
        let store = BundleStore::open(Db::temporary().unwrap(), dir.join("bundles"), &cfg).unwrap();
        let b = make_bundle(dir, "pdm", "1.0.0", None, &root(), 50_000);
        let rec = store
            .upload_reader(std::fs::File::open(&b).unwrap(), "ops", NOW_MS)
            .unwrap()
            .record;
        (Arc::new(store), rec.sha256, std::fs::read(&b).unwrap())
    }

    fn request(sha: &str, from: u32, count: u32) -> Vec<u8> {
        format!(r#"{{"v":1,"sha256":"{sha}","from":{from},"count":{count}}}"#).into_bytes()
    }

    #[test]
    fn frames_reassemble_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sha, bytes) = store_with_bundle(dir.path());
        let (publisher, sent) = crate::link::recorder();
        let d = Delivery::new(store, 4096, publisher);
        let chunks = chunk_count(bytes.len() as u64, 4096);
        assert!(chunks > 3, "{chunks}");
        // ask in windows of 3, like a device would
        let mut from = 0;
        while from < chunks {
            d.on_request("dev-1", &request(&sha, from, 3));
            from += 3;
        }
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), chunks as usize);
        let mut joined = Vec::new();
        for (i, (dev, leaf, payload)) in sent.iter().enumerate() {
            assert_eq!((dev.as_str(), leaf.as_str()), ("dev-1", CHUNK_LEAF));
            let f = decode_frame(payload).unwrap();
            assert_eq!(f.header.index as usize, i);
            assert_eq!(f.header.chunks, chunks);
            assert_eq!(f.header.bundle_bytes, bytes.len() as u64);
            joined.extend_from_slice(&f.data);
        }
        assert_eq!(joined, bytes);
        // the framing matches shared::delivery::frame_for byte for byte
        assert_eq!(
            sent[1].2,
            shared::delivery::frame_for(&bytes, &sha, 4096, 1).unwrap()
        );
        let c = d.counters();
        assert_eq!(c.chunks.load(Ordering::Relaxed), u64::from(chunks));
        assert_eq!(c.bytes.load(Ordering::Relaxed), bytes.len() as u64);
        assert_eq!(c.errors.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn unknown_bundles_bad_requests_and_past_the_end_get_error_frames() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sha, _) = store_with_bundle(dir.path());
        let (publisher, sent) = crate::link::recorder();
        let d = Delivery::new(store, 4096, publisher);
        let unknown = "ab".repeat(32);
        d.on_request("dev-1", &request(&unknown, 0, 4));
        d.on_request("dev-1", &request(&sha, 0, 17));
        d.on_request("dev-1", &request(&sha, 1000, 1));
        d.on_request("dev-1", b"not json");
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 4);
        let frames: Vec<_> = sent.iter().map(|s| decode_frame(&s.2).unwrap()).collect();
        assert_eq!(frames[0].header.sha256, unknown);
        assert!(frames[0]
            .header
            .error
            .as_deref()
            .unwrap()
            .contains("unknown bundle"));
        assert!(frames[1].header.error.as_deref().unwrap().contains("count"));
        assert_eq!(frames[1].header.sha256, sha);
        assert!(frames[2]
            .header
            .error
            .as_deref()
            .unwrap()
            .contains("past the end"));
        assert!(frames[3].header.error.is_some());
        assert_eq!(d.counters().errors.load(Ordering::Relaxed), 4);
        assert_eq!(d.counters().chunks.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_full_publisher_ends_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sha, _) = store_with_bundle(dir.path());
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let publisher: Publisher =
            Arc::new(move |_d: &str, _l: &str, _p: Vec<u8>| c.fetch_add(1, Ordering::Relaxed) < 2);
        let d = Delivery::new(store, 4096, publisher);
        d.on_request("dev-1", &request(&sha, 0, 8));
        assert_eq!(calls.load(Ordering::Relaxed), 3);
        assert_eq!(d.counters().chunks.load(Ordering::Relaxed), 2);
        assert_eq!(d.counters().publish_failed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn many_devices_at_once_are_bounded_and_all_served() {
        let dir = tempfile::tempdir().unwrap();
        let (store, sha, bytes) = store_with_bundle(dir.path());
        // the publisher holds the workers until every request was submitted
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::<String>::new()));
        let (o, s) = (open.clone(), sent.clone());
        let publisher: Publisher = Arc::new(move |d: &str, _l: &str, _p: Vec<u8>| {
            while !o.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            s.lock().unwrap().push(d.to_string());
            true
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(8)
            .build()
            .unwrap();
        let d = Delivery::with_limits(store, 4096, publisher, 2, 50);
        let chunks = chunk_count(bytes.len() as u64, 4096).min(4);
        rt.block_on(async {
            for i in 0..60 {
                d.on_request(&format!("dev-{i}"), &request(&sha, 0, 4));
            }
            // a second request of a waiting device replaces the first
            d.on_request("dev-10", &request(&sha, 1, 4));
        });
        // 2 running, 50 waiting, 8 dropped
        assert_eq!(d.pending(), 50);
        let c = d.counters();
        assert_eq!(c.dropped.load(Ordering::Relaxed), 8);
        assert_eq!(c.superseded.load(Ordering::Relaxed), 1);
        open.store(true, Ordering::Release);
        let ok = (0..1000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            d.pending() == 0 && d.shared.lock().running == 0
        });
        assert!(ok, "workers did not drain the queue");
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len() as u64, 52 * u64::from(chunks));
        assert!(!sent.iter().any(|d| d == "dev-52" || d == "dev-59"));
        assert_eq!(
            sent.iter().filter(|d| *d == "dev-10").count() as u32,
            chunks
        );
        drop(rt);
    }
}
