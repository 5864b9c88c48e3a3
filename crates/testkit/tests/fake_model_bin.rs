//! The standalone `fake-model` binary: it prints its base URL first, answers
//! from the script file, takes more scripts over HTTP, and reports what it
//! received. Spoken to with raw HTTP/1.1, as any client would.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Kills the child when the test ends, pass or fail.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nx-api-key: k\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    (status, response)
}

#[tokio::test]
async fn serves_the_script_file_and_reports_requests() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.json");
    let scripts = json!([
        {"kind": "reply", "text": ["from ", "file"]},
        {"kind": "http_error", "status": 529, "error_type": "overloaded_error", "message": "Overloaded"},
    ]);
    std::fs::write(&script, scripts.to_string()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fake-model")).arg(&script).stdout(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    let _child = Child(child);
    let addr = first.trim().strip_prefix("http://").expect("a base URL on the first line").to_string();

    let body = json!({"model": "claude-x", "max_tokens": 5, "stream": true, "messages": []}).to_string();
    let (status, response) = http(&addr, "POST", "/v1/messages", &body).await;
    assert_eq!(status, 200);
    assert!(response.contains("event: message_start"), "{response}");
    assert!(response.contains("\"text\":\"file\""), "{response}");

    let (status, response) = http(&addr, "POST", "/v1/messages", &body).await;
    assert_eq!(status, 529);
    assert!(response.contains("overloaded_error"), "{response}");

    let (status, _) = http(&addr, "POST", "/_fake/scripts", r#"[{"kind": "reply", "text": ["pushed"]}]"#).await;
    assert_eq!(status, 204);
    let (_, response) = http(&addr, "POST", "/v1/messages", &body).await;
    assert!(response.contains("pushed"), "{response}");

    let (status, response) = http(&addr, "GET", "/_fake/requests", "").await;
    assert_eq!(status, 200);
    let json_start = response.find("\r\n\r\n").unwrap() + 4;
    let recorded: Value = serde_json::from_str(response[json_start..].trim()).unwrap();
    assert_eq!(recorded.as_array().unwrap().len(), 3);
    assert_eq!(recorded[0]["headers"]["x-api-key"], "k");
    assert_eq!(recorded[0]["body"]["model"], "claude-x");
}

#[test]
fn a_bad_script_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script.json");
    std::fs::write(&script, r#"{"kind": "reply"}"#).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_fake-model")).arg(&script).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a JSON array of scripts"));
}
