//! Random identifiers: `ag_` + a ULID for agents. Parsing is strict so an id
//! taken from a URL or a file can be used as a path component safely.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid agent id {0:?}: expected ag_ followed by a 26-character ULID")]
    InvalidAgentId(String),
}

/// An agent's permanent id. Its storage prefix is `agents/{id}/`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentId(String);

impl AgentId {
    const PREFIX: &'static str = "ag_";

    /// A new id from a ULID the caller made (time and randomness are the caller's).
    pub fn from_ulid(ulid: ulid::Ulid) -> Self {
        Self(format!("{}{}", Self::PREFIX, ulid.to_string().to_ascii_lowercase()))
    }

    pub fn parse(s: &str) -> Result<Self, IdError> {
        let rest = s.strip_prefix(Self::PREFIX).ok_or_else(|| IdError::InvalidAgentId(s.to_owned()))?;
        if rest.len() != 26 || ulid::Ulid::from_string(rest).is_err() {
            return Err(IdError::InvalidAgentId(s.to_owned()));
        }
        Ok(Self(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for AgentId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<AgentId> for String {
    fn from(id: AgentId) -> String {
        id.0
    }
}

/// A new ULID string in lowercase, used for job, delivery and token ids.
pub fn new_ulid_string(ulid: ulid::Ulid) -> String {
    ulid.to_string().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let id = AgentId::from_ulid(ulid::Ulid::from_parts(1, 2));
        assert_eq!(AgentId::parse(id.as_str()).unwrap(), id);
        for bad in ["", "ag_", "ag_../../etc", "xx_01h000000000000000000000", "ag_01H00000000000000000000000X"] {
            assert!(AgentId::parse(bad).is_err(), "{bad}");
        }
    }
}
