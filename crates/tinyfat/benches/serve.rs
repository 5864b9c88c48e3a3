//! `tinyfat serve` as a process: idle RSS with many agents provisioned, and
//! end-to-end web chat latency (POST to `[DONE]`) with an instant fake model,
//! against the bare model call measured in the same run.
//!
//! Then several agents chat at once while `GET /healthz` is timed on the
//! same server (`TINYFAT_BENCH_CONCURRENT` agents, default 8).
//!
//! Run: `cargo bench -p tinyfat --bench serve` (`TINYFAT_BENCH_AGENTS`,
//! default 10,000; `TINYFAT_BENCH_REQUESTS`, default 200).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tinyfat_core::EmailAddress;
use tinyfat_platform::Platform;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::provision::CreateAgent;
use tinyfat_testkit::{FakeModel, Script};

/// Agents whose turns run at once in the concurrent phase, at most.
const CONCURRENT_AGENTS_MAX: usize = 64;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        "{name:<40} n={:<5} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        samples.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    );
}

async fn read_to_done(response: reqwest::Response) {
    let mut body = response.bytes_stream();
    let mut tail = String::new();
    while let Some(chunk) = body.next().await {
        tail.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if tail.contains("data: [DONE]") {
            return;
        }
        if tail.len() > 64 {
            tail = tail[tail.len() - 32..].to_owned();
        }
    }
}

#[tokio::main]
async fn main() {
    let agents = env_usize("TINYFAT_BENCH_AGENTS", 10_000);
    let requests = env_usize("TINYFAT_BENCH_REQUESTS", 200);
    let tmp = tempfile::tempdir().unwrap();
    let settings = Settings::load(&Sources { data_dir: Some(tmp.path().to_owned()), ..Default::default() }).unwrap();
    let platform = Platform::open(settings).await.unwrap();
    let owner = EmailAddress::parse("ann@example.com").unwrap();
    let started = Instant::now();
    let first = platform
        .create_agent(CreateAgent { owner: owner.clone(), name: Some("bench".into()), model: None })
        .await
        .unwrap();
    let mut ids = vec![first.id.clone()];
    for _ in 1..agents {
        let agent = platform.create_agent(CreateAgent { owner: owner.clone(), name: None, model: None }).await.unwrap();
        if ids.len() < CONCURRENT_AGENTS_MAX {
            ids.push(agent.id);
        }
    }
    println!("provisioned {agents} agents in {:.1} s", started.elapsed().as_secs_f64());
    let (_, token) = platform.create_token(Some("bench".into()), None).await.unwrap();
    drop(platform);

    let fake = FakeModel::start().await;
    fake.set_fallback(Script::text("ok"));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tinyfat"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("TINYFAT_DATA_DIR", tmp.path())
        .env("ANTHROPIC_API_KEY", "sk-bench")
        .env("ANTHROPIC_BASE_URL", fake.base_url())
        .env("TINYFAT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "idle serve with {agents} agents: VmRSS {} KB (peak VmHWM {} KB)",
        rss_kb(child.id(), "VmRSS:"),
        rss_kb(child.id(), "VmHWM:")
    );

    let mut bare = Vec::new();
    for _ in 0..requests {
        let started = Instant::now();
        let response = http
            .post(format!("{}/v1/messages", fake.base_url()))
            .header("x-api-key", "k")
            .header("anthropic-version", "2023-06-01")
            .json(&serde_json::json!({"model": "claude-bench", "max_tokens": 10, "stream": true,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let _ = response.bytes().await.unwrap();
        bare.push(started.elapsed());
    }
    report("baseline: bare model call (fake)", bare);

    let mut chat = Vec::new();
    for i in 0..requests {
        let started = Instant::now();
        let response = http
            .post(format!("{base}/api/agents/{}/chat", first.id))
            .bearer_auth(token.expose())
            .json(&serde_json::json!({"message": "hi", "request_id": format!("b{i}")}))
            .send()
            .await
            .unwrap();
        read_to_done(response).await;
        chat.push(started.elapsed());
    }
    report("web chat POST -> [DONE] (one turn)", chat);
    println!("serve VmRSS after {requests} turns: {} KB", rss_kb(child.id(), "VmRSS:"));

    // Turns of several agents at once for 10 s, while this client times
    // `GET /healthz` on the same server: what the turns' disk waits (each
    // session append is an fdatasync) cost every other request.
    let concurrent = env_usize("TINYFAT_BENCH_CONCURRENT", 8).min(ids.len());
    let stop_at = Instant::now() + Duration::from_secs(10);
    let drivers: Vec<_> = ids[..concurrent]
        .iter()
        .map(|id| {
            let (http, url, token) = (http.clone(), format!("{base}/api/agents/{id}/chat"), token.expose().to_owned());
            tokio::spawn(async move {
                let mut turns = 0u64;
                while Instant::now() < stop_at {
                    let body = serde_json::json!({"message": "hi", "request_id": format!("c{turns}")});
                    read_to_done(http.post(&url).bearer_auth(&token).json(&body).send().await.unwrap()).await;
                    turns += 1;
                }
                turns
            })
        })
        .collect();
    let mut health = Vec::new();
    while Instant::now() < stop_at {
        let started = Instant::now();
        http.get(format!("{base}/healthz")).send().await.unwrap().bytes().await.unwrap();
        health.push(started.elapsed());
    }
    let mut turns = 0;
    for driver in drivers {
        turns += driver.await.unwrap();
    }
    println!("{concurrent} agents chatting at once for 10 s: {turns} turns");
    report("GET /healthz meanwhile", health);
    let _ = child.kill();
    let _ = child.wait();
}
