//! `/api/agents…`: agents, their allowed senders, secrets and status. Each
//! handler authorises through `Caller` and then calls the platform function
//! the CLI calls for the same command.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use tinyfat_core::{EmailAddress, Secret};

use super::{ApiError, ApiPath, ApiQuery, JsonBody};
use crate::auth::Caller;
use crate::provision::{AgentView, CreateAgent, format_ms};
use crate::state::AppState;

type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBody {
    owner: Option<String>,
    name: Option<String>,
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct DeleteQuery {
    confirm: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SenderBody {
    sender: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SecretBody {
    value: Secret,
}

pub(super) async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<AgentView>>> {
    let agents = state.platform.store.list_agents(caller.owner_filter()).await?;
    Ok(Json(agents.iter().map(AgentView::new).collect()))
}

/// A user's caller creates agents for itself; an operator names the owner.
pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateBody>,
) -> ApiResult<(StatusCode, Json<AgentView>)> {
    let requested = body
        .owner
        .as_deref()
        .map(|owner| EmailAddress::parse(owner).map_err(|e| ApiError::bad_request(format!("owner: {e}"))))
        .transpose()?;
    let owner = match (&caller, requested) {
        (Caller::Operator, Some(owner)) => owner,
        (Caller::Operator, None) => return Err(ApiError::bad_request("owner is required: the owner's email address")),
        (Caller::User { email, .. }, None) => email.clone(),
        (Caller::User { email, .. }, Some(owner)) if owner.as_str().eq_ignore_ascii_case(email.as_str()) => {
            email.clone()
        }
        (Caller::User { .. }, Some(_)) => {
            return Err(ApiError::forbidden("a user's token creates agents for that user only: leave out owner"));
        }
    };
    let agent = state.platform.create_agent(CreateAgent { owner, name: body.name, model: body.model }).await?;
    Ok((StatusCode::CREATED, Json(state.platform.agent_view(&agent).await?)))
}

pub(super) async fn show(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<AgentView>> {
    let agent = caller.agent(&state.platform, &id).await?;
    Ok(Json(state.platform.agent_view(&agent).await?))
}

/// Deleting needs `?confirm=yes`, as the CLI needs `--yes`.
pub(super) async fn remove(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteQuery>,
) -> ApiResult<Json<Value>> {
    let agent = caller.agent(&state.platform, &id).await?;
    if query.confirm.as_deref() != Some("yes") {
        return Err(ApiError::bad_request(format!(
            "this deletes agent {} and all of its files, sessions and secrets; repeat with ?confirm=yes",
            agent.name
        )));
    }
    let rows = state.platform.delete_agent(&agent).await?;
    Ok(Json(json!({
        "deleted": agent.id.to_string(),
        "name": agent.name.to_string(),
        "senders": rows.senders,
        "secrets": rows.secrets,
        "jobs": rows.jobs,
        "dead_letters": rows.dead_letters,
        "deliveries": rows.deliveries,
    })))
}

pub(super) async fn senders(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Vec<String>>> {
    let agent = caller.agent(&state.platform, &id).await?;
    let senders = state.platform.store.list_senders(&agent.id).await?;
    Ok(Json(senders.iter().map(ToString::to_string).collect()))
}

/// 201 when the rule is new, 200 when it was already there.
pub(super) async fn allow(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    JsonBody(body): JsonBody<SenderBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let agent = caller.agent(&state.platform, &id).await?;
    let added = state.platform.allow_sender(&agent, &body.sender).await?;
    let status = if added { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(json!({"agent": agent.name.to_string(), "sender": body.sender.trim(), "added": added}))))
}

/// The sender in the path is percent-decoded (`telegram%3Achat%3A42`).
pub(super) async fn disallow(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, sender)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let agent = caller.agent(&state.platform, &id).await?;
    let removed = state.platform.disallow_sender(&agent, &sender).await?;
    Ok(Json(json!({"agent": agent.name.to_string(), "sender": sender.trim(), "removed": removed})))
}

pub(super) async fn secrets(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Vec<crate::secrets::SecretView>>> {
    let agent = caller.agent(&state.platform, &id).await?;
    Ok(Json(state.platform.list_secrets(&agent).await?))
}

/// Sets a secret from `{"value": "…"}`; the value is never echoed.
pub(super) async fn set_secret(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, name)): ApiPath<(String, String)>,
    JsonBody(body): JsonBody<SecretBody>,
) -> ApiResult<Json<Value>> {
    let agent = caller.agent(&state.platform, &id).await?;
    state.platform.set_secret(&agent, &name, &body.value).await?;
    Ok(Json(json!({"agent": agent.name.to_string(), "secret": name, "set": true})))
}

pub(super) async fn unset_secret(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((id, name)): ApiPath<(String, String)>,
) -> ApiResult<Json<Value>> {
    let agent = caller.agent(&state.platform, &id).await?;
    if !state.platform.unset_secret(&agent, &name).await? {
        return Err(ApiError::not_found(format!("{} has no secret named {name:?}", agent.name)));
    }
    Ok(Json(json!({"agent": agent.name.to_string(), "secret": name, "removed": true})))
}

/// `{"running","queued","dead","active_run"}`: `running` is true while any
/// process holds the agent's lease; `active_run` describes the turn when it
/// runs in this process.
pub(super) async fn status(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    let agent = caller.agent(&state.platform, &id).await?;
    let queue = state.platform.store.agent_status(&agent.id, state.platform.now_ms()).await?;
    let active = state.runs.active(&agent.id);
    let active_run = active
        .as_ref()
        .map(|run| json!({"session": run.session, "started_at": format_ms(run.started_ms), "job_ids": run.job_ids}));
    Ok(Json(json!({
        "agent": agent.name.to_string(),
        "running": queue.running || active.is_some(),
        "queued": queue.queued,
        "dead": queue.dead,
        "active_run": active_run,
    })))
}
