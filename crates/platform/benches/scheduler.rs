//! Fire-time jitter of the scheduler role: how late an `event` job is
//! enqueued relative to its timer's due time, with many one-shots due within
//! the same minute.
//!
//! Sets up `TINYFAT_BENCH_TIMERS` one-shot events (default 10,000) on
//! `TINYFAT_BENCH_AGENTS` agents (default: one event per agent), created
//! through `Platform::create_agent` on a temporary data folder (SQLite,
//! `sandbox.mode = none`). The events are due `TINYFAT_BENCH_LEAD_S` seconds
//! after the agents exist (default 20; raised to the estimated event setup
//! time + 5 s when that is longer), spread evenly over
//! `TINYFAT_BENCH_SPREAD_MS` (default 60,000; 0: all at the same instant).
//! Each agent's timers are synced with `scheduler::sync_timers`, then one
//! `scheduler::run` loop (the scheduler role) fires them; no worker runs, so
//! the jobs stay queued.
//!
//! Jitter of a timer = the job's `created_ms` (enqueue time, from the store)
//! − the due time (`due_at` of the job's payload, which is the event's
//! `"at"`). Prints p50, p99, max and the count fired; asserts that every
//! timer fired exactly once.
//!
//! Run: `cargo bench -p tinyfat-platform --bench scheduler`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tinyfat_core::EmailAddress;
use tinyfat_platform::Platform;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::provision::CreateAgent;
use tinyfat_platform::scheduler::{self, EventJob};
use tinyfat_platform::state::AppState;
use tinyfat_storage::validate_path;
use tinyfat_store::Agent;

/// Concurrent setup tasks (agent creation, event writes, syncs).
const SETUP_CONCURRENCY: usize = 8;

fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name} must be a whole number, not {v:?}")),
        Err(_) => default,
    }
}

/// A unique valid agent name (lowercase letters only) for index `i`.
fn agent_name(mut i: usize) -> String {
    let mut suffix = Vec::new();
    for _ in 0..5 {
        suffix.push(b'a' + (i % 26) as u8);
        i /= 26;
    }
    format!("bench{}", String::from_utf8(suffix).unwrap())
}

/// Runs `f` for every item with at most `SETUP_CONCURRENCY` at once.
async fn for_each_concurrent<T, F, Fut, R>(items: Vec<T>, f: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    let chunks = SETUP_CONCURRENCY;
    let mut buckets: Vec<Vec<(usize, T)>> = (0..chunks).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        buckets[i % chunks].push((i, item));
    }
    let tasks: Vec<_> = buckets
        .into_iter()
        .map(|bucket| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut out = Vec::with_capacity(bucket.len());
                for (i, item) in bucket {
                    out.push((i, f(item).await));
                }
                out
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

fn percentile(sorted: &[i64], q: f64) -> i64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main]
async fn main() {
    let timers = env_usize("TINYFAT_BENCH_TIMERS", 10_000).max(1);
    let agents_n = env_usize("TINYFAT_BENCH_AGENTS", timers).clamp(1, timers);
    let lead_s = env_usize("TINYFAT_BENCH_LEAD_S", 20) as i64;
    let spread_ms = env_usize("TINYFAT_BENCH_SPREAD_MS", 60_000) as i64;

    let tmp = tempfile::tempdir().unwrap();
    let env = [("TINYFAT_SANDBOX_MODE".to_owned(), "none".to_owned())].into_iter().collect();
    let settings =
        Settings::load(&Sources { data_dir: Some(tmp.path().to_owned()), env, ..Default::default() }).unwrap();
    let platform = Arc::new(Platform::open(settings).await.unwrap());
    let app = AppState::new(platform.clone());

    // 1. Agents.
    let started = Instant::now();
    let agents: Vec<Agent> = for_each_concurrent((0..agents_n).collect(), {
        let platform = platform.clone();
        move |i| {
            let platform = platform.clone();
            async move {
                let owner = EmailAddress::parse("owner@example.com").unwrap();
                platform.create_agent(CreateAgent { owner, name: Some(agent_name(i)), model: None }).await.unwrap()
            }
        }
    })
    .await;
    let create_s = started.elapsed().as_secs_f64();
    println!("created {agents_n} agents in {create_s:.1} s ({:.2} ms each)", create_s * 1e3 / agents_n as f64);

    // 2. Events: timer k goes to agent k % agents_n, due base + k * spread / timers.
    // The base leaves room for writing and syncing (estimated from the agent
    // creation rate, at least `lead_s`).
    let setup_estimate_ms = (create_s * 1e3 * timers as f64 / agents_n as f64) as i64;
    let base_ms = platform.now_ms() + (lead_s * 1000).max(setup_estimate_ms + 5_000);
    let mut per_agent: Vec<Vec<(String, i64)>> = vec![Vec::new(); agents_n];
    for k in 0..timers {
        let due_ms = base_ms + spread_ms * k as i64 / timers as i64;
        per_agent[k % agents_n].push((format!("t{k}"), due_ms));
    }
    let started = Instant::now();
    let jobs: Vec<(Agent, Vec<(String, i64)>)> = agents.iter().cloned().zip(per_agent).collect();
    for_each_concurrent(jobs, {
        let app = app.clone();
        move |(agent, events): (Agent, Vec<(String, i64)>)| {
            let app = app.clone();
            async move {
                let ws = app.platform.storage.checkout(&agent.id).await.unwrap();
                for (name, due_ms) in &events {
                    let at = chrono::DateTime::from_timestamp_millis(*due_ms)
                        .unwrap()
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                    let file = serde_json::json!({"type": "one-shot", "at": at, "text": "bench"}).to_string();
                    let path = validate_path(&format!("events/{name}/event.json")).unwrap();
                    ws.dir.write_atomic(&path, file.as_bytes()).unwrap();
                }
                scheduler::sync_timers(&app, &agent).await;
            }
        }
    })
    .await;
    let sync_s = started.elapsed().as_secs_f64();
    let synced_at = platform.now_ms();
    println!(
        "wrote and synced {timers} one-shot events in {sync_s:.1} s; first due {:+.1} s from now, spread over {} ms",
        (base_ms - synced_at) as f64 / 1e3,
        spread_ms
    );
    assert!(synced_at < base_ms, "setup ran past the first due time: raise TINYFAT_BENCH_LEAD_S");

    // 3. The scheduler role, until every timer has a job (plus a margin, so a
    // double firing would show), or a deadline.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn(scheduler::run(app.clone(), stop_rx));
    let last_due_ms = base_ms + spread_ms;
    let deadline = Instant::now() + Duration::from_millis((last_due_ms - platform.now_ms()).max(0) as u64 + 120_000);
    loop {
        let counts = platform.store.queue_counts(platform.now_ms()).await.unwrap();
        if counts.queued as usize >= timers || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_tx.send(true).unwrap();
    run.await.unwrap();

    // 4. Jitter from the store.
    let per_agent_limit = (timers / agents_n + 10) as u32 * 2;
    let mut jitter_ms = Vec::with_capacity(timers);
    let mut fired: HashMap<(String, String), usize> = HashMap::new();
    for agent in &agents {
        for job in platform.store.jobs_for(&agent.id, per_agent_limit).await.unwrap() {
            if job.kind != scheduler::JOB_KIND_EVENT {
                continue;
            }
            let payload: EventJob = serde_json::from_str(&job.payload).unwrap();
            assert!(!payload.missed, "{} was recorded missed", payload.name);
            jitter_ms.push(job.created_ms - payload.due_at.timestamp_millis());
            *fired.entry((agent.id.to_string(), payload.name)).or_default() += 1;
        }
    }
    jitter_ms.sort_unstable();
    let doubles = fired.values().filter(|n| **n > 1).count();
    println!(
        "fired {} of {timers} timers ({agents_n} agents x {} events): jitter (enqueue - due) p50 {} ms, p99 {} ms, max {} ms, min {} ms",
        jitter_ms.len(),
        timers / agents_n,
        percentile(&jitter_ms, 0.5),
        percentile(&jitter_ms, 0.99),
        jitter_ms.last().unwrap(),
        jitter_ms.first().unwrap(),
    );
    assert_eq!(doubles, 0, "{doubles} timers fired more than once");
    assert_eq!(fired.len(), timers, "every timer fires");
    assert_eq!(jitter_ms.len(), timers, "exactly one event job per timer");
}
