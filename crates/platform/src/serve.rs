//! `tinyfat serve`: one HTTP port (gateway) plus the background roles —
//! workers that run turns, the delivery loop and (later) the scheduler — in
//! one process by default, or one role per process with `--role`.
//!
//! Startup order: the store is migrated and storage checked by
//! `Platform::open`; the sandbox self-check runs here and is reported;
//! `/readyz` answers 503 until every enabled part is up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use serde_json::json;
use tokio::sync::watch;

use crate::Platform;
use crate::metrics::QueueGauges;
use crate::state::AppState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    All,
    Gateway,
    Worker,
    Scheduler,
}

impl Role {
    fn runs_gateway(self) -> bool {
        matches!(self, Role::All | Role::Gateway)
    }

    fn runs_worker(self) -> bool {
        matches!(self, Role::All | Role::Worker)
    }
}

/// Readiness facts gathered at startup and by the roles.
#[derive(Debug, Default)]
pub struct Readiness {
    pub sandbox: std::sync::Mutex<Option<(bool, String)>>,
    pub started: AtomicBool,
    /// The SMTP listener's state line, when it is configured.
    pub smtp: std::sync::Mutex<Option<String>>,
    /// The IMAP pollers' mailboxes. Reported, not required: one mailbox
    /// whose provider is down or refuses the login does not make the
    /// platform unready.
    pub imap: crate::email::imap::Statuses,
}

#[derive(Clone, Debug)]
struct ServeState {
    app: AppState,
    ready: Arc<Readiness>,
}

impl axum::extract::FromRef<ServeState> for AppState {
    fn from_ref(s: &ServeState) -> AppState {
        s.app.clone()
    }
}

pub fn router(app: AppState, ready: Arc<Readiness>) -> Router {
    let body_limit = app.platform.settings.gateway.body_bytes_max as usize;
    let api: Router<AppState> = crate::api::api_routes()
        .route("/api/agents/{id}/chat", post(crate::webchat::chat))
        .route("/api/agents/{id}/runs/{request_id}/events", get(crate::webchat::run_events))
        .merge(crate::email::routes())
        .merge(crate::scheduler::routes());
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(ServeState { app: app.clone(), ready })
        .merge(api.with_state(app))
        .layer(DefaultBodyLimit::max(body_limit))
}

async fn readyz(State(s): State<ServeState>) -> impl IntoResponse {
    let platform = &s.app.platform;
    let store = platform.store.ping().await.map_err(|e| e.to_string());
    let storage = platform.storage.check().await.map_err(|e| e.to_string());
    let state_of = |r: &Result<(), String>| match r {
        Ok(()) => "ready".to_owned(),
        Err(e) => format!("error: {e}"),
    };
    let sandbox = s.ready.sandbox.lock().expect("readiness lock").clone();
    let sandbox_state = match &sandbox {
        Some((true, message)) => format!("ready: {message}"),
        Some((false, message)) => format!("error: {message}"),
        None => "starting".to_owned(),
    };
    let started = s.ready.started.load(Ordering::SeqCst);
    let adapters = json!({
        "store": state_of(&store),
        "storage": state_of(&storage),
        "sandbox": sandbox_state,
        "web": if started { "ready" } else { "starting" },
    });
    let mut adapters = adapters;
    if let Some(smtp) = s.ready.smtp.lock().expect("readiness lock").clone() {
        adapters["smtp"] = json!(format!("ready: {smtp}"));
    }
    let mailboxes: serde_json::Map<String, serde_json::Value> = s
        .ready
        .imap
        .lock()
        .expect("readiness lock")
        .iter()
        .map(|(agent, status)| (agent.to_string(), json!(status.describe())))
        .collect();
    if !mailboxes.is_empty() {
        adapters["imap"] = serde_json::Value::Object(mailboxes);
    }
    let ready = store.is_ok() && storage.is_ok() && matches!(sandbox, Some((true, _))) && started;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready, "adapters": adapters })))
}

async fn metrics(State(s): State<ServeState>) -> impl IntoResponse {
    let platform = &s.app.platform;
    let counts = platform.store.queue_counts(platform.now_ms()).await.unwrap_or_default();
    let gauges = QueueGauges { queued: counts.queued, running: counts.running, dead: counts.dead };
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.app.metrics.render(gauges))
}

/// Runs the roles until ctrl-c / SIGTERM, then shuts down gracefully.
pub async fn serve(platform: Arc<Platform>, listen: &str, role: Role) -> anyhow::Result<()> {
    let app = AppState::new(platform.clone());
    let ready = Arc::new(Readiness::default());
    let (stop_tx, stop_rx) = watch::channel(false);

    let health = platform.executor.check().await;
    if health.ok {
        tracing::info!("sandbox: {} ({})", health.message, health.mode.as_str());
    } else {
        tracing::error!("sandbox: {} — tool calls will fail until this is fixed", health.message);
    }
    for note in &health.notes {
        tracing::info!("sandbox: {note}");
    }
    *ready.sandbox.lock().expect("readiness lock") = Some((health.ok, health.message.clone()));

    let settings = &platform.settings;
    let key_state = |key: &Option<tinyfat_core::Secret>, secret: &str| match key {
        Some(_) => "platform key set".to_owned(),
        None => format!("no platform key (each agent needs its `{secret}` secret)"),
    };
    tracing::info!(
        "model: default {}; Anthropic: {}; OpenAI-compatible: {}",
        settings.model.default,
        key_state(&settings.model.anthropic_api_key, "anthropic_api_key"),
        key_state(&settings.model.openai_api_key, "openai_api_key")
    );
    match (&settings.email.resend_webhook_secret, &settings.email.resend_api_key) {
        (Some(_), Some(_)) => {
            tracing::info!("email: Resend webhook ready at /webhooks/resend; agents are NAME@{}", settings.email.domain)
        }
        _ => tracing::info!("email: Resend off (set RESEND_API_KEY and RESEND_WEBHOOK_SECRET to receive mail)"),
    }
    tracing::info!("{}", crate::email::outbound_status(&settings.email));
    crate::email::provision::log_startup(settings);

    let mut background = tokio::task::JoinSet::new();
    if role.runs_worker() {
        let config = crate::worker::WorkerConfig::default();
        tracing::info!(
            "worker: running up to {} turns at once (lease owner {})",
            config.turns_concurrent_max,
            config.owner
        );
        background.spawn(crate::worker::run(app.clone(), config, stop_rx.clone()));
        background.spawn(crate::deliver::run(app.clone(), stop_rx.clone()));
        tracing::info!(
            "queue: dedup keys held {} (done jobs are deleted after that); transient failures retried for {}; \
             dead letter after {} failed attempts",
            settings.queue.dedup_ttl,
            settings.queue.retry_window,
            settings.queue.max_attempts
        );
        background.spawn(crate::retention::run(app.clone(), stop_rx.clone()));
    }
    if matches!(role, Role::All | Role::Scheduler) {
        background.spawn(crate::scheduler::run(app.clone(), stop_rx.clone()));
    }
    if role.runs_gateway() {
        // Bound here, not in the task: a bad address or certificate stops startup.
        let smtp = crate::email::smtp_listener::bind(settings).await?;
        match &smtp {
            Some(l) => tracing::info!("email: SMTP {}; mail for NAME@{}", l.describe(), settings.email.domain),
            None => tracing::info!("email: SMTP listener off (set email.smtp_listen to receive mail on port 25)"),
        }
        *ready.smtp.lock().expect("readiness lock") = smtp.as_ref().map(|l| l.describe());
        background.spawn(crate::email::start(app.clone(), smtp, stop_rx.clone(), ready.imap.clone()));
    }

    let shutdown = async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    };
    if role.runs_gateway() {
        let addr: SocketAddr = listen.parse().map_err(|e| anyhow::anyhow!("invalid listen address {listen:?}: {e}"))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e} (is another tinyfat running? try --listen)"))?;
        let local = listener.local_addr()?;
        tracing::info!("web chat and API: http://{local}/api (token: `tinyfat token create`)");
        tracing::info!(
            "listening on http://{local} (health: http://{local}/healthz, readiness: http://{local}/readyz)"
        );
        if !local.ip().is_loopback() {
            tracing::warn!(
                "listening on a non-loopback address: every route except health, metrics and webhooks requires a token"
            );
        }
        ready.started.store(true, Ordering::SeqCst);
        // Nagle off: an SSE stream writes small events one after another,
        // and with Nagle each waited for the client's delayed ACK (~40 ms).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "TCP_NODELAY could not be set on a connection");
            }
        });
        axum::serve(listener, router(app, ready)).with_graceful_shutdown(shutdown).await?;
    } else {
        ready.started.store(true, Ordering::SeqCst);
        shutdown.await;
    }
    while background.join_next().await.is_some() {}
    tracing::info!("shut down");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested: no new jobs are claimed; running turns may finish");
}
