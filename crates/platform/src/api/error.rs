//! `ApiError`: the one HTTP error type. Every error an `/api` route answers
//! is JSON `{"error": message}` with a status that says whose fault it is.
//! Internal failures are logged here with their cause and answered with
//! "internal error": nothing about the database, the storage or a key
//! reaches the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tinyfat_store::StoreError;

use crate::Error;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    /// 400: the request was wrong; the message says how.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 401: no credential, or not a valid one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 403: authenticated, but this needs an operator.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// The one answer for an agent that does not exist *or* that the caller
    /// may not see: the two must be indistinguishable.
    pub fn unknown_agent(id_or_name: &str) -> Self {
        Self::not_found(format!("no agent {id_or_name:?}"))
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn payload_too_large(limit_bytes: u64) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {limit_bytes} bytes"))
    }

    pub fn unsupported_media_type() -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the request body must be JSON (Content-Type: application/json)")
    }

    /// 500: logs `cause` and answers only "internal error".
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "API request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::UnknownAgent(name) => Self::unknown_agent(&name),
            Error::DuplicateName(name) => Self::conflict(format!("an agent named {name:?} already exists")),
            Error::Invalid(message) => Self::bad_request(message),
            Error::Store(e) => e.into(),
            other => Self::internal(format!("{other:#}")),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => Self::conflict(format!("{what} already exists")),
            StoreError::Invalid(message) => Self::bad_request(message),
            other => Self::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
