//! The agent's `config.json`: the owner's settings. Read-only to the agent;
//! it changes only through `/model`, the CLI, the API or the dashboard.
//! Unknown fields are kept so a newer platform's settings survive an edit.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    #[default]
    Off,
    On,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recipients {
    #[default]
    Allowed,
    Any,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentConfig {
    pub model: String,
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub recipients: Recipients,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_timezone() -> String {
    "UTC".to_owned()
}

impl AgentConfig {
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            timezone: default_timezone(),
            network: Network::Off,
            recipients: Recipients::Allowed,
            extra: serde_json::Map::new(),
        }
    }

    pub fn to_pretty_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("config serialises");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_fields() {
        let c: AgentConfig = serde_json::from_str(r#"{"model":"claude-x","future":1}"#).unwrap();
        assert_eq!(c.timezone, "UTC");
        assert_eq!(c.network, Network::Off);
        assert_eq!(c.recipients, Recipients::Allowed);
        assert!(c.to_pretty_json().contains("\"future\": 1"));
        assert!(serde_json::from_str::<AgentConfig>(r#"{"model":"m","network":"maybe"}"#).is_err());
    }
}
