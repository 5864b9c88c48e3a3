//! Periodic schedules: a 5-field cron expression (minute hour day-of-month
//! month day-of-week) evaluated in an IANA time zone with croner and
//! chrono-tz, and the rule that a periodic event fires at most once every
//! 5 minutes. This module owns tick arithmetic; it must not read the clock or
//! decide whether a tick fires (that is `fire`).
//!
//! Daylight saving time follows croner's rules, evaluated in the schedule's
//! zone. A *fixed-time* schedule (one minute and one hour, e.g. `30 2 * * *`)
//! whose wall time falls in a spring-forward gap fires once, at the first
//! instant after the gap (03:00 local in Europe/Vienna); in a fall-back
//! overlap it fires once, at the first of the two instants. Other schedules
//! skip wall times inside a gap and fire at both instants of a repeated time.
//!
//! The 5-minute rule is a rejection, not a clamp: a schedule whose wall-clock
//! ticks can lie less than [`PERIODIC_INTERVAL_S_MIN`] apart (`* * * * *`,
//! `*/2 * * * *`, `0,3 * * * *`) is an error the agent can read and fix,
//! rather than a schedule that silently fires less often than written. The
//! check assumes any two consecutive days can both match, so it may reject an
//! exotic schedule such as `59,0 23,0 1 * *` that would in fact comply. A
//! repeated fall-back hour can still bring two ticks closer in real time
//! (`0,58 2 * * *` in Europe/Vienna: 02:58 CEST, then 02:00 CET two minutes
//! later), so `fire::decide` also never fires a tick less than 5 minutes after
//! the last one.

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

use crate::excerpt;

/// Shortest allowed time between two firings of a periodic event, in seconds.
pub const PERIODIC_INTERVAL_S_MIN: i64 = 5 * 60;

/// Longest schedule string accepted, in bytes.
pub const SCHEDULE_BYTES_MAX: usize = 128;

/// Fields a schedule must have: minute, hour, day of month, month, day of week.
const SCHEDULE_FIELDS: usize = 5;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "\"schedule\" {value:?} is not a 5-field cron expression (minute hour day-of-month month day-of-week, like \"0 9 * * 1-5\"): {reason}"
    )]
    Invalid { value: String, reason: String },
    #[error(
        "\"schedule\" {value:?} can fire {gap_min} minute(s) apart, but periodic events fire at most once every 5 minutes; the most frequent schedule allowed is \"*/5 * * * *\""
    )]
    TooFrequent { value: String, gap_min: u32 },
    #[error("\"schedule\" {value:?} never fires: no date matches it")]
    NeverFires { value: String },
}

/// A validated periodic schedule in its time zone.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    expr: String,
    timezone: Tz,
    /// Boxed: a parsed pattern is a few hundred bytes.
    cron: Box<Cron>,
}

impl Schedule {
    /// Parses a 5-field cron expression. Runs of whitespace between fields
    /// are normalised to one space (that is the form [`Schedule::expr`]
    /// returns and the agent's message shows). Croner's extensions are
    /// accepted (`MON-FRI`, `JAN`, `L`, `W`, `#`, `?`); `@daily`-style
    /// nicknames and seconds or year fields are not.
    pub fn parse(expr: &str, timezone: Tz) -> Result<Self, ScheduleError> {
        let value = excerpt(expr);
        let invalid = |reason: String| ScheduleError::Invalid { value: value.clone(), reason };
        if expr.len() > SCHEDULE_BYTES_MAX {
            return Err(invalid(format!("it is longer than {SCHEDULE_BYTES_MAX} bytes")));
        }
        let fields: Vec<&str> = expr.split_whitespace().collect();
        if fields.len() != SCHEDULE_FIELDS {
            return Err(invalid(format!("it has {} field(s)", fields.len())));
        }
        let expr = fields.join(" ");
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(&expr)
            .map_err(|e| invalid(e.to_string()))?;
        let gap_min = shortest_wall_gap_min(&cron);
        if i64::from(gap_min) * 60 < PERIODIC_INTERVAL_S_MIN {
            return Err(ScheduleError::TooFrequent { value, gap_min });
        }
        // Any matching date recurs within 28 years, so one search from a
        // fixed instant tells whether the schedule ever fires.
        let reference = DateTime::<Utc>::from_timestamp(946_684_800, 0).expect("2000-01-01 is representable");
        if cron.find_next_occurrence(&reference, false).is_err() {
            return Err(ScheduleError::NeverFires { value });
        }
        Ok(Self { expr, timezone, cron: Box::new(cron) })
    }

    /// The expression, fields separated by one space.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    pub fn timezone(&self) -> Tz {
        self.timezone
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.search(floor_s(t), false, true)
    }

    /// The first tick at or after `t`.
    pub fn at_or_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let floor = floor_s(t);
        // A fraction of a second past a tick is already past it.
        self.search(floor, floor == t, true)
    }

    /// The last tick at or before `t`.
    pub fn at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.search(floor_s(t), true, false)
    }

    /// Croner searches on whole seconds in the schedule's zone; a search
    /// that finds nothing (the year limit) is "no tick".
    fn search(&self, t: DateTime<Utc>, inclusive: bool, forward: bool) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.timezone);
        let found = if forward {
            self.cron.find_next_occurrence(&local, inclusive)
        } else {
            self.cron.find_previous_occurrence(&local, inclusive)
        };
        found.ok().map(|t| t.with_timezone(&Utc))
    }
}

/// `t` without its fraction of a second: cron ticks are whole seconds.
fn floor_s(t: DateTime<Utc>) -> DateTime<Utc> {
    t - TimeDelta::nanoseconds(i64::from(t.nanosecond()))
}

/// A lower bound on the wall-clock minutes between two consecutive ticks:
/// the closest two matching minutes within an hour, and across an hour
/// boundary when two adjacent hours (23 and 0 included) both match.
/// Days are not looked at, so this errs towards a smaller gap.
fn shortest_wall_gap_min(cron: &Cron) -> u32 {
    const DAY_MIN: u32 = 24 * 60;
    let minutes: Vec<u32> = cron.pattern.minutes.values().into_iter().map(u32::from).collect();
    let hours: Vec<u32> = cron.pattern.hours.values().into_iter().map(u32::from).collect();
    let mut gap = minutes.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(DAY_MIN);
    let adjacent_hours =
        hours.windows(2).any(|w| w[1] == w[0] + 1) || (hours.first() == Some(&0) && hours.last() == Some(&23));
    if let (true, Some(first), Some(last)) = (adjacent_hours, minutes.first(), minutes.last()) {
        gap = gap.min(60 - last + first);
    }
    gap
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn vienna(expr: &str) -> Schedule {
        Schedule::parse(expr, chrono_tz::Europe::Vienna).unwrap()
    }

    #[test]
    fn accepts_five_field_schedules_and_normalises_spaces() {
        for (expr, normal) in [
            ("0 9 * * 1-5", "0 9 * * 1-5"),
            ("*/5 * * * *", "*/5 * * * *"),
            ("  0\t9  *  *  MON-FRI ", "0 9 * * MON-FRI"),
            ("0,5,10 * * * *", "0,5,10 * * * *"),
            ("55,0 * * * *", "55,0 * * * *"),
            ("0 0 L * *", "0 0 L * *"),
            ("0 0 29 2 *", "0 0 29 2 *"),
            ("59,0 23,1 * * *", "59,0 23,1 * * *"),
        ] {
            assert_eq!(vienna(expr).expr(), normal, "{expr:?}");
        }
    }

    #[test]
    fn rejects_bad_schedules_with_reasons() {
        let long = "1,".repeat(70) + "0 * * * *";
        let cases: &[(&str, &str)] = &[
            (
                "0 9 * *",
                "\"schedule\" \"0 9 * *\" is not a 5-field cron expression (minute hour day-of-month month day-of-week, like \"0 9 * * 1-5\"): it has 4 field(s)",
            ),
            (
                "0 0 9 * * *",
                "\"schedule\" \"0 0 9 * * *\" is not a 5-field cron expression (minute hour day-of-month month day-of-week, like \"0 9 * * 1-5\"): it has 6 field(s)",
            ),
            (
                "@daily",
                "\"schedule\" \"@daily\" is not a 5-field cron expression (minute hour day-of-month month day-of-week, like \"0 9 * * 1-5\"): it has 1 field(s)",
            ),
            (
                "",
                "\"schedule\" \"\" is not a 5-field cron expression (minute hour day-of-month month day-of-week, like \"0 9 * * 1-5\"): it has 0 field(s)",
            ),
            (&long, "it is longer than 128 bytes"),
            (
                "* * * * *",
                "\"schedule\" \"* * * * *\" can fire 1 minute(s) apart, but periodic events fire at most once every 5 minutes; the most frequent schedule allowed is \"*/5 * * * *\"",
            ),
            ("*/4 * * * *", "can fire 4 minute(s) apart"),
            ("0,3 9 * * *", "can fire 3 minute(s) apart"),
            // 09:58 then 10:01: the gap crosses the hour.
            ("1,58 9,10 * * *", "can fire 3 minute(s) apart"),
            // 23:58 then 00:01 the next day.
            ("1,58 0,23 * * *", "can fire 3 minute(s) apart"),
            ("0 0 30 2 *", "\"schedule\" \"0 0 30 2 *\" never fires: no date matches it"),
        ];
        for (expr, want) in cases {
            let got = Schedule::parse(expr, chrono_tz::UTC).unwrap_err().to_string();
            assert!(got.contains(want), "{expr:?}: {got}");
        }
        // Out-of-range values carry croner's reason.
        let got = Schedule::parse("61 * * * *", chrono_tz::UTC).unwrap_err();
        assert!(matches!(&got, ScheduleError::Invalid { value, .. } if value == "61 * * * *"), "{got}");
    }

    #[test]
    fn minute_wrap_counts_only_when_the_next_hour_matches() {
        // 09:00 and 09:58 only; 10 does not match, so no 2-minute wrap.
        assert_eq!(vienna("0,58 9 * * *").expr(), "0,58 9 * * *");
    }

    #[test]
    fn next_after_is_strict_and_at_or_after_inclusive() {
        let s = Schedule::parse("0 9 * * 1-5", chrono_tz::UTC).unwrap();
        // 2026-06-01 is a Monday.
        assert_eq!(s.next_after(utc("2026-06-01T09:00:00Z")), Some(utc("2026-06-02T09:00:00Z")));
        assert_eq!(s.at_or_after(utc("2026-06-01T09:00:00Z")), Some(utc("2026-06-01T09:00:00Z")));
        assert_eq!(s.at_or_after(utc("2026-06-01T09:00:00.5Z")), Some(utc("2026-06-02T09:00:00Z")));
        assert_eq!(s.at_or_before(utc("2026-06-01T09:00:00.5Z")), Some(utc("2026-06-01T09:00:00Z")));
        // Friday 09:00 is followed by Monday 09:00.
        assert_eq!(s.next_after(utc("2026-06-05T09:00:00Z")), Some(utc("2026-06-08T09:00:00Z")));
    }

    #[test]
    fn ticks_follow_the_zone() {
        // 09:00 in Vienna is 08:00Z in winter (CET) and 07:00Z in summer (CEST).
        let s = vienna("0 9 * * *");
        assert_eq!(s.next_after(utc("2026-01-15T12:00:00Z")), Some(utc("2026-01-16T08:00:00Z")));
        assert_eq!(s.next_after(utc("2026-07-15T12:00:00Z")), Some(utc("2026-07-16T07:00:00Z")));
    }

    #[test]
    fn dst_spring_forward_fixed_time_fires_once_after_the_gap() {
        // Europe/Vienna 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00Z),
        // so 02:30 does not exist that day.
        let s = vienna("30 2 * * *");
        let ticks: Vec<_> =
            std::iter::successors(s.next_after(utc("2026-03-27T12:00:00Z")), |t| s.next_after(*t)).take(4).collect();
        assert_eq!(
            ticks,
            [
                utc("2026-03-28T01:30:00Z"), // 02:30 CET
                utc("2026-03-29T01:00:00Z"), // 03:00 CEST, the first instant after the gap
                utc("2026-03-30T00:30:00Z"), // 02:30 CEST
                utc("2026-03-31T00:30:00Z"),
            ]
        );
    }

    #[test]
    fn dst_spring_forward_interval_schedule_skips_the_gap() {
        let s = vienna("*/30 * * * *");
        let ticks: Vec<_> =
            std::iter::successors(s.next_after(utc("2026-03-29T00:00:00Z")), |t| s.next_after(*t)).take(3).collect();
        // 01:30 CET, then 03:00 CEST: 02:00 and 02:30 never happen.
        assert_eq!(ticks, [utc("2026-03-29T00:30:00Z"), utc("2026-03-29T01:00:00Z"), utc("2026-03-29T01:30:00Z")]);
    }

    #[test]
    fn dst_fall_back_fixed_time_fires_once() {
        // Europe/Vienna 2026-10-25: 03:00 CEST goes back to 02:00 CET (01:00Z),
        // so 02:30 happens at 00:30Z (CEST) and again at 01:30Z (CET).
        let s = vienna("30 2 * * *");
        let ticks: Vec<_> =
            std::iter::successors(s.next_after(utc("2026-10-24T12:00:00Z")), |t| s.next_after(*t)).take(2).collect();
        assert_eq!(ticks, [utc("2026-10-25T00:30:00Z"), utc("2026-10-26T01:30:00Z")]);
        // Searching from inside the repeated hour does not find the second 02:30.
        assert_eq!(s.next_after(utc("2026-10-25T00:45:00Z")), Some(utc("2026-10-26T01:30:00Z")));
        assert_eq!(s.at_or_before(utc("2026-10-25T01:45:00Z")), Some(utc("2026-10-25T00:30:00Z")));
    }

    #[test]
    fn never_fires_check_is_quick() {
        let started = std::time::Instant::now();
        assert!(matches!(Schedule::parse("0 0 31 4 *", chrono_tz::UTC), Err(ScheduleError::NeverFires { .. })));
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
    }
}
