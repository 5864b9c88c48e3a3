//! `/api/tokens…`: API tokens, for operators only. A new token's plaintext is
//! in the creation answer and nowhere else (`Cache-Control: no-store`).

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use tinyfat_core::EmailAddress;

use super::{ApiError, ApiPath, JsonBody};
use crate::auth::Caller;
use crate::state::AppState;
use crate::tokens::TokenView;

type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBody {
    name: Option<String>,
    /// Limit the token to this user's agents.
    user: Option<String>,
}

pub(super) async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<TokenView>>> {
    caller.require_operator()?;
    Ok(Json(state.platform.list_tokens().await?))
}

pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(body): JsonBody<CreateBody>,
) -> ApiResult<(StatusCode, [(header::HeaderName, &'static str); 1], Json<Value>)> {
    caller.require_operator()?;
    let user = body
        .user
        .as_deref()
        .map(|user| EmailAddress::parse(user).map_err(|e| ApiError::bad_request(format!("user: {e}"))))
        .transpose()?;
    let (row, plaintext) = state.platform.create_token(body.name, user.clone()).await?;
    let view = state.platform.token_view(&row, user.map(|u| u.to_string()));
    let answer = json!({
        "id": view.id,
        "name": view.name,
        "user": view.user,
        "created_at": view.created_at,
        "token": plaintext.expose(),
    });
    Ok((StatusCode::CREATED, [(header::CACHE_CONTROL, "no-store")], Json(answer)))
}

pub(super) async fn revoke(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Value>> {
    caller.require_operator()?;
    if !state.platform.revoke_token(&id).await? {
        return Err(ApiError::not_found(format!("no live token {id:?} (GET /api/tokens lists them)")));
    }
    Ok(Json(json!({"revoked": id})))
}
