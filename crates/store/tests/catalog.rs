//! The ingest path's catalog cache and its check inside the commit, on real
//! SQLite files: two stores on one file stand for two processes (each has its
//! own cache, as `serve` and a CLI command would); the WAL is checkpointed in
//! the background, off the commit path.

use std::time::{Duration, Instant};

use tinyfat_core::{AgentId, AgentName, EmailAddress, SenderPattern, SessionId};
use tinyfat_store::{JobQueue, MetadataStore, NewAgent, NewJob, SqliteStore, StoreError};

fn url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("meta.db").display())
}

async fn open(dir: &tempfile::TempDir) -> SqliteStore {
    let store = SqliteStore::open(&url(dir)).await.unwrap();
    store.migrate().await.unwrap();
    store
}

fn pattern(s: &str) -> SenderPattern {
    SenderPattern::parse(s).unwrap()
}

async fn agent_with_sender(store: &SqliteStore) -> AgentId {
    let owner = store.upsert_user("u1", &EmailAddress::parse("ann@example.com").unwrap(), 1).await.unwrap();
    let id = AgentId::from_ulid(ulid::Ulid::from_parts(7, 7));
    store
        .insert_agent(&NewAgent {
            id: id.clone(),
            name: AgentName::parse("helper").unwrap(),
            email: EmailAddress::parse("helper@example.org").unwrap(),
            owner_id: owner.id,
            model: "claude-x".into(),
            created_ms: 1,
        })
        .await
        .unwrap();
    store.add_sender(&id, &pattern("ann@example.com"), 1).await.unwrap();
    id
}

fn job(n: u32, agent: &AgentId) -> NewJob {
    NewJob {
        id: format!("job-{n}"),
        dedup_key: format!("key-{n}"),
        agent_id: agent.clone(),
        session: SessionId::parse("web-main").unwrap(),
        kind: "message".into(),
        payload: format!(r#"{{"n":{n}}}"#),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_is_served_from_the_cache_until_a_write_through_this_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let id = agent_with_sender(&store).await;
    let first = store.agent_view(id.as_str(), false).await.unwrap().unwrap();
    assert_eq!(first.senders, [pattern("ann@example.com")]);
    let by_name = store.agent_view("helper", false).await.unwrap().unwrap();
    assert_eq!(by_name.agent.id, id);
    let again = store.agent_view(id.as_str(), false).await.unwrap().unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &again), "the second lookup is the cached view");

    store.add_sender(&id, &pattern("bob@example.com"), 2).await.unwrap();
    let after = store.agent_view(id.as_str(), false).await.unwrap().unwrap();
    assert_eq!(after.senders, [pattern("ann@example.com"), pattern("bob@example.com")], "read your own writes");
    assert!(after.catalog_version > first.catalog_version);
    assert!(store.agent_view("nobody", false).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_by_another_process_refuses_a_job_admitted_under_the_old_view() {
    let dir = tempfile::tempdir().unwrap();
    let serve = open(&dir).await;
    let id = agent_with_sender(&serve).await;
    let cli = SqliteStore::open(&url(&dir)).await.unwrap();

    let view = serve.agent_view(id.as_str(), false).await.unwrap().unwrap();
    let admitted = serve.enqueue_checked(job(1, &id), 10, view.catalog_version).await.unwrap();
    assert!(!admitted.duplicate);

    // Another process removes the sender: this store's cache does not know.
    assert!(cli.remove_sender(&id, &pattern("ann@example.com")).await.unwrap());
    let cached = serve.agent_view(id.as_str(), false).await.unwrap().unwrap();
    assert_eq!(cached.senders, [pattern("ann@example.com")], "the cache may lag another process");
    let refused = serve.enqueue_checked(job(2, &id), 11, cached.catalog_version).await;
    assert!(matches!(refused, Err(StoreError::CatalogChanged)), "{refused:?}");
    assert!(serve.get_job("job-2").await.unwrap().is_none(), "nothing stored");
    assert!(serve.get_job("job-1").await.unwrap().is_some());

    // The writer saw the new version: the stale view is gone from the cache.
    let fresh = serve.agent_view(id.as_str(), false).await.unwrap().unwrap();
    assert!(fresh.senders.is_empty());
    assert!(fresh.catalog_version > cached.catalog_version);
    let unchecked_neighbour = serve.enqueue(job(3, &id), 12).await.unwrap();
    assert!(!unchecked_neighbour.duplicate, "plain enqueue does not look at the catalog");
    let retried = serve.enqueue_checked(job(2, &id), 13, fresh.catalog_version).await.unwrap();
    assert_eq!(retried.job_id, "job-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stale_caller_does_not_fail_the_rest_of_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let id = agent_with_sender(&store).await;
    let current = store.agent_view(id.as_str(), true).await.unwrap().unwrap().catalog_version;
    let mut tasks = Vec::new();
    for n in 0..64 {
        let (store, id) = (store.clone(), id.clone());
        let version = if n % 8 == 0 { current - 1 } else { current };
        tasks.push(tokio::spawn(async move { (n, store.enqueue_checked(job(n, &id), 1, version).await) }));
    }
    for task in tasks {
        match task.await.unwrap() {
            (n, Err(StoreError::CatalogChanged)) => assert_eq!(n % 8, 0),
            (n, Ok(answer)) => {
                assert_ne!(n % 8, 0);
                assert_eq!(answer.job_id, format!("job-{n}"));
            }
            (n, other) => panic!("job {n}: {other:?}"),
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs").fetch_one(store.pool()).await.unwrap();
    assert_eq!(stored, 56);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_is_checkpointed_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let id = agent_with_sender(&store).await;
    let db = dir.path().join("meta.db");
    let before = std::fs::metadata(&db).unwrap().len();
    let mut tasks = Vec::new();
    for t in 0..16u32 {
        let (store, id) = (store.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..100 {
                let mut job = job(t * 1000 + n, &id);
                job.payload = format!(r#"{{"text":"{}"}}"#, "x".repeat(1000));
                store.enqueue(job, 1).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // 1,600 jobs of 1 kB are far below SQLite's own checkpoint threshold
    // here, so only the background checkpointer moves them into the file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&db).unwrap().len() < before + 1_000_000 {
        assert!(Instant::now() < deadline, "the database file did not grow: no checkpoint ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
