//! [`FakeModel`]: an axum server on loopback that answers model API calls
//! from a queue of [`Script`]s and records every request. It serves
//! `POST /v1/messages` (Anthropic) and `POST /v1/chat/completions` (OpenAI)
//! from one shared queue, plus two control routes for out-of-process use:
//! `GET /_fake/requests` (the recorded requests as JSON) and
//! `POST /_fake/scripts` (a JSON array of scripts to queue).
//!
//! It does not check API keys; tests assert on the recorded headers instead.
//! It does reject a body that is not JSON or does not ask to stream, with
//! the provider's 400 error, since a real client of ours must do both.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::script::Script;
use crate::wire::{Call, Rendered, error_body, render};

/// Recorded requests kept per server; later ones are counted, not kept.
pub const REQUESTS_MAX: usize = 10_000;
/// Largest request body accepted (images make bodies big).
pub const BODY_BYTES_MAX: usize = 64 << 20;

/// Which API a request used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    Anthropic,
    OpenAi,
}

/// One request as the fake received it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub api: Api,
    pub path: String,
    /// Header names lowercased; repeated headers joined by `, `.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

#[derive(Debug)]
struct Inner {
    scripts: VecDeque<Script>,
    fallback: Script,
    requests: Vec<RecordedRequest>,
    requests_dropped: usize,
    sequence: u64,
}

type Shared = Arc<Mutex<Inner>>;

/// A running fake model server. Dropping it stops the listener.
#[derive(Debug)]
pub struct FakeModel {
    addr: SocketAddr,
    state: Shared,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeModel {
    /// Starts on `127.0.0.1` with a port from the OS.
    pub async fn start() -> FakeModel {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).await.expect("bind 127.0.0.1:0")
    }

    /// Starts on `addr` (the standalone binary lets the user pick it).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<FakeModel> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state: Shared = Arc::new(Mutex::new(Inner {
            scripts: VecDeque::new(),
            fallback: Script::text("ok"),
            requests: Vec::new(),
            requests_dropped: 0,
            sequence: 0,
        }));
        let app = Router::new()
            .route("/v1/messages", post(anthropic))
            .route("/v1/chat/completions", post(openai))
            .route("/_fake/requests", get(recorded))
            .route("/_fake/scripts", post(push_scripts))
            .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            // Serving ends only with an I/O error on the listener or an abort.
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeModel { addr, state, server })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for either provider's base URL setting.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues a script; requests take scripts in order.
    pub fn push(&self, script: Script) {
        self.lock().scripts.push_back(script);
    }

    pub fn push_all(&self, scripts: impl IntoIterator<Item = Script>) {
        self.lock().scripts.extend(scripts);
    }

    /// The answer once the queue is empty (default: text `ok`).
    pub fn set_fallback(&self, script: Script) {
        self.lock().fallback = script;
    }

    /// Scripts not yet used.
    pub fn pending(&self) -> usize {
        self.lock().scripts.len()
    }

    /// Every request so far, oldest first (at most [`REQUESTS_MAX`]).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// Requests received beyond [`REQUESTS_MAX`] and therefore not recorded.
    pub fn requests_dropped(&self) -> usize {
        self.lock().requests_dropped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

async fn anthropic(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    answer(&state, Api::Anthropic, "/v1/messages", &headers, &body)
}

async fn openai(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    answer(&state, Api::OpenAi, "/v1/chat/completions", &headers, &body)
}

async fn recorded(State(state): State<Shared>) -> Response {
    let requests = state.lock().unwrap_or_else(|p| p.into_inner()).requests.clone();
    axum::Json(requests).into_response()
}

async fn push_scripts(State(state): State<Shared>, axum::Json(scripts): axum::Json<Vec<Script>>) -> StatusCode {
    state.lock().unwrap_or_else(|p| p.into_inner()).scripts.extend(scripts);
    StatusCode::NO_CONTENT
}

fn bad_request(api: Api, message: &str) -> Response {
    let body = error_body(api, "invalid_request_error", message);
    (StatusCode::BAD_REQUEST, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn answer(state: &Shared, api: Api, path: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return bad_request(api, "the request body is not JSON");
    };
    let mut recorded_headers = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        recorded_headers
            .entry(name.as_str().to_string())
            .and_modify(|v: &mut String| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    let model = body["model"].as_str().unwrap_or("fake-model").to_string();
    let streaming = body["stream"] == Value::Bool(true);
    let include_usage = body["stream_options"]["include_usage"] == Value::Bool(true);
    let (script, sequence) = {
        let mut inner = state.lock().unwrap_or_else(|p| p.into_inner());
        if inner.requests.len() < REQUESTS_MAX {
            inner.requests.push(RecordedRequest { api, path: path.to_string(), headers: recorded_headers, body });
        } else {
            inner.requests_dropped += 1;
        }
        if !streaming {
            drop(inner);
            return bad_request(api, "the fake model only streams: send \"stream\": true");
        }
        inner.sequence += 1;
        let script = inner.scripts.pop_front().unwrap_or_else(|| inner.fallback.clone());
        (script, inner.sequence)
    };
    respond(render(&Call { api, model: &model, include_usage, sequence }, &script))
}

fn respond(rendered: Rendered) -> Response {
    let Rendered { status, content_type, headers, frames, delay } = rendered;
    let frames = frames.into_iter().map(Bytes::from).enumerate();
    let body = futures_util::stream::unfold(frames, move |mut frames| async move {
        let (index, frame) = frames.next()?;
        if index > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Some((Ok::<_, Infallible>(frame), frames))
    });
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let map = response.headers_mut();
    map.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    for (name, value) in headers {
        if let Ok(value) = header::HeaderValue::from_str(&value) {
            map.insert(name, value);
        }
    }
    response
}
