//! Provisioning by email (SPEC §9) end to end, with a real platform on a
//! temporary data folder, the real worker and delivery loops, a fake Resend,
//! and the real DKIM/SPF/DMARC checks answered from an offline DNS zone:
//! each test signs its mail with a DKIM key published in that zone.
//!
//! Covered: an allowed, authenticated sender gets an agent, a welcome from
//! start@ and a hello from the agent (each reaching Resend once); the Resend
//! webhook route; senders outside `provisioning.allow`, an empty allow list,
//! DMARC failures and loops get nothing; a second start names the existing
//! agent; `provisioning.per_hour_max` refuses with a log line, across a
//! restart, until the hour has passed; a start job run again after a crash
//! (an orphaned folder from before the agent row, a completion never
//! recorded) creates one agent and one welcome.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use serde_json::{Value, json};
use tinyfat_channels::email::auth::{Authenticator, DnsRecords};
use tinyfat_core::{AgentName, EmailAddress, SenderPattern};
use tinyfat_platform::Platform;
use tinyfat_platform::clock::ManualClock;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::email::{self, provision};
use tinyfat_platform::provision::CreateAgent;
use tinyfat_platform::state::AppState;
use tinyfat_store::{Agent, JobState};
use tinyfat_testkit::FakeResend;
use tokio::sync::watch;

const DOMAIN: &str = "agents.test";
const BOB: &str = "bob@example.org";
const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// DKIM-signed mail and the offline zone.

struct Keys {
    example: Vec<u8>,
    evil: Vec<u8>,
}

fn public_txt(pkcs8: &[u8]) -> String {
    let public = Ed25519Key::from_pkcs8_der(pkcs8).unwrap().public_key();
    format!("v=DKIM1; k=ed25519; p={}", STANDARD.encode(public))
}

fn zone(keys: &Keys) -> DnsRecords {
    let zone = DnsRecords::zone();
    zone.add_txt("sel._domainkey.example.org", &public_txt(&keys.example)).unwrap();
    zone.add_txt("_dmarc.example.org", "v=DMARC1; p=reject").unwrap();
    zone.add_txt("sel._domainkey.evil.example", &public_txt(&keys.evil)).unwrap();
    zone
}

fn start_mail(from: &str, message_id: &str, extra_headers: &str) -> String {
    format!(
        "From: {from}\r\nTo: start@{DOMAIN}\r\nSubject: start\r\nDate: Wed, 01 Jul 2026 14:00:00 +0000\r\n\
         Message-ID: <{message_id}>\r\n{extra_headers}\r\nI would like an agent, please.\r\n"
    )
}

/// `message` with a DKIM-Signature by `domain` prepended.
fn sign(pkcs8: &[u8], domain: &str, message: &str) -> Vec<u8> {
    let signature = DkimSigner::from_key(Ed25519Key::from_pkcs8_der(pkcs8).unwrap())
        .domain(domain)
        .selector("sel")
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .sign(message.as_bytes())
        .unwrap();
    let mut out = signature.to_header().into_bytes();
    out.extend_from_slice(message.as_bytes());
    out
}

// ---------------------------------------------------------------------------
// Log capture: the tests run on one thread, so a thread default sees every
// task's events.

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

// ---------------------------------------------------------------------------
// The environment.

struct Env {
    state: AppState,
    platform: Arc<Platform>,
    resend: FakeResend,
    clock: ManualClock,
    keys: Arc<Keys>,
    base: String,
    logs: Logs,
    stop: Option<watch::Sender<bool>>,
    dir: Arc<tempfile::TempDir>,
    _guard: tracing::subscriber::DefaultGuard,
}

fn settings(dir: &Path, resend: &FakeResend, extra: &[(&str, &str)]) -> Settings {
    let mut env: Vec<(String, String)> = [
        ("TINYFAT_SANDBOX_MODE", "none".to_owned()),
        ("TINYFAT_EMAIL_RESEND_BASE_URL", resend.url()),
        ("TINYFAT_EMAIL_RESEND_API_KEY", "re_test_key".to_owned()),
        ("TINYFAT_EMAIL_RESEND_WEBHOOK_SECRET", common::RESEND_SECRET.to_owned()),
        ("TINYFAT_EMAIL_DOMAIN", DOMAIN.to_owned()),
        ("TINYFAT_PROVISIONING_ALLOW", "@example.org, @agents.test".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Settings::load(&Sources { data_dir: Some(dir.to_owned()), env: env.into_iter().collect(), ..Sources::default() })
        .unwrap()
}

/// A platform on `dir` (new when `None`) with the offline authenticator, a
/// webhook server, and (when `roles`) the worker and delivery loops running.
async fn open(
    extra: &[(&str, &str)],
    roles: bool,
    dir: Option<Arc<tempfile::TempDir>>,
    resend: Option<FakeResend>,
    clock: Option<ManualClock>,
) -> Env {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let dir = dir.unwrap_or_else(|| Arc::new(tempfile::tempdir().unwrap()));
    let resend = match resend {
        Some(r) => r,
        None => FakeResend::start().await,
    };
    let clock = clock.unwrap_or_else(|| ManualClock::new(chrono::Utc::now().timestamp_millis()));
    let mut platform = Platform::open(settings(dir.path(), &resend, extra)).await.unwrap();
    platform.clock = Arc::new(clock.clone());
    let platform = Arc::new(platform);
    let keys =
        Arc::new(Keys { example: Ed25519Key::generate_pkcs8().unwrap(), evil: Ed25519Key::generate_pkcs8().unwrap() });
    let mut state = AppState::new(platform.clone());
    state.sender_auth = Some(Arc::new(Authenticator::offline(zone(&keys)).unwrap()));
    let app = email::routes().with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut env = Env { state, platform, resend, clock, keys, base, logs, stop: None, dir, _guard: guard };
    if roles {
        env.run_roles();
    }
    env
}

async fn start_with(extra: &[(&str, &str)]) -> Env {
    open(extra, true, None, None, None).await
}

impl Env {
    fn run_roles(&mut self) {
        let (stop, shutdown) = watch::channel(false);
        let config = tinyfat_platform::worker::WorkerConfig::default();
        tokio::spawn(tinyfat_platform::worker::run(self.state.clone(), config, shutdown.clone()));
        tokio::spawn(tinyfat_platform::deliver::run(self.state.clone(), shutdown));
        self.stop = Some(stop);
    }

    /// A signed start mail from `from`, as the SMTP listener hands it over.
    async fn send_start(&self, from: &str, message_id: &str) -> bool {
        let raw = sign(&self.keys.example, "example.org", &start_mail(from, message_id, ""));
        provision::enqueue_start(&self.state, &raw, None, format!("smtp:{message_id}")).await.unwrap()
    }

    async fn agents(&self) -> Vec<Agent> {
        self.platform.store.list_agents(None).await.unwrap()
    }

    /// Waits until every platform job and every job of every agent is
    /// settled, then for `emails` emails at the fake; then a little longer,
    /// so an extra email would show.
    async fn settle(&self, emails: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let mut jobs = self.platform.store.jobs_for(&provision::platform_agent_id(), 100).await.unwrap();
            for agent in self.agents().await {
                jobs.extend(self.platform.store.jobs_for(&agent.id, 100).await.unwrap());
            }
            let settled = jobs.iter().all(|j| matches!(j.state, JobState::Done | JobState::Dead));
            if settled && self.resend.emails().len() >= emails {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not settled: jobs {:?}, {} emails\n{}",
                jobs.iter().map(|j| (&j.kind, j.state, &j.last_error)).collect::<Vec<_>>(),
                self.resend.emails().len(),
                self.logs.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(self.resend.emails().len(), emails, "{:#?}", self.resend.emails());
    }

    fn file(&self, agent: &Agent, path: &str) -> Option<String> {
        std::fs::read_to_string(self.dir.path().join("storage/agents").join(agent.id.as_str()).join(path)).ok()
    }

    fn sent_to(&self, to: &str) -> Vec<Value> {
        self.resend.emails().into_iter().filter(|e| e["to"] == json!([to])).collect()
    }
}

fn from_platform(email: &Value) -> bool {
    email["from"].as_str().unwrap_or_default().contains(&format!("<start@{DOMAIN}>"))
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_allowed_sender_gets_an_agent_a_welcome_and_a_hello() {
    let env = start_with(&[]).await;
    assert!(env.send_start(BOB, "start-1@example.org").await);
    assert!(!env.send_start(BOB, "start-1@example.org").await, "the same dedup key enqueues nothing");
    env.settle(2).await;

    let agents = env.agents().await;
    assert_eq!(agents.len(), 1, "{}", env.logs.text());
    let agent = &agents[0];
    assert_eq!(agent.owner_email.as_str(), BOB);
    AgentName::parse(agent.name.as_str()).expect("a generated, valid, unreserved name");
    assert_eq!(agent.email.as_str(), format!("{}@{DOMAIN}", agent.name));
    let senders = env.platform.store.list_senders(&agent.id).await.unwrap();
    assert_eq!(senders, vec![SenderPattern::parse(BOB).unwrap()]);
    assert!(env.file(agent, "MEMORY.md").unwrap().contains(BOB));
    assert!(env.file(agent, "config.json").is_some());
    for dir in tinyfat_platform::provision::LAYOUT_DIRS {
        assert!(env.dir.path().join("storage/agents").join(agent.id.as_str()).join(dir).is_dir(), "{dir}");
    }

    // The welcome: from start@, threaded under the request, naming the address.
    let mails = env.sent_to(BOB);
    assert_eq!(mails.len(), 2);
    let welcome = mails.iter().find(|m| from_platform(m)).expect("a welcome from start@");
    assert_eq!(welcome["subject"], "Re: start");
    assert_eq!(welcome["headers"]["In-Reply-To"], "<start-1@example.org>");
    assert!(welcome["text"].as_str().unwrap().contains(agent.email.as_str()), "{welcome}");
    // The hello: from the agent, through its outbox, filed in sent/.
    let hello = mails.iter().find(|m| !from_platform(m)).unwrap();
    assert!(hello["from"].as_str().unwrap().contains(agent.email.as_str()), "{hello}");
    assert_eq!(hello["subject"], format!("Hello from {}", agent.name));
    let sent = std::fs::read_dir(env.dir.path().join("storage/agents").join(agent.id.as_str()).join("outbox/sent"))
        .unwrap()
        .count();
    assert_eq!(sent, 1);

    // Each reached Resend once, under its own key.
    let sends = env.resend.send_requests();
    assert_eq!(sends.len(), 2);
    assert_ne!(sends[0].header("idempotency-key"), sends[1].header("idempotency-key"));
    let platform_key = format!("{}:", provision::platform_agent_id());
    assert!(sends.iter().any(|s| s.header("idempotency-key").unwrap().starts_with(&platform_key)));
    let welcome_row = env.platform.store.deliveries_for(&provision::platform_agent_id(), 10).await.unwrap();
    assert_eq!(welcome_row.len(), 1);
    assert!(welcome_row[0].idempotency_key.starts_with("welcome:"));
    assert!(env.logs.text().contains("agent provisioned by email"));
}

#[tokio::test]
async fn the_resend_webhook_hands_start_mail_to_provisioning() {
    // The fake serves no raw message, so DKIM cannot be evaluated: only
    // `email.require_auth = false` admits the sender (as for agents).
    let env = start_with(&[("TINYFAT_EMAIL_REQUIRE_AUTH", "false")]).await;
    env.resend.add_received(json!({
        "object": "email", "id": "em_start", "to": [format!("start@{DOMAIN}")], "from": "Bob <bob@example.org>",
        "created_at": "2026-07-01T12:00:00.000000+00:00", "subject": "start", "text": "An agent, please.\n",
        "html": null, "message_id": "<wh-1@example.org>", "headers": {}, "attachments": []
    }));
    let body = json!({
        "type": "email.received",
        "created_at": "2026-07-01T12:00:01.000Z",
        "data": {
            "email_id": "em_start", "created_at": "2026-07-01T12:00:00.000Z", "from": "Bob <bob@example.org>",
            "to": [format!("START@{DOMAIN}")], "cc": [], "subject": "start", "message_id": "<wh-1@example.org>",
            "attachments": []
        }
    })
    .to_string();
    let now = env.platform.now_ms() / 1000;
    let status = common::post_resend_webhook(&reqwest::Client::new(), &env.base, "msg_start", now, &body, None).await;
    assert_eq!(status, 200);
    let jobs = env.platform.store.jobs_for(&provision::platform_agent_id(), 10).await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!((jobs[0].kind.as_str(), jobs[0].dedup_key.as_str()), ("start", "resend:msg_start:start"));

    env.settle(2).await;
    let agents = env.agents().await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].owner_email.as_str(), BOB);
    assert_eq!(env.sent_to(BOB).len(), 2);
}

#[tokio::test]
async fn strangers_dmarc_failures_and_loops_get_nothing() {
    let env = start_with(&[]).await;
    env.platform
        .create_agent(CreateAgent {
            owner: EmailAddress::parse("owner@example.com").unwrap(),
            name: Some("otheragent".into()),
            model: None,
        })
        .await
        .unwrap();
    let keys = &env.keys;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Not in provisioning.allow (signed by its own domain, not in the zone).
        ("mallory", sign(&keys.evil, "evil.example", &start_mail("mallory@evil.example", "m@evil.example", ""))),
        // Claims example.org, signed by evil.example: DMARC fails.
        ("spoof", sign(&keys.evil, "evil.example", &start_mail(BOB, "spoof@evil.example", ""))),
        // Unsigned: DMARC fails (p=reject, nothing aligned).
        ("unsigned", start_mail(BOB, "unsigned@example.org", "").into_bytes()),
        // An auto-reply, even a signed one.
        (
            "auto",
            sign(
                &keys.example,
                "example.org",
                &start_mail(BOB, "auto@example.org", "Auto-Submitted: auto-replied\r\n"),
            ),
        ),
        // An agent's own address (allowed by @agents.test).
        ("agent", start_mail(&format!("otheragent@{DOMAIN}"), "loop@agents.test", "").into_bytes()),
    ];
    for (name, raw) in &cases {
        assert!(provision::enqueue_start(&env.state, raw, None, format!("smtp:{name}")).await.unwrap());
    }
    env.settle(0).await;
    assert_eq!(env.agents().await.len(), 1, "only the agent made by hand");
    assert!(env.resend.send_requests().is_empty());
    assert!(env.platform.store.deliveries_for(&provision::platform_agent_id(), 10).await.unwrap().is_empty());
    let logs = env.logs.text();
    assert!(logs.contains("does not match provisioning.allow"), "{logs}");
    assert_eq!(logs.matches("failed sender authentication").count(), 2, "{logs}");
    assert!(logs.contains("dmarc=fail"), "{logs}");
    assert_eq!(logs.matches("start email not answered (loop)").count(), 2, "{logs}");

    // An empty allow list turns self-provisioning off.
    let off = start_with(&[("TINYFAT_PROVISIONING_ALLOW", "")]).await;
    assert!(off.send_start(BOB, "off@example.org").await);
    off.settle(0).await;
    assert!(off.agents().await.is_empty());
    assert!(off.logs.text().contains("self-provisioning is off"), "{}", off.logs.text());
}

#[tokio::test]
async fn a_second_start_names_the_existing_agent() {
    let env = start_with(&[]).await;
    env.send_start(BOB, "first@example.org").await;
    env.settle(2).await;
    env.send_start(BOB, "again@example.org").await;
    env.settle(3).await;

    let agents = env.agents().await;
    assert_eq!(agents.len(), 1);
    let replies: Vec<Value> = env.sent_to(BOB).into_iter().filter(from_platform).collect();
    assert_eq!(replies.len(), 2);
    let answer = replies.iter().find(|m| m["headers"]["In-Reply-To"] == "<again@example.org>").unwrap();
    let text = answer["text"].as_str().unwrap();
    assert!(text.contains(agents[0].email.as_str()) && text.contains("already have"), "{text}");
}

#[tokio::test]
async fn per_hour_max_refuses_with_a_log_line_across_a_restart_until_the_hour_passes() {
    let extra = [("TINYFAT_PROVISIONING_PER_HOUR_MAX", "1")];
    let mut env = start_with(&extra).await;
    env.send_start(BOB, "bob-1@example.org").await;
    env.settle(2).await;
    env.send_start("carol@example.org", "carol-1@example.org").await;
    env.settle(2).await;
    assert_eq!(env.agents().await.len(), 1);
    assert!(env.logs.text().contains("start email refused: provisioning.per_hour_max"), "{}", env.logs.text());

    // Another process on the same database counts the same requests.
    env.stop.take().unwrap().send(true).unwrap();
    let (dir, resend, clock) = (env.dir.clone(), env.resend.clone(), env.clock.clone());
    drop(env);
    let env = open(&extra, true, Some(dir), Some(resend), Some(clock)).await;
    env.send_start("carol@example.org", "carol-2@example.org").await;
    env.settle(2).await;
    assert_eq!(env.agents().await.len(), 1);
    assert!(env.logs.text().contains("per_hour_max"), "{}", env.logs.text());

    // An hour later there is room again.
    env.clock.advance_ms(3_600_001);
    env.send_start("carol@example.org", "carol-3@example.org").await;
    env.settle(4).await;
    let owners: Vec<String> = env.agents().await.iter().map(|a| a.owner_email.to_string()).collect();
    assert_eq!(owners.len(), 2);
    assert!(owners.contains(&"carol@example.org".to_owned()), "{owners:?}");
}

#[tokio::test]
async fn a_start_job_run_again_after_a_crash_creates_one_agent_and_one_welcome() {
    let mut env = open(&[], false, None, None, None).await;
    env.send_start(BOB, "crash@example.org").await;
    let claim =
        env.platform.store.claim_next("w1", env.platform.now_ms(), 30_000).await.unwrap().expect("the start job");
    let job = claim.jobs[0].clone();
    assert_eq!(job.kind, "start");

    // A first attempt died between storage and the agent row: a half-seeded
    // folder under the job's agent id, and no row.
    let orphan = env.dir.path().join(format!("storage/agents/ag_{}", job.id));
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("MEMORY.md"), "half-written").unwrap();

    // A second attempt ran every step, then died before its completion was
    // recorded; the job runs again.
    provision::run_start(&env.state, &job).await.unwrap();
    provision::run_start(&env.state, &job).await.unwrap();
    provision::process(&env.state, claim).await;
    assert_eq!(env.platform.store.get_job(&job.id).await.unwrap().unwrap().state, JobState::Done);

    env.run_roles();
    env.settle(2).await;
    let agents = env.agents().await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].id.as_str(), format!("ag_{}", job.id));
    let memory = env.file(&agents[0], "MEMORY.md").unwrap();
    assert!(memory.contains(BOB) && !memory.contains("half-written"), "{memory}");
    let platform_rows = env.platform.store.deliveries_for(&provision::platform_agent_id(), 10).await.unwrap();
    assert_eq!(platform_rows.len(), 1, "one welcome");
    let outbox_jobs = env.platform.store.jobs_for(&agents[0].id, 10).await.unwrap();
    assert_eq!(outbox_jobs.len(), 1, "one hello job");
    let sent: Vec<(Option<String>, Value)> = env
        .resend
        .send_requests()
        .iter()
        .map(|r| (r.headers.get("idempotency-key").cloned(), r.body["subject"].clone()))
        .collect();
    assert_eq!(sent.len(), 2, "one welcome and one hello reached Resend: {sent:?}");
}
