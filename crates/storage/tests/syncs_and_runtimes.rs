//! `AgentDir`'s syncs step out of the tokio worker on a multi-threaded
//! runtime (`block_in_place`). They must work wherever the platform calls
//! them: on a worker, on a current-thread runtime (where `block_in_place`
//! would panic), in `spawn_blocking`, and outside any runtime. While one
//! worker waits for the disk, that worker's other tasks keep running.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tinyfat_core::AgentId;
use tinyfat_storage::{AgentDir, AgentStorage, LocalStorage, Workspace, validate_path};

async fn workspace() -> (tempfile::TempDir, Workspace) {
    let tmp = tempfile::tempdir().unwrap();
    let storage = LocalStorage::new(tmp.path().join("storage"));
    let ws = storage.create(&AgentId::from_ulid(ulid::Ulid::new())).await.unwrap();
    (tmp, ws)
}

/// An append and an atomic write, then what they left.
fn sync_both(dir: &AgentDir, n: usize) -> (Vec<u8>, Vec<u8>) {
    let log = validate_path("sessions/s.jsonl").unwrap();
    let file = validate_path("notes.md").unwrap();
    let stamp = dir.append_sync(&log, format!("{n}\n").as_bytes()).unwrap();
    assert!(stamp.len > 0);
    dir.write_atomic(&file, format!("note {n}").as_bytes()).unwrap();
    (dir.read(&log, 1 << 20).unwrap(), dir.read(&file, 1 << 20).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_worker_of_a_multi_threaded_runtime_and_in_spawn_blocking() {
    let (_tmp, ws) = workspace().await;
    assert_eq!(sync_both(&ws.dir, 1), (b"1\n".to_vec(), b"note 1".to_vec()));
    let dir = ws.dir.try_clone().unwrap();
    let (log, note) = tokio::task::spawn_blocking(move || sync_both(&dir, 2)).await.unwrap();
    assert_eq!((log, note), (b"1\n2\n".to_vec(), b"note 2".to_vec()));
    // From a spawned task too, the usual place of a turn.
    let dir = ws.dir.try_clone().unwrap();
    let (log, _) = tokio::spawn(async move { sync_both(&dir, 3) }).await.unwrap();
    assert_eq!(log, b"1\n2\n3\n".to_vec());
}

#[tokio::test]
async fn on_a_current_thread_runtime() {
    let (_tmp, ws) = workspace().await;
    assert_eq!(sync_both(&ws.dir, 1), (b"1\n".to_vec(), b"note 1".to_vec()));
}

#[test]
fn outside_any_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(tmp.path().join("prefix")).unwrap();
    let dir = AgentDir::open(&tmp.path().join("prefix")).unwrap();
    assert_eq!(sync_both(&dir, 1), (b"1\n".to_vec(), b"note 1".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_task_on_the_same_worker_runs_while_a_sync_waits() {
    let (_tmp, ws) = workspace().await;
    // The only worker runs a task that syncs many times, while a second
    // task needs that worker to flip a flag. With the syncs inside
    // `block_in_place`, the worker is handed over at the first sync and the
    // flag flips before the syncing task ends.
    let flipped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&flipped);
    let dir = ws.dir.try_clone().unwrap();
    let syncing = tokio::spawn(async move {
        let mut seen_during = false;
        for n in 0..200 {
            sync_both(&dir, n);
            seen_during |= flag.load(Ordering::SeqCst);
        }
        seen_during
    });
    let flipper = Arc::clone(&flipped);
    tokio::spawn(async move { flipper.store(true, Ordering::SeqCst) });
    let seen = tokio::time::timeout(Duration::from_secs(60), syncing).await.unwrap().unwrap();
    assert!(seen, "the other task ran while the syncing task waited for the disk");
}
