//! Per-call overhead of the sandbox, measured as spawn-to-exit of `true`.
//!
//! Rows: a plain process spawn, a bare `bwrap --unshare-all` with /usr
//! mounted (the reference), the same bwrap running the process chain our
//! design needs (`setpriv` to the agent uid, then `bash -c`), the
//! unsandboxed executor, and `Bwrap::run` without and with its default
//! per-call cgroups (uid drop, rlimits, cgroups, seccomp, output capture,
//! cleanup), all cold (`warm = false`), and the default executor's call
//! that finds a warm sandbox ready (the agent's previous call left it; the
//! wait for it to be ready is outside the wall time but inside the cpu
//! column, so that column is the whole cost of a warm call). Before the
//! table the memory of one idle warm sandbox is printed. Iterations are interleaved so machine noise hits all rows
//! alike; the last lines give the full call's ratio to the reference. The
//! cpu column (this process plus reaped children) stays meaningful on a
//! busy machine, where wall time is mostly waiting for a core.
//!
//! Run: `cargo bench -p tinyfat-sandbox --bench overhead` (as root, with
//! bubblewrap installed). `TINYFAT_BENCH_N` sets the iterations (default 300).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tinyfat_sandbox::{Bwrap, ExecRequest, SandboxConfig, ToolExecutor, Unsandboxed};

/// `USER_HZ`: the unit of the CPU times in /proc/self/stat (100 on Linux).
const TICKS_PER_S: f64 = 100.0;

/// CPU time of this process plus its reaped children, in ticks: robust
/// when the machine is busy, where wall time mostly measures the run queue.
fn cpu_ticks_now() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_name = stat.rsplit_once(')').unwrap().1;
    // Fields 14-17 (utime, stime, cutime, cstime); field 3 is the first here.
    after_name.split_whitespace().skip(11).take(4).map(|f| f.parse::<u64>().unwrap()).sum()
}

fn main() {
    let n: usize = std::env::var("TINYFAT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let config = SandboxConfig { warm: false, ..SandboxConfig::default() };
    let bwrap = Bwrap::new(&config);
    let health = rt.block_on(bwrap.check());
    assert!(health.ok, "sandbox not usable here: {health:?}");
    for note in &health.notes {
        println!("# {note}");
    }
    let lean = Bwrap::new(&SandboxConfig { per_call_cgroups: false, ..config.clone() });
    let warm = Bwrap::new(&SandboxConfig::default());
    let warm_dir = tempfile::tempdir().unwrap();
    std::fs::write(warm_dir.path().join("config.json"), "{}").unwrap();
    let warm_uid = warm.uid_for(warm_dir.path()).unwrap();
    let none = Unsandboxed::new(config.limits.clone());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();

    let plain = || {
        let s = Command::new("/bin/true").stdout(Stdio::null()).status().unwrap();
        assert!(s.success());
    };
    let bare = || {
        let s = Command::new("bwrap")
            .args(["--unshare-all", "--ro-bind", "/usr", "/usr"])
            .args(["--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"])
            .args(["--proc", "/proc", "--dev", "/dev", "--", "/bin/true"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(s.success());
    };
    let full = || {
        let out = rt.block_on(bwrap.run(ExecRequest::new(dir.path(), "true"))).unwrap();
        assert!(out.success(), "{out:?}");
    };
    // Waits (not timed) for the agent's next warm sandbox: ready in the
    // pool, then a moment for bwrap to reach bash's `read`.
    let warm_wait = || {
        let until = Instant::now() + Duration::from_secs(30);
        while !warm.warm_ready(warm_dir.path()) {
            assert!(Instant::now() < until, "no warm sandbox became ready");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(WARM_SETTLE_MS));
    };
    let full_warm = || {
        let taken = warm.warm_stats().taken;
        let t = Instant::now();
        let out = rt.block_on(warm.run(ExecRequest::new(warm_dir.path(), "true"))).unwrap();
        let elapsed = t.elapsed();
        assert!(out.success(), "{out:?}");
        assert_eq!(warm.warm_stats().taken, taken + 1, "the call started warm");
        warm_wait();
        Some(elapsed)
    };
    let full_lean = || {
        let out = rt.block_on(lean.run(ExecRequest::new(dir.path(), "true"))).unwrap();
        assert!(out.success(), "{out:?}");
    };
    // --unshare-all minus the user namespace: setpriv needs real root.
    let uid = bwrap.uid_for(dir.path()).unwrap().to_string();
    let bare_chain = || {
        let s = Command::new("bwrap")
            .args(["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"])
            .args(["--ro-bind", "/usr", "/usr"])
            .args(["--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"])
            .args(["--proc", "/proc", "--dev", "/dev", "--", "/usr/bin/setpriv"])
            .args([format!("--reuid={uid}"), format!("--regid={uid}")])
            .args(["--clear-groups", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all"])
            .args(["--no-new-privs", "--", "/bin/bash", "-c", "true"])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(s.success());
    };
    let unsandboxed = || {
        let out = rt.block_on(none.run(ExecRequest::new(dir.path(), "true"))).unwrap();
        assert!(out.success(), "{out:?}");
    };
    let timed = |f: &dyn Fn()| {
        f();
        None
    };
    let rows: [(&str, &dyn Fn() -> Option<Duration>); 7] = [
        ("spawn /bin/true", &|| timed(&plain)),
        ("bare bwrap --unshare-all true", &|| timed(&bare)),
        ("bare bwrap + setpriv + bash -c true", &|| timed(&bare_chain)),
        ("Unsandboxed::run(\"true\")", &|| timed(&unsandboxed)),
        ("Bwrap::run(\"true\"), cold, no cgroups", &|| timed(&full_lean)),
        ("Bwrap::run(\"true\") cold (full sandbox)", &|| timed(&full)),
        ("Bwrap::run(\"true\") warm (full sandbox)", &full_warm),
    ];
    // The first call of the warm agent starts cold and leaves a warm one.
    rt.block_on(warm.run(ExecRequest::new(warm_dir.path(), "true"))).unwrap();
    warm_wait();
    println!("# one idle warm sandbox: {}", warm_memory(warm_uid));
    for (_, f) in &rows {
        for _ in 0..10 {
            f();
        }
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); rows.len()];
    let mut cpu_ticks = vec![0u64; rows.len()];
    for _ in 0..n {
        for (i, (_, f)) in rows.iter().enumerate() {
            let (t, c) = (Instant::now(), cpu_ticks_now());
            let own = f();
            samples[i].push(own.unwrap_or_else(|| t.elapsed()));
            cpu_ticks[i] += cpu_ticks_now() - c;
        }
    }
    println!("per-call overhead, {n} interleaved iterations, ms (cpu: ours + reaped children, per call)");
    println!("{:<38} {:>8} {:>8} {:>8} {:>8}", "", "mean", "p50", "p99", "cpu");
    let mut means = Vec::new();
    for (((name, _), s), ticks) in rows.iter().zip(samples.iter_mut()).zip(&cpu_ticks) {
        s.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let mean = s.iter().map(|d| ms(*d)).sum::<f64>() / s.len() as f64;
        let p = |q: f64| ms(s[((s.len() as f64 - 1.0) * q).round() as usize]);
        let cpu = *ticks as f64 * 1000.0 / TICKS_PER_S / n as f64;
        println!("{name:<38} {mean:>8.2} {:>8.2} {:>8.2} {cpu:>8.2}", p(0.5), p(0.99));
        means.push((mean, p(0.5), cpu));
    }
    // Network on (pasta + policy rules) is rarer and slower: a few samples.
    let net_n = (n / 10).max(5);
    let mut net: Vec<Duration> = Vec::new();
    for _ in 0..net_n {
        let t = Instant::now();
        match rt.block_on(bwrap.run(ExecRequest::new(dir.path(), "true").network(tinyfat_sandbox::Network::On))) {
            Ok(out) if out.success() => net.push(t.elapsed()),
            other => {
                println!("network-on not measured: {other:?}");
                break;
            }
        }
    }
    if !net.is_empty() {
        net.sort();
        let mean = net.iter().map(|d| d.as_secs_f64() * 1000.0).sum::<f64>() / net.len() as f64;
        println!(
            "{:<38} {mean:>8.2} {:>8.2}   ({} samples)",
            "Bwrap::run(\"true\"), network on",
            net[net.len() / 2].as_secs_f64() * 1000.0,
            net.len()
        );
    }
    for (name, i) in [
        ("full sandbox, warm (default)", 6),
        ("full sandbox, cold", 5),
        ("full sandbox, cold, no cgroups", 4),
        ("setpriv + bash chain", 2),
    ] {
        println!(
            "{name} / bare bwrap true: {:.2}x (mean), {:.2}x (p50), {:.2}x (cpu); / bare bwrap + setpriv + bash: {:.2}x (mean)",
            means[i].0 / means[1].0,
            means[i].1 / means[1].1,
            means[i].2 / means[1].2,
            means[i].0 / means[2].0,
        );
    }
}

/// Pause after a warm sandbox is ready, for bwrap to finish its set-up and
/// bash to block in `read` (in real use the model's reply takes seconds).
const WARM_SETTLE_MS: u64 = 100;

/// RSS and PSS of one idle warm sandbox: its bash (the agent's uid) and
/// the two bwrap processes above it.
fn warm_memory(uid: u32) -> String {
    let status = |pid: u32, key: &str| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let pss = |pid: u32| -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("Pss:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let find = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| status(*pid, "Uid:") == Some(u64::from(uid)))
    };
    let until = Instant::now() + Duration::from_secs(5);
    let bash = loop {
        match find() {
            Some(pid) => break pid,
            None if Instant::now() < until => std::thread::sleep(Duration::from_millis(10)),
            None => return "not found".into(),
        }
    };
    // Let bash finish starting (the prologue) before measuring.
    std::thread::sleep(Duration::from_millis(200));
    let mut chain = vec![bash];
    for _ in 0..2 {
        match status(*chain.last().unwrap(), "PPid:") {
            Some(ppid) => chain.push(ppid as u32),
            None => break,
        }
    }
    let names: Vec<String> = chain
        .iter()
        .map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default().trim().to_string())
        .collect();
    let rss: u64 = chain.iter().filter_map(|p| status(*p, "VmRSS:")).sum();
    let pss: u64 = chain.iter().filter_map(|p| pss(*p)).sum();
    format!("{} processes ({}), RSS {rss} KiB, PSS {pss} KiB", chain.len(), names.join(" <- "))
}
