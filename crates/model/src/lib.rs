//! Model clients: the only place in tinyfat that speaks a model provider's wire
//! format. Callers hand in provider-neutral conversation types from
//! `tinyfat_core::message` and get back an assistant [`Message`], a
//! [`StopReason`] and [`Usage`]; text and tool calls stream out through a sink
//! as they arrive.
//!
//! Code map:
//! - [`client`]: the [`ModelClient`] trait and its request, event and response types.
//! - [`route`]: model names to providers (`claude-…`, `anthropic:…`, `openai:…`)
//!   and [`build_client`].
//! - [`anthropic`] and [`openai`]: the two adapters (Messages API, Chat Completions).
//! - [`retry`]: [`RetryingClient`], capped exponential backoff honouring `retry-after`.
//! - [`http`]: the shared HTTP transport, status mapping and size/time limits.
//! - `sse`: a bounded server-sent-events decoder (private).
//! - [`cancel`]: [`CancelToken`], checked at every streamed chunk.
//! - [`error`]: [`ModelError`], whose variants carry the caller's decision.
//!
//! Architecture invariants: no global state (the HTTP client, limits and
//! credentials are passed in); provider field names never leave this crate;
//! API keys are [`Secret`]s that are only exposed into a request header and
//! never logged; every buffer has a limit and exceeding it is a
//! [`ModelError::Protocol`].
//!
//! [`Message`]: tinyfat_core::message::Message
//! [`Usage`]: tinyfat_core::message::Usage
//! [`Secret`]: tinyfat_core::Secret

pub mod anthropic;
pub mod cancel;
pub mod client;
pub mod error;
pub mod http;
pub mod openai;
pub mod retry;
pub mod route;
mod sse;

pub use anthropic::AnthropicClient;
pub use cancel::CancelToken;
pub use client::{EventSink, ModelClient, ModelRequest, ModelResponse, StopReason, StreamEvent};
pub use error::ModelError;
pub use http::{ClientOptions, HttpClient};
pub use openai::OpenAiClient;
pub use retry::{RetryPolicy, RetryingClient, SleepFn};
pub use route::{ModelRoute, Provider, ProviderCredentials, build_client};
