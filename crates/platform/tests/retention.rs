//! Retention and the queue settings on a real SQLite data folder with a
//! manual clock: `queue.dedup_ttl` reaches the store (a key is free again
//! after it), and the retention pass deletes exactly the done jobs whose key
//! has expired: not a newer done job, not a queued one, not a dead letter.

use std::path::Path;
use std::sync::Arc;

use tinyfat_core::{AgentId, SessionId};
use tinyfat_platform::Platform;
use tinyfat_platform::clock::ManualClock;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::retention::purge_expired_done;
use tinyfat_platform::state::AppState;
use tinyfat_store::{Failure, NewJob};

const HOUR_MS: i64 = 3_600_000;

fn settings(dir: &Path) -> Settings {
    let env =
        [("TINYFAT_SANDBOX_MODE", "none"), ("TINYFAT_QUEUE_DEDUP_TTL", "1h"), ("TINYFAT_QUEUE_MAX_ATTEMPTS", "1")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    Settings::load(&Sources { data_dir: Some(dir.to_owned()), env, ..Sources::default() }).unwrap()
}

fn job(id: &str, key: &str, agent: &AgentId, session: &str) -> NewJob {
    NewJob {
        id: id.to_owned(),
        dedup_key: key.to_owned(),
        agent_id: agent.clone(),
        session: SessionId::parse(session).unwrap(),
        kind: "message".to_owned(),
        payload: "{}".to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn done_jobs_go_once_their_dedup_key_expired_and_nothing_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(10 * HOUR_MS);
    let mut platform = Platform::open(settings(dir.path())).await.unwrap();
    platform.clock = Arc::new(clock.clone());
    let state = AppState::new(Arc::new(platform));
    let store = &state.platform.store;
    let agent = AgentId::parse("ag_01JD8XQ5D2T8M0E7W3V6K4N9ZP").unwrap();
    let now = || state.platform.now_ms();

    // Four jobs at 10:00 in separate sessions (claimed in id order): one
    // done at once, one dead, one done at 10:40, one left queued.
    for (id, session) in [("a-old-done", "cli-a"), ("b-dead", "cli-b"), ("c-new-done", "cli-c"), ("d-queued", "cli-d")]
    {
        store.enqueue(job(id, id, &agent, session), now()).await.unwrap();
    }
    let claim = store.claim_next("w", now(), 60_000).await.unwrap().unwrap();
    assert_eq!(claim.job_ids(), ["a-old-done"]);
    assert!(store.complete(&claim.lease, &claim.job_ids(), now()).await.unwrap());
    let claim = store.claim_next("w", now(), 60_000).await.unwrap().unwrap();
    assert_eq!(claim.job_ids(), ["b-dead"]);
    let mut jitter = || 1.0;
    store.fail(&claim.lease, &claim.job_ids(), Failure::Internal, "boom", now(), &mut jitter).await.unwrap();
    clock.advance_ms(40 * 60_000);
    let claim = store.claim_next("w", now(), 60_000).await.unwrap().unwrap();
    assert_eq!(claim.job_ids(), ["c-new-done"]);
    assert!(store.complete(&claim.lease, &claim.job_ids(), now()).await.unwrap());

    // 10:59: within the hour, every key is held and every row stays.
    clock.advance_ms(19 * 60_000);
    assert_eq!(purge_expired_done(&state).await.unwrap(), 0);
    let again = store.enqueue(job("again", "a-old-done", &agent, "cli-a"), now()).await.unwrap();
    assert_eq!((again.job_id.as_str(), again.duplicate), ("a-old-done", true), "queue.dedup_ttl holds the key");

    // 11:01: the 10:00 done job's key expired, so its row goes; the 10:40
    // done job, the dead letter and the queued job stay.
    clock.advance_ms(2 * 60_000);
    assert_eq!(purge_expired_done(&state).await.unwrap(), 1);
    assert!(store.get_job("a-old-done").await.unwrap().is_none());
    for kept in ["c-new-done", "b-dead", "d-queued"] {
        assert!(store.get_job(kept).await.unwrap().is_some(), "{kept} must stay");
    }
    assert_eq!(purge_expired_done(&state).await.unwrap(), 0, "a second pass finds nothing");
    let reused = store.enqueue(job("again", "a-old-done", &agent, "cli-a"), now()).await.unwrap();
    assert_eq!((reused.job_id.as_str(), reused.duplicate), ("again", false), "an expired key is free");
}
