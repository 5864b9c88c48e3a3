//! `/api/dlq…`: the dead-letter queue. Operators see and act on every dead
//! letter; a user's caller only on those of its own agents (others are 404),
//! and purging everything at once is for operators only.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiPath, ApiQuery};
use crate::auth::Caller;
use crate::dlq::{DEAD_LETTERS_LIST_DEFAULT, DEAD_LETTERS_LIST_MAX, DeadLetterScope, DeadLetterView};
use crate::state::AppState;

type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    /// Only this agent's dead letters (id or name).
    agent: Option<String>,
    limit: Option<u32>,
}

pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<Vec<DeadLetterView>>> {
    let limit = query.limit.unwrap_or(DEAD_LETTERS_LIST_DEFAULT);
    if limit == 0 || limit > DEAD_LETTERS_LIST_MAX {
        return Err(ApiError::bad_request(format!("limit must be 1-{DEAD_LETTERS_LIST_MAX}")));
    }
    let agent = match &query.agent {
        Some(id) => Some(caller.agent(&state.platform, id).await?),
        None => None,
    };
    let scope = match (&agent, caller.owner_filter()) {
        (Some(agent), _) => DeadLetterScope::Agent(agent),
        (None, Some(owner)) => DeadLetterScope::Owner(owner),
        (None, None) => DeadLetterScope::All,
    };
    Ok(Json(state.platform.dead_letters(scope, limit).await?))
}

/// One dead letter, with its payload.
pub(super) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<DeadLetterView>> {
    let (job, agent) = caller.dead_letter(&state.platform, &id).await?;
    Ok(Json(DeadLetterView::new(&job, agent.as_ref()).with_payload(&job)))
}

pub(super) async fn replay(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    caller.dead_letter(&state.platform, &id).await?;
    if !state.platform.replay_dead_letter(&id).await? {
        return Err(ApiError::not_found(format!("no dead letter {id:?}")));
    }
    Ok(Json(json!({"id": id, "replayed": 1})))
}

/// Operators replay every dead letter; a user's caller those of its agents,
/// at most `DEAD_LETTERS_LIST_MAX` per call (call again for more).
pub(super) async fn replay_all(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    let count = match caller.owner_filter() {
        None => state.platform.replay_all_dead_letters().await?,
        Some(owner) => {
            let mut count = 0;
            let scope = DeadLetterScope::Owner(owner);
            for dead in state.platform.dead_letters(scope, DEAD_LETTERS_LIST_MAX).await? {
                count += u64::from(state.platform.replay_dead_letter(&dead.id).await?);
            }
            count
        }
    };
    Ok(Json(json!({"replayed": count})))
}

pub(super) async fn purge(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    caller.dead_letter(&state.platform, &id).await?;
    if !state.platform.purge_dead_letter(&id).await? {
        return Err(ApiError::not_found(format!("no dead letter {id:?}")));
    }
    Ok(Json(json!({"id": id, "purged": 1})))
}

pub(super) async fn purge_all(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_operator()?;
    Ok(Json(json!({"purged": state.platform.purge_all_dead_letters().await?})))
}
