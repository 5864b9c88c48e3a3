//! The warm pool: at most one ready sandbox per agent, prepared in the
//! background after a call, so the next call of that agent skips bwrap's
//! start-up (namespaces, mounts, uid drop, seccomp, cgroups, rlimits).
//!
//! A warm sandbox is a complete call sandbox whose bash is blocked reading
//! the command from its stdin (see `bwrap::WARM_LOADER`); it serves exactly
//! one call and is never reused. This module owns the pool (per-agent slots,
//! the size bound, the idle TTL) and the thread that prepares and expires
//! sandboxes. It does not build sandboxes itself (the `make` function given
//! by `bwrap` does) and never runs a command: `bwrap` writes the command.
//!
//! Lifetime: sandboxes are forked by the pool's own thread, which lives as
//! long as the pool, because bwrap's `--die-with-parent` is tied to the
//! forking *thread*. Dropping the pool kills every warm sandbox (their bwrap
//! children are `kill_on_drop`) and ends the thread.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use crate::cgroup::CallCgroup;
use crate::exec::SandboxError;

/// What a warm sandbox was built for: the agent directory and its
/// config.json (the file bound read-only), by device and inode. A call uses
/// a warm sandbox only when both still match what its path names now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    dir: (u64, u64),
    config: Option<(u64, u64, i64, i64)>,
}

impl Identity {
    /// From the handles the sandbox mounts.
    pub(crate) fn of_handles(dir: &OwnedFd, config: Option<&OwnedFd>) -> std::io::Result<Self> {
        let d = rustix::fs::fstat(dir)?;
        let config = match config {
            Some(fd) => {
                let c = rustix::fs::fstat(fd)?;
                Some((c.st_dev, c.st_ino, c.st_ctime, c.st_ctime_nsec as i64))
            }
            None => None,
        };
        Ok(Identity { dir: (d.st_dev, d.st_ino), config })
    }

    /// What `data_dir` names now (config.json only when a regular file, as
    /// `ownership::open_agent_dir` decides); `None` when it cannot be read.
    pub(crate) fn of_path(data_dir: &Path) -> Option<Self> {
        let d = std::fs::metadata(data_dir).ok()?;
        let config = match std::fs::symlink_metadata(data_dir.join(crate::ownership::CONFIG_FILE)) {
            Ok(c) if c.file_type().is_file() => Some((c.dev(), c.ino(), c.ctime(), c.ctime_nsec())),
            _ => None,
        };
        Some(Identity { dir: (d.dev(), d.ino()), config })
    }
}

/// A started sandbox waiting for its command.
#[derive(Debug)]
pub(crate) struct Warm {
    pub(crate) child: tokio::process::Child,
    pub(crate) output: std::io::PipeReader,
    pub(crate) cgroup: CallCgroup,
    /// The loader's stdin: the command, NUL-terminated, goes here.
    pub(crate) command: std::io::PipeWriter,
    /// The agent directory (for adopting files written since).
    pub(crate) dir: OwnedFd,
    pub(crate) uid: u32,
    pub(crate) identity: Identity,
    pub(crate) ready_at: Instant,
}

/// Counters of the pool, for tests, benches and the health report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WarmStats {
    /// Warm sandboxes started.
    pub prepared: u64,
    /// Calls served by a warm sandbox.
    pub taken: u64,
    /// Warm sandboxes dropped unused: idle past the TTL, evicted by the size
    /// bound, or stale (agent dir or config.json replaced, sandbox died).
    pub discarded: u64,
    /// Warm sandboxes alive now.
    pub ready: u64,
}

#[derive(Debug, Default)]
struct Counters {
    prepared: AtomicU64,
    taken: AtomicU64,
    discarded: AtomicU64,
}

/// Builds a warm sandbox for an agent directory (on the pool thread).
pub(crate) type Maker = Box<dyn Fn(&Path) -> Result<Warm, SandboxError> + Send>;

struct Job {
    data_dir: PathBuf,
    handle: Handle,
}

#[derive(Debug)]
pub(crate) struct Pool {
    ready: Arc<Mutex<HashMap<PathBuf, Warm>>>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    counters: Arc<Counters>,
    idle: Duration,
    max: usize,
}

impl Pool {
    pub(crate) fn new(idle: Duration, max: usize) -> Self {
        Pool {
            ready: Arc::default(),
            jobs: Mutex::new(None),
            counters: Arc::default(),
            idle: idle.max(Duration::from_millis(100)),
            max: max.max(1),
        }
    }

    /// Takes the agent's warm sandbox when one is ready, alive and built for
    /// what `data_dir` names now; a stale one is discarded.
    pub(crate) fn take(&self, data_dir: &Path) -> Option<Warm> {
        let mut warm = lock(&self.ready).remove(data_dir)?;
        let fresh = Identity::of_path(data_dir) == Some(warm.identity);
        let alive = matches!(warm.child.try_wait(), Ok(None));
        if fresh && alive {
            self.counters.taken.fetch_add(1, Ordering::Relaxed);
            Some(warm)
        } else {
            self.counters.discarded.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// One line for the health report.
    pub(crate) fn describe(&self) -> String {
        format!("one ready sandbox per agent active in the last {} s, at most {} in all", self.idle.as_secs(), self.max)
    }

    pub(crate) fn is_ready(&self, data_dir: &Path) -> bool {
        lock(&self.ready).contains_key(data_dir)
    }

    pub(crate) fn stats(&self) -> WarmStats {
        WarmStats {
            prepared: self.counters.prepared.load(Ordering::Relaxed),
            taken: self.counters.taken.load(Ordering::Relaxed),
            discarded: self.counters.discarded.load(Ordering::Relaxed),
            ready: lock(&self.ready).len() as u64,
        }
    }

    /// Asks the pool thread to prepare a sandbox for `data_dir` (unless one
    /// is ready). `make` is called once, to start the thread. Needs a tokio
    /// runtime (the sandbox's child is registered with it); without one,
    /// nothing happens.
    pub(crate) fn request(&self, data_dir: &Path, make: impl FnOnce() -> Maker) {
        let Ok(handle) = Handle::try_current() else { return };
        if self.is_ready(data_dir) {
            return;
        }
        let mut jobs = lock(&self.jobs);
        if jobs.is_none() {
            let (tx, rx) = mpsc::channel();
            let (ready, counters, idle, max) = (self.ready.clone(), self.counters.clone(), self.idle, self.max);
            let maker = make();
            let spawned = std::thread::Builder::new()
                .name("tinyfat-sandbox-warm".into())
                .spawn(move || pool_thread(rx, maker, ready, counters, idle, max));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the warm sandbox thread; calls start cold");
                return;
            }
            *jobs = Some(tx);
        }
        if let Some(tx) = jobs.as_ref() {
            let _ = tx.send(Job { data_dir: data_dir.to_path_buf(), handle });
        }
    }
}

impl Drop for Pool {
    /// Ends the thread and kills every warm sandbox now.
    fn drop(&mut self) {
        lock(&self.jobs).take();
        let all: Vec<Warm> = lock(&self.ready).drain().map(|(_, w)| w).collect();
        drop(all);
    }
}

/// Prepares requested sandboxes and expires idle ones, until the pool is
/// dropped. Sandboxes are forked here, so they live with this thread.
fn pool_thread(
    rx: mpsc::Receiver<Job>,
    make: Maker,
    ready: Arc<Mutex<HashMap<PathBuf, Warm>>>,
    counters: Arc<Counters>,
    idle: Duration,
    max: usize,
) {
    let tick = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    let mut handle: Option<Handle> = None;
    loop {
        match rx.recv_timeout(tick) {
            Ok(job) => {
                let _entered = job.handle.enter();
                handle = Some(job.handle.clone());
                if lock(&ready).contains_key(&job.data_dir) {
                    continue;
                }
                match make(&job.data_dir) {
                    Ok(warm) => {
                        counters.prepared.fetch_add(1, Ordering::Relaxed);
                        let evicted = {
                            let mut ready = lock(&ready);
                            let mut evicted = Vec::new();
                            while ready.len() >= max {
                                let Some(oldest) = ready.iter().min_by_key(|(_, w)| w.ready_at).map(|(k, _)| k.clone())
                                else {
                                    break;
                                };
                                evicted.extend(ready.remove(&oldest));
                            }
                            ready.insert(job.data_dir, warm);
                            evicted
                        };
                        counters.discarded.fetch_add(evicted.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => tracing::debug!(error = %e, "warm sandbox not prepared; the next call starts cold"),
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let _entered = handle.as_ref().map(Handle::enter);
        let expired: Vec<Warm> = {
            let mut ready = lock(&ready);
            let old: Vec<PathBuf> =
                ready.iter().filter(|(_, w)| w.ready_at.elapsed() >= idle).map(|(k, _)| k.clone()).collect();
            old.iter().filter_map(|k| ready.remove(k)).collect()
        };
        counters.discarded.fetch_add(expired.len() as u64, Ordering::Relaxed);
        drop(expired);
    }
    let _entered = handle.as_ref().map(Handle::enter);
    let all: Vec<Warm> = lock(&ready).drain().map(|(_, w)| w).collect();
    drop(all);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
