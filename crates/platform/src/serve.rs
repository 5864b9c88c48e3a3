//! `tinyfat serve`: the HTTP server on one port. This stage serves
//! `/healthz` (liveness) and `/readyz` (readiness of the store, storage and
//! adapters); the gateway, workers and scheduler plug in here.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;

use crate::Platform;

#[derive(Clone, Debug)]
struct AppState {
    platform: Arc<Platform>,
}

pub fn router(platform: Arc<Platform>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { platform })
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let store = state.platform.store.ping().await;
    let storage = state.platform.storage.check().await;
    let state_of = |r: &Result<(), String>| match r {
        Ok(()) => "ready".to_owned(),
        Err(e) => format!("error: {e}"),
    };
    let store = store.map_err(|e| e.to_string());
    let storage = storage.map_err(|e| e.to_string());
    let adapters = json!({ "store": state_of(&store), "storage": state_of(&storage) });
    let ready = store.is_ok() && storage.is_ok();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready, "adapters": adapters })))
}

/// Binds, logs where it listens, and serves until ctrl-c / SIGTERM.
pub async fn serve(platform: Arc<Platform>, listen: &str) -> anyhow::Result<()> {
    let addr: SocketAddr = listen.parse().map_err(|e| anyhow::anyhow!("invalid listen address {listen:?}: {e}"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e} (is another tinyfat running? try --listen)"))?;
    let local = listener.local_addr()?;
    tracing::info!("listening on http://{local} (health: http://{local}/healthz, readiness: http://{local}/readyz)");
    if !local.ip().is_loopback() {
        tracing::warn!("listening on a non-loopback address: every route except health and webhooks requires a token");
    }
    axum::serve(listener, router(platform)).with_graceful_shutdown(shutdown_signal()).await?;
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
    tracing::info!("shutdown requested");
}
