//! Resend's JSON, kept at the edge: the `email.received` webhook, the
//! received-email API (`GET /emails/receiving/{id}`), the send API
//! (`POST /emails`) and its error body. The `wire` structs mirror Resend's
//! documented field names; everything else in the platform sees this
//! module's own types ([`ResendEvent`], [`ReceivedNotice`],
//! [`ReceivedEmail`], [`ApiError`]).
//!
//! This module must not do HTTP: callers fetch and post, then hand bodies
//! in. Requests are built in `outbound` (`OutboundEmail::to_resend_request`).

use chrono::{DateTime, Utc};
use serde::Serialize;
use tinyfat_core::EmailAddress;

use super::inbound::{
    BodyBuilder, BodyKind, InboundEmail, InboundError, InboundLimits, ReplyParts, cap_references, clean_line,
    normalize_message_id, parse_message_id_list, split_reply,
};

/// `to` of a send request holds at most this many addresses.
pub const RECIPIENTS_MAX: usize = 50;
/// `Idempotency-Key` length limit.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 256;
/// Ids we put into URL paths.
const ID_BYTES_MAX: usize = 128;

/// Resend's JSON shapes, field for field.
pub mod wire {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    /// A webhook event: `{"type","created_at","data"}`.
    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct WebhookEvent {
        #[serde(rename = "type")]
        pub kind: String,
        #[serde(default)]
        pub created_at: Option<String>,
        #[serde(default)]
        pub data: serde_json::Value,
    }

    /// `data` of `email.received`: metadata only, no body.
    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct ReceivedData {
        pub email_id: String,
        #[serde(default)]
        pub created_at: Option<String>,
        #[serde(default)]
        pub from: String,
        #[serde(default, deserialize_with = "string_list")]
        pub to: Vec<String>,
        #[serde(default, deserialize_with = "string_list")]
        pub cc: Vec<String>,
        #[serde(default, deserialize_with = "string_list")]
        pub bcc: Vec<String>,
        #[serde(default)]
        pub subject: Option<String>,
        #[serde(default)]
        pub message_id: Option<String>,
        #[serde(default)]
        pub attachments: Vec<AttachmentMeta>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct AttachmentMeta {
        #[serde(default)]
        pub id: Option<String>,
        #[serde(default)]
        pub filename: Option<String>,
        #[serde(default)]
        pub content_type: Option<String>,
        #[serde(default)]
        pub content_disposition: Option<String>,
        #[serde(default)]
        pub content_id: Option<String>,
        #[serde(default)]
        pub size: Option<u64>,
    }

    /// `GET /emails/receiving/{id}`.
    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct ReceivedEmail {
        #[serde(default)]
        pub object: Option<String>,
        pub id: String,
        #[serde(default)]
        pub from: String,
        #[serde(default, deserialize_with = "string_list")]
        pub to: Vec<String>,
        #[serde(default, deserialize_with = "string_list")]
        pub cc: Vec<String>,
        #[serde(default, deserialize_with = "string_list")]
        pub bcc: Vec<String>,
        #[serde(default, deserialize_with = "string_list")]
        pub reply_to: Vec<String>,
        #[serde(default)]
        pub subject: Option<String>,
        #[serde(default)]
        pub message_id: Option<String>,
        #[serde(default)]
        pub created_at: Option<String>,
        #[serde(default)]
        pub html: Option<String>,
        #[serde(default)]
        pub text: Option<String>,
        /// Header name → value; a repeated header may come as a list.
        #[serde(default)]
        pub headers: Option<BTreeMap<String, serde_json::Value>>,
        #[serde(default)]
        pub attachments: Vec<AttachmentMeta>,
        #[serde(default)]
        pub raw: Option<RawDownload>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct RawDownload {
        pub download_url: String,
        #[serde(default)]
        pub expires_at: Option<String>,
    }

    /// `POST /emails`.
    #[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
    pub struct SendEmailRequest {
        pub from: String,
        pub to: Vec<String>,
        pub subject: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub cc: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub bcc: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub reply_to: Vec<String>,
        pub html: String,
        pub text: String,
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        pub headers: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub attachments: Vec<SendAttachment>,
    }

    #[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
    pub struct SendAttachment {
        pub filename: String,
        /// Base64 of the file's bytes.
        pub content: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub content_type: Option<String>,
    }

    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct SendEmailResponse {
        pub id: String,
    }

    /// Error body: `{"statusCode","name","message"}`.
    #[derive(Clone, Debug, Deserialize, Serialize)]
    pub struct ErrorBody {
        #[serde(rename = "statusCode", default)]
        pub status_code: Option<u16>,
        #[serde(default)]
        pub name: Option<String>,
        #[serde(default)]
        pub message: Option<String>,
    }

    /// Accepts a list of strings, a single string, or null.
    fn string_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        Ok(match Option::<OneOrMany>::deserialize(d)? {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResendError {
    /// The body is not the JSON Resend documents: answer 400, do not retry.
    #[error("malformed Resend JSON: {0}")]
    Malformed(String),
    #[error("invalid Resend id {0:?}")]
    InvalidId(String),
}

/// A verified webhook's meaning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResendEvent {
    EmailReceived(ReceivedNotice),
    /// Another event type (sent, delivered, bounced …): acknowledged, ignored.
    Other(String),
}

/// `email.received`: who wrote to whom; the body is fetched separately.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedNotice {
    pub email_id: String,
    pub created_at: Option<DateTime<Utc>>,
    pub from: Option<EmailAddress>,
    /// Every parseable To and Cc address (the agent is one of them).
    pub recipients: Vec<EmailAddress>,
    pub subject: String,
    pub message_id: Option<String>,
    pub attachments: Vec<AttachmentInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentInfo {
    pub id: Option<String>,
    pub filename: Option<String>,
    pub content_type: Option<String>,
    pub inline: bool,
    pub size_bytes: Option<u64>,
}

/// `GET /emails/receiving/{id}` in our terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedEmail {
    pub id: String,
    /// Signed URL of the original message; fetch it for DKIM and full MIME.
    pub raw_download_url: Option<String>,
    pub raw_expires_at: Option<DateTime<Utc>>,
    /// As Resend gives them (`Name <a@b.c>`); parse with [`parse_mailbox`].
    pub from: String,
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub reply_to: Vec<String>,
    pub subject: String,
    pub message_id: Option<String>,
    pub html: Option<String>,
    pub text: Option<String>,
    /// Header name and value, in Resend's order; see [`ReceivedEmail::header`].
    pub headers: Vec<(String, String)>,
    pub attachments: Vec<AttachmentInfo>,
}

/// Parses a webhook body (after its signature was verified).
pub fn parse_webhook(body: &[u8]) -> Result<ResendEvent, ResendError> {
    let event: wire::WebhookEvent = serde_json::from_slice(body).map_err(|e| ResendError::Malformed(e.to_string()))?;
    if event.kind != "email.received" {
        return Ok(ResendEvent::Other(clean_line(&event.kind, 100)));
    }
    let data: wire::ReceivedData =
        serde_json::from_value(event.data).map_err(|e| ResendError::Malformed(format!("data: {e}")))?;
    check_id(&data.email_id)?;
    let recipients = data.to.iter().chain(&data.cc).chain(&data.bcc).filter_map(|m| parse_mailbox(m)).collect();
    Ok(ResendEvent::EmailReceived(ReceivedNotice {
        email_id: data.email_id,
        created_at: data.created_at.as_deref().and_then(parse_time),
        from: parse_mailbox(&data.from),
        recipients,
        subject: clean_line(data.subject.as_deref().unwrap_or_default(), 500),
        message_id: data.message_id.as_deref().and_then(normalize_message_id),
        attachments: data.attachments.iter().map(attachment_info).collect(),
    }))
}

/// The API path of a received email, with the id checked so it cannot
/// change the path.
pub fn received_email_path(email_id: &str) -> Result<String, ResendError> {
    check_id(email_id)?;
    Ok(format!("/emails/receiving/{email_id}"))
}

/// Parses the received-email API response.
pub fn parse_received_email(body: &[u8]) -> Result<ReceivedEmail, ResendError> {
    let email: wire::ReceivedEmail = serde_json::from_slice(body).map_err(|e| ResendError::Malformed(e.to_string()))?;
    check_id(&email.id)?;
    let headers = email
        .headers
        .unwrap_or_default()
        .into_iter()
        .flat_map(|(name, value)| {
            let values = match value {
                serde_json::Value::String(s) => vec![s],
                serde_json::Value::Array(items) => {
                    items.into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
                }
                _ => Vec::new(),
            };
            values.into_iter().map(move |v| (name.clone(), v))
        })
        .collect();
    let (raw_download_url, raw_expires_at) = match email.raw {
        Some(raw) if raw.download_url.starts_with("https://") => {
            (Some(raw.download_url), raw.expires_at.as_deref().and_then(parse_time))
        }
        _ => (None, None),
    };
    Ok(ReceivedEmail {
        id: email.id,
        raw_download_url,
        raw_expires_at,
        from: email.from,
        to: email.to,
        cc: email.cc,
        reply_to: email.reply_to,
        subject: email.subject.unwrap_or_default(),
        message_id: email.message_id,
        html: email.html,
        text: email.text,
        headers,
        attachments: email.attachments.iter().map(attachment_info).collect(),
    })
}

impl ReceivedEmail {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Builds an [`InboundEmail`] from the API's fields, for when the raw
    /// message cannot be downloaded. Attachments are not included (fetch
    /// them separately), and without the raw message DKIM cannot be checked
    /// (`auth` needs the raw bytes).
    pub fn to_inbound(&self, limits: &InboundLimits) -> Result<InboundEmail, InboundError> {
        let from = parse_mailbox(&self.from).ok_or_else(|| {
            if self.from.trim().is_empty() {
                InboundError::MissingFrom
            } else {
                InboundError::InvalidFrom(clean_line(&self.from, 100))
            }
        })?;
        let from_name = self.from.split_once('<').map(|(n, _)| clean_line(n.trim().trim_matches('"'), 100));
        let mut body = BodyBuilder::new(limits.text_bytes_max);
        match (&self.text, &self.html) {
            (Some(text), _) if !text.trim().is_empty() => body.push(text, BodyKind::Plain),
            (_, Some(html)) => body.push(&super::html::html_to_text(html), BodyKind::Html),
            _ => {}
        }
        let (text, body_kind, text_truncated) = body.finish();
        let message_id = self
            .message_id
            .as_deref()
            .or(self.header("Message-ID"))
            .and_then(normalize_message_id)
            .unwrap_or_else(|| format!("resend-{}@message-id.invalid", self.id));
        let reply: ReplyParts = split_reply(&text);
        let list =
            |v: &[String]| -> Vec<EmailAddress> { v.iter().filter_map(|m| parse_mailbox(m)).take(100).collect() };
        Ok(InboundEmail {
            from,
            from_name: from_name.filter(|n| !n.is_empty()),
            to: list(&self.to),
            cc: list(&self.cc),
            reply_to: list(&self.reply_to).into_iter().next(),
            subject: clean_line(&self.subject, 500),
            message_id_generated: self.message_id.is_none() && self.header("Message-ID").is_none(),
            message_id,
            in_reply_to: self.header("In-Reply-To").map(parse_message_id_list).and_then(|v| v.into_iter().next()),
            references: cap_references(self.header("References").map(parse_message_id_list).unwrap_or_default()),
            auto_submitted: self.header("Auto-Submitted").map(|v| clean_line(v, 200)),
            precedence: self.header("Precedence").map(|v| clean_line(v, 200)),
            has_list_id: self.header("List-Id").is_some(),
            automated_extra: None,
            date: self.header("Date").and_then(|d| DateTime::parse_from_rfc2822(d.trim()).ok()).map(|d| d.to_utc()),
            text,
            body_kind,
            text_truncated,
            reply,
            attachments: Vec::new(),
            skipped_attachments: Vec::new(),
        })
    }
}

/// Parses the send API's success body.
pub fn parse_send_response(body: &[u8]) -> Result<String, ResendError> {
    let r: wire::SendEmailResponse = serde_json::from_slice(body).map_err(|e| ResendError::Malformed(e.to_string()))?;
    if r.id.is_empty() || r.id.len() > ID_BYTES_MAX {
        return Err(ResendError::InvalidId(r.id));
    }
    Ok(r.id)
}

/// What to do about a failed API call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Transient (429 rate limit, 5xx, a concurrent idempotent request):
    /// retry with backoff within `queue.retry_window`, honouring `retry-after`.
    Retry,
    /// Our request or account is wrong (bad key, validation, quota, the
    /// same idempotency key with another body): fail the delivery now.
    Permanent,
}

/// A Resend API error in our terms.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Resend API error {status} {name}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub name: String,
    pub message: String,
    pub disposition: Disposition,
}

/// Classifies an error response; the body may be anything (a proxy's HTML).
pub fn classify_error(status: u16, body: &[u8]) -> ApiError {
    let parsed: Option<wire::ErrorBody> = serde_json::from_slice(body).ok();
    let name = parsed.as_ref().and_then(|b| b.name.clone()).unwrap_or_default();
    let message = parsed
        .as_ref()
        .and_then(|b| b.message.clone())
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    let disposition = match (status, name.as_str()) {
        (_, "daily_quota_exceeded" | "monthly_quota_exceeded") => Disposition::Permanent,
        (
            _,
            "concurrent_idempotent_requests" | "rate_limit_exceeded" | "application_error" | "internal_server_error",
        ) => Disposition::Retry,
        (408 | 429, _) | (500..=599, _) => Disposition::Retry,
        _ => Disposition::Permanent,
    };
    ApiError { status, name: clean_line(&name, 100), message: clean_line(&message, 500), disposition }
}

/// `Name <a@b.c>` or `a@b.c` → the address.
pub fn parse_mailbox(s: &str) -> Option<EmailAddress> {
    let s = s.trim();
    let addr = match (s.rfind('<'), s.rfind('>')) {
        (Some(open), Some(close)) if open < close => &s[open + 1..close],
        _ => s,
    };
    EmailAddress::parse(addr).ok()
}

fn attachment_info(a: &wire::AttachmentMeta) -> AttachmentInfo {
    AttachmentInfo {
        id: a.id.clone(),
        filename: a.filename.clone(),
        content_type: a.content_type.clone(),
        inline: a.content_disposition.as_deref().is_some_and(|d| d.eq_ignore_ascii_case("inline")),
        size_bytes: a.size,
    }
}

fn check_id(id: &str) -> Result<(), ResendError> {
    let ok = !id.is_empty()
        && id.len() <= ID_BYTES_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok { Ok(()) } else { Err(ResendError::InvalidId(clean_line(id, ID_BYTES_MAX))) }
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim()).ok().map(|d| d.to_utc())
}

/// Serialises a send request (for the HTTP body).
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("plain structs always serialise")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shaped after Resend's documentation examples.
    const WEBHOOK: &str = r#"{
      "type": "email.received",
      "created_at": "2026-07-01T12:00:01.000Z",
      "data": {
        "email_id": "56761188-7520-42d8-8898-ff6fc54ce618",
        "created_at": "2026-07-01T12:00:00.894719+00:00",
        "from": "Ann Lee <ann@example.org>",
        "to": ["swiftpebble@agents.example.com"],
        "cc": ["Bob <bob@example.org>", "not an address"],
        "bcc": [],
        "message_id": "<CAF=abc123@mail.gmail.com>",
        "subject": "Quarterly numbers",
        "attachments": [
          {"id": "2a0c9ce0-3112-4728-976e-47ddcd16a318", "filename": "q3.pdf",
           "content_type": "application/pdf", "content_disposition": "attachment", "content_id": null}
        ]
      }
    }"#;

    const RECEIVED: &str = r#"{
      "object": "email",
      "id": "4ef9a417-02e9-4d39-ad75-9611e0fcc33c",
      "to": ["swiftpebble@agents.example.com"],
      "from": "\"Lee, Ann\" <ann@example.org>",
      "created_at": "2026-07-01T12:00:00.674981+00:00",
      "subject": "Re: Quarterly numbers",
      "html": "<p>Looks <b>good</b>.</p><blockquote><p>Numbers attached</p></blockquote>",
      "text": null,
      "bcc": [],
      "cc": [],
      "reply_to": [],
      "message_id": "<reply-2@example.org>",
      "headers": {
        "In-Reply-To": "<agent-1@agents.example.com>",
        "References": "<root-0@example.org> <agent-1@agents.example.com>",
        "Auto-Submitted": "auto-replied",
        "Received": ["from a", "from b"]
      },
      "attachments": [
        {"id": "2a0c9ce0-3112-4728-976e-47ddcd16a318", "filename": "avatar.png", "content_type": "image/png",
         "content_disposition": "inline", "content_id": "img001", "size": 4096}
      ],
      "raw": {"download_url": "https://inbound-cdn.resend.com/4ef9a417/raw?signature=x", "expires_at": "2026-07-01T13:00:00Z"}
    }"#;

    #[test]
    fn webhook_received() {
        let ResendEvent::EmailReceived(n) = parse_webhook(WEBHOOK.as_bytes()).unwrap() else { panic!("kind") };
        assert_eq!(n.email_id, "56761188-7520-42d8-8898-ff6fc54ce618");
        assert_eq!(n.from.unwrap().as_str(), "ann@example.org");
        let recipients: Vec<_> = n.recipients.iter().map(EmailAddress::as_str).collect();
        assert_eq!(recipients, ["swiftpebble@agents.example.com", "bob@example.org"]);
        assert_eq!(n.message_id.as_deref(), Some("CAF=abc123@mail.gmail.com"));
        assert_eq!(n.subject, "Quarterly numbers");
        assert_eq!(n.attachments[0].filename.as_deref(), Some("q3.pdf"));
        assert!(n.created_at.is_some());
    }

    #[test]
    fn webhook_other_and_malformed() {
        let other = br#"{"type":"email.delivered","created_at":"x","data":{"email_id":"a"}}"#;
        assert_eq!(parse_webhook(other).unwrap(), ResendEvent::Other("email.delivered".into()));
        for bad in [&b"not json"[..], br#"{"type":"email.received","data":{}}"#, br#"{"data":{}}"#] {
            assert!(matches!(parse_webhook(bad), Err(ResendError::Malformed(_))), "{}", String::from_utf8_lossy(bad));
        }
        let traversal = br#"{"type":"email.received","data":{"email_id":"../../admin"}}"#;
        assert!(matches!(parse_webhook(traversal), Err(ResendError::InvalidId(_))));
    }

    #[test]
    fn received_email_converts() {
        let email = parse_received_email(RECEIVED.as_bytes()).unwrap();
        assert_eq!(email.raw_download_url.as_deref(), Some("https://inbound-cdn.resend.com/4ef9a417/raw?signature=x"));
        assert_eq!(email.header("received"), Some("from a"));
        assert!(email.attachments[0].inline);
        let inbound = email.to_inbound(&InboundLimits::default()).unwrap();
        assert_eq!(inbound.from.as_str(), "ann@example.org");
        assert_eq!(inbound.from_name.as_deref(), Some("Lee, Ann"));
        assert_eq!(inbound.message_id, "reply-2@example.org");
        assert_eq!(inbound.in_reply_to.as_deref(), Some("agent-1@agents.example.com"));
        assert_eq!(inbound.references, ["root-0@example.org", "agent-1@agents.example.com"]);
        assert_eq!(inbound.thread_root(), "root-0@example.org");
        assert_eq!(inbound.body_kind, BodyKind::Html);
        assert_eq!(inbound.reply.new_text, "Looks good.");
        assert_eq!(inbound.reply.quoted.as_deref(), Some("> Numbers attached"));
        assert!(inbound.automated().is_some());
        assert_eq!(received_email_path(&email.id).unwrap(), "/emails/receiving/4ef9a417-02e9-4d39-ad75-9611e0fcc33c");
        assert!(received_email_path("a/../b").is_err());
    }

    #[test]
    fn send_response_and_errors() {
        assert_eq!(parse_send_response(br#"{"id":"49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"}"#).unwrap().len(), 36);
        assert!(parse_send_response(b"{}").is_err());
        let cases: &[(u16, &str, &str, Disposition)] = &[
            (
                429,
                r#"{"statusCode":429,"name":"rate_limit_exceeded","message":"Too many requests"}"#,
                "rate_limit_exceeded",
                Disposition::Retry,
            ),
            (
                429,
                r#"{"statusCode":429,"name":"daily_quota_exceeded","message":"quota"}"#,
                "daily_quota_exceeded",
                Disposition::Permanent,
            ),
            (
                422,
                r#"{"statusCode":422,"name":"validation_error","message":"Invalid `to` field"}"#,
                "validation_error",
                Disposition::Permanent,
            ),
            (
                403,
                r#"{"statusCode":403,"name":"invalid_api_key","message":"API key is invalid"}"#,
                "invalid_api_key",
                Disposition::Permanent,
            ),
            (
                409,
                r#"{"statusCode":409,"name":"concurrent_idempotent_requests","message":"in progress"}"#,
                "concurrent_idempotent_requests",
                Disposition::Retry,
            ),
            (
                409,
                r#"{"statusCode":409,"name":"invalid_idempotent_request","message":"other payload"}"#,
                "invalid_idempotent_request",
                Disposition::Permanent,
            ),
            (
                500,
                r#"{"statusCode":500,"name":"application_error","message":"oops"}"#,
                "application_error",
                Disposition::Retry,
            ),
            (502, "<html>Bad gateway</html>", "", Disposition::Retry),
        ];
        for (status, body, name, disposition) in cases {
            let e = classify_error(*status, body.as_bytes());
            assert_eq!((e.name.as_str(), e.disposition), (*name, *disposition), "{body}");
        }
    }

    #[test]
    fn mailboxes() {
        for (s, want) in [
            ("Ann <ann@x.org>", Some("ann@x.org")),
            ("ann@X.org", Some("ann@x.org")),
            ("\"a <b>\" <c@x.org>", Some("c@x.org")),
            ("nobody", None),
        ] {
            assert_eq!(parse_mailbox(s).as_ref().map(EmailAddress::as_str), want, "{s}");
        }
    }
}
