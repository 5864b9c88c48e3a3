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
//! Moving a process into a cgroup takes the kernel's
//! `cgroup_threadgroup_rwsem` for writing, which normally waits for an RCU
//! grace period (about 5 ms here, more under load) unless another move
//! happened within the last grace period; meanwhile every fork on the host
//! waits too. The kernel's `favordynmods` option (cgroup v1 and v2, Linux
//! 6.0+) keeps that lock in the mode where moves are immediate, at a small
//! cost to every fork and exit. [`FastMoves`] turns it on for the life of the
//! process by mounting an empty named v1 hierarchy with the option, keeping
//! a handle on it and detaching it at once (nothing stays in the mount
//! table; closing the handle at exit ends it). Then a call's move costs
//! ~0.3 ms and the call can join its cgroups before bwrap forks anything.
//!
//! Invariant: nothing here may fail a tool call. Every error degrades to
//! "no cgroup" (or slow moves) and a log line; rlimits still apply.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use rustix::process::{Pid, Signal, kill_process};

const PARENT_NAME: &str = "tinyfat-sandbox";
/// Name of the empty v1 hierarchy that carries `favordynmods`.
const FAST_MOVES_NAME: &str = "tinyfat-fast-moves";
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
    /// Joining a cgroup is immediate (`favordynmods` is on).
    fast_moves: bool,
    /// Call cgroups created and not yet removed (cleanup of a normal exit
    /// runs in the background); dropping the executor sweeps them.
    live: Live,
}

type Live = Arc<Mutex<HashSet<PathBuf>>>;

impl Cgroups {
    /// No cgroups: calls get rlimits only.
    pub(crate) fn disabled(report: &str) -> Self {
        Cgroups { memory: None, pids: None, report: report.to_string(), fast_moves: false, live: Live::default() }
    }

    /// Finds the controllers and prepares our parent cgroups.
    pub(crate) fn detect() -> Self {
        let none =
            |report: String| Cgroups { memory: None, pids: None, report, fast_moves: false, live: Live::default() };
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
        let (fast_moves, moves) = if memory.is_ok() || pids.is_ok() {
            match FastMoves::ensure(&mountinfo) {
                Ok(how) => (true, format!("; moves are fast ({how})")),
                Err(e) => {
                    tracing::warn!(error = %e, "cgroup moves stay slow: each tool call waits a few ms for the kernel");
                    (false, format!("; moves are slow, a few ms per call ({e})"))
                }
            }
        } else {
            (false, String::new())
        };
        let report = format!("cgroup v1: {}; {}{moves}", describe("memory", &memory), describe("pids", &pids));
        Cgroups { memory: memory.ok(), pids: pids.ok(), report, fast_moves, live: Live::default() }
    }

    /// Whether joining a cgroup is immediate (see the module header).
    pub(crate) fn moves_are_fast(&self) -> bool {
        self.fast_moves
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

/// The process-wide `favordynmods` switch (see the module header).
#[derive(Debug)]
struct FastMoves;

/// The handle that keeps the detached hierarchy, and so the option, alive.
static FAST_MOVES: OnceLock<Result<OwnedFd, String>> = OnceLock::new();

impl FastMoves {
    /// Turns fast moves on once per process; says how they are fast.
    fn ensure(mountinfo: &str) -> Result<&'static str, String> {
        if has_favordynmods(mountinfo) {
            return Ok("favordynmods set by the host");
        }
        match FAST_MOVES.get_or_init(Self::mount_detached) {
            Ok(_) => Ok("favordynmods"),
            Err(e) => Err(e.clone()),
        }
    }

    fn mount_detached() -> Result<OwnedFd, String> {
        let dir = tempfile::Builder::new()
            .prefix("tinyfat-cgroup-")
            .tempdir()
            .map_err(|e| format!("temporary mount point: {e}"))?;
        let options = format!("none,name={FAST_MOVES_NAME},favordynmods");
        run_quiet(Command::new("mount").args(["-t", "cgroup", "-o", &options, "cgroup"]).arg(dir.path()))
            .map_err(|e| format!("mount -o {options} failed (needs Linux 6.0+ and CAP_SYS_ADMIN): {e}"))?;
        let handle = rustix::fs::open(dir.path(), OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| format!("cannot hold the fast-moves hierarchy: {e}"));
        // Detach whatever happened: the handle (if any) keeps it alive.
        let detached = run_quiet(Command::new("umount").arg("-l").arg(dir.path()));
        let handle = handle?;
        detached.map_err(|e| format!("umount -l of the fast-moves hierarchy failed: {e}"))?;
        Ok(handle)
    }
}

/// Whether a mounted cgroup hierarchy already carries `favordynmods`.
fn has_favordynmods(mountinfo: &str) -> bool {
    mountinfo.lines().any(|line| {
        line.split_once(" - ").is_some_and(|(_, right)| {
            let mut right = right.split_whitespace();
            matches!(right.next(), Some("cgroup" | "cgroup2"))
                && right.nth(1).is_some_and(|o| o.split(',').any(|o| o == "favordynmods"))
        })
    })
}

/// Runs a short host command; its stderr becomes the error.
fn run_quiet(cmd: &mut Command) -> Result<(), String> {
    let out =
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).output().map_err(|e| e.to_string())?;
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).trim().to_string()) }
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
    /// Moves `pid` into the call's cgroups. Call it before the process
    /// forks: children inherit, existing children do not move. Blocking: a
    /// few ms when moves are slow (see the module header).
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
    fn favordynmods_is_read_from_superblock_options() {
        let plain = "30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory\n";
        let favored = "31 25 0:27 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,favordynmods,pids\n";
        let v2 = "32 25 0:28 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n";
        let other = "33 25 0:29 / /mnt rw - tmpfs favordynmods rw\n";
        assert!(!has_favordynmods(plain));
        assert!(has_favordynmods(&format!("{plain}{favored}")));
        assert!(has_favordynmods(v2));
        assert!(!has_favordynmods(other), "only cgroup file systems count");
    }

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
