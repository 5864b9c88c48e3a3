//! `tinyfat chat` end to end: the real binary against the fake model server.

use std::path::Path;
use std::process::{Command, Output};

use tinyfat_testkit::{FakeModel, Script};

fn tinyfat(data: &Path, fake: &FakeModel, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tinyfat"))
        .args(args)
        .env("TINYFAT_DATA_DIR", data)
        .env("ANTHROPIC_API_KEY", "sk-platform-key")
        .env("ANTHROPIC_BASE_URL", fake.base_url())
        .env_remove("TINYFAT_LOG")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_streams_a_reply_and_shows_tool_calls() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeModel::start().await;
    let data = tmp.path();
    let out = tinyfat(data, &fake, &["agent", "create", "--owner", "ann@example.com", "--name", "helper"]);
    assert!(out.status.success());

    fake.push_all([
        Script::tool_call("t1", "bash", &["{\"command\":\"echo", " chat-test > /data/files/note.txt\"}"]),
        Script::text_deltas(&["I wrote ", "the note."]),
    ]);
    let out = tokio::task::spawn_blocking({
        let data = data.to_owned();
        let fake_url = fake.base_url();
        move || {
            Command::new(env!("CARGO_BIN_EXE_tinyfat"))
                .args(["chat", "helper", "-m", "write a note"])
                .env("TINYFAT_DATA_DIR", &data)
                .env("ANTHROPIC_API_KEY", "sk-platform-key")
                .env("ANTHROPIC_BASE_URL", fake_url)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "I wrote the note.");
    assert!(stderr.contains("⚙ bash: echo chat-test > /data/files/note.txt"), "{stderr}");
    let prefix = std::fs::read_dir(data.join("storage/agents")).unwrap().next().unwrap().unwrap().path();
    assert_eq!(std::fs::read_to_string(prefix.join("files/note.txt")).unwrap(), "chat-test\n");
    let session = std::fs::read_to_string(prefix.join("sessions/cli-main.jsonl")).unwrap();
    assert_eq!(session.lines().count(), 4, "user, tool_use, tool_result, answer");
    assert_eq!(fake.requests()[0].header("x-api-key"), Some("sk-platform-key"));

    // The agent's own key takes precedence over the platform's.
    let mut set = Command::new(env!("CARGO_BIN_EXE_tinyfat"))
        .args(["secret", "set", "helper", "anthropic_api_key"])
        .env("TINYFAT_DATA_DIR", data)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut set.stdin.take().unwrap(), b"sk-agent-key\n").unwrap();
    assert!(set.wait().unwrap().success());
    fake.push(Script::text("second"));
    let out = tokio::task::spawn_blocking({
        let data = data.to_owned();
        let url = fake.base_url();
        move || {
            Command::new(env!("CARGO_BIN_EXE_tinyfat"))
                .args(["chat", "helper", "-m", "again", "--session", "other", "--json"])
                .env("TINYFAT_DATA_DIR", &data)
                .env("ANTHROPIC_API_KEY", "sk-platform-key")
                .env("ANTHROPIC_BASE_URL", url)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((json["reply"].as_str(), json["session"].as_str()), (Some("second"), Some("cli-other")));
    assert_eq!(fake.requests().last().unwrap().header("x-api-key"), Some("sk-agent-key"));
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_reports_a_rejected_key_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = FakeModel::start().await;
    let data = tmp.path().to_owned();
    assert!(
        tinyfat(&data, &fake, &["agent", "create", "--owner", "ann@example.com", "--name", "keyless"]).status.success()
    );
    fake.push(Script::unauthorized());
    let url = fake.base_url();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_tinyfat"))
            .args(["chat", "keyless", "-m", "hi"])
            .env("TINYFAT_DATA_DIR", &data)
            .env("ANTHROPIC_API_KEY", "sk-wrong")
            .env("ANTHROPIC_BASE_URL", url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("tinyfat secret set NAME anthropic_api_key"), "{stderr}");
    assert!(!stderr.contains("sk-wrong"), "the key is never printed");
    assert_eq!(fake.requests().len(), 1, "a rejected key is not retried");
}
