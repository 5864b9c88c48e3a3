//! The wake manifest (`GET /api/agents/{id}/schedule`, `tinyfat events NAME
//! --json`): `{"next_wake": ISO-8601 | null, "events": [{"name","type",
//! "next_fire"}]}`. This module owns its shape and how it is built from the
//! caller's list; it must not read event files or timers itself.
//!
//! Beyond SPEC's three fields an entry may carry `"status":"done"` for a done
//! event and `"error"` (the `error.txt` text) for a malformed one, whose
//! `"type"` is `"invalid"`. A done or malformed event's `next_fire` is always
//! `null`, whatever the caller passed. Entries are sorted by name.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventFileError, Status};

/// The `"type"` of a manifest entry whose event file is malformed.
pub const MANIFEST_TYPE_INVALID: &str = "invalid";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WakeManifest {
    /// The earliest `next_fire` of all entries.
    #[serde(with = "crate::time::utc_opt")]
    pub next_wake: Option<DateTime<Utc>>,
    pub events: Vec<ManifestEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub name: String,
    /// `immediate`, `one-shot`, `periodic`, or [`MANIFEST_TYPE_INVALID`].
    #[serde(rename = "type")]
    pub event_type: String,
    #[serde(with = "crate::time::utc_opt")]
    pub next_fire: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Status::is_active")]
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Builds the manifest from `(name, parsed event or its error, next fire)`
/// for each event directory; the next fire normally comes from the timers
/// table (see `TimerState::next_fire`).
pub fn build_manifest<'a>(
    items: impl IntoIterator<Item = (&'a str, Result<&'a Event, &'a EventFileError>, Option<DateTime<Utc>>)>,
) -> WakeManifest {
    let mut events: Vec<ManifestEntry> = items
        .into_iter()
        .map(|(name, event, next_fire)| match event {
            Ok(event) => ManifestEntry {
                name: name.to_owned(),
                event_type: event.event_type().as_str().to_owned(),
                next_fire: next_fire.filter(|_| !event.is_done()),
                status: event.status(),
                error: None,
            },
            Err(error) => ManifestEntry {
                name: name.to_owned(),
                event_type: MANIFEST_TYPE_INVALID.to_owned(),
                next_fire: None,
                status: Status::Active,
                error: Some(error.to_string()),
            },
        })
        .collect();
    events.sort_by(|a, b| a.name.cmp(&b.name));
    let next_wake = events.iter().filter_map(|e| e.next_fire).min();
    WakeManifest { next_wake, events }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn event(json: &str) -> Event {
        Event::parse(json.as_bytes(), "UTC").unwrap()
    }

    #[test]
    fn builds_sorted_manifest_with_earliest_wake() {
        let standup = event(r#"{"type":"periodic","schedule":"0 9 * * 1-5","text":"t"}"#);
        let dentist = event(r#"{"type":"one-shot","at":"2026-12-01T09:00:00+01:00","text":"t"}"#);
        let done = event(r#"{"type":"immediate","text":"t","status":"done"}"#);
        let broken = Event::parse(br#"{"type":"weekly","text":"t"}"#, "UTC").unwrap_err();
        let manifest = build_manifest([
            ("standup", Ok(&standup), Some(utc("2026-06-02T09:00:00Z"))),
            ("dentist", Ok(&dentist), Some(utc("2026-12-01T08:00:00Z"))),
            ("ping", Ok(&done), Some(utc("2026-06-01T00:00:00Z"))),
            ("broken", Err(&broken), Some(utc("2026-06-01T00:00:00Z"))),
        ]);
        assert_eq!(manifest.next_wake, Some(utc("2026-06-02T09:00:00Z")));
        let json = serde_json::to_value(&manifest).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "next_wake": "2026-06-02T09:00:00Z",
                "events": [
                    {"name": "broken", "type": "invalid", "next_fire": null,
                     "error": "unknown type \"weekly\": use \"immediate\", \"one-shot\" or \"periodic\""},
                    {"name": "dentist", "type": "one-shot", "next_fire": "2026-12-01T08:00:00Z"},
                    {"name": "ping", "type": "immediate", "next_fire": null, "status": "done"},
                    {"name": "standup", "type": "periodic", "next_fire": "2026-06-02T09:00:00Z"},
                ]
            })
        );
        assert_eq!(serde_json::from_value::<WakeManifest>(json).unwrap(), manifest);
    }

    #[test]
    fn empty_manifest() {
        let manifest = build_manifest([]);
        assert_eq!(serde_json::to_string(&manifest).unwrap(), r#"{"next_wake":null,"events":[]}"#);
    }
}
