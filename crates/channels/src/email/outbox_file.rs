//! The agent's outbox email files (`outbox/email/*.json`, SPEC §5):
//!
//! ```json
//! {"to":["a@example.com"],"cc":[],"bcc":[],"subject":"Hello","body":"markdown text",
//!  "in_reply_to":"<id@host>","references":"<a@host> <id@host>",
//!  "attachments":[{"path":"reports/q3.pdf"}]}
//! ```
//!
//! [`parse`] validates a file completely before anything is sent: the
//! schema (unknown fields are refused so a typo like `"from"` is reported,
//! not ignored), recipients, counts and sizes, and attachment paths (with
//! `tinyfat_storage::validate_path`). [`mark_sent`] and [`mark_failed`]
//! produce the versions filed in `outbox/sent/` and `outbox/failed/`,
//! keeping every field the agent wrote.
//!
//! The file is hostile input. This module must not open files (the caller
//! reads it through `AgentDir` under a size cap and passes the bytes), check
//! recipients against allowed senders (the caller knows the policy), or send.
//! Error messages are written for the agent, which reads them in `failed/`.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use tinyfat_core::EmailAddress;
use tinyfat_storage::{RelPath, validate_path};

use super::inbound::{REFERENCES_MAX, normalize_message_id, parse_message_id_list};

pub const FILE_BYTES_MAX: usize = 512 * 1024;
pub const RECIPIENTS_MAX: usize = 50;
pub const SUBJECT_CHARS_MAX: usize = 500;
pub const BODY_BYTES_MAX: usize = 256 * 1024;
pub const ATTACHMENTS_MAX: usize = 10;
/// The `error` written into a failed file is cut to this length.
pub const ERROR_CHARS_MAX: usize = 2000;
/// Of an unparseable file, this much is kept (as text) in the failed file.
const ORIGINAL_CHARS_MAX: usize = 4000;

const AGENT_FIELDS: [&str; 8] = ["to", "cc", "bcc", "subject", "body", "in_reply_to", "references", "attachments"];
/// Fields the platform writes; tolerated so a re-queued sent file parses.
const PLATFORM_FIELDS: [&str; 6] = ["status", "sent_at", "provider_message_id", "error", "failed_at", "delivery_id"];

/// Why an outbox file was refused. All are permanent for that file: it goes
/// to `outbox/failed/` with the message as its `error`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutboxError {
    #[error("the file is {bytes} bytes; the limit is {FILE_BYTES_MAX}")]
    TooLarge { bytes: usize },
    #[error("the file is not valid JSON: {0}")]
    NotJson(String),
    #[error("the file must hold one JSON object")]
    NotAnObject,
    #[error("unknown field {0:?}; allowed: to, cc, bcc, subject, body, in_reply_to, references, attachments")]
    UnknownField(String),
    #[error("the field {0:?} is required")]
    MissingField(&'static str),
    #[error("the field {field:?} must be {expected}")]
    WrongType { field: &'static str, expected: &'static str },
    #[error("{field}: {value:?} is not an email address")]
    InvalidRecipient { field: &'static str, value: String },
    #[error("\"to\" needs at least one recipient")]
    NoRecipients,
    #[error("{count} recipients in to, cc and bcc; the limit is {RECIPIENTS_MAX}")]
    TooManyRecipients { count: usize },
    #[error("the subject is empty")]
    EmptySubject,
    #[error("the subject is longer than {SUBJECT_CHARS_MAX} characters")]
    SubjectTooLong,
    #[error("the body is {bytes} bytes; the limit is {BODY_BYTES_MAX}")]
    BodyTooLarge { bytes: usize },
    #[error("{field}: {value:?} is not a Message-ID like <id@host>")]
    InvalidMessageId { field: &'static str, value: String },
    #[error("{count} attachments; the limit is {ATTACHMENTS_MAX}")]
    TooManyAttachments { count: usize },
    #[error("attachment path {path:?}: {reason}")]
    InvalidAttachmentPath { path: String, reason: String },
}

/// A validated outbox email.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEmail {
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub bcc: Vec<EmailAddress>,
    pub subject: String,
    /// Markdown.
    pub body: String,
    /// Message-ID in normal form (no brackets).
    pub in_reply_to: Option<String>,
    /// Normal form, oldest first.
    pub references: Vec<String>,
    /// Paths inside the agent's storage, validated, never the root.
    pub attachments: Vec<RelPath>,
}

impl OutboxEmail {
    /// Every recipient, for the allowed-recipients check and the SMTP envelope.
    pub fn recipients(&self) -> impl Iterator<Item = &EmailAddress> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }
}

/// Parses and validates an outbox file.
pub fn parse(bytes: &[u8]) -> Result<OutboxEmail, OutboxError> {
    if bytes.len() > FILE_BYTES_MAX {
        return Err(OutboxError::TooLarge { bytes: bytes.len() });
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| OutboxError::NotJson(e.to_string()))?;
    let Value::Object(map) = value else { return Err(OutboxError::NotAnObject) };
    if let Some(unknown) =
        map.keys().find(|k| !AGENT_FIELDS.contains(&k.as_str()) && !PLATFORM_FIELDS.contains(&k.as_str()))
    {
        return Err(OutboxError::UnknownField(unknown.chars().take(100).collect()));
    }

    let to = recipients(&map, "to")?;
    let cc = recipients(&map, "cc")?;
    let bcc = recipients(&map, "bcc")?;
    if to.is_empty() {
        return Err(OutboxError::NoRecipients);
    }
    let count = to.len() + cc.len() + bcc.len();
    if count > RECIPIENTS_MAX {
        return Err(OutboxError::TooManyRecipients { count });
    }

    let subject = match map.get("subject") {
        None | Some(Value::Null) => return Err(OutboxError::MissingField("subject")),
        Some(Value::String(s)) => s.split_whitespace().collect::<Vec<_>>().join(" "),
        Some(_) => return Err(OutboxError::WrongType { field: "subject", expected: "a string" }),
    };
    if subject.is_empty() {
        return Err(OutboxError::EmptySubject);
    }
    if subject.chars().count() > SUBJECT_CHARS_MAX {
        return Err(OutboxError::SubjectTooLong);
    }
    let body = match map.get("body") {
        None | Some(Value::Null) => return Err(OutboxError::MissingField("body")),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(OutboxError::WrongType { field: "body", expected: "a string (markdown)" }),
    };
    if body.len() > BODY_BYTES_MAX {
        return Err(OutboxError::BodyTooLarge { bytes: body.len() });
    }

    let in_reply_to = match map.get("in_reply_to") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(normalize_message_id(s).ok_or_else(|| OutboxError::InvalidMessageId {
            field: "in_reply_to",
            value: s.chars().take(100).collect(),
        })?),
        Some(_) => return Err(OutboxError::WrongType { field: "in_reply_to", expected: "a string like <id@host>" }),
    };
    let references = match map.get("references") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => message_ids(s)?,
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for item in items {
                let Value::String(s) = item else {
                    return Err(OutboxError::WrongType {
                        field: "references",
                        expected: "a string or a list of strings",
                    });
                };
                out.extend(message_ids(s)?);
            }
            out
        }
        Some(_) => {
            return Err(OutboxError::WrongType { field: "references", expected: "a string or a list of strings" });
        }
    };
    let references = super::inbound::cap_references(references);
    debug_assert!(references.len() <= REFERENCES_MAX);

    let attachments = match map.get("attachments") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            if items.len() > ATTACHMENTS_MAX {
                return Err(OutboxError::TooManyAttachments { count: items.len() });
            }
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                let path = match item {
                    Value::Object(o) => match o.get("path") {
                        Some(Value::String(p)) => p.as_str(),
                        _ => {
                            return Err(OutboxError::WrongType {
                                field: "attachments",
                                expected: "a list of {\"path\": \"...\"} objects",
                            });
                        }
                    },
                    _ => {
                        return Err(OutboxError::WrongType {
                            field: "attachments",
                            expected: "a list of {\"path\": \"...\"} objects",
                        });
                    }
                };
                let shown = || path.chars().take(200).collect::<String>();
                let rel = validate_path(path)
                    .map_err(|e| OutboxError::InvalidAttachmentPath { path: shown(), reason: e.to_string() })?;
                if rel.is_root() {
                    return Err(OutboxError::InvalidAttachmentPath {
                        path: shown(),
                        reason: "names /data itself".into(),
                    });
                }
                out.push(rel);
            }
            out
        }
        Some(_) => return Err(OutboxError::WrongType { field: "attachments", expected: "a list" }),
    };

    Ok(OutboxEmail { to, cc, bcc, subject, body, in_reply_to, references, attachments })
}

fn recipients(map: &Map<String, Value>, field: &'static str) -> Result<Vec<EmailAddress>, OutboxError> {
    let values: Vec<&str> = match map.get(field) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(items)) => {
            if items.len() > RECIPIENTS_MAX {
                return Err(OutboxError::TooManyRecipients { count: items.len() });
            }
            items
                .iter()
                .map(|v| v.as_str().ok_or(OutboxError::WrongType { field, expected: "a list of addresses" }))
                .collect::<Result<_, _>>()?
        }
        Some(_) => return Err(OutboxError::WrongType { field, expected: "a list of addresses" }),
    };
    let mut out: Vec<EmailAddress> = Vec::with_capacity(values.len());
    for value in values {
        let address = super::resend::parse_mailbox(value)
            .ok_or_else(|| OutboxError::InvalidRecipient { field, value: value.chars().take(100).collect() })?;
        if !out.iter().any(|a| a.as_str().eq_ignore_ascii_case(address.as_str())) {
            out.push(address);
        }
    }
    Ok(out)
}

fn message_ids(s: &str) -> Result<Vec<String>, OutboxError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let ids = parse_message_id_list(s);
    if ids.is_empty() {
        return Err(OutboxError::InvalidMessageId { field: "references", value: s.chars().take(100).collect() });
    }
    Ok(ids)
}

/// The file as filed in `outbox/sent/`: the agent's fields plus
/// `"status":"sent","sent_at","provider_message_id"`.
pub fn mark_sent(original: &[u8], sent_at: DateTime<Utc>, provider_message_id: &str) -> Vec<u8> {
    let mut map = original_fields(original);
    map.remove("error");
    map.remove("failed_at");
    map.insert("status".into(), "sent".into());
    map.insert("sent_at".into(), sent_at.to_rfc3339_opts(SecondsFormat::Millis, true).into());
    map.insert("provider_message_id".into(), provider_message_id.into());
    to_pretty(map)
}

/// The file as filed in `outbox/failed/`: the agent's fields plus
/// `"status":"failed","error","failed_at"`. A file that was not a JSON
/// object keeps its text (cut) under `"original"`.
pub fn mark_failed(original: &[u8], error: &str, failed_at: DateTime<Utc>) -> Vec<u8> {
    let mut map = original_fields(original);
    map.remove("sent_at");
    map.remove("provider_message_id");
    map.insert("status".into(), "failed".into());
    map.insert("error".into(), error.chars().take(ERROR_CHARS_MAX).collect::<String>().into());
    map.insert("failed_at".into(), failed_at.to_rfc3339_opts(SecondsFormat::Millis, true).into());
    to_pretty(map)
}

fn original_fields(original: &[u8]) -> Map<String, Value> {
    if original.len() <= FILE_BYTES_MAX
        && let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(original)
    {
        return map;
    }
    let mut map = Map::new();
    let text: String = String::from_utf8_lossy(original).chars().take(ORIGINAL_CHARS_MAX).collect();
    map.insert("original".into(), text.into());
    map
}

fn to_pretty(map: Map<String, Value>) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(&Value::Object(map)).expect("a JSON value always serialises");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"{"to":["a@example.com"],"cc":[],"bcc":[],"subject":"Hello","body":"markdown text",
 "in_reply_to":"<id@host>","references":"<a@host> <id@host>",
 "attachments":[{"path":"reports/q3.pdf"}]}"#;

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-07-01T12:00:00Z").unwrap().to_utc()
    }

    #[test]
    fn parses_the_spec_example() {
        let e = parse(SPEC_EXAMPLE.as_bytes()).unwrap();
        assert_eq!(e.to[0].as_str(), "a@example.com");
        assert_eq!(e.subject, "Hello");
        assert_eq!(e.body, "markdown text");
        assert_eq!(e.in_reply_to.as_deref(), Some("id@host"));
        assert_eq!(e.references, ["a@host", "id@host"]);
        assert_eq!(e.attachments[0].as_str(), "reports/q3.pdf");
        assert_eq!(e.recipients().count(), 1);
        // Lenient where it is unambiguous: a single address, a reference list.
        let e = parse(br#"{"to":"Ann <ann@x.org>","subject":"s","body":"","references":["<a@h>","<b@h>"],"attachments":[{"path":"/data/x.txt"}]}"#).unwrap();
        assert_eq!(e.to[0].as_str(), "ann@x.org");
        assert_eq!(e.references, ["a@h", "b@h"]);
        assert_eq!(e.attachments[0].as_str(), "x.txt");
    }

    #[test]
    fn refusals() {
        let many: Vec<String> = (0..51).map(|i| format!("\"u{i}@x.org\"")).collect();
        let too_many = format!(r#"{{"to":[{}],"subject":"s","body":"b"}}"#, many.join(","));
        let split =
            format!(r#"{{"to":[{}],"cc":[{}],"subject":"s","body":"b"}}"#, many[..30].join(","), many[30..].join(","));
        let long_body = format!(r#"{{"to":["a@x.org"],"subject":"s","body":"{}"}}"#, "x".repeat(BODY_BYTES_MAX + 1));
        let cases: Vec<(&str, OutboxError)> = vec![
            ("nope", OutboxError::NotJson("expected ident at line 1 column 2".into())),
            ("[1]", OutboxError::NotAnObject),
            (
                r#"{"to":["a@x.org"],"from":"me@x.org","subject":"s","body":"b"}"#,
                OutboxError::UnknownField("from".into()),
            ),
            (r#"{"subject":"s","body":"b"}"#, OutboxError::NoRecipients),
            (r#"{"to":[],"cc":["a@x.org"],"subject":"s","body":"b"}"#, OutboxError::NoRecipients),
            (
                r#"{"to":["bob"],"subject":"s","body":"b"}"#,
                OutboxError::InvalidRecipient { field: "to", value: "bob".into() },
            ),
            (
                r#"{"to":["a@x.org"],"bcc":[1],"subject":"s","body":"b"}"#,
                OutboxError::WrongType { field: "bcc", expected: "a list of addresses" },
            ),
            (&too_many, OutboxError::TooManyRecipients { count: 51 }),
            (&split, OutboxError::TooManyRecipients { count: 51 }),
            (r#"{"to":["a@x.org"],"body":"b"}"#, OutboxError::MissingField("subject")),
            (r#"{"to":["a@x.org"],"subject":" \n ","body":"b"}"#, OutboxError::EmptySubject),
            (r#"{"to":["a@x.org"],"subject":"s"}"#, OutboxError::MissingField("body")),
            (&long_body, OutboxError::BodyTooLarge { bytes: BODY_BYTES_MAX + 1 }),
            (
                r#"{"to":["a@x.org"],"subject":"s","body":"b","in_reply_to":"<a<b>"}"#,
                OutboxError::InvalidMessageId { field: "in_reply_to", value: "<a<b>".into() },
            ),
            (
                r#"{"to":["a@x.org"],"subject":"s","body":"b","attachments":[{"path":"../../etc/passwd"}]}"#,
                OutboxError::InvalidAttachmentPath {
                    path: "../../etc/passwd".into(),
                    reason: "path \"../../etc/passwd\" contains '..'".into(),
                },
            ),
            (
                r#"{"to":["a@x.org"],"subject":"s","body":"b","attachments":[{"path":"/etc/passwd"}]}"#,
                OutboxError::InvalidAttachmentPath {
                    path: "/etc/passwd".into(),
                    reason: "path \"/etc/passwd\" is outside /data".into(),
                },
            ),
            (
                r#"{"to":["a@x.org"],"subject":"s","body":"b","attachments":[{"path":"/data"}]}"#,
                OutboxError::InvalidAttachmentPath { path: "/data".into(), reason: "names /data itself".into() },
            ),
            (
                r#"{"to":["a@x.org"],"subject":"s","body":"b","attachments":["x.pdf"]}"#,
                OutboxError::WrongType { field: "attachments", expected: "a list of {\"path\": \"...\"} objects" },
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input.as_bytes()), Err(want), "{}", &input[..input.len().min(120)]);
        }
        let subject = format!(r#"{{"to":["a@x.org"],"subject":"{}","body":"b"}}"#, "s".repeat(501));
        assert_eq!(parse(subject.as_bytes()), Err(OutboxError::SubjectTooLong));
        let attachments: Vec<String> = (0..11).map(|i| format!(r#"{{"path":"f{i}"}}"#)).collect();
        let input =
            format!(r#"{{"to":["a@x.org"],"subject":"s","body":"b","attachments":[{}]}}"#, attachments.join(","));
        assert_eq!(parse(input.as_bytes()), Err(OutboxError::TooManyAttachments { count: 11 }));
        assert!(matches!(parse(&vec![b' '; FILE_BYTES_MAX + 1]), Err(OutboxError::TooLarge { .. })));
    }

    #[test]
    fn sent_and_failed_keep_the_agents_fields() {
        let sent: Value = serde_json::from_slice(&mark_sent(SPEC_EXAMPLE.as_bytes(), at(), "re_123")).unwrap();
        assert_eq!(sent["status"], "sent");
        assert_eq!(sent["sent_at"], "2026-07-01T12:00:00.000Z");
        assert_eq!(sent["provider_message_id"], "re_123");
        assert_eq!(sent["subject"], "Hello");
        assert_eq!(sent["attachments"][0]["path"], "reports/q3.pdf");
        // A sent file still parses (so a re-queued copy is valid).
        assert!(parse(&mark_sent(SPEC_EXAMPLE.as_bytes(), at(), "re_123")).is_ok());

        let failed: Value =
            serde_json::from_slice(&mark_failed(SPEC_EXAMPLE.as_bytes(), "recipient not allowed", at())).unwrap();
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["error"], "recipient not allowed");
        assert_eq!(failed["failed_at"], "2026-07-01T12:00:00.000Z");
        assert_eq!(failed["to"][0], "a@example.com");

        let garbage: Value =
            serde_json::from_slice(&mark_failed(b"{not json", "the file is not valid JSON", at())).unwrap();
        assert_eq!(garbage["original"], "{not json");
        assert_eq!(garbage["status"], "failed");
    }
}
