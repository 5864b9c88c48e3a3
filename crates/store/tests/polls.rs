//! Channel pollers' leases and cursors on a real SQLite file: one owner at a
//! time, takeover after expiry, fenced cursor writes, release, the secret
//! lookup pollers start from, and rows removed with their agent.

use tinyfat_core::{AgentId, AgentName, EmailAddress, KeyId, SealedSecret};
use tinyfat_store::{MetadataStore, NewAgent, Polls, SqliteStore};

async fn store_with_agent(dir: &tempfile::TempDir) -> (SqliteStore, AgentId) {
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    store.migrate().await.unwrap();
    let owner = store.upsert_user("us_1", &EmailAddress::parse("o@x.org").unwrap(), 1).await.unwrap();
    let id = AgentId::from_ulid(ulid::Ulid::from_parts(1, 1));
    store
        .insert_agent(&NewAgent {
            id: id.clone(),
            name: AgentName::parse("poller").unwrap(),
            email: EmailAddress::parse("poller@x.org").unwrap(),
            owner_id: owner.id,
            model: "m".into(),
            created_ms: 1,
        })
        .await
        .unwrap();
    (store, id)
}

#[tokio::test]
async fn one_owner_at_a_time_with_fenced_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let (store, a) = store_with_agent(&dir).await;

    // First claim: no cursor yet.
    assert_eq!(store.claim_poll(&a, "imap", "p1", 1_000, 100).await.unwrap(), Some(String::new()));
    // Held: another owner is refused; the holder renews.
    assert_eq!(store.claim_poll(&a, "imap", "p2", 1_050, 100).await.unwrap(), None);
    assert!(store.save_poll_cursor(&a, "imap", "p1", "c1", 1_060).await.unwrap());
    assert_eq!(store.claim_poll(&a, "imap", "p1", 1_090, 100).await.unwrap(), Some("c1".into()));
    // Another channel of the same agent is a separate lease.
    assert_eq!(store.claim_poll(&a, "telegram", "p2", 1_090, 100).await.unwrap(), Some(String::new()));

    // Expired (1_190): p2 takes over and sees p1's cursor; p1 can no
    // longer move it.
    assert_eq!(store.claim_poll(&a, "imap", "p2", 1_190, 100).await.unwrap(), Some("c1".into()));
    assert!(!store.save_poll_cursor(&a, "imap", "p1", "stale", 1_200).await.unwrap());
    assert!(store.save_poll_cursor(&a, "imap", "p2", "c2", 1_200).await.unwrap());
    // Its own lease expired: even the owner's write is refused.
    assert!(!store.save_poll_cursor(&a, "imap", "p2", "late", 1_290).await.unwrap());

    // Release: free at once for the next owner; the cursor stays.
    assert_eq!(store.claim_poll(&a, "imap", "p2", 1_300, 100).await.unwrap(), Some("c2".into()));
    store.release_poll(&a, "imap", "p1", 1_310).await.unwrap();
    assert_eq!(store.claim_poll(&a, "imap", "p3", 1_310, 100).await.unwrap(), None, "p1 cannot release p2's lease");
    store.release_poll(&a, "imap", "p2", 1_310).await.unwrap();
    assert_eq!(store.claim_poll(&a, "imap", "p3", 1_310, 100).await.unwrap(), Some("c2".into()));

    // Pollers find their agents by secret name.
    assert!(store.agents_with_secret("imap_password").await.unwrap().is_empty());
    let sealed = SealedSecret { key_id: KeyId("k".into()), nonce: vec![0; 12], ciphertext: vec![1, 2, 3] };
    store.put_secret(&a, "imap_password", &sealed, 1).await.unwrap();
    store.put_secret(&a, "other", &sealed, 1).await.unwrap();
    assert_eq!(store.agents_with_secret("imap_password").await.unwrap(), vec![a.clone()]);

    // Deleting the agent deletes its poll rows.
    store.delete_agent(&a).await.unwrap();
    assert!(store.agents_with_secret("imap_password").await.unwrap().is_empty());
    let err = store.claim_poll(&a, "imap", "p1", 2_000, 100).await;
    assert!(err.is_err(), "a poll row needs its agent (foreign key)");
}
