//! `tinyfat serve` as a real process sending email replies over SMTP to an
//! independent server (aiosmtpd, `tinyfat_testkit::SmtpPeer`),
//! killed with `kill -9` while the server holds its 250: the documented
//! outcome is at-least-once — after the restart the reply is resent with the
//! same Message-ID `<{delivery_id}@{email.domain}>`, marked sent, and filed in
//! `outbox/sent/` by the agent's next run. The server's logs (at trace level)
//! never contain the SMTP password. Also, with the same server: a `stop`
//! arriving through Resend's webhook while a turn streams stops that turn
//! without waiting behind it (SPEC §6), and is answered once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tinyfat_channels::email::svix;
use tinyfat_testkit::{FakeModel, FakeResend, Script, SmtpPeer, TestProcess, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_tinyfat");
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const PASSWORD: &str = "pw-Rr5-serve-never-logs-77";
const DOMAIN: &str = "agents.test";

/// `tinyfat serve` with SMTP sending to the test's peer.
struct Server(TestProcess);

impl Server {
    fn start(data: &Path, fake: &FakeModel, resend: &FakeResend, peer: &SmtpPeer, log: &Path) -> Server {
        let port = free_port();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("TINYFAT_DATA_DIR", data)
            .env("ANTHROPIC_API_KEY", "sk-test")
            .env("ANTHROPIC_BASE_URL", fake.base_url())
            .env("TINYFAT_SANDBOX_MODE", "none")
            .env("TINYFAT_EMAIL_DOMAIN", DOMAIN)
            .env("TINYFAT_EMAIL_REQUIRE_AUTH", "false")
            .env("TINYFAT_EMAIL_RESEND_BASE_URL", resend.url())
            .env("RESEND_API_KEY", "re_test_key")
            .env("RESEND_WEBHOOK_SECRET", SECRET)
            .env("TINYFAT_EMAIL_PROVIDER", "smtp")
            .env("TINYFAT_EMAIL_SMTP_HOST", "127.0.0.1")
            .env("TINYFAT_EMAIL_SMTP_PORT", peer.port.to_string())
            .env("TINYFAT_EMAIL_SMTP_TLS", "none")
            .env("TINYFAT_EMAIL_SMTP_USERNAME", "out")
            .env("SMTP_PASSWORD", PASSWORD)
            .env("TINYFAT_LOG", "trace")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        Server(TestProcess::spawn_listening(&mut command, port))
    }

    async fn webhook(&self, svix_id: &str, body: &Value) {
        let body = body.to_string();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let signature = svix::sign(&svix::WebhookSecret::parse(SECRET).unwrap(), svix_id, now, body.as_bytes());
        let status = reqwest::Client::new()
            .post(self.0.url("/webhooks/resend"))
            .header("svix-id", svix_id)
            .header("svix-timestamp", now.to_string())
            .header("svix-signature", signature)
            .body(body)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200);
    }

    fn kill9(self) {
        self.0.kill9();
    }
}

fn cli(data: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN)
        .args(args)
        .arg("--json")
        .env("TINYFAT_DATA_DIR", data)
        .env("TINYFAT_EMAIL_DOMAIN", DOMAIN)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn header(raw: &str, name: &str) -> Option<String> {
    let head = raw.split("\r\n\r\n").next().unwrap_or(raw).replace("\r\n ", " ").replace("\r\n\t", " ");
    let prefix = format!("{}:", name.to_ascii_lowercase());
    head.split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].trim().to_owned())
}

fn inbound(resend: &FakeResend, agent_email: &str, id: &str, message_id: &str) -> Value {
    inbound_text(resend, agent_email, id, message_id, "How are the numbers?\n")
}

/// A received email with `text` served by the fake Resend, and the webhook
/// body that announces it.
fn inbound_text(resend: &FakeResend, agent_email: &str, id: &str, message_id: &str, text: &str) -> Value {
    resend.add_received(json!({
        "object": "email", "id": id, "to": [agent_email], "from": "Ann <ann@example.com>",
        "created_at": "2026-07-01T12:00:00.000000+00:00", "subject": "Numbers",
        "text": text, "html": null, "message_id": message_id,
        "headers": {}, "attachments": []
    }));
    json!({
        "type": "email.received", "created_at": "2026-07-01T12:00:01.000Z",
        "data": {"email_id": id, "created_at": "2026-07-01T12:00:00.000Z", "from": "Ann <ann@example.com>",
                 "to": [agent_email], "cc": [], "subject": "Numbers", "message_id": message_id, "attachments": []}
    })
}

fn sent_files(data: &Path, agent_id: &str) -> Vec<PathBuf> {
    let dir = data.join("storage/agents").join(agent_id).join("outbox/sent");
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_while_the_smtp_server_holds_its_250_resends_with_the_same_message_id() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("serve.log");
    let fake = FakeModel::start().await;
    let resend = FakeResend::start().await;
    let peer = SmtpPeer::start("out", PASSWORD);
    let agent = cli(&data, &["agent", "create", "--owner", "ann@example.com", "--name", "mailer"]);
    let (agent_id, agent_email) = (agent["id"].as_str().unwrap(), agent["email"].as_str().unwrap());
    assert!(agent_email.ends_with(&format!("@{DOMAIN}")), "{agent_email}");

    // The first reply's SMTP transaction: stored by the server, the 250 held.
    peer.reply_with(&["hold 30"]);
    fake.push(Script::text("The numbers are fine."));
    let server = Server::start(&data, &fake, &resend, &peer, &log);
    server.webhook("msg_1", &inbound(&resend, agent_email, "em_1", "<q1@example.com>")).await;
    let first = peer.wait_for(1, Duration::from_secs(60));
    server.kill9();

    // Restarted: the row is still `sending`; once its claim is stale (60 s)
    // the reply goes out again with the same Message-ID.
    let server = Server::start(&data, &fake, &resend, &peer, &log);
    let messages = peer.wait_for(2, Duration::from_secs(150));
    let id = header(&first[0].0, "Message-ID").expect("a Message-ID");
    assert_eq!(header(&messages[1].0, "Message-ID"), Some(id.clone()), "resent with the same Message-ID");
    assert!(id.ends_with(&format!("@{DOMAIN}>")), "{id}");
    assert_eq!(header(&messages[1].0, "In-Reply-To").as_deref(), Some("<q1@example.com>"));
    assert!(messages[1].0.contains("The numbers are fine."));
    assert_eq!(fake.requests().len(), 1, "the turn was not run again");

    // The agent's next run (a second mail) files the first reply, sent by
    // the delivery loop, and sends and files its own reply inline.
    fake.push(Script::text("Second answer."));
    server.webhook("msg_2", &inbound(&resend, agent_email, "em_2", "<q2@example.com>")).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent_files(&data, agent_id).len() < 2 {
        assert!(Instant::now() < deadline, "replies filed: {:?}", sent_files(&data, agent_id));
        std::thread::sleep(Duration::from_millis(100));
    }
    let messages = peer.messages();
    assert_eq!(messages.len(), 3, "the first reply twice (at-least-once), the second once");
    let filed: Vec<Value> = sent_files(&data, agent_id)
        .iter()
        .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
        .collect();
    assert!(
        filed.iter().any(|f| f["provider_message_id"] == id && f["in_reply_to"] == "<q1@example.com>"),
        "{filed:?}"
    );
    assert!(filed.iter().all(|f| f["status"] == "sent" && f["to"] == json!(["ann@example.com"])), "{filed:?}");
    drop(server);

    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("email: sending via SMTP 127.0.0.1"), "the startup line names the SMTP server");
    assert!(!log.contains(PASSWORD), "the SMTP password reached the server's log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_through_the_resend_webhook_stops_the_running_turn_and_is_answered_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let fake = FakeModel::start().await;
    let resend = FakeResend::start().await;
    let peer = SmtpPeer::start("out", PASSWORD);
    let agent = cli(&data, &["agent", "create", "--owner", "ann@example.com", "--name", "stopper"]);
    let (agent_id, agent_email) = (agent["id"].as_str().unwrap(), agent["email"].as_str().unwrap());
    let deltas: Vec<String> = (0..20).map(|i| format!("chunk{i} ")).collect();
    let deltas: Vec<&str> = deltas.iter().map(String::as_str).collect();
    fake.push(Script::text_deltas(&deltas).with_chunk_delay(Duration::from_millis(300)));
    let server = Server::start(&data, &fake, &resend, &peer, &tmp.path().join("serve.log"));

    let story = inbound_text(&resend, agent_email, "em_story", "<story@example.com>", "Tell me a long story.\n");
    server.webhook("msg_story", &story).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.requests().is_empty() {
        assert!(Instant::now() < deadline, "the turn never called the model");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The stop's job would be claimed only after the 6 s turn (it needs the
    // agent's lease); the body is fetched right after the ack instead.
    let stop = "Stop\n\nOn Wed, Ann wrote:\n> Tell me a long story.\n";
    let sent_at = Instant::now();
    server.webhook("msg_stop", &inbound_text(&resend, agent_email, "em_stop", "<stop@example.com>", stop)).await;
    let replies = peer.wait_for(1, Duration::from_secs(30));
    let stopped_after = sent_at.elapsed();
    assert!(replies[0].0.contains("Stopped."), "the story's thread is told it stopped: {}", replies[0].0);
    assert!(!replies[0].0.contains("chunk19"), "{}", replies[0].0);
    assert_eq!(header(&replies[0].0, "In-Reply-To").as_deref(), Some("<story@example.com>"));
    assert!(stopped_after < Duration::from_secs(4), "stop took {stopped_after:?}");

    // The stop mail's own job runs after the turn and answers nothing more.
    let store = tinyfat_store::connect(&format!("sqlite://{}", data.join("tinyfat.db").display())).await.unwrap();
    let agent_id = tinyfat_core::AgentId::parse(agent_id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = store.jobs_for(&agent_id, 100).await.unwrap();
        let emails: Vec<_> = jobs.iter().filter(|j| j.kind == "email").collect();
        if emails.len() == 2 && emails.iter().all(|j| j.state == tinyfat_store::JobState::Done) {
            break;
        }
        assert!(Instant::now() < deadline, "the email jobs did not finish: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(peer.messages().len(), 1, "one answer in all (no \"Nothing is running.\")");
    assert_eq!(fake.requests().len(), 1, "the stop mail started no turn");
}
