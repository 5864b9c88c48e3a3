//! `tinyfat serve` as a real process: durable web chat, crash recovery with
//! `kill -9` at each stage, deduplication, concurrency and bad input.
//! Every message must be answered exactly once: asserted on the session file
//! and on the delivery table.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tinyfat_core::message::Role;
use tinyfat_core::session::{RecordBody, SessionRecord};
use tinyfat_testkit::{FakeModel, Script, TestProcess, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_tinyfat");

/// Starts `tinyfat serve` in `role` on the test's data folder.
fn start_server(data: &Path, fake: &FakeModel, role: &str) -> TestProcess {
    let port = free_port();
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--role", role])
        .env("TINYFAT_DATA_DIR", data)
        .env("ANTHROPIC_API_KEY", "sk-test")
        .env("ANTHROPIC_BASE_URL", fake.base_url())
        .env("TINYFAT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if role == "worker" {
        // No HTTP port: the test waits for its work instead.
        return TestProcess::spawn(&mut command, port);
    }
    TestProcess::spawn_listening(&mut command, port)
}

struct Env {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    fake: FakeModel,
    token: String,
    agent_id: String,
    http: reqwest::Client,
}

fn cli(data: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN).args(args).arg("--json").env("TINYFAT_DATA_DIR", data).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().to_owned();
    let fake = FakeModel::start().await;
    let agent = cli(&data, &["agent", "create", "--owner", "ann@example.com", "--name", "webby"]);
    let token = cli(&data, &["token", "create", "--name", "test"]);
    Env {
        _tmp: tmp,
        data,
        fake,
        token: token["token"].as_str().unwrap().to_owned(),
        agent_id: agent["id"].as_str().unwrap().to_owned(),
        http: reqwest::Client::new(),
    }
}

/// Reads an SSE response to `[DONE]` (or until `stop_after` events), returning the JSON events.
async fn read_sse(response: reqwest::Response, stop_after: Option<&dyn Fn(&Value) -> bool>) -> Vec<Value> {
    let mut events = Vec::new();
    let mut buffer = String::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), body.next()).await.expect("SSE stalled") {
        buffer.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let data = frame.lines().filter_map(|l| l.strip_prefix("data: ")).collect::<Vec<_>>().join("\n");
            if data == "[DONE]" {
                return events;
            }
            let value: Value = serde_json::from_str(&data).unwrap();
            let stop = stop_after.is_some_and(|f| f(&value));
            events.push(value);
            if stop {
                return events;
            }
        }
    }
    events
}

impl Env {
    async fn post_chat(&self, server: &TestProcess, body: Value) -> reqwest::Response {
        self.http
            .post(server.url(&format!("/api/agents/{}/chat", self.agent_id)))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn replay(&self, server: &TestProcess, request_id: &str) -> Vec<Value> {
        let response = self
            .http
            .get(server.url(&format!("/api/agents/{}/runs/{request_id}/events", self.agent_id)))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        read_sse(response, None).await
    }

    fn session(&self, session: &str) -> Vec<SessionRecord> {
        let path = self.data.join("storage/agents").join(&self.agent_id).join(format!("sessions/{session}.jsonl"));
        std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    async fn store(&self) -> std::sync::Arc<dyn tinyfat_store::Store> {
        tinyfat_store::connect(&format!("sqlite://{}", self.data.join("tinyfat.db").display())).await.unwrap()
    }
}

fn text(events: &[Value]) -> String {
    events.iter().filter(|e| e["type"] == "text_delta").map(|e| e["delta"].as_str().unwrap()).collect()
}

/// User records whose text contains `needle`, and final assistant answers.
fn count(records: &[SessionRecord], needle: &str) -> (usize, usize) {
    let users = records
        .iter()
        .filter(|r| matches!(&r.body, RecordBody::Message { message, .. } if message.role == Role::User && message.text().contains(needle)))
        .count();
    let answers = records
        .iter()
        .filter(|r| matches!(&r.body, RecordBody::Message { message, .. } if message.role == Role::Assistant && !message.text().is_empty()))
        .count();
    (users, answers)
}

async fn reply_deliveries(env: &Env) -> Vec<tinyfat_store::Delivery> {
    let store = env.store().await;
    let id = tinyfat_core::AgentId::parse(&env.agent_id).unwrap();
    store
        .deliveries_for(&id, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|d| d.idempotency_key.starts_with("reply:"))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn web_chat_streams_accepted_deltas_and_done() {
    let env = env().await;
    let server = start_server(&env.data, &env.fake, "all");
    env.fake.push(Script::text_deltas(&["Hi ", "Ann"]));
    let response = env.post_chat(&server, json!({"message": "hello", "request_id": "r1"})).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = read_sse(response, None).await;
    assert_eq!(events[0]["type"], "accepted");
    assert_eq!((events[0]["request_id"].as_str(), events[0]["session"].as_str()), (Some("r1"), Some("web-main")));
    assert_eq!(text(&events), "Hi Ann");
    assert_eq!(events.last().unwrap()["type"], "run_complete");

    // A browser retrying the POST attaches to the same run: no second turn.
    let again = read_sse(env.post_chat(&server, json!({"message": "hello", "request_id": "r1"})).await, None).await;
    assert_eq!(text(&again), "Hi Ann");
    assert_eq!(env.fake.requests().len(), 1);
    assert_eq!(count(&env.session("web-main"), "hello"), (1, 1));

    // The reply its stream delivered is recorded as sent, once, and counted.
    let deliveries = reply_deliveries(&env).await;
    assert_eq!(deliveries.len(), 1);
    assert_eq!((deliveries[0].state, deliveries[0].attempts), (tinyfat_store::DeliveryState::Sent, 0));
    let metrics = env.http.get(server.url("/metrics")).bearer_auth(&env.token).send().await.unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.lines().any(|l| l == "tinyfat_deliveries_sent_total 1"), "{metrics}");

    // Unauthenticated and cross-tenant requests.
    let anon = env
        .http
        .post(server.url(&format!("/api/agents/{}/chat", env.agent_id)))
        .json(&json!({"message": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_4xx_and_enqueues_nothing() {
    let env = env().await;
    let server = start_server(&env.data, &env.fake, "all");
    let url = server.url(&format!("/api/agents/{}/chat", env.agent_id));
    let send = |body: reqwest::Body, content_type: &'static str| {
        env.http.post(&url).bearer_auth(&env.token).header("content-type", content_type).body(body).send()
    };
    let malformed = send("{\"message\": ".into(), "application/json").await.unwrap();
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert!(body["error"].as_str().is_some(), "{body}");
    assert_eq!(send("message=hi".into(), "application/x-www-form-urlencoded").await.unwrap().status(), 415);
    // Just over the 1 MiB cap: the server answers 413 without reading the
    // rest, and a small remainder fits the socket buffers (a far bigger body
    // can be cut off by the server's close before the client reads the 413).
    // The server closes that connection after its 413; `connection: close`
    // keeps the client from reusing it for the next request (a race).
    let huge = json!({"message": "x".repeat((1 << 20) + 1024)}).to_string();
    let too_big = env
        .http
        .post(&url)
        .bearer_auth(&env.token)
        .header("content-type", "application/json")
        .header("connection", "close")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(too_big.status(), 413);
    assert_eq!(send("{\"message\": \"\"}".into(), "application/json").await.unwrap().status(), 400);
    let store = env.store().await;
    let id = tinyfat_core::AgentId::parse(&env.agent_id).unwrap();
    assert!(store.jobs_for(&id, 10).await.unwrap().is_empty(), "nothing was enqueued");
    assert!(env.fake.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_ack_before_the_turn_starts() {
    let env = env().await;
    // A gateway without workers acknowledges and enqueues, then dies.
    let gateway = start_server(&env.data, &env.fake, "gateway");
    let response = env.post_chat(&gateway, json!({"message": "queued while down", "request_id": "ra"})).await;
    let events = read_sse(response, Some(&|e: &Value| e["type"] == "accepted")).await;
    assert_eq!(events[0]["type"], "accepted");
    gateway.kill9();

    env.fake.push(Script::text("answered after restart"));
    let server = start_server(&env.data, &env.fake, "all");
    let replay = env.replay(&server, "ra").await;
    assert_eq!(text(&replay), "answered after restart");
    assert_eq!(count(&env.session("web-main"), "queued while down"), (1, 1));
    assert_eq!(reply_deliveries(&env).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_in_the_middle_of_a_turn_while_the_model_streams() {
    let env = env().await;
    let server = start_server(&env.data, &env.fake, "all");
    env.fake.push(
        Script::text_deltas(&["one ", "two ", "three ", "four ", "five"]).with_chunk_delay(Duration::from_millis(400)),
    );
    let response = env.post_chat(&server, json!({"message": "count slowly", "request_id": "rb"})).await;
    let events = read_sse(response, Some(&|e: &Value| e["type"] == "text_delta")).await;
    assert_eq!(events.last().unwrap()["type"], "text_delta");
    server.kill9();
    let (users, answers) = count(&env.session("web-main"), "count slowly");
    assert_eq!((users, answers), (1, 0), "the user message was durable; no answer yet");

    env.fake.push(Script::text("one two three four five"));
    let server = start_server(&env.data, &env.fake, "all");
    // The lease of the killed worker must lapse before the job runs again.
    let replay = env.replay(&server, "rb").await;
    assert_eq!(text(&replay), "one two three four five");
    assert_eq!(count(&env.session("web-main"), "count slowly"), (1, 1), "answered exactly once");
    let deliveries = reply_deliveries(&env).await;
    assert_eq!(deliveries.len(), 1);
    drop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_the_reply_is_stored_before_delivery() {
    let env = env().await;
    let server = start_server(&env.data, &env.fake, "all");
    env.fake.push(Script::text("stored reply"));
    let response = env.post_chat(&server, json!({"message": "reply then die", "request_id": "rc"})).await;
    let events = read_sse(response, Some(&|e: &Value| e["type"] == "run_complete")).await;
    assert_eq!(text(&events), "stored reply");
    server.kill9();

    let server = start_server(&env.data, &env.fake, "all");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let deliveries = reply_deliveries(&env).await;
        assert_eq!(deliveries.len(), 1, "one delivery row per reply");
        if deliveries[0].state == tinyfat_store::DeliveryState::Sent {
            break;
        }
        assert!(Instant::now() < deadline, "the stored reply was never delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replay = env.replay(&server, "rc").await;
    assert_eq!(text(&replay), "stored reply");
    assert_eq!(env.fake.requests().len(), 1, "the model was not called again");
    assert_eq!(count(&env.session("web-main"), "reply then die"), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_to_one_agent_never_overlaps_and_every_message_is_seen() {
    let env = env().await;
    let server = start_server(&env.data, &env.fake, "all");
    env.fake.set_fallback(Script::text("ack").with_chunk_delay(Duration::from_millis(20)));
    let posts = (0..50).map(|i| {
        let env = &env;
        let server = &server;
        async move {
            let response = env
                .post_chat(server, json!({"message": format!("burst message {i}"), "request_id": format!("b{i}")}))
                .await;
            assert_eq!(response.status(), 200);
            read_sse(response, None).await
        }
    });
    let results = futures_util::future::join_all(posts).await;
    assert!(results.iter().all(|events| events.last().is_some_and(|e| e["type"] == "run_complete")));
    let records = env.session("web-main");
    for i in 0..50 {
        let suffix = format!(": burst message {i}");
        let seen = records
            .iter()
            .filter(|r| matches!(&r.body, RecordBody::Message { message, .. } if message.role == Role::User && message.text().ends_with(&suffix)))
            .count();
        assert_eq!(seen, 1, "message {i} recorded once");
    }
    let users = records
        .iter()
        .filter(|r| matches!(&r.body, RecordBody::Message { message, .. } if message.role == Role::User))
        .count();
    assert_eq!(users, 50, "every message is recorded once");
    // Turns never interleave: after a turn's first assistant record, only
    // that turn's records follow until the next user message.
    let mut current: Option<String> = None;
    for record in &records {
        if let RecordBody::Message { message, job, .. } = &record.body {
            match message.role {
                Role::User => current = None,
                Role::Assistant => {
                    if let Some(turn) = &current {
                        assert_eq!(Some(turn), job.as_ref(), "two turns interleaved");
                    }
                    current = job.clone();
                }
            }
        }
    }
    assert!(env.fake.requests().len() <= 50, "batched turns: {} model calls", env.fake.requests().len());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_agents_at_once_are_all_answered() {
    let env = env().await;
    // Provision in-process (the CLI would spend most of the test starting processes).
    let settings = tinyfat_platform::config::Settings::load(&tinyfat_platform::config::Sources {
        data_dir: Some(env.data.clone()),
        ..Default::default()
    })
    .unwrap();
    let platform = tinyfat_platform::Platform::open(settings).await.unwrap();
    let owner = tinyfat_core::EmailAddress::parse("ann@example.com").unwrap();
    let mut ids = Vec::new();
    for _ in 0..200 {
        let agent = platform
            .create_agent(tinyfat_platform::provision::CreateAgent { owner: owner.clone(), name: None, model: None })
            .await
            .unwrap();
        ids.push(agent.id.to_string());
    }
    drop(platform);
    let server = start_server(&env.data, &env.fake, "all");
    env.fake.set_fallback(Script::text("hello agent"));
    let posts = ids.iter().map(|id| {
        let (env, server) = (&env, &server);
        async move {
            let response = env
                .http
                .post(server.url(&format!("/api/agents/{id}/chat")))
                .bearer_auth(&env.token)
                .json(&json!({"message": "ping"}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            text(&read_sse(response, None).await)
        }
    });
    let replies = futures_util::future::join_all(posts).await;
    assert!(
        replies.iter().all(|r| r == "hello agent"),
        "{:?}",
        replies.iter().filter(|r| *r != "hello agent").collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_running_turn_finish_then_exits() {
    let env = env().await;
    let mut server = start_server(&env.data, &env.fake, "all");
    env.fake.push(Script::text_deltas(&["still ", "finishing ", "this"]).with_chunk_delay(Duration::from_millis(300)));
    let response = env.post_chat(&server, json!({"message": "long answer", "request_id": "rt"})).await;
    let mut events = read_sse(response, Some(&|e: &Value| e["type"] == "text_delta")).await;
    let status = Command::new("kill").args(["-TERM", &server.child().id().to_string()]).status().unwrap();
    assert!(status.success());
    let exited = tokio::task::spawn_blocking(move || {
        let status = server.child().wait().unwrap();
        (status, server)
    })
    .await
    .unwrap();
    assert!(exited.0.success(), "serve exits cleanly after SIGTERM: {:?}", exited.0);
    events.clear();
    // The turn that was running finished before the exit: its answer is recorded once.
    let records = env.session("web-main");
    assert_eq!(count(&records, "long answer"), (1, 1));
    let answer = records.iter().rev().find_map(|r| match &r.body {
        RecordBody::Message { message, .. } if message.role == Role::Assistant => Some(message.text()),
        _ => None,
    });
    assert_eq!(answer.as_deref(), Some("still finishing this"));
    assert_eq!(reply_deliveries(&env).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn terminal_chat_with_a_server_running_never_overlaps_its_turns() {
    let env = env().await;
    let server = start_server(&env.data, &env.fake, "all");
    env.fake.push(Script::text_deltas(&["slow ", "web ", "answer"]).with_chunk_delay(Duration::from_millis(500)));
    env.fake.set_fallback(Script::text("terminal answer"));
    let response = env.post_chat(&server, json!({"message": "web first", "request_id": "rw"})).await;
    let first = read_sse(response, Some(&|e: &Value| e["type"] == "text_delta")).await;
    assert_eq!(first.last().unwrap()["type"], "text_delta");

    // The web turn holds the agent's lease; the terminal's turn must wait for it.
    let data = env.data.clone();
    let url = env.fake.base_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["chat", "webby", "-m", "from the terminal"])
            .env("TINYFAT_DATA_DIR", &data)
            .env("ANTHROPIC_API_KEY", "sk-test")
            .env("ANTHROPIC_BASE_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "terminal answer");
    let last_assistant_ts = |records: Vec<SessionRecord>| {
        records
            .iter()
            .rev()
            .find_map(|r| match &r.body {
                RecordBody::Message { message, .. } if message.role == Role::Assistant => Some(r.ts.clone()),
                _ => None,
            })
            .unwrap()
    };
    let cli_user_ts = env
        .session("cli-main")
        .iter()
        .find_map(|r| match &r.body {
            RecordBody::Message { message, .. } if message.role == Role::User => Some(r.ts.clone()),
            _ => None,
        })
        .unwrap();
    let web_done = last_assistant_ts(env.session("web-main"));
    assert!(
        cli_user_ts >= web_done,
        "the terminal turn started ({cli_user_ts}) before the web turn ended ({web_done})"
    );
    assert_eq!(count(&env.session("cli-main"), "from the terminal"), (1, 1));
    drop(server);
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_received_by_one_process_cancels_the_turn_running_in_another() {
    let env = env().await;
    let worker = start_server(&env.data, &env.fake, "worker");
    let gateway = start_server(&env.data, &env.fake, "gateway");
    let deltas: Vec<String> = (0..20).map(|i| format!("chunk{i} ")).collect();
    let deltas: Vec<&str> = deltas.iter().map(String::as_str).collect();
    env.fake.push(Script::text_deltas(&deltas).with_chunk_delay(Duration::from_millis(300)));

    // The gateway process enqueues; the worker process runs the slow turn.
    let response = env.post_chat(&gateway, json!({"message": "tell me a long story", "request_id": "long"})).await;
    assert_eq!(response.status(), 200);
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.fake.requests().is_empty() {
        assert!(Instant::now() < deadline, "the worker never called the model");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // `stop` reaches the gateway, which runs no turn itself: it must record
    // the request in the store for the worker process to see.
    let started = Instant::now();
    let response = env.post_chat(&gateway, json!({"message": "stop", "request_id": "stop-1"})).await;
    let events = read_sse(response, None).await;
    assert_eq!(text(&events), "Stopping.");

    // The turn ends as stopped well before its 6 s of streaming would.
    let stopped = loop {
        let records = env.session("web-main");
        let done = records.iter().any(|r| matches!(&r.body, RecordBody::Meta { event, .. } if event == "stop"));
        if done {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the turn was not stopped: {records:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(stopped < Duration::from_secs(4), "stop took {stopped:?}");
    let answers = env.session("web-main").into_iter().filter(|r| {
        matches!(&r.body, RecordBody::Message { message, .. } if message.role == Role::Assistant && message.text().contains("chunk19"))
    });
    assert_eq!(answers.count(), 0, "the whole story was streamed despite stop");

    // Once the worker has released the lease, nothing runs: stop says so.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let response =
            env.post_chat(&gateway, json!({"message": "stop", "request_id": format!("again-{attempt}")})).await;
        if text(&read_sse(response, None).await) == "Nothing is running." {
            break;
        }
        assert!(attempt < 100, "the stopped turn's lease was never released");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop((worker, gateway));
}
