//! The event file `events/{name}/event.json` (SPEC §5): its three types,
//! validation, and the error text written verbatim to `error.txt` beside a
//! malformed file. This module owns the file format; it must not read files,
//! look at the clock or decide when an event fires (that is `fire`).
//!
//! ```json
//! {"type":"immediate","text":"..."}
//! {"type":"one-shot","at":"2026-12-01T09:00:00+01:00","text":"..."}
//! {"type":"periodic","schedule":"0 9 * * 1-5","timezone":"Europe/Vienna","text":"..."}
//! ```
//! plus optional `"session"` (default `events`) and `"status"` (`"done"`, or
//! `"active"`, the default). The platform sets `"status":"done"` on a fired
//! one-shot or immediate event; a done event never fires again.
//!
//! Strictness: unknown fields are rejected, not ignored, and so are fields of
//! another type (`"at"` on a periodic event, `"timezone"` on a one-shot,
//! whose offset is part of `"at"`). A misspelt `"timezone"` that was ignored
//! would silently fire the event in the agent's default zone; an error the
//! agent can read is better. Duplicate fields, `null` values and empty text are
//! errors too. Every error's `Display` is one self-contained sentence that
//! quotes at most an excerpt of the offending value.

use std::fmt;

use chrono::format::ParseErrorKind;
use chrono::{DateTime, NaiveDateTime, Utc};
use chrono_tz::Tz;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tinyfat_core::SessionId;
use tinyfat_core::session::InvalidSession;

use crate::excerpt;
use crate::name::InvalidEventName;
use crate::schedule::{Schedule, ScheduleError};

/// Largest event file accepted, in bytes: room for the longest text even
/// when JSON escaping doubles it.
pub const EVENT_FILE_BYTES_MAX: usize = 32 * 1024;

/// Longest `"text"`, in bytes of UTF-8.
pub const EVENT_TEXT_BYTES_MAX: usize = 8 * 1024;

/// Every field an event file may contain, whatever its type.
const FIELDS_ALL: [&str; 7] = ["type", "text", "at", "schedule", "timezone", "session", "status"];

/// The `"type"` of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "immediate")]
    Immediate,
    #[serde(rename = "one-shot")]
    OneShot,
    #[serde(rename = "periodic")]
    Periodic,
}

impl EventType {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Immediate => "immediate",
            Self::OneShot => "one-shot",
            Self::Periodic => "periodic",
        }
    }

    fn from_name(s: &str) -> Option<Self> {
        [Self::Immediate, Self::OneShot, Self::Periodic].into_iter().find(|t| t.as_str() == s)
    }

    /// "an immediate", "a one-shot", "a periodic": for error messages.
    const fn with_article(self) -> &'static str {
        match self {
            Self::Immediate => "an immediate",
            Self::OneShot => "a one-shot",
            Self::Periodic => "a periodic",
        }
    }

    /// The fields an event file of this type may contain.
    pub const fn fields(self) -> &'static [&'static str] {
        match self {
            Self::Immediate => &["type", "text", "session", "status"],
            Self::OneShot => &["type", "text", "at", "session", "status"],
            Self::Periodic => &["type", "text", "schedule", "timezone", "session", "status"],
        }
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an event may still fire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Active,
    /// Set by the platform after a one-shot or immediate event fired.
    Done,
}

impl Status {
    pub fn is_active(&self) -> bool {
        *self == Self::Active
    }
}

/// What makes an event fire.
#[derive(Clone, Debug, PartialEq)]
pub enum Trigger {
    /// As soon as the platform sees the file.
    Immediate,
    /// Once, at `at`. `written` is the value as it stands in the file, which
    /// the agent's message quotes.
    OneShot { at: DateTime<Utc>, written: String },
    /// At every tick of a cron schedule in a time zone.
    Periodic(Schedule),
}

/// A validated event file.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    trigger: Trigger,
    text: String,
    session: SessionId,
    status: Status,
}

/// Why an event file was rejected. Every variant means the same to the
/// caller: leave the file alone, write this error's text to `error.txt`
/// beside it, and skip the event until the file changes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventFileError {
    #[error("event.json is {size_bytes} bytes; the limit is {max_bytes} bytes")]
    FileTooLarge { size_bytes: usize, max_bytes: usize },
    #[error("event.json is not a valid JSON object: {0}")]
    InvalidJson(String),
    #[error("field \"{0}\" appears more than once")]
    DuplicateField(String),
    #[error(
        "unknown field \"{0}\": an event file may contain only \"type\", \"text\", \"at\", \"schedule\", \"timezone\", \"session\" and \"status\""
    )]
    UnknownField(String),
    #[error("missing \"type\": use \"immediate\", \"one-shot\" or \"periodic\"")]
    MissingType,
    #[error("unknown type \"{0}\": use \"immediate\", \"one-shot\" or \"periodic\"")]
    UnknownType(String),
    #[error("\"{field}\" does not belong in {} event, which has only the fields {}", .event_type.with_article(), quoted_list(.event_type.fields()))]
    FieldNotAllowed { field: &'static str, event_type: EventType },
    #[error("{} event needs \"{field}\"", .event_type.with_article())]
    MissingField { field: &'static str, event_type: EventType },
    #[error("\"{0}\" must be a string")]
    NotAString(&'static str),
    #[error("\"text\" is empty: write what the agent should do when the event fires")]
    EmptyText,
    #[error("\"text\" is {len_bytes} bytes; the limit is {max_bytes} bytes")]
    TextTooLong { len_bytes: usize, max_bytes: usize },
    #[error(
        "\"at\" {value:?} is not an RFC 3339 time with a UTC offset ({reason}); write it like \"2026-12-01T09:00:00+01:00\" or \"2026-12-01T08:00:00Z\""
    )]
    BadTime { value: String, reason: String },
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error("unknown timezone {0:?}: use an IANA zone name like \"Europe/Vienna\", \"America/New_York\" or \"UTC\"")]
    UnknownTimezone(String),
    #[error(
        "the agent's timezone {0:?} in config.json is not a known IANA zone; set \"timezone\" in event.json, like \"Europe/Vienna\""
    )]
    UnknownDefaultTimezone(String),
    /// Carries the text of core's `InvalidSession`, which quotes the id.
    #[error("\"session\": {0}")]
    BadSession(String),
    #[error("\"status\" must be \"active\" or \"done\", not {0:?}")]
    BadStatus(String),
    /// For callers listing event directories: a directory whose name is not
    /// a valid event name is reported like a malformed file.
    #[error(transparent)]
    BadName(#[from] InvalidEventName),
}

fn quoted_list(fields: &[&str]) -> String {
    fields.iter().map(|f| format!("\"{f}\"")).collect::<Vec<_>>().join(", ")
}

impl Event {
    /// Parses and validates the bytes of an event file. `default_timezone`
    /// is the agent's `config.json` timezone; it is used (and must be a
    /// known zone) only for a periodic event without its own `"timezone"`.
    pub fn parse(file: &[u8], default_timezone: &str) -> Result<Self, EventFileError> {
        if file.len() > EVENT_FILE_BYTES_MAX {
            return Err(EventFileError::FileTooLarge { size_bytes: file.len(), max_bytes: EVENT_FILE_BYTES_MAX });
        }
        let Fields(entries) = serde_json::from_slice(file).map_err(|e| EventFileError::InvalidJson(e.to_string()))?;
        let mut fields = serde_json::Map::new();
        for (key, value) in entries {
            if !FIELDS_ALL.contains(&key.as_str()) {
                return Err(EventFileError::UnknownField(excerpt(&key)));
            }
            if fields.contains_key(&key) {
                return Err(EventFileError::DuplicateField(key));
            }
            fields.insert(key, value);
        }
        let fields = Strings(fields);

        let type_name = fields.get("type")?.ok_or(EventFileError::MissingType)?;
        let event_type =
            EventType::from_name(type_name).ok_or_else(|| EventFileError::UnknownType(excerpt(type_name)))?;
        if let Some(field) =
            FIELDS_ALL.into_iter().find(|f| fields.0.contains_key(*f) && !event_type.fields().contains(f))
        {
            return Err(EventFileError::FieldNotAllowed { field, event_type });
        }
        let required =
            |field: &'static str| fields.get(field)?.ok_or(EventFileError::MissingField { field, event_type });

        let text = required("text")?;
        if text.trim().is_empty() {
            return Err(EventFileError::EmptyText);
        }
        if text.len() > EVENT_TEXT_BYTES_MAX {
            return Err(EventFileError::TextTooLong { len_bytes: text.len(), max_bytes: EVENT_TEXT_BYTES_MAX });
        }

        let trigger = match event_type {
            EventType::Immediate => Trigger::Immediate,
            EventType::OneShot => {
                let written = required("at")?;
                Trigger::OneShot { at: parse_at(written)?, written: written.to_owned() }
            }
            EventType::Periodic => {
                let expr = required("schedule")?;
                let timezone = match fields.get("timezone")? {
                    Some(zone) => zone.parse::<Tz>().map_err(|_| EventFileError::UnknownTimezone(excerpt(zone)))?,
                    None => default_timezone
                        .parse::<Tz>()
                        .map_err(|_| EventFileError::UnknownDefaultTimezone(excerpt(default_timezone)))?,
                };
                Trigger::Periodic(Schedule::parse(expr, timezone)?)
            }
        };

        let session = match fields.get("session")? {
            Some(s) => SessionId::parse(s)
                .map_err(|e| EventFileError::BadSession(InvalidSession(excerpt(&e.0)).to_string()))?,
            None => SessionId::parse(SessionId::EVENTS).expect("\"events\" is a session id"),
        };
        let status = match fields.get("status")? {
            None | Some("active") => Status::Active,
            Some("done") => Status::Done,
            Some(other) => return Err(EventFileError::BadStatus(excerpt(other))),
        };
        Ok(Self { trigger, text: text.to_owned(), session, status })
    }

    pub fn trigger(&self) -> &Trigger {
        &self.trigger
    }

    pub fn event_type(&self) -> EventType {
        match self.trigger {
            Trigger::Immediate => EventType::Immediate,
            Trigger::OneShot { .. } => EventType::OneShot,
            Trigger::Periodic(_) => EventType::Periodic,
        }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// The session the event's turn runs in.
    pub fn session(&self) -> &SessionId {
        &self.session
    }

    pub fn status(&self) -> Status {
        self.status
    }

    pub fn is_done(&self) -> bool {
        self.status == Status::Done
    }

    /// The third part of the message tag: the `at` value as written for a
    /// one-shot event, the schedule for a periodic one, `now` for an
    /// immediate one.
    pub fn tag(&self) -> &str {
        match &self.trigger {
            Trigger::Immediate => "now",
            Trigger::OneShot { written, .. } => written,
            Trigger::Periodic(schedule) => schedule.expr(),
        }
    }
}

fn parse_at(value: &str) -> Result<DateTime<Utc>, EventFileError> {
    DateTime::parse_from_rfc3339(value).map(|t| t.to_utc()).map_err(|e| {
        // chrono's own reasons ("premature end of input") confuse more than
        // they help, so say what is wrong in the file's terms.
        let reason = if e.kind() == ParseErrorKind::OutOfRange {
            "a date or time field is out of range"
        } else if NaiveDateTime::parse_from_str(value, "%Y-%m-%dT%H:%M:%S%.f").is_ok() {
            "it has no UTC offset; add Z or +hh:mm"
        } else {
            "expected YYYY-MM-DDTHH:MM:SS followed by Z or +hh:mm"
        };
        EventFileError::BadTime { value: excerpt(value), reason: reason.to_owned() }
    })
}

/// The top-level object as its entries in file order, duplicates kept, so
/// that a repeated field is an error instead of last-one-wins.
struct Fields(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Fields;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(Fields(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// The known fields, read as strings.
struct Strings(serde_json::Map<String, Value>);

impl Strings {
    fn get(&self, field: &'static str) -> Result<Option<&str>, EventFileError> {
        match self.0.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(EventFileError::NotAString(field)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZONE: &str = "Europe/Vienna";

    fn parse(json: &str) -> Event {
        Event::parse(json.as_bytes(), ZONE).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn valid_files() {
        let e = parse(r#"{"type":"immediate","text":"check the inbox"}"#);
        assert_eq!((e.event_type(), e.text(), e.tag()), (EventType::Immediate, "check the inbox", "now"));
        assert_eq!(e.trigger(), &Trigger::Immediate);
        assert_eq!(e.session().as_str(), "events");
        assert_eq!(e.status(), Status::Active);

        let e = parse(r#"{"type":"one-shot","at":"2026-12-01T09:00:00+01:00","text":"dentist"}"#);
        assert_eq!(
            e.trigger(),
            &Trigger::OneShot { at: utc("2026-12-01T08:00:00Z"), written: "2026-12-01T09:00:00+01:00".into() }
        );
        assert_eq!(e.tag(), "2026-12-01T09:00:00+01:00");

        let e = parse(r#"{"type":"periodic","schedule":"0 9 * * 1-5","timezone":"America/New_York","text":"standup"}"#);
        let Trigger::Periodic(s) = e.trigger() else { panic!("{e:?}") };
        assert_eq!((s.expr(), s.timezone()), ("0 9 * * 1-5", chrono_tz::America::New_York));
        assert_eq!(e.tag(), "0 9 * * 1-5");

        // The timezone defaults to the agent's.
        let e = parse(r#"{"type":"periodic","schedule":"0 9 * * *","text":"t"}"#);
        let Trigger::Periodic(s) = e.trigger() else { panic!("{e:?}") };
        assert_eq!(s.timezone(), chrono_tz::Europe::Vienna);

        let e = parse(r#"{"type":"immediate","text":"t","session":"telegram-42","status":"done"}"#);
        assert_eq!((e.session().as_str(), e.status(), e.is_done()), ("telegram-42", Status::Done, true));
        assert_eq!(parse(r#"{"type":"immediate","text":"t","status":"active"}"#).status(), Status::Active);

        // Text at the limit, multi-line and non-ASCII, is fine.
        let text = "ü".repeat(EVENT_TEXT_BYTES_MAX / 2);
        let json = serde_json::json!({"type": "immediate", "text": text}).to_string();
        assert_eq!(parse(&json).text(), text);
        assert_eq!(parse(r#"{"type":"immediate","text":"a\nb"}"#).text(), "a\nb");
        // A non-IANA default does not matter to an event that does not use it.
        assert!(Event::parse(br#"{"type":"immediate","text":"t"}"#, "Mars/Olympus").is_ok());
    }

    #[test]
    fn malformed_files_and_their_messages() {
        let big_text =
            serde_json::json!({"type": "immediate", "text": "x".repeat(EVENT_TEXT_BYTES_MAX + 1)}).to_string();
        let huge = format!(r#"{{"type":"immediate","text":"{}"}}"#, "x".repeat(EVENT_FILE_BYTES_MAX));
        let huge_message = format!("event.json is {} bytes; the limit is 32768 bytes", EVENT_FILE_BYTES_MAX + 30);
        let cases: &[(&str, &str)] = &[
            ("", "event.json is not a valid JSON object: EOF while parsing a value at line 1 column 0"),
            ("{\"type\":", "event.json is not a valid JSON object: EOF while parsing a value at line 1 column 8"),
            (
                "[1]",
                "event.json is not a valid JSON object: invalid type: sequence, expected a JSON object at line 1 column 0",
            ),
            (
                r#"{"type":"immediate","text":"a"} x"#,
                "event.json is not a valid JSON object: trailing characters at line 1 column 33",
            ),
            (&huge, &huge_message),
            (r#"{"type":"immediate","text":"a","text":"b"}"#, "field \"text\" appears more than once"),
            (
                r#"{"type":"periodic","schedule":"0 9 * * *","timzone":"UTC","text":"a"}"#,
                "unknown field \"timzone\": an event file may contain only \"type\", \"text\", \"at\", \"schedule\", \"timezone\", \"session\" and \"status\"",
            ),
            (r#"{"text":"a"}"#, "missing \"type\": use \"immediate\", \"one-shot\" or \"periodic\""),
            (
                r#"{"type":"oneshot","text":"a"}"#,
                "unknown type \"oneshot\": use \"immediate\", \"one-shot\" or \"periodic\"",
            ),
            (r#"{"type":1,"text":"a"}"#, "\"type\" must be a string"),
            (r#"{"type":"immediate"}"#, "an immediate event needs \"text\""),
            (r#"{"type":"immediate","text":null}"#, "\"text\" must be a string"),
            (r#"{"type":"immediate","text":["a"]}"#, "\"text\" must be a string"),
            (
                r#"{"type":"immediate","text":"  \n"}"#,
                "\"text\" is empty: write what the agent should do when the event fires",
            ),
            (&big_text, "\"text\" is 8193 bytes; the limit is 8192 bytes"),
            (
                r#"{"type":"immediate","at":"2026-12-01T09:00:00Z","text":"a"}"#,
                "\"at\" does not belong in an immediate event, which has only the fields \"type\", \"text\", \"session\", \"status\"",
            ),
            (
                r#"{"type":"one-shot","at":"2026-12-01T09:00:00Z","timezone":"UTC","text":"a"}"#,
                "\"timezone\" does not belong in a one-shot event, which has only the fields \"type\", \"text\", \"at\", \"session\", \"status\"",
            ),
            (
                r#"{"type":"periodic","schedule":"0 9 * * *","at":"2026-12-01T09:00:00Z","text":"a"}"#,
                "\"at\" does not belong in a periodic event, which has only the fields \"type\", \"text\", \"schedule\", \"timezone\", \"session\", \"status\"",
            ),
            (r#"{"type":"one-shot","text":"a"}"#, "a one-shot event needs \"at\""),
            (
                r#"{"type":"one-shot","at":"2026-12-01T09:00:00","text":"a"}"#,
                "\"at\" \"2026-12-01T09:00:00\" is not an RFC 3339 time with a UTC offset (it has no UTC offset; add Z or +hh:mm); write it like \"2026-12-01T09:00:00+01:00\" or \"2026-12-01T08:00:00Z\"",
            ),
            (
                r#"{"type":"one-shot","at":"tomorrow at nine","text":"a"}"#,
                "\"at\" \"tomorrow at nine\" is not an RFC 3339 time with a UTC offset (expected YYYY-MM-DDTHH:MM:SS followed by Z or +hh:mm); write it like \"2026-12-01T09:00:00+01:00\" or \"2026-12-01T08:00:00Z\"",
            ),
            (
                r#"{"type":"one-shot","at":"2026-13-01T09:00:00Z","text":"a"}"#,
                "\"at\" \"2026-13-01T09:00:00Z\" is not an RFC 3339 time with a UTC offset (a date or time field is out of range); write it like \"2026-12-01T09:00:00+01:00\" or \"2026-12-01T08:00:00Z\"",
            ),
            (r#"{"type":"periodic","text":"a"}"#, "a periodic event needs \"schedule\""),
            (
                r#"{"type":"periodic","schedule":"0 9 * *","text":"a"}"#,
                "\"schedule\" \"0 9 * *\" is not a 5-field cron expression (minute hour day-of-month month day-of-week, like \"0 9 * * 1-5\"): it has 4 field(s)",
            ),
            (
                r#"{"type":"periodic","schedule":"* * * * *","text":"a"}"#,
                "\"schedule\" \"* * * * *\" can fire 1 minute(s) apart, but periodic events fire at most once every 5 minutes; the most frequent schedule allowed is \"*/5 * * * *\"",
            ),
            (
                r#"{"type":"periodic","schedule":"0 9 * * *","timezone":"Europe/Vienne","text":"a"}"#,
                "unknown timezone \"Europe/Vienne\": use an IANA zone name like \"Europe/Vienna\", \"America/New_York\" or \"UTC\"",
            ),
            (
                r#"{"type":"periodic","schedule":"0 9 * * *","timezone":"europe/vienna","text":"a"}"#,
                "unknown timezone \"europe/vienna\": use an IANA zone name like \"Europe/Vienna\", \"America/New_York\" or \"UTC\"",
            ),
            (
                r#"{"type":"immediate","text":"a","session":"Main"}"#,
                "\"session\": invalid session id \"Main\": expected e.g. cli-main, web-main, email-<hex>, telegram-<chat>, or events",
            ),
            (
                r#"{"type":"immediate","text":"a","status":"fired"}"#,
                "\"status\" must be \"active\" or \"done\", not \"fired\"",
            ),
        ];
        for (json, want) in cases {
            let got = Event::parse(json.as_bytes(), ZONE).unwrap_err().to_string();
            assert_eq!(&got, want, "{}", excerpt(json));
        }
    }

    #[test]
    fn bad_default_timezone_is_blamed_on_config() {
        let err =
            Event::parse(br#"{"type":"periodic","schedule":"0 9 * * *","text":"a"}"#, "Mars/Olympus").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the agent's timezone \"Mars/Olympus\" in config.json is not a known IANA zone; set \"timezone\" in event.json, like \"Europe/Vienna\""
        );
        assert_eq!(err, EventFileError::UnknownDefaultTimezone("Mars/Olympus".into()));
    }

    #[test]
    fn long_bad_values_are_quoted_as_excerpts() {
        let json = serde_json::json!({"type": "x".repeat(1000), "text": "a"}).to_string();
        let got = Event::parse(json.as_bytes(), ZONE).unwrap_err().to_string();
        assert_eq!(
            got,
            format!("unknown type \"{}…\": use \"immediate\", \"one-shot\" or \"periodic\"", "x".repeat(80))
        );
    }

    #[test]
    fn event_type_serde_and_fields() {
        assert_eq!(serde_json::to_string(&EventType::OneShot).unwrap(), "\"one-shot\"");
        for t in [EventType::Immediate, EventType::OneShot, EventType::Periodic] {
            assert_eq!(EventType::from_name(t.as_str()), Some(t));
            assert!(t.fields().iter().all(|f| FIELDS_ALL.contains(f)));
        }
    }
}
