//! Routing: which provider serves a model name, and building that provider's
//! client from credentials. Where the credentials come from (an agent's
//! secrets over the platform's configuration) is the caller's business; this
//! module only applies them.

use std::fmt;
use std::sync::Arc;

use tinyfat_core::Secret;

use crate::{AnthropicClient, HttpClient, ModelClient, ModelError, OpenAiClient};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    Anthropic,
    /// OpenAI or any server speaking the Chat Completions API.
    OpenAi,
}

impl Provider {
    /// The per-agent secret that holds this provider's API key.
    pub fn secret_name(self) -> &'static str {
        match self {
            Provider::Anthropic => "anthropic_api_key",
            Provider::OpenAi => "openai_api_key",
        }
    }

    /// The platform-level environment variable for the key.
    pub fn env_var(self) -> &'static str {
        match self {
            Provider::Anthropic => "ANTHROPIC_API_KEY",
            Provider::OpenAi => "OPENAI_API_KEY",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Provider::Anthropic => "Anthropic",
            Provider::OpenAi => "OpenAI",
        })
    }
}

/// A model name resolved: `claude-x` → (Anthropic, `claude-x`);
/// `anthropic:x` → (Anthropic, `x`); `openai:x` → (OpenAI, `x`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRoute {
    pub provider: Provider,
    /// The name the provider's API expects.
    pub model: String,
}

impl ModelRoute {
    pub fn parse(name: &str) -> Result<Self, ModelError> {
        let name = name.trim();
        let (provider, model) = if let Some(rest) = name.strip_prefix("anthropic:") {
            (Provider::Anthropic, rest)
        } else if let Some(rest) = name.strip_prefix("openai:") {
            (Provider::OpenAi, rest)
        } else if name.starts_with("claude-") {
            (Provider::Anthropic, name)
        } else {
            return Err(ModelError::UnknownProvider { model: name.to_string() });
        };
        if model.is_empty() {
            return Err(ModelError::UnknownProvider { model: name.to_string() });
        }
        Ok(Self { provider, model: model.to_string() })
    }
}

/// API keys and base URLs for both providers, already merged by the caller.
/// An empty key counts as absent.
#[derive(Clone, Debug, Default)]
pub struct ProviderCredentials {
    pub anthropic_key: Option<Secret>,
    /// Default `https://api.anthropic.com`.
    pub anthropic_base_url: Option<String>,
    /// Optional when `openai_base_url` points at a server that needs no key
    /// (a local model server); required for the default OpenAI endpoint.
    pub openai_key: Option<Secret>,
    /// Default `https://api.openai.com`.
    pub openai_base_url: Option<String>,
}

fn present(key: &Option<Secret>) -> Option<Secret> {
    key.as_ref().filter(|k| !k.is_empty()).cloned()
}

fn configured(url: &Option<String>) -> Option<&str> {
    url.as_deref().map(str::trim).filter(|u| !u.is_empty())
}

/// Builds the client for the provider that `model` routes to.
///
/// Errors: [`ModelError::UnknownProvider`] for an unroutable name,
/// [`ModelError::MissingKey`] when the provider needs a key and none is set.
pub fn build_client(
    model: &str,
    credentials: &ProviderCredentials,
    http: &HttpClient,
) -> Result<Arc<dyn ModelClient>, ModelError> {
    let route = ModelRoute::parse(model)?;
    match route.provider {
        Provider::Anthropic => {
            let key =
                present(&credentials.anthropic_key).ok_or(ModelError::MissingKey { provider: Provider::Anthropic })?;
            Ok(Arc::new(AnthropicClient::new(http.clone(), key, configured(&credentials.anthropic_base_url))))
        }
        Provider::OpenAi => {
            let key = present(&credentials.openai_key);
            let base_url = configured(&credentials.openai_base_url);
            if key.is_none() && base_url.is_none() {
                return Err(ModelError::MissingKey { provider: Provider::OpenAi });
            }
            Ok(Arc::new(OpenAiClient::new(http.clone(), key, base_url)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_model_names() {
        let cases = [
            ("claude-sonnet-4-5", Provider::Anthropic, "claude-sonnet-4-5"),
            ("anthropic:claude-opus-4-1", Provider::Anthropic, "claude-opus-4-1"),
            ("anthropic:my-proxy-model", Provider::Anthropic, "my-proxy-model"),
            ("openai:gpt-4o-mini", Provider::OpenAi, "gpt-4o-mini"),
            ("openai:llama3.1:8b", Provider::OpenAi, "llama3.1:8b"),
            (" claude-x ", Provider::Anthropic, "claude-x"),
        ];
        for (name, provider, model) in cases {
            let route = ModelRoute::parse(name).unwrap();
            assert_eq!((route.provider, route.model.as_str()), (provider, model), "{name}");
        }
    }

    #[test]
    fn rejects_unroutable_names() {
        for name in ["gpt-4o", "", "anthropic:", "openai:", "Claude-3", "mistral:large"] {
            let err = ModelRoute::parse(name).unwrap_err();
            assert!(matches!(err, ModelError::UnknownProvider { .. }), "{name}: {err:?}");
        }
    }

    #[test]
    fn build_client_demands_the_keys_it_needs() {
        let http = HttpClient::new(Default::default()).unwrap();
        let none = ProviderCredentials::default();
        let err = build_client("claude-x", &none, &http).unwrap_err();
        assert!(matches!(err, ModelError::MissingKey { provider: Provider::Anthropic }));
        let empty = ProviderCredentials { anthropic_key: Some(Secret::new("")), ..Default::default() };
        assert!(matches!(build_client("claude-x", &empty, &http), Err(ModelError::MissingKey { .. })));
        let err = build_client("openai:gpt-4o", &none, &http).unwrap_err();
        assert!(matches!(err, ModelError::MissingKey { provider: Provider::OpenAi }));

        let local = ProviderCredentials { openai_base_url: Some("http://127.0.0.1:11434/v1".into()), ..none.clone() };
        assert!(build_client("openai:llama3", &local, &http).is_ok(), "a local server needs no key");
        let keyed = ProviderCredentials { anthropic_key: Some(Secret::new("sk-ant-x")), ..Default::default() };
        let client = build_client("anthropic:claude-x", &keyed, &http).unwrap();
        assert!(!format!("{client:?}").contains("sk-ant-x"), "Debug must not print the key");
        assert!(matches!(build_client("gpt-4o", &keyed, &http), Err(ModelError::UnknownProvider { .. })));
    }
}
