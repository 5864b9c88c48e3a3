//! `tinyfat serve` as a real process polling a real Dovecot
//! (`tinyfat_testkit::Dovecot`): the agent is configured the way a user
//! does it (config.json `imap` block, `tinyfat secret set NAME
//! imap_password`), a delivered message is answered through the fake
//! Resend, the startup log says the mailbox is polled, the password never
//! reaches the log even at `TINYFAT_LOG=trace`, and after a restart nothing
//! is answered twice.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tinyfat_testkit::{Dovecot, FakeModel, FakeResend, Script, TestProcess, free_port};

const BIN: &str = env!("CARGO_BIN_EXE_tinyfat");
const USER: &str = "mailbot";
const PASSWORD: &str = "s3cret-imap-pass";

fn cli(data: &Path, args: &[&str], stdin: Option<&str>) -> Value {
    let mut child = Command::new(BIN)
        .args(args)
        .arg("--json")
        .env("TINYFAT_DATA_DIR", data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// `tinyfat serve` on `data`, logging to `log`; killed on drop.
fn serve(data: &Path, model: &FakeModel, resend: &FakeResend, log: &Path) -> TestProcess {
    let port = free_port();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("TINYFAT_DATA_DIR", data)
        .env("ANTHROPIC_API_KEY", "sk-test")
        .env("ANTHROPIC_BASE_URL", model.base_url())
        .env("RESEND_API_KEY", "re_test")
        .env("TINYFAT_EMAIL_RESEND_BASE_URL", resend.url())
        .env("TINYFAT_EMAIL_REQUIRE_AUTH", "false")
        .env("TINYFAT_SANDBOX_MODE", "none")
        .env("TINYFAT_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(log);
    TestProcess::spawn(&mut command, port)
}

async fn wait_until(what: &str, log: &Path, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        let tail: String =
            std::fs::read_to_string(log).unwrap_or_default().lines().rev().take(30).collect::<Vec<_>>().join("\n");
        assert!(Instant::now() < deadline, "timed out waiting for {what}; log tail:\n{tail}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().matches(needle).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_mail_from_an_imap_mailbox_once_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let log = tmp.path().join("serve.log");
    let dovecot = Dovecot::start(USER, PASSWORD);
    let model = FakeModel::start().await;
    model.set_fallback(Script::text("Got it, thanks."));
    let resend = FakeResend::start().await;

    let agent = cli(&data, &["agent", "create", "--owner", "alice@example.com", "--name", "inboxer"], None);
    let id = agent["id"].as_str().unwrap();
    let config_path = data.join("storage/agents").join(id).join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["imap"] = serde_json::json!({"host": "127.0.0.1", "port": dovecot.port(), "tls": false, "username": USER});
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
    cli(&data, &["secret", "set", "inboxer", "imap_password"], Some(PASSWORD));

    let mut server = serve(&data, &model, &resend, &log);
    wait_until("the poller to be ready", &log, || count(&log, "imap: ready") == 1).await;
    assert_eq!(count(&log, "imap: polling 1 mailbox(es): inboxer"), 1);
    // `/readyz` reports the mailbox (Dovecot offers IDLE).
    let deadline = Instant::now() + Duration::from_secs(30);
    let readiness = loop {
        let answer = match reqwest::get(server.url("/readyz")).await {
            Ok(response) => response.json::<Value>().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        if answer["adapters"]["imap"][id] == "ready: watching with IDLE" {
            break answer;
        }
        assert!(Instant::now() < deadline, "/readyz never reported the mailbox: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(readiness["ready"], true, "{readiness}");

    dovecot.deliver(
        b"From: Alice <alice@example.com>\r\nTo: mailbot@mail.test\r\nSubject: Lunch?\r\n\
          Message-ID: <lunch@example.com>\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\n\r\nAre you free at noon?\r\n",
    );
    wait_until("the reply", &log, || !resend.send_requests().is_empty()).await;
    let reply = &resend.send_requests()[0].body;
    assert_eq!(reply["subject"], "Re: Lunch?");
    assert_eq!(reply["headers"]["In-Reply-To"], "<lunch@example.com>");
    assert!(reply["text"].as_str().unwrap().contains("Got it, thanks."), "{reply}");

    // A restart (SIGTERM: the mailbox lease is released; after a crash the
    // next process waits for it to expire): the cursor holds.
    let status = Command::new("kill").args(["-TERM", &server.child().id().to_string()]).status().unwrap();
    assert!(status.success());
    server.child().wait().unwrap();
    let server = serve(&data, &model, &resend, &log);
    wait_until("the restarted poller", &log, || count(&log, "imap: ready") == 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(resend.send_requests().len(), 1, "answered once");
    drop(server);

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(PASSWORD), "the IMAP password reached the log");
    assert!(text.contains("imap: first look at this mailbox"), "first-look line missing");
}
