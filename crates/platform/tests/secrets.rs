//! Secrets at rest, on a real SQLite file and a real data folder: the round
//! trip works, tampering, moving and a wrong master key fail closed, the
//! plaintext appears nowhere under the data folder, and key rotation
//! survives a crash in the middle.

use std::path::Path;

use tinyfat_core::{EmailAddress, MasterKey, Secret};
use tinyfat_platform::Platform;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::provision::CreateAgent;

const PLAINTEXT: &str = "sk-ant-PLAINTEXT-MUST-NOT-LEAK-4242";

fn settings(dir: &Path) -> Settings {
    Settings::load(&Sources { data_dir: Some(dir.to_owned()), ..Sources::default() }).unwrap()
}

async fn platform_with_agents(dir: &Path) -> (Platform, tinyfat_store::Agent, tinyfat_store::Agent) {
    let p = Platform::open(settings(dir)).await.unwrap();
    let owner = EmailAddress::parse("ann@example.com").unwrap();
    let a =
        p.create_agent(CreateAgent { owner: owner.clone(), name: Some("alpha".into()), model: None }).await.unwrap();
    let b = p.create_agent(CreateAgent { owner, name: Some("beta".into()), model: None }).await.unwrap();
    (p, a, b)
}

/// Every byte of every file under `dir`, including the SQLite WAL.
fn grep_tree(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            let ty = entry.file_type().unwrap();
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                let bytes = std::fs::read(entry.path()).unwrap();
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(entry.path().display().to_string());
                }
            }
        }
    }
    hits
}

#[tokio::test]
async fn round_trip_and_no_plaintext_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (p, a, _) = platform_with_agents(dir.path()).await;
    p.set_secret(&a, "anthropic_api_key", &Secret::new(PLAINTEXT)).await.unwrap();
    assert_eq!(p.secret(&a, "anthropic_api_key").await.unwrap().unwrap().expose(), PLAINTEXT);
    assert!(p.secret(&a, "missing").await.unwrap().is_none());
    let listed = p.list_secrets(&a).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(!serde_json::to_string(&listed).unwrap().contains(PLAINTEXT));
    let hits = grep_tree(dir.path(), PLAINTEXT.as_bytes());
    assert!(hits.is_empty(), "plaintext found in {hits:?}");
    let key_file = std::fs::read_to_string(dir.path().join("master.key")).unwrap();
    assert!(grep_tree(&dir.path().join("storage"), key_file.trim().as_bytes()).is_empty());
}

#[tokio::test]
async fn invalid_names_and_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (p, a, _) = platform_with_agents(dir.path()).await;
    for bad in ["", "Upper", "has-dash", "../x", &"x".repeat(65)] {
        assert!(p.set_secret(&a, bad, &Secret::new("v")).await.unwrap_err().is_user_error(), "{bad}");
    }
    assert!(p.set_secret(&a, "k", &Secret::new("")).await.unwrap_err().is_user_error());
    assert!(p.set_secret(&a, "k", &Secret::new("x".repeat(20_000))).await.unwrap_err().is_user_error());
}

#[tokio::test]
async fn tampered_moved_and_wrong_key_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (p, a, b) = platform_with_agents(dir.path()).await;
    p.set_secret(&a, "anthropic_api_key", &Secret::new(PLAINTEXT)).await.unwrap();
    let sealed = p.store.get_secret(&a.id, "anthropic_api_key").await.unwrap().unwrap();

    let mut tampered = sealed.clone();
    *tampered.ciphertext.last_mut().unwrap() ^= 0x01;
    p.store.put_secret(&a.id, "anthropic_api_key", &tampered, 1).await.unwrap();
    assert!(p.secret(&a, "anthropic_api_key").await.is_err(), "tampered ciphertext must not open");

    // Moved to another agent, or to another name of the same agent.
    p.store.put_secret(&b.id, "anthropic_api_key", &sealed, 1).await.unwrap();
    assert!(p.secret(&b, "anthropic_api_key").await.is_err(), "a ciphertext moved to another agent must not open");
    p.store.put_secret(&a.id, "openai_api_key", &sealed, 1).await.unwrap();
    assert!(p.secret(&a, "openai_api_key").await.is_err(), "a ciphertext moved to another name must not open");

    // Restore, then swap in a wrong master key.
    p.store.put_secret(&a.id, "anthropic_api_key", &sealed, 1).await.unwrap();
    assert_eq!(p.secret(&a, "anthropic_api_key").await.unwrap().unwrap().expose(), PLAINTEXT);
    drop(p);
    let key_path = dir.path().join("master.key");
    std::fs::remove_file(&key_path).unwrap();
    std::fs::write(&key_path, MasterKey::generate(&mut rand::rng()).to_base64().expose()).unwrap();
    let wrong = Platform::open(settings(dir.path())).await.unwrap();
    let a = wrong.agent("alpha").await.unwrap();
    let err = wrong.secret(&a, "anthropic_api_key").await.unwrap_err();
    assert!(err.to_string().contains("not loaded"), "{err}");
    // Even with the key id forged to match, a wrong key cannot open it.
    let mut forged = sealed.clone();
    forged.key_id = wrong.cipher.current_key_id();
    wrong.store.put_secret(&a.id, "anthropic_api_key", &forged, 1).await.unwrap();
    assert!(wrong.secret(&a, "anthropic_api_key").await.is_err());
}

#[tokio::test]
async fn master_key_file_is_private_and_stable() {
    let dir = tempfile::tempdir().unwrap();
    let first = Platform::open(settings(dir.path())).await.unwrap();
    assert!(first.key_generated);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("master.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = Platform::open(settings(dir.path())).await.unwrap();
    assert!(!second.key_generated);
    assert_eq!(first.cipher.current_key_id(), second.cipher.current_key_id());
}

#[tokio::test]
async fn rotation_reseals_and_survives_a_crash_in_the_middle() {
    let dir = tempfile::tempdir().unwrap();
    let (p, a, b) = platform_with_agents(dir.path()).await;
    p.set_secret(&a, "anthropic_api_key", &Secret::new("value-a")).await.unwrap();
    p.set_secret(&b, "telegram_bot_token", &Secret::new("value-b")).await.unwrap();
    let old_id = p.cipher.current_key_id();

    // Crash after the new key file is written, before the secrets are resealed.
    tinyfat_platform::keys::begin_rotation(&p.settings).unwrap();
    drop(p);
    let mid = Platform::open(settings(dir.path())).await.unwrap();
    assert_eq!(
        mid.secret(&mid.agent("alpha").await.unwrap(), "anthropic_api_key").await.unwrap().unwrap().expose(),
        "value-a"
    );

    // Running the rotation again finishes it.
    assert_eq!(mid.rotate_master_key().await.unwrap(), 2);
    drop(mid);
    assert!(!dir.path().join("master.key.next").exists());
    let after = Platform::open(settings(dir.path())).await.unwrap();
    assert_ne!(after.cipher.current_key_id(), old_id);
    let a = after.agent("alpha").await.unwrap();
    let b = after.agent("beta").await.unwrap();
    assert_eq!(after.secret(&a, "anthropic_api_key").await.unwrap().unwrap().expose(), "value-a");
    assert_eq!(after.secret(&b, "telegram_bot_token").await.unwrap().unwrap().expose(), "value-b");
    for s in after.list_secrets(&a).await.unwrap() {
        assert_eq!(s.key_id, after.cipher.current_key_id().to_string());
    }
}
