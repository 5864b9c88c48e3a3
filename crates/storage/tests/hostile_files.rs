//! Agent files are hostile input: planted symlinks (to the master key, to
//! another agent's prefix) and FIFOs must never be followed or blocked on.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, Instant};

use tinyfat_core::AgentId;
use tinyfat_storage::{AgentStorage, EntryKind, FileError, LocalStorage, validate_path};

fn agent(n: u64) -> AgentId {
    AgentId::from_ulid(ulid::Ulid::from_parts(n, n as u128))
}

struct Setup {
    _tmp: tempfile::TempDir,
    data_dir: std::path::PathBuf,
    storage: LocalStorage,
}

async fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().to_owned();
    std::fs::write(data_dir.join("master.key"), "TOP-SECRET-MASTER-KEY").unwrap();
    let storage = LocalStorage::new(data_dir.join("storage"));
    storage.check().await.unwrap();
    Setup { _tmp: tmp, data_dir, storage }
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

fn p(s: &str) -> tinyfat_storage::RelPath {
    validate_path(s).unwrap()
}

#[tokio::test]
async fn read_write_append_round_trip() {
    let s = setup().await;
    let ws = s.storage.create(&agent(1)).await.unwrap();
    ws.dir.write_atomic(&p("notes/today.md"), b"hello").unwrap();
    assert_eq!(ws.dir.read(&p("/data/notes/today.md"), 100).unwrap(), b"hello");
    ws.dir.write_atomic(&p("notes/today.md"), b"replaced").unwrap();
    assert_eq!(ws.dir.read_string(&p("notes/today.md"), 100).unwrap(), "replaced");
    ws.dir.append_sync(&p("sessions/cli-main.jsonl"), b"{\"id\":1}\n").unwrap();
    ws.dir.append_sync(&p("sessions/cli-main.jsonl"), b"{\"id\":2}\n").unwrap();
    assert_eq!(ws.dir.read_string(&p("sessions/cli-main.jsonl"), 100).unwrap(), "{\"id\":1}\n{\"id\":2}\n");
    // No temporary file is left behind.
    let names: Vec<_> = ws.dir.list(&p("notes")).unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["today.md"]);
    assert!(matches!(ws.dir.read(&p("missing"), 10), Err(FileError::NotFound(_))));
    assert!(matches!(s.storage.create(&agent(1)).await, Err(tinyfat_storage::StorageError::AlreadyExists(_))));
}

#[tokio::test]
async fn size_cap_is_enforced() {
    let s = setup().await;
    let ws = s.storage.create(&agent(1)).await.unwrap();
    ws.dir.write_atomic(&p("big"), &vec![b'x'; 1000]).unwrap();
    assert!(matches!(ws.dir.read(&p("big"), 999), Err(FileError::TooLarge { size: 1000, cap: 999, .. })));
    assert_eq!(ws.dir.read(&p("big"), 1000).unwrap().len(), 1000);
}

#[tokio::test]
async fn planted_symlink_to_master_key_is_not_followed() {
    let s = setup().await;
    let ws = s.storage.create(&agent(1)).await.unwrap();
    let master = s.data_dir.join("master.key");
    symlink(&master, ws.host_path.join("MEMORY.md")).unwrap();

    let err = ws.dir.read(&p("MEMORY.md"), 1 << 20).unwrap_err();
    assert!(matches!(err, FileError::Symlink(_)), "{err:?}");
    assert!(!err.to_string().contains("TOP-SECRET"));
    // Appending (as to a session file) does not write through the link.
    assert!(matches!(ws.dir.append_sync(&p("MEMORY.md"), b"pwned"), Err(FileError::Symlink(_))));
    assert_eq!(std::fs::read_to_string(&master).unwrap(), "TOP-SECRET-MASTER-KEY");
    // An atomic write replaces the link itself, not its target.
    ws.dir.write_atomic(&p("MEMORY.md"), b"fresh memory").unwrap();
    assert_eq!(std::fs::read_to_string(&master).unwrap(), "TOP-SECRET-MASTER-KEY");
    assert_eq!(ws.dir.kind(&p("MEMORY.md")).unwrap(), Some(EntryKind::File));
    assert_eq!(ws.dir.read(&p("MEMORY.md"), 100).unwrap(), b"fresh memory");
}

#[tokio::test]
async fn symlinked_directory_to_another_agent_is_not_traversed() {
    let s = setup().await;
    let a = s.storage.create(&agent(1)).await.unwrap();
    let b = s.storage.create(&agent(2)).await.unwrap();
    b.dir.write_atomic(&p("MEMORY.md"), b"agent B's private memory").unwrap();
    symlink(&b.host_path, a.host_path.join("sessions")).unwrap();
    symlink("../".to_owned() + agent(2).as_str(), a.host_path.join("rel")).unwrap();

    for path in ["sessions/MEMORY.md", "rel/MEMORY.md"] {
        let err = a.dir.read(&p(path), 1 << 20).unwrap_err();
        assert!(matches!(err, FileError::Symlink(_)), "{path}: {err:?}");
        assert!(matches!(a.dir.write_atomic(&p(path), b"x"), Err(FileError::Symlink(_))), "{path}");
        assert!(matches!(a.dir.append_sync(&p(path), b"x"), Err(FileError::Symlink(_))), "{path}");
        assert!(matches!(a.dir.list(&p(path).split_last().unwrap().0), Err(FileError::Symlink(_))));
    }
    assert!(matches!(a.dir.create_dir_all(&p("sessions/sub")), Err(FileError::Symlink(_))));
    assert_eq!(b.dir.read(&p("MEMORY.md"), 100).unwrap(), b"agent B's private memory");
    // Renaming into a symlinked directory is refused too.
    a.dir.write_atomic(&p("x.json"), b"{}").unwrap();
    assert!(matches!(a.dir.rename(&p("x.json"), &p("sessions/x.json"), false), Err(FileError::Symlink(_))));
    assert_eq!(b.dir.list(&tinyfat_storage::RelPath::root()).unwrap().len(), 1);
}

#[tokio::test]
async fn fifo_is_neither_followed_nor_blocked_on() {
    let s = setup().await;
    let ws = s.storage.create(&agent(1)).await.unwrap();
    std::fs::create_dir(ws.host_path.join("sessions")).unwrap();
    mkfifo(&ws.host_path.join("MEMORY.md"));
    mkfifo(&ws.host_path.join("sessions/cli-main.jsonl"));

    let started = Instant::now();
    let read = ws.dir.read(&p("MEMORY.md"), 1 << 20).unwrap_err();
    assert!(matches!(read, FileError::NotRegular { kind: "FIFO", .. }), "{read:?}");
    let append = ws.dir.append_sync(&p("sessions/cli-main.jsonl"), b"x\n").unwrap_err();
    assert!(matches!(append, FileError::NotRegular { kind: "FIFO", .. }), "{append:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "blocked on a FIFO");
    let kinds: Vec<_> = ws.dir.list(&p("sessions")).unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EntryKind::Other]);
}

#[tokio::test]
async fn rename_without_replace_is_a_claim() {
    let s = setup().await;
    let ws = s.storage.create(&agent(1)).await.unwrap();
    ws.dir.write_atomic(&p("outbox/email/a.json"), b"1").unwrap();
    ws.dir.write_atomic(&p("outbox/sending/d1.json"), b"2").unwrap();
    let err = ws.dir.rename(&p("outbox/email/a.json"), &p("outbox/sending/d1.json"), false).unwrap_err();
    assert!(matches!(err, FileError::Exists(_)), "{err:?}");
    ws.dir.rename(&p("outbox/email/a.json"), &p("outbox/sending/d2.json"), false).unwrap();
    assert_eq!(ws.dir.read(&p("outbox/sending/d2.json"), 10).unwrap(), b"1");
    assert_eq!(ws.dir.kind(&p("outbox/email/a.json")).unwrap(), None);
}

#[tokio::test]
async fn delete_removes_the_prefix_but_not_link_targets() {
    let s = setup().await;
    let a = s.storage.create(&agent(1)).await.unwrap();
    let b = s.storage.create(&agent(2)).await.unwrap();
    b.dir.write_atomic(&p("MEMORY.md"), b"keep me").unwrap();
    symlink(&b.host_path, a.host_path.join("link-to-b")).unwrap();
    symlink(s.data_dir.join("master.key"), a.host_path.join("key")).unwrap();
    assert!(s.storage.delete(&agent(1)).await.unwrap());
    assert!(!a.host_path.exists());
    assert_eq!(b.dir.read(&p("MEMORY.md"), 100).unwrap(), b"keep me");
    assert!(s.data_dir.join("master.key").exists());
    assert!(!s.storage.delete(&agent(1)).await.unwrap());
}

#[tokio::test]
async fn written_files_are_not_world_writable() {
    let s = setup().await;
    let ws = s.storage.create(&agent(1)).await.unwrap();
    ws.dir.write_atomic(&p("a/b.txt"), b"x").unwrap();
    let mode = std::fs::metadata(ws.host_path.join("a/b.txt")).unwrap().permissions().mode();
    assert_eq!(mode & 0o002, 0);
}
