//! [`FakeResend`]: an axum server on loopback that speaks the part of the
//! Resend API tinyfat uses, records every request, and deduplicates sends by
//! `Idempotency-Key` like Resend does.
//!
//! Routes and shapes:
//! - `POST /emails`: a JSON body (`from, to, subject, html, text, headers,
//!   attachments, ...`). Answers `200 {"id": "<uuid-like id>"}`. A repeated
//!   `Idempotency-Key` answers the first response's id again and does not
//!   count as a new email (see [`FakeResend::emails`]). Scripted failures
//!   ([`FakeResend::fail_next_send`]) answer first, in order:
//!   `{status} {"statusCode","name","message"}` with an optional
//!   `retry-after` header (seconds); [`FakeResend::accept_then_fail_next_send`]
//!   also accepts the email first (a lost response).
//! - `GET /emails/receiving/{id}`: the received email stored with
//!   [`FakeResend::add_received`] (the JSON is served as given), else
//!   `404 {"statusCode":404,"name":"not_found","message":"Email not found"}`.
//!
//! It does not check API keys; tests assert on the recorded headers.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// One request the fake received.
#[derive(Clone, Debug)]
pub struct ResendRequest {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: BTreeMap<String, String>,
    /// The JSON body (`Null` when there was none or it was not JSON).
    pub body: Value,
    pub at: Instant,
}

impl ResendRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// A scripted failure for the next `POST /emails`.
#[derive(Clone, Debug)]
pub struct SendFailure {
    pub status: u16,
    pub name: String,
    pub retry_after_s: Option<u64>,
    /// Accept the email (as if sent) and answer the failure anyway: a
    /// response lost on the way back, or a client that crashed.
    pub accept: bool,
}

#[derive(Debug, Default)]
struct Inner {
    requests: Vec<ResendRequest>,
    received: BTreeMap<String, Value>,
    failures: VecDeque<SendFailure>,
    /// Idempotency-Key → the id answered for it.
    by_key: BTreeMap<String, String>,
    /// Accepted emails (one per distinct key, or per keyless request).
    emails: Vec<Value>,
    sequence: u64,
}

type Shared = Arc<Mutex<Inner>>;

/// A running fake; the server stops when the test's runtime ends.
#[derive(Clone, Debug)]
pub struct FakeResend {
    addr: SocketAddr,
    inner: Shared,
}

impl FakeResend {
    /// Starts on `127.0.0.1` with a port from the OS.
    pub async fn start() -> FakeResend {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let inner: Shared = Arc::default();
        let app = Router::new()
            .route("/emails", post(send))
            .route("/emails/receiving/{id}", get(received))
            .with_state(inner.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeResend { addr, inner }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash): `email.resend_base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `email` (the received-email API JSON) at
    /// `GET /emails/receiving/{email["id"]}`.
    pub fn add_received(&self, email: Value) {
        let id = email["id"].as_str().expect("the email needs an id").to_owned();
        self.inner.lock().expect("lock").received.insert(id, email);
    }

    /// The next `POST /emails` answers `status` (429 with `retry_after_s`,
    /// 500, 422 ...) instead of sending.
    pub fn fail_next_send(&self, status: u16, name: &str, retry_after_s: Option<u64>) {
        self.inner.lock().expect("lock").failures.push_back(SendFailure {
            status,
            name: name.to_owned(),
            retry_after_s,
            accept: false,
        });
    }

    /// The next `POST /emails` is accepted (deduplicated by its key like any
    /// other) but answers `status` anyway, as when the response is lost.
    pub fn accept_then_fail_next_send(&self, status: u16, name: &str, retry_after_s: Option<u64>) {
        self.inner.lock().expect("lock").failures.push_back(SendFailure {
            status,
            name: name.to_owned(),
            retry_after_s,
            accept: true,
        });
    }

    pub fn requests(&self) -> Vec<ResendRequest> {
        self.inner.lock().expect("lock").requests.clone()
    }

    /// Requests to `POST /emails`, failed ones and repeats included.
    pub fn send_requests(&self) -> Vec<ResendRequest> {
        self.requests().into_iter().filter(|r| r.method == "POST" && r.path == "/emails").collect()
    }

    /// Emails accepted: one per distinct `Idempotency-Key`.
    pub fn emails(&self) -> Vec<Value> {
        self.inner.lock().expect("lock").emails.clone()
    }
}

fn record(inner: &Shared, method: &str, path: String, headers: &HeaderMap, body: &[u8]) {
    let headers = headers
        .iter()
        .map(|(k, v)| (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let body = serde_json::from_slice(body).unwrap_or(Value::Null);
    inner.lock().expect("lock").requests.push(ResendRequest {
        method: method.into(),
        path,
        headers,
        body,
        at: Instant::now(),
    });
}

fn error(status: u16, name: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({"statusCode": status.as_u16(), "name": name, "message": message}))).into_response()
}

async fn send(State(inner): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    record(&inner, "POST", "/emails".into(), &headers, &body);
    let failure = inner.lock().expect("lock").failures.pop_front();
    if let Some(failure) = failure {
        if failure.accept {
            let _ = accept(&inner, &headers, &body);
        }
        let mut response = error(failure.status, &failure.name, "scripted failure");
        if let Some(s) = failure.retry_after_s {
            response.headers_mut().insert("retry-after", s.to_string().parse().expect("header value"));
        }
        return response;
    }
    accept(&inner, &headers, &body)
}

fn accept(inner: &Shared, headers: &HeaderMap, body: &[u8]) -> Response {
    let mut guard = inner.lock().expect("lock");
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return error(422, "validation_error", "the body is not JSON");
    };
    for field in ["from", "to", "subject"] {
        if json.get(field).is_none() {
            return error(422, "missing_required_field", &format!("missing `{field}` field"));
        }
    }
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    if let Some(key) = &key
        && let Some(id) = guard.by_key.get(key)
    {
        return axum::Json(json!({ "id": id })).into_response();
    }
    guard.sequence += 1;
    let id = format!("4ef9a417-02e9-4d39-ad75-{:012x}", guard.sequence);
    if let Some(key) = key {
        guard.by_key.insert(key, id.clone());
    }
    guard.emails.push(json);
    axum::Json(json!({ "id": id })).into_response()
}

async fn received(State(inner): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    record(&inner, "GET", format!("/emails/receiving/{id}"), &headers, b"");
    match inner.lock().expect("lock").received.get(&id) {
        Some(email) => axum::Json(email.clone()).into_response(),
        None => error(404, "not_found", "Email not found"),
    }
}
