//! Channel adapters: the provider-specific edges of tinyfat. Each channel
//! module turns a provider's wire format (webhook JSON, raw MIME, API
//! responses) into the platform's own types and back.
//!
//! Architecture invariant: this crate does no network or database I/O and
//! reads no files; callers fetch bytes and hand them in, and send what this
//! crate composes. The one exception is DNS for email sender authentication
//! (`email::auth`), and even that resolver is injectable. Only this crate
//! knows the providers' field names.

pub mod email;
