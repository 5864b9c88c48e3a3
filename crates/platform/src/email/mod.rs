//! The email channel's platform side (SPEC §8, §5 outbox, §9): inbound
//! routes and listeners, the outbox, and sending deliveries.
//!
//! Hooks the worker, the delivery loop and `serve` call:
//! - `routes`: `POST /webhooks/resend`.
//! - `prepare_email_job`: under the lease, turn an `email` job (a verified
//!   Resend notice) into a message job in the mail's thread session.
//! - `process_outbox`: under the lease, after each turn and first when a job
//!   is retried.
//! - `send`: deliver one `email` row of the delivery table.
//! - `start`: the SMTP listener (`smtp_listener`, bound by `serve` first so
//!   a bad address or certificate stops startup) and IMAP pollers.
//! - `provision`: mail to `start@{email.domain}` (SPEC §9), as `start` jobs
//!   of the platform agent; `provision::enqueue_start` for whole messages.
//!
//! Inbound flow (Resend): the webhook is verified (Svix) over the raw body
//! before anything is parsed; a bad or missing signature answers 401 and
//! enqueues nothing. An `email.received` notice is resolved to the agents it
//! was addressed to and enqueued as an `email` job (dedup `resend:{svix-id}`;
//! further agents of the same notice `resend:{svix-id}:{agent_id}`; start@
//! as a `start` job, `resend:{svix-id}:start`), and the webhook is
//! acknowledged only after that commit. A notice for no known agent (and
//! not for start@) is acknowledged (200) and dropped with a log line: the agent is
//! named by the address, not by a URL id, and a 4xx would only make Resend
//! retry for a day. Other event types are acknowledged and ignored.
//!
//! The `email` job runs under the agent's lease (`prepare_email_job`): it
//! fetches the message from Resend (`GET /emails/receiving/{id}`, and the
//! raw MIME when Resend offers it), checks the sender (allowed senders,
//! DMARC via `tinyfat_channels::email::auth` on the raw message, else refused
//! unless `email.require_auth = false`; loops dropped — `load_message`,
//! `loop_reason` and `authenticated` are shared with `start` jobs), saves attachments
//! under `attachments/{date}/{job}-{filename}`, then enqueues a `message`
//! job in the mail's thread session with the dedup key
//! `email:{agent_id}:{Message-ID}` and completes. Forwarding (rather than
//! answering in the `email` job) is what puts the turn in the right session:
//! the thread root is known only after the fetch, and the queue batches by
//! session. The forwarded payload is a `MessageJob` plus an `email` field
//! (the parent's Message-ID, References, subject and quote) that `send`
//! reads back through the delivery's `job_id` so the reply threads.
//!
//! Outbox (SPEC §5): files are claimed by rename into `outbox/sending/`,
//! recorded as a delivery row (`outbox:{delivery_id}`) and sent inline under
//! the lease (not by the delivery loop) so the file can be filed in `sent/`
//! or `failed/` right after. A crash after the send and before the move
//! leaves the file in `sending/`; the next run finds the row (sent: just
//! file it) or resends it under the same delivery id, so Resend dedups it by
//! `Idempotency-Key: {agent_id}:{delivery_id}` (at-least-once for SMTP).
//!
//! SMTP (`smtp_send`): the Message-ID `<{delivery_id}@{email.domain}>` is
//! the key; a delivery left `sending` by a crash, or whose 250 was lost, is
//! resent with the same Message-ID (at-least-once; receivers dedup by it).
//!
//! Replies (`replies`): email deliveries other than outbox files are sent
//! inline under the lease right after the turn, and filed in `outbox/sent/`
//! (or `failed/`) by the run that finds them settled.

mod replies;
mod smtp_send;

pub mod imap;

pub mod provision;

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tinyfat_channels::email::auth::{AuthVerdict, Authenticator, SenderAuthenticator, SmtpEnvelope};
use tinyfat_channels::email::inbound::{self, InboundEmail, InboundLimits, LoopReason};
use tinyfat_channels::email::outbound::{self, Draft, Mailbox, OutboundAttachment, Parent, Quote};
use tinyfat_channels::email::resend::{self, Disposition, ResendEvent};
use tinyfat_channels::email::{outbox_file, svix};
use tinyfat_core::sender::{SenderIdentity, is_allowed};
use tinyfat_core::{AgentConfig, EmailAddress, SessionId};
use tinyfat_runtime::Conversation;
use tinyfat_storage::{EntryKind, FileError, RelPath, Workspace};
use tinyfat_store::{Agent, Delivery, DeliveryState, Job, Lease, NewDelivery, NewJob};
use tokio::sync::watch;

use crate::inbound::{JOB_KIND_MESSAGE, MessageJob};
use crate::state::AppState;

pub mod smtp_listener;

/// The job kind of a verified Resend notice, waiting to be fetched.
pub const JOB_KIND_EMAIL: &str = "email";
/// Largest raw message or API response read from Resend.
const FETCH_BYTES_MAX: usize = 40 << 20;
/// Largest quote carried in a job payload for the reply.
const QUOTE_BYTES_MAX: usize = 64 * 1024;
/// Largest attachment file read from agent storage for sending.
const ATTACHMENT_FILE_BYTES_MAX: u64 = 20 << 20;
/// Outbox files taken per run (the rest wait for the next run).
const OUTBOX_FILES_PER_RUN_MAX: usize = 50;
/// Longest `retry-after` waited for inline (outbox, under the lease).
const INLINE_RETRY_WAIT_MAX: Duration = Duration::from_secs(10);
const INLINE_ATTEMPTS_MAX: u32 = 3;
/// Per request; the worker renews its 30 s lease every 10 s.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a send failed: retry later, or give up with the provider's error.
#[derive(Debug)]
pub enum SendError {
    Transient { error: String, retry_after_ms: Option<i64> },
    Permanent(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transient { error, .. } | Self::Permanent(error) => f.write_str(error),
        }
    }
}

/// Why preparing an `email` job failed: retry it (Resend 429/5xx, network),
/// or give up.
#[derive(Debug, PartialEq, Eq)]
pub enum PrepareError {
    Transient(String),
    Permanent(String),
}

impl PrepareError {
    pub fn message(&self) -> &str {
        match self {
            Self::Transient(m) | Self::Permanent(m) => m,
        }
    }
}

/// The payload of an `email` job: the verified webhook's metadata.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmailJob {
    pub provider: String,
    pub svix_id: String,
    pub email_id: String,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub message_id: Option<String>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    /// The whole message, base64, when the channel received it itself (SMTP
    /// listener, IMAP poller): nothing to fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_b64: Option<String>,
    /// The SMTP envelope the message arrived with (SPF is checked on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope: Option<JobEnvelope>,
    /// A `stop` that cancelled the agent's running turn as it arrived,
    /// before the queue (SPEC §6): the stopped turn answers `Stopped.`, so
    /// this job answers nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped_turn: bool,
}

/// The SMTP session facts of a message our own listener received.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobEnvelope {
    pub client_ip: std::net::IpAddr,
    pub helo: String,
    /// MAIL FROM without brackets; empty for the null sender.
    pub mail_from: String,
}

/// Enqueues a message the platform received whole (SMTP, IMAP) as an `email`
/// job for `agent`; the sender checks run in the job, under the lease, like
/// Resend's. One exception skips the queue (SPEC §6): a `stop` from an
/// allowed, authenticated sender cancels the agent's running turn first
/// (the job, queued behind that turn, then answers nothing). Returns
/// whether it was new (false: the dedup key was seen). The caller
/// acknowledges the message only after this returns `Ok`.
pub async fn enqueue_raw_email(
    state: &AppState,
    agent: &Agent,
    recipient: &EmailAddress,
    provider: &str,
    raw: &[u8],
    envelope: Option<JobEnvelope>,
    dedup_key: String,
) -> anyhow::Result<bool> {
    // Parsed once, for the stop check and the job's header fields.
    let header = inbound::parse(raw, &inbound_limits(state)).ok();
    let stopped_turn = match &header {
        Some(email) => stop_before_queue(state, agent, provider, raw, envelope.as_ref(), email).await,
        None => false,
    };
    let raw_job = RawJob {
        kind: JOB_KIND_EMAIL,
        recipient,
        provider,
        raw,
        header: header.as_ref(),
        envelope,
        dedup_key,
        stopped_turn,
    };
    let enqueued = enqueue_raw(state, &agent.id, raw_job).await?;
    tracing::info!(agent = %agent.name, provider, job = %enqueued.job_id, duplicate = enqueued.duplicate, "inbound email enqueued");
    Ok(!enqueued.duplicate)
}

/// A message received whole, to enqueue as a job (`enqueue_raw`).
pub(crate) struct RawJob<'a> {
    /// `email`, or `start` for the platform.
    pub kind: &'a str,
    pub recipient: &'a EmailAddress,
    pub provider: &'a str,
    pub raw: &'a [u8],
    /// `raw` parsed with `inbound_limits` (`None`: unreadable; the job
    /// reports it), for the session id and the job's header fields.
    pub header: Option<&'a InboundEmail>,
    pub envelope: Option<JobEnvelope>,
    pub dedup_key: String,
    pub stopped_turn: bool,
}

/// Whether `email` is a `stop` (the first line above the quote) from a
/// sender the job's own checks would admit. A refusal or a store error is
/// false: the job then handles the mail as usual.
async fn is_admitted_stop(
    state: &AppState,
    agent: &Agent,
    provider: &str,
    raw: Option<&[u8]>,
    envelope: Option<&JobEnvelope>,
    email: &InboundEmail,
) -> bool {
    command_of(email) == Some(Command::Stop)
        && matches!(sender_admitted(state, agent, provider, raw, envelope, email).await, Ok(true))
}

/// `stop` by mail skips the queue (SPEC §6): when `raw` is an admitted
/// `stop`, cancels the agent's running turn now. True when a turn was asked
/// to stop. Anything else is false and left to the job.
async fn stop_before_queue(
    state: &AppState,
    agent: &Agent,
    provider: &str,
    raw: &[u8],
    envelope: Option<&JobEnvelope>,
    email: &InboundEmail,
) -> bool {
    if !is_admitted_stop(state, agent, provider, Some(raw), envelope, email).await {
        return false;
    }
    match state.stop_running_turn(agent).await {
        Ok(stopped) => {
            tracing::info!(agent = %agent.name, provider, stopped, "stop by email, before the queue");
            stopped
        }
        Err(error) => {
            tracing::warn!(agent = %agent.name, %error, "stop by email could not reach the running turn");
            false
        }
    }
}

/// Enqueues a whole message as a job of `job.kind` carrying it base64 in an
/// `EmailJob`.
pub(crate) async fn enqueue_raw(
    state: &AppState,
    agent_id: &tinyfat_core::AgentId,
    job: RawJob<'_>,
) -> anyhow::Result<tinyfat_store::Enqueued> {
    use base64::Engine as _;
    let RawJob { kind, recipient, provider, raw, header, envelope, dedup_key, stopped_turn } = job;
    let message_id = header.as_ref().map(|e| e.message_id.clone());
    let session_root = message_id.clone().unwrap_or_else(|| dedup_key.clone());
    let payload = EmailJob {
        provider: provider.to_owned(),
        svix_id: String::new(),
        email_id: String::new(),
        from: header.as_ref().map(|e| e.from.to_string()),
        to: recipient.to_string(),
        subject: header.as_ref().map(|e| e.subject.clone()).unwrap_or_default(),
        message_id,
        created_at: None,
        raw_b64: Some(base64::engine::general_purpose::STANDARD.encode(raw)),
        envelope,
        stopped_turn,
    };
    let job = NewJob {
        id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
        dedup_key,
        agent_id: agent_id.clone(),
        session: inbound::session_id_for_root(&session_root),
        kind: kind.into(),
        payload: serde_json::to_string(&payload).expect("serialisable"),
    };
    let enqueued = state.platform.store.enqueue(job, state.platform.now_ms()).await?;
    if !enqueued.duplicate {
        state.wake.notify_one();
    }
    Ok(enqueued)
}

/// What a forwarded message job carries besides the `MessageJob` fields:
/// the parent of the reply (SPEC §8: replies thread and quote).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EmailThread {
    pub message_id: String,
    #[serde(default)]
    pub references: Vec<String>,
    #[serde(default)]
    pub subject: String,
    /// `Name <addr>` or the address, for the quote's attribution.
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub date: Option<DateTime<Utc>>,
    /// The message text to quote (cut to 64 KiB).
    #[serde(default)]
    pub quote: String,
}

impl EmailThread {
    fn from_inbound(email: &InboundEmail) -> Self {
        let from = match &email.from_name {
            Some(name) => format!("{name} <{}>", email.from),
            None => email.from.to_string(),
        };
        let mut quote = email.text.clone();
        if quote.len() > QUOTE_BYTES_MAX {
            let mut cut = QUOTE_BYTES_MAX;
            while !quote.is_char_boundary(cut) {
                cut -= 1;
            }
            quote.truncate(cut);
        }
        Self {
            message_id: email.message_id.clone(),
            references: email.references.clone(),
            subject: email.subject.clone(),
            from,
            date: email.date,
            quote,
        }
    }

    fn parent(&self) -> Parent {
        Parent {
            message_id: self.message_id.clone(),
            references: self.references.clone(),
            subject: self.subject.clone(),
            quote: Some(Quote { from: self.from.clone(), date: self.date, text: self.quote.clone() }),
        }
    }
}

/// A message job's payload as this module writes it: `MessageJob`'s fields
/// plus `email` (readers of `MessageJob` ignore the extra field).
#[derive(Debug, Serialize, Deserialize)]
struct EmailMessagePayload {
    #[serde(flatten)]
    job: MessageJob,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<EmailThread>,
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/webhooks/resend", post(resend_webhook))
}

// ---------------------------------------------------------------------------
// Inbound: the webhook.

fn text(status: StatusCode, body: &str) -> (StatusCode, String) {
    (status, body.to_owned())
}

/// `POST /webhooks/resend`.
/// One job a Resend notice becomes: an `email` job per agent addressed, and
/// a `start` job of the platform agent for a provisioning request.
struct Target<'a> {
    agent_id: tinyfat_core::AgentId,
    name: &'a str,
    kind: &'static str,
    dedup_key: String,
    recipient: &'a EmailAddress,
    /// The agent of an `email` job, for its stop check after the ack.
    agent: Option<&'a Agent>,
}

async fn resend_webhook(State(state): State<AppState>, headers: HeaderMap, body: Body) -> (StatusCode, String) {
    let settings = &state.platform.settings;
    let cap = settings.gateway.email_body_bytes_max as usize;
    let Ok(body) = axum::body::to_bytes(body, cap).await else {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large");
    };
    let Some(secret) = settings.email.resend_webhook_secret.as_ref() else {
        tracing::warn!("resend webhook refused: email.resend_webhook_secret (RESEND_WEBHOOK_SECRET) is not set");
        return text(StatusCode::UNAUTHORIZED, "webhook signature cannot be verified");
    };
    let secrets: Vec<svix::WebhookSecret> =
        secret.expose().split_ascii_whitespace().filter_map(|s| svix::WebhookSecret::parse(s).ok()).collect();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let svix_headers = svix::SvixHeaders {
        id: header(svix::HEADER_ID),
        timestamp: header(svix::HEADER_TIMESTAMP),
        signature: header(svix::HEADER_SIGNATURE),
    };
    let now_s = state.platform.now_ms().div_euclid(1000);
    let verified = match svix::verify(&secrets, &svix_headers, &body, now_s) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "resend webhook with a bad signature refused");
            return text(StatusCode::UNAUTHORIZED, "bad signature");
        }
    };
    let notice = match resend::parse_webhook(&body) {
        Ok(ResendEvent::EmailReceived(notice)) => notice,
        Ok(ResendEvent::Other(kind)) => {
            tracing::debug!(kind = %kind, "resend webhook event ignored");
            return text(StatusCode::OK, "ignored");
        }
        Err(e) => {
            tracing::warn!(error = %e, "resend webhook body refused");
            return text(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    let store = &state.platform.store;
    let mut agents: Vec<(Agent, EmailAddress)> = Vec::new();
    for recipient in &notice.recipients {
        match store.agent_by_email(recipient).await {
            Ok(Some(agent)) if !agents.iter().any(|(a, _)| a.id == agent.id) => agents.push((agent, recipient.clone())),
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "resolving a resend recipient failed; asking Resend to retry");
                return text(StatusCode::SERVICE_UNAVAILABLE, "try again");
            }
        }
    }
    // A notice to start@ is a provisioning request (SPEC §9), a job of the
    // platform agent (see `provision`).
    let start = notice.recipients.iter().find(|r| provision::is_start_address(&settings.email.domain, r));
    if agents.is_empty() && start.is_none() {
        let to: Vec<String> = notice.recipients.iter().map(ToString::to_string).collect();
        tracing::warn!(to = %to.join(", "), email_id = %notice.email_id, "inbound email for no known agent dropped");
        return text(StatusCode::OK, "no such agent; dropped");
    }
    let session_root = notice.message_id.clone().unwrap_or_else(|| format!("resend-{}", notice.email_id));
    let session = inbound::session_id_for_root(&session_root);
    let mut targets: Vec<Target> = agents
        .iter()
        .enumerate()
        .map(|(i, (agent, recipient))| Target {
            agent_id: agent.id.clone(),
            name: agent.name.as_str(),
            kind: JOB_KIND_EMAIL,
            dedup_key: if i == 0 { verified.dedup_key() } else { format!("{}:{}", verified.dedup_key(), agent.id) },
            recipient,
            agent: Some(agent),
        })
        .collect();
    if let Some(start) = start {
        targets.push(Target {
            agent_id: provision::platform_agent_id(),
            name: provision::START_LOCAL_PART,
            kind: provision::JOB_KIND_START,
            dedup_key: format!("{}:start", verified.dedup_key()),
            recipient: start,
            agent: None,
        });
    }
    let mut stop_checks = Vec::new();
    for Target { agent_id, name, kind, dedup_key, recipient, agent } in targets {
        let payload = EmailJob {
            provider: "resend".into(),
            svix_id: verified.id.clone(),
            email_id: notice.email_id.clone(),
            from: notice.from.as_ref().map(ToString::to_string),
            to: recipient.to_string(),
            subject: notice.subject.clone(),
            message_id: notice.message_id.clone(),
            created_at: notice.created_at,
            raw_b64: None,
            envelope: None,
            stopped_turn: false,
        };
        let job = NewJob {
            id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
            dedup_key,
            agent_id,
            session: session.clone(),
            kind: kind.into(),
            payload: serde_json::to_string(&payload).expect("serialisable"),
        };
        match store.enqueue(job, state.platform.now_ms()).await {
            Ok(enqueued) => {
                if !enqueued.duplicate {
                    state.wake.notify_one();
                    if let Some(agent) = agent {
                        stop_checks.push((agent.clone(), enqueued.job_id.clone(), payload));
                    }
                }
                tracing::info!(agent = %name, kind, job = %enqueued.job_id, duplicate = enqueued.duplicate, "inbound email enqueued");
            }
            Err(e) => {
                tracing::error!(error = %e, "enqueueing an inbound email failed; asking Resend to retry");
                return text(StatusCode::SERVICE_UNAVAILABLE, "try again");
            }
        }
    }
    for (agent, job_id, payload) in stop_checks {
        tokio::spawn(stop_after_ack(state.clone(), agent, job_id, payload));
    }
    text(StatusCode::OK, "ok")
}

/// `stop` through Resend skips the queue too (SPEC §6), right after the
/// ack: the webhook carries no body, so while a turn of the agent runs,
/// this fetches the message at once instead of when its job is claimed
/// (behind that turn). An admitted `stop` marks the still-queued job
/// `stopped_turn` and then cancels the turn, in that order, so the job can
/// never answer "Nothing is running." next to the turn's "Stopped."; if
/// the turn had already ended, the mark is taken back. Any failure, or a
/// job already claimed, leaves the mail to its job as usual.
async fn stop_after_ack(state: AppState, agent: Agent, job_id: String, mut meta: EmailJob) {
    let now = state.platform.now_ms();
    let running = state.runs.active(&agent.id).is_some()
        || state.platform.store.agent_status(&agent.id, now).await.is_ok_and(|s| s.running);
    if !running {
        return;
    }
    let Ok((raw, email)) = load_message(&state, &meta).await else { return };
    if !is_admitted_stop(&state, &agent, &meta.provider, raw.as_deref(), None, &email).await {
        return;
    }
    let store = &state.platform.store;
    meta.stopped_turn = true;
    let marked = serde_json::to_string(&meta).expect("serialisable");
    if !store.set_queued_payload(&job_id, &marked).await.unwrap_or(false) {
        return;
    }
    let stopped = state.stop_running_turn(&agent).await.unwrap_or(false);
    tracing::info!(agent = %agent.name, provider = "resend", stopped, "stop by email, before the queue");
    if !stopped {
        meta.stopped_turn = false;
        let unmarked = serde_json::to_string(&meta).expect("serialisable");
        if let Err(error) = store.set_queued_payload(&job_id, &unmarked).await {
            tracing::warn!(agent = %agent.name, job = %job_id, %error, "a stop mail may go unanswered");
        }
    }
}

// ---------------------------------------------------------------------------
// Inbound: the job.

fn http() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .expect("the HTTP client builds")
    })
}

/// The sender authenticator: the state's (tests), else the system DNS one,
/// built once; `None` when it cannot be set up.
fn authenticator(state: &AppState) -> Option<&dyn SenderAuthenticator> {
    if let Some(auth) = &state.sender_auth {
        return Some(auth.as_ref());
    }
    static AUTH: OnceLock<Option<Authenticator>> = OnceLock::new();
    AUTH.get_or_init(|| match Authenticator::system() {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::error!(error = %e, "email sender authentication is unavailable");
            None
        }
    })
    .as_ref()
    .map(|a| a as &dyn SenderAuthenticator)
}

fn base_url(state: &AppState) -> String {
    state.platform.settings.email.resend_base_url.trim_end_matches('/').to_owned()
}

/// The worker's hook (same contract as `scheduler::prepare_event_job`):
/// `Ok(None)` means the job is done — dropped (sender not allowed, a loop,
/// a duplicate Message-ID) or forwarded as a message job in its thread
/// session. Every failure is reported as a string; see
/// [`prepare_email_job_detailed`] to tell transient ones apart.
pub async fn prepare_email_job(state: &AppState, agent: &Agent, job: &Job) -> Result<Option<MessageJob>, String> {
    prepare_email_job_detailed(state, agent, job).await.map_err(|e| e.message().to_owned())
}

/// [`prepare_email_job`] with the failure's kind: `Transient` (Resend 429 or
/// 5xx, network) should map to `Failure::Transient`.
pub async fn prepare_email_job_detailed(
    state: &AppState,
    agent: &Agent,
    job: &Job,
) -> Result<Option<MessageJob>, PrepareError> {
    let Some((session, dedup_key, payload, command)) = fetch_and_check(state, agent, job).await? else {
        return Ok(None);
    };
    let store = &state.platform.store;
    // `stop` and `/status` are answered at once, threaded, without a turn.
    let answer = match command {
        // This job holds the agent's lease, so no turn of the agent runs
        // now. (A stop that arrived while one ran stopped it before the
        // queue: `enqueue_raw_email` for SMTP and IMAP, `stop_after_ack`
        // for Resend.)
        Some(Command::Stop) => Some("Nothing is running.".to_owned()),
        Some(Command::StoppedBeforeQueue) => {
            // The turn it stopped answers `Stopped.` in its own thread.
            tracing::info!(agent = %agent.name, job = %job.id, "stop by email already stopped the running turn");
            return Ok(None);
        }
        Some(Command::Status) => {
            Some(state.status_text(agent).await.map_err(|e| PrepareError::Transient(e.to_string()))?)
        }
        None => None,
    };
    if let Some(answer) = answer {
        let conversation = payload.job.conversation.clone().expect("email messages have a conversation");
        let new = NewDelivery {
            id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
            idempotency_key: format!("reply:{}", job.id),
            agent_id: agent.id.clone(),
            job_id: Some(job.id.clone()),
            channel: "email".into(),
            target: serde_json::to_string(&conversation).expect("serialisable"),
            body: json!({"text": answer, "attachments": [], "email": payload.email}).to_string(),
            by_stream: false,
        };
        let row = store
            .insert_delivery(&new, state.platform.now_ms())
            .await
            .map_err(|e| PrepareError::Transient(e.to_string()))?
            .delivery;
        // Sent now, under the lease (the delivery loop leaves new replies to
        // their worker for a moment); filed in outbox/sent/ by the next run.
        crate::deliver::deliver(state, &row).await;
        return Ok(None);
    }
    let new = NewJob {
        id: tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()),
        dedup_key,
        agent_id: agent.id.clone(),
        session,
        kind: JOB_KIND_MESSAGE.into(),
        payload: serde_json::to_string(&payload).expect("serialisable"),
    };
    let enqueued =
        store.enqueue(new, state.platform.now_ms()).await.map_err(|e| PrepareError::Transient(e.to_string()))?;
    if enqueued.duplicate {
        tracing::info!(agent = %agent.name, job = %job.id, "inbound email already received (same Message-ID); dropped");
    } else {
        state.wake.notify_one();
    }
    Ok(None)
}

/// A command that skips the turn (SPEC §6), from the first line above the quote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Stop,
    /// A `stop` that already cancelled the running turn as it arrived
    /// (`EmailJob::stopped_turn`): nothing left to answer.
    StoppedBeforeQueue,
    Status,
}

fn command_of(email: &InboundEmail) -> Option<Command> {
    if email.is_stop() {
        return Some(Command::Stop);
    }
    let first = email.reply.new_text.lines().map(str::trim).find(|l| !l.is_empty())?;
    first.eq_ignore_ascii_case("/status").then_some(Command::Status)
}

/// The sender checks of an inbound mail (SPEC §8), each refusal logged:
/// not a loop, an allowed sender, and authenticated (for IMAP, the mailbox
/// provider's verdict when it is from the configured authserv-id;
/// otherwise our own checks on `raw`).
async fn sender_admitted(
    state: &AppState,
    agent: &Agent,
    provider: &str,
    raw: Option<&[u8]>,
    envelope: Option<&JobEnvelope>,
    email: &InboundEmail,
) -> Result<bool, PrepareError> {
    if let Some(reason) = loop_reason(state, email).await? {
        tracing::info!(agent = %agent.name, from = %email.from, reason = %reason, "inbound email not answered (loop)");
        return Ok(false);
    }
    let rules =
        state.platform.store.list_senders(&agent.id).await.map_err(|e| PrepareError::Transient(e.to_string()))?;
    if !is_allowed(&rules, &email.sender()) {
        state.metrics.rejected_senders_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            agent = %agent.name,
            sender = %email.from,
            "email from a sender that is not allowed was dropped; to admit it run: tinyfat agent allow {} {}",
            agent.name,
            email.from
        );
        return Ok(false);
    }
    let trusted = match raw {
        Some(raw) => imap::trusted_verdict(state, agent, provider, raw).await,
        None => None,
    };
    Ok(authenticated(state, raw, envelope, trusted, email, agent.name.as_str()).await)
}

/// Fetches, parses and checks an `email` job's message; `None` drops it.
/// Returns the thread session, the Message-ID dedup key and the payload of
/// the message job to run.
async fn fetch_and_check(
    state: &AppState,
    agent: &Agent,
    job: &Job,
) -> Result<Option<(SessionId, String, EmailMessagePayload, Option<Command>)>, PrepareError> {
    let platform = &state.platform;
    let meta: EmailJob = serde_json::from_str(&job.payload)
        .map_err(|e| PrepareError::Permanent(format!("unreadable email job payload: {e}")))?;
    let (raw, email) = load_message(state, &meta).await?;
    if !sender_admitted(state, agent, &meta.provider, raw.as_deref(), meta.envelope.as_ref(), &email).await? {
        return Ok(None);
    }

    // Attachments into the agent's storage.
    let received_at =
        meta.created_at.unwrap_or_else(|| DateTime::from_timestamp_millis(platform.now_ms()).unwrap_or_default());
    let mut message = inbound::to_inbound_message(&email, received_at);
    if !email.attachments.is_empty() {
        let workspace =
            platform.storage.checkout(&agent.id).await.map_err(|e| PrepareError::Transient(e.to_string()))?;
        let date = received_at.format("%Y-%m-%d").to_string();
        let mut saved = Vec::new();
        for attachment in &email.attachments {
            let name = format!("{}-{}", job.id, inbound::sanitize_filename(&attachment.filename));
            let path = tinyfat_storage::validate_path(&format!("attachments/{date}/{name}"))
                .map_err(|e| PrepareError::Permanent(e.to_string()))?;
            workspace.dir.write_atomic(&path, &attachment.bytes).map_err(|e| PrepareError::Transient(e.to_string()))?;
            saved.push(format!("/data/{path}"));
        }
        platform.storage.commit(&workspace).await.map_err(|e| PrepareError::Transient(e.to_string()))?;
        message.text.push_str("\n\nSaved attachments:");
        for path in saved {
            message.text.push_str(&format!("\n- {path}"));
        }
    }

    let session = thread_session(state, agent, &email).await;
    let reply_to = email.reply_to.clone().unwrap_or_else(|| email.from.clone());
    let payload = EmailMessagePayload {
        job: MessageJob {
            message,
            conversation: Some(Conversation { channel: "email".into(), to: Some(reply_to.to_string()) }),
            run_key: None,
        },
        email: Some(EmailThread::from_inbound(&email)),
    };
    let command = match command_of(&email) {
        Some(Command::Stop) if meta.stopped_turn => Some(Command::StoppedBeforeQueue),
        command => command,
    };
    Ok(Some((session, email.dedup_key(&agent.id), payload, command)))
}

/// The message of an `email`-shaped job: the raw bytes it carries (SMTP,
/// IMAP), or fetched from Resend. The raw MIME is `None` when Resend offers
/// only its parsed JSON.
pub(crate) async fn load_message(
    state: &AppState,
    meta: &EmailJob,
) -> Result<(Option<Vec<u8>>, InboundEmail), PrepareError> {
    let limits = inbound_limits(state);
    match &meta.raw_b64 {
        Some(b64) => {
            use base64::Engine as _;
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| PrepareError::Permanent(format!("unreadable raw email in the job: {e}")))?;
            let email =
                inbound::parse(&raw, &limits).map_err(|e| PrepareError::Permanent(format!("unreadable email: {e}")))?;
            Ok((Some(raw), email))
        }
        None => fetch_from_resend(state, meta, &limits).await,
    }
}

/// The parser's limits for inbound mail, from the gateway settings.
pub(crate) fn inbound_limits(state: &AppState) -> InboundLimits {
    let message_bytes_max = state.platform.settings.gateway.email_body_bytes_max as usize;
    InboundLimits { message_bytes_max, ..InboundLimits::default() }
}

/// Why a mail must not be answered (SPEC §8 loops): automated mail, and mail
/// from any agent's own address or the platform's reserved ones (start@,
/// postmaster@, noreply@ ...). Other addresses at the same domain are
/// people: a self-hoster may share it.
pub(crate) async fn loop_reason(state: &AppState, email: &InboundEmail) -> Result<Option<LoopReason>, PrepareError> {
    let platform = &state.platform;
    let domain = &platform.settings.email.domain;
    let platform_address = email.from.domain().eq_ignore_ascii_case(domain)
        && tinyfat_core::names::RESERVED_NAMES.contains(&email.from.local_part().to_ascii_lowercase().as_str());
    let from_agent = platform_address
        || platform
            .store
            .agent_by_email(&email.from)
            .await
            .map_err(|e| PrepareError::Transient(e.to_string()))?
            .is_some();
    Ok(email.loop_reason(|a| a == &email.from && from_agent))
}

/// SPEC §8 authentication: DMARC-aligned DKIM or SPF on the raw message
/// (SPF only with our own listener's envelope). Without a raw message or an
/// authenticator the sender is refused unless `email.require_auth = false`;
/// a DMARC failure is refused always. `whom` names the addressee in logs.
pub(crate) async fn authenticated(
    state: &AppState,
    raw: Option<&[u8]>,
    envelope: Option<&JobEnvelope>,
    trusted: Option<AuthVerdict>,
    email: &InboundEmail,
    whom: &str,
) -> bool {
    let settings = &state.platform.settings;
    let require_auth = settings.email.require_auth;
    if let Some(verdict) = trusted {
        let admitted = verdict.admits(require_auth);
        if !admitted {
            tracing::warn!(to = %whom, sender = %email.from, verdict = %verdict, "email failed sender authentication (trusted Authentication-Results); dropped");
        }
        return admitted;
    }
    match (raw, authenticator(state)) {
        (Some(raw), Some(auth)) => {
            let receiver_host = settings.email.domain.as_str();
            let envelope = envelope.map(|e| SmtpEnvelope {
                client_ip: e.client_ip,
                helo: &e.helo,
                mail_from: &e.mail_from,
                receiver_host,
            });
            let verdict = auth.authenticate(raw, envelope.as_ref()).await;
            let admitted = verdict.admits(require_auth);
            if !admitted {
                tracing::warn!(to = %whom, sender = %email.from, verdict = %verdict, "email failed sender authentication; dropped");
            }
            admitted
        }
        _ => {
            if require_auth {
                tracing::warn!(to = %whom, sender = %email.from, "email sender cannot be authenticated (no raw message); dropped (email.require_auth = false admits it)");
            }
            !require_auth
        }
    }
}

/// Fetches a Resend notice's message: the parsed email, and the raw MIME
/// when Resend offers it.
async fn fetch_from_resend(
    state: &AppState,
    meta: &EmailJob,
    limits: &InboundLimits,
) -> Result<(Option<Vec<u8>>, InboundEmail), PrepareError> {
    let settings = &state.platform.settings;
    let key = settings
        .email
        .resend_api_key
        .as_ref()
        .ok_or_else(|| PrepareError::Permanent("email.resend_api_key (RESEND_API_KEY) is not set".into()))?;
    let path = resend::received_email_path(&meta.email_id).map_err(|e| PrepareError::Permanent(e.to_string()))?;
    let url = format!("{}{path}", base_url(state));
    let response =
        http().get(&url).bearer_auth(key.expose()).send().await.map_err(|e| PrepareError::Transient(e.to_string()))?;
    let status = response.status().as_u16();
    let bytes = read_capped(response).await?;
    if status != 200 {
        let error = resend::classify_error(status, &bytes);
        return Err(match error.disposition {
            Disposition::Retry => PrepareError::Transient(format!("fetching the email: {error}")),
            Disposition::Permanent => PrepareError::Permanent(format!("fetching the email: {error}")),
        });
    }
    let received = resend::parse_received_email(&bytes).map_err(|e| PrepareError::Permanent(e.to_string()))?;

    // The raw message, when Resend offers it: full MIME, attachments, DKIM.
    let raw = match &received.raw_download_url {
        Some(url) => {
            let response = http().get(url).send().await.map_err(|e| PrepareError::Transient(e.to_string()))?;
            if !response.status().is_success() {
                return Err(PrepareError::Transient(format!("downloading the raw email: HTTP {}", response.status())));
            }
            Some(read_capped(response).await?)
        }
        None => None,
    };
    let email = match &raw {
        Some(raw) => inbound::parse(raw, limits),
        None => received.to_inbound(limits),
    }
    .map_err(|e| PrepareError::Permanent(format!("unreadable email: {e}")))?;

    Ok((raw, email))
}

/// The mail's session: a reply to a mail this agent sent continues the
/// session that sent it; otherwise the thread root's session (SPEC §5).
async fn thread_session(state: &AppState, agent: &Agent, email: &InboundEmail) -> SessionId {
    let domain = state.platform.settings.email.domain.to_ascii_lowercase();
    let store = &state.platform.store;
    for id in email.referenced_ids() {
        let Some((local, host)) = id.rsplit_once('@') else { continue };
        if !host.eq_ignore_ascii_case(&domain) {
            continue;
        }
        let Ok(Some(delivery)) = store.get_delivery(local).await else { continue };
        if delivery.agent_id != agent.id {
            continue;
        }
        if let Some(job_id) = &delivery.job_id
            && let Ok(Some(job)) = store.get_job(job_id).await
        {
            return job.session;
        }
    }
    email.session_id()
}

async fn read_capped(response: reqwest::Response) -> Result<Vec<u8>, PrepareError> {
    use futures_util::StreamExt;
    let mut stream = response.bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| PrepareError::Transient(e.to_string()))?;
        if out.len() + chunk.len() > FETCH_BYTES_MAX {
            return Err(PrepareError::Permanent(format!("the response is over {FETCH_BYTES_MAX} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Outbound: one delivery.

/// What a delivery row's body holds for email: the text (markdown) and the
/// attachments (paths in the agent's storage); outbox rows add the file's
/// fields.
#[derive(Debug, Default, Serialize, Deserialize)]
struct EmailBody {
    #[serde(default)]
    text: String,
    #[serde(default)]
    attachments: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<EmailThread>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outbox: Option<OutboxDraft>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct OutboxDraft {
    to: Vec<String>,
    #[serde(default)]
    cc: Vec<String>,
    #[serde(default)]
    bcc: Vec<String>,
    subject: String,
    #[serde(default)]
    in_reply_to: Option<String>,
    #[serde(default)]
    references: Vec<String>,
}

/// Sends one email delivery through the configured provider (Resend or
/// SMTP); returns the provider's message id (SMTP: the Message-ID).
pub async fn send(state: &AppState, delivery: &Delivery) -> Result<Option<String>, SendError> {
    let platform = &state.platform;
    // The platform's own mail (provisioning) is from start@; else the agent's.
    let from = if delivery.agent_id == provision::platform_agent_id() {
        let address = provision::start_address(&platform.settings.email.domain)
            .ok_or_else(|| SendError::Permanent("email.domain gives no valid start@ address".into()))?;
        Mailbox::new(Some(provision::PLATFORM_DISPLAY_NAME), address)
    } else {
        let agent = platform
            .store
            .agent_by_id(&delivery.agent_id)
            .await
            .map_err(|e| SendError::Transient { error: e.to_string(), retry_after_ms: None })?
            .ok_or_else(|| SendError::Permanent("the agent no longer exists".into()))?;
        Mailbox::new(Some(agent.name.as_str()), agent.email.clone())
    };
    let body: EmailBody = serde_json::from_str(&delivery.body)
        .map_err(|e| SendError::Permanent(format!("unreadable email delivery body: {e}")))?;
    let mut draft = draft_for(state, from, delivery, &body).await?;
    if !body.attachments.is_empty() {
        let workspace = platform
            .storage
            .checkout(&delivery.agent_id)
            .await
            .map_err(|e| SendError::Transient { error: e.to_string(), retry_after_ms: None })?;
        draft.attachments = read_attachments(&workspace, &body.attachments).map_err(SendError::Permanent)?;
    }
    let date = DateTime::from_timestamp_millis(platform.now_ms()).unwrap_or_default();
    let email = outbound::compose(draft, &delivery.id, &platform.settings.email.domain, date)
        .map_err(|e| SendError::Permanent(e.to_string()))?;
    match platform.settings.email.provider.as_str() {
        "resend" => send_resend(state, &delivery.agent_id, &delivery.id, &email).await.map(Some),
        "smtp" => smtp_send::send(&platform.settings.email, &email).await.map(Some),
        other => Err(SendError::Permanent(format!("email provider {other:?} is not available in this version"))),
    }
}

/// The draft of an email delivery, attachments not read: recipients,
/// subject and the parent it threads under.
async fn draft_for(state: &AppState, from: Mailbox, delivery: &Delivery, body: &EmailBody) -> Result<Draft, SendError> {
    let target: Conversation = serde_json::from_str(&delivery.target)
        .map_err(|e| SendError::Permanent(format!("unreadable email delivery target: {e}")))?;
    let parse = |s: &str| {
        EmailAddress::parse(s.trim()).map_err(|_| SendError::Permanent(format!("{s:?} is not an email address")))
    };
    let list = |v: &[String]| v.iter().map(|s| parse(s)).collect::<Result<Vec<_>, _>>();

    let mut draft = Draft {
        from,
        to: Vec::new(),
        cc: Vec::new(),
        bcc: Vec::new(),
        reply_to: None,
        subject: None,
        body_markdown: body.text.clone(),
        parent: None,
        attachments: Vec::new(),
    };
    if let Some(outbox) = &body.outbox {
        draft.to = list(&outbox.to)?;
        draft.cc = list(&outbox.cc)?;
        draft.bcc = list(&outbox.bcc)?;
        draft.subject = Some(outbox.subject.clone());
        draft.parent = outbox.in_reply_to.as_deref().and_then(|irt| Parent::from_ids(irt, &outbox.references));
    } else {
        let to =
            target.to.as_deref().ok_or_else(|| SendError::Permanent("an email delivery needs a recipient".into()))?;
        draft.to = vec![parse(to)?];
        draft.parent = reply_parent(state, delivery, body, &draft.to[0]).await;
        if draft.parent.is_none() {
            draft.subject = Some(format!("Message from {}", draft.from.name.as_deref().unwrap_or("tinyfat")));
        }
    }
    Ok(draft)
}

/// The parent a reply threads under: the inbound mail of the delivery's job
/// (replies and error notes to the same person only).
async fn reply_parent(state: &AppState, delivery: &Delivery, body: &EmailBody, to: &EmailAddress) -> Option<Parent> {
    if let Some(thread) = &body.email {
        return Some(thread.parent());
    }
    let is_reply = delivery.idempotency_key.starts_with("reply:") || delivery.idempotency_key.starts_with("error:");
    let job_id = delivery.job_id.as_deref()?;
    let job = state.platform.store.get_job(job_id).await.ok()??;
    let payload: EmailMessagePayload = serde_json::from_str(&job.payload).ok()?;
    let conversation_to = payload.job.conversation.as_ref().and_then(|c| c.to.clone());
    let same_person = conversation_to.as_deref().is_some_and(|c| c.eq_ignore_ascii_case(to.as_str()));
    if !(is_reply || same_person) {
        return None;
    }
    payload.email.map(|thread| thread.parent())
}

fn read_attachments(workspace: &Workspace, paths: &[String]) -> Result<Vec<OutboundAttachment>, String> {
    let mut out = Vec::new();
    for raw in paths {
        let rel = raw.strip_prefix("/data/").unwrap_or(raw);
        let path = tinyfat_storage::validate_path(rel).map_err(|e| format!("attachment {raw:?}: {e}"))?;
        let bytes =
            workspace.dir.read(&path, ATTACHMENT_FILE_BYTES_MAX).map_err(|e| format!("attachment {raw:?}: {e}"))?;
        let name = path.split_last().map(|(_, n)| n.to_owned()).unwrap_or_else(|| "attachment".into());
        out.push(OutboundAttachment::new(&name, bytes));
    }
    Ok(out)
}

async fn send_resend(
    state: &AppState,
    agent_id: &tinyfat_core::AgentId,
    delivery_id: &str,
    email: &outbound::OutboundEmail,
) -> Result<String, SendError> {
    let settings = &state.platform.settings.email;
    let key = settings
        .resend_api_key
        .as_ref()
        .ok_or_else(|| SendError::Permanent("email.resend_api_key (RESEND_API_KEY) is not set".into()))?;
    let response = http()
        .post(format!("{}/emails", base_url(state)))
        .bearer_auth(key.expose())
        .header("Idempotency-Key", outbound::idempotency_key(agent_id, delivery_id))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(email.resend_json())
        .send()
        .await
        .map_err(|e| SendError::Transient { error: format!("Resend: {e}"), retry_after_ms: None })?;
    let status = response.status().as_u16();
    let retry_after_ms = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| (s * 1000.0).min(3_600_000.0) as i64);
    let bytes = response
        .bytes()
        .await
        .map_err(|e| SendError::Transient { error: format!("Resend: {e}"), retry_after_ms: None })?;
    if (200..300).contains(&status) {
        return resend::parse_send_response(&bytes).map_err(|e| SendError::Permanent(e.to_string()));
    }
    let error = resend::classify_error(status, &bytes);
    Err(match error.disposition {
        Disposition::Retry => SendError::Transient { error: error.to_string(), retry_after_ms },
        Disposition::Permanent => SendError::Permanent(error.to_string()),
    })
}

// ---------------------------------------------------------------------------
// The outbox.

fn rel(path: &str) -> RelPath {
    tinyfat_storage::validate_path(path).expect("a fixed outbox path is valid")
}

/// Claims and sends the agent's outbox files (fenced by `lease`).
pub async fn process_outbox(state: &AppState, agent: &Agent, lease: &Lease) {
    if let Err(e) = process_outbox_inner(state, agent, lease).await {
        tracing::warn!(agent = %agent.name, error = %e, "processing the outbox stopped");
    }
}

async fn process_outbox_inner(state: &AppState, agent: &Agent, lease: &Lease) -> Result<(), String> {
    let platform = &state.platform;
    let workspace = platform.storage.checkout(&agent.id).await.map_err(|e| e.to_string())?;
    let dir = &workspace.dir;
    let list = |path: &str| -> Result<Vec<String>, String> {
        match dir.list(&rel(path)) {
            Ok(entries) => {
                let mut names: Vec<String> = entries
                    .into_iter()
                    .filter(|e| e.kind == EntryKind::File && e.name.ends_with(".json") && !e.name.starts_with('.'))
                    .map(|e| e.name)
                    .collect();
                names.sort();
                Ok(names)
            }
            Err(FileError::NotFound(_)) => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        }
    };
    // Left in sending/ by a crash: resend under the same delivery id first.
    let mut claimed: Vec<String> = list("outbox/sending")?
        .into_iter()
        .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
        .filter(|id| ulid::Ulid::from_string(id).is_ok())
        .collect();
    for name in list("outbox/email")?.into_iter().take(OUTBOX_FILES_PER_RUN_MAX) {
        let id = tinyfat_core::ids::new_ulid_string(ulid::Ulid::new());
        let from = rel(&format!("outbox/email/{name}"));
        match dir.rename(&from, &rel(&format!("outbox/sending/{id}.json")), false) {
            Ok(()) => claimed.push(id),
            Err(FileError::NotFound(_)) => {}
            Err(e) => tracing::warn!(agent = %agent.name, file = %from, error = %e, "claiming an outbox file failed"),
        }
    }
    let mut changed = false;
    for delivery_id in claimed {
        if !platform.store.renew(lease, platform.now_ms(), crate::worker::LEASE_MS).await.unwrap_or(false) {
            return Err("the lease was lost".into());
        }
        changed = true;
        send_outbox_file(state, agent, lease, &workspace, &delivery_id).await?;
    }
    changed |= replies::send_and_file(state, agent, lease, &workspace).await?;
    if changed {
        platform.storage.commit(&workspace).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

async fn send_outbox_file(
    state: &AppState,
    agent: &Agent,
    lease: &Lease,
    workspace: &Workspace,
    delivery_id: &str,
) -> Result<(), String> {
    let platform = &state.platform;
    let store = &platform.store;
    let dir = &workspace.dir;
    let sending = rel(&format!("outbox/sending/{delivery_id}.json"));
    let original = match dir.read(&sending, outbox_file::FILE_BYTES_MAX as u64 + 1) {
        Ok(bytes) => bytes,
        Err(e @ (FileError::Symlink(_) | FileError::NotRegular { .. } | FileError::TooLarge { .. })) => {
            let _ = dir.remove_file(&sending);
            let failed = outbox_file::mark_failed(b"", &e.to_string(), now(state));
            return dir
                .write_atomic(&rel(&format!("outbox/failed/{delivery_id}.json")), &failed)
                .map_err(|e| e.to_string());
        }
        Err(e) => return Err(e.to_string()),
    };
    let file_away = |result: Result<String, String>| -> Result<(), String> {
        let (folder, bytes) = match &result {
            Ok(provider_id) => ("sent", outbox_file::mark_sent(&original, now(state), provider_id)),
            Err(error) => ("failed", outbox_file::mark_failed(&original, error, now(state))),
        };
        let target = rel(&format!("outbox/{folder}/{delivery_id}.json"));
        dir.write_atomic(&target, &bytes).map_err(|e| e.to_string())?;
        dir.remove_file(&sending).map_err(|e| e.to_string())?;
        match result {
            Ok(id) => {
                tracing::info!(agent = %agent.name, delivery = %delivery_id, provider_id = %id, "outbox email sent")
            }
            Err(error) => {
                tracing::warn!(agent = %agent.name, delivery = %delivery_id, error = %error, "outbox email failed")
            }
        }
        Ok(())
    };
    // A row from an earlier run decides: sent → just file it.
    let existing = store.get_delivery(delivery_id).await.map_err(|e| e.to_string())?;
    if let Some(row) = &existing {
        match row.state {
            DeliveryState::Sent => return file_away(Ok(row.provider_message_id.clone().unwrap_or_default())),
            DeliveryState::Failed => {
                return file_away(Err(row.last_error.clone().unwrap_or_else(|| "delivery failed".into())));
            }
            // Deferred by a provider's retry-after: the delivery loop sends it
            // when due, and a later run files it.
            DeliveryState::Pending if row.next_attempt_ms > platform.now_ms() => return Ok(()),
            // Pending, or `sending` left by a crash: send again, same key.
            DeliveryState::Pending | DeliveryState::Sending => {}
        }
    }
    let parsed = match outbox_file::parse(&original) {
        Ok(p) => p,
        Err(e) => return file_away(Err(e.to_string())),
    };
    if existing.is_none() {
        if let Err(error) = check_outbox_policy(state, agent, workspace, &parsed).await {
            return file_away(Err(error));
        }
        let body = EmailBody {
            text: parsed.body.clone(),
            attachments: parsed.attachments.iter().map(|p| p.to_string()).collect(),
            email: None,
            outbox: Some(OutboxDraft {
                to: parsed.to.iter().map(ToString::to_string).collect(),
                cc: parsed.cc.iter().map(ToString::to_string).collect(),
                bcc: parsed.bcc.iter().map(ToString::to_string).collect(),
                subject: parsed.subject.clone(),
                in_reply_to: parsed.in_reply_to.clone(),
                references: parsed.references.clone(),
            }),
        };
        let new = NewDelivery {
            id: delivery_id.to_owned(),
            idempotency_key: format!("outbox:{delivery_id}"),
            agent_id: agent.id.clone(),
            job_id: None,
            channel: "email".into(),
            target: json!({"channel": "email", "to": parsed.to.first().map(ToString::to_string)}).to_string(),
            body: serde_json::to_string(&body).expect("serialisable"),
            by_stream: false,
        };
        if let Err(e) = store.insert_delivery(&new, platform.now_ms()).await {
            return Err(e.to_string());
        }
    }
    // Claim the row (the delivery loop skips `sending` rows until stale) and
    // send. Outbox rows are not left to the worker, so the loop may have
    // claimed a row this run just recorded: then the loop sends it (one
    // send, not two under the same key) and a later run files the file. A
    // row already `sending` when read was left by a crashed attempt of this
    // agent (whose lease this run holds): it is sent again, same key.
    let claimed =
        store.mark_delivery_sending(delivery_id, platform.now_ms(), 60_000).await.map_err(|e| e.to_string())?;
    if !claimed && existing.as_ref().is_none_or(|row| row.state != DeliveryState::Sending) {
        tracing::debug!(agent = %agent.name, delivery = %delivery_id, "outbox email taken by the delivery loop");
        return Ok(());
    }
    let row = store.get_delivery(delivery_id).await.map_err(|e| e.to_string())?.ok_or("the delivery row vanished")?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        if attempt > 1 && !store.renew(lease, platform.now_ms(), crate::worker::LEASE_MS).await.unwrap_or(false) {
            return Err("the lease was lost".into());
        }
        match send(state, &row).await {
            Ok(provider_id) => {
                let id = provider_id.unwrap_or_default();
                let _ = store.mark_delivery_sent(delivery_id, Some(&id), platform.now_ms()).await;
                state.metrics.deliveries_sent_total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return file_away(Ok(id));
            }
            Err(SendError::Permanent(error)) => {
                let _ = store.mark_delivery_failed(delivery_id, &error, None, platform.now_ms()).await;
                return file_away(Err(error));
            }
            Err(SendError::Transient { error, retry_after_ms }) => {
                let wait = Duration::from_millis(retry_after_ms.unwrap_or(1_000).max(0) as u64);
                if attempt >= INLINE_ATTEMPTS_MAX || wait > INLINE_RETRY_WAIT_MAX {
                    // Left in sending/ with a pending row: the next run (or the
                    // delivery loop, then the next run files it) retries.
                    let retry_at = platform.now_ms() + wait.as_millis() as i64;
                    let _ = store.mark_delivery_failed(delivery_id, &error, Some(retry_at), platform.now_ms()).await;
                    tracing::warn!(agent = %agent.name, delivery = %delivery_id, error = %error, "outbox email deferred");
                    return Ok(());
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

fn now(state: &AppState) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(state.platform.now_ms()).unwrap_or_default()
}

/// Allowed recipients (unless config.json says `recipients: any`), the
/// daily send limit, and attachments readable without following links.
async fn check_outbox_policy(
    state: &AppState,
    agent: &Agent,
    workspace: &Workspace,
    parsed: &outbox_file::OutboxEmail,
) -> Result<(), String> {
    let platform = &state.platform;
    let config = workspace
        .dir
        .read_string_opt(&crate::provision::config_path(), crate::provision::CONFIG_BYTES_MAX)
        .map_err(|e| e.to_string())?
        .and_then(|s| serde_json::from_str::<AgentConfig>(&s).ok());
    let any = config.is_some_and(|c| c.recipients == tinyfat_core::agent_config::Recipients::Any);
    if !any {
        let rules = platform.store.list_senders(&agent.id).await.map_err(|e| e.to_string())?;
        if let Some(refused) = parsed.recipients().find(|r| !is_allowed(&rules, &SenderIdentity::Email((*r).clone()))) {
            return Err(format!(
                "recipient {refused} is not among the agent's allowed senders (config.json \"recipients\": \"any\" allows everyone)"
            ));
        }
    }
    let max = platform.settings.outbox.sends_per_day_max;
    let day_start = platform.now_ms() - platform.now_ms().rem_euclid(86_400_000);
    let recent =
        platform.store.deliveries_on(&agent.id, "email", max.saturating_add(100)).await.map_err(|e| e.to_string())?;
    let today = recent
        .iter()
        .filter(|d| {
            d.idempotency_key.starts_with("outbox:") && d.created_ms >= day_start && d.state != DeliveryState::Failed
        })
        .count();
    if today >= max as usize {
        return Err(format!("the daily limit of {max} outbox emails is reached (outbox.sends_per_day_max)"));
    }
    let paths: Vec<String> = parsed.attachments.iter().map(|p| p.to_string()).collect();
    read_attachments(workspace, &paths).map(drop)
}

/// The startup line for outbound email: which provider, and whether it can send.
pub fn outbound_status(settings: &crate::config::EmailSettings) -> String {
    match settings.provider.as_str() {
        "smtp" => format!("email: sending via {}", smtp_send::describe(settings)),
        _ if settings.resend_api_key.is_some() => "email: sending via Resend".to_owned(),
        _ => "email: sending off (set RESEND_API_KEY, or email.provider = \"smtp\" with email.smtp_host); email replies will fail".to_owned(),
    }
}

/// Runs the SMTP listener (bound by the caller with `smtp_listener::bind`)
/// and the IMAP pollers that the settings enable, until `shutdown`; the
/// pollers report each mailbox's status in `imap_statuses`.
pub async fn start(
    state: AppState,
    smtp: Option<smtp_listener::SmtpListener>,
    shutdown: watch::Receiver<bool>,
    imap_statuses: imap::Statuses,
) {
    let imap = imap::start(state.clone(), shutdown.clone(), imap_statuses);
    match smtp {
        Some(smtp) => {
            tokio::join!(smtp.run(state, shutdown), imap);
        }
        None => imap.await,
    }
}
