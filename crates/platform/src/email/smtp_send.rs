//! Sending one composed email over SMTP (`email.provider = "smtp"`), with
//! lettre's tokio transport: `starttls` (STARTTLS required, never
//! opportunistic), `tls` (implicit TLS) or `none` (a loopback relay only;
//! `config` refuses it for other hosts). AUTH only when
//! `email.smtp_username` is set. The message bytes are
//! `OutboundEmail::to_rfc5322` (the envelope adds Bcc recipients).
//!
//! Idempotency (SPEC §5): SMTP has no idempotency key, so the Message-ID is
//! the key: `<{delivery_id}@{email.domain}>`, fixed by `compose`. Callers
//! mark the delivery `sending` durably before [`send`] and `sent` after its
//! 250; a delivery found `sending` after a crash (or whose 250 was lost) is
//! sent again with the same Message-ID. The outcome is at-least-once: the
//! recipient may get a second copy with the same Message-ID, which mail
//! clients and most stores show once.
//!
//! Errors: a 5xx reply is permanent (the server's reply text is kept); 4xx,
//! network errors, TLS failures and timeouts are transient (retried with the
//! delivery backoff: a fixed setting or certificate can make them succeed).
//!
//! This module must not touch the store or agent storage, and must never
//! log or format the password (lettre's `tracing` feature is off, and
//! errors are built from the server's replies, which do not echo it).

use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::AsyncSmtpTransport;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncTransport, Tokio1Executor};
use tinyfat_channels::email::outbound::OutboundEmail;
use tinyfat_core::EmailAddress;

use super::SendError;
use crate::config::EmailSettings;

/// Sends `email`; returns its Message-ID (`<id@domain>`) as the provider id.
pub async fn send(settings: &EmailSettings, email: &OutboundEmail) -> Result<String, SendError> {
    let host = settings.smtp_host.trim();
    if host.is_empty() {
        return Err(SendError::Permanent("email.smtp_host (TINYFAT_EMAIL_SMTP_HOST) is not set".into()));
    }
    let envelope = envelope(email)?;
    let transport = transport(settings, host)?;
    let bytes = email.to_rfc5322();
    let timeout = Duration::from_secs(settings.smtp_timeout_s);
    let server = format!("SMTP {host}:{}", settings.smtp_port);
    match tokio::time::timeout(timeout, transport.send_raw(&envelope, &bytes)).await {
        Ok(Ok(_response)) => Ok(format!("<{}>", email.message_id)),
        Ok(Err(e)) => Err(classify(&server, &e)),
        Err(_) => Err(SendError::Transient {
            error: format!("{server}: no answer within {}s (email.smtp_timeout_s)", timeout.as_secs()),
            retry_after_ms: None,
        }),
    }
}

/// The startup line's words for the SMTP settings (no password).
pub fn describe(settings: &EmailSettings) -> String {
    let tls = match settings.smtp_tls.as_str() {
        "tls" => "implicit TLS",
        "none" => "no TLS (loopback relay)",
        _ => "STARTTLS required",
    };
    let auth = match (settings.smtp_username.as_deref().filter(|u| !u.is_empty()), &settings.smtp_password) {
        (Some(user), Some(_)) => format!("AUTH as {user}"),
        (Some(user), None) => format!("AUTH as {user} with an empty password (set SMTP_PASSWORD)"),
        (None, _) => "no AUTH (set email.smtp_username and SMTP_PASSWORD if the server needs it)".to_owned(),
    };
    format!("SMTP {}:{}, {tls}, {auth}", settings.smtp_host, settings.smtp_port)
}

fn envelope(email: &OutboundEmail) -> Result<Envelope, SendError> {
    let address =
        |a: &EmailAddress| a.as_str().parse::<lettre::Address>().map_err(|e| SendError::Permanent(format!("{a}: {e}")));
    let to = email.smtp_recipients().map(address).collect::<Result<Vec<_>, _>>()?;
    Envelope::new(Some(address(&email.from.address)?), to)
        .map_err(|e| SendError::Permanent(format!("SMTP envelope: {e}")))
}

fn transport(settings: &EmailSettings, host: &str) -> Result<AsyncSmtpTransport<Tokio1Executor>, SendError> {
    let tls = |host: &str| {
        TlsParameters::new(host.to_owned()).map_err(|e| SendError::Permanent(format!("SMTP TLS setup for {host}: {e}")))
    };
    let mode = match settings.smtp_tls.as_str() {
        "tls" => Tls::Wrapper(tls(host)?),
        "none" => Tls::None,
        _ => Tls::Required(tls(host)?),
    };
    let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(settings.smtp_port)
        .tls(mode)
        .hello_name(ClientId::Domain(settings.domain.clone()))
        .timeout(Some(Duration::from_secs(settings.smtp_timeout_s)));
    if let Some(user) = settings.smtp_username.as_deref().filter(|u| !u.is_empty()) {
        let password = settings.smtp_password.as_ref().map(|p| p.expose().to_owned()).unwrap_or_default();
        builder = builder.credentials(Credentials::new(user.to_owned(), password));
    }
    Ok(builder.build())
}

/// 5xx: permanent. Everything else (4xx, network, TLS, timeouts, a garbled
/// reply): transient.
fn classify(server: &str, e: &lettre::transport::smtp::Error) -> SendError {
    let error = format!("{server}: {e}");
    if e.is_permanent() { SendError::Permanent(error) } else { SendError::Transient { error, retry_after_ms: None } }
}
