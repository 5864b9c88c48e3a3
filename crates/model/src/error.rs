//! `ModelError`: what went wrong with a model call, sorted by what the caller
//! must do about it. Messages are meant for the agent's owner: they say what
//! to fix and never contain an API key.

use std::time::Duration;

use crate::Provider;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Try again later: 429, 5xx, 529, network failures, a stream cut short, an
    /// `error` event mid-stream. `retry_after` is the provider's own hint.
    #[error("{message}")]
    Transient { status: Option<u16>, retry_after: Option<Duration>, message: String },
    /// Retrying will not help until someone changes something (a rejected
    /// key, a missing model). Tell the user once and end the job.
    #[error("{message}")]
    Permanent { message: String },
    /// No API key is configured for the provider the model name routes to.
    #[error(
        "no {provider} API key is configured: set it with `tinyfat secret set NAME {}` or the {} environment variable",
        provider.secret_name(),
        provider.env_var()
    )]
    MissingKey { provider: Provider },
    /// The model name matches no provider.
    #[error("unknown model provider for '{model}': use claude-…, anthropic:… or openai:…")]
    UnknownProvider { model: String },
    /// The provider refused this request as malformed or too large (400, 413,
    /// 422). Retrying the same request fails the same way.
    #[error("the model request was rejected: {message}")]
    BadRequest { message: String },
    /// The caller's [`crate::CancelToken`] fired.
    #[error("the model call was cancelled")]
    Cancelled,
    /// The provider's response did not follow its wire format, or exceeded a
    /// size limit.
    #[error("malformed model response: {message}")]
    Protocol { message: String },
}

impl ModelError {
    /// True for errors that the same request may not hit again later.
    pub fn is_transient(&self) -> bool {
        matches!(self, ModelError::Transient { .. })
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        ModelError::Protocol { message: message.into() }
    }

    pub(crate) fn network(message: impl Into<String>) -> Self {
        ModelError::Transient { status: None, retry_after: None, message: message.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_key_says_how_to_fix_it() {
        let text = ModelError::MissingKey { provider: Provider::Anthropic }.to_string();
        assert!(text.contains("tinyfat secret set NAME anthropic_api_key"), "{text}");
        assert!(text.contains("ANTHROPIC_API_KEY"), "{text}");
        let text = ModelError::MissingKey { provider: Provider::OpenAi }.to_string();
        assert!(text.contains("openai_api_key") && text.contains("OPENAI_API_KEY"), "{text}");
    }

    #[test]
    fn unknown_provider_names_the_model_and_the_options() {
        let text = ModelError::UnknownProvider { model: "gpt-4o".into() }.to_string();
        assert_eq!(text, "unknown model provider for 'gpt-4o': use claude-…, anthropic:… or openai:…");
    }
}
