//! The broker process of `--spawn-broker`: [`SpawnedBroker`] runs
//! `courier serve` (this binary or the one given) on 127.0.0.1 with its own
//! data directory, learns its address from the `listening on` log line,
//! keeps the tail of its stderr for error messages, and stops it with
//! SIGTERM (timed, for the `backlog` restart) or kills it when dropped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// How long a spawned broker may take to print its listening line (a
/// restart over a large backlog recovers first).
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a spawned broker may take to exit after SIGTERM.
const BROKER_STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// Stderr lines of a spawned broker kept for error messages.
const BROKER_STDERR_TAIL: usize = 20;

/// A `courier serve` child process on 127.0.0.1 with its own data
/// directory. Dropping it kills the process.
pub(super) struct SpawnedBroker {
    exe: PathBuf,
    pub(super) data_dir: PathBuf,
    child: Option<Child>,
    addr: String,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl SpawnedBroker {
    /// Starts the broker and waits for its listening line; returns it with
    /// the time from spawn to that line.
    pub(super) async fn start(
        exe: &Path,
        data_dir: &Path,
    ) -> anyhow::Result<(SpawnedBroker, Duration)> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let mut broker = SpawnedBroker {
            exe: exe.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            child: None,
            addr: String::new(),
            stderr_tail: Arc::new(Mutex::new(VecDeque::new())),
        };
        let took = broker.restart().await?;
        Ok((broker, took))
    }

    /// The broker's gRPC URL, `http://127.0.0.1:PORT`.
    pub(super) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The process id (0 when not running).
    pub(super) fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The last stderr lines of the broker, joined with ` | `.
    fn tail(&self) -> String {
        let tail = self.stderr_tail.lock();
        tail.iter().cloned().collect::<Vec<_>>().join(" | ")
    }

    /// Spawns `courier serve --listen 127.0.0.1:0 --data-dir DIR` and waits
    /// for `listening on ADDR` on its stderr; returns spawn-to-line time.
    pub(super) async fn restart(&mut self) -> anyhow::Result<Duration> {
        let spawned_at = Instant::now();
        let mut child = std::process::Command::new(&self.exe)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--log-format")
            .arg("human")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} serve", self.exe.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("the broker's stderr is not piped"))?;
        self.child = Some(child);
        let (tx, rx) = oneshot::channel();
        let tail = self.stderr_tail.clone();
        tail.lock().clear();
        // Reads stderr to the end (so the broker never blocks on a full
        // pipe), reporting the listening address once.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listening_addr(&line) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr);
                    }
                }
                let mut tail = tail.lock();
                if tail.len() == BROKER_STDERR_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        match tokio::time::timeout(BROKER_START_TIMEOUT, rx).await {
            Ok(Ok(addr)) => {
                self.addr = addr;
                Ok(spawned_at.elapsed())
            }
            Ok(Err(_)) => {
                let status = self.child.as_mut().and_then(|c| c.wait().ok());
                self.child = None;
                bail!(
                    "the spawned broker exited before listening ({}): {}",
                    status.map_or("unknown status".to_string(), |s| s.to_string()),
                    self.tail()
                )
            }
            Err(_) => bail!(
                "the spawned broker did not listen within {}s: {}",
                BROKER_START_TIMEOUT.as_secs(),
                self.tail()
            ),
        }
    }

    /// Sends SIGTERM and waits for the process to exit; returns the time
    /// that took and the exit status.
    pub(super) async fn stop(&mut self) -> anyhow::Result<(Duration, ExitStatus)> {
        let Some(mut child) = self.child.take() else {
            bail!("the spawned broker is not running");
        };
        let pid = libc::pid_t::try_from(child.id()).context("broker pid")?;
        let start = Instant::now();
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own child, not yet reaped.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            let e = std::io::Error::last_os_error();
            let _ = child.kill();
            let _ = child.wait();
            bail!("sending SIGTERM to the spawned broker: {e}");
        }
        let waiter = tokio::task::spawn_blocking(move || {
            let status = child.wait();
            (child, status)
        });
        match tokio::time::timeout(BROKER_STOP_TIMEOUT, waiter).await {
            Ok(Ok((_, Ok(status)))) => Ok((start.elapsed(), status)),
            Ok(Ok((_, Err(e)))) => Err(anyhow!("waiting for the spawned broker: {e}")),
            Ok(Err(e)) => Err(anyhow!("waiting for the spawned broker: {e}")),
            Err(_) => {
                // The waiter still owns the child; kill it by pid.
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                bail!(
                    "the spawned broker did not exit within {}s of SIGTERM; killed it: {}",
                    BROKER_STOP_TIMEOUT.as_secs(),
                    self.tail()
                )
            }
        }
    }
}

impl Drop for SpawnedBroker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The address in the broker's `... listening on ADDR ...` log line.
fn listening_addr(line: &str) -> Option<String> {
    let rest = &line[line.find("listening on ")? + "listening on ".len()..];
    let addr = rest.split_whitespace().next()?;
    Some(addr.trim_end_matches([',', ')']).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_the_address() {
        let line = "2025-01-01T00:00:00.000000Z  INFO courier::cli::serve: courier listening on 127.0.0.1:40123 (data dir /tmp/x, fsync always)";
        assert_eq!(listening_addr(line).as_deref(), Some("127.0.0.1:40123"));
        assert_eq!(listening_addr("starting"), None);
    }
}
