//! Email addresses as the platform stores and compares them: a local part and
//! a domain, the domain lowercased. Deliberately stricter than RFC 5322 (no
//! quoted local parts, no comments): these addresses become allowed-sender
//! rules and outbound recipients.

use std::fmt;

use serde::{Deserialize, Serialize};

pub const EMAIL_LEN_MAX: usize = 254;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid email address {0:?}: expected local@domain.tld")]
pub struct InvalidEmail(pub String);

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(s: &str) -> Result<Self, InvalidEmail> {
        let s = s.trim();
        let invalid = || InvalidEmail(s.to_owned());
        if s.len() > EMAIL_LEN_MAX {
            return Err(invalid());
        }
        let (local, domain) = s.rsplit_once('@').ok_or_else(invalid)?;
        let local_ok = !local.is_empty()
            && local.len() <= 64
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b));
        if !local_ok || !is_domain(domain) {
            return Err(invalid());
        }
        Ok(Self(format!("{local}@{}", domain.to_ascii_lowercase())))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn local_part(&self) -> &str {
        self.0.rsplit_once('@').map(|(l, _)| l).unwrap_or_default()
    }

    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or_default()
    }
}

/// A DNS name with at least one dot, labels of letters, digits and hyphens.
pub fn is_domain(domain: &str) -> bool {
    domain.len() <= 253
        && domain.contains('.')
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for EmailAddress {
    type Error = InvalidEmail;
    fn try_from(s: String) -> Result<Self, InvalidEmail> {
        Self::parse(&s)
    }
}

impl From<EmailAddress> for String {
    fn from(e: EmailAddress) -> String {
        e.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalises() {
        let e = EmailAddress::parse(" Ann.Lee+x@Example.COM ").unwrap();
        assert_eq!(e.as_str(), "Ann.Lee+x@example.com");
        assert_eq!(e.local_part(), "Ann.Lee+x");
        assert_eq!(e.domain(), "example.com");
    }

    #[test]
    fn rejects() {
        for bad in ["", "a", "a@", "@b.c", "a@b", "a@@b.c", "a b@c.d", "a@-b.c", ".a@b.c", "a..b@c.d", "a@b..c"] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad}");
        }
    }
}
