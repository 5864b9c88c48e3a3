//! Full turns end to end through the library: a real agent folder, the fake
//! model server speaking the Anthropic wire format, and real bubblewrap for
//! `bash`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tinyfat_core::message::{ContentBlock, Usage};
use tinyfat_core::session::{RecordBody, SessionId, SessionRecord};
use tinyfat_core::{AgentConfig, AgentId, Secret};
use tinyfat_model::{CancelToken, ClientOptions, HttpClient, ModelClient, ModelError, ProviderCredentials};
use tinyfat_runtime::session::INTERRUPTED_RESULT;
use tinyfat_runtime::{
    Conversation, Identity, InboundMessage, SessionCache, Turn, TurnEnd, TurnError, TurnEvent, TurnInput, TurnLimits,
};
use tinyfat_sandbox::{SandboxConfig, ToolExecutor};
use tinyfat_storage::{AgentStorage, LocalStorage, Workspace, validate_path};
use tinyfat_testkit::{FakeModel, Script};

struct Env {
    _tmp: tempfile::TempDir,
    ws: Workspace,
    fake: FakeModel,
    client: Arc<dyn ModelClient>,
    executor: Arc<dyn ToolExecutor>,
    /// Every turn here goes through the session cache, as under `serve`.
    sessions: SessionCache,
}

async fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let storage = LocalStorage::new(tmp.path().join("storage"));
    let ws = storage.create(&AgentId::from_ulid(ulid::Ulid::new())).await.unwrap();
    ws.dir.write_atomic(&validate_path("MEMORY.md").unwrap(), b"# Memory\n- Ann likes tea\n").unwrap();
    ws.dir
        .write_atomic(
            &validate_path("config.json").unwrap(),
            AgentConfig::new("claude-test").to_pretty_json().as_bytes(),
        )
        .unwrap();
    let fake = FakeModel::start().await;
    let creds = ProviderCredentials {
        anthropic_key: Some(Secret::new("sk-test")),
        anthropic_base_url: Some(fake.base_url()),
        ..Default::default()
    };
    let http = HttpClient::new(ClientOptions::default()).unwrap();
    let client = tinyfat_model::build_client("claude-test", &creds, &http).unwrap();
    let executor = tinyfat_sandbox::build_executor(&SandboxConfig::default());
    Env { _tmp: tmp, ws, fake, client, executor, sessions: SessionCache::new(1 << 20) }
}

fn turn<'a>(env: &'a Env, limits: TurnLimits) -> Turn<'a> {
    let config_json = env.ws.dir.read_string(&validate_path("config.json").unwrap(), 1 << 16).unwrap();
    Turn {
        workspace: &env.ws,
        identity: Identity { name: "testbot".into(), email: "testbot@x.org".into(), owner: "ann@x.org".into() },
        config: serde_json::from_str(&config_json).unwrap(),
        config_json,
        model: env.client.as_ref(),
        executor: env.executor.as_ref(),
        limits,
        cancel: CancelToken::new(),
        tokens_used_today: 0,
        clock: Arc::new(chrono::Utc::now),
        sessions: Some(&env.sessions),
    }
}

fn input(job: &str, text: &str) -> TurnInput {
    TurnInput {
        session: SessionId::parse("cli-main").unwrap(),
        job_id: job.into(),
        messages: vec![InboundMessage {
            channel: "cli".into(),
            sender: "ann@x.org".into(),
            text: text.into(),
            received_at: chrono::Utc::now(),
            untrusted: vec![],
        }],
        conversation: Some(Conversation { channel: "cli".into(), to: None }),
        message_jobs: vec![],
    }
}

fn records(env: &Env) -> Vec<SessionRecord> {
    let text = env.ws.dir.read_string(&validate_path("sessions/cli-main.jsonl").unwrap(), 1 << 24).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn events_sink(events: &Arc<Mutex<Vec<TurnEvent>>>) -> impl FnMut(TurnEvent) + Send + '_ {
    move |e| events.lock().unwrap().push(e)
}

/// The messages array of the n-th request the fake model received.
fn sent_messages(env: &Env, n: usize) -> Vec<Value> {
    env.fake.requests()[n].body["messages"].as_array().unwrap().clone()
}

#[tokio::test]
async fn text_turn_streams_records_and_accounts_usage() {
    let env = env().await;
    env.fake.push(Script::text_deltas(&["Hel", "lo ", "Ann"]).with_usage(Usage {
        input_tokens: 100,
        output_tokens: 7,
        cache_creation_input_tokens: 50,
        cache_read_input_tokens: 20,
    }));
    let events = Arc::new(Mutex::new(Vec::new()));
    let outcome =
        turn(&env, TurnLimits::default()).run(input("job1", "hi there"), &mut events_sink(&events)).await.unwrap();
    assert_eq!(outcome.reply.as_deref(), Some("Hello Ann"));
    assert_eq!(outcome.end, TurnEnd::Completed);
    assert_eq!(
        (
            outcome.usage.input_tokens,
            outcome.usage.output_tokens,
            outcome.usage.cache_creation_input_tokens,
            outcome.usage.cache_read_input_tokens
        ),
        (100, 7, 50, 20)
    );
    let deltas: String = events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            TurnEvent::TextDelta(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(deltas, "Hello Ann");

    let recs = records(&env);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs.iter().map(|r| r.id).collect::<Vec<_>>(), [1, 2]);
    match &recs[1].body {
        RecordBody::Message { usage: Some(u), job: Some(j), .. } => {
            assert_eq!((u.output_tokens, j.as_str()), (7, "job1"))
        }
        other => panic!("{other:?}"),
    }
    let request = &env.fake.requests()[0];
    let system = request.body["system"].as_array().unwrap();
    assert_eq!(system.len(), 2);
    assert!(system[0]["text"].as_str().unwrap().contains("You are testbot"));
    assert!(system[1]["text"].as_str().unwrap().contains("Ann likes tea"), "MEMORY.md is in the second block");
    let first = sent_messages(&env, 0)[0]["content"][0]["text"].as_str().unwrap().to_owned();
    assert!(first.contains("] [cli] [ann@x.org]: hi there"), "{first}");
}

#[tokio::test]
async fn static_prompt_is_byte_identical_across_turns_and_memory_is_reread() {
    let env = env().await;
    env.fake.push_all([Script::text("one"), Script::text("two")]);
    turn(&env, TurnLimits::default()).run(input("j1", "a"), &mut |_| {}).await.unwrap();
    env.ws.dir.write_atomic(&validate_path("MEMORY.md").unwrap(), b"- Ann moved to Vienna\n").unwrap();
    turn(&env, TurnLimits::default()).run(input("j2", "b"), &mut |_| {}).await.unwrap();
    let requests = env.fake.requests();
    assert_eq!(requests[0].body["system"][0], requests[1].body["system"][0]);
    assert!(requests[1].body["system"][1]["text"].as_str().unwrap().contains("Vienna"));
    assert_eq!(sent_messages(&env, 1).len(), 3, "history carries the first exchange");
}

#[tokio::test]
async fn tool_calls_run_in_the_sandbox_and_results_feed_back() {
    let env = env().await;
    env.fake.push_all([
        Script::tool_call(
            "t1",
            "bash",
            &["{\"command\":", " \"mkdir -p files && echo hi > /data/files/x.txt && cat /data/files/x.txt\"}"],
        ),
        Script::tool_call("t2", "write", &["{\"path\":\"config.json\",\"content\":\"{}\"}"]),
        Script::tool_call("t3", "edit", &["{\"path\":\"MEMORY.md\",\"old_text\":\"tea\",\"new_text\":\"coffee\"}"]),
        Script::text("done"),
    ]);
    let events = Arc::new(Mutex::new(Vec::new()));
    let outcome =
        turn(&env, TurnLimits::default()).run(input("j1", "do things"), &mut events_sink(&events)).await.unwrap();
    assert_eq!(outcome.reply.as_deref(), Some("done"));
    assert_eq!(outcome.tool_calls, 3);
    assert_eq!(env.ws.dir.read_string(&validate_path("files/x.txt").unwrap(), 100).unwrap(), "hi\n");
    assert!(env.ws.dir.read_string(&validate_path("MEMORY.md").unwrap(), 1000).unwrap().contains("coffee"));
    assert!(env.ws.dir.read_string(&validate_path("config.json").unwrap(), 1000).unwrap().contains("claude-test"));

    let events = events.lock().unwrap();
    let results: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            TurnEvent::ToolResult { id, output, is_error } => Some((id.clone(), output.clone(), *is_error)),
            _ => None,
        })
        .collect();
    assert_eq!(results[0], ("t1".into(), "hi\n".into(), false));
    assert!(results[1].2 && results[1].1.contains("read-only"), "{:?}", results[1]);
    assert!(!results[2].2);
    assert!(
        matches!(&events[0], TurnEvent::ToolCall { name, input, .. } if name == "bash" && input["command"].as_str().unwrap().starts_with("mkdir -p files"))
    );
    // The second request carries the assembled tool_use and its result.
    let messages = sent_messages(&env, 1);
    assert_eq!(
        messages[1]["content"].as_array().unwrap().last().unwrap()["input"]["command"],
        "mkdir -p files && echo hi > /data/files/x.txt && cat /data/files/x.txt"
    );
    assert_eq!(messages[2]["content"][0]["type"], "tool_result");
    assert_eq!(messages[2]["content"][0]["content"], "hi\n");
}

#[tokio::test]
async fn a_retried_job_resumes_from_the_session_file() {
    let env = env().await;
    // The first attempt died after the model asked for a tool, before its result.
    env.fake.push(
        Script::tool_call("t1", "bash", &["{\"command\":\"sleep 30\"}"]).with_chunk_delay(Duration::from_millis(1)),
    );
    let t = turn(&env, TurnLimits::default());
    let _ = tokio::time::timeout(Duration::from_millis(1500), t.run(input("job7", "long task"), &mut |_| {})).await;
    let before = records(&env);
    assert_eq!(before.len(), 2, "user record and the tool_use were synced: {before:#?}");

    env.fake.push(Script::text("resumed"));
    let outcome = turn(&env, TurnLimits::default()).run(input("job7", "long task"), &mut |_| {}).await.unwrap();
    assert_eq!(outcome.reply.as_deref(), Some("resumed"));
    let recs = records(&env);
    let user_records = recs.iter().filter(|r| matches!(&r.body, RecordBody::Message { message, .. } if message.role == tinyfat_core::message::Role::User && message.text().contains("long task"))).count();
    assert_eq!(user_records, 1, "the user message is not appended twice");
    let last = sent_messages(&env, 1);
    let result = &last[2]["content"][0];
    assert_eq!((result["tool_use_id"].as_str(), result["content"].as_str()), (Some("t1"), Some(INTERRUPTED_RESULT)));

    // Retried once more after the reply was recorded: no model call, same reply.
    let calls = env.fake.requests().len();
    let again = turn(&env, TurnLimits::default()).run(input("job7", "long task"), &mut |_| {}).await.unwrap();
    assert_eq!(again.reply.as_deref(), Some("resumed"));
    assert_eq!(env.fake.requests().len(), calls);
}

#[tokio::test]
async fn reply_rules_no_reply_and_send_message() {
    let env = env().await;
    env.fake.push(Script::text("NO_REPLY"));
    let outcome = turn(&env, TurnLimits::default()).run(input("j1", "event"), &mut |_| {}).await.unwrap();
    assert_eq!(outcome.reply, None);

    env.fake.push_all([
        Script::tool_call("t9", "send_message", &["{\"channel\":\"cli\",\"text\":\"answered via tool\"}"]),
        Script::tool_call(
            "t10",
            "send_message",
            &["{\"channel\":\"email\",\"to\":\"bob@x.org\",\"text\":\"hello bob\"}"],
        ),
        Script::text("final text"),
    ]);
    let outcome = turn(&env, TurnLimits::default()).run(input("j2", "tell bob"), &mut |_| {}).await.unwrap();
    assert_eq!(outcome.reply, None, "send_message already answered this conversation");
    let keys: Vec<_> = outcome.outbound.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(keys, ["j2:t9", "j2:t10"]);
    assert_eq!(outcome.outbound[1].to.as_deref(), Some("bob@x.org"));
}

#[tokio::test]
async fn stop_cancels_a_streaming_turn() {
    let env = env().await;
    env.fake.push(Script::text_deltas(&["a", "b", "c", "d", "e", "f"]).with_chunk_delay(Duration::from_millis(500)));
    let t = turn(&env, TurnLimits::default());
    let cancel = t.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        cancel.cancel();
    });
    let started = std::time::Instant::now();
    let outcome = t.run(input("j1", "write a novel"), &mut |_| {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!((outcome.end, outcome.reply.as_deref()), (TurnEnd::Stopped, Some("Stopped.")));
    assert!(matches!(&records(&env).last().unwrap().body, RecordBody::Meta { event, .. } if event == "stop"));
}

#[tokio::test]
async fn stop_kills_a_running_tool() {
    let env = env().await;
    env.fake.push(Script::tool_call("t1", "bash", &["{\"command\":\"sleep 50\"}"]));
    let t = turn(&env, TurnLimits::default());
    let cancel = t.cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        cancel.cancel();
    });
    let started = std::time::Instant::now();
    let outcome = t.run(input("j1", "wait"), &mut |_| {}).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(outcome.end, TurnEnd::Stopped);
}

#[tokio::test]
async fn limits_tool_calls_and_budget() {
    let env = env().await;
    env.fake.push_all([
        Script::tool_call("t1", "read", &["{\"path\":\"MEMORY.md\"}"]),
        Script::tool_call("t2", "read", &["{\"path\":\"MEMORY.md\"}"]),
    ]);
    let limits = TurnLimits { tool_calls_max: 1, ..TurnLimits::default() };
    let outcome = turn(&env, limits).run(input("j1", "loop"), &mut |_| {}).await.unwrap();
    assert_eq!(outcome.end, TurnEnd::ToolCallLimit);
    assert_eq!(outcome.tool_calls, 1);
    assert!(outcome.reply.unwrap().contains("1 tool calls"));

    let mut t = turn(&env, TurnLimits { tokens_per_day_max: 1000, ..TurnLimits::default() });
    t.tokens_used_today = 1000;
    let err = t.run(input("j2", "more"), &mut |_| {}).await.unwrap_err();
    assert!(matches!(err, TurnError::Budget { used: 1000, max: 1000 }), "{err}");
    assert_eq!(env.fake.requests().len(), 2, "no model call past the budget");
}

#[tokio::test]
async fn provider_errors_carry_their_decision() {
    let env = env().await;
    env.fake.push(Script::unauthorized());
    let err = turn(&env, TurnLimits::default()).run(input("j1", "hi"), &mut |_| {}).await.unwrap_err();
    match err {
        TurnError::Model(ModelError::Permanent { message }) => {
            assert!(message.contains("anthropic_api_key"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    env.fake.push(Script::server_error());
    let err = turn(&env, TurnLimits::default()).run(input("j2", "hi"), &mut |_| {}).await.unwrap_err();
    assert!(matches!(err, TurnError::Model(ref e) if e.is_transient()), "{err:?}");
}

#[tokio::test]
async fn commands_clear_model_status() {
    let env = env().await;
    env.fake.push_all([Script::text("first answer"), Script::text("after clear")]);
    turn(&env, TurnLimits::default()).run(input("j1", "remember x"), &mut |_| {}).await.unwrap();
    let cleared = turn(&env, TurnLimits::default()).run(input("j2", "/clear"), &mut |_| {}).await.unwrap();
    assert_eq!(cleared.end, TurnEnd::Command);
    assert!(cleared.reply.unwrap().starts_with("Cleared"));
    turn(&env, TurnLimits::default()).run(input("j3", "what was x?"), &mut |_| {}).await.unwrap();
    assert_eq!(sent_messages(&env, 1).len(), 1, "history before /clear is not sent");

    let status = turn(&env, TurnLimits::default()).run(input("j4", "/status"), &mut |_| {}).await.unwrap();
    assert!(status.reply.unwrap().contains("claude-test"));
    let changed =
        turn(&env, TurnLimits::default()).run(input("j5", "/model openai:gpt-4o"), &mut |_| {}).await.unwrap();
    assert_eq!(changed.model_changed.as_deref(), Some("openai:gpt-4o"));
    let config: Value =
        serde_json::from_str(&env.ws.dir.read_string(&validate_path("config.json").unwrap(), 1000).unwrap()).unwrap();
    assert_eq!(config["model"], "openai:gpt-4o");
    let bad = turn(&env, TurnLimits::default()).run(input("j6", "/model gpt-nonsense"), &mut |_| {}).await.unwrap_err();
    assert!(bad.to_string().contains("unknown model provider"), "{bad}");
    assert_eq!(env.fake.requests().len(), 2, "commands do not call the model");
}

#[tokio::test]
async fn compaction_summarises_old_turns_when_the_window_fills() {
    let env = env().await;
    let filler = "lorem ipsum ".repeat(100);
    for i in 0..6 {
        env.fake.push(Script::text(format!("answer {i} {filler}")));
        turn(&env, TurnLimits::default())
            .run(input(&format!("j{i}"), &format!("question {i} {filler}")), &mut |_| {})
            .await
            .unwrap();
    }
    // A small window forces compaction before the next model call.
    env.fake.push_all([Script::text("SUMMARY: six questions about lorem ipsum"), Script::text("fresh answer")]);
    let limits = TurnLimits { context_window_tokens: 3000, ..TurnLimits::default() };
    let outcome = turn(&env, limits).run(input("j9", "next question"), &mut |_| {}).await.unwrap();
    assert_eq!(outcome.reply.as_deref(), Some("fresh answer"));
    let recs = records(&env);
    let compaction = recs
        .iter()
        .find_map(|r| match &r.body {
            RecordBody::Compaction { summary, replaces_through } => Some((summary.clone(), *replaces_through)),
            _ => None,
        })
        .expect("a compaction record");
    assert!(compaction.0.contains("SUMMARY"));
    let requests = env.fake.requests();
    let summary_request = &requests[requests.len() - 2];
    assert!(summary_request.body["tools"].as_array().is_none_or(|t| t.is_empty()));
    let last = sent_messages(&env, requests.len() - 1);
    assert!(last[0]["content"][0]["text"].as_str().unwrap().contains("SUMMARY: six questions"));
    assert!(last.len() < 13, "older turns were replaced by the summary ({} messages)", last.len());
    assert!(last.iter().any(|m| m.to_string().contains("next question")));
    // The file was only appended to.
    assert!(recs.windows(2).all(|w| w[0].id < w[1].id));
    let _ = json!(ContentBlock::Text { text: String::new() });
}
