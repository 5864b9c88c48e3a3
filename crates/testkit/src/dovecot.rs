//! A real IMAP server for tests: Debian's Dovecot (`dovecot-imapd`), started
//! as its own instance per test — a temporary base_dir and state_dir, one
//! passwd-file user, a maildir in the temporary folder, plain IMAP on an
//! ephemeral 127.0.0.1 port, no TLS — and killed on drop. Mail is stored as
//! `nobody` (Dovecot refuses uid 0 for mail processes), so the folder is
//! made traversable.
//!
//! Not a fake: tests speak real IMAP to it. `deliver` drops a message into
//! the maildir as a local delivery agent would; tests that want to exercise
//! APPEND use their own client on `port()`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `nobody` / `nogroup` on Debian.
const MAIL_UID: u32 = 65534;

#[derive(Debug)]
pub struct Dovecot {
    dir: tempfile::TempDir,
    port: u16,
    user: String,
    child: Child,
}

impl Dovecot {
    /// Starts Dovecot with one user; panics with the fix when it is not
    /// installed.
    pub fn start(user: &str, password: &str) -> Dovecot {
        let binary = ["/usr/sbin/dovecot", "/usr/bin/dovecot"].into_iter().find(|p| Path::new(p).exists());
        let binary = binary.expect("dovecot is not installed: apt-get install dovecot-imapd (scripts/test does)");
        let dir = tempfile::tempdir().expect("temporary folder");
        let root = dir.path();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for sub in ["run", "state", "mail"] {
            std::fs::create_dir(root.join(sub)).expect("mkdir");
        }
        std::os::unix::fs::chown(root.join("mail"), Some(MAIL_UID), Some(MAIL_UID)).expect("chown mail");
        std::fs::write(root.join("passwd"), format!("{user}:{{PLAIN}}{password}\n")).expect("passwd");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let r = root.display();
        let config = format!(
            "base_dir = {r}/run\nstate_dir = {r}/state\nlog_path = {r}/dovecot.log\n\
             protocols = imap\nlisten = 127.0.0.1\nssl = no\ndisable_plaintext_auth = no\n\
             auth_mechanisms = plain login\nauth_failure_delay = 0\n\
             first_valid_uid = 1\nmail_uid = nobody\nmail_gid = nogroup\n\
             mail_location = maildir:{r}/mail/%u\n\
             passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN username_format=%u {r}/passwd\n}}\n\
             userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={r}/mail/%u\n}}\n\
             service imap-login {{\n  inet_listener imap {{\n    address = 127.0.0.1\n    port = {port}\n  }}\n  \
             inet_listener imaps {{\n    port = 0\n  }}\n}}\n"
        );
        std::fs::write(root.join("dovecot.conf"), config).expect("dovecot.conf");
        let child = Command::new(binary)
            .args(["-F", "-c"])
            .arg(root.join("dovecot.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dovecot starts");
        let dovecot = Dovecot { dir, port, user: user.to_owned(), child };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "dovecot did not start: {}", dovecot.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        dovecot
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Dovecot's own log (logins, errors), for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// Delivers a message into the user's INBOX the way a local delivery
    /// agent does: written in `tmp/`, renamed into `new/`.
    pub fn deliver(&self, raw: &[u8]) {
        let maildir = self.maildir();
        for sub in ["", "tmp", "new", "cur"] {
            let path = maildir.join(sub);
            if !path.exists() {
                std::fs::create_dir_all(&path).expect("maildir");
                std::os::unix::fs::chown(&path, Some(MAIL_UID), Some(MAIL_UID)).expect("chown maildir");
            }
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let name = format!("{nanos}.P{}.tinyfat-test", std::process::id());
        let tmp = maildir.join("tmp").join(&name);
        std::fs::write(&tmp, raw).expect("write mail");
        std::os::unix::fs::chown(&tmp, Some(MAIL_UID), Some(MAIL_UID)).expect("chown mail");
        std::fs::rename(&tmp, maildir.join("new").join(&name)).expect("deliver mail");
    }

    /// Sets INBOX's UIDVALIDITY (`doveadm mailbox update`), as a server
    /// does when it renumbers a mailbox (e.g. after a restore).
    pub fn set_uid_validity(&self, value: u32) {
        let doveadm = ["/usr/bin/doveadm", "/usr/sbin/doveadm"].into_iter().find(|p| Path::new(p).exists());
        let out = Command::new(doveadm.expect("doveadm is part of dovecot-core"))
            .arg("-c")
            .arg(self.dir.path().join("dovecot.conf"))
            .args(["mailbox", "update", "-u", &self.user, "--uid-validity", &value.to_string(), "INBOX"])
            .output()
            .expect("doveadm runs");
        assert!(out.status.success(), "doveadm: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn maildir(&self) -> PathBuf {
        self.dir.path().join("mail").join(&self.user)
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
