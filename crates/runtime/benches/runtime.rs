//! Runtime benchmarks (plain `main`, no harness):
//! - the load time of a 10,000-record session file;
//! - the platform's own overhead for one turn with an instant fake model,
//!   with no tools and with one bash call (sandboxed);
//!
//! Run: `cargo bench -p tinyfat-runtime --bench runtime`

use std::sync::Arc;
use std::time::{Duration, Instant};

use tinyfat_core::message::{ContentBlock, Message, Role};
use tinyfat_core::session::{RecordBody, SessionId, SessionRecord};
use tinyfat_core::{AgentConfig, AgentId, Secret};
use tinyfat_model::{CancelToken, ClientOptions, HttpClient, ProviderCredentials};
use tinyfat_runtime::session::SessionLog;
use tinyfat_runtime::{Conversation, Identity, InboundMessage, SessionCache, Turn, TurnInput, TurnLimits};
use tinyfat_sandbox::SandboxConfig;
use tinyfat_storage::{AgentStorage, LocalStorage, validate_path};
use tinyfat_testkit::{FakeModel, Script};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    println!(
        "{name:<44} n={:<5} mean={:>8.3} ms  p50={:>8.3} ms  p99={:>8.3} ms",
        samples.len(),
        mean.as_secs_f64() * 1e3,
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3
    );
}

#[tokio::main]
async fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let storage = LocalStorage::new(tmp.path().join("storage"));
    let ws = storage.create(&AgentId::from_ulid(ulid::Ulid::new())).await.unwrap();
    ws.dir
        .write_atomic(
            &validate_path("config.json").unwrap(),
            AgentConfig::new("claude-bench").to_pretty_json().as_bytes(),
        )
        .unwrap();
    ws.dir.write_atomic(&validate_path("MEMORY.md").unwrap(), b"# Memory\n").unwrap();

    // A 10,000-record session: user text, assistant tool_use, tool_result, assistant text.
    let session = SessionId::parse("cli-big").unwrap();
    let mut lines = String::new();
    for i in 0..10_000u64 {
        let message = match i % 4 {
            0 => Message::user_text(format!(
                "[2026-11-25 10:00 UTC] [cli] [ann]: question number {i} about the quarterly report"
            )),
            1 => Message {
                role: Role::Assistant,
                content: vec![ContentBlock::ToolUse {
                    id: format!("t{i}"),
                    name: "bash".into(),
                    input: serde_json::json!({"command": "grep -r revenue /data/files | head -20"}),
                }],
            },
            2 => Message {
                role: Role::User,
                content: vec![ContentBlock::ToolResult {
                    tool_use_id: format!("t{}", i - 1),
                    content: "files/q3.md: revenue grew 12% to 4.2M\n".repeat(5),
                    is_error: false,
                }],
            },
            _ => Message::assistant_text(
                "Revenue grew 12% in Q3 to 4.2M; the main driver was the new subscription tier.".to_owned(),
            ),
        };
        let record = tinyfat_core::session::SessionRecord {
            id: i + 1,
            ts: "2026-11-25T10:00:00.000Z".into(),
            body: RecordBody::Message {
                message,
                channel: Some("cli".into()),
                usage: None,
                job: Some(format!("job{}", i / 4)),
            },
        };
        lines.push_str(&serde_json::to_string(&record).unwrap());
        lines.push('\n');
    }
    ws.dir.write_atomic(&validate_path("sessions/cli-big.jsonl").unwrap(), lines.as_bytes()).unwrap();
    println!("session file: {} records, {:.1} MB", 10_000, lines.len() as f64 / 1e6);
    let mut samples = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        let log = SessionLog::load(&ws.dir, &session).unwrap();
        let view = log.model_view();
        samples.push(started.elapsed());
        assert_eq!(view.len(), 10_000);
    }
    report("load + sanitize 10,000-record session", samples);

    // The same session through the cache `serve` keeps: each turn finds one
    // record appended since (written here as another process would) and
    // reads and parses only that.
    let cache = SessionCache::new(64 << 20);
    cache.keep(&ws.dir, SessionLog::load(&ws.dir, &session).unwrap());
    let (mut loads, mut views) = (Vec::new(), Vec::new());
    for i in 0..30u64 {
        let record = SessionRecord {
            id: 10_001 + i,
            ts: "2026-11-25T10:00:00.000Z".into(),
            body: RecordBody::Message {
                message: Message::user_text("one more"),
                channel: Some("cli".into()),
                usage: None,
                job: Some(format!("extra{i}")),
            },
        };
        let line = format!("{}\n", serde_json::to_string(&record).unwrap());
        ws.dir.append_sync(&validate_path("sessions/cli-big.jsonl").unwrap(), line.as_bytes()).unwrap();
        let started = Instant::now();
        let log = cache.load(&ws.dir, &session).unwrap();
        loads.push(started.elapsed());
        let view = log.model_view();
        views.push(started.elapsed());
        assert_eq!(log.records.len() as u64, 10_001 + i, "the cached log saw the appended record");
        assert!(!view.is_empty());
        cache.keep(&ws.dir, log);
    }
    report("cached load, one new record (10,000)", loads);
    report("cached load + sanitize (10,000)", views);

    let fake = FakeModel::start().await;
    fake.set_fallback(Script::text("ok"));
    let creds = ProviderCredentials {
        anthropic_key: Some(Secret::new("k")),
        anthropic_base_url: Some(fake.base_url()),
        ..Default::default()
    };
    let http = HttpClient::new(ClientOptions::default()).unwrap();
    let client = tinyfat_model::build_client("claude-bench", &creds, &http).unwrap();
    let executor = tinyfat_sandbox::build_executor(&SandboxConfig::default());
    let config_json = AgentConfig::new("claude-bench").to_pretty_json();
    let turn = |session: &str| {
        let _ = session;
        Turn {
            workspace: &ws,
            identity: Identity { name: "bench".into(), email: "bench@x.org".into(), owner: "o@x.org".into() },
            config: serde_json::from_str(&config_json).unwrap(),
            config_json: config_json.clone(),
            model: client.as_ref(),
            executor: executor.as_ref(),
            limits: TurnLimits::default(),
            cancel: CancelToken::new(),
            tokens_used_today: 0,
            clock: Arc::new(chrono::Utc::now),
            sessions: None,
        }
    };
    let input = |job: String, session: &str| TurnInput {
        session: SessionId::parse(session).unwrap(),
        job_id: job,
        messages: vec![InboundMessage {
            channel: "cli".into(),
            sender: "ann".into(),
            text: "hi".into(),
            received_at: chrono::Utc::now(),
            untrusted: vec![],
        }],
        conversation: Some(Conversation { channel: "cli".into(), to: None }),
        message_jobs: vec![],
    };

    // Baseline: the bare model call over loopback HTTP to the instant fake.
    let mut samples = Vec::new();
    for _ in 0..200 {
        let request = tinyfat_model::ModelRequest {
            model: "claude-bench".into(),
            system_static: "s".into(),
            system_dynamic: "d".into(),
            messages: vec![Message::user_text("hi")],
            tools: vec![],
            max_tokens: 100,
        };
        let started = Instant::now();
        client.stream(&request, &CancelToken::new(), &mut |_| {}).await.unwrap();
        samples.push(started.elapsed());
    }
    report("baseline: bare model call to instant fake", samples);

    let mut samples = Vec::new();
    for i in 0..200 {
        let session = format!("cli-t{i}");
        let started = Instant::now();
        turn(&session).run(input(format!("j{i}"), &session), &mut |_| {}).await.unwrap();
        samples.push(started.elapsed());
    }
    report("turn, no tools (fresh session)", samples);

    let mut samples = Vec::new();
    for i in 0..50 {
        fake.push_all([Script::tool_call(format!("b{i}"), "bash", &["{\"command\":\"true\"}"]), Script::text("done")]);
        let session = format!("cli-b{i}");
        let started = Instant::now();
        turn(&session).run(input(format!("b{i}"), &session), &mut |_| {}).await.unwrap();
        samples.push(started.elapsed());
    }
    report("turn, one sandboxed bash call (2 model calls)", samples);
}
