//! Per-call overhead of the sandbox, measured as spawn-to-exit of `true`.
//!
//! Rows: a plain process spawn, a bare `bwrap --unshare-all` with /usr
//! mounted (the reference), the same bwrap running the process chain our
//! design needs (`setpriv` to the agent uid, then `bash -c`), the
//! unsandboxed executor, and `Bwrap::run` without and with its default
//! per-call cgroups (uid drop, rlimits, cgroups, seccomp, output capture,
//! cleanup). Iterations are interleaved so machine noise hits all rows
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
    let config = SandboxConfig::default();
    let bwrap = Bwrap::new(&config);
    let health = rt.block_on(bwrap.check());
    assert!(health.ok, "sandbox not usable here: {health:?}");
    for note in &health.notes {
        println!("# {note}");
    }
    let lean = Bwrap::new(&SandboxConfig { per_call_cgroups: false, ..SandboxConfig::default() });
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
    let rows: [(&str, &dyn Fn()); 6] = [
        ("spawn /bin/true", &plain),
        ("bare bwrap --unshare-all true", &bare),
        ("bare bwrap + setpriv + bash -c true", &bare_chain),
        ("Unsandboxed::run(\"true\")", &unsandboxed),
        ("Bwrap::run(\"true\"), no cgroups", &full_lean),
        ("Bwrap::run(\"true\") (full sandbox)", &full),
    ];
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
            f();
            samples[i].push(t.elapsed());
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
    for (name, i) in [("full sandbox (default)", 5), ("full sandbox, no cgroups", 4), ("setpriv + bash chain", 2)] {
        println!(
            "{name} / bare bwrap true: {:.2}x (mean), {:.2}x (p50), {:.2}x (cpu); / bare bwrap + setpriv + bash: {:.2}x (mean)",
            means[i].0 / means[1].0,
            means[i].1 / means[1].1,
            means[i].2 / means[1].2,
            means[i].0 / means[2].0,
        );
    }
}
