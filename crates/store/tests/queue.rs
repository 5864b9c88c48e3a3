//! The job queue, agent leases, deliveries and usage on real SQLite files:
//! dedup, group-commit durability, claim batching, per-agent exclusion under
//! concurrent claimers, fencing, failure rules, dead letters, deletion.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::NaiveDate;
use tinyfat_core::message::Usage;
use tinyfat_core::{AgentId, AgentName, EmailAddress, SessionId};
use tinyfat_store::queue::LEASE_LOST_ERROR;
use tinyfat_store::{
    Deliveries, DeliveryState, Failure, JobOutcome, JobQueue, JobState, MetadataStore, NewAgent, NewDelivery, NewJob,
    QueuePolicy, SqliteStore, StoreError, UsageLedger,
};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;

fn url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("meta.db").display())
}

async fn open_with(dir: &tempfile::TempDir, policy: QueuePolicy) -> SqliteStore {
    let store = SqliteStore::open_with(&url(dir), policy).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn open(dir: &tempfile::TempDir) -> SqliteStore {
    open_with(dir, QueuePolicy::default()).await
}

fn agent(n: u64) -> AgentId {
    AgentId::from_ulid(ulid::Ulid::from_parts(n, u128::from(n)))
}

fn session(s: &str) -> SessionId {
    SessionId::parse(s).unwrap()
}

fn job(id: &str, key: &str, agent_id: &AgentId, session_id: &str) -> NewJob {
    NewJob {
        id: id.to_owned(),
        dedup_key: key.to_owned(),
        agent_id: agent_id.clone(),
        session: session(session_id),
        kind: "message".into(),
        payload: format!(r#"{{"text":"{id}"}}"#),
    }
}

/// Enqueues a fresh job (its id doubles as its dedup key) and checks it was new.
async fn put(store: &SqliteStore, id: &str, agent_id: &AgentId, session_id: &str, now_ms: i64) {
    let answer = store.enqueue(job(id, &format!("key:{id}"), agent_id, session_id), now_ms).await.unwrap();
    assert!(!answer.duplicate, "{id} is new");
    assert_eq!(answer.job_id, id);
}

fn ids(claim: &tinyfat_store::Claim) -> Vec<&str> {
    claim.jobs.iter().map(|j| j.id.as_str()).collect()
}

async fn count_rows(store: &SqliteStore, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(store.pool())
        .await
        .unwrap()
}

fn no_jitter() -> impl FnMut() -> f64 + Send {
    || 1.0
}

#[tokio::test]
async fn dedup_key_holds_within_ttl_and_is_reused_after() {
    let dir = tempfile::tempdir().unwrap();
    let policy = QueuePolicy { dedup_ttl_ms: 1_000, ..QueuePolicy::default() };
    let store = open_with(&dir, policy).await;
    let a = agent(1);

    let first = store.enqueue(job("j1", "telegram:7:100", &a, "telegram-7"), 0).await.unwrap();
    assert!(!first.duplicate);
    let again = store.enqueue(job("j2", "telegram:7:100", &a, "telegram-7"), 999).await.unwrap();
    assert_eq!((again.job_id.as_str(), again.duplicate), ("j1", true), "within the TTL: the first job's id");
    assert!(store.get_job("j2").await.unwrap().is_none(), "a duplicate inserts nothing");

    let reused = store.enqueue(job("j3", "telegram:7:100", &a, "telegram-7"), 1_000).await.unwrap();
    assert_eq!((reused.job_id.as_str(), reused.duplicate), ("j3", false), "an expired key is reused");
    let dup_of_new = store.enqueue(job("j4", "telegram:7:100", &a, "telegram-7"), 1_500).await.unwrap();
    assert_eq!((dup_of_new.job_id.as_str(), dup_of_new.duplicate), ("j3", true), "the TTL restarts with j3");
    assert_eq!(count_rows(&store, "jobs").await, 2);

    // The expired holder gave its key up for good: its row stays, released.
    let released: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, dedup_released FROM jobs WHERE dedup_key = 'telegram:7:100' ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(released, [("j1".to_owned(), 1), ("j3".to_owned(), 0)], "one holder at a time");
    store.enqueue(job("j5", "other", &a, "telegram-7"), 10_000).await.unwrap();
    assert!(store.enqueue(job("j5b", "other", &a, "telegram-7"), 10_000).await.unwrap().duplicate, "live keys stay");

    // A reused job id is refused for that caller only.
    let clash = store.enqueue(job("j5", "fresh", &a, "telegram-7"), 10_001).await.unwrap_err();
    assert!(matches!(clash, StoreError::Conflict("job id")), "{clash:?}");
    let fresh = store.enqueue(job("j7", "fresh", &a, "telegram-7"), 10_002).await.unwrap();
    assert!(!fresh.duplicate, "the refused enqueue left its key free");
    let bad = store.enqueue(NewJob { payload: "not json".into(), ..job("j6", "k6", &a, "cli-main") }, 1).await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");
}

/// Enqueues `jobs` from tasks spawned together: on a single-threaded
/// runtime they all reach the writer before it runs, so they share one
/// batch. Answers in the order of `jobs`.
async fn enqueue_in_one_batch<const N: usize>(
    store: &SqliteStore,
    jobs: [NewJob; N],
    now_ms: i64,
) -> Vec<Result<tinyfat_store::Enqueued, StoreError>> {
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|j| {
            let store = store.clone();
            tokio::spawn(async move { store.enqueue(j, now_ms).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

#[tokio::test]
async fn an_expired_key_repeated_in_one_batch_goes_to_the_first_job_only() {
    let dir = tempfile::tempdir().unwrap();
    let policy = QueuePolicy { dedup_ttl_ms: 1_000, ..QueuePolicy::default() };
    let store = open_with(&dir, policy).await;
    let a = agent(1);
    store.enqueue(job("old", "k", &a, "cli-main"), 0).await.unwrap();
    let requests = [job("ja", "k", &a, "cli-main"), job("jb", "k", &a, "cli-main"), job("old", "k2", &a, "cli-main")];
    let answers = enqueue_in_one_batch(&store, requests, 2_000).await;
    let ok = |i: usize| answers[i].as_ref().map(|e| (e.job_id.as_str(), e.duplicate)).unwrap();
    assert_eq!(ok(0), ("ja", false), "the first job takes the expired key over");
    assert_eq!(ok(1), ("ja", true), "the second finds it taken by the first");
    assert!(matches!(answers[2], Err(StoreError::Conflict("job id"))), "{:?}", answers[2]);
    assert_eq!(count_rows(&store, "jobs").await, 2);

    // The one-transaction path (`enqueue_each`) answers the same.
    let each = store.enqueue_each(job("jc", "k", &a, "cli-main"), 2_500).await.unwrap();
    assert_eq!((each.job_id.as_str(), each.duplicate), ("ja", true));
    let each = store.enqueue_each(job("jd", "k", &a, "cli-main"), 3_000).await.unwrap();
    assert_eq!((each.job_id.as_str(), each.duplicate), ("jd", false), "expired again: taken over");
    let clash = store.enqueue_each(job("jd", "k3", &a, "cli-main"), 3_000).await.unwrap_err();
    assert!(matches!(clash, StoreError::Conflict("job id")), "{clash:?}");
}

#[tokio::test]
async fn one_batch_with_repeated_keys_and_ids_answers_each_caller_right() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    let payload = r#"{"t":"line\nnext \"quoted\" back\\slash","u":"é 🎉 \u00e9"}"#;
    store.enqueue(job("j0", "k0", &a, "cli-main"), 6).await.unwrap();
    let requests = [
        job("j1", "k1", &a, "cli-main"),
        job("j2", "k1", &a, "cli-main"),
        job("j3", "k2", &a, "cli-main"),
        job("j1", "k3", &a, "cli-main"),
        NewJob { payload: payload.into(), ..job("j4", "k4", &a, "cli-main") },
        job("j6", "k0", &a, "cli-main"),
    ];
    // The answers must be the same however they are batched.
    let answers = enqueue_in_one_batch(&store, requests, 7).await;
    let ok = |i: usize| answers[i].as_ref().map(|e| (e.job_id.as_str(), e.duplicate)).unwrap();
    assert_eq!(ok(0), ("j1", false));
    assert_eq!(ok(1), ("j1", true), "same key in the same batch: a duplicate");
    assert_eq!(ok(2), ("j3", false));
    assert!(matches!(answers[3], Err(StoreError::Conflict("job id"))), "{:?}", answers[3]);
    assert_eq!(ok(4), ("j4", false));
    assert_eq!(ok(5), ("j0", true), "a key held from an earlier batch");
    assert_eq!(store.get_job("j4").await.unwrap().unwrap().payload, payload, "payload stored byte for byte");
    assert_eq!(store.get_job("j1").await.unwrap().unwrap().dedup_key, "k1");
    assert!(!store.enqueue(job("j5", "k3", &a, "cli-main"), 8).await.unwrap().duplicate, "k3 was given back");
    assert_eq!(count_rows(&store, "jobs").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_enqueue_is_already_committed() {
    let dir = tempfile::tempdir().unwrap();
    let writer = open(&dir).await;
    // A second, independent pool: what another process would see.
    let reader = SqliteStore::open(&url(&dir)).await.unwrap();
    let a = agent(1);
    let mut tasks = Vec::new();
    for t in 0..20 {
        let (writer, reader, a) = (writer.clone(), reader.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..10 {
                let id = format!("j{t}-{n}");
                writer.enqueue(job(&id, &id, &a, "cli-main"), 1).await.unwrap();
                let seen = reader.get_job(&id).await.unwrap();
                assert_eq!(seen.map(|j| j.state), Some(JobState::Queued), "{id} visible right after its ack");
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(count_rows(&reader, "jobs").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_every_caller_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    // Break the table under the writer, as a full disk or I/O error would.
    sqlx::query("ALTER TABLE jobs RENAME TO jobs_away").execute(store.pool()).await.unwrap();
    let mut tasks = Vec::new();
    for n in 0..8 {
        let (store, a) = (store.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            store.enqueue(job(&format!("j{n}"), &format!("k{n}"), &a, "cli-main"), 1).await
        }));
    }
    for task in tasks {
        let answer = task.await.unwrap();
        assert!(matches!(answer, Err(StoreError::Commit(_))), "{answer:?}");
    }
    sqlx::query("ALTER TABLE jobs_away RENAME TO jobs").execute(store.pool()).await.unwrap();
    assert_eq!(count_rows(&store, "jobs").await, 0, "the batch rolled back");
    let retry = store.enqueue(job("j0", "k0", &a, "cli-main"), 2).await.unwrap();
    assert!(!retry.duplicate, "a retry after the failure is a new job");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_that_cannot_be_synced_fails_the_enqueue_and_every_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    put(&store, "j0", &a, "cli-main", 1).await;
    // The WAL file vanishes under the open database (an operator's rm, a
    // broken disk): what the writer commits now can no longer be made
    // durable, so it must not be acknowledged.
    std::fs::remove_file(dir.path().join("meta.db-wal")).unwrap();
    let answer = store.enqueue(job("j1", "k1", &a, "cli-main"), 2).await;
    assert!(matches!(answer, Err(StoreError::Sync(_))), "{answer:?}");
    let later = store.enqueue(job("j2", "k2", &a, "cli-main"), 3).await;
    assert!(matches!(later, Err(StoreError::Sync(_))), "after a failed sync nothing is acknowledged: {later:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_replaced_by_a_new_file_is_not_synced_in_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    put(&store, "j0", &a, "cli-main", 1).await;
    // The WAL is deleted and a fresh one appears at its path (as when
    // another connection opens the database next): the writer's commits go
    // into the deleted file, so syncing the new one would prove nothing.
    let wal = dir.path().join("meta.db-wal");
    std::fs::remove_file(&wal).unwrap();
    std::fs::write(&wal, b"").unwrap();
    let answer = store.enqueue(job("j1", "k1", &a, "cli-main"), 2).await;
    assert!(matches!(answer, Err(StoreError::Sync(_))), "{answer:?}");
}

#[tokio::test]
async fn an_in_memory_database_is_refused() {
    let refused = SqliteStore::open("sqlite::memory:").await;
    assert!(matches!(refused, Err(StoreError::UnsupportedUrl(_))), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueuers_are_all_durable_and_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    let mut tasks = Vec::new();
    // 50 tasks × 10 keys; each key is also sent by the next task (a provider
    // retry racing the original): exactly one of the two inserts.
    for t in 0..50u32 {
        let (store, a) = (store.clone(), a.clone());
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for n in 0..10u32 {
                for (sender, key_owner) in [(t, t), (t, (t + 49) % 50)] {
                    let key = format!("k{key_owner}-{n}");
                    let id = format!("j{sender}-{key_owner}-{n}");
                    let answer = store.enqueue(job(&id, &key, &a, "cli-main"), 5).await.unwrap();
                    answers.push((key, id, answer));
                }
            }
            answers
        }));
    }
    let mut winner: HashMap<String, String> = HashMap::new();
    let mut all = Vec::new();
    for task in tasks {
        for (key, id, answer) in task.await.unwrap() {
            if !answer.duplicate {
                assert_eq!(answer.job_id, id);
                assert!(winner.insert(key.clone(), id).is_none(), "{key} inserted twice");
            }
            all.push((key, answer));
        }
    }
    assert_eq!(winner.len(), 500);
    for (key, answer) in all {
        assert_eq!(answer.job_id, winner[&key], "every answer for {key} names the one job");
    }
    let reader = SqliteStore::open(&url(&dir)).await.unwrap();
    assert_eq!(count_rows(&reader, "jobs").await, 500);
    let distinct: i64 =
        sqlx::query_scalar("SELECT COUNT(DISTINCT dedup_key) FROM jobs").fetch_one(reader.pool()).await.unwrap();
    assert_eq!(distinct, 500);
}

#[tokio::test]
async fn a_claim_takes_the_oldest_session_whole_and_other_sessions_go_next() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    put(&store, "j1", &a, "telegram-1", 1).await;
    put(&store, "j2", &a, "telegram-1", 2).await;
    put(&store, "j3", &a, "web-main", 3).await;
    put(&store, "j4", &a, "telegram-1", 4).await;
    put(&store, "j5", &a, "telegram-1", 500).await;

    let claim = store.claim_next("w1", 100, MINUTE_MS).await.unwrap().unwrap();
    assert_eq!(claim.session.as_str(), "telegram-1");
    assert_eq!(ids(&claim), ["j1", "j2", "j4"], "every due job of the oldest job's session, oldest first");
    assert_eq!((claim.lease.agent_id.clone(), claim.lease.epoch), (a.clone(), 1));
    assert!(claim.jobs.iter().all(|j| j.state == JobState::Running && j.lease_owner.as_deref() == Some("w1")));

    assert!(store.claim_next("w2", 200, MINUTE_MS).await.unwrap().is_none(), "the agent is leased");
    let waiting = store.get_job("j3").await.unwrap().unwrap();
    assert_eq!((waiting.state, waiting.attempts, waiting.updated_ms), (JobState::Queued, 0, 3), "untouched");

    assert!(store.complete(&claim.lease, &claim.job_ids(), 300).await.unwrap());
    let next = store.claim_next("w2", 400, MINUTE_MS).await.unwrap().unwrap();
    assert_eq!((next.session.as_str(), ids(&next), next.lease.epoch), ("web-main", vec!["j3"], 2));
    assert!(store.complete(&next.lease, &next.job_ids(), 450).await.unwrap());
    assert!(store.claim_next("w1", 450, MINUTE_MS).await.unwrap().is_none(), "j5 is not due yet");
    assert_eq!(ids(&store.claim_next("w1", 500, MINUTE_MS).await.unwrap().unwrap()), ["j5"]);
    for id in ["j1", "j2", "j3", "j4"] {
        assert_eq!(store.get_job(id).await.unwrap().unwrap().state, JobState::Done, "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_hold_one_agent_twice_and_run_each_job_once() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(&dir).await;
    let agents_n = 12u64;
    let mut expected = HashSet::new();
    for n in 0..agents_n {
        for k in 0..6 {
            let id = format!("j{n}-{k}");
            put(&first, &id, &agent(n + 1), if k % 2 == 0 { "cli-main" } else { "web-main" }, k).await;
            expected.insert(id);
        }
    }
    // Three stores = three pools, as three worker processes would have.
    let mut stores = vec![first];
    for _ in 0..2 {
        stores.push(open(&dir).await);
    }
    let held: Arc<Mutex<HashSet<AgentId>>> = Arc::default();
    let ran: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..6 {
        let (store, held, ran) = (stores[w % 3].clone(), held.clone(), ran.clone());
        let total = expected.len();
        tasks.push(tokio::spawn(async move {
            let owner = format!("worker-{w}");
            for _ in 0..10_000 {
                if ran.lock().unwrap().len() == total {
                    return;
                }
                let Some(claim) = store.claim_next(&owner, 1_000, MINUTE_MS).await.unwrap() else {
                    tokio::task::yield_now().await;
                    continue;
                };
                assert!(held.lock().unwrap().insert(claim.lease.agent_id.clone()), "agent held twice at once");
                tokio::task::yield_now().await;
                ran.lock().unwrap().extend(claim.job_ids());
                assert!(held.lock().unwrap().remove(&claim.lease.agent_id));
                assert!(store.complete(&claim.lease, &claim.job_ids(), 1_001).await.unwrap());
            }
            panic!("claimers did not finish");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let ran = ran.lock().unwrap().clone();
    assert_eq!(ran.len(), expected.len(), "no job ran twice");
    assert_eq!(ran.into_iter().collect::<HashSet<_>>(), expected);
    let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = 'done' AND attempts = 0")
        .fetch_one(stores[0].pool())
        .await
        .unwrap();
    assert_eq!(done, 72);
}

#[tokio::test]
async fn a_lapsed_lease_is_taken_over_with_the_next_epoch_and_fences_the_old_owner() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    put(&store, "j1", &a, "cli-main", 0).await;
    let old = store.claim_next("w1", 0, 1_000).await.unwrap().unwrap();
    assert!(store.claim_next("w2", 999, 1_000).await.unwrap().is_none(), "still live");

    let new = store.claim_next("w2", 1_000, 1_000).await.unwrap().unwrap();
    assert_eq!((new.lease.epoch, new.lease.owner.as_str(), ids(&new)), (2, "w2", vec!["j1"]));
    let j1 = &new.jobs[0];
    assert_eq!(j1.attempts, 1, "a worker lost mid-turn counts one attempt");
    assert_eq!(j1.last_error.as_deref(), Some(LEASE_LOST_ERROR));

    assert!(!store.renew(&old.lease, 1_100, 1_000).await.unwrap(), "stale renew is rejected");
    assert!(!store.complete(&old.lease, &old.job_ids(), 1_100).await.unwrap(), "stale complete is rejected");
    assert!(
        store
            .fail(&old.lease, &old.job_ids(), Failure::Permanent, "x", 1_100, &mut no_jitter())
            .await
            .unwrap()
            .is_none()
    );
    assert!(!store.release(&old.lease, 1_100).await.unwrap());
    let still = store.get_job("j1").await.unwrap().unwrap();
    assert_eq!((still.state, still.lease_owner.as_deref()), (JobState::Running, Some("w2")), "nothing changed");

    assert!(store.renew(&new.lease, 1_500, 1_000).await.unwrap());
    assert_eq!(store.get_job("j1").await.unwrap().unwrap().lease_expires_ms, Some(2_500), "jobs follow the lease");
    assert!(store.claim_next("w3", 2_000, 1_000).await.unwrap().is_none(), "renewed past its first expiry");
    assert!(store.complete(&new.lease, &new.job_ids(), 2_100).await.unwrap());
    assert_eq!(store.get_job("j1").await.unwrap().unwrap().state, JobState::Done);

    // A lapsed lease nobody took can still be renewed: nobody else ran.
    put(&store, "j2", &a, "cli-main", 3_000).await;
    let slow = store.claim_next("w1", 3_000, 100).await.unwrap().unwrap();
    assert_eq!(slow.lease.epoch, 3, "the epoch survives releases");
    assert!(store.renew(&slow.lease, 3_500, 100).await.unwrap());
}

#[tokio::test]
async fn a_job_that_kills_its_worker_every_time_becomes_a_dead_letter() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&dir, QueuePolicy { attempts_max: 3, ..QueuePolicy::default() }).await;
    let a = agent(1);
    put(&store, "j1", &a, "cli-main", 0).await;
    let mut now = 0;
    for turn in 0..3 {
        let claim = store.claim_next("w", now, 10).await.unwrap().expect("runs again");
        assert_eq!(claim.jobs[0].attempts, turn);
        now += 10; // never finished: the lease lapses
    }
    assert!(store.claim_next("w", now, 10).await.unwrap().is_none(), "the third loss dead-letters it");
    let dead = store.get_job("j1").await.unwrap().unwrap();
    assert_eq!((dead.state, dead.attempts), (JobState::Dead, 3));
    assert_eq!(dead.last_error.as_deref(), Some(LEASE_LOST_ERROR));
    assert!(!store.agent_status(&a, now).await.unwrap().running, "the takeover released the lease");
}

#[tokio::test]
async fn release_puts_jobs_back_without_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    put(&store, "j1", &a, "cli-main", 0).await;
    let claim = store.claim_next("w1", 0, MINUTE_MS).await.unwrap().unwrap();
    assert!(store.release(&claim.lease, 10).await.unwrap());
    let j1 = store.get_job("j1").await.unwrap().unwrap();
    assert_eq!((j1.state, j1.attempts, j1.lease_owner), (JobState::Queued, 0, None));
    let again = store.claim_next("w2", 20, MINUTE_MS).await.unwrap().unwrap();
    assert_eq!((again.lease.epoch, again.jobs[0].attempts), (2, 0));
}

#[tokio::test]
async fn finish_settles_each_job_and_requeues_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    for (id, at) in [("j1", 1), ("j2", 2), ("j3", 3)] {
        put(&store, id, &a, "cli-main", at).await;
    }
    let claim = store.claim_next("w", 10, MINUTE_MS).await.unwrap().unwrap();
    let outcomes = [JobOutcome::done("j1"), JobOutcome::failed("j2", Failure::Transient, "529 overloaded")];
    let settled = store.finish(&claim.lease, &outcomes, 100, &mut || 0.5).await.unwrap().unwrap();
    assert_eq!(settled.len(), 2);
    assert_eq!((settled[0].state, settled[1].state), (JobState::Done, JobState::Queued));
    assert_eq!(settled[1].next_run_at_ms, 100 + 1_000, "half of the 2 s base");
    let j3 = store.get_job("j3").await.unwrap().unwrap();
    assert_eq!((j3.state, j3.attempts, j3.failures), (JobState::Queued, 0, 0), "unsettled: back, no attempt");
    assert!(!store.agent_status(&a, 100).await.unwrap().running, "the turn ended");
    assert_eq!(ids(&store.claim_next("w", 200, MINUTE_MS).await.unwrap().unwrap()), ["j3"]);
}

#[tokio::test]
async fn finish_with_records_the_turns_deliveries_with_its_completion_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    put(&store, "j1", &a, "web-main", 1).await;
    let old = store.claim_next("w1", 10, 100).await.unwrap().unwrap();
    let taken = store.claim_next("w2", 200, MINUTE_MS).await.unwrap().unwrap();
    let reply = |id: &str| NewDelivery { channel: "web".into(), by_stream: true, ..delivery(id, "reply:j1", &a) };
    let done = [JobOutcome::done("j1")];
    assert!(store.finish_with(&old.lease, &done, &[reply("d-old")], 300, &mut no_jitter()).await.unwrap().is_none());
    assert_eq!(count_rows(&store, "deliveries").await, 0, "fenced out: the stale turn's reply is not recorded");

    let settled = store.finish_with(&taken.lease, &done, &[reply("d1")], 400, &mut no_jitter()).await.unwrap();
    assert_eq!(settled.unwrap()[0].state, JobState::Done);
    let row = store.get_delivery("d1").await.unwrap().expect("recorded with the completion");
    assert_eq!((row.state, row.idempotency_key.as_str(), row.created_ms), (DeliveryState::Sent, "reply:j1", 400));

    // A key recorded before (a retried turn) keeps its row; a bad delivery
    // fails the whole call before anything changes.
    put(&store, "j2", &a, "web-main", 500).await;
    let next = store.claim_next("w2", 500, MINUTE_MS).await.unwrap().unwrap();
    let bad = NewDelivery { idempotency_key: String::new(), ..reply("d3") };
    let error = store.finish_with(&next.lease, &[JobOutcome::done("j2")], &[bad], 600, &mut no_jitter()).await;
    assert!(matches!(error, Err(StoreError::Invalid(_))), "{error:?}");
    assert_eq!(store.get_job("j2").await.unwrap().unwrap().state, JobState::Running, "nothing settled");
    let settled =
        store.finish_with(&next.lease, &[JobOutcome::done("j2")], &[reply("d2")], 700, &mut no_jitter()).await;
    assert!(settled.unwrap().is_some());
    assert!(store.get_delivery("d2").await.unwrap().is_none(), "the key was taken: no second row");
    assert_eq!(count_rows(&store, "deliveries").await, 1);
}

#[tokio::test]
async fn backoff_doubles_per_failure_up_to_the_cap_with_the_callers_jitter() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&dir, QueuePolicy { attempts_max: 100, ..QueuePolicy::default() }).await;
    let a = agent(1);
    put(&store, "j1", &a, "cli-main", 0).await;
    let mut now = 0;
    let mut waits = Vec::new();
    let mut draws = [1.0, 1.0, 1.0, 1.0, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5].into_iter();
    for _ in 0..12 {
        let claim = store.claim_next("w", now, MINUTE_MS).await.unwrap().unwrap();
        let jitter = draws.next().unwrap();
        let settled = store
            .fail(&claim.lease, &claim.job_ids(), Failure::Internal, "boom", now, &mut || jitter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(settled[0].state, JobState::Queued);
        waits.push(settled[0].next_run_at_ms - now);
        assert!(store.claim_next("w", settled[0].next_run_at_ms - 1, MINUTE_MS).await.unwrap().is_none(), "not before");
        now = settled[0].next_run_at_ms;
    }
    assert_eq!(
        waits,
        [2_000, 4_000, 8_000, 16_000, 8_000, 64_000, 128_000, 256_000, 512_000, 600_000, 600_000, 300_000],
        "2 s doubling, capped at 10 min, scaled by the draw (0.25 and 0.5 here)"
    );
    let j1 = store.get_job("j1").await.unwrap().unwrap();
    assert_eq!((j1.attempts, j1.failures, j1.last_error.as_deref()), (12, 12, Some("boom")));
}

#[tokio::test]
async fn transient_failures_retry_until_the_window_closes_then_die() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    put(&store, "j1", &a, "cli-main", 0).await;
    let t0 = 1_000;
    let fail_at = |now: i64| {
        let store = store.clone();
        async move {
            let claim = store.claim_next("w", now, MINUTE_MS).await.unwrap().expect("due");
            store
                .fail(&claim.lease, &claim.job_ids(), Failure::Transient, "HTTP 429", now, &mut || 0.0)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let s = fail_at(t0).await;
    assert_eq!((s[0].state, s[0].attempts), (JobState::Queued, 0), "transient failures are not attempts");
    let s = fail_at(t0 + 6 * HOUR_MS - 1).await;
    assert_eq!(s[0].state, JobState::Queued, "inside the 6 h window");
    let j1 = store.get_job("j1").await.unwrap().unwrap();
    assert_eq!(j1.first_failure_ms, Some(t0), "the window starts at the first failure");
    let s = fail_at(t0 + 6 * HOUR_MS).await;
    assert_eq!(s[0].state, JobState::Dead, "the window closed");
    let j1 = store.get_job("j1").await.unwrap().unwrap();
    assert_eq!((j1.state, j1.attempts, j1.last_error.as_deref()), (JobState::Dead, 0, Some("HTTP 429")));
}

#[tokio::test]
async fn internal_failures_die_at_max_attempts_and_permanent_ones_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with(&dir, QueuePolicy { attempts_max: 3, ..QueuePolicy::default() }).await;
    let a = agent(1);
    put(&store, "j1", &a, "cli-main", 0).await;
    let mut now = 0;
    let mut states = Vec::new();
    for _ in 0..3 {
        let claim = store.claim_next("w", now, MINUTE_MS).await.unwrap().unwrap();
        let s = store
            .fail(&claim.lease, &claim.job_ids(), Failure::Internal, "panic", now, &mut || 0.0)
            .await
            .unwrap()
            .unwrap();
        states.push((s[0].state, s[0].attempts));
        now += 1;
    }
    assert_eq!(states, [(JobState::Queued, 1), (JobState::Queued, 2), (JobState::Dead, 3)]);
    assert!(store.claim_next("w", now + HOUR_MS, MINUTE_MS).await.unwrap().is_none(), "dead jobs are not claimed");

    put(&store, "j2", &a, "cli-main", 10).await;
    let claim = store.claim_next("w", 10, MINUTE_MS).await.unwrap().unwrap();
    let s = store
        .fail(&claim.lease, &claim.job_ids(), Failure::Permanent, "invalid API key", 11, &mut no_jitter())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((s[0].state, s[0].attempts), (JobState::Dead, 0));
    let j2 = store.get_job("j2").await.unwrap().unwrap();
    assert_eq!((j2.state, j2.last_error.as_deref()), (JobState::Dead, Some("invalid API key")));
}

#[tokio::test]
async fn dead_letters_are_listed_replayed_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let (a, b) = (agent(1), agent(2));
    let mut now = 0;
    for (id, who) in [("d1", &a), ("d2", &a), ("d3", &b), ("d4", &b)] {
        put(&store, id, who, "cli-main", now).await;
        let claim = store.claim_next("w", now, MINUTE_MS).await.unwrap().unwrap();
        store
            .fail(&claim.lease, &claim.job_ids(), Failure::Permanent, &format!("bad {id}"), now, &mut no_jitter())
            .await
            .unwrap();
        now += 10;
    }
    put(&store, "live", &a, "cli-main", now).await;
    let listed: Vec<String> = store.list_dead(None, 10).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(listed, ["d4", "d3", "d2", "d1"], "newest failure first");
    let of_a: Vec<String> = store.list_dead(Some(&a), 10).await.unwrap().into_iter().map(|j| j.id).collect();
    assert_eq!(of_a, ["d2", "d1"]);
    assert_eq!(store.queue_counts(now).await.unwrap().dead, 4);

    assert!(store.replay("d1", 500).await.unwrap());
    let d1 = store.get_job("d1").await.unwrap().unwrap();
    assert_eq!(
        (d1.state, d1.attempts, d1.failures, d1.first_failure_ms, d1.next_run_at_ms),
        (JobState::Queued, 0, 0, None, 500)
    );
    assert!(!store.replay("d1", 500).await.unwrap(), "only dead jobs replay");
    assert!(!store.replay("live", 500).await.unwrap());
    assert!(store.set_queued_payload("live", r#"{"stopped_turn":true}"#).await.unwrap());
    assert_eq!(store.get_job("live").await.unwrap().unwrap().payload, r#"{"stopped_turn":true}"#);
    assert!(!store.set_queued_payload("d3", "{}").await.unwrap(), "a dead job's payload stays");
    assert!(!store.set_queued_payload("nope", "{}").await.unwrap());
    let bad = store.set_queued_payload("live", "not json").await;
    assert!(matches!(bad, Err(StoreError::Invalid(_))), "{bad:?}");
    assert!(!store.purge("live").await.unwrap(), "only dead jobs purge");
    assert!(store.purge("d2").await.unwrap());
    assert!(store.get_job("d2").await.unwrap().is_none());
    assert!(!store.purge("d2").await.unwrap());

    assert_eq!(store.replay_all(600).await.unwrap(), 2, "d3 and d4");
    assert_eq!(store.queue_counts(600).await.unwrap().dead, 0);
    let claim_a = store.claim_next("w", 600, MINUTE_MS).await.unwrap().unwrap();
    assert_eq!(ids(&claim_a), ["d1", "live"], "the replayed job runs with its session");
    assert!(store.complete(&claim_a.lease, &claim_a.job_ids(), 601).await.unwrap());
    let claim_b = store.claim_next("w", 600, MINUTE_MS).await.unwrap().unwrap();
    assert_eq!(ids(&claim_b), ["d3", "d4"]);
    store.fail(&claim_b.lease, &claim_b.job_ids(), Failure::Permanent, "again", 602, &mut no_jitter()).await.unwrap();
    assert_eq!(store.purge_all_dead().await.unwrap(), 2);
    assert!(store.list_dead(None, 10).await.unwrap().is_empty());
    assert_eq!(store.get_job("live").await.unwrap().unwrap().state, JobState::Done, "live jobs stay");
}

#[tokio::test]
async fn counts_status_and_next_due_for_sleeping_workers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let (a, b) = (agent(1), agent(2));
    assert_eq!(store.next_due_ms().await.unwrap(), None, "an empty queue");
    put(&store, "a1", &a, "cli-main", 100).await;
    put(&store, "a2", &a, "web-main", 101).await;
    put(&store, "b1", &b, "cli-main", 102).await;
    assert_eq!(store.next_due_ms().await.unwrap(), Some(100));

    let claim_a = store.claim_next("w", 200, 1_000).await.unwrap().unwrap();
    assert_eq!(ids(&claim_a), ["a1"]);
    let claim_b = store.claim_next("w", 200, 1_000).await.unwrap().unwrap();
    store.fail(&claim_b.lease, &claim_b.job_ids(), Failure::Internal, "x", 200, &mut no_jitter()).await.unwrap();
    // a2 waits for a's lease (until 1 200); b1 runs again at 200 + 2 000.
    assert_eq!(store.next_due_ms().await.unwrap(), Some(1_200));

    let counts = store.queue_counts(300).await.unwrap();
    assert_eq!((counts.queued, counts.due, counts.running, counts.dead), (2, 1, 1, 0));
    let status_a = store.agent_status(&a, 300).await.unwrap();
    assert_eq!((status_a.queued, status_a.running, status_a.lease_owner.as_deref()), (1, true, Some("w")));
    let status_b = store.agent_status(&b, 300).await.unwrap();
    assert_eq!((status_b.queued, status_b.running), (1, false));

    store.complete(&claim_a.lease, &claim_a.job_ids(), 400).await.unwrap();
    assert_eq!(store.next_due_ms().await.unwrap(), Some(101), "a2 is free to run");
    assert_eq!(store.jobs_for(&a, 10).await.unwrap().iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), ["a2", "a1"]);
    let ttl = QueuePolicy::default().dedup_ttl_ms;
    assert_eq!(store.purge_done(400 + ttl, 10).await.unwrap(), 0, "a done job holds its key for the TTL");
    assert_eq!(store.purge_done(401 + ttl, 10).await.unwrap(), 1, "retention removes done jobs only");
    assert!(store.get_job("a1").await.unwrap().is_none());
}

fn delivery(id: &str, key: &str, a: &AgentId) -> NewDelivery {
    NewDelivery {
        id: id.to_owned(),
        idempotency_key: key.to_owned(),
        agent_id: a.clone(),
        job_id: Some("j1".into()),
        channel: "telegram".into(),
        target: r#"{"chat_id":42}"#.into(),
        body: r#"{"text":"hi"}"#.into(),
        by_stream: false,
    }
}

#[tokio::test]
async fn deliveries_are_idempotent_on_their_key_and_claimed_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    let first = store.insert_delivery(&delivery("d1", "reply:j1", &a), 10).await.unwrap();
    assert!(first.inserted);
    assert_eq!((first.delivery.state, first.delivery.next_attempt_ms), (DeliveryState::Pending, 10));
    let second = store.insert_delivery(&delivery("d2", "reply:j1", &a), 20).await.unwrap();
    assert!(!second.inserted, "same key: no second row");
    assert_eq!(second.delivery, first.delivery, "the existing row, unchanged");
    assert_eq!(count_rows(&store, "deliveries").await, 1);
    let id_clash = store.insert_delivery(&delivery("d1", "other-key", &a), 20).await.unwrap_err();
    assert!(matches!(id_clash, StoreError::Conflict("delivery id")), "{id_clash:?}");

    assert_eq!(store.due_deliveries(9, 10).await.unwrap().len(), 0);
    assert_eq!(store.due_deliveries(10, 10).await.unwrap()[0].id, "d1");
    assert!(store.mark_delivery_sending("d1", 30, 1_000).await.unwrap());
    assert!(!store.mark_delivery_sending("d1", 31, 1_000).await.unwrap(), "a second sender loses");
    assert!(store.due_deliveries(500, 10).await.unwrap().is_empty(), "being sent");
    // The sender vanished: due again after the stale time, same id (at-least-once).
    assert_eq!(store.due_deliveries(1_030, 10).await.unwrap()[0].id, "d1");
    assert!(store.mark_delivery_sending("d1", 1_030, 1_000).await.unwrap());
    assert!(store.mark_delivery_failed("d1", "HTTP 429", Some(5_000), 1_040).await.unwrap());
    let d1 = store.get_delivery("d1").await.unwrap().unwrap();
    assert_eq!((d1.state, d1.attempts, d1.next_attempt_ms), (DeliveryState::Pending, 2, 5_000));
    assert_eq!(d1.last_error.as_deref(), Some("HTTP 429"));
    assert!(store.mark_delivery_sending("d1", 5_000, 1_000).await.unwrap());
    assert!(store.mark_delivery_sent("d1", Some("tg:777"), 5_010).await.unwrap());
    assert!(!store.mark_delivery_sent("d1", Some("tg:778"), 5_020).await.unwrap(), "sent once");
    let d1 = store.get_delivery("d1").await.unwrap().unwrap();
    assert_eq!((d1.state, d1.provider_message_id.as_deref()), (DeliveryState::Sent, Some("tg:777")));

    store.insert_delivery(&delivery("d3", "j1:toolu_1", &a), 6_000).await.unwrap();
    assert!(store.mark_delivery_failed("d3", "chat not found", None, 6_001).await.unwrap());
    assert_eq!(store.get_delivery("d3").await.unwrap().unwrap().state, DeliveryState::Failed);
    assert!(store.due_deliveries(i64::MAX, 10).await.unwrap().is_empty());
    let listed: Vec<String> = store.deliveries_for(&a, 10).await.unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(listed, ["d3", "d1"]);
}

#[tokio::test]
async fn a_delivery_made_by_its_stream_is_recorded_sent_and_never_due() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    let streamed = NewDelivery { channel: "web".into(), by_stream: true, ..delivery("d1", "reply:j1", &a) };
    let row = store.insert_delivery(&streamed, 10).await.unwrap();
    assert!(row.inserted);
    assert_eq!((row.delivery.state, row.delivery.attempts), (DeliveryState::Sent, 0));
    assert!(store.due_deliveries(i64::MAX, 10).await.unwrap().is_empty(), "the delivery loop never takes it");
    assert!(!store.mark_delivery_sending("d1", 20, 1).await.unwrap(), "nor can any sender claim it");
    let again = store.insert_delivery(&streamed, 30).await.unwrap();
    assert!(!again.inserted, "idempotent on its key like any other");
}

#[tokio::test]
async fn deliveries_on_one_channel_skip_the_others_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let (a, b) = (agent(1), agent(2));
    let on = |id: &str, channel: &str, who: &AgentId| NewDelivery { channel: channel.into(), ..delivery(id, id, who) };
    store.insert_delivery(&on("e1", "email", &a), 10).await.unwrap();
    for n in 0..5 {
        store.insert_delivery(&on(&format!("w{n}"), "web", &a), 20 + n).await.unwrap();
    }
    store.insert_delivery(&on("e2", "email", &a), 30).await.unwrap();
    store.insert_delivery(&on("e3", "email", &b), 40).await.unwrap();
    let ids = |rows: Vec<tinyfat_store::Delivery>| rows.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(ids(store.deliveries_on(&a, "email", 10).await.unwrap()), ["e2", "e1"]);
    assert_eq!(ids(store.deliveries_on(&a, "email", 1).await.unwrap()), ["e2"], "the limit counts this channel only");
    assert_eq!(ids(store.deliveries_on(&b, "email", 10).await.unwrap()), ["e3"]);
    assert!(store.deliveries_on(&b, "web", 10).await.unwrap().is_empty());
    assert_eq!(store.deliveries_on(&a, "web", 10).await.unwrap().len(), 5);
}

#[tokio::test]
async fn usage_sums_per_agent_per_day() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let (a, b) = (agent(1), agent(2));
    let day1 = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
    let day2 = NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
    let u = |i, o, cw, cr| Usage {
        input_tokens: i,
        output_tokens: o,
        cache_creation_input_tokens: cw,
        cache_read_input_tokens: cr,
    };
    store.add_usage(&a, day1, &u(100, 10, 5, 1)).await.unwrap();
    store.add_usage(&a, day1, &u(200, 20, 0, 2)).await.unwrap();
    store.add_usage(&a, day2, &u(7, 7, 7, 7)).await.unwrap();
    store.add_usage(&b, day1, &u(1, 1, 1, 1)).await.unwrap();
    assert_eq!(store.usage_for(&a, day1).await.unwrap(), u(300, 30, 5, 3));
    assert_eq!(store.usage_for(&a, day2).await.unwrap(), u(7, 7, 7, 7));
    assert_eq!(store.usage_for(&b, day2).await.unwrap(), Usage::default(), "no usage is zero");
    let history = store.usage_history(&a, 10).await.unwrap();
    assert_eq!(history, [(day2, u(7, 7, 7, 7)), (day1, u(300, 30, 5, 3))]);
}

#[tokio::test]
async fn deleting_an_agent_removes_its_queue_rows_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let owner = store.upsert_user("us_1", &EmailAddress::parse("ann@x.org").unwrap(), 1).await.unwrap();
    let mut agents = Vec::new();
    for (n, name) in [(1, "alpha"), (2, "beta")] {
        let new = NewAgent {
            id: agent(n),
            name: AgentName::parse(name).unwrap(),
            email: EmailAddress::parse(&format!("{name}@example.org")).unwrap(),
            owner_id: owner.id.clone(),
            model: "claude-x".into(),
            created_ms: 1,
        };
        agents.push(store.insert_agent(&new).await.unwrap().id);
    }
    let mut leases = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        put(&store, &format!("dead{i}"), a, "cli-main", 1).await;
        let claim = store.claim_next("w", 1, MINUTE_MS).await.unwrap().unwrap();
        store.fail(&claim.lease, &claim.job_ids(), Failure::Permanent, "x", 1, &mut no_jitter()).await.unwrap();
        put(&store, &format!("run{i}"), a, "cli-main", 2).await;
        put(&store, &format!("wait{i}"), a, "web-main", 3).await;
        leases.push(store.claim_next("w", 2, MINUTE_MS).await.unwrap().unwrap().lease);
        store.insert_delivery(&delivery(&format!("d{i}"), &format!("reply:{i}"), a), 2).await.unwrap();
        store.add_usage(a, NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(), &Usage::default()).await.unwrap();
    }
    let rows = store.delete_agent(&agents[0]).await.unwrap();
    assert_eq!((rows.agents, rows.jobs, rows.dead_letters, rows.deliveries, rows.usage_days), (1, 2, 1, 1, 1));
    let a = &agents[0];
    assert!(store.jobs_for(a, 10).await.unwrap().is_empty());
    assert!(store.deliveries_for(a, 10).await.unwrap().is_empty());
    assert!(!store.renew(&leases[0], 3, MINUTE_MS).await.unwrap(), "the lease went with the agent");
    assert!(!store.enqueue(job("again", "key:run0", a, "cli-main"), 4).await.unwrap().duplicate, "its dedup keys too");

    let b = &agents[1];
    assert_eq!(store.jobs_for(b, 10).await.unwrap().len(), 3);
    assert_eq!(store.deliveries_for(b, 10).await.unwrap().len(), 1);
    assert!(store.renew(&leases[1], 3, MINUTE_MS).await.unwrap());
    assert_eq!(store.usage_history(b, 10).await.unwrap().len(), 1);
    assert!(store.enqueue(job("again-b", "key:run1", b, "cli-main"), 4).await.unwrap().duplicate);
}

#[tokio::test]
async fn a_stop_request_reaches_only_the_lease_it_was_made_under() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = agent(1);
    assert!(!store.request_cancel(&a, 0).await.unwrap(), "nothing runs: no lease was ever taken");

    put(&store, "j1", &a, "web-main", 0).await;
    put(&store, "j2", &a, "web-main", 0).await;
    let first = store.claim_next("w1", 0, MINUTE_MS).await.unwrap().unwrap();
    assert!(!store.cancel_requested(&first.lease).await.unwrap());
    // Another process (its own connection) asks the running turn to stop.
    let other = open(&dir).await;
    assert!(other.request_cancel(&a, 10).await.unwrap(), "a live lease is held");
    assert!(store.cancel_requested(&first.lease).await.unwrap());

    // The next acquisition starts clean; an old request never stops it.
    assert!(store.complete(&first.lease, &first.job_ids(), 20).await.unwrap());
    put(&store, "j3", &a, "web-main", 30).await;
    let second = store.claim_next("w2", 30, MINUTE_MS).await.unwrap().unwrap();
    assert_eq!(second.lease.epoch, first.lease.epoch + 1);
    assert!(!store.cancel_requested(&second.lease).await.unwrap());

    // A lapsed lease is not a running turn.
    assert!(!store.request_cancel(&a, 30 + MINUTE_MS + 1).await.unwrap());
    assert!(!store.cancel_requested(&second.lease).await.unwrap());
}

#[tokio::test]
async fn migrating_dedup_keys_into_jobs_keeps_every_held_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&url(&dir)).await.unwrap();
    // The schema as of migration 0008, with the separate `job_dedup` table.
    let before = tempfile::tempdir().unwrap();
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for entry in std::fs::read_dir(&migrations).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < "0009" {
            std::fs::copy(&path, before.path().join(name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(before.path()).await.unwrap().run(store.pool()).await.unwrap();
    let a = agent(1);
    let insert_job = "INSERT INTO jobs (id, dedup_key, agent_id, session, kind, payload, state, next_run_at_ms, \
                      created_ms, updated_ms) VALUES (?, ?, ?, 'cli-main', 'message', '{}', ?, 0, 0, 0)";
    // j-old's key was taken over by j-new after it expired; j-purged's key
    // row expired and was purged; j-held holds its key.
    for (id, key, state) in
        [("j-old", "k", "done"), ("j-new", "k", "queued"), ("j-purged", "k-gone", "done"), ("j-held", "k-held", "dead")]
    {
        sqlx::query(insert_job).bind(id).bind(key).bind(a.as_str()).bind(state).execute(store.pool()).await.unwrap();
    }
    for (key, id) in [("k", "j-new"), ("k-held", "j-held")] {
        sqlx::query("INSERT INTO job_dedup (key, job_id, agent_id, expires_ms) VALUES (?, ?, ?, ?)")
            .bind(key)
            .bind(id)
            .bind(a.as_str())
            .bind(i64::MAX)
            .execute(store.pool())
            .await
            .unwrap();
    }

    store.migrate().await.unwrap();
    let released: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, dedup_released FROM jobs ORDER BY id").fetch_all(store.pool()).await.unwrap();
    let expected = [("j-held", 0), ("j-new", 0), ("j-old", 1), ("j-purged", 1)];
    assert_eq!(released, expected.map(|(id, r)| (id.to_owned(), r)));
    let answer = |e: tinyfat_store::Enqueued| (e.job_id, e.duplicate);
    let k = store.enqueue(job("x1", "k", &a, "cli-main"), 1).await.unwrap();
    assert_eq!(answer(k), ("j-new".to_owned(), true), "the key's holder is still its holder");
    let held = store.enqueue(job("x2", "k-held", &a, "cli-main"), 1).await.unwrap();
    assert_eq!(answer(held), ("j-held".to_owned(), true), "a dead letter keeps its key");
    let gone = store.enqueue(job("x3", "k-gone", &a, "cli-main"), 1).await.unwrap();
    assert_eq!(answer(gone), ("x3".to_owned(), false), "an expired and purged key stays free");
    let tables: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'job_dedup'")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(tables, 0);
}
