//! IMAP polling against a real Dovecot (Debian `dovecot-imapd`), started
//! per test as its own instance (`tinyfat_testkit::Dovecot`: a temporary
//! base_dir, a passwd-file user, a maildir in a temporary folder, plain IMAP
//! on an ephemeral loopback port). Mail goes in with IMAP APPEND. The platform is real (SQLite,
//! local storage, worker and delivery loop in-process); only the model and
//! Resend are local fakes.
//!
//! Covered: a new message answered end to end (and left unread in the
//! mailbox), IDLE noticing a message within seconds, a restarted poller
//! enqueuing nothing twice (also after a crash between the enqueue and the
//! cursor), two pollers on one mailbox (one stands by), a wrong password
//! (clear state, no crash, recovers once fixed), and Authentication-Results
//! believed only from the configured authserv-id.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use tinyfat_core::Secret;
use tinyfat_platform::Platform;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::email::imap::{PollState, PollerSettings, Pollers};
use tinyfat_platform::state::AppState;
use tinyfat_storage::validate_path;
use tinyfat_store::{Agent, Job, JobState};
use tinyfat_testkit::{Dovecot, FakeModel, FakeResend, Script};
use tokio::sync::watch;

use common::OWNER;
const USER: &str = "mailbot";
const PASSWORD: &str = "correct horse";
const AUTHSERV_ID: &str = "mx.mail.test";

/// The test's Dovecot (`tinyfat_testkit::Dovecot`) and an IMAP client on it.
struct Imap {
    server: Dovecot,
}

impl Imap {
    fn start() -> Imap {
        Imap { server: Dovecot::start(USER, PASSWORD) }
    }

    fn log(&self) -> String {
        self.server.log()
    }

    async fn session(&self) -> async_imap::Session<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.server.port())).await.unwrap();
        let mut client = async_imap::Client::new(tcp);
        client.read_response().await.unwrap().unwrap();
        client.login(USER, PASSWORD).await.map_err(|(e, _)| e).unwrap()
    }

    /// Appends a message to INBOX, as a mail client or MTA would.
    async fn append(&self, raw: &str) {
        let mut session = self.session().await;
        session.append("INBOX", None, None, raw.as_bytes()).await.unwrap();
        session.logout().await.unwrap();
    }

    /// The flags of every message in INBOX, by UID.
    async fn flags(&self) -> Vec<(u32, Vec<String>)> {
        let mut session = self.session().await;
        session.select("INBOX").await.unwrap();
        let fetched: Vec<_> = session.uid_fetch("1:*", "(UID FLAGS)").await.unwrap().try_collect().await.unwrap();
        let out = fetched.iter().map(|f| (f.uid.unwrap(), f.flags().map(|fl| format!("{fl:?}")).collect())).collect();
        session.logout().await.unwrap();
        out
    }
}

/// What the platform logs, captured by one global subscriber for this
/// test binary (tests run in parallel: assert only on lines a single test
/// can cause).
fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Capture(writer.clone()))
            .try_init();
        buffer
    })
    .clone()
}

struct Capture(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn mail(message_id: &str, subject: &str, body: &str, extra_headers: &str) -> String {
    format!(
        "{extra_headers}From: Alice <{OWNER}>\r\nTo: {USER}@mail.test\r\nSubject: {subject}\r\n\
         Message-ID: <{message_id}>\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
    )
}

fn trusted(from_id: &str) -> String {
    format!("Authentication-Results: {from_id}; dkim=pass header.d=example.com; dmarc=pass header.from=example.com\r\n")
}

struct Env {
    platform: Arc<Platform>,
    state: AppState,
    resend: FakeResend,
    model: FakeModel,
    dovecot: Imap,
    agent: Agent,
    data: PathBuf,
    _stop: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

/// A platform with a worker and the delivery loop running, and an agent
/// whose config.json points at the test's Dovecot.
async fn env(require_auth: bool) -> Env {
    let dovecot = Imap::start();
    let dir = tempfile::tempdir().unwrap();
    let resend = FakeResend::start().await;
    let model = FakeModel::start().await;
    let vars: std::collections::BTreeMap<String, String> = [
        ("TINYFAT_SANDBOX_MODE", "none".to_owned()),
        ("TINYFAT_EMAIL_RESEND_BASE_URL", resend.url()),
        ("TINYFAT_EMAIL_RESEND_API_KEY", "re_test_key".to_owned()),
        ("TINYFAT_EMAIL_REQUIRE_AUTH", require_auth.to_string()),
        ("TINYFAT_EMAIL_DOMAIN", "agents.test".to_owned()),
        ("ANTHROPIC_API_KEY", "sk-test".to_owned()),
        ("ANTHROPIC_BASE_URL", model.base_url()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let settings =
        Settings::load(&Sources { data_dir: Some(dir.path().to_owned()), env: vars, ..Sources::default() }).unwrap();
    let platform = Arc::new(Platform::open(settings).await.unwrap());
    let state = AppState::new(platform.clone());
    let agent = common::agent(&platform).await;
    let data = dir.path().to_owned();
    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(tinyfat_platform::worker::run(state.clone(), Default::default(), stop_rx.clone()));
    tokio::spawn(tinyfat_platform::deliver::run(state.clone(), stop_rx));
    let env = Env { platform, state, resend, model, dovecot, agent, data, _stop: stop, _dir: dir };
    env.configure(serde_json::json!({
        "host": "127.0.0.1", "port": env.dovecot.server.port(), "tls": false,
        "username": USER, "authserv_id": AUTHSERV_ID
    }));
    env.set_password(PASSWORD).await;
    env
}

fn fast() -> PollerSettings {
    PollerSettings {
        rescan: Duration::from_millis(200),
        idle: true,
        poll_interval: Duration::from_millis(300),
        idle_refresh: Duration::from_secs(20),
        lease_ttl: Duration::from_secs(3),
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        login_backoff_min: Duration::from_millis(300),
        io_timeout: Duration::from_secs(10),
    }
}

/// A poller set with its own stop switch (one "process").
struct Poller {
    pollers: Pollers,
    stop: watch::Sender<bool>,
}

impl Poller {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.pollers.join()).await.expect("pollers stop");
    }
}

impl Env {
    fn configure(&self, imap: serde_json::Value) {
        let dir = tinyfat_storage::AgentDir::open(&self.prefix()).unwrap();
        let path = validate_path("config.json").unwrap();
        let mut config: serde_json::Value = serde_json::from_slice(&dir.read(&path, 1 << 16).unwrap()).unwrap();
        config["imap"] = imap;
        dir.write_atomic(&path, serde_json::to_string_pretty(&config).unwrap().as_bytes()).unwrap();
    }

    async fn set_password(&self, password: &str) {
        self.platform.set_secret(&self.agent, "imap_password", &Secret::new(password)).await.unwrap();
    }

    fn prefix(&self) -> PathBuf {
        self.data.join("storage").join("agents").join(self.agent.id.to_string())
    }

    fn poller(&self, settings: PollerSettings) -> Poller {
        let (stop, stop_rx) = watch::channel(false);
        Poller { pollers: Pollers::spawn(self.state.clone(), settings, stop_rx), stop }
    }

    async fn wait_for(
        &self,
        poller: &Poller,
        what: &str,
        f: impl Fn(&tinyfat_platform::email::imap::MailboxStatus) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = poller.pollers.status(&self.agent.id);
            if status.as_ref().is_some_and(&f) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {status:?}\n{}", self.dovecot.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn watching(&self, poller: &Poller) {
        self.wait_for(poller, "the poller to watch", |s| s.state == PollState::Watching).await;
    }

    async fn email_jobs(&self) -> Vec<Job> {
        let mut jobs = self.platform.store.jobs_for(&self.agent.id, 100).await.unwrap();
        jobs.retain(|j| j.kind == "email");
        jobs
    }

    /// Waits for `n` replies at Resend, then makes sure no more follow.
    async fn expect_sends(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.resend.send_requests().len() < n {
            assert!(Instant::now() < deadline, "{} of {n} replies sent", self.resend.send_requests().len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(self.resend.send_requests().len(), n, "too many replies");
    }

    async fn wait_jobs_settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let jobs = self.platform.store.jobs_for(&self.agent.id, 100).await.unwrap();
            if !jobs.is_empty() && jobs.iter().all(|j| j.state == JobState::Done) {
                return;
            }
            assert!(Instant::now() < deadline, "jobs did not finish: {jobs:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_message_is_answered_end_to_end_and_left_unread() {
    let env = env(true).await;
    env.model.push(Script::text("Hello from the agent."));
    // Mail already in the mailbox when it is connected is left alone.
    env.dovecot.append(&mail("old@example.com", "Old", "from before", &trusted(AUTHSERV_ID))).await;
    let poller = env.poller(fast());
    env.watching(&poller).await;
    env.dovecot.append(&mail("m1@example.com", "Hello", "Hi agent, are you there?", &trusted(AUTHSERV_ID))).await;

    let deadline = Instant::now() + Duration::from_secs(60);
    while env.resend.send_requests().is_empty() {
        assert!(Instant::now() < deadline, "no reply was sent; jobs: {:?}", env.email_jobs().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = env.resend.send_requests();
    assert_eq!(sent.len(), 1);
    let reply = &sent[0].body;
    assert_eq!(reply["to"], serde_json::json!([OWNER]));
    assert_eq!(reply["subject"], "Re: Hello");
    assert_eq!(reply["headers"]["In-Reply-To"], "<m1@example.com>");
    assert!(reply["text"].as_str().unwrap().contains("Hello from the agent."), "{reply}");
    // The model saw the message; the old one was never enqueued.
    let asked = serde_json::to_string(&env.model.requests().last().unwrap().body).unwrap();
    assert!(asked.contains("are you there?"), "{asked}");
    let jobs = env.email_jobs().await;
    assert_eq!(jobs.len(), 1);
    let validity = jobs[0].dedup_key.split(':').nth(2).unwrap().to_owned();
    assert_eq!(jobs[0].dedup_key, format!("imap:{}:{validity}:2", env.agent.id));
    // BODY.PEEK: the poller marked nothing \Seen.
    let flags = env.dovecot.flags().await;
    assert_eq!(flags.len(), 2);
    assert!(flags.iter().all(|(_, f)| !f.iter().any(|f| f.contains("Seen"))), "{flags:?}");
    poller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_notices_a_message_appended_while_idling_within_seconds() {
    let env = env(false).await;
    env.model.set_fallback(Script::text("ok"));
    // Polling would take a minute: only IDLE can be this quick.
    let poller = env.poller(PollerSettings { poll_interval: Duration::from_secs(60), ..fast() });
    env.watching(&poller).await;
    assert!(poller.pollers.status(&env.agent.id).unwrap().idle, "dovecot offers IDLE");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let appended = Instant::now();
    env.dovecot.append(&mail("idle@example.com", "Idle", "wake up", "")).await;
    env.wait_for(&poller, "the message to be enqueued", |s| s.enqueued == 1).await;
    let took = appended.elapsed();
    eprintln!("IDLE: appended to enqueued in {took:?}");
    assert!(took < Duration::from_secs(3), "IDLE took {took:?}");
    poller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_poller_enqueues_nothing_twice() {
    let env = env(false).await;
    env.model.set_fallback(Script::text("ok"));
    let first = env.poller(fast());
    env.watching(&first).await;
    env.dovecot.append(&mail("r1@example.com", "One", "first", "")).await;
    env.wait_for(&first, "the first message", |s| s.enqueued == 1).await;
    first.stop().await;

    // Restart: the cursor holds; nothing is fetched again.
    let second = env.poller(fast());
    env.watching(&second).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(second.pollers.status(&env.agent.id).unwrap().fetched, 0);
    env.dovecot.append(&mail("r2@example.com", "Two", "second", "")).await;
    env.wait_for(&second, "the second message", |s| s.enqueued == 1).await;
    assert_eq!(second.pollers.status(&env.agent.id).unwrap().fetched, 1);
    second.stop().await;

    // A crash after the enqueue and before the cursor moved: the cursor is
    // one message behind. The message is fetched again and the queue
    // recognises it by its dedup key.
    let store = &env.platform.store;
    let now = env.platform.now_ms();
    let saved = store.claim_poll(&env.agent.id, "imap", "test", now, 60_000).await.unwrap().expect("lease is free");
    let mut cursor: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert_eq!(cursor["last_uid"], 2);
    cursor["last_uid"] = 1.into();
    assert!(store.save_poll_cursor(&env.agent.id, "imap", "test", &cursor.to_string(), now).await.unwrap());
    store.release_poll(&env.agent.id, "imap", "test", env.platform.now_ms()).await.unwrap();
    let third = env.poller(fast());
    env.wait_for(&third, "the refetch", |s| s.fetched == 1).await;
    let status = third.pollers.status(&env.agent.id).unwrap();
    assert_eq!((status.enqueued, status.duplicates), (0, 1));
    third.stop().await;

    assert_eq!(env.email_jobs().await.len(), 2);
    env.wait_jobs_settled().await;
    env.expect_sends(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_poll_a_mailbox_one_at_a_time() {
    let env = env(false).await;
    let a = env.poller(fast());
    env.watching(&a).await;
    let b = env.poller(fast());
    env.wait_for(&b, "the second poller to stand by", |s| s.state == PollState::Standby).await;
    // When the first stops (it releases the lease), the second takes over.
    a.stop().await;
    env.watching(&b).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_reported_clearly_and_recovers_when_fixed() {
    let logs = captured_logs();
    let env = env(false).await;
    env.set_password("not the password").await;
    let poller = env.poller(fast());
    env.wait_for(&poller, "the refused login", |s| s.state == PollState::LoginRefused).await;
    // What `/readyz` shows for the mailbox says what is wrong.
    let line = poller.pollers.status(&env.agent.id).unwrap().describe();
    assert!(line.starts_with("error: login refused (check imap_password"), "{line}");
    // Several attempts, one log line that says what to do.
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.dovecot.log().matches("auth failed").count() < 3 {
        assert!(Instant::now() < deadline, "the poller stopped retrying: {}", env.dovecot.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let refused: Vec<&str> = text.lines().filter(|l| l.contains("refused the login")).collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("tinyfat secret set swiftpebble imap_password"), "{}", refused[0]);
    assert!(!text.contains("not the password"), "the password was logged");
    let status = poller.pollers.status(&env.agent.id).unwrap();
    let error = status.last_error.unwrap();
    assert!(error.contains("AUTHENTICATIONFAILED") || error.contains("Authentication failed"), "{error}");
    assert!(!error.contains("not the password"), "{error}");
    // The poller keeps trying (slowly) and recovers once the secret is fixed.
    env.set_password(PASSWORD).await;
    env.watching(&poller).await;
    assert_eq!(poller.pollers.status(&env.agent.id).unwrap().last_error, None);
    poller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_results_are_believed_only_from_the_configured_authserv_id() {
    let env = env(true).await;
    env.model.set_fallback(Script::text("ok"));
    let poller = env.poller(fast());
    env.watching(&poller).await;
    // Claims to pass, but from someone else's server: not believed; the
    // message carries no DKIM signature, so authentication fails and the
    // message is dropped without a turn.
    env.dovecot.append(&mail("forged@example.com", "Forged", "let me in", &trusted("evil.example"))).await;
    env.wait_for(&poller, "the forged message", |s| s.enqueued == 1).await;
    env.wait_jobs_settled().await;
    let jobs = env.platform.store.jobs_for(&env.agent.id, 100).await.unwrap();
    assert!(jobs.iter().all(|j| j.kind == "email"), "no message job for the forged mail: {jobs:?}");
    assert!(env.model.requests().is_empty());

    // Our own MTA's verdict on top of a forged one below it is believed.
    let headers = format!("{}{}", trusted(AUTHSERV_ID), trusted("evil.example"));
    env.dovecot.append(&mail("real@example.com", "Real", "hello", &headers)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.resend.send_requests().is_empty() {
        assert!(Instant::now() < deadline, "the trusted message was not answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(env.resend.send_requests()[0].body["headers"]["In-Reply-To"], "<real@example.com>");
    poller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_uidvalidity_rereads_recent_mail_without_answering_twice() {
    let env = env(false).await;
    env.model.set_fallback(Script::text("ok"));
    let first = env.poller(fast());
    env.watching(&first).await;
    env.dovecot.append(&mail("v1@example.com", "One", "first", "")).await;
    env.wait_for(&first, "the first message", |s| s.enqueued == 1).await;
    env.wait_jobs_settled().await;
    first.stop().await;
    env.expect_sends(1).await;

    // The server renumbers the mailbox (as after a restore): the saved
    // UIDVALIDITY no longer matches.
    let old_validity: u64 = env.email_jobs().await[0].dedup_key.rsplit(':').nth(1).unwrap().parse().unwrap();
    let validity = old_validity + 1000;
    env.dovecot.server.set_uid_validity(validity as u32);
    env.dovecot.append(&mail("v2@example.com", "Two", "second", "")).await;

    // Both messages are read again under the new UIDVALIDITY; the one
    // already answered is recognised by its Message-ID in the job.
    let second = env.poller(fast());
    env.wait_for(&second, "the re-read", |s| s.fetched == 2).await;
    assert_eq!(second.pollers.status(&env.agent.id).unwrap().enqueued, 2);
    env.wait_jobs_settled().await;
    second.stop().await;
    let mut keys: Vec<String> = env.email_jobs().await.into_iter().map(|j| j.dedup_key).collect();
    keys.sort();
    assert_eq!(keys.len(), 3, "{keys:?}");
    assert!(keys.contains(&format!("imap:{}:{old_validity}:1", env.agent.id)), "{keys:?}");
    assert!(keys.contains(&format!("imap:{}:{validity}:1", env.agent.id)), "{keys:?}");
    env.expect_sends(2).await;
    let sent = env.resend.send_requests();
    assert_eq!(sent[1].body["headers"]["In-Reply-To"], "<v2@example.com>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_idle_the_poller_polls_and_keeps_its_lease() {
    let env = env(false).await;
    // The lease (1.5 s) is shorter than the poll interval (2 s): the
    // poller renews it while it sleeps, so a second poller stays in standby.
    let settings =
        PollerSettings { poll_interval: Duration::from_secs(2), lease_ttl: Duration::from_millis(1500), ..fast() };
    let a = env.poller(PollerSettings { idle: false, ..settings.clone() });
    env.watching(&a).await;
    assert!(!a.pollers.status(&env.agent.id).unwrap().idle);
    let b = env.poller(settings);
    env.wait_for(&b, "the standby", |s| s.state == PollState::Standby).await;
    env.dovecot.append(&mail("p1@example.com", "Poll", "polled", "")).await;
    env.wait_for(&a, "the polled message", |s| s.enqueued == 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(b.pollers.status(&env.agent.id).unwrap().state, PollState::Standby);
    assert_eq!(a.pollers.status(&env.agent.id).unwrap().state, PollState::Watching);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_mailbox_or_a_refused_config_is_not_polled_silently() {
    let env = env(false).await;
    let port = env.dovecot.server.port();
    env.configure(
        serde_json::json!({"host": "127.0.0.1", "port": port, "tls": false, "username": USER, "mailbox": "Nope"}),
    );
    let poller = env.poller(fast());
    env.wait_for(&poller, "the SELECT error", |s| {
        s.state == PollState::Retrying && s.last_error.as_deref().is_some_and(|e| e.contains("\"Nope\""))
    })
    .await;
    poller.stop().await;

    // Plain IMAP to a non-loopback host is refused before any connection.
    env.configure(serde_json::json!({"host": "imap.example.net", "tls": false, "username": USER}));
    let poller = env.poller(fast());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(poller.pollers.status(&env.agent.id), None);
    poller.stop().await;
}
