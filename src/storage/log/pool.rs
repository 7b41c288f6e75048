//! The writer pool: a fixed number of threads that write and sync every
//! log given to them, so an idle log costs no thread and one sync covers
//! the appends of many logs.
//!
//! A log is bound to one worker for its life, so its batches are written by
//! one thread at a time, in offset order. The first append that finds an
//! idle log puts the log on its worker's run queue (`Sched::queued` makes
//! that happen once). The worker works in *rounds*: it takes every log on
//! its queue and serves each once ([`super::writer::serve`]: one write);
//! then it syncs the files of all the logs that need it with as few syncs
//! as the file system allows (one [`WholeSync`] per file system where two
//! or more files of the round are on one that offers it, one fdatasync per
//! file otherwise, and per file again after a whole sync fails, to find
//! which); then it completes each log's appends, or fails and rewinds the
//! logs whose file failed. A log with more work goes back at the end of the
//! queue for the next round; one waiting for a deferred batch, an interval
//! sync or a rewind retry gets a timer. Appends that arrive during a round
//! wait for the next: under load, each round's sync covers every log of
//! the worker that was written meanwhile (group commit across logs).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use super::Shared;
use super::writer::{Next, Served, Unsynced, finish, serve};
use crate::storage::error::Result;
use crate::storage::io::WholeSync;

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
    whole_syncs: bool,
}

/// What a pool's rounds have done since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    /// Rounds that synced at least one log.
    pub sync_rounds: u64,
    /// Logs made durable by those rounds (a log counts once per round).
    pub logs_synced: u64,
    /// Whole-file-system syncs (`syncfs`) made.
    pub whole_syncs: u64,
    /// Whole syncs that failed (each file of the round was then synced on
    /// its own).
    pub whole_sync_failures: u64,
    /// Single-file syncs (fdatasync) made by rounds.
    pub file_syncs: u64,
}

#[derive(Debug, Default)]
struct Counters {
    sync_rounds: AtomicU64,
    logs_synced: AtomicU64,
    whole_syncs: AtomicU64,
    whole_sync_failures: AtomicU64,
    file_syncs: AtomicU64,
}

/// One writer thread's queue.
#[derive(Debug, Default)]
pub(super) struct Worker {
    state: Mutex<WorkerState>,
    wake: Condvar,
    counters: Counters,
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
    /// A pool of `threads` writer threads (at least one) that uses whole
    /// syncs where the file system offers them ([`crate::storage::Fs::whole_sync`]).
    ///
    /// # Errors
    /// If a thread cannot be started.
    pub fn new(threads: usize) -> std::io::Result<WriterPool> {
        Self::with_whole_syncs(threads, true)
    }

    /// A pool that uses whole syncs where offered only if `whole_syncs`;
    /// otherwise it syncs each file a round wrote.
    ///
    /// # Errors
    /// If a thread cannot be started.
    pub fn with_whole_syncs(threads: usize, whole_syncs: bool) -> std::io::Result<WriterPool> {
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
                whole_syncs,
            }),
        })
    }

    /// Number of writer threads.
    pub fn threads(&self) -> usize {
        self.inner.workers.len()
    }

    /// Whether logs of this pool may use a whole sync.
    pub(super) fn whole_syncs(&self) -> bool {
        self.inner.whole_syncs
    }

    /// What the pool's rounds have done so far.
    pub fn stats(&self) -> WriterStats {
        let mut total = WriterStats::default();
        for w in &self.inner.workers {
            let c = &w.counters;
            total.sync_rounds += c.sync_rounds.load(Ordering::Relaxed);
            total.logs_synced += c.logs_synced.load(Ordering::Relaxed);
            total.whole_syncs += c.whole_syncs.load(Ordering::Relaxed);
            total.whole_sync_failures += c.whole_sync_failures.load(Ordering::Relaxed);
            total.file_syncs += c.file_syncs.load(Ordering::Relaxed);
        }
        total
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
        let mut round = Vec::new();
        let mut unsynced = Vec::new();
        while self.next_round(&mut round) {
            for log in round.drain(..) {
                log.sched.lock().queued = false;
                match serve(&log) {
                    Served::Next(next) => self.then(&log, next),
                    Served::Sync(u) => unsynced.push((log, u)),
                }
            }
            if unsynced.is_empty() {
                continue;
            }
            let outcomes = self.sync(&unsynced);
            for ((log, u), outcome) in unsynced.drain(..).zip(outcomes) {
                let next = finish(&log, u, outcome);
                self.then(&log, next);
            }
        }
    }

    fn then(&self, log: &Arc<Shared>, next: Next) {
        match next {
            Next::Again => self.kick(log),
            Next::At(at) => self.serve_at(at, log),
            Next::Idle => {}
            Next::Finished => {
                log.sched.lock().finished = true;
                log.finished.notify_all();
            }
        }
    }

    /// Makes the files of a round's logs durable: one whole sync for each
    /// file system that offers it and holds two or more of them, an
    /// fdatasync for every other file (and for each file of a whole sync
    /// that failed, to find which). Returns each log's outcome.
    fn sync(&self, round: &[(Arc<Shared>, Unsynced)]) -> Vec<Result<()>> {
        let c = &self.counters;
        c.sync_rounds.fetch_add(1, Ordering::Relaxed);
        c.logs_synced
            .fetch_add(round.len() as u64, Ordering::Relaxed);
        let mut outcomes: Vec<Option<Result<()>>> = round.iter().map(|_| None).collect();
        let mut groups: BTreeMap<u64, (Arc<dyn WholeSync>, Vec<usize>)> = BTreeMap::new();
        for (i, (log, _)) in round.iter().enumerate() {
            if let Some(whole) = &log.whole_sync {
                groups
                    .entry(whole.id())
                    .or_insert_with(|| (whole.clone(), Vec::new()))
                    .1
                    .push(i);
            }
        }
        for (whole, logs) in groups.values() {
            if logs.len() < 2 {
                continue; // one file: its own fdatasync syncs less
            }
            c.whole_syncs.fetch_add(1, Ordering::Relaxed);
            match whole.sync_all() {
                Ok(()) => {
                    for &i in logs {
                        outcomes[i] = Some(Ok(()));
                    }
                }
                Err(e) => {
                    c.whole_sync_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, logs = logs.len(), "syncfs failed; syncing each file of the round to find which failed");
                }
            }
        }
        outcomes
            .into_iter()
            .zip(round)
            .map(|(outcome, (_, u))| {
                outcome.unwrap_or_else(|| {
                    c.file_syncs.fetch_add(1, Ordering::Relaxed);
                    u.sync_file()
                })
            })
            .collect()
    }

    /// Waits for logs to serve and takes every one that is ready into
    /// `round`; false once the pool stops.
    fn next_round(&self, round: &mut Vec<Arc<Shared>>) -> bool {
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
            if !st.ready.is_empty() {
                round.extend(st.ready.drain(..));
                return true;
            }
            if st.stop {
                return false;
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
