//! Helpers for the sandbox integration tests: real bubblewrap, real
//! processes, two sibling agent directories on the host.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tinyfat_sandbox::{Bwrap, ExecOutput, ExecRequest, Limits, SandboxConfig, ToolExecutor};

/// B's secret, written into B's directory; A must never print it.
pub const B_SECRET: &str = "b-secret-7f3a9c1e";

/// Fails (never skips) when bubblewrap is missing.
pub fn require_bwrap() {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| d.join("bwrap").is_file());
    assert!(
        found,
        "bubblewrap is not installed: these tests need the real sandbox; run `apt-get install -y bubblewrap`"
    );
}

pub fn config(limits: Limits) -> SandboxConfig {
    SandboxConfig { limits, ..SandboxConfig::default() }
}

pub fn bwrap() -> Arc<Bwrap> {
    bwrap_with(Limits::default())
}

pub fn bwrap_with(limits: Limits) -> Arc<Bwrap> {
    require_bwrap();
    Arc::new(Bwrap::new(&config(limits)))
}

/// `root/agents/{a,b}`, each with config.json, MEMORY.md and B a secret.
#[derive(Debug)]
pub struct Agents {
    pub root: tempfile::TempDir,
    pub a: PathBuf,
    pub b: PathBuf,
}

impl Agents {
    pub fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("agents/a");
        let b = root.path().join("agents/b");
        for dir in [&a, &b] {
            std::fs::create_dir_all(dir.join("sessions")).unwrap();
            std::fs::write(dir.join("config.json"), "{\"model\":\"m\",\"network\":\"off\"}\n").unwrap();
            std::fs::write(dir.join("MEMORY.md"), "memory\n").unwrap();
        }
        std::fs::write(b.join("secret.txt"), B_SECRET).unwrap();
        Self { root, a, b }
    }
}

pub async fn run(exec: &dyn ToolExecutor, dir: &Path, command: &str) -> ExecOutput {
    exec.run(ExecRequest::new(dir, command).timeout(Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"))
}

/// Host processes whose command line is exactly `words`.
pub fn host_processes_with_cmdline(words: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = words.iter().flat_map(|w| w.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}

/// Host processes whose real uid is `uid`.
pub fn host_processes_of_uid(uid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().next()?.parse::<u32>().ok())
                    == Some(uid)
            })
        })
        .collect()
}

/// Polls `f` until it is true or `within` passed.
pub async fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + within;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() > until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This process's resident memory in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap()
}
