//! Scheduled wake-ups of an agent, as pure decisions (SPEC §5): the event
//! name, the event file `events/{name}/event.json` and its validation, the
//! next fire time of each event type, the downtime policy that turns an event,
//! its timer state and "now" into a decision, and what a firing produces — the
//! job's dedup key, the message the agent receives, a `history.jsonl` line —
//! plus the wake manifest.
//!
//! Architecture invariant: this crate does no I/O. It never reads a file, the
//! clock or a database; callers pass in file bytes, the time now and the timer
//! state, and carry out the decision. The scheduler owns the timers table, the
//! worker owns the agent's files.
//!
//! Typical use by the scheduler:
//! 1. [`EventName::parse`] the directory name and [`Event::parse`] the file
//!    bytes (with the agent's `config.json` timezone); on error write the
//!    error's `Display` text to `error.txt` and skip the event.
//! 2. [`decide`] with the timer state; on [`Decision::Fire`] enqueue a job with
//!    [`dedup_key`] and [`event_message`] in [`Event::session`]; store
//!    [`TimerState::after`] as the new timer state.

mod event;
mod fire;
mod history;
mod job;
mod manifest;
mod name;
mod schedule;
mod time;

pub use chrono_tz::Tz;
pub use event::{EVENT_FILE_BYTES_MAX, EVENT_TEXT_BYTES_MAX, Event, EventFileError, EventType, Status, Trigger};
pub use fire::{Decision, TimerState, decide, next_fire};
pub use history::{HistoryOutcome, HistoryReason, HistoryRecord};
pub use job::{dedup_key, event_message, sha256_hex};
pub use manifest::{MANIFEST_TYPE_INVALID, ManifestEntry, WakeManifest, build_manifest};
pub use name::{EVENT_NAME_BYTES_MAX, EventName, InvalidEventName};
pub use schedule::{PERIODIC_INTERVAL_S_MIN, SCHEDULE_BYTES_MAX, Schedule, ScheduleError};

/// Longest excerpt of a user-supplied value quoted in an error message, in
/// characters, so a huge bad value cannot blow up `error.txt` or a log line.
const ERROR_EXCERPT_CHARS_MAX: usize = 80;

/// The value as quoted in an error message: cut to
/// [`ERROR_EXCERPT_CHARS_MAX`] characters, with `…` marking the cut.
fn excerpt(value: &str) -> String {
    match value.char_indices().nth(ERROR_EXCERPT_CHARS_MAX) {
        Some((cut, _)) => format!("{}…", &value[..cut]),
        None => value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_cuts_long_values_on_a_char_boundary() {
        assert_eq!(excerpt("short"), "short");
        let long = "é".repeat(ERROR_EXCERPT_CHARS_MAX + 5);
        let cut = excerpt(&long);
        assert_eq!(cut, format!("{}…", "é".repeat(ERROR_EXCERPT_CHARS_MAX)));
    }
}
