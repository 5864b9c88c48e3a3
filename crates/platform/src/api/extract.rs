//! Extractors whose rejections are `ApiError`s, so a bad body, path or
//! query gets the same `{"error": …}` shape as every other failure instead
//! of axum's plain-text rejections.
//!
//! `JsonBody` accepts only `application/json` (or `…+json`) bodies (else
//! 415), of at most `gateway.body_bytes_max` bytes (else 413: a declared
//! length is refused before reading, an undeclared one while reading), and
//! answers malformed or mistyped JSON with 400 and serde's message.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;

use super::ApiError;
use crate::state::AppState;

/// A JSON request body, bounded by `gateway.body_bytes_max`.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit_bytes = state.platform.settings.gateway.body_bytes_max;
        let headers = req.headers();
        let content_type = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !is_json(content_type) {
            return Err(ApiError::unsupported_media_type());
        }
        let declared = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit_bytes) {
            return Err(ApiError::payload_too_large(limit_bytes));
        }
        let limit = usize::try_from(limit_bytes).unwrap_or(usize::MAX);
        let bytes = match Limited::new(req.into_body(), limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<LengthLimitError>() => return Err(ApiError::payload_too_large(limit_bytes)),
            Err(e) => return Err(ApiError::bad_request(format!("cannot read the request body: {e}"))),
        };
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
    }
}

/// Path parameters (percent-decoded), with JSON rejections.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

/// Query parameters, with JSON rejections.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_content_types() {
        for ok in
            ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"]
        {
            assert!(is_json(ok), "{ok}");
        }
        for bad in ["", "text/plain", "application/x-www-form-urlencoded", "text/json", "application/jsonx"] {
            assert!(!is_json(bad), "{bad}");
        }
    }
}
