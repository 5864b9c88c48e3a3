//! Allowed-sender rules and the identities they match. A rule is one of
//! `a@b.c`, `@domain`, `telegram:USERID`, `telegram:chat:CHATID`,
//! `slack:USERID`. An empty rule list admits no one.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::email::{EmailAddress, is_domain};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid sender {0:?}: expected an address (a@b.c), a domain (@b.c), telegram:USERID, telegram:chat:CHATID or slack:USERID"
)]
pub struct InvalidSender(pub String);

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SenderPattern {
    Email(EmailAddress),
    Domain(String),
    TelegramUser(i64),
    TelegramChat(i64),
    SlackUser(String),
}

/// Who sent an inbound message, as the channel adapter established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderIdentity {
    Email(EmailAddress),
    Telegram {
        user_id: i64,
        chat_id: i64,
    },
    Slack {
        user_id: String,
    },
    /// The operator at the terminal or an authenticated API user.
    Local(String),
}

impl SenderPattern {
    pub fn parse(s: &str) -> Result<Self, InvalidSender> {
        let s = s.trim();
        let invalid = || InvalidSender(s.to_owned());
        if let Some(rest) = s.strip_prefix("telegram:chat:") {
            return rest.parse().map(Self::TelegramChat).map_err(|_| invalid());
        }
        if let Some(rest) = s.strip_prefix("telegram:") {
            return rest.parse().map(Self::TelegramUser).map_err(|_| invalid());
        }
        if let Some(rest) = s.strip_prefix("slack:") {
            let ok = !rest.is_empty() && rest.len() <= 32 && rest.bytes().all(|b| b.is_ascii_alphanumeric());
            return if ok { Ok(Self::SlackUser(rest.to_owned())) } else { Err(invalid()) };
        }
        if let Some(domain) = s.strip_prefix('@') {
            return if is_domain(domain) { Ok(Self::Domain(domain.to_ascii_lowercase())) } else { Err(invalid()) };
        }
        EmailAddress::parse(s).map(Self::Email).map_err(|_| invalid())
    }

    pub fn matches(&self, who: &SenderIdentity) -> bool {
        match (self, who) {
            (Self::Email(rule), SenderIdentity::Email(addr)) => rule.as_str().eq_ignore_ascii_case(addr.as_str()),
            (Self::Domain(domain), SenderIdentity::Email(addr)) => addr.domain() == domain,
            (Self::TelegramUser(id), SenderIdentity::Telegram { user_id, .. }) => id == user_id,
            (Self::TelegramChat(id), SenderIdentity::Telegram { chat_id, .. }) => id == chat_id,
            (Self::SlackUser(id), SenderIdentity::Slack { user_id }) => id == user_id,
            _ => false,
        }
    }
}

/// True when any rule admits the sender. Local (terminal / API) senders are
/// authenticated by other means and always pass.
pub fn is_allowed(rules: &[SenderPattern], who: &SenderIdentity) -> bool {
    matches!(who, SenderIdentity::Local(_)) || rules.iter().any(|r| r.matches(who))
}

impl fmt::Display for SenderPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Email(e) => write!(f, "{e}"),
            Self::Domain(d) => write!(f, "@{d}"),
            Self::TelegramUser(id) => write!(f, "telegram:{id}"),
            Self::TelegramChat(id) => write!(f, "telegram:chat:{id}"),
            Self::SlackUser(id) => write!(f, "slack:{id}"),
        }
    }
}

impl fmt::Display for SenderIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Email(e) => write!(f, "{e}"),
            Self::Telegram { user_id, .. } => write!(f, "telegram:{user_id}"),
            Self::Slack { user_id } => write!(f, "slack:{user_id}"),
            Self::Local(who) => f.write_str(who),
        }
    }
}

impl TryFrom<String> for SenderPattern {
    type Error = InvalidSender;
    fn try_from(s: String) -> Result<Self, InvalidSender> {
        Self::parse(&s)
    }
}

impl From<SenderPattern> for String {
    fn from(p: SenderPattern) -> String {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email(s: &str) -> SenderIdentity {
        SenderIdentity::Email(EmailAddress::parse(s).unwrap())
    }

    #[test]
    fn parses_each_form_and_round_trips() {
        for s in ["a@b.co", "@example.org", "telegram:42", "telegram:chat:-100123", "slack:U024BE7LH"] {
            assert_eq!(SenderPattern::parse(s).unwrap().to_string(), s);
        }
        for bad in ["", "@", "@nodot", "telegram:x", "telegram:chat:", "slack:", "slack:a-b", "bob"] {
            assert!(SenderPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn matching() {
        let rules = vec![SenderPattern::parse("ann@x.org").unwrap(), SenderPattern::parse("@corp.com").unwrap()];
        assert!(is_allowed(&rules, &email("ANN@x.org")));
        assert!(is_allowed(&rules, &email("bob@CORP.com")));
        assert!(!is_allowed(&rules, &email("bob@evil-corp.com")));
        assert!(!is_allowed(&rules, &email("bob@sub.corp.com")));
        assert!(!is_allowed(&[], &email("ann@x.org")));
        let tg = SenderIdentity::Telegram { user_id: 7, chat_id: -5 };
        assert!(is_allowed(&[SenderPattern::parse("telegram:7").unwrap()], &tg));
        assert!(is_allowed(&[SenderPattern::parse("telegram:chat:-5").unwrap()], &tg));
        assert!(!is_allowed(&[SenderPattern::parse("telegram:-5").unwrap()], &tg));
    }
}
