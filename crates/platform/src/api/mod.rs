//! The JSON admin API under `/api`: everything the CLI does (agents, allowed
//! senders, secrets, status, the dead-letter queue, API tokens), plus the
//! OpenAPI document that describes it and the web chat routes.
//!
//! Every route here authenticates with the `Caller` extractor (401 without a
//! valid credential) and reaches agents only through `Caller::agent`, so a
//! user-limited caller gets 404 for another user's agent on every route.
//! Handlers call the platform's functions (`create_agent`, `allow_sender`,
//! `set_secret`, …) and never re-implement them; they only parse, authorise
//! and shape JSON. Secret values are accepted, never returned.
//!
//! The web chat routes (`/chat`, `/runs/…/events`, `/schedule`) are not here:
//! `serve` mounts them beside this router and they use `Caller` too.

mod agents;
mod dlq;
mod error;
mod extract;
mod tokens;

use axum::Router;
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post, put};

pub use error::ApiError;
pub use extract::{ApiPath, ApiQuery, JsonBody};

use crate::auth::Caller;
use crate::state::AppState;

/// The `/api` routes of this module, to be merged into the server's router
/// (which supplies `AppState`). Unknown `/api/…` paths answer 404 in JSON
/// (after authentication), and a wrong method 405 in JSON.
pub fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/api/openapi.json", get(openapi))
        .route("/api/agents", get(agents::list).post(agents::create))
        .route("/api/agents/{id}", get(agents::show).delete(agents::remove))
        .route("/api/agents/{id}/senders", get(agents::senders).post(agents::allow))
        .route("/api/agents/{id}/senders/{sender}", delete(agents::disallow))
        .route("/api/agents/{id}/secrets", get(agents::secrets))
        .route("/api/agents/{id}/secrets/{name}", put(agents::set_secret).delete(agents::unset_secret))
        .route("/api/agents/{id}/status", get(agents::status))
        .route("/api/dlq", get(dlq::list).delete(dlq::purge_all))
        .route("/api/dlq/replay-all", post(dlq::replay_all))
        .route("/api/dlq/{id}", get(dlq::show).delete(dlq::purge))
        .route("/api/dlq/{id}/replay", post(dlq::replay))
        .route("/api/tokens", get(tokens::list).post(tokens::create))
        .route("/api/tokens/{id}", delete(tokens::revoke))
        .route("/api/{*rest}", any(unknown_route))
        .layer(axum::middleware::map_response(json_method_not_allowed))
}

async fn openapi(_caller: Caller) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], crate::openapi::OPENAPI_JSON).into_response()
}

async fn unknown_route(_caller: Caller) -> ApiError {
    ApiError::not_found("no such API route (GET /api/openapi.json lists them)")
}

/// axum answers a known path with the wrong method with an empty 405; give
/// it the API's JSON shape (keeping the `Allow` header).
async fn json_method_not_allowed(response: Response) -> Response {
    if response.status() != StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let body = serde_json::json!({ "error": "method not allowed" }).to_string();
    parts.headers.insert(axum::http::header::CONTENT_TYPE, "application/json".parse().expect("static header"));
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

#[cfg(test)]
mod tests {
    use axum::routing::{get, post};

    /// `serve` adds the web chat routes beside these; the catch-all must not
    /// clash with them.
    #[test]
    fn more_routes_can_be_added_beside_the_catch_all() {
        let _router: axum::Router<super::AppState> = super::api_routes()
            .route("/api/agents/{id}/chat", post(|| async {}))
            .route("/api/agents/{id}/runs/{request_id}/events", get(|| async {}))
            .route("/api/agents/{id}/schedule", get(|| async {}));
    }
}
