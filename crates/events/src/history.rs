//! One line of `events/{name}/history.jsonl`: what became of one due
//! instant of an event (fired, missed or dropped). This module owns the
//! record and its JSON line; it must not write the file (the worker appends
//! it under the agent's lease).
//!
//! ```json
//! {"outcome":"fired","due_at":"2026-12-01T08:00:00Z","fired_at":"2026-12-01T08:00:02Z","recorded_at":"2026-12-01T08:00:02Z","job":"01J…"}
//! {"outcome":"missed","due_at":"2026-12-01T08:00:00Z","recorded_at":"2026-12-01T10:00:00Z","reason":"late"}
//! {"outcome":"dropped","due_at":"2026-12-01T08:00:00Z","recorded_at":"2026-12-01T08:00:01Z","job":"01J…","reason":"file_changed"}
//! ```

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryOutcome {
    /// The event's turn ran.
    Fired,
    /// A one-shot was more than `scheduler.late_grace` late and did not fire.
    Missed,
    /// The worker claimed the job but did not run it.
    Dropped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryReason {
    /// Missed: later than `scheduler.late_grace`.
    Late,
    /// Dropped: event.json was gone when the job was claimed.
    FileGone,
    /// Dropped: event.json had changed since the job was enqueued.
    FileChanged,
    /// Dropped: event.json had become malformed.
    FileInvalid,
    /// Dropped: the event was already done.
    Done,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    pub outcome: HistoryOutcome,
    /// The scheduled instant this record is about.
    #[serde(with = "crate::time::utc")]
    pub due_at: DateTime<Utc>,
    /// When the turn started; only for `fired`.
    #[serde(default, with = "crate::time::utc_opt", skip_serializing_if = "Option::is_none")]
    pub fired_at: Option<DateTime<Utc>>,
    /// When the platform wrote this record.
    #[serde(with = "crate::time::utc")]
    pub recorded_at: DateTime<Utc>,
    /// The job id, when there was a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<HistoryReason>,
}

impl HistoryRecord {
    pub fn fired(due_at: DateTime<Utc>, fired_at: DateTime<Utc>, job: impl Into<String>) -> Self {
        Self {
            outcome: HistoryOutcome::Fired,
            due_at,
            fired_at: Some(fired_at),
            recorded_at: fired_at,
            job: Some(job.into()),
            reason: None,
        }
    }

    pub fn missed(due_at: DateTime<Utc>, recorded_at: DateTime<Utc>, job: Option<String>) -> Self {
        Self {
            outcome: HistoryOutcome::Missed,
            due_at,
            fired_at: None,
            recorded_at,
            job,
            reason: Some(HistoryReason::Late),
        }
    }

    pub fn dropped(
        due_at: DateTime<Utc>,
        recorded_at: DateTime<Utc>,
        job: impl Into<String>,
        reason: HistoryReason,
    ) -> Self {
        Self {
            outcome: HistoryOutcome::Dropped,
            due_at,
            fired_at: None,
            recorded_at,
            job: Some(job.into()),
            reason: Some(reason),
        }
    }

    /// The record as one line of `history.jsonl`, newline included.
    pub fn to_json_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a history record serialises");
        line.push('\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn json_lines() {
        let due = utc("2026-12-01T08:00:00Z");
        let cases = [
            (
                HistoryRecord::fired(due, utc("2026-12-01T08:00:02.5Z"), "01JOB"),
                r#"{"outcome":"fired","due_at":"2026-12-01T08:00:00Z","fired_at":"2026-12-01T08:00:02.500Z","recorded_at":"2026-12-01T08:00:02.500Z","job":"01JOB"}"#,
            ),
            (
                HistoryRecord::missed(due, utc("2026-12-01T10:00:00Z"), None),
                r#"{"outcome":"missed","due_at":"2026-12-01T08:00:00Z","recorded_at":"2026-12-01T10:00:00Z","reason":"late"}"#,
            ),
            (
                HistoryRecord::dropped(due, utc("2026-12-01T08:00:01Z"), "01JOB", HistoryReason::FileChanged),
                r#"{"outcome":"dropped","due_at":"2026-12-01T08:00:00Z","recorded_at":"2026-12-01T08:00:01Z","job":"01JOB","reason":"file_changed"}"#,
            ),
        ];
        for (record, want) in cases {
            let line = record.to_json_line();
            assert_eq!(line, format!("{want}\n"));
            assert_eq!(line.matches('\n').count(), 1);
            assert_eq!(serde_json::from_str::<HistoryRecord>(&line).unwrap(), record);
        }
    }
}
