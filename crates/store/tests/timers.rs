//! The timers table on a real SQLite file: replacing an agent's rows in one
//! transaction, due timers in order, the earliest timer, `record_fired`'s
//! file guard, and `delete_agent` removing timers.

use tinyfat_core::{AgentId, AgentName, EmailAddress};
use tinyfat_store::{MetadataStore, NewAgent, SqliteStore, TimerRow, Timers};

async fn open(dir: &tempfile::TempDir) -> SqliteStore {
    let url = format!("sqlite://{}", dir.path().join("meta.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    store.migrate().await.unwrap();
    store
}

fn row(agent: &AgentId, name: &str, next: Option<i64>, sha: &str) -> TimerRow {
    TimerRow {
        agent_id: agent.clone(),
        name: name.into(),
        event_type: "one-shot".into(),
        next_fire_ms: next,
        last_fired_ms: None,
        file_sha256: sha.into(),
        state: "{}".into(),
        error: None,
        updated_ms: 1,
    }
}

#[tokio::test]
async fn replace_due_record_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = AgentId::from_ulid(ulid::Ulid::from_parts(1, 1));
    let b = AgentId::from_ulid(ulid::Ulid::from_parts(2, 2));
    assert_eq!(store.next_timer_ms().await.unwrap(), None);

    store.replace_timers(&a, &[row(&a, "x", Some(300), "s1"), row(&a, "y", None, "s2")]).await.unwrap();
    store.replace_timers(&b, &[row(&b, "z", Some(100), "s3")]).await.unwrap();
    assert_eq!(store.next_timer_ms().await.unwrap(), Some(100));
    let due: Vec<String> = store.due_timers(300, 10).await.unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(due, ["z", "x"]);
    assert_eq!(store.due_timers(299, 10).await.unwrap().len(), 1);
    assert_eq!(store.due_timers(300, 1).await.unwrap().len(), 1);

    // Replacing upserts the given rows and drops the agent's others only.
    store.replace_timers(&a, &[row(&a, "y", Some(50), "s2b")]).await.unwrap();
    let names: Vec<String> = store.timers_for(&a).await.unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["y"]);
    assert_eq!(store.timers_for(&b).await.unwrap().len(), 1);
    assert!(store.replace_timers(&a, &[row(&b, "q", None, "s")]).await.is_err(), "rows of another agent");

    // record_fired only while the row describes the same file.
    assert!(!store.record_fired(&a, "y", "s2", Some(50), Some(900), 2).await.unwrap());
    assert!(store.record_fired(&a, "y", "s2b", Some(50), Some(900), 2).await.unwrap());
    let y = &store.timers_for(&a).await.unwrap()[0];
    assert_eq!((y.last_fired_ms, y.next_fire_ms, y.updated_ms), (Some(50), Some(900), 2));
    assert!(!store.record_fired(&a, "gone", "s", None, None, 2).await.unwrap());

    // delete_agent removes the agent's timers.
    let owner = store.upsert_user("us_1", &EmailAddress::parse("o@x.org").unwrap(), 1).await.unwrap();
    store
        .insert_agent(&NewAgent {
            id: a.clone(),
            name: AgentName::parse("timed").unwrap(),
            email: EmailAddress::parse("timed@x.org").unwrap(),
            owner_id: owner.id,
            model: "m".into(),
            created_ms: 1,
        })
        .await
        .unwrap();
    let deleted = store.delete_agent(&a).await.unwrap();
    assert_eq!(deleted.timers, 1);
    assert!(store.timers_for(&a).await.unwrap().is_empty());
    assert_eq!(store.next_timer_ms().await.unwrap(), Some(100));
}
