//! What a firing turns into: the dedup key of the event's job and the
//! message the agent receives. This module owns those two strings; it must
//! not enqueue anything or read the event file (the caller passes its bytes).

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};

use crate::event::{Event, Trigger};
use crate::name::EventName;
use crate::time::format_utc;

/// The dedup key of the job that fires `event` for `due_at`:
/// `event:{agent}:{name}:{due_at as RFC 3339 UTC}`, so a tick is enqueued at
/// most once however often the scheduler retries. An immediate event has no
/// scheduled instant; its key is `event:{agent}:{name}:{sha256 hex of file}`,
/// so the same file fires once and a rewritten one fires again. `file` is
/// the exact bytes `event` was parsed from.
pub fn dedup_key(agent_id: &str, name: &EventName, event: &Event, file: &[u8], due_at: DateTime<Utc>) -> String {
    let instance = match event.trigger() {
        Trigger::Immediate => sha256_hex(file),
        Trigger::OneShot { .. } | Trigger::Periodic(_) => format_utc(due_at),
    };
    format!("event:{agent_id}:{name}:{instance}")
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The user message of the event's turn:
/// `[EVENT:{name}:{type}:{at|schedule|now}] {text}` (SPEC §5).
pub fn event_message(name: &EventName, event: &Event) -> String {
    format!("[EVENT:{name}:{}:{}] {}", event.event_type(), event.tag(), event.text())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "ag_01JABCDEFGHJKMNPQRSTVWXYZ0";

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn name(s: &str) -> EventName {
        EventName::parse(s).unwrap()
    }

    fn event(json: &str) -> Event {
        Event::parse(json.as_bytes(), "UTC").unwrap()
    }

    #[test]
    fn scheduled_keys_use_the_due_instant_in_utc() {
        let file = r#"{"type":"one-shot","at":"2026-12-01T09:00:00+01:00","text":"t"}"#;
        let e = event(file);
        let due = utc("2026-12-01T08:00:00Z");
        let key = dedup_key(AGENT, &name("dentist"), &e, file.as_bytes(), due);
        assert_eq!(key, format!("event:{AGENT}:dentist:2026-12-01T08:00:00Z"));
        // Stable: the same inputs give the same key, and the file bytes do not matter.
        assert_eq!(dedup_key(AGENT, &name("dentist"), &e, b"other bytes", due), key);

        let file = r#"{"type":"periodic","schedule":"0 9 * * *","timezone":"Europe/Vienna","text":"t"}"#;
        let e = event(file);
        let k1 = dedup_key(AGENT, &name("standup"), &e, file.as_bytes(), utc("2026-06-01T07:00:00Z"));
        let k2 = dedup_key(AGENT, &name("standup"), &e, file.as_bytes(), utc("2026-06-02T07:00:00Z"));
        assert_eq!(k1, format!("event:{AGENT}:standup:2026-06-01T07:00:00Z"));
        assert_ne!(k1, k2);
        // Distinct per name and per agent.
        assert_ne!(k1, dedup_key(AGENT, &name("standup2"), &e, file.as_bytes(), utc("2026-06-01T07:00:00Z")));
        assert_ne!(k1, dedup_key("ag_other", &name("standup"), &e, file.as_bytes(), utc("2026-06-01T07:00:00Z")));
    }

    #[test]
    fn immediate_keys_use_the_file_hash() {
        let file = r#"{"type":"immediate","text":"hi"}"#;
        let e = event(file);
        let key = dedup_key(AGENT, &name("ping"), &e, file.as_bytes(), utc("2026-06-01T07:00:00Z"));
        assert_eq!(key, format!("event:{AGENT}:ping:06cfdf742464d189d4f0f046e2482a28237aa2b8812c260de5062cd7faa35516"));
        // The due time does not matter; the file's bytes do.
        assert_eq!(dedup_key(AGENT, &name("ping"), &e, file.as_bytes(), utc("2030-01-01T00:00:00Z")), key);
        let rewritten = r#"{"type":"immediate","text":"hi" }"#;
        assert_ne!(
            dedup_key(AGENT, &name("ping"), &event(rewritten), rewritten.as_bytes(), utc("2026-06-01T07:00:00Z")),
            key
        );
    }

    #[test]
    fn messages() {
        let cases = [
            (r#"{"type":"immediate","text":"check mail"}"#, "[EVENT:ping:immediate:now] check mail"),
            (
                r#"{"type":"one-shot","at":"2026-12-01T09:00:00+01:00","text":"dentist at 10"}"#,
                "[EVENT:ping:one-shot:2026-12-01T09:00:00+01:00] dentist at 10",
            ),
            (
                r#"{"type":"periodic","schedule":"0 9 * * 1-5","timezone":"Europe/Vienna","text":"standup\nnotes"}"#,
                "[EVENT:ping:periodic:0 9 * * 1-5] standup\nnotes",
            ),
        ];
        for (json, want) in cases {
            assert_eq!(event_message(&name("ping"), &event(json)), want);
        }
    }
}
