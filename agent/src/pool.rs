//! The scoring pool: a fixed set of threads (one per core by default) that run inference for
//! the HTTP and MQTT APIs, fed through a bounded queue.
//!
//! Why not tokio's blocking pool: it grows a thread per concurrent request (up to 512), and
//! on a 2-core box those threads spend their time waking each other (futex, scheduling) and
//! keep per-thread malloc arenas after the load. It also runs installs, inbox scans and
//! health checks, and a long install must not delay predictions. Here the thread count is
//! fixed, the queue holds at most `capacity` jobs (a full queue answers "busy" at once rather
//! than queueing without bound), and a panicking job is caught and reported, not fatal.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Why a job did not run to completion.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("busy: {0} jobs queued; retry shortly")]
    Busy(usize),
    #[error("the scoring pool is shut down")]
    Closed,
    #[error("the scoring job panicked")]
    Panicked,
}

/// A fixed-size thread pool with a bounded queue. Dropping it lets the threads finish the
/// queued jobs and exit.
#[derive(Debug)]
pub struct ScoringPool {
    tx: SyncSender<Job>,
    threads: usize,
    capacity: usize,
}

impl ScoringPool {
    /// Starts `threads` threads (0: one per available core) with a queue of `capacity`
    /// jobs.
    pub fn new(threads: usize, capacity: usize) -> std::io::Result<ScoringPool> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let capacity = capacity.max(1);
        let (tx, rx) = sync_channel::<Job>(capacity);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("edge-score-{i}"))
                .spawn(move || worker(&rx))?;
        }
        Ok(ScoringPool {
            tx,
            threads,
            capacity,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on the pool and waits (asynchronously) for its result. Refuses at once with
    /// [`PoolError::Busy`] when the queue is full.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, PoolError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let r = catch_unwind(AssertUnwindSafe(f));
            let _ = tx.send(r);
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(PoolError::Busy(self.capacity)),
            Err(TrySendError::Disconnected(_)) => return Err(PoolError::Closed),
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(PoolError::Panicked),
            Err(_) => Err(PoolError::Closed),
        }
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = match rx.lock() {
            Ok(r) => r.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(_) => return, // the pool was dropped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_bounds_the_queue_and_survives_panics() {
        let pool = ScoringPool::new(1, 2).unwrap();
        assert_eq!(pool.run(|| 6 * 7).await, Ok(42));
        assert_eq!(
            pool.run(|| -> u32 { panic!("boom") }).await,
            Err(PoolError::Panicked)
        );
        // the thread survived the panic
        assert_eq!(pool.run(|| 1).await, Ok(1));

        // one job blocks the only thread, two fill the queue, the next is refused
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let pool = Arc::new(pool);
        let p = pool.clone();
        let blocker = tokio::spawn(async move {
            p.run(move || {
                let _ = started_tx.send(());
                let _ = gate.recv();
            })
            .await
        });
        let mut waited = 0;
        while started.try_recv().is_err() {
            assert!(waited < 2000, "the blocking job never started");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            waited += 1;
        }
        let mut queued = Vec::new();
        for _ in 0..2 {
            let p = pool.clone();
            queued.push(tokio::spawn(async move { p.run(|| 2).await }));
        }
        // let both spawned tasks reach try_send
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(pool.run(|| 3).await, Err(PoolError::Busy(2)));
        release.send(()).unwrap();
        assert_eq!(blocker.await.unwrap(), Ok(()));
        for h in queued {
            assert_eq!(h.await.unwrap(), Ok(2));
        }
    }
}
