//! An independent SMTP server for outbound tests: aiosmtpd (Python) in a
//! child process, with AUTH required, storing each message in a temporary
//! folder (`msg-N.eml` + `msg-N.json`). The test can script the next DATA
//! answers (`451 …`, `550 …`, `drop`, `hold SECONDS`). Must not be used by
//! the platform itself: it is the peer, never our code on both ends.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/peers/smtp_peer.py");

#[derive(Debug)]
pub struct SmtpPeer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl SmtpPeer {
    /// Starts aiosmtpd on an ephemeral loopback port, accepting `user`/`password`.
    pub fn start(user: &str, password: &str) -> SmtpPeer {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new("python3")
            .arg(SCRIPT)
            .arg(dir.path())
            .args([user, password])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs (scripts/test installs aiosmtpd)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line).expect("peer's port line");
        let port = line.trim().parse().unwrap_or_else(|_| panic!("aiosmtpd did not start: {line:?}"));
        SmtpPeer { child, port, dir }
    }

    /// The folder the peer stores messages in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The next DATA answers, in order ("451 …", "550 …", "drop", "hold 30").
    pub fn reply_with(&self, lines: &[&str]) {
        let mut f = std::fs::File::create(self.dir.path().join("replies")).expect("replies file");
        for line in lines {
            writeln!(f, "{line}").expect("write replies");
        }
    }

    /// Messages stored so far: (raw message, envelope recipients).
    pub fn messages(&self) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        for n in 1.. {
            let Ok(raw) = std::fs::read_to_string(self.dir.path().join(format!("msg-{n}.eml"))) else { break };
            let meta: Value = std::fs::read(self.dir.path().join(format!("msg-{n}.json")))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(Value::Null);
            let rcpt = meta["rcpt_tos"]
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            out.push((raw, rcpt));
        }
        out
    }

    /// Waits until `count` messages arrived (panics after `within`).
    pub fn wait_for(&self, count: usize, within: Duration) -> Vec<(String, Vec<String>)> {
        let deadline = Instant::now() + within;
        loop {
            let messages = self.messages();
            if messages.len() >= count {
                return messages;
            }
            assert!(Instant::now() < deadline, "{} of {count} messages arrived", messages.len());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The AUTH attempts the peer saw.
    pub fn logins(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("auth.log")).unwrap_or_default()
    }
}

impl Drop for SmtpPeer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
