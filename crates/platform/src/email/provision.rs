//! Provisioning by email (SPEC §9): a mail to `start@{email.domain}` gets
//! its sender an agent of their own.
//!
//! Entry: the Resend webhook enqueues a notice addressed to start@ as a
//! `start` job (dedup `resend:{svix-id}:start`); the SMTP listener (or any
//! channel that receives the whole message) calls [`enqueue_start`]. The
//! payload is the `email` job's (`EmailJob`), so fetching and checking are
//! the email module's code: `load_message`, `loop_reason`, `authenticated`.
//!
//! Platform-level jobs. Every queue row names an agent, whose lease runs its
//! jobs one batch at a time. A `start` job names the *platform agent*
//! ([`platform_agent_id`]: `ag_` + the nil ULID, which no generated id can
//! be and which has no agent row). Its lease serialises every start request
//! across processes, so "does this sender have an agent?" and the hourly
//! count never race; the worker hands a claim of that agent to [`process`]
//! instead of running a turn. Deliveries the platform itself sends (the
//! welcome, the "you already have one" reply) carry the same id; `send`
//! writes them from `start@{email.domain}`.
//!
//! The job, under that lease: fetch; drop loops (automated mail, mail from
//! any agent or reserved address); drop senders outside `provisioning.allow`
//! (empty: self-provisioning is off) and senders that fail SPEC §8
//! authentication; answer a sender who already owns agents with their
//! addresses; refuse beyond `provisioning.per_hour_max`; else create the user
//! and the agent (generated name, allowed sender = the requester, SPEC §5
//! layout with MEMORY.md, and `outbox/email/hello.json`, all written before
//! the agent row), record the welcome delivery (`welcome:{job}`), and enqueue
//! an `outbox` job (`hello:{agent_id}`) so the agent's worker sends the hello
//! through the normal outbox processing before any message reached it.
//!
//! Crash safety: the new agent's id is derived from the job id
//! (`ag_{job_id}`). A retried job that finds that agent row resumes after
//! creation (allowed sender, welcome, outbox job: each idempotent by key); a
//! job that crashed between storage and row finds only the folder, which
//! `create_agent_seeded` replaces (storage before row: a folder without a
//! row is its own orphan). So a retry creates one agent and one welcome.
//!
//! The hourly bound counts the platform's own deliveries (welcomes and
//! "you already have one" replies) created in the last hour, in the delivery
//! table: durable and shared by every process. Refused requests get no
//! answer, so the bound also caps what start@ sends.
//!
//! This module never writes an existing agent's prefix: the hello file is
//! seeded before the agent row exists, and the agent's own worker sends it.

use serde_json::json;
use tinyfat_core::sender::{SenderIdentity, is_allowed};
use tinyfat_core::{AgentId, AgentName, EmailAddress, SenderPattern, SessionId};
use tinyfat_runtime::Conversation;
use tinyfat_store::{Agent, Claim, Failure, Job, JobOutcome, NewDelivery, NewJob, Outcome};

use super::{EmailJob, EmailThread, JobEnvelope, PrepareError, authenticated, load_message, loop_reason};
use crate::provision::CreateAgent;
use crate::state::AppState;

/// A request to start an agent: a mail to start@, waiting to be fetched.
pub const JOB_KIND_START: &str = "start";
/// Send the agent's pending outbox files; no turn.
pub const JOB_KIND_OUTBOX: &str = "outbox";
/// The local part of the provisioning address.
pub const START_LOCAL_PART: &str = "start";
/// The window `provisioning.per_hour_max` counts over.
const HOUR_MS: i64 = 3_600_000;
/// The seeded hello file, in `outbox/email/`.
const HELLO_PATH: &str = "outbox/email/hello.json";
/// The display name of mail the platform sends itself.
pub const PLATFORM_DISPLAY_NAME: &str = "tinyfat";

/// The queue's agent for platform-level jobs: `ag_` + the nil ULID. No agent
/// row has it (`Ulid::new()` never yields it), so it is never resolved,
/// leased for a turn, or deleted.
pub fn platform_agent_id() -> AgentId {
    AgentId::from_ulid(ulid::Ulid::nil())
}

/// `start@{email.domain}`.
pub fn start_address(domain: &str) -> Option<EmailAddress> {
    EmailAddress::parse(&format!("{START_LOCAL_PART}@{domain}")).ok()
}

pub fn is_start_address(domain: &str, address: &EmailAddress) -> bool {
    address.local_part().eq_ignore_ascii_case(START_LOCAL_PART) && address.domain().eq_ignore_ascii_case(domain)
}

/// The startup line: whether start@ provisions, for whom, how often.
pub fn log_startup(settings: &crate::config::Settings) {
    let provisioning = &settings.provisioning;
    if provisioning.allow.is_empty() {
        tracing::info!("provisioning by email: off (set provisioning.allow to addresses or @domains to turn it on)");
    } else {
        tracing::info!(
            "provisioning by email: start@{} creates agents for {} (provisioning.per_hour_max {} per hour)",
            settings.email.domain,
            provisioning.allow.join(", "),
            provisioning.per_hour_max
        );
    }
}

/// Enqueues a mail to start@ that a channel received whole (SMTP listener,
/// IMAP poller). The checks run in the job. Returns whether it was new
/// (false: the dedup key was seen). Acknowledge the message only after `Ok`.
pub async fn enqueue_start(
    state: &AppState,
    raw: &[u8],
    envelope: Option<JobEnvelope>,
    dedup_key: String,
) -> anyhow::Result<bool> {
    let domain = &state.platform.settings.email.domain;
    let recipient = start_address(domain)
        .ok_or_else(|| anyhow::anyhow!("email.domain {domain:?} gives no valid start@ address"))?;
    let provider = if envelope.is_some() { "smtp" } else { "raw" };
    let header = tinyfat_channels::email::inbound::parse(raw, &super::inbound_limits(state)).ok();
    let job = super::RawJob {
        kind: JOB_KIND_START,
        recipient: &recipient,
        provider,
        raw,
        header: header.as_ref(),
        envelope,
        dedup_key,
        stopped_turn: false,
    };
    let enqueued = super::enqueue_raw(state, &platform_agent_id(), job).await?;
    tracing::info!(job = %enqueued.job_id, duplicate = enqueued.duplicate, "start email enqueued");
    Ok(!enqueued.duplicate)
}

/// Runs a claim of the platform agent (the worker's hook): each `start`
/// job, then one `finish` under the lease. A lost lease commits nothing.
pub async fn process(state: &AppState, claim: Claim) {
    let platform = &state.platform;
    let store = &platform.store;
    let lease = claim.lease;
    let mut outcomes = Vec::new();
    for job in &claim.jobs {
        if !store.renew(&lease, platform.now_ms(), crate::worker::LEASE_MS).await.unwrap_or(false) {
            tracing::warn!("lost the provisioning lease; another worker will run the start jobs");
            return;
        }
        let outcome = if job.kind == JOB_KIND_START {
            match run_start(state, job).await {
                Ok(()) => Outcome::Done,
                Err((failure, error)) => {
                    tracing::warn!(job = %job.id, ?failure, error = %error, "start email failed");
                    Outcome::Failed { failure, error }
                }
            }
        } else {
            Outcome::Failed { failure: Failure::Permanent, error: format!("the platform runs no {} jobs", job.kind) }
        };
        outcomes.push(JobOutcome { job_id: job.id.clone(), outcome });
    }
    let mut jitter = || rand::random::<f64>();
    if store.finish(&lease, &outcomes, platform.now_ms(), &mut jitter).await.ok().flatten().is_none() {
        tracing::warn!("lost the provisioning lease before completion; the start jobs will run again");
    }
    state.deliveries_wake.notify_one();
}

/// `Err`: how the queue should treat the failure, and why.
pub type StartResult = Result<(), (Failure, String)>;

fn prepare_failure(e: PrepareError) -> (Failure, String) {
    match e {
        PrepareError::Transient(m) => (Failure::Transient, m),
        PrepareError::Permanent(m) => (Failure::Permanent, m),
    }
}

fn internal(e: impl std::fmt::Display) -> (Failure, String) {
    (Failure::Internal, e.to_string())
}

/// One start request (see the module header for the order and why). The
/// worker runs it under the platform agent's lease; running it again for the
/// same job (a retry after a crash) repeats nothing.
pub async fn run_start(state: &AppState, job: &Job) -> StartResult {
    let platform = &state.platform;
    let store = &platform.store;
    let settings = &platform.settings;
    let meta: EmailJob = serde_json::from_str(&job.payload)
        .map_err(|e| (Failure::Permanent, format!("unreadable start job payload: {e}")))?;
    let (raw, email) = load_message(state, &meta).await.map_err(prepare_failure)?;
    if let Some(reason) = loop_reason(state, &email).await.map_err(prepare_failure)? {
        tracing::info!(from = %email.from, reason = %reason, "start email not answered (loop)");
        return Ok(());
    }
    let rules: Vec<SenderPattern> = settings
        .provisioning
        .allow
        .iter()
        .filter_map(|rule| match SenderPattern::parse(rule) {
            Ok(pattern) => Some(pattern),
            Err(e) => {
                tracing::warn!(rule = %rule, error = %e, "provisioning.allow entry ignored");
                None
            }
        })
        .collect();
    if rules.is_empty() {
        tracing::warn!(from = %email.from, "start email dropped: self-provisioning is off (provisioning.allow is empty)");
        return Ok(());
    }
    if !is_allowed(&rules, &SenderIdentity::Email(email.from.clone())) {
        state.metrics.rejected_senders_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(from = %email.from, "start email dropped: the sender does not match provisioning.allow");
        return Ok(());
    }
    if !authenticated(state, raw.as_deref(), meta.envelope.as_ref(), None, &email, START_LOCAL_PART).await {
        return Ok(());
    }
    let requester = email.from.clone();
    let thread = EmailThread::from_inbound(&email);

    // A retry of a job that already created its agent resumes after creation.
    let id = AgentId::parse(&format!("ag_{}", job.id))
        .map_err(|e| (Failure::Permanent, format!("start job id is not a ULID: {e}")))?;
    if let Some(agent) = store.agent_by_id(&id).await.map_err(internal)? {
        return finish_new_agent(state, job, &agent, &requester, &thread).await;
    }

    let owned = match store.user_by_email(&requester).await.map_err(internal)? {
        Some(user) => store.list_agents(Some(&user.id)).await.map_err(internal)?,
        None => Vec::new(),
    };
    if !within_hourly_bound(state).await? {
        tracing::warn!(
            from = %requester,
            per_hour_max = settings.provisioning.per_hour_max,
            "start email refused: provisioning.per_hour_max start requests were answered in the last hour"
        );
        return Ok(());
    }
    if !owned.is_empty() {
        let names: Vec<String> = owned.iter().map(|a| a.name.to_string()).collect();
        tracing::info!(from = %requester, agents = %names.join(", "), "start email from an owner: answered with the existing address");
        return record_platform_reply(state, job, &requester, &thread, "existing", existing_text(&owned)).await;
    }

    let hello =
        |name: &AgentName, address: &EmailAddress| vec![(HELLO_PATH.to_owned(), hello_file(name, address, &requester))];
    let request = CreateAgent { owner: requester.clone(), name: None, model: None };
    let agent = platform.create_agent_seeded(request, id, &hello).await.map_err(internal)?;
    tracing::info!(agent = %agent.name, email = %agent.email, owner = %requester, "agent provisioned by email");
    finish_new_agent(state, job, &agent, &requester, &thread).await
}

/// After the agent row: its allowed sender, the welcome, the hello's send.
/// Each step is idempotent, so a retry may run them all again.
async fn finish_new_agent(
    state: &AppState,
    job: &Job,
    agent: &Agent,
    requester: &EmailAddress,
    thread: &EmailThread,
) -> StartResult {
    let platform = &state.platform;
    let store = &platform.store;
    let now = platform.now_ms();
    store.add_sender(&agent.id, &SenderPattern::Email(requester.clone()), now).await.map_err(internal)?;
    record_platform_reply(state, job, requester, thread, "welcome", welcome_text(agent, requester)).await?;
    let outbox = NewJob {
        id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
        dedup_key: format!("hello:{}", agent.id),
        agent_id: agent.id.clone(),
        session: SessionId::parse("outbox-email").expect("a valid session id"),
        kind: JOB_KIND_OUTBOX.into(),
        payload: "{}".into(),
    };
    let enqueued = store.enqueue(outbox, now).await.map_err(internal)?;
    if !enqueued.duplicate {
        state.wake.notify_one();
    }
    Ok(())
}

/// Records a reply from start@ to the request, threaded under it, keyed
/// `{kind}:{job}` before anything is sent.
async fn record_platform_reply(
    state: &AppState,
    job: &Job,
    requester: &EmailAddress,
    thread: &EmailThread,
    kind: &str,
    text: String,
) -> StartResult {
    let conversation = Conversation { channel: "email".into(), to: Some(requester.to_string()) };
    let new = NewDelivery {
        id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
        idempotency_key: format!("{kind}:{}", job.id),
        agent_id: platform_agent_id(),
        job_id: Some(job.id.clone()),
        channel: "email".into(),
        target: serde_json::to_string(&conversation).expect("serialisable"),
        body: json!({"text": text, "attachments": [], "email": thread}).to_string(),
        by_stream: false,
    };
    state.platform.store.insert_delivery(&new, state.platform.now_ms()).await.map_err(internal)?;
    state.deliveries_wake.notify_one();
    Ok(())
}

/// Whether another start request may be answered this hour.
async fn within_hourly_bound(state: &AppState) -> Result<bool, (Failure, String)> {
    let platform = &state.platform;
    let max = platform.settings.provisioning.per_hour_max;
    if max == 0 {
        return Ok(false);
    }
    let since = platform.now_ms() - HOUR_MS;
    let recent = platform.store.deliveries_for(&platform_agent_id(), max).await.map_err(internal)?;
    Ok(recent.iter().filter(|d| d.created_ms > since).count() < max as usize)
}

fn welcome_text(agent: &Agent, requester: &EmailAddress) -> String {
    format!(
        "Welcome to tinyfat!\n\n\
         Your agent **{name}** is ready. Its address is {address}: write to it there and it answers by email. \
         It remembers what matters in its MEMORY.md and can run scheduled tasks for you.\n\n\
         For now only you ({requester}) can reach it. {name} will say hello in a separate email.\n",
        name = agent.name,
        address = agent.email,
    )
}

fn existing_text(agents: &[Agent]) -> String {
    let list: Vec<String> = agents.iter().map(|a| format!("- {} at {}", a.name, a.email)).collect();
    format!(
        "You already have an agent, so no new one was created:\n\n{}\n\nWrite to it at that address.\n",
        list.join("\n")
    )
}

/// The agent's hello, as an outbox file (SPEC §5).
fn hello_file(name: &AgentName, address: &EmailAddress, owner: &EmailAddress) -> Vec<u8> {
    let body = format!(
        "Hi! I am {name}, your new assistant.\n\n\
         Reply to this email (or write to {address} any time) and tell me what you would like help with. \
         I keep notes about you and ongoing work in my memory, and I can remind you of things on a schedule."
    );
    serde_json::to_vec_pretty(&json!({
        "to": [owner.to_string()],
        "subject": format!("Hello from {name}"),
        "body": body,
    }))
    .expect("serialisable")
}
