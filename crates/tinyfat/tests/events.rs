//! Scheduled events end to end: the real `tinyfat serve` process and the
//! fake model. The agent writes an immediate event with its `write` tool and
//! then gets the `[EVENT:…]` message in a new turn; a one-shot survives a
//! `kill -9` of the server and fires exactly once after the restart.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tinyfat_testkit::{FakeModel, Script, TestProcess, free_port};

fn tinyfat(data: &Path, fake: &FakeModel, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tinyfat"))
        .args(args)
        .env("TINYFAT_DATA_DIR", data)
        .env("TINYFAT_SANDBOX_MODE", "none")
        .env("ANTHROPIC_API_KEY", "sk-platform-key")
        .env("ANTHROPIC_BASE_URL", fake.base_url())
        .env_remove("TINYFAT_LOG")
        .output()
        .unwrap()
}

fn ok_json(data: &Path, fake: &FakeModel, args: &[&str]) -> Value {
    let out = tinyfat(data, fake, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `tinyfat serve` with its log in a file the test reads.
struct Server {
    process: TestProcess,
    log: PathBuf,
}

fn start(data: &Path, fake: &FakeModel) -> Server {
    let port = free_port();
    let log = data.join(format!("serve-{port}.log"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_tinyfat"));
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("TINYFAT_DATA_DIR", data)
        .env("TINYFAT_SANDBOX_MODE", "none")
        .env("ANTHROPIC_API_KEY", "sk-platform-key")
        .env("ANTHROPIC_BASE_URL", fake.base_url())
        .env_remove("TINYFAT_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    Server { process: TestProcess::spawn_listening(&mut command, port), log }
}

impl Server {
    fn kill9(self) {
        self.process.kill9();
    }

    fn log(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut s));
        s
    }
}

/// The requests the fake model got whose last user message mentions `needle`.
fn requests_mentioning(fake: &FakeModel, needle: &str) -> usize {
    fake.requests().iter().filter(|r| r.body["messages"].to_string().contains(needle)).count()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_schedules_an_immediate_event_and_is_woken_by_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let fake = FakeModel::start().await;
    let agent = ok_json(data, &fake, &["agent", "create", "--owner", "ann@example.com", "--name", "waker", "--json"]);
    let token = ok_json(data, &fake, &["token", "create", "--json"])["token"].as_str().unwrap().to_owned();
    let server = start(data, &fake);

    let content = json!({"type": "immediate", "text": "check the mail"}).to_string();
    let input = json!({"path": "/data/events/ping/event.json", "content": content}).to_string();
    fake.push_all([
        Script::tool_call("t1", "write", &[&input]),
        Script::text("Scheduled."),
        Script::text("Woken by the event."),
    ]);
    let url = server.process.url(&format!("/api/agents/{}/chat", agent["id"].as_str().unwrap()));
    let body = reqwest::Client::new()
        .post(url)
        .bearer_auth(&token)
        .json(&json!({"message": "wake yourself up", "session": "web-main"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("Scheduled."), "{body}");

    wait_for("the event turn", || requests_mentioning(&fake, "[EVENT:ping:immediate:now] check the mail") > 0).await;
    let prefix = data.join("storage/agents").join(agent["id"].as_str().unwrap());
    wait_for("history.jsonl", || prefix.join("events/ping/history.jsonl").exists()).await;
    let event: Value =
        serde_json::from_str(&std::fs::read_to_string(prefix.join("events/ping/event.json")).unwrap()).unwrap();
    assert_eq!(event["status"], "done");
    let history = std::fs::read_to_string(prefix.join("events/ping/history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 1, "{history}");
    assert!(history.contains("\"outcome\":\"fired\""), "{history}");
    wait_for("the events session", || prefix.join("sessions/events.jsonl").exists()).await;

    let manifest = ok_json(data, &fake, &["events", "waker", "--json"]);
    assert_eq!(
        manifest,
        json!({"next_wake": null, "events": [{"name": "ping", "type": "immediate", "next_fire": null, "status": "done"}]})
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(requests_mentioning(&fake, "[EVENT:ping"), 1, "fired once; log:\n{}", server.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_shot_survives_kill_9_and_fires_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let fake = FakeModel::start().await;
    let agent = ok_json(data, &fake, &["agent", "create", "--owner", "ann@example.com", "--name", "sleeper", "--json"]);
    let prefix = data.join("storage/agents").join(agent["id"].as_str().unwrap());
    let server = start(data, &fake);

    let at = (chrono::Utc::now() + chrono::TimeDelta::seconds(4)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    std::fs::create_dir_all(prefix.join("events/later")).unwrap();
    let file = json!({"type": "one-shot", "at": at, "text": "stand up"}).to_string();
    std::fs::write(prefix.join("events/later/event.json"), file).unwrap();
    // `tinyfat events` reads the files and records the timer.
    let manifest = ok_json(data, &fake, &["events", "sleeper", "--json"]);
    assert_eq!(manifest["events"][0]["type"], "one-shot");
    server.kill9();

    // Down past the due time (well within scheduler.late_grace).
    tokio::time::sleep(Duration::from_secs(5)).await;
    fake.push_all([Script::text("Standing up."), Script::text("unexpected second turn")]);
    let server = start(data, &fake);
    let tag = format!("[EVENT:later:one-shot:{at}] stand up");
    wait_for("the one-shot's turn", || requests_mentioning(&fake, &tag) > 0).await;
    wait_for("the done marker", || {
        std::fs::read_to_string(prefix.join("events/later/event.json")).unwrap().contains("done")
    })
    .await;
    // A second restart does not fire it again.
    server.kill9();
    let server = start(data, &fake);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(requests_mentioning(&fake, "[EVENT:later"), 1, "log:\n{}", server.log());
    let history = std::fs::read_to_string(prefix.join("events/later/history.jsonl")).unwrap();
    assert_eq!(history.lines().count(), 1, "{history}");
}
