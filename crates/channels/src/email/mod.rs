//! The email channel: everything that knows email's formats.
//!
//! - [`svix`]: Resend's webhook signatures, checked over the raw body.
//! - [`resend`]: Resend's JSON (webhook, received-email API, send API,
//!   errors), converted to and from this crate's types.
//! - [`inbound`]: a raw RFC 5322 message → [`inbound::InboundEmail`]: body,
//!   quote split, `stop`, loop detection, thread session, dedup key.
//! - [`html`]: HTML → readable text for HTML-only mail.
//! - [`auth`]: sender authentication (DKIM, SPF, DMARC alignment) and
//!   trusted `Authentication-Results`.
//! - [`outbound`]: replies and new mail composed from markdown, threaded and
//!   quoted, as RFC 5322 bytes (SMTP) or a Resend request.
//! - [`outbox_file`]: the agent's `outbox/email/*.json` files (SPEC §5).
//! - [`smtp_in`]: the SMTP listener's dedup key and EHLO reply.
//!
//! Architecture invariant: nothing here sends, fetches or stores. The
//! platform moves bytes; this module decides what they mean.

pub mod auth;
pub mod html;
pub mod inbound;
pub mod outbound;
pub mod outbox_file;
pub mod resend;
pub mod smtp_in;
pub mod svix;

pub use inbound::{InboundEmail, InboundError, InboundLimits};
