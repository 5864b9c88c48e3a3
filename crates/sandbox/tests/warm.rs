//! The warm pool with the real sandbox: a ready sandbox serves the next
//! call of its agent only, exactly once, with nothing carried over; it is
//! killed after its idle time and when the executor is dropped.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Agents, B_SECRET, eventually, host_processes_of_uid, require_bwrap, run};
use tinyfat_sandbox::{Bwrap, ExecRequest, Limits, SandboxConfig, ToolExecutor};

fn warm_bwrap(idle_s: u64) -> Arc<Bwrap> {
    require_bwrap();
    Arc::new(Bwrap::new(&SandboxConfig { warm: true, warm_idle_s: idle_s, ..common::config(Limits::default()) }))
}

async fn wait_ready(exec: &Bwrap, dir: &Path) {
    assert!(eventually(Duration::from_secs(20), || exec.warm_ready(dir)).await, "no warm sandbox became ready");
}

/// What a command sees of its environment, minus what differs per process.
const ENV_PROBE: &str = "echo \"uid=$(id -u) gid=$(id -g) pwd=$PWD shlvl=$SHLVL lang=$LANG\"; \
     env | grep -v '^_=' | sort; ls /proc/self/fd; cat /proc/self/status | grep -E '^(Cap|NoNewPrivs|Seccomp)'; \
     ulimit -a; ls -A /tmp; readlink /proc/self/ns/pid";

#[tokio::test]
async fn the_second_call_starts_warm_and_sees_what_a_cold_call_sees() {
    let agents = Agents::new();
    let warm = warm_bwrap(60);
    let cold = Arc::new(Bwrap::new(&SandboxConfig { warm: false, ..common::config(Limits::default()) }));

    let first = run(warm.as_ref(), &agents.a, "echo one").await;
    assert_eq!(first.output, "one\n");
    assert_eq!(warm.warm_stats().taken, 0);
    wait_ready(&warm, &agents.a).await;

    let w = run(warm.as_ref(), &agents.a, ENV_PROBE).await;
    assert!(w.success(), "{w:?}");
    assert_eq!(warm.warm_stats().taken, 1, "the second call used the warm sandbox");
    let c = run(cold.as_ref(), &agents.a, ENV_PROBE).await;
    assert_eq!(cold.warm_stats().taken, 0);
    // Everything but the PID namespace inode (fresh per call) is identical.
    let strip_ns = |s: &str| s.lines().filter(|l| !l.starts_with("pid:[")).collect::<Vec<_>>().join("\n");
    assert_eq!(strip_ns(&w.output), strip_ns(&c.output));
    assert!(w.output.contains("pwd=/data shlvl=1 lang=C.UTF-8"), "{}", w.output);

    // Exit codes and stdin are a cold call's.
    wait_ready(&warm, &agents.a).await;
    let out = run(warm.as_ref(), &agents.a, "read -r x; echo \"[$x]\"; exit 7").await;
    assert_eq!((out.output.as_str(), out.exit_code), ("[]\n", Some(7)));
    assert_eq!(warm.warm_stats().taken, 2);
}

#[tokio::test]
async fn consecutive_calls_share_no_tmp_files_and_no_processes() {
    let agents = Agents::new();
    let exec = warm_bwrap(60);
    wait_ready_after(&exec, &agents.a, "true").await;
    let first =
        run(exec.as_ref(), &agents.a, "echo x > /tmp/mark; setsid sleep 1000 >/dev/null 2>&1 & echo started").await;
    assert_eq!(first.output, "started\n");
    wait_ready(&exec, &agents.a).await;
    let second = run(exec.as_ref(), &agents.a, "ls -A /tmp; ps -eo comm= | grep -c '^sleep$'; true").await;
    assert_eq!(exec.warm_stats().taken, 2);
    assert_eq!(second.output, "0\n", "no /tmp file and no sleep of the first call: {second:?}");
}

async fn wait_ready_after(exec: &Bwrap, dir: &Path, command: &str) {
    let out = run(exec, dir, command).await;
    assert!(out.success(), "{out:?}");
    wait_ready(exec, dir).await;
}

#[tokio::test]
async fn an_agents_warm_sandbox_is_never_used_for_another_agent() {
    let agents = Agents::new();
    let exec = warm_bwrap(60);
    wait_ready_after(&exec, &agents.a, "true").await;
    assert!(!exec.warm_ready(&agents.b));

    let b = run(exec.as_ref(), &agents.b, "cat /data/secret.txt; id -u").await;
    assert_eq!(exec.warm_stats().taken, 0, "B started cold");
    let b_uid = exec.uid_for(&agents.b).unwrap();
    assert_eq!(b.output, format!("{B_SECRET}{b_uid}\n"));

    let a = run(exec.as_ref(), &agents.a, "cat /data/secret.txt 2>&1; id -u").await;
    assert_eq!(exec.warm_stats().taken, 1, "A's own warm sandbox");
    let a_uid = exec.uid_for(&agents.a).unwrap();
    assert!(!a.output.contains(B_SECRET), "{a:?}");
    assert!(a.output.ends_with(&format!("{a_uid}\n")), "{a:?}");
}

#[tokio::test]
async fn a_replaced_config_json_or_agent_dir_is_never_served_by_a_stale_sandbox() {
    let agents = Agents::new();
    let exec = warm_bwrap(60);
    wait_ready_after(&exec, &agents.a, "true").await;
    // The platform rewrites config.json by rename (network on -> off here).
    let tmp = agents.a.join("config.json.new");
    std::fs::write(&tmp, "{\"model\":\"m\",\"network\":\"on\"}\n").unwrap();
    std::fs::rename(&tmp, agents.a.join("config.json")).unwrap();
    let out = run(exec.as_ref(), &agents.a, "cat /data/config.json").await;
    assert_eq!(out.output, "{\"model\":\"m\",\"network\":\"on\"}\n");
    let stats = exec.warm_stats();
    assert_eq!((stats.taken, stats.discarded), (0, 1), "{stats:?}");

    // The directory itself replaced under the same path.
    wait_ready(&exec, &agents.a).await;
    std::fs::rename(&agents.a, agents.root.path().join("old-a")).unwrap();
    std::fs::create_dir(&agents.a).unwrap();
    std::fs::write(agents.a.join("new.txt"), "new\n").unwrap();
    let out = run(exec.as_ref(), &agents.a, "ls /data").await;
    assert_eq!(out.output, "new.txt\n");
    assert_eq!(exec.warm_stats().taken, 0);

    // Files the platform writes (as root) between calls are adopted.
    wait_ready(&exec, &agents.a).await;
    std::fs::write(agents.a.join("later.txt"), "x").unwrap();
    let out = run(exec.as_ref(), &agents.a, "echo y >> /data/later.txt && cat /data/later.txt").await;
    assert_eq!(out.output, "xy\n");
    assert_eq!(exec.warm_stats().taken, 1);
}

#[tokio::test]
async fn a_timeout_kills_a_warm_started_command_and_its_namespace() {
    let agents = Agents::new();
    let exec = warm_bwrap(60);
    wait_ready_after(&exec, &agents.a, "true").await;
    let uid = exec.uid_for(&agents.a).unwrap();
    let out = exec
        .run(ExecRequest::new(&agents.a, "setsid sleep 1000 & sleep 1000").timeout(Duration::from_millis(800)))
        .await
        .unwrap();
    assert_eq!(exec.warm_stats().taken, 1);
    assert!(out.timed_out, "{out:?}");
    assert!(out.duration < Duration::from_secs(10), "{out:?}");
    // Only the next warm sandbox (bash waiting for a command) may run as
    // the agent's uid; no sleep survives.
    assert!(
        eventually(Duration::from_secs(5), || {
            host_processes_of_uid(uid)
                .iter()
                .all(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() != "sleep"))
        })
        .await
    );
}

#[tokio::test]
async fn idle_warm_sandboxes_are_killed_after_their_ttl_and_on_drop() {
    let agents = Agents::new();
    let exec = warm_bwrap(1);
    let uid = exec.uid_for(&agents.a).unwrap();
    wait_ready_after(&exec, &agents.a, "true").await;
    // Ready means started; bash waits as the agent's uid once bwrap is done.
    assert!(
        eventually(Duration::from_secs(5), || !host_processes_of_uid(uid).is_empty()).await,
        "the warm sandbox's bash waits as the agent uid"
    );
    assert!(
        eventually(Duration::from_secs(10), || !exec.warm_ready(&agents.a) && host_processes_of_uid(uid).is_empty())
            .await,
        "warm sandbox still alive after its idle time"
    );
    assert!(exec.warm_stats().discarded >= 1);

    // Dropping the executor kills the ready one at once.
    let exec = warm_bwrap(600);
    let uid_b = exec.uid_for(&agents.b).unwrap();
    wait_ready_after(&exec, &agents.b, "true").await;
    assert!(eventually(Duration::from_secs(5), || !host_processes_of_uid(uid_b).is_empty()).await);
    drop(exec);
    assert!(
        eventually(Duration::from_secs(5), || host_processes_of_uid(uid_b).is_empty()).await,
        "warm sandbox survived its executor"
    );
}

#[tokio::test]
async fn the_pool_is_bounded_across_agents() {
    let agents = Agents::new();
    require_bwrap();
    let exec = Arc::new(Bwrap::new(&SandboxConfig { warm_max: 1, ..common::config(Limits::default()) }));
    wait_ready_after(&exec, &agents.a, "true").await;
    wait_ready_after(&exec, &agents.b, "true").await;
    assert!(!exec.warm_ready(&agents.a), "A's was evicted for B's");
    assert_eq!(exec.warm_stats().ready, 1);
    let uid_a = exec.uid_for(&agents.a).unwrap();
    assert!(eventually(Duration::from_secs(5), || host_processes_of_uid(uid_a).is_empty()).await);
}

#[tokio::test]
async fn cancelling_kills_a_warm_started_command_promptly() {
    let agents = Agents::new();
    let exec = warm_bwrap(60);
    wait_ready_after(&exec, &agents.a, "true").await;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = tx.send(true);
    });
    let out = exec
        .run(ExecRequest::new(&agents.a, "echo started; sleep 1000").timeout(Duration::from_secs(60)).cancel(rx))
        .await
        .unwrap();
    assert_eq!(exec.warm_stats().taken, 1);
    assert!(out.cancelled && !out.timed_out, "{out:?}");
    assert_eq!(out.output, "started\n");
    assert!(out.duration < Duration::from_secs(10), "{out:?}");
}

#[tokio::test]
async fn prewarm_makes_the_first_call_warm_and_the_report_names_the_pool() {
    let agents = Agents::new();
    let exec = warm_bwrap(60);
    let health = exec.check().await;
    assert!(health.ok, "{health:?}");
    assert!(health.notes.iter().any(|n| n.starts_with("warm start: on")), "{health:?}");
    assert_eq!(exec.warm_stats().prepared, 0, "the self-check leaves no warm sandbox");
    exec.prewarm(&agents.a);
    wait_ready(&exec, &agents.a).await;
    let out = run(exec.as_ref(), &agents.a, "echo first").await;
    assert_eq!(out.output, "first\n");
    assert_eq!(exec.warm_stats().taken, 1);
}
