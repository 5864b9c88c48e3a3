//! `sandbox.mode = "none"`: works, warns loudly, and still applies the
//! environment, timeout, cancellation and output limits.

mod common;

use std::time::Duration;

use common::{Agents, host_processes_with_cmdline};
use tinyfat_sandbox::{ExecRequest, SandboxConfig, SandboxMode, ToolExecutor, UNSANDBOXED_WARNING, build_executor};

fn unsandboxed() -> std::sync::Arc<dyn ToolExecutor> {
    build_executor(&SandboxConfig { mode: SandboxMode::None, ..SandboxConfig::default() })
}

#[tokio::test]
async fn runs_in_the_agent_dir_and_warns() {
    let exec = unsandboxed();
    assert_eq!(exec.mode(), SandboxMode::None);
    let health = exec.check().await;
    assert!(health.ok && health.message.contains("development only"), "{health:?}");
    let agents = Agents::new();
    let out = exec
        .run(ExecRequest::new(&agents.a, "pwd; echo $HOME; env | cut -d= -f1 | sort | tr '\\n' ' '"))
        .await
        .unwrap();
    assert!(out.success(), "{out:?}");
    let mut lines = out.output.lines();
    assert_eq!(lines.next(), Some(UNSANDBOXED_WARNING));
    assert_eq!(lines.next(), Some(agents.a.to_str().unwrap()));
    assert_eq!(lines.next(), Some(agents.a.to_str().unwrap()));
    let keys: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    for key in &keys {
        assert!(["HOME", "LANG", "PATH", "PWD", "SHLVL", "_"].contains(key), "{keys:?}");
    }
}

#[tokio::test]
async fn timeout_kills_the_process_group_and_output_is_capped() {
    let exec = unsandboxed();
    let agents = Agents::new();
    let out = exec
        .run(ExecRequest::new(&agents.a, "sleep 987661 & sleep 987661").timeout(Duration::from_millis(500)))
        .await
        .unwrap();
    assert!(out.timed_out, "{out:?}");
    assert!(host_processes_with_cmdline(&["sleep", "987661"]).is_empty());

    let out = exec
        .run(ExecRequest::new(&agents.a, "head -c 10000000 /dev/zero | tr '\\0' z").output_bytes_max(1000))
        .await
        .unwrap();
    assert!(out.truncated && out.output_bytes == 10_000_000);
    assert!(out.output.len() <= UNSANDBOXED_WARNING.len() + 1 + 1000 + 60, "{}", out.output.len());

    let err = exec.run(ExecRequest::new(&agents.a, "true").workdir("/etc")).await.unwrap_err();
    assert!(err.to_string().contains("working directory"), "{err}");
}
