//! Session ids and the records of a session file (`sessions/{id}.jsonl`).
//! Ids match `^[a-z]+-[A-Za-z0-9._-]{1,100}$` or are exactly `events`, so an
//! id is always a safe single file name.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::message::{Message, Usage};

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

#[cfg(test)]
mod tests {
    use super::*;

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
