//! tinyfat-sandbox runs an agent's tool commands (`bash -c ...`) so that they
//! can touch only that agent's storage (SPEC §7).
//!
//! The runtime holds an `Arc<dyn ToolExecutor>` built by [`build_executor`]
//! from [`SandboxConfig`]: [`Bwrap`] (the default, bubblewrap with
//! namespaces, a per-agent unprivileged uid, rlimits, cgroups and seccomp) or
//! [`Unsandboxed`] (`sandbox.mode = "none"`, development only, loud).
//!
//! Module map: `exec` (the contract: request, output, errors, trait),
//! `bwrap` (the sandbox), `ownership` (opening and adopting the agent's
//! directory), `etc` (the sandbox's minimal /etc), `cgroup` (per-call
//! memory/pids cgroups, fast moves), `seccomp` (the syscall deny list), `netguard`
//! (network-on through pasta, public addresses only), `supervise` (timeout,
//! cancellation, output), `capture` (bounded output), `warm` (the pool of
//! ready sandboxes, one per recently active agent), `unsandboxed`.
//!
//! Host requirements: root, bubblewrap, util-linux (setpriv, nsenter,
//! prlimit; mount and umount to make cgroup moves fast), bash; for
//! network-on also passt (pasta) and iproute2.
//!
//! Architecture invariants: this crate knows nothing about models, channels
//! or turns; secrets never reach it (the sandbox environment is built from
//! scratch); and when the sandbox cannot be created a call fails with
//! [`SandboxError::Unavailable`]: it never falls back to running unsandboxed.

mod bwrap;
mod capture;
mod cgroup;
mod etc;
mod exec;
mod netguard;
mod ownership;
mod seccomp;
mod supervise;
mod unsandboxed;
mod warm;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use bwrap::Bwrap;
pub use exec::{
    COMMAND_BYTES_MAX, ExecOutput, ExecRequest, Limits, OUTPUT_BYTES_MAX_DEFAULT, SANDBOX_DATA_DIR, SandboxError,
    SandboxHealth, SandboxMode, TIMEOUT_DEFAULT, ToolExecutor,
};
pub use tinyfat_core::agent_config::Network;
pub use unsandboxed::{UNSANDBOXED_WARNING, Unsandboxed};
pub use warm::WarmStats;

/// Settings of the `[sandbox]` section, validated when the executor is built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxConfig {
    pub mode: SandboxMode,
    pub limits: Limits,
    /// bubblewrap binary; searched in PATH when unset.
    pub bwrap_path: Option<PathBuf>,
    /// First host uid given to agents' tool processes.
    pub uid_base: u32,
    /// Number of uids in the range; agents map into it by a hash of their path.
    pub uid_count: u32,
    /// A memory and pids cgroup per call (cgroup v1). With the kernel's
    /// `favordynmods` (turned on by the executor where it can) joining one
    /// costs ~0.3 ms; otherwise an RCU grace period (a few ms per call).
    /// Without them memory is bounded per process by RLIMIT_AS only.
    pub per_call_cgroups: bool,
    /// Keep one ready sandbox per recently active agent (see `warm`), so a
    /// call skips bwrap's start-up. Each serves exactly one call; off = every
    /// call starts cold, exactly as before.
    pub warm: bool,
    /// A warm sandbox unused this long is killed (idle agents cost nothing).
    pub warm_idle_s: u64,
    /// Warm sandboxes alive at most, across agents (oldest evicted first).
    pub warm_max: usize,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            mode: SandboxMode::Bwrap,
            limits: Limits::default(),
            bwrap_path: None,
            uid_base: 1_900_000_000,
            uid_count: 65_536,
            per_call_cgroups: true,
            warm: true,
            warm_idle_s: 60,
            warm_max: 8,
        }
    }
}

/// Builds the executor the config asks for. Never fails: a sandbox that
/// cannot work here reports it through [`ToolExecutor::check`] and refuses
/// every call with [`SandboxError::Unavailable`].
pub fn build_executor(config: &SandboxConfig) -> Arc<dyn ToolExecutor> {
    match config.mode {
        SandboxMode::Bwrap => Arc::new(Bwrap::new(config)),
        SandboxMode::None => {
            tracing::warn!("sandbox.mode = \"none\": tool commands will run WITHOUT a sandbox (development only)");
            Arc::new(Unsandboxed::new(config.limits.clone()))
        }
    }
}
