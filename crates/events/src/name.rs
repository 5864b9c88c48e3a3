//! Event names: the `{name}` in `events/{name}/event.json`. A valid name
//! matches `[a-z0-9][a-z0-9_-]{0,63}`, so it is always one safe path
//! component and fits in a dedup key and a message tag (it contains no `:`
//! and no `]`). This module validates strings; it must not touch the
//! filesystem.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::excerpt;

/// Longest event name, in bytes (all valid names are ASCII).
pub const EVENT_NAME_BYTES_MAX: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid event name {0:?}: use 1 to 64 characters from a-z, 0-9, '_' and '-', starting with a letter or digit")]
pub struct InvalidEventName(pub String);

/// A validated event name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EventName(String);

impl EventName {
    pub fn parse(s: &str) -> Result<Self, InvalidEventName> {
        let bytes = s.as_bytes();
        let first_ok = bytes.first().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let rest_ok = bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-');
        if first_ok && rest_ok && bytes.len() <= EVENT_NAME_BYTES_MAX {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidEventName(excerpt(s)))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Path of the event file relative to the agent prefix.
    pub fn file_path(&self) -> String {
        format!("events/{}/event.json", self.0)
    }

    /// Path of the history file relative to the agent prefix.
    pub fn history_path(&self) -> String {
        format!("events/{}/history.jsonl", self.0)
    }

    /// Path of the error note written beside a malformed event file.
    pub fn error_path(&self) -> String {
        format!("events/{}/error.txt", self.0)
    }
}

impl fmt::Display for EventName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for EventName {
    type Error = InvalidEventName;
    fn try_from(s: String) -> Result<Self, InvalidEventName> {
        Self::parse(&s)
    }
}

impl From<EventName> for String {
    fn from(n: EventName) -> String {
        n.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let longest = format!("a{}", "b".repeat(EVENT_NAME_BYTES_MAX - 1));
        for ok in ["a", "0", "daily-report", "x_1", "9-to-5", "a-", longest.as_str()] {
            assert_eq!(EventName::parse(ok).unwrap().as_str(), ok);
        }
        let too_long = format!("a{}", "b".repeat(EVENT_NAME_BYTES_MAX));
        for bad in ["", "-a", "_a", "A", "daily Report", "a/b", "..", "a.b", "a:b", "é", too_long.as_str()] {
            assert_eq!(EventName::parse(bad), Err(InvalidEventName(excerpt(bad))), "{bad:?}");
        }
    }

    #[test]
    fn paths_and_message() {
        let n = EventName::parse("standup").unwrap();
        assert_eq!(n.file_path(), "events/standup/event.json");
        assert_eq!(n.history_path(), "events/standup/history.jsonl");
        assert_eq!(n.error_path(), "events/standup/error.txt");
        assert_eq!(
            EventName::parse("A").unwrap_err().to_string(),
            "invalid event name \"A\": use 1 to 64 characters from a-z, 0-9, '_' and '-', starting with a letter or digit"
        );
    }

    #[test]
    fn serde_validates() {
        assert_eq!(serde_json::to_string(&EventName::parse("a-1").unwrap()).unwrap(), "\"a-1\"");
        assert!(serde_json::from_str::<EventName>("\"Bad\"").is_err());
    }
}
