//! `sandbox.mode = "none"`: tool commands run directly on the host.
//!
//! For development on machines without bubblewrap only. Every call logs a
//! warning and starts its output with a warning line, so nobody mistakes it
//! for isolation: the command sees the whole host, its network, and the
//! platform's files. What it still does: `bash -c` with the agent's
//! directory as working directory and HOME, an environment cleared down to
//! HOME, PATH and LANG (no model keys or tokens), rlimits through
//! `prlimit(1)`, the wall-clock timeout, cancellation and the output cap,
//! killing the process group. Paths under `/data` are not remapped.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;

use rustix::process::{Pid, Resource, Signal, kill_process_group};
use tokio::net::unix::pipe;
use tokio::time::Instant;

use crate::bwrap::{find_in_path, within_own_limit};
use crate::exec::{ExecOutput, ExecRequest, Limits, SandboxError, SandboxHealth, SandboxMode, ToolExecutor};
use crate::supervise::{self, Stop};

/// First line of every unsandboxed call's output.
pub const UNSANDBOXED_WARNING: &str =
    "[warning: sandbox.mode = \"none\": this command ran WITHOUT a sandbox, with full access to the host]";

/// The development-only executor.
#[derive(Debug)]
pub struct Unsandboxed {
    limits: Limits,
    prlimit: Option<PathBuf>,
}

impl Unsandboxed {
    pub fn new(limits: Limits) -> Self {
        Self { limits, prlimit: find_in_path("prlimit") }
    }

    fn command(&self, req: &ExecRequest, cwd: &PathBuf) -> tokio::process::Command {
        let mut cmd = match &self.prlimit {
            Some(prlimit) => {
                let l = &self.limits;
                let own = within_own_limit;
                let mut c = tokio::process::Command::new(prlimit);
                c.arg(format!("--cpu={}:{}", own(Resource::Cpu, l.cpu_s_max), own(Resource::Cpu, l.cpu_s_max + 5)))
                    .arg(format!("--as={}", own(Resource::As, l.address_space_bytes_max)))
                    .arg(format!("--nproc={}", own(Resource::Nproc, l.processes_max)))
                    .arg(format!("--nofile={}", own(Resource::Nofile, l.open_files_max)))
                    .arg(format!("--fsize={}", own(Resource::Fsize, l.file_size_bytes_max)))
                    .arg("--core=0")
                    .arg("--")
                    .arg("/bin/bash");
                c
            }
            None => tokio::process::Command::new("/bin/bash"),
        };
        cmd.arg("-c")
            .arg(&req.command)
            .env_clear()
            .env("HOME", cwd)
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()))
            .env("LANG", std::env::var_os("LANG").unwrap_or_else(|| "C.UTF-8".into()))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        cmd
    }
}

#[async_trait::async_trait]
impl ToolExecutor for Unsandboxed {
    fn mode(&self) -> SandboxMode {
        SandboxMode::None
    }

    async fn check(&self) -> SandboxHealth {
        let mut notes = vec!["tools run WITHOUT a sandbox: full host file system, network and processes".to_string()];
        if self.prlimit.is_none() {
            notes.push("prlimit (util-linux) not found: no resource limits".into());
        }
        SandboxHealth {
            mode: SandboxMode::None,
            ok: true,
            message: "sandbox disabled (sandbox.mode = \"none\"): development only".into(),
            notes,
        }
    }

    async fn run(&self, req: ExecRequest) -> Result<ExecOutput, SandboxError> {
        let started = Instant::now();
        tracing::warn!(
            data_dir = %req.data_dir.display(),
            "running a tool command WITHOUT a sandbox (sandbox.mode = \"none\"); development only"
        );
        let relative = req.validate()?;
        let cwd = if relative.as_os_str().is_empty() { req.data_dir.clone() } else { req.data_dir.join(relative) };
        if !cwd.is_dir() {
            return Err(SandboxError::InvalidRequest(format!("working directory {} does not exist", cwd.display())));
        }
        let (out_r, out_w) = std::io::pipe()?;
        let out_w2 = out_w.try_clone()?;
        let mut cmd = self.command(&req, &cwd);
        cmd.stdout(Stdio::from(out_w)).stderr(Stdio::from(out_w2));
        let child = cmd.spawn()?;
        drop(cmd);
        let pgid = child.id().and_then(|p| Pid::from_raw(p as i32));
        let kill_group = || {
            if let Some(pgid) = pgid {
                let _ = kill_process_group(pgid, Signal::KILL);
            }
        };
        let output = pipe::Receiver::from_owned_fd(OwnedFd::from(out_r))?;
        let supervised = supervise::supervise(
            child,
            output,
            started + req.timeout,
            req.cancel.clone(),
            req.output_bytes_max,
            &|_child| kill_group(),
            // Background jobs left in the group go with the command, as in
            // the sandbox. The group id stays reserved while members live.
            &kill_group,
        )
        .await?;
        let (text, truncated) = supervised.capture.render();
        Ok(ExecOutput {
            output: format!("{UNSANDBOXED_WARNING}\n{text}"),
            output_bytes: supervised.capture.total_bytes(),
            truncated,
            exit_code: supervised.exit_code(),
            signal: supervised.signal(),
            timed_out: matches!(supervised.stop, Stop::TimedOut),
            cancelled: matches!(supervised.stop, Stop::Cancelled),
            duration: started.elapsed(),
        })
    }
}
