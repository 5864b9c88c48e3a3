//! Session ids and the records of a session file (`sessions/{id}.jsonl`).
//! Ids match `^[a-z]+-[A-Za-z0-9._-]{1,100}$` or are exactly `events`, so an
//! id is always a safe single file name.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::message::{ContentBlock, Message, Role, Usage, required};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid session id {0:?}: expected e.g. cli-main, web-main, email-<hex>, telegram-<chat>, or events")]
pub struct InvalidSession(pub String);

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SessionId(String);

impl SessionId {
    pub const EVENTS: &'static str = "events";
    pub const ID_LEN_MAX: usize = 100;

    pub fn parse(s: &str) -> Result<Self, InvalidSession> {
        if s == Self::EVENTS {
            return Ok(Self(s.to_owned()));
        }
        let invalid = || InvalidSession(s.to_owned());
        let (kind, rest) = s.split_once('-').ok_or_else(invalid)?;
        let kind_ok = !kind.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase());
        let rest_ok = !rest.is_empty()
            && rest.len() <= Self::ID_LEN_MAX
            && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if kind_ok && rest_ok { Ok(Self(s.to_owned())) } else { Err(invalid()) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The channel kind: the part before the first `-` (`events` for events).
    pub fn kind(&self) -> &str {
        self.0.split_once('-').map(|(k, _)| k).unwrap_or(&self.0)
    }

    /// Path of the session file relative to the agent prefix.
    pub fn file_path(&self) -> String {
        format!("sessions/{}.jsonl", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SessionId {
    type Error = InvalidSession;
    fn try_from(s: String) -> Result<Self, InvalidSession> {
        Self::parse(&s)
    }
}

impl From<SessionId> for String {
    fn from(s: SessionId) -> String {
        s.0
    }
}

/// One line of a session file. Records are appended, never rewritten.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RecordFields")]
pub struct SessionRecord {
    pub id: u64,
    pub ts: String,
    #[serde(flatten)]
    pub body: RecordBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RecordBody {
    Message {
        #[serde(flatten)]
        message: Message,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<Usage>,
        /// The job whose turn wrote this record, for resuming a retried turn.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job: Option<String>,
    },
    Compaction {
        summary: String,
        replaces_through: u64,
    },
    Meta {
        event: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
}

/// Every field any record may have, read in one pass. Reading
/// `SessionRecord` through its derived, flattened and tagged shape buffers
/// each line into an intermediate tree first; every turn reads its whole
/// session file, so long sessions paid that on every line (see the runtime
/// bench). The format is the same: what `SessionRecord` writes.
#[derive(Deserialize)]
struct RecordFields {
    id: u64,
    ts: String,
    #[serde(rename = "type")]
    kind: RecordKind,
    role: Option<Role>,
    content: Option<Vec<ContentBlock>>,
    channel: Option<String>,
    usage: Option<Usage>,
    job: Option<String>,
    summary: Option<String>,
    replaces_through: Option<u64>,
    event: Option<String>,
    detail: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum RecordKind {
    Message,
    Compaction,
    Meta,
}

impl TryFrom<RecordFields> for SessionRecord {
    type Error = String;

    fn try_from(fields: RecordFields) -> Result<Self, String> {
        let body = match fields.kind {
            RecordKind::Message => RecordBody::Message {
                message: Message {
                    role: required(fields.role, "role")?,
                    content: required(fields.content, "content")?,
                },
                channel: fields.channel,
                usage: fields.usage,
                job: fields.job,
            },
            RecordKind::Compaction => RecordBody::Compaction {
                summary: required(fields.summary, "summary")?,
                replaces_through: required(fields.replaces_through, "replaces_through")?,
            },
            RecordKind::Meta => RecordBody::Meta { event: required(fields.event, "event")?, detail: fields.detail },
        };
        Ok(Self { id: fields.id, ts: fields.ts, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, body: RecordBody) -> SessionRecord {
        SessionRecord { id, ts: "2026-11-26T08:00:00Z".to_owned(), body }
    }

    #[test]
    fn every_record_kind_reads_back_what_it_wrote() {
        let records = [
            record(
                1,
                RecordBody::Message {
                    message: Message {
                        role: Role::User,
                        content: vec![ContentBlock::Text { text: "hi \"there\"".into() }],
                    },
                    channel: Some("web".into()),
                    usage: None,
                    job: Some("job_1".into()),
                },
            ),
            record(
                2,
                RecordBody::Message {
                    message: Message {
                        role: Role::Assistant,
                        content: vec![ContentBlock::ToolUse {
                            id: "toolu_1".into(),
                            name: "bash".into(),
                            input: serde_json::json!({"command": "ls"}),
                        }],
                    },
                    channel: None,
                    usage: Some(Usage { input_tokens: 3, output_tokens: 4, ..Usage::default() }),
                    job: None,
                },
            ),
            record(3, RecordBody::Compaction { summary: "talked".into(), replaces_through: 2 }),
            record(4, RecordBody::Meta { event: "clear".into(), detail: None }),
            record(5, RecordBody::Meta { event: "model".into(), detail: Some("openai:gpt".into()) }),
        ];
        for original in records {
            let line = serde_json::to_string(&original).unwrap();
            let read: SessionRecord = serde_json::from_str(&line).unwrap();
            assert_eq!(read, original, "{line}");
        }
    }

    #[test]
    fn records_written_by_hand_or_by_older_versions_read_as_before() {
        let line =
            r#"{"id":7,"ts":"t","type":"message","role":"user","content":[{"type":"text","text":"x"}],"extra":1}"#;
        let read: SessionRecord = serde_json::from_str(line).unwrap();
        assert!(
            matches!(read.body, RecordBody::Message { ref job, .. } if job.is_none()),
            "unknown fields are ignored"
        );
        let usage_without_cache = r#"{"id":8,"ts":"t","type":"message","role":"assistant","content":[],
            "usage":{"input_tokens":1,"output_tokens":2}}"#;
        let read: SessionRecord = serde_json::from_str(usage_without_cache).unwrap();
        assert!(matches!(read.body, RecordBody::Message { usage: Some(Usage { input_tokens: 1, .. }), .. }));
        for (bad, says) in [
            (r#"{"id":1,"ts":"t","type":"message","content":[]}"#, "missing field `role`"),
            (r#"{"id":1,"ts":"t","type":"compaction","summary":"s"}"#, "missing field `replaces_through`"),
            (r#"{"id":1,"ts":"t","type":"shout","event":"x"}"#, "unknown variant `shout`"),
            (r#"{"ts":"t","type":"meta","event":"x"}"#, "missing field `id`"),
        ] {
            let error = serde_json::from_str::<SessionRecord>(bad).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }

    #[test]
    fn ids() {
        for ok in ["cli-main", "web-main", "email-0123456789abcdef", "telegram--100123", "slack-T1-C2-1700.1", "events"]
        {
            assert_eq!(SessionId::parse(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "cli", "cli-", "CLI-x", "cli-a/b", "cli-a b", "-x", "x-é", &format!("cli-{}", "a".repeat(101))]
        {
            assert!(SessionId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(SessionId::parse("slack-T1-C2").unwrap().kind(), "slack");
        assert_eq!(SessionId::parse("events").unwrap().kind(), "events");
    }
}
