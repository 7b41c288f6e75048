//! The writer pool: a fixed number of threads that write and sync every
//! log given to them, so an idle log costs no thread.
//!
//! A log is bound to one worker for its life, so its batches are written by
//! one thread at a time, in offset order. The first append that finds an
//! idle log puts the log on its worker's run queue (`Sched::queued` makes
//! that happen once); the worker then *serves* it ([`super::writer::serve`]:
//! one write, and under `always` its sync) and puts it back at the end of
//! the queue while it has work, or sets a timer when the log waits for a
//! deferred batch, an interval sync or a rewind retry. Serving one log at a
//! time from the front of the queue keeps the logs of a worker fair.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::Shared;
use super::writer::{Next, serve};

/// Writer threads a broker's logs share. Cloning shares the pool; the
/// threads stop when the last clone (and every log using it) is gone.
#[derive(Debug, Clone)]
pub struct WriterPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    workers: Vec<Arc<Worker>>,
    /// The worker the next log is bound to.
    next: AtomicUsize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// One writer thread's queue.
#[derive(Debug, Default)]
pub(super) struct Worker {
    state: Mutex<WorkerState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct WorkerState {
    ready: VecDeque<Arc<Shared>>,
    /// Logs to serve again at a time; a log served before its timer fires
    /// is served once more for nothing, which is harmless.
    timers: BTreeMap<(Instant, u64), Weak<Shared>>,
    timer_seq: u64,
    stop: bool,
}

/// A log's place in its worker's schedule (under `Shared::sched`).
#[derive(Debug)]
pub(super) struct Sched {
    /// On its worker's run queue.
    pub queued: bool,
    /// Its writer has finished for good (the log is closed).
    pub finished: bool,
    /// Written since its last fdatasync (`interval` mode).
    pub unsynced: bool,
    pub last_sync: Instant,
    /// When a failed log tries its rewind again.
    pub recover_at: Option<Instant>,
}

impl Default for Sched {
    fn default() -> Self {
        Self {
            queued: false,
            finished: false,
            unsynced: false,
            last_sync: Instant::now(),
            recover_at: None,
        }
    }
}

impl WriterPool {
    /// A pool of `threads` writer threads (at least one).
    ///
    /// # Errors
    /// If a thread cannot be started.
    pub fn new(threads: usize) -> std::io::Result<WriterPool> {
        let workers: Vec<Arc<Worker>> = (0..threads.max(1))
            .map(|_| Arc::new(Worker::default()))
            .collect();
        let mut handles = Vec::with_capacity(workers.len());
        for (i, worker) in workers.iter().enumerate() {
            let worker = worker.clone();
            let handle = std::thread::Builder::new()
                .name(format!("courier-writer-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || worker.run());
            match handle {
                Ok(h) => handles.push(h),
                Err(e) => {
                    for w in &workers {
                        w.stop();
                    }
                    return Err(e);
                }
            }
        }
        Ok(WriterPool {
            inner: Arc::new(PoolInner {
                workers,
                next: AtomicUsize::new(0),
                threads: Mutex::new(handles),
            }),
        })
    }

    /// Number of writer threads.
    pub fn threads(&self) -> usize {
        self.inner.workers.len()
    }

    /// The worker a new log is bound to (round robin).
    pub(super) fn assign(&self) -> Arc<Worker> {
        let i = self.inner.next.fetch_add(1, Ordering::Relaxed) % self.inner.workers.len();
        self.inner.workers[i].clone()
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        for w in &self.workers {
            w.stop();
        }
        for h in self.threads.lock().drain(..) {
            let _ = h.join();
        }
    }
}

impl Worker {
    fn stop(&self) {
        self.state.lock().stop = true;
        self.wake.notify_all();
    }

    /// Puts `log` on the run queue unless it is there already or finished.
    pub(super) fn kick(&self, log: &Arc<Shared>) {
        {
            let mut sched = log.sched.lock();
            if sched.queued || sched.finished {
                return;
            }
            sched.queued = true;
        }
        self.state.lock().ready.push_back(log.clone());
        self.wake.notify_one();
    }

    fn serve_at(&self, at: Instant, log: &Arc<Shared>) {
        let mut st = self.state.lock();
        st.timer_seq += 1;
        let seq = st.timer_seq;
        st.timers.insert((at, seq), Arc::downgrade(log));
    }

    fn run(&self) {
        while let Some(log) = self.next_log() {
            log.sched.lock().queued = false;
            match serve(&log) {
                Next::Again => self.kick(&log),
                Next::At(at) => self.serve_at(at, &log),
                Next::Idle => {}
                Next::Finished => {
                    log.sched.lock().finished = true;
                    log.finished.notify_all();
                }
            }
        }
    }

    /// Waits for the next log to serve; `None` once the pool stops.
    fn next_log(&self) -> Option<Arc<Shared>> {
        let mut st = self.state.lock();
        loop {
            let now = Instant::now();
            while let Some(entry) = st.timers.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                if let Some(log) = entry.remove().upgrade() {
                    st.ready.push_back(log);
                }
            }
            if let Some(log) = st.ready.pop_front() {
                return Some(log);
            }
            if st.stop {
                return None;
            }
            match st.timers.keys().next().map(|(at, _)| *at) {
                Some(at) => {
                    self.wake.wait_until(&mut st, at);
                }
                None => self.wake.wait(&mut st),
            }
        }
    }
}
