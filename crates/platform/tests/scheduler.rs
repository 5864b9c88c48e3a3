//! The scheduler on a real SQLite file and real agent folders: syncing event
//! files into the timers table (with `error.txt` for a malformed file, which
//! is never deleted), firing a due one-shot exactly once with two scheduler
//! loops on one database, the worker side of an event job (drop on change;
//! history, done marking and the `[EVENT:…]` message), late one-shots
//! (missed beyond `scheduler.late_grace`, fired within), a periodic event's
//! missed window firing once, and the wake manifest over HTTP.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tinyfat_core::EmailAddress;
use tinyfat_platform::Platform;
use tinyfat_platform::clock::ManualClock;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::provision::CreateAgent;
use tinyfat_platform::scheduler::{self, EventJob};
use tinyfat_platform::state::AppState;
use tinyfat_storage::validate_path;
use tinyfat_store::{Agent, Job};

fn settings(dir: &Path) -> Settings {
    let env = [("TINYFAT_SANDBOX_MODE", "none")].into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
    Settings::load(&Sources { data_dir: Some(dir.to_owned()), env, ..Sources::default() }).unwrap()
}

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_millis()
}

struct Env {
    app: AppState,
    agent: Agent,
    clock: Option<ManualClock>,
    dir: tempfile::TempDir,
}

/// A platform on a fresh data folder with one agent; a manual clock at
/// `now` if given, else the system clock.
async fn env(now: Option<&str>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut platform = Platform::open(settings(dir.path())).await.unwrap();
    let clock = now.map(|now| ManualClock::new(ms(now)));
    if let Some(clock) = &clock {
        platform.clock = Arc::new(clock.clone());
    }
    let owner = EmailAddress::parse("owner@example.com").unwrap();
    let agent = platform.create_agent(CreateAgent { owner, name: Some("sched".into()), model: None }).await.unwrap();
    Env { app: AppState::new(Arc::new(platform)), agent, clock, dir }
}

impl Env {
    fn platform(&self) -> &Platform {
        &self.app.platform
    }

    async fn write(&self, rel: &str, text: &str) {
        let ws = self.platform().storage.checkout(&self.agent.id).await.unwrap();
        ws.dir.write_atomic(&validate_path(rel).unwrap(), text.as_bytes()).unwrap();
    }

    async fn read(&self, rel: &str) -> Option<String> {
        let ws = self.platform().storage.checkout(&self.agent.id).await.unwrap();
        ws.dir.read_string_opt(&validate_path(rel).unwrap(), 1 << 20).unwrap()
    }

    async fn history(&self, name: &str) -> Vec<Value> {
        let text = self.read(&format!("events/{name}/history.jsonl")).await.unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    async fn sync(&self) {
        scheduler::sync_timers(&self.app, &self.agent).await;
    }

    async fn event_jobs(&self) -> Vec<Job> {
        let jobs = self.platform().store.jobs_for(&self.agent.id, 100).await.unwrap();
        jobs.into_iter().filter(|j| j.kind == scheduler::JOB_KIND_EVENT).collect()
    }

    async fn fire(&self) -> scheduler::Round {
        scheduler::fire_due(&self.app, self.platform().now_ms()).await.unwrap()
    }
}

#[tokio::test]
async fn sync_writes_timers_and_error_txt_and_never_deletes() {
    let e = env(Some("2026-06-01T10:30:00Z")).await;
    e.write("events/dentist/event.json", r#"{"type":"one-shot","at":"2026-12-01T09:00:00+01:00","text":"dentist"}"#)
        .await;
    e.write("events/standup/event.json", r#"{"type":"periodic","schedule":"0 9 * * *","text":"standup"}"#).await;
    let broken = r#"{"type":"weekly","text":"t"}"#;
    e.write("events/broken/event.json", broken).await;
    e.sync().await;

    let rows = e.platform().store.timers_for(&e.agent.id).await.unwrap();
    let by_name = |n: &str| rows.iter().find(|r| r.name == n).unwrap().clone();
    assert_eq!(rows.len(), 3);
    assert_eq!(by_name("dentist").next_fire_ms, Some(ms("2026-12-01T08:00:00Z")));
    assert_eq!(by_name("standup").next_fire_ms, Some(ms("2026-06-02T09:00:00Z")));
    let bad = by_name("broken");
    assert_eq!((bad.event_type.as_str(), bad.next_fire_ms), ("invalid", None));
    let want_error = "unknown type \"weekly\": use \"immediate\", \"one-shot\" or \"periodic\"";
    assert_eq!(bad.error.as_deref(), Some(want_error));
    assert_eq!(e.read("events/broken/error.txt").await.unwrap(), format!("{want_error}\n"));
    assert_eq!(e.read("events/broken/event.json").await.unwrap(), broken, "the malformed file is kept");

    // A second sync leaves error.txt alone; removing a folder drops its timer.
    let error_txt = e.dir.path().join(format!("storage/agents/{}/events/broken/error.txt", e.agent.id));
    let before = std::fs::metadata(&error_txt).unwrap().modified().unwrap();
    std::fs::remove_dir_all(e.dir.path().join(format!("storage/agents/{}/events/dentist", e.agent.id))).unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    e.sync().await;
    assert_eq!(
        std::fs::metadata(&error_txt).unwrap().modified().unwrap(),
        before,
        "unchanged error.txt is not rewritten"
    );
    let names: Vec<String> =
        e.platform().store.timers_for(&e.agent.id).await.unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["broken", "standup"]);
    assert!(e.read("events/broken/event.json").await.is_some());

    // The wake manifest.
    let manifest = serde_json::to_value(e.platform().wake_manifest(&e.agent).await.unwrap()).unwrap();
    assert_eq!(
        manifest,
        json!({
            "next_wake": "2026-06-02T09:00:00Z",
            "events": [
                {"name": "broken", "type": "invalid", "next_fire": null, "error": want_error},
                {"name": "standup", "type": "periodic", "next_fire": "2026-06-02T09:00:00Z"},
            ]
        })
    );
}

#[tokio::test]
async fn two_schedulers_fire_a_due_one_shot_exactly_once() {
    let e = env(None).await;
    // A second platform (its own pool and enqueue writer) on the same data.
    let other = AppState::new(Arc::new(Platform::open(settings(e.dir.path())).await.unwrap()));
    let at = (chrono::Utc::now() - chrono::TimeDelta::seconds(5)).to_rfc3339();
    e.write("events/ping/event.json", &json!({"type": "one-shot", "at": at, "text": "ping"}).to_string()).await;
    e.write("events/now/event.json", r#"{"type":"immediate","text":"now"}"#).await;
    e.sync().await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loops: Vec<_> = [e.app.clone(), other.clone(), e.app.clone(), other.clone()]
        .into_iter()
        .map(|app| tokio::spawn(scheduler::run(app, stop_rx.clone())))
        .collect();
    for _ in 0..100 {
        if e.event_jobs().await.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Make the loops look again, as after a restart.
    for app in [&e.app, &other] {
        e.platform().store.replace_timers(&e.agent.id, &[]).await.unwrap();
        scheduler::sync_timers(app, &e.agent).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop_tx.send(true).unwrap();
    for l in loops {
        l.await.unwrap();
    }
    let jobs = e.event_jobs().await;
    let mut names: Vec<String> =
        jobs.iter().map(|j| serde_json::from_str::<EventJob>(&j.payload).unwrap().name).collect();
    names.sort();
    assert_eq!(names, ["now", "ping"], "each event fired exactly once: {jobs:#?}");
}

#[tokio::test]
async fn worker_drops_a_changed_event_and_runs_a_valid_one() {
    let e = env(Some("2026-12-01T08:00:10Z")).await;
    let file = r#"{"type":"one-shot","at":"2026-12-01T09:00:00+01:00","text":"dentist at 10","session":"telegram-42"}"#;
    e.write("events/dentist/event.json", file).await;
    e.write("events/gone/event.json", r#"{"type":"immediate","text":"x"}"#).await;
    e.sync().await;
    assert_eq!(e.fire().await.enqueued, 2);
    assert_eq!(e.fire().await.enqueued, 0, "nothing fires twice");

    // Changed after it was enqueued: dropped, with a history line.
    let mut jobs = e.event_jobs().await;
    jobs.sort_by_key(|j| j.payload.contains("dentist"));
    let (gone_job, dentist_job) = (jobs[0].clone(), jobs[1].clone());
    e.write("events/gone/event.json", r#"{"type":"immediate","text":"changed"}"#).await;
    assert!(scheduler::prepare_event_job(&e.app, &e.agent, &gone_job).await.unwrap().is_none());
    let history = e.history("gone").await;
    assert_eq!(
        (history[0]["outcome"].as_str(), history[0]["reason"].as_str()),
        (Some("dropped"), Some("file_changed"))
    );

    // A valid one: the message, a fired history line, and status done.
    let job = dentist_job.clone();
    assert_eq!(job.session.as_str(), "telegram-42");
    let message = scheduler::prepare_event_job(&e.app, &e.agent, &job).await.unwrap().expect("runs");
    assert_eq!(message.message.text, "[EVENT:dentist:one-shot:2026-12-01T09:00:00+01:00] dentist at 10");
    let conversation = message.conversation.expect("replies in the telegram chat");
    assert_eq!((conversation.channel.as_str(), conversation.to.as_deref()), ("telegram", Some("42")));
    let history = e.history("dentist").await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["outcome"], "fired");
    assert_eq!(history[0]["due_at"], "2026-12-01T08:00:00Z");
    assert_eq!(history[0]["job"].as_str(), Some(job.id.as_str()));
    let done: Value = serde_json::from_str(&e.read("events/dentist/event.json").await.unwrap()).unwrap();
    assert_eq!(
        done,
        json!({"type":"one-shot","at":"2026-12-01T09:00:00+01:00","text":"dentist at 10","session":"telegram-42","status":"done"})
    );

    // A retry of the same job (the worker crashed mid-turn) still runs, and
    // appends no second line.
    let again = scheduler::prepare_event_job(&e.app, &e.agent, &job).await.unwrap();
    assert!(again.is_some());
    assert_eq!(e.history("dentist").await.len(), 1);

    // The done file syncs to a spent timer.
    e.sync().await;
    let manifest = serde_json::to_value(e.platform().wake_manifest(&e.agent).await.unwrap()).unwrap();
    assert_eq!(manifest["events"][0], json!({"name":"dentist","type":"one-shot","next_fire":null,"status":"done"}));
    // Only the rewritten immediate event fires (a new file is a new event).
    assert_eq!(e.fire().await.enqueued, 1);
    let names: Vec<String> =
        e.event_jobs().await.iter().map(|j| serde_json::from_str::<EventJob>(&j.payload).unwrap().name).collect();
    assert_eq!(names.iter().filter(|n| *n == "dentist").count(), 1);
    assert_eq!(e.fire().await.enqueued, 0);
}

#[tokio::test]
async fn late_one_shot_is_missed_beyond_grace_and_fires_within() {
    let e = env(Some("2026-12-01T12:00:00Z")).await;
    e.write("events/late/event.json", r#"{"type":"one-shot","at":"2026-12-01T10:00:00Z","text":"too late"}"#).await;
    e.write("events/ontime/event.json", r#"{"type":"one-shot","at":"2026-12-01T11:30:00Z","text":"still ok"}"#).await;
    e.sync().await;
    assert_eq!(e.fire().await.enqueued, 2);
    assert_eq!(e.fire().await.enqueued, 0);

    let mut turns = Vec::new();
    for job in e.event_jobs().await {
        let payload: EventJob = serde_json::from_str(&job.payload).unwrap();
        let prepared = scheduler::prepare_event_job(&e.app, &e.agent, &job).await.unwrap();
        assert_eq!(prepared.is_some(), !payload.missed, "{payload:?}");
        if let Some(m) = prepared {
            turns.push(m.message.text);
        }
    }
    assert_eq!(turns, ["[EVENT:ontime:one-shot:2026-12-01T11:30:00Z] still ok"]);
    let history = e.history("late").await;
    assert_eq!(history.len(), 1);
    assert_eq!((history[0]["outcome"].as_str(), history[0]["reason"].as_str()), (Some("missed"), Some("late")));
    assert_eq!(history[0]["due_at"], "2026-12-01T10:00:00Z");
    // A missed one-shot is not marked done, and never fires.
    assert!(!e.read("events/late/event.json").await.unwrap().contains("done"));
    e.sync().await;
    assert_eq!(e.fire().await.enqueued, 0);
}

#[tokio::test]
async fn periodic_missed_window_fires_once() {
    let e = env(Some("2026-06-01T10:30:00Z")).await;
    let clock = e.clock.clone().unwrap();
    e.write("events/hourly/event.json", r#"{"type":"periodic","schedule":"0 * * * *","timezone":"UTC","text":"tick"}"#)
        .await;
    e.sync().await;
    assert_eq!(e.fire().await.enqueued, 0, "a new timer waits for the next tick");

    // Down from 10:30 to 13:30: 11:00, 12:00 and 13:00 were missed.
    clock.advance_ms(3 * 3600 * 1000);
    e.sync().await; // a restart syncs too; the state survives it
    let round = e.fire().await;
    assert_eq!(round.enqueued, 1);
    assert_eq!(e.fire().await.enqueued, 0);
    let jobs = e.event_jobs().await;
    assert_eq!(jobs.len(), 1);
    let payload: EventJob = serde_json::from_str(&jobs[0].payload).unwrap();
    assert_eq!(payload.due_at.to_rfc3339(), "2026-06-01T13:00:00+00:00");
    let rows = e.platform().store.timers_for(&e.agent.id).await.unwrap();
    assert_eq!(rows[0].next_fire_ms, Some(ms("2026-06-01T14:00:00Z")));
    assert_eq!(rows[0].last_fired_ms, Some(ms("2026-06-01T13:00:00Z")));
    assert_eq!(e.platform().store.next_timer_ms().await.unwrap(), Some(ms("2026-06-01T14:00:00Z")));

    // The next tick fires normally.
    clock.advance_ms(31 * 60 * 1000);
    assert_eq!(e.fire().await.enqueued, 1);
}

#[tokio::test]
async fn schedule_route_answers_the_manifest() {
    let e = env(None).await;
    e.write("events/later/event.json", r#"{"type":"one-shot","at":"2099-01-01T00:00:00Z","text":"t"}"#).await;
    e.sync().await;
    let app = scheduler::routes().with_state(e.app.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (_, token) = e.platform().create_token(Some("t".into()), None).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{base}/api/agents/{}/schedule", e.agent.id);

    let unauthenticated = http.get(&url).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let answer = http.get(&url).bearer_auth(token.expose()).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        body,
        json!({"next_wake": "2099-01-01T00:00:00Z",
               "events": [{"name": "later", "type": "one-shot", "next_fire": "2099-01-01T00:00:00Z"}]})
    );
    let other_user = e.platform().create_token(None, Some(EmailAddress::parse("x@example.com").unwrap())).await;
    let answer = http.get(&url).bearer_auth(other_user.unwrap().1.expose()).send().await.unwrap();
    assert_eq!(answer.status(), 404);
}
