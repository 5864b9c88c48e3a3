//! Assembling and running one turn for an agent: check out its storage, read
//! its config.json, resolve the model client (the agent's own key first,
//! then the platform's), and hand everything to the runtime.
//!
//! This module decides nothing about queues or delivery; the worker and the
//! terminal channel call it and deliver the outcome.

use std::sync::Arc;

use tinyfat_core::AgentConfig;
use tinyfat_model::{CancelToken, ModelClient, ModelRoute, Provider, ProviderCredentials, RetryPolicy, RetryingClient};
use tinyfat_runtime::{Identity, Turn, TurnEvent, TurnInput, TurnLimits, TurnOutcome};
use tinyfat_store::Agent;

use crate::Platform;
use crate::error::{Error, Result};

/// Why a turn could not produce an outcome, with the decision for the caller.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Turn(#[from] tinyfat_runtime::TurnError),
    #[error(transparent)]
    Platform(#[from] Error),
}

impl Platform {
    pub fn turn_limits(&self) -> TurnLimits {
        let r = &self.settings.runtime;
        TurnLimits {
            tool_calls_max: r.turn_tool_calls_max,
            wall_max: std::time::Duration::from_secs(r.turn_wall_s_max),
            tool_wall_max: std::time::Duration::from_secs(r.tool_wall_s_max),
            tokens_per_day_max: r.tokens_per_day_max,
            ..TurnLimits::default()
        }
    }

    /// The model client for `model`: the agent's secret key over the platform's.
    pub async fn model_client(&self, agent: &Agent, model: &str) -> Result<Arc<dyn ModelClient>> {
        let route = ModelRoute::parse(model).map_err(Error::invalid)?;
        let m = &self.settings.model;
        let agent_key = self.secret(agent, route.provider.secret_name()).await?;
        let mut creds = ProviderCredentials {
            anthropic_key: m.anthropic_api_key.clone(),
            anthropic_base_url: Some(m.anthropic_base_url.clone()),
            openai_key: m.openai_api_key.clone(),
            openai_base_url: Some(m.openai_base_url.clone()),
        };
        if let Some(key) = agent_key {
            match route.provider {
                Provider::Anthropic => creds.anthropic_key = Some(key),
                Provider::OpenAi => creds.openai_key = Some(key),
            }
        }
        let client = tinyfat_model::build_client(model, &creds, &self.http).map_err(Error::invalid)?;
        Ok(Arc::new(RetryingClient::new(client, RetryPolicy::default())))
    }

    /// Runs one turn of `agent` in-process, streaming events into `sink`.
    pub async fn run_turn(
        &self,
        agent: &Agent,
        input: TurnInput,
        cancel: CancelToken,
        tokens_used_today: u64,
        sink: &mut (dyn FnMut(TurnEvent) + Send),
    ) -> Result<TurnOutcome, RunError> {
        let workspace = self.storage.checkout(&agent.id).await.map_err(Error::from)?;
        let config_json = workspace
            .dir
            .read_string(&crate::provision::config_path(), crate::provision::CONFIG_BYTES_MAX)
            .map_err(Error::from)?;
        let config: AgentConfig = serde_json::from_str(&config_json)
            .map_err(|e| Error::Invalid(format!("config.json of {} is invalid: {e}", agent.name)))?;
        let model = self.model_client(agent, &config.model).await?;
        let turn = Turn {
            workspace: &workspace,
            identity: Identity {
                name: agent.name.to_string(),
                email: agent.email.to_string(),
                owner: agent.owner_email.to_string(),
            },
            config,
            config_json,
            model: model.as_ref(),
            executor: self.executor.as_ref(),
            limits: self.turn_limits(),
            cancel,
            tokens_used_today,
            clock: Arc::new(chrono::Utc::now),
            sessions: Some(&self.sessions),
        };
        let outcome = turn.run(input, sink).await?;
        if let Some(model) = &outcome.model_changed {
            self.store.set_agent_model(&agent.id, model).await.map_err(Error::from)?;
        }
        self.storage.commit(&workspace).await.map_err(Error::from)?;
        Ok(outcome)
    }
}

impl Platform {
    /// Today's date in UTC: the day the usage ledger and the budget count.
    fn today_utc(&self) -> chrono::NaiveDate {
        chrono::DateTime::from_timestamp_millis(self.now_ms()).unwrap_or_default().date_naive()
    }

    /// Tokens the agent used today (UTC), for the daily budget.
    pub async fn tokens_used_today(&self, agent: &Agent) -> Result<u64> {
        let today = self.today_utc();
        Ok(self.store.usage_for(&agent.id, today).await?.total())
    }

    /// Adds a turn's usage to today's ledger (the session record has it too).
    pub async fn record_usage(&self, agent: &Agent, usage: &tinyfat_core::message::Usage) -> Result<()> {
        if usage.total() == 0 {
            return Ok(());
        }
        let today = self.today_utc();
        Ok(self.store.add_usage(&agent.id, today, usage).await?)
    }
}
