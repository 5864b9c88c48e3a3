//! Runaway commands: timeouts, cancellation, fork bombs, memory hogs and
//! floods of output are contained, and the executor keeps working.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Agents, bwrap, bwrap_with, eventually, host_processes_of_uid, host_processes_with_cmdline, run};
use tinyfat_sandbox::{Bwrap, ExecRequest, Limits, SandboxConfig, ToolExecutor};

#[tokio::test]
async fn timeout_kills_the_whole_process_tree() {
    let exec = bwrap();
    let agents = Agents::new();
    let started = Instant::now();
    let out = exec
        .run(
            ExecRequest::new(
                &agents.a,
                "sleep 987651 & (sleep 987651 &) ; setsid sleep 987651 & echo started; sleep 987651",
            )
            .timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    assert!(out.timed_out && !out.cancelled, "{out:?}");
    assert_eq!(out.signal, Some(9));
    assert_eq!(out.output, "started\n");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    // Nothing survives, not even the daemonised sleeps (each would sleep for
    // days). The kernel tears a killed tree down asynchronously: on a loaded
    // machine the last processes were seen exiting right after the answer.
    let uid = exec.uid_for(&agents.a).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || host_processes_with_cmdline(&["sleep", "987651"]).is_empty()
            && host_processes_of_uid(uid).is_empty())
        .await,
        "left: {:?} {:?}",
        host_processes_with_cmdline(&["sleep", "987651"]),
        host_processes_of_uid(uid)
    );
}

#[tokio::test]
async fn background_jobs_die_with_the_command() {
    let exec = bwrap();
    let agents = Agents::new();
    let out = run(&*exec, &agents.a, "sleep 987652 & echo bye").await;
    assert!(out.success() && out.output == "bye\n", "{out:?}");
    assert!(out.duration < Duration::from_secs(3), "{:?}", out.duration);
    assert!(host_processes_with_cmdline(&["sleep", "987652"]).is_empty());
}

#[tokio::test]
async fn cancellation_kills_promptly() {
    let exec = bwrap();
    let agents = Agents::new();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let req = ExecRequest::new(&agents.a, "echo running; sleep 987653").timeout(Duration::from_secs(60)).cancel(rx);
    let task = tokio::spawn({
        let exec = exec.clone();
        async move { exec.run(req).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cancelled_at = Instant::now();
    tx.send(true).unwrap();
    let out = task.await.unwrap().unwrap();
    assert!(cancelled_at.elapsed() < Duration::from_secs(2), "{:?}", cancelled_at.elapsed());
    assert!(out.cancelled && !out.timed_out, "{out:?}");
    assert_eq!(out.output, "running\n");
    assert!(host_processes_with_cmdline(&["sleep", "987653"]).is_empty());

    // Already cancelled: nothing starts.
    let (tx, rx) = tokio::sync::watch::channel(true);
    let out = exec.run(ExecRequest::new(&agents.a, "touch started").cancel(rx)).await.unwrap();
    drop(tx);
    assert!(out.cancelled);
    assert!(!agents.a.join("started").exists());
}

#[tokio::test]
async fn a_fork_bomb_is_contained() {
    let limits = Limits { processes_max: 64, ..Limits::default() };
    // No warm sandbox: one waiting for the agent's next call runs as the
    // same uid and would count as a survivor below.
    common::require_bwrap();
    let exec = Arc::new(Bwrap::new(&SandboxConfig { warm: false, ..common::config(limits) }));
    let agents = Agents::new();
    let out = exec
        .run(
            ExecRequest::new(&agents.a, "bomb() { bomb | bomb & }; bomb; sleep 3; echo survived")
                .timeout(Duration::from_secs(6)),
        )
        .await
        .unwrap();
    assert!(out.duration < Duration::from_secs(10), "{:?}", out.duration);
    let uid = exec.uid_for(&agents.a).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || host_processes_of_uid(uid).is_empty()).await,
        "bomb processes left: {:?}",
        host_processes_of_uid(uid)
    );
    let out = run(&*exec, &agents.a, "echo still works").await;
    assert_eq!(out.output, "still works\n");
}

#[tokio::test]
async fn process_limit_is_enforced() {
    let limits = Limits { processes_max: 20, ..Limits::default() };
    let exec = bwrap_with(limits);
    let agents = Agents::new();
    let out = run(&*exec, &agents.a, "for i in $(seq 40); do sleep 2 & done 2>&1 | grep -c 'fork' ; wait").await;
    let failed: u32 = out.output.trim().lines().last().unwrap_or("0").parse().unwrap_or(0);
    assert!(failed > 0, "40 background jobs under a limit of 20 should fail to fork: {}", out.output);
}

#[tokio::test]
async fn a_memory_hog_hits_the_address_space_limit() {
    let limits = Limits { address_space_bytes_max: 512 << 20, ..Limits::default() };
    let exec = bwrap_with(limits);
    let agents = Agents::new();
    let out = run(&*exec, &agents.a, "x=$(head -c 2000000000 /dev/zero | tr '\\0' a); echo length ${#x}").await;
    assert!(!out.output.contains("length 2000000000"), "{}", out.output);
    assert!(out.output.contains("allocate") || out.exit_code != Some(0), "{out:?}");
    let out = run(&*exec, &agents.a, "echo still works").await;
    assert_eq!(out.output, "still works\n");
}

/// Joining a call's cgroups must not cost a kernel grace period per call:
/// on Linux 6.0+ as root the executor turns on `favordynmods`.
#[tokio::test]
async fn cgroup_moves_are_fast_where_the_kernel_allows() {
    let exec = bwrap();
    let health = exec.check().await;
    let Some(note) = health.notes.iter().find(|n| n.starts_with("cgroup v1:")) else {
        eprintln!("no cgroup v1 on this host: {:?}", health.notes);
        return;
    };
    assert!(note.contains("moves are fast") || note.contains("moves are slow"), "{note}");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let major: u32 = release.split('.').next().unwrap().parse().unwrap();
    if major >= 6 && note.contains("memory at") {
        assert!(note.contains("moves are fast"), "{note}");
    }
    // The hierarchy carrying the option is detached: no mount is left.
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mountinfo.contains("tinyfat-fast-moves"), "{mountinfo}");
}

#[tokio::test]
async fn a_memory_hog_hits_the_cgroup_limit_where_cgroups_exist() {
    let limits = Limits { memory_bytes_max: 128 << 20, ..Limits::default() };
    let exec = bwrap_with(limits);
    let health = exec.check().await;
    if !health.notes.iter().any(|n| n.contains("memory at")) {
        eprintln!("no memory cgroup on this host: {:?}", health.notes);
        return;
    }
    let agents = Agents::new();
    // 1 GiB resident: far above the cgroup limit, below RLIMIT_AS.
    let out = run(&*exec, &agents.a, "head -c 1073741824 /dev/zero | tail -c 1073741824 > /dev/null; echo rc=$?").await;
    assert!(out.output.contains("memory limit"), "{out:?}");
    let out = run(&*exec, &agents.a, "echo still works").await;
    assert_eq!(out.output, "still works\n");
}

#[tokio::test]
async fn a_flood_of_output_is_capped_and_memory_stays_bounded() {
    let exec = bwrap();
    let agents = Agents::new();
    let cap = 64 * 1024;
    let before_kib = common::rss_kib();
    let out = exec
        .run(
            ExecRequest::new(&agents.a, "head -c 1073741824 /dev/zero | tr '\\0' y; echo; echo the-end")
                .output_bytes_max(cap)
                .timeout(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    let after_kib = common::rss_kib();
    assert!(out.success(), "{:?}", out.exit_code);
    assert!(out.truncated);
    assert_eq!(out.output_bytes, 1073741824 + 1 + 8);
    let note = format!("\n[output truncated: {} bytes omitted]\n", out.output_bytes - cap as u64);
    assert!(out.output.len() <= cap + note.len(), "{}", out.output.len());
    assert!(out.output.contains(&note), "note missing");
    assert!(out.output.starts_with("yyyy") && out.output.ends_with("yyy\nthe-end\n"));
    assert!(after_kib < before_kib + 50 * 1024, "rss grew from {before_kib} to {after_kib} KiB");
}

#[tokio::test]
async fn file_size_limit_applies() {
    let limits = Limits { file_size_bytes_max: 1 << 20, ..Limits::default() };
    let exec = bwrap_with(limits);
    let agents = Agents::new();
    let out = run(&*exec, &agents.a, "head -c 5000000 /dev/zero > big; echo rc=$?; stat -c %s big").await;
    assert!(out.output.contains("1048576"), "{}", out.output);
    assert!(!out.output.contains("rc=0"), "{}", out.output);
}

#[tokio::test]
async fn many_calls_in_parallel_are_isolated_and_cleaned_up() {
    let exec = bwrap();
    let agents = Agents::new();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let exec = exec.clone();
        let dir = if i % 2 == 0 { agents.a.clone() } else { agents.b.clone() };
        tasks.push(tokio::spawn(async move { run(&*exec, &dir, &format!("echo {i} > f{i}; cat f{i}")).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().output, format!("{i}\n"));
    }
}
