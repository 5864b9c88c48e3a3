//! The common inbound path (`AppState::ingest`) against a real SQLite data
//! folder, with a second `Platform` on the same folder standing for another
//! process (a `tinyfat agent allow` / `deny` run while `serve` is up): the
//! in-memory catalog cache never admits a sender that process removed, and
//! never rejects one it added.

use std::path::Path;
use std::sync::Arc;

use tinyfat_core::sender::SenderIdentity;
use tinyfat_core::{EmailAddress, SenderPattern, SessionId};
use tinyfat_platform::Platform;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::inbound::{Ingest, IngestOutcome, MessageJob};
use tinyfat_platform::provision::CreateAgent;
use tinyfat_platform::state::AppState;
use tinyfat_runtime::InboundMessage;
use tinyfat_store::Agent;

fn settings(dir: &Path) -> Settings {
    let env = [("TINYFAT_SANDBOX_MODE".to_owned(), "none".to_owned())].into_iter().collect();
    Settings::load(&Sources { data_dir: Some(dir.to_owned()), env, ..Sources::default() }).unwrap()
}

fn message(from: &str, key: &str) -> Ingest {
    Ingest {
        dedup_key: key.to_owned(),
        session: SessionId::parse("web-main").unwrap(),
        sender: SenderIdentity::Email(EmailAddress::parse(from).unwrap()),
        job: MessageJob {
            message: InboundMessage {
                channel: "web".into(),
                sender: from.into(),
                text: "hello".into(),
                received_at: chrono::Utc::now(),
                untrusted: vec![],
            },
            conversation: None,
            run_key: None,
        },
    }
}

async fn jobs(platform: &Platform, agent: &Agent) -> usize {
    platform.store.jobs_for(&agent.id, 100).await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senders_changed_by_another_process_take_effect_at_the_next_message() {
    let dir = tempfile::tempdir().unwrap();
    let serve = AppState::new(Arc::new(Platform::open(settings(dir.path())).await.unwrap()));
    let cli = Platform::open(settings(dir.path())).await.unwrap();
    let owner = EmailAddress::parse("ann@example.com").unwrap();
    let created = serve.platform.create_agent(CreateAgent { owner, name: Some("helper".into()), model: None }).await;
    let agent = serve.ingest_agent("helper").await.unwrap();
    assert_eq!(agent.id, created.unwrap().id);

    let first = serve.ingest(&agent, message("ann@example.com", "k1")).await.unwrap();
    assert!(matches!(first, IngestOutcome::Enqueued { duplicate: false, .. }), "{first:?}");
    assert_eq!(serve.ingest(&agent, message("bob@example.com", "k2")).await.unwrap(), IngestOutcome::Rejected);

    // The other process admits bob and removes every rule that admits ann.
    cli.store.add_sender(&agent.id, &SenderPattern::parse("bob@example.com").unwrap(), 1).await.unwrap();
    for rule in cli.store.list_senders(&agent.id).await.unwrap() {
        if rule.to_string().contains("ann") {
            cli.store.remove_sender(&agent.id, &rule).await.unwrap();
        }
    }
    assert_eq!(serve.ingest(&agent, message("ann@example.com", "k3")).await.unwrap(), IngestOutcome::Rejected);
    let bob = serve.ingest(&agent, message("bob@example.com", "k4")).await.unwrap();
    assert!(matches!(bob, IngestOutcome::Enqueued { duplicate: false, .. }), "{bob:?}");
    assert_eq!(jobs(&serve.platform, &agent).await, 2, "ann's first message and bob's");

    // Deleted by the other process: the cached agent admits nothing.
    cli.store.delete_agent(&agent.id).await.unwrap();
    let gone = serve.ingest(&agent, message("bob@example.com", "k5")).await;
    assert!(gone.is_err(), "{gone:?}");
    assert!(serve.ingest_agent("helper").await.is_err());
    assert_eq!(jobs(&serve.platform, &agent).await, 0);
}
