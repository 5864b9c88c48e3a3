//! Enqueue throughput and latency on a real SQLite file (WAL,
//! `synchronous = FULL`): one transaction per enqueue (`enqueue_each`)
//! against group commit (`JobQueue::enqueue`), with 1, 2, 16 and 64
//! concurrent enqueuers. Run: `cargo bench -p tinyfat-store --bench enqueue`
//! (`ENQUEUE_BENCH_JOBS` sets the jobs per run, default 4000).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tinyfat_core::{AgentId, SessionId};
use tinyfat_store::{JobQueue, MetadataStore, NewJob, SqliteStore};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    TransactionEach,
    GroupCommit,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn new_job(task: usize, n: usize) -> NewJob {
    let agent = AgentId::from_ulid(ulid::Ulid::from_parts(1, (task % 16) as u128));
    NewJob {
        id: format!("job-{task}-{n}"),
        dedup_key: format!("telegram:1:{task}:{n}"),
        agent_id: agent,
        session: SessionId::parse(&format!("telegram-{}", task % 16)).unwrap(),
        kind: "message".into(),
        payload: format!(
            r#"{{"channel":"telegram","chat_id":{task},"update_id":{n},"from":{{"id":{task},"name":"Ann"}},"text":"{}"}}"#,
            "hello there, this is a message of typical length for a chat ".repeat(3)
        ),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn run(mode: Mode, concurrency: usize, jobs: usize) -> (f64, f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bench.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    store.migrate().await.unwrap();
    let per_task = jobs / concurrency;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..concurrency {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_task);
            for n in 0..per_task {
                let job = new_job(task, n);
                let t = Instant::now();
                let answer = match mode {
                    Mode::TransactionEach => store.enqueue_each(job, now_ms()).await,
                    Mode::GroupCommit => store.enqueue(job, now_ms()).await,
                };
                assert!(!answer.unwrap().duplicate);
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(jobs);
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    (latencies.len() as f64 / elapsed, percentile(&latencies, 0.5), percentile(&latencies, 0.99))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let jobs: usize = std::env::var("ENQUEUE_BENCH_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(4000);
    println!("{jobs} enqueues per run, SQLite WAL synchronous=FULL, temp dir on this machine's disk");
    println!("{:<18} {:>11} {:>12} {:>9} {:>9}", "mode", "enqueuers", "enqueues/s", "p50 ms", "p99 ms");
    for concurrency in [1, 2, 16, 64] {
        for mode in [Mode::TransactionEach, Mode::GroupCommit] {
            let (rate, p50, p99) = run(mode, concurrency, jobs).await;
            let name = match mode {
                Mode::TransactionEach => "transaction each",
                Mode::GroupCommit => "group commit",
            };
            println!("{name:<18} {concurrency:>11} {rate:>12.0} {p50:>9.2} {p99:>9.2}");
        }
    }
}
