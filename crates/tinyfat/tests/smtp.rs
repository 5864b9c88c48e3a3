//! The built-in SMTP listener end to end: a real `tinyfat serve` process
//! with `email.smtp_listen` set, driven by an independent SMTP client
//! (Python's smtplib, through a small script), the fake model answering and
//! the fake Resend receiving the reply. Covers delivery and the reply,
//! unknown recipients (550), the size limit (552, nothing enqueued),
//! STARTTLS with a certificate made by `openssl req`, bad commands (5xx, the
//! connection survives), duplicate delivery (one job), and `kill -9` right
//! after the 250 (answered exactly once after the restart).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tinyfat_testkit::{FakeModel, FakeResend, Script, TestProcess, free_port, wait_for_port};

const BIN: &str = env!("CARGO_BIN_EXE_tinyfat");
const OWNER: &str = "alice@example.com";
const AGENT: &str = "swiftpebble@tinyfat.localhost";

/// The SMTP peer: reads a JSON list of steps on stdin, prints one
/// `[code, text]` per step (the greeting first).
const CLIENT: &str = r#"
import json, smtplib, ssl, sys
host, port = sys.argv[1], int(sys.argv[2])
out = []
def rec(code, msg):
    out.append([code, msg.decode("utf-8", "replace") if isinstance(msg, bytes) else str(msg)])
s = smtplib.SMTP(timeout=30)
s._host = host  # for STARTTLS's server_hostname
rec(*s.connect(host, port))
for step in json.load(sys.stdin):
    op = step["op"]
    try:
        if op == "ehlo":
            rec(*s.ehlo(step.get("name", "client.example.com")))
        elif op == "starttls":
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            rec(*s.starttls(context=ctx))
        elif op == "cmd":
            s.putcmd(step["line"])
            rec(*s.getreply())
        elif op == "mail":
            rec(*s.mail(step["from"], step.get("options", [])))
        elif op == "rcpt":
            rec(*s.rcpt(step["to"]))
        elif op == "data":
            with open(step["file"], "rb") as f:
                rec(*s.data(f.read()))
        elif op == "sleep":
            import time
            open(step["then_touch"], "w").close()
            time.sleep(step["s"])
            continue
        elif op == "quit":
            rec(*s.quit())
    except smtplib.SMTPResponseException as e:
        rec(e.smtp_code, e.smtp_error)
    except (smtplib.SMTPServerDisconnected, OSError) as e:
        rec(-1, "disconnected: %s" % e)
        break
print(json.dumps(out))
"#;

/// Starts `tinyfat serve` with the SMTP listener on `env.smtp_port` and
/// waits for that port.
fn start_server(env: &Env, extra: &[(&str, &str)]) -> TestProcess {
    let http = free_port();
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--listen", &format!("127.0.0.1:{http}")])
        .env("TINYFAT_DATA_DIR", &env.data)
        .env("TINYFAT_SANDBOX_MODE", "none")
        .env("ANTHROPIC_API_KEY", "sk-test")
        .env("ANTHROPIC_BASE_URL", env.fake.base_url())
        .env("RESEND_API_KEY", "re_test_key")
        .env("TINYFAT_EMAIL_RESEND_BASE_URL", env.resend.url())
        // No DNS here, so SPF/DKIM cannot be evaluated.
        .env("TINYFAT_EMAIL_REQUIRE_AUTH", "false")
        .env("TINYFAT_EMAIL_SMTP_LISTEN", format!("127.0.0.1:{}", env.smtp_port))
        .env("TINYFAT_GATEWAY_EMAIL_BODY_BYTES_MAX", "100000")
        .env("TINYFAT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, v) in extra {
        command.env(k, v);
    }
    let server = TestProcess::spawn(&mut command, http);
    wait_for_port(env.smtp_port);
    server
}

struct Env {
    _tmp: tempfile::TempDir,
    data: PathBuf,
    fake: FakeModel,
    resend: FakeResend,
    smtp_port: u16,
    agent_id: String,
}

fn cli(data: &Path, args: &[&str]) -> Value {
    let out = Command::new(BIN).args(args).arg("--json").env("TINYFAT_DATA_DIR", data).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let agent = cli(&data, &["agent", "create", "--owner", OWNER, "--name", "swiftpebble"]);
    std::fs::write(tmp.path().join("client.py"), CLIENT).unwrap();
    Env {
        data,
        fake: FakeModel::start().await,
        resend: FakeResend::start().await,
        smtp_port: free_port(),
        agent_id: agent["id"].as_str().unwrap().to_owned(),
        _tmp: tmp,
    }
}

impl Env {
    /// Runs the smtplib client; one `(code, text)` per step, greeting first.
    fn smtp(&self, steps: Value) -> Vec<(i64, String)> {
        Self::replies(self.smtp_spawn(steps))
    }

    fn smtp_spawn(&self, steps: Value) -> Child {
        let mut child = Command::new("python3")
            .arg(self._tmp.path().join("client.py"))
            .args(["127.0.0.1", &self.smtp_port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs (scripts/test installs it)");
        child.stdin.take().unwrap().write_all(steps.to_string().as_bytes()).unwrap();
        child
    }

    fn replies(child: Child) -> Vec<(i64, String)> {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "smtplib client failed: {}", String::from_utf8_lossy(&out.stderr));
        let replies: Vec<(i64, String)> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(replies[0].0, 220, "greeting: {replies:?}");
        replies
    }

    /// Writes a message file and returns its path.
    fn message(&self, name: &str, message_id: Option<&str>, body: &str) -> String {
        let mut text = format!("From: Alice <{OWNER}>\r\nTo: {AGENT}\r\nSubject: Hello\r\n");
        if let Some(id) = message_id {
            text.push_str(&format!("Message-ID: {id}\r\n"));
        }
        text.push_str(&format!("Date: Wed, 25 Nov 2026 12:00:00 +0000\r\n\r\n{body}\r\n"));
        let path = self._tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }

    /// EHLO, MAIL, RCPT for each of `to`, DATA of `file`, QUIT.
    fn send(&self, to: &[&str], file: &str) -> Vec<(i64, String)> {
        let mut steps = vec![json!({"op": "ehlo"}), json!({"op": "mail", "from": OWNER})];
        steps.extend(to.iter().map(|t| json!({"op": "rcpt", "to": t})));
        steps.push(json!({"op": "data", "file": file}));
        steps.push(json!({"op": "quit"}));
        self.smtp(Value::Array(steps))
    }

    async fn email_jobs(&self) -> Vec<tinyfat_store::Job> {
        let store =
            tinyfat_store::connect(&format!("sqlite://{}", self.data.join("tinyfat.db").display())).await.unwrap();
        let id = tinyfat_core::AgentId::parse(&self.agent_id).unwrap();
        store.jobs_for(&id, 1000).await.unwrap().into_iter().filter(|j| j.kind == "email").collect()
    }

    /// Waits until the fake Resend has accepted `n` emails.
    async fn wait_for_emails(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let emails = self.resend.emails();
            if emails.len() >= n {
                return emails;
            }
            assert!(Instant::now() < deadline, "{n} replies expected, got {}", emails.len());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn codes(replies: &[(i64, String)]) -> Vec<i64> {
    replies.iter().map(|r| r.0).collect()
}

fn raw_of(job: &tinyfat_store::Job) -> String {
    use base64::Engine as _;
    let payload: Value = serde_json::from_str(&job.payload).unwrap();
    let raw = base64::engine::general_purpose::STANDARD.decode(payload["raw_b64"].as_str().unwrap()).unwrap();
    String::from_utf8(raw).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_to_an_agent_is_accepted_and_answered_and_unknown_recipients_get_550() {
    let env = env().await;
    let server = start_server(&env, &[]);
    let ready: Value = reqwest::get(server.url("/readyz")).await.unwrap().json().await.unwrap();
    let smtp = format!("ready: listening on 127.0.0.1:{}, STARTTLS off", env.smtp_port);
    assert_eq!(ready["adapters"]["smtp"], smtp.as_str(), "{ready}");
    env.fake.push(Script::text("Hi Alice, got it."));
    let file = env.message("m1.eml", Some("<m1@example.com>"), "Are you there?\r\n.A line that starts with a dot");
    let replies = env.send(&[AGENT, "nobody@tinyfat.localhost", "start@tinyfat.localhost", "x@elsewhere.test"], &file);
    // greeting, EHLO, MAIL, 4×RCPT, DATA, QUIT
    assert_eq!(codes(&replies), [220, 250, 250, 250, 550, 550, 550, 250, 221], "{replies:?}");
    for unknown in &replies[4..7] {
        assert!(unknown.1.starts_with("5.1.1"), "{replies:?}");
    }
    assert!(replies[1].1.contains("SIZE 100000") && !replies[1].1.contains("STARTTLS"), "{replies:?}");

    let jobs = env.email_jobs().await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].dedup_key, format!("smtp:{}:m1@example.com", env.agent_id));
    let payload: Value = serde_json::from_str(&jobs[0].payload).unwrap();
    assert_eq!(payload["provider"], "smtp");
    assert_eq!(payload["envelope"]["mail_from"], OWNER);
    assert_eq!(payload["envelope"]["helo"], "client.example.com");
    let raw = raw_of(&jobs[0]);
    assert!(raw.contains("\r\n.A line that starts with a dot\r\n"), "dot-unstuffed: {raw:?}");
    assert!(!raw.contains(".."), "{raw:?}");

    let emails = env.wait_for_emails(1).await;
    assert_eq!(emails[0]["to"], json!([OWNER]));
    assert_eq!(emails[0]["subject"], "Re: Hello");
    assert!(emails[0]["text"].as_str().unwrap().contains("Hi Alice, got it."), "{}", emails[0]);
    let asked = env.fake.requests();
    assert_eq!(asked.len(), 1);
    assert!(asked[0].body.to_string().contains("Are you there?"));

    // A message for nobody known: refused at RCPT, DATA then has no recipients.
    let replies = env.send(&["ghost@tinyfat.localhost"], &file);
    assert_eq!(codes(&replies)[..4], [220, 250, 250, 550], "{replies:?}");
    assert!(replies[4].0 == 503 || replies[4].0 == -1, "DATA without a recipient: {replies:?}");
    assert_eq!(env.email_jobs().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_by_mail_cancels_the_running_turn_without_waiting_behind_it() {
    let env = env().await;
    let _server = start_server(&env, &[]);
    let deltas: Vec<String> = (0..20).map(|i| format!("chunk{i} ")).collect();
    let deltas: Vec<&str> = deltas.iter().map(String::as_str).collect();
    env.fake.push(Script::text_deltas(&deltas).with_chunk_delay(Duration::from_millis(300)));

    let story = env.message("story.eml", Some("<story@example.com>"), "Tell me a long story.");
    assert_eq!(codes(&env.send(&[AGENT], &story)), [220, 250, 250, 250, 250, 221]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.fake.requests().is_empty() {
        assert!(Instant::now() < deadline, "the turn never called the model");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The stop mail's job would wait behind the 6 s turn (it needs the
    // agent's lease); the listener stops the turn as the mail arrives.
    let stop = env.message(
        "stop.eml",
        Some("<stop@example.com>"),
        "Stop\r\n\r\nOn Wed, Alice wrote:\r\n> Tell me a long story.",
    );
    let sent_at = Instant::now();
    assert_eq!(codes(&env.send(&[AGENT], &stop)), [220, 250, 250, 250, 250, 221]);
    let emails = env.wait_for_emails(1).await;
    let stopped_after = sent_at.elapsed();
    let text = emails[0]["text"].as_str().unwrap();
    assert!(text.starts_with("Stopped."), "the story's thread is told it stopped: {text:?}");
    assert!(!text.contains("chunk19"), "{text:?}");
    assert!(stopped_after < Duration::from_secs(4), "stop took {stopped_after:?}");

    // The stop mail's own job runs after the turn and answers nothing more
    // (no "Nothing is running." next to "Stopped.").
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let jobs = env.email_jobs().await;
        if jobs.len() == 2 && jobs.iter().all(|j| j.state == tinyfat_store::JobState::Done) {
            break;
        }
        assert!(Instant::now() < deadline, "the email jobs did not finish: {jobs:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.resend.emails().len(), 1, "{:?}", env.resend.emails());
    assert_eq!(env.fake.requests().len(), 1, "the stop mail started no turn");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_message_gets_552_and_nothing_is_enqueued() {
    let env = env().await;
    let _server = start_server(&env, &[]);
    let big = env.message("big.eml", Some("<big@example.com>"), &"x".repeat(76).repeat(2000));
    let small = env.message("small.eml", Some("<small@example.com>"), "short");
    let replies = env.smtp(json!([
        {"op": "ehlo"},
        // Declared too big: refused at MAIL.
        {"op": "mail", "from": OWNER, "options": ["SIZE=5000000"]},
        // Not declared: read to the end, then refused.
        {"op": "mail", "from": OWNER},
        {"op": "rcpt", "to": AGENT},
        {"op": "data", "file": big},
        // The connection goes on: a small message is accepted.
        {"op": "mail", "from": OWNER, "options": ["SIZE=500"]},
        {"op": "rcpt", "to": AGENT},
        {"op": "data", "file": small},
        {"op": "quit"},
    ]));
    assert_eq!(codes(&replies), [220, 250, 552, 250, 250, 552, 250, 250, 250, 221], "{replies:?}");
    assert!(replies[5].1.contains("5.3.4"), "{replies:?}");
    // Far beyond the limit the listener stops reading and hangs up.
    let huge = env.message("huge.eml", Some("<huge@example.com>"), &"z".repeat(76).repeat(8000));
    let replies = env.send(&[AGENT], &huge);
    assert_eq!(codes(&replies)[..4], [220, 250, 250, 250], "{replies:?}");
    assert!(replies[4].0 == 552 || replies[4].0 == -1, "{replies:?}");
    assert_eq!(replies.last().unwrap().0, -1, "the connection was closed: {replies:?}");

    let jobs = env.email_jobs().await;
    assert_eq!(jobs.len(), 1, "only the small message");
    assert!(jobs[0].dedup_key.ends_with(":small@example.com"));
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_commands_get_5xx_and_the_connection_survives() {
    let env = env().await;
    let _server = start_server(&env, &[]);
    let file = env.message("ok.eml", Some("<ok@example.com>"), "after the noise");
    let long = format!("NOOP {}", "y".repeat(5000));
    let replies = env.smtp(json!([
        {"op": "cmd", "line": format!("MAIL FROM:<{OWNER}>")},
        {"op": "cmd", "line": "HELO"},
        {"op": "ehlo"},
        {"op": "cmd", "line": "FROBNICATE now"},
        {"op": "cmd", "line": "MAIL FROM:<not closed"},
        {"op": "cmd", "line": format!("RCPT TO:<{AGENT}>")},
        {"op": "cmd", "line": "DATA"},
        {"op": "cmd", "line": long},
        {"op": "cmd", "line": "STARTTLS"},
        {"op": "cmd", "line": "BDAT 10 LAST"},
        {"op": "cmd", "line": "NOOP"},
        {"op": "mail", "from": OWNER},
        {"op": "cmd", "line": "MAIL FROM:<other@example.com>"},
        {"op": "cmd", "line": "RSET"},
        {"op": "mail", "from": OWNER},
        {"op": "rcpt", "to": AGENT},
        {"op": "data", "file": file},
        {"op": "quit"},
    ]));
    let got = codes(&replies);
    assert_eq!(got[1], 503, "MAIL before EHLO: {replies:?}");
    assert_eq!(got[2] / 100, 5, "HELO without a name: {replies:?}");
    assert_eq!(got[3], 250);
    assert_eq!(got[4], 500, "unknown command: {replies:?}");
    assert_eq!(got[5], 501, "bad address syntax: {replies:?}");
    assert_eq!(got[6], 503, "RCPT before MAIL: {replies:?}");
    assert_eq!(got[7], 503, "DATA before MAIL: {replies:?}");
    assert_eq!(got[8], 500, "line too long: {replies:?}");
    assert_eq!(got[9], 502, "STARTTLS without a certificate: {replies:?}");
    assert_eq!(got[10], 502, "BDAT is not offered: {replies:?}");
    assert_eq!(got[11..], [250, 250, 503, 250, 250, 250, 250, 221], "{replies:?}");
    assert_eq!(env.email_jobs().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_message_delivered_twice_is_enqueued_and_answered_once() {
    let env = env().await;
    let _server = start_server(&env, &[]);
    env.fake.push(Script::text("Once."));
    let file = env.message("dup.eml", Some("<dup@example.com>"), "sent twice");
    assert_eq!(codes(&env.send(&[AGENT], &file)), [220, 250, 250, 250, 250, 221]);
    assert_eq!(codes(&env.send(&[AGENT, AGENT], &file)), [220, 250, 250, 250, 250, 250, 221]);
    // Without a Message-ID the content decides.
    let bare = env.message("bare.eml", None, "no id here");
    env.fake.push(Script::text("Once more."));
    assert_eq!(codes(&env.send(&[AGENT], &bare)), [220, 250, 250, 250, 250, 221]);
    assert_eq!(codes(&env.send(&[AGENT], &bare)), [220, 250, 250, 250, 250, 221]);
    let jobs = env.email_jobs().await;
    assert_eq!(jobs.len(), 2, "{:?}", jobs.iter().map(|j| &j.dedup_key).collect::<Vec<_>>());
    env.wait_for_emails(2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.resend.emails().len(), 2);
    assert_eq!(env.fake.requests().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_with_a_test_certificate_then_delivery_works() {
    let env = env().await;
    let dir = env._tmp.path();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=tinyfat.localhost"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl runs");
    assert!(status.success());

    // An unreadable key stops startup with a message naming the setting.
    let out = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", free_port())])
        .env("TINYFAT_DATA_DIR", &env.data)
        .env("TINYFAT_SANDBOX_MODE", "none")
        .env("TINYFAT_EMAIL_SMTP_LISTEN", format!("127.0.0.1:{}", env.smtp_port))
        .env("TINYFAT_EMAIL_SMTP_TLS_CERT", &cert)
        .env("TINYFAT_EMAIL_SMTP_TLS_KEY", dir.join("missing-key.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("email.smtp_tls_key") && stderr.contains("missing-key.pem"), "{stderr}");

    let cert_s = cert.display().to_string();
    let key_s = key.display().to_string();
    let _server =
        start_server(&env, &[("TINYFAT_EMAIL_SMTP_TLS_CERT", &cert_s), ("TINYFAT_EMAIL_SMTP_TLS_KEY", &key_s)]);
    env.fake.push(Script::text("Encrypted hello."));
    let file = env.message("tls.eml", Some("<tls@example.com>"), "over TLS");
    let replies = env.smtp(json!([
        {"op": "ehlo"},
        {"op": "starttls"},
        {"op": "ehlo"},
        {"op": "mail", "from": OWNER},
        {"op": "rcpt", "to": AGENT},
        {"op": "data", "file": file},
        {"op": "quit"},
    ]));
    assert_eq!(codes(&replies), [220, 250, 220, 250, 250, 250, 250, 221], "{replies:?}");
    assert!(replies[1].1.contains("STARTTLS"), "offered before TLS: {replies:?}");
    assert!(!replies[3].1.contains("STARTTLS"), "not offered again inside TLS: {replies:?}");
    let emails = env.wait_for_emails(1).await;
    assert!(emails[0]["text"].as_str().unwrap().contains("Encrypted hello."));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_9_right_after_the_250_still_answers_exactly_once() {
    let env = env().await;
    let server = start_server(&env, &[]);
    // A slow answer, so the kill lands while the turn runs (or before).
    env.fake.push(Script::text_deltas(&["one ", "two ", "three"]).with_chunk_delay(Duration::from_millis(500)));
    let file = env.message("crash.eml", Some("<crash@example.com>"), "survive this");
    assert_eq!(codes(&env.send(&[AGENT], &file)), [220, 250, 250, 250, 250, 221]);
    server.kill9();
    assert_eq!(env.email_jobs().await.len(), 1, "the acknowledged message is durable");
    assert!(env.resend.emails().is_empty());

    env.fake.push(Script::text("one two three"));
    let _server = start_server(&env, &[]);
    let emails = env.wait_for_emails(1).await;
    assert!(emails[0]["text"].as_str().unwrap().contains("one two three"), "{}", emails[0]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.resend.emails().len(), 1, "answered exactly once");
    assert_eq!(env.email_jobs().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_closes_idle_sessions_with_421_and_the_server_exits() {
    let env = env().await;
    let mut server = start_server(&env, &[]);
    let marker = env._tmp.path().join("in-session");
    let client = env.smtp_spawn(json!([
        {"op": "ehlo"},
        {"op": "sleep", "s": 2, "then_touch": marker.display().to_string()},
        {"op": "cmd", "line": "NOOP"},
    ]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the client never got past EHLO");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = Command::new("kill").args(["-TERM", &server.child().id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = server.child().try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the server did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
    let replies = Env::replies(client);
    assert_eq!(replies[1].0, 250);
    assert_eq!(replies[2].0, 421, "told to come back later: {replies:?}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", env.smtp_port)).is_err(), "no longer listening");
}

/// Runs SQL on the server's database with Python's sqlite3 (a second,
/// independent writer), to make the store fail the way a full disk would.
fn sql(env: &Env, statement: &str) {
    let script =
        "import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], timeout=30)\nc.execute(sys.argv[2])\nc.commit()\n";
    let out =
        Command::new("python3").args(["-c", script]).arg(env.data.join("tinyfat.db")).arg(statement).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_failure_answers_451_and_the_senders_retry_is_accepted_once() {
    let env = env().await;
    let _server = start_server(&env, &[]);
    sql(&env, "CREATE TRIGGER refuse_jobs BEFORE INSERT ON jobs BEGIN SELECT RAISE(ABORT, 'disk full'); END");
    let file = env.message("retry.eml", Some("<retry@example.com>"), "try me later");
    let replies = env.send(&[AGENT], &file);
    assert_eq!(codes(&replies), [220, 250, 250, 250, 451, 221], "{replies:?}");
    assert!(replies[4].1.starts_with("4.3.0"), "{replies:?}");
    assert!(env.email_jobs().await.is_empty());

    sql(&env, "DROP TRIGGER refuse_jobs");
    env.fake.push(Script::text("Got it the second time."));
    assert_eq!(codes(&env.send(&[AGENT], &file)), [220, 250, 250, 250, 250, 221]);
    assert_eq!(env.email_jobs().await.len(), 1);
    let emails = env.wait_for_emails(1).await;
    assert!(emails[0]["text"].as_str().unwrap().contains("second time"));
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_over_the_limit_get_421() {
    let env = env().await;
    let _server = start_server(&env, &[("TINYFAT_EMAIL_SMTP_CONNECTIONS_MAX", "1")]);
    let marker = env._tmp.path().join("holding");
    let holder = env.smtp_spawn(json!([
        {"op": "ehlo"},
        {"op": "sleep", "s": 3, "then_touch": marker.display().to_string()},
        {"op": "quit"},
    ]));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the first client never got past EHLO");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = env.smtp_spawn(json!([{"op": "ehlo"}]));
    let out = second.wait_with_output().unwrap();
    let replies: Vec<(i64, String)> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(replies[0].0, 421, "{replies:?}");
    assert_eq!(codes(&Env::replies(holder)), [220, 250, 221]);
    // The slot is free again.
    assert_eq!(codes(&env.smtp(json!([{"op": "ehlo"}, {"op": "quit"}]))), [220, 250, 221]);
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_to_start_over_smtp_provisions_an_agent_when_self_provisioning_is_on() {
    let env = env().await;
    // Off (the default): start@ is no mailbox.
    {
        let _server = start_server(&env, &[]);
        let file = env.message("start-off.eml", Some("<start-off@newcomer.example>"), "hi");
        let replies = env.send(&["start@tinyfat.localhost"], &file);
        assert_eq!(codes(&replies)[3], 550, "{replies:?}");
    }
    let _server = start_server(&env, &[("TINYFAT_PROVISIONING_ALLOW", "@newcomer.example")]);
    let text = "From: Bob <bob@newcomer.example>\r\nTo: start@tinyfat.localhost\r\nSubject: start\r\n\
                Message-ID: <start-1@newcomer.example>\r\nDate: Wed, 25 Nov 2026 12:00:00 +0000\r\n\r\nhello\r\n";
    let path = env._tmp.path().join("start.eml");
    std::fs::write(&path, text).unwrap();
    let steps = json!([
        {"op": "ehlo"}, {"op": "mail", "from": "bob@newcomer.example"},
        {"op": "rcpt", "to": "start@tinyfat.localhost"}, {"op": "data", "file": path.display().to_string()},
        {"op": "quit"}
    ]);
    assert_eq!(codes(&env.smtp(steps)), [220, 250, 250, 250, 250, 221]);

    // The start job creates Bob's agent and welcomes him from start@.
    // A welcome from start@ and a hello from the new agent, both to Bob.
    let emails = env.wait_for_emails(2).await;
    assert!(emails.iter().all(|e| e["to"][0] == "bob@newcomer.example"), "{emails:?}");
    assert!(emails.iter().any(|e| e["from"].as_str().unwrap().contains("start@tinyfat.localhost")), "{emails:?}");
    assert!(emails.iter().any(|e| e["subject"].as_str().unwrap().starts_with("Hello from")), "{emails:?}");
    let agents = cli(&env.data, &["agent", "list"]);
    let owners: Vec<&str> = agents.as_array().unwrap().iter().filter_map(|a| a["owner"].as_str()).collect();
    assert!(owners.contains(&"bob@newcomer.example"), "{agents}");
}
