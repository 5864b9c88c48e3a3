//! The real sandbox: every tool call runs in a fresh bubblewrap container.
//!
//! Shape of one call (the platform runs as root):
//!
//! ```text
//! bwrap --args 3 -- /usr/bin/setpriv --reuid U ... -- /bin/bash -c CMD
//!   fd 3  the bwrap options (read before bwrap forks: our start gate)
//!   fd 4, 5  seccomp programs   fd 6  the agent dir   fd 7  config.json
//!   fd 8  bwrap reports the sandbox's pid   fd 9  the sandbox waits on it
//!   (8 and 9 only for network-on)
//! ```
//!
//! bwrap runs as real root *without* a user namespace, so it can mount the
//! agent's directory wherever it lives, and creates new mount, PID, IPC, UTS,
//! network and cgroup namespaces. Inside, `setpriv` drops to the agent's own
//! unprivileged host uid `U` (no capabilities, empty bounding set,
//! no_new_privs) before bash starts. `U` is derived from the agent's path, so
//! RLIMIT_NPROC counts only that agent's processes and other agents' files
//! are not the agent's even if a mount escape happened. `/data` is the agent
//! dir bound by file descriptor (`--bind-fd`, no path to race), nosuid and
//! nodev; `config.json` is re-bound read-only on top the same way.
//!
//! Start-up: bwrap blocks reading its options from fd 3 while the parent
//! sets its rlimits with `prlimit(2)` and moves it into the call's cgroups
//! (cheap with `favordynmods`, see `cgroup`); everything it forks inherits
//! both, so no process of the call is ever outside. The parent then writes
//! the options. All of this, with the agent-dir preparation, runs in one
//! blocking task. For network-on the sandbox additionally blocks on fd 9
//! until the parent has connected its network (PID 1 reported on fd 8); only
//! then does PID 1 fork the command.
//! Killing the outer bwrap (our direct child) kills the sandbox's PID 1
//! (`--die-with-parent`) and the kernel then kills everything in the PID
//! namespace; after a timeout or cancellation the cgroup confirms nothing is
//! left before the call returns.
//!
//! Warm start (`sandbox.warm`, see `warm`): the same sandbox can be built
//! ahead of a call, with `bash -c` running [`WARM_LOADER`] (read the command
//! from stdin, then exec `bash -c COMMAND`). A network-off call in `/data`
//! takes its agent's ready one, adopts the agent dir again and writes the
//! command; every other call starts cold as described above.
//!
//! This module must never fall back to running a command unsandboxed: when
//! anything needed is missing, calls fail with [`SandboxError::Unavailable`].

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use rustix::process::{Pid, Resource, Rlimit, prlimit};
use tinyfat_core::agent_config::Network;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::cgroup::{CallCgroup, Cgroups};
use crate::etc::{ETC_DIRS, EtcView};
use crate::exec::{
    ExecOutput, ExecRequest, Limits, SANDBOX_DATA_DIR, SandboxError, SandboxHealth, SandboxMode, ToolExecutor,
};
use crate::ownership;
use crate::seccomp;
use crate::supervise::{self, Stop};
use crate::warm::{Identity, Pool, Warm, WarmStats};
use crate::{SandboxConfig, netguard};

const SETPRIV: &str = "/usr/bin/setpriv";
const BASH: &str = "/bin/bash";
const SANDBOX_PATH: &str = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin";
const SANDBOX_HOSTNAME: &str = "sandbox";
/// File name of the bash prologue in the sandbox's /etc; `BASH_ENV` points at it.
pub(crate) const PROLOGUE_NAME: &str = "tinyfat-sandbox.bash";
/// Sourced by the non-interactive `bash -c` before the command (through
/// `BASH_ENV`): closes every descriptor above stderr. bwrap passes on any
/// descriptor the platform itself inherited without close-on-exec (from its
/// own parent); one of those could be a handle outside the sandbox. It then
/// removes itself from the environment so nested shells behave normally.
/// `LANG` is set here rather than by bwrap so that `setpriv`, which runs
/// before bash, does not load the locale too (13 files per call).
const PROLOGUE: &str = r#"export LANG=C.UTF-8
for __tf_fd in /proc/self/fd/*; do
    __tf_fd=${__tf_fd##*/}
    case $__tf_fd in 0|1|2) ;; *) eval "exec $__tf_fd>&-" 2>/dev/null ;; esac
done
unset __tf_fd BASH_ENV
"#;

/// The command of a warm sandbox (after the prologue): wait for the real
/// command on stdin (NUL-terminated, written when a call takes the sandbox),
/// then become `bash -c COMMAND` with stdin from /dev/null, exactly as a
/// cold call runs it (`SHLVL=0` so the command sees the same `SHLVL` 1).
/// EOF (the pool dropped the sandbox) ends it.
const WARM_LOADER: &str =
    "IFS= read -r -d '' __tf_cmd || exit 125\nSHLVL=0 exec /bin/bash -c \"$__tf_cmd\" </dev/null\n";

/// Longest command sent to a warm sandbox; bash reads a pipe byte by byte,
/// so longer commands start cold (a fresh sandbox either way).
const WARM_COMMAND_BYTES_MAX: usize = 16 * 1024;

/// Top-level directories that are either symlinks into /usr (merged /usr)
/// or real system directories; mirrored read-only.
const ROOT_SYSTEM_DIRS: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

// File descriptor numbers inside bwrap.
const FD_ARGS: i32 = 3;
const FD_SECCOMP_EPERM: i32 = 4;
const FD_SECCOMP_ENOSYS: i32 = 5;
const FD_DATA: i32 = 6;
const FD_CONFIG: i32 = 7;
const FD_INFO: i32 = 8;
const FD_BLOCK: i32 = 9;
/// bwrap's `--info-fd` report is a few dozen bytes.
const INFO_BYTES_MAX: u64 = 4096;

/// Range of host uids given to agents; one uid per agent directory.
#[derive(Clone, Copy, Debug)]
struct UidRange {
    base: u32,
    count: u32,
}

impl UidRange {
    /// FNV-1a of the canonical path, so an agent keeps its uid across
    /// restarts. Two agents may share a uid (1 in `count`); isolation does
    /// not depend on it, only the per-uid process limit is then shared.
    fn for_dir(&self, canonical: &Path) -> u32 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in canonical.as_os_str().as_bytes() {
            hash ^= u64::from(*b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.base + (hash % u64::from(self.count)) as u32
    }
}

/// The bubblewrap executor.
#[derive(Debug)]
pub struct Bwrap(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    bwrap: PathBuf,
    /// Set when this host cannot run the sandbox; every call fails with it.
    broken: Option<String>,
    limits: Limits,
    uids: UidRange,
    /// Our private state directory (the sandbox /etc views live in it).
    _state: tempfile::TempDir,
    etc: EtcView,
    /// Mount options that are the same for every call.
    system_args: Vec<OsString>,
    /// Host directories bound into the sandbox's /etc (those that exist).
    etc_dirs: Vec<PathBuf>,
    cgroups: Arc<Cgroups>,
    seccomp: Result<seccomp::Programs, String>,
    /// Network-on support, or why it is refused here.
    egress: Result<netguard::Egress, String>,
    slots: Arc<Semaphore>,
    /// Ready sandboxes per agent (`sandbox.warm`); `None` when off.
    warm: Option<Pool>,
}

/// A call ready to start: the command, its options and its pipes.
struct Prepared {
    cmd: tokio::process::Command,
    /// The bwrap options, NUL-separated, for fd 3.
    gate: Vec<u8>,
    args_w: std::io::PipeWriter,
    output: std::io::PipeReader,
    cgroup: CallCgroup,
    handshake_pipes: Option<(std::io::PipeReader, std::io::PipeWriter)>,
    workdir: PathBuf,
    /// Warm sandboxes only: what to build the pool entry from.
    warm: Option<WarmParts>,
}

/// The parts of a prepared warm sandbox beyond a cold call's.
struct WarmParts {
    command: std::io::PipeWriter,
    dir: OwnedFd,
    uid: u32,
    identity: Identity,
}

/// A started call: bwrap running with its limits, in its cgroups.
struct Started {
    child: tokio::process::Child,
    output: std::io::PipeReader,
    cgroup: CallCgroup,
    /// (bwrap's pid report, the sandbox's start gate); network-on only.
    handshake_pipes: Option<(std::io::PipeReader, std::io::PipeWriter)>,
    workdir: PathBuf,
}

impl Bwrap {
    /// Prepares the executor. Problems are recorded, not returned: the
    /// platform starts, [`ToolExecutor::check`] reports them and calls fail
    /// with an actionable message.
    pub fn new(config: &SandboxConfig) -> Self {
        Bwrap(Arc::new(Inner::new(config)))
    }

    /// The host uid that tool processes of the agent at `data_dir` run as.
    pub fn uid_for(&self, data_dir: &Path) -> std::io::Result<u32> {
        Ok(self.0.uids.for_dir(&data_dir.canonicalize()?))
    }

    /// Whether a warm sandbox is ready for the agent at `data_dir` (the
    /// path as the calls give it).
    pub fn warm_ready(&self, data_dir: &Path) -> bool {
        self.0.warm.as_ref().is_some_and(|p| p.is_ready(data_dir))
    }

    /// Counters of the warm pool (all zero when it is off).
    pub fn warm_stats(&self) -> WarmStats {
        self.0.warm.as_ref().map(Pool::stats).unwrap_or_default()
    }
}

impl Inner {
    fn new(config: &SandboxConfig) -> Self {
        let bwrap = config.bwrap_path.clone().or_else(|| find_in_path("bwrap"));
        let broken = static_problem(bwrap.as_deref(), config);
        let state = tempfile::Builder::new()
            .prefix("tinyfat-sandbox-")
            .tempdir()
            .expect("temporary directory for the sandbox's state");
        let etc = EtcView::new(
            state.path().join("etc"),
            format!("127.0.0.1 localhost\n::1 localhost\n127.0.1.1 {SANDBOX_HOSTNAME}\n"),
            PROLOGUE.to_string(),
        );
        let seccomp = seccomp::build();
        if let Err(e) = &seccomp {
            tracing::warn!(error = %e, "seccomp filter unavailable; namespaces and uid still apply");
        }
        let calls = config.limits.calls_concurrent_max.max(1);
        Self {
            bwrap: bwrap.unwrap_or_else(|| PathBuf::from("bwrap")),
            broken,
            limits: config.limits.clone(),
            uids: UidRange { base: config.uid_base, count: config.uid_count.max(1) },
            _state: state,
            etc,
            system_args: system_args(config.limits.tmp_bytes_max),
            etc_dirs: ETC_DIRS.iter().map(|d| Path::new("/etc").join(d)).filter(|p| p.is_dir()).collect(),
            cgroups: Arc::new(if config.per_call_cgroups {
                Cgroups::detect()
            } else {
                Cgroups::disabled("cgroups: disabled (per_call_cgroups = false); memory is bounded by RLIMIT_AS only")
            }),
            seccomp,
            egress: netguard::Egress::detect(),
            slots: Arc::new(Semaphore::new(calls)),
            warm: config.warm.then(|| Pool::new(Duration::from_secs(config.warm_idle_s), config.warm_max)),
        }
    }

    fn notes(&self) -> Vec<String> {
        vec![
            self.cgroups.report().to_string(),
            match &self.seccomp {
                Ok(_) => {
                    "seccomp: deny-list filter installed (ptrace, namespaces, keyrings, bpf, io_uring, mounts, modules)"
                        .into()
                }
                Err(e) => format!("seccomp: not installed ({e})"),
            },
            format!(
                "identity: each agent runs as its own host uid in {}..{} with no capabilities",
                self.uids.base,
                u64::from(self.uids.base) + u64::from(self.uids.count)
            ),
            format!("network: off = loopback only, in its own namespace; on = {}", netguard::status(&self.egress)),
            match &self.warm {
                Some(pool) => format!("warm start: on ({})", pool.describe()),
                None => "warm start: off (sandbox.warm = false); every call starts its sandbox".into(),
            },
        ]
    }

    /// The bwrap options of one call (sent through fd 3).
    fn call_args(&self, etc: &Path, has_config: bool, workdir: &Path, handshake: bool) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::with_capacity(96);
        let mut push = |items: &[&OsStr]| a.extend(items.iter().map(|s| s.to_os_string()));
        push(&[
            "--unshare-ipc".as_ref(),
            "--unshare-pid".as_ref(),
            "--unshare-net".as_ref(),
            "--unshare-uts".as_ref(),
            "--unshare-cgroup-try".as_ref(),
            "--die-with-parent".as_ref(),
            "--new-session".as_ref(),
            "--hostname".as_ref(),
            SANDBOX_HOSTNAME.as_ref(),
            "--clearenv".as_ref(),
            "--setenv".as_ref(),
            "HOME".as_ref(),
            SANDBOX_DATA_DIR.as_ref(),
            "--setenv".as_ref(),
            "PATH".as_ref(),
            SANDBOX_PATH.as_ref(),
            "--setenv".as_ref(),
            "BASH_ENV".as_ref(),
            format!("/etc/{PROLOGUE_NAME}").as_ref(),
        ]);
        a.extend(self.system_args.iter().cloned());
        a.extend(["--ro-bind".into(), etc.as_os_str().to_os_string(), "/etc".into()]);
        for host in &self.etc_dirs {
            a.extend(["--ro-bind-try".into(), host.clone().into_os_string(), host.clone().into_os_string()]);
        }
        let fd = |n: i32| OsString::from(n.to_string());
        a.extend(["--bind-fd".into(), fd(FD_DATA), SANDBOX_DATA_DIR.into()]);
        if has_config {
            a.extend([
                "--ro-bind-fd".into(),
                fd(FD_CONFIG),
                format!("{SANDBOX_DATA_DIR}/{}", ownership::CONFIG_FILE).into(),
            ]);
        }
        a.extend(["--chdir".into(), workdir.as_os_str().to_os_string()]);
        if self.seccomp.is_ok() {
            a.extend([
                "--add-seccomp-fd".into(),
                fd(FD_SECCOMP_EPERM),
                "--add-seccomp-fd".into(),
                fd(FD_SECCOMP_ENOSYS),
            ]);
        }
        if handshake {
            a.extend(["--info-fd".into(), fd(FD_INFO), "--block-fd".into(), fd(FD_BLOCK)]);
        }
        a
    }

    /// The blocking file work of a call: open the agent dir by handle and
    /// hand its files to the agent's uid, prepare /etc and the call's
    /// cgroups, and build the bwrap command with its options and pipes.
    ///
    /// `warm`: build a warm sandbox instead (the command comes later, on
    /// stdin; see [`WARM_LOADER`]).
    fn prepare(&self, req: &ExecRequest, relative: &Path, warm: bool) -> Result<Prepared, SandboxError> {
        let canonical = req.data_dir.canonicalize().map_err(|e| {
            SandboxError::InvalidRequest(format!("agent data directory {}: {e}", req.data_dir.display()))
        })?;
        let agent = ownership::open_agent_dir(&canonical)?;
        let uid = self.uids.for_dir(&canonical);
        let adopted = ownership::adopt(&agent.dir, uid, uid)?;
        if adopted.incomplete {
            tracing::warn!(dir = %canonical.display(), entries = adopted.entries, "agent directory too large to adopt completely; some files stay read-only to the agent");
        }
        let etc = self
            .etc
            .for_uid(uid)
            .map_err(|e| SandboxError::Unavailable(format!("cannot prepare the sandbox's /etc: {e}")))?;
        let cgroup = self.cgroups.create_call(self.limits.memory_bytes_max, self.limits.processes_max);
        let workdir = if relative.as_os_str().is_empty() {
            PathBuf::from(SANDBOX_DATA_DIR)
        } else {
            Path::new(SANDBOX_DATA_DIR).join(relative)
        };
        // Network-on needs the sandbox's PID 1 (reported on fd 8) to connect
        // its network while the sandbox waits on fd 9. Cgroups need no
        // handshake: bwrap joins them before it forks anything.
        let handshake = req.network == Network::On && !warm;
        let warm = match warm {
            true => {
                let identity = Identity::of_handles(&agent.dir, agent.config.as_ref())?;
                let (command_r, command) = std::io::pipe()?;
                Some((command_r, WarmParts { command, dir: agent.dir.try_clone()?, uid, identity }))
            }
            false => None,
        };
        let args = self.call_args(&etc, agent.config.is_some(), &workdir, handshake);

        // Pipes: options, seccomp programs, the handshake, the output.
        let (args_r, args_w) = std::io::pipe()?;
        let mut fds = vec![
            FdMapping { parent_fd: args_r.into(), child_fd: FD_ARGS },
            FdMapping { parent_fd: agent.dir, child_fd: FD_DATA },
        ];
        let mut handshake_pipes = None;
        if handshake {
            let (info_r, info_w) = std::io::pipe()?;
            let (block_r, block_w) = std::io::pipe()?;
            fds.push(FdMapping { parent_fd: info_w.into(), child_fd: FD_INFO });
            fds.push(FdMapping { parent_fd: block_r.into(), child_fd: FD_BLOCK });
            handshake_pipes = Some((info_r, block_w));
        }
        if let Some(config) = agent.config {
            fds.push(FdMapping { parent_fd: config, child_fd: FD_CONFIG });
        }
        if let Ok(programs) = &self.seccomp {
            fds.push(FdMapping { parent_fd: filled_pipe(&programs.eperm)?, child_fd: FD_SECCOMP_EPERM });
            fds.push(FdMapping { parent_fd: filled_pipe(&programs.enosys)?, child_fd: FD_SECCOMP_ENOSYS });
        }
        let (out_r, out_w) = std::io::pipe()?;
        let out_w2 = out_w.try_clone()?;

        let mut cmd = tokio::process::Command::new(&self.bwrap);
        cmd.arg("--args")
            .arg(FD_ARGS.to_string())
            .arg("--")
            .arg(SETPRIV)
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .args([
                "--clear-groups",
                "--inh-caps=-all",
                "--ambient-caps=-all",
                "--bounding-set=-all",
                "--no-new-privs",
                "--",
                BASH,
                "-c",
            ])
            .arg(if warm.is_some() { WARM_LOADER } else { &req.command })
            .env_clear()
            .stdout(Stdio::from(out_w))
            .stderr(Stdio::from(out_w2))
            .process_group(0)
            .kill_on_drop(true);
        let warm = match warm {
            Some((command_r, parts)) => {
                cmd.stdin(Stdio::from(command_r));
                Some(parts)
            }
            None => {
                cmd.stdin(Stdio::null());
                None
            }
        };
        cmd.fd_mappings(fds).map_err(|e| SandboxError::Io(std::io::Error::other(e)))?;

        let mut gate = Vec::with_capacity(4096);
        for arg in &args {
            gate.extend_from_slice(arg.as_bytes());
            gate.push(0);
        }
        Ok(Prepared { cmd, gate, args_w, output: out_r, cgroup, handshake_pipes, workdir, warm })
    }

    /// Starts the prepared bwrap, gated on its options: limits and cgroups
    /// first, so that everything it forks inherits them (no process of the
    /// call is ever outside), then the options.
    ///
    /// Runs on a runtime worker, never on a blocking-pool thread: bwrap's
    /// `--die-with-parent` is tied to the *thread* that forked it, and idle
    /// blocking threads exit after 10 s, which would kill the sandbox.
    async fn start(&self, prepared: Prepared) -> Result<Started, SandboxError> {
        let Prepared { cmd, gate, mut args_w, output, cgroup, handshake_pipes, workdir, warm: _ } = prepared;
        let (child, pid) = self.spawn_gated(cmd)?;
        let cgroup = if self.cgroups.moves_are_fast() {
            cgroup.join(pid);
            cgroup
        } else {
            tokio::task::spawn_blocking(move || {
                cgroup.join(pid);
                cgroup
            })
            .await
            .map_err(|e| SandboxError::Io(std::io::Error::other(e)))?
        };
        // A failed write means bwrap died; its message arrives on the output.
        let _ = args_w.write_all(&gate);
        drop(args_w);
        Ok(Started { child, output, cgroup, handshake_pipes, workdir })
    }

    /// Spawns bwrap (blocked on its options) and applies the rlimits.
    fn spawn_gated(&self, mut cmd: tokio::process::Command) -> Result<(tokio::process::Child, u32), SandboxError> {
        let mut child = cmd
            .spawn()
            .map_err(|e| SandboxError::Unavailable(format!("cannot start {}: {e}", self.bwrap.display())))?;
        // The Command holds our copies of the child's pipe ends; close them
        // so the output and the report reach EOF when bwrap is gone.
        drop(cmd);
        let pid = child.id().ok_or_else(|| SandboxError::Io(std::io::Error::other("bwrap exited at once")))?;
        if let Err(e) = set_rlimits(pid, &self.limits) {
            let _ = child.start_kill();
            return Err(SandboxError::Unavailable(format!("cannot apply resource limits: {e}")));
        }
        Ok((child, pid))
    }

    /// Builds and starts a warm sandbox for `data_dir`: everything of a
    /// network-off call in `/data`, up to bash waiting for its command. Runs
    /// on the pool's thread (see `warm`), inside the runtime's context.
    fn make_warm(&self, data_dir: &Path) -> Result<Warm, SandboxError> {
        if let Some(reason) = &self.broken {
            return Err(SandboxError::Unavailable(reason.clone()));
        }
        let req = ExecRequest::new(data_dir, "");
        let Prepared { cmd, gate, mut args_w, output, cgroup, warm, .. } = self.prepare(&req, Path::new(""), true)?;
        let parts = warm.ok_or_else(|| SandboxError::Io(std::io::Error::other("warm parts missing")))?;
        let (child, pid) = self.spawn_gated(cmd)?;
        cgroup.join(pid);
        let _ = args_w.write_all(&gate);
        drop(args_w);
        Ok(Warm {
            child,
            output,
            cgroup,
            command: parts.command,
            dir: parts.dir,
            uid: parts.uid,
            identity: parts.identity,
            ready_at: std::time::Instant::now(),
        })
    }

    /// Asks the pool for a warm sandbox for `data_dir` (when warm is on).
    fn request_warm(self: &Arc<Self>, data_dir: &Path) {
        let Some(pool) = &self.warm else { return };
        if self.broken.is_some() {
            return;
        }
        pool.request(data_dir, || {
            let weak = Arc::downgrade(self);
            Box::new(move |dir: &Path| match weak.upgrade() {
                Some(inner) => inner.make_warm(dir),
                None => Err(SandboxError::Unavailable("sandbox is shutting down".into())),
            })
        });
    }

    /// Hands a warm sandbox its command: adopt what was written to the agent
    /// dir since it was prepared (as a cold call does), then write the
    /// command. Capture and the timeout already run from the call's start.
    /// `None` when the sandbox died before it got the command (the call then
    /// starts cold).
    async fn start_warm(&self, warm: Warm, command: String) -> Result<Option<Started>, SandboxError> {
        let Warm { child, output, cgroup, command: mut command_w, dir, uid, .. } = warm;
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            let adopted = ownership::adopt(&dir, uid, uid)?;
            if adopted.incomplete {
                tracing::warn!(
                    entries = adopted.entries,
                    "agent directory too large to adopt completely; some files stay read-only to the agent"
                );
            }
            let mut bytes = command.into_bytes();
            bytes.push(0);
            // At most WARM_COMMAND_BYTES_MAX + 1 bytes into an empty pipe:
            // never blocks. It fails only when the sandbox is gone.
            Ok(command_w.write_all(&bytes).is_ok())
        })
        .await
        .map_err(|e| SandboxError::Io(std::io::Error::other(e)))??;
        if !written {
            tracing::debug!("warm sandbox died before its call; starting cold");
            return Ok(None);
        }
        Ok(Some(Started { child, output, cgroup, handshake_pipes: None, workdir: PathBuf::from(SANDBOX_DATA_DIR) }))
    }

    /// Runs one call; afterwards (when `prewarm`) asks for the agent's next
    /// warm sandbox.
    async fn run_call(
        self: &Arc<Self>,
        req: ExecRequest,
        started: Instant,
        prewarm: bool,
    ) -> Result<ExecOutput, SandboxError> {
        let data_dir = (prewarm && self.warm.is_some() && req.network == Network::Off).then(|| req.data_dir.clone());
        let result = self.run_once(req, started).await;
        if let Some(dir) = data_dir
            && !matches!(result, Err(SandboxError::InvalidRequest(_)))
        {
            self.request_warm(&dir);
        }
        result
    }

    async fn run_once(self: &Arc<Self>, req: ExecRequest, started: Instant) -> Result<ExecOutput, SandboxError> {
        if let Some(reason) = &self.broken {
            return Err(SandboxError::Unavailable(reason.clone()));
        }
        let relative = req.validate()?;
        if req.network == Network::On
            && let Err(e) = &self.egress
        {
            return Err(SandboxError::Unavailable(e.clone()));
        }
        let deadline = started + req.timeout;
        let mut cancel = req.cancel.clone();

        let _slot = tokio::select! {
            biased;
            _ = supervise::cancelled(&mut cancel) => return Ok(not_started(started, false, "cancelled before start")),
            _ = tokio::time::sleep_until(deadline) => return Ok(not_started(started, true, "no free sandbox slot before the timeout")),
            slot = self.slots.clone().acquire_owned() => slot.map_err(|_| SandboxError::Unavailable("sandbox is shutting down".into()))?,
        };

        let output_bytes_max = req.output_bytes_max;
        let warm = match &self.warm {
            Some(pool)
                if req.network == Network::Off
                    && relative.as_os_str().is_empty()
                    && req.command.len() <= WARM_COMMAND_BYTES_MAX =>
            {
                pool.take(&req.data_dir)
            }
            _ => None,
        };
        let warm_started = match warm {
            Some(warm) => self.start_warm(warm, req.command.clone()).await?,
            None => None,
        };
        let Started { mut child, output, cgroup, handshake_pipes, workdir } = match warm_started {
            Some(started) => started,
            None => {
                let this = self.clone();
                let prepared = tokio::task::spawn_blocking(move || this.prepare(&req, &relative, false))
                    .await
                    .map_err(|e| SandboxError::Io(std::io::Error::other(e)))??;
                self.start(prepared).await?
            }
        };

        let egress = match (handshake_pipes, &self.egress) {
            (Some((info_r, block_w)), Ok(egress)) => {
                let guard = match read_info(info_r, deadline).await {
                    Some(sandbox_pid) => match egress.attach(sandbox_pid, deadline).await {
                        Ok(guard) => Some(guard),
                        Err(e) => {
                            let _ = child.start_kill();
                            let _ = child.wait().await;
                            cgroup.finish().await;
                            return Err(SandboxError::Unavailable(e));
                        }
                    },
                    // bwrap failed before cloning: nothing to connect; its
                    // error arrives on the output.
                    None => None,
                };
                let mut block_w = block_w;
                let _ = block_w.write_all(b"x");
                guard
            }
            _ => None,
        };

        let output = pipe::Receiver::from_owned_fd(OwnedFd::from(output))?;
        let supervised = supervise::supervise(
            child,
            output,
            deadline,
            cancel,
            output_bytes_max,
            &|child| {
                let _ = child.start_kill();
            },
            &|| {},
        )
        .await?;
        if let Some(guard) = egress {
            guard.stop().await;
        }
        let oom_kills = cgroup.oom_kills();
        match supervised.stop {
            // Leftovers of a normal exit are already being killed by the PID
            // namespace teardown; remove the cgroups in the background.
            Stop::Exited => drop(cgroup),
            // A killed call returns only once nothing of it is left.
            Stop::TimedOut | Stop::Cancelled => cgroup.finish().await,
        }

        let (mut text, truncated) = supervised.capture.render();
        let exit_code = supervised.exit_code();
        if exit_code == Some(1)
            && let Some(msg) = text.strip_prefix("bwrap: ")
        {
            let msg = msg.lines().next().unwrap_or_default().to_string();
            if msg.starts_with("Can't chdir") {
                return Err(SandboxError::InvalidRequest(format!(
                    "working directory {} does not exist in the sandbox",
                    workdir.display()
                )));
            }
            // Out of processes or memory is the agent's limit, not a broken
            // sandbox: the output says what happened.
            if !msg.contains("Resource temporarily unavailable") && !msg.contains("Cannot allocate memory") {
                return Err(SandboxError::Unavailable(format!("bubblewrap could not set up the sandbox: {msg}")));
            }
        }
        if oom_kills > 0 {
            text.push_str(&format!(
                "\n[sandbox: memory limit of {} MiB reached; a process was killed]\n",
                self.limits.memory_bytes_max >> 20
            ));
        }
        let (timed_out, cancelled) = match supervised.stop {
            Stop::Exited => (false, false),
            Stop::TimedOut => (true, false),
            Stop::Cancelled => (false, true),
        };
        Ok(ExecOutput {
            output: text,
            output_bytes: supervised.capture.total_bytes(),
            truncated,
            exit_code,
            signal: supervised.signal(),
            timed_out,
            cancelled,
            duration: started.elapsed(),
        })
    }
}

/// Reads bwrap's `{"child-pid": N}` report (the sandbox's PID 1 on the
/// host); `None` when bwrap failed before cloning or the deadline passed.
async fn read_info(info: std::io::PipeReader, deadline: Instant) -> Option<u32> {
    let mut rx = pipe::Receiver::from_owned_fd(OwnedFd::from(info)).ok()?;
    let mut text = Vec::new();
    let mut limited = (&mut rx).take(INFO_BYTES_MAX);
    tokio::time::timeout_at(deadline, limited.read_to_end(&mut text)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&text);
    let after = text.split("\"child-pid\"").nth(1)?;
    let digits: String = after.chars().skip_while(|c| !c.is_ascii_digit()).take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[async_trait::async_trait]
impl ToolExecutor for Bwrap {
    fn mode(&self) -> SandboxMode {
        SandboxMode::Bwrap
    }

    async fn check(&self) -> SandboxHealth {
        let notes = self.0.notes();
        let fail =
            |message: String| SandboxHealth { mode: SandboxMode::Bwrap, ok: false, message, notes: notes.clone() };
        if let Some(reason) = &self.0.broken {
            return fail(reason.clone());
        }
        let dir = match tempfile::Builder::new().prefix("tinyfat-sandbox-check-").tempdir() {
            Ok(d) => d,
            Err(e) => return fail(format!("cannot create a temporary directory: {e}")),
        };
        let req = ExecRequest::new(dir.path(), "true").timeout(std::time::Duration::from_secs(20));
        match self.0.run_call(req, Instant::now(), false).await {
            Ok(out) if out.success() => {
                SandboxHealth { mode: SandboxMode::Bwrap, ok: true, message: "ok".into(), notes }
            }
            Ok(out) => fail(diagnose(&out.output, out.exit_code)),
            Err(SandboxError::Unavailable(msg)) => fail(diagnose(&msg, None)),
            Err(e) => fail(e.to_string()),
        }
    }

    /// Prepares a warm sandbox for the agent at `data_dir` in the
    /// background, so that its first call starts warm too. No-op when
    /// `sandbox.warm` is off or outside a tokio runtime.
    fn prewarm(&self, data_dir: &Path) {
        self.0.request_warm(data_dir);
    }

    async fn run(&self, req: ExecRequest) -> Result<ExecOutput, SandboxError> {
        let started = Instant::now();
        let result = self.0.run_call(req, started, true).await;
        match &result {
            Ok(out) => tracing::debug!(
                exit_code = ?out.exit_code,
                timed_out = out.timed_out,
                cancelled = out.cancelled,
                output_bytes = out.output_bytes,
                ms = out.duration.as_millis() as u64,
                "sandboxed tool call finished"
            ),
            Err(e) => tracing::warn!(error = %e, "sandboxed tool call failed"),
        }
        result
    }
}

/// Turns bwrap's terse errors into what an operator should do.
fn diagnose(output: &str, exit_code: Option<i32>) -> String {
    let first = output.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let hint = if output.contains("No permissions to creat") || output.contains("unprivileged_userns_clone") {
        "user namespaces are disabled: sysctl kernel.unprivileged_userns_clone=1"
    } else if output.contains("Creating new namespace failed") || output.contains("Operation not permitted") {
        "creating namespaces is not permitted here (a container without CAP_SYS_ADMIN, or a seccomp/AppArmor profile blocking unshare); run on the host or grant the capability"
    } else if output.contains("setpriv") {
        "setpriv (util-linux) failed or is missing: apt-get install util-linux"
    } else {
        "see the message above"
    };
    match exit_code {
        Some(code) => format!("sandbox self-check failed (exit {code}): {first}; {hint}"),
        None => format!("{first}; {hint}"),
    }
}

/// Reasons this host cannot run the sandbox at all.
fn static_problem(bwrap: Option<&Path>, config: &SandboxConfig) -> Option<String> {
    let Some(bwrap) = bwrap else {
        return Some("bubblewrap is not installed: apt-get install bubblewrap".into());
    };
    if !bwrap.is_file() {
        return Some(format!("bubblewrap not found at {}: apt-get install bubblewrap", bwrap.display()));
    }
    let euid = rustix::process::geteuid();
    if !euid.is_root() {
        return Some(format!(
            "the bwrap sandbox runs tools as a separate unprivileged uid per agent and so needs root \
             (running as uid {}); run tinyfat as root, or set sandbox.mode = \"none\" for development only",
            euid.as_raw()
        ));
    }
    if !Path::new(SETPRIV).is_file() {
        return Some(format!("{SETPRIV} is missing: apt-get install util-linux"));
    }
    if !Path::new(BASH).is_file() {
        return Some(format!("{BASH} is missing: apt-get install bash"));
    }
    let end = u64::from(config.uid_base) + u64::from(config.uid_count);
    if config.uid_base < 65_536 || end >= u64::from(u32::MAX) {
        return Some(format!(
            "sandbox uid range {}..{end} is invalid: it must lie above 65535 and below 4294967295",
            config.uid_base
        ));
    }
    None
}

/// Mounts shared by all calls: /usr and friends, fresh /proc and /dev, a
/// private /tmp and /dev/shm. (/etc is per uid, see `etc`.)
fn system_args(tmp_bytes_max: u64) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["--ro-bind".into(), "/usr".into(), "/usr".into()];
    for name in ROOT_SYSTEM_DIRS {
        let path = Path::new("/").join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&path) {
                    a.extend(["--symlink".into(), target.into_os_string(), path.into_os_string()]);
                }
            }
            Ok(m) if m.is_dir() => {
                a.extend(["--ro-bind".into(), path.clone().into_os_string(), path.into_os_string()]);
            }
            _ => {}
        }
    }
    let size = tmp_bytes_max.to_string();
    a.extend(
        [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--perms",
            "1777",
            "--size",
            &size,
            "--tmpfs",
            "/tmp",
            "--perms",
            "1777",
            "--size",
            &size,
            "--tmpfs",
            "/dev/shm",
            // Directories bwrap creates implicitly are 0700.
            "--perms",
            "0755",
            "--dir",
            "/var",
            "--symlink",
            "/tmp",
            "/var/tmp",
        ]
        .map(OsString::from),
    );
    a
}

/// Applies the per-process limits to the (gated) bwrap process; everything
/// it starts inherits them. Root itself is exempt from RLIMIT_NPROC, so the
/// process limit only bites once setpriv switched to the agent uid.
fn set_rlimits(pid: u32, limits: &Limits) -> std::io::Result<()> {
    let pid = Pid::from_raw(pid as i32).ok_or_else(|| std::io::Error::other("bad pid"))?;
    let set = |resource, soft: u64, hard: u64| {
        let cap = |v| within_own_limit(resource, v);
        prlimit(Some(pid), resource, Rlimit { current: Some(cap(soft)), maximum: Some(cap(hard)) }).map(|_| ())
    };
    // SIGXCPU at the soft limit, SIGKILL a little later.
    set(Resource::Cpu, limits.cpu_s_max, limits.cpu_s_max + 5)?;
    set(Resource::As, limits.address_space_bytes_max, limits.address_space_bytes_max)?;
    set(Resource::Nproc, limits.processes_max, limits.processes_max)?;
    set(Resource::Nofile, limits.open_files_max, limits.open_files_max)?;
    set(Resource::Fsize, limits.file_size_bytes_max, limits.file_size_bytes_max)?;
    // No core dumps written into the agent's directory.
    set(Resource::Core, 0, 0)?;
    Ok(())
}

/// `value`, or our own hard limit when that is lower: raising a hard limit
/// needs CAP_SYS_RESOURCE, which a container's root may lack.
pub(crate) fn within_own_limit(resource: Resource, value: u64) -> u64 {
    rustix::process::getrlimit(resource).maximum.map_or(value, |max| value.min(max))
}

/// A pipe whose read end holds `bytes` and then EOF.
fn filled_pipe(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let (r, mut w) = std::io::pipe()?;
    // Seccomp programs are a few KiB: far below the pipe's 64 KiB buffer.
    w.write_all(bytes)?;
    Ok(r.into())
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The result of a call that never started a process.
fn not_started(started: Instant, timed_out: bool, why: &str) -> ExecOutput {
    ExecOutput {
        output: format!("[sandbox: {why}]\n"),
        output_bytes: 0,
        truncated: false,
        exit_code: None,
        signal: None,
        timed_out,
        cancelled: !timed_out,
        duration: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_stable_and_in_range() {
        let r = UidRange { base: 1_900_000_000, count: 65_536 };
        let a = r.for_dir(Path::new("/srv/agents/ag_1"));
        assert_eq!(a, r.for_dir(Path::new("/srv/agents/ag_1")));
        assert_ne!(a, r.for_dir(Path::new("/srv/agents/ag_2")));
        assert!((r.base..r.base + r.count).contains(&a));
    }

    #[test]
    fn diagnose_names_the_fix() {
        let d = diagnose("bwrap: Creating new namespace failed: Operation not permitted\n", Some(1));
        assert!(d.contains("CAP_SYS_ADMIN"), "{d}");
    }
}
