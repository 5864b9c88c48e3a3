//! When an event fires: the next fire time of each event type, and the
//! downtime policy that turns (event, timer state, now) into a [`Decision`].
//! This module owns those rules; it must not read the clock, the event files
//! or the timers table. The scheduler passes all three in, carries out the
//! decision, and stores [`TimerState::after`].
//!
//! The policy:
//! - A done event never fires ([`Decision::Never`]).
//! - An immediate event fires once, at once; then it is spent until the
//!   caller resets its timer state (it must when event.json changes: the file's
//!   hash is an immediate event's identity, see `dedup_key`).
//! - A one-shot event waits until `at`, fires if it is at most `late_grace`
//!   late (the boundary included), and is [`Decision::Missed`] when later
//!   (the platform records the miss in history and does not fire). Once
//!   `last_fired_at >= at` it never fires again, so rewriting the file with a
//!   later `at` schedules it anew.
//! - A periodic event fires at its ticks. A timer never fires ticks from
//!   before it was first scheduled: a new timer (no state) waits for the next
//!   tick. After downtime it fires once for the whole missed window, at the
//!   most recent missed tick, whatever `late_grace`; then it waits for the next
//!   future tick. It never fires a tick less than
//!   [`PERIODIC_INTERVAL_S_MIN`](crate::PERIODIC_INTERVAL_S_MIN) after the last
//!   one fired (only a fall-back hour can produce such a tick; see `schedule`).

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::event::{Event, Trigger};
use crate::schedule::PERIODIC_INTERVAL_S_MIN;

/// What the scheduler keeps per event (the timers table row).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerState {
    /// The due instant of the last tick consumed, whether it fired or was
    /// recorded missed. For an immediate event, the time it fired.
    #[serde(with = "crate::time::utc_opt")]
    pub last_fired_at: Option<DateTime<Utc>>,
    /// The instant the timer is waiting for, as recorded from the last
    /// decision. For a periodic event that has never fired it is the first
    /// tick that may fire: record it when the timer is created, and recompute
    /// it (reset the state) when event.json changes.
    #[serde(with = "crate::time::utc_opt")]
    pub next_fire: Option<DateTime<Utc>>,
}

/// What the scheduler should do about one event now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Enqueue the event's job now; `due_at` is the scheduled instant being
    /// fired (for an immediate event, `now`).
    Fire { due_at: DateTime<Utc> },
    /// A one-shot that is more than `late_grace` late: record a `missed`
    /// history line and do not fire.
    Missed { due_at: DateTime<Utc> },
    /// Nothing to do before `until`.
    Wait { until: DateTime<Utc> },
    /// The event will not fire again (done, already fired, or a schedule with
    /// no further tick).
    Never,
}

/// The first instant after `after` at which `event` is scheduled to fire, or
/// `None` if it never will. A done event never fires; an immediate event that
/// is not done is due at `after` itself; a one-shot is due at `at` if that is
/// after `after`; a periodic event at its next tick strictly after `after`.
pub fn next_fire(event: &Event, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if event.is_done() {
        return None;
    }
    match event.trigger() {
        Trigger::Immediate => Some(after),
        Trigger::OneShot { at, .. } => (*at > after).then_some(*at),
        Trigger::Periodic(schedule) => schedule.next_after(after),
    }
}

/// The downtime policy (see the module documentation). Pure: the same
/// arguments always give the same decision.
pub fn decide(event: &Event, state: TimerState, now: DateTime<Utc>, late_grace: TimeDelta) -> Decision {
    if event.is_done() {
        return Decision::Never;
    }
    match event.trigger() {
        Trigger::Immediate => match state.last_fired_at {
            Some(_) => Decision::Never,
            None => Decision::Fire { due_at: now },
        },
        Trigger::OneShot { at, .. } => {
            let at = *at;
            if state.last_fired_at.is_some_and(|last| last >= at) {
                Decision::Never
            } else if now < at {
                Decision::Wait { until: at }
            } else if now - at <= late_grace {
                Decision::Fire { due_at: at }
            } else {
                Decision::Missed { due_at: at }
            }
        }
        Trigger::Periodic(schedule) => {
            // The earliest instant a tick may be due at.
            let earliest = match (state.last_fired_at, state.next_fire) {
                (Some(last), _) => last + TimeDelta::seconds(PERIODIC_INTERVAL_S_MIN),
                (None, Some(first)) => first,
                (None, None) => {
                    return schedule.next_after(now).map_or(Decision::Never, |until| Decision::Wait { until });
                }
            };
            if earliest <= now
                && let Some(due_at) = schedule.at_or_before(now).filter(|t| *t >= earliest)
            {
                return Decision::Fire { due_at };
            }
            let until = if earliest > now { schedule.at_or_after(earliest) } else { schedule.next_after(now) };
            until.map_or(Decision::Never, |until| Decision::Wait { until })
        }
    }
}

impl TimerState {
    /// The state to store once `decision` (made by [`decide`] at `now`) has
    /// been carried out: a fired or missed tick is consumed, and `next_fire`
    /// becomes what the timer waits for next (`None`: nothing).
    pub fn after(self, event: &Event, decision: Decision, now: DateTime<Utc>, late_grace: TimeDelta) -> TimerState {
        match decision {
            Decision::Fire { due_at } | Decision::Missed { due_at } => {
                let consumed = TimerState { last_fired_at: Some(due_at), next_fire: None };
                let next_fire = match decide(event, consumed, now, late_grace) {
                    Decision::Wait { until } => Some(until),
                    Decision::Fire { due_at } | Decision::Missed { due_at } => Some(due_at),
                    Decision::Never => None,
                };
                TimerState { next_fire, ..consumed }
            }
            Decision::Wait { until } => TimerState { next_fire: Some(until), ..self },
            Decision::Never => TimerState { next_fire: None, ..self },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: TimeDelta = TimeDelta::hours(1);

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn event(json: &str) -> Event {
        Event::parse(json.as_bytes(), "UTC").unwrap()
    }

    fn periodic(schedule: &str, zone: &str) -> Event {
        event(&format!(r#"{{"type":"periodic","schedule":"{schedule}","timezone":"{zone}","text":"t"}}"#))
    }

    fn state(last: Option<&str>, next: Option<&str>) -> TimerState {
        TimerState { last_fired_at: last.map(utc), next_fire: next.map(utc) }
    }

    /// Drives one event the way the scheduler does: decide, carry out, store
    /// the new state; returns every decision in order.
    fn run(event: &Event, mut st: TimerState, nows: &[&str]) -> Vec<Decision> {
        nows.iter()
            .map(|now| {
                let d = decide(event, st, utc(now), GRACE);
                st = st.after(event, d, utc(now), GRACE);
                d
            })
            .collect()
    }

    #[test]
    fn next_fire_per_type() {
        let after = utc("2026-06-01T10:00:00Z");
        let immediate = event(r#"{"type":"immediate","text":"t"}"#);
        assert_eq!(next_fire(&immediate, after), Some(after));

        let one_shot = event(r#"{"type":"one-shot","at":"2026-06-01T12:00:00+02:00","text":"t"}"#);
        assert_eq!(next_fire(&one_shot, utc("2026-06-01T09:59:59Z")), Some(utc("2026-06-01T10:00:00Z")));
        assert_eq!(next_fire(&one_shot, after), None);

        let daily = periodic("0 9 * * *", "Europe/Vienna");
        assert_eq!(next_fire(&daily, after), Some(utc("2026-06-02T07:00:00Z")));
        assert_eq!(next_fire(&daily, utc("2026-06-02T07:00:00Z")), Some(utc("2026-06-03T07:00:00Z")));

        for done in [
            r#"{"type":"immediate","text":"t","status":"done"}"#,
            r#"{"type":"one-shot","at":"2030-01-01T00:00:00Z","text":"t","status":"done"}"#,
            r#"{"type":"periodic","schedule":"0 9 * * *","text":"t","status":"done"}"#,
        ] {
            assert_eq!(next_fire(&event(done), after), None, "{done}");
        }
    }

    #[test]
    fn next_fire_across_dst() {
        let e = periodic("30 2 * * *", "Europe/Vienna");
        let cases = [
            // Spring forward: 02:30 does not exist on 2026-03-29; it fires at 03:00 CEST.
            ("2026-03-28T12:00:00Z", "2026-03-29T01:00:00Z"),
            ("2026-03-29T01:00:00Z", "2026-03-30T00:30:00Z"),
            // Fall back: 02:30 happens twice on 2026-10-25; it fires at the first.
            ("2026-10-24T12:00:00Z", "2026-10-25T00:30:00Z"),
            ("2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"),
        ];
        for (after, want) in cases {
            assert_eq!(next_fire(&e, utc(after)), Some(utc(want)), "after {after}");
        }
    }

    #[test]
    fn one_shot_policy() {
        let e = event(r#"{"type":"one-shot","at":"2026-12-01T09:00:00+01:00","text":"t"}"#);
        let at = utc("2026-12-01T08:00:00Z");
        let cases = [
            (state(None, None), "2026-12-01T07:00:00Z", Decision::Wait { until: at }),
            (state(None, None), "2026-12-01T08:00:00Z", Decision::Fire { due_at: at }),
            (state(None, None), "2026-12-01T08:30:00Z", Decision::Fire { due_at: at }),
            // Exactly late_grace late still fires; a second more is missed.
            (state(None, None), "2026-12-01T09:00:00Z", Decision::Fire { due_at: at }),
            (state(None, None), "2026-12-01T09:00:01Z", Decision::Missed { due_at: at }),
            (state(None, None), "2026-12-05T00:00:00Z", Decision::Missed { due_at: at }),
            // Already fired (or recorded missed).
            (state(Some("2026-12-01T08:00:00Z"), None), "2026-12-01T08:00:05Z", Decision::Never),
            // Fired for an earlier `at`; the file now names a later one.
            (state(Some("2026-11-01T08:00:00Z"), None), "2026-12-01T08:10:00Z", Decision::Fire { due_at: at }),
        ];
        for (st, now, want) in cases {
            assert_eq!(decide(&e, st, utc(now), GRACE), want, "{st:?} at {now}");
        }
    }

    #[test]
    fn one_shot_fires_once_and_a_miss_is_final() {
        let e = event(r#"{"type":"one-shot","at":"2026-12-01T08:00:00Z","text":"t"}"#);
        let at = utc("2026-12-01T08:00:00Z");
        let got =
            run(&e, TimerState::default(), &["2026-12-01T07:00:00Z", "2026-12-01T08:00:01Z", "2026-12-01T08:00:02Z"]);
        assert_eq!(got, [Decision::Wait { until: at }, Decision::Fire { due_at: at }, Decision::Never]);
        let got = run(&e, TimerState::default(), &["2026-12-02T08:00:00Z", "2026-12-02T08:01:00Z"]);
        assert_eq!(got, [Decision::Missed { due_at: at }, Decision::Never]);
    }

    #[test]
    fn immediate_fires_once() {
        let e = event(r#"{"type":"immediate","text":"t"}"#);
        let got = run(&e, TimerState::default(), &["2026-06-01T10:00:00Z", "2026-06-01T10:00:01Z"]);
        assert_eq!(got, [Decision::Fire { due_at: utc("2026-06-01T10:00:00Z") }, Decision::Never]);
    }

    #[test]
    fn done_never_fires() {
        for json in [
            r#"{"type":"immediate","text":"t","status":"done"}"#,
            r#"{"type":"one-shot","at":"2026-06-01T10:00:00Z","text":"t","status":"done"}"#,
            r#"{"type":"periodic","schedule":"0 * * * *","text":"t","status":"done"}"#,
        ] {
            for st in [
                state(None, None),
                state(None, Some("2026-06-01T10:00:00Z")),
                state(Some("2026-06-01T09:00:00Z"), None),
            ] {
                assert_eq!(decide(&event(json), st, utc("2026-06-01T10:00:00Z"), GRACE), Decision::Never, "{json}");
            }
        }
    }

    #[test]
    fn new_periodic_timer_waits_for_the_next_tick() {
        let e = periodic("0 * * * *", "UTC");
        // Created at 10:30: the 10:00 tick is not fired.
        assert_eq!(
            decide(&e, TimerState::default(), utc("2026-06-01T10:30:00Z"), GRACE),
            Decision::Wait { until: utc("2026-06-01T11:00:00Z") }
        );
        // Created exactly on a tick: that tick is not fired either.
        assert_eq!(
            decide(&e, TimerState::default(), utc("2026-06-01T10:00:00Z"), GRACE),
            Decision::Wait { until: utc("2026-06-01T11:00:00Z") }
        );
    }

    #[test]
    fn periodic_fires_each_tick_when_running() {
        let e = periodic("0 * * * *", "UTC");
        let got = run(
            &e,
            TimerState::default(),
            &["2026-06-01T10:30:00Z", "2026-06-01T11:00:00Z", "2026-06-01T11:00:01Z", "2026-06-01T12:00:02Z"],
        );
        assert_eq!(
            got,
            [
                Decision::Wait { until: utc("2026-06-01T11:00:00Z") },
                Decision::Fire { due_at: utc("2026-06-01T11:00:00Z") },
                Decision::Wait { until: utc("2026-06-01T12:00:00Z") },
                Decision::Fire { due_at: utc("2026-06-01T12:00:00Z") },
            ]
        );
    }

    #[test]
    fn periodic_after_downtime_fires_once_for_the_missed_window() {
        let e = periodic("0 * * * *", "UTC");
        // Last fired 10:00; down until 13:30 (11:00, 12:00 and 13:00 missed).
        let st = state(Some("2026-06-01T10:00:00Z"), Some("2026-06-01T11:00:00Z"));
        let got = run(&e, st, &["2026-06-01T13:30:00Z", "2026-06-01T13:30:01Z", "2026-06-01T14:00:00Z"]);
        assert_eq!(
            got,
            [
                Decision::Fire { due_at: utc("2026-06-01T13:00:00Z") },
                Decision::Wait { until: utc("2026-06-01T14:00:00Z") },
                Decision::Fire { due_at: utc("2026-06-01T14:00:00Z") },
            ]
        );
        // A long outage is no different, and late_grace does not apply.
        let got = decide(&e, st, utc("2026-06-09T08:59:00Z"), GRACE);
        assert_eq!(got, Decision::Fire { due_at: utc("2026-06-09T08:00:00Z") });
    }

    #[test]
    fn periodic_never_fired_uses_the_recorded_first_tick() {
        let e = periodic("0 * * * *", "UTC");
        // Scheduled for 11:00, down from 10:50 to 13:20.
        let st = state(None, Some("2026-06-01T11:00:00Z"));
        assert_eq!(
            decide(&e, st, utc("2026-06-01T13:20:00Z"), GRACE),
            Decision::Fire { due_at: utc("2026-06-01T13:00:00Z") }
        );
        assert_eq!(
            decide(&e, st, utc("2026-06-01T10:59:59Z"), GRACE),
            Decision::Wait { until: utc("2026-06-01T11:00:00Z") }
        );
    }

    #[test]
    fn periodic_dst_fall_back_fires_once() {
        // Europe/Vienna 2026-10-25: 02:30 happens at 00:30Z and again at 01:30Z.
        let e = periodic("30 2 * * *", "Europe/Vienna");
        let got = run(
            &e,
            state(None, Some("2026-10-25T00:30:00Z")),
            &["2026-10-25T00:30:00Z", "2026-10-25T01:30:00Z", "2026-10-25T01:35:00Z", "2026-10-26T01:30:00Z"],
        );
        assert_eq!(
            got,
            [
                Decision::Fire { due_at: utc("2026-10-25T00:30:00Z") },
                Decision::Wait { until: utc("2026-10-26T01:30:00Z") },
                Decision::Wait { until: utc("2026-10-26T01:30:00Z") },
                Decision::Fire { due_at: utc("2026-10-26T01:30:00Z") },
            ]
        );
    }

    #[test]
    fn periodic_dst_spring_forward_fires_once_after_the_gap() {
        // Europe/Vienna 2026-03-29: 02:30 does not exist; the tick is 03:00 CEST = 01:00Z.
        let e = periodic("30 2 * * *", "Europe/Vienna");
        let got = run(
            &e,
            TimerState::default(),
            &["2026-03-28T12:00:00Z", "2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z", "2026-03-30T00:30:00Z"],
        );
        assert_eq!(
            got,
            [
                Decision::Wait { until: utc("2026-03-29T01:00:00Z") },
                Decision::Fire { due_at: utc("2026-03-29T01:00:00Z") },
                Decision::Wait { until: utc("2026-03-30T00:30:00Z") },
                Decision::Fire { due_at: utc("2026-03-30T00:30:00Z") },
            ]
        );
    }

    #[test]
    fn five_minute_floor_holds_across_a_repeated_hour() {
        // "0,58 2 * * *" passes the wall-clock check (58 minutes apart), but on
        // 2026-10-25 in Vienna 02:58 CEST (00:58Z) is followed by 02:00 CET
        // (01:00Z) two minutes later. That tick is skipped, not fired.
        let e = periodic("0,58 2 * * *", "Europe/Vienna");
        let st = state(Some("2026-10-25T00:00:00Z"), None);
        let got = run(&e, st, &["2026-10-25T00:58:00Z", "2026-10-25T01:00:00Z", "2026-10-25T01:58:00Z"]);
        assert_eq!(
            got,
            [
                Decision::Fire { due_at: utc("2026-10-25T00:58:00Z") },
                Decision::Wait { until: utc("2026-10-25T01:58:00Z") },
                Decision::Fire { due_at: utc("2026-10-25T01:58:00Z") },
            ]
        );
    }

    #[test]
    fn timer_state_serialises_as_rfc3339() {
        let st = state(Some("2026-06-01T10:00:00Z"), None);
        let json = serde_json::to_string(&st).unwrap();
        assert_eq!(json, r#"{"last_fired_at":"2026-06-01T10:00:00Z","next_fire":null}"#);
        assert_eq!(serde_json::from_str::<TimerState>(&json).unwrap(), st);
    }
}
