//! Two scheduler processes on one database: real `tinyfat serve --role
//! scheduler` processes (two of them) and one `--role worker` process share a
//! data folder; an agent's one-shot events, written straight into its
//! storage folder and synced with `tinyfat events NAME`, each fire exactly
//! once: one `event` job per event in the store, one `fired` line per event
//! in its `history.jsonl`, one event turn per event at the fake model.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tinyfat_core::AgentId;
use tinyfat_testkit::{FakeModel, Script, TestProcess};

fn command(data: &Path, fake: &FakeModel) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tinyfat"));
    cmd.env("TINYFAT_DATA_DIR", data)
        .env("TINYFAT_SANDBOX_MODE", "none")
        .env("ANTHROPIC_API_KEY", "sk-platform-key")
        .env("ANTHROPIC_BASE_URL", fake.base_url())
        .env_remove("TINYFAT_LOG");
    cmd
}

fn ok_json(data: &Path, fake: &FakeModel, args: &[&str]) -> Value {
    let out: Output = command(data, fake).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A `tinyfat serve --role ROLE` process without a port (scheduler and
/// worker roles run no gateway); killed on drop.
struct Process {
    _process: TestProcess,
    log: PathBuf,
}

impl Process {
    /// Starts the role and waits for its `ready_line` in the log.
    fn start(data: &Path, fake: &FakeModel, role: &str, index: usize, ready_line: &str) -> Process {
        let log = data.join(format!("serve-{role}-{index}.log"));
        let mut command = command(data, fake);
        command.args(["serve", "--role", role]).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        // No port: these roles run no gateway.
        let process = Process { _process: TestProcess::spawn(&mut command, 0), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !process.log().contains(ready_line) {
            assert!(Instant::now() < deadline, "{role} did not start; log:\n{}", process.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        process
    }

    fn log(&self) -> String {
        let mut s = String::new();
        let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut s));
        s
    }
}

/// The model requests whose last message (the new turn's input) mentions `needle`.
fn turns_for(fake: &FakeModel, needle: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|r| {
            r.body["messages"].as_array().and_then(|m| m.last()).is_some_and(|m| m.to_string().contains(needle))
        })
        .count()
}

async fn wait_for(what: &str, logs: impl Fn() -> String, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; logs:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_scheduler_processes_fire_each_one_shot_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let fake = FakeModel::start().await;
    fake.set_fallback(Script::text("Done."));
    let agent = ok_json(data, &fake, &["agent", "create", "--owner", "ann@example.com", "--name", "twice", "--json"]);
    let agent_id = agent["id"].as_str().unwrap().to_owned();
    let prefix = data.join("storage/agents").join(&agent_id);

    let schedulers = [
        Process::start(data, &fake, "scheduler", 1, "scheduler: firing event timers"),
        Process::start(data, &fake, "scheduler", 2, "scheduler: firing event timers"),
    ];
    let worker = Process::start(data, &fake, "worker", 1, "worker: running up to");
    let logs = || {
        let mut all = String::new();
        for (what, p) in [("scheduler 1", &schedulers[0]), ("scheduler 2", &schedulers[1]), ("worker", &worker)] {
            all.push_str(&format!("--- {what}\n{}\n", p.log()));
        }
        all
    };

    // Several one-shots a few seconds ahead, two of them due at the same instant.
    let now = chrono::Utc::now();
    let at = |s: i64| (now + chrono::TimeDelta::seconds(s)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let events = [("alpha", at(7)), ("beta", at(7)), ("gamma", at(8)), ("delta", at(9))];
    for (name, at) in &events {
        std::fs::create_dir_all(prefix.join(format!("events/{name}"))).unwrap();
        let file = json!({"type": "one-shot", "at": at, "text": format!("{name} is due")}).to_string();
        std::fs::write(prefix.join(format!("events/{name}/event.json")), file).unwrap();
    }
    // No turn ran: `tinyfat events` re-reads the files and records the timers;
    // the schedulers see them at their next wake (at most 5 s).
    let manifest = ok_json(data, &fake, &["events", "twice", "--json"]);
    assert_eq!(manifest["events"].as_array().unwrap().len(), events.len(), "{manifest}");
    assert!(manifest["events"].as_array().unwrap().iter().all(|e| e["type"] == "one-shot"), "{manifest}");

    for (name, at) in &events {
        let tag = format!("[EVENT:{name}:one-shot:{at}] {name} is due");
        wait_for(&format!("the turn of {name}"), logs, || turns_for(&fake, &tag) > 0).await;
        wait_for(&format!("{name} marked done"), logs, || {
            std::fs::read_to_string(prefix.join(format!("events/{name}/event.json"))).unwrap().contains("done")
        })
        .await;
    }
    // Past several scheduler wakes of both processes (SLEEP_MAX is 5 s).
    tokio::time::sleep(Duration::from_secs(6)).await;

    let store = tinyfat_store::connect(&format!("sqlite://{}", data.join("tinyfat.db").display())).await.unwrap();
    let jobs = store.jobs_for(&AgentId::parse(&agent_id).unwrap(), 1000).await.unwrap();
    let mut fired: Vec<String> = jobs
        .iter()
        .filter(|j| j.kind == "event")
        .map(|j| serde_json::from_str::<Value>(&j.payload).unwrap()["name"].as_str().unwrap().to_owned())
        .collect();
    fired.sort();
    let mut want: Vec<String> = events.iter().map(|(name, _)| (*name).to_owned()).collect();
    want.sort();
    assert_eq!(fired, want, "one event job per event: {jobs:#?}\n{}", logs());

    for (name, at) in &events {
        let history = std::fs::read_to_string(prefix.join(format!("events/{name}/history.jsonl"))).unwrap();
        let lines: Vec<Value> = history.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 1, "{name}: {history}");
        assert_eq!(lines[0]["outcome"], "fired", "{name}: {history}");
        let due = chrono::DateTime::parse_from_rfc3339(at).unwrap().to_utc();
        let recorded = chrono::DateTime::parse_from_rfc3339(lines[0]["due_at"].as_str().unwrap()).unwrap().to_utc();
        assert_eq!(recorded, due, "{name}: {history}");
        let tag = format!("[EVENT:{name}:one-shot:{at}]");
        assert_eq!(turns_for(&fake, &tag), 1, "{name} ran one turn; logs:\n{}", logs());
    }

    // Which process enqueued what (both may, or one may win every race).
    let enqueued: Vec<usize> =
        schedulers.iter().map(|p| p.log().matches("scheduler: event job enqueued").count()).collect();
    eprintln!("event jobs enqueued per scheduler process: {enqueued:?}");
    assert_eq!(enqueued.iter().sum::<usize>(), events.len(), "enqueued per scheduler {enqueued:?}; logs:\n{}", logs());
}
