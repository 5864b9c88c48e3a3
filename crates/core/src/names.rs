//! Agent names: lowercase ASCII letters, generated as adjective + noun from
//! real word lists (a few hundred words each, in `words/`), e.g. `swiftpebble`.
//! A name is also the local part of the agent's email address, so the rules
//! here are strict. Generation takes the caller's RNG; uniqueness is checked
//! by the caller against the store and retried on collision.

use std::fmt;
use std::sync::LazyLock;

use rand::Rng;
use rand::seq::IndexedRandom;
use serde::{Deserialize, Serialize};

/// Names no agent may have: they are the platform's own mailboxes.
pub const RESERVED_NAMES: [&str; 6] = ["start", "postmaster", "abuse", "admin", "root", "noreply"];

pub const NAME_LEN_MAX: usize = 40;

static ADJECTIVES: LazyLock<Vec<&'static str>> =
    LazyLock::new(|| include_str!("../words/adjectives.txt").lines().collect());
static NOUNS: LazyLock<Vec<&'static str>> = LazyLock::new(|| include_str!("../words/nouns.txt").lines().collect());

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("agent name must be 1-{NAME_LEN_MAX} lowercase letters a-z, got {0:?}")]
    Invalid(String),
    #[error("agent name {0:?} is reserved")]
    Reserved(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentName(String);

impl AgentName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() || s.len() > NAME_LEN_MAX || !s.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(NameError::Invalid(s.to_owned()));
        }
        if RESERVED_NAMES.contains(&s) {
            return Err(NameError::Reserved(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// A random adjective + noun. Never reserved (no list word is one).
    pub fn generate(rng: &mut impl Rng) -> Self {
        let adjective = ADJECTIVES.choose(rng).expect("word list is not empty");
        let noun = NOUNS.choose(rng).expect("word list is not empty");
        Self(format!("{adjective}{noun}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Number of distinct generated names; the retry bound is derived from it.
    pub fn space() -> usize {
        ADJECTIVES.len() * NOUNS.len()
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for AgentName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<AgentName> for String {
    fn from(n: AgentName) -> String {
        n.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_lists_are_clean_and_large() {
        for list in [&*ADJECTIVES, &*NOUNS] {
            assert!(list.len() >= 250, "{}", list.len());
            assert!(list.iter().all(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase())));
            let mut sorted = list.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted.len(), list.len(), "duplicate word");
        }
        assert!(AgentName::space() > 50_000);
    }

    #[test]
    fn generated_names_parse() {
        let rng = &mut rand::rng();
        for _ in 0..1000 {
            let name = AgentName::generate(rng);
            assert_eq!(AgentName::parse(name.as_str()).unwrap(), name);
        }
    }

    #[test]
    fn rejects_reserved_and_invalid() {
        for r in RESERVED_NAMES {
            assert_eq!(AgentName::parse(r), Err(NameError::Reserved(r.into())));
        }
        for bad in ["", "Bob", "a-b", "a.b", "ünï", "abc1", &"a".repeat(41)] {
            assert!(matches!(AgentName::parse(bad), Err(NameError::Invalid(_))), "{bad}");
        }
    }
}
