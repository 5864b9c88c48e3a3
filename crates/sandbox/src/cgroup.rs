//! Per-call cgroups: a memory and a pids limit for one tool call's whole
//! process tree, and a reliable "every process of the call is gone" check.
//!
//! Detection happens once per executor. Calls get a child cgroup of
//! `<our own cgroup>/tinyfat-sandbox` in each available v1 controller
//! (`memory`, `pids`), so operator limits on the platform also bound its
//! tools. cgroup v2 (unified) is detected and reported but not used: creating
//! controller-enabled children needs a delegated subtree without processes,
//! which a plain service cgroup is not.
//!
//! Invariant: nothing here may fail a tool call. Every error degrades to
//! "no cgroup" and a log line; rlimits still apply.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{Pid, Signal, kill_process};

const PARENT_NAME: &str = "tinyfat-sandbox";
/// How long cleanup waits for the processes of a call to disappear.
const EMPTY_WAIT_MS: u64 = 2_000;
const EMPTY_POLL_MS: u64 = 5;
/// Processes bwrap itself keeps in the call (outer, pid 1, setup helpers).
const BWRAP_OWN_PROCESSES: u64 = 8;
/// Numbers call cgroups uniquely across all executors of this process.
static CALL_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug)]
pub(crate) struct Cgroups {
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    report: String,
    /// Call cgroups created and not yet removed (cleanup of a normal exit
    /// runs in the background); dropping the executor sweeps them.
    live: Live,
}

type Live = Arc<Mutex<HashSet<PathBuf>>>;

impl Cgroups {
    /// No cgroups: calls get rlimits only.
    pub(crate) fn disabled(report: &str) -> Self {
        Cgroups { memory: None, pids: None, report: report.to_string(), live: Live::default() }
    }

    /// Finds the controllers and prepares our parent cgroups.
    pub(crate) fn detect() -> Self {
        let none = |report: String| Cgroups { memory: None, pids: None, report, live: Live::default() };
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() && !Path::new("/sys/fs/cgroup/memory").exists() {
            return none(
                "cgroup v2 detected: per-call cgroups are not used (needs a delegated subtree); \
                 memory is bounded by RLIMIT_AS only"
                    .into(),
            );
        }
        let (Ok(mountinfo), Ok(own)) =
            (fs::read_to_string("/proc/self/mountinfo"), fs::read_to_string("/proc/self/cgroup"))
        else {
            return none("cgroups: /proc/self/mountinfo or /proc/self/cgroup unreadable".into());
        };
        let memory = prepare_parent(&mountinfo, &own, "memory");
        let pids = prepare_parent(&mountinfo, &own, "pids");
        let describe = |name: &str, r: &Result<PathBuf, String>| match r {
            Ok(p) => format!("{name} at {}", p.display()),
            Err(e) => format!("{name} unavailable ({e})"),
        };
        let report = format!("cgroup v1: {}; {}", describe("memory", &memory), describe("pids", &pids));
        Cgroups { memory: memory.ok(), pids: pids.ok(), report, live: Live::default() }
    }

    pub(crate) fn report(&self) -> &str {
        &self.report
    }

    /// Creates the cgroups of one call with its limits. Missing
    /// controllers are skipped.
    pub(crate) fn create_call(&self, memory_bytes_max: u64, processes_max: u64) -> CallCgroup {
        let name = format!("c{}-{}", std::process::id(), CALL_COUNTER.fetch_add(1, Ordering::Relaxed));
        let mut dirs = Vec::new();
        if let Some(parent) = &self.memory {
            let dir = parent.join(&name);
            let made = create_call_dir(parent, &dir).and_then(|()| {
                fs::write(dir.join("memory.limit_in_bytes"), memory_bytes_max.to_string())?;
                // Where swap accounting exists, swap counts against the
                // same limit; elsewhere the file is missing.
                let _ = fs::write(dir.join("memory.memsw.limit_in_bytes"), memory_bytes_max.to_string());
                Ok(())
            });
            keep_or_log(made, dir, &mut dirs);
        }
        if let Some(parent) = &self.pids {
            let dir = parent.join(&name);
            let made = create_call_dir(parent, &dir)
                .and_then(|()| fs::write(dir.join("pids.max"), (processes_max + BWRAP_OWN_PROCESSES).to_string()));
            keep_or_log(made, dir, &mut dirs);
        }
        lock(&self.live).extend(dirs.iter().cloned());
        CallCgroup { dirs, live: self.live.clone() }
    }
}

/// Creates a call's cgroup; re-creates the parent when another executor
/// removed it while it was empty.
fn create_call_dir(parent: &Path, dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            match fs::create_dir(parent) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            fs::create_dir(dir)
        }
        other => other,
    }
}

fn keep_or_log(made: io::Result<()>, dir: PathBuf, dirs: &mut Vec<PathBuf>) {
    match made {
        Ok(()) => dirs.push(dir),
        Err(e) => {
            tracing::warn!(cgroup = %dir.display(), error = %e, "cannot set up call cgroup; continuing without it");
            let _ = fs::remove_dir(&dir);
        }
    }
}

/// `<mount of controller>/<our cgroup>/tinyfat-sandbox`, created, with
/// leftovers of dead processes removed.
fn prepare_parent(mountinfo: &str, own: &str, controller: &str) -> Result<PathBuf, String> {
    let (mount_point, mount_root) = mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut right = right.split_whitespace();
            let (fstype, _source, options) = (right.next()?, right.next()?, right.next()?);
            if fstype != "cgroup" || !options.split(',').any(|o| o == controller) {
                return None;
            }
            let left: Vec<&str> = left.split_whitespace().collect();
            Some((PathBuf::from(left.get(4)?), left.get(3)?.to_string()))
        })
        .ok_or_else(|| "controller not mounted".to_string())?;
    let own_path = own
        .lines()
        .find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == controller).then(|| path.to_string())
        })
        .ok_or_else(|| "not listed in /proc/self/cgroup".to_string())?;
    let relative = own_path.strip_prefix(mount_root.trim_end_matches('/')).unwrap_or(&own_path).trim_start_matches('/');
    let parent = mount_point.join(relative).join(PARENT_NAME);
    match fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", parent.display())),
    }
    remove_stale(&parent);
    Ok(parent)
}

/// Removes empty call cgroups whose creating process is gone (a crash).
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix('c'))
            .and_then(|n| n.split_once('-'))
            .map(|(pid, _)| pid.to_string())
        else {
            continue;
        };
        if !Path::new("/proc").join(&pid).exists() {
            let _ = fs::remove_dir(entry.path());
        }
    }
}

/// The cgroups of one call (possibly none).
#[derive(Debug)]
pub(crate) struct CallCgroup {
    dirs: Vec<PathBuf>,
    live: Live,
}

impl CallCgroup {
    /// Whether the call has any cgroup at all.
    pub(crate) fn is_active(&self) -> bool {
        !self.dirs.is_empty()
    }

    /// Moves `pid` into the call's cgroups. Call it before the process
    /// forks: children inherit, existing children do not move.
    pub(crate) fn join(&self, pid: u32) {
        for dir in &self.dirs {
            if let Err(e) = fs::write(dir.join("cgroup.procs"), pid.to_string()) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot join call cgroup");
            }
        }
    }
}

fn cgroup_pids(dirs: &[PathBuf]) -> Vec<i32> {
    let mut pids: Vec<i32> = dirs
        .iter()
        .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect::<Vec<_>>())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

impl CallCgroup {
    /// Waits until no process of the call is left (killing stragglers after
    /// a grace period), then removes the cgroups.
    pub(crate) async fn finish(mut self) {
        let dirs = std::mem::take(&mut self.dirs);
        finish_dirs(dirs, self.live.clone()).await;
    }

    /// Processes the kernel OOM-killed in the call's memory cgroup.
    pub(crate) fn oom_kills(&self) -> u64 {
        self.dirs
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("memory.oom_control")).ok())
            .filter_map(|s| {
                s.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse::<u64>().ok()))
            })
            .sum()
    }
}

impl Drop for CallCgroup {
    /// A call abandoned midway (its future dropped) still cleans up, in the
    /// background, once the killed processes are gone.
    fn drop(&mut self) {
        let dirs = std::mem::take(&mut self.dirs);
        if dirs.is_empty() {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(finish_dirs(dirs, self.live.clone()));
        }
    }
}

/// One pass of cleanup: true once every process is gone and every
/// directory removed. With `kill`, stragglers get SIGKILL (a pid read from
/// cgroup.procs is still ours unless it exited this very moment).
fn sweep(dirs: &[PathBuf], kill: bool) -> bool {
    let pids = cgroup_pids(dirs);
    if !pids.is_empty() {
        if kill {
            for pid in pids {
                if let Some(pid) = Pid::from_raw(pid) {
                    let _ = kill_process(pid, Signal::KILL);
                }
            }
        }
        return false;
    }
    for dir in dirs {
        let _ = fs::remove_dir(dir);
    }
    dirs.iter().all(|d| !d.exists())
}

/// Polls [`sweep`] for up to twice `EMPTY_WAIT_MS`, killing after the first.
async fn finish_dirs(dirs: Vec<PathBuf>, live: Live) {
    let polls = EMPTY_WAIT_MS / EMPTY_POLL_MS;
    let mut done = false;
    for i in 0..polls * 2 {
        if sweep(&dirs, i >= polls) {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(EMPTY_POLL_MS)).await;
    }
    forget(&live, &dirs, done);
}

fn finish_blocking(dirs: Vec<PathBuf>, live: &Live) {
    let polls = EMPTY_WAIT_MS / EMPTY_POLL_MS;
    let mut done = false;
    for i in 0..polls * 2 {
        if sweep(&dirs, i >= polls) {
            done = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(EMPTY_POLL_MS));
    }
    forget(live, &dirs, done);
}

fn forget(live: &Live, dirs: &[PathBuf], done: bool) {
    if !done {
        tracing::warn!(cgroups = ?dirs, "cannot remove call cgroups; processes are still in them");
    }
    let mut live = lock(live);
    for d in dirs {
        live.remove(d);
    }
}

fn lock(live: &Live) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
    live.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Cgroups {
    /// Sweeps call cgroups whose background cleanup has not run yet, then
    /// removes our parent cgroups when no call of any executor uses them,
    /// so the platform's own cgroup can be removed after it stops.
    fn drop(&mut self) {
        let pending: Vec<PathBuf> = lock(&self.live).iter().cloned().collect();
        if !pending.is_empty() {
            finish_blocking(pending, &self.live);
        }
        for parent in [self.memory.take(), self.pids.take()].into_iter().flatten() {
            let _ = fs::remove_dir(parent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_path_follows_mount_and_own_cgroup() {
        let mountinfo = "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n\
                         31 25 0:27 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n";
        let own = "4:memory:/svc/x\n8:pids:/\n";
        let dir = tempfile::tempdir().unwrap();
        // Point the mount at a temp dir so the function can create things.
        let mi = mountinfo.replace("/sys/fs/cgroup", dir.path().to_str().unwrap());
        std::fs::create_dir_all(dir.path().join("memory/svc/x")).unwrap();
        std::fs::create_dir_all(dir.path().join("pids")).unwrap();
        let p = prepare_parent(&mi, own, "memory").unwrap();
        assert_eq!(p, dir.path().join("memory/svc/x/tinyfat-sandbox"));
        let p = prepare_parent(&mi, own, "pids").unwrap();
        assert_eq!(p, dir.path().join("pids/tinyfat-sandbox"));
        assert!(prepare_parent(&mi, own, "cpu").is_err());
    }
}
