//! The session cache against a real agent folder: whatever happened to the
//! file between two turns (appends by the log itself or by another writer, a
//! torn line, an in-place rewrite, a replacement, a truncation), a cached
//! load reads what a full read of the file reads.

use tinyfat_core::AgentId;
use tinyfat_core::message::Message;
use tinyfat_core::session::{RecordBody, SessionId, SessionRecord};
use tinyfat_runtime::SessionCache;
use tinyfat_runtime::session::SessionLog;
use tinyfat_storage::{AgentStorage, LocalStorage, Workspace, validate_path};

async fn workspace() -> (tempfile::TempDir, Workspace) {
    let tmp = tempfile::tempdir().unwrap();
    let storage = LocalStorage::new(tmp.path().join("storage"));
    let ws = storage.create(&AgentId::from_ulid(ulid::Ulid::new())).await.unwrap();
    (tmp, ws)
}

fn session() -> SessionId {
    SessionId::parse("cli-main").unwrap()
}

fn file(ws: &Workspace) -> std::path::PathBuf {
    ws.dir.host_path().join("sessions/cli-main.jsonl")
}

fn say(text: &str) -> RecordBody {
    RecordBody::Message { message: Message::user_text(text), channel: None, usage: None, job: Some(text.into()) }
}

fn line(id: u64, text: &str) -> String {
    format!(
        "{}\n",
        serde_json::to_string(&SessionRecord { id, ts: "2026-12-06T00:00:00.000Z".into(), body: say(text) }).unwrap()
    )
}

/// What the cache answers must be what a full read answers.
fn assert_same_as_full(ws: &Workspace, cached: &SessionLog) {
    let full = SessionLog::load(&ws.dir, &session()).unwrap();
    assert_eq!(cached.records, full.records);
    assert_eq!(cached.skipped_lines, full.skipped_lines);
    assert_eq!(cached.next_id(), full.next_id());
}

/// The cached load, checked: `records` records, and what a full read gives.
fn load_checked(ws: &Workspace, cache: &SessionCache, records: usize) -> SessionLog {
    let log = cache.load(&ws.dir, &session()).unwrap();
    assert_eq!(log.records.len(), records);
    assert_same_as_full(ws, &log);
    log
}

fn append(ws: &Workspace, log: &mut SessionLog, text: &str) {
    log.append(&ws.dir, "2026-12-06T00:00:00.000Z".into(), say(text)).unwrap();
}

/// A log of `texts`, appended through the log and kept in `cache`.
fn kept(ws: &Workspace, cache: &SessionCache, texts: &[&str]) {
    let mut log = cache.load(&ws.dir, &session()).unwrap();
    for text in texts {
        append(ws, &mut log, text);
    }
    cache.keep(&ws.dir, log);
}

#[tokio::test]
async fn appends_by_the_log_and_by_another_writer_are_both_seen() {
    let (_tmp, ws) = workspace().await;
    let cache = SessionCache::new(1 << 20);
    kept(&ws, &cache, &["one", "two"]);
    assert!(cache.bytes() > 0, "the log was kept");
    // Another process appends between two turns.
    ws.dir.append_sync(&validate_path("sessions/cli-main.jsonl").unwrap(), line(3, "three").as_bytes()).unwrap();
    let mut log = load_checked(&ws, &cache, 3);
    append(&ws, &mut log, "four");
    assert_eq!(log.records.last().unwrap().id, 4);
    cache.keep(&ws.dir, log);
    load_checked(&ws, &cache, 4);
}

#[tokio::test]
async fn a_torn_line_then_a_later_append_reads_as_a_full_load_would() {
    let (_tmp, ws) = workspace().await;
    let cache = SessionCache::new(1 << 20);
    kept(&ws, &cache, &["one"]);
    // A crash mid-append leaves half a record.
    ws.dir.append_sync(&validate_path("sessions/cli-main.jsonl").unwrap(), b"{\"id\":2,\"ts\":\"20").unwrap();
    let mut log = cache.load(&ws.dir, &session()).unwrap();
    assert_eq!((log.records.len(), log.skipped_lines), (1, 1));
    assert_same_as_full(&ws, &log);
    // The retried turn's record starts on a line of its own.
    append(&ws, &mut log, "two");
    cache.keep(&ws.dir, log);
    let log = cache.load(&ws.dir, &session()).unwrap();
    assert_eq!(log.records.iter().map(|r| r.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_same_as_full(&ws, &log);
}

#[tokio::test]
async fn a_file_rewritten_in_place_is_read_again_whole() {
    let (_tmp, ws) = workspace().await;
    let cache = SessionCache::new(1 << 20);
    kept(&ws, &cache, &["one", "two"]);
    // Same inode, longer, different old end (the agent edits /data/sessions
    // from its sandbox with `>`): the cache must not trust its records.
    let rewritten = format!("{}{}{}", line(1, "uno"), line(2, "dos-dos-dos"), line(3, "tres"));
    std::fs::write(file(&ws), &rewritten).unwrap();
    load_checked(&ws, &cache, 3);
}

#[tokio::test]
async fn a_replaced_or_shortened_file_is_read_again_whole() {
    let (_tmp, ws) = workspace().await;
    let cache = SessionCache::new(1 << 20);
    kept(&ws, &cache, &["one", "two", "three"]);
    // A new file renamed over the old one (as `sed -i` does), longer than before.
    let replacement = ws.dir.host_path().join("sessions/new.jsonl");
    std::fs::write(&replacement, format!("{}{}{}{}", line(1, "a"), line(2, "b"), line(3, "c"), line(4, "d"))).unwrap();
    std::fs::rename(&replacement, file(&ws)).unwrap();
    cache.keep(&ws.dir, load_checked(&ws, &cache, 4));
    // Truncated to one record in place.
    std::fs::write(file(&ws), line(1, "only")).unwrap();
    cache.keep(&ws.dir, load_checked(&ws, &cache, 1));
    // Deleted: a new session.
    std::fs::remove_file(file(&ws)).unwrap();
    let log = cache.load(&ws.dir, &session()).unwrap();
    assert!(log.records.is_empty());
}

#[tokio::test]
async fn the_cache_holds_at_most_its_byte_budget() {
    let (_tmp, ws) = workspace().await;
    let cache = SessionCache::new(600);
    kept(&ws, &cache, &["one", "two"]);
    let first = cache.bytes();
    assert!(first > 0 && first <= 600, "{first}");
    // A second session: the older one is evicted to stay within the budget.
    let other = SessionId::parse("cli-other").unwrap();
    let mut log = cache.load(&ws.dir, &other).unwrap();
    for text in ["a", "b", "c"] {
        append(&ws, &mut log, text);
    }
    cache.keep(&ws.dir, log);
    assert!(cache.bytes() <= 600, "{}", cache.bytes());
    // A session larger than the whole budget is not kept at all.
    let mut log = cache.load(&ws.dir, &session()).unwrap();
    append(&ws, &mut log, &"x".repeat(700));
    let before = cache.bytes();
    cache.keep(&ws.dir, log);
    assert_eq!(cache.bytes(), before);
    // Evicted or not, every load still answers the file.
    load_checked(&ws, &cache, 3);
}
