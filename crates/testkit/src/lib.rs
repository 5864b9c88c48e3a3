//! Test doubles for the internet services tinyfat talks to. Today: a fake
//! model server ([`FakeModel`]) that speaks both the Anthropic Messages API
//! and the OpenAI Chat Completions API in their documented streaming wire
//! formats, answers from a per-test script, and records every request; and
//! a fake Resend ([`FakeResend`]: send and received-email APIs, with
//! `Idempotency-Key` dedup and scriptable 429s). Also one real server that
//! runs here: [`Dovecot`], an IMAP server started per test; and
//! [`TestProcess`], a child process (`tinyfat serve`) killed on drop.
//!
//! Architecture invariants: the fakes speak the providers' wire formats and
//! nothing of tinyfat's (tests drive the real clients against them); they
//! bind loopback only; and they hold no global state, so tests run in
//! parallel, each with its own server.

pub mod dovecot;
pub mod process;
pub mod resend;
pub mod script;
pub mod server;
pub mod smtp_peer;
mod wire;

pub use dovecot::Dovecot;
pub use process::{TestProcess, free_port, wait_for_port};
pub use resend::{FakeResend, ResendRequest};
pub use script::{HttpError, Reply, Script, ScriptStop, ToolCall};
pub use server::{Api, FakeModel, RecordedRequest};
pub use smtp_peer::SmtpPeer;
