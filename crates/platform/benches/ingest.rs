//! Durable ingest against a trivial axum route, measured in the same run.
//!
//! Starts one axum server with two routes: `GET /trivial` (answers "ok") and
//! `POST /ingest/{agent}` — the production inbound path (`AppState::ingest`:
//! resolve the agent, check the allowed senders, enqueue durably with a dedup
//! key through group commit, then acknowledge). Saturation is measured with
//! `wrk` (2 and 64 connections); fixed rates (1,000 and 5,000 requests/s)
//! with an open-loop generator in this process. The fixed rates run first,
//! on a fresh database: after the saturation runs the database holds some
//! 300,000 queued jobs and a large WAL whose checkpoint would be measured
//! instead. `TINYFAT_BENCH_PHASES=rate1000,ingest64` runs only the phases
//! named (trivial2, ingest2, trivial64, ingest64, rate1000, rate5000, fsync),
//! for a profiler.
//!
//! Before and after, it times plain `fdatasync`s of a 4 kB append in the
//! data folder: a durable ack can come no sooner than its commit's fsync,
//! so that latency is the floor under every ingest figure.
//!
//! Run: `cargo bench -p tinyfat-platform --bench ingest` (needs `wrk`).

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use tinyfat_core::EmailAddress;
use tinyfat_core::sender::SenderIdentity;
use tinyfat_platform::Platform;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::inbound::{Ingest, IngestOutcome, MessageJob};
use tinyfat_platform::provision::CreateAgent;
use tinyfat_platform::state::AppState;
use tinyfat_runtime::InboundMessage;

static SEQ: AtomicU64 = AtomicU64::new(0);

async fn ingest(State(state): State<AppState>, Path(agent): Path<String>, body: String) -> StatusCode {
    let agent = match state.ingest_agent(&agent).await {
        Ok(a) => a,
        Err(_) => return StatusCode::UNAUTHORIZED,
    };
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let job = Ingest {
        dedup_key: format!("bench:{}:{n}", agent.id),
        session: tinyfat_core::SessionId::parse("web-bench").unwrap(),
        sender: SenderIdentity::Email(EmailAddress::parse("ann@example.com").unwrap()),
        job: MessageJob {
            message: InboundMessage {
                channel: "web".into(),
                sender: "ann@example.com".into(),
                text: body,
                received_at: chrono::Utc::now(),
                untrusted: vec![],
            },
            conversation: None,
            run_key: None,
        },
    };
    match state.ingest(&agent, job).await {
        Ok(IngestOutcome::Enqueued { .. }) => StatusCode::ACCEPTED,
        Ok(_) => StatusCode::FORBIDDEN,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn wrk(url: &str, connections: u32, post: bool) -> String {
    let dir = std::env::temp_dir().join("tinyfat-wrk.lua");
    std::fs::write(&dir, "wrk.method = \"POST\"\nwrk.body = \"hello from the benchmark\"\n").unwrap();
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", &format!("-c{connections}"), "-d8s", "--latency"]);
    if post {
        cmd.args(["-s", dir.to_str().unwrap()]);
    }
    let out = cmd.arg(url).output().expect("wrk is installed (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rps = text.lines().find(|l| l.starts_with("Requests/sec")).unwrap_or("Requests/sec: ?").to_owned();
    let p50 = text.lines().find(|l| l.trim_start().starts_with("50%")).unwrap_or("50% ?").trim().to_owned();
    let p99 = text.lines().find(|l| l.trim_start().starts_with("99%")).unwrap_or("99% ?").trim().to_owned();
    let errors = text.lines().find(|l| l.contains("Non-2xx")).map(|l| format!(" ({})", l.trim())).unwrap_or_default();
    format!(
        "{rps:<28} p50 {:<10} p99 {:<10}{errors}",
        p50.trim_start_matches("50%").trim(),
        p99.trim_start_matches("99%").trim()
    )
}

/// p50, p99 and max of `fdatasync` after a 4 kB append, in `dir`.
fn fsync_latency(dir: &std::path::Path) -> String {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path).unwrap();
    let mut samples: Vec<Duration> = (0..400)
        .map(|_| {
            file.write_all(&[7u8; 4096]).unwrap();
            let t = Instant::now();
            file.sync_data().unwrap();
            let took = t.elapsed();
            std::thread::sleep(Duration::from_millis(1));
            took
        })
        .collect();
    std::fs::remove_file(&path).unwrap();
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!("p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms", ms(samples[200]), ms(samples[396]), ms(samples[399]))
}

async fn fixed_rate(client: &reqwest::Client, url: &str, rate: u32, seconds: u32) -> String {
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval * i;
        tokio::time::sleep_until(due.into()).await;
        let client = client.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            // Latency from the intended send time (no coordinated omission).
            let r = client.post(&url).body("hello from the benchmark").send().await;
            (r.map(|r| r.status().as_u16()).unwrap_or(0), due.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(tasks.len());
    let mut failures = 0;
    for t in tasks {
        let (status, latency) = t.await.unwrap();
        if status != 202 && status != 200 {
            failures += 1;
        }
        latencies.push(latency);
    }
    let achieved = total as f64 / start.elapsed().as_secs_f64();
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    format!(
        "offered {rate}/s achieved {achieved:.0}/s  p50 {:.2} ms  p99 {:.2} ms  failures {failures}",
        p(0.5),
        p(0.99)
    )
}

#[tokio::main]
async fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let env = [("TINYFAT_SANDBOX_MODE".to_owned(), "none".to_owned())].into_iter().collect();
    let settings =
        Settings::load(&Sources { data_dir: Some(tmp.path().to_owned()), env, ..Default::default() }).unwrap();
    let platform = Arc::new(Platform::open(settings).await.unwrap());
    let owner = EmailAddress::parse("ann@example.com").unwrap();
    let agent = platform.create_agent(CreateAgent { owner, name: Some("bench".into()), model: None }).await.unwrap();
    let state = AppState::new(platform.clone());
    let app = Router::new()
        .route("/trivial", get(|| async { "ok" }).post(|| async { "ok" }))
        .route("/ingest/{agent}", post(ingest))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let trivial = format!("http://{addr}/trivial");
    let ingest_url = format!("http://{addr}/ingest/{}", agent.id);

    // `TINYFAT_BENCH_PHASES=ingest64` (for a profiler) runs only the phases named:
    // trivial2, ingest2, trivial64, ingest64, rate1000, rate5000, fsync.
    let phases = std::env::var("TINYFAT_BENCH_PHASES").ok();
    let run = |phase: &str| phases.as_deref().is_none_or(|p| p.split(',').any(|x| x == phase));
    if run("fsync") {
        println!("fdatasync of this disk before: {}", fsync_latency(tmp.path()));
    }
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
    println!("fixed rate (open loop, 5 s; first, on a fresh database):");
    for rate in [1000, 5000] {
        if !run(&format!("rate{rate}")) {
            continue;
        }
        println!("  trivial route: {}", fixed_rate(&client, &trivial, rate, 5).await);
        println!("  durable ingest: {}", fixed_rate(&client, &ingest_url, rate, 5).await);
    }
    println!("saturation (wrk, 2 threads, 8 s):");
    for connections in [2, 64] {
        if run(&format!("trivial{connections}")) {
            let t = tokio::task::spawn_blocking({
                let u = trivial.clone();
                move || wrk(&u, connections, true)
            })
            .await
            .unwrap();
            println!("  trivial route, {connections:>2} connections: {t}");
        }
        if !run(&format!("ingest{connections}")) {
            continue;
        }
        let i = tokio::task::spawn_blocking({
            let u = ingest_url.clone();
            move || wrk(&u, connections, true)
        })
        .await
        .unwrap();
        println!("  durable ingest, {connections:>2} connections: {i}");
    }
    if run("fsync") {
        println!("fdatasync of this disk after: {}", fsync_latency(tmp.path()));
    }
    let counts = platform.store.queue_counts(platform.now_ms()).await.unwrap();
    println!("jobs durably enqueued: {}", counts.queued);
}
