//! The email channel end to end against a fake Resend (`tinyfat_testkit::
//! FakeResend`) with a real platform on a temporary data folder: the Resend
//! webhook (signature checked before parsing, 401 and nothing enqueued on a
//! bad one, one job per svix-id), the `email` job (fetch, sender check,
//! forwarding into the thread session, Message-ID dedup, loops), replies
//! threaded through the delivery table, and the outbox (claim, send once
//! with `Idempotency-Key`, file in `sent/`, crash between send and move,
//! refused recipients, 429 with `retry-after`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tinyfat_channels::email::svix;
use tinyfat_core::{EmailAddress, SenderPattern, SessionId};
use tinyfat_platform::Platform;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::email;
use tinyfat_platform::provision::CreateAgent;
use tinyfat_platform::state::AppState;
use tinyfat_storage::validate_path;
use tinyfat_store::{Agent, DeliveryState, Job, JobState, Lease, NewDelivery, NewJob};
use tinyfat_testkit::FakeResend;

use common::OWNER;

struct Env {
    state: AppState,
    platform: Arc<Platform>,
    resend: FakeResend,
    base: String,
    agent: Agent,
    http: reqwest::Client,
    held: std::sync::Mutex<Option<Lease>>,
    _dir: tempfile::TempDir,
}

fn settings(dir: &Path, resend: &FakeResend, extra: &[(&str, &str)]) -> Settings {
    let mut env: Vec<(String, String)> = [
        ("TINYFAT_SANDBOX_MODE", "none".to_owned()),
        ("TINYFAT_EMAIL_RESEND_BASE_URL", resend.url()),
        ("TINYFAT_EMAIL_RESEND_API_KEY", "re_test_key".to_owned()),
        ("TINYFAT_EMAIL_RESEND_WEBHOOK_SECRET", common::RESEND_SECRET.to_owned()),
        // The fake serves no raw message (raw URLs must be https), so DKIM
        // cannot be evaluated here.
        ("TINYFAT_EMAIL_REQUIRE_AUTH", "false".to_owned()),
        ("TINYFAT_EMAIL_DOMAIN", "agents.test".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let env = env.into_iter().collect();
    Settings::load(&Sources { data_dir: Some(dir.to_owned()), env, ..Sources::default() }).unwrap()
}

async fn start() -> Env {
    start_with(&[]).await
}

async fn start_with(extra: &[(&str, &str)]) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let resend = FakeResend::start().await;
    let platform = Arc::new(Platform::open(settings(dir.path(), &resend, extra)).await.unwrap());
    let state = AppState::new(platform.clone());
    let app = email::routes().with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let agent = common::agent(&platform).await;
    Env { state, platform, resend, base, agent, http: reqwest::Client::new(), held: Default::default(), _dir: dir }
}

fn webhook_body(agent: &Agent, email_id: &str, message_id: &str) -> String {
    json!({
        "type": "email.received",
        "created_at": "2026-07-01T12:00:01.000Z",
        "data": {
            "email_id": email_id,
            "created_at": "2026-07-01T12:00:00.000Z",
            "from": "Alice <alice@example.com>",
            "to": [agent.email.to_string()],
            "cc": [],
            "subject": "Hello",
            "message_id": message_id,
            "attachments": []
        }
    })
    .to_string()
}

impl Env {
    async fn post_webhook(&self, svix_id: &str, body: &str, signature: Option<String>) -> reqwest::StatusCode {
        let now = self.platform.now_ms() / 1000;
        common::post_resend_webhook(&self.http, &self.base, svix_id, now, body, signature).await
    }

    async fn jobs(&self) -> Vec<Job> {
        self.platform.store.jobs_for(&self.agent.id, 100).await.unwrap()
    }

    /// The agent's lease, as a worker holds it while it runs a turn.
    async fn lease(&self) -> Lease {
        if let Some(lease) = self.held.lock().unwrap().clone() {
            return lease;
        }
        let job = NewJob {
            id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
            dedup_key: format!("test:{}", ulid::Ulid::new()),
            agent_id: self.agent.id.clone(),
            session: SessionId::parse("cli-main").unwrap(),
            kind: "message".into(),
            payload: "{}".into(),
        };
        self.platform.store.enqueue(job, self.platform.now_ms()).await.unwrap();
        let lease = self.claim().await.lease;
        *self.held.lock().unwrap() = Some(lease.clone());
        lease
    }

    /// Claims the agent's due jobs like a worker does.
    async fn claim(&self) -> tinyfat_store::Claim {
        let now = self.platform.now_ms();
        self.platform.store.claim_next("test-worker", now, 30_000).await.unwrap().expect("a claimable job")
    }

    fn write(&self, path: &str, bytes: &[u8]) {
        let dir = tinyfat_storage::AgentDir::open(&self.prefix()).unwrap();
        dir.write_atomic(&validate_path(path).unwrap(), bytes).unwrap();
    }

    fn read(&self, path: &str) -> Option<Vec<u8>> {
        let dir = tinyfat_storage::AgentDir::open(&self.prefix()).unwrap();
        dir.read(&validate_path(path).unwrap(), 1 << 20).ok()
    }

    fn list(&self, path: &str) -> Vec<String> {
        let dir = tinyfat_storage::AgentDir::open(&self.prefix()).unwrap();
        let mut names: Vec<String> =
            dir.list(&validate_path(path).unwrap()).unwrap_or_default().into_iter().map(|e| e.name).collect();
        names.sort();
        names
    }

    fn prefix(&self) -> std::path::PathBuf {
        self._dir.path().join("storage").join("agents").join(self.agent.id.to_string())
    }
}

#[tokio::test]
async fn a_bad_or_missing_signature_is_401_and_enqueues_nothing() {
    let env = start().await;
    let body = webhook_body(&env.agent, "em_1", "<m1@example.com>");
    let wrong =
        svix::sign(&svix::WebhookSecret::from_key(b"another key entirely, 32 bytes!").unwrap(), "msg_1", 0, b"x");
    assert_eq!(env.post_webhook("msg_1", &body, Some(wrong)).await, 401);
    assert_eq!(env.post_webhook("msg_1", &body, Some(String::new())).await, 401);
    // A valid signature over another body.
    let other = svix::sign(
        &svix::WebhookSecret::parse(common::RESEND_SECRET).unwrap(),
        "msg_1",
        env.platform.now_ms() / 1000,
        b"{}",
    );
    assert_eq!(env.post_webhook("msg_1", &body, Some(other)).await, 401);
    // Garbage is refused by the signature check before anyone parses it.
    assert_eq!(env.post_webhook("msg_1", "not json", Some("v1,AAAA".into())).await, 401);
    assert!(env.jobs().await.is_empty());
}

#[tokio::test]
async fn a_good_webhook_enqueues_one_job_and_a_repeat_nothing_more() {
    let env = start().await;
    let body = webhook_body(&env.agent, "em_1", "<m1@example.com>");
    assert_eq!(env.post_webhook("msg_good", &body, None).await, 200);
    let jobs = env.jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].kind, "email");
    assert_eq!(jobs[0].dedup_key, "resend:msg_good");
    let payload: Value = serde_json::from_str(&jobs[0].payload).unwrap();
    assert_eq!(payload["email_id"], "em_1");
    assert_eq!(payload["svix_id"], "msg_good");

    assert_eq!(env.post_webhook("msg_good", &body, None).await, 200);
    assert_eq!(env.jobs().await.len(), 1);

    // Other event types and unknown recipients are acknowledged and dropped.
    let sent = json!({"type": "email.sent", "data": {"email_id": "x"}}).to_string();
    assert_eq!(env.post_webhook("msg_sent", &sent, None).await, 200);
    let stranger = body.replace(&env.agent.email.to_string(), "nobody@agents.test");
    assert_eq!(env.post_webhook("msg_stranger", &stranger, None).await, 200);
    assert_eq!(env.jobs().await.len(), 1);
}

fn received_json(agent: &Agent, id: &str, from: &str, message_id: &str, headers: Value) -> Value {
    json!({
        "object": "email",
        "id": id,
        "to": [agent.email.to_string()],
        "from": from,
        "created_at": "2026-07-01T12:00:00.000000+00:00",
        "subject": "Hello",
        "text": "Hi agent, what's up?\n",
        "html": null,
        "message_id": message_id,
        "headers": headers,
        "attachments": []
    })
}

#[tokio::test]
async fn a_webhook_becomes_a_message_job_in_the_thread_session_and_the_reply_threads() {
    let env = start().await;
    env.resend.add_received(received_json(
        &env.agent,
        "em_2",
        "Alice <alice@example.com>",
        "<m2@example.com>",
        json!({"References": "<root@example.com> <m1@example.com>", "In-Reply-To": "<m1@example.com>"}),
    ));
    let body = webhook_body(&env.agent, "em_2", "<m2@example.com>");
    assert_eq!(env.post_webhook("msg_e2e", &body, None).await, 200);

    let claim = env.claim().await;
    assert_eq!(claim.jobs.len(), 1);
    let job = &claim.jobs[0];
    assert!(matches!(email::prepare_email_job(&env.state, &env.agent, job).await, Ok(None)));
    let fetch = env.resend.requests();
    assert_eq!(fetch.len(), 1);
    assert_eq!(fetch[0].path, "/emails/receiving/em_2");
    assert_eq!(fetch[0].header("authorization"), Some("Bearer re_test_key"));
    env.platform.store.complete(&claim.lease, &claim.job_ids(), env.platform.now_ms()).await.unwrap();

    // Forwarded: a message job in the thread root's session, deduplicated by Message-ID.
    let jobs = env.jobs().await;
    let message = jobs.iter().find(|j| j.kind == "message").expect("a message job");
    let root = tinyfat_channels::email::inbound::session_id_for_root("<root@example.com>");
    assert_eq!(message.session, root);
    assert_eq!(message.dedup_key, format!("email:{}:m2@example.com", env.agent.id));
    let payload: tinyfat_platform::inbound::MessageJob = serde_json::from_str(&message.payload).unwrap();
    assert!(payload.message.text.contains("Hi agent"), "{}", payload.message.text);
    assert_eq!(payload.message.sender, OWNER);
    let conversation = payload.conversation.unwrap();
    assert_eq!((conversation.channel.as_str(), conversation.to.as_deref()), ("email", Some(OWNER)));

    // Running the same email job again (a retry) adds nothing.
    assert!(matches!(email::prepare_email_job(&env.state, &env.agent, job).await, Ok(None)));
    assert_eq!(env.jobs().await.iter().filter(|j| j.kind == "message").count(), 1);

    // The reply (as the worker records it) threads under the inbound mail.
    let delivery = NewDelivery {
        id: "01JZ0000000000000000000001".into(),
        idempotency_key: format!("reply:{}", message.id),
        agent_id: env.agent.id.clone(),
        job_id: Some(message.id.clone()),
        channel: "email".into(),
        target: json!({"channel": "email", "to": OWNER}).to_string(),
        body: json!({"text": "All **good**.", "attachments": []}).to_string(),
        by_stream: false,
    };
    let row = env.platform.store.insert_delivery(&delivery, env.platform.now_ms()).await.unwrap().delivery;
    let provider_id = email::send(&env.state, &row).await.unwrap().unwrap();
    assert!(!provider_id.is_empty());
    let sent = env.resend.send_requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("idempotency-key"), Some(format!("{}:{}", env.agent.id, row.id).as_str()));
    let mail = &sent[0].body;
    assert_eq!(mail["to"], json!([OWNER]));
    assert_eq!(mail["subject"], "Re: Hello");
    assert!(mail["from"].as_str().unwrap().contains("swiftpebble@agents.test"), "{}", mail["from"]);
    assert_eq!(mail["headers"]["In-Reply-To"], "<m2@example.com>");
    assert_eq!(mail["headers"]["References"], "<root@example.com> <m1@example.com> <m2@example.com>");
    assert!(mail["text"].as_str().unwrap().contains("> Hi agent"), "{}", mail["text"]);
}

#[tokio::test]
async fn strangers_and_loops_are_dropped_in_the_job() {
    let env = start().await;
    for (id, from, headers) in [
        ("em_s", "Mallory <mallory@example.com>", json!({})),
        ("em_a", "Alice <alice@example.com>", json!({"Auto-Submitted": "auto-replied"})),
        ("em_l", "Other <otheragent@agents.test>", json!({})),
        ("em_n", "No Reply <noreply@agents.test>", json!({})),
        ("em_c", "Colleague <colleague@agents.test>", json!({})),
    ] {
        env.resend.add_received(received_json(&env.agent, id, from, &format!("<{id}@example.com>"), headers));
        let body = webhook_body(&env.agent, id, &format!("<{id}@example.com>"));
        assert_eq!(env.post_webhook(&format!("msg_{id}"), &body, None).await, 200);
    }
    env.platform.store.add_sender(&env.agent.id, &SenderPattern::parse("@agents.test").unwrap(), 0).await.unwrap();
    env.platform
        .create_agent(CreateAgent {
            owner: EmailAddress::parse("bob@example.com").unwrap(),
            name: Some("otheragent".into()),
            model: None,
        })
        .await
        .unwrap();
    loop {
        let Some(claim) = env.platform.store.claim_next("w", env.platform.now_ms(), 30_000).await.unwrap() else {
            break;
        };
        for job in claim.jobs.iter().filter(|j| j.kind == "email") {
            assert!(matches!(email::prepare_email_job(&env.state, &env.agent, job).await, Ok(None)));
        }
        env.platform.store.complete(&claim.lease, &claim.job_ids(), env.platform.now_ms()).await.unwrap();
    }
    assert_eq!(env.resend.requests().len(), 5);
    let jobs = env.jobs().await;
    assert!(jobs.iter().all(|j| j.state == JobState::Done));
    // Only the colleague (same domain as the agents, but a person) gets through.
    let messages: Vec<&Job> = jobs.iter().filter(|j| j.kind == "message").collect();
    assert_eq!(messages.len(), 1);
    assert!(messages[0].payload.contains("colleague@agents.test"), "{}", messages[0].payload);
}

const OUTBOX_FILE: &str =
    r#"{"to":["alice@example.com"],"subject":"Report","body":"Here it is.","attachments":[{"path":"reports/q3.txt"}]}"#;

#[tokio::test]
async fn an_outbox_file_is_sent_once_with_its_idempotency_key_and_filed_in_sent() {
    let env = start().await;
    env.write("reports/q3.txt", b"numbers");
    env.write("outbox/email/report.json", OUTBOX_FILE.as_bytes());
    email::process_outbox(&env.state, &env.agent, &env.lease().await).await;

    let sends = env.resend.send_requests();
    assert_eq!(sends.len(), 1);
    assert!(env.list("outbox/email").is_empty());
    assert!(env.list("outbox/sending").is_empty());
    let sent = env.list("outbox/sent");
    assert_eq!(sent.len(), 1);
    let delivery_id = sent[0].strip_suffix(".json").unwrap();
    assert_eq!(sends[0].header("idempotency-key"), Some(format!("{}:{delivery_id}", env.agent.id).as_str()));
    assert_eq!(sends[0].body["subject"], "Report");
    assert_eq!(sends[0].body["attachments"][0]["filename"], "q3.txt");
    let filed: Value = serde_json::from_slice(&env.read(&format!("outbox/sent/{}", sent[0])).unwrap()).unwrap();
    assert_eq!(filed["status"], "sent");
    let row = env.platform.store.get_delivery(delivery_id).await.unwrap().unwrap();
    assert_eq!(row.state, DeliveryState::Sent);
    assert_eq!(filed["provider_message_id"].as_str(), row.provider_message_id.as_deref());
    assert!(row.provider_message_id.as_deref().is_some_and(|id| !id.is_empty()));
    assert_eq!(row.idempotency_key, format!("outbox:{delivery_id}"));

    // A second run sends nothing more.
    email::process_outbox(&env.state, &env.agent, &env.lease().await).await;
    assert_eq!(env.resend.send_requests().len(), 1);
}

#[tokio::test]
async fn a_crash_between_send_and_move_resends_with_the_same_key() {
    let env = start().await;
    let lease = env.lease().await;
    env.write("reports/q3.txt", b"numbers");

    // Resend accepted the email but the answer never arrived (as if the
    // worker died after the POST): the file stays in sending/.
    env.write("outbox/email/report.json", OUTBOX_FILE.as_bytes());
    env.resend.accept_then_fail_next_send(503, "internal_server_error", Some(3600));
    email::process_outbox(&env.state, &env.agent, &lease).await;
    assert_eq!(env.resend.emails().len(), 1);
    let sending = env.list("outbox/sending");
    assert_eq!(sending.len(), 1);
    assert!(env.list("outbox/sent").is_empty());

    // While deferred by the retry-after, a run leaves it alone.
    email::process_outbox(&env.state, &env.agent, &lease).await;
    assert_eq!(env.resend.send_requests().len(), 1);
    // A sender that claimed the row and died leaves it `sending`.
    let delivery_id = sending[0].strip_suffix(".json").unwrap();
    let later = env.platform.now_ms() + 3_600_001;
    assert!(env.platform.store.mark_delivery_sending(delivery_id, later, 60_000).await.unwrap());

    // The next run resends it under the same delivery id: same key, one email.
    email::process_outbox(&env.state, &env.agent, &lease).await;
    let sends = env.resend.send_requests();
    assert_eq!(sends.len(), 2);
    assert_eq!(sends[1].header("idempotency-key"), sends[0].header("idempotency-key"));
    assert_eq!(sends[0].header("idempotency-key"), Some(format!("{}:{delivery_id}", env.agent.id).as_str()));
    assert_eq!(env.resend.emails().len(), 1, "Resend deduplicates by Idempotency-Key");
    assert_eq!(env.list("outbox/sent"), sending);
    assert!(env.list("outbox/sending").is_empty());

    // Crash after the row was marked sent, before the move: filed, not resent.
    let name = sending[0].clone();
    env.write(&format!("outbox/sending/{name}"), OUTBOX_FILE.as_bytes());
    let dir = tinyfat_storage::AgentDir::open(&env.prefix()).unwrap();
    dir.remove_file(&validate_path(&format!("outbox/sent/{name}")).unwrap()).unwrap();
    email::process_outbox(&env.state, &env.agent, &lease).await;
    assert_eq!(env.resend.send_requests().len(), 2);
    assert_eq!(env.list("outbox/sent"), vec![name]);
    assert!(env.list("outbox/sending").is_empty());
}

#[tokio::test]
async fn a_429_is_honoured_and_refused_recipients_fail_the_file() {
    let env = start().await;
    env.write("reports/q3.txt", b"numbers");
    env.write("outbox/email/report.json", OUTBOX_FILE.as_bytes());
    env.write("outbox/email/stranger.json", br#"{"to":["mallory@example.com"],"subject":"Hi","body":"x"}"#);
    env.resend.fail_next_send(429, "rate_limit_exceeded", Some(1));
    email::process_outbox(&env.state, &env.agent, &env.lease().await).await;

    let sends = env.resend.send_requests();
    assert_eq!(sends.len(), 2, "one 429, then the send; the stranger is never sent");
    assert!(sends[1].at.duration_since(sends[0].at) >= Duration::from_millis(950));
    assert_eq!(sends[0].header("idempotency-key"), sends[1].header("idempotency-key"));
    assert_eq!(env.list("outbox/sent").len(), 1);
    let failed = env.list("outbox/failed");
    assert_eq!(failed.len(), 1);
    let filed: Value = serde_json::from_slice(&env.read(&format!("outbox/failed/{}", failed[0])).unwrap()).unwrap();
    assert_eq!(filed["status"], "failed");
    assert!(filed["error"].as_str().unwrap().contains("mallory@example.com"), "{filed}");
}

#[tokio::test]
async fn the_served_router_takes_webhooks_over_the_general_body_limit() {
    let env = start().await;
    let app =
        tinyfat_platform::serve::router(env.state.clone(), Arc::new(tinyfat_platform::serve::Readiness::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // 2 MiB: over gateway.body_bytes_max (1 MiB), under the email cap (25 MiB).
    let mut body: Value = serde_json::from_str(&webhook_body(&env.agent, "em_big", "<big@example.com>")).unwrap();
    body["data"]["padding"] = Value::String("x".repeat(2 << 20));
    let body = body.to_string();
    let now = env.platform.now_ms() / 1000;
    let status = common::post_resend_webhook(&env.http, &base, "msg_big", now, &body, None).await;
    assert_eq!(status, 200);
    assert_eq!(env.jobs().await.len(), 1);
}

#[tokio::test]
async fn stop_and_status_by_email_are_answered_without_a_turn() {
    let env = start().await;
    let mut received = received_json(&env.agent, "em_stop", "alice@example.com", "<stop@example.com>", json!({}));
    received["text"] = json!("stop\n\nOn Monday someone wrote:\n> earlier\n");
    env.resend.add_received(received);
    let body = webhook_body(&env.agent, "em_stop", "<stop@example.com>");
    assert_eq!(env.post_webhook("msg_stop", &body, None).await, 200);
    let claim = env.claim().await;
    assert!(matches!(email::prepare_email_job(&env.state, &env.agent, &claim.jobs[0]).await, Ok(None)));
    assert!(env.jobs().await.iter().all(|j| j.kind == "email"), "no message job");
    let deliveries = env.platform.store.deliveries_for(&env.agent.id, 10).await.unwrap();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].idempotency_key, format!("reply:{}", claim.jobs[0].id));
    assert!(deliveries[0].body.contains("Nothing is running."), "{}", deliveries[0].body);
    // The answer threads under the stop mail.
    email::send(&env.state, &deliveries[0]).await.unwrap();
    let sent = env.resend.send_requests();
    assert_eq!(sent[0].body["headers"]["In-Reply-To"], "<stop@example.com>");
}

#[tokio::test]
async fn outbox_attachments_that_are_links_are_refused_and_the_daily_limit_holds() {
    let env = start().await;
    let lease = env.lease().await;
    std::fs::create_dir_all(env.prefix().join("reports")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", env.prefix().join("reports/q3.txt")).unwrap();
    env.write("outbox/email/report.json", OUTBOX_FILE.as_bytes());
    email::process_outbox(&env.state, &env.agent, &lease).await;
    assert!(env.resend.send_requests().is_empty());
    let failed = env.list("outbox/failed");
    assert_eq!(failed.len(), 1);
    let filed: Value = serde_json::from_slice(&env.read(&format!("outbox/failed/{}", failed[0])).unwrap()).unwrap();
    assert!(filed["error"].as_str().unwrap().contains("symbolic link"), "{filed}");

    // outbox.sends_per_day_max = 1: the second file of the day fails.
    let env = start_with(&[("TINYFAT_OUTBOX_SENDS_PER_DAY_MAX", "1")]).await;
    let lease = env.lease().await;
    env.write("reports/q3.txt", b"numbers");
    env.write("outbox/email/a.json", OUTBOX_FILE.as_bytes());
    env.write("outbox/email/b.json", OUTBOX_FILE.as_bytes());
    email::process_outbox(&env.state, &env.agent, &lease).await;
    assert_eq!(env.resend.send_requests().len(), 1);
    assert_eq!(env.list("outbox/sent").len(), 1);
    let failed = env.list("outbox/failed");
    assert_eq!(failed.len(), 1);
    let filed: Value = serde_json::from_slice(&env.read(&format!("outbox/failed/{}", failed[0])).unwrap()).unwrap();
    assert!(filed["error"].as_str().unwrap().contains("daily limit"), "{filed}");

    // Web replies recorded since (more than the rows the limit looks at) do
    // not hide today's send from it: the limit counts email rows only.
    let env = start_with(&[("TINYFAT_OUTBOX_SENDS_PER_DAY_MAX", "1")]).await;
    let lease = env.lease().await;
    env.write("reports/q3.txt", b"numbers");
    env.write("outbox/email/a.json", OUTBOX_FILE.as_bytes());
    email::process_outbox(&env.state, &env.agent, &lease).await;
    assert_eq!(env.resend.send_requests().len(), 1);
    let now = env.platform.now_ms();
    for n in 0..150 {
        let web = NewDelivery {
            id: format!("web{n}"),
            idempotency_key: format!("reply:web{n}"),
            agent_id: env.agent.id.clone(),
            job_id: None,
            channel: "web".into(),
            target: "{}".into(),
            body: json!({"text": "hi", "attachments": []}).to_string(),
            by_stream: true,
        };
        env.platform.store.insert_delivery(&web, now).await.unwrap();
    }
    env.write("outbox/email/b.json", OUTBOX_FILE.as_bytes());
    email::process_outbox(&env.state, &env.agent, &lease).await;
    assert_eq!(env.resend.send_requests().len(), 1, "the second send of the day is still refused");
    let failed = env.list("outbox/failed");
    assert_eq!(failed.len(), 1);
    let filed: Value = serde_json::from_slice(&env.read(&format!("outbox/failed/{}", failed[0])).unwrap()).unwrap();
    assert!(filed["error"].as_str().unwrap().contains("daily limit"), "{filed}");
}
