//! Network egress for agents with `"network": "on"`: public addresses only.
//!
//! The sandbox keeps its own network namespace. `pasta` (Debian `passt`)
//! attaches to it and relays its TCP/UDP/ICMP through ordinary sockets of
//! the host, so the sandbox reaches what the host reaches, minus what the
//! policy rules inside the namespace refuse before a packet ever gets to
//! pasta: loopback, RFC 1918, CGNAT, link-local (cloud metadata included),
//! multicast and reserved ranges, and every address and directly connected
//! network of the host (read from `/proc/net/fib_trie` at each call). pasta
//! runs with `--no-map-gw` (the gateway address is not the host's loopback)
//! and with every port forward off (`-t/-u/-T/-U none`), IPv4 only. DNS goes
//! to [`DNS_FORWARD_ADDR`], which pasta forwards to the host's resolver; only
//! port 53 to that address is exempt from the rules.
//!
//! The rules live in the namespace, which belongs to the initial user
//! namespace: the unprivileged tool cannot change them. This module must
//! never let a command start before the rules are in place (the sandbox
//! waits on bwrap's `--block-fd` meanwhile).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::bwrap::find_in_path;

/// The sandbox's name server; pasta forwards port 53 here to the host's.
pub(crate) const DNS_FORWARD_ADDR: &str = "169.254.1.53";

/// Ranges no sandbox may reach, whatever the host's routes say.
const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Rule priorities: the DNS exemption, then the refusals (the main table
/// is consulted at 32766, after both).
const PREF_ALLOW: u32 = 50;
const PREF_BLOCK: u32 = 100;
/// How long pasta may take to configure the namespace.
const PASTA_READY_MS: u64 = 3_000;
const PASTA_POLL_MS: u64 = 2;

/// The tools network-on needs, found on this host.
#[derive(Debug)]
pub(crate) struct Egress {
    pasta: PathBuf,
    ip: PathBuf,
    nsenter: PathBuf,
}

impl Egress {
    pub(crate) fn detect() -> Result<Egress, String> {
        let find = |name: &str, package: &str| {
            find_in_path(name)
                .or_else(|| {
                    ["/usr/bin", "/usr/sbin", "/sbin"].iter().map(|d| PathBuf::from(d).join(name)).find(|p| p.is_file())
                })
                .ok_or_else(|| {
                    format!(
                        "network egress is not available on this host: {name} is missing (apt-get install {package})"
                    )
                })
        };
        let egress = Egress {
            pasta: find("pasta", "passt")?,
            ip: find("ip", "iproute2")?,
            nsenter: find("nsenter", "util-linux")?,
        };
        remove_stale_names(&egress.ip);
        Ok(egress)
    }

    /// Connects the network namespace of `sandbox_pid` to the outside
    /// through pasta and installs the refusal rules.
    pub(crate) async fn attach(&self, sandbox_pid: u32, deadline: Instant) -> Result<EgressGuard, String> {
        // pasta 2023.03 cannot open /proc/PID/ns/net once it isolated
        // itself, so the namespace gets a name (/run/netns/NAME) first.
        let name = format!(
            "tinyfat-{}-{}",
            std::process::id(),
            NETNS_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let attached = tokio::process::Command::new(&self.ip)
            .args(["netns", "attach", &name, &sandbox_pid.to_string()])
            .env_clear()
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("cannot run {}: {e}", self.ip.display()))?;
        if !attached.status.success() {
            return Err(format!(
                "cannot name the sandbox's network namespace: {}",
                String::from_utf8_lossy(&attached.stderr).trim()
            ));
        }
        let mut guard = EgressGuard { pasta: None, name, ip: self.ip.clone(), named: true };
        match self.start(&mut guard, sandbox_pid, deadline).await {
            Ok(()) => Ok(guard),
            Err(e) => {
                guard.stop().await;
                Err(e)
            }
        }
    }

    async fn start(&self, guard: &mut EgressGuard, sandbox_pid: u32, deadline: Instant) -> Result<(), String> {
        let netns = format!("/proc/{sandbox_pid}/ns/net");
        // pasta 2023.03 also drops to "nobody" before entering the namespace
        // and then cannot enter one owned by root, so it keeps uid 0. It
        // still confines itself after setup: capabilities down to
        // CAP_SYS_ADMIN and CAP_NET_BIND_SERVICE, an empty mount namespace,
        // no_new_privs and its own seccomp allow-list. Newer passt releases
        // enter the namespace first and can run as nobody.
        let pasta = guard.pasta.insert(
            tokio::process::Command::new(&self.pasta)
                .args([
                    "--foreground",
                    "--quiet",
                    "--runas",
                    "0:0",
                    "--netns",
                    &guard.name,
                    "--config-net",
                    "--ipv4-only",
                ])
                .args(["--no-map-gw", "-t", "none", "-u", "none", "-T", "none", "-U", "none"])
                .args(["--dns-forward", DNS_FORWARD_ADDR])
                .env_clear()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start pasta: {e}"))?,
        );

        // Ready once the namespace has a default route.
        let ready_by = deadline.min(Instant::now() + Duration::from_millis(PASTA_READY_MS));
        loop {
            if has_default_route(sandbox_pid) {
                break;
            }
            if let Ok(Some(status)) = pasta.try_wait() {
                let mut err = String::new();
                if let Some(mut stderr) = pasta.stderr.take() {
                    let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut err).await;
                }
                let err: Vec<&str> = err.lines().filter(|l| !l.starts_with("Failed to send")).collect();
                return Err(format!("pasta exited ({status}) before configuring the network: {}", err.join("; ")));
            }
            if Instant::now() >= ready_by {
                return Err("pasta did not configure the sandbox network in time".into());
            }
            tokio::time::sleep(Duration::from_millis(PASTA_POLL_MS)).await;
        }

        let host = std::fs::read_to_string("/proc/net/fib_trie").map(|t| host_prefixes(&t)).unwrap_or_default();
        let script = rules_script(&host);
        let mut ip = tokio::process::Command::new(&self.nsenter)
            .arg(format!("--net={netns}"))
            .arg("--")
            .arg(&self.ip)
            .args(["-batch", "-"])
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.nsenter.display()))?;
        if let Some(mut stdin) = ip.stdin.take() {
            stdin.write_all(script.as_bytes()).await.map_err(|e| format!("ip -batch: {e}"))?;
        }
        let out = tokio::time::timeout_at(deadline, ip.wait_with_output())
            .await
            .map_err(|_| "installing network rules timed out".to_string())?
            .map_err(|e| format!("ip -batch: {e}"))?;
        if !out.status.success() {
            return Err(format!("installing network rules failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(())
    }
}

/// Numbers the names given to sandbox network namespaces.
static NETNS_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Keeps pasta running for one call; [`EgressGuard::stop`] ends it and
/// removes the namespace's name.
#[derive(Debug)]
pub(crate) struct EgressGuard {
    pasta: Option<tokio::process::Child>,
    name: String,
    ip: PathBuf,
    named: bool,
}

impl EgressGuard {
    pub(crate) async fn stop(mut self) {
        if let Some(mut pasta) = self.pasta.take() {
            let _ = pasta.start_kill();
            let _ = pasta.wait().await;
        }
        let _ = tokio::process::Command::new(&self.ip)
            .args(["netns", "delete", &self.name])
            .env_clear()
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        self.named = false;
    }
}

impl Drop for EgressGuard {
    /// A call abandoned midway: pasta dies with its handle (kill on drop);
    /// the name is removed here, synchronously (rare path).
    fn drop(&mut self) {
        if self.named {
            let _ = std::process::Command::new(&self.ip)
                .args(["netns", "delete", &self.name])
                .env_clear()
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Removes namespace names left by a tinyfat process that died mid-call.
fn remove_stale_names(ip: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("tinyfat-").and_then(|r| r.split('-').next()) else { continue };
        if !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::process::Command::new(ip)
                .args(["netns", "delete", &name])
                .env_clear()
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether the network namespace of `pid` has an IPv4 default route.
fn has_default_route(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/net/route"))
        .is_ok_and(|t| t.lines().skip(1).any(|l| l.split_whitespace().nth(1) == Some("00000000")))
}

/// `ip -batch` input: exempt DNS to pasta, refuse the blocked ranges and
/// the host's own prefixes.
fn rules_script(host: &[String]) -> String {
    let mut s = String::new();
    for proto in ["udp", "tcp"] {
        s.push_str(&format!(
            "rule add to {DNS_FORWARD_ADDR}/32 ipproto {proto} dport 53 lookup main pref {PREF_ALLOW}\n"
        ));
    }
    let mut prefixes: Vec<&str> = BLOCKED_V4.to_vec();
    prefixes.extend(host.iter().map(String::as_str));
    prefixes.sort_unstable();
    prefixes.dedup();
    for prefix in prefixes {
        s.push_str(&format!("rule add to {prefix} prohibit pref {PREF_BLOCK}\n"));
    }
    s
}

/// The host's local addresses and directly connected networks, from
/// `/proc/net/fib_trie` (`/32 host LOCAL`, `/24 link UNICAST` entries).
fn host_prefixes(fib_trie: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<&str> = None;
    for line in fib_trie.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            current = Some(addr.trim());
        } else if let (Some(addr), Some(rest)) = (current, t.strip_prefix('/')) {
            let mut parts = rest.split_whitespace();
            let (Some(len), Some(scope), Some(kind)) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            let keep = (scope == "host" && kind == "LOCAL") || (scope == "link" && kind == "UNICAST");
            if keep && addr.parse::<std::net::Ipv4Addr>().is_ok() && len.parse::<u8>().is_ok_and(|l| l <= 32) {
                out.push(format!("{addr}/{len}"));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// What the health report says about network-on.
pub(crate) fn status(egress: &Result<Egress, String>) -> String {
    match egress {
        Ok(_) => {
            "pasta egress to public IPv4 addresses only (loopback, private, link-local and host addresses refused)"
                .into()
        }
        Err(e) => format!("refused ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRIE: &str = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n\
     +-- 192.0.2.0/24 2 0 2\n        +-- 192.0.2.0/30 2 0 2\n           |-- 192.0.2.0\n              /24 link UNICAST\n\
           |-- 192.0.2.2\n              /32 host LOCAL\n        |-- 192.0.2.255\n           /32 link BROADCAST\n\
Local:\n     |-- 192.0.2.2\n              /32 host LOCAL\n";

    #[test]
    fn host_prefixes_are_local_addresses_and_connected_networks() {
        assert_eq!(host_prefixes(TRIE), vec!["192.0.2.0/24".to_string(), "192.0.2.2/32".to_string()]);
    }

    #[test]
    fn rules_exempt_only_dns_and_refuse_private_and_host_ranges() {
        let s = rules_script(&host_prefixes(TRIE));
        assert!(
            s.starts_with(&format!("rule add to {DNS_FORWARD_ADDR}/32 ipproto udp dport 53 lookup main pref 50\n"))
        );
        for p in ["10.0.0.0/8", "169.254.0.0/16", "127.0.0.0/8", "192.0.2.2/32", "192.0.2.0/24"] {
            assert!(s.contains(&format!("rule add to {p} prohibit pref 100\n")), "{p}");
        }
        assert_eq!(s.lines().count(), 2 + BLOCKED_V4.len() + 2);
    }
}
