//! The HTTP transport shared by both adapters: one pooled `reqwest` client
//! with its time and size limits, the POST that starts a stream, the mapping
//! of HTTP statuses to [`ModelError`] decisions, and the bounded loop that
//! reads server-sent events while watching the cancel token.
//!
//! It knows the shape of provider error bodies (`{"error": {"type",
//! "message"}}`, common to both APIs) but not their event payloads.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use reqwest::header::{self, HeaderMap};

use crate::sse::{SseDecoder, SseEvent};
use crate::{CancelToken, ModelError, Provider};

/// Time and size limits of model calls. The defaults suit the hosted APIs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    /// Longest silence between two reads of a streaming body. Anthropic sends
    /// `ping` events, so a silent stream is a dead one.
    pub idle_timeout: Duration,
    /// Longest a whole call may take, headers to last byte.
    pub request_timeout: Duration,
    pub sse_line_bytes_max: usize,
    pub sse_event_bytes_max: usize,
    /// Total streamed body bytes of one response.
    pub response_bytes_max: usize,
    /// Assembled JSON input of one tool call.
    pub tool_input_bytes_max: usize,
    /// Content blocks (Anthropic) or tool calls (OpenAI) in one response.
    pub content_blocks_max: usize,
    /// How much of an error response body is read to explain the error.
    pub error_body_bytes_max: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            request_timeout: Duration::from_secs(900),
            sse_line_bytes_max: 1 << 20,
            sse_event_bytes_max: 1 << 20,
            response_bytes_max: 32 << 20,
            tool_input_bytes_max: 8 << 20,
            content_blocks_max: 256,
            error_body_bytes_max: 64 << 10,
        }
    }
}

/// A pooled HTTP client plus the limits every call obeys. Cheap to clone;
/// build one per process and share it.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: reqwest::Client,
    options: Arc<ClientOptions>,
}

/// Whether the event handler wants more events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    More,
    Done,
}

impl HttpClient {
    pub fn new(options: ClientOptions) -> Result<Self, ModelError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("tinyfat/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.idle_timeout)
            .timeout(options.request_timeout)
            .build()
            .map_err(|e| ModelError::Permanent { message: format!("cannot build the HTTP client: {}", chain(&e)) })?;
        Ok(Self { client, options: Arc::new(options) })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// POSTs `body` (serialised JSON) and returns the response once it has a
    /// success status and an event-stream body; anything else becomes the
    /// matching error.
    pub(crate) async fn post_stream(
        &self,
        provider: Provider,
        url: &str,
        headers: HeaderMap,
        body: Vec<u8>,
        cancel: &CancelToken,
    ) -> Result<reqwest::Response, ModelError> {
        if cancel.is_cancelled() {
            return Err(ModelError::Cancelled);
        }
        // `headers` carry the JSON content type.
        let send = self.client.post(url).headers(headers).header(header::ACCEPT, "text/event-stream").body(body).send();
        let mut response = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(ModelError::Cancelled),
            sent = send => sent.map_err(|e| transport_error(provider, e))?,
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers(), SystemTime::now());
            let body = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(ModelError::Cancelled),
                body = read_capped(&mut response, self.options.error_body_bytes_max) => body,
            };
            return Err(status_error(provider, status.as_u16(), retry_after, &body));
        }
        let content_type =
            response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("text/event-stream");
        if !content_type.starts_with("text/event-stream") {
            return Err(ModelError::protocol(format!("{provider} answered with {content_type}, not an event stream")));
        }
        Ok(response)
    }

    /// Reads the event stream, handing each event to `on_event` until it
    /// answers [`Flow::Done`] or the body ends. Returns which happened.
    pub(crate) async fn read_events(
        &self,
        provider: Provider,
        mut response: reqwest::Response,
        cancel: &CancelToken,
        mut on_event: impl FnMut(SseEvent) -> Result<Flow, ModelError>,
    ) -> Result<Flow, ModelError> {
        let options = &self.options;
        let mut decoder = SseDecoder::new(options.sse_line_bytes_max, options.sse_event_bytes_max);
        let mut events = Vec::new();
        let mut received_bytes = 0usize;
        loop {
            let chunk = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(ModelError::Cancelled),
                chunk = response.chunk() => chunk.map_err(|e| transport_error(provider, e))?,
            };
            let ended = match chunk {
                Some(bytes) => {
                    received_bytes += bytes.len();
                    if received_bytes > options.response_bytes_max {
                        return Err(ModelError::protocol(format!(
                            "the {provider} response exceeds {} bytes",
                            options.response_bytes_max
                        )));
                    }
                    decoder.push(&bytes, &mut events)?;
                    false
                }
                None => {
                    decoder.finish(&mut events)?;
                    true
                }
            };
            for event in events.drain(..) {
                if on_event(event)? == Flow::Done {
                    return Ok(Flow::Done);
                }
            }
            if ended {
                return Ok(Flow::More);
            }
        }
    }
}

/// The URL of an API path under a base URL. The rule: trailing slashes are
/// dropped, and `/v1` is inserted unless the base already ends in `/v1`, so
/// `https://api.openai.com`, `https://api.openai.com/v1` and
/// `http://localhost:11434/v1/` all work.
pub(crate) fn endpoint(base_url: &str, path: &str) -> String {
    let base = base_url.trim().trim_end_matches('/');
    if base.ends_with("/v1") { format!("{base}/{path}") } else { format!("{base}/v1/{path}") }
}

/// Reads at most `bytes_max` of a body, lossily as text; errors end the read.
async fn read_capped(response: &mut reqwest::Response, bytes_max: usize) -> String {
    let mut body = Vec::new();
    while body.len() < bytes_max {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(bytes_max - body.len())]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

/// An error with its sources, without the URL (a base URL may hold proxy
/// credentials).
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub(crate) fn transport_error(provider: Provider, err: reqwest::Error) -> ModelError {
    if err.is_builder() {
        // A malformed base URL: retrying cannot help, the configuration must change.
        return ModelError::Permanent {
            message: format!(
                "the {provider} base URL is not a valid http(s) URL ({}); check model.{}_base_url",
                chain(&err.without_url()),
                if provider == Provider::Anthropic { "anthropic" } else { "openai" }
            ),
        };
    }
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "could not be reached"
    } else if err.is_body() {
        "broke off the response"
    } else {
        "failed"
    };
    let err = err.without_url();
    ModelError::network(format!("the request to {provider} {what}: {}", chain(&err)))
}

/// The provider's hint of when to retry: `retry-after-ms` (OpenAI), else
/// `retry-after` as seconds or an HTTP date relative to `now`.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(ms / 1000.0).ok();
    }
    let value = get("retry-after")?;
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(at.timestamp()).ok()?);
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `(type, message)` from a provider error body, or a trimmed excerpt of a
/// body that is not one (an HTML page from a proxy, say).
pub(crate) fn error_detail(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let kind = error.and_then(|e| e.get("type")).and_then(|t| t.as_str()).filter(|t| !t.is_empty());
    let message = error.and_then(|e| e.get("message")).and_then(|m| m.as_str());
    match (kind, message) {
        (Some(kind), Some(message)) => format!("{kind}: {message}"),
        (None, Some(message)) => message.to_string(),
        (Some(kind), None) => kind.to_string(),
        (None, None) => {
            let excerpt: String = body.trim().chars().take(200).collect();
            if excerpt.is_empty() { "no details".to_string() } else { excerpt }
        }
    }
}

/// Maps a non-success status to the decision it implies.
pub(crate) fn status_error(provider: Provider, status: u16, retry_after: Option<Duration>, body: &str) -> ModelError {
    let detail = error_detail(body);
    let secret = provider.secret_name();
    match status {
        401 => ModelError::Permanent {
            message: format!(
                "the {provider} API key was rejected (401: {detail}): set it with `tinyfat secret set NAME {secret}`"
            ),
        },
        403 => ModelError::Permanent {
            message: format!(
                "the {provider} API key may not use this model or endpoint (403: {detail}): check the key's \
                 permissions or set another with `tinyfat secret set NAME {secret}`"
            ),
        },
        404 => ModelError::Permanent {
            message: format!(
                "{provider} does not know this model or endpoint (404: {detail}): check the model name and base URL"
            ),
        },
        400 | 413 | 422 => ModelError::BadRequest { message: format!("{provider} returned {status} ({detail})") },
        408 | 409 | 429 | 500..=599 => ModelError::Transient {
            status: Some(status),
            retry_after,
            message: format!("{provider} returned {status} ({detail})"),
        },
        _ => ModelError::Permanent { message: format!("{provider} refused the request ({status}: {detail})") },
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn endpoints_never_double_v1() {
        assert_eq!(endpoint("https://api.anthropic.com", "messages"), "https://api.anthropic.com/v1/messages");
        assert_eq!(
            endpoint("https://api.openai.com/v1", "chat/completions"),
            "https://api.openai.com/v1/chat/completions"
        );
        assert_eq!(endpoint("http://h:1/v1/", "chat/completions"), "http://h:1/v1/chat/completions");
        assert_eq!(endpoint("http://h:1/proxy/", "messages"), "http://h:1/proxy/v1/messages");
    }

    #[test]
    fn parses_retry_after_in_all_its_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470); // Wed, 21 Oct 2015 07:27:50 GMT
        type Case<'a> = (&'a [(&'static str, &'a str)], Option<Duration>);
        let cases: [Case<'_>; 7] = [
            (&[("retry-after", "7")], Some(Duration::from_secs(7))),
            (&[("retry-after", "1.5")], Some(Duration::from_millis(1500))),
            (&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")], Some(Duration::from_secs(10))),
            (&[("retry-after", "Wed, 21 Oct 2015 07:00:00 GMT")], Some(Duration::ZERO)),
            (&[("retry-after-ms", "250"), ("retry-after", "9")], Some(Duration::from_millis(250))),
            (&[("retry-after", "soon")], None),
            (&[("retry-after", "-3")], None),
        ];
        for (pairs, expected) in cases {
            assert_eq!(retry_after(&headers(pairs), now), expected, "{pairs:?}");
        }
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "1e300")]), now), None, "overflow is ignored");
    }

    #[test]
    fn statuses_map_to_decisions() {
        let overloaded = r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        let err = status_error(Provider::Anthropic, 529, None, overloaded);
        assert!(err.is_transient());
        assert!(err.to_string().contains("529 (overloaded_error: Overloaded)"), "{err}");
        let err = status_error(Provider::OpenAi, 429, Some(Duration::from_secs(2)), "");
        assert!(matches!(err, ModelError::Transient { status: Some(429), retry_after: Some(_), .. }));
        for status in [408, 500, 502, 503, 504] {
            assert!(status_error(Provider::Anthropic, status, None, "").is_transient(), "{status}");
        }
        let err = status_error(Provider::Anthropic, 401, None, r#"{"error":{"type":"authentication_error"}}"#);
        assert!(matches!(err, ModelError::Permanent { .. }));
        assert!(err.to_string().contains("`tinyfat secret set NAME anthropic_api_key`"), "{err}");
        let err = status_error(Provider::OpenAi, 403, None, "");
        assert!(err.to_string().contains("openai_api_key"), "{err}");
        assert!(matches!(status_error(Provider::OpenAi, 400, None, ""), ModelError::BadRequest { .. }));
        assert!(matches!(status_error(Provider::OpenAi, 404, None, ""), ModelError::Permanent { .. }));
        assert!(matches!(status_error(Provider::OpenAi, 402, None, ""), ModelError::Permanent { .. }));
    }

    #[test]
    fn error_detail_falls_back_to_an_excerpt() {
        assert_eq!(error_detail(r#"{"error":{"message":"bad","type":"x"}}"#), "x: bad");
        assert_eq!(error_detail("<html>Bad Gateway</html>"), "<html>Bad Gateway</html>");
        assert_eq!(error_detail(&"y".repeat(500)).len(), 200);
        assert_eq!(error_detail("  "), "no details");
    }
}
