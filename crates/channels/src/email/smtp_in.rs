//! Pure pieces of the built-in SMTP listener (the platform's
//! `email::smtp_listener` owns the sockets): the dedup key of a received
//! message and the EHLO reply.
//!
//! Must not: read sockets, files or the clock.

use std::panic::{AssertUnwindSafe, catch_unwind};

use mail_parser::MessageParser;
use sha2::{Digest, Sha256};
use tinyfat_core::AgentId;

use super::inbound::normalize_message_id;

/// The message's `Message-ID` in normal form, read from the headers only;
/// `None` when it has none (or an unusable one).
pub fn message_id(raw: &[u8]) -> Option<String> {
    catch_unwind(AssertUnwindSafe(|| {
        let message = MessageParser::default().parse_headers(raw)?;
        message.message_id().and_then(normalize_message_id)
    }))
    .ok()
    .flatten()
}

/// `smtp:{agent_id}:{Message-ID}`, or `smtp:{agent_id}:{sha256 of the raw
/// message}` when it has no Message-ID: a sender's retry of a message we
/// already acknowledged enqueues nothing new.
pub fn dedup_key(agent: &AgentId, raw: &[u8]) -> String {
    dedup_key_for(agent.as_str(), raw)
}

/// [`dedup_key`] for any scope (an agent id, or `start` for start@).
pub fn dedup_key_for(scope: &str, raw: &[u8]) -> String {
    let id = message_id(raw).unwrap_or_else(|| {
        let digest = Sha256::digest(raw);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    });
    format!("smtp:{scope}:{id}")
}

/// The extensions the listener offers, for the EHLO reply.
#[derive(Clone, Copy, Debug)]
pub struct Extensions {
    pub size_max: u64,
    pub starttls: bool,
}

/// The multi-line `250` answer to `EHLO {client}` from `server`, CRLF-ended.
pub fn ehlo_reply(server: &str, client: &str, ext: Extensions) -> String {
    let mut lines = vec![format!("{server} greets {client}")];
    lines.push(format!("SIZE {}", ext.size_max));
    lines.extend(["8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"].map(str::to_owned));
    if ext.starttls {
        lines.push("STARTTLS".to_owned());
    }
    let last = lines.len() - 1;
    lines.iter().enumerate().map(|(i, l)| format!("250{}{l}\r\n", if i == last { ' ' } else { '-' })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_key_uses_the_message_id_or_a_hash() {
        let agent = AgentId::parse("ag_01J0000000000000000000000A").unwrap();
        let with = b"From: a@b.co\r\nMessage-ID: <x1@b.co>\r\n\r\nhi\r\n";
        assert_eq!(dedup_key(&agent, with), format!("smtp:{agent}:x1@b.co"));
        let without = b"From: a@b.co\r\n\r\nhi\r\n";
        let key = dedup_key(&agent, without);
        assert!(key.starts_with(&format!("smtp:{agent}:")) && key.len() == format!("smtp:{agent}:").len() + 64);
        assert_eq!(key, dedup_key(&agent, without));
        assert_ne!(key, dedup_key(&agent, b"From: a@b.co\r\n\r\nbye\r\n"));
    }

    #[test]
    fn ehlo_reply_lists_extensions_and_ends_with_a_space_line() {
        let reply = ehlo_reply("mx.test", "client", Extensions { size_max: 1000, starttls: true });
        assert_eq!(
            reply,
            "250-mx.test greets client\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n"
        );
        let plain = ehlo_reply("mx.test", "c", Extensions { size_max: 5, starttls: false });
        assert!(plain.ends_with("250 ENHANCEDSTATUSCODES\r\n") && !plain.contains("STARTTLS"));
    }
}
