//! `tinyfat token …` and `tinyfat dlq …` as a user drives them: the built
//! binary on a real data folder. Dead letters are made through the store
//! API (enqueue, claim, fail permanently) on the same SQLite file.
//! Exit codes: 0 ok, 1 user error, 2 usage error.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use tinyfat_core::{EmailAddress, SessionId};
use tinyfat_platform::Platform;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::provision::CreateAgent;
use tinyfat_store::{Failure, JobState, NewJob};

fn tinyfat(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tinyfat"))
        .args(args)
        .env("TINYFAT_DATA_DIR", data)
        .env_remove("TINYFAT_LOG")
        .output()
        .unwrap()
}

fn ok(data: &Path, args: &[&str]) -> String {
    let out = tinyfat(data, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn ok_json(data: &Path, args: &[&str]) -> Value {
    let stdout = ok(data, args);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: not one JSON document ({e}): {stdout}"))
}

fn fails(data: &Path, args: &[&str], code: i32, message: &str) {
    let out = tinyfat(data, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(stderr.contains(message), "{args:?}: expected {message:?} in {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: errors go to stderr only");
}

async fn open(data: &Path) -> Platform {
    Platform::open(Settings::load(&Sources { data_dir: Some(data.to_owned()), ..Sources::default() }).unwrap())
        .await
        .unwrap()
}

/// Creates agent `name` and `count` dead letters for it; returns their ids.
async fn dead_letters(data: &Path, owner: &str, name: &str, count: u32) -> Vec<String> {
    let p = open(data).await;
    let owner = EmailAddress::parse(owner).unwrap();
    let agent = p.create_agent(CreateAgent { owner, name: Some(name.into()), model: None }).await.unwrap();
    let mut ids = Vec::new();
    for n in 0..count {
        let now = p.now_ms();
        let job = NewJob {
            id: ulid::Ulid::new().to_string(),
            dedup_key: format!("test:{name}:{n}"),
            agent_id: agent.id.clone(),
            session: SessionId::parse("cli-main").unwrap(),
            kind: "message".into(),
            payload: serde_json::json!({"text": format!("message {n}")}).to_string(),
        };
        let id = p.store.enqueue(job, now).await.unwrap().job_id;
        let claim = p.store.claim_next("test", now, 60_000).await.unwrap().unwrap();
        p.store
            .fail(&claim.lease, &claim.job_ids(), Failure::Permanent, "model key rejected", now, &mut || 0.0)
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

async fn state(data: &Path, id: &str) -> Option<JobState> {
    open(data).await.store.get_job(id).await.unwrap().map(|j| j.state)
}

#[test]
fn tokens_are_printed_once_listed_without_secrets_and_revocable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();

    let out = tinyfat(data, &["token", "create", "--name", "laptop"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let token = stdout.lines().find(|l| l.starts_with("tft_")).expect("the token on its own line").to_owned();
    assert!(stdout.contains("operator"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("only time the token is shown"));

    let created = ok_json(data, &["token", "create", "--user", "ann@example.com", "--json"]);
    assert_eq!(created["user"], "ann@example.com");
    assert_eq!(created["name"], "ann@example.com");
    let ann_token = created["token"].as_str().unwrap().to_owned();
    assert!(ann_token.starts_with("tft_") && ann_token.len() == 47, "{ann_token}");
    let ann_id = created["id"].as_str().unwrap().to_owned();

    let listed = ok(data, &["token", "list", "--json"]);
    let tokens: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(tokens.as_array().unwrap().len(), 2);
    assert_eq!(tokens[0]["name"], "laptop");
    assert_eq!(tokens[0]["user"], Value::Null);
    assert_eq!(tokens[1]["user"], "ann@example.com");
    assert_eq!(tokens[1]["revoked_at"], Value::Null);
    let human = ok(data, &["token", "list"]);
    for text in [&listed, &human] {
        assert!(!text.contains(&token) && !text.contains(&ann_token), "a token was listed: {text}");
        assert!(!text.contains(&tinyfat_platform::tokens::hash_token(&ann_token)), "a hash was listed");
    }
    assert!(human.contains("laptop") && human.contains("(operator)"), "{human}");

    assert_eq!(ok_json(data, &["token", "revoke", &ann_id, "--json"])["revoked"], ann_id);
    let tokens = ok_json(data, &["token", "list", "--json"]);
    assert!(tokens[1]["revoked_at"].is_string());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let p = open(data).await;
        assert!(p.verify_token(&ann_token).await.unwrap().is_none(), "a revoked token still works");
        assert!(p.verify_token(&token).await.unwrap().unwrap().is_operator());
    });

    fails(data, &["token", "revoke", &ann_id], 1, "no live token");
    fails(data, &["token", "revoke", "tk_nope"], 1, "`tinyfat token list`");
    fails(data, &["token", "create", "--user", "not-an-email"], 1, "--user");
    fails(data, &["token", "create", "--name", ""], 1, "invalid token name");
    fails(data, &["token", "revoke"], 2, "ID");
}

#[test]
fn dead_letters_list_show_replay_purge() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    assert_eq!(ok(data, &["dlq", "list"]).trim(), "no dead letters");
    assert_eq!(ok_json(data, &["dlq", "list", "--json"]), serde_json::json!([]));
    let anns = rt.block_on(dead_letters(data, "ann@example.com", "annsagent", 2));
    let bobs = rt.block_on(dead_letters(data, "bob@example.com", "bobsagent", 3));

    let all = ok_json(data, &["dlq", "list", "--json"]);
    assert_eq!(all.as_array().unwrap().len(), 5);
    assert!(all[0].get("payload").is_none());
    assert_eq!(ok_json(data, &["dlq", "list", "--agent", "annsagent", "--json"]).as_array().unwrap().len(), 2);
    assert_eq!(ok_json(data, &["dlq", "list", "--limit", "1", "--json"]).as_array().unwrap().len(), 1);
    let human = ok(data, &["dlq", "list"]);
    assert!(human.contains("model key rejected") && human.contains("bobsagent"), "{human}");

    let shown = ok_json(data, &["dlq", "show", &anns[0], "--json"]);
    assert_eq!(shown["agent"], "annsagent");
    assert_eq!(shown["error"], "model key rejected");
    assert_eq!(shown["payload"]["text"], "message 0");
    assert!(ok(data, &["dlq", "show", &anns[0]]).contains("tinyfat dlq replay"));

    assert_eq!(
        ok_json(data, &["dlq", "replay", &anns[0], "--json"]),
        serde_json::json!({"id": anns[0], "replayed": 1})
    );
    assert_eq!(rt.block_on(state(data, &anns[0])), Some(JobState::Queued));
    fails(data, &["dlq", "show", &anns[0]], 1, "no dead letter");
    fails(data, &["dlq", "replay", &anns[0]], 1, "no dead letter");

    assert!(ok(data, &["dlq", "purge", &bobs[0]]).contains("purged"));
    assert_eq!(rt.block_on(state(data, &bobs[0])), None);
    fails(data, &["dlq", "purge", &bobs[0]], 1, "`tinyfat dlq list`");

    assert_eq!(ok_json(data, &["dlq", "replay", "--all", "--json"])["replayed"], 3);
    assert_eq!(rt.block_on(state(data, &bobs[2])), Some(JobState::Queued));
    assert_eq!(ok_json(data, &["dlq", "purge", "--all", "--json"])["purged"], 0);

    fails(data, &["dlq", "replay"], 2, "--all");
    fails(data, &["dlq", "purge"], 2, "--all");
    fails(data, &["dlq", "purge", &anns[1], "--all"], 2, "cannot be used with");
    fails(data, &["dlq", "list", "--limit", "0"], 2, "--limit");
    fails(data, &["dlq", "list", "--agent", "nosuchagent"], 1, "nosuchagent");
}
