//! `"network": "on"`: public addresses are reachable, loopback, private,
//! link-local and the host's own addresses are not. Every target is on this
//! machine: a throwaway network namespace plays "the internet" (a
//! TEST-NET-3 address routed to it) next to private and link-local servers.

mod common;

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Agents, bwrap, run};
use tinyfat_sandbox::{ExecRequest, Network, ToolExecutor};

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

fn require_pasta() {
    let found = ["/usr/bin/pasta", "/usr/sbin/pasta"].iter().any(|p| std::path::Path::new(p).exists());
    assert!(found, "pasta is not installed: network-on needs it; run `apt-get install -y passt`");
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("iproute2 (ip) is needed");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A namespace holding a TCP server on every address it has: one public
/// (203.0.113.N), one private (10.199.N.2), one link-local (169.254.77.N),
/// routed from the host through a veth pair.
struct TestNet {
    name: String,
    n: u32,
    port: u16,
    server: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestNet {
    fn new() -> Self {
        let n = 10 + (std::process::id() % 100) + NEXT_NET.fetch_add(1, Ordering::Relaxed) * 100 % 200;
        let name = format!("tfnet{n}");
        let (host_if, peer_if) = (format!("tfh{n}"), format!("tfp{n}"));
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", &name]);
        ip(&["addr", "add", &format!("10.199.{n}.1/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "link", "set", &peer_if, "up"]);
        ip(&["-n", &name, "addr", "add", &format!("10.199.{n}.2/30"), "dev", &peer_if]);
        ip(&["-n", &name, "addr", "add", &format!("203.0.113.{n}/32"), "dev", "lo"]);
        ip(&["-n", &name, "addr", "add", &format!("169.254.77.{n}/32"), "dev", "lo"]);
        ip(&["-n", &name, "route", "add", "default", "via", &format!("10.199.{n}.1")]);
        ip(&["route", "add", &format!("203.0.113.{n}/32"), "via", &format!("10.199.{n}.2")]);
        ip(&["route", "add", &format!("169.254.77.{n}/32"), "via", &format!("10.199.{n}.2")]);

        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        let port = 18000 + n as u16;
        let server = Command::new("ip")
            .args(["netns", "exec", &name])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "tcp_server", "--ignored", "--nocapture", "--test-threads=1"])
            .env("TF_LISTEN", format!("0.0.0.0:{port}"))
            .env("TF_LOG", &log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let net = TestNet { name, n, port, server, log, _dir: dir };
        for _ in 0..500 {
            if std::fs::read_to_string(&net.log).is_ok_and(|l| l.contains("ready")) {
                return net;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("test server in {} did not start", net.name);
    }

    fn public(&self) -> String {
        format!("203.0.113.{}", self.n)
    }

    fn connections(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("conn ").map(String::from))
            .collect()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let n = self.n;
        let _ = Command::new("ip").args(["route", "del", &format!("203.0.113.{n}/32")]).status();
        let _ = Command::new("ip").args(["route", "del", &format!("169.254.77.{n}/32")]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = Command::new("ip").args(["link", "del", &format!("tfh{n}")]).stderr(Stdio::null()).status();
    }
}

/// Helper run inside the test namespace by [`TestNet`].
#[test]
#[ignore = "helper: started by TestNet inside a network namespace"]
fn tcp_server() {
    use std::io::Write;
    let addr = std::env::var("TF_LISTEN").unwrap();
    let log_path = std::env::var("TF_LOG").unwrap();
    let listener = TcpListener::bind(&addr).unwrap();
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).unwrap();
    writeln!(log, "ready").unwrap();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let local = stream.local_addr().map(|a| a.ip().to_string()).unwrap_or_default();
        writeln!(log, "conn {local}").unwrap();
        let _ = stream.write_all(b"hello from the test internet\n");
    }
}

fn tcp_probe(addr: &str, port: u16) -> String {
    format!(
        "(exec 3<>/dev/tcp/{addr}/{port} && echo CONNECTED {addr} && timeout 2 head -1 <&3) 2>/dev/null || echo REFUSED {addr}; "
    )
}

#[tokio::test]
async fn network_on_reaches_public_addresses_only() {
    require_pasta();
    let exec = bwrap();
    let health = exec.check().await;
    assert!(health.notes.iter().any(|n| n.contains("pasta egress")), "{health:?}");
    let net = TestNet::new();
    let agents = Agents::new();

    // Servers of the host itself: on loopback and on every address.
    let host_loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    host_loopback.set_nonblocking(true).unwrap();
    let host_any = TcpListener::bind("0.0.0.0:0").unwrap();
    host_any.set_nonblocking(true).unwrap();
    let mut host_addrs: Vec<String> = vec![format!("10.199.{}.1", net.n)];
    if let Ok(out) = Command::new("hostname").arg("-I").output() {
        host_addrs.extend(
            String::from_utf8_lossy(&out.stdout).split_whitespace().filter(|a| !a.contains(':')).map(String::from),
        );
    }

    let mut script = tcp_probe(&net.public(), net.port);
    script += &tcp_probe(&format!("10.199.{}.2", net.n), net.port);
    script += &tcp_probe(&format!("169.254.77.{}", net.n), net.port);
    script += &tcp_probe("127.0.0.1", host_loopback.local_addr().unwrap().port());
    for a in &host_addrs {
        script += &tcp_probe(a, host_any.local_addr().unwrap().port());
    }
    script += "cat /etc/resolv.conf; ip rule del pref 100 2>&1 | head -1; ip rule | grep -c prohibit";
    let out = exec
        .run(ExecRequest::new(&agents.a, script).network(Network::On).timeout(Duration::from_secs(30)))
        .await
        .expect("network-on call");
    let text = &out.output;
    assert!(text.contains(&format!("CONNECTED {}\nhello from the test internet", net.public())), "{text}");
    for blocked in [format!("10.199.{}.2", net.n), format!("169.254.77.{}", net.n), "127.0.0.1".into()] {
        assert!(text.contains(&format!("REFUSED {blocked}\n")), "{blocked} reachable:\n{text}");
    }
    for a in &host_addrs {
        // The host's own address either is refused or is the sandbox's own
        // copy of it (pasta mirrors it), where nothing listens.
        assert!(text.contains(&format!("REFUSED {a}\n")), "{a} reachable:\n{text}");
    }
    assert!(text.contains("nameserver 169.254.1.53"), "{text}");
    assert!(text.contains("Operation not permitted"), "the agent changed its rules:\n{text}");

    // Only the public address ever reached the test namespace's server,
    // and the host's servers saw nothing.
    assert_eq!(net.connections(), vec![net.public()]);
    for l in [&host_loopback, &host_any] {
        match l.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("a host server saw a connection: {other:?}"),
        }
    }
    // No pasta left behind.
    let pastas: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("pasta") && c.contains("--dns-forward"))
        .collect();
    assert!(pastas.is_empty(), "{pastas:?}");
}

#[tokio::test]
async fn network_off_cannot_reach_the_test_internet() {
    let exec = bwrap();
    let net = TestNet::new();
    let agents = Agents::new();
    let out = run(&*exec, &agents.a, &tcp_probe(&net.public(), net.port)).await;
    assert!(out.output.contains("REFUSED"), "{}", out.output);
    assert!(net.connections().is_empty());
}
