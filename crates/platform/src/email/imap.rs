//! IMAP polling (SPEC §8): for people who connect an existing mailbox, one
//! poller per configured agent reads new mail and enqueues each message
//! whole as an `email` job (`enqueue_raw_email`, provider `imap`); the job
//! checks loops, allowed senders and authentication under the agent's lease
//! like every other inbound email.
//!
//! Configuration: the agent's `config.json` holds an `imap` block
//! ([`MailboxConfig`]); the password is the agent secret `imap_password`
//! (sealed by `secrets`, read at each login, never logged or put in
//! config.json). Agents are found by that secret and their config.json is
//! re-read every `rescan`, so a changed block restarts its poller.
//!
//! Per mailbox: connect (TLS, or plain only to a loopback host), LOGIN,
//! SELECT, then read new messages by UID (`UID FETCH n:* BODY.PEEK[]`, so
//! nothing is marked \Seen) and enqueue each with the dedup key
//! `imap:{agent_id}:{UIDVALIDITY}:{UID}`. The cursor (mailbox, UIDVALIDITY,
//! last UID) lives in the store's `channel_polls` row and moves only after
//! the message's enqueue committed: a crash before the enqueue loses
//! nothing (the message is fetched again), a crash after it re-enqueues
//! under the same dedup key (nothing new). The first look at a mailbox
//! starts at UIDNEXT: mail already there is left alone. A changed
//! UIDVALIDITY re-reads the messages since the day before the last sync;
//! mail already answered is dropped by the job's Message-ID dedup.
//! Waiting: IDLE when the server's CAPABILITY lists it (re-issued every
//! `idle_refresh`, under RFC 2177's 29 minutes), else a poll every
//! `poll_interval`. Errors reconnect with exponential backoff; each distinct
//! error is logged once (a refused login names the secret to fix and backs
//! off longer, so a wrong password does not lock the account).
//!
//! One process polls a mailbox at a time: the `channel_polls` row is a
//! lease (`lease_ttl`, renewed while idling); other processes stand by and
//! take over when it expires.
//!
//! This module must not parse or judge messages (the `email` job does) and
//! must not write the agent's prefix.

use std::collections::{HashMap, HashSet};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use tinyfat_channels::email::auth::{AuthOutcome, AuthVerdict, TrustedAuthResults};
use tinyfat_core::{AgentConfig, AgentId};
use tinyfat_store::Agent;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::AppState;

/// The `channel_polls` channel and the `provider` of the jobs.
pub const CHANNEL: &str = "imap";
/// The agent secret holding the mailbox password.
pub const PASSWORD_SECRET: &str = "imap_password";
/// Messages enqueued per round; the rest follow in the next round at once.
const FETCH_BATCH_MAX: usize = 100;

/// The `imap` block of an agent's config.json.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxConfig {
    pub host: String,
    /// Default 993 with TLS, 143 without.
    #[serde(default)]
    pub port: Option<u16>,
    /// TLS from the first byte (IMAPS). `false` is accepted only for a
    /// loopback host: the password would cross the network in clear.
    #[serde(default = "yes")]
    pub tls: bool,
    pub username: String,
    #[serde(default = "inbox")]
    pub mailbox: String,
    /// The authserv-id of the mailbox provider's MTA: its topmost
    /// `Authentication-Results` is believed; without it (or without such a
    /// header) DKIM/DMARC are checked on the raw message.
    #[serde(default)]
    pub authserv_id: Option<String>,
}

fn yes() -> bool {
    true
}

fn inbox() -> String {
    "INBOX".to_owned()
}

impl MailboxConfig {
    /// The block of a config.json: `Ok(None)` when there is none.
    pub fn from_agent_config(config: &AgentConfig) -> Result<Option<Self>, String> {
        let Some(value) = config.extra.get("imap") else { return Ok(None) };
        if value.is_null() {
            return Ok(None);
        }
        let parsed: Self = serde_json::from_value(value.clone()).map_err(|e| format!("config.json \"imap\": {e}"))?;
        parsed.validate()?;
        Ok(Some(parsed))
    }

    fn validate(&self) -> Result<(), String> {
        let host = self.host.trim();
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(format!("config.json \"imap\".host {:?} is not a host name", self.host));
        }
        if self.username.is_empty() {
            return Err("config.json \"imap\".username is empty".into());
        }
        if self.mailbox.is_empty() {
            return Err("config.json \"imap\".mailbox is empty".into());
        }
        if !self.tls && !is_loopback(host) {
            return Err(format!(
                "config.json \"imap\".tls is false for {host}: plain IMAP is allowed only to a loopback host (the password would travel in clear)"
            ));
        }
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 993 } else { 143 })
    }

    /// Names the mailbox in the cursor and in logs (never the password).
    pub fn id(&self) -> String {
        format!("{}@{}:{}/{}", self.username, self.host, self.port(), self.mailbox)
    }
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.trim_matches(|c| c == '[' || c == ']').parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Timing of the pollers; `Default` is production's.
#[derive(Clone, Debug)]
pub struct PollerSettings {
    /// How often agents and their config.json are looked at again.
    pub rescan: Duration,
    /// Use IDLE when the server's CAPABILITY lists it; `false` always polls.
    pub idle: bool,
    /// Between polls when the server has no IDLE.
    pub poll_interval: Duration,
    /// IDLE is re-issued after this long (RFC 2177: under 29 minutes).
    pub idle_refresh: Duration,
    /// The mailbox lease; renewed every third of it.
    pub lease_ttl: Duration,
    /// Reconnect backoff after an error, doubling up to the max.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// The least wait after a refused login.
    pub login_backoff_min: Duration,
    /// Per IMAP command and for connecting.
    pub io_timeout: Duration,
}

impl Default for PollerSettings {
    fn default() -> Self {
        Self {
            rescan: Duration::from_secs(60),
            idle: true,
            poll_interval: Duration::from_secs(60),
            idle_refresh: Duration::from_secs(25 * 60),
            lease_ttl: Duration::from_secs(60),
            backoff_min: Duration::from_secs(2),
            backoff_max: Duration::from_secs(15 * 60),
            login_backoff_min: Duration::from_secs(5 * 60),
            io_timeout: Duration::from_secs(60),
        }
    }
}

/// What a mailbox's poller is doing, for tests and operators.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MailboxStatus {
    pub state: PollState,
    /// The last error, until the next successful login.
    pub last_error: Option<String>,
    /// Messages fetched and handed to the queue since this poller started,
    /// and how many of those the queue already had (same dedup key).
    pub fetched: u64,
    pub enqueued: u64,
    pub duplicates: u64,
    /// Whether the server offered IDLE.
    pub idle: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PollState {
    #[default]
    Starting,
    /// Another process holds the mailbox lease.
    Standby,
    /// Logged in and synced; waiting for mail.
    Watching,
    /// Reconnecting after an error.
    Retrying,
    /// The server refused the login: fix the password or username.
    LoginRefused,
    Stopped,
}

/// Each polled mailbox's status, by agent; shared with `/readyz`.
pub type Statuses = Arc<Mutex<HashMap<AgentId, MailboxStatus>>>;

impl MailboxStatus {
    /// One line for `/readyz`: the state, and the last error when retrying.
    pub fn describe(&self) -> String {
        let state = match self.state {
            PollState::Starting => "starting",
            PollState::Standby => "standby (another process polls this mailbox)",
            PollState::Watching if self.idle => "ready: watching with IDLE",
            PollState::Watching => "ready: polling",
            PollState::Retrying => "retrying",
            PollState::LoginRefused => "error: login refused (check imap_password and the imap block)",
            PollState::Stopped => "stopped",
        };
        match (&self.last_error, self.state) {
            (Some(error), PollState::Retrying | PollState::LoginRefused) => format!("{state}: {error}"),
            _ => state.to_owned(),
        }
    }
}

/// The running pollers of this process.
#[derive(Debug)]
pub struct Pollers {
    statuses: Statuses,
    supervisor: JoinHandle<()>,
}

impl Pollers {
    /// Starts the supervisor: it finds configured agents and runs one
    /// poller each until `shutdown`.
    pub fn spawn(state: AppState, settings: PollerSettings, shutdown: watch::Receiver<bool>) -> Self {
        Self::spawn_reporting(state, settings, shutdown, Statuses::default())
    }

    /// `spawn`, keeping each mailbox's status in `statuses`.
    pub fn spawn_reporting(
        state: AppState,
        settings: PollerSettings,
        shutdown: watch::Receiver<bool>,
        statuses: Statuses,
    ) -> Self {
        let owner = format!("imap-{}-{}", std::process::id(), ulid::Ulid::new());
        let ctx = Arc::new(Ctx { state, settings, owner, statuses: statuses.clone() });
        let supervisor = tokio::spawn(supervise(ctx, shutdown));
        Self { statuses, supervisor }
    }

    pub fn status(&self, agent: &AgentId) -> Option<MailboxStatus> {
        self.statuses.lock().expect("status lock").get(agent).cloned()
    }

    /// Waits until the supervisor and its pollers have stopped.
    pub async fn join(self) {
        let _ = self.supervisor.await;
    }
}

/// `email::start`'s part: the pollers with production timing, until
/// shutdown, their statuses kept in `statuses`.
pub async fn start(state: AppState, shutdown: watch::Receiver<bool>, statuses: Statuses) {
    Pollers::spawn_reporting(state, PollerSettings::default(), shutdown, statuses).join().await;
}

#[derive(Debug)]
struct Ctx {
    state: AppState,
    settings: PollerSettings,
    owner: String,
    statuses: Statuses,
}

impl Ctx {
    fn update(&self, agent: &AgentId, f: impl FnOnce(&mut MailboxStatus)) {
        f(self.statuses.lock().expect("status lock").entry(agent.clone()).or_default());
    }
}

struct Running {
    config: MailboxConfig,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn supervise(ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    let mut running: HashMap<AgentId, Running> = HashMap::new();
    let mut reported: HashSet<String> = HashSet::new();
    let mut first = true;
    loop {
        let wanted = discover(&ctx, &mut reported).await;
        if first {
            if wanted.is_empty() {
                tracing::info!(
                    "imap: off (no agent has an \"imap\" block in config.json and an {PASSWORD_SECRET} secret)"
                );
            } else {
                let names: Vec<String> = wanted.iter().map(|(a, c)| format!("{} ({})", a.name, c.id())).collect();
                tracing::info!("imap: polling {} mailbox(es): {}", wanted.len(), names.join(", "));
            }
            first = false;
        }
        let wanted_ids: HashSet<AgentId> = wanted.iter().map(|(a, _)| a.id.clone()).collect();
        let gone: Vec<AgentId> = running
            .iter()
            .filter(|(id, r)| !wanted_ids.contains(*id) || r.task.is_finished())
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(r) = running.remove(&id) {
                let _ = r.stop.send(true);
                let _ = r.task.await;
            }
        }
        for (agent, config) in wanted {
            if let Some(r) = running.get(&agent.id) {
                if r.config == config {
                    continue;
                }
                tracing::info!(agent = %agent.name, "imap: the \"imap\" block changed; reconnecting");
                let r = running.remove(&agent.id).expect("present");
                let _ = r.stop.send(true);
                let _ = r.task.await;
            }
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(run_mailbox(ctx.clone(), agent.clone(), config.clone(), stop_rx));
            running.insert(agent.id.clone(), Running { config, stop, task });
        }
        tokio::select! {
            _ = tokio::time::sleep(ctx.settings.rescan) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() || shutdown.has_changed().is_err() {
            break;
        }
    }
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    for (_, r) in running {
        let _ = r.task.await;
    }
}

/// The agents with an `imap_password` secret and a valid `imap` block.
/// Problems are logged once each.
async fn discover(ctx: &Ctx, reported: &mut HashSet<String>) -> Vec<(Agent, MailboxConfig)> {
    let platform = &ctx.state.platform;
    let ids = match platform.store.agents_with_secret(PASSWORD_SECRET).await {
        Ok(ids) => ids,
        Err(e) => {
            tracing::warn!(error = %e, "imap: cannot list agents with an {PASSWORD_SECRET} secret; trying again later");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for id in ids {
        let Ok(Some(agent)) = platform.store.agent_by_id(&id).await else { continue };
        let problem = match platform.agent_config(&agent).await {
            Ok(config) => match MailboxConfig::from_agent_config(&config) {
                Ok(Some(mailbox)) => {
                    out.push((agent, mailbox));
                    continue;
                }
                Ok(None) => format!(
                    "has an {PASSWORD_SECRET} secret but no \"imap\" block in config.json (host, username, …): not polled"
                ),
                Err(e) => format!("{e}: not polled"),
            },
            Err(e) => format!("config.json unreadable ({e}): not polled"),
        };
        if reported.insert(format!("{}:{problem}", agent.id)) {
            tracing::warn!(agent = %agent.name, "imap: agent {} {problem}", agent.name);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// One mailbox.

#[derive(Debug)]
enum PollError {
    /// The server refused the login (or no password is set).
    Login(String),
    /// The mailbox lease went to another process.
    LeaseLost,
    /// Network, protocol or server errors: reconnect.
    Imap(String),
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Login(m) | Self::Imap(m) => f.write_str(m),
            Self::LeaseLost => f.write_str("the mailbox lease was taken over by another process"),
        }
    }
}

fn imap_err(what: &str) -> impl Fn(async_imap::error::Error) -> PollError + '_ {
    move |e| PollError::Imap(format!("{what}: {e}"))
}

fn store_err(e: tinyfat_store::StoreError) -> PollError {
    PollError::Imap(format!("store: {e}"))
}

/// The saved position in a mailbox (`channel_polls.cursor`, JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Cursor {
    mailbox: String,
    uid_validity: u32,
    last_uid: u32,
    /// When the cursor last moved (Unix ms): the rescan after a UIDVALIDITY
    /// change starts the day before.
    synced_ms: i64,
}

async fn run_mailbox(ctx: Arc<Ctx>, agent: Agent, config: MailboxConfig, mut stop: watch::Receiver<bool>) {
    let platform = &ctx.state.platform;
    let settings = &ctx.settings;
    let ttl_ms = settings.lease_ttl.as_millis() as i64;
    let mut backoff = settings.backoff_min;
    let mut logged: Option<String> = None;
    let mut standby_logged = false;
    ctx.update(&agent.id, |s| *s = MailboxStatus::default());
    loop {
        if *stop.borrow() {
            break;
        }
        let wait = match platform.store.claim_poll(&agent.id, CHANNEL, &ctx.owner, platform.now_ms(), ttl_ms).await {
            Ok(Some(saved)) => {
                standby_logged = false;
                let mut watched = false;
                let result = session(&ctx, &agent, &config, &saved, &mut stop, &mut watched, &mut logged).await;
                // Back to quick retries only after a session that worked
                // (logged in, selected, synced): a mailbox that cannot be
                // selected keeps backing off.
                if watched {
                    backoff = settings.backoff_min;
                }
                match result {
                    Ok(()) => break,
                    Err(PollError::LeaseLost) => {
                        tracing::info!(agent = %agent.name, mailbox = %config.id(), "imap: another process took the mailbox over; standing by");
                        settings.lease_ttl / 2
                    }
                    Err(e) => {
                        let login = matches!(e, PollError::Login(_));
                        let wait = if login { backoff.max(settings.login_backoff_min) } else { backoff };
                        backoff = (backoff * 2).min(settings.backoff_max);
                        let message = e.to_string();
                        if logged.as_deref() != Some(message.as_str()) {
                            if login {
                                tracing::error!(
                                    agent = %agent.name,
                                    "imap: {} refused the login of {:?}: {message}. Check the username in config.json \"imap\" and the password (tinyfat secret set {} {PASSWORD_SECRET}); retrying in {}s",
                                    config.host, config.username, agent.name, wait.as_secs()
                                );
                            } else {
                                tracing::warn!(agent = %agent.name, mailbox = %config.id(), "imap: {message}; reconnecting in {}s", wait.as_secs());
                            }
                            logged = Some(message.clone());
                        }
                        ctx.update(&agent.id, |s| {
                            s.state = if login { PollState::LoginRefused } else { PollState::Retrying };
                            s.last_error = Some(message);
                        });
                        wait
                    }
                }
            }
            Ok(None) => {
                if !standby_logged {
                    tracing::info!(agent = %agent.name, mailbox = %config.id(), "imap: another process polls this mailbox; standing by");
                    standby_logged = true;
                }
                ctx.update(&agent.id, |s| s.state = PollState::Standby);
                settings.lease_ttl / 3
            }
            Err(e) => {
                tracing::warn!(agent = %agent.name, error = %e, "imap: cannot take the mailbox lease; retrying");
                backoff
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {}
        }
    }
    let _ = platform.store.release_poll(&agent.id, CHANNEL, &ctx.owner, platform.now_ms()).await;
    ctx.update(&agent.id, |s| s.state = PollState::Stopped);
}

type Session = async_imap::Session<Transport>;

/// One connection: log in, select, then sync and wait until stopped or an
/// error. `Ok` only when stopped.
async fn session(
    ctx: &Ctx,
    agent: &Agent,
    config: &MailboxConfig,
    saved: &str,
    stop: &mut watch::Receiver<bool>,
    watched: &mut bool,
    logged: &mut Option<String>,
) -> Result<(), PollError> {
    let platform = &ctx.state.platform;
    let settings = &ctx.settings;
    let io = settings.io_timeout;
    let password = platform
        .secret(agent, PASSWORD_SECRET)
        .await
        .map_err(|e| PollError::Imap(format!("reading the {PASSWORD_SECRET} secret: {e}")))?
        .ok_or_else(|| PollError::Login(format!("the {PASSWORD_SECRET} secret is not set")))?;
    let stream = connect(config, io).await?;
    let mut client = async_imap::Client::new(stream);
    match timed(io, client.read_response()).await? {
        Ok(Some(_greeting)) => {}
        Ok(None) => return Err(PollError::Imap("the server closed the connection before its greeting".into())),
        Err(e) => return Err(PollError::Imap(format!("reading the greeting: {e}"))),
    }
    let mut session = match timed(io, client.login(&config.username, password.expose())).await? {
        Ok(session) => session,
        Err((async_imap::error::Error::No(m) | async_imap::error::Error::Bad(m), _)) => {
            return Err(PollError::Login(m.trim().to_owned()));
        }
        Err((e, _)) => return Err(PollError::Imap(format!("login: {e}"))),
    };
    drop(password);
    let capabilities = timed(io, session.capabilities()).await?.map_err(imap_err("CAPABILITY"))?;
    let idle = settings.idle && capabilities.has_str("IDLE");
    let selected = timed(io, session.select(&config.mailbox))
        .await?
        .map_err(|e| PollError::Imap(format!("selecting mailbox {:?}: {e}", config.mailbox)))?;
    let uid_validity = selected
        .uid_validity
        .ok_or_else(|| PollError::Imap(format!("mailbox {:?} has no UIDVALIDITY", config.mailbox)))?;

    let mut cursor = reconcile(ctx, agent, config, &mut session, saved, uid_validity, selected.uid_next).await?;
    let mode = if idle { "IDLE".to_owned() } else { format!("polling every {}s", settings.poll_interval.as_secs()) };
    if logged.take().is_some()
        || ctx.statuses.lock().expect("status lock").get(&agent.id).map(|s| s.state) == Some(PollState::Starting)
    {
        tracing::info!(agent = %agent.name, mailbox = %config.id(), "imap: ready ({mode})");
    }
    ctx.update(&agent.id, |s| {
        s.state = PollState::Watching;
        s.last_error = None;
        s.idle = idle;
    });
    *watched = true;

    let ttl_ms = settings.lease_ttl.as_millis() as i64;
    let renew_every = settings.lease_ttl / 3;
    loop {
        while sync(ctx, agent, &mut session, &mut cursor).await? == FETCH_BATCH_MAX {}
        while session.unsolicited_responses.try_recv().is_ok() {}
        if platform
            .store
            .claim_poll(&agent.id, CHANNEL, &ctx.owner, platform.now_ms(), ttl_ms)
            .await
            .map_err(store_err)?
            .is_none()
        {
            return Err(PollError::LeaseLost);
        }
        if *stop.borrow() {
            let _ = timed(io, session.logout()).await;
            return Ok(());
        }
        if idle {
            let mut handle = session.idle();
            timed(io, handle.init()).await?.map_err(imap_err("IDLE"))?;
            let mut lost = false;
            let outcome = {
                let (wait, interrupt) = handle.wait_with_timeout(settings.idle_refresh);
                tokio::pin!(wait);
                let mut interrupt = Some(interrupt);
                let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
                loop {
                    tokio::select! {
                        outcome = &mut wait => break outcome,
                        _ = renew.tick() => {
                            let held = platform.store.claim_poll(&agent.id, CHANNEL, &ctx.owner, platform.now_ms(), ttl_ms).await;
                            if !matches!(held, Ok(Some(_))) {
                                lost = true;
                                drop(interrupt.take());
                            }
                        }
                        _ = stop.changed() => drop(interrupt.take()),
                    }
                }
            };
            outcome.map_err(imap_err("IDLE"))?;
            session = timed(io, handle.done()).await?.map_err(imap_err("ending IDLE"))?;
            if lost {
                return Err(PollError::LeaseLost);
            }
        } else {
            // Sleep until the next poll, renewing the lease on the way.
            let next_poll = tokio::time::Instant::now() + settings.poll_interval;
            loop {
                let wake = (tokio::time::Instant::now() + renew_every).min(next_poll);
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = stop.changed() => break,
                }
                if wake >= next_poll {
                    break;
                }
                let held = platform.store.claim_poll(&agent.id, CHANNEL, &ctx.owner, platform.now_ms(), ttl_ms).await;
                if !matches!(held, Ok(Some(_))) {
                    return Err(PollError::LeaseLost);
                }
            }
        }
    }
}

/// The cursor for this session: the saved one, a fresh one at UIDNEXT (a
/// first look, or another mailbox configured), or one moved back to the
/// messages since the day before the last sync (UIDVALIDITY changed).
async fn reconcile(
    ctx: &Ctx,
    agent: &Agent,
    config: &MailboxConfig,
    session: &mut Session,
    saved: &str,
    uid_validity: u32,
    uid_next: Option<u32>,
) -> Result<Cursor, PollError> {
    let io = ctx.settings.io_timeout;
    let saved: Option<Cursor> = serde_json::from_str(saved).ok();
    let mailbox = config.id();
    let last_uid = match &saved {
        Some(c) if c.mailbox == mailbox && c.uid_validity == uid_validity => return Ok(c.clone()),
        Some(c) if c.mailbox == mailbox => {
            let since = chrono::DateTime::from_timestamp_millis(c.synced_ms - 86_400_000).unwrap_or_default();
            let query = format!("SINCE {}", since.format("%-d-%b-%Y"));
            let uids = timed(io, session.uid_search(&query)).await?.map_err(imap_err("UID SEARCH"))?;
            let first = uids.iter().min().copied();
            tracing::warn!(
                agent = %agent.name, mailbox = %mailbox,
                "imap: UIDVALIDITY changed ({} -> {uid_validity}): re-reading the {} message(s) since {}; mail already answered is dropped by its Message-ID",
                c.uid_validity, uids.len(), since.format("%Y-%m-%d")
            );
            match first {
                Some(uid) => uid.saturating_sub(1),
                None => uid_next.map_or(0, |n| n.saturating_sub(1)),
            }
        }
        _ => {
            let last = match uid_next {
                Some(next) => next.saturating_sub(1),
                None => {
                    let all = timed(io, session.uid_search("ALL")).await?.map_err(imap_err("UID SEARCH"))?;
                    all.into_iter().max().unwrap_or(0)
                }
            };
            tracing::info!(
                agent = %agent.name, mailbox = %mailbox,
                "imap: first look at this mailbox: the mail already in it is left alone; new mail (UID > {last}) is read"
            );
            last
        }
    };
    let cursor = Cursor { mailbox, uid_validity, last_uid, synced_ms: ctx.state.platform.now_ms() };
    save(ctx, agent, &cursor).await?;
    Ok(cursor)
}

async fn save(ctx: &Ctx, agent: &Agent, cursor: &Cursor) -> Result<(), PollError> {
    let platform = &ctx.state.platform;
    let text = serde_json::to_string(cursor).expect("serialisable");
    if platform
        .store
        .save_poll_cursor(&agent.id, CHANNEL, &ctx.owner, &text, platform.now_ms())
        .await
        .map_err(store_err)?
    {
        Ok(())
    } else {
        Err(PollError::LeaseLost)
    }
}

/// Enqueues the messages after the cursor (up to `FETCH_BATCH_MAX`), moving
/// the cursor after each commit. Returns how many UIDs it looked at.
async fn sync(ctx: &Ctx, agent: &Agent, session: &mut Session, cursor: &mut Cursor) -> Result<usize, PollError> {
    let io = ctx.settings.io_timeout;
    let platform = &ctx.state.platform;
    let size_max = platform.settings.gateway.email_body_bytes_max;
    let range = format!("{}:*", cursor.last_uid.saturating_add(1));
    let listed: Vec<async_imap::types::Fetch> =
        timed(io, async { session.uid_fetch(&range, "(UID RFC822.SIZE)").await?.try_collect().await })
            .await?
            .map_err(imap_err("UID FETCH"))?;
    // `n:*` names the last message even when its UID is below n.
    let mut new: Vec<(u32, u32)> = listed
        .iter()
        .filter_map(|f| Some((f.uid?, f.size.unwrap_or(0))))
        .filter(|(uid, _)| *uid > cursor.last_uid)
        .collect();
    new.sort_unstable();
    new.dedup();
    new.truncate(FETCH_BATCH_MAX);
    let count = new.len();
    for (uid, size) in new {
        if u64::from(size) > size_max {
            tracing::warn!(
                agent = %agent.name, uid, size,
                "imap: a message of {size} bytes is over gateway.email_body_bytes_max ({size_max}); skipped (it stays in the mailbox)"
            );
        } else if let Some(raw) = fetch_body(io, session, uid).await? {
            let dedup_key = format!("imap:{}:{}:{uid}", agent.id, cursor.uid_validity);
            let new = crate::email::enqueue_raw_email(&ctx.state, agent, &agent.email, CHANNEL, &raw, None, dedup_key)
                .await
                .map_err(|e| PollError::Imap(format!("enqueueing UID {uid}: {e}")))?;
            ctx.update(&agent.id, |s| {
                s.fetched += 1;
                if new {
                    s.enqueued += 1;
                } else {
                    s.duplicates += 1;
                }
            });
        }
        cursor.last_uid = uid;
        cursor.synced_ms = platform.now_ms();
        save(ctx, agent, cursor).await?;
    }
    Ok(count)
}

/// `BODY.PEEK[]` of one UID; `None` when it was expunged meanwhile.
async fn fetch_body(io: Duration, session: &mut Session, uid: u32) -> Result<Option<Vec<u8>>, PollError> {
    let fetched: Vec<async_imap::types::Fetch> =
        timed(io, async { session.uid_fetch(uid.to_string(), "(UID BODY.PEEK[])").await?.try_collect().await })
            .await?
            .map_err(imap_err("UID FETCH BODY.PEEK[]"))?;
    Ok(fetched.iter().find(|f| f.uid == Some(uid)).and_then(|f| f.body()).map(<[u8]>::to_vec))
}

async fn timed<T>(limit: Duration, fut: impl Future<Output = T>) -> Result<T, PollError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| PollError::Imap(format!("the server did not answer within {}s", limit.as_secs())))
}

// ---------------------------------------------------------------------------
// The connection.

/// Plain TCP (loopback only) or TLS, as one stream type for async-imap.
#[derive(Debug)]
pub enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

async fn connect(config: &MailboxConfig, io: Duration) -> Result<Transport, PollError> {
    let host = config.host.trim();
    let address = (host.trim_matches(|c| c == '[' || c == ']'), config.port());
    let tcp = timed(io, TcpStream::connect(address))
        .await?
        .map_err(|e| PollError::Imap(format!("connecting to {host}:{}: {e}", config.port())))?;
    if !config.tls {
        return Ok(Transport::Plain(tcp));
    }
    let tls = tls_config().map_err(|e| PollError::Imap(format!("TLS setup: {e}")))?;
    let name =
        tokio_rustls::rustls::pki_types::ServerName::try_from(host.trim_matches(|c| c == '[' || c == ']').to_owned())
            .map_err(|e| PollError::Imap(format!("{host:?} is not a TLS server name: {e}")))?;
    let stream = timed(io, tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
        .await?
        .map_err(|e| PollError::Imap(format!("TLS with {host}:{}: {e}", config.port())))?;
    Ok(Transport::Tls(Box::new(stream)))
}

fn tls_config() -> Result<Arc<tokio_rustls::rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<tokio_rustls::rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            use rustls_platform_verifier::ConfigVerifierExt;
            tokio_rustls::rustls::ClientConfig::with_platform_verifier().map(Arc::new).map_err(|e| e.to_string())
        })
        .clone()
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ---------------------------------------------------------------------------
// Authentication, for the `email` job.

/// For a message this poller enqueued: the verdict of the mailbox provider's
/// topmost `Authentication-Results`, when the agent's `imap.authserv_id` is
/// set and that header is from it and evaluates. `None`: check DKIM/DMARC
/// on the raw message instead (headers from any other authserv-id are
/// never believed).
pub(crate) async fn trusted_verdict(
    state: &AppState,
    agent: &Agent,
    provider: &str,
    raw: &[u8],
) -> Option<AuthVerdict> {
    if provider != CHANNEL {
        return None;
    }
    let config = state.platform.agent_config(agent).await.ok()?;
    let authserv_id = MailboxConfig::from_agent_config(&config).ok()??.authserv_id?;
    let verdict = TrustedAuthResults::new(&authserv_id).verify(raw);
    if verdict.outcome == AuthOutcome::CannotEvaluate {
        tracing::debug!(agent = %agent.name, reason = %verdict.reason, "imap: no trusted Authentication-Results; checking DKIM/DMARC");
        return None;
    }
    Some(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Result<Option<MailboxConfig>, String> {
        let mut c = AgentConfig::new("m");
        c.extra = serde_json::from_str(json).unwrap();
        MailboxConfig::from_agent_config(&c)
    }

    #[test]
    fn the_imap_block_is_validated() {
        assert_eq!(config("{}"), Ok(None));
        let c = config(r#"{"imap":{"host":"imap.example.net","username":"me"}}"#).unwrap().unwrap();
        assert_eq!((c.port(), c.tls, c.mailbox.as_str()), (993, true, "INBOX"));
        assert_eq!(c.id(), "me@imap.example.net:993/INBOX");
        let plain =
            config(r#"{"imap":{"host":"127.0.0.1","port":1143,"tls":false,"username":"me"}}"#).unwrap().unwrap();
        assert_eq!(plain.port(), 1143);
        for bad in [
            r#"{"imap":{"host":"imap.example.net","tls":false,"username":"me"}}"#,
            r#"{"imap":{"host":"","username":"me"}}"#,
            r#"{"imap":{"host":"h","username":""}}"#,
            r#"{"imap":{"host":"h","username":"u","password":"p"}}"#,
            r#"{"imap":{"host":"h"}}"#,
        ] {
            assert!(config(bad).is_err(), "{bad}");
        }
        // The password is refused in config.json (deny_unknown_fields) and
        // the error does not echo it.
        let error = config(r#"{"imap":{"host":"h","username":"u","password":"hunter2"}}"#).unwrap_err();
        assert!(!error.contains("hunter2"), "{error}");
    }
}
