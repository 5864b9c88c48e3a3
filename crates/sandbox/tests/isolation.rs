//! Agent A attacks: other agents' files, the host's files, processes,
//! network, environment and its own read-only config. Real bubblewrap.

mod common;

use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;

use common::{Agents, B_SECRET, bwrap, run};
use tinyfat_sandbox::{ExecRequest, SandboxError, ToolExecutor};

#[tokio::test]
async fn the_sandbox_works_and_runs_as_the_agents_unprivileged_uid() {
    let exec = bwrap();
    let health = exec.check().await;
    assert!(health.ok, "{health:?}");
    let agents = Agents::new();
    let out = run(
        &*exec,
        &agents.a,
        "id -u; id -g; id -G; grep -E '^Cap(Eff|Prm|Bnd)|^NoNewPrivs|^Seccomp:' /proc/self/status; pwd; hostname; echo $HOME",
    )
    .await;
    assert!(out.success(), "{out:?}");
    let uid = exec.uid_for(&agents.a).unwrap();
    let lines: Vec<&str> = out.output.lines().collect();
    assert_eq!(lines[0], uid.to_string());
    assert_eq!(lines[1], uid.to_string());
    assert_eq!(lines[2], uid.to_string(), "no supplementary groups");
    for cap in &lines[3..6] {
        assert!(cap.ends_with("0000000000000000"), "capabilities left: {cap}");
    }
    assert_eq!(lines[6], "NoNewPrivs:\t1");
    assert_eq!(lines[7], "Seccomp:\t2", "seccomp filter mode");
    assert_eq!(&lines[8..], ["/data", "sandbox", "/data"]);
    assert_ne!(uid, exec.uid_for(&agents.b).unwrap(), "agents get distinct uids");
}

#[tokio::test]
async fn agent_cannot_reach_a_sibling_agents_files() {
    let exec = bwrap();
    let agents = Agents::new();
    let b_host = agents.b.display().to_string();
    let attempts = [
        "cat ../b/secret.txt".to_string(),
        "cat /data/../b/secret.txt".to_string(),
        format!("cat {b_host}/secret.txt"),
        format!("cat /proc/1/root{b_host}/secret.txt"),
        format!("for p in /proc/[0-9]*; do cat $p/root{b_host}/secret.txt; cat $p/cwd/../b/secret.txt; done"),
        format!("ln -s {b_host}/secret.txt /data/link && cat /data/link"),
        format!("ln {b_host}/secret.txt /data/hard && cat /data/hard"),
        "ln /etc/hosts /data/hard2".to_string(),
        "cd / && ls -R / 2>/dev/null | grep -c secret.txt; find / -name secret.txt 2>/dev/null".to_string(),
        "ls /proc/1/root/ 2>&1; ls /proc/1/cwd/ 2>&1".to_string(),
        format!("ls {} 2>&1", agents.root.path().display()),
    ];
    for cmd in &attempts {
        let out = run(&*exec, &agents.a, cmd).await;
        assert!(!out.output.contains(B_SECRET), "{cmd} leaked: {}", out.output);
    }
    // The symlink A planted stays a dangling link to B on the host.
    let link = agents.a.join("link");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(!agents.a.join("hard").exists() && !agents.a.join("hard2").exists());

    // A later call must not follow A's symlink while preparing /data: B's
    // file keeps its owner and mode.
    let before = std::fs::metadata(agents.b.join("secret.txt")).unwrap();
    let out = run(&*exec, &agents.a, "cat /data/link; ls -l /data/link").await;
    assert!(!out.output.contains(B_SECRET));
    let after = std::fs::metadata(agents.b.join("secret.txt")).unwrap();
    assert_eq!((before.uid(), before.mode()), (after.uid(), after.mode()));
}

#[tokio::test]
async fn host_paths_are_not_there_and_system_dirs_are_read_only() {
    let exec = bwrap();
    let agents = Agents::new();
    let out = run(
        &*exec,
        &agents.a,
        "for p in /root /home /work /var/lib /etc/shadow /etc/ssh /run /sys/kernel; do test -e $p && echo \"visible $p\"; done; \
         touch /usr/x 2>&1; touch /etc/x 2>&1; touch /x 2>&1; mkdir /usr/lib/x 2>&1; \
         mount -t tmpfs none /data 2>&1; unshare -r true 2>&1; unshare -n true 2>&1; echo done",
    )
    .await;
    assert!(!out.output.contains("visible"), "{}", out.output);
    for line in out.output.lines().filter(|l| l.contains("cannot")) {
        assert!(line.ends_with("Read-only file system") || line.ends_with("Permission denied"), "{line}");
    }
    assert_eq!(out.output.matches("cannot").count(), 4, "{}", out.output);
    assert!(
        out.output.contains("must be superuser") || out.output.contains("Operation not permitted"),
        "{}",
        out.output
    );
    assert_eq!(out.output.matches("unshare failed").count(), 2, "{}", out.output);
    assert!(out.output.ends_with("done\n"));
}

#[tokio::test]
async fn config_json_is_read_only_and_data_is_writable() {
    let exec = bwrap();
    let agents = Agents::new();
    let original = std::fs::read_to_string(agents.a.join("config.json")).unwrap();
    let out = run(
        &*exec,
        &agents.a,
        "cat config.json; echo '{\"network\":\"on\"}' > config.json; echo more >> config.json; \
         rm -f config.json; mv config.json x.json; chmod 666 config.json; touch config.json; \
         ln -sf /etc/passwd config.json; \
         echo note >> MEMORY.md && mkdir -p notes && echo hi > notes/a.txt && echo wrote",
    )
    .await;
    assert!(out.output.starts_with(&original), "config readable: {}", out.output);
    assert!(out.output.ends_with("wrote\n"), "{}", out.output);
    assert_eq!(std::fs::read_to_string(agents.a.join("config.json")).unwrap(), original);
    assert!(std::fs::symlink_metadata(agents.a.join("config.json")).unwrap().is_file());
    assert_eq!(std::fs::read_to_string(agents.a.join("MEMORY.md")).unwrap(), "memory\nnote\n");
    assert_eq!(std::fs::read_to_string(agents.a.join("notes/a.txt")).unwrap(), "hi\n");

    // Files the platform (root) writes between calls stay writable.
    std::fs::write(agents.a.join("sessions/web-main.jsonl"), "{}\n").unwrap();
    let out = run(&*exec, &agents.a, "echo x >> sessions/web-main.jsonl && echo ok").await;
    assert_eq!(out.output, "ok\n");

    // /data is nosuid,nodev.
    let out = run(&*exec, &agents.a, "grep ' /data ' /proc/self/mountinfo").await;
    assert!(out.output.contains("nosuid") && out.output.contains("nodev"), "{}", out.output);
}

#[tokio::test]
async fn a_planted_config_symlink_is_never_mounted() {
    let exec = bwrap();
    let agents = Agents::new();
    let fresh = agents.root.path().join("agents/c");
    std::fs::create_dir_all(&fresh).unwrap();
    // No config.json yet: the agent plants one pointing at B's secret.
    let target = agents.b.join("secret.txt");
    run(&*exec, &fresh, &format!("ln -s {} config.json", target.display())).await;
    let out = run(&*exec, &fresh, "cat /data/config.json 2>&1; echo end").await;
    assert!(!out.output.contains(B_SECRET), "{}", out.output);
}

#[tokio::test]
async fn host_processes_are_invisible() {
    let exec = bwrap();
    let agents = Agents::new();
    let out = run(&*exec, &agents.a, "ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '; echo; ps -eo pid=,comm=").await;
    let pids: Vec<u32> = out.output.lines().next().unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert!(pids.len() <= 6, "too many processes visible: {}", out.output);
    assert!(pids.iter().all(|p| *p < 20), "host pids visible: {}", out.output);
    assert!(!pids.contains(&std::process::id()));
    let name =
        std::env::current_exe().unwrap().file_name().unwrap().to_string_lossy().chars().take(15).collect::<String>();
    assert!(!out.output.contains(&name), "{}", out.output);
}

#[tokio::test]
async fn no_file_descriptors_leak_into_the_sandbox() {
    let exec = bwrap();
    let agents = Agents::new();
    // A host handle the platform holds without close-on-exec (as if
    // inherited from its own parent): it must not reach the command.
    let outside = std::fs::File::open(agents.root.path()).unwrap();
    rustix::io::fcntl_setfd(&outside, rustix::io::FdFlags::empty()).unwrap();
    let out = run(&*exec, &agents.a, "ls /proc/self/fd | tr '\\n' ' '; readlink /proc/self/fd/0").await;
    // 0-2, plus the directory ls itself opened.
    assert_eq!(out.output, "0 1 2 3 /dev/null\n");
    drop(outside);
}

#[tokio::test]
async fn network_off_reaches_nothing_not_even_host_loopback() {
    let exec = bwrap();
    let agents = Agents::new();
    let listener = TcpListener::bind("0.0.0.0:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut targets = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    // The host's own addresses: with no network at all these fail locally.
    if let Ok(out) = std::process::Command::new("hostname").arg("-I").output() {
        targets.extend(
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter(|a| !a.contains(':')).map(String::from),
        );
    }
    let mut script = String::from("ip -o link 2>/dev/null | cut -d: -f2; ");
    for t in &targets {
        script.push_str(&format!("(exec 3<>/dev/tcp/{t}/{port}) 2>/dev/null && echo CONNECTED {t}; "));
    }
    script.push_str("echo finished");
    let out = run(&*exec, &agents.a, &script).await;
    assert!(!out.output.contains("CONNECTED"), "{}", out.output);
    assert!(out.output.ends_with("finished\n"), "{}", out.output);
    match listener.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("the host server saw a connection: {other:?}"),
    }
    // The only interface is the sandbox's own loopback.
    let interfaces: Vec<&str> = out.output.lines().filter(|l| !l.contains("finished")).map(str::trim).collect();
    assert!(interfaces.iter().all(|i| *i == "lo"), "{interfaces:?}");
}

/// Runs `env_probe` in a child test process whose environment holds
/// secrets (setting them here would need `unsafe`).
#[test]
fn secrets_in_the_platform_environment_never_enter_the_sandbox() {
    common::require_bwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "env_probe", "--ignored", "--nocapture", "--test-threads=1"])
        .env("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
        .env("TINYFAT_TEST_SECRET", "tinyfat-secret-abcdef")
        .env("TELEGRAM_BOT_TOKEN", "123:telegram-secret")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    let env = text.split("ENV-BEGIN\n").nth(1).and_then(|t| t.split("ENV-END").next()).expect("probe output");
    for secret in ["sk-ant-test-0123456789", "tinyfat-secret-abcdef", "telegram-secret"] {
        assert!(!env.contains(secret), "{secret} leaked:\n{env}");
    }
    let keys: std::collections::BTreeSet<&str> =
        env.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    let allowed = ["HOME", "PATH", "LANG", "PWD", "SHLVL", "_"];
    assert!(keys.iter().all(|k| allowed.contains(k)), "unexpected variables: {keys:?}");
    assert!(env.contains("HOME=/data\n") && env.contains("LANG=C.UTF-8\n"), "{env}");
}

#[tokio::test]
#[ignore = "helper: run by secrets_in_the_platform_environment_never_enter_the_sandbox"]
async fn env_probe() {
    assert!(std::env::var("ANTHROPIC_API_KEY").is_ok(), "probe must run with secrets set");
    let exec = bwrap();
    let agents = Agents::new();
    let out = run(&*exec, &agents.a, "env; cat /proc/self/environ | tr '\\0' '\\n' >/dev/null").await;
    println!("ENV-BEGIN\n{}ENV-END", out.output);
}

#[tokio::test]
async fn bad_requests_and_missing_bwrap_are_clear_errors() {
    let exec = bwrap();
    let agents = Agents::new();
    let err = exec.run(ExecRequest::new(&agents.a, "true").workdir("/etc")).await.unwrap_err();
    assert!(matches!(err, SandboxError::InvalidRequest(_)), "{err}");
    let err = exec.run(ExecRequest::new(&agents.a, "true").workdir("/data/nope")).await.unwrap_err();
    assert!(matches!(err, SandboxError::InvalidRequest(_)), "{err}");
    let out = exec.run(ExecRequest::new(&agents.a, "mkdir -p sub; true")).await.unwrap();
    assert!(out.success());
    let out = exec.run(ExecRequest::new(&agents.a, "pwd").workdir("/data/sub")).await.unwrap();
    assert_eq!(out.output, "/data/sub\n");
    let err = exec.run(ExecRequest::new(agents.root.path().join("missing"), "true")).await.unwrap_err();
    assert!(matches!(err, SandboxError::InvalidRequest(_)), "{err}");

    let config = tinyfat_sandbox::SandboxConfig { bwrap_path: Some("/nonexistent/bwrap".into()), ..Default::default() };
    let broken = tinyfat_sandbox::build_executor(&config);
    let health = broken.check().await;
    assert!(!health.ok);
    assert!(health.message.contains("apt-get install bubblewrap"), "{}", health.message);
    let err = broken.run(ExecRequest::new(&agents.a, "echo unsandboxed")).await.unwrap_err();
    assert!(matches!(err, SandboxError::Unavailable(ref m) if m.contains("bubblewrap")), "{err}");
}
