//! The metadata store on a real SQLite file: constraints, cascades and
//! durability across reopening.

use tinyfat_core::{AgentId, AgentName, EmailAddress, KeyId, SealedSecret, SenderPattern};
use tinyfat_store::{ApiToken, MetadataStore, NewAgent, SqliteStore, StoreError};

fn email(s: &str) -> EmailAddress {
    EmailAddress::parse(s).unwrap()
}

fn new_agent(n: u64, name: &str, owner_id: &str) -> NewAgent {
    NewAgent {
        id: AgentId::from_ulid(ulid::Ulid::from_parts(n, n as u128)),
        name: AgentName::parse(name).unwrap(),
        email: email(&format!("{name}@example.org")),
        owner_id: owner_id.to_owned(),
        model: "claude-x".into(),
        created_ms: 1000 + n as i64,
    }
}

async fn open(dir: &tempfile::TempDir) -> SqliteStore {
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    store.migrate().await.unwrap();
    store
}

#[tokio::test]
async fn agents_users_and_uniqueness() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let ann = store.upsert_user("us_1", &email("ann@x.org"), 1).await.unwrap();
    let again = store.upsert_user("us_other", &email("ANN@x.org"), 2).await.unwrap();
    assert_eq!(ann.id, again.id, "same user, case-insensitive");

    let a = store.insert_agent(&new_agent(1, "swiftpebble", &ann.id)).await.unwrap();
    assert_eq!(a.owner_email.as_str(), "ann@x.org");
    let mut same_name = new_agent(2, "swiftpebble", &ann.id);
    same_name.email = email("elsewhere@example.org");
    let dup_name = store.insert_agent(&same_name).await.unwrap_err();
    assert!(matches!(dup_name, StoreError::Conflict("agent name")), "{dup_name:?}");
    let mut dup_email = new_agent(3, "other", &ann.id);
    dup_email.email = a.email.clone();
    assert!(matches!(store.insert_agent(&dup_email).await.unwrap_err(), StoreError::Conflict("agent email")));
    let unknown_owner = store.insert_agent(&new_agent(4, "orphan", "us_missing")).await;
    assert!(matches!(unknown_owner, Err(StoreError::Database(_))), "foreign keys are enforced");

    assert_eq!(store.agent_by_name("swiftpebble").await.unwrap().unwrap().id, a.id);
    let found = store.agent_by_email(&email("SwiftPebble@EXAMPLE.org")).await.unwrap();
    assert_eq!(found.unwrap().id, a.id, "agent addresses match case-insensitively");
    assert_eq!(store.agent_by_email(&email("swiftpebble@EXAMPLE.org")).await.unwrap().unwrap().id, a.id);
    let bob = store.upsert_user("us_2", &email("bob@x.org"), 3).await.unwrap();
    store.insert_agent(&new_agent(5, "amberfox", &bob.id)).await.unwrap();
    let names = |agents: Vec<tinyfat_store::Agent>| agents.into_iter().map(|a| a.name.to_string()).collect::<Vec<_>>();
    assert_eq!(names(store.list_agents(None).await.unwrap()), ["amberfox", "swiftpebble"]);
    assert_eq!(names(store.list_agents(Some(&bob.id)).await.unwrap()), ["amberfox"]);
    store.set_agent_model(&a.id, "openai:gpt-4o").await.unwrap();
    assert_eq!(store.agent_by_id(&a.id).await.unwrap().unwrap().model, "openai:gpt-4o");
}

#[tokio::test]
async fn delete_removes_every_row_of_the_agent_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let owner = store.upsert_user("us_1", &email("ann@x.org"), 1).await.unwrap();
    let a = store.insert_agent(&new_agent(1, "alpha", &owner.id)).await.unwrap();
    let b = store.insert_agent(&new_agent(2, "beta", &owner.id)).await.unwrap();
    let sealed = SealedSecret { key_id: KeyId("k".into()), nonce: vec![1; 12], ciphertext: vec![2; 20] };
    for agent in [&a, &b] {
        store.add_sender(&agent.id, &SenderPattern::parse("@x.org").unwrap(), 1).await.unwrap();
        store.put_secret(&agent.id, "anthropic_api_key", &sealed, 1).await.unwrap();
    }
    let rows = store.delete_agent(&a.id).await.unwrap();
    assert_eq!((rows.agents, rows.senders, rows.secrets), (1, 1, 1));
    assert!(store.agent_by_id(&a.id).await.unwrap().is_none());
    assert!(store.list_senders(&a.id).await.unwrap().is_empty());
    assert!(store.get_secret(&a.id, "anthropic_api_key").await.unwrap().is_none());
    assert_eq!(store.list_senders(&b.id).await.unwrap().len(), 1);
    assert!(store.get_secret(&b.id, "anthropic_api_key").await.unwrap().is_some());
}

#[tokio::test]
async fn senders_secrets_and_tokens_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let agent_id;
    {
        let store = open(&dir).await;
        let owner = store.upsert_user("us_1", &email("ann@x.org"), 1).await.unwrap();
        agent_id = store.insert_agent(&new_agent(1, "alpha", &owner.id)).await.unwrap().id;
        let rule = SenderPattern::parse("telegram:42").unwrap();
        assert!(store.add_sender(&agent_id, &rule, 1).await.unwrap());
        assert!(!store.add_sender(&agent_id, &rule, 1).await.unwrap(), "second add is a no-op");
        let sealed = SealedSecret { key_id: KeyId("k1".into()), nonce: vec![7; 12], ciphertext: vec![9; 30] };
        store.put_secret(&agent_id, "slack_bot_token", &sealed, 5).await.unwrap();
        let token = ApiToken {
            id: "tk_1".into(),
            name: "ci".into(),
            user_id: None,
            token_hash: "h1".into(),
            created_ms: 1,
            revoked_ms: None,
        };
        store.insert_token(&token).await.unwrap();
        assert!(matches!(store.insert_token(&token).await, Err(StoreError::Conflict(_))));
        store.pool().close().await;
    }
    let store = open(&dir).await;
    assert_eq!(store.list_senders(&agent_id).await.unwrap(), [SenderPattern::parse("telegram:42").unwrap()]);
    let sealed = store.get_secret(&agent_id, "slack_bot_token").await.unwrap().unwrap();
    assert_eq!((sealed.key_id.0.as_str(), sealed.nonce.len()), ("k1", 12));
    let listed = store.list_secrets(&agent_id).await.unwrap();
    assert_eq!((listed[0].name.as_str(), listed[0].updated_ms), ("slack_bot_token", 5));
    assert_eq!(store.token_by_hash("h1").await.unwrap().unwrap().id, "tk_1");
    assert!(store.revoke_token("tk_1", 9).await.unwrap());
    assert!(!store.revoke_token("tk_1", 10).await.unwrap(), "revoking twice reports nothing revoked");
    assert_eq!(store.token_by_hash("h1").await.unwrap().unwrap().revoked_ms, Some(9));
    assert!(store.remove_sender(&agent_id, &SenderPattern::parse("telegram:42").unwrap()).await.unwrap());
    assert!(!store.remove_sender(&agent_id, &SenderPattern::parse("telegram:42").unwrap()).await.unwrap());
}

#[tokio::test]
async fn uses_wal_and_reports_unsupported_urls() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let mode: (String,) = sqlx::query_as("PRAGMA journal_mode").fetch_one(store.pool()).await.unwrap();
    assert_eq!(mode.0, "wal");
    let sync: (i64,) = sqlx::query_as("PRAGMA synchronous").fetch_one(store.pool()).await.unwrap();
    assert_eq!(sync.0, 2, "synchronous=FULL");
    let err = tinyfat_store::connect("mysql://x").await.unwrap_err();
    assert!(err.to_string().contains("sqlite://"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_waiting_for_the_lock_takes_it_soon_after_its_release() {
    use sqlx::Connection as _;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    // Another process holds SQLite's write lock for 130 ms.
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE").execute(&mut holder).await.unwrap();
    let writer = tokio::spawn({
        let store = store.clone();
        async move {
            store.upsert_user("us_1", &email("ann@x.org"), 1).await.unwrap();
            Instant::now()
        }
    });
    tokio::time::sleep(Duration::from_millis(130)).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    let released = Instant::now();
    let written = writer.await.unwrap();
    // The pool's busy handler retries at least every millisecond; SQLite's
    // own (1, 2, 5, 10, 15, 20, 25, 25, 25, 50 … ms) would sleep until
    // 178 ms, 48 ms after the release.
    let late = written.saturating_duration_since(released);
    assert!(late < Duration::from_millis(25), "the write went through {late:?} after the lock was free");
}
