//! Who is calling, and what they may touch. `Caller` is an axum extractor
//! for every authenticated route: it reads the request's credential, asks
//! `tokens` who it stands for, and answers 401 (`WWW-Authenticate: Bearer`)
//! when there is none or it is invalid. Handlers then go through
//! `Caller::agent`, which answers an agent another user owns exactly like an
//! unknown one (404, same message), so a user cannot learn that it exists.
//!
//! Credentials today: `Authorization: Bearer <api token>`. A dashboard
//! session cookie is a second `Credential` variant: `credential` learns to
//! read it, `authenticate` resolves it to a `Caller`, and for non-GET requests
//! it also requires a same-origin `Origin` (SPEC §4); handlers do not change.
//!
//! This module does not know the token format or how tokens are stored.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use tinyfat_core::EmailAddress;
use tinyfat_store::{Agent, Job, JobState};

use crate::Platform;
use crate::api::ApiError;
use crate::state::AppState;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An operator token: acts on every agent.
    Operator,
    /// A user's token (or, later, session): acts only on agents that user owns.
    User { user_id: String, email: EmailAddress },
}

/// What a request presented to prove who it is.
#[derive(Debug)]
enum Credential<'a> {
    Bearer(&'a str),
}

/// The request's credential. `Err` when the Authorization header is there
/// but unusable, so the client hears what is wrong with it.
fn credential(parts: &Parts) -> Result<Option<Credential<'_>>, ApiError> {
    let Some(value) = parts.headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ApiError::unauthorized("the Authorization header is not ASCII"))?;
    let value = value.trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(ApiError::unauthorized("use Authorization: Bearer <api token>"));
    }
    Ok(Some(Credential::Bearer(token.trim())))
}

/// Resolves the request's credential to a caller, or 401.
pub async fn authenticate(parts: &Parts, platform: &Platform) -> Result<Caller, ApiError> {
    match credential(parts)? {
        None => Err(ApiError::unauthorized(
            "authentication required: send Authorization: Bearer <api token> (`tinyfat token create`)",
        )),
        Some(Credential::Bearer(token)) => {
            platform.verify_token(token).await?.ok_or_else(|| ApiError::unauthorized("invalid or revoked API token"))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    /// Authenticates once per request: a caller found earlier (by a
    /// middleware or another extractor) is reused from the extensions.
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let caller = authenticate(parts, &state.platform).await?;
        parts.extensions.insert(caller.clone());
        Ok(caller)
    }
}

impl Caller {
    /// How the caller appears as a sender (web chat, logs): the user's email,
    /// or `operator`.
    pub fn display_name(&self) -> String {
        match self {
            Self::Operator => "operator".to_owned(),
            Self::User { email, .. } => email.to_string(),
        }
    }

    pub fn is_operator(&self) -> bool {
        matches!(self, Self::Operator)
    }

    /// The owner whose agents this caller is limited to; `None`: all agents.
    pub fn owner_filter(&self) -> Option<&str> {
        match self {
            Self::Operator => None,
            Self::User { user_id, .. } => Some(user_id),
        }
    }

    pub fn may_access(&self, agent: &Agent) -> bool {
        self.owner_filter().is_none_or(|owner| owner == agent.owner_id)
    }

    /// 403 unless this is an operator.
    pub fn require_operator(&self) -> Result<(), ApiError> {
        if self.is_operator() {
            Ok(())
        } else {
            Err(ApiError::forbidden("this needs an operator token (`tinyfat token create` without --user)"))
        }
    }

    /// The agent `id_or_name` names, if this caller may act on it. An agent
    /// of another user is answered exactly like one that does not exist.
    pub async fn agent(&self, platform: &Platform, id_or_name: &str) -> Result<Agent, ApiError> {
        match platform.agent(id_or_name).await {
            Ok(agent) if self.may_access(&agent) => Ok(agent),
            Ok(_) | Err(crate::Error::UnknownAgent(_)) => Err(ApiError::unknown_agent(id_or_name)),
            Err(e) => Err(e.into()),
        }
    }

    /// The dead letter `id`, if this caller may act on its agent; otherwise
    /// 404, the same as for an id that is not a dead letter.
    pub async fn dead_letter(&self, platform: &Platform, id: &str) -> Result<(Job, Option<Agent>), ApiError> {
        let not_found = || ApiError::not_found(format!("no dead letter {id:?} (`GET /api/dlq` lists them)"));
        let job = platform.store.get_job(id).await.map_err(crate::Error::from)?;
        let Some(job) = job.filter(|job| job.state == JobState::Dead) else {
            return Err(not_found());
        };
        let agent = platform.store.agent_by_id(&job.agent_id).await.map_err(crate::Error::from)?;
        let allowed = match &agent {
            Some(agent) => self.may_access(agent),
            // A job whose agent is gone belongs to no user.
            None => self.is_operator(),
        };
        if allowed { Ok((job, agent)) } else { Err(not_found()) }
    }
}
