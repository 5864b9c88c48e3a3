//! Outbound email over SMTP (`email.provider = "smtp"`) against an
//! independent SMTP server: aiosmtpd (`tinyfat_testkit::SmtpPeer`, started per
//! test on an ephemeral loopback port, AUTH required) that stores each
//! message it accepts and can be told to answer 451, 550 or to drop the
//! connection after storing (a lost 250). Covered: a reply threads under the
//! inbound mail (In-Reply-To, References, text + HTML, Message-ID
//! `<delivery_id@domain>`) and is filed in `outbox/sent/`; an outbox file is
//! sent and filed; 451 is retried and then sent once; 550 fails the file and
//! the reply visibly; a crash (or a lost 250) between the send and the
//! filing resends with the same Message-ID; the password never reaches the
//! logs or error texts.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::{Value, json};
use tinyfat_core::SessionId;
use tinyfat_platform::Platform;
use tinyfat_platform::clock::ManualClock;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::email;
use tinyfat_platform::state::AppState;
use tinyfat_storage::validate_path;
use tinyfat_store::{Agent, Claim, DeliveryState, NewDelivery, NewJob};
use tinyfat_testkit::SmtpPeer;

use common::OWNER;
const USER: &str = "tinyfat-out";
const PASSWORD: &str = "pw-Zq8v-never-logged-41";
const DOMAIN: &str = "agents.test";

// ---------------------------------------------------------------------------
// The peer: aiosmtpd in a child process.

// ---------------------------------------------------------------------------
// Every log line of this test binary, at every level, for the password check.

#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
        logs
    })
}

// ---------------------------------------------------------------------------
// A platform sending through the peer.

struct Env {
    state: AppState,
    platform: Arc<Platform>,
    clock: ManualClock,
    agent: Agent,
    peer: SmtpPeer,
    _dir: tempfile::TempDir,
}

fn settings(dir: &Path, peer: &SmtpPeer, password: &str) -> Settings {
    let env = [
        ("TINYFAT_SANDBOX_MODE", "none".to_owned()),
        ("TINYFAT_EMAIL_REQUIRE_AUTH", "false".to_owned()),
        ("TINYFAT_EMAIL_DOMAIN", DOMAIN.to_owned()),
        ("TINYFAT_EMAIL_PROVIDER", "smtp".to_owned()),
        ("TINYFAT_EMAIL_SMTP_HOST", "127.0.0.1".to_owned()),
        ("TINYFAT_EMAIL_SMTP_PORT", peer.port.to_string()),
        ("TINYFAT_EMAIL_SMTP_TLS", "none".to_owned()),
        ("TINYFAT_EMAIL_SMTP_USERNAME", USER.to_owned()),
        // The provider alias, as a single-agent deployment would set it.
        ("SMTP_PASSWORD", password.to_owned()),
        ("TINYFAT_EMAIL_SMTP_TIMEOUT_S", "5".to_owned()),
    ];
    let env = env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    Settings::load(&Sources { data_dir: Some(dir.to_owned()), env, ..Sources::default() }).unwrap()
}

async fn start() -> Env {
    start_with_password(PASSWORD).await
}

async fn start_with_password(password: &str) -> Env {
    logs();
    let peer = SmtpPeer::start(USER, PASSWORD);
    let dir = tempfile::tempdir().unwrap();
    let mut platform = Platform::open(settings(dir.path(), &peer, password)).await.unwrap();
    let clock = ManualClock::new(chrono::Utc::now().timestamp_millis());
    platform.clock = Arc::new(clock.clone());
    let agent = common::agent(&platform).await;
    let platform = Arc::new(platform);
    Env { state: AppState::new(platform.clone()), platform, clock, agent, peer, _dir: dir }
}

impl Env {
    fn now(&self) -> i64 {
        self.platform.now_ms()
    }

    /// A claim on the agent (its lease), as a worker holds it while it runs.
    async fn claim(&self) -> Claim {
        let job = NewJob {
            id: new_id(),
            dedup_key: format!("test:{}", ulid::Ulid::new()),
            agent_id: self.agent.id.clone(),
            session: SessionId::parse("cli-main").unwrap(),
            kind: "message".into(),
            payload: "{}".into(),
        };
        self.platform.store.enqueue(job, self.now()).await.unwrap();
        self.platform.store.claim_next("test-worker", self.now(), 30_000).await.unwrap().expect("a claim")
    }

    /// One worker run's outbox step, under the lease; the claim's jobs are
    /// then completed, which releases the lease.
    async fn process_outbox(&self) {
        let claim = self.claim().await;
        email::process_outbox(&self.state, &self.agent, &claim.lease).await;
        assert!(self.platform.store.complete(&claim.lease, &claim.job_ids(), self.now()).await.unwrap());
    }

    fn prefix(&self) -> PathBuf {
        self._dir.path().join("storage").join("agents").join(self.agent.id.to_string())
    }

    fn write(&self, path: &str, bytes: &[u8]) {
        let dir = tinyfat_storage::AgentDir::open(&self.prefix()).unwrap();
        dir.write_atomic(&validate_path(path).unwrap(), bytes).unwrap();
    }

    fn read_json(&self, path: &str) -> Value {
        let dir = tinyfat_storage::AgentDir::open(&self.prefix()).unwrap();
        serde_json::from_slice(&dir.read(&validate_path(path).unwrap(), 1 << 20).unwrap()).unwrap()
    }

    fn list(&self, path: &str) -> Vec<String> {
        let dir = tinyfat_storage::AgentDir::open(&self.prefix()).unwrap();
        let mut names: Vec<String> =
            dir.list(&validate_path(path).unwrap()).unwrap_or_default().into_iter().map(|e| e.name).collect();
        names.sort();
        names
    }

    /// An inbound mail from the owner, through the real inbound path (an
    /// `email` job, forwarded as a message job); returns the message job's id.
    async fn inbound_mail(&self) -> String {
        let raw = "From: Alice <alice@example.com>\r\nTo: swiftpebble@agents.test\r\nSubject: Hello\r\n\
                   Message-ID: <m2@example.com>\r\nIn-Reply-To: <m1@example.com>\r\n\
                   References: <root@example.com> <m1@example.com>\r\nDate: Wed, 01 Jul 2026 12:00:00 +0000\r\n\
                   Content-Type: text/plain; charset=utf-8\r\n\r\nHi agent, how are the numbers?\r\n";
        let to = self.agent.email.clone();
        let store = &self.platform.store;
        email::enqueue_raw_email(&self.state, &self.agent, &to, "smtp", raw.as_bytes(), None, "test:m2".into())
            .await
            .unwrap();
        loop {
            let claim = store.claim_next("test-worker", self.now(), 30_000).await.unwrap().expect("the email job");
            let job = claim.jobs.iter().find(|j| j.kind == "email").cloned();
            if let Some(job) = &job {
                assert!(matches!(email::prepare_email_job(&self.state, &self.agent, job).await, Ok(None)));
            }
            store.complete(&claim.lease, &claim.job_ids(), self.now()).await.unwrap();
            if job.is_some() {
                break;
            }
        }
        let jobs = store.jobs_for(&self.agent.id, 100).await.unwrap();
        jobs.into_iter().find(|j| j.kind == "message" && j.dedup_key.starts_with("email:")).expect("forwarded").id
    }

    /// The reply to message job `job_id`, recorded as the worker records it.
    async fn record_reply(&self, job_id: &str, text: &str) -> String {
        let delivery = NewDelivery {
            id: new_id(),
            idempotency_key: format!("reply:{job_id}"),
            agent_id: self.agent.id.clone(),
            job_id: Some(job_id.to_owned()),
            channel: "email".into(),
            target: json!({"channel": "email", "to": OWNER}).to_string(),
            body: json!({"text": text, "attachments": []}).to_string(),
            by_stream: false,
        };
        self.platform.store.insert_delivery(&delivery, self.now()).await.unwrap().delivery.id
    }

    async fn row(&self, id: &str) -> tinyfat_store::Delivery {
        self.platform.store.get_delivery(id).await.unwrap().unwrap()
    }
}

fn new_id() -> String {
    tinyfat_core::ids::new_ulid_string(ulid::Ulid::new())
}

/// The value of header `name` in a raw message (first occurrence, unfolded).
fn header(raw: &str, name: &str) -> Option<String> {
    let head = raw.split("\r\n\r\n").next().unwrap_or(raw);
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    let prefix = format!("{}:", name.to_ascii_lowercase());
    unfolded
        .split("\r\n")
        .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
        .map(|l| l[prefix.len()..].trim().to_owned())
}

const OUTBOX_FILE: &str = r#"{"to":["alice@example.com"],"cc":[],"bcc":["bob@example.com"],"subject":"Report","body":"Here it is.","attachments":[{"path":"reports/q3.txt"}]}"#;

async fn allow_bob(env: &Env) {
    let rule = tinyfat_core::SenderPattern::parse("bob@example.com").unwrap();
    env.platform.store.add_sender(&env.agent.id, &rule, env.now()).await.unwrap();
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_reply_goes_out_by_smtp_threaded_with_both_parts_and_is_filed_in_sent() {
    let env = start().await;
    let job_id = env.inbound_mail().await;
    let delivery_id = env.record_reply(&job_id, "All **good**: see <https://example.com/q3>.").await;

    env.process_outbox().await;

    let messages = env.peer.messages();
    assert_eq!(messages.len(), 1);
    let (raw, rcpt) = &messages[0];
    assert_eq!(rcpt, &vec![OWNER.to_owned()]);
    assert!(env.peer.logins().contains(USER), "the server saw AUTH as {USER}");
    assert_eq!(header(raw, "Message-ID").as_deref(), Some(format!("<{delivery_id}@{DOMAIN}>").as_str()));
    assert_eq!(header(raw, "In-Reply-To").as_deref(), Some("<m2@example.com>"));
    assert_eq!(header(raw, "References").as_deref(), Some("<root@example.com> <m1@example.com> <m2@example.com>"));
    assert_eq!(header(raw, "Subject").as_deref(), Some("Re: Hello"));
    assert_eq!(header(raw, "Auto-Submitted").as_deref(), Some("auto-replied"));
    assert!(header(raw, "From").unwrap().contains("swiftpebble@agents.test"), "{raw}");
    assert!(header(raw, "Content-Type").unwrap().starts_with("multipart/alternative"), "{raw}");
    assert!(raw.contains("text/plain") && raw.contains("text/html"), "{raw}");
    assert!(raw.contains("<strong>good</strong>"), "the HTML part renders the markdown: {raw}");
    assert!(raw.contains("> Hi agent, how are the numbers?"), "the text part quotes the parent: {raw}");

    let row = env.row(&delivery_id).await;
    assert_eq!(row.state, DeliveryState::Sent);
    assert_eq!(row.provider_message_id, Some(format!("<{delivery_id}@{DOMAIN}>")));
    // Filed in outbox/sent/ with the fields of an outbox file plus the sent ones.
    assert_eq!(env.list("outbox/sent"), vec![format!("{delivery_id}.json")]);
    let filed = env.read_json(&format!("outbox/sent/{delivery_id}.json"));
    assert_eq!(filed["status"], "sent");
    assert_eq!(filed["to"], json!([OWNER]));
    assert_eq!(filed["subject"], "Re: Hello");
    assert_eq!(filed["body"], "All **good**: see <https://example.com/q3>.");
    assert_eq!(filed["in_reply_to"], "<m2@example.com>");
    assert_eq!(filed["references"], "<root@example.com> <m1@example.com> <m2@example.com>");
    assert_eq!(filed["provider_message_id"], format!("<{delivery_id}@{DOMAIN}>"));
    assert!(filed["sent_at"].as_str().is_some_and(|s| s.ends_with('Z')), "{filed}");
    assert!(tinyfat_channels::email::outbox_file::parse(&serde_json::to_vec(&filed).unwrap()).is_ok());

    // Another run sends and files nothing more.
    env.process_outbox().await;
    assert_eq!(env.peer.messages().len(), 1);
    assert_eq!(env.list("outbox/sent").len(), 1);

    // A reply the delivery loop sent instead is filed by the next run.
    let job2 = env.record_reply(&format!("{job_id}-2"), "Second.").await;
    let row2 = env.row(&job2).await;
    assert!(env.platform.store.mark_delivery_sending(&row2.id, env.now(), 60_000).await.unwrap());
    let sent = email::send(&env.state, &row2).await.unwrap();
    env.platform.store.mark_delivery_sent(&row2.id, sent.as_deref(), env.now()).await.unwrap();
    env.process_outbox().await;
    assert_eq!(env.peer.messages().len(), 2);
    assert_eq!(env.read_json(&format!("outbox/sent/{job2}.json"))["status"], "sent");
}

#[tokio::test]
async fn an_outbox_file_is_sent_by_smtp_with_bcc_in_the_envelope_only_and_moved_to_sent() {
    let env = start().await;
    allow_bob(&env).await;
    env.write("reports/q3.txt", b"numbers");
    env.write("outbox/email/report.json", OUTBOX_FILE.as_bytes());
    env.process_outbox().await;

    assert!(env.list("outbox/email").is_empty());
    assert!(env.list("outbox/sending").is_empty());
    let sent = env.list("outbox/sent");
    assert_eq!(sent.len(), 1);
    let delivery_id = sent[0].strip_suffix(".json").unwrap();
    let messages = env.peer.messages();
    assert_eq!(messages.len(), 1);
    let (raw, rcpt) = &messages[0];
    assert_eq!(rcpt, &vec![OWNER.to_owned(), "bob@example.com".to_owned()]);
    assert!(header(raw, "Bcc").is_none() && !raw.contains("bob@example.com"), "Bcc stays out of the headers: {raw}");
    assert_eq!(header(raw, "Message-ID").as_deref(), Some(format!("<{delivery_id}@{DOMAIN}>").as_str()));
    assert_eq!(header(raw, "Subject").as_deref(), Some("Report"));
    assert!(raw.contains("q3.txt"), "the attachment travels: {raw}");
    let filed = env.read_json(&format!("outbox/sent/{}", sent[0]));
    assert_eq!(filed["status"], "sent");
    assert_eq!(filed["provider_message_id"], format!("<{delivery_id}@{DOMAIN}>"));
    assert_eq!(env.row(delivery_id).await.state, DeliveryState::Sent);
    // The outbox row is filed once, by its file, not again as a reply.
    env.process_outbox().await;
    assert_eq!(env.list("outbox/sent").len(), 1);
    assert_eq!(env.peer.messages().len(), 1);
}

#[tokio::test]
async fn a_451_is_retried_with_backoff_and_then_sent_once() {
    let env = start().await;
    // The outbox retries inline (under the lease): 451, a pause, the send.
    env.write("outbox/email/note.json", br#"{"to":["alice@example.com"],"subject":"Note","body":"x"}"#);
    env.peer.reply_with(&["451 4.3.0 Mailbox busy, try again later"]);
    env.process_outbox().await;
    assert_eq!(env.peer.messages().len(), 1);
    let sent = env.list("outbox/sent");
    assert_eq!(sent.len(), 1);
    let row = env.row(sent[0].strip_suffix(".json").unwrap()).await;
    assert_eq!(row.state, DeliveryState::Sent);

    // A reply: the 451 leaves it pending with the delivery backoff, unfiled.
    let job_id = env.inbound_mail().await;
    let delivery_id = env.record_reply(&job_id, "Later.").await;
    env.peer.reply_with(&["451 4.7.1 Greylisted, try again later"]);
    env.process_outbox().await;
    let row = env.row(&delivery_id).await;
    assert_eq!(row.state, DeliveryState::Pending);
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("451") && e.contains("Greylisted")), "{row:?}");
    assert!(row.next_attempt_ms > env.now());
    assert!(!env.list("outbox/sent").contains(&format!("{delivery_id}.json")));
    // Not due yet: a run sends nothing.
    env.process_outbox().await;
    assert_eq!(env.peer.messages().len(), 1);
    // Due (the backoff is capped at 10 minutes): sent once and filed.
    env.clock.advance_ms(10 * 60_000 + 1);
    env.process_outbox().await;
    assert_eq!(env.peer.messages().len(), 2);
    let row = env.row(&delivery_id).await;
    assert_eq!((row.state, row.attempts), (DeliveryState::Sent, 2));
    assert_eq!(env.read_json(&format!("outbox/sent/{delivery_id}.json"))["status"], "sent");
}

#[tokio::test]
async fn a_550_fails_the_outbox_file_and_the_reply_with_the_servers_words() {
    let env = start().await;
    env.write("outbox/email/note.json", br#"{"to":["alice@example.com"],"subject":"Note","body":"x"}"#);
    env.peer.reply_with(&["550 5.1.1 No such user here"]);
    env.process_outbox().await;
    assert!(env.peer.messages().is_empty());
    assert!(env.list("outbox/sending").is_empty());
    let failed = env.list("outbox/failed");
    assert_eq!(failed.len(), 1);
    let filed = env.read_json(&format!("outbox/failed/{}", failed[0]));
    assert_eq!(filed["status"], "failed");
    let error = filed["error"].as_str().unwrap();
    assert!(error.contains("550") && error.contains("No such user here"), "{error}");
    let row = env.row(failed[0].strip_suffix(".json").unwrap()).await;
    assert_eq!((row.state, row.attempts), (DeliveryState::Failed, 1), "a 5xx is not retried");

    // A reply: failed in the delivery table and filed in outbox/failed/.
    let job_id = env.inbound_mail().await;
    let delivery_id = env.record_reply(&job_id, "Hello?").await;
    env.peer.reply_with(&["550 5.7.1 Relaying denied"]);
    env.process_outbox().await;
    let row = env.row(&delivery_id).await;
    assert_eq!(row.state, DeliveryState::Failed);
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("550") && e.contains("Relaying denied")));
    let filed = env.read_json(&format!("outbox/failed/{delivery_id}.json"));
    assert_eq!(filed["status"], "failed");
    assert!(filed["error"].as_str().unwrap().contains("Relaying denied"));
    assert_eq!(filed["subject"], "Re: Hello");
}

#[tokio::test]
async fn a_crash_between_send_and_filing_resends_with_the_same_message_id() {
    let env = start().await;

    // The 250 never arrives (the server stored the message, then the
    // connection died): the inline retry sends it again, same Message-ID.
    env.write("outbox/email/one.json", br#"{"to":["alice@example.com"],"subject":"One","body":"x"}"#);
    env.peer.reply_with(&["drop"]);
    env.process_outbox().await;
    let messages = env.peer.messages();
    assert_eq!(messages.len(), 2, "at-least-once: the server got it twice");
    let id = header(&messages[0].0, "Message-ID").unwrap();
    assert_eq!(header(&messages[1].0, "Message-ID").as_deref(), Some(id.as_str()));
    let sent = env.list("outbox/sent");
    assert_eq!(sent.len(), 1);
    assert_eq!(id, format!("<{}@{DOMAIN}>", sent[0].strip_suffix(".json").unwrap()));

    // A worker that died after the 250 and before recording it: the file is
    // in sending/, its row `sending`. The next run resends with the same
    // Message-ID and files it.
    let delivery_id = new_id();
    env.write(
        &format!("outbox/sending/{delivery_id}.json"),
        br#"{"to":["alice@example.com"],"subject":"Two","body":"y"}"#,
    );
    let new = NewDelivery {
        id: delivery_id.clone(),
        idempotency_key: format!("outbox:{delivery_id}"),
        agent_id: env.agent.id.clone(),
        job_id: None,
        channel: "email".into(),
        target: json!({"channel": "email", "to": OWNER}).to_string(),
        body: json!({"text": "y", "attachments": [], "outbox": {"to": [OWNER], "subject": "Two"}}).to_string(),
        by_stream: false,
    };
    let row = env.platform.store.insert_delivery(&new, env.now()).await.unwrap().delivery;
    assert!(env.platform.store.mark_delivery_sending(&delivery_id, env.now(), 60_000).await.unwrap());
    email::send(&env.state, &row).await.unwrap(); // the SMTP transaction, then the "crash"
    assert_eq!(env.peer.messages().len(), 3);
    env.process_outbox().await;
    let messages = env.peer.messages();
    assert_eq!(messages.len(), 4);
    let expected = format!("<{delivery_id}@{DOMAIN}>");
    assert_eq!(header(&messages[2].0, "Message-ID").as_deref(), Some(expected.as_str()));
    assert_eq!(header(&messages[3].0, "Message-ID").as_deref(), Some(expected.as_str()));
    assert!(env.list("outbox/sending").is_empty());
    assert_eq!(env.read_json(&format!("outbox/sent/{delivery_id}.json"))["status"], "sent");
    assert_eq!(env.row(&delivery_id).await.state, DeliveryState::Sent);

    // The same for a reply: left `sending` by a dead sender, it is resent
    // once the claim is stale (60 s), with the same Message-ID, and filed.
    let job_id = env.inbound_mail().await;
    let reply_id = env.record_reply(&job_id, "Once or twice.").await;
    let row = env.row(&reply_id).await;
    assert!(env.platform.store.mark_delivery_sending(&reply_id, env.now(), 60_000).await.unwrap());
    email::send(&env.state, &row).await.unwrap();
    env.process_outbox().await;
    assert_eq!(env.peer.messages().len(), 5, "not resent while the claim is fresh");
    assert!(!env.list("outbox/sent").contains(&format!("{reply_id}.json")));
    env.clock.advance_ms(60_001);
    env.process_outbox().await;
    let messages = env.peer.messages();
    assert_eq!(messages.len(), 6);
    let expected = format!("<{reply_id}@{DOMAIN}>");
    assert_eq!(header(&messages[4].0, "Message-ID").as_deref(), Some(expected.as_str()));
    assert_eq!(header(&messages[5].0, "Message-ID").as_deref(), Some(expected.as_str()));
    assert_eq!(env.read_json(&format!("outbox/sent/{reply_id}.json"))["status"], "sent");
}

#[tokio::test]
async fn the_password_never_reaches_logs_or_errors_and_a_wrong_one_fails_visibly() {
    let wrong = "wrong-Kx7-password-99";
    let env = start_with_password(wrong).await;
    let job_id = env.inbound_mail().await;
    let delivery_id = env.record_reply(&job_id, "Hi.").await;
    tracing::info!("password check: sending with a wrong password");
    env.process_outbox().await;
    let row = env.row(&delivery_id).await;
    assert_eq!(row.state, DeliveryState::Failed, "535 is permanent: {row:?}");
    let error = row.last_error.unwrap();
    assert!(error.contains("535"), "{error}");
    assert!(env.peer.messages().is_empty());
    let filed = env.read_json(&format!("outbox/failed/{delivery_id}.json"));
    assert!(!filed.to_string().contains(wrong));
    assert!(!error.contains(wrong));
    assert!(!format!("{:?}", env.platform.settings).contains(wrong));
    assert!(!serde_json::to_string(&env.platform.settings.email).unwrap().contains(wrong));

    // And with the right one, at trace level, through every other test too.
    let good = start().await;
    good.write("outbox/email/n.json", br#"{"to":["alice@example.com"],"subject":"N","body":"x"}"#);
    good.process_outbox().await;
    assert_eq!(good.peer.messages().len(), 1);
    let text = String::from_utf8_lossy(&logs().0.lock().unwrap()).into_owned();
    assert!(text.contains("password check"), "logs are captured");
    assert!(text.contains("outbox email sent") && text.contains("delivery failed"), "{text}");
    assert!(!text.contains(wrong) && !text.contains(PASSWORD), "a password reached the logs");
}

#[test]
fn smtp_settings_are_checked_at_startup() {
    let load = |pairs: &[(&str, &str)]| {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::load(&Sources { env, ..Sources::default() })
    };
    let defaults = load(&[]).unwrap();
    assert_eq!((defaults.email.smtp_tls.as_str(), defaults.email.smtp_port), ("starttls", 587));
    let err = load(&[("TINYFAT_EMAIL_PROVIDER", "smtp")]).unwrap_err().to_string();
    assert!(err.contains("smtp_host"), "{err}");
    let err = load(&[("TINYFAT_EMAIL_SMTP_HOST", "mail.example.com"), ("TINYFAT_EMAIL_SMTP_TLS", "none")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("loopback"), "{err}");
    assert!(load(&[("TINYFAT_EMAIL_SMTP_HOST", "localhost"), ("TINYFAT_EMAIL_SMTP_TLS", "none")]).is_ok());
    assert!(load(&[("TINYFAT_EMAIL_SMTP_HOST", "::1"), ("TINYFAT_EMAIL_SMTP_TLS", "none")]).is_ok());
    let err = load(&[("TINYFAT_EMAIL_SMTP_TLS", "maybe")]).unwrap_err().to_string();
    assert!(err.contains("smtp_tls"), "{err}");
    let s = load(&[("SMTP_PASSWORD", "s3cret-value")]).unwrap();
    assert_eq!(s.email.smtp_password.as_ref().map(|p| p.expose().to_owned()).as_deref(), Some("s3cret-value"));
    assert!(!format!("{s:?}").contains("s3cret-value"));
}
