//! The contract between the runtime and a tool executor: the request, the
//! result, the errors, the health report and the [`ToolExecutor`] trait.
//!
//! This module owns only plain data and the trait. It must not spawn
//! processes or touch the file system; the executors do that.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tinyfat_core::agent_config::Network;
use tokio::sync::watch;

/// Where the agent's storage appears inside the sandbox.
pub const SANDBOX_DATA_DIR: &str = "/data";

/// Longest command string accepted. The command travels as one argv string
/// and Linux refuses single arguments above 128 KiB (`MAX_ARG_STRLEN`).
pub const COMMAND_BYTES_MAX: usize = 100 * 1024;

/// Default wall-clock limit of one call (SPEC §3 `runtime.tool_wall_s_max`).
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// Default cap on the captured output of one call.
pub const OUTPUT_BYTES_MAX_DEFAULT: usize = 256 * 1024;

/// How the platform runs tool processes (`sandbox.mode` in the config file).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// bubblewrap with namespaces, a dropped uid, limits and seccomp.
    #[default]
    Bwrap,
    /// No sandbox at all. Development only; every call logs a warning.
    None,
}

impl SandboxMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxMode::Bwrap => "bwrap",
            SandboxMode::None => "none",
        }
    }
}

impl std::fmt::Display for SandboxMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SandboxMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bwrap" => Ok(SandboxMode::Bwrap),
            "none" => Ok(SandboxMode::None),
            other => Err(format!("unknown sandbox mode {other:?} (expected \"bwrap\" or \"none\")")),
        }
    }
}

/// Resource limits applied to every tool process. Units are in the names.
///
/// The rlimits are per process (CPU, address space, open files, file size)
/// or per uid (processes); the memory limit needs a cgroup and is skipped,
/// with a note in the health report, where cgroups are not available.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// `RLIMIT_CPU` of each process, in seconds of CPU time.
    pub cpu_s_max: u64,
    /// `RLIMIT_AS` of each process.
    pub address_space_bytes_max: u64,
    /// `RLIMIT_NPROC` of the sandbox uid, and `pids.max` of the call's cgroup.
    pub processes_max: u64,
    /// `RLIMIT_NOFILE` of each process.
    pub open_files_max: u64,
    /// `RLIMIT_FSIZE`: largest file a process may write.
    pub file_size_bytes_max: u64,
    /// Memory (RSS + page cache + tmpfs) of the whole call, via a cgroup.
    pub memory_bytes_max: u64,
    /// Size of the private `/tmp`.
    pub tmp_bytes_max: u64,
    /// Tool calls that may run at the same time in one executor.
    pub calls_concurrent_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cpu_s_max: 600,
            address_space_bytes_max: 8 << 30,
            processes_max: 256,
            open_files_max: 1024,
            file_size_bytes_max: 1 << 30,
            memory_bytes_max: 2 << 30,
            tmp_bytes_max: 512 << 20,
            calls_concurrent_max: 16,
        }
    }
}

/// One tool command to run for one agent.
#[derive(Clone, Debug)]
pub struct ExecRequest {
    /// The agent's storage on the host; it appears as `/data` inside.
    pub data_dir: PathBuf,
    /// A bash command line, run as `bash -c COMMAND`.
    pub command: String,
    /// Working directory inside the sandbox: `/data` or a directory below it.
    pub workdir: PathBuf,
    /// Wall-clock limit; the whole process tree is killed when it passes.
    pub timeout: Duration,
    /// The agent's `network` setting from config.json.
    pub network: Network,
    /// Cap on the returned output text; more is counted and dropped.
    pub output_bytes_max: usize,
    /// When this turns `true` the process tree is killed promptly
    /// (the user said `stop`). A dropped sender means "never cancelled".
    pub cancel: Option<watch::Receiver<bool>>,
}

impl ExecRequest {
    /// A request with the defaults: workdir `/data`, 60 s, network off,
    /// 256 KiB of output, no cancellation.
    pub fn new(data_dir: impl Into<PathBuf>, command: impl Into<String>) -> Self {
        Self {
            data_dir: data_dir.into(),
            command: command.into(),
            workdir: PathBuf::from(SANDBOX_DATA_DIR),
            timeout: TIMEOUT_DEFAULT,
            network: Network::Off,
            output_bytes_max: OUTPUT_BYTES_MAX_DEFAULT,
            cancel: None,
        }
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn network(mut self, network: Network) -> Self {
        self.network = network;
        self
    }

    pub fn output_bytes_max(mut self, bytes: usize) -> Self {
        self.output_bytes_max = bytes;
        self
    }

    pub fn workdir(mut self, workdir: impl Into<PathBuf>) -> Self {
        self.workdir = workdir.into();
        self
    }

    pub fn cancel(mut self, cancel: watch::Receiver<bool>) -> Self {
        self.cancel = Some(cancel);
        self
    }

    /// Checks what both executors require; returns the workdir relative to
    /// `/data` (empty for `/data` itself).
    pub(crate) fn validate(&self) -> Result<PathBuf, SandboxError> {
        if self.command.len() > COMMAND_BYTES_MAX {
            return Err(SandboxError::InvalidRequest(format!(
                "command is {} bytes; the limit is {COMMAND_BYTES_MAX} bytes (write long scripts to a file and run the file)",
                self.command.len()
            )));
        }
        if self.command.contains('\0') {
            return Err(SandboxError::InvalidRequest("command contains a NUL byte".into()));
        }
        relative_workdir(&self.workdir)
    }
}

/// `/data/a/b` -> `a/b`; refuses anything outside `/data` or with `..`.
fn relative_workdir(workdir: &Path) -> Result<PathBuf, SandboxError> {
    let bad = || {
        SandboxError::InvalidRequest(format!(
            "working directory {} is not {SANDBOX_DATA_DIR} or a directory below it",
            workdir.display()
        ))
    };
    let rest = workdir.strip_prefix(SANDBOX_DATA_DIR).map_err(|_| bad())?;
    let mut out = PathBuf::new();
    for c in rest.components() {
        match c {
            Component::Normal(part) => {
                if part.as_encoded_bytes().contains(&0) {
                    return Err(bad());
                }
                out.push(part)
            }
            Component::CurDir => {}
            _ => return Err(bad()),
        }
    }
    Ok(out)
}

/// What a tool process did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// stdout and stderr interleaved as written (one pipe), lossy UTF-8,
    /// at most `output_bytes_max` bytes plus one truncation note.
    pub output: String,
    /// Bytes the process wrote in total, including those dropped.
    pub output_bytes: u64,
    /// Whether bytes were dropped (the note in `output` says how many).
    pub truncated: bool,
    /// Exit code, when the process exited. Under bwrap a command killed by
    /// signal N reports 128+N here, as a shell would.
    pub exit_code: Option<i32>,
    /// Signal that ended the process we started, when there was one
    /// (SIGKILL after a timeout or cancellation).
    pub signal: Option<i32>,
    /// Killed because the wall-clock limit passed.
    pub timed_out: bool,
    /// Killed because the caller cancelled.
    pub cancelled: bool,
    /// From the start of the call to the end of cleanup.
    pub duration: Duration,
}

impl ExecOutput {
    /// Exited with code 0, on its own.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.cancelled
    }
}

/// Why a call produced no [`ExecOutput`]. Each variant says what the caller
/// does next.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The sandbox cannot run on this host. Fail the tool call with this
    /// message (it says what the operator must fix); never retry unsandboxed.
    #[error("sandbox unavailable: {0}")]
    Unavailable(String),
    /// The request is wrong (bad working directory, missing data dir, a
    /// command too long). Report it to the model as the tool's error.
    #[error("invalid tool request: {0}")]
    InvalidRequest(String),
    /// Starting or supervising the process failed (out of memory or file
    /// descriptors, a pipe error). Transient: the caller may retry later.
    #[error("tool process failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Result of the startup self-check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxHealth {
    pub mode: SandboxMode,
    /// Tool calls will run.
    pub ok: bool,
    /// One line: "ok" or what is wrong and how to fix it.
    pub message: String,
    /// What is and is not enforced here (cgroups, seccomp, network egress).
    pub notes: Vec<String>,
}

/// Runs tool commands. The runtime holds an `Arc<dyn ToolExecutor>`.
#[async_trait::async_trait]
pub trait ToolExecutor: Send + Sync + std::fmt::Debug {
    /// Which implementation this is.
    fn mode(&self) -> SandboxMode;

    /// Runs `true` in a throwaway directory and reports what works.
    async fn check(&self) -> SandboxHealth;

    /// Runs one command. A timeout or cancellation is a normal result
    /// (`timed_out` / `cancelled` set), not an error.
    async fn run(&self, req: ExecRequest) -> Result<ExecOutput, SandboxError>;

    /// Hints that the agent at `data_dir` will call soon (e.g. at start for
    /// the agents the runtime knows): an executor with a warm pool prepares
    /// its sandbox in the background. Never required; default: nothing.
    fn prewarm(&self, _data_dir: &Path) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workdir_must_stay_under_data() {
        let ok = |p: &str| relative_workdir(Path::new(p)).unwrap();
        assert_eq!(ok("/data"), PathBuf::new());
        assert_eq!(ok("/data/"), PathBuf::new());
        assert_eq!(ok("/data/a/./b"), PathBuf::from("a/b"));
        for bad in ["/", "/tmp", "/database", "data", "/data/../etc", "/data/a/../../x"] {
            assert!(relative_workdir(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn mode_names() {
        assert_eq!(serde_json::to_string(&SandboxMode::Bwrap).unwrap(), "\"bwrap\"");
        assert_eq!(serde_json::from_str::<SandboxMode>("\"none\"").unwrap(), SandboxMode::None);
        assert!(serde_json::from_str::<SandboxMode>("\"docker\"").is_err());
        assert_eq!("bwrap".parse::<SandboxMode>().unwrap(), SandboxMode::Bwrap);
    }

    #[test]
    fn long_or_nul_commands_are_refused() {
        let r = ExecRequest::new("/x", "a".repeat(COMMAND_BYTES_MAX + 1));
        assert!(matches!(r.validate(), Err(SandboxError::InvalidRequest(_))));
        let r = ExecRequest::new("/x", "echo a\0b");
        assert!(matches!(r.validate(), Err(SandboxError::InvalidRequest(_))));
    }
}
