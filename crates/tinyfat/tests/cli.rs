//! The `tinyfat` binary as a user drives it: real processes on a real data
//! folder. Exit codes: 0 ok, 1 user error, 2 usage error.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn tinyfat(data: &Path, args: &[&str]) -> Output {
    tinyfat_with_stdin(data, args, "")
}

fn tinyfat_with_stdin(data: &Path, args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tinyfat"))
        .args(args)
        .env("TINYFAT_DATA_DIR", data)
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("TINYFAT_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn ok_json(data: &Path, args: &[&str]) -> Value {
    let out = tinyfat(data, args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: not one JSON document: {e}"))
}

fn fails(data: &Path, args: &[&str], code: i32, message: &str) {
    let out = tinyfat(data, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert!(stderr.contains(message), "{args:?}: expected {message:?} in {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}: errors go to stderr only");
}

#[test]
fn provisioning_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let created = ok_json(data, &["agent", "create", "--owner", "ann@example.com", "--json"]);
    let name = created["name"].as_str().unwrap().to_owned();
    assert!(created["id"].as_str().unwrap().starts_with("ag_"));
    assert!(name.bytes().all(|b| b.is_ascii_lowercase()), "{name}");
    assert_eq!(created["email"], format!("{name}@tinyfat.localhost"));
    assert_eq!(created["owner"], "ann@example.com");

    let prefix = data.join("storage/agents").join(created["id"].as_str().unwrap());
    for path in [
        "MEMORY.md",
        "config.json",
        "sessions",
        "outbox/email",
        "outbox/sending",
        "outbox/sent",
        "outbox/failed",
        "events",
        "attachments",
        "skills",
    ] {
        assert!(prefix.join(path).exists(), "layout is missing {path}");
    }
    let config: Value = serde_json::from_str(&std::fs::read_to_string(prefix.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["timezone"], "UTC");
    assert_eq!(config["network"], "off");
    assert!(std::fs::read_to_string(prefix.join("MEMORY.md")).unwrap().contains("ann@example.com"));

    ok_json(
        data,
        &["agent", "create", "--owner", "bob@example.com", "--name", "bobsbuddy", "--model", "openai:gpt-4o", "--json"],
    );
    let list = ok_json(data, &["agent", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let show = ok_json(data, &["agent", "show", "bobsbuddy", "--json"]);
    assert_eq!(show["model"], "openai:gpt-4o");
    assert_eq!(show["allowed_senders"], serde_json::json!(["bob@example.com"]));

    let allowed = ok_json(data, &["agent", "allow", "bobsbuddy", "@corp.example", "--json"]);
    assert_eq!(allowed["added"], true);
    ok_json(data, &["agent", "allow", "bobsbuddy", "telegram:12345", "--json"]);
    let show = ok_json(data, &["agent", "show", "bobsbuddy", "--json"]);
    assert_eq!(show["allowed_senders"], serde_json::json!(["@corp.example", "bob@example.com", "telegram:12345"]));
    let removed = ok_json(data, &["agent", "disallow", "bobsbuddy", "@corp.example", "--json"]);
    assert_eq!(removed["removed"], true);
    fails(data, &["agent", "allow", "bobsbuddy", "not a sender"], 1, "invalid sender");

    fails(data, &["agent", "delete", "bobsbuddy"], 1, "--yes");
    assert!(data.join("storage/agents").join(show["id"].as_str().unwrap()).exists());
    let deleted = ok_json(data, &["agent", "delete", "bobsbuddy", "--yes", "--json"]);
    assert_eq!(deleted["senders"], 2);
    assert!(!data.join("storage/agents").join(show["id"].as_str().unwrap()).exists());
    fails(data, &["agent", "show", "bobsbuddy"], 1, "no agent named \"bobsbuddy\"");
    assert_eq!(ok_json(data, &["agent", "list", "--json"]).as_array().unwrap().len(), 1);
}

#[test]
fn clear_errors_and_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    ok_json(data, &["agent", "create", "--owner", "ann@example.com", "--name", "taken", "--json"]);
    fails(data, &["agent", "create", "--owner", "ann@example.com", "--name", "taken"], 1, "already exists");
    fails(data, &["agent", "create", "--owner", "not-an-email"], 1, "invalid email address");
    fails(data, &["agent", "create", "--owner", "a@b.co", "--name", "postmaster"], 1, "reserved");
    fails(data, &["agent", "create", "--owner", "a@b.co", "--name", "Bad-Name"], 1, "lowercase letters");
    fails(data, &["agent", "show", "ghost"], 1, "no agent named \"ghost\"");
    fails(data, &["secret", "list", "ghost"], 1, "no agent named");
    fails(data, &["agent", "frobnicate"], 2, "unrecognized subcommand");
    fails(data, &["agent", "create"], 2, "--owner");
    let out = tinyfat(data, &["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("serve"));
}

#[test]
fn secrets_never_print_and_survive_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    ok_json(data, &["agent", "create", "--owner", "ann@example.com", "--name", "keeper", "--json"]);
    let value = "sk-cli-secret-VALUE-0001";
    let out = tinyfat_with_stdin(data, &["secret", "set", "keeper", "anthropic_api_key"], &format!("{value}\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(value));
    let list = ok_json(data, &["secret", "list", "keeper", "--json"]);
    assert_eq!(list[0]["name"], "anthropic_api_key");
    assert!(!list.to_string().contains(value));
    let old_key_id = list[0]["key_id"].as_str().unwrap().to_owned();

    fails(data, &["secret", "set", "keeper", "Bad Name"], 1, "invalid secret name");
    let rotated = ok_json(data, &["key", "rotate", "--json"]);
    assert_eq!(rotated["secrets"], 1);
    let list = ok_json(data, &["secret", "list", "keeper", "--json"]);
    assert_ne!(list[0]["key_id"], old_key_id.as_str());
    assert_eq!(list[0]["key_id"], rotated["key_id"]);

    let unset = ok_json(data, &["secret", "unset", "keeper", "anthropic_api_key", "--json"]);
    assert_eq!(unset["removed"], true);
    fails(data, &["secret", "unset", "keeper", "anthropic_api_key"], 1, "no secret named");
}

#[test]
fn export_writes_a_tar_of_the_prefix_without_following_links() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let created = ok_json(data, &["agent", "create", "--owner", "ann@example.com", "--name", "exporter", "--json"]);
    let prefix = data.join("storage/agents").join(created["id"].as_str().unwrap());
    std::fs::write(prefix.join("notes.txt"), "my notes").unwrap();
    std::os::unix::fs::symlink(data.join("master.key"), prefix.join("stolen-key")).unwrap();
    let archive = data.join("export.tar");
    let out = tinyfat(data, &["agent", "export", "exporter", "-o", archive.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped /data/stolen-key"));

    let listing = Command::new("tar").arg("-tf").arg(&archive).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    let base = format!("agents/{}/", created["id"].as_str().unwrap());
    for expected in ["MEMORY.md", "config.json", "notes.txt", "outbox/sent/"] {
        assert!(listing.lines().any(|l| l == format!("{base}{expected}")), "missing {expected} in\n{listing}");
    }
    assert!(!listing.contains("stolen-key"));
    let key = std::fs::read_to_string(data.join("master.key")).unwrap();
    let bytes = std::fs::read(&archive).unwrap();
    assert!(!bytes.windows(key.trim().len()).any(|w| w == key.trim().as_bytes()));
}

#[test]
fn serve_starts_with_zero_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_tinyfat"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .current_dir(tmp.path())
        .env_remove("TINYFAT_DATA_DIR")
        .env_remove("TINYFAT_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        log
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = loop {
        if let Ok(body) = http_get(port, "/healthz") {
            break body;
        }
        assert!(Instant::now() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok"), "{health}");
    let ready = http_get(port, "/readyz").unwrap();
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    assert!(ready.contains("\"ready\":true"), "{ready}");

    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert!(status.success(), "graceful shutdown on SIGTERM");
    let log = reader.join().unwrap();
    let data_dir = tmp.path().join("tinyfat-data");
    assert!(log.contains(&format!("data folder: {}", data_dir.display())), "{log}");
    assert!(log.contains(&format!("listening on http://127.0.0.1:{port}")), "{log}");
    assert!(log.contains("master key: generated a new key"), "{log}");
    assert!(data_dir.join("tinyfat.db").exists());
    assert!(data_dir.join("master.key").exists());
}

fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}
